"""How close is the resident pool's placement to the best any placement could do under a bound? (a replay study)

    python benchmarks/pool_replay.py --out benchmarks/results   # SmolLM2 4K / 8K x batch 1 / 4, 25 % / 6.25 %, 16 steps
    python benchmarks/pool_replay.py --quick --out DIR          # SmolLM2 2K x batch 2, 25 %, 6 steps
    python benchmarks/pool_replay.py --model tiny --contexts 256 --batches 2 --budgets 0.25 --steps 4 --out DIR

Sparse decode fetches the union of a layer's selected blocks; a resident pool bounded in bytes decides which
fetched blocks stay for the next step, and a selected block not in the pool is a *miss* (read from the host
or disk tier).  This study records the real selections of a fetch-every-step sparse cache
(``fetch_granularity.decode_point``: the cache's own selection, checked against its fetch and ``stats()``)
and replays them against a pool of ``C`` units, ``C`` a fraction of the KV's stored units (``--capacities``;
``default`` is the bound the cache's default ``pool_bytes="auto"`` gives at this point, read from a real
cache's ``stats()``), for storage layouts (a) 64-token and (e) 128-token blocks of all rows and KV heads, under
:data:`POLICIES`:

- ``none``: fetch every step (every selected unit is a miss);
- ``lru``: evict the least recently used unit;
- ``freq``: evict the lowest decayed selection count (``sum decay**(t - s)`` over the steps ``s`` that selected
  it, the cache's decay 0.9);
- ``mass``: evict the lowest decayed attention mass, the masses the attention-aware cache itself records
  (``tiercache_llm.sparse.placement.record_attention`` is wrapped in its real run; a 128-token unit's mass is
  the sum of its two blocks'); scores are updated after each layer step, as the cache updates them;
- ``dist-freq`` / ``dist-mass``: the cache's own eviction order (``PoolArena`` ``"distance"``): the layer whose
  next fetch is farthest first (the one just before the fetching layer, ..., the fetching layer last), within it
  the lowest decayed selection count / attention mass;
- ``min``: Belady's MIN with bypass: on a miss, of the resident units and the incoming one, the one whose next
  use is farthest is not kept.  The fewest misses any policy with this capacity can have (a lower bound: it
  knows the future and may drop a block of the union it is reading);
- ``min-pinned``: MIN's choice among the units outside the current layer step's union (as the real pool, which
  never evicts what the fetching layer selected), no bypass: an achievable reference;
- ``static``: an oracle pin: the ``C`` units selected most often over the run stay; every other access misses.

All policies but ``min`` keep the current layer step's union (``lru`` / ``freq`` / ``mass`` / ``min-pinned``
evict outside it while they can).  Pools start empty; figures are per decode step (sums over layers) over the
steps after the first (steady state; the first step is all compulsory misses) and over all steps.  The pool is
**shared** by all layers, accessed in the cache's order (step, then layer, then block), as the cache's
``PoolArena`` is; ``--per-layer`` adds a replay with each layer its own ``C`` fraction.

Beside the replay, the real caches: ``TieredKVCache.for_model(model, mode="sparse", strategy=...)`` for
``attention-aware`` and ``reuse-layer-ahead`` (``sparse_speed.build_cache``: host tier 25 % of the KV, disk the
rest with ``direct_io``, the default pool bound) decode the same teacher-forced tokens, and their per-step
``stats()`` give the bytes read from the tiers for selected blocks (``sparse.last_step.bytes_fetched`` per tier:
every pool miss, including blocks read into reserved slots one layer ahead), the pool hits
(``blocks_selected - misses``) and the pipeline's nonresident / mispredicted counters.  Their pools are seeded
by the prefill (attention-aware) and not empty at the first step.

Time per step is estimated as ``a * entries + bytes / bw`` (``fetch_granularity.measure_disk``: cold reads
through a disk-only ``BlockStore`` with ``direct_io``, measured in the same run): every miss priced as a disk
read; the real caches read some misses from the host tier (a copy), so their estimate is an upper bound.

Prefilled rows are kept under ``--kv-dir`` (default: a temporary folder removed at the end) so a rerun with the
same ``--kv-dir`` skips the prefill (~2.5 min for 8K x 4 rows on this machine).  Writes ``pool_replay.json`` /
``.md`` / ``.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import heapq
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter, OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Hashable, Iterator, Sequence

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fetch_granularity as fg  # noqa: E402  (the benchmarks directory is not a package)
from _common import (  # noqa: E402
    GiB, MiB, MappedKV, load_bench_model, machine_meta, parse_ints, stats_delta, torch_threads,
)

NAME = "pool_replay"
POLICIES = ("none", "lru", "freq", "mass", "dist-freq", "dist-mass", "min", "min-pinned", "static")
POLICY_TEXT = {"none": "none (fetch every step)", "lru": "LRU", "freq": "decayed selection count",
               "mass": "decayed attention mass", "dist-freq": "farthest layer, then selection count",
               "dist-mass": "farthest layer, then attention mass (the cache's rule)", "min": "MIN (Belady, bypass): floor",
               "min-pinned": "MIN outside the union", "static": "static top-C (oracle pin)"}
LAYOUTS = (fg.Scheme("a", 64, "all"), fg.Scheme("e", 128, "all"))
REAL = ("attention-aware", "reuse-layer-ahead")
DECAY = 0.9  # the sparse cache's default decay of attention mass per step


# -- the replay -------------------------------------------------------------------------------------------
@dataclass
class Request:
    """One layer step: the units it selects (each read once), its step, and the attention mass each unit
    received (credited after the request, as the cache records attention after attending)."""

    step: int
    units: list[Hashable]
    mass: dict[Hashable, float] = field(default_factory=dict)
    layer: int = 0


def replay(requests: Sequence[Request], capacity: int, policy: str, *, decay: float = DECAY,
           missed: list[list[Hashable]] | None = None) -> list[int]:
    """Misses of each request with a pool of ``capacity`` units under ``policy`` (:data:`POLICIES`),
    starting empty.  A miss is an access to a unit not resident when accessed; every policy but ``static``
    (which never admits other units) and ``min`` (which may bypass) then admits it, evicting when full.
    ``missed``: a list that receives, per request, the list of its missed units (in access order)."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if capacity < 0:
        raise ValueError(f"capacity must be >= 0, got {capacity}")
    if missed is not None:
        collect: list[Hashable] = []
        missed.clear()
    if policy == "none":
        if missed is not None:
            missed.extend(list(r.units) for r in requests)
        return [len(r.units) for r in requests]
    if policy == "static":
        counts = Counter(u for r in requests for u in r.units)
        order = {u: i for i, u in enumerate(dict.fromkeys(u for r in requests for u in r.units))}
        pinned = set(sorted(counts, key=lambda u: (-counts[u], order[u]))[:capacity])
        seen: set = set()
        out = []
        for r in requests:
            m = 0
            for u in r.units:
                if u not in pinned or u not in seen:
                    m += 1
                    if missed is not None:
                        collect.append(u)
                seen.add(u)
            out.append(m)
            if missed is not None:
                missed.append(collect)
                collect = []
        return out
    # next use of every access (MIN), in the flat order of accesses
    flat = [u for r in requests for u in r.units]
    nxt = [math.inf] * len(flat)
    last_at: dict = {}
    for pos in range(len(flat) - 1, -1, -1):
        nxt[pos] = last_at.get(flat[pos], math.inf)
        last_at[flat[pos]] = pos
    score: dict = {}  # freq / mass: decayed sums, inflated by decay ** -step so old entries never change
    resident: dict = {}  # unit -> version of its valid heap entry
    # (priority, tie, version, unit): the lowest priority is evicted first; the "dist-" policies keep one heap
    # per layer (units are (layer, block) keys) and take victims layer by layer (:func:`victim`)
    by_layer = policy.startswith("dist-")
    heaps: dict = {}
    cycle = list(dict.fromkeys(r.layer for r in requests)) if by_layer else []
    place = {layer: i for i, layer in enumerate(cycle)}
    lru: OrderedDict = OrderedDict()
    version = 0
    current = [0]  # the requesting layer's place in the cycle

    def push(u: Hashable, prio: float, tie: float) -> None:
        nonlocal version
        version += 1
        resident[u] = version
        heapq.heappush(heaps.setdefault(u[0] if by_layer else None, []), (prio, tie, version, u))

    def pop_from(heap: list, protect: set) -> tuple | None:
        aside, found = [], None
        while heap:
            entry = heapq.heappop(heap)
            if resident.get(entry[3]) != entry[2]:
                continue  # stale
            if entry[3] in protect:
                aside.append(entry)
                continue
            found = entry
            break
        for entry in aside:
            heapq.heappush(heap, entry)
        return found

    def victim(protect: set) -> tuple:
        """Pop the valid heap entry of the lowest-priority resident unit outside ``protect`` (if every one is
        protected: the lowest protected one); the caller evicts it or pushes the entry back.  ``dist-``
        policies: the cache's ``"distance"`` eviction, the layer whose next fetch is farthest first (in the
        cycle of layers, the one just before the requesting layer, then the one before it, ..., the
        requesting layer last), the lowest priority within it."""
        if by_layer:
            n = len(cycle)
            order = [cycle[(current[0] + d) % n] for d in range(n - 1, -1, -1)]
        else:
            order = [None]
        for key in order:
            found = pop_from(heaps.get(key, []), protect)
            if found is not None:
                return found
        for key in order:
            found = pop_from(heaps.get(key, []), set())
            if found is not None:
                return found
        raise AssertionError("no resident unit to evict")

    out = []
    pos = 0
    for r in requests:
        inflate = decay ** -r.step
        if by_layer:
            current[0] = place[r.layer]
        protect = set(r.units) if policy != "min" else set()
        misses = 0
        for u in r.units:
            if policy == "lru":
                if u in lru:
                    lru.move_to_end(u)
                else:
                    misses += 1
                    if missed is not None:
                        collect.append(u)
                    if capacity:
                        if len(lru) >= capacity:
                            v = next((k for k in lru if k not in protect), None)
                            del lru[v if v is not None else next(iter(lru))]
                        lru[u] = True
                pos += 1
                continue
            if policy in ("freq", "dist-freq"):
                score[u] = score.get(u, 0.0) + inflate
            if policy in ("min", "min-pinned"):
                prio, tie = -nxt[pos], 0.0  # the farthest next use is evicted first
            else:  # freq / mass: the lowest score first, then the least recently used
                prio, tie = score.get(u, 0.0), float(pos)
            if u in resident:
                push(u, prio, tie)
            else:
                misses += 1
                if missed is not None:
                    collect.append(u)
                if capacity and len(resident) < capacity:
                    push(u, prio, tie)
                elif capacity:
                    entry = victim(protect)
                    if policy == "min" and prio <= entry[0]:  # the incoming unit's next use is the farthest: bypass
                        heapq.heappush(heaps[None], entry)
                    else:
                        del resident[entry[3]]
                        push(u, prio, tie)
            pos += 1
        if policy in ("mass", "dist-mass") and r.mass:
            for u, m in r.mass.items():
                score[u] = score.get(u, 0.0) + m * inflate
                if u in resident:
                    push(u, score[u], float(pos))
        out.append(misses)
        if missed is not None:
            missed.append(collect)
            collect = []
    return out


