"""The cache's bookkeeping: where each entry lives, and per-tier eviction queues ordered by policy rank.

Nothing here does I/O or touches tensors; all of it is used under the cache's index lock.
"""

from __future__ import annotations

import heapq
import itertools
import operator
from collections import deque
from itertools import repeat
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Iterator

from .keys import encode_key
from .policies import EntryInfo
from .tiers.base import EntryHeader, Slot


@dataclass(slots=True, eq=False)
class Entry(EntryInfo):
    """One live key: the policy's metadata (it *is* the :class:`EntryInfo` the policy ranks: ``key``,
    ``nbytes``, ``tier`` — the tier's *name* —, ``inserted``, ``last_access``, ``hits``, ``score``), its
    header (dtype, shape, seq), and the tier index (``level``) and slot holding its bytes.  One object per
    entry, so a cache of many entries costs Python's cyclic GC as little as possible; ``info`` returns
    the entry itself.

    The header is decoded and checked once (at ``put`` or recovery); ``dtype`` is its dtype resolved.  For
    a slot of a memory tier that is not read by address (a GPU arena) ``view`` is the payload in place,
    typed and shaped, so reads copy from it without building a view again; CPU arena slots are copied by
    address (``ArenaTier.address``) and get a view only once a read copies them into a strided
    destination (``get_many`` into slices of a buffer).  ``slot`` and ``view`` change together, under the
    index lock.

    ``moving`` is set while a mover (demotion, promotion, flush) copies it to another tier; such an entry
    is not chosen as a victim again.  ``version`` is the token of its current queue item (see
    ``RankedQueue``); bumping it invalidates every queued item (lazy deletion).  ``queued_rank`` is the
    rank of that item; with ``rank_deferred`` the item is not in the heap yet: an older item of the entry
    with a smaller key stands in for it until it comes up (see ``RankedQueue.defer``)."""

    key_bytes: bytes | None = b""  # the header's fields, kept flat (see ``header``); None: not encoded yet
    dtype: Any = None  # torch.dtype of the payload
    shape: tuple[int, ...] = ()
    seq: int = 0
    level: int = 0
    slot: Slot = None  # type: ignore[assignment]
    view: Any = None  # memory tiers: the slot's bytes in place, as a tensor of dtype and shape (else None)
    moving: bool = False
    version: int = 0
    queued_rank: Any = None
    rank_deferred: bool = False

    @property
    def info(self) -> "Entry":
        """The policy's view of this entry: the entry itself (an :class:`EntryInfo`)."""
        return self

    @property
    def header(self) -> EntryHeader:
        """The entry's header, built from its fields on each access (for tier calls, off the hot path):
        not keeping an :class:`EntryHeader` object per entry is one GC-tracked object less each.  A single
        ``put`` of an int or str key leaves ``key_bytes`` None (see ``DataPaths.put``): it is encoded here,
        the first time the entry needs its header (a move to another tier, a flush), and kept."""
        key_bytes = self.key_bytes
        if key_bytes is None:
            key_bytes = self.key_bytes = encode_key(self.key)
        return EntryHeader(key_bytes, dtype_name(self.dtype), self.shape, self.nbytes, self.seq)


_DTYPE_NAMES: dict[Any, str] = {}


def dtype_name(dtype: Any) -> str:
    """The name an entry header gives ``dtype`` (``torch.float32`` -> ``"float32"``)."""
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = str(dtype).removeprefix("torch.")
    return name


# Queue items are plain tuples ``(rank, token)``: heap comparisons run in C (tokens are unique, so ranks
# that tie are ordered by push order), and a rank of ints or floats makes the item a tuple of atomic values,
# which Python's cyclic GC stops tracking: a queue of many entries adds no GC work per item.  The token
# maps to its entry through ``RankedQueue._owners``; the item is current while ``entry.version`` is
# still that token (``push`` sets it; bumping ``version`` anywhere makes every queued item stale).
_Item = tuple  # (rank: Any, token: int)

# One token sequence for every queue: an entry's latest token is the largest it ever had, so bumping its
# version past it can never make one of its older items (in any queue) current again.
_TOKENS = itertools.count(1)
_NBYTES = operator.attrgetter("nbytes")

# The compaction rule, in one place: a push that leaves a queue's heap with more than COMPACT_MIN_ITEMS items
# and more than COMPACT_RATIO items per live entry (plus COMPACT_RATIO) rebuilds it (``RankedQueue._compact``),
# so stale items never outnumber live ones by more than that factor and a heap never holds less than that
# minimum before it is compacted.  ``RankedQueue.push`` and the data paths' inlined pushes
# (``batched.DataPaths.put`` and ``_put_direct``) all test ``over_compaction_limit``'s expression with these
# two names.
COMPACT_MIN_ITEMS = 64
COMPACT_RATIO = 4


