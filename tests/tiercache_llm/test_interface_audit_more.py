"""More audit probes of issue 9's interface: multi-token steps after the prefill, a row with no prompt token,
deepcopy mid-decode, two threads decoding two sparse caches through one prepared model, the base model
prepared instead of the causal LM, reuse after reset with another batch size, output_attentions."""

import copy
import threading

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from tiercache_llm import TieredKVCache
from tiercache_llm.attention_hook import is_prepared
from tiercache_llm.hf_kwargs import cache_kwargs
from tiercache_llm.sparse_layer import SparseModeError

from .conftest import tiny_config
from .test_interface_audit import DENSE, assert_same, gen, padded, steps
from .test_sparse_mode import digests_match_keys

pytestmark = pytest.mark.filterwarnings("ignore:sparse decode. one layer:RuntimeWarning")
SMALL = dict(mode="sparse", budget=12, sink=2, recent=4, block_size=8, page_size=4)


@pytest.fixture
def model():
    torch.manual_seed(7)
    return AutoModelForCausalLM.from_config(tiny_config("llama")).eval()


def forward(model, cache, tok, mask):
    return model(tok, attention_mask=mask, position_ids=mask.sum(-1, keepdim=True) - 1 - torch.arange(
        tok.shape[1] - 1, -1, -1), **cache_kwargs(cache, model)).logits


def continue_steps(model, cache, tok, mask, n):
    out = []
    for _ in range(n):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        logits = forward(model, cache, tok, mask)[:, -1]
        out.append(logits)
        tok = logits.argmax(-1, keepdim=True)
    return out


@pytest.mark.parametrize("budget", [DENSE, 12])
def test_multi_token_chunks_after_prefill_then_decode(model, budget):
    """A chunk of several tokens after the prefill runs exact; decoding after it is sparse and consistent."""
    ids, mask = padded([30, 18], seed=1)
    chunk = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(2))
    results = []
    for cache in (DynamicCache(config=model.config),
                  TieredKVCache.for_model(model, **dict(SMALL, budget=budget), host="16KiB", disk="8MiB")):
        steps(model, cache, ids, mask, n=0)
        m = torch.cat([mask, torch.ones_like(chunk)], 1)
        first = forward(model, cache, chunk, m)
        out = [first] + continue_steps(model, cache, first[:, -1:].argmax(-1), m, 4)
        if isinstance(cache, TieredKVCache):
            digests_match_keys(cache)
            total = cache.stats()["sparse"]["total"]
            assert total["steps"] == 4
            if budget != DENSE:
                assert total["tokens_attended"] < total["tokens_context"]
            cache.restore_model()
            cache.close()
        results.append(out)
    if budget == DENSE:
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5)
    else:  # the chunk itself is exact
        torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("budget", [DENSE, 0.5])
def test_a_row_without_prompt_tokens(model, budget):
    ids, mask = padded([12, 0, 5], seed=2)
    ref = steps(model, DynamicCache(config=model.config), ids, mask, n=3)
    with TieredKVCache.for_model(model, **dict(SMALL, budget=budget)) as cache:
        got = steps(model, cache, ids, mask, n=3)
        cache.restore_model()
    for a, b in zip(ref, got):
        assert torch.isfinite(b).all()
        if budget == DENSE:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5)
        else:  # the empty row: context = its own decoded tokens only (1, 2, 3 <= sink + recent): all attended
            torch.testing.assert_close(a[1], b[1], rtol=1e-5, atol=2e-5)


