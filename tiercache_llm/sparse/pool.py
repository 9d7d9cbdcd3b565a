"""Resident block pools: the K/V of selected blocks stay where they were read, in slots shared by every layer.

A :class:`PoolArena` holds ``k`` / ``v`` tensors ``(N, B, H, S, D)`` (``N`` slots of one stored block each, all
batch rows and KV heads) and a free list.  For layers that store a block's K and V as one joint entry
(``joint=True`` at :meth:`PoolArena.assign`) they are the halves ``kv[:, :, :, 0]`` / ``kv[:, :, :, 1]`` of one
contiguous part-major joint storage ``kv`` ``(N, B, H, 2, S, D)``, so a sparse layer's joint entry ``(B, H, 2, S, D)``
is read straight into its slot ``kv[slot]`` (one read, no copy), and each (row, KV head) part of a slot (K then V)
is one contiguous byte range (a part read fills only the parts asked for); otherwise ``k`` and ``v`` are two contiguous tensors (``kv`` is ``None``).
Every sparse layer of a cache has a :class:`ResidentPool`, its view of the arena: a map ``block index ->
slot`` of the blocks it holds.  The decode pipeline (:mod:`.pipeline`) fills them: at each step the selected blocks already resident are
used in place (no copy, no read), the missing ones get slots and are read straight into them, and
attention reads the arena through a page table (``slot_of_fetch``; :mod:`.page_table`).  The in-memory
tail block (partial, changing every step) gets a slot refreshed at every step; it is never retained.

**Validity.** The tensors a layer's fetch returns hold its selection until the next fetch of *any* layer
of the arena (which may evict its blocks or reuse its tail slot); attention consumes them before that.

Retention (which blocks outlive a step) is the strategy's:

- ``"none"`` (``fetch-every-step``): nothing survives a step, every selected block is read from its tier
  each step; the arena is one layer-sized destination shared by all layers (no per-step allocation).
- ``"previous"`` (``reuse-layer-ahead``): exactly each layer's previous selection is kept.
- ``"mass"`` (``attention-aware``): a layer may hold up to ``factor`` x its largest union so far (on the
  CPU at most its blocks: more could never be held); its blocks not selected this step stay until their
  slot is needed, the lowest decayed attention mass evicted first.

**Budget** (``max_bytes``, ``None``: unbounded).  Unbounded, the arena grows to the sum of the layers'
allowances (``factor`` x union per layer for ``"mass"``, the union for ``"previous"``, one union for
``"none"``), so each layer behaves as if it had a pool of its own.  Bounded, the arena never grows past
``max_bytes // slot_bytes`` slots: when a layer needs slots and none is free, blocks the other layers hold
(and its own blocks it did not select) are evicted (``eviction``): by default (``"distance"``) those of
the layer whose next fetch is farthest away first (layers fetch in a cycle, so that is the layer just
before the current one: Belady's rule for a cyclic order), its lowest decayed attention mass first; or
(``"mass"``) the lowest decayed attention mass of any layer (the masses of all layers are on one scale).
Measured at SmolLM2 4K x 4, 25 % budget, pools bounded at 25 % of the KV: 25.2 % of the needed entries
served from the pools with ``"distance"``, 21.9 % with ``"mass"`` (docs/sparse.md "Pool budget, measured").
With ``prefer_cheap`` (the pipeline's ``pool_prefer_cheap``, opt-in), a bounded arena evicts, within each layer, the
blocks marked cheap to read again (:attr:`ResidentPool.cheap`: their entries sat in the fastest tier when
they were read) before the others, so the pools keep what only the slow tier holds and the two hold
fewer blocks twice (fewer disk reads, more host-tier copies: slower on the 2-core CPU machine, docs/sparse.md
"Pool budget").
Blocks the fetching layer selected are never evicted, so one step of one layer needs its whole union (stored blocks plus the tail) at once: a union larger than the bound
grows the arena past it to exactly that union (it never shrinks until :meth:`PoolArena.clear`), warns
once per arena and is counted in ``over_budget`` (steps) and ``peak_slots`` -- correctness first, a
decode step never fails for memory the user could not have predicted (a union depends on what the rows
and heads select).  A bound that is not a positive byte count is a ``ValueError``
(:func:`check_pool_bytes`).  ``pool_bytes="auto"`` (the cache's default) is resolved by the pipeline, not
here (:func:`auto_pool_bytes`: the budget of the memory tier on the model's device).

Each slot remembers the tiercache key of the block it holds, and a block whose key changed (rewritten,
shifted) is a miss, so a stale slot can never be attended.  Rows or blocks changing in place (crop,
reorder, batch selection, reset) must clear the arena (the pipeline's ``invalidate``); a slot shape,
dtype or device change (e.g. a batch change) clears it too.  The sparse layers of the supported models
share one slot shape; layers of different shapes would still be correct, but would clear the shared
arena at every change of shape.

Growth: a layer's allowance starts at 1.25 x its first need and grows geometrically (at least x1.25);
on the CPU the arena's capacity follows the sum of the allowances (never past the bound), elsewhere it
grows geometrically, and a bounded arena off the CPU takes the bound (at most the reservation) at its
first allocation.  On the CPU the tensors are allocated once with
``reserve`` rows (the caller's bound on the slots a layer will use, e.g. 1.25 x its blocks, times the
layers that retain, i.e. the views the arena has when it allocates -- the pipeline makes every layer's view
before the first assign --, capped by the bound): rows beyond the capacity are never handed out, so the
allocator's untouched pages stay virtual and memory is the capacity's, and a growth within the
reservation is a free-list extension, not a copy of every held slot (measured: ~90 ms per growth of a
SmolLM2 layer at 8K x batch 4).  Beyond the reservation (or on other devices, where memory is not
committed lazily) the tensors are reallocated and the held slots copied once.

**Reads into reserved slots** (the pipeline's ``stage_into_slots``): :meth:`PoolArena.reserve` gives a layer
slots for blocks it is predicted to select *before* its fetch, and the caller starts a background read into
them (:meth:`PoolArena.mark_pending`).  Such a slot is in the layer's map (its key recorded, so it counts
against the bound and the layer's allowance, and no other layer is handed it) and in
:attr:`ResidentPool.fresh` until the layer's fetch settles it (:meth:`PoolArena.settle`: waits for the read,
drops the blocks whose read failed).  With :attr:`PoolArena.pass_in_flight` (the default; the pipeline's
``settle_late``) evictions pass over slots whose read is in flight: a reservation
never takes one, a fetch only when nothing else can be evicted, and a layer's share (its allowance) and
``"previous"`` retention leave its own to its next fetch.  Any release of such a slot that does happen
(that last-resort eviction, a stale key, :meth:`ResidentPool.drop`) waits for the read first, and
:meth:`PoolArena.clear` and a reallocation wait for every read (or cancel it before it starts), so a read never
lands in a slot that was handed on, and tensors a read targets are never freed or copied before it finished.  Nothing else changes:
attention only ever reads a layer's slots after its own fetch settled them.

**Parts.** A part-major joint slot holds B x H (row, KV head) parts; a fetch with ``part_reads`` reads only the
parts its layer selected, so the others hold stale bytes.  :attr:`PoolArena.parts` ``(rows, B, H)`` records which
parts of each slot hold its block: cleared when :meth:`PoolArena.assign` hands the slot to a block, set for a
reserved slot (its background read is whole), and by the pipeline for whatever it writes
(:meth:`PoolArena.mark_parts`).  A resident block whose selected parts are not all recorded is a part miss: the
pipeline reads the missing parts into its slot before attention, which reads only the selected (row, head)s'
pages.  A write that fails releases its slot, so a record never outlives the bytes it vouches for.

Thread safety: used by the forward pass only (one step of one layer at a time); background reads write only
into the slots reserved for them.
"""

