"""TieredKVLayer / TieredKVCache against DynamicCache at the Cache-API level (no model)."""

import random

import pytest
import torch
from transformers import DynamicCache

import tiercache
from tiercache_llm import KVCapacityError, TieredKVCache, TieredKVSettings, UnsupportedModelError
from tiercache_llm.blocks import block_key, split_full_blocks


B, H, D = 3, 2, 8


def states(batch, seq, gen):
    return (torch.randn(batch, H, seq, D, generator=gen), torch.randn(batch, H, seq, D, generator=gen))


def assert_same(ref, got):
    assert len(ref.layers) == len(got.layers)
    for i in range(len(ref.layers)):
        assert ref.get_seq_length(i) == got.get_seq_length(i)
        assert ref.get_mask_sizes(1, i) == got.get_mask_sizes(1, i)
        rk, rv = ref.layers[i].keys, ref.layers[i].values
        gk, gv = got.layers[i].keys, got.layers[i].values
        if rk is None or rk.numel() == 0:
            assert gk is None or gk.shape[-2] == 0
            continue
        assert torch.equal(rk, gk) and torch.equal(rv, gv)


@pytest.mark.parametrize("seed", range(12))
def test_random_operation_sequences_match_dynamic_cache(tmp_path, seed, make_config):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    config = make_config()
    block = rng.choice([1, 3, 4, 8])
    ref = DynamicCache(config=config)
    got = TieredKVCache(config, block_size=block, host="4KiB", disk="64MiB", path=tmp_path / "kv")
    batch = B
    for step in range(25):
        op = rng.choice(["update", "update", "update", "crop", "reorder", "repeat", "select"]) if step else "update"
        if op in ("reorder", "repeat", "select") and ref.get_seq_length() == 0:
            op = "update"  # DynamicLayer ignores batch operations on an empty layer
        if op == "update":
            seq = rng.choice([1, 1, 2, 5, 13])
            for layer in range(config.num_hidden_layers):
                k, v = states(batch, seq, gen)
                rk, rv = ref.update(k, v, layer)
                gk, gv = got.update(k, v, layer)
                assert torch.equal(rk, gk) and torch.equal(rv, gv), (step, layer)
        elif op == "crop":
            n = -rng.randint(0, 9)
            ref.crop(n)
            got.crop(n)
        elif op == "reorder":
            idx = torch.tensor([rng.randrange(batch) for _ in range(batch)])
            ref.reorder_cache(idx)
            got.reorder_cache(idx)
        elif op == "repeat" and batch <= 6:
            ref.batch_repeat_interleave(2)
            got.batch_repeat_interleave(2)
            batch *= 2
        elif op == "select" and batch > 1:
            keep = sorted(rng.sample(range(batch), rng.randint(1, batch)))
            idx = torch.tensor(keep) if rng.random() < 0.5 else torch.isin(torch.arange(batch), torch.tensor(keep))
            ref.batch_select_indices(idx)
            got.batch_select_indices(idx)
            batch = len(keep)
        assert_same(ref, got)
        assert got.batch_size == batch
    stats = got.stats()
    assert stats["kv"]["held_bytes"] == sum(
        v for v in [stats["tiercache"]["tiers"][t]["payload_bytes"] for t in stats["tiercache"]["tiers"]]
    )
    got.close()


def test_batch_select_rewrites_blocks_and_frees_rows(tmp_path, make_config):
    config = make_config()
    gen = torch.Generator().manual_seed(0)
    cache = TieredKVCache(config, block_size=4, host="1MiB")
    for layer in range(2):
        cache.update(*states(4, 16, gen), layer)
    before = cache.stats()["kv"]["held_bytes"]
    cache.batch_select_indices(torch.tensor([1, 3]))
    assert cache.stats()["kv"]["held_bytes"] == before // 2
    cache.batch_repeat_interleave(3)  # lazy: shares stored rows
    assert cache.stats()["kv"]["held_bytes"] == before // 2
    assert cache.batch_size == 6
    cache.close()


