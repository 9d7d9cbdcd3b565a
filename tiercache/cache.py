"""The facade users touch: :class:`Cache` composes tiers (mechanism) with a policy (placement).

This module is the contract: construction and the public methods.  The concerns behind it each live in a
module named for them:

- :mod:`tiercache.state` — the index lock, pins and deferred releases, the operation bracket ``close``
  waits on (and the concurrency design);
- :mod:`tiercache.index` — entries and the per-tier eviction queues;
- :mod:`tiercache.batched` — the data paths (``put``, ``get``, ``get_many``, ``delete``);
- :mod:`tiercache.moves` — making room, demotion, promotion, prefetch staging;
- :mod:`tiercache.persistence` — recovery on open, persisting on ``flush``/``close``;
- :mod:`tiercache.values` — what a value may be and how it is turned back into a tensor.
"""

from __future__ import annotations

import atexit
import dataclasses
import errno
import fcntl
import operator
import os
import threading
import warnings
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Hashable, Iterable, Iterator, Mapping, Sequence

import torch

from .batched import DataPaths, _check_read_device, _normal_device, check_ranges
from .config import CacheConfig, check_config
from .errors import CacheClosedError, CacheLockedError
from .index import RankedQueue
from .overlap import check_disjoint
from .keys import check_key
from .persistence import Persistence
from .policies import make_policy
from .sizes import format_size, parse_size
from .stats import CacheCounters, TierCounters
from .tiers.base import Tier
from .tiers.disk import DiskTier, check_capacity as check_disk_capacity
from .tiers.memory import ArenaTier, gpu_tier, host_tier

_CPU = torch.device("cpu")
# The CacheConfig options that build the tiers (refused beside ready-made tiers=).
_TIER_OPTIONS = frozenset({"gpu", "host", "disk", "path", "compression", "fingerprint", "direct_io", "gpu_device",
                           "disk_sector_bytes"})
_STRIDED = torch.strided

