import errno
import os

import numpy as np
import pytest
import torch
import zarr

from tiercache.errors import CorruptEntryError, FingerprintMismatchError, TierIOError
from tiercache.keys import encode_key
from tiercache.testing import TierConformance
from tiercache.tiers import DiskTier, Tier
from tiercache.tiers.base import EntryHeader
from tiercache.tiers.disk import HEADER_BYTES, PAGE, class_pages, decode_header, encode_header


class TestDiskTierConformance(TierConformance):
    capacity = 160 * 1024

    def make_tier(self, path, capacity):
        return DiskTier(path, capacity)


class TestDiskTierDirectIOConformance(TierConformance):
    capacity = 160 * 1024

    def make_tier(self, path, capacity):
        return DiskTier(path, capacity, direct_io=True)


class TestDiskTierZstdConformance(TierConformance):
    capacity = 160 * 1024

    def make_tier(self, path, capacity):
        return DiskTier(path, capacity, compression="zstd")


def _payload(n, seed=0):
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _header(key, n, seq=1, dtype="uint8", shape=None):
    return EntryHeader(encode_key(key), dtype, shape if shape is not None else (n,), n, seq)


def test_header_round_trip():
    head = EntryHeader(encode_key(("layer", 3, b"\x00")), "bfloat16", (2, 0, 7), 0, 2**40 + 5)
    raw = encode_header(head)
    assert len(raw) == HEADER_BYTES
    assert decode_header(raw) == head
    assert decode_header(memoryview(raw)) == head


def test_header_too_long_is_rejected():
    with pytest.raises(ValueError):
        encode_header(EntryHeader(b"x" * 2048, "float32", tuple(range(1000)), 4, 1))


@pytest.mark.parametrize("damage", ["magic", "version", "fields", "truncated", "zeros"])
def test_damaged_header_is_corrupt(damage):
    raw = bytearray(encode_header(_header("k", 10)))
    if damage == "magic":
        raw[0] ^= 0xFF
    elif damage == "version":
        raw[8] = 99
    elif damage == "fields":
        raw[40:48] = b"}}}}{{{{"
    elif damage == "truncated":
        raw = raw[:20]
    else:
        raw = bytearray(len(raw))
    with pytest.raises(CorruptEntryError):
        decode_header(bytes(raw))


@pytest.mark.parametrize("compression", [None, "zstd"])
def test_chunks_are_readable_through_zarr(tmp_path, compression):
    tier = DiskTier(tmp_path / "d", 1 << 20, compression=compression, fingerprint="fp-1")
    written = {}
    for seq, n in enumerate([0, 1, 4096, 10_000], start=1):
        slot = tier.allocate(n)
        head = _header(("z", seq), n, seq)
        data = _payload(n, seq)
        tier.write(slot, data, head)
        written[seq] = (slot, head, data)
    tier.close()

    group = zarr.open_group(str(tmp_path / "d"), mode="r")
    attrs = group.attrs["tiercache"]
    assert attrs["compression"] == compression and attrs["fingerprint"] == "fp-1"
    for slot, head, data in written.values():
        pages, row = slot.ref
        assert pages == class_pages(head.nbytes)
        arr = zarr.open_array(str(tmp_path / "d" / "slots" / str(pages)), mode="r")
        assert arr.dtype == np.uint8 and arr.chunks == (1, pages * PAGE)
        chunk = arr[row]
        assert chunk.shape == (pages * PAGE,)
        assert decode_header(chunk[:HEADER_BYTES].tobytes()) == head
        assert np.array_equal(chunk[HEADER_BYTES : HEADER_BYTES + head.nbytes], data.numpy())
        assert not chunk[HEADER_BYTES + head.nbytes :].any()  # zero padding
    codecs = [type(c).__name__ for c in arr.metadata.codecs]
    assert codecs[-1] == "Crc32cCodec"
    assert ("ZstdCodec" in codecs) == (compression == "zstd")


def test_zstd_actually_compresses(tmp_path):
    tier = DiskTier(tmp_path / "d", 1 << 20, compression="zstd")
    slot = tier.allocate(40_000)
    tier.write(slot, torch.zeros(40_000, dtype=torch.uint8), _header("zeros", 40_000))
    assert tier.chunk_path(slot).stat().st_size < 4096
    assert torch.equal(tier.read(slot, _header("zeros", 40_000)), torch.zeros(40_000, dtype=torch.uint8))


def test_capacity_charges_whole_pages_and_checksum(tmp_path):
    tier = DiskTier(tmp_path / "d", 3 * PAGE + 4)
    assert tier.max_nbytes == 2 * PAGE  # one page of header, 4 bytes of checksum
    slot = tier.allocate(tier.max_nbytes)
    assert slot is not None and slot.charged == 3 * PAGE + 4 and tier.used == tier.capacity
    assert tier.allocate(0) is None


