"""The resident block pool (tiercache_llm/sparse/pool.py): retention rules, eviction by mass, growth, and
inside a TieredKVCache: a block re-selected while resident is never read again, and the pools are dropped
when rows or blocks change."""

import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tiercache_llm import TieredKVCache
from tiercache_llm.hf_kwargs import cache_kwargs
from tiercache_llm.kv_cache import TieredKVSettings
from tiercache_llm.sparse.pipeline import PipelineConfig
from tiercache_llm.sparse.pool import PoolArena, ResidentPool, auto_pool_bytes

from ..test_generate_tiny import left_padded_batch
from ..test_sparse_pipeline import STRATEGIES, decode_logits, opts

SHAPE = (2, 1, 4, 3)  # (B, H, S, D) of one slot


def assign(pool, blocks, tail=False, mass=None):
    keys = [("k", j) for j in blocks]
    return pool.assign(blocks, keys, tail, SHAPE, SHAPE, torch.float32, torch.device("cpu"), mass)


def fill(pool, blocks, slots, missing):
    for i in missing:
        pool.k[slots[i]].fill_(float(blocks[i]))
        pool.v[slots[i]].fill_(-float(blocks[i]))


def test_previous_retention_keeps_exactly_the_last_selection():
    pool = ResidentPool("previous")
    slots, missing, tail = assign(pool, [1, 2, 3], tail=True)
    assert missing == [0, 1, 2] and tail is not None and tail not in slots
    fill(pool, [1, 2, 3], slots, missing)
    slots2, missing2, _ = assign(pool, [2, 3, 4])
    assert missing2 == [2]  # 2 and 3 are used in place
    assert slots2[:2] == slots[1:]
    assert torch.all(pool.k[slots2[0]] == 2) and torch.all(pool.v[slots2[1]] == -3)
    assert set(pool.slot_of) == {2, 3, 4}  # 1 was evicted: only the previous step's selection stays
    assert pool.capacity == 5  # 1.25 x one union (3 blocks + tail)


@pytest.mark.parametrize("retention", ["none", "previous", "mass"])
def test_an_empty_union_still_gives_the_pool_tensors(retention):
    # A context cropped to nothing selects no block and has no tail; attention still takes the pools.
    pool = ResidentPool(retention, 1.5 if retention == "mass" else 1.0)
    slots, missing, tail = assign(pool, [])
    assert slots == [] and missing == [] and tail is None
    assert pool.k is not None and pool.v is not None
    assert tuple(pool.k.shape[1:]) == SHAPE and pool.k.dtype == torch.float32


def test_none_retention_rereads_everything():
    pool = ResidentPool("none")
    slots, missing, _ = assign(pool, [1, 2])
    fill(pool, [1, 2], slots, missing)
    _, missing2, _ = assign(pool, [1, 2])
    assert missing2 == [0, 1]


def test_mass_retention_keeps_blocks_outside_the_selection_and_evicts_lowest_mass_first():
    pool = ResidentPool("mass", factor=1.5)
    slots, missing, _ = assign(pool, [0, 1])
    fill(pool, [0, 1], slots, missing)
    slots, missing, _ = assign(pool, [2, 3])
    fill(pool, [2, 3], slots, missing)
    assert pool.capacity == 4 and set(pool.slot_of) == {0, 1, 2, 3}  # 0 and 1 stay although not selected
    mass = torch.tensor([5.0, 0.1, 3.0, 0.2, 0.0], dtype=torch.float64)
    slots, missing, _ = assign(pool, [3, 4], mass=mass)
    assert missing == [1] and pool.capacity == 4
    assert set(pool.slot_of) == {0, 2, 3, 4}  # 1 had the lowest mass of the blocks outside the selection
    assert pool.evicted == 1
    _, missing, _ = assign(pool, [0, 2], mass=mass)
    assert missing == []  # blocks 0 and 2 came back after a step away: no read


def test_growth_keeps_held_blocks_and_never_shrinks():
    pool = ResidentPool("mass", factor=1.5)
    slots, missing, _ = assign(pool, [0, 1])
    fill(pool, [0, 1], slots, missing)
    assert pool.capacity == 4  # ceil(1.25 * ceil(1.5 * 2))
    slots2, missing2, _ = assign(pool, [0, 1, 2, 3, 4], tail=True)
    assert pool.grows == 2 and pool.capacity == 9  # ceil(1.5 * 6)
    assert missing2 == [2, 3, 4] and slots2[:2] == slots
    assert torch.all(pool.k[slots2[0]] == 0) and torch.all(pool.k[slots2[1]] == 1)  # copied with the pool
    assign(pool, [7])
    assert pool.capacity == 9
    assert pool.nbytes == 2 * 9 * 2 * 1 * 4 * 3 * 4


