"""generate() with tiny random GQA models: TieredKVCache vs DynamicCache, token for token."""

import pytest
import torch
from transformers import DynamicCache

from tiercache_llm import TieredKVCache


def left_padded_batch(vocab=128, lengths=(20, 15, 9), seed=0, fill=0):
    """Left-padded random ids and their attention mask; ``fill``: the id at padded positions."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), fill, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(3, vocab, (n,), generator=gen)
        mask[row, width - n :] = 1
    return ids, mask


def generate_both(model, tmp_path, ids, mask, block_size=4, **kwargs):
    common = dict(input_ids=ids, attention_mask=mask, max_new_tokens=24, pad_token_id=0, do_sample=False,
                  return_dict_in_generate=True, output_scores=True, **kwargs)
    ref = model.generate(past_key_values=DynamicCache(config=model.config), **common)
    cache = TieredKVCache(model.config, block_size=block_size, host="8KiB", disk="16MiB", path=tmp_path / "kv")
    got = model.generate(past_key_values=cache, **common)
    stats = cache.stats()
    cache.close()
    return ref, got, stats


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_greedy_batch3_left_padding(make_model, tmp_path, kind):
    model = make_model(kind)
    ids, mask = left_padded_batch()
    ref, got, stats = generate_both(model, tmp_path, ids, mask)
    assert torch.equal(ref.sequences, got.sequences)
    for a, b in zip(ref.scores, got.scores):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    tiers = stats["tiercache"]["tiers"]
    assert tiers["disk"]["entries"] > 0 and tiers["disk"]["hits"] > 0  # blocks really streamed from disk
    assert stats["tiercache"]["evictions"] == 0


def test_beam_search_batch3_left_padding(make_model, tmp_path):
    model = make_model("llama", seed=1)
    ids, mask = left_padded_batch(seed=1)
    ref, got, _ = generate_both(model, tmp_path, ids, mask, num_beams=2, num_return_sequences=2)
    assert torch.equal(ref.sequences, got.sequences)
    torch.testing.assert_close(ref.sequences_scores, got.sequences_scores)


def test_sampling_with_several_return_sequences(make_model, tmp_path):
    model = make_model("llama", seed=2)
    ids, mask = left_padded_batch(seed=2)
    torch.manual_seed(5)
    ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=True,
                         num_return_sequences=2, pad_token_id=0, past_key_values=DynamicCache(config=model.config))
    torch.manual_seed(5)
    cache = TieredKVCache(model.config, block_size=3, host="1MiB")
    got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=True,
                         num_return_sequences=2, pad_token_id=0, past_key_values=cache)
    assert torch.equal(ref, got)
    cache.close()


def test_prompt_lookup_decoding_crops_the_cache(make_model, tmp_path, monkeypatch):
    """Candidate verification rolls the cache back with crop(-n) when candidates are rejected."""
    crops = []
    original = TieredKVCache.crop
    monkeypatch.setattr(TieredKVCache, "crop", lambda self, n: (crops.append(n), original(self, n))[1])
    model = make_model("llama", seed=3)
    gen = torch.Generator().manual_seed(3)
    pattern = torch.randint(3, 128, (6,), generator=gen)
    ids = pattern.repeat(4).unsqueeze(0)  # repetitive prompt: prompt lookup proposes candidates
    common = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=30, do_sample=False,
                  pad_token_id=0)
    ref = model.generate(past_key_values=DynamicCache(config=model.config), **common)
    cache = TieredKVCache(model.config, block_size=4, host="8KiB", disk="16MiB", path=tmp_path / "kv")
    got = model.generate(past_key_values=cache, prompt_lookup_num_tokens=3, **common)
    assert torch.equal(ref, got)
    assert cache.stats()["kv"]["tokens"] == ref.shape[1] - 1
    assert any(n < 0 for n in crops)  # candidates were rejected and rolled back
    cache.close()


def test_sliding_window_model_matches_dynamic_cache(make_model, tmp_path):
    model = make_model("mistral", seed=4, sliding_window=12)
    ids, mask = left_padded_batch(seed=4, lengths=(20, 20, 20))
    ref, got, stats = generate_both(model, tmp_path, ids, mask, block_size=4)
    assert torch.equal(ref.sequences, got.sequences)
    # only the window's blocks stay stored: at most ceil(12 / 4) + 1 blocks per layer
    assert stats["kv"]["blocks"] <= model.config.num_hidden_layers * 4


def test_cache_can_be_reused_after_reset(make_model, tmp_path):
    model = make_model("llama")
    ids, mask = left_padded_batch()
    cache = TieredKVCache(model.config, block_size=4, host="1MiB")
    first = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                           pad_token_id=0, past_key_values=cache)
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.stats()["kv"]["live_entries"] == 0
    second = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                            pad_token_id=0, past_key_values=cache)
    assert torch.equal(first, second)
    cache.close()


def test_prompt_lookup_past_a_sliding_window(make_model, monkeypatch):
    """Issue 7 item 17: speculative decoding rolls sliding-window layers back past their window."""
    crops = []
    original = TieredKVCache.crop
    monkeypatch.setattr(TieredKVCache, "crop", lambda self, n: (crops.append(n), original(self, n))[1])
    model = make_model("mistral", seed=0, sliding_window=4)
    ids = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5]])
    common = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False,
                  pad_token_id=0)
    ref = model.generate(past_key_values=DynamicCache(config=model.config), prompt_lookup_num_tokens=2, **common)
    assert torch.equal(ref, model.generate(**common))
    cache = TieredKVCache(model.config, block_size=2)
    got = model.generate(prompt_lookup_num_tokens=2, past_key_values=cache, **common)
    assert torch.equal(ref, got)
    assert any(n < 0 for n in crops)  # candidates were rejected and rolled back past the window
    assert all(len(layer._blocks) <= 4 // 2 + 2 for layer in cache.layers)  # expired blocks freed at each crop
    cache.close()


def test_assisted_decoding_with_sliding_window_models(make_model):
    model = make_model("mistral", seed=1, sliding_window=5)
    assistant = make_model("mistral", seed=2, sliding_window=5)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (1, 11), generator=gen)
    common = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                  pad_token_id=0, assistant_model=assistant)
    ref = model.generate(past_key_values=DynamicCache(config=model.config), **common)
    assert torch.equal(ref, model.generate(**{k: v for k, v in common.items() if k != "assistant_model"}))
    cache = TieredKVCache(model.config, block_size=3)
    got = model.generate(past_key_values=cache, **common)
    assert torch.equal(ref, got)
    cache.close()
