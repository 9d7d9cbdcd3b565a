"""A forward pass that raises half-way through a TieredKVCache update leaves the cache marked inconsistent: the
next use raises InconsistentCacheError (naming the layer and reset()), never a misleading error or a silent step
over layers of different lengths; reset() fully recovers (docs/tiercache_llm.md "Safety")."""

import pytest
import torch
from transformers import DynamicCache

from tiercache_llm import TieredKVCache
from tiercache_llm.errors import InconsistentCacheError, TieredKVError

from .test_generate_tiny import left_padded_batch

LAYERS = 4
DENSE = 1_000_000


class Boom(RuntimeError):
    pass


@pytest.fixture
def model(make_model):
    return make_model("llama", seed=3, num_hidden_layers=LAYERS)


def make_cache(model, mode):
    if mode == "sparse":
        return TieredKVCache.for_model(model, mode="sparse", budget=DENSE, block_size=4, host="1MiB")
    return TieredKVCache(model.config, block_size=4, host="1MiB")


def fail_prefill(model, cache, ids, mask):
    """A prefill of ``ids`` into ``cache`` that raises in layer 1's MLP (after layers 0-1 stored their K/V)."""
    handle = fail_on_call(model.model.layers[1].mlp, 1)
    try:
        with pytest.raises(Boom):
            model(input_ids=ids, attention_mask=mask, past_key_values=cache)
    finally:
        handle.remove()


def fail_on_call(module, n, exc=Boom, pre=False):
    """Make ``module`` raise ``exc`` on its ``n``-th call (1-based) from now; returns the hook handle."""
    calls = [0]

    def hook(*_):
        calls[0] += 1
        if calls[0] == n:
            raise exc("injected failure")

    return module.register_forward_pre_hook(hook) if pre else module.register_forward_hook(hook)


def reference(model, ids, mask, n=6):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0,
                          past_key_values=DynamicCache(config=model.config))


def generate(model, cache, ids, mask, n=6):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0,
                          past_key_values=cache)


def assert_recovers(model, cache, ids, mask):
    """reset() gives a cache whose fresh generate equals DynamicCache's."""
    cache.reset()
    assert all(layer.get_seq_length() == 0 for layer in cache.layers)
    torch.testing.assert_close(generate(model, cache, ids, mask), reference(model, ids, mask), rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["exact", "sparse"])
@pytest.mark.parametrize("pre", [False, True], ids=["after-layer", "before-attention"])
def test_failed_decode_step_in_generate(model, mode, pre):
    ids, mask = left_padded_batch(seed=3)
    with make_cache(model, mode) as cache:
        # a decoder layer raising after its update (hook on the layer), or an attention raising before its
        # update (pre-hook on layer 2's attention): the 3rd call is the 2nd decode step
        target = model.model.layers[2] if not pre else model.model.layers[2].self_attn
        handle = fail_on_call(target, 3, pre=pre)
        try:
            with pytest.raises(Boom):
                generate(model, cache, ids, mask)
        finally:
            handle.remove()
        lengths = {layer.get_seq_length() for layer in cache.layers}
        assert len(lengths) == 2  # layers 0..1 (or 0..2) hold the failed step's token, the others not
        step = torch.ones_like(ids[:, :1])
        with pytest.raises(InconsistentCacheError, match=r"layer 3|layer 2") as info:
            model(input_ids=step, attention_mask=torch.cat([mask, torch.ones_like(mask[:, :3])], 1),
                  past_key_values=cache)
        assert "reset()" in str(info.value) and isinstance(info.value, TieredKVError)
        assert f"failed at layer {3 if not pre else 2}" in str(info.value)
        with pytest.raises(InconsistentCacheError):  # every later use too, until reset
            generate(model, cache, ids, mask)
        with pytest.raises(InconsistentCacheError):  # crop cannot repair it
            cache.crop(-1)
        assert_recovers(model, cache, ids, mask)


@pytest.mark.parametrize("mode", ["exact", "sparse"])
def test_failed_prefill_plain_forward(model, mode):
    ids, mask = left_padded_batch(seed=4)
    with make_cache(model, mode) as cache:
        fail_prefill(model, cache, ids, mask)
        assert cache.layers[0].get_seq_length() == ids.shape[1] and cache.layers[LAYERS - 1].get_seq_length() == 0
        with pytest.raises(InconsistentCacheError, match="failed at layer 2"):
            model(input_ids=ids, attention_mask=mask, past_key_values=cache)
        assert_recovers(model, cache, ids, mask)


