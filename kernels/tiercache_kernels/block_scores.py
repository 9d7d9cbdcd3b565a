"""Block scoring against Quest min/max digests, as a Triton kernel.

For each row ``b``, KV head ``h`` and block ``j``: ``score = agg_r sum_i max(q_ri lo_ij, q_ri hi_ij)``
over the ``R = G * Q`` query rows ``r`` of the head's GQA group (``agg`` = max, or sum), ``-inf`` for
blocks with no valid token.  Float32 accumulation whatever the input dtype.

The torch reference, and the dispatcher that keeps it the default on CPU, is
``tiercache_llm.sparse.selection.score_blocks_reference`` / ``score_blocks``; this module holds only
the launcher.  Importing it needs no triton (see :mod:`.triton_support`).

Layout: one program per (row, KV head) and tile of ``BLOCK_N`` blocks; the tile's digests are read
once and every query row of the group is scored against them, so digests cross memory once per step.
"""

from __future__ import annotations

import torch

from .triton_support import next_power_of_2, require_triton

__all__ = ["block_scores_triton"]


def block_scores_triton(query: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, count: torch.Tensor,
                        gqa: str = "max", *, block_n: int = 64) -> torch.Tensor:
    """Scores ``(B, H, N)`` float32 of digests ``lo``/``hi`` ``(B, H, N, D)`` (any float dtype, any
    strides), valid-token ``count`` ``(B, N)`` and ``query`` ``(B, Hq, Q, D)``.

    Runs compiled on CUDA tensors, interpreted on CPU tensors under ``TRITON_INTERPRET=1``; raises
    ``RuntimeError`` otherwise.  Shapes are assumed checked by the caller (``score_blocks``)."""
    if gqa not in ("max", "sum"):
        raise ValueError(f"gqa must be 'max' or 'sum', got {gqa!r}")
    require_triton()
    from ._block_scores_triton import block_scores_kernel

    b, hq, q, d = query.shape
    h, n = lo.shape[1], lo.shape[2]
    g = hq // h
    out = torch.empty(b, h, n, dtype=torch.float32, device=query.device)
    if out.numel() == 0:
        return out
    qr = query.reshape(b, h, g * q, d)  # a view when the query is contiguous
    block_n = min(next_power_of_2(block_n), next_power_of_2(n))
    grid = (b * h, -(-n // block_n))
    kernel = block_scores_kernel.for_device(query.device)
    kernel[grid](
        qr, lo, hi, count, out,
        h, n, d, g * q,
        *qr.stride(), *lo.stride(), *hi.stride(), *count.stride(),
        IS_MAX=gqa == "max", BLOCK_N=block_n, BLOCK_D=next_power_of_2(d),
    )
    return out
