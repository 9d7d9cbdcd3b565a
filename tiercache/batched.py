"""The cache's data paths, batch first: ``put_many``/``get_many``/``delete_many`` over N keys do O(1)
index-lock round trips and counter updates per batch plus a tight loop per key; ``put``, ``get`` and
``delete`` are the same paths with N = 1.

Per batch: every item is validated before anything changes; the index lock is taken once to look up and
pin every source slot (or reserve every destination slot), once to publish or count, once to unpin.
Bytes move outside the lock: memory-tier values are copied once, in their own dtype, straight between
the arena and the destination tensor; disk-tier values are read (verified) through the tier's batched
``read_into`` when it has one.  Entry headers were checked when the entry was created, so a read only
views the payload as the stored dtype and shape.  Policy bookkeeping on a hit is skipped when the
policy declares that a hit cannot change its rank (``rank_reads_access = False``), and deferred to
eviction time when it declares that a hit can only raise it (``rank_grows_on_access``, the built-in
policies): a hit then only updates the entry's info.
"""

from __future__ import annotations

import heapq
import operator
import os
import threading
import time
from functools import partial
from typing import Any, Callable, Hashable, Iterable, Sequence

import numpy
import torch

from .errors import CacheClosedError, CorruptEntryError, TierCacheError
from .index import _DTYPE_NAMES, _TOKENS, COMPACT_MIN_ITEMS, COMPACT_RATIO, Entry, dtype_name, rescore
from .keys import MAX_DIMS, check_key, encode_key
from .moves import Moves
from .sizes import format_size
from .state import Release, log
from .tiers.base import EntryHeader, Slot
from .tiers.disk import DiskTier
from .tiers.memory import GIL_HELD_MAX_BYTES, MEMMOVE_MAX_BYTES, ArenaTier, copy_bytes, memmove, memmove_holding_gil
from .transfer import CopyEngine, chunk_file_bytes, packed_layout, read_chunk_into
from .values import _SHAPES, _TEMPLATES, _shape_of, as_bytes, check_score, check_scores, copy_payload, flat, new_tensor, tensor_data

_CPU = torch.device("cpu")
_perf_counter = time.perf_counter
_Tensor = torch.Tensor
_STRIDED = torch.strided
_heappush = heapq.heappush
_empty_like = torch.empty_like
# The dtypes whose CPU tensors a single put copies without tensor_data's call (neither complex, whose
# conjugate views must be resolved, nor quantized).
_PLAIN_DTYPES = frozenset(d for d in vars(torch).values() if isinstance(d, torch.dtype) and not d.is_complex
                          and not str(d).removeprefix("torch.").startswith("q"))
# Keys a single put does not encode (``Entry.header`` does when the entry first needs its header): ints
# of fewer than 600 digits (within any ``sys.set_int_max_str_digits``, whose least is 640) and strs of at
# most 510 characters (4 UTF-8 bytes each at most): their encodings always fit MAX_KEY_BYTES.
_LAZY_INT = 10 ** 600
_NEG_LAZY_INT = -_LAZY_INT  # (``-_LAZY_INT`` in a test would build a 600-digit int per call: ~40 ns)
_LAZY_STR = 510
_FLAT_KEY_TYPES = frozenset((int, str, bytes))  # a tuple of only these is a valid key (no check_key walk)
_Pinned = tuple[Entry, int, Slot, Any]  # an entry, the tier and slot pinned for it, its header (arena tiers: the entry, which has nbytes and shape)


