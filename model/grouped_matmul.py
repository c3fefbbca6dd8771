"""Grouped matmuls for the dropless MoE path: rows sorted by expert, each group of rows times its own
expert's weight. ``ragged_dot`` is XLA's op (native on GPU); ``megablox`` is the Pallas TPU kernel
(``jax.experimental.pallas.ops.tpu.megablox.gmm``, gradients through its custom VJP: ``gmm`` for the
rows, ``tgmm`` for the weights), run in Pallas interpret mode when the target is not a TPU;
``tiled`` (CPU) pads each group to whole tiles of rows and multiplies every tile by its group's
weight in one batched matmul (``tile_layout``, ``tiled_matmul``). XLA:CPU runs ``ragged_dot`` as a
dense matmul of every row with every group's weight, masked (``num_experts`` times the work: 50x
slower than ``tiled`` with 64 experts, bench.moe).
"""

from __future__ import annotations

from typing import NamedTuple

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
    """``ragged_dot``, ``megablox`` or ``tiled`` for ``ModelConfig.moe_matmul``: auto = what the
    traced program's platform (``target_platform``) runs best: megablox on a TPU, ragged_dot on a
    GPU, tiled on a CPU."""
    if moe_matmul == "auto":
        return {"tpu": "megablox", "gpu": "ragged_dot"}.get(target_platform(), "tiled")
    return moe_matmul


class TileLayout(NamedTuple):
    """Rows sorted by group laid out in ``tiles`` tiles of ``tile`` rows, each group starting a new
    tile: ``slot_a`` [A] is each row's place among the ``tiles * tile`` padded rows (``tiles * tile``,
    out of range, for a row past all groups), ``source_p`` [P] the row each place holds (A, out of
    range, for padding) and ``group_n`` [tiles] each tile's group (the last group for unused tiles,
    which hold padding only)."""

    slot_a: jax.Array
    source_p: jax.Array
    group_n: jax.Array
    tile: int


def row_tile(rows: int, groups: int) -> int:
    """Rows per tile of the ``tiled`` matmul: a power of two from 8 to 128, at most rows / (2 groups),
    so that the padding (under one tile per group) stays within about half the rows while tiles
    hold enough rows for an efficient batched matmul."""
    tile = 8
    while 2 * tile <= min(128, rows // (2 * groups)):
        tile *= 2
    return tile


def tile_layout(group_sizes_e: jax.Array, rows: int, tile: int) -> TileLayout:
    """The ``TileLayout`` of ``rows`` rows in groups of ``group_sizes_e`` (summing to at most rows).
    Groups of sizes s_e take sum_e ceil(s_e / tile) <= rows // tile + E tiles: that static bound
    is the number of tiles."""
    groups = group_sizes_e.shape[0]
    tiles = rows // tile + groups
    tiles_e = (group_sizes_e + tile - 1) // tile
    tile_end_e = jnp.cumsum(tiles_e)
    group_end_e = jnp.cumsum(group_sizes_e)
    row_a = jnp.arange(rows, dtype=group_sizes_e.dtype)
    group_a = jnp.searchsorted(group_end_e, row_a, side="right")
    last_a = jnp.minimum(group_a, groups - 1)
    offset_a = row_a - (group_end_e - group_sizes_e)[last_a]
    slot_a = jnp.where(group_a < groups, (tile_end_e - tiles_e)[last_a] * tile + offset_a,
                       tiles * tile)
    source_p = jnp.full((tiles * tile,), rows, row_a.dtype).at[slot_a].set(row_a, mode="drop",
                                                                             unique_indices=True)
    tile_n = jnp.arange(tiles, dtype=group_sizes_e.dtype)
    group_n = jnp.minimum(jnp.searchsorted(tile_end_e, tile_n, side="right"), groups - 1)
    return TileLayout(slot_a, source_p, group_n, tile)


def tiled_matmul(x_ntd: jax.Array, w_edf: jax.Array, group_n: jax.Array) -> jax.Array:
    """[N, tile, F]: each tile of rows times its group's weight (``TileLayout.group_n``)."""
    return jnp.einsum("ntd,ndf->ntf", x_ntd, w_edf[group_n])


def to_tiles(x_ad: jax.Array, layout: TileLayout) -> jax.Array:
    """[N, tile, D]: the rows of ``x_ad`` (sorted by group) at their places, zeros in the padding."""
    x_pd = x_ad.at[layout.source_p].get(mode="fill", fill_value=0)
    return x_pd.reshape(-1, layout.tile, x_ad.shape[-1])


def from_tiles(y_ntf: jax.Array, layout: TileLayout) -> jax.Array:
    """[A, F]: each row's output back in row order (zeros for rows past all groups)."""
    return y_ntf.reshape(-1, y_ntf.shape[-1]).at[layout.slot_a].get(mode="fill", fill_value=0)


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
    the next ``group_sizes_e[e]`` rows, and rows past all groups are zero. ``impl`` is ragged_dot,
    megablox or tiled (``resolve_matmul``); the output has the inputs' dtype either way."""
    if impl == "ragged_dot":
        return jax.lax.ragged_dot(x_ad, w_edf, group_sizes_e)
    if impl == "tiled":
        rows = x_ad.shape[0]
        layout = tile_layout(group_sizes_e, rows, row_tile(rows, w_edf.shape[0]))
        return from_tiles(tiled_matmul(to_tiles(x_ad, layout), w_edf, layout.group_n), layout)
    if impl == "megablox":
        return megablox_gmm(x_ad, w_edf, group_sizes_e.astype(jnp.int32),
                            interpret=target_platform() != "tpu")
    raise ValueError(f"grouped_matmul: impl must be ragged_dot, megablox or tiled, got {impl!r}")
