"""How much of the fetched KV does sparse decode's selection use, per storage granularity? (a study)

    python benchmarks/fetch_granularity.py --out benchmarks/results   # SmolLM2, 4K / 8K x batch 1 / 4, ~5 min
    python benchmarks/fetch_granularity.py --quick --out DIR          # SmolLM2, 2K x batch 1 / 4, ~1 min
    python benchmarks/fetch_granularity.py --model tiny --contexts 512 --batches 1,2 --out DIR  # seconds

Sparse decode selects 8-token *pages* per (batch row, KV head), but the cache stores and fetches 64-token
*blocks* holding every batch row and KV head (one entry for K, one for V).  This study records the real
selections of ``TieredKVCache.for_model(model, mode="sparse", budget=..., strategy="fetch-every-step")``
decode steps (the cache's own selection code; ``tiercache_llm.sparse_layer.fetch_selected`` is wrapped to
see each layer's ``BlockSelection``) and computes, per step and layer, what would be fetched if the KV were
stored in other units (:data:`SCHEMES`):

- (a) today: ``g``-token blocks x all rows x all KV heads, ``g = 64`` (and (d) 32 / 16, (e) 128);
- (b) per row: ``g`` tokens x one batch row x all KV heads (``g`` = 64, 32, 16);
- (c) per row and head: ``g`` tokens x one row x one KV head (``g`` = 64, and 32 / 16 / 8 for reference:
  at 8 the unit is the selection's page itself).

A unit is fetched when it holds a selected page of any (row, head) it covers.  Only units complete within
the step's context count: the partial last one is the in-memory tail, as the cache's tail block is (so the
tail differs between granularities by at most ``g - 1`` tokens).  K and V are separate entries of equal size.
Scheme (a) at 64 tokens is what the cache fetches: every layer step's unit set is asserted equal to the
stored blocks of the cache's own ``fetch``, and every step's entry and byte totals to its ``stats()``
(``blocks_selected``, ``bytes_fetched``; fetch-every-step reads every selected block each step), so the
study is checked against the cache it describes.

Per configuration (context, batch, budget) and scheme: entries and bytes per step (sums over layers), bytes
relative to the budget's bytes (the tokens attended x K and V) and to the full KV, mean entry size, and the
step-to-step overlap (fraction of a layer's fetched units it also fetched the step before: what a pool
that keeps the last step's units could reuse).  Time per step is estimated with ``a * entries + bytes /
bw``, both constants measured in the same run on this machine: a disk-only ``BlockStore`` (the cache's
store, ``direct_io=True`` so every read goes to the device) reads ``N`` entries of each entry size the
schemes use, in batches of ``--read-batch`` entries (``get_blocks``, as a layer's fetch does); the fit
minimises the relative error of the per-entry time and its error at every size is reported.  The estimate
is given for every fetched unit and for the units not fetched the step before ("new only").

Rows are distinct stretches of shipped English prose (``_texts.english_prose``), no padding; each row is
prefilled once (``sparse_speed.prefill_rows``), a context's K/V is the prefix of its rows, and each cache
is filled from it (``sparse_speed.fill_cache``, digests included) with every block in the host tier; decode
is teacher-forced along the text.  Writes ``fetch_granularity.json`` / ``.md`` / ``.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402  (the benchmarks directory is not a package)
    GiB, KiB, MiB, filesystem_of, kv_cache_bytes, load_bench_model, machine_meta, make_tiered, parse_ints,
    torch_threads,
)

NAME = "fetch_granularity"
SPLITS = ("all", "row", "rowhead")
SPLIT_TEXT = {"all": "all rows x all heads", "row": "1 row x all heads", "rowhead": "1 row x 1 head"}


@dataclass(frozen=True)
class Scheme:
    """A storage unit: ``tokens`` consecutive positions of all rows and heads (``split="all"``, today's
    layout), of one batch row and all KV heads (``"row"``), or of one row and one KV head (``"rowhead"``)."""

    tag: str  # the letter of the brief's list: a (today), b, c, d, e, or "ref"
    tokens: int
    split: str

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        if self.tokens < 1:
            raise ValueError(f"tokens must be positive, got {self.tokens}")

    @property
    def label(self) -> str:
        return f"{self.tokens} x {SPLIT_TEXT[self.split]}"

    def entry_bytes(self, batch: int, heads: int, head_dim: int, itemsize: int) -> int:
        """Bytes of one entry (K or V) of this unit."""
        rows = batch if self.split == "all" else 1
        hs = heads if self.split in ("all", "row") else 1
        return rows * hs * self.tokens * head_dim * itemsize


TODAY = Scheme("a", 64, "all")
SCHEMES: tuple[Scheme, ...] = (
    TODAY, Scheme("b", 64, "row"), Scheme("c", 64, "rowhead"),
    Scheme("d", 32, "all"), Scheme("d", 16, "all"), Scheme("d", 32, "row"), Scheme("d", 16, "row"),
    Scheme("e", 128, "all"),
    Scheme("ref", 32, "rowhead"), Scheme("ref", 16, "rowhead"), Scheme("ref", 8, "rowhead"),
)


def unit_mask(pages: torch.Tensor, context: int, page: int, scheme: Scheme) -> torch.Tensor:
    """The units of ``scheme`` a layer step fetches, as a bool mask: ``(n,)`` for ``"all"``, ``(B, n)`` for
    ``"row"``, ``(B, H, n)`` for ``"rowhead"``, ``n = context // scheme.tokens`` (units complete within the
    context; the partial last one is the in-memory tail and is never fetched).

    ``pages``: ``(B, H, P)`` bool, the selected ``page``-token pages of each row and KV head (page ``p``
    holds positions ``[p * page, (p + 1) * page)`` of every row: rows without padding); ``page`` must
    divide ``scheme.tokens``.  A unit is fetched when any page it holds is selected for a row and head it
    covers."""
    if scheme.tokens % page:
        raise ValueError(f"the page ({page} tokens) must divide the unit ({scheme.tokens} tokens)")
    b, h, p = pages.shape
    k = scheme.tokens // page
    n = context // scheme.tokens
    if n * k > p:
        raise ValueError(f"{n} units of {scheme.tokens} tokens need {n * k} pages, the mask has {p}")
    per_head = pages[..., : n * k].reshape(b, h, n, k).any(-1)
    if scheme.split == "rowhead":
        return per_head
    per_row = per_head.any(1)
    return per_row if scheme.split == "row" else per_row.any(0)


# -- recording the cache's selections -------------------------------------------------------------------
@dataclass
class LayerStep:
    """One layer's selection at one decode step, as the cache made and fetched it."""

    layer: int
    pages: torch.Tensor  # (B, H, P) bool
    page: int  # tokens per page
    context: int  # valid tokens per row the pages cover (the new token excluded)
    stored: list[int]  # the cache's fetch, stored blocks only (the tail block excluded)
    n_stored: int  # blocks stored in the tiers
    block_size: int
    tokens_selected: int  # selected valid tokens, summed over rows and KV heads


