"""Smoke test of benchmarks/hotpath_fetch.py with the tiny model: every part and method is measured, on a
cache that has layers held in memory and layers reading the disk.  No speed is asserted."""

from __future__ import annotations


def test_tiny_run_measures_every_part(load_benchmark):
    bench = load_benchmark("hotpath_fetch")
    medians, counts = bench.measure(bench.model_config("tiny"), 600, 1, 200_000, 2, calls=(1, 2))
    assert counts["layers_mem"] >= 1 and counts["layers_disk"] >= 1 and counts["disk_disk"] >= 1
    assert set(medians) == {("mem", m) for m in ("ahead", "grouped", "inline", "roundtrip", "plain")} | {
        ("disk", m) for m in ("ahead", "grouped", "inline", "roundtrip", "plain", "plain+crc", "floor",
                              "calls/1", "calls/2")}
    assert all(cpu >= 0 and wall > 0 for cpu, wall in medians.values())


def test_compare_readers_times_the_pool_variants(load_benchmark):
    bench = load_benchmark("hotpath_fetch")
    medians, _ = bench.measure(bench.model_config("tiny"), 600, 1, 200_000, 1, compare_readers=True)
    for part in ("mem", "disk"):
        for method in ("ahead", "grouped", "roundtrip"):
            assert (part, method) in medians and (part, f"{method}@pool") in medians


def test_compare_setting_times_every_method_with_the_setting_and_puts_it_back(load_benchmark):
    import pytest

    from tiercache.tiers import disk

    bench = load_benchmark("hotpath_fetch")
    setting = bench.parse_setting("tiercache.tiers.disk.PARTS_CACHE=False")
    assert setting[1:] == ("PARTS_CACHE", False, "PARTS_CACHE=False")
    medians, _ = bench.measure(bench.model_config("tiny"), 600, 1, 200_000, 1, compare_setting=setting)
    for part, method in list(medians):
        if "@" not in method:
            assert (part, f"{method}@PARTS_CACHE=False") in medians
    assert disk.PARTS_CACHE is True
    for bad in ("PARTS_CACHE=False", "tiercache.tiers.disk.NO_SUCH=1", "tiercache.tiers.disk.PARTS_CACHE"):
        with pytest.raises(ValueError):
            bench.parse_setting(bad)


def test_beside_times_every_method_beside_a_decode_loop_and_stops_it(load_benchmark):
    import threading

    bench = load_benchmark("hotpath_fetch")
    medians, _ = bench.measure(bench.model_config("tiny"), 600, 1, 200_000, 1, beside="tiny")
    for part, method in list(medians):
        if "@" not in method:
            assert (part, f"{method}@beside") in medians
    assert not any(t.name == "hotpath-fetch-beside" for t in threading.enumerate())


def test_decode_beside_runs_passes_between_start_and_stop_and_reports_a_failing_model(load_benchmark):
    import pytest
    import torch

    common = load_benchmark("_common")

    class Cache:
        def __init__(self):
            self.crops = 0

        def crop(self, n):
            assert n == -1
            self.crops += 1

    class Model:
        def __init__(self, fail):
            self.fail = fail

        def __call__(self, input_ids, use_cache, **kwargs):
            if self.fail:
                raise ValueError("boom")

    cache = Cache()
    with common.DecodeBeside(Model(False), torch.zeros(1, 3, dtype=torch.long), cache) as beside:
        beside.start()
        beside.stop()
        done = beside.passes
        assert done >= 1 and cache.crops == done
        assert beside.passes == done  # stopped: no pass runs after stop() returns
    with common.DecodeBeside(Model(True), torch.zeros(1, 3, dtype=torch.long), Cache()) as failing:
        with pytest.raises(RuntimeError, match="boom"):
            failing.start()
