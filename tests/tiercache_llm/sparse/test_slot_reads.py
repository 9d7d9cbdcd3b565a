"""Layer-ahead reads straight into reserved pool slots (``PipelineConfig.stage_into_slots``): a reserved slot
is never handed on while its read is in flight, a failed read is never attended, and decoding gives the same
logits and selections with it on and off."""

import concurrent.futures
import sys
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import torch

from tiercache_llm import TieredKVCache
from tiercache_llm.sparse.pipeline import DecodePipeline, PipelineConfig
from tiercache_llm.sparse.pool import PoolArena

from ..test_generate_tiny import left_padded_batch
from ..test_sparse_pipeline import continued_mask, decode_logits, opts, two_entries
from .test_overlap import failing_read
from .test_pool import change_rows, decode_recording, decode_rows

SHAPE = (2, 1, 4, 3)  # (B, H, S, D) of one slot
SLOT_BYTES = 2 * 2 * 1 * 4 * 3 * 4


def arena_assign(view, blocks, mass=None):
    keys = [("k", j) for j in blocks]
    return view.assign(blocks, keys, False, SHAPE, SHAPE, torch.float32, torch.device("cpu"), mass, reserve=16, limit=16)


def fill(view, blocks, slots, missing, tag):
    for i in missing:
        view.k[slots[i]].fill_(tag + blocks[i])


# ------------------------------------------------------------------------------------------ the arena alone
def test_a_slot_with_a_read_in_flight_is_never_handed_on_before_the_read_finished():
    arena = PoolArena("mass", factor=1.5, max_bytes=6 * SLOT_BYTES, eviction="distance")
    a, b = arena.pool(), arena.pool()
    mass = torch.zeros(16, dtype=torch.float64)
    slots, missing, _ = arena_assign(a, [0, 1, 2], mass)
    fill(a, [0, 1, 2], slots, missing, 100)
    slots, missing, _ = arena_assign(b, [5, 6, 7], mass)
    fill(b, [5, 6, 7], slots, missing, 200)
    assert arena.capacity == 6 and not arena._free  # at the bound
    # b reserves slots for blocks it will select; a fetches now: its selected block 0 is protected, and b's own
    # blocks are never evicted for a prediction
    assert arena.reserve(b, [8, 9, 11], [("k", 8), ("k", 9), ("k", 11)], protect=(a, {0, 1, 2})) == []
    got = arena.reserve(b, [8, 9], [("k", 8), ("k", 9)], protect=(a, {0}))
    assert [j for j, _ in got] == [8, 9] and b.fresh == {8, 9}
    assert set(a.slot_of) == {0} and set(b.slot_of) == {5, 6, 7, 8, 9}
    assert arena.held == 6 and arena.capacity == 6  # the bound holds, reservations count against it
    release = threading.Event()
    landed = []

    def read():
        release.wait(5)
        for _, s in got:
            arena.k[s].fill_(300)
        landed.append(True)

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(read)
        arena.mark_pending([s for _, s in got], future)
        # a needs every slot: evicting b's reserved blocks must wait for the read into them
        threading.Timer(0.2, release.set).start()
        slots, missing, _ = arena_assign(a, [0, 1, 2, 3, 4, 10], mass)
        # b's blocks went (the layer just before a in the cycle), its reserved ones only after their read landed
        assert landed and arena.pending_waits == 1 and not b.slot_of and not b.fresh
        assert arena.fresh_evicted == 2 and not arena._pending
        assert set(slots) == set(range(6))
        fill(a, [0, 1, 2, 3, 4, 10], slots, missing, 400)
        held = [s for v in (a, b) for s in v.slot_of.values()]
        assert len(held) == len(set(held)) <= 6


def _in_flight_read(arena, slots):
    """A read into ``slots`` that has not finished: its future completes when the test says so, or after 5 s
    (so an arena that waits for it fails the test instead of hanging)."""
    future = concurrent.futures.Future()
    arena.mark_pending(slots, future)

    def land():
        try:
            future.set_result(None)
        except concurrent.futures.InvalidStateError:
            pass

    timer = threading.Timer(5.0, land)
    timer.daemon = True
    timer.start()
    return future


