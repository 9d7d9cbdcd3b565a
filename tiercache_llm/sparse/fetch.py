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
    from ..blocks import BlockRef
    from ..kv_cache import TieredKVLayer
    from ..sparse_layer import SparseLayerState, SparseStats
    from ..store import BlockStore
    from .selection import BlockSelection


def layer_keys(layer: "TieredKVLayer", blocks: list[int]) -> list:
    """The entry keys of ``blocks``: their joint keys, or their K keys then their V keys."""
    if layer._joint:
        return [layer._kkeys[j] for j in blocks]
    return [layer._kkeys[j] for j in blocks] + [layer._vkeys[j] for j in blocks]


def read_entries(store: "BlockStore", keys: list, blocks: list["BlockRef"], dsts: list[torch.Tensor],
                 joint: bool, ranges: list | None = None) -> list[torch.Tensor]:
    """Read the entry ``keys[e]`` of ``blocks[e]`` into ``dsts[e]`` (one ``get_blocks`` call): in place, or for a
    block with a row map into a temporary of its stored rows, then viewed into ``dsts[e]`` (``joint``: a sparse
    layer's part-major joint entries ``(batch, heads, 2, ...)``).  Returns the tensors read into (their bytes are
    the bytes read, unless ``ranges``: per entry ``None`` (whole) or the byte ranges of it to read into ``dsts[e]``
    (contiguous), the rest of ``dsts[e]`` left as it was; a block with a row map is always read whole)."""
    outs, posts = [], []
    for e, (block, dst) in enumerate(zip(blocks, dsts)):
        if block.rows is None:
            outs.append(dst)
            continue
        shape = dst.shape
        tmp = dst.new_empty((block.stored_batch, *shape[1:]))  # rows first in either layout
        outs.append(tmp)
        posts.append((e, tmp))
    if ranges is not None and any(r is not None for r in ranges):
        store.get_blocks(keys, out=outs, ranges=[None if blocks[e].rows is not None else r
                                                 for e, r in enumerate(ranges)])
    else:
        store.get_blocks(keys, out=outs)
    for e, tmp in posts:
        dsts[e].copy_(blocks[e].view(tmp))
    return outs


def selected_buffers(layer: "TieredKVLayer", sel: "BlockSelection"
                     ) -> tuple[list[int], list[int], torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(fetch, stored, kbuf, vbuf, kvbuf)``: the selected block indices, those already stored (the rest is
    the tail block), and empty ``(U, B, H, block_size, D)`` K and V buffers for them; for a layer storing
    joint entries they are the halves ``kvbuf[:, :, :, 0]`` / ``kvbuf[:, :, :, 1]`` of one part-major
    ``(U, B, H, 2, block_size, D)`` storage ``kvbuf`` (a joint entry is read into ``kvbuf[u]`` whole), else
    ``kvbuf`` is ``None``."""
    fetch = sel.fetch.tolist()
    n_stored = len(layer._blocks)
    stored = [j for j in fetch if j < n_stored]
    hk, dk = layer._shape_k
    hv, dv = layer._shape_v
    bs, b, u = layer.block_size, layer._batch, len(fetch)
    if layer._joint:
        both = torch.empty((u, b, hk, 2, bs, dk), dtype=layer.dtype, device=layer.device)
        return fetch, stored, both[:, :, :, 0], both[:, :, :, 1], both
    kbuf = torch.empty((u, b, hk, bs, dk), dtype=layer.dtype, device=layer.device)
    vbuf = torch.empty((u, b, hv, bs, dv), dtype=layer.dtype, device=layer.device)
    return fetch, stored, kbuf, vbuf, None


def fetch_selected(state: "SparseLayerState", layer: "TieredKVLayer", sel: "BlockSelection",
                   query: torch.Tensor, stats: "SparseStats", defer: bool = False) -> tuple:
    """Keys and values of the blocks ``sel.fetch`` (ascending block indices; the last may be the tail
    block, which is not stored yet) as ``(k_pool, v_pool, slot_of_fetch)``: pools ``(N, B, H, block_size,
    D)`` (each slot contiguous; for a layer storing joint K/V entries, the two halves of one joint storage)
    and the ``(U,)`` int64 slot holding each block of ``sel.fetch``.  The pools stay
    valid until the next fetch of any layer of the same cache (the pipeline's layers share one persistent
    arena of slots, rewritten then).

    ``query`` (``(B, Hq, 1, D)``) is this layer's decode query, for stages that predict what later
    layers will need.  Counts blocks selected/resident, tail selections and bytes per tier (a joint entry's
    bytes are its K's and V's) into ``stats``.

    A layer of a :class:`~tiercache_llm.TieredKVCache` carries the cache's
    :class:`~.pipeline.DecodePipeline` (``layer.pipeline``), which does the work (its per-layer
    :class:`~.pool.ResidentPool`, staged entries, per-tier reads, layer-ahead prefetch); without one, every
    selected entry is read here in one synchronous batch into a fresh pool with identity slots.

    ``defer=True``: returns ``(k_pool, v_pool, slot_of_fetch, pending)``, ``pending`` a
    :class:`~.pipeline.PendingReads` when the pipeline left reads in flight (``overlap_sync_reads``; the
    caller attends the rest first and must call ``pending.wait()`` before reading the ``pending.late``
    blocks), else ``None``."""
    pipeline = getattr(layer, "pipeline", None)
    if pipeline is not None:
        return pipeline.fetch(state, layer, sel, query, stats, defer=defer)
    if defer:
        return (*fetch_selected(state, layer, sel, query, stats), None)
    fetch, stored, kbuf, vbuf, kvbuf = selected_buffers(layer, sel)
    joint = kvbuf is not None
    epb = 1 if joint else 2
    u = len(fetch)
    if stored:
        ns = len(stored)
        keys = layer_keys(layer, stored)
        tiers = layer.store.tiers_of(keys)
        fastest = layer.store.fastest_tier
        resident = sum(1 for i in range(ns) if all(tiers[r * ns + i] == fastest for r in range(epb)))
        # One target per entry: the joint slot kvbuf[i], or K into kbuf[i] then (after every K) V into vbuf[i].
        dsts = [kvbuf[i] for i in range(ns)] if joint else [kbuf[i] for i in range(ns)] + [vbuf[i] for i in range(ns)]
        outs = read_entries(layer.store, keys, [layer._blocks[j] for j in stored] * epb, dsts, joint)
        for tier, out in zip(tiers, outs):
            stats.bytes_fetched[str(tier)] = stats.bytes_fetched.get(str(tier), 0) + out.nbytes
        stats.blocks_selected += ns
        stats.blocks_resident += resident
    if len(stored) < u:  # the in-memory tail block (it already holds the new token; masked below)
        kbuf[len(stored)].copy_(layer._tail_k)
        vbuf[len(stored)].copy_(layer._tail_v)
        stats.tail_selected += 1
    return identity_pool(kbuf, vbuf)
