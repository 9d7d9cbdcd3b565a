"""The fetch stage of a sparse decode step: materialise exactly the selected blocks of one layer.

Seam between selection/attention (:mod:`tiercache_llm.sparse_layer`) and the data movement (tiers,
prefetch, staging, the resident pool).  Only the blocks in ``sel.fetch`` are ever read; the in-memory
tail block is copied from the layer's tail.  The result is a pool ``(N, B, H, S, D)`` plus the slot of
each fetched block, which attention reads through a page table (:mod:`.page_table`).

Thread safety: called from the forward pass (one per cache at a time).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .pool import identity_pool

if TYPE_CHECKING:  # pragma: no cover
    from ..kv_cache import TieredKVLayer
    from ..sparse_layer import SparseLayerState, SparseStats
    from .selection import BlockSelection


def selected_buffers(layer: "TieredKVLayer", sel: "BlockSelection") -> tuple[list[int], list[int], torch.Tensor, torch.Tensor]:
    """``(fetch, stored, kbuf, vbuf)``: the selected block indices, those already stored (the rest is the
    tail block), and empty ``(U, B, H, block_size, D)`` K and V buffers for them."""
    fetch = sel.fetch.tolist()
    n_stored = len(layer._blocks)
    stored = [j for j in fetch if j < n_stored]
    hk, dk = layer._shape_k
    hv, dv = layer._shape_v
    bs, b, u = layer.block_size, layer._batch, len(fetch)
    kbuf = torch.empty((u, b, hk, bs, dk), dtype=layer.dtype, device=layer.device)
    vbuf = torch.empty((u, b, hv, bs, dv), dtype=layer.dtype, device=layer.device)
    return fetch, stored, kbuf, vbuf


def fetch_selected(state: "SparseLayerState", layer: "TieredKVLayer", sel: "BlockSelection",
                   query: torch.Tensor, stats: "SparseStats") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys and values of the blocks ``sel.fetch`` (ascending block indices; the last may be the tail
    block, which is not stored yet) as ``(k_pool, v_pool, slot_of_fetch)``: pools ``(N, B, H, block_size,
    D)`` (contiguous) and the ``(U,)`` int64 slot holding each block of ``sel.fetch``.  The pools stay
    valid until the next fetch of any layer of the same cache (the pipeline's layers share one persistent
    arena of slots, rewritten then).

    ``query`` (``(B, Hq, 1, D)``) is this layer's decode query, for stages that predict what later
    layers will need.  Counts blocks selected/resident, tail selections and bytes per tier into
    ``stats``.

    A layer of a :class:`~tiercache_llm.TieredKVCache` carries the cache's
    :class:`~.pipeline.DecodePipeline` (``layer.pipeline``), which does the work (its per-layer
    :class:`~.pool.ResidentPool`, staged entries, per-tier reads, layer-ahead prefetch); without one, every
    selected entry is read here in one synchronous batch into a fresh pool with identity slots."""
    pipeline = getattr(layer, "pipeline", None)
    if pipeline is not None:
        return pipeline.fetch(state, layer, sel, query, stats)
    fetch, stored, kbuf, vbuf = selected_buffers(layer, sel)
    bs = layer.block_size
    b = layer._batch
    hk, dk = layer._shape_k
    hv, dv = layer._shape_v
    u = len(fetch)
    if stored:
        kkeys = [layer._kkeys[j] for j in stored]
        vkeys = [layer._vkeys[j] for j in stored]
        tiers = layer.store.tiers_of(kkeys + vkeys)
        fastest = layer.store.fastest_tier
        ns = len(stored)
        resident = sum(1 for i in range(ns) if tiers[i] == fastest and tiers[ns + i] == fastest)
        outs_k, outs_v, posts = [], [], []
        for i, j in enumerate(stored):
            block = layer._blocks[j]
            if block.rows is None:
                outs_k.append(kbuf[i])
                outs_v.append(vbuf[i])
            else:
                tk = kbuf.new_empty((block.stored_batch, hk, bs, dk))
                tv = vbuf.new_empty((block.stored_batch, hv, bs, dv))
                outs_k.append(tk)
                outs_v.append(tv)
                posts.append((i, block, tk, tv))
        layer.store.get_blocks(kkeys + vkeys, out=outs_k + outs_v)
        for i, block, tk, tv in posts:
            kbuf[i].copy_(block.view(tk))
            vbuf[i].copy_(block.view(tv))
        for tier, out in zip(tiers, outs_k + outs_v):
            stats.bytes_fetched[str(tier)] = stats.bytes_fetched.get(str(tier), 0) + out.nbytes
        stats.blocks_selected += ns
        stats.blocks_resident += resident
    if len(stored) < u:  # the in-memory tail block (it already holds the new token; masked below)
        kbuf[len(stored)].copy_(layer._tail_k)
        vbuf[len(stored)].copy_(layer._tail_v)
        stats.tail_selected += 1
    return identity_pool(kbuf, vbuf)
