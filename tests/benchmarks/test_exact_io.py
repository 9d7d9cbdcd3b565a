"""Smoke test of benchmarks/exact_io.py at tiny sizes: every measurement runs and reads what it says (the
reader the step's entries of both tiers, the raw reads the disk entries' files), and the outputs are
written.  No speed is asserted."""

from __future__ import annotations

import json

import pytest


def test_quick_run_measures_every_read(load_benchmark, tmp_path):
    bench = load_benchmark("exact_io")
    try:
        assert bench.main(["--quick", "--breakdown", "--workdir", str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    except SystemExit as exc:  # a filesystem that refuses O_DIRECT (tmpfs)
        if "O_DIRECT refused" in str(exc):
            pytest.skip(str(exc))
        raise
    res = json.loads((tmp_path / "out" / "exact_io.json").read_text())["result"]
    assert res["disk_payload_bytes"] > 0 and res["memory_payload_bytes"] > 0  # both tiers hold part of the step
    n = res["reader_threads"]
    expected = {"reader", "reader-disk", "reader-disk-2-in-flight", "raw-1", f"raw-{n}", "raw-1-shuffled", "walk-1", "walk-4",
                "1t-whole", "1t-hot", "1t-distinct", "1t-strided", "1t-strided-crc", "1t-tier"}
    assert set(res["medians_gib_s"]) == expected
    assert all(len(v) == 2 and all(x > 0 for x in v) for v in res["samples_gib_s"].values())
    assert "reader-disk / best raw" in (tmp_path / "out" / "exact_io.md").read_text()


def test_step_reads_cover_the_visible_blocks(load_benchmark, tmp_path):
    bench = load_benchmark("exact_io")
    cache = bench.build(300, 1, "64KiB", 0.0, tmp_path / "s", 2)
    try:
        reads = bench.step_reads(cache)
        assert [len(k) for k, _ in reads] == [len(layer._kkeys) for layer in cache.layers]
        disk = bench.step_reads(cache, disk_only=True)
        assert 0 < sum(len(k) for k, _ in disk) <= sum(len(k) for k, _ in reads)
        assert all(set(cache.store.tiers_of(k)) == {"disk"} for k, _ in disk)
        assert bench.timed_reads(cache, reads) > 0
        # what the reads deliver are the stored blocks (every layer reads into the same slot: the last one's stay)
        keys, dsts = reads[-1]
        got = cache.store.get_blocks(keys, device="cpu")
        assert all((a.reshape(-1) == b.reshape(-1)).all() for a, b in zip(got, dsts))
    finally:
        cache.close()
