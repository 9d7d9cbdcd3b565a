"""Placement policies: which entry leaves a full tier first, and whether a hit is promoted.

A policy sees only metadata (:class:`EntryInfo`) — never tensors or files — and owns no metrics.  The
cache keeps, per tier, a priority queue ordered by ``policy.rank(info)`` and re-ranks an entry whenever
its info changes (access, score update, move).  ``rank`` must therefore be a pure function of the info
it is given (no clock reads, no hidden state): smaller ranks are evicted first.

A user-defined policy is one small class::

    class BiggestFirst:
        name = "biggest-first"
        def rank(self, info): return (-info.nbytes, info.last_access)
        def promote(self, info, src, dst): return True

Optional attribute ``rank_reads_access: bool`` (default True): whether ``rank`` reads ``last_access`` or
``hits``.  A policy whose rank ignores both (e.g. insertion order: ``rank = info.inserted``) sets it to
False, and the cache then skips re-ranking on every hit (the entry's info is still updated, so
``promote`` sees current hits).  Use :func:`reranks_on_access` to read it.

Optional attribute ``rank_grows_on_access: bool`` (default False): a hit can only *raise* the rank (it
reads ``last_access``/``hits`` only in ways that grow with them, like every built-in policy).  The cache
then re-ranks lazily: a hit only updates the info, and an entry whose queued rank is out of date is
re-queued when it comes up as a victim.  The victims chosen are the same as with a queue push per hit
(the entry with the smallest *current* rank leaves first), at one push per eviction instead of one per
hit.  Use :func:`reranks_lazily` to read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Hashable, Protocol, runtime_checkable

from .values import check_score


@dataclass(slots=True)
class EntryInfo:
    """Metadata a policy may use.  ``last_access`` and ``inserted`` are values of a logical clock that
    ticks once per cache operation (not wall time); ``hits`` counts gets; ``score`` is caller-supplied."""

    key: Hashable
    nbytes: int
    tier: str
    inserted: int
    last_access: int
    hits: int = 0
    score: float = 0.0


@runtime_checkable
class Policy(Protocol):
    name: str

    def rank(self, info: EntryInfo) -> Any:
        """Eviction order key: the entry with the smallest rank in a full tier is demoted first."""
        ...

    def promote(self, info: EntryInfo, src: str, dst: str) -> bool:
        """Whether an entry found in tier ``src`` by a get should move up to the faster tier ``dst``."""
        ...


def reranks_on_access(policy: object) -> bool:
    """Whether a hit can change ``policy``'s rank of an entry (its optional ``rank_reads_access``
    attribute; True when absent, the safe default)."""
    return bool(getattr(policy, "rank_reads_access", True))


def reranks_lazily(policy: object) -> bool:
    """Whether ``policy`` declares that a hit can only raise its rank (``rank_grows_on_access``), so the
    cache may re-rank hits lazily, when they come up as victims."""
    return bool(getattr(policy, "rank_grows_on_access", False))


class LRUPolicy:
    """Least recently used leaves first; every hit is promoted."""

    name = "lru"
    rank_grows_on_access = True

    def rank(self, info: EntryInfo) -> Any:
        return info.last_access

    def promote(self, info: EntryInfo, src: str, dst: str) -> bool:
        return True


class LFUPolicy:
    """Least frequently used leaves first (ties: least recent); promoted from the second hit on, so a
    single scan does not flush the fast tiers."""

    name = "lfu"
    rank_grows_on_access = True

    def rank(self, info: EntryInfo) -> Any:
        return (info.hits, info.last_access)

    def promote(self, info: EntryInfo, src: str, dst: str) -> bool:
        return info.hits >= 2


class ScorePolicy:
    """Lowest caller-supplied score leaves first (ties: least recent).  Scores come from
    ``Cache.put(..., score=)`` and ``Cache.update_scores``; e.g. the attention mass a KV block received.
    A hit is promoted when its score is at least ``promote_threshold``."""

    name = "score"
    rank_grows_on_access = True

    def __init__(self, promote_threshold: float = float("-inf")) -> None:
        """``promote_threshold``: a real number, as a score is (``TypeError`` otherwise, ``bool`` and strings
        included; ``ValueError`` for NaN, which no score reaches: nothing would ever be promoted)."""
        try:
            self.promote_threshold = check_score(promote_threshold)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"promote_threshold: {exc}".replace("score must", "must")) from None

    def rank(self, info: EntryInfo) -> Any:
        return (info.score, info.last_access)

    def promote(self, info: EntryInfo, src: str, dst: str) -> bool:
        return info.score >= self.promote_threshold


POLICIES: dict[str, type] = {"lru": LRUPolicy, "lfu": LFUPolicy, "score": ScorePolicy}


def make_policy(policy: str | Policy) -> Policy:
    """A policy from its name (``"lru"``, ``"lfu"``, ``"score"``) or a ready object (checked to have
    ``rank`` and ``promote``)."""
    if isinstance(policy, str):
        try:
            return POLICIES[policy.lower()]()
        except KeyError:
            raise ValueError(f"unknown policy {policy!r}; choose one of {sorted(POLICIES)} or pass a Policy") from None
    if not callable(getattr(policy, "rank", None)) or not callable(getattr(policy, "promote", None)):
        raise TypeError(f"policy must be a name or an object with rank() and promote(), got {policy!r}")
    return policy
