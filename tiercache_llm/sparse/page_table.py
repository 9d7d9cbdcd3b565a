"""Decode attention over a *page table*: each (row, KV head) attends exactly its own selected pages,
read from a pool of fetched blocks, so the work is the budget, not the union of every head's blocks.

The pool is what the fetch stage fills: ``k_pool`` / ``v_pool`` ``(N, B, H, S, D)``, one slot per
fetched storage block (``S`` tokens, every row and KV head of the block, as one tiercache entry holds
them).  A selection page is ``page`` consecutive tokens of a block (``S % page == 0``).  The table names,
per (row ``b``, KV head ``h``), ``M`` entries ``(slot, page)``; entry ``m`` contributes the tokens
``k_pool[slot, b, h, page * P : (page + 1) * P]`` where ``valid[b, h, m]`` is ``True``.  Rows/heads with
fewer pages than ``M`` pad with any in-range ``(slot, page)`` and all-``False`` validity.

Contract of :func:`page_table_attention` (the torch path here; a Triton kernel may implement the same
contract on CUDA): exactly dense softmax attention over the attended tokens plus the new tokens (causal
among themselves), in float32; hidden tokens may hold any bytes (NaN included) and never reach the
output; a (row, head) with nothing to attend and no new tokens gets zeros.  Also returns the softmax
mass per table entry (the signal of attention-aware placement).

Shapes: ``Hq = G * H`` query heads (query head ``q`` reads KV head ``q // G``), ``Q`` query positions.

Thread safety: pure functions of their arguments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .attention import SparseAttentionOutput, _new_token_scores

if TYPE_CHECKING:  # pragma: no cover
    from .selection import BlockSelection

__all__ = ["PageTable", "build_page_table", "page_table_attention", "entry_mass_to_blocks"]


@dataclass(frozen=True)
class PageTable:
    """Which pages of the pool each (row, KV head) attends.

    Attributes:
        slots: ``(B, H, M)`` int64 pool slot of each entry.
        pages: ``(B, H, M)`` int64 page of the slot's block (``0 <= page < S // page_size``).
        valid: ``(B, H, M, page_size)`` bool, the entry's tokens attended (padding entries all ``False``).
        fetch_pos: ``(B, H, M)`` int64 position of the entry's block in the selection's ``fetch`` order
            (``u``), for folding entry masses back onto blocks.
        page_size: tokens per page.
    """

    slots: torch.Tensor
    pages: torch.Tensor
    valid: torch.Tensor
    fetch_pos: torch.Tensor
    page_size: int


def build_page_table(sel: "BlockSelection", slot_of_fetch: torch.Tensor, token_ok: torch.Tensor,
                     block_size: int) -> PageTable:
    """The page table of a selection.

    Args:
        sel: the layer's selection (pages per KV head; ``sel.fetch`` the union of blocks).
        slot_of_fetch: ``(U,)`` int64 pool slot holding block ``sel.fetch[u]``.
        token_ok: ``(B, U, block_size)`` bool, tokens of the fetched blocks that exist and are not padding
            (in ``sel.fetch`` order).
        block_size: tokens per storage block (``S``).
    """
    k = sel.pages_per_block
    page_size = block_size // k
    pm = sel.pages  # (B, H, P) pages (or blocks when k == 1)
    b, h, p = pm.shape
    dev = pm.device
    counts = pm.sum(dim=-1)
    m = max(1, int(counts.max())) if counts.numel() else 1
    order = torch.argsort((~pm).to(torch.int8), dim=-1, stable=True)[..., :m]  # selected pages first, ascending
    if order.shape[-1] < m:
        order = torch.nn.functional.pad(order, (0, m - order.shape[-1]))
    used = torch.arange(m, device=dev) < counts.unsqueeze(-1)  # (B, H, M)
    block = torch.div(order, k, rounding_mode="floor")
    page = order - block * k
    n_blocks = int(sel.head_mask.shape[-1])
    fetch = sel.fetch.to(dev)
    u_of_block = torch.zeros(max(n_blocks, 1), dtype=torch.long, device=dev)
    u_of_block[fetch] = torch.arange(fetch.numel(), device=dev)
    fetch_pos = torch.where(used, u_of_block[block.clamp(max=max(n_blocks - 1, 0))], 0)
    slots = slot_of_fetch.to(dev)[fetch_pos] if fetch.numel() else torch.zeros_like(fetch_pos)
    page = torch.where(used, page, 0)
    # Token validity of each entry: (B, U, S) -> (B, U, k, page_size) gathered at (fetch_pos, page).
    ok = token_ok.view(b, -1, k, page_size) if fetch.numel() else torch.zeros(b, 1, k, page_size, dtype=torch.bool, device=dev)
    rows = torch.arange(b, device=dev).view(b, 1, 1)
    valid = ok[rows, fetch_pos, page] & used.unsqueeze(-1)
    return PageTable(slots, page, valid, fetch_pos, page_size)


def page_table_attention(query: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, table: PageTable,
                         new_keys: torch.Tensor | None = None, new_values: torch.Tensor | None = None, *,
                         scale: float | None = None) -> SparseAttentionOutput:
    """Attention of ``query`` ``(B, Hq, Q, D)`` over ``table``'s pages of the pool and the new tokens
    ``(B, H, Q, D)``.  Returns :class:`~.attention.SparseAttentionOutput` whose ``block_mass`` is
    ``(B, Hq, M)``: the mass of each *table entry* (fold it onto blocks with
    :func:`entry_mass_to_blocks`).

    Torch path: one gather of the attended pages per (row, head) (``B * H * M * page_size * D`` elements
    for K and for V), then one score and one value matmul per (row, KV head) over all of them."""
    b, hq, q, d = query.shape
    n, bp, h, s, dp = k_pool.shape
    ps = table.page_size
    if bp != b or dp != d or hq % h or s % ps or v_pool.shape != k_pool.shape:
        raise ValueError(f"query {tuple(query.shape)} does not match the pools {tuple(k_pool.shape)}, {tuple(v_pool.shape)}")
    m = table.slots.shape[-1]
    if tuple(table.slots.shape) != (b, h, m) or tuple(table.valid.shape) != (b, h, m, ps):
        raise ValueError(f"page table {tuple(table.slots.shape)} / {tuple(table.valid.shape)} does not match "
                         f"B={b}, H={h}, page_size={ps}")
    g = hq // h
    gq = g * q
    scale = d ** -0.5 if scale is None else float(scale)
    dev = query.device
    keys = _gather_pages(k_pool, table, ps).view(b, h, m * ps, d)  # gathered copies
    values = _gather_pages(v_pool, table, ps).view(b, h, m * ps, d)
    valid = table.valid.reshape(b, h, 1, m * ps)
    if keys.dtype != torch.float32:
        keys, values = keys.float(), values.float()
    values = values.masked_fill_(~valid.view(b, h, m * ps, 1), 0.0)  # hidden values may be NaN
    qf = query.float().reshape(b, h, gq, d) * scale
    ctx = (qf @ keys.transpose(-1, -2)).masked_fill_(~valid, float("-inf"))  # (B, H, G*Q, M*ps)
    top = ctx.amax(dim=-1) if m * ps else torch.full((b, h, gq), float("-inf"), device=dev)
    new = None
    if new_keys is not None:
        new = _new_token_scores(qf, new_keys, g)
        top = torch.maximum(top, new.amax(dim=-1))
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    ctx.sub_(top.unsqueeze(-1)).exp_()
    total = ctx.sum(dim=-1)
    if new is not None:
        new = torch.exp(new - top.unsqueeze(-1))
        total = total + new.sum(dim=-1)
    inv = 1.0 / total.clamp_min(torch.finfo(torch.float32).tiny)
    ctx.mul_(inv.unsqueeze(-1))
    out = ctx @ values  # (B, H, G*Q, D)
    if new is not None:
        p_new = new * inv.unsqueeze(-1)
        out = out.view(b, h, g, q, d) + p_new.view(b, h, g, q, q) @ new_values.float().unsqueeze(2)
        new_mass = p_new.sum(-1).view(b, h, g, q).mean(-1).reshape(b, hq)
    else:
        new_mass = torch.zeros(b, hq, device=dev)
    mass = ctx.view(b, h, g, q, m, ps).sum(-1).mean(3).reshape(b, hq, m)
    output = out.reshape(b, h, g, q, d).reshape(b, hq, q, d).to(query.dtype)
    return SparseAttentionOutput(output, mass, new_mass)


def _gather_pages(pool: torch.Tensor, table: PageTable, ps: int) -> torch.Tensor:
    """``(B, H, M, ps, D)`` copy of the table's pages: one ``index_select`` over the contiguous pool's
    ``(slot, row, head, page)`` rows (a plain memcpy per page), advanced indexing otherwise."""
    n, b, h, s, d = pool.shape
    k = s // ps
    m = table.slots.shape[-1]
    dev = pool.device
    rows = torch.arange(b, device=dev).view(b, 1, 1)
    heads = torch.arange(h, device=dev).view(1, h, 1)
    if pool.is_contiguous():
        flat = ((table.slots * b + rows) * h + heads) * k + table.pages
        return pool.view(n * b * h * k, ps * d).index_select(0, flat.view(-1)).view(b, h, m, ps, d)
    return pool.unflatten(3, (k, ps))[table.slots, rows, heads, table.pages]


def entry_mass_to_blocks(entry_mass: torch.Tensor, table: PageTable, n_fetch: int) -> torch.Tensor:
    """``(B, Hq, U)``: per-entry masses ``(B, Hq, M)`` summed onto the blocks of the selection's ``fetch``
    order (what :class:`~.attention.SparseAttentionOutput` carries for a block-form attention)."""
    b, hq, m = entry_mass.shape
    h = table.fetch_pos.shape[1]
    pos = table.fetch_pos.repeat_interleave(hq // h, dim=1)
    out = torch.zeros(b, hq, n_fetch, dtype=entry_mass.dtype, device=entry_mass.device)
    return out.scatter_add_(2, pos, entry_mass)
