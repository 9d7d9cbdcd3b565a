"""The disk tier's read paths of issue 8: in-place reads into row-contiguous destinations (``byte_parts``,
``reads_strided``), pipelined large reads, the per-slot expected-header cache, and that each still reports
damage as ``CorruptEntryError`` (never a wrong tensor)."""

import ctypes
import os

import pytest
import torch

from tiercache.errors import CorruptEntryError
from tiercache.keys import encode_key
from tiercache.testing import make_value
from tiercache.tiers import DiskTier
from tiercache.tiers import disk as disk_module
from tiercache.tiers.base import EntryHeader
from tiercache.tiers.disk import PAGE, byte_parts


def header(key, tensor, seq=1):
    return EntryHeader(encode_key(key), str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape),
                       tensor.numel() * tensor.element_size(), seq)


def store(tier, key, tensor, seq=1):
    head = header(key, tensor, seq)
    slot = tier.allocate(head.nbytes)
    tier.write(slot, tensor.reshape(-1), head)
    return slot, head


def flip(path, offset):
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x40
    path.write_bytes(bytes(raw))


# -- byte_parts ---------------------------------------------------------------------------------------------
def damage_each_way(tier, items, at, read):
    """Damage ``items[at]``'s chunk in every way a read must catch (payload and header bits, a short and a
    long file, a header of another entry, a missing file), checking the message ``read()`` returns for each;
    ``items`` is the caller's list, which ``read`` reads (the header case swaps ``items[at]`` and restores it)."""
    slot, head = items[at]
    path = tier.chunk_path(slot)
    good = path.read_bytes()
    flip(path, PAGE + 4000)  # the payload
    assert "crc32c" in read()
    path.write_bytes(good)
    flip(path, 10)  # the header
    assert "crc32c" in read()
    path.write_bytes(good[:-1])  # the checksum's last byte gone
    assert "wrong size" in read()
    path.write_bytes(good + b"\0")  # one byte too many
    assert "wrong size" in read()
    path.write_bytes(good)
    items[at] = (slot, EntryHeader(head.key, head.dtype, head.shape, head.nbytes, head.seq + 1))  # another seq
    assert "another entry" in read()
    items[at] = (slot, head)
    tier._fds.clear()  # drop the cached descriptor, as discard does before unlinking
    path.unlink()
    assert "missing" in read()


def damage_one_read(tier, slot, head, value, offsets, read, damaged):
    """Damage ``slot``'s chunk in every way a single-entry read must catch: a bit flipped at each of
    ``offsets`` (crc32c), a short and a long file (wrong size), the header of another seq and of another key
    (another entry), and at the end a missing file; ``damaged(header)`` returns the error message of a read
    expecting ``header``, ``read()`` the value (checked bit-exact once the chunk is restored)."""
    path = tier.chunk_path(slot)
    good = path.read_bytes()
    for offset in offsets:
        flip(path, offset)
        assert "crc32c" in damaged(head)
        path.write_bytes(good)
    path.write_bytes(good[:-1])
    assert "wrong size" in damaged(head)
    path.write_bytes(good + b"\0")
    assert "wrong size" in damaged(head)
    path.write_bytes(good)
    assert "another entry" in damaged(EntryHeader(head.key, head.dtype, head.shape, head.nbytes, head.seq + 1))
    assert "another entry" in damaged(EntryHeader(encode_key("two"), head.dtype, head.shape, head.nbytes, head.seq))
    assert torch.equal(read().view(torch.int32), value.view(torch.int32))
    tier._fds.clear()
    path.unlink()
    assert "missing" in damaged(head)


def test_byte_parts_of_a_block_slice_are_its_rows_in_element_order():
    buf = torch.zeros(2, 3, 10, 4)
    block = buf[:, :, 4:8]  # (2, 3, 4, 4): 6 runs of 16 floats
    parts = byte_parts(block, block.numel() * 4)
    assert len(parts) == 6 and all(p.nbytes == 64 for p in parts)
    src = torch.arange(block.numel(), dtype=torch.float32)
    raw = src.view(torch.uint8).numpy().tobytes()
    for i, part in enumerate(parts):
        part[:] = raw[64 * i : 64 * (i + 1)]
    assert torch.equal(block, src.reshape(block.shape))
    assert buf[:, :, :4].abs().sum() == 0 and buf[:, :, 8:].abs().sum() == 0


def test_byte_parts_merges_contiguous_dims_and_refuses_what_it_cannot_fill():
    whole = torch.zeros(2, 3, 8, 4, dtype=torch.bfloat16)
    assert len(byte_parts(whole, whole.numel() * 2)) == 1
    assert len(byte_parts(whole[1:], 3 * 8 * 4 * 2)) == 1  # a contiguous slice: one run
    assert len(byte_parts(whole[:, :1, :4], 2 * 4 * 4 * 2)) == 2  # (2, 1, 4, 4): one run per batch row
    with pytest.raises(ValueError, match="item 7.*last dimension"):
        byte_parts(whole.transpose(2, 3), whole.numel() * 2, 7)
    with pytest.raises(ValueError, match="bytes"):
        byte_parts(whole[:, :, :4], 100)
    with pytest.raises(ValueError, match="bytes"):
        byte_parts(torch.empty(5, dtype=torch.uint8), 6)
    assert byte_parts(torch.empty(0, dtype=torch.uint8), 0) == []


# -- read_into into strided destinations --------------------------------------------------------------------
@pytest.mark.parametrize("options", [{}, {"direct_io": True}, {"compression": "zstd"}, {"io_threads": 1}],
                         ids=["buffered", "direct_io", "zstd", "one_thread"])
def test_read_into_fills_block_slices_of_a_larger_buffer_in_place(tmp_path, options):
    with pytest.warns(RuntimeWarning) if options.get("direct_io") and not _direct_io_ok(tmp_path) else _nothing():
        tier = DiskTier(tmp_path / "d", 1 << 24, **options)
    list(tier.recover())
    assert tier.reads_strided
    blocks = [make_value(torch.float32, (1, 3, 16, 64), 40 + j) for j in range(12)]  # 12 KiB each
    items = [store(tier, ("k", j), b, seq=j + 1) for j, b in enumerate(blocks)]
    buf = torch.full((1, 3, 12 * 16 + 5, 64), -1.0)
    outs = [buf[:, :, 16 * j : 16 * (j + 1)] for j in range(12)]
    tier.read_into([(s, h, o) for (s, h), o in zip(items, outs)])
    assert torch.equal(buf[:, :, : 12 * 16].view(torch.int32), torch.cat(blocks, dim=2).view(torch.int32))
    assert (buf[:, :, 12 * 16 :] == -1).all()
    tier.close()