def layout_requests(steps: list[list[fg.LayerStep]], scheme: fg.Scheme,
                    masses: dict[tuple[int, int], dict[int, float]] | None = None) -> tuple[list[Request], int]:
    """The recorded layer steps as requests of ``scheme``'s units (keys ``(layer, unit)``; all-rows layouts
    only), in the cache's order; ``masses``: per ``(step, layer)`` the mass each stored 64-token block
    received (a unit's mass is the sum of its blocks').  Returns the requests and the stored units of the
    last step (sum over layers: the full KV in units)."""
    if scheme.split != "all":
        raise ValueError("the replay covers all-rows layouts (one unit holds every row and head)")
    out, total = [], 0
    for t, layers in enumerate(steps):
        total = 0
        for ls in layers:
            mask = fg.unit_mask(ls.pages, ls.context, ls.page, scheme)
            total += mask.numel()
            units = [(ls.layer, j) for j in mask.nonzero().flatten().tolist()]
            mass: dict = {}
            for block, m in ((masses or {}).get((t, ls.layer)) or {}).items():
                j = block * ls.block_size // scheme.tokens
                if j < mask.numel():
                    mass[(ls.layer, j)] = mass.get((ls.layer, j), 0.0) + m
            out.append(Request(t, units, mass, ls.layer))
    return out, total


