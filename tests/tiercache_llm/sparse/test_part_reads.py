"""Part reads (``PipelineConfig.part_reads``): a sparse fetch reads of each block only the (row, KV head) parts its
layer selected, as byte ranges of the part-major joint entry (``BlockStore.get_blocks(ranges=)``); the pool records
per slot which parts it holds and reads a resident block's missing parts (a part miss).  The unread parts of a slot
hold stale bytes: attention must never let them reach its output.

Where the tiercache in use reads no ranges (``BlockStore.ranged_reads`` is ``False``) the fetch reads whole
entries; these tests then emulate ranged reads on top of it (:func:`ranged`), so they check this side either way."""

import pytest
import torch

from tiercache_llm import TieredKVCache
from tiercache_llm.hf_kwargs import cache_kwargs
from tiercache_llm.sparse.pool import PoolArena
from tiercache_llm.store import copy_ranges

from ..test_generate_tiny import left_padded_batch
from ..test_sparse_pipeline import continued_mask, decode_logits, opts
from .test_pool import change_rows, decode_rows


@pytest.fixture
def model(make_model):
    return make_model("llama", seed=5, num_hidden_layers=3)


def ranged(cache):
    """Make ``cache``'s store read ranges: the tiercache's own ranged reads when it has them, else an emulation
    (whole values read into temporaries, then only the ranges copied out: the same bytes land in ``out``)."""
    store = cache.store
    if store.ranged_reads:
        return
    whole = store.cache.get_many

    def get_many(keys, device=None, *, out=None, ranges=None):
        if ranges is None:
            return whole(keys, device, out=out)
        tmp = [torch.empty_like(o) for o in out]
        whole(keys, out=tmp)
        for o, t, r in zip(out, tmp, ranges):
            if r is None:
                o.copy_(t)
            else:
                copy_ranges(o, t, r)
        return list(out)

    store.cache.get_many = get_many
    store.ranged_reads = True


@pytest.fixture
def nan_slots(monkeypatch):
    """Every pool slot handed to a block (by a fetch, or reserved for a read ahead of it) starts as NaN (what a stale
    slot may hold), so a part no read filled stays NaN."""
    assign, reserve = PoolArena.assign, PoolArena.reserve

    def poisoned(self, *args, **kwargs):
        slots, missing, tail = assign(self, *args, **kwargs)
        if self.kv is not None and missing:
            self.kv[[slots[i] for i in missing]] = float("nan")
        return slots, missing, tail

    def poisoned_reserve(self, *args, **kwargs):
        got = reserve(self, *args, **kwargs)
        if got:  # before the caller starts the read into them
            self.kv[[slot for _, slot in got]] = float("nan")
        return got

    monkeypatch.setattr(PoolArena, "assign", poisoned)
    monkeypatch.setattr(PoolArena, "reserve", poisoned_reserve)


NO_STAGING = {"layer_ahead": False, "disk_staging": False, "stage_into_slots": False, "seed_pool": False}
# Every pool fill a ranged read: longer rows and a larger budget make (row, head)s select blocks resident for others
VARIED = {"pipeline": NO_STAGING, "lengths": (64, 50, 40), "budget": 0.25}
# The strategy's own pipeline with reads into reserved slots of the predicted parts only (then part misses)
AHEAD = {"lengths": (64, 50, 40), "budget": 0.25, "pipeline": {"slot_part_reads": True}}


def _run(model, tmp_path, strategy, part_reads, change=None, lengths=(40, 33, 27), **kw):
    ids, mask = left_padded_batch(seed=5, lengths=lengths)
    pipeline = {**kw.pop("pipeline", {}), "part_reads": part_reads}
    with TieredKVCache.for_model(model, **opts(tmp_path / str(part_reads), strategy, pipeline=pipeline, **kw)) as cache:
        ranged(cache)
        logits = decode_logits(model, cache, ids, mask, steps=8)
        if change is not None:
            rows = change_rows(cache, change)
            logits = torch.cat([logits.flatten(), decode_rows(model, cache, ids, mask, rows).flatten()])
        return logits, cache.stats()


@pytest.mark.parametrize("strategy,kw", [
    ("fetch-every-step", {}),
    ("reuse-layer-ahead", {}),
    ("attention-aware", {}),
    ("attention-aware", {"pool_bytes": 12 * 3 * 1024}),
    ("reuse-layer-ahead", {"pool_bytes": 12 * 3 * 1024}),
    ("attention-aware", VARIED),
    ("reuse-layer-ahead", {**VARIED, "pool_bytes": 12 * 3 * 1024}),
    ("attention-aware", {**AHEAD, "pool_bytes": 12 * 3 * 1024}),
    ("reuse-layer-ahead", {**AHEAD, "pool_bytes": 12 * 3 * 1024}),
])
def test_part_reads_give_whole_reads_logits_with_nan_in_every_unread_part(model, tmp_path, nan_slots, strategy, kw):
    whole, whole_stats = _run(model, tmp_path / "whole", strategy, False, **dict(kw))
    parts, stats = _run(model, tmp_path / "parts", strategy, True, **dict(kw))
    assert torch.isfinite(parts).all() and torch.equal(parts, whole)
    p, w = stats["pipeline"], whole_stats["pipeline"]
    assert w["ranged_entries"] == w["parts_read"] == w["part_misses"] == 0
    assert p["parts_selected"] > 0
    if strategy == "fetch-every-step" or kw.get("pipeline") is NO_STAGING:  # every fill a sync read
        assert p["ranged_entries"] > 0 and 0 < p["parts_read"] < p["parts_selected"]
        read = lambda s: sum(s["sparse"]["total"]["bytes_fetched"].values())  # noqa: E731
        assert 0 < read(stats) < read(whole_stats)
    if kw.get("pipeline") is NO_STAGING:  # resident blocks whose rows or heads newly select them: part misses
        assert p["part_misses"] > 0
    if kw.get("pipeline", {}).get("slot_part_reads"):  # reads ahead into reserved slots of the predicted parts only
        assert p["slot_ranged_reads"] > 0 and p["part_misses"] > 0


