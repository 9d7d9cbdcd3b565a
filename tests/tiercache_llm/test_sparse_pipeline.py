"""The sparse decode pipeline (tiercache_llm/sparse/pipeline.py) inside TieredKVCache on tiny random models:
every strategy gives the synchronous path's logits, whatever the background does."""

import threading
import time

import pytest
import torch

from tiercache_llm import TieredKVCache
from tiercache_llm.hf_kwargs import cache_kwargs
from tiercache_llm.sparse.pipeline import DecodePipeline, PipelineConfig

from .test_generate_tiny import left_padded_batch

STRATEGIES = ("fetch-every-step", "reuse-layer-ahead", "attention-aware")
SYNC = {"reuse": False, "layer_ahead": False, "disk_staging": False, "defer_promotions": False}


def opts(tmp_path, strategy, **kw):
    """Small host tier (most blocks on disk), 4-token blocks, a budget well below the context; unbounded pools
    (``pool_bytes=None``: the default bound, the 4 KiB host budget, would hold less than one layer's union;
    tests/tiercache_llm/sparse/test_pool.py tests the default)."""
    base = dict(mode="sparse", budget=8, sink=2, recent=4, block_size=4, strategy=strategy, host="4KiB",
                disk="4MiB", path=tmp_path / strategy / str(len(kw)), direct_io=False, pool_bytes=None)
    base.update(kw)
    return base


def two_entries(cache):
    """Make ``cache`` (before its first update) store K and V of a block as two entries, the layout of layers whose
    K and V shapes differ (every sparse path keeps working with it; the default stores one joint entry)."""
    for layer in cache.layers:
        layer.joint_entries = False
    return cache


def check_mask(cache, ids, mask):
    """A forward pass's 2-D attention mask must cover the cached tokens and the new ones: transformers pads a
    shorter one with zeros at its end (masking the newest tokens out) without a word."""
    held = cache.get_seq_length()
    if mask.shape[-1] != held + ids.shape[-1]:
        raise ValueError(f"attention mask of {mask.shape[-1]} positions for {held} cached and {ids.shape[-1]} new "
                         "tokens: pass a mask of the whole context (the cached tokens' part first)")


def continued_mask(cache, prompt_mask, mask):
    """The mask of a new prompt (``mask``) fed after what ``cache`` holds (a prompt masked by ``prompt_mask``, then
    decoded tokens): ``prompt_mask``, ones for the tokens decoded since, then ``mask``."""
    done = torch.ones(prompt_mask.shape[0], cache.get_seq_length() - prompt_mask.shape[1], dtype=prompt_mask.dtype)
    return torch.cat([prompt_mask, done, mask], 1)


def decode_logits(model, cache, ids, mask, steps=10):
    """Prefill (``ids`` after what ``cache`` holds: ``mask`` covers both, see :func:`check_mask`), then ``steps``
    greedy decode steps through plain forward calls; the logits of every step."""
    out = []
    with torch.no_grad():
        check_mask(cache, ids, mask)
        logits = model(input_ids=ids, attention_mask=mask, **cache_kwargs(cache, model)).logits[:, -1]
        for _ in range(steps):
            nxt = logits.argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
            check_mask(cache, nxt, mask)
            logits = model(input_ids=nxt, attention_mask=mask, **cache_kwargs(cache, model)).logits[:, -1]
            out.append(logits)
    return torch.stack(out)


@pytest.fixture
def model(make_model):
    return make_model("llama", seed=5, num_hidden_layers=3)


@pytest.fixture
def batch():
    return left_padded_batch(seed=5, lengths=(40, 33, 27))


def without_pipeline(cache):
    """The sparse layers fetch through fetch_selected's own synchronous path (a fresh buffer per step, no
    resident pool): the reference the pipeline's pools must reproduce exactly."""
    for layer in cache.layers:
        if layer.sparse is not None:
            layer.pipeline = None
    return cache


def reference(model, batch, tmp_path):
    ids, mask = batch
    with without_pipeline(TieredKVCache.for_model(model, **opts(tmp_path, "fetch-every-step", pipeline=SYNC))) as cache:
        return decode_logits(model, cache, ids, mask)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_gives_the_synchronous_logits(model, batch, tmp_path, strategy):
    ref = reference(model, batch, tmp_path)
    ids, mask = batch
    with TieredKVCache.for_model(model, **opts(tmp_path, strategy)) as cache:
        got = decode_logits(model, cache, ids, mask)
        stats = cache.stats()
        pipe = stats["pipeline"]
    assert torch.equal(ref, got)
    assert pipe["needed"] > 0
    # attention-aware writes new blocks (prefill and every 4th decode step here) through the write-behind queue
    assert (stats["kv"]["queued_puts"] > 0) == (strategy == "attention-aware")
    served = pipe["reused"] + pipe["staged"] + sum(pipe["sync"].values())
    assert served == pipe["needed"]
    if strategy == "fetch-every-step":
        assert pipe["reused"] == pipe["staged"] == 0
    else:
        assert pipe["reused"] > 0  # consecutive steps select many of the same blocks
        # the pool holds what stage_ahead would; near misses (attention-aware) are staged from outside it
        assert (pipe["staging"]["jobs"] > 0) == (pipe["config"]["layer_ahead"] or pipe["config"]["stage_near"] > 0)


def test_failed_prefetches_change_nothing(model, batch, tmp_path, monkeypatch):
    ref = reference(model, batch, tmp_path)
    ids, mask = batch

    def broken(self, keys, outs, ranges=None):
        raise OSError("injected prefetch failure")

    monkeypatch.setattr(DecodePipeline, "_read", broken)
    with TieredKVCache.for_model(model, **opts(tmp_path, "attention-aware", pipeline={"layer_ahead": True})) as cache:
        got = decode_logits(model, cache, ids, mask)
        pipe = cache.stats()["pipeline"]
    assert torch.equal(ref, got)
    assert pipe["staging"]["failed_jobs"] > 0 and pipe["staged"] == 0


