"""The single-key fast paths of ``put``/``get`` and the in-lookup copies of ``get_many`` keep the batch
path's semantics: the same values, counters, policy bookkeeping and releases."""

import itertools
import os

import pytest
import torch

import tiercache
from tiercache import CacheClosedError
from tiercache.allocator import ArenaAllocator
from tiercache.values import new_tensor
from tiercache.tiers.memory import MEMMOVE_MAX_BYTES


def _counts(cache):
    s = cache.stats()
    return s["gets"], s["hits"], s["misses"], s["puts"], {
        name: (t["hits"], t["misses"], t["bytes_read"], t["bytes_written"]) for name, t in s["tiers"].items()
    }


def test_single_get_and_put_count_as_their_batched_forms(tmp_path):
    value = torch.arange(300, dtype=torch.float32).view(3, 100)
    with tiercache.Cache(host="1MiB", disk=None) as one, tiercache.Cache(host="1MiB", disk=None) as many:
        one.put("a", value)
        many.put_many([("a", value)])
        got = one.get("a")
        (want,) = many.get_many(["a"], out=[torch.empty(3, 100)])
        assert torch.equal(got, value) and torch.equal(want, value)
        assert got.is_contiguous() and got.stride() == value.stride() and got.dtype == value.dtype
        assert _counts(one) == _counts(many)
        with pytest.raises(KeyError):
            one.get("b")
        with pytest.raises(KeyError):
            many.get_many(["b"])
        assert _counts(one) == _counts(many)


