"""Triton body of the page-table decode attention kernel (imported lazily by :mod:`.page_attention`)."""

import triton.language as tl

from .triton_support import DualKernel


def _page_attention_body(
    q_ptr, k_ptr, v_ptr, slot_ptr, page_ptr, valid_ptr, cnt_ptr,
    acc_ptr, m_ptr, l_ptr, lse_ptr,
    H, G, D, PS, M, PER_SPLIT, NUM_SPLITS, scale,
    sq_b, sq_r, sq_d,
    sk_n, sk_b, sk_h, sk_s, sk_d,
    sv_n, sv_b, sv_h, sv_s, sv_d,
    st_b, st_h, st_m,
    sp_b, sp_h, sp_m,
    sm_b, sm_h, sm_m, sm_t,
    sc_b, sc_h,
    BLOCK_G: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program: one (row b, KV head h) and one split (a contiguous range of its table entries).  Its G
    # query rows (query heads x query positions of the group) share every K/V tile.  A tile is BLOCK_E
    # table entries x BLOCK_P tokens, each token row read in place from the pool at
    # (slot, b, h, page * PS + t): a gather of rows, no copy.  Hidden tokens (validity False, entries
    # past the count) are masked loads, never read, so NaN in them cannot leak.  Online softmax over the
    # tiles; each entry's log-sum-exp is stored for the host to turn into its mass.
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid // H).to(tl.int64)
    h = (pid % H).to(tl.int64)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_t = tl.arange(0, BLOCK_E * BLOCK_P)
    offs_e = tl.arange(0, BLOCK_E)
    te = offs_t // BLOCK_P  # entry of each token row within the tile
    tt = offs_t % BLOCK_P  # token within the page
    mask_g = offs_g < G
    mask_d = offs_d < D
    rows = h * G + offs_g  # query rows of this KV head within the row's (Hq * Q) rows
    q = tl.load(q_ptr + b * sq_b + rows[:, None] * sq_r + offs_d[None, :] * sq_d,
                mask=mask_g[:, None] & mask_d[None, :], other=0.0).to(tl.float32) * scale
    n = tl.load(cnt_ptr + b * sc_b + h * sc_h)
    start = split * PER_SPLIT
    end = tl.minimum(start + PER_SPLIT, n)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    out_rows = (b * H * G + rows) * M  # lse row offsets, (B, Hq * Q, M) flattened
    for e0 in range(start, end, BLOCK_E):
        e = e0 + te
        live = (e < end) & (tt < PS)
        slot = tl.load(slot_ptr + b * st_b + h * st_h + e * st_m, mask=live, other=0).to(tl.int64)
        page = tl.load(page_ptr + b * sp_b + h * sp_h + e * sp_m, mask=live, other=0).to(tl.int64)
        ok = tl.load(valid_ptr + b * sm_b + h * sm_h + e * sm_m + tt * sm_t, mask=live, other=0) != 0
        tok = page * PS + tt
        tile = ok[:, None] & mask_d[None, :]
        k = tl.load(k_ptr + slot[:, None] * sk_n + b * sk_b + h * sk_h + tok[:, None] * sk_s + offs_d[None, :] * sk_d,
                    mask=tile, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + slot[:, None] * sv_n + b * sv_b + h * sv_h + tok[:, None] * sv_s + offs_d[None, :] * sv_d,
                    mask=tile, other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
        s = tl.where(ok[None, :], s, float("-inf"))
        bm = tl.max(s, axis=1)
        bm_safe = tl.where(bm == float("-inf"), 0.0, bm)
        p = tl.exp(s - bm_safe[:, None])
        pe = tl.sum(tl.reshape(p, (BLOCK_G, BLOCK_E, BLOCK_P)), axis=2)  # (G, E): each entry's sum
        lse_e = tl.where(pe > 0, bm_safe[:, None] + tl.log(tl.maximum(pe, 1e-30)), float("-inf"))
        ent = e0 + offs_e
        tl.store(lse_ptr + out_rows[:, None] + ent[None, :], lse_e, mask=mask_g[:, None] & (ent < end)[None, :])
        bl = tl.sum(p, axis=1)
        m_new = tl.maximum(m_i, bm)
        m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_new_safe)
        beta = tl.exp(bm_safe - m_new_safe)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee") * beta[:, None]
        l_i = l_i * alpha + bl * beta
        m_i = m_new
    part = (b * H * G + rows) * NUM_SPLITS + split
    tl.store(m_ptr + part, m_i, mask=mask_g)
    tl.store(l_ptr + part, l_i, mask=mask_g)
    tl.store(acc_ptr + part[:, None] * D + offs_d[None, :], acc, mask=mask_g[:, None] & mask_d[None, :])


page_attention_kernel = DualKernel(_page_attention_body)
