"""Batched score updates: ``update_scores`` checks every score in one pass and defers the re-rank of an
entry whose rank did not drop (``RankedQueue.defer``).  The reference is the per-key path it replaced:
check each score, set it, push a queue item (``CacheState._rerank``)."""

import math
import tempfile

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from tiercache import Cache
from tiercache.index import Entry, RankedQueue
from tiercache.policies import LRUPolicy, ScorePolicy
from tiercache.values import check_score, check_scores


class EagerCache(Cache):
    """``update_scores`` as it was: one ``check_score`` and one queue push per key."""

    def _update_scores_impl(self, scores):
        checked = {key: check_score(score) for key, score in scores.items()}
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


class ScoreThenInserted:
    """The attention-aware placement's rank (``tiercache_llm.policies.AttentionPlacementPolicy``)."""

    name = "score-then-inserted"
    rank_reads_access = False

    def rank(self, info):
        return (info.score, info.inserted)

    def promote(self, info, src, dst):
        return info.score > 0.0


class ScoreOnly:
    """Ranks that tie (no tie-break field): the order among equal scores is the order of re-ranking."""

    name = "score-only"
    rank_reads_access = False

    def rank(self, info):
        return info.score

    def promote(self, info, src, dst):
        return True


class HighestScoreFirst:
    """A rank that *drops* when the score grows: every such update must push."""

    name = "highest-first"

    def rank(self, info):
        return (-info.score, info.last_access)

    def promote(self, info, src, dst):
        return info.hits >= 2


POLICIES = [ScoreThenInserted, ScoreOnly, HighestScoreFirst, ScorePolicy, LRUPolicy]

_ops = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.integers(0, 9), st.integers(0, 3)),
        st.tuples(st.just("get"), st.integers(0, 9), st.just(0)),
        st.tuples(st.just("scores"), st.lists(st.tuples(st.integers(0, 10), st.integers(-2, 4)), max_size=6),
                  st.just(0)),
        st.tuples(st.just("delete"), st.integers(0, 9), st.just(0)),
    ),
    max_size=50,
)


def _drain(queue, index, rank):
    """The keys ``queue.pop_victims`` gives up one by one until it is empty; the queue and its entries
    are restored afterwards."""
    heap, owners = list(queue._heap), dict(queue._owners)
    saved = [(e, e.version, e.queued_rank, e.rank_deferred) for e in index.values()]
    order = []
    while victims := queue.pop_victims(index, 1, rank):
        order += [v.key for v in victims]
    queue._heap, queue._owners = heap, owners
    for e, version, queued_rank, deferred in saved:
        e.version, e.queued_rank, e.rank_deferred = version, queued_rank, deferred
    return order


def _run(cls, policy, ops, with_disk):
    events = []
    with tempfile.TemporaryDirectory() as path:
        opts = dict(disk=6 * 1024, path=path) if with_disk else {}
        with cls(host=3 * 256, policy=policy, on_evict=lambda key, reason: events.append((key, reason)),
                 **opts) as cache:
            trace = []
            for op, key, arg in ops:
                if op == "put":
                    cache.put(key, torch.full((64,), key, dtype=torch.float32), score=float(arg) if arg else None)
                    result = None
                elif op == "get":
                    result = cache.get(key)[0].item() if key in cache else None
                elif op == "scores":
                    result = cache.update_scores({k: float(s) for k, s in key})
                else:
                    result = cache.delete(key)
                # after every operation: where each key lives, and the order in which every tier's queue
                # gives up its entries (as listed, and as popped)
                order = [[e.key for e in q.ordered(cache._index, cache._lazy_rank)] for q in cache._queues]
                popped = [_drain(q, cache._index, cache._lazy_rank) for q in cache._queues]
                trace.append((result, order, popped, {k: cache.tier_of(k) for k in cache.keys()}))
        return events, trace


@settings(max_examples=60, deadline=None)
@given(ops=_ops, which=st.sampled_from(POLICIES), with_disk=st.booleans())
def test_batched_update_scores_equals_a_push_per_key(ops, which, with_disk):
    """Same results, same victims in the same order (demotions and drops), same eviction order of every
    tier after every operation, whether the re-rank of a score update was deferred or pushed."""
    assert _run(Cache, which(), ops, with_disk) == _run(EagerCache, which(), ops, with_disk)


def test_a_deferred_rerank_keeps_push_order_among_equal_ranks():
    """Three entries tie at score 1; re-scoring the first to 1 again (deferred: its rank did not drop)
    moves it behind the others, exactly as a push would."""
    for cls in (Cache, EagerCache):
        dropped = []
        with cls(host=3 * 256, policy=ScoreOnly(), on_evict=lambda k, r: dropped.append(k)) as cache:
            for key in "abc":
                cache.put(key, torch.zeros(64), score=1.0)
            cache.update_scores({"a": 1.0})
            cache.put("d", torch.zeros(64), score=5.0)
            cache.put("e", torch.zeros(64), score=5.0)
            assert dropped == ["b", "c"], cls


