"""The sparse fetch path A/B: a git revision's pipeline / pool / staging / fetch modules against the working
tree's, interleaved decode steps in one process (CPU, SmolLM2).

    python benchmarks/sparse_fetch_ab.py --kv /tmp/kv_8192_4.pt --base 2d5ec75 --steps 8

For each strategy two sparse caches are filled with the same prefilled K/V (host tier 25 % of the KV, the
rest on disk with ``direct_io``, as in ``sparse_speed.py``): one whose ``DecodePipeline`` is the ``--base``
revision's (its modules loaded from ``git show``), one with the working tree's.  Each step feeds both the
same token (the base's greedy choice), alternating which goes first, and checks their logits are equal.
Prints per cache the median wall ms/step, the main thread's CPU ms/step (``time.thread_time``: robust to
a loaded machine, where wall time is mostly waiting for a core) and the median per-stage ms.  ``--kv``: a
file of prefilled rows, written on first use (``--distinct-rows`` prompts of ``--prefill-context``
tokens; prefill is the slow part on a 2-core machine).  Timing noise on a shared machine is large:
compare medians of the same run only.
"""
import argparse, cProfile, pstats, shutil, statistics, subprocess, sys, tempfile, time, types, io
from pathlib import Path
import torch
WT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(WT / "benchmarks"))
from _common import load_bench_model, torch_threads, stats_delta, find_numbers
import sparse_speed as sp
from tiercache_llm.hf_kwargs import cache_kwargs  # noqa: E402
import tiercache_llm.kv_cache as kvc

p = argparse.ArgumentParser()
p.add_argument("--kv", required=True); p.add_argument("--prefill-context", type=int, default=8192)
p.add_argument("--distinct-rows", type=int, default=4); p.add_argument("--batch", type=int, default=4)
p.add_argument("--context", type=int, default=None)
p.add_argument("--budget", type=sp._budget, default=0.25)
p.add_argument("--strategies", default="attention-aware,reuse-layer-ahead")
p.add_argument("--steps", type=int, default=6); p.add_argument("--warmup", type=int, default=1)
p.add_argument("--base", default="2d5ec75"); p.add_argument("--only", default=None); p.add_argument("--profile", default=None)
a = p.parse_args()

def load_base():
    mods = {}
    for name in ("pool", "staging", "pipeline", "fetch"):
        src = subprocess.check_output(["git", "-C", str(WT), "show", f"{a.base}:tiercache_llm/sparse/{name}.py"], text=True)
        for n2 in ("pool", "staging", "pipeline", "fetch"):
            src = src.replace(f"from .{n2} import", f"from ._base_{n2} import")
        full = f"tiercache_llm.sparse._base_{name}"
        m = types.ModuleType(full); m.__file__ = f"<base {name}>"; m.__package__ = "tiercache_llm.sparse"
        sys.modules[full] = m
        exec(compile(src, f"<base {name}.py>", "exec"), m.__dict__)
        mods[name] = m
    return mods
base = load_base()
NEW = kvc.DecodePipeline
BASE = base["pipeline"].DecodePipeline

model, tok = load_bench_model("smollm2")
if not Path(a.kv).exists():
    ids0 = sp.prompt_rows(tok, a.distinct_rows, a.prefill_context, model.config.vocab_size)
    with torch_threads(sp.DEFAULT_THREADS):
        r0 = sp.prefill_rows(model, ids0, [ids0.shape[-1] - 1] * a.distinct_rows)
    torch.save({"ids": ids0, "rows": [[(k.contiguous(), v.contiguous()) for k, v in row] for row in r0]}, a.kv)
d = torch.load(a.kv)
ids, rows = d["ids"], d["rows"]
distinct = len(rows)
context = a.context or ids.shape[-1]
rows = [rows[r % distinct] for r in range(a.batch)]
ids = ids[[r % distinct for r in range(a.batch)]]
kv = sp.point_kv(rows, a.batch, context - 1)
s = sp.Settings(host_fraction=0.25)
work = Path(tempfile.mkdtemp(prefix="pfab-", dir="/tmp"))
print(f"context {context - 1} batch {a.batch} distinct {distinct} budget {a.budget}", flush=True)

def stages(delta):
    own = {k: v for k, v in delta.items() if k != "tiercache"}
    out = {k: v for k, v in find_numbers(own, "seconds").items() if "last_step" not in k}
    return out

KEYS = ["sparse.total.scoring_seconds", "sparse.total.fetch_seconds", "sparse.total.attention_seconds",
        "sparse.total.placement_seconds", "pipeline.copy_seconds", "pipeline.predict_seconds", "pipeline.sync_seconds.disk",
        "pipeline.sync_seconds.host", "pipeline.staging.wait_seconds", "pipeline.staging.background_seconds"]
try:
    for strat in a.strategies.split(","):
        caches = {}
        for name, cls in (("base", BASE), ("new", NEW)):
            if a.only and name != a.only: continue
            kvc.DecodePipeline = cls
            try:
                caches[name] = sp.build_cache(model, sp.Config(strat, a.budget, "cold"), kv, s, work / f"{strat}-{name}")
            finally:
                kvc.DecodePipeline = NEW
        feed = ids[:, context - 1:context]
        wall = {"base": [], "new": []}; cpu = {"base": [], "new": []}; st = {"base": [], "new": []}; maxdiff = 0.0
        prof = cProfile.Profile() if a.profile else None
        with torch.no_grad(), torch_threads(1):
            for step in range(a.warmup + a.steps):
                order = ("base", "new") if step % 2 == 0 else ("new", "base")
                logits = {}
                for name in order:
                    if name not in caches: continue
                    c = caches[name]
                    before = c.stats()
                    if prof and name == "new" and step >= a.warmup: prof.enable()
                    t0 = time.perf_counter(); c0 = time.thread_time()
                    logits[name] = model(input_ids=feed, **cache_kwargs(c, model)).logits[:, -1]
                    t = time.perf_counter() - t0; ct = time.thread_time() - c0
                    if prof and name == "new" and step >= a.warmup: prof.disable()
                    after = c.stats()
                    if step >= a.warmup:
                        wall[name].append(t); cpu[name].append(ct); st[name].append(stages(stats_delta(before, after)))
                if len(logits) == 2: maxdiff = max(maxdiff, float((logits["base"] - logits["new"]).abs().max()))
                feed = next(iter(logits.values())).argmax(-1, keepdim=True)
        for name, c in caches.items():
            pst = c.stats()
            print(name, {k: v for k, v in find_numbers(pst, "pool_", "reuse_bytes", "wait").items()})
            c.close()
        print(f"\n== {strat}: max |logit diff| base vs new = {maxdiff}")
        for name in caches:
            med = lambda k: 1000 * statistics.median([x.get(k, 0.0) for x in st[name]])
            print(f"  {name}: {1000*statistics.median(wall[name]):7.1f} ms/step, main-thread cpu {1000*statistics.median(cpu[name]):7.1f} ms/step (steps {[round(1000*w) for w in wall[name]]})  " +
                  "  ".join(f"{k.split('.')[-1] if 'sync' not in k else 'sync.'+k.split('.')[-1]}={med(k):.1f}" for k in KEYS))
        if prof:
            out = io.StringIO(); ps = pstats.Stats(prof, stream=out)
            ps.sort_stats("tottime").print_stats(40); ps.print_callers(25)
            Path(f"{a.profile}_{strat}.txt").write_text(out.getvalue()); prof.dump_stats(f"{a.profile}_{strat}.prof")
finally:
    shutil.rmtree(work, ignore_errors=True)
