"""Time to the first decode step after a prefill, and the later steps, of sparse variants (CPU, SmolLM2, cold disk).

    python benchmarks/sparse_first_step.py --context 4096 --batch 4 --rounds 3 --steps 4 \\
        --variant attention-aware:legacy=true:warm_first_step=false --variant attention-aware \\
        --variant reuse-layer-ahead:legacy=true:warm_first_step=false \\
        --variant reuse-layer-ahead --prefill-cache /tmp/prefill

Every ``--variant STRATEGY:FIELD=VALUE:...`` (as in ``sparse_variants.py``: the fields are
:class:`~tiercache_llm.sparse.pipeline.PipelineConfig` overrides, values parsed as JSON) gets, in each of
``--rounds`` rounds, a fresh sparse ``TieredKVCache`` filled with the same prefilled K/V (host tier 25 % of
the KV, disk the rest with ``direct_io``, as in ``sparse_speed.py``).  The variant field ``legacy=true`` (taken by
this script, not a pipeline field) restores the pool-view creation of before the first-step work
(:func:`lazy_views`), so the old pipeline runs in the same process as the new.  In a round the variants go one after
another, the order rotating by one each round: fill (timed: ``fill s``, what a prefill would add), its
first decode step at once (timed: ``first ms``; the cache's per-stage seconds of that step are kept), then
``--steps`` later steps of all variants interleaved (step ``i`` of every variant before step ``i + 1`` of
any).  Prints per variant the median first-step ms and the median of the later steps over all rounds,
with the ratio to the first variant of the same strategy (run in the same process, interleaved), and
``--out DIR`` writes ``sparse_first_step.json`` / ``.md``.  Timing at 1 torch thread.  Memory: every
variant's cache lives through a round (~1.3 GB each at 4K x 4).
"""

from __future__ import annotations

import gc
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_meta, median, stats_delta, torch_threads  # noqa: E402
from sparse_variants import (  # noqa: E402
    parsed_variants, prefilled_point, step_figures, variant_parser, write_results,
)
import sparse_speed as sp  # noqa: E402
from tiercache_llm.hf_kwargs import cache_kwargs  # noqa: E402

FIRST_KEYS = ("sparse.total.fetch_seconds", "pipeline.sync_seconds.disk", "pipeline.sync_seconds.host",
              "pipeline.copy_seconds", "sparse.total.attention_seconds", "sparse.total.scoring_seconds",
              "pipeline.warm_seconds")


def lazy_views(pipe: Any) -> None:
    """Give ``pipe`` the pool-view creation of before the first-step work (commit ``843b0d4``): one view per layer
    made at the layer's first fetch, so the arena's first allocation reserves rows for one layer and the first
    step reallocates it as the views appear (the ``legacy=true`` variant field; with ``warm_first_step=false`` it is
    the pipeline of that commit)."""
    from tiercache_llm.sparse.pipeline import DecodePipeline

    def _pool_of(layer_idx: int) -> Any:
        pool = pipe._pools.get(layer_idx)
        if pool is None:
            pool = pipe._pools[layer_idx] = pipe._arena.pool()
        return pool

    assert hasattr(DecodePipeline, "_pool_of")
    pipe._pool_of = _pool_of


def run_round(model: Any, variants: list[tuple[str, str, dict]], kv: list, s: Any, budget: Any, feed: torch.Tensor,
              steps: int, shift: int, work: Path) -> list[dict[str, Any]]:
    """One round: per variant (rotated by ``shift``) fill + first step, then ``steps`` interleaved later steps."""
    order = list(range(len(variants)))
    order = order[shift % len(order):] + order[:shift % len(order)]
    runs: dict[int, dict[str, Any]] = {}
    try:
        with torch.no_grad(), torch_threads(1):
            for i in order:
                _, name, overrides = variants[i]
                overrides = dict(overrides)
                legacy = overrides.pop("legacy", False)
                gc.collect()
                t = time.perf_counter()
                cache = sp.build_cache(model, sp.Config(name, budget, "cold"), kv, s, work / f"{shift}-{i}",
                                       pipeline=overrides or None)
                if legacy:
                    lazy_views(cache._pipeline)
                fill = time.perf_counter() - t
                before = cache.stats()
                t = time.perf_counter()
                nxt = model(input_ids=feed, **cache_kwargs(cache, model)).logits[:, -1].argmax(-1, keepdim=True)
                first = time.perf_counter() - t
                after = cache.stats()
                stages, _ = step_figures(before, after)
                pipe = stats_delta(before, after).get("pipeline", {})
                runs[i] = {"cache": cache, "feed": nxt, "fill_s": fill, "first_ms": 1000 * first, "later_ms": [],
                           "first_stages": stages,
                           "first_pool": {k: after["pipeline"].get(k) for k in
                                          ("pool_slots", "pool_reallocs", "pool_grows", "reuse_bytes", "warm_bytes")},
                           "first_pipe": {k: pipe.get(k) for k in ("needed", "reused", "staged", "sync")}}
            for step in range(steps):
                k = (shift + step) % len(order)
                for i in order[k:] + order[:k]:
                    r = runs[i]
                    t = time.perf_counter()
                    r["feed"] = model(input_ids=r["feed"], **cache_kwargs(r["cache"], model)).logits[:, -1].argmax(-1, keepdim=True)
                    r["later_ms"].append(1000 * (time.perf_counter() - t))
        for r in runs.values():
            pipe = r["cache"].stats()["pipeline"]
            r["end_pool"] = {k: pipe.get(k) for k in ("warm_bytes", "prefault_bytes", "prefault_seconds", "pool_reallocs")}
    finally:
        for r in runs.values():
            r["cache"].close()
    return [{k: v for k, v in runs[i].items() if k not in ("cache", "feed")} for i in range(len(variants))]


def markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [f"# First decode step: {meta['model']}, context {meta['context']} x batch {meta['batch']}, budget "
             f"{meta['budget']}, host tier 25 % of the KV, disk O_DIRECT, {meta['rounds']} rounds x "
             f"{meta['steps']} later steps, 1 thread", "",
             "Medians; ratios against the first variant of the same strategy, same process, interleaved.", "",
             "| variant | fill s | first ms | first / base | later ms | later / base | first: copy ms | first: sync disk ms "
             "| first: sync host ms |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| `{r['spec']}` | {r['fill_s']:.1f} | {r['first_ms']:.0f} | {r['first_ratio']:.2f} | "
                     f"{r['later_ms']:.0f} | {r['later_ratio']:.2f} | {r['copy_ms']:.0f} | {r['disk_ms']:.0f} | "
                     f"{r['host_ms']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = variant_parser(__doc__.split("\n\n")[0], context=4096)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="later steps per variant and round")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.steps < 1 or args.context < 2 or args.batch < 1:
        parser.error("need --rounds >= 1, --steps >= 1, --context >= 2, --batch >= 1")
    variants = parsed_variants(parser, args)
    model, ids, context, kv = prefilled_point(args, args.steps + 1)
    s = sp.Settings(host_fraction=0.25, block_size=args.block_size)
    work = Path(tempfile.mkdtemp(prefix="tiercache-first-step-", dir=args.workdir))
    per: list[list[dict[str, Any]]] = [[] for _ in variants]
    try:
        for rnd in range(args.rounds):
            got = run_round(model, variants, kv, s, args.budget, ids[:, context - 1:context], args.steps, rnd, work)
            for i, g in enumerate(got):
                per[i].append(g)
                print(f"round {rnd} {variants[i][0]}: fill {g['fill_s']:.1f} s, first {g['first_ms']:.0f} ms, later "
                      + " ".join(f"{x:.0f}" for x in g["later_ms"]) + " | first stages "
                      + ", ".join(f"{k.split('.', 1)[1]} {1000 * g['first_stages'].get(k, 0.0):.0f}" for k in FIRST_KEYS)
                      + f" | pool {g['first_pool']} | pipe {g['first_pipe']} | at the end {g.get('end_pool')}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rows_out = []
    base: dict[str, dict[str, float]] = {}
    for (spec, name, _), rounds in zip(variants, per):
        row = {"spec": spec, "strategy": name,
               "fill_s": median(r["fill_s"] for r in rounds),
               "first_ms": median(r["first_ms"] for r in rounds),
               "later_ms": median(x for r in rounds for x in r["later_ms"]),
               "copy_ms": 1000 * median(r["first_stages"].get("pipeline.copy_seconds", 0.0) for r in rounds),
               "disk_ms": 1000 * median(r["first_stages"].get("pipeline.sync_seconds.disk", 0.0) for r in rounds),
               "host_ms": 1000 * median(r["first_stages"].get("pipeline.sync_seconds.host", 0.0) for r in rounds),
               "rounds": rounds}
        b = base.setdefault(name, row)
        row["first_ratio"] = row["first_ms"] / b["first_ms"]
        row["later_ratio"] = row["later_ms"] / b["later_ms"]
        rows_out.append(row)
        print(f"== {spec}: fill {row['fill_s']:.1f} s, first step {row['first_ms']:.0f} ms ({row['first_ratio']:.2f}x "
              f"base), later steps {row['later_ms']:.0f} ms ({row['later_ratio']:.2f}x base); first step copy "
              f"{row['copy_ms']:.0f} ms, sync disk {row['disk_ms']:.0f} ms, sync host {row['host_ms']:.0f} ms")
    if args.out:
        meta = {"model": args.model, "context": context, "batch": args.batch, "budget": args.budget, "rounds": args.rounds,
                "steps": args.steps, "block_size": args.block_size, "host_fraction": s.host_fraction, "threads": 1,
                "machine": machine_meta(), "command": " ".join(sys.argv)}
        write_results(args.out, "sparse_first_step", {**meta, "variants": rows_out}, markdown(meta, rows_out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
