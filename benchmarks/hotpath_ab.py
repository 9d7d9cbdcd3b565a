"""Old tree vs new tree on hot-path rows 2 to 6, in one process, interleaved, medians (wall and CPU).

    python benchmarks/hotpath_ab.py --old /work/main --new . --rows 3,5,6 --threads 1,2 --repeats 7
    python benchmarks/hotpath_ab.py --old /work/main --new . --rows 2 --threads 1 --repeats 9

Each tree's ``tiercache`` is imported under its own name (``tc_old`` / ``tc_new``), so both run in the same
process; the order of old / new (and of the baseline) alternates between repeats and so do thread counts.
Row 2 (the fixed cost of exact decode's warm fetch): one ``get_many`` of ``--keys`` joint K/V entries of
SmolLM2's block shape (``(2, 1, 3, 256, 64)`` float32, 384 KiB) into their slices of a decode buffer, as
``tiercache_llm`` calls it (``out=`` a list, the keys the very tuples it stored), from a host tier
(``host``) and from a disk-only store, page cache warm (``disk``), vs ``torch._foreach_copy_`` of the same
tensors into the same slices (the bytes alone; the difference is the call's overhead).  Row 3: single-key ``put`` and ``get`` of 20,000 4 KiB values (host tier) vs a dict of clones (row 4: 2,048 64 KiB values; every result kept; with ``--like-hotpath`` as ``hotpath.py`` times them, see ``row34_hotpath``).  Row 5: a
warm single-key ``get`` from a disk-only store vs open + readinto + close of same-size files (each result
and each buffer dropped at once, as in ``hotpath.py``).  Row 6: reopen of a 100K-entry store of 256-byte values
(warm; built once under ``--workdir``).  CPU time is ``time.thread_time`` (``process_time`` for row 6):
on a loaded machine it is the steadier figure."""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import MiB, host_ops, load_tree, read_files  # noqa: E402  (the benchmarks directory is not a package)


def timed(fn: Callable[[], None], count: int, cpu: Callable[[], float] = time.thread_time) -> tuple[float, float]:
    gc.collect()
    c0, t0 = cpu(), time.perf_counter()
    fn()
    return (time.perf_counter() - t0) / count, (cpu() - c0) / count


