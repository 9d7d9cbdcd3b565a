"""The page-table contract (``tiercache_llm.sparse.page_table``): ``build_page_table`` +
``page_table_attention`` + ``entry_mass_to_blocks`` give ``sparse_attention_reference``'s result over the
same selection (each KV head its own pages), whatever the pool layout: random shapes, GQA 1..4, pages
dividing the block, left padding, a partial tail, heads with different page counts, empty selections,
NaN in every hidden token, fp32/fp16/bf16 pools, permuted slot maps with unused slots, one or several
new tokens."""

from __future__ import annotations

from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from tiercache_llm.sparse import sparse_attention_reference
from tiercache_llm.sparse.page_table import (
    PageTable,
    build_page_table,
    build_page_table_from_valid,
    entry_mass_to_blocks,
    page_table_attention,
)
from tiercache_llm.sparse.selection import BlockSelection

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}


def selection_of(page_mask: torch.Tensor, pages_per_block: int, n_blocks: int) -> BlockSelection:
    """A ``BlockSelection`` with these pages (``(B, H, P)``, ``P <= n_blocks * pages_per_block``)."""
    b, h, p = page_mask.shape
    k = pages_per_block
    head_mask = F.pad(page_mask, (0, n_blocks * k - p)).view(b, h, n_blocks, k).any(-1)
    row_mask = head_mask.any(1)
    fetch = row_mask.any(0).nonzero().flatten()
    return BlockSelection(head_mask, row_mask, fetch, torch.zeros(b, h, p), torch.zeros(b, dtype=torch.long),
                          page_mask if k > 1 else None, k)


