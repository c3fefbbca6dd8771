"""A paged key/value cache for serving: fixed-size blocks shared out to sequences by a block table.

A stack's cache is ``(k_lpbkh, v_lpbkh)``: L layers of P physical blocks of BS slots each. A row's
block table ``block_table_bm`` [B, M] lists its physical blocks in order: position s of the row lives
in block ``table[b, s // BS]`` at offset ``s % BS``. Block 0 is scratch: padding tokens (past a row's
``lengths_b``) write there and no row ever reads it as one of its positions. Several rows may list
the same block (a shared prompt prefix, written once, only read after).

One call takes T >= 1 new tokens per row at explicit positions: T = 1 is a decode step, T = C a
chunk of a prompt's prefill. The new keys and values are scattered into their blocks first, then
each query attends over its row's blocks gathered in order, ``key position <= query position``
(and within the layer's window): one path for chunked prefill and decode, whose queries see both
the earlier cache and the tokens of their own chunk. Padding tokens must sit at real positions
(below the model's ``max_seq_len``): a learned position table would give NaN beyond it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

PAGED_CACHE_AXES = ("layers", "kv_blocks", "block", "kv_heads", "head_dim")
SCRATCH_BLOCK = 0  # written by padding tokens, never read as a position of a row


def write_pages(cache_lpbkh: jax.Array, new_btkh: jax.Array, layer: jax.Array | int,
                positions_bt: jax.Array, lengths_b: jax.Array,
                block_table_bm: jax.Array) -> jax.Array:
    """The stack's cache with layer ``layer``'s new keys (or values) ``new_btkh`` scattered to
    their blocks: token t of row b (position p) into block ``table[b, p // BS]`` at offset p % BS
    when t < ``lengths_b[b]``, else into the scratch block. An in-place scatter of B x T x K x H
    values when the cache buffer is donated."""
    block_size = cache_lpbkh.shape[2]
    t = new_btkh.shape[1]
    logical_bt = jnp.clip(positions_bt // block_size, 0, block_table_bm.shape[1] - 1)
    block_bt = jnp.take_along_axis(block_table_bm, logical_bt, axis=1)
    real_bt = jnp.arange(t)[None, :] < lengths_b[:, None]
    block_bt = jnp.where(real_bt, block_bt, SCRATCH_BLOCK)
    return cache_lpbkh.at[layer, block_bt, positions_bt % block_size].set(
        new_btkh.astype(cache_lpbkh.dtype))


def gather_pages(cache_pbkh: jax.Array, block_table_bm: jax.Array) -> jax.Array:
    """One layer's blocks of each row in table order, [B, M * BS, K, H]: slot s holds position s."""
    b, m = block_table_bm.shape
    return cache_pbkh[block_table_bm].reshape(b, m * cache_pbkh.shape[1], *cache_pbkh.shape[2:])
