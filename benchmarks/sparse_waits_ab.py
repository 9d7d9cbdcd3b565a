"""Sparse pipeline variants A/B'd in one process, each timed in steady state (CPU, SmolLM2, cold disk).

    python benchmarks/sparse_waits_ab.py --context 8192 --batch 4 --rounds 8 --run 2 --prefill-cache DIR \\
        --variant attention-aware --variant attention-aware:slot_reads_after_sync=true

Like ``sparse_end_step_ab.py`` (same caches, prefill cache and ``--variant`` syntax: host tier 25 % of the KV,
disk the rest with ``direct_io``, default pool bound; ``disk_direct_threads=N`` sets the disk tier's direct reads
in flight per batch instead of a pipeline field), for variants that differ in how far their background
reads run ahead: per round, each variant (the order rotating) first decodes one untimed step, which absorbs
what its reads ahead gained while the other variants ran (its previous step's reads for its first layers landed
meanwhile) and what the other caches' last reads cost it, then ``--run`` timed steps back to back, then its
pipeline is fenced.  Reports per variant the median ms/step of the timed steps, the forward thread's CPU time
and its wall minus CPU (waits: for the GIL, for reads, for a core; of it the time spent runnable on a run
queue, waiting for a core, where Linux's ``schedstat`` says; and its context switches per step: voluntary
ones are sleeps, for the GIL among them), the other threads' CPU time per step by
thread name (every cache's threads, the other variants' idle ones included: their pipelines are fenced),
per-stage medians (``stats()``), entries per step by how they were served (``COUNTS``), MiB/step read from the host and
disk tiers, the paired difference of each
variant against the first (per round), the load average, and whether every variant decoded the same tokens
(exit status 1 if not).  ``--json FILE`` writes every round.

``--old-tree DIR`` (a checkout of an earlier revision, e.g. ``git worktree add /tmp/old 6a67b74``): a variant
written ``old:STRATEGY[:FIELD=VALUE...]`` runs that revision's decode pipeline (``DIR/tiercache_llm/sparse``:
``pipeline.py`` and the modules it imports relatively: ``pool``, ``staging``, ``stage_choice``, ``fetch``,
``placement``, loaded as the package ``_old_sparse``) in this tree's cache, with this tree's ``PipelineConfig``
fields that revision knows; everything else (the cache, tiercache, selection, attention, ``record_attention``)
is this tree's.  So a change to the pipeline's own code is A/B'd against its previous version in one process.
"""
from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import find_numbers, median, stats_delta, torch_threads  # noqa: E402
from sparse_variants import parsed_variants, prefilled_point, variant_parser  # noqa: E402
import sparse_speed as sp  # noqa: E402
from tiercache_llm.hf_kwargs import cache_kwargs  # noqa: E402

KEYS = ("sparse.total.scoring_seconds", "sparse.total.fetch_seconds", "sparse.total.attention_seconds",
        "pipeline.copy_seconds", "pipeline.sync_seconds.disk", "pipeline.sync_seconds.host",
        "pipeline.slot_wait_seconds", "pipeline.slot_read_seconds", "pipeline.predict_seconds")
# entry counters per step (pipeline stats), printed per variant
COUNTS = ("pipeline.sync.disk", "pipeline.sync.host", "pipeline.reused", "pipeline.staged", "pipeline.slot_reserved",
          "pipeline.idle_staged", "pipeline.idle_read", "pipeline.idle_hits", "pipeline.idle_wasted")
MiB = float(1 << 20)


def thread_group(name: str) -> str:
    """A thread's group for the CPU table: its name without the executor's ``_N`` suffix."""
    return re.sub(r"_\d+$", "", name)


