"""Block selection: forced sink/recent blocks, per-row budgets, padding, GQA, unions - checked against a
plain per-block loop written from the rules in docs/sparse.md."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tiercache_llm.sparse import (
    KeyDigests,
    SelectionConfig,
    block_table,
    forced_blocks,
    score_blocks_landmark,
    score_blocks_reference,
    select,
    token_budget,
)
from tiercache_llm.sparse.selection import score_blocks_mass


@st.composite
def caches(draw):
    b = draw(st.integers(1, 4))
    h = draw(st.integers(1, 3))
    g = draw(st.sampled_from([1, 2, 3]))
    s = draw(st.sampled_from([1, 2, 4, 8]))
    t = draw(st.integers(1, 60))
    d = draw(st.sampled_from([2, 8]))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(b, h, t, d, generator=gen)
    query = torch.randn(b, h * g, 1, d, generator=gen)
    valid = torch.ones(b, t, dtype=torch.bool)
    for row in range(b):  # left padding, a different amount per row
        valid[row, : draw(st.integers(0, t - 1))] = False
    budget = draw(st.one_of(st.integers(0, 80), st.floats(0.01, 1.0)))
    gqa = draw(st.sampled_from(["max", "sum"]))
    config = SelectionConfig(budget=budget, sink=draw(st.integers(0, 6)), recent=draw(st.integers(0, 10)),
                             gqa=gqa, score=draw(st.sampled_from(["bound", "bound+landmark"])),
                             rank="mass" if gqa == "max" and draw(st.booleans()) else "score")
    return KeyDigests.from_keys(keys, s, valid), query, valid, config


def naive_select(scores, count, config):
    """The rules, one block at a time."""
    b, h, n = scores.shape
    out = torch.zeros(b, h, n, dtype=torch.bool)
    for row in range(b):
        total = int(count[row].sum())
        budget = config.budget if isinstance(config.budget, int) else math.ceil(config.budget * total - 1e-9)
        ranks, seen = [], 0
        for j in range(n):
            ranks.append((seen, seen + int(count[row, j])))
            seen += int(count[row, j])
        forced = [count[row, j] > 0 and (ranks[j][0] < config.sink or ranks[j][1] > total - config.recent)
                  for j in range(n)]
        for head in range(h):
            used = sum(int(count[row, j]) for j in range(n) if forced[j])
            limit = max(budget, used)
            for j in range(n):
                out[row, head, j] = bool(forced[j])
            rest = sorted((j for j in range(n) if count[row, j] > 0 and not forced[j]),
                          key=lambda j: (-float(scores[row, head, j]), j))
            for j in rest:
                if used + int(count[row, j]) > limit:
                    break
                used += int(count[row, j])
                out[row, head, j] = True
    return out


@settings(max_examples=150, deadline=None)
@given(caches())
def test_selection_follows_the_rules(case):
    digests, query, valid, config = case
    sel = select(query, digests, config, backend="torch")
    count = digests.count
    assert torch.equal(sel.head_mask, naive_select(sel.scores, count, config))
    forced = forced_blocks(count, config.sink, config.recent)
    # sinks and the recent window: always selected, for every head
    assert bool(sel.head_mask[forced.unsqueeze(1).expand_as(sel.head_mask)].all())
    # padded-only blocks never
    assert not bool(sel.head_mask[(count == 0).unsqueeze(1).expand_as(sel.head_mask)].any())
    # per-row budget, counting the row's own tokens
    budget = token_budget(count, config.budget)
    if isinstance(config.budget, float):
        assert torch.equal(budget, torch.ceil(valid.sum(1).double() * config.budget - 1e-9).long())
    forced_tokens = (forced * count).sum(1)
    assert bool((sel.selected_tokens(count) <= torch.maximum(budget, forced_tokens).unsqueeze(1)).all())
    # unions
    assert torch.equal(sel.row_mask, sel.head_mask.any(1))
    assert sel.fetch.tolist() == sel.head_mask.any(1).any(0).nonzero().flatten().tolist()
    assert torch.equal(sel.fetch_head_mask, sel.head_mask[:, :, sel.fetch])


@settings(max_examples=60, deadline=None)
@given(caches(), st.sampled_from(["int", 1.0]))
def test_budget_at_or_above_the_context_selects_every_valid_block(case, kind):
    digests, query, _, config = case
    big = int(digests.count.sum(1).max()) if kind == "int" else 1.0
    config = SelectionConfig(budget=big, sink=0, recent=0, gqa=config.gqa, score=config.score, rank=config.rank)
    sel = select(query, digests, config, backend="torch")
    assert torch.equal(sel.head_mask, (digests.count > 0).unsqueeze(1).expand_as(sel.head_mask))


def test_each_row_counts_its_own_tokens():
    # row 0: 32 valid tokens, row 1: 8 (left padding); 25% -> 8 and 2 tokens
    keys = torch.randn(2, 1, 32, 4)
    valid = torch.ones(2, 32, dtype=torch.bool)
    valid[1, :24] = False
    d = KeyDigests.from_keys(keys, 2, valid)
    sel = select(torch.randn(2, 1, 1, 4), d, SelectionConfig(budget=0.25, sink=0, recent=0), backend="torch")
    assert sel.budget.tolist() == [8, 2]
    assert sel.selected_tokens(d.count).tolist() == [[8], [2]]
    assert not bool(sel.head_mask[1, :, :12].any())


def test_gqa_max_ranks_the_block_one_head_needs():
    # two query heads share a KV head; head 0 wants block 0 strongly, head 1 mildly prefers block 1
    keys = torch.zeros(1, 1, 4, 2)
    keys[0, 0, 0:2] = torch.tensor([10.0, 0.0])
    keys[0, 0, 2:4] = torch.tensor([0.0, 1.0])
    query = torch.tensor([[1.0, 0.0], [-3.0, 2.0]]).view(1, 2, 1, 2)
    d = KeyDigests.from_keys(keys, 2)
    scores_max = score_blocks_reference(query, d.lo, d.hi, d.count, "max")
    scores_sum = score_blocks_reference(query, d.lo, d.hi, d.count, "sum")
    assert scores_max.argmax().item() == 0  # head 0's 10 beats head 1's 2
    assert scores_sum.argmax().item() == 1  # -30 + 10 < 0 + 2: the sum loses head 0's peak


@settings(max_examples=80, deadline=None)
@given(caches(), st.sampled_from([2, 3, 4]))
def test_pages_select_by_the_rules_and_fetch_the_blocks_holding_them(case, k):
    """With ``pages_per_block = k`` the digests' blocks are pages: the page selection follows the rules
    (the same naive loop), a storage block is attended by a head iff one of its pages is, the fetch is
    the union, and the token mask is each head's pages spread over the fetched blocks."""
    digests, query, valid, config = case
    sel = select(query, digests, config, backend="torch", pages_per_block=k)
    want = naive_select(sel.scores, digests.count, config)
    assert torch.equal(sel.page_mask, want)
    b, h, p = want.shape
    n = -(-p // k)
    for blk in range(n):
        assert torch.equal(sel.head_mask[:, :, blk], want[:, :, blk * k:(blk + 1) * k].any(-1))
    assert sel.fetch.tolist() == sel.head_mask.any(1).any(0).nonzero().flatten().tolist()
    page = digests.block_size
    tm = sel.token_mask(k * page)
    assert tm.shape == (b, h, len(sel.fetch), k * page)
    for u, blk in enumerate(sel.fetch.tolist()):
        for i in range(k):
            pg = blk * k + i
            expect = want[:, :, pg] if pg < p else torch.zeros(b, h, dtype=torch.bool)
            assert torch.equal(tm[:, :, u, i * page:(i + 1) * page], expect.unsqueeze(-1).expand(b, h, page))
    assert torch.equal(sel.selected_tokens(digests.count), (want * digests.count.unsqueeze(1)).sum(-1))


def test_landmark_score_blends_the_bound_with_the_mean_key():
    gen = torch.Generator().manual_seed(3)
    keys = torch.randn(2, 2, 13, 4, generator=gen)
    valid = torch.ones(2, 13, dtype=torch.bool)
    valid[1, :5] = False
    d = KeyDigests.from_keys(keys, 4, valid)
    query = torch.randn(2, 6, 1, 4, generator=gen)
    bound = score_blocks_reference(query, d.lo, d.hi, d.count, "max")
    torch.testing.assert_close(score_blocks_landmark(query, d, 0.0), bound)
    mean = (query.view(2, 2, 3, 4) @ d.landmarks().transpose(-1, -2)).amax(2)
    mean = mean.masked_fill((d.count == 0).unsqueeze(1), float("-inf"))
    torch.testing.assert_close(score_blocks_landmark(query, d, 1.0), mean)
    assert torch.isneginf(score_blocks_landmark(query, d, 0.5)[1, :, 0]).all()  # padding-only block
    cfg = SelectionConfig(budget=4, sink=0, recent=0, score="bound+landmark", landmark_weight=1.0)
    sel = select(query, d, cfg, backend="torch")
    assert sel.scores.shape == bound.shape and sel.selected_tokens(d.count).max() <= 4


def naive_mass(query, d, weight, scale):
    """score_blocks_mass written out per row, query head and page."""
    b, hq, _, _ = query.shape
    h, n = d.lo.shape[1], d.lo.shape[2]
    g = hq // h
    out = torch.full((b, h, n), float("-inf"))
    for row in range(b):
        pages = [j for j in range(n) if d.count[row, j] > 0]
        for qh in range(hq):
            kv = qh // g
            qv = query[row, qh, 0]
            norm = torch.logsumexp(torch.tensor([scale * float(qv @ d.landmarks()[row, kv, j])
                                                 + math.log(int(d.count[row, j])) for j in pages]), 0)
            for j in pages:
                bound = float(sum(max(qv[i] * d.lo[row, kv, j, i], qv[i] * d.hi[row, kv, j, i]) for i in range(qv.shape[0])))
                s = (1 - weight) * bound + weight * float(qv @ d.landmarks()[row, kv, j])
                z = scale * s + math.log(int(d.count[row, j])) - float(norm)
                out[row, kv, j] = max(float(out[row, kv, j]), z)
    return out


def test_mass_rank_is_each_query_heads_estimated_share_then_the_group_max():
    gen = torch.Generator().manual_seed(5)
    keys = torch.randn(2, 2, 13, 4, generator=gen) * 3
    valid = torch.ones(2, 13, dtype=torch.bool)
    valid[1, :6] = False  # row 1: a partly padded page and an empty one
    d = KeyDigests.from_keys(keys, 4, valid)
    query = torch.randn(2, 6, 1, 4, generator=gen)
    got = score_blocks_mass(query, d, "bound+landmark", 0.3, 0.7)
    torch.testing.assert_close(got, naive_mass(query, d, 0.3, 0.7), rtol=1e-4, atol=1e-4)
    assert torch.isneginf(got[1, :, 0]).all()  # the padding-only page
    cfg = SelectionConfig(budget=4, sink=0, recent=0, score="bound+landmark")
    assert cfg.rank == "mass"  # the cache's rule ranks by estimated share
    torch.testing.assert_close(select(query, d, cfg).scores, score_blocks_mass(query, d, "bound+landmark", 0.5, 0.5))
    assert SelectionConfig(budget=4).rank == "score" and SelectionConfig(budget=4, score="bound+landmark", gqa="sum").rank == "score"


def test_mass_rank_picks_the_page_a_spread_head_needs_over_a_peaked_heads_leftovers():
    # one KV head, two query heads.  Head 0 puts almost all its attention on page 0 (logit 40) and
    # scores page 1 at 20: a big raw score, a negligible share.  Head 1's logits are small, and page 2
    # (logit 3 against 0 elsewhere) holds most of its attention.  Raw scores pick page 1, shares page 2.
    keys = torch.zeros(1, 1, 6, 2)
    keys[0, 0, 0:2] = torch.tensor([40.0, 0.0])
    keys[0, 0, 2:4] = torch.tensor([20.0, 0.0])
    keys[0, 0, 4:6] = torch.tensor([0.0, 3.0])
    query = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 2, 1, 2)
    d = KeyDigests.from_keys(keys, 2)
    forced_first = dict(budget=4, sink=1, recent=0, score="bound+landmark", scale=1.0)
    raw = select(query, d, SelectionConfig(rank="score", **forced_first))
    mass = select(query, d, SelectionConfig(rank="mass", **forced_first))
    assert raw.head_mask[0, 0].tolist() == [True, True, False]
    assert mass.head_mask[0, 0].tolist() == [True, False, True]


