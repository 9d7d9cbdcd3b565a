"""Persistence: recovering the index from persistent tiers on open, and moving what fits to the last
(persistent) tier on ``flush``/``close``.
"""

from __future__ import annotations

import gc
from itertools import repeat
from typing import Hashable

from .errors import CorruptEntryError, OverBudgetError, TierIOError
from .index import Entry
from .keys import decode_key
from .tiers.base import EntryHeader
from .moves import Moves
from .state import Release, log
from .values import check_header


def _fast_key(data: bytes) -> Hashable:
    """:func:`~tiercache.keys.decode_key`, with the common int key (``b"i" | u32 length | ascii digits``)
    decoded inline: the same result and the same ``ValueError`` for anything malformed."""
    if type(data) is bytes and data[:1] == b"i" and int.from_bytes(data[1:5], "little") == len(data) - 5:
        text = data[5:]
        if text[:1] != b"-" and text.isdigit():  # ASCII digits (bytes.isdigit): int() reads them as decode_key does
            return int(text)
    return decode_key(data)


class Persistence(Moves):
    def _recover(self) -> None:
        """Rebuild the index from the persistent tiers (once, at open).  Each recovered header is checked
        here, once: an unreadable key or a dtype/shape/size disagreement costs that entry (counted as a
        corruption), never the store.  Entries are ranked in bulk (one heapify per tier).

        Python's cyclic garbage collector is paused meanwhile (process-wide, for the duration of the
        open): building 100K index entries otherwise triggers repeated full collections that cost about
        as much as the rebuild itself.  Nothing built here forms a reference cycle."""
        paused = gc.isenabled()
        gc.disable()
        try:
            self._rebuild_index()
        finally:
            if paused:
                gc.enable()

    def _rebuild_index(self) -> None:
        rank = self._policy.rank
        index = self._index
        for tier_index, tier in enumerate(self._tiers):
            if not tier.persistent:
                continue
            loaded: dict[Hashable, Entry] = {}  # this tier's entries, ranked in bulk below
            seq = self._seq
            # check_header depends only on (dtype, shape, nbytes), which most entries share: checked once each
            forms: dict[tuple[str, tuple[int, ...], int], object] = {}
            # Column-wise where the tier offers it, unless its recover was replaced on the instance (a
            # wrapper around recover must still see every entry).
            bulk = getattr(tier, "recover_columns", None) if "recover" not in vars(tier) else None
            columns, found_entries = bulk() if bulk is not None else (None, tier.recover())
            if columns is not None:
                seq = self._load_columns(tier, tier_index, columns, loaded, seq)
            for found in found_entries:
                header = found.header
                try:
                    key = _fast_key(header.key)
                    form = (header.dtype, header.shape, header.nbytes)
                    dtype = forms.get(form)
                    if dtype is None:
                        dtype = forms[form] = check_header(header)
                except (ValueError, CorruptEntryError) as exc:  # one damaged header costs one entry
                    log.warning("tiercache: dropping a damaged %s entry: %s", tier.name, exc)
                    self._counters.corruptions += 1
                    tier.discard(found.slot)
                    tier.free(found.slot)
                    continue
                if header.seq > seq:
                    seq = header.seq
                previous = loaded.get(key) or (index.get(key) if index else None)
                if previous is not None and not self._keep_newer(previous, header.seq, tier, found.slot, loaded, key):
                    continue
                entry = Entry(key, header.nbytes, tier.name, 0, 0, 0, 0.0, header.key, dtype, tuple(header.shape), header.seq,
                              tier_index, found.slot)
                loaded[key] = entry
                self._index[key] = entry
            # A tier that persists its sequence high-water mark keeps the counter from restarting below
            # the newest write it ever acknowledged, even when that entry's file is gone.
            self._seq = max(seq, int(getattr(tier, "seq_high_water", 0) or 0))
            entries = list(loaded.values())
            self._queues[tier_index].load(list(map(rank, entries)), entries)  # (an Entry is its own info)
            corrupt = getattr(tier, "corrupt_on_open", 0)
            self._counters.corruptions += corrupt
            if tier.used > tier.capacity:  # never shed stored data because of a budget (DiskTier refuses first)
                raise OverBudgetError(
                    f"the {tier.name} tier holds {tier.used} bytes of entries, more than its budget of "
                    f"{tier.capacity} bytes; reopen with a budget of at least {tier.used} bytes (then delete "
                    "entries to shrink it): a smaller budget never deletes data",
                    tier.used, tier.capacity,
                )
        self._flush_finish_later()

    def _load_columns(self, tier, tier_index: int, columns, loaded: dict[Hashable, Entry], seq: int) -> int:
        """``_rebuild_index``'s loop over a persistent tier's entries given column-wise (the disk tier's
        loaded index, ``DiskTier.recover_columns``): the same checks and outcome, without a header object per
        entry.  Returns the highest sequence number seen (at least ``seq``)."""
        index = self._index
        name = tier.name
        dtypes: list[object] = []  # per form: its dtype, or the error that makes its entries damaged
        for dtype_name, shape, nbytes in columns.forms:
            try:
                dtypes.append(check_header(EntryHeader(b"", dtype_name, shape, nbytes, 0)))
            except CorruptEntryError as exc:
                dtypes.append(exc)
        forms = columns.forms
        bad_forms = {i for i, d in enumerate(dtypes) if isinstance(d, CorruptEntryError)}
        others = bool(index)  # entries of earlier tiers a key may duplicate (else only this tier's)
        int_keys = getattr(columns, "int_keys", None)
        if int_keys and not bad_forms and not others and not loaded and min(int_keys) >= 0:
            # Every key decoded in bulk by the tier, every form sound, no earlier tier: the entries are made
            # by one C-level map (no bytecode per entry besides Entry's __init__).  A key found twice (two
            # copies of it in the store) takes the loop below, which keeps the newer one.
            if len(forms) == 1:
                nbytes_of, dtype_of, shape_of = repeat(forms[0][2]), repeat(dtypes[0]), repeat(forms[0][1])
            else:
                form_ids = columns.form_ids
                nbytes_of = map([f[2] for f in forms].__getitem__, form_ids)
                dtype_of = map(dtypes.__getitem__, form_ids)
                shape_of = map([f[1] for f in forms].__getitem__, form_ids)
            made = dict(zip(int_keys, map(Entry, int_keys, nbytes_of, repeat(name), repeat(0), repeat(0), repeat(0),
                                          repeat(0.0), columns.keys, dtype_of, shape_of, columns.seqs,
                                          repeat(tier_index), columns.slots)))
            if len(made) == len(int_keys):
                loaded.update(made)
                index.update(made)
                return max(seq, max(columns.seqs))
        if int_keys is None:
            int_keys = repeat(-1)
        for key_bytes, form_id, entry_seq, slot, key in zip(columns.keys, columns.form_ids, columns.seqs,
                                                            columns.slots, int_keys):
            dtype = dtypes[form_id]
            try:
                if bad_forms and form_id in bad_forms:
                    raise dtype  # type: ignore[misc]
                if key < 0:  # not decoded in bulk by the tier: decode_key, the common int key inlined (_fast_key)
                    if key_bytes[:1] == b"i" and int.from_bytes(key_bytes[1:5], "little") == len(key_bytes) - 5 \
                            and key_bytes[5:6] != b"-" and key_bytes[5:].isdigit():
                        key = int(key_bytes[5:])
                    else:
                        key = decode_key(key_bytes)
            except (ValueError, CorruptEntryError) as exc:  # one damaged header costs one entry
                log.warning("tiercache: dropping a damaged %s entry: %s", name, exc)
                self._counters.corruptions += 1
                tier.discard(slot)
                tier.free(slot)
                continue
            if entry_seq > seq:
                seq = entry_seq
            previous = loaded.get(key)
            if previous is None and others:
                previous = index.get(key)
            if previous is not None and not self._keep_newer(previous, entry_seq, tier, slot, loaded, key):
                continue
            _, shape, nbytes = forms[form_id]
            loaded[key] = entry = Entry(key, nbytes, name, 0, 0, 0, 0.0, key_bytes, dtype, shape, entry_seq,
                                        tier_index, slot)
            if others:
                index[key] = entry
        if not others:
            index.update(loaded)
        return seq

    def _keep_newer(self, previous: Entry, seq: int, tier, slot, loaded: dict[Hashable, Entry], key: Hashable) -> bool:
        """Two copies of ``key`` found while recovering: ``True`` when the one just found (``seq`` in ``slot``
        of ``tier``) is newer, after releasing ``previous``'s slot (and its queue rank, if it was ranked in
        an earlier tier's queue); ``False`` after releasing the found one's slot."""
        if previous.seq >= seq:
            tier.discard(slot)
            tier.free(slot)
            return False
        self._tiers[previous.level].discard(previous.slot)
        self._tiers[previous.level].free(previous.slot)
        if loaded.get(key) is not previous:  # already ranked in an earlier tier's queue
            self._queues[previous.level].remove(previous)
            previous.version += 1  # its queue item is stale now
        return True

    def _persist(self, reason: str) -> int:
        """Move upper-tier entries to the last (persistent) tier, highest rank first, dropping the
        lowest-ranked entries that do not fit (entries already on the disk tier included: their place goes to
        higher-ranked ones).  Returns how many entries could not be kept; a warning says so."""
        last = len(self._tiers) - 1
        disk = self._tiers[last]
        if not disk.persistent:
            return 0
        with self._lock:
            ranked = sorted(self._index.values(), key=lambda e: self._policy.rank(e.info), reverse=True)
            budget, keep = disk.capacity, set()
            for entry in ranked:
                charge = getattr(disk, "charge", lambda n: n)(entry.nbytes)
                if charge <= budget and entry.nbytes <= disk.max_nbytes:
                    keep.add(id(entry))
                    budget -= charge
            releases: list[Release] = []
            lost = on_disk = 0
            for entry in ranked:
                if id(entry) not in keep and not entry.moving:
                    lost += 1
                    on_disk += entry.level == last  # durable entries dropped for higher-ranked ones: said too
                    releases += self._drop_entry(entry, reason)
            movers = [e for e in ranked if id(e) in keep and e.level != last and not e.moving]
            for entry in movers:
                entry.moving = True
                self._pin(entry.level, entry.slot)
        self._finish(releases)
        failures: list[BaseException] = []
        for entry in movers:
            with self._lock:
                slot = disk.allocate(entry.nbytes)
            if slot is None:  # cannot happen for a non-fragmenting disk tier; stay correct anyway
                slot = self._reserve(last, entry.nbytes)
            if slot is None:
                with self._lock:
                    entry.moving = False
                    self._finish_later(self._unpin(entry.level, entry.slot))
                lost += 1
                continue
            try:
                self._move(entry, entry.level, last, slot, None)
            except BaseException as exc:
                failures.append(exc)
        self._flush_finish_later()
        if lost:
            log.warning("tiercache: %d entries did not fit the disk tier and were dropped (%d of them were on it: "
                        "higher-ranked entries took their place)", lost, on_disk)
        if failures:
            raise TierIOError(f"persisting to the disk tier failed for {len(failures)} entries: {failures[0]}")
        return lost

