"""Triton body of the block-table decode attention kernel (imported lazily by :mod:`.block_attention`)."""

import triton.language as tl

from .triton_support import DualKernel


def _block_attention_body(
    q_ptr, k_ptr, v_ptr, valid_ptr, table_ptr, len_ptr,
    acc_ptr, m_ptr, l_ptr, lse_ptr,
    H, G, D, S, M, PER_SPLIT, NUM_SPLITS, scale,
    sq_b, sq_h, sq_d,
    sk_b, sk_p, sk_h, sk_s, sk_d,
    sv_b, sv_p, sv_h, sv_s, sv_d,
    sm_b, sm_h, sm_p, sm_s,
    st_b, st_h, st_m,
    sn_b, sn_h,
    BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program: one (row, KV head) and one split of its table entries; all G query heads of the group
    # at once (a (G, S) score tile per block).  Writes the split's online-softmax state (running max m,
    # sum l, unnormalised output acc) and each entry's log-sum-exp, from which the host combines splits
    # and derives per-block attention mass.  The pool may be shared by all rows (row strides sk_b = sv_b =
    # sm_b = 0) or per row (e.g. fetched blocks (B, U, H, S, D)); validity may be per KV head (sm_h).
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid // H).to(tl.int64)
    h = pid % H
    offs_g = tl.arange(0, BLOCK_G)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_g = offs_g < G
    mask_d = offs_d < D
    heads = h * G + offs_g
    q = tl.load(q_ptr + b * sq_b + heads[:, None] * sq_h + offs_d[None, :] * sq_d,
                mask=mask_g[:, None] & mask_d[None, :], other=0.0).to(tl.float32) * scale
    n = tl.load(len_ptr + b * sn_b + h * sn_h)
    start = split * PER_SPLIT
    end = tl.minimum(start + PER_SPLIT, n)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    row_heads = b * H * G + heads  # (b, q head) flattened
    for e in range(start, end):
        slot = tl.load(table_ptr + b * st_b + h * st_h + e * st_m).to(tl.int64)
        ok = tl.load(valid_ptr + b * sm_b + h * sm_h + slot * sm_p + offs_s * sm_s, mask=offs_s < S, other=0) != 0
        tile = ok[:, None] & mask_d[None, :]
        # Hidden tokens are never read (masked loads give 0), so garbage or NaN in them cannot leak.
        k = tl.load(k_ptr + b * sk_b + slot * sk_p + h * sk_h + offs_s[:, None] * sk_s + offs_d[None, :] * sk_d,
                    mask=tile, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + b * sv_b + slot * sv_p + h * sv_h + offs_s[:, None] * sv_s + offs_d[None, :] * sv_d,
                    mask=tile, other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
        s = tl.where(ok[None, :], s, float("-inf"))
        bm = tl.max(s, axis=1)
        bm_safe = tl.where(bm == float("-inf"), 0.0, bm)
        p = tl.exp(s - bm_safe[:, None])
        bl = tl.sum(p, axis=1)
        blse = tl.where(bl > 0, bm_safe + tl.log(tl.maximum(bl, 1e-30)), float("-inf"))
        tl.store(lse_ptr + row_heads * M + e, blse, mask=mask_g)
        m_new = tl.maximum(m_i, bm)
        m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_new_safe)
        beta = tl.exp(bm_safe - m_new_safe)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee") * beta[:, None]
        l_i = l_i * alpha + bl * beta
        m_i = m_new
    part = row_heads * NUM_SPLITS + split
    tl.store(m_ptr + part, m_i, mask=mask_g)
    tl.store(l_ptr + part, l_i, mask=mask_g)
    tl.store(acc_ptr + part[:, None] * D + offs_d[None, :], acc, mask=mask_g[:, None] & mask_d[None, :])


block_attention_kernel = DualKernel(_block_attention_body)
