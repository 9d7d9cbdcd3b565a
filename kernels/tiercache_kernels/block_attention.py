"""Decode attention over a block table (paged attention with GQA), as a Triton kernel.

Each (row ``b``, KV head ``h``) attends the pool slots ``block_table[b, h, :lengths[b, h]]`` of
``k_pool``/``v_pool`` ``(P, H, S, D)``, reading them in place - no gather, no concatenation, no repeat
of K/V per query head.  The ``G`` query heads of a group share each K/V tile.  Tokens with
``pool_valid[slot, t] == False`` (padding, unfilled tail) are never read.  fp16 / bf16 / fp32 inputs;
float32 accumulation (``input_precision="ieee"``: no TF32 rounding).

Split over blocks: the table entries of a (row, head) are cut into ``num_splits`` contiguous ranges,
one program each (more parallelism when batch x heads is small); each keeps an online softmax (running
max, running sum, rescaled accumulator).  The host then merges the splits (log-sum-exp weighting; a few
KB) and turns each entry's log-sum-exp into its attention mass ``exp(lse_entry - lse_total)``.

The torch reference and the dispatcher (torch by default on CPU) are
``tiercache_llm.sparse.attention.paged_decode_attention_reference`` / ``paged_decode_attention``.
Importing this module needs no triton (see :mod:`.triton_support`).
"""

from __future__ import annotations

import torch

from .triton_support import next_power_of_2, require_triton

__all__ = ["block_attention_triton", "default_num_splits"]


def default_num_splits(batch: int, kv_heads: int, max_entries: int, device: torch.device) -> int:
    """Enough programs to fill the GPU (about two per SM), never more splits than entries; 1 on CPU."""
    if device.type != "cuda" or max_entries <= 1:
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(max_entries, -(-2 * sms // max(1, batch * kv_heads))))


def block_attention_triton(
    query: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, pool_valid: torch.Tensor,
    block_table: torch.Tensor, lengths: torch.Tensor, *, scale: float | None = None, num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(output (B, Hq, D) in the query's dtype, block_mass (B, Hq, M) float32)``.

    Arguments as in ``paged_decode_attention`` (shapes assumed checked by it).  Runs compiled on CUDA
    tensors, interpreted on CPU tensors under ``TRITON_INTERPRET=1``; ``RuntimeError`` otherwise.
    A (row, head) with nothing to attend gets zeros.  Returns after enqueueing on CUDA (current stream)."""
    require_triton()
    from ._block_attention_triton import block_attention_kernel

    b, hq, d = query.shape
    _, h, s, _ = k_pool.shape
    m = block_table.shape[2]
    g = hq // h
    dev = query.device
    scale = d ** -0.5 if scale is None else float(scale)
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
    if b * h:
        kernel = block_attention_kernel.for_device(dev)
        kernel[(b * h, num_splits)](
            query, k_pool, v_pool, valid, block_table, lengths,
            acc, m_part, l_part, lse,
            h, g, d, s, m, per_split, num_splits, scale,
            *query.stride(), *k_pool.stride(), *v_pool.stride(), *valid.stride(),
            *block_table.stride(), *lengths.stride(),
            BLOCK_G=next_power_of_2(g, 16), BLOCK_S=next_power_of_2(s, 16), BLOCK_D=next_power_of_2(d, 16),
        )
    top = m_part.amax(dim=2, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    w = torch.exp(m_part - top)  # 0 for empty splits
    total = (l_part * w).sum(dim=2)  # (B, Hq)
    out = (acc * w.unsqueeze(-1)).sum(dim=2) / total.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)
    lse_total = top.squeeze(2) + torch.log(total)
    mass = torch.exp(lse - lse_total.unsqueeze(-1))
    mass = torch.where(total.unsqueeze(-1) > 0, mass, torch.zeros_like(mass))
    return out.to(query.dtype), mass
