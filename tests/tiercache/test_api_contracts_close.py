"""Contracts of ``close()`` under concurrency and re-entrancy, and the edge cases found auditing the API
(docs/api.md).  Each test failed on the tree before its fix."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from tiercache import Cache

HANG = 20.0  # seconds after which a call that should have returned is taken for a hang


def _in_thread(fn):
    """Run ``fn`` on a daemon thread; returns (thread, result dict with "value" or "error")."""
    out: dict = {}

    def body():
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out["error"] = exc

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread, out


def _until_waiting(cache):
    """Until a close() is blocked waiting for the one in progress (on the cache's condition; test-only peek)."""
    deadline = time.monotonic() + HANG
    while not cache._idle._waiters:
        assert time.monotonic() < deadline, "the second close() never waited"
        time.sleep(0.01)


def _disk_cache(tmp_path, on_evict, entries=8):
    """A cache whose memory holds ``entries`` 4 KiB values and whose disk tier holds 3 of them, so that
    ``flush()``/``close()`` report the rest to ``on_evict``."""
    with Cache(host=None, disk="1MiB", path=tmp_path / "probe") as probe:
        charge = probe.charge(4096)
    cache = Cache(host="64KiB", disk=3 * charge, path=tmp_path / "s", on_evict=on_evict)
    for i in range(entries):
        cache.put(i, torch.full((1024,), float(i)))
    return cache


def _cache_whose_close_holds(tmp_path):
    """A :func:`_disk_cache` whose ``close()`` sets ``persisting`` once it reports its first entry and then
    holds until ``release`` is set; returns (cache, persisting, release)."""
    persisting, release = threading.Event(), threading.Event()

    def on_evict(key, reason):
        if reason == "close":
            persisting.set()
            release.wait(HANG)

    return _disk_cache(tmp_path, on_evict), persisting, release


# -- 1. a second close() waits for the first ------------------------------------------------------------
def test_a_concurrent_close_waits_for_the_close_in_progress(tmp_path):
    """A close() called while another thread's close() was still persisting returned at once: its caller
    then found the cache not closed yet and the path still locked."""
    cache, persisting, release = _cache_whose_close_holds(tmp_path)
    first, first_out = _in_thread(cache.close)
    assert persisting.wait(HANG)
    second, second_out = _in_thread(cache.close)
    second.join(0.5)
    assert second.is_alive(), "the second close() returned while the first was still persisting"
    release.set()
    second.join(HANG)
    first.join(HANG)
    assert not second.is_alive() and not first.is_alive()
    assert "error" not in second_out and "error" not in first_out
    assert cache.stats()["closed"]
    with Cache(host="64KiB", disk="1MiB", path=tmp_path / "s") as again:  # the path lock is released
        assert len(again) == 3


def test_a_close_that_waited_raises_the_failure_of_the_close_it_waited_for(tmp_path):
    cache, persisting, release = _cache_whose_close_holds(tmp_path)
    disk = cache.tiers[-1]
    real_close = disk.close

    def failing_close():
        real_close()
        raise OSError(5, "sync failed")

    disk.close = failing_close
    first, first_out = _in_thread(cache.close)
    assert persisting.wait(HANG)
    second, second_out = _in_thread(cache.close)
    _until_waiting(cache)
    release.set()
    first.join(HANG)
    second.join(HANG)
    assert isinstance(first_out.get("error"), OSError)
    assert second_out.get("error") is first_out["error"]
    cache.close()  # a close() after the failed one has finished: returns (idempotent)
    assert cache.stats()["closed"]


def test_close_closes_every_tier_and_releases_the_path_even_when_a_tier_close_fails(tmp_path):
    """A tier whose close() raised left the tiers after it open and the path locked: the store could not be
    reopened in this process."""
    cache = Cache(host="64KiB", disk="1MiB", path=tmp_path / "s")
    cache.put("a", torch.ones(16))

    def boom():
        raise OSError(5, "host tier close failed")

    cache.tiers[0].close = boom
    with pytest.raises(OSError, match="host tier close failed"):
        cache.close()
    assert cache.stats()["closed"]
    with Cache(host="64KiB", disk="1MiB", path=tmp_path / "s") as again:
        assert torch.equal(again.get("a"), torch.ones(16))


# -- 2. close() (and other calls) from inside on_evict --------------------------------------------------
def _record(cache_box, op, seen):
    def on_evict(key, reason):
        try:
            seen.append((reason, "ok", op(cache_box[0], key)))
        except BaseException as exc:  # noqa: BLE001
            seen.append((reason, type(exc).__name__, str(exc)))
    return on_evict


@pytest.mark.parametrize("trigger", ["put", "flush", "close"])
def test_close_from_on_evict_raises_instead_of_hanging(tmp_path, trigger):
    """close() from on_evict waited for the operation running the callback (put, flush) and hung; from a
    callback run by close() itself it returned at once, with the cache not closed yet."""
    box, seen = [], []
    on_evict = _record(box, lambda cache, key: cache.close(), seen)

    def scenario():
        if trigger == "put":
            cache = Cache(host=1024, on_evict=on_evict)
            box.append(cache)
            for i in range(8):
                cache.put(i, torch.zeros(64))
            assert len(cache) == 4  # still open: the callback's close() changed nothing
        else:
            cache = _disk_cache(tmp_path, on_evict)
            box.append(cache)
            cache.flush() if trigger == "flush" else cache.close()
        cache.close()
        return cache.stats()["closed"]

    thread, out = _in_thread(scenario)
    thread.join(HANG)
    assert not thread.is_alive(), f"close() from on_evict during {trigger} hung"
    assert out.get("value") is True, out
    assert seen and all(kind == "RuntimeError" and "on_evict" in text for _, kind, text in seen), seen


OPS = {
    "put": lambda cache, key: cache.put("again", torch.ones(64)),
    "get": lambda cache, key: [cache.get(k).shape for k in cache.keys()[:1]],
    "delete": lambda cache, key: [cache.delete(k) for k in cache.keys()[:1]],
    "flush": lambda cache, key: cache.flush(),
    "prefetch": lambda cache, key: cache.prefetch(cache.keys()).result(timeout=HANG),
    "get_many": lambda cache, key: len(cache.get_many(cache.keys())),
}


@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("trigger", ["put", "flush", "close"])
def test_other_calls_from_on_evict_work_or_raise_clearly(tmp_path, trigger, op):
    """The cache's own calls from on_evict never hang: inside an operation they work; inside close() they
    raise CacheClosedError."""
    box, seen = [], []
    on_evict = _record(box, OPS[op], seen)

    def scenario():
        if trigger == "put":
            cache = Cache(host=1024, on_evict=on_evict)
            box.append(cache)
            for i in range(8):
                cache.put(i, torch.zeros(64))
        else:
            cache = _disk_cache(tmp_path, on_evict)
            box.append(cache)
            if trigger == "flush":
                cache.flush()
        cache.close()
        return True

    thread, out = _in_thread(scenario)
    thread.join(HANG)
    assert not thread.is_alive(), f"{op} from on_evict during {trigger} hung"
    assert out.get("value") is True, out
    reason = {"put": "capacity"}.get(trigger, trigger)
    mine = [item for item in seen if item[0] == reason]  # (not those of a later close or of the callback's puts)
    assert mine
    expected = "CacheClosedError" if trigger == "close" else "ok"
    assert all(kind == expected for _, kind, _ in mine), mine


def test_close_from_a_prefetch_done_callback_raises_and_leaves_the_cache_open(tmp_path):
    """A prefetch future's done callback runs on the cache's I/O pool thread; close() there tried to join
    its own thread and failed half way, leaving a cache that refused every call but was never closed
    (nothing persisted, the path still locked)."""
    cache = Cache(host="64KiB", disk="1MiB", path=tmp_path / "s", io_threads=1)
    cache.put("a", torch.ones(16))
    called, seen = threading.Event(), []

    def done(_future):
        try:
            cache.close()
            seen.append("returned")
        except RuntimeError as exc:
            seen.append(str(exc))
        called.set()

    release = threading.Event()
    cache.prefetch([]).result(HANG)  # makes the pool (io_threads=1: one thread)
    cache._executor.submit(release.wait, HANG)  # keeps that thread busy until the callback is attached
    future = cache.prefetch(["a"])
    future.add_done_callback(done)  # pending: it runs on the pool's thread
    release.set()
    assert called.wait(HANG)
    assert "prefetch pool" in seen[0]
    assert "a" in cache  # still open
    cache.close()
    assert cache.stats()["closed"]
    with Cache(host="64KiB", disk="1MiB", path=tmp_path / "s") as again:
        assert "a" in again


def test_close_from_a_policy_rank_raises_instead_of_hanging():
    box: list = []

    class Closing:
        name = "closing"
        fired = []

        def rank(self, info):
            if box and not self.fired:
                self.fired.append(True)
                try:
                    box[0].close()
                except RuntimeError as exc:
                    self.fired.append(str(exc))
            return info.last_access

        def promote(self, info, src, dst):
            return False

    policy = Closing()
    cache = Cache(host="4KiB", policy=policy)
    box.append(cache)

    def scenario():
        cache.put("a", torch.ones(4))
        return "a" in cache

    thread, out = _in_thread(scenario)
    thread.join(HANG)
    assert not thread.is_alive() and out.get("value") is True, out
    assert "index lock" in policy.fired[1]
    cache.close()


# -- 4. audit --------------------------------------------------------------------------------------------
def test_direct_io_without_a_disk_tier_is_refused_as_compression_is():
    """direct_io=True without a disk tier was accepted and changed nothing (compression was refused)."""
    with pytest.raises(ValueError, match="direct_io applies to the disk tier"):
        Cache(host="1MiB", direct_io=True)
    Cache(host="1MiB", direct_io=False).close()


@pytest.mark.parametrize("threshold, error", [("0.5", TypeError), (True, TypeError), (None, TypeError),
                                              (float("nan"), ValueError)])
def test_score_policy_threshold_is_checked_when_made(threshold, error):
    """ScorePolicy(promote_threshold="0.5") was taken, then every get of a lower-tier entry raised TypeError
    from inside the cache ('>=' not supported); NaN silently disabled promotion."""
    from tiercache import ScorePolicy

    with pytest.raises(error, match="promote_threshold"):
        ScorePolicy(promote_threshold=threshold)
    assert ScorePolicy(promote_threshold=2).promote_threshold == 2.0
    assert ScorePolicy().promote_threshold == float("-inf")


def test_stats_of_a_closed_cache_agree_with_what_a_reopen_finds(tmp_path):
    """After close() the disk row said used_bytes=40980 beside entries=0: its bytes were counted but not its
    entries.  It now says what it persisted, which a reopen finds; memory rows say 0."""
    cache = Cache(host="64KiB", disk="1MiB", path=tmp_path / "s")
    for i in range(5):
        cache.put(i, torch.ones(256))
    cache.close()
    closed = cache.stats()
    assert closed["closed"] and closed["entries"] == 0
    host, disk = closed["tiers"]["host"], closed["tiers"]["disk"]
    assert (host["entries"], host["payload_bytes"], host["used_bytes"]) == (0, 0, 0)
    with Cache(host="64KiB", disk="1MiB", path=tmp_path / "s") as again:
        row = again.stats()["tiers"]["disk"]
        assert (disk["entries"], disk["payload_bytes"], disk["used_bytes"]) == (
            row["entries"], row["payload_bytes"], row["used_bytes"]) == (5, 5 * 1024, row["used_bytes"])
        assert row["used_bytes"] > 0


@pytest.mark.parametrize("options, error, match", [
    (dict(io_threads=0), ValueError, "io_threads"), (dict(io_threads=2.5), ValueError, "io_threads"),
    (dict(io_threads=True), ValueError, "io_threads"), (dict(io_threads="4"), ValueError, "io_threads"),
    (dict(direct_io="no"), TypeError, "direct_io"), (dict(direct_io=1), TypeError, "direct_io"),
    (dict(fingerprint=7), TypeError, "fingerprint"),
])
def test_a_disk_tier_made_directly_checks_its_options_as_cache_does(tmp_path, options, error, match):
    """DiskTier (for tiers=[...]) rounded io_threads=0 / 2.5 silently and took a truthy direct_io="no" as
    True; Cache refused each."""
    import numpy as np

    from tiercache.tiers import DiskTier

    with pytest.raises(error, match=match):
        DiskTier(tmp_path / "d", 1 << 20, **options)
    assert not (tmp_path / "d").exists()  # refused before anything was created
    DiskTier(tmp_path / "ok", 1 << 20, io_threads=np.int64(2)).close()


def test_a_policy_whose_rank_raises_in_a_put_leaves_the_cache_consistent():
    """A put whose policy.rank raised left the new entry in the index but outside the eviction queue: it
    could never be evicted again and pinned its slot for good."""

    class Flaky:
        name = "flaky"
        fail = False

        def rank(self, info):
            if self.fail:
                raise ZeroDivisionError("policy bug")
            return info.last_access

        def promote(self, info, src, dst):
            return False

    policy = Flaky()
    with Cache(host=1024, policy=policy) as cache:
        cache.put("a", torch.ones(4))
        policy.fail = True
        with pytest.raises(ZeroDivisionError):
            cache.put("b", torch.ones(4))
        policy.fail = False
        assert "b" not in cache and torch.equal(cache.get("a"), torch.ones(4))
        for i in range(8):
            cache.put(i, torch.ones(64))
        assert cache.keys() == [4, 5, 6, 7]  # every entry evictable: the tier holds the 4 newest
