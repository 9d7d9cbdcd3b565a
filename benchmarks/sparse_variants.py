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
Printed per variant besides: the disk tier's own bytes read per step (background reads included), (row, KV head)
part misses (of them, blocks read ahead into reserved slots) and the reuse rate.  ``--logits FILE`` saves every
timed step's logits (per variant ``(steps, B, V)``).

Interleaved caches disturb each other (one cache's background reads run during another's steps; docs/sparse.md
"Caution on interleaved runs").  ``--rounds R`` runs every variant alone in a child process of its own (this script
with one ``--variant``), ``R`` rounds with the order rotating, and prints per variant the median over rounds of its
per-round medians, the paired per-round ms/step difference against the first variant, the rounds it was faster
in and the max |logit diff| against the first variant (``--out``: ``sparse_variants_rounds.json`` / ``.md``):

    python benchmarks/sparse_variants.py --rounds 3 --prefill-cache /tmp/kv --variant attention-aware \\
        --variant attention-aware:slot_part_reads=true
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
             "mispredicted_nonresident", "parts_selected", "parts_read", "part_misses", "slot_part_misses",
             "slot_ranged_reads", "ranged_entries", "whole_entries", "idle_read_bytes")
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
    pipe["disk_read_mib"] = sp.step_record(before, after)["disk_bytes_read"] / 2**20  # background reads included
    total = delta.get("sparse", {}).get("total", {})
    pipe["blocks_selected"], pipe["blocks_resident"] = total.get("blocks_selected"), total.get("blocks_resident")
    return stages, pipe


def run_variants(model: Any, caches: list[Any], feed: torch.Tensor, steps: int, warmup: int) -> list[dict[str, Any]]:
    """Decode ``warmup + steps`` steps on every cache, step ``i`` of all before step ``i + 1`` of any, the
    order rotating by one each step; per cache the timed steps' ``ms``, ``stages`` and ``pipe``."""
    runs = [{"cache": c, "feed": feed, "ms": [], "cpu_ms": [], "stages": [], "pipe": [], "logits": []} for c in caches]
    with torch.no_grad(), torch_threads(1):
        for step in range(warmup + steps):
            shift = step % len(runs)
            for r in runs[shift:] + runs[:shift]:
                before = r["cache"].stats()
                t, c = time.perf_counter(), time.thread_time()
                logits = model(input_ids=r["feed"], **cache_kwargs(r["cache"], model)).logits[:, -1]
                elapsed, cpu = time.perf_counter() - t, time.thread_time() - c
                r["feed"] = logits.argmax(-1, keepdim=True)
                r["logits"].append(logits.float().clone())
                stages, pipe = step_figures(before, r["cache"].stats())
                if step >= warmup:
                    r["ms"].append(1000 * elapsed)
                    r["cpu_ms"].append(1000 * cpu)
                    r["stages"].append(stages)
                    r["pipe"].append(pipe)
    return [{k: r[k] for k in ("ms", "cpu_ms", "stages", "pipe", "logits")} for r in runs]


def medians(run: dict[str, Any]) -> dict[str, float]:
    """``{"ms_per_step": ..., KEY: ms}``: medians over the timed steps (a stage absent from a step counts 0)."""
    out = {"ms_per_step": median(run["ms"]), "cpu_ms_per_step": median(run.get("cpu_ms") or [0.0])}
    out.update({k: 1000 * median(st.get(k, 0.0) for st in run["stages"]) for k in KEYS})
    for tier in ("host", "disk"):
        out[f"{tier}_mib_per_step"] = median((p.get("mib_fetched") or {}).get(tier, 0.0) for p in run["pipe"])
    out["promoted_mib_per_step"] = median((p.get("promoted_bytes") or 0) / 2**20 for p in run["pipe"])
    out["disk_read_mib_per_step"] = median(p.get("disk_read_mib", 0.0) for p in run["pipe"])
    for key in ("part_misses", "slot_part_misses", "parts_read", "slot_ranged_reads"):
        out[f"{key}_per_step"] = median(p.get(key) or 0 for p in run["pipe"])
    needed = sum(p.get("needed") or 0 for p in run["pipe"])
    out["pool_hits"] = sum(p.get("reused") or 0 for p in run["pipe"]) / needed if needed else float("nan")
    selected = sum(p.get("blocks_selected") or 0 for p in run["pipe"])  # the cache's reuse rate over the timed steps
    out["reuse"] = sum(p.get("blocks_resident") or 0 for p in run["pipe"]) / selected if selected else float("nan")
    return out


