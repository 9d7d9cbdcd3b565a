"""Cache keys: validation and a stable, process-independent byte encoding.

A key is a ``str``, ``bytes``, ``int`` (not ``bool``) or a tuple of keys (nesting allowed).  The encoding
is canonical (equal keys encode equally) and never uses Python's salted ``hash()``, so keys persisted by
one process are found by another.
"""

from __future__ import annotations

import struct
from typing import Hashable, TypeAlias

Key: TypeAlias = Hashable
MAX_KEY_BYTES = 2048
MAX_DIMS = 64  # most tensor dimensions an entry may have (the disk header holds this many)


def _encode(key: object, out: bytearray, depth: int) -> None:
    if depth > 32:
        raise TypeError("key nesting is deeper than 32 tuples")
    if isinstance(key, bool):
        raise TypeError("bool is not a supported key type (ambiguous with int); use an int or a str")
    if isinstance(key, str):
        data = key.encode("utf-8", "surrogatepass")
        out += b"s" + struct.pack("<I", len(data)) + data
    elif isinstance(key, bytes):
        out += b"b" + struct.pack("<I", len(key)) + key
    elif isinstance(key, int):
        text = str(key).encode("ascii")
        out += b"i" + struct.pack("<I", len(text)) + text
    elif isinstance(key, tuple):
        out += b"t" + struct.pack("<I", len(key))
        for item in key:
            _encode(item, out, depth + 1)
    else:
        raise TypeError(
            f"unsupported key type {type(key).__name__}: keys are str, bytes, int or tuples of those"
        )


def encode_key(key: object) -> bytes:
    """Canonical bytes for ``key``; raises ``TypeError`` for unsupported key types and ``ValueError`` when
    the encoding exceeds :data:`MAX_KEY_BYTES` (keys are stored in a fixed-size on-disk header)."""
    out = bytearray()
    _encode(key, out, 0)
    if len(out) > MAX_KEY_BYTES:
        raise ValueError(f"key is too long: {len(out)} encoded bytes, the limit is {MAX_KEY_BYTES}")
    return bytes(out)


def check_key(key: object) -> None:
    """Raise as :func:`encode_key` would for an unsupported key type, without encoding the common cases
    (a lookup needs no length check: a key too long to store cannot be present)."""
    kind = type(key)
    if kind is str or kind is int or kind is bytes:
        return
    if kind is tuple:
        for item in key:  # type: ignore[attr-defined]
            check_key(item)
        return
    encode_key(key)


def validate_key(key: object) -> Key:
    """Return ``key`` unchanged after checking it is a supported key (see :func:`encode_key`)."""
    encode_key(key)
    return key


def decode_key(data: bytes) -> Key:
    """Inverse of :func:`encode_key`; raises ``ValueError`` on malformed input."""
    try:
        key, end = _decode(memoryview(data), 0)
    except (struct.error, IndexError, UnicodeDecodeError) as exc:
        raise ValueError(f"malformed key encoding: {exc}") from None
    if end != len(data):
        raise ValueError("malformed key encoding: trailing bytes")
    return key


def _decode(data: memoryview, pos: int) -> tuple[Key, int]:
    tag = bytes(data[pos : pos + 1])
    (length,) = struct.unpack_from("<I", data, pos + 1)
    pos += 5
    if tag == b"t":
        items = []
        for _ in range(length):
            item, pos = _decode(data, pos)
            items.append(item)
        return tuple(items), pos
    raw = bytes(data[pos : pos + length])
    if len(raw) != length:
        raise ValueError("malformed key encoding: truncated")
    pos += length
    if tag == b"s":
        return raw.decode("utf-8", "surrogatepass"), pos
    if tag == b"b":
        return raw, pos
    if tag == b"i":
        return int(raw.decode("ascii")), pos
    raise ValueError(f"malformed key encoding: unknown tag {tag!r}")
