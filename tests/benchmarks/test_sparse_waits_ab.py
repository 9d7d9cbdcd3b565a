"""Smoke test of benchmarks/sparse_waits_ab.py with the tiny model: the variants decode the same tokens (exit
status 0) and every round is written.  No speed is asserted."""

from __future__ import annotations

import json
import sys
import threading
import time


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
    for r in runs:  # per round: the other threads' CPU by name; on Linux the run-queue wait and context switches
        assert len(r["bg"]) == 2 and all(isinstance(b, dict) for b in r["bg"])
        if sys.platform.startswith("linux"):
            assert len(r["queued"]) == 2 and all(q >= 0 for q in r["queued"])
            assert len(r["switches"]) == 2 and all(len(x) == 2 and min(x) >= 0 for x in r["switches"])


def test_thread_groups_and_the_thread_clocks(load_benchmark):
    bench = load_benchmark("sparse_waits_ab")
    assert bench.thread_group("tiercache-kv-stage_1") == "tiercache-kv-stage"
    assert bench.thread_group("MainThread") == "MainThread"
    done = threading.Event()
    t = threading.Thread(target=lambda: (sum(range(200_000)), done.wait(10)), name="probe_3")
    t.start()
    try:
        while t.native_id is None:
            time.sleep(0.001)
        time.sleep(0.05)
        cpu = bench.thread_cpu()
        assert "probe" in cpu and cpu["probe"] > 0  # its CPU counted under its group; the caller's own excluded
        assert "MainThread" not in cpu
    finally:
        done.set()
        t.join()
    if sys.platform.startswith("linux"):
        assert bench.run_queue_seconds() >= 0
        vol, invol = bench.context_switches()
        assert vol >= 0 and invol >= 0


def test_threads_must_be_positive(load_benchmark):
    bench = load_benchmark("sparse_waits_ab")
    try:
        bench.main(["--model", "tiny", "--threads", "0", "--variant", "attention-aware"])
    except SystemExit as exc:
        assert exc.code == 2
    else:
        raise AssertionError("--threads 0 was accepted")


def test_old_tree_variants_run_that_trees_pipeline(load_benchmark, tmp_path, monkeypatch):
    """``--old-tree DIR`` with ``old:STRATEGY``: the cache runs DIR's decode pipeline (here this very tree, loaded a
    second time as ``_old_sparse``), decoding the tokens the current one decodes."""
    from pathlib import Path

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    bench = load_benchmark("sparse_waits_ab")
    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "rounds.json"
    assert bench.main(["--model", "tiny", "--context", "256", "--batch", "2", "--block-size", "16", "--rounds", "2",
                       "--run", "1", "--warmup", "1", "--old-tree", str(root), "--variant", "attention-aware",
                       "--variant", "old:attention-aware", "--json", str(out)]) == 0
    runs = json.loads(out.read_text())
    assert [r["spec"] for r in runs] == ["attention-aware", "old:attention-aware"]
    assert runs[0]["tokens"] == runs[1]["tokens"]
    import sys

    assert sys.modules["_old_sparse.pipeline"].__file__ == str(root / "tiercache_llm" / "sparse" / "pipeline.py")


def test_old_variants_need_an_old_tree(load_benchmark):
    bench = load_benchmark("sparse_waits_ab")
    try:
        bench.main(["--model", "tiny", "--variant", "old:attention-aware"])
    except SystemExit as exc:
        assert exc.code == 2
    else:
        raise AssertionError("old:... without --old-tree was accepted")
