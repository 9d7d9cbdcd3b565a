"""The user contract of tiercache.Cache."""

import json
import os
import threading
from concurrent.futures import Future

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import tiercache
from tiercache import (
    Cache,
    CacheClosedError,
    CacheConfig,
    CacheLockedError,
    FingerprintMismatchError,
    ScorePolicy,
    TierCacheError,
)
from tiercache.testing import make_value, same_tensor

KIB = 1024


def block(seed, nbytes=1024, dtype=torch.float32):
    """A value of exactly ``nbytes`` bytes."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return make_value(dtype, (nbytes // itemsize,), seed)


@pytest.fixture
def store(tmp_path):
    return tmp_path / "store"


class Evictions(list):
    def __call__(self, key, reason):
        self.append((key, reason))


# -- basics ------------------------------------------------------------------------------------------
def test_put_get_delete_contains_len():
    with Cache(host="64KiB") as cache:
        assert len(cache) == 0 and "a" not in cache
        value = torch.arange(12, dtype=torch.float32).reshape(3, 4)
        cache.put("a", value)
        cache.put(("b", 1), value * 2)
        assert len(cache) == 2 and "a" in cache and ("b", 1) in cache
        assert same_tensor(cache.get("a"), value)
        assert same_tensor(cache.get(("b", 1)), value * 2)
        assert sorted(map(repr, cache.keys())) == sorted(map(repr, ["a", ("b", 1)]))
        assert set(iter(cache)) == {"a", ("b", 1)}
        assert cache.delete("a") is True
        assert cache.delete("a") is False
        assert "a" not in cache and len(cache) == 1
        with pytest.raises(KeyError):
            cache.get("a")
        with pytest.raises(KeyError):
            cache.get("never")
        assert cache.tier_of(("b", 1)) == "host" and cache.tier_of("a") is None


def test_put_copies_in_and_get_copies_out():
    with Cache(host="64KiB") as cache:
        value = torch.zeros(16)
        cache.put("k", value)
        value += 1  # the caller keeps ownership of its tensor
        got = cache.get("k")
        assert torch.all(got == 0)
        got += 5  # the returned tensor is the caller's
        assert torch.all(cache.get("k") == 0)
        assert got.device.type == "cpu" and cache.get("k", device="cpu").device.type == "cpu"


def test_get_many_put_many():
    with Cache(host="64KiB") as cache:
        cache.put_many([(i, block(i, 256)) for i in range(5)], scores=[1, 2, 3, 4, 5])
        assert all(same_tensor(v, block(i, 256)) for i, v in enumerate(cache.get_many(range(5))))
        with pytest.raises(ValueError):
            cache.put_many([(9, block(9))], scores=[1, 2])
        with pytest.raises(KeyError):
            cache.get_many([0, 99])


DTYPES = [
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.bool, torch.complex64, torch.complex128,
    torch.float8_e4m3fn, torch.float8_e5m2, torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8,
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dtypes_round_trip_bit_exact_in_every_tier_and_after_reopen(store, dtype):
    shapes = [(), (0,), (3, 0, 2), (7,), (5, 33), (2, 3, 4)]
    values = {(str(dtype), i): make_value(dtype, shape, i) for i, shape in enumerate(shapes)}
    with Cache(host="64KiB", disk="1MiB", path=store) as cache:
        for key, value in values.items():
            cache.put(key, value)
            assert same_tensor(cache.get(key), value)
        cache.flush()  # everything moves to the disk tier
        for key, value in values.items():
            assert cache.tier_of(key) == "disk"
            got = cache.get(key)
            assert same_tensor(got, value), key
            assert got.dtype == dtype and tuple(got.shape) == tuple(value.shape)
    with Cache(host="64KiB", disk="1MiB", path=store) as cache:
        for key, value in values.items():
            assert same_tensor(cache.get(key), value), key


def test_nan_payloads_survive_bit_exact(store):
    value = torch.tensor([0x7FC00001, 0x7F800001, 0xFFC12345 - (1 << 32)], dtype=torch.int32).view(torch.float32)
    with Cache(host=None, disk="1MiB", path=store) as cache:
        cache.put("nan", value)
        assert same_tensor(cache.get("nan"), value)


@pytest.mark.parametrize("make", [
    lambda: torch.arange(60, dtype=torch.float32).reshape(6, 10).t(),
    lambda: torch.arange(100, dtype=torch.int64)[::3],
    lambda: torch.arange(8, dtype=torch.float16).expand(4, 8),
    lambda: torch.arange(120, dtype=torch.bfloat16).reshape(2, 3, 20)[:, 1:, ::2],
    lambda: torch.arange(10.0)[4:],  # a contiguous view with a storage offset
], ids=["transposed", "strided", "expanded", "sliced", "offset"])
def test_non_contiguous_and_view_inputs(store, make):
    value = make()
    expected = value.clone()
    with Cache(host="64KiB", disk="1MiB", path=store) as cache:
        cache.put("v", value)
        got = cache.get("v")
        assert same_tensor(got, expected) and got.is_contiguous()
        cache.flush()
        assert same_tensor(cache.get("v"), expected)


def test_requires_grad_input_is_detached():
    with Cache(host="64KiB") as cache:
        value = torch.ones(4, requires_grad=True)
        cache.put("g", value)
        got = cache.get("g")
        assert not got.requires_grad and torch.equal(got, torch.ones(4))


# -- stats -------------------------------------------------------------------------------------------
def test_stats_are_json_serialisable_and_count(store):
    with Cache(host="4KiB", disk="1MiB", path=store) as cache:
        for i in range(8):
            cache.put(i, block(i))
        cache.get(0)  # on disk by now
        cache.get(7)
        with pytest.raises(KeyError):
            cache.get("absent")
        stats = cache.stats()
        text = json.dumps(stats)
        assert json.loads(text) == stats
        assert stats["entries"] == len(cache) == 8
        assert stats["puts"] == 8 and stats["gets"] == 3 and stats["misses"] == 1 and stats["hits"] == 2
        assert stats["policy"] == "lru"
        host, disk = stats["tiers"]["host"], stats["tiers"]["disk"]
        assert host["capacity_bytes"] == 4096 and disk["capacity_bytes"] == 1 << 20
        assert host["entries"] + disk["entries"] == 8
        assert 0 < host["used_bytes"] <= 4096 and disk["used_bytes"] > 0
        assert disk["hits"] >= 1 and host["hits"] >= 1
        assert stats["bytes_moved"].get("host->disk", 0) >= 4 * 1024
        assert stats["corruptions"] == 0 and stats["evictions"] == 0


# -- overwrite and size limits -----------------------------------------------------------------------
def test_overwrite_frees_the_old_bytes(store):
    with Cache(host="64KiB", disk="1MiB", path=store) as cache:
        cache.put("k", block(1, 4096))
        host_used = cache.tiers[0].used
        for i in range(20):
            cache.put("k", block(i, 4096))
        assert cache.tiers[0].used == host_used and len(cache) == 1
        assert same_tensor(cache.get("k"), block(19, 4096))
        cache.put("k", block(0, 100))  # a smaller value: the larger block is returned
        assert cache.tiers[0].used < host_used
    with Cache(host=None, disk="1MiB", path=store) as cache:
        disk = cache.tiers[0]
        used = disk.used
        for i in range(10):
            cache.put("k", block(i, 5000))
            assert disk.used == disk.charge(5000)
        chunks = [p for p in store.rglob("c.*.0")]
        assert len(chunks) == 1, chunks
        assert same_tensor(cache.get("k"), block(9, 5000))
        assert used > 0


def test_value_larger_than_every_tier_is_a_value_error_and_changes_nothing(store):
    with Cache(host="4KiB", disk="64KiB", path=store) as cache:
        cache.put("small", block(1, 1000))
        with pytest.raises(ValueError, match="larger than every tier"):
            cache.put("huge", torch.zeros(1 << 20, dtype=torch.uint8))
        assert "huge" not in cache and same_tensor(cache.get("small"), block(1, 1000))
    # A host budget that is not a multiple of the slot granularity: the largest slot is the rounded budget.
    with Cache(host=100_000) as cache:
        for i in range(4):
            cache.put(i, block(i, 1024))
        evictions_before = cache.stats()["evictions"]
        with pytest.raises(ValueError, match="larger than every tier"):
            cache.put("huge", torch.zeros(99_841, dtype=torch.uint8))
        assert cache.stats()["evictions"] == evictions_before and len(cache) == 4
        cache.put("fits", torch.zeros(99_840, dtype=torch.uint8))  # the whole arena: evicts the rest
        assert list(cache.keys()) == ["fits"]


def test_value_too_big_for_host_goes_to_disk(store):
    with Cache(host="4KiB", disk="1MiB", path=store) as cache:
        cache.put("big", block(3, 16 * KIB))
        assert cache.tier_of("big") == "disk"
        assert same_tensor(cache.get("big"), block(3, 16 * KIB))
        assert cache.tier_of("big") == "disk"  # cannot be promoted: larger than the host tier


def test_tiers_of_is_tier_of_of_each_key_in_order(store):
    with Cache(host="4KiB", disk="1MiB", path=store) as cache:
        cache.put("big", block(3, 16 * KIB))
        cache.put(("s", 1), block(4, 512))
        keys = [("s", 1), "absent", "big", ("s", 1)]
        assert cache.tiers_of(keys) == [cache.tier_of(k) for k in keys] == ["host", None, "disk", "host"]
        assert cache.tiers_of([]) == []
    with pytest.raises(CacheClosedError):
        cache.tiers_of(["big"])


# -- bad input ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [[1, 2], 3.0, None, "tensor", torch.ones(3).numpy()], ids=repr)
def test_non_tensor_values_are_type_errors(value):
    with Cache(host="64KiB") as cache:
        with pytest.raises(TypeError, match="torch.Tensor"):
            cache.put("k", value)
        assert len(cache) == 0


def test_unsupported_tensors_are_type_errors():
    with Cache(host="64KiB") as cache:
        with pytest.raises(TypeError, match="strided"):
            cache.put("s", torch.eye(3).to_sparse())
        with pytest.raises(TypeError, match="meta"):
            cache.put("m", torch.empty(3, device="meta"))
        with pytest.raises(TypeError, match="score"):
            cache.put("x", torch.ones(1), score="high")


@pytest.mark.parametrize("key", [[1], 1.5, True, None, {"a": 1}, ("ok", [1]), ("ok", 2.0), bytearray(b"x")], ids=repr)
def test_unsupported_keys_are_type_errors(key):
    with Cache(host="64KiB") as cache:
        with pytest.raises(TypeError):
            cache.put(key, torch.ones(1))
        with pytest.raises(TypeError):
            cache.get(key)
        with pytest.raises(TypeError):
            cache.delete(key)
        with pytest.raises(TypeError):
            cache.prefetch([key])
        assert len(cache) == 0


def test_too_long_key_is_a_value_error():
    with Cache(host="64KiB") as cache:
        with pytest.raises(ValueError, match="too long"):
            cache.put("x" * 5000, torch.ones(1))


@pytest.mark.parametrize("options", [
    {"host": -1}, {"host": "-4KiB"}, {"host": "12 parsecs"}, {"host": "lots"}, {"host": 1.5}, {"host": True},
    {"gpu": "x"}, {"host": "1MiB", "disk": "-1", "path": "unused"},
], ids=repr)
def test_bad_capacities_are_value_errors(options):
    with pytest.raises(ValueError, match="capacity"):
        Cache(**options)


def test_bad_configurations_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="needs a path"):
        Cache(host="1MiB", disk="1MiB")
    with pytest.raises(ValueError, match="disk tier is disabled"):
        Cache(host="1MiB", path=tmp_path / "p")
    with pytest.raises(ValueError, match="every tier is disabled"):
        Cache(host=None)
    with pytest.raises(ValueError, match="every tier is disabled"):
        Cache(host=0, disk=None)
    with pytest.raises(ValueError, match="compression"):
        Cache(host="1MiB", compression="zstd")
    with pytest.raises(ValueError, match="compression"):
        Cache(host="1MiB", disk="1MiB", path=tmp_path / "z", compression="gzip")
    with pytest.raises(ValueError, match="unknown policy"):
        Cache(host="1MiB", policy="fifo")
    with pytest.raises(ValueError, match="io_threads"):
        Cache(host="1MiB", io_threads=0)
    with pytest.raises(TypeError, match="direct_io must be a bool"):  # "no" is truthy: it must not mean on
        Cache(host="1MiB", disk="1MiB", path=tmp_path / "d", direct_io="no")
    assert not (tmp_path / "d").exists() or not any((tmp_path / "d").iterdir())
    with pytest.raises(TypeError, match="gpu_device"):
        Cache(host="1MiB", gpu_device=0)
    with pytest.raises(TypeError):
        Cache(CacheConfig(), host="1MiB")
    with pytest.raises(TypeError):
        Cache({"host": "1MiB"})
    with pytest.raises(TypeError):
        Cache(tiers=[object()])
    with pytest.raises(TypeError):
        Cache(host="1MiB", colour="blue")


def test_path_that_is_a_file_is_a_value_error(tmp_path):
    target = tmp_path / "a-file"
    target.write_text("not a directory")
    with pytest.raises(ValueError, match="not a directory"):
        Cache(host="1MiB", disk="1MiB", path=target)
    assert target.read_text() == "not a directory"


def test_path_that_is_not_writable_is_a_value_error(tmp_path):
    if os.geteuid() == 0:  # root writes anywhere a normal filesystem allows: use one that refuses everyone
        target = "/proc/tiercache-test-store"
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        target = locked / "store"
    with pytest.raises(ValueError, match="disk path"):
        Cache(host="1MiB", disk="1MiB", path=target)


def test_non_empty_foreign_directory_is_refused(tmp_path):
    (tmp_path / "mine.txt").write_text("user data")
    with pytest.raises(ValueError, match="not empty"):
        Cache(host="1MiB", disk="1MiB", path=tmp_path)
    assert (tmp_path / "mine.txt").read_text() == "user data"


# -- locking, closing, reopening ---------------------------------------------------------------------
def test_two_open_caches_on_the_same_path_are_refused(store):
    first = Cache(host="1MiB", disk="1MiB", path=store)
    with pytest.raises(CacheLockedError):
        Cache(host="1MiB", disk="1MiB", path=store)
    with pytest.raises(CacheLockedError):
        Cache(host=None, disk="2MiB", path=store)
    first.put("k", torch.ones(3))
    first.close()
    with Cache(host="1MiB", disk="1MiB", path=store) as second:
        assert torch.equal(second.get("k"), torch.ones(3))


def test_closed_cache_raises(store):
    cache = Cache(host="1MiB", disk="1MiB", path=store)
    cache.put("k", torch.ones(3))
    cache.close()
    cache.close()  # idempotent
    for call in (
        lambda: cache.put("k", torch.ones(1)),
        lambda: cache.get("k"),
        lambda: cache.delete("k"),
        lambda: cache.prefetch(["k"]),
        lambda: cache.update_scores({"k": 1.0}),
        lambda: cache.flush(),
    ):
        with pytest.raises(CacheClosedError):
            call()
    assert isinstance(CacheClosedError("x"), tiercache.TierCacheError)


def test_reopen_sees_entries_bit_exact(store):
    values = {("e", i): make_value(torch.bfloat16 if i % 2 else torch.float32, (i % 5, 37), i) for i in range(40)}
    with Cache(host="4KiB", disk="4MiB", path=store, fingerprint="fp") as cache:
        for key, value in values.items():
            cache.put(key, value)
        cache.delete(("e", 3))
        del values[("e", 3)]
        tiers = {cache.tier_of(k) for k in values}
        assert tiers == {"host", "disk"}  # some entries only ever lived in host memory
    with Cache(host="4KiB", disk="4MiB", path=store, fingerprint="fp") as cache:
        assert len(cache) == len(values) and ("e", 3) not in cache
        for key, value in values.items():
            assert same_tensor(cache.get(key), value), key
    with Cache(host=None, disk="4MiB", path=store) as cache:  # a different tier layout reads the same store
        for key, value in values.items():
            assert same_tensor(cache.get(key), value), key


def test_reopen_with_zstd_compression(store):
    values = {i: make_value(torch.float16, (200,), i) for i in range(10)}
    values["zeros"] = torch.zeros(5000)
    with Cache(host="4KiB", disk="1MiB", path=store, compression="zstd") as cache:
        for key, value in values.items():
            cache.put(key, value)
    with Cache(host="4KiB", disk="1MiB", path=store) as cache:
        for key, value in values.items():
            assert same_tensor(cache.get(key), value)


def test_fingerprint_mismatch_on_reopen(store):
    with Cache(host="1MiB", disk="1MiB", path=store, fingerprint="llama-3-8b@abc") as cache:
        cache.put("kv", torch.ones(4))
    with pytest.raises(FingerprintMismatchError):
        Cache(host="1MiB", disk="1MiB", path=store, fingerprint="mistral-7b@def")
    assert issubclass(FingerprintMismatchError, ValueError)
    # The failed open released the path: the right fingerprint opens it and serves the data.
    with Cache(host="1MiB", disk="1MiB", path=store, fingerprint="llama-3-8b@abc") as cache:
        assert torch.equal(cache.get("kv"), torch.ones(4))


def test_deleted_entries_do_not_come_back(store):
    with Cache(host=None, disk="1MiB", path=store) as cache:
        for i in range(5):
            cache.put(i, block(i))
        cache.delete(2)
    with Cache(host=None, disk="1MiB", path=store) as cache:
        assert sorted(cache.keys()) == [0, 1, 3, 4]


def test_reopen_with_a_smaller_budget_is_refused_and_loses_nothing(store):
    with Cache(host=None, disk="1MiB", path=store) as cache:
        for i in range(10):
            cache.put(i, block(i, 4096))
        charge = cache.tiers[0].charge(4096)
    dropped = Evictions()
    with pytest.raises(tiercache.OverBudgetError, match="never deletes data"):
        Cache(host=None, disk=4 * charge, path=store, on_evict=dropped)
    assert dropped == []
    with Cache(host=None, disk="1MiB", path=store) as cache:  # the refused open released the path lock
        assert sorted(cache.keys()) == list(range(10))
        for key in cache.keys():
            assert same_tensor(cache.get(key), block(key, 4096))


def test_the_facade_refuses_a_persistent_tier_recovered_over_its_budget(store):
    from tiercache.tiers.disk import DiskTier

    with Cache(host=None, disk="1MiB", path=store) as cache:
        for i in range(4):
            cache.put(i, block(i, 4096))
    tier = DiskTier(store, 1 << 20)
    real_recover = tier.recover

    def recover_then_shrink():
        yield from real_recover()
        tier.capacity = 8192 + 4  # smaller than the four entries it just yielded
    tier.recover = recover_then_shrink
    with pytest.raises(tiercache.OverBudgetError, match="disk tier holds"):
        Cache(tiers=[tier])
    tier.close()
    with Cache(host=None, disk="1MiB", path=store) as cache:
        assert sorted(cache.keys()) == [0, 1, 2, 3]


def test_close_reports_entries_that_do_not_fit_the_disk(store):
    dropped = Evictions()
    with Cache(host="64KiB", disk=3 * (8192 + 4), path=store, on_evict=dropped) as cache:
        for i in range(6):
            cache.put(i, block(i, 2048))
        assert dropped == []
    assert sorted(k for k, r in dropped if r == "close") == [0, 1, 2]  # LRU: the oldest do not fit
    with Cache(host="64KiB", disk=3 * (8192 + 4), path=store) as cache:
        assert sorted(cache.keys()) == [3, 4, 5]


# -- policies ----------------------------------------------------------------------------------------
def test_lru_evicts_the_least_recently_used(store):
    dropped = Evictions()
    with Cache(host="4KiB", policy="lru", on_evict=dropped) as cache:
        for i in range(4):
            cache.put(i, block(i))  # exactly fills the host tier
        cache.get(0)
        cache.get(2)
        cache.put(4, block(4))
        cache.put(5, block(5))
        assert dropped == [(1, "capacity"), (3, "capacity")]
        assert sorted(cache.keys()) == [0, 2, 4, 5]
        assert cache.stats()["evictions"] == 2


def test_lru_demotes_to_disk_then_drops_from_disk(store):
    dropped = Evictions()
    disk = 2 * (4096 + 4096 + 4)
    with Cache(host="2KiB", disk=disk, path=store, policy="lru", on_evict=dropped) as cache:
        for i in range(4):
            cache.put(i, block(i))
        # host holds 2 (2 and 3), disk holds 2 (0 and 1)
        assert [cache.tier_of(i) for i in range(4)] == ["disk", "disk", "host", "host"]
        cache.put(4, block(4))  # 2 goes to disk, so 0 (least recent) leaves the disk
        assert dropped == [(0, "capacity")]
        assert [cache.tier_of(i) for i in range(1, 5)] == ["disk", "disk", "host", "host"]


def test_lfu_evicts_the_least_frequently_used():
    dropped = Evictions()
    with Cache(host="4KiB", policy="lfu", on_evict=dropped) as cache:
        for i in range(4):
            cache.put(i, block(i))
        for key, hits in {0: 3, 1: 1, 2: 0, 3: 2}.items():
            for _ in range(hits):
                cache.get(key)
        cache.put(4, block(4))
        cache.put(5, block(5))
        assert [k for k, _ in dropped] == [2, 4]  # 2 had no hits; then the new 4 (0 hits) goes before 1
        assert sorted(cache.keys()) == [0, 1, 3, 5]


def test_score_policy_evicts_the_lowest_score_and_update_scores_changes_the_victim():
    dropped = Evictions()
    with Cache(host="4KiB", policy="score", on_evict=dropped) as cache:
        for i, score in enumerate([5.0, 1.0, 3.0, 4.0]):
            cache.put(i, block(i), score=score)
        assert cache.update_scores({1: 10.0, 3: 0.5, "absent": 7.0}) == 2
        cache.put(4, block(4), score=2.0)
        assert dropped == [(3, "capacity")]
        cache.put(5, block(5), score=9.0)
        assert dropped == [(3, "capacity"), (4, "capacity")]
        # A re-put keeps its score when none is given.
        cache.put(1, block(11))
        cache.put(6, block(6), score=6.0)
        assert dropped[-1] == (2, "capacity")
        assert sorted(cache.keys()) == [0, 1, 5, 6]


def test_custom_policy_object():
    class BiggestFirst:
        name = "biggest-first"

        def rank(self, info):
            return (-info.nbytes, info.last_access)

        def promote(self, info, src, dst):
            return True

    dropped = Evictions()
    with Cache(host="4KiB", policy=BiggestFirst(), on_evict=dropped) as cache:
        cache.put("small", block(1, 512))
        cache.put("big", block(2, 2048))
        cache.put("mid", block(3, 1024))
        cache.put("new", block(4, 1024))
        assert dropped == [("big", "capacity")]
        assert cache.stats()["policy"] == "biggest-first"


def test_on_evict_errors_do_not_break_the_cache():
    def boom(key, reason):
        raise RuntimeError("user bug")

    with Cache(host="2KiB", on_evict=boom) as cache:
        for i in range(10):
            cache.put(i, block(i))
        assert len(cache) == 2 and same_tensor(cache.get(9), block(9))


def test_get_promotes_from_disk_to_host_under_lru(store):
    with Cache(host="4KiB", disk="1MiB", path=store, policy="lru") as cache:
        for i in range(8):
            cache.put(i, block(i))
        assert cache.tier_of(0) == "disk"
        assert same_tensor(cache.get(0), block(0))
        assert cache.tier_of(0) == "host"
        assert cache.tier_of(4) == "disk"  # the least recent host entry made room
        assert cache.stats()["bytes_moved"]["disk->host"] == 1024
        assert len(cache) == 8 and all(same_tensor(cache.get(i), block(i)) for i in range(8))


def test_lfu_promotes_from_the_second_hit(store):
    with Cache(host="4KiB", disk="1MiB", path=store, policy="lfu") as cache:
        for i in range(8):
            cache.put(i, block(i))
        disk_key = next(i for i in range(8) if cache.tier_of(i) == "disk")
        cache.get(disk_key)
        assert cache.tier_of(disk_key) == "disk"
        cache.get(disk_key)
        assert cache.tier_of(disk_key) == "host"


def test_score_policy_promotes_above_its_threshold(store):
    with Cache(host="4KiB", disk="1MiB", path=store, policy=ScorePolicy(promote_threshold=1.0)) as cache:
        for i in range(8):
            cache.put(i, block(i), score=float(i))
        assert cache.tier_of(0) == "disk"
        cache.update_scores({0: 0.5})
        cache.get(0)
        assert cache.tier_of(0) == "disk"
        cache.update_scores({0: 100.0})
        cache.get(0)
        assert cache.tier_of(0) == "host"


def test_prefetch_returns_a_future_and_stages_into_the_fastest_tier(store):
    with Cache(host="8KiB", disk="1MiB", path=store) as cache:
        for i in range(16):
            cache.put(i, block(i))
        on_disk = [i for i in range(16) if cache.tier_of(i) == "disk"][:4]
        future = cache.prefetch(on_disk + ["absent"])
        assert isinstance(future, Future)
        assert future.result(timeout=30) == 4
        assert [cache.tier_of(i) for i in on_disk] == ["host"] * 4
        assert cache.prefetch([]).result(timeout=30) == 0
        assert all(same_tensor(cache.get(i), block(i)) for i in range(16))


def test_flush_moves_everything_to_disk(store):
    with Cache(host="64KiB", disk="1MiB", path=store) as cache:
        for i in range(5):
            cache.put(i, block(i))
        cache.flush()
        assert {cache.tier_of(i) for i in range(5)} == {"disk"}
        assert all(same_tensor(cache.get(i), block(i)) for i in range(5))


def test_custom_tiers(tmp_path):
    from tiercache.tiers import ArenaTier, DiskTier

    tiers = [ArenaTier("fast", 2048), ArenaTier("slow", 8192), DiskTier(tmp_path / "d", 1 << 20)]
    with Cache(tiers=tiers) as cache:
        for i in range(12):
            cache.put(i, block(i))
        assert {cache.tier_of(i) for i in range(12)} == {"fast", "slow", "d" if False else "disk"}
        assert set(cache.stats()["tiers"]) == {"fast", "slow", "disk"}
    with pytest.raises(ValueError, match="unique"):
        Cache(tiers=[ArenaTier("host", 2048), ArenaTier("host", 2048)])


def test_repr_and_config_object(store):
    config = CacheConfig(host="1MiB", disk="2MiB", path=store, policy="lfu")
    with Cache(config) as cache:
        text = repr(cache)
        assert "host=1.0 MiB" in text and "disk=2.0 MiB" in text and "lfu" in text


def test_calls_from_many_threads_share_one_cache():
    with Cache(host="64KiB") as cache:
        errors = []

        def work(t):
            try:
                for i in range(50):
                    cache.put((t, i), block(i, 256))
                    assert same_tensor(cache.get((t, i)), block(i, 256))
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == [] and len(cache) == 200


def test_errors_hierarchy():
    assert issubclass(tiercache.TierIOError, OSError)
    assert issubclass(tiercache.CacheLockedError, TierCacheError)
    assert issubclass(tiercache.CorruptEntryError, TierCacheError)


# -- values that are views or unusual layouts (issue 7, item 11) --------------------------------------------
def test_put_of_a_conjugate_or_negative_view_stores_the_values_it_shows():
    with Cache(host="1MiB") as cache:
        z = torch.tensor([1 + 2j, 3 - 4j])
        cache.put("conj", z.conj())
        cache.put("neg", torch.tensor([1 + 2j]).conj().imag)  # a negative view
        got = cache.get("conj")
        assert not got.is_conj() and torch.equal(got, torch.tensor([1 - 2j, 3 + 4j]))
        assert torch.equal(cache.get("neg"), torch.tensor([-2.0]))


@pytest.mark.parametrize("make", [
    lambda: torch.nested.nested_tensor([torch.ones(2), torch.ones(3)]),
    lambda: torch.eye(3).to_sparse(),
    lambda: torch.eye(3).to_sparse_csr(),
])
def test_non_strided_values_are_refused_with_type_error(make):
    with Cache(host="1MiB") as cache:
        with pytest.raises(TypeError):
            cache.put("x", make())
        assert len(cache) == 0


def test_values_of_more_than_max_dims_are_refused():
    from tiercache.keys import MAX_DIMS

    with Cache(host="1MiB") as cache:
        cache.put("ok", torch.ones([1] * MAX_DIMS))
        assert cache.get("ok").shape == (1,) * MAX_DIMS
        with pytest.raises(ValueError, match="dimensions"):
            cache.put("too many", torch.ones([1] * (MAX_DIMS + 1)))


# -- batch-first paths and get_many(out=[...]) (C5) ----------------------------------------------------------
@pytest.mark.parametrize("disk", [False, True])
def test_get_many_into_caller_views_of_any_shape_and_strides(tmp_path, disk):
    kwargs = dict(host="4KiB", disk="4MiB", path=tmp_path / "s") if disk else dict(host="1MiB")
    with Cache(**kwargs) as cache:
        values = {f"k{i}": torch.randn(4, 8, dtype=torch.float64) for i in range(40)}  # host holds some
        cache.put_many(values.items())
        keys = list(values)
        if disk:
            assert {cache.tier_of(k) for k in keys} == {"host", "disk"}
        big = torch.zeros(len(keys), 8, 4, dtype=torch.float64)
        outs = [big[i].t() for i in range(len(keys))]  # non-contiguous (8,4)^T views: shape (4, 8)
        got = cache.get_many(keys, out=outs)
        assert all(g is o for g, o in zip(got, outs))
        for key, out in zip(keys, outs):
            assert torch.equal(out, values[key])
        flat = [torch.empty(32, dtype=torch.float64) for _ in keys]  # another shape, same numel
        cache.get_many(keys, out=flat)
        assert all(torch.equal(f.view(4, 8), values[k]) for f, k in zip(flat, keys))


def test_get_many_out_list_checks_each_tensor_and_copies_nothing_on_error():
    with Cache(host="1MiB") as cache:
        cache.put("a", torch.ones(3))
        cache.put("b", torch.ones(2, dtype=torch.int32))
        before = cache.stats()
        with pytest.raises(ValueError, match="'b'.*dtype"):
            cache.get_many(["a", "b"], out=[torch.zeros(3), torch.zeros(2)])
        with pytest.raises(ValueError, match="'a'.*elements"):
            cache.get_many(["a", "b"], out=[torch.zeros(4), torch.zeros(2, dtype=torch.int32)])
        with pytest.raises(ValueError, match="2 keys"):
            cache.get_many(["a", "b"], out=[torch.zeros(3)])
        with pytest.raises(ValueError, match="requested"):
            cache.get_many(["a"], device="meta", out=[torch.zeros(3)])
        out = [torch.zeros(3), torch.zeros(2, dtype=torch.int32)]
        with pytest.raises(KeyError):
            cache.get_many(["a", "missing"], out=out[:1] + [torch.zeros(1)])
        assert cache.stats()["hits"] == before["hits"]  # refused calls counted no hits
        assert not cache._pins


def test_put_many_validates_every_item_before_storing_any():
    with Cache(host="1MiB") as cache:
        with pytest.raises(TypeError):
            cache.put_many([("a", torch.ones(1)), ("b", "not a tensor")])
        assert len(cache) == 0
        cache.put_many([("a", torch.ones(1)), ("a", torch.full((1,), 2.0))])  # a later duplicate wins
        assert cache.get("a").item() == 2.0 and cache.stats()["puts"] == 2


def test_delete_many_counts_what_was_present():
    with Cache(host="1MiB") as cache:
        cache.put_many([(i, torch.ones(4)) for i in range(5)])
        assert cache.delete_many([0, 2, 99, 2]) == 2
        assert sorted(cache.keys()) == [1, 3, 4]


class InsertionOrder:
    name = "insertion"
    rank_reads_access = False

    def __init__(self):
        self.ranked = 0

    def rank(self, info):
        self.ranked += 1
        return info.inserted

    def promote(self, info, src, dst):
        return False


def test_a_policy_whose_rank_ignores_access_is_not_reranked_on_hits():
    policy = InsertionOrder()
    with Cache(host="1MiB", policy=policy) as cache:
        cache.put_many([(i, torch.ones(4)) for i in range(10)])
        ranked = policy.ranked
        cache.get_many(list(range(10)))
        cache.get(3)
        assert policy.ranked == ranked  # no queue push per hit
        assert cache._index[3].info.hits == 2  # but the info promote() sees is current


class _CopySpy(TorchDispatchMode):
    """Records the dtype of every ``copy_`` torch runs (a uint8 view of a float tensor would show here)."""

    def __init__(self):
        super().__init__()
        self.dtypes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.copy_.default:
            self.dtypes.append(args[0].dtype)
        return func(*args, **(kwargs or {}))


def test_memory_tier_copies_run_in_the_value_dtype():
    """C1: small contiguous CPU values move with one memmove (no torch copy at all); a strided value and a
    large one are copied by torch in the value's own dtype, never through a uint8 view."""
    from tiercache.tiers.memory import MEMMOVE_MAX_BYTES

    small = torch.randn(16, dtype=torch.bfloat16)
    strided = torch.randn(8, 6, dtype=torch.bfloat16)[:, ::2]
    large = torch.randn(MEMMOVE_MAX_BYTES // 2 + 8, dtype=torch.bfloat16)  # just over the memmove limit
    with Cache(host="8MiB") as cache:
        with _CopySpy() as spy:
            cache.put("small", small)
            got_small = cache.get("small")
        assert spy.dtypes == []
        with _CopySpy() as spy:
            cache.put("strided", strided)
            cache.put("large", large)
            got_large = cache.get("large")
            outs = [torch.empty(16, dtype=torch.bfloat16), torch.empty(8, 3, dtype=torch.bfloat16)]
            cache.get_many(["small", "strided"], out=outs)
        assert spy.dtypes and set(spy.dtypes) == {torch.bfloat16}
    assert torch.equal(got_small, small) and torch.equal(got_large, large)
    assert torch.equal(outs[0], small) and torch.equal(outs[1], strided)


def test_disk_reads_go_through_read_into_when_the_tier_has_it(tmp_path):
    """C2: one batched ``read_into`` call per tier and batch, straight into contiguous CPU destinations;
    a damaged entry reported by position is dropped and raises KeyError for its key."""
    from tiercache.errors import CorruptEntryError
    from tiercache.tiers import DiskTier

    class BatchedDisk(DiskTier):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.calls, self.damaged = [], set()

        def read_into(self, items):
            self.calls.append(len(items))
            for i, (slot, header, buf) in enumerate(items):
                assert buf.dtype == torch.uint8 and buf.is_contiguous() and buf.numel() == slot.nbytes
                if header.key in self.damaged:
                    exc = CorruptEntryError("injected")
                    exc.tiercache_index = i
                    raise exc
                buf.copy_(self.read(slot, header))

    disk = BatchedDisk(tmp_path / "s", 1 << 20)
    from tiercache.keys import encode_key
    from tiercache.tiers import ArenaTier

    with Cache(tiers=[ArenaTier("host", 0), disk], policy="lru") as cache:
        values = {i: torch.randn(3, 5) for i in range(6)}
        cache.put_many(values.items())
        outs = [torch.empty(3, 5) for _ in values]
        cache.get_many(list(values), out=outs)
        assert disk.calls == [6]
        assert all(torch.equal(o, values[k]) for o, k in zip(outs, values))
        assert torch.equal(cache.get(2), values[2]) and disk.calls[-1] == 1
        disk.damaged.add(encode_key(4))
        with pytest.raises(KeyError) as info:
            cache.get_many([1, 4, 5])
        assert info.value.args[0] == 4
        assert 4 not in cache and cache.stats()["corruptions"] == 1 and not cache._pins


def test_tier_describe_items_are_merged_into_stats():
    with Cache(host="1MiB") as cache:
        row = cache.stats()["tiers"]["host"]
        assert row["chunks"] == 1 and row["largest_free_bytes"] == row["capacity_bytes"]
        assert row["pinned"] is torch.cuda.is_available()
        json.dumps(cache.stats())


@pytest.mark.parametrize("disk", [False, True])
def test_strided_values_are_stored_as_the_values_they_show(tmp_path, disk):
    kwargs = dict(host=None, disk="1MiB", path=tmp_path / "s") if disk else dict(host="1MiB")
    values = {
        "t": torch.arange(12.0).view(3, 4).t(),
        "expanded": torch.tensor([1.0, 2.0]).expand(3, 2),  # stride 0
        "sliced": torch.arange(20, dtype=torch.int16)[::3],
        "scalar": torch.tensor(7, dtype=torch.int64),
    }
    with Cache(**kwargs) as cache:
        cache.put_many(values.items())
        for key, value in values.items():
            got = cache.get(key)
            assert got.shape == value.shape and got.dtype == value.dtype and torch.equal(got, value)
            assert got.is_contiguous()


def test_a_batch_mixing_values_copied_during_the_lookup_with_pinned_ones_is_exact_and_counted(tmp_path):
    """get_many over host values (copied under the lock, no pin) and disk values (pinned, read after):
    every value lands in its own slot of ``out``, hits and bytes read are counted for both tiers, and
    nothing stays pinned."""
    with Cache(host="4KiB", disk="1MiB", path=tmp_path / "s", policy="lru") as cache:
        values = {i: torch.randn(64) for i in range(40)}  # 256 B each: 16 fit in the host tier
        cache.put_many(values.items())
        tiers = {key: cache.tier_of(key) for key in values}
        assert set(tiers.values()) == {"host", "disk"}
        before = cache.stats()
        keys = list(values)[::-1]
        outs = [torch.empty(64) for _ in keys]
        got = cache.get_many(keys, out=outs)
        assert got == outs and all(torch.equal(o, values[k]) for k, o in zip(keys, outs))
        fresh = cache.get_many(keys)  # fresh tensors, same split
        assert all(torch.equal(f, values[k]) for k, f in zip(keys, fresh))
        after = cache.stats()
        assert after["gets"] - before["gets"] == 2 * len(keys)
        host_hits = sum(1 for k in keys if tiers[k] == "host")
        assert after["tiers"]["host"]["hits"] - before["tiers"]["host"]["hits"] >= host_hits
        assert after["tiers"]["host"]["bytes_read"] > before["tiers"]["host"]["bytes_read"]
        assert not cache._pins and not cache._deferred


def test_put_many_stores_direct_and_torch_copied_values_in_order_and_a_later_duplicate_wins():
    strided = torch.arange(48.0).view(8, 6)[:, ::2]  # not contiguous: copied by torch after the lock
    with Cache(host="1MiB") as cache:
        cache.put_many([("a", torch.ones(4)), ("b", strided), ("a", torch.full((4,), 2.0)), ("c", strided.t())])
        assert torch.equal(cache.get("a"), torch.full((4,), 2.0))
        assert torch.equal(cache.get("b"), strided) and torch.equal(cache.get("c"), strided.t())
        assert len(cache) == 3 and cache.stats()["puts"] == 4
