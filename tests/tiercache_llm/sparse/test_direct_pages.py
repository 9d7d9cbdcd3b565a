"""The CPU decode attention without a page table (``page_table.attend_pages_cpu``, what
``sparse_layer.attend_selected`` runs first on CPU): where it applies (one torch thread, float32 pools, one
query position with its new token, every (row, KV head) attending as many pages) it gives the general path's
output, block masses and new-token mass bit for bit (``build_page_table_from_valid`` + ``page_table_attention``
+ ``entry_mass_to_blocks``), with the values summed either way (``page_table.VALUES_BY_BAG``: a weighted
``embedding_bag`` on both paths, the default, or gathers and matmuls on both), and the reference's within float
tolerance: GQA, left padding, a partial tail,
pages dividing the block, one or several (row, head)s per chunk, joint-pool halves, permuted slot maps, NaN in
every pool token no head attends.  Elsewhere it declines (``None``) and the general path runs; a non-finite
hidden token among the gathered ones makes it decline too.  Also: ``BlockSelection.pages_each`` from
``select`` is every (row, head)'s page count, and a digest append with ``valid=None`` is the all-valid one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from tiercache_llm.sparse import KeyDigests, sparse_attention_reference
from tiercache_llm.sparse import page_table
from tiercache_llm.sparse.page_table import (
    attend_pages_cpu,
    build_page_table_from_valid,
    entry_mass_to_blocks,
    page_table_attention,
)
from tiercache_llm.sparse.selection import BlockSelection, SelectionConfig, select
from tiercache_llm.sparse_layer import attend_selected


def equal_count_case(b, h, g, d, s, page, n_blocks, tail_cut, each, *, pad=True, permute=True, extra_slots=2,
                     hidden="finite", joint=False, pages_each=True, force_last=True, seed=0):
    """Every (row, KV head) selects ``each`` random pages (forced: its last page, so the partial tail is among
    them; ``force_last=False``: of the context's pages, a random one left out of every (row, head)'s choice
    and the last page left to chance).  Pool tokens no (row, head) attends by page hold NaN; tokens of attended pages that are hidden (left
    padding, at or past the context) hold ``hidden`` garbage: ``"finite"`` (large values) or ``"nan"``."""
    gen = torch.Generator().manual_seed(seed)
    k = s // page
    t = n_blocks * s - tail_cut
    p = -(-t // page)
    each = max(1, min(each, p))
    valid = torch.ones(b, t, dtype=torch.bool)
    if pad:
        for row in range(b):
            valid[row, : int(torch.randint(0, t // 2 + 1, (1,), generator=gen))] = False
    pm = torch.zeros(b, h, p, dtype=torch.bool)
    for row in range(b):
        for head in range(h):
            if force_last:
                pick = torch.randperm(p - 1, generator=gen)[: each - 1]
                pm[row, head, pick] = True
                pm[row, head, p - 1] = True
            else:
                pm[row, head, torch.randperm(p, generator=gen)[:each]] = True
    head_mask = F.pad(pm, (0, n_blocks * k - p)).view(b, h, n_blocks, k).any(-1)
    row_mask = head_mask.any(1)
    fetch = row_mask.any(0).nonzero().flatten()
    sel = BlockSelection(head_mask, row_mask, fetch, torch.zeros(b, h, p), torch.zeros(b, dtype=torch.long),
                         pm if k > 1 else None, k, each if pages_each else None)
    u = int(fetch.numel())
    slot_of_fetch = torch.randperm(u + extra_slots, generator=gen)[:u] if permute else torch.arange(u)
    n_slots = u + extra_slots
    keys = torch.randn(b, h, n_blocks * s, d, generator=gen)
    values = torch.randn(b, h, n_blocks * s, d, generator=gen)
    kv = torch.full((n_slots, 2, b, h, s, d), float("nan"))
    for i, blk in enumerate(fetch.tolist()):
        kv[slot_of_fetch[i], 0] = keys.view(b, h, n_blocks, s, d)[:, :, blk]
        kv[slot_of_fetch[i], 1] = values.view(b, h, n_blocks, s, d)[:, :, blk]
    # by page: attended pages of each (row, head) keep their tokens, everything else NaN
    page_tokens = pm.repeat_interleave(page, -1)  # (B, H, p * page)
    pos = torch.arange(p * page)
    tok_ok = torch.zeros(b, p * page, dtype=torch.bool)
    tok_ok[:, :t] = valid
    attended = page_tokens & tok_ok.unsqueeze(1)  # (B, H, p * page)
    for i, blk in enumerate(fetch.tolist()):
        cols = pos[blk * s:(blk + 1) * s] if blk * s < p * page else None
        in_page = torch.zeros(b, h, s, dtype=torch.bool)
        hid = torch.zeros(b, h, s, dtype=torch.bool)
        if cols is not None:
            w = cols.numel()
            in_page[..., :w] = page_tokens[..., cols]
            hid[..., :w] = page_tokens[..., cols] & ~attended[..., cols]
        for half in (0, 1):
            blkv = kv[slot_of_fetch[i], half]  # (B, H, S, D) view
            blkv[~in_page] = float("nan")
            blkv[hid] = 1e4 if hidden == "finite" else float("nan")
    if joint:
        k_pool, v_pool = kv[:, 0], kv[:, 1]
    else:
        k_pool, v_pool = kv[:, 0].contiguous(), kv[:, 1].contiguous()
    query = torch.randn(b, h * g, 1, d, generator=gen)
    nk = torch.randn(b, h, 1, d, generator=gen)
    nv = torch.randn(b, h, 1, d, generator=gen)
    return dict(query=query, k_pool=k_pool, v_pool=v_pool, sel=sel, slot_of_fetch=slot_of_fetch, valid=valid,
                ctx=t, s=s, nk=nk, nv=nv, attended=attended, p=p, page=page, fetch=fetch)


def general(c, mass=True, scale=None):
    table = build_page_table_from_valid(c["sel"], c["slot_of_fetch"], c["valid"], c["ctx"], c["s"])
    res = page_table_attention(c["query"], c["k_pool"], c["v_pool"], table, c["nk"], c["nv"], scale=scale,
                               backend="torch", mass=mass)
    u = int(c["sel"].fetch.numel())
    bm = entry_mass_to_blocks(res.block_mass, table, u) if mass else res.block_mass.new_zeros(
        res.block_mass.shape[0], res.block_mass.shape[1], u)
    return res.output, bm, res.new_mass


def direct(c, mass=True, scale=None):
    return attend_pages_cpu(c["query"], c["k_pool"], c["v_pool"], c["sel"], c["slot_of_fetch"], c["valid"],
                            c["ctx"], c["s"], c["nk"], c["nv"], scale, mass)


def reference(c, scale=None):
    """sparse_attention_reference over the fetched blocks with each (row, head)'s attended tokens."""
    sel, s = c["sel"], c["s"]
    kbuf = c["k_pool"][c["slot_of_fetch"]].permute(1, 2, 0, 3, 4)
    vbuf = c["v_pool"][c["slot_of_fetch"]].permute(1, 2, 0, 3, 4)
    b, h = kbuf.shape[:2]
    span = c["attended"].shape[-1]
    n_tok = sel.head_mask.shape[-1] * s
    att = F.pad(c["attended"], (0, n_tok - span)).view(b, h, -1, s)[:, :, sel.fetch]  # (B, H, U, S)
    return sparse_attention_reference(c["query"], kbuf, vbuf, sel.fetch_head_mask, att, c["nk"], c["nv"], scale=scale)


