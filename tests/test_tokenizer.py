"""Tokenizers: exact round trips (property tests), SentencePiece training, reloading, run-directory
persistence, specs, and the ``python -m data train-tokenizer`` command. Imports no JAX.
"""

import hashlib
import json
import pickle
import random
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
from hypothesis import given, settings
from hypothesis import strategies as st

from data.tokenizer import (
    MAX_SENTENCE_BYTES,
    ByteTokenizer,
    SentencePieceTokenizer,
    load_tokenizer,
    make_tokenizer,
    save_tokenizer,
    train_sentencepiece,
    training_lines,
    vocab_size_of,
)

REPO = Path(__file__).resolve().parents[1]
PROPERTY = settings(max_examples=200, deadline=None)
EDGE_CASES = [
    "", " ", "   ", "\n", "\n\n", "\t", " \t\n ", "\r\n", " leading", "trailing ", "  both  ",
    "a  b\t\tc\n\nd", "\u2581", "\u2581\u2581 x", "x\u2581y", "\u2581 \u2581", "\x00", "a\x00b", "\x7f",
    "é", "e\u0301", "\ufb01", "\u00a0", "\u3000", "\ufeff", "\u200b", "日本語のテキスト", "😀👍🏽",
    "<s>", "</s>", "<pad>", "<unk>", "<0x41>", " \u2047 ", "123456", "x=1.5e-3",
]
# Any string without surrogates (which UTF-8 cannot encode): every category, whitespace, "▁", NUL...
ANY_TEXT = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=80)
MIXED_TEXT = st.lists(st.sampled_from(["the", " ", "  ", "\n", "\t", "\u2581", "cat", "é", "7", "😀",
                                       "<s>", "\x00"]) | ANY_TEXT, max_size=12).map("".join)


def corpus_text(lines: int = 3000, seed: int = 0) -> str:
    """A small synthetic corpus: lowercase words, digits, punctuation, indentation."""
    words_rng, rng = random.Random(0), random.Random(seed)
    words = ["".join(words_rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(words_rng.randint(1, 8)))
             for _ in range(200)] + ["42", "x = 1", "(a, b)", "    ", "def", "return"]
    weights = [1 / (rank + 1) for rank in range(len(words))]  # Zipf-like, as in real text
    return "\n".join(" ".join(rng.choices(words, weights, k=rng.randint(1, 16))) for _ in range(lines))


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(corpus_text())
    return path


@pytest.fixture(scope="module", params=["bpe", "unigram"])
def trained(request, corpus_file, tmp_path_factory) -> SentencePieceTokenizer:
    prefix = tmp_path_factory.mktemp("model") / request.param
    return SentencePieceTokenizer(train_sentencepiece([corpus_file], 400, request.param, prefix))


@pytest.fixture(scope="module")
def llama_like(corpus_file, tmp_path_factory) -> SentencePieceTokenizer:
    """A model trained with SentencePiece's own defaults plus byte fallback (dummy prefix, no pad)."""
    prefix = tmp_path_factory.mktemp("llama") / "m"
    spm.SentencePieceTrainer.Train(input=str(corpus_file), model_prefix=str(prefix), vocab_size=400,
                                   byte_fallback=True, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, minloglevel=2)
    return SentencePieceTokenizer(f"{prefix}.model")


