"""Smoke test of benchmarks/exact_group_ab.py with the tiny model: every variant is measured.  No speed is
asserted."""

from __future__ import annotations

import pytest


def test_tiny_run_measures_every_variant(load_benchmark):
    bench = load_benchmark("exact_group_ab")
    variants = bench.parse_variants("1:4,2:4,2:8:8:4")
    assert variants == {"1:4": (1, 4, 0, 4), "2:4": (2, 4, 0, 4), "2:8:8:4": (2, 8, 8 << 20, 4)}
    for bad in ("0:4", "2:4:8:5", "2", "2:4:-1:4"):
        with pytest.raises(ValueError, match="positive"):
            bench.parse_variants(bad)
    medians = bench.measure(bench.hotpath_fetch.model_config("tiny"), 600, variants, 1, host=200_000)
    assert set(medians) == set(variants)
    assert all(cpu >= 0 and wall > 0 for cpu, wall in medians.values())
