import pytest
import torch

from tiercache.testing import TierConformance
from tiercache.tiers import ArenaTier, host_tier
from tiercache.tiers.base import EntryHeader


class TestArenaTierConformance(TierConformance):
    capacity = 256 * 1024

    def make_tier(self, path, capacity):
        return ArenaTier("host", capacity, "cpu")


class TestArenaTierOddCapacityConformance(TierConformance):
    """A capacity that is not a power of two, split into several chunks."""

    capacity = 100_000
    sizes = (0, 1, 300, 4096, 20_000, 40_000)

    def make_tier(self, path, capacity):
        return ArenaTier("host", capacity, "cpu", chunk_bytes=40_000)


def _header(n):
    return EntryHeader(b"k", "uint8", (n,), n, 1)


def test_capacity_is_rounded_down_to_whole_blocks_and_split_into_chunks():
    tier = ArenaTier("host", 10_000, chunk_bytes=4096, min_block=256)
    assert tier.capacity == 4096 + 4096 + 1792
    assert len(tier._arenas) == 3
    assert tier.max_nbytes == 4096


def test_max_nbytes_is_the_whole_chunk():
    tier = ArenaTier("host", 3000, min_block=256)
    assert tier.capacity == 2816
    assert tier.max_nbytes == 2816
    assert tier.allocate(2817) is None
    assert tier.allocate(2816) is not None


def test_read_aliases_the_arena_and_slots_do_not_overlap():
    tier = ArenaTier("host", 4096)
    a, b = tier.allocate(300), tier.allocate(300)
    tier.write(a, torch.full((300,), 1, dtype=torch.uint8), _header(300))
    tier.write(b, torch.full((300,), 2, dtype=torch.uint8), _header(300))
    assert torch.all(tier.read(a, _header(300)) == 1)
    assert torch.all(tier.read(b, _header(300)) == 2)
    assert tier.read(a, _header(300)).data_ptr() == tier.view(a).data_ptr()


def test_disabled_tier():
    tier = ArenaTier("host", 100, min_block=256)
    assert tier.capacity == 0 and tier.max_nbytes == -1  # not even an empty value fits
    assert tier.allocate(1) is None


def test_host_tier_pins_only_with_cuda():
    tier = host_tier(4096)
    assert tier.name == "host" and tier.device.type == "cpu"
    assert tier.pinned == torch.cuda.is_available()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_gpu_tier_without_cuda_is_a_clear_error():
    from tiercache.tiers import gpu_tier

    with pytest.raises(RuntimeError, match="CUDA"):
        gpu_tier(4096)


@pytest.mark.gpu
def test_gpu_arena_round_trip():
    from tiercache.tiers import gpu_tier

    tier = gpu_tier(1 << 20)
    slot = tier.allocate(1000)
    data = torch.randint(0, 256, (1000,), dtype=torch.uint8)
    tier.write(slot, data, _header(1000))
    got = tier.read(slot, _header(1000))
    assert got.device.type == "cuda" and torch.equal(got.cpu(), data)


def test_a_host_budget_above_physical_memory_is_refused(monkeypatch):
    import tiercache
    from tiercache.tiers import memory

    monkeypatch.setattr(memory, "physical_memory", lambda: 64 << 20)
    with pytest.raises(ValueError, match="exceeds this machine's physical memory"):
        tiercache.Cache(host="65MiB")
    with tiercache.Cache(host="64MiB") as cache:  # up to the physical size is accepted
        assert cache.tiers[0].capacity == 64 << 20


# -- arena recycling and addressing ------------------------------------------------------------------
from tiercache.tiers import memory as memory_module  # noqa: E402


@pytest.fixture
def pool(monkeypatch):
    fresh = memory_module.ArenaPool(1 << 24)
    monkeypatch.setattr(memory_module, "ARENA_POOL", fresh)
    return fresh


def test_a_closed_tiers_arena_is_reused_by_the_next_tier_of_that_chunk_size(pool):
    first = ArenaTier("host", 1 << 20, "cpu")
    address = first.address(first.allocate(100))
    first.close()
    other_size = ArenaTier("host", 1 << 19, "cpu")  # a different chunk size does not take it
    assert other_size.address(other_size.allocate(100)) != address
    second = ArenaTier("host", 1 << 20, "cpu")
    assert second.address(second.allocate(100)) == address  # the same (already touched) memory
    assert pool.take(1 << 20, False) is None  # handed out once


def test_an_arena_whose_view_escaped_is_not_recycled_and_the_limit_holds(pool):
    tier = ArenaTier("host", 1 << 20, "cpu")
    slot = tier.allocate(64)
    kept = tier.read(slot, _header(64))  # aliases the arena
    tier.close()
    assert pool.take(1 << 20, False) is None and kept.numel() == 64
    pool.limit_bytes = 1 << 19
    small = ArenaTier("host", 1 << 20, "cpu")
    small.close()
    assert pool.take(1 << 20, False) is None  # over the limit: dropped


def test_slots_are_addressed_by_pointer_and_writes_match_the_typed_view(pool):
    tier = ArenaTier("host", 1 << 16, "cpu", chunk_bytes=1 << 15)
    slots = [tier.allocate(1 << 14) for _ in range(4)]  # spans both chunks
    assert {tier._chunk(s.ref)[0] for s in slots} == {0, 1}
    assert all(isinstance(s.ref, int) for s in slots)
    assert all(tier.address(s) == s.ref for s in slots)  # a CPU slot's ref is its address
    for i, slot in enumerate(slots):
        value = torch.full((1 << 12,), float(i))
        tier.write(slot, value, _header(1 << 14))
        assert torch.equal(tier.typed_view(slot, torch.float32), value)
        assert tier.address(slot) == tier.typed_view(slot, torch.float32).data_ptr()
    for slot in slots:  # each slot goes back to its own chunk's allocator (whichever chunk's address is lower)
        tier.free(slot)
    assert tier.used == 0 and tier.largest_free() == 1 << 15
    assert tier.allocate(1 << 16) is None and tier.allocate(1 << 15) is not None
