"""Causal attention kernels behind ``model.attention.dot_product_attention``'s ``impl`` option:
``xla`` (``jax.nn.dot_product_attention``) and ``blockwise`` (query blocks, never a T x T score
matrix). Both compute softmax(q k^T / sqrt(H) + mask) v with scores and softmax in float32.

``blockwise``: queries and keys are cut into blocks of ``block`` rows, heads leading ([B, K, G,
block, H], the layout XLA:CPU's batched matmuls run fastest in); each query block folds in the key
blocks it may see with a running softmax (flash attention's recurrence, in plain JAX) and skips the
others (the future, and keys before a sliding window), so its FLOPs are the causal part; its own
backward pass recomputes each block pair's probabilities from the saved log-sum-exp, so its memory
is linear in T (bench.longctx). It is causal by construction (training and prefill, packed
segments and windows built per block pair from indices and segment ids, model/masks.py); decoding
over a cache uses the plain einsum path. With a soft cap (Gemma 2) the scaled scores s become
cap * tanh(s / cap) before the mask, and the backward pass multiplies their gradient by
d/ds = 1 - tanh(s / cap)^2.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from model.masks import Window, within_window


def soft_cap(logits: jax.Array, cap: float) -> jax.Array:
    """cap * tanh(logits / cap) (Gemma 2's soft-capping); the logits themselves when cap is 0."""
    return cap * jnp.tanh(logits / cap) if cap else logits


def xla_attention(q_btnh: jax.Array, k_bskh: jax.Array, v_bskh: jax.Array,
                  mask_bts: jax.Array) -> jax.Array:
    """``jax.nn.dot_product_attention`` (XLA implementation, grouped heads natively) under
    ``mask_bts``; scores in float32 like the einsum path."""
    dt = v_bskh.dtype
    out_btnh = jax.nn.dot_product_attention(q_btnh.astype(jnp.float32), k_bskh.astype(jnp.float32),
                                            v_bskh.astype(jnp.float32), mask=mask_bts[:, None],
                                            implementation="xla")
    return out_btnh.astype(dt)


def cudnn_attention(q_btnh: jax.Array, k_bskh: jax.Array, v_bskh: jax.Array,
                    segment_ids_bt: jax.Array | None, window: int) -> jax.Array:
    """The cuDNN (flash) kernel of ``jax.nn.dot_product_attention`` for a GPU: causal, grouped heads
    natively, a static ``window`` (cuDNN counts the query itself: window - 1 keys to its left) and
    packed segments as a mask. cuDNN takes bfloat16 or float16 inputs; its softmax is float32."""
    mask_b1ts = None
    if segment_ids_bt is not None:
        mask_b1ts = (segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :])[:, None]
    return jax.nn.dot_product_attention(q_btnh, k_bskh, v_bskh, mask=mask_b1ts, is_causal=True,
                                        local_window_size=(window - 1, 0) if window else None,
                                        implementation="cudnn")


def _blocks(x_bt_: jax.Array, count: int, block: int, fill: int | float = 0) -> jax.Array:
    """[count, B, block, ...]: ``x`` padded along T (axis 1) to count * block with ``fill``, cut into
    blocks on a leading axis."""
    pad = count * block - x_bt_.shape[1]
    if pad:
        widths = [(0, 0), (0, pad)] + [(0, 0)] * (x_bt_.ndim - 2)
        x_bt_ = jnp.pad(x_bt_, widths, constant_values=fill)
    b = x_bt_.shape[0]
    return jnp.moveaxis(x_bt_.reshape((b, count, block) + x_bt_.shape[2:]), 1, 0)


def blockwise_causal_attention(q_btnh: jax.Array, k_bskh: jax.Array, v_bskh: jax.Array,
                               segment_ids_bt: jax.Array | None, window: Window,
                               block: int, *, softcap: float = 0.0) -> jax.Array:
    """Causal attention by blocks (see the module docstring); T == S; ``segment_ids_bt`` keep packed
    documents apart (None: one document per row); ``softcap`` > 0 caps the scores."""
    if k_bskh.shape[1] != q_btnh.shape[1]:
        raise ValueError(f"blockwise attention needs as many keys as queries, got "
                         f"{q_btnh.shape[1]} queries and {k_bskh.shape[1]} keys")
    return flash_attention(q_btnh, k_bskh, v_bskh, segment_ids_bt, segment_ids_bt, window, block,
                           softcap=softcap)


