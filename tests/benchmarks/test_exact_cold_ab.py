"""Smoke test of benchmarks/exact_cold_ab.py at tiny sizes: every variant decodes exactly like DynamicCache
(with and without the emulated device) and the figures are filled in.  No speed is asserted."""

from __future__ import annotations

import json

import pytest


@pytest.mark.parametrize("emulate", [None, "4"])
def test_tiny_run_compares_variants(load_benchmark, tmp_path, emulate):
    bench = load_benchmark("exact_cold_ab")
    out = tmp_path / "ab.json"
    argv = ["--model", "tiny", "--context", "600", "--batch", "2", "--rounds", "2", "--steps", "2",
            "--variants", "base,g1,t4", "--raw-workers", "1,2", "--workdir", str(tmp_path), "--out", str(out)]
    if emulate:
        argv += ["--emulate-gibps", emulate]
    assert bench.main(argv) == 0
    res = json.loads(out.read_text())
    assert set(res["summary"]) == {"dynamic", "base", "g1", "t4"}
    assert all(diff == 0.0 for diff in res["diffs"].values())
    for variant in ("base", "g1", "t4"):
        row = res["summary"][variant]
        assert row["ms"] > 0 and 0 <= row["disk_idle_ms"] <= row["ms"] and row["buffer_peak_mib"] > 0
        assert len(res["records"][variant]) == 4
    assert res["read_once_ms"] and res["read_once_ms"] > 0
    assert res["summary"]["g1"]["round_ratio"] > 0 and "round_ratio" not in res["summary"]["base"]


def test_unknown_variant_is_refused(load_benchmark):
    with pytest.raises(SystemExit):
        load_benchmark("exact_cold_ab").main(["--model", "tiny", "--variants", "base,fastest"])


def test_same_cache_variants_decode_the_same_positions_exactly(load_benchmark, tmp_path):
    bench = load_benchmark("exact_cold_ab")
    out = tmp_path / "same.json"
    assert bench.main(["--model", "tiny", "--context", "600", "--batch", "2", "--rounds", "2", "--steps", "2",
                       "--variants", "base,pairs", "--same-cache", "--raw-workers", "1", "--workdir", str(tmp_path),
                       "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["diffs"] == {"base": 0.0, "pairs": 0.0}  # the crop puts each variant at the same positions


def test_same_cache_thread_and_checksum_variants(load_benchmark, tmp_path):
    """``NAME@N`` decodes at N torch threads (restored after), ``crc_hold`` swaps the disk tier's checksum
    function and ``base`` puts it back; every variant still decodes as DynamicCache does."""
    import torch

    bench = load_benchmark("exact_cold_ab")
    out = tmp_path / "threads.json"
    before = torch.get_num_threads()
    assert bench.main(["--model", "tiny", "--context", "600", "--batch", "2", "--rounds", "2", "--steps", "2",
                       "--threads", "2", "--variants", "base,base@1,crc_hold", "--same-cache", "--raw-workers", "1",
                       "--workdir", str(tmp_path), "--out", str(out)]) == 0
    assert torch.get_num_threads() == before
    res = json.loads(out.read_text())
    # base@1 is compared with a DynamicCache decoded at 1 thread (CPU attention rounds differently at 1 and 2
    # threads), and each round starts from the K/V DynamicCache wrote at 2 threads: exact for every variant
    assert res["diffs"] == {"base": 0.0, "base@1": 0.0, "crc_hold": 0.0}


def test_thread_variant_needs_a_count(load_benchmark):
    with pytest.raises(SystemExit):
        load_benchmark("exact_cold_ab").main(["--model", "tiny", "--variants", "base,base@x"])
    with pytest.raises(SystemExit):
        load_benchmark("exact_cold_ab").main(["--model", "tiny", "--variants", "base,base@0"])
