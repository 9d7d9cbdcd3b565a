"""Sparse mode of TieredKVCache with real transformers generate() on tiny random models."""

import pytest
import torch
from transformers import DynamicCache

from tiercache_llm import TieredKVCache
from tiercache_llm.attention_hook import PREFIX, is_prepared, restore_model, sparse_attention
from tiercache_llm.hf_kwargs import cache_kwargs
from tiercache_llm.sparse import KeyDigests
from tiercache_llm.sparse_layer import SparseModeError

from .test_generate_tiny import left_padded_batch

DENSE = 1_000_000  # a token budget above every context here: sparse mode must equal dense attention


def gen(model, cache, ids, mask, n=12, **kw):
    kw.setdefault("do_sample", False)
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, pad_token_id=0, past_key_values=cache,
                          return_dict_in_generate=True, output_scores=True, **kw)


def assert_same(ref, got, atol=1e-5):
    assert torch.equal(ref.sequences, got.sequences)
    for a, b in zip(ref.scores, got.scores):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=atol)


def digests_match_keys(cache):
    """Every sparse layer's digests equal digests rebuilt from its stored keys and recorded validity."""
    for layer in cache.layers:
        state = layer.sparse
        if state is None or state.digests is None:
            continue
        keys = layer.keys
        n = keys.shape[2]
        assert state.digests.length == n == layer.get_seq_length()
        ref = KeyDigests.from_keys(keys, state.page_size, state.valid[:, :n], storage=state.digests.dtype)
        assert torch.equal(state.digests.count, ref.count)
        torch.testing.assert_close(state.digests.lo, ref.lo, rtol=0, atol=0)
        torch.testing.assert_close(state.digests.hi, ref.hi, rtol=0, atol=0)
        # float16 landmarks: one rounding of float32 sums that may differ in their last bits
        tol = 1e-5 if state.digests.dtype == torch.float32 else 2e-3
        torch.testing.assert_close(state.digests.total, ref.total, rtol=tol, atol=tol)
        assert state.mass.numel() == state.digests.n_blocks


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_dense_budget_equals_dynamic_cache_left_padded(make_model, kind):
    model = make_model(kind)
    ids, mask = left_padded_batch()
    ref = gen(model, DynamicCache(config=model.config), ids, mask, n=20)
    with TieredKVCache.for_model(model, mode="sparse", budget=DENSE, block_size=4, host="8KiB", disk="16MiB") as cache:
        got = gen(model, cache, ids, mask, n=20)
        stats = cache.stats()
        cache.restore_model()
    assert_same(ref, got)
    sparse = stats["sparse"]["total"]
    assert sparse["steps"] == 19 and sparse["layer_steps"] == 19 * 2
    assert sparse["tokens_attended"] == sparse["tokens_context"]  # everything valid selected, nothing else
    # Really fetched from the tiers: from disk, or from the write-behind queue while the writer lags (which
    # of the two depends on the writer's timing); the 8 KiB host tier cannot have held the rest.
    fetched = sparse["bytes_fetched"]
    assert fetched.get("disk", 0) + fetched.get("write-queue", 0) > 0
    assert stats["tiercache"]["tiers"]["disk"]["entries"] > 0
    assert stats["kv"]["digest_bytes"] > 0


def test_fraction_one_is_dense_too(make_model):
    model = make_model("llama", seed=4)
    ids, mask = left_padded_batch(seed=4)
    ref = gen(model, DynamicCache(config=model.config), ids, mask)
    with TieredKVCache.for_model(model, mode="sparse", budget=1.0, block_size=3, host="1MiB") as cache:
        got = gen(model, cache, ids, mask)
        cache.restore_model()
    assert_same(ref, got)


def test_eager_base_dense_equivalence(make_model):
    model = make_model("llama", seed=5)
    model.set_attn_implementation("eager")
    ids, mask = left_padded_batch(seed=5)
    ref = gen(model, DynamicCache(config=model.config), ids, mask)
    with TieredKVCache.for_model(model, mode="sparse", budget=DENSE, block_size=4, host="1MiB") as cache:
        assert model.config._attn_implementation == PREFIX + "eager"
        got = gen(model, cache, ids, mask)
        cache.restore_model()
    assert model.config._attn_implementation == "eager"
    assert_same(ref, got)


