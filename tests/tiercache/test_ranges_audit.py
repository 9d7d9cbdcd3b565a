"""Audit of ranged reads (``Cache.get_many(..., ranges=)``): sector edges, the last short sector, empty items,
whole-value ranges, unaligned destinations under ``O_DIRECT`` (the bounce path), the counters, bad input counting
nothing, an empty item promoting nothing, and ranged reads racing puts, deletes and close."""

from __future__ import annotations

import threading

import pytest
import torch

from tiercache import Cache
from tiercache.errors import CacheClosedError
from tiercache.testing import make_value, same_tensor

SECTOR = 64 << 10
N = 70000  # float32: 280000 bytes, 5 sectors, the last one short
NB = 4 * N


def _flat(stats):
    return {k: v for k, v in stats.items() if isinstance(v, (int, float))}


EDGES = [[], [(0, NB)], [(SECTOR - 1, SECTOR + 1)], [(4 * SECTOR, NB)], [(NB - 1, NB)],
         [(0, 1), (1, 2), (SECTOR, 2 * SECTOR)], [(0, SECTOR), (SECTOR, 2 * SECTOR), (2 * SECTOR, NB)]]


@pytest.mark.parametrize("direct", [False, True])
@pytest.mark.parametrize("offset", [0, 1])
def test_sector_edges_and_counters(tmp_path, direct, offset):
    """Every edge case lands exactly the asked bytes (an unaligned destination under O_DIRECT goes through the
    bounce buffer), and the counters add up: bytes_read = whole sectors read, saved = the rest."""
    with Cache(host=None, disk="64MiB", path=str(tmp_path / "s"), direct_io=direct) as cache:
        value = make_value(torch.uint8, (NB,), 3)
        cache.put("a", value)
        for ranges in EDGES:
            base = torch.full((NB + 1,), 7, dtype=torch.uint8)
            out = base[offset: offset + NB]
            before = cache.stats()
            cache.get_many(["a"], out=[out], ranges=[ranges])
            want = torch.full((NB,), 7, dtype=torch.uint8)
            for lo, hi in ranges:
                want[lo:hi] = value[lo:hi]
            assert torch.equal(out, want)
            after = cache.stats()
            sectors = {s for lo, hi in ranges for s in range(lo // SECTOR, (hi - 1) // SECTOR + 1)}
            read = sum(min((s + 1) * SECTOR, NB) - s * SECTOR for s in sectors)
            d0, d1 = before["tiers"]["disk"], after["tiers"]["disk"]
            assert d1["bytes_read"] - d0["bytes_read"] == read
            assert d1["ranged_reads"] - d0["ranged_reads"] == (1 if ranges else 0)
            assert d1["ranged_bytes_saved"] - d0["ranged_bytes_saved"] == (NB - read if ranges else 0)
            assert after["ranged_gets"] - before["ranged_gets"] == 1


def test_bad_input_counts_nothing(tmp_path):
    with Cache(host="1MiB", disk="64MiB", path=str(tmp_path / "s")) as cache:
        cache.put("a", make_value(torch.float32, (N,), 1))
        before = _flat(cache.stats())
        bad = [([torch.empty(N)], [[(0, NB + 1)]]), ([torch.empty(2, N // 2).t()], [[(0, 4)]]),
               ([torch.empty(N, dtype=torch.int32)], [[(0, 4)]]), ([torch.empty(N)], [[(0, 8), (4, 9)]]),
               ([torch.empty(N)], [[(0.0, 8)]]), ([torch.empty(N)], [None, None])]
        for out, ranges in bad:
            with pytest.raises(ValueError):
                cache.get_many(["a"], out=out, ranges=ranges)
        assert _flat(cache.stats()) == before


def test_an_empty_item_promotes_nothing(tmp_path):
    """``ranges=[[]]`` reads nothing (docs): under the default policy, which promotes a disk hit, it used to
    promote the entry, reading it whole from the disk (and demoting another)."""
    with Cache(host="1MiB", disk="64MiB", path=str(tmp_path / "s")) as cache:
        values = [make_value(torch.float32, (N,), i) for i in range(6)]
        for i, v in enumerate(values):
            cache.put(i, v)
        on_disk = [i for i in range(6) if cache.stats()["tiers"]["disk"]["entries"] and not _in_host(cache, i)]
        assert on_disk
        before = cache.stats()
        out = torch.full((N,), 5.0)
        for i in on_disk:
            cache.get_many([i], out=[out], ranges=[[]])
        after = cache.stats()
        assert (out == 5.0).all()
        assert after["tiers"]["disk"]["bytes_read"] == before["tiers"]["disk"]["bytes_read"]
        assert after["tiers"]["host"]["bytes_read"] == before["tiers"]["host"]["bytes_read"]
        assert [i for i in range(6) if not _in_host(cache, i)] == on_disk
        assert after["hits"] - before["hits"] == len(on_disk)
        for i, v in enumerate(values):  # everything still reads back
            assert same_tensor(cache.get(i), v)


def _in_host(cache, key):
    return cache.tier_of(key) == "host"


@pytest.mark.parametrize("direct", [False, True])
def test_ranged_reads_racing_puts_deletes_and_close(tmp_path, direct):
    """Readers see one of the values the key held (never a mix within a sector run), other bytes untouched;
    close ends them with CacheClosedError, no hang."""
    cache = Cache(host=None, disk="64MiB", path=str(tmp_path / "s"), direct_io=direct)
    versions = {k: [make_value(torch.uint8, (NB,), 10 * k + g) for g in range(3)] for k in range(4)}
    for k in range(4):
        cache.put(k, versions[k][0])
    stop = threading.Event()
    problems, closed = [], []

    def writer():
        g = 0
        while not stop.is_set():
            g += 1
            k = g % 4
            try:
                if g % 5 == 0:
                    cache.delete(k)
                else:
                    cache.put(k, versions[k][g % 3])
            except CacheClosedError:
                return

    def reader(seed):
        import random
        rng = random.Random(seed)
        while True:
            k = rng.randrange(4)
            lo = rng.randrange(0, NB - 1)
            hi = min(NB, lo + 1 + rng.randrange(0, 3 * SECTOR))
            out = torch.full((NB,), 7, dtype=torch.uint8)
            try:
                cache.get_many([k], out=[out], ranges=[[(lo, hi)]])
            except KeyError:
                continue
            except CacheClosedError:
                closed.append(seed)
                return
            if not any(torch.equal(out[lo:hi], v[lo:hi]) for v in versions[k]):
                problems.append((k, lo, hi))
            if not ((out[:lo] == 7).all() and (out[hi:] == 7).all()):
                problems.append(("touched", k, lo, hi))

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    threading.Event().wait(1.0)
    cache.close()
    stop.set()
    for t in threads:
        t.join(20)
    assert not any(t.is_alive() for t in threads)
    assert not problems and len(closed) == 3
