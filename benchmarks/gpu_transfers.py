"""Storage microbenchmarks on the GPU machine: every figure beside the raw yardstick it is judged by,
measured in the same run.

    python benchmarks/gpu_transfers.py --out benchmarks/results

writes ``gpu_transfers.json`` (all figures, GPU name, library versions), ``gpu_transfers.md`` (figure,
target, measured, yardstick, ratio, pass/fail) and ``gpu_transfers.png``.  Without CUDA it exits with
status 2.  GPU times come from CUDA events on the stream doing the work (medians after warm-ups; for the
batched gather/scatter a spin kernel queued first keeps the host's launch work out of the GPU figure);
"end-to-end" figures are host wall clocks including the Python launch overhead.

Figures (targets from the issue):
- host->GPU gather of 2048 scattered 64 KiB blocks (random order, pinned host arena) >= 45 GiB/s;
  yardsticks: one large pinned copy of the same bytes, 2048 per-block copies, one pageable copy;
- block-size sweep 16 KiB - 1 MiB (same 128 MiB per batch);
- GPU->host batched demotion (scatter into the pinned arena) of the same >= 45 GiB/s;
- disk->GPU read of 1 GiB of blocks (cache's verified staged path, and kvikio when installed) >= 90% of
  a raw O_DIRECT sequential read of a plain 1 GiB file; page cache dropped per file (fadvise);
- prefetch beside a compute kernel: kernel slowed < 10%, transfer >= 80% of its alone speed;
- ``Cache.get`` latency of one 64 KiB block, GPU-resident and host-resident (reported, no target).
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

GIB = float(1 << 30)
KIB = 1 << 10
MIB = 1 << 20


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__,
                                  "cuda_runtime": torch.version.cuda}
    for name in ("cupy", "kvikio", "zarr", "numcodecs", "crc32c", "tiercache"):
        try:
            module = __import__(name)
            out[name] = getattr(module, "__version__", "unknown")
        except Exception:
            out[name] = None
    return out


HIDE_LAUNCH_CYCLES = 50_000_000
"""GPU clock cycles (about 25-35 ms) of a spin kernel queued ahead of a timed call (``hide_launch``)."""


def _median_cuda(fn: Callable[[], Any], stream: torch.cuda.Stream, *, warmup: int = 3, iters: int = 10,
                 hide_launch: bool = False) -> float:
    """Median seconds of ``fn`` between events recorded on ``stream`` around it.

    Events on an idle stream also time the host's work between them: the start event fires at once and
    the copy starts only when ``fn`` has validated its arguments and launched.  ``hide_launch`` queues a
    spin kernel on ``stream`` first, so the start event fires after the host has enqueued the copy and
    the figure is the GPU's time alone (for the batched gather/scatter, whose host cost is reported
    separately as the wall-clock figure)."""
    times = []
    for i in range(warmup + iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if hide_launch:
            with torch.cuda.stream(stream):
                torch.cuda._sleep(HIDE_LAUNCH_CYCLES)
        start.record(stream)
        fn()
        end.record(stream)
        end.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def _median_wall(fn: Callable[[], Any], *, warmup: int = 3, iters: int = 10) -> float:
    times = []
    for i in range(warmup + iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


class Report:
    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.sweep: list[dict[str, Any]] = []
        self.notes: list[str] = []

    def add(self, name: str, measured: float, unit: str, *, target: str | None = None, passed: bool | None = None,
            yardstick: str | None = None, ratio: float | None = None, **extra: Any) -> None:
        self.rows.append({"figure": name, "measured": round(measured, 3), "unit": unit, "target": target,
                          "pass": passed, "yardstick": yardstick, "ratio_to_yardstick": None if ratio is None else round(ratio, 3),
                          **extra})


def bench_host_gpu(report: Report, engine: Any, n: int, block: int, rng: random.Random, *, record: bool) -> dict[str, float]:
    """Gather n scattered blocks host->GPU and scatter them back; returns GiB/s figures."""
    total = n * block
    arena = torch.randint(0, 256, (total + block,), dtype=torch.uint8).pin_memory()
    order = list(range(n))
    rng.shuffle(order)
    offsets = [i * block for i in order]
    sizes = [block] * n
    out = torch.empty(total, dtype=torch.uint8, device="cuda")
    stream = engine.stream
    gather_s = _median_cuda(lambda: engine.gather([arena], [0] * n, offsets, sizes, out), stream, hide_launch=True)
    gather_wall = _median_wall(lambda: engine.gather([arena], [0] * n, offsets, sizes, out).wait())
    expected = torch.cat([arena[o : o + block] for o in offsets[:8]])
    assert torch.equal(out[: 8 * block].cpu(), expected), "gather produced wrong bytes"
    scatter_s = _median_cuda(lambda: engine.scatter(out, None, sizes, [arena], [0] * n, offsets), stream,
                             hide_launch=True)
    current = torch.cuda.current_stream()
    bulk_h2d = _median_cuda(lambda: out.copy_(arena[:total], non_blocking=True), current)
    bulk_d2h = _median_cuda(lambda: arena[:total].copy_(out, non_blocking=True), current)

    def per_block() -> None:
        for i, o in enumerate(offsets):
            out[i * block : (i + 1) * block].copy_(arena[o : o + block], non_blocking=True)

    per_block_s = _median_cuda(per_block, current, warmup=1, iters=5)
    figures = {
        "gather": total / GIB / gather_s, "gather_wall": total / GIB / gather_wall, "scatter": total / GIB / scatter_s,
        "bulk_h2d": total / GIB / bulk_h2d, "bulk_d2h": total / GIB / bulk_d2h, "per_block": total / GIB / per_block_s,
    }
    report.sweep.append({"block_bytes": block, "blocks": n, **{k: round(v, 2) for k, v in figures.items()}})
    if record:
        pageable = torch.randint(0, 256, (total,), dtype=torch.uint8)
        pageable_s = _median_cuda(lambda: out.copy_(pageable), current)
        report.add("yardstick: one pinned host->GPU copy, 128 MiB", figures["bulk_h2d"], "GiB/s")
        report.add("yardstick: one pinned GPU->host copy, 128 MiB", figures["bulk_d2h"], "GiB/s")
        report.add(f"yardstick: {n} separate {block // KIB} KiB pinned copies", figures["per_block"], "GiB/s")
        report.add("yardstick: one pageable host->GPU copy, 128 MiB", total / GIB / pageable_s, "GiB/s")
        report.add(f"host->GPU gather, {n} x {block // KIB} KiB scattered (one kernel)", figures["gather"], "GiB/s",
                   target=">= 45 GiB/s", passed=figures["gather"] >= 45, yardstick="one pinned host->GPU copy",
                   ratio=figures["gather"] / figures["bulk_h2d"], speedup_vs_per_block=round(figures["gather"] / figures["per_block"], 2))
        report.add(f"host->GPU gather end-to-end (host wall clock incl. launch), {n} x {block // KIB} KiB",
                   figures["gather_wall"], "GiB/s", yardstick="one pinned host->GPU copy",
                   ratio=figures["gather_wall"] / figures["bulk_h2d"])
        report.add(f"GPU->host batched demotion, {n} x {block // KIB} KiB scattered (one kernel)", figures["scatter"],
                   "GiB/s", target=">= 45 GiB/s", passed=figures["scatter"] >= 45, yardstick="one pinned GPU->host copy",
                   ratio=figures["scatter"] / figures["bulk_d2h"])
    return figures


def _drop_cache(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def bench_disk(report: Report, workdir: Path, engine: Any) -> None:
    import tiercache
    from tiercache.transfer import kvikio_available, kvikio_read_payload

    block, count = MIB, 1024  # 1 GiB of 1 MiB blocks
    total = block * count
    plain = workdir / "plain.bin"
    chunk = 16 * MIB
    buf = mmap.mmap(-1, chunk)  # page-aligned, as O_DIRECT needs
    with open(plain, "wb") as f:
        for _ in range(total // chunk):
            f.write(os.urandom(chunk))
        f.flush()
        os.fsync(f.fileno())

    def raw_read() -> float:
        _drop_cache(plain)
        flags = os.O_RDONLY | getattr(os, "O_DIRECT", 0)
        try:
            fd = os.open(plain, flags)
        except OSError:
            fd = os.open(plain, os.O_RDONLY)
        t0 = time.perf_counter()
        got = 0
        try:
            while got < total:
                n = os.preadv(fd, [buf], got)
                if n <= 0:
                    break
                got += n
        finally:
            os.close(fd)
        return total / GIB / (time.perf_counter() - t0)

    raw = statistics.median(raw_read() for _ in range(3))
    report.add("yardstick: raw sequential read of a plain 1 GiB file (O_DIRECT, 16 MiB reads)", raw, "GiB/s")

    cache = tiercache.Cache(host=None, disk=total * 2, path=workdir / "tc")
    payload = torch.randint(0, 256, (block,), dtype=torch.uint8)
    for i in range(count):
        payload[:8] = torch.tensor(list(i.to_bytes(8, "little")), dtype=torch.uint8)
        cache.put(i, payload)
    os.sync()
    keys = list(range(count))
    disk = cache.tiers[0]
    paths = [disk.chunk_path(cache._index[k].slot) for k in keys]
    out = torch.empty(total + count * 256, dtype=torch.uint8, device="cuda")

    def staged() -> float:
        for p in paths:
            _drop_cache(p)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        cache.get_many(keys, out=out)
        torch.cuda.synchronize()
        return total / GIB / (time.perf_counter() - t0)

    staged_rate = statistics.median(staged() for _ in range(3))
    report.add("disk->GPU 1 GiB of 1 MiB blocks: Cache.get_many (pinned staging, crc32c verified)", staged_rate, "GiB/s",
               target=">= 90% of raw read", passed=staged_rate >= 0.9 * raw, yardstick="raw O_DIRECT read",
               ratio=staged_rate / raw)
    if kvikio_available():
        import kvikio

        gpu = torch.empty(total, dtype=torch.uint8, device="cuda")

        def via_kvikio() -> float:
            for p in paths:
                _drop_cache(p)
            t0 = time.perf_counter()
            futures = [kvikio_read_payload(disk, cache._index[k].slot, gpu[i * block : (i + 1) * block])
                       for i, k in enumerate(keys)]
            for fut in futures:
                fut.get()
            torch.cuda.synchronize()
            return total / GIB / (time.perf_counter() - t0)

        rate = statistics.median(via_kvikio() for _ in range(3))
        mode = "compat" if kvikio.defaults.compat_mode() else "GDS"
        report.add(f"disk->GPU 1 GiB of 1 MiB blocks: kvikio CuFile.pread ({mode} mode, UNVERIFIED bytes)", rate, "GiB/s",
                   target=">= 90% of raw read", passed=rate >= 0.9 * raw, yardstick="raw O_DIRECT read", ratio=rate / raw)
    else:
        report.notes.append("disk->GPU via kvikio: not measured (kvikio is not installed; see docs/gpu.md)")
    cache.close()


def bench_overlap(report: Report, engine: Any) -> None:
    n, block = 2048, 64 * KIB
    total = n * block
    arena = torch.randint(0, 256, (total,), dtype=torch.uint8).pin_memory()
    offsets = [i * block for i in random.Random(1).sample(range(n), n)]
    out = torch.empty(total, dtype=torch.uint8, device="cuda")
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    compute_stream = torch.cuda.current_stream()
    reps = 8  # a batch of gathers long enough to span the compute

    def compute() -> None:
        for _ in range(6):
            torch.mm(a, a)

    def transfer() -> None:
        for _ in range(reps):
            engine.gather([arena], [0] * n, offsets, [block] * n, out, wait_current=False)

    compute_alone = _median_cuda(compute, compute_stream)
    transfer_alone = _median_cuda(transfer, engine.stream)
    both_compute, both_transfer = [], []
    for i in range(13):
        torch.cuda.synchronize()
        c0, c1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        c0.record(compute_stream)
        compute()
        c1.record(compute_stream)
        t0.record(engine.stream)
        transfer()
        t1.record(engine.stream)
        torch.cuda.synchronize()
        if i >= 3:
            both_compute.append(c0.elapsed_time(c1) / 1e3)
            both_transfer.append(t0.elapsed_time(t1) / 1e3)
    slowdown = statistics.median(both_compute) / compute_alone - 1
    alone_rate = reps * total / GIB / transfer_alone
    both_rate = reps * total / GIB / statistics.median(both_transfer)
    report.add("prefetch beside compute: compute kernel slowdown", 100 * slowdown, "%", target="< 10%",
               passed=slowdown < 0.10, yardstick="compute alone", ratio=1 + slowdown,
               compute_alone_ms=round(compute_alone * 1e3, 3))
    report.add("prefetch beside compute: transfer speed", both_rate, "GiB/s", target=">= 80% of alone",
               passed=both_rate >= 0.8 * alone_rate, yardstick="same transfer alone", ratio=both_rate / alone_rate,
               alone_gib_s=round(alone_rate, 2))


def bench_latency(report: Report) -> None:
    import tiercache
    from tiercache.policies import ScorePolicy

    value = torch.randn(16 * KIB)  # 64 KiB
    with tiercache.Cache(gpu="64MiB", host="64MiB", disk=None) as cache:
        cache.put("g", value)
        assert cache.tier_of("g") == "gpu"
        gpu_s = _median_wall(lambda: cache.get("g", device="cuda"), warmup=20, iters=200)
        many_s = _median_wall(lambda: cache.get_many(["g"], device="cuda"), warmup=20, iters=200)
    with tiercache.Cache(host="64MiB", policy=ScorePolicy(promote_threshold=float("inf"))) as cache:
        cache.put("h", value)
        host_s = _median_wall(lambda: cache.get("h", device="cuda"), warmup=20, iters=200)
        host_many_s = _median_wall(lambda: cache.get_many(["h"], device="cuda"), warmup=20, iters=200)
    report.add("Cache.get of one 64 KiB block, GPU-resident, to cuda", gpu_s * 1e6, "us")
    report.add("Cache.get of one 64 KiB block, host-resident (pinned), to cuda", host_s * 1e6, "us")
    report.add("Cache.get_many of one 64 KiB block, GPU-resident, to cuda", many_s * 1e6, "us")
    report.add("Cache.get_many of one 64 KiB block, host-resident, to cuda", host_many_s * 1e6, "us")


def write_outputs(report: Report, meta: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    data = {**meta, "figures": report.rows, "block_size_sweep": report.sweep, "notes": report.notes}
    (out_dir / "gpu_transfers.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    lines = [f"# GPU transfer microbenchmarks ({meta['gpu']})", "",
             f"torch {meta['versions']['torch']}, cupy {meta['versions']['cupy']}, kvikio {meta['versions']['kvikio']}, "
             f"zarr {meta['versions']['zarr']}; {meta['date']}", "",
             "| figure | target | measured | yardstick | ratio | pass |", "|---|---|---|---|---|---|"]
    for row in report.rows:
        passed = "" if row["pass"] is None else ("PASS" if row["pass"] else "FAIL")
        ratio = "" if row["ratio_to_yardstick"] is None else f"{row['ratio_to_yardstick']:.2f}"
        lines.append(f"| {row['figure']} | {row['target'] or ''} | {row['measured']} {row['unit']} | "
                     f"{row['yardstick'] or ''} | {ratio} | {passed} |")
    lines += [f"- {note}" for note in report.notes]
    lines += ["", "## Block-size sweep (GiB/s, 128 MiB per batch, random order)", "",
              "| block | gather (kernel) | gather end-to-end | scatter (kernel) | per-block copies | one bulk H2D | one bulk D2H |",
              "|---|---|---|---|---|---|---|"]
    for s in report.sweep:
        lines.append(f"| {s['block_bytes'] // KIB} KiB | {s['gather']} | {s['gather_wall']} | {s['scatter']} | "
                     f"{s['per_block']} | {s['bulk_h2d']} | {s['bulk_d2h']} |")
    (out_dir / "gpu_transfers.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        xs = [s["block_bytes"] // KIB for s in report.sweep]
        for key, label in (("gather", "gather kernel H2D"), ("scatter", "scatter kernel D2H"),
                           ("per_block", "per-block copies H2D"), ("bulk_h2d", "one bulk copy H2D")):
            ax.plot(xs, [s[key] for s in report.sweep], marker="o", label=label)
        ax.axhline(45, color="grey", linestyle="--", linewidth=1, label="target 45 GiB/s")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("block size (KiB)")
        ax.set_ylabel("GiB/s")
        ax.set_title(f"Scattered block transfers, {meta['gpu']}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "gpu_transfers.png", dpi=120)
    except ImportError:
        print("matplotlib is not installed: no plot written", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--workdir", type=Path, default=None, help="where the disk figures write 2 GiB (default: a temp dir)")
    parser.add_argument("--skip-disk", action="store_true")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_transfers: CUDA is not available on this machine; these figures need a GPU "
              "(see docs/gpu.md for running them on the GPU machine).", file=sys.stderr)
        return 2
    from tqdm import tqdm

    from tiercache.transfer import CopyEngine
    from tiercache_kernels import cuda_backend_available

    if not cuda_backend_available():
        print("gpu_transfers: cupy is missing, so the gather kernel cannot run; install cupy-cuda13x", file=sys.stderr)
        return 2
    engine = CopyEngine("cuda")
    report = Report()
    meta = {"gpu": torch.cuda.get_device_name(), "versions": _versions(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "host": platform.node(), "cpu_count": os.cpu_count()}
    rng = random.Random(0)
    steps = [("host<->GPU 64 KiB", lambda: bench_host_gpu(report, engine, 2048, 64 * KIB, rng, record=True))]
    for block in (16 * KIB, 32 * KIB, 128 * KIB, 256 * KIB, 512 * KIB, MIB):
        steps.append((f"sweep {block // KIB} KiB", lambda b=block: bench_host_gpu(report, engine, (128 * MIB) // b, b, rng, record=False)))
    steps.append(("overlap", lambda: bench_overlap(report, engine)))
    steps.append(("latency", lambda: bench_latency(report)))
    if not args.skip_disk:
        def disk_step() -> None:
            if args.workdir is not None:
                args.workdir.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
                bench_disk(report, Path(tmp), engine)
        steps.append(("disk", disk_step))
    with tqdm(steps, desc="gpu_transfers", unit="step") as bar:
        for name, step in bar:
            bar.set_postfix_str(name)
            step()
    report.sweep.sort(key=lambda s: s["block_bytes"])
    write_outputs(report, meta, args.out)
    print((args.out / "gpu_transfers.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