def test_read_of_the_wrong_entry_is_corrupt(tmp_path):
    tier = DiskTier(tmp_path / "d", 1 << 20)
    slot = tier.allocate(100)
    tier.write(slot, _payload(100), _header("a", 100, seq=1))
    with pytest.raises(CorruptEntryError):
        tier.read(slot, _header("b", 100, seq=1))
    with pytest.raises(CorruptEntryError):
        tier.read(slot, _header("a", 100, seq=2))


@pytest.mark.parametrize("compression", [None, "zstd"])
@pytest.mark.parametrize("damage", ["flip_payload", "flip_header", "truncate", "delete", "append"])
def test_damaged_chunk_is_never_returned(tmp_path, compression, damage):
    tier = DiskTier(tmp_path / "d", 1 << 20, compression=compression)
    slot = tier.allocate(10_000)
    head = _header("c", 10_000)
    tier.write(slot, _payload(10_000, 5), head)
    path = tier.chunk_path(slot)
    raw = bytearray(path.read_bytes())
    if damage == "flip_payload":
        raw[len(raw) // 2] ^= 0x01
        path.write_bytes(raw)
    elif damage == "flip_header":
        raw[30] ^= 0x40
        path.write_bytes(raw)
    elif damage == "truncate":
        path.write_bytes(raw[: len(raw) - 100])
    elif damage == "append":
        path.write_bytes(raw + b"\x00")
    else:
        path.unlink()
    with pytest.raises(CorruptEntryError):
        tier.read(slot, head)
    tier.close()
    # Reopening never yields a damaged entry that then reads back wrong.
    again = DiskTier(tmp_path / "d", 1 << 20)
    for found in again.recover():
        with pytest.raises(CorruptEntryError):
            again.read(found.slot, found.header)


def test_failed_write_raises_tier_io_error_and_leaves_nothing(tmp_path, monkeypatch):
    tier = DiskTier(tmp_path / "d", 1 << 20)
    slot = tier.allocate(5000)
    real = os.writev

    def full(fd, buffers):  # a partial write, then the disk is full
        real(fd, [bytes(memoryview(buffers[0])[:10])])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("tiercache.tiers.disk.os.writev", full)
    with pytest.raises(TierIOError) as info:
        tier.write(slot, _payload(5000), _header("x", 5000))
    assert info.value.errno == errno.ENOSPC
    assert "disk is full" in str(info.value)
    assert isinstance(info.value, OSError)
    monkeypatch.setattr("tiercache.tiers.disk.os.writev", real)
    assert not tier.chunk_path(slot).exists()
    assert not list((tmp_path / "d").rglob("*.tmp"))
    tier.discard(slot)
    tier.free(slot)
    tier.close()
    assert list(DiskTier(tmp_path / "d", 1 << 20).recover()) == []


def test_leftover_temp_files_are_removed_on_recovery(tmp_path):
    tier = DiskTier(tmp_path / "d", 1 << 20)
    slot = tier.allocate(100)
    tier.write(slot, _payload(100), _header("a", 100))
    tier.close()
    tmp = tier.chunk_path(slot).with_name("0.12345.tmp")
    tmp.write_bytes(b"half a chunk")  # after the clean close: the index is stale now and the open scans
    again = DiskTier(tmp_path / "d", 1 << 20)
    assert [f.header.key for f in again.recover()] == [encode_key("a")]
    assert again.describe()["index"].startswith("scanned")
    assert not tmp.exists()


def test_fingerprint_is_checked_on_reopen(tmp_path):
    DiskTier(tmp_path / "d", 1 << 20, fingerprint="model-A").close()
    with pytest.raises(FingerprintMismatchError):
        DiskTier(tmp_path / "d", 1 << 20, fingerprint="model-B")
    DiskTier(tmp_path / "d", 1 << 20, fingerprint="model-A").close()
    DiskTier(tmp_path / "d", 1 << 20).close()  # no fingerprint given: no check


def test_store_settings_win_on_reopen(tmp_path):
    tier = DiskTier(tmp_path / "d", 1 << 20, compression="zstd")
    slot = tier.allocate(100)
    tier.write(slot, _payload(100), _header("a", 100))
    tier.close()
    again = DiskTier(tmp_path / "d", 1 << 20, compression=None)
    assert again.compression == "zstd"
    [found] = list(again.recover())
    assert torch.equal(again.read(found.slot, found.header), _payload(100))


def test_refuses_foreign_directories_and_bad_options(tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "data.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        DiskTier(tmp_path / "busy", 1 << 20)
    zarr.open_group(str(tmp_path / "other"), mode="w", zarr_format=3)
    with pytest.raises(ValueError, match="not a tiercache store"):
        DiskTier(tmp_path / "other", 1 << 20)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        DiskTier(tmp_path / "file", 1 << 20)
    with pytest.raises(ValueError, match="compression"):
        DiskTier(tmp_path / "new", 1 << 20, compression="lz4")


def test_is_a_tier(tmp_path):
    assert isinstance(DiskTier(tmp_path / "d", 1 << 20), Tier)
