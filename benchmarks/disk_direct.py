"""Disk tier batched read vs a raw read of the same chunk files (CPU, issue 8 "disk I/O at the device's bandwidth").

The disk tier's ``read_into`` of ``--count`` entries of ``--shape`` float32 (default 4x3x64x64 = 192 KiB, one
64-token block of SmolLM2 KV for a batch of 4 rows) against reading the same chunk files raw (open, ``preadv``
into a page-aligned buffer, close: no checksum, no copy) with 1 and ``--workers`` threads, interleaved in one
process.  With ``direct_io`` (the default; ``--buffered`` for the page-cache path) every read goes to the
device.  Destinations are either contiguous tensors (``--dest contiguous``) or block slices of one
``(batch, heads, tokens, head_dim)`` buffer per layer (``--dest strided``, what the exact fetch does).

    python benchmarks/disk_direct.py                       # 5528 entries, O_DIRECT, medians of 3
    python benchmarks/disk_direct.py --count 1000 --repeats 5 --dest strided
    python benchmarks/disk_direct.py --shape 1,1,64,64 --count 20000 --dest strided --ref /work/main

``--ref CHECKOUT`` also times the disk tier of another checkout's ``tiercache`` package (copied and imported
as ``tiercache_ref``) on a store of its own holding the same entries, interleaved with this one (A/B of a
change in one process); ``--count`` beyond the descriptor cache (a third of the open-file limit) makes
most reads open their chunk, as a long sparse decode does.
"""

from __future__ import annotations

import argparse
import importlib
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


def ref_tier_class(checkout: Path, into: Path) -> tuple[type, type]:
    """``(DiskTier, EntryHeader)`` of the ``tiercache`` package of ``checkout``, imported as ``tiercache_ref``
    from a copy under ``into`` (its imports are relative, so it does not mix with this tree's package)."""
    shutil.copytree(checkout / "tiercache", into / "tiercache_ref", ignore=shutil.ignore_patterns("__pycache__"))
    sys.path.insert(0, str(into))
    disk = importlib.import_module("tiercache_ref.tiers.disk")
    base = importlib.import_module("tiercache_ref.tiers.base")
    return disk.DiskTier, base.EntryHeader


def fill(makers: list[tuple[type, type, Path]], count: int, value: torch.Tensor, direct: bool, workers: int):
    """A disk tier per ``(DiskTier class, EntryHeader class, path)`` holding ``count`` copies of ``value``, and
    each one's ``(slot, header)`` items.  The tiers' writes alternate entry by entry: the store written last
    reads measurably faster here (48 KiB entries: ~15 %, whichever code reads it), so neither gets that edge."""
    nbytes = value.nbytes
    tiers = []
    for tier_cls, _, path in makers:
        tier = tier_cls(path, count * (nbytes + 3 * 4096) + (64 << 20), direct_io=direct, io_threads=workers)
        list(tier.recover())
        tiers.append(tier)
    items: list[list] = [[] for _ in tiers]
    for i in range(count):
        for tier, (_, header_cls, _), its in zip(tiers, makers, items):
            slot = tier.allocate(nbytes)
            header = header_cls(str(i).encode(), "float32", tuple(value.shape), nbytes, i + 1)
            tier.write(slot, value, header)
            its.append((slot, header))
    return list(zip(tiers, items))


def destinations(shape: tuple[int, ...], count: int, dest: str) -> list[torch.Tensor]:
    if dest == "contiguous":
        return [torch.empty(shape) for _ in range(count)]
    b, h, t, d = shape  # block j of a (B, H, T, D) buffer per 64 entries, as the exact fetch lays them out
    per = 64
    bufs = [torch.empty(b, h, t * per, d) for _ in range(-(-count // per))]
    return [bufs[i // per][:, :, (i % per) * t:(i % per + 1) * t] for i in range(count)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--count", type=int, default=5528)
    p.add_argument("--shape", default="4,3,64,64", help="float32 shape of each entry (default 4,3,64,64)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=4, help="raw-read threads and the tier's io_threads")
    p.add_argument("--buffered", action="store_true", help="page-cache reads (warm) instead of O_DIRECT")
    p.add_argument("--dest", choices=("contiguous", "strided"), default="contiguous")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--ref", type=Path, default=None,
                   help="a checkout whose tiercache disk tier is timed too, interleaved (A/B)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    shape = tuple(int(x) for x in args.shape.split(","))
    value = torch.randn(shape)
    nbytes = value.nbytes
    root = Path(tempfile.mkdtemp(prefix="disk_direct-", dir=args.workdir or Path.home()))
    try:
        makers = [(DiskTier, EntryHeader, root / "store")]
        if args.ref is not None:
            makers.append((*ref_tier_class(args.ref, root), root / "ref-store"))
        filled = fill(makers, args.count, value, not args.buffered, args.workers)
        tiers = {}
        for name, (t, its) in zip(("tier", "ref"), filled):
            outs = destinations(shape, args.count, args.dest)
            reqs = [(s, hd, o) for (s, hd), o in zip(its, outs)]
            t.read_into(reqs)  # warm the pool, the fd cache, the scratch buffers
            if not (torch.equal(outs[0], value) and torch.equal(outs[-1], value)):
                raise SystemExit(f"{name} read back the wrong bytes")
            tiers[name] = (t, reqs)
        tier = tiers["tier"][0]
        paths = [tier._chunk_file(s) for s, _ in filled[0][1]]
        gib = args.count * nbytes / GiB
        figs: dict[str, list[float]] = {name: [] for name in tiers}
        figs.update({"raw1": [], f"raw{args.workers}": []})
        for r in range(args.repeats):
            for name, (t, reqs) in list(tiers.items())[:: -1 if r % 2 else 1]:  # order alternated per round
                t0 = time.perf_counter()
                t.read_into(reqs)
                figs[name].append(gib / (time.perf_counter() - t0))
            figs["raw1"].append(gib / raw_read(paths, 1, not args.buffered))
            figs[f"raw{args.workers}"].append(gib / raw_read(paths, args.workers, not args.buffered))
        mode = "buffered (warm)" if args.buffered else ("O_DIRECT" if tier.direct_io else "buffered (O_DIRECT refused)")
        print(f"{args.count} entries of {nbytes} B ({gib * 1024:.0f} MiB), {mode}, dest {args.dest}, "
              f"io_threads {args.workers}, medians of {args.repeats} (GiB/s):")
        for name, xs in figs.items():
            print(f"  {name:6s} {statistics.median(xs):6.3f}   samples {' '.join(f'{x:.3f}' for x in xs)}")
        print(f"  tier / raw1 = {statistics.median(figs['tier']) / statistics.median(figs['raw1']):.2f}, "
              f"tier / raw{args.workers} = {statistics.median(figs['tier']) / statistics.median(figs[f'raw{args.workers}']):.2f}"
              + (f", tier / ref = {statistics.median(figs['tier']) / statistics.median(figs['ref']):.2f}"
                 if "ref" in figs else ""))
        print(f"  load average {os.getloadavg()[0]:.2f}")
        for t, _ in tiers.values():
            t.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
