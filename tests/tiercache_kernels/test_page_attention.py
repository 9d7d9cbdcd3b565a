"""The Triton page-table decode kernel (``page_table_attention(backend="triton")``) against the torch
path of the same contract: interpreted on CPU, compiled on a GPU (``gpu`` marker).  Random page tables
over a pool with unused and duplicated slots, page sizes 1 / 4 / 5 / 8 / 16 (5: not a power of two),
GQA 1 / 3 / 4, one or two query positions, fp32 / bf16 / fp16 pools, strided pools, heads with different
entry counts (the rest padding), entries with no valid token, NaN in every token no valid entry names,
split counts 1..100."""

from __future__ import annotations

import pytest
import torch

from tiercache_llm.sparse.page_table import PageTable, page_table_attention

TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def _case(seed: int, dtype: torch.dtype, device: torch.device, *, g: int | None = None, q: int = 1,
          page: int | None = None, new: bool = True, strided: bool = False, empty: bool = False):
    gen = torch.Generator().manual_seed(seed)
    pick = lambda *xs: xs[int(torch.randint(len(xs), (1,), generator=gen))]  # noqa: E731
    b, h, d = pick(1, 2, 3), pick(1, 2, 3), pick(8, 24, 32, 64)
    g = pick(1, 3, 4) if g is None else g
    ps = pick(1, 4, 8, 16) if page is None else page
    k = pick(1, 2, 4)
    s = ps * k
    n = 0 if empty else int(torch.randint(1, 6, (1,), generator=gen))
    m = int(torch.randint(1, 7, (1,), generator=gen))
    counts = torch.randint(0, m + 1, (b, h), generator=gen)
    counts[0, 0] = m
    used = torch.arange(m) < counts.unsqueeze(-1)
    if empty:
        used[:] = False
        counts[:] = 0
    slots = torch.randint(0, max(n, 1), (b, h, m), generator=gen) if n else torch.zeros(b, h, m, dtype=torch.long)
    pages = torch.randint(0, k, (b, h, m), generator=gen)
    valid = (torch.rand(b, h, m, ps, generator=gen) < pick(0.6, 0.9, 1.0)) & used.unsqueeze(-1)
    if m > 1:
        valid[0, 0, 1] = False  # an entry with no valid token
    shape = (b, n, h, s, d) if strided else (n, b, h, s, d)
    k_pool = torch.randn(shape, generator=gen) * pick(0.5, 3.0)
    v_pool = torch.randn(shape, generator=gen)
    if strided:  # (B, N, ...) storage seen as (N, B, ...): non-contiguous pools
        k_pool, v_pool = k_pool.transpose(0, 1), v_pool.transpose(0, 1)
    # NaN in every pool token that no valid entry names: the kernel must never read it.
    named = torch.zeros(max(n, 1), b, h, s, dtype=torch.bool)
    for bb in range(b):
        for hh in range(h):
            for e in range(m):
                for t in range(ps):
                    if valid[bb, hh, e, t]:
                        named[slots[bb, hh, e], bb, hh, pages[bb, hh, e] * ps + t] = True
    k_pool[~named[:n]], v_pool[~named[:n]] = float("nan"), float("nan")
    query = torch.randn(b, h * g, q, d, generator=gen)
    nk = torch.randn(b, h, q, d, generator=gen) if new else None
    nv = torch.randn(b, h, q, d, generator=gen) if new else None
    to = lambda x: None if x is None else x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype)  # noqa: E731
    table = PageTable(slots.to(device), pages.to(device), valid.to(device), torch.zeros_like(slots).to(device), ps,
                      counts.to(device))
    return (to(query), to(k_pool), to(v_pool), table, to(nk), to(nv)), pick(None, 1, 2, 3, 100)


def _check(args, splits, dtype):
    query, k_pool, v_pool, table, nk, nv = args
    got = page_table_attention(query, k_pool, v_pool, table, nk, nv, backend="triton", num_splits=splits)
    cpu = lambda x: None if x is None else x.cpu()  # noqa: E731
    cpu_table = PageTable(*(cpu(getattr(table, f)) for f in ("slots", "pages", "valid", "fetch_pos")), table.page_size,
                          cpu(table.counts))
    want = page_table_attention(cpu(query), cpu(k_pool), cpu(v_pool), cpu_table, cpu(nk), cpu(nv), backend="torch")
    assert got.output.dtype == dtype and got.output.shape == want.output.shape
    assert got.block_mass.dtype == torch.float32 and got.block_mass.shape == want.block_mass.shape
    assert not bool(torch.isnan(got.output).any())
    torch.testing.assert_close(got.output.float().cpu(), want.output.float(), rtol=TOL[dtype], atol=TOL[dtype])
    torch.testing.assert_close(got.block_mass.cpu(), want.block_mass, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.new_mass.cpu(), want.new_mass, rtol=1e-4, atol=1e-5)
    total = (got.block_mass.sum(-1) + got.new_mass).cpu()
    attended = total > 0
    torch.testing.assert_close(total[attended], torch.ones_like(total[attended]))
    return got


