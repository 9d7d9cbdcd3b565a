"""Disk staging ahead's choice of blocks, for every sparse layer at once (the decode pipeline's end-of-step
work, :meth:`~.pipeline.DecodePipeline.near_misses` and ``stage_ahead``).

The end-of-step worker runs beside the next step's forward pass and shares the GIL with it: every torch
call it makes costs GIL-held argument parsing and dispatch, and per-layer Python loops hold the GIL
throughout.  So the layers' selections are stacked (layers of equal shape) and reduced with the per-layer
computation's operations over all of them at once, and ranked with one batched :func:`torch.topk`.

Contracts (each function returns what its per-layer definition returns for every layer, in order):

- :func:`near_misses_many` — per layer, what the per-layer computation returned: the same elementwise
  operations and minima on the same values, and ``torch.topk`` over each row of a 2-D tensor ranks a row
  as it ranks that row alone, ties included (``tests/tiercache_llm/sparse/test_stage_choice.py``).
- :func:`top_mass_many` — per layer, ``torch.topk(mass[:n], min(n, extra + len(held)))`` with the
  non-positive and held blocks dropped, highest first; one ``topk`` of the largest such ``k`` over the
  group's rows, each row cut to its own ``k``.  Identical when a row's masses are distinct; among
  exactly equal masses ``topk`` orders (and cuts) ties arbitrarily either way.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import NamedTuple

import numpy as np
import torch

from tiercache.batched import INTRA_OP_GRAIN


class LastSelection(NamedTuple):
    """What a layer's last selection left for its near misses: the page ``scores`` ``(B, H, P)``, the
    selected ``pages`` ``(B, H, P)`` bool, ``pages_per_block`` and the digests' valid-token ``count``
    ``(B, >= P)`` (a page without valid tokens is never a near miss)."""

    scores: torch.Tensor
    pages: torch.Tensor
    pages_per_block: int
    count: torch.Tensor


def _held_rows(helds: Sequence[Collection[int]], width: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, column) indices of every held block below ``width``, row ``i`` from ``helds[i]``."""
    cols = [np.fromiter(held, dtype=np.int64, count=len(held)) for held in helds]
    rows = [np.full(len(c), i, dtype=np.int64) for i, c in enumerate(cols)]
    col = np.concatenate(cols) if cols else np.empty(0, dtype=np.int64)
    row = np.concatenate(rows) if rows else np.empty(0, dtype=np.int64)
    keep = col < width
    return row[keep], col[keep]


def _groups(keys: Sequence[object]) -> list[list[int]]:
    """Positions of ``keys`` grouped by equal key, in first-appearance order (``None`` keys are left out)."""
    out: dict[object, list[int]] = {}
    for i, key in enumerate(keys):
        if key is not None:
            out.setdefault(key, []).append(i)
    return list(out.values())


GRAIN = INTRA_OP_GRAIN  # an operation on fewer elements runs on the calling thread


