"""Smoke tests of benchmarks/hotpath.py and benchmarks/storage.py at tiny sizes: every row runs end to end,
measures a baseline beside its figure, and writes its JSON, markdown and plot.  They assert structure and
sanity (finite positive timings, exact decode tokens equal DynamicCache's, the disk configuration really
reads from disk), never speed: the speed targets live in the benchmark's own output."""

from __future__ import annotations

import json
import math
import statistics
import threading

import pytest



@pytest.fixture(scope="module")
def hotpath(load_benchmark):
    return load_benchmark("hotpath")


def tiny_settings(hotpath):
    """Smaller than --quick: a random 2-layer model, a 32 KiB host tier and 32-token blocks (the exact-mode
    default would store no block of a 130-token prompt) so the decode rows spill to disk."""
    return hotpath.Settings(
        contexts=(130,), decode_steps=2, decode_host=32 * 1024, block_size=32, model="tiny", host_small_values=200,
        host_large_values=16, disk_values={4096: 40, 65536: 8}, reopen_entries=(300,), churn_entries=400,
        churn_puts=50, repeats=2, threads=(1,),
    )


def test_every_row_runs_with_a_same_run_baseline_and_writes_its_files(hotpath, tmp_path):
    settings = tiny_settings(hotpath)
    results = hotpath.run(settings, hotpath.ROWS, tmp_path / "work", show_progress=False)

    assert {r.row for r in results} == set(hotpath.ROWS)
    for r in results:
        assert r.threads == 1
        assert math.isfinite(r.figure) and r.figure > 0, r
        assert math.isfinite(r.baseline) and r.baseline > 0, r
        assert len(r.samples) == settings.repeats and len(r.baseline_samples) == settings.repeats, r
        assert r.figure == pytest.approx(statistics.median(r.samples))  # the figure is the median sample
    decode = [r for r in results if r.row in (1, 2) and r.name.startswith("exact decode")]
    assert len(decode) == 3  # host; disk warm; disk cold
    assert all(r.name.endswith(", 32-token blocks") for r in results if r.row in (1, 2))  # the block size is stated
    assert all(r.extra["tokens_match_dynamic"] for r in decode)
    fetch = [r for r in results if r.name.startswith("fetch per step, ")]
    assert len(fetch) == 2
    # the same fetch measured alone and as the reader thread's CPU time, warm and cold, each beside its
    # own baseline (plain reads' wall and CPU time)
    alone = [r for r in results if r.name.startswith("fetch per step alone")]
    cpu = [r for r in results if r.name.startswith("fetch CPU per step")]
    assert len(alone) == 2 and len(cpu) == 2
    assert all(r.baseline_name.startswith("CPU time of plain reads") for r in cpu)
    assert all(len(r.extra["plain_crc_ms"]) == settings.repeats for r in fetch)
    for r in fetch:  # the 32 KiB host tier forces most blocks to disk: the baseline reads real files
        assert r.extra["disk_hits_per_step"] > 0
        # Each repeat's plain reads cover the files that repeat's decode read from disk (reads ahead may
        # fall into another step's window, so repeats can differ: compare each with its own run).
        label = "warm" if ", warm," in r.name else "cold"
        runs = next(d for d in decode if f"disk, {label}" in d.name).extra["runs"]
        assert len(r.extra["plain"]) == len(runs)
        for plain, run in zip(r.extra["plain"], runs):
            assert plain["disk_files"] == round(run["disk_hits_per_step"]) > 0
            # page faults of the timed plain steps are recorded (reads land in buffers allocated once; at
            # these tiny sizes fresh buffers would not fault either, so no bound is asserted here)
            assert plain["faults"] >= 0
    # the fetch during decode also beside its like-for-like baseline: the same plain reads timed while the
    # same model decodes on another thread (every timed step overlapped at least one forward pass), warm
    # and cold; same figure as the "fetch per step" row, its own positive baseline
    during = [r for r in results if r.name.startswith("fetch per step during decode vs plain reads during")]
    assert len(during) == 2
    for r in during:
        twin = next(f for f in fetch if f.name.endswith(r.name.split(" decode, ", 1)[1]))
        assert r.samples == twin.samples and r.target == twin.target == 1.3
        assert "beside the same model decoding" in r.baseline_name
        assert r.baseline > 0 and len(r.extra["plain_beside"]) == settings.repeats
        for plain, alone in zip(r.extra["plain_beside"], twin.extra["plain"]):
            assert plain["disk_files"] == alone["disk_files"] and plain["host_copies"] == alone["host_copies"]
            assert len(plain["passes"]) == settings.decode_steps and min(plain["passes"]) >= 1
        assert all("passes" not in p for p in twin.extra["plain"])  # the alone baseline stays alone
    assert not any(t.name == "hotpath-beside" for t in threading.enumerate())  # the decode loop is closed
    cold = next(r for r in decode if "cold" in r.name)
    assert cold.extra["cold_method"] in ("fadvise", "direct_io")
    # rows 3-4 measure put and get, single-key and batched; row 5 get at two value sizes; rows 6 warm
    # and cold; row 7 once.
    assert [sum(r.row == n for r in results) for n in (3, 4, 5, 6, 7)] == [4, 4, 2, 2, 1]
    for n in (3, 4):
        names = [r.name for r in results if r.row == n]
        assert sum("batched" in name for name in names) == 2, names  # put_many and get_many beside put/get
    for r in (r for r in results if r.row == 5):  # the verified-read floor beside the row (no figures checked)
        for name in ("chunk_open", "chunk_held", "chunk_held_nocrc", "raw_held"):
            assert r.extra[f"{name}_gib_s"] > 0 and r.extra[f"{name}_ratio"] > 0

    meta = {"command": "test", "machine": "m", "cpus": 1, "date_utc": "now", "runtime_s": 1.0}
    out = tmp_path / "out"
    hotpath.write_results(results, meta, out)
    saved = json.loads((out / "hotpath.json").read_text())
    assert len(saved["results"]) == len(results)
    assert all("ratio" in r and "met" in r and r["samples"] for r in saved["results"])
    table = (out / "hotpath.md").read_text().splitlines()
    assert sum(line.startswith("| ") and line[2].isdigit() for line in table) == len(results)
    assert (out / "hotpath.png").stat().st_size > 0


