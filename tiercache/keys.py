"""Cache keys: validation and a stable, process-independent byte encoding.

A key is a ``str``, ``bytes``, ``int`` or a tuple of keys (nesting allowed) — of exactly those types:
subclasses (``bool``, ``IntEnum`` members, ``str`` subclasses, ``namedtuple``s) are refused, because a
persisted key must come back after a restart as an equal key of the *same* type.  The encoding is
canonical (equal keys encode equally) and never uses Python's salted ``hash()``, so keys persisted by one
process are found by another.
"""

from __future__ import annotations

import struct
from typing import Hashable, TypeAlias

Key: TypeAlias = Hashable
MAX_KEY_BYTES = 2048
MAX_DIMS = 64  # most tensor dimensions an entry may have (the disk header holds this many)


_U32 = struct.Struct("<I")
MAX_DEPTH = 32  # most tuples a key may nest inside the outermost


def _int_text(key: int) -> bytes:
    """The decimal text of an int key.  Python refuses to make one of more than 4300 digits (``ValueError``
    about integer string conversion): such a key is too long to store anyway, and says so."""
    try:
        return str(key).encode("ascii")
    except ValueError:
        raise ValueError(f"key is too long: an int of {key.bit_length()} bits, more than {MAX_KEY_BYTES} digits; "
                         f"the limit is {MAX_KEY_BYTES} encoded bytes") from None


def _refuse(key: object) -> TypeError:
    kind = type(key)
    name = f"{kind.__module__}.{kind.__qualname__}" if kind.__module__ != "builtins" else kind.__name__
    if isinstance(key, bool):
        return TypeError("bool is not a supported key type (ambiguous with int); use an int or a str")
    for base, convert in ((int, "int(key)"), (str, "str(key)"), (bytes, "bytes(key)"), (tuple, "tuple(key)")):
        if isinstance(key, base):
            return TypeError(
                f"key type {name} is a subclass of {base.__name__}; only exact str, bytes, int and tuple keys "
                f"are accepted (a subclass would not come back as itself after a restart): pass {convert}"
            )
    return TypeError(f"unsupported key type {name}: keys are str, bytes, int or tuples of those")


def _encode(key: object, out: bytearray, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise TypeError(f"key nesting is deeper than {MAX_DEPTH} tuples")
    kind = type(key)
    if kind is str:
        data = key.encode("utf-8", "surrogatepass")  # type: ignore[attr-defined]
        out += b"s" + struct.pack("<I", len(data)) + data
    elif kind is bytes:
        out += b"b" + struct.pack("<I", len(key)) + key  # type: ignore[arg-type, operator]
    elif kind is int:
        text = _int_text(key)  # type: ignore[arg-type]
        out += b"i" + struct.pack("<I", len(text)) + text
    elif kind is tuple:
        out += b"t" + struct.pack("<I", len(key))  # type: ignore[arg-type]
        for item in key:  # type: ignore[attr-defined]
            _encode(item, out, depth + 1)
    else:
        raise _refuse(key)


def encode_key(key: object) -> bytes:
    """Canonical bytes for ``key``; raises ``TypeError`` for unsupported key types and ``ValueError`` when
    the encoding exceeds :data:`MAX_KEY_BYTES` (keys are stored in a fixed-size on-disk header)."""
    kind = type(key)
    if kind is int or kind is str:  # the common keys, without building a bytearray
        try:
            data = str(key).encode("ascii") if kind is int else key.encode("utf-8", "surrogatepass")  # type: ignore[attr-defined]
        except ValueError:
            if kind is int:
                _int_text(key)  # type: ignore[arg-type]  # raises: too long
            raise
        if len(data) + 5 <= MAX_KEY_BYTES:
            return (b"i" if kind is int else b"s") + _U32.pack(len(data)) + data
    out = bytearray()
    _encode(key, out, 0)
    if len(out) > MAX_KEY_BYTES:
        raise ValueError(f"key is too long: {len(out)} encoded bytes, the limit is {MAX_KEY_BYTES}")
    return bytes(out)


def check_key(key: object, _depth: int = 0) -> None:
    """Raise as :func:`encode_key` would for an unsupported key type or a nesting deeper than
    :data:`MAX_DEPTH` tuples (``TypeError``), without encoding the common cases (a lookup needs no length
    check: a key too long to store cannot be present)."""
    kind = type(key)
    if kind is str or kind is int or kind is bytes:
        return
    if kind is tuple:
        if _depth > MAX_DEPTH:  # (as _encode counts: the outermost tuple is depth 0)
            raise TypeError(f"key nesting is deeper than {MAX_DEPTH} tuples")
        for item in key:  # type: ignore[attr-defined]
            check_key(item, _depth + 1)
        return
    raise _refuse(key)


def validate_key(key: object) -> Key:
    """Return ``key`` unchanged after checking it is a supported key (see :func:`encode_key`)."""
    encode_key(key)
    return key


_LENGTH = struct.Struct("<I")
_S, _B, _I, _T = b"sbit"  # tag bytes as ints


def decode_key(data: bytes) -> Key:
    """Inverse of :func:`encode_key`; raises ``ValueError`` on malformed input."""
    data = bytes(data)
    try:
        key, end = _decode(data, 0)
    except (struct.error, IndexError, UnicodeDecodeError) as exc:
        raise ValueError(f"malformed key encoding: {exc}") from None
    if end != len(data):
        raise ValueError("malformed key encoding: trailing bytes")
    return key


def _decode(data: bytes, pos: int) -> tuple[Key, int]:
    tag = data[pos]
    (length,) = _LENGTH.unpack_from(data, pos + 1)
    pos += 5
    if tag == _T:
        items = []
        for _ in range(length):
            item, pos = _decode(data, pos)
            items.append(item)
        return tuple(items), pos
    end = pos + length
    if end > len(data):
        raise ValueError("malformed key encoding: truncated")
    if tag == _S:
        return data[pos:end].decode("utf-8", "surrogatepass"), end
    if tag == _B:
        return data[pos:end], end
    if tag == _I:
        text = data[pos:end]
        if not text or not text.lstrip(b"-").isdigit() or text.startswith(b"+"):
            raise ValueError(f"malformed key encoding: bad int {text[:20]!r}")
        return int(text), end
    raise ValueError(f"malformed key encoding: unknown tag {bytes([tag])!r}")
