"""A buddy allocator over a preallocated arena: the memory tiers' slot mechanism.

The arena is allocated once.  ``alloc(n)`` rounds ``n`` up to a multiple of ``min_block``, takes a free
power-of-two block of at least that size (splitting larger ones) and immediately gives back the unused
tail as smaller aligned blocks, so a 48 KiB value occupies 48 KiB, not 64 KiB.  ``free`` splits the range
into its aligned power-of-two pieces and merges each with its buddy.  No system allocator is called per
allocation, and used bytes count what is really reserved, so a tier budget is never exceeded.  Blocks
start at multiples of ``min_block`` (and of the power of two they were carved from).  Not thread-safe:
callers hold their own lock.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Block:
    """``size`` bytes (a multiple of the arena's ``min_block``) at byte ``offset`` in the arena."""

    offset: int
    size: int


class BuddyAllocator:
    def __init__(self, capacity: int, min_block: int = 256) -> None:
        if min_block <= 0 or min_block & (min_block - 1):
            raise ValueError(f"min_block must be a positive power of two, got {min_block}")
        if capacity < 0:
            raise ValueError(f"capacity must not be negative, got {capacity}")
        self.min_block = min_block
        self.capacity = capacity - capacity % min_block
        self.used = 0
        self._free: dict[int, set[int]] = {}  # block size -> offsets of free blocks of that size
        self._allocated: dict[int, int] = {}  # offset -> size
        # The arena is a sum of powers of two laid out largest first, so every root is aligned to its size.
        self._root_offsets: list[int] = []
        self._root_sizes: list[int] = []
        offset, remaining = 0, self.capacity
        while remaining >= min_block:
            size = 1 << (remaining.bit_length() - 1)
            self._root_offsets.append(offset)
            self._root_sizes.append(size)
            self._free.setdefault(size, set()).add(offset)
            offset += size
            remaining -= size

    @staticmethod
    def block_size(nbytes: int, min_block: int) -> int:
        """The bytes an allocation of ``nbytes`` occupies (rounded up to ``min_block``)."""
        size = max(nbytes, 1)
        return -(-size // min_block) * min_block

    @staticmethod
    def span(nbytes: int, min_block: int) -> int:
        """The free power-of-two block an allocation of ``nbytes`` must be carved from."""
        size = max(nbytes, min_block, 1)
        return 1 << (size - 1).bit_length()

    @property
    def max_block(self) -> int:
        """The largest block this arena can ever hand out (its biggest power-of-two root; 0 when empty)."""
        return self._root_sizes[0] if self._root_sizes else 0

    def largest_free(self) -> int:
        sizes = [size for size, offsets in self._free.items() if offsets]
        return max(sizes, default=0)

    def alloc(self, nbytes: int) -> Block | None:
        """A block of at least ``nbytes``, or ``None`` when no free block is large enough."""
        want = self.block_size(nbytes, self.min_block)
        span = self.span(nbytes, self.min_block)
        size = span
        while not self._free.get(size):
            size <<= 1
            if size > self.max_block:
                return None
        offset = min(self._free[size])  # lowest address first keeps the arena compact
        self._free[size].discard(offset)
        while size > span:
            size >>= 1
            self._free.setdefault(size, set()).add(offset + size)
        for piece, piece_size in _aligned_pieces(offset + want, offset + span):
            self._release(piece, piece_size)  # the unused tail goes straight back
        self._allocated[offset] = want
        self.used += want
        return Block(offset, want)

    def free(self, block: Block) -> None:
        if self._allocated.get(block.offset) != block.size:
            raise ValueError(f"{block} is not an allocated block of this arena")
        del self._allocated[block.offset]
        self.used -= block.size
        for piece, piece_size in _aligned_pieces(block.offset, block.offset + block.size):
            self._release(piece, piece_size)

    def _release(self, offset: int, size: int) -> None:
        """Add the aligned power-of-two block ``(offset, size)`` to the free lists, merging buddies."""
        root = bisect.bisect_right(self._root_offsets, offset) - 1
        root_size = self._root_sizes[root]
        base = self._root_offsets[root]
        while size < root_size:
            buddy = base + ((offset - base) ^ size)
            peers = self._free.get(size)
            if not peers or buddy not in peers:
                break
            peers.discard(buddy)
            offset = min(offset, buddy)
            size <<= 1
        self._free.setdefault(size, set()).add(offset)


def _aligned_pieces(start: int, end: int) -> list[tuple[int, int]]:
    """``[start, end)`` as the fewest power-of-two blocks each aligned to its size (``start`` and ``end``
    are multiples of the minimum block; roots are aligned to their sizes, so offsets suffice)."""
    pieces = []
    while start < end:
        size = start & -start if start else 1 << ((end - start).bit_length() - 1)
        while start + size > end:
            size >>= 1
        pieces.append((start, size))
        start += size
    return pieces
