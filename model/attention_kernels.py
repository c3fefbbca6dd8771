"""Causal attention kernels behind ``model.attention.dot_product_attention``'s ``impl`` option:
``xla`` (``jax.nn.dot_product_attention``) and ``blockwise`` (query blocks, never a T x T score
matrix). Both compute softmax(q k^T / sqrt(H) + mask) v with scores and softmax in float32.

``blockwise``: queries are cut into blocks of ``block`` rows; block i attends only to keys
[0, (i + 1) * block) -- the keys after its last query are masked anyway -- with heads leading
([B, K, G, T, H], the layout XLA:CPU's batched matmuls run fastest in). Each block's scores are
recomputed in the backward pass (``jax.checkpoint``), so only [B, N, block, S] scores exist at a
time. It needs a mask that hides every key after its query (the causal masks of training and
prefill, packed segments included); decoding over a cache uses the plain einsum path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def xla_attention(q_btnh: jax.Array, k_bskh: jax.Array, v_bskh: jax.Array,
                  mask_bts: jax.Array) -> jax.Array:
    """``jax.nn.dot_product_attention`` (XLA implementation, grouped heads natively) under
    ``mask_bts``; scores in float32 like the einsum path."""
    dt = v_bskh.dtype
    out_btnh = jax.nn.dot_product_attention(q_btnh.astype(jnp.float32), k_bskh.astype(jnp.float32),
                                            v_bskh.astype(jnp.float32), mask=mask_bts[:, None],
                                            implementation="xla")
    return out_btnh.astype(dt)


def _block_attention(q_bkgch: jax.Array, k_bkph: jax.Array, v_bkph: jax.Array,
                     mask_bcp: jax.Array) -> jax.Array:
    """One query block's output [B, K, G, c, H] over its P visible keys."""
    h = q_bkgch.shape[-1]
    logits_bkgcp = jnp.einsum("bkgch,bkph->bkgcp", q_bkgch, k_bkph,
                              preferred_element_type=jnp.float32) * (h ** -0.5)
    logits_bkgcp = jnp.where(mask_bcp[:, None, None], logits_bkgcp, jnp.finfo(jnp.float32).min)
    probs_bkgcp = jax.nn.softmax(logits_bkgcp, axis=-1)
    return jnp.einsum("bkgcp,bkph->bkgch", probs_bkgcp.astype(v_bkph.dtype), v_bkph)


def blockwise_causal_attention(q_btnh: jax.Array, k_bskh: jax.Array, v_bskh: jax.Array,
                               mask_bts: jax.Array, block: int) -> jax.Array:
    """Causal attention by query blocks of ``block`` rows (see the module docstring); T == S."""
    b, t, n, h = q_btnh.shape
    k = k_bskh.shape[2]
    if k_bskh.shape[1] != t:
        raise ValueError(f"blockwise attention needs as many keys as queries, got {t} queries and "
                         f"{k_bskh.shape[1]} keys")
    q_bkgth = q_btnh.reshape(b, t, k, n // k, h).transpose(0, 2, 3, 1, 4)
    k_bksh = k_bskh.transpose(0, 2, 1, 3)
    v_bksh = v_bskh.transpose(0, 2, 1, 3)
    attend = jax.checkpoint(_block_attention)
    outs = []
    for start in range(0, t, block):
        stop = min(start + block, t)
        outs.append(attend(q_bkgth[:, :, :, start:stop], k_bksh[:, :, :stop], v_bksh[:, :, :stop],
                           mask_bts[:, start:stop, :stop]))
    out_bkgth = jnp.concatenate(outs, axis=3) if len(outs) > 1 else outs[0]
    return out_bkgth.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)