def test_sliding_window_layers_match_dynamic_cache(make_config):
    config = make_config("mistral", sliding_window=8)
    gen = torch.Generator().manual_seed(1)
    ref = DynamicCache(config=config)
    got = TieredKVCache(config, block_size=3, host="1MiB")
    for step, seq in enumerate([5, 1, 1, 1, 4, 1, 1, 9, 1, 1, 1]):
        for layer in range(2):
            assert ref.get_mask_sizes(seq, layer) == got.get_mask_sizes(seq, layer)
            k, v = states(2, seq, gen)
            rk, rv = ref.update(k, v, layer)
            gk, gv = got.update(k, v, layer)
            assert torch.equal(rk, gk) and torch.equal(rv, gv), step
    assert ref.get_seq_length() == got.get_seq_length() == 26
    # blocks that left the window were deleted from the tiers
    assert got.stats()["kv"]["blocks"] <= 2 * (8 // 3 + 2)
    with pytest.raises(RuntimeError, match="sliding-window"):
        got.crop(-1)
    got.close()


def test_blocks_are_stored_under_stable_keys_and_spill_to_disk(tmp_path, make_config):
    config = make_config()
    cache = TieredKVCache(config, block_size=4, host="1KiB", disk="1MiB", path=tmp_path)
    gen = torch.Generator().manual_seed(0)
    for layer in range(2):
        cache.update(*states(1, 10, gen), layer)
    keys = set(cache.store.cache.keys())
    # exact mode stores K and V of a block as one entry
    assert keys == {block_key(cache.cache_uid, l, "kv", s) for l in range(2) for s in range(2)}
    tiers = cache.stats()["tiercache"]["tiers"]
    assert tiers["disk"]["entries"] > 0 and tiers["host"]["entries"] > 0
    assert cache.layers[0].tail_length == 2  # 10 tokens = 2 blocks of 4 + a tail of 2
    cache.close()


def test_close_cleans_up_temporary_disk_dir(make_config):
    cache = TieredKVCache(make_config(), block_size=4, host="2KiB", disk="1MiB")
    tmp = cache.store.tmpdir
    assert tmp is not None
    import os

    assert os.path.isdir(tmp)
    cache.close()
    cache.close()  # idempotent
    assert not os.path.exists(tmp)
    with pytest.raises(RuntimeError, match="closed"):
        cache.update(*states(1, 8, torch.Generator()), 0)


def test_borrowed_tiercache_keeps_other_entries(tmp_path, make_config):
    with tiercache.Cache(host="1MiB") as shared:
        shared.put("mine", torch.ones(3))
        cache = TieredKVCache(make_config(), cache=shared, block_size=2)
        for layer in range(2):
            cache.update(*states(1, 9, torch.Generator().manual_seed(0)), layer)
        assert len(shared) == 1 + 2 * 4  # one entry (K and V) per block, 4 blocks per layer
        cache.reset()
        assert len(shared) == 1 and cache.get_seq_length() == 0
        cache.update(*states(1, 4, torch.Generator()), 0)
        cache.close()
        assert list(shared.keys()) == ["mine"]


def test_capacity_error_before_any_block_is_lost(tmp_path, make_config):
    config = make_config()
    # a block entry (batch 1, 2 heads, 4 tokens, 8 dims, fp32) = 256 bytes = one host slot; 2 layers x K/V
    cache = TieredKVCache(config, block_size=4, host="4KiB")
    gen = torch.Generator().manual_seed(0)
    stored = 0
    with pytest.raises(KVCapacityError, match=r"tier budgets: host=4\.0 KiB"):
        for _ in range(40):
            for layer in range(2):
                cache.update(*states(1, 4, gen), layer)
            stored += 4
    assert stored == 4 * 4  # 16 entries of 256 B fill 4 KiB exactly; the next block is refused
    # nothing this cache stored was evicted: everything it holds is still readable and exact
    assert cache.store.cache.stats()["evictions"] == 0
    for layer in cache.layers:
        assert layer.keys.shape[-2] == layer.get_seq_length()
    cache.close()


def test_capacity_error_when_slot_overhead_forces_an_eviction(tmp_path, make_config):
    # the disk tier charges whole 4 KiB pages per entry: payload bytes fit, slots do not
    cache = TieredKVCache(make_config(), block_size=4, host="1KiB", disk="16KiB", path=tmp_path)
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(KVCapacityError, match="evicted|left free"):
        for _ in range(40):
            for layer in range(2):
                cache.update(*states(1, 4, gen), layer)
    cache.close()


def test_block_larger_than_every_tier_raises(make_config):
    cache = TieredKVCache(make_config(), block_size=64, host="1KiB")
    with pytest.raises(KVCapacityError, match="does not fit in any tier"):
        cache.update(*states(1, 64, torch.Generator()), 0)
    cache.close()


def test_lost_block_raises_instead_of_wrong_attention(tmp_path, make_config):
    with tiercache.Cache(host="8KiB") as shared:
        cache = TieredKVCache(make_config(), cache=shared, block_size=4)
        gen = torch.Generator().manual_seed(0)
        cache.update(*states(1, 8, gen), 0)
        victim = next(iter(shared.keys()))
        shared.delete(victim)  # another user of the shared tiercache removed it
        with pytest.raises(KVCapacityError, match="no longer in the tiercache"):
            cache.update(*states(1, 1, gen), 0)
        # and an eviction caused by another user's put is detected right away
        cache.reset()
        cache.update(*states(1, 8, gen), 0)
        shared.put("big", torch.zeros(2000))  # 8000 B: pushes this cache's blocks out
        with pytest.raises(KVCapacityError):
            cache.update(*states(1, 8, gen), 0)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(block_size=0), ValueError),
        (dict(block_size=-3), ValueError),
        (dict(block_size=True), TypeError),
        (dict(block_size="64"), TypeError),
        (dict(block_size=64.0), TypeError),
        (dict(mode="sparse", block_size=0), ValueError),
        (dict(mode="sparse", budget=-1), ValueError),
        (dict(mode="sparse", budget=1.5), ValueError),
        (dict(mode="sparse", strategy="nope"), ValueError),
        (dict(mode="sparse", decay=0.0), ValueError),
        (dict(mode="sparse", strategy="fetch-every-step", policy="lru"), ValueError),
        (dict(budget=16), ValueError),  # sparse options in exact mode
        (dict(mode="fast"), ValueError),
        (dict(prefetch="yes"), TypeError),
        (dict(direct_io=1), TypeError),
    ],
)
def test_settings_validation(kwargs, error, make_config):
    with pytest.raises(error):
        TieredKVSettings(**kwargs)
    with pytest.raises(error):
        TieredKVCache(make_config(), **kwargs)