@pytest.mark.parametrize("eviction", ["distance", "mass"])
def test_a_fetch_evicts_settled_blocks_before_a_slot_with_a_read_in_flight(eviction):
    arena = PoolArena("mass", factor=1.5, max_bytes=7 * SLOT_BYTES, eviction=eviction)
    a, b, c = arena.pool(), arena.pool(), arena.pool()
    masses = [torch.ones(16, dtype=torch.float64) for _ in range(3)]
    for view, mass in zip((a, b, c), masses):
        arena_assign(view, [0, 1], mass)
    got = arena.reserve(b, [5], [("k", 5)])  # the last free slot
    assert [j for j, _ in got] == [5] and not arena._free
    masses[1][5] = 0.0  # b's reserved block is first in the eviction order (either eviction)
    masses[1][1] = 0.5
    future = _in_flight_read(arena, [got[0][1]])
    # c fetches one block more: b's settled block 1 goes, not the slot its read is still landing in
    slots, missing, _ = arena_assign(c, [0, 1, 2], masses[2])
    assert not future.done() and arena.pending_waits == 0
    assert set(b.slot_of) == {0, 5} and b.fresh == {5} and got[0][1] in arena._pending
    held = [s for v in (a, b, c) for s in v.slot_of.values()]
    assert len(held) == len(set(held)) == 7 and arena.capacity == 7
    future.set_result(None)


def test_a_reservation_never_waits_for_a_read_in_flight():
    arena = PoolArena("mass", factor=1.5, max_bytes=5 * SLOT_BYTES, eviction="distance")
    a, b = arena.pool(), arena.pool()
    mass_a = torch.zeros(16, dtype=torch.float64)
    mass_a[0], mass_a[1] = 2.0, 1.0  # a's reserved block 4 has the lowest mass
    arena_assign(a, [0, 1], mass_a)
    arena_assign(b, [0], torch.ones(16, dtype=torch.float64))
    got = arena.reserve(a, [4, 6], [("k", 4), ("k", 6)])  # read ahead for a, the last free slots
    assert [j for j, _ in got] == [4, 6] and not arena._free
    future = _in_flight_read(arena, [s for _, s in got])
    # a fetches [0] now (its reserved blocks are not selected) and reserves for b: a's settled block 1 is taken,
    # never the slots a's read is still landing in
    taken = arena.reserve(b, [7, 8], [("k", 7), ("k", 8)], protect=(a, {0}))
    assert [j for j, _ in taken] == [7] and 1 not in a.slot_of
    assert not future.done() and arena.pending_waits == 0 and set(a.slot_of) == {0, 4, 6} and a.fresh == {4, 6}
    # only slots with a read in flight are left to evict: the reservation gets nothing rather than wait
    assert arena.reserve(b, [8], [("k", 8)], protect=(a, {0})) == []
    assert not future.done() and arena.pending_waits == 0 and arena.held == arena.capacity == 5
    future.set_result(None)
    # once the read has landed, the same reservation may evict those slots (nothing to wait for)
    assert [j for j, _ in arena.reserve(b, [8], [("k", 8)], protect=(a, {0}))] == [8]
    assert arena.pending_waits == 0 and arena.held == arena.capacity == 5


def test_settle_waits_and_drops_a_failed_read():
    arena = PoolArena("mass", factor=1.5)
    a, b = arena.pool(), arena.pool()
    arena_assign(a, [0, 1])
    arena_assign(b, [0, 1])
    got = arena.reserve(b, [4], [("k", 4)])
    assert got and b.fresh == {4}
    future = concurrent.futures.Future()
    arena.mark_pending([got[0][1]], future)
    future.set_exception(OSError("disk gone"))
    failed, waits, _ = arena.settle(b)
    assert failed == [4] and 4 not in b.slot_of and 4 not in b.fresh
    _, missing, _ = arena_assign(b, [0, 1, 4])
    assert missing == [2]  # read again: the failed slot is never attended as it is


def test_without_passing_over_reads_in_flight_an_eviction_waits_for_the_read():
    arena = PoolArena("mass", factor=1.5, max_bytes=5 * SLOT_BYTES, eviction="distance")
    arena.pass_in_flight = False  # settle_late=False
    a, b = arena.pool(), arena.pool()
    mass_a = torch.zeros(16, dtype=torch.float64)
    mass_a[0], mass_a[1] = 2.0, 1.0
    arena_assign(a, [0, 1], mass_a)
    arena_assign(b, [0], torch.ones(16, dtype=torch.float64))
    got = arena.reserve(a, [4, 6], [("k", 4), ("k", 6)])
    future = concurrent.futures.Future()
    arena.mark_pending([s for _, s in got], future)
    threading.Timer(0.1, future.set_result, (None,)).start()
    taken = arena.reserve(b, [7], [("k", 7)], protect=(a, {0}))
    # a's reserved block 4 (lowest mass) goes first, after its read landed
    assert [j for j, _ in taken] == [7] and future.done() and arena.pending_waits == 1 and 4 not in a.slot_of


