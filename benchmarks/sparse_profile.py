"""Where a sparse decode step spends its time: cProfile of a few steps per strategy (CPU, SmolLM2).

    python benchmarks/sparse_profile.py --out /tmp/sparse-profile                  # 8K x batch 4, 25 %, 3 steps
    python benchmarks/sparse_profile.py --context 2048 --batch 1 --distinct-rows 1 --steps 2

For each strategy (``--strategies``, default every sparse one) a sparse ``TieredKVCache`` is filled with
the same prefilled K/V (host tier ``--host-fraction`` of the KV, disk the rest with ``direct_io``, as in
``sparse_speed.py``), decodes ``--warmup`` untimed steps, then ``--steps`` steps under ``cProfile`` at
``--threads`` torch threads.  Writes per strategy ``sparse_profile_<strategy>.txt`` (the top functions by
own time and by cumulative time, as ``pstats`` prints them; the raw profile beside it as ``.pstats``) and ``sparse_profile.json`` (per strategy:
wall seconds per step, the cache's per-stage seconds per step, its rates (reuse, prefetch hit, prediction
recall; cumulative since the fill, warm-up included), the reuse rate of the timed steps (``timed_reuse_rate``:
pools or the fastest tier; ``timed_pool_reuse_rate``: entries served from the pools), ``memory`` (pools and
their bound, bytes beside the tiers, KV held) and the top functions with their share of the profiled wall
time), and prints a summary.  ``--distinct-rows N`` prefills only N distinct prompt rows
and repeats them up to the batch (prefill is the slow part on a 2-core machine; repeated rows select the
same blocks, so the union over rows is smaller than with distinct rows: say so when quoting figures).
``--variant STRATEGY:FIELD=VALUE:...`` (repeatable) adds a run of ``STRATEGY`` with those
:class:`~tiercache_llm.sparse.pipeline.PipelineConfig` overrides (values parsed as JSON), e.g.
``--variant attention-aware:stage_ahead=0 --variant attention-aware:pool_blocks_factor=1.0``, on the same
prefill.  ``--prefill-cache DIR`` keeps the prefill between runs (the same files as ``sparse_variants.py``).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import find_numbers, load_bench_model, parse_ints, stats_delta, torch_threads  # noqa: E402
import sparse_speed as sp  # noqa: E402
from tiercache_llm.hf_kwargs import cache_kwargs  # noqa: E402


def top_functions(profile: cProfile.Profile, wall: float, n: int = 25) -> list[dict]:
    st = pstats.Stats(profile)
    rows = []
    for (file, line, name), (cc, nc, tt, ct, _) in st.stats.items():  # type: ignore[attr-defined]
        rows.append({"function": f"{Path(file).name}:{line}({name})", "calls": nc, "own_s": tt, "cumulative_s": ct,
                     "own_pct": 100 * tt / wall, "cumulative_pct": 100 * ct / wall})
    rows.sort(key=lambda r: -r["own_s"])
    return rows[:n]


def parse_variant(spec: str) -> tuple[str, dict]:
    """``"attention-aware:stage_ahead=0:layer_ahead=false"`` -> ``("attention-aware", {...})``."""
    name, *fields = spec.split(":")
    overrides = {}
    for f in fields:
        key, sep, value = f.partition("=")
        if not sep:
            raise ValueError(f"--variant {spec!r}: expected FIELD=VALUE, got {f!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return name, overrides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--distinct-rows", type=int, default=None, help="prompt rows prefilled (default: the batch)")
    parser.add_argument("--budget", type=sp._budget, default=0.25)
    parser.add_argument("--strategies", default=",".join(sp.SPARSE))
    parser.add_argument("--variant", action="append", default=[],
                        help="STRATEGY:FIELD=VALUE:... a strategy with pipeline overrides (repeatable)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=lambda t: parse_ints(t, "--threads")[0], default=1)
    parser.add_argument("--host-fraction", type=float, default=0.25)
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "tiercache-sparse-profile")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--prefill-cache", type=Path, default=None,
                        help="folder keeping prefilled K/V between runs (shared with sparse_variants.py)")
    args = parser.parse_args(argv)
    runs = [(x.strip(), x.strip(), {}) for x in args.strategies.split(",") if x.strip()]
    runs += [(spec, *parse_variant(spec)) for spec in args.variant]
    bad = [name for _, name, _ in runs if name not in sp.SPARSE]
    if bad:
        parser.error(f"--strategies: unknown {bad}; choose from {sp.SPARSE}")
    args.out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_bench_model(args.model)
    max_pos = getattr(model.config, "max_position_embeddings", None) or 1 << 30
    context = min(args.context, max_pos - args.steps - args.warmup - 2)
    distinct = min(args.batch, args.distinct_rows or args.batch)
    t0 = time.perf_counter()
    ids = sp.prompt_rows(tokenizer, distinct, context, model.config.vocab_size)
    context = min(context, ids.shape[-1])
    from sparse_variants import cached_prefill  # imports this module: not at the top

    with torch_threads(sp.DEFAULT_THREADS):
        rows = cached_prefill(model, ids, [context - 1] * distinct, args.prefill_cache, args.model)
    rows = [rows[r % distinct] for r in range(args.batch)]
    ids = ids[[r % distinct for r in range(args.batch)]]
    print(f"prefill {time.perf_counter() - t0:.0f} s ({distinct} distinct rows of {context - 1} tokens)", flush=True)
    kv = sp.point_kv(rows, args.batch, context - 1)
    s = sp.Settings(host_fraction=args.host_fraction)
    workdir = Path(tempfile.mkdtemp(prefix="tiercache-sparse-profile-", dir=args.workdir))
    summary: dict = {"context": context, "batch": args.batch, "distinct_rows": distinct, "budget": args.budget,
                     "threads": args.threads, "steps": args.steps, "strategies": {}}
    try:
        for n_run, (label, name, overrides) in enumerate(runs):
            cfg = sp.Config(name, args.budget, "cold")
            t0 = time.perf_counter()
            cache = sp.build_cache(model, cfg, kv, s, workdir / str(n_run), pipeline=overrides)
            strategy = label if label not in summary["strategies"] else f"{label}#{n_run}"
            fill = time.perf_counter() - t0
            feed = ids[:, context - 1:context]
            try:
                with torch.no_grad(), torch_threads(args.threads):
                    for _ in range(args.warmup):
                        feed = model(input_ids=feed, **cache_kwargs(cache, model)).logits[:, -1].argmax(-1, keepdim=True)
                    before = cache.stats()
                    prof = cProfile.Profile()
                    start = time.perf_counter()
                    prof.enable()
                    for _ in range(args.steps):
                        feed = model(input_ids=feed, **cache_kwargs(cache, model)).logits[:, -1].argmax(-1, keepdim=True)
                    prof.disable()
                    wall = time.perf_counter() - start
                    after = cache.stats()
                    delta = stats_delta(before, after)
            finally:
                cache.close()
                shutil.rmtree(workdir / str(n_run), ignore_errors=True)
            text = io.StringIO()
            st = pstats.Stats(prof, stream=text)
            st.sort_stats("tottime").print_stats(30)
            st.sort_stats("cumulative").print_stats(30)
            (args.out / f"sparse_profile_{strategy.replace(':', '_')}.txt").write_text(text.getvalue())
            prof.dump_stats(str(args.out / f"sparse_profile_{strategy.replace(':', '_')}.pstats"))  # for pstats/snakeviz
            own = {k: v for k, v in delta.items() if k != "tiercache"}
            stages = {k: v / args.steps for k, v in find_numbers(own, "seconds").items() if "last_step" not in k}
            sel = delta.get("sparse", {}).get("total", {})
            pipe_after = after.get("pipeline", {})
            memory = {"kv_held_bytes": after["kv"].get("held_bytes"),
                      "beside_tiers_bytes": after["kv"].get("beside_tiers_bytes"),
                      "reuse_bytes": pipe_after.get("reuse_bytes"), "reuse_peak_bytes": pipe_after.get("reuse_peak_bytes"),
                      "pool_bound_bytes": pipe_after.get("pool_bound_bytes"),
                      "pool_over_budget": pipe_after.get("pool_over_budget")}
            # reuse rate of the timed steps: selected blocks served without a read from a slower tier
            timed_reuse = (sel["blocks_resident"] / sel["blocks_selected"]
                           if isinstance(sel, dict) and sel.get("blocks_selected") else None)
            dp = delta.get("pipeline", {})
            pool_reuse = dp["reused"] / dp["needed"] if dp.get("needed") else None  # served from the pool itself
            summary["strategies"][strategy] = {
                "overrides": overrides, "memory": memory, "timed_reuse_rate": timed_reuse,
                "timed_pool_reuse_rate": pool_reuse,
                "fill_s": fill, "wall_s_per_step": wall / args.steps, "stages_s_per_step": stages,
                "rates": find_numbers({k: v for k, v in after.items() if k != "tiercache"}, "rate", "recall", "precision"), "top_own": top_functions(prof, wall)}
            print(f"\n== {strategy}: {1000 * wall / args.steps:.0f} ms/step under cProfile (fill {fill:.0f} s)")
            print(f"   reuse rate (timed steps) {timed_reuse}, from the pools {pool_reuse}; pools {memory['reuse_bytes']} B "
                  f"(peak {memory['reuse_peak_bytes']}, bound {memory['pool_bound_bytes']}), beside the tiers "
                  f"{memory['beside_tiers_bytes']} B, KV held {memory['kv_held_bytes']} B")
            for k, v in sorted(stages.items(), key=lambda kv: -kv[1])[:10]:
                print(f"   stage {k}: {1000 * v:.1f} ms/step ({100 * v * args.steps / wall:.0f}%)")
            for r in summary["strategies"][strategy]["top_own"][:12]:
                print(f"   {r['own_pct']:5.1f}% own {r['cumulative_pct']:5.1f}% cum  {r['calls']:>7}  {r['function']}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    (args.out / "sparse_profile.json").write_text(json.dumps(summary, indent=1, default=str))
    print(f"wrote {args.out}/sparse_profile.json and sparse_profile_<strategy>.txt")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