def test_growth_is_geometric():
    pool = ResidentPool("previous")
    assign(pool, list(range(8)))
    assert pool.capacity == 10
    assign(pool, list(range(10)))
    assert pool.grows == 1
    assign(pool, list(range(11)))
    assert pool.capacity == 13 and pool.grows == 2  # 1.25 x 10, not 11: the next larger unions fit


def test_growth_within_the_reservation_copies_nothing_and_counts_only_the_capacity():
    pool = ResidentPool("mass", factor=1.5)
    keys = lambda blocks: [("k", j) for j in blocks]  # noqa: E731
    slots, missing, _ = pool.assign([0, 1], keys([0, 1]), False, SHAPE, SHAPE, torch.float32, torch.device("cpu"),
                                    reserve=20)
    fill(pool, [0, 1], slots, missing)
    k = pool.k
    assert k.shape[0] == 20 and pool.capacity == 4 and pool.nbytes == 2 * 4 * 2 * 1 * 4 * 3 * 4
    blocks = list(range(8))
    slots2, missing2, _ = pool.assign(blocks, keys(blocks), True, SHAPE, SHAPE, torch.float32, torch.device("cpu"),
                                      reserve=20)
    assert pool.k is k and pool.grows == 2 and pool.reallocs == 0  # grown in place: no copy
    assert pool.capacity == 14 and max(slots2) < pool.capacity  # ceil(1.5 * 9); rows beyond it are never used
    assert slots2[:2] == slots and torch.all(pool.k[slots2[1]] == 1)
    blocks = list(range(20))
    slots3, _, _ = pool.assign(blocks, keys(blocks), False, SHAPE, SHAPE, torch.float32, torch.device("cpu"),
                               reserve=20)
    assert pool.reallocs == 1 and pool.k.shape[0] == pool.capacity == 30  # beyond the reservation: reallocated
    assert slots3[:2] == slots and torch.all(pool.k[slots3[0]] == 0) and torch.all(pool.v[slots3[1]] == -1)


def test_stale_keys_and_layout_changes_are_misses():
    pool = ResidentPool("previous")
    slots, missing, _ = assign(pool, [1, 2])
    _, missing, _ = pool.assign([1, 2], [("k", 1), ("other", 2)], False, SHAPE, SHAPE, torch.float32,
                                torch.device("cpu"))
    assert missing == [1]  # block 2's key changed: its slot is not trusted
    assert pool.not_held([1, 2, 5], {1: ("k", 1), 2: ("other", 2), 5: ("k", 5)}) == [5]  # 5 was never held
    assert pool.not_held([1, 2], {1: ("k", 1), 2: ("k", 2)}) == [2]  # 2 holds the other key
    assign(pool, [1, 2])
    _, missing, _ = pool.assign([1, 2], [("k", 1), ("k", 2)], False, (3, 1, 4, 3), (3, 1, 4, 3), torch.float32,
                                torch.device("cpu"))
    assert missing == [0, 1] and pool.k.shape[1] == 3  # batch changed: everything is read again
    pool.drop([1])
    assert 1 not in pool.slot_of
    pool.clear()
    assert pool.nbytes == 0 and not pool.slot_of


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="retention"):
        ResidentPool("lru")
    with pytest.raises(ValueError, match="factor"):
        ResidentPool("mass", factor=0.5)


# --------------------------------------------------------------------------------------- in a cache
@pytest.fixture
def model(make_model):
    return make_model("llama", seed=5, num_hidden_layers=3)


def recording(cache, monkeypatch):
    """Record the keys of every store read (the sparse fetch reads through ``get_blocks``)."""
    reads: list = []
    original = cache.store.get_blocks

    def get_blocks(keys, *args, **kwargs):
        reads.extend(keys)
        return original(keys, *args, **kwargs)

    monkeypatch.setattr(cache.store, "get_blocks", get_blocks)
    return reads


@pytest.mark.parametrize("strategy", ["reuse-layer-ahead", "attention-aware"])
def test_a_reselected_block_is_not_read_again(model, tmp_path, monkeypatch, strategy):
    ids, mask = left_padded_batch(seed=5, lengths=(40, 33, 27))
    quiet = {"layer_ahead": False, "disk_staging": False}  # only the forward pass reads
    with TieredKVCache.for_model(model, **opts(tmp_path, strategy, pipeline=quiet)) as cache:
        decode_logits(model, cache, ids, mask, steps=1)
        pipe = cache._pipeline
        reads = recording(cache, monkeypatch)
        reselected = 0
        with torch.no_grad():
            for _ in range(6):
                held = {idx: {cache.layers[idx]._kkeys[j] for j in pool.slot_of} for idx, pool in pipe._pools.items()}
                reads.clear()
                mask = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], dim=1)
                model(input_ids=ids[:, -1:], attention_mask=mask, **cache_kwargs(cache, model))
                for idx, keys in held.items():
                    selected = {cache.layers[idx]._kkeys[j] for j in pipe._last[idx]}
                    assert not (keys & selected & set(reads))  # resident and selected again: never read
                    reselected += len(keys & selected)
        stats = cache.stats()["pipeline"]
        arena = pipe._arena  # the slots every layer's pool shares
        assert stats["reuse_bytes"] == arena.nbytes > 0  # kept incrementally, must match
        assert stats["pool_slots"] == arena.capacity and stats["pool_held"] == arena.held
        # the capacity never exceeds the layers' blocks (stored + tail each)
        assert arena.capacity <= sum(len(cache.layers[idx]._blocks) + 1 for idx in pipe._pools)
        held = [slot for pool in pipe._pools.values() for slot in pool.slot_of.values()]
        assert len(held) == len(set(held)) and all(slot < arena.capacity for slot in held)
    assert reselected > 0 and stats["reused"] > 0