def test_settling_without_waiting_leaves_reads_in_flight_and_a_kept_failure_keeps_its_slot():
    arena = PoolArena("mass", factor=1.5)
    a, b = arena.pool(), arena.pool()
    arena_assign(a, [0, 1])
    arena_assign(b, [0, 1])
    first = arena.reserve(b, [4], [("k", 4)])
    second = arena.reserve(b, [5], [("k", 5)])
    landed = concurrent.futures.Future()
    landed.set_result(None)
    arena.mark_pending([first[0][1]], landed)
    future = _in_flight_read(arena, [second[0][1]])
    failed, waits, _ = arena.settle(b, wait=False)
    assert failed == [] and waits == 0 and not future.done()
    assert arena.unsettled(b) == {5} and b.fresh == {4, 5}  # the caller accounts the settled ones
    future.set_exception(OSError("disk gone"))
    failed, waits, _ = arena.settle(b, release=False)
    assert failed == [5] and b.slot_of[5] == second[0][1] and not arena._pending and not arena.unsettled(b)


def test_clear_waits_for_reads_in_flight():
    arena = PoolArena("mass", factor=1.5)
    a, b = arena.pool(), arena.pool()
    arena_assign(a, [0, 1])
    arena_assign(b, [0, 1])
    got = arena.reserve(b, [4, 5], [("k", 4), ("k", 5)])
    done = []

    def read():
        threading.Event().wait(0.2)
        done.append(True)

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(read)
        arena.mark_pending([s for _, s in got], future)
        arena.clear()
        assert done or future.cancelled()
    assert not b.fresh and not b.slot_of and not arena._pending


# ------------------------------------------------------------------------------------------ in a cache
@pytest.fixture
def model(make_model):
    return make_model("llama", seed=5, num_hidden_layers=3)


def _run(model, tmp_path, name, strategy="attention-aware", steps=8, host="4KiB", joint=True, **pipeline):
    ids, mask = left_padded_batch(seed=5, lengths=(40, 33, 27))
    kw = opts(tmp_path / name, strategy, pool_bytes=12 * 3 * 1024, host=host, pipeline=pipeline)
    with TieredKVCache.for_model(model, **kw) as cache:
        if not joint:
            two_entries(cache)
        logits, selections = decode_recording(model, cache, ids, mask, steps)
        stats = cache.stats()
        stats["entries_per_block"] = cache.layers[0]._entries_per_block
    return logits, selections, stats


@pytest.mark.parametrize("strategy,fastest,joint", [("attention-aware", False, True), ("reuse-layer-ahead", False, True),
                                                    ("attention-aware", True, True), ("attention-aware", False, False),
                                                    ("reuse-layer-ahead", False, False)])
def test_reading_into_slots_gives_the_logits_and_selections_of_staging(model, tmp_path, strategy, fastest, joint):
    """With joint K/V entries (one read per block into a joint slot) and with two entries per block."""
    host = "48KiB" if fastest else "4KiB"  # room on the fastest tier for some blocks
    ref, ref_sel, off = _run(model, tmp_path, "off", strategy, host=host, joint=joint, stage_into_slots=False)
    got, got_sel, on = _run(model, tmp_path, "on", strategy, host=host, joint=joint, stage_into_slots=True,
                            slots_from_fastest=fastest)
    assert on["entries_per_block"] == (1 if joint else 2)
    assert torch.equal(ref, got)
    assert len(ref_sel) == len(got_sel) > 0
    assert all(a[0] == b[0] and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2]) for a, b in zip(ref_sel, got_sel))
    p_off, p_on = off["pipeline"], on["pipeline"]
    assert p_off["slot_reserved"] == 0
    assert p_on["slot_reserved"] > 0 and p_on["slot_used"] > 0
    assert p_on["slot_used"] + p_on["slot_unselected"] + p_on["slot_failed"] + p_on["slot_evicted"] <= p_on["slot_reserved"]
    assert p_on["pool_over_budget"] == 0 and p_on["reuse_peak_bytes"] <= 12 * 3 * 1024
    assert p_on["needed"] == p_off["needed"]
    assert p_on["staged"] >= on["entries_per_block"] * p_on["slot_used"]  # selected blocks read into slots: staged
    if fastest:  # blocks on the fastest tier were read into slots too: fewer synchronous copies from it
        _, _, slow_only = _run(model, tmp_path, "slow-only", strategy, host=host, stage_into_slots=True)
        assert p_on["slot_reserved"] > slow_only["pipeline"]["slot_reserved"]


@pytest.mark.parametrize("settle_late,delay", [(True, 0.0), (False, 0.0), (True, 0.02), (False, 0.02)])
def test_failed_slot_reads_surface_as_synchronous_reads_and_are_counted(model, tmp_path, monkeypatch, settle_late,
                                                                        delay):
    """``delay``: the read fails after the next layer started fetching, mostly (with ``settle_late`` its fetch
    then finds the failure only after its own reads: the block is read into its slot there)."""
    ref, _, _ = _run(model, tmp_path, "ref", stage_into_slots=False)

    def broken(self, keys, outs, ranges=None):
        threading.Event().wait(delay)
        for out in outs:
            out.fill_(float("nan"))  # a read that wrote garbage, then failed
        raise OSError("injected slot read failure")

    monkeypatch.setattr(DecodePipeline, "_read", broken)
    got, _, stats = _run(model, tmp_path, "broken", stage_into_slots=True, settle_late=settle_late)
    assert torch.equal(ref, got)
    pipe = stats["pipeline"]
    assert pipe["slot_failed"] > 0 and pipe["slot_used"] == 0


