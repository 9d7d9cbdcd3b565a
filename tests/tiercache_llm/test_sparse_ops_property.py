"""Property test: any sequence of decode steps, crops, beam reorders and batch selections keeps a sparse
cache's digests equal to digests rebuilt from its keys, and at a dense budget its logits equal
DynamicCache's under the same operations."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

from tiercache_llm import TieredKVCache
from tiercache_llm.hf_kwargs import cache_kwargs

from .test_generate_tiny import left_padded_batch
from .test_sparse_mode import DENSE, digests_match_keys

_MODEL = {}


def model():
    if "m" not in _MODEL:
        from .conftest import tiny_model

        _MODEL["m"] = tiny_model("llama", seed=14)
    return _MODEL["m"]


op = st.one_of(
    st.tuples(st.just("step"), st.integers(3, 127)),
    st.tuples(st.just("crop"), st.integers(1, 5)),
    st.tuples(st.just("reorder"), st.permutations([0, 1, 2])),
    st.tuples(st.just("select"), st.integers(0, 2)),
)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op, min_size=1, max_size=10), budget=st.sampled_from([DENSE, 6]), page=st.sampled_from([2, 4]))
def test_operations_keep_digests_and_dense_logits(ops, budget, page):
    m = model()
    ids, mask = left_padded_batch(lengths=(14, 11, 6), seed=14)
    ref = DynamicCache(config=m.config)
    cache = TieredKVCache.for_model(m, mode="sparse", budget=budget, sink=2, recent=3, block_size=4,
                                     page_size=page, host="1MiB")
    try:
        with torch.no_grad():
            m(ids, attention_mask=mask, **cache_kwargs(ref, m))
            m(ids, attention_mask=mask, **cache_kwargs(cache, m))
            for kind, arg in ops:
                batch = mask.shape[0]
                if kind == "step":
                    nxt = torch.full((batch, 1), arg)
                    mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
                    a = m(nxt, attention_mask=mask, **cache_kwargs(ref, m)).logits
                    b = m(nxt, attention_mask=mask, **cache_kwargs(cache, m)).logits
                    if budget == DENSE:
                        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
                    else:
                        assert torch.isfinite(b).all()
                elif kind == "crop":
                    if mask.shape[1] - arg < 7:
                        continue
                    ref.crop(-arg)
                    cache.crop(-arg)
                    mask = mask[:, :-arg]
                elif kind == "reorder":
                    perm = torch.tensor(arg[:batch] if batch == 3 else list(range(batch))[::-1])
                    ref.reorder_cache(perm)
                    cache.reorder_cache(perm)
                    mask = mask[perm]
                elif batch > 1:
                    keep = torch.tensor([i for i in range(batch) if i != arg % batch])
                    ref.batch_select_indices(keep)
                    cache.batch_select_indices(keep)
                    mask = mask[keep]
                digests_match_keys(cache)
                assert cache.get_seq_length() == mask.shape[1]
    finally:
        cache.restore_model()
        cache.close()
