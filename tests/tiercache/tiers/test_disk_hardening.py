"""The disk tier's durability holes (issue 7: items 2, 3, 4, 5, 7, 8, 9, 10) and its fast paths (issue 8:
read_into, the persisted index, direct I/O), each reproduced through real files."""

import errno
import logging
import os
import warnings
from pathlib import Path

import pytest
import torch
import zarr

from tiercache import Cache
from tiercache.errors import CorruptEntryError, TierIOError
from tiercache.keys import MAX_KEY_BYTES, encode_key
from tiercache.testing import make_value, same_tensor
from tiercache.tiers import DiskTier
from tiercache.tiers.base import EntryHeader
from tiercache.tiers.disk import MIN_CAPACITY, PAGE, DiskOverBudgetError, decode_header, encode_header
from tiercache.tiers.disk_format import MAX_DIMS, _ITEMSIZE


def value(i: int, n: int = 3000) -> torch.Tensor:
    return make_value(torch.uint8, (n,), 500 + i)


def chunks(store: Path) -> list[Path]:
    return sorted(p for p in (store / "slots").glob("*/c.*.0"))


def rewrite_header(path: Path, change) -> None:
    """Replace a chunk's header by ``change(header)`` and recompute its checksum: a valid crc over a header
    that may contradict itself."""
    import crc32c

    raw = bytearray(path.read_bytes())
    header = decode_header(bytes(raw[:PAGE]))
    raw[:PAGE] = encode_header(change(header))
    raw[-4:] = crc32c.crc32c(bytes(raw[:-4])).to_bytes(4, "little")
    path.write_bytes(bytes(raw))


def header_for(key, n, seq=1):
    return EntryHeader(encode_key(key), "uint8", (n,), n, seq)


# -- item 9: a self-contradicting header with a valid checksum ------------------------------------------
@pytest.mark.parametrize("when", ["after reopen", "while open"])
def test_inconsistent_header_with_a_valid_checksum_is_corruption(tmp_path, when):
    store = tmp_path / "s"
    good = torch.arange(16, dtype=torch.float32).reshape(4, 4)
    cache = Cache(host=None, disk="1MiB", path=store)
    cache.put("k", good)
    cache.put("other", torch.ones(3))
    [path] = [p for p in chunks(store) if decode_header(p.read_bytes()[:PAGE]).key == encode_key("k")]
    if when == "after reopen":
        cache.close()
    rewrite_header(path, lambda h: EntryHeader(h.key, h.dtype, (2, 2), h.nbytes, h.seq))
    if when == "after reopen":
        cache = Cache(host=None, disk="1MiB", path=store)
    with cache:
        with pytest.raises(KeyError):
            cache.get("k")
        with pytest.raises(KeyError):
            cache.get_many(["k", "other"])
        assert cache.stats()["corruptions"] >= 1
        assert torch.equal(cache.get("other"), torch.ones(3))


def test_decode_header_checks_shape_dtype_and_size():
    with pytest.raises(CorruptEntryError, match="inconsistent"):
        decode_header(encode_header(EntryHeader(b"k", "float32", (3,), 8, 1)))
    with pytest.raises(CorruptEntryError, match="unknown dtype"):
        decode_header(encode_header(EntryHeader(b"k", "float33", (2,), 8, 1)))


# -- item 3: the header holds any accepted key, shape and dtype ---------------------------------------------
def test_longest_key_with_64_dims_survives_close_and_reopen(tmp_path):
    key = "x" * (MAX_KEY_BYTES - 5)  # str encoding: tag + 4-byte length + data
    assert len(encode_key(key)) == MAX_KEY_BYTES
    tensor = torch.arange(6, dtype=torch.float64).reshape((1,) * (MAX_DIMS - 2) + (2, 3))
    with Cache(host="1MiB", disk="1MiB", path=tmp_path / "s") as cache:
        cache.put(key, tensor)
        for i in range(20):  # later, unrelated puts (and demotions) must not fail
            cache.put(i, value(i))
    with Cache(host="1MiB", disk="1MiB", path=tmp_path / "s") as cache:
        assert torch.equal(cache.get(key), tensor)


