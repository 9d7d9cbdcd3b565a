"""Per-step timing of sparse pipeline variants side by side, steps interleaved (CPU, SmolLM2, cold disk).

    python benchmarks/sparse_variants.py --steps 8 --variant attention-aware:stage_near=0:prefault_pool=false \\
        --variant attention-aware
    python benchmarks/sparse_variants.py --model tiny --context 256 --batch 2 --block-size 16 --steps 2 \\
        --variant attention-aware --variant attention-aware:stage_ahead=0 --out /tmp/variants   # seconds

Every ``--variant STRATEGY:FIELD=VALUE:...`` (as in ``sparse_profile.py``: the fields are
:class:`~tiercache_llm.sparse.pipeline.PipelineConfig` overrides, values parsed as JSON) gets its own sparse
``TieredKVCache`` filled with the same prefilled K/V (host tier 25 % of the KV, disk the rest with
``direct_io``, as in ``sparse_speed.py``); after ``--warmup`` steps each, the variants decode ``--steps``
steps in turn (step ``i`` of every variant before step ``i + 1`` of any, the order rotating), so a loaded
machine slows them alike.  Prints per variant the median ms/step, the per-stage medians and the per-step
fetch figures; ``--json FILE`` writes every step (a list, one entry per variant: ``spec``, ``ms``,
``stages``, ``pipe``).  ``--out DIR`` writes ``sparse_variants.json`` (the settings, and per variant its
medians and every step) and ``sparse_variants.md`` (a table of the medians); no plot.  The prefill
(minutes at 8K x 4 on 2 cores) is kept in ``--prefill-cache`` (a folder) when given.  Memory: one cache
per variant (~2.3 GB each at 8K x 4).  Timing runs at 1 torch thread; the prefill at the default count.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from tiercache_llm.hf_kwargs import cache_kwargs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import find_numbers, load_bench_model, machine_meta, median, stats_delta, torch_threads  # noqa: E402
from sparse_profile import parse_variant  # noqa: E402
import sparse_speed as sp  # noqa: E402

# Stages whose per-step medians are printed and tabulated (seconds in the stats; shown in ms).
KEYS = ("sparse.total.fetch_seconds", "pipeline.sync_seconds.disk", "pipeline.sync_seconds.host", "pipeline.copy_seconds",
        "sparse.total.attention_seconds", "sparse.total.scoring_seconds", "sparse.total.placement_seconds",
        "pipeline.staging.background_seconds", "pipeline.staging.wait_seconds", "pipeline.stage_ahead_seconds",
        "pipeline.slot_read_seconds", "pipeline.slot_wait_seconds",
        "pipeline.slot_release_wait_seconds")
PIPE_KEYS = ("needed", "reused", "staged", "sync", "stage_ahead_entries", "needed_nonresident", "staged_nonresident",
             "promote_candidates", "promote_chosen", "promote_skipped", "promoted", "promoted_bytes",
             "slot_reserved", "slot_used", "slot_unselected", "slot_fallback", "predicted", "predicted_hits", "predictable",
             "mispredicted_nonresident")
STAGING_KEYS = ("hits", "expired", "dropped", "entries_requested", "waits", "late")


def cached_prefill(model: Any, ids: torch.Tensor, lengths: list[int], folder: Path | None,
                   model_name: str = "smollm2") -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """:func:`sparse_speed.prefill_rows`, kept in ``folder/prefill_<hash>.pt`` (hash of the ids and lengths)
    and loaded from there when present; ``folder=None`` always prefills."""
    if folder is None:
        return sp.prefill_rows(model, ids, lengths)
    key = ids.numpy().tobytes() + repr(lengths).encode()
    if model_name != "smollm2":  # smollm2 files keep the names earlier runs gave them
        key += model_name.encode()
    path = Path(folder) / f"prefill_{hashlib.sha1(key).hexdigest()[:16]}.pt"
    if path.exists():
        return torch.load(path)
    out = sp.prefill_rows(model, ids, lengths)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)
    return out


def step_figures(before: dict[str, Any], after: dict[str, Any]) -> tuple[dict[str, float], dict[str, Any]]:
    """``(stages, pipe)`` of one step from the cache's stats around it: every per-stage seconds figure
    (``last_step`` copies left out) and the pipeline's block counts (``None`` where the cache lacks one)."""
    delta = stats_delta(before, after)
    own = {k: v for k, v in delta.items() if k != "tiercache"}
    stages = {k: v for k, v in find_numbers(own, "seconds").items() if "last_step" not in k}
    pd = delta.get("pipeline", {})
    pipe: dict[str, Any] = {k: pd.get(k) for k in PIPE_KEYS}
    pipe["staging"] = {k: pd.get("staging", {}).get(k) for k in STAGING_KEYS}
    fetched = delta.get("sparse", {}).get("total", {}).get("bytes_fetched", {})
    pipe["mib_fetched"] = {tier: n / 2**20 for tier, n in fetched.items() if isinstance(n, (int, float))}
    return stages, pipe