def test_a_damaged_chunk_read_into_a_slice_is_reported_with_its_position(tmp_path, monkeypatch):
    monkeypatch.setattr(disk_module, "_CPUS", 3)  # buffered reads use one thread per CPU: three, whatever runs this
    monkeypatch.setattr(disk_module, "spare_cpus", lambda: 3)  # ... and idle ones
    monkeypatch.setattr(disk_module, "MIN_BUFFERED_BYTES_PER_THREAD", 64 << 10)  # ... and a small batch split
    monkeypatch.setattr(disk_module, "SPLIT_BUFFERED", True)
    tier = DiskTier(tmp_path / "d", 1 << 24, io_threads=3)
    list(tier.recover())
    blocks = [make_value(torch.float32, (1, 3, 16, 64), j) for j in range(40)]  # 480 KiB: spread over threads
    items = [store(tier, ("k", j), b, seq=j + 1) for j, b in enumerate(blocks)]
    flip(tier.chunk_path(items[29][0]), PAGE + 5000)
    buf = torch.zeros(1, 3, 40 * 16, 64)
    outs = [buf[:, :, 16 * j : 16 * (j + 1)] for j in range(40)]
    with pytest.raises(CorruptEntryError, match="crc32c") as info:
        tier.read_into([(s, h, o) for (s, h), o in zip(items, outs)])
    assert info.value.tiercache_index == 29
    tier.close()


# -- pipelined large reads ----------------------------------------------------------------------------------
@pytest.fixture
def small_pipeline(monkeypatch):
    """Pipeline reads of >= 64 KiB in 16 KiB pieces, so the tests stay small."""
    monkeypatch.setattr(disk_module, "PIPELINE_BYTES", 64 << 10)
    monkeypatch.setattr(disk_module, "PIPELINE_PIECE", 16 << 10)


@pytest.mark.parametrize("nbytes", [64 << 10, (200 << 10) + 7])
def test_pipelined_read_returns_the_value(tmp_path, small_pipeline, nbytes):
    tier = DiskTier(tmp_path / "d", 1 << 24)
    list(tier.recover())
    data = make_value(torch.uint8, (nbytes,), 3)
    slot, head = store(tier, "big", data)
    assert torch.equal(tier.read(slot, head), data)
    out = torch.empty(nbytes, dtype=torch.uint8)
    tier.read_into([(slot, head, out)])
    assert torch.equal(out, data)
    tier.close()


@pytest.mark.parametrize("damage", ["header", "first piece", "middle piece", "last piece", "crc", "truncated",
                                    "longer"])
def test_pipelined_read_reports_every_kind_of_damage(tmp_path, small_pipeline, damage):
    tier = DiskTier(tmp_path / "d", 1 << 24)
    list(tier.recover())
    nbytes = (100 << 10) + 3
    slot, head = store(tier, "big", make_value(torch.uint8, (nbytes,), 4))
    path = tier.chunk_path(slot)
    size = path.stat().st_size
    if damage == "truncated":
        os.truncate(path, size - PAGE)
    elif damage == "longer":
        with open(path, "ab") as f:
            f.write(b"\0")
    else:
        flip(path, {"header": 20, "first piece": PAGE + 10, "middle piece": PAGE + (50 << 10),
                    "last piece": PAGE + nbytes - 1, "crc": size - 2}[damage])
    with pytest.raises(CorruptEntryError):
        tier.read(slot, head)
    tier.close()


# -- the expected-header cache ------------------------------------------------------------------------------
def test_a_reused_slot_is_checked_against_the_header_it_now_holds(tmp_path):
    tier = DiskTier(tmp_path / "d", 1 << 20)
    list(tier.recover())
    data = make_value(torch.uint8, (500,), 1)
    slot, old = store(tier, "a", data, seq=1)
    assert torch.equal(tier.read(slot, old), data)  # cached expectation of "a"/1
    tier.discard(slot)
    tier.free(slot)
    again = tier.allocate(500)
    assert again.ref == slot.ref
    new = EntryHeader(encode_key("b"), "uint8", (500,), 500, 2)
    tier.write(again, data, new)
    assert torch.equal(tier.read(again, new), data)
    with pytest.raises(CorruptEntryError, match="another entry"):
        tier.read(again, old)
    # an equal header built anew (not the same object) is accepted, a different seq is not
    assert torch.equal(tier.read(again, EntryHeader(encode_key("b"), "uint8", (500,), 500, 2)), data)
    with pytest.raises(CorruptEntryError, match="another entry"):
        tier.read(again, EntryHeader(encode_key("b"), "uint8", (500,), 500, 3))
    tier.close()


class _Source:
    """A header source (what the facade hands the tier: its index entry): ``nbytes`` and ``header``."""

    def __init__(self, header: EntryHeader) -> None:
        self.header, self.nbytes = header, header.nbytes


@pytest.mark.parametrize("n", [1, 3])
def test_header_sources_are_checked_like_headers_and_found_again_by_identity(tmp_path, n):
    """A reused slot read with the source of the entry it held before fails, though that source was cached
    for the slot by identity; a source of the entry it holds now reads, by read_into (batched and single)
    and read."""
    tier = DiskTier(tmp_path / "d", 1 << 22)
    list(tier.recover())
    values = [make_value(torch.float32, (4, 256), i) for i in range(n)]
    stored = [store(tier, f"k{i}", value, seq=i + 1) for i, value in enumerate(values)]
    sources = [_Source(header) for _, header in stored]
    for _ in range(2):  # the second time by the cached identity
        outs = [torch.empty(4, 256) for _ in values]
        tier.read_into([(slot, source, out) for (slot, _), source, out in zip(stored, sources, outs)])
        assert all(torch.equal(out.view(torch.int32), v.view(torch.int32)) for out, v in zip(outs, values))
    slot = stored[-1][0]
    assert torch.equal(tier.read(slot, sources[-1]), as_u8(values[-1]))
    tier.discard(slot)
    tier.free(slot)
    again = tier.allocate(slot.nbytes)
    assert again.ref == slot.ref
    other = make_value(torch.float32, (4, 256), 99)
    new = EntryHeader(encode_key("other"), "float32", (4, 256), other.nbytes, 50)
    tier.write(again, other.view(-1).view(torch.uint8), new)
    with pytest.raises(CorruptEntryError, match="another entry"):  # the old entry's source, cached before
        tier.read_into([(again, sources[-1], torch.empty(4, 256))])
    with pytest.raises(CorruptEntryError, match="another entry"):
        tier.read(again, sources[-1])
    out = torch.empty(4, 256)
    tier.read_into([(again, _Source(new), out)])
    assert torch.equal(out.view(torch.int32), other.view(torch.int32))
    tier.close()


def as_u8(value: torch.Tensor) -> torch.Tensor:
    return value.reshape(-1).view(torch.uint8)


def test_after_a_reopen_reads_are_checked_against_the_index_headers(tmp_path):
    tier = DiskTier(tmp_path / "d", 1 << 20)
    list(tier.recover())
    data = make_value(torch.float32, (8, 9), 2)
    slot, head = store(tier, "x", data, seq=5)
    tier.close()
    tier = DiskTier(tmp_path / "d", 1 << 20)
    (entry,) = list(tier.recover())
    assert torch.equal(tier.read(entry.slot, entry.header).view(torch.int32).reshape(8, 9), data.view(torch.int32))
    with pytest.raises(CorruptEntryError, match="another entry"):
        tier.read(entry.slot, EntryHeader(encode_key("y"), "float32", (8, 9), 288, 5))
    tier.close()


@pytest.mark.parametrize("batch,contiguous", [(1, False), (1, True), (6, False)],
                         ids=["single_slice", "single_small", "batch"])