def per_step(requests: Sequence[Request], misses: Sequence[int], steps: int) -> list[int]:
    out = [0] * steps
    for r, m in zip(requests, misses, strict=True):
        out[r.step] += m
    return out


def replay_per_layer(requests: Sequence[Request], fraction: float, policy: str, units_of: dict[int, int]) -> list[int]:
    """:func:`replay` with each layer its own pool of ``fraction`` x its units; misses per request."""
    out = [0] * len(requests)
    for layer, n in units_of.items():
        idx = [i for i, r in enumerate(requests) if r.layer == layer]
        sub = [requests[i] for i in idx]
        for i, m in zip(idx, replay(sub, int(fraction * n), policy)):
            out[i] = m
    return out


# -- recording masses and the real caches -----------------------------------------------------------------
@contextlib.contextmanager
def recording_mass() -> Iterator[dict[tuple[int, int], dict[int, float]]]:
    """Wrap ``tiercache_llm.sparse_layer.record_attention`` to record, per ``(decode step, layer)``, the mass
    each fetched stored block received (summed over rows and KV heads: what the attention-aware cache adds,
    decayed, to its per-block mass).  The step is counted at the first layer's call."""
    import tiercache_llm.sparse_layer as sparse_layer

    out: dict[tuple[int, int], dict[int, float]] = {}
    original = sparse_layer.record_attention
    clock = {"step": -1, "first": None}

    def wrapped(state, layer, sel, res, stats):
        if state.ctrl.strategy == "attention-aware" and sel.fetch.numel():
            if clock["first"] is None or layer.layer_idx == clock["first"]:
                clock["first"] = layer.layer_idx
                clock["step"] += 1
            n = len(layer._blocks)
            mass = res.kv_head_mass(layer._shape_k[0]).detach().sum(dim=(0, 1)).double().cpu().tolist()
            out[(clock["step"], layer.layer_idx)] = {j: m for j, m in zip(sel.fetch.tolist(), mass) if j < n}
        return original(state, layer, sel, res, stats)

    sparse_layer.record_attention = wrapped
    try:
        yield out
    finally:
        sparse_layer.record_attention = original


