"""Smoke test of benchmarks/sparse_joint_ab.py on a tiny synthetic config: the two-entry and joint caches decode
the same logits, the joint one reads half the entries, and the JSON holds every step.  Structure only, never
speed."""

from __future__ import annotations

import json

import pytest


def test_joint_and_two_entry_caches_decode_alike_and_the_joint_one_reads_half_the_entries(load_benchmark, tmp_path):
    ab = load_benchmark("sparse_joint_ab")
    from _common import sparse_available

    if not sparse_available()[0]:
        pytest.skip("sparse mode not available")
    out = tmp_path / "ab.json"
    assert ab.main(["--synthetic", "400", "--synthetic-layers", "2", "--steps", "2", "--warmup", "0",
                    "--strategies", "fetch-every-step,attention-aware,exact", "--workdir", str(tmp_path),
                    "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert [r["strategy"] for r in results] == ["fetch-every-step", "attention-aware", "exact"]
    for r in results:
        assert r["identical"] and r["max_abs_diff"] == 0
        assert all(len(run["ms"]) == len(run["steps"]) == 2 for run in r["runs"].values())
    for r in results[:2]:
        two, joint = r["runs"]["two"]["medians"], r["runs"]["joint"]["medians"]
        assert joint["needed_entries"] * 2 == two["needed_entries"] > 0
    assert list(results[2]["runs"]) == ["joint"]
