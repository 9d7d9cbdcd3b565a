"""Layer-ahead reads of exact decode (``prefetch``): same results as DynamicCache, failures fall back to
synchronous reads, stale reads are discarded, and no read overwrites states attention still holds."""

import threading

import pytest
import torch
from transformers import DynamicCache

from tiercache_llm import KVCapacityError, TieredKVCache, TieredKVSettings
from tiercache_llm import kv_cache as kv_cache_module
from tiercache_llm.blocks import block_key

from .test_generate_tiny import left_padded_batch


@pytest.fixture(autouse=True)
def spare_cores(monkeypatch):
    """These tests exercise the reads ahead: pretend a core is free beside torch's threads, as with one
    torch thread on a multi-core machine (memory-only caches read inline otherwise, see
    ``test_memory_only_cache_reads_inline_when_torch_threads_fill_the_cores``), and let memory-only caches
    read layers of any size ahead (their tiny layers are read inline otherwise, see
    ``test_memory_only_cache_reads_small_layers_inline_with_a_core_to_spare``)."""
    from tiercache_llm import decode_buffer

    monkeypatch.setattr(kv_cache_module, "_CORES", torch.get_num_threads() + 1)
    monkeypatch.setattr(decode_buffer, "MEMORY_AHEAD_MIN_BYTES", 0)


def states(batch, seq, gen, heads=2, dim=8):
    return (torch.randn(batch, heads, seq, dim, generator=gen), torch.randn(batch, heads, seq, dim, generator=gen))


def test_prefetch_defaults_on_for_exact_and_off_for_sparse(make_config):
    assert TieredKVSettings().prefetch is True
    assert TieredKVSettings(prefetch=False).prefetch is False
    assert TieredKVSettings(mode="sparse").prefetch is False
    with pytest.raises(ValueError, match="pipeline"):
        TieredKVSettings(mode="sparse", prefetch=True)
    with pytest.raises(TypeError):
        TieredKVSettings(prefetch=1)
    cache = TieredKVCache(make_config(), host="1MiB")
    assert cache.stats()["prefetch"]["enabled"] is True and cache.buffer.read_ahead
    cache.close()


SCENARIOS = {
    "greedy-left-padded": dict(kind="llama", seed=0, gen=dict()),
    "beam-search": dict(kind="llama", seed=1, gen=dict(num_beams=2, num_return_sequences=2)),
    "prompt-lookup": dict(kind="llama", seed=3, gen=dict(prompt_lookup_num_tokens=3), repetitive=True),
    "sliding-window": dict(kind="mistral", seed=4, gen=dict(), model=dict(sliding_window=12)),
}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_generate_with_read_ahead_matches_dynamic_cache(make_model, tmp_path, scenario):
    spec = SCENARIOS[scenario]
    model = make_model(spec["kind"], seed=spec["seed"], num_hidden_layers=3, **spec.get("model", {}))
    if spec.get("repetitive"):
        pattern = torch.randint(3, 128, (6,), generator=torch.Generator().manual_seed(3))
        ids = pattern.repeat(4).unsqueeze(0)
        mask = torch.ones_like(ids)
    else:
        ids, mask = left_padded_batch(seed=spec["seed"])
    common = dict(input_ids=ids, attention_mask=mask, max_new_tokens=14, pad_token_id=0, do_sample=False,
                  return_dict_in_generate=True, output_scores=True, **spec["gen"])
    ref = model.generate(past_key_values=DynamicCache(config=model.config), **common)
    for prefetch in (True, False) if scenario == "greedy-left-padded" else (True,):
        cache = TieredKVCache(model.config, block_size=4, host="8KiB", disk="16MiB", path=tmp_path / f"kv{prefetch}",
                              prefetch=prefetch)
        got = model.generate(past_key_values=cache, **common)
        stats = cache.stats()
        cache.close()
        assert torch.equal(ref.sequences, got.sequences), prefetch
        for a, b in zip(ref.scores, got.scores):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        ahead = stats["prefetch"]
        assert stats["tiercache"]["tiers"]["disk"]["hits"] > 0  # blocks really came from disk
        if not prefetch:
            assert ahead["started"] == 0 and ahead["blocks_ahead"] == 0
            continue
        assert ahead["failed"] == 0
        assert ahead["used"] > 0 and ahead["blocks_ahead"] > 0
        if scenario in ("greedy-left-padded", "sliding-window"):
            # nothing invalidates a read between steps: only the first forward pass reads for itself
            assert ahead["discarded"] == 0
            assert ahead["hit_rate"] > 0.9
        if scenario in ("beam-search", "prompt-lookup"):
            assert ahead["discarded"] > 0  # reorder / crop between steps made the next step's layer 0 stale


