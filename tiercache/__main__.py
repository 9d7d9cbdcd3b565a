"""``python -m tiercache demo``: fill a host tier and a disk tier with tensors and print what happened."""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch
from tqdm import tqdm

from . import Cache, format_size, parse_size


def demo(args: argparse.Namespace) -> int:
    value_bytes = parse_size(args.value_size, "--value-size")
    count = args.count
    with tempfile.TemporaryDirectory(prefix="tiercache-demo-") as tmp:
        path = args.path or f"{tmp}/store"
        print(f"tiercache demo: {count} values of {format_size(value_bytes)} into host={args.host}, "
              f"disk={args.disk} at {path}")
        with Cache(host=args.host, disk=args.disk, path=path, policy=args.policy) as cache:
            gen = torch.Generator().manual_seed(0)
            values = {}
            start = time.perf_counter()
            for i in tqdm(range(count), desc="put", unit="value"):
                values[i] = torch.randn(value_bytes // 4, generator=gen)
                cache.put(("demo", i), values[i])
            put_s = time.perf_counter() - start
            start = time.perf_counter()
            exact = missing = 0
            for i in tqdm(range(count), desc="get", unit="value"):
                try:
                    exact += torch.equal(cache.get(("demo", i)), values[i])
                except KeyError:
                    missing += 1
            get_s = time.perf_counter() - start
            stats = cache.stats()
        total = count * value_bytes
        print(f"\nput {format_size(total)} in {put_s:.2f} s, read back in {get_s:.2f} s: "
              f"{exact} bit-exact, {missing} evicted (disk full), {count - exact - missing} wrong")
        for name, tier in stats["tiers"].items():
            print(f"  {name:5s} {tier['entries']:5d} entries, {format_size(tier['used_bytes'])} of "
                  f"{format_size(tier['capacity_bytes'])}, hits {tier['hits']}, "
                  f"read {format_size(tier['bytes_read'])}, wrote {format_size(tier['bytes_written'])}")
        print(f"  moved between tiers: {stats['bytes_moved']}; evictions: {stats['evictions']}")
        if args.path:
            with Cache(host=args.host, disk=args.disk, path=path, policy=args.policy) as reopened:
                print(f"reopened {path}: {len(reopened)} entries persisted")
        if args.json:
            print(json.dumps(stats, indent=2))
        return 0 if exact + missing == count else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tiercache", description="tiercache command line")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="fill host and disk tiers and print per-tier stats")
    p.add_argument("--host", default="32MiB", help="host tier capacity (default 32MiB)")
    p.add_argument("--disk", default="256MiB", help="disk tier capacity (default 256MiB)")
    p.add_argument("--path", default=None, help="disk tier directory (default: a temporary directory)")
    p.add_argument("--value-size", default="1MiB", help="bytes per value (default 1MiB)")
    p.add_argument("--count", type=int, default=128, help="number of values (default 128)")
    p.add_argument("--policy", default="lru", choices=["lru", "lfu", "score"])
    p.add_argument("--json", action="store_true", help="also print the full stats() as JSON")
    p.set_defaults(func=demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
