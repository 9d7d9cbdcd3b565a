"""Sparse-decode speed benchmark (CPU, SmolLM2; issue 9): ms per decode step and bytes read per tier.

    python benchmarks/sparse_speed.py --out benchmarks/results               # full run (SmolLM2)
    python benchmarks/sparse_speed.py --quick                                # tiny random model, seconds
    python benchmarks/sparse_speed.py --contexts 8192 --batches 4 --threads 1 --steps 4 --repeats 3

For every context × batch × torch thread count, side by side in one run and interleaved within each
repeat (the order rotates between repeats):

- ``dynamic``: transformers ``DynamicCache``, everything in RAM (no tiers);
- ``exact``: exact ``TieredKVCache``;
- ``fetch-every-step``: sparse, ``strategy="fetch-every-step"`` (every selected block fetched from its
  home tier every step: the published offloaders' design);
- ``attention-aware``: sparse, ``strategy="attention-aware"`` (this project's design).

Tiered caches get a host tier of 25 % of the KV size (layers × 2 × KV heads × head dim × dtype size ×
tokens × batch) and a disk tier for the rest under ``--workdir`` (default: a temp directory; keep it on
the real disk, not tmpfs).  Each tiered configuration runs **cold** (disk reads bypass the page cache:
the disk tier's ``direct_io`` where it is in effect, else the store is dropped from the page cache before
every step — the label says which) and **warm** (page cache left alone).  The prompt is prefilled once
per run (every context is a prefix of the longest; every batch takes the first rows) into a
``DynamicCache`` and copied into each dynamic / exact run's cache with ``Cache.update``; sparse runs
decode from a ``copy.deepcopy`` of a base cache prefilled through the model once per point (see
``run_all``), so no timing includes a prefill.  The first decode step (consuming the last prompt token) is untimed; then ``--steps`` steps
are timed one by one (greedy tokens).  Figures are medians over every timed step of every repeat.
Targets (8K context, batch 4, budget 25 %, cold): attention-aware ≥ 1.74× faster than
fetch-every-step and ≥ 3× faster than exact tiered.  Writes ``sparse_speed.json`` (every sample, per-step
byte counts, the caches' stats, machine, versions, settings, runtime), ``sparse_speed.md`` and
``sparse_speed.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402  (the benchmarks directory is not a package)
    parse_ints,
    MiB, SPARSE_UNAVAILABLE, SparseUnavailable, drop_page_cache, filesystem_of, find_numbers, has_field,
    kv_cache_bytes, load_bench_model, machine_meta, make_tiered, median, reuse_rate, sparse_available,
    stats_delta, tier_row, torch_threads,
)

DEFAULT_THREADS = torch.get_num_threads()
DYNAMIC, EXACT, FETCH, AWARE = "dynamic", "exact", "fetch-every-step", "attention-aware"
SYSTEMS = (DYNAMIC, EXACT, FETCH, AWARE)
TARGETS = {FETCH: 1.74, EXACT: 3.0}  # attention-aware speed-up over these, at TARGET_POINT
TARGET_POINT = (8192, 4)  # (requested context, batch)


@dataclass
class Settings:
    model: str = "smollm2"
    contexts: tuple[int, ...] = (2048, 4096, 8192)
    batches: tuple[int, ...] = (1, 4, 8)
    steps: int = 4  # timed decode steps per run
    repeats: int = 3
    threads: tuple[int, ...] = field(default_factory=lambda: tuple(dict.fromkeys((1, DEFAULT_THREADS))))
    budget: float = 0.25
    host_fraction: float = 0.25
    block_size: int | None = None  # None: the cache's default
    warm: bool = True  # also run every tiered configuration with the page cache warm
    fill: str = "update"  # how exact tiered caches get the prompt: "update" (the prefilled K/V) or "model" (prefill each run)

    @classmethod
    def quick(cls) -> "Settings":
        return cls(model="tiny", contexts=(256, 512), batches=(1, 2), steps=2, repeats=1, threads=(1,), block_size=16)


def configurations(s: Settings) -> list[tuple[str, str | None]]:
    """``(system, "cold" | "warm" | None)`` in run order (dynamic has no page-cache state)."""
    out: list[tuple[str, str | None]] = [(DYNAMIC, None)]
    for system in (EXACT, FETCH, AWARE):
        out.append((system, "cold"))
        if s.warm:
            out.append((system, "warm"))
    return out


def estimate_seconds(s: Settings, kv_per_token: int) -> float:
    """A rough runtime estimate for SmolLM2 on a 2-core CPU: prefill ≈ 2.5 ms/token; a DynamicCache step ≈
    70 ms + 16 ms per 1K tokens of context × batch; tiered reads ≈ 1.1 ms/MB (exact reads the whole KV,
    sparse about the budget); filling or copying a tiered cache ≈ 3 ms/MB; each sparse (strategy, cold/warm)
    prefills a base cache through the model once per point.  The tiny model is ~100× faster."""
    total = 2.5e-3 * max(s.contexts) * max(s.batches)
    for c in s.contexts:
        for b in s.batches:
            mb = kv_per_token * c * b / 1e6
            base = 0.07 + 0.016 * c * b / 1024
            runs = {DYNAMIC: base, EXACT: base + 1.1e-3 * mb, FETCH: base + 1.1e-3 * mb * s.budget,
                    AWARE: base + 0.5e-3 * mb * s.budget}
            for system, state in configurations(s):
                total += s.repeats * len(s.threads) * ((s.steps + 1) * runs[system] + (0 if system == DYNAMIC else 3e-3 * mb))
            bases = sum(system in (FETCH, AWARE) for system, _ in configurations(s))
            total += bases * 2.5e-3 * c * b  # sparse base caches prefilled through the model
    return total / (100 if s.model == "tiny" else 1)


# -- prompts and prefill ----------------------------------------------------------------------------------
def prompt_rows(tokenizer: Any, rows: int, tokens: int, vocab: int) -> torch.Tensor:
    """``(rows, n)`` prompt ids, ``n <= tokens`` equal for every row (no padding): passkey haystacks with
    different keys and depths per row for a real tokenizer, seeded random ids without one."""
    if tokenizer is None:
        return torch.randint(3, vocab, (rows, tokens), generator=torch.Generator().manual_seed(tokens))
    from tiercache_llm.prompts import passkey_prompt

    ids = [passkey_prompt(tokenizer, n_tokens=tokens, depth=(r + 0.5) / rows, seed=r).input_ids[0] for r in range(rows)]
    n = min(len(x) for x in ids)
    return torch.stack([x[:n] for x in ids])


def prefill_rows(model: Any, ids: torch.Tensor, chunk: int = 2048) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer ``(keys, values)`` of ``ids[:, :-1]`` (every row prefilled alone, in chunks, so memory
    stays at one row's activations), concatenated over rows."""
    from transformers import DynamicCache

    per_row = []
    with torch.no_grad():
        for r in range(ids.shape[0]):
            cache = DynamicCache(config=model.config)
            row = ids[r:r + 1, :-1]
            for start in range(0, row.shape[-1], chunk):
                model(input_ids=row[:, start:start + chunk], past_key_values=cache, use_cache=True)
            per_row.append([(layer.keys, layer.values) for layer in cache.layers])
    return [(torch.cat([row[i][0] for row in per_row]), torch.cat([row[i][1] for row in per_row]))
            for i in range(len(per_row[0]))]


