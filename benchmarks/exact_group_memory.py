"""Decode-buffer memory and step time of exact decode's grouped reads ahead, ``GROUP:MAX_DEPTH[:GROUP_MIB:BASE_DEPTH]`` variants (``exact_group_ab.parse_variants``), one cache.

    python benchmarks/exact_group_memory.py                                   # SmolLM2 geometry, 8K x 4, direct_io
    python benchmarks/exact_group_memory.py --context 1015 --batch 1 --variants 2:4,4:8

A ``TieredKVCache`` of SmolLM2-135M's geometry (its config only: random KV, no weights) holds ``--context``
tokens of ``--batch`` sequences with a 16 MiB host tier and the rest on a disk tier under ``--workdir``
(``--direct-io``, the default, reads past the page cache).  For each variant the decode buffer is released
(so its high-water mark starts from nothing), set to that ``group`` and ``max_depth``, and ``--steps``
decode steps of one-token updates through every layer run (the first untimed); the variants alternate,
order reversed every repeat.  Prints per variant the decode buffer's peak bytes (``DecodeBuffer.peak_bytes``:
every slot buffer allocated, plus temporaries of reads ahead) and the median CPU and wall ms per step
(cache work alone, no model), with the load average; ``main`` returns them (``{variant: {"peak": bytes,
"cpu": [ms...], "wall": [ms...]}}``).
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
import hotpath_fetch  # noqa: E402
from exact_group_ab import apply_variant, parse_variants  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", choices=("smollm2", "tiny"))
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--variants", default="2:4,2:8:8:4", help="GROUP:MAX_DEPTH[:GROUP_MIB:BASE_DEPTH],...")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--direct-io", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--workdir", type=Path, default=None, help="scratch directory on the real disk")
    args = parser.parse_args(argv)
    variants = list(parse_variants(args.variants).items())
    torch.set_num_threads(1)
    from tiercache_llm import TieredKVCache

    config = hotpath_fetch.model_config(args.model)
    heads = config.num_key_value_heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    layers = config.num_hidden_layers
    workdir = Path(tempfile.mkdtemp(prefix="tiercache-group-memory-", dir=args.workdir))
    kv_bytes = layers * 2 * args.batch * heads * args.context * dim * 4
    cache = TieredKVCache(config, host=16 * MiB, disk=2 * kv_bytes + 256 * MiB, path=workdir / "kv",
                          direct_io=args.direct_io)
    samples: dict[str, dict] = {}
    try:
        gen = torch.Generator().manual_seed(0)
        for i in range(layers):
            cache.update(torch.randn(args.batch, heads, args.context, dim, generator=gen),
                         torch.randn(args.batch, heads, args.context, dim, generator=gen), i)
        k1, v1 = torch.randn(args.batch, heads, 1, dim), torch.randn(args.batch, heads, 1, dim)
        buffer = cache.buffer
        print(f"load average at the start: {os.getloadavg()}; {kv_bytes / MiB:.0f} MiB of KV, "
              f"direct_io requested: {args.direct_io}")
        for r in range(args.repeats):
            for name, variant in (variants if r % 2 == 0 else variants[::-1]):
                buffer.release()
                buffer.peak_bytes = 0
                apply_variant(buffer, variant)
                out = samples.setdefault(name, {"cpu": [], "wall": [], "peak": 0})
                for step in range(args.steps):
                    c0, t0 = time.process_time(), time.perf_counter()
                    for i in range(layers):
                        cache.update(k1, v1, i)
                    if step:
                        out["cpu"].append(1e3 * (time.process_time() - c0))
                        out["wall"].append(1e3 * (time.perf_counter() - t0))
                out["peak"] = max(out["peak"], buffer.peak_bytes)
        assert cache.stats()["prefetch"]["failed"] == 0
    finally:
        cache.close()
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"context {args.context} x batch {args.batch}, {args.repeats * (args.steps - 1)} steps per variant, "
          f"load {os.getloadavg()[0]:.2f}")
    print("  group:max_depth | peak decode buffer MiB | CPU ms/step | wall ms/step")
    for name, out in samples.items():
        print(f"  {name} | {out['peak'] / MiB:.0f} | {statistics.median(out['cpu']):.1f} | "
              f"{statistics.median(out['wall']):.1f}")
    return samples


if __name__ == "__main__":
    main()
