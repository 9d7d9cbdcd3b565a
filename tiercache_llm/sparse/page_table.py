"""Decode attention over a *page table*: each (row, KV head) attends exactly its own selected pages,
read from a pool of fetched blocks, so the work is the budget, not the union of every head's blocks.

The pool is what the fetch stage fills: ``k_pool`` / ``v_pool`` ``(N, B, H, S, D)``, one slot per
fetched storage block (``S`` tokens, every row and KV head of the block, as one tiercache entry holds
them).  A selection page is ``page`` consecutive tokens of a block (``S % page == 0``).  The table names,
per (row ``b``, KV head ``h``), ``M`` entries ``(slot, page)``; entry ``m`` contributes the tokens
``k_pool[slot, b, h, page * P : (page + 1) * P]`` where ``valid[b, h, m]`` is ``True``.  Rows/heads with
fewer pages than ``M`` pad with any in-range ``(slot, page)`` (slot 0 when the pool is empty) and
all-``False`` validity.

Contract of :func:`page_table_attention` (two implementations: the torch path here, and the Triton
kernel ``tiercache_kernels.page_attention`` that reads the pages in place, the default on CUDA): exactly dense softmax attention over the attended tokens plus the new tokens (causal
among themselves), in float32; hidden tokens may hold any bytes (NaN included) and never reach the
output; a (row, head) with nothing to attend and no new tokens gets zeros.  Also returns the softmax
mass per table entry (the signal of attention-aware placement).

Shapes: ``Hq = G * H`` query heads (query head ``q`` reads KV head ``q // G``), ``Q`` query positions.

Thread safety: pure functions of their arguments (the CPU path's scratch buffers are per thread).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .attention import SparseAttentionOutput, _new_token_scores, add_new_tokens, merge_with_new_tokens

if TYPE_CHECKING:  # pragma: no cover
    from .selection import BlockSelection

__all__ = ["PageTable", "attend_pages_cpu", "build_page_table", "build_page_table_from_valid", "page_table_attention", "entry_mass_to_blocks",
           "split_page_table", "merge_attention"]


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
        counts: ``(B, H)`` int64 used entries per (row, KV head) (the first ``counts`` entries; the rest
            are padding and must have all-``False`` validity), or ``None``: then every entry may be used.
            The Triton kernel skips the padding with it; the torch path reads only ``valid``.
    """

    slots: torch.Tensor
    pages: torch.Tensor
    valid: torch.Tensor
    fetch_pos: torch.Tensor
    page_size: int
    counts: torch.Tensor | None = None


def build_page_table(sel: "BlockSelection", slot_of_fetch: torch.Tensor, token_ok: torch.Tensor,
                     block_size: int) -> PageTable:
    """The page table of a selection.

    Args:
        sel: the layer's selection (pages per KV head; ``sel.fetch`` the union of blocks).
        slot_of_fetch: ``(U,)`` int64 pool slot holding block ``sel.fetch[u]``.
        token_ok: ``(B, U, block_size)`` bool, tokens of the fetched blocks that exist and are not padding
            (in ``sel.fetch`` order).
        block_size: tokens per storage block (``S``).

    :func:`build_page_table_from_valid` builds the same table from the per-token validity of the
    context (what decode holds), without the ``(B, U, block_size)`` detour."""
    b, u = _check_table_args(sel, slot_of_fetch, block_size)
    if tuple(token_ok.shape) != (b, u, block_size):
        raise ValueError(f"token_ok must be (B, U, block_size) = {(b, u, block_size)}, got {tuple(token_ok.shape)}")
    k = sel.pages_per_block
    page_size = block_size // k
    order, used, counts, fetch_pos, page, slots = _table_entries(sel, slot_of_fetch)
    b, h, m = order.shape
    dev = order.device
    if u:
        # Token validity of each entry: rows (b, u, page) of token_ok viewed as (B * U * k, page_size).
        flat = (torch.arange(b, device=dev).view(b, 1, 1) * u + fetch_pos) * k + page
        valid = token_ok.reshape(b * u * k, page_size).index_select(0, flat.view(-1)).view(b, h, m, page_size)
        valid &= used.unsqueeze(-1)
    else:
        valid = torch.zeros(b, h, m, page_size, dtype=torch.bool, device=dev)
    return PageTable(slots, page, valid, fetch_pos, page_size, counts)


def build_page_table_from_valid(sel: "BlockSelection", slot_of_fetch: torch.Tensor, valid: torch.Tensor, ctx: int,
                                block_size: int) -> PageTable:
    """:func:`build_page_table` with the token validity given as the context's: ``valid`` ``(B, >= ctx)``
    bool (``False`` = padding), ``ctx`` the context's length (tokens at or past it are never attended).
    The same table as ``build_page_table(sel, slot_of_fetch, token_ok, block_size)`` with
    ``token_ok[b, u, i] = valid[b, sel.fetch[u] * block_size + i]`` for positions below ``ctx`` (else
    ``False``), computed with one gather of the entries' token rows."""
    b, u = _check_table_args(sel, slot_of_fetch, block_size)
    if valid.dim() != 2 or valid.shape[0] != b or valid.dtype != torch.bool or valid.shape[1] < ctx or ctx < 0:
        raise ValueError(f"valid must be (B, >= ctx) = ({b}, >= {ctx}) bool, got {valid.dtype} {tuple(valid.shape)}")
    page_size = block_size // sel.pages_per_block
    order, used, counts, fetch_pos, page, slots = _table_entries(sel, slot_of_fetch)
    b, h, m = order.shape
    p = int(sel.pages.shape[-1])
    dev = order.device
    if not u or not p:
        return PageTable(slots, page, torch.zeros(b, h, m, page_size, dtype=torch.bool, device=dev), fetch_pos,
                         page_size, counts)
    # Entry e of (row, head) is global page order[e] = tokens order[e] * page_size + [0, page_size): one row of
    # the context's validity viewed as (B * P, page_size), positions at or past ctx made False.
    # Padding entries read an extra all-False page row (b * p) instead of being masked afterwards (a
    # broadcast AND over (B, H, M, page) costs ~25 us per layer at 8K x batch 4 x 25 %).
    span = p * page_size
    tok = torch.empty(b * span + page_size, dtype=torch.bool, device=dev)
    tok[b * span :] = False
    rows = tok[: b * span].view(b, span)
    keep = min(ctx, span)
    rows[:, :keep] = valid[:, :keep]
    if keep < span:
        rows[:, keep:] = False
    flat = (torch.arange(0, b * p, p, device=dev).view(b, 1, 1) + order).masked_fill_(~used, b * p)
    entry_valid = tok.view(b * p + 1, page_size).index_select(0, flat.view(-1)).view(b, h, m, page_size)
    return PageTable(slots, page, entry_valid, fetch_pos, page_size, counts)


def _check_table_args(sel: "BlockSelection", slot_of_fetch: torch.Tensor, block_size: int) -> tuple[int, int]:
    k = sel.pages_per_block
    if block_size <= 0 or block_size % k:
        raise ValueError(f"block_size ({block_size}) must be a positive multiple of the selection's "
                         f"pages_per_block ({k})")
    u = int(sel.fetch.numel())
    if tuple(slot_of_fetch.shape) != (u,):
        raise ValueError(f"slot_of_fetch must be ({u},) (one slot per fetched block), got {tuple(slot_of_fetch.shape)}")
    return int(sel.pages.shape[0]), u