def assert_same(got, want):
    for x, y in zip(got, want):
        assert x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y)


def assert_direct(got, want):
    """The direct path's ``(output, block_mass, new_mass)`` against the general path's: bit for bit, whichever way
    ``VALUES_BY_BAG`` sums the values (both paths sum them the same way)."""
    assert_same(got, want)


@pytest.fixture(params=[True, False], ids=["bag", "matmul"])
def values_by_bag(request):
    old = page_table.VALUES_BY_BAG
    page_table.VALUES_BY_BAG = request.param
    yield request.param
    page_table.VALUES_BY_BAG = old


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 3), h=st.integers(1, 3), g=st.sampled_from([1, 3]), d=st.sampled_from([4, 8]),
       sp=st.sampled_from([(8, 2), (8, 8), (16, 4), (12, 4)]), n_blocks=st.integers(1, 6),
       tail=st.integers(0, 7), each=st.integers(1, 12), pad=st.booleans(), joint=st.booleans(),
       chunk=st.sampled_from([1, 700, 1 << 19]), pages_each=st.booleans(), scale=st.sampled_from([None, 0.3]),
       bag=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_direct_path_is_the_general_path_bit_for_bit(b, h, g, d, sp, n_blocks, tail, each, pad, joint, chunk,
                                                      pages_each, scale, bag, seed):
    """Bit for bit with ``VALUES_BY_BAG`` off; with it on, the output within float32 rounding (``assert_direct``)."""
    s, page = sp
    before = torch.get_num_threads()
    old_chunk, old_bag = page_table._CHUNK_BYTES, page_table.VALUES_BY_BAG
    torch.set_num_threads(1)
    page_table._CHUNK_BYTES = chunk  # one (row, head) per chunk, a few, or all of them in one
    page_table.VALUES_BY_BAG = bag
    try:
        c = equal_count_case(b, h, g, d, s, page, n_blocks, tail % s, each, pad=pad, joint=joint,
                             pages_each=pages_each, seed=seed)
        for mass in (True, False):
            got = direct(c, mass, scale)
            assert got is not None
            want = general(c, mass, scale)
            assert_direct((got.output, got.block_mass, got.new_mass), want)
            if not mass:
                assert not bool(got.block_mass.any())
        assert not bool(got.output.isnan().any())
        ref = reference(c, scale)
        torch.testing.assert_close(got.output, ref.output, rtol=1e-5, atol=1e-5)
        got = direct(c, True, scale)
        torch.testing.assert_close(got.block_mass, ref.block_mass, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got.new_mass, ref.new_mass, rtol=1e-4, atol=1e-6)
        # attend_selected runs it (same bits as calling it)
        sel_out = attend_selected(c["query"], c["k_pool"], c["v_pool"], c["slot_of_fetch"], c["sel"], c["valid"],
                                  c["ctx"], c["s"], c["nk"], c["nv"], scale)
        assert_same((sel_out.output, sel_out.block_mass, sel_out.new_mass), (got.output, got.block_mass, got.new_mass))
    finally:
        torch.set_num_threads(before)
        page_table._CHUNK_BYTES, page_table.VALUES_BY_BAG = old_chunk, old_bag


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 3), h=st.integers(1, 3), g=st.sampled_from([1, 3]), sp=st.sampled_from([(8, 2), (16, 4),
       (12, 4), (8, 8)]), n_blocks=st.integers(1, 5), tail=st.integers(0, 7), each=st.integers(1, 12),
       force_last=st.booleans(), hidden=st.sampled_from(["finite", "nan"]), bag=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_without_padding_the_partial_tail_is_masked_without_a_bias(b, h, g, sp, n_blocks, tail, each, force_last,
                                                                  hidden, bag, seed):
    """No left padding (the decode benchmarks' case): the partial last page's positions past the context are the
    only hidden tokens; where every (row, head) attends that page they are masked by filling its last score
    columns, elsewhere by the bias.  Either way ``attend_selected`` gives the general path's result bit for bit,
    with finite or NaN garbage in the hidden tokens (NaN keys there are masked; NaN values send the call to the
    general path, which zeroes them)."""
    s, page = sp
    before, old_bag = torch.get_num_threads(), page_table.VALUES_BY_BAG
    torch.set_num_threads(1)
    page_table.VALUES_BY_BAG = bag
    try:
        c = equal_count_case(b, h, g, 8, s, page, n_blocks, tail % s, each, pad=False, hidden=hidden,
                             force_last=force_last, seed=seed)
        got = attend_selected(c["query"], c["k_pool"], c["v_pool"], c["slot_of_fetch"], c["sel"], c["valid"],
                              c["ctx"], c["s"], c["nk"], c["nv"], None)
        assert_direct((got.output, got.block_mass, got.new_mass), general(c))
        assert not bool(got.output.isnan().any())
        direct_out = direct(c)
        if hidden == "finite":
            assert direct_out is not None
        if direct_out is not None:
            assert_same((direct_out.output, direct_out.block_mass, direct_out.new_mass),
                        (got.output, got.block_mass, got.new_mass))
        else:
            assert_same((got.output, got.block_mass, got.new_mass), general(c))
    finally:
        torch.set_num_threads(before)
        page_table.VALUES_BY_BAG = old_bag


