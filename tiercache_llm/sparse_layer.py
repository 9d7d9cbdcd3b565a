"""Sparse decode inside :class:`~tiercache_llm.TieredKVCache`: per-layer digests, selection, the fetch
of the selected blocks, attention over them, and attention-aware placement.

Division of work with transformers (see :mod:`.attention_hook`):

1. ``Cache.update`` (receives only K/V) appends the new states to the layer's blocks as exact mode
   does.  In a *decode step* (one new token, a non-empty context, a full-attention layer) it returns
   just the new states and leaves a pending record; in any other step (prefill, multi-token steps
   after it, sliding-window layers) it returns exactly what exact mode returns.
2. The registered attention function (it sees the query and the mask) finds the pending record of
   its layer: for an exact step it appends the new keys to the digests (padding taken from the mask)
   and runs the model's original attention; for a decode step it calls :meth:`SparseLayerState.decode`:
   score the digests, select per KV head, fetch the union of selected blocks (only those), attend,
   and record the attention mass each block received.
3. After the forward pass the controller sends the decayed masses to the tiercache in one
   ``update_scores`` call (``strategy="attention-aware"``).

Thread safety: one forward pass at a time per cache (as for every transformers cache).
"""

from __future__ import annotations

import math
import time
import weakref
from dataclasses import dataclass, field
from itertools import chain
from typing import TYPE_CHECKING, Any, Literal

import torch

from .errors import TieredKVError
from .policies import AttentionPlacementPolicy
from .tensor_modes import with_normal_tensors
from .sparse.attention import SparseAttentionOutput, sparse_attention
from .sparse.digests import KeyDigests
from .sparse.fetch import fetch_selected
from .sparse.page_table import attend_pages_cpu, build_page_table_from_valid, entry_mass_to_blocks, merge_attention, \
    page_table_attention, split_page_table
from .sparse.placement import promotion_threshold, record_attention
from .sparse.selection import SelectionConfig, select

if TYPE_CHECKING:  # pragma: no cover
    from .kv_cache import TieredKVLayer

Strategy = Literal["attention-aware", "fetch-every-step", "reuse-layer-ahead"]
STRATEGIES = ("attention-aware", "fetch-every-step", "reuse-layer-ahead")


class SparseModeError(TieredKVError, RuntimeError):
    """A sparse :class:`~tiercache_llm.TieredKVCache` cannot attend correctly: the model was not prepared
    with :meth:`~tiercache_llm.TieredKVCache.for_model`, its attention was switched away, or the
    digests are out of step with the stored blocks.  Raised instead of attending densely or over a
    truncated context."""


# Torch intra-op threads of the cache's own work in a sparse decode step (``SparseLayerState.decode``: scoring
# and selection, the fetch, attention over the selected pages, placement; and the digest append): ``1`` (the
# default) runs them with one intra-op thread whatever the caller set, restoring the caller's count after;
# ``None`` leaves the caller's count.  The model's own operations (projections, MLP) keep the caller's
# threads.  Why (docs/sparse.md "Sparse decode at two threads"): these are many small operations, each a
# parallel region at 2+ threads, and on a machine whose cores the pipeline's reader threads also need, the
# step ran slower at 2 threads than at 1; at one thread the attention also takes the one-thread CPU paths
# (the direct path, values by bag), so a decode step's selections and attention are the same bits at
# every thread count.
CACHE_OPS_THREADS: int | None = 1


def _pin_threads() -> int | None:
    """Set torch's intra-op threads to :data:`CACHE_OPS_THREADS` where that is fewer than the current count;
    returns the count to restore (``None``: nothing changed)."""
    n = CACHE_OPS_THREADS
    if n is None:
        return None
    before = torch.get_num_threads()
    if before <= n:
        return None
    torch.set_num_threads(n)
    return before


_last_valid: tuple | None = None  # (weakref to the mask, batch, q, device, result) of the last call
_all_valid: torch.Tensor | None = None  # the last all-valid answer (mask None)


