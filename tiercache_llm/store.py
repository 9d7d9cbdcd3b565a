"""The bridge between KV blocks and a :class:`tiercache.Cache`: budgets, capacity checks, counters.

:class:`BlockStore` is the only module of tiercache_llm that talks to tiercache.  It owns (or borrows)
a ``tiercache.Cache``, keeps the exact set of keys this KV cache has stored, refuses to store a block
that would push this cache's bytes past the tiers' combined capacity, and turns a lost block (evicted
by the tiercache) into a :class:`~tiercache_llm.errors.KVCapacityError` instead of a wrong answer.

Orphaned blocks: when the store has a ``path``, every KV cache whose blocks it holds is registered as an
*ephemeral owner* (:mod:`tiercache.owners`) of the keys ``("kv", cache_uid, ...)`` (see
:func:`tiercache_llm.blocks.block_key`) before its first block is written, and unregistered after its
blocks are deleted on :meth:`BlockStore.close`.  A process killed in between leaves blocks and the
record; the next :meth:`BlockStore.open` of the path (or ``python -m tiercache gc PATH``) deletes them.
"""

from __future__ import annotations

import concurrent.futures
import inspect
import logging
import os
import shutil
import tempfile
import threading
import time
import weakref
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Sequence

import torch

import tiercache
from tiercache import owners as _owners
from tiercache.sizes import format_size as _fmt
from tiercache.tiers.memory import ArenaTier

from .blocks import KEY_PREFIX
from .errors import KVCapacityError, TieredKVError
from .policies import AttentionPlacementPolicy, SpreadStreamingKVPolicy, StreamingKVPolicy

log = logging.getLogger("tiercache_llm")
#: tiercache_llm's placement policies by the name :meth:`BlockStore.create` accepts (other names go to tiercache)
_KV_POLICIES = {cls.name: cls for cls in (StreamingKVPolicy, SpreadStreamingKVPolicy, AttentionPlacementPolicy)}

WRITE_QUEUE = "write-queue"
"""What :meth:`BlockStore.tiers_of` names for an entry still waiting in the write-behind queue."""


class KVWriteError(TieredKVError, RuntimeError):
    """A write-behind write of KV blocks failed (or the tiercache evicted a block meanwhile).  Raised by the
    next call on the store after the failure; the blocks that were not written stay readable from the
    queue (nothing is lost) and :meth:`BlockStore.flush_writes` retries them."""


@dataclass
class KVCounters:
    """What the KV cache asked of its tiers (all monotonically increasing until ``reset_counters``).

    Attributes:
        blocks_put / bytes_put: entries (one K or one V block each) written to the tiercache (with
            write-behind: counted when queued; ``queued_bytes`` in :meth:`BlockStore.stats` is what the
            writer has not stored yet, the tiercache's stats hold the rest: a block is counted in both
            only while its ``put_many`` runs).
        blocks_fetched / bytes_fetched: entries read back for attention (exact mode reads every
            visible block once per layer per forward pass).
        blocks_deleted: entries removed (crop, reset, batch selection, sliding-window expiry).
        prefetches: prefetch requests issued (one per layer per forward when ``prefetch`` is on).
        prefetch_errors: prefetch futures that finished with an exception (the following ``get``
            is what decides correctness; a failed prefetch only costs time).
        fetch_seconds / put_seconds: wall-clock time spent inside ``get_many`` / ``put_many`` (with
            write-behind, ``put_seconds`` is the writer thread's time and ``enqueue_seconds`` the
            caller's: copying the blocks into the queue and waiting on back-pressure).
        queued_puts / queue_hits: entries that went through the write-behind queue / were read back
            from it before being written.
        backpressure_waits / backpressure_seconds: puts that waited for the queue to drain, and how long.
        write_errors: write-behind batches that failed (each raised at the next call).
    """

    blocks_put: int = 0
    bytes_put: int = 0
    blocks_fetched: int = 0
    bytes_fetched: int = 0
    blocks_deleted: int = 0
    prefetches: int = 0
    prefetch_errors: int = 0
    fetch_seconds: float = 0.0
    put_seconds: float = 0.0
    enqueue_seconds: float = 0.0
    queued_puts: int = 0
    queue_hits: int = 0
    backpressure_waits: int = 0
    backpressure_seconds: float = 0.0
    write_errors: int = 0


def _takes_ranges(cache: Any) -> bool:
    """Whether ``cache.get_many`` takes ``ranges=`` (ranged reads of values' bytes)."""
    try:
        return "ranges" in inspect.signature(cache.get_many).parameters
    except (TypeError, ValueError):
        return False


