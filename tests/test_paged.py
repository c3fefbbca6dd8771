"""The paged KV cache's block manager (inference/paged.py), pure Python: allocation and freeing,
reference-counted prefix sharing, the LRU of cached prefix blocks and its eviction."""

from inference.paged import BlockManager, block_keys

BS = 4
PREFIX = list(range(100, 112))  # three full blocks


def test_blocks_are_taken_and_given_back_and_block_0_is_never_handed_out():
    blocks = BlockManager(num_blocks=6, block_size=BS)
    assert blocks.allocate("a", [1, 2, 3], positions=9) == 0  # 3 blocks, nothing cached
    assert blocks.in_use == 3 and 0 not in blocks.table("a")
    assert blocks.allocate("b", [4], positions=12) is None  # 3 more wanted, 2 free: nothing taken
    assert blocks.in_use == 3
    assert blocks.allocate("b", [4], positions=8) == 0
    assert sorted(blocks.table("a") + blocks.table("b")) == [1, 2, 3, 4, 5]
    blocks.free("a")
    blocks.free("b")
    assert blocks.in_use == 0 and blocks.cached == 0  # nothing registered: all free again


def test_a_shared_prefix_is_held_by_both_and_freed_after_the_last():
    blocks = BlockManager(num_blocks=16, block_size=BS)
    first = PREFIX + [1, 2]
    blocks.allocate("a", first, positions=20)
    blocks.register("a", first, computed=8)  # two blocks written so far
    assert blocks.allocate("b", PREFIX + [3], positions=16) == 8  # third block not yet written
    blocks.register("a", first, computed=len(first))
    assert blocks.allocate("c", PREFIX + [3], positions=16) == 12
    assert blocks.table("c")[:3] == blocks.table("a")[:3] and blocks.reused_blocks == 5
    assert blocks.in_use == 5 + 2 + 1  # a's 5, b's 2 of its own, c's 1 of its own
    blocks.free("a")
    blocks.free("b")
    assert blocks.in_use == 4 and blocks.cached == 0  # c still holds the prefix
    blocks.free("c")
    assert blocks.in_use == 0 and blocks.cached == 3  # freed, still reusable


def test_the_last_prompt_token_is_never_shared():
    """A prompt of whole cached blocks still computes its last block (its last token's logits give
    the first new token), so no sequence writes into a block it shares."""
    blocks = BlockManager(num_blocks=16, block_size=BS)
    blocks.allocate("a", PREFIX, positions=14)
    blocks.register("a", PREFIX, computed=12)
    assert blocks.allocate("b", PREFIX, positions=14) == 8
    assert blocks.table("b")[2] != blocks.table("a")[2]


def test_cached_blocks_are_reused_until_their_space_is_needed_least_recent_first():
    blocks = BlockManager(num_blocks=5, block_size=BS)  # 4 usable
    blocks.allocate("a", PREFIX + [1], positions=13)
    blocks.register("a", PREFIX + [1], computed=13)
    blocks.free("a")
    assert blocks.cached == 3 and blocks.in_use == 0
    assert blocks.allocate("b", PREFIX + [2], positions=13) == 12  # all three reused from the LRU
    blocks.free("b")
    assert blocks.allocate("c", [7], positions=8) == 0  # the free block, then the LRU's oldest:
    assert blocks.cached == 2  # the prefix's tail (freed first), so its head stays matchable
    assert blocks.allocate("d", PREFIX + [3], positions=13) is None  # 2 cached + 0 free < 4
    assert len(blocks.cached_prefix(PREFIX + [3])) == 2


def test_keys_name_the_whole_prefix():
    a, b = block_keys([1, 2, 3, 4, 5, 6, 7, 8], BS), block_keys([9, 2, 3, 4, 5, 6, 7, 8], BS)
    assert len(a) == 2 and a[0] != b[0] and a[1] != b[1]  # same second block, other parent
    assert block_keys([1, 2, 3], BS) == []
