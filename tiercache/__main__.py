"""``python -m tiercache``: ``demo`` fills a host tier and a disk tier with tensors and prints what
happened; ``gc PATH`` reclaims the entries of dead owners of a store (see :mod:`tiercache.owners`).

Errors are one line on stderr; exit codes follow argparse: 2 for a bad argument, 1 for a failure while
running, 130 for Ctrl-C.  ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from . import Cache, format_size
from ._cli import OneLineParser, UsageError, int_arg, run_guarded, size_arg
from .owners import reclaim

PROG = "python -m tiercache"
DTYPE = torch.float32
_SEED = 0


def _value(i: int, numel: int) -> torch.Tensor:
    """Value number ``i`` of the demo: regenerated from its own seed when verifying, so the demo keeps no
    copy of what it stored (memory stays flat for any ``--count``)."""
    return torch.randn(numel, generator=torch.Generator().manual_seed(_SEED * 1_000_003 + i), dtype=DTYPE)


def _open_cache(args: argparse.Namespace, path: str | None, disk: int) -> Cache:
    try:
        return Cache(host=args.host, disk=disk or None, path=path, policy=args.policy)
    except (ValueError, TypeError) as exc:  # the options do not fit this path / these budgets
        raise UsageError(str(exc)) from exc


def demo(args: argparse.Namespace) -> int:
    value_bytes, count = args.value_size, args.count
    itemsize = DTYPE.itemsize
    if value_bytes < itemsize or value_bytes % itemsize:
        raise UsageError(
            f"--value-size must be a positive multiple of {itemsize} bytes (the values are {str(DTYPE)[6:]}), "
            f"got {value_bytes} B"
        )
    if args.disk == 0 and args.path is not None:
        raise UsageError("--path names the disk tier's folder, but --disk 0 disables the disk tier")
    if args.disk == 0 and args.host == 0:
        raise UsageError("--host 0 and --disk 0 leave no tier to store values in")
    if value_bytes > max(args.host, args.disk):
        raise UsageError(
            f"--value-size {format_size(value_bytes)} is larger than every tier (--host {format_size(args.host)}, "
            f"--disk {format_size(args.disk)})"
        )
    numel = value_bytes // itemsize
    with tempfile.TemporaryDirectory(prefix="tiercache-demo-") as tmp:
        path = None if args.disk == 0 else (args.path or f"{tmp}/store")
        with _open_cache(args, path, args.disk) as cache:
            tiers = ", ".join(
                f"{name}={format_size(size) if size else 'off'}" for name, size in (("host", args.host), ("disk", args.disk))
            )
            print(f"tiercache demo: {count} values of {format_size(value_bytes)} into {tiers}"
                  + (f" at {path}" if path else ""), flush=True)
            start = time.perf_counter()
            for i in tqdm(range(count), desc="put", unit="value", disable=args.no_progress):
                cache.put(("demo", i), _value(i, numel))
            put_s = time.perf_counter() - start
            start = time.perf_counter()
            exact = missing = 0
            for i in tqdm(range(count), desc="get", unit="value", disable=args.no_progress):
                try:
                    got = cache.get(("demo", i))
                except KeyError:
                    missing += 1
                    continue
                exact += torch.equal(got, _value(i, numel))
            get_s = time.perf_counter() - start
            stats = cache.stats()
        total = count * value_bytes
        print(f"\nput {format_size(total)} in {put_s:.2f} s, read back in {get_s:.2f} s: "
              f"{exact} bit-exact, {missing} evicted (tiers full), {count - exact - missing} wrong")
        for name, tier in stats["tiers"].items():
            print(f"  {name:5s} {tier['entries']:5d} entries, {format_size(tier['used_bytes'])} of "
                  f"{format_size(tier['capacity_bytes'])}, hits {tier['hits']}, "
                  f"read {format_size(tier['bytes_read'])}, wrote {format_size(tier['bytes_written'])}")
        moved = ", ".join(f"{k} {format_size(v)}" for k, v in stats["bytes_moved"].items()) or "none"
        print(f"  moved between tiers: {moved}; evictions: {stats['evictions']}")
        if args.path:
            with _open_cache(args, path, args.disk) as reopened:
                print(f"reopened {path}: {len(reopened)} entries persisted")
        if args.json:
            print(json.dumps(stats, indent=2))
        return 0 if exact + missing == count else 1


def _store_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                st = os.stat(os.path.join(root, name))
            except OSError:
                continue
            total += max(st.st_size, st.st_blocks * 512)
    return total


def gc(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if not path.exists():
        raise UsageError(f"{path} does not exist")
    if not path.is_dir():
        raise UsageError(f"{path} is not a folder")
    if not (path / "zarr.json").is_file():
        raise UsageError(f"{path} is not a tiercache store (no zarr.json)")
    # Budget: generous enough never to shed an entry on open (the store's budget is not recorded).
    disk = args.disk if args.disk else 2 * _store_bytes(path) + 2**30
    with _open_cache(argparse.Namespace(host=0, policy="lru"), str(path), disk) as cache:
        report = reclaim(cache, path)
        left = len(cache)
    for problem in report.problems:
        print(f"{PROG} gc: warning: unreadable owner record {problem}")
    kept = []
    if report.kept_alive:
        kept.append(f"{report.kept_alive} live owner{'s' * (report.kept_alive != 1)}")
    if report.kept_persistent:
        kept.append(f"{report.kept_persistent} persistent owner{'s' * (report.kept_persistent != 1)}")
    n = len(report.owners)
    print(f"{path}: reclaimed {report.entries} entr{'y' if report.entries == 1 else 'ies'} "
          f"({format_size(report.bytes_freed)}) of {n} dead owner{'s' * (n != 1)}; {left} entries remain"
          + (f"; kept {' and '.join(kept)}" if kept else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog=PROG, description="tiercache command line")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="fill host and disk tiers and print per-tier stats")
    p.add_argument("--host", type=size_arg(), default="32MiB", help="host tier capacity, 0 disables (default 32MiB)")
    p.add_argument("--disk", type=size_arg(), default="256MiB",
                   help="disk tier capacity, 0 disables it (then give no --path) (default 256MiB)")
    p.add_argument("--path", default=None, help="disk tier directory (default: a temporary directory, removed after)")
    p.add_argument("--value-size", type=size_arg(allow_zero=False), default="1MiB",
                   help="bytes per value, a multiple of 4 (float32) (default 1MiB)")
    p.add_argument("--count", type=int_arg(1), default=128, help="number of values (default 128)")
    p.add_argument("--policy", default="lru", choices=["lru", "lfu", "score"])
    p.add_argument("--json", action="store_true", help="also print the full stats() as JSON")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show Python tracebacks for errors")
    p.set_defaults(func=demo)
    g = sub.add_parser(
        "gc", help="reclaim entries of dead owners in a store",
        description="Deletes the entries of every dead ephemeral owner recorded in the store at PATH (for "
        "example the KV blocks of a `python -m tiercache_llm demo --path PATH` run that was killed) and prints "
        "what it reclaimed. Needs the store to be closed (fails if another program has it open).",
    )
    g.add_argument("path", metavar="PATH", help="the store's folder (the path= given to tiercache.Cache)")
    g.add_argument("--disk", type=size_arg(), default=0,
                   help="disk budget to open the store with (default: twice the store's size on disk plus 1 GiB)")
    g.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show Python tracebacks for errors")
    g.set_defaults(func=gc)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_guarded(f"{PROG} {args.command}", args.debug, lambda: args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
