"""The disk tier's on-disk format: constants, the entry header codec and the zarr v3 metadata documents.

An entry header is a compact binary record at the start of every chunk (little-endian)::

    magic "TIERCACH" | version u32 | seq u64 | nbytes u64 | key_len u16 | ndim u8 | dtype_len u8
    | key (key_len bytes) | dtype name (ascii, dtype_len bytes) | shape (ndim x u64)
    [version 3:] | sector_shift u8 | crc32c of each sector (ceil(nbytes / 2**sector_shift) x u32)

padded with zeros to :data:`HEADER_BYTES`.  The part up to the shape is the entry's *identity record*
(:func:`header_prefix`), which reads compare byte for byte.  Version 3 adds the *sector table*: the payload
cut into sectors of ``2**sector_shift`` bytes (the last one may be short), each with its own crc32c, so a
ranged read can verify just the sectors it reads (:func:`sector_table`); ``sector_shift`` 0 means the entry
has no table (a ranged read of it reads the whole payload).  The whole-chunk crc32c (the zarr codec)
covers the table too.  Version 2 is version 3 without the table; a store keeps the version it was created
with (``zarr.json``'s ``format_version``).  Its largest size (a key of ``MAX_KEY_BYTES``, ``MAX_DIMS``
dimensions, a 255-character dtype name) is 2,847 bytes, so every key ``put`` accepts fits (contract C6).
:func:`decode_header` validates every field, including that ``shape`` and ``dtype`` describe exactly
``nbytes`` bytes: a header that passes its checksum but contradicts itself is corruption, never a tensor.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import torch

from ..errors import CorruptEntryError
from ..keys import MAX_KEY_BYTES
from .base import EntryHeader

FORMAT_VERSION = 3  # 3: + sector table; 2: no sector table (read and written in stores created so);
# 1: JSON headers (refused on open; there were no users)
READABLE_VERSIONS = (2, 3)
PAGE = 4096
HEADER_BYTES = PAGE
CRC_BYTES = 4
MAGIC = b"TIERCACH"
MAX_DIMS = 64  # keys.MAX_DIMS (C6); kept here too so the format does not depend on the facade's limit
MAX_DTYPE_NAME = 255
SLOT_ROWS = 2**31  # rows of each size-class array; a chunk name beyond it is not ours
_FIXED = struct.Struct("<8sIQQHBB")  # magic, version, seq, nbytes, key_len, ndim, dtype_len
MAX_HEADER_BYTES = _FIXED.size + MAX_KEY_BYTES + MAX_DTYPE_NAME + 8 * MAX_DIMS
assert MAX_HEADER_BYTES <= HEADER_BYTES
MIN_SECTOR_SHIFT = 12  # sectors are whole 4 KiB pages (a direct read of a run of them stays aligned)
MAX_SECTOR_SHIFT = 62

_ITEMSIZE: dict[str, int] = {}
for _name in dir(torch):
    _obj = getattr(torch, _name)
    if isinstance(_obj, torch.dtype):
        _ITEMSIZE[str(_obj).removeprefix("torch.")] = _obj.itemsize


def itemsize(dtype: str) -> int:
    """Bytes per element of the torch dtype named ``dtype`` ("float32"); ``CorruptEntryError`` if unknown."""
    size = _ITEMSIZE.get(dtype)
    if size is None:
        raise CorruptEntryError(f"unknown dtype {dtype!r} in entry header")
    return size


def check_header(header: EntryHeader) -> None:
    """Raise ``CorruptEntryError`` unless the header's fields agree with each other and with the format's
    limits (dtype known, ``prod(shape) * itemsize == nbytes``, at most ``MAX_DIMS`` dims)."""
    if len(header.shape) > MAX_DIMS:
        raise CorruptEntryError(f"entry header has {len(header.shape)} dimensions, the format holds {MAX_DIMS}")
    expected = math.prod(header.shape) * itemsize(header.dtype)
    if expected != header.nbytes:
        raise CorruptEntryError(
            f"entry header is inconsistent: shape {header.shape} of {header.dtype} is {expected} bytes, "
            f"the header says {header.nbytes}"
        )


def header_prefix(header: EntryHeader, version: int = FORMAT_VERSION) -> bytes:
    """The entry's identity record (the header page up to the shape, in format ``version``).  ``ValueError`` for a header the format cannot hold
    (a key over ``MAX_KEY_BYTES``, more than ``MAX_DIMS`` dims, a dtype name over 255 bytes); the facade
    refuses such values at ``put`` already."""
    key, dtype = header.key, header.dtype.encode("ascii")
    if len(key) > MAX_KEY_BYTES:
        raise ValueError(f"key of {len(key)} encoded bytes exceeds the format's {MAX_KEY_BYTES}")
    if len(header.shape) > MAX_DIMS:
        raise ValueError(f"{len(header.shape)} dimensions exceed the format's {MAX_DIMS}")
    if len(dtype) > MAX_DTYPE_NAME:
        raise ValueError(f"dtype name {header.dtype!r} is longer than {MAX_DTYPE_NAME} bytes")
    return b"".join((
        _FIXED.pack(MAGIC, version, header.seq, header.nbytes, len(key), len(header.shape), len(dtype)),
        key, dtype, struct.pack(f"<{len(header.shape)}Q", *header.shape),
    ))


def sector_shift_for(nbytes: int, prefix_len: int, shift: int) -> int:
    """The sector size (as a power of two, at least ``2**shift``) of a payload of ``nbytes`` whose identity
    record is ``prefix_len`` bytes: the smallest whose table fits the rest of the header page."""
    room = (HEADER_BYTES - prefix_len - 1) // CRC_BYTES
    while -(-nbytes >> shift) > room:
        shift += 1
    return shift


def sector_block(shift: int, crcs: bytes) -> bytes:
    """The version-3 sector table as stored after the identity record (``shift`` 0 and no ``crcs``: none)."""
    return bytes((shift,)) + crcs


def encode_header(header: EntryHeader, version: int = FORMAT_VERSION, shift: int = 0, crcs: bytes = b"") -> bytes:
    """The :data:`HEADER_BYTES` header page for ``header`` (see :func:`header_prefix`); in version 3 with
    the sector table ``(shift, crcs)`` (``shift`` 0: the entry has none)."""
    raw = header_prefix(header, version)
    if version >= 3:
        raw += sector_block(shift, crcs)
    if len(raw) > HEADER_BYTES:
        raise ValueError(f"the header record and sector table take {len(raw)} bytes, the page holds {HEADER_BYTES}")
    return raw + bytes(HEADER_BYTES - len(raw))


def sector_table(raw: bytes | memoryview, header: EntryHeader) -> tuple[int, bytes] | None:
    """The sector table ``(shift, crcs)`` of the version-3 header page ``raw`` (already decoded as
    ``header`` by :func:`decode_header`), ``None`` when the entry has none or the page is version 2."""
    version = _FIXED.unpack_from(raw, 0)[1]
    if version < 3:
        return None
    pos = len(header_prefix(header, version))
    shift = raw[pos]
    if not shift:
        return None
    count = -(-header.nbytes >> shift)
    crcs = bytes(raw[pos + 1 : pos + 1 + CRC_BYTES * count])
    return shift, crcs


def decode_header(raw: bytes | memoryview, versions: tuple[int, ...] = READABLE_VERSIONS) -> EntryHeader:
    """Parse and validate a header page (see :func:`check_header`) of one of ``versions``, its sector table
    included (the shift in range, the table inside the page); ``CorruptEntryError`` on any damage."""
    try:
        magic, version, seq, nbytes, key_len, ndim, dtype_len = _FIXED.unpack_from(raw, 0)
        if magic != MAGIC:
            raise CorruptEntryError("bad magic")
        if version not in versions:
            raise CorruptEntryError(f"unsupported entry format version {version}")
        if key_len > MAX_KEY_BYTES or ndim > MAX_DIMS:
            raise CorruptEntryError(f"entry header claims a {key_len}-byte key and {ndim} dimensions")
        pos = _FIXED.size
        key = bytes(raw[pos : pos + key_len])
        pos += key_len
        dtype = bytes(raw[pos : pos + dtype_len]).decode("ascii")
        pos += dtype_len
        shape = struct.unpack_from(f"<{ndim}Q", raw, pos)
        if len(key) != key_len:
            raise CorruptEntryError("entry header is truncated")
        if version >= 3:
            pos += 8 * ndim
            shift = raw[pos]
            if shift and not (MIN_SECTOR_SHIFT <= shift <= MAX_SECTOR_SHIFT
                              and pos + 1 + CRC_BYTES * -(-nbytes >> shift) <= HEADER_BYTES):
                raise CorruptEntryError(f"entry header has an impossible sector table (shift {shift})")
    except (struct.error, ValueError, IndexError) as exc:
        raise CorruptEntryError(f"unreadable entry header: {exc}") from None
    header = EntryHeader(key, dtype, shape, nbytes, seq)
    check_header(header)
    return header


def class_pages(nbytes: int) -> int:
    """Pages (4 KiB) of the size class that holds a payload of ``nbytes`` plus its header."""
    return 1 + -(-nbytes // PAGE)


def chunk_name(row: int) -> str:
    return f"c.{row}.0"


def parse_chunk_name(name: str) -> int | None:
    """The row of a canonical chunk file name ``c.<row>.0`` (``row < SLOT_ROWS``, no leading zeros);
    ``None`` for anything else."""
    parts = name.split(".")
    if len(parts) != 3 or parts[0] != "c" or parts[2] != "0" or not parts[1].isdigit() or not parts[1].isascii():
        return None
    row = int(parts[1])
    if str(row) != parts[1] or row >= SLOT_ROWS:
        return None
    return row


def group_metadata(attrs: dict[str, Any]) -> bytes:
    """The root ``zarr.json`` (a zarr v3 group) carrying the tiercache attributes."""
    return json.dumps({"attributes": {"tiercache": attrs}, "zarr_format": 3, "node_type": "group"}, indent=2).encode()


def array_metadata(pages: int, compression: str | None, level: int) -> bytes:
    """``slots/<pages>/zarr.json``: a uint8 array of shape ``(SLOT_ROWS, pages * PAGE)`` chunked by row,
    codecs bytes [+ zstd] + crc32c, "." chunk-key separator (what ``zarr.create_array`` writes)."""
    codecs: list[dict[str, Any]] = [{"name": "bytes"}]
    if compression == "zstd":
        codecs.append({"name": "zstd", "configuration": {"level": level, "checksum": False}})
    codecs.append({"name": "crc32c"})
    doc = {
        "shape": [SLOT_ROWS, pages * PAGE],
        "data_type": "uint8",
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [1, pages * PAGE]}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "."}},
        "fill_value": 0,
        "codecs": codecs,
        "attributes": {},
        "zarr_format": 3,
        "node_type": "array",
        "storage_transformers": [],
    }
    return json.dumps(doc, indent=2).encode()


def array_metadata_ok(raw: bytes, pages: int, compression: str | None) -> bool:
    """True when ``raw`` is the array metadata this store would write for ``pages`` (level aside)."""
    try:
        doc = json.loads(raw)
        names = [c["name"] for c in doc["codecs"]]
        return (
            doc["shape"] == [SLOT_ROWS, pages * PAGE]
            and doc["chunk_grid"]["configuration"]["chunk_shape"] == [1, pages * PAGE]
            and doc["chunk_key_encoding"]["configuration"]["separator"] == "."
            and names == (["bytes", "zstd", "crc32c"] if compression == "zstd" else ["bytes", "crc32c"])
        )
    except (ValueError, KeyError, TypeError):
        return False
