"""Host-side bookkeeping of the paged KV cache (model/paged_attention.py): which physical blocks each
sequence holds, a free list, reference counts, and prefix reuse. Pure Python, no JAX.

Prefix reuse: a full block of a prompt is keyed by a digest of (its parent block's key, its token
ids), so a key names the whole prefix up to the block's end. Once a sequence has written a full
prompt block it registers it; a later sequence whose prompt starts with registered blocks holds them
too (a reference each) and skips prefilling them. A block whose last holder finishes goes back to
the free list, or, when it is registered, to an LRU of cached blocks: still reusable until its space
is needed (the least recently freed is taken first, a prompt's tail before its head).

Hand-written: the dependencies hold no paged-cache manager (vLLM's lives in its own torch runtime).
"""

from __future__ import annotations

import collections
import hashlib
import math
from array import array
from collections.abc import Hashable, Sequence

from model.paged_attention import SCRATCH_BLOCK


def block_keys(tokens: Sequence[int], block_size: int) -> list[bytes]:
    """The prefix keys of the full blocks of ``tokens``: key i names tokens[: (i + 1) * BS]."""
    keys, parent = [], b""
    for start in range(0, len(tokens) - block_size + 1, block_size):
        ids = array("q", (int(t) for t in tokens[start:start + block_size])).tobytes()
        parent = hashlib.blake2b(parent + ids, digest_size=16).digest()
        keys.append(parent)
    return keys


class BlockManager:
    """Physical blocks 1..num_blocks-1 (block 0 is the scratch block) shared out to sequences."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 2 or block_size < 1:
            raise ValueError(f"a paged cache needs >= 2 blocks of >= 1 slot, got {num_blocks} of "
                             f"{block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free = collections.deque(b for b in range(num_blocks) if b != SCRATCH_BLOCK)
        self._refs = [0] * num_blocks
        self._key_of: dict[int, bytes] = {}  # registered block -> its prefix key
        self._block_of: dict[bytes, int] = {}
        self._cached: collections.OrderedDict[int, None] = collections.OrderedDict()  # LRU first
        self._tables: dict[Hashable, list[int]] = {}
        self.reused_blocks = 0  # blocks a sequence took from the prefix cache, over the lifetime

    # --------------------------------------------------------------------------------- counts

    @property
    def usable(self) -> int:
        """Blocks a sequence may hold (all but the scratch block)."""
        return self.num_blocks - 1

    @property
    def in_use(self) -> int:
        """Blocks some sequence holds."""
        return self.usable - len(self._free) - len(self._cached)

    @property
    def cached(self) -> int:
        """Blocks nobody holds that still serve as a cached prefix."""
        return len(self._cached)

    def blocks_for(self, tokens: int) -> int:
        """Blocks holding ``tokens`` positions."""
        return math.ceil(tokens / self.block_size)

    def table(self, seq: Hashable) -> list[int]:
        """The physical blocks of ``seq``, in position order."""
        return self._tables[seq]

    # --------------------------------------------------------------------------- sequences

    def cached_prefix(self, prompt: Sequence[int]) -> list[int]:
        """The registered blocks that ``prompt`` starts with. At most (len - 1) // BS: the prompt's
        last token is always computed (its logits give the first new token), in a block of its own
        sequence, so no sequence ever writes to a shared block."""
        blocks = []
        for key in block_keys(prompt[: len(prompt) - 1], self.block_size):
            block = self._block_of.get(key)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def allocate(self, seq: Hashable, prompt: Sequence[int], positions: int) -> int | None:
        """Blocks for ``positions`` positions of ``seq`` (prompt and generated tokens), the first
        ones shared from the prefix cache: the number of prompt tokens they already hold, or None
        (nothing taken) when too few blocks are free."""
        if seq in self._tables:
            raise ValueError(f"sequence {seq!r} already holds blocks")
        shared = self.cached_prefix(prompt)
        fresh = self.blocks_for(positions) - len(shared)
        available = len(self._free) + len(self._cached) - sum(b in self._cached for b in shared)
        if fresh > available:
            return None
        for block in shared:
            self._cached.pop(block, None)
            self._refs[block] += 1
        table = shared + [self._take() for _ in range(fresh)]
        for block in table[len(shared):]:
            self._refs[block] = 1
        self._tables[seq] = table
        self.reused_blocks += len(shared)
        return len(shared) * self.block_size

    def register(self, seq: Hashable, prompt: Sequence[int], computed: int) -> None:
        """Marks the full blocks among the first ``computed`` prompt tokens of ``seq`` (their keys
        and values written) as a cached prefix. A prefix already registered by another block keeps
        that block."""
        table = self._tables[seq]
        for index, key in enumerate(block_keys(prompt[:computed], self.block_size)):
            block = table[index]
            if key not in self._block_of and block not in self._key_of:
                self._block_of[key], self._key_of[block] = block, key

    def free(self, seq: Hashable) -> None:
        """Drops ``seq``'s hold on its blocks; a block nobody holds is free again (registered ones
        stay cached until their space is needed)."""
        for block in reversed(self._tables.pop(seq)):  # the tail enters the LRU first: evicted first
            self._refs[block] -= 1
            if self._refs[block]:
                continue
            if block in self._key_of:
                self._cached[block] = None
            else:
                self._free.append(block)

    def _take(self) -> int:
        """A block for new content: a free one, else the least recently used cached one."""
        if self._free:
            return self._free.popleft()
        block, _ = self._cached.popitem(last=False)
        del self._block_of[self._key_of.pop(block)]
        return block
