"""A best-fit range allocator over a preallocated arena: the memory tiers' slot mechanism.

The arena is allocated once.  ``alloc(n)`` rounds ``n`` up to a multiple of ``min_block`` (256 bytes by
default, which keeps every block 256-byte aligned for vectorised GPU copies) and carves it from the
smallest free range that holds it; ``free`` coalesces a block with its free neighbours.  Values of one
size — the common case, e.g. KV blocks — therefore pack with no waste at all, whatever that size is (a
power-of-two buddy system would lose a quarter of the arena to 48 KiB blocks).  Mixed sizes can leave
free ranges too small for a request; the cache then demotes more victims until one fits.

No system allocator is called per allocation, and ``used`` counts what is really reserved, so a tier
budget is never exceeded.  Free ranges are binned by exact size: an allocation that finds a free range of
its own size (the steady state of uniform values, however many ranges are free) and every ``free`` cost
O(1) dict operations; otherwise the smallest larger size is found by binary search over the *distinct*
free sizes (O(log d)), and that sorted list changes (O(d) memmove) only when a size's bin appears or
empties.  The never-used end of the arena (the *tail*) is kept apart from the bins and carved by bumping
its start, so filling a fresh arena costs O(1) per allocation too; it is just another free range for the
best-fit choice (a binned range is taken when it is the smaller fit: freed ranges, whose pages are
already touched, are reused before fresh ones of a larger size; within a size, the most recently freed
first).  Cost therefore does not grow with the
number of free ranges.  Not thread-safe: callers hold their own lock.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Block:
    """``size`` bytes (a multiple of the arena's ``min_block``) at byte ``offset`` in the arena."""

    offset: int
    size: int


class ArenaAllocator:
    def __init__(self, capacity: int, min_block: int = 256) -> None:
        if min_block <= 0 or min_block & (min_block - 1):
            raise ValueError(f"min_block must be a positive power of two, got {min_block}")
        if capacity < 0:
            raise ValueError(f"capacity must not be negative, got {capacity}")
        self.min_block = min_block
        self.capacity = capacity - capacity % min_block
        self.used = 0
        self._free_at: dict[int, int] = {}  # start of a free range -> its size
        self._free_until: dict[int, int] = {}  # end of a free range -> its start
        self._bins: dict[int, dict[int, None]] = {}  # size -> starts of the free ranges of that size
        self._sizes: list[int] = []  # the keys of _bins, sorted
        self._allocated: dict[int, int] = {}  # offset -> size
        self._tail = 0  # start of the tail: [_tail, capacity) is free and in no bin

    @staticmethod
    def block_size(nbytes: int, min_block: int) -> int:
        """The bytes an allocation of ``nbytes`` occupies (rounded up to ``min_block``, at least one)."""
        return -(-max(nbytes, 1) // min_block) * min_block

    @property
    def max_block(self) -> int:
        """The largest block this arena can ever hand out (all of it; 0 when empty)."""
        return self.capacity

    def largest_free(self) -> int:
        binned = self._sizes[-1] if self._sizes else 0
        return max(binned, self.capacity - self._tail)

    def alloc(self, nbytes: int) -> Block | None:
        """A block of at least ``nbytes`` carved from the smallest free range that holds it, or ``None``
        when no free range is large enough."""
        found = self.alloc_range(nbytes)
        return Block(*found) if found is not None else None

    def alloc_range(self, nbytes: int) -> tuple[int, int] | None:
        """``alloc`` as ``(offset, size)`` (no :class:`Block` built: the memory tiers' hot path)."""
        min_block = self.min_block
        want = -(-(nbytes or 1) // min_block) * min_block
        bins = self._bins
        starts = bins.get(want)
        if starts is None:
            sizes = self._sizes
            index = bisect.bisect_left(sizes, want) if sizes else 0
            tail = self.capacity - self._tail
            if tail >= want and (index == len(sizes) or tail < sizes[index]):  # the tail is the best fit
                start = self._tail
                self._tail = start + want
                self._allocated[start] = want
                self.used += want
                return start, want
            if index == len(sizes):
                return None
            size = sizes[index]
            starts = bins[size]
        else:
            size = want
        # The most recently freed range of that size (its pages are the likeliest to be cached), taken
        # with ``popitem`` in O(1).  (``next(iter(starts))``, the oldest, walks over the dict slots of
        # every range taken before it: allocations after many frees of one size grew with their number.)
        start = starts.popitem()[0]
        del self._free_at[start]
        del self._free_until[start + size]
        if not starts:
            del bins[size]
            del self._sizes[bisect.bisect_left(self._sizes, size)]
        if size > want:
            self._add_free(start + want, size - want)
        self._allocated[start] = want
        self.used += want
        return start, want

    def free(self, block: Block) -> None:
        self.free_range(block.offset, block.size)

    def free_range(self, offset: int, size: int) -> None:
        """``free`` of the block at ``offset`` of ``size`` bytes."""
        if self._allocated.get(offset) != size:
            raise ValueError(f"{Block(offset, size)} is not an allocated block of this arena")
        del self._allocated[offset]
        self.used -= size
        start = offset
        before = self._free_until.get(start)
        if before is not None:
            before_size = self._free_at[before]
            self._remove_free(before, before_size)
            start, size = before, size + before_size
        if start + size == self._tail:  # back into the tail
            self._tail = start
            return
        after_size = self._free_at.get(start + size)
        if after_size is not None:
            self._remove_free(start + size, after_size)
            size += after_size
        self._add_free(start, size)

    def _add_free(self, start: int, size: int) -> None:
        self._free_at[start] = size
        self._free_until[start + size] = start
        starts = self._bins.get(size)
        if starts is None:
            starts = self._bins[size] = {}
            bisect.insort(self._sizes, size)
        starts[start] = None

    def _remove_free(self, start: int, size: int) -> None:
        del self._free_at[start]
        del self._free_until[start + size]
        starts = self._bins[size]
        del starts[start]
        if not starts:
            del self._bins[size]
            del self._sizes[bisect.bisect_left(self._sizes, size)]
