"""benchmarks/sector_study.py: sector masks, ranges and MIN's missed units on hand-made selections, the range
micro's fit on a few real files, and one end-to-end run on the random 2-layer Llama."""

from __future__ import annotations

import json

import pytest
import torch


@pytest.fixture(scope="module")
def ss(load_benchmark):
    return load_benchmark("sector_study")


def _step(fg, pages, block=16, page=8, layer=0):
    b, h, p = pages.shape
    context = p * page
    return fg.LayerStep(layer=layer, pages=pages, page=page, context=context, stored=[], n_stored=context // block,
                        block_size=block, tokens_selected=int(pages.sum()) * page)


def test_sector_masks_ranges_and_bytes(ss, load_benchmark):
    fg = load_benchmark("fetch_granularity")
    pages = torch.zeros(2, 3, 8, dtype=torch.bool)  # 2 rows, 3 heads, 64 tokens: four 16-token blocks of 2 pages
    pages[0, 0, 0] = pages[0, 1, 1] = True  # block 0: (row 0, heads 0 and 1): adjacent parts, one run
    pages[1, 2, 5] = True  # block 2: (row 1, head 2)
    ls = _step(fg, pages)
    m = ss.sector_mask(ls, 16)
    assert m.shape == (4, 6) and m[0].tolist() == [True, True, False, False, False, False]
    assert m[2].tolist() == [False] * 5 + [True] and not m[1].any() and not m[3].any()
    sectors, ranges = ss.block_reads(m, "sector-major")
    assert sectors.tolist() == [2, 1] and ranges.tolist() == [1, 1]
    assert ss.block_reads(m, "kv-first")[1].tolist() == [2, 2]  # K half and V half
    m8 = ss.sector_mask(ls, 8)  # 8-token sectors: block 0 holds (r0 h0 s0) and (r0 h1 s1): not adjacent
    assert ss.block_reads(m8, "sector-major")[1].tolist() == [2, 1]
    shape = {"kv_heads": 3, "head_dim": 4, "itemsize": 4}
    whole = ss.layout_step([ls], ss.Layout(None), shape, 2, None)
    parts = ss.layout_step([ls], ss.Layout(0), shape, 2, None)
    entry = 2 * 2 * 3 * 16 * 4 * 4
    assert whole["entries"] == parts["entries"] == 2 and whole["bytes"] == 2 * entry == whole["full_bytes"] / 2
    assert parts["bytes"] == 3 * 2 * 16 * 4 * 4 and parts["ranges"] == 2
    # with a cost, a block whose every sector is selected is read whole when that prices lower
    full = _step(fg, torch.ones(1, 1, 2, dtype=torch.bool))
    cost = ss.Cost(entry_s=1e-5, bw_Bps=1e9, range_s=1e-5, crc_call_s=0.0)
    kvf = ss.layout_step([full], ss.Layout(0, "kv-first"), {"kv_heads": 1, "head_dim": 4, "itemsize": 4}, 1, cost)
    assert kvf["whole_reads"] == 1 and kvf["ranges"] == 1
    with pytest.raises(ValueError):
        ss.Layout(0, "diagonal")


def test_min_missed_units_price(ss, load_benchmark):
    fg = load_benchmark("fetch_granularity")
    pr = load_benchmark("pool_replay")
    pages = torch.zeros(1, 2, 4, dtype=torch.bool)
    pages[0, 0, 0] = pages[0, 1, 0] = pages[0, 0, 2] = True
    steps = [[_step(fg, pages.clone())] for _ in range(3)]
    reqs, total = ss.sector_requests(steps, 16)
    assert total == 4 and reqs[0].units == [(0, 0, 0), (0, 0, 1), (0, 1, 0)]
    missed: list = []
    counts = pr.replay(reqs, 2, "min", missed=missed)
    assert [len(x) for x in missed] == counts and counts[0] == 3 and sum(counts) < 9
    assert sum(pr.replay(reqs, 4, "none", missed=missed)) == 9 and missed[1] == reqs[1].units
    priced = ss.priced_misses(missed, reqs, steps, ss.Layout(0), {"kv_heads": 2, "head_dim": 4, "itemsize": 4}, 1, None)
    assert [p["entries"] for p in priced] == [2, 2, 2] and priced[0]["bytes"] == 3 * 2 * 16 * 4 * 4


def test_range_micro_fits(ss, tmp_path):
    try:
        paths = ss.write_files(tmp_path / "f", 24, 64 * 1024)
        micro = ss.measure_ranges(paths, 64 * 1024, 16 * 1024, workers=2, repeats=1, show_progress=False)
    except OSError as exc:  # a filesystem without O_DIRECT
        pytest.skip(f"O_DIRECT reads unavailable here: {exc}")
    assert set(micro["configs"]) == {"whole"} | {f"{k} {i}" for k in ("rand", "cont") for i in range(1, 5)}
    assert micro["configs"]["whole"]["bytes"] == 4096 + 64 * 1024 and micro["configs"]["cont 4"]["ranges"] == 1
    assert all(1 <= r["ranges"] <= 2 for c, r in micro["configs"].items() if c.startswith("rand"))
    assert all(r["s_per_entry"] > 0 for r in micro["configs"].values()) and "range_s" in micro
    assert ss.part_ranges([3, 0, 1], 16) == [(4096, 32), (4096 + 48, 16)]


def test_end_to_end_tiny(ss, tmp_path):
    from _common import sparse_available

    if not sparse_available()[0]:
        pytest.skip("sparse mode not available")
    out = tmp_path / "out"
    assert ss.main(["--model", "tiny", "--contexts", "256", "--batches", "2", "--budgets", "0.25", "--steps", "3",
                    "--synthetic", "512", "--synthetic-layers", "2", "--synthetic-steps", "3", "--entry-kib", "64",
                    "--part-kib", "16", "--micro-files", "16", "--micro-repeats", "1", "--disk-mib", "1",
                    "--disk-repeats", "1", "--replay-repeats", "1", "--workdir", str(tmp_path), "--out", str(out), "--no-progress"]) == 0
    doc = json.loads((out / "sector_study.json").read_text())
    assert len(doc["points"]) == 2 and all(p["checked"]["steps"] == 3 for p in doc["points"])
    assert set(doc["points"][1]["stage_runs"]) == {"exact", "fetch-every-step", "attention-aware"}
    rows = doc["summary"]
    assert len(rows) == 2 * len(ss.LAYOUTS)
    for r in rows:
        assert r["x_full"] <= 1.0 + 1e-9 and r["min_x_full"] <= r["x_full"] + 1e-9
        if r["layout"] != rows[0]["layout"]:
            assert r["bytes_vs_today"] <= 1.0 + 1e-9  # a sector read never reads more than the whole entries
    rp = doc["replay"]
    assert rp["point"]["name"] == "tiny" and rp["steps"] == 2 and rp["whole"]["ms_per_step"] > 0
    assert rp["parts"]["MiB_per_step"] <= rp["whole"]["MiB_per_step"] and rp["parts"]["reads_per_step"] >= rp["entries_per_step"]
    assert (out / "sector_study.md").exists() and (out / "sector_study.png").stat().st_size > 0
