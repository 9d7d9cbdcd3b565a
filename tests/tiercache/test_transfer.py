"""CPU tests of the batched transfer path: the reference gather/scatter, the copy engine's CPU fallback,
the disk staging reader and ``Cache.get_many(out=...)``.  The GPU paths are in test_gpu.py."""

from __future__ import annotations

import random

import pytest
import torch

import tiercache
from tiercache.errors import CorruptEntryError
from tiercache.transfer import CopyEngine, chunk_file_bytes, read_chunk_into
from tiercache_kernels import (
    ALIGN,
    coalesce_ranges,
    copy_blocks,
    gather_blocks,
    gather_blocks_reference,
    packed_layout,
    scatter_blocks,
)


def _random_blocks(rng: random.Random, n_arenas: int = 3, n_blocks: int = 40, max_size: int = 3000):
    """Arenas of random bytes and non-overlapping random blocks in them, in a random order."""
    arenas = [torch.randint(0, 256, (rng.randint(20_000, 40_000),), dtype=torch.uint8) for _ in range(n_arenas)]
    blocks = []
    for a, arena in enumerate(arenas):
        position = rng.randint(0, 17)
        while len(blocks) < n_blocks * (a + 1) // n_arenas:
            size = rng.choice([0, 1, 15, 16, 17, rng.randint(1, max_size)])
            if position + size > arena.numel():
                break
            blocks.append((a, position, size))
            position += size + rng.randint(0, 33)  # odd gaps: unaligned offsets
    rng.shuffle(blocks)
    return arenas, blocks


def _expected(arenas, blocks) -> bytes:
    """The naive answer, built from Python bytes, independently of any torch copy."""
    return [bytes(arenas[a][o : o + n].numpy().tobytes()) for a, o, n in blocks]


@pytest.mark.parametrize("seed", range(8))
def test_gather_matches_naive_per_block_copies(seed):
    rng = random.Random(seed)
    arenas, blocks = _random_blocks(rng)
    ids, offsets, sizes = (list(x) for x in zip(*blocks))
    out_offsets, total = packed_layout(sizes)
    out = torch.full((total + 5,), 0xAB, dtype=torch.uint8)
    gather_blocks(arenas, ids, offsets, sizes, out)
    for want, start, size in zip(_expected(arenas, blocks), out_offsets, sizes):
        assert out[start : start + size].numpy().tobytes() == want
    # bytes outside the blocks are untouched
    covered = torch.zeros(out.numel(), dtype=torch.bool)
    for start, size in zip(out_offsets, sizes):
        covered[start : start + size] = True
    assert bool((out[~covered] == 0xAB).all())


@pytest.mark.parametrize("seed", range(5))
def test_scatter_inverts_gather(seed):
    rng = random.Random(100 + seed)
    arenas, blocks = _random_blocks(rng)
    ids, offsets, sizes = (list(x) for x in zip(*blocks))
    _, total = packed_layout(sizes)
    packed = gather_blocks(arenas, ids, offsets, sizes, torch.empty(total, dtype=torch.uint8))
    targets = [torch.zeros_like(a) for a in arenas]
    scatter_blocks(packed, None, sizes, targets, ids, offsets)
    for a, o, n in blocks:
        assert torch.equal(targets[a][o : o + n], arenas[a][o : o + n])
    written = sum(n for _, _, n in blocks)
    assert sum(int((t != 0).sum()) for t in targets) <= written


def test_packed_layout_alignment():
    offsets, total = packed_layout([1, 0, 300, 256, 5])
    assert offsets == [0, 256, 256, 768, 1024]
    assert total == 1029
    assert all(o % ALIGN == 0 for o in offsets)
    assert packed_layout([]) == ([], 0)
    assert packed_layout([10, 10], align=16) == ([0, 16], 26)
    with pytest.raises(ValueError):
        packed_layout([1], align=3)
    with pytest.raises(ValueError):
        packed_layout([-1])


