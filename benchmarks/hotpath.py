"""Hot-path benchmark (CPU, issue 8): every row of the issue's table with its baseline from the same run.

    python benchmarks/hotpath.py --out benchmarks/results            # full run
    python benchmarks/hotpath.py --quick --out /tmp/hp               # tiny sizes, seconds per row
    python benchmarks/hotpath.py --rows 3,4 --threads 1 --repeats 5  # a subset

Rows (see docs/benchmarks.md, "Hot path"):

1. exact decode, all KV in the host tier: ``TieredKVCache`` ms/step vs ``DynamicCache`` ms/step;
2. exact decode, host 16 MiB + disk, warm and cold: ratio to ``DynamicCache`` and the per-step fetch time
   vs reading the same bytes with plain file reads (+ plain copies for the host-resident part), those
   reads run alone and, for the fetch during decode, also beside the same model decoding on another thread;
3. host tier, 4 KiB values: put / get µs per op vs a dict + ``clone``;
4. host tier, 64 KiB values: put / get throughput as a fraction of a dict of clones;
5. disk tier, 4 KiB / 64 KiB values: warm ``get`` throughput vs ``readinto`` of files of the same size;
6. reopen of a store with 10K / 100K small entries, warm and cold, vs listing the store's directory;
7. µs per ``put`` into a host tier of 100K entries before and after deleting half of them.

Every row runs at each ``--threads`` count (default: 1 and torch's default).  Tier and baseline
measurements alternate within each repeat; figures are medians over repeats, every sample is kept in
``hotpath.json``; ``hotpath.md`` holds the table and ``hotpath.png`` the plot.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from tqdm import tqdm

from tiercache_llm.hf_kwargs import cache_kwargs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402  (the benchmarks directory is not a package)
    parse_ints, DecodeBeside,
    KiB, MiB, disk_floor_reads, drop_page_cache, filesystem_of, has_field, machine_meta, median, read_files,
    torch_threads, write_files,
)

import tiercache  # noqa: E402

ROWS = (1, 2, 3, 4, 5, 6, 7)
DEFAULT_THREADS = torch.get_num_threads()  # torch's default intra-op thread count, read before any change


# -- settings and results -----------------------------------------------------------------------------
@dataclass
class Settings:
    """Sizes of every row; ``full()`` is the documented run, ``quick()`` the smoke-sized one."""

    contexts: tuple[int, ...] = (1024, 2048, 4096)
    decode_steps: int = 8  # timed steps per run (median); 3 repeats x 2 thread counts keep the full run ~15 min
    decode_host: int = 16 * MiB  # host budget of row 2 (the rest of the KV goes to disk)
    block_size: int | None = None  # rows 1-2; None: TieredKVCache's default for exact mode (stated in each row)
    model: str = "smollm2"  # or "tiny": a random 2-layer Llama (tests)
    host_small_values: int = 20_000  # row 3: 4 KiB values per repeat
    host_large_values: int = 2048  # row 4: 64 KiB values per repeat (128 MiB)
    disk_values: dict[int, int] = field(default_factory=lambda: {4 * KiB: 8192, 64 * KiB: 1024})  # row 5
    disk_rounds: int = 7  # row 5: get / baseline alternations per repeat (median of each)
    reopen_entries: tuple[int, ...] = (10_000, 100_000)
    reopen_value_bytes: int = 256
    churn_entries: int = 100_000
    churn_puts: int = 5_000
    churn_value_bytes: int = 1024
    repeats: int = 3
    threads: tuple[int, ...] = field(default_factory=lambda: tuple(dict.fromkeys((1, DEFAULT_THREADS))))

    @classmethod
    def full(cls) -> "Settings":
        return cls()

    @classmethod
    def quick(cls) -> "Settings":
        return cls(
            contexts=(256, 512), decode_steps=4, host_small_values=2000, host_large_values=128,
            disk_values={4 * KiB: 500, 64 * KiB: 100}, reopen_entries=(500, 2000), churn_entries=4000,
            churn_puts=500, repeats=1, disk_rounds=2,
        )


@dataclass
class Result:
    """One line of the table.  ``figure``/``baseline`` are in ``unit``; ``ratio`` = figure / baseline
    (for times: lower is better; for throughputs: higher).  ``target`` is checked against ``ratio``
    (``target_on="ratio"``) or against ``figure`` itself (``"figure"``, e.g. reopen seconds);
    ``target_op`` is ``"<="`` or ``">="``; ``met`` is ``None`` where the row has no target."""

    row: int
    name: str
    threads: int
    unit: str
    figure: float
    baseline: float
    baseline_name: str
    target: float | None = None
    target_op: str = "<="
    target_on: str = "ratio"
    samples: list[float] = field(default_factory=list)
    baseline_samples: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.figure / self.baseline if self.baseline else float("nan")

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        value = self.ratio if self.target_on == "ratio" else self.figure
        return value <= self.target if self.target_op == "<=" else value >= self.target

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["ratio"] = self.ratio
        out["met"] = self.met
        return out


@dataclass
class Context:
    """What the rows share within one run: settings, a scratch directory on the real disk, the model."""

    settings: Settings
    workdir: Path
    progress: Callable[[str], None] = lambda msg: None
    _model: Any = None
    _stores: dict[int, Path] = field(default_factory=dict)
    _prompts: dict[int, tuple[torch.Tensor, Any]] = field(default_factory=dict)

    def prompt(self, n_tokens: int) -> tuple[torch.Tensor, Any]:
        """``(ids, prefilled DynamicCache)`` for a context of ``n_tokens``, built once per run (the
        prefill runs at the default thread count; no configuration's timing includes it)."""
        if n_tokens not in self._prompts:
            model, tokenizer = self.model()
            ids = prompt_ids(tokenizer, n_tokens, model.config.vocab_size)
            with torch_threads(DEFAULT_THREADS):
                self._prompts[n_tokens] = (ids, prefill(model, ids))
        return self._prompts[n_tokens]

    def model(self) -> tuple[Any, Any]:
        if self._model is None:
            self._model = load_model(self.settings.model)
        return self._model


def _direct_io_options(cls: type, enabled: bool) -> dict[str, bool]:
    """``{"direct_io": enabled}`` where ``cls`` (a settings/config dataclass) has the option, else ``{}``."""
    return {"direct_io": enabled} if has_field(cls, "direct_io") else {}


def _tier_stats(stats: dict[str, Any], kind: str) -> dict[str, Any]:
    """The per-tier stats row of the ``kind`` ("host" / "disk") tier, or ``{}``."""
    tiers = stats.get("tiers", {})
    if kind in tiers:
        return tiers[kind]
    for name, row in tiers.items():
        if kind in name:
            return row
    return {}


# -- rows 1 and 2: exact decode -------------------------------------------------------------------------
def load_model(name: str) -> tuple[Any, Any]:
    """``(model, tokenizer_or_None)``: SmolLM2-135M-Instruct, or a tiny random Llama for tests."""
    if name == "smollm2":
        from tiercache_llm.models import load_smollm2

        return load_smollm2()
    if name == "tiny":
        from transformers import AutoModelForCausalLM, LlamaConfig

        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                             pad_token_id=0, bos_token_id=1, eos_token_id=2)
        return AutoModelForCausalLM.from_config(config).eval(), None
    raise ValueError(f"unknown model {name!r}: use 'smollm2' or 'tiny'")


