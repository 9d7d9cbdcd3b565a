"""Robustness gaps a demanding user would hit (each closed here, tested first):

- a block write that failed part-way leaves no entry behind: not after the failure, nor after ``reset()`` or
  ``close()`` (direct puts and write-behind; a persistent store keeps nothing of it after close);
- ``reset()`` recovers even while the write-behind writer keeps failing;
- ``stats()["kv"]["beside_tiers_bytes"]`` counts the bytes waiting in the write-behind queue;
- ``crop()`` right after a prefill that failed half-way (no generate hooks) is refused with
  ``InconsistentCacheError``, while a crop of a cache whose later layers were never updated (direct updates of
  one layer) still works.
"""

import threading

import pytest
import torch

import tiercache
from tiercache_llm import TieredKVCache
from tiercache_llm.errors import InconsistentCacheError
from tiercache_llm.store import KVWriteError

from .test_failed_pass import fail_prefill, make_cache
from .test_generate_tiny import left_padded_batch
from .test_store_write_behind import gate

LAYERS = 4


@pytest.fixture
def model(make_model):
    return make_model("llama", seed=3, num_hidden_layers=LAYERS)


def states(tokens, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, 2, tokens, 16, generator=gen)


def first_item_then(exc, original):
    """A put_many that stores the batch's first item, then raises ``exc`` (a write that failed part-way)."""

    def put_many(items, **kw):
        items = list(items)
        scores = kw.get("scores")
        original(items[:1], **({"scores": list(scores)[:1]} if scores is not None else {}))
        raise exc

    return put_many


# ------------------------------------------------------------------ 1. entries of a part-failed block write
@pytest.mark.parametrize("exc", [OSError("injected disk error"), tiercache.errors.TierIOError("injected tier error"),
                                 RuntimeError("injected")], ids=["OSError", "TierIOError", "RuntimeError"])
@pytest.mark.parametrize("then", ["reset", "close"])
def test_part_failed_direct_put_leaves_no_entry(make_config, exc, then):
    tc = tiercache.Cache(host="1MiB")
    try:
        cache = TieredKVCache(make_config(), block_size=4, cache=tc)
        k = states(12)  # three full blocks: three joint entries in one put_many
        tc.put_many = first_item_then(exc, tiercache.Cache.put_many.__get__(tc))
        with pytest.raises(Exception) as info:
            cache.update(k, k, 0)
        assert exc in (info.value, info.value.__cause__)
        del tc.put_many
        getattr(cache, then)()
        assert len(tc) == 0, f"{len(tc)} entries of the failed write left in the tiercache after {then}()"
        assert cache.store.live_entries == 0 and cache.store.held_bytes == 0
        if then == "reset":  # usable again, and its own entries are deleted on close as before
            cache.update(k, k, 0)
            assert len(tc) == 3
            cache.close()
            assert len(tc) == 0
    finally:
        tc.close()


def test_part_failed_write_leaves_nothing_in_a_persistent_store(make_config, tmp_path):
    """With a path of the caller's, nothing of the failed write survives close (no owner record is left to
    reclaim it later: it would stay on disk forever)."""
    path = tmp_path / "kv"
    cache = TieredKVCache(make_config(), block_size=4, host="64KiB", disk="1MiB", path=str(path))
    tc = cache.store.cache
    k = states(12)
    tc.put_many = first_item_then(OSError("injected disk error"), tiercache.Cache.put_many.__get__(tc))
    with pytest.raises(OSError):
        cache.update(k, k, 0)
    del tc.put_many
    cache.close()
    with tiercache.Cache(host="64KiB", disk="1MiB", path=str(path)) as reopened:
        assert len(reopened) == 0, f"left in the store: {reopened.keys()}"