@pytest.mark.parametrize("seed", range(4))
def test_a_non_finite_hidden_token_sends_the_call_to_the_general_path(one_thread, values_by_bag, seed):
    """NaN in the hidden tokens of attended pages (left padding, past the context): the direct path's bias
    cannot hide them, so it declines, and ``attend_selected`` gives the general path's (exact) result."""
    c = equal_count_case(2, 3, 3, 8, 8, 2, 5, 3, 6, hidden="nan", seed=seed)
    assert direct(c) is None
    got = attend_selected(c["query"], c["k_pool"], c["v_pool"], c["slot_of_fetch"], c["sel"], c["valid"], c["ctx"],
                          c["s"], c["nk"], c["nv"], None)
    assert_same((got.output, got.block_mass, got.new_mass), general(c))
    assert not bool(got.output.isnan().any())
    torch.testing.assert_close(got.output, reference(c).output, rtol=1e-5, atol=1e-5)


def test_it_declines_where_it_does_not_apply(one_thread):
    c = equal_count_case(2, 2, 3, 8, 8, 2, 4, 3, 4, seed=1)
    assert direct(c) is not None
    # heads with different page counts
    sel = c["sel"]
    pm = sel.page_mask.clone()
    first = int(pm[0, 0].nonzero()[0])
    pm[0, 0, first] = False
    uneven = BlockSelection(sel.head_mask, sel.row_mask, sel.fetch, sel.scores, sel.budget, pm, sel.pages_per_block)
    assert direct({**c, "sel": uneven}) is None
    assert direct({**c, "nk": None, "nv": None}) is None  # no new token
    q2 = {**c, "query": c["query"].expand(-1, -1, 2, -1).contiguous(), "nk": c["nk"].expand(-1, -1, 2, -1),
          "nv": c["nv"].expand(-1, -1, 2, -1)}
    assert direct(q2) is None  # two query positions
    assert direct({**c, "k_pool": c["k_pool"].half(), "v_pool": c["v_pool"].half()}) is None
    assert direct({**c, "k_pool": c["k_pool"].transpose(1, 2)}) is None  # no page-row view
    with torch.enable_grad():
        assert direct({**c, "query": c["query"].requires_grad_()}) is None
    torch.set_num_threads(2)
    assert direct(c) is None


