"""Storage microbenchmark (CPU): put/get throughput of the host and disk tiers against raw baselines.

For each value size (16 KiB … 16 MiB) it measures, in the same run and on the same bytes:

* host tier ``Cache.put`` / ``Cache.get`` vs a plain tensor copy (``dst.copy_(src)`` into preallocated
  memory for put, ``src.clone()`` for get);
* disk tier ``Cache.put`` / ``Cache.get`` vs a plain file write (open, write, close, one file per value)
  and a plain file read of the same files.

Every figure is the median of ``--repeats`` runs over ``--total`` bytes of values.  Both disk paths run
against the page cache in the same state (freshly written files), so the ratio compares software
overhead plus checksum cost, not the device.  Writes JSON, a markdown table and a plot to ``--out``.

    python benchmarks/storage.py --out benchmarks/results
    python benchmarks/storage.py --quick --out /tmp/storage   # small sizes and totals, 1 repeat (seconds)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import drop_page_cache  # noqa: E402  (the benchmarks directory is not a package)

import tiercache  # noqa: E402
from tiercache.sizes import format_size, parse_size  # noqa: E402

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
DEFAULT_SIZES = [16 * KiB, 64 * KiB, 256 * KiB, 1 * MiB, 4 * MiB, 16 * MiB]
DEFAULT_TOTAL, DEFAULT_REPEATS = "128MiB", 5
QUICK_SIZES, QUICK_TOTAL, QUICK_REPEATS = [16 * KiB, 256 * KiB, 1 * MiB], "8MiB", 1


def _values(size: int, total: int) -> list[torch.Tensor]:
    count = max(4, total // size)
    gen = torch.Generator().manual_seed(size)
    return [torch.randint(0, 255, (size,), dtype=torch.uint8, generator=gen) for _ in range(count)]


def _rate(nbytes: int, seconds: float) -> float:
    return nbytes / GiB / seconds


def bench_host(values: list[torch.Tensor]) -> dict[str, float]:
    nbytes = sum(v.numel() for v in values)
    capacity = 2 * nbytes + 64 * MiB  # buddy slots round up to powers of two
    with tiercache.Cache(host=capacity) as cache:
        start = time.perf_counter()
        for i, v in enumerate(values):
            cache.put(i, v)
        put = time.perf_counter() - start
        start = time.perf_counter()
        for i in range(len(values)):
            cache.get(i)
        get = time.perf_counter() - start
    arena = torch.empty(nbytes, dtype=torch.uint8)
    start = time.perf_counter()
    offset = 0
    for v in values:
        arena[offset : offset + v.numel()].copy_(v)
        offset += v.numel()
    raw_put = time.perf_counter() - start
    start = time.perf_counter()
    offset = 0
    for v in values:
        arena[offset : offset + v.numel()].clone()
        offset += v.numel()
    raw_get = time.perf_counter() - start
    return {"put": _rate(nbytes, put), "get": _rate(nbytes, get),
            "raw_put": _rate(nbytes, raw_put), "raw_get": _rate(nbytes, raw_get)}


def _drop_page_cache(root: Path) -> None:
    """Write back (whole-system ``sync``) and evict ``root``'s files from the page cache so the next read
    hits the device."""
    drop_page_cache(root, sync_all=True)


def _read_raw(paths: list[Path], sizes: list[int]) -> None:
    for path, size in zip(paths, sizes):
        with open(path, "rb", buffering=0) as f:
            out = torch.empty(size, dtype=torch.uint8)
            f.readinto(memoryview(out.numpy()))


def bench_disk(values: list[torch.Tensor], workdir: Path, raw_first: bool = False) -> dict[str, float]:
    """Puts (page cache absorbs them, as it does for the raw writes; ``put_synced`` also waits for the
    ``sync`` that writes them to the device), then cold gets (files evicted from
    the page cache first) and warm gets, each against the raw equivalent on the same bytes.  Each put
    phase starts after a ``sync`` so neither side pays for the other's write-back; ``raw_first`` flips
    which side writes first (``run`` alternates it between repeats)."""
    nbytes = sum(v.numel() for v in values)
    path = workdir / "cache"
    raw_dir = workdir / "raw"
    shutil.rmtree(path, ignore_errors=True)
    shutil.rmtree(raw_dir, ignore_errors=True)
    raw_dir.mkdir(parents=True)
    arrays = [v.numpy() for v in values]
    raw_paths = [raw_dir / str(i) for i in range(len(values))]
    sizes = [a.nbytes for a in arrays]
    times: dict[str, float] = {}
    with tiercache.Cache(host=None, disk=2 * nbytes + 64 * MiB, path=path) as cache:
        def tier_put() -> None:
            os.sync()
            start = time.perf_counter()
            for i, v in enumerate(values):
                cache.put(i, v)
            times["put"] = time.perf_counter() - start
            os.sync()
            times["put_synced"] = time.perf_counter() - start

        def raw_put() -> None:
            os.sync()
            start = time.perf_counter()
            for p, a in zip(raw_paths, arrays):
                with open(p, "wb") as f:
                    f.write(a)
            times["raw_put"] = time.perf_counter() - start
            os.sync()
            times["raw_put_synced"] = time.perf_counter() - start

        for phase in ((raw_put, tier_put) if raw_first else (tier_put, raw_put)):
            phase()
        for label in ("cold", "warm"):
            if label == "cold":
                _drop_page_cache(path)
            start = time.perf_counter()
            for i in range(len(values)):
                cache.get(i)
            times[f"get_{label}"] = time.perf_counter() - start
            if label == "cold":
                _drop_page_cache(raw_dir)
            start = time.perf_counter()
            _read_raw(raw_paths, sizes)
            times[f"raw_get_{label}"] = time.perf_counter() - start
    shutil.rmtree(path, ignore_errors=True)
    shutil.rmtree(raw_dir, ignore_errors=True)
    return {k: _rate(nbytes, v) for k, v in times.items()}


def run(sizes: list[int], total: int, repeats: int, workdir: Path) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    jobs = [(tier, size) for size in sizes for tier in ("host", "disk")]
    for tier, size in tqdm(jobs, desc="storage benchmark", unit="case"):
        values = _values(size, total)
        samples = [bench_host(values) if tier == "host" else bench_disk(values, workdir, raw_first=r % 2 == 1)
                   for r in range(repeats)]
        median = {k: statistics.median(s[k] for s in samples) for k in samples[0]}
        row: dict[str, object] = {"tier": tier, "value_bytes": size, "values": len(values), "repeats": repeats}
        row["samples_gib_s"] = samples  # every repeat, to show the spread behind each median
        for op in [k for k in median if not k.startswith("raw_")]:
            row[f"{op}_gib_s"] = median[op]
            row[f"raw_{op}_gib_s"] = median[f"raw_{op}"]
            row[f"{op}_ratio"] = median[op] / median[f"raw_{op}"]
        rows.append(row)
    return rows


def write_results(rows: list[dict[str, object]], meta: dict[str, object], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "storage.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    lines = [
        "# Storage microbenchmark (CPU)", "",
        f"`{meta['command']}` on {meta['machine']} ({meta['cpus']} CPUs), {meta['date']}.",
        "Throughput in GiB/s, median of repeats; ratio = tier / raw baseline measured in the same run.",
        "Disk `get cold` evicts both the chunk files and the raw files from the page cache first",
        "(`posix_fadvise(DONTNEED)` after `sync`); `get warm` reads them from the page cache.",
        "Goal: host tier ≥ 0.80 of raw copy for values ≥ 1 MiB; disk tier ≥ 0.80 of raw file I/O.", "",
        "| tier | value | op | tier GiB/s | raw GiB/s | ratio | goal met |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        applies = r["tier"] == "disk" or int(r["value_bytes"]) >= MiB  # type: ignore[arg-type]
        for op in [k[: -len("_ratio")] for k in r if k.endswith("_ratio")]:
            ratio = float(r[f"{op}_ratio"])  # type: ignore[arg-type]
            met = ("yes" if ratio >= 0.8 else "no") if applies else "n/a"
            lines.append(
                f"| {r['tier']} | {format_size(int(r['value_bytes']))} | {op.replace('_', ' ')} | "  # type: ignore[arg-type]
                f"{float(r[f'{op}_gib_s']):.2f} | {float(r[f'raw_{op}_gib_s']):.2f} | {ratio:.2f} | {met} |"  # type: ignore[arg-type]
            )
    (out / "storage.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, tier in zip(axes, ("host", "disk")):
        tier_rows = [r for r in rows if r["tier"] == tier]
        if not tier_rows:
            continue
        xs = [int(r["value_bytes"]) / KiB for r in tier_rows]  # type: ignore[arg-type]
        ops = [k[: -len("_ratio")] for k in tier_rows[0] if k.endswith("_ratio")]
        for n, op in enumerate(ops):
            line, = ax.plot(xs, [float(r[f"{op}_gib_s"]) for r in tier_rows], "o-", label=f"tier {op}")  # type: ignore[arg-type]
            ax.plot(xs, [float(r[f"raw_{op}_gib_s"]) for r in tier_rows], "s--", color=line.get_color(),  # type: ignore[arg-type]
                    label=f"raw {op}", alpha=0.7)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("value size (KiB)")
        ax.set_ylabel("GiB/s")
        ax.set_title(f"{tier} tier (solid) vs raw baseline (dashed)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "storage.png", dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="results directory (default benchmarks/results; with --quick a temp directory, so a "
                             "smoke run never overwrites the committed results)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke-sized run: sizes 16KiB,256KiB,1MiB, {QUICK_TOTAL} per case, {QUICK_REPEATS} repeat "
                             "(explicit --sizes/--total/--repeats still win)")
    parser.add_argument("--sizes", default=None,
                        help="comma-separated value sizes (bytes or '64KiB'; default 16KiB … 16MiB)")
    parser.add_argument("--total", default=None, help=f"bytes of values per size and run (default {DEFAULT_TOTAL})")
    parser.add_argument("--repeats", type=int, default=None, help=f"default {DEFAULT_REPEATS}")
    parser.add_argument("--workdir", type=Path, default=None, help="directory for disk files (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = Path(tempfile.gettempdir()) / "tiercache-storage-quick" if args.quick else Path("benchmarks/results")
    if args.sizes is None:
        args.sizes = ",".join(str(s) for s in (QUICK_SIZES if args.quick else DEFAULT_SIZES))
    if args.total is None:
        args.total = QUICK_TOTAL if args.quick else DEFAULT_TOTAL
    if args.repeats is None:
        args.repeats = QUICK_REPEATS if args.quick else DEFAULT_REPEATS
    sizes = [parse_size(s.strip(), "--sizes") for s in args.sizes.split(",") if s.strip()]
    total = parse_size(args.total, "--total")
    if args.repeats < 1 or not sizes or total <= 0:
        parser.error("--repeats, --sizes and --total must be positive")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tiercache-bench-"))
    try:
        rows = run(sizes, total, args.repeats, workdir)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    meta = {
        "command": " ".join(["python", "benchmarks/storage.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
        "torch": torch.__version__, "tiercache": tiercache.__version__,
        "zarr": __import__("zarr").__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "total_bytes_per_case": total, "disk_note": "page cache warm for both tier and raw file I/O",
    }
    write_results(rows, meta, args.out)
    print((args.out / "storage.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
