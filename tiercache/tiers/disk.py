"""The disk tier: a zarr v3 hierarchy of chunk files on a local filesystem.

Layout under ``path``::

    zarr.json                      root group; attributes["tiercache"] = format version, compression, fingerprint
    slots/<P>/zarr.json            uint8 array of shape (2**31, P * 4096), chunks (1, P * 4096): size class P
    slots/<P>/c.<i>.0              chunk i of class P = one entry (written only by this tier); the "."
                                   chunk-key separator keeps a class's chunks in one directory
    index.tc, tombstones.tc        the persisted index and the delete journal (``disk_journal``)
    .lock                          the facade's path lock

Each chunk is ``[4 KiB header | payload | zero padding]`` encoded with the array's codecs: ``bytes``,
optionally a compressor (``zstd`` via numcodecs), then ``crc32c``.  The header (``disk_format``) holds the
entry's canonical key, dtype, shape, byte count and write sequence number, so the chunk files *are* the
index: a reopen without a valid ``index.tc`` scans them, and the newest valid copy of each key wins.  The
payload starts at a 4 KiB offset so direct/GPUDirect reads stay aligned.  Chunks are written to a temporary
name and renamed, so a crash leaves either the complete chunk or nothing; any damage is caught by the
crc32c checksum, and a header that contradicts itself counts as damage.

The store is created by one atomic rename of a complete root ``zarr.json``; a folder left by a creation
that was killed before it (our ``.lock`` plus temporary files, or zarr's ``*.partial`` files, or a root
group without our attributes, and no ``slots/``) holds no entries and is finished on the next open.

The hot path encodes chunks itself (the same bytes zarr would write: tests read them back through
``zarr.open_array``) and writes the zarr metadata documents itself.
"""

from __future__ import annotations

import ctypes
import errno
import gc
import itertools
import json
import logging
import mmap
import operator
import os
import queue
import struct
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from ..errors import CorruptEntryError, FingerprintMismatchError, OverBudgetError, TierIOError
from . import disk_journal as journal
from .base import EntryHeader, RecoveredEntry, Slot
from .disk_fds import FdCache
from .disk_format import (
    CRC_BYTES,
    FORMAT_VERSION,
    HEADER_BYTES,
    MIN_SECTOR_SHIFT,
    PAGE,
    READABLE_VERSIONS,
    SLOT_ROWS,
    array_metadata,
    array_metadata_ok,
    chunk_name,
    class_pages,
    decode_header,
    encode_header,
    group_metadata,
    header_prefix,
    parse_chunk_name,
    sector_block,
    sector_shift_for,
    sector_table,
)
from .memory import memmove_holding_gil

__all__ = [
    "DiskTier", "DiskOverBudgetError", "RecoveredColumns", "FORMAT_VERSION", "PAGE", "HEADER_BYTES", "CRC_BYTES",
    "SLOT_ROWS", "byte_parts", "class_pages", "decode_header", "dio_aligned", "encode_header", "prepare_store_dir",
]

log = logging.getLogger(__name__)

COMPRESSIONS = (None, "zstd")
# A payload of at least PIPELINE_BYTES is read in PIPELINE_PIECE pieces, each checksummed while it is
# still in the CPU cache: one read then one crc pass fetches every byte from memory twice (16 MiB warm
# verified reads, same run on a loaded 2-core box: 0.36-0.50 of raw readinto in one pass, 0.49-0.65 in pieces).
PIPELINE_BYTES = 2 << 20
PIPELINE_PIECE = 1 << 20
# A single read_into of a payload of at most SMALL_READ_BYTES into a contiguous tensor reads the whole chunk
# into a per-thread buffer (one read, one checksum pass) and copies the payload out with one memmove: for a
# 4 KiB value, building byte views of the caller's tensor costs several times the extra copy.
SMALL_READ_BYTES = 16 << 10
_SMALL_PAGES = class_pages(SMALL_READ_BYTES)  # the largest size class whose chunk fits the buffer
# read_into spreads a batch over its threads only with at least this many bytes per thread: below it, the
# hand-offs cost more than the reads they overlap.
MIN_BYTES_PER_THREAD = 256 << 10
# ... and a batch of buffered, uncompressed reads (page-cache copies and checksums, tens of microseconds per
# 384 KiB entry) only with at least this many: a pool thread's hand-off and the GIL passes between the readers
# cost about as much as reading a 1 MiB batch alone.  Exact decode's warm layer of 3 x 384 KiB blocks (SmolLM2,
# 1K context; 16 layers per step, 2-core box under load, interleaved): split over two threads 3.3 ms wall and
# 4.1-4.2 ms CPU per step, read on the calling thread 2.7-3.1 ms wall and 2.7-3.1 ms CPU; batches of 2 MiB and
# more (two layers read ahead together, 2K context) were still split, where the second thread shortened the wall
# (a split that SPLIT_BUFFERED, below, now leaves off).
MIN_BUFFERED_BYTES_PER_THREAD = 1 << 20
# Whether a batch of buffered, uncompressed reads is spread over the pool at all (by the rule above).  Off: its
# checksums and its Python hold the GIL, so two readers only take turns (CPU time equal to wall time in every
# run of docs/benchmarks.md's "Row 2 warm fetch at 4K (2026-12-08, helper warm9)", at loads of 0.9-1.9), and the
# hand-offs and GIL passes made a 4K step's warm fetch 1-5 ms slower (SmolLM2, 28 disk layers, 408 x 384 KiB).
SPLIT_BUFFERED = False
# Direct (O_DIRECT) reads sleep in the kernel until the device answers, so more of them in flight than
# CPUs helps: random 56 KiB O_DIRECT preadv of one file on this project's 2-CPU box measured 0.38-0.39 GiB/s
# with one thread, 0.79-0.83 with 4, 0.95-1.27 with 8 and 1.22-1.43 with 16 (2026-12-05, other jobs running).
# read_into's pool for direct reads has at least this many threads (``direct_read_threads``' default).
DIRECT_READ_THREADS = 8
# With DIRECT_CHECK_APART, a direct read_into spread over pool threads splits reading from checking: the pool
# threads only issue the O_DIRECT preadv s (the GIL released), back to back, and the calling thread checks
# each chunk (size, crc32c, header) as its read completes, so no read waits behind a checksum.  Opt-in: see
# docs/benchmarks.md, "Direct reads apart from their checks" (2026-12-07, helper diskloop).
DIRECT_CHECK_APART = False
# The default sector of a version-3 entry (``sector_bytes``): a ranged read reads and verifies whole sectors.
DEFAULT_SECTOR_BYTES = 64 << 10
_CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
MIN_CAPACITY = PAGE + CRC_BYTES  # the smallest entry: an empty value's header page and checksum
_spare = [0.0, 0]  # [when last checked, idle CPUs then]
# How a read names damage (after the chunk's path), the same on every read path.
BAD_CRC = "failed its crc32c checksum"
OTHER_ENTRY = "holds another entry than the index expects"


def _wrong_size(got: int) -> str:
    return f"has the wrong size ({got} bytes read): truncated or overwritten"


def spare_cpus() -> int:
    """CPUs that other runnable work leaves idle, by the 1-minute load average (checked at most twice a
    second): ``round(CPUs - load)``, at least 0.  A buffered :meth:`DiskTier.read_into` reads on the
    calling thread plus at most this many pool threads: its reads are CPU work (page-cache copies and
    checksums), so a pool thread beyond the idle CPUs only takes a core from another thread, such as
    the model a read ahead overlaps (30 layers of 64 48-KiB blocks read a layer ahead beside a Python +
    torch loop, 2-core box under load: 195 ms of background read time per step with a second reader
    thread, 63 ms without).  The
    caller itself counts in the load while it runs, so an otherwise idle 2-CPU machine reads with two
    threads."""
    now = time.monotonic()
    if now - _spare[0] > 0.5:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):  # no load average on this platform: assume the CPUs are shared
            load = float(_CPUS)
        _spare[0], _spare[1] = now, max(0, int(_CPUS - load + 0.5))
    return _spare[1]


@dataclass
class RecoveredColumns:
    """The entries of a store whose index was loaded, column-wise (:meth:`DiskTier.recover_columns`):
    entry ``i`` has key encoding ``keys[i]``, header form ``forms[form_ids[i]]`` = ``(dtype, shape,
    nbytes)`` (each form validated with ``check_header`` when the index was read), sequence number
    ``seqs[i]`` and slot ``slots[i]``.  What :meth:`DiskTier.recover` yields, without one header object and
    one ``RecoveredEntry`` per entry.  ``int_keys[i]``, when given, is ``keys[i]`` decoded when it encodes
    an int key of at most 18 digits, else -1 (decode ``keys[i]``): see ``disk_journal.plain_int_keys``."""

    keys: list[bytes]
    forms: list[tuple[str, tuple[int, ...], int]]
    form_ids: list[int]
    seqs: list[int]
    slots: list[Slot]
    int_keys: list[int] | None = None


class DiskOverBudgetError(OverBudgetError):
    """A store was reopened with a disk budget smaller than the bytes it holds.  Nothing was changed or
    deleted: reopen with ``disk`` of at least ``stored`` bytes (then delete entries to shrink it)."""

    def __init__(self, path: object, stored: int, budget: int) -> None:
        super().__init__(
            f"{path} holds {stored} bytes of entries, more than the disk budget of {budget} bytes asked for; "
            f"reopen with disk >= {stored} (and delete entries to shrink it): a smaller budget never deletes data",
            stored, budget,
        )


def _crc32c():
    import crc32c  # numcodecs/zarr use the same package for the zarr v3 crc32c codec

    return crc32c.crc32c


def _bytes_at(tensor: torch.Tensor, nbytes: int, address: int | None = None, span: int | None = None) -> memoryview:
    """A writable byte view of the ``nbytes`` of memory starting at ``tensor``'s first element (or of the
    ``span`` bytes at ``address``, memory that ``tensor`` keeps alive); the view keeps ``tensor`` (so its
    memory) alive.  About a fifth of the cost of ``memoryview(t.numpy())`` with the dtype and shape views
    that needs: it runs once per entry of a read."""
    if address is not None:
        raw = (ctypes.c_char * span).from_address(address)  # type: ignore[operator]
        raw.keepalive = tensor  # type: ignore[attr-defined]
        return memoryview(raw).cast("B")
    raw = (_CHAR_ARRAYS.get(nbytes) or _char_array(nbytes)).from_address(tensor.data_ptr())
    raw.keepalive = tensor  # type: ignore[attr-defined]
    return memoryview(raw).cast("B")


def byte_parts(out: torch.Tensor, nbytes: int, index: int = 0) -> list[memoryview]:
    """Writable byte views of ``out``'s memory in element order, for a vectored read of ``nbytes``.

    ``out`` is a CPU tensor of exactly ``nbytes`` bytes: 1-D contiguous uint8 (one view, the common case),
    any contiguous tensor (one view), or any tensor whose last dimension is contiguous, e.g. the block
    ``buf[:, :, j * B:(j + 1) * B]`` of a ``(batch, heads, tokens, head_dim)`` buffer (one view per run of
    contiguous memory: ``batch * heads`` here).  ``ValueError`` naming item ``index`` otherwise.  The
    views keep ``out`` alive."""
    if not out.is_cpu:
        raise ValueError(f"read_into item {index}: out must be a CPU tensor, not on {out.device}")
    size = out.element_size()
    if out.numel() * size != nbytes:
        raise ValueError(f"read_into item {index}: out holds {out.numel() * size} bytes, the payload is {nbytes}")
    if not nbytes:
        return []
    if out.is_contiguous():
        return [_bytes_at(out, nbytes)]
    strides = out.stride()
    layout = _RUNS.get((out.shape, strides, size))
    if layout is None:
        layout = _runs(out.shape, strides, size, index)
    span, inner, offsets = layout
    whole = _bytes_at(out, span)
    return [whole[o : o + inner] for o in offsets]


#: ``(shape, strides, itemsize) -> (span, run bytes, run offsets)`` of the strided destinations seen
#: (a decode reads many block slices of one geometry), so that each read only slices one byte view.
_RUNS: dict[tuple, tuple[int, int, list[int]]] = {}


def _runs(shape: torch.Size, strides: tuple[int, ...], size: int, index: int) -> tuple[int, int, list[int]]:
    """The contiguous runs of a tensor of ``shape``/``strides`` (elements of ``size`` bytes) in element
    order, as :func:`byte_parts` reads them: ``(bytes from the first element to the end of the last run,
    bytes per run, each run's offset)``."""
    if strides[-1] != 1:
        raise ValueError(f"read_into item {index}: out's last dimension must be contiguous (stride 1)")
    k, inner = len(shape) - 1, shape[-1] * size  # trailing dimensions that continue a run merge into it
    while k > 0 and (strides[k - 1] * size == inner or shape[k - 1] == 1):
        inner *= shape[k - 1]
        k -= 1
    offsets = [0]
    for dim in range(k):
        n, step = shape[dim], strides[dim] * size
        if n != 1:
            offsets = [o + j * step for o in offsets for j in range(n)]
    if len(_RUNS) >= 256:
        _RUNS.clear()
    layout = _RUNS[(shape, strides, size)] = (max(offsets) + inner, inner, offsets)
    return layout


