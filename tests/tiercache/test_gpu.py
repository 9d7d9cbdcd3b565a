"""GPU transfer paths, each checked bit for bit against the torch reference.  Every test is marked
``gpu`` (tests/conftest.py skips them without CUDA).  Run on the GPU machine:
``python -m pytest tests/tiercache/test_gpu.py -q`` (see docs/gpu.md)."""

from __future__ import annotations

import random

import pytest
import torch

import tiercache
from tiercache.transfer import CopyEngine, chunk_file_bytes, kvikio_available, kvikio_read_payload, read_chunk_into
from tiercache_kernels import copy_blocks, cuda_backend_available, gather_blocks, gather_blocks_reference, packed_layout, scatter_blocks

pytestmark = pytest.mark.gpu

needs_kernel = pytest.mark.skipif(
    not torch.cuda.is_available() or not cuda_backend_available(), reason="the gather kernel needs cupy"
)


def _blocks(rng: random.Random, arena_sizes: list[int], n: int, sizes: list[int] | None = None):
    """Random non-overlapping blocks (random sizes, unaligned offsets, random order) in arenas."""
    blocks = []
    for a, length in enumerate(arena_sizes):
        position = rng.randint(0, 40)
        for _ in range(n // len(arena_sizes)):
            size = rng.choice(sizes) if sizes else rng.choice([0, 1, 3, 16, 4096, rng.randint(1, 300_000)])
            if position + size > length:
                break
            blocks.append((a, position, size))
            position += size + rng.choice([0, 0, 1, 7, 16, 4096])
    rng.shuffle(blocks)
    return [list(x) for x in zip(*blocks)]


def _arenas(sizes: list[int], device: str, pinned: bool = False) -> list[torch.Tensor]:
    return [torch.randint(0, 256, (s,), dtype=torch.uint8).pin_memory() if pinned
            else torch.randint(0, 256, (s,), dtype=torch.uint8, device=device) for s in sizes]


@needs_kernel
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("where", ["pinned", "cuda", "mixed"])
def test_gather_kernel_matches_reference(seed, where):
    rng = random.Random(seed)
    sizes = [3 << 20, 5 << 20]
    if where == "pinned":
        arenas = _arenas(sizes, "cpu", pinned=True)
    elif where == "cuda":
        arenas = _arenas(sizes, "cuda")
    else:
        arenas = [_arenas(sizes[:1], "cpu", pinned=True)[0], _arenas(sizes[1:], "cuda")[0]]
    ids, offsets, block_sizes = _blocks(rng, sizes, 64)
    out_offsets, total = packed_layout(block_sizes)
    out = torch.full((total + 64,), 7, dtype=torch.uint8, device="cuda")
    gather_blocks(arenas, ids, offsets, block_sizes, out, out_offsets, backend="kernel")
    torch.cuda.synchronize()
    want = torch.full((total + 64,), 7, dtype=torch.uint8)
    gather_blocks_reference([a.cpu() for a in arenas], ids, offsets, block_sizes, want, out_offsets)
    assert torch.equal(out.cpu(), want)


@needs_kernel
@pytest.mark.parametrize("block", [16 << 10, 64 << 10, 1 << 20, (1 << 20) + 3])
def test_gather_kernel_fixed_sizes_random_order(block):
    rng = random.Random(block)
    n = 64
    arena = _arenas([n * block + 4096], "cpu", pinned=True)[0]
    order = list(range(n))
    rng.shuffle(order)
    offsets = [i * block for i in order]
    out = torch.empty(n * block, dtype=torch.uint8, device="cuda")
    gather_blocks([arena], [0] * n, offsets, [block] * n, out, [i * block for i in range(n)], backend="kernel")
    want = torch.cat([arena[o : o + block] for o in offsets])
    assert torch.equal(out.cpu(), want)


@needs_kernel
@pytest.mark.parametrize("seed", range(4))
def test_scatter_kernel_to_pinned_host_matches_reference(seed):
    rng = random.Random(50 + seed)
    sizes = [4 << 20, 2 << 20]
    targets = [torch.zeros(s, dtype=torch.uint8).pin_memory() for s in sizes]
    ids, offsets, block_sizes = _blocks(rng, sizes, 48)
    src_offsets, total = packed_layout(block_sizes)
    src = torch.randint(0, 256, (total,), dtype=torch.uint8, device="cuda")
    scatter_blocks(src, src_offsets, block_sizes, targets, ids, offsets, backend="kernel")
    torch.cuda.synchronize()
    want = [torch.zeros(s, dtype=torch.uint8) for s in sizes]
    copy_blocks([src.cpu()], [0] * len(ids), src_offsets, want, ids, offsets, block_sizes, backend="reference")
    for got, expected in zip(targets, want):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("pinned", [True, False])
def test_torch_backend_and_pageable_fallback_match_reference(pinned):
    rng = random.Random(9)
    sizes = [2 << 20]
    arenas = _arenas(sizes, "cpu", pinned=pinned)
    ids, offsets, block_sizes = _blocks(rng, sizes, 40)
    out_offsets, total = packed_layout(block_sizes)
    out = torch.zeros(total, dtype=torch.uint8, device="cuda")
    used = copy_blocks(arenas, ids, offsets, [out], [0] * len(ids), out_offsets, block_sizes, backend="auto" if not pinned else "torch")
    assert used == "torch"
    torch.cuda.synchronize()
    want = torch.zeros(total, dtype=torch.uint8)
    gather_blocks_reference(arenas, ids, offsets, block_sizes, want, out_offsets)
    assert torch.equal(out.cpu(), want)


def test_gather_rejects_out_on_wrong_device_and_too_small():
    arena = torch.zeros(1000, dtype=torch.uint8).pin_memory()
    with pytest.raises(ValueError, match="exceeds"):
        gather_blocks([arena], [0], [0], [600], torch.empty(500, dtype=torch.uint8, device="cuda"))
    if torch.cuda.device_count() > 1:
        with pytest.raises(ValueError, match="GPU"):
            gather_blocks([torch.zeros(10, dtype=torch.uint8, device="cuda:1")], [0], [0], [5],
                          torch.empty(10, dtype=torch.uint8, device="cuda:0"))


def test_copy_engine_events_and_overlap_with_compute():
    engine = CopyEngine("cuda")
    assert engine.stream is not None and engine.stream != torch.cuda.current_stream()
    n, block = 256, 64 << 10
    arena = torch.randint(0, 256, (n * block,), dtype=torch.uint8).pin_memory()
    order = list(range(n))
    random.Random(0).shuffle(order)
    offsets = [i * block for i in order]
    out = torch.empty(n * block, dtype=torch.uint8, device="cuda")
    a = torch.randn(4096, 4096, device="cuda")
    product = a @ a  # compute queued on the default stream
    handle = engine.gather([arena], [0] * n, offsets, [block] * n, out, wait_current=False)
    handle.wait_stream()  # the default stream now waits for the copy: no device-wide sync
    check = out.view(n, block)[:, :16].clone()
    torch.cuda.synchronize()
    assert handle.done()
    assert torch.allclose(product, a @ a)
    want = torch.stack([arena[o : o + 16] for o in offsets])
    assert torch.equal(check.cpu(), want)
    assert torch.equal(handle.future().result(timeout=30).cpu(), torch.cat([arena[o : o + block] for o in offsets]))


@pytest.mark.parametrize("seed", range(3))
def test_cache_get_many_to_gpu_from_every_tier(tmp_path, seed):
    rng = random.Random(seed)
    values = {("k", i): torch.randn(rng.randint(1, 5000)).to(rng.choice([torch.float32, torch.bfloat16, torch.float16]))
              for i in range(80)}
    with tiercache.Cache(gpu="64KiB", host="128KiB", disk="64MiB", path=tmp_path / "tc", policy="lfu") as cache:
        for key, value in values.items():
            cache.put(key, value.cuda() if rng.random() < 0.5 else value)
        assert {cache.tier_of(k) for k in values} == {"gpu", "host", "disk"}
        keys = list(values)
        rng.shuffle(keys)
        sizes = [values[k].numel() * values[k].element_size() for k in keys]
        offsets, total = packed_layout(sizes)
        out = torch.empty(total, dtype=torch.uint8, device="cuda")
        results = cache.get_many(keys, out=out)
        for key, result, offset in zip(keys, results, offsets):
            assert result.device.type == "cuda" and result.dtype == values[key].dtype
            assert torch.equal(result.cpu(), values[key])
            assert result.data_ptr() == out.data_ptr() + offset
        fresh = cache.get_many(keys, device="cuda")
        assert all(torch.equal(r.cpu(), values[k]) for r, k in zip(fresh, keys))
        with pytest.raises(ValueError, match="requested"):
            cache.get_many(keys[:1], device="cpu", out=out)
        with pytest.raises(ValueError, match="bytes"):
            cache.get_many(keys, out=out[: total // 2])
        assert not cache._pins


def test_disk_staging_to_gpu_is_verified(tmp_path):
    with tiercache.Cache(host=None, disk="16MiB", path=tmp_path / "tc") as cache:
        value = torch.randn(70_000)
        cache.put("x", value)
        entry = cache._index["x"]
        tier = cache.tiers[entry.level]
        staging = torch.empty(chunk_file_bytes(entry.slot), dtype=torch.uint8).pin_memory()
        payload = read_chunk_into(tier, entry.slot, entry.header, staging)
        out = torch.empty(payload.numel(), dtype=torch.uint8, device="cuda")
        engine = CopyEngine("cuda")
        engine.gather([payload], [0], [0], [payload.numel()], out).wait()
        assert torch.equal(out.view(torch.float32).cpu(), value)


@pytest.mark.skipif(not kvikio_available(), reason="kvikio is not installed")
def test_kvikio_payload_read_matches(tmp_path):
    with tiercache.Cache(host=None, disk="16MiB", path=tmp_path / "tc") as cache:
        value = torch.randn(300_000)
        cache.put("x", value)
        entry = cache._index["x"]
        out = torch.empty(entry.slot.nbytes, dtype=torch.uint8, device="cuda")
        future = kvikio_read_payload(cache.tiers[entry.level], entry.slot, out)
        assert future.get() == entry.slot.nbytes
        assert torch.equal(out.view(torch.float32).cpu(), value)