def test_buffered_read_into_reports_every_kind_of_damage_with_its_position(tmp_path, batch, contiguous):
    """The buffered paths of ``read_into`` (one loop per batch; a whole-chunk read for one small value into
    a contiguous tensor) check what ``_pread_checked`` and ``_check_stored`` check: crc32c, the file's
    size, a missing file, and the header it expects."""
    tier = DiskTier(tmp_path / "d", 1 << 24)
    list(tier.recover())
    blocks = [make_value(torch.float32, (1, 3, 16, 64), 90 + j) for j in range(6)]  # 12 KiB each
    items = [store(tier, ("k", j), b, seq=j + 1) for j, b in enumerate(blocks)]
    buf = torch.zeros(1, 3, 6 * 16, 64)
    outs = [buf[:, :, 16 * j : 16 * (j + 1)] for j in range(6)]
    small = []
    if contiguous:
        outs = [torch.zeros(1, 3, 16, 64) for _ in range(6)]
        real_small = tier._read_small
        tier._read_small = lambda *args: small.append(1) or real_small(*args)
    last = batch - 1  # the damaged item: the last of the batch read

    def read():
        outs[5].fill_(-7.0)
        with pytest.raises(CorruptEntryError) as info:
            tier.read_into([(s, h, o) for (s, h), o in zip(items[6 - batch :], outs[6 - batch :])])
        assert info.value.tiercache_index == last
        if contiguous:  # the small path copies out only what it verified
            assert (outs[5] == -7.0).all()
        return str(info.value)

    tier.read_into([(s, h, o) for (s, h), o in zip(items, outs)])
    for out, block in zip(outs, blocks):
        assert torch.equal(out.view(torch.int32), block.view(torch.int32))
    if contiguous:
        for (s, h), out, block in zip(items, outs, blocks):
            out.zero_()
            tier.read_into([(s, h, out)])
            assert torch.equal(out.view(torch.int32), block.view(torch.int32))
    damage_each_way(tier, items, 5, read)
    assert len(small) == (12 if contiguous else 0)  # every single read of a contiguous out took the small path
    tier.close()


def _direct_io_ok(tmp_path) -> bool:
    probe = tmp_path / ".probe"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
        os.close(fd)
        return True
    except OSError:
        return False
    finally:
        probe.unlink(missing_ok=True)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_a_single_damaged_read_into_names_position_zero(tmp_path):
    tier = DiskTier(tmp_path / "d", 1 << 20)
    list(tier.recover())
    slot, head = store(tier, "one", make_value(torch.uint8, (5000,), 9))
    flip(tier.chunk_path(slot), PAGE + 100)
    with pytest.raises(CorruptEntryError) as info:
        tier.read_into([(slot, head, torch.empty(5000, dtype=torch.uint8))])
    assert info.value.tiercache_index == 0
    tier.close()


# -- direct reads straight into aligned destinations --------------------------------------------------------
def _aligned(shape, dtype=torch.float32):
    """A page-aligned tensor (anonymous mmap), as O_DIRECT needs to land reads in it."""
    import mmap

    count = 1
    for d in shape:
        count *= d
    raw = mmap.mmap(-1, max(1, count * dtype.itemsize) + PAGE)
    return torch.frombuffer(raw, dtype=torch.uint8)[: count * dtype.itemsize].view(dtype).view(shape)


def test_dio_aligned_says_which_destinations_a_direct_read_may_fill(tmp_path):
    from tiercache.tiers.disk import dio_aligned, dio_alignment

    (tmp_path / "f").write_bytes(b"x")
    found = dio_alignment(str(tmp_path / "f"))  # None where the kernel or filesystem does not say
    assert found is None or (found[0] >= 1 and found[1] >= 1)

    whole = _aligned((2, 3, 64, 64))  # rows of 16 KiB, page-aligned base
    assert whole.data_ptr() % PAGE == 0
    assert dio_aligned(whole, whole.nbytes, 512)
    assert dio_aligned(whole[:, :, 16:32], 2 * 3 * 16 * 64 * 4, 512)  # runs of 4 KiB at 4 KiB offsets
    assert not dio_aligned(whole[:, :, 1:3], 2 * 3 * 2 * 64 * 4, 512)  # 512-byte runs at 256-byte offsets
    assert not dio_aligned(whole.view(-1)[16 : 16 + 1024], 4096, 512)  # base 64 bytes past a boundary
    assert dio_aligned(whole.view(-1)[16 : 16 + 1024], 4096, 512, 4)  # fine where memory needs 4 (NVMe)
    assert dio_aligned(whole[:, :, 1:9], 2 * 3 * 8 * 64 * 4, 512, 4)  # 2 KiB runs at 256-byte offsets
    assert not dio_aligned(whole.view(-1)[:100], 400, 512)  # a length the device cannot read directly
    assert not dio_aligned(whole.view(-1)[:0], 0, 512)


def _direct_tier(tmp_path, **options):
    if not _direct_io_ok(tmp_path):
        pytest.skip("this filesystem refuses O_DIRECT")
    tier = DiskTier(tmp_path / "d", 1 << 24, direct_io=True, **options)
    list(tier.recover())
    assert tier.direct_io
    return tier


def _count_preadv(monkeypatch):
    """Record how many buffers each preadv of the disk module is given (1: the bounce buffer)."""
    seen = []
    real = os.preadv

    def spy(fd, buffers, offset, *rest):
        seen.append(len(buffers))
        return real(fd, buffers, offset, *rest)

    monkeypatch.setattr(disk_module.os, "preadv", spy)
    return seen


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "block_slices"])
def test_direct_reads_land_in_aligned_destinations_and_still_catch_damage(tmp_path, monkeypatch, strided):
    tier = _direct_tier(tmp_path, io_threads=2)
    blocks = [make_value(torch.float32, (2, 3, 16, 64), 70 + j) for j in range(6)]  # 24 KiB each
    items = [store(tier, ("k", j), b, seq=j + 1) for j, b in enumerate(blocks)]
    if strided:
        buf = _aligned((2, 3, 6 * 16, 64))
        outs = [buf[:, :, 16 * j : 16 * (j + 1)] for j in range(6)]
    else:
        outs = [_aligned((2, 3, 16, 64)) for _ in range(6)]
    seen = _count_preadv(monkeypatch)
    tier.read_into([(s, h, o) for (s, h), o in zip(items, outs)])
    assert all(n > 1 for n in seen) and len(seen) == 6  # no bounce buffer: header, payload run(s), tail
    for out, block in zip(outs, blocks):
        assert torch.equal(out.view(torch.int32), block.view(torch.int32))
    flip(tier.chunk_path(items[4][0]), PAGE + 777)  # the payload
    flip(tier.chunk_path(items[5][0]), 100)  # the header
    with pytest.raises(CorruptEntryError) as info:
        tier.read_into([(s, h, o) for (s, h), o in zip(items, outs)])
    assert info.value.tiercache_index == 4
    with pytest.raises(CorruptEntryError, match="crc32c"):
        tier.read_into([(items[5][0], items[5][1], outs[5])])
    path = tier.chunk_path(items[2][0])
    os.truncate(path, os.path.getsize(path) - 1)  # the checksum's last byte gone
    with pytest.raises(CorruptEntryError, match="wrong size"):
        tier.read_into([(items[2][0], items[2][1], outs[2])])
    with open(path, "ab") as f:
        f.write(b"\0\0")  # one byte too many
    with pytest.raises(CorruptEntryError, match="wrong size"):
        tier.read_into([(items[2][0], items[2][1], outs[2])])
    tier.close()


