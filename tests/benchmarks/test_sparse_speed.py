"""Smoke tests of benchmarks/sparse_speed.py at tiny sizes (random models): every row runs end to end and
writes its JSON, markdown and plot.  They assert structure and sanity -- exact tiered decodes
DynamicCache's logits, the disk tier is really read, a 25 % budget reads fewer bytes than exact, sparse
rows are measured or marked, never filled with other figures -- and never speed targets (those live in
the benchmark's own output)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tiercache_llm.hf_kwargs import cache_kwargs


@pytest.fixture(scope="module")
def speed(load_benchmark):
    return load_benchmark("sparse_speed")


def _sparse_ok(run: dict) -> bool:
    if run["available"]:
        return True
    assert run["note"].startswith(("sparse mode not available", "error: ")), run
    return False


def test_quick_run_covers_every_row(speed, tmp_path):
    argv = ["--quick", "--contexts", "160,256", "--batches", "1,2", "--full-points", "256x2", "--synthetic", "200",
            "--synthetic-layers", "3", "--out", str(tmp_path)]
    assert speed.main(argv) == 0
    saved = json.loads((tmp_path / "sparse_speed.json").read_text())
    rows = saved["rows"]
    s = speed.Settings.quick()
    smol = {(r["requested_context"], r["batch"]) for r in rows if r["model"] == "tiny"}
    assert smol == {(160, 1), (160, 2), (256, 1), (256, 2)}
    assert {(r["requested_context"], r["batch"]) for r in rows if r["model"] == "synthetic"} == {(200, 1)}
    full = [r for r in rows if r["model"] == "tiny" and (r["requested_context"], r["batch"]) == (256, 2)]
    light = [r for r in rows if r["model"] == "tiny" and (r["requested_context"], r["batch"]) == (160, 1)]
    # the full point: every system, every distinct budget, warm runs; the light one: the headline budget, cold
    assert {r["system"] for r in full} == set(speed.SYSTEMS) and {r["system"] for r in light} == set(speed.SYSTEMS)
    assert {r["state"] for r in full} == {None, "cold", "warm"} and {r["state"] for r in light} == {None, "cold"}
    budgets = {speed.budget_label(r["budget"]) for r in full if r["budget"] is not None}
    assert budgets == {"96 tokens", "6.25%", "25%"}
    assert {speed.budget_label(r["budget"]) for r in light if r["budget"] is not None} == {"25%"}
    kv_per_token = saved["meta"]["info"]["kv_bytes_per_token"]
    by = {(r["model"], r["requested_context"], r["batch"], r["system"], str(r["budget"]), r["state"]): r for r in rows}
    for key, r in by.items():
        if r["system"] in speed.SPARSE and not _sparse_ok(r):
            assert math.isnan(r["ms_per_step"]) and r["samples_ms"] == []
            continue
        assert len(r["samples_ms"]) == s.steps * s.repeats and all(ms > 0 for ms in r["samples_ms"]), r
        assert r["tokens_per_s"] == pytest.approx(r["batch"] * 1000 / r["ms_per_step"])
        assert r["first_step_ms"] > 0, r  # the first step after every round's fill (the warm-up step)
        if r["system"] == speed.DYNAMIC:
            continue
        if r["state"] == "cold":
            assert r["cold_method"] in ("direct_io", "fadvise")
            if r["system"] in (speed.EXACT, speed.FETCH):  # (3b) and (4) may serve a step from staged / reused blocks
                assert r["disk_bytes"] > 0  # the host tier holds 25 % of the KV: the rest is read from disk
                # no reads for a later step outside its own (exact: capped at the reads since the last step)
                assert r["disk_tier_bytes"] >= r["disk_bytes"]  # reads since the previous step include the step's
        assert r["stages_ms"], r
        if r["system"] == speed.EXACT:
            kv = kv_per_token * r["context"] * r["batch"] if r["model"] == "tiny" else None
            assert r["top1_vs_reference"] == 1.0 and r["max_abs_logit_diff"] <= speed.LOGIT_TOL
            if kv:
                assert kv * 0.85 <= r["host_bytes"] + r["disk_bytes"] <= kv * 1.1  # exact reads the whole KV per step
        elif r["model"] == "tiny" and r["budget"] == 0.25:
            exact = by[(r["model"], r["requested_context"], r["batch"], speed.EXACT, "None", "cold")]
            assert r["host_bytes"] + r["disk_bytes"] < exact["host_bytes"] + exact["disk_bytes"]
    # (3b) and (4) read blocks for the next step in the background: one can finish inside the previous step's
    # span, or (staging started by the fill) before a fresh cache's first step, so steps can count more disk
    # bytes than the tier read in them.  Over a cache's life (the last round's, whose stats() are kept) the
    # tier must have read at least what its steps counted as disk.
    from _common import tier_row

    for run in saved["runs"]:
        if run["state"] == "cold" and run["steps"]:
            last = [st for st in run["steps"] if st["round"] == s.repeats - 1]
            assert tier_row(run["stats"], "disk")["bytes_read"] >= sum(st["disk_bytes"] for st in last), run["label"]
    goals = saved["targets"]
    whats = [g["what"] for g in goals]
    assert any("(4) attention-aware vs (3) fetch-every-step" in w for w in whats)
    assert any("(3b)" in w for w in whats) and any("raw bandwidth" in w for w in whats)
    check = next(g for g in goals if "page cache decodes correctly" in g["what"])
    # exact, direct_io: disk-served and equal to DynamicCache; a filesystem that refuses O_DIRECT (tmpfs
    # before Linux 6.6) makes the cold runs drop the page cache instead, which the target does not accept
    direct = by[("tiny", 256, 2, speed.EXACT, "None", "cold")]["cold_method"] == "direct_io"
    assert check["met"] is direct, check
    bw = saved["meta"]["info"]["bandwidth"]["256x2"]
    assert ("error" not in bw["disk"]) is direct, bw
    assert bw["host_bytes_per_s"] and (not direct or bw["disk"]["bytes"] > 0 and bw["disk"]["bytes_per_s"] > 0)
    # one fill per round, and every round's first step (the untimed warm-up) is recorded
    for run in saved["runs"]:
        if run["available"]:
            assert len(run["fill_seconds_rounds"]) == s.repeats, run["label"]
            assert 0 < run["max_anon_bytes"] <= run["max_rss_bytes"], run["label"]
            firsts = [st for st in run["steps"] if st["step"] == 0]
            assert [st["round"] for st in firsts] == list(range(s.repeats)) and all(st.get("warmup") for st in firsts)
    memory = saved["meta"]["info"]["memory"]
    assert memory["peak_rss_bytes"] >= max(p["peak_rss_bytes"] for p in memory["points"].values()) > 0
    assert set(memory["points"]) == {"tiny 160x1", "tiny 160x2", "tiny 256x1", "tiny 256x2", "synthetic 200x1"}
    # every sparse row decodes under the default pool bound (the host tier's budget), and says so
    for run in saved["runs"]:
        if run["system"] in speed.SPARSE and run["stats"]:
            pipe, host = run["stats"]["pipeline"], tier_row(run["stats"], "host")["capacity_bytes"]
            assert pipe["pool_bound_bytes"] == host > 0 and pipe["pool_bound_source"].startswith("auto: the host"), run["label"]
    for r in rows:
        assert (r["pool_bound_source"] != "") == (r["system"] in speed.SPARSE and _sparse_ok(r)), r["label"]
    md = (tmp_path / "sparse_speed.md").read_text()
    assert "pool bound MiB" in md and "(auto) |" in md
    assert "Peak RSS of the run" in md and "first step ms" in md and "one cache alive at a time" in md
    assert "Quick run" in md and "## Targets" in md and "(3b) reuse-layer-ahead" in md and "synthetic" in md
    assert (tmp_path / "sparse_speed.png").stat().st_size > 0


def test_fill_cache_equals_prefill_through_the_model(speed, tmp_path):
    """A sparse cache given prefilled K/V by fill_cache decodes exactly like one prefilled by the model."""
    from _common import tiny_llama  # the conftest loader put benchmarks/ on sys.path
    from transformers import DynamicCache

    model = tiny_llama()
    ids = torch.randint(3, 100, (2, 300), generator=torch.Generator().manual_seed(1))
    dyn = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids[:, :-1], **cache_kwargs(dyn, model))
    kv = [(layer.keys.clone(), layer.values.clone()) for layer in dyn.layers]
    s = speed.Settings.quick()
    cfg = speed.Config(speed.FETCH, 0.25, "cold")
    filled = speed.build_cache(model, cfg, kv, s, tmp_path / "a")
    prefilled = speed.build_cache(model, speed.Config(speed.EXACT, None, "cold"), kv, s, tmp_path / "b")
    prefilled.close()
    from _common import make_tiered

    through = make_tiered(model, "sparse", budget=0.25, strategy=speed.FETCH, host=1 << 20, disk=1 << 26,
                          path=tmp_path / "c", block_size=s.block_size)
    try:
        with torch.no_grad():
            model(input_ids=ids[:, :-1], **cache_kwargs(through, model))
            feed = ids[:, -1:]
            for _ in range(3):
                a = model(input_ids=feed, **cache_kwargs(filled, model)).logits[:, -1]
                b = model(input_ids=feed, **cache_kwargs(through, model)).logits[:, -1]
                torch.testing.assert_close(a, b)
                feed = a.argmax(-1, keepdim=True)
        assert filled.stats()["sparse"]["total"]["steps"] == 3
    finally:
        filled.close()
        through.close()


def test_targets_are_judged_on_ratios(speed):
    def row(system, budget, ms, state="cold", available=True, **kw):
        fields = dict(model="smollm2", context=8177, requested_context=8192, batch=4, threads=1, label=system,
                      system=system, budget=budget, state=state, available=available,
                      note=None if available else "sparse mode not available: x", cold_method="direct_io",
                      ms_per_step=ms, tokens_per_s=4000 / ms, host_bytes=100 * 2**20, disk_bytes=300 * 2**20,
                      stages_ms={}, reuse_rate=None, top1_vs_reference=1.0, max_abs_logit_diff=0.0, samples_ms=[ms])
        fields.update(kw)
        return speed.Row(**fields)

    s = speed.Settings(budgets=(0.25,), threads=(1,))
    info = {"budget_merges": {"8192x4": {}}, "kv_bytes_per_token": 46080,
            "bandwidth": {"8192x4": {"disk": {"bytes_per_s": 300 * 2**20 / 0.5}, "host_bytes_per_s": {"1": 100 * 2**20 / 0.1},
                                     "host_capacity": 2**28}}}
    rows = [row(speed.EXACT, None, 900.0), row(speed.FETCH, 0.25, 400.0), row(speed.REUSE, 0.25, 300.0),
            row(speed.AWARE, 0.25, 200.0)]
    goals = speed.targets(rows, info, s)
    got = {g["what"]: g for g in goals}
    fetch = got["issue 9: (4) attention-aware vs (3) fetch-every-step, 25%"]
    exact = got["issue 9: (4) attention-aware vs (2) exact tiered, 25%"]
    reuse = got["issue 10: (4) vs (3b) reuse-layer-ahead, 25%"]
    bound = next(g for g in goals if "raw bandwidth" in g["what"])
    assert fetch["ratio"] == pytest.approx(2.0) and fetch["met"] is True
    assert exact["ratio"] == pytest.approx(4.5) and exact["met"] is True
    assert reuse["ratio"] == pytest.approx(1.5) and reuse["met"] is True
    assert bound["baseline_ms"] == pytest.approx(600.0) and bound["ratio"] == pytest.approx(1.5) and bound["met"] is False
    assert bound["note"] is None  # no step without disk reads in this run: no floor to state
    floor_rows = rows + [row(speed.DYNAMIC, None, 840.0, state=None), row(speed.EXACT, None, 780.0, state="warm")]
    floor = next(g for g in speed.targets(floor_rows, info, s) if "raw bandwidth" in g["what"])
    assert "exact warm, 780 ms" in floor["note"] and "1.30x the read-once time (600 ms)" in floor["note"]
    check = next(g for g in goals if "page cache" in g["what"])
    assert check["met"] is True
    rows[3] = row(speed.AWARE, 0.25, 300.0)
    got = {g["what"]: g["met"] for g in speed.targets(rows, info, s)}
    assert got["issue 9: (4) attention-aware vs (3) fetch-every-step, 25%"] is False  # 1.33x < 1.74x
    assert got["issue 9: (4) attention-aware vs (2) exact tiered, 25%"] is True  # 3.0x >= 3x
    assert got["issue 10: (4) vs (3b) reuse-layer-ahead, 25%"] is False  # 1.0x < 1.3x
    rows[0] = row(speed.EXACT, None, 900.0, max_abs_logit_diff=0.5)
    assert next(g for g in speed.targets(rows, info, s) if "page cache" in g["what"])["met"] is False
    rows[3] = row(speed.AWARE, 0.25, float("nan"), available=False)
    for g in speed.targets(rows, info, s):
        if "(4)" in g["what"]:
            assert g["met"] is None and g["note"].startswith("sparse mode not available")


def test_pool_rows_are_opt_in_and_unbounded_is_asked_for_by_name(speed, tmp_path):
    """Default rows carry no pool (the cache's default bound); --pool-fractions adds (3b) and (4) unbounded
    (pool_bytes=None, once however often 'inf' is given) and at each fraction; the table shows each bound."""
    from _common import tiny_llama

    plain, _ = speed.configurations(speed.Settings(budgets=(0.25,)), True, 4096, 64)
    assert all(c.pool is None for c in plain)
    s = speed.Settings(budgets=(0.25,), pool_fractions=(math.inf, 0.5, math.inf))
    configs, _ = speed.configurations(s, True, 4096, 64)
    pooled = [(c.system, c.pool) for c in configs if c.pool is not None]
    assert sorted(pooled, key=str) == sorted([(sys_, p) for p in (math.inf, 0.5) for sys_ in (speed.REUSE, speed.AWARE)], key=str)
    model = tiny_llama()
    gen = torch.Generator().manual_seed(0)
    shape = (2, model.config.num_key_value_heads, 200, model.config.hidden_size // model.config.num_attention_heads)
    kv = [(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)) for _ in range(model.config.num_hidden_layers)]
    quick = speed.Settings.quick()
    got = {}
    for pool in (None, math.inf, 0.5):
        cache = speed.build_cache(model, speed.Config(speed.AWARE, 0.25, "cold", pool), kv, quick, tmp_path / str(pool))
        try:
            got[pool] = speed.pool_bound(cache.stats())
            host = cache.stats()["tiercache"]["tiers"]["host"]["capacity_bytes"]
        finally:
            cache.close()
    assert got[None] == (host, "auto: the host tier's budget (model on cpu)")
    assert got[math.inf] == (None, "unbounded (pool_bytes=None)")
    assert got[0.5][1] == "pool_bytes" and got[0.5][0] > host
    assert speed.pool_bound(None) == (None, "")


def test_budgets_within_a_block_are_one_configuration(speed):
    kept, merged = speed.distinct_budgets((2048, 0.0625, 0.25), 8177, 64)
    assert kept == [0.0625, 0.25] and merged == {"2048 tokens": "25%"}
    kept, merged = speed.distinct_budgets((2048, 0.0625, 0.25), 4095, 64)
    assert kept == [0.0625, 0.25, 2048] and merged == {}


def test_a_failing_sparse_cache_is_reported_and_the_rest_runs(speed, tmp_path, monkeypatch):
    real = speed.make_tiered

    def broken(model, mode, **options):
        if mode == "sparse" and options.get("strategy") == speed.REUSE:
            raise RuntimeError("boom")
        return real(model, mode, **options)

    monkeypatch.setattr(speed, "make_tiered", broken)
    s = speed.Settings.quick()
    s.contexts, s.batches, s.full_points, s.synthetic = (128,), (1,), (), ()
    runs, _ = speed.run_all(s, tmp_path, show_progress=False)
    failed = [r for r in runs if r.system == speed.REUSE]
    assert failed and all(not r.available and r.note == "error: RuntimeError: boom" and "boom" in r.error and not r.steps
                          for r in failed)
    assert all(r.available and r.steps for r in runs if r.system in (speed.DYNAMIC, speed.EXACT, speed.FETCH))


def test_raw_disk_bandwidth_reads_every_byte(speed, tmp_path):
    for i in range(5):
        (tmp_path / f"f{i}").write_bytes(bytes(range(256)) * 64 * (i + 1))
    got = speed.raw_disk_bandwidth(tmp_path, workers=(1, 2))
    if "error" in got:  # a filesystem that refuses O_DIRECT (tmpfs)
        pytest.skip(got["error"])
    assert got["files"] == 5 and got["bytes"] == sum(16384 * (i + 1) for i in range(5))
    assert set(got["by_workers"]) == {1, 2} and got["bytes_per_s"] > 0


@pytest.mark.parametrize("argv", [["--budgets", "0"], ["--budgets", "1.5"], ["--budgets", "x"], ["--contexts", "x"],
                                  ["--batches", "0"], ["--steps", "0"], ["--repeats", "0"], ["--threads", "0"],
                                  ["--full-points", "8192"], ["--warmup", "-1"],
                                  ["--pool-fractions", "0"], ["--pool-fractions", "0.5,-1"]])
def test_cli_rejects_bad_options(speed, tmp_path, argv):
    with pytest.raises(SystemExit) as exc:
        speed.main(["--quick", *argv, "--out", str(tmp_path)])
    assert exc.value.code == 2


def test_one_cache_alive_at_a_time_rebuilt_every_round(speed, tmp_path, monkeypatch):
    """Every configuration is filled once per round and closed before the next cache is built; the fill
    is outside every recorded step (the build's clock never runs inside a step's)."""
    real = speed.build_cache
    live: list[object] = []
    events: list[tuple[str, str]] = []

    def counting(model, cfg, kv, s, store, prompt=None, **kw):
        assert not live, f"{cfg.label} built while {len(live)} other cache(s) alive"
        cache = real(model, cfg, kv, s, store, prompt, **kw)
        live.append(cache)
        events.append(("build", cfg.label))
        close = getattr(cache, "close", None)

        def closing():
            live.remove(cache)
            if close is not None:
                close()

        cache.close = closing  # DynamicCache has no close(): the benchmark drops it (checked below via hasattr)
        return cache

    monkeypatch.setattr(speed, "build_cache", counting)
    s = speed.Settings.quick()
    s.contexts, s.batches, s.full_points, s.synthetic, s.repeats, s.steps = (128,), (2,), (), (), 3, 1
    runs, info = speed.run_all(s, tmp_path / "work", show_progress=False)
    assert not live
    labels = [r.label for r in runs]
    assert len(events) == s.repeats * len(labels)
    for rnd in range(s.repeats):  # the reference first in every round, the others' order rotated by one
        order = [label for _, label in events[rnd * len(labels):(rnd + 1) * len(labels)]]
        assert order[0] == labels[0] and sorted(order) == sorted(labels)
        others = labels[1:]
        k = rnd % len(others)
        assert order[1:] == others[k:] + others[:k]
    assert not list((tmp_path / "work").glob("*.kv")) and not list((tmp_path / "work").glob("prefill/*"))
    for run in runs:
        assert [st["step"] for st in run.steps] == [0, 1] * s.repeats  # 1 warm-up + 1 timed step, every round


def test_mapped_kv_round_trip_is_copy_on_write(tmp_path):
    from _common import MappedKV

    gen = torch.Generator().manual_seed(0)
    layers = [(torch.randn(2, 3, 5, 4, generator=gen), torch.randn(2, 3, 5, 4, generator=gen).to(torch.bfloat16)),
              (torch.randn(1, 1, 0, 4), torch.arange(6, dtype=torch.int64).view(1, 1, 2, 3))]
    saved = MappedKV.write(tmp_path / "kv", iter(layers))
    assert saved.nbytes == sum(t.numel() * t.element_size() for pair in layers for t in pair)
    assert (tmp_path / "kv").stat().st_size == saved.nbytes
    loaded = saved.load()
    for (k, v), (k2, v2) in zip(layers, loaded):
        assert k2.dtype == k.dtype and v2.dtype == v.dtype
        torch.testing.assert_close(k2, k, rtol=0, atol=0)
        torch.testing.assert_close(v2, v, rtol=0, atol=0)
    loaded[0][0].fill_(7.0)  # private to this mapping: the file and a fresh load are unchanged
    torch.testing.assert_close(saved.load()[0][0], layers[0][0], rtol=0, atol=0)
    saved.remove()
    assert not (tmp_path / "kv").exists()


def test_read_in_decode_order_reads_the_steps_disk_entries(speed, tmp_path):
    """The like-for-like baseline lists exactly the disk-held entries of one exact step, in layer order
    (each layer's visible blocks), and reads every byte of their chunk files."""
    from _common import tiny_llama
    from tiercache_llm import TieredKVCache

    config = tiny_llama().config
    cache = TieredKVCache(config, host=64 * 1024, disk=16 << 20, path=tmp_path / "s", block_size=16, direct_io=True)
    try:
        for i in range(config.num_hidden_layers):
            cache.update(torch.randn(2, 2, 100, 16), torch.randn(2, 2, 100, 16), i)
        files, disk, memory = speed.decode_read_order(cache)
        keys = [k for layer in cache.layers for k in layer._entries_from(layer._visible_blocks()[0])]
        tiers = cache.store.tiers_of(keys)
        on_disk = [k for k, t in zip(keys, tiers) if t == "disk"]
        assert on_disk and len(on_disk) < len(keys)  # both tiers hold some of the step's entries
        assert len(files) == len(on_disk) and disk + memory == sum(cache.store._live[k] for k in keys)
        with cache.store.cache._lock:  # the files in the step's order
            index, disk_tier = cache.store.cache._index, cache.store.cache.tiers[-1]
            assert files == [disk_tier._chunk_file(index[k].slot) for k in on_disk]
        got = speed.read_in_decode_order(cache, "before", 0)
        assert got["when"] == "before" and got["disk_payload_bytes"] == disk and got["memory_payload_bytes"] == memory
        if "error" in got:  # a filesystem that refuses O_DIRECT (tmpfs)
            pytest.skip(got["error"])
        import os
        assert got["files"] == len(files) and got["bytes"] == sum(os.path.getsize(f) for f in files)
        assert set(got["by_workers"]) == {1, speed.reader_threads(cache)} and got["bytes_per_s"] > 0
    finally:
        cache.close()
