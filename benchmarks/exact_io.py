"""The exact reader's disk reads against raw reads of the same bytes (issue 10 (2)'s baseline, settled).

    python benchmarks/exact_io.py                                   # SmolLM2's KV shape, 8K x 4, host 25 %
    python benchmarks/exact_io.py --context 4096 --batch 1 --host 16MiB
    python benchmarks/exact_io.py --quick                           # tiny sizes, seconds

One exact ``TieredKVCache`` (``direct_io``; host tier ``--host`` or ``--host-fraction`` of the KV, the rest on
a disk tier under ``--workdir``) is filled with random K/V of SmolLM2-135M's KV shape (30 layers, 3 KV heads,
head dim 64, float32; no model is run).  Then, in one process, ``--rounds`` rounds, the order of the
measurements rotated every round, each of:

- ``reader``: the reads of one exact decode step as the layer-ahead reader makes them: every layer in order,
  one ``BlockStore.get_blocks`` of its visible entries into its slices of a decode buffer (the same
  entries, order, sizes, destinations and disk-tier threads as the decode); bytes of both tiers.
- ``reader-disk``: the same, with only the entries the disk tier holds (the bytes the raw reads read).
- ``reader-disk-2-in-flight``: those reads with two layers in flight (each in a slot of its own), as a
  reader of two threads would make them: no barrier at the end of each layer's ``get_many``.
- ``raw-1`` / ``raw-N``: ``sparse_speed.read_in_decode_order``'s read: the chunk files of those disk
  entries, in the step's order, O_DIRECT, one ``preadv`` each into one page-aligned buffer, no checksum,
  1 worker and the disk tier's direct-read thread count ``N``.
- ``raw-1-shuffled``: the same files in a random order, 1 worker (does order matter?).
- ``walk-1`` / ``walk-4``: the baseline ``sparse_speed`` used before: every file under the store, in
  directory walk order, 1 and 4 workers.

With ``--breakdown`` also, 1 thread each, the disk entries of the layers the disk tier holds entirely:
``1t-whole`` (as raw-1), ``1t-hot`` (header, payload and tail in three buffers, the payload always into the
same region), ``1t-distinct`` (the payloads side by side in a layer-sized buffer: each entry's own memory,
contiguous), ``1t-strided`` (one ``preadv`` per chunk with the payload scattered into its block
slices of the decode buffer, as the tier does), ``1t-strided-crc`` (that plus the crc32c of every piece) and
``1t-tier`` (the disk tier's ``read_into`` with one thread): what each step of the tier's work costs.

Rates are GiB/s of the bytes each read delivers (payload bytes for the reader, file bytes for raw
reads), medians over the rounds; prints a table and the load average; ``--out`` writes ``exact_io.json``
and ``.md`` there.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import GiB, MiB, machine_meta  # noqa: E402
from sparse_speed import _raw_read, decode_read_order, raw_disk_bandwidth, reader_threads  # noqa: E402

LAYERS, KV_HEADS, HEAD_DIM = 30, 3, 64  # SmolLM2-135M's KV shape


def build(context: int, batch: int, host: str | None, host_fraction: float, root: Path, layers: int) -> Any:
    """An exact cold cache of ``layers`` layers of random K/V (``context`` tokens, ``batch`` rows)."""
    from transformers import LlamaConfig

    from tiercache.sizes import parse_size
    from tiercache_llm import TieredKVCache

    config = LlamaConfig(num_hidden_layers=layers, num_attention_heads=3 * KV_HEADS, num_key_value_heads=KV_HEADS,
                         hidden_size=3 * KV_HEADS * HEAD_DIM, head_dim=HEAD_DIM, intermediate_size=64, vocab_size=128)
    kv_bytes = layers * 2 * KV_HEADS * HEAD_DIM * 4 * context * batch
    host_bytes = parse_size(host) if host else max(64 * 1024, int(host_fraction * kv_bytes))
    cache = TieredKVCache(config, host=host_bytes, disk=2 * kv_bytes + (64 << 20), path=root, direct_io=True)
    gen = torch.Generator().manual_seed(0)
    for i in range(layers):
        shape = (batch, KV_HEADS, context, HEAD_DIM)
        cache.update(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen), i)
    return cache


def step_reads(cache: Any, disk_only: bool = False, slots: int = 1) -> list[tuple[list, list]]:
    """Per layer ``(keys, out tensors)`` of one decode step's reads, as ``TieredKVLayer.prefetch`` makes
    them (into the cache's decode buffer, the layers taking ``slots`` slots in turn; ``disk_only``: only
    the entries the disk tier holds)."""
    store, out = cache.store, []
    for layer in cache.layers:
        first, n, _ = layer._visible_blocks()
        bs = layer.block_size
        slot = len(out) % slots
        buf = cache.buffer.get(n * bs + layer._tail_len + 1, (layer._batch, *layer._shape_k),
                               (layer._batch, *layer._shape_v), layer.dtype, layer.device, bs, slot, joint=layer._joint)
        keys = layer._entries_from(first)
        dsts = buf.joint_blocks[:n] if layer._joint else buf.key_blocks[:n] + buf.value_blocks[:n]
        if disk_only:
            tiers = store.tiers_of(keys)
            keys, dsts = [k for k, t in zip(keys, tiers) if t == "disk"], [d for d, t in zip(dsts, tiers) if t == "disk"]
        if keys:
            out.append((keys, dsts))
    return out


def timed_reads(cache: Any, reads: list[tuple[list, list]], lanes: int = 1) -> float:
    """Bytes/s of ``reads`` through the store, one layer after another (as the reader thread does), or
    with ``lanes`` layers in flight (the reads must then use at least ``lanes + 1`` slots in turn: two reads
    into one destination at once would fail its checksums, and the tiercache would drop the entry)."""
    nbytes = sum(d.numel() * d.element_size() for _, dsts in reads for d in dsts)
    t0 = time.perf_counter()
    if lanes == 1:
        for keys, dsts in reads:
            cache.store.get_blocks(keys, out=dsts, background=True)
    else:
        with ThreadPoolExecutor(lanes) as pool:
            list(pool.map(lambda kd: cache.store.get_blocks(kd[0], out=kd[1], background=True), reads))
    return nbytes / (time.perf_counter() - t0)


def breakdown(cache: Any) -> dict[str, Callable[[], float]]:
    """The 1-thread measurements of ``--breakdown`` over the layers the disk tier holds entirely."""
    import crc32c

    from tiercache.buffers import aligned_empty
    from tiercache.tiers.disk import byte_parts

    reads = [(keys, dsts) for keys, dsts in step_reads(cache) if set(cache.store.tiers_of(keys)) == {"disk"}]
    if not reads:
        return {}
    tc = cache.store.cache
    disk = next(t for t in tc.tiers if hasattr(t, "_chunk_file"))
    with tc._lock:
        files = [[disk._chunk_file(tc._index[k].slot) for k in keys] for keys, _ in reads]
    parts = [[byte_parts(d, d.numel() * d.element_size()) for d in dsts] for _, dsts in reads]
    payload = max(d.numel() * d.element_size() for _, dsts in reads for d in dsts)
    side_by_side = memoryview(aligned_empty((max(len(d) for _, d in reads) * payload,), dtype=torch.uint8).numpy())
    hot = [[side_by_side[: d.numel() * d.element_size()]] for d in reads[0][1]]  # one region, used by every read
    size = max(os.path.getsize(f) for fs in files for f in fs)
    whole, head, tail = mmap.mmap(-1, -(-size // 4096) * 4096 + 4096), mmap.mmap(-1, 4096), mmap.mmap(-1, 3 * 4096)
    nbytes = sum(os.path.getsize(f) for fs in files for f in fs)

    def raw(kind: str) -> float:
        t0 = time.perf_counter()
        for fs, ps in zip(files, parts):
            for f, p in zip(fs, ps):
                fd = os.open(f, os.O_RDONLY | os.O_DIRECT)
                try:
                    if kind == "whole":
                        os.preadv(fd, [whole], 0)
                        continue
                    if kind == "distinct":  # contiguous payloads side by side in a layer-sized buffer
                        j = fs.index(f)
                        p = [side_by_side[j * payload : j * payload + sum(x.nbytes for x in p)]]
                    elif kind == "hot":
                        p = hot[0]
                    rest = os.path.getsize(f) - 4096 - sum(x.nbytes for x in p)
                    os.preadv(fd, [head, *p, memoryview(tail)[: rest + 4096]], 0)
                    if kind == "crc":
                        crc = crc32c.crc32c(head)
                        for x in p:
                            crc = crc32c.crc32c(x, crc)
                finally:
                    os.close(fd)
        return nbytes / (time.perf_counter() - t0)

    def tier() -> float:
        threads, disk._direct_threads = disk._direct_threads, 1
        try:
            return timed_reads(cache, reads)
        finally:
            disk._direct_threads = threads

    return {"1t-whole": lambda: raw("whole"), "1t-hot": lambda: raw("hot"), "1t-distinct": lambda: raw("distinct"),
            "1t-strided": lambda: raw("strided"),
            "1t-strided-crc": lambda: raw("crc"), "1t-tier": tier}


def run(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="tiercache-exact-io-", dir=args.workdir))
    cache = build(args.context, args.batch, args.host, args.host_fraction, root / "store", args.layers)
    try:
        files, disk_bytes, memory_bytes = decode_read_order(cache)
        if not files:
            raise SystemExit("the disk tier holds none of the step's entries: lower --host")
        n = reader_threads(cache)
        shuffled = random.Random(0).sample(files, len(files))
        whole, disk_only = step_reads(cache), step_reads(cache, disk_only=True)
        disk_slots = step_reads(cache, disk_only=True, slots=3)
        tests: dict[str, Callable[[], Any]] = {
            "reader": lambda: timed_reads(cache, whole),
            "reader-disk": lambda: timed_reads(cache, disk_only),
            "reader-disk-2-in-flight": lambda: timed_reads(cache, disk_slots, lanes=2),
            "raw": lambda: _raw_read(files, tuple(sorted({1, n}))),
            "raw-1-shuffled": lambda: _raw_read(shuffled, (1,)),
            "walk": lambda: raw_disk_bandwidth(root / "store"),
        }
        if args.breakdown:
            tests.update(breakdown(cache))
        timed_reads(cache, whole)  # the pools, descriptors and buffers exist before the first round
        samples: dict[str, list[float]] = {}
        names = list(tests)
        loads = []
        for rnd in range(args.rounds):
            for name in names[rnd % len(names):] + names[: rnd % len(names)]:
                got = tests[name]()
                if isinstance(got, dict):  # a raw read: one figure per worker count
                    if "error" in got:
                        raise SystemExit(f"O_DIRECT refused under {root}: {got['error']}")
                    label = "raw-1-shuffled" if name == "raw-1-shuffled" else f"{name}-{{}}"
                    for w, v in got["by_workers"].items():
                        samples.setdefault(label.format(w), []).append(v / GiB)
                else:
                    samples.setdefault(name, []).append(got / GiB)
            loads.append(os.getloadavg()[0])
            print(f"round {rnd + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in samples.items())
                  + f" GiB/s; load {loads[-1]:.1f}", flush=True)
        return {"context": args.context, "batch": args.batch, "layers": args.layers, "files": len(files),
                "disk_payload_bytes": disk_bytes, "memory_payload_bytes": memory_bytes, "reader_threads": n,
                "block_size": cache.layers[0].block_size, "entry_bytes": max(cache.store._live.values()),
                "medians_gib_s": {k: statistics.median(v) for k, v in samples.items()}, "samples_gib_s": samples,
                "load_average_per_round": loads}
    finally:
        cache.close()
        shutil.rmtree(root, ignore_errors=True)


def table(res: dict[str, Any]) -> str:
    med = res["medians_gib_s"]
    lines = [f"{res['context']} tokens x {res['batch']} rows, {res['layers']} layers, block {res['block_size']} "
             f"({res['entry_bytes'] / MiB:.2f} MiB entries): the step reads {res['disk_payload_bytes'] / MiB:.0f} MiB "
             f"from disk ({res['files']} files) and {res['memory_payload_bytes'] / MiB:.0f} MiB from memory; disk tier "
             f"direct-read threads {res['reader_threads']}; load average per round "
             + ", ".join(f"{x:.1f}" for x in res["load_average_per_round"]), "",
             "| read | GiB/s (median) | samples |", "|---|---|---|"]
    for k, v in med.items():
        lines.append(f"| {k} | {v:.2f} | {' '.join(f'{x:.2f}' for x in res['samples_gib_s'][k])} |")
    raw = max((v for k, v in med.items() if k.startswith("raw-") and "shuffled" not in k), default=None)
    if raw and "reader-disk" in med:
        lines += ["", f"reader-disk / best raw in the step's order = {med['reader-disk'] / raw:.2f}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--context", type=int, default=8191, help="tokens in the cache (default 8191)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--layers", type=int, default=LAYERS)
    parser.add_argument("--host", default=None, help="host tier budget, e.g. 16MiB (default: --host-fraction)")
    parser.add_argument("--host-fraction", type=float, default=0.25)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--breakdown", action="store_true", help="also the 1-thread breakdown of the tier's read")
    parser.add_argument("--quick", action="store_true", help="1024 tokens x 1 row, 4 layers, host 1MiB, 2 rounds")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch directory on the disk under test")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.context, args.batch, args.layers, args.host, args.rounds = 1024, 1, 4, "1MiB", 2
    for name in ("context", "batch", "layers", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be positive")
    torch.set_num_threads(1)
    res = run(args)
    text = table(res)
    print("\n" + text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        meta = machine_meta()
        meta.update(load_average_end=os.getloadavg(), argv=sys.argv[1:] if argv is None else argv)
        (args.out / "exact_io.json").write_text(json.dumps({"meta": meta, "result": res}, indent=1, default=str))
        (args.out / "exact_io.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