@pytest.mark.parametrize("nbytes", [0, 4, (1 << 16) - 4, 1 << 16, (1 << 16) + 4, 1 << 20])
def test_single_get_copies_every_size_of_the_memmove_fast_path_into_a_fresh_tensor(nbytes):
    # (sizes around GIL_HELD_MAX_BYTES, where the copy switches from the GIL-holding memmove)
    value = torch.arange(nbytes // 4, dtype=torch.int32)
    with tiercache.Cache(host="8MiB", disk=None) as cache:
        cache.put("a", value)
        first, second = cache.get("a"), cache.get("a")
        assert torch.equal(first, value) and torch.equal(second, value)
        if nbytes:
            assert first.data_ptr() != second.data_ptr()  # each get is a fresh, caller-owned tensor
            first.fill_(-1)
            assert torch.equal(cache.get("a"), value)
        stats = cache.stats()
        assert stats["gets"] == (3 if nbytes else 2)
        assert stats["tiers"]["host"]["bytes_read"] == stats["gets"] * nbytes


def test_single_put_replacing_keeps_the_score_and_frees_the_old_slot(tmp_path):
    with tiercache.Cache(host="64KiB", disk="1MiB", path=tmp_path / "s", policy="score") as cache:
        cache.put("k", torch.ones(16), score=5.0)
        used = cache.stats()["tiers"]["host"]["used_bytes"]
        cache.put("k", torch.zeros(16))  # no score: the old one is kept
        assert cache._index["k"].score == 5.0
        assert cache.stats()["tiers"]["host"]["used_bytes"] == used
        assert torch.equal(cache.get("k"), torch.zeros(16))
        # An entry living on the disk tier, replaced by a small put: its disk slot is released.
        big = torch.ones(32 * 1024)  # 128 KiB: larger than the host tier
        cache.put("d", big)
        assert cache.tier_of("d") == "disk"
        cache.put("d", torch.full((4,), 2.0))
        assert cache.tier_of("d") == "host"
        assert cache.stats()["tiers"]["disk"]["entries"] == 0
        assert torch.equal(cache.get("d"), torch.full((4,), 2.0))
    with tiercache.Cache(host="64KiB", disk="1MiB", path=tmp_path / "s") as cache:
        assert torch.equal(cache.get("d"), torch.full((4,), 2.0))  # persisted at close: the new value


def test_single_put_that_needs_room_demotes_and_bad_input_on_a_closed_cache(tmp_path):
    with tiercache.Cache(host="4KiB", disk="1MiB", path=tmp_path / "s") as cache:
        for i in range(8):
            cache.put(i, torch.full((256,), float(i)))  # 1 KiB each: the host tier holds 4
        assert len(cache) == 8 and sum(cache.tier_of(i) == "disk" for i in range(8)) >= 4
        assert all(torch.equal(cache.get(i), torch.full((256,), float(i))) for i in range(8))
    with pytest.raises(CacheClosedError):
        cache.put("x", "not a tensor")
    with pytest.raises(CacheClosedError):
        cache.get("x")


def test_get_many_into_strided_outs_copies_under_the_lookup_and_leaves_no_pins():
    blocks = [torch.randn(1, 3, 8, 4) for _ in range(5)]
    with tiercache.Cache(host="1MiB", disk=None) as cache:
        cache.put_many([(("b", i), b) for i, b in enumerate(blocks)])
        buf = torch.zeros(1, 3, 5 * 8 + 2, 4)
        outs = list(buf[:, :, :40].unflatten(2, (5, 8)).unbind(2))
        assert not any(o.is_contiguous() for o in outs)
        got = cache.get_many([("b", i) for i in range(5)], out=outs)
        assert all(g is o for g, o in zip(got, outs))
        assert torch.equal(buf[:, :, :40], torch.cat(blocks, dim=2)) and not buf[:, :, 40:].any()
        assert not cache._pins and cache.stats()["hits"] == 5
        with pytest.raises(ValueError, match="dtype"):
            cache.get_many([("b", 0)], out=[outs[0].double()])


def _flip_payload_byte(cache, key):
    disk = next(t for t in cache.tiers if t.name == "disk")
    path = disk.chunk_path(cache._index[key].slot)
    with open(path, "r+b") as f:
        f.seek(4096 + 10)  # a payload byte (after the header page)
        byte = f.read(1)
        f.seek(4096 + 10)
        f.write(bytes([byte[0] ^ 0x40]))


def test_get_many_of_disk_values_into_strided_outs_reads_promotes_and_drops_damage(tmp_path):
    """A batch of disk values read into row-contiguous slices (exact decode's blocks: ``_get_rows``) lands
    in the slices, counts as the batch path does, promotes from the re-read slot, and a damaged chunk
    raises ``KeyError`` for its key, is dropped and counted, with no pin left."""
    blocks = [torch.randn(1, 3, 8, 4) for _ in range(5)]
    keys = [("b", i) for i in range(5)]
    with tiercache.Cache(host=None, disk="4MiB", path=tmp_path / "s") as cache:
        cache.put_many(zip(keys, blocks))
        buf = torch.zeros(1, 3, 5 * 8 + 2, 4)
        outs = list(buf[:, :, :40].unflatten(2, (5, 8)).unbind(2))
        got = cache.get_many(keys, out=outs)
        assert all(g is o for g, o in zip(got, outs))
        assert torch.equal(buf[:, :, :40], torch.cat(blocks, dim=2)) and not buf[:, :, 40:].any()
        disk = cache.stats()["tiers"]["disk"]
        assert not cache._pins and cache.stats()["hits"] == 5 and disk["bytes_read"] == 5 * blocks[0].nbytes
        _flip_payload_byte(cache, keys[3])
        with pytest.raises(KeyError) as info:
            cache.get_many(keys, out=outs)
        assert info.value.args[0] == keys[3] and keys[3] not in cache and cache.stats()["corruptions"] == 1
        assert not cache._pins
        rest = [k for k in keys if k != keys[3]]
        cache.get_many(rest, out=[outs[i] for i in (0, 1, 2, 4)])
        assert all(torch.equal(outs[i], blocks[i]) for i in (0, 1, 2, 4))
    with tiercache.Cache(host=2048, disk="4MiB", path=tmp_path / "p", policy="lru") as cache:
        cache.put_many(zip(keys, blocks))  # the host tier holds a few: the rest are demoted to disk
        on_disk = [k for k, tier in zip(keys, cache.tiers_of(keys)) if tier == "disk"]
        assert on_disk
        cache.get_many(on_disk, out=outs[: len(on_disk)])  # lru promotes every hit, from the re-read slot
        assert all(torch.equal(o, blocks[keys.index(k)]) for k, o in zip(on_disk, outs))
        assert not cache._pins and "host" in cache.tiers_of(on_disk)
        assert all(torch.equal(cache.get(k), b) for k, b in zip(keys, blocks))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8])