from __future__ import annotations

import concurrent.futures
import heapq
import math
import mmap
import time
import warnings
from functools import partial
from typing import Callable, Hashable, Literal, Sequence

import torch

from tiercache.buffers import aligned_empty, huge_empty, libc_madvise
from tiercache.sizes import format_size, parse_size

Retention = Literal["none", "previous", "mass"]
Eviction = Literal["mass", "distance"]
GROWTH = 1.25
HUGE_MIN_BYTES = 8 << 20  # slot tensors this large go on huge pages where the arena's huge_pages is set


_MADV_POPULATE_WRITE = 23  # Linux >= 5.14
_populate_ok = True  # False once the kernel refused MADV_POPULATE_WRITE (Linux < 5.14)


def can_populate() -> bool:
    """Whether :func:`populate` may still fault pages in: Linux with ``madvise`` whose kernel has not
    refused ``MADV_POPULATE_WRITE`` in this process."""
    return _populate_ok and libc_madvise() is not None


def populate(tensor: torch.Tensor) -> int:
    """Map every whole page inside ``tensor``'s (contiguous, CPU) bytes for writing without changing its
    contents (``MADV_POPULATE_WRITE``); returns the bytes covered, 0 when there is no whole page or the
    tensor is not a contiguous CPU one, ``-1`` off Linux or when the kernel refuses (then never tried again
    in this process)."""
    global _populate_ok
    if not can_populate():
        return -1
    fn = libc_madvise()
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        return 0
    page = mmap.PAGESIZE
    begin = tensor.data_ptr()
    lo = -(-begin // page) * page
    hi = (begin + tensor.nbytes) // page * page
    if hi <= lo:
        return 0
    if fn(lo, hi - lo, _MADV_POPULATE_WRITE) != 0:
        _populate_ok = False
        return -1
    return hi - lo


AUTO = "auto"


def check_pool_bytes(value: int | str | None, what: str = "pool_bytes", auto: bool = False) -> int | str | None:
    """``value`` as a positive byte count, or ``None`` (unbounded); with ``auto``, the string ``"auto"`` too
    (returned as ``"auto"``: :func:`auto_pool_bytes` resolves it).  Accepts an ``int`` or a size string
    (``"512MiB"``); ``0``, negative numbers, floats, bools and anything else raise ``ValueError``."""
    if value is None:
        return None
    if auto and isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    choices = ("'auto', None (unbounded), " if auto else "None (unbounded), ") + \
        "a positive byte count or a size string like '512MiB'"
    if isinstance(value, float):
        raise ValueError(f"{what} must be {choices}, not a float ({value!r})")
    try:
        n = parse_size(value, what)
    except ValueError as exc:
        raise ValueError(f"{exc} ({what} takes {choices})") from None
    if n <= 0:
        raise ValueError(f"{what} must be {choices}; got {value!r}")
    return n


def auto_pool_bytes(capacities: dict[str, int], device: torch.device | str, borrowed: bool = False) -> tuple[int, str]:
    """The bound ``pool_bytes="auto"`` stands for, and where it came from (``stats()["pipeline"]
    ["pool_bound_source"]``): the budget of the memory tier on the model's ``device`` (the ``"host"`` tier
    for a CPU model, the ``"gpu"`` tier for any other device), or, when that tier is absent, the other
    memory tier's.  ``capacities``: ``{tier name: bytes}`` of the enabled tiers
    (:meth:`~tiercache_llm.store.BlockStore.tier_capacities`; for a borrowed ``tiercache.Cache``, its own
    tiers: ``borrowed`` only changes the text).

    Raises:
        ValueError: neither memory tier has a budget (a disk-only cache): there is no memory budget to
            follow, so the caller must choose ``pool_bytes`` (a bound, or ``None`` for unbounded).
    """
    kind = torch.device(device).type
    order = ("host", "gpu") if kind == "cpu" else ("gpu", "host")
    of = " of the given tiercache.Cache" if borrowed else ""
    for i, tier in enumerate(order):
        n = int(capacities.get(tier, 0) or 0)
        if n > 0:
            why = f"model on {kind}" if i == 0 else f"model on {kind}, no {order[0]} tier"
            return n, f"auto: the {tier} tier's budget{of} ({why})"
    raise ValueError(no_memory_tier_message(capacities))


def no_memory_tier_message(capacities: dict[str, int]) -> str:
    tiers = ", ".join(f"{k}={format_size(v)}" for k, v in capacities.items()) or "none"
    return (f"pool_bytes='auto' (the default) bounds sparse decode's resident pools by the budget of a memory "
            f"tier (gpu or host), and this cache has none (tiers: {tiers}); pass pool_bytes= a byte count or "
            f"size string, or None for unbounded pools")


class PoolArena:
    """The slots shared by the :class:`ResidentPool` of every layer of one cache (see module doc).

    Attributes:
        k / v: ``(N, B, Hk, S, Dk)`` / ``(N, B, Hv, S, Dv)`` (``None`` until the first assign); ``N >=
            capacity``, slots ``>= capacity`` are never used.  Views ``kv[:, :, :, 0]`` / ``kv[:, :, :, 1]`` when joint.
        kv: the part-major joint storage ``(N, B, H, 2, S, D)`` (``joint``), else ``None``.
        joint: the layout of the current tensors (set by the first assign after a clear).
        max_bytes: the bound (``None``: unbounded).
        grows: times the capacity grew; reallocs: times the tensors were reallocated (held slots copied);
        evicted: blocks evicted for room (by any layer, from any layer); over_budget: assigns whose union
        did not fit the bound (the arena grew past it); peak_slots: the largest capacity so far.
    """

    def __init__(self, retention: Retention = "previous", factor: float = 1.0,
                 max_bytes: int | str | None = None, eviction: Eviction | None = None) -> None:
        if retention not in ("none", "previous", "mass"):
            raise ValueError(f"retention must be 'none', 'previous' or 'mass', got {retention!r}")
        if eviction is None:
            eviction = "distance"
        if eviction not in ("mass", "distance"):
            raise ValueError(f"pool eviction must be 'mass' or 'distance', got {eviction!r}")
        self.eviction = eviction
        # Bounded: evict the blocks marked cheap to read again (ResidentPool.cheap) before the others (see module doc).
        self.prefer_cheap = False
        if not (isinstance(factor, (int, float)) and not isinstance(factor, bool) and factor >= 1.0):
            raise ValueError(f"pool factor must be a number >= 1.0, got {factor!r}")
        self.retention = retention
        self.factor = float(factor)
        self.max_bytes = check_pool_bytes(max_bytes, "pool max_bytes")
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.kv: torch.Tensor | None = None
        # (rows, B, H) bool on the CPU: which (row, KV head) parts of each slot hold its block's bytes (part reads
        # fill only the selected parts of a slot; the others hold stale bytes).  Cleared when a slot is assigned
        # to a block, set by whatever fills it (mark_parts).  Bookkeeping only: nothing here reads or writes it
        # on its own but assign (clears) and reserve (a reserved slot's read is whole: set).
        self.parts: torch.Tensor | None = None
        self.joint = False
        self.huge_pages = False  # CPU slot tensors allocated from then on with huge_empty (see PipelineConfig)
        self.pools: list["ResidentPool"] = []  # in fetch order (the order the layers were created in)
        self._free: list[int] = []
        self.tail_slot: int | None = None
        self._capacity = 0
        self._slot_bytes = 0  # bytes of one K slot plus one V slot
        self.grows = 0
        self.reallocs = 0
        self.evicted = 0
        self.over_budget = 0
        self.peak_slots = 0
        self._warned = False
        self._pending: dict[int, concurrent.futures.Future] = {}  # slot -> the background read landing in it
        self.pending_waits = 0  # releases, clears and reallocations that waited for a read in flight
        self.pending_wait_seconds = 0.0
        self.fresh_evicted = 0  # reserved blocks (ResidentPool.fresh) evicted before their layer's fetch
        # Evictions pass over slots with a read in flight (see module doc); False: they wait for the read.
        self.pass_in_flight = True
        # Called before waiting for a pending read: starts reads whose start the owner holds back (a read marked
        # pending may not have been submitted yet, DecodePipeline's slot_reads_after_sync).
        self.start_pending: Callable[[], None] | None = None

    def pool(self) -> "ResidentPool":
        """A new layer view (layers fetch in the order their views were made)."""
        view = ResidentPool(arena=self)
        return view

    # ----------------------------------------------------------------------------- queries
    @property
    def capacity(self) -> int:
        """Slots in use or free (the rows beyond it are an untouched reservation)."""
        return self._capacity

    @property
    def nbytes(self) -> int:
        """Memory of the ``capacity`` slots."""
        return self._capacity * self._slot_bytes

    @property
    def slot_bytes(self) -> int:
        return self._slot_bytes

    @property
    def storages(self) -> tuple[torch.Tensor, ...]:
        """The contiguous tensors behind ``k`` / ``v``: ``(kv,)`` when joint, else ``(k, v)`` (empty before the
        first assign); slicing one along its first dimension gives whole slots (e.g. to fault pages in)."""
        if self.k is None:
            return ()
        return (self.kv,) if self.kv is not None else (self.k, self.v)

    @property
    def bound_slots(self) -> int | None:
        """The bound in slots (``None`` when unbounded or before the first assign fixed the slot size)."""
        if self.max_bytes is None or not self._slot_bytes:
            return None
        return self.max_bytes // self._slot_bytes

    @property
    def held(self) -> int:
        """Stored blocks held by all layers."""
        return sum(len(p.slot_of) for p in self.pools)

    # ----------------------------------------------------------------------------- steps
    def assign(self, view: "ResidentPool", stored: Sequence[int], keys: Sequence[Hashable], tail: bool,
               shape_k: tuple, shape_v: tuple, dtype: torch.dtype, device: torch.device,
               mass: torch.Tensor | None = None, reserve: int = 0,
               limit: int | None = None, joint: bool = False) -> tuple[list[int], list[int], int | None]:
        """See :meth:`ResidentPool.assign` (``reserve`` is per layer here)."""
        device = torch.device(device)
        if joint and tuple(shape_k) != tuple(shape_v):
            raise ValueError(f"a joint pool needs equal K and V slot shapes, got {tuple(shape_k)} and {tuple(shape_v)}")
        if self.k is not None and (tuple(self.k.shape[1:]) != tuple(shape_k) or tuple(self.v.shape[1:]) != tuple(shape_v)
                                   or self.k.dtype != dtype or self.k.device != device or self.joint != joint):
            self.clear()  # batch size or layout changed: nothing held is usable
        if self.k is None:
            self.joint = joint
        if self.tail_slot is not None:  # every layer's tail slot is done with once another fetch starts
            self._free.append(self.tail_slot)
            self.tail_slot = None
        if mass is not None:
            view._mass = mass
        if self.retention == "none":
            for p in self.pools:
                p._release(list(p.slot_of), count=False)
        want = set(stored)
        slot_of, key_of = view.slot_of, view._key_of
        stale: list[int] = []
        missing: list[int] = []  # not held, or held under another key (released just below)
        for i, (j, key) in enumerate(zip(stored, keys)):
            slot = slot_of.get(j)
            if slot is None:
                missing.append(i)
            elif key_of.get(slot) != key:
                stale.append(j)
                missing.append(i)
        view._release(stale, count=False)
        if self.retention == "previous":  # blocks outside ``stored`` only: ``missing`` stays right
            # (a reserved block whose read is in flight goes once it landed: at the layer's next fetch, or
            # below if the allowance needs its slot)
            busy = bool(self._pending)
            view._release([j for j in slot_of if j not in want and not (busy and self._in_flight(view, j))])
        need = len(missing) + (1 if tail else 0)
        union = len(stored) + (1 if tail else 0)
        # Every block outside the union can be evicted, so ``union`` slots always suffice; "mass" gives a
        # layer room for ``factor`` x its union so blocks outside it can stay.  The allowance grows like a
        # pool of its own would: 1.25 x the first need, then geometrically, never past the layer's limit.
        target = math.ceil(self.factor * union) if self.retention == "mass" else union
        cpu = device.type == "cpu"
        cap = max(union, limit) if limit is not None and cpu else None
        view._limit = cap
        if view.allowance == 0:
            grown = max(1, math.ceil(GROWTH * target))
        elif view.allowance < target:
            grown = max(target, math.ceil(GROWTH * view.allowance))
        else:
            grown = view.allowance
        view.allowance = max(union, min(grown, cap)) if cap is not None else grown
        # The layer's own share first: beyond its allowance it evicts its own unselected blocks.
        over = len(slot_of) + need - view.allowance
        if over > 0:
            own = self._own_order(view, want)
            if self._pending:  # never wait for the share: a slot still being read into goes at the next fetch
                own = [j for j in own if not self._in_flight(view, j)]
            view._release(own[:over])
        self._make_room(view, want, need, cpu, reserve, shape_k, shape_v, dtype, device)
        for i in missing:
            slot = self._free.pop()
            slot_of[stored[i]] = slot
            key_of[slot] = keys[i]
        if missing and self.parts is not None:  # a slot handed to a block holds none of its parts yet
            self.parts[[slot_of[stored[i]] for i in missing]] = False
        if tail:
            self.tail_slot = self._free.pop()
        return [slot_of[j] for j in stored], missing, self.tail_slot

    def reserve(self, view: "ResidentPool", blocks: Sequence[int], keys: Sequence[Hashable],
                protect: tuple["ResidentPool", set] | None = None) -> list[tuple[int, int]]:
        """Slots for ``view``'s ``blocks`` (K keys ``keys``; none of them held by ``view``), ahead of its fetch,
        for a background read (:meth:`mark_pending`): ``(block, slot)`` pairs for the longest prefix of
        ``blocks`` that fits.  Only the arena's current tensors are used (nothing before the first assign, never
        a growth): the free slots, then, under a bound, the blocks :meth:`_victims` names for ``view`` (as its
        own fetch would evict), except those ``protect`` names (``(pool, blocks)``: the selection of the layer
        fetching now, which its attention is about to read), and never ``view``'s own blocks (a prediction
        evicting blocks its layer then selects would turn hits into reads): ``view`` gets at most its allowance
        minus what it holds.  The reserved blocks enter ``view``'s map (counted
        against the bound) and :attr:`ResidentPool.fresh`; the caller must start their read or :meth:`~ResidentPool.drop`
        them."""
        n = len(blocks)
        if self.k is None or not n or not view.allowance or self.retention == "none":
            return []
        want = set(blocks)
        n = min(n, view.allowance - len(view.slot_of))  # a prediction never evicts the layer's own blocks
        if n <= 0:
            return []
        short = n - len(self._free)
        if short > 0:  # grow as a fetch would (within the layers' allowances and the bound), never reallocating
            target = min(self._target(), self.k.shape[0])
            cap = self._limit_total() if self.k.device.type == "cpu" else None
            bound = self.bound_slots
            target = min(target, cap if cap is not None else target, bound if bound is not None else target)
            if target > self._capacity:
                self._grow(target, tuple(self.k.shape[1:]), tuple(self.v.shape[1:]), self.k.dtype, self.k.device)
            short = n - len(self._free)
        if short > 0 and self.max_bytes is not None:
            # Never a slot whose read is in flight (waiting would stall the forward thread for another layer's
            # read): a block left without a slot is staged instead.
            # Distance is counted from the fetching layer (``protect``'s), not from ``view``, which may be several
            # fetches ahead: the layers between them fetch first and must not lose blocks to it.
            origin = None
            if protect is not None and protect[0] in self.pools:
                origin = self.pools[(self.pools.index(protect[0]) + 1) % len(self.pools)]
            for p, j in self._victims(view, want, short + len(view.slot_of), protect, in_flight=False,
                                      origin=origin):
                if p is not view:
                    p._release([j])
                    short -= 1
                    if not short:
                        break
        n = min(n, len(self._free))
        out = []
        for j, key in zip(blocks[:n], keys[:n]):
            slot = self._free.pop()
            view.slot_of[j] = slot
            view._key_of[slot] = key
            view.fresh.add(j)
            out.append((j, slot))
        if out and self.parts is not None:  # the background read into a reserved slot reads the whole entry
            self.parts[[slot for _, slot in out]] = True
        return out

    def mark_parts(self, slots: Sequence[int], parts: torch.Tensor | None = None) -> None:
        """Record what was (or is being) written into ``slots``: every (row, KV head) part (``parts`` ``None``),
        or in addition to what they held, the parts ``parts`` ``(len(slots), B, H)`` bool names.  A write that
        fails must release its slot (a released slot is cleared when it is assigned again)."""
        if self.parts is None or not len(slots):
            return
        if parts is None:
            self.parts[list(slots)] = True
        else:
            index = torch.as_tensor(list(slots), dtype=torch.long)
            self.parts.index_copy_(0, index, self.parts.index_select(0, index) | parts.to(self.parts.device))

    def parts_of(self, slots: Sequence[int]) -> torch.Tensor | None:
        """``(len(slots), B, H)`` bool: the parts of ``slots`` that hold their block's bytes (``None`` before the
        first assign)."""
        if self.parts is None:
            return None
        return self.parts.index_select(0, torch.as_tensor(list(slots), dtype=torch.long))

    def mark_pending(self, slots: Sequence[int], read: concurrent.futures.Future) -> None:
        """``read`` (a future) writes into ``slots`` (reserved by :meth:`reserve`): until it is settled, releasing
        one of them waits for it."""
        for slot in slots:
            self._pending[slot] = read

    def settle(self, view: "ResidentPool", wait: bool = True, release: bool = True) -> tuple[list[int], int, float]:
        """Before ``view``'s attention: wait for the reads into its reserved slots (``wait=False``: settle only
        those already finished, the others stay pending); the blocks whose read failed (or was cancelled) are
        released (never attended), or with ``release=False`` kept in their slots for the caller to read into
        (nothing else writes a slot once its read finished).  Returns ``(failed blocks, waits, seconds waited)``;
        the blocks read stay in :attr:`ResidentPool.fresh` for the caller to account."""
        failed: list[int] = []
        waits, waited = 0, 0.0
        for j in list(view.fresh):
            slot = view.slot_of.get(j)
            read = self._pending.get(slot) if slot is not None else None
            if read is None:
                continue
            if not read.done():
                if not wait:
                    continue
                t0 = time.perf_counter()
                if self.start_pending is not None:
                    self.start_pending()
                concurrent.futures.wait([read])
                waits += 1
                waited += time.perf_counter() - t0
            del self._pending[slot]
            if read.cancelled() or read.exception() is not None:
                failed.append(j)
        if failed and release:
            view._release(failed, count=False)
        return failed, waits, waited

    def unsettled(self, view: "ResidentPool") -> set[int]:
        """``view``'s blocks whose read (:meth:`mark_pending`) is still pending (not settled)."""
        pending = self._pending
        return {j for j in view.fresh if view.slot_of.get(j) in pending} if pending else set()

    def _wait_pending(self, reads: list, cancel: bool = False) -> None:
        """Wait for ``reads`` (cancelling those not started with ``cancel``)."""
        todo = [r for r in dict.fromkeys(reads) if not (cancel and r.cancel()) and not r.done()]
        if todo:
            if self.start_pending is not None:
                self.start_pending()
            t0 = time.perf_counter()
            concurrent.futures.wait(todo)
            self.pending_waits += 1
            self.pending_wait_seconds += time.perf_counter() - t0

    def clear(self) -> None:
        """Release everything, in every layer (crop, reorder, batch selection, reset); reads into reserved
        slots are cancelled if they have not started, else waited for."""
        self._wait_pending(list(self._pending.values()), cancel=True)
        self._pending.clear()
        self.k = self.v = self.kv = self.parts = None
        for p in self.pools:
            p.slot_of.clear()
            p._key_of.clear()
            p.cheap.clear()
            p.fresh.clear()
            p.allowance = 0
        self._free = []
        self.tail_slot = None
        self._capacity = 0

    # ----------------------------------------------------------------------------- internals
    def _target(self) -> int:
        """Slots the arena would hold unbounded: the layers' allowances (one layer's for ``"none"``)."""
        allowances = [p.allowance for p in self.pools]
        return (max(allowances) if self.retention == "none" else sum(allowances)) if allowances else 0

    def _limit_total(self) -> int | None:
        limits = [p._limit for p in self.pools if p.allowance]
        if not limits or any(x is None for x in limits):
            return None
        return max(limits) if self.retention == "none" else sum(limits)

    def _make_room(self, view: "ResidentPool", want: set, need: int, cpu: bool, reserve: int,
                   shape_k: tuple, shape_v: tuple, dtype: torch.dtype, device: torch.device) -> None:
        if len(self._free) >= need and self.k is not None:
            return
        if self.k is None:
            probe_k = torch.empty(shape_k, dtype=dtype, device="meta")
            probe_v = torch.empty(shape_v, dtype=dtype, device="meta")
            self._slot_bytes = probe_k.numel() * probe_k.element_size() + probe_v.numel() * probe_v.element_size()
        bound = self.bound_slots
        target = self._target()
        cap = self._limit_total() if cpu else None
        if cap is not None:
            target = min(target, cap)
        if bound is not None:
            target = min(target, bound)
        if self._capacity < target:
            # On the CPU growth within the reservation copies nothing, so the capacity follows the layers'
            # allowances exactly; elsewhere a growth reallocates, so it is geometric.
            n = target if cpu or self.k is None else max(target, math.ceil(GROWTH * self._capacity))
            if cap is not None:
                n = min(n, max(cap, target))
            layers = 1 if self.retention == "none" else max(1, len(self.pools))
            rows = int(reserve) * layers
            if bound is not None:
                rows = min(rows, bound)
                if not cpu and self.k is None:
                    # Memory is committed on allocation here and every growth copies the held slots: take
                    # the bound (or the reservation, if smaller) at once, it is what the caller budgeted.
                    n = max(n, rows)
                n = min(n, bound)
            self._grow(n, shape_k, shape_v, dtype, device, rows)
        short = need - len(self._free)
        if short > 0:
            for p, j in self._victims(view, want, short):
                p._release([j])
            short = need - len(self._free)
        if short > 0:  # the union itself does not fit the bound
            self.over_budget += 1
            if not self._warned:
                self._warned = True
                warnings.warn(
                    f"sparse decode: one layer's selected blocks need {self._capacity + short} pool slots "
                    f"({format_size((self._capacity + short) * self._slot_bytes)}), more than pool_bytes="
                    f"{format_size(self.max_bytes)} allows; the pool grows past its bound to hold them "
                    f"(stats()['pipeline']['pool_over_budget'] counts such steps)", RuntimeWarning, stacklevel=6)
            self._grow(self._capacity + short, shape_k, shape_v, dtype, device, 0)
        if self.k is None:  # an empty union (e.g. a context cropped to nothing): attention still needs the tensors
            self._grow(self._capacity, shape_k, shape_v, dtype, device, 0)

    def _own_order(self, view: "ResidentPool", want: set) -> list[int]:
        """``view``'s blocks outside ``want``, in the order they are evicted: lowest mass first; bounded with
        ``prefer_cheap``, the blocks marked cheap (:attr:`ResidentPool.cheap`) before the others."""
        others = [j for j in view.slot_of if j not in want]
        if view._mass is not None and len(others) > 1 and self.retention != "none":
            values = view._mass.tolist()
            n = len(values)
            if self.prefer_cheap and self.max_bytes is not None and view.cheap:
                cheap = view.cheap
                others.sort(key=lambda j: (j not in cheap, values[j] if j < n else 0.0))
            else:
                others.sort(key=lambda j: values[j] if j < n else 0.0)
        return others

    def _in_flight(self, pool: "ResidentPool", block: int) -> bool:
        """Whether a background read into ``pool``'s slot of ``block`` has not finished (releasing it would wait);
        always ``False`` without :attr:`pass_in_flight` (evictions then take such slots in order, waiting)."""
        if not self.pass_in_flight:
            return False
        read = self._pending.get(pool.slot_of[block])
        return read is not None and not read.done()

    def _victims(self, view: "ResidentPool", want: set, count: int,
                 protect: tuple["ResidentPool", set] | None = None,
                 in_flight: bool = True, origin: "ResidentPool | None" = None) -> list[tuple["ResidentPool", int]]:
        """Up to ``count`` held blocks to evict for the fetching ``view`` (never one it selected, nor one of
        ``protect``'s blocks: ``(pool, blocks)``), in eviction order, except that blocks whose slot has a read in
        flight (:meth:`mark_pending`, not finished) come after every other candidate (releasing one waits for
        the read), or with ``in_flight=False`` are never named.  ``origin``: with ``"distance"``, the layers are
        ordered by their distance from ``origin``'s fetch instead of ``view``'s (a reservation several layers
        ahead).  Only what stays resident changes."""
        if protect is not None:
            guarded, keep = protect
            return [(p, j) for p, j in self._victims(view, want, count + len(keep), in_flight=in_flight, origin=origin)
                    if not (p is guarded and j in keep)][:count]
        busy: list[tuple[ResidentPool, int]] = []  # candidates whose read is in flight, in eviction order
        check = bool(self._pending)
        if self.eviction == "mass":
            cands = []
            for pi, p in enumerate(self.pools):
                if not p.slot_of:
                    continue
                values = p._mass.tolist() if p._mass is not None else []
                n = len(values)
                mine = p is view
                cands.extend((values[j] if j < n else 0.0, pi, j, p) for j in p.slot_of
                             if not (mine and j in want))
            order = lambda c: (c[0], c[1], c[2])  # noqa: E731
            if check:
                busy = [(p, j) for _, _, j, p in sorted((c for c in cands if self._in_flight(c[3], c[2])), key=order)]
                cands = [c for c in cands if not self._in_flight(c[3], c[2])]
            out = [(p, j) for _, _, j, p in heapq.nsmallest(count, cands, key=order)]
        else:
            # Farthest next fetch first: the layers just before the fetching one (cyclic order), then itself;
            # within a layer the lowest mass first (when its mass is known).
            n = len(self.pools)
            me = self.pools.index(view if origin is None else origin)
            out = []
            for d in range(n - 1, -1, -1):
                p = self.pools[(me + d) % n]
                if not p.slot_of:
                    continue
                blocks = self._own_order(p, want) if p is view else self._own_order(p, set())
                for j in blocks:
                    if check and self._in_flight(p, j):
                        busy.append((p, j))
                        continue
                    out.append((p, j))
                    if len(out) == count:
                        return out
        if in_flight and len(out) < count:
            out.extend(busy[: count - len(out)])
        return out

    def _grow(self, n: int, shape_k: tuple, shape_v: tuple, dtype: torch.dtype, device: torch.device,
              reserve: int = 0) -> None:
        old = self._capacity
        if self.k is None or n > self.k.shape[0]:
            self._wait_pending(list(self._pending.values()))  # reads land in the old tensors: copy them whole
            rows = max(n, int(reserve)) if torch.device(device).type == "cpu" else n
            # Page-aligned slots (entries are 512-byte multiples): direct disk reads land in them, no bounce copy.
            copy = old and any(p.slot_of for p in self.pools)  # one plain copy of the old slots (most are held)
            empty = partial(huge_empty, min_bytes=HUGE_MIN_BYTES) if self.huge_pages else aligned_empty
            if self.joint:
                kv = empty((rows, *shape_k[:2], 2, *shape_k[2:]), dtype=dtype, device=device)  # part-major
                if copy:
                    kv[:old].copy_(self.kv[:old])
                k, v = kv[:, :, :, 0], kv[:, :, :, 1]
            else:
                kv = None
                k = empty((rows, *shape_k), dtype=dtype, device=device)
                v = empty((rows, *shape_v), dtype=dtype, device=device)
                if copy:
                    k[:old].copy_(self.k[:old])
                    v[:old].copy_(self.v[:old])
            parts = torch.zeros((rows, *shape_k[:2]), dtype=torch.bool)  # (rows, B, H): nothing held yet
            if copy and self.parts is not None:
                parts[:old].copy_(self.parts[:old])
            if self.k is not None:
                self.reallocs += 1
            self.k, self.v, self.kv, self.parts = k, v, kv, parts
            self._slot_bytes = (math.prod(shape_k) + math.prod(shape_v)) * k.element_size()
        self._capacity = n
        self.peak_slots = max(self.peak_slots, n)
        self._free.extend(range(n - 1, old - 1, -1))  # pop() hands out the lowest new slot first
        self.grows += 1


class ResidentPool:
    """One sparse layer's resident blocks: its view of a :class:`PoolArena` (see module doc).  Made
    without an arena, it has one of its own (a single-layer pool).

    Attributes:
        k / v: the arena's tensors.
        slot_of: block index -> slot of the stored blocks this layer holds.
        allowance: the most slots this layer may hold (its share when unbounded).
    """

    def __init__(self, retention: Retention = "previous", factor: float = 1.0, arena: PoolArena | None = None,
                 max_bytes: int | str | None = None) -> None:
        if arena is None:
            arena = PoolArena(retention, factor, max_bytes)
        self.arena = arena
        self.retention = arena.retention
        self.factor = arena.factor
        self.slot_of: dict[int, int] = {}
        self._key_of: dict[int, Hashable] = {}  # slot -> tiercache key of the K entry it holds
        self._mass: torch.Tensor | None = None  # the layer's decayed mass (updated in place by placement)
        self._limit: int | None = None
        self.allowance = 0
        # Blocks the caller marked cheap to read again (the pipeline: both entries were in the fastest tier when
        # read); with the arena's ``prefer_cheap`` a bounded arena evicts them first.  Never affects contents.
        self.cheap: set[int] = set()
        # Blocks given slots ahead of this layer's fetch for a background read (PoolArena.reserve), not yet
        # settled and accounted by a fetch of this layer.
        self.fresh: set[int] = set()
        arena.pools.append(self)

    # ----------------------------------------------------------------------------- queries
    @property
    def k(self) -> torch.Tensor | None:
        return self.arena.k

    @property
    def v(self) -> torch.Tensor | None:
        return self.arena.v

    @property
    def kv(self) -> torch.Tensor | None:
        """The arena's part-major joint storage ``(N, B, H, 2, S, D)`` (``None`` unless its layout is joint)."""
        return self.arena.kv

    def entry_views(self, slots: Sequence[int]) -> list[torch.Tensor]:
        """The views the entries of blocks held in ``slots`` are read into, in :func:`~.fetch.layer_keys`'
        order: ``kv[s]`` per slot for a joint layout, else every ``k[s]`` then every ``v[s]``."""
        if self.kv is not None:
            return [self.kv[s] for s in slots]
        return [self.k[s] for s in slots] + [self.v[s] for s in slots]

    @property
    def tail_slot(self) -> int | None:
        return self.arena.tail_slot

    @property
    def capacity(self) -> int:
        """The arena's slots (shared by every layer)."""
        return self.arena.capacity

    @property
    def nbytes(self) -> int:
        """The arena's memory (shared by every layer)."""
        return self.arena.nbytes

    @property
    def grows(self) -> int:
        return self.arena.grows

    @property
    def reallocs(self) -> int:
        return self.arena.reallocs

    @property
    def evicted(self) -> int:
        return self.arena.evicted

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
               limit: int | None = None, joint: bool = False) -> tuple[list[int], list[int], int | None]:
        """Slots for one step of this layer whose union is the stored blocks ``stored`` (K keys ``keys``)
        plus the tail block when ``tail``.  ``shape_k`` / ``shape_v``: ``(B, H, S, D)`` of one slot;
        ``mass``: the layer's per-block decayed attention mass (``"mass"`` retention's eviction order;
        kept by reference, so in-place updates count); ``reserve``: rows worth allocating per layer when
        the tensors are (re)allocated on the CPU (see the module doc; it changes no slot decision);
        ``limit``: the most blocks the layer can select (its stored blocks plus the tail).  On the CPU a
        layer's allowance never exceeds it (more slots could never be used at once).  ``joint`` (needs
        ``shape_k == shape_v``): the arena's layout is one joint storage (:attr:`kv`); a change of layout
        clears the arena like a change of shape.

        Returns ``(slots, missing, tail_slot)``: the slot of each stored block (in ``stored`` order), the
        positions in ``stored`` whose slot does not hold the block yet (the caller must fill them before
        attention, or :meth:`drop` them on failure), and the tail's slot (``None`` without a tail).  The
        other positions hold their block already and must not be written.  May evict other layers'
        blocks (see the module doc)."""
        return self.arena.assign(self, stored, keys, tail, shape_k, shape_v, dtype, device, mass, reserve, limit,
                                 joint)

    def drop(self, blocks: Sequence[int]) -> None:
        """Forget ``blocks`` (e.g. their read failed): their slots become free."""
        self._release([j for j in blocks if j in self.slot_of], count=False)

    def clear(self) -> None:
        """Release everything of the arena (every layer: crop, reorder, batch selection, reset)."""
        self.arena.clear()

    def _release(self, blocks: list[int], count: bool = True) -> None:
        arena = self.arena
        free, pending = arena._free, arena._pending
        cheap, fresh = self.cheap, self.fresh
        for j in blocks:
            slot = self.slot_of.pop(j)
            if pending:
                read = pending.pop(slot, None)
                if read is not None:  # a read lands in this slot: never hand it on before it finished
                    arena._wait_pending([read])
            self._key_of.pop(slot, None)
            cheap.discard(j)
            if j in fresh:
                fresh.discard(j)
                if count:
                    arena.fresh_evicted += 1
            free.append(slot)
        if count:
            self.arena.evicted += len(blocks)


def identity_pool(kbuf: torch.Tensor, vbuf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(k_pool, v_pool, slot_of_fetch)`` of buffers already in ``sel.fetch`` order (slot ``u`` = entry ``u``)."""
    return kbuf, vbuf, torch.arange(kbuf.shape[0], dtype=torch.long, device=kbuf.device)


__all__ = ["Eviction", "PoolArena", "ResidentPool", "Retention", "can_populate", "check_pool_bytes", "auto_pool_bytes", "AUTO",
           "identity_pool", "populate"]