@pytest.mark.parametrize("change", ["reorder", "crop", "select"])
def test_part_reads_follow_row_changes(model, tmp_path, nan_slots, change):
    """After a beam reorder (row maps: such blocks read whole), a crop or a batch selection, the pool's part records
    start over with it: the same logits as whole reads, finite."""
    whole, _ = _run(model, tmp_path / "whole", "attention-aware", False, change=change, **VARIED)
    parts, stats = _run(model, tmp_path / "parts", "attention-aware", True, change=change, **VARIED)
    assert torch.isfinite(parts).all() and torch.equal(parts, whole)
    assert stats["pipeline"]["ranged_entries"] > 0


def test_the_arena_clears_a_slots_parts_when_it_is_assigned_and_reserve_marks_them_all():
    arena = PoolArena("mass", 1.5)
    view = arena.pool()
    shape = (2, 3, 4, 5)
    slots, missing, _ = view.assign([0, 1], ["a", "b"], False, shape, shape, torch.float32, "cpu", reserve=8,
                                    limit=8, joint=True)
    assert tuple(arena.parts_of(slots).shape) == (2, 2, 3) and not arena.parts_of(slots).any()
    mask = torch.zeros(1, 2, 3, dtype=torch.bool)
    mask[0, 1, 2] = True
    arena.mark_parts([slots[0]], mask)
    arena.mark_parts([slots[1]])
    assert torch.equal(arena.parts_of(slots)[0], mask[0]) and arena.parts_of(slots)[1].all()
    mask2 = torch.zeros(1, 2, 3, dtype=torch.bool)
    mask2[0, 0, 0] = True
    arena.mark_parts([slots[0]], mask2)  # in addition to what it held
    assert torch.equal(arena.parts_of(slots)[0], mask[0] | mask2[0])
    # block 1 under a new key (rewritten): its slot holds none of the new block's parts
    slots2, missing2, _ = view.assign([0, 1], ["a", "b2"], False, shape, shape, torch.float32, "cpu", reserve=8,
                                      limit=8, joint=True)
    assert missing2 == [1] and not arena.parts_of([slots2[1]]).any()
    assert torch.equal(arena.parts_of([slots2[0]])[0], mask[0] | mask2[0])
    got = arena.reserve(view, [5], ["e"])  # a reserved slot is read whole
    assert got and arena.parts_of([got[0][1]]).all()
    arena.clear()
    assert arena.parts is None and arena.parts_of([0]) is None


def test_get_blocks_ranges(tmp_path):
    """``BlockStore.get_blocks(ranges=)``: only the ranges land in ``out`` (a write-behind queued entry too, and with a
    tiercache without ranged reads: whole values, the ranges holding the same bytes); bad use is refused."""
    from tiercache_llm.store import BlockStore

    store = BlockStore.open(gpu=None, host="1MiB", disk=None, path=None)
    try:
        a = torch.arange(24, dtype=torch.float32).view(2, 3, 4)
        store.put_blocks([("a", a)])
        out = torch.full((2, 3, 4), -1.0)
        store.get_blocks(["a"], out=[out], ranges=[[(0, 16), (48, 64)]])
        flat = out.view(-1)
        assert torch.equal(flat[:4], a.view(-1)[:4]) and torch.equal(flat[12:16], a.view(-1)[12:16])
        if store.ranged_reads:
            assert (flat[4:12] == -1).all() and (flat[16:] == -1).all()
        else:  # whole values: the rest is the value's own bytes
            assert torch.equal(out, a)
        with pytest.raises(ValueError, match="needs out"):
            store.get_blocks(["a"], ranges=[[(0, 16)]])
        with pytest.raises(ValueError, match="contiguous"):
            store.get_blocks(["a"], out=[torch.empty(4, 3, 2).transpose(0, 2)], ranges=[[(0, 16)]])
        with pytest.raises(ValueError, match="ranges items"):
            store.get_blocks(["a"], out=[out], ranges=[None, None])
        # an entry still in the write-behind queue: just the ranges copied from it
        store.enable_write_behind(1 << 20)
        b = torch.arange(24, dtype=torch.float32).view(2, 3, 4) + 100
        with store._wcond:  # hold the writer so the entry stays queued
            store._enqueue([("b", b)], b.nbytes)
            out = torch.full((2, 3, 4), -1.0)
            store.get_blocks(["b"], out=[out], ranges=[[(8, 24)]], background=True)
        flat = out.view(-1)
        assert torch.equal(flat[2:6], b.view(-1)[2:6]) and (flat[:2] == -1).all() and (flat[6:] == -1).all()
    finally:
        store.close()


def test_a_cache_without_ranged_reads_reads_whole_entries(model, tmp_path):
    """``part_reads`` needs ranged reads: through a tiercache without them the fetch reads whole entries (no part
    bookkeeping changes what is attended)."""
    ids, mask = left_padded_batch(seed=5, lengths=(40, 33, 27))
    with TieredKVCache.for_model(model, **opts(tmp_path, "fetch-every-step")) as cache:
        cache.store.ranged_reads = False
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, **cache_kwargs(cache, model))
        decode_logits(model, cache, ids, continued_mask(cache, mask, mask), steps=2)
        p = cache.stats()["pipeline"]
        assert p["ranged_entries"] == 0 and p["whole_entries"] > 0
