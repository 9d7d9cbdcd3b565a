"""The disk tier's two small side files in the store root (contract C7 allows them):

``index.tc`` — a checkpoint of every live entry, written at a clean close and removed (durably) before the
first change after an open, so it exists only while it matches the chunk files.  Reopen loads it instead
of reading every chunk header; a missing, stale (a size-class directory changed since) or damaged index
falls back to the full scan.  Layout (little-endian), followed by a crc32c of everything before it::

    "TCINDEX3" | seq_high_water u64 | classes u32 | forms u32 | entries u64 | key blob bytes u64
    | classes x (pages u32, dir mtime_ns u64, its zarr.json's mtime_ns u64)
    | forms x (nbytes u64, ndim u8, dtype_len u8, dtype name, shape ndim x u64)
    | pages u32[entries] | row u32[entries] | seq u64[entries] | form u32[entries] | key end u64[entries]
    | key blob

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
_INDEX_MAGIC = b"TCINDEX3"
_INDEX_HEAD = struct.Struct("<8sQIIQQ")  # magic, seq high-water, classes, forms, entries, key blob bytes
_CLASS = struct.Struct("<IQQ")  # pages, dir mtime_ns, zarr.json mtime_ns
_FORM = struct.Struct("<QBB")  # nbytes, ndim, dtype_len; then dtype name, shape
_TOMB = struct.Struct("<IIQ")
_TOMB_BYTES = _TOMB.size + 4

Crc = Callable[..., int]


def fast_constructor(cls: type) -> Callable[..., object]:
    """A positional constructor for a frozen ``slots=True`` dataclass that stores the fields through their
    slot descriptors: the dataclass ``__init__`` routes every field through ``object.__setattr__`` (frozen),
    which is about half the cost of loading 1e5 index entries.  Generated like dataclasses generate their
    own ``__init__``.  Only for values already validated."""
    names = list(cls.__dataclass_fields__)  # type: ignore[attr-defined]
    namespace: dict[str, object] = {"new": object.__new__, "cls": cls}
    namespace.update({f"set{i}": cls.__dict__[name].__set__ for i, name in enumerate(names)})
    args = ", ".join(f"v{i}" for i in range(len(names)))
    body = "".join(f"    set{i}(obj, v{i})\n" for i in range(len(names)))
    exec(f"def make({args}):\n    obj = new(cls)\n{body}    return obj\n", namespace)
    return namespace["make"]  # type: ignore[return-value]


_new_header = fast_constructor(EntryHeader)
new_header = _new_header


@dataclass
class LoadedIndex:
    """A decoded index, column-wise: entry ``i`` is in slot ``(pages[i], rows[i])`` with key
    ``blob[starts[i]:ends[i]]``, sequence number ``seqs[i]`` and form ``forms[form_ids[i]]`` (dtype, shape,
    nbytes); :attr:`headers` builds their headers (the disk tier builds them along with its
    entries, in one pass).  ``int_keys[i]`` is the key decoded when it is an int key of at most 18 digits
    (see :func:`plain_int_keys`), else -1: the key must be decoded from its bytes."""

    seq_high_water: int
    class_mtimes: dict[int, tuple[int, int]]
    pages: list[int]
    rows: list[int]
    forms: list[tuple[str, tuple[int, ...], int]]
    form_ids: list[int]
    seqs: list[int]
    starts: list[int]
    ends: list[int]
    blob: bytes
    int_keys: list[int] | None = None  # per entry: its int key when the encoding is a plain one, else -1


    def header(self, i: int) -> EntryHeader:
        """Entry ``i``'s header."""
        return _new_header(self.blob[self.starts[i] : self.ends[i]], *self.forms[self.form_ids[i]], self.seqs[i])

    @property
    def headers(self) -> list[EntryHeader]:
        blob, forms, make = self.blob, self.forms, _new_header
        return [make(blob[a:b], *forms[f], s) for a, b, f, s in zip(self.starts, self.ends, self.form_ids, self.seqs)]


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
    """Column-wise, so that loading is a few array conversions plus one loop that builds the headers:
    forms (distinct ``(dtype, shape, nbytes)``), then per entry pages u32, row u32, seq u64, form u32 and
    key end offset u64 (into the key blob), then the key blob."""
    items = list(entries)
    forms: dict[tuple[str, tuple[int, ...], int], int] = {}
    form_ids = []
    for _, _, h in items:
        form = (h.dtype, h.shape, h.nbytes)
        fid = forms.get(form)
        if fid is None:
            fid = forms[form] = len(forms)
        form_ids.append(fid)
    keys = b"".join(h.key for _, _, h in items)
    ends, end = [], 0
    for _, _, h in items:
        end += len(h.key)
        ends.append(end)
    n = len(items)
    parts = [_INDEX_HEAD.pack(_INDEX_MAGIC, seq_high_water, len(class_mtimes), len(forms), n, len(keys))]
    parts += [_CLASS.pack(p, *m) for p, m in sorted(class_mtimes.items())]
    for dtype, shape, nbytes in forms:
        name = dtype.encode("ascii")
        parts += [_FORM.pack(nbytes, len(shape), len(name)), name, struct.pack(f"<{len(shape)}Q", *shape)]
    parts += [
        struct.pack(f"<{n}I", *(p for p, _, _ in items)),
        struct.pack(f"<{n}I", *(r for _, r, _ in items)),
        struct.pack(f"<{n}Q", *(h.seq for _, _, h in items)),
        struct.pack(f"<{n}I", *form_ids),
        struct.pack(f"<{n}Q", *ends),
        keys,
    ]
    body = b"".join(parts)
    return body + crc(body).to_bytes(4, "little")


