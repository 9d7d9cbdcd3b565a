"""Direct disk reads into a decode buffer on 4 KiB pages against one on transparent huge pages, interleaved.

    python benchmarks/exact_hugepages.py --mib 384 --repeats 8 --threads 8

What ``decode_buffer.HUGE_PAGES`` changes for exact cold decode, without the model: a file of ``--mib`` MiB
(written once under ``--workdir``) is read with ``O_DIRECT`` in chunks of ``--chunk-kib`` (1.5 MiB: one
SmolLM2 joint K/V block entry at batch 4), each chunk's payload landing as ``--run-kib`` (64 KiB) runs at
the stride of a ``(2, batch, heads, capacity, head_dim)`` buffer's block slices (``--stride-kib``) with one
``preadv`` per chunk, then checksummed with crc32c per run (as ``DiskTier``'s direct reads do), by
``--threads`` threads taking the next chunk.  The destination is allocated once per kind with
``decode_buffer.huge_empty`` (huge pages) or ``tiercache.buffers.aligned_empty`` (4 KiB pages) and faulted
in before timing.  Per kind, the medians over ``--repeats`` interleaved passes (order alternated): wall ms,
the process's user and system CPU ms (``getrusage``), and GiB/s; and the ``AnonHugePages`` each buffer got.
The file is read past the page cache, so the figures are the device's and the kernel's.
"""

from __future__ import annotations

import argparse
import ctypes
import itertools
import json
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import MiB, median  # noqa: E402

from tiercache.buffers import aligned_empty  # noqa: E402
from tiercache_llm import decode_buffer  # noqa: E402


def anon_huge_kib() -> int | None:
    """``AnonHugePages`` of this process (KiB), ``None`` where ``/proc`` does not say."""
    try:
        text = Path("/proc/self/smaps_rollup").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return None


def layout(chunks: int, chunk: int, run: int, stride: int) -> tuple[int, list[list[int]]]:
    """``(buffer bytes, per chunk the byte offsets of its runs)``: chunk ``i``'s ``chunk // run`` runs start at
    ``i * run`` within rows ``stride`` bytes apart, as block ``i``'s rows lie in a decode buffer."""
    per = chunk // run
    rows = per
    offsets = [[r * stride + i * run for r in range(rows)] for i in range(chunks)]
    return rows * stride, offsets


def read_pass(path: str, out: torch.Tensor, offsets: list[list[int]], chunk: int, run: int, threads: int,
              crc: Any) -> tuple[float, float, float]:
    """One pass: every chunk read with O_DIRECT into its runs of ``out`` and checksummed; ``(wall s, user s,
    system s)`` of the process."""
    base = out.data_ptr()
    whole = memoryview((ctypes.c_char * out.nbytes).from_address(base)).cast("B")
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    taken = itertools.count()
    errors: list[BaseException] = []

    def work() -> None:
        try:
            while True:
                i = next(taken)
                if i >= len(offsets):
                    return
                parts = [whole[o : o + run] for o in offsets[i]]
                got = os.preadv(fd, parts, i * chunk)
                if got != chunk:
                    raise OSError(f"short read: {got} of {chunk} bytes")
                c = 0
                for part in parts:
                    c = crc(part, c)
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            errors.append(exc)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    try:
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    finally:
        os.close(fd)
    wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    if errors:
        raise errors[0]
    return wall, r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=384, help="bytes read per pass (MiB)")
    ap.add_argument("--chunk-kib", type=int, default=1536)
    ap.add_argument("--run-kib", type=int, default=64)
    ap.add_argument("--stride-kib", type=int, default=2048, help="bytes between a chunk's runs (a buffer row)")
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None, help="JSON file")
    a = ap.parse_args(argv)
    chunk, run = a.chunk_kib << 10, a.run_kib << 10
    if a.mib < 1 or chunk % run or run % 4096 or a.threads < 1 or a.repeats < 1:
        ap.error("--mib, --threads, --repeats must be positive; --chunk-kib a multiple of --run-kib, a multiple of 4")
    chunks = max(1, (a.mib * MiB) // chunk)
    stride = max(a.stride_kib << 10, chunks * run)  # every chunk's run fits in its row
    nbytes, offsets = layout(chunks, chunk, run, stride)
    import crc32c

    workdir = Path(tempfile.mkdtemp(prefix="tiercache-hugepages-", dir=a.workdir))
    try:
        path = str(workdir / "data")
        with open(path, "wb") as f:
            for _ in range(chunks):
                f.write(os.urandom(chunk))
            f.flush()
            os.fsync(f.fileno())
        try:
            os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
        except OSError as exc:
            print(f"O_DIRECT refused under {workdir}: {exc}")
            return 2
        kinds: dict[str, torch.Tensor] = {}
        huge_kib: dict[str, int | None] = {}
        for kind in ("4k", "huge"):
            before = anon_huge_kib()
            buf = (decode_buffer.huge_empty((nbytes,), torch.uint8, torch.device("cpu")) if kind == "huge"
                   else aligned_empty((nbytes,), dtype=torch.uint8))
            buf.fill_(0)  # faulted in before timing
            after = anon_huge_kib()
            huge_kib[kind] = None if before is None or after is None else after - before
            kinds[kind] = buf
        recs: dict[str, list[tuple[float, float, float]]] = {k: [] for k in kinds}
        for r in range(a.repeats):
            for kind in (("4k", "huge") if r % 2 == 0 else ("huge", "4k")):
                recs[kind].append(read_pass(path, kinds[kind], offsets, chunk, run, a.threads, crc32c.crc32c))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    load = os.getloadavg()
    total = chunks * chunk
    print(f"{total / MiB:.0f} MiB per pass in {chunks} chunks of {chunk >> 10} KiB ({chunk // run} runs of "
          f"{run >> 10} KiB), {a.threads} threads, {a.repeats} passes per kind; load {load[0]:.2f}")
    print("| buffer | wall ms | user ms | system ms | GiB/s | AnonHugePages MiB |")
    print("|---|---|---|---|---|---|")
    summary = {}
    for kind, rs in recs.items():
        wall, user, system = (median([x[j] for x in rs]) for j in range(3))
        summary[kind] = {"wall_ms": 1000 * wall, "user_ms": 1000 * user, "system_ms": 1000 * system,
                         "gib_s": total / wall / 2**30, "anon_huge_mib": None if huge_kib[kind] is None
                         else huge_kib[kind] / 1024, "samples_wall_ms": [round(1000 * x[0]) for x in rs]}
        row = summary[kind]
        print(f"| {kind} | {row['wall_ms']:.0f} | {row['user_ms']:.1f} | {row['system_ms']:.1f} | {row['gib_s']:.2f} | "
              + ("" if row["anon_huge_mib"] is None else f"{row['anon_huge_mib']:.0f}") + " |")
    if a.out:
        a.out.write_text(json.dumps({"argv": sys.argv, "load": load, "bytes": total, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
