"""Memory tiers (host DRAM and GPU HBM): one arena allocated up front, carved by a best-fit range allocator."""

from __future__ import annotations

import bisect
import ctypes
import logging
import os
import threading
import time
from typing import Iterator

import torch

from ..allocator import ArenaAllocator
from ..sizes import format_size
from .base import EntryHeader, RecoveredEntry, Slot

log = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 1 << 30
"""Pinned memory is allocated in chunks of at most this size: a single huge ``cudaHostAlloc`` can fail
and pinning takes time, so a host tier of N GiB is N separate 1 GiB arenas."""

MEMMOVE_MAX_BYTES = 1 << 20
"""CPU arena copies of contiguous CPU payloads up to this size are one ``memmove`` (single-threaded, no
torch dispatch, the GIL released only above ``GIL_HELD_MAX_BYTES``, see ``memmove_holding_gil``): for a
KV-block-sized value the torch op around a copy (building a slot view, dispatching ``copy_``) costs more
than moving the bytes.  Larger payloads are copied by torch
in their own dtype, where its multi-threaded copy pays off."""

memmove = ctypes.memmove

memmove_holding_gil = ctypes.PYFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)(ctypes._memmove_addr)
"""``memmove(dst, src, n)`` for copies of at most ``GIL_HELD_MAX_BYTES``: the call keeps the GIL and returns
nothing, which saves ``ctypes.memmove``'s release and re-take of the GIL and its result int (a 64 KiB
``get`` measured ~5% faster); a copy that short holds the GIL about as long as a builtin's copy of a
``bytes`` object of that size would.  Single ``get``/``put`` and the batch paths' copies (``get_many``'s
values copied under the index lock or by address, ``put_many``'s writes) all use it up to that size,
so a batch of small values takes the GIL back once, not once per value, where another thread (e.g. the
model's, beside a read-ahead thread) is waiting for it."""

GIL_HELD_MAX_BYTES = 1 << 16


def copy_bytes(dst: int, src: int, size: int) -> None:
    """``memmove(dst, src, size)`` between addresses of CPU memory: :data:`memmove_holding_gil` up to
    ``GIL_HELD_MAX_BYTES``, ``ctypes.memmove`` (the GIL released) above; nothing for ``size`` 0."""
    if size > GIL_HELD_MAX_BYTES:
        memmove(dst, src, size)
    elif size:
        memmove_holding_gil(dst, src, size)

_new_tuple = tuple.__new__
_CHUNK_SHIFT = 48  # the pseudo-base of chunk i of an arena that is not addressable: i << 48 (chunks are < 2**48 bytes)