def test_target_direction(hotpath):
    slow = hotpath.Result(1, "x", 1, "ms/step", 2.0, 1.0, "base", 1.15, "<=")
    fast = hotpath.Result(4, "x", 1, "GiB/s", 0.9, 1.0, "base", 0.8, ">=")
    absolute = hotpath.Result(6, "x", 1, "s", 0.3, 0.01, "scan", 0.5, "<=", "figure")
    untargeted = hotpath.Result(6, "x", 1, "s", 0.3, 0.01, "scan")
    assert (slow.ratio, slow.met) == (2.0, False)
    assert fast.met is True
    assert absolute.met is True and absolute.ratio == pytest.approx(30)
    assert untargeted.met is None


def test_cli_quick_subset_writes_results(hotpath, tmp_path):
    assert hotpath.main(["--quick", "--model", "tiny", "--rows", "3,7", "--threads", "1", "--out", str(tmp_path)]) == 0
    saved = json.loads((tmp_path / "hotpath.json").read_text())
    assert {r["row"] for r in saved["results"]} == {3, 7}
    assert saved["meta"]["quick"] is True and saved["meta"]["settings"]["repeats"] == 1
    assert "Quick run" in (tmp_path / "hotpath.md").read_text()


@pytest.mark.parametrize("block_size", [None, 16])
def test_decode_rows_use_the_cache_default_block_size_unless_given(hotpath, tmp_path, block_size):
    from tiercache_llm.kv_cache import default_block_size

    settings = hotpath.Settings(contexts=(300,), decode_steps=1, model="tiny", block_size=block_size)
    model, _ = hotpath.load_model("tiny")
    ids = hotpath.prompt_ids(None, 300, model.config.vocab_size)
    run = hotpath.decode_run(model, ids, hotpath.prefill(model, ids), "host", settings, tmp_path)
    assert run["block_size"] == (block_size or default_block_size("exact"))


@pytest.mark.parametrize("argv", [["--rows", "8"], ["--rows", "x"], ["--threads", "0"], ["--repeats", "0"], ["--steps", "0"],
                                  ["--block-size", "0"]])
def test_cli_rejects_bad_options(hotpath, tmp_path, argv):
    with pytest.raises(SystemExit) as exc:
        hotpath.main([*argv, "--model", "tiny", "--out", str(tmp_path)])
    assert exc.value.code == 2


def test_storage_quick_runs(tmp_path, load_benchmark):
    storage = load_benchmark("storage")
    assert storage.main(["--quick", "--sizes", "16KiB", "--total", "256KiB", "--out", str(tmp_path)]) == 0
    saved = json.loads((tmp_path / "storage.json").read_text())
    assert {r["tier"] for r in saved["results"]} == {"host", "disk"}
    assert all(r["repeats"] == 1 for r in saved["results"])
    assert (tmp_path / "storage.md").exists() and (tmp_path / "storage.png").exists()


def test_fetch_floor_runs_and_checks_what_it_read(tmp_path, load_benchmark, capsys):
    fetch_floor = load_benchmark("fetch_floor")
    assert fetch_floor.main(["--entries", "3", "--repeats", "1", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert all(f"{name} " in out for name in ("tier", "plain", "plain+crc"))
    assert list(tmp_path.iterdir()) == []  # its scratch directory is removed


def test_drop_page_cache_visits_every_file(tmp_path, load_benchmark):
    common = load_benchmark("_common")
    common.write_files(tmp_path / "a" / "b", 3, 4096)
    common.write_files(tmp_path / "c", 2, 100)
    assert common.drop_page_cache(tmp_path) == 5
    assert [len(t) for t in common.read_files(sorted((tmp_path / "c").iterdir()), 100)] == [100, 100]