def test_block_size_defaults_per_mode_and_an_explicit_value_wins(make_config):
    from tiercache_llm.kv_cache import EXACT_BLOCK_SIZE, SPARSE_BLOCK_SIZE, default_block_size

    assert (default_block_size("exact"), default_block_size("sparse")) == (EXACT_BLOCK_SIZE, SPARSE_BLOCK_SIZE)
    assert EXACT_BLOCK_SIZE > SPARSE_BLOCK_SIZE == 128
    with pytest.raises(ValueError, match="mode"):
        default_block_size("fast")
    assert TieredKVSettings().block_size == TieredKVSettings(block_size=None).block_size == EXACT_BLOCK_SIZE
    sparse = TieredKVSettings(mode="sparse")
    assert (sparse.block_size, sparse.page_size) == (SPARSE_BLOCK_SIZE, 8)  # pages stay 8 tokens
    assert TieredKVSettings(block_size=16).block_size == 16
    assert (TieredKVSettings(mode="sparse", block_size=64).block_size,
            TieredKVSettings(mode="sparse", block_size=64).page_size) == (64, 8)
    gen = torch.Generator().manual_seed(0)
    for given, want in ((None, EXACT_BLOCK_SIZE), (32, 32)):
        options = {} if given is None else {"block_size": given}
        with TieredKVCache(make_config(), host="8MiB", **options) as cache:
            assert cache.settings.block_size == want and cache.layers[0].block_size == want
            cache.update(*states(1, 2 * want + 5, gen), 0)
            assert cache.stats()["kv"]["block_size"] == want
            assert len(cache.layers[0]._blocks) == 2 and cache.layers[0]._tail_len == 5


def test_direct_io_defaults_on_and_is_a_tiercache_option(make_config):
    assert TieredKVSettings().direct_io is True
    with TieredKVCache(make_config(), direct_io=False, host="1MiB") as cache:
        assert cache.settings.direct_io is False
    with tiercache.Cache(host="1MiB") as shared:
        with pytest.raises(ValueError, match="direct_io"):
            TieredKVCache(make_config(), cache=shared, direct_io=False)