class ArenaPool:
    """Freed CPU arena chunks kept for the next memory tier that asks for a chunk of the same size (a
    caching allocator for arenas, like glibc's free lists for ``malloc``): a fresh arena's pages are only
    faulted in by their first write, which costs more than the copy itself for KV-block-sized values, and
    pinning fresh host memory takes time.  At most ``limit_bytes`` are kept in all (oldest dropped first);
    an arena is only taken back when nothing else references its storage (no view escaped).
    Thread-safe."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self._lock = threading.Lock()
        self._free: list[tuple[int, bool, torch.Tensor]] = []  # (bytes, pinned, arena), oldest first

    def take(self, nbytes: int, pinned: bool) -> torch.Tensor | None:
        with self._lock:
            for i, (size, was_pinned, arena) in enumerate(self._free):
                if size == nbytes and was_pinned == pinned:
                    del self._free[i]
                    return arena
        return None

    def give(self, arena: torch.Tensor, pinned: bool, uses: int) -> None:
        """Keep ``arena`` (a CPU chunk) if nothing but its tensor uses its storage (``uses``: the storage's
        use count when the arena was made) and it fits the limit."""
        if arena.device.type != "cpu" or arena.numel() > self.limit_bytes or _storage_uses(arena) != uses:
            return
        with self._lock:
            self._free.append((arena.numel(), pinned, arena))
            while sum(item[0] for item in self._free) > self.limit_bytes:
                self._free.pop(0)

    def clear(self) -> None:
        with self._lock:
            self._free.clear()


def _storage_uses(tensor: torch.Tensor) -> int:
    try:
        return torch._C._storage_Use_Count(tensor.untyped_storage()._cdata)
    except (AttributeError, RuntimeError):  # not exposed by this torch: never recycle
        return -1


ARENA_POOL = ArenaPool(1 << 30)
"""The process-wide pool of freed CPU arena chunks (1 GiB at most; ``ARENA_POOL.clear()`` gives them
back, ``ARENA_POOL.limit_bytes = 0`` turns recycling off)."""


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
            arena = ARENA_POOL.take(allocator.capacity, pin_memory) if self.device.type == "cpu" else None
            if arena is None:
                arena = torch.empty(allocator.capacity, dtype=torch.uint8, device=self.device, pin_memory=pin_memory)
            self._arenas.append(arena)
            self._allocators.append(allocator)
            remaining -= allocator.capacity
        self.capacity = sum(a.capacity for a in self._allocators)
        # A slot lies within one chunk of the arena; chunks never change size.
        self._max_nbytes = max((a.max_block for a in self._allocators), default=0) or -1
        self._typed: dict[tuple[int, torch.dtype], torch.Tensor] = {}  # (chunk, dtype) -> arena viewed as dtype
        self._uses = [_storage_uses(arena) for arena in self._arenas]  # for ArenaPool.give at close
        # A slot's ``ref`` is its chunk's base plus its byte offset in the chunk: for a CPU arena
        # (``addressable``) the base is the chunk's address, so ``ref`` is the slot's address and a copy
        # of a slot is one memmove with no lookup; otherwise chunk ``i``'s base is ``i << 48``.
        self.addressable = self.device.type == "cpu"
        self._bases = ([arena.data_ptr() for arena in self._arenas] if self.addressable
                       else [i << _CHUNK_SHIFT for i in range(len(self._arenas))])
        order = sorted(range(len(self._bases)), key=self._bases.__getitem__)
        self._sorted_bases = [self._bases[i] for i in order]  # for ``_chunk``: ref -> (chunk, offset)
        self._sorted_chunks = order
        self.pinned = pin_memory
        # One chunk (every host tier up to DEFAULT_CHUNK_BYTES): ``allocate`` asks its allocator directly.
        self._single = (self._allocators[0].alloc_range, self._bases[0]) if len(self._allocators) == 1 else None
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

    # A slot's ``ref`` is one int, its chunk's base + its byte offset (see __init__): an int is not tracked
    # by Python's cyclic GC, so a tier holding many entries adds no GC work for its handles (the block's
    # size is ``slot.charged``).
    def allocate(self, nbytes: int) -> Slot | None:
        single = self._single
        if single is not None:
            found = single[0](nbytes)
            return None if found is None else _new_tuple(Slot, (single[1] + found[0], nbytes, found[1]))
        for index, allocator in enumerate(self._allocators):
            found = allocator.alloc_range(nbytes)
            if found is not None:
                return _new_tuple(Slot, (self._bases[index] + found[0], nbytes, found[1]))  # Slot(...), faster
        return None

    def _chunk(self, ref: int) -> tuple[int, int]:
        """The chunk index and byte offset of a slot's ``ref``."""
        bases = self._sorted_bases
        if len(bases) == 1:
            return 0, ref - bases[0]
        at = bisect.bisect_right(bases, ref) - 1
        return self._sorted_chunks[at], ref - bases[at]

    def free(self, slot: Slot) -> None:
        index, offset = self._chunk(slot.ref)  # type: ignore[arg-type]
        self._allocators[index].free_range(offset, slot.charged)

    def view(self, slot: Slot) -> torch.Tensor:
        """The slot's bytes in place (1-D uint8, ``slot.nbytes`` long)."""
        index, offset = self._chunk(slot.ref)  # type: ignore[arg-type]
        return self._arenas[index][offset : offset + slot.nbytes]

    def locate(self, slot: Slot) -> tuple[torch.Tensor, int]:
        """The arena holding the slot (1-D uint8 on ``device``) and the slot's byte offset in it, so a
        batched copy can address many slots without a view per slot.  Valid until the slot is freed."""
        index, offset = self._chunk(slot.ref)  # type: ignore[arg-type]
        return self._arenas[index], offset

    def address(self, slot: Slot) -> int:
        """CPU arenas (``addressable``): the address of the slot's first byte (its ``ref``), for a
        ``memmove`` of its ``slot.nbytes`` bytes.  Valid until the slot is freed (and the tier closed)."""
        return slot.ref  # type: ignore[return-value]

    def typed_view(self, slot: Slot, dtype: torch.dtype) -> torch.Tensor:
        """The slot's bytes in place as a 1-D tensor of ``dtype`` (``slot.nbytes`` must be a multiple of
        its item size).  Slots start at multiples of ``min_block`` (256) bytes, so every dtype is aligned;
        copying through this view runs in the value's own dtype, not byte by byte.  Valid until the slot
        is freed."""
        index, offset = self._chunk(slot.ref)  # type: ignore[arg-type]
        typed = self._typed.get((index, dtype))
        if typed is None:
            typed = self._typed[(index, dtype)] = self._arenas[index].view(dtype)
        size = dtype.itemsize
        return typed[offset // size : (offset + slot.nbytes) // size]

    def write(self, slot: Slot, data: torch.Tensor, header: EntryHeader) -> None:
        """Copy ``data`` (1-D contiguous, any dtype, ``slot.nbytes`` bytes, any device) into the slot, in
        ``data``'s own dtype (or, for a CPU arena and a CPU payload of at most ``MEMMOVE_MAX_BYTES``, one
        ``memmove``)."""
        if self.addressable and slot.nbytes <= MEMMOVE_MAX_BYTES and data.is_cpu and data.is_contiguous():
            copy_bytes(self.address(slot), data.data_ptr(), slot.nbytes)
            return
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
        self._typed.clear()
        self._single = None
        arenas, self._arenas, self._bases = self._arenas, [], []
        for arena, uses in zip(arenas, self._uses):
            ARENA_POOL.give(arena, self.pinned, uses)


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
