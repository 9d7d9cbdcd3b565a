"""Smoke test of benchmarks/sparse_threads_ab.py with the tiny model: every cache is timed under every config and
every round is written; the library's CACHE_OPS_THREADS is restored afterwards.  No speed is asserted."""

from __future__ import annotations

import json

import pytest

from tiercache_llm import sparse_layer


def test_tiny_run_times_every_config(load_benchmark, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    bench = load_benchmark("sparse_threads_ab")
    out = tmp_path / "rounds.json"
    before = sparse_layer.CACHE_OPS_THREADS
    assert bench.main(["--model", "tiny", "--context", "256", "--batch", "2", "--block-size", "16", "--rounds", "2",
                       "--run", "1", "--strategy", "attention-aware", "--strategy", "fetch-every-step",
                       "--config", "1", "--config", "2:free", "--config", "2:pin=1", "--json", str(out)]) == 0
    assert sparse_layer.CACHE_OPS_THREADS == before
    data = json.loads(out.read_text())
    assert data["configs"] == ["1", "2:free", "2:pin=1"]
    assert [r["system"] for r in data["runs"]] == ["dynamic", "attention-aware", "fetch-every-step"]
    for r in data["runs"]:
        for spec in data["configs"]:
            by = r["by"][spec]
            assert len(by["ms"]) == 2 and all(ms > 0 for ms in by["ms"])
            assert len(by["stages"]) == 2 and len(by["other"]) == 2 and len(by["load"]) == 2
        if r["system"] != "dynamic":
            assert all(st.get("sparse.total.attention_seconds", 0) > 0 for st in r["by"]["1"]["stages"])


def test_configs_parse_and_bad_ones_are_refused(load_benchmark):
    bench = load_benchmark("sparse_threads_ab")
    assert bench.parse_config("2") == (2, "default")
    assert bench.parse_config("2:free") == (2, None)
    assert bench.parse_config("4:pin=2") == (4, 2)
    for bad in ("0", "2:pin=0", "two", "2:pin", "2:fixed"):
        with pytest.raises(ValueError):
            bench.parse_config(bad)
