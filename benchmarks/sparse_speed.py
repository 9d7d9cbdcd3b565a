"""Sparse-decode speed benchmark (CPU): ms per decode step, tokens/s, bytes per tier and per-stage time.

    python benchmarks/sparse_speed.py --out benchmarks/results     # full run (SmolLM2 + a deep random config)
    python benchmarks/sparse_speed.py --quick                      # tiny random model, seconds
    python benchmarks/sparse_speed.py --contexts 8192 --batches 4 --synthetic none   # the headline point only

Rows, side by side in one run (the numbering of the end-to-end issue):

1. ``dynamic``: transformers ``DynamicCache``, everything in RAM, where it fits;
2. ``exact``: exact ``TieredKVCache``;
3. ``fetch-every-step``: sparse, every selected block read from its home tier every step;
3b. ``reuse-layer-ahead``: sparse, reuse of the previous step's hits + one-layer-ahead prefetch, no
   attention-aware placement, no disk staging (the ShadowKV / InfiniGen class);
4. ``attention-aware``: sparse, the full system (attention-aware placement + pipeline + disk staging).

Tiered caches hold ``--host-fraction`` (25 %) of the KV in the host tier and the rest in a disk tier
under ``--workdir``; **cold** = the disk tier's ``direct_io`` (reads bypass the page cache; where the
filesystem refuses O_DIRECT the store is dropped from the page cache before every step, and the label
says ``fadvise``), **warm** = ``direct_io=False`` with the page cache left alone.

How it is timed (see docs/benchmarks.md, "Sparse decode speed"): the prompt rows are prefilled **once**
through the model, each row's K/V written to a file as soon as it is done (:func:`prefill_rows_to_files`);
every (context, batch) point writes a prefix / the first rows of them to one file, its K/V
(:func:`write_point_kv`), which every cache of the point is filled from (``Cache.update`` from a
copy-on-write mapping of the file; a sparse cache's key digests are appended from the same keys, see
:func:`fill_cache`).  Rounds (:meth:`Point.run`): ``--repeats`` times, every configuration of the point
in turn -- the reference (``DynamicCache``) first, the others' order rotated by one every round -- gets a
fresh cache filled from the file (untimed), decodes ``--warmup`` untimed steps (the first is the round's
"first step", the time to the second token) and ``--steps`` timed steps per ``--threads`` value, and is
closed (pools freed, disk store deleted) before the next is built.  So one cache is alive at a time
(memory: the model, one cache, the mapped K/V pages the kernel can drop), every configuration decodes the
same positions in every round, and no other cache's background work overlaps its timed steps.  The
reference's greedy tokens (first round) are fed to every configuration (teacher forcing), whose logits
are compared with the reference's at the same step.  Times are medians over every timed step, bytes per
step means (exact mode's bytes are counted by the layer updates that use them, read ahead or not).
Writes ``sparse_speed.json``, ``.md`` and ``.png`` under ``--out``, with the run's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import math
import itertools
import mmap
import os
import shutil
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from tqdm import tqdm

from tiercache_llm.hf_kwargs import cache_kwargs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402  (the benchmarks directory is not a package)
    GiB, MiB, SPARSE_UNAVAILABLE, MappedKV, SparseUnavailable, drop_page_cache, filesystem_of, find_numbers,
    has_field, kv_cache_bytes, load_bench_model, machine_meta, make_tiered, max_rss_bytes, median, memory_status,
    parse_ints, release_memory, reset_peak_rss, reuse_rate, sparse_available, stats_delta, tier_row, torch_threads,
)
from tiercache_llm.kv_cache import SPARSE_BLOCK_SIZE, default_block_size  # noqa: E402

DEFAULT_THREADS = torch.get_num_threads()
DYNAMIC, EXACT, FETCH, REUSE, AWARE = "dynamic", "exact", "fetch-every-step", "reuse-layer-ahead", "attention-aware"
SYSTEMS = (DYNAMIC, EXACT, FETCH, REUSE, AWARE)
SPARSE = (FETCH, REUSE, AWARE)
ROW = {DYNAMIC: "1", EXACT: "2", FETCH: "3", REUSE: "3b", AWARE: "4"}
HEADLINE_BUDGET = 0.25
LOGIT_TOL = 1e-3  # exact tiered vs DynamicCache: max |logit difference| (float32 attention reorderings)


# -- settings ---------------------------------------------------------------------------------------------
@dataclass
class Settings:
    model: str = "smollm2"
    contexts: tuple[int, ...] = (2048, 4096, 8192)
    batches: tuple[int, ...] = (1, 4, 8)
    full_points: tuple[tuple[int, int], ...] = ((8192, 4),)  # every budget, warm runs, bandwidth, checks
    budgets: tuple[int | float, ...] = (2048, 0.0625, 0.25)  # int: tokens; float: fraction of the context
    max_kv_gib: float = 3.0  # (context, batch) points whose float32 KV exceeds this are not run (8K x 8: 2.8 GiB)
    # timed decode steps per configuration, round and thread count: the median of 8 stands for a long decode
    # (a retaining strategy can still settle for a few steps after its fill; see 'steps 1-3 ms' and
    # docs/benchmarks.md "How many steps")
    steps: int = 8
    # untimed steps per configuration and round, right after its cache is filled: the first is 'first step ms';
    # the second still settles a retaining strategy's pools (0.9-2.3 s for reuse-layer-ahead at 4K x 4)
    warmup: int = 2
    repeats: int = 2  # rounds: every configuration's cache is built, decoded and closed once per round
    threads: tuple[int, ...] = field(default_factory=lambda: tuple(dict.fromkeys((1, DEFAULT_THREADS))))
    host_fraction: float = 0.25
    block_size: int | None = None  # None: each mode's default (default_block_size: exact 256, sparse 128)
    warm: bool = True  # warm-page-cache runs at the full points (exact and the headline budget)
    synthetic: tuple[int, ...] = (16384, 32768)  # contexts of the deep random config (batch 1); () skips it
    synthetic_layers: int = 48
    accuracy: str | None = None  # sparse_accuracy.json to show beside the budgets (None: --out's)
    # opt-in: pool budgets (fractions of the KV; inf: unbounded pools) at the full points, beside the default
    # rows, which run under the cache's default bound (pool_bytes="auto": the host tier's budget here)
    pool_fractions: tuple[float, ...] = ()

    @classmethod
    def quick(cls) -> "Settings":
        return cls(model="tiny", contexts=(256, 512), batches=(1, 2), full_points=((512, 2),), budgets=(96, 0.0625, 0.25),
                   steps=2, warmup=1, repeats=1, threads=(1,), block_size=16, synthetic=(1024,), synthetic_layers=4)


@dataclass(frozen=True)
class Config:
    """One cache configuration: a system, its sparse budget (``None`` for dense systems) and page-cache
    state (``None`` for ``DynamicCache``)."""

    system: str
    budget: int | float | None = None
    state: str | None = None
    pool: float | None = None  # pool_bytes as a fraction of the KV (inf: unbounded, named; None: the default bound)

    @property
    def label(self) -> str:
        parts = [f"({ROW[self.system]}) {self.system}"]
        if self.budget is not None:
            parts.append(budget_label(self.budget))
        if self.state:
            parts.append(self.state)
        if self.pool is not None:
            parts.append(pool_label(self.pool))
        return " ".join(parts)

    @property
    def run_state(self) -> str | None:
        """The state a run and its row carry: rows with a pool budget never stand in for the default's."""
        return self.state if self.pool is None else f"{self.state}, {pool_label(self.pool)}"


def pool_label(pool: float) -> str:
    return "pool unbounded" if math.isinf(pool) else f"pool {100 * pool:g}% of KV"


def budget_label(b: int | float) -> str:
    return f"{b} tokens" if isinstance(b, int) else f"{100 * b:g}%"


def budget_tokens(b: int | float, context: int) -> int:
    return b if isinstance(b, int) else math.ceil(b * context)


def distinct_budgets(budgets: tuple[int | float, ...], context: int, block: int) -> tuple[list[int | float], dict[str, str]]:
    """``budgets`` without those within one block of an earlier one at ``context`` (fractions first), and
    ``{merged label: kept label}`` (at 8K, 2048 tokens and 25 % differ by a few tokens: one configuration)."""
    kept: list[int | float] = []
    merged: dict[str, str] = {}
    for b in sorted(budgets, key=lambda x: isinstance(x, int)):
        same = next((k for k in kept if abs(budget_tokens(k, context) - budget_tokens(b, context)) < block), None)
        if same is None:
            kept.append(b)
        else:
            merged[budget_label(b)] = budget_label(same)
    return kept, merged