def test_update_scores_defers_rising_ranks_and_pushes_falling_ones():
    with Cache(host=8 * 256, policy=ScoreThenInserted()) as cache:
        for key in range(4):
            cache.put(key, torch.zeros(64))
        queue = cache._queues[0]
        heap_before = len(queue._heap)
        assert cache.update_scores({0: 3.0, 1: 2.0, "absent": 1.0}) == 2
        assert len(queue._heap) == heap_before  # rising: no push
        assert cache._index[0].rank_deferred and cache._index[1].rank_deferred
        assert [e.key for e in queue.ordered(cache._index)] == [2, 3, 1, 0]
        assert cache.update_scores({0: -1.0}) == 1  # falling: pushed
        assert len(queue._heap) == heap_before + 1 and not cache._index[0].rank_deferred
        assert [e.key for e in queue.ordered(cache._index)] == [0, 2, 3, 1]


def _ranked(n: int) -> tuple[RankedQueue, list[Entry], dict]:
    """A queue of ``n`` entries ranked (score 0, insertion order), the entries and their index."""
    queue = RankedQueue(0)
    entries = [Entry(k, 10, "host", k, k, 0, 0.0, slot=_Slot(), level=0) for k in range(n)]
    for e in entries:
        queue.add(e)
        queue.push(e, (0.0, e.inserted))
    return queue, entries, {e.key: e for e in entries}


def test_pop_victims_takes_a_deferred_entry_at_its_new_key():
    queue, entries, index = _ranked(3)
    queue.defer(entries[0], (5.0, 0))  # 0 rises past 1 and 2
    assert [v.key for v in queue.pop_victims(index, 10)] == [1]
    assert [v.key for v in queue.pop_victims(index, 10)] == [2]
    assert [v.key for v in queue.pop_victims(index, 10)] == [0]
    assert queue.pop_victims(index, 10) == []


def test_compaction_keeps_deferred_entries_at_their_new_key():
    queue, entries, index = _ranked(4)
    queue.defer(entries[1], (9.0, 1))
    for _ in range(200):  # stale items of 3 pile up until the heap is compacted
        queue.push(entries[3], (1.0, 3))
    assert len(queue._heap) < 200
    assert not entries[1].rank_deferred  # its key was pushed by the compaction
    assert [e.key for e in queue.ordered(index)] == [0, 2, 3, 1]
    assert [v.key for v in queue.pop_victims(index, 40)] == [0, 2, 3, 1]


class _Slot:
    charged = 10


@pytest.mark.parametrize("scores", [[1.0, 2.5, -3.0], [], [math.inf, -math.inf, 0.0], [1, 2.0, 3], [1e308, 1e308]])
def test_check_scores_returns_floats_like_check_score(scores):
    out = check_scores(list(scores))
    assert out == [check_score(s) for s in scores] and all(type(s) is float for s in out)


@pytest.mark.parametrize(("scores", "error"), [
    ([1.0, math.nan], ValueError), ([1.0, True], TypeError), (["1.0"], TypeError), ([1.0, None], TypeError),
])
def test_check_scores_refuses_what_check_score_refuses(scores, error):
    with pytest.raises(error):
        check_scores(scores)


def test_update_scores_applies_nothing_when_one_score_is_bad():
    with Cache(host=8 * 256, policy="score") as cache:
        cache.put("a", torch.zeros(64), score=1.0)
        with pytest.raises(ValueError, match="NaN"):
            cache.update_scores({"a": 5.0, "b": math.nan})
        assert cache._index["a"].score == 1.0


@pytest.mark.parametrize("score", [np.float32(2.5), np.float64(2.5), np.int64(2), np.int8(-3), torch.tensor(2.5),
                                   torch.tensor(7, dtype=torch.int16), torch.tensor(1.5, dtype=torch.bfloat16)])
def test_real_number_scores_of_other_types_are_taken_as_floats(score):
    assert check_score(score) == float(score) and type(check_score(score)) is float
    with Cache(host=8 * 256, policy="score") as cache:
        cache.put("a", torch.zeros(8), score=score)
        assert cache.update_scores({"a": score}) == 1


@pytest.mark.parametrize("score", [np.bool_(True), torch.tensor(True), torch.tensor([1.0]), torch.tensor(1 + 2j),
                                   1 + 2j, "1.0", None])
def test_non_real_scores_are_refused(score):
    with pytest.raises(TypeError, match="score must be a number"):
        check_score(score)


@pytest.mark.parametrize("score", [np.float32("nan"), torch.tensor(float("nan"))])
def test_nan_scores_of_other_types_are_refused(score):
    with pytest.raises(ValueError, match="NaN"):
        check_score(score)
