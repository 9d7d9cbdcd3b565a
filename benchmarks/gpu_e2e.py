"""GPU end-to-end decode benchmark (issue 10): a Llama-3-8B-shaped model with random bf16 weights decoding
with its KV cache spread over GPU / host / SSD tiers, beside transformers' own caches.

    python benchmarks/gpu_e2e.py --out /some/folder               # CUDA machine, < 10 minutes unattended
    python benchmarks/gpu_e2e.py --tiny --out /tmp/e2e            # CPU smoke run (small config), seconds

Model: 32 layers, 32 query heads, 8 KV heads, head dim 128, hidden 4096, intermediate 14336, vocab 128256,
random bf16 weights (the speed of a decode step does not depend on the weights' values).  Points:
contexts 32K / 64K / 128K x batch 1 / 4 / 8 (128 KiB of KV per token and row: 4 GiB at 32K x 1, 128 GiB
at 128K x 8).  Systems, side by side at each point:

- ``dynamic``: ``DynamicCache`` on the GPU (where the KV fits the GPU beside the weights);
- ``dynamic-offload``: ``DynamicCache(offloading=True)`` (layers on the host, one prefetched ahead);
- ``exact``: exact ``TieredKVCache``;
- ``fetch-every-step``, ``reuse-layer-ahead``, ``attention-aware`` (the full system): sparse
  ``TieredKVCache`` with ``budget`` tokens per row, layer and KV head (default 2048).

Tiered caches get a GPU tier of ``--gpu-fraction`` of the KV size (default 1/8: well below it), a host
tier holding the rest, and no disk; one extra configuration (``ssd``, at the smallest point) caps the host
tier at ``--ssd-host-fraction`` of the KV (default 1/4) and puts the rest on a disk tier under
``--workdir`` (bypassing the page cache where the filesystem allows).

**How the KV cache is filled.**  A model prefill of 128K tokens x 8 rows through 32 layers would take
minutes per run, so the cache is filled directly: for every layer, one ``Cache.update`` with seeded
random K/V of the whole context (the same K/V for every system at a point); sparse caches get their key
digests from the same keys (what the prepared model's attention does during a prefill).  Decoding then
runs the real model (``model(input_ids, **cache_kwargs(cache, model))``, greedy): one untimed step, then
``--steps`` timed steps (``cuda.synchronize`` around each).  Since the K/V are random, attention is
spread evenly and sparse selection has no structure to find; the figures are speed, not accuracy
(``benchmarks/sparse_accuracy.py`` measures accuracy on a real model).  ``exact`` must produce the same
tokens as ``dynamic``: the JSON says whether it did.

Budgeting: configurations run in priority order (small points first, the SSD configuration early);
each one's time is estimated from throughputs measured earlier in the same run, and one that does not
fit the remaining ``--time-budget`` (default 540 s), the GPU memory, the host memory (60 %), or the
disk is skipped with its reason recorded.  Writes ``gpu_e2e.json`` (every run, skipped configurations
and why, per-step times, bytes per tier, ``stats()["sparse"]``, ``stats().get("pipeline")``, machine,
versions) and ``gpu_e2e.md`` under ``--out``.  Without CUDA (and without ``--tiny``) it exits with status 2.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_meta, median, parse_ints  # noqa: E402  (the benchmarks directory is not a package)
from tiercache_llm.hf_kwargs import cache_kwargs  # noqa: E402
from tiercache_llm.kv_cache import default_block_size  # noqa: E402

GiB = 1 << 30
DYNAMIC, OFFLOAD, EXACT = "dynamic", "dynamic-offload", "exact"
FETCH, REUSE, AWARE = "fetch-every-step", "reuse-layer-ahead", "attention-aware"
SPARSE = (FETCH, REUSE, AWARE)
SYSTEMS = (DYNAMIC, OFFLOAD, EXACT) + SPARSE
FILL_NOTE = ("KV caches are filled directly with seeded random K/V through Cache.update (one call per layer, "
             "the whole context), not by a model prefill; sparse caches get their key digests from the same "
             "keys. Decode steps run the real model. Random K/V: figures are speed, not accuracy.")


@dataclass
class ModelShape:
    layers: int = 32
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    hidden: int = 4096
    intermediate: int = 14336
    vocab: int = 128256

    def kv_bytes_per_token(self, itemsize: int) -> int:
        """Bytes of K and V of one token of one row over all layers."""
        return self.layers * 2 * self.kv_heads * self.head_dim * itemsize

    def weight_bytes(self, itemsize: int) -> int:
        per_layer = (2 * self.hidden * self.heads * self.head_dim + 2 * self.hidden * self.kv_heads * self.head_dim
                     + 3 * self.hidden * self.intermediate)
        return itemsize * (self.layers * per_layer + 2 * self.vocab * self.hidden)


@dataclass
class Settings:
    shape: ModelShape = field(default_factory=ModelShape)
    contexts: tuple[int, ...] = (32768, 65536, 131072)
    batches: tuple[int, ...] = (1, 4, 8)
    steps: int = 4
    block_size: int = 64  # sparse caches and the kernel rows
    exact_block_size: int | None = None  # exact caches; None: the mode's default (default_block_size("exact"))
    budget: int = 2048  # sparse: tokens per row, layer and KV head
    gpu_fraction: float = 0.125  # GPU tier = this fraction of the KV size
    ssd_host_fraction: float = 0.25  # the SSD configuration's host tier
    time_budget: float = 540.0  # seconds for the whole run, model construction included
    dtype: str = "bfloat16"
    tiny: bool = False

    @classmethod
    def tiny_settings(cls) -> "Settings":
        return cls(shape=ModelShape(layers=2, heads=4, kv_heads=2, head_dim=16, hidden=64, intermediate=128, vocab=256),
                   contexts=(256, 512), batches=(1, 2), steps=2, block_size=16, exact_block_size=16, budget=64,
                   time_budget=240.0,
                   dtype="float32", tiny=True)


@dataclass
class Config:
    """One run: a system at a (context, batch) point with its tier budgets (bytes; 0: no such tier)."""

    system: str
    context: int
    batch: int
    tiers: str  # "gpu+host", "gpu+host+ssd", or "-" for transformers' caches
    gpu: int = 0
    host: int = 0
    disk: int = 0

    @property
    def label(self) -> str:
        ctx = f"{self.context // 1024}K" if self.context % 1024 == 0 else str(self.context)
        return f"{self.system} @ {ctx} x{self.batch} [{self.tiers}]"


def plan(s: Settings, device: torch.device) -> list[Config]:
    """Configurations in priority order: points by KV size (smallest first); the SSD configuration right
    after the smallest point."""
    itemsize = torch.empty((), dtype=getattr(torch, s.dtype)).element_size()
    per_token = s.shape.kv_bytes_per_token(itemsize)
    points = sorted(((c, b) for c in s.contexts for b in s.batches), key=lambda p: (p[0] * p[1], p[0]))
    out: list[Config] = []
    for i, (c, b) in enumerate(points):
        kv = per_token * c * b
        gpu = int(kv * s.gpu_fraction) if device.type == "cuda" else 0
        host = int(kv * 1.1) + 64 * 1024 * 1024
        out.append(Config(DYNAMIC, c, b, "-"))
        if device.type == "cuda":
            out.append(Config(OFFLOAD, c, b, "-"))
        for system in (EXACT,) + SPARSE:
            out.append(Config(system, c, b, "gpu+host" if gpu else "host", gpu=gpu, host=host))
        if i == 0:
            ssd_host = int(kv * s.ssd_host_fraction)
            for system in (EXACT,) + SPARSE:
                out.append(Config(system, c, b, ("gpu+" if gpu else "") + "host+ssd", gpu=gpu, host=ssd_host,
                                  disk=int(kv * 1.2) + 64 * 1024 * 1024))
    return out


# -- model and caches ------------------------------------------------------------------------------------
def build_model(s: Settings, device: torch.device) -> Any:
    from transformers import AutoModelForCausalLM, LlamaConfig

    sh = s.shape
    config = LlamaConfig(vocab_size=sh.vocab, hidden_size=sh.hidden, intermediate_size=sh.intermediate,
                         num_hidden_layers=sh.layers, num_attention_heads=sh.heads, num_key_value_heads=sh.kv_heads,
                         head_dim=sh.head_dim, max_position_embeddings=max(s.contexts) + 64, rope_theta=500000.0,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    dtype = getattr(torch, s.dtype)
    with torch.device(device):
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        except TypeError:  # transformers < 4.56 knows torch_dtype only
            model = AutoModelForCausalLM.from_config(config, torch_dtype=dtype)
    return model.to(device=device, dtype=dtype).eval()


def make_cache(model: Any, cfg: Config, s: Settings, workdir: Path) -> Any:
    from transformers import DynamicCache

    if cfg.system == DYNAMIC:
        return DynamicCache(config=model.config)
    if cfg.system == OFFLOAD:
        return DynamicCache(config=model.config, offloading=True)
    from tiercache_llm import TieredKVCache

    opts: dict[str, Any] = dict(gpu=cfg.gpu or None, host=cfg.host or None)
    if cfg.disk:
        opts.update(disk=cfg.disk, path=str(workdir / f"kv-{time.monotonic_ns()}"))
    if cfg.system == EXACT:
        return TieredKVCache.for_model(model, mode="exact", block_size=s.exact_block_size, **opts)
    return TieredKVCache.for_model(model, mode="sparse", strategy=cfg.system, budget=s.budget,
                                   block_size=s.block_size, **opts)


def fill(cache: Any, cfg: Config, s: Settings, device: torch.device) -> None:
    """Every layer gets the point's seeded random K/V of the whole context in one ``update``."""
    sh = s.shape
    dtype = getattr(torch, s.dtype)
    sparse = getattr(cache, "_sparse", None) is not None
    valid = torch.ones(cfg.batch, cfg.context, dtype=torch.bool, device=device)
    for layer in range(sh.layers):
        gen = torch.Generator(device=device).manual_seed(1000 * cfg.context + 10 * cfg.batch + layer)
        k = torch.randn(cfg.batch, sh.kv_heads, cfg.context, sh.head_dim, generator=gen, device=device, dtype=dtype)
        v = torch.randn(cfg.batch, sh.kv_heads, cfg.context, sh.head_dim, generator=gen, device=device, dtype=dtype)
        cache.update(k, v, layer)
        if sparse:  # what the prepared model's attention does after a prefill's update (attention_hook)
            state = cache.layers[layer].sparse
            if state is not None and state.pending is not None:
                state.pending = None
                state.append(k, valid)
        del k, v
    if sparse:
        cache._end_forward()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode(model: Any, cache: Any, cfg: Config, s: Settings, device: torch.device, deadline: float = math.inf
           ) -> tuple[list[float], list[list[int]], dict[str, Any]]:
    """One untimed step, then ``s.steps`` timed greedy steps (fewer when ``deadline``, a
    ``time.monotonic()`` value, passes after at least one); ``(seconds per timed step, tokens per step,
    the cache's stats after the untimed step)``."""
    token = torch.full((cfg.batch, 1), 5, dtype=torch.long, device=device)
    times, tokens, before = [], [], {}
    with torch.inference_mode():
        for step in range(s.steps + 1):
            _sync(device)
            t0 = time.perf_counter()
            logits = model(input_ids=token, **cache_kwargs(cache, model), use_cache=True).logits
            token = logits[:, -1:].argmax(-1)
            _sync(device)
            if step:
                times.append(time.perf_counter() - t0)
                if time.monotonic() > deadline:
                    break
            else:
                before = cache_stats(cache)
            tokens.append(token.flatten().tolist())
    return times, tokens, before