@contextlib.contextmanager
def recording() -> Iterator[list[LayerStep]]:
    """Wrap ``tiercache_llm.sparse_layer.fetch_selected`` (the seam between selection and fetch, called
    once per sparse layer step) to record every layer's selection; the list fills while the block runs."""
    import tiercache_llm.sparse_layer as sparse_layer

    out: list[LayerStep] = []
    original = sparse_layer.fetch_selected

    def wrapped(state, layer, sel, query, stats, **kwargs):  # kwargs: e.g. defer (overlap_sync_reads)
        count = state.digests.count  # (B, P) valid tokens per page
        per_row = count.sum(-1)
        if not bool((per_row == per_row[0]).all()):
            raise RuntimeError("the study assumes rows without padding (equal valid tokens per row)")
        n_stored = len(layer._blocks)
        out.append(LayerStep(
            layer=layer.layer_idx, pages=sel.pages.detach().to("cpu", torch.bool).clone(),
            page=layer.block_size // sel.pages_per_block, context=int(per_row[0]),
            stored=[j for j in sel.fetch.tolist() if j < n_stored], n_stored=n_stored,
            block_size=layer.block_size, tokens_selected=int(sel.selected_tokens(count).sum())))
        return original(state, layer, sel, query, stats, **kwargs)

    sparse_layer.fetch_selected = wrapped
    try:
        yield out
    finally:
        sparse_layer.fetch_selected = original