@pytest.mark.parametrize("aligned", [True, False], ids=["in_place", "bounce"])
def test_direct_batch_reads_report_every_kind_of_damage_with_its_position(tmp_path, monkeypatch, aligned):
    """The direct loop of ``read_into`` (``_read_direct``) checks what ``_pread_checked`` and
    ``_check_stored`` check, into aligned destinations and through the bounce buffer (which copies out
    only what it verified), and names the damaged item's position."""
    tier = _direct_tier(tmp_path, io_threads=1, direct_read_threads=1)
    blocks = [make_value(torch.float32, (1, 3, 16, 64), 40 + j) for j in range(6)]  # 12 KiB each
    items = [store(tier, ("k", j), b, seq=j + 1) for j, b in enumerate(blocks)]
    if aligned:
        buf = _aligned((1, 3, 6 * 16, 64))
    else:  # every block slice 64 bytes past a 512-byte boundary
        buf = _aligned((1 * 3 * 6 * 16 * 64 + 16,)).view(-1)[16:].view(1, 3, 6 * 16, 64)
    outs = [buf[:, :, 16 * j : 16 * (j + 1)] for j in range(6)]
    seen = _count_preadv(monkeypatch)
    tier.read_into([(s, h, o) for (s, h), o in zip(items, outs)])
    assert len(seen) == 6 and all((n > 1) == aligned for n in seen)
    for out, block in zip(outs, blocks):
        assert torch.equal(out.view(torch.int32), block.view(torch.int32))

    def read():
        outs[5].fill_(-7.0)
        with pytest.raises(CorruptEntryError) as info:
            tier.read_into([(s, h, o) for (s, h), o in zip(items, outs)])
        assert info.value.tiercache_index == 5
        if not aligned:
            assert (outs[5] == -7.0).all()
        return str(info.value)

    damage_each_way(tier, items, 5, read)
    tier.close()


def _read_batch_refusing_alignment(tier, monkeypatch, seed: int) -> None:
    """Store 4 blocks, make ``os.preadv`` refuse every read but a single-buffer one (the bounce buffer), read
    the batch into page-aligned views and check every value."""
    import errno

    blocks = [make_value(torch.float32, (1, 3, 16, 64), seed + j) for j in range(4)]
    items = [store(tier, ("k", j), b, seq=j + 1) for j, b in enumerate(blocks)]
    buf = _aligned((1, 3, 4 * 16, 64))
    outs = [buf[:, :, 16 * j : 16 * (j + 1)] for j in range(4)]
    real = os.preadv

    def picky(fd, buffers, offset, *rest):
        if len(buffers) > 1:  # only the bounce buffer is accepted
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, buffers, offset, *rest)

    monkeypatch.setattr(disk_module.os, "preadv", picky)
    tier.read_into([(s, h, o) for (s, h), o in zip(items, outs)])
    for out, block in zip(outs, blocks):
        assert torch.equal(out.view(torch.int32), block.view(torch.int32))


def test_a_batch_whose_alignment_the_device_refuses_falls_back_and_reads_every_item(tmp_path, monkeypatch):
    tier = _direct_tier(tmp_path, io_threads=1, direct_read_threads=1)
    tier.dio_align = tier.dio_mem_align = 512
    _read_batch_refusing_alignment(tier, monkeypatch, 50)
    assert tier.dio_align == PAGE  # the first refusal
    tier.close()


def test_unaligned_destinations_are_read_through_the_bounce_buffer(tmp_path, monkeypatch):
    tier = _direct_tier(tmp_path)
    data = make_value(torch.float32, (3, 1000), 5)  # 12000 bytes: not a multiple of 512
    slot, head = store(tier, "odd", data)
    seen = _count_preadv(monkeypatch)
    out = torch.empty(3, 1000)
    tier.read_into([(slot, head, out)])
    assert seen == [1] and torch.equal(out.view(torch.int32), data.view(torch.int32))
    tier.close()


def test_a_device_refusing_the_alignment_falls_back_to_pages_then_to_the_bounce_buffer(tmp_path, monkeypatch):
    import errno

    tier = _direct_tier(tmp_path)
    tier.dio_align = tier.dio_mem_align = 512  # what statx reports for most disks
    data = make_value(torch.float32, (1024,), 6)  # 4 KiB
    slot, head = store(tier, "v", data)
    real = os.preadv
    refuse = {"below": PAGE}  # first refuse 512-byte alignment, then everything but the bounce buffer

    def picky(fd, buffers, offset, *rest):
        if len(buffers) > 1 and tier.dio_align < refuse["below"]:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, buffers, offset, *rest)

    monkeypatch.setattr(disk_module.os, "preadv", picky)
    out = _aligned((1024,))
    tier.read_into([(slot, head, out)])
    assert tier.dio_align == PAGE and torch.equal(out.view(torch.int32), data.view(torch.int32))
    refuse["below"] = PAGE + 1
    out2 = _aligned((1024,))
    tier.read_into([(slot, head, out2)])
    assert tier._dio_into is False and torch.equal(out2.view(torch.int32), data.view(torch.int32))
    tier.close()


@pytest.mark.parametrize("make", [
    lambda: torch.arange(2 * 5 * 12 * 4, dtype=torch.float32).view(2, 5, 12, 4)[:, 1:4, 3:9],  # block slice
    lambda: torch.arange(3 * 4 * 6, dtype=torch.int16).view(3, 4, 6)[:, :, :4].transpose(0, 1),  # permuted rows
    lambda: torch.arange(4 * 8, dtype=torch.float64).view(4, 8)[::2, 2:5],  # a step over rows
    lambda: torch.arange(6, dtype=torch.float32).view(6, 1)[1:].expand(5, 3)[:, :1],  # stride-0 rows read as many
])
def test_byte_parts_are_the_element_order_bytes_of_any_row_contiguous_layout(make):
    """Each layout's runs, concatenated, are its elements' bytes in element order, and writing through the
    views fills exactly its elements (the run layouts are cached per shape and strides: asked twice)."""
    for _ in range(2):
        out = make()
        nbytes = out.numel() * out.element_size()
        parts = byte_parts(out, nbytes)
        assert b"".join(bytes(p) for p in parts) == out.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    if out.stride(0) != 0:
        data = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
        pos = 0
        for part in parts:
            part[:] = data[pos : pos + part.nbytes].numpy().tobytes()
            pos += part.nbytes
        assert torch.equal(out.contiguous().view(-1).view(torch.uint8), data)


def test_byte_parts_views_keep_their_tensor_alive():
    parts = byte_parts(torch.full((256,), 7, dtype=torch.int32)[::1], 1024)
    churn = [torch.zeros(256, dtype=torch.int32) for _ in range(64)]  # would reuse freed memory
    assert bytes(parts[0]) == torch.full((256,), 7, dtype=torch.int32).numpy().tobytes()
    del churn