def cache_stats(cache: Any) -> dict[str, Any]:
    if not hasattr(cache, "stats"):
        return {}
    st = cache.stats()
    return {"sparse": st.get("sparse"), "pipeline": st.get("pipeline"), "kv": st.get("kv"),
            "tiers": st.get("tiercache", {}).get("tiers")}


def tier_bytes_read(before: dict[str, Any] | None, after: dict[str, Any]) -> dict[str, int]:
    """Bytes read from each tier of the tiercache over the timed steps (its per-tier ``bytes_read``)."""
    a, b = after.get("tiers") or {}, (before or {}).get("tiers") or {}
    return {tier: int(row.get("bytes_read", 0) - (b.get(tier) or {}).get("bytes_read", 0)) for tier, row in a.items()}


def sparse_bytes_fetched(before: dict[str, Any] | None, after: dict[str, Any]) -> dict[str, int]:
    """Bytes the sparse fetch stage read per tier over the timed steps (``stats()["sparse"]["total"]``)."""
    def get(st):
        return ((st or {}).get("sparse") or {}).get("total", {}).get("bytes_fetched", {}) or {}

    a, b = get(after), get(before)
    return {tier: int(n - b.get(tier, 0)) for tier, n in a.items()}


# -- feasibility ------------------------------------------------------------------------------------------
@dataclass
class Budget:
    """What the machine and the clock allow; throughputs refined from this run's own measurements."""

    deadline: float
    gpu_free: int
    host_avail: int
    disk_free: int
    fill_rate: dict[str, float] = field(default_factory=lambda: {"gpu": 4e9, "host": 2e9, "disk": 0.8e9})
    read_rate: dict[str, float] = field(default_factory=lambda: {"gpu": 200e9, "host": 10e9, "disk": 1.0e9})
    step_floor: float = 0.05  # seconds for a decode step whatever the cache (weights, Python)
    pin_rate: float = 4e9  # bytes/s of pinned host allocation (0 cost on a CPU-only run: nothing is pinned)

    def estimate(self, cfg: Config, s: Settings, kv: int) -> float:
        disk = max(0, kv - cfg.gpu - cfg.host) if cfg.disk else 0
        # pinning the host tier (cudaHostAlloc, at construction) is paid by every tiered run
        fill = kv / self.fill_rate["host"] + disk / self.fill_rate["disk"] + cfg.host / self.pin_rate
        if cfg.system == DYNAMIC:
            fill, read = kv / self.fill_rate["gpu"], kv / self.read_rate["gpu"]
        elif cfg.system == OFFLOAD:
            read = kv / self.read_rate["host"]
        elif cfg.system == EXACT:
            read = (kv - disk) / self.read_rate["host"] + disk / self.read_rate["disk"]
        else:
            frac = min(1.0, s.budget / cfg.context)
            read = frac * ((kv - disk) / self.read_rate["host"] + disk / self.read_rate["disk"])
        return 5.0 + fill + (s.steps + 1) * (self.step_floor + read)

    def refuse(self, cfg: Config, s: Settings, kv: int, weights: int, device: torch.device) -> str | None:
        if device.type == "cuda":
            if cfg.system == DYNAMIC and kv + 2 * GiB > self.gpu_free:
                return f"KV {kv / GiB:.1f} GiB does not fit the {self.gpu_free / GiB:.1f} GiB of GPU memory left beside the weights"
            if cfg.gpu and cfg.gpu + 4 * GiB > self.gpu_free:
                return f"GPU tier {cfg.gpu / GiB:.1f} GiB does not fit beside the weights"
        host_need = kv if cfg.system == OFFLOAD else (0 if cfg.system == DYNAMIC else cfg.host)
        if host_need > 0.6 * self.host_avail:
            return f"needs {host_need / GiB:.1f} GiB of host memory, more than 60% of the {self.host_avail / GiB:.1f} GiB available"
        if cfg.disk and cfg.disk > 0.8 * self.disk_free:
            return f"disk tier {cfg.disk / GiB:.1f} GiB exceeds 80% of the {self.disk_free / GiB:.1f} GiB free"
        need = self.estimate(cfg, s, kv)
        left = self.deadline - time.monotonic()
        if need > left:
            return f"estimated {need:.0f} s (fill + {s.steps + 1} steps) exceeds the {max(0.0, left):.0f} s left of the time budget"
        return None


