"""Contracts of the public API at its boundary: bad or edge input gets a clear exception naming the problem,
and a refused call changes nothing (docs/api.md)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tiercache import Cache, CacheClosedError, CacheConfig


# -- construction --------------------------------------------------------------------------------------
@pytest.mark.parametrize("host", [1, 100, 255, "100B"])
def test_a_memory_budget_below_one_slot_is_refused(host):
    """A host budget below one 256-byte slot used to build a tier of capacity 0 that refused every put."""
    with pytest.raises(ValueError, match="host capacity of 1?[0-9]* bytes holds no entry"):
        Cache(host=host)


def test_the_smallest_memory_budget_holds_an_entry():
    with Cache(host=256) as cache:
        cache.put("a", torch.ones(4))
        assert cache.get("a").tolist() == [1.0] * 4


@pytest.mark.parametrize("threads", [True, False, 2.0, "4", None])
def test_io_threads_must_be_an_integer(threads):
    with pytest.raises(ValueError, match="io_threads must be a positive int"):
        Cache(host="1MiB", io_threads=threads)


def test_numpy_integers_are_taken_as_ints():
    with Cache(host=np.int64(1 << 20), io_threads=np.int32(2)) as cache:
        assert cache.tiers[0].capacity == 1 << 20
        assert type(cache.config.io_threads) is int and cache.config.io_threads == 2
        assert cache.prefetch([]).result() == 0


@pytest.mark.parametrize("fingerprint", [3, b"model-a", ["a"]])
def test_fingerprint_must_be_a_str(tmp_path, fingerprint):
    """A bytes fingerprint used to fail deep in the store ("not JSON serializable"); an int was stored and
    then never matched the str of a reopen."""
    with pytest.raises(TypeError, match="fingerprint must be a str"):
        Cache(host="1MiB", disk="1MiB", path=tmp_path / "s", fingerprint=fingerprint)
    assert not (tmp_path / "s").exists()  # nothing left behind


def test_on_evict_must_be_callable():
    """A non-callable on_evict used to be accepted, then failed (logged) at every eviction."""
    with pytest.raises(TypeError, match="on_evict must be a callable"):
        Cache(host="1MiB", on_evict="print")


@pytest.mark.parametrize("path", [3, b"/tmp/x", ["/tmp/x"]])
def test_path_must_be_a_str_or_pathlike(path):
    with pytest.raises(TypeError, match="path must be a str or an os.PathLike"):
        Cache(host="1MiB", disk="1MiB", path=path)


def test_compression_must_be_a_name():
    with pytest.raises(TypeError, match="compression must be None or a codec name"):
        Cache(host="1MiB", disk="1MiB", path="/nonexistent/never-created", compression=1)


def test_a_config_is_checked_when_made_and_again_when_used():
    with pytest.raises(TypeError, match="direct_io must be a bool"):
        CacheConfig(direct_io="no")
    config = CacheConfig(host="1MiB")
    config.on_evict = 3  # changed after construction
    with pytest.raises(TypeError, match="on_evict"):
        Cache(config)


def test_tier_options_beside_ready_made_tiers_are_refused(tmp_path):
    """Cache(tiers=[...], disk=..., path=...) used to ignore disk and path silently."""
    from tiercache import ArenaTier

    tier = ArenaTier("host", 1 << 16)
    with pytest.raises(ValueError, match=r"\['disk', 'path'\] configure tiers"):
        Cache(tiers=[tier], disk="1MiB", path=tmp_path / "s")
    assert not (tmp_path / "s").exists()
    with pytest.raises(ValueError, match=r"\['host'\] configure tiers"):
        Cache(CacheConfig(host="1MiB"), tiers=[tier])
    with Cache(CacheConfig(policy="lfu", io_threads=2), tiers=[tier]) as cache:  # options that apply
        assert cache.stats()["policy"] == "lfu"
        cache.put("a", torch.ones(2))
        assert cache.get("a").tolist() == [1.0, 1.0]


# -- batch calls -----------------------------------------------------------------------------------------
@pytest.fixture
def cache():
    with Cache(host="1MiB") as c:
        c.put_many([("a", torch.ones(2)), ("b", torch.zeros(2)), ("ab", torch.full((2,), 3.0))])
        yield c


@pytest.mark.parametrize("call", ["get_many", "delete_many", "prefetch", "tiers_of"])
@pytest.mark.parametrize("keys", ["ab", b"ab"])
def test_a_lone_str_is_not_an_iterable_of_keys(cache, call, keys):
    """``delete_many("ab")`` used to delete the keys "a" and "b" (the characters), and ``get_many("ab")``
    looked them up."""
    with pytest.raises(TypeError, match=f"{call} takes an iterable of keys, not one"):
        getattr(cache, call)(keys)
    assert sorted(cache.keys()) == ["a", "ab", "b"]


@pytest.mark.parametrize("call", ["get_many", "delete_many", "prefetch"])
def test_a_non_iterable_keys_argument_names_the_call(cache, call):
    with pytest.raises(TypeError, match=f"{call} takes an iterable of keys, got int"):
        getattr(cache, call)(3)


def test_an_error_inside_the_callers_iterator_is_its_own(cache):
    def keys():
        yield "a"
        raise TypeError("from the generator")

    with pytest.raises(TypeError, match="from the generator"):
        cache.get_many(keys())

    def items():
        yield "a", torch.ones(1)
        raise ValueError("generator failed")

    with pytest.raises(ValueError, match="generator failed"):
        cache.put_many(items())


def test_put_many_refuses_a_mapping(cache):
    """Iterating a dict gives its keys, each then unpacked as a pair: a 2-character key used to become
    (key, value) = its characters."""
    with pytest.raises(TypeError, match=r"not a mapping: pass mapping.items\(\)"):
        cache.put_many({"xy": torch.ones(2)})
    assert "x" not in cache and "xy" not in cache
    cache.put_many({"xy": torch.ones(2)}.items())
    assert cache.get("xy").tolist() == [1.0, 1.0]


@pytest.mark.parametrize("items, kind", [([("k", torch.ones(1), 1.0)], ValueError), ([3], TypeError),
                                         ([("k",)], ValueError)])
def test_put_many_names_the_item_that_is_not_a_pair(cache, items, kind):
    with pytest.raises(kind, match="put_many: item 0 is not a \\(key, tensor\\) pair"):
        cache.put_many(items)
    assert "k" not in cache


def test_put_many_of_a_non_iterable(cache):
    with pytest.raises(TypeError, match="put_many takes an iterable of \\(key, tensor\\) pairs, got int"):
        cache.put_many(3)


def test_duplicate_keys_in_one_batch(cache):
    cache.put_many([("d", torch.ones(2)), ("d", torch.full((2,), 2.0))])
    assert cache.get("d").tolist() == [2.0, 2.0] and cache.keys().count("d") == 1
    a1, a2 = cache.get_many(["d", "d"])
    assert a1.tolist() == a2.tolist() == [2.0, 2.0]
    assert cache.delete_many(["d", "d"]) == 1


def test_empty_batches(cache):
    assert cache.get_many([]) == []
    cache.put_many([])
    assert cache.delete_many([]) == 0
    assert cache.update_scores({}) == 0
    assert len(cache) == 3


@pytest.mark.parametrize("scores", [[("a", 1.0)], "a", 3])
def test_update_scores_takes_a_mapping(cache, scores):
    """A list of pairs used to raise AttributeError ('list' object has no attribute 'values')."""
    with pytest.raises(TypeError, match="update_scores takes a mapping"):
        cache.update_scores(scores)


def test_charge_checks_its_argument(cache):
    """charge(-1) used to answer a size, charge(1.5) a float."""
    assert cache.charge(np.int64(10)) == cache.charge(10)
    for bad in (1.5, True, "1MiB", None):
        with pytest.raises(TypeError, match="nbytes must be an int"):
            cache.charge(bad)
    with pytest.raises(ValueError, match="nbytes must be >= 0"):
        cache.charge(-1)


# -- values -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [
    torch.tensor(3.5),                                   # 0-dim
    torch.empty(0, 5),                                   # zero-size
    torch.arange(12.0).view(3, 4).t(),                   # non-contiguous
    torch.tensor([1.0, 2.0]).expand(3, 2),               # zero strides
    torch.tensor([1 + 2j, 3 - 1j]),                      # complex
    torch.tensor([True, False, True]),                   # bool
    torch.ones(3, dtype=torch.bfloat16),
], ids=["0dim", "zero-size", "non-contiguous", "expanded", "complex", "bool", "bfloat16"])
def test_edge_values_round_trip_through_close_and_reopen(tmp_path, value):
    with Cache(host="1MiB", disk="1MiB", path=tmp_path / "s") as cache:
        cache.put("v", value)
        got = cache.get("v")
        assert got.dtype == value.dtype and got.shape == value.shape and torch.equal(got, value)
    with Cache(host="1MiB", disk="1MiB", path=tmp_path / "s") as cache:
        got = cache.get("v")
        assert got.dtype == value.dtype and got.shape == value.shape and torch.equal(got, value)


def test_meta_and_sparse_values_are_refused(cache):
    with pytest.raises(TypeError, match="meta tensors have no data"):
        cache.put("m", torch.empty(3, device="meta"))
    with pytest.raises(TypeError, match="only dense"):
        cache.put("s", torch.eye(2).to_sparse())
    assert "m" not in cache and "s" not in cache


# -- after close --------------------------------------------------------------------------------------------
def test_a_closed_cache_says_so_before_judging_arguments():
    cache = Cache(host="1MiB")
    cache.close()
    cache.close()  # idempotent
    for call in (lambda: cache.get_many(3), lambda: cache.get_many("ab"), lambda: cache.delete_many(3),
                 lambda: cache.put_many(3), lambda: cache.put_many({"a": torch.ones(1)}),
                 lambda: cache.update_scores([("a", 1.0)]), lambda: cache.prefetch("ab"), lambda: cache.prefetch([1.5]),
                 lambda: cache.get_many([])):
        with pytest.raises(CacheClosedError):
            call()
    stats = cache.stats()
    assert stats["closed"] is True and json.dumps(stats)
    with cache as same:  # the context manager of a closed cache closes nothing twice
        assert same is cache


def test_reads_onto_a_device_that_holds_no_data_are_refused(cache):
    cache.put("a", torch.ones(4))
    with pytest.raises(ValueError, match="meta device"):
        cache.get("a", device="meta")
    with pytest.raises(ValueError, match="meta device"):
        cache.get_many(["a"], device="meta")
    with pytest.raises(ValueError, match="meta device"):
        cache.get_many(["a"], out=[torch.empty(4, device="meta")])
    assert cache.stats()["hits"] == 0  # refused before any lookup
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            cache.get("a", device="cuda")
    assert torch.equal(cache.get("a"), torch.ones(4))