@settings(max_examples=60, deadline=None)
@given(b=st.integers(1, 4), h=st.integers(1, 3), g=st.sampled_from([1, 3]), t=st.integers(1, 90),
       page=st.sampled_from([1, 2, 4, 8]), k=st.sampled_from([1, 2, 4]), budget=st.one_of(st.integers(0, 60),
       st.floats(0.05, 1.0)), sink=st.integers(0, 6), recent=st.integers(0, 12), pad=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_pages_each_is_every_heads_page_count(b, h, g, t, page, k, budget, sink, recent, pad, seed):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(b, h, t, 8, generator=gen)
    valid = torch.ones(b, t, dtype=torch.bool)
    if pad:
        for row in range(b):
            valid[row, : int(torch.randint(0, t, (1,), generator=gen))] = False
    digests = KeyDigests.from_keys(keys, page, valid, storage=torch.float16)
    config = SelectionConfig(budget=budget, sink=sink, recent=recent, score="bound+landmark")
    sel = select(torch.randn(b, h * g, 1, 8, generator=gen), digests, config, pages_per_block=k)
    if sel.pages_each is not None:
        assert bool((sel.pages.sum(-1) == sel.pages_each).all())
    if not pad and sink and recent and b == 1:  # uniform costs, one row: always known
        assert sel.pages_each is not None


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 3), h=st.integers(1, 3), s=st.sampled_from([1, 2, 3, 8]), t0=st.integers(0, 20),
       steps=st.integers(1, 20), storage=st.sampled_from([torch.float16, torch.float32]),
       seed=st.integers(0, 2**31 - 1))
def test_an_append_without_validity_is_the_all_valid_append(b, h, s, t0, steps, storage, seed):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(b, h, t0 + steps, 8, generator=gen) * 3
    a = KeyDigests.empty(b, h, 8, s, storage=storage)
    c = KeyDigests.empty(b, h, 8, s, storage=storage)
    for t in range(t0 + steps):
        ones = torch.ones(b, 1, dtype=torch.bool)
        a.append(keys[:, :, t:t + 1], None)
        c.append(keys[:, :, t:t + 1], ones)
        assert torch.equal(a.buffer(), c.buffer()) and torch.equal(a.count, c.count)
        assert torch.equal(a._tail, c._tail)


