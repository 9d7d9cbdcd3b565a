"""Triton body of the block-scoring kernel (imported lazily by :mod:`.block_scores`; needs triton)."""

import triton.language as tl

from .triton_support import DualKernel


def _block_scores_body(
    q_ptr, lo_ptr, hi_ptr, cnt_ptr, out_ptr,
    H, N, D, R,
    sq_b, sq_h, sq_r, sq_d,
    sl_b, sl_h, sl_n, sl_d,
    sh_b, sh_h, sh_n, sh_d,
    sc_b, sc_n,
    IS_MAX: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program: one (row, KV head) and BLOCK_N blocks; loops over the R = G * Q query rows of the group.
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < N
    mask_d = offs_d < D
    tile = mask_n[:, None] & mask_d[None, :]
    lo = tl.load(lo_ptr + b * sl_b + h * sl_h + offs_n[:, None] * sl_n + offs_d[None, :] * sl_d,
                 mask=tile, other=0.0).to(tl.float32)
    hi = tl.load(hi_ptr + b * sh_b + h * sh_h + offs_n[:, None] * sh_n + offs_d[None, :] * sh_d,
                 mask=tile, other=0.0).to(tl.float32)
    if IS_MAX:
        acc = tl.full([BLOCK_N], float("-inf"), tl.float32)
    else:
        acc = tl.zeros([BLOCK_N], tl.float32)
    for r in range(0, R):
        q = tl.load(q_ptr + b * sq_b + h * sq_h + r * sq_r + offs_d * sq_d, mask=mask_d, other=0.0).to(tl.float32)
        s = tl.sum(tl.maximum(q[None, :] * lo, q[None, :] * hi), axis=1)
        if IS_MAX:
            acc = tl.maximum(acc, s)
        else:
            acc = acc + s
    cnt = tl.load(cnt_ptr + b * sc_b + offs_n * sc_n, mask=mask_n, other=0)
    acc = tl.where(cnt > 0, acc, float("-inf"))
    tl.store(out_ptr + pid * N + offs_n, acc, mask=mask_n)


block_scores_kernel = DualKernel(_block_scores_body)
