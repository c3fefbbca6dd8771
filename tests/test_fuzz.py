"""Fuzzing of user input with hypothesis: ``key=value`` overrides for ``python -m train`` and the
arguments of ``python -m eval generate|perplexity``. Every rejected input exits 2 with one ``error:``
line and no traceback; nothing else escapes. The CLIs' ``main(argv)`` run in this process, with the
expensive part (training, loading a checkpoint) replaced by a stub that marks the input accepted.
Also: the loaders of untrusted files have no code-execution path (pickle, remote code, eval)."""

import collections
import re
import sys
from pathlib import Path

import jax
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cli.eval as eval_main
import cli.host
import cli.train as train_main
from train.config import SECTIONS, Config, dump_yaml

ROOT = Path(__file__).resolve().parent.parent
FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


class InputAcceptedError(Exception):
    """Raised by the stubs: the CLI accepted the input and went on to the real work."""


KNOWN_KEYS = [f"{section}.{key}" for section, cls in SECTIONS.items()
              for key in cls.__dataclass_fields__]
VALUES = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.sampled_from(["0", "-1", "1", "2", "3", "4", "7", "8", "16", "64", "1e400", "-1e400", "nan",
                     "inf", ".inf", "-.inf", "1.5", "1e-9", "true", "false", "yes", "null", "~",
                     "", " ", "[1, 2]", "{a: 1}", "!!python/object/apply:os.system ['true']",
                     "'quoted'", "0x10", "1_000", "stdlib", "text:/nonexistent/*.txt", "byte",
                     "tfds:nosuch", "sentencepiece:/nonexistent.model", "rope", "bfloat16",
                     "gs://bucket/run", "\x00", "é", "-"]),
    st.text(max_size=12),
)
KEYS = st.one_of(st.sampled_from(KNOWN_KEYS), st.text(max_size=16),
                 st.sampled_from(["model", "model.", ".steps", "a.b.c", "train.steps.x", "=", "run"]))
OVERRIDE = st.one_of(st.tuples(KEYS, VALUES).map(lambda kv: f"{kv[0]}={kv[1]}"), st.text(max_size=20))


def _check_outcome(run, capsys) -> str:
    """Runs ``run()``; returns 'accepted' or 'rejected' after checking how a rejection looks."""
    try:
        code = run()
    except InputAcceptedError:
        return "accepted"
    except SystemExit as e:  # --help and the like
        code = e.code
    captured = capsys.readouterr()
    if code == 0:
        return "accepted"
    assert code == 2, (code, captured.err)
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "Traceback" not in captured.err
    return "rejected"


@pytest.fixture
def train_stubbed(monkeypatch):
    def fake_train(cfg, **kwargs):
        raise InputAcceptedError
    monkeypatch.setattr(train_main, "setup_devices", lambda run: jax.device_count())
    monkeypatch.setattr(train_main, "train", fake_train)


def _fuzz(strategy, run, capsys) -> collections.Counter:
    """Runs ``run(example)`` on every example; counts the outcomes."""
    outcomes: collections.Counter = collections.Counter()

    @FUZZ
    @given(example=strategy)
    def check(example):
        outcomes[_check_outcome(lambda: run(example), capsys)] += 1

    check()
    print(dict(outcomes), file=sys.__stderr__)
    return outcomes


def test_fuzzed_train_overrides_are_accepted_or_rejected_with_one_line(train_stubbed, capsys):
    outcomes = _fuzz(st.lists(OVERRIDE, min_size=1, max_size=4),
                     lambda overrides: train_main.main(["configs/tiny.yaml", *overrides]), capsys)
    assert outcomes["rejected"] > 0


def test_fuzzed_known_keys_with_odd_values(train_stubbed, capsys):
    pairs = st.lists(st.tuples(st.sampled_from(KNOWN_KEYS), VALUES), min_size=1, max_size=3)
    outcomes = _fuzz(pairs, lambda kv: train_main.main(["configs/tiny.yaml",
                                                         *(f"{k}={v}" for k, v in kv)]), capsys)
    assert outcomes["accepted"] > 0 and outcomes["rejected"] > 0


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory) -> Path:
    """A run directory with a valid config and tokenizer (loading it is stubbed)."""
    run_dir = tmp_path_factory.mktemp("fuzz") / "run"
    (run_dir / "checkpoints" / "10").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(dump_yaml(Config()))
    (run_dir / "tokenizer.json").write_text('{"kind": "byte", "vocab_size": 259}\n')
    (run_dir / "prompts.txt").write_text("def \nclass \n")
    (run_dir / "binary.txt").write_bytes(b"\xff\xfe\x00")
    return run_dir


