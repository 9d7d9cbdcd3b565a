"""``TieredKVCache``: a transformers ``Cache`` whose K/V blocks live in a :class:`tiercache.Cache`.

Plug it into ``generate``::

    cache = TieredKVCache(model.config, host="1GiB", disk="16GiB", path="/nvme/kv")
    out = model.generate(input_ids, cache=cache, max_new_tokens=256)  # past_key_values= before transformers 5.24

Exact mode (default): every forward pass attends over every block, so greedy decoding is
token-identical to ``DynamicCache``.  Sparse mode (``TieredKVCache.for_model(model, mode="sparse",
budget=0.25)``): decode steps attend over a budget of blocks chosen per step and KV head, and the
attention those blocks receive decides which tier they live in.  See ``docs/tiercache_llm.md``.
"""

from __future__ import annotations

import copy
import dataclasses
import numbers
import operator
import os
import time
import uuid
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import torch
from transformers import PretrainedConfig
from transformers.cache_utils import Cache, CacheLayerMixin

from tiercache import CacheClosedError
from tiercache.batched import INTRA_OP_GRAIN, machine_idle

from .blocks import BlockRef, block_key
from .tensor_modes import with_normal_tensors
from . import decode_buffer
from .decode_buffer import DecodeBuffer, ReadAhead, StatesBuffer
from .errors import InconsistentCacheError, UnsupportedModelError
from .sparse.pipeline import DecodePipeline, PipelineConfig
from .sparse.pool import AUTO, check_pool_bytes
from .sparse.selection import SelectionConfig
from .sparse_layer import (
    STRATEGIES, SparseController, SparseLayerState, check_decay, check_page_size, default_page_size,
    needs_rescale, selection_config,
)
from .store import BlockStore

SUPPORTED_TRANSFORMERS = ">=5.17,<6"
_UNSET: Any = object()
# Tokens per stored block when ``block_size`` is left at ``None``, per mode (see default_block_size).
EXACT_BLOCK_SIZE = 256
SPARSE_BLOCK_SIZE = 128
# Cores this process may run on (layer-ahead reads of memory-only tiers need one beside torch's threads).
_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
#: Copies up to this many elements (1 MiB of float32) are cut below the grain by :func:`_copy_on_caller`.
_CALLER_COPY_MAX = 8 * INTRA_OP_GRAIN
DEFAULT_DECAY = 0.9  # attention-aware: per decode step decay of the accumulated attention mass
#: PipelineConfig fields that only steer attention-aware placement (tiercache scores, promotion, disk staging of
#: the highest-mass blocks): ``fetch-every-step`` and ``reuse-layer-ahead`` run under ``"kv-stream"``, which has
#: no scores and never promotes, so a value other than their strategy's is refused there (it would change nothing).
ATTENTION_AWARE_ONLY = ("disk_staging", "defer_promotions", "stage_ahead", "stage_near", "promote_bytes_per_step",
                        "complement_reuse", "exclusive_pool")
MAX_TOKENS = 1 << 48  # token counts (budget, sink, recent) above it are clamped to it: all of any context
_DEVICE_ONLY = "device"  # _ahead_overlaps: read ahead only the layers whose reads wait on a device


def _copy_on_caller(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)`` (``(batch, heads, tokens, head_dim)`` views) on the calling thread: with more than one
    torch thread, a CPU copy of ``INTRA_OP_GRAIN`` to ``_CALLER_COPY_MAX`` elements is cut along the tokens into
    pieces below the grain (one ``_foreach_copy_``); the bytes written are the same.

    Exact decode's tail copy is such a copy at every step and layer (up to ``block_size - 1`` tokens).  As one
    copy it would open a parallel region of torch's threads, which costs little on idle cores but stalls
    for milliseconds whenever another process holds one of them (2-core box at load 8, 2 threads: a 47K-element
    copy took 16 us median, 7.7 ms at the 90th percentile; cut in two, 9 and 14 us).  The context's blocks
    are still copied by one parallel copy per layer, as ``DynamicCache``'s ``torch.cat`` copies them."""
    n = dst.numel()
    if n < INTRA_OP_GRAIN or n > _CALLER_COPY_MAX or dst.device.type != "cpu" or torch.get_num_threads() == 1:
        dst.copy_(src)
        return
    per_token = n // dst.shape[2]
    step = (INTRA_OP_GRAIN - 1) // per_token
    if step == 0:  # one token alone reaches the grain: nothing to gain from cutting
        dst.copy_(src)
        return
    torch._foreach_copy_(list(dst.split(step, 2)), list(src.split(step, 2)))


def default_block_size(mode: str) -> int:
    """Tokens per stored block of a cache of ``mode`` whose ``block_size`` is left at ``None``.

    ``"exact"``: :data:`EXACT_BLOCK_SIZE` (256).  Exact mode reads every stored block every decode step
    and has no selection, so a larger block only means fewer tiercache entries (less per-entry work,
    fewer and larger disk reads) and a larger in-memory tail; measured with SmolLM2 (host 16 MiB + disk,
    ``direct_io``), 256-token blocks decode a 4K context markedly faster than 64-token ones
    (docs/tiercache_llm.md "Block size").  ``"sparse"``: :data:`SPARSE_BLOCK_SIZE` (128): a block is the
    unit a selection fetches (the union of the blocks holding a selected page, over heads and rows), so a
    larger block fetches more unselected tokens but fewer entries; the selection works on pages
    (``page_size``, 8), so logits are the same at every block size.  On the 2-core CPU machine, where one
    disk entry costs about as much as 62 KiB of transfer, 128-token blocks decoded 21-26 % faster than 64 at
    batch 1 (8K, synthetic 32K) for 11-18 % more bytes, and the same within noise at 8K x 4
    (docs/sparse.md "Fetch granularity", "One entry per block").

    Raises:
        ValueError: ``mode`` is neither ``"exact"`` nor ``"sparse"``.
    """
    if mode == "exact":
        return EXACT_BLOCK_SIZE
    if mode == "sparse":
        return SPARSE_BLOCK_SIZE
    raise ValueError(f"mode must be 'exact' or 'sparse', got {mode!r}")


