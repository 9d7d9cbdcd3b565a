"""Exact decode (hot-path rows 1-2), earlier vs current read-ahead settings, in one process.

    python benchmarks/exact_threads_ab.py --contexts 1024,2048 --threads 2 --repeats 5
    python benchmarks/exact_threads_ab.py --configs host --contexts 1024,2048,4096 --threads 1,2 --repeats 9

The settings that decide how exact decode's layer-ahead reads share the cores with the model
(``tiercache_llm.decode_buffer.INLINE_WHEN_BUSY``: whether layers whose reads are copies are read inline
while torch's threads fill the cores of an idle machine; ``MEMORY_AHEAD_MIN_BYTES``: the smallest layer a
memory-only cache reads ahead) are set to their earlier
values (``old``) or left at the current defaults (``new``) for each cache, and both run in the same
process on the same prefilled prompt, interleaved with ``DynamicCache`` and the plain-read baseline of
``benchmarks/hotpath.py`` (its ``decode_run``, ``plain_fetch``), the order rotated per repeat.  Per
configuration: ms per decode step (wall; median of each run's steps, then of the runs), the process's CPU
ms per step (all threads), the fetch ms per step during decode and alone (disk configurations), and the
reader threads' CPU.  ``--configs``: ``disk-warm`` / ``disk-cold`` (host 16 MiB + disk, row 2) and ``host``
(all KV in the host tier, row 1).
Greedy tokens must equal ``DynamicCache``'s (checked).  ``AB_VARIANTS="forced:IDLE=True"`` adds a variant
that takes the machine as idle whatever its load (``NAME:SETTING=VALUE,...;...``: more variants; a setting is a ``tiercache_llm.decode_buffer`` name, ``disk.NAME`` for one of ``tiercache.tiers.disk`` or ``batched.NAME`` for one of ``tiercache.batched``; ``OMP_TEAMS=N`` keeps N idle threads holding OpenMP teams
of their own during the run, see :class:`OmpTeams`).  ``--variants`` picks which run (default: all);
``--configs dynamic`` also runs ``DynamicCache`` under each variant that sets something.  Prints a markdown
table, then per thread group (forward = the main thread, readers, copier, disk-pool, torch = threads Python
did not start, i.e. OpenMP workers) the ms per step on a CPU, runnable but waiting for one, and in the kernel
(``/proc/self/task/*/schedstat`` and ``stat``); ``--out`` writes JSON.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hotpath  # noqa: E402  (the benchmarks directory is not a package)
from _common import machine_meta, median, parse_ints, torch_threads  # noqa: E402

import tiercache_llm.decode_buffer as decode_buffer  # noqa: E402

#: The earlier values of the settings this benchmark compares: before the 2-thread work of issue 8 row 2
#: (``INLINE_WHEN_BUSY``, disk-backed caches) and before memory-only caches read small layers inline
#: (``MEMORY_AHEAD_MIN_BYTES``, ``--configs host``: all KV in the host tier, hot-path row 1).
OLD = {"INLINE_WHEN_BUSY": False, "MEMORY_AHEAD_MIN_BYTES": 0}
VARIANTS = {"old": OLD, "new": {}}
for _spec in os.environ.get("AB_VARIANTS", "").split(";"):
    if _spec:
        _name, _, _body = _spec.partition(":")
        VARIANTS[_name] = {k: ast.literal_eval(v) for k, v in (kv.split("=") for kv in _body.split(",") if kv)}


def _target(name: str) -> tuple[Any, str]:
    """Where a variant's setting lives: ``disk.NAME`` in ``tiercache.tiers.disk`` (e.g.
    ``disk.MIN_BUFFERED_BYTES_PER_THREAD``), ``batched.NAME`` in ``tiercache.batched`` (e.g.
    ``batched.BUSY_COPIES_ON_CALLER``), any other name in ``tiercache_llm.decode_buffer``."""
    if name.startswith("disk."):
        import tiercache.tiers.disk as disk

        return disk, name[len("disk."):]
    if name.startswith("batched."):
        import tiercache.batched as batched

        return batched, name[len("batched."):]
    return decode_buffer, name


#: Thread groups of the per-thread table (by the Python thread's name prefix; threads Python did not start,
#: torch's OpenMP workers, are ``torch``; the main thread, which runs the forward pass, is ``forward``).
THREAD_GROUPS = (("tiercache-kv-ahead", "readers"), ("tiercache-kv-copy", "copier"), ("tiercache-disk", "disk-pool"),
                 ("tiercache-io", "io-pool"))


def _thread_group(tid: int, names: dict[int, str]) -> str:
    if tid == threading.main_thread().native_id:
        return "forward"
    name = names.get(tid)
    if name is None:
        return "torch"
    return next((group for prefix, group in THREAD_GROUPS if name.startswith(prefix)), "other")


def thread_schedstat() -> dict[int, tuple[int, int, float]]:
    """Per thread of this process: ``(ns on a CPU, ns runnable but waiting for a CPU, ns of it in the kernel)``
    from ``/proc/self/task/TID/schedstat`` and ``stat`` (the kernel share in clock ticks, so coarse: read it
    summed over steps; Linux only, empty elsewhere)."""
    out: dict[int, tuple[int, int, float]] = {}
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return out
    tick = 1e9 / os.sysconf("SC_CLK_TCK")
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                run, wait, _ = f.read().split()
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except (OSError, ValueError):
            continue
        out[int(tid)] = (int(run), int(wait), int(fields[12]) * tick)  # stime (field 15), in ns
    return out


class CpuClock(hotpath.StepClock):
    """``StepClock`` that also records the process's CPU time of each step (every thread of the process) and,
    per thread group (:data:`THREAD_GROUPS`), the time on a CPU and the time runnable but waiting for one
    (``/proc/self/task/*/schedstat``), summed over the steps after the first timed one."""

    def __init__(self, hook: Any = None) -> None:
        super().__init__(hook)
        self.cpu: list[float] = []
        self._cpu0: float | None = None
        self._sched0: dict[int, tuple[int, int, float]] = {}
        self.groups: dict[str, list[float]] = {}  # group -> [run, runnable-wait, kernel] ns over the summed steps
        self.summed = 0

    def put(self, value: torch.Tensor) -> None:
        now = time.process_time()
        sched = thread_schedstat()
        if self.puts > 1:  # as ms_per_step: the first timed step (puts == 1) is left out
            names = {t.native_id: t.name for t in threading.enumerate()}
            for tid, (run, wait, system) in sched.items():
                run0, wait0, system0 = self._sched0.get(tid, (0, 0, 0.0))
                acc = self.groups.setdefault(_thread_group(tid, names), [0.0, 0.0, 0.0])
                acc[0] += run - run0
                acc[1] += wait - wait0
                acc[2] += system - system0
            self.summed += 1
        if self.puts > 0:
            self.cpu.append(now - self._cpu0)  # type: ignore[operator]
        super().put(value)
        self._sched0 = thread_schedstat()
        self._cpu0 = time.process_time()


class OmpTeams:
    """``OMP_TEAMS=N`` in a variant: ``N`` idle Python threads, each of which ran one parallel torch op (so each
    keeps an OpenMP team of its own, as a reader thread that copied with torch's threads does) and waits until
    the run ends.  libgomp throttles the spin-waits of every team once the process has more OpenMP threads
    than cores: this gives ``DynamicCache`` the teams a tiered cache's reader threads open."""

    def __init__(self, n: int) -> None:
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._hold, name=f"omp-team-{i}", daemon=True) for i in range(n)]
        ready = [threading.Event() for _ in self.threads]
        for thread, event in zip(self.threads, ready):
            thread._ready = event  # type: ignore[attr-defined]
            thread.start()
        for event in ready:
            event.wait()

    def _hold(self) -> None:
        torch.ones(1 << 20).add_(1)  # above torch's grain: a parallel region, this thread's team
        threading.current_thread()._ready.set()  # type: ignore[attr-defined]
        self.stop.wait()

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()


def run_one(model: Any, ids: torch.Tensor, prefilled: Any, config: str, variant: str,
            settings: hotpath.Settings, workdir: Path) -> dict[str, Any]:
    clocks: list[CpuClock] = []

    def clock(hook: Any = None) -> CpuClock:
        clocks.append(CpuClock(hook))
        return clocks[-1]

    saved = {name: getattr(*_target(name)) for name in OLD if hasattr(*_target(name))}
    hotpath.StepClock, plain_clock = clock, hotpath.StepClock  # type: ignore[assignment, misc]
    from tiercache_llm import kv_cache
    idle = kv_cache.machine_idle
    if VARIANTS.get(variant, {}).get("IDLE") is not None:  # e.g. "forced:IDLE=True": as on an idle machine
        kv_cache.machine_idle = lambda: VARIANTS[variant]["IDLE"]
    try:
        saved.update({name: getattr(*_target(name)) for name in VARIANTS.get(variant, {}) if hasattr(*_target(name))})
        for name, value in VARIANTS.get(variant, {}).items():
            if name in saved:
                setattr(*_target(name), value)
        teams = OmpTeams(VARIANTS[variant]["OMP_TEAMS"]) if VARIANTS.get(variant, {}).get("OMP_TEAMS") else None
        try:
            out = hotpath.decode_run(model, ids, prefilled, config, settings, workdir)
        finally:
            if teams is not None:
                teams.close()
    finally:
        hotpath.StepClock = plain_clock  # type: ignore[misc]
        kv_cache.machine_idle = idle
        for name, value in saved.items():
            setattr(*_target(name), value)
    out["cpu_ms_per_step"] = 1000 * median(clocks[0].cpu[1:])
    c = clocks[0]
    out["thread_ms_per_step"] = {g: tuple(ns / 1e6 / max(1, c.summed) for ns in times)
                                 for g, times in c.groups.items()}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=lambda t: parse_ints(t, "--contexts"), default=(1024, 2048))
    parser.add_argument("--threads", type=lambda t: parse_ints(t, "--threads"), default=(2,))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--configs", default="disk-warm,disk-cold",
                        help="disk-warm, disk-cold and/or host (all KV in the host tier, hot-path row 1); dynamic: "
                             "DynamicCache under each variant that sets something (e.g. OMP_TEAMS=N) too")
    parser.add_argument("--variants", default=None,
                        help="which variants to run, comma-separated (default: every one, old and new included)")
    parser.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    settings = hotpath.Settings.full()
    settings.decode_steps, settings.model = args.steps, args.model
    configs = [c for c in args.configs.split(",") if c]
    chosen = list(VARIANTS) if args.variants is None else [v for v in args.variants.split(",") if v]
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown or not chosen:
        parser.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    model, tokenizer = hotpath.load_model(args.model)
    workdir = Path(tempfile.mkdtemp(prefix="tiercache-threads-ab-"))
    load_start = os.getloadavg()
    rows: list[dict[str, Any]] = []
    try:
        for n_ctx in args.contexts:
            ids = hotpath.prompt_ids(tokenizer, n_ctx, model.config.vocab_size)
            prefilled = hotpath.prefill(model, ids)
            for threads in args.threads:
                jobs = [("dynamic", "-")] + [(c, v) for c in configs for v in chosen
                                                if c != "dynamic" or VARIANTS[v]] + [("plain", "-")]
                runs: dict[tuple[str, str], list[dict[str, Any]]] = {job: [] for job in jobs}
                with torch_threads(threads):
                    for r in range(args.repeats):
                        for config, variant in jobs[r % len(jobs):] + jobs[: r % len(jobs)]:
                            if config == "plain":
                                ref = next((x[-1] for (c, v), x in runs.items() if c == "disk-warm" and x), None)
                                if ref is not None:
                                    runs[(config, variant)].append(hotpath.plain_fetch(
                                        ref["entries_per_step"], ref["disk_hits_per_step"], ref["entry_bytes"],
                                        False, args.steps, workdir))
                                continue
                            runs[(config, variant)].append(run_one(model, ids, prefilled, config, variant,
                                                                   settings, workdir))
                dyn = median(run["ms_per_step"] for run in runs[("dynamic", "-")])
                ref_tokens = runs[("dynamic", "-")][0]["tokens"]
                plain = median(p["ms_per_step"] for p in runs[("plain", "-")]) if runs[("plain", "-")] else float("nan")
                for (config, variant), xs in runs.items():
                    if config == "plain" or not xs:
                        continue
                    row = {"context": ids.shape[-1], "threads": threads, "config": config, "variant": variant,
                           "ms_per_step": median(x["ms_per_step"] for x in xs),
                           "cpu_ms_per_step": median(x["cpu_ms_per_step"] for x in xs),
                           "dynamic_ms_per_step": dyn, "plain_ms_per_step": plain,
                           "tokens_match": all(x["tokens"] == ref_tokens for x in xs),
                           "samples": [x["ms_per_step"] for x in xs],
                           "threads_ms": {g: [median(x["thread_ms_per_step"].get(g, (0.0, 0.0, 0.0))[i] for x in xs)
                                              for i in (0, 1, 2)]
                                          for g in sorted({g for x in xs for g in x["thread_ms_per_step"]})}}
                    if config != "dynamic":
                        row.update(fetch_ms=median(x["fetch_ms_per_step"] for x in xs),
                                   alone_ms=median(x.get("alone_ms_per_step", float("nan")) for x in xs),
                                   reader_cpu_ms=median(x["reader_cpu_ms_per_step"] for x in xs),
                                   exposed_ms=median(x["exposed_ms_per_step"] for x in xs))
                    rows.append(row)
                    if not row["tokens_match"]:
                        raise SystemExit(f"{config}/{variant}: greedy tokens differ from DynamicCache's")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    command = " ".join(["python", "benchmarks/exact_threads_ab.py", *(argv if argv is not None else sys.argv[1:])])
    if os.environ.get("AB_VARIANTS"):
        command = f"AB_VARIANTS={os.environ['AB_VARIANTS']!r} {command}"
    lines = [f"`{command}`: load average {load_start} at the start, {os.getloadavg()} at the end", "",
             "| context | threads | config | variant | ms/step | vs dynamic | CPU ms/step | fetch ms | fetch alone ms "
             "| plain ms | fetch / plain | alone / plain | reader CPU ms | waits ms |", "|" + "---|" * 14]
    for row in rows:
        fetch = row.get("fetch_ms", float("nan"))
        alone = row.get("alone_ms", float("nan"))
        lines.append(
            f"| {row['context']} | {row['threads']} | {row['config']} | {row['variant']} | {row['ms_per_step']:.1f} "
            f"| {row['ms_per_step'] / row['dynamic_ms_per_step']:.2f}x | {row['cpu_ms_per_step']:.1f} | {fetch:.1f} "
            f"| {alone:.1f} | {row['plain_ms_per_step']:.1f} | {fetch / row['plain_ms_per_step']:.2f}x "
            f"| {alone / row['plain_ms_per_step']:.2f}x | {row.get('reader_cpu_ms', float('nan')):.1f} "
            f"| {row.get('exposed_ms', float('nan')):.1f} |")
    lines += ["", "Per thread group, ms per step on a CPU / runnable but waiting for a CPU / in the kernel "
              "(`/proc/self/task/*/schedstat` and `stat`, medians over the repeats; the kernel share in clock "
              "ticks):", "",
              "| context | threads | config | variant | " + " | ".join(g for _, g in THREAD_GROUPS[:2])
              + " | disk-pool | forward | torch | other |", "|" + "---|" * 10]
    for row in rows:
        cells = [row["threads_ms"].get(g) for g in ("readers", "copier", "disk-pool", "forward", "torch", "other")]
        lines.append(f"| {row['context']} | {row['threads']} | {row['config']} | {row['variant']} | "
                     + " | ".join("-" if c is None else f"{c[0]:.1f} / {c[1]:.1f} / {c[2]:.1f}" for c in cells) + " |")
    print("\n".join(lines))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        meta = machine_meta()
        meta.update(command=command, load_average_start=load_start, load_average_end=os.getloadavg(),
                    variants=VARIANTS)
        (args.out / "exact_threads_ab.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        (args.out / "exact_threads_ab.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