def dry_run(s: Settings, gpu_free: float = 62 * GiB, host: float = 120 * GiB, disk: float = 60 * GiB) -> list[str]:
    """The plan on an assumed H100 machine (80 GB GPU minus 16 GiB of weights, 120 GiB of host memory free,
    60 GiB of disk) with the default throughput assumptions: which configurations would run, the
    estimated seconds of each, and which would be skipped and why.  Nothing is allocated."""
    budget = Budget(deadline=time.monotonic() + s.time_budget - 30.0, gpu_free=int(gpu_free), host_avail=int(host),
                    disk_free=int(disk))  # 30 s: model construction
    itemsize = torch.empty((), dtype=getattr(torch, s.dtype)).element_size()
    lines, spent = [], 30.0
    for cfg in plan(s, torch.device("cuda")):
        kv = s.shape.kv_bytes_per_token(itemsize) * cfg.context * cfg.batch
        why = budget.refuse(cfg, s, kv, 0, torch.device("cuda"))
        if why is None:
            need = budget.estimate(cfg, s, kv)
            budget.deadline -= need  # as if it had run
            spent += need
            lines.append(f"run   {cfg.label}: ~{need:.0f} s")
        else:
            lines.append(f"skip  {cfg.label}: {why}")
    lines.append(f"estimated total: {spent:.0f} s")
    return lines


