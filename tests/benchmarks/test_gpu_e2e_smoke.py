"""benchmarks/gpu_e2e.py: the CPU ``--tiny`` run end to end (every configuration measured, JSON and markdown
written, exact tiered decoding equal to DynamicCache, the SSD configuration really reading the disk tier),
and on a GPU (``gpu`` marker) a short run of the real Llama-3-8B-shaped configuration at one small
context - the standing GPU check that the tiered caches, the compiled Triton attention and the sparse
strategies run together.  Structure and sanity only; speed figures live in the benchmark's output."""

from __future__ import annotations

import json

import pytest
import torch


@pytest.fixture(scope="module")
def e2e(load_benchmark):
    return load_benchmark("gpu_e2e")


def _check(result: dict, *, ssd: bool) -> None:
    runs = result["runs"]
    assert runs and "Cache.update" in result["fill"]
    for r in runs:
        assert r["status"] in ("ok", "skipped"), (r["label"], r.get("reason"), r.get("traceback"))
        if r["status"] == "skipped":
            assert r["reason"]
            continue
        assert r["ms_per_step"] > 0 and len(r["step_ms"]) >= 1
        assert all(len(t) == r["config"]["batch"] for t in r["tokens"])
        if r["config"]["system"] == "exact":
            assert r["tokens_equal_dynamic"] is True, r["label"]
        if r["config"]["system"] in ("fetch-every-step", "reuse-layer-ahead", "attention-aware"):
            sparse = r["stats"]["sparse"]
            assert sparse["settings"]["strategy"] == r["config"]["system"]
            assert sparse["total"]["steps"] >= 2  # the untimed step and the timed ones ran sparse
            assert sparse["total"]["blocks_selected"] > 0, r["label"]
            if r["config"]["system"] == "fetch-every-step":  # the others may serve a step from reused/staged blocks
                assert sum(r["sparse_bytes_fetched"].values()) > 0, r["label"]
        if r["config"]["tiers"] != "-" and r["config"]["system"] in ("exact", "fetch-every-step"):
            assert sum(r["bytes_read_per_tier"].values()) > 0, r["label"]
    if ssd:
        ssd_runs = [r for r in runs if "ssd" in r["config"]["tiers"] and r["status"] == "ok"]
        assert {r["config"]["system"] for r in ssd_runs} == {"exact", "fetch-every-step", "reuse-layer-ahead",
                                                              "attention-aware"}
        for r in ssd_runs:  # (3b)/(4) may serve the few timed steps of a tiny context from reused blocks
            if r["config"]["system"] in ("exact", "fetch-every-step"):
                assert r["bytes_read_per_tier"].get("disk", 0) > 0, r["label"]


def test_tiny_run_on_cpu_writes_json_and_markdown(e2e, tmp_path, capsys):
    code = e2e.main(["--tiny", "--contexts", "128", "--batches", "1,2", "--steps", "1", "--out", str(tmp_path)])
    assert code == 0, capsys.readouterr().err
    result = json.loads((tmp_path / "gpu_e2e.json").read_text())
    assert result["device"] == "cpu" and result["settings"]["tiny"]
    assert all(r["status"] == "ok" for r in result["runs"])  # nothing is too big for the tiny config
    assert {r["config"]["system"] for r in result["runs"]} == {"dynamic", "exact", "fetch-every-step",
                                                               "reuse-layer-ahead", "attention-aware"}
    _check(result, ssd=True)
    assert [row["batch"] for row in result["attention_microbench"]] == [1, 2]
    assert all(row["torch_ms"] > 0 and "triton_ms" not in row for row in result["attention_microbench"])
    md = (tmp_path / "gpu_e2e.md").read_text()
    assert md.count("\n| 128 |") == len(result["runs"])


def test_without_cuda_the_full_run_exits_2(e2e, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available")
    assert e2e.main(["--out", str(tmp_path)]) == 2
    assert not (tmp_path / "gpu_e2e.json").exists()


def test_a_run_over_its_time_budget_records_skips(e2e, tmp_path):
    code = e2e.main(["--tiny", "--contexts", "128", "--batches", "1", "--steps", "1", "--time-budget", "0",
                     "--out", str(tmp_path)])
    assert code == 0
    runs = json.loads((tmp_path / "gpu_e2e.json").read_text())["runs"]
    assert runs and all(r["status"] == "skipped" and "time budget" in r["reason"] for r in runs)


def test_dry_run_plans_within_the_time_budget(e2e, capsys):
    """The default plan, priced with the script's own estimates on an assumed H100 machine: the largest
    points are refused for memory, and what is planned fits the 540 s budget."""
    assert e2e.main(["--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    runs = [line for line in lines if line.startswith("run ")]
    assert any("attention-aware @ 32K x1 [gpu+host+ssd]" in line for line in runs)
    assert any(line.startswith("skip  exact @ 128K x8") and "host memory" in line for line in lines)
    total = float(lines[-1].split(":")[1].split()[0])
    assert total <= 540


@pytest.mark.gpu
def test_llama8b_shape_short_run_on_gpu(e2e, tmp_path):
    code = e2e.main(["--contexts", "4096", "--batches", "1", "--steps", "2", "--time-budget", "240",
                     "--out", str(tmp_path)])
    assert code == 0
    result = json.loads((tmp_path / "gpu_e2e.json").read_text())
    assert result["device"].startswith("cuda")
    _check(result, ssd=True)
    assert any(r["config"]["system"] == "dynamic-offload" and r["status"] == "ok" for r in result["runs"])
    (row,) = result["attention_microbench"]
    assert row["triton_ms"] > 0 and row["max_abs_diff"] < 5e-2  # bf16 output, float32 accumulation