@PROPERTY
@given(ANY_TEXT)
def test_byte_tokenizer_round_trips_any_text(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text


@PROPERTY
@given(text=ANY_TEXT | MIXED_TEXT)
def test_sentencepiece_round_trips_any_text(trained, text):
    ids = trained.encode(text)
    assert all(0 <= i < trained.vocab_size for i in ids)
    assert trained.decode(ids) == text


@pytest.mark.parametrize("text", EDGE_CASES)
def test_sentencepiece_round_trips_edge_cases(trained, text):
    assert trained.decode(trained.encode(text)) == text


@pytest.mark.parametrize("text", EDGE_CASES)
def test_dummy_prefix_model_round_trips_edge_cases(llama_like, text):
    assert llama_like.decode(llama_like.encode(text)) == text


def test_special_ids_and_byte_fallback(trained):
    assert (trained.vocab_size, trained.bos_id, trained.eos_id, trained.pad_id) == (400, 1, 2, 3)
    assert trained._sp.unk_id() == 0
    ids = trained.encode("never seen: 龍🐉")
    assert 0 not in ids, "characters outside the vocabulary must become byte pieces, not <unk>"
    assert any(trained._sp.is_byte(i) for i in ids)
    assert trained.decode([*ids, trained.eos_id, trained.pad_id, 10_000]) == "never seen: 龍🐉"


def test_text_is_compressed(trained):
    text = corpus_text(lines=50, seed=1)
    assert len(trained.encode(text)) < 0.5 * len(text.encode("utf-8"))


def test_pad_falls_back_to_eos(llama_like):
    assert llama_like._sp.pad_id() == -1
    assert llama_like.pad_id == llama_like.eos_id == 2


def test_reloaded_model_gives_identical_ids(trained, tmp_path):
    path = tmp_path / "copy.model"
    path.write_bytes(trained.model_proto)
    text = corpus_text(lines=40, seed=2) + " \u2581 😀 \t\n"
    expected = trained.encode(text)
    for other in (SentencePieceTokenizer(path), SentencePieceTokenizer(path.read_bytes()),
                  make_tokenizer(f"sentencepiece:{path}"), pickle.loads(pickle.dumps(trained))):
        assert other.encode(text) == expected
        assert other.vocab_size == trained.vocab_size
    assert vocab_size_of(f"sentencepiece:{path}") == 400


def test_run_directory_round_trip(trained, tmp_path):
    save_tokenizer(trained, tmp_path)
    meta = json.loads((tmp_path / "tokenizer.json").read_text())
    assert meta == {"kind": "sentencepiece", "vocab_size": 400, "file": "tokenizer.model",
                    "sha256": hashlib.sha256(trained.model_proto).hexdigest()}
    assert (tmp_path / "tokenizer.model").read_bytes() == trained.model_proto
    loaded = load_tokenizer(tmp_path)
    text = corpus_text(lines=40, seed=3) + "\u2581x\x00"
    assert isinstance(loaded, SentencePieceTokenizer)
    assert loaded.encode(text) == trained.encode(text)
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (1, 2, 3)


def test_byte_tokenizer_run_directory_and_spec(tmp_path):
    save_tokenizer(make_tokenizer("byte"), tmp_path)
    assert json.loads((tmp_path / "tokenizer.json").read_text()) == {"kind": "byte", "vocab_size": 259}
    assert not (tmp_path / "tokenizer.model").exists()
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)
    assert vocab_size_of("byte") == 259


def test_bad_specs_raise_one_line_value_errors(tmp_path):
    not_a_model = tmp_path / "notes.model"
    not_a_model.write_text("just some text\n")
    empty = tmp_path / "empty.model"
    empty.write_bytes(b"")
    cases = {"bpe": "unknown tokenizer", "sentencepiece": "unknown tokenizer",
             "sentencepiece:": "unknown tokenizer",
             f"sentencepiece:{tmp_path}/missing.model": "does not exist",
             f"sentencepiece:{not_a_model}": "not a SentencePiece model",
             f"sentencepiece:{empty}": "not a SentencePiece model"}
    for spec, message in cases.items():
        for function in (make_tokenizer, vocab_size_of):
            with pytest.raises(ValueError, match=message) as info:
                function(spec)
            assert "\n" not in str(info.value)