def row3(trees: dict[str, Any], size: int = 4096, count: int = 20_000) -> Callable[[str], dict[str, tuple[float, float]]]:
    """Single-key ``put`` and ``get`` of ``count`` values of ``size`` bytes (host tier, a fresh cache per
    sample) vs a dict of clones (row 3: 4 KiB; row 4: 64 KiB)."""
    values = [torch.randn(size // 4) for _ in range(count)]
    capacity = 2 * sum(v.nbytes for v in values) + 16 * MiB

    def run(name: str) -> dict[str, tuple[float, float]]:
        if name == "base":
            store: dict[int, torch.Tensor] = {}
            put = timed(lambda: [store.__setitem__(i, v.clone()) for i, v in enumerate(values)], len(values))
            get = timed(lambda: [store[i].clone() for i in range(len(values))], len(values))
            return {"put": put, "get": get}
        with trees[name].Cache(host=capacity, disk=None) as cache:
            put = timed(lambda: [cache.put(i, v) for i, v in enumerate(values)], len(values))
            get = timed(lambda: [cache.get(i) for i in range(len(values))], len(values))
        return {"put": put, "get": get}
    return run


def row34_hotpath(trees: dict[str, Any], size: int, count: int) -> Callable[[str], dict[str, tuple[float, float]]]:
    """Rows 3 and 4 as ``hotpath.py`` times them (``--like-hotpath``): per tree, in a fresh cache a ``put``
    loop then a ``get`` loop (each result dropped at once), then in a second fresh cache one ``put_many``
    and one ``get_many`` into ``out`` tensors allocated before the timing; the baseline a dict: ``clone``
    put, ``clone`` get (dropped), ``copy_`` into the same kind of ``out`` tensors (``hotpath.host_vs_dict``)."""
    gen = torch.Generator().manual_seed(0)
    values = [torch.randn(size // 4, generator=gen) for _ in range(count)]

    def run(name: str) -> dict[str, tuple[float, float]]:
        outs = [torch.zeros_like(v) for v in values]
        return host_ops(None if name == "base" else trees[name], values, outs, timed)
    return run


def row2(trees: dict[str, Any], workdir: Path, keys: int) -> Callable[[str], dict[str, tuple[float, float]]]:
    shape = (2, 1, 3, 256, 64)
    values = [torch.randn(shape) for _ in range(keys)]
    buffer = torch.zeros(2, 1, 3, keys * 256, 64)
    out = list(buffer.unflatten(3, (keys, 256)).unbind(3))
    names = [("kv", "bench", 0, "kv", i) for i in range(keys)]
    caches: dict[tuple[str, str], Any] = {}
    for name, tc in trees.items():
        caches[(name, "host")] = tc.Cache(host=keys * 512 * 1024 + 16 * MiB, disk=None)
        path = workdir / f"row2-{name}"
        shutil.rmtree(path, ignore_errors=True)
        caches[(name, "disk")] = tc.Cache(host=None, disk=keys * MiB + 64 * MiB, path=path)
    for (name, where), cache in caches.items():
        cache.put_many(zip(names, values))
        assert cache.tiers_of(names) == [where] * keys, (name, where)
    calls = max(20, 4000 // keys)

    def run(name: str) -> dict[str, tuple[float, float]]:
        label = f"{keys} x 384 KiB"
        if name == "base":
            copy = timed(lambda: [torch._foreach_copy_(out, values) for _ in range(calls)], calls)
            return {f"get_many host {label}": copy, f"get_many disk {label}": copy}
        result = {}
        for where in ("host", "disk"):
            cache = caches[(name, where)]
            cache.get_many(names, out=out)  # warm
            result[f"get_many {where} {label}"] = timed(
                lambda: [cache.get_many(names, out=out) for _ in range(calls)], calls)
        assert all(torch.equal(o, v) for o, v in zip(out, values))
        return result

    run.caches = caches  # type: ignore[attr-defined]
    return run


def row5(trees: dict[str, Any], workdir: Path, size: int, count: int) -> Callable[[str], dict[str, tuple[float, float]]]:
    values = [torch.randn(size // 4) for _ in range(count)]
    caches = {}
    for name, tree in trees.items():
        cache = tree.Cache(host=None, disk=4 * size * count + 64 * MiB, path=workdir / f"row5-{name}-{size}")
        cache.put_many(list(enumerate(values)))
        for i in range(count):
            cache.get(i)
        caches[name] = cache
    raw = workdir / f"row5-raw-{size}"
    raw.mkdir(exist_ok=True)
    paths = []
    for i in range(count):
        path = raw / str(i)
        path.write_bytes(os.urandom(size))
        paths.append(path)

    def run(name: str) -> dict[str, tuple[float, float]]:
        if name == "base":
            return {f"get {size // 1024} KiB": timed(lambda: read_files(paths, size, keep=False), count)}
        cache = caches[name]

        def get_each() -> None:
            for i in range(count):  # each result dropped at once, as the baseline drops each buffer
                cache.get(i)
        return {f"get {size // 1024} KiB": timed(get_each, count)}
    run.caches = caches  # type: ignore[attr-defined]
    return run


def row6(trees: dict[str, Any], workdir: Path, entries: int = 100_000) -> Callable[[str], dict[str, tuple[float, float]]]:
    path = workdir / f"row6-{entries}"
    capacity = entries * 8192 + 64 * MiB
    if not (path / "index.tc").exists():
        value = torch.arange(64, dtype=torch.float32)
        with trees["new"].Cache(host=None, disk=capacity, path=path) as cache:
            for start in range(0, entries, 1000):
                cache.put_many([(i, value) for i in range(start, min(entries, start + 1000))])

    def run(name: str) -> dict[str, tuple[float, float]]:
        if name == "base":
            return {}
        box: list[Any] = []
        result = timed(lambda: box.append(trees[name].Cache(host=None, disk=capacity, path=path)), 1, time.process_time)
        cache = box[0]
        if len(cache) != entries or cache.stats()["tiers"]["disk"].get("index") != "loaded":
            raise RuntimeError("the reopen did not load the index")
        cache.close()
        return {"reopen 100K warm": result}
    return run


def _p25(values: list[tuple[float, float]]) -> float:
    """The first quartile of the CPU times (on a shared machine noise only adds time)."""
    cpu = sorted(v[1] for v in values)
    return statistics.quantiles(cpu, n=4)[0] if len(cpu) > 1 else cpu[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", type=Path, required=True, help="root of the old tree (e.g. /work/main)")
    parser.add_argument("--new", type=Path, default=Path("."), help="root of the new tree (default: .)")
    parser.add_argument("--rows", default="3,5,6")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: a temp dir)")
    parser.add_argument("--keys", type=int, default=8, help="row 2: entries per get_many (default 8)")
    parser.add_argument("--like-hotpath", action="store_true",
                        help="rows 3 and 4 as hotpath.py times them: each get dropped at once, put_many and "
                             "get_many into out tensors beside them, dict baselines (see row34_hotpath)")
    args = parser.parse_args()
    sys.path.insert(0, str(args.new.resolve() / "kernels"))
    trees = {"old": load_tree("tc_old", args.old.resolve()), "new": load_tree("tc_new", args.new.resolve())}
    rows = [int(r) for r in args.rows.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tiercache-hotpath-ab-"))
    workdir.mkdir(parents=True, exist_ok=True)
    runs: list[tuple[int, Callable[[str], dict[str, tuple[float, float]]]]] = []
    if 2 in rows:
        runs.append((2, row2(trees, workdir, args.keys)))
    if 3 in rows:
        runs.append((3, row34_hotpath(trees, 4096, 20_000) if args.like_hotpath else row3(trees)))
    if 4 in rows:
        runs.append((4, row34_hotpath(trees, 64 * 1024, 2048) if args.like_hotpath else row3(trees, 64 * 1024, 2048)))
    if 5 in rows:
        runs += [(5, row5(trees, workdir, 4096, 8192)), (5, row5(trees, workdir, 65536, 1024))]
    if 6 in rows:
        runs.append((6, row6(trees, workdir)))
    samples: dict[tuple[int, str, str, int], list[tuple[float, float]]] = {}
    print(f"load average at the start: {os.getloadavg()}")
    try:
        for r in range(args.repeats):
            for count in (threads if r % 2 else threads[::-1]):
                torch.set_num_threads(count)
                order = ("old", "new", "base") if r % 3 == 0 else (("new", "base", "old") if r % 3 == 1
                                                                   else ("base", "old", "new"))
                for row, run in runs:
                    for name in order:
                        for op, sample in run(name).items():
                            samples.setdefault((row, op, name, count), []).append(sample)
    finally:
        for _, run in runs:
            for cache in getattr(run, "caches", {}).values():
                cache.close()
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"load average at the end: {os.getloadavg()}")
    print("row | op | threads | old wall (cpu) | new wall (cpu) | new/old cpu | baseline wall (cpu) | p25 cpu old / new / baseline")
    for (row, op, name, count), values in sorted(samples.items()):
        if name != "old":
            continue
        old = [statistics.median(v[i] for v in values) for i in (0, 1)]
        new = [statistics.median(v[i] for v in samples[(row, op, "new", count)]) for i in (0, 1)]
        base_values = samples.get((row, op, "base", count))
        base = "-"
        p25 = [_p25(samples[(row, op, name, count)]) for name in ("old", "new")]
        if base_values:
            b = [statistics.median(v[i] for v in base_values) for i in (0, 1)]
            base = f"{b[0] * 1e6:.2f} us ({b[1] * 1e6:.2f})" if row != 6 else f"{b[0]:.3f} s ({b[1]:.3f})"
            p25.append(_p25(base_values))
        scale = 1e6 if row != 6 else 1.0
        unit = (lambda x: f"{x * 1e6:.2f} us") if row != 6 else (lambda x: f"{x:.3f} s")
        print(f"{row} | {op} | {count} | {unit(old[0])} ({unit(old[1])}) | {unit(new[0])} ({unit(new[1])}) | "
              f"{new[1] / old[1]:.2f} | {base} | {' / '.join(f'{p * scale:.2f}' for p in p25)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
