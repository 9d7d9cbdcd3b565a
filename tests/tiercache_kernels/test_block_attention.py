"""The Triton block-table decode attention kernel against the torch reference (interpreted on CPU,
compiled on a GPU): random shapes, block tables, padding, GQA ratios, dtypes and split counts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tiercache_llm.sparse import (
    KeyDigests,
    SelectionConfig,
    block_table,
    paged_decode_attention,
    paged_decode_attention_reference,
    select,
)

TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def _pool_case(seed: int, dtype: torch.dtype, device: torch.device):
    gen = torch.Generator().manual_seed(seed)
    pick = lambda *xs: xs[int(torch.randint(len(xs), (1,), generator=gen))]  # noqa: E731
    b, h, g = pick(1, 2, 3), pick(1, 2, 4), pick(1, 2, 3, 8)
    s, d = pick(1, 5, 16, 32), pick(8, 24, 64)
    p, m = int(torch.randint(1, 12, (1,), generator=gen)), int(torch.randint(1, 7, (1,), generator=gen))
    query = torch.randn(b, h * g, d, generator=gen)
    k_pool = torch.randn(p, h, s, d, generator=gen) * pick(0.5, 3.0)
    v_pool = torch.randn(p, h, s, d, generator=gen)
    pool_valid = torch.rand(p, s, generator=gen) < pick(0.5, 0.9, 1.0)
    pool_valid[:, : int(torch.randint(0, s, (1,), generator=gen))] = pick(False, True)  # left padding
    hidden = ~pool_valid.view(p, 1, s).expand(p, h, s)
    k_pool[hidden], v_pool[hidden] = float("nan"), float("nan")  # hidden tokens must never be read
    table = torch.randint(0, p, (b, h, m), generator=gen, dtype=torch.int32)
    lengths = torch.randint(0, m + 1, (b, h), generator=gen, dtype=torch.int32)
    lengths[0, 0] = m
    table[lengths.unsqueeze(-1) <= torch.arange(m)] = 10_000  # unused entries may hold anything
    to = lambda x: x.to(device)  # noqa: E731
    return (to(query.to(dtype)), to(k_pool.to(dtype)), to(v_pool.to(dtype)), to(pool_valid), to(table),
            to(lengths), pick(1, 2, 3, 100))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_block_attention_kernel_matches_reference(device, seed, dtype):
    query, k_pool, v_pool, valid, table, lengths, splits = _pool_case(seed, dtype, device)
    from tiercache_kernels.block_attention import block_attention_triton

    out, mass = block_attention_triton(query, k_pool, v_pool, valid, table, lengths, num_splits=splits)
    want_out, want_mass = paged_decode_attention_reference(query, k_pool, v_pool, valid, table, lengths)
    assert out.dtype == dtype and mass.dtype == torch.float32
    assert not bool(torch.isnan(out).any())
    torch.testing.assert_close(out.float(), want_out.float(), rtol=TOL[dtype], atol=TOL[dtype])
    torch.testing.assert_close(mass, want_mass, rtol=1e-4, atol=1e-5)
    attended = mass.sum(-1) > 0
    torch.testing.assert_close(mass.sum(-1)[attended], torch.ones_like(mass.sum(-1)[attended]))


@pytest.mark.parametrize("splits", [1, 2, 5])
def test_sparse_decode_end_to_end_with_both_kernels_is_dense_at_full_budget(device, splits):
    """Digests -> scores (kernel) -> selection -> block table -> attention (kernel), left-padded batch,
    GQA 3:1; a budget covering the context gives dense SDPA."""
    gen = torch.Generator().manual_seed(splits)
    b, h, g, s, t, d = 3, 2, 3, 4, 37, 16
    keys, values = torch.randn(b, h, t, d, generator=gen), torch.randn(b, h, t, d, generator=gen)
    valid = torch.ones(b, t, dtype=torch.bool)
    valid[1, :9], valid[2, :30] = False, False
    query = torch.randn(b, h * g, 1, d, generator=gen)
    digests = KeyDigests.from_keys(keys, s, valid)
    n = digests.n_blocks
    dev = lambda x: x.to(device)  # noqa: E731
    dig = KeyDigests(s, dev(digests.lo), dev(digests.hi), dev(digests.count), t)
    sel = select(dev(query), dig, SelectionConfig(budget=t, sink=1, recent=4), backend="triton")
    assert torch.equal(sel.head_mask.cpu(), (digests.count > 0).unsqueeze(1).expand(b, h, n))
    # a pool laid out like fetched entries: (N, B, H, S, D) viewed as (N * B, H, S, D), slot j * B + row
    kb = F.pad(keys, (0, 0, 0, -t % s)).view(b, h, n, s, d).permute(2, 0, 1, 3, 4).reshape(n * b, h, s, d)
    vb = F.pad(values, (0, 0, 0, -t % s)).view(b, h, n, s, d).permute(2, 0, 1, 3, 4).reshape(n * b, h, s, d)
    pv = F.pad(valid, (0, -t % s)).view(b, n, s).transpose(0, 1).reshape(n * b, s)
    table, lengths = block_table(sel.head_mask)
    slots = (table * b + torch.arange(b, device=table.device).view(b, 1, 1)).to(torch.int32)
    out, mass = paged_decode_attention(dev(query[:, :, 0]), dev(kb), dev(vb), dev(pv), slots, lengths,
                                       backend="triton", num_splits=splits)
    want = F.scaled_dot_product_attention(query, keys, values, attn_mask=valid[:, None, None, :], enable_gqa=True)
    torch.testing.assert_close(out.cpu(), want[:, :, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mass.sum(-1).cpu(), torch.ones(b, h * g))


def test_kernel_reads_a_strided_pool_in_place(device):
    # the pool is a (S, P, H, D)-ordered buffer viewed as (P, H, S, D): no contiguous copy is needed
    gen = torch.Generator().manual_seed(7)
    base_k, base_v = torch.randn(8, 5, 2, 16, generator=gen), torch.randn(8, 5, 2, 16, generator=gen)
    k_pool, v_pool = base_k.to(device).permute(1, 2, 0, 3), base_v.to(device).permute(1, 2, 0, 3)
    valid = torch.ones(5, 8, dtype=torch.bool, device=device)
    table = torch.tensor([[[4, 1, 3], [0, 2, 0]]], dtype=torch.int32, device=device)
    lengths = torch.tensor([[3, 2]], dtype=torch.int32, device=device)
    query = torch.randn(1, 4, 16, generator=gen).to(device)
    from tiercache_kernels.block_attention import block_attention_triton

    out, mass = block_attention_triton(query, k_pool, v_pool, valid, table, lengths, num_splits=2)
    want_out, want_mass = paged_decode_attention_reference(query, k_pool, v_pool, valid, table, lengths)
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mass, want_mass, rtol=1e-4, atol=1e-6)
