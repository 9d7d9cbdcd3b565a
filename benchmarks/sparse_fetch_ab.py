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

``--vary part_reads``: no revision; both caches run the working tree, ``base`` with ``pipeline={"part_reads":
False}`` (whole joint entries) and ``new`` with the default (only the selected (row, KV head) parts read,
docs/sparse.md "Part reads").  ``--kv-dir DIR``: the prefilled prose rows of ``pool_replay`` /
``sector_study`` (``pool_replay.prefilled_rows``, written there on first use), decoded teacher-forced (each step
feeds the text's next token to both caches; top-1 agreement with the text printed per cache) instead of
``--kv``.  Prints per cache also MiB/step fetched from host and disk (``bytes_fetched``: the bytes the reads
asked for), the disk tier's own ``bytes_read`` per step (background included) and the reuse rate.

    python benchmarks/sparse_fetch_ab.py --vary part_reads --kv-dir /tmp/sector_kv --steps 6 \
        --strategies fetch-every-step,reuse-layer-ahead,attention-aware
"""
import argparse, cProfile, os, pstats, shutil, statistics, subprocess, sys, tempfile, time, types, io
from pathlib import Path
import torch
WT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(WT / "benchmarks"))
from _common import load_bench_model, torch_threads, stats_delta, find_numbers, reuse_rate
import sparse_speed as sp
from tiercache_llm.hf_kwargs import cache_kwargs  # noqa: E402
import tiercache_llm.kv_cache as kvc

p = argparse.ArgumentParser()
p.add_argument("--kv", default=None); p.add_argument("--kv-dir", default=None)
p.add_argument("--vary", choices=("revision", "part_reads"), default="revision"); p.add_argument("--prefill-context", type=int, default=8192)
p.add_argument("--distinct-rows", type=int, default=4); p.add_argument("--batch", type=int, default=4)
p.add_argument("--context", type=int, default=None)
p.add_argument("--budget", type=sp._budget, default=0.25)
p.add_argument("--strategies", default="attention-aware,reuse-layer-ahead")
p.add_argument("--steps", type=int, default=6); p.add_argument("--warmup", type=int, default=1)
p.add_argument("--base", default="2d5ec75"); p.add_argument("--only", default=None); p.add_argument("--profile", default=None)
a = p.parse_args()
if (a.kv is None) == (a.kv_dir is None):
    p.error("give one of --kv and --kv-dir")

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
NEW = kvc.DecodePipeline
BASE = load_base()["pipeline"].DecodePipeline if a.vary == "revision" else NEW
PIPELINE = {"base": {"part_reads": False}, "new": None} if a.vary == "part_reads" else {"base": None, "new": None}

model, tok = load_bench_model("smollm2")
teacher = None
if a.kv_dir is not None:
    import fetch_granularity as fg
    import pool_replay as pr
    ids = fg.prose_rows(tok, a.distinct_rows, a.prefill_context + 16, model.config.vocab_size)
    with torch_threads(sp.DEFAULT_THREADS):
        rows = pr.prefilled_rows(model, ids, a.prefill_context, Path(a.kv_dir), "smollm2", False)
    teacher = ids[[r % len(rows) for r in range(a.batch)]]
elif not Path(a.kv).exists():
    ids0 = sp.prompt_rows(tok, a.distinct_rows, a.prefill_context, model.config.vocab_size)
    with torch_threads(sp.DEFAULT_THREADS):
        r0 = sp.prefill_rows(model, ids0, [ids0.shape[-1] - 1] * a.distinct_rows)
    torch.save({"ids": ids0, "rows": [[(k.contiguous(), v.contiguous()) for k, v in row] for row in r0]}, a.kv)
if a.kv is not None:
    d = torch.load(a.kv)
    ids, rows = d["ids"], d["rows"]
distinct = len(rows)
context = a.context or (a.prefill_context if a.kv_dir else ids.shape[-1])
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
                caches[name] = sp.build_cache(model, sp.Config(strat, a.budget, "cold"), kv, s, work / f"{strat}-{name}",
                                              pipeline=PIPELINE[name])
            finally:
                kvc.DecodePipeline = NEW
        feed = ids[:, context - 1:context]
        wall = {"base": [], "new": []}; cpu = {"base": [], "new": []}; st = {"base": [], "new": []}; maxdiff = 0.0
        io_ = {"base": [], "new": []}; agree = {"base": [], "new": []}; same_top1 = []
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
                        io_[name].append(sp.step_record(before, after))
                        if teacher is not None:
                            nxt = teacher[:, context + step]
                            agree[name].append(float((logits[name].argmax(-1) == nxt).float().mean()))
                if len(logits) == 2:
                    maxdiff = max(maxdiff, float((logits["base"] - logits["new"]).abs().max()))
                    same_top1.append(bool(torch.equal(logits["base"].argmax(-1), logits["new"].argmax(-1))))
                if teacher is not None:
                    feed = teacher[:, context + step:context + step + 1]
                else:
                    feed = next(iter(logits.values())).argmax(-1, keepdim=True)
        reuse = {}
        for name, c in caches.items():
            pst = c.stats()
            reuse[name] = reuse_rate(pst)
            print(name, {k: v for k, v in find_numbers(pst, "pool_", "reuse_bytes", "wait", "part").items()})
            c.close()
        print(f"\n== {strat}: max |logit diff| base vs new = {maxdiff}, same top-1 at {sum(same_top1)} of "
              f"{len(same_top1)} steps; load average {os.getloadavg()}")
        for name in caches:
            mib = lambda k: statistics.median([r[k] for r in io_[name]]) / 2**20  # noqa: E731
            acc = f", top-1 agreement with the text {statistics.mean(agree[name]):.3f}" if agree[name] else ""
            print(f"  {name}: MiB/step host {mib('host_bytes'):.1f} + disk {mib('disk_bytes'):.1f} (disk tier read "
                  f"{mib('disk_bytes_read'):.1f}), reuse {reuse[name]}{acc}")
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