def test_a_persistent_read_error_is_raised(model, tmp_path, monkeypatch):
    ids, mask = left_padded_batch(seed=5, lengths=(40, 33, 27))
    kw = opts(tmp_path, "attention-aware", pool_bytes=12 * 3 * 1024, pipeline={"stage_into_slots": True})
    with TieredKVCache.for_model(model, **kw) as cache:
        decode_logits(model, cache, ids, mask, steps=3)
        assert cache.stats()["pipeline"]["slot_reserved"] > 0

        def broken(keys, *args, **kwargs):
            raise OSError("injected persistent failure")

        monkeypatch.setattr(cache.store, "get_blocks", broken)
        with pytest.raises(OSError, match="injected persistent failure"):
            decode_logits(model, cache, ids, continued_mask(cache, mask, mask), steps=3)


@pytest.mark.parametrize("settle_late", [True, False])
def test_a_fetch_waits_for_slow_slot_reads(model, tmp_path, monkeypatch, settle_late):
    ref, _, _ = _run(model, tmp_path, "ref", stage_into_slots=False)
    original, original_wait = DecodePipeline._read, concurrent.futures.wait
    gate = threading.Event()

    def slow(self, keys, outs, ranges=None):
        # Held until the pool waits on a slot read (a fetch settling its slots, or a release), so a fetch
        # always finds reads in flight however the threads are scheduled; the timeout only keeps a failure
        # from hanging.
        gate.wait(5.0)
        original(self, keys, outs, ranges)

    def wait(fs, *args, **kwargs):
        if sys._getframe(1).f_code in (PoolArena.settle.__code__, PoolArena._wait_pending.__code__):
            gate.set()
        return original_wait(fs, *args, **kwargs)

    monkeypatch.setattr(DecodePipeline, "_read", slow)
    monkeypatch.setattr(concurrent.futures, "wait", wait)
    got, _, stats = _run(model, tmp_path, "slow", stage_into_slots=True, settle_late=settle_late)
    assert torch.equal(ref, got)
    pipe = stats["pipeline"]
    assert pipe["slot_used"] > 0 and pipe["slot_waits"] > 0 and pipe["slot_failed"] == 0
    total = stats["sparse"]["total"]
    assert 0 <= total["blocks_resident"] <= total["blocks_selected"]
    assert pipe["reused"] + pipe["staged"] + sum(pipe["sync"].values()) == pipe["needed"]


@pytest.mark.parametrize("change", ["reorder", "crop", "select", "reset"])
def test_row_changes_wait_for_slot_reads_in_flight_and_logits_follow(model, tmp_path, monkeypatch, change):
    ids, mask = left_padded_batch(seed=5, lengths=(40, 33, 27))
    original = DecodePipeline._read
    gate = threading.Event()

    def held_back(self, keys, outs, ranges=None):
        gate.wait(0.3)
        original(self, keys, outs, ranges)

    monkeypatch.setattr(DecodePipeline, "_read", held_back)
    runs = []
    for slots in (False, True):
        kw = opts(tmp_path / str(slots), "attention-aware", pool_bytes=12 * 3 * 1024,
                  pipeline={"stage_into_slots": slots})
        with TieredKVCache.for_model(model, **kw) as cache:
            decode_logits(model, cache, ids, mask, steps=3)
            arena = cache._pipeline._arena
            if slots:
                assert arena._pending  # the last layer reserved the first layer's blocks for the next step
                futures = set(arena._pending.values())
            rows = change_rows(cache, change)
            assert not arena._pending and arena.held == 0
            if slots:
                assert all(f.done() for f in futures)  # waited for (or cancelled), never left writing
            runs.append(None if rows is None else decode_rows(model, cache, ids, mask, rows))  # None: reset
        gate.set()
        gate.clear()
    if runs[0] is not None:
        assert torch.equal(runs[0], runs[1])


