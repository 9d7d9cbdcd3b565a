"""Warm fetch of exact decode's blocks alone vs plain reads of the same bytes, with and without a checksum.

    python benchmarks/fetch_floor.py                       # 408 entries of 384 KiB (SmolLM2, 4K context)
    python benchmarks/fetch_floor.py --entries 100 --repeats 3

A disk-only ``tiercache.Cache`` holds ``--entries`` joint K/V entries of SmolLM2's shape (``(2, 1, 3,
256, 64)`` float32, 384 KiB: one 256-token block of one layer).  Interleaved, with the page cache warm:

- ``tier``: one ``get_many(keys, out=[...])`` into the block slices of a decode buffer (what a layer-ahead
  read does, here on the calling thread with nothing beside it);
- ``plain``: open / ``readinto`` a fresh tensor / close of files of the same size (hotpath row 2's
  baseline);
- ``plain+crc``: the same, plus a crc32c pass over each file's bytes (the tier verifies every chunk's
  crc32c on read; the plain reads verify nothing).

Runs at one torch thread.  Prints the median wall and CPU (``time.thread_time``) ms of each and the ratios to ``plain``, and the
load average.  The tier's own threads stay at one (``io_threads=1``), so its CPU time is this thread's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import read_files, torch_threads, write_files  # noqa: E402

import tiercache  # noqa: E402
from tiercache.buffers import aligned_empty  # noqa: E402
from tiercache.tiers.disk import _crc32c  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=408, help="entries per fetch (default 408: a 4K step's disk hits)")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--workdir", type=Path, default=None, help="scratch directory on the disk under test")
    args = parser.parse_args(argv)
    if args.entries < 1 or args.repeats < 1:
        parser.error("--entries and --repeats must be positive")
    with torch_threads(1):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    crc32c = _crc32c()
    n, block, heads, head_dim = args.entries, 256, 3, 64
    shape = (2, 1, heads, block, head_dim)
    nbytes = 2 * heads * block * head_dim * 4
    workdir = Path(tempfile.mkdtemp(prefix="tiercache-fetch-floor-", dir=args.workdir))
    try:
        cache = tiercache.Cache(host=0, disk=2 * n * nbytes + (64 << 20), path=workdir / "kv", io_threads=1)
        gen = torch.Generator().manual_seed(0)
        values = [torch.randn(shape, generator=gen) for _ in range(n)]
        keys = [("c", 0, "kv", i) for i in range(n)]
        cache.put_many(zip(keys, values))
        buf = aligned_empty((2, 1, heads, n * block, head_dim), dtype=torch.float32)
        outs = list(buf.unflatten(3, (n, block)).unbind(3))
        paths = write_files(workdir / "plain", n, nbytes)

        def plain_crc() -> None:
            for t in read_files(paths, nbytes):
                crc32c(memoryview(t.numpy()))

        runs = {"tier": lambda: cache.get_many(keys, out=outs), "plain": lambda: read_files(paths, nbytes),
                "plain+crc": plain_crc}
        for run in runs.values():  # warm the page cache and the code paths
            run()
        if not all(torch.equal(o, v) for o, v in zip(outs, values)):
            raise AssertionError("the tier returned other bytes than were put")
        wall: dict[str, list[float]] = {k: [] for k in runs}
        cpu: dict[str, list[float]] = {k: [] for k in runs}
        load = os.getloadavg()
        for _ in range(args.repeats):
            for name, run in runs.items():
                w, c = time.perf_counter(), time.thread_time()
                run()
                wall[name].append(1000 * (time.perf_counter() - w))
                cpu[name].append(1000 * (time.thread_time() - c))
        cache.close()
        if not all(torch.equal(o, v) for o, v in zip(outs, values)):
            raise AssertionError("the tier returned other bytes than were put")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    base_w, base_c = statistics.median(wall["plain"]), statistics.median(cpu["plain"])
    print(f"{n} entries of {nbytes // 1024} KiB ({n * nbytes / (1 << 20):.0f} MiB), warm, {args.repeats} repeats; "
          f"load average {load[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
    for name in runs:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        print(f"{name:10s} wall {w:8.2f} ms ({w / base_w:.2f}x plain)   cpu {c:8.2f} ms ({c / base_c:.2f}x plain)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
