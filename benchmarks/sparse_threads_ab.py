"""Sparse decode at one and at two torch threads, A/B'd in one process (CPU, SmolLM2, cold disk).

    python benchmarks/sparse_threads_ab.py --context 8192 --batch 4 --rounds 6 --run 2 --prefill-cache DIR \\
        --strategy attention-aware --strategy fetch-every-step --strategy reuse-layer-ahead

One sparse cache per ``--strategy`` (as ``sparse_waits_ab.py`` builds them: the same prefilled K/V, host tier 25 %
of the KV, the disk the rest with ``direct_io``, the default pool bound) and a ``DynamicCache`` reference, each
decoded under every ``--config`` in turn: ``T`` (``torch.set_num_threads(T)`` around the steps, the cache's
default :data:`tiercache_llm.sparse_layer.CACHE_OPS_THREADS`), ``T:free`` (the same with ``CACHE_OPS_THREADS =
None``: the cache's own operations run at the caller's ``T`` threads, what decode did before it) or ``T:pin=N``
(``CACHE_OPS_THREADS = N``).  Default configs: ``1``, ``2:free``, ``2``.  Per round, for every cache and every
config (the configs' order rotating by round): one untimed step (it absorbs what the previous config's reads
ahead and thread count left behind), then ``--run`` timed steps back to back, then the pipeline is fenced.  All
configs of a cache decode the same cache one after another, so they see the same pipeline state.

Reports per cache and config the median wall ms/step, the forward thread's CPU ms/step, the CPU of the other
threads per step (``native``: threads Python does not know, i.e. torch's OpenMP workers; the pipeline's named
threads by group), the per-stage medians of ``stats()`` (scoring, fetch, attention, placement, the pipeline's
copies and slot waits), the paired difference against the cache's first config per round, and the load average.
``--json FILE`` writes every round.  No speed is asserted.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import find_numbers, median, stats_delta, torch_threads  # noqa: E402
from _common import load_bench_model  # noqa: E402
from sparse_variants import cached_prefill, variant_parser  # noqa: E402
import sparse_speed as sp  # noqa: E402
from tiercache_llm import sparse_layer  # noqa: E402
from tiercache_llm.hf_kwargs import cache_kwargs  # noqa: E402

KEYS = ("sparse.total.scoring_seconds", "sparse.total.fetch_seconds", "sparse.total.attention_seconds",
        "sparse.total.placement_seconds", "pipeline.copy_seconds", "pipeline.slot_wait_seconds")
DEFAULT_CONFIGS = ("1", "2:free", "2")


def parse_config(spec: str) -> tuple[int, int | None | str]:
    """``(threads, cache ops threads)`` of a ``--config``: ``T``, ``T:free`` or ``T:pin=N``; the second is
    ``"default"`` for ``T`` (the library's setting), ``None`` for ``free``."""
    m = re.fullmatch(r"(\d+)(?::(free|pin=(\d+)))?", spec)
    if not m or int(m.group(1)) < 1 or (m.group(3) is not None and int(m.group(3)) < 1):
        raise ValueError(f"--config must be T, T:free or T:pin=N with T, N >= 1, got {spec!r}")
    if m.group(2) is None:
        return int(m.group(1)), "default"
    return int(m.group(1)), None if m.group(2) == "free" else int(m.group(3))


def task_cpu() -> dict[int, float]:
    """CPU seconds so far of every thread of this process by Linux thread id (``/proc/self/task``); empty
    where there is no such folder."""
    out: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            out[int(tid)] = (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            continue
    return out


def other_cpu(before: dict[int, float], after: dict[int, float]) -> dict[str, float]:
    """CPU seconds between two :func:`task_cpu` snapshots of every thread but the caller, by group: a Python
    thread's name without its ``_N`` suffix, ``native`` for threads Python does not know (torch's OpenMP
    workers among them)."""
    me = threading.get_native_id()
    names = {t.native_id: re.sub(r"_\d+$", "", t.name) for t in threading.enumerate() if t.native_id is not None}
    out: dict[str, float] = {}
    for tid, cpu in after.items():
        if tid == me:
            continue
        key = names.get(tid, "native")
        out[key] = out.get(key, 0.0) + cpu - before.get(tid, 0.0)
    return out


def prefilled(args, decode_steps: int) -> tuple:
    """``(model, ids, context, kv)`` as ``sparse_variants.prefilled_point`` gives them, but the prompt built for
    ``--context`` first and the run refused (not the context shortened) when ``decode_steps`` more positions do not
    fit the model: so the prompt, and its prefill in ``--prefill-cache``, do not depend on the step count."""
    model, tokenizer = load_bench_model(args.model)
    max_pos = getattr(model.config, "max_position_embeddings", None) or 1 << 30
    ids = sp.prompt_rows(tokenizer, args.batch, args.context, model.config.vocab_size)
    context = min(args.context, ids.shape[-1])
    if context + decode_steps + 2 > max_pos:
        raise SystemExit(f"{decode_steps} decode steps after {context} tokens exceed the model's {max_pos} positions")
    t0 = time.perf_counter()
    with torch_threads(sp.DEFAULT_THREADS):
        rows = cached_prefill(model, ids, [context - 1] * args.batch, args.prefill_cache, args.model)
    print(f"prefill {time.perf_counter() - t0:.0f} s ({args.batch} rows of {context - 1} tokens)", flush=True)
    return model, ids, context, sp.point_kv(rows, args.batch, context - 1)


def main(argv: list[str] | None = None) -> int:
    p = variant_parser(__doc__.split("\n\n")[0], context=8192)
    p.add_argument("--strategy", action="append", default=[], choices=sp.SPARSE,
                   help="a sparse strategy to time (repeatable; default attention-aware)")
    p.add_argument("--config", action="append", default=[],
                   help="T, T:free or T:pin=N (repeatable; default 1, 2:free, 2)")
    p.add_argument("--no-dynamic", action="store_true", help="leave out the DynamicCache reference")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--run", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.rounds < 1 or args.run < 1 or args.warmup < 0:
        p.error("need --rounds >= 1, --run >= 1, --warmup >= 0")
    specs = args.config or list(DEFAULT_CONFIGS)
    try:
        configs = [parse_config(c) for c in specs]
    except ValueError as exc:
        p.error(str(exc))
    strategies = args.strategy or [sp.AWARE]
    systems = ([] if args.no_dynamic else [sp.DYNAMIC]) + strategies
    steps = args.warmup + args.rounds * len(configs) * (args.run + 1)
    model, ids, context, kv = prefilled(args, steps)
    s = sp.Settings(host_fraction=0.25, block_size=args.block_size)
    work = Path(tempfile.mkdtemp(prefix="threads-ab-", dir=args.workdir))
    default_pin = sparse_layer.CACHE_OPS_THREADS
    caches = []
    try:
        for n, name in enumerate(systems):
            caches.append(sp.build_cache(model, sp.Config(name, None if name == sp.DYNAMIC else args.budget, "cold"),
                                         kv, s, work / str(n)))
        runs = [{"system": name, "cache": c, "feed": ids[:, context - 1:context],
                 "by": {spec: {"ms": [], "cpu": [], "other": [], "stages": [], "load": []} for spec in specs}}
                for name, c in zip(systems, caches)]

        def step(r: dict) -> None:
            r["feed"] = model(input_ids=r["feed"], **cache_kwargs(r["cache"], model)).logits[:, -1].argmax(-1, keepdim=True)

        def fence(cache) -> None:
            pipe = getattr(cache, "_pipeline", None)
            if pipe is not None and hasattr(pipe, "fence"):
                pipe.fence()

        def stats(cache) -> dict:
            return cache.stats() if hasattr(cache, "stats") else {}

        with torch.no_grad():
            for r in runs:
                with torch_threads(configs[0][0]):
                    for _ in range(args.warmup):
                        step(r)
                fence(r["cache"])
            for rnd in range(args.rounds):
                shift = rnd % len(configs)
                order = list(range(len(configs)))[shift:] + list(range(len(configs)))[:shift]
                for r in runs:
                    for i in order:
                        threads, pin = configs[i]
                        sparse_layer.CACHE_OPS_THREADS = default_pin if pin == "default" else pin
                        try:
                            with torch_threads(threads):
                                step(r)  # untimed
                                before, tasks = stats(r["cache"]), task_cpu()
                                t, c = time.perf_counter(), time.thread_time()
                                for _ in range(args.run):
                                    step(r)
                                fence(r["cache"])
                                el, cp = time.perf_counter() - t, time.thread_time() - c
                                tasks_after = task_cpu()
                        finally:
                            sparse_layer.CACHE_OPS_THREADS = default_pin
                        by = r["by"][specs[i]]
                        delta = stats_delta(before, stats(r["cache"]))
                        own = {k: v for k, v in delta.items() if k != "tiercache"}
                        by["stages"].append({k: v / args.run for k, v in find_numbers(own, "seconds").items()
                                             if "last_step" not in k})
                        by["other"].append({k: 1000 * v / args.run for k, v in other_cpu(tasks, tasks_after).items()
                                            if v > 0})
                        by["ms"].append(1000 * el / args.run)
                        by["cpu"].append(1000 * cp / args.run)
                        by["load"].append(os.getloadavg()[0])
                    print(f"round {rnd + 1}/{args.rounds} {r['system']}: " + ", ".join(
                        f"[{specs[i]}] {r['by'][specs[i]]['ms'][-1]:.0f}" for i in order)
                        + f" ms/step, load {os.getloadavg()[0]:.1f}", flush=True)
    finally:
        sparse_layer.CACHE_OPS_THREADS = default_pin
        for c in caches:
            if hasattr(c, "close"):
                c.close()
        shutil.rmtree(work, ignore_errors=True)
    print(f"context {context} x batch {args.batch}, budget {args.budget}, {args.rounds} rounds x {args.run} timed "
          f"steps per config; configs {specs} (CACHE_OPS_THREADS default {default_pin})")
    for r in runs:
        print(f"== {r['system']}")
        base = r["by"][specs[0]]
        for spec in specs:
            by = r["by"][spec]
            paired = [a - b for a, b in zip(by["ms"], base["ms"])]
            groups = sorted({k for o in by["other"] for k in o})
            print(f"  [{spec}] wall {median(by['ms']):.0f} ms/step (fwd cpu {median(by['cpu']):.0f}); paired vs "
                  f"[{specs[0]}] {median(paired):+.0f} ({sum(1 for x in paired if x < 0)}/{len(paired)} faster); "
                  "other cpu " + ", ".join(f"{k} {median(o.get(k, 0.0) for o in by['other']):.0f}" for k in groups))
            print("     rounds " + " ".join(f"{x:.0f}" for x in by["ms"]) + "; "
                  + ", ".join(f"{k.split('.')[-1].replace('_seconds', '')} "
                              f"{1000 * median(st.get(k, 0.0) for st in by['stages']):.1f}" for k in KEYS
                              if r["system"] != sp.DYNAMIC)
                  + "; load " + " ".join(f"{x:.1f}" for x in by["load"]))
    if args.json:
        args.json.write_text(json.dumps({"context": context, "batch": args.batch, "budget": args.budget,
                                         "configs": specs, "runs": [{"system": r["system"], "by": r["by"]}
                                                                    for r in runs]}, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
