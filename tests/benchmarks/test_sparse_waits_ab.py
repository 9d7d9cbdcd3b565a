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
    counts = runs[0]["counts"]  # entries per step by how they were served, per round
    assert len(counts) == 2 and all(set(bench.COUNTS) <= set(c) for c in counts)
    assert all(c["pipeline.reused"] + c["pipeline.staged"] + c["pipeline.sync.disk"] + c["pipeline.sync.host"] > 0
               for c in counts)


def test_threads_must_be_positive(load_benchmark):
    bench = load_benchmark("sparse_waits_ab")
    try:
        bench.main(["--model", "tiny", "--threads", "0", "--variant", "attention-aware"])
    except SystemExit as exc:
        assert exc.code == 2
    else:
        raise AssertionError("--threads 0 was accepted")
