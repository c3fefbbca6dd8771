"""Causal self-attention through JAX's Pallas TPU splash-attention kernel
(``jax.experimental.pallas.ops.tpu.splash_attention``): packed segments, grouped-query heads and a
sliding window, forward and backward (the kernel's custom VJP); Pallas interpret mode off TPU.

A Pallas call cannot be partitioned by GSPMD, so the kernel runs per device inside
``sharding.manual``: rows split by ``batch``, heads by ``heads``/``kv_heads``, and queries by
``length`` (context parallelism: each device keeps its T/C queries, the keys and values are
all-gathered at the region's boundary and their gradients reduce-scattered, as MaxText does).

The kernel skips key blocks its static mask hides. That block map ("mask info") is built with NumPy
at trace time, block by block; ``_CausalBand`` classifies whole blocks from their diagonal offsets
instead of evaluating every element (at T=131072 with 512-blocks: about 113 s -> a few seconds).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash_lib
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

from sharding.constrain import active, shards, target_platform
from sharding.manual import Collectives, manual
from sharding.rules import logical_to_spec

LANES = 128  # the kernel tiles the sequence in multiples of the TPU's 128 lanes
BLOCKS = (512, 256, 128)  # query and key block sizes tried, largest first (MaxText's default: 512)
Q_NAMES = ("batch", "length", "heads", None)
KV_NAMES = ("batch", None, "kv_heads", None)


def splash_problems(seq_len: int) -> list[str]:
    """What keeps the kernel from taking ``seq_len`` queries (each device's share of them, under
    context parallelism): [] when it can. Any head_dim compiles (8 to 256 checked by AOT compiles
    for TPU v5e/v5p); below 128 the kernel pads heads to 128 lanes, wasting MXU work."""
    if seq_len % LANES:
        return [f"splash attention needs a sequence length that is a multiple of {LANES}, "
                f"got {seq_len}"]
    return []


def block_size(seq_len: int) -> int:
    """The kernel's query and key block: the largest of BLOCKS that divides ``seq_len``."""
    for block in BLOCKS:
        if seq_len % block == 0:
            return block
    raise ValueError(f"splash attention: no block size {BLOCKS} divides the sequence length {seq_len}")


class _CausalBand(mask_lib.LocalMask):
    """Splash's LocalMask for causal attention within ``window`` tokens (0: no window), whose blocks
    that are wholly visible or wholly hidden are classified without evaluating each element: the
    mask depends only on q - kv, visible iff 0 <= q - kv <= hi. The kernel still evaluates the
    inherited mask function inside partially visible blocks."""

    def __init__(self, length: int, window: int):
        super().__init__((length, length), (window - 1 if window else None, 0), 0)
        self._hi = window - 1 if window else length
        self._uniform: dict[tuple[bool, int, int], np.ndarray] = {}

    def __getitem__(self, idx) -> np.ndarray:
        if len(idx) != 2 or not all(isinstance(s, slice) for s in idx):
            return super().__getitem__(idx)
        (q0, q1, _), (k0, k1, _) = (s.indices(n) for s, n in zip(idx, self.shape, strict=True))
        low, high = q0 - (k1 - 1), (q1 - 1) - k0  # the range of q - kv over the block
        if 0 <= low and high <= self._hi:
            return self._filled(True, q1 - q0, k1 - k0)
        if high < 0 or low > self._hi:
            return self._filled(False, q1 - q0, k1 - k0)
        return super().__getitem__(idx)

    def _filled(self, value: bool, rows: int, cols: int) -> np.ndarray:
        key = (value, rows, cols)
        if key not in self._uniform:
            block = np.full((rows, cols), value)
            block.flags.writeable = False
            self._uniform[key] = block
        return self._uniform[key]


def make_kernel(seq_len: int, window: int, block: int, q_shards: int = 1,
                interpret: bool = False, softcap: float = 0.0) -> splash_lib.SplashAttentionKernel:
    """The splash kernel for causal attention over ``seq_len`` tokens (within ``window``, 0 = off),
    square blocks of ``block``, queries split in ``q_shards`` contiguous parts, scores soft-capped
    at ``softcap`` (0 = off; the kernel's ``attn_logits_soft_cap``). One mask serves every head
    (the kernel broadcasts a one-head mask info), so the kernel fits any head count."""
    sizes = splash_lib.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
        block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    mask = mask_lib.MultiHeadMask((_CausalBand(seq_len, window),))
    return splash_lib.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=q_shards,
                                      interpret=interpret, attn_logits_soft_cap=softcap or None)


