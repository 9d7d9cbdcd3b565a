"""Threads hammering one cache with small tiers: only values some thread put, only KeyError, invariants hold."""

import json
import random
import threading
import time

import pytest
import torch

from tiercache import Cache

KEYS = 12
THREADS = 4
SECONDS = 3.0
MIN_OPS = 50  # per thread, however slow the machine: the stress never depends on how much a second allows


def encoded(key: int, thread: int, version: int, numel: int) -> torch.Tensor:
    """A value that names its (key, thread, version) and whose body is derived from them."""
    body = (torch.arange(numel, dtype=torch.int64) * 6364136223846793005 + key * 1442695040888963407
            + thread * 7919 + version * 104729) % (1 << 40)
    body[:3] = torch.tensor([key, thread, version])
    return body


def check(key: int, got: torch.Tensor, puts: set) -> None:
    assert got.dtype == torch.int64 and got.dim() == 1, got
    k, thread, version = (int(x) for x in got[:3])
    assert k == key, f"get({key}) returned the value of key {k}"
    assert (k, thread, version) in puts, f"get({key}) returned a value nobody put: {(k, thread, version)}"
    assert torch.equal(got, encoded(k, thread, version, got.numel())), f"get({key}) returned damaged bytes"


def invariants(cache: Cache) -> None:
    for tier in cache.tiers:
        assert 0 <= tier.used <= tier.capacity, tier.name
    stats = json.loads(json.dumps(cache.stats()))
    assert stats["entries"] == len(cache) == sum(t["entries"] for t in stats["tiers"].values())
    assert stats["corruptions"] == 0


@pytest.mark.parametrize(("policy", "compression"), [("lru", None), ("lfu", "zstd")])
def test_threaded_stress(tmp_path, policy, compression):
    store = tmp_path / "store"
    puts: set = set()
    failures: list[BaseException] = []
    drops: list = []

    def on_evict(key, reason):
        drops.append((key, reason))

    cache = Cache(host="8KiB", disk="96KiB", path=store, policy=policy, compression=compression,
                  on_evict=on_evict, io_threads=2)
    deadline = time.monotonic() + SECONDS
    counts = [0] * THREADS

    def worker(thread: int) -> None:
        rng = random.Random(thread)
        version = 0
        try:
            while time.monotonic() < deadline or counts[thread] < MIN_OPS:
                key = rng.randrange(KEYS)
                op = rng.random()
                if op < 0.4:
                    version += 1
                    numel = rng.choice([3, 16, 200, 500, 1500])
                    puts.add((key, thread, version))  # before the put: a get may see it before put returns
                    cache.put(key, encoded(key, thread, version, numel), score=rng.random())
                elif op < 0.75:
                    try:
                        check(key, cache.get(key), puts)
                    except KeyError:
                        pass
                elif op < 0.85:
                    cache.delete(key)
                elif op < 0.95:
                    future = cache.prefetch(rng.sample(range(KEYS), 3))
                    assert 0 <= future.result(timeout=60) <= 3
                else:
                    _ = key in cache
                    cache.update_scores({key: rng.random()})
                counts[thread] += 1
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=SECONDS + 60)
    assert not any(t.is_alive() for t in threads), "a worker hung"
    if failures:
        raise failures[0]
    assert min(counts) >= MIN_OPS, counts

    invariants(cache)
    before = {}
    for key in cache.keys():
        got = cache.get(key)  # every key the cache lists reads back
        check(key, got, puts)
        before[key] = got
    invariants(cache)
    assert set(cache.keys()) == set(before)  # nothing was dropped by reading
    assert {reason for _, reason in drops} <= {"capacity"}
    drops.clear()
    cache.close()  # may drop what does not fit the disk (reported: "close", or "capacity" for disk entries)
    closed_drops = [key for key, _ in drops]
    assert len(closed_drops) == len(set(closed_drops))

    with Cache(host="8KiB", disk="96KiB", path=store, policy=policy) as reopened:
        invariants(reopened)
        assert set(reopened.keys()) == set(before) - set(closed_drops)
        for key in reopened.keys():
            assert torch.equal(reopened.get(key), before[key]), key
        invariants(reopened)