class DataPaths(Moves):
    """``put``/``get``/``delete`` and their batched forms, on :class:`tiercache.state.CacheState`."""

    # -- put ------------------------------------------------------------------------------------------
    def _put_batch(
        self,
        items: Iterable[tuple[Hashable, torch.Tensor]],
        scores: Sequence[float | None],
        *,
        bracket: bool = False,
    ) -> None:
        """Store every ``(key, value)``.  Every item is validated first (nothing is stored if one is
        invalid); then runs of items whose slots can be allocated without making room are reserved under
        one lock, written outside it and published under one lock; an item that needs room made goes
        through ``_reserve`` (demotion) on its own.  On an I/O or capacity error the items before the
        failing one stay stored and the rest are not.  With ``bracket`` this call is the public
        operation's ``_begin``/``_end``, folded into its first and last lock round trips (a single-value
        put takes the index lock twice)."""
        prepared = []
        datas: list[torch.Tensor] = []  # the tensors apart, so that items of atomic values go untracked by the GC
        try:
            for (key, value), score in zip(items, scores):
                kind = type(key)
                if kind is int and _NEG_LAZY_INT < key < _LAZY_INT or kind is str and len(key) <= _LAZY_STR:
                    key_bytes = None  # encoded when a header needs it (see ``put``)
                else:
                    key_bytes = encode_key(key)
                # tensor_data's checks, inlined for a plain CPU tensor of a real, non-quantized dtype that
                # needs no detach and no resolving (it returns such a tensor as it is; see ``put``); a
                # contiguous one is marked for ``_put_direct``, which then does not ask again.
                if (value.__class__ is _Tensor and (dtype := value.dtype) in _PLAIN_DTYPES
                        and value.layout is _STRIDED and value.is_cpu and not value.is_nested
                        and not value.is_neg() and not value.requires_grad
                        and len(shape := _SHAPES.get(value.shape) or _shape_of(value)) <= MAX_DIMS):
                    data, plain = value, value.is_contiguous()
                else:
                    data, dtype, shape = tensor_data(value)
                    plain = False
                if score is not None:
                    score = check_score(score)
                datas.append(data)
                prepared.append((key, key_bytes, plain, dtype, shape, data.nbytes, score))
                # prepared item: (key, encoded key or None, whether the tensor (datas[i]) is known to be a
                # contiguous CPU tensor, dtype, shape, nbytes, score)
        except (TypeError, ValueError):
            if bracket and (self._closing or self._closed):  # a closed cache says so first
                raise CacheClosedError("this tiercache.Cache is closed") from None
            raise
        if not prepared:
            with self._lock:
                self._check_open()
            return
        tiers = self._tiers
        limits = self._limits  # fixed per tier: read without the lock
        largest = self._largest_limit
        first = limits[0]
        homes = []  # the fastest tier that can hold each value at all
        for item in prepared:
            nbytes = item[5]
            if nbytes <= first:
                homes.append(0)
                continue
            if nbytes > largest:
                raise ValueError(
                    f"value of {format_size(nbytes)} is larger than every tier "
                    f"(the largest slot holds {format_size(max(largest, 0))})"
                )
            homes.append(next(t for t, limit in enumerate(limits) if nbytes <= limit))
        position, count = 0, len(prepared)
        begun = ended = False
        direct = self._direct_tiers if any(self._direct_tiers) else None
        try:
            while position < count:
                run: list[tuple[int, Slot, EntryHeader]] = []  # (tier, slot, header) for prepared[position:]
                with self._lock:
                    if bracket and not begun:
                        if self._closing or self._closed:
                            raise CacheClosedError("this tiercache.Cache is closed")
                        self._active += 1
                        begun = True
                    else:
                        self._check_open()
                    at = position
                    later = None
                    if direct is not None:  # small CPU values bound for a CPU arena: stored right here
                        at = self._put_direct(prepared, datas, homes, position, direct)
                        # This call's releases, taken in the lock round trip that decides whether the operation
                        # ends here: left in the shared list, another put could take them and finish them after
                        # its own operation ended (close() does not wait for that).
                        later = self._later_releases
                        if later:
                            self._later_releases = []
                        else:
                            later = None  # (not the shared list: another put may add to it after the lock)
                        if at == count and begun and not later and not self._evicted:
                            self._active -= 1
                            ended = True
                            if not self._active and self._closing:  # only close() waits for it
                                self._idle.notify_all()
                    position = at
                    seq = self._seq
                    while at < count:
                        item = prepared[at]
                        slot = tiers[homes[at]].allocate(item[5])
                        if slot is None:
                            break
                        seq += 1
                        run.append((homes[at], slot, EntryHeader(item[1] or encode_key(item[0]), dtype_name(item[3]),
                                                                 item[4], item[5], seq)))
                        at += 1
                    self._seq = seq
                if later:
                    self._finish(later)
                if position == count:
                    break
                if not run:  # the next item needs room made (demotion): the single-entry slow path
                    item = prepared[position]
                    for home in range(homes[position], len(tiers)):
                        slot = self._reserve(home, item[5])
                        if slot is not None:
                            break
                    else:
                        raise TierCacheError(
                            f"no tier could make room for {format_size(item[5])}: every candidate is being moved"
                        )
                    with self._lock:
                        self._seq += 1
                        header = EntryHeader(item[1] or encode_key(item[0]), dtype_name(item[3]), item[4], item[5],
                                             self._seq)
                    run.append((home, slot, header))
                written, error, views, spent = self._write_run(run, prepared, datas, position)
                last = error is None and position + len(run) == count
                ended = self._publish(run[:written], prepared, position, views, spent, end=begun and last)
                if error is not None:
                    raise error
                position += len(run)
        finally:
            if begun and not ended:
                if self._later_releases:  # (only left outside the lock by a _put_direct that raised: its own)
                    with self._lock:
                        later, self._later_releases = self._later_releases, []
                    self._finish(later)
                self._end()

    def put(self, key: Hashable, value: torch.Tensor, *, score: float | None = None) -> None:
        """Store a copy of ``value`` under ``key``, replacing any previous value.  A conjugate or negative
        view is stored resolved (the values it shows).

        Raises ``TypeError`` for a non-tensor value, a non-strided one (sparse, nested, quantized, meta) or
        an unsupported key (see ``tiercache.keys``), ``ValueError`` for a key longer than
        ``tiercache.keys.MAX_KEY_BYTES`` encoded, a value of more than ``tiercache.keys.MAX_DIMS``
        dimensions or larger than every tier, ``TierIOError`` when the storage fails (e.g. the disk is
        full; the previous value, if any, is kept), ``TierCacheError`` when no tier can make room right
        now.

        (This is ``_put_batch(((key, value),), (score,), bracket=True)``, with the same checks, counts and
        policy bookkeeping, done here for the common case: a contiguous CPU value of at most
        ``MEMMOVE_MAX_BYTES`` whose home is the fastest tier, a CPU arena with room: validated, then
        reserved, copied (one ``memmove``) and published in one lock round trip, with none of the batch's
        lists; a plain CPU tensor (exact ``torch.Tensor``, a real non-quantized dtype, no negative bit) is
        checked inline, and an int or str key short enough to always fit ``MAX_KEY_BYTES`` is encoded only
        when the entry first needs its header (``Entry.header``).  Every other case takes the batch path.
        Like ``get``, this is ``Cache.put`` itself, not a helper behind it: a call frame is a measurable part
        of a 4 KiB put.)"""
        arena = self._direct_arena
        kind = type(key)
        if (value.__class__ is _Tensor and arena is not None and score is None
                and (kind is int and _NEG_LAZY_INT < key < _LAZY_INT or kind is str and len(key) <= _LAZY_STR)):
            # The common case's checks, as tensor_data and encode_key make them, for a plain CPU tensor
            # of a real, non-quantized dtype (``is_cpu`` rules out meta tensors, the dtype quantized and
            # conjugate ones), without their calls: a fraction of a microsecond of a 4 KiB put.  Such a
            # key always encodes within MAX_KEY_BYTES, so its encoding is left to ``Entry.header``.
            dtype = value.dtype
            if (dtype in _PLAIN_DTYPES and value.layout is _STRIDED and value.is_cpu and not value.is_nested
                    and not value.is_neg() and value.is_contiguous()
                    and len(shape := _SHAPES.get(value.shape) or _shape_of(value)) <= MAX_DIMS):
                data, key_bytes = value, None
            else:
                data = None
        else:
            data = None
        if data is None:
            try:
                key_bytes = encode_key(key)
                data, dtype, shape = tensor_data(value)
                if score is not None:
                    score = check_score(score)
            except (TypeError, ValueError):
                if self._closing or self._closed:  # a closed cache says so first
                    raise CacheClosedError("this tiercache.Cache is closed") from None
                raise
            if arena is None or not data.is_cpu or not data.is_contiguous():
                self._put_batch(((key, value),), (score,), bracket=True)
                return
        size = data.nbytes
        if size > MEMMOVE_MAX_BYTES or size > self._limits[0]:
            self._put_batch(((key, value),), (score,), bracket=True)
            return
        releases: list[Release] = []
        lock = self._lock
        lock.acquire()  # (not ``with``: see get)
        try:
            if self._closing or self._closed:
                raise CacheClosedError("this tiercache.Cache is closed")
            slot = arena.allocate(size)
            if slot is not None:
                start = _perf_counter()
                if size > GIL_HELD_MAX_BYTES:  # copy_bytes, inlined (a CPU arena slot's ref is its address)
                    memmove(slot.ref, data.data_ptr(), size)
                elif size:
                    memmove_holding_gil(slot.ref, data.data_ptr(), size)
                seq = self._seq = self._seq + 1
                clock = self._clock = self._clock + 1
                index = self._index
                old = index.get(key)
                if old is not None and score is None:
                    score = old.score
                token = next(_TOKENS)
                entry = Entry(key, size, arena.name, clock, clock, 0, score if score is not None else 0.0,
                              key_bytes, dtype, shape, seq, 0, slot, None, False, token)
                try:  # ranked before anything changes: a policy that raises leaves the cache as it was
                    rank = entry.queued_rank = self._policy.rank(entry)
                except BaseException:
                    arena.free(slot)
                    raise
                if old is not None:
                    releases = self._unlink(old)
                index[key] = entry
                # RankedQueue.push, inlined (the entry is new: its version is already the item's token)
                queue = self._queues[0]
                queue.live += 1
                queue.payload += size
                queue._owners[token] = entry
                heap = queue._heap
                _heappush(heap, (rank, token))
                if len(heap) > COMPACT_MIN_ITEMS and len(heap) > COMPACT_RATIO * (queue.live + 1):  # index.over_compaction_limit
                    queue._compact()
                self._counters.puts += 1
                counters = self._tier_counters[0]
                counters.bytes_written += size
                counters.write_seconds += _perf_counter() - start
                if releases:
                    releases = self._free_volatile(releases)  # what is left is a persistent tier's
                if not releases and not self._evicted:
                    return
                self._active += 1  # finishing the releases is part of this operation (close waits for it)
        finally:
            lock.release()
        if slot is None:  # the fastest tier needs room made: the batch path demotes
            self._put_batch(((key, value),), (score,), bracket=True)
            return
        self._finish_then_end(releases)

    def _put_direct(
        self, prepared: list, datas: list[torch.Tensor], homes: list[int], position: int, direct: list[bool]
    ) -> int:
        """Under the lock: store ``prepared[position:]`` while each is a contiguous CPU value of at most
        ``MEMMOVE_MAX_BYTES`` whose home is a CPU arena with room: reserve, one ``memmove``, publish,
        with no second lock round trip.  Returns the position of the first item not stored (the rest
        take the reserve / write / publish path).  Releases of replaced entries of persistent tiers are
        left in ``_later_releases``; the caller takes them under the same lock and finishes them after it."""
        tiers, index, queues, rank = self._tiers, self._index, self._queues, self._policy.rank
        count = len(prepared)
        at = position
        seq, clock = self._seq, self._clock
        releases: list[Release] = []
        written = [0] * len(tiers)
        start = time.perf_counter()
        while at < count:
            item = prepared[at]
            home = homes[at]
            data, size = datas[at], item[5]
            if not direct[home] or size > MEMMOVE_MAX_BYTES or not (item[2] or data.is_cpu and data.is_contiguous()):
                break
            tier = tiers[home]
            slot = tier.allocate(size)
            if slot is None:
                break
            copy_bytes(slot.ref, data.data_ptr(), size)  # a CPU arena slot's ref is its address
            key, score = item[0], item[6]
            old = index.get(key)
            if old is not None and score is None:
                score = old.info.score
            token = next(_TOKENS)
            entry = Entry(key, size, tier.name, clock + 1, clock + 1, 0, score if score is not None else 0.0,
                          item[1], item[3], item[4], seq + 1, home, slot, None, False, token)
            try:  # ranked before anything changes (see put); what was stored so far is counted below
                item_rank = entry.queued_rank = rank(entry)
            except BaseException:
                tier.free(slot)
                self._put_direct_done(position, at, seq, clock, releases, written, start)
                raise
            written[home] += size
            seq += 1
            clock += 1
            if old is not None:
                releases += self._unlink(old)
            index[key] = entry
            # RankedQueue.push, inlined (see put)
            queue = queues[home]
            queue.live += 1
            queue.payload += size
            queue._owners[token] = entry
            heap = queue._heap
            _heappush(heap, (item_rank, token))
            if len(heap) > COMPACT_MIN_ITEMS and len(heap) > COMPACT_RATIO * (queue.live + 1):  # index.over_compaction_limit
                queue._compact()
            at += 1
        self._put_direct_done(position, at, seq, clock, releases, written, start)
        return at

    def _put_direct_done(self, position: int, at: int, seq: int, clock: int, releases: list[Release],
                         written: list[int], start: float) -> None:
        """``_put_direct``'s accounting of ``prepared[position:at]``, stored (under the lock)."""
        if at > position:
            self._seq, self._clock = seq, clock
            spent = time.perf_counter() - start
            total = sum(written)
            for tier_index, tier in enumerate(self._tiers):
                if written[tier_index]:
                    tier_counters = self._counters.tiers[tier.name]
                    tier_counters.bytes_written += written[tier_index]
                    tier_counters.write_seconds += spent * written[tier_index] / total
            self._counters.puts += at - position
            if releases:
                self._later_releases += self._free_volatile(releases)

    def _write_run(
        self, run: list[tuple[int, Slot, EntryHeader]], prepared: list, datas: list[torch.Tensor], position: int
    ) -> tuple[int, BaseException | None, list[torch.Tensor | None], tuple[list[int], list[float]] | None]:
        """Outside the lock: write each reserved slot.  Returns how many were written, the error that
        stopped the run (the slots from the failed one on are freed then), per item the typed view of a
        memory-tier slot that is not read by address (``Entry.view``), and the bytes and seconds written
        per tier for ``_publish`` to count (None when counted here, after a failure).  The run's time is
        shared among its tiers by bytes."""
        tiers = self._tiers
        nbytes = [0] * len(tiers)
        done, error = 0, None
        views: list[torch.Tensor | None] = [None] * len(run)
        start = time.perf_counter()
        try:
            for tier_index, slot, header in run:
                data = datas[position + done]
                tier = tiers[tier_index]
                size = slot.nbytes
                if type(tier) is ArenaTier or isinstance(tier, ArenaTier):
                    if tier.addressable and size <= MEMMOVE_MAX_BYTES and data.is_cpu and data.is_contiguous():
                        # a KV-block-sized CPU value: one memmove, no torch op
                        copy_bytes(tier.address(slot), data.data_ptr(), size)
                    else:
                        # One copy in the value's dtype (C1) and shape, from any strides.
                        view = tier.typed_view(slot, data.dtype)
                        if len(header.shape) != 1:
                            view = view.view(header.shape)
                        view.copy_(data)
                        if not tier.addressable:
                            views[done] = view  # kept for reads (Entry.view); CPU arenas are read by address
                else:  # other tiers are handed the value's bytes
                    tier.write(slot, as_bytes(flat(data)), header)
                nbytes[tier_index] += size
                done += 1
        except BaseException as exc:
            error = exc
            with self._lock:
                for tier_index, slot, _ in run[done:]:
                    tiers[tier_index].free(slot)
                self._counters.errors["put_io"] += 1
        spent = time.perf_counter() - start
        total = sum(nbytes)
        seconds = [spent * n / total if total else 0.0 for n in nbytes] if len(tiers) > 1 else [spent]
        if error is not None or not done:  # _publish counts the writes of a run that went through
            self._count_writes(nbytes, seconds)
            return done, error, views, None
        return done, error, views, (nbytes, seconds)

    def _count_writes(self, nbytes: list[int], seconds: list[float]) -> None:
        with self._lock:
            for tier_index, tier in enumerate(self._tiers):
                if nbytes[tier_index]:
                    counters = self._counters.tiers[tier.name]
                    counters.bytes_written += nbytes[tier_index]
                    counters.write_seconds += seconds[tier_index]

    def _publish(
        self,
        run: list[tuple[int, Slot, EntryHeader]],
        prepared: list,
        position: int,
        views: list,
        written: tuple[list[int], list[float]] | None,
        *,
        end: bool = False,
    ) -> bool:
        """Under one lock: make written slots the current entries of their keys (unless a later put of a
        key already landed), then give back what they replaced.  With ``end`` the public operation ends
        in the same lock round trip (see ``_put_batch``); returns whether it did."""
        if not run:
            return False
        releases: list[Release] = []
        error: BaseException | None = None
        published = 0
        with self._lock:
            if written is not None:
                for tier_index, tier in enumerate(self._tiers):
                    if written[0][tier_index]:
                        counters = self._counters.tiers[tier.name]
                        counters.bytes_written += written[0][tier_index]
                        counters.write_seconds += written[1][tier_index]
            index, queues, tiers, rank = self._index, self._queues, self._tiers, self._policy.rank
            clock = self._clock
            for done, ((tier_index, slot, header), item, view) in enumerate(zip(run, prepared[position:], views)):
                key, score = item[0], item[6]
                old = index.get(key)
                if old is not None:
                    if old.seq > header.seq:
                        releases.append((tier_index, slot))
                        continue
                    if score is None:
                        score = old.info.score
                entry = Entry(key, header.nbytes, tiers[tier_index].name, clock + 1, clock + 1, 0,
                              score if score is not None else 0.0, header.key, item[3], header.shape, header.seq,
                              tier_index, slot, view, False, 1)
                try:  # ranked before anything changes (see put): this item and the rest are given back
                    item_rank = rank(entry)
                except BaseException as exc:
                    error = exc
                    releases += [(t, s) for t, s, _ in run[done:]]
                    break
                if old is not None:
                    releases += self._unlink(old)
                clock += 1
                published += 1
                index[key] = entry
                queue = queues[tier_index]
                queue.live += 1
                queue.payload += header.nbytes
                queue.push(entry, item_rank)
            self._clock = clock
            self._counters.puts += published
            if releases:
                releases = self._free_volatile(releases)
            # decided under the lock: an operation that has ended must not finish (or notify) another's work
            finish = bool(releases or self._evicted)
            end = end and not finish and error is None  # else _end after _finish (close waits for it)
            if end:
                self._active -= 1
                if not self._active and self._closing:  # only close() waits for it
                    self._idle.notify_all()
        if finish:
            self._finish(releases)
        if error is not None:
            raise error
        return end

    # -- get ------------------------------------------------------------------------------------------
    def _lookup_and_pin(
        self,
        keys: list[Hashable],
        check: Callable[[list[Entry]], None] | None = None,
        bracket: bool = False,
        direct: list[torch.Tensor | None] | None = None,
        dsts: list[torch.Tensor] | None = None,
    ) -> tuple[list[_Pinned], list[torch.Tensor | None], list[int], list[tuple[Slot, Any, torch.Tensor]] | None]:
        """Under one lock: every key's entry, counted as a hit (or, if one is absent, one get and one miss
        and ``KeyError``: all or nothing), touched for the policy and pinned.  ``check(entries)`` runs
        before anything is counted; what it raises propagates with nothing changed.

        ``direct`` (a list of one slot per key, for a CPU target that is not packed): values of the fastest
        tier held in a CPU arena, of at most ``MEMMOVE_MAX_BYTES``, are copied right here, under the lock,
        so they need no pin, no second lock round trip and no promotion: without ``dsts`` into a fresh
        tensor stored in ``direct[i]`` (one ``memmove``); into ``dsts[i]`` (on the CPU) with one
        ``memmove`` when it is contiguous, else by torch from a typed view of the slot, in the value's
        dtype (the strided copies of the batch in one ``torch._foreach_copy_``).  Returns the pinned rest,
        their ``Entry.view``s, their positions in ``keys`` and, with ``direct`` and ``dsts`` (a CPU target),
        the batch's ``read_into`` requests as :meth:`_row_requests` builds them, made in the same pass over
        the batch (``None`` where that method would return ``None``, or without ``direct`` and ``dsts``).

        With ``bracket`` it also begins the public operation (``close`` waits for it; the caller ends it,
        see ``_get_batch``) in the same lock round trip, unless nothing was left pinned: the operation
        is then complete."""
        with self._lock:
            if self._closing or self._closed:
                raise CacheClosedError("this tiercache.Cache is closed")
            index = self._index
            found = []
            for key in keys:
                kind = type(key)
                if kind is tuple:
                    try:
                        entry = index.get(key)
                    except TypeError:  # unhashable: check_key says what is wrong with it
                        check_key(key)
                        raise
                    # The very object that was stored (checked by its put) needs no check: the common
                    # case of a caller that keeps its keys, as exact decode does.
                    if (entry is None or entry.key is not key) and not _FLAT_KEY_TYPES.issuperset(map(type, key)):
                        check_key(key)  # TypeError for a key of another type (an equal one could be present)
                else:
                    if kind is not int and kind is not str and kind is not bytes:
                        check_key(key)
                    entry = index.get(key)
                if entry is None:
                    for other in keys:  # a bad key anywhere in the batch raises TypeError, not KeyError
                        check_key(other)
                    counters = self._counters
                    counters.gets += 1
                    counters.misses += 1
                    for tier_counters in counters.tiers.values():
                        tier_counters.misses += 1
                    raise KeyError(key)
                found.append(entry)
            if check is not None:
                check(found)
            elif dsts is not None:
                _check_destinations(found, dsts)
            tiers = self._tiers
            pins, entry_tiers, direct_tiers = self._pins, self._entry_header_tiers, self._direct_tiers
            hits = [0] * len(tiers)
            clock = self._clock
            pinned: list[_Pinned] = []
            views = []
            positions: list[int] = []
            rerank = self._rerank_hits
            if rerank:
                queues, rank = self._queues, self._policy.rank
            # The fastest tier when it is a CPU arena and the target is the CPU (not packed): its values of
            # at most MEMMOVE_MAX_BYTES are copied right here (see the docstring).
            arena = self._direct_arena if direct is not None else None
            copied = 0
            strided_dsts: list[torch.Tensor] = []
            strided_views: list[torch.Tensor] = []
            start = time.perf_counter() if arena is not None else 0.0
            # _row_requests, folded into this pass (exact decode reads every layer's disk blocks this way):
            # the requests of the pinned entries while they all lie in one tier that reads row-contiguous
            # CPU destinations in place; None once one does not
            rows: list[tuple[Slot, Any, torch.Tensor]] | None = [] if dsts is not None and direct is not None else None
            row_src, own = -1, False
            for i, entry in enumerate(found):
                src = entry.level
                hits[src] += 1
                entry.hits += 1  # the entry is its policy info (Entry.info)
                clock += 1
                entry.last_access = clock
                if rerank:  # _rerank, inlined: the tier of a hit is unchanged
                    entry.tier = tiers[src].name
                    try:  # (before the entry's item goes stale: a rank that raises leaves it queued)
                        hit_rank = rank(entry)
                    except BaseException:
                        self._later.extend(self._unpin_all(pinned))  # (none: the lock was held all along)
                        raise
                    queues[src].push(entry, hit_rank)
                if src == 0 and arena is not None:
                    size = entry.nbytes
                    if size <= MEMMOVE_MAX_BYTES:
                        if dsts is None:
                            dst = direct[i] = new_tensor(entry.shape, entry.dtype)  # type: ignore[index]
                        else:
                            dst = dsts[i]  # on the CPU (the target), checked by get_many
                        if dsts is None or dst.is_contiguous():
                            # copy_bytes, inlined (a call costs ~0.1 us, ~4 % of a 4 KiB value's share of a
                            # get_many: benchmarks/host_put_ab.py): a CPU arena slot's ref is its address
                            # (ArenaTier.address); copies of at most GIL_HELD_MAX_BYTES keep the GIL, so a
                            # batch takes it back once, not once per value, where another thread, e.g. the
                            # model, waits for it
                            if size > GIL_HELD_MAX_BYTES:
                                memmove(dst.data_ptr(), entry.slot.ref, size)
                            elif size:
                                memmove_holding_gil(dst.data_ptr(), entry.slot.ref, size)
                        else:
                            # A strided destination (e.g. a block's slice of a decode buffer): copied
                            # by torch from a typed view of the slot, all of them in one
                            # ``_foreach_copy_`` below.  The view is kept on the entry (it changes with
                            # the slot, under this lock), so later reads reuse it.
                            view = entry.view
                            if view is None:
                                view = entry.view = arena.typed_view(entry.slot, entry.dtype).view(entry.shape)
                            strided_dsts.append(dst)
                            # (an entry's view has the entry's shape: one torch.Size built, not two)
                            strided_views.append(view if dst.shape == entry.shape else view.reshape(dst.shape))
                        copied += size
                        continue
                slot = entry.slot
                token = id(slot)
                pins[token] = pins.get(token, 0) + 1
                # Arena tiers only read the header's nbytes and shape, which the entry has itself, and a
                # DiskTier takes the entry as its header's source (it caches the header record it verifies
                # against by the entry's identity): no EntryHeader is built per key for them.
                header = entry if entry_tiers[src] else entry.header
                pinned.append((entry, src, slot, header))
                if rows is not None:
                    if src != row_src:
                        if row_src < 0 and self._strided_tiers[src] and self._address_tiers[src] is None:
                            row_src, own = src, self._fresh_tiers[src] is not None
                        else:
                            rows = None
                    if rows is not None:
                        dst = dsts[i]  # type: ignore[index]  (on the CPU: direct is only made for a CPU target)
                        if dst.is_contiguous():
                            rows.append((slot, header, dst if own else as_bytes(dst.view(-1))))
                        elif dst.stride(-1) == 1:
                            rows.append((slot, header, dst))
                        else:
                            rows = None
                view = entry.view
                if view is None and dsts is not None and direct_tiers[src]:
                    # As above: a CPU arena value read into a strided destination is copied from a
                    # typed view kept on the entry.
                    view = entry.view = tiers[src].typed_view(slot, entry.dtype).view(entry.shape)
                views.append(view)
                positions.append(i)
            if strided_dsts:
                copy_pairs(strided_dsts, strided_views)
            self._clock = clock
            counters = self._counters
            tier_counters = self._tier_counters
            if copied:
                first = tier_counters[0]
                first.bytes_read += copied
                first.read_seconds += time.perf_counter() - start
            counters.gets += len(found)
            if len(tiers) == 1:
                tier_counters[0].hits += len(found)
            else:
                below = len(found)
                for tier_index, counted in enumerate(hits):
                    counted_tier = tier_counters[tier_index]
                    counted_tier.hits += counted
                    below -= counted
                    counted_tier.misses += below
            if bracket and (pinned or direct is None):
                self._active += 1
            return pinned, views, positions, rows

    def get(self, key: Hashable, device: torch.device | str | None = None) -> torch.Tensor:
        """A fresh copy of the value stored under ``key`` (on ``device``, CPU by default).

        Raises ``KeyError`` when the key is absent, was evicted, or its stored bytes failed verification.

        (To the CPU this is ``_get_batch([key], cpu, bracket=True)[0]``, with the same checks, counts and
        policy bookkeeping, done here for the common cases of a key of a plain type, after one look-up
        under the lock: a small value (``MEMMOVE_MAX_BYTES``) in the fastest tier, a CPU arena, is copied
        there (one lock round trip, one fresh tensor, one ``memmove``, none of the batch's lists); a value
        in a disk tier is pinned there, read with the tier's ``read_fresh`` outside the lock (no header
        object, no batch set-up), then unpinned and counted in a second round trip.  Every other case
        takes the batch path.  This is ``Cache.get`` itself, not a helper behind it: a call frame is a
        measurable part of a 64 KiB get.)"""
        if device is not None:
            return self._get_batch([key], _check_read_device(_normal_device(torch.device(device))), bracket=True)[0]
        kind = type(key)
        if kind is not int and kind is not str and kind is not bytes:
            return self._get_batch([key], _CPU, bracket=True)[0]
        lock = self._lock
        lock.acquire()  # (not ``with``: it costs a lookup and a bound method per special method)
        try:
            if self._closing or self._closed:
                raise CacheClosedError("this tiercache.Cache is closed")
            entry = self._index.get(key)
            if entry is None:
                tier = None
            else:
                src = entry.level
                if not src and entry.nbytes <= MEMMOVE_MAX_BYTES and (arena := self._direct_arena) is not None:
                    start = _perf_counter()
                    entry.hits += 1  # the entry is its policy info (Entry.info)
                    entry.last_access = self._clock = self._clock + 1
                    if self._rerank_hits:  # _rerank, inlined: the tier of a hit is unchanged
                        entry.tier = arena.name
                        self._queues[0].push(entry, self._policy.rank(entry))  # (a raise leaves it queued)
                    size = entry.nbytes
                    # new_tensor, inlined for a (shape, dtype) seen before
                    template = _TEMPLATES.get((entry.shape, entry.dtype))
                    result = (_empty_like(template) if template is not None
                              else new_tensor(entry.shape, entry.dtype))
                    # copy_bytes, inlined (a CPU arena slot's ref is its address: ArenaTier.address)
                    if size > GIL_HELD_MAX_BYTES:
                        memmove(result.data_ptr(), entry.slot.ref, size)
                    elif size:
                        memmove_holding_gil(result.data_ptr(), entry.slot.ref, size)
                    self._counters.gets += 1
                    counters = self._tier_counters[0]
                    counters.hits += 1
                    counters.bytes_read += size
                    counters.read_seconds += _perf_counter() - start
                    return result
                tier = self._fresh_tiers[src]
                if tier is not None:  # a disk tier: pin the slot, read it outside the lock
                    entry.hits += 1
                    entry.last_access = self._clock = self._clock + 1
                    if self._rerank_hits:
                        self._rerank(entry)
                    slot = entry.slot
                    pins = self._pins  # _pin, inlined
                    token = id(slot)
                    pins[token] = pins.get(token, 0) + 1
                    self._active += 1
        finally:
            lock.release()
        if tier is None:  # absent (the batch path counts the miss and raises), or in another kind of tier
            return self._get_batch([key], _CPU, bracket=True)[0]
        # The disk get is counted (gets, hits, misses above) when it ends, in the critical section that
        # unpins: stats() may see it a read later, never a different total.
        bad = False
        nbytes, seconds = 0, 0.0
        try:
            start = _perf_counter()
            dtype = entry.dtype
            shape = entry.shape
            template = _TEMPLATES.get((shape, dtype))  # new_tensor, inlined for a (shape, dtype) seen before
            result = _empty_like(template) if template is not None else new_tensor(shape, dtype)
            try:
                tier.read_fresh(slot, result, entry.key_bytes or entry.header.key, _DTYPE_NAMES.get(dtype) or dtype_name(dtype),
                                shape, entry.seq)
            except CorruptEntryError as exc:
                bad = True
                log.warning("tiercache: entry %r is damaged and was dropped: %s", entry.key, exc)
                raise KeyError(entry.key) from None
            seconds, nbytes = _perf_counter() - start, entry.nbytes
            if src and self._policy.promote(entry.info, tier.name, self._tiers[0].name):
                self._promote(entry, src, as_bytes(result.view(-1)))  # the source slot is still pinned by us
        finally:
            releases: list[Release] | None = None
            pending = False
            lock.acquire()
            try:
                count = pins[token] - 1  # _unpin, inlined
                if count:
                    pins[token] = count
                else:
                    del pins[token]
                    if self._deferred:  # (a release made while pinned: rare)
                        deferred = self._deferred.pop(token, None)
                        if deferred is not None:
                            releases = [deferred]
                self._counters.gets += 1
                counters = self._tier_counters[src]
                counters.hits += 1
                if src:  # a hit in tier src is a miss in every faster tier
                    for above in self._tier_counters[:src]:
                        above.misses += 1
                if nbytes:
                    counters.bytes_read += nbytes
                    counters.read_seconds += seconds
                if bad and self._index.get(entry.key) is entry:
                    self._counters.corruptions += 1
                    releases = (releases or []) + self._drop_entry(entry, "corrupt")
                if releases:
                    releases = self._free_volatile(releases)
                # Finishing the releases is part of this get: close() must not persist while a promotion's
                # released disk slot (same key and seq as the live one) still waits to be discarded.
                pending = bool(releases or self._evicted)
                if not pending:
                    self._active -= 1
                    if not self._active and self._closing:  # only close() waits for it
                        self._idle.notify_all()
            finally:
                lock.release()
            if pending:
                self._finish_then_end(releases or [])
        return result

    def _get_batch(
        self,
        keys: list[Hashable],
        target: torch.device,
        dsts: list[torch.Tensor] | None = None,
        packed: torch.Tensor | None = None,
        *,
        pack: bool = False,
        bracket: bool = False,
    ) -> list[torch.Tensor]:
        """The values of ``keys`` (pinned, counted, promoted and unpinned here): copied into ``dsts``
        (caller tensors, one per key, on ``target``); with ``pack``, packed into the byte buffer
        ``packed`` (a fresh one on ``target`` when None) and returned as views of it; otherwise copied
        into fresh tensors on ``target``.  With ``bracket`` this call is the public operation's
        ``_begin``/``_end`` (folded into its first and last lock round trips).  Small values of the
        fastest tier are copied during the lookup (see ``_lookup_and_pin``): a batch of only those takes
        the index lock once."""
        # (keys are checked in _lookup_and_pin (their types only on a miss or an odd type), and so are
        # dsts against the entries found)
        check = partial(_check_packed_room, packed=packed) if pack and packed is not None else None
        direct = [None] * len(keys) if not pack and target.type == "cpu" else None
        pinned, views, positions, rows = self._lookup_and_pin(keys, check, bracket, direct, dsts)
        if not pinned and direct is not None:  # all copied during the lookup: the operation is complete
            return dsts if dsts is not None else direct  # type: ignore[return-value]
        if dsts is not None:
            if direct is None:  # (a CPU target's requests were made by _lookup_and_pin)
                rows = self._row_requests(pinned, dsts if len(positions) == len(keys) else [dsts[i] for i in positions])
            if rows is not None:
                self._get_rows(pinned, rows, bracket)
                return dsts
        if direct is not None and len(positions) < len(keys):  # some were copied during the lookup
            whole = dsts if dsts is not None else direct
            rest = self._get_pinned(pinned, views, target, [dsts[i] for i in positions] if dsts is not None
                                    else None, packed, pack, bracket)
            for i, value in zip(positions, rest):
                whole[i] = value  # type: ignore[index]
            return whole  # type: ignore[return-value]
        return self._get_pinned(pinned, views, target, dsts, packed, pack, bracket)

    def _get_ranged(
        self,
        keys: list[Hashable],
        target: torch.device,
        dsts: list[torch.Tensor],
        ranges: list[list[tuple[int, int]] | None],
    ) -> list[torch.Tensor]:
        """``get_many(keys, out=dsts, ranges=ranges)`` (``ranges`` checked by :func:`check_ranges`, one item
        per key): lookup, pins, counts and the public operation as :meth:`_get_batch`; the items whose
        ranges are ``None`` are copied whole as :meth:`_copy_each` copies them; of the others only the
        ranges' bytes are written into the destination's bytes (it must be contiguous).  Memory tiers:
        one copy per range.  A disk tier: its ``read_ranges`` (sector reads, verified per sector), into
        the destination when it is on the CPU, else into a CPU staging buffer first.  An entry the policy
        would promote, or one in a tier without ``read_ranges``, is read whole (its promotion copies from
        that read) and its ranges copied from it."""
        def check(found: list[Entry]) -> None:
            _check_destinations(found, dsts)
            for i, (entry, wanted) in enumerate(zip(found, ranges)):
                if wanted is None:
                    continue
                if wanted and wanted[-1][1] > entry.nbytes:
                    raise ValueError(f"ranges[{i}] (key {entry.key!r}) ends at byte {wanted[-1][1]}, past the "
                                     f"value's {entry.nbytes} bytes")
                if not dsts[i].is_contiguous():
                    raise ValueError(f"out[{i}] (key {entry.key!r}) must be contiguous when ranges[{i}] is given")

        pinned, views, _, _ = self._lookup_and_pin(keys, check, True, None, dsts)
        tiers = self._tiers
        n_tiers = len(tiers)
        bad: Entry | None = None
        reads: list[tuple[list[int], list[float]]] = []
        promote = self._policy.promote
        names = self._tier_names
        promoted: list[tuple[Entry, int, torch.Tensor | None]] = []
        try:
            try:
                whole = [i for i, wanted in enumerate(ranges) if wanted is None]
                if whole:
                    try:
                        _, copies = self._copy_each([pinned[i] for i in whole], [views[i] for i in whole],
                                                    [dsts[i] for i in whole], target, reads)
                    except CorruptEntryError as exc:  # its position in the whole items: in the batch
                        where = getattr(exc, "tiercache_index", None)
                        exc.tiercache_index = whole[where] if where is not None else None  # type: ignore[attr-defined]
                        raise
                    for i, data in zip(whole, copies):
                        entry, src = pinned[i][0], pinned[i][1]
                        if src and promote(entry, names[src], names[0]):
                            promoted.append((entry, src, data))
                nbytes = [0] * n_tiers
                seconds = [0.0] * n_tiers
                by_disk: dict[int, list[int]] = {}  # tier -> positions read by sectors
                staged: dict[int, torch.Tensor] = {}  # position -> CPU staging buffer of a non-CPU destination
                for i, wanted in enumerate(ranges):
                    if wanted is None:
                        continue
                    entry, src, slot, header = pinned[i]
                    dst = dsts[i]
                    start = _perf_counter()
                    # (an empty item reads nothing: no promotion, which would read the whole value)
                    wants = bool(src) and bool(wanted) and promote(entry, names[src], names[0])
                    tier = tiers[src]
                    arena = self._address_tiers[src]
                    if not wanted:
                        pass
                    elif arena is not None and dst.is_cpu:
                        base, to = arena.address(slot), dst.data_ptr()
                        for lo, hi in wanted:
                            memmove(to + lo, base + lo, hi - lo)
                        nbytes[src] += sum([hi - lo for lo, hi in wanted])
                    elif isinstance(tier, ArenaTier):
                        source, into = tier.view(slot), as_bytes(dst.view(-1))
                        for lo, hi in wanted:
                            into[lo:hi].copy_(source[lo:hi])
                        nbytes[src] += sum([hi - lo for lo, hi in wanted])
                    elif isinstance(tier, DiskTier) and not wants:
                        by_disk.setdefault(src, []).append(i)
                        if not dst.is_cpu:
                            staged[i] = torch.empty(entry.nbytes, dtype=torch.uint8)
                        continue
                    else:  # promoted (it needs the whole value), or a tier without ranged reads
                        try:
                            payload = tier.read(slot, header)
                        except CorruptEntryError as exc:
                            exc.tiercache_index = i  # type: ignore[attr-defined]
                            raise
                        payload = as_bytes(payload.reshape(-1))
                        into = as_bytes(dst.view(-1))
                        for lo, hi in wanted:
                            into[lo:hi].copy_(payload[lo:hi])
                        nbytes[src] += entry.nbytes
                        if wants:
                            promoted.append((entry, src, payload if payload.device == tiers[0].device else None))
                            wants = False
                    if wants:
                        promoted.append((entry, src, None))  # (a memory tier: re-read from the pinned slot)
                    seconds[src] += _perf_counter() - start
                for src, positions in by_disk.items():
                    start = _perf_counter()
                    requests = []
                    for i in positions:
                        entry, _, slot, _ = pinned[i]
                        requests.append((slot, entry.header, staged.get(i, dsts[i]), ranges[i]))
                    try:
                        nbytes[src] += tiers[src].read_ranges(requests)  # type: ignore[attr-defined]
                    except CorruptEntryError as exc:
                        where = getattr(exc, "tiercache_index", None)
                        exc.tiercache_index = positions[where] if where is not None else None  # type: ignore[attr-defined]
                        raise
                    for i in positions:
                        buf = staged.get(i)
                        if buf is not None:
                            into = as_bytes(dsts[i].view(-1))
                            for lo, hi in ranges[i]:  # type: ignore[union-attr]
                                into[lo:hi].copy_(buf[lo:hi])
                    seconds[src] += _perf_counter() - start
                reads.append((nbytes, seconds))
            except CorruptEntryError as exc:
                bad = _damaged(exc, pinned)
                raise KeyError(bad.key) from None
            for entry, src, data in promoted:
                self._promote(entry, src, data)  # the source slot is still pinned by us
        finally:
            with self._lock:
                self._counters.ranged_gets += len(ranges) - ranges.count(None)
                self._count_reads(reads)
                releases = self._end_get(pinned, bad, True)
                finish = bool(releases or self._evicted)
            if finish:
                self._finish_then_end(releases, True)
        return dsts

    def _count_reads(self, reads: list) -> None:
        """Add ``reads`` (``(bytes per tier, seconds per tier)`` pairs) to the tier counters; under the lock."""
        for nbytes, seconds in reads:
            for tier_index, counters in enumerate(self._tier_counters):
                if nbytes[tier_index]:
                    counters.bytes_read += nbytes[tier_index]
                    counters.read_seconds += seconds[tier_index]

    def _row_requests(self, pinned: list[_Pinned], dsts: list[torch.Tensor],
                      on_cpu: bool = False) -> list[tuple[Slot, Any, torch.Tensor]] | None:
        """The ``read_into`` requests of a batch that :func:`to_strided_reads` accepts (every pinned value in
        one tier that reads row-contiguous CPU destinations in place, e.g. exact decode's blocks on a disk
        tier read into their slices of a decode buffer), checked and built in one pass; ``None`` for any
        other batch.  A contiguous destination is read into as its 1-D bytes (contract C2), which a
        promotion copies from, except by ``DiskTier``'s own ``read_into``, which takes it as it is (a
        promotion then views its bytes); any other is read in place (``reads_strided``).  ``on_cpu``: every
        destination is known to be on the CPU (``get_many`` checked them), so that is not asked again."""
        src = pinned[0][1]
        if not self._strided_tiers[src] or self._address_tiers[src] is not None:
            return None
        # DiskTier's own read_into takes a contiguous destination of any dtype as it is (one run): no
        # byte view is made per key for it (a promotion makes one, see _get_rows).
        own = self._fresh_tiers[src] is not None
        requests = []
        for item, dst in zip(pinned, dsts):
            if item[1] != src or not (on_cpu or dst.is_cpu):
                return None
            if dst.is_contiguous():  # (one run, whatever its strides of size-1 dimensions say)
                requests.append((item[2], item[3], dst if own else as_bytes(dst.view(-1))))
            elif dst.stride(-1) == 1:  # (a tensor that is not contiguous has a dimension)
                requests.append((item[2], item[3], dst))
            else:
                return None
        return requests

    def _get_rows(self, pinned: list[_Pinned], requests: list[tuple[Slot, Any, torch.Tensor]], bracket: bool) -> None:
        """:meth:`_get_pinned` of a batch that :meth:`_row_requests` built requests for: one ``read_into``
        of every item straight into its destination, promotion, then unpin, count (and end the operation),
        in one frame (exact decode reads a layer's blocks this way at every step: the general path's
        frames and passes over the batch were a measurable part of a short context's step).  The same
        errors, counts and promotions as the general path; a promotion copies from a contiguous
        destination's bytes, else re-reads the pinned slot."""
        src = pinned[0][1]
        bad: Entry | None = None
        seconds = -1.0
        try:
            start = _perf_counter()
            try:
                self._tiers[src].read_into(requests)  # type: ignore[attr-defined]
            except CorruptEntryError as exc:
                bad = _damaged(exc, pinned)
                raise KeyError(bad.key) from None
            seconds = _perf_counter() - start
            if src:
                promote = self._policy.promote
                names = self._tier_names
                fast, name = names[0], names[src]
                for (entry, _, _, _), (_, _, buf) in zip(pinned, requests):
                    # (the entry is its policy info: Entry.info returns it)
                    if promote(entry, name, fast):
                        # the source slot is still pinned by us; a strided destination is not a payload
                        if buf.dtype is not torch.uint8 or buf.dim() != 1:
                            buf = as_bytes(buf.view(-1)) if buf.is_contiguous() else None
                        self._promote(entry, src, buf)
        finally:
            with self._lock:
                if seconds >= 0:
                    counters = self._tier_counters[src]
                    counters.bytes_read += sum([item[3].nbytes for item in pinned])
                    counters.read_seconds += seconds
                releases = self._end_get(pinned, bad, bracket)
                finish = bool(releases or self._evicted)  # (decided under the lock, as _end_get did)
            if finish:
                self._finish_then_end(releases, bracket)

    def _end_get(self, pinned: list[_Pinned], bad: Entry | None, bracket: bool) -> list:
        """The end of a batch get, under the lock: unpin, drop a damaged entry (``bad``) still indexed, free
        volatile slots and end the operation (``bracket``) unless releases or evictions are left for
        :meth:`_finish` (then the caller ends it after them: close() waits for those); returns the releases."""
        releases = self._unpin_all(pinned)
        if bad is not None and self._index.get(bad.key) is bad:
            self._counters.corruptions += 1
            releases += self._drop_entry(bad, "corrupt")
        if releases:
            releases = self._free_volatile(releases)
        if bracket and not releases and not self._evicted:  # else the caller ends it after _finish
            self._active -= 1
            if not self._active and self._closing:  # only close() waits for it
                self._idle.notify_all()
        return releases

    def _get_pinned(
        self,
        pinned: list[_Pinned],
        views: list[torch.Tensor | None],
        target: torch.device,
        dsts: list[torch.Tensor] | None,
        packed: torch.Tensor | None,
        pack: bool,
        bracket: bool,
    ) -> list[torch.Tensor]:
        """``_get_batch`` for the pinned entries: copy, promote, then unpin (and end the operation)."""
        bad: Entry | None = None
        reads: list[tuple[list[int], list[float]]] = []  # (bytes, seconds) per tier, counted at the end
        try:
            try:
                if pack:
                    results, copies = self._copy_packed(pinned, views, target, packed, reads)
                else:
                    results, copies = self._copy_each(pinned, views, dsts, target, reads)
            except CorruptEntryError as exc:
                bad = _damaged(exc, pinned)
                raise KeyError(bad.key) from None
            promote = self._policy.promote
            names = self._tier_names
            fast = names[0]
            for (entry, src, slot, header), data in zip(pinned, copies):
                # (the entry is its policy info: Entry.info returns it)
                if src and promote(entry, names[src], fast):
                    self._promote(entry, src, data)  # the source slot is still pinned by us
        finally:
            with self._lock:
                self._count_reads(reads)
                releases = self._end_get(pinned, bad, bracket)
                finish = bool(releases or self._evicted)  # (decided under the lock, as _end_get did)
            if finish:
                self._finish_then_end(releases, bracket)
        return results

    def _copy_each(
        self,
        pinned: list[_Pinned],
        views: list[torch.Tensor | None],
        dsts: list[torch.Tensor] | None,
        target: torch.device,
        reads: list[tuple[list[int], list[float]]],
    ) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """Outside the lock: copy each pinned payload into its destination (``dsts``, or fresh tensors of
        the stored shape on ``target`` when None); returns the results and, per item, a 1-D tensor
        holding the payload that a promotion may copy from (``None``: re-read from the source slot).

        Memory tiers: one copy from the slot's typed view (``views``), in the value's dtype; into caller
        tensors all of them in one ``torch._foreach_copy_``.  Other tiers: ``read_into`` (batched,
        straight into a contiguous CPU destination) when the tier has it, else ``read`` + copy."""
        tiers = self._tiers
        if dsts is not None and pinned and to_strided_reads(pinned, dsts, self._strided_tiers, self._address_tiers):
            return self._read_rows(pinned, dsts, reads)
        seconds = [0.0] * len(tiers)
        nbytes = [0] * len(tiers)
        results: list[torch.Tensor] = dsts if dsts is not None else [None] * len(pinned)  # type: ignore[list-item]
        copies: list[torch.Tensor | None] = list(views)
        batched: dict[int, list[int]] = {}  # tier -> positions read through read_into
        to_dsts: list[torch.Tensor] = []
        from_views: list[torch.Tensor] = []
        in_memory = [0] * len(tiers)  # memory-tier bytes copied, per tier
        to_cpu = target.type == "cpu"
        # Per tier: the CPU arena whose slots are read by address (one memmove each), else None.
        by_address = self._address_tiers
        batch_reads = self._batch_tiers
        start = time.perf_counter()
        for i, (entry, src, slot, header) in enumerate(pinned):
            arena = by_address[src]
            if arena is not None:
                nbytes_ = header.nbytes
                if dsts is None:
                    if to_cpu and nbytes_ <= MEMMOVE_MAX_BYTES:
                        result = results[i] = torch.empty(header.shape, dtype=entry.dtype)
                        copy_bytes(result.data_ptr(), arena.address(slot), nbytes_)
                    else:
                        view = arena.typed_view(slot, entry.dtype).view(header.shape)
                        results[i] = view.clone() if to_cpu else view.to(target)
                else:
                    dst = dsts[i]
                    if nbytes_ <= MEMMOVE_MAX_BYTES and dst.is_cpu and dst.is_contiguous():
                        copy_bytes(dst.data_ptr(), arena.address(slot), nbytes_)
                    else:
                        to_dsts.append(dst)
                        view = views[i]
                        if view is None:
                            view = arena.typed_view(slot, entry.dtype).view(entry.shape)
                        from_views.append(view if view.shape == dst.shape else view.reshape(dst.shape))
                in_memory[src] += nbytes_
                copies[i] = None  # a promotion re-reads the pinned source slot
                continue
            view = views[i]
            if view is not None:
                if dsts is None:
                    # (is_cpu is a flag read; view.device would build a device object per key)
                    same = view.is_cpu if to_cpu else view.device == target
                    results[i] = view.clone() if same else view.to(target)
                else:
                    dst = dsts[i]
                    to_dsts.append(dst)
                    from_views.append(view if dst.shape == view.shape else view.reshape(dst.shape))
                in_memory[src] += header.nbytes
                continue
            tier = tiers[src]
            if batch_reads[src]:
                if dsts is None:
                    results[i] = torch.empty(header.shape, dtype=entry.dtype, device=target)
                batched.setdefault(src, []).append(i)
                continue
            began = time.perf_counter()
            try:
                raw = tier.read(slot, header)
            except CorruptEntryError as exc:
                exc.tiercache_index = i  # type: ignore[attr-defined]
                raise
            if dsts is None:
                results[i] = torch.empty(header.shape, dtype=entry.dtype, device=target)
            copy_payload(results[i], raw, entry.dtype)
            copies[i] = raw
            spent = time.perf_counter() - began
            seconds[src] += spent
            start += spent  # not memory-tier time
            nbytes[src] += header.nbytes
        if to_dsts:
            copy_pairs(to_dsts, from_views)
        memory_bytes = sum(in_memory)
        if memory_bytes:  # memory-tier copy time, shared among the memory tiers by bytes
            spent = time.perf_counter() - start
            for src, copied in enumerate(in_memory):
                if copied:
                    nbytes[src] += copied
                    seconds[src] += spent * copied / memory_bytes
        for src, positions in batched.items():
            start = time.perf_counter()
            requests, staged = [], []
            strided = self._strided_tiers[src]
            read_bytes = 0
            for i in positions:
                entry, _, slot, header = pinned[i]
                dst = results[i]
                # (is_cpu is a flag read; dst.device would build a device object per key)
                if dst.is_cpu and dst.is_contiguous():
                    buf = copies[i] = as_bytes(dst.view(-1))  # 1-D: what a promotion may copy from
                elif dst.is_cpu and strided and dst.dim() and dst.stride(-1) == 1:
                    buf, copies[i] = dst, None  # the tier reads the rows in place (a promotion re-reads the slot)
                else:
                    buf = copies[i] = torch.empty(header.nbytes, dtype=torch.uint8)
                    staged.append((i, buf))
                requests.append((slot, header, buf))
                read_bytes += header.nbytes
            nbytes[src] += read_bytes
            try:
                tiers[src].read_into(requests)  # type: ignore[attr-defined]
            except CorruptEntryError as exc:
                where = getattr(exc, "tiercache_index", None)
                exc.tiercache_index = positions[where] if where is not None else None  # type: ignore[attr-defined]
                raise
            for i, buf in staged:
                copy_payload(results[i], buf, pinned[i][0].dtype)
            seconds[src] += time.perf_counter() - start
        reads.append((nbytes, seconds))
        return results, copies

    def _read_rows(
        self,
        pinned: list[_Pinned],
        dsts: list[torch.Tensor],
        reads: list[tuple[list[int], list[float]]],
    ) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """:meth:`_copy_each` of a batch that :func:`to_strided_reads` accepted (every value in one tier
        that reads row-contiguous CPU destinations in place, e.g. exact decode's blocks on a disk tier read
        into their slices of a decode buffer): one ``read_into`` of every item straight into its
        destination (a contiguous one as its 1-D bytes), without the general path's sorting of items by
        tier.  What a promotion copies from: a contiguous destination's bytes, else nothing (it re-reads
        the pinned slot), as in :meth:`_copy_each`."""
        src = pinned[0][1]
        requests = []
        copies: list[torch.Tensor | None] = []
        read_bytes = 0
        for (_, _, slot, header), dst in zip(pinned, dsts):
            if dst.is_contiguous():  # read into as 1-D bytes (contract C2), which a promotion copies from
                buf = as_bytes(dst.view(-1))
                copies.append(buf)
            else:  # rows read in place (``reads_strided``)
                buf = dst
                copies.append(None)
            requests.append((slot, header, buf))
            read_bytes += header.nbytes
        start = time.perf_counter()
        self._tiers[src].read_into(requests)  # type: ignore[attr-defined]
        n = len(self._tiers)
        nbytes, seconds = [0] * n, [0.0] * n
        nbytes[src], seconds[src] = read_bytes, time.perf_counter() - start
        reads.append((nbytes, seconds))
        return dsts, copies

    def _copy_packed(
        self,
        pinned: list[_Pinned],
        views: list[torch.Tensor | None],
        target: torch.device,
        packed: torch.Tensor | None,
        reads: list[tuple[list[int], list[float]]],
    ) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """Pack the payloads into one byte buffer (``packed``, or a fresh one on ``target``) at
        ``packed_layout`` offsets; results are typed views of it.  On CUDA one gather (kernel launch)
        moves every memory-tier payload and every staged disk payload; on the CPU each is copied once."""
        sizes = [header.nbytes for _, _, _, header in pinned]
        offsets, total = packed_layout(sizes)
        buffer = packed if packed is not None else torch.empty(total, dtype=torch.uint8, device=target)
        typed: dict[torch.dtype, torch.Tensor] = {}  # the buffer viewed as each dtype (offsets are aligned)
        results = []
        for (entry, _, _, header), offset in zip(pinned, offsets):
            dtype = entry.dtype
            whole = typed.get(dtype)
            if whole is None:
                whole = typed[dtype] = buffer[: total - total % dtype.itemsize].view(dtype)
            size = dtype.itemsize
            piece = whole[offset // size : (offset + header.nbytes) // size]
            results.append(piece if len(header.shape) == 1 else piece.view(header.shape))
        if target.type != "cuda":
            _, copies = self._copy_each(pinned, views, results, target, reads)
            return results, copies
        with self._lock:
            engine = self._engines.get(target)
            if engine is None:
                engine = self._engines[target] = CopyEngine(target)
        try:
            sources, read_seconds = self._batch_sources(pinned, target)
        except CorruptEntryError as exc:
            culprit = getattr(exc, "tiercache_entry", None)
            exc.tiercache_index = next(  # type: ignore[attr-defined]
                (i for i, item in enumerate(pinned) if item[0] is culprit), None
            )
            raise
        arenas: list[torch.Tensor] = []
        arena_ids: list[int] = []
        src_offsets: list[int] = []
        seen: dict[int, int] = {}
        for arena, offset in sources:
            index = seen.get(id(arena))
            if index is None:
                index = seen[id(arena)] = len(arenas)
                arenas.append(arena)
            arena_ids.append(index)
            src_offsets.append(offset)
        start = time.perf_counter()
        try:
            engine.gather(arenas, arena_ids, src_offsets, sizes, buffer, offsets).wait()
        except BaseException:
            engine.synchronize()  # nothing may still read the pinned slots once they are released
            raise
        share = (time.perf_counter() - start) / max(total, 1)
        nbytes = [0] * len(self._tiers)
        seconds = [0.0] * len(self._tiers)
        for (_, src, _, header), spent in zip(pinned, read_seconds):
            nbytes[src] += header.nbytes
            seconds[src] += spent + share * header.nbytes
        reads.append((nbytes, seconds))
        fast = self._tiers[0]
        copies: list[torch.Tensor | None] = []
        for (_, _, _, header), (arena, offset), position in zip(pinned, sources, offsets):
            # Promote from the copy already made when it sits on the fast tier's device.
            data, at = (buffer, position) if buffer.device == fast.device else (arena, offset)
            copies.append(data[at : at + header.nbytes])
        return results, copies

    # -- delete / scores ------------------------------------------------------------------------------
    def _delete_batch(self, keys: list[Hashable]) -> list[bool]:
        """Remove every key under one lock; per key whether it was present."""
        for key in keys:
            check_key(key)
        found: list[bool] = []
        releases: list[Release] = []
        with self._lock:
            self._check_open()
            index = self._index
            for key in keys:
                entry = index.get(key)
                found.append(entry is not None)
                if entry is not None:
                    releases += self._unlink(entry)
        if releases:
            self._finish(releases, loud=True)
        return found

    def _update_scores_impl(self, scores: dict[Hashable, float]) -> int:
        """Set the scores of the stored keys among ``scores`` under one lock; how many were stored.  Every
        score is checked first (all valid, or none applied).  Re-ranking goes through ``index.rescore``:
        an entry whose rank did not drop keeps its heap item as a stand-in (no push), in the same
        eviction order as a push per key."""
        keys = list(scores)
        values = check_scores(list(scores.values()))
        with self._lock:
            self._check_open()
            entries = list(map(self._index.get, keys))
            return rescore(entries, values, self._policy.rank, self._queues, [tier.name for tier in self._tiers])

    def _batch_sources(
        self, items: list[_Pinned], target: torch.device
    ) -> tuple[list[tuple[torch.Tensor, int]], list[float]]:
        """Outside the lock, for pinned ``items``: where each payload can be read by a batched copy, as
        ``(1-D uint8 tensor, byte offset)``, and the seconds spent reading it here.  Arena tiers are
        addressed in place; other tiers are read (verified), into pinned staging memory for a CUDA target.
        A ``CorruptEntryError`` carries the failing entry as ``exc.tiercache_entry``."""
        staging: torch.Tensor | None = None
        staged_at: dict[int, int] = {}
        if target.type == "cuda":
            position = 0
            for i, (entry, src, slot, header) in enumerate(items):
                tier = self._tiers[src]
                if not hasattr(tier, "locate"):
                    staged_at[i] = position
                    size = chunk_file_bytes(slot) if isinstance(tier, DiskTier) else header.nbytes
                    position += -(-size // 4096) * 4096
            if position:
                staging = torch.empty(position, dtype=torch.uint8, pin_memory=True)
        sources: list[tuple[torch.Tensor, int]] = []
        seconds: list[float] = []
        for i, (entry, src, slot, header) in enumerate(items):
            tier = self._tiers[src]
            locate = getattr(tier, "locate", None)
            if locate is not None:
                sources.append(locate(slot))
                seconds.append(0.0)
                continue
            start = time.perf_counter()
            try:
                if staging is not None and isinstance(tier, DiskTier):
                    payload = read_chunk_into(tier, slot, header, staging[staged_at[i] :])
                elif staging is not None:
                    payload = staging[staged_at[i] : staged_at[i] + header.nbytes]
                    payload.copy_(tier.read(slot, header))
                else:
                    payload = tier.read(slot, header)
            except CorruptEntryError as exc:
                exc.tiercache_entry = entry  # type: ignore[attr-defined]
                raise
            sources.append((payload, 0))
            seconds.append(time.perf_counter() - start)
        return sources, seconds


COALESCE_COPIES = True
"""Whether :func:`copy_pairs` may merge runs of evenly spaced pairs into one strided copy (a switch for
benchmarks that measure the difference; results are identical either way)."""
_MAIN_THREAD = threading.main_thread()
_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
_idle: list = [0.0, False, None]  # [when last checked, whether the machine looked idle, its /proc/stat sample]
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _damaged(exc: CorruptEntryError, pinned: list) -> Entry:
    """The pinned entry a batch read found damaged (``exc.tiercache_index``, set by the reading code), logged as
    dropped; re-raises ``exc`` when it names none."""
    where = getattr(exc, "tiercache_index", None)
    bad = pinned[where][0] if where is not None else None
    if bad is None:
        raise exc
    log.warning("tiercache: entry %r is damaged and was dropped: %s", bad.key, exc)
    return bad


def _cpu_busy_seconds() -> float | None:
    """Seconds every core of the machine spent busy since boot (``/proc/stat``: user, nice, system, irq,
    softirq and steal; idle and I/O wait are not busy), or ``None`` where that file cannot be read."""
    try:
        with open("/proc/stat", "rb") as f:
            fields = f.readline().split()
        user, nice, system, _idle_t, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
    except (OSError, ValueError):
        return None
    return (user + nice + system + irq + softirq + steal) / _CLOCK_TICKS


def _others_busy(before: tuple[float, float, float], after: tuple[float, float, float]) -> float:
    """Cores other processes kept busy between two ``(wall, machine busy, own CPU)`` samples, in seconds:
    the machine's busy time less this process's CPU time (all its threads), over the wall time between."""
    wall = after[0] - before[0]
    if wall <= 0:
        return float("inf")
    return ((after[1] - before[1]) - (after[2] - before[2])) / wall


def machine_idle() -> bool:
    """Whether the cores are left to this process (checked at most twice a second): other processes kept
    less than half a core busy since the last check, by ``/proc/stat``'s busy time less this process's own
    CPU time.  Where ``/proc/stat`` is missing (or on the first check), the 1-minute load average below the
    core count plus half a core; no load average either: busy.  The load average alone misreads an idle
    machine as busy while this process's own reader threads block in direct reads (Linux counts threads in
    uninterruptible I/O wait in it), so it is only the fallback."""
    now = time.monotonic()
    if now - _idle[0] > 0.5:
        busy = _cpu_busy_seconds()
        sample = None if busy is None else (now, busy, time.process_time())
        last = _idle[2]
        if sample is not None and last is not None:
            idle = _others_busy(last, sample) < 0.5
        else:
            try:
                load = os.getloadavg()[0]
            except (AttributeError, OSError):  # no load average on this platform: assume the cores are shared
                load = float("inf")
            idle = load < _CORES + 0.5
        _idle[:] = [now, idle, sample]
    return _idle[1]


def copy_pairs(dsts: list[torch.Tensor], srcs: list[torch.Tensor]) -> None:
    """``dsts[i].copy_(srcs[i])`` for every ``i`` (same shapes and dtypes), in as few torch copies as the
    layout allows.

    A run of consecutive pairs whose destinations all advance by one constant byte step and whose
    sources all advance by another (the block slices of a decode buffer, read from slots laid out at a
    constant stride in one arena chunk, as a batch of puts leaves them) is one strided copy over views of
    the first pair's storages (bounds-checked: a run that would leave a storage is not merged); the
    remaining pairs go through one ``torch._foreach_copy_``.  The bytes written are exactly those of
    the per-pair copies.

    Runs are merged only with more than one torch thread (at one thread a merged copy is no faster than
    ``_foreach_copy_`` and finding the runs costs Python work per pair: 8 blocks of 384 KiB took 288 µs
    merged vs 261 µs by ``_foreach_copy_``), only on the main thread (the one driving the model), and
    only while the machine looks idle (:func:`machine_idle`) or when the pairs are above torch's
    copy grain (:data:`INTRA_OP_GRAIN` elements, e.g. exact decode's 256-token blocks): a merged copy of a
    context's blocks is large enough to take torch's multi-threaded path, as ``DynamicCache``'s
    ``torch.cat`` of the same bytes does, and that path stalls when other work holds the cores.
    Otherwise every pair is copied by one ``_foreach_copy_``: pairs below the grain stay on the calling
    thread, so a read ahead or an I/O thread never opens a second parallel team on the cores the model
    is using.  (Pairs above the grain would each open a team of their own: on the main thread of a busy
    machine that is one stall-prone team per block instead of one per run, so they are merged there.)

    Except on the main thread of a busy machine (:func:`machine_idle` False) with more than one torch
    thread: pairs above the grain are merged into runs and every run and remaining pair is copied by
    :func:`copy_on_caller` (single-threaded ``numpy.copyto``, no parallel region at all;
    :data:`BUSY_COPIES_ON_CALLER`).  Not on other threads (a read ahead): there it measured far slower, likely
    because a reader's own parallel regions give libgomp more threads than cores, which makes every team
    sleep instead of spin while it waits (docs/benchmarks.md "Hot path, per-entry cuts").  On the main
    thread, with other processes on the cores, torch's two-thread copy
    of seven 384 KiB blocks waits for a descheduled team thread (docs/benchmarks.md "Hot path, per-entry
    cuts", load 6.4: mean 1.07 ms, 99th percentile 16.6 ms, against 0.23 / 7.8 ms on the calling thread,
    whose median is ~30 µs longer: one core's bandwidth)."""
    n = len(dsts)
    caller = (BUSY_COPIES_ON_CALLER and n > 0 and dsts[0].numel() >= INTRA_OP_GRAIN and torch.get_num_threads() > 1
              and threading.current_thread() is _MAIN_THREAD and not machine_idle())
    if caller and n == 1:
        if not copy_on_caller(dsts, srcs):
            dsts[0].copy_(srcs[0])
        return
    if not caller and (n < 2 or not COALESCE_COPIES or torch.get_num_threads() == 1
                       or threading.current_thread() is not _MAIN_THREAD
                       or (dsts[0].numel() < INTRA_OP_GRAIN and not machine_idle())):
        if n:
            torch._foreach_copy_(dsts, srcs)
        return
    dptr = [d.data_ptr() for d in dsts]
    sptr = [s.data_ptr() for s in srcs]
    rest_d: list[torch.Tensor] = []
    rest_s: list[torch.Tensor] = []
    i = 0
    while i < n:
        j = i + 1
        d0, s0 = dsts[i], srcs[i]
        if j < n:
            dd, ds = dptr[j] - dptr[i], sptr[j] - sptr[i]
            shape, dstride, sstride = d0.shape, d0.stride(), s0.stride()
            if dd > 0 and ds > 0 and s0.dtype is d0.dtype and s0.shape == shape:
                while (j < n and dptr[j] - dptr[j - 1] == dd and sptr[j] - sptr[j - 1] == ds
                       and dsts[j].shape == shape and dsts[j].stride() == dstride
                       and srcs[j].stride() == sstride and srcs[j].dtype is d0.dtype):
                    j += 1
        if j - i >= 2 and _copy_run(d0, s0, j - i, dptr[i + 1] - dptr[i], sptr[i + 1] - sptr[i], caller):
            i = j
            continue
        rest_d.extend(dsts[i:j])
        rest_s.extend(srcs[i:j])
        i = j
    if rest_d and not (caller and copy_on_caller(rest_d, rest_s)):
        torch._foreach_copy_(rest_d, rest_s)


def copy_on_caller(dsts: list[torch.Tensor], srcs: list[torch.Tensor]) -> bool:
    """``dsts[i].copy_(srcs[i])`` for every ``i`` on the calling thread alone: one ``numpy.copyto`` per pair
    (numpy copies on one thread, with the GIL released), of the pair viewed as the integer dtype of its
    item size (so bfloat16 and the float8 types, which numpy lacks, copy the same bytes), when every pair
    allows it: both on the CPU, the same dtype and shape, no conjugate or negative bit, a destination that
    does not require grad and has no stride-0 dimension of more than one element (elements sharing memory,
    which torch's ``copy_`` refuses to write: the same test, ``torch._debug_has_internal_overlap``).
    Every pair is checked, and viewed, before anything is copied: returns False with nothing copied when
    one does not qualify (the caller copies them with torch then).  The bytes written are exactly those
    of the per-pair copies."""
    arrays = []
    for d, s in zip(dsts, srcs):
        if (not d.is_cpu or not s.is_cpu or d.dtype is not s.dtype or d.shape != s.shape or d.requires_grad
                or d.is_conj() or s.is_conj() or d.is_neg() or s.is_neg() or _internal_overlap(d) == 1):
            return False
        as_int = _SAME_SIZE_INTS.get(d.element_size())
        if as_int is None:
            return False
        try:
            arrays.append((d.view(as_int).numpy(), s.detach().view(as_int).numpy()))
        except (RuntimeError, TypeError):  # a view torch refuses (e.g. a complex dtype as an integer one)
            return False
    for dst, src in arrays:
        numpy.copyto(dst, src)
    return True


_SAME_SIZE_INTS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_internal_overlap = torch._debug_has_internal_overlap  # 0: none, 1: yes (a stride-0 dimension), 2: too hard to tell


BUSY_COPIES_ON_CALLER = True
"""Whether :func:`copy_pairs`, on the main thread, copies pairs above the grain itself (:func:`copy_on_caller`)
while the machine is busy and torch has more than one thread (a switch for benchmarks that measure the
difference; results are identical either way)."""


#: torch's ``at::internal::GRAIN_SIZE``: a CPU copy (or elementwise op) of at least this many elements runs
#: on all of torch's intra-op threads (one parallel region), a smaller one on the calling thread.
INTRA_OP_GRAIN = 32768


def to_strided_reads(pinned: list, dsts: list[torch.Tensor], strided: list[bool], by_address: list) -> bool:
    """Whether ``DataPaths._copy_each`` may read the batch with one ``read_into`` straight into ``dsts``
    (``DataPaths._read_rows``): every pinned value in one tier that reads row-contiguous destinations in
    place (``reads_strided``; not a CPU arena, read by address), every destination a CPU tensor of at
    least one dimension whose last is contiguous, as that ``read_into`` requires."""
    src = pinned[0][1]
    if not strided[src] or by_address[src] is not None:
        return False
    for item, dst in zip(pinned, dsts):
        if item[1] != src or not dst.is_cpu or not dst.dim() or dst.stride(-1) != 1:
            return False
    return True


def _run_view(t: torch.Tensor, count: int, step: int) -> torch.Tensor | None:
    """``count`` copies of ``t``'s view, ``step`` bytes apart, as one tensor over ``t``'s storage (None if
    the step is not a whole number of elements or the run would leave the storage)."""
    size = t.element_size()
    if step % size:
        return None
    step //= size
    span = 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride()) if s)
    if t.storage_offset() + (count - 1) * step + span > t.untyped_storage().nbytes() // size:
        return None
    return t.as_strided((count, *t.shape), (step, *t.stride()))


