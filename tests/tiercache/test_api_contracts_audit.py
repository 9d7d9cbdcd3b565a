"""Contracts found broken by the audit of the generic cache (session of 2026-12-07): a policy whose ``rank``
raises, ``close()`` from a policy's ``promote``, and the other edge cases probed.  Each test failed on the
tree before its fix."""

from __future__ import annotations

import random
import threading

import pytest
import torch

from tiercache import Cache

from .test_api_contracts_close import _in_thread

HANG = 20.0


class Flaky:
    """LRU-like policy whose ``rank`` raises ``PolicyBug`` while ``fail`` is on (``odds``: the probability
    of a raise per call, drawn from ``rng``).  ``lazy`` declares ``rank_grows_on_access`` (hits re-ranked
    when they come up as victims, in ``RankedQueue.pop_victims``); without it every hit re-ranks."""

    name = "flaky"

    def __init__(self, rng: random.Random | None = None, odds: float = 1.0, lazy: bool = False) -> None:
        self.rng = rng or random.Random(0)
        self.odds = odds
        self.fail = False
        self.raised = 0
        if lazy:
            self.rank_grows_on_access = True

    def rank(self, info):
        if self.fail and self.rng.random() < self.odds:
            self.raised += 1
            raise PolicyBug("policy bug")
        return info.last_access

    def promote(self, info, src, dst):
        return True


class PolicyBug(Exception):
    pass


def check_consistent(cache: Cache) -> None:
    """The bookkeeping of an idle cache: every indexed entry is queued in its tier's eviction queue (hence
    evictable), not marked moving, no slot is pinned or waits for a release, no operation is in flight, and
    each tier's counts and used bytes are its entries' (test-only peek at the internals)."""
    with cache._lock:
        assert cache._active == 0
        assert cache._pins == {} and cache._deferred == {}
        assert not cache._later and not cache._later_releases
        for level, (tier, queue) in enumerate(zip(cache._tiers, cache._queues)):
            entries = [e for e in cache._index.values() if e.level == level]
            queued = list(queue.ordered(cache._index))
            assert {id(e) for e in queued} == {id(e) for e in entries}, (
                f"{tier.name}: entries outside the eviction queue: "
                f"{sorted(e.key for e in entries if all(q is not e for q in queued))}")
            assert not any(e.moving for e in entries)
            assert queue.live == len(entries)
            assert queue.payload == sum(e.nbytes for e in entries)
            assert tier.used == sum(e.slot.charged for e in entries), tier.name


def _drain(cache: Cache, policy: Flaky, limit: int) -> None:
    """With the policy sound again: put fresh keys until every old entry was evicted (each is evictable)."""
    policy.fail = False
    old = set(cache.keys())
    for i in range(limit):
        cache.put(("fresh", i), torch.full((16,), float(i)))
        if not old & set(cache.keys()):
            break
    assert not old & set(cache.keys()), f"never evicted: {sorted(old & set(cache.keys()), key=repr)[:8]}"
    check_consistent(cache)


def _value(key: int, version: int) -> torch.Tensor:
    return torch.full((16,), float(key * 1000 + version))


def _random_ops(cache: Cache, policy: Flaky, rng: random.Random, steps: int) -> None:
    """Random puts / put_many / gets / get_many (into ``out=`` too) / deletes / update_scores / prefetches
    while the policy raises at random; after each, the cache is consistent and every key present holds one
    of the values a put of it was given (a failed put may or may not have landed)."""
    allowed: dict[int, list[torch.Tensor]] = {}
    version = 0
    for _ in range(steps):
        version += 1
        op = rng.choice(["put", "put", "put_many", "get", "get_many", "get_many_out", "delete", "scores",
                         "prefetch"])
        keys = [rng.randrange(24) for _ in range(rng.randrange(1, 5))]
        policy.fail = rng.random() < 0.5
        try:
            if op == "put":
                value = _value(keys[0], version)
                allowed.setdefault(keys[0], []).append(value)
                cache.put(keys[0], value)
            elif op == "put_many":
                items = [(k, _value(k, version)) for k in dict.fromkeys(keys)]
                for k, v in items:
                    allowed.setdefault(k, []).append(v)
                cache.put_many(items)
            elif op in ("get", "get_many", "get_many_out"):
                present = [k for k in keys if k in cache]
                if present:
                    if op == "get":
                        got = [cache.get(present[0])]
                        present = present[:1]
                    elif op == "get_many":
                        got = cache.get_many(present)
                    else:
                        got = cache.get_many(present, out=[torch.empty(16) for _ in present])
                    for k, v in zip(present, got):
                        assert any(torch.equal(v, a) for a in allowed[k]), (k, v)
            elif op == "delete":
                cache.delete(keys[0])
            elif op == "scores":
                cache.update_scores({k: rng.random() for k in keys})
            else:
                cache.prefetch(keys).result(HANG)
        except PolicyBug:
            pass
        except KeyError:  # a get_many of a key evicted meanwhile by a promotion's demotions: not with one thread
            raise
        policy.fail = False
        check_consistent(cache)
        for k in cache.keys():
            assert any(torch.equal(cache.get(k), a) for a in allowed[k]), k