def test_deepcopy_mid_decode_continues_identically_and_independently(model):
    ids, mask = padded([40, 22], seed=3)
    cache = TieredKVCache.for_model(model, **SMALL, host="16KiB", disk="8MiB")
    logits = steps(model, cache, ids, mask, n=3)
    twin = copy.deepcopy(cache)
    m = torch.cat([mask, torch.ones(2, 3, dtype=mask.dtype)], 1)
    tok = logits[-1].argmax(-1, keepdim=True)
    a = continue_steps(model, cache, tok, m, 4)
    digests_match_keys(cache)
    b = continue_steps(model, twin, tok, m, 4)  # after the original moved on: the copy is independent
    digests_match_keys(twin)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert twin.get_seq_length() == cache.get_seq_length() == 40 + 3 + 4
    cache.restore_model()
    with pytest.raises(SparseModeError):  # the copy relied on the same preparation
        continue_steps(model, twin, tok, torch.cat([m, torch.ones(2, 4, dtype=m.dtype)], 1), 1)
    cache.close()
    twin.close()


def test_two_threads_two_sparse_caches_one_model(model):
    prompts = [padded([33, 20], seed=4), padded([17, 41], seed=5)]
    opts = [SMALL, dict(SMALL, budget=0.4, strategy="reuse-layer-ahead")]
    alone = []
    for (ids, mask), o in zip(prompts, opts):
        with TieredKVCache.for_model(model, **o) as cache:
            alone.append(steps(model, cache, ids, mask, n=6))
    caches = [TieredKVCache.for_model(model, **o) for o in opts]
    results, errors = [None, None], []
    barrier = threading.Barrier(2)

    def work(i):
        try:
            barrier.wait()
            results[i] = steps(model, caches[i], *prompts[i], n=6)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for ref, got in zip(alone, results):
        for a, b in zip(ref, got):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for cache in caches:
        cache.restore_model()
        cache.close()
    assert not is_prepared(model)


def test_base_model_prepared_serves_the_causal_lm(model):
    ids, mask = padded([25, 9], seed=6)
    ref = gen(model, DynamicCache(config=model.config), ids, mask)
    cache = TieredKVCache.for_model(model.get_decoder(), mode="sparse", budget=DENSE, block_size=8)
    other = TieredKVCache.for_model(model, mode="sparse", budget=DENSE, block_size=8)  # uses that preparation
    assert_same(ref, gen(model, cache, ids, mask))
    assert_same(ref, gen(model, other, ids, mask))
    other.restore_model()  # not the one prepared: a no-op for the preparation
    cache.reset()
    assert_same(ref, gen(model, cache, ids, mask))
    cache.restore_model()
    assert model.config._attn_implementation == "sdpa" and not model.get_decoder()._forward_pre_hooks
    cache.reset()
    with pytest.raises(SparseModeError):
        gen(model, cache, ids, mask)
    cache.close()
    other.close()


def test_reset_then_another_batch_size(model):
    with TieredKVCache.for_model(model, **SMALL) as cache:
        for lengths, seed in (([30, 12], 7), ([20], 8), ([5, 44, 19], 9)):
            ids, mask = padded(lengths, seed=seed)
            cache.reset()
            got = steps(model, cache, ids, mask, n=3)
            with TieredKVCache.for_model(model, **SMALL) as fresh:
                ref = steps(model, fresh, ids, mask, n=3)
            for a, b in zip(ref, got):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
            digests_match_keys(cache)
        cache.restore_model()


def test_output_attentions_sdpa_decodes_and_eager_refuses():
    torch.manual_seed(0)
    ids, mask = padded([20, 14], seed=10)
    sdpa = AutoModelForCausalLM.from_config(tiny_config("llama")).eval()
    ref = gen(sdpa, DynamicCache(config=sdpa.config), ids, mask)
    with TieredKVCache.for_model(sdpa, mode="sparse", budget=DENSE, block_size=8) as cache:
        assert_same(ref, gen(sdpa, cache, ids, mask, output_attentions=True))
        cache.restore_model()
    torch.manual_seed(0)
    eager = AutoModelForCausalLM.from_config(tiny_config("llama"), attn_implementation="eager").eval()
    with TieredKVCache.for_model(eager, mode="sparse", budget=DENSE, block_size=8) as cache:
        with pytest.raises(SparseModeError, match="output_attentions"):
            gen(eager, cache, ids, mask, output_attentions=True)
        cache.restore_model()


