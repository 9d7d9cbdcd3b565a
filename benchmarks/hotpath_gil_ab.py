"""Old tree vs new tree: a reader thread's ``get_many`` of host-tier values beside a Python + torch loop
that stands for the model's forward pass, in one process, interleaved, medians.

    python benchmarks/hotpath_gil_ab.py --old /work/main --new . --batches 30 --repeats 24

Each tree's ``tiercache`` is imported under its own name (as ``hotpath_ab.py`` does) and keeps a host-only
cache of ``--keys`` values of ``--kib`` KiB (float32).  A sample starts a reader thread that calls
``get_many(keys, out=[...])`` ``--batches`` times into separate contiguous tensors (the sparse pipeline's
staging slots: each value is copied under the lookup, one ``memmove`` per value), and at once runs the
"forward" loop on the main thread: ``--iters`` small matmul / tanh steps, each a few torch ops with Python
between them, so it needs the GIL between ops as a model's forward does.  Printed per tree: the median wall
and CPU (``thread_time``) ms of the forward loop and the reader's wall ms for its batches.  The reading work
is fixed, so a shorter forward wall means the reader's batches stood less in its way.  One torch thread;
old and new alternate, the order flipping every repeat; load average printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hotpath_ab import load_tree  # noqa: E402  (the benchmarks directory is not a package)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", type=Path, required=True, help="root of the old tree (e.g. /work/main)")
    parser.add_argument("--new", type=Path, default=Path("."), help="root of the new tree (default: .)")
    parser.add_argument("--keys", type=int, default=96, help="values per get_many (default 96)")
    parser.add_argument("--kib", type=int, default=48, help="KiB per value (default 48: a 64-token block of "
                                                           "SmolLM2's K or V)")
    parser.add_argument("--batches", type=int, default=30, help="get_many calls per sample (default 30)")
    parser.add_argument("--iters", type=int, default=3000, help="forward loop steps per sample (default 3000)")
    parser.add_argument("--repeats", type=int, default=24)
    args = parser.parse_args(argv)
    if min(args.keys, args.kib, args.batches, args.iters, args.repeats) < 1:
        parser.error("--keys, --kib, --batches, --iters and --repeats must be positive")
    torch.set_num_threads(1)
    sys.path.insert(0, str(args.new.resolve() / "kernels"))
    trees = {"old": load_tree("tc_old", args.old.resolve()), "new": load_tree("tc_new", args.new.resolve())}
    shape = (3, args.kib * 256 // 192, 64) if args.kib * 256 % 192 == 0 else (args.kib * 256,)
    values = [torch.randn(shape) for _ in range(args.keys)]
    keys = [("k", i) for i in range(args.keys)]
    outs = [torch.empty(shape) for _ in keys]
    weight = torch.randn(64, 64)
    caches = {}
    for name, tree in trees.items():
        cache = caches[name] = tree.Cache(host=2 * sum(v.nbytes for v in values) + (16 << 20), disk=None)
        cache.put_many(zip(keys, values))
        cache.get_many(keys, out=outs)
    if not all(torch.equal(o, v) for o, v in zip(outs, values)):
        raise AssertionError("get_many returned other bytes than were put")

    def forward() -> None:
        x = torch.randn(8, 64)
        for _ in range(args.iters):
            x = torch.tanh(x @ weight) * 0.5 + 0.1

    samples: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": [], "reader": []} for name in caches}
    load = os.getloadavg()
    try:
        for r in range(args.repeats):
            for name in (list(caches) if r % 2 else list(caches)[::-1]):
                cache = caches[name]
                spent = [0.0]

                def reader(cache=cache, spent=spent) -> None:
                    start = time.perf_counter()
                    for _ in range(args.batches):
                        cache.get_many(keys, out=outs)
                    spent[0] = time.perf_counter() - start

                thread = threading.Thread(target=reader)
                thread.start()
                c0, t0 = time.thread_time(), time.perf_counter()
                forward()
                t1, c1 = time.perf_counter(), time.thread_time()
                thread.join()
                samples[name]["wall"].append(1e3 * (t1 - t0))
                samples[name]["cpu"].append(1e3 * (c1 - c0))
                samples[name]["reader"].append(1e3 * spent[0])
    finally:
        for cache in caches.values():
            cache.close()
    print(f"reader: {args.batches} get_many of {args.keys} x {values[0].nbytes >> 10} KiB host values into contiguous "
          f"tensors beside a forward loop of {args.iters} steps, 1 torch thread; {args.repeats} repeats; load average "
          f"{load[0]:.2f} at the start, {os.getloadavg()[0]:.2f} at the end")
    for name, got in samples.items():
        print(f"{name}: forward wall ms median {statistics.median(got['wall']):.1f} (CPU "
              f"{statistics.median(got['cpu']):.1f}), reader wall ms median {statistics.median(got['reader']):.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
