"""The grain input pipeline: seeded shuffle, tokenization, packing of documents into fixed-length rows
(with segment ids and positions), per-process sharding, background prefetch, and the evaluation
stream. Iterator state is a small dict that resumes exactly (saved in every checkpoint).

Each document becomes ``[bos] + tokens + [eos]`` (either omitted if the tokenizer has none), shifted
into (inputs, targets) pairs, cut into chunks of at most ``seq_len`` pairs, and the chunks are
first-fit packed into rows. A target never comes from another document; padding has weight 0, every
other target of a text weight 1. A conversation (`MaskedIds`, from a ``chat:`` source) is one chunk,
cut to one row (`data.chat_data.training_row`), its targets weighted by its assistant mask.
Documents come from a random-access source (text, token ids from a token cache, conversations), a
streamed source or a weighted `Mixture` of them.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from data.chat_data import ChatDocuments, MaskedIds, training_row
from data.hf_sources import StreamedDocuments
from data.mixture import Mixture
from data.streaming import stream_documents
from data.tokenizer import Tokenizer

Row = dict[str, np.ndarray]
# What the pipeline reads: documents as text or as token ids (`document_ids`, from a token cache),
# conversations (ids and assistant mask), indexed or streamed, or a weighted mixture of such sources.
Documents = Sequence[str] | Sequence[np.ndarray] | Sequence[MaskedIds] | StreamedDocuments | Mixture
# Documents are read on the consuming thread: reading is cheap next to tokenizing, and grain's
# default read-ahead pool costs more per element (it polls its whole buffer) than it saves.
READ_OPTIONS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


@dataclasses.dataclass(frozen=True)
class Shard:
    """Which slice of the data this process reads: documents ``index::count``."""

    index: int = 0
    count: int = 1


def document_ids(tokenizer: Tokenizer, text: str) -> np.ndarray:
    """``[bos] + tokens + [eos]`` of one document (either omitted if the tokenizer has none), int32."""
    ids = ([tokenizer.bos_id] if tokenizer.bos_id >= 0 else []) + tokenizer.encode(text)
    return np.asarray(ids + ([tokenizer.eos_id] if tokenizer.eos_id >= 0 else []), np.int32)


class _Tokenize(grain.transforms.Map):
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def map(self, document: str | np.ndarray | MaskedIds) -> np.ndarray | MaskedIds:
        if isinstance(document, (np.ndarray, MaskedIds)):  # a token cache's record; a conversation
            return document
        return document_ids(self.tokenizer, document)


class _ChunkPairs(grain.experimental.FlatMapTransform):
    """One document's ids -> chunks of (inputs, targets, target weights) of at most ``seq_len``
    positions; a conversation -> its one row, or nothing (`training_row`)."""

    def __init__(self, seq_len: int, max_document_tokens: int):
        self.seq_len = seq_len
        self.max_fan_out = -(-max_document_tokens // seq_len)

    def flat_map(self, ids: np.ndarray | MaskedIds) -> Sequence[Row]:
        if isinstance(ids, MaskedIds):
            row = training_row(ids, self.seq_len)
            return [] if row is None else [dict(zip(("inputs", "targets", "weights"), row, strict=True))]
        inputs, targets = ids[:-1], ids[1:]
        return [{"inputs": inputs[i: i + self.seq_len], "targets": targets[i: i + self.seq_len],
                 "weights": np.ones(len(targets[i: i + self.seq_len]), np.float32)}
                for i in range(0, len(inputs), self.seq_len)]


def _finish_row(row: Row) -> Row:
    """Packed row -> model batch fields; the chunks' target weights (padding: 0)."""
    return {
        "inputs": row["inputs"].astype(np.int32),
        "targets": row["targets"].astype(np.int32),
        "segment_ids": row["inputs_segment_ids"].astype(np.int32),
        "positions": row["inputs_positions"].astype(np.int32),
        "weights": row["weights"].astype(np.float32),
    }