def test_get_many_of_disk_values_into_contiguous_outs_reads_promotes_and_drops_damage(tmp_path, dtype):
    """Disk values read into separate contiguous tensors of their dtype (the sparse pipeline's slots: DiskTier
    reads into them as they are) land there, a promotion copies the destination's bytes (the promoted host
    copy reads back equal), and a damaged chunk raises ``KeyError`` for its key with no pin left."""
    blocks = [(torch.randn(2, 3, 8, 4) * 50).to(dtype) for _ in range(6)]
    keys = [("c", i) for i in range(6)]
    host = 2 * max(256, blocks[0].nbytes)  # two values (slots are multiples of 256 bytes)
    with tiercache.Cache(host=host, disk="4MiB", path=tmp_path / "p", policy="lru") as cache:
        cache.put_many(zip(keys, blocks))  # the host tier holds a few: the rest are demoted to disk
        on_disk = [k for k, tier in zip(keys, cache.tiers_of(keys)) if tier == "disk"]
        assert len(on_disk) >= 2
        outs = [torch.empty(2, 3, 8, 4, dtype=dtype) for _ in on_disk]
        got = cache.get_many(on_disk, out=outs)
        assert all(g is o for g, o in zip(got, outs))
        assert all(torch.equal(o, blocks[keys.index(k)]) for k, o in zip(on_disk, outs))
        assert not cache._pins and "host" in cache.tiers_of(on_disk)  # lru promotes every hit
        outs[0].zero_()  # the promoted copies are the tier's own, not views of the destinations
        assert all(torch.equal(cache.get(k), b) for k, b in zip(keys, blocks))
    with tiercache.Cache(host=None, disk="4MiB", path=tmp_path / "s") as cache:
        cache.put_many(zip(keys, blocks))
        outs = [torch.empty(2, 3, 8, 4, dtype=dtype) for _ in keys]
        _flip_payload_byte(cache, keys[4])
        with pytest.raises(KeyError) as info:
            cache.get_many(keys, out=outs)
        assert info.value.args[0] == keys[4] and keys[4] not in cache and cache.stats()["corruptions"] == 1
        assert not cache._pins
        rest = [k for k in keys if k != keys[4]]
        cache.get_many(rest, out=[outs[i] for i in (0, 1, 2, 3, 5)])
        assert all(torch.equal(outs[i], blocks[i]) for i in (0, 1, 2, 3, 5))