def test_single_key_get_from_disk_counts_promotes_and_drops_damage(tmp_path):
    """``get`` of a value held by a disk tier (its own path): hit counted in the disk tier and as a miss
    in the faster one, the value promoted when the policy says so, and a damaged chunk dropped,
    counted and reported as ``KeyError``, never returned."""
    from tiercache import Cache
    from tiercache.tiers import ArenaTier

    disk = DiskTier(tmp_path / "s", 1 << 22)
    with Cache(tiers=[ArenaTier("host", 20_000), disk], policy="lru") as cache:
        values = {i: torch.randn(40, 50) for i in range(8)}  # 8 KB each: most of them land on disk
        cache.put_many(values.items())
        on_disk = [k for k in values if cache.tier_of(k) == "disk"]
        assert len(on_disk) >= 3
        before = cache.stats()["tiers"]
        key = on_disk[0]
        got = cache.get(key)
        assert torch.equal(got, values[key]) and got.shape == (40, 50)
        after = cache.stats()["tiers"]
        assert after["disk"]["hits"] == before["disk"]["hits"] + 1
        assert after["host"]["misses"] == before["host"]["misses"] + 1
        assert cache.tier_of(key) == "host"  # lru promotes a hit
        bad = next(k for k in on_disk[1:] if cache.tier_of(k) == "disk")
        slot = cache._index[bad].slot
        flip(disk.chunk_path(slot), PAGE + 3)
        with pytest.raises(KeyError):
            cache.get(bad)
        assert bad not in cache and cache.stats()["corruptions"] == 1
        assert all(torch.equal(cache.get(k), values[k]) for k in values if k != bad)
        assert not cache._pins


@pytest.mark.parametrize("idle", [2, 0])
def test_buffered_batch_reads_use_at_most_one_thread_per_cpu(tmp_path, monkeypatch, idle):
    """A warm buffered read is CPU work: ``read_into`` spreads it over ``min(io_threads, CPUs, 1 + idle
    CPUs)`` threads (the calling one included), and the values still land where they belong.  With every
    CPU busy (``idle`` 0: e.g. the model a read ahead overlaps) it reads on the calling thread only: a pool
    thread would only take a core from the busy work."""
    import threading

    monkeypatch.setattr(disk_module, "_CPUS", 2)
    monkeypatch.setattr(disk_module, "spare_cpus", lambda: idle)  # whatever load the machine running this has
    monkeypatch.setattr(disk_module, "MIN_BUFFERED_BYTES_PER_THREAD", 64 << 10)
    monkeypatch.setattr(disk_module, "SPLIT_BUFFERED", True)  # (off by default: see the test below)
    seen = _threads_reading(tmp_path, monkeypatch, 40)  # 480 KiB: worth 4 threads here
    assert 1 <= len(seen) <= 2 if idle else seen == {threading.get_ident()}


def test_buffered_batch_reads_stay_on_the_calling_thread_by_default(tmp_path, monkeypatch):
    """Without ``SPLIT_BUFFERED`` (the default) a buffered batch is read on the calling thread alone, however
    large and however many CPUs are idle (its checksums hold the GIL: a second reader only takes turns with
    it), and its values land where they belong."""
    import threading

    assert disk_module.SPLIT_BUFFERED is False
    monkeypatch.setattr(disk_module, "_CPUS", 4)
    monkeypatch.setattr(disk_module, "spare_cpus", lambda: 3)
    monkeypatch.setattr(disk_module, "MIN_BUFFERED_BYTES_PER_THREAD", 64 << 10)  # 480 KiB: 4 threads if split
    assert _threads_reading(tmp_path, monkeypatch, 40) == {threading.get_ident()}


def _threads_reading(tmp_path, monkeypatch, n: int) -> set[int]:
    """The threads that read a buffered batch of ``n`` 12 KiB blocks into slices of one buffer (the values
    checked in place)."""
    import threading

    tier = DiskTier(tmp_path / "d", 1 << 24, io_threads=4)
    list(tier.recover())
    blocks = [make_value(torch.float32, (1, 3, 16, 64), j) for j in range(n)]
    items = [store(tier, ("k", j), b, seq=j + 1) for j, b in enumerate(blocks)]
    seen = set()
    real = os.preadv

    def counting(*args):
        seen.add(threading.get_ident())
        return real(*args)

    monkeypatch.setattr(disk_module.os, "preadv", counting)
    buf = torch.zeros(1, 3, n * 16, 64)
    tier.read_into([(s, h, buf[:, :, 16 * j : 16 * (j + 1)]) for j, (s, h) in enumerate(items)])
    assert torch.equal(buf.view(torch.int32), torch.cat(blocks, dim=2).view(torch.int32))
    tier.close()
    return seen


def test_a_buffered_batch_below_the_split_size_is_read_on_the_calling_thread(tmp_path, monkeypatch):
    """Below ``MIN_BUFFERED_BYTES_PER_THREAD`` per thread a buffered batch is not split, even with idle
    CPUs (a pool thread's hand-off costs more than the reads it would take over), and its values land where
    they belong; direct reads keep the smaller ``MIN_BYTES_PER_THREAD``."""
    import threading

    monkeypatch.setattr(disk_module, "_CPUS", 2)
    monkeypatch.setattr(disk_module, "spare_cpus", lambda: 2)
    monkeypatch.setattr(disk_module, "SPLIT_BUFFERED", True)
    assert disk_module.MIN_BUFFERED_BYTES_PER_THREAD > disk_module.MIN_BYTES_PER_THREAD
    assert 2 * disk_module.MIN_BYTES_PER_THREAD < 80 * 12288 < disk_module.MIN_BUFFERED_BYTES_PER_THREAD  # 960 KiB
    assert _threads_reading(tmp_path, monkeypatch, 80) == {threading.get_ident()}


# -- batch_parts and the direct-read pool -------------------------------------------------------------------
def _addresses(parts):
    import ctypes

    return [(ctypes.addressof(ctypes.c_char.from_buffer(p)), p.nbytes) for p in parts]


class _Item:
    def __init__(self, nbytes):
        self.nbytes = nbytes


@pytest.mark.parametrize("shape", [(1, 3, 16, 64), (2, 3, 16, 64), (2, 1, 16, 64)])
def test_batch_parts_of_block_slices_equal_the_item_by_item_parts(shape):
    b, h, t, d = shape
    buf = _aligned((b, h, 9 * t + 3, d))
    outs = [buf[:, :, t * j : t * (j + 1)] for j in range(9)]
    items = [(_Item(o.numel() * 4), None, o) for o in outs]
    for direct, align in ((True, 512), (True, 4096), (False, 512)):
        parts, aligned = disk_module.batch_parts(items, direct, align, align)
        assert [_addresses(p) for p in parts] == [_addresses(byte_parts(o, o.numel() * 4)) for o in outs]
        assert aligned == [direct and disk_module.dio_aligned(o, o.numel() * 4, align, align) for o in outs]
    # an odd start: not aligned for a direct read, same parts
    odd = torch.empty(b * h * (4 * t + 1) * d + 1)[1:].view(b, h, 4 * t + 1, d)
    outs = [odd[:, :, t * j : t * (j + 1)] for j in range(4)]
    items = [(_Item(o.numel() * 4), None, o) for o in outs]
    parts, aligned = disk_module.batch_parts(items, True, 512, 512)
    assert [_addresses(p) for p in parts] == [_addresses(byte_parts(o, o.numel() * 4)) for o in outs]
    assert aligned == [disk_module.dio_aligned(o, o.numel() * 4, 512, 512) for o in outs] == [False] * 4


