"""Old tree vs new tree: the CPU time of one warm disk ``get_many`` of exact decode's shape, many short
alternating samples in one process.

    python benchmarks/hotpath_getmany_ab.py --old /work/main --new . --keys 3 --samples 40
    python benchmarks/hotpath_getmany_ab.py --old /work/main --new . --keys 8 --parts --threads 2

Each tree's ``tiercache`` is imported under its own name (as ``hotpath_ab.py`` does).  Each keeps a
disk-only store of ``--keys`` joint K/V entries of SmolLM2's block shape (``(2, 1, 3, 256, 64)`` float32,
384 KiB), page cache warm, read with ``get_many(keys, out=[...])`` into their block slices of a decode
buffer, as ``tiercache_llm`` reads a layer (1K context: 3 blocks per layer); with ``--contiguous`` into separate
contiguous tensors instead (as the sparse pipeline's slots), with ``--tokens`` another block size.  The disk tier's read pool is
off (``spare_cpus`` fixed at 0), so a sample is the calling thread's own work; torch runs ``--threads``
intra-op threads (default 1).  A sample is ``--calls``
calls timed with ``time.thread_time``; old and new alternate sample by sample (the order flips every
sample), so drift and neighbours hit both alike.  Beside them, interleaved the same way, ``floor``: the new
tree's chunks of those entries read on held descriptors with one ``preadv`` each (payload straight into the
slices) and checksummed, with no bookkeeping (what a verified read of the format costs from Python; the
difference to ``new`` is the call's own work); with ``--parts`` also ``old:facade``, ``old:setup``,
``new:facade`` and ``new:setup``, each tree's call with its disk reads stubbed out (see :func:`stubbed`).  Prints min / 25th percentile /
median CPU µs per call of each and the load average: per-call costs of a few µs against ~100 µs of copies
and checksums need many samples; the low percentiles are the least disturbed by other work on the machine.
"""

from __future__ import annotations

import argparse
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
from _common import MiB  # noqa: E402  (the benchmarks directory is not a package)
from hotpath_ab import load_tree  # noqa: E402


def chunk_floor(tree: Any, cache: Any, names: list, out: list[torch.Tensor]) -> tuple[Callable[[], None],
                                                                                 Callable[[], None]]:
    """The floor of the same call: the new tree's chunk files of ``names`` read on descriptors held open, each
    with one ``preadv`` (the header page and the tail into reused buffers, the payload straight into its
    slice's runs of ``out``) and a crc32c pass over all of it, with no lookup, pin, check or count (private
    attributes: a diagnostic).  Returns the step and a function that closes the descriptors."""
    import crc32c

    disk = sys.modules[f"{tree.__name__}.tiers.disk"]
    tier = cache.tiers[0]
    slots = [cache._index[name].slot for name in names]  # noqa: SLF001
    fds = [os.open(tier.chunk_path(slot), os.O_RDONLY) for slot in slots]
    parts = [disk.byte_parts(dst, slot.nbytes) for dst, slot in zip(out, slots)]
    head = bytearray(disk.HEADER_BYTES)
    tails = [memoryview(bytearray(tier.chunk_bytes(slot) - disk.HEADER_BYTES - slot.nbytes)) for slot in slots]
    crc = crc32c.crc32c

    def floor() -> None:
        for fd, views, tail in zip(fds, parts, tails):
            os.preadv(fd, [head, *views, tail], 0)
            value = crc(head, 0, 0)
            for view in views:
                value = crc(view, value, 0)
            crc(tail[: -disk.CRC_BYTES], value, 0)

    def close() -> None:
        for fd in fds:
            os.close(fd)

    return floor, close