def configurations(s: Settings, full: bool, context: int, block: int) -> tuple[list[Config], dict[str, str]]:
    """The configurations of one point in run order, and ``{merged budget label: kept label}``: the
    reference (``DynamicCache``) first, then exact cold and the three sparse strategies at the headline
    budget, cold (the issue-9 ratios); at the full points then the strategies at every other budget, the
    warm runs and (opt-in) the pool budgets.  Every configuration of a point runs in every round
    (:class:`Point`), so the order only fixes the reference's place and the rotation's start."""
    budgets, merged = distinct_budgets(s.budgets if full else (HEADLINE_BUDGET,), context, block)
    headline = next((b for b in budgets if budget_label(b) == budget_label(HEADLINE_BUDGET)
                     or merged.get(budget_label(HEADLINE_BUDGET)) == budget_label(b)), budgets[0])
    configs = [Config(DYNAMIC), Config(EXACT, None, "cold")] + [Config(system, headline, "cold") for system in SPARSE]
    configs += [Config(system, b, "cold") for b in budgets if b != headline for system in SPARSE]
    if full and s.warm:
        configs += [Config(EXACT, None, "warm")] + [Config(system, headline, "warm") for system in SPARSE]
    if full and s.pool_fractions:
        # Pool budgets (opt-in): the retaining strategies unbounded and at each fraction, interleaved with the
        # default rows (which run under the default bound).
        pools = [math.inf] + [p for p in dict.fromkeys(s.pool_fractions) if not math.isinf(p)]
        configs += [Config(system, headline, "cold", pool) for pool in pools for system in (REUSE, AWARE)]
    return configs, merged


def points(s: Settings, kv_per_token: int) -> list[tuple[int, int]]:
    """(requested context, batch) points whose KV fits ``max_kv_gib`` (full points always run)."""
    return [(c, b) for c in s.contexts for b in s.batches
            if (c, b) in s.full_points or kv_per_token * c * b <= s.max_kv_gib * GiB]


def estimate_seconds(s: Settings, kv_per_token: int) -> float:
    """Rough runtime on the idle 2-core development machine (SmolLM2; tiny: / 10): prefill ≈ 3 ms per
    token per row at 8K (chunked, quadratic part included; fitted to the committed run's 117 s for four
    8K and four 2K rows); filling a tiered cache ≈ 6 ms per MiB (host copy + direct-I/O writes of the
    disk part), once per round; a step ≈ 60 ms + 0.05 ms per 1K context
    tokens × batch (dense) plus reads at ≈ 1 ms per MiB (sparse: about the budget's share); the first
    step of a retaining strategy ((3b), (4)) ≈ 2.5 ms per MiB more (it stages and promotes)."""
    pts = points(s, kv_per_token)
    rows_ctx: dict[int, int] = {}
    for c, b in pts:
        for r in range(b):
            rows_ctx[r] = max(rows_ctx.get(r, 0), c)
    total = sum(2e-3 * c * (1 + c / 16384) for c in rows_ctx.values())
    for c, b in pts:
        full = (c, b) in s.full_points
        configs, _ = configurations(s, full, c, s.block_size or SPARSE_BLOCK_SIZE)
        mib = kv_per_token * c * b / MiB
        for cfg in configs:
            frac = 1.0 if cfg.system in (DYNAMIC, EXACT) else min(1.0, budget_tokens(cfg.budget, c) / c)
            step = 0.06 + 0.05e-3 * c * b + (0 if cfg.system == DYNAMIC else 1e-3 * mib * frac)
            first = 2.5e-3 * mib if cfg.system in (REUSE, AWARE) else 0.0
            total += s.repeats * ((0 if cfg.system == DYNAMIC else 6e-3 * mib) + first
                                  + step * (s.warmup + s.steps * len(s.threads)))
    for c in s.synthetic:
        mib = 24 * 1024 * c / MiB * s.synthetic_layers / 48
        total += s.repeats * (4 * 6e-3 * mib + 2 * 2.5e-3 * mib
                              + 5 * (0.05 + 1e-3 * mib) * (s.warmup + s.steps * len(s.threads)))
    return total / (10 if s.model == "tiny" else 1)


# -- prompts, prefill, synthetic model ----------------------------------------------------------------------
def prompt_rows(tokenizer: Any, rows: int, tokens: int, vocab: int) -> torch.Tensor:
    """``(rows, n)`` prompt ids, ``n <= tokens`` equal for every row (no padding): passkey haystacks with
    different keys and depths per row for a real tokenizer, seeded random ids without one."""
    if tokenizer is None:
        return torch.randint(3, vocab, (rows, tokens), generator=torch.Generator().manual_seed(tokens))
    from tiercache_llm.prompts import passkey_prompt

    ids = [passkey_prompt(tokenizer, n_tokens=tokens, depth=(r + 0.5) / rows, seed=r).input_ids[0] for r in range(rows)]
    n = min(len(x) for x in ids)
    return torch.stack([x[:n] for x in ids])