def flash_attention(q_btnh: jax.Array, k_bskh: jax.Array, v_bskh: jax.Array,
                    q_segment_ids_bt: jax.Array | None, k_segment_ids_bs: jax.Array | None,
                    window: Window, block: int, q_offset: jax.Array | int = 0, *,
                    softcap: float = 0.0) -> jax.Array:
    """T queries at indices ``q_offset`` .. ``q_offset + T - 1`` of a sequence whose S keys are
    all given (one device's queries under context parallelism; the whole sequence otherwise):
    causal, within ``window``, in the same segment, scores soft-capped at ``softcap`` (0 = off);
    [B, T, N, H]."""
    b, t, n, h = q_btnh.shape
    s, kv = k_bskh.shape[1:3]
    block = min(block, t, s)
    count_q, count_k = -(-t // block), -(-s // block)
    q_ibkgch = _blocks(q_btnh.reshape(b, t, kv, n // kv, h), count_q, block).transpose(0, 1, 3, 4, 2, 5)
    k_jbkch, v_jbkch = (_blocks(x, count_k, block).transpose(0, 1, 3, 2, 4) for x in (k_bskh, v_bskh))
    segments = []
    for ids, length, count in ((q_segment_ids_bt, t, count_q), (k_segment_ids_bs, s, count_k)):
        ids = jnp.zeros((b, length), jnp.int32) if ids is None else ids.astype(jnp.int32)
        segments.append(_blocks(ids, count, block, fill=-1))  # padding: a segment of its own
    geometry = (segments[0], segments[1], jnp.asarray(window, jnp.int32),
                jnp.asarray(q_offset, jnp.int32))
    out_ibkgch = _flash(q_ibkgch, k_jbkch, v_jbkch, geometry, float(softcap))
    out_btnh = out_ibkgch.transpose(1, 0, 4, 2, 3, 5).reshape(b, count_q * block, n, h)
    return out_btnh[:, :t]


# Flash attention's recurrence in plain JAX with its own backward pass (``jax.custom_vjp``): the
# forward keeps only each query's output and log-sum-exp, and the backward recomputes each block
# pair's probabilities, so no [T, T] residual is ever stored -- also inside the scanned layers, where
# differentiating a checkpointed scan over blocks kept every block's scores (measured). Block
# tensors: q [I, B, K, G, c, H] (query block i), k and v [J, B, K, c, H]; ``geometry``: the query
# and key segment ids [I, B, c] and [J, B, c], the window and the first query's index; ``softcap``
# a static float (0 = off).


def _pair_mask(i: jax.Array, j: jax.Array, geometry: tuple, anchor: jax.Array) -> jax.Array:
    """[B, c, c]: which keys of block j each query of block i sees. The optimization barrier ties
    the mask to ``anchor`` (this step's queries): otherwise XLA may hoist the masks, which depend
    only on indices and segments, out of the loops over layers and blocks and keep all of them."""
    seg_q_ibc, seg_k_jbc, window, q_offset = geometry
    seg_q_bc, seg_k_bc, i, j, _ = jax.lax.optimization_barrier(
        (seg_q_ibc[i], seg_k_jbc[j], i, j, anchor))
    block = seg_q_bc.shape[-1]
    idx_c = jnp.arange(block)
    causal_cp = within_window(q_offset + i * block + idx_c[:, None], j * block + idx_c[None, :],
                              window)
    return causal_cp[None] & (seg_q_bc[:, :, None] == seg_k_bc[:, None, :])


def _pair_scores(q_bkgch: jax.Array, k_bkph: jax.Array, softcap: float) -> jax.Array:
    """The scaled, soft-capped scores of a block pair before masking, [B, K, G, c, c] float32."""
    h = q_bkgch.shape[-1]
    return soft_cap(jnp.einsum("bkgch,bkph->bkgcp", q_bkgch, k_bkph,
                               preferred_element_type=jnp.float32) * (h ** -0.5), softcap)


def _masked(scores_bkgcp: jax.Array, mask_bcp: jax.Array) -> jax.Array:
    return jnp.where(mask_bcp[:, None, None], scores_bkgcp, jnp.finfo(jnp.float32).min)


def _over_visible(index: jax.Array, of_query: bool, geometry: tuple, counts: tuple[int, int],
                  block: int, step, init):
    """Folds ``step(carry, other)`` over the blocks that can see each other with block ``index``
    (a ``fori_loop`` with traced bounds: the causal, windowed part of the work only). A query
    block (``of_query``) i: key blocks from the first its window reaches to the one holding its
    last query; a key block j: query blocks from the first holding a query at or after its first
    key to the last whose window reaches it. (A ``lax.cond`` per block pair does the same work, but
    differentiating the layers' scan then keeps every pair's scores: measured.)"""
    _, _, window, q_offset = geometry
    count_q, count_k = counts
    windowed = window > 0
    if of_query:
        first_query = q_offset + index * block
        first = jnp.where(windowed, jnp.maximum(0, (first_query - window + 1) // block), 0)
        lo, hi = first, jnp.minimum(count_k - 1, (first_query + block - 1) // block) + 1
    else:
        last = (index * block + block + window - 2 - q_offset) // block
        lo = jnp.maximum(0, (index * block - q_offset) // block)
        hi = jnp.minimum(count_q - 1, jnp.where(windowed, last, count_q - 1)) + 1
    return jax.lax.fori_loop(lo, hi, lambda other, carry: step(carry, other), init)


def _flash_forward(q_ibkgch, k_jbkch, v_jbkch, geometry, softcap):
    counts, block = (q_ibkgch.shape[0], k_jbkch.shape[0]), q_ibkgch.shape[-2]

    def query_block(args):
        q_bkgch, i = args

        def step(carry, j):
            best, total, acc_bkgch = carry
            mask_bcp = _pair_mask(i, j, geometry, q_bkgch)
            logits_bkgcp = _masked(_pair_scores(q_bkgch, k_jbkch[j], softcap), mask_bcp)
            new_best = jnp.maximum(best, logits_bkgcp.max(axis=-1))
            probs_bkgcp = jnp.where(mask_bcp[:, None, None],
                                    jnp.exp(logits_bkgcp - new_best[..., None]), 0.0)
            rescale = jnp.exp(best - new_best)
            acc_bkgch = acc_bkgch * rescale[..., None] + jnp.einsum(
                "bkgcp,bkph->bkgch", probs_bkgcp.astype(v_jbkch.dtype), v_jbkch[j],
                preferred_element_type=jnp.float32)
            return new_best, total * rescale + probs_bkgcp.sum(axis=-1), acc_bkgch

        shape = q_bkgch.shape[:-1]
        init = (jnp.full(shape, jnp.finfo(jnp.float32).min), jnp.zeros(shape, jnp.float32),
                jnp.zeros(q_bkgch.shape, jnp.float32))
        best, total, acc_bkgch = _over_visible(i, True, geometry, counts, block, step, init)
        total = jnp.where(total > 0, total, 1.0)  # a padding query may see no key: output 0
        return (acc_bkgch / total[..., None]).astype(v_jbkch.dtype), best + jnp.log(total)

    out_ibkgch, lse_ibkgc = jax.lax.map(query_block, (q_ibkgch, jnp.arange(counts[0])))
    return out_ibkgch, (q_ibkgch, k_jbkch, v_jbkch, geometry, out_ibkgch, lse_ibkgc)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q_ibkgch, k_jbkch, v_jbkch, geometry, softcap):
    return _flash_forward(q_ibkgch, k_jbkch, v_jbkch, geometry, softcap)[0]


def _flash_backward(softcap, residuals, dout_ibkgch):
    q_ibkgch, k_jbkch, v_jbkch, geometry, out_ibkgch, lse_ibkgc = residuals
    counts, block, h = (q_ibkgch.shape[0], k_jbkch.shape[0]), q_ibkgch.shape[-2], q_ibkgch.shape[-1]
    scale = h ** -0.5
    dout_ibkgch = dout_ibkgch.astype(jnp.float32)
    delta_ibkgc = jnp.sum(dout_ibkgch * out_ibkgch.astype(jnp.float32), axis=-1)

    def grads_of_pair(i, j):
        """(probs, d scaled scores) of block pair (i, j), [B, K, G, c, c] float32."""
        mask_bcp = _pair_mask(i, j, geometry, dout_ibkgch[i])
        scores_bkgcp = _pair_scores(q_ibkgch[i], k_jbkch[j], softcap)
        probs_bkgcp = jnp.where(mask_bcp[:, None, None],
                                jnp.exp(_masked(scores_bkgcp, mask_bcp) - lse_ibkgc[i][..., None]), 0.0)
        dprobs_bkgcp = jnp.einsum("bkgch,bkph->bkgcp", dout_ibkgch[i], v_jbkch[j],
                                  preferred_element_type=jnp.float32)
        dlogits_bkgcp = probs_bkgcp * (dprobs_bkgcp - delta_ibkgc[i][..., None])
        if softcap:  # through cap * tanh(s / cap): the capped scores give tanh back
            dlogits_bkgcp = dlogits_bkgcp * (1 - jnp.square(scores_bkgcp / softcap))
        return probs_bkgcp, dlogits_bkgcp

    def dq_block(i):
        def step(dq_bkgch, j):
            _, dlogits_bkgcp = grads_of_pair(i, j)
            return dq_bkgch + scale * jnp.einsum("bkgcp,bkph->bkgch", dlogits_bkgcp, k_jbkch[j],
                                                 preferred_element_type=jnp.float32)
        return _over_visible(i, True, geometry, counts, block, step,
                             jnp.zeros(q_ibkgch.shape[1:], jnp.float32))

    def dkv_block(j):
        def step(carry, i):
            dk_bkph, dv_bkph = carry
            probs_bkgcp, dlogits_bkgcp = grads_of_pair(i, j)
            dv_bkph = dv_bkph + jnp.einsum("bkgcp,bkgch->bkph", probs_bkgcp, dout_ibkgch[i])
            dk_bkph = dk_bkph + scale * jnp.einsum("bkgcp,bkgch->bkph", dlogits_bkgcp,
                                                   q_ibkgch[i].astype(jnp.float32))
            return dk_bkph, dv_bkph
        zeros = jnp.zeros(k_jbkch.shape[1:], jnp.float32)
        return _over_visible(j, False, geometry, counts, block, step, (zeros, zeros))

    dq_ibkgch = jax.lax.map(dq_block, jnp.arange(counts[0]))
    dk_jbkch, dv_jbkch = jax.lax.map(dkv_block, jnp.arange(counts[1]))
    no_grads = jax.tree.map(lambda _: None, geometry)
    return (dq_ibkgch.astype(q_ibkgch.dtype), dk_jbkch.astype(k_jbkch.dtype),
            dv_jbkch.astype(v_jbkch.dtype), no_grads)


_flash.defvjp(_flash_forward, _flash_backward)
