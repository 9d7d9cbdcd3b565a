"""Persistence: recovering the index from persistent tiers on open, and moving what fits to the last
(persistent) tier on ``flush``/``close``.
"""

from __future__ import annotations

from .errors import TierIOError
from .index import Entry
from .keys import decode_key
from .moves import Moves
from .policies import EntryInfo
from .state import Release, log


class Persistence(Moves):
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
            releases: list[Release] = []
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