def test_block_table_lists_each_selection_in_order():
    mask = torch.tensor([[[True, False, True, True], [False, False, False, False]]])
    table, lengths = block_table(mask)
    assert lengths.tolist() == [[3, 0]]
    assert table.tolist() == [[[0, 2, 3], [0, 0, 0]]]
    assert table.dtype == torch.int32


def test_config_rejects_bad_values():
    for bad in (-1, 0.0, 1.5, True, "1"):
        with pytest.raises((ValueError, TypeError), match="budget"):
            SelectionConfig(budget=bad)
    with pytest.raises(ValueError, match="sink"):
        SelectionConfig(budget=4, sink=-1)
    with pytest.raises(ValueError, match="gqa"):
        SelectionConfig(budget=4, gqa="mean")
    with pytest.raises(ValueError, match="rank"):
        SelectionConfig(budget=4, rank="entropy")
    with pytest.raises(ValueError, match="gqa='max'"):
        SelectionConfig(budget=4, rank="mass", gqa="sum")
    for bad in (0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="scale"):
            SelectionConfig(budget=4, scale=bad)
    d = KeyDigests.from_keys(torch.randn(1, 2, 8, 4), 4)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        select(torch.randn(1, 3, 1, 4), d, SelectionConfig(budget=4))


def _random_counts(gen, b, n, page, pads, tail):
    """``(B, N)`` page counts of left-padded rows (``pads`` tokens each) with a partial last page."""
    tokens = torch.arange(n * page).view(1, n, page)
    valid = (tokens >= torch.tensor(pads).view(b, 1, 1)) & (tokens < n * page - tail)
    return valid.sum(-1)


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 4), st.integers(1, 3), st.integers(2, 60), st.sampled_from([1, 4, 8]),
       st.lists(st.integers(0, 40), min_size=4, max_size=4), st.integers(0, 7),
       st.one_of(st.integers(0, 300), st.floats(0.01, 1.0)), st.integers(1, 6), st.integers(1, 24),
       st.integers(0, 2**31 - 1), st.booleans())
