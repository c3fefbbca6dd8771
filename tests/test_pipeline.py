"""The grain pipeline: packing layout, packed attention == per-document attention, one-pass eval,
per-process shards, exact resume from the iterator state, and data errors at the CLI."""

import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cli import train as train_cli
from data.pipeline import Shard, eval_batches, regroup_state, train_dataset
from data.tokenizer import ByteTokenizer
from model.transformer import Transformer
from tests import reference
from tests.helpers import SMALL, global_rows
from train.step import eval_step

TOK = ByteTokenizer()
DOCS = [f"doc {i}: " + "abcdefghij"[: i % 10] * (i % 5 + 1) for i in range(40)]


def _rows(batches):
    for batch in batches:
        for r in range(len(batch["inputs"])):
            yield {k: v[r] for k, v in batch.items()}


def test_packed_rows_carry_segments_positions_and_shifted_targets():
    it = iter(train_dataset(DOCS, TOK, seq_len=16, batch_size=4, seed=0, streams=1, prefetch=0,
                            shuffle_tokens=2048))
    rows = list(_rows(next(it) for _ in range(5)))
    saw_packed_row = False
    for row in rows:
        seg, pos, w = row["segment_ids"], row["positions"], row["weights"]
        real = seg > 0
        assert np.array_equal(w, real.astype(np.float32))  # padding never counts in the loss
        assert np.all(row["inputs"][~real] == 0) and np.all(pos[~real] == 0)
        saw_packed_row |= len(set(seg[real].tolist())) > 1
        for t in range(16):
            if real[t]:
                first = t == 0 or seg[t - 1] != seg[t]
                assert pos[t] == (0 if first else pos[t - 1] + 1)
            if t + 1 < 16 and real[t + 1] and seg[t + 1] == seg[t]:
                assert row["targets"][t] == row["inputs"][t + 1]  # next token of the same document
    assert saw_packed_row


