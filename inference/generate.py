"""Batched autoregressive generation with a preallocated key/value cache.

Two jitted steps, each compiled once per shape with explicit shardings (rows over the data axes, kv
heads over ``tensor``, experts over ``expert``, as in training) and the cache donated:
- ``prefill``: prompts right-padded to a bucket length run in one pass; their keys and values fill
  the cache (slots [0, T), or each row's last ``sliding_window`` positions in a model whose layers
  are all local: a rolling cache); each row's next token is sampled from the logits at its own
  last position.
- ``decode``: every row feeds its newest token at its own position (rows of different lengths
  advance together) and samples the next one.

The host loop dispatches step i + 1 before it reads token i, so the device never waits on Python.
Rows stop at a stop id (the tokenizer's ``stop_ids``: EOS, end of turn; checked on the host) or
after ``max_new_tokens``. The window is the model's own context (``model.max_seq_len``; callers pass
it), never the training rows' length. The cache holds ``min(window, prompt + new tokens)`` slots
(rounded up to a power of two); when a row would pass the model's window, every row is re-prefilled
with the last half of its context (a context shift) and generation goes on. A prompt longer than
the window keeps its last ``window`` tokens.

An MoE model generates with enough expert capacity that no token is ever dropped (inference routes
every token to its k experts, as the dropless path does), so a cached step equals the full forward.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Collection, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from inference.sampling import SamplingConfig, sample
from model.attention import CACHE_AXES
from model.config import ModelConfig
from model.transformer import Cache, Transformer, cache_shapes
from sharding.constrain import activation_sharding
from sharding.rules import Rules, logical_sharding
from train.loop import RunEnd

MIN_BUCKET = 8


def inference_config(cfg: ModelConfig) -> ModelConfig:
    """The model config for generation: the capacity path sized so that no assignment is dropped
    (an expert can receive at most one assignment per token of a row)."""
    if cfg.num_experts and cfg.moe_impl == "capacity":
        return dataclasses.replace(cfg, capacity_factor=cfg.num_experts / cfg.experts_per_token)
    return cfg


def inference_graphdef(cfg: ModelConfig,
                       sowing: tuple[type[nnx.Module], ...] = ()) -> tuple[ModelConfig, nnx.GraphDef]:
    """(inference config, the model's graphdef under it); the params of ``cfg`` fit it unchanged.
    ``sowing``: module types (``Attention``, ``MoE``) that sow their intermediates, for
    ``nnx.capture``."""
    cfg = inference_config(cfg)
    model = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
    if sowing:
        model.set_attributes(*sowing, sow_intermediates=True, raise_if_not_found=False)
    return cfg, nnx.split(model)[0]


def bucket(n: int, limit: int) -> int:
    """The power of two >= n (at least MIN_BUCKET), capped at ``limit``."""
    return min(limit, max(MIN_BUCKET, 1 << max(n - 1, 0).bit_length()))


@dataclasses.dataclass
class Generation:
    """New tokens per row (stop id excluded), whether each row stopped at the stop id, and (when
    asked for) the float32 logits [n_new, V] each new token was drawn from."""

    tokens: list[list[int]]
    stopped: list[bool]
    logits: list[np.ndarray] | None = None


class Generator:
    """Prefill and decode steps for one model, mesh and sampling setting; reusable across calls."""

    def __init__(self, cfg: ModelConfig, params: nnx.State, mesh: Mesh, rules: Rules, window: int,
                 sampling: SamplingConfig):
        if window < 2:
            raise ValueError(f"the context window must hold at least 2 tokens, got {window}")
        self.cfg, self.graphdef = inference_graphdef(cfg)
        self.params, self.mesh, self.rules = params, mesh, rules
        self.window = window
        self.sampling = sampling
        self._params_sh = jax.tree.map(lambda x: x.sharding, params)
        self._replicated = NamedSharding(mesh, PartitionSpec())

    # ------------------------------------------------------------------------ shardings and steps

    def _sharding(self, names: Sequence[str | None], shape: Sequence[int]) -> NamedSharding:
        return logical_sharding(names, shape, self.mesh, self.rules)

    def _cache_sharding(self, batch: int, length: int) -> Any:
        return jax.tree.map(lambda s: self._sharding(CACHE_AXES, s.shape),
                            cache_shapes(self.cfg, batch, length))

    @functools.cache  # noqa: B019 (one Generator per loaded model; shapes are few)
    def _prefill(self, batch: int, length: int, cache_length: int) -> Callable:
        graphdef, sampling, cfg = self.graphdef, self.sampling, self.cfg

        def prefill(params, tokens_bt, lengths_b, key):
            model = nnx.merge(graphdef, params)
            b, t = tokens_bt.shape
            cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                                 cache_shapes(cfg, b, cache_length))
            positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            routing_mask_bt = positions_bt < lengths_b[:, None]  # padding stays out of the experts
            logits_btv, cache = model.with_cache(tokens_bt, positions_bt, cache, decode=False,
                                                 routing_mask_bt=routing_mask_bt, lengths_b=lengths_b)
            last_bv = logits_btv[jnp.arange(b), lengths_b - 1]
            return sample(last_bv, key, sampling), last_bv, cache

        rows = self._sharding(("batch",), (batch,))
        return jax.jit(prefill, in_shardings=(self._params_sh, self._sharding(("batch", "length"),
                                                                               (batch, length)),
                                              rows, self._replicated),
                       out_shardings=(rows, self._sharding(("batch", "vocab"), (batch, cfg.vocab_size)),
                                      self._cache_sharding(batch, cache_length)))

    @functools.cache  # noqa: B019
    def _decode(self, batch: int, cache_length: int) -> Callable:
        graphdef, sampling, cfg = self.graphdef, self.sampling, self.cfg

        def decode(params, tokens_b, positions_b, cache: Cache, key):
            model = nnx.merge(graphdef, params)
            logits_b1v, cache = model.with_cache(tokens_b[:, None], positions_b[:, None], cache,
                                                 decode=True)
            return sample(logits_b1v[:, 0], key, sampling), logits_b1v[:, 0], cache

        rows = self._sharding(("batch",), (batch,))
        cache_sh = self._cache_sharding(batch, cache_length)
        return jax.jit(decode, in_shardings=(self._params_sh, rows, rows, cache_sh, self._replicated),
                       out_shardings=(rows, self._sharding(("batch", "vocab"), (batch, cfg.vocab_size)),
                                      cache_sh),
                       donate_argnums=3)

    def _run_prefill(self, contexts: list[list[int]], cache_length: int, key: jax.Array) -> tuple:
        lengths = [len(c) for c in contexts]
        length = bucket(max(lengths), cache_length)
        tokens_bt = np.zeros((len(contexts), length), np.int32)
        for row, context in enumerate(contexts):
            tokens_bt[row, : len(context)] = context
        step = self._prefill(len(contexts), length, cache_length)
        return step(self.params, tokens_bt, np.asarray(lengths, np.int32), key)

    # ----------------------------------------------------------------------------- the host loop

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, seed: int = 0,
                 stop_ids: Collection[int] = (), on_token: Callable[[int, int], bool | None] | None = None,
                 return_logits: bool = False) -> Generation:
        """Up to ``max_new_tokens`` new ids per prompt; a row stops at any id of ``stop_ids`` (which
        is left out of its tokens). ``on_token(row, id)`` is called as each token arrives (stream
        it); when it returns True the row stops after that token (e.g. a stop string is complete).
        Tokens are drawn with ``jax.random.fold_in(key(seed), step)``."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt must hold at least one token")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        contexts = [list(p)[-self.window:] for p in prompts]
        stops = frozenset(int(i) for i in stop_ids)
        batch = len(contexts)
        cache_length = bucket(max(map(len, contexts)) + max_new_tokens, self.window)
        base_key = jax.random.key(seed)
        out = Generation([[] for _ in range(batch)], [False] * batch,
                         [[] for _ in range(batch)] if return_logits else None)
        decode = self._decode(batch, cache_length)
        with activation_sharding(self.mesh, self.rules):
            token_b, logits_bv, cache = self._run_prefill(contexts, cache_length,
                                                          jax.random.fold_in(base_key, 0))
            positions = np.array([len(c) for c in contexts], np.int32)  # where token_b goes next
            for i in range(max_new_tokens):
                last = i == max_new_tokens - 1
                shift = positions.max() >= cache_length
                if not last and not shift:  # queue the next step before reading this one
                    next_b, next_logits_bv, cache = decode(self.params, token_b, positions, cache,
                                                           jax.random.fold_in(base_key, i + 1))
                tokens = np.asarray(token_b)
                if return_logits:
                    logits = np.asarray(logits_bv)
                for row in range(batch):
                    if out.stopped[row]:
                        continue
                    token = int(tokens[row])
                    if token in stops:
                        out.stopped[row] = True
                        continue
                    out.tokens[row].append(token)
                    contexts[row].append(token)
                    if return_logits:
                        out.logits[row].append(logits[row])
                    if on_token is not None and on_token(row, token):
                        out.stopped[row] = True
                if last or all(out.stopped):
                    break
                if shift:  # re-prefill the last half of every row's context, newest token included
                    half = [c[-(cache_length // 2):] for c in contexts]
                    next_b, next_logits_bv, cache = self._run_prefill(
                        half, cache_length, jax.random.fold_in(base_key, i + 1))
                    positions = np.array([len(c) for c in half], np.int32)
                else:
                    positions = positions + 1
                token_b, logits_bv = next_b, next_logits_bv
        if return_logits:
            out.logits = [np.stack(rows) if rows else np.zeros((0, self.cfg.vocab_size), np.float32)
                          for rows in out.logits]
        return out


def print_sample(end: RunEnd) -> None:
    """End-of-run hook: ``train.sample_tokens`` tokens continuing ``train.sample_prompt`` from the
    trained model (temperature 0.8) in its own window (``model.max_seq_len``, as ``eval generate``),
    printed by process 0 (every process takes part: the parameters span them)."""
    t, tokenizer = end.cfg.train, end.tokenizer
    if not t.sample_tokens:
        return
    _, params = end.program.trainee.plain_model(end.state)
    ids = ([tokenizer.bos_id] if tokenizer.bos_id >= 0 else []) + tokenizer.encode(t.sample_prompt)
    generator = Generator(end.cfg.model, params, end.program.mesh, end.program.rules,
                          end.cfg.model.max_seq_len, SamplingConfig(temperature=0.8))
    new = generator.generate([ids], t.sample_tokens, seed=t.seed,
                             stop_ids=tokenizer.stop_ids).tokens[0]
    if jax.process_index() != 0:
        return
    print("--- sample (temperature 0.8) ---")
    print(t.sample_prompt + tokenizer.decode(new))
    print("--- end of sample ---", flush=True)
