"""Batches of next-token windows as global ``jax.Array``s sharded over the batch axes.

Training batch ``step`` is a pure function of (seed, step): resuming at any step reproduces exactly
the batches an uninterrupted run would see. Each process materialises only its own rows.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding

Batch = dict[str, jax.Array]


def _rows_to_batch(rows_bt1: np.ndarray) -> dict[str, np.ndarray]:
    return {
        "inputs": rows_bt1[:, :-1].astype(np.int32),
        "targets": rows_bt1[:, 1:].astype(np.int32),
        "weights": np.ones(rows_bt1[:, 1:].shape, np.float32),
    }


def _process_rows(batch_size: int) -> slice:
    per = batch_size // jax.process_count()
    return slice(jax.process_index() * per, (jax.process_index() + 1) * per)


def to_global(local: dict[str, np.ndarray], sharding: NamedSharding, batch_size: int) -> Batch:
    """This process's rows -> one global array per field, laid out by ``sharding``."""
    return {k: jax.make_array_from_process_local_data(sharding, v, (batch_size,) + v.shape[1:])
            for k, v in local.items()}


class TrainWindows:
    """Random windows of ``seq_len + 1`` tokens; batch ``step`` depends only on (seed, step)."""

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int):
        if len(tokens) < seq_len + 2:
            raise ValueError(f"data: {len(tokens)} training tokens are too few for seq_len={seq_len}")
        self.tokens, self.batch_size, self.seq_len, self.seed = tokens, batch_size, seq_len, seed

    def local_batch(self, step: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, len(self.tokens) - self.seq_len - 1, size=self.batch_size)
        starts = starts[_process_rows(self.batch_size)]
        rows = np.stack([self.tokens[s: s + self.seq_len + 1] for s in starts])
        return _rows_to_batch(rows)


def eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int,
                 num_batches: int = 0) -> list[dict[str, np.ndarray]]:
    """One pass over consecutive non-overlapping windows of the held-out tokens, in order.

    ``num_batches`` > 0 keeps only the first batches. The last batch is padded with rows of weight
    0, so every real token counts exactly once and padding never does.
    """
    if len(tokens) < seq_len + 1:
        raise ValueError(f"data: {len(tokens)} evaluation tokens are too few for seq_len={seq_len}")
    n_windows = (len(tokens) - 1) // seq_len
    if num_batches:
        n_windows = min(n_windows, num_batches * batch_size)
    out = []
    for first in range(0, n_windows, batch_size):
        count = min(batch_size, n_windows - first)
        rows = np.zeros((batch_size, seq_len + 1), np.int32)
        for r in range(count):
            start = (first + r) * seq_len
            rows[r] = tokens[start: start + seq_len + 1]
        batch = _rows_to_batch(rows)
        batch["weights"][count:] = 0.0
        out.append({k: v[_process_rows(batch_size)] for k, v in batch.items()})
    return out