def test_read_ahead_of_every_block_the_next_update_needs(make_config):
    """In steady decode every visible block of layers 1.. and of the next step's layer 0 is read ahead,
    including the block the step's layer 0 just completed."""
    config = make_config(num_hidden_layers=3)
    gen = torch.Generator().manual_seed(0)
    ref, got = DynamicCache(config=config), TieredKVCache(config, block_size=4, host="1MiB")
    for step, seq in enumerate([10, 1, 1, 1, 1, 1, 1, 1, 1]):
        before = dict(got.stats()["prefetch"])
        for layer in range(3):
            k, v = states(2, seq, gen)
            rk, rv = ref.update(k, v, layer)
            gk, gv = got.update(k, v, layer)
            assert torch.equal(rk, gk) and torch.equal(rv, gv)
        after = got.stats()["prefetch"]
        if step >= 1:
            # steps 2 and 6 complete a block in every layer (tokens 12 and 16): layer 0's read ahead (started by
            # the previous step's last layer) already holds the blocks layer 0 wrote in that step
            assert after["blocks_sync"] == before["blocks_sync"], step
            assert after["used"] - before["used"] == 3
    got.close()


class FailingReads:
    """Wraps ``store.get_blocks``: background (read-ahead) reads raise while ``fail`` is set."""

    def __init__(self, store):
        self.store, self.original, self.fail, self.failures = store, store.get_blocks, True, 0
        store.get_blocks = self

    def __call__(self, keys, device=None, *, out=None, background=False):
        if background and self.fail:
            self.failures += 1
            if out:
                out[0].fill_(float("nan"))  # a read that failed half way: garbage in the buffer
            raise OSError("injected read failure")
        return self.original(keys, device, out=out, background=background)


def test_failed_read_ahead_is_redone_synchronously(make_model, tmp_path):
    model = make_model("llama", seed=0, num_hidden_layers=3)
    ids, mask = left_padded_batch()
    common = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, pad_token_id=0, do_sample=False)
    ref = model.generate(past_key_values=DynamicCache(config=model.config), **common)
    cache = TieredKVCache(model.config, block_size=4, host="8KiB", disk="16MiB", path=tmp_path / "kv")
    reads = FailingReads(cache.store)
    got = model.generate(past_key_values=cache, **common)
    assert torch.equal(ref, got)
    pending = list(cache.buffer._pending.values())  # the read for a next step that never came
    for read in pending:  # let it run: the reader thread may not have reached it yet when generate returns
        assert isinstance(read.future.exception(timeout=30), OSError)
    ahead = cache.stats()["prefetch"]
    still_pending = len(pending)
    assert reads.failures > 0 and ahead["failed"] + still_pending == reads.failures
    assert ahead["blocks_ahead"] == 0 and ahead["blocks_sync"] > 0
    cache.close()


def test_a_real_error_raises_from_the_synchronous_read(make_config):
    config = make_config(num_hidden_layers=2)
    gen = torch.Generator().manual_seed(0)
    cache = TieredKVCache(config, block_size=4, host="1MiB")
    for layer in range(2):
        cache.update(*states(1, 9, gen), layer)  # the last layer starts reading layer 0 ahead
    cache.buffer.discard()
    # a block lost from the tiercache (what an eviction by another user of a shared tiercache does)
    cache.store.cache.delete(block_key(cache.cache_uid, 1, "kv", 0))
    cache.update(*states(1, 1, gen), 0)  # starts layer 1's read ahead, which fails on the missing block
    with pytest.raises(KVCapacityError, match="no longer in the tiercache"):
        cache.update(*states(1, 1, gen), 1)
    assert cache.stats()["prefetch"]["failed"] == 1
    cache.close()


