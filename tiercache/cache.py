"""The facade users touch: :class:`Cache` composes tiers (mechanism) with a policy (placement).

Concurrency design.  One index lock guards the bookkeeping (which key lives in which slot, queues,
counters).  Every byte copy and file operation runs outside it, in two phases: *prepare* under the lock
(reserve a slot, pin the source, mark a mover) and *complete* under the lock (publish the new location,
release the old slot) or roll back.  A slot that a reader or mover has pinned is released only when its
last pin goes, so a concurrent delete or overwrite never frees bytes still being copied.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import math
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Hashable, Iterable, Iterator, Sequence

import torch

from .config import CacheConfig
from .errors import CacheClosedError, CacheLockedError, CorruptEntryError, TierCacheError, TierIOError
from .index import Entry, RankedQueue
from .keys import check_key, decode_key, encode_key
from .policies import EntryInfo, Policy, make_policy
from .sizes import format_size, parse_size
from .stats import CacheCounters, TierCounters
from .tiers.base import EntryHeader, Slot, Tier
from .tiers.disk import DiskTier, check_capacity as check_disk_capacity
from .tiers.memory import gpu_tier, host_tier
from .batched import BatchedReads
from .transfer import CopyEngine

log = logging.getLogger(__name__)

_Release = tuple[int, Slot]


class Cache(BatchedReads):
    """A tiered tensor cache: ``gpu`` (HBM), ``host`` (DRAM, pinned with CUDA) and ``disk`` (zarr v3).

    ``Cache(host="256MiB", disk="4GiB", path="/data/tc")`` or ``Cache(CacheConfig(...))`` or
    ``Cache(tiers=[...])`` with ready :class:`tiercache.tiers.Tier` objects, fastest first.

    Contract:
    - ``put`` copies the tensor in (the caller keeps ownership of its tensor); ``get`` returns a fresh
      tensor owned by the caller with the same dtype, shape and values (on CPU unless ``device`` is given).
    - A put lands in the fastest tier that can hold the value; a full tier demotes the policy's victims one
      tier down; the last tier drops them (counted as evictions, reported to ``on_evict``).
    - After ``close()`` every live entry that fits is durable in the disk tier; reopening the same ``path``
      sees them bit-exact.  After a crash each entry is either complete and verified or absent.  A damaged
      entry is reported missing (``KeyError``) and counted in ``stats()["corruptions"]``.
    - All methods are thread-safe.  Only one open Cache may use a ``path`` at a time.
    """

    def __init__(
        self,
        config: CacheConfig | None = None,
        *,
        tiers: Sequence[Tier] | None = None,
        **options: Any,
    ) -> None:
        if config is not None and options:
            raise TypeError("pass either a CacheConfig or keyword options, not both")
        if config is not None and not isinstance(config, CacheConfig):
            raise TypeError(f"config must be a CacheConfig, got {type(config).__name__}")
        self.config = config if config is not None else CacheConfig(**options)
        cfg = self.config
        self._policy: Policy = make_policy(cfg.policy)
        if not isinstance(cfg.io_threads, int) or cfg.io_threads < 1:
            raise ValueError(f"io_threads must be a positive int, got {cfg.io_threads!r}")
        self._lock = threading.RLock()
        self._lock_file: int | None = None
        self._closed = False
        self._index: dict[Hashable, Entry] = {}
        self._pins: dict[tuple[int, Any], int] = {}
        self._deferred: dict[tuple[int, Any], Slot] = {}
        self._clock = 0
        self._seq = 0
        self._executor: ThreadPoolExecutor | None = None
        self._closing = False  # close() has begun: no new operations start
        self._active = 0  # public operations in flight; close() waits for them
        self._idle = threading.Condition(self._lock)
        self._engines: dict[torch.device, CopyEngine] = {}  # batched copiers, one per target device
        self._evicted: list[tuple[Hashable, str]] = []  # drops not yet reported to on_evict
        self._later: list[_Release] = []  # releases collected under the lock, finished after it
        self._tiers: list[Tier] = list(tiers) if tiers is not None else self._build_tiers(cfg)
        if not self._tiers:
            raise ValueError("every tier is disabled: give at least one of gpu, host or disk a capacity")
        for i, tier in enumerate(self._tiers):
            if not isinstance(tier, Tier):
                raise TypeError(f"tiers[{i}] does not implement the Tier protocol: {tier!r}")
        names = [t.name for t in self._tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"tier names must be unique, got {names}")
        self._queues = [RankedQueue(i) for i in range(len(self._tiers))]
        self._counters = CacheCounters({t.name: TierCounters() for t in self._tiers})
        try:
            self._recover()
        except BaseException:
            self._release_path_lock()
            raise

    # -- construction ---------------------------------------------------------------------------------
    def _build_tiers(self, cfg: CacheConfig) -> list[Tier]:
        gpu = parse_size(cfg.gpu, "gpu capacity")
        host = parse_size(cfg.host, "host capacity")
        disk = parse_size(cfg.disk, "disk capacity")
        if disk and cfg.path is None:
            raise ValueError("a disk tier needs a path: Cache(disk=..., path='/some/dir')")
        if cfg.path is not None and not disk:
            raise ValueError("path was given but the disk tier is disabled: also pass disk='4GiB' (for example)")
        tiers: list[Tier] = []
        if gpu:
            tiers.append(gpu_tier(gpu, cfg.gpu_device))
        if host:
            tiers.append(host_tier(host))
        if disk:
            assert cfg.path is not None
            check_disk_capacity(disk)  # before anything is created at the path
            self._acquire_path_lock(Path(cfg.path))
            try:
                tiers.append(DiskTier(
                    cfg.path, disk, compression=cfg.compression, fingerprint=cfg.fingerprint,
                    direct_io=getattr(cfg, "direct_io", False), io_threads=cfg.io_threads,
                ))
            except BaseException:
                self._release_path_lock(refused=True)
                raise
        elif cfg.compression is not None:
            raise ValueError("compression applies to the disk tier, which is disabled")
        return tiers

    def _acquire_path_lock(self, path: Path) -> None:
        """Lock ``path`` for this Cache.  The folder is checked first (``prepare_store_dir``: a file, a
        non-empty non-store folder or a foreign zarr group is refused before anything is created), and a
        refused open removes the ``.lock`` file and folder it created (``_release_path_lock(refused=True)``)."""
        from .tiers.disk import prepare_store_dir

        _, created_dir = prepare_store_dir(path)
        lock_path = path / ".lock"
        created_lock = False
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            created_lock = True
        except FileExistsError:
            fd = os.open(lock_path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise CacheLockedError(f"{path} is in use by another open tiercache.Cache") from None
            raise
        self._lock_file = fd
        self._lock_created = (lock_path, path if created_dir else None) if created_lock else None

    def _release_path_lock(self, refused: bool = False) -> None:
        """Drop the path lock.  ``refused``: the open failed, so remove the ``.lock`` file (and the folder)
        this open created, leaving no trace in the user's folder."""
        if self._lock_file is not None:
            created = getattr(self, "_lock_created", None)
            if refused and created is not None:
                lock_path, created_dir = created
                try:
                    os.unlink(lock_path)  # while still held: nobody can have locked it meanwhile
                    if created_dir is not None:
                        created_dir.rmdir()
                except OSError:
                    pass
            os.close(self._lock_file)  # closing drops the flock
            self._lock_file = None

    def _recover(self) -> None:
        for tier_index, tier in enumerate(self._tiers):
            if not tier.persistent:
                continue
            for found in tier.recover():
                try:
                    key = decode_key(found.header.key)
                except ValueError as exc:  # a damaged header must cost one entry, not the whole store
                    log.warning("tiercache: dropping a %s entry with an unreadable key: %s", tier.name, exc)
                    self._counters.corruptions += 1
                    tier.discard(found.slot)
                    tier.free(found.slot)
                    continue
                self._seq = max(self._seq, found.header.seq)
                info = EntryInfo(key, found.header.nbytes, tier.name, 0, 0)
                previous = self._index.get(key)
                if previous is not None:  # two persistent tiers both hold it: keep the newer copy
                    older = previous if previous.header.seq < found.header.seq else None
                    if older is None:
                        tier.discard(found.slot)
                        tier.free(found.slot)
                        continue
                    self._tiers[older.tier].discard(older.slot)
                    self._tiers[older.tier].free(older.slot)
                    self._queues[older.tier].remove(older)
                    older.version += 1  # its queue item is stale now
                entry = Entry(key, found.header, tier_index, found.slot, info)
                self._index[key] = entry
                self._queues[tier_index].add(entry)
                self._rerank(entry)
            corrupt = getattr(tier, "corrupt_on_open", 0)
            self._counters.corruptions += corrupt
            # A store reopened with a smaller budget sheds its lowest-ranked entries.  Their slots are only
            # freed by _flush_finish_later below, so count what is already shed instead of re-reading used.
            excess = tier.used - tier.capacity
            while excess > 0:
                victims = self._queues[tier_index].pop_victims(self._index, excess)
                if not victims:
                    break
                for victim in victims:
                    excess -= victim.slot.charged
                    self._finish_later(self._drop_entry(victim, "capacity"))
        self._flush_finish_later()

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
            if not self._active:
                self._idle.notify_all()

    @contextmanager
    def _operation(self) -> Iterator[None]:
        """``_begin``/``_end`` as a context manager, for the operations that are not on the hot path."""
        self._begin()
        try:
            yield
        finally:
            self._end()

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _rerank(self, entry: Entry) -> None:
        entry.version += 1
        entry.info.tier = self._tiers[entry.tier].name
        self._queues[entry.tier].push(entry, self._policy.rank(entry.info))

    def _pin(self, tier: int, slot: Slot) -> None:
        token = (tier, slot.ref)
        self._pins[token] = self._pins.get(token, 0) + 1

    def _unpin(self, tier: int, slot: Slot) -> list[_Release]:
        token = (tier, slot.ref)
        count = self._pins[token] - 1
        if count:
            self._pins[token] = count
            return []
        del self._pins[token]
        deferred = self._deferred.pop(token, None)
        return [(tier, deferred)] if deferred is not None else []

    def _release(self, tier: int, slot: Slot) -> list[_Release]:
        """Give a slot back: now if nobody has it pinned, else when the last pin goes."""
        token = (tier, slot.ref)
        if self._pins.get(token):
            self._deferred[token] = slot
            return []
        return [(tier, slot)]

    def _unlink(self, entry: Entry) -> list[_Release]:
        """Remove ``entry`` from the index (it must be the current one for its key)."""
        del self._index[entry.key]
        self._queues[entry.tier].remove(entry)
        entry.version += 1
        return self._release(entry.tier, entry.slot)

    def _drop_entry(self, entry: Entry, reason: str) -> list[_Release]:
        self._counters.evictions += reason == "capacity"
        self._evicted.append((entry.key, reason))
        return self._unlink(entry)

    def _finish(self, releases: list[_Release]) -> None:
        """Outside the lock: discard released slots' contents, then return them to their tiers."""
        done: list[_Release] = []
        for tier_index, slot in releases:
            try:
                self._tiers[tier_index].discard(slot)
            except OSError as exc:  # the slot is reused later anyway: a rewrite replaces the file
                log.warning("tiercache: %s", exc)
                with self._lock:
                    self._counters.errors["discard"] += 1
            done.append((tier_index, slot))
        if done:
            with self._lock:
                for tier_index, slot in done:
                    self._tiers[tier_index].free(slot)
        self._notify_evictions()

    def _notify_evictions(self) -> None:
        if not self._evicted:
            return
        with self._lock:
            events, self._evicted = self._evicted, []
        callback = self.config.on_evict
        if callback is not None:
            for key, reason in events:
                try:
                    callback(key, reason)
                except Exception:  # a user callback must not break cache invariants
                    log.exception("tiercache: on_evict callback failed")

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

    # -- making room ----------------------------------------------------------------------------------
    def _reserve(self, tier_index: int, nbytes: int, *, allow_drop: bool = True) -> Slot | None:
        """A slot of ``nbytes`` in ``tier_index``, demoting that tier's victims as needed; ``None`` when the
        tier cannot make room (everything there is being moved, or the value is too large for it).
        With ``allow_drop=False`` no entry may be dropped from the last tier to make room (promotions use
        this: a read never costs another entry its data); ``None`` then also when only a drop would help.
        Raises ``TierIOError`` if a demotion fails on I/O (nothing is lost then)."""
        tier = self._tiers[tier_index]
        if nbytes > tier.max_nbytes:
            return None
        last = tier_index == len(self._tiers) - 1
        while True:
            with self._lock:
                self._check_open()
                slot = tier.allocate(nbytes)
                if slot is not None:
                    return slot
                if last and not allow_drop:
                    return None
                need = nbytes - (tier.capacity - tier.used)
                victims = self._queues[tier_index].pop_victims(self._index, max(need, 1))
                if not victims:
                    return None
                for victim in victims:
                    victim.moving = True
                    self._pin(tier_index, victim.slot)
            error: BaseException | None = None
            stuck = False
            for position, victim in enumerate(victims):
                try:
                    stuck = not self._demote(victim, allow_drop)
                except BaseException as exc:
                    error = exc
                if error is not None or stuck:
                    with self._lock:  # hand the untouched victims back
                        for rest in victims[position + 1 :]:
                            rest.moving = False
                            self._rerank(rest)
                            self._finish_later(self._unpin(rest.tier, rest.slot))
                    break
            self._flush_finish_later()
            if error is not None:
                raise error
            if stuck:
                return None

    def _finish_later(self, releases: list[_Release]) -> None:
        self._later.extend(releases)

    def _flush_finish_later(self) -> None:
        with self._lock:
            releases, self._later = self._later, []
        self._finish(releases)

    def _demote(self, victim: Entry, allow_drop: bool = True) -> bool:
        """Move a pinned, ``moving`` victim one tier down, or drop it from the last tier.  Without
        ``allow_drop`` a victim that could only be dropped is handed back instead; returns False then."""
        src = victim.tier
        dst = src + 1
        slot = self._reserve(dst, victim.header.nbytes, allow_drop=allow_drop) if dst < len(self._tiers) else None
        if slot is None:
            with self._lock:
                victim.moving = False
                releases = self._unpin(src, victim.slot)
                if self._index.get(victim.key) is victim:
                    if not allow_drop:
                        self._rerank(victim)
                        self._finish_later(releases)
                        return False
                    releases += self._drop_entry(victim, "capacity")
            self._finish(releases)
            return True
        self._move(victim, src, dst, slot, data=None)
        return True

    def _move(self, entry: Entry, src: int, dst: int, slot: Slot, data: torch.Tensor | None) -> bool:
        """Copy a pinned, ``moving`` entry from ``src`` to the reserved ``slot`` in ``dst`` and publish it.
        Returns False (releasing ``slot``) if the entry was deleted or replaced meanwhile.  On I/O failure
        the entry stays where it was and the error propagates."""
        try:
            if data is None:
                data = self._timed_read(src, entry.slot, entry.header)
            self._timed_write(dst, slot, data, entry.header)
        except BaseException as exc:
            with self._lock:
                self._tiers[dst].free(slot)
                entry.moving = False
                releases = self._unpin(src, entry.slot)
                if isinstance(exc, CorruptEntryError) and self._index.get(entry.key) is entry:
                    self._counters.corruptions += 1
                    releases += self._drop_entry(entry, "corrupt")
                elif self._index.get(entry.key) is entry:
                    self._rerank(entry)
                if isinstance(exc, OSError):
                    self._counters.errors["io"] += 1
            self._finish(releases)
            if isinstance(exc, CorruptEntryError):
                return False
            raise
        with self._lock:
            entry.moving = False
            releases = self._unpin(src, entry.slot)
            if self._index.get(entry.key) is not entry:
                releases.append((dst, slot))
                moved = False
            else:
                releases += self._release(src, entry.slot)
                self._queues[src].remove(entry)
                self._queues[dst].add(entry)
                entry.tier, entry.slot = dst, slot
                self._rerank(entry)
                self._counters.bytes_moved[f"{self._tiers[src].name}->{self._tiers[dst].name}"] += slot.nbytes
                moved = True
        self._finish(releases)
        return moved

    # -- public API -----------------------------------------------------------------------------------
    def _put_impl(self, key: Hashable, value: torch.Tensor, *, score: float | None = None) -> None:
        key_bytes = encode_key(key)
        data, dtype_name, shape = _tensor_bytes(value)
        nbytes = data.numel()
        if score is not None:
            _check_score(score)
        with self._lock:
            self._check_open()
            largest = max(t.max_nbytes for t in self._tiers)
        if nbytes > largest:
            raise ValueError(
                f"value of {format_size(nbytes)} is larger than every tier "
                f"(the largest slot holds {format_size(max(largest, 0))})"
            )
        for tier_index, tier in enumerate(self._tiers):
            slot = self._reserve(tier_index, nbytes)
            if slot is not None:
                break
        else:
            raise TierCacheError(f"no tier could make room for {format_size(nbytes)}: every candidate is being moved")
        with self._lock:
            self._seq += 1
            header = EntryHeader(key_bytes, dtype_name, shape, nbytes, self._seq)
        try:
            self._timed_write(tier_index, slot, data, header)
        except BaseException:
            with self._lock:
                tier.free(slot)
                self._counters.errors["put_io"] += 1
            raise
        with self._lock:
            old = self._index.get(key)
            if old is not None and old.header.seq > header.seq:  # a later put of the key already landed
                releases = [(tier_index, slot)]
            else:
                now = self._tick()
                previous_score = old.info.score if old is not None else 0.0
                info = EntryInfo(key, nbytes, tier.name, now, now, 0, float(score) if score is not None else previous_score)
                releases = self._unlink(old) if old is not None else []
                entry = Entry(key, header, tier_index, slot, info)
                self._index[key] = entry
                self._queues[tier_index].add(entry)
                self._rerank(entry)
                self._counters.puts += 1
        self._finish(releases)

    def _get_impl(self, key: Hashable, device: torch.device | str | None = None) -> torch.Tensor:
        check_key(key)
        target = torch.device(device) if device is not None else torch.device("cpu")
        with self._lock:
            self._check_open()
            self._counters.gets += 1
            entry = self._index.get(key)
            if entry is None:
                self._counters.misses += 1
                for counters in self._counters.tiers.values():
                    counters.misses += 1
                raise KeyError(key)
            src, slot, header = entry.tier, entry.slot, entry.header
            for tier in self._tiers[:src]:
                self._counters.tiers[tier.name].misses += 1
            self._counters.tiers[self._tiers[src].name].hits += 1
            entry.info.hits += 1
            entry.info.last_access = self._tick()
            self._rerank(entry)
            self._pin(src, slot)
        releases: list[_Release] = []
        tier = self._tiers[src]
        try:
            start = time.perf_counter()
            raw = tier.read(slot, header)
            elapsed = time.perf_counter() - start
            result = _restore(raw, header, target, aliasing=not tier.persistent)
        except CorruptEntryError as exc:
            log.warning("tiercache: entry %r is damaged and was dropped: %s", key, exc)
            with self._lock:
                releases = self._unpin(src, slot)
                if self._index.get(key) is entry:
                    self._counters.corruptions += 1
                    releases += self._drop_entry(entry, "corrupt")
            self._finish(releases)
            raise KeyError(key) from None
        except BaseException:
            with self._lock:
                releases = self._unpin(src, slot)
            self._finish(releases)
            raise
        if src > 0 and self._policy.promote(entry.info, tier.name, self._tiers[0].name):
            self._promote(entry, src, raw)  # raw stays valid: its slot is still pinned by us
        with self._lock:
            counters = self._counters.tiers[tier.name]
            counters.bytes_read += slot.nbytes
            counters.read_seconds += elapsed
            releases = self._unpin(src, slot)
        if releases or self._evicted:
            self._finish(releases)
        return result

    def _promote(self, entry: Entry, src: int, data: torch.Tensor | None, targets: Iterable[int] | None = None) -> bool:
        """Best effort: move ``entry`` from ``src`` to the first of ``targets`` (default: every faster tier,
        fastest first) that can make room for it without dropping anything."""
        with self._lock:
            if self._closed or self._index.get(entry.key) is not entry or entry.moving or entry.tier != src:
                return False
            entry.moving = True
            self._pin(src, entry.slot)
        slot: Slot | None = None
        try:
            for dst in (range(src) if targets is None else targets):
                slot = self._reserve(dst, entry.header.nbytes, allow_drop=False)
                if slot is not None:
                    break
        except (OSError, TierCacheError) as exc:
            log.warning("tiercache: making room to promote %r failed: %s", entry.key, exc)
            with self._lock:
                self._counters.errors["promote"] += 1
            slot = None
        if slot is None:
            with self._lock:
                entry.moving = False
                releases = self._unpin(src, entry.slot)
                if self._index.get(entry.key) is entry:
                    self._rerank(entry)
            self._finish(releases)
            return False
        try:
            return self._move(entry, src, dst, slot, data)
        except (OSError, TierCacheError) as exc:  # _move has put the entry back where it was
            log.warning("tiercache: promoting %r failed: %s", entry.key, exc)
            with self._lock:
                self._counters.errors["promote"] += 1
            return False

    # -- public operations: each runs inside _operation so close() can wait for it -------------------
    def put(self, key: Hashable, value: torch.Tensor, *, score: float | None = None) -> None:
        """Store a copy of ``value`` under ``key``, replacing any previous value.

        Raises ``TypeError`` for a non-tensor value or unsupported key, ``ValueError`` when the value is
        larger than every tier, ``TierIOError`` when the storage fails (e.g. the disk is full; the previous
        value, if any, is kept), ``TierCacheError`` when no tier can make room right now."""
        self._begin()
        try:
            self._put_impl(key, value, score=score)
        finally:
            self._end()

    def get(self, key: Hashable, device: torch.device | str | None = None) -> torch.Tensor:
        """A fresh copy of the value stored under ``key`` (on ``device``, CPU by default).

        Raises ``KeyError`` when the key is absent, was evicted, or its stored bytes failed verification."""
        self._begin()
        try:
            return self._get_impl(key, device)
        finally:
            self._end()

    def get_many(
        self,
        keys: Iterable[Hashable],
        device: torch.device | str | None = None,
        *,
        out: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """The values of ``keys``, in key order, moved as one batched operation.

        All or nothing: the first absent key raises ``KeyError`` before anything is copied (counted as one
        get and one miss); a value whose stored bytes fail verification is dropped (as ``get`` does) and
        raises ``KeyError`` for its key.  The values are packed into one byte buffer in key order, each at a
        multiple of 256 bytes (``tiercache.transfer.packed_layout([nbytes, ...])`` gives the offsets and the
        total): ``out`` when given (any contiguous tensor of at least that many bytes starting at a 16-byte
        aligned address; its device is the target, and ``device``, if also given, must match; else
        ``ValueError``), otherwise a fresh buffer on ``device`` (CPU by default).  Each result is a view of
        that buffer with the stored dtype and shape, so the results share one allocation (``out``'s when
        given).

        Host- and GPU-tier values are copied by one gather (on CUDA one kernel launch reading pinned host
        memory by address); disk values are read and crc-checked in pinned staging memory, then gathered
        with them.  On CUDA the copy runs on the cache's copy-engine stream after the caller's current
        stream; this call returns once the copy is complete.  Every source slot stays pinned until then, so
        a concurrent delete or demotion never frees bytes being read.  Hits, misses and promotions are
        counted and applied as ``get`` does.  Thread-safe."""
        with self._operation():
            return self._get_many_impl(keys, device, out=out)


    def delete(self, key: Hashable) -> bool:
        with self._operation():
            return self._delete_impl(key)

    def update_scores(self, scores: dict[Hashable, float]) -> int:
        with self._operation():
            return self._update_scores_impl(scores)

    def put_many(self, items: Iterable[tuple[Hashable, torch.Tensor]], *, scores: Iterable[float] | None = None) -> None:
        """``put`` for each ``(key, tensor)``; stops at the first error (earlier items stay stored)."""
        items = list(items)
        score_list = list(scores) if scores is not None else [None] * len(items)
        if len(score_list) != len(items):
            raise ValueError(f"{len(score_list)} scores for {len(items)} items")
        for (key, value), score in zip(items, score_list):
            self.put(key, value, score=score)

    def _delete_impl(self, key: Hashable) -> bool:
        check_key(key)
        with self._lock:
            self._check_open()
            entry = self._index.get(key)
            if entry is None:
                return False
            releases = self._unlink(entry)
        self._finish(releases)
        return True

    def _update_scores_impl(self, scores: dict[Hashable, float]) -> int:
        checked = {key: _check_score(score) for key, score in scores.items()}  # all valid, or none applied
        updated = 0
        with self._lock:
            self._check_open()
            for key, score in checked.items():
                entry = self._index.get(key)
                if entry is None:
                    continue
                entry.info.score = score
                self._rerank(entry)
                updated += 1
        return updated

    def prefetch(self, keys: Iterable[Hashable], device: torch.device | str | None = None) -> Future[int]:
        """Stage ``keys`` in the background into the fastest tier, or with ``device`` into the fastest tier
        that lives on that device (``"cuda"``: the GPU tier, ``"cpu"``: the host tier; ``ValueError`` when
        no tier does).  The future's result is how many of them are in that tier or a faster one when it
        completes; absent keys are skipped.  Staging never drops another entry to make room."""
        keys = [key for key in keys]
        for key in keys:
            check_key(key)
        target = 0 if device is None else self._tier_on(torch.device(device))
        with self._lock:
            self._check_open()
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.config.io_threads, thread_name_prefix="tiercache-io")
            return self._executor.submit(self._stage, keys, target)

    def _tier_on(self, device: torch.device) -> int:
        for index, tier in enumerate(self._tiers):
            here = tier.device
            if here.type == device.type and (device.index is None or here.index in (None, device.index)):
                return index
        raise ValueError(f"no tier of this cache lives on {device} (tiers: {[t.name for t in self._tiers]})")

    def _stage(self, keys: list[Hashable], target: int = 0) -> int:
        for key in keys:
            with self._lock:
                if self._closing or self._closed:
                    break
                entry = self._index.get(key)
                if entry is None:
                    continue
                # A prefetch announces an access: without this touch a staged entry keeps its old rank and is
                # the first victim of the next one staged (under LRU, a batch would evict itself).
                entry.info.last_access = self._tick()
                self._rerank(entry)
                src = entry.tier
            if src > target:
                self._promote(entry, src, None, [target])
        with self._lock:  # "resident when it completes", as documented: later stagings may have demoted some
            return sum(1 for key in keys if (e := self._index.get(key)) is not None and e.tier <= target)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._index

    def __len__(self) -> int:
        with self._lock:
            return len(self._index)

    def keys(self) -> list[Hashable]:
        """A snapshot of the stored keys."""
        with self._lock:
            return list(self._index)

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self.keys())

    def tier_of(self, key: Hashable) -> str | None:
        """Name of the tier currently holding ``key`` (``None`` if absent)."""
        with self._lock:
            entry = self._index.get(key)
            return self._tiers[entry.tier].name if entry is not None else None

    def charge(self, nbytes: int) -> int:
        """The most budget bytes any tier charges for a value of ``nbytes`` bytes (slot rounding, headers,
        checksums): an upper bound on what storing it consumes wherever it lands or is moved to.  Tiers
        without a ``charge`` method are assumed to charge the payload size."""
        return max(getattr(tier, "charge", lambda n: n)(nbytes) for tier in self._tiers)

    @property
    def tiers(self) -> list[Tier]:
        return list(self._tiers)

    def stats(self) -> dict[str, Any]:
        """A JSON-serialisable snapshot of usage and counters (see docs/api.md for each field)."""
        with self._lock:
            per_tier: dict[str, Any] = {}
            for index, tier in enumerate(self._tiers):
                row: dict[str, Any] = {
                    "capacity_bytes": tier.capacity,
                    "used_bytes": tier.used,
                    "entries": self._queues[index].live,
                    "payload_bytes": self._queues[index].payload,
                }
                row.update(self._counters.tiers[tier.name].export())
                per_tier[tier.name] = row
            c = self._counters
            return {
                "tiers": per_tier,
                "entries": len(self._index),
                "puts": c.puts,
                "gets": c.gets,
                "hits": c.gets - c.misses,
                "misses": c.misses,
                "evictions": c.evictions,
                "corruptions": c.corruptions,
                "bytes_moved": dict(c.bytes_moved),
                "errors": dict(c.errors),
                "policy": getattr(self._policy, "name", type(self._policy).__name__),
            }

    # -- lifecycle ------------------------------------------------------------------------------------
    def flush(self) -> None:
        """Make every live entry that fits durable on the disk tier now (it moves there); see ``close``.
        Entries that do not fit are dropped and reported to ``on_evict`` with reason ``"flush"``."""
        with self._operation():
            self._persist("flush")

    def _persist(self, reason: str) -> int:
        """Move upper-tier entries to the last (persistent) tier, highest rank first, dropping the
        lowest-ranked entries that do not fit.  Returns how many entries could not be kept."""
        last = len(self._tiers) - 1
        disk = self._tiers[last]
        if not disk.persistent:
            return 0
        with self._lock:
            ranked = sorted(self._index.values(), key=lambda e: self._policy.rank(e.info), reverse=True)
            budget, keep = disk.capacity, set()
            for entry in ranked:
                charge = getattr(disk, "charge", lambda n: n)(entry.header.nbytes)
                if charge <= budget and entry.header.nbytes <= disk.max_nbytes:
                    keep.add(id(entry))
                    budget -= charge
            releases: list[_Release] = []
            lost = 0
            for entry in ranked:
                if id(entry) not in keep and not entry.moving:
                    lost += entry.tier != last
                    releases += self._drop_entry(entry, reason)
            movers = [e for e in ranked if id(e) in keep and e.tier != last and not e.moving]
            for entry in movers:
                entry.moving = True
                self._pin(entry.tier, entry.slot)
        self._finish(releases)
        failures: list[BaseException] = []
        for entry in movers:
            with self._lock:
                slot = disk.allocate(entry.header.nbytes)
            if slot is None:  # cannot happen for a non-fragmenting disk tier; stay correct anyway
                slot = self._reserve(last, entry.header.nbytes)
            if slot is None:
                with self._lock:
                    entry.moving = False
                    self._finish_later(self._unpin(entry.tier, entry.slot))
                lost += 1
                continue
            try:
                self._move(entry, entry.tier, last, slot, None)
            except BaseException as exc:
                failures.append(exc)
        self._flush_finish_later()
        if lost:
            log.warning("tiercache: %d entries did not fit the disk tier and were not persisted", lost)
        if failures:
            raise TierIOError(f"persisting to the disk tier failed for {len(failures)} entries: {failures[0]}")
        return lost

    def close(self) -> None:
        """Wait for background work, persist what fits to the disk tier, release memory and the path
        lock.  Idempotent.  Raises ``TierIOError`` (after closing) if persisting failed."""
        with self._lock:
            if self._closed or self._closing:
                return
            self._closing = True
            while self._active:
                self._idle.wait()
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)
        try:
            self._persist("close")
        finally:
            with self._lock:
                self._closed = True
            for tier in self._tiers:
                tier.close()
            self._release_path_lock()

    def __enter__(self) -> "Cache":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_lock_file", None) is not None:
            self._release_path_lock()

    def __repr__(self) -> str:
        tiers = ", ".join(f"{t.name}={format_size(t.capacity)}" for t in self._tiers)
        return f"tiercache.Cache({tiers}, policy={getattr(self._policy, 'name', self._policy)!r}, entries={len(self)})"