def test_write_behind_failures_leave_nothing_after_reset_and_reset_recovers(make_config):
    """Write-behind: the writer's put fails part-way, persistently.  The next put raises KVWriteError and queues
    nothing of its blocks (the caller was told it failed); reset() succeeds although the retry fails again, and
    deletes the entries the failed batches did write; the cache is usable afterwards."""
    tc = tiercache.Cache(host="1MiB")
    try:
        cache = TieredKVCache(make_config(), block_size=4, cache=tc)
        store = cache.store
        store.enable_write_behind(1 << 20)
        failing = first_item_then(OSError("injected write failure"), tiercache.Cache.put_many.__get__(tc))
        tc.put_many = failing
        k = states(12)
        cache.update(k, k, 0)  # queued; the writer fails after writing one entry
        deadline = threading.Event()
        for _ in range(2000):
            if store.counters.write_errors:
                break
            deadline.wait(0.005)
        assert store.counters.write_errors == 1
        queued_before = store.queued_bytes
        with pytest.raises(KVWriteError, match="injected write failure; this put stored none of its blocks"):
            cache.update(k[:, :, :4], k[:, :, :4], 1)
        assert store.queued_bytes == queued_before  # the refused put queued nothing
        cache.reset()  # the retry inside fails again: reset must not
        assert len(tc) == 0 and store.live_entries == 0 and store.queued_bytes == 0
        del tc.put_many
        cache.update(k, k, 0)
        store.flush_writes()
        assert len(tc) == 3
        cache.close()
        assert len(tc) == 0
    finally:
        tc.close()


def test_write_behind_batch_refused_at_enqueue_is_not_orphaned(make_config):
    """A write-behind failure raised by a later put: that put's blocks are not left queued and untracked (the
    layer was told the put failed), so after the writer recovers, reset() leaves the tiercache empty."""
    tc = tiercache.Cache(host="1MiB")
    try:
        cache = TieredKVCache(make_config(), block_size=4, cache=tc)
        store = cache.store
        store.enable_write_behind(1 << 20)
        original = tiercache.Cache.put_many.__get__(tc)
        calls = []

        def fail_once(items, **kw):
            calls.append(1)
            if len(calls) == 1:
                raise OSError("injected once")
            return original(items, **kw)

        tc.put_many = fail_once
        k = states(12)
        cache.update(k, k, 0)
        for _ in range(2000):
            if store.counters.write_errors:
                break
            threading.Event().wait(0.005)
        with pytest.raises(KVWriteError):
            cache.update(k, k, 1)
        store.flush_writes()  # the first batch is retried and written
        assert len(tc) == 3
        cache.reset()
        assert len(tc) == 0 and store.live_entries == 0
        cache.close()
    finally:
        tc.close()


# ------------------------------------------------------------------ 2. beside_tiers_bytes and the write queue
def test_beside_tiers_bytes_counts_the_write_behind_queue(make_config):
    cache = TieredKVCache(make_config(), block_size=4, host="1MiB")
    try:
        store = cache.store
        store.enable_write_behind(1 << 20)
        release = gate(store)
        k = states(9)
        cache.update(k, k, 0)
        kv = cache.stats()["kv"]
        assert kv["queued_bytes"] > 0
        assert kv["beside_tiers_bytes"] == kv["tail_bytes"] + kv["buffer_bytes"] + kv["queued_bytes"]
        release.set()
        store.flush_writes()
        kv = cache.stats()["kv"]
        assert kv["queued_bytes"] == 0 and kv["beside_tiers_bytes"] == kv["tail_bytes"] + kv["buffer_bytes"]
    finally:
        release.set()
        cache.close()


# ------------------------------------------------------------------ 4. crop after a failed prefill
@pytest.mark.parametrize("mode", ["exact", "sparse"])
def test_crop_after_a_failed_prefill_is_refused(model, mode):
    ids, mask = left_padded_batch(seed=4)
    with make_cache(model, mode) as cache:
        fail_prefill(model, cache, ids, mask)
        assert not cache.layers[LAYERS - 1].is_initialized  # the failure left the last layers untouched
        with pytest.raises(InconsistentCacheError, match="reset"):
            cache.crop(-1)
        assert cache.layers[0].get_seq_length() == ids.shape[1]  # refused before anything was cropped
        cache.reset()
        cache.crop(-1)  # an empty cache crops (to nothing) as before


def test_crop_of_directly_updated_first_layer_still_works(make_config):
    """The legitimate case: layer 0 updated alone (no forward pass, as tests and tools do) crops."""
    with TieredKVCache(make_config(), block_size=4, host="1MiB") as cache:
        k = states(7)
        cache.update(k, k, 0)
        cache.crop(-3)
        assert cache.layers[0].get_seq_length() == 4 and not cache.layers[1].is_initialized


