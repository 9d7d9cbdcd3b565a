"""Smoke tests of benchmarks/sparse_variants.py at tiny sizes (the random 2-layer Llama): pipeline overrides
reach the cache through ``sparse_speed.build_cache(pipeline=...)``, every variant decodes its steps and the
outputs hold every step.  Structure only, never speed."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def variants(load_benchmark):
    return load_benchmark("sparse_variants")


def _kv(model, tokens: int = 96, batch: int = 1):
    """Prefilled K/V of random ids (``benchmarks/`` is on ``sys.path`` once sparse_variants is loaded)."""
    import torch
    import sparse_speed as sp

    ids = torch.randint(3, model.config.vocab_size, (batch, tokens), generator=torch.Generator().manual_seed(0))
    return sp.point_kv(sp.prefill_rows(model, ids, [tokens] * batch), batch, tokens)


def test_build_cache_passes_pipeline_overrides_to_sparse_caches_only(variants, tmp_path):
    from _common import sparse_available, tiny_llama
    import sparse_speed as sp

    if not sparse_available()[0]:
        pytest.skip("sparse mode not available")
    model = tiny_llama()
    kv = _kv(model)
    s = sp.Settings(block_size=16)
    cfg = sp.Config("attention-aware", 0.25, "cold")
    default = sp.build_cache(model, cfg, kv, s, tmp_path / "a")
    try:
        assert default.settings.pipeline is None  # no overrides: the strategy's defaults, as before
    finally:
        default.close()
    tuned = sp.build_cache(model, cfg, kv, s, tmp_path / "b", pipeline={"stage_ahead": 0})
    try:
        assert tuned.settings.pipeline.stage_ahead == 0
    finally:
        tuned.close()
    exact = sp.build_cache(model, sp.Config("exact", None, "cold"), kv, s, tmp_path / "c", pipeline={"stage_ahead": 0})
    exact.close()  # ignored for exact caches (the cache would refuse pipeline= there)


def test_variants_tiny_run_writes_every_step(variants, tmp_path):
    from _common import sparse_available

    if not sparse_available()[0]:
        pytest.skip("sparse mode not available")
    specs = ["attention-aware", "attention-aware:stage_ahead=0"]
    argv = ["--model", "tiny", "--context", "160", "--batch", "2", "--block-size", "16", "--steps", "2",
            "--out", str(tmp_path / "out"), "--json", str(tmp_path / "steps.json"), "--prefill-cache", str(tmp_path / "pc")]
    for spec in specs:
        argv += ["--variant", spec]
    assert variants.main(argv) == 0
    saved = json.loads((tmp_path / "out" / "sparse_variants.json").read_text())
    assert saved["model"] == "tiny" and saved["batch"] == 2 and [v["spec"] for v in saved["variants"]] == specs
    for v in saved["variants"]:
        assert len(v["ms"]) == len(v["cpu_ms"]) == len(v["stages"]) == len(v["pipe"]) == 2 and all(ms > 0 for ms in v["ms"])
        assert all(0 < cpu for cpu in v["cpu_ms"]) and v["medians"]["cpu_ms_per_step"] > 0
        assert v["medians"]["ms_per_step"] > 0 and set(variants.KEYS) <= set(v["medians"])
        assert v["pipe"][-1]["needed"] > 0  # the pipeline ran
        assert all("mib_fetched" in p for p in v["pipe"])  # MiB read per tier, per step
        assert {"host_mib_per_step", "disk_mib_per_step"} <= set(v["medians"])
        assert v["medians"]["promoted_mib_per_step"] == 0  # off by default
    steps = json.loads((tmp_path / "steps.json").read_text())
    assert [s["spec"] for s in steps] == specs and steps[0]["ms"] == saved["variants"][0]["ms"]
    md = (tmp_path / "out" / "sparse_variants.md").read_text()
    assert all(f"| `{spec}` |" in md for spec in specs)
    assert len(list((tmp_path / "pc").glob("prefill_*.pt"))) == 1  # prefill kept for the next run


@pytest.mark.parametrize("argv", [[], ["--variant", "no-such-strategy"], ["--variant", "attention-aware:stage_ahead"],
                                  ["--variant", "attention-aware", "--steps", "0"]])
def test_variants_cli_rejects_bad_options(variants, argv):
    with pytest.raises(SystemExit) as exc:
        variants.main(["--model", "tiny", *argv])
    assert exc.value.code == 2