def test_stage_into_slots_is_a_typed_option_on_for_the_retaining_strategies():
    assert PipelineConfig(stage_into_slots=True).stage_into_slots and not PipelineConfig().stage_into_slots
    assert PipelineConfig.for_strategy("attention-aware").stage_into_slots
    assert PipelineConfig.for_strategy("reuse-layer-ahead").stage_into_slots
    assert not PipelineConfig.for_strategy("fetch-every-step").stage_into_slots
    with pytest.raises(ValueError, match="stage_into_slots"):
        PipelineConfig(stage_into_slots=1)
    with pytest.raises(ValueError, match="slots_from_fastest"):
        PipelineConfig(slots_from_fastest="yes")
    assert not PipelineConfig.for_strategy("attention-aware").slots_from_fastest
    assert PipelineConfig().settle_late and not PipelineConfig(settle_late=False).settle_late
    assert PipelineConfig.for_strategy("attention-aware").settle_late
    assert not PipelineConfig.for_strategy("reuse-layer-ahead").settle_late
    with pytest.raises(ValueError, match="settle_late"):
        PipelineConfig(settle_late="no")


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_reservations_keep_the_bound_the_fetching_selection_and_the_reads(data):
    """Random fetches, each reserving the next layer's predicted blocks (reads that succeed or fail at random):
    the arena never exceeds the bound, no slot is shared, the fetching layer's selection is never evicted for a
    reservation, a settled block holds what its read wrote, and a failed read is never reported resident."""
    retention = data.draw(st.sampled_from(["previous", "mass"]))
    n_layers, n_blocks = data.draw(st.integers(2, 4)), data.draw(st.integers(1, 10))
    bound = data.draw(st.integers(n_blocks + 1, 40))
    arena = PoolArena(retention, factor=1.5 if retention == "mass" else 1.0, max_bytes=bound * SLOT_BYTES,
                      eviction=data.draw(st.sampled_from(["mass", "distance"])))
    views = [arena.pool() for _ in range(n_layers)]
    masses = [torch.rand(16, dtype=torch.float64) for _ in range(n_layers)]
    for _ in range(data.draw(st.integers(1, 4))):
        for tag, view in enumerate(views):
            stored = sorted(data.draw(st.sets(st.integers(0, n_blocks - 1), max_size=n_blocks)))
            failed, _, _ = arena.settle(view)
            fresh = set(view.fresh)
            view.fresh.clear()
            assert not set(failed) & set(view.slot_of)
            slots, missing, _ = arena_assign(view, stored, masses[tag])
            for i, j in enumerate(stored):
                if i not in missing and j in fresh:  # read ahead into its slot: holds what the read wrote
                    assert torch.all(view.k[slots[i]] == 500 + j)
            fill(view, stored, slots, missing, 1000 * tag)
            mine = {j: view.k[view.slot_of[j]].clone() for j in stored}
            nxt = views[(tag + 1) % n_layers]
            want = nxt.not_held(sorted(data.draw(st.sets(st.integers(0, n_blocks - 1)))), [("k", j) for j in range(16)])
            got = arena.reserve(nxt, want, [("k", j) for j in want], protect=(view, set(stored)))
            assert [j for j, _ in got] == want[: len(got)]
            future = concurrent.futures.Future()
            if data.draw(st.booleans()):
                for j, s in got:
                    arena.k[s].fill_(500 + j)
                future.set_result(None)
            else:
                future.set_exception(OSError("read failed"))
            arena.mark_pending([s for _, s in got], future)
            assert set(view.slot_of) >= set(stored)  # the fetching layer's selection survived the reservation
            assert all(torch.equal(view.k[view.slot_of[j]], mine[j]) for j in stored)
            held = [s for v in views for s in v.slot_of.values()]
            assert len(held) == len(set(held)) and arena.capacity <= bound and arena.over_budget == 0



# ------------------------------------------------------------------------------------------ read-ahead schedules
def test_a_reservation_several_layers_ahead_evicts_by_distance_from_the_fetching_layer():
    """A reservation for ``c`` made at ``a``'s fetch (two layers ahead) must not evict ``b``, which fetches next:
    the distance order starts from the fetching layer (``a``'s unselected blocks, then ``d``, the farthest), not
    from ``c`` (whose farthest layer would be ``b``)."""
    arena = PoolArena("mass", factor=1.5, max_bytes=9 * SLOT_BYTES, eviction="distance")
    a, b, c, d = (arena.pool() for _ in range(4))
    mass = torch.ones(16, dtype=torch.float64)
    for view, blocks in ((a, [0, 1, 2]), (b, [0, 1]), (c, [0, 1]), (d, [0, 1])):
        arena_assign(view, blocks, mass)
    assert arena.held == arena.capacity == 9 and not arena._free
    got = arena.reserve(c, [5, 6], [("k", 5), ("k", 6)], protect=(a, {0, 1}))
    assert [j for j, _ in got] == [5, 6]
    assert set(b.slot_of) == {0, 1}  # untouched: it fetches before c
    assert set(a.slot_of) == {0, 1} and len(d.slot_of) == 1  # a's unselected block 2, then one of d's
    assert arena.held == arena.capacity == 9


@pytest.mark.parametrize("options", [{"slot_reads_after_sync": True},
                                     {"slot_reads_after_sync": True, "ahead": 2},
                                     {"ahead": 2},
                                     {"slot_reads_after_sync": True, "stage_into_slots": False}])
