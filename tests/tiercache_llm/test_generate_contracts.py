"""Contracts of TieredKVCache under transformers generate() that a demanding user relies on (audit of 2026-12-07).

Tiny random models only (see conftest.py); every mode and sparse strategy."""

import threading

import pytest
import torch
from transformers import DynamicCache

from tiercache_llm import TieredKVCache

from .test_generate_tiny import left_padded_batch

MODES = [
    {},
    dict(mode="sparse", strategy="attention-aware", budget=0.3, sink=2, recent=4),
    dict(mode="sparse", strategy="reuse-layer-ahead", budget=0.3, sink=2, recent=4),
    dict(mode="sparse", strategy="fetch-every-step", budget=0.3, sink=2, recent=4),
]
IDS = ["exact", "attention-aware", "reuse-layer-ahead", "fetch-every-step"]


def _gen(model, cache, ids, mask, n, **kw):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, pad_token_id=0, do_sample=False,
                          past_key_values=cache, **kw)


@pytest.mark.parametrize("options", MODES, ids=IDS)
def test_second_generate_continues_like_dynamic_cache(make_model, options):
    """A cache holding tokens passed to a second generate continues from them, as DynamicCache does
    (input_ids then start with the tokens it holds); a new prompt of another batch size is refused."""
    model = make_model("llama", seed=5)
    ids, mask = left_padded_batch(lengths=(37, 20, 9), seed=5)
    longer = torch.cat([mask, torch.ones(3, 10, dtype=mask.dtype)], 1)
    dense = DynamicCache(config=model.config)
    first = _gen(model, dense, ids, mask, 10)
    ref = _gen(model, dense, first, longer, 10)
    if options:  # the continuation must equal dense attention: give a budget above the context
        options = dict(options, budget=10**6)
    with TieredKVCache.for_model(model, block_size=8, host="16KiB", disk="16MiB", **options) as cache:
        got_first = _gen(model, cache, ids, mask, 10)
        got = _gen(model, cache, got_first, longer, 10)
        assert cache.get_seq_length() == dense.get_seq_length()
        with pytest.raises(ValueError, match="batch size"):
            _gen(model, cache, ids[:1], mask[:1], 2)
        cache.restore_model()
    assert torch.equal(first, got_first)
    assert torch.equal(ref, got)


@pytest.mark.parametrize("options", [dict(prefetch=False)] + MODES[1:], ids=["exact-no-prefetch"] + IDS[1:])
def test_close_from_another_thread_mid_generation_raises_closed(make_model, options):
    """A server cancelling a request closes the cache from another thread while generate runs: the
    generate must stop with RuntimeError('... has been closed'), never another error, wrong tokens or a
    hang, and the cache's threads must end."""
    model = make_model("llama", seed=5)
    ids, mask = left_padded_batch(lengths=(60, 33, 9), seed=5)
    cache = TieredKVCache.for_model(model, block_size=8, host="16KiB", disk="16MiB", **options)
    tiers = cache.store.cache
    inside, calls = threading.Event(), [0]
    original = tiers.get_many

    def slow_get_many(*args, **kwargs):  # a decode step's read: let close() start meanwhile
        calls[0] += 1
        if calls[0] == 6:
            inside.set()
            threading.Event().wait(0.2)
        return original(*args, **kwargs)

    tiers.get_many = slow_get_many
    before = {t.ident for t in threading.enumerate()}
    outcome = {}

    def run():
        try:
            outcome["tokens"] = _gen(model, cache, ids, mask, 40)
        except BaseException as exc:  # noqa: BLE001 - recorded for the assertion below
            outcome["error"] = exc

    worker = threading.Thread(target=run)
    worker.start()
    assert inside.wait(30)
    cache.close()
    worker.join(60)
    assert not worker.is_alive(), "generate hung after close()"
    if options:
        cache.restore_model()
    error = outcome.get("error")
    assert isinstance(error, RuntimeError) and "has been closed" in str(error), repr(error)
    threading.Event().wait(0.2)
    leaked = [t.name for t in threading.enumerate() if t.ident not in before and t.is_alive()]
    assert not leaked, leaked


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("strategy", ["attention-aware", "reuse-layer-ahead", "fetch-every-step"])
def test_half_precision_dense_budget_logits_within_dtype_rounding(make_model, dtype, strategy):
    """In bfloat16 / float16 a dense budget gives DynamicCache's logits within the dtype's rounding (sparse
    decode attends in float32, the model's own attention in its dtype), teacher-forced along DynamicCache's
    greedy tokens; exact mode gives them bit for bit.  Greedy tokens can differ where two logits tie within
    one rounding step (bfloat16 on this tiny model: step 2), so this pins logits, not tokens."""
    model = make_model("llama", seed=5).to(dtype)
    ids, mask = left_padded_batch(lengths=(40, 23, 9), seed=5)
    ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, pad_token_id=0, do_sample=False,
                         past_key_values=DynamicCache(config=model.config))
    full = torch.cat([mask, torch.ones(3, 12, dtype=mask.dtype)], 1)

    def teacher_forced(cache):
        out, width = [], ids.shape[1]
        with torch.no_grad():
            for end in range(width, ref.shape[1]):
                m = full[:, :end]
                start = 0 if end == width else end - 1
                pos = (m.cumsum(-1) - 1).clamp(min=0)[:, start:end]
                logits = model(input_ids=ref[:, start:end], attention_mask=m, position_ids=pos,
                               past_key_values=cache).logits[:, -1]
                out.append(logits.float())
        return torch.stack(out, 1)

    dense = teacher_forced(DynamicCache(config=model.config))
    with TieredKVCache.for_model(model, block_size=8) as cache:
        assert torch.equal(teacher_forced(cache), dense)
    with TieredKVCache.for_model(model, mode="sparse", strategy=strategy, budget=10**6, block_size=8) as cache:
        got = teacher_forced(cache)
        assert cache.stats()["sparse"]["total"]["steps"] == 11  # decode steps ran sparse
        cache.restore_model()
    scale = dense.abs().amax(-1, keepdim=True).clamp(min=1)
    eps = torch.finfo(dtype).eps
    assert ((got - dense).abs() / scale).max() <= 8 * eps