class SlowReads:
    """Background reads wait for ``go`` before reading, so a test can act while they are in flight."""

    def __init__(self, store):
        self.original, self.go = store.get_blocks, threading.Event()
        store.get_blocks = self

    def __call__(self, keys, device=None, *, out=None, background=False):
        if background:
            assert self.go.wait(30)
        return self.original(keys, device, out=out, background=background)


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_no_read_ahead_overwrites_states_attention_holds(make_config, layers):
    """While layer l's returned states are alive (until the next update), the read ahead of layer l + 1
    writes elsewhere: the states are unchanged after it finished.  Covers row-mapped blocks (beam
    reorder), batch changes, crops and slot growth (more new tokens than a read ahead planned for)."""
    config = make_config(num_hidden_layers=layers)
    gen = torch.Generator().manual_seed(layers)
    ref, got = DynamicCache(config=config), TieredKVCache(config, block_size=4, host="1MiB")
    slow = SlowReads(got.store)
    batch = 3
    plan = [9, 1, 1, 1, "reorder", 1, 1, 7, 1, "crop", 1, 1, "select", 1, 30, 1, 1]
    for step in plan:
        if step == "reorder":
            idx = torch.tensor([2, 0, 0])
            ref.reorder_cache(idx), got.reorder_cache(idx)
            continue
        if step == "crop":
            ref.crop(-5), got.crop(-5)
            continue
        if step == "select":
            ref.batch_select_indices(torch.tensor([0, 2])), got.batch_select_indices(torch.tensor([0, 2]))
            batch = 2
            continue
        for layer in range(layers):
            slow.go.clear()
            k, v = states(batch, step, gen)
            rk, rv = ref.update(k, v, layer)
            gk, gv = got.update(k, v, layer)
            snapshot = gk.clone(), gv.clone()
            pending = list(got.buffer._pending.values())
            for read in pending:  # the read in flight targets the other slot
                assert read.buf.keys.untyped_storage().data_ptr() != gk.untyped_storage().data_ptr()
            slow.go.set()
            for read in pending:
                read.future.result(timeout=30)
            assert torch.equal(gk, snapshot[0]) and torch.equal(gv, snapshot[1])
            assert torch.equal(rk, gk) and torch.equal(rv, gv), (step, layer)
    slow.go.set()
    ahead = got.stats()["prefetch"]
    assert ahead["used"] > 0 and ahead["failed"] == 0
    assert ahead["discarded"] >= 2  # reorder, crop and select each discarded the read of the next layer 0
    got.close()


def test_close_with_a_read_ahead_in_flight(make_config):
    config = make_config(num_hidden_layers=2)
    gen = torch.Generator().manual_seed(0)
    cache = TieredKVCache(config, block_size=4, host="1MiB")
    slow = SlowReads(cache.store)
    for layer in range(2):
        cache.update(*states(1, 9, gen), layer)
    (read,) = cache.buffer._pending.values()
    threading.Timer(0.2, slow.go.set).start()
    cache.close()  # waits for the read, then stops the reader thread and releases the tiers
    assert read.future.done() and cache.buffer._reader is None
    assert cache.store.closed


def test_memory_only_cache_reads_inline_when_torch_threads_fill_the_cores(make_config, monkeypatch, tmp_path):
    """With torch's intra-op threads on every core, reads that are copies start no read ahead (each update
    copies its blocks itself): every tier in memory, or a buffered disk tier (page-cache copies); a disk
    tier with ``direct_io`` keeps reading ahead (its reads wait on the device); ``INLINE_WHEN_BUSY = False``
    restores reads ahead for the buffered one.  Results equal DynamicCache's either way."""
    from tiercache_llm import decode_buffer

    monkeypatch.setattr(kv_cache_module, "_CORES", torch.get_num_threads())
    monkeypatch.setattr(kv_cache_module, "machine_idle", lambda: True)
    config = make_config(num_hidden_layers=3)
    gen = torch.Generator().manual_seed(1)
    ref = DynamicCache(config=config)
    memory = TieredKVCache(config, block_size=4, host="1MiB")
    disk = TieredKVCache(config, block_size=4, host="4KiB", disk="4MiB", path=tmp_path / "kv", direct_io=False)
    direct = TieredKVCache(config, block_size=4, host="4KiB", disk="4MiB", path=tmp_path / "dio", direct_io=True)
    caches = (memory, disk, direct)
    for i, seq in enumerate([10, 1, 1, 1, 1, 1, 1, 1, 1]):
        if i == 7:  # the earlier behaviour: a disk-backed cache reads every layer ahead
            monkeypatch.setattr(decode_buffer, "INLINE_WHEN_BUSY", False)
            before = disk.stats()["prefetch"]["started"]
        for layer in range(3):
            k, v = states(2, seq, gen)
            rk, rv = ref.update(k, v, layer)
            for got in caches:
                gk, gv = got.update(k, v, layer)
                assert torch.equal(rk, gk) and torch.equal(rv, gv)
    inline, buffered, device = (c.stats()["prefetch"] for c in caches)
    assert memory.store.memory_only and not disk.store.memory_only
    assert not memory.store.device_reads and not disk.store.device_reads
    assert inline["started"] == 0 and inline["inline"] == 9 * 3 and inline["blocks_sync"] > 0
    assert before == 0 and buffered["inline"] == 7 * 3 and buffered["started"] > 0
    if direct.store.device_reads:  # O_DIRECT where the filesystem takes it (not tmpfs)
        assert device["inline"] == 0 and device["started"] > 0 and device["hit_rate"] > 0.8
    else:
        assert device["inline"] == 7 * 3  # (then every layer ahead, as the buffered one)
    for cache in caches:
        cache.close()