def test_fetch_every_step_reads_every_selected_block(model, tmp_path, monkeypatch):
    ids, mask = left_padded_batch(seed=5, lengths=(40, 33, 27))
    with TieredKVCache.for_model(model, **opts(tmp_path, "fetch-every-step")) as cache:
        decode_logits(model, cache, ids, mask, steps=1)
        pipe = cache._pipeline
        reads = recording(cache, monkeypatch)
        mask = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], dim=1)
        with torch.no_grad():
            model(input_ids=ids[:, -1:], attention_mask=mask, **cache_kwargs(cache, model))
        selected = [cache.layers[i]._kkeys[j] for i, last in pipe._last.items() for j in last]
        assert selected and set(selected) <= set(reads)  # every selected block was read this step
        assert cache.stats()["pipeline"]["reused"] == 0


@pytest.mark.parametrize("change", ["reorder", "crop", "select", "reset"])
def test_pools_are_dropped_when_rows_or_blocks_change(model, tmp_path, change):
    ids, mask = left_padded_batch(seed=5, lengths=(40, 33, 27))
    with TieredKVCache.for_model(model, **opts(tmp_path, "attention-aware")) as cache:
        decode_logits(model, cache, ids, mask, steps=2)
        assert cache.stats()["pipeline"]["reuse_bytes"] > 0 and cache._pipeline._pools
        if change == "reorder":
            cache.reorder_cache(torch.tensor([2, 0, 1]))
        elif change == "crop":
            cache.crop(-3)
        elif change == "select":
            cache.batch_select_indices(torch.tensor([0, 2]))
        else:
            cache.reset()
        assert not cache._pipeline._pools
        assert cache.stats()["pipeline"]["reuse_bytes"] == 0


# --------------------------------------------------------------------------------------- the shared arena, bounded
SLOT_BYTES = 2 * 2 * 1 * 4 * 3 * 4  # K + V of one SHAPE slot, float32


def arena_assign(view, blocks, tail=False, mass=None, limit=None):
    keys = [("k", id(view), j) for j in blocks]
    return view.assign(blocks, keys, tail, SHAPE, SHAPE, torch.float32, torch.device("cpu"), mass, limit=limit)


def fill_arena(view, blocks, slots, missing, tag):
    for i in missing:
        view.k[slots[i]].fill_(tag * 1000 + blocks[i])


def test_a_bounded_arena_evicts_other_layers_lowest_mass_first():
    arena = PoolArena("mass", factor=1.5, max_bytes=5 * SLOT_BYTES, eviction="mass")
    a, b = arena.pool(), arena.pool()
    mass_a = torch.tensor([0.1, 9.0, 0.2, 0.0], dtype=torch.float64)
    mass_b = torch.tensor([5.0, 0.15, 0.05, 0.0], dtype=torch.float64)
    slots, missing, _ = arena_assign(a, [0, 1, 2], mass=mass_a)
    fill_arena(a, [0, 1, 2], slots, missing, 1)
    assert arena.capacity == 5 and not arena.over_budget  # the bound, not 1.25 x 1.5 x 3 + ...
    slots, missing, _ = arena_assign(b, [0, 1, 2], mass=mass_b)  # needs 3, 2 free: evicts a's lowest (block 0)
    fill_arena(b, [0, 1, 2], slots, missing, 2)
    assert set(a.slot_of) == {1, 2} and set(b.slot_of) == {0, 1, 2} and arena.evicted == 1
    slots, missing, _ = arena_assign(a, [1, 3], mass=mass_a)  # block 1 still resident; 3 evicts b's block 2 (0.05)
    assert missing == [1] and set(b.slot_of) == {0, 1} and set(a.slot_of) == {1, 2, 3}
    assert torch.all(a.k[slots[0]] == 1001)  # the kept block was never overwritten
    assert arena.capacity == 5 and arena.nbytes == 5 * SLOT_BYTES


