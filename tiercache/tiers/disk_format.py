"""The disk tier's on-disk format: constants, the entry header codec and the zarr v3 metadata documents.

An entry header is a compact binary record at the start of every chunk (little-endian)::

    magic "TIERCACH" | version u32 | seq u64 | nbytes u64 | key_len u16 | ndim u8 | dtype_len u8
    | key (key_len bytes) | dtype name (ascii, dtype_len bytes) | shape (ndim x u64)

padded with zeros to :data:`HEADER_BYTES`.  Its largest size (a key of ``MAX_KEY_BYTES``, ``MAX_DIMS``
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

FORMAT_VERSION = 2  # 1: JSON headers (refused on open; there were no users)
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


def header_prefix(header: EntryHeader) -> bytes:
    """The header record without its zero padding.  ``ValueError`` for a header the format cannot hold
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
        _FIXED.pack(MAGIC, FORMAT_VERSION, header.seq, header.nbytes, len(key), len(header.shape), len(dtype)),
        key, dtype, struct.pack(f"<{len(header.shape)}Q", *header.shape),
    ))


def encode_header(header: EntryHeader) -> bytes:
    """The :data:`HEADER_BYTES` header page for ``header`` (see :func:`header_prefix`)."""
    raw = header_prefix(header)
    return raw + bytes(HEADER_BYTES - len(raw))


def decode_header(raw: bytes | memoryview) -> EntryHeader:
    """Parse and validate a header page (see :func:`check_header`); ``CorruptEntryError`` on any damage."""
    try:
        magic, version, seq, nbytes, key_len, ndim, dtype_len = _FIXED.unpack_from(raw, 0)
        if magic != MAGIC:
            raise CorruptEntryError("bad magic")
        if version != FORMAT_VERSION:
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
    except (struct.error, ValueError) as exc:
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
