"""copy.deepcopy of a TieredKVCache (transformers' prompt-reuse recipe) and the refusal to pickle."""

import copy
import pickle

import pytest
import torch
from transformers import DynamicCache

import tiercache
from tiercache_llm import TieredKVCache
from tiercache_llm.hf_kwargs import cache_kwargs


def states(batch, seq, gen):
    return (torch.randn(batch, 2, seq, 8, generator=gen), torch.randn(batch, 2, seq, 8, generator=gen))


def snapshot(cache):
    return [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]


@pytest.mark.parametrize("where", ["host", "disk", "borrowed"])
def test_deepcopy_is_independent_with_the_same_contents(tmp_path, make_config, where):
    config = make_config()
    gen = torch.Generator().manual_seed(0)
    shared = tiercache.Cache(host="1MiB") if where == "borrowed" else None
    if where == "host":
        cache = TieredKVCache(config, block_size=4, host="1MiB")
    elif where == "disk":
        cache = TieredKVCache(config, block_size=4, host="1KiB", disk="1MiB", path=tmp_path / "kv")
    else:
        cache = TieredKVCache(config, block_size=4, cache=shared)
    for layer in range(2):
        cache.update(*states(3, 10, gen), layer)
    cache.reorder_cache(torch.tensor([2, 2, 0]))  # row maps are copied too
    before = snapshot(cache)
    twin = copy.deepcopy(cache)
    assert twin.cache_uid != cache.cache_uid and twin.store is not cache.store
    assert twin.get_seq_length() == cache.get_seq_length() == 10
    for (k, v), layer in zip(before, twin.layers):
        assert torch.equal(k, layer.keys) and torch.equal(v, layer.values)
    if where == "borrowed":
        assert twin.store.cache is shared and len(shared) == 2 * 2 * 2  # both caches' blocks (one K+V entry each) in one tiercache
    elif where == "disk":
        assert twin.settings.path is None and twin.store.tmpdir is not None  # a tiercache cannot share a path
        assert twin.stats()["tiercache"]["tiers"]["disk"]["entries"] > 0
    # mutate the copy: the original does not change
    for layer in range(2):
        twin.update(*states(3, 7, gen), layer)
    twin.crop(-12)
    twin.batch_select_indices(torch.tensor([1]))
    for (k, v), layer in zip(before, cache.layers):
        assert torch.equal(k, layer.keys) and torch.equal(v, layer.values)
    twin.close()
    for (k, v), layer in zip(before, cache.layers):  # closing the copy deletes only its blocks
        assert torch.equal(k, layer.keys) and torch.equal(v, layer.values)
    cache.close()
    if shared is not None:
        assert len(shared) == 0
        shared.close()


def test_pickle_and_shallow_copy_are_refused(make_config):
    cache = TieredKVCache(make_config(), block_size=4, host="1MiB")
    cache.update(*states(1, 5, torch.Generator()), 0)
    with pytest.raises(TypeError, match="cannot be pickled.*deepcopy"):
        pickle.dumps(cache)
    with pytest.raises(TypeError, match="deepcopy"):
        copy.copy(cache)
    with pytest.raises(TypeError, match="deepcopy"):
        pickle.dumps(cache.layers[0])
    cache.close()
    with pytest.raises(RuntimeError, match="closed"):
        copy.deepcopy(cache)


def test_prompt_reuse_recipe_gives_dynamic_cache_tokens(make_model, tmp_path):
    """transformers' recipe: run the shared prefix once, deep-copy the cache per request, generate."""
    model = make_model("llama", seed=7)
    gen = torch.Generator().manual_seed(7)
    prefix = torch.randint(3, 128, (1, 13), generator=gen)
    suffixes = [torch.randint(3, 128, (1, n), generator=gen) for n in (3, 6)]

    def answers(prefix_cache):
        with torch.no_grad():
            model(input_ids=prefix, **cache_kwargs(prefix_cache, model))
        out = []
        for suffix in suffixes:
            ids = torch.cat([prefix, suffix], dim=1)
            past = copy.deepcopy(prefix_cache)
            out.append(model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=past,
                                      max_new_tokens=10, do_sample=False, pad_token_id=0))
            if isinstance(past, TieredKVCache):
                past.close()
        return out

    ref = answers(DynamicCache(config=model.config))
    prefix_cache = TieredKVCache(model.config, block_size=4, host="4KiB", disk="16MiB", path=tmp_path / "kv")
    got = answers(prefix_cache)
    assert all(torch.equal(a, b) for a, b in zip(ref, got))
    assert prefix_cache.get_seq_length() == prefix.shape[1]  # the prefix cache itself was never extended
    prefix_cache.close()
