"""A sparse decode step's own operations run with ``sparse_layer.CACHE_OPS_THREADS`` torch intra-op threads; the
caller's count is restored after each layer call (also when it raises), and the model's own operations keep it."""

import pytest
import torch

from tiercache_llm import TieredKVCache, sparse_layer

from ..test_generate_tiny import left_padded_batch
from .test_page_table import torch_threads


@pytest.fixture
def two_threads():
    with torch_threads(2):
        yield


def _spy(monkeypatch):
    """Record torch's thread count inside every selection, attention and digest append of sparse decode."""
    seen = {"select": [], "attend": [], "append": [], "model": []}
    select, attend, append = sparse_layer.select, sparse_layer.attend_selected, sparse_layer.SparseLayerState._append

    def spy_select(*a, **k):
        seen["select"].append(torch.get_num_threads())
        return select(*a, **k)

    def spy_attend(*a, **k):
        seen["attend"].append(torch.get_num_threads())
        return attend(*a, **k)

    def spy_append(self, keys, valid):
        if keys.shape[2] == 1:
            seen["append"].append(torch.get_num_threads())
        return append(self, keys, valid)

    monkeypatch.setattr(sparse_layer, "select", spy_select)
    monkeypatch.setattr(sparse_layer, "attend_selected", spy_attend)
    monkeypatch.setattr(sparse_layer.SparseLayerState, "_append", spy_append)
    return seen


def _decode(model, cache, seen, steps=4):
    ids, mask = left_padded_batch()
    hook = model.model.norm.register_forward_hook(lambda *a: seen["model"].append(torch.get_num_threads()))
    try:
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False, pad_token_id=0,
                       past_key_values=cache)
    finally:
        hook.remove()


@pytest.mark.parametrize("pin", [1, None])
def test_decode_runs_the_caches_ops_at_the_pinned_count(make_model, monkeypatch, two_threads, pin):
    monkeypatch.setattr(sparse_layer, "CACHE_OPS_THREADS", pin)
    seen = _spy(monkeypatch)
    model = make_model("llama")
    with TieredKVCache.for_model(model, mode="sparse", budget=6, block_size=4, host="8KiB", disk="16MiB") as cache:
        _decode(model, cache, seen)
        cache.restore_model()
    want = 2 if pin is None else pin
    assert seen["select"] and set(seen["select"]) == {want}
    assert seen["attend"] and set(seen["attend"]) == {want}
    assert seen["append"] and set(seen["append"]) == {want}
    assert set(seen["model"]) == {2}  # the model's own operations (here its last norm) keep the caller's count
    assert torch.get_num_threads() == 2


def test_the_callers_count_is_restored_when_decode_raises(make_model, monkeypatch, two_threads):
    monkeypatch.setattr(sparse_layer, "CACHE_OPS_THREADS", 1)
    inside = []

    def failing(*a, **k):
        inside.append(torch.get_num_threads())
        raise RuntimeError("selection failed")

    model = make_model("llama")
    ids, mask = left_padded_batch()
    with TieredKVCache.for_model(model, mode="sparse", budget=6, block_size=4, host="8KiB", disk="16MiB") as cache:
        monkeypatch.setattr(sparse_layer, "select", failing)
        with pytest.raises(RuntimeError, match="selection failed"):
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0,
                           past_key_values=cache)
        cache.restore_model()
    assert inside == [1]
    assert torch.get_num_threads() == 2


def test_a_count_at_or_below_the_callers_changes_nothing(monkeypatch):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        monkeypatch.setattr(sparse_layer, "CACHE_OPS_THREADS", 1)
        assert sparse_layer._pin_threads() is None and torch.get_num_threads() == 1
        monkeypatch.setattr(sparse_layer, "CACHE_OPS_THREADS", None)
        assert sparse_layer._pin_threads() is None and torch.get_num_threads() == 1
        torch.set_num_threads(2)
        monkeypatch.setattr(sparse_layer, "CACHE_OPS_THREADS", 1)
        assert sparse_layer._pin_threads() == 2 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