def valid_from_mask(mask: Any, batch: int, q: int, device: torch.device) -> torch.Tensor:
    """``(batch, q)`` bool: which of the ``q`` newest key positions may be attended, read from the
    mask transformers built for this step (its last query row: for left or no padding the last token
    is real and sees every non-padded key).  ``None`` (sdpa's causal skip) means all valid.

    The result must not be written: every layer of a forward pass gets the same mask object (or
    ``None``), so the answer for the last mask seen is kept and returned again while that object lives
    (transformers never writes a mask it built; one forward pass at a time, as for every transformers
    cache)."""
    global _last_valid, _all_valid
    if mask is None:
        ones = _all_valid
        if ones is None or ones.shape != (batch, q) or ones.device != torch.device(device):
            ones = _all_valid = torch.ones(batch, q, dtype=torch.bool, device=device)
        return ones
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        raise SparseModeError(
            f"sparse mode needs a 4-D attention mask (sdpa/eager style), got {type(mask).__name__} "
            f"{tuple(getattr(mask, 'shape', ()))}"
        )
    last = _last_valid
    if last is not None and last[0]() is mask and last[1] == batch and last[2] == q and last[3] == device:
        return last[4]
    row = mask[:, 0, -1, -q:]
    if row.dtype != torch.bool:
        row = row > torch.finfo(row.dtype).min / 2
    out = row.expand(batch, q).to(device)
    _last_valid = (weakref.ref(mask), batch, q, device, out)
    return out


_last_context: tuple | None = None  # (weakref to the mask, ctx, device, result) of the last check_context_mask


def _context_row(mask: torch.Tensor, ctx: int, device: torch.device) -> torch.Tensor | None:
    """``(B or 1, ctx)`` bool: which of the ``ctx`` context keys the last query row of a 4-D ``mask`` lets
    attend (the keys just before the newest one), kept while that mask object lives (every layer of a pass
    gets the same one); ``None`` when the mask has fewer than ``ctx + 1`` key columns."""
    global _last_context
    last = _last_context
    if last is not None and last[0]() is mask and last[1] == ctx and last[2] == device:
        return last[3]
    if mask.shape[-1] < ctx + 1:
        return None
    row = mask[:, 0, -1, mask.shape[-1] - ctx - 1 : mask.shape[-1] - 1]
    if row.dtype != torch.bool:
        row = row > torch.finfo(row.dtype).min / 2
    row = row.to(device)
    _last_context = (weakref.ref(mask), ctx, device, row)
    return row