@pytest.mark.parametrize("contiguous", [False, True], ids=["block_slices", "contiguous"])
def test_batch_parts_remembers_each_destination_layout(monkeypatch, contiguous):
    monkeypatch.setattr(disk_module, "_PARTS", {})
    monkeypatch.setattr(disk_module, "_parts_misses", [0])
    buf = _aligned((1, 3, 4 * 16 + 3, 64))
    held = [_aligned((1, 3, 16, 64)) for _ in range(4)]

    def views():  # fresh tensor objects of the same memory every call, as a pool's slot views
        return list(held) if contiguous else [buf[:, :, 16 * j : 16 * (j + 1)] for j in range(4)]

    outs = views()
    items = [(_Item(o.numel() * 4), None, o) for o in outs]
    first, _ = disk_module.batch_parts(items, False, 512, 512)
    again = [(_Item(o.numel() * 4), None, o) for o in views()]
    second, aligned = disk_module.batch_parts(again, True, 512, 512)  # remembered: the same views every call
    third, _ = disk_module.batch_parts(items, True, 512, 512)
    assert all(a is b for p, q in zip(second, third) for a, b in zip(p, q))
    expected = [_addresses(byte_parts(o, o.numel() * 4)) for o in outs]
    assert [_addresses(p) for p in first] == [_addresses(p) for p in second] == expected
    assert aligned == [disk_module.dio_aligned(o, o.numel() * 4, 512, 512) for o in outs]
    assert len(disk_module._PARTS) == 4
    # a tensor changed in place (other memory) or viewed with another dtype gets its own views
    other = _aligned((1, 3, 16, 64)) if contiguous else _aligned((1, 3, 40, 64))[:, :, 8:24]
    outs[1].set_(other.untyped_storage(), other.storage_offset(), other.shape, other.stride())
    items[1] = (items[1][0], None, outs[1])
    items[2] = (items[2][0], None, outs[2].view(torch.int32))
    parts, _ = disk_module.batch_parts(items, True, 512, 512)
    assert [_addresses(p) for p in parts] == [_addresses(byte_parts(o, n.nbytes)) for n, _, o in items]
    assert len(disk_module._PARTS) == 6
    # a size that no longer matches is refused as before, remembered or not
    items[0] = (_Item(100), None, outs[0])
    with pytest.raises(ValueError, match="bytes"):
        disk_module.batch_parts(items, True, 512, 512)
    # fresh buffers every call: after PARTS_CACHE_MISSES missed batches only one in that many is remembered
    monkeypatch.setattr(disk_module, "PARTS_CACHE_MISSES", 4)
    monkeypatch.setattr(disk_module, "_PARTS", {})
    monkeypatch.setattr(disk_module, "_parts_misses", [0])
    kept = []
    for _ in range(16):
        fresh = [_aligned((1, 3, 16, 64)) for _ in range(3)]
        kept.append(fresh)  # (alive, so no address comes back)
        disk_module.batch_parts([(_Item(o.numel() * 4), None, o) for o in fresh], False, 512, 512)
    assert len(disk_module._PARTS) == 3 * (4 + 3)  # batches 1-4, then the 8th, 12th and 16th miss
    monkeypatch.setattr(disk_module, "PARTS_CACHE", False)
    monkeypatch.setattr(disk_module, "_PARTS", {})
    disk_module.batch_parts(items[1:], True, 512, 512)
    assert not disk_module._PARTS


def test_reads_into_remembered_destinations_return_each_new_value_and_catch_damage(tmp_path):
    tier = DiskTier(tmp_path / "d", 1 << 24)
    list(tier.recover())
    buf = torch.zeros(1, 3, 4 * 16, 64)
    outs = [buf[:, :, 16 * j : 16 * (j + 1)] for j in range(4)]
    for round_ in range(3):  # the same outs every round, as a decode buffer's block slices
        blocks = [make_value(torch.float32, (1, 3, 16, 64), 10 * round_ + j) for j in range(4)]
        items = [store(tier, ("k", round_, j), b, seq=4 * round_ + j + 1) for j, b in enumerate(blocks)]
        tier.read_into([(s, h, o) for (s, h), o in zip(items, outs)])
        assert torch.equal(buf.view(torch.int32), torch.cat(blocks, dim=2).view(torch.int32))
    flip(tier.chunk_path(items[2][0]), PAGE + 100)
    with pytest.raises(CorruptEntryError, match="crc32c") as info:
        tier.read_into([(s, h, o) for (s, h), o in zip(items, outs)])
    assert info.value.tiercache_index == 2
    tier.close()


def test_batch_parts_of_mixed_destinations_fall_back_item_by_item():
    buf, other = _aligned((1, 3, 64, 64)), _aligned((1, 3, 64, 64))
    mixed = [
        [buf[:, :, :16], buf[:, :, 16:32], other[:, :, :16]],  # another buffer's slice (outside buf's storage)
        [buf[:, :, :16], buf[:, :, 16:32], buf[:, :, 32:40]],  # another geometry
        [buf[:, :, :16], buf[:, :, 16:32], _aligned((1, 3, 16, 64))],  # a contiguous out
    ]
    for outs in mixed:
        items = [(_Item(o.numel() * 4), None, o) for o in outs]
        parts, aligned = disk_module.batch_parts(items, True, 512, 512)
        assert [_addresses(p) for p in parts] == [_addresses(byte_parts(o, o.numel() * 4)) for o in outs]
        assert aligned == [disk_module.dio_aligned(o, o.numel() * 4, 512, 512) for o in outs]
    outs = [buf[:, :, :16], buf[:, :, 16:32], buf[:, :, 32:48]]
    items = [(_Item(o.numel() * 4), None, o) for o in outs]
    items[2] = (_Item(100), None, outs[2])  # the wrong size: the error names the item
    with pytest.raises(ValueError, match="item 2.*bytes"):
        disk_module.batch_parts(items, True, 512, 512)


def test_direct_reads_use_their_own_pool_size(tmp_path):
    """Direct reads wait on the device: ``read_into`` spreads them over ``direct_read_threads`` (default
    ``max(io_threads, DIRECT_READ_THREADS)``), buffered ones over at most ``io_threads``."""
    with pytest.raises(ValueError, match="direct_read_threads"):
        DiskTier(tmp_path / "bad", 1 << 24, direct_read_threads=0)
    three = DiskTier(tmp_path / "three", 1 << 24, io_threads=2, direct_read_threads=3)
    assert three._direct_threads == 3
    three.close()
    if _direct_io_ok(tmp_path):
        tier = _direct_tier(tmp_path, io_threads=2)
    else:  # the read path's branch is under test, not the device: flag a buffered tier as direct
        tier = DiskTier(tmp_path / "d", 1 << 24, io_threads=2)
        list(tier.recover())
        tier.direct_io = True
    assert tier._direct_threads == max(2, disk_module.DIRECT_READ_THREADS) > 2
    blocks = [make_value(torch.float32, (1, 3, 16, 64), j) for j in range(64)]  # 768 KiB in block slices
    items = [store(tier, ("k", j), b, seq=j + 1) for j, b in enumerate(blocks)]
    buf = _aligned((1, 3, 64 * 16, 64))
    tier.read_into([(s, h, buf[:, :, 16 * j : 16 * (j + 1)]) for j, (s, h) in enumerate(items)])
    assert torch.equal(buf.view(torch.int32), torch.cat(blocks, dim=2).view(torch.int32))
    assert tier._pool._max_workers == tier._direct_threads
    tier.close()


