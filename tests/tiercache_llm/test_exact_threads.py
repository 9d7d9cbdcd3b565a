"""Exact mode's logits equal ``DynamicCache``'s bit for bit at the same torch thread count, 1 and 2 threads (CPU
attention itself rounds differently at different thread counts, so the comparison is always made at one count)."""

import pytest
import torch
from transformers import DynamicCache

from tiercache_llm import TieredKVCache
from tiercache_llm.hf_kwargs import cache_kwargs


def _logits(model, cache, ids, steps):
    out = []
    with torch.no_grad():
        logits = model(input_ids=ids, **cache_kwargs(cache, model), use_cache=True).logits[:, -1]
        out.append(logits)
        for i in range(steps):  # teacher-forced: the same tokens for both caches
            out.append(model(input_ids=torch.full((ids.shape[0], 1), 3 + i), **cache_kwargs(cache, model),
                             use_cache=True).logits[:, -1])
    return out


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("direct_io", [False, True])
@pytest.mark.filterwarnings("ignore:.*direct")  # a filesystem refusing O_DIRECT falls back with a warning
def test_exact_logits_equal_dynamic_cache_at_the_same_thread_count(make_model, tmp_path, threads, direct_io):
    model = make_model("llama", num_attention_heads=4, num_key_value_heads=2, hidden_size=256,  # head_dim 64
                       max_position_embeddings=2048)
    ids = torch.randint(3, 128, (2, 1100), generator=torch.Generator().manual_seed(0))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ref = _logits(model, DynamicCache(config=model.config), ids, steps=4)
        with TieredKVCache(model.config, block_size=256, host="256KiB", disk="64MiB", path=tmp_path / "kv",
                           direct_io=direct_io) as cache:
            got = _logits(model, cache, ids, steps=4)
            assert cache.stats()["tiercache"]["tiers"]["disk"]["hits"] > 0  # blocks really came from disk
    finally:
        torch.set_num_threads(before)
    for step, (r, g) in enumerate(zip(ref, got)):
        assert torch.equal(r, g), (threads, step, float((r - g).abs().max()))
