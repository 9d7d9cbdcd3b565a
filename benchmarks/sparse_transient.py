"""The first decode steps after a fill, step by step: the forward thread's stages and what the background does.

    python benchmarks/sparse_transient.py --steps 12 --rounds 3 --variant reuse-layer-ahead \\
        --variant attention-aware --prefill-cache /work/prefill --out /tmp/transient
    python benchmarks/sparse_transient.py --model tiny --context 256 --batch 2 --block-size 16 --steps 3 \\
        --rounds 1 --variant attention-aware          # seconds

``sparse_speed.py`` times a few steps right after each cache is filled; a strategy whose placement keeps
working for several steps after a fill (promotions from disk into the host tier, the demotions they cause,
staging reads, pool prefaulting) pays a transient there that a long decode does not.  This script shows it:
per round, every ``--variant STRATEGY:FIELD=VALUE:...`` (``PipelineConfig`` overrides, as in
``sparse_variants.py``) in turn, the order rotating by one each round, gets a fresh cache filled from the
point's prefilled K/V (untimed, as in ``sparse_speed.py``: host tier 25 % of the KV, disk the rest with
``direct_io``), decodes ``--steps`` steps (step 0 = the first after the fill) and is closed before the next
is built: one cache alive at a time, so no other cache's background work overlaps.  Per step it records
the wall time, the forward thread's CPU time, the cache's per-stage seconds, the CPU time of every thread
by name (from ``/proc/self/task/*/schedstat``, between the starts of consecutive steps: a step's
end-of-step work counts in the step it follows), bytes moved between tiers (promotions ``disk->host``,
demotions ``host->disk``), bytes read from / written to each tier, and the pipeline's entries.  Prints per
variant the per-step medians over the rounds; ``--out DIR`` writes ``sparse_transient.json`` (every step of
every round) and ``sparse_transient.md``.  Timing at 1 torch thread; the prefill (kept in
``--prefill-cache``) at the default count.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from tiercache_llm.hf_kwargs import cache_kwargs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_meta, median, release_memory, stats_delta, torch_threads  # noqa: E402
import sparse_speed as sp  # noqa: E402
from sparse_variants import parsed_variants, prefilled_point, variant_parser, write_results  # noqa: E402

MiB = float(1 << 20)
# (column, dotted path in a stats() delta, scale): seconds -> ms, bytes -> MiB
FIGURES: tuple[tuple[str, str, float], ...] = (
    ("score", "sparse.total.scoring_seconds", 1e3),
    ("attn", "sparse.total.attention_seconds", 1e3),
    ("fetch", "sparse.total.fetch_seconds", 1e3),
    ("copy", "pipeline.copy_seconds", 1e3),
    ("place", "sparse.total.placement_seconds", 1e3),
    ("sync_disk", "pipeline.sync_seconds.disk", 1e3),
    ("sync_host", "pipeline.sync_seconds.host", 1e3),
    ("bg_read", "pipeline.staging.background_seconds", 1e3),
    ("after_step", "pipeline.after_step_seconds", 1e3),
    ("after_wait", "pipeline.after_step_wait_seconds", 1e3),
    ("kv_fetch", "kv.fetch_seconds", 1e3),
    ("kv_put", "kv.put_seconds", 1e3),
    ("prefault_s", "pipeline.prefault_seconds", 1e3),
    ("prefault_MiB", "pipeline.prefault_bytes", 1 / MiB),
    ("warm_MiB", "pipeline.warm_bytes", 1 / MiB),
    ("promoted_MiB", "tiercache.bytes_moved.disk->host", 1 / MiB),
    ("demoted_MiB", "tiercache.bytes_moved.host->disk", 1 / MiB),
    ("disk_read_MiB", "tiercache.tiers.disk.bytes_read", 1 / MiB),
    ("disk_write_MiB", "tiercache.tiers.disk.bytes_written", 1 / MiB),
    ("host_read_MiB", "tiercache.tiers.host.bytes_read", 1 / MiB),
    ("kv_put_MiB", "kv.bytes_put", 1 / MiB),
    ("needed", "pipeline.needed", 1.0),
    ("reused", "pipeline.reused", 1.0),
    ("staged", "pipeline.staged", 1.0),
    ("stage_jobs", "pipeline.stage_ahead_entries", 1.0),
    ("pool_grows", "pipeline.pool_grows", 1.0),
    ("evicted", "pipeline.pool_evicted", 1.0),
)
# columns printed per step (the JSON keeps every figure and every thread)
SHOWN = ("wall", "fwd_cpu", "score", "attn", "fetch", "copy", "place", "sync_disk", "bg_read", "prefault_MiB",
         "promoted_MiB", "demoted_MiB", "disk_read_MiB", "disk_write_MiB", "pool_MiB")
# thread groups printed per step (CPU ms); the rest is summed into "other"
THREADS = ("tiercache-kv-stage", "tiercache-kv-after-step", "tiercache-kv-prefault", "tiercache-kv-writer",
           "tiercache-disk", "tiercache-io")


def thread_group(name: str) -> str:
    """A thread's group: its name without an executor's ``_N`` suffix; the main thread is ``forward``."""
    if name == "MainThread":
        return "forward"
    return re.sub(r"_\d+$", "", name)


def thread_cpu() -> dict[str, float]:
    """CPU seconds so far of this process's live threads, summed by :func:`thread_group` (Python threads by
    their name, others ``native:<comm>``; a thread that exited meanwhile drops out of later samples)."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    out: dict[str, float] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                ns = int(f.read().split()[0])
            name = names.get(int(tid))
            if name is None:
                with open(f"/proc/self/task/{tid}/comm") as f:
                    name = "native:" + f.read().strip()
        except (OSError, ValueError, IndexError):
            continue
        group = thread_group(name)
        out[group] = out.get(group, 0.0) + ns / 1e9
    return out


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """CPU ms per thread group between two :func:`thread_cpu` samples (a group new in ``after`` counts from 0)."""
    return {k: 1e3 * (v - before.get(k, 0.0)) for k, v in after.items() if v - before.get(k, 0.0) > 0}


