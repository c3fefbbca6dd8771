"""Next-token selection from logits: greedy, temperature, top-k and top-p (nucleus), batched and
jit-friendly. ``temperature == 0`` is greedy; the filters compose (top-k, then top-p).
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