def test_the_uniform_cost_ranking_takes_what_the_cost_walk_takes(b, h, n, page, pads, tail, budget, sink, recent,
                                                                 seed, special):
    """With ``sink`` and ``recent`` > 0 and only left padding, every partial page is forced, so ``select``
    ranks with one ``topk`` and no cost walk (``_uniform_top``): it must take exactly the pages of the
    general path (``_take_top``) and of the rule (``naive_select``), rows of different budgets included,
    with +inf, -inf and NaN scores on free pages (``special``)."""
    from tiercache_llm.sparse import selection as S

    gen = torch.Generator().manual_seed(seed)
    count = _random_counts(gen, b, n, page, [min(p, n * page - tail - 1) for p in pads[:b]], min(tail, page - 1))
    config = SelectionConfig(budget=budget, sink=sink, recent=recent)
    terms = S._page_terms(count, config)
    assert terms.fill is not None  # the uniform case
    scores = torch.randn(b, h, n, generator=gen)
    if special:
        pick = torch.rand(b, h, n, generator=gen)
        scores[pick < 0.1] = float("inf")
        scores[(pick >= 0.1) & (pick < 0.2)] = float("-inf")
        scores[(pick >= 0.2) & (pick < 0.3)] = float("nan")
    fast = S._uniform_top(scores, terms)
    general = S._take_top(scores, count, terms.fixed, terms.fixed_key, terms.limit, terms.head, terms.k)
    if not special:  # (ties among equal special scores may be broken either way)
        assert torch.equal(fast, general)
        assert torch.equal(fast, naive_select(scores, count, config))
    forced = forced_blocks(count, sink, recent).unsqueeze(1).expand(b, h, n)
    for mask in (fast, general):
        assert bool(mask[forced].all())  # an +inf score never displaces a forced page
        assert not bool(mask[(count == 0).unsqueeze(1).expand(b, h, n)].any())
        assert torch.equal(mask.sum(-1), naive_select(scores.nan_to_num(nan=-1e30), count, config).sum(-1))
        if special:  # a free NaN page is taken only once every finite and +inf free page is
            nan_taken = (mask & scores.isnan() & ~forced).any(-1)
            finite_left = (~mask & ~scores.isnan() & ~torch.isneginf(scores) & (count > 0).unsqueeze(1)).any(-1)
            assert not bool((nan_taken & finite_left).any())