# ------------------------------------------------------------------ 5. test helpers refuse mis-sized masks
def test_decode_logits_refuses_a_mask_shorter_than_the_context(model):
    """transformers pads a 2-D mask shorter than the context with zeros at its end (masking the newest tokens):
    the tests' decode helper refuses one instead of comparing logits computed under it."""
    from .test_sparse_pipeline import check_mask, decode_logits

    ids, mask = left_padded_batch(seed=4)
    with TieredKVCache(model.config, block_size=4, host="1MiB") as cache:
        decode_logits(model, cache, ids, mask, steps=1)
        with pytest.raises(ValueError, match=r"attention mask of 20 positions for 21 cached and 20 new tokens"):
            decode_logits(model, cache, ids, mask, steps=1)  # a second prompt needs the context's mask too
        check_mask(cache, ids, torch.ones(3, 41, dtype=mask.dtype))


# ------------------------------------------------------------------ batch_select_indices whose rewrite fails
def three_rows(make_config, tc, seed):
    """An exact cache over ``tc`` holding 3 rows x 12 tokens (three 4-token blocks); its K, V and generator."""
    cache = TieredKVCache(make_config(), block_size=4, cache=tc)
    gen = torch.Generator().manual_seed(seed)
    k, v = (torch.randn(3, 2, 12, 16, generator=gen) for _ in range(2))
    cache.update(k, v, 0)
    return cache, k, v, gen


@pytest.mark.parametrize("exc", [OSError("injected disk error"), tiercache.errors.TierIOError("injected tier error")],
                         ids=["OSError", "TierIOError"])
def test_failed_compaction_keeps_the_rows_exact_and_loses_nothing(make_config, exc):
    """``batch_select_indices`` rewrites the blocks without the dropped rows; when that write fails the layer
    keeps its old blocks with row maps (a warning says the dropped rows still take room): the kept rows read
    back exactly, and no entry of the failed rewrite is left behind."""
    tc = tiercache.Cache(host="1MiB")
    try:
        cache, k, v, gen = three_rows(make_config, tc, seed=5)
        before = len(tc)
        tc.put_many = first_item_then(exc, tiercache.Cache.put_many.__get__(tc))
        with pytest.warns(RuntimeWarning, match="dropped rows still occupy the tiers"):
            cache.batch_select_indices(torch.tensor([2, 0]))
        del tc.put_many
        assert len(tc) == before, "the failed rewrite left entries behind, or the old blocks were deleted"
        k1, v1 = (torch.randn(2, 2, 1, 16, generator=gen) for _ in range(2))
        keys, values = cache.update(k1, v1, 0)
        torch.testing.assert_close(keys, torch.cat((k[[2, 0]], k1), dim=2), rtol=0, atol=0)
        torch.testing.assert_close(values, torch.cat((v[[2, 0]], v1), dim=2), rtol=0, atol=0)
        cache.close()
        assert len(tc) == 0
    finally:
        tc.close()


def test_compaction_rewrites_then_deletes(make_config):
    """Without a failure the rewrite replaces the old entries (same count, fewer bytes) and reads back exactly."""
    tc = tiercache.Cache(host="1MiB")
    try:
        cache, k, v, gen = three_rows(make_config, tc, seed=6)
        before, held = len(tc), cache.store.held_bytes
        cache.batch_select_indices(torch.tensor([1]))
        assert len(tc) == before and cache.store.held_bytes == held // 3
        k1, v1 = (torch.randn(1, 2, 1, 16, generator=gen) for _ in range(2))
        keys, values = cache.update(k1, v1, 0)
        torch.testing.assert_close(keys, torch.cat((k[[1]], k1), dim=2), rtol=0, atol=0)
        torch.testing.assert_close(values, torch.cat((v[[1]], v1), dim=2), rtol=0, atol=0)
        cache.close()
    finally:
        tc.close()


def test_kv_write_error_is_exported_as_a_tiered_kv_error():
    """The docs tell callers to catch ``KVWriteError``: it is importable from the package like the other KV errors."""
    import tiercache_llm
    from tiercache_llm.errors import TieredKVError

    assert "KVWriteError" in tiercache_llm.__all__ and tiercache_llm.KVWriteError is KVWriteError
    assert issubclass(tiercache_llm.KVWriteError, TieredKVError)
