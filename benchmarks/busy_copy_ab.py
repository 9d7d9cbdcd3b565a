"""Exact decode's block copy on a busy machine: on the calling thread vs on torch's threads, in one process.

    python benchmarks/busy_copy_ab.py --threads 2,1 --blocks 7 --samples 400

What a memory-held layer's read costs the thread that makes it: ``--blocks`` joint K/V blocks of SmolLM2's
shape (``(2, 1, 3, 256, 64)`` float32, 384 KiB each, laid out one after the other as a batch of puts leaves
them in a CPU arena) copied into their block slices of a ``(2, 1, 3, tokens, 64)`` decode buffer.
Variants, interleaved sample by sample (the order flips every sample), each ``tiercache.batched.copy_pairs``
as on a busy machine (``machine_idle`` False; the benchmark's own load does not decide it): ``caller``, with
``BUSY_COPIES_ON_CALLER`` on (the blocks merged into one run and copied by ``numpy.copyto`` on the calling
thread, no parallel region: what it does since 2026-12-07 with more than one torch thread); ``merged``, with it
off (one strided torch copy of the run, on torch's threads: what it did before; on an idle machine it still
does); ``cat``, the ``torch.cat`` of the same keys and values with one more token (``DynamicCache``'s copy of the same
bytes).  Prints wall µs per sample (median, 90th and 99th percentile, mean) and the calling thread's CPU
µs, per torch thread count, and the load average.  On a machine whose cores other processes use, torch's
parallel copies wait for a descheduled team thread: the tail, not the median, is the figure to read.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import parse_ints  # noqa: E402  (the benchmarks directory is not a package)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", default="2,1", help="torch thread counts (default 2,1)")
    parser.add_argument("--blocks", type=int, default=7, help="blocks per copy (default 7: a 2K layer)")
    parser.add_argument("--tokens", type=int, default=256, help="tokens per block (default 256)")
    parser.add_argument("--samples", type=int, default=400)
    args = parser.parse_args(argv)
    if args.blocks < 1 or args.tokens < 1 or args.samples < 1:
        parser.error("--blocks, --tokens and --samples must be positive")
    from tiercache import batched

    n, tokens = args.blocks, args.tokens
    shape = (2, 1, 3, tokens, 64)
    block = 2 * 3 * tokens * 64
    arena = torch.randn(n * block + 1024, generator=torch.Generator().manual_seed(0))
    srcs = [arena[i * block:(i + 1) * block].view(shape) for i in range(n)]
    buffer = torch.zeros(2, 1, 3, n * tokens + 64, 64)
    dsts = list(buffer[:, :, :, : n * tokens].unflatten(3, (n, tokens)).unbind(3))
    keys, values = buffer[0, :, :, : n * tokens], buffer[1, :, :, : n * tokens]

    def busy(on_caller: bool) -> None:
        """``copy_pairs`` as on a busy machine (``machine_idle`` False), with ``BUSY_COPIES_ON_CALLER`` set."""
        saved = batched.BUSY_COPIES_ON_CALLER, batched.machine_idle
        batched.BUSY_COPIES_ON_CALLER, batched.machine_idle = on_caller, lambda: False
        try:
            batched.copy_pairs(dsts, srcs)
        finally:
            batched.BUSY_COPIES_ON_CALLER, batched.machine_idle = saved

    def caller() -> None:
        busy(True)

    def merged() -> None:
        busy(False)

    def cat() -> None:
        torch.cat([keys, keys[:, :, :1]], 2)
        torch.cat([values, values[:, :, :1]], 2)

    variants = {"caller": caller, "merged": merged, "cat": cat}
    for name in ("caller", "merged"):  # both write exactly the blocks
        buffer.zero_()
        variants[name]()
        if not all(torch.equal(d, s) for d, s in zip(dsts, srcs)) or buffer[:, :, :, n * tokens:].any():
            raise AssertionError(f"{name} wrote other bytes than the blocks")
    load = os.getloadavg()
    print(f"{n} blocks of {block * 4 >> 10} KiB into decode-buffer slices; {args.samples} samples; load average "
          f"{load[0]:.2f} at the start", flush=True)
    for count in parse_ints(args.threads, "--threads"):
        torch.set_num_threads(count)
        wall: dict[str, list[float]] = {name: [] for name in variants}
        cpu: dict[str, list[float]] = {name: [] for name in variants}
        order = list(variants)
        for s in range(args.samples):
            for name in (order if s % 2 else order[::-1]):
                c0, t0 = time.thread_time(), time.perf_counter()
                variants[name]()
                t1, c1 = time.perf_counter(), time.thread_time()
                wall[name].append(1e6 * (t1 - t0))
                cpu[name].append(1e6 * (c1 - c0))
        for name in variants:
            w = sorted(wall[name])
            print(f"threads {count} | {name}: wall us median {statistics.median(w):.0f}, p90 {w[int(len(w) * 0.9)]:.0f}, "
                  f"p99 {w[int(len(w) * 0.99)]:.0f}, mean {statistics.mean(w):.0f}; caller CPU us median "
                  f"{statistics.median(cpu[name]):.0f}")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