def test_a_bounded_arena_without_mass_evicts_the_layer_used_longest_ago():
    arena = PoolArena("previous", max_bytes=4 * SLOT_BYTES)
    views = [arena.pool() for _ in range(3)]
    for tag, view in enumerate(views):  # layers 0, 1, 2 fetch in turn, 2 blocks each
        arena_assign(view, [tag, tag + 10])
    # 6 blocks do not fit in 4 slots: layer 2 evicted layer 1's blocks (the farthest next fetch after 2 is 1's)
    assert set(views[0].slot_of) == {0, 10} and not views[1].slot_of and set(views[2].slot_of) == {2, 12}
    _, missing, _ = arena_assign(views[0], [0, 10])  # the next step: layer 0 finds its blocks resident
    assert missing == []


def test_a_union_larger_than_the_bound_grows_past_it_with_a_warning():
    arena = PoolArena("mass", factor=1.5, max_bytes=3 * SLOT_BYTES)
    view = arena.pool()
    with pytest.warns(RuntimeWarning, match="pool_bytes"):
        slots, missing, tail = arena_assign(view, [0, 1, 2, 3], tail=True)
    assert arena.capacity == 5 and arena.over_budget == 1 and len(set(slots) | {tail}) == 5
    arena_assign(view, [0, 1])  # fits again: no growth, nothing counted
    assert arena.capacity == 5 and arena.over_budget == 1 and arena.peak_slots == 5


@pytest.mark.parametrize("value", [0, -1, 1.5, 0.0, True, "lots", "", "autos", "0MiB", [1]])
def test_bad_pool_budgets_are_rejected(value, make_config):
    with pytest.raises(ValueError, match="pool_bytes"):
        PipelineConfig(pool_bytes=value)
    with pytest.raises(ValueError, match="pool_bytes"):
        TieredKVCache(make_config(), mode="sparse", pool_bytes=value)
    with pytest.raises(ValueError, match="pool_bytes"):
        TieredKVSettings(pool_bytes=value)  # exact mode validates it too
    with pytest.raises(ValueError, match="max_bytes"):
        PoolArena("mass", max_bytes="auto" if value == "lots" else value)  # the arena takes a resolved bound only


def test_pool_budget_option_plumbing(make_config):
    with pytest.raises(ValueError, match="sparse"):
        TieredKVCache(make_config(), pool_bytes="1MiB")
    with pytest.raises(ValueError, match="contradicts"):
        TieredKVCache(make_config(), mode="sparse", pool_bytes="1MiB", pipeline={"pool_bytes": 4096})
    settings = TieredKVSettings(mode="sparse", strategy="reuse-layer-ahead", pool_bytes="1MiB",
                                pipeline={"io_workers": 3})
    assert settings.pool_bytes == settings.pipeline.pool_bytes == 1 << 20 and settings.pipeline.io_workers == 3
    assert settings.pipeline.retention == "previous"  # the strategy's own pipeline, bounded
    assert PipelineConfig(pool_bytes="2KiB").pool_bytes == 2048
    # the default, everywhere: "auto"; None is the explicit spelling of unbounded
    assert TieredKVSettings(mode="sparse").pool_bytes == PipelineConfig().pool_bytes == "auto"
    assert all(PipelineConfig.for_strategy(s).pool_bytes == "auto" for s in STRATEGIES)
    assert PipelineConfig(pool_bytes=" AUTO ").pool_bytes == "auto"
    unbounded = TieredKVSettings(mode="sparse", pool_bytes=None)
    assert unbounded.pool_bytes is None and unbounded.pipeline.pool_bytes is None
    # the default gives way to an explicit bound in pipeline; two explicit bounds must agree
    given = TieredKVSettings(mode="sparse", pipeline={"pool_bytes": 4096})
    assert given.pool_bytes == given.pipeline.pool_bytes == 4096
    assert TieredKVSettings(mode="sparse", pool_bytes=4096, pipeline={"pool_bytes": "4KiB"}).pool_bytes == 4096
    with pytest.raises(ValueError, match="contradicts"):
        TieredKVSettings(mode="sparse", pool_bytes=None, pipeline={"pool_bytes": 4096})
    with pytest.raises(ValueError, match="contradicts"):
        TieredKVSettings(mode="sparse", pool_bytes=4096, pipeline={"pool_bytes": None})
    # exact mode has no pools: the default and None mean nothing there, a bound is an error
    assert TieredKVSettings().pool_bytes == "auto" and TieredKVSettings(pool_bytes=None).pool_bytes is None


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_the_bound_holds_and_held_slots_keep_their_blocks(data):
    """Random selections of several layers: the arena never exceeds the bound while each union fits, no two
    held blocks share a slot, a block reported resident still holds what was written for it, and the
    tail slot is never a held block's."""
    retention = data.draw(st.sampled_from(["none", "previous", "mass"]))
    n_layers, n_blocks = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 12))
    bound = data.draw(st.integers(1, 40))
    arena = PoolArena(retention, factor=data.draw(st.sampled_from([1.0, 1.5, 2.0])), max_bytes=bound * SLOT_BYTES)
    views = [arena.pool() for _ in range(n_layers)]
    masses = [torch.rand(n_blocks, dtype=torch.float64) for _ in range(n_layers)]
    fits = True
    for _ in range(data.draw(st.integers(1, 6))):
        for tag, view in enumerate(views):
            stored = sorted(data.draw(st.sets(st.integers(0, n_blocks - 1), max_size=n_blocks)))
            tail = data.draw(st.booleans())
            fits = fits and len(stored) + tail <= bound
            before = {j: view.k[s].clone() for j, s in view.slot_of.items() if j in stored} \
                if view.k is not None and retention != "none" else {}  # "none" rereads everything
            slots, missing, tail_slot = arena_assign(view, stored, tail, mass=masses[tag], limit=n_blocks + 1)
            assert sorted(i for i in range(len(stored)) if stored[i] not in before) == missing
            for i, j in enumerate(stored):
                if j in before:  # resident: used in place, contents untouched
                    assert torch.equal(view.k[slots[i]], before[j])
                    assert torch.all(view.k[slots[i]] == tag * 1000 + j)
            fill_arena(view, stored, slots, missing, tag)
            masses[tag].mul_(0.9)[torch.tensor(stored, dtype=torch.long)] += 1.0
            held = [s for v in views for s in v.slot_of.values()] + ([tail_slot] if tail else [])
            assert len(held) == len(set(held)) and all(s < arena.capacity for s in held)
            assert (tail_slot is not None) == tail
            if fits:
                assert arena.capacity <= bound and arena.over_budget == 0
            else:
                assert arena.capacity <= max(bound, n_blocks + 1)
            if retention == "none":
                assert all(not v.slot_of for v in views if v is not view)


