"""Forward-thread cost of sparse pipeline variants, interleaved in one process (CPU, SmolLM2, cold disk).

    python benchmarks/sparse_end_step_ab.py --context 8192 --batch 4 --rounds 8 --run 2 \
        --variant attention-aware:background_end_step=false --variant attention-aware \
        --variant reuse-layer-ahead --prefill-cache DIR

Like ``sparse_variants.py`` (same caches, prefill cache and ``--variant`` syntax), but for work that runs
*after* a step returns (the end-of-step worker): per round, each variant decodes ``--run`` consecutive steps
back to back (no ``stats()`` call between them), and the round is timed until the variant's pipeline is
fenced (``DecodePipeline.fence()``), so the worker's last job is charged to it rather than hidden in the
next variant's time (pessimistic by up to one job per round).  Reports per variant the median ms/step of
the rounds, the forward thread's CPU time (``time.thread_time``: unlike wall time, not inflated by other
jobs on a loaded machine), the wall and CPU time in ``TieredKVCache._end_forward`` (the end-of-step work
left on the forward thread), per-stage medians from ``stats()``, the load average, the reuse rate, and
whether every variant decoded the same tokens.  ``--json FILE`` writes every round.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import find_numbers, median, stats_delta, torch_threads  # noqa: E402
from sparse_variants import parsed_variants, prefilled_point, variant_parser  # noqa: E402
import sparse_speed as sp  # noqa: E402
from tiercache_llm.hf_kwargs import cache_kwargs  # noqa: E402
from tiercache_llm.kv_cache import TieredKVCache  # noqa: E402

END = {"wall": 0.0, "cpu": 0.0}
_orig = TieredKVCache._end_forward
def _wrapped(self, failed=False):
    t, c = time.perf_counter(), time.thread_time()
    try:
        return _orig(self, failed)
    finally:
        END["wall"] += time.perf_counter() - t
        END["cpu"] += time.thread_time() - c
TieredKVCache._end_forward = _wrapped
KEYS = ("sparse.total.scoring_seconds", "sparse.total.fetch_seconds", "sparse.total.attention_seconds",
        "sparse.total.placement_seconds", "pipeline.copy_seconds", "pipeline.sync_seconds.disk",
        "pipeline.staging.background_seconds", "pipeline.stage_ahead_seconds", "pipeline.after_step_seconds",
        "pipeline.after_step_wait_seconds")

p = variant_parser(__doc__.split("\n\n")[0], context=8192)
p.add_argument("--rounds", type=int, default=4)
p.add_argument("--run", type=int, default=2)
p.add_argument("--warmup", type=int, default=2)
p.add_argument("--json", type=Path, default=None)
args = p.parse_args()
variants = parsed_variants(p, args)
model, ids, context, kv = prefilled_point(args, args.rounds * args.run + args.warmup)
s = sp.Settings(host_fraction=0.25, block_size=args.block_size)
work = Path(tempfile.mkdtemp(prefix="stg-ab-", dir=args.workdir))
caches = []
for n, (_, name, ov) in enumerate(variants):
    caches.append(sp.build_cache(model, sp.Config(name, args.budget, "cold"), kv, s, work / str(n), pipeline=ov or None))

def fence(cache):
    pipe = getattr(cache, "_pipeline", None)
    if pipe is not None and hasattr(pipe, "fence"):
        pipe.fence()

runs = [{"spec": v[0], "cache": c, "feed": ids[:, context - 1:context], "ms": [], "cpu": [], "end": [], "endcpu": [],
         "stages": [], "tokens": [], "load": []} for v, c in zip(variants, caches)]
try:
    with torch.no_grad(), torch_threads(1):
        for r in runs:  # warm-up, not timed
            for _ in range(args.warmup):
                r["feed"] = model(input_ids=r["feed"], **cache_kwargs(r["cache"], model)).logits[:, -1].argmax(-1, keepdim=True)
                r["tokens"].append(r["feed"].view(-1).tolist())
            fence(r["cache"])
        for rnd in range(args.rounds):
            shift = rnd % len(runs)
            for r in runs[shift:] + runs[:shift]:
                before = r["cache"].stats()
                END["wall"] = END["cpu"] = 0.0
                feeds = []
                t, c = time.perf_counter(), time.thread_time()
                for _ in range(args.run):
                    r["feed"] = model(input_ids=r["feed"], **cache_kwargs(r["cache"], model)).logits[:, -1].argmax(-1, keepdim=True)
                    feeds.append(r["feed"])
                fence(r["cache"])
                el, cp = time.perf_counter() - t, time.thread_time() - c
                r["tokens"] += [f.view(-1).tolist() for f in feeds]
                delta = stats_delta(before, r["cache"].stats())
                own = {k: v for k, v in delta.items() if k != "tiercache"}
                r["stages"].append({k: v / args.run for k, v in find_numbers(own, "seconds").items() if "last_step" not in k})
                r["ms"].append(1000 * el / args.run); r["cpu"].append(1000 * cp / args.run)
                r["end"].append(1000 * END["wall"] / args.run); r["endcpu"].append(1000 * END["cpu"] / args.run)
                r["load"].append(os.getloadavg()[0])
    for r in runs:
        st = r["cache"].stats()["sparse"]["total"]
        r["reuse_rate"] = st.get("reuse_rate")
finally:
    for c in caches:
        c.close()
    shutil.rmtree(work, ignore_errors=True)
for r in runs:
    print(f"== {r['spec']}: wall {median(r['ms']):.0f} ms/step (fwd-thread cpu {median(r['cpu']):.0f}), "
          f"_end_forward wall {median(r['end']):.1f} cpu {median(r['endcpu']):.1f}, reuse {r['reuse_rate']:.4f}")
    print("   rounds wall " + " ".join(f"{x:.0f}" for x in r["ms"]) + " | cpu " + " ".join(f"{x:.0f}" for x in r["cpu"]))
    print("   " + ", ".join(f"{k.split('.')[-1].replace('_seconds', '')} {1000 * median(st.get(k, 0.0) for st in r['stages']):.1f}" for k in KEYS))
    print("   load " + " ".join(f"{x:.1f}" for x in r["load"]))
toks = [r["tokens"] for r in runs]
print("tokens identical across variants:", all(t == toks[0] for t in toks))
for r in runs:
    print("  ", r["spec"], json.dumps(r["tokens"]))
if args.json:
    args.json.write_text(json.dumps([{k: v for k, v in r.items() if k not in ("cache", "feed")} for r in runs], default=str))
