"""Next-token cross-entropy from the decoder's final features by chunks of positions, so the
[B, T, V] logits never exist at once: each chunk's [B, c, V] logits are made, reduced to their
log-sum-exp and target logit, and made again in the backward pass (``jax.checkpoint``).

Equal to ``logsumexp(logits) - logits[target]`` over the full logits (``ModelConfig.loss_chunk=0``,
the path in train/step.py); the logits are float32 like the model's own.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sharding.constrain import constrain


def head_weight_vd(model: nnx.Module) -> jax.Array:
    """The LM head as [V, D] in the compute dtype: the tied embedding table or the untied head."""
    dt = model.embed.dtype
    if model.cfg.tie_embeddings:
        return model.embed.table_vd[...].astype(dt)
    return model.head_dv[...].astype(dt).T


def _chunk_sums(x_bcd: jax.Array, w_vd: jax.Array, targets_bc: jax.Array,
                weights_bc: jax.Array) -> jax.Array:
    """Weighted sum of one chunk's token losses."""
    logits_bcv = jnp.einsum("bcd,vd->bcv", x_bcd, w_vd).astype(jnp.float32)
    logits_bcv = constrain(logits_bcv, ("batch", "length", "vocab"))
    target_logit_bc = jnp.take_along_axis(logits_bcv, targets_bc[..., None], axis=-1)[..., 0]
    nll_bc = jax.nn.logsumexp(logits_bcv, axis=-1) - target_logit_bc
    return jnp.sum(nll_bc * weights_bc)


def chunked_nll_sum(features_btd: jax.Array, w_vd: jax.Array, targets_bt: jax.Array,
                    weights_bt: jax.Array, chunk: int) -> jax.Array:
    """Sum over positions of ``weights_bt * (logsumexp(x W^T) - (x W^T)[target])``, computed over
    ``chunk`` positions at a time (T is padded with weight-0 positions to a multiple of it)."""
    b, t, d = features_btd.shape
    chunks = -(-t // chunk)
    pad = chunks * chunk - t
    if pad:
        features_btd = jnp.pad(features_btd, ((0, 0), (0, pad), (0, 0)))
        targets_bt = jnp.pad(targets_bt, ((0, 0), (0, pad)))
        weights_bt = jnp.pad(weights_bt, ((0, 0), (0, pad)))

    def by_chunk(a: jax.Array) -> jax.Array:  # [B, n*c, ...] -> [n, B, c, ...]
        return a.reshape((b, chunks, chunk) + a.shape[2:]).swapaxes(0, 1)

    chunk_sums = jax.checkpoint(_chunk_sums)

    def body(total: jax.Array, xs: tuple[jax.Array, ...]) -> tuple[jax.Array, None]:
        x_bcd, targets_bc, weights_bc = xs
        return total + chunk_sums(x_bcd, w_vd, targets_bc, weights_bc), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32),
                            (by_chunk(features_btd), by_chunk(targets_bt), by_chunk(weights_bt)))
    return total