def test_memory_only_cache_reads_small_layers_inline_with_a_core_to_spare(make_config, monkeypatch, tmp_path):
    """A core free beside torch's threads: a memory-only cache reads a layer ahead only when the layer it
    would read holds at least ``decode_buffer.MEMORY_AHEAD_MIN_BYTES`` of visible blocks; smaller ones are
    copied by their own update (counted as ``inline``), and reads ahead resume once the layers grow past it.
    A disk-backed cache with small layers reads ahead only the layers that read the disk (``"device"``).
    Results equal DynamicCache's throughout."""
    from tiercache_llm import decode_buffer

    block_bytes = 2 * 2 * 2 * 4 * 8 * 4  # K and V of one 4-token block: batch 2, 2 heads, head_dim 8, float32
    monkeypatch.setattr(decode_buffer, "MEMORY_AHEAD_MIN_BYTES", 4 * block_bytes)
    config = make_config(num_hidden_layers=3)
    gen = torch.Generator().manual_seed(7)
    ref = DynamicCache(config=config)
    memory = TieredKVCache(config, block_size=4, host="1MiB")
    disk = TieredKVCache(config, block_size=4, host="4KiB", disk="4MiB", path=tmp_path / "kv", direct_io=False)
    seen = []
    for seq in [10, 1, 1, 1, 1, 1, 1, 1, 1, 1]:  # 2 blocks at first, 4 after the 6th step
        for layer in range(3):
            k, v = states(2, seq, gen)
            rk, rv = ref.update(k, v, layer)
            for got in (memory, disk):
                gk, gv = got.update(k, v, layer)
                assert torch.equal(rk, gk) and torch.equal(rv, gv)
        seen.append((memory.layers[0]._visible_blocks()[1], dict(memory.stats()["prefetch"])))
    small = [stats for blocks, stats in seen if blocks < 4]
    assert small and all(stats["started"] == 0 for stats in small)  # below the bound: no read ahead at all
    assert small[-1]["inline"] > 0 and small[-1]["blocks_sync"] > 0
    last = seen[-1][1]
    assert seen[-1][0] == 4 and last["started"] > 0 and last["blocks_ahead"] > 0  # past it: read ahead again
    assert disk.stats()["prefetch"]["started"] > 0 and disk.stats()["prefetch"]["inline"] == 0
    assert disk._ahead_mode(0) is True and memory._ahead_mode(0) is True  # 4 blocks: at the bound
    monkeypatch.setattr(decode_buffer, "MEMORY_AHEAD_MIN_BYTES", 5 * block_bytes)
    assert disk._ahead_mode(0) == "device" and memory._ahead_mode(0) is False
    monkeypatch.setattr(decode_buffer, "MEMORY_AHEAD_MIN_BYTES", 0)  # the earlier behaviour: every layer ahead
    assert disk._ahead_mode(0) is True
    before = memory.stats()["prefetch"]["inline"]
    for layer in range(3):
        memory.update(*states(2, 1, gen), layer)
    assert memory.stats()["prefetch"]["inline"] == before
    for cache in (memory, disk):
        cache.close()


def test_disk_backed_cache_keeps_reading_ahead_beside_other_processes(make_config, monkeypatch, tmp_path):
    """Torch's threads on every core of a machine other processes load: a disk-backed cache reads ahead as
    with a core to spare (inline reads collapse there with torch's own), a memory-only one still inline."""
    monkeypatch.setattr(kv_cache_module, "_CORES", torch.get_num_threads())
    monkeypatch.setattr(kv_cache_module, "machine_idle", lambda: False)
    config = make_config(num_hidden_layers=2)
    disk = TieredKVCache(config, block_size=4, host="4KiB", disk="4MiB", path=tmp_path / "kv", direct_io=False)
    memory = TieredKVCache(config, block_size=4, host="1MiB")
    assert disk._ahead_overlaps() is True and memory._ahead_overlaps() is False
    # small layers (below MEMORY_AHEAD_MIN_BYTES) change nothing here: their copies are read inline only with a
    # core to spare, never where an inline copy's parallel region would stall beside other processes
    from tiercache_llm import decode_buffer

    monkeypatch.setattr(decode_buffer, "MEMORY_AHEAD_MIN_BYTES", 1 << 30)
    gen = torch.Generator().manual_seed(3)
    for layer in range(2):
        disk.update(*states(2, 10, gen), layer)
    assert disk._small_layers(0) and disk._ahead_mode(0) is True and memory._ahead_mode(0) is False
    disk.close()
    memory.close()