def test_read_ahead_schedules_change_no_logits_nor_selections(model, tmp_path, options):
    ref, ref_sel, _ = _run(model, tmp_path, "ref", slot_reads_after_sync=False)
    got, got_sel, stats = _run(model, tmp_path, "on", **options)
    assert torch.equal(ref, got)
    assert len(ref_sel) == len(got_sel) > 0
    assert all(a[0] == b[0] and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2]) for a, b in zip(ref_sel, got_sel))
    pipe = stats["pipeline"]
    assert pipe["pool_over_budget"] == 0 and pipe["reuse_peak_bytes"] <= 12 * 3 * 1024
    assert pipe["reused"] + pipe["staged"] + sum(pipe["sync"].values()) == pipe["needed"]
    if options.get("stage_into_slots", True) and options.get("ahead", 1) == 1:  # (3 layers: 2 ahead is the last)
        assert pipe["slot_reserved"] > 0 and pipe["slot_used"] > 0


@pytest.mark.parametrize("host", ["4KiB", "48KiB"])
def test_gated_slot_reads_start_after_the_fetchs_own_slow_reads(model, tmp_path, monkeypatch, host):
    """``slot_reads_after_sync``: while a fetch reads its missing blocks from the slower tiers, the reads it
    reserved for the next layer have not started; they start before its copies from the fastest tier."""
    seen = {"slow": 0, "held_back": 0, "fast": 0}
    original = DecodePipeline._sync_read

    def watched(self, keys, blocks, dsts, joint, sync, ranges=None):
        fast = str(self.store.fastest_tier)
        if any(tier != fast for tier in sync):
            seen["slow"] += 1
            seen["held_back"] += sum(1 for placeholder, *_ in self._gated if not placeholder.running())
            assert not any(placeholder.done() for placeholder, *_ in self._gated)
        else:
            seen["fast"] += 1
            assert not self._gated  # released before the fast tier's copies
        return original(self, keys, blocks, dsts, joint, sync, ranges)

    monkeypatch.setattr(DecodePipeline, "_sync_read", watched)
    ref, _, _ = _run(model, tmp_path, "ref", host=host, slot_reads_after_sync=False)
    got, _, stats = _run(model, tmp_path, "gated", host=host)  # attention-aware's default
    assert torch.equal(ref, got)
    assert seen["slow"] > 0 and stats["pipeline"]["slot_used"] > 0
    if host == "4KiB":  # most blocks on disk: reads reserved for the next layer were held back
        assert seen["held_back"] > 0
    else:  # room on the fastest tier: copies from it ran after the release
        assert seen["fast"] > 0


@pytest.mark.parametrize("delay", [0.0, 0.02])
def test_gated_slot_reads_that_fail_or_come_late_change_nothing(model, tmp_path, monkeypatch, delay):
    ref, _, _ = _run(model, tmp_path, "ref", stage_into_slots=False)

    monkeypatch.setattr(DecodePipeline, "_read", failing_read(delay))
    got, _, stats = _run(model, tmp_path, "broken", slot_reads_after_sync=True)
    assert torch.equal(ref, got)
    assert stats["pipeline"]["slot_failed"] > 0 and stats["pipeline"]["slot_used"] == 0


@pytest.mark.parametrize("field,value", [("slot_reads_after_sync", 1), ("slot_reads_after_sync", "yes")])
def test_read_ahead_schedule_options_are_checked(field, value):
    with pytest.raises(ValueError, match=field):
        PipelineConfig(**{field: value})


def test_slot_reads_after_sync_is_on_for_attention_aware_only():
    assert PipelineConfig.for_strategy("attention-aware").slot_reads_after_sync
    assert not PipelineConfig.for_strategy("reuse-layer-ahead").slot_reads_after_sync
    assert not PipelineConfig.for_strategy("fetch-every-step").slot_reads_after_sync
    assert not PipelineConfig.for_strategy("attention-aware", slot_reads_after_sync=False).slot_reads_after_sync


def test_an_eviction_that_must_wait_for_a_held_back_read_starts_it_first():
    """A read marked pending but not started yet (``slot_reads_after_sync`` holds it back until the fetch's own
    slow reads are done) would never finish while the forward thread waits for it: the arena's waits call
    ``start_pending`` first."""
    arena = PoolArena("mass", factor=1.5, max_bytes=6 * SLOT_BYTES, eviction="distance")
    a, b = arena.pool(), arena.pool()
    mass = torch.zeros(16, dtype=torch.float64)
    arena_assign(a, [0, 1, 2], mass)
    arena_assign(b, [5, 6, 7], mass)
    got = arena.reserve(b, [8, 9], [("k", 8), ("k", 9)], protect=(a, {0}))
    assert [j for j, _ in got] == [8, 9]
    held_back = _in_flight_read(arena, [s for _, s in got])  # lands by itself only after 5 s
    started = []

    def start() -> None:
        started.append(True)
        if not held_back.done():
            held_back.set_result(None)

    arena.start_pending = start
    t0 = time.perf_counter()
    slots, missing, _ = arena_assign(a, [0, 1, 2, 3, 4, 10], mass)  # needs b's reserved slots too
    assert started and time.perf_counter() - t0 < 4.0
    assert not b.slot_of and not arena._pending and set(slots) == set(range(6))