@pytest.mark.parametrize("lazy", [False, True], ids=["rerank-hits", "lazy-rank"])
@pytest.mark.parametrize("seed", range(4))
def test_a_policy_whose_rank_raises_at_random_never_leaves_an_entry_unevictable(seed, lazy):
    """Every path that ranks (put, demotion, promotion, a victim handed back, a prefetch's touch, a hit,
    update_scores, the lazy re-rank of a victim) with a policy that raises at random: the error reaches the
    caller and the cache stays consistent, every entry evictable.  Before the fix a raise while a victim was
    re-ranked in ``pop_victims`` lost the items taken so far, and one in ``_rerank`` (a move, a hand-back, a
    promotion that found no room) left the entry, or the victims after it, outside every queue and pinned."""
    rng = random.Random(seed)
    policy = Flaky(random.Random(seed + 100), odds=0.3, lazy=lazy)
    with Cache(host=1024, tiers=None, policy=policy) as cache:  # 4 slots of 64 bytes
        _random_ops(cache, policy, rng, 300)
        _drain(cache, policy, 64)
    assert policy.raised


def _two_tier(policy):
    from tiercache.tiers.memory import ArenaTier

    return Cache(tiers=[ArenaTier("fast", 512), ArenaTier("slow", 1024)], policy=policy)


@pytest.mark.parametrize("lazy", [False, True], ids=["rerank-hits", "lazy-rank"])
@pytest.mark.parametrize("seed", range(4))
def test_a_policy_whose_rank_raises_at_random_in_a_two_tier_cache(seed, lazy):
    """The same with demotions and promotions between two memory tiers (the moves)."""
    rng = random.Random(seed)
    policy = Flaky(random.Random(seed + 200), odds=0.3, lazy=lazy)
    with _two_tier(policy) as cache:
        _random_ops(cache, policy, rng, 300)
        _drain(cache, policy, 64)
    assert policy.raised


def test_a_rank_that_raises_while_a_victim_is_re_ranked_lazily_puts_every_item_back():
    """``pop_victims`` re-ranks a victim whose queued rank is out of date (lazy policies); a raise there
    dropped the items it had taken (victims chosen so far and the item being re-ranked): those entries were
    in no queue any more."""
    policy = Flaky(lazy=True)
    with _two_tier(policy) as cache:
        for i in range(2):
            cache.put(i, torch.zeros(64))  # 256 bytes each: the fast tier is full
        cache.get(0)  # a hit: 0's queued rank is out of date
        policy.fail = True
        with pytest.raises(PolicyBug):
            cache.put(2, torch.zeros(64))
        policy.fail = False
        check_consistent(cache)
        assert sorted(cache.keys()) == [0, 1]


def test_a_rank_that_raises_when_a_move_publishes_keeps_the_entry_evictable():
    """A demotion re-ranks the moved entry in its new tier; a raise there (``_rerank``) left it outside every
    queue (never evictable again) and its source slot unreleased."""
    calls = []

    class FailsInSlow(Flaky):
        def rank(self, info):
            calls.append(info.tier)
            if self.fail and info.tier == "slow":
                raise PolicyBug("policy bug")
            return info.last_access

    policy = FailsInSlow()
    with _two_tier(policy) as cache:
        cache.put(0, torch.zeros(64))
        cache.put(1, torch.zeros(64))
        policy.fail = True
        with pytest.raises(PolicyBug):
            cache.put(2, torch.zeros(64))  # demotes 0 to "slow", where ranking it raises
        policy.fail = False
        check_consistent(cache)
        assert cache.tier_of(0) == "slow"
        _drain(cache, policy, 32)


def test_update_scores_whose_rank_raises_keeps_the_failing_entry_as_it_was():
    policy = Flaky()
    with Cache(host=1024, policy=policy) as cache:
        cache.put("a", torch.zeros(4))
        policy.fail = True
        with pytest.raises(PolicyBug):
            cache.update_scores({"a": 5.0})
        policy.fail = False
        assert cache._index["a"].score == 0.0  # its queued rank was computed from this score
        check_consistent(cache)