def test_device_only_reads_ahead_leave_memory_held_layers_to_their_update(make_config, monkeypatch, tmp_path):
    """Torch's threads on every core and a disk tier whose reads wait on the device: only layers with blocks
    on the disk are read ahead; a layer whose blocks are all in memory is read by its own update."""
    monkeypatch.setattr(kv_cache_module, "_CORES", torch.get_num_threads())
    monkeypatch.setattr(kv_cache_module, "machine_idle", lambda: True)
    config = make_config(num_hidden_layers=4)
    cache = TieredKVCache(config, block_size=4, host="1MiB", disk="4MiB", path=tmp_path / "kv", direct_io=False)
    monkeypatch.setattr(cache.store, "device_reads", True)  # as with direct_io, on any filesystem
    assert cache._ahead_overlaps() == "device"
    gen = torch.Generator().manual_seed(2)
    ref = DynamicCache(config=config)
    started: list[int] = []
    prefetch = kv_cache_module.TieredKVLayer.prefetch

    def spy(layer, *args, **kwargs):
        ok = prefetch(layer, *args, **kwargs)
        if ok:
            started.append(layer.layer_idx)
        return ok

    monkeypatch.setattr(kv_cache_module.TieredKVLayer, "prefetch", spy)
    for seq in [12, 1, 1, 1]:
        for layer in range(4):
            k, v = states(1, seq, gen)
            rk, rv = ref.update(k, v, layer)
            gk, gv = cache.update(k, v, layer)
            assert torch.equal(rk, gk) and torch.equal(rv, gv)
    assert all(layer.held_in_memory() for layer in cache.layers)  # 1 MiB holds everything
    assert started == [] and cache.stats()["prefetch"]["blocks_sync"] > 0
    cache.close()


@pytest.mark.parametrize("ahead_bytes", ["none", "one", "all"])
def test_reads_ahead_beyond_the_next_layer_stay_within_ahead_bytes(make_config, ahead_bytes):
    """Layers further ahead than the next one are read only while the reads pending plus theirs fit in
    ``ahead_bytes`` and at most ``max_depth`` layers ahead, each into a slot neither the states being
    returned nor another read uses; the states always equal DynamicCache's."""
    layers = 5
    config = make_config(num_hidden_layers=layers)
    gen = torch.Generator().manual_seed(3)
    ref, got = DynamicCache(config=config), TieredKVCache(config, block_size=4, host="1MiB")
    one = 3 * 2 * (2 * 2 * 4 * 8 * 4)  # a layer's 3 blocks (K and V) after the first update (4 from token 16)
    got.buffer.max_depth = 3
    got.buffer.ahead_bytes = {"none": 0, "one": 2 * one, "all": 10 * one}[ahead_bytes]
    deepest = 0
    for step, seq in enumerate([13, 1, 1, 1, 1, 1]):
        for layer in range(layers):
            k, v = states(2, seq, gen)
            rk, rv = ref.update(k, v, layer)
            gk, gv = got.update(k, v, layer)
            assert torch.equal(rk, gk) and torch.equal(rv, gv), (step, layer)
            if step == 0:
                continue
            pending = list(got.buffer._pending.values())
            slots = [p.slot for p in pending]
            assert len(set(slots)) == len(slots) and got.buffer.slot not in slots
            assert all(0 <= s <= 3 for s in slots)
            ahead = sorted((p.layer.layer_idx - layer) % layers for p in pending)
            assert ahead == list(range(1, len(ahead) + 1))  # the next layers, in order
            if len(pending) > 1:
                assert sum(p.nbytes for p in pending) <= got.buffer.ahead_bytes
            deepest = max(deepest, len(pending))
    assert deepest == {"none": 1, "one": 2, "all": 3}[ahead_bytes]
    ahead = got.stats()["prefetch"]
    assert ahead["failed"] == 0 and ahead["used"] > 0
    got.close()


class FlakyReads(FailingReads):
    """Every other background read fails after writing garbage into its first block."""

    def __call__(self, keys, device=None, *, out=None, background=False):
        self.fail = background and not self.fail
        return super().__call__(keys, device, out=out, background=background)