def over_compaction_limit(items: int, live: int) -> bool:
    """Whether a heap of ``items`` items for ``live`` entries is due for compaction (the rule above)."""
    return items > COMPACT_MIN_ITEMS and items > COMPACT_RATIO * (live + 1)


class RankedQueue:
    """Entries of one tier, smallest rank first.  Re-ranking pushes a new item; stale items are skipped
    when popped and compacted away when they outnumber live ones.

    An entry's place in the queue is its *key* ``(entry.queued_rank, entry.version)``: its rank, ties
    broken by the order of re-ranking (every re-rank takes a fresh token).  A re-rank that does not
    lower the rank may be *deferred* (:meth:`defer`, used by batched score updates): the entry takes its
    new key at once, but no item is pushed; the item it already has in the heap, whose key is smaller,
    stands in for it.  When a stand-in comes up (:meth:`pop_victims`) or the heap is compacted, the
    entry's current key is pushed in its place.  Nothing whose key lies between the stand-in's and the
    entry's can leave before that push, so entries leave in exactly the order eager pushes give."""

    def __init__(self, tier: int) -> None:
        self.tier = tier
        self._heap: list[_Item] = []
        self._owners: dict[int, Entry] = {}  # token -> the entry it was pushed for (current or stale)
        self._counter = _TOKENS
        self.live = 0  # entries living in this tier
        self.payload = 0  # their payload bytes

    def add(self, entry: Entry) -> None:
        """Count ``entry`` as living in this tier (rank it with ``push``)."""
        self.live += 1
        self.payload += entry.nbytes

    def remove(self, entry: Entry) -> None:
        """``entry`` left this tier; its queue items go stale (the caller bumps its version)."""
        self.live -= 1
        self.payload -= entry.nbytes
        entry.rank_deferred = False  # its stand-in must not be pushed back for it

    def push(self, entry: Entry, rank: Any) -> None:
        token = next(self._counter)
        entry.version = token
        entry.queued_rank = rank
        entry.rank_deferred = False
        self._owners[token] = entry
        heap = self._heap
        heapq.heappush(heap, (rank, token))
        if len(heap) > COMPACT_MIN_ITEMS and len(heap) > COMPACT_RATIO * (self.live + 1):  # over_compaction_limit
            self._compact()

    def defer(self, entry: Entry, rank: Any) -> None:
        """Re-rank ``entry`` at ``rank`` without a heap push (see the class doc).  Only for an entry that
        lives in this tier, is not ``moving`` (a mover took its item out of the heap) and has a
        ``queued_rank`` that ``rank`` is not below: its item in the heap is then a valid stand-in."""
        entry.version = next(self._counter)
        entry.queued_rank = rank
        entry.rank_deferred = True

    def _compact(self) -> None:
        """Rebuild the heap from the live entries' current keys (a deferred entry's key replaces its
        stand-in)."""
        owners, tier = self._owners, self.tier
        heap: list[_Item] = []
        kept: dict[int, Entry] = {}
        for item in self._heap:
            entry = owners.get(item[1])
            if entry is None or entry.level != tier:
                continue
            if entry.version != item[1]:
                if not entry.rank_deferred:
                    continue
                entry.rank_deferred = False
                item = (entry.queued_rank, entry.version)
            heap.append(item)
            kept[item[1]] = entry
        heapq.heapify(heap)
        self._heap, self._owners = heap, kept

    def load(self, ranks: list[Any], entries: list[Entry]) -> None:
        """Count and rank many entries at once (recovery), ``entries[i]`` at ``ranks[i]``: one heapify
        instead of a push per entry."""
        if not entries:
            return
        # Column-wise, with C-level maps (a reopen ranks 1e5 entries here): no bytecode per entry.
        tokens = list(itertools.islice(self._counter, len(entries)))
        setattr_ = setattr
        deque(map(setattr_, entries, repeat("version"), tokens), maxlen=0)
        deque(map(setattr_, entries, repeat("queued_rank"), ranks), maxlen=0)
        deque(map(setattr_, entries, repeat("rank_deferred"), repeat(False)), maxlen=0)
        self._owners.update(zip(tokens, entries))
        self._heap.extend(zip(ranks, tokens))
        self.live += len(entries)
        self.payload += sum(map(_NBYTES, entries))
        heapq.heapify(self._heap)

    def _current(self, item: _Item) -> bool:
        entry = self._owners.get(item[1])
        return entry is not None and entry.version == item[1] and entry.level == self.tier

    def pop_victims(
        self, index: dict[Hashable, Entry], need: int, rank: Callable[[Any], Any] | None = None
    ) -> list[Entry]:
        """Lowest-ranked entries of this tier that are live and not moving, until their charged bytes
        reach ``need`` (at least one if any is eligible).  Returned entries are removed from the queue.

        With ``rank`` (the policy's, when it re-ranks hits lazily: ranks only grow on access) an item
        whose queued rank is below the entry's current ``rank(entry.info)`` is re-queued at its current
        rank instead of being taken, so the victims are the entries of smallest current rank."""
        victims: list[Entry] = []
        skipped: list[tuple[_Item, Entry]] = []
        freed = 0
        heap, owners = self._heap, self._owners
        while heap and (freed < need or not victims):
            item = heapq.heappop(heap)
            token = item[1]
            entry = owners.pop(token, None)
            if entry is None or entry.level != self.tier or index.get(entry.key) is not entry:
                continue
            if entry.version != token:
                if entry.rank_deferred:  # a stand-in came up: queue the entry at its current key
                    entry.rank_deferred = False
                    owners[entry.version] = entry
                    heapq.heappush(heap, (entry.queued_rank, entry.version))
                continue
            if rank is not None:
                try:
                    now = rank(entry.info)
                except BaseException:  # the policy's rank raised: put back every item taken, then raise
                    skipped.append((item, entry))
                    skipped.extend(((victim.queued_rank, victim.version), victim) for victim in victims)
                    for taken, owner in skipped:
                        self._owners[taken[1]] = owner
                        heapq.heappush(self._heap, taken)
                    raise
                if now != item[0]:
                    self.push(entry, now)
                    heap, owners = self._heap, self._owners  # push may have compacted them
                    continue
            if entry.moving:
                skipped.append((item, entry))
                continue
            victims.append(entry)
            freed += entry.slot.charged
        for item, entry in skipped:
            self._owners[item[1]] = entry
            heapq.heappush(self._heap, item)
        return victims

    def ordered(self, index: dict[Hashable, Entry], rank: Callable[[Any], Any] | None = None) -> Iterator[Entry]:
        """Live entries of this tier in eviction order (a snapshot; does not consume the queue); with
        ``rank`` (lazy re-ranking, see ``pop_victims``) by their current rank."""
        seen: set[int] = set()
        owners, tier = self._owners, self.tier
        current: list[tuple[_Item, Entry]] = []
        for item in self._heap:
            entry = owners.get(item[1])
            if entry is None or entry.level != tier:
                continue
            if entry.version == item[1]:
                current.append((item, entry))
            elif entry.rank_deferred:  # its stand-in: the entry's place is its current key
                current.append(((entry.queued_rank, entry.version), entry))
        if rank is not None:
            current = [((rank(entry.info), item[1]), entry) for item, entry in current]
        current.sort(key=lambda pair: pair[0])
        for _, entry in current:
            if index.get(entry.key) is entry and id(entry) not in seen:
                seen.add(id(entry))
                yield entry


