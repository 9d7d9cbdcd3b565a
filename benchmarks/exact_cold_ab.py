"""Exact cold decode (issue 10's (2) point) with read-ahead variants, interleaved in one process, with a timeline.

    python benchmarks/exact_cold_ab.py --prefill-cache /work/prefill --threads 1 --rounds 4 --variants base,NAME

SmolLM2's prompts (``sparse_speed.prompt_rows``, 8K x 4 by default), prefilled once (``--prefill-cache``
keeps that, as ``sparse_variants.py`` does), fill one exact ``TieredKVCache`` per variant (host tier
``--host-fraction`` of the KV or ``--host-bytes``, the rest on a ``direct_io`` disk tier under ``--workdir``).  Per round,
``DynamicCache`` decodes a block of steps (its greedy tokens are fed to the others; logits compared with
``DynamicCache``'s at the variant's own torch thread count: an untimed ``DynamicCache`` per other ``NAME@N``),
then every variant decodes the same block back to back (order rotated per round; the block's first step
untimed; its median is printed as ``first_ms``).  Per variant: ms/step (median of timed steps), forward-thread
CPU ms, the process's CPU ms, and the timeline of ``exact_prefetch.Timeline`` (disk idle ms, chunk reads in flight, forward waits).  The
read-once time is ``sparse_speed.read_in_decode_order`` of the first variant's cache before and after each
round (medians, the better worker count) plus its host bytes at the host copy rate.

A variant is ``NAME`` (see :data:`VARIANTS` and :data:`BUILD`): options its cache is built with and settings
applied to it after.  ``base``: the defaults; ``pairs``: layers larger than ``group_bytes`` read two per job
as before (also with ``--same-cache``); ``spread``: ``policy="kv-stream-spread"``;
``r1``: one disk reader job at a time; ``crc_hold``: the disk tier's checksums keep the GIL; ``t8`` / ``t12`` /
``t16``: each ``get_many``'s direct reads spread over that many threads, from a pool of as many (``t8p16``: 8
per call, a pool of 16 that the two reads ahead share); ``huge`` / ``small``: decode buffers on transparent
huge pages (the default) / on 4 KiB pages (as before ``decode_buffer.HUGE_PAGES``).  With ``--same-cache``
(:data:`SAME`) every switch frees the decode buffers, so each block's first step allocates them.  ``NAME@N`` (e.g. ``base@1``): variant ``NAME`` decoding its steps with
``torch.set_num_threads(N)`` instead of ``--threads`` (the read-once time stays at ``--threads``' host copy
rate): what running the model on fewer intra-op threads than the user's setting would give.
``--emulate-gibps`` serves every read by an emulated device (:class:`EmulatedDevice`): the step's wait
on its reads then reflects the pipeline's structure, not what else uses the shared disk.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import MiB, kv_cache_bytes, load_bench_model, median, stats_delta, torch_threads  # noqa: E402
import sparse_speed as sp  # noqa: E402
from exact_prefetch import Timeline, _medians  # noqa: E402
from sparse_variants import cached_prefill  # noqa: E402
from tiercache_llm import decode_buffer  # noqa: E402
from tiercache_llm.hf_kwargs import cache_kwargs  # noqa: E402


def _set(**attrs: Any) -> Callable[[Any], None]:
    def apply(cache: Any) -> None:
        for name, value in attrs.items():
            obj = cache
            *path, last = name.split(".")
            for p in path:
                obj = getattr(obj, p)
            setattr(obj, last, value)
    return apply


def _device_only(cache: Any) -> None:
    """Memory-held layers are read by their own update, never ahead (as with torch's threads on every core)."""
    from tiercache_llm import kv_cache

    cache._ahead_overlaps = lambda: kv_cache._DEVICE_ONLY


def _all_ahead(cache: Any) -> None:
    """Every layer read ahead, whatever :func:`tiercache.batched.machine_idle` says."""
    cache._ahead_overlaps = lambda: True


def _direct_threads(n: int) -> Callable[[Any], None]:
    def apply(cache: Any) -> None:
        for tier in cache.store.cache.tiers:
            if hasattr(tier, "_direct_threads"):
                tier._direct_threads = n
    return apply


def _one_disk_reader(cache: Any) -> None:
    """Reads ahead of disk layers one job at a time (memory-held layers keep their copy thread)."""
    import concurrent.futures

    cache.buffer._reader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tiercache-kv-ahead")


def _pairs_schedule(buffer: Any) -> Callable[..., tuple[int, int]]:
    """``buffer.schedule`` as it was before layers larger than ``group_bytes`` were read one per job: those
    went ``DISK_GROUP`` (2) per job, a read beyond the next layer waiting for that many free slots."""
    default = type(buffer).schedule.__get__(buffer)

    def schedule(layer_bytes: int | None = None) -> tuple[int, int]:
        size = buffer.last_read_bytes if layer_bytes is None else layer_bytes
        if buffer.group_bytes and size > buffer.group_bytes:
            return max(1, min(buffer.group, buffer.max_depth - 1)), default(layer_bytes)[1]
        return default(layer_bytes)
    return schedule


def _disk_tiers(cache: Any) -> list:
    return [tier for tier in cache.store.cache.tiers if hasattr(tier, "_crc")]


def _reset(cache: Any) -> None:
    """Undo every ``SAME`` setting: the cache's defaults."""
    cache.buffer.__dict__.pop("schedule", None)
    cache.__dict__.pop("_ahead_overlaps", None)
    _huge(decode_buffer.HUGE_PAGES)(cache)
    for tier in _disk_tiers(cache):
        for name, value in tier.__dict__.pop("_same_saved", {}).items():
            setattr(tier, name, value)


def _huge(on: bool) -> Callable[[Any], None]:
    """Decode buffers with (``on``) or without transparent huge pages (``DecodeBuffer.huge_pages``); a change
    frees them, so the block's first (untimed) step allocates them again."""
    def apply(cache: Any) -> None:
        if cache.buffer.huge_pages != on:
            cache.buffer.release()
            cache.buffer.huge_pages = on
    return apply


def _tier_set(tier: Any, name: str, value: Any) -> None:
    """``tier.name = value``, undone by :func:`_reset`."""
    tier.__dict__.setdefault("_same_saved", {}).setdefault(name, getattr(tier, name))
    setattr(tier, name, value)


_POOLS: dict[tuple[int, int], Any] = {}  # (id(tier), threads) -> the pool a _same_direct_threads variant uses


def _same_direct_threads(n: int, pool_threads: int | None = None) -> Callable[[Any], None]:
    """Direct reads of one ``get_many`` on up to ``n`` threads, from a pool of ``pool_threads`` (default ``n``)
    threads of their own (the tier's pool, made at its first spread read, has
    ``max(io_threads, direct_read_threads)`` threads, and two reads ahead share it)."""
    import concurrent.futures

    size = n if pool_threads is None else pool_threads

    def apply(cache: Any) -> None:
        for tier in _disk_tiers(cache):
            pool = _POOLS.get((id(tier), size))
            if pool is None:
                pool = _POOLS[(id(tier), size)] = concurrent.futures.ThreadPoolExecutor(size, thread_name_prefix="ab-disk")
            _tier_set(tier, "_direct_threads", n)
            _tier_set(tier, "_pool", pool)
    return apply


def _crc_gil(mode: int) -> Callable[[Any], None]:
    """The disk tier's checksums with crc32c's ``gil_release_mode`` ``mode`` (0: keep the GIL, 1: always release
    it; the default, -1, releases it from 32 KiB)."""
    import crc32c

    def apply(cache: Any) -> None:
        for tier in _disk_tiers(cache):
            _tier_set(tier, "_crc", lambda data, value=0, *_, _m=mode, _f=crc32c.crc32c: _f(data, value, _m))
    return apply


def _same(*settings: Callable[[Any], None]) -> Callable[[Any], None]:
    """Back to the defaults, the decode buffers freed (so every variant's block starts, in its untimed first
    step, by allocating them, as a fresh cache's first step does: ``first_ms``), then ``settings``."""
    def apply(cache: Any) -> None:
        cache.buffer.release()
        _reset(cache)
        for setting in settings:
            setting(cache)
    return apply


#: ``--same-cache``: name -> the settings a shared cache switches to before that variant's block.
SAME: dict[str, Callable[[Any], None]] = {
    "base": _same(),
    "pairs": _same(lambda cache: setattr(cache.buffer, "schedule", _pairs_schedule(cache.buffer))),  # as before
    # every layer read ahead (a busy machine by machine_idle, or torch's threads leaving a core free)
    "ahead": _same(_all_ahead),
    # only the disk-reading layers read ahead (what torch's threads on every core of an idle machine get)
    "dev": _same(_device_only),
    "crc_hold": _same(_crc_gil(0)),  # checksums keep the GIL
    "t12": _same(_same_direct_threads(12)),  # direct reads of a get_many on up to 12 threads (default 8)
    "t16": _same(_same_direct_threads(16)),
    "t8": _same(_same_direct_threads(8)),  # the disk tier's default count, from a pool of its own
    "t8p16": _same(_same_direct_threads(8, 16)),  # 8 per get_many, 16 in the pool the two reads ahead share
    "huge": _same(_huge(True)),  # decode buffers on transparent huge pages (the default, decode_buffer.HUGE_PAGES)
    "small": _same(_huge(False)),  # ... on 4 KiB pages (as before HUGE_PAGES)
}


#: name -> extra ``TieredKVCache`` options of a variant
BUILD: dict[str, dict[str, Any]] = {"spread": {"policy": "kv-stream-spread"}, "spread_g1": {"policy": "kv-stream-spread"}}

#: name -> what it changes on a freshly built cache (``base``: nothing).
VARIANTS: dict[str, Callable[[Any], None]] = {
    "base": _set(),
    "spread": _set(),  # placement kv-stream-spread (BUILD)
    "r1": _one_disk_reader,
    "dev": _device_only,
    "ahead": lambda cache: _all_ahead(cache),
    "d5": _set(**{"buffer.base_depth": 5, "buffer.ahead_bytes": 240 * MiB}),
    "d6": _set(**{"buffer.base_depth": 6, "buffer.ahead_bytes": 288 * MiB}),
    "t12": _direct_threads(12),
    "t16": _direct_threads(16),
    "t4": _direct_threads(4),
    "deep5": _set(**{"buffer.base_depth": 5, "buffer.ahead_bytes": 240 * MiB}),
    "pairs": lambda cache: setattr(cache.buffer, "schedule", _pairs_schedule(cache.buffer)),
    "g1": _set(**{"buffer.group": 1}),  # every layer one per job (small ones too)
    "g1_r1": lambda cache: (_set(**{"buffer.group": 1})(cache), _one_disk_reader(cache)),
    "spread_g1": _set(**{"buffer.group": 1}),  # with kv-stream-spread (BUILD)
    "g1d5": _set(**{"buffer.group": 1, "buffer.base_depth": 5, "buffer.ahead_bytes": 240 * MiB}),
    "g1d6": _set(**{"buffer.group": 1, "buffer.base_depth": 6, "buffer.ahead_bytes": 288 * MiB}),
    "dev_g1": lambda cache: (_set(**{"buffer.group": 1})(cache), _device_only(cache)),
    "dev_d5": lambda cache: (_set(**{"buffer.group": 1, "buffer.base_depth": 5, "buffer.ahead_bytes": 240 * MiB})(cache),
                             _device_only(cache)),
    "deep6": _set(**{"buffer.base_depth": 6, "buffer.ahead_bytes": 288 * MiB}),
    "crc_hold": _crc_gil(0),
    "huge": _set(**{"buffer.huge_pages": True}),
    "small": _set(**{"buffer.huge_pages": False}),
}


class PreadvTimeline(Timeline):
    """:class:`exact_prefetch.Timeline` timing every ``os.preadv`` as a disk read instead of
    ``DiskTier._read_payload_into`` (the disk tier's direct reads of entries below ``PIPELINE_BYTES`` call
    ``preadv`` inline, so exact_prefetch's timeline sees none of them at 8K x 4)."""

    def install(self) -> None:
        super().install()
        for owner, name, original in list(self._undo):
            if name == "_read_payload_into":
                setattr(owner, name, original)
                self._undo.remove((owner, name, original))
        preadv, disk = os.preadv, self.disk

        def traced(*args: Any) -> int:
            t0 = time.perf_counter()
            try:
                return preadv(*args)
            finally:
                disk.append((t0, time.perf_counter()))
        self._undo.append((os, "preadv", preadv))
        os.preadv = traced


class EmulatedDevice:
    """``--emulate-gibps``: every ``os.preadv`` of the run is served by a single FIFO device of a fixed bandwidth
    (the real read runs, then the call sleeps until the device would have delivered its bytes), so the time a
    step waits on its reads depends on the pipeline's structure, not on what else uses the real disk.  Set it
    below the real disk's bandwidth."""

    def __init__(self, bytes_per_s: float) -> None:
        import threading

        self.rate = bytes_per_s
        self.lock = threading.Lock()
        self.busy_until = 0.0
        self.original = os.preadv

    def install(self) -> None:
        original, rate, lock = self.original, self.rate, self.lock

        def preadv(fd: int, buffers: Any, offset: int, *flags: Any) -> int:
            n = sum(memoryview(b).nbytes for b in buffers)
            with lock:
                start = max(time.perf_counter(), self.busy_until)
                self.busy_until = done = start + n / rate
            got = original(fd, buffers, offset, *flags)
            delay = done - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            return got
        os.preadv = preadv

    def remove(self) -> None:
        os.preadv = self.original


def build(model: Any, kv: list, host: int, store: Path, variant: str) -> Any:
    from tiercache_llm import TieredKVCache

    batch, tokens = kv[0][0].shape[0], kv[0][0].shape[2]
    cache = TieredKVCache(model.config, host=host, disk=2 * kv_cache_bytes(model.config, tokens, batch) + 64 * MiB,
                          path=store, direct_io=True, **BUILD.get(variant, {}))
    VARIANTS[variant](cache)
    for i, (k, v) in enumerate(kv):
        cache.update(k.clone(), v.clone(), i)
    return cache


def raw_read(cache: Any, workers: tuple[int, ...]) -> dict[str, Any]:
    """``sparse_speed.read_in_decode_order`` with the given worker counts: the chunk files ``cache``'s step
    reads from disk, in the step's order, read raw with O_DIRECT (no checksum, no copy)."""
    files, _, _ = sp.decode_read_order(cache)
    return sp._raw_read(files, workers) if files else {}


def round_ratios(recs: dict[str, list[dict[str, Any]]], ref: str, steps: int) -> dict[str, list[float]]:
    """Per variant (``ref`` aside), per round: its median ms over the round's timed steps / ``ref``'s (the
    figure to read on a shared machine, where the load drifts between rounds)."""
    out = {}
    for v, rs in recs.items():
        if v == ref:
            continue
        out[v] = [median([r["ms"] for r in rs[i : i + steps]]) / median([r["ms"] for r in recs[ref][i : i + steps]])
                  for i in range(0, len(recs[ref]), steps)]
    return out


def step(model: Any, cache: Any, token: torch.Tensor) -> tuple[torch.Tensor, float, float, float, float]:
    start, cpu, proc = time.perf_counter(), time.thread_time(), time.process_time()
    with torch.no_grad():
        logits = model(input_ids=token, **cache_kwargs(cache, model), use_cache=True).logits[:, -1]
    return (logits, time.perf_counter() - start, start, time.thread_time() - cpu, time.process_time() - proc)


def _resync(caches: list[Any], ref: Any, n: int) -> None:
    """Replace the last ``n`` tokens of every cache in ``caches`` by ``ref``'s (a ``DynamicCache``): crop, then
    append ``ref``'s K/V layer by layer."""
    for cache in caches:
        cache.crop(-n)
        for i, layer in enumerate(ref.layers):
            cache.update(layer.keys[:, :, -n:].clone(), layer.values[:, :, -n:].clone(), i)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--host-fraction", type=float, default=0.25)
    ap.add_argument("--host-bytes", default=None, help="host tier budget, e.g. 16MiB (instead of --host-fraction)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per variant and round")
    ap.add_argument("--variants", default="base")
    ap.add_argument("--prefill-cache", type=Path, default=None)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None, help="JSON file")
    ap.add_argument("--raw-workers", default="1,8,16", help="worker counts of the raw O_DIRECT read (read-once)")
    ap.add_argument("--emulate-gibps", type=float, default=None,
                    help="serve every read by an emulated FIFO device of this bandwidth (see EmulatedDevice)")
    ap.add_argument("--same-cache", action="store_true",
                    help="one cache for every variant (of SAME), its settings switched per block and the block's tokens "
                         "cropped before the next variant decodes them: no store-layout effect")
    ap.add_argument("--detail", action="store_true", help="keep every step's per-layer timeline in the JSON")
    a = ap.parse_args(argv)
    variants = [v for v in a.variants.split(",") if v]
    workers = tuple(int(x) for x in a.raw_workers.split(","))
    try:
        threads = {v: int(v.partition("@")[2]) if "@" in v else a.threads for v in variants}
    except ValueError:
        ap.error(f"a variant NAME@N needs an integer N, got {a.variants!r}")
    if len(set(variants)) != len(variants) or min(threads.values()) < 1:
        ap.error(f"variants must be distinct and NAME@N needs N >= 1, got {a.variants!r}")
    kind = {v: v.partition("@")[0] for v in variants}  # the settings a variant applies
    unknown = [v for v in variants if kind[v] not in (SAME if a.same_cache else VARIANTS)]
    if unknown:
        ap.error(f"unknown variants {unknown}; known: {', '.join(SAME if a.same_cache else VARIANTS)}")
    from transformers import DynamicCache

    model, tok = load_bench_model(a.model)
    n = max(a.batch, 4)
    ids = sp.prompt_rows(tok, n, a.context, model.config.vocab_size)
    context = min(a.context, ids.shape[-1])
    with torch_threads(sp.DEFAULT_THREADS):
        rows = cached_prefill(model, ids, [context - 1] * n, a.prefill_cache, a.model)
    kv = sp.point_kv(rows[: a.batch], a.batch, context - 1)
    del rows
    kv_bytes = kv_cache_bytes(model.config, context - 1, a.batch)
    if a.host_bytes:
        from tiercache.sizes import parse_size

        host = parse_size(a.host_bytes)
    else:
        host = int(a.host_fraction * kv_bytes)
    workdir = Path(tempfile.mkdtemp(prefix="tiercache-exact-cold-ab-", dir=a.workdir))
    load0 = os.getloadavg()
    if a.same_cache:  # one cache; each variant's settings applied before its block of steps (SAME)
        one = build(model, kv, host, workdir / "same", "base")
        caches = {v: one for v in variants}
    else:
        caches = {v: build(model, kv, host, workdir / v, kind[v]) for v in variants}
    dyns = {}  # torch thread count -> DynamicCache: the timed one at --threads, an untimed reference per other NAME@N
    for n in dict.fromkeys([a.threads, *threads.values()]):
        dyns[n] = DynamicCache(config=model.config)
        for i, (k, v) in enumerate(kv):
            dyns[n].update(k.clone(), v.clone(), i)
    dyn = dyns[a.threads]
    del kv
    token = ids[: a.batch, context - 1 : context]
    recs: dict[str, list[dict[str, Any]]] = {v: [] for v in ["dynamic", *variants]}
    diffs = {v: 0.0 for v in variants}
    firsts: dict[str, list[float]] = {v: [] for v in variants}  # each block's untimed first step (ms)
    raw: list[dict[str, Any]] = []
    device = EmulatedDevice(a.emulate_gibps * 2**30) if a.emulate_gibps else None
    if device is not None:
        device.install()
    timeline = PreadvTimeline()
    timeline.install()
    detail: list[dict[str, Any]] = []
    try:
        with torch_threads(a.threads):
            for rnd in range(a.rounds):
                raw.append(raw_read(caches[variants[0]], workers))
                refs, toks = [], []
                for i in range(1 + a.steps):
                    toks.append(token)
                    ref, s, _, cpu, proc = step(model, dyn, token)
                    refs.append(ref)
                    if i:
                        recs["dynamic"].append({"ms": 1000 * s, "cpu_ms": 1000 * cpu, "proc_ms": 1000 * proc})
                    token = ref.argmax(-1, keepdim=True)
                # CPU attention's rounding depends on torch's thread count: a NAME@N variant's logits are compared
                # with DynamicCache's decoded at N threads (untimed), never across thread counts
                refs_at = {a.threads: refs}
                for n, other in dyns.items():
                    if n != a.threads:
                        with torch_threads(n):
                            refs_at[n] = [step(model, other, t)[0] for t in toks]
                turn = rnd % len(variants)
                order = variants[turn:] + variants[:turn]
                for v in order:
                    cache = caches[v]
                    if a.same_cache:
                        SAME[kind[v]](cache)
                        if v != order[0]:  # decode the same positions as the round's first variant did
                            cache.crop(-len(toks))
                    for i, (t, ref) in enumerate(zip(toks, refs_at[threads[v]])):
                        before = cache.stats()
                        timeline.clear()
                        with torch_threads(threads[v]):
                            logits, s, began, cpu, proc = step(model, cache, t)
                        seen = timeline.step(began, began + s, detail=a.detail or (i == 1 and rnd == a.rounds - 1))
                        diffs[v] = max(diffs[v], float((logits - ref).abs().max()))
                        if not i:
                            firsts[v].append(1000 * s)
                            continue
                        d = stats_delta(before, cache.stats())["prefetch"]
                        if "layers" in seen:
                            detail.append({"variant": v, "round": rnd, "step": i, **seen})
                        recs[v].append({"ms": 1000 * s, "cpu_ms": 1000 * cpu, "proc_ms": 1000 * proc,
                                        "disk_idle_ms": seen["disk_idle_ms"], "inflight": seen["reads_in_flight"],
                                        "wait_ms": seen["take_wait_ms"], "sync_ms": 1000 * d["sync_seconds"],
                                        "bg_cpu_ms": 1000 * d["background_cpu_seconds"]})
                if a.same_cache and len(dyns) > 1:  # the round's K/V as DynamicCache at --threads wrote them, so
                    _resync([one, *(c for n, c in dyns.items() if n != a.threads)], dyn, len(toks))  # no round
                    # starts from K/V another thread count computed (a NAME@N ending the previous round)
                raw.append(raw_read(caches[variants[0]], workers))
        peaks = {v: c.buffer.peak_bytes for v, c in caches.items()}
        files, disk_bytes, mem_bytes = sp.decode_read_order(caches[variants[0]])
        host_bw = sp.host_copy_bandwidth(max(host, 64 * MiB), a.threads)
    finally:
        timeline.remove()
        if device is not None:
            device.remove()
        for c in {id(c): c for c in caches.values()}.values():
            c.close()
        shutil.rmtree(workdir, ignore_errors=True)
    bw = _medians(raw)
    once = 1000 * (disk_bytes / bw["bytes_per_s"] + mem_bytes / host_bw) if bw.get("bytes_per_s") else None
    load1 = os.getloadavg()
    keys = ["ms", "cpu_ms", "proc_ms", "disk_idle_ms", "inflight", "wait_ms", "sync_ms", "bg_cpu_ms"]
    print(f"{context - 1} x {a.batch}, {a.threads} thread(s), {a.rounds} rounds x {a.steps} steps; load {load0[0]:.2f} -> {load1[0]:.2f}")
    if once:
        by = ", ".join(f"{w}w {x / 2**30:.2f} GiB/s" for w, x in bw["by_workers"].items())
        print(f"read once: {once:.0f} ms ({disk_bytes / MiB:.0f} MiB disk: {by}; {mem_bytes / MiB:.0f} MiB host at "
              f"{host_bw / 2**30:.1f} GiB/s)")
    print("| variant | " + " | ".join(keys) + " | vs dynamic | vs read-once | max diff |")
    print("|---" * (len(keys) + 4) + "|")
    summary = {}
    dms = median([r["ms"] for r in recs["dynamic"]])
    for v, rs in recs.items():
        row = {k: median([r[k] for r in rs]) for k in keys if k in rs[0]}
        row["samples_ms"] = [round(r["ms"]) for r in rs]
        if v in peaks:
            row["buffer_peak_mib"] = peaks[v] / MiB
            row["first_ms"] = median(firsts[v])
        summary[v] = row
        cells = [f"{row[k]:.1f}" if k in row else "" for k in keys]
        print(f"| {v} | " + " | ".join(cells) + f" | {row['ms'] / dms:.2f} | "
              + (f"{row['ms'] / once:.2f}" if once else "") + f" | {diffs.get(v, 0):.2g} |")
    for v in recs:
        print(v, summary[v]["samples_ms"], f"buffer peak {summary[v].get('buffer_peak_mib', 0):.0f} MiB",
              f"first steps (untimed) median {summary[v]['first_ms']:.0f} ms" if v in firsts else "")
    ratios = round_ratios(recs, variants[0], a.steps)
    for v, rs in ratios.items():
        summary[v]["round_ratio"] = median(rs)
        print(f"{v} / {variants[0]} per round (median of each round's steps): median {median(rs):.3f}, "
              f"{[round(x, 2) for x in rs]}")
    if a.out:
        a.out.write_text(json.dumps({"argv": sys.argv, "load": [load0, load1], "read_once_ms": once, "raw_disk": bw,
                                     "summary": summary, "records": recs, "diffs": diffs, "timeline": detail},
                                    indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
