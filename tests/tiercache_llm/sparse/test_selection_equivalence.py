"""The fast selection path picks exactly the pages of the rule as first written.

``select`` reads digests in their stored (transposed) layout with landmarks kept per page, ranks with a
``topk`` of the head of the ranking, and builds the score in place.  This file keeps the first
implementation - digests as ``(B, H, N, D)`` tensors with key sums, landmarks divided out per call,
scores written as plain expressions, a stable full sort - and checks on random caches (incremental
appends across page boundaries, left padding, GQA, budgets, pages per block) that they agree:

- the landmarks are bit-identical (the same float32 division, done once per page instead of per call);
- the selection rule is exact: the fast ranking of the new scores picks what the full stable sort picks;
- the scores agree to float32 rounding.  The matmuls read the digests in another memory layout, and
  BLAS may sum the ``D`` products in another order for some shapes (MKL: one query head per group, or
  ``D = 128``; on the AMD development machine SmolLM2's shape too: a third of the scores differ by up to
  ``1e-6`` relative), a difference of a few ulps that can only reorder pages whose scores tie to within
  it; where the scores come out bit-identical (SmolLM2's 3 query heads per KV head of dim 64 on the
  machine this file was written on), the pages must be identical too, and at SmolLM2's cache shape (a
  fixed seed whose scores have no near-ties) they must be identical whatever the BLAS summation order.
  Random float scores have no ties, so "identical" means equal."""

from __future__ import annotations


import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tiercache_llm.sparse import KeyDigests, SelectionConfig, select
from tiercache_llm.sparse.digests import _check_keys, _reduce, _reduce_one


class RefDigests:
    """The first KeyDigests: ``lo``/``hi``/``total`` as ``(B, H, N, D)``, concatenated per new page."""

    def __init__(self, b, h, d, page):
        self.page, self.length = page, 0
        self.lo = torch.zeros(b, h, 0, d)
        self.hi = torch.zeros(b, h, 0, d)
        self.total = torch.zeros(b, h, 0, d)
        self.count = torch.zeros(b, 0, dtype=torch.long)

    def append(self, keys, valid):
        valid = _check_keys(keys, valid)
        b = keys.shape[0]
        offset = self.length % self.page
        if offset and offset + keys.shape[2] <= self.page:
            lo, hi, count, total = _reduce_one(keys, valid)
        else:
            lo, hi, count, total = _reduce(keys, valid, offset, self.page)
        if offset:
            prev_has = (self.count[:, -1] > 0).view(b, 1, 1)
            new_has = (count[:, 0] > 0).view(b, 1, 1)
            both = prev_has & new_has
            last_lo, last_hi = self.lo[:, :, -1], self.hi[:, :, -1]
            last_lo.copy_(torch.where(both, torch.minimum(last_lo, lo[:, :, 0]), torch.where(prev_has, last_lo, lo[:, :, 0])))
            last_hi.copy_(torch.where(both, torch.maximum(last_hi, hi[:, :, 0]), torch.where(prev_has, last_hi, hi[:, :, 0])))
            self.count[:, -1] += count[:, 0]
            self.total[:, :, -1] += total[:, :, 0]
            lo, hi, count, total = lo[:, :, 1:], hi[:, :, 1:], count[:, 1:], total[:, :, 1:]
        self.lo = torch.cat((self.lo, lo), dim=2)
        self.hi = torch.cat((self.hi, hi), dim=2)
        self.count = torch.cat((self.count, count), dim=1)
        self.total = torch.cat((self.total, total), dim=2)
        self.length += keys.shape[2]

    def landmarks(self):
        return self.total / self.count.clamp(min=1).view(self.count.shape[0], 1, -1, 1).to(self.total.dtype)