@pytest.mark.parametrize("shape", [(), (0,), (1,), (1, 1), (3, 0, 2), (2, 1, 3), (1, 3, 1, 1), (2, 3, 4, 5, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.bool])
def test_new_tensor_is_like_torch_empty(shape, dtype):
    for _ in range(2):  # the second call uses the cached template
        t = new_tensor(shape, dtype)
        ref = torch.empty(shape, dtype=dtype)
        assert (t.shape, t.stride(), t.dtype, t.device) == (ref.shape, ref.stride(), ref.dtype, ref.device)
        assert t.is_contiguous() and t.untyped_storage().nbytes() == ref.untyped_storage().nbytes()


def test_new_tensor_has_standard_strides_for_every_small_shape():
    """``new_tensor`` relies on ``empty_like`` laying out a zero-stride template contiguously (never as
    channels-last): every 1- to 5-dimensional shape of sizes 0-3, including size-1 channel dimensions."""
    for ndim in range(1, 6):
        for shape in itertools.product(range(4), repeat=ndim):
            t, ref = new_tensor(shape, torch.float16), torch.empty(shape, dtype=torch.float16)
            assert t.stride() == ref.stride() and t.untyped_storage().nbytes() == ref.untyped_storage().nbytes(), shape


def test_allocator_reuses_the_most_recently_freed_range_of_a_size():
    a = ArenaAllocator(1000 * 256, min_block=256)
    blocks = [a.alloc(256) for _ in range(100)]
    for block in blocks[:90:2]:
        a.free(block)
    assert a.alloc(256) == blocks[88]
    assert a.alloc(256) == blocks[86]
    a.free(blocks[1])  # coalesces with its free neighbours 0 and 2: a 768-byte range
    assert a.alloc(256) == blocks[84]


def test_put_many_takes_any_iterable_of_pairs_and_checks_them_all_first():
    with tiercache.Cache(host="1MiB", disk=None) as cache:
        cache.put_many(zip(range(3), (torch.full((4,), float(i)) for i in range(3))), scores=iter([1, 2, 3]))
        assert all(torch.equal(cache.get(i), torch.full((4,), float(i))) for i in range(3))
        with pytest.raises((TypeError, ValueError)):
            cache.put_many([(10, torch.ones(2)), 11])  # not a pair: nothing stored
        with pytest.raises(ValueError, match="scores"):
            cache.put_many([(10, torch.ones(2))], scores=[1, 2])
        assert 10 not in cache and len(cache) == 3
    with pytest.raises(CacheClosedError):
        cache.put_many([(10, torch.ones(2)), 11])


@pytest.mark.parametrize("where", ["main", "main-busy", "thread"])
def test_copy_pairs_merges_evenly_spaced_runs_and_writes_exactly_the_pairs(where, monkeypatch):
    """On the main thread of an idle machine, runs of evenly spaced pairs become one copy; pairs that
    break the spacing, change strides or would leave a storage are copied one by one; off the main
    thread, or with several torch threads on a busy machine, nothing is merged.  The bytes written are
    exactly the per-pair copies' and nothing beside them."""
    import threading

    from tiercache import batched

    gen = torch.Generator().manual_seed(0)
    arena = torch.randn(40 * 3 * 8 * 4, generator=gen)
    slot = 3 * 8 * 4
    # slots 0,2,4,6 (a run), 9, 11 (a run of 2 with another spacing), then a tensor in another storage
    starts = [0, 2, 4, 6, 9, 11]
    srcs = [arena[k * slot:(k + 1) * slot].view(1, 3, 8, 4) for k in starts] + [torch.randn(1, 3, 8, 4, generator=gen)]
    buf = torch.zeros(1, 3, 8 * 8 + 5, 4)
    dsts = [buf[:, :, j * 8:(j + 1) * 8] for j in range(len(srcs))]
    expect = buf.clone()
    for d, s in zip(expect[:, :, :8 * len(srcs)].unflatten(2, (len(srcs), 8)).unbind(2), srcs):
        d.copy_(s)
    merged = []
    original = batched._copy_run

    def spy(*args):
        ok = original(*args)
        merged.append((args[2], ok))
        return ok

    monkeypatch.setattr(batched, "_copy_run", spy)
    monkeypatch.setattr(batched, "_idle", [float("inf"), where != "main-busy"])  # the cached load check
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    if where == "thread":
        t = threading.Thread(target=batched.copy_pairs, args=(dsts, srcs))
        t.start()
        t.join()
    else:
        batched.copy_pairs(dsts, srcs)
    assert torch.equal(buf, expect)
    if where == "main":
        assert (4, True) in merged and (2, True) in merged  # slots 0..6 and 9, 11 went as runs
    else:
        assert merged == []
    # a run whose last view would leave the arena is refused (bounds-checked), not copied out of bounds
    assert batched._run_view(arena[-slot:].view(1, 3, 8, 4), 2, slot * 4) is None


@pytest.mark.parametrize("on_caller", [False, True])
@pytest.mark.parametrize("where", ["main-busy", "thread"])
def test_copy_pairs_merges_pairs_above_the_grain_on_a_busy_main_thread(where, on_caller, monkeypatch):
    """Pairs of at least torch's copy grain (each would open a parallel team of its own) are merged into
    runs on the main thread of a busy machine, and copied on that thread (``BUSY_COPIES_ON_CALLER``: no
    parallel region) or by torch (switched off); off the main thread they are copied pair by pair by torch
    either way.  The bytes written are exactly the pairs'."""
    import threading

    from tiercache import batched

    monkeypatch.setattr(batched, "BUSY_COPIES_ON_CALLER", on_caller)
    on_caller_calls = []
    original_on_caller = batched.copy_on_caller
    monkeypatch.setattr(batched, "copy_on_caller", lambda *a: on_caller_calls.append(len(a[0])) or original_on_caller(*a))

    n, block = 4, batched.INTRA_OP_GRAIN // (3 * 16) + 1  # (2, 1, 3, block, 16): above the grain
    gen = torch.Generator().manual_seed(1)
    arena = torch.randn(n + 1, 2, 1, 3, block, 16, generator=gen)
    srcs = list(arena.unbind(0))[:n]
    buf = torch.zeros(2, 1, 3, n * block + 7, 16)
    dsts = [buf[:, :, :, j * block:(j + 1) * block] for j in range(n)]
    assert dsts[0].numel() >= batched.INTRA_OP_GRAIN
    expect = buf.clone()
    for d, s in zip(expect[:, :, :, :n * block].unflatten(3, (n, block)).unbind(3), srcs):
        d.copy_(s)
    merged = []
    original = batched._copy_run
    monkeypatch.setattr(batched, "_copy_run", lambda *a: merged.append(a[2]) or original(*a))
    monkeypatch.setattr(batched, "_idle", [float("inf"), False])  # busy
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    if where == "thread":
        t = threading.Thread(target=batched.copy_pairs, args=(dsts, srcs))
        t.start()
        t.join()
        assert merged == []  # off the main thread: pair by pair, by torch, either way
        assert on_caller_calls == []
    else:
        batched.copy_pairs(dsts, srcs)
        assert merged == [n]
        assert on_caller_calls == ([1] if on_caller else [])  # the run, as one pair of views
    assert torch.equal(buf, expect)


def test_copy_on_caller_writes_exactly_the_pairs_or_nothing():
    """``copy_on_caller`` writes each pair's bytes and nothing beside them (block slices of a buffer, a
    contiguous float64 pair, a transposed source, bfloat16, which numpy lacks); any pair it cannot copy (an
    expanded destination, a dtype or shape mismatch, a destination that requires grad, a conjugate view)
    makes it return False before anything is written."""
    from tiercache import batched

    gen = torch.Generator().manual_seed(3)
    buf = torch.zeros(2, 1, 3, 3 * 10 + 4, 8)
    dsts = [buf[:, :, :, j * 10:(j + 1) * 10] for j in range(3)]
    srcs = [torch.randn(2, 1, 3, 10, 8, generator=gen) for _ in range(2)]
    srcs.append(torch.randn(2, 1, 3, 8, 10, generator=gen).transpose(3, 4))  # not contiguous
    whole = torch.zeros(5, 7, dtype=torch.float64)
    half = torch.zeros(6, 9, dtype=torch.bfloat16)[:, 1:]
    dsts += [whole, half]
    srcs += [torch.randn(5, 7, generator=gen, dtype=torch.float64), torch.randn(6, 8, generator=gen).bfloat16()]
    expect = buf.clone()
    for d, s in zip(expect[:, :, :, :30].unflatten(3, (3, 10)).unbind(3), srcs):
        d.copy_(s)
    assert batched.copy_on_caller(dsts, srcs) is True
    assert torch.equal(buf, expect) and torch.equal(whole, srcs[3]) and torch.equal(half, srcs[4])
    complex_dst = torch.zeros(4, 8, dtype=torch.complex64)
    for bad_dst, bad_src in [
        (torch.zeros(1, 8).expand(4, 8), torch.randn(4, 8)),                      # expanded: elements share memory
        (dsts[0], srcs[0].double()),                                              # dtype
        (dsts[0], torch.randn(2, 1, 3, 8, 10)),                                   # shape
        (torch.zeros(2, 1, 3, 10, 8, requires_grad=True), srcs[0]),               # requires grad
        (complex_dst, torch.randn(4, 8, dtype=torch.complex64).conj()),           # a conjugate view
    ]:
        before = buf.clone()
        assert batched.copy_on_caller([dsts[1], bad_dst], [torch.ones(2, 1, 3, 10, 8), bad_src]) is False
        assert torch.equal(buf, before)  # not even the good first pair was written
    assert not complex_dst.any()


def test_copy_pairs_does_not_merge_at_one_torch_thread(monkeypatch):
    """At one torch thread every pair goes through one ``_foreach_copy_`` (merging only adds work there),
    on the main thread of an idle machine too; the bytes written are exactly the pairs'."""
    from tiercache import batched

    n, block = 4, 8
    arena = torch.randn(n, 1, 3, block, 4, generator=torch.Generator().manual_seed(2))
    srcs = list(arena.unbind(0))
    buf = torch.zeros(1, 3, n * block + 3, 4)
    dsts = [buf[:, :, j * block:(j + 1) * block] for j in range(n)]
    merged = []
    original = batched._copy_run
    monkeypatch.setattr(batched, "_copy_run", lambda *a: merged.append(a[2]) or original(*a))
    monkeypatch.setattr(batched, "_idle", [float("inf"), True])  # idle
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    batched.copy_pairs(dsts, srcs)
    assert merged == []
    assert torch.equal(buf[:, :, : n * block], torch.cat(srcs, dim=2))
    assert not buf[:, :, n * block :].any()
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # the same pairs are merged with two threads
    batched.copy_pairs(dsts, srcs)
    assert merged == [n]


def test_machine_idle_falls_back_to_the_load_average_and_assumes_busy_without_one(monkeypatch):
    import os

    from tiercache import batched

    monkeypatch.setattr(batched, "_cpu_busy_seconds", lambda: None)  # no /proc/stat
    monkeypatch.setattr(batched, "_idle", [float("-inf"), False, None])
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert batched.machine_idle() is True
    monkeypatch.setattr(batched, "_idle", [float("-inf"), True, None])
    monkeypatch.setattr(os, "getloadavg", lambda: (batched._CORES + 1.0, 0.0, 0.0))
    assert batched.machine_idle() is False
    monkeypatch.setattr(batched, "_idle", [float("-inf"), True, None])
    monkeypatch.delattr(os, "getloadavg")
    assert batched.machine_idle() is False


def test_machine_idle_counts_other_processes_cpu_not_the_load_average(monkeypatch):
    """Busy time of the machine less our own CPU time decides; a high load average (our own threads
    blocked in direct reads count in it) does not."""
    import os
    import time

    from tiercache import batched

    clock = {"busy": 100.0, "own": 10.0, "wall": 1000.0}
    monkeypatch.setattr(batched, "_cpu_busy_seconds", lambda: clock["busy"])
    monkeypatch.setattr(time, "process_time", lambda: clock["own"])
    monkeypatch.setattr(time, "monotonic", lambda: clock["wall"])
    monkeypatch.setattr(os, "getloadavg", lambda: (batched._CORES + 8.0, 0.0, 0.0))
    monkeypatch.setattr(batched, "_idle", [float("-inf"), False, None])
    assert batched.machine_idle() is False  # first check: no earlier sample, the load average decides
    for busy, own, idle in ((1.9, 1.8, True),  # the machine's busy time is ours: idle at any load average
                            (1.9, 0.9, False),  # others kept a core busy
                            (0.4, 0.0, True)):  # others used 0.4 of a core
        clock["wall"] += 1.0
        clock["busy"] += busy
        clock["own"] += own
        assert batched.machine_idle() is idle
    clock["wall"] += 0.1  # checked at most twice a second: the last answer stands
    clock["busy"] += 5.0
    assert batched.machine_idle() is True
    assert batched._others_busy((1.0, 0.0, 0.0), (1.0, 5.0, 0.0)) == float("inf")


def test_cpu_busy_seconds_reads_proc_stat_where_there_is_one():
    from tiercache import batched

    busy = batched._cpu_busy_seconds()
    if os.path.exists("/proc/stat"):
        assert busy is not None and busy > 0
    else:
        assert busy is None


def test_get_many_checks_tuple_keys_that_are_not_the_stored_object():
    """A tuple key that is the stored object itself skips the type walk; an equal tuple of other types (a
    float equal to a stored int) or an unhashable one still raises TypeError, with nothing counted."""
    with tiercache.Cache(host="1MiB", disk=None) as cache:
        key = ("a", 1, b"x")
        cache.put(key, torch.ones(3))
        assert torch.equal(cache.get_many([key])[0], torch.ones(3))
        assert torch.equal(cache.get_many([("a", 1, b"x")])[0], torch.ones(3))  # an equal, new object
        gets = cache.stats()["gets"]
        with pytest.raises(TypeError, match="float"):
            cache.get_many([key, ("a", 1.0, b"x")])
        with pytest.raises(TypeError, match="list"):
            cache.get_many([key, ("a", [1])])
        assert cache.stats()["gets"] == gets


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch's deprecation of quantized tensors
def test_single_put_fast_path_refuses_and_resolves_as_tensor_data_does():
    """The single put's inline checks (plain CPU tensors of real, non-quantized dtypes) leave every other
    value to tensor_data: same errors, same resolved values."""
    with tiercache.Cache(host="1MiB", disk=None) as cache:
        z = torch.complex(torch.arange(4.0), torch.ones(4))
        neg = z.conj().imag  # a real float32 tensor with the negative bit set
        assert neg.is_neg() and neg.dtype == torch.float32
        cache.put(1, neg)
        assert torch.equal(cache.get(1), -torch.ones(4))
        cache.put(2, z.conj())  # complex: tensor_data resolves the conjugate bit
        assert torch.equal(cache.get(2), torch.conj_physical(z))
        grad = torch.ones(3, requires_grad=True)
        cache.put(3, grad)
        assert not cache.get(3).requires_grad and torch.equal(cache.get(3), torch.ones(3))
        strided = torch.arange(12.0).view(3, 4).t()
        cache.put(4, strided)
        assert torch.equal(cache.get(4), strided)
        cache.put(5, torch.tensor([True, False]))
        assert cache.get(5).tolist() == [True, False]
        with pytest.raises(ValueError, match="dimensions"):
            cache.put(6, torch.ones([1] * 65))
        with pytest.raises(TypeError):
            cache.put(7, torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.quint8))
        with pytest.raises(TypeError):
            cache.put(8, torch.ones(2, device="meta"))
        with pytest.raises(TypeError):
            cache.put(True, torch.ones(2))  # a bool key (not an int key)
        with pytest.raises(ValueError, match="too long"):
            cache.put("x" * 3000, torch.ones(2))  # beyond the lazily encoded lengths: encoded and refused
        with pytest.raises(ValueError, match="too long"):
            cache.put(10 ** 2100, torch.ones(2))
        assert sorted(cache.keys()) == [1, 2, 3, 4, 5]


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch's deprecation of quantized tensors
def test_put_many_inline_checks_refuse_and_resolve_as_tensor_data_does():
    """``put_many``'s inline checks (plain CPU tensors of real, non-quantized dtypes, no grad) leave every
    other value to tensor_data: resolved negative and conjugate views, detached values (also on the
    torch-copy path of values over MEMMOVE_MAX_BYTES), strided values, and the same errors, before
    anything of the batch is stored."""
    with tiercache.Cache(host="8MiB", disk=None) as cache:
        z = torch.complex(torch.arange(4.0), torch.ones(4))
        neg = z.conj().imag
        assert neg.is_neg()
        big = torch.ones(MEMMOVE_MAX_BYTES // 4 + 64, requires_grad=True)
        strided = torch.arange(12.0).view(3, 4).t()
        cache.put_many([(1, neg), (2, z.conj()), (3, torch.ones(3, requires_grad=True)), (4, big), (5, strided),
                        (6, torch.tensor([True, False])), (7, torch.arange(5.0))])
        assert torch.equal(cache.get(1), -torch.ones(4))
        assert torch.equal(cache.get(2), torch.conj_physical(z))
        assert not cache.get(3).requires_grad and torch.equal(cache.get(3), torch.ones(3))
        got = cache.get(4)
        assert not got.requires_grad and torch.equal(got, torch.ones_like(big).detach())
        assert torch.equal(cache.get(5), strided)
        assert cache.get(6).tolist() == [True, False]
        assert torch.equal(cache.get(7), torch.arange(5.0))
        bad = [torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.quint8), torch.ones(2, device="meta"),
               torch.ones(4, 4).to_sparse(), torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])]
        for value in bad:
            with pytest.raises(TypeError):
                cache.put_many([(8, torch.ones(2)), (9, value)])
        with pytest.raises(ValueError, match="dimensions"):
            cache.put_many([(8, torch.ones(2)), (9, torch.ones([1] * 65))])
        assert 8 not in cache and sorted(cache.keys()) == [1, 2, 3, 4, 5, 6, 7]


