"""Causal grouped-query self-attention (1 <= K <= N key/value heads) with RoPE or no positions.

Scores, masking and softmax run in float32 whatever the compute dtype. Packed rows are supported:
a query attends only to earlier keys of the same segment.

Decoding keeps a preallocated key/value cache for a stack of L layers, ``(k_lbskh, v_lbskh)`` with
S slots; slot s holds the token at position s. Each layer gets the whole stack's cache and its own
layer index and writes only its new entries, so the buffers are updated in place across the scanned
layers (no per-layer copies). A prefill writes a prompt's T keys into slots [0, T) and attends among
them causally; a decode step writes each row's one new key at the slot of its own position (rows may
be at different positions) and attends to the slots at or before it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from model.attention_kernels import blockwise_causal_attention, xla_attention
from model.config import ModelConfig
from model.layers import apply_rope
from model.lora import adapted
from model.primitives import dense, param
from sharding.constrain import constrain


def causal_mask(segment_ids_bt: jax.Array | None, batch: int, length: int) -> jax.Array:
    """[B, T, T] boolean mask: key s visible to query t iff s <= t and both are in one segment."""
    idx = jnp.arange(length)
    mask_tt = idx[:, None] >= idx[None, :]
    if segment_ids_bt is None:
        return jnp.broadcast_to(mask_tt, (batch, length, length))
    same_bts = segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :]
    return mask_tt[None] & same_bts


def decode_mask(positions_bt: jax.Array, cache_length: int) -> jax.Array:
    """[B, T, S] boolean mask for queries at ``positions_bt`` over a cache: slot s <= position."""
    return jnp.arange(cache_length)[None, None, :] <= positions_bt[:, :, None]


KVCache = tuple[jax.Array, jax.Array]  # (k_lbskh, v_lbskh) of a stack of layers
CACHE_AXES = ("layers", "batch", "length", "kv_heads", "head_dim")


def update_cache(cache_lbskh: jax.Array, new_btkh: jax.Array, layer: jax.Array | int,
                 positions_bt: jax.Array, decode: bool) -> jax.Array:
    """The stack's cache with layer ``layer``'s ``new_btkh`` written in: at each row's own slot
    ``positions_bt[:, 0]`` when decoding one token (T = 1), else into slots [0, T) (a prefill)."""
    new_btkh = new_btkh.astype(cache_lbskh.dtype)
    if decode:  # a scatter of B x K x H values, in place (the cache buffer is donated)
        rows_b = jnp.arange(new_btkh.shape[0])
        return cache_lbskh.at[layer, rows_b, positions_bt[:, 0]].set(new_btkh[:, 0])
    return jax.lax.dynamic_update_slice(cache_lbskh, new_btkh[None], (layer, 0, 0, 0, 0))


def attention_probs(q_btnh: jax.Array, k_bskh: jax.Array, mask_bts: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(H) + mask) in float32, [B, N, T, S], with N query heads sharing K
    key/value heads (query head n = kv head * G + g)."""
    b, t, n, h = q_btnh.shape
    k = k_bskh.shape[2]
    if k == n:  # multi-head: no group axis (its size-1 axis costs XLA:CPU layout copies)
        logits_bnts = jnp.einsum("btnh,bsnh->bnts", q_btnh, k_bskh,
                                 preferred_element_type=jnp.float32) * (h ** -0.5)
        logits_bnts = jnp.where(mask_bts[:, None], logits_bnts, jnp.finfo(jnp.float32).min)
        return jax.nn.softmax(logits_bnts, axis=-1)
    q_btkgh = q_btnh.reshape(b, t, k, n // k, h)
    logits_bkgts = jnp.einsum("btkgh,bskh->bkgts", q_btkgh, k_bskh,
                              preferred_element_type=jnp.float32) * (h ** -0.5)
    logits_bkgts = jnp.where(mask_bts[:, None, None], logits_bkgts, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(logits_bkgts, axis=-1).reshape(b, n, t, -1)


def attend(probs32_bnts: jax.Array, v_bskh: jax.Array) -> jax.Array:
    """The attention output [B, T, N, H]: the values weighted by ``probs32_bnts``."""
    b, n, t, s = probs32_bnts.shape
    k, h = v_bskh.shape[2:]
    probs_bnts = probs32_bnts.astype(v_bskh.dtype)
    if k == n:
        return jnp.einsum("bnts,bsnh->btnh", probs_bnts, v_bskh)
    out_btkgh = jnp.einsum("bkgts,bskh->btkgh", probs_bnts.reshape(b, k, n // k, t, s), v_bskh)
    return out_btkgh.reshape(b, t, n, h)


def dot_product_attention(q_btnh: jax.Array, k_bskh: jax.Array, v_bskh: jax.Array,
                          mask_bts: jax.Array, *, impl: str = "einsum", block: int = 128) -> jax.Array:
    """softmax(q k^T / sqrt(H) + mask) v, [B, T, N, H]. ``impl`` (ModelConfig.attention_impl):
    ``einsum`` (``attend(attention_probs(...))``), ``xla`` or ``blockwise`` (see
    model/attention_kernels.py; ``blockwise`` needs a causal mask over T == S, so a decode step
    takes the einsum path)."""
    if impl == "xla":
        return xla_attention(q_btnh, k_bskh, v_bskh, mask_bts)
    if impl == "blockwise" and q_btnh.shape[1] == k_bskh.shape[1]:
        return blockwise_causal_attention(q_btnh, k_bskh, v_bskh, mask_bts, block)
    return attend(attention_probs(q_btnh, k_bskh, mask_bts), v_bskh)


class Attention(nnx.Module):
    """Multi-head causal self-attention with grouped key/value heads and an output projection.

    With ``sow_intermediates`` set (``model.set_attributes(Attention, sow_intermediates=True)``)
    it sows its float32 weights [B, N, T, S] as the intermediate ``attention_probs`` (collect them
    with ``nnx.capture``); that takes the einsum path, the only one that forms the weights."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
        init = nnx.initializers.normal(cfg.init_std)
        out_init = nnx.initializers.normal(cfg.init_std / (2 * cfg.num_layers) ** 0.5)
        pd = cfg.param_dtype
        self.w_q_dnh = param(rngs, init, (d, n, h), ("embed", "heads", "head_dim"), pd)
        self.w_k_dkh = param(rngs, init, (d, k, h), ("embed", "kv_heads", "head_dim"), pd)
        self.w_v_dkh = param(rngs, init, (d, k, h), ("embed", "kv_heads", "head_dim"), pd)
        self.w_o_nhd = param(rngs, out_init, (n, h, d), ("heads", "head_dim", "embed"), pd)
        self.use_rope = cfg.position == "rope"
        self.rope_theta = cfg.rope_theta
        self.dtype = jnp.dtype(cfg.dtype)
        self.impl, self.block = cfg.attention_impl, cfg.attention_block
        self.fused = cfg.fused_projections
        self.sow_intermediates = False

    def project_qkv(self, x_btd: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(q [B, T, N, H], k [B, T, K, H], v [B, T, K, H]); with ``fused_projections`` one matmul
        against the three weights concatenated along their output axis."""
        dt = self.dtype
        weights = (self.w_q_dnh[...], self.w_k_dkh[...], self.w_v_dkh[...])
        if self.fused:
            d = x_btd.shape[-1]
            widths = [w.shape[1] * w.shape[2] for w in weights]
            w_dm = jnp.concatenate([w.reshape(d, -1) for w in weights], axis=1).astype(dt)
            parts = jnp.split(dense(x_btd, w_dm), [widths[0], widths[0] + widths[1]], axis=-1)
            outs = [p.reshape(x_btd.shape[:-1] + w.shape[1:]) for p, w in zip(parts, weights, strict=True)]
        else:
            outs = [dense(x_btd, w.astype(dt)) for w in weights]
        return tuple(adapted(self, name, x_btd, out) for name, out in zip("qkv", outs, strict=True))

    def __call__(self, x_btd: jax.Array, positions_bt: jax.Array, mask_bts: jax.Array,
                 cache: KVCache | None = None, layer: jax.Array | int = 0, *,
                 decode: bool = False) -> tuple[jax.Array, KVCache | None]:
        """(output [B, T, D], the stack's updated cache or None); this is layer ``layer`` of the
        cache's stack. Without a cache, or in a prefill, ``mask_bts`` is over the T new tokens; in a
        decode step (T = 1) it is over the S slots."""
        dt = self.dtype
        q_btnh, k_btkh, v_btkh = self.project_qkv(x_btd)
        if self.use_rope:
            q_btnh = apply_rope(q_btnh, positions_bt, self.rope_theta)
            k_btkh = apply_rope(k_btkh, positions_bt, self.rope_theta)
        q_btnh = constrain(q_btnh, ("batch", "length", "heads", "head_dim"))
        k_btkh = constrain(k_btkh, ("batch", "length", "kv_heads", "head_dim"))
        v_btkh = constrain(v_btkh, ("batch", "length", "kv_heads", "head_dim"))
        if cache is not None:
            cache = tuple(constrain(update_cache(c_lbskh, new_btkh, layer, positions_bt, decode), CACHE_AXES)
                          for c_lbskh, new_btkh in zip(cache, (k_btkh, v_btkh), strict=True))
            if decode:  # attend over every cached slot of this layer (the mask hides the future)
                k_btkh, v_btkh = (constrain(c_lbskh[layer], CACHE_AXES[1:]) for c_lbskh in cache)
        if self.sow_intermediates:
            probs32_bnts = attention_probs(q_btnh, k_btkh, mask_bts)
            self.sow(nnx.Intermediate, "attention_probs", probs32_bnts)
            out_btnh = attend(probs32_bnts, v_btkh)
        else:
            out_btnh = dot_product_attention(q_btnh, k_btkh, v_btkh, mask_bts, impl=self.impl,
                                             block=self.block)
        out_btd = adapted(self, "o", out_btnh, dense(out_btnh, self.w_o_nhd[...].astype(dt), axes=2))
        return constrain(out_btd, ("batch", "length", "embed")), cache