def prompt_ids(tokenizer: Any, n_tokens: int, vocab: int) -> torch.Tensor:
    """``(1, n)`` prompt ids of (about, never more than) ``n_tokens`` tokens: a natural-language
    passkey haystack for a real tokenizer, fixed pseudo-random ids without one."""
    if tokenizer is None:
        gen = torch.Generator().manual_seed(n_tokens)
        return torch.randint(3, vocab, (1, n_tokens), generator=gen)
    from tiercache_llm.prompts import passkey_prompt

    return passkey_prompt(tokenizer, n_tokens=n_tokens).input_ids


class StepClock:
    """A ``generate`` streamer that timestamps each new token.  ``hook(i)`` runs after token ``i``
    outside the timed span (dropping the page cache, reading counters), so ``steps[i]`` is the
    wall time of decode step ``i`` alone."""

    def __init__(self, hook: Callable[[int], None] | None = None) -> None:
        self.hook = hook
        self.puts = 0
        self.steps: list[float] = []
        self.tokens: list[int] = []
        self._resume: float | None = None

    def put(self, value: torch.Tensor) -> None:
        now = time.perf_counter()
        if self.puts > 0:  # the first put is the prompt, before any forward pass
            self.steps.append(now - self._resume)  # type: ignore[operator]
            self.tokens.extend(int(t) for t in value.reshape(-1))
        if self.hook is not None:
            self.hook(self.puts)
        self.puts += 1
        self._resume = time.perf_counter()

    def end(self) -> None:
        pass


