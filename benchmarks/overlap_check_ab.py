"""The cost of ``get_many(keys, out=[...])``'s overlap check (:mod:`tiercache.overlap`), in one process: the same
call with the check and with it stubbed out, alternating sample by sample.

    python benchmarks/overlap_check_ab.py --keys 3000 --samples 41

A host-only cache holds ``--keys`` float32 values of 1024 elements (4 KiB); each sample is one
``get_many(keys, out=outs)`` timed with ``time.perf_counter``, ``outs`` one of these layouts:

- ``rows``: the rows of one ``(keys, 1024)`` buffer (contiguous slices in address order);
- ``separate``: one tensor each (extents in allocator order);
- ``blocks``: token blocks of a ``(2 heads, keys * 8 tokens, 64)`` buffer, ``(2, 8, 64)`` each: interleaved
  strided views, as exact decode reads a layer's blocks (proven disjoint from their strides);
- ``check-only``: :func:`tiercache.overlap.check_disjoint` alone on the ``blocks`` and ``rows`` layouts.

"Without" is the same call with :data:`tiercache.overlap.CHECK_OUT_OVERLAP` off.

Prints the median µs per call with and without the check, their difference and ratio, and the load average
at start and end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import tiercache
import tiercache.overlap as overlap
from tiercache.overlap import check_disjoint


def layouts(n: int) -> dict[str, list[torch.Tensor]]:
    rows = torch.empty(n, 1024)
    blocks = torch.empty(2, n * 8, 64)
    return {
        "rows": list(rows.unbind(0)),
        "separate": [torch.empty(1024) for _ in range(n)],
        "blocks": list(blocks.unflatten(1, (n, 8)).unbind(1)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, default=3000)
    parser.add_argument("--samples", type=int, default=41)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"load average at start: {os.getloadavg()}; torch threads {args.threads}; keys {args.keys}")
    cache = tiercache.Cache(host=f"{args.keys * 8}KiB")
    keys = [("k", i) for i in range(args.keys)]
    cache.put_many([(k, torch.full((1024,), float(i))) for i, k in enumerate(keys)])
    for name, outs in layouts(args.keys).items():
        times: dict[str, list[float]] = {"with": [], "without": []}
        for s in range(args.samples):
            for mode in (("with", "without") if s % 2 else ("without", "with")):
                overlap.CHECK_OUT_OVERLAP = mode == "with"
                t0 = time.perf_counter()
                cache.get_many(keys, out=outs)
                times[mode].append(time.perf_counter() - t0)
        overlap.CHECK_OUT_OVERLAP = True
        w, wo = statistics.median(times["with"]) * 1e6, statistics.median(times["without"]) * 1e6
        print(f"{name:9s} get_many median {wo:9.1f} µs without the check, {w:9.1f} µs with: +{w - wo:7.1f} µs "
              f"({w / wo:.3f}x)")
        if name in ("rows", "blocks"):
            alone = []
            for _ in range(args.samples):
                t0 = time.perf_counter()
                check_disjoint(outs, keys)
                alone.append(time.perf_counter() - t0)
            print(f"{'':9s} check_disjoint alone: median {statistics.median(alone) * 1e6:.1f} µs")
    cache.close()
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