# --------------------------------------------------------------------------------------- bounded, in a cache
@pytest.mark.parametrize("strategy", ["fetch-every-step", "reuse-layer-ahead", "attention-aware"])
def test_a_pool_budget_changes_what_is_resident_not_the_logits(model, tmp_path, strategy):
    ids, mask = left_padded_batch(seed=5, lengths=(40, 33, 27))
    with TieredKVCache.for_model(model, **opts(tmp_path, strategy)) as cache:
        ref = decode_logits(model, cache, ids, mask, steps=8)
        free = cache.stats()["pipeline"]
    slot = free["pool_slot_bytes"]
    bound = 12 * slot  # a few unions of the 3 layers (about 9 blocks + the tail each), far below their sum
    with TieredKVCache.for_model(model, **opts(tmp_path / "b", strategy, pool_bytes=bound)) as cache:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # every union fits: never past the bound
            got = decode_logits(model, cache, ids, mask, steps=8)
        stats = cache.stats()
        pipe = stats["pipeline"]
    assert torch.equal(ref, got)
    assert pipe["pool_bound_bytes"] == bound and pipe["pool_over_budget"] == 0
    assert pipe["reuse_peak_bytes"] <= bound and pipe["reuse_bytes"] == pipe["pool_slots"] * slot
    assert stats["kv"]["beside_tiers_bytes"] >= pipe["reuse_bytes"]
    if strategy == "fetch-every-step":  # one union's buffer for every layer, bounded or not
        assert free["reuse_peak_bytes"] <= 12 * slot and pipe["reused"] == free["reused"] == 0
    else:
        assert free["reuse_peak_bytes"] > bound  # the bound did bind
        assert pipe["pool_evicted"] > free["pool_evicted"] and 0 < pipe["reused"] < free["reused"]


@pytest.mark.parametrize("change", ["reorder", "crop", "select"])
def test_a_bounded_pool_is_released_on_row_changes_and_logits_follow(model, tmp_path, change):
    ids, mask = left_padded_batch(seed=5, lengths=(40, 33, 27))
    runs, slot = [], None
    for bounded in (False, True):
        kw = {"pool_bytes": 10 * slot} if bounded else {}
        with TieredKVCache.for_model(model, **opts(tmp_path / str(bounded), "attention-aware", **kw)) as cache:
            decode_logits(model, cache, ids, mask, steps=3)
            slot = cache._pipeline._arena.slot_bytes
            assert cache._pipeline._arena.held > 0
            if bounded:
                assert cache.stats()["pipeline"]["pool_evicted"] > 0
            rows = change_rows(cache, change)
            assert cache._pipeline._arena.held == 0 and cache.stats()["pipeline"]["reuse_bytes"] == 0
            runs.append(decode_rows(model, cache, ids, mask, rows))
    assert torch.equal(runs[0], runs[1])


def change_rows(cache, change):
    """Apply the row change ``change`` (``"reorder"``, ``"crop"``, ``"select"`` or ``"reset"``) to a cache of
    3 rows; the rows of the original batch it holds after, in order (``None`` after a reset)."""
    if change == "reorder":
        cache.reorder_cache(torch.tensor([2, 0, 1]))
        return [2, 0, 1]
    if change == "crop":
        cache.crop(-3)
        return [0, 1, 2]
    if change == "select":
        cache.batch_select_indices(torch.tensor([0, 2]))
        return [0, 2]
    if change == "reset":
        cache.reset()
        return None
    raise ValueError(f"unknown row change {change!r}")