def attention_microbench(s: Settings, device: torch.device, repeats: int = 20) -> list[dict[str, Any]]:
    """Sparse decode attention alone at this config's decode shapes (one layer), every path on the same
    inputs: ``U`` = twice the blocks one head selects (the union over heads is larger than one
    selection), 70 % of them selected per head, in each selected block 60 % of its 8-token pages (at
    least one); the pool is the fetch buffer ``(U, B, H, S, D)``.  Paths: ``torch`` / ``triton``:
    ``sparse_attention`` over the union of blocks with a token mask (reference; block-table kernel);
    ``pages`` / ``pages_triton``: ``attend_selected(backend="pages" / "pages-triton")`` (page table
    built per call; torch path; Triton page-table kernel reading pages in place).  Triton paths on CUDA
    only.  Median ms per call (synchronised around each call)."""
    from tiercache_llm.sparse.attention import sparse_attention
    from tiercache_llm.sparse.selection import BlockSelection
    from tiercache_llm.sparse_layer import attend_selected

    sh, dtype = s.shape, getattr(torch, s.dtype)
    triton_ok = False
    if device.type == "cuda":
        from tiercache_kernels.triton_support import compiled_triton_usable

        triton_ok = compiled_triton_usable(device)
    out = []
    for b in s.batches:
        u = max(1, 2 * s.budget // s.block_size)
        k = s.block_size // math.gcd(s.block_size, 8)
        gen = torch.Generator(device=device).manual_seed(b)
        kb = torch.randn(u, b, sh.kv_heads, s.block_size, sh.head_dim, generator=gen, device=device, dtype=dtype)
        vb = torch.randn_like(kb)
        q = torch.randn(b, sh.heads, 1, sh.head_dim, generator=gen, device=device, dtype=dtype)
        mask = torch.rand(b, sh.kv_heads, u, generator=gen, device=device) < 0.7
        pages = (torch.rand(b, sh.kv_heads, u, k, generator=gen, device=device) < 0.6)
        pages[..., 0] |= ~pages.any(-1)
        pm = (pages & mask.unsqueeze(-1)).view(b, sh.kv_heads, u * k)
        sel = BlockSelection(mask, mask.any(1), torch.arange(u, device=device), torch.zeros(b, sh.kv_heads, u * k, device=device),
                             torch.zeros(b, dtype=torch.long, device=device), pm, k)
        ctx = u * s.block_size - s.block_size // 2  # the last block half full
        valid = torch.ones(b, ctx, dtype=torch.bool, device=device)
        pos = torch.arange(u * s.block_size, device=device).view(u, s.block_size)
        token_valid = (pos < ctx).unsqueeze(0).unsqueeze(0) & sel.token_mask(s.block_size)
        nk = torch.randn(b, sh.kv_heads, 1, sh.head_dim, generator=gen, device=device, dtype=dtype)
        nv = torch.randn_like(nk)
        slots = torch.arange(u, device=device)
        paths = {
            "torch": lambda: sparse_attention(q, kb.permute(1, 2, 0, 3, 4), vb.permute(1, 2, 0, 3, 4), mask, token_valid,
                                              nk, nv, backend="torch"),
            "pages": lambda: attend_selected(q, kb, vb, slots, sel, valid, ctx, s.block_size, nk, nv, None, backend="pages"),
        }
        if triton_ok:
            paths["triton"] = lambda: sparse_attention(q, kb.permute(1, 2, 0, 3, 4), vb.permute(1, 2, 0, 3, 4), mask,
                                                       token_valid, nk, nv, backend="triton")
            paths["pages_triton"] = lambda: attend_selected(q, kb, vb, slots, sel, valid, ctx, s.block_size, nk, nv, None,
                                                            backend="pages-triton")
        row: dict[str, Any] = {"batch": b, "blocks": u, "block_size": s.block_size, "page_size": s.block_size // k}
        times: dict[str, list[float]] = {name: [] for name in paths}
        results = {}
        for i in range(repeats + 2):
            for name, f in paths.items():  # interleaved
                _sync(device)
                t0 = time.perf_counter()
                res = f()
                _sync(device)
                if i >= 2:
                    times[name].append(time.perf_counter() - t0)
                results[name] = res
        for name in paths:
            row[f"{name}_ms"] = 1e3 * median(times[name])
        ref = results["torch"]
        for name in paths:
            if name != "torch":
                key = "max_abs_diff" if name == "triton" else f"{name}_max_abs_diff"
                row[key] = float((results[name].output.float() - ref.output.float()).abs().max())
                row[f"{name}_speedup"] = row["torch_ms"] / row[f"{name}_ms"]
        if "triton" in paths:
            row["speedup"] = row.pop("triton_speedup")
        out.append(row)
    return out


def _host_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * GiB


# -- one run ---------------------------------------------------------------------------------------------
def run_one(model: Any, cfg: Config, s: Settings, device: torch.device, workdir: Path, budget: Budget,
            kv: int) -> dict[str, Any]:
    rec: dict[str, Any] = {"config": asdict(cfg), "label": cfg.label, "kv_bytes": kv}
    cache = None
    try:
        t_build = time.perf_counter()
        cache = make_cache(model, cfg, s, workdir)
        _sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            fill(cache, cfg, s, device)
        _sync(device)
        rec["fill_seconds"] = time.perf_counter() - t0
        rec["build_seconds"] = t0 - t_build
        times, tokens, before = decode(model, cache, cfg, s, device, budget.deadline)
        if len(times) < s.steps:
            rec["note"] = f"stopped after {len(times)} timed steps: time budget reached"
        after = cache_stats(cache)
        ms = 1e3 * median(times)
        rec.update(status="ok", step_ms=[1e3 * t for t in times], ms_per_step=ms, tokens_per_s=cfg.batch * 1e3 / ms,
                   tokens=tokens, bytes_read_per_tier=tier_bytes_read(before, after),
                   sparse_bytes_fetched=sparse_bytes_fetched(before, after), stats=after)
        rec["bytes_read_per_tier_per_step"] = {k: v / len(times) for k, v in rec["bytes_read_per_tier"].items()}
        # refine the estimates for later configurations
        if cfg.system == EXACT and not cfg.disk:
            budget.read_rate["host"] = max(1e8, kv / max(1e-6, median(times)))
        fill_kind = "gpu" if cfg.system == DYNAMIC else "host"
        if not cfg.disk:
            budget.fill_rate[fill_kind] = max(1e8, kv / max(1e-6, rec["fill_seconds"]))
        if cfg.system == DYNAMIC:
            budget.step_floor = max(0.001, median(times))
    except torch.cuda.OutOfMemoryError as exc:
        rec.update(status="skipped", reason=f"out of GPU memory: {str(exc).splitlines()[0]}")
    except Exception as exc:  # recorded, never fatal: the other configurations still run
        rec.update(status="error", reason=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()[-4000:])
    finally:
        if cache is not None and hasattr(cache, "close"):
            try:
                cache.close()
            except Exception as exc:  # noqa: BLE001
                rec["close_error"] = f"{type(exc).__name__}: {exc}"
        del cache
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rec


def run_all(s: Settings, out_dir: Path, workdir: Path | None, device: torch.device) -> dict[str, Any]:
    start = time.monotonic()
    out_dir.mkdir(parents=True, exist_ok=True)
    own_workdir = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="gpu_e2e-", dir=None if workdir is None else workdir))
    dtype = getattr(torch, s.dtype)
    itemsize = torch.empty((), dtype=dtype).element_size()
    weights = s.shape.weight_bytes(itemsize)
    records: list[dict[str, Any]] = []
    attention: list[dict[str, Any]] = []
    try:
        t0 = time.perf_counter()
        model = build_model(s, device)
        build_s = time.perf_counter() - t0
        gpu_free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0
        budget = Budget(deadline=start + s.time_budget, gpu_free=gpu_free, host_avail=_host_available(),
                        disk_free=shutil.disk_usage(workdir).free)
        attention = attention_microbench(s, device)
        for row in attention:
            print(f"attention b={row['batch']}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()
                                                             if k.endswith("_ms") or k == "speedup"), flush=True)
        if s.tiny:
            budget.step_floor = 0.01
        if device.type != "cuda":
            budget.pin_rate = math.inf
        for cfg in plan(s, device):
            kv = s.shape.kv_bytes_per_token(itemsize) * cfg.context * cfg.batch
            why = budget.refuse(cfg, s, kv, weights, device)
            if why is not None:
                records.append({"config": asdict(cfg), "label": cfg.label, "kv_bytes": kv, "status": "skipped", "reason": why})
                print(f"skip  {cfg.label}: {why}", flush=True)
                continue
            rec = run_one(model, cfg, s, device, workdir, budget, kv)
            records.append(rec)
            figure = f"{rec['ms_per_step']:.1f} ms/step" if rec["status"] == "ok" else rec.get("reason", "")
            print(f"{rec['status']:5s} {cfg.label}: {figure}", flush=True)
    finally:
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    check_exact(records)
    result = {
        "benchmark": "gpu_e2e", "settings": asdict(s), "device": str(device), "fill": FILL_NOTE,
        "kv_bytes_per_token_row": s.shape.kv_bytes_per_token(itemsize), "weight_bytes": weights,
        "model_build_seconds": build_s, "attention_microbench": attention, "runtime_seconds": time.monotonic() - start, "machine": machine_meta(),
        "versions": versions(), "runs": records,
    }
    (out_dir / "gpu_e2e.json").write_text(json.dumps(result, indent=1, default=str))
    (out_dir / "gpu_e2e.md").write_text(markdown(result))
    return result