def ref_scores(query, d, config):
    b, hq, q, dim = query.shape
    h, n = d.lo.shape[1], d.lo.shape[2]
    qf = query.float().reshape(b, h, hq // h * q, dim)
    s = qf.clamp(min=0) @ d.hi.float().transpose(-1, -2) + qf.clamp(max=0) @ d.lo.float().transpose(-1, -2)
    lm = qf @ d.landmarks().transpose(-1, -2)
    w = float(config.landmark_weight)
    if config.score == "bound+landmark":
        s = (1.0 - w) * s + w * lm
    empty = (d.count == 0).view(b, 1, 1, n)
    if config.rank == "mass":
        scale = float(config.scale if config.scale is not None else dim ** -0.5)
        logc = d.count.float().clamp(min=1).log().view(b, 1, 1, n)
        zn = (lm * scale + logc).masked_fill(empty, float("-inf"))
        lse = zn.logsumexp(dim=-1, keepdim=True).clamp(min=-1e30)
        s = s * scale + logc - lse
    agg = s.amax(dim=2) if config.gqa == "max" else s.sum(dim=2)
    return agg.masked_fill(empty.view(b, 1, n), float("-inf"))


def ref_select(scores, count, config):
    b, h, n = scores.shape
    n_valid = count.sum(dim=1)
    if isinstance(config.budget, float):
        budget = torch.ceil(n_valid.double() * config.budget - 1e-9).clamp(min=0).long()
    else:
        budget = torch.full_like(n_valid, config.budget)
    end = count.cumsum(dim=1)
    start = end - count
    total = end[:, -1:]
    forced = (count > 0) & ((start < config.sink) | (end > total - config.recent))
    has = (count > 0).unsqueeze(1).expand(b, h, n)
    forced3 = forced.unsqueeze(1).expand(b, h, n)
    key = scores.float().masked_fill(forced3, float("inf")).masked_fill(~has, float("-inf"))
    key = torch.nan_to_num(key, nan=float("-inf"), posinf=float("inf"))
    order = torch.argsort(key, dim=-1, descending=True, stable=True)
    cost = count.unsqueeze(1).expand(b, h, n)
    sorted_cost = cost.gather(-1, order)
    forced_cost = (cost * forced3).sum(dim=-1, keepdim=True)
    limit = torch.maximum(budget.view(b, 1, 1).to(cost.dtype), forced_cost)
    take = has.gather(-1, order) & (sorted_cost.cumsum(dim=-1) <= limit)
    return torch.zeros_like(take).scatter(-1, order, take)


def build(b, h, d, page, t, seed, pad_rows, chunks):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(b, h, t, d, generator=gen) * 2
    valid = torch.ones(b, t, dtype=torch.bool)
    for row, pad in enumerate(pad_rows[:b]):
        valid[row, : min(pad, t - 1)] = False
    new, ref = KeyDigests.empty(b, h, d, page), RefDigests(b, h, d, page)
    pos = 0
    for c in list(chunks) + [t]:
        end = min(t, pos + c)
        if end > pos:
            new.append(keys[:, :, pos:end], valid[:, pos:end])
            ref.append(keys[:, :, pos:end], valid[:, pos:end])
        pos = end
    return new, ref, gen


def check_same(new, ref, query, config, k, *, same_pages=False):
    """``same_pages``: the pages must be those the first implementation selects from its own scores even
    where the scores differ in the last ulps (a fixed case whose scores have no near-ties)."""
    sel = select(query, new, config, backend="torch", pages_per_block=k)
    assert torch.equal(new.landmarks(), ref.landmarks())
    assert torch.equal(new.lo, ref.lo) and torch.equal(new.hi, ref.hi) and torch.equal(new.count, ref.count)
    want_scores = ref_scores(query, ref, config)
    torch.testing.assert_close(sel.scores, want_scores, rtol=1e-5, atol=1e-5)
    assert torch.equal(sel.pages, ref_select(sel.scores, ref.count, config))
    if same_pages or torch.equal(sel.scores, want_scores):
        assert torch.equal(sel.pages, ref_select(want_scores, ref.count, config))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(1, 3), st.sampled_from([1, 2, 3]), st.sampled_from([1, 2, 4, 8]),
       st.integers(1, 200), st.sampled_from([4, 16, 64]), st.integers(0, 2**31 - 1),
       st.lists(st.integers(0, 60), min_size=4, max_size=4), st.lists(st.integers(0, 40), max_size=6),
       st.one_of(st.integers(0, 120), st.floats(0.01, 1.0)), st.integers(0, 6), st.integers(0, 24),
       st.sampled_from([("bound+landmark", "mass"), ("bound+landmark", "score"), ("bound", "score")]),
       st.sampled_from([1, 2, 4]))
def test_select_matches_the_first_implementation(b, h, g, page, t, d, seed, pads, chunks, budget, sink, recent,
                                                 rule, k):
    new, ref, gen = build(b, h, d, page, t, seed, pads, chunks)
    query = torch.randn(b, h * g, 1, d, generator=gen) * 2
    config = SelectionConfig(budget=budget, sink=sink, recent=recent, score=rule[0], rank=rule[1])
    check_same(new, ref, query, config, k)


@pytest.mark.parametrize("budget", [0.0625, 0.25, 512])
def test_select_matches_the_first_implementation_at_the_cache_shape(budget):
    """SmolLM2's decode shape: 9 query heads on 3 KV heads of dim 64, 8-token pages, 64-token blocks,
    4 rows (two left-padded), 2K tokens prefilled then decoded across a page boundary."""
    new, ref, gen = build(4, 3, 64, 8, 2048 + 13, 7, [0, 100, 0, 333], [2048] + [1] * 12)
    config = SelectionConfig(budget=budget, sink=4, recent=64, score="bound+landmark")
    for _ in range(2):
        check_same(new, ref, torch.randn(4, 9, 1, 64, generator=gen), config, 8, same_pages=True)
