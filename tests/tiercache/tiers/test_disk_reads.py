"""The disk tier's read paths of issue 8: in-place reads into row-contiguous destinations (``byte_parts``,
``reads_strided``), pipelined large reads, the per-slot expected-header cache, and that each still reports
damage as ``CorruptEntryError`` (never a wrong tensor)."""

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


def test_a_damaged_chunk_read_into_a_slice_is_reported_with_its_position(tmp_path):
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