def real_run(model: Any, kv: list[tuple[torch.Tensor, torch.Tensor]], feed: torch.Tensor, budget: int | float,
             strategy: str, store: Path) -> dict[str, Any]:
    """The real cache (``sparse_speed.build_cache``: host 25 % of the KV, disk the rest, direct_io, default pool
    bound) decoding ``feed`` teacher-forced; per step its ``stats()`` deltas, its selections and (attention-
    aware) the recorded masses."""
    import sparse_speed as sp
    from tiercache_llm.hf_kwargs import cache_kwargs

    cfg = sp.Config(strategy, budget, "cold")
    cache = sp.build_cache(model, cfg, kv, sp.Settings(), store)
    rows: list[dict[str, Any]] = []
    selections: list[list[fg.LayerStep]] = []
    try:
        with torch.no_grad(), recording_mass() as masses:
            for t in range(feed.shape[1]):
                before = cache.stats()
                w0, c0 = time.perf_counter(), time.thread_time()
                with fg.recording() as rec:
                    model(input_ids=feed[:, t:t + 1], **cache_kwargs(cache, model), use_cache=True)
                wall, cpu = time.perf_counter() - w0, time.thread_time() - c0
                after = cache.stats()
                last = after["sparse"]["last_step"]
                pipe = stats_delta(before.get("pipeline", {}), after.get("pipeline", {}))
                rows.append({"ms": 1e3 * wall, "cpu_ms": 1e3 * cpu, "blocks_selected": last["blocks_selected"],
                             "blocks_resident": last["blocks_resident"], "bytes_fetched": dict(last["bytes_fetched"]),
                             "pipeline": {k: pipe.get(k) for k in ("needed", "reused", "staged", "needed_nonresident",
                                                                   "mispredicted_nonresident", "predicted_nonresident",
                                                                   "sync", "slot_used", "pool_evicted")}})
                selections.append(rec)
        final = cache.stats()
    finally:
        cache.close()
        shutil.rmtree(store, ignore_errors=True)
    pipe = final.get("pipeline", {})
    return {"strategy": strategy, "steps": rows, "selections": selections, "masses": masses,
            "pool_bound_bytes": pipe.get("pool_bound_bytes"), "pool_bound_source": pipe.get("pool_bound_source"),
            "pool_slot_bytes": pipe.get("pool_slot_bytes"), "pool_over_budget": pipe.get("pool_over_budget"),
            "pool_peak_slots": pipe.get("pool_slots")}


def same_selection(a: list[list[fg.LayerStep]], b: list[list[fg.LayerStep]]) -> float:
    """Fraction of layer steps whose fetched stored blocks are the same in two recordings."""
    pairs = [(x.stored, y.stored) for sa, sb in zip(a, b) for x, y in zip(sa, sb)]
    return sum(x == y for x, y in pairs) / len(pairs) if pairs else float("nan")


# -- prefill, kept on disk ----------------------------------------------------------------------------------
def prefilled_rows(model: Any, ids: torch.Tensor, tokens: int, kv_dir: Path, model_name: str,
                   show_progress: bool) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Each row of ``ids[:, :tokens]`` prefilled alone (``sparse_speed.prefill_row``), kept as a
    :class:`MappedKV` file named by a hash of the model and its ids, so a later run reuses it."""
    import sparse_speed as sp

    rows = []
    kv_dir.mkdir(parents=True, exist_ok=True)
    for r in tqdm(range(ids.shape[0]), desc="prefill rows", disable=not show_progress):
        row = ids[r:r + 1, :tokens]
        digest = hashlib.sha1(model_name.encode() + row.numpy().tobytes()).hexdigest()[:16]
        path = kv_dir / f"{model_name}-{tokens}-{digest}.kv"
        meta = path.with_suffix(".json")
        if path.exists() and meta.exists():
            specs = [(tuple(s), getattr(torch, d), o) for s, d, o in json.loads(meta.read_text())]
            mapped = MappedKV(path, specs)
        else:
            mapped = MappedKV.write(path, sp.prefill_row(model, row, 2048))
            meta.write_text(json.dumps([(list(s), str(d).removeprefix("torch."), o) for s, d, o in mapped.specs]))
        rows.append(mapped.load())
    return rows


# -- the study ------------------------------------------------------------------------------------------------
@dataclass
class Settings:
    model: str = "smollm2"
    contexts: tuple[int, ...] = (4096, 8192)
    batches: tuple[int, ...] = (1, 4)
    budgets: tuple[int | float, ...] = (0.25, 0.0625)
    steps: int = 16
    threads: int = 1
    # fractions of the stored KV; "default": the bound pool_bytes="auto" gives (read from the real cache)
    capacities: tuple[str, ...] = ("default", "0.35", "0.46", "1.0")
    real: tuple[str, ...] = REAL
    per_layer: bool = False
    disk_mib: int = 32
    disk_repeats: int = 5
    read_batch: int = 256

    @classmethod
    def quick(cls) -> "Settings":
        return cls(contexts=(2048,), batches=(2,), budgets=(0.25,), steps=6, disk_mib=8, disk_repeats=3)


def replay_point(steps: list[list[fg.LayerStep]], masses: dict | None, fractions: dict[str, float],
                 per_layer: bool, batch: int, shape: dict[str, int]) -> list[dict[str, Any]]:
    """Every layout x capacity x policy (x pool sharing) of one point: misses per step (units)."""
    out = []
    n_steps = len(steps)
    for scheme in LAYOUTS:
        reqs, total = layout_requests(steps, scheme, masses)
        units_of = Counter()
        for ls in steps[-1]:
            units_of[ls.layer] = ls.context // scheme.tokens
        eb = scheme.entry_bytes(batch, shape["kv_heads"], shape["head_dim"], shape["itemsize"])
        for name, frac in fractions.items():
            for policy in POLICIES:
                if policy in ("mass", "dist-mass") and not masses:
                    continue
                modes = [("shared", lambda p: replay(reqs, int(frac * total), p))]
                if per_layer:
                    modes.append(("per layer", lambda p: replay_per_layer(reqs, frac, p, units_of)))
                for mode, fn in modes:
                    out.append({"layout": f"({scheme.tag}) {scheme.label}", "tokens": scheme.tokens, "entry_bytes": eb,
                                "capacity": name, "fraction": frac, "capacity_units": int(frac * total),
                                "units": total, "policy": policy, "pool": mode,
                                "misses": per_step(reqs, fn(policy), n_steps)})
    return out


def kv_shape(model: Any) -> dict[str, int]:
    """``layers``, ``kv_heads``, ``head_dim`` and ``itemsize`` of ``model``'s KV (its text config)."""
    text = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    return {"layers": text.num_hidden_layers, "kv_heads": text.num_key_value_heads,
            "head_dim": getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
            "itemsize": model.dtype.itemsize}


