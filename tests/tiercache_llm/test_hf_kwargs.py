"""cache_kwargs: the keyword the installed transformers takes a cache by, with no deprecation warning."""

import warnings

import pytest
import torch

from tiercache_llm import TieredKVCache, cache_argument, cache_kwargs
from tiercache_llm.hf_kwargs import NEW, OLD


def _takes(model, name):
    import inspect

    return name in inspect.signature(model.forward).parameters


def test_cache_argument_names_a_keyword_the_models_forward_takes(make_model):
    model = make_model()
    name = cache_argument(model)
    assert name in (NEW, OLD)
    assert _takes(model, name)
    if _takes(model, NEW):  # the new spelling wins wherever it exists
        assert name == NEW


def test_cache_kwargs_of_none_is_empty_and_otherwise_one_entry(make_model):
    model = make_model()
    assert cache_kwargs(None, model) == {}
    sentinel = object()
    assert cache_kwargs(sentinel, model) == {cache_argument(model): sentinel}


def test_a_forward_with_only_kwargs_gets_the_generation_codes_keyword():
    class Wrapper(torch.nn.Module):
        def forward(self, input_ids, **kwargs):  # e.g. a remote-code or wrapped model
            return kwargs

    assert cache_argument(Wrapper()) == cache_argument()


@pytest.mark.parametrize("mode", ["exact", "sparse"])
def test_generate_and_forward_through_cache_kwargs_match_dynamic_cache_without_warnings(make_model, mode):
    model = make_model()
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(1))
    ref = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    opts = dict(mode=mode, block_size=16, host="64MiB")
    if mode == "sparse":
        opts["budget"] = 1.0  # dense attention: the same tokens
    cache = TieredKVCache.for_model(model, **opts)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            warnings.simplefilter("error", DeprecationWarning)
            out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, **cache_kwargs(cache, model))
        assert torch.equal(out, ref)
    finally:
        cache.close()
    from transformers import DynamicCache

    dense, cache = DynamicCache(), TieredKVCache.for_model(model, **opts)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            warnings.simplefilter("error", DeprecationWarning)
            got = [model(x, **cache_kwargs(cache, model)).logits[:, -1] for x in (ids, out[:, 40:41], out[:, 41:42])]
        want = [model(x, **cache_kwargs(dense, model)).logits[:, -1] for x in (ids, out[:, 40:41], out[:, 41:42])]
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)
        assert cache.get_seq_length() == ids.shape[1] + 2
    finally:
        cache.close()
