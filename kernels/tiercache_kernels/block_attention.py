"""Decode attention over a block table (paged attention with GQA), as a Triton kernel.

Each (row ``b``, KV head ``h``) attends the pool slots ``block_table[b, h, :lengths[b, h]]`` of
``k_pool``/``v_pool``, reading them in place - no gather, no concatenation, no repeat of K/V per query
head.  The pool is either shared by all rows, ``(P, H, S, D)``, or per row, ``(B, P, H, S, D)`` (e.g.
the blocks fetched for one decode step, ``(U, B, H, S, D)`` viewed as ``(B, U, H, S, D)``); any strides.
The ``G`` query heads of a group share each K/V tile.  Tokens whose validity is ``False`` (padding,
unfilled tail) are never read; validity is ``(P, S)``, ``(B, P, S)`` or ``(B, P, H, S)``.  fp16 / bf16 /
fp32 inputs; float32 accumulation (``input_precision="ieee"``: no TF32 rounding).

Split over blocks: the table entries of a (row, head) are cut into ``num_splits`` contiguous ranges,
one program each (more parallelism when batch x heads is small); each keeps an online softmax (running
max, running sum, rescaled accumulator).  The host then merges the splits (:func:`merge_partials`;
log-sum-exp weighting, a few KB, no host synchronisation) - together with any extra terms the caller
computed itself, such as the decode step's new tokens - and turns each entry's log-sum-exp into its
attention mass ``exp(lse_entry - lse_total)``.

The torch references and dispatchers (torch by default on CPU) are in ``tiercache_llm.sparse.attention``
(``paged_decode_attention`` and ``sparse_attention``).  Importing this module needs no triton (see
:mod:`.triton_support`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .triton_support import next_power_of_2, require_triton

__all__ = ["AttentionPartials", "block_attention_partials", "block_attention_triton", "default_num_splits", "entry_mass",
           "merge_partials"]


def default_num_splits(batch: int, kv_heads: int, max_entries: int, device: torch.device) -> int:
    """Enough programs to fill the GPU (about two per SM), never more splits than entries; 1 on CPU."""
    if device.type != "cuda" or max_entries <= 1:
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(max_entries, -(-2 * sms // max(1, batch * kv_heads))))


@dataclass(frozen=True)
class AttentionPartials:
    """Unmerged online-softmax state, all float32, for ``R`` query rows (``B * Hq``, flattened as the
    query's ``(B, Hq)``) and ``K`` partial ranges.

    Attributes:
        acc: ``(..., K, D)`` unnormalised output of each range (``sum_t exp(s_t - m) v_t``).
        m: ``(..., K)`` running max of the scaled scores (``-inf`` for an empty range).
        l: ``(..., K)`` ``sum_t exp(s_t - m)`` (0 for an empty range).
        lse: ``(..., M)`` log-sum-exp of each table entry's scores (``-inf`` past ``lengths``).
    """

    acc: torch.Tensor
    m: torch.Tensor
    l: torch.Tensor  # noqa: E741
    lse: torch.Tensor


def block_attention_partials(
    query: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, pool_valid: torch.Tensor,
    block_table: torch.Tensor, lengths: torch.Tensor, *, scale: float, num_splits: int | None = None,
) -> AttentionPartials:
    """Launch the kernel; ``query`` ``(B, Hq, D)`` (any strides; ``Hq = G * H``, query head ``i`` reads
    KV head ``i // G``), pools ``(P, H, S, D)`` or ``(B, P, H, S, D)``, ``pool_valid`` bool or uint8
    ``(P, S)``, ``(B, P, S)`` or ``(B, P, H, S)``, ``block_table`` ``(B, H, M)`` int, ``lengths``
    ``(B, H)`` int.  Shapes and table contents are assumed checked by the caller.  Partials are
    ``(B, Hq, num_splits, ...)``; ``lse`` is ``(B, Hq, M)``.  Runs compiled on CUDA tensors, interpreted
    on CPU tensors under ``TRITON_INTERPRET=1``; ``RuntimeError`` otherwise.  Returns after enqueueing
    on CUDA (current stream)."""
    require_triton()
    from ._block_attention_triton import block_attention_kernel

    b, hq, d = query.shape
    per_row = k_pool.dim() == 5
    h, s = k_pool.shape[-3], k_pool.shape[-2]
    m = block_table.shape[2]
    g = hq // h
    dev = query.device
    if num_splits is None:
        num_splits = default_num_splits(b, h, m, dev)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    per_split = max(1, -(-m // num_splits))
    num_splits = max(1, -(-m // per_split))
    acc = torch.zeros(b, hq, num_splits, d, dtype=torch.float32, device=dev)
    m_part = torch.full((b, hq, num_splits), float("-inf"), dtype=torch.float32, device=dev)
    l_part = torch.zeros(b, hq, num_splits, dtype=torch.float32, device=dev)
    lse = torch.full((b, hq, m), float("-inf"), dtype=torch.float32, device=dev)
    valid = pool_valid.view(torch.uint8) if pool_valid.dtype == torch.bool else pool_valid
    if b * h and m:
        ks = k_pool.stride() if per_row else (0, *k_pool.stride())
        vs = v_pool.stride() if per_row else (0, *v_pool.stride())
        if valid.dim() == 2:  # (P, S)
            ms = (0, 0, *valid.stride())
        elif valid.dim() == 3:  # (B, P, S)
            ms = (valid.stride(0), 0, valid.stride(1), valid.stride(2))
        else:  # (B, P, H, S)
            ms = (valid.stride(0), valid.stride(2), valid.stride(1), valid.stride(3))
        kernel = block_attention_kernel.for_device(dev)
        kernel[(b * h, num_splits)](
            query, k_pool, v_pool, valid, block_table, lengths,
            acc, m_part, l_part, lse,
            h, g, d, s, m, per_split, num_splits, scale,
            *query.stride(), *ks, *vs, *ms,
            *block_table.stride(), *lengths.stride(),
            BLOCK_G=next_power_of_2(g, 16), BLOCK_S=next_power_of_2(s, 16), BLOCK_D=next_power_of_2(d, 16),
        )
    return AttentionPartials(acc, m_part, l_part, lse)


def merge_partials(acc: torch.Tensor, m_part: torch.Tensor, l_part: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge ``K`` partial softmax states (last dims as in :class:`AttentionPartials`) into
    ``(output (..., D), lse_total (...), attended (...) bool)``; a row with nothing attended gets a zero
    output and ``lse_total = -inf``.  Pure tensor ops: no host synchronisation."""
    top = m_part.amax(dim=-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    w = torch.exp(m_part - top)  # 0 for empty ranges
    total = (l_part * w).sum(dim=-1)
    out = (acc * w.unsqueeze(-1)).sum(dim=-2) / total.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)
    attended = total > 0
    lse_total = torch.where(attended, top.squeeze(-1) + torch.log(total), float("-inf"))
    return out, lse_total, attended


def entry_mass(lse: torch.Tensor, lse_total: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
    """Softmax mass of each entry, ``exp(lse - lse_total)``; zeros for rows with nothing attended."""
    mass = torch.exp(lse - torch.where(attended, lse_total, 0.0).unsqueeze(-1))
    return torch.where(attended.unsqueeze(-1), mass, torch.zeros_like(mass))


def block_attention_triton(
    query: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, pool_valid: torch.Tensor,
    block_table: torch.Tensor, lengths: torch.Tensor, *, scale: float | None = None, num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(output (B, Hq, D) in the query's dtype, block_mass (B, Hq, M) float32)``.

    Arguments as in ``paged_decode_attention`` (shapes assumed checked by it).  A (row, head) with
    nothing to attend gets zeros."""
    d = query.shape[-1]
    scale = d ** -0.5 if scale is None else float(scale)
    parts = block_attention_partials(query, k_pool, v_pool, pool_valid, block_table, lengths, scale=scale,
                                     num_splits=num_splits)
    out, lse_total, attended = merge_partials(parts.acc, parts.m, parts.l)
    return out.to(query.dtype), entry_mass(parts.lse, lse_total, attended)
