"""The real model: SmolLM2-135M-Instruct (30 layers, 9 query / 3 KV heads) through the tiered cache."""

import pytest
import torch
from transformers import DynamicCache

from tiercache_llm import KVCapacityError, TieredKVCache
from tiercache_llm.prompts import passkey_prompt

# SmolLM2 K or V block of 64 tokens, fp32: 3 heads x 64 x 64 x 4 B = 48 KiB (a 64 KiB host slot).
SPILL = dict(block_size=64, host="8MiB", disk="1GiB")


def chat(tokenizer, text):
    enc = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    return enc["input_ids"], enc["attention_mask"]


def run(model, ids, mask, cache, max_new_tokens):
    with torch.inference_mode():
        return model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, do_sample=False,
                              max_new_tokens=max_new_tokens, return_dict_in_generate=True, output_logits=True,
                              pad_token_id=0)


@pytest.mark.parametrize(
    "prompt",
    ["What is the capital of France?", "Write a haiku about the sea.", "long"],
)
def test_greedy_identical_to_dynamic_cache(smollm2, tmp_path, prompt):
    model, tokenizer = smollm2
    if prompt == "long":
        p = passkey_prompt(tokenizer, 2000, seed=3)
        ids, mask, new = p.input_ids, p.attention_mask, 8
    else:
        ids, mask = chat(tokenizer, prompt)
        new = 24
    ref = run(model, ids, mask, DynamicCache(config=model.config), new)
    with TieredKVCache(model.config, path=tmp_path / "kv", **SPILL) as cache:
        got = run(model, ids, mask, cache, new)
        stats = cache.stats()
    assert torch.equal(ref.sequences, got.sequences)
    for a, b in zip(ref.logits, got.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    if prompt == "long":  # ~2K tokens x 30 layers of KV = ~90 MiB: most blocks live on disk
        disk = stats["tiercache"]["tiers"]["disk"]
        assert disk["entries"] > stats["tiercache"]["tiers"]["host"]["entries"] and disk["hits"] > 0
        assert stats["tiercache"]["evictions"] == 0
    if prompt.startswith("What"):
        assert "Paris" in tokenizer.decode(got.sequences[0, ids.shape[1]:])


def test_passkey_retrieval_through_disk_tier(smollm2, tmp_path):
    model, tokenizer = smollm2
    p = passkey_prompt(tokenizer, 1000, seed=11)
    with TieredKVCache(model.config, path=tmp_path / "kv", block_size=32, host="4MiB", disk="256MiB") as cache:
        out = run(model, p.input_ids, p.attention_mask, cache, 12)
        assert cache.stats()["tiercache"]["tiers"]["disk"]["hits"] > 0
    answer = tokenizer.decode(out.sequences[0, p.n_tokens:], skip_special_tokens=True)
    assert p.passkey in answer


def test_tiers_too_small_for_the_context_raise(smollm2, tmp_path):
    model, tokenizer = smollm2
    p = passkey_prompt(tokenizer, 600, seed=1)
    # ~600 tokens x 30 layers x 2 x 3 x 64 x 4 B = ~27 MiB of KV (more in slots) > 4 + 8 MiB
    cache = TieredKVCache(model.config, path=tmp_path / "kv", block_size=64, host="4MiB", disk="8MiB")
    with pytest.raises(KVCapacityError, match=r"host=4\.0 MiB, disk=8\.0 MiB"):
        run(model, p.input_ids, p.attention_mask, cache, 4)
    assert cache.store.cache.stats()["evictions"] == 0  # refused before the tiercache dropped anything
    cache.close()
