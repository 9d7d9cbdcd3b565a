"""Ranged (sector) reads: ``Cache.get_many(keys, out=[...], ranges=[...])`` writes only the asked bytes of
each destination, reads only the covering sectors of a disk entry and verifies each of them, and keeps every
other guarantee of ``get_many`` (all or nothing, damage dropped and reported, counts, promotion)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tiercache import Cache
from tiercache.policies import LRUPolicy
from tiercache.testing import make_value, same_tensor
from tiercache.tiers import DiskTier
from tiercache.tiers.disk import HEADER_BYTES, PAGE

SECTOR = 64 << 10
CONFIGS = ["host", "disk", "disk-direct", "disk-v2", "disk-v2-direct", "disk-zstd", "host+disk"]


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def make_v2_store(path: Path) -> None:
    """An empty store whose root says format version 2 (what this package wrote before sector tables): its
    entries are written, and read, in version 2."""
    DiskTier(path, 1 << 20).close()
    meta = path / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["tiercache"]["format_version"] = 2
    meta.write_text(json.dumps(doc))
    for name in ("index.tc", "tombstones.tc"):
        if (path / name).exists():
            (path / name).unlink()


def open_cache(config: str, path: Path, **options) -> Cache:
    if config == "host":
        return Cache(host="64MiB", **options)
    if config.startswith("disk-v2"):
        make_v2_store(path)
    return Cache(
        host="64MiB" if config == "host+disk" else None, disk="256MiB", path=str(path),
        direct_io=config.endswith("direct"), compression="zstd" if config == "disk-zstd" else None,
        **options,
    )


@st.composite
def value_and_ranges(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.uint8, torch.bfloat16, torch.int64]))
    n = draw(st.sampled_from([1, 7, 1000, 4096, 70000, 200003]))
    value = make_value(dtype, (n,), draw(st.integers(0, 1 << 20)))
    nbytes = value.nbytes
    cuts = sorted(set(draw(st.lists(st.integers(0, nbytes), max_size=8))))
    pairs, start = [], None
    for cut in cuts:  # consecutive cuts pair up into ranges; some adjacent, some with gaps
        if start is None:
            start = cut
        elif cut > start:
            pairs.append((start, cut))
            start = None if draw(st.booleans()) else cut
    return value, pairs


@pytest.mark.parametrize("config", CONFIGS)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=st.lists(value_and_ranges(), min_size=1, max_size=4), whole=st.booleans())
def test_ranged_get_equals_slices_of_a_whole_get(config, case, whole):
    """Property: the asked bytes equal the whole value's bytes there, and every other byte of the
    destination is untouched (host, disk buffered and direct, version-2 entries, zstd, a mix)."""
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/var/tmp")) as d:
        cache = open_cache(config, Path(d) / "store")
        try:
            keys = [f"k{i}" for i in range(len(case))]
            for key, (value, _) in zip(keys, case):
                cache.put(key, value)
            if config == "host+disk" and len(keys) > 1:
                cache.flush()  # every entry on the disk tier, then one back in host by a whole get
                cache.get(keys[0])
            ranges = [pairs for _, pairs in case]
            if whole:
                ranges[0] = None  # a whole item in the batch
            outs = [make_value(v.dtype, v.shape, 99 + i) for i, (v, _) in enumerate(case)]
            before = [o.clone() for o in outs]
            got = cache.get_many(keys, out=outs, ranges=ranges)
            assert got == outs or all(a is b for a, b in zip(got, outs))
            expect = cache.get_many(keys)
            for out, old, value, wanted in zip(outs, before, expect, ranges):
                ob, xb, vb = as_bytes(out), as_bytes(old), as_bytes(value)
                if wanted is None:
                    assert torch.equal(ob, vb)
                    continue
                mask = torch.zeros(ob.numel(), dtype=torch.bool)
                for lo, hi in wanted:
                    mask[lo:hi] = True
                assert torch.equal(ob[mask], vb[mask])
                assert torch.equal(ob[~mask], xb[~mask])
            assert cache.stats()["ranged_gets"] == sum(r is not None for r in ranges)
        finally:
            cache.close()


def chunk_of(cache: Cache, key) -> Path:
    tier = cache._tiers[-1]
    entry = cache._index[key]
    return tier.chunk_path(entry.slot)


@pytest.mark.parametrize("direct", [False, True])
def test_damaged_sector_is_caught_by_a_ranged_read_of_it(tmp_path, direct):
    cache = Cache(host=None, disk="64MiB", path=str(tmp_path / "s"), direct_io=direct)
    value = make_value(torch.float32, (4, 3, 2, 128, 64), 1)  # 768 KiB: 12 sectors of 64 KiB
    cache.put("a", value)
    path = chunk_of(cache, "a")
    raw = bytearray(path.read_bytes())
    raw[HEADER_BYTES + 5 * SECTOR + 123] ^= 0x10  # sector 5's bytes
    path.write_bytes(bytes(raw))
    cache._tiers[-1]._fds.clear()
    out = torch.zeros_like(value)
    # A read that skips sector 5 does not see the damage (acceptable: whole reads check everything, and a
    # read of sector 5 does); its bytes are right.
    cache.get_many(["a"], out=[out], ranges=[[(0, 2 * SECTOR), (6 * SECTOR, 7 * SECTOR - 3)]])
    assert torch.equal(as_bytes(out)[: 2 * SECTOR], as_bytes(value)[: 2 * SECTOR])
    assert cache.stats()["tiers"]["disk"]["bytes_read"] == 3 * SECTOR
    with pytest.raises(KeyError):
        cache.get_many(["a"], out=[out], ranges=[[(5 * SECTOR + 200, 5 * SECTOR + 300)]])
    assert "a" not in cache
    assert cache.stats()["corruptions"] == 1
    cache.close()


def test_damage_in_the_last_short_sector_is_caught(tmp_path):
    cache = Cache(host=None, disk="64MiB", path=str(tmp_path / "s"), direct_io=True)
    value = make_value(torch.uint8, (3 * SECTOR + 1000,), 2)
    cache.put("a", value)
    path = chunk_of(cache, "a")
    raw = bytearray(path.read_bytes())
    raw[HEADER_BYTES + 3 * SECTOR + 999] ^= 1
    path.write_bytes(bytes(raw))
    cache._tiers[-1]._fds.clear()
    out = torch.zeros_like(value)
    with pytest.raises(KeyError):
        cache.get_many(["a"], out=[out], ranges=[[(3 * SECTOR, 3 * SECTOR + 1)]])
    assert cache.stats()["corruptions"] == 1
    cache.close()


def test_ranged_disk_reads_count_the_bytes_read(tmp_path):
    cache = Cache(host=None, disk="64MiB", path=str(tmp_path / "s"), direct_io=True)
    value = make_value(torch.float32, (4, 3, 2, 128, 64), 3)
    cache.put("a", value)
    out = torch.empty_like(value)
    # two runs of sectors (0-1, 4) and bytes inside them
    cache.get_many(["a"], out=[out], ranges=[[(10, SECTOR + 5), (SECTOR + 9, 2 * SECTOR), (4 * SECTOR, 4 * SECTOR + 1)]])
    disk = cache.stats()["tiers"]["disk"]
    assert disk["bytes_read"] == 3 * SECTOR
    assert disk["ranged_reads"] == 1 and disk["ranged_bytes_saved"] == value.nbytes - 3 * SECTOR
    assert disk["format_version"] == 3 and disk["sector_bytes"] == SECTOR
    cache.close()


@pytest.mark.parametrize("scan", [False, True])
def test_reopen_keeps_sector_crcs(tmp_path, scan):
    """After a reopen (index loaded: the first ranged read of an entry reads its header page for the table;
    scanned: the table comes from the header pages the scan reads) ranged reads read by sectors, and check
    them."""
    path = tmp_path / "s"
    cache = Cache(host=None, disk="64MiB", path=str(path), direct_io=True)
    values = {k: make_value(torch.float32, (4, 3, 2, 128, 64), k) for k in range(3)}
    for k, v in values.items():
        cache.put(k, v)
    cache.close()
    if scan:
        (path / "index.tc").unlink()
    cache = Cache(host=None, disk="64MiB", path=str(path), direct_io=True)
    assert cache.stats()["tiers"]["disk"]["index"] == ("loaded" if not scan else "scanned (no index)")
    out = torch.zeros_like(values[0])
    cache.get_many([0], out=[out], ranges=[[(SECTOR, 2 * SECTOR)]])
    first = cache.stats()["tiers"]["disk"]["bytes_read"]
    assert first == SECTOR  # payload bytes (a header page read to learn the table is not counted)
    cache.get_many([0], out=[out], ranges=[[(SECTOR, 2 * SECTOR)]])
    assert cache.stats()["tiers"]["disk"]["bytes_read"] - first == SECTOR
    assert torch.equal(as_bytes(out)[SECTOR : 2 * SECTOR], as_bytes(values[0])[SECTOR : 2 * SECTOR])
    chunk = chunk_of(cache, 0)
    raw = bytearray(chunk.read_bytes())
    raw[HEADER_BYTES + SECTOR + 7] ^= 4
    chunk.write_bytes(bytes(raw))
    cache._tiers[-1]._fds.clear()
    with pytest.raises(KeyError):
        cache.get_many([0], out=[out], ranges=[[(SECTOR, SECTOR + 8)]])
    assert 0 not in cache
    cache.close()


def test_version_2_store_is_read_and_ranged_reads_read_whole(tmp_path):
    path = tmp_path / "s"
    make_v2_store(path)
    cache = Cache(host=None, disk="64MiB", path=str(path))
    value = make_value(torch.float32, (4, 3, 2, 128, 64), 4)
    cache.put("a", value)
    raw = chunk_of(cache, "a").read_bytes()
    assert int.from_bytes(raw[8:12], "little") == 2  # written in version 2
    cache.close()
    cache = Cache(host=None, disk="64MiB", path=str(path))
    assert cache.stats()["tiers"]["disk"]["format_version"] == 2
    out = torch.zeros_like(value)
    cache.get_many(["a"], out=[out], ranges=[[(0, 100)]])
    cache.get_many(["a"], out=[out], ranges=[[(0, 100)]])
    assert cache.stats()["tiers"]["disk"]["bytes_read"] == 2 * value.nbytes
    assert torch.equal(as_bytes(out)[:100], as_bytes(value)[:100])
    assert torch.equal(as_bytes(out)[100:], torch.zeros(value.nbytes - 100, dtype=torch.uint8))
    assert same_tensor(cache.get("a"), value)
    cache.close()


def test_a_table_that_does_not_fit_takes_larger_sectors(tmp_path):
    tier = DiskTier(tmp_path / "s", 1 << 26, sector_bytes=4096)
    cache = Cache(tiers=[tier])
    value = make_value(torch.uint8, (8 << 20,), 5)  # 2048 sectors of 4 KiB: 8 KiB of crcs, too many
    cache.put("a", value)
    ref = cache._index["a"].slot.ref
    _, shift, crcs = tier._sectors[ref]
    assert 4 * len(crcs) // 4 * 1 <= HEADER_BYTES and shift > 12
    assert (8 << 20) >> shift == len(crcs) // 4
    out = torch.zeros_like(value)
    cache.get_many(["a"], out=[out], ranges=[[(5000, 5001), (3 << 20, (3 << 20) + 7000)]])
    assert torch.equal(out[5000:5001], value[5000:5001])
    assert torch.equal(out[3 << 20 : (3 << 20) + 7000], value[3 << 20 : (3 << 20) + 7000])
    assert cache.stats()["tiers"]["disk"]["bytes_read"] == 2 << shift
    cache.close()


def test_promoted_entry_is_read_whole_and_others_by_sectors(tmp_path):
    value = make_value(torch.float32, (4, 3, 2, 128, 64), 6)
    for policy, promoted in (("lru", True), ("lfu", False)):  # LFU promotes from the second hit
        cache = Cache(host="8MiB", disk="64MiB", path=str(tmp_path / policy), policy=policy)
        cache.put("a", value)
        cache.flush()  # now on disk
        out = torch.zeros_like(value)
        cache.get_many(["a"], out=[out], ranges=[[(0, SECTOR)]])
        disk = cache.stats()["tiers"]["disk"]
        assert disk["bytes_read"] == (value.nbytes if promoted else SECTOR)
        assert (cache._index["a"].level == 0) is promoted
        assert torch.equal(as_bytes(out)[:SECTOR], as_bytes(value)[:SECTOR])
        assert same_tensor(cache.get("a"), value)
        cache.close()


def test_bad_ranges_input(tmp_path):
    cache = Cache(host="8MiB")
    value = make_value(torch.float32, (100,), 7)
    cache.put("a", value)
    cache.put("b", value)
    out = [torch.zeros(100), torch.zeros(100)]
    bad = [
        ([[(0, 4)], None], None, "out"),  # ranges without a list out
        ([[(0, 4)]], out, "items for 2 keys"),
        ([[(4, 4)], None], out, r"ranges\[0\]\[0\]"),
        ([[(-1, 4)], None], out, r"ranges\[0\]\[0\]"),
        ([None, [(8, 12), (0, 4)]], out, r"ranges\[1\]\[1\]"),
        ([None, [(0, 8), (4, 12)]], out, r"ranges\[1\]\[1\]"),
        ([[(0.0, 4)], None], out, r"ranges\[0\]\[0\]"),
        ([[(0, 4, 5)], None], out, r"ranges\[0\]\[0\]"),
        ([[(True, 4)], None], out, r"ranges\[0\]\[0\]"),
        (["ab", None], out, r"ranges\[0\]"),
        ("ab", out, "ranges must be"),
        ([[(0, 401)], None], out, r"ranges\[0\].*'a'.*400 bytes"),
    ]
    for ranges, outs, match in bad:
        with pytest.raises(ValueError, match=match):
            cache.get_many(["a", "b"], out=outs, ranges=ranges)
    with pytest.raises(ValueError, match="list or tuple"):
        cache.get_many(["a", "b"], out=torch.zeros(1000), ranges=[None, None])
    strided = torch.zeros(200)[::2]
    with pytest.raises(ValueError, match="contiguous"):
        cache.get_many(["a", "b"], out=[strided, out[1]], ranges=[[(0, 4)], None])
    assert cache.stats()["gets"] == 0 and torch.count_nonzero(out[0]) == 0
    # a strided destination is fine for a whole item, adjacent ranges are allowed, an empty list reads nothing
    cache.get_many(["a", "b"], out=[strided, out[1]], ranges=[None, [(0, 4), (4, 8), (396, 400)]])
    assert same_tensor(strided.contiguous(), value)
    assert same_tensor(out[1][:2], value[:2]) and same_tensor(out[1][99:], value[99:])
    assert torch.count_nonzero(out[1][2:99]) == 0
    out[0].zero_()
    cache.get_many(["a"], out=[out[0]], ranges=[[]])
    assert torch.count_nonzero(out[0]) == 0
    with pytest.raises(KeyError):  # all or nothing on a missing key, counted as a miss
        cache.get_many(["a", "zz"], out=out, ranges=[[(0, 4)], [(0, 4)]])
    assert torch.count_nonzero(out[0]) == 0
    assert cache.stats()["misses"] == 1
    cache.close()


def test_disk_sector_bytes_option():
    with pytest.raises(ValueError, match="power of two"):
        Cache(host="1MiB", disk_sector_bytes=3 << 12)
    with pytest.raises(ValueError, match="power of two"):
        Cache(host="1MiB", disk_sector_bytes=2048)
    with pytest.raises(TypeError):
        Cache(host="1MiB", disk_sector_bytes="64KiB")
    with pytest.raises(ValueError):
        DiskTier("/nonexistent-never-made", 1 << 20, sector_bytes=1000)


def test_ranged_read_of_a_padded_payload_end(tmp_path):
    """Direct reads of the last sector of a payload that does not fill its page read the padding too (whole
    pages) but verify and copy only the payload."""
    cache = Cache(host=None, disk="64MiB", path=str(tmp_path / "s"), direct_io=True)
    value = make_value(torch.uint8, (PAGE * 3 + 5,), 8)
    cache.put("a", value)
    out = torch.zeros_like(value)
    cache.get_many(["a"], out=[out], ranges=[[(PAGE * 3, PAGE * 3 + 5)]])
    assert torch.equal(out[PAGE * 3 :], value[PAGE * 3 :]) and torch.count_nonzero(out[: PAGE * 3]) == 0
    cache.close()


def test_custom_lru_policy_object_works_with_ranges(tmp_path):
    cache = Cache(host="4MiB", disk="64MiB", path=str(tmp_path / "s"), policy=LRUPolicy())
    value = make_value(torch.int64, (1000,), 9)
    cache.put("a", value)
    out = torch.zeros_like(value)
    cache.get_many(["a"], out=(out,), ranges=((( 8, 16),),))
    assert out[1] == value[1] and torch.count_nonzero(out[2:]) == 0
    cache.close()


def page_aligned(like: torch.Tensor) -> torch.Tensor:
    raw = torch.zeros(like.nbytes + PAGE, dtype=torch.uint8)
    at = -raw.data_ptr() % PAGE
    return raw[at : at + like.nbytes].view(like.dtype).view(like.shape)


@pytest.mark.parametrize("direct", [False, True])
def test_whole_sector_runs_land_in_the_destination_and_are_verified_there(tmp_path, direct):
    """Runs of whole sectors, every byte asked for, are read straight into a (page-aligned) destination and
    checked there: right bytes, others untouched, and damage in one of them is still caught."""
    cache = Cache(host=None, disk="64MiB", path=str(tmp_path / "s"), direct_io=direct)
    value = make_value(torch.float32, (4, 3, 2, 128, 64), 10)
    cache.put("a", value)
    out = page_aligned(value)
    wanted = [(SECTOR, 3 * SECTOR), (7 * SECTOR, 8 * SECTOR), (11 * SECTOR, 12 * SECTOR)]
    cache.get_many(["a"], out=[out], ranges=[wanted])
    ob, vb = as_bytes(out), as_bytes(value)
    mask = torch.zeros(ob.numel(), dtype=torch.bool)
    for lo, hi in wanted:
        mask[lo:hi] = True
    assert torch.equal(ob[mask], vb[mask]) and torch.count_nonzero(ob[~mask]) == 0
    assert cache.stats()["tiers"]["disk"]["bytes_read"] == 4 * SECTOR
    assert cache._tiers[-1]._scratch._bounce is None  # no bounce buffer was needed
    path = chunk_of(cache, "a")
    raw = bytearray(path.read_bytes())
    raw[HEADER_BYTES + 7 * SECTOR + 3] ^= 2
    path.write_bytes(bytes(raw))
    cache._tiers[-1]._fds.clear()
    with pytest.raises(KeyError):
        cache.get_many(["a"], out=[out], ranges=[wanted])
    assert cache.stats()["corruptions"] == 1 and "a" not in cache
    cache.close()


def test_whole_reads_of_odd_sizes_keep_the_direct_alignment(tmp_path):
    """A ranged read that reads a version-2 entry of an odd size whole (through the bounce buffer) must not
    make the tier give up direct reads into callers' memory (an EINVAL from a misaligned piece would)."""
    path = tmp_path / "s"
    make_v2_store(path)
    cache = Cache(host=None, disk="64MiB", path=str(path), direct_io=True)
    tier = cache._tiers[-1]
    before = (tier.dio_align, tier.dio_mem_align, tier._dio_into)
    value = make_value(torch.uint8, (1000,), 11)
    cache.put("a", value)
    out = torch.zeros_like(value)
    cache.get_many(["a"], out=[out], ranges=[[(10, 20)]])
    assert torch.equal(out[10:20], value[10:20]) and torch.count_nonzero(out[:10]) == 0
    assert (tier.dio_align, tier.dio_mem_align, tier._dio_into) == before
    cache.close()


