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
           "data/tokenizer.py", "data/sources.py", "data/pipeline.py", "data/hf_sources.py",
           "data/token_cache.py", "inference/load.py",
           "data/hf_tokenizer.py", "data/chat.py", "data/gguf_file.py", "convert/checkpoints.py",
           "convert/gguf_import.py", "convert/hf_layout.py", "convert/hf_config.py",
           "convert/hf_names.py", "convert/safetensors_io.py"]


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


# ------------------------------------------------------------------------------- hostile files
# Files that come from elsewhere (GGUF, safetensors, JSON, chat templates) are refused with one
# ``error:`` line, in bounded time and memory: a count, length or size the file cannot back is
# rejected before anything of that size is allocated or looped over.

SECONDS = 10.0  # loose: each case ends within a few seconds
MEGABYTES = 64  # Python allocations (tracemalloc) while one hostile file is read


def _bounded(run):
    """``run()``'s result, asserting it took under SECONDS and allocated under MEGABYTES."""
    import time
    import tracemalloc

    tracemalloc.start()
    start = time.perf_counter()
    try:
        return run()
    finally:
        elapsed, peak = time.perf_counter() - start, tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert elapsed < SECONDS, f"took {elapsed:.1f} s"
        assert peak < MEGABYTES << 20, f"allocated {peak / 2**20:.0f} MiB"


def _one_error_line(capsys, code: int) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, captured.err)
    return lines[0]


def _loader_error(capsys, run) -> str:
    """The one ``error:`` line a command prints for the ValueError ``run()`` raises."""
    from core.errors import report

    with pytest.raises(ValueError) as info:
        _bounded(run)
    return _one_error_line(capsys, report(info.value))


def _convert_import(capsys, src: Path, tmp_path: Path) -> str:
    import cli.convert

    line = _one_error_line(capsys, _bounded(
        lambda: cli.convert.main(["import", str(src), str(tmp_path / "imported")])))
    assert not (tmp_path / "imported").exists()
    return line


def _gguf_header(tensors: int, kvs: int) -> bytes:
    import struct

    return b"GGUF" + struct.pack("<IQQ", 3, tensors, kvs)


def _gguf_string(text: bytes) -> bytes:
    import struct

    return struct.pack("<Q", len(text)) + text


def _hostile_ggufs() -> dict[str, bytes]:
    import struct

    arch = _gguf_string(b"general.architecture") + struct.pack("<I", 8) + _gguf_string(b"llama")
    return {
        "kv count 2**60": _gguf_header(0, 2**60) + arch,
        "tensor count 2**60": _gguf_header(2**60, 1) + arch + _gguf_string(b"w") + struct.pack(
            "<IQQIQ", 2, 4, 4, 0, 0),
        "array of 2**62 bytes": _gguf_header(0, 1) + _gguf_string(b"tokenizer.ggml.token_type")
        + struct.pack("<IIQ", 9, 0, 2**62) + b"\x01" * 16,
        "array of 2**40 strings": _gguf_header(0, 1) + _gguf_string(b"tokenizer.ggml.tokens")
        + struct.pack("<IIQ", 9, 8, 2**40) + _gguf_string(b"a") * 4,
        "key of 2**62 bytes": _gguf_header(0, 1) + struct.pack("<Q", 2**62) + b"abc",
        "2**31 tensor dimensions": _gguf_header(1, 1) + arch + _gguf_string(b"w")
        + struct.pack("<I", 2**31) + b"\0" * 64,
        "tensor beyond the file": _gguf_header(1, 1) + arch + _gguf_string(b"w") + struct.pack(
            "<IQQIQ", 2, 2**20, 2**20, 0, 0),
        "truncated": _gguf_header(0, 1) + arch[:-3],
    }


@pytest.mark.parametrize("case", list(_hostile_ggufs()))
def test_hostile_gguf_headers_are_one_error_line(case, tmp_path, capsys):
    from data.hf_tokenizer import tokenizer_from_gguf

    path = tmp_path / "hostile.gguf"
    path.write_bytes(_hostile_ggufs()[case])
    assert "GGUF" in _convert_import(capsys, path, tmp_path)
    assert "GGUF" in _loader_error(capsys, lambda: tokenizer_from_gguf(path))


def test_a_gguf_array_longer_than_any_vocabulary_is_refused_unread(tmp_path, capsys):
    """2**26 one-byte items that the (sparse) file does hold: refused by count, not walked."""
    import struct

    from data.hf_tokenizer import tokenizer_from_gguf

    path = tmp_path / "long.gguf"
    path.write_bytes(_gguf_header(0, 1) + _gguf_string(b"tokenizer.ggml.token_type")
                     + struct.pack("<IIQ", 9, 0, 2**26))
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size + 2**26)
    assert "items" in _loader_error(capsys, lambda: tokenizer_from_gguf(path))


def _tiny_hf_dir(directory: Path) -> Path:
    """A valid Llama config.json and tokenizer.json: what the hostile file is placed beside."""
    import json

    from tokenizers import Tokenizer, models

    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(dict(
        model_type="llama", vocab_size=8, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16)))
    Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>")).save(
        str(directory / "tokenizer.json"))
    return directory