def test_selection_uses_the_uniform_ranking_at_the_cache_shape():
    """SmolLM2 decode (8-token pages, 64-token blocks, left-padded rows, the cache's sink and recent):
    the uniform path, with the page mask padded to whole blocks."""
    from tiercache_llm.sparse import selection as S

    keys = torch.randn(2, 3, 1000, 8)
    valid = torch.ones(2, 1000, dtype=torch.bool)
    valid[1, :37] = False
    d = KeyDigests.from_keys(keys, 8, valid)
    config = SelectionConfig(budget=0.25, sink=4, recent=64, score="bound+landmark")
    sel = select(torch.randn(2, 9, 1, 8), d, config, pages_per_block=8)
    terms = S._page_terms(d.count, config, 8)
    assert terms.fill is not None and terms.width == 128 and sel.page_mask.is_contiguous()
    assert torch.equal(sel.page_mask, naive_select(sel.scores, d.count, config))
    assert torch.equal(sel.head_mask, torch.nn.functional.pad(sel.page_mask, (0, 3)).view(2, 3, 16, 8).any(-1))


@pytest.mark.parametrize("scratch", [1 << 20, 100_000, 50_000, 4096, 1 << 9])  # all (row, head)s, 2 at a time, 1, by rows
def test_float16_digests_score_in_float32_like_their_float32_copy(monkeypatch, scratch):
    """The 16-bit scoring path (upcast into a scratch, one matmul for bounds and landmarks) gives the
    float32 rule's scores of the same (rounded) digests to float32 rounding, and its selection."""
    from tiercache_llm.sparse import selection as sel_mod

    monkeypatch.setattr(sel_mod, "SCRATCH_BYTES", scratch)
    gen = torch.Generator().manual_seed(3)
    b, h, g, t, d = 3, 2, 3, 700, 16
    keys = torch.randn(b, h, t, d, generator=gen) * 2
    valid = torch.ones(b, t, dtype=torch.bool)
    valid[1, :41] = False
    d16 = KeyDigests.from_keys(keys, 4, valid, storage=torch.float16)
    assert d16.dtype == torch.float16 and d16.nbytes < KeyDigests.from_keys(keys, 4, valid).nbytes * 0.6
    copy = KeyDigests(4, d16.lo.float(), d16.hi.float(), d16.count, t, d16.total)
    copy.stacked()[:, :, 2 * d :] = d16.stacked()[:, :, 2 * d :]  # the same rounded landmarks
    query = torch.randn(b, h * g, 1, d, generator=gen)
    cfg = SelectionConfig(budget=0.25, score="bound+landmark")
    fast, ref = select(query, d16, cfg, pages_per_block=4), select(query, copy, cfg, pages_per_block=4)
    assert fast.scores.dtype == torch.float32
    finite = torch.isfinite(ref.scores)
    assert torch.equal(torch.isfinite(fast.scores), finite)
    torch.testing.assert_close(fast.scores[finite], ref.scores[finite], rtol=1e-5, atol=1e-4)
    agree = (fast.pages & ref.pages).sum() / ref.pages.sum()
    assert agree > 0.99 and torch.equal(fast.pages.sum(-1), ref.pages.sum(-1))


