"""Data at scale: parquet (pyarrow) and Hugging Face ``datasets`` sources, random access and streamed,
read from files the tests write; weighted mixtures (realised proportions, exact resume, also onto
another process count); the pre-tokenized ArrayRecord cache (same batches, reused, rebuilt when the
source or tokenizer changes). Imports no JAX."""

import json
import pickle
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.documents import open_documents
from data.mixture import Mixture, parse_mix
from data.pipeline import Shard, eval_batches, regroup_state, train_dataset
from data.sources import open_source
from data.streaming import stream_documents
from data.token_cache import cached_tokens, write_tokens
from data.tokenizer import ByteTokenizer
from tests.helpers import global_rows

TOK = ByteTokenizer()
ALPHA = [f"alpha {i} " * (i % 4 + 1) for i in range(1000)]  # sources of a thousand documents or more:
BETA = [f"beta {i}" for i in range(200)]  # grain's index_shuffle costs ~30 ms / n per index over n


def all_docs(source) -> list:
    return [source[i] for i in range(len(source))]


def texts_of(batch_rows: np.ndarray) -> str:
    return bytes(t for t in batch_rows if t < 256).decode()


@pytest.fixture(scope="module")
def tables(tmp_path_factory) -> Path:
    """Parquet files (two, several row groups each, a null), a saved DatasetDict with a validation
    split, and a folder of JSON-lines data files with train and validation splits."""
    root = tmp_path_factory.mktemp("tables")
    (root / "pq").mkdir()
    pq.write_table(pa.table({"text": ALPHA + [None], "n": list(range(len(ALPHA) + 1))}),
                   root / "pq/a.parquet", row_group_size=100)
    pq.write_table(pa.table({"text": BETA}), root / "pq/b.parquet", row_group_size=64)
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": [f"saved {i}" for i in range(50)]}),
        "validation": datasets.Dataset.from_dict({"text": [f"held {i}" for i in range(7)]}),
    }).save_to_disk(str(root / "saved"))
    (root / "jsonl").mkdir()
    for split, n in (("train", 40), ("validation", 5)):
        lines = [json.dumps({"text": f"{split} line {i}", "id": i}) for i in range(n)]
        (root / f"jsonl/{split}.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_parquet_splits_are_disjoint_cover_every_row_and_pickle_small(tables):
    spec = f"parquet:{tables}/pq/*.parquet"
    train, held = open_source(spec, "train"), open_source(spec, "eval")
    assert sorted(all_docs(train) + all_docs(held)) == sorted(ALPHA + [""] + BETA)  # null: empty
    assert 0 < len(held) < 0.2 * len(train) and all_docs(held) == all_docs(open_source(spec, "eval"))
    blob = pickle.dumps(train)  # file names and an index of the rows: no text
    assert len(blob) < 8 * len(train) + 2048 and all_docs(pickle.loads(blob)) == all_docs(train)


def test_hf_sources_read_their_splits(tables):
    saved_train = open_source(f"hf:{tables}/saved", "train", cache_dir=str(tables / "cache"))
    saved_eval = open_source(f"hf:{tables}/saved", "eval", cache_dir=str(tables / "cache"))
    assert all_docs(saved_train) == [f"saved {i}" for i in range(50)]
    assert all_docs(saved_eval) == [f"held {i}" for i in range(7)]  # the validation split
    assert len(pickle.dumps(saved_train)) < 4096
    # Data files without an evaluation split: rows held out by their index, as elsewhere.
    files = f"hf:{tables}/jsonl/train.jsonl"
    train = all_docs(open_source(files, "train", cache_dir=str(tables / "cache")))
    held = all_docs(open_source(files, "eval", cache_dir=str(tables / "cache")))
    assert sorted(train + held) == sorted(f"train line {i}" for i in range(40)) and held
    # A directory of data files: its splits come from the file names; streamed, in order.
    streamed = open_source(f"hf-stream:{tables}/jsonl", "train", cache_dir=str(tables / "cache"))
    assert list(stream_documents(streamed, 0, 1, repeat=False)) == [f"train line {i}" for i in range(40)]
    streamed_eval = open_source(f"hf-stream:{tables}/jsonl", "eval", cache_dir=str(tables / "cache"))
    assert list(stream_documents(streamed_eval, 0, 1, repeat=False)) == \
        [f"validation line {i}" for i in range(5)]


@pytest.mark.parametrize("spec, message", [
    ("parquet:{t}/pq/a.parquet:n", "column 'n' is int64, not a string column"),
    ("parquet:{t}/pq/a.parquet:body", "has no column 'body' (columns: text, n)"),
    ("parquet:{t}/none/*.parquet", "matches no files"),
    ("parquet:{t}/jsonl/train.jsonl", "is not a parquet file"),
    ("hf:{t}/saved:train:body", "has no field 'body'"),
    ("hf:{t}/saved:nosuch", "has no split 'nosuch' (splits: train, validation)"),
    ("hf-stream:{t}/saved", "a saved dataset is random access"),
    ("hf:{t}/a:b:c:d", "expected 'hf:PATH[:SPLIT[:FIELD]]'"),
])
def test_table_source_errors_are_one_line(tables, spec, message):
    with pytest.raises(ValueError) as e:
        open_source(spec.format(t=tables), "train", cache_dir=str(tables / "cache"))
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("text, message", [
    ("stdlib", "is not SPEC:WEIGHT"), ("stdlib:x", "is not a number"), ("stdlib:0", "positive"),
    ("stdlib:1,stdlib:2", "given twice"),
])
def test_mix_errors_are_one_line(text, message):
    with pytest.raises(ValueError, match=message):
        parse_mix(text)
    assert parse_mix("text:/a/*.txt:3,stdlib:1") == [("text:/a/*.txt", 0.75), ("stdlib", 0.25)]


def _documents_seen(batches) -> list[str]:
    """The documents that start in these batches, each as its text (rows hold whole short documents)."""
    docs = []
    for batch in batches:
        for inputs, segments, positions in zip(batch["inputs"], batch["segment_ids"], batch["positions"],
                                               strict=True):
            for s in np.unique(segments[segments > 0]):
                if positions[segments == s][0] == 0:
                    docs.append(texts_of(inputs[segments == s]))
    return docs


def test_mixture_proportions_over_10k_documents_are_within_2_percent_of_the_weights():
    sources = tuple([f"{name}{i}" for i in range(n)] for name, n in (("a", 5000), ("b", 3000), ("c", 1200)))
    weights = (0.5, 0.3, 0.2)  # the small source with a large weight is read for almost two epochs
    it = iter(train_dataset(Mixture(sources, weights), TOK, seq_len=128, batch_size=8, seed=1,
                            streams=2, prefetch=0, shuffle_tokens=1 << 18))
    counts: Counter = Counter()
    while sum(counts.values()) < 10_000:
        batch = next(it)
        for inputs, segments, positions in zip(batch["inputs"], batch["segment_ids"],
                                               batch["positions"], strict=True):
            starts = np.flatnonzero((positions == 0) & (segments > 0))  # a document's bos
            counts.update(chr(t) for t in inputs[starts + 1])  # its first letter: its source
    it.close()
    for name, weight in zip("abc", weights, strict=True):
        assert abs(counts[name] / sum(counts.values()) - weight) < 0.02, counts


@pytest.mark.parametrize("before, after", [(1, 1), (2, 1), (1, 2)])
def test_resuming_a_mixture_mid_epoch_equals_an_uninterrupted_run(tables, before, after):
    """A mixture of an in-memory list, a parquet source and a streamed jsonl source: the state saved
    after a few batches (through JSON, as a checkpoint stores it) resumes to the same global batches,
    also on another number of processes."""
    cache = str(tables / "cache")
    mixture = Mixture((["x" * (i % 40 + 1) for i in range(2000)],
                       open_source(f"parquet:{tables}/pq/*.parquet", "train"),
                       open_source(f"hf-stream:{tables}/jsonl", "train", cache_dir=cache)), (2, 1, 1))

    def run(count):
        return [iter(train_dataset(mixture, TOK, seq_len=32, batch_size=8 // count, seed=4,
                                   shard=Shard(p, count), streams=2, prefetch=1, shuffle_tokens=1 << 14))
                for p in range(count)]
    reference = run(1)
    expected = [global_rows(reference) for _ in range(30)]
    assert sum(texts_of(row[:32]).count("train line") for b in expected for row in b) > 60  # epochs
    first = run(before)
    for step in range(12):
        assert global_rows(first) == expected[step]
    saved = [json.loads(json.dumps(it.get_state())) for it in first]
    resumed = run(after)
    for p, it in enumerate(resumed):
        it.set_state(regroup_state(saved, Shard(p, after), streams=2))
    for step in range(12, 30):
        assert global_rows(resumed) == expected[step]
    for it in reference + first + resumed:
        it.close()


def test_a_mixture_evaluates_every_document_of_every_source_once_in_turn(tables):
    mixture = Mixture((["first"] * 3, ["second one"] * 8), (0.9, 0.1))  # weights do not apply
    batches = eval_batches(mixture, TOK, seq_len=16, batch_size=2)
    assert sum(float(b["weights"].sum()) for b in batches) == 3 * 6 + 8 * 11  # text + eos targets
    first = _documents_seen(eval_batches(mixture, TOK, seq_len=16, batch_size=2, max_batches=1))
    assert {d.split()[0] for d in first} == {"first", "second"}  # an early stop sees every source


def test_token_cache_gives_the_same_batches_is_reused_and_follows_its_source(tables, tmp_path):
    (tmp_path / "pq").mkdir()
    for name in ("a.parquet", "b.parquet"):
        (tmp_path / "pq" / name).write_bytes((tables / "pq" / name).read_bytes())
    spec = f"parquet:{tmp_path}/pq/*.parquet"
    kwargs = {"eval_fraction": 0.1, "cache_dir": str(tmp_path / "cache")}
    text = open_documents(spec, "", "train", TOK, **kwargs)
    cached = open_documents(spec, "", "train", TOK, token_cache=True, **kwargs)
    folder = cached.folder
    assert [p.name for p in (tmp_path / "cache/tokens").iterdir()] == [folder.name]  # no scratch left
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}

    def batches(docs):
        it = iter(train_dataset(docs, TOK, seq_len=32, batch_size=4, seed=2, streams=2, prefetch=0,
                                shuffle_tokens=1024))
        out = [next(it) for _ in range(12)]
        it.close()
        return out
    for got, want in zip(batches(cached), batches(text), strict=True):
        assert all(np.array_equal(got[k], want[k]) for k in want)
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(
        eval_batches(open_documents(spec, "", "eval", TOK, token_cache=True, **kwargs), TOK, seq_len=32,
                     batch_size=4),
        eval_batches(open_documents(spec, "", "eval", TOK, **kwargs), TOK, seq_len=32, batch_size=4),
        strict=True) for k in a)
    again = cached_tokens(text, TOK, spec=spec, split="train", **kwargs)
    assert again.folder == folder and {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps
    assert len(pickle.dumps(again)) < 4096
    pq.write_table(pa.table({"text": BETA[::-1]}), tmp_path / "pq/b.parquet")  # the source changes
    changed = open_documents(spec, "", "train", TOK, token_cache=True, **kwargs)
    assert changed.folder != folder and all_docs(changed)[-1].tolist() == [257, *b"beta 0", 258]


def test_a_failed_token_cache_write_leaves_no_cache(tmp_path):
    with pytest.raises(AttributeError):  # the last document is not text
        write_tokens(["fine"] * 5 + [None], TOK, tmp_path / "tokens" / "key")
    assert list((tmp_path / "tokens").iterdir()) == []