@pytest.mark.parametrize("strategy", ["attention-aware", "fetch-every-step", "reuse-layer-ahead"])
@pytest.mark.parametrize("op", ["reorder", "repeat", "select", "select-mask"])
def test_row_operations_mid_decode_equal_a_cache_built_with_those_rows(model, strategy, op):
    """After some sparse decode steps, reorder / repeat / select rows: the following steps equal those of a
    cache that decoded the resulting rows from the start (same digests, same selection)."""
    ids, mask = padded([37, 20, 29], seed=11)
    rows = {"reorder": [2, 0, 1], "repeat": [0, 0, 1, 1, 2, 2], "select": [2, 0],
            "select-mask": [0, 2]}[op]
    opts = dict(SMALL, strategy=strategy, host="24KiB", disk="8MiB")
    idx = torch.tensor(rows)
    cache = TieredKVCache.for_model(model, **opts)
    logits = steps(model, cache, ids, mask, n=3)
    if op == "reorder":
        cache.reorder_cache(idx)
    elif op == "repeat":
        cache.batch_repeat_interleave(2)
    elif op == "select":
        cache.batch_select_indices(idx)
    else:
        cache.batch_select_indices(torch.tensor([True, False, True]))
    digests_match_keys(cache)
    m = torch.cat([mask, torch.ones(3, 3, dtype=mask.dtype)], 1)[idx]
    tok = logits[-1].argmax(-1, keepdim=True)[idx]
    got = continue_steps(model, cache, tok, m, 4)
    digests_match_keys(cache)
    with TieredKVCache.for_model(model, **opts) as fresh:
        ref = steps(model, fresh, ids[idx], mask[idx], n=3)
        assert torch.equal(ref[-1].argmax(-1, keepdim=True), tok)
        want = continue_steps(model, fresh, tok, m, 4)
    for a, b in zip(want, got):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    cache.restore_model()
    cache.close()


def test_a_custom_mask_hiding_context_tokens_raises_never_ignored(model):
    """Sparse decode attends by the validity recorded as tokens were added: a 4-D mask at a decode step that
    hides other context tokens (dense attention would follow it) raises instead of being silently ignored.
    A 4-D mask hiding exactly the padding, and the mask transformers builds from a 2-D one, pass."""
    ids, mask = padded([20, 14], seed=12)
    with TieredKVCache.for_model(model, mode="sparse", budget=DENSE, block_size=8) as cache:
        steps(model, cache, ids, mask, n=1)  # 2-D masks: fine
        m4 = torch.zeros(2, 1, 1, 23)
        m4[:, :, :, 3:7] = float("-inf")
        m4[1, :, :, :6] = float("-inf")  # row 1's padding too
        with pytest.raises(SparseModeError, match="mask"):
            model(torch.tensor([[5], [6]]), attention_mask=m4, **cache_kwargs(cache, model))
        cache.reset()
        # an equivalent 4-D mask (hiding exactly the padding) decodes like the 2-D one
        ref = steps(model, cache, ids, mask, n=1)
        cache.reset()
        steps(model, cache, ids, mask, n=0)
        full = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
        m4 = torch.where(full.bool(), 0.0, float("-inf"))[:, None, None, :]
        got = model(ref[0].argmax(-1, keepdim=True), attention_mask=m4, position_ids=full.sum(-1, keepdim=True) - 1,
                    **cache_kwargs(cache, model)).logits[:, -1]
        torch.testing.assert_close(got, ref[1], rtol=1e-5, atol=1e-5)
        cache.restore_model()
    # without padding, no mask is all valid
    ids, mask = padded([16, 16], seed=13)
    with TieredKVCache.for_model(model, mode="sparse", budget=DENSE, block_size=8) as cache:
        model(ids, **cache_kwargs(cache, model))
        dense = DynamicCache(config=model.config)
        model(ids, **cache_kwargs(dense, model))
        a = model(torch.tensor([[5], [6]]), **cache_kwargs(cache, model)).logits
        b = model(torch.tensor([[5], [6]]), **cache_kwargs(dense, model)).logits
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        cache.restore_model()