@pytest.mark.parametrize("batched", [False, True])
def test_puts_encode_keys_when_the_entry_first_needs_its_header(tmp_path, batched):
    """Int and str keys of ``put`` and ``put_many`` are encoded when the entry moves to disk, and a reopen
    (and a verified disk read) finds them; values of one shape share one shape tuple."""
    value = torch.arange(256, dtype=torch.float32)
    keys = [0, -7, 10 ** 500, "é" * 510, "k"]
    with tiercache.Cache(host="2KiB", disk="1MiB", path=tmp_path / "s") as cache:
        if batched:
            cache.put_many([(key, value + len(str(key))) for key in keys])
        else:
            for key in keys:
                cache.put(key, value + len(str(key)))
        entries = [cache._index[key] for key in keys]
        assert all(e.shape is entries[0].shape for e in entries)
        assert cache.tiers_of(keys) == ["disk"] * 3 + ["host"] * 2  # the first three were demoted
        for key in keys:  # every get of a demoted entry reads the disk with its encoded key
            assert torch.equal(cache.get(key), value + len(str(key)))
        assert cache.stats()["corruptions"] == 0
    with tiercache.Cache(host=None, disk="1MiB", path=tmp_path / "s") as cache:
        assert sorted(map(repr, cache.keys())) == sorted(map(repr, keys))
        for key in keys:
            assert torch.equal(cache.get(key), value + len(str(key)))