def test_slow_prefetches_change_nothing(model, batch, tmp_path, monkeypatch):
    """Reads slower than the wait limit: the layer reads the entries itself."""
    ref = reference(model, batch, tmp_path)
    ids, mask = batch
    original = DecodePipeline._read

    def slow(self, keys, outs, ranges=None):
        # Slower than the wait limit by construction: a read finishes only once a consumer has given up on an
        # entry (a fixed 50 ms sleep races the model's compute: a descheduled consumer may find every read done).
        deadline = time.monotonic() + 30
        while not self.staging.counters.late and time.monotonic() < deadline:
            time.sleep(0.001)
        original(self, keys, outs, ranges)

    monkeypatch.setattr(DecodePipeline, "_read", slow)
    with TieredKVCache.for_model(model, **opts(tmp_path, "reuse-layer-ahead",
                                             pipeline={"wait_timeout": 0.001, "predictor": "previous",
                                                       "reuse": False})) as cache:
        got = decode_logits(model, cache, ids, mask)
        pipe = cache.stats()["pipeline"]
    assert torch.equal(ref, got)
    assert pipe["staging"]["late"] > 0


def test_staging_memory_is_bounded_and_counted(model, batch, tmp_path):
    ids, mask = batch
    entry = 3 * 2 * 4 * 16 * 4  # batch x kv heads x block x head_dim x float32
    with TieredKVCache.for_model(model, **opts(tmp_path, "attention-aware", pipeline={"staging_bytes": 2 * entry,
                                                                                    "layer_ahead": True})) as cache:
        decode_logits(model, cache, ids, mask)
        stats = cache.stats()
    staging = stats["pipeline"]["staging"]
    assert staging["capacity_bytes"] == 2 * entry
    assert 0 < staging["peak_bytes"] <= 2 * entry
    assert staging["dropped"] > 0
    assert stats["kv"]["beside_tiers_bytes"] >= stats["pipeline"]["reuse_bytes"] > 0


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_beam_search_and_prompt_lookup_with_prefetches_in_flight(model, tmp_path, strategy, monkeypatch):
    """Reorder (beam search) and crop (prompt lookup) while slow background reads are still running give the
    tokens of the synchronous path (no pipeline, no resident pool)."""
    original = DecodePipeline._read

    def slow(self, keys, outs, ranges=None):
        time.sleep(0.002)
        original(self, keys, outs, ranges)

    gen_ = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 128, (6,), generator=gen_).repeat(5).unsqueeze(0)
    common = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                  pad_token_id=0)
    outs = {}
    ahead = {"layer_ahead": True} if strategy == "attention-aware" else None  # background reads in flight
    for name, pipeline in (("sync", SYNC), ("pipe", ahead)):
        if name == "pipe":
            monkeypatch.setattr(DecodePipeline, "_read", slow)
        kw = {} if pipeline is None else {"pipeline": pipeline}
        prep = without_pipeline if name == "sync" else (lambda c: c)
        with prep(TieredKVCache.for_model(model, **opts(tmp_path / name, strategy, **kw))) as cache:
            beams = model.generate(past_key_values=cache, num_beams=2, **common)
        with prep(TieredKVCache.for_model(model, **opts(tmp_path / (name + "-pl"), strategy, **kw))) as cache:
            lookup = model.generate(past_key_values=cache, prompt_lookup_num_tokens=3, **common)
        outs[name] = (beams, lookup)
    assert torch.equal(outs["sync"][0], outs["pipe"][0])
    assert torch.equal(outs["sync"][1], outs["pipe"][1])


def test_batch_selection_between_steps_keeps_logits(model, batch, tmp_path):
    ids, mask = batch
    results = []
    for pipeline in (SYNC, None):
        kw = {} if pipeline is None else {"pipeline": pipeline}
        prep = without_pipeline if pipeline is SYNC else (lambda c: c)
        with prep(TieredKVCache.for_model(model, **opts(tmp_path / str(len(results)), "attention-aware", **kw))) as cache:
            decode_logits(model, cache, ids, mask, steps=4)
            cache.batch_select_indices(torch.tensor([0, 2]))
            sub_ids = ids[[0, 2], -1:]
            sub_mask = torch.cat([mask[[0, 2]], torch.ones(2, 5, dtype=mask.dtype)], dim=1)
            results.append(decode_logits(model, cache, sub_ids, sub_mask, steps=4))
    assert torch.equal(results[0], results[1])


def test_close_while_prefetches_are_in_flight(model, batch, tmp_path, monkeypatch):
    ids, mask = batch
    started, release = threading.Event(), threading.Event()
    original = DecodePipeline._read

    def stuck(self, keys, outs, ranges=None):
        started.set()
        release.wait(10)
        original(self, keys, outs, ranges)

    monkeypatch.setattr(DecodePipeline, "_read", stuck)
    cache = TieredKVCache.for_model(model, **opts(tmp_path, "reuse-layer-ahead",
                                                  pipeline={"predictor": "previous", "reuse": False,
                                                            "wait_timeout": 0.001}))
    decode_logits(model, cache, ids, mask, steps=3)
    assert started.wait(10)
    threading.Timer(0.2, release.set).start()
    cache.close()
    assert cache._pipeline._executor._shutdown
    assert cache.stats()["pipeline"]["staging"]["bytes"] == 0
    cache.close()  # idempotent


def test_deepcopy_gets_its_own_pipeline(model, batch, tmp_path):
    import copy

    ids, mask = batch
    with TieredKVCache.for_model(model, **opts(tmp_path, "attention-aware")) as cache:
        decode_logits(model, cache, ids, mask, steps=2)
        twin = copy.deepcopy(cache)
        try:
            assert twin._pipeline is not cache._pipeline
            assert all(layer.pipeline is twin._pipeline for layer in twin.layers if layer.sparse is not None)
        finally:
            twin.close()


def test_strategies_configure_their_pipelines():
    assert not PipelineConfig.for_strategy("fetch-every-step").active
    reuse = PipelineConfig.for_strategy("reuse-layer-ahead")
    assert reuse.reuse and reuse.layer_ahead and not reuse.disk_staging and not reuse.defer_promotions
    full = PipelineConfig.for_strategy("attention-aware")
    assert full.reuse and full.layer_ahead and full.disk_staging and full.defer_promotions
    assert full.predictor == "previous" and reuse.predictor == "query"
    assert (full.retention, reuse.retention, PipelineConfig.for_strategy("fetch-every-step").retention) == (
        "mass", "previous", "none")
    with pytest.raises(ValueError, match="pool_blocks_factor"):
        PipelineConfig(pool_blocks_factor=0.5)
    with pytest.raises(ValueError, match="predictor"):
        PipelineConfig(predictor="oracle")
    with pytest.raises(ValueError, match="staging_bytes"):
        PipelineConfig(staging_bytes=-1)
    with pytest.raises(ValueError, match="background_end_step"):
        PipelineConfig(background_end_step="yes")
    assert full.background_end_step
    assert not full.exclusive_pool and not full.pool_prefer_cheap and full.ahead == reuse.ahead == 1  # opt-in


