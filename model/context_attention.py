"""Causal attention under context parallelism: the sequence is split over the devices that the
active mesh gives the ``length`` axis; each device keeps its own T/C queries and attends to all T
keys and values, all-gathered at the boundary of a ``shard_map`` region (``sharding/manual.py``;
the backward pass reduce-scatters their gradients). Gathering, unlike ring attention, composes with
any per-device kernel; here the local queries run in blocks against the gathered keys.

Per device the local queries run through the blockwise kernel's flash recurrence
(model/attention_kernels.py: flash_attention) at their offset in the sequence: only the key blocks
a query block can see are computed (the causal part, and within a sliding window), and its own
backward pass keeps memory linear in T. Work balance: with contiguous chunks the device holding
the last chunk computes about 2C - 1 times the first one's scores (the mesh in all does the causal minimum,
T^2 / 2), so the earlier devices wait for it at the next collective; a load-balanced (zigzag)
order -- an early and a late chunk per device -- would even it out and needs the sequence
reordered; not built. Outside an ``activation_sharding`` block it is the same computation on the
global arrays.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from model.attention_kernels import flash_attention
from model.masks import Window
from sharding.constrain import shards
from sharding.manual import Collectives, manual

Q_NAMES = ("batch", "length", "heads", "head_dim")


def context_attention(q_btnh: jax.Array, k_btkh: jax.Array, v_btkh: jax.Array,
                      segment_ids_bt: jax.Array | None, window: Window, *, block: int,
                      softcap: float = 0.0) -> jax.Array:
    """softmax(soft_cap(q k^T / sqrt(H)) + mask) v, [B, T, N, H], with T split over the ``length``
    mesh axes: causal self-attention (T queries over the same T keys), query head n on key/value
    head n // (N / K), scores and softmax in float32; ``softcap``: cap * tanh(s / cap), 0 = off.
    ``segment_ids_bt`` keep packed documents apart (None: one per row); ``window`` (an int or a
    traced int32 scalar; 0 = none): a query at t sees the keys s with t - window < s <= t."""
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
                           window=window if static else None, block=block, softcap=softcap)
    # The flash kernel's loops start from fresh zeros that then meet this device's queries, which
    # shard_map's varying-axes check refuses; its outputs are per device by construction.
    return manual(fn, args, names, Q_NAMES, check_vma=False)


def _local_attention(comm: Collectives, q_bcnh: jax.Array, qpos_c: jax.Array, k_bskh: jax.Array,
                     v_bskh: jax.Array, *rest: jax.Array, packed: bool, window: int | None,
                     block: int, softcap: float) -> jax.Array:
    """One device's c queries (global indices ``qpos_c``, contiguous) over all S keys; ``rest``:
    the queries' and keys' segment ids when ``packed``, then the window when it is traced
    (``window`` None)."""
    del comm  # no collective inside: the keys and values arrive gathered
    qseg_bc, kseg_bs = rest[:2] if packed else (None, None)
    win = rest[-1] if window is None else window
    return flash_attention(q_bcnh, k_bskh, v_bskh, qseg_bc, kseg_bs, win, block,
                           q_offset=qpos_c[0], softcap=softcap)