def test_copy_pairs_on_a_busy_machine_copies_unmerged_pairs_on_the_caller_or_by_torch(monkeypatch):
    """Busy, two torch threads, pairs above the grain that do not form runs (destinations in reverse order):
    nothing is merged and the pairs go to ``copy_on_caller`` as one batch; pairs it refuses (complex128: no
    integer view of 16 bytes) are copied by torch instead.  The bytes are the pairs' either way."""
    from tiercache import batched

    block = batched.INTRA_OP_GRAIN // 16 + 1
    monkeypatch.setattr(batched, "_idle", [float("inf"), False])  # busy
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    calls = []
    original = batched.copy_on_caller
    monkeypatch.setattr(batched, "copy_on_caller", lambda d, s: calls.append(len(d)) or original(d, s))
    for dtype in (torch.float32, torch.complex128):
        calls.clear()
        gen = torch.Generator().manual_seed(4)
        srcs = [torch.randn(1, block, 16, generator=gen, dtype=dtype) for _ in range(3)]
        buf = torch.zeros(1, 3 * block + 5, 16, dtype=dtype)
        dsts = [buf[:, j * block:(j + 1) * block] for j in (2, 1, 0)]
        batched.copy_pairs(dsts, srcs)
        assert calls == [3]
        assert all(torch.equal(d, s) for d, s in zip(dsts, srcs)) and not buf[:, 3 * block:].any()