def prefill(model: Any, ids: torch.Tensor) -> Any:
    """A ``DynamicCache`` holding every prompt token but the last (the last goes through ``generate``,
    so the timed steps are pure decode and no configuration pays for a long prefill)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids[:, :-1], **cache_kwargs(cache, model), use_cache=True)
    return cache


def _tiered_from(prefilled: Any, model: Any, options: dict[str, Any]) -> Any:
    from tiercache_llm import TieredKVCache

    cache = TieredKVCache(model.config, **options)
    for i, layer in enumerate(prefilled.layers):
        cache.update(layer.keys, layer.values, i)
    return cache


def decode_run(model: Any, ids: torch.Tensor, prefilled: Any, config: str, settings: Settings,
               workdir: Path) -> dict[str, Any]:
    """Greedy ``generate`` of ``decode_steps + 1`` tokens from the prefilled prompt with one cache
    configuration: ``dynamic`` (transformers ``DynamicCache``), ``host`` (``TieredKVCache``, all KV in
    the host tier), ``disk-warm`` / ``disk-cold`` (host ``decode_host`` + a disk tier under
    ``workdir``; cold drops the store from the page cache before every step, or bypasses it with the
    disk tier's ``direct_io`` option where the installed tiercache has one).  The first new token
    (it also consumes the last prompt token) is not timed.  Returns ms per step, tokens and counters."""
    from tiercache_llm import TieredKVSettings

    steps = settings.decode_steps
    store = workdir / "kv"
    shutil.rmtree(store, ignore_errors=True)
    kv_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in prefilled.layers)
    grow = 2 * (steps + 2) * kv_bytes // max(1, ids.shape[-1])  # room for the new tokens
    cold_method = None
    blocks = {} if settings.block_size is None else {"block_size": settings.block_size}
    if config == "dynamic":
        cache = copy.deepcopy(prefilled)
    elif config == "host":
        cache = _tiered_from(prefilled, model, dict(host=2 * (kv_bytes + grow) + 16 * MiB, **blocks))
    elif config in ("disk-warm", "disk-cold"):
        cold = config == "disk-cold"
        cache = _tiered_from(prefilled, model, dict(
            host=settings.decode_host, disk=4 * (kv_bytes + grow) + 64 * MiB, path=store,
            **blocks, **_direct_io_options(TieredKVSettings, cold)))
        if cold:
            disk_row = _tier_stats(cache.stats()["tiercache"], "disk")
            cold_method = "direct_io" if disk_row.get("direct_io") else "fadvise"
    else:
        raise ValueError(f"unknown decode configuration {config!r}")

    snapshots: dict[str, Any] = {}

    def hook(i: int) -> None:
        if cold_method == "fadvise":
            drop_page_cache(store)
        if i == 1 and config != "dynamic":
            snapshots["first"] = cache.stats()

    clock = StepClock(hook)
    try:
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(cache, model), do_sample=False,
                           max_new_tokens=steps + 1, min_new_tokens=steps + 1, streamer=clock,
                           pad_token_id=model.config.eos_token_id)
        out: dict[str, Any] = {"config": config, "ms_per_step": 1000 * median(clock.steps[1:]),
                               "step_ms": [1000 * s for s in clock.steps[1:]], "tokens": clock.tokens,
                               "cold_method": cold_method}
        if config != "dynamic":
            last = cache.stats()
            first = snapshots["first"]
            kv0, kv1 = first["kv"], last["kv"]
            n = steps
            entries = (kv1["blocks_fetched"] - kv0["blocks_fetched"]) / n
            nbytes = (kv1["bytes_fetched"] - kv0["bytes_fetched"]) / n
            out.update(
                fetch_ms_per_step=1000 * (kv1["fetch_seconds"] - kv0["fetch_seconds"]) / n,
                entries_per_step=entries, bytes_per_step=nbytes,
                entry_bytes=int(round(nbytes / entries)) if entries else 0,
                block_size=last["kv"]["block_size"],
                host_hits_per_step=(_tier_stats(last["tiercache"], "host").get("hits", 0)
                                    - _tier_stats(first["tiercache"], "host").get("hits", 0)) / n,
                disk_hits_per_step=(_tier_stats(last["tiercache"], "disk").get("hits", 0)
                                    - _tier_stats(first["tiercache"], "disk").get("hits", 0)) / n,
                disk_tier=_tier_stats(last["tiercache"], "disk"),
                # which path the timed steps took: reads ahead (started) or inline copies (inline)
                read_ahead={k: last["prefetch"].get(k, 0) - first["prefetch"].get(k, 0)
                            for k in ("started", "inline", "blocks_ahead", "blocks_sync", "wait_seconds",
                                      "sync_seconds", "sync_cpu_seconds", "background_seconds",
                                      "background_cpu_seconds")},
            )
            ahead = out["read_ahead"]
            # The fetch's CPU time (reader threads + the blocks updates read inline, e.g. every block when
            # torch's threads fill the cores), and the fetch time the forward pass itself saw (its waits for
            # reads ahead + the blocks it read itself): what a layer-ahead fetch costs beside the model.
            out["reader_cpu_ms_per_step"] = 1000 * (ahead["background_cpu_seconds"] + ahead["sync_cpu_seconds"]) / n
            out["exposed_ms_per_step"] = 1000 * (ahead["wait_seconds"] + ahead["sync_seconds"]) / n
            if config.startswith("disk"):
                out["alone_ms"] = fetch_alone(cache, steps, (lambda: drop_page_cache(store))
                                              if cold_method == "fadvise" else (lambda: None))
                out["alone_ms_per_step"] = median(out["alone_ms"])
        return out
    finally:
        if config != "dynamic":
            cache.close()
        shutil.rmtree(store, ignore_errors=True)


def fetch_alone(cache: Any, repeats: int, before: Callable[[], None]) -> list[float]:
    """ms of one step's fetch with nothing running beside it: every layer's visible blocks read into the
    decode buffer as during decode at the current thread count (``TieredKVCache._ahead_mode``, where the
    installed tiercache_llm has it: small memory-held layers inline; else ``_ahead_overlaps``): by a
    reader thread where decode reads the layer ahead (``prefetch`` + ``take``, disk-reading layers
    ``buffer.schedule()``'s group at a time with one job and one ``get_many`` each, as decode reads layers
    beyond the next; memory-held ones ``buffer.group`` at a time), else inline on this thread
    (the layer's own read, as its ``update`` does when torch's threads fill the cores), one layer after the
    other; ``before()`` runs outside the timing of each repeat (cold: drop the page cache).  The
    like-for-like counterpart of :func:`plain_fetch`, which also runs alone."""
    mode = cache._ahead_mode(0) if hasattr(cache, "_ahead_mode") else cache._ahead_overlaps()
    buffer = cache.buffer
    sizes = {True: max(1, min(buffer.group, buffer.max_depth + 1)),  # memory-held layers
             False: max(1, min(buffer.schedule()[0] if hasattr(buffer, "schedule") else buffer.group,
                               buffer.max_depth + 1))}

    def read_ahead(group: list[Any]) -> None:  # as decode reads layers beyond the next: together, a slot each
        with buffer.together():
            started = [layer for slot, layer in enumerate(group) if layer.prefetch(slot)]
        for layer in started:
            _, error = buffer.take(layer)
            if error is not None:
                raise error

    # Which layers are held in memory, found once outside the timing (a fetch moves nothing): groups are all
    # disk-reading or all memory-held.
    in_memory = [layer.held_in_memory() for layer in cache.layers] if mode is True else None
    times = []
    for _ in range(repeats):
        before()
        start = time.perf_counter()
        group: list[Any] = []
        held = False
        for i, layer in enumerate(cache.layers):
            if mode is True or (mode and not layer.held_in_memory()):
                kind = in_memory[i] if in_memory is not None else False
                if group and kind != held:
                    read_ahead(group)
                    group = []
                held = kind
                group.append(layer)
                if len(group) == sizes[held]:
                    read_ahead(group)
                    group = []
                continue
            if group:
                read_ahead(group)
                group = []
            first, n, _ = layer._visible_blocks()
            if n > 0:
                buf = buffer.get(n * layer.block_size + layer._tail_len + 1, (layer._batch, *layer._shape_k),
                                 (layer._batch, *layer._shape_v), layer.dtype, layer.device, layer.block_size,
                                 buffer.slot_for(layer), joint=layer._joint)
                layer._read_blocks(first, 0, n, buf, count=False)
        if group:
            read_ahead(group)
        times.append(1000 * (time.perf_counter() - start))
    return times


def read_files_into(paths: Sequence[Path], bufs: Sequence[torch.Tensor]) -> None:
    """The plainest read of whole files into given buffers: open, ``readinto``, close, one file at a time."""
    for path, buf in zip(paths, bufs):
        with open(path, "rb", buffering=0) as f:
            f.readinto(memoryview(buf.numpy()))


def _minor_faults() -> int:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    except (ImportError, OSError):  # no getrusage on this platform
        return 0


def plain_fetch(entries: float, disk_entries: float, entry_bytes: int, cold: bool, steps: int,
                workdir: Path, beside: DecodeBeside | None = None) -> dict[str, float]:
    """What fetching one step's bytes costs without tiercache: ``disk_entries`` files of ``entry_bytes``
    read with open/readinto/close (page cache dropped before each step when ``cold``, else warmed by
    one read first), plus a copy (``copy_`` at the current torch thread count) of each host-resident entry.
    Reads and copies land in destination buffers allocated once and reused every step, as tiercache's reads
    land in the decode buffer: a fresh ``torch.empty`` per file would make the figure depend on the
    allocator's state (whether freed buffers are reused or new pages are faulted in: 9 vs 3 ms per step for
    48 files of 384 KiB, alternating between steps).  Median ms per step (wall), and ``cpu_ms_per_step``:
    the process's CPU time of the same (nothing else of this process runs then); ``faults``: minor page
    faults per step (0 when nothing is faulted in).  ``crc_ms``: a crc32c pass over the bytes read (what
    verifying them, as the disk tier does, adds).

    ``beside``: each step is timed while that model decodes on its own thread (started after the page cache
    is dropped, before the timing; stopped after it), as the tier's fetch during decode runs beside the
    forward pass; ``cpu_ms_per_step`` then includes the model's CPU time (not a figure of the reads), and
    ``passes``: forward passes that overlapped each timed step."""
    from tiercache.tiers.disk import _crc32c

    crc32c = _crc32c()
    n_disk, n_host = int(round(disk_entries)), int(round(entries - disk_entries))
    raw = workdir / "plain"
    shutil.rmtree(raw, ignore_errors=True)
    paths = write_files(raw, n_disk, entry_bytes)
    host = [torch.empty(entry_bytes // 4, dtype=torch.float32).fill_(1.0) for _ in range(n_host)]
    host_out = [torch.empty_like(t).fill_(0.0) for t in host]
    disk_out = [torch.empty(entry_bytes, dtype=torch.uint8).fill_(0) for _ in range(n_disk)]
    if not cold:
        read_files_into(paths, disk_out)
    disk_ms, host_ms, cpu_ms, crc_ms, faults, passes = [], [], [], [], [], []
    try:
        for _ in range(steps):
            if cold:
                drop_page_cache(raw)
            if beside is not None:
                beside.start()
                before = beside.passes
            flt = _minor_faults()
            cpu = time.process_time()
            start = time.perf_counter()
            read_files_into(paths, disk_out)
            mid = time.perf_counter()
            for dst, src in zip(host_out, host):
                dst.copy_(src)
            end = time.perf_counter()
            cpu_ms.append(1000 * (time.process_time() - cpu))
            faults.append(_minor_faults() - flt)
            if beside is not None:
                beside.stop()
                passes.append(beside.passes - before)  # the pass under way at the start counts once done
            disk_ms.append(1000 * (mid - start))
            host_ms.append(1000 * (end - mid))
            start = time.perf_counter()
            for t in disk_out:
                crc32c(memoryview(t.numpy()))
            crc_ms.append(1000 * (time.perf_counter() - start))
    finally:
        shutil.rmtree(raw, ignore_errors=True)
    return {"ms_per_step": median(d + h for d, h in zip(disk_ms, host_ms)), "disk_ms": median(disk_ms),
            "host_ms": median(host_ms), "cpu_ms_per_step": median(cpu_ms), "crc_ms": median(crc_ms),
            "faults": median(faults), "disk_files": n_disk, "host_copies": n_host,
            **({"passes": passes} if beside is not None else {})}


def rows_decode(ctx: Context, threads: int, rows: Sequence[int]) -> list[Result]:
    """Rows 1 and 2 for every context (configurations interleaved, order rotated per repeat)."""
    s = ctx.settings
    model, _ = ctx.model()
    configs = ["dynamic"] + (["host"] if 1 in rows else []) + (["disk-warm", "disk-cold"] if 2 in rows else [])
    results: list[Result] = []
    for n_ctx in s.contexts:
        ctx.progress(f"prefill {n_ctx} tokens")
        ids, prefilled = ctx.prompt(n_ctx)
        runs: dict[str, list[dict[str, Any]]] = {c: [] for c in configs}
        plain: dict[str, list[dict[str, float]]] = {"disk-warm": [], "disk-cold": []}
        # The same plain reads timed beside the same model decoding the same prompt on another thread (at this
        # thread count): the like-for-like baseline of the fetch during decode, right after the alone one.
        plain_beside: dict[str, list[dict[str, float]]] = {"disk-warm": [], "disk-cold": []}
        beside = DecodeBeside(model, ids, copy.deepcopy(prefilled), name="hotpath-beside") if 2 in rows else None
        try:
            for r in range(s.repeats):
                for config in configs[r % len(configs):] + configs[: r % len(configs)]:
                    ctx.progress(f"decode {n_ctx} tokens, {config}, {threads} thread(s), repeat {r + 1}")
                    run = decode_run(model, ids, prefilled, config, s, ctx.workdir)
                    runs[config].append(run)
                    if config in plain and run["entries_per_step"]:
                        args = (run["entries_per_step"], run["disk_hits_per_step"], run["entry_bytes"],
                                config == "disk-cold", s.decode_steps, ctx.workdir)
                        plain[config].append(plain_fetch(*args))
                        plain_beside[config].append(plain_fetch(*args, beside=beside))
        finally:
            if beside is not None:
                beside.close()
        dyn = [run["ms_per_step"] for run in runs["dynamic"]]
        ref_tokens = runs["dynamic"][0]["tokens"]
        tokens = ids.shape[-1]

        def blocks(config: str) -> str:
            return f"{runs[config][0]['block_size']}-token blocks"

        def decode_result(row: int, config: str, label: str, target: float) -> Result:
            figs = [run["ms_per_step"] for run in runs[config]]
            return Result(row, f"exact decode, {label}, {tokens}-token context, {blocks(config)}", threads,
                          "ms/step", median(figs), median(dyn), "DynamicCache ms/step", target, "<=", samples=figs, baseline_samples=dyn,
                          extra={"tokens_match_dynamic": all(run["tokens"] == ref_tokens for run in runs[config]),
                                 "runs": runs[config], "dynamic_runs": runs["dynamic"],
                                 "decode_steps": s.decode_steps, "cold_method": runs[config][0]["cold_method"]})

        if 1 in rows:
            results.append(decode_result(1, "host", "all KV in host", 1.15))
        if 2 in rows:
            for config, label in (("disk-warm", "warm"), ("disk-cold", "cold")):
                method = runs[config][0]["cold_method"]
                where = f"host {s.decode_host // MiB} MiB + disk, {label}" + (f" ({method})" if method else "")
                results.append(decode_result(2, config, where, 1.5))
                fetch = [run["fetch_ms_per_step"] for run in runs[config]]
                base = [p["ms_per_step"] for p in plain[config]]
                last = runs[config][-1]
                extra = {"entries_per_step": last["entries_per_step"], "disk_hits_per_step": last["disk_hits_per_step"],
                         "host_hits_per_step": last["host_hits_per_step"], "entry_bytes": last["entry_bytes"],
                         "plain": plain[config], "cold_method": last["cold_method"], "disk_tier": last["disk_tier"],
                         "exposed_ms_per_step": [run["exposed_ms_per_step"] for run in runs[config]],
                         "plain_crc_ms": [p["crc_ms"] for p in plain[config]]}
                what = f"host {s.decode_host // MiB} MiB + disk, {label}, {tokens}-token context, {blocks(config)}"
                # (1) the fetch's wall time during decode: the reader thread's, beside the forward pass
                results.append(Result(
                    2, f"fetch per step, {what}",
                    threads, "ms/step", median(fetch), median(base), "plain reads + copies of the same bytes",
                    1.3, "<=", samples=fetch, baseline_samples=base, extra=extra))
                # (2) the same fetch run alone (no decode beside it), like the baseline
                alone = [run["alone_ms_per_step"] for run in runs[config]]
                results.append(Result(
                    2, f"fetch per step alone (no decode beside it), {what}",
                    threads, "ms/step", median(alone), median(base), "plain reads + copies of the same bytes",
                    1.3, "<=", samples=alone, baseline_samples=base,
                    extra={"alone_ms": [run["alone_ms"] for run in runs[config]]}))
                # (1') the fetch during decode vs the same plain reads during the same decode: both loaded alike
                base_beside = [p["ms_per_step"] for p in plain_beside[config]]
                results.append(Result(
                    2, f"fetch per step during decode vs plain reads during the same decode, {what}",
                    threads, "ms/step", median(fetch), median(base_beside),
                    "plain reads + copies of the same bytes beside the same model decoding",
                    1.3, "<=", samples=fetch, baseline_samples=base_beside,
                    extra={"plain_beside": plain_beside[config]}))
                # (3) the reader thread's CPU time during decode vs the baseline's CPU time
                cpu = [run["reader_cpu_ms_per_step"] for run in runs[config]]
                base_cpu = [p["cpu_ms_per_step"] for p in plain[config]]
                results.append(Result(
                    2, f"fetch CPU per step (reader threads + inline reads, during decode), {what}",
                    threads, "ms/step", median(cpu), median(base_cpu),
                    "CPU time of plain reads + copies of the same bytes",
                    1.3, "<=", samples=cpu, baseline_samples=base_cpu))
    return results


# -- rows 3 and 4: host tier vs a dict of clones -----------------------------------------------------------
def _values(count: int, nbytes: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(nbytes // 4, generator=gen) for _ in range(count)]


_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers
_GLIBC_TRIM_DEFAULT = 128 * KiB


@contextlib.contextmanager
def heap_kept() -> Iterator[bool]:
    """While the block runs, glibc keeps freed heap memory instead of trimming the top of the heap and
    handing it back to the kernel (``mallopt(M_TRIM_THRESHOLD, 1 GiB)``; put back to glibc's default of
    128 KiB after).  Yields whether that was set (False off glibc: nothing changes).

    Rows 3-4 time the tier, whose arena is recycled through ``tiercache.tiers.memory.ARENA_POOL`` (faulted
    in once, by the first repeat), against a dict of clones, whose memory comes from the C heap: whether a
    repeat's clones reused the previous repeat's freed memory or faulted every page in again (16 faults per
    64 KiB value: ~1.6 against ~6.9 GiB/s) depended on whether glibc had trimmed the heap, i.e. on what
    else happened to sit above them; with trimming off, and after one untimed repeat (:func:`rows_host`), both
    sides write into memory already faulted in (``faults_*`` in the JSON: minor page faults per value).
    (Setting the threshold also stops glibc from adjusting its mmap threshold dynamically for the rest of the
    process, as any ``mallopt`` of it does.)"""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        yield False
        return
    kept = bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))
    try:
        yield kept
    finally:
        if kept:
            mallopt(_M_TRIM_THRESHOLD, _GLIBC_TRIM_DEFAULT)


def host_vs_dict(values: Sequence[torch.Tensor]) -> dict[str, float]:
    """Seconds for: tier put of every value, tier get of every value (single-key loops: the issue's rows),
    the same as one ``put_many`` / one ``get_many``, and the same with a dict of clones (the baseline of
    the single-key loops and of ``put_many``); ``faults_<op>``: minor page faults per value of each.

    ``get_many`` writes into ``out`` tensors allocated and touched before the timing, and its baseline
    is a dict lookup + ``copy_`` of every value into the same tensors (``dict_copy``).  (Timing the
    allocation of fresh ``out`` tensors against a dict get whose clone is dropped at once measured page
    faults, not the cache: the dropped clone's memory is handed back by the allocator and stays hot in
    the CPU cache, while ``get_many``'s results are all alive, so each of its first writes to a fresh
    page faults it in; at 64 KiB values that was ~3x the copy itself.)

    Run under :func:`heap_kept` after one untimed call (as :func:`rows_host` does), both sides write into
    memory already faulted in: the tier into its recycled arena, the dict's clones into the heap memory that
    the previous call's clones and ``out`` tensors left."""
    nbytes = sum(v.nbytes for v in values)
    count = max(1, len(values))
    times: dict[str, float] = {}

    def timed(op: str, fn: Callable[[], object]) -> None:
        # gc.collect() before each timed phase: a phase pays for the garbage-collector passes its own
        # allocations trigger, not for a full pass owed by the phase before it (whose timing would otherwise
        # depend on where the collector's thresholds happened to fall).
        gc.collect()
        faults = _minor_faults()
        start = time.perf_counter()
        fn()
        times[op] = time.perf_counter() - start
        times[f"faults_{op}"] = (_minor_faults() - faults) / count

    with tiercache.Cache(host=2 * nbytes + 16 * MiB, disk=None) as cache:
        def put_each() -> None:
            for i, v in enumerate(values):
                cache.put(i, v)

        def get_each() -> None:
            for i in range(len(values)):
                cache.get(i)
        timed("put", put_each)
        timed("get", get_each)
    # The batched variant over the same values (batch-first is the design): one put_many of
    # every value, one get_many of every key, into a fresh cache (so both variants start from an empty
    # arena).
    keys = list(range(len(values)))
    with tiercache.Cache(host=2 * nbytes + 16 * MiB, disk=None) as cache:
        timed("put_many", lambda: cache.put_many(zip(keys, values)))
        outs = [torch.zeros_like(v) for v in values]  # allocated and touched outside the timing
        timed("get_many", lambda: cache.get_many(keys, out=outs))
    store: dict[int, torch.Tensor] = {}

    def dict_put() -> None:
        for i, v in enumerate(values):
            store[i] = v.clone()

    def dict_get() -> None:
        for i in range(len(values)):
            store[i].clone()

    def dict_copy() -> None:
        for i, out in enumerate(outs):
            out.copy_(store[i])
    timed("dict_put", dict_put)
    timed("dict_get", dict_get)
    timed("dict_copy", dict_copy)
    return times


def rows_host(ctx: Context, threads: int, row: int) -> list[Result]:
    s = ctx.settings
    if row == 3:
        size, count = 4 * KiB, s.host_small_values
    else:
        size, count = 64 * KiB, s.host_large_values
    values = _values(count, size)
    samples = []
    with heap_kept() as kept:
        host_vs_dict(values)  # untimed: both sides' memory faulted in (the tier's arena, the dict's heap)
        for r in range(s.repeats):
            ctx.progress(f"host tier {size // KiB} KiB, {threads} thread(s), repeat {r + 1}")
            samples.append(host_vs_dict(values))
    results = []
    for op, label in (("put", "put"), ("get", "get"), ("put_many", "put_many (batched)"),
                      ("get_many", "get_many (batched) into out tensors")):
        tier = [t[op] for t in samples]
        base_op = "copy" if op == "get_many" else op.removesuffix("_many")
        base = [t[f"dict_{base_op}"] for t in samples]
        base_name = "copy_ into the same out tensors" if op == "get_many" else f"clone {base_op}"
        # minor page faults per value of each repeat, both sides (see heap_kept)
        extra = {"values": count, "heap_kept": kept, "faults": [t[f"faults_{op}"] for t in samples],
                 "baseline_faults": [t[f"faults_dict_{base_op}"] for t in samples]}
        if row == 3:
            results.append(Result(3, f"host tier {label}, 4 KiB values", threads, "µs/op",
                                  1e6 * median(tier) / count, 1e6 * median(base) / count,
                                  f"dict + {base_name}",
                                  3.0, "<=", samples=[1e6 * t / count for t in tier],
                                  baseline_samples=[1e6 * t / count for t in base], extra=extra))
        else:
            gib = count * size / (1 << 30)
            tier_rate, base_rate = [gib / t for t in tier], [gib / t for t in base]
            results.append(Result(4, f"host tier {label} throughput, 64 KiB values", threads, "GiB/s",
                                  median(tier_rate), median(base_rate),
                                  "dict + copy_ into the same out tensors" if op == "get_many"
                                  else f"dict of clones {base_op}",
                                  0.8, ">=",
                                  samples=tier_rate, baseline_samples=base_rate, extra=extra))
    return results


# -- row 5: disk tier warm get vs readinto ------------------------------------------------------------------
def disk_warm_get(values: Sequence[torch.Tensor], workdir: Path, rounds: int = 1) -> dict[str, float]:
    """Seconds for a warm ``get`` of every value from a disk-only store, and for reading files of the same
    sizes with open/readinto/close (both read once before, so both come from the page cache).  The two
    loops alternate ``rounds`` times (one loop is only ~15-60 ms, so one sample of each is at the mercy of
    a busy neighbour); ``get`` and ``raw_drop`` are the medians of their rounds.

    The row's baseline is ``raw_drop``: the reads with each buffer dropped at once, as the timed ``get``
    loop drops each result (like for like). ``raw`` keeps every buffer it reads, so it also pays the
    first-touch page faults of fresh memory; it was the row's baseline until 2026-12-06 and is reported
    beside the row.

    Beside them, the floor of a verified read of the format with no bookkeeping
    (:func:`_common.disk_floor_reads`: ``chunk_open``, ``chunk_held``, ``chunk_held_nocrc``, ``raw_held``)."""
    nbytes = sum(v.nbytes for v in values)
    size = values[0].nbytes
    store, raw = workdir / "row5-store", workdir / "row5-raw"
    shutil.rmtree(store, ignore_errors=True)
    shutil.rmtree(raw, ignore_errors=True)
    times: dict[str, float] = {}
    try:
        options = _direct_io_options(tiercache.CacheConfig, False)
        paths = write_files(raw, len(values), size)
        read_files(paths, size)  # warm the page cache
        gets, drops = [], []
        with tiercache.Cache(host=None, disk=4 * nbytes + 64 * MiB, path=store, **options) as cache:
            cache.put_many(list(enumerate(values)))
            for i in range(len(values)):  # warm the page cache
                cache.get(i)
            for _ in range(rounds):
                gc.collect()
                start = time.perf_counter()
                for i in range(len(values)):
                    cache.get(i)
                gets.append(time.perf_counter() - start)
                gc.collect()
                start = time.perf_counter()
                read_files(paths, size, keep=False)
                drops.append(time.perf_counter() - start)
        times["get"], times["raw_drop"] = median(gets), median(drops)
        start = time.perf_counter()
        read_files(paths, size)
        times["raw"] = time.perf_counter() - start
        times.update(_chunk_floor(workdir / "row5-chunks", paths, size))
    finally:
        shutil.rmtree(store, ignore_errors=True)
        shutil.rmtree(raw, ignore_errors=True)
    return times


def row_disk(ctx: Context, threads: int) -> list[Result]:
    s = ctx.settings
    results = []
    for size, target in ((4 * KiB, 0.6), (64 * KiB, 0.8)):
        count = s.disk_values[size]
        values = _values(count, size, seed=5)
        samples = []
        for r in range(s.repeats):
            ctx.progress(f"disk tier warm get {size // KiB} KiB, {threads} thread(s), repeat {r + 1}")
            samples.append(disk_warm_get(values, ctx.workdir, s.disk_rounds))
        gib = count * size / (1 << 30)
        tier = [gib / t["get"] for t in samples]
        base = [gib / t["raw_drop"] for t in samples]
        keep = [gib / t["raw"] for t in samples]
        floors = {name: median([gib / t[name] for t in samples])
                  for name in ("chunk_open", "chunk_held", "chunk_held_nocrc", "raw_held")}
        results.append(Result(5, f"disk tier warm get, {size // KiB} KiB values", threads, "GiB/s", median(tier),
                              median(base), "open + readinto + close of same-size files, each buffer dropped",
                              target, ">=", samples=tier, baseline_samples=base,
                              extra={"values": count, "raw_keep_gib_s": median(keep), "raw_keep_samples": keep,
                                     "ratio_to_raw_keep": median(tier) / median(keep),
                                     # the verified-read floor (see disk_warm_get), GiB/s and ratio to the baseline
                                     **{f"{name}_gib_s": rate for name, rate in floors.items()},
                                     **{f"{name}_ratio": rate / median(base) for name, rate in floors.items()}}))
    return results


def _chunk_floor(directory: Path, raw_paths: Sequence[Path], size: int) -> dict[str, float]:
    """Seconds for each of :func:`_common.disk_floor_reads`' steps (see :func:`disk_warm_get`), each read
    once before timing."""
    steps, close = disk_floor_reads(directory, raw_paths, size)
    times: dict[str, float] = {}
    try:
        for step in steps.values():  # warm
            step()
        for name, step in steps.items():
            gc.collect()
            start = time.perf_counter()
            step()
            times[name] = time.perf_counter() - start
    finally:
        close()
    return times


# -- row 6: reopen ------------------------------------------------------------------------------------------
def _reopen_capacity(entries: int, value_bytes: int) -> int:
    return entries * max(8 * KiB, 2 * value_bytes) + 64 * MiB


def build_store(path: Path, entries: int, value_bytes: int, progress: Callable[[str], None]) -> None:
    """A disk-only store holding ``entries`` small values (keys ``0..entries-1``), closed."""
    shutil.rmtree(path, ignore_errors=True)
    value = torch.arange(value_bytes // 4, dtype=torch.float32)
    batch = 1000
    with tiercache.Cache(host=None, disk=_reopen_capacity(entries, value_bytes), path=path) as cache:
        for start in tqdm(range(0, entries, batch), desc=f"building a {entries}-entry store", unit="k entries",
                          leave=False):
            cache.put_many([(i, value) for i in range(start, min(entries, start + batch))])
    progress(f"built {entries}-entry store")


def time_reopen(path: Path, entries: int, value_bytes: int) -> tuple[float, dict[str, Any]]:
    """Seconds to construct a ``Cache`` over an existing store (closing it is not timed)."""
    start = time.perf_counter()
    cache = tiercache.Cache(host=None, disk=_reopen_capacity(entries, value_bytes), path=path)
    seconds = time.perf_counter() - start
    try:
        stats = cache.stats()
        if stats["entries"] != entries:
            raise RuntimeError(f"reopened store holds {stats['entries']} entries, expected {entries}")
        disk = _tier_stats(stats, "disk")
        info = {k: disk[k] for k in ("index", "direct_io") if k in disk}
    finally:
        cache.close()
    return seconds, info


def scan_store(path: Path) -> float:
    """Seconds to list every file of the store recursively with ``os.scandir`` (the reference)."""
    start = time.perf_counter()
    stack, count = [str(path)], 0
    while stack:
        with os.scandir(stack.pop()) as it:
            for entry in it:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                else:
                    count += 1
    return time.perf_counter() - start


def row_reopen(ctx: Context, threads: int) -> list[Result]:
    s = ctx.settings
    results = []
    targets = {(10_000, "warm"): 0.1, (100_000, "warm"): 0.5, (100_000, "cold"): 2.0}
    for entries in s.reopen_entries:
        path = ctx._stores.get(entries)
        if path is None:
            path = ctx.workdir / f"reopen-{entries}"
            build_store(path, entries, s.reopen_value_bytes, ctx.progress)
            ctx._stores[entries] = path
        samples: dict[str, list[float]] = {"warm": [], "cold": [], "scan_warm": [], "scan_cold": []}
        info: dict[str, Any] = {}  # the disk tier's own description per mode (index loaded / scanned, ...)
        for r in range(s.repeats):
            ctx.progress(f"reopen {entries} entries, {threads} thread(s), repeat {r + 1}")
            # cold, then warm: the cold reopen (and a close that may write an index) leaves the store in the
            # page cache, so no extra untimed reopen is needed; each scan runs in its reopen's cache state.
            drop_page_cache(path)
            samples["scan_cold"].append(scan_store(path))
            drop_page_cache(path)
            seconds, info["cold"] = time_reopen(path, entries, s.reopen_value_bytes)
            samples["cold"].append(seconds)
            seconds, info["warm"] = time_reopen(path, entries, s.reopen_value_bytes)
            samples["warm"].append(seconds)
            samples["scan_warm"].append(scan_store(path))
        for mode in ("warm", "cold"):
            target = targets.get((entries, mode))
            results.append(Result(6, f"reopen, {entries} entries, {mode}", threads, "s", median(samples[mode]),
                                  median(samples[f"scan_{mode}"]), "os.scandir of the store", target, "<=",
                                  "figure", samples=samples[mode], baseline_samples=samples[f"scan_{mode}"],
                                  extra={"value_bytes": s.reopen_value_bytes, "disk_tier": info.get(mode, {})}))
    return results


# -- row 7: put after churn ---------------------------------------------------------------------------------
def churn(entries: int, puts: int, value_bytes: int) -> dict[str, float]:
    """µs per put of ``puts`` new keys into a host tier already holding ``entries`` values, before and
    after deleting every other one of them (µs per delete too)."""
    value = torch.arange(value_bytes // 4, dtype=torch.float32)
    capacity = 2 * (entries + 2 * puts) * max(4 * KiB, value_bytes) + 16 * MiB
    with tiercache.Cache(host=capacity, disk=None) as cache:
        batch = 5000
        for start in range(0, entries, batch):
            cache.put_many([(i, value) for i in range(start, min(entries, start + batch))])
        gc.collect()  # each timed phase pays for the collections its own allocations trigger (see row 3)
        t0 = time.perf_counter()
        for i in range(entries, entries + puts):
            cache.put(i, value)
        before = time.perf_counter() - t0
        for i in range(entries, entries + puts):
            cache.delete(i)
        t0 = time.perf_counter()
        for i in range(0, entries, 2):
            cache.delete(i)
        deletes = time.perf_counter() - t0
        base = 2 * entries
        gc.collect()
        t0 = time.perf_counter()
        for i in range(base, base + puts):
            cache.put(i, value)
        after = time.perf_counter() - t0
    return {"before_us": 1e6 * before / puts, "after_us": 1e6 * after / puts,
            "delete_us": 1e6 * deletes / len(range(0, entries, 2))}


def row_churn(ctx: Context, threads: int) -> list[Result]:
    s = ctx.settings
    samples = []
    for r in range(s.repeats):
        ctx.progress(f"put after churn, {s.churn_entries} entries, {threads} thread(s), repeat {r + 1}")
        samples.append(churn(s.churn_entries, s.churn_puts, s.churn_value_bytes))
    after = [t["after_us"] for t in samples]
    before = [t["before_us"] for t in samples]
    return [Result(7, f"host tier put after deleting half of {s.churn_entries} entries", threads, "µs/put",
                   median(after), median(before), "put before the deletes", 1.25, "<=", samples=after,
                   baseline_samples=before,
                   extra={"delete_us": [t["delete_us"] for t in samples], "value_bytes": s.churn_value_bytes,
                          "puts": s.churn_puts})]


# -- driver -------------------------------------------------------------------------------------------------
def run(settings: Settings, rows: Sequence[int], workdir: Path, *, show_progress: bool = True) -> list[Result]:
    """Every selected row at every thread count; results in row order within each thread count."""
    results: list[Result] = []
    jobs: list[tuple[int, Any]] = []
    for threads in settings.threads:
        if 1 in rows or 2 in rows:
            jobs.append((threads, "decode"))
        jobs.extend((threads, row) for row in rows if row >= 3)
    bar = tqdm(jobs, desc="hotpath", unit="row", disable=not show_progress)
    ctx = Context(settings, workdir, progress=lambda msg: bar.set_postfix_str(msg[:60]))
    for threads, job in bar:
        with torch_threads(threads):
            if job == "decode":
                results.extend(rows_decode(ctx, threads, rows))
            elif job in (3, 4):
                results.extend(rows_host(ctx, threads, job))
            elif job == 5:
                results.extend(row_disk(ctx, threads))
            elif job == 6:
                results.extend(row_reopen(ctx, threads))
            elif job == 7:
                results.extend(row_churn(ctx, threads))
    return sorted(results, key=lambda r: (r.row, r.threads))


def _fmt(value: float) -> str:
    if value != value:  # nan
        return "–"
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"


def table(results: Sequence[Result]) -> list[str]:
    lines = ["| row | what | threads | figure | baseline | ratio | target | met |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r.target is None:
            target = "–"
        elif r.target_on == "ratio":
            target = f"ratio {r.target_op} {r.target:g}"
        else:
            target = f"{r.target_op} {r.target:g} {r.unit}"
        met = {True: "met", False: "**not met**", None: "–"}[r.met]
        lines.append(f"| {r.row} | {r.name} | {r.threads} | {_fmt(r.figure)} {r.unit} | {_fmt(r.baseline)} {r.unit} "
                     f"({r.baseline_name}) | {_fmt(r.ratio)}× | {target} | {met} |")
    return lines


def _load(meta: dict[str, Any], key: str) -> str:
    value = meta.get(key)
    return "/".join(f"{x:.1f}" for x in value) if value else "?"


def write_results(results: Sequence[Result], meta: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "hotpath.json").write_text(json.dumps({"meta": meta, "results": [r.to_json() for r in results]},
                                                 indent=1, default=str))
    lines = ["# Hot-path benchmark (CPU)", "",
             f"`{meta['command']}` on {meta['machine']} ({meta['cpus']} CPUs), {meta['date_utc']} UTC, "
             f"{meta['runtime_s']:.0f} s in all; load average {_load(meta, 'load_average_start')} at the start, "
             f"{_load(meta, 'load_average')} at the end (1/5/15 min).",
             "Figures are medians over repeats; the baseline is measured in the same run, interleaved with the "
             "figure. ratio = figure / baseline (times: lower is better; throughputs: higher is better). "
             "Threads = `torch.set_num_threads`. Cold = page cache dropped for the store "
             "(`fdatasync` + `posix_fadvise(DONTNEED)`) before every step/reopen, or bypassed with the disk "
             "tier's `direct_io` where available (see the row label). See docs/benchmarks.md.", ""]
    if meta.get("quick"):
        lines += ["**Quick run**: smoke-test sizes and 1 repeat; the figures say the code runs, not how fast it is.", ""]
    lines += table(results)
    (out / "hotpath.md").write_text("\n".join(lines) + "\n")
    plot(results, out / "hotpath.png")


def plot(results: Sequence[Result], path: Path) -> None:
    """One bar per table line: the ratio, with its target marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    if not results:
        return
    fig, ax = plt.subplots(figsize=(16, 0.32 * len(results) + 1.5))
    labels = [f"[{r.row}] {r.name} ({r.threads}t)" for r in results]
    ratios = [r.ratio for r in results]
    colors = ["tab:green" if r.met else ("tab:red" if r.met is False else "tab:gray") for r in results]
    ys = list(range(len(results)))
    ax.barh(ys, ratios, color=colors, alpha=0.8)
    for y, r in zip(ys, results):
        if r.target is not None and r.target_on == "ratio":
            ax.plot([r.target, r.target], [y - 0.4, y + 0.4], color="black", lw=2)
        note = f" {_fmt(r.figure)} {r.unit}"
        if r.target is not None and r.target_on == "figure":
            note += f" (target {r.target_op} {r.target:g} {r.unit})"
        if r.ratio == r.ratio:
            ax.text(r.ratio, y, note, va="center", fontsize=6)
    ax.set_yticks(ys)
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.axvline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("figure / same-run baseline (log scale); text: the figure itself\n"
                  "black tick: target on the ratio; green: target met, red: not met, gray: no target at this size")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels on a log axis overlap
    ax.set_title("tiercache hot path vs same-run baselines")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # "tight": the long row labels are kept whole
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="results directory (default benchmarks/results; with --quick a temp directory, so a "
                             "smoke run never overwrites the committed results)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 repeat (seconds per row)")
    parser.add_argument("--rows", type=lambda t: parse_ints(t, "--rows"), default=ROWS, help="e.g. 1,2,6")
    parser.add_argument("--repeats", type=int, default=None, help="repeats per figure (default 3, quick 1)")
    parser.add_argument("--threads", type=lambda t: parse_ints(t, "--threads"), default=None,
                        help=f"torch thread counts (default: 1,{DEFAULT_THREADS})")
    parser.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2",
                        help="model of rows 1-2 (tiny: a random 2-layer Llama, for tests)")
    parser.add_argument("--contexts", type=lambda t: parse_ints(t, "--contexts"), default=None,
                        help="prompt lengths of rows 1-2 (default 1024,2048,4096)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed decode steps per run of rows 1-2 (default 8, quick 4)")
    parser.add_argument("--block-size", type=int, default=None,
                        help="tokens per KV block of rows 1-2 (default: TieredKVCache's exact-mode default)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="scratch directory on the disk under test (default: a temp dir under $TMPDIR)")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = Path(tempfile.gettempdir()) / "tiercache-hotpath-quick" if args.quick else Path("benchmarks/results")
    bad = sorted(set(args.rows) - set(ROWS))
    if bad:
        parser.error(f"--rows: no such row(s) {bad}; rows are {list(ROWS)}")
    settings = Settings.quick() if args.quick else Settings.full()
    settings.model = args.model
    if args.repeats is not None:
        if args.repeats < 1:
            parser.error("--repeats must be positive")
        settings.repeats = args.repeats
    if args.threads is not None:
        settings.threads = tuple(dict.fromkeys(args.threads))
    if args.contexts is not None:
        settings.contexts = args.contexts
    if args.steps is not None:
        if args.steps < 1:
            parser.error("--steps must be positive")
        settings.decode_steps = args.steps
    if args.block_size is not None:
        if args.block_size < 1:
            parser.error("--block-size must be positive")
        settings.block_size = args.block_size
    workdir = Path(tempfile.mkdtemp(prefix="tiercache-hotpath-", dir=args.workdir))
    fstype = filesystem_of(workdir)
    if fstype in ("tmpfs", "ramfs"):
        print(f"warning: {workdir} is on {fstype}: disk rows will not touch a disk", file=sys.stderr)
    load_start = os.getloadavg()
    start = time.perf_counter()
    try:
        results = run(settings, sorted(set(args.rows)), workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    meta = machine_meta()
    meta.update(command=" ".join(["python", "benchmarks/hotpath.py", *(argv if argv is not None else sys.argv[1:])]),
                runtime_s=time.perf_counter() - start, settings=asdict(settings), rows=sorted(set(args.rows)),
                workdir_filesystem=fstype, quick=args.quick,
                load_average_start=load_start)
    write_results(results, meta, args.out)
    print("\n".join(table(results)))
    print(f"\nwrote {args.out / 'hotpath.json'}, hotpath.md, hotpath.png ({meta['runtime_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