class Cache(DataPaths, Persistence):
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
        if config is not None:
            check_config(config)  # again: a given CacheConfig's fields may have been changed since it was made
        cfg = config if config is not None else CacheConfig(**options)  # (checked as it is made)
        if tiers is not None:  # options that build tiers would be ignored: refuse them
            given = sorted(name for name in _TIER_OPTIONS if name in options) if config is None else sorted(
                f.name for f in dataclasses.fields(CacheConfig)
                if f.name in _TIER_OPTIONS and getattr(cfg, f.name) != f.default)
            if given:
                raise ValueError(f"{given} configure tiers, and tiers= gives them ready-made: leave them out "
                                 f"(beside tiers=, only policy, on_evict and io_threads apply)")
        self._init_state(cfg, make_policy(cfg.policy))
        self._lock_file: int | None = None
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
        self._limits = [tier.max_nbytes for tier in self._tiers]  # the largest slot per tier (fixed)
        self._largest_limit = max(self._limits)
        self._direct_tiers = [bool(getattr(tier, "addressable", False)) for tier in self._tiers]
        # Per tier: its reads take the entry itself where a header is asked for (arena tiers read only its
        # nbytes and shape; DiskTier takes it as a header source, see DiskTier._expected_prefix).
        self._entry_header_tiers = [isinstance(tier, ArenaTier) or type(tier) is DiskTier for tier in self._tiers]
        self._counters = CacheCounters({t.name: TierCounters() for t in self._tiers})
        self._tier_counters = [self._counters.tiers[t.name] for t in self._tiers]  # by tier index
        # The fastest tier when it is a CPU arena: small values are copied to and from it under the lock.
        self._direct_arena = self._tiers[0] if self._direct_tiers[0] else None
        # Per-tier facts the read paths consult on every call (the tiers are fixed from here on).
        self._tier_names = names
        self._address_tiers = [tier if direct else None for tier, direct in zip(self._tiers, self._direct_tiers)]
        self._batch_tiers = [hasattr(tier, "read_into") for tier in self._tiers]
        self._strided_tiers = [bool(getattr(tier, "reads_strided", False)) for tier in self._tiers]
        # Per tier: the tier when a single get reads it with read_fresh (a disk tier whose read_into is
        # DiskTier's own: a subclass that replaced it is read through it, by the batch path), else None.
        self._fresh_tiers: list[DiskTier | None] = [
            tier if isinstance(tier, DiskTier) and type(tier).read_into is DiskTier.read_into else None
            for tier in self._tiers]
        try:
            self._recover()
        except BaseException:
            self._release_path_lock()
            raise
        self._opened = True  # from here on, dropping the cache unclosed warns (ResourceWarning)
        _OPEN.add(self)

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
            tiers.append(_holding_entries(gpu_tier(gpu, cfg.gpu_device), gpu))
        if host:
            tiers.append(_holding_entries(host_tier(host), host))
        if disk:
            assert cfg.path is not None
            check_disk_capacity(disk)  # before anything is created at the path
            self._acquire_path_lock(Path(cfg.path))
            try:
                tiers.append(DiskTier(
                    cfg.path, disk, compression=cfg.compression, fingerprint=cfg.fingerprint,
                    direct_io=getattr(cfg, "direct_io", False), io_threads=cfg.io_threads,
                    sector_bytes=cfg.disk_sector_bytes,
                ))
            except BaseException:
                self._release_path_lock(refused=True)
                raise
        elif cfg.compression is not None:
            raise ValueError("compression applies to the disk tier, which is disabled")
        elif getattr(cfg, "direct_io", False):
            raise ValueError("direct_io applies to the disk tier, which is disabled: it would change nothing")
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

    # -- public operations: each runs inside _begin/_end so close() can wait for it -------------------
    # put and get: see batched.DataPaths (each is the public method itself: a call frame is a measurable
    # part of a 4 KiB put or get).

    def put_many(
        self, items: Iterable[tuple[Hashable, torch.Tensor]], *, scores: Iterable[float] | None = None
    ) -> None:
        """``put`` for each ``(key, tensor)``, as one batch: every key, value and score is checked before
        anything is stored (an invalid one raises and stores nothing); then the values are stored in
        order (a later duplicate key wins).  An I/O or capacity error stops the batch at that item: the
        items before it stay stored, it and the rest are not."""
        # Keys and values in two lists, not a list of pairs: a pair holds a tensor, so Python's cyclic GC
        # keeps tracking it, and a large batch's surviving pairs could trigger a full collection.
        keys: list[Hashable] = []
        values: list[torch.Tensor] = []
        if isinstance(items, Mapping):  # iterating it would give its keys alone, each unpacked as a "pair"
            self._refuse_if_closed()
            raise TypeError("put_many takes (key, tensor) pairs, not a mapping: pass mapping.items()")
        try:
            iterator = iter(items)
        except TypeError:
            self._refuse_if_closed()
            raise TypeError(f"put_many takes an iterable of (key, tensor) pairs, got {type(items).__name__}") from None
        try:
            for key, value in iterator:
                keys.append(key)
                values.append(value)
        except (TypeError, ValueError) as exc:  # not (key, value) pairs
            self._refuse_if_closed()  # a closed cache says so first
            if exc.__traceback__ is not None and exc.__traceback__.tb_next is not None:
                raise  # raised inside the caller's iterator, not by the unpacking: its own error
            raise type(exc)(f"put_many: item {len(keys)} is not a (key, tensor) pair ({exc})") from None
        score_list = list(scores) if scores is not None else [None] * len(keys)
        if len(score_list) != len(keys):
            raise ValueError(f"{len(score_list)} scores for {len(keys)} items")
        self._put_batch(zip(keys, values), score_list, bracket=True)

    def get_many(
        self,
        keys: Iterable[Hashable],
        device: torch.device | str | None = None,
        *,
        out: torch.Tensor | Sequence[torch.Tensor] | None = None,
        ranges: Sequence[Sequence[tuple[int, int]] | None] | None = None,
    ) -> list[torch.Tensor]:
        """The values of ``keys``, in key order, moved as one batched operation.

        All or nothing: the first absent key raises ``KeyError`` before anything is copied (counted as one
        get and one miss); a value whose stored bytes fail verification is dropped (as ``get`` does) and
        raises ``KeyError`` for its key.

        Where the values land:

        - ``out`` a list or tuple of tensors, one per key: each must have the stored dtype and number of
          elements (any shape and strides, e.g. a slice of a larger buffer) and all must be on one device,
          the target (``device``, if also given, must match); else ``ValueError`` naming the key.  Each
          value is copied straight into its tensor (memory-tier values: one copy from the tier, in the
          value's dtype; disk values are read into it when it is a contiguous CPU tensor) and ``out`` is
          returned as a list.
        - ``out`` one tensor, or ``out=None``: the values are packed into one byte buffer in key order,
          each at a multiple of 256 bytes (``tiercache.transfer.packed_layout([nbytes, ...])`` gives the
          offsets and the total): ``out`` when given (any contiguous tensor of at least that many bytes
          starting at a 16-byte aligned address; its device is the target, and ``device``, if also given,
          must match; else ``ValueError``), otherwise a fresh buffer on ``device`` (CPU by default).  Each
          result is a view of that buffer with the stored dtype and shape, so the results share one
          allocation.  On CUDA, host- and GPU-tier values are copied by one gather (one kernel launch
          reading pinned host memory by address); disk values are read and crc-checked in pinned staging
          memory, then gathered with them, on the cache's copy-engine stream after the caller's current
          stream.

        Ranged (sector) reads: ``ranges``, allowed only with ``out`` a list or tuple (else ``ValueError``),
        has one item per key: ``None`` reads that value whole, as above; otherwise a sequence of
        ``(start, stop)`` int byte offsets into the value's bytes in C order, ``0 <= start < stop <=
        nbytes``, sorted ascending and non-overlapping (adjacent allowed; an empty sequence reads nothing, and promotes nothing);
        anything else is a ``ValueError`` naming the item, raised before anything is counted or copied.
        For such an item ``out[i]`` must be contiguous (``ValueError`` otherwise) and only those bytes of
        it (viewed as the value's bytes) are written; every other byte of ``out[i]`` is left untouched.
        Memory tiers copy just the ranges.  A disk tier reads only the sectors (``disk_sector_bytes``, 64
        KiB by default) that cover the ranges, one read per run of consecutive sectors, and checks each
        against its own crc32c (a mismatch is damage, as for a whole read: the entry is dropped and
        ``KeyError`` raised; damage in sectors the read skips is not seen by it, but by any whole read).
        Entries without sector checksums (a format-2 store, a compressed store) are read whole, then the
        ranges copied (after a reopen that loaded the persisted index, an entry's first ranged read also
        reads its 4 KiB header page for its checksums).  If a ranged read fails, the asked bytes of
        ``out[i]`` may hold what was read (never the other bytes).  An entry the policy promotes is read whole (it is copied to the faster tier) and its ranges copied from that
        read.  ``stats()["tiers"][...]["bytes_read"]`` counts the payload bytes actually read;
        ``stats()["ranged_gets"]`` counts ranged items, and a disk tier's row ``ranged_reads`` /
        ``ranged_bytes_saved`` the entries it read by sectors and the payload bytes they skipped.  Return
        value, all-or-nothing misses, damage handling, pins and counts are as without ``ranges``.

        This call returns once every copy is complete.  Every source slot stays pinned until then, so a
        concurrent delete or demotion never frees bytes being read.  Hits, misses and promotions are
        counted and applied as ``get`` does.  Thread-safe."""
        keys = list(keys) if keys.__class__ is list else self._key_list(keys, "get_many")
        if ranges is not None:
            return self._get_many_ranged(keys, device, out, ranges)
        dsts: list[torch.Tensor] | None = None
        packed: torch.Tensor | None = None
        asked = _normal_device(torch.device(device)) if device is not None else None
        if isinstance(out, (list, tuple)):
            dsts = list(out)
            target = _out_list_target(dsts, asked, device)
            check_disjoint(dsts, keys)
        elif out is not None:
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"out must be a torch.Tensor or a list of them, got {type(out).__name__}")
            if not out.is_contiguous() or out.layout != torch.strided:
                raise ValueError("out must be a dense contiguous tensor")
            target = _normal_device(out.device)
            if asked is not None and asked != target:
                raise ValueError(f"out is on {out.device} but device={device!r} was requested")
            packed = out.detach().reshape(-1).view(torch.uint8)
            if packed.data_ptr() % 16:
                raise ValueError("out must start at a 16-byte aligned address (offset views may not)")
        else:
            target = asked or _CPU
        if target.type != "cpu":
            _check_read_device(target)
        return self._get_batch(keys, target, dsts, packed, pack=dsts is None, bracket=True)

    def _get_many_ranged(self, keys: list[Hashable], device: torch.device | str | None, out: object,
                         ranges: object) -> list[torch.Tensor]:
        """``get_many`` with ``ranges`` (see there): the same checks of ``out`` and ``device``, then
        :meth:`_get_ranged`."""
        if not isinstance(out, (list, tuple)):
            raise ValueError("ranges= needs out= a list or tuple of tensors, one per key")
        checked = check_ranges(ranges, len(keys))
        dsts = list(out)
        asked = _normal_device(torch.device(device)) if device is not None else None
        target = _out_list_target(dsts, asked, device)
        check_disjoint(dsts, keys, checked)
        if target.type != "cpu":
            _check_read_device(target)
        return self._get_ranged(keys, target, dsts, checked)

    def delete(self, key: Hashable) -> bool:
        """Remove ``key``; whether it was present.  Its slot is freed once no reader holds it."""
        self._begin()
        try:
            return self._delete_batch([key])[0]
        finally:
            self._end()

    def delete_many(self, keys: Iterable[Hashable]) -> int:
        """Remove every key (as one batch); how many were present."""
        keys = list(keys) if keys.__class__ is list else self._key_list(keys, "delete_many")
        self._begin()
        try:
            return sum(self._delete_batch(keys))
        finally:
            self._end()

    def update_scores(self, scores: dict[Hashable, float]) -> int:
        """Set the score :class:`~tiercache.ScorePolicy` ranks by, for the stored keys among ``scores`` (a
        mapping ``{key: score}``, else ``TypeError``); how many were stored.  Every score is checked first
        (``TypeError`` non-numeric, ``ValueError`` NaN: none applied)."""
        if type(scores) is not dict and not isinstance(scores, Mapping):
            self._refuse_if_closed()
            raise TypeError(f"update_scores takes a mapping {{key: score}}, got {type(scores).__name__}")
        with self._operation():
            return self._update_scores_impl(scores)

    def prefetch(self, keys: Iterable[Hashable], device: torch.device | str | None = None) -> Future[int]:
        """Stage ``keys`` in the background into the fastest tier, or with ``device`` into the fastest tier
        that lives on that device (``"cuda"``: the GPU tier, ``"cpu"``: the host tier; ``ValueError`` when
        no tier does).  The future's result is how many of them are in that tier or a faster one when it
        completes; absent keys are skipped.  Staging never drops another entry to make room."""
        self._refuse_if_closed()
        keys = self._key_list(keys, "prefetch")
        for key in keys:
            check_key(key)
        target = 0 if device is None else self._tier_on(torch.device(device))
        with self._lock:
            if self._closing or self._closed:  # (closing: close() may have shut the pool down already)
                raise CacheClosedError("this tiercache.Cache is closed")
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.config.io_threads, thread_name_prefix="tiercache-io",
                                                    initializer=_register_io_thread, initargs=(self._io_threads,))
            return self._executor.submit(self._stage, keys, target)

    def _tier_on(self, device: torch.device) -> int:
        for index, tier in enumerate(self._tiers):
            here = tier.device
            if here.type == device.type and (device.index is None or here.index in (None, device.index)):
                return index
        raise ValueError(f"no tier of this cache lives on {device} (tiers: {[t.name for t in self._tiers]})")

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` is stored.  ``CacheClosedError`` after ``close()``."""
        with self._lock:
            self._check_open()
            return key in self._index

    def __len__(self) -> int:
        """How many entries are stored.  ``CacheClosedError`` after ``close()``."""
        with self._lock:
            self._check_open()
            return len(self._index)

    def __bool__(self) -> bool:
        return True  # a Cache is an object, not a container that is "empty": `if cache:` never raises

    def keys(self) -> list[Hashable]:
        """A snapshot of the stored keys.  ``CacheClosedError`` after ``close()``."""
        with self._lock:
            self._check_open()
            return list(self._index)

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self.keys())

    def tier_of(self, key: Hashable) -> str | None:
        """Name of the tier currently holding ``key`` (``None`` if absent).  ``CacheClosedError`` after
        ``close()``."""
        with self._lock:
            self._check_open()
            entry = self._index.get(key)
            return self._tiers[entry.level].name if entry is not None else None

    def tiers_of(self, keys: Iterable[Hashable]) -> list[str | None]:
        """:meth:`tier_of` of each of ``keys``, in order, under one lock round trip (one snapshot of the
        placement).  ``CacheClosedError`` after ``close()``."""
        with self._lock:
            self._check_open()
            index, tiers = self._index, self._tiers
            out: list[str | None] = []
            if keys.__class__ is str or keys.__class__ is bytes:
                raise TypeError(f"tiers_of takes an iterable of keys, not one {type(keys).__name__} key: pass [key]")
            for key in keys:
                entry = index.get(key)
                out.append(tiers[entry.level].name if entry is not None else None)
            return out

    def charge(self, nbytes: int) -> int:
        """The most budget bytes any tier charges for a value of ``nbytes`` bytes (slot rounding, headers,
        checksums): an upper bound on what storing it consumes wherever it lands or is moved to.  Tiers
        without a ``charge`` method are assumed to charge the payload size.  ``nbytes``: an integer >= 0
        (``TypeError`` for anything else, ``bool`` included; ``ValueError`` when negative)."""
        if type(nbytes) is not int:
            if isinstance(nbytes, bool) or not hasattr(nbytes, "__index__"):
                raise TypeError(f"nbytes must be an int, got {type(nbytes).__name__} {nbytes!r}")
            nbytes = operator.index(nbytes)
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        return max(getattr(tier, "charge", lambda n: n)(nbytes) for tier in self._tiers)

    def _refuse_if_closed(self) -> None:
        """``CacheClosedError`` when closed (or closing): a closed cache says so before it judges arguments."""
        if self._closing or self._closed:
            raise CacheClosedError("this tiercache.Cache is closed")

    def _key_list(self, keys: Iterable[Hashable], what: str) -> list[Hashable]:
        """``list(keys)`` for the batch calls, refusing a lone ``str`` / ``bytes`` key (iterating it would
        look up its characters) and a non-iterable (``TypeError``; ``CacheClosedError`` first when closed)."""
        if keys.__class__ is str or keys.__class__ is bytes:
            self._refuse_if_closed()
            raise TypeError(f"{what} takes an iterable of keys, not one {type(keys).__name__} key: pass [key]")
        try:
            return list(keys)
        except TypeError as exc:
            self._refuse_if_closed()
            if exc.__traceback__ is not None and exc.__traceback__.tb_next is not None:
                raise  # raised inside the caller's iterator
            raise TypeError(f"{what} takes an iterable of keys, got {type(keys).__name__}") from None

    @property
    def tiers(self) -> list[Tier]:
        return list(self._tiers)

    def stats(self) -> dict[str, Any]:
        """A JSON-serialisable snapshot of usage and counters (see docs/api.md for each field).  Tiers with
        a ``describe()`` method add their own items to their row.  Still answers after ``close()``
        (``"closed": True``, the final counters, ``"entries": 0``: the closed cache holds nothing; a
        persistent tier's row keeps ``entries``, ``payload_bytes`` and ``used_bytes`` of what it holds on
        disk, what a reopen finds, and a memory tier's row shows 0)."""
        with self._lock:
            per_tier: dict[str, Any] = {}
            persisted = self._persisted if self._closed else None
            for index, tier in enumerate(self._tiers):
                live, payload = self._queues[index].live, self._queues[index].payload
                if persisted is not None:  # closed: a persistent tier's row says what it holds on disk
                    live, payload = persisted.get(index, (0, 0))
                row: dict[str, Any] = {
                    "capacity_bytes": tier.capacity,
                    "used_bytes": tier.used if persisted is None or index in persisted else 0,
                    "entries": live,
                    "payload_bytes": payload,
                }
                row.update(self._counters.tiers[tier.name].export())
                describe = getattr(tier, "describe", None)
                if describe is not None and not self._closed:
                    row.update(describe())
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
                "ranged_gets": c.ranged_gets,
                "bytes_moved": dict(c.bytes_moved),
                "errors": dict(c.errors),
                "policy": getattr(self._policy, "name", type(self._policy).__name__),
                "closed": self._closed,
            }

    # -- lifecycle ------------------------------------------------------------------------------------
    def flush(self) -> None:
        """Make every live entry that fits durable on the disk tier now (it moves there); see ``close``.
        Entries that do not fit are dropped and reported to ``on_evict`` with reason ``"flush"``.  Raises
        ``TierIOError`` when writing some entries failed: those stay where they were, the others are moved.
        Without a disk tier there is nothing to do."""
        with self._operation():
            self._persist("flush")

    def close(self) -> None:
        """Wait for background work, persist what fits to the disk tier, release memory and the path
        lock.  Raises ``TierIOError`` (after closing) if persisting failed.

        Idempotent, and a barrier: when any ``close()`` returns, the cache is closed, everything it
        persists is on the disk tier and synced, and the path lock is released.  A ``close()`` called
        while another thread's ``close()`` is still running waits for it to finish, then returns, or
        raises the same exception when that one failed (``RuntimeError`` when it was interrupted, e.g. by
        ``KeyboardInterrupt``, which belongs to its own thread); a ``close()`` after one has finished
        returns at once.

        ``close()`` never waits for itself: called from code the cache runs inside an operation or
        inside ``close()`` -- an ``on_evict`` callback, a policy's methods, a prefetch future's done
        callback (a thread of the cache's I/O pool), a policy's ``promote`` or a tier's method run by an
        operation -- it raises ``RuntimeError`` and changes nothing (an exception raised in ``on_evict`` is
        logged, as any other): close the cache once that operation has returned.

        Afterwards the cache holds nothing: every method that reads or changes entries (``put``, ``get``,
        ``in``, ``len``, ``keys``, ``tier_of``, ``prefetch``, ``flush``, ...) raises ``CacheClosedError``;
        ``stats()``, ``charge()``, ``tiers`` and ``repr`` still answer."""
        me = threading.get_ident()
        if getattr(self._callbacks, "depth", 0):
            raise RuntimeError(
                "close() called from inside an on_evict callback: the callback runs within an operation of "
                "this cache (or within close() itself) that close() would wait for; close the cache after "
                "that operation has returned")
        if me in self._io_threads:
            raise RuntimeError(
                "close() called on a thread of this cache's prefetch pool (e.g. from a prefetch future's done "
                "callback): close() shuts that pool down and waits for its threads; close the cache from "
                "another thread")
        if self._lock._is_owned():  # type: ignore[attr-defined]  (a policy method, run under the index lock)
            raise RuntimeError(
                "close() called from code the cache runs under its index lock (a policy's rank or promote): "
                "it would wait for the operation running it; close the cache after that operation has returned")
        with self._lock:
            if self._active and not self._close_finished and self._runs_inside_operation():
                raise RuntimeError(
                    "close() called from code an operation of this cache runs (a policy's promote, a tier's "
                    "method): it would wait for that operation; close the cache after it has returned")
            waited = False
            while True:
                if self._close_finished:
                    error = self._close_error
                    if waited and error is not None:  # the close() this one waited for failed
                        if isinstance(error, Exception):
                            raise error
                        raise RuntimeError(f"the close() this call waited for was interrupted ({type(error).__name__}): "
                                           "entries may not have been persisted") from error
                    return
                if not self._closing:
                    break  # (also when the close() waited for was interrupted before it changed anything)
                if self._closer == me:  # (a tier's method, run by close() itself, calling close())
                    raise RuntimeError("close() called from inside this cache's own close()")
                waited = True
                while self._closing and not self._close_finished:
                    self._idle.wait()
            self._closing = True
            self._closer = me
            try:
                while self._active:
                    self._idle.wait()
            except BaseException:  # interrupted (KeyboardInterrupt) before anything changed: still open
                self._closing = False
                self._closer = None
                self._idle.notify_all()
                raise
            executor, self._executor = self._executor, None
        try:
            self._close_now(executor)
        except BaseException as exc:
            self._close_error = exc
            raise
        finally:
            with self._lock:
                self._close_finished = True
                self._closer = None
                self._idle.notify_all()

    def _close_now(self, executor: ThreadPoolExecutor | None) -> None:
        """``close``'s work, once no operation is in flight and none can start."""
        _OPEN.discard(self)
        if executor is not None:
            executor.shutdown(wait=True)
            self._io_threads.clear()  # (their idents may be reused by other threads now)
        try:
            self._persist("close")
        finally:
            with self._lock:
                self._closed = True
                # What the persistent tiers hold (what a reopen finds), for stats() of the closed cache.
                self._persisted = {index: (queue.live, queue.payload) for index, queue in enumerate(self._queues)
                                   if self._tiers[index].persistent}
                # Whatever was not persisted is gone with the tiers' memory: the index must not claim it.
                self._index.clear()
                for index, queue in enumerate(self._queues):
                    self._queues[index] = RankedQueue(index)
            failure: BaseException | None = None
            for tier in self._tiers:  # every tier is closed and the lock released, whatever one of them raises
                try:
                    tier.close()
                except BaseException as exc:
                    failure = failure or exc
            self._release_path_lock()
            if failure is not None:
                raise failure

    def __enter__(self) -> "Cache":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _unflushed(self) -> str | None:
        """What an unclosed cache would lose now (for the ResourceWarning), or None."""
        if not getattr(self, "_opened", False) or self._closed or self._closing:
            return None
        lost = sum(q.live for q, tier in zip(self._queues, self._tiers) if not tier.persistent)
        disks = [tier.name for tier in self._tiers if tier.persistent]
        parts = []
        if lost:
            parts.append(f"{lost} entries in volatile tiers are lost")
        if disks:
            parts.append(f"the {'/'.join(disks)} tier was not closed (entries written since the last flush "
                         f"may be incomplete)")
        return " and ".join(parts) or None

    def _warn_unclosed(self, when: str) -> None:
        what = self._unflushed()
        if what is not None:
            warnings.warn(
                f"unclosed {self!r} {when}: {what}; call close() or use `with tiercache.Cache(...)`",
                ResourceWarning,
                source=self,
                stacklevel=2,
            )

    def __del__(self) -> None:
        try:
            self._warn_unclosed("garbage-collected")
        except Exception:  # at interpreter shutdown module globals may already be gone
            pass
        finally:
            if getattr(self, "_lock_file", None) is not None:
                self._release_path_lock()

    def __repr__(self) -> str:
        tiers = ", ".join(f"{t.name}={format_size(t.capacity)}" for t in self._tiers)
        state = "closed" if self._closed else f"entries={len(self._index)}"
        return f"tiercache.Cache({tiers}, policy={getattr(self._policy, 'name', self._policy)!r}, {state})"


def _out_list_target(dsts: list, asked: torch.device | None, device: object) -> torch.device:
    """The one device of the ``out=`` list ``dsts`` (``asked``, the normalised ``device=``, or the CPU when
    the list is empty): ``TypeError`` for an item that is not a dense tensor, ``ValueError`` for tensors on
    several devices or on another device than ``device=``."""
    on_cpu = True
    for i, dst in enumerate(dsts):
        if not isinstance(dst, torch.Tensor) or dst.layout is not _STRIDED or dst.is_nested:
            raise TypeError(f"out[{i}] must be a dense torch.Tensor, got {type(dst).__name__}")
        on_cpu = on_cpu and dst.is_cpu  # (a flag read; dst.device builds an object per tensor)
    if on_cpu and dsts:
        devices = {_CPU}
    else:
        devices = {_normal_device(d) for d in {dst.device for dst in dsts}}
    if len(devices) > 1:
        raise ValueError(f"out tensors are on several devices: {sorted(map(str, devices))}")
    target = devices.pop() if devices else (asked or _CPU)
    if asked is not None and asked != target:
        raise ValueError(f"out is on {target} but device={device!r} was requested")
    return target


def _register_io_thread(threads: set[int]) -> None:
    """The prefetch pool's initializer, in each of its threads: ``close()`` refuses to run on one of them
    (it joins them).  Given the set, not the cache: a live pool thread must not keep an unclosed cache alive."""
    threads.add(threading.get_ident())


def _holding_entries(tier: ArenaTier, budget: int) -> ArenaTier:
    """``tier`` when it can hold an entry; a budget below one slot (256 bytes) leaves a tier of no
    capacity, which every put would find too small: ``ValueError`` (0 or None disables a tier)."""
    if tier.capacity == 0:
        tier.close()
        raise ValueError(f"{tier.name} capacity of {budget} bytes holds no entry: a memory tier's slots are "
                         f"256 bytes; give at least that, or 0/None to disable the tier")
    return tier


_OPEN: "weakref.WeakSet[Cache]" = weakref.WeakSet()  # caches not closed yet, for the exit-time warning


@atexit.register
def _warn_unclosed_at_exit() -> None:
    for cache in list(_OPEN):
        cache._warn_unclosed("at interpreter exit")
        cache._opened = False  # warned once: not again when it is collected during shutdown
