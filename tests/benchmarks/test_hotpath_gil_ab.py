"""Smoke test of benchmarks/hotpath_gil_ab.py: the repository against itself, tiny sizes.  No speed is
asserted."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_runs_old_and_new(load_benchmark, capsys):
    bench = load_benchmark("hotpath_gil_ab")
    assert bench.main(["--old", str(ROOT), "--new", str(ROOT), "--keys", "4", "--kib", "48", "--batches", "2",
                       "--iters", "10", "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    assert "reader: 2 get_many of 4 x 48 KiB host values" in out
    assert "old: forward wall ms median" in out and "new: forward wall ms median" in out