def dotted(d: Any, path: str) -> float:
    for part in path.split("."):
        if not isinstance(d, dict) or part not in d:
            return 0.0
        d = d[part]
    return float(d) if isinstance(d, (int, float)) and not isinstance(d, bool) else 0.0


def figures(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    delta = stats_delta(before, after)
    return {name: scale * dotted(delta, path) for name, path, scale in FIGURES}


def decode_round(model: Any, cache: Any, feed: torch.Tensor, steps: int, settle: float) -> tuple[list[dict], dict]:
    """``steps`` greedy decode steps on a freshly filled ``cache``; per step the wall and forward-thread CPU
    ms, :func:`figures` and thread CPU between the starts of consecutive steps (the last: to its end)."""
    records: list[dict] = []
    settle_cpu: dict[str, float] = {}
    if settle > 0:  # diagnostic: let the fill's background work finish before the first step
        c0 = thread_cpu()
        time.sleep(settle)
        settle_cpu = cpu_delta(c0, thread_cpu())
    with torch.no_grad(), torch_threads(1):
        stats0, cpu0 = cache.stats(), thread_cpu()
        settle_cpu["seed_ms"] = 1e3 * dotted(stats0, "pipeline.seed_seconds")  # pools seeded by the fill
        settle_cpu["seeded"] = dotted(stats0, "pipeline.seeded")
        for i in range(steps):
            t0, f0 = time.perf_counter(), time.thread_time()
            feed = model(input_ids=feed, **cache_kwargs(cache, model)).logits[:, -1].argmax(-1, keepdim=True)
            wall, fwd = time.perf_counter() - t0, time.thread_time() - f0
            stats1, cpu1 = cache.stats(), thread_cpu()
            rec = {"step": i, "wall": 1e3 * wall, "fwd_cpu": 1e3 * fwd, **figures(stats0, stats1),
                   "pool_MiB": dotted(stats1, "pipeline.reuse_bytes") / MiB,
                   "beside_MiB": dotted(stats1, "kv.beside_tiers_bytes") / MiB, "threads": cpu_delta(cpu0, cpu1)}
            records.append(rec)
            stats0, cpu0 = stats1, cpu1
    return records, settle_cpu


def per_step_medians(rounds: list[list[dict]]) -> list[dict[str, Any]]:
    """Per step index, the median over rounds of every figure and every thread group's CPU ms."""
    out = []
    for i in range(min(len(r) for r in rounds)):
        recs = [r[i] for r in rounds]
        med: dict[str, Any] = {"step": i}
        for key in recs[0]:
            if key not in ("step", "threads"):
                med[key] = median(rec[key] for rec in recs)
        groups = sorted({g for rec in recs for g in rec["threads"]})
        med["threads"] = {g: median(rec["threads"].get(g, 0.0) for rec in recs) for g in groups}
        out.append(med)
    return out


def table(spec: str, meds: list[dict[str, Any]]) -> str:
    cols = list(SHOWN) + [f"cpu:{t.replace('tiercache-', '')}" for t in THREADS] + ["cpu:other"]
    lines = [f"### `{spec}`", "", "| step | " + " | ".join(cols) + " |", "|---:|" + "---:|" * len(cols)]
    for m in meds:
        th = m["threads"]
        other = sum(v for k, v in th.items() if k not in THREADS and k != "forward")
        vals = [m[c] for c in SHOWN] + [th.get(t, 0.0) for t in THREADS] + [other]
        lines.append(f"| {m['step']} | " + " | ".join(f"{v:.0f}" if abs(v) >= 10 else f"{v:.1f}" for v in vals) + " |")
    return "\n".join(lines) + "\n"


def summary(meds: list[dict[str, Any]], skip: int) -> dict[str, float]:
    """Medians over steps ``skip..`` of the per-step medians (the steady part) and the mean of steps
    ``1..`` (what a decode of that many tokens pays per token after the first)."""
    tail = meds[skip:]
    later = meds[1:]
    return {"steady_wall": median(m["wall"] for m in tail), "steady_fwd_cpu": median(m["fwd_cpu"] for m in tail),
            "mean_wall_after_first": sum(m["wall"] for m in later) / max(1, len(later))}


def main(argv: list[str] | None = None) -> int:
    parser = variant_parser(__doc__.split("\n\n")[0], context=8192)
    parser.add_argument("--steps", type=int, default=12, help="decode steps per round after the fill")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--settle", type=float, default=0.0,
                        help="seconds to sleep between the fill and the first step (diagnostic; default 0)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.rounds < 1 or args.context < 2 or args.batch < 1:
        parser.error("need --steps >= 1, --rounds >= 1, --context >= 2, --batch >= 1")
    variants = parsed_variants(parser, args)
    model, ids, context, kv = prefilled_point(args, args.steps)
    s = sp.Settings(host_fraction=0.25, block_size=args.block_size)
    work = Path(tempfile.mkdtemp(prefix="tiercache-sparse-transient-", dir=args.workdir))
    feed = ids[:, context - 1:context]
    # per round: fill wall ms, thread CPU during the fill, and (after_fill) thread CPU of --settle plus the pools'
    # seeding by the fill (seed_ms, seeded blocks)
    runs = [{"spec": spec, "rounds": [], "fill_ms": [], "fill_threads": [], "after_fill": []} for spec, _, _ in variants]
    load = [os.getloadavg()]
    try:
        for rnd in range(args.rounds):
            order = list(range(len(variants)))
            order = order[rnd % len(order):] + order[:rnd % len(order)]
            for n in order:
                spec, name, overrides = variants[n]
                store = work / f"{n}-{rnd}"
                c0, t0 = thread_cpu(), time.perf_counter()
                cache = sp.build_cache(model, sp.Config(name, args.budget, "cold"), kv, s, store, pipeline=overrides or None)
                runs[n]["fill_ms"].append(1e3 * (time.perf_counter() - t0))
                runs[n]["fill_threads"].append(cpu_delta(c0, thread_cpu()))
                try:
                    records, settled = decode_round(model, cache, feed, args.steps, args.settle)
                finally:
                    cache.close()
                    del cache
                    shutil.rmtree(store, ignore_errors=True)
                    release_memory()
                runs[n]["rounds"].append(records)
                runs[n]["after_fill"].append(settled)
                m = records
                print(f"round {rnd} {spec}: wall " + " ".join(f"{r['wall']:.0f}" for r in m)
                      + " | fwd cpu " + " ".join(f"{r['fwd_cpu']:.0f}" for r in m), flush=True)
            load.append(os.getloadavg())
    finally:
        shutil.rmtree(work, ignore_errors=True)

    md = [f"# First decode steps after a fill: {args.model}, context {context} x batch {args.batch}, budget "
          f"{args.budget}, {args.rounds} rounds x {args.steps} steps, 1 thread, cold", "",
          f"Per step (0 = the first after the fill), the median over rounds; ms (wall, forward-thread CPU, stages, "
          f"thread CPU between step starts), MiB (bytes). Load average: {load[0][0]:.2f} at the start, "
          f"{max(x[0] for x in load):.2f} at most.", ""]
    skip = min(6, args.steps - 1)
    for r in runs:
        r["medians"] = per_step_medians(r["rounds"])
        r["summary"] = summary(r["medians"], skip)
        text = table(r["spec"], r["medians"])
        print("\n" + text)
        seed = median(a.get("seed_ms", 0.0) for a in r["after_fill"])
        print(f"   fill ms {median(r['fill_ms']):.0f} (pools seeded in {seed:.0f}); steady (steps {skip}+) wall {r['summary']['steady_wall']:.0f}, "
              f"fwd cpu {r['summary']['steady_fwd_cpu']:.0f}; mean wall of steps 1+ {r['summary']['mean_wall_after_first']:.0f}")
        md += [text, f"Fill {median(r['fill_ms']):.0f} ms (of it seeding the pools {seed:.0f} ms); steps {skip}+: wall {r['summary']['steady_wall']:.0f}, "
               f"forward CPU {r['summary']['steady_fwd_cpu']:.0f} ms; mean wall of steps 1+: "
               f"{r['summary']['mean_wall_after_first']:.0f} ms.", ""]
    if args.out:
        meta = {"model": args.model, "context": context, "batch": args.batch, "budget": args.budget, "steps": args.steps,
                "rounds": args.rounds, "settle": args.settle, "block_size": args.block_size, "host_fraction": s.host_fraction,
                "threads": 1, "load_average": load, "argv": sys.argv, "machine": machine_meta()}
        write_results(args.out, "sparse_transient", {**meta, "variants": runs}, "\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