def report(run: dict[str, Any]) -> None:
    med = run["medians"]
    print(f"\n== {run['spec']}: median {med['ms_per_step']:.0f} ms/step "
          f"(forward-thread CPU {med['cpu_ms_per_step']:.0f}; "
          f"MiB/step host {med['host_mib_per_step']:.0f} disk {med['disk_mib_per_step']:.0f}, "
          f"disk tier read {med['disk_read_mib_per_step']:.0f}, promoted {med['promoted_mib_per_step']:.0f}; "
          f"part misses {med['part_misses_per_step']:.0f} (read ahead {med['slot_part_misses_per_step']:.0f}), "
          f"reuse {med['reuse']:.3f}, pool hits {med['pool_hits']:.3f}); "
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


ROUND_FIGURES = ("ms_per_step", "cpu_ms_per_step", "host_mib_per_step", "disk_mib_per_step", "disk_read_mib_per_step",
                 "pipeline.sync_seconds.disk", "pipeline.slot_wait_seconds", "part_misses_per_step",
                 "slot_part_misses_per_step", "reuse", "pool_hits")


def run_rounds(args: argparse.Namespace, variants: list[tuple[str, str, dict]]) -> int:
    """``--rounds``: each variant alone in a child process (this script with one ``--variant``), ``args.rounds``
    rounds, round ``r`` starting at variant ``r mod n``; prints per variant the medians over rounds of its per-round
    medians, its paired per-round difference in ms/step against the first variant and the rounds it was faster in,
    and whether its logits equal the first variant's at every step of every round (max |diff|)."""
    import os
    import subprocess

    work = Path(tempfile.mkdtemp(prefix="tiercache-sparse-rounds-", dir=args.workdir))
    common = ["--model", args.model, "--context", str(args.context), "--batch", str(args.batch),
              "--budget", str(args.budget), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    for flag, value in (("--block-size", args.block_size), ("--prefill-cache", args.prefill_cache),
                        ("--workdir", args.workdir)):
        if value is not None:
            common += [flag, str(value)]
    n = len(variants)
    per: list[list[dict[str, Any]]] = [[] for _ in variants]
    loads: list[tuple[float, float]] = []
    diff = [0.0] * n
    try:
        for r in range(args.rounds):
            for i in [(r + k) % n for k in range(n)]:
                out = work / f"r{r}_v{i}"
                load0 = os.getloadavg()[0]
                subprocess.run([sys.executable, __file__, *common, "--variant", variants[i][0], "--json",
                                str(out) + ".json", "--logits", str(out) + ".pt"], check=True, stdout=subprocess.DEVNULL)
                loads.append((load0, os.getloadavg()[0]))
                med = json.loads((out.with_suffix(".json")).read_text())[0]["medians"]
                per[i].append(med)
                print(f"round {r} {variants[i][0]}: " + ", ".join(f"{k} {med[k]:.3g}" for k in ROUND_FIGURES)
                      + f"; load {load0:.1f} -> {loads[-1][1]:.1f}", flush=True)
            first = torch.load(work / f"r{r}_v0.pt")[0]
            for i in range(1, n):
                other = torch.load(work / f"r{r}_v{i}.pt")[0]
                diff[i] = max(diff[i], float((first - other).abs().max()) if first.shape == other.shape else float("inf"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{args.rounds} rounds, one cache per process; load average {loads[0][0]:.1f} at the start, "
          f"{loads[-1][1]:.1f} at the end (range {min(min(x) for x in loads):.1f}-{max(max(x) for x in loads):.1f})")
    base = [m["ms_per_step"] for m in per[0]]
    rows = []
    for i, (spec, _, _) in enumerate(variants):
        ms = [m["ms_per_step"] for m in per[i]]
        paired = [a - b for a, b in zip(ms, base)]
        fig = {k: median(m[k] for m in per[i]) for k in ROUND_FIGURES}
        rows.append({"spec": spec, "rounds": per[i], "medians": fig, "paired_ms": paired,
                     "faster_rounds": sum(d < 0 for d in paired), "max_logit_diff": diff[i]})
        print(f"{spec}: {fig['ms_per_step']:.0f} ms/step (per round {' '.join(f'{x:.0f}' for x in ms)}; paired vs first "
              f"{median(paired):+.0f}, faster in {rows[-1]['faster_rounds']} of {len(paired)}), forward-thread CPU "
              f"{fig['cpu_ms_per_step']:.0f}, MiB/step host {fig['host_mib_per_step']:.0f} + disk "
              f"{fig['disk_mib_per_step']:.0f} (disk tier read {fig['disk_read_mib_per_step']:.0f}), sync disk "
              f"{fig['pipeline.sync_seconds.disk']:.1f} ms, slot waits {fig['pipeline.slot_wait_seconds']:.1f}"
              f" ms, part misses {fig['part_misses_per_step']:.0f} (read ahead {fig['slot_part_misses_per_step']:.0f}), "
              f"reuse {fig['reuse']:.3f} (pool hits {fig['pool_hits']:.3f}), max |logit diff| vs first {diff[i]}")
    if args.out:
        meta = {"model": args.model, "context": args.context, "batch": args.batch, "budget": args.budget,
                "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds, "threads": 1, "loads": loads,
                "machine": machine_meta()}
        lines = [f"# Sparse pipeline variants, one cache per process: {args.model}, context {args.context} x batch "
                 f"{args.batch}, budget {args.budget}, {args.rounds} rounds x {args.steps} steps after {args.warmup} "
                 "warm-up, 1 thread, cold", "", "Medians over rounds of each round's medians.", "",
                 "| variant | ms/step | paired vs first (rounds faster) | MiB/step host + disk | disk tier read MiB/step "
                 "| sync disk ms | slot waits ms | part misses (read ahead) | reuse (pool hits) | max logit diff |",
                 "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for row in rows:
            f = row["medians"]
            lines.append(f"| `{row['spec']}` | {f['ms_per_step']:.0f} | {median(row['paired_ms']):+.0f} "
                         f"({row['faster_rounds']} of {args.rounds}) | {f['host_mib_per_step']:.0f} + "
                         f"{f['disk_mib_per_step']:.0f} | {f['disk_read_mib_per_step']:.0f} | "
                         f"{f['pipeline.sync_seconds.disk']:.1f} | {f['pipeline.slot_wait_seconds']:.1f} | "
                         f"{f['part_misses_per_step']:.0f} ({f['slot_part_misses_per_step']:.0f}) | {f['reuse']:.3f} ({f['pool_hits']:.3f}) | "
                         f"{row['max_logit_diff']} |")
        write_results(args.out, "sparse_variants_rounds", {**meta, "variants": rows}, "\n".join(lines) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = variant_parser(__doc__.split("\n\n")[0], context=8192)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="write every step here (a list per variant)")
    parser.add_argument("--logits", type=Path, default=None,
                        help="save every timed step's last-position logits here (torch.save: per variant (steps, B, V))")
    parser.add_argument("--rounds", type=int, default=0,
                        help="one cache per process: every variant runs alone in a child process of its own, ROUNDS "
                             "rounds, the order rotating per round; paired per-round figures against the first variant")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.context < 2 or args.batch < 1 or args.rounds < 0:
        parser.error("need --steps >= 1, --warmup >= 0, --context >= 2, --batch >= 1, --rounds >= 0")
    variants = parsed_variants(parser, args)
    if args.rounds:
        return run_rounds(args, variants)
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
        args.json.write_text(json.dumps([{k: r[k] for k in ("spec", "ms", "cpu_ms", "stages", "pipe", "medians")}
                                         for r in runs]))
    if args.logits:
        args.logits.parent.mkdir(parents=True, exist_ok=True)
        torch.save([torch.stack(r["logits"]) for r in runs], args.logits)
    if args.out:
        meta = {"model": args.model, "context": context, "batch": args.batch, "budget": args.budget, "steps": args.steps,
                "warmup": args.warmup, "block_size": args.block_size, "host_fraction": s.host_fraction, "threads": 1,
                "machine": machine_meta()}
        kept = [{k: v for k, v in r.items() if k != "logits"} for r in runs]
        write_results(args.out, "sparse_variants", {**meta, "variants": kept}, markdown(meta, kept))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