# ------------------------------------------------------------------------------- reads beside copies
@pytest.mark.parametrize("host,options", [("32KiB", {"layer_ahead": False}),
                                          ("32KiB", {"layer_ahead": False, "slot_reads_after_sync": False}),
                                          ("16KiB", {"stage_into_slots": False})])
def test_reads_beside_copies_run_the_slow_reads_on_the_reader_thread_and_change_nothing(model, tmp_path,
                                                                                        monkeypatch, host, options):
    """``reads_beside_copies``: a fetch with missing blocks on both tiers (or staged entries to copy) reads the
    disk's on the reader thread while it copies the others itself; logits, selections and what is read stay the
    same.  (Hosts and options chosen so that several of the tiny model's fetches miss blocks on both tiers.)"""
    seen = {"slow_reader": 0, "slow_forward": 0, "fast_reader": 0}
    original = DecodePipeline._sync_read
    forward = threading.current_thread()

    def watched(self, keys, blocks, dsts, joint, sync, ranges=None):
        fast = str(self.store.fastest_tier)
        on_reader = threading.current_thread() is not forward
        if any(tier != fast for tier in sync):
            seen["slow_reader" if on_reader else "slow_forward"] += 1
        elif on_reader:
            seen["fast_reader"] += 1
        return original(self, keys, blocks, dsts, joint, sync, ranges)

    monkeypatch.setattr(DecodePipeline, "_sync_read", watched)
    # Whole-entry reads: with part reads the bytes depend on which blocks staging (whole entries) reached first,
    # a matter of background timing, so the equal-bytes check below holds only for whole reads.
    options = {**options, "part_reads": False}
    ref, ref_sel, off = _run(model, tmp_path, "ref", host=host, **options)
    assert seen["slow_reader"] == 0 and seen["slow_forward"] > 0
    got, got_sel, on = _run(model, tmp_path, "on", host=host, reads_beside_copies=True, **options)
    assert torch.equal(ref, got)
    assert len(ref_sel) == len(got_sel) > 0
    assert all(a[0] == b[0] and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2]) for a, b in zip(ref_sel, got_sel))
    assert seen["slow_reader"] > 0 and seen["fast_reader"] == 0  # the fastest tier's copies stay on this thread
    p_off, p_on = off["pipeline"], on["pipeline"]
    assert p_on["needed"] == p_off["needed"]
    assert p_on["reused"] + p_on["staged"] + sum(p_on["sync"].values()) == p_on["needed"]
    # (which tier served an entry may differ: a new block's write-behind runs on its own clock)
    assert sum(on["sparse"]["total"]["bytes_fetched"].values()) == sum(off["sparse"]["total"]["bytes_fetched"].values())


@pytest.mark.parametrize("which", ["slow", "fast"])
def test_reads_beside_copies_raise_a_failed_read_after_the_other_is_done(model, tmp_path, monkeypatch, which):
    """A failed read on either thread raises at the fetch, and only once the reader thread's read has ended (the
    fetch then drops its missing blocks from the pool: no read may still be writing into their slots).

    Lock-stepped so the two reads overlap whatever the scheduling: a fast read on the forward thread that
    follows a submitted reader job waits until that job's slow read has started, and (``fast``) the slow read
    then waits for the fast one to have failed.  Idle staging is off, so misses stay on the disk."""
    ids, mask = left_padded_batch(seed=5, lengths=(40, 33, 27))
    kw = opts(tmp_path, "attention-aware", pool_bytes=12 * 3 * 1024, host="32KiB",
              pipeline={"reads_beside_copies": True, "layer_ahead": False, "idle_stage_near": 0})
    original = DecodePipeline._sync_read
    forward = threading.current_thread()
    running, pending, lock = [], [0], threading.Lock()
    started, failed = threading.Event(), threading.Event()

    class Recording(concurrent.futures.ThreadPoolExecutor):
        """The pipeline's reader executor, counting jobs submitted and not yet done."""

        def submit(self, fn, /, *args, **kwargs):
            with lock:
                pending[0] += 1
            future = super().submit(fn, *args, **kwargs)

            def done(_):
                with lock:
                    pending[0] -= 1
            future.add_done_callback(done)
            return future

    def broken(self, keys, blocks, dsts, joint, sync, ranges=None):
        fast = str(self.store.fastest_tier)
        slow = any(tier != fast for tier in sync)
        if slow and threading.current_thread() is not forward:
            running.append(True)
            started.set()
            try:
                if which == "slow":
                    time.sleep(0.05)
                    raise OSError("injected slow read failure")
                failed.wait(0.2)
                return original(self, keys, blocks, dsts, joint, sync, ranges)
            finally:
                running.pop()
                started.clear()
        if which == "fast" and not slow and threading.current_thread() is forward and pending[0]:
            if started.wait(5):  # a fast read beside the reader thread's
                failed.set()
                raise OSError("injected fast read failure")
        return original(self, keys, blocks, dsts, joint, sync, ranges)

    with TieredKVCache.for_model(model, **kw) as cache:
        decode_logits(model, cache, ids, mask, steps=2)
        if cache._pipeline._sync_executor is not None:
            cache._pipeline._sync_executor.shutdown(wait=True)
        cache._pipeline._sync_executor = Recording(1, thread_name_prefix="tiercache-kv-sync")
        monkeypatch.setattr(DecodePipeline, "_sync_read", broken)
        with pytest.raises(OSError, match=f"injected {which} read failure"):
            decode_logits(model, cache, ids, continued_mask(cache, mask, mask), steps=6)
        assert not running


