import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tiercache.allocator import Block, BuddyAllocator


def test_block_size_rounds_up_to_min_block_and_span_to_a_power_of_two():
    assert BuddyAllocator.block_size(0, 256) == 256
    assert BuddyAllocator.block_size(1, 256) == 256
    assert BuddyAllocator.block_size(256, 256) == 256
    assert BuddyAllocator.block_size(257, 256) == 512
    assert BuddyAllocator.block_size(5000, 256) == 5120
    assert BuddyAllocator.span(5000, 256) == 8192
    assert BuddyAllocator.span(1, 256) == 256


def test_unused_tail_of_a_block_is_given_back():
    a = BuddyAllocator(1 << 16, min_block=256)
    b = a.alloc(48 << 10)  # a 48 KiB value carved from a 64 KiB block
    assert b == Block(0, 48 << 10)
    assert a.used == 48 << 10
    assert a.alloc(16 << 10) == Block(48 << 10, 16 << 10)  # the tail is usable
    assert a.alloc(1) is None
    a.free(b)
    assert a.alloc(32 << 10) == Block(0, 32 << 10)


def test_rejects_bad_parameters():
    with pytest.raises(ValueError):
        BuddyAllocator(1024, min_block=0)
    with pytest.raises(ValueError):
        BuddyAllocator(1024, min_block=300)
    with pytest.raises(ValueError):
        BuddyAllocator(-1)


def test_blocks_are_aligned_to_their_size_and_used_counts_rounded_sizes():
    a = BuddyAllocator(4096, min_block=256)
    b1 = a.alloc(100)
    b2 = a.alloc(600)
    assert b1 == Block(0, 256)
    assert b2.size == 768 and b2.offset % 1024 == 0
    assert a.used == 256 + 768


def test_non_power_of_two_capacity_and_max_block():
    a = BuddyAllocator(3000, min_block=256)
    assert a.capacity == 2816  # rounded down to min_block
    assert a.max_block == 2048
    assert a.alloc(2049) is None
    big = a.alloc(2048)
    assert big is not None
    assert a.alloc(512).size == 512
    assert a.alloc(256).size == 256
    assert a.alloc(1) is None
    assert a.used == a.capacity


def test_exhaustion_returns_none_and_free_makes_room_again():
    a = BuddyAllocator(1024, min_block=256)
    blocks = [a.alloc(256) for _ in range(4)]
    assert all(blocks)
    assert a.alloc(1) is None
    a.free(blocks[1])
    assert a.alloc(200) == blocks[1]


def test_double_free_and_foreign_blocks_are_rejected():
    a = BuddyAllocator(1024, min_block=256)
    b = a.alloc(256)
    a.free(b)
    with pytest.raises(ValueError):
        a.free(b)
    with pytest.raises(ValueError):
        a.free(Block(512, 256))


def test_zero_capacity():
    a = BuddyAllocator(0)
    assert a.capacity == 0 and a.max_block == 0
    assert a.alloc(1) is None


@settings(max_examples=150, deadline=None)
@given(
    capacity=st.integers(min_value=0, max_value=1 << 16),
    ops=st.lists(st.tuples(st.booleans(), st.integers(min_value=0, max_value=1 << 14), st.integers(0, 10**6)),
                 max_size=60),
)
def test_property_no_overlap_within_capacity_and_full_free_merges_back(capacity, ops):
    a = BuddyAllocator(capacity, min_block=64)
    roots_free = a.largest_free()
    live: list[Block] = []
    for is_alloc, nbytes, pick in ops:
        if is_alloc or not live:
            block = a.alloc(nbytes)
            if block is None:
                # Only refuse when no free block of the needed size exists.
                assert a.largest_free() < BuddyAllocator.span(nbytes, 64)
                continue
            assert block.size == BuddyAllocator.block_size(nbytes, 64)
            assert block.offset % BuddyAllocator.span(nbytes, 64) == 0
            assert 0 <= block.offset and block.offset + block.size <= a.capacity
            live.append(block)
        else:
            a.free(live.pop(pick % len(live)))
        assert a.used == sum(b.size for b in live)
        assert a.used <= a.capacity
        spans = sorted((b.offset, b.offset + b.size) for b in live)
        for (_, end), (start, _) in zip(spans, spans[1:]):
            assert end <= start, "two live blocks overlap"
    for block in live:
        a.free(block)
    assert a.used == 0
    # Everything merged back: the largest block is available again, and the whole arena can be re-filled.
    assert a.largest_free() == roots_free
    if a.max_block:
        assert a.alloc(a.max_block) is not None
    total = a.used
    while (block := a.alloc(64)) is not None:
        total += block.size
    assert total == a.capacity
