"""Ranged (sector) reads vs whole-entry reads through ``Cache.get_many``, cold ``O_DIRECT`` (CPU).

A disk-only cache (``direct_io=True``, so every read goes to the device, past the page cache) holds
``--count`` entries shaped like the sector study's joint KV block: float32 ``--shape`` (default
``(4, 3, 2, 128, 64)`` = 768 KiB: 4 rows x 3 KV heads, K and V, 128 tokens, head dim 64), whose
``rows x heads`` = 12 *parts* of 64 KiB each are contiguous in C order (sector-major).  Each pass reads every
entry once, in ``get_many`` batches of ``--batch`` keys into reused contiguous destinations:

- ``whole``: ``get_many(keys, out=outs)``, the whole value (one verified read per entry);
- ``k=K``: ``get_many(keys, out=outs, ranges=...)`` with, per entry, K of the 12 parts picked at random
  (sorted; adjacent picks make one run of sectors), read by sectors and verified per sector.

With ``--sectors S1,S2,...`` (``disk_sector_bytes``; default 65536) there is one store per sector size, each
holding the same values, and every variant runs on each.  All variants of all stores run in one process,
interleaved pass by pass (the order rotates each repeat), ``--repeats`` times; the figures are medians of ms
per entry, and each ranged variant's ratio to ``whole`` of the same store (median of the per-repeat
ratios).  The load average is printed at the start and the end.  ``--buffered`` reads through
the page cache instead (warm after the first pass: a CPU figure, not a device one).

    python benchmarks/disk_ranges.py --out benchmarks/results
    python benchmarks/disk_ranges.py --count 64 --repeats 2 --ks 1,6 --out /tmp/r   # quick
    python benchmarks/disk_ranges.py --sectors 4096,16384,65536 --ks 1,3,6,12      # sector sizes

Writes ``disk_ranges.json``, ``disk_ranges.md`` and ``disk_ranges.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_meta  # noqa: E402  (the benchmarks directory is not a package)

from tiercache import Cache  # noqa: E402


def part_ranges(picks: list[int], part_bytes: int) -> list[tuple[int, int]]:
    """Byte ranges of the sorted part indices ``picks`` (adjacent parts merged into one range)."""
    out: list[tuple[int, int]] = []
    for p in sorted(picks):
        lo, hi = p * part_bytes, (p + 1) * part_bytes
        if out and out[-1][1] == lo:
            out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out


def aligned_empty(shape: tuple[int, ...]) -> torch.Tensor:
    """A float32 tensor of ``shape`` starting at a page boundary (``torch.empty`` gives 64-byte alignment)."""
    nbytes = 4 * torch.Size(shape).numel()
    raw = torch.empty(nbytes + 4096, dtype=torch.uint8)
    at = -raw.data_ptr() % 4096
    return raw[at : at + nbytes].view(torch.float32).view(shape)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=256, help="entries per store (default 256 = 192 MiB)")
    ap.add_argument("--shape", default="4,3,2,128,64", help="float32 value shape; parts = prod(shape[:2])")
    ap.add_argument("--ks", default="1,3,6,9,12", help="parts read per entry, comma-separated")
    ap.add_argument("--batch", type=int, default=64, help="keys per get_many call")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sectors", default="65536", help="disk_sector_bytes, comma-separated: one store each")
    ap.add_argument("--buffered", action="store_true", help="buffered reads (page cache) instead of O_DIRECT")
    ap.add_argument("--path", default=None, help="store folder (default: a temporary one under /var/tmp)")
    ap.add_argument("--out", default=None, help="folder for disk_ranges.{json,md,png}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--aligned", action="store_true",
                    help="page-aligned destinations (direct reads land in them without a bounce copy)")
    args = ap.parse_args(argv)

    torch.set_num_threads(1)
    shape = tuple(int(x) for x in args.shape.split(","))
    ks = [int(k) for k in args.ks.split(",")]
    parts = shape[0] * shape[1]
    if any(not 1 <= k <= parts for k in ks):
        raise SystemExit(f"--ks must lie in 1..{parts}")
    value_bytes = 4 * torch.Size(shape).numel()
    part_bytes = value_bytes // parts
    meta = machine_meta()
    load_start = os.getloadavg()
    print(f"load average at start: {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}")
    rng = random.Random(args.seed)
    sectors = [int(x) for x in args.sectors.split(",")]
    tmp = tempfile.TemporaryDirectory(dir="/var/tmp") if args.path is None else None
    root = Path(args.path) if args.path else Path(tmp.name)  # type: ignore[union-attr]
    caches = {sector: Cache(host=None, disk=args.count * (value_bytes + 8192) + (1 << 20),
                            path=str(root / f"store{sector}"), direct_io=not args.buffered,
                            disk_sector_bytes=sector, io_threads=4)
              for sector in sectors}
    try:
        direct = all(c.stats()["tiers"]["disk"]["direct_io"] for c in caches.values())
        print(f"{args.count} entries of float32 {shape} ({value_bytes >> 10} KiB, {parts} parts of "
              f"{part_bytes >> 10} KiB) per store, sectors of {[s >> 10 for s in sectors]} KiB, get_many batches of "
              f"{args.batch}, direct_io={direct}, {'page-aligned' if args.aligned else 'torch.empty'} destinations, "
              "1 torch thread")
        gen = torch.Generator().manual_seed(args.seed)
        keys = list(range(args.count))
        for key in keys:
            value = torch.randn(shape, generator=gen)
            for cache in caches.values():  # written alternately: neither store is the one written last
                cache.put(key, value)
        outs = [aligned_empty(shape) if args.aligned else torch.empty(shape) for _ in range(args.batch)]
        batches = [keys[i : i + args.batch] for i in range(0, len(keys), args.batch)]
        variants = [(sector, kind) for sector in sectors for kind in ["whole"] + [f"k={k}" for k in ks]]
        times: dict[tuple[int, str], list[float]] = {v: [] for v in variants}
        bytes_read: dict[tuple[int, str], int] = {}

        def run(variant: tuple[int, str]) -> float:
            sector, kind = variant
            cache = caches[sector]
            if kind == "whole":
                plans = [None] * len(batches)
            else:
                k = int(kind[2:])
                plans = [[part_ranges(rng.sample(range(parts), k), part_bytes) for _ in batch] for batch in batches]
            before = cache.stats()["tiers"]["disk"]["bytes_read"]
            start = time.perf_counter()
            for batch, plan in zip(batches, plans):
                if plan is None:
                    cache.get_many(batch, out=outs[: len(batch)])
                else:
                    cache.get_many(batch, out=outs[: len(batch)], ranges=plan)
            spent = time.perf_counter() - start
            bytes_read[variant] = cache.stats()["tiers"]["disk"]["bytes_read"] - before
            return spent

        for variant in variants:  # warm-up pass of each (descriptors opened, buffers made)
            run(variant)
        for r in range(args.repeats):
            order = variants[r % len(variants):] + variants[: r % len(variants)]
            for variant in order:
                times[variant].append(run(variant))
        load_end = os.getloadavg()
    finally:
        for cache in caches.values():
            cache.close()
        if tmp is not None:
            tmp.cleanup()

    rows = []
    for variant in variants:
        sector, kind = variant
        ms = [t * 1e3 / args.count for t in times[variant]]
        ratios = [t / w for t, w in zip(times[variant], times[(sector, "whole")])]
        rows.append({
            "sector_bytes": sector, "variant": kind, "k": None if kind == "whole" else int(kind[2:]),
            "ms_per_entry_median": statistics.median(ms), "ms_per_entry": ms,
            "ratio_to_whole_median": statistics.median(ratios), "ratios": ratios,
            "bytes_read_per_entry": bytes_read[variant] / args.count,
        })
    print(f"{'sector':>7} {'variant':>8} {'ms/entry':>9} {'ratio':>6} {'KiB read/entry':>15}")
    for row in rows:
        print(f"{row['sector_bytes'] >> 10:>6}K {row['variant']:>8} {row['ms_per_entry_median']:9.3f} "
              f"{row['ratio_to_whole_median']:6.2f} {row['bytes_read_per_entry'] / 1024:15.0f}")
    print(f"load average at end: {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        doc = {"meta": {**meta, "load_average_start": load_start, "load_average_end": load_end},
               "settings": {**vars(args), "shape": list(shape), "direct_io": direct, "value_bytes": value_bytes,
                            "part_bytes": part_bytes},
               "rows": rows}
        (out / "disk_ranges.json").write_text(json.dumps(doc, indent=2))
        lines = [
            "# Ranged (sector) reads vs whole entries, `Cache.get_many`",
            "",
            f"`{' '.join(sys.argv)}`; {args.count} entries of float32 {shape}, {parts} parts of "
            f"{part_bytes >> 10} KiB, sectors {[s >> 10 for s in sectors]} KiB, batches of {args.batch}, "
            f"direct_io={direct}, {'page-aligned' if args.aligned else 'torch.empty'} destinations; load average {load_start[0]:.2f} -> {load_end[0]:.2f}; medians of "
            f"{args.repeats} interleaved repeats.",
            "",
            "| sector | read | ms / entry | ratio to whole | KiB read / entry |",
            "|---|---|---|---|---|",
        ]
        for row in rows:
            label = "whole" if row["k"] is None else f"{row['k']} of {parts} parts"
            lines.append(f"| {row['sector_bytes'] >> 10} KiB | {label} | {row['ms_per_entry_median']:.3f} | {row['ratio_to_whole_median']:.2f} | "
                         f"{row['bytes_read_per_entry'] / 1024:.0f} |")
        (out / "disk_ranges.md").write_text("\n".join(lines) + "\n")
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for sector in sectors:
            ranged = [row for row in rows if row["k"] is not None and row["sector_bytes"] == sector]
            whole = next(row for row in rows if row["k"] is None and row["sector_bytes"] == sector)
            line = ax.plot([row["k"] for row in ranged], [row["ms_per_entry_median"] for row in ranged], "o-",
                           label=f"ranged, {sector >> 10} KiB sectors")[0]
            ax.axhline(whole["ms_per_entry_median"], color=line.get_color(), ls="--", alpha=0.6,
                       label=f"whole entries ({sector >> 10} KiB store)")
        ax.set_xlabel(f"parts read of {parts}")
        ax.set_ylabel("ms per entry (median)")
        ax.set_title(f"{'cold O_DIRECT' if direct else 'buffered'} reads, {value_bytes >> 10} KiB entries")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "disk_ranges.png", dpi=110)
        plt.close(fig)
    return 0


if __name__ == "__main__":
    sys.exit(main())