def test_a_spread_read_does_not_wait_for_pool_tasks_that_never_started(tmp_path):
    """``read_into`` spreads a batch over the tier's shared pool; when every pool thread is busy with other work,
    the calling thread reads the whole batch itself and returns without waiting for its queued helpers (which
    are cancelled), and the values are right."""
    import threading

    if _direct_io_ok(tmp_path):
        tier = _direct_tier(tmp_path, io_threads=2)
    else:  # the spread is under test, not the device: flag a buffered tier as direct (reads spread over the pool)
        tier = DiskTier(tmp_path / "d", 1 << 24, io_threads=2)
        list(tier.recover())
        tier.direct_io = True
    blocks = [make_value(torch.float32, (1, 3, 16, 64), j) for j in range(64)]
    items = [store(tier, ("k", j), b, seq=j + 1) for j, b in enumerate(blocks)]
    buf = _aligned((1, 3, 64 * 16, 64))
    tier.read_into([(s, h, buf[:, :, 16 * j : 16 * (j + 1)]) for j, (s, h) in enumerate(items)])  # makes the pool
    release = threading.Event()
    blockers = [tier._pool.submit(release.wait, 30) for _ in range(tier._pool._max_workers)]
    try:
        buf.zero_()
        done = threading.Event()
        worker = threading.Thread(target=lambda: (tier.read_into(
            [(s, h, buf[:, :, 16 * j : 16 * (j + 1)]) for j, (s, h) in enumerate(items)]), done.set()))
        worker.start()
        assert done.wait(10), "the read waited for pool threads busy with other work"
        assert torch.equal(buf.view(torch.int32), torch.cat(blocks, dim=2).view(torch.int32))
    finally:
        release.set()
        for b in blockers:
            b.result()
        worker.join()
    tier.close()


# -- read_one: the facade's single get ------------------------------------------------------------------------
@pytest.mark.parametrize("elements", [0, 1000, 4096, 16384, 16384 + 100],
                         ids=["empty", "small", "small_unpadded", "medium_unpadded", "medium"])
def test_read_one_checks_what_read_into_checks(tmp_path, elements):
    """``read_one`` (the payload straight into the tensor, padded or not, below and above the whole-chunk
    reads' ``SMALL_READ_BYTES``) reads the value bit-exact, builds no header when the slot's cached one
    matches, and reports every kind of damage as ``read_into`` does: crc32c (payload, header, padding),
    wrong size both ways, another entry's header, a missing file."""
    tier = DiskTier(tmp_path / "d", 1 << 24)
    list(tier.recover())
    value = make_value(torch.float32, (elements,), 3)
    slot, head = store(tier, "one", value, seq=4)

    def read(h=head):
        out = torch.full((elements,), -7.0)
        tier.read_one(slot, out, h.key, h.dtype, h.shape, h.seq)
        return out

    assert torch.equal(read().view(torch.int32), value.view(torch.int32))
    built = []
    real = disk_module.EntryHeader
    disk_module.EntryHeader = lambda *a: built.append(a) or real(*a)
    try:
        assert torch.equal(read().view(torch.int32), value.view(torch.int32))
    finally:
        disk_module.EntryHeader = real
    assert not built  # the cached header of the slot matched: none was built

    def damaged(h=head):
        out = torch.full((elements,), -7.0)
        with pytest.raises(CorruptEntryError) as info:
            tier.read_one(slot, out, h.key, h.dtype, h.shape, h.seq)
        assert info.value.tiercache_index == 0
        return str(info.value)

    with pytest.raises(ValueError, match="contiguous CPU tensor"):
        tier.read_one(slot, torch.empty(elements + 1), head.key, head.dtype, head.shape, head.seq)
    if elements:  # (an empty slice is contiguous)
        with pytest.raises(ValueError, match="contiguous CPU tensor"):
            tier.read_one(slot, torch.empty(elements, 2)[:, 0], head.key, head.dtype, head.shape, head.seq)
    size = tier.chunk_path(slot).stat().st_size
    # payload, header, padding (or payload)
    damage_one_read(tier, slot, head, value, (PAGE + 4 * elements - 3, 10, size - 10), read, damaged)
    tier.close()


def test_read_fresh_refuses_an_out_of_another_size(tmp_path):
    """``read_fresh`` (the facade's single get, into the tensor it just made) skips ``read_one``'s device and
    layout checks but never its size check: a smaller or larger ``out`` is refused before anything is read,
    and left as it was (the read writes the payload's bytes at ``out``'s address)."""
    tier = DiskTier(tmp_path / "d", 1 << 24)
    list(tier.recover())
    value = make_value(torch.float32, (5000,), 3)
    slot, head = store(tier, "one", value, seq=4)
    for elements in (4999, 5001):
        out = torch.full((elements,), -7.0)
        with pytest.raises(ValueError, match="read_fresh"):
            tier.read_fresh(slot, out, head.key, head.dtype, head.shape, head.seq)
        assert bool((out == -7.0).all())
    out = torch.empty(5000)
    tier.read_fresh(slot, out, head.key, head.dtype, head.shape, head.seq)
    assert torch.equal(out.view(torch.int32), value.view(torch.int32))
    tier.close()


@pytest.mark.parametrize("elements", [0, 1000, 16384, 16384 + 100], ids=["empty", "padded", "unpadded", "medium"])
@pytest.mark.parametrize("cached", [True, False], ids=["hit", "cold"])
def test_read_fresh_checks_what_read_one_checks(tmp_path, elements, cached):
    """``read_fresh``'s one-frame read (a cached descriptor and header record) and its fallback (neither
    cached) read the value bit-exact and report every kind of damage as ``read_one`` does, a damaged
    chunk never returning: crc32c (payload, header, padding), wrong size both ways, another entry's
    header, a missing file."""
    tier = DiskTier(tmp_path / "d", 1 << 24)
    list(tier.recover())
    value = make_value(torch.float32, (elements,), 3)
    slot, head = store(tier, "one", value, seq=4)

    def read(h=head):
        if not cached:
            tier._fds.clear()
            tier._prefixes.clear()
        out = torch.full((elements,), -7.0)
        tier.read_fresh(slot, out, h.key, h.dtype, h.shape, h.seq)
        return out

    def damaged(h=head):
        with pytest.raises(CorruptEntryError) as info:
            read(h)
        return str(info.value)

    assert torch.equal(read().view(torch.int32), value.view(torch.int32))
    fallbacks = []
    general = tier._read_fresh_checked
    tier._read_fresh_checked = lambda *a: fallbacks.append(a) or general(*a)
    assert torch.equal(read().view(torch.int32), value.view(torch.int32))
    assert len(fallbacks) == (0 if cached else 1)  # a hit reads in read_fresh's own frame
    size = tier.chunk_path(slot).stat().st_size
    # payload, header record, the header page's zero fill, padding (or payload)
    damage_one_read(tier, slot, head, value, (PAGE + 4 * elements - 3, 10, PAGE - 5, size - 10), read, damaged)
    tier.close()