def check_exact(records: list[dict[str, Any]]) -> None:
    """Mark each exact run with whether its tokens equal ``dynamic``'s (or the offloaded one's) at its point."""
    refs: dict[tuple[int, int], list] = {}
    for r in records:
        if r.get("status") == "ok" and r["config"]["system"] in (DYNAMIC, OFFLOAD):
            refs.setdefault((r["config"]["context"], r["config"]["batch"]), r["tokens"])
    for r in records:
        if r.get("status") == "ok" and r["config"]["system"] == EXACT:
            ref = refs.get((r["config"]["context"], r["config"]["batch"]))
            r["tokens_equal_dynamic"] = None if ref is None else r["tokens"] == ref


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("transformers", "triton", "cupy", "zarr", "numcodecs", "kvikio"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001
            out[name] = None
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
    return out


def _size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [
        "# GPU end-to-end decode", "",
        f"Device: {result['device']} ({result['versions'].get('gpu', 'no GPU')}); torch {result['versions']['torch']}, "
        f"triton {result['versions'].get('triton')}. Runtime {result['runtime_seconds']:.0f} s "
        f"(model build {result['model_build_seconds']:.1f} s). Model: {s['shape']['layers']} layers, "
        f"{s['shape']['heads']} q heads / {s['shape']['kv_heads']} KV heads, head dim {s['shape']['head_dim']}, "
        f"{s['dtype']} random weights. Sparse budget {s['budget']} tokens; sparse blocks {s['block_size']} tokens, "
        f"exact blocks {s.get('exact_block_size') or default_block_size('exact')}; "
        f"GPU tier {s['gpu_fraction']:.3g} of the KV; {s['steps']} timed steps after one untimed.", "",
        f"{result['fill']}", "",
        "| context | batch | system | tiers | KV GiB | ms/step | tokens/s | read per step by tier | reuse | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        c = r["config"]
        if r["status"] == "ok":
            per = r.get("bytes_read_per_tier_per_step", {})
            tiers = ", ".join(f"{k}: {_size(v)}" for k, v in per.items()) or "-"
            sp = (r.get("stats") or {}).get("sparse") or {}
            reuse = sp.get("total", {}).get("reuse_rate")
            note = "" if r.get("tokens_equal_dynamic") in (None, True) else "tokens differ from dynamic!"
            lines.append(f"| {c['context']} | {c['batch']} | {c['system']} | {c['tiers']} | {r['kv_bytes'] / GiB:.2f} | "
                         f"{r['ms_per_step']:.1f} | {r['tokens_per_s']:.1f} | {tiers} | "
                         f"{'-' if reuse is None else f'{reuse:.2f}'} | {note} |")
        else:
            lines.append(f"| {c['context']} | {c['batch']} | {c['system']} | {c['tiers']} | {r['kv_bytes'] / GiB:.2f} | "
                         f"- | - | - | - | {r['status']}: {r.get('reason', '')} |")
    if result.get("attention_microbench"):
        lines += ["", "Sparse attention alone, one layer (median ms per call; `torch` / `triton`: union of blocks "
                  "with a token mask, reference / block-table kernel; `pages` / `pages triton`: page table, torch "
                  "path / page-table kernel):", "",
                  "| batch | blocks | torch ms | triton ms | pages ms | pages triton ms | best speed-up | max abs diff |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in result["attention_microbench"]:
            cell = lambda key: "-" if row.get(key) is None else f"{row[key]:.3f}"  # noqa: E731
            others = [row[k] for k in ("triton_ms", "pages_ms", "pages_triton_ms") if row.get(k)]
            best = row["torch_ms"] / min(others) if others else None
            diffs = [row[k] for k in ("max_abs_diff", "pages_max_abs_diff", "pages_triton_max_abs_diff") if k in row]
            lines.append(f"| {row['batch']} | {row['blocks']} | {row['torch_ms']:.3f} | {cell('triton_ms')} | "
                         f"{cell('pages_ms')} | {cell('pages_triton_ms')} | {'-' if best is None else f'{best:.1f}x'} | "
                         f"{'-' if not diffs else f'{max(diffs):.1e}'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="folder for gpu_e2e.json and gpu_e2e.md (required unless --dry-run)")
    p.add_argument("--tiny", action="store_true", help="small config and contexts; runs on CPU (CI smoke test)")
    p.add_argument("--contexts", type=lambda t: parse_ints(t, "--contexts"))
    p.add_argument("--batches", type=lambda t: parse_ints(t, "--batches"))
    p.add_argument("--steps", type=int)
    p.add_argument("--budget", type=int, help="sparse budget, tokens per row, layer and KV head")
    p.add_argument("--time-budget", type=float, help="seconds for the whole run (default 540; tiny 240)")
    p.add_argument("--workdir", type=Path, help="where the SSD tier's files go (default: a temp dir)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and time estimates for an H100 machine; run nothing")
    args = p.parse_args(argv)
    s = Settings.tiny_settings() if args.tiny else Settings()
    for name in ("contexts", "batches", "steps", "budget", "time_budget"):
        if getattr(args, name) is not None:
            setattr(s, name, getattr(args, name))
    if s.steps < 1:
        p.error("--steps must be >= 1")
    if args.dry_run:
        print("\n".join(dry_run(s)))
        return 0
    if args.out is None:
        p.error("--out is required")
    if not args.tiny and not torch.cuda.is_available():
        print("gpu_e2e: CUDA is not available (use --tiny for the CPU smoke run)", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    result = run_all(s, args.out, args.workdir, device)
    ok = sum(r["status"] == "ok" for r in result["runs"])
    print(f"gpu_e2e: {ok} of {len(result['runs'])} configurations measured in {result['runtime_seconds']:.0f} s; "
          f"wrote {args.out / 'gpu_e2e.json'}")
    bad = [r["label"] for r in result["runs"] if r.get("tokens_equal_dynamic") is False]
    if bad:
        print(f"gpu_e2e: exact tiered decoding differs from DynamicCache in {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