def test_packed_attention_and_loss_equal_each_document_alone():
    model = Transformer(SMALL, nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    docs = [np.array([TOK.bos_id % 64, 5, 9, 3, 7], np.int32), np.array([1, 2, 3], np.int32),
            np.array([4, 4, 8, 15, 16, 23, 42 % 64], np.int32)]
    inputs = np.zeros((1, 16), np.int32)
    segments = np.zeros((1, 16), np.int32)
    positions = np.zeros((1, 16), np.int32)
    start = 0
    for s, doc in enumerate(docs, 1):
        inputs[0, start: start + len(doc)] = doc
        segments[0, start: start + len(doc)] = s
        positions[0, start: start + len(doc)] = np.arange(len(doc))
        start += len(doc)
    packed = model(jnp.asarray(inputs), jnp.asarray(positions), jnp.asarray(segments))
    start = 0
    targets = np.roll(inputs, -1, axis=1)
    weights = np.zeros((1, 16), np.float32)
    expected_loss = 0.0
    for doc in docs:
        alone = model(jnp.asarray(doc[None]))
        assert reference.relative_error(packed[0, start: start + len(doc)], alone[0]) < 1e-4
        weights[0, start: start + len(doc) - 1] = 1.0  # last token of a doc has no target in it
        logp = np.asarray(alone[0]) - np.log(np.exp(np.asarray(alone[0], np.float64)).sum(-1))[:, None]
        expected_loss -= sum(logp[t, doc[t + 1]] for t in range(len(doc) - 1))
        start += len(doc)
    batch = {"inputs": inputs, "targets": targets, "weights": weights, "segment_ids": segments,
             "positions": positions}
    sums = eval_step(params, {k: jnp.asarray(v) for k, v in batch.items()}, graphdef=graphdef)
    loss_sum, weight_sum = sums["loss_sum"], sums["weight_sum"]
    assert float(weight_sum) == sum(len(d) - 1 for d in docs)
    assert abs(float(loss_sum) - expected_loss) <= 1e-4 * abs(expected_loss)


def test_eval_pass_counts_every_token_once_and_pads_the_last_batch():
    num_rows = len(eval_batches(DOCS, TOK, seq_len=16, batch_size=1))
    batch_size = next(b for b in (3, 4, 5, 7) if num_rows % b)
    batches = eval_batches(DOCS, TOK, seq_len=16, batch_size=batch_size)
    assert len(batches) == -(-num_rows // batch_size)
    assert sum(float(b["weights"].sum()) for b in batches) == sum(len(d.encode()) + 1 for d in DOCS)
    last = batches[-1]
    assert last["weights"].shape == (batch_size, 16) and last["weights"][-1].sum() == 0  # padding
    # In order, unshuffled: the first row starts with the first document.
    assert batches[0]["inputs"][0][0] == TOK.bos_id and bytes(
        batches[0]["targets"][0][:5].tolist()) == DOCS[0].encode()[:5]
    assert len(eval_batches(DOCS, TOK, seq_len=16, batch_size=batch_size, max_batches=2)) == 2


def test_process_shards_are_disjoint_and_cover_the_documents():
    seen = []
    for index in range(3):
        batches = eval_batches(DOCS, TOK, seq_len=64, batch_size=2, shard=Shard(index, 3))
        seen += [int(w.sum()) for b in batches for w in b["weights"] if w.sum()]
    assert sum(seen) == sum(len(d.encode()) + 1 for d in DOCS)


@pytest.mark.parametrize("shard", [Shard(0, 1), Shard(1, 2)])
def test_resume_from_iterator_state_equals_uninterrupted_stream(shard):
    def stream():
        return iter(train_dataset(DOCS, TOK, seq_len=16, batch_size=4, seed=3, shard=shard,
                                  streams=2, prefetch=2, shuffle_tokens=2048))
    straight = stream()
    expected = [next(straight) for _ in range(30)]  # several epochs of this shard
    first = stream()
    for _ in range(11):
        next(first)
    state = first.get_state()
    first.close()
    resumed = stream()
    resumed.set_state(state)
    for want in expected[11:]:
        got = next(resumed)
        assert all(np.array_equal(got[k], want[k]) for k in want)
    straight.close()
    resumed.close()


@pytest.mark.parametrize("before, after", [(1, 2), (2, 1), (2, 4), (4, 4)])
def test_global_batches_are_the_same_for_any_process_count_and_resume_across_counts(before, after):
    def streams(count):
        return [iter(train_dataset(DOCS, TOK, seq_len=16, batch_size=8 // count, seed=5,
                                   shard=Shard(p, count), streams=4, prefetch=1,
                                   shuffle_tokens=2048))
                for p in range(count)]
    reference_run = streams(1)
    expected = [global_rows(reference_run) for _ in range(12)]
    first = streams(before)
    for step in range(5):
        assert global_rows(first) == expected[step]
    saved = [it.get_state() for it in first]
    resumed = streams(after)
    for p, it in enumerate(resumed):
        it.set_state(regroup_state(saved, Shard(p, after), streams=4))
    for step in range(5, 12):
        assert global_rows(resumed) == expected[step]
    for it in reference_run + first + resumed:
        it.close()


def test_epochs_are_reshuffled():
    it = iter(train_dataset(DOCS, TOK, seq_len=64, batch_size=1, seed=0, streams=1, prefetch=0,
                            shuffle_tokens=2048))
    order = []  # document numbers in the order they are packed
    while len(order) < 2 * len(DOCS):
        row = next(it)
        for s in np.unique(row["segment_ids"][0][row["segment_ids"][0] > 0]):
            text = bytes(t for t in row["inputs"][0][row["segment_ids"][0] == s] if t < 256)
            order.append(int(text.decode().split(":")[0].split()[1]))
    first, second = order[: len(DOCS)], order[len(DOCS): 2 * len(DOCS)]
    assert first != sorted(first) and first != second


ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("override, message", [
    ("data.source=text:/nonexistent/*.txt", "data"),
    ("data.tokenizer=sentencepiece:/nonexistent/x.model", "data.tokenizer"),
    ("data.source=bogus", "data.source"),
    ("data.eval_fraction=1.5", "data.eval_fraction"),
    ("data.mix=stdlib", "data.mix"),
    ("data.mix=stdlib:1,bogus:2", "data.mix"),
    ("data.mix=parquet:/nonexistent/*.parquet:1,stdlib:1", "data"),
])
def test_data_errors_exit_2(eight_devices, tmp_path, capsys, override, message):
    code = train_cli.main([str(ROOT / "configs/tiny.yaml"), override, f"run.dir={tmp_path / 'run'}"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {message}"), lines


def test_a_batch_mixes_many_documents():
    """Chunks of one long document are spread out, not served as consecutive rows of a batch."""
    docs = [f"<{i:02d}>" * 200 for i in range(20)]  # each document is 50 chunks of 16 tokens
    it = iter(train_dataset(docs, TOK, seq_len=16, batch_size=8, seed=0, streams=1, prefetch=0,
                            shuffle_tokens=16 * 400))
    for _ in range(3):
        batch = next(it)
        owners = {re.findall(r"<(\d\d)>", bytes(t for t in row if t < 256).decode())[0]
                  for row in batch["inputs"]}
        assert len(owners) >= 4, owners
