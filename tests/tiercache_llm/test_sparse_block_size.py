"""A sparse cache's selection works on pages (``page_size``), not on storage blocks: at one page size, the block
size changes what is stored and fetched (the union of the blocks holding a selected page, the in-memory tail
of up to ``block_size - 1`` tokens) but never which tokens are attended, so the logits are the same at every
block size (docs/tiercache_llm.md "Block size" rests on this when it changes the sparse default)."""

import pytest
import torch

from tiercache_llm import TieredKVCache

from .test_generate_tiny import left_padded_batch
from .test_sparse_pipeline import decode_logits, opts


@pytest.mark.parametrize("strategy", ["fetch-every-step", "reuse-layer-ahead", "attention-aware"])
def test_sparse_logits_do_not_depend_on_the_block_size(make_model, tmp_path, strategy):
    model = make_model("llama", seed=7, num_hidden_layers=3)
    ids, mask = left_padded_batch(seed=7, lengths=(45, 38, 29))
    got, fetched = {}, {}
    for block in (4, 8, 16):  # tails of up to 3, 7 and 15 tokens beside the tiers at this context
        with TieredKVCache.for_model(model, **opts(tmp_path / str(block), strategy, block_size=block,
                                                   page_size=4)) as cache:
            got[block] = decode_logits(model, cache, ids, mask, steps=12)
            total = cache.stats()["sparse"]["total"]
            fetched[block] = sum(total["bytes_fetched"].values())
            assert total["blocks_selected"] > 0
    assert torch.equal(got[4], got[8]) and torch.equal(got[4], got[16])
    assert fetched[4] > 0 and fetched[16] > 0  # the stored blocks were read, so the comparison covers fetches
