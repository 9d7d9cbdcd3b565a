"""The vectorised placement stage (``sparse.placement.record_attention``) against the per-block loop it
replaced: the same decayed masses, the same scores queued in the same order."""

from types import SimpleNamespace

import pytest
import torch

from tiercache_llm.sparse.attention import SparseAttentionOutput
from tiercache_llm.sparse.placement import record_attention


def reference(state, layer, sel, res):
    """The per-block loop ``record_attention`` replaced (without a pipeline)."""
    ctrl = state.ctrl
    hk = layer._shape_k[0]
    n_stored = len(layer._blocks)
    stored = [j for j in sel.fetch.tolist() if j < n_stored]
    if ctrl.strategy == "attention-aware" and sel.fetch.numel():
        block_mass = res.kv_head_mass(hk).sum(dim=(0, 1)).double().cpu()
        state.mass[sel.fetch.cpu()] += block_mass * ctrl.scale
        for j in stored:
            score = float(state.mass[j])
            ctrl.pending_scores[layer._kkeys[j]] = score
            ctrl.pending_scores[layer._vkeys[j]] = score


def setup(strategy, fetch, n_stored, seed):
    gen = torch.Generator().manual_seed(seed)
    n_blocks, b, hk, group = max(12, n_stored + 1), 3, 2, 3
    ctrl = SimpleNamespace(strategy=strategy, scale=0.9 ** -7, pending_scores={("old", 0): 1.5})
    state = SimpleNamespace(ctrl=ctrl, mass=torch.rand(n_blocks + 4, generator=gen, dtype=torch.float64))
    layer = SimpleNamespace(_shape_k=(hk, 0, 8), _blocks=[object()] * n_stored, pipeline=None,
                            _kkeys=[("k", j) for j in range(n_stored)], _vkeys=[("v", j) for j in range(n_stored)])
    u = len(fetch)
    mass = torch.rand(b, hk * group, u, generator=gen)
    res = SparseAttentionOutput(torch.zeros(b, hk * group, 1, 8), mass, torch.zeros(b, hk * group))
    return state, layer, SimpleNamespace(fetch=torch.tensor(fetch, dtype=torch.long)), res


@pytest.mark.parametrize("strategy", ["attention-aware", "fetch-every-step", "reuse-layer-ahead"])
@pytest.mark.parametrize(("fetch", "n_stored"), [
    ([0, 2, 5, 9], 10), ([0, 3, 10], 10), ([10], 10), ([], 10), ([1, 4, 6, 7, 8, 11], 11), ([0, 1], 0),
])
def test_record_attention_equals_the_per_block_loop(strategy, fetch, n_stored):
    got = setup(strategy, fetch, n_stored, seed=len(fetch) + n_stored)
    want = setup(strategy, fetch, n_stored, seed=len(fetch) + n_stored)
    record_attention(*got, stats=None)
    reference(*want)
    assert torch.equal(got[0].mass, want[0].mass)
    assert list(got[0].ctrl.pending_scores.items()) == list(want[0].ctrl.pending_scores.items())
    if strategy == "attention-aware" and any(j < n_stored for j in fetch):
        assert len(got[0].ctrl.pending_scores) == 1 + 2 * sum(j < n_stored for j in fetch)


def test_record_attention_uses_the_pipelines_scores_when_it_gives_them():
    state, layer, sel, res = setup("attention-aware", [0, 2, 5], 6, seed=1)
    seen = []
    layer.pipeline = SimpleNamespace(placement_scores=lambda st, ly, stored: seen.append(stored) or {"x": 0.0})
    record_attention(state, layer, sel, res, None)
    assert seen == [[0, 2, 5]] and state.ctrl.pending_scores == {("old", 0): 1.5, "x": 0.0}
