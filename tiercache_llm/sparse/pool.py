"""A persistent per-layer resident block pool: the K/V of selected blocks stay where they were read.

:class:`ResidentPool` holds contiguous ``k`` / ``v`` tensors ``(N, B, H, S, D)`` (``N`` slots of one
stored block each, all batch rows and KV heads), a map ``block index -> slot`` and a free list.  The
decode pipeline (:mod:`.pipeline`) fills it: at each step the selected blocks already resident are used
in place (no copy, no read), the missing ones get slots and are read straight into them, and attention
reads the pool through a page table (``slot_of_fetch``; :mod:`.page_table`).  The in-memory tail block
(partial, changing every step) gets a slot refreshed at every step; it is never retained.

Retention (which blocks outlive a step) is the strategy's:

- ``"none"`` (``fetch-every-step``): nothing survives a step, every selected block is read from its tier
  each step; the pool is only a persistent destination (no per-step allocation).
- ``"previous"`` (``reuse-layer-ahead``): exactly the previous step's selection is kept.
- ``"mass"`` (``attention-aware``): the pool has room for ``factor`` x the largest union so far (on the
  CPU at most the layer's blocks: more could never be held); blocks not selected this step stay until
  their slot is needed, the lowest decayed attention mass evicted first.

Each slot remembers the tiercache key of the block it holds, and a block whose key changed (rewritten,
shifted) is a miss, so a stale slot can never be attended.  Rows or blocks changing in place (crop,
reorder, batch selection, reset) must :meth:`clear` the pool (the pipeline's ``invalidate``).

Growth: the first capacity is 1.25 x the step's need; when a union no longer fits (for ``"mass"``: when
the capacity is below ``factor`` x the union), it grows geometrically (at least x1.25).  The pool never
shrinks except through :meth:`clear`.  On the CPU the tensors are allocated once with ``reserve`` rows
(the caller's bound on the slots the layer will use, e.g. 1.25 x its blocks: room for decoding's new ones): rows
beyond the capacity are never handed out, so the allocator's untouched pages stay virtual and memory is
the capacity's, and a growth within the reservation is a free-list extension, not a copy of every held
slot (measured: ~90 ms per growth of a SmolLM2 layer at 8K x batch 4, several growths per step while
unions grow).  Beyond the reservation (or on other devices, where memory is not committed lazily) the
tensors are reallocated and the held slots copied once.

Thread safety: used by the forward pass only (one step of one layer at a time).
"""

from __future__ import annotations

import math
from typing import Hashable, Literal, Sequence

import torch

from tiercache.buffers import aligned_empty

Retention = Literal["none", "previous", "mass"]
GROWTH = 1.25