def test_sparse_error_between_update_and_digests(model, monkeypatch):
    """The audit's case: a sparse layer stored the new token, then its attention raised before appending the
    token's digests (e.g. a SparseModeError): the next step names the failed pass, not "digests cover N"."""
    import tiercache_llm.attention_hook as hook
    from tiercache_llm.sparse_layer import SparseModeError

    ids, mask = left_padded_batch(seed=5)
    with make_cache(model, "sparse") as cache:
        out = generate(model, cache, ids, mask, n=3)
        real = hook._check_plain_attention

        def check(module, kwargs):
            if module.layer_idx == LAYERS - 1:
                raise SparseModeError("injected")
            return real(module, kwargs)

        monkeypatch.setattr(hook, "_check_plain_attention", check)
        step = out[:, -1:]
        full_mask = torch.cat([mask, torch.ones_like(mask[:, :3])], 1)
        with pytest.raises(SparseModeError, match="injected"):
            model(input_ids=step, attention_mask=full_mask, past_key_values=cache)
        monkeypatch.setattr(hook, "_check_plain_attention", real)
        assert len({layer.get_seq_length() for layer in cache.layers}) == 1  # lengths agree, digests do not
        with pytest.raises(InconsistentCacheError, match="without the digests") as info:
            model(input_ids=step, attention_mask=full_mask, past_key_values=cache)
        assert "digests cover" not in str(info.value)
        assert_recovers(model, cache, ids, mask)


@pytest.mark.parametrize("mode", ["exact", "sparse"])
def test_keyboard_interrupt_mid_pass(model, mode):
    """KeyboardInterrupt skips torch's always-call post-hook; the cache is still marked inconsistent."""
    ids, mask = left_padded_batch(seed=6)
    with make_cache(model, mode) as cache:
        out = generate(model, cache, ids, mask, n=2)
        handle = fail_on_call(model.model.layers[1], 1, exc=KeyboardInterrupt)
        full_mask = torch.cat([mask, torch.ones_like(mask[:, :2])], 1)
        try:
            with pytest.raises(KeyboardInterrupt):
                model(input_ids=out[:, -1:], attention_mask=full_mask, past_key_values=cache)
        finally:
            handle.remove()
        with pytest.raises(InconsistentCacheError, match="failed at layer 2"):
            model(input_ids=out[:, -1:], attention_mask=full_mask, past_key_values=cache)
        assert_recovers(model, cache, ids, mask)


@pytest.mark.parametrize("mode", ["exact", "sparse"])
def test_failure_after_the_last_layer_leaves_a_consistent_cache(model, mode):
    """An exception after every layer's update and attention (here: in the final norm) leaves every layer with
    the pass's tokens: nothing is inconsistent, decoding goes on (as with a DynamicCache)."""
    ids, mask = left_padded_batch(seed=7)
    with make_cache(model, mode) as cache:
        ref = DynamicCache(config=model.config)
        handle = fail_on_call(model.model.norm, 1)
        try:
            for c in (cache, ref):
                with pytest.raises(Boom):
                    model(input_ids=ids, attention_mask=mask, past_key_values=c)
                handle.remove()
                handle = fail_on_call(model.model.norm, 1)
        finally:
            handle.remove()
        assert {layer.get_seq_length() for layer in cache.layers} == {ids.shape[1]}
        step = torch.ones_like(ids[:, :1])
        full_mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        got = model(input_ids=step, attention_mask=full_mask, past_key_values=cache).logits
        want = model(input_ids=step, attention_mask=full_mask, past_key_values=ref).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_direct_updates_of_one_layer_still_work(make_config):
    """The layer-level API (updating layer 0 alone, e.g. in tests) is not mistaken for a failed pass."""
    with TieredKVCache(make_config(), block_size=4, host="1MiB") as cache:
        k = torch.randn(1, 2, 5, 16)
        cache.update(k, k, 0)
        out, _ = cache.update(k[:, :, :1], k[:, :, :1], 0)
        assert out.shape[2] == 6
        cache.crop(-2)
        assert cache.layers[0].get_seq_length() == 4