def test_pipeline_option_is_sparse_only_and_typed(make_config):
    with pytest.raises(ValueError, match="sparse"):
        TieredKVCache(make_config(), pipeline={"reuse": True})
    with pytest.raises(TypeError, match="pipeline"):
        TieredKVCache(make_config(), mode="sparse", pipeline=3)
    with pytest.raises(TypeError):
        TieredKVCache(make_config(), mode="sparse", pipeline={"no_such_stage": True})



def test_complement_placement_moves_blocks_not_logits(model, batch, tmp_path):
    """complement_reuse: the blocks a resident pool holds from the last step score 0 in the tiercache (the fastest tier is left to
    others); logits are unchanged."""
    ref = reference(model, batch, tmp_path)
    ids, mask = batch
    with TieredKVCache.for_model(model, **opts(tmp_path, "attention-aware", pipeline={"complement_reuse": True})) as cache:
        got = decode_logits(model, cache, ids, mask)
        cache.store.flush_writes()  # a block the writer thread has not stored yet is not in the index
        pipe = cache._pipeline
        assert pipe._last
        for idx, last in pipe._last.items():  # the blocks of each layer's last step, held by its pool
            layer = cache.layers[idx]
            for j in last:
                assert pipe._pools[idx].holds(j, layer._kkeys[j])
                assert cache.store.cache._index[layer._kkeys[j]].info.score == 0.0
    assert torch.equal(ref, got)


def test_disk_staging_ahead_stages_high_mass_blocks_off_the_fast_tier(model, batch, tmp_path):
    ids, mask = batch
    with TieredKVCache.for_model(model, **opts(tmp_path, "attention-aware",
                                             pipeline={"layer_ahead": False, "stage_ahead": 2,
                                                       "pool_blocks_factor": 1.0})) as cache:
        decode_logits(model, cache, ids, mask)
        pipe = cache.stats()["pipeline"]
    assert pipe["stage_ahead_entries"] > 0 and pipe["staging"]["jobs"] > 0
    assert pipe["predicted"] == 0  # no layer-ahead prediction in this configuration
    staging = pipe["staging"]
    assert staging["bytes"] + staging["spare_bytes"] <= staging["capacity_bytes"]  # recycled tensors are bounded


def test_staged_tensors_are_recycled_within_the_staging_bound(model, batch, tmp_path):
    ids, mask = batch
    # No pool retention: the layer-ahead predictor stages every step's selection off the fast tier again.
    with TieredKVCache.for_model(model, **opts(tmp_path, "fetch-every-step",
                                             pipeline={"layer_ahead": True, "predictor": "previous"})) as cache:
        pipe = cache._pipeline
        made = []
        original = pipe._entry_tensor

        def entry_tensor(*args):
            t = original(*args)
            made.append(t.data_ptr())
            return t

        pipe._entry_tensor = entry_tensor
        decode_logits(model, cache, ids, mask)
        stats = cache.stats()["pipeline"]
        assert stats["staged"] > 0 and len(set(made)) < len(made)  # taken tensors were staged into again
        assert stats["staging"]["bytes"] + stats["staging"]["spare_bytes"] <= stats["staging"]["capacity_bytes"]
        cache.reset()
        assert cache.stats()["pipeline"]["staging"]["spare_bytes"] == 0


def test_query_predictor_predicts_blocks_not_pages(model, batch, tmp_path, monkeypatch):
    """The layer-ahead "query" predictor (reuse-layer-ahead) selects over the next layer's digests with that
    layer's pages per block, so what it stages are block ids (with pages smaller than blocks, page ids
    taken for block ids would stage the wrong blocks and drop every page id past the block count)."""
    import tiercache_llm.sparse.selection as selection

    calls = []
    real = selection.select

    def spy(query, digests, config, **kw):
        sel = real(query, digests, config, **kw)
        calls.append((kw.get("pages_per_block", 1), sel))
        return sel

    monkeypatch.setattr(selection, "select", spy)  # predict_next imports it at call time; decode does not
    ids, mask = batch
    staged = []
    real_stage = DecodePipeline._stage_blocks

    def stage(self, layer, blocks, *args, **kw):
        staged.append((len(layer._blocks), list(blocks)))
        return real_stage(self, layer, blocks, *args, **kw)

    monkeypatch.setattr(DecodePipeline, "_stage_blocks", stage)
    with TieredKVCache.for_model(model, **opts(tmp_path, "reuse-layer-ahead", block_size=8, page_size=2)) as cache:
        assert cache.stats()["sparse"]["settings"]["strategy"] == "reuse-layer-ahead"
        decode_logits(model, cache, ids, mask, steps=4)
    assert calls, "the query predictor never ran"
    assert all(k == 4 for k, _ in calls)  # block_size // page_size
    assert all(bool((sel.fetch < sel.head_mask.shape[-1]).all()) for _, sel in calls)
    assert staged and all(j < n for n, blocks in staged for j in blocks)


def test_near_miss_staging_takes_disk_reads_off_the_step_and_keeps_logits(model, batch, tmp_path):
    """Disk staging ahead of near misses (attention-aware's ``stage_near``) reads blocks outside the pool in
    the background and the logits stay the synchronous path's (whether a staged entry is taken or not)."""
    ref = reference(model, batch, tmp_path)
    ids, mask = batch
    with TieredKVCache.for_model(model, **opts(tmp_path, "attention-aware",
                                             pipeline={"stage_ahead": 0, "stage_near": 64, "idle_stage_near": 0,
                                                       "pool_blocks_factor": 1.0})) as cache:
        got = decode_logits(model, cache, ids, mask)
        pipe = cache.stats()["pipeline"]
    assert torch.equal(ref, got)
    assert pipe["stage_ahead_entries"] > 0 and pipe["staging"]["renewed"] > 0