def test_failed_deep_reads_ahead_never_yield_wrong_states(make_model, tmp_path):
    model = make_model("llama", seed=0, num_hidden_layers=4)
    ids, mask = left_padded_batch()
    common = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, pad_token_id=0, do_sample=False)
    ref = model.generate(past_key_values=DynamicCache(config=model.config), **common)
    cache = TieredKVCache(model.config, block_size=4, host="8KiB", disk="16MiB", path=tmp_path / "kv")
    cache.buffer.max_depth, cache.buffer.ahead_bytes = 3, 1 << 30
    reads = FlakyReads(cache.store)
    reads.fail = False
    got = model.generate(past_key_values=cache, **common)
    assert torch.equal(ref, got)
    ahead = cache.stats()["prefetch"]
    assert reads.failures > 0 and ahead["failed"] > 0 and ahead["blocks_ahead"] > 0 and ahead["blocks_sync"] > 0
    cache.close()


class OverlappingReads:
    """Counts background reads in flight at once; each waits (up to 5 s) for another to start beside it."""

    def __init__(self, store):
        self.original, self.lock = store.get_blocks, threading.Lock()
        self.running = self.most = 0
        self.second = threading.Event()
        store.get_blocks = self

    def __call__(self, keys, device=None, *, out=None, background=False):
        if not background:
            return self.original(keys, device, out=out, background=background)
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
            if self.running > 1:
                self.second.set()
        try:
            self.second.wait(5)
            return self.original(keys, device, out=out, background=background)
        finally:
            with self.lock:
                self.running -= 1


@pytest.mark.parametrize("tiers", ["disk", "memory"])
def test_reads_ahead_run_concurrently_with_a_disk_tier(make_config, tmp_path, tiers):
    """With a disk tier, reads ahead of two layers run at once (``readers`` = 2 reader threads: the next
    layer's read has its chunks in flight while the previous one finishes); a memory-only cache reads
    with one.  The states equal DynamicCache's either way."""
    layers = 4
    config = make_config(num_hidden_layers=layers)
    gen = torch.Generator().manual_seed(5)
    ref = DynamicCache(config=config)
    if tiers == "disk":
        got = TieredKVCache(config, block_size=4, host="4KiB", disk="4MiB", path=tmp_path / "kv")
    else:
        got = TieredKVCache(config, block_size=4, host="1MiB")
    expected = 2 if tiers == "disk" else 1
    assert got.buffer.readers == expected
    reads = OverlappingReads(got.store)
    if tiers == "memory":
        reads.second.set()  # one reader: nothing would ever start beside a read
    for seq in [13, 1, 1, 1, 1]:
        for layer in range(layers):
            k, v = states(2, seq, gen)
            rk, rv = ref.update(k, v, layer)
            gk, gv = got.update(k, v, layer)
            assert torch.equal(rk, gk) and torch.equal(rv, gv)
    ahead = got.stats()["prefetch"]
    assert ahead["failed"] == 0 and ahead["used"] > 0
    # with a disk tier, reads of memory-held layers run on a thread of their own beside the two readers
    assert reads.most >= 2 if tiers == "disk" else reads.most == 1
    got.close()


def test_reads_ahead_pass_over_memory_held_layers_to_the_disk_ones(make_config, tmp_path, monkeypatch):
    """With a disk tier, the reads beyond the next layer skip layers whose blocks are all in memory (read
    one ahead when their turn comes) and go on to the next disk-reading layers, wrapping to the next pass,
    within the free slots; the states equal DynamicCache's."""
    layers = 6
    config = make_config(num_hidden_layers=layers)
    gen = torch.Generator().manual_seed(6)
    ref = DynamicCache(config=config)
    got = TieredKVCache(config, block_size=4, host="4KiB", disk="4MiB", path=tmp_path / "kv")
    got.buffer.max_depth, got.buffer.ahead_bytes = 3, 1 << 30
    got.buffer.group = 1  # one layer at a time (grouped reads: test_grouped_reads_ahead_...)
    for i in range(layers):  # as if the host tier held layers 3 and 4, the disk tier the others
        monkeypatch.setattr(got.layers[i], "held_in_memory", lambda held=i in (3, 4): held)
    seen = {}
    for step, seq in enumerate([13, 1, 1, 1]):
        for layer in range(layers):
            k, v = states(2, seq, gen)
            rk, rv = ref.update(k, v, layer)
            gk, gv = got.update(k, v, layer)
            assert torch.equal(rk, gk) and torch.equal(rv, gv), (step, layer)
            if step:
                seen[step, layer] = sorted(p.layer.layer_idx for p in got.buffer._pending.values())
    # before layer 2's update: layer 3 next (read whatever holds it), 4 passed over, then 5 and the next pass's 0
    assert all(seen[step, 2] == [0, 3, 5] for step in (2, 3)), seen
    assert all(len(v) <= got.buffer.max_depth for v in seen.values())
    ahead = got.stats()["prefetch"]
    assert ahead["failed"] == 0 and ahead["blocks_ahead"] > 0
    got.close()