def batch_parts(
    items: Sequence[tuple[Slot, EntryHeader, torch.Tensor]], direct: bool, align: int, mem_align: int
) -> tuple[list[list[memoryview]], list[bool]]:
    """``([byte_parts(out, slot.nbytes, i) ...], [direct and dio_aligned(out, ...) ...])`` for every item of a
    :meth:`DiskTier.read_into` batch, computed once per batch where it can be: when the outs share one
    strided geometry (the block slices of a decode buffer), the runs and the alignment of that geometry are
    worked out once, and each item's parts are slices of one byte view of its storage at the item's address
    (one view per run of outs in one storage, e.g. the keys' buffer then the values'; each item is checked
    to lie inside it, so every view is of memory the out that made the view keeps alive).  Any other batch
    takes :func:`byte_parts` / :func:`dio_aligned` item by item (same results, same ``ValueError`` s)."""
    n = len(items)
    if PARTS_CACHE:
        found = _cached_parts(items, direct, align, mem_align)
        if found is not None:
            return found
    slot0, _, out0 = items[0]
    if n > 2 and out0.is_cpu and slot0.nbytes and not out0.is_contiguous():
        nbytes, shape, strides, dtype = slot0.nbytes, out0.shape, out0.stride(), out0.dtype
        size = out0.element_size()
        if out0.numel() * size == nbytes and strides[-1] == 1:
            layout = _RUNS.get((shape, strides, size))
            if layout is None:
                layout = _runs(shape, strides, size, 0)
            span, inner, offsets = layout
            runs = [slice(o, o + inner) for o in offsets]  # each run of an item, in its span's byte view
            base, room = 0, -1  # the storage the last outs lay in (none yet)
            geometry_ok = direct and dio_aligned(out0, nbytes, align, mem_align)
            whole: memoryview | None = None
            parts: list[list[memoryview]] = []
            aligned: list[bool] = []
            for slot, _, out in items:
                address = out.data_ptr()
                at = address - base
                if not 0 <= at <= room:  # another storage (the keys' buffer, then the values'): view it once
                    storage = out.untyped_storage()
                    base = storage.data_ptr()
                    room = storage.nbytes() - span
                    at = address - base
                    if not 0 <= at <= room:
                        break
                    whole = _bytes_at(out, 0, base, storage.nbytes())
                if (slot.nbytes != nbytes or out.dtype is not dtype or out.shape != shape
                        or out.stride() != strides or not out.is_cpu):
                    break
                parts.append(list(map(whole[at : at + span].__getitem__, runs)))  # (no bytecode per run)
                aligned.append(geometry_ok and address % mem_align == 0)
            else:
                if PARTS_CACHE:
                    _remember_parts(items)
                return parts, aligned
    parts = []
    for i, (slot, _, out) in enumerate(items):
        nbytes = slot.nbytes
        if nbytes and out.nbytes == nbytes and out.is_cpu and out.is_contiguous():
            # byte_parts of a contiguous CPU out, inlined (separate tensors, e.g. the sparse pipeline's
            # staging slots): one view of its bytes that keeps it alive
            raw = (_CHAR_ARRAYS.get(nbytes) or _char_array(nbytes)).from_address(out.data_ptr())
            raw.keepalive = out  # type: ignore[attr-defined]
            parts.append([memoryview(raw).cast("B")])
        else:
            parts.append(byte_parts(out, nbytes, i))
    aligned = ([dio_aligned(out, slot.nbytes, align, mem_align) for slot, _, out in items] if direct
               else [False] * n)
    if PARTS_CACHE:
        _remember_parts(items)
    return parts, aligned


#: Whether :func:`batch_parts` keeps each destination's byte views (see :func:`_cached_parts`).
PARTS_CACHE = True
#: At most this many destination layouts are remembered (the table is emptied when it is full).
PARTS_CACHE_ITEMS = 16384
#: After this many batches in a row that found a destination not remembered, only one such batch in this
#: many remembers its destinations (fresh buffers every call would otherwise pay for views never used again).
PARTS_CACHE_MISSES = 64
# (address, nbytes, shape, strides, dtype) -> (byte views, {(align, mem_align): whether a direct read may land
# in them}).  The views are bare pointers into memory (they keep nothing alive) and are only used while a live
# destination of exactly that address and layout is being read into.
_PARTS: dict[tuple, tuple[list[memoryview], dict]] = {}
_parts_misses = [0]  # batches in a row that missed (updated without a lock: a lost update only shifts the rule)


def _cached_parts(items: Sequence[tuple[Slot, EntryHeader, torch.Tensor]], direct: bool, align: int,
                  mem_align: int) -> tuple[list[list[memoryview]], list[bool]] | None:
    """:func:`batch_parts` of ``items`` from the views remembered for their destinations' address and layout,
    or None when one is not remembered.  A decode reads into the same block slices of its buffers every step
    (and the sparse pipeline into the same pool slots, through fresh view tensors of them): building their
    byte views again (a ctypes array, a memoryview and a slice per run of every item, and ``dio_aligned``'s
    walk) was ~5-7 us per 384 KiB entry, more than the rest of the read's Python.

    Sound whatever tensor made a record: the views address exactly the bytes that a CPU tensor of that data
    address, byte count, shape, strides and dtype occupies, and they are used only while ``out``, such a
    tensor, is alive (the caller holds it for the read), so writing through them is writing into ``out``,
    as :func:`byte_parts`' views would.  A record is only ever made from a destination that
    :func:`byte_parts` accepted."""
    parts = []
    aligned = []
    get = _PARTS.get
    for slot, _, out in items:
        hit = get((out.data_ptr(), slot.nbytes, out.shape, out.stride(), out.dtype))
        if hit is None or not out.is_cpu:
            _parts_misses[0] += 1
            return None
        parts.append(hit[0])
        if direct:
            fits = hit[1].get((align, mem_align))
            if fits is None:
                fits = hit[1][(align, mem_align)] = dio_aligned(out, slot.nbytes, align, mem_align)
            aligned.append(fits)
    _parts_misses[0] = 0
    return parts, (aligned if direct else [False] * len(items))


def _remember_parts(items: Sequence[tuple[Slot, EntryHeader, torch.Tensor]]) -> None:
    """Remember the byte views of the items' CPU destinations (each accepted by :func:`byte_parts`) for
    :func:`_cached_parts`; after ``PARTS_CACHE_MISSES`` missed batches in a row, only one batch in that many."""
    misses = _parts_misses[0]
    if misses > PARTS_CACHE_MISSES and misses % PARTS_CACHE_MISSES:
        return
    if len(_PARTS) + len(items) > PARTS_CACHE_ITEMS:
        _PARTS.clear()
    for slot, _, out in items:
        nbytes = slot.nbytes
        try:
            if not nbytes or not out.is_cpu or out.numel() * out.element_size() != nbytes:
                continue
            address = out.data_ptr()
            shape, strides = out.shape, out.stride()
            if out.is_contiguous():
                span, inner, offsets = nbytes, nbytes, [0]
            else:
                layout = _RUNS.get((shape, strides, out.element_size()))
                span, inner, offsets = layout if layout is not None else _runs(shape, strides, out.element_size(), 0)
            whole = memoryview((_CHAR_ARRAYS.get(span) or _char_array(span)).from_address(address)).cast("B")
        except (TypeError, ValueError, RuntimeError):  # not a plain strided tensor: never remembered
            continue
        _PARTS[(address, nbytes, shape, strides, out.dtype)] = ([whole[o : o + inner] for o in offsets], {})


def dio_aligned(out: torch.Tensor, nbytes: int, align: int, mem_align: int | None = None) -> bool:
    """True when a direct (``O_DIRECT``) read may land ``nbytes`` straight in ``out``'s memory: every run
    :func:`byte_parts` makes of it is a multiple of ``align`` long and starts on a ``mem_align``-byte
    boundary (default ``align``): the kernel's rule for each segment of a direct read (Linux reports both
    through ``statx(STATX_DIOALIGN)``: 512 and 512 on most disks, 512 and 4 on NVMe)."""
    mem_align = align if mem_align is None else mem_align
    if not nbytes or nbytes % align or out.data_ptr() % mem_align:
        return False
    if out.is_contiguous():
        return True
    size = out.element_size()
    run = size  # bytes of the contiguous run at the end, as byte_parts merges it
    for dim, stride in zip(reversed(out.shape), reversed(out.stride())):
        if dim == 1:
            continue
        if stride * size == run:
            run *= dim
        elif (stride * size) % mem_align:
            return False
    return run % align == 0


_STATX_DIOALIGN = 0x2000


def dio_alignment(path: str) -> tuple[int, int] | None:
    """``(memory, offset)`` alignment a direct read of the file at ``path`` needs, from
    ``statx(STATX_DIOALIGN)`` (Linux 6.1+); ``None`` where the kernel or filesystem does not say."""
    try:
        import ctypes
        import struct

        libc = ctypes.CDLL(None, use_errno=True)
        statx = libc.statx
    except (OSError, AttributeError):
        return None
    buf = ctypes.create_string_buffer(256)  # struct statx
    if statx(-100, os.fsencode(path), 0, _STATX_DIOALIGN, buf) != 0:  # AT_FDCWD
        return None
    (mask,) = struct.unpack_from("<I", buf, 0)
    mem, offset = struct.unpack_from("<II", buf, 152)  # stx_dio_mem_align, stx_dio_offset_align
    if not mask & _STATX_DIOALIGN or not mem or not offset:
        return None
    return mem, offset


def check_capacity(capacity: object) -> int:
    """``capacity`` as bytes, or ``ValueError`` when it cannot hold even one (empty) entry."""
    if isinstance(capacity, bool) or not isinstance(capacity, int):
        raise TypeError(f"disk capacity must be an int number of bytes, got {type(capacity).__name__}")
    if capacity < MIN_CAPACITY:
        raise ValueError(
            f"disk capacity of {capacity} bytes holds no entry: the smallest is {MIN_CAPACITY} bytes "
            f"(a {PAGE}-byte header page and a {CRC_BYTES}-byte checksum; a non-empty value needs "
            f"{2 * PAGE + CRC_BYTES})"
        )
    return capacity


def check_sector_bytes(sector_bytes: object) -> int:
    """``sector_bytes`` (a power of two of at least 4096, an ``int``), else ``TypeError`` / ``ValueError``."""
    if isinstance(sector_bytes, bool) or not isinstance(sector_bytes, int):
        raise TypeError(f"sector_bytes must be an int, got {type(sector_bytes).__name__} {sector_bytes!r}")
    if sector_bytes < 1 << MIN_SECTOR_SHIFT or sector_bytes & (sector_bytes - 1):
        raise ValueError(f"sector_bytes must be a power of two of at least {1 << MIN_SECTOR_SHIFT}, got {sector_bytes}")
    return sector_bytes


# -- the store directory ----------------------------------------------------------------------------------
def _read_root_attrs(root: Path) -> dict | None:
    """The tiercache attributes of ``root/zarr.json``; ``None`` when it is a zarr node without them."""
    try:
        doc = json.loads((root / "zarr.json").read_bytes())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{root}/zarr.json is unreadable ({exc}): not a tiercache store") from None
    attrs = doc.get("attributes", {}).get("tiercache") if isinstance(doc, dict) else None
    return attrs if isinstance(attrs, dict) else None


def _is_creation_leftover(name: str) -> bool:
    return name.endswith(".partial") or (name.startswith("zarr.json.") and name.endswith(".tmp"))


def _may_precede_creation(name: str) -> bool:
    """Names a folder may hold before the store's ``zarr.json`` exists: dot files (``.lock``), the
    owner records directory (contract C7) and creation leftovers."""
    return name.startswith(".") or name == "owners" or _is_creation_leftover(name)


def prepare_store_dir(path: str | os.PathLike[str]) -> tuple[str, bool]:
    """Check ``path`` can hold a store *before* anything is created there, then create the directory if
    needed.  Returns ``(state, created_dir)``: state ``"store"`` (ours), ``"new"`` (empty but for dot
    files) or ``"half"`` (a creation killed before it finished: our ``.lock`` and leftovers, no entries).
    Raises ``ValueError`` for a file, an unwritable folder, a non-empty folder or a zarr group that is not a
    tiercache store, leaving no trace."""
    root = Path(path)
    if root.exists() and not root.is_dir():
        raise ValueError(f"disk path {root} exists and is not a directory")
    created = False
    if not root.exists():
        try:
            root.mkdir(parents=True)
            created = True
        except FileExistsError:
            pass
        except OSError as exc:
            raise ValueError(f"cannot create disk path {root}: {exc.strerror}") from None
        if not root.is_dir():
            raise ValueError(f"disk path {root} exists and is not a directory")
    names = set(os.listdir(root))
    state = "new"
    if "zarr.json" in names:
        attrs = _read_root_attrs(root)
        if attrs is not None:
            state = "store"
        elif ".lock" in names and all(n == "zarr.json" or _may_precede_creation(n) for n in names):
            state = "half"  # a zarr group whose tiercache attributes were never written (older creation order)
        else:
            raise ValueError(f"{root} holds a zarr group that is not a tiercache store")
    else:
        visible = [n for n in names if not n.startswith(".")]
        if visible and ".lock" in names and all(_may_precede_creation(n) for n in visible):
            state = "half"
        elif visible:
            raise ValueError(f"{root} is not empty and is not a tiercache store; use an empty directory")
    if not os.access(root, os.W_OK | os.X_OK):
        if created:
            root.rmdir()
        raise ValueError(f"disk path {root} is not writable")
    return state, created


def _ensure_writable_dir(path: Path) -> None:
    """Kept for callers of the old name: :func:`prepare_store_dir` without the result."""
    prepare_store_dir(path)


_U32 = struct.Struct("<I")


_CHAR_ARRAYS: dict[int, type] = {}


#: length -> the four byte tables of the linear map "crc32c continued over ``length`` bytes" (crc combine)
_SHIFTS: dict[int, tuple[list[int], list[int], list[int], list[int]]] = {}


def _shift_tables(length: int, crc32c: Callable) -> tuple[list[int], list[int], list[int], list[int]]:
    """Tables of the map ``c -> crc32c(B, c) ^ crc32c(B, 0)`` for any ``B`` of ``length`` bytes (it is linear
    in ``c`` and does not depend on ``B``'s bytes), by input byte, so that ``crc32c(A + B) ==
    shift(crc32c(A)) ^ crc32c(B)`` (zlib's crc32_combine).  Cached per length."""
    tables = _SHIFTS.get(length)
    if tables is None:
        zeros = bytes(length)
        base = crc32c(zeros)
        basis = [crc32c(zeros, 1 << bit) ^ base for bit in range(32)]
        built = []
        for k in range(4):
            table = [0] * 256
            for b in range(1, 256):
                low = b & -b
                table[b] = table[b ^ low] ^ basis[8 * k + low.bit_length() - 1]
            built.append(table)
        if len(_SHIFTS) >= 64:
            _SHIFTS.clear()
        tables = _SHIFTS[length] = tuple(built)  # type: ignore[assignment]
    return tables  # type: ignore[return-value]