def decode_recording(model, cache, ids, mask, steps):
    """:func:`decode_logits` with every layer's selection recorded, ``(layer, fetch, pages)`` per fetch in
    order; a ``RuntimeWarning`` (a union over the pool bound) raises.  Returns ``(logits, selections)``."""
    selections = []
    pipe = cache._pipeline
    fetch = pipe.fetch

    def recording(state, layer, sel, *args, **kwargs):
        selections.append((layer.layer_idx, sel.fetch.clone(), sel.pages.clone()))
        return fetch(state, layer, sel, *args, **kwargs)

    pipe.fetch = recording
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            logits = decode_logits(model, cache, ids, mask, steps=steps)
    finally:
        pipe.fetch = fetch
    return logits, selections


def decode_rows(model, cache, ids, mask, rows, steps=3):
    """Greedy logits of ``steps`` decode steps after a row change left ``cache`` holding ``rows`` of the
    batch ``ids`` / ``mask`` (its last token fed first): ``(steps, len(rows), vocab)``."""
    n = cache.get_seq_length()
    feed = ids[rows, -1:]
    m = torch.ones(len(rows), n + 1, dtype=mask.dtype)
    m[:, : mask.shape[1]] = mask[rows]
    out = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=feed, attention_mask=m, **cache_kwargs(cache, model)).logits[:, -1]
            out.append(logits)
            feed = logits.argmax(-1, keepdim=True)
            m = torch.cat([m, torch.ones_like(feed)], dim=1)
    return torch.stack(out)


def test_distance_eviction_takes_the_layer_used_longest_ago_lowest_mass_first():
    arena = PoolArena("mass", factor=1.5, max_bytes=6 * SLOT_BYTES, eviction="distance")
    views = [arena.pool() for _ in range(3)]
    masses = [torch.tensor([9.0, 0.1, 5.0, 0.0], dtype=torch.float64) for _ in range(3)]
    arena_assign(views[0], [0, 1], mass=masses[0])
    arena_assign(views[1], [0, 1], mass=masses[1])
    arena_assign(views[2], [0, 1, 2], mass=masses[2])  # 1 short: layer 1 is fetched last from here, its 0.1 goes
    assert set(views[0].slot_of) == {0, 1} and set(views[1].slot_of) == {0} and set(views[2].slot_of) == {0, 1, 2}
    with pytest.raises(ValueError, match="pool_eviction"):
        PipelineConfig(pool_eviction="lru")
    with pytest.raises(ValueError, match="eviction"):
        PoolArena("mass", eviction="lru")


def test_off_the_cpu_a_bounded_arena_takes_its_bound_at_once_and_an_unbounded_one_grows_geometrically():
    """Devices that commit memory on allocation (checked on ``meta``, which follows the same path as CUDA)."""
    meta = torch.device("meta")
    for bound, first, second in ((8, 8, 8), (None, 4, 9)):
        arena = PoolArena("previous", max_bytes=None if bound is None else bound * SLOT_BYTES)
        a, b = arena.pool(), arena.pool()
        a.assign([0, 1, 2], [0, 1, 2], False, SHAPE, SHAPE, torch.float32, meta, reserve=4)
        assert arena.capacity == first and arena.k.device == meta
        b.assign([0, 1, 2, 3], [0, 1, 2, 3], False, SHAPE, SHAPE, torch.float32, meta, reserve=5)
        assert arena.capacity == second and arena.reallocs == (bound is None)


# --------------------------------------------------------------------------------------- the default bound
def test_auto_is_the_budget_of_the_memory_tier_on_the_models_device():
    both = {"gpu": 3 << 20, "host": 5 << 20, "disk": 1 << 30}
    assert auto_pool_bytes(both, "cpu") == (5 << 20, "auto: the host tier's budget (model on cpu)")
    assert auto_pool_bytes(both, torch.device("cuda", 1)) == (3 << 20, "auto: the gpu tier's budget (model on cuda)")
    # that tier absent: the other memory tier's budget
    assert auto_pool_bytes({"host": 5 << 20, "disk": 1 << 30}, "cuda") == \
        (5 << 20, "auto: the host tier's budget (model on cuda, no gpu tier)")
    assert auto_pool_bytes({"gpu": 3 << 20}, "cpu") == (3 << 20, "auto: the gpu tier's budget (model on cpu, no host tier)")
    bound, source = auto_pool_bytes({"host": 5 << 20}, "cpu", borrowed=True)
    assert bound == 5 << 20 and "given tiercache.Cache" in source
    with pytest.raises(ValueError, match="pool_bytes='auto'.*None for unbounded"):
        auto_pool_bytes({"disk": 1 << 30}, "cpu")


