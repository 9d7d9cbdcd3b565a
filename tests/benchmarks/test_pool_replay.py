"""benchmarks/pool_replay.py: the replay's policies on hand-made and synthetic access sequences (MIN is the
floor, a pool holding the working set has only compulsory misses), the layout mapping of recorded steps, and
one end-to-end run on the random 2-layer Llama."""

from __future__ import annotations

import json
import random

import pytest
import torch


@pytest.fixture(scope="module")
def pr(load_benchmark):
    return load_benchmark("pool_replay")


def _single(pr, seq):
    """One unit per request, all of layer 0, one step per access (so decays differ between accesses)."""
    return [pr.Request(i, [(0, u)], layer=0) for i, u in enumerate(seq)]


def test_min_matches_hand_counts(pr):
    # Belady's classic string with 3 frames: OPT 7 faults, LRU 10.
    reqs = _single(pr, [1, 2, 3, 4, 1, 2, 5, 1, 2, 3, 4, 5])
    assert sum(pr.replay(reqs, 3, "min")) == 7
    assert sum(pr.replay(reqs, 3, "lru")) == 10
    assert sum(pr.replay(reqs, 3, "none")) == 12
    # a b a with one slot: MIN keeps a (b bypasses) and hits it again; a policy that must admit b cannot.
    aba = _single(pr, "aba")
    assert pr.replay(aba, 1, "min") == [1, 1, 0]
    assert sum(pr.replay(aba, 1, "lru")) == 3 and sum(pr.replay(aba, 1, "min-pinned")) == 3
    assert sum(pr.replay(aba, 1, "static")) == 2  # a pinned, b read through every time


def _synthetic(pr, seed, layers=3, blocks=12, steps=8, width=5):
    """Cyclic layer steps over drifting selections with random attention masses."""
    rng = random.Random(seed)
    reqs = []
    sel = {layer: set(rng.sample(range(blocks), width)) for layer in range(layers)}
    for t in range(steps):
        for layer in range(layers):
            s = sel[layer]
            if rng.random() < 0.7:  # drift: one block leaves, another enters
                s.discard(rng.choice(sorted(s)))
                s.add(rng.randrange(blocks))
            units = [(layer, j) for j in sorted(s)]
            reqs.append(pr.Request(t, units, {u: rng.random() for u in units}, layer))
    return reqs


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("capacity", [0, 1, 4, 7, 11, 20])
def test_min_is_the_floor(pr, seed, capacity):
    reqs = _synthetic(pr, seed)
    misses = {p: sum(pr.replay(reqs, capacity, p)) for p in pr.POLICIES}
    assert all(misses["min"] <= m for m in misses.values()), misses
    assert misses["none"] == sum(len(r.units) for r in reqs)
    assert misses["min"] <= misses["lru"]


@pytest.mark.parametrize("seed", range(3))
def test_a_pool_holding_the_working_set_has_only_compulsory_misses(pr, seed):
    reqs = _synthetic(pr, seed)
    distinct = len({u for r in reqs for u in r.units})
    for p in pr.POLICIES:
        if p == "none":
            continue
        for capacity in (distinct, distinct + 5):
            got = pr.replay(reqs, capacity, p)
            assert sum(got) == distinct, (p, capacity)
            assert got[0] == len(reqs[0].units)  # the first request: every unit is new


def test_replay_refuses_unknown_policies_and_negative_capacity(pr):
    with pytest.raises(ValueError, match="policy"):
        pr.replay([], 1, "fifo")
    with pytest.raises(ValueError, match="capacity"):
        pr.replay([], -1, "lru")


def test_layout_requests_map_blocks_and_masses(pr, load_benchmark):
    fg = load_benchmark("fetch_granularity")
    pages = torch.zeros(1, 1, 32, dtype=torch.bool)  # 256 tokens, pages of 8: four 64-token blocks
    pages[0, 0, [0, 9, 17, 31]] = True  # blocks 0, 1, 2, 3
    step = fg.LayerStep(layer=3, pages=pages, page=8, context=256, stored=[0, 1, 2, 3], n_stored=4,
                        block_size=64, tokens_selected=32)
    masses = {(0, 3): {0: 0.5, 1: 0.25, 3: 0.125}}
    reqs, total = pr.layout_requests([[step]], pr.LAYOUTS[0], masses)
    assert total == 4 and reqs[0].units == [(3, 0), (3, 1), (3, 2), (3, 3)] and reqs[0].layer == 3
    assert reqs[0].mass == {(3, 0): 0.5, (3, 1): 0.25, (3, 3): 0.125}
    reqs, total = pr.layout_requests([[step]], pr.LAYOUTS[1], masses)  # 128-token units: blocks 0+1, 2+3
    assert total == 2 and reqs[0].units == [(3, 0), (3, 1)] and reqs[0].mass == {(3, 0): 0.75, (3, 1): 0.125}


def test_end_to_end_tiny(pr, tmp_path):
    from _common import sparse_available

    if not sparse_available()[0]:
        pytest.skip("sparse mode not available")
    out = tmp_path / "out"
    assert pr.main(["--model", "tiny", "--contexts", "512", "--batches", "2", "--budgets", "0.25", "--steps", "3",
                    "--capacities", "0.5,default,1.0", "--per-layer", "--disk-mib", "1", "--disk-repeats", "1",
                    "--workdir", str(tmp_path), "--out", str(out), "--no-progress"]) == 0
    doc = json.loads((out / "pool_replay.json").read_text())
    (point,) = doc["points"]
    assert point["checked"]["steps"] == 3 and point["masses_recorded"]
    assert set(point["real"]) == {"attention-aware", "reuse-layer-ahead"}
    assert all(r["same_selection"] == 1.0 for r in doc["real_summary"])
    assert "default" in point["fractions"]
    groups: dict = {}
    for r in doc["summary"]:
        groups.setdefault((r["layout"], r["capacity"], r["pool"]), {})[r["policy"]] = r["misses"]
    assert {k[2] for k in groups} == {"shared", "per layer"}
    for g in groups.values():
        assert set(g) == set(pr.POLICIES) and all(g["min"] <= m for m in g.values())
    assert (out / "pool_replay.md").exists() and (out / "pool_replay.png").stat().st_size > 0