def check_today(steps: list[list[LayerStep]], cache_steps: list[dict[str, Any]], entry_bytes: int) -> dict[str, int]:
    """Assert that scheme (a) at the cache's block size is what the cache fetched: per layer step, the unit
    set equals the stored blocks of the cache's ``fetch`` (and the cache's stored blocks are the complete
    blocks of the context); per step, the entries and bytes equal ``stats()``'s ``blocks_selected`` (x2:
    K and V) and ``bytes_fetched`` (``entry_bytes``: one K or V block entry).  Returns the counts checked."""
    layer_steps = 0
    for t, (layers, stats) in enumerate(zip(steps, cache_steps, strict=True)):
        units = 0
        for ls in layers:
            today = Scheme("a", ls.block_size, "all")
            mask = unit_mask(ls.pages, ls.context, ls.page, today)
            mine = mask.nonzero().flatten().tolist()
            if ls.n_stored != ls.context // ls.block_size:
                raise AssertionError(f"step {t} layer {ls.layer}: the cache stores {ls.n_stored} blocks, "
                                     f"the context holds {ls.context // ls.block_size} complete ones")
            if mine != ls.stored:
                raise AssertionError(f"step {t} layer {ls.layer}: study units {mine} != cache fetch {ls.stored}")
            units += len(mine)
            layer_steps += 1
        if units != stats["blocks_selected"]:
            raise AssertionError(f"step {t}: study {units} blocks != cache blocks_selected {stats['blocks_selected']}")
        fetched = sum(stats["bytes_fetched"].values())
        if 2 * units * entry_bytes != fetched:
            raise AssertionError(f"step {t}: study {2 * units * entry_bytes} B != cache bytes_fetched {fetched}")
    return {"steps": len(steps), "layer_steps": layer_steps}


# -- granularity arithmetic over recorded steps -----------------------------------------------------------
def scheme_figures(steps: list[list[LayerStep]], scheme: Scheme, batch: int, heads: int, head_dim: int,
                   itemsize: int) -> list[dict[str, Any]]:
    """Per decode step (sums over layers): entries (K and V), bytes, the units also fetched the step before
    by the same layer (``reused``; ``None`` at the first step), the new entries and bytes, the bytes of every
    unit fetched at this step or an earlier one (``touched_bytes``), and the budget's and the full KV's
    bytes."""
    eb = scheme.entry_bytes(batch, heads, head_dim, itemsize)
    token_bytes = 2 * head_dim * itemsize  # K and V of one token of one row and head
    previous: dict[int, torch.Tensor] = {}
    touched: dict[int, torch.Tensor] = {}  # per layer, the units fetched at any step so far
    out = []
    for t, layers in enumerate(steps):
        units = reused = 0
        budget_bytes = full_bytes = 0
        for ls in layers:
            mask = unit_mask(ls.pages, ls.context, ls.page, scheme)
            units += int(mask.sum())
            last = previous.get(ls.layer)
            if last is not None:
                n = min(last.shape[-1], mask.shape[-1])  # the context grows: a new unit can only be new
                reused += int((mask[..., :n] & last[..., :n]).sum())
            previous[ls.layer] = mask
            seen = touched.get(ls.layer)
            if seen is not None and seen.shape[-1] < mask.shape[-1]:
                seen = torch.nn.functional.pad(seen, (0, mask.shape[-1] - seen.shape[-1]))
            touched[ls.layer] = mask if seen is None else seen | mask
            budget_bytes += ls.tokens_selected * token_bytes
            full_bytes += ls.context * batch * heads * token_bytes
        first = t == 0
        out.append({"entries": 2 * units, "bytes": 2 * units * eb, "units": units,
                    "reused_units": None if first else reused,
                    "new_entries": None if first else 2 * (units - reused),
                    "new_bytes": None if first else 2 * (units - reused) * eb,
                    "touched_bytes": 2 * eb * sum(int(m.sum()) for m in touched.values()),
                    "budget_bytes": budget_bytes, "full_bytes": full_bytes})
    return out


def summarise_scheme(per_step: list[dict[str, Any]], eb: int, cost: dict[str, float] | None) -> dict[str, Any]:
    """Means over steps (overlap and "new only" over steps after the first) and the estimated ms/step."""
    mean = lambda key, rows: statistics.fmean(r[key] for r in rows)  # noqa: E731
    later = per_step[1:]
    units = sum(r["units"] for r in later)
    s = {"entry_bytes": eb, "entries": mean("entries", per_step), "bytes": mean("bytes", per_step),
         "budget_bytes": mean("budget_bytes", per_step), "full_bytes": mean("full_bytes", per_step),
         "overlap": sum(r["reused_units"] for r in later) / units if units else None,
         "new_entries": mean("new_entries", later) if later else None,
         "new_bytes": mean("new_bytes", later) if later else None}
    s["x_budget"] = s["bytes"] / s["budget_bytes"] if s["budget_bytes"] else None
    s["x_full"] = s["bytes"] / s["full_bytes"] if s["full_bytes"] else None
    last = per_step[-1]  # every unit any step fetched, against the last step's full KV
    s["touched_x_full"] = last["touched_bytes"] / last["full_bytes"] if last["full_bytes"] else None
    if cost is not None:
        s["est_ms"] = 1e3 * (cost["a_s"] * s["entries"] + s["bytes"] / cost["bw_Bps"])
        s["est_ms_new"] = (1e3 * (cost["a_s"] * s["new_entries"] + s["new_bytes"] / cost["bw_Bps"])
                           if later else None)
        per_entry = cost["per_entry_s"].get(str(eb))
        s["est_ms_measured_size"] = 1e3 * per_entry * s["entries"] if per_entry is not None else None
    return s


