"""The resident block pool (tiercache_llm/sparse/pool.py): retention rules, eviction by mass, growth, and
inside a TieredKVCache: a block re-selected while resident is never read again, and the pools are dropped
when rows or blocks change."""

import pytest
import torch

from tiercache_llm import TieredKVCache
from tiercache_llm.sparse.pool import ResidentPool

from ..test_generate_tiny import left_padded_batch
from ..test_sparse_pipeline import decode_logits, opts

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
                model(input_ids=ids[:, -1:], attention_mask=mask, past_key_values=cache)
                for idx, keys in held.items():
                    selected = {cache.layers[idx]._kkeys[j] for j in pipe._last[idx]}
                    assert not (keys & selected & set(reads))  # resident and selected again: never read
                    reselected += len(keys & selected)
        stats = cache.stats()["pipeline"]
        pools = pipe._pools.values()
        assert stats["reuse_bytes"] == sum(p.nbytes for p in pools) > 0  # kept incrementally, must match
        assert stats["pool_slots"] == sum(p.capacity for p in pools)
        for idx, pool in pipe._pools.items():  # the capacity never exceeds the layer's blocks (stored + tail)
            assert pool.capacity <= len(cache.layers[idx]._blocks) + 1
            assert all(slot < pool.capacity for slot in pool.slot_of.values())
    assert reselected > 0 and stats["reused"] > 0


def test_fetch_every_step_reads_every_selected_block(model, tmp_path, monkeypatch):
    ids, mask = left_padded_batch(seed=5, lengths=(40, 33, 27))
    with TieredKVCache.for_model(model, **opts(tmp_path, "fetch-every-step")) as cache:
        decode_logits(model, cache, ids, mask, steps=1)
        pipe = cache._pipeline
        reads = recording(cache, monkeypatch)
        mask = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], dim=1)
        with torch.no_grad():
            model(input_ids=ids[:, -1:], attention_mask=mask, past_key_values=cache)
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