def test_a_rank_that_raises_in_a_put_many_of_small_values_stores_a_prefix_and_leaves_the_rest_out():
    """``_put_direct`` (small CPU values into a CPU arena) linked each entry, then ranked it: a raise left that
    entry indexed but unqueued, and the batch's seq, clock, counters and replaced slots unaccounted."""
    policy = Flaky()
    with Cache(host=1024, policy=policy) as cache:
        cache.put(1, torch.zeros(4))
        calls = []
        real = Flaky.rank

        def rank(self, info):
            calls.append(info.key)
            if len(calls) == 2:
                raise PolicyBug("policy bug")
            return real(self, info)

        policy.rank = rank.__get__(policy)
        with pytest.raises(PolicyBug):
            cache.put_many([(0, torch.ones(4)), (1, torch.ones(4)), (2, torch.ones(4))])
        del policy.rank
        assert sorted(cache.keys()) == [0, 1] and torch.equal(cache.get(1), torch.zeros(4))
        assert cache.stats()["puts"] == 2
        check_consistent(cache)
        _drain(cache, policy, 32)


@pytest.mark.parametrize("read", ["get", "get_many"])
def test_a_rank_that_raises_on_a_hit_leaves_the_entry_queued_and_nothing_pinned(read):
    """A policy that re-ranks every hit: the hit's version was bumped before ``rank`` ran, so a raise left the
    entry in no queue; in ``get_many`` the keys pinned before it stayed pinned for good."""
    policy = Flaky()
    with _two_tier(policy) as cache:
        for i in range(4):
            cache.put(i, torch.full((64,), float(i)))  # 256 bytes: 0 and 1 demoted to "slow"
        policy.fail = True
        with pytest.raises(PolicyBug):
            cache.get(3) if read == "get" else cache.get_many([0, 3])
        policy.fail = False
        check_consistent(cache)
        _drain(cache, policy, 32)


def test_a_demotion_whose_room_making_below_fails_hands_its_victim_back():
    """Three tiers; making room in the middle one demotes its victim to the last, whose write fails (I/O).
    The error reached the put, but the first tier's victim, waiting for that room, stayed marked moving and
    pinned: never a victim again, its slot never released (``_demote`` did not hand it back)."""
    from tiercache.tiers.memory import ArenaTier

    class Broken(ArenaTier):
        broken = False

        def write(self, slot, data, header):
            if self.broken:
                raise OSError(5, "injected write failure")
            return super().write(slot, data, header)

    last = Broken("c", 1024)
    with Cache(tiers=[ArenaTier("a", 256), ArenaTier("b", 256), last]) as cache:
        cache.put(0, torch.zeros(64))
        cache.put(1, torch.zeros(64))  # 0 demoted to b
        last.broken = True
        with pytest.raises(OSError, match="injected"):
            cache.put(2, torch.zeros(64))  # 1 -> b needs 0 -> c, which fails
        last.broken = False
        check_consistent(cache)
        assert cache.tiers_of([0, 1]) == ["b", "a"]
        cache.put(2, torch.zeros(64))
        assert cache.tiers_of([0, 1, 2]) == ["c", "b", "a"]
        check_consistent(cache)


# -- close() from a policy's promote or a tier's method -----------------------------------------------------

CLOSE_HANG = 10.0  # (these return in milliseconds once fixed; unfixed, each one hangs a daemon thread this long)


class ClosingPromote:
    name = "closing-promote"

    def __init__(self, box):
        self.box, self.seen = box, []

    def rank(self, info):
        return info.last_access

    def promote(self, info, src, dst):
        try:
            self.box[0].close()
            self.seen.append("returned")
        except RuntimeError as exc:
            self.seen.append(str(exc))
        return True


@pytest.mark.parametrize("read", ["get", "get_many", "get_many_out", "disk_get"])
def test_close_from_a_policy_promote_raises_instead_of_hanging(tmp_path, read):
    from tiercache.tiers.memory import ArenaTier

    box: list = []
    policy = ClosingPromote(box)

    def scenario():
        if read == "disk_get":
            cache = Cache(host=256, disk="64KiB", path=tmp_path / "s", policy=policy)
        else:
            cache = Cache(tiers=[ArenaTier("a", 256), ArenaTier("b", 1024)], policy=policy)
        box.append(cache)
        cache.put(0, torch.zeros(64))
        cache.put(1, torch.ones(64))  # 0 demoted
        if read in ("get", "disk_get"):
            value = cache.get(0)
        elif read == "get_many":
            value = cache.get_many([0])[0]
        else:
            value = cache.get_many([0], out=[torch.empty(64)])[0]
        assert torch.equal(value, torch.zeros(64))
        assert 0 in cache and 1 in cache  # still open
        cache.close()
        return cache.stats()["closed"]

    thread, out = _in_thread(scenario)
    thread.join(CLOSE_HANG)
    assert not thread.is_alive(), f"close() from promote during {read} hung"
    assert out.get("value") is True, out
    assert policy.seen and all("promote" in text for text in policy.seen), policy.seen


