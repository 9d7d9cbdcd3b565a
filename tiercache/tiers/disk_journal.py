"""The disk tier's two small side files in the store root (contract C7 allows them):

``index.tc`` — a checkpoint of every live entry, written at a clean close and removed (durably) before the
first change after an open, so it exists only while it matches the chunk files.  Reopen loads it instead
of reading every chunk header; a missing, stale (a size-class directory changed since) or damaged index
falls back to the full scan.  Layout (little-endian), followed by a crc32c of everything before it::

    "TCINDEX2" | seq_high_water u64 | classes u32 | entries u64
    | classes x (pages u32, dir mtime_ns u64, its zarr.json's mtime_ns u64)
    | entries x (pages u32, row u32, seq u64, nbytes u64, key_len u16, ndim u8, dtype_len u8,
                 key, dtype name, shape ndim x u64)

``tombstones.tc`` — append-only records ``(pages u32, row u32, seq u64, crc32c u32)``: "the chunk file of
this slot with a sequence number up to ``seq`` is deleted".  Written only when removing a chunk file
failed, so a delete the caller was told succeeded stays deleted after a reopen.  A torn last record
(crash mid-append) fails its crc and is ignored.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Callable, Iterable

from ..errors import CorruptEntryError
from .base import EntryHeader
from .disk_format import check_header

INDEX_NAME = "index.tc"
TOMBSTONES_NAME = "tombstones.tc"
_INDEX_MAGIC = b"TCINDEX2"
_INDEX_HEAD = struct.Struct("<8sQIQ")
_CLASS = struct.Struct("<IQQ")  # pages, dir mtime_ns, zarr.json mtime_ns
_RECORD = struct.Struct("<IIQQHBB")
_TOMB = struct.Struct("<IIQ")
_TOMB_BYTES = _TOMB.size + 4

Crc = Callable[..., int]


@dataclass
class LoadedIndex:
    seq_high_water: int
    class_mtimes: dict[int, tuple[int, int]]
    entries: list[tuple[int, int, EntryHeader]]  # (pages, row, header)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file, fsync it and rename it into place, then fsync
    the directory: after a crash ``path`` holds either the old content (or nothing) or all of ``data``."""
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")


def encode_index(
    entries: Iterable[tuple[int, int, EntryHeader]], class_mtimes: dict[int, tuple[int, int]], seq_high_water: int,
    crc: Crc,
) -> bytes:
    items = list(entries)
    parts = [_INDEX_HEAD.pack(_INDEX_MAGIC, seq_high_water, len(class_mtimes), len(items))]
    parts += [_CLASS.pack(p, *m) for p, m in sorted(class_mtimes.items())]
    for pages, row, h in items:
        dtype = h.dtype.encode("ascii")
        parts.append(_RECORD.pack(pages, row, h.seq, h.nbytes, len(h.key), len(h.shape), len(dtype)))
        parts += [h.key, dtype, struct.pack(f"<{len(h.shape)}Q", *h.shape)]
    body = b"".join(parts)
    return body + crc(body).to_bytes(4, "little")


def decode_index(raw: bytes, crc: Crc) -> LoadedIndex:
    """Parse an index file; ``CorruptEntryError`` when it is damaged in any way."""
    if len(raw) < _INDEX_HEAD.size + 4 or crc(memoryview(raw)[:-4]) != int.from_bytes(raw[-4:], "little"):
        raise CorruptEntryError("index checksum mismatch or truncated")
    try:
        magic, high, n_classes, n_entries = _INDEX_HEAD.unpack_from(raw, 0)
        if magic != _INDEX_MAGIC:
            raise CorruptEntryError("bad index magic")
        pos = _INDEX_HEAD.size
        mtimes = {}
        for _ in range(n_classes):
            pages, dir_mtime, meta_mtime = _CLASS.unpack_from(raw, pos)
            mtimes[pages] = (dir_mtime, meta_mtime)
            pos += _CLASS.size
        entries = []
        unpack, rsize = _RECORD.unpack_from, _RECORD.size
        dtypes: dict[bytes, str] = {}
        shapes: dict[int, struct.Struct] = {}
        for _ in range(n_entries):
            pages, row, seq, nbytes, key_len, ndim, dtype_len = unpack(raw, pos)
            pos += rsize
            key = raw[pos : pos + key_len]
            pos += key_len
            dbytes = raw[pos : pos + dtype_len]
            pos += dtype_len
            dtype = dtypes.get(dbytes)
            if dtype is None:
                dtype = dtypes[dbytes] = dbytes.decode("ascii")
            shape_struct = shapes.get(ndim)
            if shape_struct is None:
                shape_struct = shapes[ndim] = struct.Struct(f"<{ndim}Q")
            shape = shape_struct.unpack_from(raw, pos)
            pos += shape_struct.size
            header = EntryHeader(key, dtype, shape, nbytes, seq)
            check_header(header)
            entries.append((pages, row, header))
        if pos != len(raw) - 4:
            raise CorruptEntryError("index has trailing bytes")
    except (struct.error, ValueError) as exc:
        raise CorruptEntryError(f"unreadable index: {exc}") from None
    return LoadedIndex(high, mtimes, entries)


def append_tombstone(path: str, pages: int, row: int, seq: int, crc: Crc) -> None:
    """Durably record that the chunk of ``(pages, row)`` up to sequence ``seq`` is deleted."""
    record = _TOMB.pack(pages, row, seq)
    record += crc(record).to_bytes(4, "little")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, record)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_tombstones(path: str, crc: Crc) -> dict[tuple[int, int], int]:
    """``{(pages, row): seq}`` of every intact record (the highest ``seq`` per slot)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return {}
    out: dict[tuple[int, int], int] = {}
    for pos in range(0, len(raw) - _TOMB_BYTES + 1, _TOMB_BYTES):
        record = raw[pos : pos + _TOMB.size]
        if crc(record) != int.from_bytes(raw[pos + _TOMB.size : pos + _TOMB_BYTES], "little"):
            continue
        pages, row, seq = _TOMB.unpack(record)
        out[(pages, row)] = max(seq, out.get((pages, row), 0))
    return out