def test_float16_scoring_slabs_of_any_size_give_the_same_bits(monkeypatch):
    """Whole layer, two (row, KV head)s per slab, one (2-D matmuls on one scratch view): the same scores and
    pages bit for bit (each slab's matmul is the layer's restricted to its (row, KV head)s)."""
    from tiercache_llm.sparse import selection as sel_mod

    gen = torch.Generator().manual_seed(5)
    keys = torch.randn(3, 2, 900, 16, generator=gen)
    valid = torch.ones(3, 900, dtype=torch.bool)
    valid[2, :77] = False
    d16 = KeyDigests.from_keys(keys, 4, valid, storage=torch.float16)
    query = torch.randn(3, 6, 1, 16, generator=gen)
    cfg = SelectionConfig(budget=0.25, score="bound+landmark")
    slab = 4 * d16.buffer().shape[2] * d16.buffer().shape[3]  # bytes of one (row, KV head)'s upcast digests
    got = []
    for scratch in (1 << 22, 2 * slab, slab):
        monkeypatch.setattr(sel_mod, "SCRATCH_BYTES", scratch)
        got.append(select(query, d16, cfg, pages_per_block=4))
    for other in got[1:]:
        assert torch.equal(other.scores, got[0].scores) and torch.equal(other.pages, got[0].pages)