@pytest.mark.parametrize("layout", [{}, {"block_size": 8, "page_size": 2}])
def test_near_misses_rank_unselected_blocks_by_their_gap_to_the_cut(model, batch, tmp_path, layout):
    ids, mask = batch
    with TieredKVCache.for_model(model, **opts(tmp_path, "attention-aware", pipeline={"stage_near": 4, "seed_pool": False},
                                             **layout)) as cache:
        decode_logits(model, cache, ids, mask, steps=3)
        pipe = cache._pipeline
        checked = 0
        for idx, (scores, pages, ppb, count) in pipe._last_sel.items():
            layer = cache.layers[idx]
            n = len(layer._blocks)
            held = set(pipe._pools[idx].slot_of)
            got = pipe.near_misses(layer, held, n)
            # brute force: per row and KV head, the lowest selected score minus each unselected valid page's
            b, h, p = scores.shape
            gap = {}
            for r in range(b):
                for kh in range(h):
                    chosen = [float(scores[r, kh, q]) for q in range(p) if pages[r, kh, q]]
                    if not chosen:
                        continue
                    for q in range(p):
                        if not pages[r, kh, q] and count[r, q] > 0 and q // ppb < n:
                            g = min(chosen) - float(scores[r, kh, q])
                            gap[q // ppb] = min(gap.get(q // ppb, float("inf")), g)
            want = {j for j, g in gap.items() if j not in held and g != float("inf")}
            assert set(got) == want
            assert [gap[j] for j in got] == sorted(gap[j] for j in got)
            assert pipe.near_misses(layer, held, 2) == got[:2]
            checked += bool(got)
        assert checked > 0


def test_populate_maps_pages_without_changing_contents():
    import sys

    from tiercache_llm.sparse.pipeline import populate

    t = torch.arange(1 << 16, dtype=torch.float32)  # 256 KiB: whole pages inside it whatever its alignment
    before = t.clone()
    done = populate(t)
    assert torch.equal(t, before)
    if sys.platform.startswith("linux"):
        assert done == -1 or 0 < done <= t.nbytes  # -1: a kernel before 5.14 refuses MADV_POPULATE_WRITE
    assert populate(t[::2]) == 0 or populate(t[::2]) == -1  # not contiguous: nothing done


def test_prefaulted_pools_keep_logits(model, batch, tmp_path):
    ref = reference(model, batch, tmp_path)
    ids, mask = batch
    for prefault in (True, False):
        with TieredKVCache.for_model(model, **opts(tmp_path / str(prefault), "reuse-layer-ahead",
                                                 pipeline={"prefault_pool": prefault})) as cache:
            got = decode_logits(model, cache, ids, mask)
            pipe = cache.stats()["pipeline"]
        assert torch.equal(ref, got)
        if not prefault:
            assert pipe["prefault_bytes"] == 0


def _prefaulter_idle(pipe):
    """Wait until every job queued on the pipeline's prefault thread (one thread, FIFO) has run."""
    if pipe._prefaulter is not None:
        pipe._prefaulter.submit(lambda: None).result()


@pytest.mark.parametrize("strategy", ("reuse-layer-ahead", "attention-aware"))
def test_first_step_reserves_every_layer_and_warms_the_next_layers_slots(model, batch, tmp_path, strategy):
    """The first decode step makes every sparse layer's pool view before the arena's first allocation (so the
    reservation covers all layers and the step never reallocates the arena, copying every held slot), and
    with ``warm_first_step`` faults in the slots the next layers will take while the first layer reads; the
    warm-up changes no logits, and without it nothing is warmed."""
    from tiercache_llm.sparse.pool import populate

    ref = reference(model, batch, tmp_path)
    ids, mask = batch
    can_populate = populate(torch.empty(1 << 14)) > 0
    for warm in (True, False):
        # (attention-aware seeds its pools at the prefill by default: the warm-up is for pools made by a step)
        with TieredKVCache.for_model(model, **opts(tmp_path / str(warm), strategy,
                                                 pipeline={"warm_first_step": warm, "seed_pool": False})) as cache:
            pipe = cache._pipeline
            first: dict = {}
            fetch = pipe.fetch

            def spy(*args, **kwargs):
                out = fetch(*args, **kwargs)
                if not first and args[1].layer_idx == pipe.sparse_ids[-1]:  # the first decode step is done
                    first.update(views=sorted(pipe._pools), ordered=[pipe._pools[i] for i in pipe.sparse_ids]
                                 == pipe._arena.pools, reallocs=pipe._arena.reallocs)
                return out

            pipe.fetch = spy
            got = decode_logits(model, cache, ids, mask)
            _prefaulter_idle(pipe)
            stats = cache.stats()["pipeline"]
        assert first == {"views": pipe.sparse_ids, "ordered": True, "reallocs": 0}
        assert torch.equal(ref, got)
        if warm and can_populate:
            assert 0 < stats["warm_bytes"] <= stats["prefault_bytes"]
        if not warm:
            assert stats["warm_bytes"] == 0


def test_end_of_step_worker_sends_what_the_inline_path_sends(model, batch, tmp_path):
    """background_end_step moves the score flush, the promotion threshold and the staging choice to a worker:
    the logits, the scores the tiercache ends up with and the threshold are those of the inline path."""
    ids, mask = batch
    got = {}
    for background in (False, True):
        with TieredKVCache.for_model(model, **opts(tmp_path / str(background), "attention-aware",
                                                 pipeline={"background_end_step": background})) as cache:
            # the end-of-step flush's scores only: a staging read refreshes its entries' scores from the masses
            # when it runs, which differs with timing (with seeded pools few blocks are staged, and which
            # depends on whether the worker runs before or during the next step)
            sent = {}
            flush = cache.store.update_scores

            def spy(scores, sent=sent, flush=flush):
                if not threading.current_thread().name.startswith("tiercache-kv-stage"):
                    sent.update(scores)
                return flush(scores)

            cache.store.update_scores = spy
            threads = set()
            original = cache._pipeline._stage_ahead_all

            def stage_ahead_all(*args, **kwargs):
                threads.add(threading.current_thread().name)
                original(*args, **kwargs)

            cache._pipeline._stage_ahead_all = stage_ahead_all
            logits = decode_logits(model, cache, ids, mask)
            cache._pipeline.fence()
            pipe = cache.stats()["pipeline"]
            got[background] = (logits, dict(sent), cache.store.policy.promote_threshold, threads, pipe)
    (ref, ref_sent, ref_threshold, ref_threads, ref_pipe), (out, out_sent, threshold, out_threads, pipe) = \
        got[False], got[True]
    assert torch.equal(ref, out)
    strip = lambda sent: {key[2:]: score for key, score in sent.items()}  # noqa: E731 - keys carry the cache's id
    assert strip(out_sent) == strip(ref_sent) and len(out_sent) > 0
    assert threshold == ref_threshold
    assert ref_threads == {threading.main_thread().name} and ref_pipe["after_step_jobs"] == 0
    assert all(name.startswith("tiercache-kv-after-step") for name in out_threads) and out_threads
    assert pipe["after_step_jobs"] == 11 and pipe["stage_ahead_entries"] > 0  # after the prefill and 10 steps


def test_end_of_step_worker_errors_surface_at_the_next_fence(model, batch, tmp_path):
    """A failure of the worker's job (here the score flush) is never lost: the next fence raises it on the
    forward thread, and the cache keeps decoding afterwards."""
    ids, mask = batch
    with TieredKVCache.for_model(model, **opts(tmp_path, "attention-aware")) as cache:
        original = cache.store.update_scores
        calls = []

        def failing(scores):
            if threading.current_thread().name.startswith("tiercache-kv-after-step"):  # not the staging reads
                calls.append(len(scores))
                if len(calls) == 2:
                    raise RuntimeError("flush failed")
            return original(scores)

        cache.store.update_scores = failing
        with pytest.raises(RuntimeError, match="flush failed"):
            decode_logits(model, cache, ids, mask, steps=4)
        assert len(calls) == 2  # the step after the failed flush raised it at its own end
        cache._pipeline.fence()  # raised once, then clear
        with torch.no_grad():
            model(input_ids=ids[:, -1:], **cache_kwargs(cache, model))  # the next decode step runs
        cache._pipeline.fence()
        assert len(calls) == 3  # the step that raised left its scores queued: the next job sends them


def test_invalidate_and_close_wait_for_the_end_of_step_worker(model, batch, tmp_path):
    """Rows changing (reorder) and close() fence the worker: no job runs once they return."""
    ids, mask = batch
    cache = TieredKVCache.for_model(model, **opts(tmp_path, "attention-aware"))
    pipe = cache._pipeline
    running = threading.Event()
    original = pipe._stage_ahead_all

    def slow(*args, **kwargs):
        running.set()
        time.sleep(0.2)
        original(*args, **kwargs)

    pipe._stage_ahead_all = slow
    decode_logits(model, cache, ids, mask, steps=2)
    assert running.wait(5)
    cache.reorder_cache(torch.tensor([2, 0, 1]))
    assert pipe._after is None  # fenced
    cache.close()
    assert pipe._after is None and pipe.stats.after_step_jobs >= 2


def _controller_rule(cache):
    """The controller's own promotion threshold: the M-th most attended stored block, pools or not."""
    from tiercache_llm.sparse.placement import promotion_threshold

    layers = [layer for layer in cache.layers if layer.sparse is not None and layer._blocks]
    masses = torch.cat([layer.sparse.mass[: len(layer._blocks)] for layer in layers])
    entry = max(layer._blocks[0].nbytes // 2 for layer in layers)
    return promotion_threshold(masses, cache.store.fastest_tier_entries(entry) // 2)


def test_inline_end_of_step_computes_the_promotion_threshold_once(model, batch, tmp_path, monkeypatch):
    """Without the end-of-step worker, admission control asks the pipeline's rule first and computes one
    threshold per forward pass (it used to compute the controller's, then the pipeline's over it)."""
    import tiercache_llm.sparse.pipeline as pipeline_module
    import tiercache_llm.sparse_layer as layer_module

    calls = []
    for module in (pipeline_module, layer_module):
        original = module.promotion_threshold
        monkeypatch.setattr(module, "promotion_threshold",
                            lambda masses, room, original=original: calls.append(room) or original(masses, room))
    ids, mask = batch
    steps = 4
    with TieredKVCache.for_model(model, **opts(tmp_path, "attention-aware",
                                             pipeline={"background_end_step": False})) as cache:
        decode_logits(model, cache, ids, mask, steps=steps)
        pipe = cache._pipeline
        assert len(calls) == 1 + steps  # the prefill and each decode step
        want = pipe.promotion_threshold(cache.layers)
        assert want is not None and cache.store.policy.promote_threshold == want


@pytest.mark.parametrize("background", [False, True])
def test_a_rescale_step_keeps_the_pipelines_promotion_threshold(model, batch, tmp_path, monkeypatch, background):
    """On a step that rescales the masses, the controller's admission control (after the resent scores) sets the
    pipeline's threshold, not the controller's own rule over it."""
    import tiercache_llm.kv_cache as kv_module

    rescaled = []

    def needs_rescale(ctrl):
        if ctrl.clock == 3 and not rescaled:
            rescaled.append(ctrl.clock)
            return True
        return False

    monkeypatch.setattr(kv_module, "needs_rescale", needs_rescale)
    ids, mask = batch
    with TieredKVCache.for_model(model, **opts(tmp_path, "attention-aware",
                                             host="32KiB", pipeline={"background_end_step": background})) as cache:
        decode_logits(model, cache, ids, mask, steps=3)  # the third step rescales at its end
        assert rescaled == [3] and cache._sparse.clock == 0
        cache._pipeline.fence()
        want = cache._pipeline.promotion_threshold(cache.layers)
        assert want is not None and want != _controller_rule(cache)  # the two rules differ here
        assert cache.store.policy.promote_threshold == want


def _prefill_then(model, cache, ids, mask, chunks=(None,), steps=4):
    """Prefill ``ids`` in chunks ending at ``chunks`` (``None``: the end), then ``steps`` greedy decode steps;
    ``(logits of every step, pipeline stats after the prefill, after the first decode step)``."""
    out, after = [], []
    with torch.no_grad():
        start = 0
        for end in chunks:
            end = ids.shape[1] if end is None else end
            logits = model(input_ids=ids[:, start:end], attention_mask=mask[:, :end], **cache_kwargs(cache, model)).logits[:, -1]
            start = end
        after.append(cache.stats()["pipeline"])
        for _ in range(steps):
            nxt = logits.argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
            logits = model(input_ids=nxt, attention_mask=mask, **cache_kwargs(cache, model)).logits[:, -1]
            out.append(logits)
            if len(after) == 1:
                after.append(cache.stats()["pipeline"])
    return torch.stack(out), after[0], after[1]


def test_prefill_seeds_the_pools_so_the_first_step_reads_nothing_and_logits_stay(model, batch, tmp_path):
    """``seed_pool`` (attention-aware's default): the prefill copies the blocks it stores into the resident
    pools, so the first decode step finds every selected prompt block resident (no tier read, no staging)
    and the logits are those of the synchronous path; without it the first step reads them."""
    ref = reference(model, batch, tmp_path)
    ids, mask = batch
    assert PipelineConfig.for_strategy("attention-aware").seed_pool
    assert not PipelineConfig.for_strategy("reuse-layer-ahead").seed_pool
    with pytest.raises(ValueError, match="seed_pool"):
        PipelineConfig(seed_pool=1)
    for seed in (True, False):
        with TieredKVCache.for_model(model, **opts(tmp_path / str(seed), "attention-aware",
                                                 pipeline={"seed_pool": seed})) as cache:
            got, prefilled, first = _prefill_then(model, cache, ids, mask, steps=10)
            blocks = sum(len(layer._blocks) for layer in cache.layers if layer.sparse is not None)
        assert torch.equal(ref, got)
        if seed:
            assert prefilled["seeded"] == prefilled["pool_held"] > 0
            assert prefilled["seeded"] <= blocks
            assert first["needed"] > 0 and first["reused"] == first["needed"] and sum(first["sync"].values()) == 0
        else:
            assert prefilled["seeded"] == prefilled["pool_held"] == 0
            assert sum(first["sync"].values()) > 0


def test_a_prefill_in_chunks_seeds_every_whole_block_and_keeps_the_earlier_ones(model, batch, tmp_path):
    """Chunks ending inside a block: each chunk seeds the blocks it covers whole (the block a chunk boundary
    cuts is left to the tiers), and a later chunk keeps what an earlier one seeded; same logits as unseeded."""
    ids, mask = batch
    got, held = {}, set()
    for seed in (True, False):
        with TieredKVCache.for_model(model, **opts(tmp_path / str(seed), "attention-aware",
                                                 pipeline={"seed_pool": seed})) as cache:
            got[seed], prefilled, _ = _prefill_then(model, cache, ids, mask, chunks=(18, None))
            pipe = cache._pipeline
            layer = cache.layers[pipe.sparse_ids[0]]
            if seed:
                held = set(pipe._pools[layer.layer_idx].slot_of)
        if seed:  # 40 tokens, 4-token blocks: the first chunk covers blocks 0-3, the second 5-9 (block 4 is cut)
            assert ids.shape[1] == 40 and prefilled["seeded"] == len(pipe.sparse_ids) * 9
    assert torch.equal(got[True], got[False])
    assert {0, 1, 2, 3, 5, 6, 7, 8, 9} <= held  # decode steps may add block 4 and new ones, never drop a seeded one


def test_a_pool_bound_limits_what_the_prefill_seeds(model, batch, tmp_path):
    ids, mask = batch
    with TieredKVCache.for_model(model, **opts(tmp_path, "attention-aware", pool_bytes="12KiB")) as cache:
        got, prefilled, _ = _prefill_then(model, cache, ids, mask)
        pipe = cache._pipeline
        slot = prefilled["pool_slot_bytes"]
    share = (12 << 10) // slot // len(pipe.sparse_ids)
    assert 0 < prefilled["seeded"] <= share * len(pipe.sparse_ids)
    assert prefilled["reuse_bytes"] <= 12 << 10


@pytest.mark.parametrize("ahead", [1, 2, 3])
def test_layer_ahead_reads_never_promote_and_may_reach_further_ahead(make_model, batch, tmp_path, ahead, monkeypatch):
    """attention-aware with layer-ahead prefetch (previous selections, ``ahead`` layers ahead, bounded pools so it
    has misses to stage): its reads run outside the policy's ``promoting`` context (a bounded pool's misses would
    otherwise be promoted, and as much demoted, every step), entries are staged and taken, and the logits are the
    synchronous path's (6 layers: with 3, the layer 2 ahead is the one fetched just before, still held)."""
    model = make_model("llama", seed=5, num_hidden_layers=6)
    ref = reference(model, batch, tmp_path)
    ids, mask = batch
    pipeline = {"layer_ahead": True, "predictor": "previous", "ahead": ahead, "stage_ahead": 0, "stage_near": 0}
    with TieredKVCache.for_model(model, **opts(tmp_path, "attention-aware", pipeline=pipeline)) as free:
        decode_logits(model, free, ids, mask)
        slot = free.stats()["pipeline"]["pool_slot_bytes"]
    entered = []
    with TieredKVCache.for_model(model, **opts(tmp_path / "b", "attention-aware", pipeline=pipeline,
                                              pool_bytes=12 * slot)) as cache:
        policy = cache.store.policy
        real = policy.promoting

        def promoting():
            entered.append(threading.current_thread().name)
            return real()

        monkeypatch.setattr(policy, "promoting", promoting)
        got = decode_logits(model, cache, ids, mask)
        pipe = cache.stats()["pipeline"]
    assert torch.equal(ref, got)
    assert pipe["predicted_nonresident"] > 0 and pipe["staged"] > 0
    assert entered == []  # disk staging ahead is off here: nothing read under promoting()
    with pytest.raises(ValueError, match="ahead"):
        PipelineConfig(ahead=0)


def test_exclusive_pool_scores_what_bounded_pools_hold_zero_and_keeps_logits(model, batch, tmp_path):
    """exclusive_pool: under a pool bound, the end-of-step worker sends score 0 for the blocks the pools hold, so the
    fastest tier keeps blocks the pools do not; unbounded, it sends nothing extra.  Logits unchanged."""
    ref = reference(model, batch, tmp_path)
    ids, mask = batch
    pipeline = {"exclusive_pool": True, "pool_prefer_cheap": True}
    with TieredKVCache.for_model(model, **opts(tmp_path, "attention-aware", pipeline=pipeline)) as free:
        got_free = decode_logits(model, free, ids, mask)
        free._pipeline.fence()
        assert free._pipeline.pool_held_scores() == {}  # unbounded: nothing to complement
        slot = free.stats()["pipeline"]["pool_slot_bytes"]
    with TieredKVCache.for_model(model, **opts(tmp_path / "b", "attention-aware", pipeline=pipeline,
                                              pool_bytes=12 * slot)) as cache:
        got = decode_logits(model, cache, ids, mask)
        pipe = cache._pipeline
        pipe.fence()
        cache.store.flush_writes()
        held = pipe.pool_held_scores()
        assert held and set(held.values()) == {0.0}
        assert pipe._arena.prefer_cheap
        index = cache.store.cache._index
        for idx, pool in pipe._pools.items():  # held at the end of the last step: scored 0 by its job
            layer = cache.layers[idx]
            for j in pool.slot_of:
                if layer._kkeys[j] in index:
                    assert index[layer._kkeys[j]].info.score == 0.0
    assert torch.equal(ref, got) and torch.equal(ref, got_free)


def test_a_binding_pool_bound_leaves_the_misses_to_layer_ahead_not_to_near_miss_staging(model, batch, tmp_path,
                                                                                          monkeypatch):
    """attention-aware's defaults under a pool bound the pools fill: disk staging ahead stages nothing (the
    layer-ahead "previous" predictor stages the misses, without promoting); unbounded, near misses are staged as
    before.  Logits unchanged either way."""
    import tiercache_llm.sparse.pipeline as pipeline_mod

    ref = reference(model, batch, tmp_path)
    ids, mask = batch
    calls = []
    real = pipeline_mod.near_misses_many

    def spy(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(pipeline_mod, "near_misses_many", spy)
    with TieredKVCache.for_model(model, **opts(tmp_path, "attention-aware")) as free:
        got_free = decode_logits(model, free, ids, mask)
        free._pipeline.fence()
        assert not free._pipeline.pools_at_bound() and calls
        slot = free.stats()["pipeline"]["pool_slot_bytes"]
    calls.clear()
    with TieredKVCache.for_model(model, **opts(tmp_path / "b", "attention-aware", pool_bytes=12 * slot)) as cache:
        got = decode_logits(model, cache, ids, mask)
        pipe = cache._pipeline
        pipe.fence()
        assert pipe.pools_at_bound()
        stats = cache.stats()["pipeline"]
    assert stats["predicted"] > 0 and stats["staged"] > 0  # layer-ahead staged the bounded pools' misses
    assert len(calls) < 10  # near misses only before the arena reached its bound (the first steps), 10 steps run
    assert torch.equal(ref, got) and torch.equal(ref, got_free)


def _block_values(cache):
    """Every stored block's K and V of every layer, read back through the store (flushed first)."""
    cache._pipeline.fence()
    cache.store.flush_writes()
    cache.store.wait_prefetches()
    out = []
    for layer in cache.layers:
        keys = [k for pair in zip(layer._kkeys, layer._vkeys) for k in pair]
        out.append([t.clone() for t in cache.store.get_blocks(keys)] if keys else [])
    return out


@pytest.mark.parametrize("reuse_read", [True, False])
def test_budgeted_promotion_under_a_bound_promotes_within_budget_and_keeps_values_and_logits(make_model, batch,
                                                                                              tmp_path, monkeypatch,
                                                                                              reuse_read):
    """promote_bytes_per_step: under a pool bound the pools fill, each step chooses at most the budget of the
    highest-mass blocks the layer-ahead prefetch reads next step (on a slower tier, outside the pools), and those
    reads promote them (``promote_reuse_read``: no read of its own) or a tiercache prefetch does at once.
    Logits, and every stored value read back, equal those of the same cache without promotion; stats count what
    was chosen and promoted."""
    model = make_model("llama", seed=5, num_hidden_layers=6)
    ref = reference(model, batch, tmp_path)
    ids, mask = batch
    with TieredKVCache.for_model(model, **opts(tmp_path, "attention-aware")) as free:
        decode_logits(model, free, ids, mask, steps=1)
        slot = free.stats()["pipeline"]["pool_slot_bytes"]
    budget = 3 * slot  # 3 blocks (K + V) a step
    up = lambda s: sum(v for k, v in s["tiercache"]["bytes_moved"].items() if k.startswith("disk"))  # noqa: E731
    with TieredKVCache.for_model(model, **opts(tmp_path / "a", "attention-aware", pool_bytes=12 * slot,
                                            host="64KiB")) as off:
        got_off = decode_logits(model, off, ids, mask)
        values_off = _block_values(off)
        stats_off = off.stats()
    assert up(stats_off) == 0 and stats_off["pipeline"]["promote_chosen"] == 0  # off by default
    with TieredKVCache.for_model(model, **opts(tmp_path / "b", "attention-aware", pool_bytes=12 * slot, host="64KiB",
                                              pipeline={"promote_bytes_per_step": budget,
                                                        "promote_reuse_read": reuse_read})) as cache:
        policy = cache.store.policy
        chosen = []
        real = policy.choose

        def choose(keys):
            keys = list(keys)
            chosen.append(keys)
            return real(keys)

        monkeypatch.setattr(policy, "choose", choose)
        got = decode_logits(model, cache, ids, mask)
        values = _block_values(cache)
        stats = cache.stats()
        entry = slot // cache.layers[0]._entries_per_block  # one joint K/V entry per block (equal shapes)
    pipe = stats["pipeline"]
    assert chosen and all(len(keys) * entry <= budget for keys in chosen)
    if reuse_read:  # the policy's chosen set: the layer-ahead reads promote them
        assert pipe["promote_chosen"] == sum(map(len, chosen)) > 0
    else:  # the policy is left alone: a tiercache prefetch promotes them
        assert not any(chosen) and pipe["promote_chosen"] > 0
    assert pipe["promote_chosen"] * entry <= budget * pipe["steps"]
    assert 0 < pipe["promoted"] <= pipe["promote_chosen"] and pipe["promoted_bytes"] == pipe["promoted"] * entry
    assert pipe["promote_candidates"] >= pipe["promote_chosen"]
    if reuse_read:  # the staging reads that promote are the ones the policy counted
        assert 0 < up(stats) <= pipe["promoted_bytes"]
    else:  # a prefetch counts what is still in the fastest tier at its end: one it promoted may be demoted again
        # (64 KiB host tier) before then, but nothing moves up that was not chosen
        assert 0 < pipe["promoted_bytes"] <= up(stats) <= pipe["promote_chosen"] * entry
    assert torch.equal(ref, got) and torch.equal(ref, got_off)
    assert len(values) == len(values_off)
    for a, b in zip(values, values_off):
        assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_budgeted_promotion_respects_the_margin_and_backs_off_when_the_writer_is_behind(make_model, batch, tmp_path,
                                                                                        monkeypatch):
    """Nothing is chosen when no candidate beats its victim by ``promote_margin`` (hysteresis), nor while the
    write-behind queue is more than half full (back-pressure: ``promote_skipped``); bad values are refused."""
    from tiercache_llm.store import BlockStore

    model = make_model("llama", seed=5, num_hidden_layers=6)
    ids, mask = batch
    with TieredKVCache.for_model(model, **opts(tmp_path, "attention-aware")) as free:
        decode_logits(model, free, ids, mask, steps=1)
        slot = free.stats()["pipeline"]["pool_slot_bytes"]
    chosen = {}
    for margin in (1.0, 1e30):  # a full fastest tier (16 KiB): every promotion displaces a victim
        pipeline = {"promote_bytes_per_step": 100 * slot, "promote_margin": margin}
        with TieredKVCache.for_model(model, **opts(tmp_path / str(margin), "attention-aware", pool_bytes=12 * slot,
                                                  host="16KiB", pipeline=pipeline)) as cache:
            decode_logits(model, cache, ids, mask)
            stats = cache.stats()
        assert stats["pipeline"]["promote_candidates"] > 0
        chosen[margin] = stats["pipeline"]["promote_chosen"]
    assert chosen[1.0] > chosen[1e30]  # only free room and never-attended victims (mass 0) are displaced at 1e30
    monkeypatch.setattr(BlockStore, "queued_bytes", property(lambda self: 1 << 40))
    with TieredKVCache.for_model(model, **opts(tmp_path / "b", "attention-aware", pool_bytes=12 * slot, host="64KiB",
                                              pipeline={"promote_bytes_per_step": 100 * slot})) as cache:
        decode_logits(model, cache, ids, mask)
        stats = cache.stats()
    assert stats["pipeline"]["promote_skipped"] > 0 and stats["pipeline"]["promote_chosen"] == 0
    for bad in ({"promote_bytes_per_step": -1}, {"promote_bytes_per_step": 1.5}, {"promote_margin": 0.5},
                {"promote_margin": True}):
        with pytest.raises(ValueError, match="promote_"):
            PipelineConfig(**bad)


def test_near_predictor_adds_near_misses_outside_the_pool_and_keeps_logits(model, batch, tmp_path, monkeypatch):
    """predictor="near" (attention-aware under a pool bound): each prediction is the next layer's previous
    selection plus up to ``predict_near`` of its near misses that neither that selection nor its pool holds;
    what it misses is still read before attention (logits are the synchronous path's), and the hit counters
    add up; on this run it predicts at least the share of the misses "previous" predicts."""
    ref = reference(model, batch, tmp_path)
    ids, mask = batch
    extra = []
    real_layer = DecodePipeline._predict_layer

    def predict_layer(self, nxt_idx, query, *args, **kw):
        prev = set(self._last.get(nxt_idx, ()))
        pool = self._pools.get(nxt_idx)
        held = set(pool.slot_of) if pool is not None else set()
        real_layer(self, nxt_idx, query, *args, **kw)
        layer = self.layers[nxt_idx]
        got = {j for j, key in enumerate(layer._kkeys) if key in self._predicted.get(nxt_idx, ())}
        added = got - prev
        assert not added & held and len(added) <= self.config.predict_near
        extra.append(len(added))

    monkeypatch.setattr(DecodePipeline, "_predict_layer", predict_layer)
    with TieredKVCache.for_model(model, **opts(tmp_path / "s", "attention-aware")) as free:
        decode_logits(model, free, ids, mask, steps=2)
        slot = free.stats()["pipeline"]["pool_slot_bytes"]
    runs = {}
    for predictor in ("previous", "near"):
        extra.clear()
        with TieredKVCache.for_model(model, **opts(tmp_path / predictor, "attention-aware", pool_bytes=12 * slot,
                                                   pipeline={"predictor": predictor, "predict_near": 4})) as cache:
            got = decode_logits(model, cache, ids, mask)
            stats = cache.stats()["pipeline"]
        assert torch.equal(ref, got)
        assert 0 < stats["predicted_hits"] <= stats["predictable"]
        assert stats["mispredicted_nonresident"] <= stats["predictable"] - stats["predicted_hits"]
        runs[predictor] = (sum(extra), stats)
    assert runs["previous"][0] == 0 and runs["near"][0] > 0  # only "near" adds blocks to the previous selection
    assert runs["near"][1]["prediction_recall"] >= runs["previous"][1]["prediction_recall"]


def test_predict_near_must_be_a_count():
    with pytest.raises(ValueError, match="predict_near"):
        PipelineConfig(predict_near=-1)
    assert PipelineConfig.for_strategy("attention-aware", predictor="near").predictor == "near"


def test_huge_page_pools_are_on_where_measured_faster_and_checked():
    assert PipelineConfig.for_strategy("attention-aware").huge_pages
    assert PipelineConfig.for_strategy("reuse-layer-ahead").huge_pages
    assert not PipelineConfig.for_strategy("fetch-every-step").huge_pages
    with pytest.raises(ValueError, match="huge_pages"):
        PipelineConfig(huge_pages="yes")


@pytest.mark.parametrize("strategy", ["attention-aware", "reuse-layer-ahead"])
def test_huge_page_pools_give_the_synchronous_logits(model, batch, tmp_path, monkeypatch, strategy):
    """Pools on transparent huge pages (any size qualifies here) decode exactly what the synchronous path does, and
    the slot tensors start on a huge page where the platform has ``madvise``."""
    from tiercache import buffers
    from tiercache_llm.sparse import pool as pool_module

    monkeypatch.setattr(pool_module, "HUGE_MIN_BYTES", 1)
    ref = reference(model, batch, tmp_path)
    ids, mask = batch
    with TieredKVCache.for_model(model, **opts(tmp_path, strategy)) as cache:
        got = decode_logits(model, cache, ids, mask)
        arena = cache._pipeline._arena
        assert arena.huge_pages
        if buffers.libc_madvise() is not None:
            assert (arena.kv if arena.joint else arena.k).data_ptr() % buffers.HUGE_PAGE == 0
    assert torch.equal(ref, got)
