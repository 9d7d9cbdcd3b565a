"""Per-step timing of sparse pipeline variants side by side, steps interleaved (CPU, SmolLM2, cold disk).

    python benchmarks/sparse_variants.py --steps 8 --variant attention-aware:stage_near=0:prefault_pool=false \
        --variant attention-aware

Every ``--variant STRATEGY:FIELD=VALUE:...`` (as in ``sparse_profile.py``) gets its own sparse
``TieredKVCache`` filled with the same prefilled K/V (host tier 25 % of the KV, disk the rest with
``direct_io``, as in ``sparse_speed.py``); after ``--warmup`` steps each, the variants decode ``--steps``
steps in turn (step ``i`` of every variant before step ``i + 1`` of any, the order rotating), so a loaded
machine slows them alike.  Prints per variant the median ms/step, the per-stage medians and the per-step
fetch figures; ``--json`` writes every step.  The prefill (minutes at 8K x 4 on 2 cores) is kept in
``--prefill-cache`` (a folder) when given.  Memory: one cache per variant (~2.3 GB each at 8K x 4).
"""
import argparse, hashlib, json, os, shutil, statistics, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch
import sparse_speed as sp
from _common import load_bench_model, stats_delta, torch_threads, find_numbers
from sparse_profile import parse_variant

def cached_prefill(model, ids, lengths, folder):
    if folder is None:
        return sp.prefill_rows(model, ids, lengths)
    h = hashlib.sha1(ids.numpy().tobytes() + repr(lengths).encode()).hexdigest()[:16]
    p = Path(folder) / f"prefill_{h}.pt"
    if p.exists():
        return torch.load(p)
    out = sp.prefill_rows(model, ids, lengths)
    p.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, p)
    return out

ap = argparse.ArgumentParser()
ap.add_argument("--context", type=int, default=8192)
ap.add_argument("--batch", type=int, default=4)
ap.add_argument("--budget", type=float, default=0.25)
ap.add_argument("--steps", type=int, default=8)
ap.add_argument("--warmup", type=int, default=1)
ap.add_argument("--variant", action="append", default=[])
ap.add_argument("--json", default=None)
ap.add_argument("--prefill-cache", default=None, help="folder keeping prefilled K/V between runs")
ap.add_argument("--workdir", default=None)
a = ap.parse_args()
model, tok = load_bench_model("smollm2")
max_pos = model.config.max_position_embeddings
context = min(a.context, max_pos - a.steps - a.warmup - 2)
ids = sp.prompt_rows(tok, a.batch, context, model.config.vocab_size)
context = min(context, ids.shape[-1])
with torch_threads(sp.DEFAULT_THREADS):
    rows = cached_prefill(model, ids, [context - 1] * a.batch, a.prefill_cache)
kv = sp.point_kv(rows, a.batch, context - 1)
del rows
s = sp.Settings(host_fraction=0.25)
work = Path(tempfile.mkdtemp(prefix="tiercache-sparse-variants-", dir=a.workdir))
make_tiered = sp.make_tiered
runs = []
for n, spec in enumerate(a.variant):
    name, ov = parse_variant(spec)
    cfg = sp.Config(name, a.budget, "cold")
    sp.make_tiered = (lambda m, mode, _o=ov, **o: make_tiered(m, mode, pipeline=_o, **o)) if ov else make_tiered
    cache = sp.build_cache(model, cfg, kv, s, work / str(n))
    sp.make_tiered = make_tiered
    runs.append({"spec": spec, "cache": cache, "feed": ids[:, context - 1:context], "ms": [], "stages": [], "pipe": []})
KEYS = ["sparse.total.fetch_seconds", "pipeline.sync_seconds.disk", "pipeline.sync_seconds.host", "pipeline.copy_seconds",
        "sparse.total.attention_seconds", "sparse.total.scoring_seconds", "sparse.total.placement_seconds",
        "pipeline.staging.background_seconds", "pipeline.staging.wait_seconds", "pipeline.stage_ahead_seconds"]
try:
    with torch.no_grad(), torch_threads(1):
        for step in range(a.warmup + a.steps):
            order = runs[step % len(runs):] + runs[:step % len(runs)]
            for r in order:
                c = r["cache"]
                before = c.stats()
                t = time.perf_counter()
                r["feed"] = model(input_ids=r["feed"], past_key_values=c).logits[:, -1].argmax(-1, keepdim=True)
                el = time.perf_counter() - t
                after = c.stats()
                d = stats_delta(before, after)
                own = {k: v for k, v in d.items() if k != "tiercache"}
                st = {k: v for k, v in find_numbers(own, "seconds").items() if "last_step" not in k}
                pd = d.get("pipeline", {})
                pipe = {k: pd.get(k) for k in ("needed", "reused", "staged", "sync", "stage_ahead_entries", "needed_nonresident", "staged_nonresident")}
                pipe["staging"] = {k: pd.get("staging", {}).get(k) for k in ("hits", "expired", "dropped", "entries_requested", "waits", "late")}
                if step >= a.warmup:
                    r["ms"].append(1000 * el); r["stages"].append(st); r["pipe"].append(pipe)
finally:
    for r in runs:
        r["cache"].close()
    shutil.rmtree(work, ignore_errors=True)
out = []
for r in runs:
    med = {k: 1000 * statistics.median([st.get(k, 0.0) for st in r["stages"]]) for k in KEYS}
    print(f"\n== {r['spec']}: median {statistics.median(r['ms']):.0f} ms/step; steps " + " ".join(f"{x:.0f}" for x in r["ms"]))
    print("   " + ", ".join(f"{k.split('.',1)[1]} {v:.1f}" for k, v in med.items()))
    print("   per-step fetch " + " ".join(f"{1000*st.get('sparse.total.fetch_seconds',0):.0f}" for st in r["stages"]))
    print("   per-step sync.disk " + " ".join(f"{1000*st.get('pipeline.sync_seconds.disk',0):.0f}" for st in r["stages"]))
    print("   per-step sync.host " + " ".join(f"{1000*st.get('pipeline.sync_seconds.host',0):.0f}" for st in r["stages"]))
    print("   per-step copy " + " ".join(f"{1000*st.get('pipeline.copy_seconds',0):.0f}" for st in r["stages"]))
    print("   pipe last", json.dumps(r["pipe"][-1]))
    out.append({"spec": r["spec"], "ms": r["ms"], "stages": r["stages"], "pipe": r["pipe"]})
if a.json:
    Path(a.json).write_text(json.dumps(out))
