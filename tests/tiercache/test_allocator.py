import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tiercache.allocator import ArenaAllocator, Block


def test_block_size_rounds_up_to_min_block():
    assert ArenaAllocator.block_size(0, 256) == 256
    assert ArenaAllocator.block_size(1, 256) == 256
    assert ArenaAllocator.block_size(256, 256) == 256
    assert ArenaAllocator.block_size(257, 256) == 512
    assert ArenaAllocator.block_size(5000, 256) == 5120


def test_rejects_bad_parameters():
    with pytest.raises(ValueError):
        ArenaAllocator(1024, min_block=0)
    with pytest.raises(ValueError):
        ArenaAllocator(1024, min_block=300)
    with pytest.raises(ValueError):
        ArenaAllocator(-1)


def test_blocks_are_aligned_and_used_counts_rounded_sizes():
    a = ArenaAllocator(4096, min_block=256)
    b1 = a.alloc(100)
    b2 = a.alloc(600)
    assert b1 == Block(0, 256)
    assert b2 == Block(256, 768)
    assert a.used == 256 + 768


def test_uniform_non_power_of_two_values_pack_without_waste():
    a = ArenaAllocator(1 << 20, min_block=256)
    blocks = [a.alloc(48 << 10) for _ in range(21)]  # 21 x 48 KiB = 1008 KiB of 1024 KiB
    assert all(blocks) and a.used == 21 * (48 << 10)
    assert a.alloc(48 << 10) is None and a.alloc(16 << 10) is not None
    a.free(blocks[3])
    assert a.alloc(48 << 10) == blocks[3]  # the hole is reused exactly


def test_non_multiple_capacity_and_max_block():
    a = ArenaAllocator(3000, min_block=256)
    assert a.capacity == 2816  # rounded down to min_block
    assert a.max_block == 2816
    assert a.alloc(2817) is None
    big = a.alloc(2048)
    assert big is not None
    assert a.alloc(512).size == 512
    assert a.alloc(256).size == 256
    assert a.alloc(1) is None
    assert a.used == a.capacity


def test_best_fit_prefers_the_smallest_hole():
    a = ArenaAllocator(8192, min_block=256)
    b = [a.alloc(1024) for _ in range(8)]
    a.free(b[1])  # a 1 KiB hole
    a.free(b[4])
    a.free(b[5])  # a 2 KiB hole
    assert a.alloc(1024) == b[1]
    assert a.alloc(2048) == Block(b[4].offset, 2048)


def test_exhaustion_returns_none_and_free_makes_room_again():
    a = ArenaAllocator(1024, min_block=256)
    blocks = [a.alloc(256) for _ in range(4)]
    assert all(blocks)
    assert a.alloc(1) is None
    a.free(blocks[1])
    assert a.alloc(200) == blocks[1]


def test_double_free_and_foreign_blocks_are_rejected():
    a = ArenaAllocator(1024, min_block=256)
    b = a.alloc(256)
    a.free(b)
    with pytest.raises(ValueError):
        a.free(b)
    with pytest.raises(ValueError):
        a.free(Block(512, 256))


def test_zero_capacity():
    a = ArenaAllocator(0)
    assert a.capacity == 0 and a.max_block == 0
    assert a.alloc(1) is None


@settings(max_examples=150, deadline=None)
@given(
    capacity=st.integers(min_value=0, max_value=1 << 16),
    ops=st.lists(st.tuples(st.booleans(), st.integers(min_value=0, max_value=1 << 14), st.integers(0, 10**6)),
                 max_size=60),
)
def test_property_no_overlap_within_capacity_and_full_free_coalesces(capacity, ops):
    a = ArenaAllocator(capacity, min_block=64)
    live: list[Block] = []
    for is_alloc, nbytes, pick in ops:
        if is_alloc or not live:
            block = a.alloc(nbytes)
            if block is None:
                # Only refuse when no free range of the needed size exists.
                assert a.largest_free() < ArenaAllocator.block_size(nbytes, 64)
                continue
            assert block.size == ArenaAllocator.block_size(nbytes, 64)
            assert block.offset % 64 == 0
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
    # Everything coalesced back into one range: the whole arena can be handed out in one block again.
    assert a.largest_free() == a.capacity
    if a.capacity:
        assert a.alloc(a.capacity) == Block(0, a.capacity)


def _free_ranges(capacity: int, live: list[Block]) -> list[tuple[int, int]]:
    """(start, size) of the gaps between live blocks: what a coalescing allocator must have free."""
    gaps, at = [], 0
    for block in sorted(live, key=lambda b: b.offset):
        if block.offset > at:
            gaps.append((at, block.offset - at))
        at = block.offset + block.size
    if capacity > at:
        gaps.append((at, capacity - at))
    return gaps


@settings(max_examples=150, deadline=None)
@given(
    ops=st.lists(st.tuples(st.booleans(), st.integers(min_value=1, max_value=12), st.integers(0, 10**6)),
                 max_size=80),
)
def test_property_best_fit_carves_the_smallest_gap_that_holds_the_request(ops):
    a = ArenaAllocator(64 * 64, min_block=64)
    live: list[Block] = []
    for is_alloc, units, pick in ops:
        if is_alloc or not live:
            gaps = _free_ranges(a.capacity, live)
            fitting = [size for _, size in gaps if size >= units * 64]
            block = a.alloc(units * 64)
            if not fitting:
                assert block is None
                continue
            assert block is not None
            holder = next(size for start, size in gaps if start <= block.offset < start + size)
            assert holder == min(fitting), "not the best fit"
            live.append(block)
        else:
            a.free(live.pop(pick % len(live)))
        assert a.largest_free() == max((size for _, size in _free_ranges(a.capacity, live)), default=0)


def test_churned_uniform_arena_keeps_one_size_bin():
    # Freeing every other block of a full arena leaves thousands of equal holes: they share one bin, so
    # allocating into them does not walk or shift a list of free ranges.
    a = ArenaAllocator(10_000 * 256, min_block=256)
    blocks = [a.alloc(256) for _ in range(10_000)]
    for block in blocks[::2]:
        a.free(block)
    assert len(a._sizes) == 1 and len(a._bins[256]) == 5_000
    again = [a.alloc(200) for _ in range(5_000)]
    assert {b.offset for b in again} == {b.offset for b in blocks[::2]}
    assert a.alloc(1) is None and not a._sizes


def test_fresh_arena_is_carved_from_the_tail_and_freed_ranges_are_reused_first():
    # Filling a fresh arena bumps the tail (no bin appears or empties per allocation); a freed block of
    # the requested size is reused (its pages are already touched) before fresh tail bytes, and freeing
    # the last block gives its bytes back to the tail.
    a = ArenaAllocator(1000 * 256, min_block=256)
    blocks = [a.alloc(256) for _ in range(10)]
    assert [b.offset for b in blocks] == [256 * i for i in range(10)] and not a._sizes
    a.free(blocks[3])
    assert a.alloc(200) == Block(3 * 256, 256)
    a.free(blocks[9])
    assert a.largest_free() == a.capacity - 9 * 256 and not a._sizes
    assert a.alloc_range(300) == (9 * 256, 512)
    a.free_range(9 * 256, 512)
    with pytest.raises(ValueError, match="not an allocated block"):
        a.free_range(9 * 256, 512)
