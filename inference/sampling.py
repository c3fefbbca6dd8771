"""Next-token selection from logits: greedy, temperature, top-k and top-p (nucleus), batched and
jit-friendly. ``temperature == 0`` is greedy; the filters compose (top-k, then top-p). One setting
for a whole batch (``sample``), or one per row as arrays (``sample_rows``: the serving engine's
mixed requests share one program), with the chosen tokens' log-probabilities (``token_logprobs``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 = greedy; top_k 0 = off; top_p 1.0 = off."""

    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 1.0

    def problems(self) -> list[str]:
        out = []
        if not self.temperature >= 0:
            out.append(f"--temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            out.append(f"--top-k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            out.append(f"--top-p must be in (0, 1], got {self.top_p}")
        return out


def filtered_logits(logits_bv: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """Logits / temperature with everything outside the top-k and the top-p nucleus set to -inf.

    The nucleus is the smallest set of most likely tokens whose probability mass reaches top_p
    (ties at the boundary are all kept)."""
    logits_bv = logits_bv.astype(jnp.float32) / cfg.temperature
    if cfg.top_k and cfg.top_k < logits_bv.shape[-1]:
        kth_b1 = jax.lax.top_k(logits_bv, cfg.top_k)[0][:, -1:]
        logits_bv = jnp.where(logits_bv < kth_b1, -jnp.inf, logits_bv)
    if cfg.top_p < 1.0:
        sorted_bv = jnp.sort(logits_bv, axis=-1)[:, ::-1]
        probs_bv = jax.nn.softmax(sorted_bv, axis=-1)
        mass_before_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv  # mass of strictly better tokens
        keep_bv = mass_before_bv < cfg.top_p
        threshold_b1 = jnp.min(jnp.where(keep_bv, sorted_bv, jnp.inf), axis=-1, keepdims=True)
        logits_bv = jnp.where(logits_bv < threshold_b1, -jnp.inf, logits_bv)
    return logits_bv


def sample(logits_bv: jax.Array, key: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """One token id per row of logits [B, V]."""
    if cfg.temperature == 0:
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filtered_logits(logits_bv, cfg), axis=-1).astype(jnp.int32)


def filtered_rows(logits_bv: jax.Array, temperature_b: jax.Array, top_k_b: jax.Array,
                  top_p_b: jax.Array) -> jax.Array:
    """``filtered_logits`` with each row's own setting: logits / temperature (rows at 0 left
    unscaled: they are greedy), outside the row's top-k (0 = off) and top-p nucleus (1 = off)
    set to -inf."""
    logits_bv = logits_bv.astype(jnp.float32)
    logits_bv = logits_bv / jnp.where(temperature_b > 0, temperature_b, 1.0)[:, None]
    v = logits_bv.shape[-1]
    # the filters sort the vocabulary (about 12 ms a row at 49k ids on a CPU core): only when a row
    # has one on (lax.cond runs one branch)
    filtering = jnp.any(((top_k_b > 0) & (top_k_b < v)) | (top_p_b < 1.0))
    return jax.lax.cond(filtering, _top_k_top_p, lambda x, *_: x, logits_bv, top_k_b, top_p_b)


def _top_k_top_p(logits_bv: jax.Array, top_k_b: jax.Array, top_p_b: jax.Array) -> jax.Array:
    """Each row's logits outside its top-k and top-p nucleus set to -inf (see ``filtered_rows``)."""
    v = logits_bv.shape[-1]
    sorted_bv = jnp.sort(logits_bv, axis=-1)[:, ::-1]
    kth_b1 = jnp.take_along_axis(sorted_bv, jnp.clip(top_k_b - 1, 0, v - 1)[:, None], axis=-1)
    cut_bv = ((top_k_b > 0) & (top_k_b < v))[:, None] & (logits_bv < kth_b1)
    logits_bv = jnp.where(cut_bv, -jnp.inf, logits_bv)
    # the filtered logits sorted, without a second sort: the kept ones are a prefix of the sorted
    kept_b1 = jnp.sum(~cut_bv, axis=-1, keepdims=True)
    sorted_bv = jnp.where(jnp.arange(v)[None, :] < kept_b1, sorted_bv, -jnp.inf)
    probs_bv = jax.nn.softmax(sorted_bv, axis=-1)
    keep_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv < top_p_b[:, None]
    threshold_b1 = jnp.min(jnp.where(keep_bv, sorted_bv, jnp.inf), axis=-1, keepdims=True)
    nucleus_b1 = (top_p_b < 1.0)[:, None]
    return jnp.where(nucleus_b1 & (logits_bv < threshold_b1), -jnp.inf, logits_bv)


def sample_rows(logits_bv: jax.Array, seeds_b: jax.Array, counters_b: jax.Array,
                temperature_b: jax.Array, top_k_b: jax.Array, top_p_b: jax.Array) -> jax.Array:
    """One token id per row, each under its own setting: ``jnp.argmax`` where the temperature is
    0, else a draw from ``filtered_rows`` with the key ``fold_in(key(seed), counter)`` (a
    request's n-th token depends on its seed and n only, not on the rows beside it)."""
    greedy_b = jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)

    def draw(logits_bv: jax.Array) -> jax.Array:
        keys_b = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seeds_b, counters_b)
        filtered_bv = filtered_rows(logits_bv, temperature_b, top_k_b, top_p_b)
        drawn_b = jax.vmap(jax.random.categorical)(keys_b, filtered_bv)
        return jnp.where(temperature_b > 0, drawn_b, greedy_b).astype(jnp.int32)
    # an all-greedy batch draws nothing (lax.cond runs one branch)
    return jax.lax.cond(jnp.any(temperature_b > 0), draw, lambda _: greedy_b, logits_bv)


def token_logprobs(logits_bv: jax.Array, tokens_b: jax.Array,
                   top_n: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(log-probability of each row's token [B], the ``top_n`` most likely ids [B, n] and their
    log-probabilities [B, n]) under the model's own distribution (float32, before any sampling
    filter or temperature, as OpenAI's ``logprobs`` report)."""
    logprobs_bv = jax.nn.log_softmax(logits_bv.astype(jnp.float32), axis=-1)
    chosen_b = jnp.take_along_axis(logprobs_bv, tokens_b[:, None], axis=-1)[:, 0]
    top_bn, ids_bn = jax.lax.top_k(logprobs_bv, top_n)
    return chosen_b, ids_bn.astype(jnp.int32), top_bn