def run_queue_seconds() -> float | None:
    """Seconds the calling thread has waited on a run queue (runnable, no core free: Linux
    ``/proc/thread-self/schedstat``'s second field); ``None`` where there is no such file."""
    try:
        with open("/proc/thread-self/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return None


def context_switches() -> tuple[int, int] | None:
    """The calling thread's (voluntary, involuntary) context switches so far (``/proc/thread-self/status``: a
    voluntary one is a sleep, e.g. a wait for the GIL, a future or a read; an involuntary one a preemption);
    ``None`` where there is no such file."""
    try:
        with open("/proc/thread-self/status") as f:
            fields = dict(line.split(":", 1) for line in f if "ctxt_switches" in line)
        return int(fields["voluntary_ctxt_switches"]), int(fields["nonvoluntary_ctxt_switches"])
    except (OSError, KeyError, ValueError):
        return None


def thread_cpu() -> dict[str, float]:
    """CPU seconds so far of every live thread of this process but the calling one, summed by
    :func:`thread_group` (``time.pthread_getcpuclockid``; a thread gone meanwhile is skipped)."""
    me = threading.get_ident()
    out: dict[str, float] = {}
    for t in threading.enumerate():
        if t.ident is None or t.ident == me:
            continue
        try:
            cpu = time.clock_gettime(time.pthread_getcpuclockid(t.ident))
        except (OSError, ProcessLookupError):
            continue
        key = thread_group(t.name)
        out[key] = out.get(key, 0.0) + cpu
    return out


def old_pipeline_module(tree: Path) -> types.ModuleType:
    """``tree``'s ``tiercache_llm/sparse/pipeline.py`` imported as ``_old_sparse.pipeline`` (its relative imports
    from ``tree`` too)."""
    folder = Path(tree) / "tiercache_llm" / "sparse"
    if not (folder / "pipeline.py").is_file():
        raise SystemExit(f"--old-tree {tree}: no {folder / 'pipeline.py'}")
    package = types.ModuleType("_old_sparse")
    package.__path__ = [str(folder)]
    sys.modules["_old_sparse"] = package
    return importlib.import_module("_old_sparse.pipeline")


class old_pipeline_in:
    """While entered, caches are built with ``module``'s ``DecodePipeline`` (given the fields of this tree's
    ``PipelineConfig`` that its own ``PipelineConfig`` has)."""

    def __init__(self, module: types.ModuleType) -> None:
        self.module = module

    def __enter__(self) -> None:
        from dataclasses import asdict, fields
        from tiercache_llm import kv_cache

        known = {f.name for f in fields(self.module.PipelineConfig)}
        self.saved = kv_cache.DecodePipeline

        def make(config, layers, store):
            kept = {k: v for k, v in asdict(config).items() if k in known}
            return self.module.DecodePipeline(self.module.PipelineConfig(**kept), layers, store)

        kv_cache.DecodePipeline = make

    def __exit__(self, *exc) -> None:
        from tiercache_llm import kv_cache

        kv_cache.DecodePipeline = self.saved


def main(argv: list[str] | None = None) -> int:
    p = variant_parser(__doc__.split("\n\n")[0], context=8192)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--run", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the decode steps (default 1)")
    p.add_argument("--old-tree", type=Path, default=None,
                   help="an earlier checkout whose decode pipeline the variants written old:STRATEGY... run")
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error("--threads must be >= 1")
    old = [spec.startswith("old:") for spec in args.variant]
    if any(old) and args.old_tree is None:
        p.error("a variant old:... needs --old-tree DIR")
    args.variant = [spec[4:] if o else spec for spec, o in zip(args.variant, old)]
    variants = parsed_variants(p, args)
    variants = [("old:" + spec if o else spec, name, ov) for (spec, name, ov), o in zip(variants, old)]
    old_pipeline = old_pipeline_module(args.old_tree) if any(old) else None
    model, ids, context, kv = prefilled_point(args, args.rounds * (args.run + 1) + args.warmup)
    s = sp.Settings(host_fraction=0.25, block_size=args.block_size)
    work = Path(tempfile.mkdtemp(prefix="waits-ab-", dir=args.workdir))
    caches = []
    for n, (_, name, ov) in enumerate(variants):
        ov = dict(ov or {})
        threads = ov.pop("disk_direct_threads", None)  # not a pipeline field: the disk tier's reads in flight
        if old[n]:
            with old_pipeline_in(old_pipeline):
                cache = sp.build_cache(model, sp.Config(name, args.budget, "cold"), kv, s, work / str(n),
                                       pipeline=ov or None)
            assert isinstance(cache._pipeline, old_pipeline.DecodePipeline)
        else:
            cache = sp.build_cache(model, sp.Config(name, args.budget, "cold"), kv, s, work / str(n), pipeline=ov or None)
        if threads is not None:
            for tier in cache.store.cache._tiers:
                if hasattr(tier, "_direct_threads"):
                    tier._direct_threads = int(threads)
        caches.append(cache)

    def step(r: dict) -> None:
        r["feed"] = model(input_ids=r["feed"], **cache_kwargs(r["cache"], model)).logits[:, -1].argmax(-1, keepdim=True)
        r["tokens"].append(r["feed"].view(-1).tolist())

    def fence(cache) -> None:
        pipe = getattr(cache, "_pipeline", None)
        if pipe is not None and hasattr(pipe, "fence"):
            pipe.fence()

    runs = [{"spec": v[0], "cache": c, "feed": ids[:, context - 1:context], "ms": [], "cpu": [], "stages": [],
             "mib": [], "counts": [], "tokens": [], "load": [],
             "bg": [], "queued": [], "switches": []} for v, c in zip(variants, caches)]
    try:
        with torch.no_grad(), torch_threads(args.threads):
            for r in runs:
                for _ in range(args.warmup):
                    step(r)
                fence(r["cache"])
            for rnd in range(args.rounds):
                shift = rnd % len(runs)
                for r in runs[shift:] + runs[:shift]:
                    step(r)  # untimed: absorbs the other caches' background and this one's head start
                    before = r["cache"].stats()
                    bg, queued, switched = thread_cpu(), run_queue_seconds(), context_switches()
                    t, c = time.perf_counter(), time.thread_time()
                    for _ in range(args.run):
                        step(r)
                    fence(r["cache"])
                    el, cp = time.perf_counter() - t, time.thread_time() - c
                    bg_after, queued_after, switched_after = thread_cpu(), run_queue_seconds(), context_switches()
                    if switched is not None and switched_after is not None:
                        r["switches"].append([(a - b) / args.run for a, b in zip(switched_after, switched)])
                    if queued is not None and queued_after is not None:
                        r["queued"].append(1000 * (queued_after - queued) / args.run)
                    r["bg"].append({k: 1000 * (v - bg.get(k, 0.0)) / args.run for k, v in bg_after.items()
                                    if v - bg.get(k, 0.0) > 0})
                    delta = stats_delta(before, r["cache"].stats())
                    own = {k: v for k, v in delta.items() if k != "tiercache"}
                    r["stages"].append({k: v / args.run for k, v in find_numbers(own, "seconds").items()
                                        if "last_step" not in k})
                    numbers = find_numbers(own, "pipeline.")
                    r["counts"].append({k: numbers.get(k, 0.0) / args.run for k in COUNTS})
                    fetched = delta.get("sparse", {}).get("total", {}).get("bytes_fetched", {})
                    r["mib"].append({k: v / args.run / MiB for k, v in fetched.items()})
                    r["ms"].append(1000 * el / args.run)
                    r["cpu"].append(1000 * cp / args.run)
                    r["load"].append(os.getloadavg()[0])
    finally:
        for c in caches:
            c.close()
        shutil.rmtree(work, ignore_errors=True)
    base = runs[0]
    for r in runs:
        mib = {k: median(m.get(k, 0.0) for m in r["mib"]) for k in ("host", "disk")}
        paired = [a - b for a, b in zip(r["ms"], base["ms"])]
        print(f"== {r['spec']}: wall {median(r['ms']):.0f} ms/step (fwd-thread cpu {median(r['cpu']):.0f}); "
              f"MiB/step host {mib['host']:.0f} disk {mib['disk']:.0f}; paired vs first {median(paired):+.0f} "
              f"({sum(1 for x in paired if x < 0)}/{len(paired)} faster)")
        print("   rounds wall " + " ".join(f"{x:.0f}" for x in r["ms"]) + " | cpu " + " ".join(f"{x:.0f}" for x in r["cpu"]))
        gap = [w - c for w, c in zip(r["ms"], r["cpu"])]
        groups = sorted({k for b in r["bg"] for k in b})
        queued = f" (run queue {median(r['queued']):.0f})" if r["queued"] else ""
        if r["switches"]:
            queued += (f", context switches/step {median(x[0] for x in r['switches']):.0f} voluntary "
                       f"{median(x[1] for x in r['switches']):.0f} involuntary")
        print(f"   fwd-thread wall - cpu {median(gap):.0f}{queued} ms/step; other threads' cpu ms/step: "
              + ", ".join(f"{k} {median(b.get(k, 0.0) for b in r['bg']):.1f}" for k in groups))
        print("   " + ", ".join(f"{k.split('.')[-1].replace('_seconds', '')} "
                                f"{1000 * median(st.get(k, 0.0) for st in r['stages']):.1f}" for k in KEYS))
        print("   entries/step " + ", ".join(f"{k.split('.', 1)[1]} {median(c.get(k, 0.0) for c in r['counts']):.0f}"
                                             for k in COUNTS))
        print("   load " + " ".join(f"{x:.1f}" for x in r["load"]))
    toks = [r["tokens"] for r in runs]
    same = all(t == toks[0] for t in toks)
    print("tokens identical across variants:", same)
    if args.json:
        args.json.write_text(json.dumps([{k: v for k, v in r.items() if k not in ("cache", "feed")} for r in runs],
                                        default=str))
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