@pytest.mark.parametrize("options", [{"direct_io": True}, {"compression": "zstd"}])
def test_read_one_of_other_stores_goes_through_read_into(tmp_path, options):
    tier = DiskTier(tmp_path / "d", 1 << 24, **options)
    list(tier.recover())
    value = make_value(torch.bfloat16, (3, 5000), 8)
    slot, head = store(tier, ("k", 1), value)
    out = torch.empty(3, 5000, dtype=torch.bfloat16)
    tier.read_one(slot, out, head.key, head.dtype, head.shape, head.seq)
    assert torch.equal(out.view(torch.int16), value.view(torch.int16))
    flip(tier.chunk_path(slot), PAGE + 100)
    with pytest.raises(CorruptEntryError) as info:
        tier.read_one(slot, out, head.key, head.dtype, head.shape, head.seq)
    assert info.value.tiercache_index == 0
    tier.close()


# -- a failed check is confirmed before the entry is dropped ------------------------------------------------
def _scribbling_preadv(monkeypatch, target: torch.Tensor, times: int | None):
    """Make ``os.preadv`` flip a byte of ``target`` right after it fills a view that starts at ``target``'s
    address: the caller's destination written while the read fills it. ``times``: how many such reads
    (``None``: every one). Reads into other buffers (a private re-read) are left alone. Returns the count."""
    real = os.preadv
    address = target.data_ptr()
    done = [0]

    def preadv(fd, views, offset):
        got = real(fd, views, offset)
        for view in views:
            try:
                start = ctypes.addressof(ctypes.c_char.from_buffer(view))
            except TypeError:
                continue
            if start == address and (times is None or done[0] < times):
                done[0] += 1
                flat = target.view(-1).view(torch.uint8)
                flat[0] ^= 0x40
        return got

    monkeypatch.setattr(os, "preadv", preadv)
    return done


@pytest.mark.parametrize("nbytes", [3000, 192 << 10])  # a small chunk read whole, and a payload read in place
def test_a_read_whose_destination_changed_under_it_keeps_the_entry(tmp_path, monkeypatch, nbytes):
    from tiercache import Cache

    value = make_value(torch.uint8, (nbytes,), 7)
    with Cache(host=None, disk="4MiB", path=tmp_path / "s") as cache:
        cache.put("k", value)
        out = torch.empty(nbytes, dtype=torch.uint8)
        done = _scribbling_preadv(monkeypatch, out, times=1)
        cache.get_many(["k"], out=[out])
        disk = cache.stats()["tiers"]["disk"]
        # a payload read in place lands in out; a small chunk is read whole into the tier's own buffer
        assert done[0] == (1 if nbytes > 16 << 10 else 0)
        assert disk["confirmed_sound"] == done[0]
        assert torch.equal(out, value)
        assert cache.stats()["corruptions"] == 0 and "k" in cache
        monkeypatch.undo()
        assert torch.equal(cache.get("k"), value)


def test_a_destination_written_on_every_read_raises_an_io_error_and_keeps_the_entry(tmp_path, monkeypatch):
    from tiercache import Cache
    from tiercache.errors import TierIOError

    value = make_value(torch.float32, (64, 1024), 3)  # 256 KiB: read straight into out
    with Cache(host=None, disk="4MiB", path=tmp_path / "s") as cache:
        cache.put("k", value)
        out = torch.empty_like(value)
        _scribbling_preadv(monkeypatch, out, times=None)
        with pytest.raises(TierIOError, match="private buffer verifies"):
            cache.get_many(["k"], out=[out])
        monkeypatch.undo()
        assert cache.stats()["corruptions"] == 0 and "k" in cache
        assert cache.stats()["tiers"]["disk"]["confirmed_sound"] == 2
        assert torch.equal(cache.get("k").view(torch.int32), value.view(torch.int32))  # (bit patterns: NaNs)


def test_damage_that_a_private_read_confirms_still_drops_the_entry(tmp_path):
    tier = DiskTier(tmp_path / "d", 1 << 24)
    list(tier.recover())
    data = make_value(torch.float32, (64, 1024), 4)
    slot, head = store(tier, "k", data)
    flip(tier.chunk_path(slot), PAGE + 100)
    with pytest.raises(CorruptEntryError, match="crc32c"):
        tier.read_into([(slot, head, torch.empty_like(data))])
    with pytest.raises(CorruptEntryError, match="crc32c"):
        tier.read_one(slot, torch.empty_like(data), head.key, head.dtype, head.shape, head.seq)
    assert tier.confirmed_sound == 0
    tier.close()


@pytest.fixture
def apart(monkeypatch):
    """Direct batches read apart from their checks (``DIRECT_CHECK_APART``), spread even when small."""
    monkeypatch.setattr(disk_module, "DIRECT_CHECK_APART", True)
    monkeypatch.setattr(disk_module, "MIN_BYTES_PER_THREAD", 1)


@pytest.mark.parametrize("at", [0, 5])
def test_direct_reads_apart_from_their_checks_report_every_kind_of_damage_with_its_position(tmp_path, apart, at):
    """With ``DIRECT_CHECK_APART`` the pool threads only read and the calling thread checks: the same checks,
    the same errors, the lowest damaged position, and every item right when nothing is damaged."""
    tier = _direct_tier(tmp_path, io_threads=1, direct_read_threads=4)
    blocks = [make_value(torch.float32, (1, 3, 16, 64), 60 + j) for j in range(6)]
    items = [store(tier, ("k", j), b, seq=j + 1) for j, b in enumerate(blocks)]
    buf = _aligned((1, 3, 6 * 16, 64))
    outs = [buf[:, :, 16 * j : 16 * (j + 1)] for j in range(6)]
    calls = []
    real = tier._read_direct_apart
    tier._read_direct_apart = lambda *args: calls.append(1) or real(*args)
    for _ in range(3):
        buf.zero_()
        tier.read_into([(s, h, o) for (s, h), o in zip(items, outs)])
        for out, block in zip(outs, blocks):
            assert torch.equal(out.view(torch.int32), block.view(torch.int32))
    assert calls

    def read():
        with pytest.raises(CorruptEntryError) as info:
            tier._read_into([(s, h, o) for (s, h), o in zip(items, outs)])
        assert info.value.tiercache_index == at
        return str(info.value)

    damage_each_way(tier, items, at, read)
    tier.close()


def test_a_device_refusing_reads_apart_falls_back_and_reads_every_item(tmp_path, monkeypatch, apart):
    tier = _direct_tier(tmp_path, io_threads=1, direct_read_threads=4)
    _read_batch_refusing_alignment(tier, monkeypatch, 70)
    tier.close()