def _no_pool_bytes(kw):
    kw = dict(kw)
    del kw["pool_bytes"]  # opts() asks for unbounded pools: these tests use the default
    return kw


def test_the_default_bound_of_a_cpu_model_is_the_host_budget_and_stats_say_so(model, tmp_path):
    ids, mask = left_padded_batch(seed=5, lengths=(40, 33, 27))
    with TieredKVCache.for_model(model, **_no_pool_bytes(opts(tmp_path, "attention-aware", host="48KiB"))) as cache:
        assert cache.settings.pool_bytes == "auto"
        before = cache.stats()["pipeline"]
        assert before["pool_bound_bytes"] is None and "not resolved yet" in before["pool_bound_source"]
        decode_logits(model, cache, ids, mask, steps=3)
        stats = cache.stats()
    pipe = stats["pipeline"]
    assert pipe["pool_bound_bytes"] == 48 << 10 == stats["tiercache"]["tiers"]["host"]["capacity_bytes"]
    assert pipe["pool_bound_source"] == "auto: the host tier's budget (model on cpu)"
    assert pipe["config"]["pool_bytes"] == stats["sparse"]["settings"]["pool_bytes"] == "auto"
    assert pipe["reuse_peak_bytes"] <= 48 << 10 and pipe["pool_over_budget"] == 0


def test_explicit_bounds_and_unbounded_say_where_they_came_from(model, tmp_path):
    ids, mask = left_padded_batch(seed=5, lengths=(40, 33, 27))
    for kw, bound, source in (({"pool_bytes": None}, None, "unbounded (pool_bytes=None)"),
                              ({"pool_bytes": "36KiB"}, 36 << 10, "pool_bytes")):
        with TieredKVCache.for_model(model, **opts(tmp_path / str(bound), "reuse-layer-ahead", **kw)) as cache:
            decode_logits(model, cache, ids, mask, steps=2)
            pipe = cache.stats()["pipeline"]
        assert pipe["pool_bound_bytes"] == bound and pipe["pool_bound_source"] == source


def test_a_cache_without_a_memory_tier_refuses_the_default_bound(make_config, tmp_path):
    with pytest.raises(ValueError, match=r"pool_bytes='auto'.*no.*pool_bytes="):
        TieredKVCache(make_config(), mode="sparse", host=None, disk="4MiB", path=tmp_path / "a")
    with TieredKVCache(make_config(), mode="sparse", host=None, disk="4MiB", path=tmp_path / "b", pool_bytes=None) as c:
        assert c.stats()["pipeline"]["pool_bound_source"] == "unbounded (pool_bytes=None)"
    with TieredKVCache(make_config(), host=None, disk="4MiB", path=tmp_path / "c"):  # exact mode: no pools
        pass


def test_over_an_existing_tiercache_the_default_follows_its_memory_tier(model, tmp_path):
    import tiercache

    ids, mask = left_padded_batch(seed=5, lengths=(40, 33, 27))
    with tiercache.Cache(host="40KiB", disk="8MiB", path=tmp_path / "shared") as shared:
        kw = {k: v for k, v in _no_pool_bytes(opts(tmp_path, "attention-aware")).items()
              if k not in ("host", "disk", "path", "direct_io")}
        with TieredKVCache.for_model(model, cache=shared, **kw) as cache:
            decode_logits(model, cache, ids, mask, steps=2)
            pipe = cache.stats()["pipeline"]
        assert pipe["pool_bound_bytes"] == 40 << 10
        assert pipe["pool_bound_source"] == "auto: the host tier's budget of the given tiercache.Cache (model on cpu)"
    with tiercache.Cache(host=0, disk="8MiB", path=tmp_path / "disk-only") as shared:
        with pytest.raises(ValueError, match="pool_bytes='auto'"):
            TieredKVCache(model.config, mode="sparse", cache=shared)
        shared.put("still-open", torch.zeros(4))  # the refusal left the borrowed cache open