def _crc_after(crc: int, crcs: bytes, payload: memoryview, shift: int, crc32c: Callable) -> int:
    """``crc32c(payload, crc)`` from the payload's sector crcs ``crcs`` (sectors of ``2**shift`` bytes): every
    sector but the last combined from its crc (one table per sector size), the last one read again (a short
    one would need tables of its own length)."""
    size = 1 << shift
    count = len(crcs) // CRC_BYTES
    if count > 1:
        t0, t1, t2, t3 = _shift_tables(size, crc32c)
        for sector_crc in struct.unpack_from(f"<{count - 1}I", crcs):
            crc = t0[crc & 255] ^ t1[(crc >> 8) & 255] ^ t2[(crc >> 16) & 255] ^ t3[crc >> 24] ^ sector_crc
    return crc32c(payload[(count - 1) * size :], crc)


# How ranged reads copy verified bytes out of their bounce buffer (a module global so an A/B can swap it).
_range_copy = ctypes.memmove


def _copy_ranges(dst: int, src: int, base: int, ranges: Sequence[tuple[int, int]]) -> None:
    """Copy each payload range ``[start, stop)`` from ``src + start - base`` to ``dst + start``."""
    for start, stop in ranges:
        _range_copy(dst + start, src + start - base, stop - start)


def _char_array(nbytes: int) -> type:
    """``ctypes.c_char * nbytes``, cached (a ``from_address`` view of a tensor's bytes per read)."""
    kind = _CHAR_ARRAYS.get(nbytes)
    if kind is None:
        if len(_CHAR_ARRAYS) > 4096:
            _CHAR_ARRAYS.clear()
        kind = _CHAR_ARRAYS[nbytes] = ctypes.c_char * nbytes
    return kind


