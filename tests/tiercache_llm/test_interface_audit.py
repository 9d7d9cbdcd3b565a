"""Audit probes of issue 9's interface rules with cases the other tests do not use: odd contexts, contexts
shorter than sink + recent, rows of very different lengths, padding filler changes, option validation
without side effects, the preparation's reversibility (eager and sdpa), a model serving every strategy in
turn, stats() consistency, beam search and continuation through ``generate``."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from tiercache_llm import TieredKVCache
from tiercache_llm.attention_hook import PREFIX, is_prepared
from tiercache_llm.hf_kwargs import cache_kwargs
from tiercache_llm.sparse_layer import SparseModeError

from .conftest import tiny_config
from .test_generate_tiny import left_padded_batch
from .test_sparse_mode import digests_match_keys
from .test_sparse_pipeline import check_mask

DENSE = 10**9
STRATEGIES = ("attention-aware", "fetch-every-step", "reuse-layer-ahead")


def padded(lengths, vocab=128, seed=0, fill=0):
    return left_padded_batch(vocab=vocab, lengths=lengths, seed=seed, fill=fill)


def gen(model, cache, ids, mask, n=6, **kw):
    kw.setdefault("do_sample", False)
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, pad_token_id=0, eos_token_id=None,
                          return_dict_in_generate=True, output_scores=True, **cache_kwargs(cache, model), **kw)


def assert_same(ref, got, atol=2e-5):
    assert torch.equal(ref.sequences, got.sequences), (ref.sequences, got.sequences)
    assert len(ref.scores) == len(got.scores)
    for a, b in zip(ref.scores, got.scores):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=atol)


def steps(model, cache, ids, mask, n=5):
    """Plain forward calls: the prefill and ``n`` greedy decode steps; the logits of every call."""
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # positions from the mask, as generate computes them
    check_mask(cache, ids, mask)
    out = model(ids, attention_mask=mask, position_ids=pos, **cache_kwargs(cache, model))
    logits = [out.logits[:, -1]]
    for _ in range(n):
        nxt = logits[-1].argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        check_mask(cache, nxt, mask)
        out = model(nxt, attention_mask=mask, position_ids=mask.sum(-1, keepdim=True) - 1,
                    **cache_kwargs(cache, model))
        logits.append(out.logits[:, -1])
    return logits


@pytest.fixture
def model():
    torch.manual_seed(3)
    return AutoModelForCausalLM.from_config(tiny_config("llama")).eval()


# ---------------------------------------------------------------------------------------------- dense budgets
@pytest.mark.parametrize("length", [1, 2, 7, 67, 131, 200])
@pytest.mark.parametrize("budget", [DENSE, 1.0])
def test_dense_budget_odd_contexts_default_blocks(model, length, budget):
    """Default block (128) and page sizes, default sink/recent (4 + 64): contexts of 1 token, shorter than
    sink + recent, just past one block, not a multiple of anything."""
    ids, mask = padded([length], seed=length)
    ref = gen(model, DynamicCache(config=model.config), ids, mask)
    with TieredKVCache.for_model(model, mode="sparse", budget=budget) as cache:
        got = gen(model, cache, ids, mask)
        total = cache.stats()["sparse"]["total"]
        cache.restore_model()
    assert_same(ref, got)
    assert total["steps"] == 5
    assert total["tokens_attended"] == total["tokens_context"]


@pytest.mark.parametrize("block_size,page", [(16, 8), (12, 4), (5, 5)])
def test_budget_exactly_the_context_is_dense_and_one_less_is_not_more(model, block_size, page):
    """A token budget equal to the context at the first decode step gives dense logits there."""
    ids, mask = padded([45])
    ref = steps(model, DynamicCache(config=model.config), ids, mask, n=1)
    with TieredKVCache.for_model(model, mode="sparse", budget=45, sink=0, recent=0, block_size=block_size,
                                 page_size=page) as cache:
        got = steps(model, cache, ids, mask, n=1)
        total = cache.stats()["sparse"]["total"]
        cache.restore_model()
    for a, b in zip(ref, got):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5)
    assert total["tokens_attended"] == total["tokens_context"] == 45 * 2 * 2  # layers x KV heads


@pytest.mark.parametrize("budget", [DENSE, 1.0])
def test_dense_budget_rows_of_very_different_lengths(model, budget):
    ids, mask = padded([3, 190, 64, 1], seed=1)
    ref = gen(model, DynamicCache(config=model.config), ids, mask, n=5)
    with TieredKVCache.for_model(model, mode="sparse", budget=budget, block_size=16) as cache:
        got = gen(model, cache, ids, mask, n=5)
        total = cache.stats()["sparse"]["total"]
        cache.restore_model()
    assert_same(ref, got)
    assert total["tokens_attended"] == total["tokens_context"]


def test_dense_budget_plain_forward_batch(model):
    ids, mask = padded([9, 40, 33], seed=2)
    ref = steps(model, DynamicCache(config=model.config), ids, mask)
    for strategy in STRATEGIES:
        with TieredKVCache.for_model(model, mode="sparse", budget=DENSE, block_size=8, strategy=strategy) as cache:
            got = steps(model, cache, ids, mask)
            cache.restore_model()
        for a, b in zip(ref, got):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5)


def test_seeded_sampling_matches_dynamic_cache(model):
    ids, mask = padded([30, 11], seed=5)
    torch.manual_seed(123)
    ref = gen(model, DynamicCache(config=model.config), ids, mask, n=10, do_sample=True, top_k=0, temperature=1.3)
    for strategy in STRATEGIES:
        with TieredKVCache.for_model(model, mode="sparse", budget=DENSE, block_size=8, strategy=strategy) as cache:
            torch.manual_seed(123)
            got = gen(model, cache, ids, mask, n=10, do_sample=True, top_k=0, temperature=1.3)
            cache.restore_model()
        assert_same(ref, got)


# ---------------------------------------------------------------------------------------------- padding
def test_padding_filler_never_matters_at_a_small_budget(model):
    """Padded positions are never selected nor attended: what token fills them changes nothing, even
    with a budget far below the context (sparse selection runs)."""
    lengths = [70, 9, 41]
    runs = []
    for fill in (0, 77, 5):
        ids, mask = padded(lengths, seed=9, fill=fill)
        with TieredKVCache.for_model(model, mode="sparse", budget=12, sink=2, recent=4, block_size=8,
                                     page_size=4) as cache:
            runs.append(steps(model, cache, ids, mask, n=6))
            total = cache.stats()["sparse"]["total"]
            cache.restore_model()
        assert total["tokens_attended"] < total["tokens_context"]
        # tokens_context counts valid tokens only: (sum of rows' lengths + step) per layer and KV head
        expected = sum(sum(n + s for n in lengths) for s in range(6)) * 2 * 2
        assert total["tokens_context"] == expected
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lengths,aligned", [([120, 16], True), ([120, 17], False), ([5, 64, 33], False)])
def test_each_row_budget_counts_its_own_tokens(model, lengths, aligned):
    """A fractional budget is a fraction of each row's own valid context: a row in a batch with longer ones
    attends as many tokens as it would alone.  Pages sit at storage positions, so where the padding is a
    multiple of the page size the row attends the same pages as alone (same logits); otherwise its page
    boundaries shift and the selection may differ, but not the count."""
    ids, mask = padded(lengths, seed=4)
    opts = dict(mode="sparse", budget=0.3, sink=2, recent=4, block_size=8, page_size=4)
    with TieredKVCache.for_model(model, **opts) as cache:
        batch = steps(model, cache, ids, mask, n=3)
        both = cache.stats()["sparse"]["total"]["tokens_attended"]
        cache.restore_model()
    alone_attended = 0
    for row, n in enumerate(lengths):
        with TieredKVCache.for_model(model, **opts) as cache:
            alone = steps(model, cache, ids[row:row + 1, -n:], mask[row:row + 1, -n:], n=3)
            alone_attended += cache.stats()["sparse"]["total"]["tokens_attended"]
            cache.restore_model()
        if aligned:
            for a, b in zip(batch, alone):
                torch.testing.assert_close(a[row:row + 1], b, rtol=1e-4, atol=1e-4)
    assert both == alone_attended


# ---------------------------------------------------------------------------------------------- options
@pytest.mark.parametrize("budget,exc,words", [
    (0.0, ValueError, "budget"), (-1, ValueError, "budget"), (-0.5, ValueError, "budget"),
    (1.5, ValueError, "budget"), (1.0000001, ValueError, "budget"), (float("nan"), ValueError, "budget"),
    (float("inf"), ValueError, "budget"), (True, TypeError, "budget"), (False, TypeError, "budget"),
    ("0.25", TypeError, "budget"), ("64", TypeError, "budget"), ([64], TypeError, "budget"),
    (complex(0.5, 0), TypeError, "budget"),
])
def test_bad_budgets_raise_naming_budget_and_leave_the_model_alone(model, budget, exc, words):
    with pytest.raises(exc, match=words):
        TieredKVCache.for_model(model, mode="sparse", budget=budget)
    assert not is_prepared(model) and model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("name", ["sink", "recent"])
@pytest.mark.parametrize("value", [-1, True, 1.5, "4", float("nan"), [4]])
def test_bad_sink_recent_raise_naming_the_option(model, name, value):
    with pytest.raises((ValueError, TypeError), match=name):
        TieredKVCache.for_model(model, mode="sparse", **{name: value})
    assert not is_prepared(model)


def test_defaults_documented_values(model):
    cache = TieredKVCache(model.config, mode="sparse")
    s = cache.settings
    assert (s.budget, s.sink, s.recent, s.strategy, s.block_size, s.page_size) == (0.25, 4, 64, "attention-aware", 128, 8)
    assert cache.stats()["sparse"]["settings"]["budget"] == 0.25
    cache.close()
    for ok in (0, 1, 10**20, 1.0, 1e-9):  # int >= 0, float in (0, 1]
        TieredKVCache(model.config, mode="sparse", budget=ok).close()
    TieredKVCache(model.config, mode="sparse", sink=0, recent=0).close()


@pytest.mark.parametrize("opts,exc,words", [
    (dict(mode="sparse", strategy="fetch_every_step"), ValueError, "strategy"),
    (dict(mode="sparse", strategy=""), ValueError, "strategy"),
    (dict(mode="sparse", strategy=1), ValueError, "strategy"),
    (dict(strategy="attention-aware"), ValueError, "strategy"),
    (dict(mode="exact", budget=0.5), ValueError, "budget"),
    (dict(mode="exact", sink=4), ValueError, "sink"),
    (dict(mode="exact", recent=4), ValueError, "recent"),
    (dict(mode="Sparse"), ValueError, "mode"),
    (dict(mode=None), ValueError, "mode"),
    (dict(mode="sparse", budgett=0.5), TypeError, "budgett"),
    (dict(mode="sparse", num_beams=2), TypeError, "num_beams"),
])
def test_bad_options_raise_clearly_without_preparing(model, opts, exc, words):
    with pytest.raises(exc, match=words):
        TieredKVCache.for_model(model, **opts)
    assert not is_prepared(model) and model.config._attn_implementation == "sdpa"
    assert not model.get_decoder()._forward_pre_hooks


def test_for_model_refuses_non_models():
    with pytest.raises(TypeError, match="model"):
        TieredKVCache.for_model(tiny_config("llama"), mode="sparse")
    with pytest.raises(TypeError):
        TieredKVCache.for_model(None)


# ---------------------------------------------------------------------------------------------- preparation
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_preparation_is_undone_completely(impl):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama"), attn_implementation=impl).eval()
    ids, mask = padded([21, 13], seed=3)
    ref = gen(model, DynamicCache(config=model.config), ids, mask)
    decoder = model.get_decoder()
    before = (dict(decoder._forward_pre_hooks), dict(decoder._forward_hooks), dict(model._forward_pre_hooks),
              dict(model._forward_hooks), set(vars(decoder)), set(vars(model)))
    cache = TieredKVCache.for_model(model, mode="sparse", budget=DENSE, block_size=8)
    assert model.config._attn_implementation == PREFIX + impl
    assert_same(ref, gen(model, cache, ids, mask))
    cache.restore_model()
    cache.restore_model()  # idempotent
    after = (dict(decoder._forward_pre_hooks), dict(decoder._forward_hooks), dict(model._forward_pre_hooks),
             dict(model._forward_hooks), set(vars(decoder)), set(vars(model)))
    assert after == before
    assert model.config._attn_implementation == impl
    assert all(getattr(m, "config", model.config)._attn_implementation == impl for m in model.modules()
               if hasattr(m, "config"))
    assert_same(ref, gen(model, DynamicCache(config=model.config), ids, mask))
    # the restored cache cannot decode sparsely with it any more, and says so at the first decode step
    cache.reset()
    with pytest.raises(SparseModeError, match="prepared"):
        gen(model, cache, ids, mask)
    cache.close()
    # and it can be prepared again
    with TieredKVCache.for_model(model, mode="sparse", budget=DENSE, block_size=8) as again:
        assert_same(ref, gen(model, again, ids, mask))
        again.restore_model()


def test_second_cache_after_first_restored_raises_not_dense(model):
    ids, mask = padded([30])
    a = TieredKVCache.for_model(model, mode="sparse", budget=8, block_size=8)
    b = TieredKVCache.for_model(model, mode="sparse", budget=8, block_size=8)
    gen(model, b, ids, mask, n=2)
    a.restore_model()
    assert not is_prepared(model)
    with pytest.raises(SparseModeError):
        gen(model, b, ids, mask, n=2)  # continuation: the first decode step needs the preparation
    fresh = TieredKVCache(model.config, mode="sparse", budget=8, block_size=8)  # never prepared anything
    with pytest.raises(SparseModeError):
        steps(model, fresh, ids, mask, n=1)
    for c in (a, b, fresh):
        c.close()


def test_sparse_cache_on_a_different_unprepared_model_raises(model):
    torch.manual_seed(1)
    other = AutoModelForCausalLM.from_config(tiny_config("llama")).eval()
    ids, mask = padded([20])
    cache = TieredKVCache.for_model(model, mode="sparse", budget=8, block_size=8)
    with pytest.raises(SparseModeError):
        gen(other, cache, ids, mask, n=2)
    cache.restore_model()
    cache.close()
    assert other.config._attn_implementation == "sdpa"


def test_one_model_every_strategy_and_dense_in_between(model):
    ids, mask = padded([26, 50, 7], seed=8)
    ref = gen(model, DynamicCache(config=model.config), ids, mask, n=8)
    caches = []
    for strategy in STRATEGIES + STRATEGIES[::-1]:
        cache = TieredKVCache.for_model(model, mode="sparse", budget=1.0, block_size=8, strategy=strategy,
                                        host="64KiB", disk="8MiB")
        caches.append(cache)
        assert_same(ref, gen(model, cache, ids, mask, n=8))
        assert_same(ref, gen(model, DynamicCache(config=model.config), ids, mask, n=8))
        with TieredKVCache.for_model(model, block_size=8) as exact:
            assert_same(ref, gen(model, exact, ids, mask, n=8))
    for cache in caches:
        cache.restore_model()
        cache.close()
    assert not is_prepared(model)


# ---------------------------------------------------------------------------------------------- stats
def test_stats_fields_are_consistent(model):
    ids, mask = padded([90, 40], seed=11)
    with TieredKVCache.for_model(model, mode="sparse", budget=24, sink=4, recent=8, block_size=16,
                                 host="32KiB", disk="8MiB") as cache:
        assert cache.stats()["sparse"]["last_step"] is None
        gen(model, cache, ids, mask, n=7)
        stats = cache.stats()
        cache.restore_model()
    json.dumps(stats)
    sp = stats["sparse"]
    total, last = sp["total"], sp["last_step"]
    assert total["steps"] == 6 and last["steps"] == 1
    assert total["layer_steps"] == 6 * 2 and last["layer_steps"] == 2
    for rec in (total, last):
        assert 0 <= rec["blocks_resident"] <= rec["blocks_selected"]
        assert rec["reuse_rate"] is not None and 0.0 <= rec["reuse_rate"] <= 1.0
        assert math.isclose(rec["reuse_rate"], rec["blocks_resident"] / rec["blocks_selected"])
        assert 0 < rec["tokens_attended"] <= rec["tokens_context"]
        for tier, n in rec["bytes_fetched"].items():
            assert isinstance(tier, str) and n >= 0
        for key in ("scoring_seconds", "fetch_seconds", "attention_seconds", "placement_seconds"):
            assert rec[key] >= 0.0 and math.isfinite(rec[key])
    for key in ("blocks_selected", "blocks_resident", "tokens_attended", "tokens_context", "tail_selected"):
        assert last[key] <= total[key]
    for key in ("scoring_seconds", "fetch_seconds", "attention_seconds"):
        assert last[key] <= total[key] + 1e-12
    assert sum(last["bytes_fetched"].values()) <= sum(total["bytes_fetched"].values())
    assert stats["kv"]["digest_bytes"] > 0 and stats["kv"]["beside_tiers_bytes"] >= stats["kv"]["digest_bytes"]


def test_stats_of_an_exact_cache_have_no_sparse_section(model):
    with TieredKVCache.for_model(model) as cache:
        gen(model, cache, *padded([10]), n=2)
        assert "sparse" not in cache.stats()


# ---------------------------------------------------------------------------------------------- beams, crop, continuation
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_beam_search_dense_budget_equals_dynamic_cache(model, strategy):
    ids, mask = padded([33, 12], seed=12)
    kw = dict(num_beams=3, num_return_sequences=2)
    ref = gen(model, DynamicCache(config=model.config), ids, mask, n=6, **kw)
    with TieredKVCache.for_model(model, mode="sparse", budget=DENSE, block_size=8, strategy=strategy,
                                 host="64KiB", disk="8MiB") as cache:
        got = gen(model, cache, ids, mask, n=6, **kw)
        digests_match_keys(cache)
        cache.restore_model()
    assert torch.equal(ref.sequences, got.sequences)
    torch.testing.assert_close(ref.sequences_scores, got.sequences_scores, rtol=1e-5, atol=1e-5)


def test_beam_search_small_budget_keeps_digests_consistent(model):
    ids, mask = padded([60, 25], seed=13)
    with TieredKVCache.for_model(model, mode="sparse", budget=16, sink=2, recent=4, block_size=8) as cache:
        out = gen(model, cache, ids, mask, n=6, num_beams=3)
        digests_match_keys(cache)
        cache.restore_model()
    assert out.sequences.shape == (2, 66)


def test_crop_and_batch_selection_then_decode_equal_dynamic_cache(model):
    ids, mask = padded([37, 22, 51], seed=14)
    results = []
    for make in (lambda: DynamicCache(config=model.config),
                 lambda: TieredKVCache.for_model(model, mode="sparse", budget=DENSE, block_size=8, host="16KiB",
                                                 disk="8MiB")):
        cache = make()
        logits = steps(model, cache, ids, mask, n=4)
        cache.crop(-3)  # held: the prompt and 4 decoded tokens; left: the prompt and 1
        one = torch.ones_like(mask[:, :1])
        m = torch.cat([mask, one, one], 1)
        logits.append(model(logits[1].argmax(-1, keepdim=True), attention_mask=m,
                            **cache_kwargs(cache, model)).logits[:, -1])
        rows = torch.tensor([2, 0])
        cache.batch_select_indices(rows)
        m = torch.cat([m, one], 1)[rows]
        logits.append(model(logits[-1][rows].argmax(-1, keepdim=True), attention_mask=m,
                            **cache_kwargs(cache, model)).logits[:, -1])
        if isinstance(cache, TieredKVCache):
            digests_match_keys(cache)
            cache.restore_model()
            cache.close()
        results.append(logits)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_generate_twice_continues_like_dynamic_cache(model, strategy):
    ids, mask = padded([19, 44], seed=15)
    ref_cache = DynamicCache(config=model.config)
    ref1 = gen(model, ref_cache, ids, mask, n=5)
    ref2 = gen(model, ref_cache, ref1.sequences, torch.cat([mask, torch.ones(2, 5, dtype=mask.dtype)], 1), n=5)
    with TieredKVCache.for_model(model, mode="sparse", budget=DENSE, block_size=8, strategy=strategy) as cache:
        got1 = gen(model, cache, ids, mask, n=5)
        got2 = gen(model, cache, got1.sequences, torch.cat([mask, torch.ones(2, 5, dtype=mask.dtype)], 1), n=5)
        cache.restore_model()
    assert_same(ref1, got1)
    assert_same(ref2, got2)