def test_coalesce_ranges_merges_only_contiguous_runs():
    runs = coalesce_ranges([0, 0, 0, 1, 1], [0, 10, 25, 0, 5], [0, 0, 0, 0, 0], [100, 110, 120, 200, 205], [10, 15, 5, 5, 0])
    # blocks 0+1 continue each other; block 2 jumps in the source; block 4 is empty
    assert runs == [(0, 0, 0, 100, 25), (0, 25, 0, 120, 5), (1, 0, 0, 200, 5)]


@pytest.mark.parametrize("seed", range(3))
def test_coalesced_copies_equal_reference(seed):
    rng = random.Random(seed)
    arena = torch.randint(0, 256, (10_000,), dtype=torch.uint8)
    sizes = [rng.randint(1, 300) for _ in range(20)]
    offsets, total = packed_layout(sizes, align=1)  # contiguous source: everything coalesces
    dst_offsets = [o + 7 for o in offsets]
    runs = coalesce_ranges([0] * 20, offsets, [0] * 20, dst_offsets, sizes)
    assert len(runs) == 1
    out_a = torch.zeros(total + 7, dtype=torch.uint8)
    out_b = torch.zeros(total + 7, dtype=torch.uint8)
    for sa, so, da, do, n in runs:
        out_a[do : do + n].copy_(arena[so : so + n])
    gather_blocks_reference([arena], [0] * 20, offsets, sizes, out_b, dst_offsets)
    assert torch.equal(out_a, out_b)


def test_gather_rejects_bad_input():
    arena = torch.zeros(1000, dtype=torch.uint8)
    out = torch.zeros(600, dtype=torch.uint8)
    with pytest.raises(ValueError, match="exceeds"):  # out too small for the packed layout
        gather_blocks([arena], [0, 0], [0, 400], [300, 300], out)
    with pytest.raises(ValueError, match="exceeds"):  # source past the arena's end
        gather_blocks([arena], [0], [900], [200], out)
    with pytest.raises(ValueError, match="overlap"):
        gather_blocks([arena], [0, 0], [0, 100], [100, 100], out, [0, 50])
    with pytest.raises(ValueError, match="entries"):  # mismatched lengths
        gather_blocks([arena], [0, 0], [0], [10, 10], out)
    with pytest.raises(ValueError, match="out of range"):
        gather_blocks([arena], [1], [0], [10], out)
    with pytest.raises(ValueError, match="negative"):
        gather_blocks([arena], [0], [-1], [10], out)
    with pytest.raises(ValueError, match="uint8"):
        gather_blocks([arena.float()], [0], [0], [10], out)
    with pytest.raises(ValueError, match="uint8"):
        gather_blocks([arena], [0], [0], [10], out[::2])
    with pytest.raises(TypeError):
        gather_blocks([b"abc"], [0], [0], [1], out)  # type: ignore[list-item]
    with pytest.raises(ValueError, match="backend"):
        copy_blocks([arena], [0], [0], [out], [0], [0], [1], backend="magic")
    assert int(out.count_nonzero()) == 0


def test_copy_engine_cpu_fallback():
    engine = CopyEngine("cpu")
    assert engine.stream is None
    arena = torch.arange(256, dtype=torch.uint8).repeat(4)
    out = torch.zeros(1024, dtype=torch.uint8)
    handle = engine.gather([arena], [0, 0], [10, 500], [20, 30], out)
    assert handle.done() and handle.event is None and handle.backend == "reference"
    assert handle.wait() is out
    assert torch.equal(out[:20], arena[10:30]) and torch.equal(out[256:286], arena[500:530])
    assert handle.future().result(timeout=5) is out
    back = torch.zeros_like(arena)
    engine.scatter(out, None, [20, 30], [back], [0, 0], [10, 500]).wait()
    assert torch.equal(back[10:30], arena[10:30]) and torch.equal(back[500:530], arena[500:530])
    dst = torch.empty(7, dtype=torch.uint8)
    assert torch.equal(engine.copy(arena[:7], dst).wait(), arena[:7])
    with pytest.raises(ValueError):
        engine.copy(arena[:7], torch.empty(8, dtype=torch.uint8))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_copy_engine_cuda_without_cuda_is_a_clear_error():
    with pytest.raises(RuntimeError, match="CUDA"):
        CopyEngine("cuda")
    with pytest.raises(ValueError):
        CopyEngine("meta")