@pytest.mark.parametrize("dtype", sorted(_ITEMSIZE))
def test_every_dtype_name_round_trips_through_the_header(dtype):
    size = _ITEMSIZE[dtype]
    head = EntryHeader(b"k" * MAX_KEY_BYTES, dtype, (1,) * (MAX_DIMS - 1) + (3,), 3 * size, 7)
    assert decode_header(encode_header(head)) == head


# -- item 8: absurd chunk names cost no memory and are reported ------------------------------------------
def test_planted_huge_and_non_canonical_chunk_names(tmp_path):
    store = tmp_path / "s"
    with Cache(host=None, disk="1MiB", path=store) as cache:
        cache.put("a", value(1))
    class_dir = chunks(store)[0].parent
    (class_dir / "c.2147483647.0").write_bytes(b"planted")
    (class_dir / "c.007.0").write_bytes((class_dir / "c.0.0").read_bytes())
    (class_dir / "c.99999999999.0").write_bytes(b"beyond the array")
    with Cache(host=None, disk="1MiB", path=store) as cache:
        tier = cache.tiers[0]
        assert cache.stats()["corruptions"] == 3
        assert sum(len(rows) for rows in tier._free_rows.values()) == 0
        assert sum(len(rows) for rows in tier._taken.values()) == 1
        assert same_tensor(cache.get("a"), value(1))
        cache.put("b", value(2))  # the allocator skips the occupied row
        assert same_tensor(cache.get("a"), value(1)) and same_tensor(cache.get("b"), value(2))
    assert sorted(p.name for p in class_dir.glob("c.*")) == ["c.0.0", "c.1.0"]


def test_a_valid_chunk_at_the_last_row_is_recovered_without_a_huge_free_list(tmp_path):
    store = tmp_path / "s"
    with Cache(host=None, disk="1MiB", path=store) as cache:
        cache.put("a", value(1))
    [path] = chunks(store)
    path.rename(path.with_name("c.2147483647.0"))
    with Cache(host=None, disk="1MiB", path=store) as cache:
        assert same_tensor(cache.get("a"), value(1))
        assert sum(len(r) for r in cache.tiers[0]._free_rows.values()) == 0
        cache.put("b", value(2))
    with Cache(host=None, disk="1MiB", path=store) as cache:
        assert sorted(cache.keys()) == ["a", "b"]


