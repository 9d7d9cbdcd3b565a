import pytest

from tiercache.policies import EntryInfo, LFUPolicy, LRUPolicy, Policy, ScorePolicy, make_policy


def info(key, *, last_access=0, hits=0, score=0.0, nbytes=100, inserted=0):
    return EntryInfo(key, nbytes, "host", inserted, last_access, hits, score)


def victim_order(policy, infos):
    return [i.key for i in sorted(infos, key=policy.rank)]


def test_lru_evicts_least_recent_first_and_always_promotes():
    p = LRUPolicy()
    infos = [info("a", last_access=5), info("b", last_access=1), info("c", last_access=3, hits=100)]
    assert victim_order(p, infos) == ["b", "c", "a"]
    assert p.promote(info("a"), "disk", "host")


def test_lfu_evicts_least_hit_first_ties_by_recency_and_promotes_from_second_hit():
    p = LFUPolicy()
    infos = [info("a", hits=3, last_access=1), info("b", hits=1, last_access=9), info("c", hits=1, last_access=2)]
    assert victim_order(p, infos) == ["c", "b", "a"]
    assert not p.promote(info("x", hits=1), "disk", "host")
    assert p.promote(info("x", hits=2), "disk", "host")


def test_score_evicts_lowest_score_first_and_respects_threshold():
    p = ScorePolicy(promote_threshold=0.5)
    infos = [info("a", score=0.9, last_access=1), info("b", score=0.1, last_access=9), info("c", score=0.1, last_access=2)]
    assert victim_order(p, infos) == ["c", "b", "a"]
    assert p.promote(info("x", score=0.5), "disk", "host")
    assert not p.promote(info("x", score=0.49), "disk", "host")
    assert ScorePolicy().promote(info("x", score=-1e30), "disk", "host")


def test_rank_is_pure():
    for p in (LRUPolicy(), LFUPolicy(), ScorePolicy()):
        i = info("k", last_access=4, hits=2, score=0.3)
        assert p.rank(i) == p.rank(i)


@pytest.mark.parametrize(("name", "cls"), [("lru", LRUPolicy), ("LFU", LFUPolicy), ("score", ScorePolicy)])
def test_make_policy_by_name(name, cls):
    p = make_policy(name)
    assert isinstance(p, cls)
    assert isinstance(p, Policy)


def test_make_policy_accepts_a_custom_object_and_rejects_junk():
    class BiggestFirst:
        name = "biggest-first"

        def rank(self, i):
            return (-i.nbytes, i.last_access)

        def promote(self, i, src, dst):
            return True

    p = BiggestFirst()
    assert make_policy(p) is p
    assert isinstance(p, Policy)
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("mru")
    with pytest.raises(TypeError):
        make_policy(object())
    with pytest.raises(TypeError):
        make_policy(42)  # type: ignore[arg-type]


# -- lazy re-ranking of hits (rank_grows_on_access) -------------------------------------------------------
from hypothesis import given, settings, strategies as st  # noqa: E402

import torch  # noqa: E402

from tiercache import Cache  # noqa: E402
from tiercache.policies import reranks_lazily  # noqa: E402


def _eager(policy_cls):
    """The same policy, re-ranked by a queue push on every hit (the reference behaviour)."""
    return type(f"Eager{policy_cls.__name__}", (policy_cls,), {"rank_grows_on_access": False})


def test_builtin_policies_declare_that_hits_only_raise_their_rank():
    assert all(reranks_lazily(cls()) for cls in (LRUPolicy, LFUPolicy, ScorePolicy))
    assert not reranks_lazily(_eager(LRUPolicy)()) and not reranks_lazily(object())


_ops = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.integers(0, 11), st.integers(1, 3)),
        st.tuples(st.just("get"), st.integers(0, 11), st.just(0)),
        st.tuples(st.just("score"), st.integers(0, 11), st.integers(-3, 3)),
        st.tuples(st.just("delete"), st.integers(0, 11), st.just(0)),
    ),
    max_size=60,
)


@settings(max_examples=40, deadline=None)
@given(ops=_ops, which=st.sampled_from([LRUPolicy, LFUPolicy, ScorePolicy]))
def test_lazy_reranking_evicts_exactly_what_a_push_per_hit_evicts(ops, which):
    """Hits re-ranked when they come up as victims choose the same victims, in the same order, as a queue
    push per hit; the tier contents stay the same after every operation."""

    def run(policy):
        events = []
        with Cache(host=4 * 256, policy=policy, on_evict=lambda key, reason: events.append(key)) as cache:
            trace = []
            for op, key, arg in ops:
                if op == "put":
                    cache.put(key, torch.full((arg * 16,), key, dtype=torch.float32))
                elif op == "get" and key in cache:
                    cache.get(key)
                elif op == "score":
                    cache.update_scores({key: float(arg)})
                elif op == "delete":
                    cache.delete(key)
                trace.append(sorted(cache.keys()))
        return events, trace

    assert run(which()) == run(_eager(which)())