def _read_bytes(tensors: Sequence[torch.Tensor], ranges: Sequence[Any] | None) -> int:
    """Bytes a ``get_blocks`` call asked for: each value's, or the sum of its ranges."""
    if ranges is None:
        return sum([t.nbytes for t in tensors])
    return sum([t.nbytes if item is None else sum([b - a for a, b in item]) for t, item in zip(tensors, ranges)])


def copy_ranges(dst: torch.Tensor, src: torch.Tensor, ranges: Sequence[tuple[int, int]]) -> None:
    """Copy the byte ranges ``ranges`` of ``src`` (C order) into the same bytes of ``dst`` (contiguous, as many
    elements of the same dtype), in the tensors' dtype where the ranges are whole elements (a copy through a
    ``uint8`` view crosses torch's threshold for multi-threaded copies sooner: DESIGN.md), else as bytes."""
    if not ranges:  # (an empty item reads nothing; _foreach_copy_ refuses empty lists)
        return
    size = src.element_size()
    flat_dst, flat_src = dst.view(-1), src.reshape(-1)
    if any(a % size or b % size for a, b in ranges):
        flat_dst, flat_src, size = flat_dst.view(torch.uint8), flat_src.view(torch.uint8), 1
    torch._foreach_copy_([flat_dst[a // size:b // size] for a, b in ranges],
                         [flat_src[a // size:b // size] for a, b in ranges])


def _cleanup(cache: Any, owns: bool, tmpdir: str | None) -> None:
    if owns:
        try:
            cache.close()
        except Exception:  # noqa: BLE001 - best effort at interpreter exit / garbage collection
            pass
    if tmpdir is not None:
        shutil.rmtree(tmpdir, ignore_errors=True)


class BlockStore:
    """Stores KV blocks as entries of a ``tiercache.Cache`` and accounts for them.

    Build one with :meth:`open` (creates and owns a tiercache) or wrap an existing cache with
    ``BlockStore(cache)`` (borrowed: :meth:`close` deletes this store's entries but leaves the
    tiercache open).
    """

    def __init__(self, cache: Any, *, owns: bool = False, tmpdir: str | None = None) -> None:
        for name in ("put_many", "get_many", "delete", "stats", "prefetch"):
            if not callable(getattr(cache, name, None)):
                raise TypeError(
                    f"cache must be a tiercache.Cache (missing {name!r}), got {type(cache).__name__}"
                )
        self.cache = cache
        self.owns = owns
        self.tmpdir = tmpdir
        self.counters = KVCounters()
        self._live: dict[Any, int] = {}  # key -> nbytes, for every entry this store put and still holds
        self._held_bytes = 0
        self._held_charge = 0  # what this store's entries may occupy in the tiers (Cache.charge of each)
        self._futures: list[concurrent.futures.Future] = []
        # Whether cache.get_many writes into a list of out tensors (C5): None until first tried.
        self.out_lists: bool | None = None
        # Whether cache.get_many reads byte ranges of values (``ranges=``): without it get_blocks' ranges read whole.
        self.ranged_reads = _takes_ranges(cache)
        # The placement policy object when this store created it (``open``); the sparse KV cache tunes an
        # AttentionPlacementPolicy's promotion threshold through it.  None for a borrowed cache.
        self.policy: Any = None
        self._lock = threading.Lock()
        # Held by the KV cache's update / sparse decode / end of pass and by its close(), so a close() from
        # another thread waits for the call in flight instead of tearing the pipeline and tiers down under it.
        self.op_lock = threading.RLock()
        self._closed = False
        self._closing = False  # set when close() starts (before it deletes this store's entries)
        # Write-behind (enable_write_behind): key -> [tensor, score] not yet written; guarded by _wcond.
        self._wcond = threading.Condition()
        self._pending: dict[Any, list] = {}
        self._pending_bytes = 0
        self._write_limit = 0
        self._writer: concurrent.futures.ThreadPoolExecutor | None = None
        self._write_error: BaseException | None = None
        self._failed: list[Any] = []  # keys of failed batches (still in _pending), retried by flush_writes
        stats = cache.stats()
        self._last_evictions = self._evictions(stats)
        self._capacities = {
            name: int(t.get("capacity_bytes", 0))
            for name, t in stats.get("tiers", {}).items()
            if t.get("capacity_bytes", 0)
        }
        # Whether every tier holds its bytes in memory (no disk tier): a read of any entry is a memory copy.
        tiers = getattr(cache, "tiers", None)
        self.memory_only = tiers is not None and all(isinstance(t, ArenaTier) for t in tiers)
        # Names of the tiers whose reads are memory copies (and the write-behind queue's), for in_memory.
        self._memory_tiers = frozenset([t.name for t in tiers or () if isinstance(t, ArenaTier)] + [WRITE_QUEUE])
        # Whether some tier's reads wait on a device rather than copy from memory: a disk tier reading past
        # the page cache (direct_io).  A buffered disk tier's reads are taken as page-cache copies, CPU work.
        self.device_reads = any(getattr(t, "direct_io", False) for t in tiers or ())
        self._owner_root: str | None = None  # the store path owners are recorded under (None: not recorded)
        self._owners: dict[str, _owners.Owner] = {}  # cache uid -> its registration
        self.reclaimed: _owners.ReclaimReport | None = None  # what open() reclaimed from dead owners
        self._finalizer = weakref.finalize(self, _cleanup, cache, owns, tmpdir)

    @classmethod
    def open(
        cls,
        *,
        gpu: int | str | None,
        host: int | str | None,
        disk: int | str | None,
        path: str | os.PathLike | None,
        policy: Any = "kv-stream",
        compression: str | None = None,
        direct_io: bool = False,
    ) -> "BlockStore":
        """Create a tiercache with the given budgets.  A disk budget without ``path`` uses a fresh
        temporary directory that :meth:`close` removes.  ``direct_io`` is tiercache's
        ``CacheConfig.direct_io`` (disk reads and writes bypass the OS page cache); it only applies when
        there is a disk tier.

        With a ``path`` of the caller's, the blocks of dead KV caches left in the store (a killed
        process) are deleted first (:func:`tiercache.owners.reclaim`; logged on the ``tiercache_llm``
        logger, the report kept in :attr:`reclaimed`), and this store's KV caches are recorded as owners
        of their blocks from then on."""
        if isinstance(policy, str) and policy in _KV_POLICIES:
            policy = _KV_POLICIES[policy]()
        tmpdir = None
        if disk not in (None, 0) and path is None:
            tmpdir = tempfile.mkdtemp(prefix="tiercache-kv-")
            path = tmpdir
        kwargs: dict[str, Any] = dict(gpu=gpu, host=host, disk=disk, path=path, policy=policy)
        if compression is not None:
            kwargs["compression"] = compression
        if direct_io and disk not in (None, 0):
            kwargs["direct_io"] = True
        try:
            cache = tiercache.Cache(**kwargs)
        except BaseException:
            if tmpdir is not None:
                shutil.rmtree(tmpdir, ignore_errors=True)
            raise
        store = cls(cache, owns=True, tmpdir=tmpdir)
        store.policy = policy
        if path is not None and tmpdir is None:
            try:
                store._start_owner_records(os.fspath(path))
            except BaseException:
                store.close()
                raise
        return store

    # ------------------------------------------------------------------------------------- owners
    def _start_owner_records(self, path: str) -> None:
        report = _owners.reclaim(self.cache, path)
        self.reclaimed = report
        if report.owners:
            log.info(
                "tiercache_llm: reclaimed %d KV block entries (%s) of %d dead KV cache(s) in %s",
                report.entries, _fmt(report.bytes_freed), len(report.owners), path,
            )
        for problem in report.problems:
            log.warning("tiercache_llm: unreadable owner record in %s: %s", path, problem)
        self._owner_root = path

    def _register_owners(self, items: Sequence[tuple[Any, torch.Tensor]]) -> None:
        """Record the KV cache of every block key ``("kv", uid, ...)`` in ``items`` as an owner (once)."""
        if self._owner_root is None:
            return
        for key, _ in items:
            if type(key) is tuple and len(key) >= 2 and key[0] == KEY_PREFIX and type(key[1]) is str:
                uid = key[1]
                if uid not in self._owners:
                    with self._lock:
                        if uid not in self._owners:
                            self._owners[uid] = _owners.register(self._owner_root, uid, prefix=(KEY_PREFIX, uid))

    def _release_owners(self) -> None:
        with self._lock:
            registered, self._owners = list(self._owners.values()), {}
        for owner in registered:
            owner.release()

    # ----------------------------------------------------------------------------------- figures
    @staticmethod
    def _evictions(stats: dict) -> int:
        return int(stats["evictions"])

    def tier_capacities(self) -> dict[str, int]:
        """``{tier name: capacity in bytes}`` for every enabled tier of the tiercache."""
        return dict(self._capacities)

    @property
    def held_bytes(self) -> int:
        """Bytes of the entries this store has put and not deleted."""
        return self._held_bytes

    @property
    def live_entries(self) -> int:
        return len(self._live)

    def _budget_text(self) -> str:
        caps = self.tier_capacities()
        parts = ", ".join(f"{name}={_fmt(cap)}" for name, cap in caps.items()) or "no tiers"
        return f"tier budgets: {parts} (total {_fmt(sum(caps.values()))})"

    # ------------------------------------------------------------------------------- operations
    def put_blocks(self, items: Sequence[tuple[Any, torch.Tensor]]) -> None:
        """Store new entries.

        Raises :class:`KVCapacityError` *before writing anything* when one entry exceeds every tier or
        the entries' bytes exceed the free space left in all tiers together (storing them would force
        an eviction; for a borrowed tiercache: the tiers' total capacity minus this store's bytes), and *right after writing* when the tiercache nevertheless evicted one of this
        store's entries (tiers charge rounded slot sizes, so payload bytes can fit while slots do not).
        """
        self._check_open()
        if not items:
            return
        caps = self.tier_capacities()
        new_bytes = sum(t.numel() * t.element_size() for _, t in items)
        new_charge = sum(self.cache.charge(t.numel() * t.element_size()) for _, t in items)
        largest = max(t.numel() * t.element_size() for _, t in items)
        if not caps or largest > max(caps.values()):
            raise KVCapacityError(
                f"a KV block of {_fmt(largest)} does not fit in any tier ({self._budget_text()}); "
                "use a smaller block_size or larger budgets"
            )
        # Every entry is charged the most any tier would charge it (slot rounding, disk headers), because a
        # demotion can move it to the tier that charges most.  A shared tiercache may evict other users'
        # entries for us, so only this store's own entries count against the total capacity.
        free = sum(caps.values()) - self._held_charge
        if new_charge > free:
            raise KVCapacityError(
                f"storing {_fmt(new_bytes)} more of KV blocks ({_fmt(new_charge)} with slot and header overhead) "
                f"needs more than the {_fmt(free)} left free in the tiers "
                f"(this cache already holds {_fmt(self._held_bytes)}; {self._budget_text()}): the tiercache would have "
                "to evict blocks and exact attention would be lost. Raise the host/disk budgets (or shorten the "
                "context / max_new_tokens)."
            )
        self._register_owners(items)  # before any block lands: a crash from here on leaves a record
        if self._writer is not None:
            self._enqueue(items, new_bytes)
            return
        start = time.perf_counter()
        try:
            self.cache.put_many(list(items))
        except BaseException as exc:
            self._roll_back(items)
            if isinstance(exc, (ValueError, tiercache.TierCacheError)):
                raise KVCapacityError(f"the tiercache refused a KV block ({exc}); {self._budget_text()}") from exc
            raise
        self.counters.put_seconds += time.perf_counter() - start
        for key, tensor in items:
            self._account(key, tensor.numel() * tensor.element_size())
        self.counters.blocks_put += len(items)
        self.counters.bytes_put += new_bytes
        self._check_evictions()

    def _roll_back(self, items: Sequence[tuple[Any, torch.Tensor]]) -> None:
        """After a ``put_many`` of ``items`` that raised (it stops at the failing item: the ones before it stay
        stored): delete the entries it stored that this store did not hold before.  The caller was told the put
        failed, so nobody else tracks them; an entry that cannot be deleted now is accounted instead, so
        :meth:`delete_all` (``TieredKVCache.reset``) and :meth:`close` delete it."""
        for key, tensor in items:
            if key in self._live:  # held before this put (replaced or not): still this store's entry
                continue
            try:
                if key in self.cache:
                    self.cache.delete(key)
            except BaseException:  # noqa: BLE001 - keep it tracked; the put's own error is the one raised
                self._account(key, tensor.numel() * tensor.element_size())

    # ------------------------------------------------------------------------------ write-behind
    def enable_write_behind(self, max_bytes: int) -> None:
        """From now on, :meth:`put_blocks` copies the blocks into a queue and returns; one writer thread
        stores them (``put_many``).  At most ``max_bytes`` wait in the queue: a put that would exceed it
        waits until the writer catches up (back-pressure; a single batch larger than ``max_bytes`` is
        admitted alone).  Until written, an entry is served by :meth:`get_blocks` from the queue and
        :meth:`tiers_of` names it :data:`WRITE_QUEUE`.  A failed write raises :class:`KVWriteError` at the
        next call and leaves its entries queued (readable; retried by :meth:`flush_writes`); when that call is
        a put, it raises before queueing its own blocks (none of them is stored).  Capacity
        checks and accounting happen at enqueue time, exactly as for a direct put.  ``0`` disables it
        (after draining the queue)."""
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes must be an int >= 0, got {max_bytes!r}")
        self._check_open()
        if max_bytes == 0:
            self.flush_writes()
            writer, self._writer = self._writer, None
            if writer is not None:
                writer.shutdown(wait=True)
            return
        self._write_limit = max_bytes
        if self._writer is None:
            self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tiercache-kv-writer")

    @property
    def queued_bytes(self) -> int:
        """Bytes of blocks waiting in the write-behind queue."""
        return self._pending_bytes

    def _raise_write_error(self) -> None:
        if self._write_error is None:  # (the common case, without the lock: a failure set meanwhile is raised next call)
            return
        with self._wcond:
            exc, self._write_error = self._write_error, None
        if exc is not None:
            self._raise_taken(exc)

    @staticmethod
    def _raise_taken(exc: BaseException, refused_put: bool = False) -> None:
        """Raise a write-behind failure taken from ``_write_error`` (as :class:`KVWriteError`, or itself when it
        is a :class:`KVCapacityError`); ``refused_put``: raised by a put that queued nothing."""
        if isinstance(exc, KVCapacityError):
            raise exc
        refused = "; this put stored none of its blocks" if refused_put else ""
        raise KVWriteError(f"a write-behind write of KV blocks failed: {exc}{refused}; the blocks that failed are "
                           "kept in the queue (flush_writes() retries them)") from exc

    def _enqueue(self, items: Sequence[tuple[Any, torch.Tensor]], nbytes: int) -> None:
        start = time.perf_counter()
        batch = [(key, tensor.detach().clone()) for key, tensor in items]  # callers reuse their buffers
        with self._wcond:
            if self._pending_bytes and self._pending_bytes + nbytes > self._write_limit:
                self.counters.backpressure_waits += 1
                waited = time.perf_counter()
                while self._pending_bytes and self._pending_bytes + nbytes > self._write_limit:
                    if self._write_error is not None or self._failed:
                        break  # the writer is not draining: raise below instead of waiting forever
                    self._wcond.wait()
                self.counters.backpressure_seconds += time.perf_counter() - waited
            # A failure not yet raised is raised now, before this batch is queued: the caller is told its put
            # failed, so none of its blocks may be written behind its back (nobody would track or delete them).
            failure, self._write_error = self._write_error, None
            if failure is None:
                for key, tensor in batch:
                    old = self._pending.pop(key, None)
                    if old is not None:
                        self._pending_bytes -= old[0].nbytes
                    self._pending[key] = [tensor, None]
                    self._pending_bytes += tensor.nbytes
        if failure is not None:
            self._raise_taken(failure, refused_put=True)
        for key, tensor in batch:
            self._account(key, tensor.numel() * tensor.element_size())
        self.counters.blocks_put += len(batch)
        self.counters.bytes_put += nbytes
        self.counters.queued_puts += len(batch)
        self.counters.enqueue_seconds += time.perf_counter() - start
        self._writer.submit(self._write, [key for key, _ in batch])

    def _write(self, keys: list[Any]) -> None:
        """Writer thread: store ``keys`` (those still queued) and drop them from the queue."""
        with self._wcond:
            live = [(key, self._pending[key]) for key in keys if key in self._pending]
        if not live:
            return
        start = time.perf_counter()
        written = False
        try:
            self.cache.put_many([(key, slot[0]) for key, slot in live],
                                scores=[slot[1] for key, slot in live])
            # Out of the queue as soon as the tiercache holds the batch: stats() counts a block either in
            # queued_bytes or in the tiers, not in both while the scores and evictions are checked.
            with self._wcond:
                written = True
                latest = {}
                for key, slot in live:
                    if self._pending.get(key) is slot:
                        if slot[1] is not None:
                            latest[key] = slot[1]
                        del self._pending[key]
                        self._pending_bytes -= slot[0].nbytes
                self._wcond.notify_all()
            if latest:  # scores set while the batch was being written
                self.cache.update_scores(latest)
            self._check_evictions()
        except BaseException as exc:  # noqa: BLE001 - surfaced at the next call; unwritten data stays queued
            with self._wcond:
                self._write_error = exc
                self.counters.write_errors += 1
                if not written:
                    self._failed.extend(key for key, _ in live)
                self._wcond.notify_all()
            return
        finally:
            self.counters.put_seconds += time.perf_counter() - start

    def flush_writes(self) -> None:
        """Wait until every queued block is written; retries blocks of failed batches once (raising
        :class:`KVWriteError` if that fails again), then raises any failure not yet reported."""
        if self._writer is None:
            return
        self._writer.submit(lambda: None).result()  # every batch submitted before this one has run
        with self._wcond:
            retry, self._failed = list(dict.fromkeys(self._failed)), []
            if retry:
                self._write_error = None
        if retry:
            self._write(retry)
        self._raise_write_error()

    def _queued(self, keys: Sequence[Any]) -> dict[Any, torch.Tensor]:
        if not self._pending:
            return {}
        with self._wcond:
            return {key: self._pending[key][0] for key in keys if key in self._pending}

    def _check_evictions(self) -> None:
        evictions = self._evictions(self.cache.stats())
        if evictions == self._last_evictions:
            return
        self._last_evictions = evictions
        lost = [key for key in list(self._live) if key not in self.cache]
        if lost:
            raise KVCapacityError(
                f"the tiercache evicted {len(lost)} KV block entr{'y' if len(lost) == 1 else 'ies'} of this cache "
                f"(this cache holds {_fmt(self._held_bytes)}; {self._budget_text()}); exact attention is no longer "
                "possible. Raise the budgets, or do not share the tiercache with other users."
            )

    def get_blocks(
        self,
        keys: Sequence[Any],
        device: torch.device | str | None = None,
        *,
        out: Sequence[torch.Tensor] | None = None,
        background: bool = False,
        ranges: Sequence[Sequence[tuple[int, int]] | None] | None = None,
    ) -> list[torch.Tensor]:
        """Fetch entries (batched); a missing entry raises :class:`KVCapacityError`.  Thread-safe (the
        layer-ahead reads of exact decode call it from a reader thread).

        ``out``: one tensor per key (the entry's dtype and number of elements, any shape and strides,
        e.g. slices of a larger buffer, all on one device, which is the target): the values are written
        into them and ``out`` is returned as a list.  With a tiercache whose ``get_many`` takes a list
        ``out`` (contract C5) the tiers write each value straight into its tensor; an older tiercache
        refuses a list ``out`` with ``TypeError`` before touching anything, and the values are then
        fetched into one packed buffer and copied over (detected on the first call).

        ``background``: a read on behalf of the store's user from another thread (a read ahead): a
        pending write-behind failure is left for the user's next call instead of being raised here.

        ``ranges`` (needs ``out``): one item per key, ``None`` (the whole value) or sorted, non-overlapping
        ``(start, stop)`` byte offsets into the value (C order); for such an item ``out[i]`` must be contiguous
        and only those bytes of it are written, the others left as they were (``tiercache.Cache.get_many``'s
        ranged reads: a disk tier reads just the sectors covering them).  Entries still in the write-behind
        queue copy just the ranges.  With a tiercache whose ``get_many`` takes no ``ranges``
        (:attr:`ranged_reads` ``False``) the values are read whole: the ranges hold the same bytes, the rest of
        ``out[i]`` is overwritten with the value's (correct, only no bytes are saved).  Counted
        (``bytes_fetched``) as the bytes the ranges ask for.
        """
        self._check_open()
        if out is not None and len(out) != len(keys):
            raise ValueError(f"{len(out)} out tensors for {len(keys)} keys")
        if ranges is not None:
            if out is None:
                raise ValueError("get_blocks(ranges=...) needs out= (one tensor per key)")
            if len(ranges) != len(keys):
                raise ValueError(f"{len(ranges)} ranges items for {len(keys)} keys")
            for i, item in enumerate(ranges):
                if item is not None and not out[i].is_contiguous():
                    raise ValueError(f"get_blocks: out[{i}] must be contiguous for a ranged read")
            if all(item is None for item in ranges):
                ranges = None
        if not keys:
            return []
        if not background:
            self._raise_write_error()
        queued = self._queued(keys)
        if queued:
            return self._get_with_queue(list(keys), device, out, queued, background, ranges)
        start = time.perf_counter()
        try:
            keys = keys if type(keys) is list else list(keys)
            if out is None:
                tensors = self.cache.get_many(keys, device=device)
            elif ranges is not None and self.ranged_reads:
                tensors = self.cache.get_many(keys, out=list(out), ranges=ranges)
            else:
                tensors = self._get_into(keys, list(out))
        except KeyError as exc:
            if self._closing:  # close() from another thread deleted it: say so, not "evicted or corrupt"
                raise RuntimeError("this TieredKVCache has been closed") from exc
            raise KVCapacityError(
                f"KV block {exc.args[0]!r} is no longer in the tiercache (evicted or corrupt: the tiercache logs "
                f"a failed checksum); attention over the whole context is impossible "
                f"({self._budget_text()}, this cache holds {_fmt(self._held_bytes)})"
            ) from exc
        elapsed, nbytes = time.perf_counter() - start, _read_bytes(tensors, ranges if self.ranged_reads else None)
        with self._lock:  # background staging reads count here too
            self.counters.fetch_seconds += elapsed
            self.counters.blocks_fetched += len(tensors)
            self.counters.bytes_fetched += nbytes
        return tensors

    def _get_with_queue(self, keys: list[Any], device: Any, out: Sequence[torch.Tensor] | None,
                        queued: dict[Any, torch.Tensor], background: bool = False,
                        ranges: Sequence[Sequence[tuple[int, int]] | None] | None = None) -> list[torch.Tensor]:
        """``get_blocks`` when some keys are still in the write-behind queue (their copies are the values; with
        ``ranges``, just the ranges are copied from them)."""
        rest = [i for i, key in enumerate(keys) if key not in queued]
        if out is None:
            target = torch.device(device) if device is not None else torch.device("cpu")
            result: list[Any] = [None] * len(keys)
            if rest:
                for i, tensor in zip(rest, self.get_blocks([keys[i] for i in rest], device=device,
                                                           background=background)):
                    result[i] = tensor
            for i, key in enumerate(keys):
                if key in queued:
                    result[i] = queued[key].to(target, copy=True)
        else:
            result = list(out)
            if rest:
                self.get_blocks([keys[i] for i in rest], out=[result[i] for i in rest], background=background,
                                ranges=None if ranges is None else [ranges[i] for i in rest])
            for i, key in enumerate(keys):
                if key in queued:
                    src = queued[key]
                    if src.numel() != result[i].numel() or src.dtype != result[i].dtype:
                        raise ValueError(f"out tensor for {key!r} is {result[i].dtype} x {result[i].numel()}, "
                                         f"the entry {src.dtype} x {src.numel()}")
                    item = None if ranges is None else ranges[i]
                    if item and item[-1][1] > src.nbytes:  # (as the tiercache refuses it for a stored value)
                        raise ValueError(f"ranges[{i}] (key {key!r}) ends at byte {item[-1][1]}, past the value's "
                                         f"{src.nbytes} bytes")
                    if item is None:
                        result[i].copy_(src.view(result[i].shape))
                    else:
                        copy_ranges(result[i], src, item)
        with self._lock:
            self.counters.queue_hits += len(queued)
            self.counters.blocks_fetched += len(queued)
            self.counters.bytes_fetched += sum(t.nbytes if ranges is None or ranges[i] is None
                                               else sum(b - a for a, b in ranges[i])
                                               for i, t in ((i, queued[k]) for i, k in enumerate(keys) if k in queued))
        return result

    def _get_into(self, keys: list[Any], out: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.out_lists is not False:
            try:
                self.cache.get_many(keys, out=out)  # (the out tensors' device is the target)
            except TypeError:
                if self.out_lists is not None:
                    raise
                self.out_lists = False  # a tiercache before C5: only a packed ``out`` tensor
            else:
                self.out_lists = True
                return out
        tensors = self.cache.get_many(keys, device=out[0].device)
        sources = []
        for key, src, dst in zip(keys, tensors, out):
            if src.shape != dst.shape:
                if src.numel() != dst.numel():
                    raise ValueError(f"out tensor for {key!r} holds {dst.numel()} elements, the entry {src.numel()}")
                src = src.view(dst.shape)
            if src.dtype != dst.dtype:
                raise ValueError(f"out tensor for {key!r} is {dst.dtype}, the entry {src.dtype}")
            sources.append(src)
        torch._foreach_copy_(out, sources)
        return out

    def in_memory(self, keys: Sequence[Any]) -> bool:
        """Whether every one of ``keys`` is held where a read is a memory copy (a memory tier or the
        write-behind queue), as of now: placement may change right after."""
        memory = self._memory_tiers
        return all([tier in memory for tier in self.tiers_of(keys)])

    def tiers_of(self, keys: Sequence[Any]) -> list[str | None]:
        """Name of the tier holding each key (``None`` when absent), e.g. to count reuse before a fetch."""
        queued = self._queued(keys)
        tiers = self.cache.tiers_of(keys)  # one lock round trip for all of them
        return [WRITE_QUEUE if key in queued else tier for key, tier in zip(keys, tiers)]

    @property
    def fastest_tier(self) -> str:
        """Name of the tiercache's fastest tier."""
        return self.cache.tiers[0].name

    def fastest_tier_entries(self, nbytes: int) -> int:
        """How many entries of ``nbytes`` bytes the fastest tier holds at most (its capacity over
        ``Cache.charge``)."""
        return int(self.cache.tiers[0].capacity // max(1, self.cache.charge(nbytes)))

    def update_scores(self, scores: dict[Any, float]) -> int:
        """Set tiercache scores (one batched call); absent keys are skipped.  Returns how many applied."""
        if not scores:
            return 0
        self._check_open()
        self._raise_write_error()
        if self._pending:
            with self._wcond:
                for key, score in scores.items():
                    slot = self._pending.get(key)
                    if slot is not None:
                        slot[1] = score  # written with the block (or re-applied right after it)
        return self.cache.update_scores(scores)

    def _account(self, key: Any, nbytes: int) -> None:
        self._unaccount(key)
        self._live[key] = nbytes
        self._held_bytes += nbytes
        self._held_charge += self.cache.charge(nbytes)

    def _unaccount(self, key: Any) -> None:
        nbytes = self._live.pop(key, None)
        if nbytes is not None:
            self._held_bytes -= nbytes
            self._held_charge -= self.cache.charge(nbytes)

    def delete_blocks(self, keys: Iterable[Any]) -> None:
        """Remove entries (missing ones are ignored: they are gone either way).  Their writes still queued
        are dropped, and a write-behind batch being written is waited for first (deletes are rare: crop,
        reset, batch selection, close); a write-behind failure is not raised here (a failing writer must not
        stop a reset: it is raised by the next other call)."""
        self._check_open()
        keys = list(keys)
        if self._writer is not None:
            self._unqueue(keys)
        self.wait_prefetches()
        for key in keys:
            self._unaccount(key)
            self.cache.delete(key)  # False for an entry already gone: nothing to do
            self.counters.blocks_deleted += 1

    def _unqueue(self, keys: list[Any]) -> None:
        """Drop the queued writes of ``keys`` (failed ones too), then wait for the batches submitted so far: one
        being written may hold some of ``keys`` (its put lands before the caller deletes them)."""
        with self._wcond:
            for key in keys:
                slot = self._pending.pop(key, None)
                if slot is not None:
                    self._pending_bytes -= slot[0].nbytes
            self._wcond.notify_all()
        self._writer.submit(lambda: None).result()

    def delete_all(self) -> None:
        """Delete every entry this store holds, those no KV layer tracks included (the entries of a write that
        failed part-way, which :meth:`put_blocks` could not roll back), and forget a write-behind failure not
        yet raised: its blocks are gone (``TieredKVCache.reset`` ends with this)."""
        self.delete_blocks(list(self._live))
        with self._wcond:
            self._pending.clear()
            self._pending_bytes = 0
            self._failed = []
            self._write_error = None

    def prefetch(self, keys: Sequence[Any]) -> concurrent.futures.Future | None:
        """Ask the tiercache to stage ``keys`` toward its fastest tier, without waiting; returns its future (its
        result: how many of ``keys`` are in the fastest tier when it completes), ``None`` when nothing was asked.
        Deletes and close wait for it (:meth:`wait_prefetches`)."""
        if self._closed or not keys:
            return None
        future = self.cache.prefetch(list(keys))
        self.counters.prefetches += 1
        with self._lock:
            self._futures = [f for f in self._futures if not f.done()]
            self._futures.append(future)
        future.add_done_callback(self._prefetch_done)
        return future

    def _prefetch_done(self, future: concurrent.futures.Future) -> None:
        if not future.cancelled() and future.exception() is not None:
            self.counters.prefetch_errors += 1

    def wait_prefetches(self) -> None:
        """Block until every prefetch issued so far has finished (before deletes and on close)."""
        with self._lock:
            futures, self._futures = self._futures, []
        for future in futures:
            try:
                future.result()
            except Exception:  # noqa: BLE001 - counted in prefetch_errors by the callback
                pass

    def stats(self) -> dict:
        """``{"kv": counters + held bytes/entries, "tiercache": tiercache.Cache.stats()}``."""
        kv = asdict(self.counters)
        kv["queued_bytes"] = self._pending_bytes
        kv["write_behind_limit_bytes"] = self._write_limit if self._writer is not None else 0
        kv["held_bytes"] = self._held_bytes
        kv["live_entries"] = len(self._live)
        return {"kv": kv, "tiercache": self.cache.stats()}

    def reset_counters(self) -> None:
        self.counters = KVCounters()

    def close(self) -> None:
        """Delete this store's entries; close the tiercache and remove its temporary directory if
        this store created them.  Idempotent."""
        if self._closed:
            return
        self._closing = True
        self.wait_prefetches()
        writer, self._writer = self._writer, None
        if writer is not None:  # queued blocks are about to be deleted: drop them, let a running batch finish
            with self._wcond:
                self._pending.clear()
                self._pending_bytes = 0
                self._failed = []
                self._write_error = None
                self._wcond.notify_all()
            writer.shutdown(wait=True)
        # Delete first even when we own the tiercache: its close() would otherwise persist every
        # live entry to the disk tier, and KV blocks of a finished cache are never read again.
        self.delete_blocks(list(self._live))
        self._release_owners()  # after the deletes: a failure before leaves the blocks reclaimable
        self._closed = True
        self._finalizer()

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this TieredKVCache has been closed")