def prose_points(s: Any, kv_dir: Path, show_progress: bool) -> tuple[Any, dict[str, int], float, Iterator[tuple]]:
    """``s.model`` (``model``, ``contexts``, ``batches``, ``steps``, ``threads`` are read from ``s``), its
    :func:`kv_shape`, the seconds to prefill ``max(s.batches)`` rows of shipped prose of ``max(s.contexts)``
    tokens (:func:`prefilled_rows` under ``kv_dir``: the same files for the same settings), and an iterator of
    ``(context, batch, kv, feed)`` per point: the first ``batch`` rows' K/V of ``context`` tokens and the next
    ``s.steps`` ids of each row to decode teacher-forced."""
    import sparse_speed as sp

    model, tokenizer = load_bench_model(s.model)
    text = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    ids = fg.prose_rows(tokenizer, max(s.batches), max(s.contexts) + s.steps, text.vocab_size)
    t0 = time.perf_counter()
    with torch_threads(s.threads):
        prefilled = prefilled_rows(model, ids, max(s.contexts), kv_dir, s.model, show_progress)

    def points() -> Iterator[tuple]:
        for context in s.contexts:
            for batch in s.batches:
                yield context, batch, sp.point_kv(prefilled, batch, context), ids[:batch, context:context + s.steps]

    return model, kv_shape(model), time.perf_counter() - t0, points()