def _chunk(layers: int, per_layer: int) -> int:
    """Layers stacked per operation: all at one torch thread; with intra-op threads, as many as stay below
    :data:`GRAIN` (stacked tensors above it would start intra-op threads beside the forward pass's, which
    cost far more than they save on a loaded machine: 41-61 ms vs 6 ms per step measured at 2 threads)."""
    if torch.get_num_threads() <= 1:
        return max(1, layers)
    return max(1, (GRAIN - 1) // max(1, per_layer))


def block_gaps(sels: Sequence[LastSelection], n: int) -> torch.Tensor:
    """``(L, min(n, blocks))`` float32: per layer of ``sels`` (all of one shape and ``pages_per_block``)
    and stored block, its gap to the layer's cut (:meth:`~.pipeline.DecodePipeline.near_misses`): per row
    and KV head, the score of the head's lowest selected page minus the page's own, the least over the
    block's unselected valid pages, rows and heads; ``inf`` for a block without such a page.  The per-layer
    computation's operations with the layers stacked in front (:func:`_chunk` layers at a time)."""
    step = _chunk(len(sels), sels[0].scores.numel())
    if len(sels) > step:
        return torch.cat([block_gaps(sels[lo : lo + step], n) for lo in range(0, len(sels), step)])
    inf = float("inf")
    ppb = sels[0].pages_per_block
    scores = torch.stack([sel.scores for sel in sels]).float()  # (L, B, H, P)
    length, b, h, p = scores.shape
    pages = torch.stack([sel.pages for sel in sels])
    empty = torch.stack([sel.count[:, :p] for sel in sels]).le(0).unsqueeze(2)  # (L, B, 1, P)
    s = torch.nan_to_num(scores, nan=-inf)
    threshold = s.masked_fill(~pages, inf).amin(-1, keepdim=True)
    gap = torch.nan_to_num(threshold - s, nan=inf).masked_fill_(pages | empty, inf)
    nb = -(-p // ppb)
    if nb * ppb != p:
        gap = torch.nn.functional.pad(gap, (0, nb * ppb - p), value=inf)
    return gap.reshape(length, b * h, nb, ppb).amin(dim=-1).amin(dim=1)[:, :n]


def near_parts(sel: LastSelection, extra: float) -> torch.Tensor:
    """``(B, H, ceil(P / pages_per_block))`` bool: per row and KV head of ``sel``, the blocks holding one of its
    ``ceil(extra x pages it selected)`` unselected valid pages scored highest (the (row, KV head) parts about to
    cross its cut; pages tied with the last of them included); no block for a (row, head) that selected nothing or
    ``extra <= 0``.  Selected pages are not counted: the caller adds the selection's own parts."""
    scores = sel.scores.float()
    b, h, p = scores.shape
    ppb = sel.pages_per_block
    nb = -(-p // ppb)
    if extra <= 0 or p == 0:
        return torch.zeros((b, h, nb), dtype=torch.bool, device=scores.device)
    inf = float("inf")
    pages = sel.pages
    empty = sel.count[:, :p].le(0).unsqueeze(1)  # (B, 1, P): no valid token, never a candidate
    cand = torch.nan_to_num(scores, nan=-inf).masked_fill_(pages | empty, -inf)
    each = torch.ceil(pages.sum(-1, dtype=torch.float32) * float(extra)).long().clamp_(max=p)  # (B, H)
    top = int(each.max())
    if top == 0:
        return torch.zeros((b, h, nb), dtype=torch.bool, device=scores.device)
    values = torch.topk(cand, top, dim=-1, sorted=True).values  # (B, H, top), highest first
    cut = values.gather(-1, (each - 1).clamp_(min=0).unsqueeze(-1))  # each (row, head)'s own k-th highest
    near = cand.ge(cut) & cand.gt(-inf) & each.gt(0).unsqueeze(-1)
    if nb * ppb != p:
        near = torch.nn.functional.pad(near, (0, nb * ppb - p), value=False)
    return near.view(b, h, nb, ppb).any(-1)


def near_misses_many(sels: Sequence[LastSelection | None], ns: Sequence[int], helds: Sequence[Collection[int]],
                     count: int) -> list[list[int]]:
    """Per layer ``i``: up to ``count`` of its ``ns[i]`` stored blocks outside ``helds[i]`` closest to its
    last selection's cut (:func:`block_gaps`), closest first, blocks of infinite gap left out; empty when
    ``sels[i]`` is ``None``, ``ns[i] == 0`` or ``count <= 0``.  Layers of equal shapes are stacked."""
    out: list[list[int]] = [[] for _ in sels]
    if count <= 0:
        return out
    keys = [None if sel is None or n <= 0 else (tuple(sel.scores.shape), sel.pages_per_block, n)
            for sel, n in zip(sels, ns)]
    for group in _groups(keys):
        gaps = block_gaps([sels[i] for i in group], ns[group[0]]).cpu()  # a fresh tensor: written below
        row, col = _held_rows([helds[i] for i in group], gaps.shape[1])
        if len(row):
            gaps[torch.from_numpy(row), torch.from_numpy(col)] = float("inf")
        values, indices = torch.topk(gaps, min(count, gaps.shape[1]), dim=-1, largest=False, sorted=True)
        inf = float("inf")
        for i, js, gs in zip(group, indices.tolist(), values.tolist()):
            out[i] = [j for j, g in zip(js, gs) if g != inf]
    return out


def top_mass_many(masses: Sequence[torch.Tensor], ns: Sequence[int], helds: Sequence[Collection[int]],
                  extra: int) -> list[list[int]]:
    """Per layer ``i``: its blocks among the ``min(ns[i], extra + len(helds[i]))`` highest of
    ``masses[i][:ns[i]]`` whose mass is positive and that are outside ``helds[i]``, highest first (the
    candidates of disk staging ahead's high-mass rule; see the module doc for ties).  Layers of equal
    ``ns[i]`` and dtype are ranked in one ``topk``."""
    out: list[list[int]] = [[] for _ in masses]
    keys = [None if n <= 0 else (n, m.dtype, m.device) for m, n in zip(masses, ns)]
    for group in _groups(keys):
        n = ns[group[0]]
        ks = [min(n, extra + len(helds[i])) for i in group]
        stacked = torch.stack([masses[i][:n] for i in group])
        values, indices = torch.topk(stacked, max(ks), dim=-1)
        for i, k, js, ms in zip(group, ks, indices.tolist(), values.tolist()):
            held = helds[i]
            out[i] = [j for j, m in zip(js[:k], ms[:k]) if m > 0 and j not in held]
    return out
