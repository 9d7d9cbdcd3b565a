"""Host-tier put / put_many / get / get_many (rows 3-4 of ``hotpath.py``) of several trees, in one process.

    python benchmarks/host_put_ab.py --tree old=/tmp/old --tree new=. --sizes 4096,65536 --threads 1,2 --repeats 15

Each ``--tree NAME=ROOT``'s ``tiercache`` is imported under its own module name, so all run in the same
process on the same values; the dict baseline (``base``: ``clone`` put, ``clone`` get, ``copy_`` into
``out`` tensors, as ``hotpath.host_vs_dict`` times it) runs beside them.  Per repeat every variant runs
once per size and thread count, in an order that rotates and alternates direction between repeats, so
each variant follows each other one about equally often (a fixed order biased one tree by 2-5 % at 64 KiB:
what runs right before, e.g. the baseline freeing 256 MiB, changes the next loop's memory).  Give the same
root twice (``--tree a=. --tree b=.``) for a control: the two should agree within the noise.  The trees
share one pool of recycled host arenas (``tiercache.tiers.memory.ARENA_POOL``; ``--own-arenas`` turns that
off), so they all write into the same memory: with a pool per tree, an identical third tree measured
8-12 % slower at 64 KiB in one run, in every op, i.e. an effect of where its arena lay, not of its code.

Per variant and op: the median and first quartile of CPU time per value (``time.thread_time``: on a loaded
machine the steadier figure), the median wall time, and the median of minor page faults per value
(``getrusage``), which tells a loop that wrote into fresh pages (the dict's clones when the C allocator
had handed the previous repeat's memory back to the kernel, the arena's first use) from one that did not."""

from __future__ import annotations

import argparse
import gc
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import MiB, host_ops, load_tree  # noqa: E402  (the benchmarks directory is not a package)


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def timed(fn: Callable[[], object], count: int) -> tuple[float, float, float]:
    """(wall s, CPU s, minor page faults) per value of one call of ``fn`` over ``count`` values."""
    gc.collect()
    f0, c0, t0 = _faults(), time.thread_time(), time.perf_counter()
    fn()
    t1, c1, f1 = time.perf_counter(), time.thread_time(), _faults()
    return (t1 - t0) / count, (c1 - c0) / count, (f1 - f0) / count


def run_variant(tc: Any, values: list[torch.Tensor], outs: list[torch.Tensor]) -> dict[str, tuple[float, float, float]]:
    """One variant's ops on ``values``: ``tc`` a tiercache module, or None for the dict baseline."""
    return host_ops(tc, values, outs, timed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append", required=True, metavar="NAME=ROOT",
                        help="a tree to time (repeat the option; NAME labels it)")
    parser.add_argument("--sizes", default="4096,65536", help="value sizes in bytes (default 4096,65536)")
    parser.add_argument("--bytes", type=int, default=128 * MiB,
                        help="bytes of values per size (default 128 MiB: 2,048 of 64 KiB); at most 20,000 values")
    parser.add_argument("--threads", default="1,2", help="torch thread counts (default 1,2)")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--no-base", action="store_true", help="leave the dict baseline out")
    parser.add_argument("--own-arenas", action="store_true",
                        help="let each tree keep its own ARENA_POOL (by default they share the first tree's, so "
                             "every tree writes into the same recycled arena memory)")
    args = parser.parse_args(argv)
    trees: dict[str, Any] = {}
    for spec in args.tree:
        name, sep, root = spec.partition("=")
        if not sep or not name or not name.isidentifier() or name == "base" or name in trees:
            parser.error(f"--tree wants NAME=ROOT with a new identifier NAME other than 'base', got {spec!r}")
        trees[name] = load_tree(f"tc_ab_{name}", Path(root).resolve())
    pools = [sys.modules.get(f"{tc.__name__}.tiers.memory") for tc in trees.values()]
    if not args.own_arenas and all(hasattr(m, "ARENA_POOL") for m in pools):
        for module in pools[1:]:  # every tree's host arenas come from (and go back to) one pool: the same memory
            module.ARENA_POOL = pools[0].ARENA_POOL  # type: ignore[union-attr]
    variants: list[str] = list(trees) + ([] if args.no_base else ["base"])
    sizes = [int(s) for s in args.sizes.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    gen = torch.Generator().manual_seed(0)
    data = {}
    for size in sizes:
        if size <= 0 or size % 4:
            parser.error(f"sizes must be positive multiples of 4 bytes, got {size}")
        count = max(1, min(20_000, args.bytes // size))
        values = [torch.randn(size // 4, generator=gen) for _ in range(count)]
        data[size] = (values, [torch.zeros_like(v) for v in values])
    print(f"load average at the start: {os.getloadavg()}; variants {variants}; "
          + ", ".join(f"{len(data[s][0])} values of {s} B" for s in sizes), flush=True)
    samples: dict[tuple[int, int, str, str], list[tuple[float, float, float]]] = {}
    for r in range(args.repeats):
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        if r % 2:
            order.reverse()
        for count in (threads if r % 2 else threads[::-1]):
            torch.set_num_threads(count)
            for size in sizes:
                for name in order:
                    ops = run_variant(trees.get(name), *data[size])
                    for op, sample in ops.items():
                        samples.setdefault((size, count, op, name), []).append(sample)
    print(f"load average at the end: {os.getloadavg()}")
    print("size B | threads | op | variant | CPU us median (p25) | wall us median | faults/value | CPU vs first tree")
    first = variants[0]
    for (size, count, op, name), values in sorted(samples.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2],
                                                                                   variants.index(kv[0][3]))):
        cpu = [v[1] for v in values]
        p25 = statistics.quantiles(cpu, n=4)[0] if len(cpu) > 1 else cpu[0]
        ref = statistics.median(v[1] for v in samples[(size, count, op, first)])
        print(f"{size} | {count} | {op} | {name} | {statistics.median(cpu) * 1e6:.2f} ({p25 * 1e6:.2f}) | "
              f"{statistics.median(v[0] for v in values) * 1e6:.2f} | {statistics.median(v[2] for v in values):.2f} | "
              f"{statistics.median(cpu) / ref:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