def _hostile_safetensors() -> dict[str, bytes]:
    import struct

    header = b'{"w": {"dtype": "F32", "shape": [1024, 1024], "data_offsets": [0, 4194304]}}'
    return {
        "truncated header": struct.pack("<Q", 100) + b'{"w": {"dtype"',
        "header length 2**63": struct.pack("<Q", 2**63) + b"{}",
        "header length 2**30": struct.pack("<Q", 2**30) + b"{}" + b" " * 64,
        "tensor beyond the file": struct.pack("<Q", len(header)) + header + b"\0" * 16,
        "nested header": struct.pack("<Q", 200_000) + b"[" * 100_000 + b"]" * 100_000,
        "empty": b"",
    }


@pytest.mark.parametrize("case", list(_hostile_safetensors()))
def test_hostile_safetensors_are_one_error_line(case, tmp_path, capsys):
    src = _tiny_hf_dir(tmp_path / "hf")
    (src / "model.safetensors").write_bytes(_hostile_safetensors()[case])
    assert "model.safetensors" in _convert_import(capsys, src, tmp_path)


def _sparse(path: Path, size: int, start: bytes = b"{") -> None:
    path.write_bytes(start)
    with path.open("r+b") as f:
        f.truncate(size)


HOSTILE_JSON = [(name, how) for how in ("nested", "oversized") for name in (
    "config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors.index.json")]


@pytest.mark.parametrize(("name", "how"), HOSTILE_JSON)
def test_hostile_json_files_are_one_error_line(name, how, tmp_path, capsys):
    src = _tiny_hf_dir(tmp_path / "hf")
    if how == "nested":
        (src / name).write_text("[" * 200_000 + "]" * 200_000)
    else:
        _sparse(src / name, 1 << 30)  # a 1 GiB file that takes no disk
    assert name in _convert_import(capsys, src, tmp_path)


def _tokenizer_with_template(directory: Path, template: str):
    import json

    from data.hf_tokenizer import HFTokenizer

    _tiny_hf_dir(directory)
    (directory / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    return HFTokenizer.from_path(directory)


HOSTILE_TEMPLATES = {
    "nested range loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
                          "{% endfor %}",
    "nested loops, no calls": "{% set x = range(100000) | list %}{% for a in x %}{% for b in x %}"
                              "{% endfor %}{% endfor %}",
    "huge string": "{{ 'x' * 10**9 }}",
    "huge list": "{{ ([1] * 10**9) | length }}",
    "huge power": "{{ 10 ** (10 ** 10) }}",
    "huge padding": "{{ 'x' | center(10**9) }}",
    "huge format width": "{{ '%1000000000s' % 'x' }}",
    "huge format field": "{{ '{:>1000000000}'.format('x') }}",
    "huge method argument": "{{ 'x'.ljust(10**9) }}",
    "output in a loop": "{% for i in range(100000) %}{{ 'x' * 100000 }}{% endfor %}",
    "text in a loop": "{% set x = range(100000) | list %}{% set s %}{% for a in x %}{% for b in x %}"
                      + "y" * 1000 + "{% endfor %}{% endfor %}{% endset %}{{ s | length }}",
    "doubling": "{% set a = 'x' * 1000 %}" + "".join(
        "{% set a = a ~ a %}" for _ in range(30)) + "{{ a | length }}",
    "recursion": "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
    "division by zero": "{{ 1 / 0 }}",
    "type error": "{{ 1 + 'a' }}",
}


@pytest.mark.parametrize("case", list(HOSTILE_TEMPLATES))
def test_hostile_chat_templates_end_with_one_error_line(case, tmp_path, capsys):
    tokenizer = _tokenizer_with_template(tmp_path / "hf", HOSTILE_TEMPLATES[case])
    line = _loader_error(capsys, lambda: tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]))
    assert line.startswith("error: chat template")


def test_gguf_chat_template_is_bounded_too(tmp_path, capsys):
    import gguf

    from data.hf_tokenizer import tokenizer_from_gguf

    writer = gguf.GGUFWriter(tmp_path / "t.gguf", "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["a", "b"])
    writer.add_chat_template(HOSTILE_TEMPLATES["nested loops, no calls"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    tokenizer = tokenizer_from_gguf(tmp_path / "t.gguf")
    line = _loader_error(capsys, lambda: tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]))
    assert line.startswith("error: chat template")


def test_a_large_but_honest_chat_template_still_renders(tmp_path):
    """The bounds leave real templates alone: loops over messages, filters, methods, tojson."""
    template = ("{% for m in messages %}{{ '<|' ~ m['role'] ~ '|>' }}{{ m['content'] | trim }}"
                "{{ (m['content'] * 2)[:3] }}{{ '%-4s' % m['role'] }}{{ '{:>3}'.format(loop.index) }}"
                "{% endfor %}{{ messages | tojson }}")
    tokenizer = _tokenizer_with_template(tmp_path / "hf", template)
    messages = [{"role": "user", "content": "hé " * 20_000}] * 20
    text = tokenizer.apply_chat_template(messages)
    assert text.startswith("<|user|>hé hé") and text.count("<|user|>") == 20