@pytest.mark.parametrize("direct_io", [True, False])
def test_direct_io_reaches_the_disk_tier(make_config, tmp_path, direct_io):
    with TieredKVCache(make_config(), host=None, disk="8MiB", path=tmp_path / "kv", direct_io=direct_io) as cache:
        disk = cache.stats()["tiercache"]["tiers"]["disk"]
        assert disk["direct_io_requested"] is direct_io
        assert disk["direct_io"] is direct_io  # tmp_path is not tmpfs on the machines we test on


def test_constructor_validation(make_config):
    with pytest.raises(TypeError, match="PretrainedConfig"):
        TieredKVCache({"num_hidden_layers": 2})
    with tiercache.Cache(host="1MiB") as shared:
        with pytest.raises(ValueError, match="leave them out"):
            TieredKVCache(make_config(), cache=shared, host="1GiB")
    with pytest.raises(TypeError, match="tiercache.Cache"):
        TieredKVCache(make_config(), cache=object())
    with pytest.raises(ValueError, match="either settings"):
        TieredKVCache(make_config(), settings=TieredKVSettings(), block_size=8)
    cache = TieredKVCache(make_config(), settings=TieredKVSettings(block_size=8, host="1MiB"))
    assert cache.settings.block_size == 8 and len(cache.layers) == 2
    with pytest.raises(ValueError, match="do not match the cache"):
        cache.update(torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 8), 0)
        cache.update(torch.zeros(2, 2, 3, 8), torch.zeros(2, 2, 3, 8), 0)
    with pytest.raises(ValueError, match="positive value"):
        cache.crop(3)
    cache.close()


def test_unsupported_layer_types_raise(make_config):
    config = make_config()
    config.layer_types = ["full_attention", "linear_attention"]
    with pytest.raises(UnsupportedModelError, match="linear_attention"):
        TieredKVCache(config)


def test_split_full_blocks():
    t = torch.arange(2 * 10 * 3.0).view(1, 2, 10, 3)
    blocks, tail = split_full_blocks(t, 4)
    assert [b.shape[-2] for b in blocks] == [4, 4] and tail.shape[-2] == 2
    assert torch.equal(torch.cat([*blocks, tail], dim=-2), t)
    assert all(b.is_contiguous() for b in blocks)
    with pytest.raises(ValueError):
        split_full_blocks(t, 0)


