"""benchmarks/fetch_granularity.py: the granularity arithmetic on a hand-made selection, the check against
the cache (it must be able to fail), the cost fit, and one end-to-end run on the random 2-layer Llama."""

from __future__ import annotations

import json

import pytest
import torch


@pytest.fixture(scope="module")
def fg(load_benchmark):
    return load_benchmark("fetch_granularity")


def _pages(selected, b=2, h=2, p=25):
    pages = torch.zeros(b, h, p, dtype=torch.bool)
    for row, head, page in selected:
        pages[row, head, page] = True
    return pages


# 200 tokens of context = 25 pages of 8: three complete 64-token blocks and an 8-token tail (page 24).
SELECTED = [(0, 0, 0), (0, 1, 9), (1, 1, 17), (1, 0, 23), (1, 0, 24)]


@pytest.mark.parametrize("tokens, split, expected", [
    (64, "all", [0, 1, 2]),  # pages 0, 9, 17, 23 lie in blocks 0, 1, 2, 2; page 24 is in the tail
    (64, "row", [(0, 0), (0, 1), (1, 2)]),
    (64, "rowhead", [(0, 0, 0), (0, 1, 1), (1, 0, 2), (1, 1, 2)]),
    (32, "all", [0, 2, 4, 5]),  # 6 complete units; page 24 would be unit 6, the tail
    (16, "row", [(0, 0), (0, 4), (1, 8), (1, 11)]),
    (128, "all", [0]),  # one complete unit; pages 17 and 23 are in the partial second one
])
def test_unit_mask_is_the_union_by_hand(fg, tokens, split, expected):
    mask = fg.unit_mask(_pages(SELECTED), 200, 8, fg.Scheme("t", tokens, split))
    assert mask.shape[-1] == 200 // tokens
    got = [tuple(i) if len(i) > 1 else i[0] for i in mask.nonzero().tolist()]
    assert got == expected


def test_unit_mask_refuses_a_page_that_does_not_divide_the_unit(fg):
    with pytest.raises(ValueError, match="divide"):
        fg.unit_mask(_pages(SELECTED), 200, 16, fg.Scheme("t", 8, "all"))


def _step(fg, layer, selected, stored, context=200):
    return fg.LayerStep(layer=layer, pages=_pages(selected), page=8, context=context, stored=stored,
                        n_stored=context // 64, block_size=64, tokens_selected=8 * len(selected))


def test_scheme_figures_counts_entries_bytes_and_overlap(fg):
    steps = [[_step(fg, 0, SELECTED, [0, 1, 2])], [_step(fg, 0, [(0, 0, 0), (1, 1, 1)], [0])]]
    rows = fg.scheme_figures(steps, fg.TODAY, batch=2, heads=2, head_dim=4, itemsize=4)
    eb = 2 * 2 * 64 * 4 * 4
    assert [r["entries"] for r in rows] == [6, 2] and [r["bytes"] for r in rows] == [6 * eb, 2 * eb]
    assert rows[0]["reused_units"] is None and rows[1]["reused_units"] == 1 and rows[1]["new_entries"] == 0
    assert rows[0]["budget_bytes"] == 5 * 8 * 2 * 4 * 4 and rows[0]["full_bytes"] == 200 * 2 * 2 * 2 * 4 * 4
    per_head = fg.scheme_figures(steps, fg.Scheme("c", 64, "rowhead"), batch=2, heads=2, head_dim=4, itemsize=4)
    assert [r["units"] for r in per_head] == [4, 2] and per_head[1]["reused_units"] == 1  # (0, 0, 0) again
    s = fg.summarise_scheme(rows, eb, None)
    assert s["overlap"] == 1.0 and s["entries"] == 4
    assert rows[1]["touched_bytes"] == 6 * eb  # blocks 0, 1, 2: the second step touched only block 0 again


def test_check_today_fails_when_the_study_and_the_cache_disagree(fg):
    steps = [[_step(fg, 0, SELECTED, [0, 1, 2]), _step(fg, 1, [(0, 0, 0)], [0])]]
    eb = 2 * 2 * 64 * 4 * 4
    good = [{"blocks_selected": 4, "bytes_fetched": {"host": 8 * eb}}]
    assert fg.check_today(steps, good, eb) == {"steps": 1, "layer_steps": 2}
    with pytest.raises(AssertionError, match="blocks_selected"):
        fg.check_today(steps, [{"blocks_selected": 5, "bytes_fetched": {"host": 8 * eb}}], eb)
    with pytest.raises(AssertionError, match="bytes_fetched"):
        fg.check_today(steps, [{"blocks_selected": 4, "bytes_fetched": {"host": 7 * eb}}], eb)
    with pytest.raises(AssertionError, match="cache fetch"):
        fg.check_today([[_step(fg, 0, SELECTED, [0, 2])]], good, eb)


def test_fit_cost_recovers_exact_constants(fg):
    a, bw = 30e-6, 2e9
    fit = fg.fit_cost({s: a + s / bw for s in (4096, 16384, 65536, 262144)})
    assert fit["a_s"] == pytest.approx(a, rel=1e-6) and fit["bw_Bps"] == pytest.approx(bw, rel=1e-6)
    assert fit["fit_max_abs_rel_err"] < 1e-9


def test_end_to_end_tiny(fg, tmp_path):
    from _common import sparse_available

    if not sparse_available()[0]:
        pytest.skip("sparse mode not available")
    out = tmp_path / "out"
    assert fg.main(["--model", "tiny", "--contexts", "256", "--batches", "1,2", "--budgets", "0.25,128", "--steps", "3",
                    "--disk-mib", "1", "--disk-repeats", "1", "--workdir", str(tmp_path), "--out", str(out),
                    "--no-progress"]) == 0
    doc = json.loads((out / "fetch_granularity.json").read_text())
    assert len(doc["points"]) == 4 and all(p["checked"]["steps"] == 3 for p in doc["points"])
    assert all(p["checked"]["layer_steps"] == 3 * 2 for p in doc["points"])  # every layer step checked
    today = [r for r in doc["summary"] if r["tag"] == "a"]
    assert len(today) == 4 and all(r["est_ms"] > 0 and r["x_budget"] >= 1 for r in today)
    assert (out / "fetch_granularity.md").exists() and (out / "fetch_granularity.png").stat().st_size > 0