# -- item 10: a refused open leaves no trace ------------------------------------------------------------
def test_refused_opens_leave_no_trace(tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "data.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        Cache(disk="1MiB", path=busy)
    assert sorted(os.listdir(busy)) == ["data.txt"]
    other = tmp_path / "other"
    zarr.open_group(str(other), mode="w", zarr_format=3)
    before = sorted(os.listdir(other))
    with pytest.raises(ValueError, match="not a tiercache store"):
        Cache(disk="1MiB", path=other)
    assert sorted(os.listdir(other)) == before
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        Cache(disk="1MiB", path=tmp_path / "file")
    with pytest.raises(ValueError, match=f"smallest is {MIN_CAPACITY}"):
        Cache(disk=100, path=tmp_path / "tiny")
    assert not (tmp_path / "tiny").exists()
    with pytest.raises(ValueError, match="compression"):
        Cache(disk="1MiB", path=tmp_path / "new", compression="lz4")
    assert not (tmp_path / "new").exists()
    assert sorted(os.listdir(tmp_path)) == ["busy", "file", "other"]


def test_fingerprint_refusal_of_a_new_folder_removes_what_it_made(tmp_path):
    with Cache(disk="1MiB", path=tmp_path / "s", fingerprint="a"):
        pass
    before = sorted(os.listdir(tmp_path / "s"))
    with pytest.raises(ValueError):
        Cache(disk="1MiB", path=tmp_path / "s", fingerprint="b")
    assert sorted(os.listdir(tmp_path / "s")) == before


# -- item 4: lost slot metadata is repaired and reported; orphans never win -------------------------------
@pytest.mark.parametrize("damage", ["deleted", "garbage"])
def test_lost_slot_metadata_is_reported_and_never_serves_stale_values(tmp_path, damage):
    store = tmp_path / "s"
    with Cache(host=None, disk="1MiB", path=store) as cache:
        for i in range(3):
            cache.put(i, value(i))
    meta = chunks(store)[0].parent / "zarr.json"
    if damage == "deleted":
        meta.unlink()
    else:
        meta.write_text("{not json")
    with Cache(host=None, disk="1MiB", path=store) as cache:
        assert sorted(cache.keys()) == [0, 1, 2]  # the chunks are self-describing: nothing is lost
        assert cache.stats()["corruptions"] == 1  # ... and the damage is reported
        assert cache.tiers[0].describe()["metadata_repaired"] == 1
        cache.put(1, value(99))
    with Cache(host=None, disk="1MiB", path=store) as cache:
        assert same_tensor(cache.get(1), value(99))
        assert cache.stats()["corruptions"] == 0
    arr = zarr.open_array(str(meta.parent), mode="r")
    assert arr.shape[1] == int(meta.parent.name) * PAGE


# -- item 5: a delete whose unlink fails stays deleted ------------------------------------------------------
@pytest.mark.parametrize("reopen_by", ["index", "scan"])
def test_delete_with_a_failing_unlink_does_not_come_back(tmp_path, monkeypatch, reopen_by):
    store = tmp_path / "s"
    real_unlink = os.unlink

    def failing(path, *args, **kwargs):
        if "/slots/" in os.fspath(path) and os.path.basename(os.fspath(path)).startswith("c."):
            raise OSError(errno.EIO, "Input/output error")
        return real_unlink(path, *args, **kwargs)

    with Cache(host=None, disk="1MiB", path=store) as cache:
        for i in range(3):
            cache.put(i, value(i))
        monkeypatch.setattr(os, "unlink", failing)
        assert cache.delete(1) is True
        assert cache.tiers[0].describe()["tombstones"] == 1
    monkeypatch.undo()
    assert len(chunks(store)) == 3  # the file is still there ...
    if reopen_by == "scan":
        (store / "index.tc").unlink()
    with Cache(host=None, disk="1MiB", path=store) as cache:
        assert sorted(cache.keys()) == [0, 2]  # ... but the entry stays deleted
        cache.put(1, value(7))
    with Cache(host=None, disk="1MiB", path=store) as cache:
        assert same_tensor(cache.get(1), value(7))  # a newer write in that slot is not tombstoned


def test_a_tombstoned_slot_is_not_reused_until_the_file_is_gone(tmp_path, monkeypatch):
    """The sequence counter restarts from the newest entry found, which can be below a tombstone's: a new
    entry written into the tombstoned slot would then be 'deleted' by the next scan.  So the slot stays
    out of use until a scan has removed the file."""
    store = tmp_path / "s"
    real_unlink = os.unlink
    with Cache(host=None, disk="1MiB", path=store) as cache:
        for i in range(3):
            cache.put(i, value(i))
        monkeypatch.setattr(os, "unlink", lambda p, *a, **k: (_ for _ in ()).throw(OSError(errno.EIO, "EIO"))
                            if "/slots/" in os.fspath(p) else real_unlink(p, *a, **k))
        cache.delete(2)  # the newest entry: its sequence number is the highest
        cache.put(3, value(3))  # while open: the freed slot must not be handed out again
    monkeypatch.undo()
    with Cache(host=None, disk="1MiB", path=store) as cache:  # by the index
        assert sorted(cache.keys()) == [0, 1, 3]
        for i in range(4, 8):
            cache.put(i, value(i))
    (store / "index.tc").unlink()
    with Cache(host=None, disk="1MiB", path=store) as cache:  # by the scan, which applies the tombstone
        assert sorted(cache.keys()) == [0, 1, 3, 4, 5, 6, 7]
        for i in (3, 4, 5, 6, 7):
            assert same_tensor(cache.get(i), value(i))
    assert not (store / "tombstones.tc").exists()  # compacted: the file is gone now


def test_a_delete_that_cannot_be_made_durable_is_loud(tmp_path, monkeypatch):
    tier = DiskTier(tmp_path / "d", 1 << 20)
    list(tier.recover())
    slot = tier.allocate(10)
    tier.write(slot, value(0, 10), header_for("a", 10))
    monkeypatch.setattr("tiercache.tiers.disk.os.unlink", lambda p: (_ for _ in ()).throw(OSError(errno.EIO, "EIO")))
    monkeypatch.setattr("tiercache.tiers.disk_journal.os.fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "EIO")))
    with pytest.raises(TierIOError, match="may come back"):
        tier.discard(slot)


def test_cache_delete_that_cannot_be_made_durable_raises(tmp_path, monkeypatch):
    """Through the facade: a delete whose unlink and tombstone both fail is not reported as done."""
    with Cache(host=None, disk="1MiB", path=tmp_path / "s") as cache:
        cache.put("a", value(0))
        cache.put("b", value(1))
        with monkeypatch.context() as patch:
            patch.setattr("tiercache.tiers.disk.os.unlink", lambda p: (_ for _ in ()).throw(OSError(errno.EIO, "EIO")))
            patch.setattr("tiercache.tiers.disk_journal.os.fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "EIO")))
            with pytest.raises(TierIOError, match="may come back"):
                cache.delete("a")
        assert cache.stats()["errors"]["discard"] == 1
        assert "b" in cache and same_tensor(cache.get("b"), value(1))  # the cache goes on working
        cache.delete("b")  # a healthy delete returns normally


def test_the_sequence_counter_never_restarts_below_the_high_water_mark(tmp_path):
    """Deleting the newest entries must not let the next writes reuse their sequence numbers."""
    store = tmp_path / "s"
    with Cache(host=None, disk="1MiB", path=store) as cache:
        for i in range(5):
            cache.put(i, value(i))
        for i in range(1, 5):
            cache.delete(i)
        high = cache._seq
    with Cache(host=None, disk="1MiB", path=store) as cache:
        assert cache.tiers[0].seq_high_water >= high
        assert cache._seq >= high
        cache.put("new", value(9))
        assert cache._index["new"].header.seq > high


# -- item 7: a creation killed half-way is finished on the next open ------------------------------------
@pytest.mark.parametrize("state", ["lock only", "lock and partial", "group without attributes", "lock and tmp"])
def test_half_created_store_is_finished_on_open(tmp_path, state):
    store = tmp_path / "s"
    store.mkdir()
    (store / ".lock").write_bytes(b"")
    if state == "lock and partial":
        (store / "zarr.0123abcd.partial").write_text('{"zarr_format": 3')
    elif state == "group without attributes":
        zarr.open_group(str(store), mode="a", zarr_format=3)
    elif state == "lock and tmp":
        (store / "zarr.json.123.tmp").write_text("{")
    with Cache(host=None, disk="1MiB", path=store) as cache:
        cache.put("a", value(1))
    with Cache(host=None, disk="1MiB", path=store) as cache:
        assert same_tensor(cache.get("a"), value(1))
    assert not [n for n in os.listdir(store) if n.endswith((".partial", ".tmp"))]


def test_a_foreign_group_without_our_lock_is_still_refused(tmp_path):
    zarr.open_group(str(tmp_path / "g"), mode="w", zarr_format=3)
    with pytest.raises(ValueError, match="not a tiercache store"):
        DiskTier(tmp_path / "g", 1 << 20)


# -- item 2: a smaller budget on reopen is refused, never sheds data ------------------------------------
def test_reopen_with_a_smaller_budget_is_refused_and_deletes_nothing(tmp_path):
    store = tmp_path / "s"
    with Cache(host=None, disk="1MiB", path=store) as cache:
        for i in range(10):
            cache.put(i, value(i, 4096))
        stored = cache.tiers[0].used
    for by in ("index", "scan"):
        if by == "scan":
            (store / "index.tc").unlink()
        with pytest.raises(DiskOverBudgetError, match=f"holds {stored} bytes.*budget of {4 * 8196} bytes") as info:
            Cache(host=None, disk=4 * 8196, path=store)
        assert info.value.stored == stored and isinstance(info.value, ValueError)
    with Cache(host=None, disk=stored, path=store) as cache:  # the lock was released; all is still there
        assert sorted(cache.keys()) == list(range(10))
        for i in range(10):
            assert same_tensor(cache.get(i), value(i, 4096))


# -- issue 8: read_into, the persisted index, direct I/O, any dtype ---------------------------------------
def _filled_tier(path, n, **kw):
    tier = DiskTier(path, 1 << 22, **kw)
    list(tier.recover())
    items = []
    for i in range(n):
        size = 100 + 1000 * i
        slot = tier.allocate(size)
        tier.write(slot, value(i, size), header_for(i, size, seq=i + 1))
        items.append((slot, header_for(i, size, seq=i + 1)))
    return tier, items


@pytest.mark.parametrize("compression", [None, "zstd"])
def test_read_into_fills_verified_payloads_in_parallel(tmp_path, compression):
    tier, items = _filled_tier(tmp_path / "d", 9, compression=compression)
    outs = [torch.empty(slot.nbytes, dtype=torch.uint8) for slot, _ in items]
    tier.read_into([(s, h, o) for (s, h), o in zip(items, outs)])
    for i, out in enumerate(outs):
        assert torch.equal(out, value(i, items[i][0].nbytes))
    if compression is None:
        path = tier.chunk_path(items[5][0])
        raw = bytearray(path.read_bytes())
        raw[PAGE + 3] ^= 1
        path.write_bytes(bytes(raw))
        with pytest.raises(CorruptEntryError) as info:
            tier.read_into([(s, h, o) for (s, h), o in zip(items, outs)])
        assert info.value.tiercache_index == 5
    with pytest.raises(ValueError, match="item 0"):
        tier.read_into([(items[0][0], items[0][1], torch.empty(3, dtype=torch.uint8))])
    tier.close()


def test_write_takes_any_dtype(tmp_path):
    tier = DiskTier(tmp_path / "d", 1 << 20)
    data = torch.randn(33).to(torch.bfloat16)
    slot = tier.allocate(66)
    head = EntryHeader(b"k", "bfloat16", (33,), 66, 1)
    tier.write(slot, data, head)
    assert torch.equal(tier.read(slot, head).view(torch.bfloat16), data)


def test_index_is_loaded_after_a_clean_close_and_dropped_before_the_first_change(tmp_path, caplog):
    tier, items = _filled_tier(tmp_path / "d", 4)
    tier.close()
    again = DiskTier(tmp_path / "d", 1 << 22)
    found = {f.header.key: f for f in again.recover()}
    assert again.describe()["index"] == "loaded"
    assert set(found) == {h.key for _, h in items}
    for slot, head in items:
        assert torch.equal(again.read(found[head.key].slot, head), value(head.seq - 1, slot.nbytes))
    assert (tmp_path / "d" / "index.tc").exists()
    slot = again.allocate(10)
    again.write(slot, value(0, 10), header_for("new", 10, seq=99))
    assert not (tmp_path / "d" / "index.tc").exists()  # a crash now must fall back to the scan
    crashed = DiskTier(tmp_path / "d", 1 << 22)  # no close: as after a SIGKILL
    with caplog.at_level(logging.INFO, logger="tiercache.tiers.disk"):
        keys = {f.header.key for f in crashed.recover()}
    assert crashed.describe()["index"] == "scanned (no index)" and encode_key("new") in keys
    crashed.close()
    (tmp_path / "d" / "index.tc").write_bytes(b"garbage")
    damaged = DiskTier(tmp_path / "d", 1 << 22)
    with caplog.at_level(logging.WARNING, logger="tiercache.tiers.disk"):
        assert {f.header.key for f in damaged.recover()} == keys
    assert damaged.describe()["index"].startswith("scanned (stale or damaged")
    assert "ignoring the index" in caplog.text


def test_direct_io_round_trip_where_supported(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            tier, items = _filled_tier(tmp_path / "d", 3, direct_io=True)
        except RuntimeWarning:
            pytest.skip("this filesystem refuses O_DIRECT")
    assert tier.describe()["direct_io"] is True
    for i, (slot, head) in enumerate(items):
        assert torch.equal(tier.read(slot, head), value(i, slot.nbytes))
        assert tier.chunk_path(slot).stat().st_size == DiskTier.chunk_bytes(slot)
    arr = zarr.open_array(str(tier.chunk_path(items[1][0]).parent), mode="r")
    assert bytes(arr[items[1][0].ref[1], PAGE : PAGE + 100]) == bytes(value(1, 1100)[:100].numpy())


def test_direct_io_falls_back_with_a_warning_where_refused(tmp_path, monkeypatch):
    real_open = os.open

    def refusing(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr("tiercache.tiers.disk.os.open", refusing)
    with pytest.warns(RuntimeWarning, match="does not support O_DIRECT"):
        cache = Cache(host=None, disk="1MiB", path=tmp_path / "s", direct_io=True)
    with cache:
        facts = cache.tiers[0].describe()
        assert facts["direct_io"] is False and facts["direct_io_requested"] is True
        cache.put("a", value(1))
        assert same_tensor(cache.get("a"), value(1))
    assert not [n for n in os.listdir(tmp_path / "s") if "probe" in n]


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="no /dev/shm")
def test_direct_io_on_tmpfs_is_used_or_refused_with_a_warning(tmp_path):
    """Linux before 6.6 refuses O_DIRECT on tmpfs (fallback + warning); newer kernels accept it."""
    import tempfile

    with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
        try:
            fd = os.open(Path(shm) / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT)
            os.close(fd)
            supported = True
        except OSError:
            supported = False
        os.unlink(Path(shm) / "probe") if (Path(shm) / "probe").exists() else None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cache = Cache(host=None, disk="1MiB", path=Path(shm) / "s", direct_io=True)
        assert any(issubclass(w.category, RuntimeWarning) for w in caught) == (not supported)
        with cache:
            assert cache.tiers[0].describe()["direct_io"] is supported
            cache.put("a", value(1))
            assert same_tensor(cache.get("a"), value(1))


# -- the descriptor cache -------------------------------------------------------------------------------
def test_fd_cache_never_closes_a_descriptor_in_use(tmp_path, monkeypatch):
    from tiercache.tiers import disk_fds
    from tiercache.tiers.disk_fds import FdCache

    monkeypatch.setattr(disk_fds, "REPLACE_EVERY", 1)  # plain LRU: every miss of a full cache evicts

    files = []
    for i in range(3):
        files.append(tmp_path / f"f{i}")
        files[-1].write_bytes(bytes([i]) * 8)
    cache = FdCache(os.O_RDONLY, limit=1)
    held = cache.acquire("a", str(files[0]))
    other = cache.acquire("b", str(files[1]))  # evicts "a" from the cache, but it is in use
    assert os.pread(held.fd, 8, 0) == bytes([0]) * 8
    cache.release(held)
    with pytest.raises(OSError):
        os.fstat(held.fd)  # closed once released
    cache.forget("b")
    assert os.pread(other.fd, 1, 0) == b"\x01"  # still open for its reader
    cache.release(other)
    again = cache.acquire("b", str(files[2]))  # forgotten: opened afresh
    assert os.pread(again.fd, 1, 0) == b"\x02"
    cache.release(again)
    idle = cache.acquire("a", str(files[0]))  # evicts the idle "b": closed at once (outside the lock)
    with pytest.raises(OSError):
        os.fstat(again.fd)
    cache.release(idle)
    cache.forget("a")  # idle: closed by forget itself
    with pytest.raises(OSError):
        os.fstat(idle.fd)
    cache.clear()


def test_fd_cache_pread_reads_only_through_a_cached_descriptor(tmp_path, monkeypatch):
    # pread is lookup + preadv + release in one call: None (nothing opened, nothing cached) on a miss; on
    # a hit the read goes through the cached descriptor, which stays cached; one evicted while a pread
    # holds it is closed by that pread, not under it.
    from tiercache.tiers import disk_fds
    from tiercache.tiers.disk_fds import FdCache

    monkeypatch.setattr(disk_fds, "REPLACE_EVERY", 1)  # plain LRU: every miss of a full cache evicts
    files = [tmp_path / f"f{i}" for i in range(2)]
    for i, f in enumerate(files):
        f.write_bytes(bytes([i]) * 8)
    cache = FdCache(os.O_RDONLY, limit=1)
    buf = bytearray(8)
    assert cache.pread("a", [buf], 0) is None and not cache._open
    cache.release(cache.acquire("a", str(files[0])))
    fd = cache._open["a"].fd
    assert cache.pread("a", [buf], 4) == 4 and buf[:4] == bytes(4)
    assert cache._open["a"].fd == fd and cache._open["a"].users == 0

    real_preadv = disk_fds.os.preadv

    def evicting_preadv(fd_, views, offset):  # another reader evicts "a" while this read holds it
        cache.release(cache.acquire("b", str(files[1])))
        os.fstat(fd_)  # still open under this read
        return real_preadv(fd_, views, offset)

    monkeypatch.setattr(disk_fds.os, "preadv", evicting_preadv)
    assert cache.pread("a", [buf], 0) == 8
    monkeypatch.setattr(disk_fds.os, "preadv", real_preadv)
    assert list(cache._open) == ["b"]
    with pytest.raises(OSError):
        os.fstat(fd)  # closed by the pread that held it
    assert cache.pread("a", [buf], 0) is None
    cache.clear()


def test_fd_caches_share_one_process_budget(tmp_path, monkeypatch):
    # Many disk tiers in one process (several caches) must not together cache more descriptors than the
    # shared budget: each one's own limit alone would exhaust the open-file limit.
    from tiercache.tiers import disk_fds
    from tiercache.tiers.disk_fds import FdCache

    shared = disk_fds._SharedBudget()
    shared.limit = 10
    monkeypatch.setattr(disk_fds, "_SHARED", shared)
    files = [tmp_path / f"f{i}" for i in range(12)]
    for i, f in enumerate(files):
        f.write_bytes(bytes([i]))
    caches = [FdCache(os.O_RDONLY, limit=8) for _ in range(3)]
    for n, cache in enumerate(caches):
        for i, f in enumerate(files):
            handle = cache.acquire(i, str(f))
            assert os.pread(handle.fd, 1, 0) == bytes([i])
            cache.release(handle)
        assert len(cache._open) <= 8
    assert sum(len(c._open) for c in caches) == shared.count <= 10
    caches[0].forget(0)
    caches[0].clear()
    assert shared.count == sum(len(c._open) for c in caches[1:])
    del caches[1]  # dropped without clear(): its share comes back
    import gc
    gc.collect()
    assert shared.count == len(caches[-1]._open)
    caches[-1].clear()
    assert shared.count == 0


def test_fd_cache_gives_back_its_descriptors_when_the_process_runs_out(tmp_path, monkeypatch):
    import errno

    from tiercache.tiers import disk_fds
    from tiercache.tiers.disk_fds import FdCache

    files = [tmp_path / f"f{i}" for i in range(3)]
    for i, f in enumerate(files):
        f.write_bytes(bytes([i]))
    cache = FdCache(os.O_RDONLY, limit=8)
    for i in range(2):
        cache.release(cache.acquire(i, str(files[i])))
    cached = [h.fd for h in cache._open.values()]
    real_open, calls = os.open, []

    def open_once_out_of_files(path, flags, *args):
        calls.append(path)
        if len(calls) == 1:
            raise OSError(errno.EMFILE, "Too many open files", path)
        return real_open(path, flags, *args)

    monkeypatch.setattr(disk_fds.os, "open", open_once_out_of_files)
    handle = cache.acquire(2, str(files[2]))
    assert os.pread(handle.fd, 1, 0) == b"\x02" and len(calls) == 2
    cache.release(handle)
    for fd in cached:  # the idle cached descriptors were closed to make room
        if fd != handle.fd:
            with pytest.raises(OSError):
                os.fstat(fd)
    monkeypatch.setattr(disk_fds.os, "open", real_open)
    cache.clear()


def test_a_full_fd_cache_keeps_most_of_its_descriptors_through_a_cyclic_scan(tmp_path):
    from tiercache.tiers.disk_fds import REPLACE_EVERY, FdCache

    files = [tmp_path / f"f{i}" for i in range(40)]
    for i, f in enumerate(files):
        f.write_bytes(bytes([i]))
    cache = FdCache(os.O_RDONLY, limit=20)
    hits = 0
    for sweep in range(3):  # the same 40 files in the same order, twice the cache's size
        for i, f in enumerate(files):
            handle = cache.lookup(i)
            hits += handle is not None and sweep > 0
            if handle is None:
                handle = cache.acquire(i, str(f))
            assert os.pread(handle.fd, 1, 0) == bytes([i])  # never another file's descriptor
            cache.release(handle)
        assert len(cache._open) == 20
    # LRU would hit nothing here (every descriptor is evicted before its reuse); most of the resident set
    # survives each sweep: of 40 reads per sweep, 20 are resident, less a few replaced per sweep
    assert hits >= 2 * (20 - 2 * 20 // REPLACE_EVERY - 1)
    uncached = cache.acquire("x", str(files[0]))  # a transient descriptor is closed by its release
    if "x" not in cache._open:
        cache.release(uncached)
        with pytest.raises(OSError):
            os.fstat(uncached.fd)
    else:
        cache.release(uncached)
    cache.clear()
    assert not cache._open


def test_rewriting_a_slot_is_never_read_through_a_stale_descriptor(tmp_path):
    tier = DiskTier(tmp_path / "d", 1 << 20)
    slot = tier.allocate(100)
    first, second = header_for("a", 100, seq=1), header_for("a", 100, seq=2)
    tier.write(slot, value(1, 100), first)
    assert torch.equal(tier.read(slot, first), value(1, 100))  # caches the descriptor
    tier.write(slot, value(2, 100), second)  # rename over the file
    assert torch.equal(tier.read(slot, second), value(2, 100))
    with pytest.raises(CorruptEntryError):
        tier.read(slot, first)
    tier.discard(slot)
    with pytest.raises(CorruptEntryError, match="missing"):
        tier.read(slot, second)


def test_recover_columns_is_recover_without_per_entry_headers(tmp_path, monkeypatch):
    from tiercache.tiers import disk as disk_module

    tier, items = _filled_tier(tmp_path / "d", 5)
    tier.close()
    plain = DiskTier(tmp_path / "d", 1 << 22)
    expected = {f.header.key: f for f in plain.recover()}
    plain.close()  # unchanged: the index stays
    bulk = DiskTier(tmp_path / "d", 1 << 22)
    columns, rest = bulk.recover_columns()
    assert rest == [] and columns is not None and bulk.describe()["index"] == "loaded"
    got = {k: (EntryHeader(k, *columns.forms[f], s), slot)
           for k, f, s, slot in zip(columns.keys, columns.form_ids, columns.seqs, columns.slots)}
    assert {k: (e.header, e.slot) for k, e in expected.items()} == got
    assert bulk.used == sum(e.slot.charged for e in expected.values())
    # a loaded entry's header is built when a delete needs it (the tombstone records its seq) ...
    victim = got[encode_key(2)][1]
    real_unlink = os.unlink

    def refuse(path, *a, **kw):
        if str(path).endswith(disk_module.chunk_name(victim.ref[1])) and f"/{victim.ref[0]}/" in str(path):
            raise PermissionError(13, "Permission denied")
        return real_unlink(path, *a, **kw)

    monkeypatch.setattr(disk_module.os, "unlink", refuse)
    bulk.discard(victim)
    bulk.free(victim)
    monkeypatch.setattr(disk_module.os, "unlink", real_unlink)
    assert bulk.tombstoned == 1
    slot = bulk.allocate(10)
    bulk.write(slot, value(7, 10), header_for("new", 10, seq=50))
    bulk.close()  # ... and when close writes the index again
    again = DiskTier(tmp_path / "d", 1 << 22)
    found = {f.header.key: f.header for f in again.recover()}
    assert found == {**{k: e.header for k, e in expected.items() if k != encode_key(2)},
                     encode_key("new"): header_for("new", 10, seq=50)}
    again.close()
    last = DiskTier(tmp_path / "d", 1 << 22)
    columns, rest = last.recover_columns()
    assert last.describe()["index"] == "loaded" and columns is not None
    assert set(columns.keys) == set(found)
    last.close()
