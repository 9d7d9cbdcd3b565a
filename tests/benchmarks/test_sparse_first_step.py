"""Smoke tests of benchmarks/sparse_first_step.py at tiny sizes (the random 2-layer Llama): every variant's
first and later steps are recorded, the legacy twin runs beside the current pipeline, and bad options are
refused.  Structure only, never speed."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def first_step(load_benchmark):
    return load_benchmark("sparse_first_step")


def test_first_step_tiny_run_writes_every_variant(first_step, tmp_path):
    from _common import sparse_available

    if not sparse_available()[0]:
        pytest.skip("sparse mode not available")
    specs = ["attention-aware:legacy=true:warm_first_step=false", "attention-aware"]
    argv = ["--model", "tiny", "--context", "160", "--batch", "2", "--block-size", "16", "--rounds", "1",
            "--steps", "2", "--out", str(tmp_path / "out")]
    for spec in specs:
        argv += ["--variant", spec]
    assert first_step.main(argv) == 0
    saved = json.loads((tmp_path / "out" / "sparse_first_step.json").read_text())
    assert saved["model"] == "tiny" and saved["batch"] == 2 and [v["spec"] for v in saved["variants"]] == specs
    for v in saved["variants"]:
        assert v["first_ms"] > 0 and v["later_ms"] > 0 and len(v["rounds"]) == 1
        assert len(v["rounds"][0]["later_ms"]) == 2
    assert saved["variants"][0]["first_ratio"] == 1.0  # the first variant of a strategy is its base
    md = (tmp_path / "out" / "sparse_first_step.md").read_text()
    assert all(f"| `{spec}` |" in md for spec in specs)


@pytest.mark.parametrize("argv", [[], ["--variant", "exact"], ["--variant", "attention-aware", "--rounds", "0"]])
def test_first_step_cli_rejects_bad_options(first_step, argv):
    with pytest.raises(SystemExit) as exc:
        first_step.main(["--model", "tiny", *argv])
    assert exc.value.code == 2
