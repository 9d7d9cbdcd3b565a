"""Sparse caches store a block's K and V as one joint entry ``(2, B, H, S, D)`` (kind ``"kv"``) when their shapes
agree, read in one piece into a joint pool slot: the same logits and selections as two entries per block (the
layout of unequal K/V shapes, still supported), half the entries read, the same bytes, and damage still raises."""

import pytest
import torch

from tiercache_llm import TieredKVCache
from tiercache_llm.errors import KVCapacityError
from tiercache_llm.sparse.pool import PoolArena

from ..test_generate_tiny import left_padded_batch
from tiercache_llm.hf_kwargs import cache_kwargs

from ..test_sparse_pipeline import SYNC, decode_logits, opts, two_entries, without_pipeline
from .test_pool import change_rows, decode_recording, decode_rows

SHAPE = (2, 1, 4, 3)  # (B, H, S, D) of one slot


@pytest.fixture
def model(make_model):
    return make_model("llama", seed=5, num_hidden_layers=3)


def _decode(model, tmp_path, strategy, joint, steps=8, change=None, sync=False, **kw):
    """Decode a left-padded batch of 3 (``change``: then a row change and 3 more steps); returns the logits,
    the selections, the stats and the kinds of the stored keys."""
    ids, mask = left_padded_batch(seed=5, lengths=(40, 33, 27))
    if sync:
        kw["pipeline"] = SYNC
    with TieredKVCache.for_model(model, **opts(tmp_path / f"{joint}", strategy, **kw)) as cache:
        if sync:
            without_pipeline(cache)
        if not joint:
            two_entries(cache)
        if sync:  # the layers fetch through fetch_selected's own path (no pipeline, nothing recorded)
            logits, selections = decode_logits(model, cache, ids, mask, steps=steps), []
        else:
            logits, selections = decode_recording(model, cache, ids, mask, steps)
        kinds = {key[3] for key in cache.store.cache.keys()}
        assert all(layer._joint is joint for layer in cache.layers)
        if change is not None:
            rows = change_rows(cache, change)
            if rows is None:  # reset: decode the batch again from its prefill
                rows, after = [0, 1, 2], decode_logits(model, cache, ids, mask, steps=3)
            else:
                after = decode_rows(model, cache, ids, mask, rows)
            logits = [logits, after]
        stats = cache.stats()
    return logits, selections, stats, kinds


def _same_selections(a, b):
    return len(a) == len(b) and all(x[0] == y[0] and torch.equal(x[1], y[1]) and torch.equal(x[2], y[2])
                                    for x, y in zip(a, b))


@pytest.mark.parametrize("strategy,kw", [("fetch-every-step", {}), ("reuse-layer-ahead", {}), ("attention-aware", {}),
                                         ("attention-aware", {"pool_bytes": 12 * 3 * 1024}),
                                         ("reuse-layer-ahead", {"pool_bytes": 12 * 3 * 1024})])
def test_joint_entries_give_the_logits_and_selections_of_two_entries_with_half_the_entries(model, tmp_path, strategy,
                                                                                           kw):
    two, two_sel, two_stats, two_kinds = _decode(model, tmp_path / "two", strategy, False, **kw)
    one, one_sel, one_stats, one_kinds = _decode(model, tmp_path / "one", strategy, True, **kw)
    assert two_kinds == {"k", "v"} and one_kinds == {"kv"}
    assert torch.equal(one, two) and _same_selections(one_sel, two_sel) and one_sel
    p1, p2 = one_stats["pipeline"], two_stats["pipeline"]
    assert 2 * p1["needed"] == p2["needed"] > 0  # entries: one per block instead of two
    assert p1["reused"] + p1["staged"] + sum(p1["sync"].values()) == p1["needed"]
    s1, s2 = one_stats["sparse"]["total"], two_stats["sparse"]["total"]
    assert s1["blocks_selected"] == s2["blocks_selected"] > 0
    if strategy == "fetch-every-step":  # every selected block read each step: the same bytes (both halves)
        assert sum(p1["sync"].values()) * 2 == sum(p2["sync"].values())
        if p1["ranged_entries"]:  # part reads (a tiercache with ranged reads): only the selected parts' bytes
            assert 0 < sum(s1["bytes_fetched"].values()) < sum(s2["bytes_fetched"].values())
        else:
            assert sum(s1["bytes_fetched"].values()) == sum(s2["bytes_fetched"].values()) > 0
    if "pool_bytes" in kw:
        assert p1["slot_reserved"] > 0 or strategy != "attention-aware"
        assert p1["pool_slot_bytes"] == p2["pool_slot_bytes"]


@pytest.mark.parametrize("change", ["reorder", "crop", "select", "reset"])
def test_joint_entries_follow_row_changes_like_two_entries(model, tmp_path, change):
    """Reorder leaves row maps on the blocks: their joint entries are read into a temporary and viewed into place."""
    two = _decode(model, tmp_path / "two", "attention-aware", False, steps=3, change=change)[0]
    one = _decode(model, tmp_path / "one", "attention-aware", True, steps=3, change=change)[0]
    assert all(torch.equal(a, b) for a, b in zip(one, two))


@pytest.mark.parametrize("change", [None, "reorder"])
def test_the_synchronous_fetch_reads_joint_entries_into_a_joint_buffer(model, tmp_path, change):
    two = _decode(model, tmp_path / "two", "fetch-every-step", False, steps=4, change=change, sync=True)[0]
    one = _decode(model, tmp_path / "one", "fetch-every-step", True, steps=4, change=change, sync=True)[0]
    assert all(torch.equal(a, b) for a, b in zip(one, two)) if change else torch.equal(one, two)