def decode_index(raw: bytes, crc: Crc) -> LoadedIndex:
    """Parse an index file; ``CorruptEntryError`` when it is damaged in any way (every form is validated
    with :func:`check_header`)."""
    import numpy as np

    if len(raw) < _INDEX_HEAD.size + 4 or crc(memoryview(raw)[:-4]) != int.from_bytes(raw[-4:], "little"):
        raise CorruptEntryError("index checksum mismatch or truncated")
    try:
        magic, high, n_classes, n_forms, n, key_bytes = _INDEX_HEAD.unpack_from(raw, 0)
        if magic != _INDEX_MAGIC:
            raise CorruptEntryError("bad index magic")
        pos = _INDEX_HEAD.size
        mtimes = {}
        for _ in range(n_classes):
            pages, dir_mtime, meta_mtime = _CLASS.unpack_from(raw, pos)
            mtimes[pages] = (dir_mtime, meta_mtime)
            pos += _CLASS.size
        forms = []
        for _ in range(n_forms):
            nbytes, ndim, dtype_len = _FORM.unpack_from(raw, pos)
            pos += _FORM.size
            dtype = raw[pos : pos + dtype_len].decode("ascii")
            pos += dtype_len
            shape = struct.unpack_from(f"<{ndim}Q", raw, pos)
            pos += 8 * ndim
            check_header(EntryHeader(b"", dtype, shape, nbytes, 0))
            forms.append((dtype, shape, nbytes))
        if pos + n * 28 + key_bytes != len(raw) - 4:
            raise CorruptEntryError("index size does not match its entry count")

        def column(dtype: str, width: int) -> list[int]:
            nonlocal pos
            out = np.frombuffer(raw, dtype=dtype, count=n, offset=pos)
            pos += n * width
            return out

        pages_col, rows_col = column("<u4", 4), column("<u4", 4)
        seqs, form_col, ends = column("<u8", 8), column("<u4", 4), column("<u8", 8)
        if n and (int(form_col.max()) >= n_forms or int(ends[-1]) != key_bytes or bool((np.diff(ends) < 0).any())):
            raise CorruptEntryError("index columns are inconsistent")
        blob = raw[pos : pos + key_bytes]
        ends_list = ends.tolist()
        return LoadedIndex(high, mtimes, pages_col.tolist(), rows_col.tolist(), forms, form_col.tolist(),
                           seqs.tolist(), [0, *ends_list[:-1]], ends_list, blob,
                           plain_int_keys(np.frombuffer(raw, np.uint8, key_bytes, pos), ends))
    except (struct.error, ValueError) as exc:
        raise CorruptEntryError(f"unreadable index: {exc}") from None


_MAX_DIGITS = 18  # every int of at most 18 decimal digits fits an int64


def plain_int_keys(blob, ends) -> list[int]:
    """Per key of the index's key blob (uint8 array ``blob``, keys ending at ``ends``): its int key when its
    encoding is ``b"i" | u32 length | 1 to 18 ASCII digits`` with the length right, decoded with numpy
    (the value ``decode_key`` gives it: leading zeros are read as ``int`` reads them), else -1 (a key
    these cannot be is decoded one by one: another type, a negative int, more digits, a malformed one).
    A reopen of 1e5 int keys spends a few milliseconds here instead of a slice, a length check, an
    ``isdigit`` and an ``int`` per key."""
    import numpy as np

    n = len(ends)
    if not n:
        return []
    ends = ends.astype(np.int64)
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1]
    digits = ends - starts - 5
    out = np.full(n, -1, dtype=np.int64)
    cand = np.nonzero((digits >= 1) & (digits <= _MAX_DIGITS))[0]
    if not len(cand):
        return out.tolist()
    at, digits = starts[cand], digits[cand]
    b, last = blob, len(blob) - 1
    length = (b[at + 1].astype(np.int64) | (b[at + 2].astype(np.int64) << 8) | (b[at + 3].astype(np.int64) << 16)
              | (b[at + 4].astype(np.int64) << 24))
    good = (b[at] == ord("i")) & (length == digits)
    values = np.zeros(len(cand), dtype=np.int64)
    for column in range(int(digits.max())):  # digit by digit (Horner), over every candidate at once
        inside = column < digits
        digit = b[np.minimum(at + (5 + column), last)] - np.uint8(ord("0"))  # uint8: a non-digit wraps past 9
        good &= (digit <= 9) | ~inside
        values = np.where(inside, values * 10 + digit, values)
    out[cand[good]] = values[good]
    return out.tolist()


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
