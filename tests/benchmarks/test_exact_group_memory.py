"""Smoke test of benchmarks/exact_group_memory.py with the tiny model: every variant is measured and its
decode buffer's peak recorded.  No speed or size is asserted beyond "something was allocated"."""

from __future__ import annotations


def test_tiny_run_measures_every_variant(load_benchmark, tmp_path):
    bench = load_benchmark("exact_group_memory")
    samples = bench.main(["--model", "tiny", "--context", "600", "--batch", "1", "--steps", "2", "--repeats", "2",
                          "--variants", "1:2,2:4", "--no-direct-io", "--workdir", str(tmp_path)])
    assert set(samples) == {"1:2", "2:4"}
    for out in samples.values():
        assert out["peak"] > 0
        assert len(out["cpu"]) == len(out["wall"]) == 2 and all(w > 0 for w in out["wall"])
    assert not list(tmp_path.iterdir())  # the scratch store is removed