# -- the disk cost model --------------------------------------------------------------------------------
def measure_disk(sizes: Sequence[int], root: Path, *, target_bytes: int, repeats: int, read_batch: int,
                 min_entries: int = 128, max_entries: int = 8192, show_progress: bool = True) -> dict[str, Any]:
    """Cold reads through the cache's store: a disk-only ``BlockStore`` with ``direct_io`` (every read goes
    to the device) holds, per entry size ``s`` in ``sizes`` (bytes, multiples of 4), ``N_s =
    clamp(target_bytes / s)`` float32 entries; each repeat reads every size's entries once (order reversed
    on odd repeats) with ``get_blocks`` in batches of ``read_batch`` into preallocated tensors.  Returns per
    size the median seconds per entry (wall) and CPU seconds per entry, and the fit of ``a + s / bw``."""
    from tiercache_llm.store import BlockStore

    sizes = sorted(set(int(s) for s in sizes))
    counts = {s: max(min_entries, min(max_entries, target_bytes // s)) for s in sizes}
    charge = sum(n * (s + 3 * 4096) for s, n in counts.items())
    store = BlockStore.open(gpu=None, host=None, disk=charge + 64 * MiB, path=root / "store", direct_io=True)
    try:
        tiers = getattr(store.cache, "_tiers", [])
        direct = [bool(getattr(t, "direct_io", False)) for t in tiers]
        keys, outs = {}, {}
        gen = torch.Generator().manual_seed(0)
        for s in tqdm(sizes, desc="disk: write", disable=not show_progress, leave=False):
            value = torch.randn(s // 4, generator=gen)
            keys[s] = [f"g{s}-{i}" for i in range(counts[s])]
            for i in range(0, counts[s], 256):
                store.put_blocks([(k, value.clone()) for k in keys[s][i:i + 256]])
            outs[s] = [torch.empty(s // 4) for _ in range(counts[s])]
            store.get_blocks(keys[s][:1], out=outs[s][:1])
            if not torch.equal(outs[s][0], value):
                raise RuntimeError(f"the disk tier read back wrong bytes for {s}-byte entries")
        for s in sizes:  # untimed: the descriptor cache, read threads and scratch buffers (the device is cold anyway)
            for i in range(0, counts[s], read_batch):
                store.get_blocks(keys[s][i:i + read_batch], out=outs[s][i:i + read_batch])
        wall: dict[int, list[float]] = {s: [] for s in sizes}
        cpu: dict[int, list[float]] = {s: [] for s in sizes}
        bar = tqdm(total=repeats * len(sizes), desc="disk: cold reads", disable=not show_progress, leave=False)
        for r in range(repeats):
            for s in (sizes if r % 2 == 0 else sizes[::-1]):
                c0, t0 = time.process_time(), time.perf_counter()
                for i in range(0, counts[s], read_batch):
                    store.get_blocks(keys[s][i:i + read_batch], out=outs[s][i:i + read_batch])
                wall[s].append((time.perf_counter() - t0) / counts[s])
                cpu[s].append((time.process_time() - c0) / counts[s])
                bar.update()
        bar.close()
    finally:
        store.close()
        shutil.rmtree(root / "store", ignore_errors=True)
    per_entry = {s: statistics.median(wall[s]) for s in sizes}
    fit = fit_cost(per_entry)
    return {"sizes": sizes, "entries": counts, "repeats": repeats, "read_batch": read_batch,
            "direct_io": direct, "filesystem": filesystem_of(root),
            "per_entry_s": {str(s): v for s, v in per_entry.items()},
            "per_entry_samples_s": {str(s): v for s, v in wall.items()},
            "cpu_per_entry_s": {str(s): statistics.median(v) for s, v in cpu.items()}, **fit}


def fit_cost(per_entry: dict[int, float]) -> dict[str, Any]:
    """Least squares of ``t(s) = a + s / bw`` over the measured seconds per entry ``t(s)`` of each size ``s``,
    in relative terms (each residual divided by ``t(s)``, so small entries count as much as large ones).
    Returns ``a_s``, ``bw_Bps``, the relative error at every size and the largest and RMS ones."""
    sizes = sorted(per_entry)
    t = torch.tensor([per_entry[s] for s in sizes], dtype=torch.float64)
    x = torch.tensor(sizes, dtype=torch.float64)
    design = torch.stack([torch.ones_like(x), x], dim=1) / t.unsqueeze(1)
    sol = torch.linalg.lstsq(design, torch.ones_like(t).unsqueeze(1)).solution.flatten()
    a, c = float(sol[0]), float(sol[1])
    model = a + c * x
    err = ((model - t) / t).tolist()
    return {"a_s": a, "bw_Bps": 1.0 / c if c > 0 else float("inf"),
            "fit_rel_err": {str(s): e for s, e in zip(sizes, err)},
            "fit_max_abs_rel_err": max(abs(e) for e in err),
            "fit_rms_rel_err": math.sqrt(statistics.fmean(e * e for e in err))}


# -- decode runs --------------------------------------------------------------------------------------------
@dataclass
class Settings:
    model: str = "smollm2"
    contexts: tuple[int, ...] = (4096, 8192)
    batches: tuple[int, ...] = (1, 4)
    budgets: tuple[int | float, ...] = (0.0625, 0.25, 2048)
    steps: int = 16
    threads: int = 1
    disk_mib: int = 32  # MiB read per entry size in the disk measurement
    disk_repeats: int = 7
    read_batch: int = 256

    @classmethod
    def quick(cls) -> "Settings":
        return cls(contexts=(2048,), batches=(1, 4), budgets=(0.0625, 0.25, 1024), steps=4, disk_mib=8, disk_repeats=3)


def budget_label(b: int | float) -> str:
    return f"{100 * b:g} %" if isinstance(b, float) else f"{b} tokens"


def prose_rows(tokenizer: Any, rows: int, tokens: int, vocab: int) -> torch.Tensor:
    """``(rows, tokens)`` ids: consecutive distinct stretches of ``_texts.english_prose`` (seeded random ids
    without a tokenizer)."""
    if tokenizer is None:
        return torch.randint(3, vocab, (rows, tokens), generator=torch.Generator().manual_seed(tokens))
    from _texts import english_prose

    need, chars = rows * tokens, 6 * rows * tokens
    while True:
        text, _ = english_prose(chars)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        if ids.numel() >= need:
            return ids[:need].view(rows, tokens)
        if len(text) < chars:
            raise RuntimeError(f"the prose source holds {ids.numel()} tokens, {need} are needed")
        chars *= 2


def decode_point(model: Any, kv: list[tuple[torch.Tensor, torch.Tensor]], feed: torch.Tensor,
                 budget: int | float) -> tuple[list[list[LayerStep]], list[dict[str, Any]], float]:
    """A fetch-every-step sparse cache at ``budget`` filled with ``kv`` (every block in the host tier),
    then one teacher-forced decode step per column of ``feed`` (``(B, steps)``).  Returns the recorded
    layer steps per step, the cache's ``stats()["sparse"]["last_step"]`` per step, and the seconds taken."""
    import sparse_speed as sp
    from tiercache_llm.hf_kwargs import cache_kwargs

    batch, tokens = kv[0][0].shape[0], kv[0][0].shape[2]
    kv_bytes = kv_cache_bytes(model.config, tokens + feed.shape[1] + 64, batch, kv[0][0].dtype)
    t0 = time.perf_counter()
    # part_reads off: the recording is checked against whole-entry fetches (scheme (a), today's unit); the
    # (row, KV head) parts a part read would take are what the schemes below count.
    cache = make_tiered(model, "sparse", budget=budget, strategy="fetch-every-step",
                        host=int(1.5 * kv_bytes) + 64 * MiB, disk=None, pipeline={"part_reads": False})
    steps: list[list[LayerStep]] = []
    stats: list[dict[str, Any]] = []
    try:
        sp.fill_cache(cache, kv)
        with torch.no_grad():
            for t in range(feed.shape[1]):
                with recording() as rec:
                    model(input_ids=feed[:, t:t + 1], **cache_kwargs(cache, model), use_cache=True)
                steps.append(rec)
                stats.append(cache.stats()["sparse"]["last_step"])
    finally:
        cache.close()
    return steps, stats, time.perf_counter() - t0


def checked_point(model: Any, kv: list[tuple[torch.Tensor, torch.Tensor]], feed: torch.Tensor, budget: int | float
                  ) -> tuple[list[list[LayerStep]], list[dict[str, Any]], float, dict[str, int], int]:
    """:func:`decode_point`, then :func:`check_today` (raises if the recording is not the cache's fetch).
    Returns the recorded layer steps, the cache's per-step stats, the seconds, the counts checked and the bytes
    of one K or V entry of a stored block."""
    steps, cache_stats, secs = decode_point(model, kv, feed, budget)
    batch, heads, _, head_dim = kv[0][0].shape
    entry = Scheme("a", steps[0][0].block_size, "all").entry_bytes(batch, heads, head_dim, kv[0][0].element_size())
    return steps, cache_stats, secs, check_today(steps, cache_stats, entry), entry


def run(s: Settings, *, show_progress: bool = True) -> dict[str, Any]:
    import sparse_speed as sp

    model, tokenizer = load_bench_model(s.model)
    text = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    heads = text.num_key_value_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    itemsize = model.dtype.itemsize
    rows = max(s.batches)
    ids = prose_rows(tokenizer, rows, max(s.contexts) + s.steps, text.vocab_size)
    points: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    with torch_threads(s.threads):
        prefilled = []
        for r in tqdm(range(rows), desc="prefill rows", disable=not show_progress):
            prefilled.extend(sp.prefill_rows(model, ids[r:r + 1], [max(s.contexts)]))
        prefill_s = time.perf_counter() - t0
        todo = [(c, b, bud) for c in s.contexts for b in s.batches for bud in s.budgets]
        bar = tqdm(total=len(todo), desc="decode points", disable=not show_progress)
        for context in s.contexts:
            for batch in s.batches:
                kv = sp.point_kv(prefilled, batch, context)
                feed = ids[:batch, context:context + s.steps]
                for budget in s.budgets:
                    bar.set_postfix_str(f"{context} x {batch}, {budget_label(budget)}")
                    steps, _, secs, checked, _ = checked_point(model, kv, feed, budget)  # raises if not the cache's
                    block = steps[0][0].block_size
                    figures = {sc.label: scheme_figures(steps, sc, batch, heads, head_dim, itemsize) for sc in SCHEMES}
                    points.append({"context": context, "batch": batch, "budget": budget, "seconds": secs,
                                   "block_size": block, "page": steps[0][0].page, "checked": checked,
                                   "realised_budget": statistics.fmean(
                                       ls.tokens_selected / (ls.context * batch * heads) for st in steps for ls in st),
                                   "per_step": figures})
                    bar.update()
                del kv
        bar.close()
    return {"points": points, "prefill_seconds": prefill_s, "decode_seconds": time.perf_counter() - t0 - prefill_s,
            "shape": {"layers": text.num_hidden_layers, "kv_heads": heads, "head_dim": head_dim, "itemsize": itemsize}}


def entry_sizes(s: Settings, shape: dict[str, int]) -> list[int]:
    return sorted({sc.entry_bytes(b, shape["kv_heads"], shape["head_dim"], shape["itemsize"])
                   for sc in SCHEMES for b in s.batches})


def summarise(results: dict[str, Any], cost: dict[str, Any] | None) -> list[dict[str, Any]]:
    shape = results["shape"]
    rows = []
    for p in results["points"]:
        for sc in SCHEMES:
            eb = sc.entry_bytes(p["batch"], shape["kv_heads"], shape["head_dim"], shape["itemsize"])
            rows.append({"context": p["context"], "batch": p["batch"], "budget": p["budget"], "tag": sc.tag,
                         "scheme": sc.label, "tokens": sc.tokens, "split": sc.split,
                         **summarise_scheme(p["per_step"][sc.label], eb, cost)})
    return rows


# -- output ---------------------------------------------------------------------------------------------
def _f(v: Any, fmt: str) -> str:
    return "" if v is None else format(v, fmt)


def _ms(v: float | None) -> str:
    return "" if v is None else (f"{v:.0f}" if v >= 100 else f"{v:.3g}")


def table(rows: list[dict[str, Any]]) -> list[str]:
    out = ["| context x batch | budget | scheme | entry KiB | entries/step | MiB/step | ÷ budget | ÷ full KV | "
           "touched, all steps ÷ full KV | overlap | est. ms/step | est. ms/step, new only |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['context']} x {r['batch']} | {budget_label(r['budget'])} | ({r['tag']}) {r['scheme']} | "
                   f"{r['entry_bytes'] / KiB:g} | {r['entries']:.0f} | {r['bytes'] / MiB:.1f} | {_f(r['x_budget'], '.2f')} | "
                   f"{_f(r['x_full'], '.3f')} | {_f(r['touched_x_full'], '.3f')} | {_f(r['overlap'], '.3f')} | "
                   f"{_ms(r.get('est_ms'))} | {_ms(r.get('est_ms_new'))} |")
    return out


def best_table(rows: list[dict[str, Any]]) -> list[str]:
    """Per configuration: (a) today and (c) 64 x one row x one head (÷ budget, ÷ full KV, overlap, estimated
    ms/step all / new only), and the schemes of least estimated time (all fetched / new only)."""
    out = ["| context x batch | budget | (a) today: ÷ budget, ÷ full KV, overlap, est. ms (new only) | "
           "(c) 64 x 1 row x 1 head: same | least est. ms, all fetched | least est. ms, new only |",
           "|---|---|---|---|---|---|"]
    keys = []
    for r in rows:
        k = (r["context"], r["batch"], r["budget"])
        if k not in keys:
            keys.append(k)

    def brief(r: dict[str, Any]) -> str:
        return (f"{r['x_budget']:.2f}, {r['x_full']:.3f}, {_f(r['overlap'], '.3f')}, {_ms(r['est_ms'])} "
                f"({_ms(r['est_ms_new'])})")

    for k in keys:
        group = [r for r in rows if (r["context"], r["batch"], r["budget"]) == k]
        today = next(r for r in group if r["tag"] == "a")
        per_head = next(r for r in group if r["tag"] == "c")
        if today.get("est_ms") is None:
            continue
        best = min(group, key=lambda r: r["est_ms"])
        best_new = min((r for r in group if r.get("est_ms_new") is not None), key=lambda r: r["est_ms_new"], default=None)
        new_text = "" if best_new is None else f"({best_new['tag']}) {best_new['scheme']}: {_ms(best_new['est_ms_new'])}"
        out.append(f"| {k[0]} x {k[1]} | {budget_label(k[2])} | {brief(today)} | {brief(per_head)} | "
                   f"({best['tag']}) {best['scheme']}: {_ms(best['est_ms'])} | {new_text} |")
    return out


def disk_table(cost: dict[str, Any]) -> list[str]:
    out = ["| entry KiB | entries read | measured µs/entry | model µs/entry | error | CPU µs/entry |",
           "|---|---|---|---|---|---|"]
    for s in cost["sizes"]:
        t = cost["per_entry_s"][str(s)]
        m = cost["a_s"] + s / cost["bw_Bps"]
        out.append(f"| {s / KiB:g} | {cost['entries'][s] if s in cost['entries'] else cost['entries'][str(s)]} | "
                   f"{1e6 * t:.1f} | {1e6 * m:.1f} | {100 * cost['fit_rel_err'][str(s)]:+.0f} % | "
                   f"{1e6 * cost['cpu_per_entry_s'][str(s)]:.1f} |")
    return out


def write_results(results: dict[str, Any], rows: list[dict[str, Any]], cost: dict[str, Any] | None,
                  meta: dict[str, Any], s: Settings, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    doc = {"name": NAME, "meta": meta, "settings": asdict(s), "schemes": [asdict(sc) | {"label": sc.label} for sc in SCHEMES],
           "disk": cost, "summary": rows, **results}
    (out / f"{NAME}.json").write_text(json.dumps(doc, indent=1, default=str))
    load = meta.get("load_average")
    lines = [f"# Fetch granularity (model {s.model}, {meta['date_utc']} UTC)", "",
             f"`{' '.join(meta['argv'])}`; torch threads {s.threads}; load average at the start "
             f"{load_text(load)}, at the end {load_text(meta.get('load_average_end'))}; prefill "
             f"{results['prefill_seconds']:.0f} s, decode points {results['decode_seconds']:.0f} s.", "",
             f"{s.steps} teacher-forced decode steps per point, fetch-every-step, page "
             f"{results['points'][0]['page']} tokens, storage block {results['points'][0]['block_size']} tokens. "
             "Scheme (a) at the cache's block size was asserted equal to the cache's own fetch at every layer "
             "step and to its `blocks_selected` / `bytes_fetched` at every step. Bytes and entries are sums over "
             "layers, K and V counted separately; overlap: fraction of a layer's fetched units it also fetched the "
             "step before; new only: the units it did not (as if every unit of the step before were still resident); "
             "touched: every unit fetched at any step of the point, against the last step's full KV.", ""]
    if cost is not None:
        lines += [f"Disk cost model, measured in this run (`BlockStore`, disk tier only, direct_io {cost['direct_io']}, "
                  f"{cost['filesystem']}, `get_blocks` batches of {cost['read_batch']}, medians of {cost['repeats']}): "
                  f"**a = {1e6 * cost['a_s']:.1f} µs per entry, bw = {cost['bw_Bps'] / GiB:.2f} GiB/s**; fit error "
                  f"max {100 * cost['fit_max_abs_rel_err']:.0f} %, RMS {100 * cost['fit_rms_rel_err']:.0f} %.", "",
                  *disk_table(cost), "", "## Least estimated time per configuration", "", *best_table(rows), ""]
    lines += ["## Every scheme", "", *table(rows), ""]
    (out / f"{NAME}.md").write_text("\n".join(lines))
    plot(rows, s, out / f"{NAME}.png")


def load_text(load: Any) -> str:
    return "?" if not load else " / ".join(f"{x:.1f}" for x in load)


def plot(rows: list[dict[str, Any]], s: Settings, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"({sc.tag}) {sc.label}" for sc in SCHEMES]
    has_cost = any(r.get("est_ms") is not None for r in rows)
    fig, axes = plt.subplots(2 if has_cost else 1, len(s.budgets), figsize=(5 * len(s.budgets), 9 if has_cost else 5),
                             squeeze=False, sharex=True)
    x = list(range(len(SCHEMES)))
    for j, budget in enumerate(s.budgets):
        for context in s.contexts:
            for batch in s.batches:
                group = [r for r in rows if (r["context"], r["batch"], r["budget"]) == (context, batch, budget)]
                if not group:
                    continue
                name = f"{context // 1024}K x {batch}"
                line = axes[0][j].plot(x, [r["x_budget"] for r in group], marker="o", label=name)[0]
                if has_cost:
                    axes[1][j].plot(x, [r["est_ms"] for r in group], marker="o", color=line.get_color(), label=name)
                    axes[1][j].plot(x, [r["est_ms_new"] for r in group], marker=".", linestyle="--",
                                    color=line.get_color(), label=f"{name}, new only")
        axes[0][j].set_title(f"budget {budget_label(budget)}")
        axes[0][j].set_ylabel("bytes fetched per step / budget's bytes")
        axes[0][j].set_yscale("log")
        axes[0][j].grid(alpha=0.3)
        if has_cost:
            axes[1][j].set_ylabel("estimated ms/step (disk cost model)")
            axes[1][j].set_yscale("log")
            axes[1][j].grid(alpha=0.3)
        axes[-1][j].set_xticks(x)
        axes[-1][j].set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    axes[0][0].legend(fontsize=7)
    if has_cost:
        axes[1][0].legend(fontsize=6, ncol=2)
    fig.suptitle("Fetched KV per decode step by storage granularity (SmolLM2 selections)" if s.model == "smollm2"
                 else f"Fetched KV per decode step by storage granularity ({s.model})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _budgets(text: str) -> tuple[int | float, ...]:
    out: list[int | float] = []
    for part in text.split(","):
        part = part.strip()
        try:
            out.append(float(part) if "." in part else int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(f"budgets must be fractions (0.25) or token counts (2048), got {part!r}") from None
    return tuple(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--quick", action="store_true", help="2K x batch 1 / 4, 4 steps, a smaller disk measurement")
    p.add_argument("--model", choices=("smollm2", "tiny"), default=None)
    p.add_argument("--contexts", type=lambda t: parse_ints(t, "--contexts"), default=None)
    p.add_argument("--batches", type=lambda t: parse_ints(t, "--batches"), default=None)
    p.add_argument("--budgets", type=_budgets, default=None, help="fractions and/or token counts, e.g. 0.0625,0.25,2048")
    p.add_argument("--steps", type=int, default=None, help="decode steps per point (at least 2)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--disk-mib", type=int, default=None, help="MiB read per entry size in the disk measurement")
    p.add_argument("--disk-repeats", type=int, default=None)
    p.add_argument("--no-disk", action="store_true", help="skip the disk measurement (no time estimates)")
    p.add_argument("--workdir", type=Path, default=None, help="folder for the disk measurement's store")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    s = Settings.quick() if args.quick else Settings()
    for name in ("model", "contexts", "batches", "budgets", "steps", "threads", "disk_mib", "disk_repeats"):
        if getattr(args, name) is not None:
            setattr(s, name, getattr(args, name))
    if s.steps < 2:
        p.error("--steps must be at least 2 (the overlap compares consecutive steps)")
    meta = machine_meta()
    show = not args.no_progress
    workdir = Path(tempfile.mkdtemp(prefix="fetch_granularity-", dir=args.workdir))
    try:
        results = run(s, show_progress=show)
        cost = None
        if not args.no_disk:
            with torch_threads(s.threads):
                cost = measure_disk(entry_sizes(s, results["shape"]), workdir, target_bytes=s.disk_mib * MiB,
                                    repeats=s.disk_repeats, read_batch=s.read_batch, show_progress=show)
        rows = summarise(results, cost)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    meta["load_average_end"] = os.getloadavg()
    write_results(results, rows, cost, meta, s, args.out)
    print("\n".join(best_table(rows) if cost is not None else table(rows)))
    print(f"wrote {args.out / NAME}.json / .md / .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
