"""Sparse decode with joint K/V entries (one tiercache entry per block, the default) against two entries per
block (the layout before it, still used when K and V shapes differ): interleaved steps in one process, CPU,
cold disk (``direct_io``), host tier 25 % of the KV, as ``sparse_speed.py``.

    python benchmarks/sparse_joint_ab.py --context 8192 --batch 4 --strategies attention-aware,reuse-layer-ahead
    python benchmarks/sparse_joint_ab.py --synthetic 32768 --strategies attention-aware --steps 4
    python benchmarks/sparse_joint_ab.py --context 8192 --batch 4 --strategies attention-aware --layouts joint,overlap

For each strategy (``exact``: one cache, the reference row) the caches of every layout (``two``: every layer
made to store two entries per block; ``joint``; ``overlap``: joint with the pipeline's ``overlap_sync_reads``, the
synchronous reads overlapped with attention over the resident blocks) and every ``--block-sizes`` value are filled
with the same K/V;
each step feeds all of them the same token (the first cache's greedy choice), the order rotating, and checks
their logits are bit-identical (``overlap`` merges two partial attentions: equal within float32 rounding, the
max difference is printed; the fed token is the first cache's greedy choice).  Prints per cache the median wall
ms/step, forward-thread CPU ms/step (``time.thread_time``), disk entries read synchronously per step (and their
read time), the forward thread's time on synchronous reads (``wait``: the reads, or with ``overlap`` its wait
for them after the resident part's attention) and MiB fetched per tier per step; ``--json``
writes them.  ``--synthetic N``: the deep random config of ``sparse_speed.py`` at context ``N``, batch 1,
instead of SmolLM2 (its prefill: ``--prefill-cache`` as in ``sparse_variants.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_bench_model, stats_delta, torch_threads  # noqa: E402
import sparse_speed as sp  # noqa: E402
from sparse_variants import cached_prefill  # noqa: E402

import tiercache_llm.kv_cache as kvc  # noqa: E402
from tiercache_llm.hf_kwargs import cache_kwargs  # noqa: E402


def build(model: Any, strategy: str, budget: Any, kv: list, s: Any, path: Path, joint: bool,
          pipeline: dict | None = None) -> Any:
    """``sp.build_cache`` with every layer storing joint entries (``joint``) or two entries per block;
    ``pipeline``: ``PipelineConfig`` overrides."""
    original = kvc.TieredKVLayer.lazy_initialization

    def two(self, k, v):
        self.joint_entries = False
        return original(self, k, v)

    if not joint:
        kvc.TieredKVLayer.lazy_initialization = two
    cfg = sp.Config(strategy, None, "cold") if strategy == sp.EXACT else sp.Config(strategy, budget, "cold")
    try:
        cache = sp.build_cache(model, cfg, kv, s, path, pipeline=pipeline)
    finally:
        kvc.TieredKVLayer.lazy_initialization = original
    assert all(layer._joint is joint for layer in cache.layers if layer.is_initialized)
    return cache


def step_numbers(before: dict, after: dict) -> dict[str, float]:
    d = stats_delta(before, after)
    pipe = d.get("pipeline", {})
    fetched = d.get("sparse", {}).get("total", {}).get("bytes_fetched", {})
    out = {f"{t}_mib": n / 2**20 for t, n in fetched.items() if isinstance(n, (int, float))}
    out["sync_disk_entries"] = (pipe.get("sync") or {}).get("disk", 0)
    out["sync_host_entries"] = (pipe.get("sync") or {}).get("host", 0)
    out["needed_entries"] = pipe.get("needed", 0)
    out["fetch_ms"] = 1000 * d.get("sparse", {}).get("total", {}).get("fetch_seconds", 0.0)
    out["sync_disk_ms"] = 1000 * (pipe.get("sync_seconds") or {}).get("disk", 0.0)
    out["sync_wait_ms"] = 1000 * pipe.get("sync_wait_seconds", 0.0)
    out["slot_wait_ms"] = 1000 * pipe.get("slot_wait_seconds", 0.0)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--synthetic", type=int, default=0, help="context of the deep random config (batch 1) instead")
    p.add_argument("--budget", type=sp._budget, default=0.25)
    p.add_argument("--strategies", default="attention-aware,reuse-layer-ahead,fetch-every-step")
    p.add_argument("--block-sizes", default="", help="comma-separated block sizes (default: the cache's)")
    p.add_argument("--layouts", default="two,joint")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--prefill-cache", type=Path, default=None)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--synthetic-layers", type=int, default=48)
    a = p.parse_args(argv)
    if a.synthetic:
        model = sp.deep_model(a.synthetic_layers, a.synthetic + a.steps + a.warmup + 16)
        context = a.synthetic
        kv = sp.synthetic_kv(model, context - 1, seed=context)
        feed0 = torch.randint(3, 1024, (1, 1), generator=torch.Generator().manual_seed(context))
        point = f"synthetic {context - 1} x 1"
    else:
        model, tok = load_bench_model("smollm2")
        n = max(a.batch, 4)  # at least the 4 rows sparse_variants.py prefills (its --prefill-cache files serve)
        ids = sp.prompt_rows(tok, n, a.context, model.config.vocab_size)
        context = min(a.context, ids.shape[-1])
        with torch_threads(sp.DEFAULT_THREADS):
            rows = cached_prefill(model, ids, [context - 1] * n, a.prefill_cache)
        kv = sp.point_kv(rows[:a.batch], a.batch, context - 1)
        feed0 = ids[:a.batch, context - 1:context]
        point = f"smollm2 {context - 1} x {a.batch}"
    sizes = [int(x) for x in a.block_sizes.split(",") if x] or [None]
    print(f"{point}, budget {a.budget}, load {os.getloadavg()}", flush=True)
    results = []
    work = Path(tempfile.mkdtemp(prefix="tiercache-joint-ab-", dir=a.workdir))
    try:
        for strat in a.strategies.split(","):
            caches = {}
            # every (layout, block size) of a strategy: caches filled alike, their steps interleaved
            layouts = [f"{lay}/{bs}" if bs else lay for bs in sizes for lay in a.layouts.split(",")]
            if strat == sp.EXACT:  # the reference row: exact mode (joint entries since before this change)
                layouts = layouts[-1:]
            try:
                for lay in layouts:
                    name, _, bs = lay.partition("/")
                    s = sp.Settings(host_fraction=0.25, block_size=int(bs) if bs else None)
                    overlap = {"overlap_sync_reads": True} if name == "overlap" and strat != sp.EXACT else None
                    caches[lay] = build(model, strat, a.budget, kv, s, work / f"{strat}-{lay.replace('/', '-')}",
                                        name != "two", overlap)
                block = ", ".join(str(c.settings.block_size) for c in caches.values())
                runs = {lay: {"ms": [], "cpu_ms": [], "steps": []} for lay in layouts}
                feed, same, diff = feed0, True, 0.0
                load0 = os.getloadavg()
                with torch.no_grad(), torch_threads(1):
                    for step in range(a.warmup + a.steps):
                        order = layouts[step % len(layouts):] + layouts[:step % len(layouts)]
                        logits = {}
                        for lay in order:
                            c = caches[lay]
                            before = c.stats()
                            t0, c0 = time.perf_counter(), time.thread_time()
                            logits[lay] = model(input_ids=feed, **cache_kwargs(c, model)).logits[:, -1]
                            t, ct = time.perf_counter() - t0, time.thread_time() - c0
                            if step >= a.warmup:
                                runs[lay]["ms"].append(1000 * t)
                                runs[lay]["cpu_ms"].append(1000 * ct)
                                runs[lay]["steps"].append(step_numbers(before, c.stats()))
                        ref = logits[layouts[0]]
                        same &= all(torch.equal(ref, x) for x in logits.values())
                        diff = max([diff] + [float((ref - x).abs().max()) for x in logits.values()])
                        feed = ref.argmax(-1, keepdim=True)
                load1 = os.getloadavg()
            finally:
                for c in caches.values():
                    c.close()
            print(f"\n== {strat}, block {block}: logits identical across layouts: {same} (max |diff| {diff:.3g}); "
                  f"load {load0} -> {load1}")
            for lay in layouts:
                r = runs[lay]
                med = {k: statistics.median(st.get(k, 0.0) for st in r["steps"]) for k in
                       ("sync_disk_entries", "sync_host_entries", "needed_entries", "disk_mib", "host_mib",
                        "fetch_ms", "sync_disk_ms", "sync_wait_ms", "slot_wait_ms")}
                r["median_ms"], r["median_cpu_ms"] = statistics.median(r["ms"]), statistics.median(r["cpu_ms"])
                r["medians"] = med
                print(f"  {lay:9s}: {r['median_ms']:7.1f} ms/step (cpu {r['median_cpu_ms']:6.1f}) steps "
                      f"{[round(x) for x in r['ms']]}; per step: disk {med['disk_mib']:.1f} MiB / "
                      f"{med['sync_disk_entries']:.0f} sync entries ({med['sync_disk_ms']:.0f} ms, wait "
                      f"{med['sync_wait_ms']:.0f} ms; slot waits {med['slot_wait_ms']:.0f} ms), host "
                      f"{med['host_mib']:.1f} MiB, needed {med['needed_entries']:.0f} entries, fetch "
                      f"{med['fetch_ms']:.0f} ms", flush=True)
            results.append({"point": point, "strategy": strat, "block_size": block, "budget": a.budget,
                            "identical": same, "max_abs_diff": diff, "load": [load0, load1], "runs": runs})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