def splash_attention(q_btnh: jax.Array, k_bskh: jax.Array, v_bskh: jax.Array,
                     segment_ids_bt: jax.Array | None, window: int, *,
                     interpret: bool | None = None, softcap: float = 0.0) -> jax.Array:
    """softmax(soft_cap(q k^T / sqrt(H)) + mask) v, [B, T, N, H] in v's dtype (``softcap``:
    cap * tanh(s / cap), 0 = off): causal self-attention (S == T),
    query head n on key/value head n // (N / K), scores and softmax in float32 (inside the kernel).
    ``segment_ids_bt`` (None: one segment per row) keep packed documents apart; ``window`` (a
    Python int, 0 = off): a query at t sees the keys t - window < s <= t. ``interpret``: Pallas
    interpret mode; None = unless the program is compiled for TPU."""
    b, t, n, h = q_btnh.shape
    k = k_bskh.shape[2]
    if not isinstance(window, int) or window < 0:
        raise TypeError(f"splash attention needs a static window (an int >= 0), got {window!r}")
    if k_bskh.shape[1] != t or n % k:
        raise ValueError(f"splash attention needs T == S and N a multiple of K, got q {q_btnh.shape} "
                         f"and k {k_bskh.shape}")
    q_shards = shards("length", t)
    if problems := splash_problems(t // q_shards):
        raise ValueError(problems[0] + (f" (T={t} over {q_shards} context shards)" if q_shards > 1 else ""))
    if interpret is None:
        interpret = target_platform() != "tpu"
    kernel = make_kernel(t, window, block_size(t // q_shards), q_shards, interpret, softcap)
    kv_names = KV_NAMES
    if not _heads_aligned(q_btnh, k_bskh):  # a device must hold its query heads' kv heads
        k_bskh, v_bskh = (jnp.repeat(x, n // k, axis=2) for x in (k_bskh, v_bskh))
        kv_names = ("batch", None, "heads", None)
    mask_arrays, treedef = jax.tree.flatten(kernel)
    args = [q_btnh, k_bskh, v_bskh, *mask_arrays]
    # mask info: [heads, query blocks, key blocks] split by query block; q_sequence: [T] positions
    names = [Q_NAMES, kv_names, kv_names] + [(None, "length", None) if a.ndim == 3 else ("length",)
                                             for a in mask_arrays]
    if segment_ids_bt is not None:  # the queries' ids split like them, the keys' ids gathered
        args += [segment_ids_bt, segment_ids_bt]
        names += [("batch", "length"), ("batch", None)]
    fn = functools.partial(_local_splash, treedef=treedef, mask_count=len(mask_arrays))
    return manual(fn, args, names, Q_NAMES, check_vma=False)


def _heads_aligned(q_btnh: jax.Array, k_bskh: jax.Array) -> bool:
    """Whether the active mesh splits the query heads and the kv heads over the same mesh axes (then
    each device's query heads use only its own kv heads: groups are consecutive)."""
    context = active()
    if context is None:
        return True
    mesh, rules = context
    q_spec = logical_to_spec(Q_NAMES, q_btnh.shape, mesh, rules)
    k_spec = logical_to_spec(KV_NAMES, k_bskh.shape, mesh, rules)
    return (q_spec[2] if len(q_spec) > 2 else None) == (k_spec[2] if len(k_spec) > 2 else None)


def _local_splash(comm: Collectives, q_btnh: jax.Array, k_bskh: jax.Array, v_bskh: jax.Array,
                  *rest: jax.Array, treedef, mask_count: int) -> jax.Array:
    """One device's rows, heads and queries over all keys; ``rest``: the kernel's mask arrays, then
    the queries' and the keys' segment ids when the rows are packed."""
    del comm  # no collective inside: the keys and values arrive gathered
    kernel = jax.tree.unflatten(treedef, rest[:mask_count])
    segments = rest[mask_count:]
    h = q_btnh.shape[-1]
    dt = q_btnh.dtype
    # the kernel takes scaled queries; one rounding to the compute dtype, as q k^T / sqrt(H) would do
    q_bnth = (q_btnh.astype(jnp.float32) * h ** -0.5).astype(dt).transpose(0, 2, 1, 3)
    k_bksh, v_bksh = (x.astype(dt).transpose(0, 2, 1, 3) for x in (k_bskh, v_bskh))
    if segments:
        def one_row(q_nth, k_ksh, v_ksh, qseg_t, kseg_s):
            return kernel(q_nth, k_ksh, v_ksh, segment_ids=splash_lib.SegmentIds(qseg_t, kseg_s))
        out_bnth = jax.vmap(one_row)(q_bnth, k_bksh, v_bksh, *segments)
    else:
        out_bnth = jax.vmap(kernel)(q_bnth, k_bksh, v_bksh)
    return out_bnth.transpose(0, 2, 1, 3).astype(v_bskh.dtype)