def test_close_from_a_tier_write_run_by_a_put_raises_instead_of_hanging():
    """A tier's ``write`` during a put's demotion calling close()."""
    from tiercache.tiers.memory import ArenaTier

    box: list = []
    seen: list = []

    class Closing(ArenaTier):
        armed = False

        def write(self, slot, data, header):
            if self.armed:
                self.armed = False
                try:
                    box[0].close()
                    seen.append("returned")
                except RuntimeError as exc:
                    seen.append(str(exc))
            return super().write(slot, data, header)

    slow = Closing("b", 1024)

    def scenario():
        cache = Cache(tiers=[ArenaTier("a", 256), slow])
        box.append(cache)
        cache.put(0, torch.zeros(64))
        slow.armed = True
        cache.put(1, torch.ones(64))  # demotes 0: written to the slow tier
        assert cache.tiers_of([0, 1]) == ["b", "a"]
        value = cache.get(0)
        cache.close()
        return torch.equal(value, torch.zeros(64))

    thread, out = _in_thread(scenario)
    thread.join(CLOSE_HANG)
    assert not thread.is_alive(), "close() from a tier write hung"
    assert out.get("value") is True, out
    assert seen and "tier" in seen[0], seen


def test_close_from_promote_while_another_thread_closes_raises_instead_of_deadlocking(tmp_path):
    """Thread A's close() waits for B's get; B's promote calls close(), which waited for A's: a deadlock."""
    from tiercache.tiers.memory import ArenaTier

    box: list = []
    entered, go = threading.Event(), threading.Event()

    class Blocking(ClosingPromote):
        def promote(self, info, src, dst):
            entered.set()
            go.wait(HANG)
            return super().promote(info, src, dst)

    policy = Blocking(box)
    cache = Cache(tiers=[ArenaTier("a", 256), ArenaTier("b", 1024)], policy=policy)
    box.append(cache)
    cache.put(0, torch.zeros(64))
    cache.put(1, torch.ones(64))
    reader, got = _in_thread(lambda: cache.get(0))
    assert entered.wait(HANG)
    closer, closed = _in_thread(cache.close)
    deadline = threading.Event()
    while not cache._closing and not deadline.wait(0.01):  # until A's close() waits for B's get
        pass
    go.set()
    reader.join(CLOSE_HANG)
    closer.join(CLOSE_HANG)
    assert not reader.is_alive() and not closer.is_alive(), "deadlock"
    assert torch.equal(got["value"], torch.zeros(64)) and "value" in closed, (got, closed)
    assert policy.seen and "promote" in policy.seen[0]
    assert cache.stats()["closed"]


def test_close_from_another_cache_s_promote_is_not_refused():
    """The check is per cache: a promote of cache A may close cache B."""
    from tiercache.tiers.memory import ArenaTier

    other = Cache(host=1024)
    other.put("x", torch.ones(4))
    box = [other]
    policy = ClosingPromote(box)
    with Cache(tiers=[ArenaTier("a", 256), ArenaTier("b", 1024)], policy=policy) as cache:
        cache.put(0, torch.zeros(64))
        cache.put(1, torch.ones(64))
        assert torch.equal(cache.get(0), torch.zeros(64))
    assert policy.seen == ["returned"] and other.stats()["closed"]


def test_a_put_many_whose_rank_raises_releases_the_disk_slots_it_replaced(tmp_path):
    """Item 0 of a put_many replaces a value held on the disk tier, ranking item 1 raises: the replaced disk
    slot was left in the shared release list, allocated and its file kept (a reopen could bring the replaced
    value back once the new one was not persisted)."""
    policy = Flaky()
    with Cache(host=1024, disk="64KiB", path=tmp_path / "s", policy=policy) as cache:
        for i in range(5):
            cache.put(i, torch.full((64,), float(i)))  # 256 bytes each: 0 demoted to the disk tier
        assert cache.tier_of(0) == "disk"
        cache.delete_many([1, 2])  # room in the host tier for both: the direct path stores them
        calls = []
        real = Flaky.rank

        def rank(self, info):
            calls.append(info.key)
            if info.key == "x":
                raise PolicyBug("policy bug")
            return real(self, info)

        policy.rank = rank.__get__(policy)
        with pytest.raises(PolicyBug):
            cache.put_many([(0, torch.full((16,), 9.0)), ("x", torch.ones(16))])
        del policy.rank
        assert cache.tier_of(0) == "host" and torch.equal(cache.get(0), torch.full((16,), 9.0))
        assert "x" not in cache
        check_consistent(cache)
