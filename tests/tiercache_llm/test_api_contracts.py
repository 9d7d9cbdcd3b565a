"""Contracts of TieredKVCache at its boundary: bad or edge arguments get a clear exception naming the problem
before anything changes, and a closed cache refuses to be used (docs/tiercache_llm.md)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tiercache_llm import TieredKVCache, TieredKVSettings


def states(batch=2, heads=2, seq=10, dim=16, **kw):
    return torch.randn(batch, heads, seq, dim, **kw)


@pytest.fixture
def cache(make_config):
    with TieredKVCache(make_config(), host="4MiB", block_size=4) as c:
        yield c


def filled(cache, batch=2, seq=10):
    for layer in range(len(cache.layers)):
        cache.update(states(batch, seq=seq), states(batch, seq=seq), layer)
    return cache


# -- options -----------------------------------------------------------------------------------------------
def test_numpy_numbers_are_taken_as_python_numbers():
    """np.int64 options used to be refused ("sink must be an int >= 0, got np.int64(4)"), np.float32 budgets
    too, while np.float64 (a float subclass) passed: a budget computed with numpy now works either way."""
    s = TieredKVSettings(mode="sparse", block_size=np.int64(64), budget=np.int64(96), sink=np.int32(2),
                         recent=np.int64(8), page_size=np.int64(8), decay=np.float32(0.5))
    assert (s.block_size, s.budget, s.sink, s.recent, s.page_size, s.decay) == (64, 96, 2, 8, 8, 0.5)
    assert [type(v) for v in (s.block_size, s.budget, s.sink, s.recent, s.page_size, s.decay)] == [int] * 5 + [float]
    fraction = TieredKVSettings(mode="sparse", budget=np.float32(0.5))
    assert fraction.budget == 0.5 and type(fraction.budget) is float
    assert type(TieredKVSettings(mode="sparse", budget=np.float64(0.25)).budget) is float


@pytest.mark.parametrize("options, error, match", [
    (dict(mode="sparse", budget=float("nan")), ValueError, "fractional budget"),
    (dict(mode="sparse", budget=float("inf")), ValueError, "fractional budget"),
    (dict(mode="sparse", budget=0.0), ValueError, "fractional budget"),
    (dict(mode="sparse", budget=2048.0), ValueError, "fractional budget"),
    (dict(mode="sparse", budget=-1), ValueError, "token budget must be >= 0"),
    (dict(mode="sparse", budget=True), TypeError, "budget must be an int"),
    (dict(mode="sparse", budget="0.25"), TypeError, "budget must be an int"),
    (dict(mode="sparse", budget=np.bool_(True)), TypeError, "budget must be an int"),
    (dict(mode="sparse", sink=True), ValueError, "sink must be an int"),
    (dict(mode="sparse", recent=1.0), ValueError, "recent must be an int"),
    (dict(mode="sparse", decay=float("nan")), ValueError, "decay"),
    (dict(mode="sparse", decay=True), ValueError, "decay"),
    (dict(mode="sparse", page_size=np.float64(8.0)), ValueError, "page_size"),
    (dict(block_size=True), TypeError, "block_size"),
    (dict(block_size=np.float32(64)), TypeError, "block_size"),
    (dict(block_size=0), ValueError, "block_size"),
])
def test_bad_numbers_are_refused(options, error, match):
    with pytest.raises(error, match=match):
        TieredKVSettings(**options)


@pytest.mark.parametrize("pipeline", [{"prefault_pool": "no"}, {"warm_first_step": 1}, {"huge_pages": None}])
def test_pipeline_switches_must_be_bools(pipeline):
    """A truthy string such as "no" used to turn a pipeline feature on."""
    from tiercache_llm.sparse.pipeline import PipelineConfig

    with pytest.raises(ValueError, match=f"{next(iter(pipeline))} must be a bool"):
        TieredKVSettings(mode="sparse", pipeline=pipeline)
    with pytest.raises(ValueError, match="must be a bool"):
        TieredKVSettings(mode="sparse", pipeline=PipelineConfig(**pipeline))
    assert TieredKVSettings(mode="sparse", pipeline={"prefault_pool": False}).pipeline.prefault_pool is False


@pytest.mark.parametrize("host", [1, 255])
def test_a_host_budget_below_one_slot_is_refused(make_config, host):
    with pytest.raises(ValueError, match="host capacity of .* bytes holds no entry"):
        TieredKVCache(make_config(), host=host)


def test_a_closed_tiercache_is_refused_as_cache(make_config):
    """cache=<a closed tiercache.Cache> used to be accepted, to fail at the first stored block."""
    import tiercache

    store = tiercache.Cache(host="1MiB")
    store.close()
    with pytest.raises(tiercache.CacheClosedError, match="passed as cache= is closed"):
        TieredKVCache(make_config(), cache=store)


def test_budget_int_1_and_float_1_differ():
    """1 is one token, 1.0 the whole context: both are accepted and kept apart."""
    assert TieredKVSettings(mode="sparse", budget=1).budget == 1
    assert type(TieredKVSettings(mode="sparse", budget=1).budget) is int
    assert type(TieredKVSettings(mode="sparse", budget=1.0).budget) is float


# -- update -----------------------------------------------------------------------------------------------
def test_key_and_value_dtypes_must_agree(cache):
    """The message used to read "dtype changed from torch.float32 to torch.float32"."""
    with pytest.raises(ValueError, match="key and value states disagree on dtype or device: torch.float32 on cpu "
                                         "vs torch.float64"):
        cache.update(states(), states(dtype=torch.float64), 0)
    assert not cache.layers[0].is_initialized
    filled(cache)
    with pytest.raises(ValueError, match="holds torch.float32 states, got keys of torch.float32 and values of "
                                         "torch.float64"):
        cache.update(states(seq=1), states(seq=1, dtype=torch.float64), 0)
    assert cache.get_seq_length() == 10


def test_meta_states_are_refused_before_anything_is_stored(cache):
    """Meta states used to be taken, then fail inside the tiercache when a block filled."""
    with pytest.raises(TypeError, match="meta tensors have no data"):
        cache.update(states(device="meta"), states(device="meta"), 0)
    assert not cache.layers[0].is_initialized
    with pytest.raises(ValueError, match="disagree on dtype or device"):
        cache.update(states(), states(device="meta"), 0)
    filled(cache)
    assert cache.get_seq_length() == 10


@pytest.mark.parametrize("shape", [(2, 2), (2,), (), (2, 2, 1), (2, 2, 1, 16, 1)])
def test_states_of_another_rank_after_the_first_update(cache, shape):
    """A 2-D or smaller update after the first one used to raise IndexError (tuple index out of range)."""
    filled(cache)
    with pytest.raises(ValueError, match="do not match the cache"):
        cache.update(torch.randn(shape), torch.randn(shape), 0)
    assert cache.get_seq_length() == 10


@pytest.mark.parametrize("layer_idx", [True, 1.0, "1", None])
def test_layer_idx_must_be_an_int(cache, layer_idx):
    """update(..., True) used to update layer 1; a float failed as a list index."""
    with pytest.raises(TypeError, match="layer_idx must be an int"):
        cache.update(states(), states(), layer_idx)
    assert not any(layer.is_initialized for layer in cache.layers)


def test_integer_layer_idx_types_are_accepted(cache):
    k, v = cache.update(states(), states(), np.int64(1))
    assert k.shape == (2, 2, 10, 16) and cache.layers[1].get_seq_length() == 10


@pytest.mark.parametrize("dtype", [torch.complex64, torch.bool, torch.int64, torch.bfloat16])
def test_exact_mode_keeps_any_dtype(cache, dtype):
    k = torch.randn(1, 2, 9, 16).to(dtype)
    out_k, _ = cache.update(k, k, 0)
    assert out_k.dtype == dtype and torch.equal(out_k, k)
    out_k, _ = cache.update(k[:, :, :1], k[:, :, :1], 0)
    assert torch.equal(out_k[:, :, :9], k)


def test_non_contiguous_zero_size_and_empty_batch_states(cache):
    k = torch.randn(1, 2, 16, 6).transpose(2, 3)  # (1, 2, 6, 16), non-contiguous
    out_k, _ = cache.update(k, k, 0)
    assert torch.equal(out_k, k)
    out_k, _ = cache.update(k[:, :, :0], k[:, :, :0], 0)  # zero new tokens
    assert torch.equal(out_k, k) and cache.layers[0].get_seq_length() == 6
    k0 = torch.randn(0, 2, 5, 16)
    assert cache.update(k0, k0, 1)[0].shape == (0, 2, 5, 16)


# -- crop and row changes -------------------------------------------------------------------------------
@pytest.mark.parametrize("amount", [-1.5, "x", None, True, torch.tensor(-1.5), [-1]])
def test_crop_takes_an_int(cache, amount):
    """crop(-1.5) used to remove one token (int() truncation); crop(True) was a positive 1."""
    filled(cache)
    with pytest.raises(TypeError, match="crop's tokens_to_remove must be an int"):
        cache.crop(amount)
    assert cache.get_seq_length() == 10


def test_a_crop_one_layer_refuses_crops_no_layer(make_config):
    """A sliding-window layer that cannot roll back used to raise after the full-attention layers before it
    were cropped, leaving the layers at different lengths."""
    config = make_config("qwen2", layer_types=["full_attention", "sliding_attention"], sliding_window=8,
                         use_sliding_window=True)
    with TieredKVCache(config, host="4MiB", block_size=4) as cache:
        assert [layer.sliding_window for layer in cache.layers] == [None, 8]
        filled(cache, seq=12)
        with pytest.raises(RuntimeError, match="layer 1: cannot crop a sliding-window layer"):
            cache.crop(-2)
        assert [layer.get_seq_length() for layer in cache.layers] == [12, 12]
        cache.layers[0].crop(-2)  # a layer alone still crops
        assert cache.layers[0].get_seq_length() == 10


@pytest.mark.parametrize("amount", [-2, np.int64(-2), torch.tensor(-2), torch.tensor(-2.0)])
def test_crop_integer_types(cache, amount):
    filled(cache)
    cache.crop(amount)
    assert cache.get_seq_length() == 8


@pytest.mark.parametrize("index, error, match", [
    (torch.tensor([1.7, 0.2]), TypeError, "integer row indices"),  # used to be truncated to [1, 0]
    (torch.tensor([True, False]), TypeError, "integer row indices"),  # used to be read as rows [1, 0]
    (torch.tensor([[1, 0]]), IndexError, "must be 1-D"),
    (torch.tensor([2, 0]), IndexError, "out of range"),
    (torch.tensor([-1, 0]), IndexError, "out of range"),
])
def test_reorder_cache_refuses_what_is_not_rows(cache, index, error, match):
    filled(cache)
    before = [layer.keys.clone() for layer in cache.layers]
    with pytest.raises(error, match=match):
        cache.reorder_cache(index)
    assert all(torch.equal(layer.keys, b) for layer, b in zip(cache.layers, before))


def test_reorder_cache_takes_a_list(cache):
    filled(cache)
    before = cache.layers[0].keys.clone()
    cache.reorder_cache([1, 0])
    assert torch.equal(cache.layers[0].keys, before.flip(0))


def test_batch_select_indices_refuses_floats_and_wrong_masks(cache):
    filled(cache)
    with pytest.raises(TypeError, match="integer row indices"):
        cache.batch_select_indices(torch.tensor([0.9]))  # used to select row 0
    with pytest.raises(IndexError, match="boolean mask must have one entry per row"):
        cache.batch_select_indices(torch.tensor([True]))
    assert cache.batch_size == 2
    cache.batch_select_indices(torch.tensor([False, True]))
    assert cache.batch_size == 1


def test_batch_repeat_interleave_arguments(cache):
    filled(cache)
    for bad in (0, -1, True, 1.0, "2"):
        with pytest.raises(ValueError, match="repeats must be a positive int"):
            cache.batch_repeat_interleave(bad)
    assert cache.batch_size == 2
    cache.batch_repeat_interleave(np.int64(2))
    assert cache.batch_size == 4


# -- after close ----------------------------------------------------------------------------------------
def test_a_closed_cache_refuses_every_change(make_config):
    cache = TieredKVCache(make_config(), host="4MiB", block_size=4)
    filled(cache)
    cache.close()
    cache.close()  # idempotent
    for call in (lambda: cache.update(states(seq=1), states(seq=1), 0), lambda: cache.crop(-1),
                 lambda: cache.reorder_cache(torch.tensor([1, 0])), lambda: cache.batch_repeat_interleave(2),
                 lambda: cache.batch_select_indices(torch.tensor([0])), lambda: cache.reset()):
        with pytest.raises(RuntimeError, match="closed"):
            call()
    assert cache.get_seq_length() == 10 and cache.batch_size == 2
    assert cache.stats()["kv"]["tokens"] == 10


def test_update_of_a_closed_cache_with_only_a_tail_is_refused(make_config):
    """An update that touches no stored block (a fresh cache, or tokens still in the tail) used to work after
    close()."""
    with TieredKVCache(make_config(), host="4MiB", block_size=64) as cache:
        pass
    with pytest.raises(RuntimeError, match="closed"):
        cache.update(states(seq=3), states(seq=3), 0)
