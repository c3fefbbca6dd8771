"""Autoregressive sampling (greedy, temperature, top-k, top-p) by re-running the full forward pass
over a fixed-size window each token: one compile per (model, sampling settings), no cache. Simple
and exact; a KV-cache decoder replaces it for long generations.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eval.sampling import SamplingConfig, sample


@functools.lru_cache(maxsize=16)
def make_sampler(graphdef: nnx.GraphDef, sampling: SamplingConfig) -> Callable:
    """jit(params, tokens [1, W], length, key) -> next token after the first ``length`` tokens.
    Positions past ``length`` are padding: masked out of the experts' routing, ignored by the
    causal attention of the positions that matter."""

    @jax.jit
    def next_token(params, tokens_bt, length, key):
        routing_mask_bt = jnp.arange(tokens_bt.shape[1])[None] < length
        logits_btv = nnx.merge(graphdef, params)(tokens_bt, routing_mask_bt=routing_mask_bt)
        return sample(logits_btv[:, length - 1], key, sampling)[0]

    return next_token


def generate(params: nnx.State, graphdef: nnx.GraphDef, prompt_ids: list[int], max_new_tokens: int,
             window: int, *, temperature: float = 0.8, top_k: int = 0, top_p: float = 1.0,
             seed: int = 0, stop_id: int | None = None) -> Iterator[int]:
    """Yields up to ``max_new_tokens`` ids continuing ``prompt_ids``; the model sees at most the last
    ``window`` tokens (the context it was trained on)."""
    if not prompt_ids:
        raise ValueError("the prompt must hold at least one token")
    next_token = make_sampler(graphdef, SamplingConfig(temperature, top_k, top_p))
    ids = list(prompt_ids)
    key = jax.random.key(seed)
    for _ in range(max_new_tokens):
        context = ids[-window:]
        buf = np.zeros((1, window), np.int32)
        buf[0, : len(context)] = context
        key, sub = jax.random.split(key)
        token = int(next_token(params, buf, len(context), sub))
        if stop_id is not None and token == stop_id:
            return
        ids.append(token)
        yield token
