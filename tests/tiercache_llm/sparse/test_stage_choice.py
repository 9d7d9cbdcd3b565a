"""Disk staging ahead's choice for all layers at once (tiercache_llm.sparse.stage_choice) against the
per-layer computations it replaced."""

from __future__ import annotations

import random

import pytest
import torch

from tiercache_llm.sparse.stage_choice import LastSelection, near_misses_many, top_mass_many


def near_misses_one(sel: LastSelection | None, n: int, held: set, count: int) -> list[int]:
    """The per-layer torch computation DecodePipeline.near_misses ran before stage_choice (kept verbatim)."""
    if sel is None or n == 0 or count <= 0:
        return []
    scores, pages, ppb, valid = sel
    b, h, p = scores.shape
    inf = float("inf")
    s = torch.nan_to_num(scores.float(), nan=-inf)
    threshold = s.masked_fill(~pages, inf).amin(-1, keepdim=True)
    empty = (valid[:, :p] <= 0).unsqueeze(1)
    gap = torch.nan_to_num(threshold - s, nan=inf).masked_fill_(pages | empty, inf)
    nb = -(-p // ppb)
    if nb * ppb != p:
        gap = torch.nn.functional.pad(gap, (0, nb * ppb - p), value=inf)
    block = gap.reshape(b * h, nb, ppb).amin(dim=-1).amin(dim=0)[:n].clone()
    out = [j for j in held if j < block.numel()]
    if out:
        block[torch.tensor(out, dtype=torch.long)] = inf
    values, indices = torch.topk(block, min(count, block.numel()), largest=False, sorted=True)
    return [j for j, g in zip(indices.tolist(), values.tolist()) if g != inf]


def top_mass_one(mass: torch.Tensor, n: int, held: set, extra: int) -> list[int]:
    """The per-layer high-mass candidates DecodePipeline._stage_ahead computed before stage_choice."""
    if n == 0:
        return []
    values, indices = torch.topk(mass[:n], min(n, extra + len(held)))
    return [j for j, m in zip(indices.tolist(), values.tolist()) if m > 0 and j not in held]


def random_selection(gen: torch.Generator, b: int, h: int, p: int, ppb: int, *, ties: bool) -> LastSelection:
    if ties:  # few distinct values: many equal gaps, so the ranking of ties is compared too
        scores = torch.randint(0, 4, (b, h, p), generator=gen).float()
    else:
        scores = torch.randn(b, h, p, generator=gen)
    scores[torch.rand(b, h, p, generator=gen) < 0.05] = float("nan")
    scores[torch.rand(b, h, p, generator=gen) < 0.02] = float("-inf")
    pages = torch.rand(b, h, p, generator=gen) < 0.3
    pages[0, 0] = False  # a head that selected nothing: its threshold is inf
    count = torch.randint(0, 3, (b, p + 2), generator=gen)  # digests may hold more pages than the scores
    return LastSelection(scores, pages, ppb, count)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_near_misses_many_equals_the_per_layer_computation(seed, ties):
    gen = torch.Generator().manual_seed(seed)
    rnd = random.Random(seed)
    sels, ns, helds = [], [], []
    for layer in range(9):
        b, h, ppb = (2, 3, 4) if layer % 3 else (1, 2, 1)  # two groups of shapes, interleaved
        p = 37 if layer % 3 else 20  # 37: not a multiple of pages_per_block (padded)
        nb = -(-p // ppb)
        n = nb - (layer % 2)  # the stored blocks (the tail block's pages lie past them)
        sels.append(None if layer == 4 else random_selection(gen, b, h, p, ppb, ties=ties))
        ns.append(0 if layer == 7 else n)
        helds.append({rnd.randrange(nb + 3) for _ in range(rnd.randrange(8))})
    for count in (0, 1, 5, 64):
        got = near_misses_many(sels, ns, helds, count)
        want = [near_misses_one(sel, n, held, count) for sel, n, held in zip(sels, ns, helds)]
        assert got == want
    assert any(got) and got[4] == [] and got[7] == []


@pytest.mark.parametrize("seed", range(4))
def test_top_mass_many_equals_the_per_layer_computation(seed):
    gen = torch.Generator().manual_seed(seed)
    rnd = random.Random(seed)
    masses, ns, helds = [], [], []
    for layer in range(8):
        size = 30 if layer % 2 else 23
        mass = torch.rand(size, generator=gen, dtype=torch.float64)  # distinct: no ties to order
        mass[torch.rand(size, generator=gen) < 0.3] = 0.0  # never attended: not candidates
        masses.append(mass)
        ns.append(0 if layer == 5 else min(size, 20 + layer % 3))
        helds.append({rnd.randrange(size) for _ in range(rnd.randrange(12))})
    for extra in (0, 3, 16):
        got = top_mass_many(masses, ns, helds, extra)
        assert got == [top_mass_one(m, n, held, extra) for m, n, held in zip(masses, ns, helds)]
    assert any(got) and got[5] == []


def test_empty_inputs():
    assert near_misses_many([], [], [], 4) == []
    assert top_mass_many([], [], [], 4) == []


@pytest.mark.parametrize("threads", [1, 2])
def test_block_gaps_in_chunks_equal_block_gaps_stacked(monkeypatch, threads):
    """Above one torch thread the layers are stacked a few at a time (below the intra-op grain): same gaps."""
    from tiercache_llm.sparse import stage_choice

    gen = torch.Generator().manual_seed(7)
    sels = [random_selection(gen, 2, 3, 37, 4, ties=True) for _ in range(7)]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        whole = stage_choice.block_gaps(sels, 9)
        monkeypatch.setattr(stage_choice, "GRAIN", 3 * sels[0].scores.numel())  # 2 layers per chunk
        chunked = stage_choice.block_gaps(sels, 9)
    finally:
        torch.set_num_threads(before)
    assert whole.shape == (7, 9) and torch.equal(whole, chunked)
    assert stage_choice._chunk(7, sels[0].scores.numel()) == (7 if before <= 1 else 2)
