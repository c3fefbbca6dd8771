"""Multi-head latent attention (DeepSeek-V2/V3): keys and values of every head come from one
compressed latent per token, plus a small rotary key shared by all heads; the KV cache keeps only
the latent and that key.

Legend: C = kv_lora_rank (the latent), R = qk_rope_head_dim (the rotary part of a query/key head),
P = qk_nope_head_dim (its position-free part), V = v_head_dim, N query heads, Rq = q_lora_rank.
A query head is [nope P | rope R]; a key head is [c W_k_up (P) | the shared roped key (R)]; a value
head is c W_v_up (V), with c = RMSNorm(x W_kv_down) the latent. Scores are scaled by
(P + R)**-0.5, or ``query_pre_attn_scalar``**-0.5 when set (DeepSeek's yarn mscale goes there).

Training and prefill expand the latent into per-head keys and values and run the model's causal
kernels (model/attention.py: causal_attention). Decoding reads the latent cache directly (weight
absorption): q_nope W_k_up^T gives a query in latent space, so a score is q_c . c + q_rope . k_rope,
and the output is (probs . c) W_v_up -- the keys and values of the cached tokens are never formed.

The cache is the attention cache's pair of slots with one "kv head": (c_lbs1c, kr_lbs1r), the normed
latent [L, B, S, 1, C] and the roped shared key [L, B, S, 1, R] (model/transformer.py: cache_shapes).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from model.attention import (
    CACHE_AXES,
    KVCache,
    Span,
    attend,
    attention_probs,
    causal_attention,
    layer_rope,
    layer_window,
    resolve_impl,
    update_cache,
)
from model.attention_kernels import soft_cap
from model.config import ModelConfig
from model.layers import RMSNorm, Rope
from model.lora import adapted
from model.masks import cache_mask, causal_mask
from model.primitives import dense, param
from sharding.constrain import constrain, shards

HEADS = ("batch", "length", "heads", "head_dim")


class MLAttention(nnx.Module):
    """Multi-head latent attention with the decoupled RoPE key; a drop-in for ``Attention``
    (same call and cache plumbing). Options that ``Attention`` has and MLA keeps: sliding windows,
    ``rope_local_theta``, ``attn_logit_softcap``, ``query_pre_attn_scalar``, LoRA on ``q`` (a
    full-rank query) and ``o``, and ``sow_intermediates`` (the float32 attention weights)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, n, pd = cfg.d_model, cfg.num_heads, cfg.param_dtype
        c, r, p, v = (cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.qk_nope_head_dim,
                      cfg.resolved_v_head_dim)
        init = nnx.initializers.normal(cfg.init_std)
        out_init = nnx.initializers.normal(cfg.init_std / (2 * cfg.num_layers) ** 0.5)
        heads = ("heads", "head_dim")
        if cfg.q_lora_rank:
            rq = cfg.q_lora_rank
            self.w_q_down_dr = param(rngs, init, (d, rq), ("embed", "q_lora"), pd)
            self.q_latent_norm = RMSNorm(rq, cfg, rngs, axes=("q_lora",))
            self.w_q_up_rnh = param(rngs, init, (rq, n, p + r), ("q_lora", *heads), pd)
        else:
            self.w_q_dnh = param(rngs, init, (d, n, p + r), ("embed", *heads), pd)
        self.w_kv_down_dc = param(rngs, init, (d, c), ("embed", "kv_lora"), pd)
        self.w_k_rope_dr = param(rngs, init, (d, r), ("embed", "head_dim"), pd)
        self.kv_latent_norm = RMSNorm(c, cfg, rngs, axes=("kv_lora",))
        self.w_k_up_cnh = param(rngs, init, (c, n, p), ("kv_lora", *heads), pd)
        self.w_v_up_cnh = param(rngs, init, (c, n, v), ("kv_lora", *heads), pd)
        self.w_o_nhd = param(rngs, out_init, (n, v, d), (*heads, "embed"), pd)
        self.nope = p
        self.softmax_scale = (cfg.query_pre_attn_scalar or p + r) ** -0.5
        self.rope_global, self.rope_local = Rope.of(cfg), Rope.of(cfg, local=True)
        self.softcap = cfg.attn_logit_softcap
        self.dtype = jnp.dtype(cfg.dtype)
        self.impl, self.block = cfg.attention_impl, cfg.attention_block
        self.window = cfg.sliding_window
        self.sow_intermediates = False

    def queries(self, x_btd: jax.Array, positions_bt: jax.Array,
                local: bool | jax.Array) -> tuple[jax.Array, jax.Array]:
        """(q_nope [B, T, N, P], roped q_rope [B, T, N, R]), neither scaled yet."""
        dt = self.dtype
        if hasattr(self, "w_q_dnh"):
            q_btnh = adapted(self, "q", x_btd, dense(x_btd, self.w_q_dnh[...].astype(dt)))
        else:
            q_btr = self.q_latent_norm(dense(x_btd, self.w_q_down_dr[...].astype(dt)))
            q_btnh = dense(constrain(q_btr, ("batch", "length", "q_lora")),
                           self.w_q_up_rnh[...].astype(dt))
        q_btnh = constrain(q_btnh, HEADS)
        q_rope_btnr = layer_rope(q_btnh[..., self.nope:], positions_bt, local, self.rope_global,
                                 self.rope_local)
        return q_btnh[..., :self.nope], q_rope_btnr

    def latent(self, x_btd: jax.Array, positions_bt: jax.Array,
               local: bool | jax.Array) -> tuple[jax.Array, jax.Array]:
        """What the cache keeps of the T tokens: (the normed latent [B, T, 1, C], the roped shared
        key [B, T, 1, R])."""
        dt = self.dtype
        c_btc = self.kv_latent_norm(dense(x_btd, self.w_kv_down_dc[...].astype(dt)))
        kr_bt1r = dense(x_btd, self.w_k_rope_dr[...].astype(dt))[:, :, None]
        kr_bt1r = layer_rope(kr_bt1r, positions_bt, local, self.rope_global, self.rope_local)
        return constrain(c_btc[:, :, None], CACHE_AXES[1:]), constrain(kr_bt1r, CACHE_AXES[1:])

    def _scaled(self, q_btnh: jax.Array) -> jax.Array:
        """``q`` times the factor that turns every kernel's width**-0.5 (width = q's last axis) into
        ``softmax_scale``."""
        factor = self.softmax_scale * q_btnh.shape[-1] ** 0.5
        return (q_btnh.astype(jnp.float32) * factor).astype(q_btnh.dtype)

    def __call__(self, x_btd: jax.Array, span: Span, cache: KVCache | None = None,
                 layer: jax.Array | int = 0,
                 local: bool | jax.Array = False) -> tuple[jax.Array, KVCache | None]:
        """(output [B, T, D], the stack's updated cache or None), as ``Attention``: layer ``layer``
        of the cache's stack, local (a ``sliding_window``) when ``local``; a decode step (T = 1)
        attends over the cached latents, anything else among its own T tokens."""
        q_nope_btnp, q_rope_btnr = self.queries(x_btd, span.positions_bt, local)
        c_bt1c, kr_bt1r = self.latent(x_btd, span.positions_bt, local)
        if cache is not None:
            cache = tuple(constrain(update_cache(c_lbs1x, new_bt1x, layer, span), CACHE_AXES)
                          for c_lbs1x, new_bt1x in zip(cache, (c_bt1c, kr_bt1r), strict=True))
        if span.decode:
            c_bs1c, kr_bs1r = (constrain(c_lbs1x[layer], CACHE_AXES[1:]) for c_lbs1x in cache)
            out_btnv = self._absorbed(q_nope_btnp, q_rope_btnr, c_bs1c, kr_bs1r,
                                      cache_mask(span.positions_bt, c_bs1c.shape[1],
                                                 layer_window(self.window, local)))
        else:
            out_btnv = self._expanded(q_nope_btnp, q_rope_btnr, c_bt1c[:, :, 0], kr_bt1r, span, local)
        dt = self.dtype
        out_btd = adapted(self, "o", out_btnv, dense(out_btnv, self.w_o_nhd[...].astype(dt), axes=2))
        return constrain(out_btd, ("batch", "length", "embed")), cache

    def _expanded(self, q_nope_btnp: jax.Array, q_rope_btnr: jax.Array, c_btc: jax.Array,
                  kr_bt1r: jax.Array, span: Span, local: bool | jax.Array) -> jax.Array:
        """Causal attention of the T tokens among themselves with per-head keys [B, T, N, P + R]
        and values [B, T, N, V] expanded from the latent; [B, T, N, V]."""
        dt = self.dtype
        b, t, n, _ = q_rope_btnr.shape
        q_btnh = constrain(jnp.concatenate([q_nope_btnp, q_rope_btnr], -1), HEADS)
        k_nope_btnp = dense(c_btc, self.w_k_up_cnh[...].astype(dt))
        kr_btnr = jnp.broadcast_to(kr_bt1r, (b, t, n, kr_bt1r.shape[-1]))
        k_btnh = constrain(jnp.concatenate([k_nope_btnp, kr_btnr], -1), HEADS)
        v_btnv = constrain(dense(c_btc, self.w_v_up_cnh[...].astype(dt)), HEADS)
        if self.sow_intermediates:  # the einsum path: the only one that forms the weights
            mask_bts = causal_mask(span.segment_ids_bt, b, t, layer_window(self.window, local))
            probs32_bnts = attention_probs(self._scaled(q_btnh), k_btnh, mask_bts, self.softcap)
            return self._sown(probs32_bnts, v_btnv)
        v = v_btnv.shape[-1]
        # The einsum and splash kernels take value heads of another width than the query/key heads
        # (einsum contracts each width on its own; splash has a head_dim_v); xla and cuDNN
        # (jax.nn.dot_product_attention checks one H), blockwise and the context-parallel flash
        # recurrence (its accumulators are shaped like q) need one width: the narrower side is
        # zero-padded (zero value columns give zero output columns, sliced off; zero q/k columns
        # add nothing to a score, and _scaled scales by the padded width).
        impl = resolve_impl(self.impl, t // shards("length", t), dt, self.softcap)
        if not (impl == "splash" or (impl == "einsum" and shards("length", t) == 1)):
            width = max(q_btnh.shape[-1], v_btnv.shape[-1])
            q_btnh, k_btnh, v_btnv = (_padded(a, width) for a in (q_btnh, k_btnh, v_btnv))
        out_btnh = causal_attention(self._scaled(q_btnh), k_btnh, v_btnv, span.segment_ids_bt,
                                    self.window, local, impl=self.impl, block=self.block,
                                    softcap=self.softcap)
        return out_btnh[..., :v]

    def _absorbed(self, q_nope_btnp: jax.Array, q_rope_btnr: jax.Array, c_bs1c: jax.Array,
                  kr_bs1r: jax.Array, mask_bts: jax.Array) -> jax.Array:
        """T queries over S cached latents without expanding them: q_nope is taken into latent
        space (q_c = q_nope W_k_up^T, [B, T, N, C]), a score is (q_c . c + q_rope . k_rope) times
        the softmax scale, and the weighted latents [B, T, N, C] go through W_v_up; [B, T, N, V]."""
        dt = self.dtype
        q_c_btnc = jnp.einsum("btnp,cnp->btnc", q_nope_btnp, self.w_k_up_cnh[...].astype(dt))
        q_c_btnc = constrain(q_c_btnc, ("batch", "length", "heads", "kv_lora"))
        logits_bnts = (jnp.einsum("btnc,bsc->bnts", q_c_btnc, c_bs1c[:, :, 0],
                                  preferred_element_type=jnp.float32) +
                       jnp.einsum("btnr,bsr->bnts", q_rope_btnr, kr_bs1r[:, :, 0],
                                  preferred_element_type=jnp.float32))
        logits_bnts = soft_cap(logits_bnts * self.softmax_scale, self.softcap)
        logits_bnts = jnp.where(mask_bts[:, None], logits_bnts, jnp.finfo(jnp.float32).min)
        probs32_bnts = jax.nn.softmax(logits_bnts, axis=-1)
        if self.sow_intermediates:
            self.sow(nnx.Intermediate, "attention_probs", probs32_bnts)
        out_btnc = attend(probs32_bnts, c_bs1c)  # one shared "kv head": every query head reads c
        return jnp.einsum("btnc,cnv->btnv", out_btnc, self.w_v_up_cnh[...].astype(dt))

    def _sown(self, probs32_bnts: jax.Array, v_bsnv: jax.Array) -> jax.Array:
        """``attend`` after sowing the float32 weights [B, N, T, S] as ``attention_probs``."""
        self.sow(nnx.Intermediate, "attention_probs", probs32_bnts)
        return attend(probs32_bnts, v_bsnv)


def _padded(x_btnh: jax.Array, width: int) -> jax.Array:
    """``x`` with zero columns appended to its last axis up to ``width``."""
    extra = width - x_btnh.shape[-1]
    return jnp.pad(x_btnh, ((0, 0),) * (x_btnh.ndim - 1) + ((0, extra),)) if extra else x_btnh