def stubbed(tree: Any, cache: Any, names: list, out: list[torch.Tensor],
            label: str = "new") -> dict[str, Callable[[], None]]:
    """A tree's call with parts of its disk read replaced by no-ops for the call (the class attribute is
    put back after it): ``LABEL:facade``, ``DiskTier.read_into`` stubbed (lookup, pins, destination checks,
    counts, unpin: the facade alone); ``LABEL:setup``, ``DiskTier._read_buffered`` stubbed (the facade plus
    ``read_into``'s set-up: byte views of the destinations, descriptors taken and given back).  So ``new -
    new:setup - floor`` is the read loop's own work beyond the floor's.  Nothing is read: a diagnostic."""
    tier_class = sys.modules[f"{tree.__name__}.tiers.disk"].DiskTier

    def without(attribute: str) -> Callable[[], None]:
        original = tier_class.__dict__[attribute]

        def run() -> None:
            setattr(tier_class, attribute, lambda *args, **kwargs: None)
            try:
                cache.get_many(names, out=out)
            finally:
                setattr(tier_class, attribute, original)
        return run

    return {f"{label}:facade": without("read_into"), f"{label}:setup": without("_read_buffered")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", type=Path, required=True, help="root of the old tree (e.g. /work/main)")
    parser.add_argument("--new", type=Path, default=Path("."), help="root of the new tree (default: .)")
    parser.add_argument("--keys", type=int, default=3, help="entries per get_many (default 3: a 1K layer)")
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--calls", type=int, default=200, help="calls per sample")
    parser.add_argument("--contiguous", action="store_true",
                        help="read into separate contiguous tensors (as the sparse pipeline's slots) instead of "
                             "block slices of one decode buffer")
    parser.add_argument("--tokens", type=int, default=256,
                        help="tokens per block (default 256, exact decode's; the entry is (2, 1, 3, TOKENS, 64) "
                             "float32)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1; the disk reads themselves make no torch copy)")
    parser.add_argument("--parts", action="store_true",
                        help="also time each tree's call with its disk reads stubbed out (see the module doc)")
    args = parser.parse_args(argv)
    if args.keys < 1 or args.samples < 1 or args.calls < 1 or args.tokens < 1 or args.threads < 1:
        parser.error("--keys, --samples, --calls, --tokens and --threads must be positive")
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(args.new.resolve() / "kernels"))
    trees = {"old": load_tree("tc_old", args.old.resolve()), "new": load_tree("tc_new", args.new.resolve())}
    for tree in trees.values():
        sys.modules[f"{tree.__name__}.tiers.disk"].spare_cpus = lambda: 0
    tokens, n = args.tokens, args.keys
    shape = (2, 1, 3, tokens, 64)
    values = [torch.randn(shape) for _ in range(n)]
    if args.contiguous:
        out = [torch.zeros(shape) for _ in range(n)]
    else:
        buffer = torch.zeros(2, 1, 3, n * tokens + 64, 64)  # room beyond the blocks, like a decode buffer's tail
        out = list(buffer[:, :, :, : n * tokens].unflatten(3, (n, tokens)).unbind(3))
    names = [("kv", "bench", 0, "kv", i) for i in range(n)]
    workdir = Path(tempfile.mkdtemp(prefix="tiercache-getmany-ab-"))
    caches = {}
    try:
        for name, tree in trees.items():
            cache = caches[name] = tree.Cache(host=None, disk=n * MiB + 64 * MiB, path=workdir / name)
            cache.put_many(zip(names, values))
            cache.get_many(names, out=out)  # warm
        if not all(torch.equal(o, v) for o, v in zip(out, values)):
            raise AssertionError("get_many returned other bytes than were put")
        floor, close_floor = chunk_floor(trees["new"], caches["new"], names, out)
        runs = {name: (lambda cache=cache: cache.get_many(names, out=out)) for name, cache in caches.items()}
        runs["floor"] = floor
        if args.parts:  # both trees' facades and set-ups, so the per-entry Python of the two compares alone
            for label in ("old", "new"):
                runs.update(stubbed(trees[label], caches[label], names, out, label))
        load = os.getloadavg()
        samples: dict[str, list[float]] = {name: [] for name in runs}
        try:
            for s in range(args.samples):
                for name in (list(runs) if s % 2 else list(runs)[::-1]):
                    run = runs[name]
                    start = time.thread_time()
                    for _ in range(args.calls):
                        run()
                    samples[name].append(1e6 * (time.thread_time() - start) / args.calls)
        finally:
            close_floor()
    finally:
        for cache in caches.values():
            cache.close()
        shutil.rmtree(workdir, ignore_errors=True)
    where = "separate contiguous tensors" if args.contiguous else "decode-buffer slices"
    threads = f"{args.threads} torch thread{'s' if args.threads > 1 else ''}"
    print(f"get_many of {n} x {values[0].nbytes >> 10} KiB warm disk entries into {where}, {threads}, "
          f"no read pool; "
          f"{args.samples} samples of {args.calls} calls; load average {load[0]:.2f} at the start, "
          f"{os.getloadavg()[0]:.2f} at the end")
    for name, values_ in samples.items():  # floor: the same chunks read and checksummed with no bookkeeping
        ordered = sorted(values_)
        print(f"{name}: CPU us per call min {ordered[0]:.1f}, p25 {ordered[len(ordered) // 4]:.1f}, "
              f"median {statistics.median(ordered):.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