def check_context_mask(mask: Any, valid: torch.Tensor, ctx: int, layer_idx: int) -> None:
    """Raise :class:`SparseModeError` when the 4-D attention ``mask`` of a sparse decode step disagrees with
    the validity the cache recorded for the ``ctx`` context tokens as they were added (``valid``:
    ``(B, >= ctx)`` bool; padding is invalid), e.g. a custom mask hiding context tokens: sparse decode attends
    by the recorded validity, so it would silently attend other tokens than the model was asked to (dense
    attention follows the mask).  The attention function calls it when the pass was given a 4-D mask (a
    mask transformers builds from a 2-D ``attention_mask`` agrees by construction).  ``None`` or another kind
    of mask: nothing to check (``valid_from_mask`` refuses the other kinds)."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        return
    recorded = valid[:, :ctx]
    row = _context_row(mask, ctx, recorded.device)
    if row is not None and row.shape[0] in (1, recorded.shape[0]) and torch.equal(
            row.expand(recorded.shape[0], ctx), recorded):
        return
    raise SparseModeError(
        f"layer {layer_idx}: the 4-D attention mask of this decode step does not hide exactly the context's padding "
        "(it hides other tokens, or does not cover the context): sparse decoding attends by the validity recorded as "
        "tokens were added; use mode='exact' (or a DynamicCache) for custom attention masks")


@dataclass
class SparseStats:
    """Counters of sparse decode (monotonic until :meth:`SparseController.reset_stats`).

    Attributes:
        steps: decode steps that ran sparse (counted at layer 0).
        layer_steps: (layer, step) pairs that ran sparse.
        blocks_selected: stored blocks fetched (union over heads and rows), summed over layer steps.
        blocks_resident: of those, blocks served from the layer's resident pool (no read, no copy) or whose
            entries (joint K/V, or K and V) were already in the fastest tier when fetched.
        tail_selected: selections of the in-memory tail block (not fetched from the tiers).
        tokens_attended: valid context tokens attended, summed over rows, KV heads and layer steps.
        tokens_context: valid context tokens present, same sum (``tokens_attended / tokens_context`` is the
            realised budget).
        bytes_fetched: ``{tier name: bytes}`` read for the selected blocks, by the tier they were in.
        scoring_seconds / fetch_seconds / attention_seconds / placement_seconds: wall-clock time in
            digest scoring + selection, the tier fetch, the attention, and score bookkeeping.
    """

    steps: int = 0
    layer_steps: int = 0
    blocks_selected: int = 0
    blocks_resident: int = 0
    tail_selected: int = 0
    tokens_attended: int = 0
    tokens_context: int = 0
    bytes_fetched: dict = field(default_factory=dict)
    scoring_seconds: float = 0.0
    fetch_seconds: float = 0.0
    attention_seconds: float = 0.0
    placement_seconds: float = 0.0

    def as_dict(self) -> dict:
        out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in self.__dict__.items()}
        out["reuse_rate"] = self.blocks_resident / self.blocks_selected if self.blocks_selected else None
        return out


class SparseController:
    """Cache-wide sparse state: the selection rule, the strategy, the decay clock, the forward-pass
    announcement made by the prepared model, the scores waiting to be sent, and the statistics."""

    def __init__(self, selection: SelectionConfig, strategy: Strategy, decay: float) -> None:
        self.selection = selection
        self.strategy = strategy
        self.decay = decay
        self.announced = False  # set by the prepared model's forward pre-hook, cleared after the pass
        self.hook_name: str | None = None
        self.custom_mask = False  # the running pass was given a 4-D attention mask (check_context_mask applies)
        self.clock = 0  # decode steps seen: contributions are scaled by decay ** -clock
        self.pending_scores: dict = {}
        self._deferred_to: Any = None  # the pipeline that last took this controller's end-of-step work
        self.total = SparseStats()
        self.last_step = SparseStats()

    def __getstate__(self) -> dict:
        # A copy (deepcopy of a cache) gets its own pipeline: it must not fence this one's.
        return {**self.__dict__, "_deferred_to": None}

    @property
    def scale(self) -> float:
        return self.decay ** (-self.clock)

    def begin_forward(self, hook_name: str, custom_mask: bool = False) -> None:
        self.announced = True
        self.hook_name = hook_name
        self.custom_mask = custom_mask

    def end_forward(self, layers: list["TieredKVLayer"], store: Any, check: bool = True) -> None:
        """After a forward pass: every pending decode record must have been consumed by the hook, and
        the step's scores go to the tiercache in one call, with the promotion threshold after them (:meth:`admit`);
        a decode pipeline with ``background_end_step`` takes both to its worker thread instead
        (:meth:`~.sparse.pipeline.DecodePipeline.defer_end_of_step`)."""
        self.announced = False
        stale = [layer.layer_idx for layer in layers if layer.sparse is not None and layer.sparse.pending is not None
                 and layer.sparse.pending[0] == "decode"]
        for layer in layers:
            if layer.sparse is not None:
                layer.sparse.pending = None
        if stale and check:
            raise SparseModeError(
                f"layers {stale} of a sparse TieredKVCache were not attended by the sparse attention function: "
                "the model's attention implementation was changed after TieredKVCache.for_model"
            )
        pipeline = layers_pipeline(layers)
        if pipeline is not None and pipeline.defer_end_of_step(self, enabled=check):
            self._deferred_to = pipeline
            return
        self.flush_scores(store)
        if check:
            self.admit(layers, store)

    def fence(self) -> None:
        """Wait for the end-of-step work a pipeline took (:meth:`end_forward`), so scores sent now follow it."""
        if self._deferred_to is not None:
            self._deferred_to.fence()

    def admit(self, layers: list["TieredKVLayer"], store: Any) -> None:
        """Admission control for promotion: set the store policy's ``promote_threshold`` to :meth:`threshold`
        (with an :class:`~.policies.AttentionPlacementPolicy` this store created and no decode pipeline
        rule: the decayed mass of the ``M``-th most attended stored block, ``M`` = blocks the fastest tier
        holds), so only blocks that belong among the fastest tier's top ``M`` are promoted.  Without it every block attention uses twice would be
        promoted, and with a fast tier smaller than a step's selection each promotion would demote
        another selected block (a disk write) only to fetch it back next step."""
        self.fence()
        start = time.perf_counter()
        threshold = self.threshold(layers, store)
        if threshold is not None:
            store.policy.promote_threshold = threshold
            self.total.placement_seconds += time.perf_counter() - start

    def threshold(self, layers: list["TieredKVLayer"], store: Any) -> float | None:
        """The promotion threshold :meth:`admit` sets (``None``: it sets none), computed once: for
        ``strategy="attention-aware"`` under a policy with a ``promote_threshold``, the decode pipeline's rule
        when it has one (resident pools: :meth:`~.sparse.pipeline.DecodePipeline.promotion_threshold`), else,
        under an :class:`~.policies.AttentionPlacementPolicy`, the controller's (the ``M``-th most attended
        stored block).  Reads the layers' masses and the pools' blocks only (safe on the pipeline's
        end-of-step worker)."""
        policy = getattr(store, "policy", None)
        if self.strategy != "attention-aware" or not hasattr(policy, "promote_threshold"):
            return None
        pipeline = layers_pipeline(layers)
        if pipeline is not None:
            threshold = pipeline.promotion_threshold(layers)
            if threshold is not None:
                return threshold
        if not isinstance(policy, AttentionPlacementPolicy):
            return None
        masses, entry, epb = [], 0, 2
        for layer in layers:
            if layer.sparse is not None and layer._blocks:
                masses.append(layer.sparse.mass[: len(layer._blocks)])
                epb = layer._entries_per_block  # one joint entry or K and V entries per block
                entry = max(entry, layer._blocks[0].nbytes // epb)
        if not masses or not entry:
            return None
        return promotion_threshold(torch.cat(masses), store.fastest_tier_entries(entry) // epb)

    def flush_scores(self, store: Any) -> None:
        self.fence()
        if self.pending_scores:
            start = time.perf_counter()
            store.update_scores(self.pending_scores)
            self.pending_scores = {}
            self.total.placement_seconds += time.perf_counter() - start

    def check_announced(self, layer_idx: int) -> None:
        if not self.announced:
            raise SparseModeError(
                f"layer {layer_idx}: a decode step reached a sparse TieredKVCache, but the model was not prepared for "
                "sparse attention (its attention would see only the new token). Build the cache with "
                "TieredKVCache.for_model(model, mode='sparse', ...) and keep the model prepared while decoding"
            )

    def rescale(self, layers: list["TieredKVLayer"]) -> None:
        """Keep scores finite: once the inflation factor is large, divide every mass by it and restart the
        clock (every stored block's score is resent)."""
        self.fence()  # the worker may still be sending scores on the old scale
        factor = self.scale
        self.clock = 0
        for layer in layers:
            if layer.sparse is not None:
                layer.sparse.mass /= factor
                layer.sparse.push_all_scores(layer)

    def reset_stats(self) -> None:
        self.total = SparseStats()
        self.last_step = SparseStats()


class SparseLayerState:
    """One full-attention layer's sparse state: digests of every stored token (tail included), the
    per-token validity (padding), and the decayed attention mass per block (float64, scaled by the
    controller's clock).  Lives beside the model, outside the tier budgets."""

    def __init__(self, controller: SparseController) -> None:
        self.ctrl = controller
        self.digests: KeyDigests | None = None
        self.valid: torch.Tensor | None = None  # (B, capacity) bool; first digests.length used
        self.mass = torch.zeros(0, dtype=torch.float64)
        self.pending: tuple | None = None

    @property
    def nbytes(self) -> int:
        if self.digests is None:
            return 0
        d = self.digests
        return d.nbytes + self.valid.nbytes + self.mass.nbytes

    def reset(self) -> None:
        self.digests, self.valid, self.pending = None, None, None
        self.mass = torch.zeros(0, dtype=torch.float64)

    # ------------------------------------------------------------------------------- update side
    def update(self, layer: "TieredKVLayer", key_states: torch.Tensor, value_states: torch.Tensor):
        q = key_states.shape[-2]
        ctx = layer._length
        if q == 1 and ctx > 0 and layer.is_initialized:
            self.ctrl.check_announced(layer.layer_idx)
            if self.digests is None or self.digests.length != ctx:
                raise SparseModeError(
                    f"layer {layer.layer_idx}: the key digests cover {0 if self.digests is None else self.digests.length} "
                    f"tokens but the layer holds {ctx}: earlier forward passes ran without the sparse attention function"
                )
            layer._check_states(key_states, value_states)
            layer._append(key_states, value_states)
            layer._length += 1
            self.pending = ("decode", ctx)
            return key_states, value_states
        start = layer._length
        out = layer._update_exact(key_states, value_states)
        self.pending = ("exact", q)
        pipeline = getattr(layer, "pipeline", None)
        if pipeline is not None and layer.sliding_window is None:
            pipeline.seed(layer, key_states, value_states, start)  # a prefill's blocks into the resident pool
        return out

    # ------------------------------------------------------------------------------- hook side
    def append(self, keys: torch.Tensor, valid: torch.Tensor) -> None:
        """Digests and validity of new keys ``(B, H, q, D)`` (a decode step's one key with
        :data:`CACHE_OPS_THREADS` intra-op threads; a prefill's with the caller's)."""
        restore = _pin_threads() if keys.shape[2] == 1 else None
        try:
            self._append(keys, valid)
        finally:
            if restore is not None:
                torch.set_num_threads(restore)

    @with_normal_tensors
    def _append(self, keys: torch.Tensor, valid: torch.Tensor) -> None:
        b, h, q, d = keys.shape
        if self.digests is None:
            self.digests = KeyDigests.empty(b, h, d, self.page_size, dtype=keys.dtype, device=keys.device,
                                            storage=getattr(torch, self.ctrl.selection.digests))
            self.valid = torch.zeros(b, 0, dtype=torch.bool, device=keys.device)
        start = self.digests.length
        if start + q > self.valid.shape[1]:
            grown = torch.zeros(b, max(2 * self.valid.shape[1], start + q, 64), dtype=torch.bool, device=keys.device)
            grown[:, :start] = self.valid[:, :start]
            self.valid = grown
        self.valid[:, start : start + q] = valid
        # valid_from_mask's all-valid answer (no mask): the digests skip masking by it (same digests)
        self.digests.append(keys.detach(), None if valid is _all_valid else valid)  # never autograd history
        n = self.digests.n_blocks
        if self.mass.numel() < n:
            self.mass = torch.cat((self.mass, torch.zeros(n - self.mass.numel(), dtype=torch.float64)))

    _block_size = 0  # storage block size, set by the layer
    _page_size = 0  # digest / selection granularity (divides _block_size); 0: the block size

    @property
    def page_size(self) -> int:
        return self._page_size or self._block_size

    def decode(self, layer: "TieredKVLayer", query: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
               ctx: int, scaling: float | None) -> torch.Tensor:
        """Sparse attention of one decode step; returns ``(B, Hq, 1, D)``.  Runs with
        :data:`CACHE_OPS_THREADS` torch intra-op threads (the caller's count restored after, also on error).
        Holds the store's ``op_lock``, so a ``close()`` from another thread waits for it; on a closed cache:
        ``RuntimeError``."""
        with layer.store.op_lock:
            layer.store._check_open()
            restore = _pin_threads()
            try:
                return self._decode(layer, query, k_new, v_new, ctx, scaling)
            finally:
                if restore is not None:
                    torch.set_num_threads(restore)

    @with_normal_tensors
    def _decode(self, layer: "TieredKVLayer", query: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                ctx: int, scaling: float | None) -> torch.Tensor:
        ctrl, stats = self.ctrl, self.ctrl.last_step
        bs = layer.block_size
        hk = layer._shape_k[0]
        t0 = time.perf_counter()
        # Selection is discrete: it never needs autograd (its out= kernels refuse inputs that require grad,
        # as the query does in a plain forward of the model outside no_grad); attention keeps the graph.
        sel = select(query.detach(), self.digests, ctrl.selection, pages_per_block=bs // self.page_size)
        t1 = time.perf_counter()
        pipeline = getattr(layer, "pipeline", None)
        defer = pipeline is not None and pipeline.config.overlap_sync_reads
        fetched = fetch_selected(self, layer, sel, query.detach(), stats, defer=defer)
        k_pool, v_pool, slot_of_fetch = fetched[:3]
        pending = fetched[3] if defer else None
        t2 = time.perf_counter()
        waited = 0.0
        want_mass = ctrl.strategy == "attention-aware"  # placement is the masses' only reader
        if pending is None:
            res = attend_selected(query, k_pool, v_pool, slot_of_fetch, sel, self.valid, ctx, bs, k_new, v_new,
                                  scaling, mass=want_mass)
        else:
            res, waited = attend_overlapped(query, k_pool, v_pool, slot_of_fetch, sel, self.valid, ctx, bs, k_new,
                                            v_new, scaling, pending, mass=want_mass)
        t3 = time.perf_counter()
        count = self.digests.count
        stats.tokens_attended += int(torch.mul(sel.pages, count.unsqueeze(1)).sum())  # sel.selected_tokens(count).sum()
        stats.tokens_context += int(count.sum()) * hk
        record_attention(self, layer, sel, res, stats)
        t4 = time.perf_counter()
        stats.scoring_seconds += t1 - t0
        stats.fetch_seconds += t2 - t1 + waited  # overlap_sync_reads: the wait for the reads is fetch time
        stats.attention_seconds += t3 - t2 - waited
        stats.placement_seconds += t4 - t3
        stats.layer_steps += 1
        return res.output

    def copy_for(self, controller: SparseController) -> "SparseLayerState":
        """An independent copy attached to ``controller`` (deepcopy of a cache)."""
        new = SparseLayerState(controller)
        new._block_size, new._page_size = self._block_size, self._page_size
        if self.digests is not None:
            new.digests = self.digests.clone()
            new.valid = self.valid.clone()
        new.mass = self.mass.clone()
        return new

    # ------------------------------------------------------------------------ consistency
    def push_all_scores(self, layer: "TieredKVLayer") -> None:
        """Queue the current mass of every stored block (after blocks were rewritten or rescaled)."""
        if self.ctrl.strategy != "attention-aware":
            return
        n = min(len(layer._blocks), self.mass.numel())
        masses = self.mass[:n].tolist()
        if layer._joint:  # one entry per block
            self.ctrl.pending_scores.update(zip(layer._kkeys[:n], masses))
            return
        keys = chain.from_iterable(zip(layer._kkeys[:n], layer._vkeys[:n]))
        self.ctrl.pending_scores.update(zip(keys, chain.from_iterable(zip(masses, masses))))

    @with_normal_tensors
    def select_rows(self, index: torch.Tensor) -> None:
        """Beam reorder / batch repetition / batch selection: ``new_row[i] = old_row[index[i]]``.  The
        masses are per block (summed over rows) and stay."""
        if self.digests is not None:
            self.digests.select_rows(index)
            self.valid = self.valid.index_select(0, index.to(self.valid.device))

    @with_normal_tensors
    def crop(self, layer: "TieredKVLayer", length: int) -> None:
        """After the layer was cut to ``length`` tokens: digests rebuilt for the cut block from the
        layer's tail (which now holds that block's remaining keys), masses of removed blocks dropped."""
        if self.digests is None:
            return
        if length > self.digests.length:
            raise SparseModeError(f"cannot crop digests of {self.digests.length} tokens to {length}")
        rest = length % layer.block_size  # the layer's tail now holds these keys of the cut block
        cut = length % self.page_size  # the digests need the cut page's (a suffix of them)
        tail_keys = layer._tail_k[:, :, rest - cut : rest] if cut else None
        keep_valid = self.valid[:, :length].clone()
        tail_valid = keep_valid[:, length - cut : length] if cut else None
        self.digests.crop(length, tail_keys, tail_valid)
        n = self.digests.n_blocks
        self.mass = self.mass[:n].clone()
        self.valid[:, length:] = False


def attend_selected(query: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, slot_of_fetch: torch.Tensor,
                    sel: Any, valid: torch.Tensor, ctx: int, block_size: int, k_new: torch.Tensor,
                    v_new: torch.Tensor, scaling: float | None, *, backend: str = "auto",
                    mass: bool = True) -> SparseAttentionOutput:
    """Attention of one decode step over the selection's pages, read from the pool the fetch filled.

    ``k_pool`` / ``v_pool``: ``(N, B, H, block_size, D)`` slots; ``slot_of_fetch``: ``(U,)`` slot of each
    block of ``sel.fetch``; ``valid``: ``(B, >= ctx)`` token validity (padding); ``ctx``: context tokens
    before the new one.  ``backend``:

    The ``"pages"`` backends build the page table from ``valid`` and ``ctx`` directly
    (``build_page_table_from_valid``: the table ``build_page_table`` makes from the fetched blocks' token
    validity).

    - ``"pages"``: the page table of :mod:`.sparse.page_table`, torch path (exactly each head's pages;
      on CPU with one torch thread gathered and multiplied chunk by chunk of (row, head)s so each gathered
      chunk is read from cache, else one gather and two matmuls per (row, head)); on CPU it first tries
      :func:`~.sparse.page_table.attend_pages_cpu`, the same computation without building the table where
      every (row, KV head) attends as many pages (float32 pools, one thread, one new token: what decode runs
      on CPU), bit for bit the table path's result (both sum the values the same way, by a weighted
      ``embedding_bag`` with ``page_table.VALUES_BY_BAG``, the default, else by gathers and matmuls);
    - ``"pages-triton"``: the same page table through the Triton page-table kernel
      (``tiercache_kernels.page_attention``: pages read in place from the pool);
    - ``"blocks-triton"`` (old name ``"triton"``): the block-table kernel over each head's blocks of the
      union with a token mask (``tiercache_kernels.block_attention``);
    - ``"auto"``: ``"pages-triton"`` on CUDA where compiled Triton is usable, ``"pages"`` otherwise.

    The Triton backends run compiled on CUDA, interpreted on CPU under ``TRITON_INTERPRET=1``.  Returns
    block masses in ``sel.fetch`` order; ``mass=False`` (the caller does not read them): the ``"pages"``
    path returns zeros there instead of computing them (``page_table_attention(mass=False)``)."""
    if backend == "triton":
        backend = "blocks-triton"
    if backend not in ("auto", "pages", "pages-triton", "blocks-triton"):
        raise ValueError(f"backend must be 'auto', 'pages', 'pages-triton' or 'blocks-triton' ('triton'), got {backend!r}")
    dev = valid.device
    if backend == "auto":
        backend = "pages"
        if query.is_cuda:
            from tiercache_kernels.triton_support import compiled_triton_usable

            backend = "pages-triton" if compiled_triton_usable(query.device) else "pages"
    if backend == "blocks-triton":
        fetch_t = sel.fetch.to(dev)
        pos = fetch_t.view(-1, 1) * block_size + torch.arange(block_size, device=dev)
        token_ok = valid[:, pos.clamp(max=valid.shape[1] - 1)] & (pos < ctx)  # (B, U, S)
        kbuf = k_pool.index_select(0, slot_of_fetch.to(k_pool.device))
        vbuf = v_pool.index_select(0, slot_of_fetch.to(v_pool.device))
        pages = sel.token_mask(block_size)
        token_valid = token_ok if pages is None else token_ok.unsqueeze(1) & pages.to(dev)
        return sparse_attention(query, kbuf.permute(1, 2, 0, 3, 4), vbuf.permute(1, 2, 0, 3, 4),
                                sel.fetch_head_mask.to(kbuf.device), token_valid, k_new, v_new, scale=scaling,
                                backend="triton")
    if backend == "pages" and dev.type == "cpu":
        res = attend_pages_cpu(query, k_pool, v_pool, sel, slot_of_fetch, valid, ctx, block_size, k_new, v_new,
                               scaling, mass)
        if res is not None:
            return res
    table = build_page_table_from_valid(sel, slot_of_fetch, valid, ctx, block_size)
    res = page_table_attention(query, k_pool, v_pool, table, k_new, v_new, scale=scaling,
                               backend="triton" if backend == "pages-triton" else "torch", mass=mass)
    u = int(sel.fetch.numel())
    block_mass = entry_mass_to_blocks(res.block_mass, table, u) if mass else res.block_mass.new_zeros(
        res.block_mass.shape[0], res.block_mass.shape[1], u)
    return SparseAttentionOutput(res.output, block_mass, res.new_mass)


def attend_overlapped(query: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, slot_of_fetch: torch.Tensor,
                      sel: Any, valid: torch.Tensor, ctx: int, block_size: int, k_new: torch.Tensor,
                      v_new: torch.Tensor, scaling: float | None, pending: Any, *,
                      mass: bool = True) -> tuple[SparseAttentionOutput, float]:
    """:func:`attend_selected` (``"pages"``, torch path) in two parts around ``pending`` (a
    :class:`~.sparse.pipeline.PendingReads`, ``overlap_sync_reads``): attention over the selection's pages of
    the blocks already in their slots plus the new tokens, then ``pending.wait()``, then attention over the pages
    of the ``pending.late`` blocks, the two merged exactly by their log-sum-exp
    (:func:`~.sparse.page_table.merge_attention`, masses included).  Returns ``(result, seconds waited)``.  An
    error in the first part still waits for the reads (they write into the pool) before it propagates; what the
    wait raises propagates as the fetch's own error would."""
    table = build_page_table_from_valid(sel, slot_of_fetch, valid, ctx, block_size)
    ready, later = split_page_table(table, pending.late)
    try:
        first = page_table_attention(query, k_pool, v_pool, ready, k_new, v_new, scale=scaling, backend="torch",
                                     mass=mass, lse=True)
    except BaseException:
        pending.wait(raise_errors=False)
        raise
    t0 = time.perf_counter()
    pending.wait()
    waited = time.perf_counter() - t0
    second = page_table_attention(query, k_pool, v_pool, later, scale=scaling, backend="torch", mass=mass, lse=True)
    res = merge_attention(first, second)
    u = int(sel.fetch.numel())
    if mass:
        m1 = ready.slots.shape[-1]
        block_mass = entry_mass_to_blocks(res.block_mass[..., :m1], ready, u) + \
            entry_mass_to_blocks(res.block_mass[..., m1:], later, u)
    else:
        block_mass = res.block_mass.new_zeros(res.block_mass.shape[0], res.block_mass.shape[1], u)
    return SparseAttentionOutput(res.output, block_mass, res.new_mass), waited


DEFAULT_SCORE = "bound+landmark"  # measured in benchmarks/sparse_selection_study.py (docs/sparse.md)
MAX_DEFAULT_PAGE = 8


def default_page_size(block_size: int) -> int:
    """The default selection page: the largest power of two <= 8 dividing the storage block (8 for
    64-token blocks); docs/sparse.md gives the measurements behind it."""
    return math.gcd(block_size, MAX_DEFAULT_PAGE)


def check_page_size(page_size: int, block_size: int) -> int:
    if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size <= 0:
        raise ValueError(f"page_size must be a positive int, got {page_size!r}")
    if block_size % page_size:
        raise ValueError(f"page_size ({page_size}) must divide block_size ({block_size})")
    return page_size


def selection_config(budget: int | float, sink: int, recent: int, digests: str = "float16") -> SelectionConfig:
    """The sparse cache's selection rule: pages scored by the Quest bound blended with the landmark, over
    digests stored as ``digests`` (``"float16"``: outward-rounded bounds, the default; ``"float32"``)."""
    return SelectionConfig(budget=budget, sink=sink, recent=recent, score=DEFAULT_SCORE, digests=digests)


def check_decay(decay: float) -> float:
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not (0.0 < float(decay) <= 1.0):
        raise ValueError(f"decay must be a float in (0, 1], got {decay!r}")
    return float(decay)


MAX_SCALE = 1e30  # the controller rescales once contributions are inflated this much (float64 headroom)


def layers_pipeline(layers: list["TieredKVLayer"]) -> Any:
    """The decode pipeline of a cache's sparse ``layers`` (``None`` without one)."""
    return next((getattr(layer, "pipeline", None) for layer in layers if layer.sparse is not None), None)


def needs_rescale(ctrl: SparseController) -> bool:
    return ctrl.decay < 1.0 and ctrl.clock * -math.log(ctrl.decay) > math.log(MAX_SCALE)