def test_load_tokenizer_errors(trained, tmp_path):
    with pytest.raises(ValueError, match="missing: not a meshlm run directory"):
        load_tokenizer(tmp_path)
    save_tokenizer(trained, tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a valid tokenizer file.*not the file this run was trained"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").unlink()
    with pytest.raises(ValueError, match="not a valid tokenizer file.*is missing"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizer file"):
        load_tokenizer(tmp_path)


def test_load_tokenizer_reads_only_its_own_verified_file(trained, tmp_path):
    """The metadata names a plain file inside the run directory, with its sha256: a path that
    leaves the directory, or a file with no digest, is refused (a run written by meshlm always has
    one)."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "tokenizer.model").write_bytes(trained.model_proto)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_tokenizer(trained, run_dir)
    meta = json.loads((run_dir / "tokenizer.json").read_text())
    for name in ("../elsewhere/tokenizer.model", str(outside / "tokenizer.model"), "..", ".", ""):
        (run_dir / "tokenizer.json").write_text(json.dumps({**meta, "file": name}))
        with pytest.raises(ValueError, match="not a valid tokenizer file.*file name inside"):
            load_tokenizer(run_dir)
    (run_dir / "escape.model").symlink_to(outside / "tokenizer.model")
    (run_dir / "tokenizer.json").write_text(json.dumps({**meta, "file": "escape.model"}))
    with pytest.raises(ValueError, match="file name inside"):
        load_tokenizer(run_dir)
    for kind, file in (("sentencepiece", "tokenizer.model"), ("hf", "hf_tokenizer.json")):
        (run_dir / "tokenizer.json").write_text(json.dumps({"kind": kind, "vocab_size": 400,
                                                            "file": file}))
        with pytest.raises(ValueError, match="not a valid tokenizer file.*no sha256"):
            load_tokenizer(run_dir)
    (run_dir / "tokenizer.json").write_text(json.dumps(meta))
    assert load_tokenizer(run_dir).encode("the cat") == trained.encode("the cat")


def test_long_lines_are_cut_not_dropped(tmp_path):
    line = " ".join(["alpha", "beta", "γάμμα", "😀"] * 20_000)  # one ~400 KB line, no newline
    path = tmp_path / "one_line.txt"
    path.write_text(line)
    pieces = list(training_lines([path]))
    assert "".join(pieces) == line and len(pieces) > 1
    assert all(len(p.encode("utf-8")) <= MAX_SENTENCE_BYTES for p in pieces)
    tok = SentencePieceTokenizer(train_sentencepiece([path], 300, "bpe", tmp_path / "m"))
    assert tok.decode(tok.encode(line[:1000])) == line[:1000]


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_training_on_a_sample_is_deterministic(corpus_file, tmp_path, model_type):
    models = [train_sentencepiece([corpus_file] * 20, 400, model_type, tmp_path / f"m{i}",
                                  input_sentence_size=500).read_bytes() for i in range(2)]
    assert models[0] == models[1]
    assert SentencePieceTokenizer(models[0]).vocab_size == 400


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_cli_trains_a_model(corpus_file, tmp_path):
    result = run_cli("train-tokenizer", "--input", str(corpus_file), str(corpus_file), "--vocab-size", "350",
                     "--model-type", "unigram", "--output", str(tmp_path / "out" / "tok"))
    assert result.returncode == 0, result.stderr
    tok = SentencePieceTokenizer(tmp_path / "out" / "tok.model")
    assert tok.vocab_size == 350
    assert tok.decode(tok.encode("hello \u2581 world\n")) == "hello \u2581 world\n"


def test_cli_bad_inputs_exit_2_with_one_error_line(corpus_file, tmp_path):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    good = ["--input", str(corpus_file), "--vocab-size", "400", "--model-type", "bpe"]
    out = ["--output", str(tmp_path / "m")]
    t = "train-tokenizer"
    cases = {
        "missing input": ([t, "--input", str(tmp_path / "nope.txt"), "--vocab-size", "400", *out],
                          "does not exist"),
        "vocab below 260": ([t, "--input", str(corpus_file), "--vocab-size", "100", *out], "too small"),
        "vocab too large": ([t, "--input", str(corpus_file), "--vocab-size", "50000", *out],
                            "Vocabulary size too high"),
        "unknown model type": ([t, *good[:4], "--model-type", "wordpiece", *out], "invalid choice"),
        "non-UTF-8 input": ([t, "--input", str(latin1), "--vocab-size", "400", *out],
                            f"{latin1} is not UTF-8"),
        "unwritable output": ([t, *good, "--output", str(a_file / "sub" / "m")],
                              "cannot create output directory"),
        "missing option": ([t, "--input", str(corpus_file)], "required"),
        "non-integer vocab": ([t, *good[:2], "--vocab-size", "many", *out], "invalid int value"),
        "no command": ([], "required"),
        "tiny sample": ([t, *good, *out, "--input-sentence-size", "5"], "input sentence size"),
    }
    for name, (args, message) in cases.items():
        result = run_cli(*args)
        lines = result.stderr.splitlines()
        assert result.returncode == 2, (name, result.stderr)
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, result.stderr)
        assert message in lines[0], (name, lines[0])
    assert not (tmp_path / "m.model").exists()