def rescore(entries: list[Entry | None], scores: list[float], rank: Callable[[Any], Any],
            queues: list[RankedQueue], names: list[str]) -> int:
    """Set ``entries[i].score = scores[i]`` and re-rank each entry (``None``: skipped); returns how many
    were updated.  Under the index lock.  A rank that did not drop is deferred (``RankedQueue.defer``):
    no heap push, same eviction order; a lower rank, or an entry being moved, is pushed as
    ``CacheState._rerank`` does.  ``names`` are the tiers' names by index.  If ``rank`` raises, the entries
    before the failing one stay updated, the failing one and those after it keep their scores and ranks,
    and the error propagates (every entry stays queued)."""
    updated = 0
    tokens = _TOKENS
    for entry, score in zip(entries, scores):
        if entry is None:
            continue
        previous, entry.score = entry.score, score
        try:
            new = rank(entry)
        except BaseException:  # the policy's rank raised: this entry keeps its score and its queue item
            entry.score = previous
            raise
        old = entry.queued_rank
        if entry.moving or old is None or new < old:
            entry.tier = names[entry.level]
            queues[entry.level].push(entry, new)
        else:  # RankedQueue.defer, inlined (this loop runs for thousands of keys per decode step)
            entry.version = next(tokens)
            entry.queued_rank = new
            entry.rank_deferred = True
        updated += 1
    return updated