def test_digest_storage_knob_is_checked():
    assert SelectionConfig(budget=0.25).digests == "float16"
    assert SelectionConfig(budget=0.25, digests="float32").digests == "float32"
    with pytest.raises(ValueError, match="digests"):
        SelectionConfig(budget=0.25, digests="bfloat16")


def test_reused_scoring_buffers_give_every_call_its_own_answer():
    """The per-thread buffers ``select`` reuses (query rows, ranking keys with the step's fill columns,
    upcast scratch) never carry one call's state into another: selections of caches of different shapes
    and page counts, interleaved on one thread and run on two threads at once, equal each one's
    selection made alone."""
    import threading

    def cache(seed, t, pads):
        gen = torch.Generator().manual_seed(seed)
        valid = torch.ones(len(pads), t, dtype=torch.bool)
        for row, pad in enumerate(pads):
            valid[row, :pad] = False
        d = KeyDigests.from_keys(torch.randn(len(pads), 3, t, 16, generator=gen), 4, valid, storage=torch.float16)
        return d, [torch.randn(len(pads), 9, 1, 16, generator=gen) for _ in range(3)]

    # the padding swapped between rows: the same shapes (ranking keys included) but other terms, whose
    # fill columns differ per row; and another shape
    cases = [cache(1, 301, [0, 40]), cache(2, 301, [40, 0]), cache(3, 150, [0, 0, 7])]
    cfg = SelectionConfig(budget=0.25, score="bound+landmark")

    def run(d, qs):
        return [select(q, d, cfg, pages_per_block=4) for q in qs]

    alone = [run(d, qs) for d, qs in cases]
    fields = ("scores", "pages", "head_mask", "row_mask", "fetch")

    def same(x, y):
        return all(torch.equal(getattr(a, f), getattr(b, f)) for a, b in zip(x, y) for f in fields)

    interleaved = [[], [], []]
    for i in range(3):
        for c, (d, qs) in enumerate(cases):
            interleaved[c].append(select(qs[i], d, cfg, pages_per_block=4))
    assert all(same(a, b) for a, b in zip(alone, interleaved))
    out = {}
    threads = [threading.Thread(target=lambda c=c: out.__setitem__(c, [run(*cases[c]) for _ in range(5)]))
               for c in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert all(same(alone[c], r) for c in range(3) for r in out[c])
