"""Warm single-key disk ``get`` against the floor of a verified read of the same format (hot-path row 5).

    python benchmarks/disk_get_floor.py                        # 4 KiB and 64 KiB, 15 interleaved repeats
    python benchmarks/disk_get_floor.py --sizes 65536 --repeats 31

Per value size, with the page cache warm, each step reading every value once (each result dropped at once),
interleaved in an order that alternates per repeat, at one torch thread:

- ``get``: ``Cache.get`` from a disk-only store (descriptor cache, crc32c, header check, bookkeeping);
- ``raw``: open / ``readinto`` a fresh tensor / close of files of the value's size (row 5's baseline);
- ``raw_held``: one ``preadv`` of those files into a fresh tensor on descriptors held open;
- ``chunk_open``: files of the store's chunk size (a 4 KiB header page, the payload, padding, a crc32c):
  open, one ``preadv`` (header page and tail into reused buffers, the payload into a fresh tensor), a
  crc32c pass over all of it, close: the baseline's steps plus the bytes and the checksum the format adds;
- ``chunk_held``: the same on descriptors held open, as the tier's descriptor cache does: the least a
  verified get of this format costs from Python, with no bookkeeping at all;
- ``chunk_held_nocrc``: the same without the checksum.

Prints the median CPU (``time.thread_time``) and wall µs per value of each, its ratio to ``raw`` as row
5 states it (raw time / time: a throughput ratio, ≥ 0.8 is the 64 KiB goal) and the load average.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import MiB, disk_floor_reads, read_files, write_files  # noqa: E402  (the benchmarks directory is not a package)

import tiercache  # noqa: E402


def steps(workdir: Path, size: int, count: int) -> tuple[dict[str, Callable[[], None]], Callable[[], None]]:
    """The measured steps for ``count`` values of ``size`` bytes (files and store under ``workdir``), each
    run once (warm), and a clean-up function."""
    values = [torch.randn(size // 4) for _ in range(count)]
    cache = tiercache.Cache(host=None, disk=4 * size * count + 64 * MiB, path=workdir / "store")
    cache.put_many(list(enumerate(values)))
    raw_paths = write_files(workdir / "raw", count, size)
    floors, close_floors = disk_floor_reads(workdir / "chunks", raw_paths, size)

    def get() -> None:
        for i in range(count):
            cache.get(i)

    def close() -> None:
        cache.close()
        close_floors()

    runs = {"get": get, "raw": lambda: read_files(raw_paths, size, keep=False), **floors}
    for run in runs.values():  # warm the page cache (and the tier's descriptor and header caches)
        run()
    return runs, close


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="4096,65536", help="value sizes in bytes (default 4096,65536)")
    parser.add_argument("--count", type=int, default=1024, help="values per size (default 1024)")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"load average at the start: {os.getloadavg()}")
    for size in (int(s) for s in args.sizes.split(",")):
        workdir = Path(tempfile.mkdtemp(prefix="tiercache-disk-floor-"))
        try:
            runs, close = steps(workdir, size, args.count)
            samples: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
            try:
                for r in range(args.repeats):
                    for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
                        gc.collect()
                        c0, t0 = time.thread_time(), time.perf_counter()
                        runs[name]()
                        samples[name].append(((time.thread_time() - c0) / args.count,
                                              (time.perf_counter() - t0) / args.count))
            finally:
                close()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        cpu = {name: statistics.median(s[0] for s in v) for name, v in samples.items()}
        wall = {name: statistics.median(s[1] for s in v) for name, v in samples.items()}
        print(f"{size // 1024} KiB values ({args.count}, {args.repeats} repeats): µs per value, "
              "ratio = raw / step (row 5's ratio)")
        for name in runs:
            print(f"  {name:20s} cpu {cpu[name] * 1e6:7.2f} ({cpu['raw'] / cpu[name]:.3f})   "
                  f"wall {wall[name] * 1e6:7.2f} ({wall['raw'] / wall[name]:.3f})")
    print(f"load average at the end: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