def sliced(prefilled: list[tuple[torch.Tensor, torch.Tensor]], batch: int, tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``batch`` rows and ``tokens`` positions of every layer (contiguous copies)."""
    return [(k[:batch, :, :tokens].contiguous(), v[:batch, :, :tokens].contiguous()) for k, v in prefilled]


# -- one run ----------------------------------------------------------------------------------------------
@dataclass
class Run:
    """One configuration's timed steps at one point."""

    context: int
    requested_context: int
    batch: int
    threads: int
    system: str
    state: str | None  # "cold" / "warm" / None (dynamic)
    repeat: int
    available: bool = True
    note: str | None = None
    cold_method: str | None = None  # "direct_io" / "fadvise" for cold runs
    step_ms: list[float] = field(default_factory=list)
    bytes_fetched: list[float] = field(default_factory=list)  # per step: bytes the cache fetched from its tiers
    disk_bytes: list[float] = field(default_factory=list)  # per step: bytes read from the disk tier
    host_bytes: list[float] = field(default_factory=list)  # per step: fetched - disk (served by the host tier)
    per_step: list[dict[str, dict[str, float]]] = field(default_factory=list)  # {"delta": counters, "now": rates} per step
    reuse_rate: float | None = None
    tokens: list[list[int]] = field(default_factory=list)
    stats: dict[str, Any] | None = None
    error: str | None = None  # traceback of a sparse run that failed (its note says "error: ...")
    bytes_source: str | None = None  # "cache": the cache's own per-tier counters; "counters": kv + disk tier


def build_cache(model: Any, system: str, state: str | None, kv: list[tuple[torch.Tensor, torch.Tensor]],
                s: Settings, store: Path, prompt: torch.Tensor | None = None, *, through_model: bool = False) -> Any:
    """A fresh cache of ``system`` holding the prompt: ``kv`` (per layer ``(B, H, T, D)`` keys and values)
    handed to ``Cache.update`` layer by layer (what a prefill does), or with ``through_model`` ``prompt``
    (``(B, T)`` ids) prefilled through the model in 2048-token chunks (sparse caches need this: their
    digests are built by the model's attention)."""
    from transformers import DynamicCache
    from tiercache_llm import TieredKVSettings

    if system == DYNAMIC:
        cache = DynamicCache(config=model.config)
    else:
        batch, tokens = kv[0][0].shape[0], kv[0][0].shape[2]
        kv_bytes = kv_cache_bytes(model.config, tokens, batch, kv[0][0].dtype)  # the cap is 25 % of this
        grow = kv_bytes * (s.steps + 2 + 64) // max(1, tokens)
        opts: dict[str, Any] = dict(host=max(64 * 1024, int(s.host_fraction * kv_bytes)),
                                    disk=2 * (kv_bytes + grow) + 64 * MiB, path=store)
        if has_field(TieredKVSettings, "direct_io"):
            opts["direct_io"] = state == "cold"
        if s.block_size is not None:
            opts["block_size"] = s.block_size
        if system == EXACT:
            cache = make_tiered(model, "exact", **opts)
        else:
            cache = make_tiered(model, "sparse", budget=s.budget, strategy=system, **opts)
    try:
        if through_model:
            with torch.no_grad():
                for start in range(0, prompt.shape[-1], 2048):
                    model(input_ids=prompt[:, start:start + 2048], past_key_values=cache, use_cache=True)
        else:
            for i, (k, v) in enumerate(kv):
                cache.update(k, v, i)
    except BaseException:
        if hasattr(cache, "close"):
            cache.close()
        raise
    return cache


def tier_bytes(delta: dict[str, Any]) -> dict[str, float]:
    """``{tier: bytes}`` fetched during one step according to the cache's own cumulative per-tier counters
    (``...total.bytes_fetched.<tier>`` in a sparse cache's ``stats()``), or ``{}`` when it has none."""
    out: dict[str, float] = {}
    for path, value in find_numbers({k: v for k, v in delta.items() if k != "tiercache"}, "bytes_fetched.").items():
        head, _, tier = path.rpartition(".")
        if head.endswith("bytes_fetched") and "last" not in head:
            out[tier] = out.get(tier, 0.0) + value
    return out


def time_run(model: Any, cache: Any, last: torch.Tensor, run: Run, steps: int, store: Path) -> None:
    """Decode ``steps + 1`` greedy tokens from ``last`` (``(B, 1)``, the last prompt token); time steps
    2.. one by one; between steps (untimed) drop the store from the page cache when the run is cold by
    fadvise, and read the cache's counters."""
    tiered = hasattr(cache, "stats")
    ids = last
    with torch.no_grad():
        for step in range(steps + 1):
            if run.cold_method == "fadvise":
                drop_page_cache(store)
            before = cache.stats() if tiered and step else None
            start = time.perf_counter()
            logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits
            elapsed = time.perf_counter() - start
            ids = logits[:, -1].argmax(-1, keepdim=True)
            run.tokens.append(ids[:, 0].tolist())
            if step == 0:
                continue
            run.step_ms.append(1000 * elapsed)
            if tiered:
                after = cache.stats()
                delta = stats_delta(before, after)
                per_tier = tier_bytes(delta)
                if per_tier:  # the cache's own bytes per tier (sparse mode)
                    run.bytes_source = "cache"
                    disk = sum(v for k, v in per_tier.items() if k == "disk")
                    host = sum(v for k, v in per_tier.items() if k != "disk")
                    fetched = disk + host
                else:  # exact mode: what the KV layer fetched, split by the disk tier's reads
                    run.bytes_source = "counters"
                    fetched = float(delta["kv"].get("bytes_fetched", 0))
                    disk = float(tier_row(delta, "disk").get("bytes_read", 0))
                    host = max(0.0, fetched - disk)
                run.bytes_fetched.append(fetched)
                run.disk_bytes.append(disk)
                run.host_bytes.append(host)
                # counters as this step's increments; rates and per-step figures as the cache reports them now
                own = lambda d: {k: v for k, v in d.items() if k != "tiercache"}  # noqa: E731
                run.per_step.append({"delta": find_numbers(own(delta), "select", "resident", "seconds", "bytes", "fetch"),
                                     "now": find_numbers(own(after), "reuse", "rate", "last")})
    if tiered:
        run.stats = cache.stats()
        run.reuse_rate = reuse_rate(run.stats)


def measure(model: Any, system: str, state: str | None, kv: Any, prompt: torch.Tensor, s: Settings, workdir: Path,
            run: Run, base: Any = None) -> Run:
    """Time one run into ``run``.  The cache is ``copy.deepcopy(base)`` when a prefilled ``base`` cache is
    given (sparse systems; the copy's disk tier lands in ``workdir/copies``), else a fresh cache built from
    the prefilled ``kv`` (``prompt`` is ``(B, T + 1)``: the prefilled tokens and the last prompt token,
    which the first, untimed, step consumes)."""
    last = prompt[:, -1:]
    store = workdir / ("copies" if base is not None else "kv")
    shutil.rmtree(store, ignore_errors=True)
    store.mkdir(parents=True, exist_ok=True)
    cache = None
    try:
        if base is not None:
            tempfile.tempdir, before = str(store), tempfile.tempdir  # where a copy's temporary disk tier goes
            try:
                cache = copy.deepcopy(base)
            finally:
                tempfile.tempdir = before
        else:
            cache = build_cache(model, system, state, kv, s, store / "kv", prompt[:, :-1],
                                through_model=s.fill == "model" and system != DYNAMIC)
        if state == "cold":
            run.cold_method = "direct_io" if tier_row(cache.stats(), "disk").get("direct_io") else "fadvise"
        time_run(model, cache, last, run, s.steps, store)
    except SparseUnavailable as exc:
        run.available, run.note = False, str(exc)
    except Exception as exc:  # noqa: BLE001 - a sparse failure is reported in the results, the run goes on
        if system in (DYNAMIC, EXACT):
            raise
        fail(run, exc)
    finally:
        if cache is not None and hasattr(cache, "close"):
            cache.close()
        shutil.rmtree(store, ignore_errors=True)
    return run


def fail(run: Run, exc: BaseException) -> None:
    run.available, run.note = False, f"error: {type(exc).__name__}: {exc}"
    run.error = "".join(traceback.format_exception(exc))
    run.step_ms.clear()


def run_all(s: Settings, workdir: Path, *, show_progress: bool = True) -> tuple[list[Run], dict[str, Any]]:
    """Every point and configuration.  Sparse caches build their key digests in the model's attention
    during prefill, so they cannot be handed prefilled K/V through ``Cache.update``: for each (context,
    batch) every sparse (system, cold/warm) gets one *base* cache prefilled through the model (torch's
    default threads, untimed), and each of its runs decodes from a ``copy.deepcopy`` of it."""
    model, tokenizer = load_bench_model(s.model)
    max_pos = getattr(model.config, "max_position_embeddings", None) or 1 << 30
    longest = min(max(s.contexts), max_pos - s.steps - 2)
    rows = max(s.batches)
    info: dict[str, Any] = {"kv_bytes_per_token": kv_cache_bytes(model.config, 1, 1, model.dtype)}
    info["estimated_seconds"] = estimate_seconds(s, info["kv_bytes_per_token"])
    print(f"sparse_speed: contexts {s.contexts}, batches {s.batches}, threads {s.threads}, {len(configurations(s))} "
          f"configurations, {s.steps} steps x {s.repeats} repeats; estimated runtime ~{info['estimated_seconds'] / 60:.0f} min "
          "(rough; see estimate_seconds)", flush=True)
    with torch_threads(DEFAULT_THREADS):
        t0 = time.perf_counter()
        ids = prompt_rows(tokenizer, rows, longest, model.config.vocab_size)
        prefilled = prefill_rows(model, ids)
        info["prefill_seconds"] = time.perf_counter() - t0
    info["prompt_tokens"] = int(ids.shape[-1])
    info["base_prefill_seconds"] = 0.0
    configs = configurations(s)
    runs: list[Run] = []
    skip: dict[str, str] = {}  # system -> why it is unavailable (asked once)
    total = len(s.contexts) * len(s.batches) * len(s.threads) * s.repeats * len(configs)
    bar = tqdm(total=total, desc="sparse speed", unit="run", disable=not show_progress)
    for c in s.contexts:
        context = min(c, ids.shape[-1])
        for b in s.batches:
            kv = sliced(prefilled, b, context - 1)
            prompt = ids[:b, :context]
            bases: dict[tuple[str, str | None], Any] = {}  # (system, state) -> base cache or the exception

            def base_for(system: str, state: str | None) -> Any:
                if (system, state) not in bases:
                    bar.set_postfix_str(f"ctx {context} batch {b} prefill {system} {state}")
                    t0 = time.perf_counter()
                    try:
                        with torch_threads(DEFAULT_THREADS):
                            bases[(system, state)] = build_cache(
                                model, system, state, kv, s, workdir / f"base-{system}-{state}", prompt[:, :-1],
                                through_model=True)
                    except Exception as exc:  # noqa: BLE001 - recorded per run below
                        bases[(system, state)] = exc
                    info["base_prefill_seconds"] += time.perf_counter() - t0
                return bases[(system, state)]

            try:
                for t in s.threads:
                    for r in range(s.repeats):
                        order = configs[r % len(configs):] + configs[:r % len(configs)]  # rotate the order
                        for system, state in order:
                            run = Run(context, c, b, t, system, state, r)
                            bar.set_postfix_str(f"ctx {context} batch {b} {t}t {system} {state or ''} #{r + 1}")
                            base = base_for(system, state) if system in (FETCH, AWARE) and system not in skip else None
                            if system in skip:
                                run.available, run.note = False, skip[system]
                            elif isinstance(base, SparseUnavailable):
                                run.available, run.note = False, str(base)
                            elif isinstance(base, Exception):
                                fail(run, base)
                            else:
                                with torch_threads(t):
                                    measure(model, system, state, kv, prompt, s, workdir, run, base)
                            if not run.available and (run.note or "").startswith(SPARSE_UNAVAILABLE):
                                skip[system] = run.note  # the mode is absent: asking again is pointless
                            runs.append(run)
                            bar.update(1)
            finally:
                for base in bases.values():
                    if hasattr(base, "close"):
                        base.close()
                for system, state in bases:
                    shutil.rmtree(workdir / f"base-{system}-{state}", ignore_errors=True)
            del kv
    bar.close()
    return runs, info


# -- summary ------------------------------------------------------------------------------------------------
@dataclass
class Row:
    """Medians of one (context, batch, threads, system, state)."""

    context: int
    requested_context: int
    batch: int
    threads: int
    system: str
    state: str | None
    available: bool
    note: str | None
    cold_method: str | None
    ms_per_step: float
    bytes_fetched: float
    disk_bytes: float
    host_bytes: float
    reuse_rate: float | None
    samples_ms: list[float]
    tokens_match_dynamic: bool | None  # exact tiered: greedy tokens equal DynamicCache's (they must)
    token_agreement: float | None = None  # fraction of greedy tokens equal to DynamicCache's (sparse: a sanity figure)


def summarise(runs: list[Run]) -> list[Row]:
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault((run.context, run.requested_context, run.batch, run.threads, run.system, run.state), []).append(run)
    dyn_tokens = {(k[0], k[2], k[3]): [r.tokens for r in g] for k, g in groups.items() if k[4] == DYNAMIC}
    rows = []
    for key, group in groups.items():
        ok = [g for g in group if g.available]
        samples = [ms for g in ok for ms in g.step_ms]
        match, agreement = None, None
        ref = dyn_tokens.get((key[0], key[2], key[3]))
        if ok and ref and key[4] != DYNAMIC:
            pairs = [(a, b) for g in ok for step, ref_step in zip(g.tokens, ref[0]) for a, b in zip(step, ref_step)]
            agreement = sum(a == b for a, b in pairs) / len(pairs) if pairs else None
            if key[4] == EXACT:  # exact attention must produce DynamicCache's greedy tokens
                match = all(g.tokens == ref[0] for g in ok)
        reuse = [g.reuse_rate for g in ok if g.reuse_rate is not None]
        rows.append(Row(key[0], key[1], key[2], key[3], key[4], key[5], bool(ok), None if ok else group[0].note,
                        ok[0].cold_method if ok else None, median(samples),
                        median([x for g in ok for x in g.bytes_fetched]), median([x for g in ok for x in g.disk_bytes]),
                        median([x for g in ok for x in g.host_bytes]), median(reuse) if reuse else None, samples, match,
                        agreement))
    return rows


def targets(rows: list[Row]) -> list[dict[str, Any]]:
    """The issue's two ratios at 8K × batch 4 (cold runs), per thread count; ``met`` is None when a side
    is missing (sparse not available, or the point was not run)."""
    out = []
    index = {(r.requested_context, r.batch, r.threads, r.system, r.state): r for r in rows}
    for threads in sorted({r.threads for r in rows}):
        aware = index.get((*TARGET_POINT, threads, AWARE, "cold"))
        for system, target in TARGETS.items():
            base = index.get((*TARGET_POINT, threads, system, "cold"))
            ratio = None
            if aware and base and aware.available and base.available:
                ratio = base.ms_per_step / aware.ms_per_step
            note = None
            if aware is None or base is None:
                note = f"{TARGET_POINT[0]} x batch {TARGET_POINT[1]} not in this run"
            elif not (aware.available and base.available):
                note = (aware.note if not aware.available else base.note) or SPARSE_UNAVAILABLE
            out.append({"what": f"attention-aware vs {system}, ctx {TARGET_POINT[0]}, batch {TARGET_POINT[1]}, cold",
                        "threads": threads, "figure_ms": aware.ms_per_step if aware and aware.available else None,
                        "baseline_ms": base.ms_per_step if base and base.available else None, "ratio": ratio,
                        "target": target, "met": None if ratio is None else ratio >= target, "note": note})
    return out


def _ms(v: float | None) -> str:
    return "–" if v is None or v != v else (f"{v:.3g}" if v < 1000 else f"{v:.0f}")


def _mib(v: float | None) -> str:
    return "–" if v is None or v != v else f"{v / MiB:.3g}"


def _short(note: str | None) -> str:
    return SPARSE_UNAVAILABLE if note and note.startswith(SPARSE_UNAVAILABLE) else (note or "n/a")[:100]


def table(rows: list[Row]) -> list[str]:
    """One line per (context, batch, threads): each system's ms/step (cold; warm beside it) and the
    bytes read per step from host / disk, and the ratios the targets use."""
    index = {(r.context, r.batch, r.threads, r.system, r.state): r for r in rows}
    points = sorted({(r.context, r.requested_context, r.batch, r.threads) for r in rows}, key=lambda p: (p[3], p[1], p[2]))
    lines = ["| context | batch | threads | DynamicCache ms | exact ms cold / warm | fetch-every-step ms cold / warm | "
             "attention-aware ms cold / warm | MiB/step host+disk (exact / fetch-every-step / attention-aware, cold) | "
             "reuse rate | fetch-every-step ÷ aware | exact ÷ aware |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c, rc, b, t in points:
        get = lambda system, state: index.get((c, b, t, system, state))  # noqa: E731
        cells = []
        dyn = get(DYNAMIC, None)
        cells.append(_ms(dyn.ms_per_step) if dyn else "–")
        for system in (EXACT, FETCH, AWARE):
            cold, warm = get(system, "cold"), get(system, "warm")
            if cold is not None and not cold.available:
                cells.append(_short(cold.note))
                continue
            text = _ms(cold.ms_per_step) if cold else "–"
            if cold and cold.cold_method:
                text += f" ({cold.cold_method})"
            if warm is not None and warm.available:
                text += f" / {_ms(warm.ms_per_step)}"
            cells.append(text)
        io = []
        for system in (EXACT, FETCH, AWARE):
            r = get(system, "cold")
            io.append(f"{_mib(r.host_bytes)}+{_mib(r.disk_bytes)}" if r and r.available else "–")
        cells.append(" / ".join(io))
        aware, fetch, exact = get(AWARE, "cold"), get(FETCH, "cold"), get(EXACT, "cold")
        cells.append(f"{aware.reuse_rate:.3f}" if aware and aware.available and aware.reuse_rate is not None else "–")
        for base in (fetch, exact):
            ok = aware and base and aware.available and base.available
            cells.append(f"{base.ms_per_step / aware.ms_per_step:.2f}×" if ok else "–")
        label = f"{c}" if c == rc else f"{c} ({rc} requested)"
        lines.append(f"| {label} | {b} | {t} | " + " | ".join(cells) + " |")
    return lines


def _load(meta: dict[str, Any], key: str) -> str:
    value = meta.get(key)
    return "/".join(f"{x:.1f}" for x in value) if value else "?"


def write_results(runs: list[Run], rows: list[Row], meta: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    goals = targets(rows)
    (out / "sparse_speed.json").write_text(json.dumps(
        {"meta": meta, "targets": goals, "rows": [asdict(r) for r in rows], "runs": [asdict(r) for r in runs]},
        indent=1, default=str))
    s = meta["settings"]
    lines = ["# Sparse decode speed (CPU)", "",
             f"`{meta['command']}` on {meta['machine']} ({meta['cpus']} CPUs), {meta['date_utc']} UTC, "
             f"{meta['runtime_s']:.0f} s in all (prefill {meta['prefill_seconds']:.0f} s); model {s['model']}, "
             f"budget {100 * s['budget']:g}%, host tier {100 * s['host_fraction']:g}% of the KV size, disk tier the rest "
             f"on {meta['workdir_filesystem']}; {s['steps']} timed steps x {s['repeats']} repeats, medians; "
             f"load average {_load(meta, 'load_average_start')} at the start, {_load(meta, 'load_average')} at the end "
             "(1/5/15 min).",
             "Cold: disk reads bypass the page cache (`direct_io` where the disk tier has it in effect, else "
             "`fadvise` = the store dropped from the page cache before every step); warm: page cache left alone. "
             "MiB/step: bytes fetched from the tiers per step split into host (fetched − disk) and disk "
             "(the disk tier's `bytes_read`). See docs/benchmarks.md, \"Sparse decode\".", ""]
    if meta.get("quick"):
        lines += ["**Quick run**: tiny random model and sizes; the figures say the code runs, not how fast it is.", ""]
    if not meta.get("sparse_available", True):
        lines += [f"**{meta.get('sparse_note')}** — sparse columns are marked, not measured.", ""]
    lines += ["## Targets", "", "| what | threads | figure | baseline | ratio | target | met |", "|---|---|---|---|---|---|---|"]
    for g in goals:
        met = {True: "met", False: "**not met**", None: "–"}[g["met"]]
        ratio = f"{g['ratio']:.2f}×" if g["ratio"] is not None else _short(g["note"])
        lines.append(f"| {g['what']} | {g['threads']} | {_ms(g['figure_ms'])} ms | {_ms(g['baseline_ms'])} ms | {ratio} "
                     f"| ≥ {g['target']:g}× | {met} |")
    lines += ["", "## Every point", ""] + table(rows)
    bad = [r for r in rows if r.tokens_match_dynamic is False]
    if bad:
        lines += ["", "**Exact tiered tokens differ from DynamicCache's** at: " +
                  ", ".join(f"ctx {r.context} batch {r.batch} {r.threads}t {r.state}" for r in bad)]
    (out / "sparse_speed.md").write_text("\n".join(lines) + "\n")
    plot(rows, out / "sparse_speed.png")


def plot(rows: list[Row], path: Path) -> None:
    """Per thread count: ms/step of every system per (context, batch), cold solid, warm hatched."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    threads = sorted({r.threads for r in rows})
    fig, axes = plt.subplots(len(threads), 1, figsize=(12, 4 * len(threads)), squeeze=False)
    colors = {DYNAMIC: "tab:gray", EXACT: "tab:blue", FETCH: "tab:orange", AWARE: "tab:green"}
    bars = [(DYNAMIC, None), (EXACT, "cold"), (EXACT, "warm"), (FETCH, "cold"), (FETCH, "warm"), (AWARE, "cold"), (AWARE, "warm")]
    for ax, t in zip(axes[:, 0], threads):
        points = sorted({(r.context, r.batch) for r in rows if r.threads == t})
        index = {(r.context, r.batch, r.system, r.state): r for r in rows if r.threads == t}
        width = 0.8 / len(bars)
        for j, (system, state) in enumerate(bars):
            xs, ys = [], []
            for i, (c, b) in enumerate(points):
                r = index.get((c, b, system, state))
                if r is not None and r.available:
                    xs.append(i + (j - len(bars) / 2) * width)
                    ys.append(r.ms_per_step)
            ax.bar(xs, ys, width, color=colors[system], hatch="//" if state == "warm" else None,
                   alpha=0.5 if state == "warm" else 0.9, label=f"{system}{' ' + state if state else ''}")
        ax.set_xticks(range(len(points)))
        ax.set_xticklabels([f"{c} × {b}" for c, b in points])
        ax.set_yscale("log")
        ax.set_ylabel("ms per decode step (median)")
        ax.set_xlabel("context × batch")
        ax.set_title(f"sparse decode speed, {t} torch thread(s) (missing bars: not available)")
        ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="results directory (default benchmarks/results; --quick: a temp directory)")
    parser.add_argument("--quick", action="store_true", help="tiny random model and sizes (smoke test)")
    parser.add_argument("--model", choices=("smollm2", "tiny"), default=None)
    parser.add_argument("--contexts", type=lambda t: parse_ints(t, "--contexts"), default=None, help="default 2048,4096,8192")
    parser.add_argument("--batches", type=lambda t: parse_ints(t, "--batches"), default=None, help="default 1,4,8")
    parser.add_argument("--steps", type=lambda t: parse_ints(t, "--steps")[0], default=None, help="timed decode steps per run (default 4)")
    parser.add_argument("--repeats", type=lambda t: parse_ints(t, "--repeats")[0], default=None, help="default 3")
    parser.add_argument("--threads", type=lambda t: parse_ints(t, "--threads"), default=None,
                        help=f"torch thread counts (default 1,{DEFAULT_THREADS})")
    parser.add_argument("--budget", type=float, default=None, help="sparse budget, a fraction in (0, 1] (default 0.25)")
    parser.add_argument("--no-warm", action="store_true", help="skip the warm-page-cache runs")
    parser.add_argument("--fill", choices=("update", "model"), default=None,
                        help="how exact tiered caches get the prompt: Cache.update with the prefilled K/V (default) or "
                             "a prefill through the model for every run (slow); sparse caches always copy a base "
                             "cache prefilled through the model")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch directory on the disk under test")
    args = parser.parse_args(argv)
    s = Settings.quick() if args.quick else Settings()
    for name in ("model", "contexts", "batches", "steps", "repeats", "budget", "fill"):
        if getattr(args, name) is not None:
            setattr(s, name, getattr(args, name))
    if args.threads is not None:
        s.threads = tuple(dict.fromkeys(args.threads))
    if args.no_warm:
        s.warm = False
    if not 0 < s.budget <= 1:
        parser.error("--budget must be a fraction in (0, 1]")
    if args.out is None:
        args.out = Path(tempfile.gettempdir()) / "tiercache-sparse-speed-quick" if args.quick else Path("benchmarks/results")
    workdir = Path(tempfile.mkdtemp(prefix="tiercache-sparse-speed-", dir=args.workdir))
    fstype = filesystem_of(workdir)
    if fstype in ("tmpfs", "ramfs"):
        print(f"warning: {workdir} is on {fstype}: the disk tier will not touch a disk", file=sys.stderr)
    available, why = sparse_available()
    load_start = os.getloadavg()
    start = time.perf_counter()
    try:
        runs, info = run_all(s, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    rows = summarise(runs)
    unavailable = next((r.note for r in runs if not r.available and (r.note or "").startswith(SPARSE_UNAVAILABLE)), None)
    meta = machine_meta()
    meta.update(command=" ".join(["python", "benchmarks/sparse_speed.py", *(argv if argv is not None else sys.argv[1:])]),
                runtime_s=time.perf_counter() - start, settings=asdict(s), quick=args.quick, workdir_filesystem=fstype,
                load_average_start=load_start, sparse_available=available and unavailable is None,
                sparse_note=unavailable or why or None, **info)
    write_results(runs, rows, meta, args.out)
    print("\n".join(table(rows)))
    for g in targets(rows):
        ratio = f"{g['ratio']:.2f}x" if g["ratio"] is not None else _short(g["note"])
        print(f"{g['what']} ({g['threads']}t): {ratio} (target >= {g['target']:g}x: "
              f"{({True: 'met', False: 'NOT met', None: '-'})[g['met']]})")
    print(f"wrote {args.out / 'sparse_speed.json'}, .md, .png ({meta['runtime_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