class CountingReads:
    """Counts background ``get_blocks`` calls and the entries they read."""

    def __init__(self, store):
        self.original, self.lock = store.get_blocks, threading.Lock()
        self.calls = self.entries = 0
        store.get_blocks = self

    def __call__(self, keys, device=None, *, out=None, background=False):
        if background:
            with self.lock:
                self.calls += 1
                self.entries += len(keys)
        return self.original(keys, device, out=out, background=background)


@pytest.mark.parametrize("flaky", [False, True])
def test_grouped_reads_ahead_share_one_call_and_stay_exact(make_config, tmp_path, monkeypatch, flaky):
    """With a disk tier, layers beyond the next one are read ahead ``group`` at a time, with one
    ``get_blocks`` call for all their entries (so fewer calls than reads started), passing over the
    memory-held layers; a crop between steps discards the reads ahead and a
    failed grouped read is redone by each of its layers: the states always equal DynamicCache's."""
    layers = 8
    config = make_config(num_hidden_layers=layers)
    gen = torch.Generator().manual_seed(8)
    ref = DynamicCache(config=config)
    got = TieredKVCache(config, block_size=4, host="4KiB", disk="4MiB", path=tmp_path / "kv")
    assert got.buffer.group > 1 and got.buffer.max_depth > got.buffer.group
    got.buffer.ahead_bytes = 1 << 30
    for i in range(layers):  # as if the host tier held layers 5 to 7, the disk tier the others
        monkeypatch.setattr(got.layers[i], "held_in_memory", lambda held=i >= 5: held)
    if flaky:
        reads = FlakyReads(got.store)
        reads.fail = False
    else:
        reads = CountingReads(got.store)
    shared = 0
    for step, seq in enumerate([13, 1, 1, 1, 1, 1]):
        if step == 4:
            ref.crop(-3)
            got.crop(-3)
        for layer in range(layers):
            k, v = states(2, seq, gen)
            rk, rv = ref.update(k, v, layer)
            gk, gv = got.update(k, v, layer)
            assert torch.equal(rk, gk) and torch.equal(rv, gv), (step, layer)
            pending = list(got.buffer._pending.values())
            assert len({p.slot for p in pending}) == len(pending) and got.buffer.slot not in {p.slot for p in pending}
            futures = [p.future for p in pending]
            shared = max(shared, len(futures) - len(set(map(id, futures))))
    ahead = got.stats()["prefetch"]
    assert shared > 0 and ahead["blocks_ahead"] > 0
    if flaky:
        assert reads.failures > 0 and ahead["failed"] > 0 and ahead["blocks_sync"] > 0
    else:
        assert ahead["failed"] == 0 and ahead["discarded"] > 0
        assert reads.calls < ahead["started"], (reads.calls, ahead)
    got.close()