@pytest.mark.parametrize("seed", range(8))
def test_sliding_window_past_recording_rolls_back_like_dynamic_cache(seed, make_config):
    """Speculative decoding on sliding layers: propose k tokens, reject some with crop(-n), crop(0)."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    window = rng.choice([3, 4, 6])
    config = make_config("mistral", sliding_window=window)
    ref = DynamicCache(config=config)
    got = TieredKVCache(config, block_size=rng.choice([1, 2, 3, 4]), host="1MiB")
    prompt = rng.randint(1, 12)
    for layer in range(2):
        k, v = states(2, prompt, gen)
        ref.update(k, v, layer)
        got.update(k, v, layer)
    ref.activate_past_recording()
    got.activate_past_recording()
    assert all(layer.record_past for layer in got.layers)
    for step in range(15):
        seq = rng.randint(1, 4)
        for layer in range(2):
            assert ref.get_mask_sizes(seq, layer) == got.get_mask_sizes(seq, layer)
            k, v = states(2, seq, gen)
            rk, rv = ref.update(k, v, layer)
            gk, gv = got.update(k, v, layer)
            assert torch.equal(rk, gk) and torch.equal(rv, gv), (step, layer)
        n = -rng.randint(0, seq)  # reject up to all of the new tokens
        ref.crop(n)
        got.crop(n)
        assert ref.get_seq_length() == got.get_seq_length()
        if rng.random() < 0.3:  # beam reordering between steps: row-mapped blocks
            idx = torch.tensor([rng.randrange(2), rng.randrange(2)])
            ref.reorder_cache(idx)
            got.reorder_cache(idx)
        # after a crop only the window's blocks stay stored
        block = got.settings.block_size
        assert all(len(layer._blocks) <= window // block + 2 for layer in got.layers), step
    got.close()


def test_sliding_window_crop_needs_past_recording_once_the_window_is_full(make_config):
    config = make_config("mistral", sliding_window=4)
    got = TieredKVCache(config, block_size=2, host="1MiB")
    ref = DynamicCache(config=config)
    for cache in (ref, got):
        for layer in range(2):
            cache.update(*states(1, 6, torch.Generator().manual_seed(0)), layer)
    for cache in (ref, got):
        with pytest.raises(RuntimeError, match="activate_past_recording"):
            cache.crop(-1)
        cache.activate_past_recording()
        with pytest.raises(RuntimeError, match="negative"):
            cache.crop(1)
    # tokens that expired before recording started cannot come back (DynamicCache would silently return
    # a window shorter than its mask says)
    with pytest.raises(RuntimeError, match="before past recording"):
        got.crop(-2)
    got.close()


def test_streaming_policy_rank_ignores_reads():
    """kv-stream ranks by insertion only, so it tells tiercache a hit never needs a re-rank."""
    from types import SimpleNamespace

    from tiercache_llm.policies import StreamingKVPolicy

    policy = StreamingKVPolicy()
    assert policy.rank_reads_access is False
    a = SimpleNamespace(inserted=3, last_access=3, hits=0)
    b = SimpleNamespace(inserted=3, last_access=99, hits=50)
    assert policy.rank(a) == policy.rank(b) and not policy.promote(b, "disk", "host")


class _Copies(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the element count of every tensor each copy op (``copy_`` / ``_foreach_copy_``) writes."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name == "copy_":
            self.sizes.append(args[0].numel())
        elif name == "_foreach_copy_":
            self.sizes.extend(t.numel() for t in args[0])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("threads", [1, 2])
def test_exact_decode_copies_its_tail_below_torchs_copy_grain(make_config, threads):
    """With several torch threads, a decode step's tail copy (here 247 tokens x 3 heads x 64 = 47K elements per
    K and V, above torch's 32K-element copy grain) goes in pieces below the grain, so it never opens a
    parallel region of torch's threads (which stalls for milliseconds on busy cores); the states are
    DynamicCache's either way."""
    from tiercache_llm import kv_cache

    config = make_config(num_attention_heads=6, num_key_value_heads=3, hidden_size=384)  # head_dim 64
    gen = torch.Generator().manual_seed(0)
    ref = DynamicCache(config=config)
    got = TieredKVCache(config, block_size=256, host="16MiB", prefetch=False)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        prompt = (torch.randn(1, 3, 247, 64, generator=gen), torch.randn(1, 3, 247, 64, generator=gen))
        ref.update(*prompt, 0)
        got.update(*prompt, 0)
        new = (torch.randn(1, 3, 1, 64, generator=gen), torch.randn(1, 3, 1, 64, generator=gen))
        with _Copies() as copies:
            gk, gv = got.update(*new, 0)
        rk, rv = ref.update(*new, 0)
        assert torch.equal(rk, gk) and torch.equal(rv, gv)
        big = [n for n in copies.sizes if n >= kv_cache.INTRA_OP_GRAIN]
        if threads == 1:  # nothing to keep off other threads: one copy each for K and V
            assert len(big) == 2
        else:
            assert big == [] and sum(copies.sizes) >= 2 * 247 * 3 * 64
    finally:
        torch.set_num_threads(before)
        got.close()


def test_copy_on_caller_writes_what_copy_writes():
    from tiercache_llm.kv_cache import INTRA_OP_GRAIN, _CALLER_COPY_MAX, _copy_on_caller

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for shape in [(1, 3, 247, 64), (2, 5, 200, 64), (1, 1, 600, 64), (1, 600, 1, 64), (2, 3, 1000, 64)]:
            src = torch.randn(shape)
            buf = torch.zeros(shape[0], shape[1], shape[2] + 7, shape[3])
            dst = buf[:, :, 3 : 3 + shape[2]]
            with _Copies() as copies:
                _copy_on_caller(dst, src)
            assert torch.equal(dst, src) and not buf[:, :, :3].any() and not buf[:, :, 3 + shape[2]:].any()
            n = src.numel()
            per_token = n // shape[2]
            if INTRA_OP_GRAIN <= n <= _CALLER_COPY_MAX and per_token < INTRA_OP_GRAIN:
                assert max(copies.sizes) < INTRA_OP_GRAIN, shape
            else:  # below the grain anyway, too large to cut, or one token alone reaches it: one copy
                assert copies.sizes == [n], shape
    finally:
        torch.set_num_threads(before)