@pytest.mark.parametrize("where", ["table", "shift", "identity"])
def test_damaged_header_page_after_an_index_load_is_reported(tmp_path, where):
    """After an open that loaded index.tc the first ranged read reads the header page for the sector table:
    damage there (a crc in the table, the shift, the identity record) is reported, never a wrong tensor."""
    path = tmp_path / "s"
    cache = Cache(host=None, disk="64MiB", path=str(path), direct_io=True)
    value = make_value(torch.float32, (4, 3, 2, 128, 64), 12)
    cache.put("a", value)
    chunk = chunk_of(cache, "a")
    cache.close()
    raw = bytearray(chunk.read_bytes())
    prefix_end = raw.index(b"float32") + len("float32") + 8 * 5  # identity record: ... dtype, shape
    at = {"table": prefix_end + 1 + 4 * 3, "shift": prefix_end, "identity": prefix_end - 3}[where]
    raw[at] ^= 0x01 if where != "shift" else 0x80
    chunk.write_bytes(bytes(raw))
    cache = Cache(host=None, disk="64MiB", path=str(path), direct_io=True)
    assert cache.stats()["tiers"]["disk"]["index"] == "loaded"
    out = torch.zeros_like(value)
    with pytest.raises(KeyError):
        cache.get_many(["a"], out=[out], ranges=[[(3 * SECTOR, 3 * SECTOR + 16)]])
    assert "a" not in cache and cache.stats()["corruptions"] == 1
    cache.close()


def test_damage_in_a_whole_item_of_a_mixed_batch_drops_that_entry(tmp_path):
    """A whole (``None``) item after ranged ones fails its crc: the damaged entry is the one dropped."""
    cache = Cache(host=None, disk="64MiB", path=str(tmp_path / "s"))
    values = {k: make_value(torch.float32, (4, 3, 2, 128, 64), 20 + k) for k in range(3)}
    for k, v in values.items():
        cache.put(k, v)
    chunk = chunk_of(cache, 2)
    raw = bytearray(chunk.read_bytes())
    raw[HEADER_BYTES + 100] ^= 1
    chunk.write_bytes(bytes(raw))
    cache._tiers[-1]._fds.clear()
    outs = [torch.zeros_like(values[k]) for k in range(3)]
    with pytest.raises(KeyError) as caught:
        cache.get_many([0, 1, 2], out=outs, ranges=[[(0, 8)], [(8, 16)], None])
    assert caught.value.args == (2,)
    assert 2 not in cache and 0 in cache and 1 in cache
    cache.close()
