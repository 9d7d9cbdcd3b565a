"""Audit probes of issue 10's correctness rules: whatever the background reads of the decode pipeline do --
fail (after writing garbage into their destination), run slowly, never finish in time -- the logits are
those of a run without faults; mispredicted blocks are fetched, never skipped (every strategy gives the
same logits at a small budget); a context whose KV is far larger than the host budget decodes exactly."""

import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from tiercache_llm import TieredKVCache

from .conftest import tiny_config
from .test_interface_audit import DENSE, padded, steps

BACKGROUND = ("tiercache-kv-stage", "tiercache-kv-idle", "tiercache-kv-prefault")
pytestmark = pytest.mark.filterwarnings("ignore:sparse decode. one layer:RuntimeWarning")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(5)
    return AutoModelForCausalLM.from_config(tiny_config("llama", num_hidden_layers=3)).eval()


class Faults:
    """Wraps ``cache.store.get_blocks``: calls from the pipeline's background threads misbehave."""

    def __init__(self, cache, kind):
        self.kind, self.calls, self.lock = kind, 0, threading.Lock()
        store = cache.store
        self.real = store.get_blocks

        def get_blocks(keys, *args, **kwargs):
            name = threading.current_thread().name
            if name.startswith(BACKGROUND):
                with self.lock:
                    self.calls += 1
                if self.kind == "fail":
                    for out in kwargs.get("out") or ():
                        if out.is_floating_point():
                            out.fill_(float("nan"))  # a read that wrote half its bytes, then failed
                    raise OSError("injected: disk read failed during a read ahead")
                if self.kind == "slow":
                    time.sleep(0.05)
                if self.kind == "late":  # lands after the consumer gave up waiting (wait_timeout)
                    time.sleep(0.15)
            return self.real(keys, *args, **kwargs)

        store.get_blocks = get_blocks


def run(model, ids, mask, faults=None, n=8, **opts):
    with TieredKVCache.for_model(model, mode="sparse", block_size=8, page_size=4, host="24KiB", disk="16MiB",
                                 **opts) as cache:
        injected = Faults(cache, faults) if faults else None
        logits = steps(model, cache, ids, mask, n=n)
        stats = cache.stats()
        cache.restore_model()
    return logits, stats, injected


def close(a, b, tol=1e-5):
    for x, y in zip(a, b):
        assert torch.isfinite(y).all()
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)


CONFIGS = [
    dict(strategy="attention-aware"),
    dict(strategy="attention-aware", pipeline=dict(stage_into_slots=True, layer_ahead=True, predictor="query")),
    dict(strategy="attention-aware", pipeline=dict(stage_into_slots=True, slot_reads_after_sync=True,
                                                   overlap_sync_reads=True, idle_stage_near=4, stage_near=4)),
    dict(strategy="reuse-layer-ahead"),
    dict(strategy="reuse-layer-ahead", pipeline=dict(predictor="query")),
]


@pytest.mark.parametrize("opts", CONFIGS, ids=lambda o: str(o)[:60])
@pytest.mark.parametrize("kind", ["fail", "slow", "late"])
def test_background_reads_that_fail_or_lag_never_change_the_logits(model, opts, kind):
    ids, mask = padded([90, 61], seed=21)
    if kind == "late":
        opts = dict(opts, pipeline=dict(opts.get("pipeline", {}), wait_timeout=0.01))
    ref, _, _ = run(model, ids, mask, budget=20, sink=4, recent=8, **opts)
    got, stats, faults = run(model, ids, mask, faults=kind, budget=20, sink=4, recent=8, **opts)
    close(ref, got)
    assert stats["sparse"]["total"]["tokens_attended"] < stats["sparse"]["total"]["tokens_context"]
    if faults.calls == 0:
        pytest.skip(f"{opts}: no background read ran in this configuration")


@pytest.mark.parametrize("opts", CONFIGS, ids=lambda o: str(o)[:60])
def test_dense_budget_with_failing_background_reads_equals_dynamic_cache(model, opts):
    ids, mask = padded([70, 33, 5], seed=22)
    ref = steps(model, DynamicCache(config=model.config), ids, mask, n=6)
    got, _, _ = run(model, ids, mask, faults="fail", n=6, budget=DENSE, **opts)
    close(ref, got, tol=2e-5)


def test_every_strategy_attends_the_same_selection(model):
    """Same selection, whatever the strategy predicted or kept resident: mispredicted blocks are fetched."""
    ids, mask = padded([120, 77], seed=23)
    runs = [run(model, ids, mask, n=10, budget=16, sink=2, recent=4, **opts) for opts in
            [dict(strategy="fetch-every-step")] + CONFIGS]
    base = runs[0]
    for logits, stats, _ in runs[1:]:
        close(base[0], logits)
        assert stats["sparse"]["total"]["tokens_attended"] == base[1]["sparse"]["total"]["tokens_attended"]


@pytest.mark.parametrize("mode", ["exact", "sparse"])
def test_kv_far_larger_than_the_host_budget_decodes_exactly(model, mode):
    ids, mask = padded([400, 250], seed=24)
    ref = steps(model, DynamicCache(config=model.config), ids, mask, n=6)
    extra = dict(budget=DENSE, pipeline=dict(stage_into_slots=True)) if mode == "sparse" else {}
    with TieredKVCache.for_model(model, mode=mode, block_size=16, host="16KiB", disk="32MiB", **extra) as cache:
        got = steps(model, cache, ids, mask, n=6)
        stats = cache.stats()
        cache.restore_model()
    close(ref, got, tol=2e-5)
    tiers = stats["tiercache"]["tiers"]
    assert tiers["disk"]["entries"] > 0
    assert stats["kv"]["held_bytes"] > 10 * tiers["host"]["capacity_bytes"]


@pytest.mark.parametrize("kind", ["fail", "slow"])
def test_exact_layer_ahead_reads_that_fail_or_lag_never_change_the_logits(model, kind):
    """Exact mode's layer-ahead reads (reader threads "tiercache-kv-ahead"): a failed one is redone by the
    update, a slow one waited for; the logits stay DynamicCache's."""
    ids, mask = padded([150, 97], seed=25)
    ref = steps(model, DynamicCache(config=model.config), ids, mask, n=5)
    with TieredKVCache.for_model(model, block_size=16, host="16KiB", disk="16MiB") as cache:
        calls = []
        real = cache.store.get_blocks

        def get_blocks(keys, *args, **kwargs):
            if threading.current_thread().name.startswith(("tiercache-kv-ahead", "tiercache-kv-copy")):
                calls.append(1)
                if kind == "fail":
                    for out in kwargs.get("out") or ():
                        out.fill_(float("nan"))
                    raise OSError("injected: disk read failed during a read ahead")
                time.sleep(0.03)
            return real(keys, *args, **kwargs)

        cache.store.get_blocks = get_blocks
        got = steps(model, cache, ids, mask, n=5)
        prefetch = cache.stats()["prefetch"]
    close(ref, got, tol=2e-5)
    assert calls, "no layer-ahead read ran"
    if kind == "fail":
        assert prefetch["failed"] > 0