@pytest.fixture
def eval_stubbed(monkeypatch):
    def fake_load(path, mesh_cfg=None):
        raise InputAcceptedError
    monkeypatch.setattr(cli.host, "load_run", fake_load)


def _eval_args(run_dir: Path):
    paths = st.sampled_from([str(run_dir), str(run_dir / "checkpoints" / "10"),
                             str(run_dir / "checkpoints" / "7"), str(run_dir / "checkpoints" / "x"),
                             "/nonexistent", "", str(run_dir / "config.yaml")])
    numbers = st.one_of(st.integers(-5, 10**6).map(str),
                        st.sampled_from(["nan", "inf", "-inf", "0.5", "1e309", "x", "", "-0"]))
    flag_value = st.one_of(
        st.tuples(st.just("--checkpoint"), paths),
        st.tuples(st.sampled_from(["--prompt"]), st.text(max_size=8)),
        st.tuples(st.just("--prompts-file"),
                  st.sampled_from([str(run_dir / "prompts.txt"), str(run_dir / "binary.txt"),
                                   "/nonexistent.txt", str(run_dir)])),
        st.tuples(st.sampled_from(["--max-new-tokens", "--temperature", "--top-k", "--top-p",
                                   "--seed", "--batch-size", "--max-batches"]), numbers),
        st.tuples(st.just("--data"), st.sampled_from(["stdlib", "text:/none/*.txt", "bogus", ""])),
        st.tuples(st.sampled_from(["--json", "--bogus", "-x", "--"]), st.just(None)),
    )
    command = st.sampled_from(["generate", "perplexity", "generate", "perplexity", "bogus", "",
                               "--help"])

    def flatten(parts):
        cmd, flags = parts
        argv = [cmd] if cmd else []
        for flag, value in flags:
            argv += [flag] if value is None else [flag, value]
        return argv
    return st.tuples(command, st.lists(flag_value, max_size=6)).map(flatten)


def test_fuzzed_eval_arguments_are_accepted_or_rejected_with_one_line(eval_stubbed, fake_run,
                                                                      capsys):
    outcomes = _fuzz(_eval_args(fake_run), eval_main.main, capsys)
    assert outcomes["accepted"] > 0 and outcomes["rejected"] > 0


# Code-execution paths that must never appear in a loader of untrusted files.
FORBIDDEN = re.compile(r"\bimport pickle\b|\bpickle\.|cloudpickle|\bdill\b|\bmarshal\.|"
                       r"trust_remote_code\s*=\s*True|\beval\(|\bexec\(|yaml\.load\(|yaml\.unsafe_load|"
                       r"yaml\.full_load|allow_pickle\s*=\s*True|torch\.load\(|jsonpickle|shelve\.|"
                       r"(?<!Sandboxed)Environment\(|jinja2\.Template\(")  # chat templates: sandbox only
LOADERS = ["train/checkpoint.py", "train/config.py", "train/run_dir.py", "train/loop.py",
           "data/tokenizer.py", "data/sources.py", "data/pipeline.py", "inference/load.py",
           "data/hf_tokenizer.py", "data/chat.py", "convert/checkpoints.py", "convert/gguf_import.py",
           "convert/hf_layout.py"]


def test_loaders_of_untrusted_files_have_no_code_execution_path():
    found = []
    for rel in LOADERS:
        for n, line in enumerate((ROOT / rel).read_text().splitlines(), 1):
            if FORBIDDEN.search(line.split("#")[0]):
                found.append(f"{rel}:{n}: {line.strip()}")
    assert not found, found
    assert FORBIDDEN.search("x = pickle.loads(b)") and FORBIDDEN.search("eval(text)")
    assert FORBIDDEN.search("jinja2.Environment()") and not FORBIDDEN.search(
        "ImmutableSandboxedEnvironment(")


def test_yaml_tags_that_would_run_code_stay_strings():
    with pytest.raises(yaml.YAMLError):
        yaml.safe_load("!!python/object/apply:os.system ['true']")
