"""Decode attention over a *page table* (each (row, KV head) its own pages of a pool), as a Triton kernel.

Implements the contract of ``tiercache_llm.sparse.page_table.page_table_attention`` (its torch path is
the reference): the pool ``k_pool`` / ``v_pool`` ``(N, B, H, S, D)`` (any strides; fp16 / bf16 / fp32)
holds fetched storage blocks; table entry ``m`` of (row ``b``, KV head ``h``) names the tokens
``pool[slots[b, h, m], b, h, pages[b, h, m] * P : (pages + 1) * P]`` with per-token validity
``valid[b, h, m, :]``.  The kernel reads those token rows **in place** (a gather of rows inside the
tile load; no ``index_select`` copy), ``BLOCK_E`` entries x ``P`` tokens per tile, all ``G`` query rows
of a KV head (query heads x query positions) against each tile, float32 accumulation
(``input_precision="ieee"``: no TF32 rounding), an online softmax per program.

Split over table entries: the entries ``[0, counts[b, h])`` of a (row, head) are cut into
``num_splits`` contiguous ranges, one program each; every program leaves its online-softmax state and
each entry's log-sum-exp (:class:`~.block_attention.AttentionPartials`), which the host merges with
:func:`~.block_attention.merge_partials` (together with the new tokens' state) and turns into
per-entry masses with :func:`~.block_attention.entry_mass` - no host synchronisation.

Importing this module needs no triton (see :mod:`.triton_support`).
"""

from __future__ import annotations

import torch

from .block_attention import AttentionPartials, default_num_splits
from .triton_support import next_power_of_2, require_triton

__all__ = ["page_attention_partials", "tile_entries"]

TILE_TOKENS = 64  # token rows per K/V tile (entries per tile = TILE_TOKENS // page rounded to a power of 2)


def tile_entries(page_size: int) -> int:
    """Table entries per tile: ``max(1, TILE_TOKENS // next_power_of_2(page_size))``."""
    return max(1, TILE_TOKENS // next_power_of_2(page_size))


def page_attention_partials(
    query: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, slots: torch.Tensor, pages: torch.Tensor,
    valid: torch.Tensor, counts: torch.Tensor, *, scale: float, num_splits: int | None = None,
) -> AttentionPartials:
    """Launch the kernel.

    Args:
        query: ``(B, R, D)``, ``R = H * G`` query rows; rows ``h * G .. (h + 1) * G - 1`` read KV head
            ``h`` (``(B, Hq, Q, D)`` reshaped: query heads x positions).  Any strides.
        k_pool, v_pool: ``(N, B, H, S, D)``, any strides.
        slots, pages: ``(B, H, M)`` int; entries past ``counts`` are never read.
        valid: ``(B, H, M, P)`` bool or uint8 token validity (``P`` = page size, ``S % P == 0``).
        counts: ``(B, H)`` int, used entries per (row, KV head).
        scale: softmax scale.
        num_splits: programs per (row, KV head) (default: enough to fill the GPU; 1 on CPU).

    Shapes and contents are assumed checked by the caller.  Returns partials ``(B, R, K, ...)`` and
    ``lse`` ``(B, R, M)`` (``-inf`` for entries with nothing attended).  Compiled on CUDA tensors,
    interpreted on CPU tensors under ``TRITON_INTERPRET=1``, ``RuntimeError`` otherwise; returns after
    enqueueing on CUDA (current stream)."""
    require_triton()
    from ._page_attention_triton import page_attention_kernel

    b, r, d = query.shape
    h = k_pool.shape[2]
    m, ps = valid.shape[2], valid.shape[3]
    g = r // h
    dev = query.device
    block_e = tile_entries(ps)
    if num_splits is None:
        num_splits = default_num_splits(b, h, -(-m // block_e), dev)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    per_split = max(1, -(-m // num_splits))
    per_split = -(-per_split // block_e) * block_e  # whole tiles per split
    num_splits = max(1, -(-m // per_split))
    acc = torch.zeros(b, r, num_splits, d, dtype=torch.float32, device=dev)
    m_part = torch.full((b, r, num_splits), float("-inf"), dtype=torch.float32, device=dev)
    l_part = torch.zeros(b, r, num_splits, dtype=torch.float32, device=dev)
    lse = torch.full((b, r, m), float("-inf"), dtype=torch.float32, device=dev)
    ok = valid.view(torch.uint8) if valid.dtype == torch.bool else valid
    if b * h and m and k_pool.shape[0]:
        kernel = page_attention_kernel.for_device(dev)
        kernel[(b * h, num_splits)](
            query, k_pool, v_pool, slots, pages, ok, counts,
            acc, m_part, l_part, lse,
            h, g, d, ps, m, per_split, num_splits, scale,
            *query.stride(), *k_pool.stride(), *v_pool.stride(),
            *slots.stride(), *pages.stride(), *ok.stride(), *counts.stride(),
            BLOCK_G=next_power_of_2(g, 16), BLOCK_E=block_e, BLOCK_P=next_power_of_2(ps),
            BLOCK_D=next_power_of_2(d, 16),
        )
    return AttentionPartials(acc, m_part, l_part, lse)