def _copy_run(d0: torch.Tensor, s0: torch.Tensor, count: int, dd: int, ds: int, caller: bool = False) -> bool:
    """One run of :func:`copy_pairs` as one copy (False: not mergeable, copy it pair by pair); with ``caller``
    by :func:`copy_on_caller` (else, or where that refuses it, by torch)."""
    if d0.numel() == 0:
        return False
    dview, sview = _run_view(d0, count, dd), _run_view(s0, count, ds)
    if dview is None or sview is None:
        return False
    if not (caller and copy_on_caller([dview], [sview])):
        dview.copy_(sview)
    return True


def _check_read_device(device: torch.device) -> torch.device:
    """``device`` if values can be read onto it; ``ValueError`` for the meta device (it holds no data) and
    for CUDA on a machine without it."""
    if device.type == "meta":
        raise ValueError("values cannot be read onto the meta device (it holds no data): ask for 'cpu' or 'cuda'")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} was asked for, but CUDA is not available on this machine")
    return device


def _normal_device(device: torch.device) -> torch.device:
    """``cuda`` -> ``cuda:<current>``, so devices compare equal however they were spelled."""
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device


def check_ranges(ranges: object, n: int) -> list[list[tuple[int, int]] | None]:
    """``get_many``'s ``ranges`` for ``n`` keys as a list of ``None`` or lists of ``(start, stop)`` int
    pairs: one item per key, each ``None`` or a sequence of pairs with ``0 <= start < stop``, sorted and
    non-overlapping (adjacent allowed); ``ValueError`` naming the item otherwise (the upper bound, the
    value's size, is checked against the entry by ``_get_ranged``)."""
    if isinstance(ranges, (str, bytes, torch.Tensor)) or not isinstance(ranges, Sequence):
        raise ValueError(f"ranges must be a sequence with one item per key, got {type(ranges).__name__}")
    if len(ranges) != n:
        raise ValueError(f"ranges has {len(ranges)} items for {n} keys")
    out: list[list[tuple[int, int]] | None] = []
    for i, item in enumerate(ranges):
        if item is None:
            out.append(None)
            continue
        if isinstance(item, (str, bytes)) or not isinstance(item, (Sequence, numpy.ndarray)):
            raise ValueError(f"ranges[{i}] must be None or a sequence of (start, stop) pairs, got {type(item).__name__}")
        pairs: list[tuple[int, int]] = []
        end = 0
        for j, pair in enumerate(item):
            try:
                start, stop = pair
                if isinstance(start, bool) or isinstance(stop, bool):
                    raise TypeError
                start, stop = operator.index(start), operator.index(stop)
            except (TypeError, ValueError):
                raise ValueError(f"ranges[{i}][{j}] must be a (start, stop) pair of ints, got {pair!r}") from None
            if not 0 <= start < stop:
                raise ValueError(f"ranges[{i}][{j}] = ({start}, {stop}): need 0 <= start < stop")
            if start < end:
                raise ValueError(f"ranges[{i}][{j}] = ({start}, {stop}) starts before the previous range's end "
                                 f"{end}: ranges must be sorted and must not overlap")
            pairs.append((start, stop))
            end = stop
        out.append(pairs)
    return out


def _check_packed_room(entries: list[Entry], packed: torch.Tensor) -> None:
    offsets, total = packed_layout([entry.nbytes for entry in entries])
    if packed.numel() < total:
        raise ValueError(
            f"out holds {packed.numel()} bytes but these {len(entries)} values need {total} "
            f"(packed at 256-byte alignment)"
        )


def _check_destinations(entries: list[Entry], dsts: list[torch.Tensor]) -> None:
    """C5: each caller tensor must have the stored dtype and number of elements (``ValueError`` naming
    the key otherwise)."""
    if len(dsts) != len(entries):
        raise ValueError(f"out has {len(dsts)} tensors for {len(entries)} keys")
    for entry, dst in zip(entries, dsts):
        if dst.dtype is not entry.dtype:  # torch dtypes are singletons
            raise ValueError(f"out tensor for key {entry.key!r} has dtype {dst.dtype}, the value is {entry.dtype}")
        if dst.nbytes != entry.nbytes:
            raise ValueError(
                f"out tensor for key {entry.key!r} has {dst.numel()} elements, the value has shape "
                f"{list(entry.shape)}"
            )