def _flip_on_disk(cache, key):
    entry = cache.store.cache._index[key]
    tier = cache.store.cache.tiers[entry.level]
    assert tier.name == "disk"
    path = tier.chunk_path(entry.slot)
    raw = bytearray(path.read_bytes())
    # Inside the payload, which follows the header page: the first (row, KV head) part of the part-major joint entry
    # (row 0's, head 0's K), which the first step reads even where it reads only the selected parts (row 0 has no
    # padding, and the sink block is always selected).  The file's last bytes are padding and the file checksum,
    # which a part read does not cover.
    from tiercache.tiers.disk_format import HEADER_BYTES

    raw[HEADER_BYTES + 64] ^= 0x40
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("strategy", ["fetch-every-step", "reuse-layer-ahead"])
def test_a_damaged_joint_entry_raises_at_the_step_that_reads_it(model, tmp_path, strategy):
    """Block 0 (the sink) is selected at every step; its joint entry, damaged on disk, is read by the first decode
    step (no pool holds it yet): the checksum fails, the tiercache drops the entry and the step raises (the store's
    ``KVCapacityError``: the block is gone), never attending wrong bytes."""
    ids, mask = left_padded_batch(seed=5, lengths=(40, 33, 27))
    with TieredKVCache.for_model(model, **opts(tmp_path, strategy, host="2KiB")) as cache:
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, **cache_kwargs(cache, model)).logits[:, -1]
        cache.store.flush_writes()
        _flip_on_disk(cache, cache.layers[0]._kkeys[0])
        nxt = logits.argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        with pytest.raises(KVCapacityError, match="evicted or corrupt"), torch.no_grad():
            model(input_ids=nxt, attention_mask=mask, **cache_kwargs(cache, model))


def test_a_joint_arena_is_one_storage_with_k_and_v_as_its_halves():
    arena = PoolArena("previous")
    view = arena.pool()
    slots, missing, _ = view.assign([0, 1], ["a", "b"], False, SHAPE, SHAPE, torch.float32, "cpu", reserve=4,
                                    limit=8, joint=True)
    # part-major: (N, B, H, 2, S, D), each (row, head) part K then V, one contiguous range
    assert arena.joint and arena.kv.is_contiguous() and arena.kv.shape[1:] == (*SHAPE[:2], 2, *SHAPE[2:])
    assert arena.storages == (arena.kv,)
    assert arena.k.data_ptr() == arena.kv.data_ptr() and arena.v.data_ptr() == arena.kv[:, :, :, 1].data_ptr()
    assert arena.slot_bytes == 2 * torch.Size(SHAPE).numel() * 4
    for i in missing:  # a joint entry lands in kv[slot]: its halves are k[slot] and v[slot]
        arena.kv[slots[i]].copy_(torch.stack((torch.full(SHAPE, 1.0 + i), torch.full(SHAPE, -1.0 - i)), dim=2))
    assert all(torch.all(arena.k[s] == 1 + i) and torch.all(arena.v[s] == -1 - i) for i, s in enumerate(slots))
    # growth past the reservation reallocates and copies the held joint slots
    more = list(range(8))
    slots2, missing2, _ = view.assign(more, [*"ab", *map(str, more[2:])], False, SHAPE, SHAPE, torch.float32, "cpu",
                                      reserve=4, limit=8, joint=True)
    assert arena.reallocs >= 1 and missing2 == list(range(2, 8)) and slots2[:2] == slots
    assert torch.all(arena.k[slots[1]] == 2) and torch.all(arena.v[slots[0]] == -1)
    # a change of layout (two entries per block) clears the arena like a change of shape
    slots3, missing3, _ = view.assign([0], ["a"], False, SHAPE, SHAPE, torch.float32, "cpu", reserve=4, limit=8)
    assert missing3 == [0] and not arena.joint and arena.kv is None and arena.storages == (arena.k, arena.v)
    with pytest.raises(ValueError, match="equal K and V"):
        view.assign([0], ["a"], False, SHAPE, (2, 1, 4, 5), torch.float32, "cpu", joint=True)


def test_sparse_layers_store_part_major_entries_and_exact_layers_k_then_v(model, tmp_path):
    """A sparse layer's joint entry is ``(B, H, 2, S, D)`` (each (row, KV head) part K then V, one byte range);
    an exact layer's stays ``(2, B, H, S, D)``.  Either holds the states the model produced."""
    ids, mask = left_padded_batch(seed=5, lengths=(40, 33, 27))
    for mode in ("sparse", "exact"):
        kw = opts(tmp_path / mode, "attention-aware") if mode == "sparse" else dict(
            mode="exact", block_size=4, host="4KiB", disk="4MiB", path=tmp_path / mode, direct_io=False)
        with TieredKVCache.for_model(model, **kw) as cache, torch.no_grad():
            model(input_ids=ids, attention_mask=mask, **cache_kwargs(cache, model))
            layer = cache.layers[0]
            assert layer._part_major is (mode == "sparse")
            entry = cache.store.get_blocks([layer._kkeys[1]])[0]
            b, h = ids.shape[0], model.config.num_key_value_heads
            d = model.config.hidden_size // model.config.num_attention_heads
            if mode == "sparse":
                assert tuple(entry.shape) == (b, h, 2, 4, d)
                k, v = entry[:, :, 0], entry[:, :, 1]
            else:
                assert tuple(entry.shape) == (2, b, h, 4, d)
                k, v = entry[0], entry[1]
            assert torch.equal(k, layer.keys[:, :, 4:8]) and torch.equal(v, layer.values[:, :, 4:8])
