"""Would reading only the selected (row, head) parts of a joint entry cut sparse decode's step time? (a study)

    python benchmarks/sector_study.py --kv-dir /tmp/sector_kv --out benchmarks/results  # SmolLM2 + synthetic, ~8 min
    python benchmarks/sector_study.py --model tiny --contexts 512 --batches 1,2 --synthetic none --out DIR  # seconds

Sparse decode selects 8-token pages per (batch row, KV head), but one stored entry holds a whole block (128
tokens) of one layer for *every* row and KV head, K and V joint (``(2, B, H, S, D)``), so a step fetches the
union over heads and rows.  A *sector read* would read, of each fetched entry, only the byte ranges of the
selected sectors -- a sector being ``g`` tokens of one (row, head), K and V (``g`` = the block: the whole
(row, head) part) -- each sector with its own crc32c, the entry still one file.  This study answers with
measurements, in one run:

(a) **bytes**: the real selections of fetch-every-step caches (``fetch_granularity.checked_point``: the cache's own selection, checked against its fetch and ``stats()`` at every layer step)
    at 4K / 8K x batch 1 / 4, budgets 25 % / 6.25 % (SmolLM2, shipped prose, 16 teacher-forced steps), plus
    the deep synthetic random-weights config of ``sparse_speed --synthetic`` (48 layers, 1 KV head) at 16K
    batch 1; per step the entries, the bytes of whole entries and of the selected sectors (:data:`LAYOUTS`),
    and the byte ranges a sector read issues: in today's byte order (K half, then V half: a (row, head) part
    is two ranges) or sector-major (``(B, H, S/g, 2, g, D)``: K and V of a sector adjacent, a run of selected
    sectors one range).  The synthetic point also gets one short run of the real caches (exact,
    fetch-every-step, attention-aware; ``sparse_speed.build_cache``, cold) with ``stats()`` per-stage times,
    to say why sparse loses to exact there.
(b) **cost**: a raw disk micro, ``O_DIRECT`` (every read goes to the device): ``--micro-files`` files of a
    header page plus an ``--entry-kib`` payload, read from a pool of ``DIRECT_READ_THREADS`` threads (the disk
    tier's direct-read pool) with ``os.preadv`` into page-aligned buffers: whole entries (one read, header
    included, as the store reads) against ``k`` of ``n`` ``--part-kib`` parts (``k = 1..n``) chosen at random
    (adjacent ones coalesced: one read per run) or contiguous (one read); the fit ``t = c0 + a_r * ranges +
    bytes / bw`` per entry gives the per-range cost and the bandwidth.  Beside it, crc32c per call (the same
    bytes checked in n pieces against one) and the store's own per-entry cost and bandwidth
    (``fetch_granularity.measure_disk``: a disk-only ``BlockStore`` with ``direct_io``), all in the same run.
(c) **estimate** per step: ``A * entries + a_r * (ranges - entries) + c * (sectors - entries) + bytes / bw``
    (A, bw: the store's fit; a_r: the micro's; c: crc32c per call), each entry read whole or by sectors,
    whichever its terms price lower; and **Belady MIN** (``pool_replay.replay``, ``"min"``) with a pool of
    ``--pool-fraction`` of the stored KV (default 0.25, the host budget's bound) holding whole entries or
    sectors, its misses priced the same way.
(d) **real reads** of recorded steps (``--replay``, default the largest point at the first budget): one file per
    stored block (a header page + the joint entry), each step's whole entries against its sector-major (row, head)
    parts through the micro's reader, interleaved, ``--replay-repeats`` times (:func:`replay_reads`).

Prefilled rows are kept under ``--kv-dir`` (``pool_replay.prefilled_rows``; the same files ``pool_replay``
writes for the same settings), so a rerun skips the prefill.  Writes ``sector_study.json`` / ``.md`` /
``.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import mmap
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fetch_granularity as fg  # noqa: E402  (the benchmarks directory is not a package)
import pool_replay as pr  # noqa: E402
from _common import GiB, KiB, MiB, filesystem_of, machine_meta, parse_ints, torch_threads  # noqa: E402

NAME = "sector_study"
ORDERS = ("kv-first", "sector-major")
ORDER_TEXT = {"kv-first": "today's byte order (2, B, H, S, D)", "sector-major": "sector-major (B, H, S/g, 2, g, D)"}


@dataclass(frozen=True)
class Layout:
    """How a fetched entry is read: whole (``tokens=None``), or by sectors of ``tokens`` tokens of one (row,
    KV head), K and V, laid out in ``order`` (:data:`ORDERS`); ``tokens=0`` stands for the block size."""

    tokens: int | None
    order: str = "sector-major"

    def __post_init__(self) -> None:
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {self.order!r}")
        if self.tokens is not None and self.tokens < 0:
            raise ValueError(f"tokens must be >= 0 (0: the block), got {self.tokens}")

    @property
    def label(self) -> str:
        if self.tokens is None:
            return "whole entries (today)"
        g = "(row, head) parts" if self.tokens == 0 else f"{self.tokens}-token sectors of a (row, head)"
        return f"{g}, {self.order}"

    def sector_tokens(self, block: int) -> int:
        g = block if not self.tokens else self.tokens
        if block % g:
            raise ValueError(f"the sector ({g} tokens) must divide the block ({block} tokens)")
        return g


# the per-stage columns of the synthetic point's table (every stage stays in the JSON)
STAGES = {"sparse.total.scoring_seconds": "scoring", "sparse.total.fetch_seconds": "fetch",
          "pipeline.sync_wait_seconds": "sync read wait", "pipeline.slot_wait_seconds": "slot wait",
          "pipeline.copy_seconds": "copies", "pipeline.predict_seconds": "prediction",
          "sparse.total.attention_seconds": "attention", "sparse.total.placement_seconds": "placement",
          "kv.fetch_seconds": "KV layer fetch (all modes)", "prefetch.wait_seconds": "exact read-ahead wait"}
LAYOUTS = (Layout(None), Layout(0, "kv-first"), Layout(0, "sector-major"), Layout(32), Layout(16))


# -- (a) selections as sector masks --------------------------------------------------------------------------
def sector_mask(ls: fg.LayerStep, g: int) -> torch.Tensor:
    """``(n, B * H * C)`` bool: per stored block (``n = context // block``: the tail block stays in memory),
    the selected sectors of ``g`` tokens (``C = block // g`` per (row, head)) in (row, head, sector) order."""
    n = ls.context // ls.block_size
    scheme = fg.Scheme("s", g, "rowhead")
    m = fg.unit_mask(ls.pages, n * ls.block_size, ls.page, scheme)  # (B, H, n * C)
    b, h, _ = m.shape
    return m.reshape(b, h, n, ls.block_size // g).permute(2, 0, 1, 3).reshape(n, -1)


def runs(m: torch.Tensor) -> torch.Tensor:
    """Per row of a ``(n, L)`` bool mask: its maximal runs of set bits (one read each)."""
    if m.shape[1] == 0:
        return torch.zeros(m.shape[0], dtype=torch.long)
    return m[:, 0].long() + (m[:, 1:] & ~m[:, :-1]).sum(1)


def block_reads(m: torch.Tensor, order: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Of a ``(n, B * H * C)`` sector mask: per block with a selected sector, ``(sectors, ranges)``.  In
    today's byte order K and V are two halves, so every run is two ranges; sector-major, one."""
    m = m[m.any(1)]
    return m.sum(1), runs(m) * (2 if order == "kv-first" else 1)


@dataclass
class Cost:
    """The step-time model's constants (seconds, bytes/s)."""

    entry_s: float  # A: per entry read through the store
    bw_Bps: float  # the store's bandwidth
    range_s: float  # a_r: per extra byte range of a sector read (the raw micro)
    crc_call_s: float  # c: per extra crc32c call (a checksum per sector)

    def block_seconds(self, sectors: torch.Tensor, ranges: torch.Tensor, sector_bytes: int, entry_bytes: int) -> torch.Tensor:
        """Per block, the cheaper of a whole read and a sector read, without the per-entry ``A``."""
        whole = torch.full(sectors.shape, entry_bytes / self.bw_Bps, dtype=torch.float64)
        part = (self.range_s * (ranges - 1) + self.crc_call_s * (sectors - 1) + sectors * sector_bytes / self.bw_Bps)
        return torch.minimum(whole, part.double())


def layout_step(layers: list[fg.LayerStep], layout: Layout, shape: dict[str, int], batch: int,
                cost: Cost | None) -> dict[str, Any]:
    """One decode step (sums over layers) of ``layout``: entries, sectors read, ranges, bytes, and the
    estimated seconds (``cost``; whole entries: ``A * entries + bytes / bw``)."""
    block = layers[0].block_size
    entry = 2 * batch * shape["kv_heads"] * block * shape["head_dim"] * shape["itemsize"]
    g = layout.sector_tokens(block)
    sb = 2 * g * shape["head_dim"] * shape["itemsize"]
    out = {"entries": 0, "sectors": 0, "ranges": 0, "bytes": 0, "full_bytes": 0, "est_s": 0.0 if cost else None,
           "whole_reads": 0}
    for ls in layers:
        m = sector_mask(ls, g)
        out["full_bytes"] += m.shape[0] * entry
        sectors, ranges = block_reads(m, layout.order)
        e = int(sectors.numel())
        out["entries"] += e
        if layout.tokens is None:
            out["sectors"] += e
            out["ranges"] += e
            out["bytes"] += e * entry
            if cost:
                out["est_s"] += e * (cost.entry_s + entry / cost.bw_Bps)
            continue
        if cost:
            secs = cost.block_seconds(sectors, ranges, sb, entry)
            whole = secs >= entry / cost.bw_Bps  # read whole where that prices no higher
            out["est_s"] += e * cost.entry_s + float(secs.sum())
            out["whole_reads"] += int(whole.sum())
            out["sectors"] += int(torch.where(whole, m.shape[1], sectors).sum())
            out["ranges"] += int(torch.where(whole, 1, ranges).sum())
            out["bytes"] += int(torch.where(whole, entry, sectors * sb).sum())
        else:
            out["sectors"] += int(sectors.sum())
            out["ranges"] += int(ranges.sum())
            out["bytes"] += int(sectors.sum()) * sb
    out["sector_bytes"], out["entry_bytes"] = sb, entry
    return out


def sector_requests(steps: list[list[fg.LayerStep]], g: int | None) -> tuple[list[pr.Request], int]:
    """The recorded layer steps as :class:`pool_replay.Request` s of sectors (``(layer, block, sector)``
    keys) or, with ``g=None``, of whole entries (``(layer, block)``); and the stored units of the last step."""
    out, total = [], 0
    for t, layers in enumerate(steps):
        total = 0
        for ls in layers:
            m = sector_mask(ls, g or ls.block_size)
            if g is None:
                total += m.shape[0]
                units = [(ls.layer, j) for j in m.any(1).nonzero().flatten().tolist()]
            else:
                total += m.numel()
                units = [(ls.layer, j, s) for j, s in m.nonzero().tolist()]
            out.append(pr.Request(t, units, layer=ls.layer))
    return out, total


def priced_misses(missed: list[list[tuple]], requests: list[pr.Request], steps: list[list[fg.LayerStep]],
                  layout: Layout, shape: dict[str, int], batch: int, cost: Cost | None) -> list[dict[str, Any]]:
    """Per step, the entries, ranges, bytes and estimated seconds of the missed units, read as ``layout``."""
    block = steps[0][0].block_size
    entry = 2 * batch * shape["kv_heads"] * block * shape["head_dim"] * shape["itemsize"]
    g = layout.sector_tokens(block)
    sb = 2 * g * shape["head_dim"] * shape["itemsize"]
    per_block = batch * shape["kv_heads"] * (block // g)
    out = [{"entries": 0, "ranges": 0, "bytes": 0, "est_s": 0.0 if cost else None} for _ in steps]
    for r, miss in zip(requests, missed, strict=True):
        row = out[r.step]
        if layout.tokens is None:
            row["entries"] += len(miss)
            row["ranges"] += len(miss)
            row["bytes"] += len(miss) * entry
            if cost:
                row["est_s"] += len(miss) * (cost.entry_s + entry / cost.bw_Bps)
            continue
        if not miss:
            continue
        blocks = sorted({u[1] for u in miss})
        index = {j: i for i, j in enumerate(blocks)}
        m = torch.zeros(len(blocks), per_block, dtype=torch.bool)
        m[[index[u[1]] for u in miss], [u[2] for u in miss]] = True
        sectors, ranges = block_reads(m, layout.order)
        row["entries"] += len(blocks)
        if cost:
            secs = cost.block_seconds(sectors, ranges, sb, entry)
            whole = secs >= entry / cost.bw_Bps
            row["est_s"] += len(blocks) * cost.entry_s + float(secs.sum())
            row["ranges"] += int(torch.where(whole, 1, ranges).sum())
            row["bytes"] += int(torch.where(whole, entry, sectors * sb).sum())
        else:
            row["ranges"] += int(ranges.sum())
            row["bytes"] += int(sectors.sum()) * sb
    return out


# -- (b) the raw disk micro -----------------------------------------------------------------------------------
def _aligned(n: int) -> mmap.mmap:
    return mmap.mmap(-1, max(4096, -(-n // 4096) * 4096))


def write_files(root: Path, count: int, nbytes: int) -> list[str]:
    """``count`` files of a 4 KiB header page plus ``nbytes`` of random payload, synced and dropped from the
    page cache."""
    root.mkdir(parents=True, exist_ok=True)
    payload = os.urandom(4096 + nbytes)
    paths = []
    for i in range(count):
        p = str(root / f"e{i:05d}")
        with open(p, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        paths.append(p)
    return paths


def part_ranges(chosen: Sequence[int], part: int, header: int = 4096) -> list[tuple[int, int]]:
    """``(file offset, length)`` of the runs of ``chosen`` parts (sorted indices), adjacent parts coalesced."""
    out: list[tuple[int, int]] = []
    for i in sorted(chosen):
        off = header + i * part
        if out and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + part)
        else:
            out.append((off, part))
    return out


class RangeReader:
    """Reads byte ranges of files opened with ``O_DIRECT`` from a pool of ``workers`` threads, one task per
    file, each thread reading into its own page-aligned buffer of ``span`` bytes (a range lands at its own
    offset, as it would in an entry's slot); one ``os.preadv`` per range.  A context manager (closes the files
    and the pool)."""

    def __init__(self, paths: Sequence[str], span: int, workers: int) -> None:
        self.paths, self.span = list(paths), span
        self.fds: list[int] = []
        self.local = threading.local()
        try:
            for p in self.paths:
                self.fds.append(os.open(p, os.O_RDONLY | os.O_DIRECT))
        except BaseException:
            self.close()
            raise
        self.pool = ThreadPoolExecutor(workers)

    def _read(self, i: int, ranges: list[tuple[int, int]]) -> int:
        buf = getattr(self.local, "buf", None)
        if buf is None:
            buf = self.local.buf = _aligned(self.span)
        view = memoryview(buf)
        done = 0
        for off, length in ranges:
            done += os.preadv(self.fds[i], [view[off:off + length]], off)
        if done != sum(x[1] for x in ranges):
            raise RuntimeError(f"{self.paths[i]}: short read ({done} bytes)")
        return done

    def read(self, items: Sequence[tuple[int, list[tuple[int, int]]]]) -> float:
        """Read every ``(file index, ranges)`` item once; returns the wall seconds."""
        t0 = time.perf_counter()
        list(self.pool.map(self._read, [i for i, _ in items], [r for _, r in items]))
        return time.perf_counter() - t0

    def close(self) -> None:
        if getattr(self, "pool", None) is not None:
            self.pool.shutdown()
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    def __enter__(self) -> "RangeReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def measure_ranges(paths: list[str], entry: int, part: int, *, workers: int, repeats: int, seed: int = 0,
                   show_progress: bool = True) -> dict[str, Any]:
    """Cold ``O_DIRECT`` reads of every file once per configuration and repeat (configurations interleaved,
    their order shuffled per repeat): ``whole`` (one ``preadv`` of header page + payload) and, for ``k = 1..n``
    (``n = entry // part``), ``rand k`` (k random parts, one ``preadv`` per run) and ``cont k`` (k contiguous
    parts, one ``preadv``), through a :class:`RangeReader` of ``workers`` threads.  Returns per configuration
    the median seconds per entry, its ranges and bytes per entry, and the fit."""
    if entry % part or part % 4096:
        raise ValueError(f"parts ({part} B) must be 4 KiB multiples dividing the entry ({entry} B)")
    n = entry // part
    rng = random.Random(seed)
    configs: dict[str, list[list[tuple[int, int]]]] = {"whole": [[(0, 4096 + entry)]] * len(paths)}
    for k in range(1, n + 1):
        configs[f"rand {k}"] = [part_ranges(rng.sample(range(n), k), part) for _ in paths]
        start = [rng.randrange(n - k + 1) for _ in paths]
        configs[f"cont {k}"] = [[(4096 + s * part, k * part)] for s in start]
    samples: dict[str, list[float]] = {c: [] for c in configs}
    with RangeReader(paths, 4096 + entry, workers) as reader:
        reader.read(list(enumerate(configs["whole"])))  # untimed: threads and buffers
        order = list(configs)
        bar = tqdm(total=repeats * len(order), desc="disk: ranges", disable=not show_progress, leave=False)
        for _ in range(repeats):
            rng.shuffle(order)
            for c in order:
                idx = list(range(len(paths)))
                rng.shuffle(idx)
                samples[c].append(reader.read([(i, configs[c][i]) for i in idx]) / len(paths))
                bar.update()
        bar.close()
    rows = {c: {"s_per_entry": statistics.median(v), "samples": v,
                "ranges": statistics.fmean(len(r) for r in configs[c]),
                "bytes": statistics.fmean(sum(x[1] for x in r) for r in configs[c])} for c, v in samples.items()}
    return {"entry_bytes": entry, "part_bytes": part, "files": len(paths), "workers": workers, "repeats": repeats,
            "configs": rows, **fit_ranges(rows)}


def replay_reads(p: dict[str, Any], root: Path, *, workers: int, steps: int, repeats: int,
                 show_progress: bool = True) -> dict[str, Any]:
    """The recorded fetches of point ``p`` read for real: one file per stored (layer, block) (a 4 KiB header
    page and the joint entry's bytes), then, for ``steps`` recorded steps (from the second), each step's reads
    through a :class:`RangeReader` of ``workers`` threads, whole entries (header + payload, one read) against
    sector-major (row, head) parts (one read per run of selected parts), interleaved, ``repeats`` times; returns
    the median seconds per step of each and the bytes and reads per step."""
    sh, batch = p["shape"], p["batch"]
    recorded = p["steps"][1:1 + steps] or p["steps"][:steps]
    block = recorded[0][0].block_size
    part = 2 * block * sh["head_dim"] * sh["itemsize"]
    entry = batch * sh["kv_heads"] * part
    if part % 4096:
        raise ValueError(f"a (row, head) part of {part} bytes is not 4 KiB-aligned")
    blocks = {ls.layer: ls.context // block for layers in recorded for ls in layers}
    index = {(layer, j): i for i, (layer, j) in enumerate((lay, j) for lay, n in sorted(blocks.items()) for j in range(n))}
    paths = write_files(root, len(index), entry)
    plans: dict[str, list[list[tuple[int, list[tuple[int, int]]]]]] = {"whole": [], "parts": []}
    for layers in recorded:
        whole, parts = [], []
        for ls in layers:
            m = sector_mask(ls, block)
            for j in m.any(1).nonzero().flatten().tolist():
                whole.append((index[(ls.layer, j)], [(0, 4096 + entry)]))
                parts.append((index[(ls.layer, j)], part_ranges(m[j].nonzero().flatten().tolist(), part)))
        plans["whole"].append(whole)
        plans["parts"].append(parts)
    samples: dict[str, list[float]] = {k: [] for k in plans}
    try:
        with RangeReader(paths, 4096 + entry, workers) as reader:
            reader.read(plans["whole"][0][:64])  # untimed: threads and buffers
            bar = tqdm(total=repeats * steps * 2, desc="disk: replay", disable=not show_progress, leave=False)
            for r in range(repeats):
                for t in range(len(recorded)):
                    for name in (("whole", "parts") if (r + t) % 2 == 0 else ("parts", "whole")):
                        samples[name].append(reader.read(plans[name][t]))
                        bar.update()
            bar.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    out = {"point": {k: p[k] for k in ("name", "context", "batch", "budget")}, "steps": len(recorded),
           "repeats": repeats, "workers": workers, "files": len(paths), "entry_bytes": entry, "part_bytes": part,
           "entries_per_step": statistics.fmean(len(step) for step in plans["whole"])}
    for name, plan in plans.items():
        out[name] = {"ms_per_step": 1e3 * statistics.median(samples[name]), "samples_s": samples[name],
                     "reads_per_step": statistics.fmean(sum(len(r) for _, r in step) for step in plan),
                     "MiB_per_step": statistics.fmean(sum(x[1] for _, r in step for x in r) for step in plan) / MiB}
    out["ratio"] = out["parts"]["ms_per_step"] / out["whole"]["ms_per_step"]
    return out


def fit_ranges(rows: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Least squares of ``t = c0 + a_r * ranges + bytes / bw`` (per entry) in relative terms (each residual
    divided by ``t``).  Returns ``c0_s``, ``range_s``, ``bw_Bps`` and the relative error per configuration."""
    names = list(rows)
    t = torch.tensor([rows[c]["s_per_entry"] for c in names], dtype=torch.float64)
    x = torch.tensor([[1.0, rows[c]["ranges"], rows[c]["bytes"]] for c in names], dtype=torch.float64)
    sol = torch.linalg.lstsq(x / t.unsqueeze(1), torch.ones_like(t).unsqueeze(1)).solution.flatten()
    model = x @ sol
    err = ((model - t) / t).tolist()
    return {"c0_s": float(sol[0]), "range_s": float(sol[1]), "bw_Bps": 1.0 / float(sol[2]) if sol[2] > 0 else math.inf,
            "fit_rel_err": dict(zip(names, err)), "fit_max_abs_rel_err": max(abs(e) for e in err),
            "fit_rms_rel_err": math.sqrt(statistics.fmean(e * e for e in err))}


def measure_crc(entry: int, part: int, repeats: int = 200) -> dict[str, float]:
    """crc32c (the disk tier's) of one ``entry``-byte buffer against ``entry // part`` calls on its parts: the
    extra seconds per call (medians)."""
    from tiercache.tiers.disk import _crc32c

    crc = _crc32c()
    buf = memoryview(os.urandom(entry))
    n = entry // part
    one, many = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        crc(buf)
        one.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for i in range(n):
            crc(buf[i * part:(i + 1) * part])
        many.append(time.perf_counter() - t0)
    a, b = statistics.median(one), statistics.median(many)
    return {"whole_s": a, "parts_s": b, "parts": n, "per_call_s": max(0.0, (b - a) / (n - 1)) if n > 1 else 0.0}


def replay_target(spec: str, points: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The recorded point ``spec`` names (:attr:`Settings.replay`), ``None`` for ``"none"``; ``ValueError``
    when no recorded point matches."""
    spec = spec.strip().lower()
    if spec in ("", "none"):
        return None
    real = [p for p in points if "stage_runs" not in p] or points
    if spec == "auto":
        top = max(p["context"] * p["batch"] for p in real)
        return next(p for p in real if p["context"] * p["batch"] == top)
    try:
        c, b, f = spec.split("x")
        key = (int(c), int(b), float(f))
    except ValueError:
        raise ValueError(f"replay must be CONTEXTxBATCHxBUDGET (e.g. 8192x4x0.25), 'auto' or 'none', got {spec!r}") from None
    for p in real:
        if (p["context"], p["batch"]) == key[:2] and abs(p["budget"] - key[2]) < 1e-9:
            return p
    raise ValueError(f"replay point {spec!r} was not recorded")


# -- the synthetic point's real caches --------------------------------------------------------------------------
def stage_runs(model: Any, kv: list[tuple[torch.Tensor, torch.Tensor]], feed: torch.Tensor, budget: float,
               workdir: Path, warmup: int) -> dict[str, Any]:
    """Exact, fetch-every-step and attention-aware caches (``sparse_speed.build_cache``, cold: host 25 % of
    the KV, disk the rest with ``direct_io``) decoding ``feed`` teacher-forced, one at a time: per system the
    ms of each step after ``warmup`` and its per-stage seconds (``sparse_speed.step_record``: the cache's own
    ``stats()`` counters, ``stats()['sparse']`` for the sparse ones)."""
    import sparse_speed as sp
    from tiercache_llm.hf_kwargs import cache_kwargs

    out = {}
    for system in (sp.EXACT, sp.FETCH, sp.AWARE):
        cfg = sp.Config(system, None if system == sp.EXACT else budget, "cold")
        store = workdir / f"stage-{system}"
        cache = sp.build_cache(model, cfg, kv, sp.Settings(), store)
        rows = []
        try:
            with torch.no_grad():
                for t in range(feed.shape[1]):
                    before = cache.stats()
                    t0 = time.perf_counter()
                    model(input_ids=feed[:, t:t + 1], **cache_kwargs(cache, model), use_cache=True)
                    ms = 1e3 * (time.perf_counter() - t0)
                    rec = sp.step_record(before, cache.stats())
                    if t >= warmup:
                        rows.append({"ms": ms, "stages": rec["stages"], "host_bytes": rec["host_bytes"],
                                     "disk_bytes": rec["disk_bytes"]})
            last = cache.stats().get("sparse", {}).get("last_step", {})
        finally:
            cache.close()
            shutil.rmtree(store, ignore_errors=True)
        stages = sorted({k for r in rows for k in r["stages"]})
        out[system] = {"ms": statistics.median(r["ms"] for r in rows), "steps": rows,
                       "stages_ms": {k: 1e3 * statistics.median(r["stages"].get(k, 0.0) for r in rows) for k in stages},
                       "disk_MiB": statistics.median(r["disk_bytes"] for r in rows) / MiB,
                       "host_MiB": statistics.median(r["host_bytes"] for r in rows) / MiB,
                       "blocks_selected": last.get("blocks_selected"), "reuse_rate": last.get("reuse_rate")}
    return out


# -- the study ----------------------------------------------------------------------------------------------------
@dataclass
class Settings:
    model: str = "smollm2"
    contexts: tuple[int, ...] = (4096, 8192)
    batches: tuple[int, ...] = (1, 4)
    budgets: tuple[float, ...] = (0.25, 0.0625)
    steps: int = 16  # pool_replay's default: the same prefilled rows under --kv-dir
    synthetic: tuple[int, ...] = (16384,)
    synthetic_layers: int = 48
    synthetic_budget: float = 0.25
    synthetic_steps: int = 6
    stage_warmup: int = 2
    threads: int = 1
    pool_fraction: float = 0.25
    entry_kib: int = 384
    part_kib: int = 32
    micro_files: int = 768
    micro_repeats: int = 5
    # the point whose recorded steps are read for real: "CONTEXTxBATCHxBUDGET", "auto" (the largest context x
    # batch at the first budget) or "none"
    replay: str = "auto"
    replay_steps: int = 3
    replay_repeats: int = 3
    disk_mib: int = 32
    disk_repeats: int = 5
    read_batch: int = 256


def analyse_point(steps: list[list[fg.LayerStep]], shape: dict[str, int], batch: int, cost: Cost | None,
                  fraction: float) -> dict[str, Any]:
    """Per layout: per-step figures of every fetched entry and of Belady MIN's misses at ``fraction``."""
    out = {}
    replays: dict[int | None, tuple] = {}  # one replay per unit (both byte orders read the same sectors)
    for layout in LAYOUTS:
        per_step = [layout_step(layers, layout, shape, batch, cost) for layers in steps]
        g = None if layout.tokens is None else layout.sector_tokens(steps[0][0].block_size)
        if g not in replays:
            reqs, total = sector_requests(steps, g)
            missed: list[list[tuple]] = []
            pr.replay(reqs, int(fraction * total), "min", missed=missed)
            replays[g] = reqs, total, missed
        reqs, total, missed = replays[g]
        mins = priced_misses(missed, reqs, steps, layout, shape, batch, cost)
        out[layout.label] = {"layout": asdict(layout), "per_step": per_step, "min_per_step": mins, "units": total,
                             "capacity_units": int(fraction * total)}
    return out


def record_points(s: Settings, kv_dir: Path, show_progress: bool) -> dict[str, Any]:
    """The SmolLM2 (or tiny) points' recorded selections, checked against the caches' fetch and stats."""
    model, shape, prefill_s, inputs = pr.prose_points(s, kv_dir, show_progress)
    points = []
    with torch_threads(s.threads):
        bar = tqdm(total=len(s.contexts) * len(s.batches) * len(s.budgets), desc="decode points", disable=not show_progress)
        for context, batch, kv, feed in inputs:
            for budget in s.budgets:
                steps, _, secs, checked, _ = fg.checked_point(model, kv, feed, budget)
                points.append({"name": s.model, "context": context, "batch": batch, "budget": budget,
                               "seconds": secs, "checked": checked, "shape": shape, "steps": steps})
                bar.update()
            del kv
        bar.close()
    return {"points": points, "prefill_seconds": prefill_s}


def record_synthetic(s: Settings, workdir: Path, show_progress: bool) -> list[dict[str, Any]]:
    """The deep synthetic config (``sparse_speed.deep_model``, batch 1, random K/V) at each context: recorded
    selections (checked) and the real caches' per-stage times."""
    import sparse_speed as sp

    out = []
    for context in s.synthetic:
        deep = sp.deep_model(s.synthetic_layers, context + s.synthetic_steps + 8)
        cfg = deep.config
        shape = pr.kv_shape(deep)
        kv = sp.synthetic_kv(deep, context, seed=context)
        feed = torch.randint(3, cfg.vocab_size, (1, s.synthetic_steps), generator=torch.Generator().manual_seed(context))
        with torch_threads(s.threads):
            steps, _, secs, checked, _ = fg.checked_point(deep, kv, feed, s.synthetic_budget)
            stages = stage_runs(deep, kv, feed, s.synthetic_budget, workdir, min(s.stage_warmup, s.synthetic_steps - 1))
        out.append({"name": f"synthetic ({s.synthetic_layers} layers)", "context": context, "batch": 1,
                    "budget": s.synthetic_budget, "seconds": secs, "checked": checked, "shape": shape, "steps": steps,
                    "stage_runs": stages})
        del kv, deep
    return out


def summarise(points: list[dict[str, Any]], cost: Cost | None, fraction: float) -> list[dict[str, Any]]:
    rows = []
    for p in points:
        analysis = analyse_point(p["steps"], p["shape"], p["batch"], cost, fraction)
        p["analysis"] = analysis
        # exact mode's read of the whole KV per step, priced alike: its default block size's joint entries
        from tiercache_llm.kv_cache import default_block_size

        exact_block = default_block_size("exact")
        sh = p["shape"]
        exact_entries = statistics.fmean(sum(ls.context // exact_block for ls in layers) for layers in p["steps"])
        exact_bytes = exact_entries * 2 * p["batch"] * sh["kv_heads"] * exact_block * sh["head_dim"] * sh["itemsize"]
        exact_ms = 1e3 * (cost.entry_s * exact_entries + exact_bytes / cost.bw_Bps) if cost else None
        today = None
        for label, a in analysis.items():
            st, mins = a["per_step"], a["min_per_step"][1:] or a["min_per_step"]
            mean = lambda key, xs: statistics.fmean(x[key] for x in xs)  # noqa: E731
            full = mean("full_bytes", st)
            row = {"point": p["name"], "context": p["context"], "batch": p["batch"], "budget": p["budget"], "layout": label,
                   "entries": mean("entries", st), "sectors": mean("sectors", st), "ranges": mean("ranges", st),
                   "bytes": mean("bytes", st), "full_bytes": full, "x_full": mean("bytes", st) / full,
                   "whole_reads": mean("whole_reads", st),
                   "est_ms": 1e3 * mean("est_s", st) if cost else None,
                   "min_bytes": mean("bytes", mins), "min_x_full": mean("bytes", mins) / full,
                   "min_entries": mean("entries", mins), "min_ranges": mean("ranges", mins),
                   "min_est_ms": 1e3 * mean("est_s", mins) if cost else None,
                   "exact_entries": exact_entries, "exact_est_ms": exact_ms}
            if today is None:
                today = row
            for key in ("bytes", "est_ms", "min_bytes", "min_est_ms"):
                row[f"{key}_vs_today"] = row[key] / today[key] if row[key] is not None and today[key] else None
            rows.append(row)
    return rows


# -- output ------------------------------------------------------------------------------------------------------
def _ms(v: float | None) -> str:
    return "" if v is None else (f"{v:.0f}" if v >= 100 else f"{v:.3g}")


def _x(v: float | None) -> str:
    return "" if v is None else f"{v:.2f}x"


def table(rows: list[dict[str, Any]]) -> list[str]:
    out = ["| point | budget | layout | entries/step | ranges/step | MiB/step | ÷ full KV | est. ms/step (÷ today) | "
           "MIN misses ÷ full KV | MIN misses: MiB/step, ranges/step | MIN est. ms/step (÷ today's MIN) | "
           "exact's whole KV (its default blocks): est. ms/step |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['point']} {r['context'] // 1024}K x {r['batch']} | {fg.budget_label(r['budget'])} | {r['layout']} | "
                   f"{r['entries']:.0f} | {r['ranges']:.0f} | {r['bytes'] / MiB:.1f} | {r['x_full']:.3f} | "
                   f"{_ms(r['est_ms'])} ({_x(r['est_ms_vs_today'])}) | {r['min_x_full']:.3f} | "
                   f"{r['min_bytes'] / MiB:.1f}, {r['min_ranges']:.0f} | {_ms(r['min_est_ms'])} ({_x(r['min_est_ms_vs_today'])}) | "
                   f"{_ms(r['exact_est_ms'])} |")
    return out


def micro_table(micro: dict[str, Any]) -> list[str]:
    out = ["| read | ranges/entry | KiB/entry | µs/entry (median) | model µs | error | GiB/s |", "|---|---|---|---|---|---|---|"]
    for c, r in micro["configs"].items():
        m = micro["c0_s"] + micro["range_s"] * r["ranges"] + r["bytes"] / micro["bw_Bps"]
        out.append(f"| {c} | {r['ranges']:.2f} | {r['bytes'] / KiB:.0f} | {1e6 * r['s_per_entry']:.1f} | {1e6 * m:.1f} | "
                   f"{100 * micro['fit_rel_err'][c]:+.0f} % | {r['bytes'] / r['s_per_entry'] / GiB:.2f} |")
    return out


def stage_table(p: dict[str, Any]) -> list[str]:
    runs_ = p.get("stage_runs") or {}
    keys = [k for k in STAGES if any(k in r["stages_ms"] for r in runs_.values())]
    out = ["| system | ms/step | disk MiB/step | host MiB/step | blocks selected | " + " | ".join(STAGES[k] for k in keys) + " |",
           "|---|---|---|---|---|" + "---|" * len(keys)]
    for system, r in runs_.items():
        out.append(f"| {system} | {r['ms']:.0f} | {r['disk_MiB']:.0f} | {r['host_MiB']:.0f} | {r['blocks_selected'] or ''} | "
                   + " | ".join(f"{r['stages_ms'].get(k, 0):.1f}" for k in keys) + " |")
    return out


def write_results(doc: dict[str, Any], rows: list[dict[str, Any]], s: Settings, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    points = doc.pop("points_raw")
    doc["points"] = [{k: v for k, v in p.items() if k not in ("steps", "analysis")}
                     | {"analysis": {lab: {k: v for k, v in a.items()} for lab, a in p.get("analysis", {}).items()}}
                     for p in points]
    (out / f"{NAME}.json").write_text(json.dumps(doc, indent=1, default=str))
    meta, micro, store, crc = doc["meta"], doc.get("micro"), doc.get("store"), doc.get("crc")
    lines = [f"# Sector reads (model {s.model}, {meta['date_utc']} UTC)", "",
             f"`{' '.join(meta['argv'])}`; torch threads {s.threads}; load average at the start "
             f"{fg.load_text(meta.get('load_average'))}, at the end {fg.load_text(meta.get('load_average_end'))}; "
             f"{doc['seconds']:.0f} s (prefill {doc['prefill_seconds']:.0f} s).", "",
             "Selections recorded from fetch-every-step caches (checked against their fetch and `stats()` at every "
             "layer step); per step sums over layers, means over steps; a sector = g tokens of one (row, KV head), K "
             "and V; '(row, head) parts': g = the block. Sector layouts read each entry whole or by sectors, whichever "
             "the model prices lower. MIN: Belady with bypass, a pool of "
             f"{s.pool_fraction:g} of the stored KV holding the layout's units, misses over the steps after the first.", ""]
    if micro:
        lines += [f"Raw disk micro ({micro['files']} files of a 4 KiB header + {micro['entry_bytes'] // KiB} KiB, O_DIRECT, "
                  f"{micro['workers']} threads, `os.preadv` per range, medians of {micro['repeats']}, {doc['filesystem']}): "
                  f"**per range {1e6 * micro['range_s']:.1f} µs, per entry {1e6 * micro['c0_s']:.1f} µs, bw "
                  f"{micro['bw_Bps'] / GiB:.2f} GiB/s** (fit error max {100 * micro['fit_max_abs_rel_err']:.0f} %, RMS "
                  f"{100 * micro['fit_rms_rel_err']:.0f} %).", "", *micro_table(micro), ""]
    if crc:
        lines += [f"crc32c: {crc['parts']} parts of one entry {1e6 * crc['parts_s']:.1f} µs against {1e6 * crc['whole_s']:.1f} µs "
                  f"whole: **{1e6 * crc['per_call_s']:.2f} µs per extra call**.", ""]
    rp = doc.get("replay")
    if rp:
        pt = rp["point"]
        lines += [f"Recorded steps read for real ({pt['name']} {pt['context'] // 1024}K x {pt['batch']}, "
                  f"{fg.budget_label(pt['budget'])}: steps 2-{rp['steps'] + 1}, one file per stored block of "
                  f"{rp['entry_bytes'] // KiB} KiB + a header page, O_DIRECT, {rp['workers']} threads, interleaved, medians "
                  f"of {rp['repeats']} x {rp['steps']} step reads):", "",
                  "| reads | entries/step | reads/step | MiB/step | ms/step (measured) | ms/step (raw micro's model) |",
                  "|---|---|---|---|---|---|",
                  *[f"| {name} | {rp['entries_per_step']:.0f} | {rp[name]['reads_per_step']:.0f} | {rp[name]['MiB_per_step']:.0f} | "
                    f"{rp[name]['ms_per_step']:.0f} | {rp[name].get('model_ms', float('nan')):.0f} |" for name in ("whole", "parts")],
                  "", f"(row, head) parts ÷ whole entries, measured: **{rp['ratio']:.2f}x**.", ""]
    if store:
        lines += [f"Store (`BlockStore`, disk tier only, direct_io, `get_blocks` batches of {store['read_batch']}): **A = "
                  f"{1e6 * store['a_s']:.1f} µs per entry, bw = {store['bw_Bps'] / GiB:.2f} GiB/s** (fit error max "
                  f"{100 * store['fit_max_abs_rel_err']:.0f} %).", "", *fg.disk_table(store), ""]
    lines += ["## Per layout", "", *table(rows), ""]
    for p in points:
        if p.get("stage_runs"):
            lines += [f"## {p['name']} {p['context'] // 1024}K x 1: the real caches, cold (ms/step, stages ms/step)", "",
                      *stage_table(p), ""]
    (out / f"{NAME}.md").write_text("\n".join(lines))
    plot(rows, out / f"{NAME}.png")


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(dict.fromkeys((r["point"], r["context"], r["batch"], r["budget"]) for r in rows))
    labels = list(dict.fromkeys(r["layout"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    width = 0.8 / len(labels)
    for i, lab in enumerate(labels):
        xs = [j + i * width for j in range(len(keys))]
        got = {(r["point"], r["context"], r["batch"], r["budget"]): r for r in rows if r["layout"] == lab}
        axes[0].bar(xs, [got[k]["x_full"] for k in keys], width, label=lab, color=f"C{i}")
        axes[0].scatter(xs, [got[k]["min_x_full"] for k in keys], marker="_", s=80, color="k", zorder=3)
        if all(got[k]["est_ms_vs_today"] is not None for k in keys):
            axes[1].bar(xs, [got[k]["est_ms_vs_today"] for k in keys], width, label=lab, color=f"C{i}")
            axes[1].scatter(xs, [got[k]["min_est_ms_vs_today"] for k in keys], marker="_", s=80, color="k", zorder=3)
    names = [f"{'syn ' if not k[0].startswith(('smollm2', 'tiny')) else ''}{k[1] // 1024}K x{k[2]}\n{fg.budget_label(k[3])}"
             for k in keys]
    for ax in axes:
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))])
        ax.set_xticklabels(names, fontsize=7)
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_ylabel("bytes read per step ÷ stored KV (bars: fetch every step; ticks: MIN misses)")
    axes[1].set_ylabel("estimated ms/step ÷ whole entries' (bars: every fetch; ticks: MIN)")
    axes[1].axhline(1.0, color="k", linewidth=0.8)
    axes[0].legend(fontsize=7)
    fig.suptitle("Sector reads: bytes and estimated step time per layout")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--model", choices=("smollm2", "tiny"), default=None)
    p.add_argument("--contexts", type=lambda t: parse_ints(t, "--contexts"), default=None)
    p.add_argument("--batches", type=lambda t: parse_ints(t, "--batches"), default=None)
    p.add_argument("--budgets", type=lambda t: tuple(float(x) for x in t.split(",")), default=None,
                   help="fractions of the context, e.g. 0.25,0.0625")
    p.add_argument("--steps", type=int, default=None, help="decode steps per point (at least 2)")
    p.add_argument("--synthetic", default=None, help="contexts of the deep synthetic config (batch 1), or 'none'")
    p.add_argument("--synthetic-layers", type=int, default=None)
    p.add_argument("--synthetic-steps", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--pool-fraction", type=float, default=None)
    p.add_argument("--entry-kib", type=int, default=None)
    p.add_argument("--part-kib", type=int, default=None)
    p.add_argument("--micro-files", type=int, default=None)
    p.add_argument("--micro-repeats", type=int, default=None)
    p.add_argument("--replay", default=None, help="CONTEXTxBATCHxBUDGET of the point whose recorded steps are read "
                   "for real (whole entries against (row, head) parts), 'auto' (default: the largest) or 'none'")
    p.add_argument("--replay-steps", type=int, default=None)
    p.add_argument("--replay-repeats", type=int, default=None)
    p.add_argument("--disk-mib", type=int, default=None)
    p.add_argument("--disk-repeats", type=int, default=None)
    p.add_argument("--no-disk", action="store_true", help="skip the disk measurements (no time estimates)")
    p.add_argument("--kv-dir", type=Path, default=None, help="keep prefilled rows here for later runs (default: temporary)")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    s = Settings()
    for name in ("model", "contexts", "batches", "budgets", "steps", "synthetic_layers", "synthetic_steps", "threads",
                 "pool_fraction", "entry_kib", "part_kib", "micro_files", "micro_repeats", "disk_mib", "disk_repeats",
                 "replay", "replay_steps", "replay_repeats"):
        if getattr(args, name) is not None:
            setattr(s, name, getattr(args, name))
    if args.synthetic is not None:
        s.synthetic = () if args.synthetic.strip().lower() in ("none", "") else parse_ints(args.synthetic, "--synthetic")
    if s.steps < 2 or s.synthetic_steps < 2:
        p.error("--steps and --synthetic-steps must be at least 2")
    if not 0 <= s.pool_fraction <= 1:
        p.error("--pool-fraction must be in [0, 1]")
    if any(not 0 < b <= 1 for b in s.budgets):
        p.error("--budgets must be fractions in (0, 1]")
    if s.entry_kib % s.part_kib or s.part_kib % 4:
        p.error("--part-kib must be a multiple of 4 dividing --entry-kib")
    meta = machine_meta()
    show = not args.no_progress
    workdir = Path(tempfile.mkdtemp(prefix="sector_study-", dir=args.workdir))
    kv_dir = args.kv_dir or workdir / "kv"
    t0 = time.perf_counter()
    try:
        rec = record_points(s, kv_dir, show)
        points = rec["points"] + record_synthetic(s, workdir, show)
        micro = crc = store = cost = replay = None
        if not args.no_disk:
            from tiercache.tiers.disk import DIRECT_READ_THREADS

            paths = write_files(workdir / "micro", s.micro_files, s.entry_kib * KiB)
            micro = measure_ranges(paths, s.entry_kib * KiB, s.part_kib * KiB, workers=DIRECT_READ_THREADS,
                                   repeats=s.micro_repeats, show_progress=show)
            shutil.rmtree(workdir / "micro", ignore_errors=True)
            crc = measure_crc(s.entry_kib * KiB, s.part_kib * KiB)
            sizes = sorted({2 * p_["batch"] * p_["shape"]["kv_heads"] * p_["steps"][0][0].block_size
                            * p_["shape"]["head_dim"] * p_["shape"]["itemsize"] for p_ in points} | {s.entry_kib * KiB})
            with torch_threads(s.threads):
                store = fg.measure_disk(sizes, workdir, target_bytes=s.disk_mib * MiB, repeats=s.disk_repeats,
                                        read_batch=s.read_batch, show_progress=show)
            cost = Cost(store["a_s"], store["bw_Bps"], max(0.0, micro["range_s"]), crc["per_call_s"])
            target = replay_target(s.replay, points)
            if target is not None:
                replay = replay_reads(target, workdir / "replay", workers=DIRECT_READ_THREADS, steps=s.replay_steps,
                                      repeats=s.replay_repeats, show_progress=show)
                for name in ("whole", "parts"):  # the raw micro's model of the same reads
                    r = replay[name]
                    r["model_ms"] = 1e3 * (micro["c0_s"] * replay["entries_per_step"] + micro["range_s"]
                                           * r["reads_per_step"] + r["MiB_per_step"] * MiB / micro["bw_Bps"])
        rows = summarise(points, cost, s.pool_fraction)
        filesystem = filesystem_of(workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    meta["load_average_end"] = os.getloadavg()
    doc = {"name": NAME, "meta": meta, "settings": asdict(s), "layouts": [asdict(x) | {"label": x.label} for x in LAYOUTS],
           "micro": micro, "crc": crc, "store": store, "replay": replay, "cost": None if cost is None else asdict(cost),
           "filesystem": filesystem, "summary": rows, "prefill_seconds": rec["prefill_seconds"],
           "seconds": time.perf_counter() - t0, "points_raw": points}
    write_results(doc, rows, s, args.out)
    print("\n".join(table(rows)))
    print(f"wrote {args.out / NAME}.json / .md / .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
