"""Row 2's warm "fetch alone" with this tree's read-path settings against the earlier ones, in one process.

    python benchmarks/fetch_alone_ab.py                                  # 1K / 2K / 4K, 1 and 2 threads
    python benchmarks/fetch_alone_ab.py --contexts 3991 --threads 1 --repeats 21

A ``TieredKVCache`` of SmolLM2's geometry (``hotpath_fetch.build``: random KV, a 16 MiB host tier, the rest on
a disk tier, page cache warm) is read one decode step at a time by ``hotpath.fetch_alone`` (row 2's figure:
every layer read as decode reads it at that thread count), alternately with

- ``new``: the settings as they are;
- ``old``: the three read-path settings of before 2026-12-08 (helper warm9) put back for the call (``--parts``:
  also each alone, ``old:split`` / ``old:group`` / ``old:overlap``, printed after the ratios): buffered
  batches split over the disk tier's pool when ``spare_cpus`` allows (``disk.SPLIT_BUFFERED = True``), layers
  grouped two per job up to ``group_bytes`` (``decode_buffer.GROUP_MIN_FIT = 1``), and ``get_many``'s overlap
  check without the several-lattices proof (``overlap._lattices_disjoint`` answering ``False``);

and row 2's baseline, plain reads + copies of the same bytes (``hotpath_fetch``'s ``plain`` of both parts).
The order of the three flips every repeat.  Prints the median wall ms per step of each, the ratios to plain
and the load average at the start and the end.
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
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import MiB, parse_ints  # noqa: E402  (the benchmarks directory is not a package)


#: The earlier setting of each part of the change: ``(module, attribute, value)``.
OLD = {"split": ("tiercache.tiers.disk", "SPLIT_BUFFERED", True),
       "group": ("tiercache_llm.decode_buffer", "GROUP_MIN_FIT", 1),
       "overlap": ("tiercache.overlap", "_lattices_disjoint", lambda head, starts: False)}


def old_settings(fn: Callable[[], None], parts: tuple[str, ...] = tuple(OLD)) -> Callable[[], None]:
    """``fn`` run with the earlier settings of ``parts`` (keys of :data:`OLD`; default all), restored after
    (``hotpath_fetch.with_setting``, one per part)."""
    import importlib

    import hotpath_fetch

    for module, name, value in (OLD[p] for p in parts):
        fn = hotpath_fetch.with_setting(fn, (importlib.import_module(module), name, value))
    return fn


def measure(config, context: int, threads: int, repeats: int, parts: bool = False,
            host: int = 16 * MiB) -> dict[str, float]:
    """Median wall ms per step of each variant (``new``, ``old``, ``plain``; ``parts``: and ``old:PART``) for one
    context at ``threads`` torch threads, on a fresh cache (``host`` bytes of host tier) in a temp directory."""
    import hotpath
    import hotpath_fetch

    torch.set_num_threads(threads)
    workdir = Path(tempfile.mkdtemp(prefix="tiercache-fetch-alone-ab-"))
    cache = hotpath_fetch.build(config, context, host, workdir)
    try:
        methods, _ = hotpath_fetch.steps(cache, workdir)

        def new() -> None:
            hotpath.fetch_alone(cache, 1, lambda: None)

        def plain() -> None:
            methods["mem"]["plain"]()
            methods["disk"]["plain"]()

        runs = {"new": new, "old": old_settings(new), "plain": plain}
        if parts:  # each part of the change alone put back
            runs.update({f"old:{p}": old_settings(new, (p,)) for p in OLD})
        for fn in runs.values():
            fn()
        samples: dict[str, list[float]] = {k: [] for k in runs}
        items = list(runs.items())
        for r in range(repeats):
            for name, fn in (items if r % 2 == 0 else items[::-1]):
                start = time.perf_counter()
                fn()
                samples[name].append(1e3 * (time.perf_counter() - start))
        hotpath_fetch.steps.close()  # type: ignore[attr-defined]
    finally:
        cache.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return {k: statistics.median(v) for k, v in samples.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", choices=("smollm2", "tiny"), help="geometry (no weights)")
    parser.add_argument("--contexts", default="1015,2023,3991")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--parts", action="store_true",
                        help="also time each part of the change alone put back (old:split, old:group, old:overlap)")
    args = parser.parse_args(argv)
    import hotpath_fetch

    config = hotpath_fetch.model_config(args.model)
    print(f"load average at the start: {os.getloadavg()}")
    print("context | threads | new ms | old ms | plain ms | new / plain | old / plain | new / old")
    for context in parse_ints(args.contexts, "--contexts"):
        for threads in parse_ints(args.threads, "--threads"):
            m = measure(config, context, threads, args.repeats, args.parts)
            print(f"{context} | {threads} | {m['new']:.2f} | {m['old']:.2f} | {m['plain']:.2f} | "
                  f"{m['new'] / m['plain']:.2f} | {m['old'] / m['plain']:.2f} | {m['new'] / m['old']:.3f}"
                  + "".join(f" | {k} {v:.2f}" for k, v in m.items() if k.startswith("old:")), flush=True)
    print(f"load average at the end: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