class ResidentPool:
    """One sparse layer's resident blocks (see module doc).

    Attributes:
        k / v: ``(N, B, Hk, S, Dk)`` / ``(N, B, Hv, S, Dv)`` (``None`` until the first :meth:`assign`);
            ``N >= capacity``, slots ``>= capacity`` are never used.
        slot_of: block index -> slot of the stored blocks held.
        grows: times the capacity grew; reallocs: times the tensors were reallocated (held slots copied);
        evicted: blocks evicted for room.
    """

    def __init__(self, retention: Retention = "previous", factor: float = 1.0) -> None:
        if retention not in ("none", "previous", "mass"):
            raise ValueError(f"retention must be 'none', 'previous' or 'mass', got {retention!r}")
        if not (isinstance(factor, (int, float)) and not isinstance(factor, bool) and factor >= 1.0):
            raise ValueError(f"pool factor must be a number >= 1.0, got {factor!r}")
        self.retention = retention
        self.factor = float(factor)
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.slot_of: dict[int, int] = {}
        self._key_of: dict[int, Hashable] = {}  # slot -> tiercache key of the K entry it holds
        self._free: list[int] = []
        self.tail_slot: int | None = None
        self._capacity = 0
        self._slot_bytes = 0  # bytes of one K slot plus one V slot
        self.grows = 0
        self.reallocs = 0
        self.evicted = 0

    # ----------------------------------------------------------------------------- queries
    @property
    def capacity(self) -> int:
        """Slots in use or free (the rows beyond it are an untouched reservation)."""
        return self._capacity

    @property
    def nbytes(self) -> int:
        """Memory of the ``capacity`` slots."""
        return self._capacity * self._slot_bytes

    def holds(self, block: int, key: Hashable) -> bool:
        """Whether ``block`` (its K entry ``key``) is resident and current."""
        slot = self.slot_of.get(block)
        return slot is not None and self._key_of.get(slot) == key

    def not_held(self, blocks: Sequence[int], kkeys: Sequence[Hashable]) -> list[int]:
        """The blocks of ``blocks`` not resident and current (``kkeys[j]``: block ``j``'s K key), in order."""
        slot_of, key_of = self.slot_of, self._key_of
        return [j for j in blocks if (slot := slot_of.get(j)) is None or key_of.get(slot) != kkeys[j]]

    # ----------------------------------------------------------------------------- steps
    def assign(self, stored: Sequence[int], keys: Sequence[Hashable], tail: bool,
               shape_k: tuple, shape_v: tuple, dtype: torch.dtype, device: torch.device,
               mass: torch.Tensor | None = None, reserve: int = 0,
               limit: int | None = None) -> tuple[list[int], list[int], int | None]:
        """Slots for one step whose union is the stored blocks ``stored`` (K keys ``keys``) plus the tail
        block when ``tail``.  ``shape_k`` / ``shape_v``: ``(B, H, S, D)`` of one slot; ``mass``: per-block
        decayed attention mass (``"mass"`` retention's eviction order); ``reserve``: rows worth allocating
        when the tensors are (re)allocated on the CPU (see the module doc; it changes no slot decision);
        ``limit``: the most blocks the layer can select (its stored blocks plus the tail).  On the CPU the
        capacity never exceeds it (more slots could never be used at once, so no eviction depends on them).

        Returns ``(slots, missing, tail_slot)``: the slot of each stored block (in ``stored`` order), the
        positions in ``stored`` whose slot does not hold the block yet (the caller must fill them before
        attention, or :meth:`drop` them on failure), and the tail's slot (``None`` without a tail).  The
        other positions hold their block already and must not be written."""
        if self.k is not None and (tuple(self.k.shape[1:]) != tuple(shape_k) or tuple(self.v.shape[1:]) != tuple(shape_v)
                                   or self.k.dtype != dtype or self.k.device != torch.device(device)):
            self.clear()  # batch size or layout changed: nothing held is usable
        if self.tail_slot is not None:
            self._free.append(self.tail_slot)
            self.tail_slot = None
        if self.retention == "none":
            self._evict(list(self.slot_of), count=False)
        want = set(stored)
        stale = [j for j, key in zip(stored, keys) if j in self.slot_of and self._key_of.get(self.slot_of[j]) != key]
        self._evict(stale, count=False)
        if self.retention == "previous":
            self._evict([j for j in self.slot_of if j not in want])
        missing = [i for i, j in enumerate(stored) if j not in self.slot_of]
        need = len(missing) + (1 if tail else 0)
        union = len(stored) + (1 if tail else 0)
        # Every block outside the union can be evicted, so ``union`` slots always suffice; "mass" keeps
        # room for ``factor`` x the union so blocks outside it can stay.
        target = math.ceil(self.factor * union) if self.retention == "mass" else union
        if limit is not None and torch.device(device).type == "cpu":
            # Growing to the limit later is a free-list extension within the reservation (no copy).
            target = min(target, max(union, limit))
            cap = max(union, limit)
        else:
            cap = None
        n = 0
        if self.k is None:  # headroom from the start: unions grow by a block or two over the first steps
            n = max(1, math.ceil(GROWTH * target))
        elif self._capacity < target:
            n = max(target, math.ceil(GROWTH * self._capacity))
        if n:
            self._grow(n if cap is None else min(n, cap), shape_k, shape_v, dtype, device, reserve)
        if len(self._free) < need:
            others = [j for j in self.slot_of if j not in want]
            if self.retention == "mass" and mass is not None and len(others) > need - len(self._free):
                values = mass.tolist()
                others.sort(key=lambda j: values[j] if j < len(values) else 0.0)
            self._evict(others[: need - len(self._free)])
        for i in missing:
            slot = self._free.pop()
            self.slot_of[stored[i]] = slot
            self._key_of[slot] = keys[i]
        if tail:
            self.tail_slot = self._free.pop()
        return [self.slot_of[j] for j in stored], missing, self.tail_slot

    def drop(self, blocks: Sequence[int]) -> None:
        """Forget ``blocks`` (e.g. their read failed): their slots become free."""
        self._evict([j for j in blocks if j in self.slot_of], count=False)

    def clear(self) -> None:
        """Release everything (crop, reorder, batch selection, reset)."""
        self.k = self.v = None
        self.slot_of.clear()
        self._key_of.clear()
        self._free = []
        self.tail_slot = None
        self._capacity = 0

    # ----------------------------------------------------------------------------- internals
    def _evict(self, blocks: list[int], count: bool = True) -> None:
        for j in blocks:
            slot = self.slot_of.pop(j)
            self._key_of.pop(slot, None)
            self._free.append(slot)
        if count:
            self.evicted += len(blocks)

    def _grow(self, n: int, shape_k: tuple, shape_v: tuple, dtype: torch.dtype, device: torch.device,
              reserve: int = 0) -> None:
        old = self._capacity
        if self.k is None or n > self.k.shape[0]:
            rows = max(n, int(reserve)) if torch.device(device).type == "cpu" else n
            # Page-aligned slots (entries are 512-byte multiples): direct disk reads land in them, no bounce copy.
            k = aligned_empty((rows, *shape_k), dtype=dtype, device=device)
            v = aligned_empty((rows, *shape_v), dtype=dtype, device=device)
            if old and self.slot_of:  # one plain copy of the old slots (most of them are held)
                k[:old].copy_(self.k[:old])
                v[:old].copy_(self.v[:old])
            if self.k is not None:
                self.reallocs += 1
            self.k, self.v = k, v
            self._slot_bytes = (k.nbytes + v.nbytes) // rows
        self._capacity = n
        self._free.extend(range(n - 1, old - 1, -1))  # pop() hands out the lowest new slot first
        self.grows += 1


def identity_pool(kbuf: torch.Tensor, vbuf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(k_pool, v_pool, slot_of_fetch)`` of buffers already in ``sel.fetch`` order (slot ``u`` = entry ``u``)."""
    return kbuf, vbuf, torch.arange(kbuf.shape[0], dtype=torch.long, device=kbuf.device)


__all__ = ["ResidentPool", "Retention", "identity_pool"]
