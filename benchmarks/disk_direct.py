"""Disk tier batched read vs a raw read of the same chunk files (CPU, issue 8 "disk I/O at the device's bandwidth").

The disk tier's ``read_into`` of ``--count`` entries of ``--shape`` float32 (default 4x3x64x64 = 192 KiB, one
64-token block of SmolLM2 KV for a batch of 4 rows) against reading the same chunk files raw (open, ``preadv``
into a page-aligned buffer, close: no checksum, no copy) with 1 and ``--workers`` threads, interleaved in one
process.  With ``direct_io`` (the default; ``--buffered`` for the page-cache path) every read goes to the
device.  Destinations are either contiguous tensors (``--dest contiguous``) or block slices of one
``(batch, heads, tokens, head_dim)`` buffer per layer (``--dest strided``, what the exact fetch does).

    python benchmarks/disk_direct.py                       # 5528 entries, O_DIRECT, medians of 3
    python benchmarks/disk_direct.py --count 1000 --repeats 5 --dest strided
"""

from __future__ import annotations

import argparse
import mmap
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tiercache.tiers.base import EntryHeader  # noqa: E402
from tiercache.tiers.disk import DiskTier  # noqa: E402

GiB = 1 << 30


def raw_read(paths: list[str], workers: int, direct: bool) -> float:
    """Seconds to read every file once: open, one ``preadv`` into an aligned buffer, close."""
    biggest = -(-max(os.path.getsize(p) for p in paths) // 4096) * 4096
    flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)

    def some(ps: list[str]) -> int:
        buf, done = mmap.mmap(-1, biggest), 0
        for p in ps:
            fd = os.open(p, flags)
            try:
                done += os.preadv(fd, [buf], 0)
            finally:
                os.close(fd)
        return done

    start = time.perf_counter()
    if workers == 1:
        some(paths)
    else:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(some, [paths[i::workers] for i in range(workers)]))
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--count", type=int, default=5528)
    p.add_argument("--shape", default="4,3,64,64", help="float32 shape of each entry (default 4,3,64,64)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=4, help="raw-read threads and the tier's io_threads")
    p.add_argument("--buffered", action="store_true", help="page-cache reads (warm) instead of O_DIRECT")
    p.add_argument("--dest", choices=("contiguous", "strided"), default="contiguous")
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    shape = tuple(int(x) for x in args.shape.split(","))
    value = torch.randn(shape)
    nbytes = value.nbytes
    root = Path(tempfile.mkdtemp(prefix="disk_direct-", dir=args.workdir or Path.home()))
    try:
        tier = DiskTier(root / "store", args.count * (nbytes + 3 * 4096) + (64 << 20),
                        direct_io=not args.buffered, io_threads=args.workers)
        list(tier.recover())
        items = []
        for i in range(args.count):
            slot = tier.allocate(nbytes)
            header = EntryHeader(str(i).encode(), "float32", shape, nbytes, i + 1)
            tier.write(slot, value, header)
            items.append((slot, header))
        paths = [tier._chunk_file(s) for s, _ in items]
        if args.dest == "contiguous":
            outs = [torch.empty(shape) for _ in items]
        else:  # block j of a (B, H, T, D) buffer per 64 entries, as the exact fetch lays them out
            b, h, t, d = shape
            per = 64
            bufs = [torch.empty(b, h, t * per, d) for _ in range(-(-args.count // per))]
            outs = [bufs[i // per][:, :, (i % per) * t:(i % per + 1) * t] for i in range(args.count)]
        requests = [(s, hd, o) for (s, hd), o in zip(items, outs)]
        tier.read_into(requests)  # warm the pool, the fd cache, the scratch buffers
        if not torch.equal(outs[-1], value):
            raise SystemExit("read back the wrong bytes")
        gib = args.count * nbytes / GiB
        figs: dict[str, list[float]] = {"tier": [], "raw1": [], f"raw{args.workers}": []}
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            tier.read_into(requests)
            figs["tier"].append(gib / (time.perf_counter() - t0))
            figs["raw1"].append(gib / raw_read(paths, 1, not args.buffered))
            figs[f"raw{args.workers}"].append(gib / raw_read(paths, args.workers, not args.buffered))
        mode = "buffered (warm)" if args.buffered else ("O_DIRECT" if tier.direct_io else "buffered (O_DIRECT refused)")
        print(f"{args.count} entries of {nbytes} B ({gib * 1024:.0f} MiB), {mode}, dest {args.dest}, "
              f"io_threads {args.workers}, medians of {args.repeats} (GiB/s):")
        for name, xs in figs.items():
            print(f"  {name:6s} {statistics.median(xs):6.3f}   samples {' '.join(f'{x:.3f}' for x in xs)}")
        print(f"  tier / raw1 = {statistics.median(figs['tier']) / statistics.median(figs['raw1']):.2f}, "
              f"tier / raw{args.workers} = {statistics.median(figs['tier']) / statistics.median(figs[f'raw{args.workers}']):.2f}")
        tier.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