def run_variants(model: Any, caches: list[Any], feed: torch.Tensor, steps: int, warmup: int) -> list[dict[str, Any]]:
    """Decode ``warmup + steps`` steps on every cache, step ``i`` of all before step ``i + 1`` of any, the
    order rotating by one each step; per cache the timed steps' ``ms``, ``stages`` and ``pipe``."""
    runs = [{"cache": c, "feed": feed, "ms": [], "cpu_ms": [], "stages": [], "pipe": []} for c in caches]
    with torch.no_grad(), torch_threads(1):
        for step in range(warmup + steps):
            shift = step % len(runs)
            for r in runs[shift:] + runs[:shift]:
                before = r["cache"].stats()
                t, c = time.perf_counter(), time.thread_time()
                r["feed"] = model(input_ids=r["feed"], **cache_kwargs(r["cache"], model)).logits[:, -1].argmax(-1, keepdim=True)
                elapsed, cpu = time.perf_counter() - t, time.thread_time() - c
                stages, pipe = step_figures(before, r["cache"].stats())
                if step >= warmup:
                    r["ms"].append(1000 * elapsed)
                    r["cpu_ms"].append(1000 * cpu)
                    r["stages"].append(stages)
                    r["pipe"].append(pipe)
    return [{k: r[k] for k in ("ms", "cpu_ms", "stages", "pipe")} for r in runs]


def medians(run: dict[str, Any]) -> dict[str, float]:
    """``{"ms_per_step": ..., KEY: ms}``: medians over the timed steps (a stage absent from a step counts 0)."""
    out = {"ms_per_step": median(run["ms"]), "cpu_ms_per_step": median(run.get("cpu_ms") or [0.0])}
    out.update({k: 1000 * median(st.get(k, 0.0) for st in run["stages"]) for k in KEYS})
    for tier in ("host", "disk"):
        out[f"{tier}_mib_per_step"] = median((p.get("mib_fetched") or {}).get(tier, 0.0) for p in run["pipe"])
    out["promoted_mib_per_step"] = median((p.get("promoted_bytes") or 0) / 2**20 for p in run["pipe"])
    return out


def report(run: dict[str, Any]) -> None:
    med = run["medians"]
    print(f"\n== {run['spec']}: median {med['ms_per_step']:.0f} ms/step "
          f"(forward-thread CPU {med['cpu_ms_per_step']:.0f}; "
          f"MiB/step host {med['host_mib_per_step']:.0f} disk {med['disk_mib_per_step']:.0f}, "
          f"promoted {med['promoted_mib_per_step']:.0f}); "
          "steps " + " ".join(f"{x:.0f}" for x in run["ms"]))
    print("   " + ", ".join(f"{k.split('.', 1)[1]} {med[k]:.1f}" for k in KEYS))
    for label, key in (("fetch", "sparse.total.fetch_seconds"), ("sync.disk", "pipeline.sync_seconds.disk"),
                       ("sync.host", "pipeline.sync_seconds.host"), ("copy", "pipeline.copy_seconds")):
        print(f"   per-step {label} " + " ".join(f"{1000 * st.get(key, 0):.0f}" for st in run["stages"]))
    print("   pipe last", json.dumps(run["pipe"][-1] if run["pipe"] else None))


def markdown(meta: dict[str, Any], runs: list[dict[str, Any]]) -> str:
    lines = [f"# Sparse pipeline variants: {meta['model']}, context {meta['context']} x batch {meta['batch']}, "
             f"budget {meta['budget']}, {meta['steps']} interleaved steps after {meta['warmup']} warm-up, 1 thread, cold",
             "", "Medians over the timed steps, ms (stage columns: the cache's own per-stage seconds).", "",
             "| variant | ms/step | forward-thread CPU ms/step | MiB/step host + disk | promoted MiB/step | "
             + " | ".join(k.split(".", 1)[1] for k in KEYS) + " |",
             "|---|---:|---:|---:|---:|" + "---:|" * len(KEYS)]
    for r in runs:
        m = r["medians"]
        lines.append(f"| `{r['spec']}` | {m['ms_per_step']:.0f} | {m['cpu_ms_per_step']:.0f} | "
                     f"{m['host_mib_per_step']:.0f} + {m['disk_mib_per_step']:.0f} | "
                     f"{m['promoted_mib_per_step']:.0f} | "
                     + " | ".join(f"{m[k]:.1f}" for k in KEYS) + " |")
    return "\n".join(lines) + "\n"