def make_case(draw_or_params, seed: int):
    """Random case from a dict of parameters; returns a namespace of everything the tests use."""
    c = SimpleNamespace(**draw_or_params)
    gen = torch.Generator().manual_seed(seed)
    b, h, g, d, s, page, q = c.b, c.h, c.g, c.d, c.s, c.page, c.q
    k = s // page
    n = c.n_blocks
    t = n * s - c.tail_cut  # context tokens before the new ones (the last block may be partial)
    p = -(-t // page)  # digest pages (the last may be partial)
    valid = torch.ones(b, t, dtype=torch.bool)
    for row in range(b):
        if c.__dict__.get("pad", True):
            valid[row, : int(torch.randint(0, t, (1,), generator=gen))] = False  # left padding
    # Heads select different numbers of pages (densities differ per (row, head)).
    density = torch.rand(b, h, 1, generator=gen) * c.density
    pm = torch.rand(b, h, p, generator=gen) < density
    if c.density >= 1:  # everything selected
        pm[:] = True
    if c.empty_head and b * h > 1:
        pm[-1, -1] = False
    if c.empty_all:
        pm[:] = False
    sel = selection_of(pm, k, n)
    u = int(sel.fetch.numel())
    n_slots = u + c.extra_slots
    slot_of_fetch = torch.randperm(n_slots, generator=gen)[:u] if c.permute else torch.arange(u)
    keys = torch.randn(b, h, n * s, d, generator=gen) * c.key_scale
    values = torch.randn(b, h, n * s, d, generator=gen)
    k_pool = torch.full((n_slots, b, h, s, d), float("nan"))
    v_pool = torch.full((n_slots, b, h, s, d), float("nan"))
    kb, vb = keys.view(b, h, n, s, d), values.view(b, h, n, s, d)
    for i, blk in enumerate(sel.fetch.tolist()):
        k_pool[slot_of_fetch[i]] = kb[:, :, blk]
        v_pool[slot_of_fetch[i]] = vb[:, :, blk]
    pos = sel.fetch.view(-1, 1) * s + torch.arange(s)
    token_ok = valid[:, pos.clamp(max=t - 1)] & (pos < t)  # (B, U, S), as attend_selected builds it
    tm = sel.token_mask(s)
    attended = token_ok.unsqueeze(1) & sel.fetch_head_mask.unsqueeze(-1)
    if tm is not None:
        attended &= tm
    # Poison every pool token that is not attended by its (row, head): it must never reach the output.
    hidden = torch.ones(n_slots, b, h, s, dtype=torch.bool)
    hidden[slot_of_fetch] = ~attended.permute(2, 0, 1, 3)
    k_pool[hidden], v_pool[hidden] = float("nan"), float("nan")
    query = torch.randn(b, h * g, q, d, generator=gen)
    nk = torch.randn(b, h, q, d, generator=gen) if c.new else None
    nv = torch.randn(b, h, q, d, generator=gen) if c.new else None
    dt = c.dtype
    c.__dict__.update(
        sel=sel, u=u, slot_of_fetch=slot_of_fetch, token_ok=token_ok, attended=attended, valid=valid, t=t,
        k_pool=k_pool.to(dt), v_pool=v_pool.to(dt), query=query.to(dt),
        nk=None if nk is None else nk.to(dt), nv=None if nv is None else nv.to(dt),
    )
    return c


def reference(c):
    """``sparse_attention_reference`` over the fetched blocks in ``fetch`` order (gathered from the pool)."""
    kbuf = c.k_pool[c.slot_of_fetch].permute(1, 2, 0, 3, 4)
    vbuf = c.v_pool[c.slot_of_fetch].permute(1, 2, 0, 3, 4)
    return sparse_attention_reference(c.query, kbuf, vbuf, c.sel.fetch_head_mask, c.attended, c.nk, c.nv,
                                      scale=c.scale)


def through_table(c):
    table = build_page_table(c.sel, c.slot_of_fetch, c.token_ok, c.s)
    res = page_table_attention(c.query, c.k_pool, c.v_pool, table, c.nk, c.nv, scale=c.scale)
    return table, res, entry_mass_to_blocks(res.block_mass, table, c.u)


def check(c):
    table, res, mass = through_table(c)
    want = reference(c)
    b, hq = c.b, c.h * c.g
    assert res.output.dtype == c.dtype and res.output.shape == (b, hq, c.q, c.d)
    assert res.block_mass.dtype == torch.float32 and res.block_mass.shape == (b, hq, table.slots.shape[-1])
    assert not bool(torch.isnan(res.output).any())
    tol = TOL[c.dtype]
    torch.testing.assert_close(res.output.float(), want.output.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(mass, want.block_mass, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(res.new_mass, want.new_mass, rtol=1e-4, atol=1e-6)
    total = res.block_mass.sum(-1) + res.new_mass
    something = c.attended.any(-1).any(-1).repeat_interleave(c.g, 1) | (c.nk is not None)
    torch.testing.assert_close(total[something], torch.ones_like(total[something]))
    assert not bool(total[~something].any()) and not bool(res.output[~something].any())
    return table, res


@st.composite
def cases(draw):
    s = draw(st.sampled_from([4, 8, 12, 16]))
    params = dict(
        b=draw(st.integers(1, 3)), h=draw(st.integers(1, 3)), g=draw(st.integers(1, 4)),
        d=draw(st.sampled_from([4, 8, 16])), s=s,
        page=draw(st.sampled_from([x for x in (1, 2, 3, 4, 8, 16) if s % x == 0])),
        q=draw(st.sampled_from([1, 1, 2, 3])), n_blocks=draw(st.integers(1, 6)),
        tail_cut=draw(st.integers(0, s - 1)), density=draw(st.sampled_from([0.3, 0.7, 0.99, 1.0])),
        empty_head=draw(st.booleans()), empty_all=draw(st.integers(0, 9)) == 0,
        extra_slots=draw(st.integers(0, 3)), permute=draw(st.booleans()),
        key_scale=draw(st.sampled_from([0.5, 3.0])), new=draw(st.integers(0, 4)) > 0,
        dtype=draw(st.sampled_from([torch.float32, torch.float32, torch.float16, torch.bfloat16])),
        scale=draw(st.sampled_from([None, 0.3])),
    )
    return make_case(params, draw(st.integers(0, 2**31 - 1)))


@contextmanager
def torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@settings(max_examples=60, deadline=None)
@given(cases())
def test_page_table_attention_is_the_reference_over_each_heads_pages(c):
    """Both CPU torch paths: chunked (one intra-op thread) and batched (several)."""
    for threads in (1, 2):
        with torch_threads(threads):
            check(c)


@settings(max_examples=30, deadline=None)
@given(cases())
def test_the_table_names_exactly_each_heads_attended_tokens(c):
    """Every attended token appears once in its (row, head)'s table, nothing else is valid there, the
    entries of a (row, head) come first in ascending page order, and padding entries hold in-range
    (slot, page) and no valid token."""
    table = build_page_table(c.sel, c.slot_of_fetch, c.token_ok, c.s)
    b, h, m = table.slots.shape
    assert table.page_size == c.page and table.valid.shape == (b, h, m, c.page)
    n_slots = c.k_pool.shape[0]
    assert bool((table.slots >= 0).all() and (table.slots < max(n_slots, 1)).all())  # 0 for an empty pool
    assert bool((table.pages >= 0).all() and (table.pages < c.s // c.page).all())
    fetch = c.sel.fetch.tolist()
    slot_to_u = {int(sl): i for i, sl in enumerate(c.slot_of_fetch.tolist())}
    counts = c.sel.pages.sum(-1)
    for row in range(b):
        for head in range(h):
            n_used = int(counts[row, head])
            assert not bool(table.valid[row, head, n_used:].any())
            got, prev = [], -1
            for e in range(n_used):
                u = slot_to_u[int(table.slots[row, head, e])]
                assert u == int(table.fetch_pos[row, head, e])
                page_id = fetch[u] * (c.s // c.page) + int(table.pages[row, head, e])
                assert page_id > prev and bool(c.sel.pages[row, head, page_id])
                prev = page_id
                got += [fetch[u] * c.s + int(table.pages[row, head, e]) * c.page + i
                        for i in range(c.page) if table.valid[row, head, e, i]]
            want = [fetch[u] * c.s + i for u in range(c.u) for i in range(c.s) if c.attended[row, head, u, i]]
            assert sorted(got) == want


@settings(max_examples=40, deadline=None)
@given(cases(), st.integers(0, 9))
def test_the_table_from_the_contexts_validity_is_the_same_table(c, extra):
    """``build_page_table_from_valid`` (decode's path: the context's validity and length) builds exactly
    ``build_page_table``'s table from the fetched blocks' token validity, also when the validity buffer
    runs past the context (tokens there are never attended, whatever it says)."""
    want = build_page_table(c.sel, c.slot_of_fetch, c.token_ok, c.s)
    valid = torch.cat((c.valid, torch.ones(c.b, extra, dtype=torch.bool)), dim=1)
    got = build_page_table_from_valid(c.sel, c.slot_of_fetch, valid, c.t, c.s)
    for name in ("slots", "pages", "valid", "fetch_pos", "counts"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert got.page_size == want.page_size


BASE = dict(b=2, h=2, g=3, d=8, s=8, page=2, q=1, n_blocks=4, tail_cut=3, density=0.7, empty_head=True,
            empty_all=False, extra_slots=2, permute=True, key_scale=1.0, new=True, dtype=torch.float32, scale=None)


@pytest.mark.parametrize("new", [True, False])
def test_empty_selection_attends_only_the_new_tokens_or_nothing(new):
    c = make_case({**BASE, "empty_all": True, "new": new, "q": 2}, 1)
    table, res = check(c)
    assert c.u == 0 and table.slots.shape[-1] == 1 and not bool(table.valid.any())
    if new:
        torch.testing.assert_close(res.new_mass, torch.ones_like(res.new_mass))
    else:
        assert not bool(res.output.any()) and not bool(res.new_mass.any()) and not bool(res.block_mass.any())


def test_a_budget_covering_the_context_is_dense_attention():
    """Every page selected: the output is SDPA over all valid context tokens and the new tokens."""
    c = make_case({**BASE, "density": 1.0, "empty_head": False, "q": 2, "tail_cut": 0, "permute": True}, 4)
    _, res, mass = through_table(c)
    b, h, g, q, d, s, u = c.b, c.h, c.g, c.q, c.d, c.s, c.u
    assert u == c.n_blocks
    keys = c.k_pool[c.slot_of_fetch].permute(1, 2, 0, 3, 4).reshape(b, h, u * s, d)
    values = c.v_pool[c.slot_of_fetch].permute(1, 2, 0, 3, 4).reshape(b, h, u * s, d)
    ok = c.token_ok.reshape(b, 1, u * s)
    keys, values = keys.nan_to_num(), values.nan_to_num()
    mask = torch.cat((ok[:, :, None, :].expand(b, h * g, q, u * s), torch.ones(q, q, dtype=torch.bool).tril().expand(b, h * g, q, q)), -1)
    want = F.scaled_dot_product_attention(c.query, torch.cat((keys, c.nk), 2), torch.cat((values, c.nv), 2),
                                          attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(res.output, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mass.sum(-1) + res.new_mass, torch.ones(b, h * g))


def test_fp32_pools_need_no_conversion_and_results_do_not_depend_on_the_slot_order():
    c = make_case({**BASE, "permute": False, "extra_slots": 0}, 5)
    _, res_a, mass_a = through_table(c)
    perm = torch.randperm(c.k_pool.shape[0], generator=torch.Generator().manual_seed(0))
    inv = torch.argsort(perm)
    c2 = SimpleNamespace(**{**c.__dict__, "k_pool": c.k_pool[perm], "v_pool": c.v_pool[perm],
                            "slot_of_fetch": inv[c.slot_of_fetch]})
    _, res_b, mass_b = through_table(c2)
    torch.testing.assert_close(res_a.output, res_b.output, rtol=0, atol=1e-6)
    torch.testing.assert_close(mass_a, mass_b, rtol=0, atol=1e-7)


def test_non_contiguous_pools_give_the_same_result():
    c = make_case({**BASE, "d": 16}, 6)
    _, res, mass = through_table(c)
    wide_k = torch.stack((c.k_pool, c.k_pool), dim=-1)[..., 0]  # same values, strided
    wide_v = torch.stack((c.v_pool, c.v_pool), dim=-1)[..., 1]
    c2 = SimpleNamespace(**{**c.__dict__, "k_pool": wide_k, "v_pool": wide_v})
    assert not wide_k.is_contiguous()
    _, res2, mass2 = through_table(c2)
    torch.testing.assert_close(res2.output, res.output, rtol=0, atol=1e-6)
    torch.testing.assert_close(mass2, mass, rtol=0, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inputs_that_require_grad_give_the_same_result(dtype):
    """A plain forward outside no_grad: the query and new tokens require grad (the CPU path's scratch
    buffers and out= ops are not used then)."""
    c = make_case({**BASE, "dtype": dtype}, 9)
    _, want, want_mass = through_table(c)
    query = c.query.detach().clone().requires_grad_()
    nk = c.nk.detach().clone().requires_grad_()
    c2 = SimpleNamespace(**{**c.__dict__, "query": query, "nk": nk})
    _, got, got_mass = through_table(c2)
    assert got.output.requires_grad
    torch.testing.assert_close(got.output.detach(), want.output, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_mass.detach(), want_mass, rtol=1e-6, atol=1e-7)


def test_bad_shapes_are_refused_with_clear_errors():
    c = make_case(BASE, 7)
    table = build_page_table(c.sel, c.slot_of_fetch, c.token_ok, c.s)
    run = lambda **kw: page_table_attention(**{"query": c.query, "k_pool": c.k_pool, "v_pool": c.v_pool,  # noqa: E731
                                               "table": table, "new_keys": c.nk, "new_values": c.nv, **kw})
    with pytest.raises(ValueError, match="does not match the pools"):
        run(query=c.query[..., :4])
    with pytest.raises(ValueError, match="does not match the pools"):
        run(v_pool=c.v_pool[:-1])
    with pytest.raises(ValueError, match="does not match the pools"):
        run(query=c.query[:, :5])  # Hq not a multiple of H
    with pytest.raises(ValueError, match="pool"):
        run(k_pool=c.k_pool[0])
    with pytest.raises(ValueError, match="page table"):
        run(table=PageTable(table.slots[:1], table.pages[:1], table.valid[:1], table.fetch_pos[:1], table.page_size))
    with pytest.raises(ValueError, match="page table"):
        run(table=PageTable(table.slots, table.pages, table.valid[..., :1], table.fetch_pos, table.page_size))
    with pytest.raises(ValueError, match="page_size"):
        run(table=PageTable(table.slots, table.pages, table.valid, table.fetch_pos, 3))
    with pytest.raises(ValueError, match="new_keys"):
        run(new_values=None)
    with pytest.raises(ValueError, match="new_keys"):
        run(new_keys=c.nk[:, :, :0], new_values=c.nv[:, :, :0])
    with pytest.raises(ValueError, match="slot_of_fetch"):
        build_page_table(c.sel, c.slot_of_fetch[:-1], c.token_ok, c.s)
    with pytest.raises(ValueError, match="token_ok"):
        build_page_table(c.sel, c.slot_of_fetch, c.token_ok[:, :, :-1], c.s)
    with pytest.raises(ValueError, match="block_size"):
        build_page_table(c.sel, c.slot_of_fetch, c.token_ok, c.s + 1)
    with pytest.raises(ValueError, match="valid"):
        build_page_table_from_valid(c.sel, c.slot_of_fetch, c.valid[:, :-1], c.t, c.s)  # shorter than ctx
    with pytest.raises(ValueError, match="valid"):
        build_page_table_from_valid(c.sel, c.slot_of_fetch, c.valid.long(), c.t, c.s)
    with pytest.raises(ValueError, match="slot_of_fetch"):
        build_page_table_from_valid(c.sel, c.slot_of_fetch[:-1], c.valid, c.t, c.s)
    with pytest.raises(ValueError, match="entry_mass"):
        entry_mass_to_blocks(torch.zeros(c.b, c.h * c.g, table.slots.shape[-1] + 1), table, c.u)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mass_false_skips_only_the_masses(threads, seed):
    """``mass=False`` (strategies without attention-aware placement): the same output and new-token mass,
    bit for bit, with zero block masses of the same shape (both CPU torch paths, and ``attend_selected``)."""
    from tiercache_llm.sparse_layer import attend_selected

    c = make_case({**BASE, "q": 1 + seed % 2, "tail_cut": 3}, seed)
    table = build_page_table(c.sel, c.slot_of_fetch, c.token_ok, c.s)
    with torch_threads(threads):
        full = page_table_attention(c.query, c.k_pool, c.v_pool, table, c.nk, c.nv)
        bare = page_table_attention(c.query, c.k_pool, c.v_pool, table, c.nk, c.nv, mass=False)
        assert torch.equal(full.output, bare.output) and torch.equal(full.new_mass, bare.new_mass)
        assert bare.block_mass.shape == full.block_mass.shape and not bool(bare.block_mass.any())
        assert bool(full.block_mass.any())
        if c.q == 1:
            args = (c.query, c.k_pool, c.v_pool, c.slot_of_fetch, c.sel, c.valid, c.t, c.s, c.nk, c.nv, None)
            a, b = attend_selected(*args), attend_selected(*args, mass=False)
            assert torch.equal(a.output, b.output) and b.block_mass.shape == a.block_mass.shape
            assert not bool(b.block_mass.any())


def test_attend_selected_is_the_page_table_path_on_cpu():
    """``sparse_layer.attend_selected`` (what decode calls): token validity from the row's padding and the
    context length, the page table, block masses in ``fetch`` order; ``"auto"`` is ``"pages"`` on CPU."""
    from tiercache_llm.sparse_layer import attend_selected

    c = make_case({**BASE, "q": 1, "tail_cut": 3}, 8)
    t = c.t
    # validity longer than the context (as the layer's grown buffer is): the tail is cut by ctx
    valid = torch.cat((c.valid, torch.ones(c.b, 5, dtype=torch.bool)), dim=1)
    assert bool(c.valid[:, 0].logical_not().any())  # some row is left-padded
    want = reference(c)
    for backend in ("auto", "pages"):
        got = attend_selected(c.query, c.k_pool, c.v_pool, c.slot_of_fetch, c.sel, valid, t, c.s, c.nk, c.nv, None,
                              backend=backend)
        torch.testing.assert_close(got.output, want.output, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.block_mass, want.block_mass, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got.new_mass, want.new_mass, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="backend"):
        attend_selected(c.query, c.k_pool, c.v_pool, c.slot_of_fetch, c.sel, valid, t, c.s, c.nk, c.nv, None,
                        backend="cuda")


@pytest.mark.parametrize("chunk_bytes", [1, 2500])
@pytest.mark.parametrize("seed", range(6))
def test_cpu_chunks_of_any_size_give_the_reference(monkeypatch, chunk_bytes, seed):
    """The CPU path gathers and multiplies chunk by chunk over (row, KV head)s: one (row, head) per chunk
    (``chunk_bytes=1``) or a few, whose used-entry counts differ (padding entries inside a chunk), with
    and without left padding and a partial tail, NaN in every hidden token."""
    from tiercache_llm.sparse import page_table

    monkeypatch.setattr(page_table, "_CHUNK_BYTES", chunk_bytes)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # the chunked path
    gen = torch.Generator().manual_seed(seed)
    pick = lambda xs: xs[int(torch.randint(len(xs), (1,), generator=gen))]  # noqa: E731
    params = {**BASE, "b": pick([2, 3]), "h": pick([2, 3]), "g": pick([1, 3]), "q": pick([1, 2]),
              "n_blocks": 5, "density": pick([0.5, 0.9]), "empty_head": seed % 2 == 0,
              "new": seed != 3, "dtype": pick([torch.float32, torch.float32, torch.bfloat16])}
    check(make_case(params, seed))
    # No padding and a full last block: the only hidden tokens a chunk gathers are the padding entries of
    # its (row, head)s with fewer entries than the chunk's largest.
    check(make_case({**params, "pad": False, "tail_cut": 0}, seed))


@pytest.mark.parametrize("layout", ["k-then-v", "part-major"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", [0, 3])
def test_the_halves_of_a_joint_pool_give_the_contiguous_pools_result_bit_for_bit(threads, dtype, seed, layout):
    """Joint K/V pools are attended through their halves: ``kv[:, 0]`` / ``kv[:, 1]`` of ``(N, 2, B, H, S, D)``, or
    ``kv[:, :, :, 0]`` / ``kv[:, :, :, 1]`` of a sparse layer's part-major ``(N, B, H, 2, S, D)`` (each (row, KV head)
    part K then V): the CPU paths read their page rows in place (:func:`_page_rows`, no copy) and give exactly the
    result of two contiguous pools holding the same values (both CPU torch paths: chunked at 1 thread, batched at
    2)."""
    from tiercache_llm.sparse.page_table import _page_rows

    c = make_case({**BASE, "q": 1 + seed % 2, "tail_cut": 3, "dtype": dtype}, seed)
    base = _page_rows(c.k_pool, c.page)
    if layout == "k-then-v":
        kv = torch.stack((c.k_pool, c.v_pool), dim=1)
        k_half, v_half = kv[:, 0], kv[:, 1]
        assert _page_rows(k_half, c.page)[1:] == (2 * base[1], base[2])
    else:
        kv = torch.stack((c.k_pool, c.v_pool), dim=3)
        k_half, v_half = kv[:, :, :, 0], kv[:, :, :, 1]
        assert _page_rows(k_half, c.page)[1:] == (2 * base[1], 2 * base[2])
    assert not k_half.is_contiguous()
    table = build_page_table(c.sel, c.slot_of_fetch, c.token_ok, c.s)
    with torch_threads(threads):
        want = page_table_attention(c.query, c.k_pool, c.v_pool, table, c.nk, c.nv)
        got = page_table_attention(c.query, k_half, v_half, table, c.nk, c.nv)
    assert torch.equal(got.output, want.output) and torch.equal(got.block_mass, want.block_mass)
    assert torch.equal(got.new_mass, want.new_mass)


def test_page_rows_refuse_layouts_without_a_row_view():
    from tiercache_llm.sparse.page_table import _page_rows

    pool = torch.zeros(3, 2, 2, 8, 4)
    assert _page_rows(pool, 4)[1] == 2 * 2 * 2  # (B * H * S // page) rows per slot
    assert _page_rows(pool.transpose(1, 2), 4) is None  # a slot that is not one contiguous block
    assert _page_rows(torch.zeros(3, 2, 2, 8, 5)[..., :4], 4) is None  # rows of 4 in rows of 5
    assert _page_rows(pool[:0], 4) is None


@pytest.mark.parametrize("new", [True, False])
@pytest.mark.parametrize("garbage", ["nan", "inf", "finite"])
@pytest.mark.parametrize("seed", range(4))
def test_cpu_hidden_tokens_are_exact_whatever_their_keys_and_the_scratch_hold(monkeypatch, garbage, seed, new):
    """The chunked CPU path masks hidden tokens with a 0 / -inf bias added to the scores, and masks exactly
    (masked_fill) only when a hidden score came out NaN or +inf: with any bytes in the hidden keys (NaN, +/-inf,
    large finite) and stale NaN / +inf in the score scratch's never-written columns, the result is the
    reference's, (row, head)s with no pages included (zeros without new tokens, log-sum-exp -inf)."""
    from tiercache_llm.sparse import page_table

    monkeypatch.setattr(page_table, "_CHUNK_BYTES", 1 + seed % 2 * 2500)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # the chunked path
    # density 1: every other (row, head) attends every page, so the empty one's stale scratch row is the only
    # place a NaN could come from
    c = make_case({**BASE, "b": 2, "h": 2, "g": 3, "q": 1, "n_blocks": 5, "density": 0.6 if seed < 2 else 1.0,
                   "tail_cut": 3, "empty_head": True, "new": new}, seed)
    k_pool, hidden_any = c.k_pool.clone(), torch.isnan(c.k_pool)
    fill = {"nan": float("nan"), "inf": float("inf"), "finite": 1e4}[garbage]
    k_pool[hidden_any] = fill
    if garbage == "inf":
        k_pool[hidden_any & (torch.rand(k_pool.shape, generator=torch.Generator().manual_seed(seed)) < 0.5)] = -fill
    c.k_pool = k_pool
    if garbage == "finite":  # and finite hidden values: a NaN could only come from the stale scratch
        c.v_pool = c.v_pool.nan_to_num(nan=-3.0)
    page_table._scratch("s", (1 << 16,), torch.device("cpu")).fill_(float("nan") if seed % 2 else float("inf"))
    table, res, mass = through_table(c)
    want = reference(c)
    torch.testing.assert_close(res.output.float(), want.output.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mass, want.block_mass, rtol=1e-4, atol=1e-6)
    assert not bool(torch.isnan(res.output).any())
    page_table._scratch("s", (1 << 16,), torch.device("cpu")).fill_(float("nan"))
    with_lse = page_table_attention(c.query, c.k_pool, c.v_pool, table, c.nk, c.nv, scale=c.scale, lse=True)
    attended = c.attended.any(-1).any(-1).repeat_interleave(c.g, 1)  # (B, Hq)
    lse = with_lse.lse[..., 0]
    assert not bool(torch.isnan(lse).any())
    assert torch.equal(torch.isfinite(lse), attended | new)
    torch.testing.assert_close(with_lse.output.float(), want.output.float(), rtol=1e-5, atol=1e-5)
