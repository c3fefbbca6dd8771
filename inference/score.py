"""Scoring through the model as served (the inference graph: an MoE model with enough expert capacity
that no token is dropped, as in generation). Every evaluation tool uses it, so they agree:

- ``Scorer``: the log-probability of every target token of right-padded [B, T] token rows and
  whether it is the argmax, in one jitted, sharded forward pass (compiled once per (B, T) bucket).
  A row of n tokens gives n - 1 (input, target) pairs; rows hold at most ``window + 1`` tokens.
  The harness and inspection score with it.
- ``BatchLoss``: the sums of token losses and weights of packed [B, T] batches (the rows of
  ``data.pipeline``, documents kept apart by their segment ids). ``eval perplexity`` runs it.

Training's own evaluation (``eval_loss``) runs the training graph instead, where a capacity-path MoE
model may drop tokens.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from data.batches import to_global
from inference.generate import bucket, inference_graphdef
from model.config import ModelConfig
from model.loss import token_nll
from sharding.constrain import activation_sharding, under_activation_sharding
from sharding.rules import Rules, logical_sharding
from train.step import eval_step


def token_scores(params: nnx.State, inputs_bt: jax.Array, targets_bt: jax.Array, lengths_b: jax.Array,
                 *, graphdef: nnx.GraphDef) -> tuple[jax.Array, jax.Array]:
    """(log p(target) [B, T] in float32, target == argmax [B, T]); positions at or past a row's
    length are padding (kept out of the experts; their scores are meaningless)."""
    model = nnx.merge(graphdef, params)
    _, t = inputs_bt.shape
    routing_mask_bt = jnp.arange(t, dtype=jnp.int32)[None, :] < lengths_b[:, None]
    logits_btv = model(inputs_bt, routing_mask_bt=routing_mask_bt)
    greedy_bt = jnp.argmax(logits_btv, axis=-1) == targets_bt
    return -token_nll(logits_btv, targets_bt), greedy_bt


class Scorer:
    """Per-token scores of token rows for one model and mesh; rows are batched ``batch_size`` at a
    time (the last batch padded with empty rows, so each length bucket compiles once)."""

    def __init__(self, cfg: ModelConfig, params: nnx.State, mesh: Mesh, rules: Rules, window: int,
                 batch_size: int):
        if window < 1 or batch_size < 1:
            raise ValueError(f"window and batch size must be >= 1, got {window} and {batch_size}")
        self.cfg, self.graphdef = inference_graphdef(cfg)
        self.params, self.mesh, self.rules = params, mesh, rules
        self.window, self.batch_size = window, batch_size
        self._params_sh = jax.tree.map(lambda x: x.sharding, params)

    def _sharding(self, names: Sequence[str | None], shape: Sequence[int]) -> NamedSharding:
        return logical_sharding(names, shape, self.mesh, self.rules)

    @functools.cache  # noqa: B019 (one Scorer per loaded model; shapes are few)
    def _step(self, batch: int, length: int) -> Callable:
        rows_bt = self._sharding(("batch", "length"), (batch, length))
        rows_b = self._sharding(("batch",), (batch,))
        return jax.jit(functools.partial(token_scores, graphdef=self.graphdef),
                       in_shardings=(self._params_sh, rows_bt, rows_bt, rows_b),
                       out_shardings=(rows_bt, rows_bt))

    def score(self, rows: Sequence[Sequence[int]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """For each row of n tokens (2 <= n <= window + 1): (log-probs [n - 1], greedy flags [n - 1])
        of tokens 1..n-1, each given the tokens before it."""
        for row in rows:
            if not 2 <= len(row) <= self.window + 1:
                raise ValueError(f"a scored row holds 2..{self.window + 1} tokens, got {len(row)}")
        out: list[tuple[np.ndarray, np.ndarray]] = []
        with activation_sharding(self.mesh, self.rules):
            for start in range(0, len(rows), self.batch_size):
                chunk = rows[start:start + self.batch_size]
                lengths = np.zeros(self.batch_size, np.int32)
                lengths[:len(chunk)] = [len(r) - 1 for r in chunk]
                length = bucket(int(lengths.max()), self.window)
                inputs_bt = np.zeros((self.batch_size, length), np.int32)
                targets_bt = np.zeros((self.batch_size, length), np.int32)
                for i, row in enumerate(chunk):
                    inputs_bt[i, :len(row) - 1] = row[:-1]
                    targets_bt[i, :len(row) - 1] = row[1:]
                logprob_bt, greedy_bt = jax.device_get(
                    self._step(self.batch_size, length)(self.params, inputs_bt, targets_bt, lengths))
                out.extend((logprob_bt[i, :n], greedy_bt[i, :n]) for i, n in enumerate(lengths[:len(chunk)]))
        return out


class BatchLoss:
    """Loss sums of packed batches of ``batch_size`` rows of ``length`` tokens (``inputs``,
    ``targets``, ``weights``, ``positions``, ``segment_ids``): training's ``eval_step`` over the
    inference graph; one jitted, sharded step (rows over the data axes), compiled once."""

    def __init__(self, cfg: ModelConfig, params: nnx.State, mesh: Mesh, rules: Rules, batch_size: int,
                 length: int):
        _, graphdef = inference_graphdef(cfg)
        self.params, self.batch_size = params, batch_size
        self.batch_sharding = logical_sharding(("batch", "length"), (batch_size, length), mesh, rules)
        self._step = jax.jit(
            under_activation_sharding(functools.partial(eval_step, graphdef=graphdef), mesh, rules),
            in_shardings=(jax.tree.map(lambda x: x.sharding, params), self.batch_sharding),
            out_shardings=NamedSharding(mesh, PartitionSpec()))

    def __call__(self, local: dict[str, np.ndarray]) -> tuple[float, float]:
        """(loss sum, weight sum) of a batch of which this process holds ``local`` (its rows)."""
        out = jax.device_get(self._step(self.params, to_global(local, self.batch_sharding,
                                                               self.batch_size)))
        return float(out["loss_sum"]), float(out["weight_sum"])
