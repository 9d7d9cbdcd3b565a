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
empties.  Cost therefore does not grow with the number of free ranges.  Not thread-safe: callers hold
their own lock.
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
        if self.capacity:
            self._add_free(0, self.capacity)

    @staticmethod
    def block_size(nbytes: int, min_block: int) -> int:
        """The bytes an allocation of ``nbytes`` occupies (rounded up to ``min_block``, at least one)."""
        return -(-max(nbytes, 1) // min_block) * min_block

    @property
    def max_block(self) -> int:
        """The largest block this arena can ever hand out (all of it; 0 when empty)."""
        return self.capacity

    def largest_free(self) -> int:
        return self._sizes[-1] if self._sizes else 0

    def alloc(self, nbytes: int) -> Block | None:
        """A block of at least ``nbytes`` carved from the smallest free range that holds it, or ``None``
        when no free range is large enough."""
        want = self.block_size(nbytes, self.min_block)
        size = want
        if want not in self._bins:
            index = bisect.bisect_left(self._sizes, want)
            if index == len(self._sizes):
                return None
            size = self._sizes[index]
        start = next(iter(self._bins[size]))  # the longest-free range of that size
        self._remove_free(start, size)
        if size > want:
            self._add_free(start + want, size - want)
        self._allocated[start] = want
        self.used += want
        return Block(start, want)

    def free(self, block: Block) -> None:
        if self._allocated.get(block.offset) != block.size:
            raise ValueError(f"{block} is not an allocated block of this arena")
        del self._allocated[block.offset]
        self.used -= block.size
        start, size = block.offset, block.size
        before = self._free_until.get(start)
        if before is not None:
            before_size = self._free_at[before]
            self._remove_free(before, before_size)
            start, size = before, size + before_size
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
