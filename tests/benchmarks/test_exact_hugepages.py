"""Smoke test of benchmarks/exact_hugepages.py at tiny sizes: both buffers are read, the reads land the file's
bytes in the runs the layout says, and the figures are written.  No speed is asserted."""

from __future__ import annotations

import json
import os

import pytest
import torch


def test_tiny_run_reads_both_buffers(load_benchmark, tmp_path):
    bench = load_benchmark("exact_hugepages")
    out = tmp_path / "hp.json"
    rc = bench.main(["--mib", "2", "--chunk-kib", "128", "--run-kib", "16", "--stride-kib", "64", "--threads", "2",
                     "--repeats", "2", "--workdir", str(tmp_path), "--out", str(out)])
    if rc == 2:
        pytest.skip("O_DIRECT refused here")
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["bytes"] == 2 << 20 and set(res["summary"]) == {"4k", "huge"}
    for row in res["summary"].values():
        assert row["wall_ms"] > 0 and row["gib_s"] > 0 and len(row["samples_wall_ms"]) == 2


def test_a_pass_lands_each_chunk_in_its_runs(load_benchmark, tmp_path):
    import crc32c

    bench = load_benchmark("exact_hugepages")
    chunk, run, chunks = 32 << 10, 8 << 10, 6
    nbytes, offsets = bench.layout(chunks, chunk, run, 64 << 10)
    data = os.urandom(chunk * chunks)
    path = tmp_path / "data"
    path.write_bytes(data)
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
    except OSError:
        pytest.skip("O_DIRECT refused here")
    buf = bench.aligned_empty((nbytes,), dtype=torch.uint8)
    wall, user, system = bench.read_pass(str(path), buf, offsets, chunk, run, 3, crc32c.crc32c)
    assert wall > 0 and user >= 0 and system >= 0
    got = bytes(buf.numpy())
    for i, runs in enumerate(offsets):
        assert b"".join(got[o : o + run] for o in runs) == data[i * chunk : (i + 1) * chunk]
    assert len({o for runs in offsets for o in runs}) == chunks * (chunk // run)  # no two runs overlap