def test_the_seed_stays_within_the_default_bound(model, tmp_path):
    from ..test_sparse_pipeline import _prefill_then

    ids, mask = left_padded_batch(seed=5, lengths=(40, 33, 27))
    with TieredKVCache.for_model(model, **_no_pool_bytes(opts(tmp_path, "attention-aware", host="24KiB"))) as cache:
        _, prefilled, _ = _prefill_then(model, cache, ids, mask, steps=1)
    assert prefilled["pool_bound_bytes"] == 24 << 10 and prefilled["pool_bound_source"].startswith("auto: the host")
    assert 0 < prefilled["seeded"] and prefilled["reuse_bytes"] <= 24 << 10


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_decoding_under_the_default_bound_gives_the_unbounded_logits_and_selections(model, tmp_path, strategy):
    """The default bound only changes what is resident: every step's logits and every layer's selection are
    bitwise those of unbounded pools, while the bound binds (evictions) and is never exceeded."""
    ids, mask = left_padded_batch(seed=5, lengths=(40, 33, 27))
    runs = {}
    for name in ("unbounded", "default"):
        kw = opts(tmp_path / name, strategy, host="36KiB")  # 12 slots of 3 KiB: a few unions, far below their sum
        if name == "default":
            kw = _no_pool_bytes(kw)
        with TieredKVCache.for_model(model, **kw) as cache:
            logits, selections = decode_recording(model, cache, ids, mask, steps=8)  # every union fits the bound
            runs[name] = (logits, selections, cache.stats()["pipeline"])
    (ref, ref_sel, free), (got, got_sel, pipe) = runs["unbounded"], runs["default"]
    assert torch.equal(ref, got)
    assert len(ref_sel) == len(got_sel) > 0
    assert all(a[0] == b[0] and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2]) for a, b in zip(ref_sel, got_sel))
    assert pipe["pool_bound_bytes"] == 36 << 10 and pipe["pool_over_budget"] == 0
    assert pipe["reuse_peak_bytes"] <= 36 << 10
    if strategy != "fetch-every-step":
        assert free["reuse_peak_bytes"] > 36 << 10 and pipe["pool_evicted"] > free["pool_evicted"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_resolves_the_default_bound_at_the_prefill(model, tmp_path, strategy):
    from ..test_sparse_pipeline import _prefill_then

    ids, mask = left_padded_batch(seed=5, lengths=(40, 33, 27))
    with TieredKVCache.for_model(model, **_no_pool_bytes(opts(tmp_path, strategy, host="36KiB"))) as cache:
        _, prefilled, _ = _prefill_then(model, cache, ids, mask, steps=1)
    assert prefilled["pool_bound_bytes"] == 36 << 10
    assert prefilled["pool_bound_source"] == "auto: the host tier's budget (model on cpu)"


def test_a_bounded_arena_preferring_cheap_blocks_evicts_them_first():
    """prefer_cheap (the pipeline's exclusive_pool): within the victim layer, blocks marked cheap to read again go
    before the others, whatever their mass; unbounded or without the flag the order stays lowest mass first."""
    for prefer, bound, expect in ((True, 4, {0, 2}), (False, 4, {1, 2}), (True, None, {0, 1, 2})):
        arena = PoolArena("mass", factor=1.5, max_bytes=None if bound is None else bound * SLOT_BYTES)
        arena.prefer_cheap = prefer
        a, b = arena.pool(), arena.pool()
        mass = torch.tensor([0.1, 9.0, 5.0, 0.0], dtype=torch.float64)
        arena_assign(a, [0, 1, 2], mass=mass)
        a.cheap.add(1)  # block 1's entries sat in the fastest tier: cheap to read again
        arena_assign(b, [0, 1], mass=mass)  # 1 short when bounded: evicted from a (fetched longest ago)
        assert set(a.slot_of) == expect, (prefer, bound)
        assert a.cheap <= set(a.slot_of)  # an evicted block is no longer marked
    arena.clear()
    assert not a.cheap


@pytest.mark.parametrize("eviction", ["mass", "distance"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_victims_pass_over_protected_blocks_as_the_full_ranking_filtered(eviction, data):
    """``_victims`` with ``protect`` names the first ``count`` blocks of its full ranking (no protection, every
    candidate) that are not protected, in order, when reads in flight are passed over (``in_flight=False``, as a
    reservation, its only caller with protection, asks)."""
    import concurrent.futures

    n_layers = data.draw(st.integers(2, 5))
    arena = PoolArena("mass", factor=2.0, max_bytes=None, eviction=eviction)
    views = [arena.pool() for _ in range(n_layers)]
    for view in views:
        blocks = sorted(data.draw(st.sets(st.integers(0, 11), min_size=1, max_size=6)))
        mass = torch.tensor(data.draw(st.lists(st.floats(0, 10), min_size=12, max_size=12)), dtype=torch.float64)
        arena_assign(view, blocks, mass=mass)
    pending = concurrent.futures.Future()  # a read in flight into some slots
    for view in views:
        for j in list(view.slot_of)[: data.draw(st.integers(0, 2))]:
            arena.mark_pending([view.slot_of[j]], pending)
    view = data.draw(st.sampled_from(views))
    want = set(data.draw(st.sets(st.sampled_from(sorted(view.slot_of)))))
    guarded = data.draw(st.sampled_from(views))
    keep = set(data.draw(st.sets(st.sampled_from(sorted(guarded.slot_of)))))
    origin = data.draw(st.sampled_from([None, *views]))
    count = data.draw(st.integers(1, 30))
    full = arena._victims(view, want, 10_000, None, in_flight=False, origin=origin)
    expect = [(p, j) for p, j in full if not (p is guarded and j in keep)][:count]
    assert arena._victims(view, want, count, (guarded, keep), in_flight=False, origin=origin) == expect
    pending.set_result(None)
