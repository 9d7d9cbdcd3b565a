"""Smoke test of benchmarks/disk_ranges.py: tiny sizes, every output written.  No speed is asserted."""

from __future__ import annotations

import json


def test_runs_and_writes_results(load_benchmark, capsys, tmp_path):
    bench = load_benchmark("disk_ranges")
    assert bench.main(["--count", "6", "--batch", "4", "--repeats", "2", "--ks", "1,12", "--sectors", "16384,65536",
                       "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "load average at start" in out and "load average at end" in out
    doc = json.loads((tmp_path / "disk_ranges.json").read_text())
    rows = {(row["sector_bytes"], row["variant"]): row for row in doc["rows"]}
    assert set(rows) == {(s, v) for s in (16384, 65536) for v in ("whole", "k=1", "k=12")}
    # the bytes read are what the variants say: one 64 KiB part (one or four sectors) against the 768 KiB value
    for sector in (16384, 65536):
        assert rows[(sector, "whole")]["bytes_read_per_entry"] == 768 << 10
        assert rows[(sector, "k=1")]["bytes_read_per_entry"] == 64 << 10
        assert rows[(sector, "k=12")]["bytes_read_per_entry"] == 768 << 10
    assert (tmp_path / "disk_ranges.md").read_text().startswith("# Ranged")
    assert (tmp_path / "disk_ranges.png").stat().st_size > 0


def test_part_ranges_merges_adjacent_parts(load_benchmark):
    bench = load_benchmark("disk_ranges")
    assert bench.part_ranges([3, 0, 1], 10) == [(0, 20), (30, 40)]
