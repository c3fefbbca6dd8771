"""Grouped matmuls for the dropless MoE path: rows sorted by expert, each group of rows times its own
expert's weight. ``ragged_dot`` is XLA's op (CPU, GPU); ``megablox`` is the Pallas TPU kernel
(``jax.experimental.pallas.ops.tpu.megablox.gmm``, gradients through its custom VJP: ``gmm`` for the
rows, ``tgmm`` for the weights), run in Pallas interpret mode when the target is not a TPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import megablox

from sharding.constrain import target_platform

# Tile sizes are multiples of 128 (so that every block is valid on a TPU whichever operand it cuts:
# the backward pass reuses one tiling with the roles of K and N swapped) and at most 512 (MaxText's
# row tile): in float32 the forward's double-buffered blocks and accumulator take about 7 MiB of
# VMEM, under v5e's 16 MiB scoped default.
LANE = 128
MAX_TILE = 512


def resolve_matmul(moe_matmul: str) -> str:
    """``ragged_dot`` or ``megablox`` for ``ModelConfig.moe_matmul``: auto = megablox when the
    traced program is for a TPU (``target_platform``), else ragged_dot."""
    if moe_matmul == "auto":
        return "megablox" if target_platform() == "tpu" else "ragged_dot"
    return moe_matmul


def _tile(size: int) -> int:
    return min(MAX_TILE, -(-size // LANE) * LANE)


def gmm_tiling(m: int, k: int, n: int) -> tuple[int, int, int]:
    """(rows, contracted, output) tile sizes for ``megablox.gmm`` on [m, k] x [G, k, n]; the rows
    are padded to a multiple of the first."""
    return _tile(m), _tile(k), _tile(n)


def megablox_gmm(x_ad: jax.Array, w_edf: jax.Array, group_sizes_e: jax.Array,
                 interpret: bool) -> jax.Array:
    """``gmm`` on rows padded to a multiple of the row tile. Rows past the groups (the padding,
    and unrouted rows at the end) are zero in and out: the kernel leaves them unwritten, and its
    row gradient there too, so both are masked."""
    a, d = x_ad.shape
    tiling = gmm_tiling(a, d, w_edf.shape[-1])
    rows_p = -(-a // tiling[0]) * tiling[0]
    valid_a1 = (jnp.arange(a) < jnp.sum(group_sizes_e))[:, None]
    x_pd = jnp.pad(jnp.where(valid_a1, x_ad, 0), ((0, rows_p - a), (0, 0)))
    y_pf = megablox.gmm(x_pd, w_edf, group_sizes_e, x_ad.dtype, tiling, None, None, False, interpret)
    return jnp.where(valid_a1, y_pf[:a], 0)


def grouped_matmul(x_ad: jax.Array, w_edf: jax.Array, group_sizes_e: jax.Array,
                   impl: str) -> jax.Array:
    """[A, F]: rows of ``x_ad`` (sorted by group) times their group's [D, F] weight; group e holds
    the next ``group_sizes_e[e]`` rows, and rows past all groups are zero. ``impl`` is ragged_dot
    or megablox (``resolve_matmul``); the output has the inputs' dtype either way."""
    if impl == "ragged_dot":
        return jax.lax.ragged_dot(x_ad, w_edf, group_sizes_e)
    if impl == "megablox":
        return megablox_gmm(x_ad, w_edf, group_sizes_e.astype(jnp.int32),
                            interpret=target_platform() != "tpu")
    raise ValueError(f"grouped_matmul: impl must be ragged_dot or megablox, got {impl!r}")