def variant_parser(description: str, *, context: int) -> argparse.ArgumentParser:
    """The options this script and ``sparse_first_step.py`` share: the model, the point (context, batch,
    budget, block size), repeatable ``--variant STRATEGY:FIELD=VALUE:...``, ``--out``, ``--prefill-cache``
    and ``--workdir``; each script adds its own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    parser.add_argument("--context", type=int, default=context)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--budget", type=sp._budget, default=0.25)
    parser.add_argument("--block-size", type=int, default=None, help="cache block size (default: the cache's)")
    parser.add_argument("--variant", action="append", default=[],
                        help="STRATEGY:FIELD=VALUE:... a strategy with pipeline overrides (repeatable, at least one)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the JSON and markdown results")
    parser.add_argument("--prefill-cache", type=Path, default=None, help="folder keeping prefilled K/V between runs")
    parser.add_argument("--workdir", type=Path, default=None)
    return parser


def parsed_variants(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[tuple[str, str, dict]]:
    """``args.variant`` as ``(spec, strategy, pipeline overrides)``; a parser error for none, a malformed
    spec or a strategy that is not sparse."""
    if not args.variant:
        parser.error("give at least one --variant")
    try:
        variants = [(spec, *parse_variant(spec)) for spec in args.variant]
    except ValueError as exc:
        parser.error(str(exc))
    bad = [name for _, name, _ in variants if name not in sp.SPARSE]
    if bad:
        parser.error(f"--variant: unknown strategy {bad}; choose from {sp.SPARSE}")
    return variants


def prefilled_point(args: argparse.Namespace, decode_steps: int) -> tuple[Any, torch.Tensor, int, list]:
    """``(model, ids, context, kv)``: the model, the prompt rows, the context (capped so ``decode_steps``
    more positions fit the model) and the point's prefilled K/V (``sp.point_kv``), prefilled at torch's
    default threads through ``cached_prefill``."""
    model, tokenizer = load_bench_model(args.model)
    max_pos = getattr(model.config, "max_position_embeddings", None) or 1 << 30
    context = min(args.context, max_pos - decode_steps - 2)
    ids = sp.prompt_rows(tokenizer, args.batch, context, model.config.vocab_size)
    context = min(context, ids.shape[-1])
    t0 = time.perf_counter()
    with torch_threads(sp.DEFAULT_THREADS):
        rows = cached_prefill(model, ids, [context - 1] * args.batch, args.prefill_cache, args.model)
    print(f"prefill {time.perf_counter() - t0:.0f} s ({args.batch} rows of {context - 1} tokens)", flush=True)
    return model, ids, context, sp.point_kv(rows, args.batch, context - 1)


def write_results(folder: Path, stem: str, payload: dict[str, Any], md: str) -> None:
    """``folder/stem.json`` (``payload``) and ``folder/stem.md`` (``md``), the folder made if needed."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.json").write_text(json.dumps(payload, indent=1, default=str))
    (folder / f"{stem}.md").write_text(md)
    print(f"wrote {folder}/{stem}.json and {stem}.md")


def main(argv: list[str] | None = None) -> int:
    parser = variant_parser(__doc__.split("\n\n")[0], context=8192)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="write every step here (a list per variant)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.context < 2 or args.batch < 1:
        parser.error("need --steps >= 1, --warmup >= 0, --context >= 2, --batch >= 1")
    variants = parsed_variants(parser, args)
    model, ids, context, kv = prefilled_point(args, args.steps + args.warmup)
    s = sp.Settings(host_fraction=0.25, block_size=args.block_size)
    work = Path(tempfile.mkdtemp(prefix="tiercache-sparse-variants-", dir=args.workdir))
    caches: list[Any] = []
    try:
        for n, (_, name, overrides) in enumerate(variants):
            caches.append(sp.build_cache(model, sp.Config(name, args.budget, "cold"), kv, s, work / str(n),
                                         pipeline=overrides or None))
        timed = run_variants(model, caches, ids[:, context - 1:context], args.steps, args.warmup)
    finally:
        for c in caches:
            c.close()
        shutil.rmtree(work, ignore_errors=True)

    runs = [{"spec": spec, **t} for (spec, _, _), t in zip(variants, timed)]
    for r in runs:
        r["medians"] = medians(r)
        report(r)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([{k: r[k] for k in ("spec", "ms", "cpu_ms", "stages", "pipe")} for r in runs]))
    if args.out:
        meta = {"model": args.model, "context": context, "batch": args.batch, "budget": args.budget, "steps": args.steps,
                "warmup": args.warmup, "block_size": args.block_size, "host_fraction": s.host_fraction, "threads": 1,
                "machine": machine_meta()}
        write_results(args.out, "sparse_variants", {**meta, "variants": runs}, markdown(meta, runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
