"""Text sources: documents and their train/eval split, the local-text tfds builder (prepared once,
without TensorFlow), the generic ``tfds:`` path on a locally prepared dataset, the stdlib corpus, and
the errors for bad specs. Imports no JAX.
"""

import importlib.util
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data.sources import (
    DOC_BYTES,
    DocRef,
    FileDocuments,
    MeshlmText,
    document_spans,
    file_documents,
    open_source,
    split_documents,
    stdlib_files,
    text_files,
)

REPO = Path(__file__).resolve().parents[1]
BIG_LINES = 12_000  # "big line NNNNN ...\n" x 12k: about 5 documents of 64 KiB


def all_docs(source) -> list[str]:
    return [source[i] for i in range(len(source))]


@pytest.fixture
def text_dir(tmp_path) -> Path:
    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    (folder / "big.txt").write_text("".join(f"big line {i:05d} ünïcödé ✓\n" for i in range(BIG_LINES)))
    for i in range(12):
        (folder / "sub" / f"small{i}.txt").write_text(f"small file {i}\n" * (i + 1))
    (folder / "no_newline.txt").write_text("last line without a newline")
    return folder


def file_texts(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in folder.rglob("*.txt")}


def test_tensorflow_and_jax_are_not_needed():
    assert importlib.util.find_spec("tensorflow") is None
    code = ("import sys, data.sources, data.tokenizer; "
            "assert not {'jax', 'tensorflow'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=st.sampled_from("ab\né✓😀"), max_size=200), limit=st.integers(4, 40))
def test_document_spans_tile_the_text_at_line_ends(text, limit):
    raw = text.encode("utf-8")
    spans = document_spans(raw, limit)
    assert b"".join(raw[s:e] for s, e in spans) == raw
    for s, e in spans:
        assert 0 < e - s <= limit
        raw[s:e].decode("utf-8")  # never cut inside a character
        if e < len(raw) and b"\n" in raw[s:e]:
            assert raw[e - 1:e] == b"\n", "a piece with a line end must end at one"


def test_split_is_deterministic_disjoint_and_complete():
    docs = [DocRef("p", f"file{i}.txt", j, 0, 1) for i in range(200) for j in range(3)]
    splits = split_documents(docs, 0.1)
    assert splits == split_documents(list(docs), 0.1)
    assert set(splits["train"]).isdisjoint(splits["eval"])
    assert sorted(splits["train"] + splits["eval"], key=docs.index) == docs
    assert 0.05 < len(splits["eval"]) / len(docs) < 0.15
    two = docs[:2]
    assert [len(v) for v in split_documents(two, 0.001).values()] == [1, 1]
    assert [len(v) for v in split_documents(two, 0.0).values()] == [2, 0]
    assert [len(v) for v in split_documents(two[:1], 0.5).values()] in ([1, 0], [0, 1])


def test_text_source_splits_files_into_disjoint_complete_documents(text_dir, tmp_path):
    spec = f"text:{text_dir}/**/*.txt"
    train = open_source(spec, "train", eval_fraction=0.2, cache_dir=str(tmp_path / "cache"))
    evals = open_source(spec, "eval", eval_fraction=0.2, cache_dir=str(tmp_path / "cache"))
    train_docs, eval_docs = all_docs(train), all_docs(evals)
    assert train_docs and eval_docs and all(isinstance(d, str) for d in train_docs + eval_docs)
    assert all(len(d.encode("utf-8")) <= DOC_BYTES for d in train_docs + eval_docs)
    expected = [text_dir.joinpath(d.path).read_bytes()[d.start:d.end].decode()
                for d in file_documents(text_files(spec[len("text:"):]))]
    assert sorted(train_docs + eval_docs) == sorted(expected)
    assert set(train_docs).isdisjoint(eval_docs)
    big = sorted(d for d in train_docs + eval_docs if d.startswith("big line"))
    assert len(big) >= 4, "one large file must become several documents"
    assert "".join(big) == file_texts(text_dir)["big.txt"]
    assert all(d.endswith("\n") for d in big)


def test_text_source_is_prepared_once_and_redone_when_files_change(text_dir, tmp_path, monkeypatch):
    calls = []
    generate = MeshlmText._generate_examples

    def counting(self, docs):
        calls.append(len(docs))
        return generate(self, docs)

    monkeypatch.setattr(MeshlmText, "_generate_examples", counting)
    spec, cache = f"text:{text_dir}/**/*.txt", str(tmp_path / "cache")
    first = all_docs(open_source(spec, "train", cache_dir=cache))
    assert len(calls) == 2  # train and validation, generated once
    records = sorted((tmp_path / "cache").rglob("*.array_record-*"))
    mtimes = [p.stat().st_mtime_ns for p in records]
    assert len(records) == 2
    assert all_docs(open_source(spec, "train", cache_dir=cache)) == first
    open_source(spec, "eval", cache_dir=cache)
    assert len(calls) == 2, "the second open must reuse the prepared ArrayRecord files"
    assert [p.stat().st_mtime_ns for p in records] == mtimes

    (text_dir / "sub" / "small0.txt").write_text("changed content\n")
    changed = all_docs(open_source(spec, "train", cache_dir=cache)) + all_docs(
        open_source(spec, "eval", cache_dir=cache))
    assert len(calls) == 4 and "changed content\n" in changed
    assert len(list((tmp_path / "cache").glob("text-*"))) == 2


def test_default_cache_dir_is_under_home(text_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert len(open_source(f"text:{text_dir}/sub/*.txt", "train")) > 0
    assert list((tmp_path / "home" / ".cache" / "meshlm" / "tfds").glob("text-*/meshlm_text/1.0.0"))


def test_sources_pickle(text_dir, tmp_path):
    text = open_source(f"text:{text_dir}/**/*.txt", "train", cache_dir=str(tmp_path / "c"))
    files = FileDocuments(file_documents(text_files(f"{text_dir}/sub/*.txt")), "sub")
    for source in (text, files):
        clone = pickle.loads(pickle.dumps(source))
        assert len(clone) == len(source) and all_docs(clone) == all_docs(source)


def test_text_source_errors(text_dir, tmp_path):
    cache = str(tmp_path / "cache")
    with pytest.raises(ValueError, match="matches no files"):
        open_source(f"text:{tmp_path}/nothing/*.txt", "train", cache_dir=cache)
    bad = text_dir / "latin1.txt"
    bad.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=f"{bad} is not UTF-8"):
        open_source(f"text:{text_dir}/*.txt", "train", cache_dir=cache)


@pytest.fixture
def prepared(text_dir, tmp_path) -> tuple[str, MeshlmText]:
    """A dataset registered with tfds ("meshlm_text"), prepared into a fresh data_dir."""
    data_dir = tmp_path / "tfds_data"
    builder = MeshlmText(files=text_files(f"{text_dir}/**/*.txt"), eval_fraction=0.3,
                         data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
    return str(data_dir), builder


def test_tfds_spec_reads_a_prepared_dataset(prepared):
    data_dir, builder = prepared
    expected = {s: sorted(ex["text"].decode() for ex in builder.as_data_source(split=s))
                for s in ("train", "validation")}
    for spec in ("tfds:meshlm_text", "tfds:meshlm_text::text"):
        assert sorted(all_docs(open_source(spec, "train", data_dir=data_dir))) == expected["train"]
        assert sorted(all_docs(open_source(spec, "eval", data_dir=data_dir))) == expected["validation"]
    for split in ("train", "eval"):  # an explicit split is read for both
        source = open_source("tfds:meshlm_text:validation:text", split, data_dir=data_dir)
        assert sorted(all_docs(source)) == expected["validation"]
    assert pickle.loads(pickle.dumps(source))[0] == source[0]


def test_tfds_without_eval_split_holds_out_every_kth_record(text_dir, tmp_path):
    data_dir = tmp_path / "only_train"
    MeshlmText(files=text_files(f"{text_dir}/**/*.txt"), eval_fraction=0.0, data_dir=data_dir,
               file_format="array_record").download_and_prepare()
    train = open_source("tfds:meshlm_text", "train", eval_fraction=0.25, data_dir=str(data_dir))
    evals = open_source("tfds:meshlm_text", "eval", eval_fraction=0.25, data_dir=str(data_dir))
    full = open_source("tfds:meshlm_text:train", "train", data_dir=str(data_dir))
    assert len(train) + len(evals) == len(full) and len(evals) == (len(full) + 3) // 4
    assert sorted(all_docs(train) + all_docs(evals)) == sorted(all_docs(full))
    assert all_docs(evals) == [full[i] for i in range(0, len(full), 4)]
    assert train[-1] == train[len(train) - 1]
    no_eval = {s: open_source("tfds:meshlm_text", s, eval_fraction=0.0, data_dir=str(data_dir))
               for s in ("train", "eval")}
    assert len(no_eval["eval"]) == 0 and all_docs(no_eval["train"]) == all_docs(full)
    with pytest.raises(IndexError):
        train[len(train)]


def test_tfds_errors(prepared, tmp_path):
    data_dir, _ = prepared
    cases = {
        "tfds:no_such_dataset_xyz": "unknown tfds dataset 'no_such_dataset_xyz'",
        "tfds:lm1b": "is not prepared",  # a catalog dataset, never downloaded here
        "tfds:meshlm_text:train:title": "has no field 'title'",
        "tfds:meshlm_text:no_such_split": "cannot read split 'no_such_split'",
        "tfds:meshlm_text:train:text:extra": "bad tfds spec",
        "tfds:": "unknown data source",
    }
    for spec, message in cases.items():
        with pytest.raises(ValueError, match=message) as info:
            open_source(spec, "train", data_dir=data_dir if "lm1b" not in spec else str(tmp_path / "e"))
        assert "\n" not in str(info.value), spec


def test_stdlib_source():
    train, evals = open_source("stdlib", "train"), open_source("stdlib", "eval")
    assert len(train) > 1000 and 0.02 < len(evals) / (len(train) + len(evals)) < 0.1
    assert set(train.docs).isdisjoint(evals.docs)
    everything = file_documents(stdlib_files(), skip_non_utf8=True)
    assert sorted(train.docs + evals.docs, key=lambda d: (d.path, d.start)) == everything
    assert all(d.end - d.start <= DOC_BYTES for d in everything)
    texts = [train[i] for i in range(0, len(train), 97)]
    assert all(isinstance(t, str) and t for t in texts)
    assert any("def " in t for t in texts)
    path = str(Path(os.__file__))
    assert [d.start for d in everything if d.path == path][0] == 0


def test_bad_specs_and_arguments():
    for spec in ("stdlib2", "text:", "tfds", "file:/tmp/x", ""):
        with pytest.raises(ValueError, match="unknown data source"):
            open_source(spec, "train")
    with pytest.raises(ValueError, match="split must be"):
        open_source("stdlib", "test")
    with pytest.raises(ValueError, match="eval_fraction"):
        open_source("stdlib", "train", eval_fraction=1.0)
