"""Smoke tests of benchmarks/sparse_accuracy.py (and the helpers it shares with sparse_speed.py) at tiny sizes (a random
2-layer Llama): every configuration runs end to end and writes its JSON, markdown and plot.  They assert
structure and sanity, never speed or accuracy targets (those live in the benchmarks' own output):
exact tiered decoding equals full attention, the disk tier is really read, and sparse rows are either
measured or marked "sparse mode not available" — never filled with other figures.  They pass with and
without sparse mode in the installed ``tiercache_llm``."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from tiercache_llm.hf_kwargs import cache_kwargs

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def accuracy(load_benchmark):
    return load_benchmark("sparse_accuracy")


@pytest.fixture(scope="module")
def common(load_benchmark):
    return load_benchmark("_common")


def _sparse_ok(run: dict) -> bool:
    """A sparse run is either measured or marked unavailable with the marker; nothing in between."""
    if run["available"]:
        return True
    assert run["note"].startswith("sparse mode not available"), run
    return False


# -- accuracy ------------------------------------------------------------------------------------------------
def test_accuracy_two_jobs_merge_both_parts(tmp_path):
    """``--jobs 2`` (passkey part in a spawned process) gives the same records as one process."""
    import os
    import subprocess

    root = BENCHMARKS.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), str(root / "kernels"), os.environ.get("PYTHONPATH", "")]))
    outs = {}
    for jobs in ("1", "2"):
        out = tmp_path / jobs
        subprocess.run([sys.executable, str(BENCHMARKS / "sparse_accuracy.py"), "--quick", "--threads", "1", "--jobs", jobs,
                        "--out", str(out)], check=True, cwd=root, env=env, capture_output=True)
        outs[jobs] = json.loads((out / "sparse_accuracy.json").read_text())
    one, two = outs["1"], outs["2"]
    assert two["configs"] == one["configs"] and len(two["passkey"]) == len(one["passkey"])
    for a, b in zip(one["passkey"], two["passkey"]):
        assert {k: v["answer"] for k, v in a["runs"].items() if v["available"]} == \
            {k: v["answer"] for k, v in b["runs"].items() if v["available"]}
    for name, run in one["teacher_forcing"]["runs"].items():
        if run.get("available") and "top1_agreement" in run:
            assert two["teacher_forcing"]["runs"][name]["top1_agreement"] == run["top1_agreement"]
    assert two["sparse_available"] == one["sparse_available"]


def test_accuracy_quick_runs_every_configuration(accuracy, tmp_path):
    assert accuracy.main(["--quick", "--out", str(tmp_path), "--threads", "1"]) == 0
    saved = json.loads((tmp_path / "sparse_accuracy.json").read_text())
    s = accuracy.Settings.quick()
    assert len(saved["passkey"]) == s.passkey_cases
    budgets = [f"sparse {100 * b:g}%" for b in s.passkey_budgets]
    assert saved["configs"] == ["full", "exact", *budgets]
    for case in saved["passkey"]:
        full, exact = case["runs"]["full"], case["runs"]["exact"]
        assert exact["success"] == full["success"] and exact["answer"] == full["answer"]  # exact = full attention
        for name in budgets:
            run = case["runs"][name]
            if _sparse_ok(run):
                assert isinstance(run["success"], bool) and "stats" in run
            else:
                assert "success" not in run  # never a figure for a configuration that did not run
    tf = saved["teacher_forcing"]
    assert tf["prefix_tokens"] == s.tf_prefix and tf["steps"] == s.tf_steps
    exact = tf["runs"]["exact"]
    assert exact["top1_agreement"] == 1.0 and exact["mean_kl"] < 1e-4  # exact tiered: the same distributions
    assert len(exact["kl_per_step"]) == s.tf_steps
    measured = []
    for b in s.tf_budgets:
        run = tf["runs"][f"sparse {100 * b:g}%"]
        if _sparse_ok(run):
            measured.append(run)
            assert 0.0 <= run["top1_agreement"] <= 1.0 and math.isfinite(run["mean_kl"]) and run["mean_kl"] >= 0
            assert len(run["per_step"]) == s.tf_steps and run["stats"]
        else:
            assert "top1_agreement" not in run
    assert saved["sparse_available"] == bool(measured)
    md = (tmp_path / "sparse_accuracy.md").read_text()
    assert "Quick run" in md and "| exact | 1.0000 |" in md
    if not measured:
        assert "sparse mode not available" in md
    assert (tmp_path / "sparse_accuracy.png").stat().st_size > 0
    summary = {line["what"]: line for line in saved["summary"]}
    assert summary["passkey, exact tiered (control)"]["met"] is True


def test_accuracy_marks_sparse_rows_when_the_mode_refuses(accuracy, common, tmp_path, monkeypatch):
    """Whatever the installed tiercache_llm offers: a sparse mode that refuses gives marked rows only."""
    real = accuracy.make_tiered

    def refusing(model, mode, **options):
        if mode == "sparse":
            raise common.SparseUnavailable(f"{common.SPARSE_UNAVAILABLE}: refused in this test")
        return real(model, mode, **options)

    monkeypatch.setattr(accuracy, "make_tiered", refusing)
    monkeypatch.setattr(accuracy, "SparseUnavailable", common.SparseUnavailable)
    monkeypatch.setattr(accuracy, "sparse_available", lambda: (True, ""))
    s = accuracy.Settings.quick()
    s.passkey_contexts, s.passkey_depths, s.tf_steps, s.tf_budgets = (96,), (0.5,), 3, (0.25,)
    results = accuracy.run(s, tmp_path, show_progress=False)
    assert results["sparse_available"] is False and "refused in this test" in results["sparse_note"]
    assert results["teacher_forcing"]["runs"]["sparse 25%"] == {"available": False, "note": results["sparse_note"]}
    summary = accuracy.summarise(results, s)
    assert [line["met"] for line in summary if "sparse" in line["what"]] == [None, None, None]


def test_compare_measures_agreement_and_kl(accuracy):
    ref = torch.log_softmax(torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0]]), -1)
    same = accuracy.compare(ref, ref.clone(), torch.tensor([0, 2]))
    assert same["top1_agreement"] == 1.0 and same["mean_kl"] == pytest.approx(0, abs=1e-7)
    assert same["next_token_accuracy"] == 0.5
    other = torch.log_softmax(torch.tensor([[0.0, 2.0, 0.0], [0.0, 3.0, 0.0]]), -1)
    diff = accuracy.compare(ref, other, torch.tensor([0, 1]))
    assert diff["top1_agreement"] == 0.5 and diff["mean_kl"] > 0.1 and diff["kl_per_step"][1] == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("argv", [["--budgets", "0"], ["--budgets", "1.5"], ["--depths", "1.2"], ["--contexts", "x"],
                                  ["--steps", "0"], ["--contexts", "0"]])
def test_accuracy_cli_rejects_bad_options(accuracy, tmp_path, argv):
    with pytest.raises(SystemExit) as exc:
        accuracy.main(["--quick", *argv, "--out", str(tmp_path)])
    assert exc.value.code == 2


def test_english_prose_is_prose():
    sys.path.insert(0, str(BENCHMARKS))
    from _texts import english_prose

    text, topics = english_prose(20_000)
    assert len(text) >= 20_000 and topics
    assert ">>>" not in text and "::" not in text
    assert sum(c.isalpha() or c.isspace() for c in text) > 0.9 * len(text)


# -- shared helpers ------------------------------------------------------------------------------------------
def test_kv_cache_bytes_matches_a_real_cache(common):
    from transformers import DynamicCache

    model = common.tiny_llama()
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(torch.randint(3, 100, (3, 37)), **cache_kwargs(cache, model))
    real = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    assert common.kv_cache_bytes(model.config, 37, 3) == real
    assert common.kv_cache_bytes(model.config, 37, 3, torch.bfloat16) == real // 2


def test_make_tiered_exact_and_sparse_feature_detection(common):
    from tiercache_llm import TieredKVCache

    model = common.tiny_llama()
    cache = common.make_tiered(model, "exact", host=1 << 20)
    try:
        assert isinstance(cache, TieredKVCache)
    finally:
        cache.close()
    available, why = common.sparse_available()
    assert available == hasattr(TieredKVCache, "for_model")
    if not available:
        assert why.startswith(common.SPARSE_UNAVAILABLE)
        with pytest.raises(common.SparseUnavailable, match="sparse mode not available"):
            common.make_tiered(model, "sparse", budget=0.25, host=1 << 20)


def test_stats_readers(common):
    before = {"kv": {"bytes_fetched": 10, "name": "a"}, "sparse": {"reuse_rate": 0.5, "steps": 1}}
    after = {"kv": {"bytes_fetched": 25, "name": "b"}, "sparse": {"reuse_rate": 0.75, "steps": 3, "new": 2}}
    assert common.stats_delta(before, after) == {"kv": {"bytes_fetched": 15, "name": "b"},
                                                  "sparse": {"reuse_rate": 0.25, "steps": 2, "new": 2}}
    assert common.find_numbers(after, "reuse", "FETCH") == {"kv.bytes_fetched": 25.0, "sparse.reuse_rate": 0.75}
    assert common.reuse_rate(after) == 0.75
    assert common.reuse_rate({"kv": {"x": 1}}) is None
    assert common.tier_row({"tiercache": {"tiers": {"disk": {"bytes_read": 3}}}}, "disk") == {"bytes_read": 3}


def test_accuracy_reports_a_failing_sparse_cache_and_goes_on(accuracy, tmp_path, monkeypatch):
    real = accuracy.make_tiered

    def broken(model, mode, **options):
        if mode == "sparse":
            raise TypeError("unexpected option")
        return real(model, mode, **options)

    monkeypatch.setattr(accuracy, "make_tiered", broken)
    monkeypatch.setattr(accuracy, "sparse_available", lambda: (True, ""))
    s = accuracy.Settings.quick()
    s.passkey_contexts, s.passkey_depths, s.tf_steps, s.tf_budgets = (96,), (0.5,), 3, (0.25,)
    results = accuracy.run(s, tmp_path, show_progress=False)
    failed = [results["teacher_forcing"]["runs"]["sparse 25%"], *(results["passkey"][0]["runs"][f"sparse {b}%"]
                                                                  for b in ("12.5", "25"))]
    assert all(r["available"] is False and r["note"] == "error: TypeError: unexpected option" and r["traceback"]
               for r in failed)
    assert results["teacher_forcing"]["runs"]["exact"]["top1_agreement"] == 1.0  # the rest still ran


def test_accuracy_tf_only_window(accuracy, tmp_path):
    """``--tf-only --offset N``: no passkey part, teacher forcing on the window ``N`` tokens into the text (the
    same ids as the default window's shifted by ``N``)."""
    s = accuracy.Settings.quick()
    assert accuracy.main(["--quick", "--tf-only", "--offset", "5", "--budgets", "0.25", "--out", str(tmp_path),
                          "--threads", "1"]) == 0
    saved = json.loads((tmp_path / "sparse_accuracy.json").read_text())
    assert saved["passkey"] == [] and saved["meta"]["settings"]["tf_offset"] == 5
    tf = saved["teacher_forcing"]
    assert set(tf["runs"]) == {"full", "exact", "sparse 25%"} and tf["runs"]["exact"]["top1_agreement"] == 1.0
    s.tf_offset = 5
    shifted, _ = accuracy.prose_ids(s, None, 64)
    s.tf_offset = 0
    base, _ = accuracy.prose_ids(accuracy.Settings.quick(), None, 64)
    assert shifted.shape == base.shape
    s0 = accuracy.Settings.quick()
    s0.tf_steps += 5
    longer, _ = accuracy.prose_ids(s0, None, 64)
    assert torch.equal(shifted, longer[:, 5:])
    assert (tmp_path / "sparse_accuracy.png").stat().st_size > 0
