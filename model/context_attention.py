"""Causal attention under context parallelism: the sequence is split over the devices that the
active mesh gives the ``length`` axis; each device keeps its own T/C queries and attends to all T
keys and values, all-gathered at the boundary of a ``shard_map`` region (``sharding/manual.py``;
the backward pass reduce-scatters their gradients). Gathering, unlike ring attention, composes with
any per-device kernel; here the local queries run in blocks against the gathered keys.

Work balance: with contiguous chunks every device computes all of its T/C x T scores, masked ones
included (the keys a device's queries can see end at a different place on each device, and a shard
must have one static shape), so no device idles, but the mesh does twice the causal minimum (T^2
scores in all against T^2 / 2). Measured on this CPU at T = 4096 (B 1, N = K = 4, H 32, block 128,
forward and backward): this computation on one device took 1,250 ms against 476 ms for the causal
blockwise kernel, which skips the masked key blocks; a load-balanced (zigzag) order, an early and a
late chunk per device with masked blocks skipped, would cut each device's attention time by up to
that 2.6x. Attention is about 35% of llama3_8b's training FLOPs at 32k tokens and 68% at 128k, so
it would be worth up to 1.3x and 1.7x a step there (little at 8k); it needs the sequence reordered.
With a sliding window known at trace time, each block reads only the ``block + window - 1`` keys it
can reach, so local layers cost O(T/C x window) per device.

Queries are processed ``block`` rows at a time in a ``lax.scan`` (compile time flat in T/block)
whose body is ``jax.checkpoint``-ed: the backward pass recomputes one block's scores at a time, so
memory grows linearly in T (one [B, N, block, T] score block, plus the gathered keys and values).
Outside an ``activation_sharding`` block it is the same computation on the global arrays.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from model.masks import Window, within_window
from sharding.constrain import shards
from sharding.manual import Collectives, manual

Q_NAMES = ("batch", "length", "heads", "head_dim")


def context_attention(q_btnh: jax.Array, k_btkh: jax.Array, v_btkh: jax.Array,
                      segment_ids_bt: jax.Array | None, window: Window, *, block: int) -> jax.Array:
    """softmax(q k^T / sqrt(H) + mask) v, [B, T, N, H], with T split over the ``length`` mesh axes:
    causal self-attention (T queries over the same T keys), query head n on key/value head
    n // (N / K), scores and softmax in float32. ``segment_ids_bt`` keep packed documents apart
    (None: one per row); ``window`` (an int or a traced int32 scalar; 0 = none): a query at t sees
    the keys s with t - window < s <= t."""
    b, t, n, h = q_btnh.shape
    k = k_btkh.shape[2]
    kv_names: tuple[str | None, ...] = ("batch", None, "kv_heads", "head_dim")
    if shards("heads", n) != shards("kv_heads", k):  # a device needs its query heads' kv heads
        k_btkh, v_btkh = (jnp.repeat(x, n // k, axis=2) for x in (k_btkh, v_btkh))
        kv_names = ("batch", None, "heads", "head_dim")
    args = [q_btnh, jnp.arange(t, dtype=jnp.int32), k_btkh, v_btkh]
    names: list[tuple[str | None, ...]] = [Q_NAMES, ("length",), kv_names, kv_names]
    if segment_ids_bt is not None:  # the queries' ids split like them, the keys' ids gathered
        args += [segment_ids_bt, segment_ids_bt]
        names += [("batch", "length"), ("batch", None)]
    static = isinstance(window, int)
    if not static:
        args.append(jnp.asarray(window, jnp.int32))
        names.append(())
    fn = functools.partial(_local_attention, packed=segment_ids_bt is not None,
                           window=window if static else None, block=block)
    return manual(fn, args, names, Q_NAMES)


def _local_attention(comm: Collectives, q_bcnh: jax.Array, qpos_c: jax.Array, k_bskh: jax.Array,
                     v_bskh: jax.Array, *rest: jax.Array, packed: bool, window: int | None,
                     block: int) -> jax.Array:
    """One device's c queries (global indices ``qpos_c``) over all S keys; ``rest``: the queries'
    and keys' segment ids when ``packed``, then the window when it is traced (``window`` None)."""
    del comm  # no collective inside: the keys and values arrive gathered
    qseg_bc, kseg_bs = rest[:2] if packed else (None, None)
    win = rest[-1] if window is None else window
    b, c, n, h = q_bcnh.shape
    s, k = k_bskh.shape[1:3]
    q_bkgch = q_bcnh.reshape(b, c, k, n // k, h).transpose(0, 2, 3, 1, 4)
    k_bksh, v_bksh = k_bskh.transpose(0, 2, 1, 3), v_bskh.transpose(0, 2, 1, 3)
    block = min(block, c)
    span = min(s, block + window - 1) if window else s

    def attend(q_bkgrh, qpos_r, qseg_br):
        return _block_attention(q_bkgrh, qpos_r, qseg_br, k_bksh, v_bksh, kseg_bs, win, span)

    attend = jax.checkpoint(attend)
    full, tail = divmod(c, block)
    outs = []
    if full:
        xs = (_row_blocks(q_bkgch, 3, full, block), _row_blocks(qpos_c, 0, full, block),
              None if qseg_bc is None else _row_blocks(qseg_bc, 1, full, block))
        _, out_fbkgrh = jax.lax.scan(lambda carry, x: (carry, attend(*x)), None, xs)
        outs.append(jnp.moveaxis(out_fbkgrh, 0, 3).reshape(b, k, n // k, full * block, h))
    if tail:
        rows = slice(full * block, c)
        outs.append(attend(q_bkgch[:, :, :, rows], qpos_c[rows],
                           None if qseg_bc is None else qseg_bc[:, rows]))
    out_bkgch = jnp.concatenate(outs, axis=3) if len(outs) > 1 else outs[0]
    return out_bkgch.transpose(0, 3, 1, 2, 4).reshape(b, c, n, h)


def _row_blocks(x: jax.Array, axis: int, count: int, block: int) -> jax.Array:
    """The first ``count * block`` rows of ``x`` along ``axis`` as ``count`` blocks, leading."""
    x = jax.lax.slice_in_dim(x, 0, count * block, axis=axis)
    return jnp.moveaxis(x.reshape(x.shape[:axis] + (count, block) + x.shape[axis + 1:]), axis, 0)


def _block_attention(q_bkgrh: jax.Array, qpos_r: jax.Array, qseg_br: jax.Array | None,
                     k_bksh: jax.Array, v_bksh: jax.Array, kseg_bs: jax.Array | None, window: Window,
                     span: int) -> jax.Array:
    """One block of r contiguous queries [B, K, G, r, H] over the ``span`` keys that can be visible
    to them (all S, or with a static window the last ``span`` up to the block's end); the mask is
    built here from global indices, so no T x T array exists and the backward pass rebuilds it."""
    s, h = k_bksh.shape[2], q_bkgrh.shape[-1]
    start = 0
    if span < s:  # a window known at trace time: the keys from the first query's window on
        start = jnp.clip(qpos_r[0] - window + 1, 0, s - span)
        k_bksh, v_bksh = (jax.lax.dynamic_slice_in_dim(x, start, span, axis=2) for x in (k_bksh, v_bksh))
        if kseg_bs is not None:
            kseg_bs = jax.lax.dynamic_slice_in_dim(kseg_bs, start, span, axis=1)
    kpos_p = start + jnp.arange(span, dtype=jnp.int32)
    mask_brp = within_window(qpos_r[:, None], kpos_p[None, :], window)[None]
    if qseg_br is not None:
        mask_brp = mask_brp & (qseg_br[:, :, None] == kseg_bs[:, None, :])
    logits_bkgrp = jnp.einsum("bkgrh,bkph->bkgrp", q_bkgrh, k_bksh,
                              preferred_element_type=jnp.float32) * (h ** -0.5)
    logits_bkgrp = jnp.where(mask_brp[:, None, None], logits_bkgrp, jnp.finfo(jnp.float32).min)
    probs_bkgrp = jax.nn.softmax(logits_bkgrp, axis=-1)
    return jnp.einsum("bkgrp,bkph->bkgrh", probs_bkgrp.astype(v_bksh.dtype), v_bksh)
