"""The decode buffer and BlockStore.get_blocks(out=): one copy per block, both tiercache paths."""

import copy

import pytest
import torch
from transformers import DynamicCache

import tiercache
from tiercache import buffers
from tiercache_llm import TieredKVCache
from tiercache_llm import kv_cache as kv_cache_module
from tiercache_llm import decode_buffer as decode_buffer_module
from tiercache_llm.decode_buffer import DecodeBuffer
from tiercache_llm.store import BlockStore


class ListOutCache(tiercache.Cache):
    """A tiercache with contract C5: ``get_many(keys, out=[tensor per key])`` writes into the tensors.
    Records every list it was given."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.out_lists_seen = []

    def get_many(self, keys, device=None, *, out=None):
        if not isinstance(out, (list, tuple)):
            return super().get_many(keys, device, out=out)
        keys = list(keys)
        values = super().get_many(keys, device)
        for key, value, target in zip(keys, values, out):
            if value.dtype != target.dtype or value.numel() != target.numel():
                raise ValueError(f"out tensor for {key!r} does not match the entry")
            target.copy_(value.view(target.shape))
        self.out_lists_seen.append(list(out))
        return list(out)


class PackedOnlyCache(tiercache.Cache):
    """A tiercache before C5: a list ``out`` is refused with TypeError before anything is read."""

    calls = 0

    def get_many(self, keys, device=None, *, out=None):
        self.calls += 1
        if out is not None and not isinstance(out, torch.Tensor):
            raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
        return super().get_many(keys, device, out=out)


def states(batch, seq, gen, heads=2, dim=8):
    return (torch.randn(batch, heads, seq, dim, generator=gen), torch.randn(batch, heads, seq, dim, generator=gen))


@pytest.mark.parametrize("backend", [ListOutCache, PackedOnlyCache])
def test_get_blocks_writes_into_the_given_tensors(backend):
    with backend(host="1MiB") as cache:
        store = BlockStore(cache)
        values = [torch.randn(2, 3, 4) for _ in range(3)]
        store.put_blocks([(("b", i), v) for i, v in enumerate(values)])
        buf = torch.zeros(2, 3, 12 + 5)
        out = [buf[:, :, 4 * i : 4 * i + 4] for i in range(3)]  # strided slices of one buffer
        got = store.get_blocks([("b", i) for i in range(3)], out=out)
        assert all(g is o for g, o in zip(got, out))
        for i, v in enumerate(values):
            assert torch.equal(buf[:, :, 4 * i : 4 * i + 4], v)
        assert torch.count_nonzero(buf[:, :, 12:]) == 0
        assert store.out_lists is (backend is ListOutCache)
        assert store.counters.bytes_fetched == sum(v.nbytes for v in values)
        with pytest.raises(ValueError, match="out tensors for"):
            store.get_blocks([("b", 0)], out=out)
        with pytest.raises(ValueError, match=r"\('b', 0\)"):
            store.get_blocks([("b", 0)], out=[torch.zeros(5)])
        store.close()


# block_size 4: a K block is 3 x 2 x 4 x 8 x 4 B = 768 B, a multiple of 256, so a packing tiercache's
# results form one dense array (one strided copy); block_size 3: 576 B, copied block by block.
@pytest.mark.parametrize("block_size", [3, 4])
@pytest.mark.parametrize("backend", [ListOutCache, PackedOnlyCache])
def test_decode_through_both_get_many_paths_matches_dynamic_cache(backend, block_size, make_config):
    config = make_config()
    gen = torch.Generator().manual_seed(0)
    with backend(host="4MiB") as shared:
        got = TieredKVCache(config, cache=shared, block_size=block_size)
        ref = DynamicCache(config=config)
        for step, seq in enumerate([11, 1, 1, 3, 1, 1, 1, 1, 9, 1]):
            for layer in range(2):
                k, v = states(3, seq, gen)
                rk, rv = ref.update(k, v, layer)
                gk, gv = got.update(k, v, layer)
                assert torch.equal(rk, gk) and torch.equal(rv, gv), (step, layer)
            if step == 4:
                if backend is ListOutCache:
                    # the blocks were written straight into the decode buffer (exact mode stores K and V of a
                    # block as one entry, read into one joint K/V storage per slot; the last read is the next
                    # step's layer 0, read ahead into the other slot)
                    slots = {t.untyped_storage().data_ptr() for buf in got.buffer._buffers.values()
                             for t in (buf.keys, buf.values)}
                    for seen in shared.out_lists_seen[-2:]:
                        assert len({t.untyped_storage().data_ptr() for t in seen}) == 1
                        assert all(t.shape[0] == 2 for t in seen)  # (2, batch, heads, block, head_dim) each
                        assert {t.untyped_storage().data_ptr() for t in seen} <= slots
                    assert {gk.untyped_storage().data_ptr(), gv.untyped_storage().data_ptr()} <= slots
                idx = torch.tensor([2, 0, 0])  # beam reorder: row-mapped blocks take the temporary path
                ref.reorder_cache(idx)
                got.reorder_cache(idx)
        if backend is ListOutCache:
            assert got.store.out_lists is True and shared.out_lists_seen
        else:
            assert got.store.out_lists is False and shared.calls > 0
        got.close()


@pytest.mark.parametrize("prefetch", [False, True])
def test_returned_states_are_views_of_one_buffer_shared_by_the_layers(make_config, prefetch, monkeypatch):
    monkeypatch.setattr(kv_cache_module, "_CORES", torch.get_num_threads() + 1)  # reads ahead even in memory,
    monkeypatch.setattr(decode_buffer_module, "MEMORY_AHEAD_MIN_BYTES", 0)  # however small the layers
    config = make_config(num_hidden_layers=3)
    gen = torch.Generator().manual_seed(1)
    cache = TieredKVCache(config, block_size=4, host="1MiB", prefetch=prefetch)
    outs = []
    for layer in range(3):
        k, v = states(1, 10, gen)
        gk, gv = cache.update(k, v, layer)
        outs.append(gk)
        assert gk.stride(-1) == 1 and torch.equal(gk[:, :, -10:], k)
    assert len({t.untyped_storage().data_ptr() for t in outs}) == 1  # nothing stored yet: nothing read ahead
    kv = cache.stats()["kv"]
    one_layer = 2 * 1 * 2 * 12 * 8 * 4  # K and V, capacity rounded up to whole blocks (12 tokens)
    # with layer-ahead reads, the last layer started reading the next pass's layers 0 and 1 (a read ahead
    # of two layers: 3 layers, MAX_DEPTH >= 2, 2 layers well within AHEAD_BYTES), each into a slot of its own
    ahead = min(decode_buffer_module.MAX_DEPTH, 2) if prefetch else 0
    assert kv["buffer_bytes"] == (1 + ahead) * one_layer
    assert cache.stats()["prefetch"]["started"] == ahead
    assert kv["tail_bytes"] == 3 * 2 * (1 * 2 * 4 * 8 * 4)  # a one-block tail buffer per layer for K and V
    assert kv["beside_tiers_bytes"] == kv["buffer_bytes"] + kv["tail_bytes"]
    cache.release_buffers()
    kv = cache.stats()["kv"]
    assert kv["buffer_bytes"] == 0 and kv["buffer_peak_bytes"] == (1 + ahead) * one_layer
    cache.close()


def test_buffer_grows_geometrically():
    buffer = DecodeBuffer()
    sizes = []
    for tokens in range(1, 400):
        buf = buffer.get(tokens, (1, 2, 8), (1, 2, 8), torch.float32, torch.device("cpu"), 4)
        assert buf.capacity >= tokens and buf.capacity % 4 == 0
        assert len(buf.key_blocks) == buf.capacity // 4
        if not sizes or sizes[-1] != buf.capacity:
            sizes.append(buf.capacity)
    assert len(sizes) <= 15  # O(log n) reallocations, not one per token
    assert all(b >= 1.4 * a for a, b in zip(sizes[1:], sizes[2:]))
    # a batch change retires the buffers of the old batch size
    buffer.get(10, (2, 2, 8), (2, 2, 8), torch.float32, torch.device("cpu"), 4)
    assert buffer.nbytes == 2 * 2 * 2 * 12 * 8 * 4


@pytest.mark.parametrize("dims", [(8, 8), (8, 6)])
def test_exact_mode_stores_one_joint_entry_per_block_unless_k_and_v_shapes_differ(make_config, dims, tmp_path,
                                                                                    monkeypatch):
    """Equal K and V shapes: one ``"kv"`` entry per block, read into one joint K/V storage (through the
    disk tier, beam reorders' row-mapped temporaries, crops and copies); different head_dims: two entries.
    (A core is left free beside torch's threads, so the buffered disk tier's blocks are read ahead too.)"""
    monkeypatch.setattr(kv_cache_module, "_CORES", torch.get_num_threads() + 1)
    dk, dv = dims
    joint = dk == dv
    config = make_config(num_hidden_layers=2)
    gen = torch.Generator().manual_seed(5)
    ref = DynamicCache(config=config)
    got = TieredKVCache(config, block_size=4, host="2KiB", disk="4MiB", path=tmp_path / "kv", direct_io=False)
    for step, seq in enumerate([10, 1, 1, 1, 1, 6, 1, 1]):
        for layer in range(2):
            k = torch.randn(2, 2, seq, dk, generator=gen)
            v = torch.randn(2, 2, seq, dv, generator=gen)
            rk, rv = ref.update(k, v, layer)
            gk, gv = got.update(k, v, layer)
            assert torch.equal(rk, gk) and torch.equal(rv, gv), (step, layer)
            assert (gk.untyped_storage().data_ptr() == gv.untyped_storage().data_ptr()) is joint
        if step == 2:
            ref.reorder_cache(torch.tensor([1, 1]))
            got.reorder_cache(torch.tensor([1, 1]))
        if step == 5:
            ref.crop(-5)
            got.crop(-5)
    blocks = got.stats()["kv"]["blocks"]
    kinds = {key[3] for key in got.store.cache.keys()}
    assert kinds == ({"kv"} if joint else {"k", "v"})
    assert len(got.store.cache) == (1 if joint else 2) * blocks
    assert got.stats()["tiercache"]["tiers"]["disk"]["hits"] > 0
    ahead = got.stats()["prefetch"]
    assert ahead["blocks_ahead"] > 0 and ahead["failed"] == 0
    twin = copy.deepcopy(got)
    for a, b in zip(got.layers, twin.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values) and b._joint is joint
    twin.close()
    got.close()



def test_huge_empty_is_huge_page_aligned_and_falls_back_for_small_tensors():
    """``huge_empty``: a contiguous tensor of the shape and dtype asked, starting on a huge page where it is
    large enough (and on Linux), else the page-aligned ``aligned_empty``; writable like any tensor."""
    from tiercache.buffers import HUGE_PAGE, libc_madvise
    from tiercache_llm.decode_buffer import HUGE_MIN_BYTES, huge_empty

    big = huge_empty((2, 3, HUGE_MIN_BYTES // 4 // 6 + 5), torch.float32, torch.device("cpu"))
    small = huge_empty((3, 100), torch.float16, torch.device("cpu"))
    assert big.shape == (2, 3, HUGE_MIN_BYTES // 4 // 6 + 5) and big.dtype == torch.float32 and big.is_contiguous()
    assert small.shape == (3, 100) and small.dtype == torch.float16 and small.data_ptr() % 4096 == 0
    if libc_madvise() is not None:
        assert big.data_ptr() % HUGE_PAGE == 0
    big.fill_(2.5)
    assert float(big.sum()) == 2.5 * big.numel()


@pytest.mark.parametrize("huge", [False, True])
def test_huge_page_buffers_decode_exactly(make_config, tmp_path, monkeypatch, huge):
    """``DecodeBuffer.huge_pages`` (and ``decode_buffer.HUGE_PAGES``, its default) only changes how the
    buffers are allocated: states equal DynamicCache's, blocks read straight into them from the disk."""
    monkeypatch.setattr(decode_buffer_module, "HUGE_PAGES", huge)
    monkeypatch.setattr(decode_buffer_module, "HUGE_MIN_BYTES", 4096)  # the tiny layers' buffers qualify
    config = make_config(num_hidden_layers=2)
    cache = TieredKVCache(config, block_size=16, host="64KiB", disk="16MiB", path=tmp_path / "kv")
    assert cache.buffer.huge_pages is huge
    ref = DynamicCache(config=config)
    gen = torch.Generator().manual_seed(5)
    for seq in (300, 1, 1, 1):
        for layer in range(2):
            k = torch.randn(2, 2, seq, 16, generator=gen)
            v = torch.randn(2, 2, seq, 16, generator=gen)
            rk, rv = ref.update(k, v, layer)
            gk, gv = cache.update(k, v, layer)
            assert torch.equal(rk, gk) and torch.equal(rv, gv)
    if huge and buffers.libc_madvise() is not None:
        assert all(b.joint.data_ptr() % buffers.HUGE_PAGE == 0 for b in cache.buffer._buffers.values())
    cache.close()
