"""Smoke test of benchmarks/hotpath_getmany_ab.py: the repository against itself, tiny sizes.  No speed is
asserted."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_runs_old_and_new(load_benchmark, capsys):
    bench = load_benchmark("hotpath_getmany_ab")
    assert bench.main(["--old", str(ROOT), "--new", str(ROOT), "--keys", "2", "--samples", "2", "--calls", "2"]) == 0
    out = capsys.readouterr().out
    assert "old: CPU us per call" in out and "new: CPU us per call" in out and "floor: CPU us per call" in out
    assert "new:facade" not in out


def test_parts(load_benchmark, capsys):
    bench = load_benchmark("hotpath_getmany_ab")
    assert bench.main(["--old", str(ROOT), "--new", str(ROOT), "--keys", "3", "--samples", "2", "--calls", "2",
                       "--parts"]) == 0
    out = capsys.readouterr().out
    for label in ("old", "new"):  # both trees' parts
        assert f"{label}:facade: CPU us per call" in out and f"{label}:setup: CPU us per call" in out
        # the stubs are put back: the tree's reads work after the run
        tier_class = bench.sys.modules[f"tc_{label}.tiers.disk"].DiskTier
        assert tier_class.read_into.__name__ == "read_into" and tier_class._read_buffered.__name__ == "_read_buffered"


def test_contiguous_outs(load_benchmark, capsys):
    bench = load_benchmark("hotpath_getmany_ab")
    assert bench.main(["--old", str(ROOT), "--new", str(ROOT), "--keys", "3", "--samples", "2", "--calls", "2",
                       "--contiguous", "--tokens", "16"]) == 0
    out = capsys.readouterr().out
    assert "3 x 24 KiB warm disk entries into separate contiguous tensors, 1 torch thread" in out
    assert "new: CPU us per call" in out and "floor: CPU us per call" in out


def test_threads(load_benchmark, capsys):
    bench = load_benchmark("hotpath_getmany_ab")
    assert bench.main(["--old", str(ROOT), "--new", str(ROOT), "--keys", "2", "--samples", "2", "--calls", "2",
                       "--threads", "2", "--tokens", "16"]) == 0
    assert "2 x 24 KiB warm disk entries into decode-buffer slices, 2 torch threads" in capsys.readouterr().out