def _check_score(score: object) -> float:
    if isinstance(score, bool) or not isinstance(score, (int, float)):
        raise TypeError(f"score must be a number, got {type(score).__name__}")
    if math.isnan(score):
        raise ValueError("score must not be NaN (it would break the eviction order)")
    return float(score)


def _tensor_bytes(value: object) -> tuple[torch.Tensor, str, tuple[int, ...]]:
    """The tensor's bytes as 1-D contiguous uint8 (no copy when already contiguous), its dtype, shape."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"values must be torch.Tensor, got {type(value).__name__}")
    if value.layout != torch.strided:
        raise TypeError(f"only dense (strided) tensors can be cached, got layout {value.layout}")
    if value.device.type == "meta":
        raise TypeError("meta tensors have no data to cache")
    if value.is_quantized:
        raise TypeError("quantized tensors are not supported; dequantize first")
    tensor = value.detach()
    if not tensor.is_contiguous():
        tensor = tensor.contiguous()
    flat = tensor.reshape(-1)
    data = flat.view(torch.uint8) if flat.dtype != torch.uint8 else flat
    return data, str(value.dtype).removeprefix("torch."), tuple(value.shape)


def _restore(raw: torch.Tensor, header: EntryHeader, device: torch.device, *, aliasing: bool) -> torch.Tensor:
    """A caller-owned tensor from a tier's bytes: copied when ``raw`` may alias tier storage."""
    dtype = getattr(torch, header.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise CorruptEntryError(f"unknown dtype {header.dtype!r} in entry header")
    if raw.device == device:
        out = raw.clone() if aliasing else raw
    else:
        out = raw.to(device)
    if dtype != torch.uint8:
        out = out.view(dtype)
    return out.reshape(header.shape)
