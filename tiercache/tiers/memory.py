"""Memory tiers (host DRAM and GPU HBM): one arena allocated up front, carved by a best-fit range allocator."""

from __future__ import annotations

import logging
import os
import time
from typing import Iterator

import torch

from ..allocator import ArenaAllocator, Block
from ..sizes import format_size
from .base import EntryHeader, RecoveredEntry, Slot

log = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 1 << 30
"""Pinned memory is allocated in chunks of at most this size: a single huge ``cudaHostAlloc`` can fail
and pinning takes time, so a host tier of N GiB is N separate 1 GiB arenas."""


class ArenaTier:
    """A volatile tier backed by preallocated ``torch`` storage on ``device``.

    ``capacity`` bytes are allocated at construction (pinned when ``pin_memory``; in chunks of at most
    ``chunk_bytes``, which also bounds the largest value).  Slots are ranges rounded up to ``min_block``
    bytes (256: every slot is 256-byte aligned), so the budget counts what is really reserved.
    """

    persistent = False

    def __init__(
        self,
        name: str,
        capacity: int,
        device: torch.device | str = "cpu",
        *,
        pin_memory: bool = False,
        min_block: int = 256,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> None:
        self.name = name
        self.device = torch.device(device)
        start = time.perf_counter()
        self._arenas: list[torch.Tensor] = []
        self._allocators: list[ArenaAllocator] = []
        remaining = capacity
        while remaining >= min_block:
            size = min(remaining, chunk_bytes)
            allocator = ArenaAllocator(size, min_block)
            if allocator.capacity == 0:
                break
            self._arenas.append(
                torch.empty(allocator.capacity, dtype=torch.uint8, device=self.device, pin_memory=pin_memory)
            )
            self._allocators.append(allocator)
            remaining -= allocator.capacity
        self.capacity = sum(a.capacity for a in self._allocators)
        # A slot lies within one chunk of the arena; chunks never change size.
        self._max_nbytes = max((a.max_block for a in self._allocators), default=0) or -1
        self._typed: dict[tuple[int, torch.dtype], torch.Tensor] = {}  # (chunk, dtype) -> arena viewed as dtype
        self.pinned = pin_memory
        if pin_memory and self.capacity:
            log.info("tiercache: pinned %d bytes of host memory in %d chunk(s) in %.2f s",
                     self.capacity, len(self._arenas), time.perf_counter() - start)

    @property
    def used(self) -> int:
        return sum(a.used for a in self._allocators)

    @property
    def max_nbytes(self) -> int:
        return self._max_nbytes

    def largest_free(self) -> int:
        return max((a.largest_free() for a in self._allocators), default=0)

    def charge(self, nbytes: int) -> int:
        """Budget bytes a payload of ``nbytes`` occupies (rounded up to the allocator's minimum block)."""
        return ArenaAllocator.block_size(nbytes, self._allocators[0].min_block) if self._allocators else nbytes

    # A slot's ``ref`` is ``(chunk index, byte offset)``: a tuple of ints, which Python's cyclic GC stops
    # tracking, so a tier holding many entries adds no GC work for its handles (the block's size is
    # ``slot.charged``).
    def allocate(self, nbytes: int) -> Slot | None:
        for index, allocator in enumerate(self._allocators):
            block = allocator.alloc(nbytes)
            if block is not None:
                return Slot((index, block.offset), nbytes, block.size)
        return None

    def free(self, slot: Slot) -> None:
        index, offset = slot.ref  # type: ignore[misc]
        self._allocators[index].free(Block(offset, slot.charged))

    def view(self, slot: Slot) -> torch.Tensor:
        """The slot's bytes in place (1-D uint8, ``slot.nbytes`` long)."""
        index, offset = slot.ref  # type: ignore[misc]
        return self._arenas[index][offset : offset + slot.nbytes]

    def locate(self, slot: Slot) -> tuple[torch.Tensor, int]:
        """The arena holding the slot (1-D uint8 on ``device``) and the slot's byte offset in it, so a
        batched copy can address many slots without a view per slot.  Valid until the slot is freed."""
        index, offset = slot.ref  # type: ignore[misc]
        return self._arenas[index], offset

    def typed_view(self, slot: Slot, dtype: torch.dtype) -> torch.Tensor:
        """The slot's bytes in place as a 1-D tensor of ``dtype`` (``slot.nbytes`` must be a multiple of
        its item size).  Slots start at multiples of ``min_block`` (256) bytes, so every dtype is aligned;
        copying through this view runs in the value's own dtype, not byte by byte.  Valid until the slot
        is freed."""
        index, offset = slot.ref  # type: ignore[misc]
        typed = self._typed.get((index, dtype))
        if typed is None:
            typed = self._typed[(index, dtype)] = self._arenas[index].view(dtype)
        size = dtype.itemsize
        return typed[offset // size : (offset + slot.nbytes) // size]

    def write(self, slot: Slot, data: torch.Tensor, header: EntryHeader) -> None:
        """Copy ``data`` (1-D contiguous, any dtype, ``slot.nbytes`` bytes, any device) into the slot, in
        ``data``'s own dtype."""
        self.typed_view(slot, data.dtype).copy_(data)

    def describe(self) -> dict[str, object]:
        """Tier-specific facts for ``Cache.stats()``: pinning, arena chunks, free-space fragmentation."""
        return {
            "pinned": self.pinned,
            "chunks": len(self._allocators),
            "largest_free_bytes": self.largest_free(),
        }

    def read(self, slot: Slot, header: EntryHeader) -> torch.Tensor:
        return self.view(slot)

    def discard(self, slot: Slot) -> None:
        return None

    def recover(self) -> Iterator[RecoveredEntry]:
        return iter(())

    def close(self) -> None:
        self._arenas.clear()
        self._typed.clear()


def physical_memory() -> int | None:
    """This machine's physical memory in bytes, or ``None`` where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def host_tier(capacity: int, **kwargs: object) -> ArenaTier:
    """The host DRAM tier: pinned when CUDA is available (so host<->GPU copies run at full speed).

    Raises ``ValueError`` when ``capacity`` exceeds the machine's physical memory: such a budget can only
    be honoured by swapping (or, pinned, not at all), so it is refused up front rather than failing later."""
    physical = physical_memory()
    if physical is not None and capacity > physical:
        raise ValueError(
            f"host budget of {format_size(capacity)} exceeds this machine's physical memory "
            f"({format_size(physical)}); give a smaller host budget (and a disk tier for the rest)"
        )
    pin = torch.cuda.is_available()
    return ArenaTier("host", capacity, "cpu", pin_memory=pin, **kwargs)  # type: ignore[arg-type]


def gpu_tier(capacity: int, device: torch.device | str = "cuda", **kwargs: object) -> ArenaTier:
    """The GPU HBM tier: one device arena (raises ``RuntimeError`` without CUDA)."""
    if not torch.cuda.is_available():
        raise RuntimeError("a gpu tier was requested but CUDA is not available; pass gpu=0 or None")
    kwargs.setdefault("chunk_bytes", max(capacity, 1))
    return ArenaTier("gpu", capacity, device, **kwargs)  # type: ignore[arg-type]