class _Scratch(threading.local):
    """Per-thread buffers: a header page and a tail (padding + checksum) for buffered reads, and
    page-aligned anonymous mmaps for direct I/O (kept up to 1 MiB; larger ones are made per call)."""

    def __init__(self) -> None:
        self.head_bytes = bytearray(HEADER_BYTES)  # (a bytearray compares with memcmp, a memoryview per item)
        self.head = memoryview(self.head_bytes)
        self.tail = memoryview(bytearray(PAGE + CRC_BYTES + 1))
        self.aligned: dict[int, mmap.mmap] = {}
        # Direct reads straight into the caller's memory land the header page and the tail (padding,
        # checksum, and room to see a longer file) here: page-aligned, as O_DIRECT needs.
        self.dhead = memoryview(mmap.mmap(-1, HEADER_BYTES))
        self.dtail = memoryview(mmap.mmap(-1, 2 * PAGE))
        # A whole small chunk (header, payload, padding, checksum, one byte more to see a longer file).
        self.small_bytes = bytearray(HEADER_BYTES + SMALL_READ_BYTES + CRC_BYTES + 1)
        self.small_view = memoryview(self.small_bytes)
        self.small_address = ctypes.addressof(ctypes.c_char.from_buffer(self.small_bytes))  # fixed: views pin it
        self._bounce: tuple[memoryview, int] | None = None

    def bounce(self, size: int) -> tuple[memoryview, int]:
        """A page-aligned buffer of at least ``size`` bytes and its address (this thread's, grown as
        needed, in powers of two): ranged reads land their sectors here."""
        buf = self._bounce
        if buf is None or len(buf[0]) < size:
            room = 1 << max(16, (size - 1).bit_length())
            raw = mmap.mmap(-1, room)
            address = ctypes.addressof(ctypes.c_char.from_buffer(raw))
            buf = self._bounce = (memoryview(raw), address)
        return buf

    def get(self, size: int) -> memoryview:
        size = -(-size // PAGE) * PAGE
        buf = self.aligned.get(size)
        if buf is None:
            buf = mmap.mmap(-1, size)
            if size <= 1 << 20:
                if len(self.aligned) > 8:
                    self.aligned.clear()
                self.aligned[size] = buf
        return memoryview(buf)


class DiskTier:
    """Persistent tier in a zarr v3 store at ``path`` (see the module docstring for the format).

    ``capacity`` bounds the bytes of chunk files (header, padding and checksum included); it must be at
    least :data:`MIN_CAPACITY` (``ValueError`` otherwise).  A store reopened with a budget smaller than what
    it holds raises :class:`DiskOverBudgetError` from :meth:`recover` before yielding anything (nothing is
    deleted).  ``fingerprint`` (any string, e.g. a model/layout hash) is recorded on creation and must
    match on reopen: a cache written for different weights is never served.

    ``direct_io=True`` reads and writes chunk files with ``O_DIRECT`` through page-aligned buffers, past
    the OS page cache (so the host budget is the only DRAM cache); where the filesystem refuses it (tmpfs)
    the tier warns once (``RuntimeWarning``) and uses buffered I/O.  :meth:`describe` says what is in
    effect.  ``io_threads`` sizes the pool :meth:`read_into` spreads buffered reads over (at most one thread
    per CPU: they are memory copies, not waits); direct reads wait on the device, so they use
    ``direct_read_threads`` (default ``max(io_threads, DIRECT_READ_THREADS)``, 8) reads in flight.

    Thread safety: as the :class:`~tiercache.tiers.base.Tier` protocol; ``read``, ``read_into``, ``write``
    and ``discard`` may run concurrently for distinct slots.
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
        direct_io: bool = False,
        io_threads: int = 4,
        direct_read_threads: int | None = None,
        sector_bytes: int = DEFAULT_SECTOR_BYTES,
    ) -> None:
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
        # The checks Cache makes of the same options (CacheConfig), for a DiskTier made directly (tiers=...):
        # io_threads=0 or 2.5 used to be rounded silently, and a truthy direct_io="no" turned O_DIRECT on.
        if isinstance(io_threads, bool) or not hasattr(io_threads, "__index__") or operator.index(io_threads) < 1:
            raise ValueError(f"io_threads must be a positive int, got {type(io_threads).__name__} {io_threads!r}")
        io_threads = operator.index(io_threads)
        if not isinstance(direct_io, bool):
            raise TypeError(f"direct_io must be a bool, got {type(direct_io).__name__} {direct_io!r}")
        if fingerprint is not None and not isinstance(fingerprint, str):
            raise TypeError(f"fingerprint must be a str or None, got {type(fingerprint).__name__}")
        check_sector_bytes(sector_bytes)
        self.sector_bytes = sector_bytes
        self._sector_shift = sector_bytes.bit_length() - 1
        # ref -> (seq, sector shift, sector crcs) of version-3 entries: made at write, by a scan, or by the
        # first ranged read after an index load (which reads the whole chunk once and learns it)
        self._sectors: dict[tuple[int, int], tuple[int, int, bytes]] = {}
        #: ranged reads (read_ranges items) and the payload bytes they did not have to read
        self.ranged_reads = 0
        self.ranged_bytes_saved = 0
        self.name = name
        self.capacity = check_capacity(capacity)
        self.root = Path(path)
        self._root = os.fspath(path)
        self._slots_dir = os.path.join(self._root, "slots")
        self._index_path = os.path.join(self._root, journal.INDEX_NAME)
        self._tomb_path = os.path.join(self._root, journal.TOMBSTONES_NAME)
        self._used = 0
        self._loaded_bytes = 0  # what the entries of a loaded index charge (their sum, computed in bulk)
        self._free_rows: dict[int, list[int]] = {}  # rows freed since open, per size class
        self._next_row: dict[int, int] = {}  # allocation cursor per size class
        self._taken: dict[int, set[int]] = {}  # rows recovery found occupied (the cursor skips them)
        # live chunk files: what the index persists (a value is a position in _loaded after recover_columns)
        self._headers: dict[tuple[int, int], EntryHeader | int] = {}
        self._loaded: journal.LoadedIndex | None = None
        self._arrays: set[int] = set()
        self._lock = threading.Lock()
        self._index_live = os.path.exists(self._index_path)  # remove index.tc before the first change
        self._complete = False  # _headers holds every live chunk (recovered, or a new store): index may be written
        self._closed = False  # close() has begun: discard deletes no file any more (it chose which to keep)
        self._seq_high = 0
        self.corrupt_on_open = 0
        #: reads whose checksum failure a private re-read did not confirm (see ``read_into``)
        self.confirmed_sound = 0
        self._stats_lock = threading.Lock()
        self.metadata_repaired = 0
        self.tombstoned = 0
        # Slots whose chunk could not be removed (a tombstone names them): never reused until a scan has
        # removed the file and compacted the journal, so a tombstone can only ever match the deleted entry.
        self._tomb_rows: set[tuple[int, int]] = set()
        self.index_state = "none"
        self._io_threads = io_threads
        if direct_read_threads is None:
            direct_read_threads = max(self._io_threads, DIRECT_READ_THREADS)
        if (not isinstance(direct_read_threads, int) or isinstance(direct_read_threads, bool)
                or direct_read_threads < 1):
            raise ValueError(f"direct_read_threads must be a positive int, got {direct_read_threads!r}")
        self._direct_threads = direct_read_threads
        self._pool: ThreadPoolExecutor | None = None
        # _expected_prefix's cache: ref -> (header, its record, the last header source read with it or None)
        self._prefixes: dict[tuple[int, int], tuple[EntryHeader, bytes, object]] = {}
        self._scratch = _Scratch()
        self._crc = _crc32c()
        state, created = prepare_store_dir(self.root)
        try:
            self._init_group(state, compression, compression_level, fingerprint)
        except BaseException:
            if created:
                _remove_created(self.root)
            raise
        self._complete = state != "store"
        self.direct_io_requested = bool(direct_io)
        self.direct_io = False
        self._fds = FdCache(os.O_RDONLY)
        # Direct reads into the caller's memory need its runs aligned to the device's logical block (512
        # bytes nearly everywhere; the kernel refuses a misaligned one with EINVAL, and then this grows
        # to a page, then gives up and reads through the bounce buffer).
        self.dio_align = 512
        self.dio_mem_align = 512
        self._dio_into = True
        if self.direct_io_requested and self._codec is not None:
            warnings.warn("tiercache: direct_io applies to uncompressed disk tiers; using buffered I/O",
                          RuntimeWarning, stacklevel=2)
        elif self.direct_io_requested:
            self.direct_io = self._probe_direct_io()
            if self.direct_io:
                self._fds = FdCache(os.O_RDONLY | os.O_DIRECT)

    # -- metadata -------------------------------------------------------------------------------------
    def _init_group(self, state: str, compression: str | None, level: int, fingerprint: str | None) -> None:
        if state == "store":
            attrs = _read_root_attrs(self.root)
            assert attrs is not None
            version = attrs.get("format_version")
            if version not in READABLE_VERSIONS:
                raise ValueError(
                    f"{self.root}: tiercache store format version {version} is not readable by this version "
                    f"(formats {READABLE_VERSIONS}; format 1 stores had no users and are not converted): "
                    "delete the folder or use another path"
                )
            # A store keeps its version: a version-2 store's entries (and new ones) have no sector table,
            # so ranged reads of them read whole payloads.
            self.format_version = version
            if fingerprint is not None and attrs.get("fingerprint") != fingerprint:
                raise FingerprintMismatchError(
                    f"{self.root} was written with fingerprint {attrs.get('fingerprint')!r}, not {fingerprint!r}"
                )
            # The store's own settings win on reopen: chunks already written use them.
            self.compression = attrs.get("compression")
            self.compression_level = int(attrs.get("compression_level", level))
            self.fingerprint = attrs.get("fingerprint")
        else:
            if state == "half":
                log.warning("tiercache: %s holds an unfinished store creation (no entries); finishing it", self.root)
                for name in os.listdir(self.root):
                    if _is_creation_leftover(name):
                        os.unlink(os.path.join(self._root, name))
            attrs = {
                "format_version": FORMAT_VERSION,  # (tests make version-2 stores by rewriting it)
                "compression": compression,
                "compression_level": level,
                "fingerprint": fingerprint,
            }
            # One atomic rename creates the store complete with its attributes: a crash before it leaves
            # no store (an empty folder), after it a valid empty store.
            journal.write_atomic(os.path.join(self._root, "zarr.json"), group_metadata(attrs))
            self.compression, self.compression_level, self.fingerprint = compression, level, fingerprint
            self.format_version = FORMAT_VERSION
        self._codec = None
        if self.compression == "zstd":
            import numcodecs

            self._codec = numcodecs.Zstd(level=self.compression_level)

    def _ensure_array(self, pages: int) -> None:
        if pages in self._arrays:
            return
        with self._lock:
            if pages not in self._arrays:
                class_dir = os.path.join(self._slots_dir, str(pages))
                os.makedirs(class_dir, exist_ok=True)
                meta = os.path.join(class_dir, "zarr.json")
                if not os.path.exists(meta):
                    journal.write_atomic(meta, array_metadata(pages, self.compression, self.compression_level))
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
            taken = self._taken.get(pages)
            while taken and row in taken:  # occupied at recovery: handed out through the free list only
                row += 1
            if row >= SLOT_ROWS:
                return None
            self._next_row[pages] = row + 1
        self._used += charged
        return Slot((pages, row), nbytes, charged)

    def free(self, slot: Slot) -> None:
        pages, row = slot.ref  # type: ignore[misc]
        if (pages, row) not in self._tomb_rows:
            self._free_rows.setdefault(pages, []).append(row)
        self._used -= slot.charged

    # -- the persisted index ----------------------------------------------------------------------------
    def _before_change(self) -> None:
        """Remove ``index.tc`` durably before the first file change after an open that loaded or found it:
        a crash from here on must fall back to the full scan."""
        if not self._index_live:
            return
        with self._lock:
            if self._index_live:
                try:
                    os.unlink(self._index_path)
                except FileNotFoundError:
                    pass
                journal.fsync_dir(self._root)
                self._index_live = False

    def _class_stamp(self, pages: int) -> tuple[int, int]:
        """What changes when a size class's files do: its directory's and its ``zarr.json``'s mtimes."""
        class_dir = os.path.join(self._slots_dir, str(pages))
        meta = os.path.join(class_dir, "zarr.json")
        return os.stat(class_dir).st_mtime_ns, (os.stat(meta).st_mtime_ns if os.path.exists(meta) else 0)

    def _class_mtimes(self) -> dict[int, tuple[int, int]]:
        out = {}
        for pages in self._arrays:
            try:
                out[pages] = self._class_stamp(pages)
            except FileNotFoundError:
                pass
        return out

    def _load_index(self, columns: bool = False) -> list[RecoveredEntry] | RecoveredColumns | None:
        try:
            with open(self._index_path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            self._index_live = False
            self.index_state = "scanned (no index)"
            log.info("tiercache: %s has no index (not closed cleanly, or new): scanning chunk files", self.root)
            return None
        try:
            loaded = journal.decode_index(raw, self._crc)
            classes = sorted(
                int(n) for n in os.listdir(self._slots_dir) if n.isdigit()
            ) if os.path.isdir(self._slots_dir) else []
            if classes != sorted(loaded.class_mtimes):
                raise CorruptEntryError("size-class directories changed since the index was written")
            for pages, mtime in loaded.class_mtimes.items():
                if self._class_stamp(pages) != mtime:
                    raise CorruptEntryError(f"slots/{pages} changed since the index was written")
            if not set(loaded.pages) <= loaded.class_mtimes.keys():
                raise CorruptEntryError("the index names a size class it does not list")
        except (CorruptEntryError, OSError, ValueError) as exc:
            _unlink_quiet(self._index_path)
            self._index_live = False
            self.index_state = "scanned (stale or damaged index)"
            log.warning("tiercache: ignoring the index of %s (%s): scanning chunk files", self.root, exc)
            return None
        self._seq_high = loaded.seq_high_water
        self._arrays.update(loaded.class_mtimes)
        self._index_live = True
        self.index_state = "loaded"
        if len(set(loaded.pages)) <= 1:
            if loaded.pages:
                self._taken[loaded.pages[0]] = set(loaded.rows)
        else:
            for p, r in zip(loaded.pages, loaded.rows):
                self._taken.setdefault(p, set()).add(r)
        new_entry, new_tuple = journal.fast_constructor(RecoveredEntry), tuple.__new__  # new_tuple(Slot, ...): a Slot
        new_header, blob, forms = journal.new_header, loaded.blob, loaded.forms
        charged = {p: p * PAGE + CRC_BYTES for p in loaded.class_mtimes}
        self._loaded_bytes = PAGE * sum(loaded.pages) + CRC_BYTES * len(loaded.pages)
        if columns:
            # _headers holds each entry's position in the index; _header_of builds its header when needed
            self._loaded = loaded
            refs = list(zip(loaded.pages, loaded.rows))  # one (pages, row) tuple per slot, shared with its Slot
            self._headers = dict(zip(refs, range(len(refs))))  # type: ignore[arg-type]
            form_nbytes = [form[2] for form in forms]
            # Slot(ref, nbytes, charged) per entry and the key slices, built by C-level maps (no bytecode per
            # entry): new_tuple(Slot, (ref, nbytes, charged)).
            if len(forms) == 1:
                nbytes_of = itertools.repeat(form_nbytes[0])
            else:
                nbytes_of = map(form_nbytes.__getitem__, loaded.form_ids)
            charged_of = itertools.repeat(next(iter(charged.values()))) if len(charged) == 1 else map(charged.__getitem__, loaded.pages)
            slots = list(map(new_tuple, itertools.repeat(Slot), zip(refs, nbytes_of, charged_of)))
            keys = list(map(blob.__getitem__, map(slice, loaded.starts, loaded.ends)))
            return RecoveredColumns(keys, forms, loaded.form_ids, loaded.seqs, slots, loaded.int_keys)
        # One pass builds each header, slot and entry ("for ... in (forms[f],)" unpacks the entry's form).
        entries = [
            new_entry(new_header(blob[a:b], dtype, shape, nbytes, s), new_tuple(Slot, ((p, r), nbytes, charged[p])))
            for p, r, a, b, f, s in zip(loaded.pages, loaded.rows, loaded.starts, loaded.ends, loaded.form_ids,
                                        loaded.seqs)
            for dtype, shape, nbytes in (forms[f],)
        ]
        self._headers = {e.slot.ref: e.header for e in entries}  # type: ignore[misc]
        return entries

    def _header_of(self, stored: EntryHeader | int) -> EntryHeader:
        """A value of ``_headers``: a header, or (after :meth:`recover_columns`) a position in the index."""
        return self._loaded.header(stored) if type(stored) is int else stored  # type: ignore[union-attr,arg-type]

    # -- I/O ------------------------------------------------------------------------------------------
    def write(self, slot: Slot, data: torch.Tensor, header: EntryHeader) -> None:
        """Store ``data`` (1-D contiguous, any dtype and device, ``slot.nbytes`` bytes: contract C1)."""
        pages, row = slot.ref  # type: ignore[misc]
        tensor = data.detach()
        if tensor.device.type != "cpu":
            tensor = tensor.to("cpu")
        if not tensor.is_contiguous():
            tensor = tensor.contiguous()
        raw = tensor.reshape(-1)
        if raw.dtype != torch.uint8:
            raw = raw.view(torch.uint8)
        payload = memoryview(raw.numpy()).cast("B")
        if payload.nbytes != slot.nbytes:
            raise ValueError(f"payload of {payload.nbytes} bytes written to a slot of {slot.nbytes}")
        prefix = header_prefix(header, self.format_version)
        table = None
        if self.format_version >= 3:
            if self._codec is None and payload.nbytes:
                table = self._sector_crcs(payload, len(prefix))
                head = prefix + sector_block(*table)
            else:  # compressed stores read whole payloads: no table (shift 0)
                head = prefix + sector_block(0, b"")
            head += bytes(HEADER_BYTES - len(head))
        else:
            head = prefix + bytes(HEADER_BYTES - len(prefix))
        pad_len = pages * PAGE - HEADER_BYTES - payload.nbytes
        final = self._chunk_file(slot)
        tmp = f"{final}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            self._before_change()
            self._ensure_array(pages)
            if self._codec is None:
                if table is not None:  # the payload's crc from its sector crcs: no second pass over it
                    crc = self._crc(bytes(pad_len), _crc_after(self._crc(head), table[1], payload, table[0],
                                                               self._crc))
                else:
                    crc = self._crc(bytes(pad_len), self._crc(payload, self._crc(head)))
                if self.direct_io:
                    self._write_direct(tmp, head, payload, pad_len, crc)
                else:
                    parts: list[bytes | memoryview] = [head, payload, bytes(pad_len), crc.to_bytes(4, "little")]
                    _write_file(tmp, parts)
            else:
                encoded = self._codec.encode(b"".join((head, payload, bytes(pad_len))))
                _write_file(tmp, [encoded, self._crc(encoded).to_bytes(4, "little")])
            os.replace(tmp, final)
            self._fds.forget(slot.ref)  # a cached descriptor would still read the replaced file
        except OSError as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            reason = "the disk is full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else exc.strerror
            raise TierIOError(f"disk tier: writing {final} failed: {reason}", exc.errno) from exc
        with self._lock:
            headers = self._headers
            headers.pop((pages, row), None)  # re-inserted last: _headers is in write order (see close)
            headers[(pages, row)] = header
            self._prefixes[(pages, row)] = (header, prefix, None)
            if table is not None:
                self._sectors[(pages, row)] = (header.seq, *table)
            else:
                self._sectors.pop((pages, row), None)
            self._seq_high = max(self._seq_high, header.seq)

    def _sector_crcs(self, payload: memoryview, prefix_len: int) -> tuple[int, bytes]:
        """``(shift, crcs)``: the sector table of ``payload`` (the tier's ``sector_bytes``, or the smallest
        power-of-two multiple whose table fits the header page after a ``prefix_len``-byte identity record)."""
        nbytes = payload.nbytes
        shift = sector_shift_for(nbytes, prefix_len, self._sector_shift)
        size = 1 << shift
        crc32c = self._crc
        crcs = [crc32c(payload[at : at + size]) for at in range(0, nbytes, size)]
        return shift, struct.pack(f"<{len(crcs)}I", *crcs)

    def _write_direct(self, tmp: str, head: bytes, payload: memoryview, pad_len: int, crc: int) -> None:
        size = HEADER_BYTES + payload.nbytes + pad_len  # whole pages
        buf = self._scratch.get(size + PAGE)
        buf[:HEADER_BYTES] = head
        buf[HEADER_BYTES : HEADER_BYTES + payload.nbytes] = payload
        buf[HEADER_BYTES + payload.nbytes : size] = bytes(pad_len)
        buf[size : size + CRC_BYTES] = crc.to_bytes(4, "little")
        buf[size + CRC_BYTES : size + PAGE] = bytes(PAGE - CRC_BYTES)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
        try:
            view, offset = buf[: size + PAGE], 0
            while offset < view.nbytes:
                offset += os.pwrite(fd, view[offset:], offset)
            os.ftruncate(fd, size + CRC_BYTES)  # the file ends after the checksum, as zarr expects
        finally:
            os.close(fd)

    def _refuse_dio_alignment(self) -> None:
        if self.dio_mem_align < 512:
            log.info("tiercache: %s refused a direct read into %d-byte aligned memory; aligning to 512",
                     self.root, self.dio_mem_align)
            self.dio_mem_align = 512
        elif self.dio_align < PAGE or self.dio_mem_align < PAGE:
            log.info("tiercache: %s refused a %d-byte aligned direct read; aligning to %d", self.root,
                     self.dio_align, PAGE)
            self.dio_align = self.dio_mem_align = PAGE
        else:
            log.info("tiercache: %s refused a page-aligned direct read into the caller's memory; "
                     "reading through a bounce buffer", self.root)
            self._dio_into = False

    def _probe_direct_io(self) -> bool:
        probe = os.path.join(self._root, f".direct-io-probe.{os.getpid()}.{threading.get_ident()}")
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
            try:
                os.pwrite(fd, self._scratch.get(PAGE), 0)
            finally:
                os.close(fd)
            found = dio_alignment(probe)
            if found is not None and found[1] <= PAGE:
                self.dio_mem_align, self.dio_align = max(found[0], 1), max(found[1], 512)
            return True
        except OSError as exc:
            warnings.warn(
                f"tiercache: {self.root} does not support O_DIRECT ({exc.strerror}); the disk tier uses "
                "buffered I/O (the OS page cache acts as an extra, unbudgeted cache tier)",
                RuntimeWarning, stacklevel=3,
            )
            return False
        finally:
            try:
                os.unlink(probe)
            except OSError:
                pass

    def _read_chunk(self, path: str, pages: int, nbytes: int) -> None:
        """Check the size and crc32c of the uncompressed chunk at ``path`` (``CorruptEntryError`` when it
        is damaged or missing), opened for this read alone (recovery's check of a winning copy: its
        descriptor is not worth caching)."""
        try:
            fd = os.open(path, self._fds.flags)
        except FileNotFoundError:
            raise CorruptEntryError(f"{path} is missing") from None
        try:
            _, problem = self._pread_checked(fd, pages, [memoryview(bytearray(nbytes))] if nbytes else [], nbytes)
        finally:
            os.close(fd)
        if problem is not None:
            raise CorruptEntryError(f"{path} {problem}")

    def _pread_checked(
        self, fd: int, pages: int, parts: list[memoryview], nbytes: int, aligned: bool = False
    ) -> tuple[bytes | memoryview, str | None]:
        """Read the chunk behind ``fd`` with its payload scattered into ``parts`` (byte views totalling
        ``nbytes``, in order) and check its size and crc32c.  Returns ``(header page, problem)``:
        ``problem`` is ``None`` for a sound chunk, else what is wrong (the caller names the file).
        ``aligned``: every part starts and ends on a :attr:`dio_align` boundary (see :func:`dio_aligned`),
        so a direct read may land the payload in them without a bounce buffer."""
        size = pages * PAGE + CRC_BYTES
        if self.direct_io:
            if aligned and self._dio_into:
                scratch = self._scratch
                pad = size - CRC_BYTES - HEADER_BYTES - nbytes  # a multiple of dio_align, as nbytes is
                tail = scratch.dtail[: pad + PAGE]  # padding, checksum, and room to see a longer file
                try:
                    got = os.preadv(fd, [scratch.dhead, *parts, tail], 0)
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    self._refuse_dio_alignment()
                    got = -1
                if got >= 0:
                    head = scratch.dhead
                    if got != size:
                        return head, _wrong_size(got)
                    crc = self._crc(head)
                    for part in parts:
                        crc = self._crc(part, crc)
                    if pad:
                        crc = self._crc(tail[:pad], crc)
                    if crc != int.from_bytes(tail[pad : pad + CRC_BYTES], "little"):
                        return head, BAD_CRC
                    return head, None
            buf = self._scratch.get(size + PAGE)  # room to see a file longer than expected
            got = os.preadv(fd, [buf], 0)
            if got != size:
                return buf[:HEADER_BYTES], _wrong_size(got)
            crc = self._crc(buf[: size - CRC_BYTES])
            # (a slice assignment holds the GIL for the copy; numpy's copy releases it, which measured
            # slower here with four I/O threads on two busy cores: each copy then waits to take it back)
            pos = HEADER_BYTES
            for part in parts:
                part[:] = buf[pos : pos + part.nbytes]
                pos += part.nbytes
            head, tail_crc = buf[:HEADER_BYTES], buf[size - CRC_BYTES : size]
        else:
            scratch = self._scratch
            head = scratch.head
            tail = scratch.tail[: size - HEADER_BYTES - nbytes + 1]  # one byte more: sees a longer file
            if nbytes >= PIPELINE_BYTES:
                got, crc = self._pread_pipelined(fd, [head, *parts, tail])
            else:
                got = os.preadv(fd, [head, *parts, tail], 0)
                crc = self._crc(head)
                for part in parts:
                    crc = self._crc(part, crc)
                crc = self._crc(tail[: -1 - CRC_BYTES], crc)
            if got != size:
                return head, _wrong_size(got)
            tail_crc = tail[-1 - CRC_BYTES : -1]
        if crc != int.from_bytes(tail_crc, "little"):
            return head, BAD_CRC
        return head, None

    def _pread_pipelined(self, fd: int, views: list[memoryview]) -> tuple[int, int]:
        """A large read as :data:`PIPELINE_PIECE` pieces, each checksummed as soon as it is in, while it
        is still in the CPU cache (one read of the whole chunk and then one crc pass would fetch every
        byte from memory twice).  Returns ``(bytes read, crc of everything but the last view's final
        1 + CRC_BYTES bytes)``; stops at the first short piece (a truncated file, or the probe byte)."""
        end = sum(v.nbytes for v in views) - 1 - CRC_BYTES  # what the crc covers
        got, crc, at = 0, 0, 0
        for view in views:
            for lo in range(0, view.nbytes, PIPELINE_PIECE):
                piece = view[lo : lo + PIPELINE_PIECE]
                n = os.preadv(fd, [piece], at)
                got += n
                covered = min(n, end - at)
                if covered > 0:
                    crc = self._crc(piece[:covered], crc)
                if n != piece.nbytes:
                    return got, crc
                at += n
        return got, crc

    def _read_compressed(self, path: str, pages: int) -> memoryview:
        """The decoded chunk (header + payload + padding) of a compressed store, checksum verified."""
        try:
            with open(path, "rb", buffering=0) as f:
                raw = f.read()
        except FileNotFoundError:
            raise CorruptEntryError(f"{path} is missing") from None
        if len(raw) < CRC_BYTES or self._crc(memoryview(raw)[:-CRC_BYTES]) != int.from_bytes(raw[-CRC_BYTES:], "little"):
            raise CorruptEntryError(f"{path} {BAD_CRC}")
        try:
            decoded = self._codec.decode(memoryview(raw)[:-CRC_BYTES])  # type: ignore[union-attr]
        except Exception as exc:  # a checksum collision on garbage: still never return it
            raise CorruptEntryError(f"{path} does not decompress: {exc}") from None
        view = memoryview(decoded).cast("B")
        if view.nbytes != pages * PAGE:
            raise CorruptEntryError(f"{path} decodes to {view.nbytes} bytes, expected {pages * PAGE}")
        return view

    def _expected_prefix(self, ref: tuple[int, int], header: EntryHeader) -> bytes:
        """The header record ``ref``'s chunk must start with, cached per slot (made at ``write``, or at the
        first read after a reopen) so a read compares bytes instead of encoding the header again.

        ``header`` may also be a *header source*: any object that is not an :class:`EntryHeader` but has
        the header's ``nbytes`` and a ``header`` attribute returning the :class:`EntryHeader` (the facade's
        index entries, whose header fields never change).  The source is then remembered beside the cached
        record, so the next read with the very same source object finds the record by identity without
        building its header (a batch read's per-entry saving); any other source or header is compared by
        its fields as before."""
        cached = self._prefixes.get(ref)
        if cached is not None and cached[2] is header:
            return cached[1]
        source = None
        if type(header) is not EntryHeader:  # a header source (see above)
            source, header = header, header.header  # type: ignore[attr-defined]
        if cached is not None:
            known = cached[0]
            # The facade builds a header per read from its entry's fields (the same key, shape and dtype
            # name objects each time): identity first, then equality.
            same = known is header or (
                known.key is header.key and known.shape is header.shape and known.dtype is header.dtype
                and known.seq == header.seq and known.nbytes == header.nbytes
            )
            if same or known == header:
                if source is not None:
                    self._prefixes[ref] = (known, cached[1], source)
                return cached[1]
        prefix = header_prefix(header, self.format_version)
        self._prefixes[ref] = (header, prefix, source)
        return prefix

    def _check_stored(self, slot: Slot, head: bytes | memoryview, header: EntryHeader) -> None:
        """The stored header must be ``header``: its encoding is compared byte for byte (what follows it in
        the page is padding), so no decoding is needed on the hot path."""
        expected = self._expected_prefix(slot.ref, header)  # type: ignore[arg-type]
        if header.nbytes != slot.nbytes or bytes(head[: len(expected)]) != expected:  # (bytes: one memcmp)
            decode_header(head)  # a damaged header says so in the error
            raise CorruptEntryError(f"{self._chunk_file(slot)} {OTHER_ENTRY}")

    def _acquire_fd(self, slot: Slot):
        """Open ``slot``'s chunk through the descriptor cache (the slow path of ``self._fds.lookup``, which
        found no open descriptor); the caller releases the handle.  A missing chunk file is damage."""
        path = self._chunk_file(slot)
        try:
            return self._fds.open_missing(slot.ref, path)
        except FileNotFoundError:
            raise CorruptEntryError(f"{path} is missing") from None

    def _read_payload_into(
        self, slot: Slot, header: EntryHeader, parts: list[memoryview], aligned: bool = False
    ) -> None:
        """Read ``slot``'s verified payload into ``parts`` (byte views totalling ``slot.nbytes``;
        ``aligned`` as in :meth:`_pread_checked`)."""
        ref = slot.ref
        pages = ref[0]  # type: ignore[index]
        if self._codec is not None:
            path = self._chunk_file(slot)
            body = self._read_compressed(path, pages)
            head = body[:HEADER_BYTES]
            pos = HEADER_BYTES
            for part in parts:
                part[:] = body[pos : pos + part.nbytes]
                pos += part.nbytes
        else:
            fds = self._fds
            handle = fds.lookup(ref)
            if handle is None:
                handle = self._acquire_fd(slot)
            try:
                head, problem = self._pread_checked(handle.fd, pages, parts, slot.nbytes, aligned)
            finally:
                fds.release(handle)
            if problem is not None:
                raise CorruptEntryError(f"{self._chunk_file(slot)} {problem}")
        self._check_stored(slot, head, header)

    def _read_small(self, slot: Slot, header: EntryHeader, out: torch.Tensor) -> None:
        """:meth:`read_into` of one payload of at most ``SMALL_READ_BYTES`` (in a size class of at most
        ``_SMALL_PAGES`` pages) into the contiguous CPU tensor ``out`` (buffered, uncompressed store): the
        size of ``out`` checked, then :meth:`_read_checked`, which writes ``out`` only once the chunk is
        verified (``out`` is the caller's)."""
        nbytes = slot.nbytes
        if out.numel() * out.element_size() != nbytes:
            raise ValueError(f"read_into item 0: out holds {out.numel() * out.element_size()} bytes, "
                             f"the payload is {nbytes}")
        expected = self._expected_prefix(slot.ref, header) if header.nbytes == nbytes else None  # type: ignore[arg-type]
        self._read_checked(slot, out, expected, True)

    def _read_checked(self, slot: Slot, out: torch.Tensor, expected: bytes | None, keep_out: bool) -> None:
        """The verified read of one entry, which every single-entry read of a buffered, uncompressed store
        is (:meth:`read_one`, a single small :meth:`read_into`): ``slot``'s chunk (payload below
        ``PIPELINE_BYTES``) is read with one ``preadv`` through the descriptor cache, one byte more than
        the chunk asked for (a longer file shows), and its size, its crc32c (header page, payload,
        padding) and its stored header (it must start with ``expected``; ``None``: the caller's header
        cannot match) are checked, with the same errors as :meth:`_read_buffered` (``tiercache_index``
        0).  ``out`` is a contiguous CPU tensor of ``slot.nbytes`` bytes (not checked here).  The payload
        lands straight in ``out`` (the header page and the tail in this thread's buffers), so ``out``
        holds garbage after a failure; with ``keep_out``, a chunk of at most ``_SMALL_PAGES`` pages is
        read whole into this thread's buffer instead and its payload copied into ``out`` only once
        verified (``out`` is never written from a damaged chunk)."""
        nbytes = slot.nbytes
        ref = slot.ref
        pages = ref[0]  # type: ignore[index]
        size = pages * PAGE + CRC_BYTES
        scratch = self._scratch
        whole = keep_out and pages <= _SMALL_PAGES
        if whole:
            chunk = scratch.small_view[: size + 1]
            views = [chunk]
        else:
            head = scratch.head
            pad = size - CRC_BYTES - HEADER_BYTES - nbytes
            tail = scratch.tail[: pad + CRC_BYTES + 1]  # padding, checksum, one byte more
            payload = (_CHAR_ARRAYS.get(nbytes) or _char_array(nbytes)).from_address(out.data_ptr())  # out outlives the read
            views = [head, payload, tail]
        try:
            got = self._fds.pread(ref, views, 0)
            if got is None:  # no cached descriptor: open one
                fds = self._fds
                handle = self._acquire_fd(slot)
                try:
                    got = os.preadv(handle.fd, views, 0)
                finally:
                    fds.release(handle)
            if got != size:
                raise CorruptEntryError(f"{self._chunk_file(slot)} {_wrong_size(got)}")
            crc32c = self._crc  # keeps the GIL (see _read_buffered)
            if whole:
                sound = crc32c(chunk[: size - CRC_BYTES], 0, 0) == _U32.unpack_from(chunk, size - CRC_BYTES)[0]
                stored = chunk.obj
            else:
                crc = crc32c(payload, crc32c(head, 0, 0), 0)
                if pad:
                    crc = crc32c(tail[:pad], crc, 0)
                sound = crc == _U32.unpack_from(tail, pad)[0]
                stored = head.obj
            if not sound:
                raise CorruptEntryError(f"{self._chunk_file(slot)} {BAD_CRC}")
            if expected is None or not stored.startswith(expected):  # (bytearray.startswith: memcmp)
                decode_header(memoryview(stored)[:HEADER_BYTES])  # a damaged header says so in the error
                raise CorruptEntryError(f"{self._chunk_file(slot)} {OTHER_ENTRY}")
        except CorruptEntryError as exc:
            exc.tiercache_index = 0  # type: ignore[attr-defined]
            raise
        if whole and nbytes:  # only now is out written
            memmove_holding_gil(out.data_ptr(), scratch.small_address + HEADER_BYTES, nbytes)

    def _read_buffered(
        self, items: Sequence[tuple[Slot, EntryHeader, torch.Tensor]], parts: list[list[memoryview]],
        taken: Iterator[int], n: int, handles: list | None = None,
    ) -> None:
        """The loop of :meth:`read_into` for buffered reads of an uncompressed store: take the next item
        (``next(taken)``) until ``n``, and read its chunk with the payload scattered into ``parts[i]``,
        checking size, crc32c and header as :meth:`_pread_checked` and :meth:`_check_stored` do (the same
        errors, with ``tiercache_index`` = ``i``).  One frame per batch instead of four calls per item;
        the checksums of pieces below ``PIPELINE_BYTES`` keep the GIL (a few microseconds of CPU each):
        releasing and retaking it twice per entry costs more than that whenever another thread, e.g. the
        model a read ahead overlaps, holds it.  ``handles``: the items' cached descriptors, taken by the
        caller (``FdCache.lookup_many``, released by it), ``None`` where none was open (opened and released
        here); without it each read looks its descriptor up and releases it."""
        fds = self._fds
        lookup, release = fds.lookup, fds.release
        crc32c = self._crc
        scratch = self._scratch  # this thread's buffers
        head, tail_buf = scratch.head, scratch.tail
        head_bytes = scratch.head_bytes  # head's bytearray: its startswith is one memcmp
        prefixes = self._prefixes
        preadv = os.preadv
        unpack_from = _U32.unpack_from
        while True:
            i = next(taken)
            if i >= n:
                return
            slot, header, _ = items[i]
            nbytes = slot.nbytes
            ref = slot.ref
            try:
                if nbytes >= PIPELINE_BYTES:
                    self._read_payload_into(slot, header, parts[i])
                    continue
                held = handles[i] if handles is not None else lookup(ref)
                handle = held if held is not None else self._acquire_fd(slot)
                size = ref[0] * PAGE + CRC_BYTES  # type: ignore[index]
                tail = tail_buf[: size - HEADER_BYTES - nbytes + 1]  # one byte more: sees a longer file
                try:
                    got = preadv(handle.fd, [head, *parts[i], tail], 0)
                finally:
                    if handles is None or held is None:
                        release(handle)
                if got != size:
                    raise CorruptEntryError(f"{self._chunk_file(slot)} {_wrong_size(got)}")
                crc = crc32c(head, 0, 0)
                for part in parts[i]:
                    crc = crc32c(part, crc, 0)
                stored_at = tail.nbytes - 1 - CRC_BYTES
                crc = crc32c(tail[:stored_at], crc, 0)
                if crc != unpack_from(tail, stored_at)[0]:
                    raise CorruptEntryError(f"{self._chunk_file(slot)} {BAD_CRC}")
                cached = prefixes.get(ref)
                if cached is not None and (cached[2] is header or cached[0] is header):
                    expected = cached[1]  # _expected_prefix's identity tests, inlined (the facade's case)
                else:
                    expected = self._expected_prefix(ref, header)  # type: ignore[arg-type]
                # (bytearray.startswith is a memcmp; comparing a memoryview slice goes byte by byte)
                if header.nbytes != nbytes or not head_bytes.startswith(expected):
                    decode_header(head)  # a damaged header says so in the error
                    raise CorruptEntryError(f"{self._chunk_file(slot)} {OTHER_ENTRY}")
            except CorruptEntryError as exc:
                exc.tiercache_index = i  # type: ignore[attr-defined]
                raise

    def _read_direct(
        self, items: Sequence[tuple[Slot, EntryHeader, torch.Tensor]], parts: list[list[memoryview]],
        aligned: list[bool], taken: Iterator[int], n: int,
    ) -> None:
        """The loop of :meth:`read_into` for direct (``O_DIRECT``) reads of an uncompressed store, as
        :meth:`_read_buffered` is for buffered ones: take the next item until ``n`` and read its chunk
        straight into ``parts[i]`` when ``aligned[i]`` (else through this thread's page-aligned bounce
        buffer, copied out only once verified), with the checks, errors and alignment fallback of
        :meth:`_pread_checked` and :meth:`_check_stored` (``tiercache_index`` = ``i``).  Small direct reads
        are short waits on the device between a few microseconds of Python: one frame per batch, and the
        bounce buffer is found once per batch (the checksums release the GIL from 32 KiB, crc32c's default:
        keeping it for 48 KiB entries measured no better with 8 threads)."""
        fds = self._fds
        lookup, release = fds.lookup, fds.release
        crc32c = self._crc
        scratch = self._scratch  # this thread's buffers
        dhead, dtail = scratch.dhead, scratch.dtail
        prefixes = self._prefixes
        preadv = os.preadv
        unpack_from = _U32.unpack_from
        bounce, room = scratch.dhead, 0  # this thread's bounce buffer (none yet)
        while True:
            i = next(taken)
            if i >= n:
                return
            slot, header, _ = items[i]
            nbytes = slot.nbytes
            ref = slot.ref
            try:
                if nbytes >= PIPELINE_BYTES:
                    self._read_payload_into(slot, header, parts[i], aligned[i])
                    continue
                size = ref[0] * PAGE + CRC_BYTES  # type: ignore[index]
                handle = lookup(ref)
                if handle is None:
                    handle = self._acquire_fd(slot)
                try:
                    got = -1
                    if aligned[i] and self._dio_into:
                        pad = size - CRC_BYTES - HEADER_BYTES - nbytes  # a multiple of dio_align, as nbytes is
                        tail = dtail[: pad + PAGE]  # padding, checksum, and room to see a longer file
                        try:
                            got = preadv(handle.fd, [dhead, *parts[i], tail], 0)
                        except OSError as exc:
                            if exc.errno != errno.EINVAL:
                                raise
                            self._refuse_dio_alignment()
                            got = -1
                        if got >= 0:
                            head, into = dhead, True
                    if got < 0:
                        need = -(-(size + PAGE) // PAGE) * PAGE  # room to see a file longer than expected
                        if need > room:
                            bounce = scratch.get(need)
                            room = bounce.nbytes
                        got = preadv(handle.fd, [bounce[:need]], 0)
                        head, into = bounce, False
                finally:
                    release(handle)
                if got != size:
                    raise CorruptEntryError(f"{self._chunk_file(slot)} {_wrong_size(got)}")
                if into:
                    crc = crc32c(dhead)
                    for part in parts[i]:
                        crc = crc32c(part, crc)
                    if pad:
                        crc = crc32c(tail[:pad], crc)
                    stored = unpack_from(tail, pad)[0]
                else:
                    crc = crc32c(bounce[: size - CRC_BYTES])
                    stored = unpack_from(bounce, size - CRC_BYTES)[0]
                if crc != stored:
                    raise CorruptEntryError(f"{self._chunk_file(slot)} {BAD_CRC}")
                cached = prefixes.get(ref)
                if cached is not None and (cached[2] is header or cached[0] is header):
                    expected = cached[1]  # _expected_prefix's identity tests, inlined (the facade's case)
                else:
                    expected = self._expected_prefix(ref, header)  # type: ignore[arg-type]
                # (as bytes: comparing a memoryview slice goes byte by byte)
                if header.nbytes != nbytes or head[: len(expected)].tobytes() != expected:
                    decode_header(head[:HEADER_BYTES])  # a damaged header says so in the error
                    raise CorruptEntryError(f"{self._chunk_file(slot)} {OTHER_ENTRY}")
                if not into:  # verified: now the caller's memory gets the payload
                    pos = HEADER_BYTES
                    for part in parts[i]:
                        part[:] = bounce[pos : pos + part.nbytes]
                        pos += part.nbytes
            except CorruptEntryError as exc:
                exc.tiercache_index = i  # type: ignore[attr-defined]
                raise

    def read_one(self, slot: Slot, out: torch.Tensor, key: bytes, dtype: str, shape: tuple[int, ...],
                 seq: int) -> None:
        """``read_into([(slot, EntryHeader(key, dtype, shape, slot.nbytes, seq), out)])`` for one contiguous
        CPU tensor ``out`` of ``slot.nbytes`` bytes (``ValueError`` otherwise), with the same checks (size,
        crc32c of the whole chunk, the stored header), errors (``tiercache_index`` 0) and confirmation of a
        failure before it is reported: the facade's single ``get``.  The header comes as its fields, so a
        read whose slot was last read or written with the same key, shape and dtype objects builds none.
        A buffered read of an uncompressed store below ``PIPELINE_BYTES`` is :meth:`_read_checked`, its
        payload read straight into ``out``; other reads take :meth:`_read_into`.  When it raises, ``out``
        holds garbage (the facade's fresh tensor, dropped)."""
        nbytes = slot.nbytes
        if out.nbytes != nbytes or not out.is_cpu or not out.is_contiguous():
            raise ValueError(f"read_one: out must be a contiguous CPU tensor of {nbytes} bytes, got "
                             f"{tuple(out.shape)} {out.dtype} on {out.device}")
        self.read_fresh(slot, out, key, dtype, shape, seq)

    def read_fresh(self, slot: Slot, out: torch.Tensor, key: bytes, dtype: str, shape: tuple[int, ...],
                   seq: int) -> None:
        """:meth:`read_one` into an ``out`` its caller has just made for this read, a contiguous CPU tensor
        of the entry's shape and dtype (``torch.empty``): only its size is checked again (``ValueError``),
        not its device or layout: the facade's single ``get`` (those checks are a measurable part of a warm
        64 KiB read).  The same reads, checks and errors as :meth:`read_one`.

        The common case is done here in one frame: a buffered, uncompressed chunk below ``PIPELINE_BYTES``
        whose header record is cached with these very fields, read with one ``preadv`` on a cached
        descriptor (:meth:`FdCache.pread`) and found sound (size, crc32c, header), as
        :meth:`_read_checked` checks it.  Anything else (no cached descriptor or header record, a short
        or long file, a checksum or header mismatch) is read again by :meth:`_read_fresh_checked`, which
        opens, reports and confirms damage as :meth:`read_one` does; ``out`` is written again there."""
        nbytes = slot.nbytes
        if out.nbytes != nbytes:  # the read writes nbytes at out's address: never past its end
            raise ValueError(f"read_fresh: out holds {out.nbytes} bytes, the payload is {nbytes}")
        ref = slot.ref
        cached = self._prefixes.get(ref)
        if (cached is not None and nbytes < PIPELINE_BYTES and not self.direct_io and self._codec is None
                and (known := cached[0]).key is key and known.shape is shape and known.dtype is dtype
                and known.seq == seq and known.nbytes == nbytes):
            pages = ref[0]  # type: ignore[index]
            pad = pages * PAGE - HEADER_BYTES - nbytes
            scratch = self._scratch  # this thread's buffers
            head, tail = scratch.head, scratch.tail[: pad + CRC_BYTES + 1]  # padding, checksum, one byte more
            payload = (_CHAR_ARRAYS.get(nbytes) or _char_array(nbytes)).from_address(out.data_ptr())
            if self._fds.pread(ref, [head, payload, tail], 0) == pages * PAGE + CRC_BYTES:
                crc32c = self._crc  # keeps the GIL (see _read_buffered)
                crc = crc32c(payload, crc32c(head, 0, 0), 0)
                if pad:
                    crc = crc32c(tail[:pad], crc, 0)
                if crc == _U32.unpack_from(tail, pad)[0] and scratch.head_bytes.startswith(cached[1]):
                    return
        self._read_fresh_checked(slot, out, key, dtype, shape, seq)

    def _read_fresh_checked(self, slot: Slot, out: torch.Tensor, key: bytes, dtype: str,
                            shape: tuple[int, ...], seq: int) -> None:
        """:meth:`read_fresh` through the general single-entry read (the reads, checks and errors of
        :meth:`read_one`)."""
        nbytes = slot.nbytes
        try:
            if self.direct_io or self._codec is not None or nbytes >= PIPELINE_BYTES:
                self._read_into([(slot, EntryHeader(key, dtype, shape, nbytes, seq), out)])
                return
            expected = self._expected_prefix(slot.ref, EntryHeader(key, dtype, shape, nbytes, seq))  # type: ignore[arg-type]
            self._read_checked(slot, out, expected, False)  # (out is the facade's: it drops it on failure)
        except CorruptEntryError as exc:
            payload = self._confirm_damage(slot, EntryHeader(key, dtype, shape, nbytes, seq), exc)
            if nbytes:  # sound: the caller gets the verified bytes
                ctypes.memmove(out.data_ptr(), payload.data_ptr(), nbytes)

    def read_into(self, items: Sequence[tuple[Slot, EntryHeader, torch.Tensor]]) -> None:
        """:meth:`_read_into` (its contract), with damage confirmed before it is reported: when an item
        fails its checks, its chunk is read again into a private buffer.  Damaged there too, the
        ``CorruptEntryError`` stands (the facade then drops the entry).  Sound there, the failure was not
        the stored chunk's (a transient read fault, or the destination written while the read filled it,
        e.g. two items or two calls sharing one ``out``): the batch is read once more, counted in
        ``confirmed_sound``; if that read fails again on an item whose private read verifies, a
        ``TierIOError`` says so and the entry is kept: a good entry is never dropped for what happened to
        its destination."""
        for _ in range(2):
            try:
                self._read_into(items)
                return
            except CorruptEntryError as exc:
                where = getattr(exc, "tiercache_index", None)
                if where is None:
                    raise
                slot, header, _ = items[where]
                self._confirm_damage(slot, header, exc)  # raises exc when the chunk is damaged
                failed = exc
        raise TierIOError(
            f"{self._chunk_file(slot)}: reads into the caller's buffer keep failing their checks ({failed}) while "
            "a read into a private buffer verifies: is the destination written concurrently, or shared by "
            "two items?") from failed

    def _confirm_damage(self, slot: Slot, header: EntryHeader, exc: CorruptEntryError) -> torch.Tensor:
        """Read ``slot`` again into a private buffer: raise ``exc`` if it is damaged there too, else count
        the sound re-read and return its payload (a fresh uint8 tensor)."""
        try:
            payload = self.read(slot, header)
        except CorruptEntryError:
            raise exc from None
        with self._stats_lock:
            self.confirmed_sound += 1
        log.warning("tiercache: %s failed its checks (%s) but read again into a private buffer it verifies; "
                    "kept", self._chunk_file(slot), exc)
        return payload

    def read(self, slot: Slot, header: EntryHeader, into: torch.Tensor | None = None) -> torch.Tensor:
        """The verified payload (checksum, and the stored header must equal ``header``).  With ``into``
        (1-D contiguous uint8 CPU, at least ``slot.nbytes`` long) the payload is read into it and a view
        of it returned; otherwise into a fresh tensor."""
        if into is not None:
            if into.device.type != "cpu" or into.dtype != torch.uint8 or into.dim() != 1 or not into.is_contiguous():
                raise ValueError("the read buffer must be a 1-D contiguous uint8 CPU tensor")
            if into.numel() < slot.nbytes:
                raise ValueError(f"the read buffer holds {into.numel()} bytes, the payload needs {slot.nbytes}")
            out = into[: slot.nbytes]
        else:
            out = torch.empty(slot.nbytes, dtype=torch.uint8)
        self._read_payload_into(slot, header, [memoryview(out.numpy())] if slot.nbytes else [])
        return out

    # -- ranged (sector) reads -------------------------------------------------------------------------
    def _batch_workers(self, items: Sequence[tuple], per_thread: int | None) -> int:
        """Threads for a batch read of ``items`` (tuples whose first field is the slot): at most one per item
        and one per ``per_thread`` bytes (``None``: no byte bound), up to the tier's limit.  Buffered reads
        of warm chunks are memory copies and checksums, CPU work: more threads than idle CPUs only contend
        for them (and for the GIL between reads) with whatever else runs, e.g. the model a read ahead
        overlaps (see spare_cpus).  Direct reads wait on the device, where more reads in flight help, up to
        direct_read_threads."""
        n = len(items)
        if n <= 1:
            return 1
        limit = self._direct_threads if self.direct_io else min(self._io_threads, _CPUS, 1 + spare_cpus())
        if limit <= 1:
            return 1
        if per_thread is None:
            return min(limit, n)
        return min(limit, n, max(1, sum([item[0].nbytes for item in items]) // per_thread))

    def read_ranges(self, items: Sequence[tuple[Slot, EntryHeader, torch.Tensor, Sequence[tuple[int, int]]]]) -> int:
        """For each ``(slot, header, out, ranges)``: copy the payload bytes ``[start, stop)`` of every range
        into the same byte offsets of ``out`` (a contiguous CPU tensor of ``slot.nbytes`` bytes, any dtype),
        leaving every other byte of ``out`` untouched.  ``ranges`` are sorted, non-overlapping and inside
        the payload (the caller checked them).  Returns the payload bytes read from the files.

        An entry with a sector table (version 3, uncompressed) is read by sectors: one read per run of
        consecutive sectors that the ranges touch (page-aligned, so ``O_DIRECT`` applies), each sector
        verified against its crc32c before its bytes are copied (a run whose every byte is asked for is
        read straight into ``out`` where alignment allows, and verified there).  The table is known from
        the write or the open scan; after an open that loaded ``index.tc`` the first ranged read of an
        entry reads its header page for it (:meth:`_learn_sectors`).  Any other entry (a version-2 store,
        a compressed one) is read whole and verified as :meth:`read` does, through a private buffer.
        Damage: ``CorruptEntryError`` with ``tiercache_index`` = the item's position, once a whole read
        of the entry into a private buffer has confirmed it (a sound one: its ranges are copied from that
        read, counted in ``confirmed_sound``), as :meth:`read_into` does.  Batches of direct reads are
        spread over ``direct_read_threads``.  Thread-safe for distinct slots."""
        n = len(items)
        done: list[int] = []  # bytes read per item (list.append is atomic)
        saved: list[int] = []
        # Direct ranged reads wait on the device whatever their size: one thread per item, up to the limit.
        workers = self._batch_workers(items, None if self.direct_io else MIN_BUFFERED_BYTES_PER_THREAD)
        taken = itertools.count()

        def run() -> None:
            read_one = self._read_ranges_one
            while True:
                i = next(taken)
                if i >= n:
                    return
                slot, header, out, ranges = items[i]
                try:
                    got = read_one(slot, header, out, ranges)
                except CorruptEntryError as exc:
                    try:
                        payload = self._confirm_damage(slot, header, exc)
                    except CorruptEntryError as confirmed:
                        confirmed.tiercache_index = i  # type: ignore[attr-defined]
                        raise
                    _copy_ranges(out.data_ptr(), payload.data_ptr(), 0, ranges)
                    got = slot.nbytes
                done.append(got)
                saved.append(slot.nbytes - got)

        if workers <= 1:
            run()
        else:
            self._read_spread(run, workers)
        total = sum(done)
        with self._stats_lock:
            self.ranged_reads += n
            self.ranged_bytes_saved += sum(saved)
        return total

    def _read_ranges_one(self, slot: Slot, header: EntryHeader, out: torch.Tensor,
                         ranges: Sequence[tuple[int, int]]) -> int:
        """:meth:`read_ranges` of one item without the confirmation of damage; the payload bytes read."""
        ref = slot.ref
        if self._codec is not None or self.format_version < 3:
            return self._read_whole_ranges(slot, header, out, ranges)
        known = self._sectors.get(ref)  # type: ignore[arg-type]
        if known is None or known[0] != header.seq:
            known = self._learn_sectors(slot, header)
            if known is None:  # the entry has no table
                return self._read_whole_ranges(slot, header, out, ranges)
        _, shift, crcs = known
        nbytes = slot.nbytes
        runs: list[list[int]] = []  # [first sector, end sector) of each run the ranges touch
        for start, stop in ranges:
            first, end = start >> shift, ((stop - 1) >> shift) + 1
            if runs and first <= runs[-1][1]:
                if end > runs[-1][1]:
                    runs[-1][1] = end
            else:
                runs.append([first, end])
        fds = self._fds
        handle = fds.lookup(ref)
        if handle is None:
            handle = self._acquire_fd(slot)
        crc32c = self._crc
        unpack_from = _U32.unpack_from
        dst = out.data_ptr()
        direct = self.direct_io
        size = 1 << shift
        n_ranges = len(ranges)
        got = 0
        try:
            fd = handle.fd
            r = 0  # the first range not yet copied
            for first, end in runs:
                lo = first << shift
                hi = min(end << shift, nbytes)
                span = hi - lo
                # The ranges inside this run (each range lies in one run): do they cover all of it?
                j, covered = r, 0
                while j < n_ranges and ranges[j][0] < hi:
                    covered += ranges[j][1] - ranges[j][0]
                    j += 1
                n = -1
                if covered == span and (not direct or (
                        self._dio_into and span % self.dio_align == 0 and (dst + lo) % self.dio_mem_align == 0)):
                    # Every byte of the run is asked for: read it straight into out, then verify it there (on
                    # damage out's asked bytes hold what was read; the caller gets KeyError or, when a
                    # private re-read verifies, the verified bytes)
                    view = memoryview((_CHAR_ARRAYS.get(span) or _char_array(span)).from_address(dst + lo)).cast("B")
                    try:
                        n = os.preadv(fd, [view], HEADER_BYTES + lo)
                    except OSError as exc:
                        if not direct or exc.errno != errno.EINVAL:
                            raise
                        self._refuse_dio_alignment()  # then through the bounce buffer, below
                    if n >= 0 and n != span:
                        raise CorruptEntryError(f"{self._chunk_file(slot)} {_wrong_size(n)}")
                    base = 0
                if n < 0:
                    length = -(-span // PAGE) * PAGE  # whole pages (the payload is padded to them)
                    view, address = self._scratch.bounce(length)
                    n = os.preadv(fd, [view[:length]], HEADER_BYTES + lo)
                    if n != length:
                        raise CorruptEntryError(f"{self._chunk_file(slot)} {_wrong_size(n)}")
                    base = address
                for sector in range(first, end):
                    at = (sector << shift) - lo
                    if crc32c(view[at : min(at + size, span)]) != unpack_from(crcs, 4 * sector)[0]:
                        raise CorruptEntryError(f"{self._chunk_file(slot)} sector {sector} {BAD_CRC}")
                got += span
                if base:
                    for start, stop in ranges[r:j]:
                        _range_copy(dst + start, base + start - lo, stop - start)
                r = j
        finally:
            fds.release(handle)
        return got

    def _learn_sectors(self, slot: Slot, header: EntryHeader) -> tuple[int, int, bytes] | None:
        """The sector table of ``slot``'s entry from its header page (read alone: an open that loaded
        ``index.tc`` has no tables), kept for the next reads; ``None`` when the entry has none.  The page is
        checked as a read checks it (its identity record must be ``header``'s; the table must fit the
        page), not by the chunk's crc, which covers the whole file: a damaged table only makes sectors
        fail their crcs, and that damage is confirmed by a whole read before it is reported."""
        handle = self._fds.lookup(slot.ref)
        if handle is None:
            handle = self._acquire_fd(slot)
        try:
            head = self._scratch.dhead  # page-aligned, HEADER_BYTES long
            got = os.preadv(handle.fd, [head], 0)
        finally:
            self._fds.release(handle)
        if got != HEADER_BYTES:
            raise CorruptEntryError(f"{self._chunk_file(slot)} {_wrong_size(got)}")
        self._check_stored(slot, head, header)
        decode_header(head, (self.format_version,))  # the table's shift and size are possible
        table = sector_table(head, header)
        if table is None:
            return None
        known = (header.seq, *table)
        with self._lock:
            if self._headers.get(slot.ref) is not None:  # (still live)
                self._sectors[slot.ref] = known  # type: ignore[index]
        return known  # type: ignore[return-value]

    def _read_whole_ranges(self, slot: Slot, header: EntryHeader, out: torch.Tensor,
                           ranges: Sequence[tuple[int, int]]) -> int:
        """Read ``slot``'s whole verified payload into this thread's buffer and copy the ranges into ``out``
        (an entry without a sector table: a version-2 or compressed store, an empty value)."""
        nbytes = slot.nbytes
        view, address = self._scratch.bounce(max(nbytes, 1))
        part = [view[:nbytes]] if nbytes else []
        if self._codec is not None:
            self._read_payload_into(slot, header, part)
        else:
            pages = slot.ref[0]  # type: ignore[index]
            fds = self._fds
            handle = fds.lookup(slot.ref)
            if handle is None:
                handle = self._acquire_fd(slot)
            try:
                # (the bounce buffer is page-aligned: a direct read lands the payload in it when its size
                # keeps the next piece aligned)
                head, problem = self._pread_checked(handle.fd, pages, part, nbytes, nbytes % self.dio_align == 0)
                if problem is not None:
                    raise CorruptEntryError(f"{self._chunk_file(slot)} {problem}")
                self._check_stored(slot, head, header)
            finally:
                fds.release(handle)
        _copy_ranges(out.data_ptr(), address, 0, ranges)
        return nbytes

    #: ``read_into`` also takes row-contiguous destinations of any dtype (see :func:`byte_parts`), e.g. a
    #: block slice of a larger ``(batch, heads, tokens, head_dim)`` buffer, reading into them in place.
    reads_strided = True

    def _read_into(self, items: Sequence[tuple[Slot, EntryHeader, torch.Tensor]]) -> None:
        """Fill each ``(slot, header, out)``'s ``out`` with the verified payload (contract C2), spreading
        the reads over the tier's read threads (``direct_read_threads`` for direct reads; ``io_threads`` for
        compressed ones, and for buffered ones only with :data:`SPLIT_BUFFERED`: else on the calling thread).
        ``out`` is a CPU tensor of exactly ``slot.nbytes`` bytes: 1-D contiguous uint8 (C2), or any dtype
        and shape whose last dimension is contiguous (its rows are filled by one vectored read;
        ``reads_strided``).  On damage raises ``CorruptEntryError`` with
        ``tiercache_index`` = the first damaged item's position; other I/O failures raise ``OSError``.
        Thread-safe for distinct slots."""
        direct = self.direct_io and self._dio_into  # payloads may land in out without a bounce copy
        buffered = not self.direct_io and self._codec is None  # the common case: _read_buffered
        align, mem_align = self.dio_align, self.dio_mem_align
        if len(items) == 1:  # a single get: no closure, no thread bookkeeping
            slot, header, out = items[0]
            if (buffered and slot.nbytes <= SMALL_READ_BYTES and out.is_cpu and out.is_contiguous()
                    and slot.ref[0] <= _SMALL_PAGES):  # type: ignore[index]
                self._read_small(slot, header, out)
                return
            parts = byte_parts(out, slot.nbytes)
            if buffered:
                self._read_buffered(items, [parts], itertools.count(), 1)
                return
            try:
                aligned = direct and dio_aligned(out, slot.nbytes, align, mem_align)
                self._read_payload_into(slot, header, parts, aligned)
            except CorruptEntryError as exc:
                exc.tiercache_index = 0  # type: ignore[attr-defined]
                raise
            return
        parts, aligned = batch_parts(items, direct, align, mem_align)
        n = len(items)
        workers = (1 if buffered and not SPLIT_BUFFERED else
                   self._batch_workers(items, MIN_BUFFERED_BYTES_PER_THREAD if buffered else MIN_BYTES_PER_THREAD))
        # Each thread takes the next unread item (itertools.count's next is atomic under the GIL) rather
        # than a fixed share: on a busy machine a descheduled thread's share would otherwise wait for it
        # while the others idle.  Items are taken in order, so the lowest failed position is the first
        # damaged item: every item before it was taken, and read, by some thread.
        taken = itertools.count()
        if buffered:
            # The batch's cached descriptors are taken (and given back) in one lock round trip each.
            handles = self._fds.lookup_many([slot.ref for slot, _, _ in items])
            try:
                if workers <= 1:
                    self._read_buffered(items, parts, taken, n, handles)
                else:
                    self._read_spread(partial(self._read_buffered, items, parts, taken, n, handles), workers)
            finally:
                self._fds.release_many(handles)
            return
        if (DIRECT_CHECK_APART and workers > 1 and self._codec is None and self._dio_into and all(aligned)
                and max([s.nbytes for s, _, _ in items]) < PIPELINE_BYTES):
            if self._read_direct_apart(items, parts, n, workers):
                return
            aligned = [False] * n  # the device refused the alignment: through bounce buffers
            taken = itertools.count()
        if self._codec is None:
            run = partial(self._read_direct, items, parts, aligned, taken, n)
        else:
            def run() -> None:
                read = self._read_payload_into
                while True:
                    i = next(taken)
                    if i >= n:
                        return
                    slot, header, _ = items[i]
                    try:
                        read(slot, header, parts[i], aligned[i])
                    except CorruptEntryError as exc:
                        exc.tiercache_index = i  # type: ignore[attr-defined]
                        raise
        if workers <= 1:
            run()
            return
        self._read_spread(run, workers)

    def _read_direct_apart(self, items: Sequence[tuple[Slot, EntryHeader, torch.Tensor]],
                           parts: list[list[memoryview]], n: int, workers: int) -> bool:
        """:meth:`_read_direct` for a batch whose payloads all land straight in ``parts`` (every item
        aligned, below ``PIPELINE_BYTES``), with reading and checking apart: ``workers`` pool threads
        only issue the ``preadv`` s (each chunk's header page and tail into this batch's own slice of the
        calling thread's page-aligned buffer), and this thread checks each chunk (size, crc32c, stored
        header) as its read completes, the reads of the others still in flight; when no read is waiting
        to be checked it reads the next item itself (so with every pool thread busy with other work it
        reads the whole batch, and queued helpers are cancelled).  The same checks and
        errors (``tiercache_index``: the lowest damaged item); returns only once every pool thread is
        done with the batch.  Returns False, with nothing verified, when the device refused a read's
        alignment (``_refuse_dio_alignment`` called: the caller reads the batch through bounce buffers)."""
        if self._pool is None:
            with self._lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(max(self._io_threads, self._direct_threads),
                                                    thread_name_prefix="tiercache-disk")
        stride = 3 * PAGE  # per item: its header page, then padding + checksum + room to see a longer file
        room = self._scratch.get(n * stride)  # this thread's: it does not read while the batch is out
        done: queue.SimpleQueue = queue.SimpleQueue()
        taken = itertools.count()
        preadv = os.preadv
        fds = self._fds

        lookup, release = fds.lookup, fds.release

        def read_one(i: int) -> int | BaseException:
            slot = items[i][0]
            ref = slot.ref
            at = i * stride
            pad = ref[0] * PAGE - HEADER_BYTES - slot.nbytes  # type: ignore[index]
            try:
                handle = lookup(ref)
                if handle is None:
                    handle = self._acquire_fd(slot)
                try:
                    return preadv(handle.fd, [room[at : at + PAGE], *parts[i], room[at + PAGE : at + 2 * PAGE + pad]], 0)
                finally:
                    release(handle)
            except BaseException as exc:  # noqa: BLE001  (handed to the checking thread)
                return exc

        def read() -> None:
            put = done.put
            while True:
                i = next(taken)
                if i >= n:
                    return
                put((i, read_one(i)))

        futures = [self._pool.submit(read) for _ in range(workers)]
        crc32c = self._crc
        unpack_from = _U32.unpack_from
        prefixes = self._prefixes
        get = done.get
        corrupt: CorruptEntryError | None = None
        other: BaseException | None = None
        refused = False
        ready = done.get_nowait
        try:
            for _ in range(n):
                try:
                    i, got = ready()
                except queue.Empty:  # nothing to check: this thread reads the next item itself (when the
                    i = next(taken)  # pool's threads are busy with other work, it reads the whole batch)
                    got = read_one(i) if i < n else None
                    if got is None:
                        i, got = get()
                if isinstance(got, BaseException):
                    if isinstance(got, OSError) and got.errno == errno.EINVAL:
                        refused = True
                    elif isinstance(got, CorruptEntryError):
                        if corrupt is None or i < corrupt.tiercache_index:  # type: ignore[attr-defined]
                            got.tiercache_index = i  # type: ignore[attr-defined]
                            corrupt = got
                    elif other is None:
                        other = got
                    continue
                slot, header, _ = items[i]
                ref = slot.ref
                nbytes = slot.nbytes
                size = ref[0] * PAGE + CRC_BYTES  # type: ignore[index]
                pad = size - CRC_BYTES - HEADER_BYTES - nbytes
                at = i * stride
                head = room[at : at + PAGE]
                problem = None
                if got != size:
                    problem = _wrong_size(got)
                else:
                    crc = crc32c(head)
                    for part in parts[i]:
                        crc = crc32c(part, crc)
                    if pad:
                        crc = crc32c(room[at + PAGE : at + PAGE + pad], crc)
                    if crc != unpack_from(room, at + PAGE + pad)[0]:
                        problem = BAD_CRC
                    else:
                        cached = prefixes.get(ref)
                        if cached is not None and (cached[2] is header or cached[0] is header):
                            expected = cached[1]
                        else:
                            expected = self._expected_prefix(ref, header)  # type: ignore[arg-type]
                        if header.nbytes != nbytes or head[: len(expected)].tobytes() != expected:
                            try:
                                decode_header(head)  # a damaged header says so in the error
                                problem = OTHER_ENTRY
                            except CorruptEntryError as exc:
                                problem = str(exc)
                if problem is not None and (corrupt is None or i < corrupt.tiercache_index):  # type: ignore[attr-defined]
                    corrupt = CorruptEntryError(f"{self._chunk_file(slot)} {problem}")
                    corrupt.tiercache_index = i  # type: ignore[attr-defined]
        finally:
            for future in futures:
                if not future.cancel():
                    future.exception()  # wait: its thread may still be between reads of this batch
        if refused:
            self._refuse_dio_alignment()
            return False
        if corrupt is not None:
            raise corrupt
        if other is not None:
            raise other
        return True

    def _read_spread(self, run: Callable[[], None], workers: int) -> None:
        """``run`` (a read loop taking items off a shared counter) on this thread and ``workers - 1`` pool
        threads; returns once every started one is done, raising the first damaged item's ``CorruptEntryError``
        (the lowest ``tiercache_index``), else the first other error.  Pool tasks still queued when this
        thread's loop ends are cancelled: every item has been taken by then (or this call fails anyway), so
        they would only return at once, after the other batches' reads queued before them in the shared pool."""
        if self._pool is None:
            with self._lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(max(self._io_threads, self._direct_threads),
                                                    thread_name_prefix="tiercache-disk")
        futures = [self._pool.submit(run) for _ in range(workers - 1)]
        errors = []
        try:
            run()  # this thread reads too instead of waiting idle
        except BaseException as exc:
            errors.append(exc)
        for future in futures:
            if future.cancel():  # never started: nothing of this batch left for it
                continue
            exc = future.exception()
            if exc is not None:
                errors.append(exc)
        if errors:
            corrupt = [e for e in errors if isinstance(e, CorruptEntryError)]
            raise min(corrupt, key=lambda e: e.tiercache_index) if corrupt else errors[0]  # type: ignore[attr-defined]

    @staticmethod
    def chunk_bytes(slot: Slot) -> int:
        """Size of the uncompressed chunk file of ``slot``: header page, payload pages, crc32c."""
        pages, _ = slot.ref  # type: ignore[misc]
        return int(pages) * PAGE + CRC_BYTES

    def discard(self, slot: Slot) -> None:
        """Delete the slot's chunk file.  If removing it fails, a tombstone is appended (fsynced) to
        ``tombstones.tc`` so the entry stays deleted after a reopen; only when that fails too does this
        raise ``TierIOError``.  After :meth:`close` has begun it raises ``TierIOError`` and deletes nothing:
        close chose which chunk files ``index.tc`` keeps (a late discard of a released copy could delete the
        kept one of its key), and another process may own the store by then."""
        pages, row = slot.ref  # type: ignore[misc]
        path = self._chunk_file(slot)
        if self._closed:
            raise self._closed_error(path)
        self._before_change()
        self._fds.forget(slot.ref)
        with self._lock:
            if self._closed:  # (checked again where close decides)
                raise self._closed_error(path)
            header = self._headers.pop((pages, row), None)
            if header is not None:
                header = self._header_of(header)
            self._prefixes.pop((pages, row), None)
            self._sectors.pop((pages, row), None)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            if header is not None:
                try:
                    journal.append_tombstone(self._tomb_path, pages, row, header.seq, self._crc)
                    with self._lock:
                        self._tomb_rows.add((pages, row))
                    log.warning("tiercache: deleting %s failed (%s); recorded a tombstone instead", path, exc.strerror)
                    self.tombstoned += 1
                    return
                except OSError as exc2:
                    raise TierIOError(
                        f"disk tier: deleting {path} failed ({exc.strerror}) and so did recording its tombstone "
                        f"({exc2.strerror}): the entry may come back after a reopen", exc.errno
                    ) from exc
            raise TierIOError(f"disk tier: deleting {path} failed: {exc.strerror}", exc.errno) from exc

    @staticmethod
    def _closed_error(path: str) -> TierIOError:
        return TierIOError(f"disk tier: not deleting {path}: the tier is closed (its index is written)", errno.EBADF)

    # -- recovery -------------------------------------------------------------------------------------
    def recover(self) -> Iterator[RecoveredEntry]:
        """The entries of the store: from ``index.tc`` when it is valid, else by scanning the chunk files
        (the newest valid copy of each key wins; stale, damaged and tombstoned files are deleted).  Raises
        :class:`DiskOverBudgetError` before yielding anything when they exceed the budget."""
        yield from self._recover(False)[1]

    def recover_columns(self) -> tuple[RecoveredColumns | None, list[RecoveredEntry]]:
        """:meth:`recover` for a caller that takes columns: ``(columns, [])`` when ``index.tc`` was loaded
        (no header object is built per entry), else ``(None, entries)`` (what :meth:`recover` yields).
        The same checks and effects; :class:`DiskOverBudgetError` likewise, raised here."""
        return self._recover(True)

    def _recover(self, columns: bool) -> tuple[RecoveredColumns | None, list[RecoveredEntry]]:
        _remove_stale_index_temps(self._root)
        collecting = gc.isenabled()
        gc.disable()  # building ~1e5 small objects: generation-2 passes would cost more than the load
        try:
            entries = self._load_index(columns)
            if entries is None:
                entries = self._scan()
        finally:
            if collecting:
                gc.enable()
        if self.index_state == "loaded":
            stored = self._loaded_bytes
        else:
            stored = sum(e.slot.charged for e in entries)  # type: ignore[union-attr]
        if stored > self.capacity:
            self._taken.clear()
            self._headers.clear()
            raise DiskOverBudgetError(self.root, stored, self.capacity)
        if self.index_state == "loaded":
            self._tomb_rows = set(journal.read_tombstones(self._tomb_path, self._crc))
        for pages, row in self._tomb_rows:
            self._taken.setdefault(pages, set()).add(row)
        if self.index_state != "loaded":  # the index path filled these in bulk
            for entry in entries:  # type: ignore[union-attr]
                pages, row = entry.slot.ref  # type: ignore[misc]
                self._taken.setdefault(pages, set()).add(row)
                self._headers[(pages, row)] = entry.header
                self._seq_high = max(self._seq_high, entry.header.seq)
        self._used = stored
        self._complete = True
        if isinstance(entries, RecoveredColumns):
            return entries, []
        return None, entries  # type: ignore[return-value]

    @property
    def seq_high_water(self) -> int:
        """The highest write sequence number this store has seen (persisted in the index at close)."""
        return self._seq_high

    def _scan(self) -> list[RecoveredEntry]:
        found: list[RecoveredEntry] = []
        tombs = journal.read_tombstones(self._tomb_path, self._crc)
        if os.path.isdir(self._slots_dir):
            for class_name in sorted(os.listdir(self._slots_dir)):
                class_dir = os.path.join(self._slots_dir, class_name)
                pages = int(class_name) if class_name.isdigit() and class_name.isascii() else 0
                if pages < 1 or str(pages) != class_name or not os.path.isdir(class_dir):
                    log.warning("tiercache: %s is not a size class of this store; ignored", class_dir)
                    self.corrupt_on_open += 1
                    continue
                self._check_class_metadata(class_dir, pages)
                self._arrays.add(pages)
                for name in os.listdir(class_dir):
                    if name == "zarr.json":
                        continue
                    path = os.path.join(class_dir, name)
                    if name.endswith(".tmp") or name.endswith(".partial"):
                        _unlink_quiet(path)  # a write that never reached its rename
                        continue
                    row = parse_chunk_name(name)
                    if row is None:
                        self._drop_damaged(path, CorruptEntryError("not a chunk name this store writes"))
                        continue
                    try:
                        header = self._scan_header(path, pages, row)
                    except CorruptEntryError as exc:
                        self._drop_damaged(path, exc)
                        continue
                    if tombs.get((pages, row), -1) >= header.seq:
                        _unlink_quiet(path)  # deleted, though removing the file failed back then
                        continue
                    found.append(RecoveredEntry(header, Slot((pages, row), header.nbytes, pages * PAGE + CRC_BYTES)))
        # The newest copy of a key wins, but only once its checksum is verified: a damaged header naming
        # another key must not cost that key its good copy.
        best: dict[bytes, RecoveredEntry] = {}
        verified: set[bytes] = set()  # keys whose winning copy passed a full checksum check
        for entry in sorted(found, key=lambda e: e.header.seq, reverse=True):
            key = entry.header.key
            if key not in best:
                best[key] = entry
                continue
            winner = best[key]
            if self._codec is None and key not in verified:
                try:
                    pages, _ = winner.slot.ref  # type: ignore[misc]
                    self._read_chunk(self._chunk_file(winner.slot), pages, winner.slot.nbytes)
                    verified.add(key)
                except CorruptEntryError as exc:
                    self._drop_damaged(self._chunk_file(winner.slot), exc)
                    best[key] = entry
                    continue
            _unlink_quiet(self._chunk_file(entry.slot))  # an older, superseded copy
        if tombs:
            self._rewrite_tombstones(tombs)
        return list(best.values())

    def _rewrite_tombstones(self, tombs: dict[tuple[int, int], int]) -> None:
        """Keep only the tombstones whose file still exists (its removal failed again); their slots stay
        out of use."""
        left = {ref: seq for ref, seq in tombs.items()
                if os.path.exists(f"{self._slots_dir}/{ref[0]}/{chunk_name(ref[1])}")}
        self._tomb_rows = set(left)
        try:
            if not left:
                os.unlink(self._tomb_path)
            else:
                tmp = f"{self._tomb_path}.rewrite"
                _unlink_quiet(tmp)
                for (pages, row), seq in left.items():
                    journal.append_tombstone(tmp, pages, row, seq, self._crc)
                os.replace(tmp, self._tomb_path)
            journal.fsync_dir(self._root)
        except OSError as exc:
            log.warning("tiercache: could not compact %s: %s", self._tomb_path, exc)

    def _check_class_metadata(self, class_dir: str, pages: int) -> None:
        """A size class whose ``zarr.json`` is missing or unreadable keeps its (self-describing, checksummed)
        chunks: the metadata is rewritten, logged and counted as a corruption."""
        meta = os.path.join(class_dir, "zarr.json")
        try:
            with open(meta, "rb") as f:
                ok = array_metadata_ok(f.read(), pages, self.compression)
            problem = "unreadable or not this store's"
        except FileNotFoundError:
            ok, problem = False, "missing"
        if not ok:
            log.warning("tiercache: %s was %s; rewrote it (its chunks are kept and verified)", meta, problem)
            journal.write_atomic(meta, array_metadata(pages, self.compression, self.compression_level))
            self.metadata_repaired += 1
            self.corrupt_on_open += 1

    def _drop_damaged(self, path: str, exc: Exception) -> None:
        log.warning("tiercache: dropping damaged chunk %s: %s", path, exc)
        self.corrupt_on_open += 1
        _unlink_quiet(path)

    def _scan_header(self, path: str, pages: int, row: int) -> EntryHeader:
        """The decoded header of the chunk at ``path`` (its sector table kept for ranged reads)."""
        versions = (self.format_version,)
        if self._codec is not None:
            header = decode_header(self._read_compressed(path, pages)[:HEADER_BYTES], versions)
        else:
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                raise CorruptEntryError("missing") from None
            try:
                if os.fstat(fd).st_size != pages * PAGE + CRC_BYTES:
                    raise CorruptEntryError("wrong size: truncated or overwritten")
                raw = os.pread(fd, HEADER_BYTES, 0)
                header = decode_header(raw, versions)
            finally:
                os.close(fd)
            table = sector_table(raw, header)
            if table is not None:
                self._sectors[(pages, row)] = (header.seq, *table)
        if class_pages(header.nbytes) != pages:
            raise CorruptEntryError("header size does not match its size class")
        return header

    # -- lifecycle ------------------------------------------------------------------------------------
    def describe(self) -> dict[str, object]:
        """Tier-specific facts for ``Cache.stats()`` (contract C4)."""
        return {
            "direct_io": self.direct_io,
            "direct_io_requested": self.direct_io_requested,
            "compression": self.compression,  # the store's own: a reopened store keeps it, whatever was asked
            "index": self.index_state,
            "metadata_repaired": self.metadata_repaired,
            "tombstones": self.tombstoned,
            "confirmed_sound": self.confirmed_sound,
            "format_version": self.format_version,
            "sector_bytes": self.sector_bytes,
            "ranged_reads": self.ranged_reads,
            "ranged_bytes_saved": self.ranged_bytes_saved,
        }

    def close(self) -> None:
        """Make everything durable (``os.sync``) and write ``index.tc`` for a fast reopen.  Of two chunk files
        of one key, the newer (higher sequence number) is kept and the other deleted; of two with the same
        sequence number (a moved entry's copy and its released source: the same bytes) the one written last,
        which is the moved entry's.  No file is deleted by :meth:`discard` once this has begun."""
        with self._lock:
            self._closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._fds.clear()
        os.sync()  # a clean close is durable across power loss, not only process death
        if self._index_live or not self._complete:
            return  # nothing changed since the index was loaded / never recovered: no full picture to write
        try:
            with self._lock:
                newest: dict[bytes, tuple[int, int, EntryHeader]] = {}
                header_of = self._header_of
                for (p, r), h in self._headers.items():
                    h = header_of(h)
                    other = newest.get(h.key)
                    if other is None or other[2].seq <= h.seq:  # (a tie: _headers is in write order)
                        newest[h.key] = (p, r, h)
                        if other is not None:
                            _unlink_quiet(f"{self._slots_dir}/{other[0]}/{chunk_name(other[1])}")  # superseded
                    else:
                        _unlink_quiet(f"{self._slots_dir}/{p}/{chunk_name(r)}")
                records = list(newest.values())
            data = journal.encode_index(records, self._class_mtimes(), self._seq_high, self._crc)
            journal.write_atomic(self._index_path, data)
        except OSError as exc:
            log.warning("tiercache: could not write the index of %s (%s); the next open scans", self.root, exc)


def _write_file(path: str, parts: list[bytes | memoryview]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_all(fd, parts)
    finally:
        os.close(fd)


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


def _remove_stale_index_temps(root: str) -> None:
    """Remove ``index.tc.<pid>.tmp`` files (``journal.write_atomic``) of processes that are gone: a close
    killed while writing the index left one, which nothing else ever removes."""
    prefix = journal.INDEX_NAME + "."
    try:
        names = [n for n in os.listdir(root) if n.startswith(prefix) and n.endswith(".tmp")]
    except OSError:
        return
    for name in names:
        pid = name[len(prefix):-4]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # that process is alive (it may be writing it)
        except ProcessLookupError:
            pass
        except OSError:  # (e.g. another user's process)
            continue
        log.warning("tiercache: removing %s, left by a process killed while closing the store", name)
        _unlink_quiet(os.path.join(root, name))


def _unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _remove_created(root: Path) -> None:
    """Undo a refused creation: remove what this open created in a directory it created."""
    for name in ("zarr.json",):
        _unlink_quiet(os.path.join(root, name))
    try:
        root.rmdir()
    except OSError:
        pass