def test_unprepared_model_raises_at_first_decode_step(make_model):
    model = make_model("llama")
    ids, mask = left_padded_batch()
    cache = TieredKVCache(model.config, mode="sparse", budget=16, block_size=4, host="1MiB")
    with pytest.raises(SparseModeError, match="not prepared"):
        gen(model, cache, ids, mask)
    cache.close()
    # plain forward: prefill works (exact), the first decode step raises
    cache = TieredKVCache(model.config, mode="sparse", budget=16, block_size=4, host="1MiB")
    model(ids, attention_mask=mask, **cache_kwargs(cache, model))
    with pytest.raises(SparseModeError):
        model(ids[:, :1], attention_mask=torch.cat([mask, mask[:, :1]], 1), **cache_kwargs(cache, model))
    cache.close()


def test_restored_model_refuses_sparse_decode(make_model):
    model = make_model("llama")
    ids, mask = left_padded_batch()
    cache = TieredKVCache.for_model(model, mode="sparse", budget=16, block_size=4, host="1MiB")
    model(ids, attention_mask=mask, **cache_kwargs(cache, model))  # prefill while prepared
    cache.restore_model()
    with pytest.raises(SparseModeError):
        model(ids[:, -1:], attention_mask=torch.cat([mask, torch.ones_like(mask[:, :1])], 1), **cache_kwargs(cache, model))
    cache.close()


def test_attention_switched_away_after_for_model_raises(make_model):
    model = make_model("llama")
    ids, mask = left_padded_batch()
    cache = TieredKVCache.for_model(model, mode="sparse", budget=16, block_size=4, host="1MiB")
    model.set_attn_implementation("sdpa")
    with pytest.raises(RuntimeError, match="prepared"):
        gen(model, cache, ids, mask)
    restore_model(model)
    cache.close()


def test_one_model_serves_exact_dynamic_and_sparse_in_turn(make_model):
    model = make_model("qwen2", seed=6)
    ids, mask = left_padded_batch(seed=6)
    ref = gen(model, DynamicCache(config=model.config), ids, mask)
    sparse_small = TieredKVCache.for_model(model, mode="sparse", budget=8, sink=2, recent=4, block_size=4, host="1MiB")
    assert is_prepared(model) and model.config._attn_implementation == PREFIX + "sdpa"
    for _ in range(2):
        assert_same(ref, gen(model, DynamicCache(config=model.config), ids, mask))
        with TieredKVCache.for_model(model, block_size=4, host="1MiB") as exact:  # exact mode leaves the model as it is
            assert_same(ref, gen(model, exact, ids, mask))
        with TieredKVCache.for_model(model, mode="sparse", budget=DENSE, block_size=4, host="1MiB") as dense:
            assert_same(ref, gen(model, dense, ids, mask))
        assert_same(ref, gen(model, None, ids, mask))
    out = gen(model, sparse_small, ids, mask)
    assert out.sequences.shape == ref.sequences.shape
    assert sparse_small.stats()["sparse"]["total"]["tokens_attended"] < sparse_small.stats()["sparse"]["total"]["tokens_context"]
    sparse_small.restore_model()
    sparse_small.close()
    assert not is_prepared(model) and model.config._attn_implementation == "sdpa"
    assert not model.get_decoder()._forward_pre_hooks and not model.get_decoder()._forward_hooks
    assert_same(ref, gen(model, DynamicCache(config=model.config), ids, mask))


def test_context_manager_prepares_and_restores(make_model):
    model = make_model("llama")
    with sparse_attention(model):
        assert is_prepared(model)
    assert not is_prepared(model) and model.config._attn_implementation == "sdpa"