def prefill_row(model: Any, ids: torch.Tensor, chunk: int = 2048) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer ``(keys, values)`` (``(1, H, n, D)``) of the ``(1, n)`` ids, prefilled through the model
    into a ``DynamicCache`` in ``chunk``-token pieces (memory stays at one chunk's activations)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        for start in range(0, ids.shape[-1], chunk):
            model(input_ids=ids[:, start:start + chunk], **cache_kwargs(cache, model), use_cache=True)
    return [(layer.keys, layer.values) for layer in cache.layers]


def prefill_rows(model: Any, ids: torch.Tensor, lengths: list[int], chunk: int = 2048) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per row ``r``: per-layer ``(keys, values)`` (``(1, H, lengths[r], D)``) of ``ids[r, :lengths[r]]``,
    each row prefilled alone (:func:`prefill_row`)."""
    return [prefill_row(model, ids[r:r + 1, :n], chunk) for r, n in enumerate(lengths)]


def prefill_rows_to_files(model: Any, ids: torch.Tensor, lengths: list[int], folder: Path,
                          chunk: int = 2048) -> list[MappedKV]:
    """:func:`prefill_rows`, each row written to ``folder/row<r>.kv`` as soon as it is prefilled, so only
    one row's K/V is ever in anonymous memory; the rows as :class:`MappedKV`."""
    return [MappedKV.write(folder / f"row{r}.kv", prefill_row(model, ids[r:r + 1, :n], chunk))
            for r, n in enumerate(lengths)]


def point_layers(rows: list[list[tuple[torch.Tensor, torch.Tensor]]], batch: int, tokens: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Layer by layer, the first ``batch`` rows' first ``tokens`` positions as ``(B, H, T, D)`` tensors
    (the K/V of a prefix do not depend on what follows)."""
    for i in range(len(rows[0])):
        yield (torch.cat([row[i][0][:, :, :tokens] for row in rows[:batch]]),
               torch.cat([row[i][1][:, :, :tokens] for row in rows[:batch]]))


def point_kv(rows: list[list[tuple[torch.Tensor, torch.Tensor]]], batch: int, tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`point_layers` as a list (every layer in memory)."""
    return list(point_layers(rows, batch, tokens))


def write_point_kv(rows: list[MappedKV], batch: int, tokens: int, path: Path) -> MappedKV:
    """:func:`point_layers` of the first ``batch`` spilled rows, written to ``path`` one layer at a time."""
    maps = [row.load() for row in rows[:batch]]
    return MappedKV.write(path, point_layers(maps, batch, tokens))


def deep_model(layers: int, max_positions: int, seed: int = 0) -> Any:
    """A deeper random Llama for the scaling points: ``layers`` layers, hidden 128, 2 query heads, 1 KV
    head of dim 64 (24 KiB of float32 KV per token at 48 layers), vocab 1024."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=max_positions,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation="sdpa")
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


def synthetic_kv(model: Any, tokens: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random ``(1, H, tokens, D)`` K/V per layer (the weights are random too: only timing is measured)."""
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    shape = (1, cfg.num_key_value_heads, tokens, cfg.head_dim)
    return [(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)) for _ in range(cfg.num_hidden_layers)]


# -- caches -------------------------------------------------------------------------------------------------
def fill_cache(cache: Any, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Give ``cache`` the prompt's K/V layer by layer through ``Cache.update`` (what a prefill does).

    A sparse ``TieredKVCache`` also keeps per-block key digests, which its prepared model's attention
    function appends during a forward pass (``tiercache_llm.attention_hook``); no public API appends
    them outside one, so this does what that function does for an exact (prefill) step: consume the
    layer's pending record and append the keys' digests (no padding).  Then it ends the pass as the
    prepared model's post-forward hook ends a prefill (``TieredKVCache._end_forward``: scores, admission,
    the pipeline's end-of-step staging, and the prompt's queued write-behind written before decoding
    starts -- without it a fresh cache's first steps would race its own prompt writes).  It checks
    afterwards that every sparse layer's digests cover exactly its tokens, and raises ``RuntimeError``
    otherwise (the benchmark then prefills through the model instead, see :func:`build_cache`)."""
    for i, (k, v) in enumerate(kv):
        cache.update(k, v, i)
        state = getattr(cache.layers[i], "sparse", None)
        if state is not None:
            state.pending = None
            state.append(k, torch.ones(k.shape[0], k.shape[2], dtype=torch.bool, device=k.device))
    if getattr(cache, "_sparse", None) is not None:
        cache._end_forward()
    for layer in cache.layers:
        state = getattr(layer, "sparse", None)
        if state is not None and (state.digests is None or state.digests.length != layer.get_seq_length()):
            raise RuntimeError(f"layer {layer.layer_idx}: digests do not cover the filled tokens")


def build_cache(model: Any, cfg: Config, kv: list[tuple[torch.Tensor, torch.Tensor]], s: Settings, store: Path,
                prompt: torch.Tensor | None = None, *, extra_tokens: int = 64, pipeline: dict | None = None) -> Any:
    """A fresh cache of ``cfg`` holding ``kv`` (per layer ``(B, H, T, D)``).  Tiered caches: host tier
    ``host_fraction`` of the KV bytes, disk tier twice the rest, store in ``store``.  If a sparse cache
    cannot be filled with :func:`fill_cache`, ``prompt`` (``(B, T)`` ids) is prefilled through the model.
    ``pipeline`` (sparse configurations only; ignored otherwise): ``PipelineConfig`` overrides passed to
    the cache as ``pipeline=``; ``None`` or empty passes nothing (the cache's defaults)."""
    from transformers import DynamicCache
    from tiercache_llm import TieredKVSettings

    if cfg.system == DYNAMIC:
        cache = DynamicCache(config=model.config)
        for i, (k, v) in enumerate(kv):
            cache.update(k, v, i)
        return cache
    batch, tokens = kv[0][0].shape[0], kv[0][0].shape[2]
    kv_bytes = kv_cache_bytes(model.config, tokens, batch, kv[0][0].dtype)
    grow = kv_bytes * extra_tokens // max(1, tokens)
    opts: dict[str, Any] = dict(host=max(64 * 1024, int(s.host_fraction * kv_bytes)), disk=2 * (kv_bytes + grow) + 64 * MiB,
                                path=store)
    if has_field(TieredKVSettings, "direct_io"):
        opts["direct_io"] = cfg.state == "cold"
    if s.block_size is not None:
        opts["block_size"] = s.block_size
    if cfg.pool is not None and cfg.system not in (DYNAMIC, EXACT):
        # inf: unbounded, asked for by name (None: "auto" is the default; on trees before it, None was)
        opts["pool_bytes"] = None if math.isinf(cfg.pool) else max(1, int(cfg.pool * kv_bytes))
    sparse_opts = dict(budget=cfg.budget, strategy=cfg.system, **({"pipeline": pipeline} if pipeline else {}))
    cache = make_tiered(model, "exact", **opts) if cfg.system == EXACT else \
        make_tiered(model, "sparse", **sparse_opts, **opts)
    try:
        try:
            fill_cache(cache, kv)
        except (AttributeError, RuntimeError):
            if cfg.system == EXACT or prompt is None:
                raise
            cache.close()
            shutil.rmtree(store, ignore_errors=True)
            cache = make_tiered(model, "sparse", **sparse_opts, **opts)
            with torch.no_grad():
                for start in range(0, prompt.shape[-1], 2048):
                    model(input_ids=prompt[:, start:start + 2048], **cache_kwargs(cache, model), use_cache=True)
    except BaseException:
        cache.close()
        raise
    return cache


# -- one point ----------------------------------------------------------------------------------------------
@dataclass
class Run:
    """Every timed step of one configuration at one point (all thread counts and rounds)."""

    model: str
    context: int
    requested_context: int
    batch: int
    system: str
    budget: int | float | None
    state: str | None
    label: str
    available: bool = True
    note: str | None = None
    error: str | None = None
    cold_method: str | None = None  # "direct_io" / "fadvise" for cold runs
    fill_seconds: float | None = None  # median over the rounds of filling the cache (untimed)
    fill_seconds_rounds: list[float] = field(default_factory=list)
    # every step of every round: step (0 = the first after the fill), round, threads (None: warm-up),
    # torch_threads, ms, bytes, stages, agreement
    steps: list[dict[str, Any]] = field(default_factory=list)
    reuse_rate: float | None = None
    stats: dict[str, Any] | None = None  # the last round's cache's stats() after its last step
    # the largest process RSS / anonymous RSS sampled after this configuration's fills and steps (bytes)
    max_rss_bytes: int = 0
    max_anon_bytes: int = 0


def tier_bytes(delta: dict[str, Any]) -> dict[str, float]:
    """``{tier: bytes}`` fetched in one step according to the cache's own cumulative per-tier counters
    (sparse: ``sparse.total.bytes_fetched.<tier>``), or ``{}`` when it has none."""
    out: dict[str, float] = {}
    for path, value in find_numbers({k: v for k, v in delta.items() if k != "tiercache"}, "bytes_fetched.").items():
        head, _, tier = path.rpartition(".")
        if head.endswith("bytes_fetched") and "last" not in head:
            out[tier] = out.get(tier, 0.0) + value
    return out


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def step_record(before: dict[str, Any], after: dict[str, Any], previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """Bytes per tier and per-stage seconds of one step, from two ``stats()``; ``previous``: the cache's
    ``stats()`` when its previous step ended (default ``before``), where exact's disk reads and
    ``disk_tier_bytes`` are counted from: background reads (staging ahead, exact mode's read of the next
    step's first layer) that finish between two steps are attributed to the next one instead of to neither."""
    delta = stats_delta(before, after)
    since = stats_delta(previous, after) if previous is not None else delta
    disk_since = float(tier_row(since, "disk").get("bytes_read", 0))
    per_tier = tier_bytes(delta)
    if per_tier:
        disk = sum(v for k, v in per_tier.items() if k == "disk")
        host = sum(v for k, v in per_tier.items() if k != "disk")
        source = "cache"
    else:  # exact: what the KV layer fetched, split by the disk tier's reads
        ahead = delta.get("prefetch", {})
        if "bytes_taken" in ahead:  # layer-ahead reads: bytes counted by the updates that used them
            fetched = float(ahead["bytes_taken"] + ahead["bytes_sync"])
        else:
            fetched = float(delta["kv"].get("bytes_fetched", 0))
        # The disk tier's reads since the previous step ended: this step's first layer is read ahead in the
        # background before the step starts (in its own window only when the reader thread ran late, so a
        # window-only count was anything from 0 to all of the step's disk reads), and reads ahead for the
        # next step (or discarded ones) can fall in it, so the share is capped at what the step fetched.
        # The tier's own reads in the step's window stay in ``disk_bytes_read``.
        disk = min(fetched, disk_since)
        host, source = fetched - disk, "counters"
    own = {k: v for k, v in delta.items() if k != "tiercache"}
    stages = {k: v for k, v in find_numbers(own, "seconds").items() if "last_step" not in k}
    return {"host_bytes": host, "disk_bytes": disk, "bytes_source": source, "stages": stages,
            "disk_bytes_read": float(tier_row(delta, "disk").get("bytes_read", 0)), "disk_tier_bytes": disk_since}


class Point:
    """All configurations of one (context, batch) point, timed in interleaved rounds with one cache alive
    at a time (see the module docstring and :meth:`run`)."""

    def __init__(self, model: Any, name: str, source: MappedKV, last: torch.Tensor, prompt: torch.Tensor | None,
                 configs: list[Config], s: Settings, workdir: Path, requested: int, full: bool = False) -> None:
        self.model, self.name, self.source, self.last, self.prompt = model, name, source, last, prompt
        self.configs, self.s, self.workdir, self.full = configs, s, workdir, full
        shape = source.specs[0][0]
        self.context, self.batch = shape[2] + 1, shape[0]
        self.runs = {cfg: Run(name, self.context, requested, self.batch, cfg.system, cfg.budget, cfg.run_state, cfg.label)
                     for cfg in configs}
        self.feed: list[torch.Tensor] = [last]  # input ids of step i (the reference's greedy tokens)
        self.ref_logits: list[torch.Tensor] = []
        self.bandwidth: dict[str, Any] = {}
        self.raw_samples: list[dict[str, Any]] = []  # read_in_decode_order before and after each exact cold round
        self.memory: dict[str, int] = {"max_rss_bytes": 0, "max_anon_bytes": 0}

    def store(self, cfg: Config) -> Path:
        return self.workdir / f"{cfg.system}-{cfg.budget}-{cfg.state}-{cfg.pool}"

    def sample_memory(self, run: Run) -> None:
        """Keep the largest RSS and anonymous RSS seen, for the point and for ``run`` (sampled after every
        fill and step, untimed)."""
        now = memory_status()
        for key in ("rss", "anon"):
            name = f"max_{key}_bytes"
            self.memory[name] = max(self.memory[name], now.get(key, 0))
            setattr(run, name, max(getattr(run, name), now.get(key, 0)))

    def build(self, cfg: Config, skip: dict[str, str]) -> Any:
        """A fresh cache of ``cfg`` filled from the point's saved K/V (untimed), or ``None`` where the
        configuration is unavailable or has failed."""
        run = self.runs[cfg]
        if not run.available:
            return None
        if cfg.system in skip:
            run.available, run.note = False, skip[cfg.system]
            return None
        t0 = time.perf_counter()
        kv = self.source.load()
        try:
            with torch_threads(DEFAULT_THREADS):
                cache = build_cache(self.model, cfg, kv, self.s, self.store(cfg), self.prompt)
        except SparseUnavailable as exc:
            run.available, run.note = False, str(exc)
            skip[cfg.system] = str(exc)
            return None
        except Exception as exc:  # noqa: BLE001 - a sparse failure is reported; the others must work
            if cfg.system in (DYNAMIC, EXACT):
                raise
            fail(run, exc)
            shutil.rmtree(self.store(cfg), ignore_errors=True)
            return None
        finally:
            del kv  # the mappings go once the cache no longer refers to them (DynamicCache: after its first step)
        run.fill_seconds_rounds.append(time.perf_counter() - t0)
        run.fill_seconds = median(run.fill_seconds_rounds)
        if cfg.state == "cold":
            run.cold_method = "direct_io" if tier_row(cache.stats(), "disk").get("direct_io") else "fadvise"
        self.sample_memory(run)
        return cache

    def decode(self, cfg: Config, cache: Any, rnd: int) -> None:
        """One round of ``cfg`` on its freshly filled ``cache``: ``--warmup`` untimed steps at the first
        thread count (the first of them is the round's first step after the fill), then ``--steps`` timed
        steps per thread count, every step fed the reference's greedy tokens.  The reference records those
        tokens and its logits in the first round."""
        run = self.runs[cfg]
        tiered = hasattr(cache, "stats")
        reference = cfg == self.configs[0]
        plan = [(self.s.threads[0], None)] * self.s.warmup + [(t, t) for t in self.s.threads for _ in range(self.s.steps)]
        previous: dict[str, Any] | None = None
        try:
            with torch.no_grad():
                for i, (threads, timed) in enumerate(plan):
                    if run.cold_method == "fadvise":
                        drop_page_cache(self.store(cfg))
                    with torch_threads(threads):
                        before = cache.stats() if tiered else None
                        start = time.perf_counter()
                        logits = self.model(input_ids=self.feed[i], **cache_kwargs(cache, self.model), use_cache=True).logits
                        elapsed = time.perf_counter() - start
                    last = logits[:, -1].float()
                    if reference and i == len(self.ref_logits):
                        self.ref_logits.append(last)
                        self.feed.append(last.argmax(-1, keepdim=True))
                    ref = self.ref_logits[i]
                    record: dict[str, Any] = {"step": i, "threads": timed, "torch_threads": threads, "round": rnd,
                                              "ms": 1000 * elapsed,
                                              "top1": float((last.argmax(-1) == ref.argmax(-1)).float().mean()),
                                              "max_abs_logit_diff": float((last - ref).abs().max())}
                    if timed is None:
                        record["warmup"] = True
                    if tiered:
                        after = cache.stats()
                        record.update(step_record(before, after, previous if previous is not None else before))
                        record["beside_tiers_bytes"] = float(after.get("kv", {}).get("beside_tiers_bytes", 0))
                        previous = after
                    run.steps.append(record)
                    self.sample_memory(run)
        except Exception as exc:  # noqa: BLE001
            if cfg.system in (DYNAMIC, EXACT):
                raise
            fail(run, exc)

    def run(self, skip: dict[str, str], bar: Any) -> None:
        """``--repeats`` rounds; in each, every configuration in turn (the reference first, the others'
        order rotated by one every round) gets a fresh cache filled from the saved K/V, decodes its round
        (:meth:`decode`) and is closed (its pools freed, its disk store deleted) before the next is built:
        one cache is alive at a time, every timed step excludes the fill, and a configuration's timed
        steps never overlap another cache's background work.  After the last round the cache's
        ``stats()`` are kept.  At a full point the exact cold cache's disk entries are read raw right
        before and right after each of its rounds (:func:`read_in_decode_order`), and the host copy rate
        is measured after its last round (:func:`bandwidth`)."""
        s = self.s
        ref, others = self.configs[0], self.configs[1:]
        for rnd in range(s.repeats):
            k = rnd % max(1, len(others))
            for cfg in [ref, *others[k:], *others[:k]]:
                bar.set_postfix_str(f"{self.name} ctx {self.context} b {self.batch} #{rnd + 1} {cfg.label}")
                cache = self.build(cfg, skip)
                if cache is not None:
                    raw = self.full and cfg == Config(EXACT, None, "cold")
                    try:
                        if raw:
                            self.raw_samples.append(read_in_decode_order(cache, "before", rnd))
                        self.decode(cfg, cache, rnd)
                        if raw:
                            self.raw_samples.append(read_in_decode_order(cache, "after", rnd))
                        if rnd == s.repeats - 1 and hasattr(cache, "stats") and self.runs[cfg].available:
                            self.runs[cfg].stats = cache.stats()
                            self.runs[cfg].reuse_rate = reuse_rate(self.runs[cfg].stats)
                            if raw:
                                self.bandwidth = bandwidth(cache, self.store(cfg), s.threads, self.raw_samples)
                    finally:
                        if hasattr(cache, "close"):
                            cache.close()
                        del cache
                        shutil.rmtree(self.store(cfg), ignore_errors=True)
                        release_memory()
                bar.update(len(s.threads))


def fail(run: Run, exc: BaseException) -> None:
    run.available, run.note = False, f"error: {type(exc).__name__}: {exc}"
    run.error = "".join(traceback.format_exception(exc))
    run.steps.clear()


# -- raw bandwidth ------------------------------------------------------------------------------------------
def raw_disk_bandwidth(root: Path, workers: tuple[int, ...] = (1, 4)) -> dict[str, Any]:
    """Read every file under ``root`` once with ``O_DIRECT`` (page-aligned buffers, ``preadv``), in directory
    walk order, with each worker count; bytes/s of the best.  ``{}`` where O_DIRECT is refused.  (The
    earlier baseline of issue 10's (2); kept for reference beside :func:`read_in_decode_order`.)"""
    files = [Path(d) / f for d, _, fs in os.walk(root) for f in fs]
    if not files:
        return {}
    return _raw_read(files, workers)


def _raw_read(files: list[Path] | list[str], workers: tuple[int, ...]) -> dict[str, Any]:
    """``files`` read whole, once per worker count, with ``O_DIRECT``: one ``preadv`` per file into a
    page-aligned buffer, no checksum, no copy.  The workers take the next file in list order (as
    ``DiskTier.read_into``'s threads take the next entry), so one worker reads in exactly that order.
    ``{"files", "bytes", "by_workers": {w: bytes/s}, "bytes_per_s": the best}``, or ``{"error": ...}``
    where O_DIRECT is refused."""
    sizes = [os.stat(p).st_size for p in files]
    biggest = -(-max(sizes) // 4096) * 4096 or 4096

    def read_some(taken: Iterator[int]) -> int:
        buf = mmap.mmap(-1, biggest)
        done = 0
        try:
            for i in taken:
                if i >= len(files):
                    return done
                fd = os.open(files[i], os.O_RDONLY | os.O_DIRECT)
                try:
                    done += os.preadv(fd, [buf], 0)
                finally:
                    os.close(fd)
        finally:
            buf.close()
        return done

    out: dict[str, Any] = {"files": len(files), "bytes": sum(sizes), "by_workers": {}}
    try:
        for w in workers:
            taken = itertools.count()  # next() is atomic under the GIL
            t0 = time.perf_counter()
            if w == 1:
                done = read_some(taken)
            else:
                with ThreadPoolExecutor(w) as pool:
                    done = sum(pool.map(read_some, [taken] * w))
            out["by_workers"][w] = done / (time.perf_counter() - t0)
    except OSError as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    out["bytes_per_s"] = max(out["by_workers"].values())
    return out


def decode_read_order(cache: Any) -> tuple[list[str], int, int]:
    """``(files, disk bytes, memory bytes)`` of one exact decode step of ``cache``: the disk-tier chunk
    files of every layer's visible blocks in the order the step reads them (layer by layer, each layer's
    entries as its update or read ahead asks for them), the payload bytes of those, and the payload bytes
    of the entries a memory tier holds.  Benchmark-only: it looks the entries up in the tiercache's index
    (private) under the index lock."""
    keys = []
    for layer in cache.layers:
        if layer.is_initialized and layer.sparse is None:
            keys += layer._entries_from(layer._visible_blocks()[0])
    tc = cache.store.cache
    files, disk, memory = [], 0, 0
    with tc._lock:
        for key in keys:
            entry = tc._index.get(key)
            if entry is None:
                continue
            tier = tc._tiers[entry.level]
            if hasattr(tier, "_chunk_file"):
                files.append(tier._chunk_file(entry.slot))
                disk += entry.nbytes
            else:
                memory += entry.nbytes
    return files, disk, memory


def reader_threads(cache: Any) -> int:
    """How many threads the disk tier of ``cache`` spreads a batch of direct reads over at most (1 if none)."""
    tiers = [t for t in cache.store.cache.tiers if hasattr(t, "read_into") and getattr(t, "direct_io", False)]
    return max(1, int(getattr(tiers[0], "_direct_threads", 1))) if tiers else 1


def read_in_decode_order(cache: Any, when: str, rnd: int) -> dict[str, Any]:
    """Issue 10's (2) baseline, like for like: the chunk files an exact decode step of ``cache`` reads from
    its disk tier (:func:`decode_read_order`: the same files, in the same order, on the same disk, with the
    same recency, since the step reads them every step), read raw with ``O_DIRECT`` (:func:`_raw_read`)
    with 1 worker and with the disk tier's direct-read thread count.  Measured right ``when`` = "before"
    and "after" a round of the cache (so it sees the disk in the state the round did); ``round`` records
    which."""
    files, disk, memory = decode_read_order(cache)
    out: dict[str, Any] = {"when": when, "round": rnd, "disk_payload_bytes": disk, "memory_payload_bytes": memory}
    if files:
        out.update(_raw_read(files, tuple(sorted({1, reader_threads(cache)}))))
    return out


def host_copy_bandwidth(nbytes: int, threads: int, repeats: int = 3) -> float:
    """Bytes/s of copying ``nbytes`` of float32 between two preallocated tensors (the host tier's bound)."""
    n = max(1, nbytes // 4)
    src, dst = torch.randn(n), torch.empty(n)
    best = math.inf
    with torch_threads(threads):
        for _ in range(repeats):
            t0 = time.perf_counter()
            dst.copy_(src)
            best = min(best, time.perf_counter() - t0)
    return n * 4 / best


# -- the whole run ------------------------------------------------------------------------------------------
def run_all(s: Settings, workdir: Path, *, show_progress: bool = True) -> tuple[list[Run], dict[str, Any]]:
    model, tokenizer = load_bench_model(s.model)
    kv_per_token = kv_cache_bytes(model.config, 1, 1, model.dtype)
    pts = points(s, kv_per_token)
    block = s.block_size or SPARSE_BLOCK_SIZE  # the unit a sparse selection fetches (budget merges)
    info: dict[str, Any] = {"kv_bytes_per_token": kv_per_token, "points": pts, "budget_merges": {}, "bandwidth": {},
                            "skipped_points": [(c, b) for c in s.contexts for b in s.batches if (c, b) not in pts]}
    info["estimated_seconds"] = estimate_seconds(s, kv_per_token)
    print(f"sparse_speed: points {pts} + synthetic {s.synthetic}, threads {s.threads}, {s.steps} steps x {s.repeats} "
          f"rounds; estimated ~{info['estimated_seconds'] / 60:.0f} min on an idle 2-core machine (see estimate_seconds)",
          flush=True)
    max_pos = getattr(model.config, "max_position_embeddings", None) or 1 << 30
    horizon = s.warmup + s.steps * len(s.threads) + 2  # steps a cache decodes in its round, + margin
    rows_ctx: dict[int, int] = {}
    for c, b in pts:
        for r in range(b):
            rows_ctx[r] = max(rows_ctx.get(r, 0), min(c, max_pos - horizon))
    t0 = time.perf_counter()
    ids = prompt_rows(tokenizer, len(rows_ctx), max(rows_ctx.values()), model.config.vocab_size) if pts else None
    # VmHWM is reset at the start of the prefill and of every point (so each reports its own peak); resetting
    # it also resets getrusage's ru_maxrss, so the run's peak is the largest of the readings taken before each reset.
    memory: dict[str, Any] = {"peak_rss_bytes": 0, "points": {}, "after_model_load": memory_status()}
    info["memory"] = memory

    def peak_so_far() -> int:
        value = max(memory_status().get("peak_rss", 0), max_rss_bytes())
        memory["peak_rss_bytes"] = max(memory["peak_rss_bytes"], value)
        return value

    peak_so_far()
    memory["peak_reset"] = reset_peak_rss()
    with torch_threads(DEFAULT_THREADS):
        prefilled = prefill_rows_to_files(model, ids, [min(rows_ctx[r], ids.shape[-1]) - 1 for r in range(len(rows_ctx))],
                                          workdir / "prefill") if pts else []
    info["prefill_seconds"] = time.perf_counter() - t0
    memory["prefill_peak_rss_bytes"] = peak_so_far()
    runs: list[Run] = []
    skip: dict[str, str] = {}
    plans = []
    for c, b in pts:
        context = min(c, max_pos - horizon, ids.shape[-1])
        configs, merged = configurations(s, (c, b) in s.full_points, context - 1, block)
        info["budget_merges"][f"{c}x{b}"] = merged
        plans.append(("smollm2" if s.model == "smollm2" else s.model, c, b, context, configs))
    deep = deep_model(s.synthetic_layers, max(s.synthetic, default=0) + horizon + 8) if s.synthetic else None
    for c in s.synthetic:
        configs, merged = configurations(s, False, c - 1, block)
        plans.append(("synthetic", c, 1, c, configs))
    total = sum(len(p[4]) for p in plans) * s.repeats * len(s.threads)
    bar = tqdm(total=total, desc="sparse speed", unit="run", disable=not show_progress)
    try:
        for name, c, b, context, configs in plans:
            peak_so_far()
            reset_peak_rss()
            full = name != "synthetic" and (c, b) in s.full_points
            if name == "synthetic":
                net = deep
                source = MappedKV.write(workdir / f"point-synthetic-{c}.kv", synthetic_kv(deep, context - 1, seed=c))
                last, prompt = torch.randint(3, 1024, (1, 1), generator=torch.Generator().manual_seed(c)), None
            else:
                net = model
                source = write_point_kv(prefilled, b, context - 1, workdir / f"point-{c}x{b}.kv")
                last, prompt = ids[:b, context - 1:context], ids[:b, :context - 1]
            point = Point(net, name, source, last, prompt, configs, s, workdir, c, full=full)
            try:
                point.run(skip, bar)
            finally:
                source.remove()
            if full:
                info["bandwidth"][f"{c}x{b}"] = point.bandwidth
            memory["points"][f"{name} {c}x{b}"] = {**point.memory, "kv_bytes": source.nbytes, "peak_rss_bytes": peak_so_far()}
            runs.extend(point.runs.values())
            del point
    finally:
        for row in prefilled:
            row.remove()
    peak_so_far()
    bar.close()
    if deep is not None:
        info["synthetic_config"] = {k: getattr(deep.config, k) for k in (
            "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size")}
    return runs, info


def bandwidth(cache: Any, store: Path, threads: tuple[int, ...], samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Raw read bandwidth of an exact cold cache's disk entries and of a host copy of its host tier's size
    per thread count.  ``disk``: the samples of :func:`read_in_decode_order` (taken before and after every
    round of the cache), the median of each worker count over them, and ``bytes_per_s`` = the better of
    those medians; ``disk_walk_order``: the earlier baseline (every file of the store in directory order,
    1 and 4 workers, :func:`raw_disk_bandwidth`), measured once now, for reference."""
    host_cap = tier_row(cache.stats(), "host").get("capacity_bytes") or tier_row(cache.stats(), "host").get("capacity") or 0
    good = [x for x in samples if x.get("by_workers")]
    disk: dict[str, Any] = {"order": "decode", "samples": samples}
    if good:
        workers = sorted({w for x in good for w in x["by_workers"]})
        disk.update(files=good[-1]["files"], bytes=good[-1]["bytes"],
                    by_workers={w: median([x["by_workers"][w] for x in good if w in x["by_workers"]]) for w in workers})
        disk["bytes_per_s"] = max(disk["by_workers"].values())
    elif samples and samples[-1].get("error"):
        disk["error"] = samples[-1]["error"]
    walk = raw_disk_bandwidth(store)
    host = {t: host_copy_bandwidth(max(int(host_cap), 64 * MiB), t) for t in threads}
    return {"disk": disk, "disk_walk_order": walk, "host_bytes_per_s": host, "host_capacity": host_cap}


# -- summary ------------------------------------------------------------------------------------------------
@dataclass
class Row:
    """Medians of one (model, context, batch, threads, configuration)."""

    model: str
    context: int
    requested_context: int
    batch: int
    threads: int
    label: str
    system: str
    budget: int | float | None
    state: str | None
    available: bool
    note: str | None
    cold_method: str | None
    ms_per_step: float
    tokens_per_s: float
    host_bytes: float
    disk_bytes: float
    stages_ms: dict[str, float]
    reuse_rate: float | None
    top1_vs_reference: float | None  # teacher-forced top-1 agreement with DynamicCache over every step
    max_abs_logit_diff: float | None
    samples_ms: list[float]
    pipeline: dict[str, float] = field(default_factory=dict)
    disk_tier_bytes: float = float("nan")  # everything the disk tier read per step, background staging included
    # the most host memory the cache held outside its tier budgets after a step: resident pools, staging,
    # digests, decode buffers and tails (stats()["kv"]["beside_tiers_bytes"])
    beside_tiers_bytes: float = float("nan")
    # median over the rounds of the first decode step after the cache was filled (the first warm-up step:
    # time to the second token), on the rows of the thread count it ran at (the first of --threads)
    first_step_ms: float = float("nan")
    # median over the rounds of the mean of the EARLY_STEPS steps right after the first (steps 1..3 after the fill,
    # warm-up or timed), at the first thread count: what a short decode pays per token while a strategy settles
    early_ms: float = float("nan")
    # the resident pools' bound the run decoded under (stats()["pipeline"]["pool_bound_bytes"]; None: unbounded
    # or no pools) and where it came from ("pool_bound_source": "auto: the host tier's budget (model on cpu)",
    # "pool_bytes", "unbounded (pool_bytes=None)"; "" for caches without a pipeline)
    pool_bound_bytes: float | None = None
    pool_bound_source: str = ""


EARLY_STEPS = 3  # the steps after the first one that 'steps 1-3 ms' averages


def early_ms(steps: list[dict[str, Any]], threads: int | None) -> float:
    """Median over the rounds of the mean ms of steps ``1..EARLY_STEPS`` after the fill at ``threads`` torch
    threads (``nan`` unless a round recorded all of them)."""
    per_round: dict[Any, list[float]] = {}
    for st in steps:
        if 1 <= st["step"] <= EARLY_STEPS and st.get("torch_threads") == threads:
            per_round.setdefault(st.get("round"), []).append(st["ms"])
    return median([sum(v) / len(v) for v in per_round.values() if len(v) == EARLY_STEPS])


def summarise(runs: list[Run]) -> list[Row]:
    rows = []
    for run in runs:
        threads = sorted({st["threads"] for st in run.steps if st.get("threads") is not None}) or [None]
        all_steps = [st for st in run.steps]
        top1 = sum(st["top1"] for st in all_steps) / len(all_steps) if all_steps and run.system != DYNAMIC else None
        diff = max((st["max_abs_logit_diff"] for st in all_steps), default=None) if run.system != DYNAMIC else None
        pipe = find_numbers((run.stats or {}).get("pipeline", {}), "rate", "recall", "precision") if run.stats else {}
        for t in threads:
            steps = [st for st in run.steps if st.get("threads") == t and not st.get("warmup")]
            ms = median([st["ms"] for st in steps])
            stage_names = sorted({k for st in steps for k in st.get("stages", {})})
            stages = {k: 1000 * median([st["stages"].get(k, 0.0) for st in steps]) for k in stage_names}
            first = median([st["ms"] for st in run.steps if st["step"] == 0 and st.get("torch_threads") == t])
            rows.append(Row(run.model, run.context, run.requested_context, run.batch, t or 0, run.label, run.system,
                            run.budget, run.state, run.available and bool(steps), run.note, run.cold_method, ms,
                            run.batch * 1000 / ms if ms == ms and ms > 0 else float("nan"),
                            # Bytes: the mean over the steps (a background read finishing near a step's end
                            # lands in one of two neighbouring steps; the mean is exact, a median is not).
                            _mean([st.get("host_bytes", 0.0) for st in steps]) if run.system != DYNAMIC else float("nan"),
                            _mean([st.get("disk_bytes", 0.0) for st in steps]) if run.system != DYNAMIC else float("nan"),
                            stages, run.reuse_rate, top1, diff, [st["ms"] for st in steps], pipe,
                            _mean([st.get("disk_tier_bytes", float("nan")) for st in steps]) if run.system != DYNAMIC
                            else float("nan"),
                            max((st.get("beside_tiers_bytes", float("nan")) for st in steps), default=float("nan"))
                            if run.system != DYNAMIC else float("nan"), first, early_ms(run.steps, t),
                            *pool_bound(run.stats)))
    return rows


def pool_bound(stats: dict[str, Any] | None) -> tuple[float | None, str]:
    """``(bound bytes or None, source)`` of the resident pools a cache decoded under (its ``stats()``); ``(None,
    "")`` without a decode pipeline (dense, exact).  A tree before ``pool_bound_source`` reported only the bound:
    ``None`` there was unbounded."""
    pipe = (stats or {}).get("pipeline")
    if not pipe:
        return None, ""
    bound = pipe.get("pool_bound_bytes")
    source = pipe.get("pool_bound_source") or ("unbounded (pool_bytes=None)" if bound is None else "pool_bytes")
    return (None if bound is None else float(bound)), source


def _pool(r: "Row") -> str:
    """The table's pool bound: MiB and whether the default chose it (``auto``), or ``unbounded``."""
    if not r.pool_bound_source:
        return "–"
    if r.pool_bound_bytes is None:
        return "unbounded"
    return f"{_mib(r.pool_bound_bytes)} ({'auto' if r.pool_bound_source.startswith('auto') else 'set'})"


def accuracy_beside(path: Path) -> dict[str, dict[str, float]]:
    """``{budget label: {"top1_agreement", "mean_kl"}}`` from a ``sparse_accuracy.json`` (teacher forcing),
    or ``{}`` when it is absent or unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    out = {}
    for run in data.get("teacher_forcing", {}).get("runs", {}).values():
        if isinstance(run, dict) and run.get("budget") is not None and "top1_agreement" in run:
            out[budget_label(run["budget"])] = {"top1_agreement": run["top1_agreement"], "mean_kl": run.get("mean_kl")}
    return out


def _index(rows: list[Row]) -> dict[tuple, Row]:
    return {(r.model, r.requested_context, r.batch, r.threads, r.system, budget_label(r.budget) if r.budget is not None else None,
             r.state): r for r in rows}


def targets(rows: list[Row], info: dict[str, Any], s: Settings) -> list[dict[str, Any]]:
    """Every target at the full points, per thread count, from this run's medians (cold runs)."""
    index = _index(rows)
    out = []
    model = "smollm2" if s.model == "smollm2" else s.model

    def get(c, b, t, system, budget, state="cold"):
        return index.get((model, c, b, t, system, budget, state))

    def ratio_line(what, c, b, t, fast, slow, target, note=""):
        ok = fast and slow and fast.available and slow.available
        ratio = slow.ms_per_step / fast.ms_per_step if ok else None
        why = None if ok else (f"{c} x batch {b} not in this run" if not (fast and slow) else
                               (fast.note if fast and not fast.available else slow.note if slow else None) or "not measured")
        out.append({"what": what, "point": f"{c}x{b}", "threads": t, "figure_ms": fast.ms_per_step if ok else None,
                    "baseline_ms": slow.ms_per_step if ok else None, "ratio": ratio, "target": f">= {target:g}x",
                    "met": None if ratio is None else ratio >= target, "note": why or note})

    threads = list(s.threads)
    for c, b in s.full_points:
        key = f"{c}x{b}"
        merges = info.get("budget_merges", {}).get(key, {})
        for t in threads:
            h = budget_label(HEADLINE_BUDGET)
            h = merges.get(h, h)
            ratio_line(f"issue 9: (4) attention-aware vs (3) fetch-every-step, {h}", c, b, t, get(c, b, t, AWARE, h),
                       get(c, b, t, FETCH, h), 1.74)
            ratio_line(f"issue 9: (4) attention-aware vs (2) exact tiered, {h}", c, b, t, get(c, b, t, AWARE, h),
                       get(c, b, t, EXACT, None), 3.0)
            for bud in s.budgets:
                label = merges.get(budget_label(bud), budget_label(bud))
                if label != h:  # at the headline budget issue 10's (4) vs (3) is issue 9's line above
                        ratio_line(f"issue 10: (4) vs (3), {budget_label(bud)}", c, b, t, get(c, b, t, AWARE, label),
                               get(c, b, t, FETCH, label), 1.74)
                ratio_line(f"issue 10: (4) vs (3b) reuse-layer-ahead, {budget_label(bud)}" +
                           (f" (= {label})" if label != budget_label(bud) else ""),
                           c, b, t, get(c, b, t, AWARE, label), get(c, b, t, REUSE, label), 1.3)
            exact = get(c, b, t, EXACT, None)
            bw = info.get("bandwidth", {}).get(key, {})
            disk_bw = bw.get("disk", {}).get("bytes_per_s")
            host_bw = bw.get("host_bytes_per_s", {}).get(t) or bw.get("host_bytes_per_s", {}).get(str(t))
            once = None
            if exact and exact.available and disk_bw and host_bw:
                once = 1000 * (exact.host_bytes / host_bw + exact.disk_bytes / disk_bw)
            ratio = exact.ms_per_step / once if once else None
            out.append({"what": "issue 10: (2) exact tiered vs reading the whole KV once at the raw bandwidth", "point": key,
                        "threads": t, "figure_ms": exact.ms_per_step if exact and exact.available else None,
                        "baseline_ms": once, "ratio": ratio, "target": "<= 1.2x", "met": None if ratio is None else ratio <= 1.2,
                        "note": _compute_floor_note(once, get(c, b, t, DYNAMIC, None, None), get(c, b, t, EXACT, None, "warm"))
                        if once else "bandwidth not measured"})
        exact = get(c, b, threads[0], EXACT, None)
        kv_bytes = info.get("kv_bytes_per_token", 0) * c * b
        host = info.get("bandwidth", {}).get(key, {}).get("host_capacity")
        ok = None
        note = "exact cold run missing"
        if exact and exact.available:
            direct = exact.cold_method == "direct_io"
            diff = exact.max_abs_logit_diff
            ok = bool(direct and exact.disk_bytes > 0 and diff is not None and diff <= LOGIT_TOL and exact.top1_vs_reference == 1.0)
            note = (f"KV {_mib(kv_bytes)} MiB, host budget {_mib(host or 0)} MiB, page cache "
                    f"{'bypassed (direct_io)' if direct else 'dropped before every step (fadvise)'}; disk served "
                    f"{_mib(exact.disk_bytes)} MiB/step; max |logit diff| vs "
                    f"DynamicCache {diff:.2g} (tol {LOGIT_TOL:g}); top-1 agreement {exact.top1_vs_reference:.3f}")
        out.append({"what": "issue 10: KV larger than host budget + page cache decodes correctly", "point": key,
                    "threads": threads[0], "figure_ms": None, "baseline_ms": None, "ratio": None, "target": "exact = DynamicCache",
                    "met": ok, "note": note})
    return out


def _compute_floor_note(once_ms: float, dynamic: Row | None, warm: Row | None) -> str | None:
    """What the read-once target leaves out: the step's compute.  Exact decode cannot take less than a step
    whose KV needs no disk read (``DynamicCache``'s, or exact's with the page cache warm, the faster), so
    where that alone exceeds the read-once time the ratio's floor is above 1 whatever the I/O does."""
    cands = [(r.ms_per_step, name) for r, name in ((dynamic, "DynamicCache"), (warm, "exact warm"))
             if r is not None and r.available]
    if not cands:
        return None
    ms, name = min(cands)
    return (f"a step without disk reads ({name}, {ms:.0f} ms) alone is {ms / once_ms:.2f}x the read-once time "
            f"({once_ms:.0f} ms): the ratio's floor on this machine")


# -- output -------------------------------------------------------------------------------------------------
def _ms(v: float | None) -> str:
    return "–" if v is None or v != v else (f"{v:.3g}" if v < 1000 else f"{v:.0f}")


def _mib(v: float | None) -> str:
    return "–" if v is None or v != v else f"{v / MiB:.3g}"


def _short(note: str | None) -> str:
    return SPARSE_UNAVAILABLE if note and note.startswith(SPARSE_UNAVAILABLE) else (note or "n/a")[:90]


STAGE_NAMES = ("scoring_seconds", "fetch_seconds", "attention_seconds", "placement_seconds")
STAGE_SHORT = {"scoring_seconds": "score", "fetch_seconds": "fetch", "attention_seconds": "attn", "placement_seconds": "place"}


def _stages(r: Row) -> str:
    if r.system == DYNAMIC:
        return "–"
    parts = []
    for name in STAGE_NAMES:
        hit = [v for k, v in r.stages_ms.items() if k.startswith("sparse.total.") and k.endswith(name)]
        if hit:
            parts.append(f"{STAGE_SHORT[name]} {hit[0]:.3g}")
    if r.system == EXACT:
        parts += [f"fetch {v:.3g}" for k, v in r.stages_ms.items() if k == "kv.fetch_seconds"]
    pipe = {k.split(".", 1)[1]: v for k, v in r.stages_ms.items() if k.startswith("pipeline.")
            and not k.startswith("pipeline.stages.") and any(w in k for w in ("sync", "wait", "copy", "background"))}
    for k, v in sorted(pipe.items()):
        if v >= 0.05:
            parts.append(f"{k.replace('_seconds', '')} {v:.2g}")
    return ", ".join(parts) or "–"


def table(rows: list[Row], acc: dict[str, dict[str, float]]) -> list[str]:
    lines = ["| model | context | batch | threads | configuration | ms/step | first step ms | steps 1-3 ms | tokens/s | MiB/step fetched host + disk (disk tier read, background included) | "
             "stage ms/step (pipeline: sync / copy / wait / background) | MiB beside the tier budgets (pools, staging, digests, buffers) | pool bound MiB | reuse | top-1 vs DynamicCache (teacher-forced, this run) | accuracy run top-1 / KL |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r.model != "smollm2", r.requested_context, r.batch, r.threads,
                                         SYSTEMS.index(r.system), str(r.budget), str(r.state))):
        ctx = f"{r.context}" if r.context == r.requested_context else f"{r.context} ({r.requested_context})"
        if not r.available:
            lines.append(f"| {r.model} | {ctx} | {r.batch} | {r.threads} | {r.label} | {_short(r.note)} | | | | | | | | | | |")
            continue
        label = r.label + (f" ({r.cold_method})" if r.state == "cold" and r.cold_method == "fadvise" else "")
        io = "–" if r.system == DYNAMIC else f"{_mib(r.host_bytes)} + {_mib(r.disk_bytes)} ({_mib(r.disk_tier_bytes)})"
        a = acc.get(budget_label(r.budget)) if r.budget is not None else None
        accs = f"{a['top1_agreement']:.4f} / {a['mean_kl']:.3g}" if a else "–"
        agree = "ref" if r.system == DYNAMIC else (f"{r.top1_vs_reference:.3f}" if r.top1_vs_reference is not None else "–")
        lines.append(f"| {r.model} | {ctx} | {r.batch} | {r.threads} | {label} | {_ms(r.ms_per_step)} | {_ms(r.first_step_ms)} | {_ms(r.early_ms)} | {r.tokens_per_s:.3g} | "
                     f"{io} | {_stages(r)} | {'–' if r.system == DYNAMIC else _mib(r.beside_tiers_bytes)} | {_pool(r)} | {f'{r.reuse_rate:.3f}' if r.reuse_rate is not None else '–'} | {agree} | {accs} |")
    return lines


def _load(meta: dict[str, Any], key: str) -> str:
    value = meta.get(key)
    return "/".join(f"{x:.1f}" for x in value) if value else "?"


def write_results(runs: list[Run], rows: list[Row], meta: dict[str, Any], info: dict[str, Any], s: Settings, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    goals = targets(rows, info, s)
    acc_path = Path(s.accuracy) if s.accuracy else out / "sparse_accuracy.json"
    acc = accuracy_beside(acc_path)
    (out / "sparse_speed.json").write_text(json.dumps(
        {"meta": meta, "targets": goals, "accuracy": {"source": str(acc_path) if acc else None, "by_budget": acc},
         "rows": [asdict(r) for r in rows], "runs": [asdict(r) for r in runs]}, indent=1, default=str))
    lines = ["# Sparse decode speed (CPU)", "",
             f"`{meta['command']}` on {meta['machine']} ({meta['cpus']} CPUs), {meta['date_utc']} UTC, "
             f"{meta['runtime_s']:.0f} s in all (prefill {info['prefill_seconds']:.0f} s); host tier "
             f"{100 * s.host_fraction:g}% of the KV, disk tier the rest on {meta['workdir_filesystem']}; blocks of "
             f"{s.block_size or default_block_size('exact')} tokens in exact mode, {s.block_size or SPARSE_BLOCK_SIZE} "
             f"in sparse mode; load average "
             f"{_load(meta, 'load_average_start')} at the start, {_load(meta, 'load_average')} at the end (1/5/15 min).",
             f"Rounds: {s.repeats}. In each, every configuration of a point in turn (DynamicCache first, the others' order "
             f"rotated by one per round) gets a fresh cache filled from the point's K/V (saved once per point; the fill "
             f"is untimed), decodes {s.warmup} untimed warm-up step(s) at {s.threads[0]} thread(s) and {s.steps} timed "
             f"step(s) per thread count ({', '.join(map(str, s.threads))}), and is closed (pools freed, disk store "
             f"deleted) before the next is built: one cache alive at a time. Times are medians over the timed steps of "
             f"every round, bytes means; 'first step ms' is the median over the rounds of the first step after the "
             f"fill (the first warm-up step: time to the second token), 'steps 1-3 ms' the median over the rounds of "
             f"the mean of the {EARLY_STEPS} steps after it (warm-up or timed): a strategy still settling after its "
             f"fill shows there, not hidden by the median.",
             "Cold: `direct_io` (disk reads bypass the page cache); warm: page cache left alone. Every configuration "
             "decodes DynamicCache's greedy tokens (teacher forcing); 'top-1' = agreement of its next-token argmax with "
             "DynamicCache's at the same step. Sparse rows run under the cache's default pool bound (`pool_bytes=\"auto\"`: "
             "the host tier's budget, 'pool bound MiB' says '(auto)'), so the pools beside the tiers hold at most that "
             "much; rows named 'pool unbounded' (opt-in, `--pool-fractions inf`) ask for `pool_bytes=None`. See "
             "docs/benchmarks.md, \"Sparse decode speed\".", ""]
    if meta.get("quick"):
        lines += ["**Quick run**: tiny random models and sizes; the figures say the code runs, not how fast it is.", ""]
    mem = info.get("memory", {})
    if mem.get("peak_rss_bytes"):
        lines += [f"Peak RSS of the run: {mem['peak_rss_bytes'] / GiB:.2f} GiB (VmHWM / ru_maxrss; mapped pages of "
                  f"the saved K/V files count, and the kernel can drop those); after the prefill "
                  f"{(mem.get('prefill_peak_rss_bytes') or 0) / GiB:.2f} GiB. Per point (VmHWM reset at its start"
                  + ("" if mem.get("peak_reset") else ", **not reset: the kernel refused, so each is the run's peak so far**")
                  + "; largest RSS / anonymous RSS sampled after a fill or step; float32 KV): " + "; ".join(
                      f"{k} {v['peak_rss_bytes'] / GiB:.2f} GiB ({v['max_rss_bytes'] / GiB:.2f} / {v['max_anon_bytes'] / GiB:.2f}; "
                      f"KV {v['kv_bytes'] / GiB:.2f})" for k, v in mem.get("points", {}).items() if v.get("peak_rss_bytes")), ""]
    if info.get("skipped_points"):
        lines += [f"Points not run (float32 KV above {s.max_kv_gib:g} GiB; `--max-kv-gib`): "
                  + ", ".join(f"{c} x {b}" for c, b in info["skipped_points"]), ""]
    merges = {k: v for k, v in info.get("budget_merges", {}).items() if v}
    if merges:
        lines += ["Budgets within one block of each other are one configuration: " + "; ".join(
            f"{p}: " + ", ".join(f"{a} = {b}" for a, b in m.items()) for p, m in merges.items()), ""]
    lines += ["## Targets", "", "| what | point | threads | figure ms | baseline ms | ratio | target | met | note |",
              "|---|---|---|---|---|---|---|---|---|"]
    for g in goals:
        met = {True: "met", False: "**not met**", None: "–"}[g["met"]]
        ratio = f"{g['ratio']:.2f}×" if g["ratio"] is not None else "–"
        lines.append(f"| {g['what']} | {g['point']} | {g['threads']} | {_ms(g['figure_ms'])} | {_ms(g['baseline_ms'])} | "
                     f"{ratio} | {g['target']} | {met} | {g['note'] if 'page cache' in g['what'] or 'raw bandwidth' in g['what'] else _short(g['note']) if g['note'] else ''} |")
    for key, bw in info.get("bandwidth", {}).items():
        d = bw.get("disk", {})
        if d.get("bytes_per_s"):
            walk = bw.get("disk_walk_order", {})
            n = sum(1 for x in d.get("samples", ()) if x.get("by_workers"))
            lines += ["", f"Raw bandwidth at {key} (same run): O_DIRECT read of the {d['files']} chunk files the exact cold "
                      f"cache's decode step reads from disk ({d['bytes'] / MiB:.0f} MiB), in the step's order, right before and "
                      f"after each of its rounds, medians of {n}: "
                      + ", ".join(f"{w} worker(s) {v / GiB:.2f} GiB/s" for w, v in d["by_workers"].items())
                      + (" (every file of the store in directory order, once after the last round: "
                         + ", ".join(f"{w} worker(s) {v / GiB:.2f}" for w, v in walk["by_workers"].items()) + ")"
                         if walk.get("by_workers") else "")
                      + "; host copy: " + ", ".join(f"{t} thread(s) {v / GiB:.2f} GiB/s" for t, v in bw["host_bytes_per_s"].items())]
    lines += ["", "## Accuracy of each budget", ""]
    if acc:
        lines += [f"From `{acc_path}` (teacher-forced over natural text, the accuracy benchmark): "
                  + "; ".join(f"{k}: top-1 {v['top1_agreement']:.4f}, KL {v['mean_kl']:.3g}" for k, v in acc.items())]
    else:
        lines += [f"No `{acc_path.name}` beside the results: the only accuracy figure is this run's own teacher-forced "
                  "top-1 agreement with DynamicCache over the timed steps (the 'top-1' column; a few steps on a passkey "
                  "prompt, far weaker than the accuracy benchmark)."]
    lines += ["", "## Every point", ""] + table(rows, acc)
    if info.get("synthetic_config"):
        lines += ["", "Synthetic rows: random weights and random K/V (timing only), config " +
                  ", ".join(f"{k} {v}" for k, v in info["synthetic_config"].items()) + "."]
    (out / "sparse_speed.md").write_text("\n".join(lines) + "\n")
    plot(rows, out / "sparse_speed.png")


def plot(rows: list[Row], path: Path) -> None:
    """Per thread count: ms/step of every configuration per point (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    threads = sorted({r.threads for r in rows}) or [0]
    fig, axes = plt.subplots(len(threads), 1, figsize=(14, 4.5 * len(threads)), squeeze=False)
    colors = {DYNAMIC: "tab:gray", EXACT: "tab:blue", FETCH: "tab:orange", REUSE: "tab:purple", AWARE: "tab:green"}
    for ax, t in zip(axes[:, 0], threads):
        sub = [r for r in rows if r.threads == t and r.available and (r.budget is None or budget_label(r.budget) ==
                                                                      budget_label(HEADLINE_BUDGET) or r.state == "cold")]
        pts = sorted({(r.model != "smollm2", r.requested_context, r.batch) for r in sub})
        labels = sorted({(SYSTEMS.index(r.system), str(r.budget), str(r.state), r.label) for r in sub})
        width = 0.85 / max(1, len(labels))
        for j, (_, _, state, label) in enumerate(labels):
            xs, ys = [], []
            for i, p in enumerate(pts):
                r = next((r for r in sub if (r.model != "smollm2", r.requested_context, r.batch) == p and r.label == label), None)
                if r is not None:
                    xs.append(i + (j - len(labels) / 2) * width)
                    ys.append(r.ms_per_step)
            system = next(r.system for r in sub if r.label == label)
            ax.bar(xs, ys, width, color=colors[system], hatch="//" if state == "warm" else (".." if "%" not in label and "token" in label else None),
                   alpha=0.5 if state == "warm" else 0.9, label=label, edgecolor="black", linewidth=0.2)
        ax.set_xticks(range(len(pts)))
        ax.set_xticklabels([f"{'synth ' if p[0] else ''}{p[1]} × {p[2]}" for p in pts], fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("ms per decode step (median)")
        ax.set_title(f"sparse decode speed, {t} torch thread(s) (missing bars: not run / not available)")
        ax.legend(fontsize=6, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _budget(text: str) -> int | float:
    try:
        value: int | float = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--budgets: {text!r} is neither a token count nor a fraction") from None
        if not 0 < value <= 1:
            raise argparse.ArgumentTypeError(f"--budgets: a fraction must be in (0, 1], got {text}")
        return value
    if value < 1:
        raise argparse.ArgumentTypeError(f"--budgets: a token budget must be >= 1, got {text}")
    return value


def _points(text: str) -> tuple[tuple[int, int], ...]:
    out = []
    for part in text.split(","):
        c, sep, b = part.strip().partition("x")
        if not sep:
            raise argparse.ArgumentTypeError(f"--full-points: use CONTEXTxBATCH[,...], got {part!r}")
        out.append((parse_ints(c, "--full-points")[0], parse_ints(b, "--full-points")[0]))
    return tuple(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="results directory (default benchmarks/results; --quick: a temp directory)")
    parser.add_argument("--quick", action="store_true", help="tiny random models and sizes (smoke test)")
    parser.add_argument("--model", choices=("smollm2", "tiny"), default=None)
    parser.add_argument("--contexts", type=lambda t: parse_ints(t, "--contexts"), default=None, help="default 2048,4096,8192")
    parser.add_argument("--batches", type=lambda t: parse_ints(t, "--batches"), default=None, help="default 1,4,8")
    parser.add_argument("--full-points", type=_points, default=None,
                        help="CONTEXTxBATCH points with every budget, warm runs, bandwidth and checks (default 8192x4)")
    parser.add_argument("--budgets", type=lambda t: tuple(_budget(x) for x in t.split(",")), default=None,
                        help="sparse budgets at the full points: token counts and/or fractions (default 2048,0.0625,0.25)")
    parser.add_argument("--max-kv-gib", type=float, default=None,
                        help="skip points whose float32 KV is larger, in GiB (default 3.0: every point runs; 8K x 8 is 2.8 GiB)")
    parser.add_argument("--steps", type=lambda t: parse_ints(t, "--steps")[0], default=None,
                        help=f"timed steps per configuration, round and thread count (default {Settings.steps})")
    parser.add_argument("--warmup", type=int, default=None,
                        help=f"untimed steps per configuration and round after its cache is filled (default {Settings.warmup})")
    parser.add_argument("--repeats", type=lambda t: parse_ints(t, "--repeats")[0], default=None,
                        help=f"rounds; each builds, decodes and closes every configuration's cache once (default {Settings.repeats})")
    parser.add_argument("--threads", type=lambda t: parse_ints(t, "--threads"), default=None,
                        help=f"torch thread counts (default 1,{DEFAULT_THREADS})")
    parser.add_argument("--synthetic", default=None,
                        help="contexts of the deep random config, batch 1 (default 16384,32768; 'none' skips it)")
    parser.add_argument("--synthetic-layers", type=lambda t: parse_ints(t, "--synthetic-layers")[0], default=None)
    parser.add_argument("--no-warm", action="store_true", help="skip the warm-page-cache runs")
    parser.add_argument("--accuracy", default=None, help="sparse_accuracy.json to show beside the budgets (default: --out's)")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch directory on the disk under test")
    parser.add_argument("--pool-fractions", type=lambda t: tuple(float(x) for x in t.split(",")), default=None,
                        help="opt-in: also run (3b) and (4) at the headline budget of the full points with pool_bytes "
                             "these fractions of the KV (e.g. 0.5,0.25) and with unbounded pools (pool_bytes=None), "
                             "interleaved with the default rows, which run under the default bound (pool_bytes='auto': "
                             "the host tier's budget); 'inf' alone adds only the unbounded rows")
    args = parser.parse_args(argv)
    s = Settings.quick() if args.quick else Settings()
    for name in ("model", "contexts", "batches", "full_points", "budgets", "max_kv_gib", "steps", "warmup", "repeats",
                 "synthetic_layers", "accuracy", "pool_fractions"):
        if getattr(args, name) is not None:
            setattr(s, name, getattr(args, name))
    if args.synthetic is not None:
        s.synthetic = () if args.synthetic.strip().lower() in ("none", "") else parse_ints(args.synthetic, "--synthetic")
    if args.threads is not None:
        s.threads = tuple(dict.fromkeys(args.threads))
    if args.no_warm:
        s.warm = False
    if s.warmup is None or s.warmup < 0:
        parser.error("--warmup must be >= 0")
    if any(not p > 0 for p in s.pool_fractions):
        parser.error("--pool-fractions: fractions of the KV must be > 0 ('inf': unbounded pools)")
    if args.out is None:
        args.out = Path(tempfile.gettempdir()) / "tiercache-sparse-speed-quick" if args.quick else Path("benchmarks/results")
    workdir = Path(tempfile.mkdtemp(prefix="tiercache-sparse-speed-", dir=args.workdir))
    fstype = filesystem_of(workdir)
    if fstype in ("tmpfs", "ramfs"):
        print(f"warning: {workdir} is on {fstype}: the disk tier will not touch a disk", file=sys.stderr)
    available, why = sparse_available()
    load_start = os.getloadavg()
    start = time.perf_counter()
    try:
        runs, info = run_all(s, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    rows = summarise(runs)
    unavailable = next((r.note for r in runs if not r.available and (r.note or "").startswith(SPARSE_UNAVAILABLE)), None)
    meta = machine_meta()
    meta.update(command=" ".join(["python", "benchmarks/sparse_speed.py", *(argv if argv is not None else sys.argv[1:])]),
                runtime_s=time.perf_counter() - start, settings=asdict(s), quick=args.quick, workdir_filesystem=fstype,
                load_average_start=load_start, sparse_available=available and unavailable is None,
                sparse_note=unavailable or why or None, info=info)
    write_results(runs, rows, meta, info, s, args.out)
    print((args.out / "sparse_speed.md").read_text())
    print(f"wrote {args.out / 'sparse_speed.json'}, .md, .png ({meta['runtime_s']:.0f} s; estimated "
          f"{info['estimated_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
