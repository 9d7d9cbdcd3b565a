"""Sparse mode on the real model: SmolLM2-135M-Instruct (30 layers, 9 query / 3 KV heads)."""

import pytest
import torch
from transformers import DynamicCache

from tiercache_llm import TieredKVCache
from tiercache_llm.attention_hook import is_prepared
from tiercache_llm.prompts import passkey_prompt


def run(model, p, cache, new=8):
    with torch.inference_mode():
        return model.generate(input_ids=p.input_ids, attention_mask=p.attention_mask, past_key_values=cache,
                              do_sample=False, max_new_tokens=new, return_dict_in_generate=True, output_logits=True,
                              pad_token_id=0)


@pytest.mark.parametrize("depth", [0.2, 0.7])
def test_passkey_at_quarter_budget_and_dense_budget(smollm2, depth):
    model, tokenizer = smollm2
    p = passkey_prompt(tokenizer, 1500, depth=depth, seed=21)
    ref = run(model, p, DynamicCache(config=model.config))
    answer = tokenizer.decode(ref.sequences[0, p.input_ids.shape[1]:])
    try:
        with TieredKVCache.for_model(model, mode="sparse", budget=1_000_000, block_size=32, host="256MiB") as cache:
            dense = run(model, p, cache)
        with TieredKVCache.for_model(model, mode="sparse", budget=0.25, block_size=32, host="8MiB", disk="1GiB") as cache:
            sparse = run(model, p, cache)
            stats = cache.stats()["sparse"]["total"]
            cache.restore_model()
    finally:
        from tiercache_llm.attention_hook import restore_model

        restore_model(model)
    assert not is_prepared(model)
    assert torch.equal(ref.sequences, dense.sequences)
    for a, b in zip(ref.logits, dense.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    if p.passkey in answer:  # sparse at 25% succeeds wherever full attention does
        assert p.passkey in tokenizer.decode(sparse.sequences[0, p.input_ids.shape[1]:])
    ratio = stats["tokens_attended"] / stats["tokens_context"]
    assert ratio < 0.5  # really sparse (budget 25% plus forced sink/recent blocks)
