"""Part reads ahead (``PipelineConfig.slot_part_extra`` / ``slot_part_union``): the reads into reserved slots read the
predicted parts plus the parts about to cross each (row, KV head)'s cut (:func:`near_parts`), or the union of two
predictors' parts.  What is attended never changes: every part a layer selects is in its slot before attention."""

import math

import pytest
import torch

from tiercache_llm.sparse.pipeline import PipelineConfig, _mask_union
from tiercache_llm.sparse.stage_choice import LastSelection, near_parts

from .test_part_reads import _run, nan_slots  # noqa: F401  (a fixture)


@pytest.fixture
def model(make_model):
    return make_model("llama", seed=5, num_hidden_layers=3)


def _near_parts_by_hand(sel: LastSelection, extra: float) -> torch.Tensor:
    """near_parts' contract, one (row, head) at a time in Python."""
    b, h, p = sel.scores.shape
    ppb = sel.pages_per_block
    out = torch.zeros(b, h, -(-p // ppb), dtype=torch.bool)
    for r in range(b):
        for x in range(h):
            k = min(p, math.ceil(int(sel.pages[r, x].sum()) * extra))
            cands = [(float(sel.scores[r, x, q]), q) for q in range(p)
                     if not sel.pages[r, x, q] and sel.count[r, q] > 0 and not math.isnan(float(sel.scores[r, x, q]))]
            cands.sort(reverse=True)
            if k == 0 or not cands:
                continue
            cut = cands[min(k, len(cands)) - 1][0]
            for s, q in cands:
                if s >= cut:
                    out[r, x, q // ppb] = True
    return out


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("extra", [0.0, 0.1, 0.5, 2.0, 100.0])
def test_near_parts_are_the_blocks_of_the_highest_unselected_valid_pages(seed, extra):
    g = torch.Generator().manual_seed(seed)
    b, h, ppb = 2, 3, 4
    p = int(torch.randint(5, 23, (1,), generator=g))
    scores = torch.randn(b, h, p, generator=g).round(decimals=1)  # ties at the cut
    scores[0, 1, 0] = float("nan")
    pages = torch.rand(b, h, p, generator=g) < 0.3
    pages[1, 2] = False  # a (row, head) that selected nothing: no near parts
    count = torch.full((b, p + 3), 8)
    count[1, : p // 3] = 0  # left padding: never a candidate
    sel = LastSelection(scores, pages, ppb, count)
    got = near_parts(sel, extra)
    assert torch.equal(got, _near_parts_by_hand(sel, extra))
    assert not got[1, 2].any()
    if extra == 100.0:  # every valid unselected page's block, for every (row, head) that selected a page
        valid = ~pages & count[:, :p].gt(0).unsqueeze(1) & ~torch.isnan(scores) & pages.any(-1, keepdim=True)
        pad = -(-p // ppb) * ppb - p
        want = torch.nn.functional.pad(valid, (0, pad)).view(b, h, -1, ppb).any(-1)
        assert torch.equal(got, want)


def test_mask_union_pads_the_shorter_mask():
    a = torch.tensor([[[True, False]]])
    b = torch.tensor([[[False, True, True]]])
    assert torch.equal(_mask_union(a, b), torch.tensor([[[True, True, True]]]))
    assert _mask_union(a, None) is a and _mask_union(None, b) is b
    assert _mask_union(a, torch.ones(2, 1, 2, dtype=torch.bool)) is a  # other rows: the first alone


def test_slot_part_extra_is_checked():
    assert PipelineConfig().slot_part_extra == 0.0 and not PipelineConfig().slot_part_union
    for bad in (-0.5, float("inf"), float("nan"), True, "0.5"):
        with pytest.raises(ValueError, match="slot_part_extra"):
            PipelineConfig(slot_part_extra=bad)
    with pytest.raises(ValueError, match="slot_part_union"):
        PipelineConfig(slot_part_union=1)


BOUND = 12 * 3 * 1024
AHEAD = {"lengths": (64, 50, 40), "budget": 0.25, "pool_bytes": BOUND}


@pytest.mark.parametrize("strategy,pipeline", [
    ("attention-aware", {"slot_part_reads": True, "slot_part_extra": 0.5}),
    ("attention-aware", {"slot_part_reads": True, "slot_part_extra": 100.0}),
    ("attention-aware", {"slot_part_reads": True, "predictor": "query", "slot_part_union": True}),
    ("reuse-layer-ahead", {"slot_part_reads": True, "slot_part_union": True}),
    ("reuse-layer-ahead", {"slot_part_reads": True, "slot_part_extra": 0.5}),
])
def test_parts_ahead_give_whole_reads_logits_with_nan_in_every_unread_part(model, tmp_path, nan_slots, strategy,
                                                                           pipeline):
    whole, _ = _run(model, tmp_path / "whole", strategy, False, **AHEAD)
    parts, stats = _run(model, tmp_path / "parts", strategy, True, pipeline=pipeline, **AHEAD)
    assert torch.isfinite(parts).all() and torch.equal(parts, whole)
    assert stats["pipeline"]["slot_reserved"] > 0


def test_more_parts_ahead_mean_fewer_part_misses_of_reads_ahead(model, tmp_path, nan_slots):
    """The previous selection's parts alone miss the parts entering a (row, head)'s selection; with every valid page's
    parts predicted (a margin past any cut) no read ahead lacks a part its layer selects, and fewer reads are
    ranged."""
    runs = {}
    for extra in (0.0, 100.0):
        pipe = {"slot_part_reads": True, "slot_part_extra": extra}
        logits, stats = _run(model, tmp_path / str(extra), "attention-aware", True, pipeline=pipe, **AHEAD)
        runs[extra] = (logits, stats["pipeline"])
    (l0, p0), (l1, p1) = runs[0.0], runs[100.0]
    assert torch.equal(l0, l1)
    assert p0["slot_part_misses"] > 0 and p0["slot_ranged_reads"] > 0
    assert p1["slot_part_misses"] == 0
    assert p1["slot_part_misses"] <= p1["part_misses"]
