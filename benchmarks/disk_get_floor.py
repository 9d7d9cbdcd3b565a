"""Warm single-key disk ``get`` against the floor of a verified read of the same format (hot-path row 5).

    python benchmarks/disk_get_floor.py                        # 4 KiB and 64 KiB, 15 interleaved repeats
    python benchmarks/disk_get_floor.py --sizes 65536 --repeats 31
    python benchmarks/disk_get_floor.py --sizes 65536 --threads 1,2

Per value size, with the page cache warm, each step reading every value once (each result dropped at once),
interleaved in an order that alternates per repeat, at one torch thread (``--threads 1,2``: each thread
count in turn within every repeat, as row 5 runs at both):

- ``get``: ``Cache.get`` from a disk-only store (descriptor cache, crc32c, header check, bookkeeping);
- ``read``: the same store's disk tier read without the facade: a fresh tensor of the value's shape and
  ``DiskTier.read_fresh`` of its slot (what ``get`` calls between its two lock round trips), so
  ``get - read`` is the facade's share (lookup, pin, counters, unpin) and ``read - chunk_held`` the read's
  own set-up (descriptor cache, cached-header test, buffer views);
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
from tiercache.index import dtype_name  # noqa: E402
from tiercache.values import new_tensor  # noqa: E402


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

    # The tier's read of each entry with what the facade passes it (private attributes: a diagnostic).
    tier = cache.tiers[0]
    entries = [cache._index[i] for i in range(count)]  # noqa: SLF001
    reads = [(e.shape, e.dtype, e.slot, e.key_bytes, dtype_name(e.dtype), e.seq) for e in entries]

    def read() -> None:
        read_fresh = tier.read_fresh
        for shape, dtype, slot, key, name, seq in reads:
            read_fresh(slot, new_tensor(shape, dtype), key, name, shape, seq)

    def close() -> None:
        cache.close()
        close_floors()

    runs = {"get": get, "read": read, "raw": lambda: read_files(raw_paths, size, keep=False), **floors}
    for run in runs.values():  # warm the page cache (and the tier's descriptor and header caches)
        run()
    return runs, close


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="4096,65536", help="value sizes in bytes (default 4096,65536)")
    parser.add_argument("--count", type=int, default=1024, help="values per size (default 1024)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", default="1",
                        help="torch thread counts, interleaved within each repeat (default 1; e.g. 1,2)")
    args = parser.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    if any(t < 1 for t in threads):
        parser.error("--threads must be positive")
    print(f"load average at the start: {os.getloadavg()}")
    for size in (int(s) for s in args.sizes.split(",")):
        workdir = Path(tempfile.mkdtemp(prefix="tiercache-disk-floor-"))
        try:
            runs, close = steps(workdir, size, args.count)
            samples: dict[tuple[int, str], list[tuple[float, float]]] = {
                (t, name): [] for t in threads for name in runs}
            try:
                for r in range(args.repeats):
                    for t in (threads if r % 2 == 0 else threads[::-1]):
                        torch.set_num_threads(t)
                        for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
                            gc.collect()
                            c0, t0 = time.thread_time(), time.perf_counter()
                            runs[name]()
                            samples[t, name].append(((time.thread_time() - c0) / args.count,
                                                     (time.perf_counter() - t0) / args.count))
            finally:
                close()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        cpu = {key: statistics.median(s[0] for s in v) for key, v in samples.items()}
        wall = {key: statistics.median(s[1] for s in v) for key, v in samples.items()}
        for t in threads:
            print(f"{size // 1024} KiB values ({args.count}, {args.repeats} repeats), {t} torch thread(s): µs per "
                  "value, ratio = raw / step (row 5's ratio)")
            for name in runs:
                print(f"  {name:20s} cpu {cpu[t, name] * 1e6:7.2f} ({cpu[t, 'raw'] / cpu[t, name]:.3f})   "
                      f"wall {wall[t, name] * 1e6:7.2f} ({wall[t, 'raw'] / wall[t, name]:.3f})")
    print(f"load average at the end: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