def _to_front(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(order, used, counts)`` of a ``(B, H, N)`` bool mask: ``order`` ``(B, H, M)`` the indices of each (row,
    head)'s ``True`` positions moved to the front in order (padding: index 0, in range), ``used`` ``(B, H, M)``
    which are real, ``counts`` ``(B, H)``; ``M`` is the largest count (at least 1).  Each kept position is
    scattered to column rank (a cumsum), the others to a dump column 0: cheaper than a sort."""
    b, h, n = keep.shape
    dev = keep.device
    rank = keep.cumsum(dim=-1)
    counts = rank[..., -1].clone() if n else torch.zeros(b, h, dtype=torch.long, device=dev)
    m = max(1, int(counts.max())) if counts.numel() else 1
    order = torch.zeros(b, h, m + 1, dtype=torch.long, device=dev)
    if n:
        order.scatter_(2, rank.mul_(keep), torch.arange(n, device=dev).expand(b, h, n))
    used = torch.arange(m, device=dev) < counts.unsqueeze(-1)
    return order[..., 1:], used, counts


def _table_entries(sel: "BlockSelection", slot_of_fetch: torch.Tensor):
    """``(order, used, counts, fetch_pos, page, slots)`` of the table: ``order`` ``(B, H, M)`` the global page
    of each entry (padding: page 0), ``used`` its mask, ``counts`` ``(B, H)``, the entries' positions in
    ``sel.fetch``, pages within their block and pool slots (padding: fetch position 0, page 0)."""
    k = sel.pages_per_block
    pm = sel.pages  # (B, H, P) pages (or blocks when k == 1)
    dev = pm.device
    u = int(sel.fetch.numel())
    order, used, counts = _to_front(pm)  # entry e of (row, head) is its e-th selected page; padding: page 0
    if k & (k - 1) == 0:  # a power of two (the cache's pages): shifts, ~10 us cheaper each than int64 div / rem
        block = order >> (k.bit_length() - 1)
        page = order & (k - 1)
    else:
        block = torch.div(order, k, rounding_mode="floor")
        page = order.remainder(k)
    n_blocks = int(sel.head_mask.shape[-1])
    # sel.fetch is ascending: block 0, when fetched, is u = 0, so padding entries (block 0) map to u = 0.
    u_of_block = torch.zeros(max(n_blocks, 1), dtype=torch.long, device=dev)
    u_of_block[sel.fetch.to(dev)] = torch.arange(u, device=dev)
    fetch_pos = u_of_block[block]  # every selected page's block is fetched (the selection's contract)
    slots = slot_of_fetch.to(dev)[fetch_pos] if u else torch.zeros_like(fetch_pos)
    return order, used, counts, fetch_pos, page, slots


def page_table_attention(query: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, table: PageTable,
                         new_keys: torch.Tensor | None = None, new_values: torch.Tensor | None = None, *,
                         scale: float | None = None, backend: str = "auto",
                         num_splits: int | None = None, mass: bool = True, lse: bool = False) -> SparseAttentionOutput:
    """Attention of ``query`` ``(B, Hq, Q, D)`` over ``table``'s pages of the pool and the new tokens
    ``(B, H, Q, D)``.  Returns :class:`~.attention.SparseAttentionOutput` whose ``block_mass`` is
    ``(B, Hq, M)``: the mass of each *table entry* (fold it onto blocks with
    :func:`entry_mass_to_blocks`).

    ``backend``: ``"torch"`` (below), ``"triton"`` (``tiercache_kernels.page_attention``: the pages read in
    place; compiled on CUDA, interpreted on CPU under ``TRITON_INTERPRET=1``), or ``"auto"`` (compiled
    Triton for CUDA tensors where it is usable, torch otherwise).  ``num_splits``: Triton only, programs
    per (row, KV head) (default: enough to fill the GPU).  ``mass=False``: the caller does not read
    ``block_mass`` (strategies without attention-aware placement); the torch path then skips the
    per-entry sums and returns zeros there (the output and ``new_mass`` are the same bits either way).
    ``lse=True`` (torch backend only): also return the per-(row, query head, position) log-sum-exp of the
    scaled scores (``SparseAttentionOutput.lse``; ``-inf`` where nothing is attended), so attentions over
    disjoint parts of a table merge exactly (:func:`split_page_table`, :func:`merge_attention`).

    Torch path on CPU with one intra-op thread (contiguous pools, autograd not recording; what decode
    runs there in the benchmarks): chunk by chunk
    over (row, KV head)s, a gather of the chunk's used pages (``index_select`` of page rows) and one
    matmul with its query rows, so the gathered pages are read while they are in cache; one softmax over
    context and new tokens; the values summed by one weighted ``embedding_bag`` read in place from the pool
    (:data:`VALUES_BY_BAG`, the default; float32 pools), else gathered and multiplied chunk by chunk (see
    :func:`_page_table_attention_cpu`).  Elsewhere
    (several torch threads, CUDA without Triton, inputs that require grad, pools whose slots are not
    contiguous blocks at a common stride, :func:`_page_rows`): one gather of
    every table entry per
    (row, head) (``B * H * M * page_size * D`` elements for K and for V), then one score and one value
    matmul per (row, KV head) over all of them."""
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    b, hq, q, d, h, m = check_page_table_args(query, k_pool, v_pool, table, new_keys, new_values)
    if backend == "auto":
        backend = "torch"
        if query.is_cuda:
            from tiercache_kernels.triton_support import compiled_triton_usable

            backend = "triton" if compiled_triton_usable(query.device) else "torch"
    if backend == "triton":
        if lse:
            raise ValueError("page_table_attention(lse=True) runs on the torch backend only")
        return _page_table_attention_triton(query, k_pool, v_pool, table, new_keys, new_values, scale=scale,
                                            num_splits=num_splits)
    ps = table.page_size
    g = hq // h
    gq = g * q
    t = m * ps
    scale = d ** -0.5 if scale is None else float(scale)
    dev = query.device
    # Scratch buffers (and out= ops) only where autograd is not recording: out= refuses inputs that
    # require grad (a plain forward of the model outside no_grad).
    grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad
                                           for x in (query, k_pool, v_pool, new_keys, new_values))
    # The chunked path runs many small ops: with several intra-op threads each one is a parallel region,
    # and with the cores shared each region waits for its slowest thread (measured on the loaded 2-core
    # machine: 2x slower than the batched path below at 2 threads, 1.3-1.6x faster at 1).
    if dev.type == "cpu" and not grad and torch.get_num_threads() == 1 and k_pool.shape[0] \
            and k_pool.dtype == v_pool.dtype:
        krows, vrows = _page_rows(k_pool, ps), _page_rows(v_pool, ps)
        if krows is not None and vrows is not None and krows[1:] == vrows[1:]:
            return _page_table_attention_cpu(query, k_pool, v_pool, table, new_keys, new_values, scale, mass,
                                             rows=(krows[0], vrows[0], krows[1], krows[2]), want_lse=lse)
    keys = _gather_pages(k_pool, table, ps, None if grad else "k").view(b, h, t, d)  # float32 copies
    values = _gather_pages(v_pool, table, ps, None if grad else "v").view(b, h, t, d)
    hidden = ~table.valid.reshape(b, h, 1, t)
    # Hidden values may be NaN (0 * NaN = NaN in p @ v): zero them.  On CPU only the hidden rows are
    # written (padding entries, left padding, the partial tail: a small part of the table).
    if dev.type == "cpu":
        rows = hidden.view(-1).nonzero().squeeze(1)
        if rows.numel():
            values.view(-1, d).index_fill_(0, rows, 0.0)
    else:
        values.masked_fill_(hidden.view(b, h, t, 1), 0.0)
    qf = query.float().reshape(b, h, gq, d) * scale
    if grad:
        ctx = qf @ keys.transpose(-1, -2)
    else:
        ctx = torch.matmul(qf, keys.transpose(-1, -2), out=_scratch("s", (b, h, gq, t), dev))
    ctx.masked_fill_(hidden, float("-inf"))  # (B, H, G*Q, M*ps)
    top = ctx.amax(dim=-1) if t else torch.full((b, h, gq), float("-inf"), device=dev)
    new = None
    if new_keys is not None:
        new = _new_token_scores(qf, new_keys, g)
        top = torch.maximum(top, new.amax(dim=-1))
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    if grad:  # out of place: exp's backward needs its output unmodified
        ctx = torch.exp(ctx - top.unsqueeze(-1))
    else:
        ctx.sub_(top.unsqueeze(-1)).exp_()
    total = ctx.sum(dim=-1)
    if new is not None:
        new = torch.exp(new - top.unsqueeze(-1))
        total = total + new.sum(dim=-1)
    log_se = (top + total.log()).view(b, hq, q) if lse else None  # total 0 (nothing attended): -inf
    inv = 1.0 / total.clamp_min(torch.finfo(torch.float32).tiny)
    ctx = ctx * inv.unsqueeze(-1) if grad else ctx.mul_(inv.unsqueeze(-1))
    out, new_mass = add_new_tokens(ctx @ values, new, inv, new_values, g)  # ctx @ values: fresh (never scratch)
    entry_mass = ctx.view(b, h, g, q, m, ps).sum(-1).mean(3).reshape(b, hq, m) if mass else ctx.new_zeros(b, hq, m)
    output = out.reshape(b, h, g, q, d).reshape(b, hq, q, d).to(query.dtype)
    return SparseAttentionOutput(output, entry_mass, new_mass, log_se)


# Bytes of gathered K (or V) per chunk of the CPU path: small enough to stay in a core's L2 between the
# gather and the matmul that reads it (measured: per-(row, head) chunks of ~0.5 MiB at 8K x batch 4 x 25 %
# took the four gathers + matmuls from 3.2-3.6 to 2.1 ms per call against whole-table buffers).
_CHUNK_BYTES = 1 << 19


def _page_rows(pool: torch.Tensor, ps: int) -> tuple[torch.Tensor, int, int] | None:
    """``(rows, slot_rows, part_rows)``: ``pool`` ``(N, B, H, S, D)`` viewed as page rows ``(R, ps * D)`` of its
    storage, the page ``p`` of (slot ``n``, row ``b``, head ``h``) at row ``n * slot_rows + (b * H + h) *
    part_rows + p``; or ``None`` when its layout has no such view (a (row, head) part that is not one contiguous
    run of tokens, heads and rows not at one common stride, or a slot or part stride that is not a whole number
    of page rows).  A contiguous pool has ``part_rows = S // ps`` and ``slot_rows = B * H * S // ps``; the halves
    ``kv[:, :, :, 0]`` / ``kv[:, :, :, 1]`` of a part-major joint pool storage ``kv`` ``(N, B, H, 2, S, D)`` twice
    those."""
    n, b, h, s, d = pool.shape
    row = ps * d
    if n == 0 or b * h * s * d == 0 or s % ps:
        return None
    hs = pool.stride(2) if h > 1 else (pool.stride(1) if b > 1 else s * d)  # one (row, head) part to the next
    if hs % row or hs < s * d:
        return None
    expect = (h * hs, hs, d, 1)
    if any(size > 1 and stride != e for size, stride, e in zip(pool.shape[1:], pool.stride()[1:], expect)):
        return None
    inner = (b * h - 1) * hs + s * d  # elements from a slot's first to past its last token
    step = pool.stride(0) if n > 1 else b * h * hs
    if step % row or step < inner:
        return None
    slot_rows = step // row
    return pool.as_strided(((n - 1) * slot_rows + -(-inner // row), row), (row, 1)), slot_rows, hs // row


def _page_table_attention_cpu(query: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, table: PageTable,
                              new_keys: torch.Tensor | None, new_values: torch.Tensor | None,
                              scale: float, want_mass: bool = True,
                              rows: tuple[torch.Tensor, torch.Tensor, int, int] | None = None,
                              want_lse: bool = False) -> SparseAttentionOutput:
    """The torch path on CPU (autograd not recording; pools whose page rows :func:`_page_rows` views, given as
    ``rows`` = ``(k rows, v rows, slot_rows, part_rows)`` or computed here): the same result as the batched
    path below, computed chunk by chunk over (row, KV head)s so each gathered chunk is read by its matmul
    while it is still in cache, and only the used entries of a chunk are gathered (padding entries beyond
    the chunk's largest count never are).

    1. per chunk: gather the used pages' keys (one ``index_select`` of page rows into a scratch buffer
       that stays in cache), one ``bmm`` with the group's query rows (GQA: the ``G * Q`` query rows of a
       KV head are the matmul's rows; no repeat) into the scores ``(B * H, G * Q, M * page + Q)``;
    2. the new tokens' scores in the last ``Q`` columns, hidden tokens ``-inf`` (a ``0 / -inf`` bias row added
       per (row, head); only if that left a NaN, i.e. a hidden score was NaN or ``+inf``, masked exactly and
       steps 2-3 redone), one softmax over the row (float32): the weights, the entry masses (sums over each
       entry's tokens) and the new tokens' mass all come from it;
    3. float32 pools with :data:`VALUES_BY_BAG` (the default): the attended tokens' values summed in place by one
       weighted ``embedding_bag`` (:func:`_bag_values`), hidden tokens left out by index (never read); else per
       chunk: gather the values (same buffer), one ``bmm`` with the weights (hidden tokens weigh exactly 0), and
       only where that gave NaN (a hidden value NaN or infinite: ``0 * inf = NaN``) the chunk again with its
       hidden tokens' values zeroed; the new tokens' values added with one ``baddbmm``.

    Every per-layer tensor it writes besides the returned ones is a per-thread scratch buffer."""
    n, b, h, s, d = k_pool.shape
    hq, q = query.shape[1], query.shape[2]
    g = hq // h
    gq = g * q
    m = table.slots.shape[-1]
    ps = table.page_size
    t = m * ps
    bh = b * h
    dev = query.device
    nq = q if new_keys is not None else 0
    if rows is None:
        (krows, slot_rows, part_rows), (vrows, _, _) = _page_rows(k_pool, ps), _page_rows(v_pool, ps)
    else:
        krows, vrows, slot_rows, part_rows = rows
    # Page row of each entry in the pools viewed as page rows (slot stride slot_rows, part stride part_rows).
    flat = ((table.slots * slot_rows + table.pages)
            + (torch.arange(bh, device=dev) * part_rows).view(b, h, 1)).view(bh, m)
    valid = table.valid.view(bh, t)
    n_valid = valid.sum(1)
    if table.counts is not None:
        cnts, n_ok = torch.stack((table.counts.reshape(bh), n_valid)).tolist()  # one host read (CPU: no sync)
    else:
        cnts, n_ok = [m] * bh, n_valid.tolist()
    per = max(1, _CHUNK_BYTES // max(1, m * ps * d * 4))  # (row, head)s per chunk
    chunks = []
    any_hidden = False
    if per == 1:  # one (row, head) per chunk (8K x batch 4 x 25 % and up): views of flat's rows, no slicing per chunk
        for i, row in enumerate(flat.unbind(0)):
            used = cnts[i]
            some_hidden = n_ok[i] < used * ps
            any_hidden |= some_hidden
            chunks.append((i, i + 1, used, some_hidden, (row if used == m else row[:used]) if used else None))
    else:
        for i in range(0, bh, per):
            j = min(bh, i + per)
            used = max(cnts[i:j])
            # Hidden tokens among the gathered ones: padding entries of members with fewer entries, or hidden
            # tokens inside used entries (left padding, the partial last page).
            some_hidden = any(n_ok[r] < used * ps for r in range(i, j))
            any_hidden |= some_hidden
            chunks.append((i, j, used, some_hidden, flat[i:j, :used].reshape(-1) if used else None))
    low = k_pool.dtype != torch.float32
    buf = _scratch("kv", (per * m, ps * d), dev)
    lowbuf = _scratch("kv_low", (per * m, ps * d), dev, k_pool.dtype) if low else None

    def gather(rows: torch.Tensor, i: int, j: int, used: int, idx: torch.Tensor) -> torch.Tensor:
        if not low:
            return torch.index_select(rows, 0, idx, out=buf[: idx.numel()]).view(j - i, used * ps, d)
        chunk = torch.index_select(rows, 0, idx, out=lowbuf[: idx.numel()])
        return buf[: idx.numel()].copy_(chunk).view(j - i, used * ps, d)

    # One float32 (row, head) per chunk (8K x batch 4 x 25 % and up): 2-D matmuls on views of the scratch
    # made once per distinct entry count, not a handful of slices per chunk and loop (~1 us each, ~24 chunks
    # per layer); the same products bit for bit (one MKL gemm either way).
    single = per == 1 and not low
    mats: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def rows_of(used: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(page rows (used, ps * D), matrix (used * ps, D), its transpose)`` views of the scratch."""
        v = mats.get(used)
        if v is None:
            r = buf[:used]
            mat = r.view(used * ps, d)
            v = mats[used] = (r, mat, mat.t())
        return v

    qf = torch.mul(query.reshape(bh, gq, d).to(torch.float32), scale, out=_scratch("q", (bh, gq, d), dev))
    scores = _scratch("s", (bh, gq, t + nq), dev)
    if single:
        q_rows, s_rows = qf.unbind(0), scores[..., :t].unbind(0)
        for i, _, used, _, idx in chunks:
            if used:
                r, _, mat_t = rows_of(used)
                torch.index_select(krows, 0, idx, out=r)
                torch.mm(q_rows[i], mat_t, out=s_rows[i] if used == m else s_rows[i][:, : used * ps])
    else:
        for i, j, used, _, idx in chunks:
            if used:
                torch.bmm(qf[i:j], gather(krows, i, j, used, idx).transpose(1, 2), out=scores[i:j, :, : used * ps])
    # Hidden tokens and the never-written padding columns: -inf, added as a bias row (0 / -inf) per (row,
    # head): ~10x cheaper than a broadcast masked_fill over every query row (~1.4 ns per score on CPU, ~100 us
    # per layer at 8K x batch 4 x 25 %).  A NaN or +inf score at a hidden token (garbage keys, stale
    # scratch columns) stays NaN under the bias; it makes its whole row NaN, which the output shows, and
    # then the scores are masked exactly (masked_fill) and the softmax and values redone.
    masked = any_hidden or min(cnts) < m
    if masked:
        for i, j, used, _, _ in chunks:
            if not used:  # no matmul reads these rows' context weights, so no NaN could show: -inf outright
                scores[i:j, :, :t].fill_(float("-inf"))
        bias = torch.where(valid, _ZERO, _NEG_INF, out=_scratch("bias", (bh, t), dev))
        scores[..., :t].add_(bias.view(bh, 1, t))
    if nq:
        nk = new_keys.reshape(bh, q, d).to(torch.float32)
        if q == 1:
            torch.bmm(qf, nk.transpose(1, 2), out=scores[..., t:])
        else:
            scores[..., t:] = _new_token_scores(qf.view(b, h, gq, d), new_keys, g).view(bh, gq, q)

    # Values by bag (VALUES_BY_BAG, float32 pools): the attended tokens' values summed in place from the pool,
    # hidden tokens left out by index (never read: no NaN from their bytes, no redo), as the direct path sums.
    bag = VALUES_BY_BAG and not low
    bag_keep = None if not masked else valid  # without hidden tokens every gathered token is attended

    def softmax_values() -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        # (row, head, query row) log-sum-exp before the softmax overwrites nothing (it writes its own
        # buffer); a row of only -inf gives -inf
        lse_ = torch.logsumexp(scores, -1).view(b, hq, q) if want_lse else None
        weights_ = torch.ops.aten._softmax.out(scores, -1, False, out=_scratch("p", scores.shape, dev))
        if bag:
            return lse_, weights_, _bag_values(vrows, flat, ps, weights_[..., :t], bag_keep, n_valid)
        out_ = torch.empty(bh, gq, d, device=dev)
        if single:
            w_rows, o_rows = weights_[..., :t].unbind(0), out_.unbind(0)
            for i, _, used, _, idx in chunks:
                if used:
                    r, mat, _ = rows_of(used)
                    torch.index_select(vrows, 0, idx, out=r)
                    torch.mm(w_rows[i] if used == m else w_rows[i][:, : used * ps], mat, out=o_rows[i])
                else:
                    o_rows[i].zero_()
            return lse_, weights_, out_
        for i, j, used, _, idx in chunks:
            if used:
                torch.bmm(weights_[i:j, :, : used * ps], gather(vrows, i, j, used, idx), out=out_[i:j])
            else:
                out_[i:j].zero_()
        return lse_, weights_, out_

    # Without new tokens a (row, head) with nothing to attend has a softmax over only -inf (NaN): it gets zeros,
    # before the output is looked at for NaN (an overlapped attention's second part has such rows every call).
    empty = [r for r in range(bh) if n_ok[r] == 0] if not nq else []

    def finish() -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        lse_, weights_, out_ = softmax_values()
        for r in empty:
            weights_[r].zero_()
            out_[r].zero_()
            if lse_ is not None:  # nothing attended (a hidden NaN score could have made it NaN)
                lse_.view(bh, gq)[r].fill_(float("-inf"))
        return lse_, weights_, out_

    log_se, weights, out = finish()
    # A NaN hidden score makes its whole softmax row NaN: the output shows it where the row attends a token
    # (the bag skips hidden tokens: a row attending none shows it in its new tokens' weights only).
    if masked and (bool(out.isnan().any()) or (bag and nq and bool(weights[..., t:].isnan().any()))):
        scores[..., :t].masked_fill_(torch.logical_not(valid).view(bh, 1, t), float("-inf"))
        log_se, weights, out = finish()
    # Hidden tokens have weight exactly 0, which hides any finite value; a NaN or an infinity among them
    # (0 * inf = NaN) shows as NaN in its chunk's output: only then redo those chunks with the hidden
    # tokens' values zeroed (the pools' hidden bytes are rarely non-finite; chunks without hidden tokens
    # are left as they are, their NaN is the reference's).  The bag never reads hidden values.
    if not bag and any_hidden and bool(out.isnan().any()):
        bad = out.view(bh, -1).isnan().any(1).tolist()
        for i, j, used, some_hidden, idx in chunks:
            if used and some_hidden and any(bad[i:j]):
                values = gather(vrows, i, j, used, idx)
                rows = valid[i:j, : used * ps].logical_not().reshape(-1).nonzero().squeeze(1)
                values.view(-1, d).index_fill_(0, rows, 0.0)
                torch.bmm(weights[i:j, :, : used * ps], values, out=out[i:j])
    if want_mass:
        mass = weights[..., :t].view(bh, gq, m, ps).sum(-1)
        if q > 1:
            mass = mass.view(b, h, g, q, m).mean(3)
        mass = mass.reshape(b, hq, m)
    else:
        mass = torch.zeros(b, hq, m, device=dev)
    if nq:
        p_new = weights[..., t:]
        out.baddbmm_(p_new, new_values.reshape(bh, q, d).to(torch.float32))
        new_mass = p_new.sum(-1)
        if q > 1:
            new_mass = new_mass.view(b, h, g, q).mean(-1)
        new_mass = new_mass.reshape(b, hq)
    else:
        new_mass = torch.zeros(b, hq, device=dev)
    return SparseAttentionOutput(out.view(b, hq, q, d).to(query.dtype), mass, new_mass, log_se)


def _page_table_attention_triton(query, k_pool, v_pool, table: PageTable, new_keys, new_values, *, scale,
                                 num_splits) -> SparseAttentionOutput:
    """:func:`page_table_attention` through the Triton kernel; the new tokens (causal) are one more
    partial softmax state, computed with torch and merged with the kernel's splits (as
    ``attention._sparse_attention_triton`` does)."""
    from tiercache_kernels.page_attention import page_attention_partials

    b, hq, q, d = query.shape
    h, m = table.slots.shape[1], table.slots.shape[2]
    scale = d ** -0.5 if scale is None else float(scale)
    dev = query.device
    counts = table.counts if table.counts is not None else torch.full((b, h), m, dtype=torch.long, device=dev)
    # Query positions of a group are extra query rows: (B, Hq, Q, D) -> (B, Hq * Q, D), G' = G * Q.
    parts = page_attention_partials(query.reshape(b, hq * q, d), k_pool, v_pool, table.slots, table.pages,
                                    table.valid, counts, scale=scale, num_splits=num_splits)
    out, mass, new_mass = merge_with_new_tokens(query, parts, new_keys, new_values, h, scale)
    return SparseAttentionOutput(out, mass, new_mass)


def check_page_table_args(query, k_pool, v_pool, table: PageTable, new_keys, new_values):
    """Validate :func:`page_table_attention`'s arguments (shapes only, no host synchronisation);
    returns ``(B, Hq, Q, D, H, M)``."""
    if query.dim() != 4 or k_pool.dim() != 5 or v_pool.shape != k_pool.shape:
        raise ValueError(f"expected query (B, Hq, Q, D) and pools (N, B, H, S, D) of equal shape; query "
                         f"{tuple(query.shape)} does not match the pools {tuple(k_pool.shape)}, {tuple(v_pool.shape)}")
    b, hq, q, d = query.shape
    n, bp, h, s, dp = k_pool.shape
    if bp != b or dp != d or h == 0 or hq % h:
        raise ValueError(f"query {tuple(query.shape)} does not match the pools {tuple(k_pool.shape)}")
    ps = table.page_size
    if ps <= 0 or s % ps:
        raise ValueError(f"the table's page_size ({ps}) must divide the pool's block size ({s})")
    m = table.slots.shape[-1] if table.slots.dim() == 3 else -1
    shapes = (tuple(table.slots.shape), tuple(table.pages.shape), tuple(table.fetch_pos.shape))
    if table.counts is not None and tuple(table.counts.shape) != (b, h):
        raise ValueError(f"page table counts must be (B, H) = {(b, h)}, got {tuple(table.counts.shape)}")
    if shapes != ((b, h, m),) * 3 or tuple(table.valid.shape) != (b, h, m, ps) or table.valid.dtype != torch.bool:
        raise ValueError(f"page table slots/pages/fetch_pos {shapes}, valid {table.valid.dtype} "
                         f"{tuple(table.valid.shape)} does not match B={b}, H={h}, page_size={ps}")
    if new_keys is not None or new_values is not None:
        if (new_keys is None or new_values is None or tuple(new_keys.shape) != (b, h, q, d)
                or new_values.shape != new_keys.shape):
            raise ValueError(f"new_keys and new_values must both be {(b, h, q, d)}")
    return b, hq, q, d, h, m


# Scratch buffers of the CPU path, one set per thread.  Fresh multi-MB temporaries can cost more than the
# attention itself on CPU: past glibc's dynamic mmap threshold (at most 32 MiB) every call maps and
# page-faults its gathered K/V in again (measured: 32K x batch 8 x 25 %, 28k faults and 96 ms CPU per
# call with fresh buffers, none and 50 ms with these; benchmarks/attention_micro.py).  CUDA's caching
# allocator already reuses memory.  Kept per thread: K, V (float32), the scores, and for fp16 / bf16
# pools their low-precision copies, each at most _SCRATCH_LIMIT elements (64 MiB of float32).
_SCRATCH_LIMIT = 1 << 24
_tls = threading.local()
_ZERO, _NEG_INF = torch.tensor(0.0), torch.tensor(float("-inf"))  # the CPU path's bias values (never written)


def _scratch(name: str | None, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype = torch.float32
             ) -> torch.Tensor:
    """An uninitialised ``shape`` tensor: on CPU a view of this thread's reusable buffer ``name`` (valid
    until the next call asking for ``name`` on this thread: never hand it to a caller), else (or for
    ``name=None``) fresh."""
    numel = math.prod(shape)
    if name is None or device.type != "cpu" or numel > _SCRATCH_LIMIT:
        return torch.empty(shape, dtype=dtype, device=device)
    bufs = getattr(_tls, "bufs", None)
    if bufs is None:
        bufs = _tls.bufs = {}
    buf = bufs.get((name, dtype))
    if buf is None or buf.numel() < numel:
        # A normal tensor even when first asked for under torch.inference_mode (generate may run there):
        # an inference tensor could not be written by a later call outside it.
        with torch.inference_mode(False):
            buf = bufs[(name, dtype)] = torch.empty(max(numel, 1 << 16), dtype=dtype)
    return buf[:numel].view(shape)


_SMALL = 1 << 16  # elements (256 KiB of float32): below it a fresh tensor costs less than a scratch view


def _small(name: str, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """:func:`_scratch` for buffers that may be small: a fresh float32 tensor below :data:`_SMALL` elements
    (the allocator reuses such blocks: ~2.5 us against ~7 us for the scratch view, measured hot), the scratch
    above."""
    if math.prod(shape) < _SMALL:
        return torch.empty(shape, device=device)
    return _scratch(name, shape, device)


def _gather_pages(pool: torch.Tensor, table: PageTable, ps: int, name: str | None) -> torch.Tensor:
    """``(B, H, M, ps, D)`` float32 copy of the table's pages (scratch ``name``; fresh for ``None``): one
    ``index_select`` over the pool's ``(slot, row, head, page)`` rows (a plain memcpy per page; pools
    :func:`_page_rows` views: contiguous, or a half of a joint storage), advanced indexing otherwise; fp16 /
    bf16 pages are gathered, then converted once."""
    n, b, h, s, d = pool.shape
    k = s // ps
    m = table.slots.shape[-1]
    dev = pool.device
    if n == 0:  # nothing fetched: the table holds only padding entries
        return torch.zeros(b, h, m, ps, d, device=dev)
    rows = torch.arange(b, device=dev).view(b, 1, 1)
    heads = torch.arange(h, device=dev).view(1, h, 1)
    if name is None:
        return pool.unflatten(3, (k, ps))[table.slots, rows, heads, table.pages].float()
    out = _scratch(name, (b, h, m, ps, d), dev)
    paged = _page_rows(pool, ps)
    if paged is not None:
        src, slot_rows, part_rows = paged
        flat = (table.slots * slot_rows + (rows * h + heads) * part_rows + table.pages).view(-1)
        if pool.dtype == torch.float32:
            torch.index_select(src, 0, flat, out=out.view(-1, ps * d))
        else:
            low = _scratch(name + "_low", (flat.numel(), ps * d), dev, pool.dtype)
            out.view(-1, ps * d).copy_(torch.index_select(src, 0, flat, out=low))
        return out
    out.copy_(pool.unflatten(3, (k, ps))[table.slots, rows, heads, table.pages])
    return out


def entry_mass_to_blocks(entry_mass: torch.Tensor, table: PageTable, n_fetch: int) -> torch.Tensor:
    """``(B, Hq, U)``: per-entry masses ``(B, Hq, M)`` summed onto the blocks of the selection's ``fetch``
    order (what :class:`~.attention.SparseAttentionOutput` carries for a block-form attention)."""
    h = table.fetch_pos.shape[1]
    if entry_mass.dim() != 3 or entry_mass.shape[0] != table.fetch_pos.shape[0] or entry_mass.shape[1] % h \
            or entry_mass.shape[2] != table.fetch_pos.shape[2]:
        raise ValueError(f"entry_mass {tuple(entry_mass.shape)} does not match the table {tuple(table.fetch_pos.shape)}")
    b, hq, m = entry_mass.shape
    g = hq // h
    out = torch.zeros(b, h, g, n_fetch, dtype=entry_mass.dtype, device=entry_mass.device)
    if n_fetch == 0:  # nothing fetched: every entry is padding (zero mass)
        return out.view(b, hq, 0)
    # Query head q reads KV head q // g: the g query heads of a KV head share its entries' positions.
    out.scatter_add_(3, table.fetch_pos.unsqueeze(2).expand(b, h, g, m), entry_mass.reshape(b, h, g, m))
    return out.view(b, hq, n_fetch)


def split_page_table(table: PageTable, late: torch.Tensor) -> tuple[PageTable, PageTable]:
    """``(ready, later)``: ``table``'s used entries split by their block, ``late`` ``(U,)`` bool over the
    selection's ``fetch`` order (``True``: the block's slot is still being read).  Each part keeps its
    entries in table order, compacted to the front of its own ``(B, H, M')`` table with its own ``counts``
    (padding entries: slot / page / fetch position of the table's first entry, all-``False`` validity), so
    each part gathers only its own pages.  Attention over the two parts merged with
    :func:`merge_attention` is attention over ``table``."""
    b, h, m = table.slots.shape
    dev = table.slots.device
    if table.counts is not None:
        used = torch.arange(m, device=dev) < table.counts.unsqueeze(-1)
    else:
        used = table.valid.any(-1)
    if late.numel():
        is_late = late.to(dev)[table.fetch_pos] & used
    else:
        is_late = torch.zeros_like(used)
    return _compact(table, used & ~is_late), _compact(table, is_late)


def _compact(table: PageTable, keep: torch.Tensor) -> PageTable:
    """The entries ``keep`` ``(B, H, M)`` of ``table``, moved to the front of each (row, head) in order
    (:func:`_to_front`, as :func:`_table_entries` builds tables)."""
    order, used, counts = _to_front(keep)  # padding: entry 0 (in range)
    b, h, mk = order.shape
    valid = table.valid.gather(2, order.unsqueeze(-1).expand(b, h, mk, table.page_size)) & used.unsqueeze(-1)
    return PageTable(table.slots.gather(2, order), table.pages.gather(2, order), valid,
                     table.fetch_pos.gather(2, order), table.page_size, counts)


def merge_attention(first: SparseAttentionOutput, second: SparseAttentionOutput) -> SparseAttentionOutput:
    """Attention over two disjoint parts of one set of tokens, merged exactly from each part's log-sum-exp
    (``lse``, :func:`page_table_attention` with ``lse=True``; one query position, ``Q == 1``: the masses are
    per query position): ``out = (e^{l1-m} o1 + e^{l2-m} o2) / (e^{l1-m} + e^{l2-m})`` with ``m`` the larger,
    each part's entry and new-token masses scaled by its weight.  ``block_mass`` is the concatenation of the
    parts' entry masses along the last dim (fold each part onto blocks with its own table).  A part with
    nothing attended (``lse = -inf``) weighs 0; where neither attended anything the output and masses are 0."""
    if first.lse is None or second.lse is None:
        raise ValueError("merge_attention needs both parts' lse (page_table_attention(lse=True))")
    if first.lse.shape[-1] != 1 or second.lse.shape != first.lse.shape:
        raise ValueError(f"merge_attention merges one query position: lse {tuple(first.lse.shape)}, "
                         f"{tuple(second.lse.shape)}")
    l1, l2 = first.lse, second.lse  # (B, Hq, 1)
    top = torch.maximum(l1, l2)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    e1, e2 = torch.exp(l1 - top), torch.exp(l2 - top)  # exp(-inf) = 0: an empty part weighs nothing
    total = e1 + e2
    inv = torch.where(total > 0, 1.0 / total.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(total))
    w1, w2 = e1 * inv, e2 * inv  # (B, Hq, 1)
    out = (first.output.float() * w1.unsqueeze(-1) + second.output.float() * w2.unsqueeze(-1)).to(first.output.dtype)
    mass = torch.cat((first.block_mass * w1, second.block_mass * w2), dim=-1)
    new_mass = first.new_mass * w1[..., 0] + second.new_mass * w2[..., 0]
    log_se = torch.where(total > 0, top + total.log(), torch.full_like(total, float("-inf")))
    return SparseAttentionOutput(out, mass, new_mass, log_se)


_RANGES: dict = {}  # (name, sizes) -> small constant index tensors of the direct path (never written)

# How the CPU paths (the direct path and the table path's chunked form: one torch thread, float32 pools) sum the
# weighted values.  True (the default): a weighted ``embedding_bag`` reading the value rows in place
# (:func:`_bag_values`; ~15 % less attention time at 8K x batch 4, docs/sparse.md "Values summed in place"), the
# same bags on both paths, so they agree bit for bit (the table path leaves hidden tokens out by index, the direct
# path gives them weight 0: the same bits for finite values, and the direct path declines on a non-finite one).
# False: gathered pages and a matmul per (row, head) on both (the form before; also bit for bit between them).
# Either way the output is within float32 rounding of the other setting's.  fp16 / bf16 pools and the batched
# path (2+ threads, autograd, pools without a page-row view) always gather and multiply.  Read at each call.
VALUES_BY_BAG = True


def _bag_values(vrows: torch.Tensor, flat: torch.Tensor, ps: int, w_ctx: torch.Tensor, keep: torch.Tensor | None,
                n_keep: torch.Tensor | None) -> torch.Tensor:
    """``out[r, j] = sum over the attended tokens tok of w_ctx[r, j, tok] * V[tok]`` ``(R, J, D)``, the values read in
    place: one weighted ``embedding_bag(mode="sum")`` over the pool's value rows (``vrows`` ``(rows, ps * D)``
    page rows, :func:`_page_rows`, viewed as token rows), a bag per (row-head ``r``, query row ``j``) holding
    the tokens of ``flat[r]``'s page rows in order; the ``J`` bags of a (row, head) in a row, so its values
    come from memory once.  ``keep`` ``(R, M * ps)`` bool (``None``: every token) names the attended tokens,
    ``n_keep`` ``(R,)`` their count per (row, head): the others are left out by index (never read).

    Each bag is summed token by token in its order (FBGEMM's kernel, one accumulator per output element; the
    same bits whatever the other bags are and however the bags are split over threads), so two paths that
    give a (row, head) the same attended tokens in the same order and the same weights get the same output;
    a hidden token given weight exactly 0 instead of left out changes no bit when its value is finite
    (``0 * v = 0``), and gives NaN when it is not."""
    r, j, t = w_ctx.shape
    d = vrows.shape[1] // ps
    dev = w_ctx.device
    tok = torch.add(_const("ps", (ps,), lambda: torch.arange(ps, device=dev)), flat.view(r, -1, 1), alpha=ps)
    tok = tok.view(r, 1, t).expand(r, j, t)
    if keep is None:
        idx, w = tok.reshape(-1), w_ctx.reshape(-1)
        offsets = _const("bags", (r * j, t), lambda: torch.arange(0, r * j * t, t, device=dev))
    else:
        attended = keep.view(r, 1, t).expand(r, j, t)
        idx, w = tok[attended], w_ctx[attended]
        offsets = torch.zeros(r * j, dtype=torch.long, device=dev)
        if r * j > 1:
            torch.cumsum(n_keep.repeat_interleave(j)[:-1], 0, out=offsets[1:])
    return torch.nn.functional.embedding_bag(idx, vrows.view(-1, d), offsets, mode="sum",
                                             per_sample_weights=w).view(r, j, d)


def _const(name: str, key: tuple, make) -> torch.Tensor:
    t = _RANGES.get((name, key))
    if t is None:
        if len(_RANGES) > 256:  # a bound, not a working set: one decode uses a handful of shapes at a time
            _RANGES.clear()
        with torch.inference_mode(False):
            t = _RANGES[(name, key)] = make()
    return t


def attend_pages_cpu(query: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, sel: "BlockSelection",
                     slot_of_fetch: torch.Tensor, valid: torch.Tensor, ctx: int, block_size: int,
                     new_keys: torch.Tensor | None, new_values: torch.Tensor | None, scale: float | None = None,
                     mass: bool = True) -> SparseAttentionOutput | None:
    """The decode step's attention over a selection's pages (what ``sparse_layer.attend_selected`` computes
    with ``build_page_table_from_valid`` + :func:`page_table_attention` + :func:`entry_mass_to_blocks`) in
    fewer operations, for the common CPU case; ``None`` where it does not apply (the caller then runs the
    general path).  The block masses and new-token mass are the general path's bit for bit: the same gathers,
    score matmuls (same shapes, same chunks), softmax, sums and scatter in the same order; only the page table
    is not built.  So is the output: with :data:`VALUES_BY_BAG` (the default) both paths sum the weighted values
    by one weighted ``embedding_bag`` over the pool's value rows in place (:func:`_bag_values`: the same bags,
    token by token; this path gives the hidden tokens weight 0 where the general path leaves them out, the same
    bits for finite values); without it both gather and multiply the same chunks.

    Applies on CPU with one torch thread, autograd not recording, float32 pools whose page rows
    :func:`_page_rows` views, one query position with its new token, and every (row, KV head) attending the
    same number of pages (one decode step with uniform page costs: no left padding differences).  Then the
    table's entries are each (row, head)'s selected pages in order with no padding entries: one ``nonzero``
    of the page mask names them, and ``index_select`` of per-page lookups (a pool page row and a fetch
    position per page of the context, a ``0 / -inf`` bias per token) gives their page rows, validity and
    blocks, instead of the table's cumsum / scatter / gathers (docs/sparse.md "Fixed per-layer cost at
    small contexts").
    Hidden tokens (padding, positions at or past ``ctx``) get the ``-inf`` bias as in the general path;
    adding a zero bias where the general path adds none changes no bit.  Without padding, where every (row,
    head) attends the partial last page, no bias is built: the last entry's tokens past ``ctx`` are set to
    ``-inf`` (the bias's result for finite scores; a non-finite score there is masked, as the general path
    masks it when it redoes such a call).  If the output holds a NaN (a
    hidden key or value that is not finite, or NaN inputs) the general path is run instead (``None``),
    which masks exactly (and never reads hidden values)."""
    b, hq, q, d = query.shape
    if (q != 1 or new_keys is None or new_values is None or query.device.type != "cpu"
            or torch.get_num_threads() != 1 or k_pool.dtype != torch.float32 or v_pool.dtype != torch.float32
            or k_pool.dim() != 5 or k_pool.shape != v_pool.shape or not k_pool.shape[0]):
        return None
    if torch.is_grad_enabled() and any(x.requires_grad for x in (query, k_pool, v_pool, new_keys, new_values)):
        return None
    n, bp, h, s, dp = k_pool.shape
    kpp = sel.pages_per_block
    pages = sel.pages
    if (bp != b or dp != d or hq % h or s != block_size or block_size % kpp or pages.dim() != 3
            or tuple(pages.shape[:2]) != (b, h) or tuple(new_keys.shape) != (b, h, 1, d)
            or new_values.shape != new_keys.shape or valid.dim() != 2 or valid.shape[0] != b
            or valid.dtype != torch.bool or valid.shape[1] < ctx):
        return None
    u = int(sel.fetch.numel())
    if not u or tuple(slot_of_fetch.shape) != (u,):
        return None
    ps = block_size // kpp
    krows, vrows = _page_rows(k_pool, ps), _page_rows(v_pool, ps)
    if krows is None or vrows is None or krows[1:] != vrows[1:]:
        return None
    (krows, slot_rows, part_rows), vrows = krows, vrows[0]
    bh, g = b * h, hq // h
    m = getattr(sel, "pages_each", None)  # set by select() when it knows every (row, head) took as many pages
    if m is None:
        counts = pages.sum(-1).view(-1).tolist()
        m = counts[0]
        if counts.count(m) != bh:
            return None
    if not m:
        return None
    p = pages.shape[-1]
    nb = sel.head_mask.shape[-1]
    t = m * ps
    dev = query.device
    scale = d ** -0.5 if scale is None else float(scale)
    # Entry e of (row, head) r is its e-th selected page: flat index idx = r * P + page, in order.
    idx = pages.view(-1).nonzero().view(-1)
    if idx.numel() != bh * m:
        return None
    # Per page of the context: its block's fetch position u (0 for blocks not fetched: in range, and never
    # selected, every selected page's block is fetched: the selection's contract) and its page row in the
    # pool (_page_rows) for (row, head) 0; (row, head) r adds r * part_rows.
    u_of_block = torch.zeros(nb, dtype=torch.long, device=dev)
    u_of_block[sel.fetch] = _const("ar", (u,), lambda: torch.arange(u, device=dev))
    u_page = u_of_block.index_select(0, _const("blk", (p, kpp), lambda: torch.arange(p, device=dev) // kpp))
    page_row = torch.add(_const("rows", (bh, p, kpp, part_rows),
                                lambda: (torch.arange(p, device=dev) % kpp).view(1, p)
                                + torch.arange(0, bh * part_rows, part_rows, device=dev).view(bh, 1)),
                         slot_of_fetch.to(torch.long).index_select(0, u_page), alpha=slot_rows)
    flat = page_row.view(-1).index_select(0, idx).view(bh, m)
    span = p * ps
    keep = min(ctx, span)
    # Without padding (every context token valid) the only hidden tokens are the partial last page's positions
    # at or past ctx; where every (row, head) attends that page it is each one's last entry, so they are the
    # last span - keep score columns: filled with -inf below (what the bias adds there; the zero bias elsewhere
    # changes no bit), instead of building and adding a bias (five operations, each on cold caches in decode).
    tail = span - keep
    bias = None
    if not (tail < ps and bool(valid[:, :keep].all()) and (not tail or bool(pages[..., -1].all()))):
        # 0 / -inf per token of the context's pages (positions at or past ctx hidden), then per entry.
        tok = _small("tok", (b * p, ps), dev)
        tok_rows = tok.view(b, span)
        torch.where(valid[:, :keep], _ZERO, _NEG_INF, out=tok_rows[:, :keep])
        if keep < span:
            tok_rows[:, keep:].fill_(float("-inf"))
        # entry (row b, head, page) reads token row b * P + page
        tok_row = _const("tok", (b, h, p), lambda: (torch.arange(b, device=dev).view(b, 1, 1) * p
                                                    + torch.arange(p, device=dev)).expand(b, h, p).reshape(-1))
        bias = tok.index_select(0, tok_row.index_select(0, idx))
    per = max(1, _CHUNK_BYTES // (t * d * 4))  # the general path's chunks of (row, head)s
    buf = _scratch("kv", (min(per, bh) * m, ps * d), dev)
    gq = g
    qf = torch.mul(query.reshape(bh, gq, d).to(torch.float32), scale)
    scores = _small("s", (bh, gq, t + 1), dev)
    ctx_scores = scores[..., :t]
    if per == 1:
        mat = buf[:m].view(t, d)
        mat_t = mat.t()
        for q_row, s_row, entry_rows in zip(qf.unbind(0), ctx_scores.unbind(0), flat.unbind(0)):
            torch.index_select(krows, 0, entry_rows, out=buf[:m])
            torch.mm(q_row, mat_t, out=s_row)
    else:
        for i in range(0, bh, per):
            j = min(bh, i + per)
            kk = torch.index_select(krows, 0, flat[i:j].view(-1), out=buf[: (j - i) * m]).view(j - i, t, d)
            torch.bmm(qf[i:j], kk.transpose(1, 2), out=ctx_scores[i:j])
    if bias is not None:
        ctx_scores.add_(bias.view(bh, 1, t))
    elif tail:
        ctx_scores[..., t - tail:].fill_(float("-inf"))
    torch.bmm(qf, new_keys.reshape(bh, 1, d).to(torch.float32).transpose(1, 2), out=scores[..., t:])
    weights = torch.ops.aten._softmax.out(scores, -1, False, out=_small("p", scores.shape, dev))
    w_ctx = weights[..., :t]
    if VALUES_BY_BAG:
        # Every token of the entries, hidden ones included with weight exactly 0: the table path's sum (which
        # leaves them out) for finite values; a non-finite hidden value gives NaN below, and the table path.
        out = _bag_values(vrows, flat, ps, w_ctx, None, None)
    else:
        out = torch.empty(bh, gq, d, device=dev)
        if per == 1:
            for w_row, o_row, entry_rows in zip(w_ctx.unbind(0), out.unbind(0), flat.unbind(0)):
                torch.index_select(vrows, 0, entry_rows, out=buf[:m])
                torch.mm(w_row, mat, out=o_row)
        else:
            for i in range(0, bh, per):
                j = min(bh, i + per)
                vv = torch.index_select(vrows, 0, flat[i:j].view(-1), out=buf[: (j - i) * m]).view(j - i, t, d)
                torch.bmm(w_ctx[i:j], vv, out=out[i:j])
    if bool(out.isnan().any()):
        return None  # a hidden token that is not finite (or NaN inputs): the general path masks exactly
    p_new = weights[..., t:]
    out.baddbmm_(p_new, new_values.reshape(bh, 1, d).to(torch.float32))
    new_mass = p_new.sum(-1).reshape(b, hq)
    if mass:
        entry = w_ctx.view(bh, gq, m, ps).sum(-1)
        page_of = _const("page", (bh, p), lambda: torch.arange(p, device=dev).repeat(bh))
        fetch_pos = u_page.index_select(0, page_of.index_select(0, idx)).view(b, h, 1, m).expand(b, h, g, m)
        block_mass = torch.zeros(b, h, g, u, device=dev).scatter_add_(3, fetch_pos, entry.view(b, h, g, m))
        block_mass = block_mass.view(b, hq, u)
    else:
        block_mass = torch.zeros(b, hq, u, device=dev)
    return SparseAttentionOutput(out.view(b, hq, 1, d).to(query.dtype), block_mass, new_mass)
