"""Exact tiered decode with and without layer-ahead reads (``prefetch``), beside DynamicCache and raw reads.

    python benchmarks/exact_prefetch.py --contexts 1024,2048,4096 --batch 1 --host 16MiB   # issue 8 row 2 sizes
    python benchmarks/exact_prefetch.py --contexts 8192 --batch 4 --host-fraction 0.25    # issue 10 row (2) point
    python benchmarks/exact_prefetch.py --quick                                            # tiny model, seconds

Per context: SmolLM2 prefills the prompt rows once into a ``DynamicCache``; every configuration's cache is
filled with those K/V (``Cache.update``); then the caches decode the same positions and tokens, ``--threads``
torch threads (default 1), in ``--rounds`` rounds: in each, ``DynamicCache`` decodes a block of steps first (its greedy tokens
are fed to the others: teacher forcing; their logits are compared with its), then each tiered
configuration decodes the same block, the order of the tiered configurations rotated every round.  A
configuration's steps run back to back, as in a real decode, so its reads ahead of the next step's first
layers overlap its own step's end and nothing else (interleaving the caches step by step would let them
finish during the other caches' steps, for free); the first step of each block is untimed (it inherits
reads ahead that finished meanwhile), the first round's first ``--warmup`` steps too.
Tiered caches: host tier ``--host`` (or ``--host-fraction`` of the KV bytes), the rest on a disk tier
under ``--workdir`` with ``direct_io`` (reads bypass the page cache: "cold").  Configurations:
``dynamic``; ``exact-sync`` (``prefetch=False``: every block read when its layer's update runs);
``exact-ahead-serial`` (the earlier schedule: one read ahead at a time, at most two layers ahead,
within 32 MiB); ``exact-ahead`` (``prefetch=True``, the defaults of a cache with a disk tier: two reads
at once, past memory-held layers up to eight layers and 192 MiB ahead, layers beyond the next read four at a
time with one job each).  ``--configs`` picks some (``dynamic`` always runs: it is the reference).
Per step of the read-ahead configurations, a timeline (benchmark-only instrumentation: the disk tier's
per-chunk read and the decode buffer's ``_submit``/``take`` are wrapped for the run): disk idle ms (step
time with no chunk read in flight), mean chunk reads in flight, reader busy ms (some read ahead running),
the forward pass's wait for reads ahead, and per layer when its read was submitted, started and finished
and when its update needed it (``timeline`` in the JSON, one step per configuration and round).
The time to read the KV once from its tiers: an O_DIRECT read of the chunk files exact-ahead's step reads
from its disk tier, in the step's order (``sparse_speed.read_in_decode_order``: 1 worker and the disk
tier's direct-read threads), before and after every round, medians, the better worker count; plus a copy
of its host tier's bytes (1 thread).  (The whole store read in directory order is reported beside it for
reference.)  Medians over the timed steps.  Prints a markdown table; ``--out`` writes
``exact_prefetch.json`` and ``.md`` there.
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
from typing import Any

import torch

from tiercache_llm.hf_kwargs import cache_kwargs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402  (the benchmarks directory is not a package)
    MiB, kv_cache_bytes, load_bench_model, machine_meta, median, parse_ints, stats_delta, tier_row, torch_threads,
)
from sparse_speed import (  # noqa: E402
    host_copy_bandwidth, point_kv, prefill_rows, prompt_rows, raw_disk_bandwidth, read_in_decode_order,
)

CONFIGS = ("dynamic", "exact-sync", "exact-ahead-serial", "exact-ahead")
SERIAL_AHEAD_BYTES = 32 * MiB  # the bound of reads ahead before disk-backed caches read concurrently


class Timeline:
    """Benchmark-only instrumentation of a run (installed by :meth:`install`, removed by :meth:`remove`):
    wall-clock intervals of every chunk read of any disk tier (``DiskTier._read_payload_into``, private)
    and of every read ahead (``DecodeBuffer._submit``: reads submitted together share their job's
    interval), and each update's wait (``DecodeBuffer.take``)."""

    def __init__(self) -> None:
        self.disk: list[tuple[float, float]] = []
        self.reads: list[dict[str, Any]] = []
        self.takes: list[dict[str, Any]] = []
        self._undo: list[tuple[Any, str, Any]] = []

    def install(self) -> None:
        from tiercache.tiers.disk import DiskTier
        from tiercache_llm.decode_buffer import DecodeBuffer

        timeline = self
        read_chunk, submit, take = DiskTier._read_payload_into, DecodeBuffer._submit, DecodeBuffer.take

        def traced_read(tier: Any, *args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return read_chunk(tier, *args, **kwargs)
            finally:
                timeline.disk.append((t0, time.perf_counter()))

        def traced_submit(buffer: Any, reads: list) -> None:
            now = time.perf_counter()
            records = [{"layer": read.layer.layer_idx, "submitted": now, "bytes": read.nbytes} for read in reads]
            fetch = reads[0].fetch

            def timed(*args: Any, **kwargs: Any) -> Any:
                t0 = time.perf_counter()
                try:
                    return fetch(*args, **kwargs)
                finally:
                    t1 = time.perf_counter()
                    for record in records:
                        record["started"], record["finished"] = t0, t1
                    timeline.reads.extend(records)
            for read in reads:
                read.fetch = timed
            submit(buffer, reads)

        def traced_take(buffer: Any, layer: Any) -> Any:
            t0 = time.perf_counter()
            out = take(buffer, layer)
            timeline.takes.append({"layer": layer.layer_idx, "needed": t0, "got": time.perf_counter(),
                                   "read_ahead": out[0] is not None})
            return out

        self._undo = [(DiskTier, "_read_payload_into", read_chunk), (DecodeBuffer, "_submit", submit),
                      (DecodeBuffer, "take", take)]
        DiskTier._read_payload_into, DecodeBuffer._submit, DecodeBuffer.take = traced_read, traced_submit, traced_take

    def remove(self) -> None:
        for owner, name, original in self._undo:
            setattr(owner, name, original)
        self._undo = []

    def clear(self) -> None:
        self.disk.clear(), self.reads.clear(), self.takes.clear()

    def step(self, t0: float, t1: float, detail: bool = False) -> dict[str, Any]:
        """The step ``[t0, t1]``'s figures (ms); ``detail``: also the per-layer timeline, relative to ``t0``."""
        wall = t1 - t0
        busy = _union(self.disk, t0, t1)
        reading = _union([(r["started"], r["finished"]) for r in self.reads], t0, t1)
        inflight = sum(max(0.0, min(b, t1) - max(a, t0)) for a, b in self.disk) / wall if wall else 0.0
        waits = [x for x in self.takes if x["needed"] >= t0]
        out: dict[str, Any] = {"disk_idle_ms": 1000 * (wall - busy), "reads_in_flight": inflight,
                               "reader_busy_ms": 1000 * reading,
                               "take_wait_ms": 1000 * sum(x["got"] - x["needed"] for x in waits)}
        if detail:
            ms = lambda t: round(1000 * (t - t0), 2)  # noqa: E731
            out["layers"] = {
                "reads": [{"layer": r["layer"], "mib": round(r["bytes"] / MiB, 2), "submitted": ms(r["submitted"]),
                           "started": ms(r["started"]), "finished": ms(r["finished"])} for r in self.reads],
                "needed": [{"layer": x["layer"], "needed": ms(x["needed"]), "got": ms(x["got"])} for x in waits],
            }
        return out


def _union(intervals: list[tuple[float, float]], lo: float, hi: float) -> float:
    """Seconds of ``[lo, hi]`` covered by at least one interval."""
    total, cur_a, cur_b = 0.0, None, None
    for a, b in sorted((max(a, lo), min(b, hi)) for a, b in intervals if b > lo and a < hi):
        if cur_b is None or a > cur_b:
            if cur_b is not None:
                total += cur_b - cur_a
            cur_a, cur_b = a, b
        else:
            cur_b = max(cur_b, b)
    return total + (cur_b - cur_a if cur_b is not None else 0.0)


def build(model: Any, config: str, kv: list, host: int, store: Path) -> Any:
    from transformers import DynamicCache
    from tiercache_llm import TieredKVCache

    if config == "dynamic":
        cache = DynamicCache(config=model.config)
    else:
        batch, tokens = kv[0][0].shape[0], kv[0][0].shape[2]
        kv_bytes = kv_cache_bytes(model.config, tokens, batch)
        cache = TieredKVCache(model.config, host=host, disk=2 * kv_bytes + 64 * MiB, path=store, direct_io=True,
                              prefetch=config != "exact-sync")
        if config == "exact-ahead-serial":  # before the fill starts the reader
            cache.buffer.readers, cache.buffer.max_depth, cache.buffer.ahead_bytes = 1, 2, SERIAL_AHEAD_BYTES
            cache.buffer.group = 1
    for i, (k, v) in enumerate(kv):
        cache.update(k.clone(), v.clone(), i)
    return cache


def step(model: Any, cache: Any, token: torch.Tensor) -> tuple[torch.Tensor, float, float, float]:
    """``(last logits, seconds, start, CPU seconds of this thread)`` of one forward pass."""
    start, cpu = time.perf_counter(), time.thread_time()
    with torch.no_grad():
        logits = model(input_ids=token, **cache_kwargs(cache, model), use_cache=True).logits[:, -1]
    end = time.perf_counter()
    return logits, end - start, start, time.thread_time() - cpu


def run_point(model: Any, kv: list, last: torch.Tensor, host: int, steps: int, warmup: int,
              workdir: Path, rounds: int = 2, configs: tuple[str, ...] = CONFIGS, threads: int = 1) -> dict[str, Any]:
    """Decode every configuration over the same positions and tokens, in ``rounds`` rounds of consecutive
    steps per configuration (see the module docstring); returns per-configuration medians (bytes and entry
    counts: means over every step, :data:`MEAN_KEYS`), the logit
    differences and the baselines."""
    configs = ("dynamic", *[c for c in configs if c != "dynamic"])
    caches = {c: build(model, c, kv, host, workdir / c) for c in configs}
    records: dict[str, list[dict[str, Any]]] = {c: [] for c in configs}
    diffs: dict[str, float] = {c: 0.0 for c in configs[1:]}
    token = last
    tiered = list(configs[1:])
    baseline = "exact-ahead" if "exact-ahead" in caches else tiered[-1]
    timeline = Timeline()
    timelines: list[dict[str, Any]] = []
    timeline.install()
    raw: list[dict[str, Any]] = []
    per_round = [steps // rounds + (r < steps % rounds) for r in range(rounds)]
    try:
        with torch_threads(threads):
            for rnd, timed in enumerate(per_round):
                raw.append(read_in_decode_order(caches[baseline], "before", rnd))
                untimed = warmup if rnd == 0 else 1
                refs, tokens = [], []
                for i in range(untimed + timed):  # the reference's block: its logits and greedy tokens
                    tokens.append(token)
                    ref, ms, _, cpu = step(model, caches["dynamic"], token)
                    refs.append(ref)
                    records["dynamic"].append({"ms": 1000 * ms, "cpu_ms": 1000 * cpu, "warmup": i < untimed})
                    token = ref.argmax(-1, keepdim=True)
                turn = rnd % len(tiered)
                for config in tiered[turn:] + tiered[:turn]:
                    cache = caches[config]
                    for i, (tok, ref) in enumerate(zip(tokens, refs)):
                        before = cache.stats()
                        timeline.clear()
                        logits, ms, began, cpu = step(model, cache, tok)
                        seen = timeline.step(began, began + ms, detail=i == untimed)
                        if "layers" in seen:
                            timelines.append({"config": config, "round": rnd, **seen})
                        delta = stats_delta(before, cache.stats())
                        diffs[config] = max(diffs[config], float((logits - ref).abs().max()))
                        ahead = delta["prefetch"]
                        records[config].append({
                            "ms": 1000 * ms, "warmup": i < untimed, "cpu_ms": 1000 * cpu,
                            "disk_idle_ms": seen["disk_idle_ms"], "reads_in_flight": seen["reads_in_flight"],
                            "reader_busy_ms": seen["reader_busy_ms"],
                            "fetch_ms": 1000 * delta["kv"]["fetch_seconds"],
                            "wait_ms": 1000 * ahead["wait_seconds"], "sync_read_ms": 1000 * ahead["sync_seconds"],
                            "background_ms": 1000 * ahead["background_seconds"],
                            "host_mib": tier_row(delta, "host").get("bytes_read", 0) / MiB,
                            "disk_mib": tier_row(delta, "disk").get("bytes_read", 0) / MiB,
                            "entries_ahead": ahead["blocks_ahead"], "entries_sync": ahead["blocks_sync"],
                        })
                raw.append(read_in_decode_order(caches[baseline], "after", rnd))
        exact = caches[baseline]
        host_cap = tier_row(exact.stats(), "host").get("capacity_bytes", 0)
        disk_row = tier_row(exact.stats(), "disk")
        disk_bw = _medians(raw)
        disk_bw["walk_order"] = raw_disk_bandwidth(workdir / baseline)
        host_bw = host_copy_bandwidth(max(int(host_cap), 64 * MiB), threads)
    finally:
        timeline.remove()
        for config, cache in caches.items():
            if config != "dynamic":
                cache.close()
    out: dict[str, Any] = {"configs": {}, "max_abs_logit_diff": diffs, "direct_io": disk_row.get("direct_io"),
                           "raw_disk": disk_bw, "host_copy_bytes_per_s": host_bw, "baseline_config": baseline,
                           "timeline": timelines}
    for config, recs in records.items():
        timed = [r for r in recs if not r["warmup"]]
        # Bytes and entry counts are means over every step, warm-up included: reads ahead cross step boundaries
        # (on a small model a timed step can read nothing in its own window); times are medians of timed steps.
        out["configs"][config] = {k: (sum(r[k] for r in recs) / len(recs) if k in MEAN_KEYS else
                                      median([r[k] for r in timed])) for k in timed[0] if k != "warmup"}
        out["configs"][config]["samples_ms"] = [r["ms"] for r in timed]
    a = out["configs"][baseline]
    if disk_bw.get("bytes_per_s"):
        once = 1000 * (a["disk_mib"] * MiB / disk_bw["bytes_per_s"] + a["host_mib"] * MiB / host_bw)
        out["read_once_ms"] = once
    return out


MEAN_KEYS = ("host_mib", "disk_mib", "entries_ahead", "entries_sync")


def _medians(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """The samples of ``read_in_decode_order`` summed up: per worker count the median over them, and
    ``bytes_per_s`` = the better of those (``{"error": ...}`` where O_DIRECT was refused)."""
    good = [x for x in samples if x.get("by_workers")]
    if not good:
        return {"error": next((x["error"] for x in samples if x.get("error")), "no disk entries"), "samples": samples}
    workers = sorted({w for x in good for w in x["by_workers"]})
    by = {w: median([x["by_workers"][w] for x in good if w in x["by_workers"]]) for w in workers}
    return {"files": good[-1]["files"], "bytes": good[-1]["bytes"], "by_workers": by,
            "bytes_per_s": max(by.values()), "samples": samples}


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| context x batch | config | ms/step | vs DynamicCache | vs read-once | forward CPU ms | "
             "fetch ms (all threads) | wait ms | sync read ms | disk idle ms | chunk reads in flight | reader busy ms | "
             "disk MiB | host MiB | read ahead / sync entries | max abs logit diff |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        dyn = res["configs"]["dynamic"]["ms"]
        once = res.get("read_once_ms")
        for config, row in res["configs"].items():
            if config == "dynamic":
                lines.append(f"| {res['context']} x {res['batch']} | dynamic | {row['ms']:.0f} | 1.00 | | "
                             f"{row['cpu_ms']:.0f} | | | | | | | | | | |")
                continue
            vs_once = f"{row['ms'] / once:.2f}" if once else "n/a"
            lines.append(
                f"| {res['context']} x {res['batch']} | {config} | {row['ms']:.0f} | {row['ms'] / dyn:.2f} | {vs_once} | "
                f"{row['cpu_ms']:.0f} | {row['fetch_ms']:.0f} | {row['wait_ms']:.0f} | {row['sync_read_ms']:.0f} | "
                f"{row['disk_idle_ms']:.0f} | {row['reads_in_flight']:.1f} | {row['reader_busy_ms']:.0f} | {row['disk_mib']:.0f} | "
                f"{row['host_mib']:.0f} | {row['entries_ahead']:.0f} / {row['entries_sync']:.0f} | "
                f"{res['max_abs_logit_diff'][config]:.2g} |")
    for res in results:
        d = res["raw_disk"]
        if d.get("bytes_per_s"):
            by = ", ".join(f"{w} worker(s) {v / 2**30:.2f} GiB/s" for w, v in d["by_workers"].items())
            walk = d.get("walk_order", {}).get("by_workers", {})
            walk_text = ", ".join(f"{w} worker(s) {v / 2**30:.2f}" for w, v in walk.items())
            lines.append(f"\n{res['context']} x {res['batch']}: raw O_DIRECT read of the {d['files']} chunk files {res['baseline_config']}'s "
                         f"step reads from disk ({d['bytes'] / MiB:.0f} MiB), in the step's order, before and after "
                         f"each round of steps, medians: {by} (the whole store in directory order after the steps: {walk_text}); "
                         f"host copy {res['host_copy_bytes_per_s'] / 2**30:.2f} GiB/s "
                         f"({res['threads']} thread(s)); read once ({res['baseline_config']}'s bytes per step) = {res['read_once_ms']:.0f} ms; "
                         f"disk tier direct_io: {res['direct_io']}; load average {res['load_average'][0]:.1f} at the start, "
                         f"{res['load_average'][1]:.1f} at the end")
    return "\n".join(lines)


def _configs(text: str) -> tuple[str, ...]:
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    unknown = [x for x in names if x not in CONFIGS]
    if unknown or not [x for x in names if x != "dynamic"]:
        raise argparse.ArgumentTypeError(f"--configs takes some of {', '.join(CONFIGS)} (one tiered at least), got {text!r}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny random model, 256-token context")
    parser.add_argument("--contexts", type=lambda t: parse_ints(t, "--contexts"), default=(1024, 2048, 4096))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--host", default=None, help="host tier budget, e.g. 16MiB (default: --host-fraction)")
    parser.add_argument("--host-fraction", type=float, default=0.25, help="host tier as a fraction of the KV bytes")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per configuration (over all rounds)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each configuration's first round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of consecutive steps per configuration")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch directory on the disk under test")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the decode steps (default 1)")
    parser.add_argument("--configs", type=_configs, default=CONFIGS,
                        help=f"comma-separated, of {','.join(CONFIGS)} (dynamic always runs)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.steps < args.rounds or args.warmup < 1:
        parser.error("need --rounds >= 1, --steps >= --rounds and --warmup >= 1")
    from tiercache.sizes import parse_size

    model, tokenizer = load_bench_model("tiny" if args.quick else "smollm2")
    contexts = (256,) if args.quick else args.contexts
    ids = prompt_rows(tokenizer, args.batch, max(contexts), model.config.vocab_size)
    t0 = time.perf_counter()
    rows = prefill_rows(model, ids, [min(max(contexts), ids.shape[-1]) - 1] * args.batch)
    print(f"prefill {args.batch} x {ids.shape[-1] - 1} tokens: {time.perf_counter() - t0:.0f} s", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="tiercache-exact-prefetch-", dir=args.workdir))
    results = []
    start = time.perf_counter()
    try:
        for c in contexts:
            c = min(c, ids.shape[-1])
            kv = point_kv(rows, args.batch, c - 1)
            kv_bytes = kv_cache_bytes(model.config, c - 1, args.batch)
            host = parse_size(args.host) if args.host else max(64 * 1024, int(args.host_fraction * kv_bytes))
            load = os.getloadavg()[0]
            res = run_point(model, kv, ids[: args.batch, c - 1 : c], host, args.steps, args.warmup, workdir,
                            args.rounds, args.configs, args.threads)
            res.update(context=c, batch=args.batch, threads=args.threads, kv_mib=kv_bytes / MiB, host_budget_mib=host / MiB,
                       load_average=(load, os.getloadavg()[0]))
            results.append(res)
            print(table([res]), flush=True)
            shutil.rmtree(workdir, ignore_errors=True)
            workdir.mkdir()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    text = table(results)
    print("\n" + text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        meta = machine_meta()
        meta.update(runtime_s=time.perf_counter() - start, load_average_end=os.getloadavg())
        (args.out / "exact_prefetch.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str))
        (args.out / "exact_prefetch.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