def _packed_rows(docs: grain.IterDataset, tokenizer: Tokenizer, seq_len: int, bins: int,
                 seed: int, shuffle_bins: bool, shuffle_window: int = 0) -> grain.IterDataset:
    docs = docs.map(_Tokenize(tokenizer))
    chunks = grain.experimental.FlatMapIterDataset(docs, _ChunkPairs(seq_len, 1 << 24))
    if shuffle_window > 1:  # consecutive chunks of one document must not fill a batch
        chunks = grain.experimental.WindowShuffleIterDataset(chunks, window_size=shuffle_window,
                                                             seed=seed)
    packed = grain.experimental.FirstFitPackIterDataset(
        chunks, length_struct={"inputs": seq_len, "targets": seq_len, "weights": seq_len},
        num_packing_bins=bins, seed=seed, shuffle_bins=shuffle_bins)
    return packed.map(_finish_row)


def _stream_seed(seed: int, stream: int) -> int:
    return (seed * 1_000_003 + stream * 7919) % 2**32


def _stream_documents(source: Documents, stream: int, streams: int, seed: int) -> grain.IterDataset:
    """The endless documents of stream ``stream``: its share (``stream::streams``) of each epoch,
    shuffled anew every epoch (a streamed source: in order); a mixture draws from each source's
    share in proportion to its weight (grain's deterministic interleave; each source repeats on its
    own)."""
    if isinstance(source, Mixture):
        parts = [_stream_documents(part, stream, streams, (seed + 104_729 * (i + 1)) % 2**32)
                 for i, part in enumerate(source.sources)]
        return grain.IterDataset.mix(parts, list(source.weights))
    if isinstance(source, StreamedDocuments):
        return stream_documents(source, stream, streams, repeat=True)
    docs = grain.MapDataset.source(source)
    if len(docs) == 0:
        raise ValueError("data: the training split has no documents")
    if len(docs) < streams:  # every stream needs a document: repeat the few there are
        docs = docs.repeat(-(-streams // len(docs)))
    return docs[stream::streams].shuffle(seed=seed).repeat().to_iter_dataset(READ_OPTIONS)


def _has_multi_chunk_documents(source: Documents) -> bool:
    """Whether a document of ``source`` may give several chunks (a conversation gives one at most)."""
    if isinstance(source, Mixture):
        return any(_has_multi_chunk_documents(part) for part in source.sources)
    return not isinstance(source, ChatDocuments)


def train_dataset(source: Documents, tokenizer: Tokenizer, *, seq_len: int, batch_size: int,
                  seed: int, shard: Shard = Shard(), streams: int = 8, prefetch: int = 2,
                  shuffle_tokens: int = 1 << 20) -> grain.IterDataset:
    """Endless packed training batches of this process's ``batch_size`` rows.

    The data is split into ``streams`` independent streams (documents ``s::streams``), each shuffling
    its documents with a new permutation every epoch and its ``seq_len`` chunks again within windows, so
    a batch mixes many documents (conversations, one chunk each: no window). Every global batch takes
    the same number of rows from each stream, and process ``shard.index`` runs streams ``s % shard.count
    == shard.index``: the global batches are the same (up to row order) for any process count that
    divides ``streams``. ``prefetch`` > 0 prepares that many batches in a background thread.
    """
    mine = [s for s in range(streams) if s % shard.count == shard.index]
    if streams % shard.count or batch_size % len(mine):
        raise ValueError(f"data: {streams} streams cannot be split evenly over {shard.count} "
                         f"processes of {batch_size} rows each")
    rows_per_stream = batch_size // len(mine)
    # The window shuffle only separates the consecutive chunks of one document. Conversations are one
    # chunk each and already in a new order every epoch: without it, since filling a window of
    # thousands of chunks from a stream of a few conversations reads hundreds of epochs, and grain's
    # per-epoch shuffle of a handful of documents costs milliseconds per document read.
    window = (max(shuffle_tokens // streams // seq_len, rows_per_stream)
              if _has_multi_chunk_documents(source) else 0)
    components = {}
    for s in mine:
        stream_seed = _stream_seed(seed, s)
        components[f"stream{s}"] = _packed_rows(
            _stream_documents(source, s, streams, stream_seed), tokenizer, seq_len,
            max(rows_per_stream, 8), stream_seed, shuffle_bins=True, shuffle_window=window)
    batches = grain.IterDataset.mix(components).batch(batch_size, drop_remainder=True)
    if prefetch:
        batches = grain.experimental.ThreadPrefetchIterDataset(batches, prefetch_buffer_size=prefetch)
    return batches


def _eval_documents(source: Documents, shard: Shard) -> grain.IterDataset:
    """This process's share of the evaluation documents, in order; a mixture's sources in turn."""
    if isinstance(source, Mixture):
        parts = [_eval_documents(part, shard) for part in source.sources]
        return grain.experimental.InterleaveIterDataset(parts, cycle_length=len(parts))
    if isinstance(source, StreamedDocuments):
        return stream_documents(source, shard.index, shard.count, repeat=False)
    return grain.MapDataset.source(source)[shard.index::shard.count].to_iter_dataset(READ_OPTIONS)


def eval_batches(source: Documents, tokenizer: Tokenizer, *, seq_len: int, batch_size: int,
                 max_batches: int = 0, shard: Shard = Shard()) -> list[Row]:
    """One ordered pass over this process's evaluation documents, packed into batches.

    The last batch is padded with rows of weight 0; ``max_batches`` > 0 stops early. Every real
    target token is counted exactly once (a mixture's sources taken in turn, one document of each, so
    an early stop still sees every source).
    """
    docs = _eval_documents(source, shard)
    rows = iter(_packed_rows(docs, tokenizer, seq_len, max(batch_size, 8), 0, shuffle_bins=False))
    out: list[Row] = []
    pending: list[Row] = []
    with contextlib.closing(rows):  # a streamed source's readers end here, also on an early stop
        for row in rows:
            pending.append(row)
            if len(pending) == batch_size:
                out.append(_stack(pending))
                pending = []
                if max_batches and len(out) == max_batches:
                    return out
    if pending:
        out.append(_stack(pending + [_empty_row(seq_len)] * (batch_size - len(pending))))
    return out


def _stack(rows: list[Row]) -> Row:
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def _empty_row(seq_len: int) -> Row:
    zeros = np.zeros((seq_len,), np.int32)
    return {"inputs": zeros, "targets": zeros, "segment_ids": zeros, "positions": zeros,
            "weights": np.zeros((seq_len,), np.float32)}


def empty_batch(batch_size: int, seq_len: int) -> Row:
    """A batch that contributes nothing (every weight 0): pads processes with fewer eval batches."""
    return _stack([_empty_row(seq_len)] * batch_size)


def regroup_state(saved: list[dict[str, Any]], shard: Shard, streams: int) -> dict[str, Any]:
    """This process's training-iterator state from the states every process saved (in process
    order), also when the number of processes changed: each stream's position is kept, and the
    round-robin position restarts at a batch boundary."""
    if len(saved) == shard.count:
        return saved[shard.index]
    positions = {}
    for state in saved:
        positions.update(state["parents"])
    expected = {f"stream{s}" for s in range(streams)}
    if set(positions) != expected:
        raise ValueError(f"the checkpoint's input position has {len(positions)} streams, but "
                         f"data.streams={streams}: resume with the streams it was written with")
    rows_seen = saved[0]["index"] * len(saved)  # rows consumed by all processes together
    mine = [f"stream{s}" for s in range(streams) if s % shard.count == shard.index]
    return {"parents": {k: positions[k] for k in mine}, "index": rows_seen // shard.count,
            "stop": False}
