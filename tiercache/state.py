"""The cache's shared bookkeeping and its primitives: the index lock, the operation bracket that ``close``
waits on, the logical clock, pins and deferred releases, and the timed tier I/O wrappers.

:class:`CacheState` declares the state that :class:`tiercache.Cache` creates in ``__init__``; the mixins
that implement the cache's concerns (``moves``, ``persistence``, ``batched``) build on it.

Concurrency design.  One index lock guards the bookkeeping (which key lives in which slot, queues,
counters).  Every byte copy and file operation runs outside it, in two phases: *prepare* under the lock
(reserve a slot, pin the source, mark a mover) and *complete* under the lock (publish the new location,
release the old slot) or roll back.  A slot that a reader or mover has pinned is released only when its
last pin goes, so a concurrent delete or overwrite never frees bytes still being copied.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Hashable, Iterator

import torch

from .config import CacheConfig
from .errors import CacheClosedError, TierIOError
from .index import Entry, RankedQueue
from .policies import Policy, reranks_lazily, reranks_on_access
from .stats import CacheCounters
from .tiers.base import EntryHeader, Slot, Tier
from .transfer import CopyEngine

log = logging.getLogger("tiercache.cache")

# The modules whose frames, with a cache as ``self``, run inside one of its operations (see
# ``CacheState._runs_inside_operation``).
_OPERATION_FILES = frozenset(os.path.join(os.path.dirname(__file__), name)
                             for name in ("batched.py", "moves.py", "persistence.py"))

Release = tuple[int, Slot]
"""A slot to give back to tier ``[0]`` once its pins are gone (see ``CacheState._finish``)."""


class CacheState:
    """State shared by the cache's concerns.  All of it is guarded by ``_lock`` unless stated."""

    config: CacheConfig
    _policy: Policy
    _lazy_rank: Any  # policy.rank when hits are re-ranked lazily, else None
    _rerank_hits: bool
    _lock: threading.RLock
    _idle: threading.Condition  # notified when ``_active`` drops to 0
    _closed: bool
    _closing: bool  # close() has begun: no new operations start
    _closer: int | None  # the thread running close() (threading.get_ident()), while it runs
    _close_finished: bool  # close() has run to its end (tiers closed, path lock released)
    _close_error: BaseException | None  # what that close() raised, re-raised by the close() calls that waited for it
    _callbacks: threading.local  # per thread: ``depth``, how many on_evict callbacks this thread is inside
    _io_threads: set[int]  # idents of the prefetch pool's threads (close() cannot join the thread it runs on)
    _persisted: dict[int, tuple[int, int]] | None  # once closed: (entries, payload bytes) per persistent tier
    _active: int  # public operations in flight; close() waits for them
    _index: dict[Hashable, Entry]
    _pins: dict[int, int]  # id(slot) -> readers/movers holding it
    _deferred: dict[int, Release]  # id(slot) -> a release made while pinned, done when the last pin goes
    _clock: int
    _seq: int
    _executor: ThreadPoolExecutor | None
    _engines: dict[torch.device, CopyEngine]  # batched copiers, one per target device
    _evicted: list[tuple[Hashable, str]]  # drops not yet reported to on_evict
    _later: list[Release]  # releases collected under the lock, finished after it
    _later_releases: list[Release]  # the same, left by the data paths' direct puts (see batched._put_direct)
    _entry_header_tiers: list[bool]  # per tier: its reads take the Entry for its header (arenas, DiskTier itself)
    _direct_tiers: list[bool]  # per tier: a CPU arena that small CPU values are copied into under the lock
    _tiers: list[Tier]
    _queues: list[RankedQueue]
    _limits: list[int]  # each tier's max_nbytes (fixed once the tiers exist)
    _largest_limit: int
    _counters: CacheCounters
    _tier_counters: list[Any]  # _counters.tiers by tier index (TierCounters)
    _direct_arena: Any  # tiers[0] when it is a CPU arena (``_direct_tiers[0]``), else None
    _tier_names: list[str]  # each tier's name, by index
    _address_tiers: list[Any]  # per tier: the tier when its slots are read by address (a CPU arena), else None
    _batch_tiers: list[bool]  # per tier: it reads batches (``read_into``)
    _strided_tiers: list[bool]  # per tier: its ``read_into`` writes row-contiguous destinations in place

    def _init_state(self, config: CacheConfig, policy: Policy) -> None:
        self.config = config
        self._policy = policy
        # The policy's rank when hits are re-ranked lazily (see policies.reranks_lazily), else None.
        self._lazy_rank = policy.rank if reranks_lazily(policy) else None
        self._rerank_hits = reranks_on_access(policy) and self._lazy_rank is None  # a queue push per hit
        self._lock = threading.RLock()
        self._idle = threading.Condition(self._lock)
        self._closed = False
        self._closing = False
        self._closer = None
        self._close_finished = False
        self._close_error = None
        self._callbacks = threading.local()
        self._io_threads = set()
        self._persisted = None
        self._active = 0
        self._index = {}
        self._pins = {}
        self._deferred = {}
        self._clock = 0
        self._seq = 0
        self._executor = None
        self._engines = {}
        self._evicted = []
        self._later = []
        self._later_releases = []

    # -- helpers (call with the lock held unless stated) ----------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise CacheClosedError("this tiercache.Cache is closed")

    def _begin(self) -> None:
        """Start a public operation (``close`` waits for it before persisting); pair with ``_end``."""
        with self._lock:
            if self._closing or self._closed:
                raise CacheClosedError("this tiercache.Cache is closed")
            self._active += 1

    def _end(self) -> None:
        with self._lock:
            self._active -= 1
            if not self._active and self._closing:  # only close() waits for it (after setting _closing)
                self._idle.notify_all()

    @contextmanager
    def _operation(self) -> Iterator[None]:
        """``_begin``/``_end`` as a context manager, for the operations that are not on the hot path."""
        self._begin()
        try:
            yield
        finally:
            self._end()

    def _runs_inside_operation(self) -> bool:
        """Whether the calling thread runs inside one of this cache's operations: a frame of the data paths
        or the moves (``batched.py``, ``moves.py``, ``persistence.py``) with this cache as ``self`` is on
        its stack, e.g. a policy's ``promote`` or a tier's method called by a ``get``.  ``close()`` asks
        (only while operations are in flight: it walks the stack) so that it raises instead of waiting
        for the very operation that runs it."""
        frame = sys._getframe(1)
        files = _OPERATION_FILES
        while frame is not None:
            code = frame.f_code
            if code.co_filename in files and code.co_argcount and code.co_varnames[0] == "self" \
                    and frame.f_locals.get("self") is self:
                return True
            frame = frame.f_back
        return False

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _rerank(self, entry: Entry) -> None:
        """Queue ``entry`` in its tier's queue at the policy's rank of its current info (its older items
        go stale).  If ``policy.rank`` raises, the entry is queued at its previous rank instead, so it stays
        evictable (a victim handed back or an entry just moved has no other current item), and the error
        propagates: callers in the middle of bookkeeping use :meth:`_rerank_or_error`."""
        entry.info.tier = self._tiers[entry.level].name
        queue = self._queues[entry.level]
        try:
            rank = self._policy.rank(entry.info)
        except BaseException:
            queue.push(entry, entry.queued_rank)  # (set by the entry's first push or by recovery's load)
            raise
        queue.push(entry, rank)

    def _rerank_or_error(self, entry: Entry) -> BaseException | None:
        """:meth:`_rerank`, returning what ``policy.rank`` raised instead of raising it: for bookkeeping
        that must run to its end (hand victims back, unpin, release) before the error propagates."""
        try:
            self._rerank(entry)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller, who raises it
            return exc
        return None

    # Pins are keyed by the Slot object's identity: every pin, unpin and release of a slot goes through the
    # one Slot object its entry holds (a reader keeps it alive while pinned), and an identity key hashes
    # in C where the slot's ``ref`` (a dataclass) would hash in Python.
    def _pin(self, tier: int, slot: Slot) -> None:
        token = id(slot)
        self._pins[token] = self._pins.get(token, 0) + 1

    def _unpin(self, tier: int, slot: Slot) -> list[Release]:
        token = id(slot)
        count = self._pins[token] - 1
        if count:
            self._pins[token] = count
            return []
        del self._pins[token]
        deferred = self._deferred.pop(token, None)
        return [deferred] if deferred is not None else []

    def _unpin_all(self, pinned: list[tuple]) -> list[Release]:
        """``_unpin`` for each item of a batch: ``(entry, tier, slot, header)`` as ``_lookup_and_pin``
        returns them (only the slot is used)."""
        pins, deferred, releases = self._pins, self._deferred, []
        for item in pinned:
            token = id(item[2])
            count = pins[token] - 1
            if count:
                pins[token] = count
                continue
            del pins[token]
            if deferred:  # (a release made while pinned: rare; an empty dict is a truth test, not a pop)
                release = deferred.pop(token, None)
                if release is not None:
                    releases.append(release)
        return releases

    def _release(self, tier: int, slot: Slot) -> list[Release]:
        """Give a slot back: now if nobody has it pinned, else when the last pin goes."""
        if id(slot) in self._pins:
            self._deferred[id(slot)] = (tier, slot)
            return []
        return [(tier, slot)]

    def _unlink(self, entry: Entry) -> list[Release]:
        """Remove ``entry`` from the index (it must be the current one for its key)."""
        del self._index[entry.key]
        self._queues[entry.level].remove(entry)
        entry.version += 1
        return self._release(entry.level, entry.slot)

    def _drop_entry(self, entry: Entry, reason: str) -> list[Release]:
        self._counters.evictions += reason == "capacity"
        self._evicted.append((entry.key, reason))
        return self._unlink(entry)

    def _free_volatile(self, releases: list[Release]) -> list[Release]:
        """With the lock held: free the released slots of volatile tiers now (their ``discard`` is a
        no-op, so there is no I/O to do outside the lock); returns the rest, for ``_finish``."""
        rest = []
        for tier_index, slot in releases:
            tier = self._tiers[tier_index]
            if tier.persistent:
                rest.append((tier_index, slot))
            else:
                tier.free(slot)
        return rest

    def _finish(self, releases: list[Release], *, loud: bool = False) -> None:
        """Outside the lock: discard released slots' contents, then return them to their tiers.

        A failed discard is logged and counted (the slot is reused later anyway: a rewrite replaces the
        file).  With ``loud`` (an explicit delete) the first such failure is raised as ``TierIOError`` once
        every slot is back: the entry is gone from the index but its bytes may reappear after a reopen, and
        the caller was promised otherwise."""
        done: list[Release] = []
        failure: OSError | None = None
        for tier_index, slot in releases:
            try:
                self._tiers[tier_index].discard(slot)
            except OSError as exc:
                log.warning("tiercache: %s", exc)
                with self._lock:
                    self._counters.errors["discard"] += 1
                failure = failure or exc
            done.append((tier_index, slot))
        if done:
            with self._lock:
                for tier_index, slot in done:
                    self._tiers[tier_index].free(slot)
        self._notify_evictions()
        if loud and failure is not None:
            if isinstance(failure, TierIOError):
                raise failure
            raise TierIOError(f"deleting an entry failed: {failure}; it may come back after a reopen", failure.errno)

    def _notify_evictions(self) -> None:
        if not self._evicted:
            return
        with self._lock:
            events, self._evicted = self._evicted, []
        callback = self.config.on_evict
        if callback is not None:
            # Marked, so that close() called from the callback raises instead of waiting for the operation
            # running it (which can only end once the callback returns).
            local = self._callbacks
            depth = getattr(local, "depth", 0)
            local.depth = depth + 1
            try:
                for key, reason in events:
                    try:
                        callback(key, reason)
                    except Exception:  # a user callback must not break cache invariants
                        log.exception("tiercache: on_evict callback failed")
            finally:
                local.depth = depth

    def _timed_write(self, tier_index: int, slot: Slot, data: torch.Tensor, header: EntryHeader) -> None:
        start = time.perf_counter()
        self._tiers[tier_index].write(slot, data, header)
        elapsed = time.perf_counter() - start
        with self._lock:
            counters = self._counters.tiers[self._tiers[tier_index].name]
            counters.bytes_written += slot.nbytes
            counters.write_seconds += elapsed

    def _timed_read(self, tier_index: int, slot: Slot, header: EntryHeader) -> torch.Tensor:
        start = time.perf_counter()
        data = self._tiers[tier_index].read(slot, header)
        elapsed = time.perf_counter() - start
        with self._lock:
            counters = self._counters.tiers[self._tiers[tier_index].name]
            counters.bytes_read += slot.nbytes
            counters.read_seconds += elapsed
        return data

    def _finish_then_end(self, releases: list[Release], end: bool = True) -> None:
        """Outside the lock: :meth:`_finish` what an operation left (releases, evictions), then, with ``end``,
        :meth:`_end` that operation, which stayed open for them (close() waits for them)."""
        try:
            self._finish(releases)
        finally:
            if end:
                self._end()

    def _finish_later(self, releases: list[Release]) -> None:
        self._later.extend(releases)

    def _flush_finish_later(self) -> None:
        with self._lock:
            releases, self._later = self._later, []
        self._finish(releases)