@pytest.mark.parametrize("seed,g", [(0, 1), (1, 3), (2, 4), (3, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_page_kernel_matches_the_torch_path(device, seed, g, dtype):
    args, splits = _case(seed, dtype, device, g=g)
    _check(args, splits, dtype)


@pytest.mark.parametrize("page", [1, 5, 8])
def test_page_sizes_several_query_positions_and_strided_pools(device, page):
    args, splits = _case(40 + page, torch.float32, device, q=2, page=page, strided=True)
    assert not args[1].is_contiguous()
    _check(args, splits, torch.float32)


def test_more_query_rows_than_one_tile_and_an_odd_head_dim(device):
    """G * Q = 8 * 3 = 24 query rows per KV head (a 32-row tile), D = 24 (a 32-wide tile)."""
    args, _ = _case(25, torch.float32, device, g=8, q=3)
    query, k_pool, v_pool, table, nk, nv = args
    d = 24
    assert query.shape[-1] > d and query.shape[1] == 8 * k_pool.shape[2]
    sl = lambda x: None if x is None else x[..., :d].contiguous()  # noqa: E731
    _check((sl(query), sl(k_pool), sl(v_pool), table, sl(nk), sl(nv)), 2, torch.float32)


@pytest.mark.parametrize("new", [True, False])
def test_empty_pool_attends_only_the_new_tokens_or_nothing(device, new):
    args, _ = _case(9, torch.float32, device, new=new, empty=True)
    got = _check(args, None, torch.float32)
    if new:
        torch.testing.assert_close(got.new_mass.cpu(), torch.ones_like(got.new_mass.cpu()))
    else:
        assert not bool(got.output.any()) and not bool(got.new_mass.any())


def test_a_table_without_counts_reads_every_entry(device):
    args, _ = _case(13, torch.float32, device, g=2)
    query, k_pool, v_pool, table, nk, nv = args
    no_counts = PageTable(table.slots, table.pages, table.valid, table.fetch_pos, table.page_size)
    a = page_table_attention(query, k_pool, v_pool, table, nk, nv, backend="triton", num_splits=2)
    b = page_table_attention(query, k_pool, v_pool, no_counts, nk, nv, backend="triton", num_splits=2)
    torch.testing.assert_close(a.output, b.output, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a.block_mass, b.block_mass, rtol=1e-6, atol=1e-7)


def test_auto_is_the_torch_path_on_cpu_and_bad_backends_are_refused():
    args, _ = _case(3, torch.float32, torch.device("cpu"))
    got = page_table_attention(*args)
    want = page_table_attention(*args, backend="torch")
    assert torch.equal(got.output, want.output) and torch.equal(got.block_mass, want.block_mass)
    with pytest.raises(ValueError, match="backend"):
        page_table_attention(*args, backend="cuda")


@pytest.mark.parametrize("layout", ["k-then-v", "part-major"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_halves_of_a_joint_pool_are_read_in_place(device, dtype, layout):
    """Joint K/V pools hand the kernel their halves: ``kv[:, 0]`` / ``kv[:, 1]`` of ``(N, 2, B, H, S, D)``, or
    ``kv[:, :, :, 0]`` / ``kv[:, :, :, 1]`` of a sparse layer's part-major ``(N, B, H, 2, S, D)``: it reads them
    through their strides, matching the torch path."""
    (query, k_pool, v_pool, table, nk, nv), splits = _case(7, dtype, device, g=3, q=2)
    if layout == "k-then-v":
        kv = torch.stack((k_pool, v_pool), dim=1)
        k_half, v_half = kv[:, 0], kv[:, 1]
    else:
        kv = torch.stack((k_pool, v_pool), dim=3)
        k_half, v_half = kv[:, :, :, 0], kv[:, :, :, 1]
        assert k_half.stride(2) == 2 * k_pool.stride(2)
    assert not k_half.is_contiguous() and k_half.stride(0) == 2 * k_pool.stride(0)
    _check((query, k_half, v_half, table, nk, nv), splits, dtype)
