"""Moving entries between tiers: making room (demotion of the policy's victims, dropping from the last
tier), two-phase moves, promotion of hits and background staging (``prefetch``).

Decisions come from the policy (victim order, whether to promote); this module only carries them out,
keeping every source slot pinned and the entry marked ``moving`` while its bytes are copied outside the
index lock.
"""

from __future__ import annotations

from typing import Hashable, Iterable

import torch

from .errors import CorruptEntryError, TierCacheError
from .index import Entry
from .state import CacheState, log
from .tiers.base import Slot
from .tiers.memory import ArenaTier
from .values import as_bytes, slot_view


class Moves(CacheState):
    # -- making room ----------------------------------------------------------------------------------
    def _reserve(self, tier_index: int, nbytes: int, *, allow_drop: bool = True) -> Slot | None:
        """A slot of ``nbytes`` in ``tier_index``, demoting that tier's victims as needed; ``None`` when the
        tier cannot make room (everything there is being moved, or the value is too large for it).
        With ``allow_drop=False`` no entry may be dropped from the last tier to make room (promotions use
        this: a read never costs another entry its data); ``None`` then also when only a drop would help.
        Raises ``TierIOError`` if a demotion fails on I/O (nothing is lost then), and what the policy's
        ``rank`` raised (every victim is then queued again, at its previous rank if need be)."""
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
                victims = self._queues[tier_index].pop_victims(self._index, max(need, 1), self._lazy_rank)
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
                            # (a policy.rank that raises: queued at its old rank; the first error is raised below)
                            failed = self._rerank_or_error(rest)
                            error = error or failed
                            self._finish_later(self._unpin(rest.level, rest.slot))
                    break
            self._flush_finish_later()
            if error is not None:
                raise error
            if stuck:
                return None


    def _demote(self, victim: Entry, allow_drop: bool = True) -> bool:
        """Move a pinned, ``moving`` victim one tier down, or drop it from the last tier.  Without
        ``allow_drop`` a victim that could only be dropped is handed back instead; returns False then."""
        src = victim.level
        dst = src + 1
        try:
            slot = self._reserve(dst, victim.nbytes, allow_drop=allow_drop) if dst < len(self._tiers) else None
        except BaseException:  # making room below failed (I/O, a policy.rank that raised): hand the victim back
            with self._lock:
                victim.moving = False
                releases = self._unpin(src, victim.slot)
                if self._index.get(victim.key) is victim:
                    self._rerank_or_error(victim)  # (queued either way; the first error is the one raised)
                self._finish_later(releases)
            raise
        if slot is None:
            with self._lock:
                victim.moving = False
                releases = self._unpin(src, victim.slot)
                if self._index.get(victim.key) is victim:
                    if not allow_drop:
                        error = self._rerank_or_error(victim)
                        self._finish_later(releases)
                        if error is not None:  # (_reserve hands the other victims back, then raises it)
                            raise error
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
            data = data.reshape(-1)  # a typed slot view has the value's shape; tiers take 1-D data
            if not isinstance(self._tiers[dst], ArenaTier):
                data = as_bytes(data)  # other tiers are handed bytes
            elif data.dtype != entry.dtype:
                try:
                    data = data.view(entry.dtype)  # memory tiers copy in the value's own dtype
                except RuntimeError:  # not aligned for it: bytes are fine
                    pass
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
                    self._rerank_or_error(entry)  # (queued either way; the move's own error is the one raised)
                if isinstance(exc, OSError):
                    self._counters.errors["io"] += 1
            self._finish(releases)
            if isinstance(exc, CorruptEntryError):
                return False
            raise
        error: BaseException | None = None
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
                entry.level, entry.slot = dst, slot
                entry.view = slot_view(self._tiers[dst], slot, entry)
                self._counters.bytes_moved[f"{self._tiers[src].name}->{self._tiers[dst].name}"] += slot.nbytes
                moved = True
                # (a policy.rank that raises: the entry is queued in dst at its old rank, the error raised
                # once the source slot is released)
                error = self._rerank_or_error(entry)
        self._finish(releases)
        if error is not None:
            raise error
        return moved


    def _promote(self, entry: Entry, src: int, data: torch.Tensor | None, targets: Iterable[int] | None = None) -> bool:
        """Best effort: move ``entry`` from ``src`` to the first of ``targets`` (default: every faster tier,
        fastest first) that can make room for it without dropping anything."""
        with self._lock:
            if self._closed or self._index.get(entry.key) is not entry or entry.moving or entry.level != src:
                return False
            entry.moving = True
            self._pin(src, entry.slot)
        slot: Slot | None = None
        error: BaseException | None = None
        try:
            for dst in (range(src) if targets is None else targets):
                slot = self._reserve(dst, entry.nbytes, allow_drop=False)
                if slot is not None:
                    break
        except (OSError, TierCacheError) as exc:
            log.warning("tiercache: making room to promote %r failed: %s", entry.key, exc)
            with self._lock:
                self._counters.errors["promote"] += 1
            slot = None
        except BaseException as exc:  # (e.g. a policy.rank that raised): the entry is handed back, then it propagates
            error, slot = exc, None
        if slot is None:
            with self._lock:
                entry.moving = False
                releases = self._unpin(src, entry.slot)
                if self._index.get(entry.key) is entry:
                    error = error or self._rerank_or_error(entry)
            self._finish(releases)
            if error is not None:
                raise error
            return False
        try:
            return self._move(entry, src, dst, slot, data)
        except (OSError, TierCacheError) as exc:  # _move has put the entry back where it was
            log.warning("tiercache: promoting %r failed: %s", entry.key, exc)
            with self._lock:
                self._counters.errors["promote"] += 1
            return False


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
                src = entry.level
            if src > target:
                self._promote(entry, src, None, [target])
        with self._lock:  # "resident when it completes", as documented: later stagings may have demoted some
            return sum(1 for key in keys if (e := self._index.get(key)) is not None and e.level <= target)

