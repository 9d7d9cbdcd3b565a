"""The Triton block-scoring kernel against the torch reference (interpreted on CPU, compiled on a GPU)."""

from __future__ import annotations

import pytest
import torch

from tiercache_llm.sparse import KeyDigests, SelectionConfig, score_blocks, score_blocks_reference, select


def _case(seed: int, device: torch.device):
    gen = torch.Generator().manual_seed(seed)
    pick = lambda *xs: xs[int(torch.randint(len(xs), (1,), generator=gen))]  # noqa: E731
    b, h, g, q = pick(1, 2, 3), pick(1, 2, 3), pick(1, 2, 3, 4), pick(1, 1, 2)
    s, d = pick(1, 4, 16), pick(3, 16, 64)
    t = int(torch.randint(1, 150, (1,), generator=gen))
    keys = torch.randn(b, h, t, d, generator=gen) * pick(0.1, 1.0, 30.0)
    valid = torch.ones(b, t, dtype=torch.bool)
    for row in range(b):
        valid[row, : int(torch.randint(0, t, (1,), generator=gen))] = False
    valid &= torch.rand(b, t, generator=gen) < pick(0.5, 1.0)
    query = torch.randn(b, h * g, q, d, generator=gen)
    digests = KeyDigests.from_keys(keys, s, valid)
    return query.to(device), digests.lo.to(device), digests.hi.to(device), digests.count.to(device)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("gqa", ["max", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_block_scores_kernel_matches_reference(device, seed, gqa, dtype):
    query, lo, hi, count = _case(seed, device)
    query, lo, hi = query.to(dtype), lo.to(dtype), hi.to(dtype)
    got = score_blocks(query, lo, hi, count, gqa, backend="triton")
    want = score_blocks_reference(query, lo, hi, count, gqa)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.equal(torch.isneginf(got), torch.isneginf(want))  # empty blocks, exactly
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-5, atol=1e-4)


def test_block_scores_kernel_on_strided_digests(device):
    # digests stored (B, N, H, D) and viewed as (B, H, N, D): the kernel reads strides, copies nothing
    gen = torch.Generator().manual_seed(1)
    lo = torch.randn(2, 7, 3, 16, generator=gen).to(device).transpose(1, 2)
    hi = lo + torch.rand(2, 3, 7, 16, generator=gen).to(device)
    count = torch.tensor([[4, 4, 0, 4, 4, 4, 1], [4] * 7], device=device)
    query = torch.randn(2, 6, 1, 16, generator=gen).to(device)
    got = score_blocks(query, lo, hi, count, backend="triton")
    want = score_blocks_reference(query, lo, hi, count)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_selection_with_the_kernel_equals_selection_with_the_reference(device):
    query, lo, hi, count = _case(5, device)
    digests = KeyDigests(4, lo, hi, count, 0)  # block size is not used by selection
    config = SelectionConfig(budget=0.3, sink=2, recent=3)
    a = select(query, digests, config, backend="triton")
    b = select(query, digests, config, backend="torch")
    # equal up to ties broken by float rounding: compare the selected score mass instead of masks
    assert torch.equal(a.head_mask.sum(-1), b.head_mask.sum(-1)) or torch.allclose(
        (a.scores.clamp(min=-1e30) * a.head_mask).sum(-1), (b.scores.clamp(min=-1e30) * b.head_mask).sum(-1), rtol=1e-4
    )