def test_sinks_recent_selected_and_padding_never(make_model, monkeypatch):
    """Every decode step: the blocks holding each row's first sink and last recent valid tokens are selected
    for every KV head, no block made only of padding is selected, and padded tokens get no attention."""
    import tiercache_llm.sparse_layer as sl

    model = make_model("llama", seed=7)
    bs, sink, recent = 4, 3, 5
    ids, mask = left_padded_batch(seed=7, lengths=(40, 27, 13))
    pads = (mask == 0).sum(1)
    seen = []
    original = sl.select

    def spy(query, digests, config, **kw):
        sel = original(query, digests, config, **kw)
        seen.append((sel, digests.length, digests.count.clone()))
        return sel

    monkeypatch.setattr(sl, "select", spy)
    with TieredKVCache.for_model(model, mode="sparse", budget=12, sink=sink, recent=recent, block_size=bs,
                                 host="1MiB") as cache:
        gen(model, cache, ids, mask, n=10)
        cache.restore_model()
    assert len(seen) == 9 * 2
    for sel, length, count in seen:
        for row in range(ids.shape[0]):
            first = int(pads[row])
            head = sel.head_mask[row]  # (H, N)
            for pos in list(range(first, first + sink)) + list(range(length - recent, length)):
                assert head[:, pos // bs].all(), (row, pos)
            only_padding = count[row] == 0
            assert not head[:, only_padding].any()
            assert (count[row][:first // bs] == 0).all()
            # each row's budget counts its own valid tokens: forced blocks are paid first, then <= 12 tokens
            assert int(sel.budget[row]) == 12


def test_sampling_greedy_small_budget_and_beam(make_model):
    model = make_model("llama", seed=8)
    ids, mask = left_padded_batch(seed=8)
    with TieredKVCache.for_model(model, mode="sparse", budget=0.5, block_size=4, host="1MiB") as cache:
        torch.manual_seed(1)
        out = gen(model, cache, ids, mask, n=10, do_sample=True)
        assert out.sequences.shape == (3, ids.shape[1] + 10)
        digests_match_keys(cache)
    # sampling with a dense budget follows DynamicCache exactly (same seed)
    torch.manual_seed(3)
    ref = gen(model, DynamicCache(config=model.config), ids, mask, n=10, do_sample=True, num_return_sequences=2)
    with TieredKVCache.for_model(model, mode="sparse", budget=DENSE, block_size=4, host="1MiB") as cache:
        torch.manual_seed(3)
        got = gen(model, cache, ids, mask, n=10, do_sample=True, num_return_sequences=2)
        digests_match_keys(cache)  # batch_repeat_interleave kept digests consistent
    assert_same(ref, got)
    # beam search reorders rows every step
    ref = gen(model, DynamicCache(config=model.config), ids, mask, n=10, num_beams=2, num_return_sequences=2)
    with TieredKVCache.for_model(model, mode="sparse", budget=DENSE, block_size=4, host="8KiB", disk="16MiB") as cache:
        got = gen(model, cache, ids, mask, n=10, num_beams=2, num_return_sequences=2)
        digests_match_keys(cache)
        cache.restore_model()
    assert torch.equal(ref.sequences, got.sequences)
    torch.testing.assert_close(ref.sequences_scores, got.sequences_scores)


def test_prompt_lookup_crops_and_keeps_digests(make_model):
    """Multi-token steps after prefill run exact; rejected candidates crop the cache, digests follow."""
    model = make_model("llama", seed=3)
    gen_ = torch.Generator().manual_seed(3)
    pattern = torch.randint(3, 128, (6,), generator=gen_)
    ids = pattern.repeat(4).unsqueeze(0)
    common = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=30, do_sample=False,
                  pad_token_id=0)
    ref = model.generate(past_key_values=DynamicCache(config=model.config), **common)
    with TieredKVCache.for_model(model, mode="sparse", budget=DENSE, block_size=4, host="1MiB") as cache:
        crops = []
        original = cache.crop
        cache.crop = lambda n: (crops.append(n), original(n))[1]
        got = model.generate(past_key_values=cache, prompt_lookup_num_tokens=3, **common)
        digests_match_keys(cache)
        cache.restore_model()
    assert torch.equal(ref, got)
    assert crops


def _score_spy(cache):
    sent = {}
    original = cache.store.update_scores

    def spy(scores):
        sent.update(scores)
        return original(scores)

    cache.store.update_scores = spy
    return sent


def _settle(cache):
    """Wait for the end-of-step work the pipeline's worker took (it sends each step's scores after the step)."""
    if cache._pipeline is not None:
        cache._pipeline.fence()


def test_scores_follow_mass_through_crop_reorder_and_batch_selection(make_model):
    model = make_model("llama", seed=9)
    ids, mask = left_padded_batch(seed=9, lengths=(30, 22, 17))
    cache = TieredKVCache.for_model(model, mode="sparse", budget=8, sink=2, recent=4, block_size=4, host="1MiB")
    sent = _score_spy(cache)
    gen(model, cache, ids, mask, n=8)
    _settle(cache)

    def check():
        digests_match_keys(cache)
        for layer in cache.layers:
            mass = layer.sparse.mass
            for j, (kk, vk) in enumerate(zip(layer._kkeys, layer._vkeys)):
                if float(mass[j]) > 0:
                    assert sent[kk] == sent[vk] == pytest.approx(float(mass[j]))

    check()
    assert any(v > 0 for v in sent.values())
    cache.reorder_cache(torch.tensor([2, 0, 1]))
    check()
    cache.batch_select_indices(torch.tensor([0, 2]))  # compaction rewrites blocks under new keys
    cache._sparse.flush_scores(cache.store)
    check()
    for layer in cache.layers:
        assert layer.sparse.digests.lo.shape[0] == 2 and layer.sparse.valid.shape[0] == 2
    cache.crop(-5)
    check()
    cache.reset()
    assert all(layer.sparse.digests is None for layer in cache.layers)
    cache.restore_model()
    cache.close()


def _reuse(model, strategy, ids, **options):
    with TieredKVCache.for_model(model, mode="sparse", strategy=strategy, budget=24, sink=4, recent=4, block_size=4,
                                 host="32KiB", disk="16MiB", **options) as cache:  # host: ~30% of the KV
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                       pad_token_id=0, past_key_values=cache)
        stats = cache.stats()
        cache.restore_model()
    return stats


def test_attention_aware_reuses_more_than_fetch_every_step(make_model):
    """A repeated prompt makes attention return to the same blocks step after step."""
    model = make_model("llama", seed=10)
    gen_ = torch.Generator().manual_seed(10)
    ids = torch.randint(3, 128, (16,), generator=gen_).repeat(12).unsqueeze(0)  # 192 tokens
    aware = _reuse(model, "attention-aware", ids)
    every = _reuse(model, "fetch-every-step", ids)
    a, e = aware["sparse"]["total"], every["sparse"]["total"]
    assert a["blocks_selected"] > 0 and e["blocks_selected"] > 0
    assert a["reuse_rate"] > e["reuse_rate"], (a["reuse_rate"], e["reuse_rate"])
    assert aware["tiercache"]["policy"] == "attention-aware"
    assert every["tiercache"]["policy"] == "kv-stream"
    up = lambda s: sum(v for k, v in s["tiercache"]["bytes_moved"].items() if k.startswith("disk"))  # noqa: E731
    assert up(every) == 0  # fetch-every-step never promotes
    # placement (and the pipeline's reuse, which needs no read at all) cuts what the disk serves to the fetch
    assert a["bytes_fetched"].get("disk", 0) < e["bytes_fetched"].get("disk", 0), (a["bytes_fetched"], e["bytes_fetched"])
    # Under the default bound (the 32 KiB host budget) the pools fill it, and disk staging ahead -- the reads
    # that promote -- stages nothing (DecodePipeline.pools_at_bound); with unbounded pools it promotes what
    # the pools do not hold.
    assert aware["pipeline"]["pool_bound_bytes"] == 32 << 10
    assert up(aware) == 0 and aware["pipeline"]["promoted"] == 0
    # Budgeted promotion (opt-in, PipelineConfig.promote_bytes_per_step): the layer-ahead reads promote the
    # highest-mass blocks they bring from disk, within the budget (6 layers: with 2, a layer's misses are evicted
    # after the layer-ahead prefetch looked, so it reads nothing).
    deep = make_model("llama", seed=10, num_hidden_layers=6)
    budget = 4 * aware["pipeline"]["pool_slot_bytes"]
    assert up(_reuse(deep, "attention-aware", ids)) == 0
    promoting = _reuse(deep, "attention-aware", ids, pipeline={"promote_bytes_per_step": budget})
    assert 0 < up(promoting) <= promoting["pipeline"]["promoted_bytes"] <= budget * promoting["pipeline"]["steps"]
    # unseeded, so the pools fill from the tiers and disk staging has blocks outside them to promote
    unbounded = _reuse(model, "attention-aware", ids, pool_bytes=None, pipeline={"seed_pool": False})
    assert up(unbounded) > 0
    assert unbounded["sparse"]["total"]["reuse_rate"] > e["reuse_rate"]


def test_stats_are_json(make_model):
    import json

    model = make_model("llama")
    ids, mask = left_padded_batch()
    with TieredKVCache.for_model(model, mode="sparse", budget=8, block_size=4, host="1MiB") as cache:
        gen(model, cache, ids, mask, n=4)
        stats = cache.stats()
        cache.restore_model()
    json.dumps(stats)
    last = stats["sparse"]["last_step"]
    assert last["steps"] == 1 and last["layer_steps"] == 2
    for key in ("scoring_seconds", "fetch_seconds", "attention_seconds"):
        assert stats["sparse"]["total"][key] > 0


def test_plain_forward_calls_decode_sparsely(make_model):
    """model(ids, past_key_values=cache) step by step, no attention mask: dense budget == DynamicCache."""
    model = make_model("llama", seed=11)
    ids = torch.randint(3, 128, (2, 23), generator=torch.Generator().manual_seed(11))
    with TieredKVCache.for_model(model, mode="sparse", budget=DENSE, block_size=4, host="1MiB") as cache:
        ref_cache = DynamicCache(config=model.config)
        with torch.no_grad():
            a = model(ids, **cache_kwargs(ref_cache, model)).logits
            b = model(ids, **cache_kwargs(cache, model)).logits
            torch.testing.assert_close(a, b)
            for _ in range(6):
                nxt = a[:, -1:].argmax(-1)
                a = model(nxt, **cache_kwargs(ref_cache, model)).logits
                b = model(nxt, **cache_kwargs(cache, model)).logits
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert cache.stats()["sparse"]["total"]["steps"] == 6
        cache.restore_model()


def test_sliding_window_layers_stay_exact(make_model):
    model = make_model("mistral", seed=12, sliding_window=8)
    ids, mask = left_padded_batch(seed=12)
    ref = gen(model, DynamicCache(config=model.config), ids, mask)
    with TieredKVCache.for_model(model, mode="sparse", budget=4, block_size=4, host="1MiB") as cache:
        assert all(layer.sparse is None for layer in cache.layers)  # every layer slides: nothing to select
        got = gen(model, cache, ids, mask)
        cache.restore_model()
    assert_same(ref, got)


def test_fast_decay_rescales_scores_and_keeps_them_consistent(make_model):
    """decay=0.01 inflates contributions 100x per step: the cache rescales before float64 overflows and
    resends every score."""
    model = make_model("llama", seed=13)
    ids, mask = left_padded_batch(seed=13)
    cache = TieredKVCache.for_model(model, mode="sparse", budget=8, sink=2, recent=4, decay=0.01, block_size=4,
                                    host="1MiB")
    sent = _score_spy(cache)
    gen(model, cache, ids, mask, n=30)
    _settle(cache)
    assert cache._sparse.clock < 29  # it was reset
    for layer in cache.layers:
        mass = layer.sparse.mass
        assert torch.isfinite(mass).all() and float(mass.max()) < 1e31
        for j, kk in enumerate(layer._kkeys):
            if float(mass[j]) > 0:
                assert sent[kk] == pytest.approx(float(mass[j]))
    cache.restore_model()
    cache.close()


def test_update_outside_a_prepared_forward_pass_raises_at_once(make_model):
    """Cache.update of a decode step that is not part of a prepared model's forward pass raises
    SparseModeError before it changes anything (no silent dense or truncated attention)."""
    model = make_model("llama")
    ids, mask = left_padded_batch()
    with TieredKVCache.for_model(model, mode="sparse", budget=16, block_size=4, host="1MiB") as cache:
        model(ids, attention_mask=mask, **cache_kwargs(cache, model))  # prefill through the prepared model
        layer = cache.layers[0]
        length = layer.get_seq_length()
        k = torch.randn(ids.shape[0], layer._shape_k[0], 1, layer._shape_k[1])
        with pytest.raises(SparseModeError, match="not prepared"):
            cache.update(k, torch.randn_like(k), 0)
        assert layer.get_seq_length() == length and layer.sparse.digests.length == length
        cache.restore_model()


@pytest.mark.parametrize("page", [1, 2, 4])
def test_pages_at_dense_budget_equal_dynamic_cache(make_model, page):
    model = make_model("llama", seed=21)
    ids, mask = left_padded_batch(seed=21)
    ref = gen(model, DynamicCache(config=model.config), ids, mask, n=14)
    with TieredKVCache.for_model(model, mode="sparse", budget=DENSE, block_size=8, page_size=page, host="8KiB",
                                 disk="16MiB") as cache:
        got = gen(model, cache, ids, mask, n=14)
        stats = cache.stats()["sparse"]["total"]
        digests_match_keys(cache)
        cache.restore_model()
    assert_same(ref, got)
    assert stats["tokens_attended"] == stats["tokens_context"]


def test_pages_attend_only_their_tokens_within_the_budget(make_model, monkeypatch):
    """Small pages inside larger blocks: each (row, KV head) attends exactly the valid tokens of its
    selected pages (token mask passed to attention), never more than max(budget, forced pages), always
    its sink and recent pages, never padding; fetched blocks are the union of blocks holding a page."""
    import tiercache_llm.sparse_layer as sl

    model = make_model("llama", seed=22)
    bs, page, sink, recent, budget = 8, 2, 3, 5, 10
    ids, mask = left_padded_batch(seed=22, lengths=(40, 27, 13))
    pads = (mask == 0).sum(1)
    seen = []
    original = sl.build_page_table_from_valid

    def spy(sel, slot_of_fetch, valid, ctx, block_size):
        table = original(sel, slot_of_fetch, valid, ctx, block_size)
        seen.append(table)
        return table

    sels = []
    original_select = sl.select

    def spy_select(query, digests, config, **kw):
        sel = original_select(query, digests, config, **kw)
        sels.append((sel, digests.length, digests.count.clone()))
        return sel

    monkeypatch.setattr(sl, "build_page_table_from_valid", spy)
    monkeypatch.setattr(sl, "select", spy_select)
    # every call through the page table, so that each is inspected here: the direct CPU path (taken at one
    # torch thread when every (row, head) has as many pages) is the table path bit for bit (test_direct_pages.py)
    monkeypatch.setattr(sl, "attend_pages_cpu", lambda *a, **k: None)
    with TieredKVCache.for_model(model, mode="sparse", budget=budget, sink=sink, recent=recent, block_size=bs,
                                 page_size=page, host="1MiB") as cache:
        gen(model, cache, ids, mask, n=8)
        cache.restore_model()
    assert len(seen) == len(sels) == 7 * 2
    for table, (sel, length, count) in zip(seen, sels):
        assert sel.pages_per_block == bs // page and table.page_size == page
        fetch = sel.fetch.tolist()
        for row in range(ids.shape[0]):
            first = int(pads[row])
            tokens = {fetch[u] * bs + i for u in range(len(fetch)) for i in range(bs)}
            for head in range(table.slots.shape[1]):
                got = [fetch[int(table.fetch_pos[row, head, m])] * bs + int(table.pages[row, head, m]) * page + i
                       for m in range(table.slots.shape[2]) for i in range(page) if table.valid[row, head, m, i]]
                assert len(got) == len(set(got))  # no token attended twice
                got = set(got)
                want = {t for t in range(length) if t >= first and bool(sel.page_mask[row, head, t // page])}
                assert got == want, (row, head)
                assert all(t >= first for t in got)  # never padding
                forced = set(range(first, first + sink)) | set(range(length - recent, length))
                assert forced <= got
                forced_pages = {t // page for t in forced}
                forced_cost = sum(int(count[row, p]) for p in forced_pages)
                assert len(got) <= max(budget, forced_cost)
            assert {t // bs for t in range(length) if bool(sel.page_mask[row, :, t // page].any()) and t >= first} \
                <= {t // bs for t in tokens}


def test_page_size_must_divide_the_block_and_is_sparse_only(make_model):
    model = make_model("llama")
    with pytest.raises(ValueError, match="divide"):
        TieredKVCache(model.config, mode="sparse", block_size=8, page_size=3, host="1MiB")
    with pytest.raises(ValueError, match="sparse"):
        TieredKVCache(model.config, block_size=8, page_size=2, host="1MiB")
    with TieredKVCache(model.config, mode="sparse", block_size=64, host="1MiB") as cache:
        assert cache.settings.page_size == 8
    with TieredKVCache(model.config, mode="sparse", block_size=4, host="1MiB") as cache:
        assert cache.settings.page_size == 4


@pytest.mark.parametrize("storage", ["float16", "float32"])
def test_digests_option_sets_the_digest_storage(make_model, storage):
    model = make_model("llama")
    ids, mask = left_padded_batch()
    with TieredKVCache.for_model(model, mode="sparse", digests=storage, budget=0.5, block_size=4, host="8KiB",
                                 disk="16MiB") as cache:
        gen(model, cache, ids, mask, n=6)
        dtypes = {layer.sparse.digests.dtype for layer in cache.layers if layer.sparse is not None}
        assert dtypes == {getattr(torch, storage)}
        digests_match_keys(cache)
    with TieredKVCache(model.config, mode="sparse", host="1MiB") as default:
        assert default.settings.digests == "float16"
    with pytest.raises(ValueError, match="digests"):
        TieredKVCache(model.config, mode="sparse", digests="bfloat16", host="1MiB")
    with pytest.raises(ValueError, match="sparse"):
        TieredKVCache(model.config, digests="float32", host="1MiB")


@pytest.mark.parametrize("mode", ["sparse", "exact"])
def test_decoding_continues_outside_inference_mode(make_model, mode):
    """Buffers first allocated under torch.inference_mode (decode buffers, resident pools, attention
    scratch) are written again by steps run outside it (here under no_grad) and give the tokens of a run
    entirely under no_grad; an inference tensor there would raise on its first in-place write."""
    model = make_model("llama", seed=31)
    ids, mask = left_padded_batch(seed=31, lengths=(40, 27))
    options = {"budget": 16, "block_size": 8} if mode == "sparse" else {"block_size": 8}

    def run(first_mode):
        with TieredKVCache.for_model(model, mode=mode, host="1MiB", **options) as cache:
            tokens, attn = ids, mask
            out = []
            for step in range(6):
                ctx = first_mode() if step < 3 else torch.no_grad()
                with ctx:
                    logits = model(input_ids=tokens, attention_mask=attn, **cache_kwargs(cache, model)).logits[:, -1]
                out.append(logits.clone())
                tokens = logits.argmax(-1, keepdim=True)
                attn = torch.cat((attn, torch.ones_like(tokens)), dim=1)
            cache.restore_model()
        return out

    want = run(torch.no_grad)
    got = run(torch.inference_mode)
    for a, b in zip(want, got):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
