"""Smoke test of benchmarks/hotpath_getmany_ab.py: the repository against itself, tiny sizes.  No speed is
asserted."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_runs_old_and_new(load_benchmark, capsys):
    bench = load_benchmark("hotpath_getmany_ab")
    assert bench.main(["--old", str(ROOT), "--new", str(ROOT), "--keys", "2", "--samples", "2", "--calls", "2"]) == 0
    out = capsys.readouterr().out
    assert "old: CPU us per call" in out and "new: CPU us per call" in out
