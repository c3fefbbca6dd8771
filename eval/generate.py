"""Autoregressive sampling (greedy, temperature, top-k) by re-running the full forward pass over a
fixed-size window each token: one compile, no cache. Simple and exact; a KV-cache decoder replaces it
for long generations.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def sample_logits(logits_v: jax.Array, key: jax.Array, temperature: float, top_k: int) -> jax.Array:
    """One token id from logits [V]: greedy when temperature == 0, else softmax(logits / T) over the
    ``top_k`` largest (all when top_k == 0)."""
    if temperature == 0:
        return jnp.argmax(logits_v)
    logits_v = logits_v / temperature
    if top_k:
        kth = jax.lax.top_k(logits_v, top_k)[0][-1]
        logits_v = jnp.where(logits_v < kth, -jnp.inf, logits_v)
    return jax.random.categorical(key, logits_v)


def make_sampler(graphdef: nnx.GraphDef, temperature: float, top_k: int) -> Callable:
    """jit(params, tokens [1, W], length, key) -> next token after the first ``length`` tokens."""

    @jax.jit
    def next_token(params, tokens_bt, length, key):
        logits_btv = nnx.merge(graphdef, params)(tokens_bt)
        return sample_logits(logits_btv[0, length - 1], key, temperature, top_k)

    return next_token


def generate(params: nnx.State, graphdef: nnx.GraphDef, prompt_ids: list[int], max_new_tokens: int,
             window: int, *, temperature: float = 0.8, top_k: int = 0, seed: int = 0,
             stop_id: int | None = None) -> Iterator[int]:
    """Yields up to ``max_new_tokens`` ids continuing ``prompt_ids``; the model sees at most the last
    ``window`` tokens (its maximum context)."""
    if not prompt_ids:
        raise ValueError("the prompt must hold at least one token")
    next_token = make_sampler(graphdef, temperature, top_k)
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
