"""Exact decode's grouped reads ahead vs one layer per read, CPU per decode step, in one process.

    python benchmarks/exact_group_ab.py                                  # 1K and 4K context, 1 thread
    python benchmarks/exact_group_ab.py --contexts 1015 --blocks 12 --variants 1:4,2:4,4:8

A ``TieredKVCache`` of SmolLM2's geometry (``benchmarks/hotpath_fetch.py``'s ``build``: random KV, no
weights, a 16 MiB host tier and the rest on a disk tier, page cache warm) decodes one token per layer per
step through ``update``, so a step is exact decode's cache work alone: the reads ahead (started, waited for,
used), the tail and new-token copies and the block writes, without the model.  Each variant
``GROUP:MAX_DEPTH`` sets the decode buffer's ``group`` and ``max_depth`` (a fixed schedule);
``GROUP:MAX_DEPTH:GROUP_MIB:BASE_DEPTH`` also its ``group_bytes`` and ``base_depth``.  ``1:4`` is the schedule
before grouped reads (one reader job and one ``get_many`` per layer), ``2:4`` the fixed two-at-a-time one
before byte-sized groups, ``2:8:8:4`` the default (``DecodeBuffer.schedule``).  Variants run in blocks of 5 steps (the first untimed: it settles the pipeline after
the switch), the order reversed every block; prints the median CPU (``time.process_time``: every thread,
the reader threads included) and wall ms per step, with the load average.
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
from _common import MiB, parse_ints  # noqa: E402  (the benchmarks directory is not a package)
import hotpath_fetch  # noqa: E402


def parse_variants(text: str) -> dict[str, tuple[int, int, int, int]]:
    """``"1:4,2:4,2:8:8:4"`` -> ``{"1:4": (1, 4, 0, 4), ..., "2:8:8:4": (2, 8, 8 MiB, 4)}``:
    ``GROUP:MAX_DEPTH`` (a fixed schedule: no ``group_bytes``) or ``GROUP:MAX_DEPTH:GROUP_MIB:BASE_DEPTH`` (the
    decode buffer's ``group``, ``max_depth``, ``group_bytes`` in MiB and ``base_depth``; ``2:8:8:4`` is the
    disk default, see ``DecodeBuffer.schedule``)."""
    out = {}
    for spec in text.split(","):
        parts = [int(x) for x in spec.split(":")]
        if len(parts) == 2:
            parts += [0, parts[1]]
        if len(parts) != 4 or min(parts[0], parts[1], parts[3]) < 1 or parts[2] < 0 or parts[3] > parts[1]:
            raise ValueError(f"variant {spec!r}: GROUP:MAX_DEPTH or GROUP:MAX_DEPTH:GROUP_MIB:BASE_DEPTH, "
                             "positive (GROUP_MIB >= 0), BASE_DEPTH <= MAX_DEPTH")
        group, depth, mib, base = parts
        out[spec] = (group, depth, mib * MiB, base)
    return out


def apply_variant(buffer: object, variant: tuple[int, int, int, int]) -> None:
    """Set a decode buffer's schedule to a :func:`parse_variants` value."""
    buffer.group, buffer.max_depth, buffer.group_bytes, buffer.base_depth = variant  # type: ignore[attr-defined]


def measure(config: object, context: int, variants: dict[str, tuple[int, int]], blocks: int,
            host: int = 16 * MiB) -> dict[str, tuple[float, float]]:
    """``{variant: (median CPU ms, median wall ms) per step}`` for one context (a fresh cache, removed after)."""
    workdir = Path(tempfile.mkdtemp(prefix="tiercache-group-ab-"))
    cache = hotpath_fetch.build(config, context, host, workdir)
    heads = config.num_key_value_heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    k, v = torch.randn(1, heads, 1, dim), torch.randn(1, heads, 1, dim)
    buffer, n_layers = cache.buffer, len(cache.layers)
    samples: dict[str, list[tuple[float, float]]] = {}
    try:
        for b in range(blocks):
            items = list(variants.items())
            for name, variant in (items if b % 2 == 0 else items[::-1]):
                buffer.discard()
                apply_variant(buffer, variant)
                for step in range(5):
                    c0, t0 = time.process_time(), time.perf_counter()
                    for i in range(n_layers):
                        cache.update(k, v, i)
                    if step:
                        samples.setdefault(name, []).append(
                            (1e3 * (time.process_time() - c0), 1e3 * (time.perf_counter() - t0)))
        assert cache.stats()["prefetch"]["failed"] == 0
    finally:
        cache.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return {name: (statistics.median(s[0] for s in xs), statistics.median(s[1] for s in xs))
            for name, xs in samples.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", choices=("smollm2", "tiny"))
    parser.add_argument("--contexts", default="1015,4071")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--blocks", type=int, default=12, help="blocks of 4 timed steps per variant")
    parser.add_argument("--variants", default="1:4,2:4,4:8,2:8:8:4",
                        help="GROUP:MAX_DEPTH[:GROUP_MIB:BASE_DEPTH],...")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = hotpath_fetch.model_config(args.model)
    variants = parse_variants(args.variants)
    print(f"load average at the start: {os.getloadavg()}")
    for context in parse_ints(args.contexts, "--contexts"):
        medians = measure(config, context, variants, args.blocks)
        print(f"context {context}, {args.threads} torch thread(s), {4 * args.blocks} steps per variant, "
              f"load {os.getloadavg()[0]:.2f}")
        print("  group:max_depth | CPU ms/step | wall ms/step")
        for name, (cpu, wall) in medians.items():
            print(f"  {name} | {cpu:.3f} | {wall:.3f}")
    print(f"load average at the end: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
