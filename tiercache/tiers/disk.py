"""The disk tier: a zarr v3 hierarchy of chunk files on a local filesystem.

Layout under ``path``::

    zarr.json                      root group; attributes["tiercache"] = format version, compression, fingerprint
    slots/<P>/zarr.json            uint8 array of shape (2**31, P * 4096), chunks (1, P * 4096): size class P
    slots/<P>/c.<i>.0              chunk i of class P = one entry (written only by this tier); the "."
                                   chunk-key separator keeps a class's chunks in one directory

Each chunk is ``[4 KiB header | payload | zero padding]`` encoded with the array's codecs: ``bytes``,
optionally a compressor (``zstd`` via numcodecs), then ``crc32c``.  The header holds a magic, the format
version, the entry's canonical key, dtype, shape, byte count and write sequence number, so the chunk files
*are* the index: reopening scans them, and the newest valid copy of each key wins.  The payload starts at
a 4 KiB offset so direct/GPUDirect reads stay aligned.  Chunks are written to a temporary name and renamed,
so a crash leaves either the complete chunk or nothing; any damage is caught by the crc32c checksum.

The hot path encodes chunks itself (same bytes zarr would write: ``tests`` read them back through
``zarr.open_array``) to avoid zarr's per-call overhead; zarr creates the metadata.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import struct
import threading
from pathlib import Path
from typing import Iterator

import torch

from ..errors import CorruptEntryError, FingerprintMismatchError, TierIOError
from .base import EntryHeader, RecoveredEntry, Slot

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
PAGE = 4096
HEADER_BYTES = PAGE
CRC_BYTES = 4
READ_PIECE = 1 << 20  # bytes per read call when loading a chunk (checksummed piece by piece)
MAGIC = b"TIERCACH"
_FIXED = struct.Struct("<8sIIQQ")  # magic, version, meta length, seq, nbytes
SLOT_ROWS = 2**31
COMPRESSIONS = (None, "zstd")


def _crc32c():
    import crc32c  # numcodecs/zarr use the same package for the zarr v3 crc32c codec

    return crc32c.crc32c


def encode_header(header: EntryHeader) -> bytes:
    meta = json.dumps(
        {"key": header.key.hex(), "dtype": header.dtype, "shape": list(header.shape)}, separators=(",", ":")
    ).encode()
    raw = _FIXED.pack(MAGIC, FORMAT_VERSION, len(meta), header.seq, header.nbytes) + meta
    if len(raw) > HEADER_BYTES:
        raise ValueError(f"entry header of {len(raw)} bytes exceeds {HEADER_BYTES} (key or shape too long)")
    return raw + bytes(HEADER_BYTES - len(raw))


def decode_header(raw: bytes | memoryview) -> EntryHeader:
    try:
        magic, version, meta_len, seq, nbytes = _FIXED.unpack_from(raw, 0)
        if magic != MAGIC:
            raise CorruptEntryError("bad magic")
        if version != FORMAT_VERSION:
            raise CorruptEntryError(f"unsupported entry format version {version}")
        meta = json.loads(bytes(raw[_FIXED.size : _FIXED.size + meta_len]))
        return EntryHeader(bytes.fromhex(meta["key"]), meta["dtype"], tuple(meta["shape"]), nbytes, seq)
    except (struct.error, ValueError, KeyError, TypeError) as exc:
        raise CorruptEntryError(f"unreadable entry header: {exc}") from None


def class_pages(nbytes: int) -> int:
    """Pages (4 KiB) of the size class that holds a payload of ``nbytes`` plus its header."""
    return 1 + -(-nbytes // PAGE)


class DiskTier:
    """Persistent tier in a zarr v3 store at ``path`` (see the module docstring for the format).

    ``capacity`` bounds the bytes of chunk files (header, padding and checksum included).  Writes use
    POSIX I/O; a CUDA build routes GPU buffers through ``tiercache.transfer`` (kvikio) instead.
    ``fingerprint`` (any string, e.g. a model/layout hash) is recorded on creation and must match on
    reopen: a cache written for different weights is never served.
    """

    persistent = True
    device = torch.device("cpu")

    def __init__(
        self,
        path: str | os.PathLike[str],
        capacity: int,
        *,
        compression: str | None = None,
        compression_level: int = 1,
        fingerprint: str | None = None,
        name: str = "disk",
    ) -> None:
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
        self.name = name
        self.capacity = capacity
        self.root = Path(path)
        self._used = 0
        self._free_rows: dict[int, list[int]] = {}
        self._next_row: dict[int, int] = {}
        self._arrays: set[int] = set()
        self._arrays_lock = threading.Lock()
        self._slots_dir = os.path.join(os.fspath(path), "slots")  # writers create size-class arrays on first use
        self.corrupt_on_open = 0
        _ensure_writable_dir(self.root)
        self._init_group(compression, compression_level, fingerprint)
        self._crc = _crc32c()

    # -- metadata -------------------------------------------------------------------------------------
    def _init_group(self, compression: str | None, level: int, fingerprint: str | None) -> None:
        import zarr

        meta_path = self.root / "zarr.json"
        if meta_path.exists():
            group = zarr.open_group(str(self.root), mode="r+", zarr_format=3)
            attrs = dict(group.attrs).get("tiercache")
            if not isinstance(attrs, dict):
                raise ValueError(f"{self.root} holds a zarr group that is not a tiercache store")
            if attrs.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"{self.root}: unsupported tiercache format version {attrs.get('format_version')}")
            if fingerprint is not None and attrs.get("fingerprint") != fingerprint:
                raise FingerprintMismatchError(
                    f"{self.root} was written with fingerprint {attrs.get('fingerprint')!r}, not {fingerprint!r}"
                )
            # The store's own settings win on reopen: chunks already written use them.
            self.compression = attrs.get("compression")
            self.compression_level = int(attrs.get("compression_level", level))
            self.fingerprint = attrs.get("fingerprint")
        else:
            if any(p for p in self.root.iterdir() if not p.name.startswith(".")):
                raise ValueError(f"{self.root} is not empty and is not a tiercache store; use an empty directory")
            # Not mode="w": that empties the directory, deleting the facade's ``.lock`` file while it is held
            # (a second Cache would then lock a fresh file and both would write the same store).
            group = zarr.open_group(str(self.root), mode="a", zarr_format=3)
            group.attrs["tiercache"] = {
                "format_version": FORMAT_VERSION,
                "compression": compression,
                "compression_level": level,
                "fingerprint": fingerprint,
            }
            self.compression, self.compression_level, self.fingerprint = compression, level, fingerprint
        self._group = group
        self._codec = None
        if self.compression == "zstd":
            import numcodecs

            self._codec = numcodecs.Zstd(level=self.compression_level)

    def _ensure_array(self, pages: int) -> None:
        if pages in self._arrays:
            return
        with self._arrays_lock:
            if pages not in self._arrays:
                self._create_array(pages)

    def _create_array(self, pages: int) -> None:
        if not (self.root / "slots" / str(pages) / "zarr.json").exists():
            from zarr.codecs import BytesCodec, Crc32cCodec, ZstdCodec

            compressors = [ZstdCodec(level=self.compression_level, checksum=False)] if self._codec else []
            self._group.create_array(
                f"slots/{pages}", shape=(SLOT_ROWS, pages * PAGE), chunks=(1, pages * PAGE), dtype="uint8",
                serializer=BytesCodec(), compressors=[*compressors, Crc32cCodec()], filters=None,
                fill_value=0, overwrite=False,
                chunk_key_encoding={"name": "default", "separator": "."},
            )
        self._arrays.add(pages)

    def chunk_path(self, slot: Slot) -> Path:
        return Path(self._chunk_file(slot))

    def _chunk_file(self, slot: Slot) -> str:
        pages, row = slot.ref  # type: ignore[misc]
        return f"{self._slots_dir}/{pages}/c.{row}.0"

    # -- budget ---------------------------------------------------------------------------------------
    @property
    def used(self) -> int:
        return self._used

    @property
    def max_nbytes(self) -> int:
        pages = (self.capacity - CRC_BYTES) // PAGE
        return (pages - 1) * PAGE if pages >= 1 else -1

    @staticmethod
    def charge(nbytes: int) -> int:
        """Budget bytes a payload of ``nbytes`` occupies: its chunk file (header and padding pages, checksum)."""
        return class_pages(nbytes) * PAGE + CRC_BYTES

    def allocate(self, nbytes: int) -> Slot | None:
        charged = self.charge(nbytes)
        if self._used + charged > self.capacity:
            return None
        pages = class_pages(nbytes)
        rows = self._free_rows.get(pages)
        if rows:
            row = rows.pop()
        else:
            row = self._next_row.get(pages, 0)
            self._next_row[pages] = row + 1
        self._used += charged
        return Slot((pages, row), nbytes, charged)

    def free(self, slot: Slot) -> None:
        pages, row = slot.ref  # type: ignore[misc]
        self._free_rows.setdefault(pages, []).append(row)
        self._used -= slot.charged

    # -- I/O ------------------------------------------------------------------------------------------
    def write(self, slot: Slot, data: torch.Tensor, header: EntryHeader) -> None:
        pages, _ = slot.ref  # type: ignore[misc]
        payload = memoryview(data.detach().to("cpu").contiguous().numpy()).cast("B")
        if payload.nbytes != slot.nbytes:
            raise ValueError(f"payload of {payload.nbytes} bytes written to a slot of {slot.nbytes}")
        head = encode_header(header)
        pad = bytes(pages * PAGE - HEADER_BYTES - payload.nbytes)
        if self._codec is None:
            crc = self._crc(pad, self._crc(payload, self._crc(head)))
            parts: list[bytes | memoryview] = [head, payload, pad, crc.to_bytes(4, "little")]
        else:
            encoded = self._codec.encode(b"".join((head, payload, pad)))
            parts = [encoded, self._crc(encoded).to_bytes(4, "little")]
        final = self._chunk_file(slot)
        tmp = f"{final}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            self._ensure_array(pages)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                _write_all(fd, parts)
            finally:
                os.close(fd)
            os.replace(tmp, final)
        except OSError as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            reason = "the disk is full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else exc.strerror
            raise TierIOError(f"disk tier: writing {final} failed: {reason}", exc.errno) from exc

    def _read_verified(self, path: str | Path, pages: int, into: torch.Tensor | None = None) -> torch.Tensor:
        """The decoded chunk (header + payload + padding) as a uint8 tensor, after checking its size and
        checksum.  Uncompressed chunks are read into ``into`` when given (a 1-D contiguous uint8 CPU
        tensor of at least the file's size, e.g. pinned staging memory) and returned as a view of it;
        otherwise into a fresh tensor."""
        try:
            with open(path, "rb", buffering=0) as f:
                size = os.fstat(f.fileno()).st_size
                if size < CRC_BYTES or (self._codec is None and size != pages * PAGE + CRC_BYTES):
                    raise CorruptEntryError(f"{path} has the wrong size ({size} bytes): truncated or overwritten")
                if into is not None and self._codec is None:
                    if into.numel() < size:
                        raise ValueError(f"the read buffer holds {into.numel()} bytes, {path} needs {size}")
                    buffer = into[:size]
                else:
                    buffer = torch.empty(size, dtype=torch.uint8)
                view = memoryview(buffer.numpy())
                # Checksum each piece as it arrives: the pass runs while the kernel reads ahead, and on
                # the bytes while they are still in the CPU cache.
                body_len, crc, got = size - CRC_BYTES, 0, 0
                while got < size:
                    left = size - got  # a small remainder rides with the last piece: one call fewer
                    n = f.readinto(view[got : got + (left if left <= 2 * READ_PIECE else READ_PIECE)])
                    if not n:
                        raise CorruptEntryError(f"{path} shrank while being read")
                    if got < body_len:
                        crc = self._crc(view[got : min(got + n, body_len)], crc)
                    got += n
        except FileNotFoundError:
            raise CorruptEntryError(f"{path} is missing") from None
        body = view[:-CRC_BYTES]
        if crc != int.from_bytes(view[-CRC_BYTES:], "little"):
            raise CorruptEntryError(f"{path} failed its crc32c checksum")
        if self._codec is None:
            return buffer[:-CRC_BYTES]
        try:
            decoded = self._codec.decode(body)
        except Exception as exc:  # a checksum collision on garbage: still never return it
            raise CorruptEntryError(f"{path} does not decompress: {exc}") from None
        out = torch.frombuffer(bytearray(decoded), dtype=torch.uint8)
        if out.numel() != pages * PAGE:
            raise CorruptEntryError(f"{path} decodes to {out.numel()} bytes, expected {pages * PAGE}")
        return out

    def read(self, slot: Slot, header: EntryHeader, into: torch.Tensor | None = None) -> torch.Tensor:
        """The verified payload.  With ``into`` (1-D contiguous uint8 CPU, at least
        :meth:`chunk_bytes` long) the result is a view of ``into``: an uncompressed chunk is read straight
        into it, a compressed one is decoded and copied there."""
        pages, _ = slot.ref  # type: ignore[misc]
        path = self._chunk_file(slot)
        if into is not None and (
            into.device.type != "cpu" or into.dtype != torch.uint8 or into.dim() != 1 or not into.is_contiguous()
        ):
            raise ValueError("the read buffer must be a 1-D contiguous uint8 CPU tensor")
        body = self._read_verified(path, pages, into)
        stored = decode_header(memoryview(body[:HEADER_BYTES].numpy()))
        if stored.key != header.key or stored.seq != header.seq or stored.nbytes != slot.nbytes:
            raise CorruptEntryError(f"{path} holds another entry than the index expects")
        payload = body[HEADER_BYTES : HEADER_BYTES + slot.nbytes]
        if into is None or self._codec is None:
            return payload
        if into.numel() < slot.nbytes:
            raise ValueError(f"the read buffer holds {into.numel()} bytes, the payload needs {slot.nbytes}")
        into[: slot.nbytes].copy_(payload)
        return into[: slot.nbytes]

    @staticmethod
    def chunk_bytes(slot: Slot) -> int:
        """Size of the uncompressed chunk file of ``slot``: header page, payload pages, crc32c."""
        pages, _ = slot.ref  # type: ignore[misc]
        return int(pages) * PAGE + CRC_BYTES

    def discard(self, slot: Slot) -> None:
        path = self._chunk_file(slot)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise TierIOError(f"disk tier: deleting {path} failed: {exc.strerror}", exc.errno) from exc

    def recover(self) -> Iterator[RecoveredEntry]:
        """Scan chunk files; yield the newest valid copy of each key, delete stale and damaged ones.

        Uncompressed chunks are checked by size and header here and by checksum when read; compressed
        ones are fully verified here (their header is inside the compressed stream)."""
        slots_dir = self.root / "slots"
        if not slots_dir.is_dir():
            return
        found: list[RecoveredEntry] = []
        for class_dir in sorted(slots_dir.iterdir()):
            if not class_dir.name.isdigit() or not (class_dir / "zarr.json").exists():
                continue
            pages = int(class_dir.name)
            self._arrays.add(pages)
            rows = []
            for child in class_dir.iterdir():
                parts = child.name.split(".")
                if child.name.endswith(".tmp"):
                    child.unlink(missing_ok=True)  # a write that never reached its rename
                elif len(parts) == 3 and parts[0] == "c" and parts[1].isdigit() and parts[2] == "0":
                    rows.append(int(parts[1]))
            rows.sort()
            self._next_row[pages] = (rows[-1] + 1) if rows else 0
            for row in rows:
                path = class_dir / f"c.{row}.0"
                if not path.exists():
                    continue
                try:
                    header = self._scan_header(path, pages)
                except CorruptEntryError as exc:
                    self._drop_damaged(path, exc)
                    continue
                found.append(RecoveredEntry(header, Slot((pages, row), header.nbytes, pages * PAGE + CRC_BYTES)))
        # The newest copy of a key wins, but only once its checksum is verified: a damaged header naming
        # another key must not cost that key its good copy.
        best: dict[bytes, RecoveredEntry] = {}
        verified: set[bytes] = set()  # keys whose winning copy passed a full checksum check
        for entry in sorted(found, key=lambda e: e.header.seq, reverse=True):
            if entry.header.key not in best:
                best[entry.header.key] = entry
                continue
            winner = best[entry.header.key]
            if self._codec is None and entry.header.key not in verified:
                try:
                    self._read_verified(self.chunk_path(winner.slot), winner.slot.ref[0])  # type: ignore[index]
                    verified.add(entry.header.key)
                except CorruptEntryError as exc:
                    self._drop_damaged(self.chunk_path(winner.slot), exc)
                    best[entry.header.key] = entry
                    continue
            self.chunk_path(entry.slot).unlink(missing_ok=True)  # an older, superseded copy
        occupied: dict[int, set[int]] = {}
        for entry in best.values():
            pages, row = entry.slot.ref  # type: ignore[misc]
            occupied.setdefault(pages, set()).add(row)
        for pages, next_row in self._next_row.items():
            rows_used = occupied.get(pages, set())
            self._free_rows[pages] = [r for r in range(next_row) if r not in rows_used]
        for entry in best.values():
            self._used += entry.slot.charged
            yield entry

    def _drop_damaged(self, path: Path, exc: Exception) -> None:
        log.warning("tiercache: dropping damaged chunk %s: %s", path, exc)
        self.corrupt_on_open += 1
        path.unlink(missing_ok=True)

    def _scan_header(self, path: Path, pages: int) -> EntryHeader:
        if self._codec is not None:
            return decode_header(memoryview(self._read_verified(path, pages)[:HEADER_BYTES].numpy()))
        if path.stat().st_size != pages * PAGE + CRC_BYTES:
            raise CorruptEntryError("wrong size: truncated or overwritten")
        with open(path, "rb") as f:
            header = decode_header(f.read(HEADER_BYTES))
        if class_pages(header.nbytes) != pages:
            raise CorruptEntryError("header size does not match its size class")
        return header

    def close(self) -> None:
        os.sync()  # a clean close is durable across power loss, not only process death


def _write_all(fd: int, parts: list[bytes | memoryview]) -> None:
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    while views:
        written = os.writev(fd, views[:1024])
        while written and views:
            if written >= views[0].nbytes:
                written -= views[0].nbytes
                views.pop(0)
            else:
                views[0] = views[0][written:]
                written = 0


def _ensure_writable_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ValueError(f"disk path {path} exists and is not a directory") from None
    except OSError as exc:
        raise ValueError(f"cannot create disk path {path}: {exc.strerror}") from None
    if not path.is_dir():
        raise ValueError(f"disk path {path} is not a directory")
    probe = path / f".tiercache-write-probe.{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ValueError(f"disk path {path} is not writable: {exc.strerror}") from None