@dataclass(frozen=True)
class TieredKVSettings:
    """How a :class:`TieredKVCache` cuts and stores K/V.

    Attributes:
        block_size: tokens per stored block (> 0), or ``None`` (default) for the mode's default,
            :func:`default_block_size`: 256 in exact mode, 128 in sparse mode.  The resolved value is what
            ``settings.block_size`` and ``stats()["kv"]["block_size"]`` hold.  Smaller blocks waste less
            tail memory (the partial tail, up to ``block_size - 1`` tokens per layer, stays in memory
            beside the tiers) and move in finer units; larger blocks mean fewer tiercache entries and
            larger transfers.  In sparse mode a block is the unit a selection fetches.
        mode: ``"exact"`` (attention over every block) or ``"sparse"`` (decode steps attend over a
            per-step selection of blocks; needs a model prepared by :meth:`TieredKVCache.for_model`).
        budget, sink, recent: sparse mode: tokens attended per row, layer and KV head besides the new
            token (``int``), or a fraction in (0, 1] of each row's valid context (``float``; default
            ``0.25``); ``sink`` leading (default 4) and ``recent`` trailing (default 64) valid tokens are
            always attended.  A budget >= the context gives exactly dense attention.
        strategy: sparse mode: ``"attention-aware"`` (default: the attention mass blocks receive goes
            into their tiercache scores under the ``"attention-aware"`` policy, so they are promoted and
            kept close), ``"fetch-every-step"`` (same selection, every selected block read from its
            home tier every step under ``"kv-stream"``: no promotion, no reuse) or
            ``"reuse-layer-ahead"`` (same selection under ``"kv-stream"``, reusing the previous step's
            fetched blocks and prefetching one layer ahead; no attention-aware placement, no disk staging).
        decay: sparse, attention-aware: per decode step decay of the accumulated mass (default 0.9).  The
            other strategies do not use it: given with them it is refused (``ValueError``), and left out it
            resolves to ``None`` (not in force).
        page_size: sparse mode: tokens per selection page (divides ``block_size``; default the largest
            power of two <= 8 dividing it, i.e. 8 for the default 128-token blocks).  Digests, scores and the budget
            are per page; a storage block is fetched when any of its pages is selected and attention
            is masked to the selected pages (docs/sparse.md: finer pages are far more accurate at
            small budgets, at the price of touching more blocks per token attended).
        digests: sparse mode: storage of the key digests (``"float16"``, default: half the memory, lower
            bounds rounded down and upper bounds rounded up so they still bound every ``q . k``; a layer
            whose keys leave float16's range switches to float32; ``"float32"``: the exact min/max).
            Measured on SmolLM2 at 8K: 99.97 % of the pages float32 digests select, the same accuracy
            (docs/sparse.md "Digests").
        gpu, host, disk: tier budgets (bytes or strings like ``"512MiB"``; ``None``/0 disables the
            tier).  Ignored when an existing ``tiercache.Cache`` is passed to the cache.
        path: directory of the disk tier.  ``None`` with a disk budget: a temporary directory that
            :meth:`TieredKVCache.close` removes.
        policy: tiercache placement policy: ``"kv-stream"`` (default,
            :class:`~tiercache_llm.policies.StreamingKVPolicy`: no promotion, oldest blocks demoted
            first), ``"kv-stream-spread"`` (:class:`~tiercache_llm.policies.SpreadStreamingKVPolicy`: no
            promotion, the oldest block position of any layer demoted first), ``"attention-aware"``
            (:class:`~tiercache_llm.policies.AttentionPlacementPolicy`, the
            default of sparse attention-aware caches), or any tiercache policy (``"lru"``, ``"lfu"``,
            ``"score"``, a Policy object).  ``None``: the mode's default.
        compression: tiercache compression codec for the disk tier (``None``: none).
        prefetch: exact mode: layer-ahead reads (default ``True``).  As a layer's ``update`` starts, the
            stored blocks the next layer will attend over (the next forward pass's first layer after
            the last layer) are read in the background, on a reader thread, straight into another
            slot of the decode buffer (:mod:`tiercache_llm.decode_buffer`), so the reads overlap this
            layer's attention and the next layer's update only waits for what is still missing.  Layers
            further ahead (up to ``decode_buffer.MAX_DEPTH`` = 2 ahead) are read too, each into a slot of
            its own, while the reads pending stay within ``decode_buffer.AHEAD_BYTES`` (32 MiB), so the
            disk keeps reading through long stretches of compute (the step's end: the last layer, the
            LM head, sampling); layers larger than that are read one ahead.  With a disk tier the reads
            are more eager (``DecodeBuffer.for_store``): two run at once, so chunks stay in flight across
            layer boundaries, and the reads beyond the next layer pass over memory-held layers to the
            disk-reading ones, up to 4 layers and 192 MiB ahead, two layers at a time with one reader job
            and one ``get_many`` (``decode_buffer.DISK_GROUP``; small layers up to 8 MiB per job and 8 layers
            ahead, ``decode_buffer.DISK_GROUP_BYTES``).  Nothing is promoted
            (placement is unchanged); correctness never depends on a read ahead (one made stale by a
            crop, reorder or batch change is discarded, a failed one is redone synchronously).  With every tier in memory (no disk tier) the reads are memory
            copies, which only overlap compute on a core torch's intra-op threads leave free: when
            ``torch.get_num_threads()`` covers every core of the process, updates copy their blocks
            themselves instead (``stats()["prefetch"]["inline"]`` counts them), a run of evenly laid out
            blocks as one copy that may use torch's threads while the machine is otherwise idle, or
            whenever the blocks are too large to be copied on one thread anyway, as ``DynamicCache``'s
            ``torch.cat`` does (:func:`tiercache.batched.copy_pairs`).  ``stats()["prefetch"]`` has its counters.  Sparse mode has its
            own pipeline (``pipeline=``) and refuses ``prefetch=True``.
        direct_io: disk tier reads/writes bypass the OS page cache (tiercache
            ``CacheConfig.direct_io``), so the host budget is not silently extended by the page
            cache (falls back to buffered I/O with a warning where the filesystem refuses O_DIRECT,
            e.g. tmpfs; ``stats()["tiercache"]["tiers"]["disk"]["direct_io"]`` says which).  Without a disk
            tier it changes nothing: ``TieredKVCache(direct_io=True)`` without ``disk`` is refused
            (``ValueError``); the default (``True``) is simply not applied.
        pipeline: sparse mode: overrides of the strategy's decode pipeline
            (:class:`~tiercache_llm.sparse.pipeline.PipelineConfig` fields as a dict, e.g.
            ``{"staging_bytes": 64 << 20, "predictor": "query"}``, or a whole ``PipelineConfig``);
            ``None``: the strategy's defaults (see docs/sparse.md "Decode pipeline").  The fields that only
            steer attention-aware placement (:data:`ATTENTION_AWARE_ONLY`: ``disk_staging``,
            ``defer_promotions``, ``stage_ahead``, ``stage_near``, ``promote_bytes_per_step``,
            ``complement_reuse``, ``exclusive_pool``) are refused with another strategy at a value other than
            that strategy's (``ValueError``): under ``"kv-stream"`` they would change nothing.
        pool_bytes: sparse mode: bound of the resident block pools of all sparse layers together
            (``PipelineConfig.pool_bytes``).  They live on the model's device beside the tier budgets
            (``stats()["pipeline"]["reuse_bytes"]``, part of ``beside_tiers_bytes``).  ``"auto"`` (default):
            the budget of the memory tier on the model's device, i.e. the host tier's for a CPU model and
            the gpu tier's for a CUDA one, or the other memory tier's when that tier is absent (the KV
            memory a sparse cache holds then follows the budgets: at most the tiers plus as much again in
            pools, plus digests; with an existing ``cache=``, the budgets of that cache's tiers); a cache with
            neither a gpu nor a host tier refuses ``"auto"`` (``ValueError``: choose a bound or ``None``).
            Resolved at the first update; ``stats()["pipeline"]["pool_bound_bytes"]`` /
            ``["pool_bound_source"]`` say the bound in force and where it came from.  A byte count or a
            size string like ``"256MiB"``: that bound.  ``None``: unbounded, each layer keeps up to 1.5 x its
            selection (``attention-aware``), so at batch 4 the pools approach the whole KV.  A bound trades
            reuse for memory (docs/sparse.md "Pool budget" has the measured cost).  One layer's selection
            must fit: a smaller bound is exceeded with a warning (``pool_over_budget``).  Not a float, not
            0.  The default (``"auto"``) gives way to an explicit bound in ``pipeline``; two explicit
            bounds that differ are a ``ValueError``.  Exact mode takes only ``"auto"`` or ``None``.
    """

    block_size: int | None = None
    mode: Literal["exact", "sparse"] = "exact"
    gpu: int | str | None = None
    host: int | str | None = "4GiB"
    disk: int | str | None = None
    path: str | os.PathLike | None = None
    policy: Any = None
    compression: str | None = None
    prefetch: bool | None = None
    direct_io: bool = True
    budget: int | float | None = None
    sink: int | None = None
    recent: int | None = None
    strategy: str | None = None
    decay: float | None = None
    page_size: int | None = None
    digests: str | None = None
    pipeline: Any = None
    pool_bytes: int | str | None = "auto"

    def __post_init__(self) -> None:
        _plain_numbers(self)
        if self.block_size is None:
            object.__setattr__(self, "block_size", default_block_size(self.mode))  # validates mode
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int):
            raise TypeError(f"block_size must be an int or None, not {type(self.block_size).__name__}")
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if self.mode not in ("exact", "sparse"):
            raise ValueError(f"mode must be 'exact' or 'sparse', got {self.mode!r}")
        if self.prefetch is None:
            object.__setattr__(self, "prefetch", self.mode == "exact")
        elif self.prefetch is True and self.mode == "sparse":
            raise ValueError("prefetch=True is for mode='exact'; sparse mode prefetches through its decode pipeline "
                             "(pipeline=...)")
        sparse_opts = {k: getattr(self, k) for k in ("budget", "sink", "recent", "strategy", "decay", "page_size",
                                                          "digests")}
        if self.mode == "exact":
            given = sorted(k for k, v in sparse_opts.items() if v is not None)
            if given:
                raise ValueError(f"{given} apply to mode='sparse' only")
            if self.policy is None:
                object.__setattr__(self, "policy", "kv-stream")
        else:
            defaults = dict(budget=0.25, sink=4, recent=64, strategy="attention-aware", decay=DEFAULT_DECAY,
                            page_size=default_page_size(self.block_size), digests="float16")
            for k, v in defaults.items():
                if sparse_opts[k] is None:
                    object.__setattr__(self, k, v)
            if self.strategy != "attention-aware" and self.strategy in STRATEGIES:
                if sparse_opts["decay"] is not None:  # given: it would change nothing
                    raise ValueError(
                        f"decay applies to strategy='attention-aware' only (it decays the attention mass that "
                        f"drives placement); strategy={self.strategy!r} does not use it: leave decay out")
                object.__setattr__(self, "decay", None)  # not in force (stats() says so)
            SelectionConfig(budget=self.budget, sink=self.sink, recent=self.recent, digests=self.digests)  # validates
            for name in ("budget", "sink", "recent"):  # any count >= the context means all of it: keep it an int64
                value = getattr(self, name)
                if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > MAX_TOKENS:
                    object.__setattr__(self, name, MAX_TOKENS)
            if self.strategy not in STRATEGIES:
                raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
            if self.decay is not None:
                object.__setattr__(self, "decay", check_decay(self.decay))
            check_page_size(self.page_size, self.block_size)
            if self.policy is None:
                object.__setattr__(self, "policy", "attention-aware" if self.strategy == "attention-aware" else "kv-stream")
            elif self.strategy != "attention-aware" and self.policy != "kv-stream":
                raise ValueError(f"strategy={self.strategy!r} is defined with the 'kv-stream' policy (no promotion)")
        if self.pipeline is not None:
            if self.mode != "sparse":
                raise ValueError("pipeline applies to mode='sparse' only")
            if isinstance(self.pipeline, dict):
                given = self.pipeline
                object.__setattr__(self, "pipeline", PipelineConfig.for_strategy(self.strategy, **self.pipeline))
            elif not isinstance(self.pipeline, PipelineConfig):
                raise TypeError(f"pipeline must be a dict of PipelineConfig fields or a PipelineConfig, "
                                f"not {type(self.pipeline).__name__}")
            else:
                given = {f.name: getattr(self.pipeline, f.name) for f in dataclasses.fields(PipelineConfig)}
            if self.strategy != "attention-aware":
                base = PipelineConfig.for_strategy(self.strategy)
                for name in ATTENTION_AWARE_ONLY:
                    if name in given and given[name] != getattr(base, name):
                        raise ValueError(
                            f"pipeline {name}={given[name]!r} applies to strategy='attention-aware' only (it steers "
                            f"attention-aware placement: scores, promotion, disk staging by mass); "
                            f"strategy={self.strategy!r} runs under the 'kv-stream' policy, where it changes nothing")
        pool = check_pool_bytes(self.pool_bytes, auto=True)
        object.__setattr__(self, "pool_bytes", pool)
        if self.mode != "sparse":
            if pool not in (AUTO, None):
                raise ValueError("pool_bytes applies to mode='sparse' only")
        else:
            base = self.pipeline if self.pipeline is not None else PipelineConfig.for_strategy(self.strategy)
            if pool == AUTO:  # the default gives way to the pipeline's own bound
                object.__setattr__(self, "pool_bytes", base.pool_bytes)
            elif base.pool_bytes not in (AUTO, pool):
                raise ValueError(f"pool_bytes={self.pool_bytes!r} contradicts pipeline's pool_bytes={base.pool_bytes!r}")
            elif base.pool_bytes != pool:
                object.__setattr__(self, "pipeline", dataclasses.replace(base, pool_bytes=pool))
        if not isinstance(self.prefetch, bool):
            raise TypeError("prefetch must be a bool")
        if not isinstance(self.direct_io, bool):
            raise TypeError("direct_io must be a bool")


def _plain_numbers(settings: TieredKVSettings) -> None:
    """Numeric options given as other number types (numpy scalars, e.g. from a computed budget) as the
    Python ``int`` / ``float`` the checks and ``stats()`` expect: integer types for ``block_size``,
    ``sink``, ``recent``, ``page_size`` and a token ``budget``, real types for a fractional ``budget`` and
    ``decay``.  ``bool`` and non-numbers are left for the checks to refuse."""
    for name in ("block_size", "sink", "recent", "page_size", "budget", "decay"):
        value = getattr(settings, name)
        kind = type(value)
        if value is None or kind is int or kind is float or isinstance(value, bool):
            continue
        if isinstance(value, numbers.Integral) and name != "decay":
            object.__setattr__(settings, name, operator.index(value))
        elif isinstance(value, numbers.Real) and name in ("budget", "decay"):
            object.__setattr__(settings, name, float(value))


def _token_count(value: Any, what: str) -> int:
    """``value`` as an ``int`` for an argument counting tokens or rows: an integer (numpy integers and 1-element
    tensors holding an integral value included: transformers 5.17's assisted decoding crops by a 0-d
    tensor); ``TypeError`` for ``bool``, a fractional number, a string, ``None`` or anything else."""
    if type(value) is int:
        return value
    if isinstance(value, torch.Tensor):
        if value.numel() == 1 and value.dtype != torch.bool and not value.is_complex():
            number = value.item()
            if number == int(number):
                return int(number)
    elif not isinstance(value, bool) and hasattr(value, "__index__"):
        return operator.index(value)
    raise TypeError(f"{what} must be an int, got {type(value).__name__} {value!r}")


def _row_index(index: Any, batch: int, what: str) -> torch.Tensor:
    """``index`` (a tensor or a sequence of ints) as a 1-D long tensor of rows in ``[0, batch)``: ``TypeError``
    for a floating, complex or boolean index (a float would be truncated to a row, a mask read as rows),
    ``IndexError`` for another shape or a row out of range."""
    index = torch.as_tensor(index)
    if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
        raise TypeError(f"{what} must hold integer row indices, got dtype {index.dtype}")
    if index.dim() != 1:
        raise IndexError(f"{what} must be 1-D, got shape {tuple(index.shape)}")
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= batch):
        raise IndexError(f"{what} {index.tolist()} out of range for batch size {batch}")
    return index


