"""Smoke test of benchmarks/exact_prefetch.py at tiny sizes: every configuration decodes exactly like
DynamicCache, the read-ahead schedules differ as named, and the timeline covers every layer.  No speed is
asserted."""

from __future__ import annotations

import json

import pytest


def test_quick_run_compares_the_schedules_with_a_timeline(load_benchmark, tmp_path):
    bench = load_benchmark("exact_prefetch")
    out = tmp_path / "out"
    assert bench.main(["--quick", "--steps", "2", "--rounds", "2", "--workdir", str(tmp_path), "--out", str(out)]) == 0
    (res,) = json.loads((out / "exact_prefetch.json").read_text())["results"]
    assert set(res["configs"]) == set(bench.CONFIGS)
    assert all(diff == 0.0 for diff in res["max_abs_logit_diff"].values())
    for config in ("exact-ahead-serial", "exact-ahead"):
        row = res["configs"][config]
        assert row["entries_ahead"] > 0 and row["disk_mib"] > 0
        # The tiny model's reads ahead can all run in the previous step's window, so a timed step may see none.
        assert 0 <= row["disk_idle_ms"] <= row["ms"] and 0 <= row["reader_busy_ms"] <= row["ms"]
    layers = {t["config"]: t["layers"] for t in res["timeline"]}
    assert set(layers) == {"exact-sync", "exact-ahead-serial", "exact-ahead"}
    ahead = layers["exact-ahead"]
    # Both of the tiny model's layers are needed.  The reads ahead are counted by ``entries_ahead`` above; the
    # timeline window holds only those that ran inside the recorded step, and on the tiny model they can all
    # have finished in the previous step's window, so the window may hold none.
    assert {x["layer"] for x in ahead["needed"]} == {0, 1}
    assert {r["layer"] for r in ahead["reads"]} <= {0, 1}
    assert all(r["submitted"] <= r["started"] <= r["finished"] for r in ahead["reads"])
    assert "exact-ahead-serial" in (out / "exact_prefetch.md").read_text()


def test_configs_option_rejects_unknown_names(load_benchmark):
    bench = load_benchmark("exact_prefetch")
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--configs", "exact-fast"])
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--configs", "dynamic"])
