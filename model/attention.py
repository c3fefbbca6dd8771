"""Causal grouped-query self-attention (1 <= K <= N key/value heads) with RoPE or no positions,
optionally local (a sliding window, on every layer or on all but each Nth).

Scores, masking and softmax run in float32 whatever the compute dtype. Every kernel scales scores
by head_dim**-0.5; ``query_pre_attn_scalar`` (Gemma) is applied by scaling the queries before any
kernel (``ModelConfig.query_scale``). ``attn_logit_softcap`` (Gemma 2) caps the scaled scores,
cap * tanh(s / cap), before the mask: the einsum, blockwise, context-parallel and splash kernels
take it; ``xla`` and cuDNN cannot (``resolve_impl`` avoids them then). Packed rows are supported:
a query attends only to earlier keys of the same segment. Each kernel builds the mask it needs from
token indices, segment ids and the layer's window (model/masks.py); none is a [B, T, T] input.

``attention_impl`` picks the kernel of training and prefill (``causal_attention``): ``einsum``
(materialised scores), ``xla`` (``jax.nn.dot_product_attention``), ``blockwise`` (query blocks),
``splash`` (the Pallas TPU kernel, model/splash.py; interpreted off TPU) or ``auto``, which picks by
the platform the program is compiled for (``resolve_impl``). Whenever the active mesh splits the
sequence (context parallelism), keys and values are all-gathered and each device attends with its
own queries: splash splits its queries itself, every other kernel becomes
model/context_attention.py.

Decoding keeps a preallocated key/value cache for a stack of L layers, ``(k_lbskh, v_lbskh)`` with
S slots; the token at position p sits in slot p % S. With S at least the context that is slot p;
a model whose layers are all local keeps only ``sliding_window`` slots (a rolling window: decoding
memory is bounded by the window). Each layer gets the whole stack's cache and its own layer index
and writes only its new entries, so the buffers are updated in place across the scanned layers. A
prefill writes each row's latest S prompt keys and attends among the prompt causally; a decode step
writes each row's one new key at its own position's slot (rows may be at different positions) and
attends to the slots holding positions at or before it (and within the window).

Serving uses a paged cache instead (model/paged_attention.py): a ``Span`` with a block table; each
call scatters its tokens into their rows' blocks and attends over the blocks gathered
(``paged_attention``, the seam for a paged-attention kernel).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from model.attention_kernels import (
    blockwise_causal_attention,
    cudnn_attention,
    soft_cap,
    xla_attention,
)
from model.config import ModelConfig
from model.context_attention import context_attention
from model.layers import RMSNorm, Rope, apply_rope
from model.lora import adapted
from model.masks import Window, cache_mask, cache_slot_positions, causal_mask, paged_mask
from model.paged_attention import PAGED_CACHE_AXES, gather_pages, write_pages
from model.primitives import dense, param
from model.splash import splash_attention, splash_problems
from sharding.constrain import constrain, shards, target_platform

KVCache = tuple[jax.Array, jax.Array]  # (k_lbskh, v_lbskh) of a stack of layers
CACHE_AXES = ("layers", "batch", "length", "kv_heads", "head_dim")
# attention_impl=auto on CPU: the einsum path up to this many tokens, blockwise beyond: bench.longctx
# measured einsum 1.3x faster at 256 tokens and blockwise faster from 512 (1.4x) to 4096 (3.0x), in
# linear memory
CPU_EINSUM_MAX_LENGTH = 256


@dataclasses.dataclass(frozen=True)
class Span:
    """What attention needs to know about the T tokens of one call besides their activations:
    their positions, packed segments (training), each row's real length (a right-padded prefill),
    whether this is a decode step (T = 1 over a cache) and, over a paged cache, each row's block
    table [B, M] (model/paged_attention.py; ``lengths_b`` then counts the row's real new tokens)."""

    positions_bt: jax.Array
    segment_ids_bt: jax.Array | None = None
    lengths_b: jax.Array | None = None
    decode: bool = False
    block_table_bm: jax.Array | None = None


def update_cache(cache_lbskh: jax.Array, new_btkh: jax.Array, layer: jax.Array | int,
                 span: Span) -> jax.Array:
    """The stack's cache with layer ``layer``'s ``new_btkh`` written in. Decoding (T = 1): at each
    row's slot ``position % S``. A prefill: slot s of row b gets the row's latest prompt position
    congruent to s (zeros where there is none); with S >= T that is slots [0, T)."""
    new_btkh = new_btkh.astype(cache_lbskh.dtype)
    slots = cache_lbskh.shape[2]
    if span.decode:  # a scatter of B x K x H values, in place (the cache buffer is donated)
        rows_b = jnp.arange(new_btkh.shape[0])
        return cache_lbskh.at[layer, rows_b, span.positions_bt[:, 0] % slots].set(new_btkh[:, 0])
    b, t = new_btkh.shape[:2]
    if t <= slots:  # slots past a row's length hold padding, never read (model/masks.py)
        return jax.lax.dynamic_update_slice(cache_lbskh, new_btkh[None], (layer, 0, 0, 0, 0))
    last_b = jnp.full((b,), t - 1) if span.lengths_b is None else span.lengths_b - 1
    held_bs = cache_slot_positions(last_b[:, None], slots)[:, 0]  # latest position in each slot
    rows_bs = jnp.take_along_axis(new_btkh, jnp.clip(held_bs, 0, t - 1)[:, :, None, None], axis=1)
    rows_bs = jnp.where((held_bs >= 0)[:, :, None, None], rows_bs, 0)
    return jax.lax.dynamic_update_slice(cache_lbskh, rows_bs[None], (layer, 0, 0, 0, 0))


def attention_probs(q_btnh: jax.Array, k_bskh: jax.Array, mask_bts: jax.Array,
                    softcap: float = 0.0) -> jax.Array:
    """softmax(soft_cap(q k^T / sqrt(H)) + mask) in float32, [B, N, T, S], with N query heads
    sharing K key/value heads (query head n = kv head * G + g)."""
    b, t, n, h = q_btnh.shape
    k = k_bskh.shape[2]
    if k == n:  # multi-head: no group axis (its size-1 axis costs XLA:CPU layout copies)
        logits_bnts = soft_cap(jnp.einsum("btnh,bsnh->bnts", q_btnh, k_bskh,
                                          preferred_element_type=jnp.float32) * (h ** -0.5), softcap)
        logits_bnts = jnp.where(mask_bts[:, None], logits_bnts, jnp.finfo(jnp.float32).min)
        return jax.nn.softmax(logits_bnts, axis=-1)
    q_btkgh = q_btnh.reshape(b, t, k, n // k, h)
    logits_bkgts = soft_cap(jnp.einsum("btkgh,bskh->bkgts", q_btkgh, k_bskh,
                                       preferred_element_type=jnp.float32) * (h ** -0.5), softcap)
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
                          mask_bts: jax.Array, *, impl: str = "einsum",
                          softcap: float = 0.0) -> jax.Array:
    """softmax(soft_cap(q k^T / sqrt(H)) + mask) v, [B, T, N, H], under a dense mask (a decode
    step over a cache, or a causal mask built whole): ``impl`` ``xla``
    (``jax.nn.dot_product_attention``, no soft cap) or anything else for
    ``attend(attention_probs(...))``."""
    if impl == "xla":
        if softcap:
            raise ValueError("the xla attention kernel cannot soft-cap scores")
        return xla_attention(q_btnh, k_bskh, v_bskh, mask_bts)
    return attend(attention_probs(q_btnh, k_bskh, mask_bts, softcap), v_bskh)


def paged_attention(q_btnh: jax.Array, k_pbkh: jax.Array, v_pbkh: jax.Array,
                    block_table_bm: jax.Array, positions_bt: jax.Array, window: Window = 0, *,
                    softcap: float = 0.0) -> jax.Array:
    """Attention [B, T, N, H] of queries at ``positions_bt`` over their rows' pages of one layer
    (``k_pbkh``, ``v_pbkh``: [P, BS, K, H], already holding this call's tokens), keys at positions
    at or before each query (and within ``window``).

    The kernel seam of the paged cache: this gathers each row's blocks into a contiguous
    [B, M * BS, K, H] copy and runs the einsum path, or on CPU, for a decode step with grouped
    kv heads not split over the mesh, ``grouped_decode_attention`` (fine for short contexts). On
    TPU a Pallas paged-attention kernel that reads the blocks in place through the table
    (``jax.experimental.pallas.ops.tpu.paged_attention`` for decode) would go here, chosen by
    ``target_platform()`` as ``resolve_impl`` chooses the training kernel."""
    k_bskh, v_bskh = gather_pages(k_pbkh, block_table_bm), gather_pages(v_pbkh, block_table_bm)
    mask_bts = paged_mask(positions_bt, k_bskh.shape[1], window)
    kv_heads = k_bskh.shape[2]
    if (q_btnh.shape[1] == 1 and kv_heads < q_btnh.shape[2] and target_platform() == "cpu"
            and shards("kv_heads", kv_heads) == 1):  # [B, S*K, H] cannot keep K split
        return grouped_decode_attention(q_btnh, k_bskh, v_bskh, mask_bts, softcap)
    return dot_product_attention(q_btnh, k_bskh, v_bskh, mask_bts, softcap=softcap)


def grouped_decode_attention(q_b1nh: jax.Array, k_bskh: jax.Array, v_bskh: jax.Array,
                             mask_b1s: jax.Array, softcap: float = 0.0) -> jax.Array:
    """One query per row with grouped kv heads, [B, 1, N, H], reading the keys and values in
    their [B, S, K, H] layout as [B, S*K, H] matrices: every query head's scores against every kv
    head's keys (K times the multiply-adds needed, few in a decode step), the matching heads
    kept, and the values weighted through block-diagonal probabilities. The grouped einsum
    (``attention_probs``) makes XLA:CPU copy both into [B, K, S, H] first, which cost more than
    the extra multiply-adds: the serving engine's 8-row decode step of bench.decode's 19M preset
    went from 22.7 to 16.3 ms (median of 8 x 16 steps, one CPU device; SmolLM2-135M at 1 row
    36.6 -> 34.6 ms, at 8 rows unchanged). Only for a kv-head axis that is not split (merging it
    into S*K would make the mesh gather it) and on CPU, where it was measured."""
    b, _, n, h = q_b1nh.shape
    s, k = k_bskh.shape[1:3]
    same_kv_kk = jnp.eye(k, dtype=bool)
    scores_bxn = jnp.einsum("bxh,bnh->bxn", k_bskh.reshape(b, s * k, h), q_b1nh[:, 0],
                            preferred_element_type=jnp.float32)  # x: (key slot, kv head)
    scores_bskkg = scores_bxn.reshape(b, s, k, k, n // k) * (h ** -0.5)
    scores_bskg = jnp.sum(jnp.where(same_kv_kk[:, :, None], scores_bskkg, 0.0), axis=3)
    scores_bskg = jnp.where(mask_b1s[:, 0, :, None, None], soft_cap(scores_bskg, softcap),
                            jnp.finfo(jnp.float32).min)
    probs_bkgs = jax.nn.softmax(scores_bskg, axis=1).transpose(0, 2, 3, 1).astype(v_bskh.dtype)
    weights_bkgsk = jnp.where(same_kv_kk[None, :, None, None, :], probs_bkgs[..., None], 0)
    out_bnh = jnp.einsum("bnx,bxh->bnh", weights_bkgsk.reshape(b, n, s * k), v_bskh.reshape(b, s * k, h))
    return out_bnh[:, None]


def resolve_impl(impl: str, length: int, dtype: jnp.dtype, softcap: float = 0.0) -> str:
    """The kernel ``attention_impl`` means for ``length`` queries per device (a context-parallel
    shard's share): ``auto`` is splash on TPU
    (lengths the kernel tiles; others, e.g. a short prompt's prefill, take einsum up to
    CPU_EINSUM_MAX_LENGTH tokens and blockwise beyond, so memory stays linear), cuDNN on GPU for
    bfloat16/float16 (else xla), and on CPU the path bench.longctx measured fastest: einsum up to
    CPU_EINSUM_MAX_LENGTH tokens, blockwise beyond. An explicit ``splash`` on a length the kernel
    cannot tile falls back the same way (config validation refuses it for training). With a
    ``softcap`` neither xla nor cuDNN is picked (they cannot cap scores): the untiled choice."""
    untiled = "einsum" if length <= CPU_EINSUM_MAX_LENGTH else "blockwise"  # linear memory
    if impl == "splash":
        return "splash" if not splash_problems(length) else untiled
    if impl == "xla" and softcap:
        return untiled
    if impl != "auto":
        return impl
    platform = target_platform()
    if platform == "tpu":
        return "splash" if not splash_problems(length) else untiled
    if platform == "gpu" and not softcap:
        return "cudnn" if jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) else "xla"
    return "einsum" if length <= CPU_EINSUM_MAX_LENGTH else "blockwise"


def layer_window(window: int, local: bool | jax.Array) -> Window:
    """A layer's window: ``window`` when it is local, 0 (none) when global; traced when ``local``
    is (a stack that mixes local and global layers)."""
    if not window or local is False:
        return 0
    if local is True:
        return window
    return jnp.where(local, window, 0).astype(jnp.int32)


def layer_rope(x_btnh: jax.Array, positions_bt: jax.Array, local: bool | jax.Array,
               rope_global: Rope, rope_local: Rope) -> jax.Array:
    """``x`` rotated by the RoPE of a global layer or (``local``, traced inside a stack that
    mixes both) of a local one, when the two differ (``rope_local_theta``)."""
    rope = rope_global
    if rope_local == rope or local is False:
        return apply_rope(x_btnh, positions_bt, rope.inv_freq(x_btnh.shape[-1]),
                          rope.attention_factor)
    if local is True:
        rope = rope_local
        return apply_rope(x_btnh, positions_bt, rope.inv_freq(x_btnh.shape[-1]),
                          rope.attention_factor)
    h, other = x_btnh.shape[-1], rope_local
    inv_freq = jnp.where(local, other.inv_freq(h), rope.inv_freq(h))
    factor = jnp.where(local, other.attention_factor, rope.attention_factor)
    return apply_rope(x_btnh, positions_bt, inv_freq, factor)


def _static_window_attention(impl: str, q_btnh: jax.Array, k_btkh: jax.Array, v_btkh: jax.Array,
                             segment_ids_bt: jax.Array | None, window: int,
                             softcap: float) -> jax.Array:
    if impl == "splash":
        return splash_attention(q_btnh, k_btkh, v_btkh, segment_ids_bt, window, softcap=softcap)
    return cudnn_attention(q_btnh, k_btkh, v_btkh, segment_ids_bt, window)


def causal_attention(q_btnh: jax.Array, k_btkh: jax.Array, v_btkh: jax.Array,
                     segment_ids_bt: jax.Array | None, window: int, local: bool | jax.Array, *,
                     impl: str, block: int, softcap: float = 0.0) -> jax.Array:
    """Causal self-attention of T queries over their own T keys, [B, T, N, H]: ``local`` says
    whether this layer keeps to ``window`` tokens (a traced bool inside a stack that mixes local and
    global layers). Kernels whose mask is fixed at trace time (splash, cuDNN) run under a
    ``lax.cond`` over the two windows then; the others take the window as a traced value.
    ``softcap``: scores capped at cap * tanh(s / cap) (0 = off)."""
    b, t = q_btnh.shape[:2]
    this_window = layer_window(window, local)
    length_shards = shards("length", t)
    impl = resolve_impl(impl, t // length_shards, q_btnh.dtype, softcap)
    if length_shards > 1 and impl != "splash":  # splash splits its queries over the mesh itself
        return context_attention(q_btnh, k_btkh, v_btkh, segment_ids_bt, this_window, block=block,
                                 softcap=softcap)
    args = (q_btnh, k_btkh, v_btkh, segment_ids_bt)
    if impl in ("splash", "cudnn"):
        if isinstance(this_window, int):
            return _static_window_attention(impl, *args, this_window, softcap)
        return jax.lax.cond(local, lambda *a: _static_window_attention(impl, *a, window, softcap),
                            lambda *a: _static_window_attention(impl, *a, 0, softcap), *args)
    if impl == "blockwise":
        return blockwise_causal_attention(*args, this_window, block, softcap=softcap)
    return dot_product_attention(q_btnh, k_btkh, v_btkh,
                                 causal_mask(segment_ids_bt, b, t, this_window), impl=impl,
                                 softcap=softcap)


class Attention(nnx.Module):
    """Multi-head causal self-attention with grouped key/value heads and an output projection.

    With ``sow_intermediates`` set (``model.set_attributes(Attention, sow_intermediates=True)``)
    it sows its float32 weights [B, N, T, S] as the intermediate ``attention_probs`` (collect them
    with ``nnx.capture``); that takes the einsum path, the only one that forms the weights.

    Options (ModelConfig): ``qkv_bias`` (biases ``b_q_nh``, ``b_k_kh``, ``b_v_kh`` added after the
    projection and its LoRA term), ``qk_norm`` (``q_norm``, ``k_norm``: RMSNorm over each head,
    before RoPE), RoPE scaling and a separate base for local layers (model/layers.py: Rope),
    ``query_pre_attn_scalar`` and ``attn_logit_softcap``."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
        init = nnx.initializers.normal(cfg.init_std)
        out_init = nnx.initializers.normal(cfg.init_std / (2 * cfg.num_layers) ** 0.5)
        pd = cfg.param_dtype
        self.w_q_dnh = param(rngs, init, (d, n, h), ("embed", "heads", "head_dim"), pd)
        self.w_k_dkh = param(rngs, init, (d, k, h), ("embed", "kv_heads", "head_dim"), pd)
        self.w_v_dkh = param(rngs, init, (d, k, h), ("embed", "kv_heads", "head_dim"), pd)
        self.w_o_nhd = param(rngs, out_init, (n, h, d), ("heads", "head_dim", "embed"), pd)
        if cfg.qkv_bias:
            zeros = nnx.initializers.zeros
            self.b_q_nh = param(None, zeros, (n, h), ("heads", "head_dim"), pd)
            self.b_k_kh = param(None, zeros, (k, h), ("kv_heads", "head_dim"), pd)
            self.b_v_kh = param(None, zeros, (k, h), ("kv_heads", "head_dim"), pd)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(h, cfg, rngs, axes=("head_dim",))
            self.k_norm = RMSNorm(h, cfg, rngs, axes=("head_dim",))
        self.use_rope = cfg.position == "rope"
        self.rope_global, self.rope_local = Rope.of(cfg), Rope.of(cfg, local=True)
        self.query_scale = cfg.query_scale
        self.softcap = cfg.attn_logit_softcap
        self.dtype = jnp.dtype(cfg.dtype)
        self.impl, self.block = cfg.attention_impl, cfg.attention_block
        self.window = cfg.sliding_window
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
        outs = [adapted(self, name, x_btd, out) for name, out in zip("qkv", outs, strict=True)]
        if hasattr(self, "b_q_nh"):
            biases = (self.b_q_nh, self.b_k_kh, self.b_v_kh)
            outs = [out + b[...].astype(dt) for out, b in zip(outs, biases, strict=True)]
        return tuple(outs)

    def rope(self, x_btnh: jax.Array, positions_bt: jax.Array,
             local: bool | jax.Array) -> jax.Array:
        """``x`` rotated by this layer's RoPE (``layer_rope``)."""
        return layer_rope(x_btnh, positions_bt, local, self.rope_global, self.rope_local)

    def __call__(self, x_btd: jax.Array, span: Span, cache: KVCache | None = None,
                 layer: jax.Array | int = 0,
                 local: bool | jax.Array = False) -> tuple[jax.Array, KVCache | None]:
        """(output [B, T, D], the stack's updated cache or None); this is layer ``layer`` of the
        cache's stack, local (a ``sliding_window``) when ``local``. Without a cache, or in a
        prefill, the T new tokens attend among themselves; a decode step (T = 1) attends over the
        cache's slots; over a paged cache (``span.block_table_bm``) see ``_paged``."""
        q_btnh, k_btkh, v_btkh = self.project_qkv(x_btd)
        if hasattr(self, "q_norm"):
            q_btnh, k_btkh = self.q_norm(q_btnh), self.k_norm(k_btkh)
        if self.use_rope:
            q_btnh = self.rope(q_btnh, span.positions_bt, local)
            k_btkh = self.rope(k_btkh, span.positions_bt, local)
        if self.query_scale != 1.0:  # every kernel then applies head_dim**-0.5 as usual
            q_btnh = (q_btnh.astype(jnp.float32) * self.query_scale).astype(q_btnh.dtype)
        q_btnh = constrain(q_btnh, ("batch", "length", "heads", "head_dim"))
        k_btkh = constrain(k_btkh, ("batch", "length", "kv_heads", "head_dim"))
        v_btkh = constrain(v_btkh, ("batch", "length", "kv_heads", "head_dim"))
        window = layer_window(self.window, local)
        if span.block_table_bm is not None:
            return self._paged(q_btnh, k_btkh, v_btkh, span, cache, layer, window)
        if cache is not None:
            cache = tuple(constrain(update_cache(c_lbskh, new_btkh, layer, span), CACHE_AXES)
                          for c_lbskh, new_btkh in zip(cache, (k_btkh, v_btkh), strict=True))
        if span.decode:  # attend over every cached slot of this layer (the mask hides the rest)
            k_bskh, v_bskh = (constrain(c_lbskh[layer], CACHE_AXES[1:]) for c_lbskh in cache)
            mask_bts = cache_mask(span.positions_bt, k_bskh.shape[1], window)
            if self.sow_intermediates:
                out_btnh = self._sown_attention(q_btnh, k_bskh, v_bskh, mask_bts)
            else:
                impl = "xla" if self.impl == "xla" and not self.softcap else "einsum"
                out_btnh = dot_product_attention(q_btnh, k_bskh, v_bskh, mask_bts, impl=impl,
                                                 softcap=self.softcap)
        elif self.sow_intermediates:
            mask_bts = causal_mask(span.segment_ids_bt, *q_btnh.shape[:2], window)
            out_btnh = self._sown_attention(q_btnh, k_btkh, v_btkh, mask_bts)
        else:
            out_btnh = causal_attention(q_btnh, k_btkh, v_btkh, span.segment_ids_bt, self.window,
                                        local, impl=self.impl, block=self.block,
                                        softcap=self.softcap)
        return self._output(out_btnh), cache

    def _paged(self, q_btnh: jax.Array, k_btkh: jax.Array, v_btkh: jax.Array, span: Span,
               cache: KVCache, layer: jax.Array | int, window: Window) -> tuple[jax.Array, KVCache]:
        """Over a paged cache: the new keys and values written to their rows' blocks, then every
        query attends over its row's pages (``paged_attention``)."""
        cache = tuple(constrain(write_pages(c_lpbkh, new_btkh, layer, span.positions_bt,
                                            span.lengths_b, span.block_table_bm), PAGED_CACHE_AXES)
                      for c_lpbkh, new_btkh in zip(cache, (k_btkh, v_btkh), strict=True))
        out_btnh = paged_attention(q_btnh, cache[0][layer], cache[1][layer], span.block_table_bm,
                                   span.positions_bt, window, softcap=self.softcap)
        return self._output(out_btnh), cache

    def _output(self, out_btnh: jax.Array) -> jax.Array:
        """The heads' outputs projected back to the model width, [B, T, D]."""
        out_btd = adapted(self, "o", out_btnh,
                          dense(out_btnh, self.w_o_nhd[...].astype(self.dtype), axes=2))
        return constrain(out_btd, ("batch", "length", "embed"))

    def _sown_attention(self, q_btnh: jax.Array, k_bskh: jax.Array, v_bskh: jax.Array,
                        mask_bts: jax.Array) -> jax.Array:
        """The einsum path, sowing its float32 weights [B, N, T, S] as ``attention_probs``."""
        probs32_bnts = attention_probs(q_btnh, k_bskh, mask_bts, self.softcap)
        self.sow(nnx.Intermediate, "attention_probs", probs32_bnts)
        return attend(probs32_bnts, v_bskh)
