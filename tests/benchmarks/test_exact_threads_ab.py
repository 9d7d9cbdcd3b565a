"""Smoke test of benchmarks/exact_threads_ab.py with the tiny model: every variant decodes the same greedy
tokens as DynamicCache (the script exits otherwise) and the outputs are written.  No speed is asserted."""

from __future__ import annotations

import json


def test_tiny_run_compares_every_variant(load_benchmark, tmp_path, monkeypatch):
    monkeypatch.setenv("AB_VARIANTS", "forced-idle:IDLE=True")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    bench = load_benchmark("exact_threads_ab")
    assert bench.main(["--model", "tiny", "--contexts", "64", "--threads", "1", "--repeats", "1", "--steps", "2",
                       "--out", str(tmp_path / "out")]) == 0
    rows = json.loads((tmp_path / "out" / "exact_threads_ab.json").read_text())["rows"]
    tiered = [r for r in rows if r["config"] != "dynamic"]
    assert {(r["config"], r["variant"]) for r in tiered} == {
        (c, v) for c in ("disk-warm", "disk-cold") for v in ("old", "new", "forced-idle")}
    assert all(r["tokens_match"] for r in rows)
    assert all(r["plain_ms_per_step"] > 0 for r in rows)
    assert "| variant |" in (tmp_path / "out" / "exact_threads_ab.md").read_text()


def test_tiny_run_of_the_all_in_host_configuration(load_benchmark, tmp_path, monkeypatch):
    """``--configs host`` (hot-path row 1: all KV in the host tier) runs both variants, whose greedy tokens
    equal DynamicCache's; with no disk configuration there is no plain-read baseline (NaN)."""
    monkeypatch.delenv("AB_VARIANTS", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    bench = load_benchmark("exact_threads_ab")
    assert bench.main(["--model", "tiny", "--configs", "host", "--contexts", "64", "--threads", "1",
                       "--repeats", "1", "--steps", "2", "--out", str(tmp_path / "out")]) == 0
    rows = json.loads((tmp_path / "out" / "exact_threads_ab.json").read_text())["rows"]
    assert {(r["config"], r["variant"]) for r in rows if r["config"] != "dynamic"} == {("host", "old"), ("host", "new")}
    assert all(r["tokens_match"] for r in rows)
    assert all(r["plain_ms_per_step"] != r["plain_ms_per_step"] for r in rows)  # NaN: no disk configuration


def test_tiny_run_of_dynamic_under_omp_teams_and_thread_groups(load_benchmark, tmp_path, monkeypatch):
    """``--configs dynamic`` runs DynamicCache under every variant that sets something (here ``OMP_TEAMS``: idle
    threads holding OpenMP teams of their own, joined when the run ends), ``--variants`` picks the variants, and
    each row carries the per-thread-group schedstat times (the main thread as ``forward``)."""
    import threading

    monkeypatch.setenv("AB_VARIANTS", "teams:OMP_TEAMS=2")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    bench = load_benchmark("exact_threads_ab")
    assert bench.main(["--model", "tiny", "--configs", "dynamic,disk-cold", "--variants", "new,teams", "--contexts",
                       "64", "--threads", "2", "--repeats", "1", "--steps", "3", "--out", str(tmp_path / "out")]) == 0
    rows = json.loads((tmp_path / "out" / "exact_threads_ab.json").read_text())["rows"]
    assert {(r["config"], r["variant"]) for r in rows} == {
        ("dynamic", "-"), ("dynamic", "teams"), ("disk-cold", "new"), ("disk-cold", "teams")}
    assert all(r["tokens_match"] for r in rows)
    import os

    if os.path.isdir("/proc/self/task"):  # Linux: per-thread schedstat (elsewhere the table stays empty)
        assert all("forward" in r["threads_ms"] and len(r["threads_ms"]["forward"]) == 3 for r in rows)
    assert not [t for t in threading.enumerate() if t.name.startswith("omp-team-")]
    assert "Per thread group" in (tmp_path / "out" / "exact_threads_ab.md").read_text()


def test_unknown_variant_is_refused(load_benchmark, monkeypatch):
    import pytest

    monkeypatch.delenv("AB_VARIANTS", raising=False)
    bench = load_benchmark("exact_threads_ab")
    with pytest.raises(SystemExit):
        bench.main(["--model", "tiny", "--variants", "nosuch"])