@settings(max_examples=30, deadline=None)
@given(b=st.integers(1, 3), h=st.integers(1, 3), g=st.sampled_from([1, 3]), sp=st.sampled_from([(8, 2), (16, 4),
       (8, 8)]), n_blocks=st.integers(1, 5), tail=st.integers(0, 7), each=st.integers(1, 12), pad=st.booleans(),
       bag=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_the_garbage_in_hidden_tokens_never_changes_a_bit(b, h, g, sp, n_blocks, tail, each, pad, bag, seed):
    """Which CPU path runs a call can depend on the bytes of tokens no head attends (finite garbage: the direct
    path; NaN: it declines and the table path runs): the result must not (what lets two caches whose pools hold
    different garbage, e.g. two strategies, decode bit for bit alike), with either way of summing the values."""
    s, page = sp
    before, old_bag = torch.get_num_threads(), page_table.VALUES_BY_BAG
    torch.set_num_threads(1)
    page_table.VALUES_BY_BAG = bag
    try:
        runs = []
        for hidden in ("finite", "nan"):
            c = equal_count_case(b, h, g, 8, s, page, n_blocks, tail % s, each, pad=pad, hidden=hidden, seed=seed)
            got = attend_selected(c["query"], c["k_pool"], c["v_pool"], c["slot_of_fetch"], c["sel"], c["valid"],
                                  c["ctx"], c["s"], c["nk"], c["nv"], None)
            runs.append((got.output, got.block_mass, got.new_mass))
        assert_same(runs[1], runs[0])
        assert not bool(runs[0][0].isnan().any())
    finally:
        torch.set_num_threads(before)
        page_table.VALUES_BY_BAG = old_bag


def test_a_head_whose_entries_are_all_hidden_attends_only_its_new_token(one_thread, values_by_bag):
    """The table path's chunked form, a (row, head) whose only entry is all hidden with NaN keys and values: its
    softmax row is NaN until masked exactly (the bag leaves the hidden values out, so the NaN shows only in the
    new token's weight, and must still be caught): output the new token's value, new-token mass 1."""
    from tiercache_llm.sparse.page_table import PageTable

    gen = torch.Generator().manual_seed(0)
    k_pool = torch.full((2, 1, 2, 4, 8), float("nan"))
    v_pool = torch.full((2, 1, 2, 4, 8), float("nan"))
    k_pool[1, 0, 0], v_pool[1, 0, 0] = torch.randn(4, 8, generator=gen), torch.randn(4, 8, generator=gen)
    valid = torch.zeros(1, 2, 1, 4, dtype=torch.bool)
    valid[0, 0] = True  # head 0 attends slot 1's tokens; head 1's entry (slot 0) is all hidden
    table = PageTable(slots=torch.tensor([[[1], [0]]]), pages=torch.zeros(1, 2, 1, dtype=torch.long), valid=valid,
                      fetch_pos=torch.tensor([[[0], [0]]]), page_size=4, counts=torch.tensor([[1, 1]]))
    query = torch.randn(1, 2, 1, 8, generator=gen)
    nk, nv = torch.randn(1, 2, 1, 8, generator=gen), torch.randn(1, 2, 1, 8, generator=gen)
    res = page_table_attention(query, k_pool, v_pool, table, nk, nv, backend="torch")
    assert not bool(res.output.isnan().any())
    torch.testing.assert_close(res.output[0, 1, 0], nv[0, 1, 0])
    assert float(res.new_mass[0, 1]) == 1.0 and float(res.block_mass[0, 1].sum()) == 0.0
    keys, values = torch.cat((k_pool[1, 0, 0], nk[0, 0]), 0), torch.cat((v_pool[1, 0, 0], nv[0, 0]), 0)
    w = torch.softmax(query[0, 0, 0] @ keys.T / 8 ** 0.5, -1)
    torch.testing.assert_close(res.output[0, 0, 0], w @ values, rtol=1e-5, atol=1e-6)