# -- disk staging -------------------------------------------------------------------------------------
def _disk_cache(tmp_path, **kw):
    return tiercache.Cache(host=kw.pop("host", "64KiB"), disk=kw.pop("disk", "32MiB"), path=tmp_path / "tc", **kw)


def test_read_chunk_into_verifies_and_rejects_damage(tmp_path):
    cache = _disk_cache(tmp_path, host=None)
    value = torch.randn(1000)
    cache.put("k", value)
    entry = cache._index["k"]
    tier = cache.tiers[entry.level]
    staging = torch.empty(chunk_file_bytes(entry.slot), dtype=torch.uint8)
    payload = read_chunk_into(tier, entry.slot, entry.header, staging)
    assert torch.equal(payload.view(torch.float32), value)
    with pytest.raises(ValueError, match="staging"):
        read_chunk_into(tier, entry.slot, entry.header, staging[:100])
    path = tier.chunk_path(entry.slot)
    raw = bytearray(path.read_bytes())
    raw[5000] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptEntryError, match="crc32c"):
        read_chunk_into(tier, entry.slot, entry.header, staging)
    cache.close()


# -- Cache.get_many -------------------------------------------------------------------------------------
def _values(rng: random.Random, n: int):
    dtypes = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.bool, torch.complex64]
    values = {}
    for i in range(n):
        dtype = rng.choice(dtypes)
        shape = tuple(rng.randint(0, 9) if rng.random() < 0.05 else rng.randint(1, 40) for _ in range(rng.randint(0, 3)))
        if dtype == torch.bool:
            value = torch.rand(shape) > 0.5
        elif dtype.is_complex:
            value = torch.randn(shape, dtype=dtype)
        elif dtype.is_floating_point:
            value = torch.randn(shape).to(dtype)
        else:
            value = torch.randint(0, 200, shape, dtype=dtype)
        values[("v", i)] = value
    return values


@pytest.mark.parametrize("seed", range(3))
def test_get_many_out_is_bit_exact_across_tiers(tmp_path, seed):
    rng = random.Random(seed)
    values = _values(rng, 60)
    with _disk_cache(tmp_path / str(seed), host="32KiB") as cache:
        for key, value in values.items():
            cache.put(key, value)
        assert {cache.tier_of(k) for k in values} == {"host", "disk"}
        keys = list(values)
        rng.shuffle(keys)
        keys += keys[:3]  # duplicates are fine
        sizes = [values[k].numel() * values[k].element_size() for k in keys]
        offsets, total = packed_layout(sizes)
        out = torch.empty(total + 100, dtype=torch.uint8)
        results = cache.get_many(keys, out=out)
        assert len(results) == len(keys)
        for key, result, offset in zip(keys, results, offsets):
            want = values[key]
            assert result.dtype == want.dtype and result.shape == want.shape
            assert torch.equal(result.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8))
            if want.numel():
                assert result.data_ptr() == out.data_ptr() + offset  # a view into out
        fresh = cache.get_many(keys)
        for key, result in zip(keys, fresh):
            assert torch.equal(result.reshape(-1).view(torch.uint8), values[key].reshape(-1).view(torch.uint8))
        assert not cache._pins and not cache._deferred  # every pin was released


