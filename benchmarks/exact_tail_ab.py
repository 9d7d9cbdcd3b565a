"""A/B of exact decode's tail copy (issue 8 row 1 at 2 threads): one decode step's cache work, interleaved.

30 layers of SmolLM2's K/V shape (3 KV heads x 64), a 1015-token context all in the host tier, 256-token blocks
(hotpath row 1's 1K case: a 247-token tail), one new token per layer per step, cropped back after each step
so every step has the same tail.  ``old``: the tail copied as one ``copy_`` per K and V (a parallel region of
torch's threads when above torch's 32K-element copy grain); ``new``: ``kv_cache._copy_on_caller`` (pieces
below the grain, on the calling thread); ``dyn``: ``DynamicCache`` beside them.  Prints wall median / mean /
p90 and process CPU time per step, and the load average.

    python benchmarks/exact_tail_ab.py --threads 2 --steps 120
"""

from __future__ import annotations

import argparse
import os
import statistics as st
import time

import torch
from transformers import DynamicCache, LlamaConfig

from tiercache_llm import TieredKVCache, kv_cache


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=120, help="timed steps per configuration (interleaved)")
    ap.add_argument("--context", type=int, default=1015)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = LlamaConfig(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576,
                         vocab_size=128)
    gen = torch.Generator().manual_seed(0)
    prompt = [(torch.randn(1, 3, args.context, 64, generator=gen), torch.randn(1, 3, args.context, 64, generator=gen))
              for _ in range(30)]
    step = [(torch.randn(1, 3, 1, 64, generator=gen), torch.randn(1, 3, 1, 64, generator=gen)) for _ in range(30)]
    new_copy = kv_cache._copy_on_caller

    def old_copy(dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src)

    caches = {"dyn": DynamicCache(config=config), "old": TieredKVCache(config, host="256MiB"),
              "new": TieredKVCache(config, host="256MiB")}
    for cache in caches.values():
        for i, (k, v) in enumerate(prompt):
            cache.update(k, v, i)
    wall: dict[str, list[float]] = {n: [] for n in caches}
    cpu: dict[str, list[float]] = {n: [] for n in caches}
    print(f"threads {args.threads}, context {args.context}, load at start {os.getloadavg()}")
    names = list(caches)
    try:
        for r in range(args.steps):
            for name in names[r % 3:] + names[: r % 3]:
                kv_cache._copy_on_caller = old_copy if name == "old" else new_copy
                cache = caches[name]
                t0, c0 = time.perf_counter(), time.process_time()
                for i, (k, v) in enumerate(step):
                    cache.update(k, v, i)
                wall[name].append(1e3 * (time.perf_counter() - t0))
                cpu[name].append(1e3 * (time.process_time() - c0))
                cache.crop(-1)
    finally:
        kv_cache._copy_on_caller = new_copy
        for name in ("old", "new"):
            caches[name].close()
    for name in names:
        w = sorted(wall[name])
        print(f"{name}: ms/step wall median {st.median(w):.2f}, mean {st.mean(w):.2f}, p90 {w[int(0.9 * len(w))]:.2f}; "
              f"CPU median {st.median(cpu[name]):.2f}")
    print(f"load at end {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
