"""Attention masks, built by each kernel from what it needs (never one [B, T, T] array for the whole
model): causal over token indices, packed segments kept apart, and a sliding window.

``window`` is a Python int or a traced int32 scalar (a layer's window inside the scanned stack, where
local and global layers alternate); 0 means no window. A query at index t sees the keys s with
t - window < s <= t: a window of ``window`` tokens, itself included.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Window = int | jax.Array


def within_window(q_index: jax.Array, k_index: jax.Array, window: Window) -> jax.Array:
    """Whether each (query, key) pair of broadcast index arrays is causal and within ``window``."""
    causal = k_index <= q_index
    if isinstance(window, int):
        return causal if window == 0 else causal & (q_index - k_index < window)
    return causal & ((window <= 0) | (q_index - k_index < window))


def causal_mask(segment_ids_bt: jax.Array | None, batch: int, length: int,
                window: Window = 0) -> jax.Array:
    """[B, T, T] boolean mask: key s visible to query t iff s <= t, both are in one segment and
    s is within the window."""
    idx = jnp.arange(length)
    mask_tt = within_window(idx[:, None], idx[None, :], window)
    if segment_ids_bt is None:
        return jnp.broadcast_to(mask_tt, (batch, length, length))
    same_bts = segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :]
    return mask_tt[None] & same_bts


def cache_slot_positions(positions_bt: jax.Array, slots: int) -> jax.Array:
    """[B, T, S]: the position each of a cache's S slots holds when a query at ``positions_bt``
    reads it. A token at position p is written to slot p % S (a rolling cache when S is smaller
    than the context; the identity otherwise), so slot s holds the latest position <= p congruent
    to s; negative means never written."""
    slot_s = jnp.arange(slots)[None, None, :]
    pos = positions_bt[:, :, None]
    return pos - (pos - slot_s) % slots


def cache_mask(positions_bt: jax.Array, slots: int, window: Window = 0) -> jax.Array:
    """[B, T, S] mask of queries at ``positions_bt`` over a cache of ``slots`` slots: the slots
    holding positions at or before each query (and within the window)."""
    held_bts = cache_slot_positions(positions_bt, slots)
    return (held_bts >= 0) & within_window(positions_bt[:, :, None], held_bts, window)


def paged_mask(positions_bt: jax.Array, slots: int, window: Window = 0) -> jax.Array:
    """[B, T, S] mask of queries at ``positions_bt`` over a row's gathered pages (slot s holds
    position s, model/paged_attention.py): the positions at or before each query (and within the
    window). Slots past a row's length hold other data (scratch, stale blocks) and stay hidden."""
    return within_window(positions_bt[:, :, None], jnp.arange(slots)[None, None, :], window)