def test_get_many_validates_out_and_keys(tmp_path):
    with _disk_cache(tmp_path) as cache:
        cache.put("a", torch.arange(100, dtype=torch.float32))
        cache.put("b", torch.arange(10, dtype=torch.int64))
        gets = cache.stats()["gets"]
        with pytest.raises(ValueError, match="need 592"):
            cache.get_many(["a", "b"], out=torch.empty(300, dtype=torch.uint8))
        with pytest.raises(ValueError, match="contiguous"):
            cache.get_many(["a"], out=torch.empty(200, 4)[:, 0])
        with pytest.raises(ValueError, match="aligned"):
            cache.get_many(["a"], out=torch.empty(1000, dtype=torch.uint8)[1:])
        with pytest.raises(ValueError, match="requested"):
            cache.get_many(["a"], device="meta", out=torch.empty(1000, dtype=torch.uint8))
        with pytest.raises(TypeError):
            cache.get_many(["a"], out=bytearray(1000))  # type: ignore[arg-type]
        out = torch.zeros(1000, dtype=torch.uint8)
        with pytest.raises(KeyError, match="nope"):
            cache.get_many(["a", "nope", "b"], out=out)
        assert int(out.count_nonzero()) == 0  # all or nothing: nothing was copied
        stats = cache.stats()
        assert stats["gets"] == gets + 1 and stats["misses"] == 1
        assert cache.get_many([]) == []
        assert not cache._pins


def test_get_many_drops_a_corrupt_entry_and_releases_pins(tmp_path):
    with _disk_cache(tmp_path, host=None) as cache:
        cache.put("good", torch.ones(500))
        cache.put("bad", torch.zeros(500))
        entry = cache._index["bad"]
        path = cache.tiers[entry.level].chunk_path(entry.slot)
        raw = bytearray(path.read_bytes())
        raw[4200] ^= 0xFF
        path.write_bytes(bytes(raw))
        with pytest.raises(KeyError, match="bad"):
            cache.get_many(["good", "bad"])
        assert "bad" not in cache and "good" in cache
        assert cache.stats()["corruptions"] == 1
        assert not cache._pins
        assert torch.equal(cache.get_many(["good"])[0], torch.ones(500))


def test_get_many_promotes_like_get(tmp_path):
    with _disk_cache(tmp_path, host="64KiB", policy="lru") as cache:
        for i in range(40):
            cache.put(i, torch.full((1024,), float(i)))  # 4 KiB each: the host tier holds ~16
        cold = [i for i in range(40) if cache.tier_of(i) == "disk"][:4]
        assert cold
        results = cache.get_many(cold)
        assert all(torch.equal(r, torch.full((1024,), float(i))) for r, i in zip(results, cold))
        assert all(cache.tier_of(i) == "host" for i in cold)
        assert cache.stats()["tiers"]["disk"]["hits"] >= len(cold)


def test_get_many_against_concurrent_deletes(tmp_path):
    """Pins are held across the batched copy: deletes and overwrites racing with get_many never make it
    return wrong bytes (each result is either absent -> KeyError, or the value put under that key)."""
    import threading

    with _disk_cache(tmp_path, host="128KiB") as cache:
        def value(key: int, gen: int) -> torch.Tensor:
            # gen mod 1000: the churn thread's gen (one per put or delete) passed 1000 within the 200
            # get_many calls in ~8 % of runs, and key * 1000 + gen then decoded as the next key (a false failure)
            return torch.full((256,), float(key * 1000 + gen % 1000))

        for k in range(50):
            cache.put(k, value(k, 0))
        stop = threading.Event()
        errors: list[BaseException] = []

        def churn() -> None:
            gen = 1
            rng = random.Random(1)
            while not stop.is_set():
                k = rng.randrange(50)
                try:
                    if rng.random() < 0.3:
                        cache.delete(k)
                    else:
                        cache.put(k, value(k, gen))
                except BaseException as exc:  # pragma: no cover - reported below
                    errors.append(exc)
                gen += 1

        thread = threading.Thread(target=churn)
        thread.start()
        try:
            rng = random.Random(2)
            for _ in range(200):
                keys = rng.sample(range(50), 8)
                try:
                    results = cache.get_many(keys)
                except KeyError:
                    continue
                for k, r in zip(keys, results):
                    assert bool((r == r[0]).all()) and int(r[0]) // 1000 == k
        finally:
            stop.set()
            thread.join()
        assert not errors
        assert not cache._pins