def run(s: Settings, kv_dir: Path, workdir: Path, *, show_progress: bool = True) -> dict[str, Any]:
    model, shape, prefill_s, inputs = prose_points(s, kv_dir, show_progress)
    points = []
    t0 = time.perf_counter()
    with torch_threads(s.threads):
        todo = [(c, b, bud) for c in s.contexts for b in s.batches for bud in s.budgets]
        bar = tqdm(total=len(todo) * (1 + len(s.real)), desc="decode runs", disable=not show_progress)
        for context, batch, kv, feed in inputs:
            for budget in s.budgets:
                bar.set_postfix_str(f"{context} x {batch}, {fg.budget_label(budget)}, fetch-every-step")
                # raises if the recording is not the cache's fetch
                steps, _, secs, checked, eb = fg.checked_point(model, kv, feed, budget)
                block = steps[0][0].block_size
                bar.update()
                real = {}
                for strategy in s.real:
                    bar.set_postfix_str(f"{context} x {batch}, {fg.budget_label(budget)}, {strategy}")
                    run_ = real_run(model, kv, feed, budget, strategy, workdir / "store")
                    run_["same_selection"] = same_selection(steps, run_.pop("selections"))
                    real[strategy] = run_
                    bar.update()
                masses = real.get("attention-aware", {}).pop("masses", None)
                for r in real.values():
                    r.pop("masses", None)
                units = sum(ls.context // block for ls in steps[-1])
                fractions = {}
                for c in s.capacities:
                    if c == "default":
                        bound = next((r for r in real.values() if r.get("pool_bound_bytes")), None)
                        if bound is None:
                            continue
                        fractions[c] = (bound["pool_bound_bytes"] // bound["pool_slot_bytes"]) / units
                    else:
                        fractions[c] = float(c)
                bar.set_postfix_str(f"{context} x {batch}, {fg.budget_label(budget)}, replay")
                replays = replay_point(steps, masses, fractions, s.per_layer, batch, shape)
                points.append({"context": context, "batch": batch, "budget": budget, "block_size": block,
                               "block_entry_bytes": eb, "stored_blocks": units, "checked": checked,
                               "record_seconds": secs, "fractions": fractions, "masses_recorded": bool(masses),
                               "replays": replays, "real": real})
            del kv
        bar.close()
    return {"points": points, "prefill_seconds": prefill_s, "decode_seconds": time.perf_counter() - t0, "shape": shape}


def _est(cost: dict[str, Any] | None, entries: float, nbytes: float) -> float | None:
    return None if cost is None else 1e3 * (cost["a_s"] * entries + nbytes / cost["bw_Bps"])


def summarise(results: dict[str, Any], cost: dict[str, Any] | None) -> tuple[list[dict], list[dict]]:
    """Replay rows and real-cache rows: per step means over the steps after the first (``*_all``: every step)."""
    rows, reals = [], []
    for p in results["points"]:
        key = {"context": p["context"], "batch": p["batch"], "budget": p["budget"]}
        none = {}
        for r in p["replays"]:
            later, every = r["misses"][1:] or r["misses"], r["misses"]
            m, m_all = statistics.fmean(later), statistics.fmean(every)
            full = r["units"] * 2 * r["entry_bytes"]
            row = {**key, **{k: r[k] for k in ("layout", "tokens", "entry_bytes", "capacity", "fraction",
                                               "capacity_units", "policy", "pool")},
                   "misses": m, "entries": 2 * m, "bytes": 2 * m * r["entry_bytes"], "x_full": m / r["units"],
                   "x_full_all": m_all / r["units"], "full_bytes": full,
                   "est_ms": _est(cost, 2 * m, 2 * m * r["entry_bytes"])}
            if r["policy"] == "none":
                none[(r["layout"], r["capacity"], r["pool"])] = row
            rows.append(row)
        for row in rows[-len(p["replays"]):]:
            base = none[(row["layout"], row["capacity"], row["pool"])]
            row["none_over"] = base["misses"] / row["misses"] if row["misses"] else math.inf
        eb = p["block_entry_bytes"]
        for strategy, run_ in p["real"].items():
            st = run_["steps"]
            later = st[1:] or st
            miss = [sum(x["bytes_fetched"].values()) / (2 * eb) for x in st]
            tiers = sorted({t for x in st for t in x["bytes_fetched"]})
            m = statistics.fmean(miss[1:] or miss)
            bound = run_.get("pool_bound_bytes")
            row = {**key, "strategy": strategy, "misses": m, "x_full": m / p["stored_blocks"],
                   "x_full_all": statistics.fmean(miss) / p["stored_blocks"], "bytes": 2 * m * eb,
                   "bytes_by_tier": {t: statistics.fmean(x["bytes_fetched"].get(t, 0) for x in later) for t in tiers},
                   "selected": statistics.fmean(x["blocks_selected"] for x in later),
                   "mispredicted_nonresident": statistics.fmean((x["pipeline"].get("mispredicted_nonresident") or 0)
                                                                for x in later),
                   "needed_nonresident": statistics.fmean((x["pipeline"].get("needed_nonresident") or 0) for x in later),
                   "est_ms": _est(cost, 2 * m, 2 * m * eb), "ms": statistics.median(x["ms"] for x in later),
                   "cpu_ms": statistics.median(x["cpu_ms"] for x in later), "same_selection": run_["same_selection"],
                   "pool_bound_bytes": bound, "pool_fraction": p["fractions"].get("default"),
                   "pool_over_budget": run_.get("pool_over_budget")}
            base = next(r for r in rows[-len(p["replays"]):] if r["policy"] == "none" and r["tokens"] == p["block_size"])
            row["none_over"] = base["misses"] / m if m else math.inf
            reals.append(row)
    return rows, reals


# -- output ---------------------------------------------------------------------------------------------------
def _ms(v: float | None) -> str:
    return "" if v is None else (f"{v:.0f}" if v >= 100 else f"{v:.3g}")


def _cap(r: dict[str, Any]) -> str:
    return f"{r['fraction']:.3f} (default bound)" if r["capacity"] == "default" else f"{r['fraction']:g}"


def replay_table(rows: list[dict[str, Any]]) -> list[str]:
    out = ["| context x batch | budget | layout | pool | capacity ÷ KV | policy | misses/step (units) | MiB/step | "
           "÷ full KV | ÷ full KV, all steps | est. ms/step | none ÷ policy |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['context']} x {r['batch']} | {fg.budget_label(r['budget'])} | {r['layout']} | {r['pool']} | "
                   f"{_cap(r)} | {POLICY_TEXT[r['policy']]} | {r['misses']:.0f} | {r['bytes'] / MiB:.0f} | "
                   f"{r['x_full']:.3f} | {r['x_full_all']:.3f} | {_ms(r['est_ms'])} | {r['none_over']:.2f} |")
    return out


def headline_table(rows: list[dict[str, Any]], reals: list[dict[str, Any]]) -> list[str]:
    """Per point, shared pool at the default bound, layout (a) and (e): ÷ full KV and none ÷ policy of each
    policy, then the real caches."""
    pols = [p for p in POLICIES if any(r["policy"] == p for r in rows)]
    out = ["| context x batch | budget | layout, capacity ÷ KV | " + " | ".join(POLICY_TEXT[p] for p in pols) + " |",
           "|---|---|---|" + "---|" * len(pols)]
    keys = list(dict.fromkeys((r["context"], r["batch"], r["budget"]) for r in rows))
    for k in keys:
        for layout in dict.fromkeys(r["layout"] for r in rows):
            for cap in dict.fromkeys(r["capacity"] for r in rows):
                group = {r["policy"]: r for r in rows if (r["context"], r["batch"], r["budget"]) == k
                         and r["layout"] == layout and r["capacity"] == cap and r["pool"] == "shared"}
                if not group:
                    continue
                any_r = next(iter(group.values()))
                cells = [f"{group[p]['x_full']:.3f} ({group[p]['none_over']:.2f}x)" if p in group else "" for p in pols]
                out.append(f"| {k[0]} x {k[1]} | {fg.budget_label(k[2])} | {layout}, {_cap(any_r)} | " + " | ".join(cells) + " |")
    return out


def real_table(reals: list[dict[str, Any]], rows: list[dict[str, Any]]) -> list[str]:
    out = ["| context x batch | budget | strategy | pool bound MiB (÷ KV) | misses/step (blocks) | host MiB/step | "
           "disk MiB/step | ÷ full KV | ÷ full KV, all steps | est. ms/step | none ÷ it | replay at the bound: MIN / "
           "farthest layer + mass / mass / LRU ÷ full KV | measured ms/step (CPU) | same selection as the recording |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in reals:
        ref = {x["policy"]: x for x in rows if (x["context"], x["batch"], x["budget"]) == (r["context"], r["batch"], r["budget"])
               and x["capacity"] == "default" and x["pool"] == "shared" and x["tokens"] == 64}
        rep = " / ".join(f"{ref[p]['x_full']:.3f}" if p in ref else "–" for p in ("min", "dist-mass", "mass", "lru"))
        bound = "" if r["pool_bound_bytes"] is None else f"{r['pool_bound_bytes'] / MiB:.0f} ({r['pool_fraction']:.3f})"
        tiers = r["bytes_by_tier"]
        out.append(f"| {r['context']} x {r['batch']} | {fg.budget_label(r['budget'])} | {r['strategy']} | {bound} | "
                   f"{r['misses']:.0f} | {tiers.get('host', 0) / MiB:.0f} | {tiers.get('disk', 0) / MiB:.0f} | "
                   f"{r['x_full']:.3f} | {r['x_full_all']:.3f} | {_ms(r['est_ms'])} | {r['none_over']:.2f} | {rep} | "
                   f"{r['ms']:.0f} ({r['cpu_ms']:.0f}) | {r['same_selection']:.3f} |")
    return out


def write_results(results: dict[str, Any], rows: list[dict], reals: list[dict], cost: dict[str, Any] | None,
                  meta: dict[str, Any], s: Settings, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    doc = {"name": NAME, "meta": meta, "settings": asdict(s), "disk": cost, "summary": rows, "real_summary": reals,
           **results}
    (out / f"{NAME}.json").write_text(json.dumps(doc, indent=1, default=str))
    lines = [f"# Pool replay (model {s.model}, {meta['date_utc']} UTC)", "",
             f"`{' '.join(meta['argv'])}`; torch threads {s.threads}; load average at the start "
             f"{fg.load_text(meta.get('load_average'))}, at the end {fg.load_text(meta.get('load_average_end'))}; "
             f"prefill {results['prefill_seconds']:.0f} s, decode runs and replay {results['decode_seconds']:.0f} s.", "",
             f"{s.steps} teacher-forced decode steps per point. Selections recorded from a fetch-every-step cache "
             "(checked against its fetch and stats at every layer step) and replayed against a pool shared by all "
             "layers (the cache's order: step, layer, block), starting empty. Figures per step are sums over layers, "
             "means over the steps after the first (the first is all compulsory misses); 'all steps' includes it. "
             "Capacity in units of the layout (same bytes for both layouts); 'default bound': the bound "
             "`pool_bytes=\"auto\"` gave the real cache (host tier budget, 25 % of the KV) in slots of one 64-token "
             "block, over the stored blocks. none ÷ policy: fetch-every-step's misses over the policy's (the ceiling "
             "of a fetch ratio if time were proportional to misses).", ""]
    if cost is not None:
        lines += [f"Disk cost model measured in this run (`BlockStore`, disk tier only, direct_io {cost['direct_io']}, "
                  f"`get_blocks` batches of {cost['read_batch']}): **a = {1e6 * cost['a_s']:.1f} µs per entry, bw = "
                  f"{cost['bw_Bps'] / GiB:.2f} GiB/s** (fit error max {100 * cost['fit_max_abs_rel_err']:.0f} %); every "
                  "miss priced as a disk read.", "", *fg.disk_table(cost), ""]
    lines += ["## Shared pool: misses ÷ full KV (none ÷ policy)", "", *headline_table(rows, reals), "",
              "## The real caches (default pool bound) beside the replay", "",
              "Misses: bytes the cache read from its tiers for selected blocks (`stats()['sparse']['last_step']"
              "['bytes_fetched']`, host and disk; reads into reserved slots one layer ahead included), in 64-token "
              "blocks (K and V). Attention-aware's pools are seeded by the prefill.", "",
              *real_table(reals, rows), "", "## Every replay", "", *replay_table(rows), ""]
    (out / f"{NAME}.md").write_text("\n".join(lines))
    plot(rows, reals, out / f"{NAME}.png")


def plot(rows: list[dict], reals: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(dict.fromkeys((r["context"], r["batch"], r["budget"]) for r in rows))
    cols = min(4, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.5 * cols, 4.6 * nrows), squeeze=False)
    for ax in axes.flat[len(keys):]:
        ax.set_visible(False)
    for ax, k in zip(axes.flat, keys):
        group = [r for r in rows if (r["context"], r["batch"], r["budget"]) == k and r["pool"] == "shared"]
        for li, layout in enumerate(dict.fromkeys(r["layout"] for r in group)):
            for pi, policy in enumerate(p for p in POLICIES if any(r["policy"] == p for r in group)):
                pts = sorted((r["fraction"], r["x_full"]) for r in group if r["layout"] == layout and r["policy"] == policy)
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", linestyle="-" if li == 0 else "--",
                        color=f"C{pi}", label=f"{POLICY_TEXT[policy]}" if li == 0 else None)
        for ri, r in enumerate(x for x in reals if (x["context"], x["batch"], x["budget"]) == k):
            if r["pool_fraction"] is not None:
                ax.plot([r["pool_fraction"]], [r["x_full"]], marker="*" if ri == 0 else "X", markersize=12,
                        color="k", linestyle="none", label=f"real {r['strategy']}")
        ax.set_title(f"{k[0] // 1024}K x {k[1]}, budget {fg.budget_label(k[2])}\n(solid: 64-token blocks, dashed: 128)",
                     fontsize=9)
        ax.set_xlabel("pool capacity ÷ stored KV")
        ax.set_ylabel("misses per step ÷ stored KV (steps after the first)", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--quick", action="store_true", help="SmolLM2 2K x batch 2, 25 %%, 6 steps, a smaller disk measurement")
    p.add_argument("--model", choices=("smollm2", "tiny"), default=None)
    p.add_argument("--contexts", type=lambda t: parse_ints(t, "--contexts"), default=None)
    p.add_argument("--batches", type=lambda t: parse_ints(t, "--batches"), default=None)
    p.add_argument("--budgets", type=fg._budgets, default=None, help="fractions and/or token counts, e.g. 0.25,0.0625")
    p.add_argument("--steps", type=int, default=None, help="decode steps per point (at least 2)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--capacities", type=lambda t: tuple(x.strip() for x in t.split(",")), default=None,
                   help="pool capacities, fractions of the stored KV and/or 'default' (the cache's default bound)")
    p.add_argument("--real", type=lambda t: tuple(x.strip() for x in t.split(",") if x.strip()), default=None,
                   help=f"real caches run beside the replay (default: {','.join(REAL)}; '' for none)")
    p.add_argument("--per-layer", action="store_true", help="also replay with one pool per layer")
    p.add_argument("--disk-mib", type=int, default=None)
    p.add_argument("--disk-repeats", type=int, default=None)
    p.add_argument("--no-disk", action="store_true", help="skip the disk measurement (no time estimates)")
    p.add_argument("--kv-dir", type=Path, default=None, help="keep prefilled rows here for later runs (default: temporary)")
    p.add_argument("--workdir", type=Path, default=None, help="folder for the stores")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    s = Settings.quick() if args.quick else Settings()
    for name in ("model", "contexts", "batches", "budgets", "steps", "threads", "capacities", "real", "disk_mib",
                 "disk_repeats"):
        if getattr(args, name) is not None:
            setattr(s, name, getattr(args, name))
    s.per_layer = s.per_layer or args.per_layer
    if s.steps < 2:
        p.error("--steps must be at least 2")
    for c in s.capacities:
        if c != "default":
            try:
                ok = float(c) >= 0
            except ValueError:
                ok = False
            if not ok:
                p.error(f"--capacities: {c!r} is neither a fraction >= 0 nor 'default'")
    bad = [x for x in s.real if x not in REAL]
    if bad:
        p.error(f"--real: unknown strategies {bad} (choose from {REAL})")
    meta = machine_meta()
    show = not args.no_progress
    workdir = Path(tempfile.mkdtemp(prefix="pool_replay-", dir=args.workdir))
    kv_dir = args.kv_dir or workdir / "kv"
    try:
        results = run(s, kv_dir, workdir, show_progress=show)
        cost = None
        if not args.no_disk:
            sizes = sorted({sc.entry_bytes(b, results["shape"]["kv_heads"], results["shape"]["head_dim"],
                                           results["shape"]["itemsize"]) for sc in LAYOUTS for b in s.batches})
            with torch_threads(s.threads):
                cost = fg.measure_disk(sizes, workdir, target_bytes=s.disk_mib * MiB, repeats=s.disk_repeats,
                                       read_batch=s.read_batch, show_progress=show)
        rows, reals = summarise(results, cost)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    meta["load_average_end"] = os.getloadavg()
    write_results(results, rows, reals, cost, meta, s, args.out)
    print("\n".join(headline_table(rows, reals)))
    print("\n".join(real_table(reals, rows)))
    print(f"wrote {args.out / NAME}.json / .md / .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
