"""Decode attention over selected blocks equals dense SDPA restricted to the selected tokens; padding
gets no weight; block masses are the softmax weights per block."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from tiercache_llm.sparse import (
    KeyDigests,
    SelectionConfig,
    paged_decode_attention,
    paged_decode_attention_reference,
    select,
    sparse_attention_reference,
)


@st.composite
def setups(draw):
    b = draw(st.integers(1, 3))
    h = draw(st.integers(1, 3))
    g = draw(st.sampled_from([1, 2, 3]))
    s = draw(st.sampled_from([1, 3, 4, 8]))
    n = draw(st.integers(1, 6))
    d = draw(st.sampled_from([4, 16]))
    q = draw(st.sampled_from([1, 1, 3]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    t = n * s - draw(st.integers(0, s - 1))  # the last block may be partial
    keys = torch.randn(b, h, t, d, generator=gen)
    values = torch.randn(b, h, t, d, generator=gen)
    valid = torch.ones(b, t, dtype=torch.bool)
    for row in range(b):
        valid[row, : draw(st.integers(0, t - 1))] = False
    query = torch.randn(b, h * g, q, d, generator=gen)
    new_k = torch.randn(b, h, q, d, generator=gen)
    new_v = torch.randn(b, h, q, d, generator=gen)
    return keys, values, valid, query, new_k, new_v, s


def _blocks(x, s):
    """(B, H, T, D) -> (B, H, N, S, D), zero-padding the tail."""
    b, h, t, d = x.shape
    return F.pad(x, (0, 0, 0, -t % s)).view(b, h, -1, s, d)


def _dense(query, keys, values, allowed, new_k, new_v):
    """SDPA with GQA over the context tokens ``allowed`` (B, H or 1, T) and the new tokens, causal."""
    b, hq, q, d = query.shape
    h, t = keys.shape[1], keys.shape[2]
    g = hq // h
    ctx = allowed.repeat_interleave(g, dim=1) if allowed.shape[1] == h else allowed.expand(b, hq, t)
    mask = torch.cat((ctx[:, :, None, :].expand(b, hq, q, t), torch.ones(q, q, dtype=torch.bool).tril().expand(b, hq, q, q)), -1)
    k = torch.cat((keys, new_k), 2)
    v = torch.cat((values, new_v), 2)
    out = F.scaled_dot_product_attention(query, k, v, attn_mask=mask, enable_gqa=True)
    kr = k.repeat_interleave(g, 1)
    weights = torch.softmax((query @ kr.transpose(-1, -2) / d**0.5).masked_fill(~mask, float("-inf")), -1)
    return out, weights


@settings(max_examples=100, deadline=None)
@given(setups())
def test_budget_covering_the_context_is_dense_attention(setup):
    keys, values, valid, query, new_k, new_v, s = setup
    b, h, t, d = keys.shape
    digests = KeyDigests.from_keys(keys, s, valid)
    sel = select(query, digests, SelectionConfig(budget=t, sink=0, recent=0), backend="torch")
    assert torch.equal(sel.head_mask, (digests.count > 0).unsqueeze(1).expand_as(sel.head_mask))
    f = sel.fetch
    tv = F.pad(valid, (0, -t % s)).view(b, -1, s)[:, f]
    res = sparse_attention_reference(query, _blocks(keys, s)[:, :, f], _blocks(values, s)[:, :, f],
                                     sel.fetch_head_mask, tv, new_k, new_v)
    want, weights = _dense(query, keys, values, valid[:, None, :], new_k, new_v)
    torch.testing.assert_close(res.output, want, rtol=1e-5, atol=1e-5)
    # masses: the dense softmax weights summed per block, mean over query positions; they sum to 1
    per_token = F.pad(weights[..., :t], (0, -t % s)).view(b, weights.shape[1], query.shape[2], -1, s).sum(-1).mean(2)
    torch.testing.assert_close(res.block_mass, per_token[:, :, f], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res.block_mass.sum(-1) + res.new_mass, torch.ones(b, query.shape[1]))


@settings(max_examples=100, deadline=None)
@given(setups(), st.integers(0, 20), st.integers(0, 4), st.integers(0, 6))
def test_partial_selection_is_dense_attention_over_the_selected_tokens(setup, budget, sink, recent):
    keys, values, valid, query, new_k, new_v, s = setup
    b, h, t, d = keys.shape
    digests = KeyDigests.from_keys(keys, s, valid)
    sel = select(query, digests, SelectionConfig(budget=budget, sink=sink, recent=recent), backend="torch")
    f = sel.fetch
    tv = F.pad(valid, (0, -t % s)).view(b, -1, s)[:, f]
    # poison every token that must get no weight: padding, and blocks not selected for the head
    res = sparse_attention_reference(query, _blocks(keys, s)[:, :, f], _blocks(values, s)[:, :, f],
                                     sel.fetch_head_mask, tv, new_k, new_v)
    token_sel = sel.head_mask.repeat_interleave(s, dim=2)[:, :, :t] & valid[:, None, :]
    want, weights = _dense(query, keys, values, token_sel, new_k, new_v)
    torch.testing.assert_close(res.output, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(res.block_mass.sum(-1) + res.new_mass, torch.ones(b, query.shape[1]))
    assert not bool(res.block_mass[~sel.fetch_head_mask.repeat_interleave(query.shape[1] // h, 1)].any())


def test_padded_and_unselected_tokens_get_zero_weight():
    b, h, u, s, d = 2, 2, 3, 4, 8
    query = torch.randn(b, 4, 1, d)
    keys, values = torch.randn(b, h, u, s, d), torch.randn(b, h, u, s, d)
    mask = torch.tensor([[True, False, True], [True, True, True]]).view(b, 1, u).expand(b, h, u)
    valid = torch.ones(b, u, s, dtype=torch.bool)
    valid[0, 0, :3] = False
    valid[1, 2] = False  # a selected block holding only padding
    base = sparse_attention_reference(query, keys, values, mask, valid)
    poisoned_k, poisoned_v = keys.clone(), values.clone()
    hidden = ~(mask.unsqueeze(-1) & valid.unsqueeze(1))
    poisoned_k[hidden], poisoned_v[hidden] = 1e4, float("nan")
    res = sparse_attention_reference(query, poisoned_k, poisoned_v, mask, valid)
    assert torch.equal(res.output, base.output) and torch.equal(res.block_mass, base.block_mass)
    assert bool((res.block_mass[0, :, 1] == 0).all() and (res.block_mass[1, :, 2] == 0).all())
    torch.testing.assert_close(res.block_mass.sum(-1), torch.ones(b, 4))


def test_nothing_to_attend_gives_zeros_not_nan():
    res = sparse_attention_reference(torch.randn(1, 2, 1, 4), torch.randn(1, 1, 2, 2, 4), torch.randn(1, 1, 2, 2, 4),
                                     torch.zeros(1, 1, 2, dtype=torch.bool))
    assert torch.equal(res.output, torch.zeros(1, 2, 1, 4)) and not bool(res.block_mass.any())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_inputs_match_the_float32_computation(dtype):
    gen = torch.Generator().manual_seed(3)
    query, keys, values = (torch.randn(2, 6, 1, 16, generator=gen), torch.randn(2, 3, 4, 8, 16, generator=gen),
                           torch.randn(2, 3, 4, 8, 16, generator=gen))
    mask = torch.rand(2, 3, 4, generator=gen) < 0.6
    mask[..., 0] = True
    low = sparse_attention_reference(query.to(dtype), keys.to(dtype), values.to(dtype), mask)
    ref = sparse_attention_reference(query.to(dtype).float(), keys.to(dtype).float(), values.to(dtype).float(), mask)
    assert low.output.dtype == dtype
    torch.testing.assert_close(low.output, ref.output.to(dtype))


@settings(max_examples=60, deadline=None)
@given(setups(), st.integers(0, 2**31 - 1))
def test_paged_form_reads_blocks_through_a_table(setup, seed):
    keys, values, valid, query, _, _, s = setup
    query = query[:, :, :1]
    b, h, t, d = keys.shape
    gen = torch.Generator().manual_seed(seed)
    digests = KeyDigests.from_keys(keys, s, valid)
    sel = select(query, digests, SelectionConfig(budget=int(torch.randint(0, t + 1, (1,), generator=gen)), sink=1, recent=2),
                 backend="torch")
    kb, vb = _blocks(keys, s), _blocks(values, s)  # (B, H, N, S, D)
    n = kb.shape[2]
    tv = F.pad(valid, (0, -t % s)).view(b, n, s)
    # a shuffled pool of (row, block) slots with spare slots, as a fetch buffer would hold them
    perm = torch.randperm(b * n + 3, generator=gen)
    slot = perm[: b * n].view(b, n)
    k_pool = torch.randn(b * n + 3, h, s, d, generator=gen)
    v_pool = torch.randn(b * n + 3, h, s, d, generator=gen)
    pool_valid = torch.zeros(b * n + 3, s, dtype=torch.bool)
    k_pool[slot] = kb.transpose(1, 2)
    v_pool[slot] = vb.transpose(1, 2)
    pool_valid[slot] = tv
    from tiercache_llm.sparse import block_table

    table, lengths = block_table(sel.head_mask)
    slots = torch.gather(slot.unsqueeze(1).expand(b, h, n), 2, table.long()).to(torch.int32)
    out, mass = paged_decode_attention(query[:, :, 0], k_pool, v_pool, pool_valid, slots, lengths, backend="torch")
    ref = sparse_attention_reference(query, kb, vb, sel.head_mask, tv)
    torch.testing.assert_close(out, ref.output[:, :, 0], rtol=1e-5, atol=1e-5)
    g = query.shape[1] // h
    want_mass = torch.gather(ref.block_mass, 2, table.long().repeat_interleave(g, 1))
    used = (torch.arange(table.shape[2]) < lengths.unsqueeze(-1)).repeat_interleave(g, 1)
    torch.testing.assert_close(mass, torch.where(used, want_mass, 0.0), rtol=1e-5, atol=1e-6)


def test_paged_form_rejects_bad_tables():
    q, pool = torch.randn(1, 2, 4), torch.randn(3, 1, 2, 4)
    valid = torch.ones(3, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="block_table entries"):
        paged_decode_attention_reference(q, pool, pool, valid, torch.tensor([[[0, 3]]]), torch.tensor([[2]]))
    with pytest.raises(ValueError, match="lengths"):
        paged_decode_attention_reference(q, pool, pool, valid, torch.tensor([[[0, 1]]]), torch.tensor([[3]]))
    with pytest.raises(ValueError, match="pool_valid"):
        paged_decode_attention_reference(q, pool, pool, valid[:2], torch.tensor([[[0]]]), torch.tensor([[1]]))
