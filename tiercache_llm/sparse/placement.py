"""The placement stage of a sparse decode step: the attention mass each fetched block received goes,
decayed, into the layer's per-block mass and (strategy ``"attention-aware"``) into the tiercache
scores queued for the end of the forward pass (with ``complement_reuse``, the scores make the fastest
tier complement the decode pipeline's resident pools: :meth:`~.pipeline.DecodePipeline.placement_scores`).  The generic tiercache learns nothing about attention;
scores reach it through ``update_scores``.
"""

from __future__ import annotations

import bisect
import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from ..kv_cache import TieredKVLayer
    from ..sparse_layer import SparseLayerState, SparseStats
    from .attention import SparseAttentionOutput
    from .selection import BlockSelection


def record_attention(state: "SparseLayerState", layer: "TieredKVLayer", sel: "BlockSelection",
                     res: "SparseAttentionOutput", stats: "SparseStats") -> None:
    """Accumulate the mass ``res`` gave each block of ``sel.fetch`` (scaled by the controller's decay
    clock) into ``state.mass``, and queue each stored fetched block's new mass as the score of its entries
    (its joint K/V entry, or its K and V entries; strategy ``"attention-aware"``; other strategies keep no
    mass).  Vectorised: one ``index_add_`` for the masses, one ``tolist`` for the scores; the keys are queued
    (K, V) block by block in ``sel.fetch`` order."""
    ctrl = state.ctrl
    if ctrl.strategy != "attention-aware" or not sel.fetch.numel():
        return
    hk = layer._shape_k[0]
    fetch = sel.fetch.cpu()
    # detached: a pass with autograd on must not tie the masses (kept across steps) into its graph
    block_mass = res.kv_head_mass(hk).detach().sum(dim=(0, 1)).double().cpu()  # (U,) summed over rows and heads
    state.mass.index_add_(0, fetch, block_mass.mul_(ctrl.scale))
    n_stored = len(layer._blocks)
    stored = fetch.tolist()
    if stored[-1] >= n_stored:  # ascending: only the in-memory tail block can lie past the stored ones
        stored = stored[: bisect.bisect_left(stored, n_stored)]
        fetch = fetch[: len(stored)]
    pipeline = getattr(layer, "pipeline", None)
    scores = pipeline.placement_scores(state, layer, stored) if pipeline is not None else None
    if scores is not None:  # the pipeline's resident pool holds the fetched blocks (see placement_scores)
        ctrl.pending_scores.update(scores)
        return
    kkeys, vkeys = layer._kkeys, layer._vkeys
    masses = state.mass[fetch].tolist()
    pending = ctrl.pending_scores
    if getattr(layer, "_joint", False):  # kkeys[j] is block j's one entry
        pending.update(zip([kkeys[j] for j in stored], masses))
        return
    for j, m in zip(stored, masses):
        pending[kkeys[j]] = m
        pending[vkeys[j]] = m


def promotion_threshold(masses: torch.Tensor, room: int) -> float:
    """The attention-aware policy's promotion threshold: the decayed mass of the ``room``-th most attended
    of ``masses`` (the candidate blocks' masses, 1-D), so that only blocks the fastest tier's ``room``
    (in blocks: its entries over the entries per block) would hold are promoted; ``inf`` without room, ``0.0`` when every
    candidate fits."""
    if room <= 0:
        return math.inf
    if masses.numel() <= room:
        return 0.0
    return max(0.0, float(torch.topk(masses, room).values[-1]))