class TieredKVLayer(CacheLayerMixin):
    """One attention layer's K/V, cut into blocks stored in a :class:`BlockStore`.

    Full blocks live in the tiercache; the partially filled tail (``< block_size`` tokens) is kept
    beside the model in a one-block buffer per K and V on the model's device, written in place.
    With ``joint_entries`` (what :class:`TieredKVCache` builds, in both modes) a block whose K and V have the
    same shape is stored as one entry ``(2, batch, kv_heads, block_size, head_dim)`` under kind ``"kv"`` and
    read straight into a joint K/V decode buffer (exact) or a joint pool slot (sparse), so a step reads one
    entry per block instead of two (the disk tier's cost is mostly per entry: at 4K tokens, SmolLM2, batch 1,
    half the I/O CPU per step); otherwise K and V are two entries, kinds ``"k"`` and ``"v"``.
    ``update`` returns the keys/values attention must see (all tokens for full attention, the last
    ``sliding_window - 1`` cached tokens plus the new ones for sliding-window layers), bit-identical
    to what ``DynamicLayer`` / ``DynamicSlidingWindowLayer`` return.

    **Validity of returned tensors.**  ``update`` assembles its result in one of the two slots of the
    :class:`DecodeBuffer` shared by the layers of its cache (each block written once, straight from the
    tiers, into its slice; with layer-ahead reads, by the reader thread before the update), so the
    returned tensors are overwritten once the next ``update`` of any layer of the same cache starts
    (it reads the following layer ahead into the slot they occupy).  Attention consumes them before
    that; copy them to keep them longer.

    ``keys`` / ``values`` are properties that materialise the cached states into fresh tensors
    (reading every visible block); meant for inspection and tests, not for the decode loop.
    """

    is_compileable = False
    is_croppable = True

    def __init__(
        self,
        store: BlockStore,
        cache_uid: str,
        layer_idx: int,
        block_size: int,
        sliding_window: int | None = None,
        buffer: DecodeBuffer | None = None,
        joint_entries: bool = False,
    ) -> None:
        # CacheLayerMixin.__init__ assigns self.keys/self.values, which are read-only properties here.
        self.is_initialized = False
        self.store = store
        self.cache_uid = cache_uid
        self.layer_idx = layer_idx
        self.block_size = block_size
        if sliding_window is not None and (not isinstance(sliding_window, int) or sliding_window <= 1):
            raise ValueError(f"sliding_window must be an int > 1 or None, got {sliding_window!r}")
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        # While True (generate's assisted/prompt-lookup decoding), sliding layers keep blocks that left
        # the window until the next crop, so a rejected guess can be rolled back (DynamicSlidingWindowLayer's
        # protocol; generate may also reset the flag directly).
        self.record_past = False
        self.buffer = buffer if buffer is not None else DecodeBuffer()
        self._blocks: list[BlockRef] = []
        # Tiercache keys of self._blocks' K and V entries, kept beside them so a decode step builds its
        # key list by slicing, without per-block work.
        self._kkeys: list[tuple] = []
        self._vkeys: list[tuple] = []
        self._mapped = False  # some block carries a row map (beam search / batch repetition)
        # joint_entries: store K and V of a block as one entry (when their shapes agree; decided at the first
        # update, self._joint): half the entries per step, and the disk tier's cost is mostly per entry.
        # Then self._kkeys and self._vkeys both hold the joint keys.
        self.joint_entries = joint_entries
        self._joint = False
        # Sparse layers' joint entries are *part-major* ``(batch, kv_heads, 2, block_size, head_dim)``: each
        # (row, KV head) part (its K then its V) is one contiguous byte range, so a sparse read can take only the
        # selected parts (docs/sparse.md "Part reads").  Exact layers keep ``(2, batch, ...)`` (their decode
        # buffer reads K and V halves in place).  Decided with ``_joint`` at the first update.
        self._part_major = False
        # Bumped whenever stored blocks are dropped or their row maps change (appends leave it): a read
        # ahead of an older epoch is discarded.
        self._epoch = 0
        self._first_pos = 0  # token position where self._blocks[0] starts (sliding layers drop old blocks)
        self._length = 0  # tokens seen (positions), including tokens of dropped blocks
        self._next_serial = 0
        self._tail_k: torch.Tensor | None = None  # (batch, kv_heads, block_size, head_dim); first _tail_len valid
        self._tail_v: torch.Tensor | None = None
        self._tail_len = 0
        self.dtype: torch.dtype | None = None
        self.device: torch.device | None = None
        self._batch = 0
        self._shape_k: tuple[int, int] = (0, 0)  # (kv_heads, head_dim)
        self._shape_v: tuple[int, int] = (0, 0)
        self.sparse: SparseLayerState | None = None  # set by a sparse TieredKVCache on full-attention layers

    def __repr__(self) -> str:
        return (
            f"TieredKVLayer(layer={self.layer_idx}, tokens={self._length}, blocks={len(self._blocks)}, "
            f"tail={self._tail_len})"
        )

    def __reduce_ex__(self, protocol: int) -> Any:
        raise TypeError(
            "a TieredKVLayer cannot be pickled or copied on its own: its blocks live in its cache's tiercache; "
            "use copy.deepcopy on the TieredKVCache"
        )

    # --------------------------------------------------------------------------------- helpers
    @property
    def tail_length(self) -> int:
        """Tokens held in the in-memory tail (not yet a full stored block)."""
        return self._tail_len

    @property
    def tail_bytes(self) -> int:
        """Bytes of this layer's one-block tail buffers (K and V), held beside the tiers (the shared
        :class:`DecodeBuffer` is counted by the cache)."""
        if self._tail_k is None:
            return 0
        return self._tail_k.nbytes + self._tail_v.nbytes

    def _tail_start(self) -> int:
        return self._first_pos + len(self._blocks) * self.block_size

    def _visible_start(self, length: int) -> int:
        """First position attention sees besides new tokens, for a layer holding ``length`` tokens."""
        if self.sliding_window is None:
            return 0
        return max(0, length - (self.sliding_window - 1))

    def _fetch(self, blocks: list[BlockRef]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Fresh tensors of ``blocks`` as attention sees them (row maps applied); for the rare paths
        (crop, batch compaction, copies), not for decode."""
        tensors = self.store.get_blocks(self._keys_of(blocks), device=self.device)
        if self._part_major:
            return ([b.view(t[:, :, 0]) for b, t in zip(blocks, tensors)],
                    [b.view(t[:, :, 1]) for b, t in zip(blocks, tensors)])
        if self._joint:
            return [b.view(t[0]) for b, t in zip(blocks, tensors)], [b.view(t[1]) for b, t in zip(blocks, tensors)]
        n = len(blocks)
        ks = [b.view(t) for b, t in zip(blocks, tensors[:n])]
        vs = [b.view(t) for b, t in zip(blocks, tensors[n:])]
        return ks, vs

    def _keys_of(self, blocks: list[BlockRef]) -> list[tuple]:
        """The tiercache keys of ``blocks``' entries: one joint entry each, else the K entries then the V."""
        uid, layer = self.cache_uid, self.layer_idx
        if self._joint:
            return [block_key(uid, layer, "kv", b.serial) for b in blocks]
        return ([block_key(uid, layer, "k", b.serial) for b in blocks]
                + [block_key(uid, layer, "v", b.serial) for b in blocks])

    @property
    def _entries_per_block(self) -> int:
        return 1 if self._joint else 2

    def _entries_from(self, a: int) -> list[tuple]:
        """The entry keys of stored blocks ``a..`` (joint keys, or K keys then V keys)."""
        return self._kkeys[a:] if self._joint else self._kkeys[a:] + self._vkeys[a:]

    def _visible_blocks(self) -> tuple[int, int, int]:
        """``(first, n, skip)``: the first visible stored block, how many there are, and the tokens
        before the window in the first block (or the tail)."""
        bs = self.block_size
        start = self._visible_start(self._length)
        first = min(len(self._blocks), max(0, (start - self._first_pos) // bs))
        return first, len(self._blocks) - first, start - (self._first_pos + first * bs)

    def _assemble(
        self, key_states: torch.Tensor | None, value_states: torch.Tensor | None, *, fresh: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached states attention sees (visible blocks + tail) followed by the new states: views of
        the shared buffer (``fresh``: of newly allocated tensors).  The ``j``-th visible block is written
        once, by the tiercache, into tokens ``[j * block_size, (j + 1) * block_size)`` (by the reader
        thread when this layer was read ahead: the blocks it delivered are used, the others read here);
        the tail and the new states are copied behind them; the view starts where the window starts."""
        bs = self.block_size
        first, n, skip = self._visible_blocks()
        tail = self._tail_len
        q = 0 if key_states is None else key_states.shape[-2]
        end = n * bs + tail + q
        shape_k = (self._batch, *self._shape_k)
        shape_v = (self._batch, *self._shape_v)
        done = 0
        if fresh and self._joint and not self._part_major:
            both = torch.empty((2, shape_k[0], shape_k[1], n * bs + tail, shape_k[2]), dtype=self.dtype,
                               device=self.device)
            buf = StatesBuffer(both[0], both[1], bs, both)
        elif fresh:
            buf = StatesBuffer(
                torch.empty((shape_k[0], shape_k[1], n * bs + tail, shape_k[2]), dtype=self.dtype, device=self.device),
                torch.empty((shape_v[0], shape_v[1], n * bs + tail, shape_v[2]), dtype=self.dtype, device=self.device),
                bs,
            )
        else:
            buffer = self.buffer
            slot = buffer.slot_for(self)
            read, error = buffer.take(self)
            buf = buffer.get(end, shape_k, shape_v, self.dtype, self.device, bs, slot,
                             joint=self._joint and not self._part_major)
            buffer.slot = slot
            if read is not None and error is None:
                done = self._use_read_ahead(read, first, n, buf)
        if n > done:
            self._read_blocks(first, done, n, buf, count=not fresh)
        out_k, out_v = buf.keys, buf.values
        pos = n * bs
        if tail:
            _copy_on_caller(out_k[:, :, pos : pos + tail], self._tail_k[:, :, :tail])
            _copy_on_caller(out_v[:, :, pos : pos + tail], self._tail_v[:, :, :tail])
        if q:
            out_k[:, :, pos + tail : end].copy_(key_states)
            out_v[:, :, pos + tail : end].copy_(value_states)
        return out_k[:, :, skip:end], out_v[:, :, skip:end]

    def _use_read_ahead(self, read: ReadAhead, first: int, n: int, buf: StatesBuffer) -> int:
        """How many leading visible blocks ``read`` (finished, successful) delivered into ``buf``: its
        blocks if it read this layer's current blocks (same epoch, window and keys), else 0 (discarded)."""
        counters = self.buffer.counters
        m = read.n
        if (read.epoch != self._epoch or read.first != first or m > n
                or self._kkeys[first : first + m] != read.kkeys or self._vkeys[first : first + m] != read.vkeys):
            counters.discarded += 1
            return 0
        if read.buf is not buf:  # the slot grew since (more new tokens than the read planned for)
            span = m * self.block_size
            buf.keys[:, :, :span].copy_(read.buf.keys[:, :, :span])
            buf.values[:, :, :span].copy_(read.buf.values[:, :, :span])
        self._gather_mapped(read.posts, buf)
        counters.used += 1
        counters.blocks_ahead += m * self._entries_per_block
        counters.bytes_taken += sum([b.nbytes for b in self._blocks[first : first + m]])
        return m

    def _read_blocks(self, first: int, lo: int, n: int, buf: StatesBuffer, count: bool = True) -> None:
        """Read visible blocks ``lo..n-1`` (stored blocks ``first + lo..``) into their slices of ``buf``
        (``count``: in the decode buffer's ``blocks_sync`` / ``sync_seconds``)."""
        start, cpu = time.perf_counter(), time.thread_time()
        a = first + lo
        if self._mapped or self._part_major:  # part-major entries: through temporaries (prefill chunks only)
            targets_k, targets_v, posts = self._targets(first, lo, n, buf)
            self.store.get_blocks(self._entries_from(a), out=targets_k + targets_v)
            self._gather_mapped(posts, buf)
        elif self.store.out_lists is False:
            self._fill_from_packed(first, lo, buf)
        else:
            out = buf.joint_blocks[lo:n] if self._joint else buf.key_blocks[lo:n] + buf.value_blocks[lo:n]
            self.store.get_blocks(self._entries_from(a), out=out)
        if count:
            counters = self.buffer.counters
            counters.sync_seconds += time.perf_counter() - start
            counters.sync_cpu_seconds += time.thread_time() - cpu
            counters.blocks_sync += (n - lo) * self._entries_per_block
            counters.bytes_sync += sum([b.nbytes for b in self._blocks[a : first + n]])

    def _fill_from_packed(self, first: int, lo: int, buf: StatesBuffer) -> None:
        """Blocks ``first + lo..`` into ``buf`` (from block slice ``lo``) through a tiercache that only packs
        (before contract C5): ``get_many`` packs values in key order at 256-byte multiples, so equal
        blocks whose size is a multiple of 256 bytes form one dense ``(k, batch, heads, block, head_dim)``
        array per K and V, copied into place with one strided copy each; other sizes are copied block by
        block."""
        bs = self.block_size
        n = len(self._blocks) - first
        k = n - lo
        tensors = self.store.get_blocks(self._entries_from(first + lo), device=self.device)
        if self._joint:  # each a (2, batch, heads, block, head_dim) view of the packed buffer
            torch._foreach_copy_(buf.joint_blocks[lo:n], tensors)
            return
        for half, whole, blocks in ((tensors[:k], buf.keys, buf.key_blocks), (tensors[k:], buf.values, buf.value_blocks)):
            head = half[0]
            if half[-1].data_ptr() - head.data_ptr() == (k - 1) * head.nbytes:
                packed = head.as_strided((k, *head.shape), (head.numel(), *head.stride()))
                whole[:, :, lo * bs : n * bs].unflatten(2, (k, bs)).copy_(packed.permute(1, 2, 0, 3, 4))
            else:
                torch._foreach_copy_(blocks[lo:n], half)

    def _targets(self, first: int, lo: int, n: int, buf: StatesBuffer) -> tuple[list, list, list]:
        """Where visible blocks ``lo..n-1`` are read to when some carry row maps (beam search, batch
        repetition): plain blocks straight into their slices of ``buf``, row-mapped ones into a temporary
        block of their stored rows, gathered into place by :meth:`_gather_mapped` (``posts``)."""
        targets_k, targets_v, posts = [], [], []
        blocks = self._blocks
        if self._part_major:  # one temporary (batch, heads, 2, block, head_dim) per entry, gathered into place
            for j in range(lo, n):
                block = blocks[first + j]
                shape = buf.key_blocks[j].shape
                tmp = buf.keys.new_empty((block.stored_batch, shape[1], 2, *shape[2:]))
                targets_k.append(tmp)
                posts.append((j, block, tmp[:, :, 0], tmp[:, :, 1]))
            return targets_k, targets_v, posts
        if self._joint:  # one target per joint entry (targets_v stays empty)
            for j in range(lo, n):
                block = blocks[first + j]
                if block.rows is None:
                    targets_k.append(buf.joint_blocks[j])
                    continue
                tmp = buf.keys.new_empty((2, block.stored_batch, *buf.key_blocks[j].shape[1:]))
                targets_k.append(tmp)
                posts.append((j, block, tmp[0], tmp[1]))
            return targets_k, targets_v, posts
        for j in range(lo, n):
            block = blocks[first + j]
            if block.rows is None:
                targets_k.append(buf.key_blocks[j])
                targets_v.append(buf.value_blocks[j])
                continue
            tmp_k = buf.keys.new_empty((block.stored_batch, *buf.key_blocks[j].shape[1:]))
            tmp_v = buf.values.new_empty((block.stored_batch, *buf.value_blocks[j].shape[1:]))
            targets_k.append(tmp_k)
            targets_v.append(tmp_v)
            posts.append((j, block, tmp_k, tmp_v))
        return targets_k, targets_v, posts

    @staticmethod
    def _gather_mapped(posts: list, buf: StatesBuffer) -> None:
        for j, block, tmp_k, tmp_v in posts:
            buf.key_blocks[j].copy_(block.view(tmp_k))
            buf.value_blocks[j].copy_(block.view(tmp_v))

    def _new_serial(self) -> int:
        serial = self._next_serial
        self._next_serial += 1
        return serial

    def _store_blocks(self, kblocks: list[torch.Tensor], vblocks: list[torch.Tensor]) -> tuple[list, list, list]:
        """Put full blocks under fresh serials; returns their refs and K and V keys (not yet attached)."""
        refs, kkeys, vkeys, items = [], [], [], []
        for kb, vb in zip(kblocks, vblocks):
            ref = BlockRef(
                serial=self._new_serial(),
                stored_batch=kb.shape[0],
                nbytes=kb.numel() * kb.element_size() + vb.numel() * vb.element_size(),
            )
            if self._joint:
                key = block_key(self.cache_uid, self.layer_idx, "kv", ref.serial)
                # (2, batch, heads, block, head_dim), or part-major (batch, heads, 2, block, head_dim)
                items.append((key, torch.stack((kb, vb), dim=2 if self._part_major else 0)))
                refs.append(ref)
                kkeys.append(key)
                continue
            kkey = block_key(self.cache_uid, self.layer_idx, "k", ref.serial)
            vkey = block_key(self.cache_uid, self.layer_idx, "v", ref.serial)
            items.append((kkey, kb))
            items.append((vkey, vb))
            refs.append(ref)
            kkeys.append(kkey)
            vkeys.append(vkey)
        self.store.put_blocks(items)
        return refs, kkeys, (list(kkeys) if self._joint else vkeys)

    def _append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Write new states behind the tail (in place); every block they complete goes to the tiers."""
        bs, t, q = self.block_size, self._tail_len, key_states.shape[-2]
        if t + q < bs:
            self._tail_k[:, :, t : t + q].copy_(key_states)
            self._tail_v[:, :, t : t + q].copy_(value_states)
            self._tail_len = t + q
            return
        kblocks, vblocks = [], []
        pos = 0
        if t:
            pos = bs - t
            self._tail_k[:, :, t:].copy_(key_states[:, :, :pos])
            self._tail_v[:, :, t:].copy_(value_states[:, :, :pos])
            kblocks.append(self._tail_k)
            vblocks.append(self._tail_v)
        n_full = (q - pos) // bs
        for i in range(n_full):
            kblocks.append(key_states[:, :, pos + i * bs : pos + (i + 1) * bs])
            vblocks.append(value_states[:, :, pos + i * bs : pos + (i + 1) * bs])
        pos += n_full * bs
        refs, kkeys, vkeys = self._store_blocks(kblocks, vblocks)  # the tiers copy; the tail buffer is free again
        self._blocks.extend(refs)
        self._kkeys.extend(kkeys)
        self._vkeys.extend(vkeys)
        rest = q - pos
        if rest:
            self._tail_k[:, :, :rest].copy_(key_states[:, :, pos:])
            self._tail_v[:, :, :rest].copy_(value_states[:, :, pos:])
        self._tail_len = rest

    def _delete(self, blocks: list[BlockRef]) -> None:
        if blocks:
            self.store.delete_blocks(self._keys_of(blocks))

    def _changing(self) -> None:
        """Stored blocks are about to be dropped or re-mapped: a read ahead of this layer is stale."""
        self._epoch += 1
        self.buffer.forget(self)

    def _keep_blocks(self, start: int, stop: int) -> None:
        """Keep ``self._blocks[start:stop]`` (and their keys); delete the others from the tiers."""
        self._changing()
        dropped = self._blocks[:start] + self._blocks[stop:]
        self._blocks = self._blocks[start:stop]
        self._kkeys = self._kkeys[start:stop]
        self._vkeys = self._vkeys[start:stop]
        self._first_pos += start * self.block_size
        self._mapped = any(b.rows is not None for b in self._blocks)
        self._delete(dropped)

    def _drop_expired(self) -> None:
        """Sliding-window layers: delete blocks no future step can see."""
        if self.sliding_window is None:
            return
        start = self._visible_start(self._length)
        n_expired = max(0, (start - self._first_pos) // self.block_size)
        if n_expired:
            self._keep_blocks(n_expired, len(self._blocks))

    # ----------------------------------------------------------------------------- the contract
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if key_states.dim() != 4 or value_states.dim() != 4:
            raise ValueError(
                "TieredKVCache expects key/value states of shape (batch, kv_heads, seq, head_dim), got "
                f"{tuple(key_states.shape)} and {tuple(value_states.shape)}"
            )
        if key_states.shape[0] != value_states.shape[0] or key_states.shape[2] != value_states.shape[2]:
            raise ValueError(
                f"key and value states disagree on batch or sequence: {tuple(key_states.shape)} vs "
                f"{tuple(value_states.shape)}"
            )
        if key_states.dtype != value_states.dtype or key_states.device != value_states.device:
            raise ValueError(
                f"key and value states disagree on dtype or device: {key_states.dtype} on {key_states.device} vs "
                f"{value_states.dtype} on {value_states.device}"
            )
        if key_states.is_meta:
            raise TypeError("meta tensors have no data to cache: run the model on a real device")
        self.dtype, self.device = key_states.dtype, key_states.device
        self._batch = key_states.shape[0]
        self._shape_k = (key_states.shape[1], key_states.shape[3])
        self._shape_v = (value_states.shape[1], value_states.shape[3])
        self._tail_k = key_states.new_empty((self._batch, self._shape_k[0], self.block_size, self._shape_k[1]))
        self._tail_v = value_states.new_empty((self._batch, self._shape_v[0], self.block_size, self._shape_v[1]))
        self._tail_len = 0
        self._joint = self.joint_entries and self._shape_k == self._shape_v
        self._part_major = self._joint and self.sparse is not None
        self.is_initialized = True

    def _check_states(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        try:
            seq = key_states.shape[2]
        except IndexError:  # fewer than 3 dimensions: the shapes below differ
            seq = -1
        expected_k = (self._batch, self._shape_k[0], seq, self._shape_k[1])
        expected_v = (self._batch, self._shape_v[0], seq, self._shape_v[1])
        if key_states.shape != expected_k or value_states.shape != expected_v:
            raise ValueError(
                f"layer {self.layer_idx}: states of shape {tuple(key_states.shape)}/{tuple(value_states.shape)} do "
                f"not match the cache ({expected_k}/{expected_v}); batch size, heads and head_dim must not change "
                "between updates (use batch_select_indices / batch_repeat_interleave to change the batch)"
            )
        if key_states.dtype != self.dtype or value_states.dtype != self.dtype:
            raise ValueError(f"layer {self.layer_idx}: the cache holds {self.dtype} states, got keys of "
                             f"{key_states.dtype} and values of {value_states.dtype}")

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append new (post-RoPE) states and return what attention must see.

        Full attention: every cached token followed by the new ones.  Sliding window ``W``: the last
        ``W - 1`` cached tokens followed by all new ones (the mask restricts further), as
        ``DynamicSlidingWindowLayer`` does.  New full blocks are written to the tiercache.  The
        returned tensors are valid until the next ``update`` of any layer of this cache (see the
        class docstring).
        """
        if self.sparse is not None:
            return self.sparse.update(self, key_states, value_states)
        return self._update_exact(key_states, value_states)

    def _update_exact(
        self, key_states: torch.Tensor, value_states: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._check_states(key_states, value_states)
        out = self._assemble(key_states, value_states)
        self._append(key_states, value_states)
        self._length += key_states.shape[-2]
        if not self.record_past:
            self._drop_expired()
        return out

    def activate_past_recording(self, **kwargs: Any) -> None:
        """Keep the blocks that leave a sliding window until the next :meth:`crop`, so ``crop`` can
        roll back rejected candidate tokens (assisted and prompt-lookup decoding call this).  Keyword
        arguments of newer transformers releases (``recurrent_states_to_keep``, for recurrent layers) do
        not apply to attention layers and are ignored."""
        self.record_past = True

    def get_seq_length(self) -> int:
        """Tokens processed so far (for sliding layers: including tokens that left the window)."""
        return self._length

    def get_mask_sizes(self, query_length: int | torch.Tensor) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` of the states ``update`` will return for ``query_length`` new tokens."""
        if isinstance(query_length, torch.Tensor):  # older 5.x releases passed cache_position
            query_length = int(query_length.shape[0])
        if self.sliding_window is None:
            return self._length + query_length, 0
        kv_offset = max(self._length - self.sliding_window + 1, 0)
        if self._length >= self.sliding_window:
            return self.sliding_window - 1 + query_length, kv_offset
        return self._length + query_length, kv_offset

    def get_max_length(self) -> int:
        return -1 if self.sliding_window is None else self.sliding_window

    @property
    def keys(self) -> torch.Tensor | None:
        """Cached keys attention would see next (a fresh tensor read from the tiers), or ``None``
        before the first update."""
        return self._assemble(None, None, fresh=True)[0].contiguous() if self.is_initialized else None

    @property
    def values(self) -> torch.Tensor | None:
        """Cached values attention would see next (a fresh tensor read from the tiers), or ``None``."""
        return self._assemble(None, None, fresh=True)[1].contiguous() if self.is_initialized else None

    def offload(self) -> None:
        """No-op: blocks already live in the tiercache; the tail is one block."""

    def prefetch(self, slot: int | None = None, max_bytes: int | None = None) -> bool:
        """Start the layer-ahead read of this layer: its visible stored blocks are read in the background
        into slot ``slot`` of the decode buffer (default: a free slot other than the one holding the states
        returned last, else the next one), where its next ``update`` takes them (see
        :mod:`tiercache_llm.decode_buffer`).  A read ahead of
        this layer or into that slot still pending is discarded first.  Returns whether a read started
        (not for an empty or sparse layer, nor through a tiercache without list ``out``, nor when the
        blocks' bytes exceed ``max_bytes``: then nothing is discarded either)."""
        buffer = self.buffer
        if slot is None:
            slot = buffer.free_slot(buffer.slot)
            slot = buffer.other_slot(buffer.slot) if slot is None else slot
        if not self.is_initialized or self.sparse is not None or self.store.out_lists is False or self.store.closed:
            return False
        first, n, _ = self._visible_blocks()
        if n <= 0:
            return False
        nbytes = sum([b.nbytes for b in self._blocks[first:]])
        if max_bytes is not None and nbytes > max_bytes:
            return False
        buffer.clear_for(self, slot)
        bs = self.block_size
        buf = buffer.get(n * bs + self._tail_len + 1, (self._batch, *self._shape_k), (self._batch, *self._shape_v),
                         self.dtype, self.device, bs, slot, joint=self._joint)
        kkeys, vkeys = self._kkeys[first:], self._vkeys[first:]
        if self._mapped:
            targets_k, targets_v, posts = self._targets(first, 0, n, buf)
        elif self._joint:
            targets_k, targets_v, posts = buf.joint_blocks[:n], [], []
        else:
            targets_k, targets_v, posts = buf.key_blocks[:n], buf.value_blocks[:n], []
        keys, store = self._entries_from(first), self.store
        memory = buffer.readers > 1 and not store.memory_only and store.in_memory(keys)
        buffer.start(ReadAhead(self, self._epoch, first, n, slot, buf, kkeys, vkeys, posts, nbytes,
                               keys=keys, targets=targets_k + targets_v, fetch=store.get_blocks, memory=memory))
        return True

    def held_in_memory(self) -> bool:
        """Whether every visible stored block is held where a read is a memory copy (no disk read), as
        of now (an empty layer is)."""
        if not self.is_initialized:
            return True
        first, n, _ = self._visible_blocks()
        return n <= 0 or self.store.in_memory(self._entries_from(first))

    def reset(self) -> None:
        """Delete every stored block and forget the states (the layer re-initialises on next update)."""
        self._changing()
        self._delete(self._blocks)
        self._blocks, self._kkeys, self._vkeys = [], [], []
        self._mapped = False
        self._first_pos = 0
        self._length = 0
        self._tail_k = self._tail_v = None
        self._tail_len = 0
        self.is_initialized = False
        if self.sparse is not None:
            self.sparse.reset()

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` tokens (transformers >= 5.17 passes a negative count;
        a positive value raises like ``DynamicLayer``).  Blocks past the new end are deleted; the block
        holding the new end is fetched back and becomes the in-memory tail.

        Sliding-window layers, as ``DynamicSlidingWindowLayer``: once the window is full, cropping needs
        past recording (:meth:`activate_past_recording`), and every crop (``crop(0)`` included) then
        deletes the blocks that left the window of the new length.  ``tokens_to_remove`` may be a 0-d
        tensor (transformers 5.17's assisted decoding passes one)."""
        tokens_to_remove = _token_count(tokens_to_remove, "crop's tokens_to_remove")
        refused = self._crop_refusal(tokens_to_remove)
        if refused is not None:
            raise refused
        if not self.is_initialized:
            return
        if tokens_to_remove:
            new_length = max(0, self._length - abs(tokens_to_remove))
            self._truncate(new_length)
            if self.sparse is not None:
                self.sparse.crop(self, new_length)
        self._drop_expired()

    def _crop_refusal(self, tokens_to_remove: int) -> Exception | None:
        """The exception ``crop(tokens_to_remove)`` raises before changing anything, or ``None`` (so
        :meth:`TieredKVCache.crop` can check every layer before cropping any)."""
        positive = ValueError(
            f"Calling `crop` with a positive value (`{tokens_to_remove}`) is not supported. "
            "Please use a negative integer to remove that number of tokens from the cache instead."
        ) if tokens_to_remove > 0 else None
        if not self.is_initialized:
            return positive
        if self.sliding_window is not None and self._length >= self.sliding_window:
            if not self.record_past:
                return RuntimeError(
                    f"layer {self.layer_idx}: cannot crop a sliding-window layer ({self.sliding_window}) that already "
                    "dropped tokens outside its window; call activate_past_recording() before the tokens to roll "
                    "back are added (generate does so for assisted and prompt-lookup decoding)"
                )
            if tokens_to_remove > 0:
                return RuntimeError(
                    f"layer {self.layer_idx}: once the sliding window is full, crop only takes a negative number "
                    f"of tokens to remove, got {tokens_to_remove}"
                )
        elif positive is not None:
            return positive
        if tokens_to_remove:
            new_length = max(0, self._length - abs(tokens_to_remove))
            if self._visible_start(new_length) < self._first_pos:
                return RuntimeError(
                    f"layer {self.layer_idx}: cannot roll back {abs(tokens_to_remove)} tokens: tokens the window "
                    "would see again were dropped before past recording was activated"
                )
        return None

    def _truncate(self, new_length: int) -> None:
        tail_start = self._tail_start()
        if new_length >= tail_start:
            self._tail_len = new_length - tail_start
        else:
            n_keep = (new_length - self._first_pos) // self.block_size
            keep = new_length - (self._first_pos + n_keep * self.block_size)
            if keep > 0:
                ks, vs = self._fetch(self._blocks[n_keep : n_keep + 1])  # fresh tensors: not the shared buffer
                self._tail_k[:, :, :keep].copy_(ks[0][:, :, :keep])
                self._tail_v[:, :, :keep].copy_(vs[0][:, :, :keep])
            self._tail_len = keep
            self._keep_blocks(0, n_keep)
        self._length = new_length

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: ``new_row[i] = old_row[beam_idx[i]]``.  Stored blocks are not rewritten; each
        block's row map is composed with ``beam_idx`` (exact, O(batch) per block)."""
        self._gather_rows(beam_idx, compact=False)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every batch row ``repeats`` times (row maps only; stored blocks are shared)."""
        if type(repeats) is not int and not isinstance(repeats, bool) and isinstance(repeats, numbers.Integral):
            repeats = operator.index(repeats)
        if type(repeats) is not int or repeats <= 0:
            raise ValueError(f"repeats must be a positive int, got {repeats!r}")
        if not self.is_initialized:
            return
        index = torch.arange(self._batch, device=self.device).repeat_interleave(repeats)
        self._gather_rows(index, compact=False)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the batch rows ``indices`` (long indices or a boolean mask).  Blocks are
        rewritten so the dropped rows stop occupying the tiers."""
        if not self.is_initialized:
            return
        indices = torch.as_tensor(indices, device=self.device)
        if indices.dtype == torch.bool:
            if indices.shape != (self._batch,):
                raise IndexError(f"batch_select_indices: a boolean mask must have one entry per row "
                                 f"({self._batch}), got shape {tuple(indices.shape)}")
            indices = torch.arange(self._batch, device=self.device)[indices]
        self._gather_rows(indices, compact=True)

    def _gather_rows(self, index: torch.Tensor, compact: bool) -> None:
        if not self.is_initialized:
            return
        index = _row_index(index, self._batch, "batch indices").to(device=self.device, dtype=torch.long)
        self._changing()
        self._tail_k = self._tail_k.index_select(0, index)
        self._tail_v = self._tail_v.index_select(0, index)
        for block in self._blocks:
            block.compose(index)
        self._batch = index.numel()
        if self.sparse is not None:
            self.sparse.select_rows(index)
        if compact:
            stale = [i for i, b in enumerate(self._blocks) if b.rows is not None and b.rows.numel() < b.stored_batch]
            if stale:
                self._compact(stale)
        self._mapped = any(b.rows is not None for b in self._blocks)

    def _compact(self, stale: list[int]) -> None:
        """Rewrite the blocks ``stale`` (indices into ``self._blocks``, each mapped to fewer rows than it stores)
        with only their mapped rows, under fresh serials; the old entries are deleted only once the new ones are
        stored.  If reading or storing fails (no room in the tiers, an I/O error), the layer keeps the old
        blocks with their row maps -- which are exact, as after ``reorder_cache`` -- and a ``RuntimeWarning``
        says that the dropped rows still occupy the tiers: nothing is lost and every layer stays consistent
        (raising here would leave the layers after this one with the old batch)."""
        old = [self._blocks[i] for i in stale]
        try:
            ks, vs = self._fetch(old)
            refs, kkeys, vkeys = self._store_blocks(ks, vs)
        except CacheClosedError:
            raise
        except Exception as exc:  # noqa: BLE001 - the row-mapped blocks are a correct fallback
            warnings.warn(f"batch_select_indices: layer {self.layer_idx} could not rewrite {len(old)} block(s) "
                          f"without the dropped rows ({type(exc).__name__}: {exc}); they are kept with row maps "
                          "(exact), so the dropped rows still occupy the tiers until the blocks are deleted",
                          RuntimeWarning, stacklevel=4)
            return
        for i, ref, kkey, vkey in zip(stale, refs, kkeys, vkeys):
            self._blocks[i], self._kkeys[i], self._vkeys[i] = ref, kkey, vkey
        self._delete(old)
        if self.sparse is not None:
            self.sparse.push_all_scores(self)

    def _copy_to(self, store: BlockStore, cache_uid: str, buffer: DecodeBuffer) -> "TieredKVLayer":
        """An independent layer with the same contents, its blocks copied into ``store`` under
        ``cache_uid`` (same serials; row maps kept, stored rows copied as stored)."""
        new = TieredKVLayer(store, cache_uid, self.layer_idx, self.block_size, self.sliding_window, buffer,
                            self.joint_entries)
        for name in ("record_past", "_first_pos", "_length", "_next_serial", "_tail_len", "dtype", "device",
                     "_batch", "_shape_k", "_shape_v", "_mapped", "is_initialized", "_joint", "_part_major"):
            setattr(new, name, getattr(self, name))
        if self._tail_k is not None:
            new._tail_k, new._tail_v = self._tail_k.clone(), self._tail_v.clone()
        chunk = 64  # blocks per batched read, to bound the memory a copy holds at once
        for lo in range(0, len(self._blocks), chunk):
            keys = self._kkeys[lo : lo + chunk]
            if not self._joint:
                keys = keys + self._vkeys[lo : lo + chunk]
            tensors = self.store.get_blocks(keys, device=self.device)
            items = []
            for key, tensor in zip(keys, tensors):
                items.append((block_key(cache_uid, self.layer_idx, key[3], key[4]), tensor))
            store.put_blocks(items)
            n = len(items) if self._joint else len(keys) // 2
            new._kkeys.extend(key for key, _ in items[:n])
            new._vkeys.extend(key for key, _ in (items[:n] if self._joint else items[n:]))
        new._blocks = [
            BlockRef(b.serial, b.stored_batch, b.nbytes, None if b.rows is None else b.rows.clone())
            for b in self._blocks
        ]
        return new


def _ending_in(states: torch.Tensor, new: torch.Tensor, q: int) -> torch.Tensor:
    """``states`` (whose last ``q`` positions hold the values of ``new``) with ``new`` itself in those
    positions, so autograd reaches ``new``."""
    n = states.shape[-2]
    if n <= q:
        return new if n == q else new[..., q - n :, :]
    return torch.cat((states[..., : n - q, :], new), dim=-2)


def _layer_windows(config: PretrainedConfig) -> list[int | None]:
    """Per decoder layer: ``None`` (full attention) or its sliding window; raises for layer kinds the
    tiered cache cannot reproduce exactly."""
    layer_types = getattr(config, "layer_types", None)
    n_layers = getattr(config, "num_hidden_layers", None)
    if not isinstance(n_layers, int) or n_layers <= 0:
        raise ValueError("the model config has no positive num_hidden_layers")
    sliding = getattr(config, "sliding_window", None)
    if layer_types is None:
        if getattr(config, "attention_chunk_size", None) is not None:
            raise UnsupportedModelError("chunked attention (attention_chunk_size) is not supported by TieredKVCache")
        return [sliding] * n_layers
    windows: list[int | None] = []
    for i, kind in enumerate(layer_types[:n_layers]):
        if kind == "full_attention":
            windows.append(None)
        elif kind == "sliding_attention" and sliding is not None:
            windows.append(sliding)
        else:
            raise UnsupportedModelError(
                f"layer {i} is of type {kind!r}; TieredKVCache supports 'full_attention' and 'sliding_attention' "
                "layers only"
            )
    if getattr(config, "kv_sharing_modes", None) is not None:
        raise UnsupportedModelError("models that share KV between layers are not supported by TieredKVCache")
    return windows


class TieredKVCache(Cache):
    """A ``transformers`` cache that stores K/V in fixed-size token blocks in a tiercache.

    Args:
        config: the model's config (``model.config``); its decoder text config decides the number
            of layers and which are sliding-window layers.
        gpu, host, disk, path, block_size, mode, policy, compression, prefetch, direct_io, budget, sink,
            recent, strategy, decay, page_size, digests, pipeline, pool_bytes: see :class:`TieredKVSettings`
            (defaults: exact mode,
            the mode's block size (:func:`default_block_size`: 256 tokens exact, 128 sparse), a 4 GiB host tier,
            no disk tier; sparse: ``budget=0.25, sink=4, recent=64, strategy="attention-aware", decay=0.9,
            page_size=8, digests="float16", pool_bytes="auto"``).  Sparse mode needs the model prepared:
            build it with :meth:`for_model`.
        cache: an existing, open ``tiercache.Cache`` to store blocks in instead of creating one (a closed
            one: ``tiercache.CacheClosedError``; then ``gpu``, ``host``, ``disk``, ``path``, ``policy``,
            ``compression`` and ``direct_io`` must be left out: ``ValueError``).  A borrowed cache is not closed by :meth:`close`;
            this KV cache's entries are deleted from it.
        settings: a complete :class:`TieredKVSettings` instead of the individual keywords (``ValueError``
            with any of them).

    Raises:
        TypeError: ``config`` is not a ``PretrainedConfig``; see :class:`TieredKVSettings` for the
            options' own checks.
        UnsupportedModelError: a layer kind other than full or sliding-window attention.

    Arguments of the calls ``generate`` makes are checked before anything changes: ``update`` takes 4-D
    keys and values agreeing on batch, sequence, dtype and device (``ValueError``; meta tensors
    ``TypeError``) and an integer ``layer_idx`` (``TypeError``; out of range ``IndexError``); ``crop`` an
    integer (``TypeError``); ``reorder_cache`` / ``batch_select_indices`` 1-D integer rows within the batch
    (``TypeError`` for floating or boolean rows, ``IndexError`` otherwise; a boolean mask for
    ``batch_select_indices``, one entry per row); ``batch_repeat_interleave`` a positive integer
    (``ValueError``).  After :meth:`close` every one of them, ``reset`` and ``copy.deepcopy`` raise
    ``RuntimeError``.

    Exact mode returns, for each layer and forward pass, every visible block (written by one batched
    ``get_many`` straight into its slice of a buffer shared by the layers), the in-memory tail and the
    new states, so attention, logits and greedy tokens equal ``DynamicCache``'s.  The returned tensors
    are valid until the next ``update`` of this cache (see :class:`TieredKVLayer`).  By default each
    ``update`` first starts reading the next layer's blocks in the background (``prefetch``, see
    :class:`TieredKVSettings`), so the reads overlap compute.  When the tiers
    cannot hold the context, :class:`~tiercache_llm.errors.KVCapacityError` is raised (never a
    truncated context).

    ``copy.deepcopy`` gives an independent cache with the same contents (transformers' prompt-reuse
    recipe); pickling is refused.  Use as a context manager or call :meth:`close` to release the
    tiers (a temporary disk directory is removed then).
    """

    def __init__(
        self,
        config: PretrainedConfig,
        *,
        gpu: int | str | None = _UNSET,
        host: int | str | None = _UNSET,
        disk: int | str | None = _UNSET,
        path: str | os.PathLike | None = _UNSET,
        block_size: int | None = _UNSET,
        mode: str = _UNSET,
        policy: Any = _UNSET,
        compression: str | None = _UNSET,
        prefetch: bool = _UNSET,
        direct_io: bool = _UNSET,
        budget: int | float = _UNSET,
        sink: int = _UNSET,
        recent: int = _UNSET,
        strategy: str = _UNSET,
        decay: float = _UNSET,
        page_size: int = _UNSET,
        digests: str = _UNSET,
        pipeline: Any = _UNSET,
        pool_bytes: int | str | None = _UNSET,
        cache: Any = None,
        settings: TieredKVSettings | None = None,
    ) -> None:
        if not isinstance(config, PretrainedConfig):
            raise TypeError(
                f"config must be a transformers PretrainedConfig (pass model.config), not {type(config).__name__}"
            )
        given = {
            name: value
            for name, value in dict(
                gpu=gpu, host=host, disk=disk, path=path, block_size=block_size, mode=mode, policy=policy,
                compression=compression, prefetch=prefetch, direct_io=direct_io, budget=budget, sink=sink,
                recent=recent, strategy=strategy, decay=decay, page_size=page_size, digests=digests, pipeline=pipeline,
                pool_bytes=pool_bytes,
            ).items()
            if value is not _UNSET
        }
        if settings is not None:
            if not isinstance(settings, TieredKVSettings):
                raise TypeError(f"settings must be a TieredKVSettings, not {type(settings).__name__}")
            if given:
                raise ValueError(f"pass either settings or individual options, not both (got {sorted(given)})")
        else:
            settings = TieredKVSettings(**given)
        budget_args = sorted(set(given) & {"gpu", "host", "disk", "path", "policy", "compression", "direct_io"})
        if cache is not None and budget_args:
            raise ValueError(
                f"{budget_args} configure a new tiercache; leave them out when passing an existing cache="
            )
        if cache is None and given.get("direct_io") is True and settings.disk in (None, 0):
            raise ValueError("direct_io applies to the disk tier, and this cache has none (disk is None): leave "
                             "direct_io out, or give disk=...")
        self.settings = settings
        text_config = config.get_text_config(decoder=True)
        windows = _layer_windows(text_config)
        if cache is not None:
            if getattr(cache, "_closed", False) or getattr(cache, "_closing", False):
                raise CacheClosedError("the tiercache.Cache passed as cache= is closed")
            self.store = BlockStore(cache, owns=False)
        else:
            self.store = BlockStore.open(
                gpu=settings.gpu, host=settings.host, disk=settings.disk, path=settings.path,
                policy=settings.policy, compression=settings.compression, direct_io=settings.direct_io,
            )
        self.cache_uid = uuid.uuid4().hex
        self.buffer = DecodeBuffer.for_store(settings.prefetch, self.store.memory_only)
        layers = [
            TieredKVLayer(self.store, self.cache_uid, i, settings.block_size, sliding_window=w, buffer=self.buffer,
                          joint_entries=True)
            for i, w in enumerate(windows)
        ]
        super().__init__(layers=layers)
        self._sparse: SparseController | None = None
        self._prepared_model: Any = None
        if settings.mode == "sparse":
            self._sparse = SparseController(
                selection_config(settings.budget, settings.sink, settings.recent, settings.digests),
                settings.strategy, settings.decay if settings.decay is not None else DEFAULT_DECAY,
            )
            for layer in layers:
                if layer.sliding_window is None:  # sliding-window layers stay exact (their window is the budget)
                    layer.sparse = SparseLayerState(self._sparse)
                    layer.sparse._block_size = settings.block_size
                    layer.sparse._page_size = settings.page_size
        self._pipeline: DecodePipeline | None = None
        # Failed-pass detection (docs/tiercache_llm.md "Safety"): the message of the InconsistentCacheError the
        # next update raises (None: consistent), the last layer updated (-1: none in this pass, as far as the
        # prepared model's hooks tell) and whether a pass announced by those hooks has not ended yet.
        self._broken: str | None = None
        self._cursor = -1
        self._in_pass = False
        # Whether a model drives this cache (transformers' mask creation announced a pass since the last reset):
        # then every layer, an uninitialised one included, must hold as many tokens as layer 0 (crop checks it).
        self._model_driven = False
        try:
            self._start_pipeline()  # refuses pool_bytes="auto" without a memory tier
        except BaseException:
            self.store.close()
            raise

    # ------------------------------------------------------------------------- decode pipeline
    def _start_pipeline(self) -> None:
        """Sparse mode: the decode pipeline of the strategy (docs/sparse.md "Decode pipeline"), shared by
        the sparse layers through ``layer.pipeline``; with deferred promotions, the store's attention-aware
        policy promotes only on the pipeline's background reads."""
        self._pipeline = None
        if self._sparse is None or not any(layer.sparse is not None for layer in self.layers):
            return
        settings = self.settings
        config = settings.pipeline if settings.pipeline is not None else PipelineConfig.for_strategy(settings.strategy)
        self._pipeline = DecodePipeline(config, self.layers, self.store)
        for layer in self.layers:
            if layer.sparse is not None:
                layer.pipeline = self._pipeline
        policy = self.store.policy
        if config.defer_promotions and hasattr(policy, "defer_promotions"):
            policy.defer_promotions = True
        if config.write_behind_bytes:
            self.store.enable_write_behind(config.write_behind_bytes)

    def _pipeline_admission(self) -> None:
        """After the controller's admission control (whose threshold is the pipeline's rule when it has one:
        ``SparseController.threshold``): the pipeline's end-of-step staging."""
        pipe, policy = self._pipeline, self.store.policy
        if pipe is None or self._sparse.strategy != "attention-aware" or not hasattr(policy, "promote_threshold"):
            return
        pipe.end_step()  # disk staging ahead, under the scores and threshold just set

    def _invalidate_pipeline(self) -> None:
        """Before blocks, rows or the batch change: drop the layer-ahead reads (exact) and the pipeline's
        reuse buffers and staging (sparse)."""
        self.buffer.discard()
        if getattr(self, "_pipeline", None) is not None:
            self._pipeline.invalidate()

    # The row and length changes below check their argument before anything changes (each layer checks it
    # again, for direct use of a layer) and refuse a closed cache (RuntimeError), as update does.
    @with_normal_tensors
    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.store._check_open()
        batch = self.batch_size
        if batch >= 0:
            _row_index(beam_idx, batch, "beam_idx")
        self._invalidate_pipeline()  # the reuse buffers hold rows in the old order
        super().reorder_cache(beam_idx)

    @with_normal_tensors
    def batch_repeat_interleave(self, repeats: int) -> None:
        self.store._check_open()
        self._invalidate_pipeline()
        super().batch_repeat_interleave(repeats)

    @with_normal_tensors
    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.store._check_open()
        self._invalidate_pipeline()
        super().batch_select_indices(indices)

    @with_normal_tensors
    def crop(self, tokens_to_remove: int) -> None:
        self.store._check_open()
        tokens_to_remove = _token_count(tokens_to_remove, "crop's tokens_to_remove")
        self._check_consistent()
        for layer in self.layers:  # a layer that would refuse refuses before any layer is cropped
            refused = layer._crop_refusal(tokens_to_remove)
            if refused is not None:
                raise refused
        self._invalidate_pipeline()
        super().crop(tokens_to_remove)

    def get_mask_sizes(self, query_length: int | torch.Tensor, layer_idx: int) -> tuple[int, int]:
        """``Cache.get_mask_sizes``; transformers' mask creation calls it with ``layer_idx=0`` once per forward
        pass before any layer runs: then every layer must hold as many tokens as layer 0 (one compare per
        layer per pass), else :class:`~tiercache_llm.errors.InconsistentCacheError` (a previous pass failed
        half-way, e.g. a failed prefill left the last layers empty)."""
        if layer_idx == 0:
            if self._broken is not None:
                raise InconsistentCacheError(self._broken)
            self._model_driven = True
            n = self.layers[0]._length
            for layer in self.layers:
                if layer._length != n:
                    raise InconsistentCacheError(self._mark_broken())
        return super().get_mask_sizes(query_length, layer_idx)

    def _check_consistent(self) -> None:
        """Raise :class:`~tiercache_llm.errors.InconsistentCacheError` after a failed pass, or when the layers'
        lengths disagree: every initialised layer must hold as many tokens as layer 0, and once a model drives
        the cache (a forward pass announced itself through :meth:`get_mask_sizes`) every layer must, an
        uninitialised one too (a prefill that failed half-way left it empty; layers updated one by one outside
        a forward pass, as tests do, may leave later layers uninitialised)."""
        if self._broken is not None:
            raise InconsistentCacheError(self._broken)
        first = self.layers[0]
        driven = self._model_driven
        if any((driven or layer.is_initialized) and layer._length != first._length for layer in self.layers):
            raise InconsistentCacheError(self._mark_broken())

    @classmethod
    def for_model(cls, model: Any, **options: Any) -> "TieredKVCache":
        """A cache built from ``model.config`` with ``options`` (see the class), the model prepared for
        its mode.

        Exact mode leaves the model as it is.  Sparse mode switches the model's attention to
        ``tiercache_sparse_<sdpa|eager>`` (registered through transformers' ``AttentionInterface``
        together with the matching ``AttentionMaskInterface`` mask function) and hooks its decoder to
        publish the running cache (see :mod:`tiercache_llm.attention_hook`).  The prepared model behaves
        exactly like before for any other cache (``DynamicCache``, exact ``TieredKVCache``, none), so
        it can serve caches of different modes in turn.  Undo with :meth:`restore_model` (or
        :func:`tiercache_llm.attention_hook.restore_model`).
        """
        if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
            raise TypeError(f"for_model takes a transformers model, not {type(model).__name__}")
        cache = cls(model.config, **options)
        if cache._sparse is not None:
            from .attention_hook import prepare_model

            try:
                prepare_model(model)
            except BaseException:
                cache.close()
                raise
            cache._prepared_model = model
        return cache

    def restore_model(self) -> None:
        """Give the model prepared by :meth:`for_model` its original attention back (no-op in exact mode
        or when already restored).  This cache cannot decode sparsely with it afterwards."""
        model, self._prepared_model = self._prepared_model, None
        if model is not None:
            from .attention_hook import restore_model

            restore_model(model)

    # ------------------------------------------------------------------------ failed passes
    def _mark_broken(self, stopped_after: int | None = None, reason: str = "") -> str:
        """Record that a forward pass failed half-way (``stopped_after``: the last layer it updated, or ``None``
        to find it from the layers' lengths) and return the message every later ``update`` raises with."""
        lengths = [layer._length for layer in self.layers]
        if stopped_after is None:
            stopped_after = next((i - 1 for i in range(1, len(lengths)) if lengths[i] != lengths[0]), len(lengths) - 1)
        failed_at = stopped_after + 1
        where = (f"at layer {failed_at}" if failed_at < len(lengths)
                 else f"at layer {stopped_after}, after its cache update")
        spread = f"{min(lengths)}..{max(lengths)}" if min(lengths) != max(lengths) else str(lengths[0])
        self._broken = (
            f"the TieredKVCache is inconsistent: a previous forward pass failed {where} after updating layers "
            f"0..{stopped_after} of {len(lengths)} (the layers hold {spread} tokens{reason}); its exception was "
            "the one raised then.  Call cache.reset() and run the prompt again (crop cannot repair this: it removes "
            "the same number of tokens from every layer)"
        )
        return self._broken

    def _begin_pass(self) -> None:
        """Called by the prepared model's forward pre-hook (any mode): a pass that began and never ended (a
        ``KeyboardInterrupt`` skips the post-hook) after updating a layer left the cache half-updated."""
        if self._in_pass and self._cursor >= 0 and self._broken is None:
            self._pass_failed()
        self._in_pass = True
        self._cursor = -1

    def _end_pass(self, failed: bool) -> None:
        """Called by the prepared model's forward post-hook (``failed``: the pass raised)."""
        self._in_pass = False
        if failed and self._cursor >= 0 and self._broken is None:
            self._pass_failed()

    def _pass_failed(self) -> None:
        """A pass raised after updating layers ``0.._cursor``: the cache is inconsistent unless every layer was
        updated and (sparse) attended, i.e. the exception came after the last layer's attention (the digest
        check reads each sparse layer once, only after a failure)."""
        last = len(self.layers) - 1
        lagging = [layer.layer_idx for layer in self.layers if layer.sparse is not None
                   and layer.sparse.digests is not None and layer.sparse.digests.length != layer._length]
        reason = f"; layers {lagging} without the digests of the new tokens" if lagging else ""
        if self._cursor < last or lagging:
            self._mark_broken(self._cursor, reason=reason)

    @with_normal_tensors
    def _end_forward(self, failed: bool = False) -> None:
        """Called by the prepared model after each forward pass with this cache (``failed``: the pass
        raised; its exception is the one that propagates)."""
        with self.store.op_lock:
            if self.store._closed:  # closed from another thread during the pass: its error propagates
                return
            self._end_forward_open(failed)

    def _end_forward_open(self, failed: bool) -> None:
        ctrl = self._sparse
        step = ctrl.last_step
        try:
            ctrl.end_forward(self.layers, self.store, check=not failed)
            self._pipeline_admission()
            if not step.layer_steps and not failed:
                # A prefill (or other exact pass) queued its blocks for write-behind: they are written before
                # decoding starts, as every strategy writes them, so decode steps never compete with them.
                self.store.flush_writes()
        finally:
            if step.layer_steps:
                step.steps = 1
                total = ctrl.total
                for name, value in step.__dict__.items():
                    if name == "bytes_fetched":
                        for tier, n in value.items():
                            total.bytes_fetched[tier] = total.bytes_fetched.get(tier, 0) + n
                    else:
                        setattr(total, name, getattr(total, name) + value)
                ctrl.clock += 1
                if needs_rescale(ctrl):
                    ctrl.rescale(self.layers)
                    ctrl.flush_scores(self.store)
                    ctrl.admit(self.layers, self.store)
                ctrl.last_step = type(step)()
                self._last_step_stats = step.as_dict()

    def __repr__(self) -> str:
        return (
            f"TieredKVCache(layers={len(self.layers)}, tokens={self.get_seq_length()}, "
            f"block_size={self.settings.block_size}, held={self.store.held_bytes} B)"
        )

    @with_normal_tensors
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new states of ``layer_idx`` and return what its attention must see.

        With layer-ahead reads (``prefetch``, exact mode), first start reading the next layer's blocks
        (the next pass's first layer after the last one) into the decode buffer slot this layer does
        not use, so the read overlaps this layer's update and attention (not for memory-only tiers
        when torch's threads fill every core, see :meth:`_ahead_overlaps`).

        Autograd: the cache's own state never records it (a plain forward outside ``no_grad`` would
        otherwise tie tails, buffers and digests into the graph).  When the new states require grad, the
        returned tensors end in those states themselves, so gradients reach this pass's keys and values;
        earlier passes' tokens come from the tiers and are constants, as stored blocks are."""
        if torch.is_grad_enabled() and (key_states.requires_grad or value_states.requires_grad):
            with torch.no_grad():
                keys, values = self.update(key_states.detach(), value_states.detach(), layer_idx, *args, **kwargs)
            q = key_states.shape[-2]
            return _ending_in(keys, key_states, q), _ending_in(values, value_states, q)
        with self.store.op_lock:  # a close() from another thread waits for this update (see close)
            return self._update_open(key_states, value_states, layer_idx, *args, **kwargs)

    def _update_open(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.store._closed:
            self.store._check_open()
        if layer_idx.__class__ is not int:  # bool would pick layer 0 or 1, a float fail as a list index
            layer_idx = _token_count(layer_idx, "layer_idx")
        n_layers = len(self.layers)
        if not 0 <= layer_idx < n_layers:
            raise IndexError(f"layer_idx {layer_idx} out of range for a cache of {n_layers} layers")
        if self._broken is not None:
            raise InconsistentCacheError(self._broken)
        layer = self.layers[layer_idx]
        if layer_idx == 0:  # a pass starts: the previous one must have reached the last layer (one compare)
            last = self.layers[-1]
            if last.is_initialized and last._length != layer._length:
                raise InconsistentCacheError(self._mark_broken())
        ahead = self.buffer.read_ahead and layer.sparse is None and self._ahead_mode(layer_idx)
        if ahead and n_layers > 1:
            self._read_ahead(layer_idx, device_only=ahead == _DEVICE_ONLY)
        keys, values = layer.update(key_states, value_states, *args, **kwargs)
        self._cursor = layer_idx
        if ahead and n_layers == 1 and (ahead is True or not layer.held_in_memory()):
            layer.prefetch()
        return keys, values

    def _read_ahead(self, layer_idx: int, device_only: bool = False) -> None:
        """Before layer ``layer_idx``'s update: start reading the next layer into a slot that update does
        not use (discarding an older read of it), then layers further ahead (wrapping to the next pass)
        that have no read pending, each into a free slot, while :meth:`DecodeBuffer.ahead_room` has room
        for its bytes and at most ``max_depth`` layers ahead (see :mod:`tiercache_llm.decode_buffer`).

        With a disk tier and concurrent readers, layers beyond the next one whose blocks are all held in
        memory are passed over (each is read one ahead, a copy on a thread of its own, when its turn
        comes) and the walk goes on to the layers that read the disk, up to a full pass ahead, bounded by
        the free slots and ``ahead_bytes`` alone: the disk keeps reading through a run of memory-held
        layers (a cache filled layer by layer holds its last layers in the host tier under the default
        ``kv-stream`` placement) instead of idling
        until the next pass's first layer is next.

        ``device_only`` (torch's threads fill every core, see :meth:`_ahead_overlaps`): only layers that read
        a device are read ahead; memory-held layers are left to their own update, like the layers beyond.

        With ``buffer.group`` > 1 (a disk tier), layers beyond the next one wait until that many slots are
        free, and the reads this call starts go out together (:meth:`DecodeBuffer.together`): one reader
        round trip and one ``get_many`` for several layers instead of one per layer; small layers more of them
        per job and further ahead (:meth:`DecodeBuffer.schedule`, ``group_bytes``)."""
        buffer = self.buffer
        with buffer.together():
            self._walk_ahead(layer_idx, device_only)

    def _walk_ahead(self, layer_idx: int, device_only: bool) -> None:
        buffer, layers = self.buffer, self.layers
        n_layers = len(layers)
        layer = layers[layer_idx]
        mine = buffer.slot_for(layer)
        nxt = layers[(layer_idx + 1) % n_layers]
        if not buffer.pending(nxt) and not (device_only and nxt.held_in_memory()):
            slot = buffer.free_slot(mine)
            nxt.prefetch(slot if slot is not None else buffer.other_slot(mine))
        past_memory = (buffer.readers > 1 or device_only) and not self.store.memory_only
        # (with the next layer pending, at most depth - 1 slots are free)
        group, depth = buffer.schedule()
        if group > 1 and buffer.pending(nxt) and buffer.free_slots(mine, depth) < group:
            return
        # Groups that group_bytes made larger than buffer.group stop at that many layers (one job; a group's
        # first layer waits for all of it); otherwise the free slots are filled, as before.
        cap = group if group > buffer.group else None
        started = 0
        for d in range(2, (n_layers - 1 if past_memory else min(depth, n_layers - 1)) + 1):
            further = layers[(layer_idx + d) % n_layers]
            if buffer.pending(further):
                continue
            room = buffer.ahead_room(layer)
            slot = buffer.free_slot(mine, depth)
            if slot is None or room <= 0:
                return
            if past_memory and further.held_in_memory():
                continue
            if cap is not None and started >= cap:
                return
            if not further.prefetch(slot, max_bytes=room):
                return
            started += 1

    def _ahead_overlaps(self) -> bool | str:
        """Whether layer-ahead reads run beside the model's compute: ``True`` (every layer's), ``"device"``
        (only layers with blocks on a disk tier reading past the page cache, ``direct_io``; memory-held
        layers are read by their own update) or ``False`` (none: each ``update`` copies its blocks itself,
        merged into copies that use torch's threads, :func:`tiercache.batched.copy_pairs`).

        ``True`` while torch's intra-op threads leave a core free.  When they fill every core, a read that is
        a copy (memory tiers, a buffered disk tier's page-cache copies) gains nothing from running beside the
        model: it takes a core from torch's threads and stalls their parallel regions.  Memory-only caches then
        read inline.  A disk-backed cache does so (``"device"`` with ``direct_io``, else ``False``) only while
        the machine is otherwise idle (:func:`tiercache.batched.machine_idle`: CPU time of other processes): beside other
        processes, reads ahead measured far faster than inline reads, as DynamicCache itself slows several-fold
        there (2-core box, SmolLM2 1K context, host 16 MiB + disk, 2 threads, load 4-6: 84-112 ms per step
        reading ahead, 408-727 inline, DynamicCache 491-568; idle: within noise of each other, 1.2-1.7x
        DynamicCache; ``benchmarks/exact_threads_ab.py``).  ``decode_buffer.INLINE_WHEN_BUSY = False`` keeps
        every read of a disk-backed cache ahead."""
        if torch.get_num_threads() < _CORES:
            return True
        store = self.store
        if not store.memory_only:
            if not decode_buffer.INLINE_WHEN_BUSY or not machine_idle():
                return True
            if store.device_reads:
                return _DEVICE_ONLY
        self.buffer.counters.inline += 1
        return False

    def _ahead_mode(self, layer_idx: int) -> bool | str:
        """What the update of layer ``layer_idx`` reads ahead: :meth:`_ahead_overlaps`, except that with a core
        to spare beside torch's threads and small layers (:meth:`_small_layers`) the memory-held ones are copied
        by their own update: a memory-only cache reads nothing ahead (``False``, counted in
        ``stats()["prefetch"]["inline"]``), a disk-backed one only the layers that read the disk
        (``"device"``).  Only the copy of a read ahead of memory-held blocks runs beside the model, while the
        reader thread's Python (the hand-off, ``get_many``'s lookups and pins) holds the GIL the forward thread
        waits for between its ops; for small layers that costs more than the copy saves (see
        ``decode_buffer.MEMORY_AHEAD_MIN_BYTES``).  Not when torch's threads fill the cores (a disk-backed cache
        beside other processes keeps every read ahead: an inline copy's parallel region stalls there, see
        :meth:`_ahead_overlaps`)."""
        ahead = self._ahead_overlaps()
        if ahead is True and torch.get_num_threads() < _CORES and self._small_layers(layer_idx):
            if self.store.memory_only:
                self.buffer.counters.inline += 1
                return False
            return _DEVICE_ONLY
        return ahead

    def _small_layers(self, layer_idx: int) -> bool:
        """Whether the layer the update of layer ``layer_idx`` reads ahead first, the next one (in the first
        pass, before that one has states: layer 0), is on the CPU and has visible blocks, fewer than
        ``decode_buffer.MEMORY_AHEAD_MIN_BYTES`` of them (estimated as blocks x the first block's bytes).
        Layers on another device (host-to-GPU copies) are never small."""
        layers = self.layers
        nxt = layers[(layer_idx + 1) % len(layers)]
        if not nxt.is_initialized:  # the first pass: the walk may go on to the next pass's first layer
            nxt = layers[0]
        device = nxt.device
        if device is None or device.type != "cpu":
            return False
        first, n, _ = nxt._visible_blocks()
        return 0 < n and n * nxt._blocks[first].nbytes < decode_buffer.MEMORY_AHEAD_MIN_BYTES

    @property
    def batch_size(self) -> int:
        """Current batch size, or ``-1`` before the first update."""
        sizes = {layer._batch for layer in self.layers if layer.is_initialized}
        if not sizes:
            return -1
        if len(sizes) > 1:
            raise ValueError(f"The batch size is not consistent across layers: {sorted(sizes)}")
        return sizes.pop()

    def stats(self) -> dict:
        """JSON-serialisable figures: ``{"kv": ..., "tiercache": ...}``.

        ``kv`` holds this cache's own accounting: tokens, blocks, ``held_bytes`` stored in the tiers,
        the memory held beside the tiers (``tail_bytes``: the one-block tail buffers of every layer;
        ``buffer_bytes`` / ``buffer_peak_bytes``: the decode buffer shared by the layers, about one
        layer's visible K and V per slot in use (with layer-ahead reads one more slot per layer read
        ahead: up to three in all with memory tiers only, five with a disk tier, nine for small layers);
        ``beside_tiers_bytes``: their sum, plus ``queued_bytes`` (blocks waiting in the write-behind queue:
        copies in memory, not in the tiers yet) and in sparse mode ``digest_bytes`` and the pipeline's pool
        and staging bytes), and the :class:`~tiercache_llm.store.KVCounters`;
        ``prefetch``: ``enabled`` and the layer-ahead reads' counters
        (:class:`~tiercache_llm.decode_buffer.ReadAheadCounters`: reads started / used / discarded /
        failed, entries taken from them vs read by the updates themselves and ``hit_rate``, bytes, the
        seconds updates waited for them, read themselves, and the reader thread read);
        ``tiercache`` is ``tiercache.Cache.stats()`` (per-tier capacity, use, hits, misses, bytes
        moved between tiers, evictions); sparse mode adds ``pipeline`` (the decode pipeline's counters)
        and ``sparse`` (``settings``, ``total``, ``last_step``).  See docs/tiercache_llm.md.
        """
        out = self.store.stats()
        out["kv"].update(
            tokens=self.get_seq_length() if self.layers else 0,
            layers=len(self.layers),
            block_size=self.settings.block_size,
            blocks=sum(len(layer._blocks) for layer in self.layers),
            tail_bytes=sum(layer.tail_bytes for layer in self.layers),
            buffer_bytes=self.buffer.nbytes,
            buffer_peak_bytes=self.buffer.peak_bytes,
        )
        kv = out["kv"]
        kv["beside_tiers_bytes"] = kv["tail_bytes"] + kv["buffer_bytes"] + kv["queued_bytes"]
        out["prefetch"] = {"enabled": self.buffer.read_ahead, **self.buffer.counters.as_dict()}
        if self._pipeline is not None:
            out["pipeline"] = self._pipeline_stats(out)
            out["kv"]["beside_tiers_bytes"] += out["pipeline"]["reuse_bytes"] + out["pipeline"].get(
                "staging", {}).get("bytes", 0)
        if self._sparse is not None:
            digest_bytes = sum(layer.sparse.nbytes for layer in self.layers if layer.sparse is not None)
            out["kv"]["digest_bytes"] = digest_bytes
            out["kv"]["beside_tiers_bytes"] += digest_bytes
            out["sparse"] = {
                "settings": dict(budget=self.settings.budget, sink=self.settings.sink, recent=self.settings.recent,
                                 strategy=self.settings.strategy, decay=self.settings.decay,
                                 pool_bytes=self._pipeline.config.pool_bytes if self._pipeline is not None else None),
                "total": self._sparse.total.as_dict(),
                "last_step": getattr(self, "_last_step_stats", None),
            }
        return out

    def _pipeline_stats(self, store_stats: dict) -> dict:
        """``stats()["pipeline"]``: the pipeline's counters plus ``stages``, seconds per stage of the
        decode steps since construction (scoring, synchronous fetch per tier, copies from the reuse
        buffer / staging, waits on prefetches, attention, placement, block writes, background reads)."""
        out = self._pipeline.as_dict()
        total = self._sparse.total
        staging = out.get("staging", {})
        out["stages"] = {
            "scoring_seconds": total.scoring_seconds,
            "fetch_seconds": total.fetch_seconds,
            "fetch_sync_seconds_by_tier": dict(out["sync_seconds"]),
            "copy_seconds": out["copy_seconds"],
            "prefetch_wait_seconds": staging.get("wait_seconds", 0.0),
            "predict_seconds": out["predict_seconds"],
            "attention_seconds": total.attention_seconds,
            "placement_seconds": total.placement_seconds,
            "write_seconds": store_stats["kv"]["put_seconds"],
            "write_enqueue_seconds": store_stats["kv"]["enqueue_seconds"],
            "write_backpressure_seconds": store_stats["kv"]["backpressure_seconds"],
            "background_read_seconds": staging.get("background_seconds", 0.0),
        }
        return out

    def release_buffers(self) -> None:
        """Free the shared decode buffer (it is allocated again by the next ``update``; pending
        layer-ahead reads are discarded); e.g. between requests of a long-lived cache."""
        self.buffer.release()

    def reset(self) -> None:
        """Delete every layer's blocks and free the decode buffer (and the pipeline's reuse / staging memory).
        Also the recovery from :class:`~tiercache_llm.errors.InconsistentCacheError` (a failed forward pass):
        the cache is empty and consistent afterwards."""
        self._invalidate_pipeline()
        super().reset()
        if not self.store.closed:  # entries no layer tracks: those of a block write that failed part-way
            self.store.delete_all()
        self.buffer.release()
        self._broken = None
        self._cursor = -1
        self._in_pass = False
        self._model_driven = False

    # ----------------------------------------------------------------------------------- copies
    def __deepcopy__(self, memo: dict) -> "TieredKVCache":
        """An independent cache with the same contents (tokens, blocks, tails, row maps, recording).

        A cache that owns its tiercache gets a fresh one with the same budgets and policy (its disk
        tier, if any, in a new temporary directory: two tiercaches cannot share a path); a cache on a
        borrowed tiercache copies its blocks into that tiercache under a new uid.  Each block is
        read and written once; :class:`~tiercache_llm.errors.KVCapacityError` if the copy does not fit.
        """
        self.store._check_open()
        settings = self.settings
        if self.store.owns:
            if not isinstance(settings.policy, str):
                settings = dataclasses.replace(settings, policy=copy.deepcopy(settings.policy, memo))
            if settings.path is not None:
                settings = dataclasses.replace(settings, path=None)
            store = BlockStore.open(
                gpu=settings.gpu, host=settings.host, disk=settings.disk, path=settings.path,
                policy=settings.policy, compression=settings.compression, direct_io=settings.direct_io,
            )
        else:
            store = BlockStore(self.store.cache, owns=False)
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        skip = {"store", "layers", "cache_uid", "buffer", "settings", "_prepared_model", "_pipeline"}
        new.__dict__.update({k: copy.deepcopy(v, memo) for k, v in self.__dict__.items() if k not in skip})
        new.settings, new.store, new.cache_uid = settings, store, uuid.uuid4().hex
        new.buffer = DecodeBuffer(read_ahead=self.buffer.read_ahead, max_depth=self.buffer.max_depth,
                                  ahead_bytes=self.buffer.ahead_bytes, readers=self.buffer.readers,
                                  group=self.buffer.group, group_bytes=self.buffer.group_bytes,
                                  base_depth=self.buffer.base_depth)
        new.buffer.huge_pages = self.buffer.huge_pages
        new._prepared_model = self._prepared_model  # the same model object, prepared once
        try:
            new.layers = [layer._copy_to(store, new.cache_uid, new.buffer) for layer in self.layers]
        except BaseException:
            store.close()
            raise
        if self._sparse is not None:
            for old, layer in zip(self.layers, new.layers):
                if old.sparse is not None:
                    layer.sparse = old.sparse.copy_for(new._sparse)
                    layer.sparse.push_all_scores(layer)
            new._sparse.flush_scores(store)
        new._start_pipeline()
        return new

    def __copy__(self) -> "TieredKVCache":
        raise TypeError("a shallow copy of a TieredKVCache would share its blocks; use copy.deepcopy")

    def __reduce_ex__(self, protocol: int) -> Any:
        raise TypeError(
            "a TieredKVCache cannot be pickled: its blocks live in this process's tiercache (host memory, "
            "GPU, disk files it deletes on close); use copy.deepcopy for an independent copy in this process"
        )

    def close(self) -> None:
        """Stop the layer-ahead reader and the decode pipeline (queued background reads cancelled, running
        ones awaited), then release the tiers (idempotent).  The cache cannot be used afterwards.

        Thread safety: called from another thread while ``generate`` runs (e.g. a cancelled request), it
        waits for the ``update`` or sparse decode step in flight; the generate then stops with
        ``RuntimeError("this TieredKVCache has been closed")`` at its next call."""
        with self.store.op_lock:
            self.buffer.close()
            if getattr(self, "_pipeline", None) is not None:
                self._pipeline.close()
            self.store.close()

    def __enter__(self) -> "TieredKVCache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
