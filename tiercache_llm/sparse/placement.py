"""The placement stage of a sparse decode step: the attention mass each fetched block received goes,
decayed, into the layer's per-block mass and (strategy ``"attention-aware"``) into the tiercache
scores queued for the end of the forward pass (with ``complement_reuse``, the scores make the fastest
tier complement the decode pipeline's resident pools: :meth:`~.pipeline.DecodePipeline.placement_scores`).  The generic tiercache learns nothing about attention;
scores reach it through ``update_scores``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from ..kv_cache import TieredKVLayer
    from ..sparse_layer import SparseLayerState, SparseStats
    from .attention import SparseAttentionOutput
    from .selection import BlockSelection


def record_attention(state: "SparseLayerState", layer: "TieredKVLayer", sel: "BlockSelection",
                     res: "SparseAttentionOutput", stats: "SparseStats") -> None:
    """Accumulate the mass ``res`` gave each block of ``sel.fetch`` and queue the stored blocks' scores."""
    ctrl = state.ctrl
    hk = layer._shape_k[0]
    u = int(sel.fetch.numel())
    n_stored = len(layer._blocks)
    stored = [j for j in sel.fetch.tolist() if j < n_stored]
    pipeline = getattr(layer, "pipeline", None)
    if ctrl.strategy == "attention-aware" and u:
        block_mass = res.kv_head_mass(hk).sum(dim=(0, 1)).double().cpu()  # (U,) summed over rows and heads
        state.mass[sel.fetch.cpu()] += block_mass * ctrl.scale
        scores = pipeline.placement_scores(state, layer, stored) if pipeline is not None else None
        if scores is not None:  # the pipeline's resident pool holds the fetched blocks (see placement_scores)
            ctrl.pending_scores.update(scores)
        else:
            for i, j in enumerate(stored):
                score = float(state.mass[j])
                ctrl.pending_scores[layer._kkeys[j]] = score
                ctrl.pending_scores[layer._vkeys[j]] = score