def test_schedule_groups_small_layers_by_bytes():
    """``schedule``: groups of ``group_bytes`` for small layers (at least ``group``, at most ``max_depth - 1``),
    twice that many layers ahead within ``[base_depth, max_depth]``; layers of which fewer than ``GROUP_MIN_FIT`` (2)
    fit in ``group_bytes`` one per job; without ``group_bytes`` the fixed schedule of before."""
    from tiercache_llm.decode_buffer import DecodeBuffer

    mib = 1 << 20
    buffer = DecodeBuffer(max_depth=8, group=2, group_bytes=8 * mib, base_depth=4)
    assert buffer.schedule() == (2, 4)  # nothing read yet
    assert buffer.schedule(mib + mib // 8) == (7, 8)  # 1K context of SmolLM2: 1.1 MiB per layer
    assert buffer.schedule(2 * mib + mib // 2) == (3, 6)
    assert buffer.schedule(4 * mib) == (2, 4)
    assert buffer.schedule(4 * mib + 1) == (1, 4)  # fewer than GROUP_MIN_FIT (2) fit in group_bytes: one per job
    assert buffer.schedule(8 * mib) == (1, 4)
    assert buffer.schedule(8 * mib + 1) == (1, 4)  # larger than group_bytes: one layer per job
    assert buffer.schedule(100 * mib) == (1, 4)
    buffer.last_read_bytes = mib
    assert buffer.schedule() == (7, 8)
    assert DecodeBuffer(max_depth=4, group=2).schedule(1) == (2, 4)
    assert DecodeBuffer(max_depth=4, group=9).schedule(mib) == (3, 4)
    unset = DecodeBuffer(max_depth=4, group=2, group_bytes=8 * mib)
    unset.max_depth = 6  # base_depth None follows max_depth
    assert unset.schedule() == (2, 6) and unset.schedule(3 * mib) == (2, 6) and unset.schedule(5 * mib) == (1, 6)
    for bad in ({"group_bytes": -1}, {"group_bytes": 1.5}, {"max_depth": 4, "base_depth": 5},
                {"base_depth": 0}):
        with pytest.raises(ValueError, match="group_bytes|base_depth"):
            DecodeBuffer(**bad)


def test_small_layers_are_read_ahead_in_fewer_calls_and_stay_exact(make_config, tmp_path):
    """With ``group_bytes`` a disk-backed cache of small layers reads more layers per background call than
    the fixed two-at-a-time schedule, every slot distinct, and its states equal DynamicCache's."""
    layers = 12
    config = make_config(num_hidden_layers=layers)
    calls = {}
    for group_bytes in (0, 1 << 30):
        gen = torch.Generator().manual_seed(12)
        ref = DynamicCache(config=config)
        got = TieredKVCache(config, block_size=4, host="4KiB", disk="8MiB", path=tmp_path / f"kv{group_bytes}")
        buffer = got.buffer
        assert buffer.group_bytes > 0 and buffer.max_depth > buffer.base_depth  # the disk defaults
        buffer.group_bytes, buffer.ahead_bytes = group_bytes, 1 << 30
        reads = CountingReads(got.store)
        for step, seq in enumerate([21, 1, 1, 1, 1, 1, 1]):
            for layer in range(layers):
                k, v = states(2, seq, gen)
                rk, rv = ref.update(k, v, layer)
                gk, gv = got.update(k, v, layer)
                assert torch.equal(rk, gk) and torch.equal(rv, gv), (group_bytes, step, layer)
                pending = list(buffer._pending.values())
                slots = {p.slot for p in pending}
                assert len(slots) == len(pending) and buffer.slot not in slots
                assert all(slot <= buffer.max_depth for slot in slots)
        ahead = got.stats()["prefetch"]
        assert ahead["failed"] == 0 and ahead["blocks_ahead"] > 0
        calls[group_bytes] = (reads.calls, ahead["started"])
        got.close()
    (fixed_calls, fixed_started), (bytes_calls, bytes_started) = calls[0], calls[1 << 30]
    assert bytes_calls < fixed_calls, calls
    assert bytes_calls / bytes_started < fixed_calls / fixed_started, calls


def test_group_must_be_a_positive_int():
    from tiercache_llm.decode_buffer import DecodeBuffer

    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="group"):
            DecodeBuffer(group=bad)
    assert DecodeBuffer(group=3).group == 3


def test_readers_must_be_a_positive_int():
    from tiercache_llm.decode_buffer import DecodeBuffer

    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="readers"):
            DecodeBuffer(readers=bad)
    assert DecodeBuffer(readers=3).readers == 3


def test_spread_placement_spreads_the_host_tier_over_the_layers(make_model, tmp_path):
    """``policy="kv-stream-spread"``: a prompt written layer by layer leaves the newest blocks of every layer in
    the host tier (not every block of the last layers), and decoding still equals DynamicCache's."""
    from transformers import DynamicCache
    from tiercache_llm import TieredKVCache

    model = make_model(num_hidden_layers=3)
    ids = torch.randint(3, 128, (1, 41), generator=torch.Generator().manual_seed(0))
    cache = TieredKVCache(model.config, block_size=4, host="6KiB", disk="16MiB", path=tmp_path / "kv",
                          policy="kv-stream-spread")
    assert cache.settings.policy == "kv-stream-spread"
    assert TieredKVCache(model.config).settings.policy == "kv-stream"  # exact mode's default
    ref = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids[:, :40], past_key_values=ref, use_cache=True)
        model(input_ids=ids[:, :40], past_key_values=cache, use_cache=True)
        tiers = cache.store.cache
        for layer in cache.layers:
            where = [tiers.tier_of(key) for key in layer._kkeys]
            assert "host" in where and "disk" in where, where
            first_host = where.index("host")
            assert set(where[first_host:]) == {"host"}, where  # the newest blocks of the layer
        for _ in range(3):
            a = model(input_ids=ids[:, 40:], past_key_values=ref, use_cache=True).logits
            b = model(input_ids=ids[:, 40:], past_key_values=cache, use_cache=True).logits
            assert torch.equal(a, b)
    cache.close()
