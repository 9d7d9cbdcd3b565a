"""The cache's data paths: ``put``, ``get``, ``get_many`` (N entries moved as one operation), ``delete``
and ``update_scores``.

Each pins its source slots under the index lock, copies outside it (``get_many``: one gather, on CUDA one
kernel launch through ``tiercache.transfer.CopyEngine``), then counts, promotes and unpins.
"""

from __future__ import annotations

import time
from typing import Hashable, Iterable

import torch

from .errors import CorruptEntryError, TierCacheError
from .index import Entry
from .keys import check_key, encode_key
from .moves import Moves
from .policies import EntryInfo
from .sizes import format_size
from .state import Release, log
from .tiers.base import EntryHeader, Slot
from .tiers.disk import DiskTier
from .transfer import CopyEngine, chunk_file_bytes, packed_layout, read_chunk_into
from .values import check_score, restore, tensor_bytes


class BatchedReads(Moves):
    """The data paths of :class:`tiercache.Cache` (``put``, ``get``, ``get_many``, ``delete``,
    ``update_scores``), built on its shared state (:class:`tiercache.state.CacheState`)."""

    def _put_impl(self, key: Hashable, value: torch.Tensor, *, score: float | None = None) -> None:
        key_bytes = encode_key(key)
        data, dtype_name, shape = tensor_bytes(value)
        nbytes = data.numel()
        if score is not None:
            check_score(score)
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
        releases: list[Release] = []
        tier = self._tiers[src]
        try:
            start = time.perf_counter()
            raw = tier.read(slot, header)
            elapsed = time.perf_counter() - start
            result = restore(raw, header, target, aliasing=not tier.persistent)
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
        checked = {key: check_score(score) for key, score in scores.items()}  # all valid, or none applied
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


    def _get_many_impl(
        self,
        keys: Iterable[Hashable],
        device: torch.device | str | None = None,
        *,
        out: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        keys = list(keys)
        for key in keys:
            check_key(key)
        flat: torch.Tensor | None = None
        if out is not None:
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
            if not out.is_contiguous() or out.layout != torch.strided:
                raise ValueError("out must be a dense contiguous tensor")
            target = _normal_device(out.device)
            if device is not None and _normal_device(torch.device(device)) != target:
                raise ValueError(f"out is on {out.device} but device={device!r} was requested")
            flat = out.detach().reshape(-1).view(torch.uint8)
            if flat.data_ptr() % 16:
                raise ValueError("out must start at a 16-byte aligned address (offset views may not)")
        else:
            target = _normal_device(torch.device(device) if device is not None else torch.device("cpu"))
        with self._lock:
            self._check_open()
            found: list[Entry] = []
            for key in keys:
                entry = self._index.get(key)
                if entry is None:
                    self._counters.gets += 1
                    self._counters.misses += 1
                    for counters in self._counters.tiers.values():
                        counters.misses += 1
                    raise KeyError(key)
                found.append(entry)
            sizes = [entry.header.nbytes for entry in found]
            offsets, total = packed_layout(sizes)
            if flat is not None and flat.numel() < total:
                raise ValueError(
                    f"out holds {flat.numel()} bytes but these {len(keys)} values need {total} "
                    f"(packed at 256-byte alignment)"
                )
            engine = self._engines.get(target)
            if engine is None:
                engine = self._engines[target] = CopyEngine(target)
            items: list[tuple[Entry, int, Slot, EntryHeader]] = []
            for entry in found:
                src = entry.tier
                for tier in self._tiers[:src]:
                    self._counters.tiers[tier.name].misses += 1
                self._counters.tiers[self._tiers[src].name].hits += 1
                self._counters.gets += 1
                entry.info.hits += 1
                entry.info.last_access = self._tick()
                self._rerank(entry)
                self._pin(src, entry.slot)
                items.append((entry, src, entry.slot, entry.header))
        failed: tuple[Entry, CorruptEntryError] | None = None
        try:
            buffer = flat if flat is not None else torch.empty(total, dtype=torch.uint8, device=target)
            sources, read_seconds = self._batch_sources(items, target)
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
            results = []
            for (entry, src, slot, header), offset in zip(items, offsets):
                dtype = getattr(torch, header.dtype, None)
                if not isinstance(dtype, torch.dtype):
                    failed = (entry, CorruptEntryError(f"unknown dtype {header.dtype!r} in entry header"))
                    raise failed[1]
                view = buffer[offset : offset + header.nbytes]
                results.append((view.view(dtype) if dtype != torch.uint8 else view).reshape(header.shape))
            with self._lock:
                for (entry, src, slot, header), seconds in zip(items, read_seconds):
                    counters = self._counters.tiers[self._tiers[src].name]
                    counters.bytes_read += header.nbytes
                    counters.read_seconds += seconds + share * header.nbytes
            fast = self._tiers[0]
            for (entry, src, slot, header), (arena, offset), position in zip(items, sources, offsets):
                if src > 0 and self._policy.promote(entry.info, self._tiers[src].name, fast.name):
                    # Promote from the copy already made when it sits on the fast tier's device; the
                    # source slot is still pinned by us either way.
                    data = buffer if buffer.device == fast.device else arena
                    start_at = position if data is buffer else offset
                    self._promote(entry, src, data[start_at : start_at + header.nbytes])
        except CorruptEntryError as exc:
            bad: Entry | None = failed[0] if failed is not None else getattr(exc, "tiercache_entry", None)
            with self._lock:
                releases: list[Release] = []
                for entry, src, slot, header in items:
                    releases += self._unpin(src, slot)
                if bad is not None and self._index.get(bad.key) is bad:
                    log.warning("tiercache: entry %r is damaged and was dropped: %s", bad.key, exc)
                    self._counters.corruptions += 1
                    releases += self._drop_entry(bad, "corrupt")
            self._finish(releases)
            if bad is None:
                raise
            raise KeyError(bad.key) from None
        except BaseException:
            with self._lock:
                releases = []
                for entry, src, slot, header in items:
                    releases += self._unpin(src, slot)
            self._finish(releases)
            raise
        with self._lock:
            releases = []
            for entry, src, slot, header in items:
                releases += self._unpin(src, slot)
        self._finish(releases)
        return results

    def _batch_sources(
        self, items: list[tuple[Entry, int, Slot, EntryHeader]], target: torch.device
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


def _normal_device(device: torch.device) -> torch.device:
    """``cuda`` -> ``cuda:<current>``, so devices compare equal however they were spelled."""
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device
