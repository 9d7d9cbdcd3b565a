"""Smoke test of benchmarks/sparse_waits_ab.py with the tiny model: the variants decode the same tokens (exit
status 0) and every round is written.  No speed is asserted."""

from __future__ import annotations

import json


def test_tiny_run_times_every_variant(load_benchmark, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    bench = load_benchmark("sparse_waits_ab")
    out = tmp_path / "rounds.json"
    assert bench.main(["--model", "tiny", "--context", "256", "--batch", "2", "--block-size", "16", "--rounds", "2",
                       "--run", "1", "--warmup", "1", "--variant", "attention-aware",
                       "--variant", "attention-aware:slot_reads_after_sync=false", "--json", str(out)]) == 0
    runs = json.loads(out.read_text())
    assert [r["spec"] for r in runs] == ["attention-aware", "attention-aware:slot_reads_after_sync=false"]
    assert all(len(r["ms"]) == 2 and all(ms > 0 for ms in r["ms"]) for r in runs)
    assert runs[0]["tokens"] == runs[1]["tokens"]
