"""Old tree vs new tree: the CPU time of one warm disk ``get_many`` of exact decode's shape, many short
alternating samples in one process.

    python benchmarks/hotpath_getmany_ab.py --old /work/main --new . --keys 3 --samples 40

Each tree's ``tiercache`` is imported under its own name (as ``hotpath_ab.py`` does).  Each keeps a
disk-only store of ``--keys`` joint K/V entries of SmolLM2's block shape (``(2, 1, 3, 256, 64)`` float32,
384 KiB), page cache warm, read with ``get_many(keys, out=[...])`` into their block slices of a decode
buffer, as ``tiercache_llm`` reads a layer (1K context: 3 blocks per layer).  The disk tier's read pool is
off (``spare_cpus`` fixed at 0), so a sample is the calling thread's own work.  A sample is ``--calls``
calls timed with ``time.thread_time``; old and new alternate sample by sample (the order flips every
sample), so drift and neighbours hit both alike.  Prints min / 25th percentile / median CPU µs per call
of each and the load average: per-call costs of a few µs against ~100 µs of copies and checksums need
many samples; the low percentiles are the least disturbed by other work on the machine.
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
from _common import MiB  # noqa: E402  (the benchmarks directory is not a package)
from hotpath_ab import load_tree  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", type=Path, required=True, help="root of the old tree (e.g. /work/main)")
    parser.add_argument("--new", type=Path, default=Path("."), help="root of the new tree (default: .)")
    parser.add_argument("--keys", type=int, default=3, help="entries per get_many (default 3: a 1K layer)")
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--calls", type=int, default=200, help="calls per sample")
    args = parser.parse_args(argv)
    if args.keys < 1 or args.samples < 1 or args.calls < 1:
        parser.error("--keys, --samples and --calls must be positive")
    torch.set_num_threads(1)
    sys.path.insert(0, str(args.new.resolve() / "kernels"))
    trees = {"old": load_tree("tc_old", args.old.resolve()), "new": load_tree("tc_new", args.new.resolve())}
    for tree in trees.values():
        sys.modules[f"{tree.__name__}.tiers.disk"].spare_cpus = lambda: 0
    shape, n = (2, 1, 3, 256, 64), args.keys
    values = [torch.randn(shape) for _ in range(n)]
    buffer = torch.zeros(2, 1, 3, n * 256 + 64, 64)  # room beyond the blocks, like a decode buffer's tail
    out = list(buffer[:, :, :, : n * 256].unflatten(3, (n, 256)).unbind(3))
    names = [("kv", "bench", 0, "kv", i) for i in range(n)]
    workdir = Path(tempfile.mkdtemp(prefix="tiercache-getmany-ab-"))
    caches = {}
    try:
        for name, tree in trees.items():
            cache = caches[name] = tree.Cache(host=None, disk=n * MiB + 64 * MiB, path=workdir / name)
            cache.put_many(zip(names, values))
            cache.get_many(names, out=out)  # warm
        if not all(torch.equal(o, v) for o, v in zip(out, values)):
            raise AssertionError("get_many returned other bytes than were put")
        load = os.getloadavg()
        samples: dict[str, list[float]] = {name: [] for name in caches}
        for s in range(args.samples):
            for name in (("old", "new") if s % 2 else ("new", "old")):
                cache = caches[name]
                start = time.thread_time()
                for _ in range(args.calls):
                    cache.get_many(names, out=out)
                samples[name].append(1e6 * (time.thread_time() - start) / args.calls)
    finally:
        for cache in caches.values():
            cache.close()
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"get_many of {n} x 384 KiB warm disk entries into decode-buffer slices, 1 torch thread, no read pool; "
          f"{args.samples} samples of {args.calls} calls; load average {load[0]:.2f} at the start, "
          f"{os.getloadavg()[0]:.2f} at the end")
    for name, values_ in samples.items():
        ordered = sorted(values_)
        print(f"{name}: CPU us per call min {ordered[0]:.1f}, p25 {ordered[len(ordered) // 4]:.1f}, "
              f"median {statistics.median(ordered):.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