def test_idle_staging_is_on_for_attention_aware_only():
    assert PipelineConfig.for_strategy("attention-aware").idle_stage_near == 16
    assert PipelineConfig.for_strategy("reuse-layer-ahead").idle_stage_near == 0
    assert PipelineConfig.for_strategy("fetch-every-step").idle_stage_near == 0


def test_reads_beside_copies_is_a_checked_option():
    assert not PipelineConfig.for_strategy("reuse-layer-ahead").reads_beside_copies
    assert not PipelineConfig.for_strategy("fetch-every-step").reads_beside_copies
    with pytest.raises(ValueError, match="reads_beside_copies"):
        PipelineConfig(reads_beside_copies=1)


# ------------------------------------------------------------------ near misses staged while the disk idles
@pytest.mark.parametrize("host,options", [("32KiB", {"idle_stage_near": 4, "idle_stage_layers": 1}),
                                          ("48KiB", {"idle_stage_near": 4}),
                                          ("48KiB", {"idle_stage_near": 4, "reads_beside_copies": True})])
def test_idle_staging_changes_no_logits_nor_selections(model, tmp_path, host, options):
    ref, ref_sel, off = _run(model, tmp_path, "ref", host=host, idle_stage_near=0)
    got, got_sel, on = _run(model, tmp_path, "on", host=host, **options)
    assert torch.equal(ref, got)
    assert len(ref_sel) == len(got_sel) > 0
    assert all(a[0] == b[0] and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2]) for a, b in zip(ref_sel, got_sel))
    p_off, p = off["pipeline"], on["pipeline"]
    assert p["needed"] == p_off["needed"]
    assert p["reused"] + p["staged"] + sum(p["sync"].values()) == p["needed"]
    assert p["pool_over_budget"] == 0 and p["reuse_peak_bytes"] <= 12 * 3 * 1024
    # (the tiny model's fetches reserve no slow read for the next layer at these hosts: near misses staged)
    assert p["idle_staged"] > 0 and p["idle_staged_bytes"] > 0
    assert p["idle_hits"] + p["idle_wasted"] <= p["idle_staged"]
    assert p["idle_hits"] <= p["staged"]
    assert p_off["idle_staged"] == 0


def test_a_layer_whose_near_misses_sit_on_the_fastest_tier_is_skipped_for_a_while(model, tmp_path, monkeypatch):
    """``idle_barren_steps``: a layer found with every near miss on the fastest tier is not looked at again for that
    many steps (0: every time); what is staged for the other layers and the logits stay the same."""
    looked = {}

    def run(name, barren):
        looked[name] = 0
        original = DecodePipeline._stage_blocks

        def counting(self, layer, blocks, *args, **kwargs):
            if kwargs.get("todo_out") is not None:
                looked[name] += 1
            return original(self, layer, blocks, *args, **kwargs)

        monkeypatch.setattr(DecodePipeline, "_stage_blocks", counting)
        out = _run(model, tmp_path, name, host="48KiB", steps=12, idle_barren_steps=barren)
        monkeypatch.setattr(DecodePipeline, "_stage_blocks", original)
        return out

    ref, _, every = run("every", 0)
    got, _, skipping = run("skipping", 8)
    assert torch.equal(ref, got)
    assert looked["skipping"] < looked["every"]
    assert skipping["pipeline"]["idle_hits"] <= skipping["pipeline"]["idle_staged"]


@pytest.mark.parametrize("field,value", [("idle_stage_near", -1), ("idle_stage_layers", 1.5), ("idle_barren_steps", -2)])
def test_idle_staging_options_are_checked(field, value):
    with pytest.raises(ValueError, match=field):
        PipelineConfig(**{field: value})
