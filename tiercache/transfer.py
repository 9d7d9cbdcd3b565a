"""Byte movers: the copy engine (batched, asynchronous host<->GPU copies) and the disk read paths.

Mechanism only: nothing here decides placement.  The facade (:class:`tiercache.Cache`) pins the slots it
hands to these functions and keeps them pinned until the returned handle is done.

- :class:`CopyEngine` owns one CUDA stream per device and enqueues batched gathers/scatters (the
  ``tiercache_kernels`` gather kernel: one launch for N scattered blocks) on it, after making it wait on
  the caller's current stream.  It returns a :class:`TransferHandle` with a CUDA ``event``: a caller can
  make its own stream wait on it (``handle.wait_stream()``) instead of synchronising the device, block
  the host on it (``handle.wait()``), or get a ``concurrent.futures.Future``.  Without CUDA it runs the
  torch reference synchronously and returns a completed handle.
- Disk->GPU: :func:`read_chunk_into` reads a :class:`tiercache.tiers.DiskTier` chunk into a (pinned)
  host buffer, checks its crc32c and header there, and returns the payload view, which a gather then
  moves to the GPU.  The checksum covers the whole chunk, so it has to be computed where the bytes are:
  on the pinned staging buffer.  :func:`kvikio_read_payload` reads a payload straight into GPU memory
  through kvikio (GPUDirect Storage where available, compat mode otherwise); it cannot verify the
  checksum, so the cache does not use it: the benchmark measures it beside the staged path.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from tiercache_kernels import copy_blocks, packed_layout

from .tiers.base import EntryHeader, Slot

__all__ = [
    "CopyEngine",
    "TransferHandle",
    "chunk_file_bytes",
    "kvikio_available",
    "kvikio_read_payload",
    "packed_layout",
    "read_chunk_into",
]


@dataclass
class TransferHandle:
    """One enqueued transfer.  ``result`` is what the transfer fills (e.g. the ``out`` buffer).

    ``event`` is the CUDA event recorded on the engine's stream after the copy (``None`` for a transfer
    that already completed on the CPU).  ``backend`` says which implementation ran ("kernel", "torch",
    "mixed" or "reference").  The handle keeps its sources and destination alive until it is waited on.
    Methods are thread-safe."""

    result: Any = field(repr=False)
    event: torch.cuda.Event | None = None
    backend: str = "reference"
    device: torch.device | None = None
    keepalive: tuple[Any, ...] = field(default=(), repr=False)

    def done(self) -> bool:
        """Whether the copy has finished (never blocks)."""
        return self.event is None or self.event.query()

    def wait(self) -> Any:
        """Block the calling host thread until the copy has finished (not the whole device); returns
        ``result``."""
        if self.event is not None:
            self.event.synchronize()
        self.keepalive = ()
        return self.result

    def wait_stream(self, stream: torch.cuda.Stream | None = None) -> None:
        """Make ``stream`` (default: the current stream) wait for the copy, without blocking the host.
        Work enqueued on ``stream`` afterwards sees the copied bytes."""
        if self.event is not None:
            (stream if stream is not None else torch.cuda.current_stream(self.device)).wait_event(self.event)

    def future(self) -> Future[Any]:
        """A ``concurrent.futures.Future`` resolved with ``result`` once the copy has finished (a daemon
        thread waits on the event)."""
        fut: Future[Any] = Future()
        if self.done():
            fut.set_result(self.wait())
            return fut

        def waiter() -> None:
            try:
                fut.set_result(self.wait())
            except BaseException as exc:  # pragma: no cover - event errors are CUDA errors
                fut.set_exception(exc)

        threading.Thread(target=waiter, name="tiercache-copy-wait", daemon=True).start()
        return fut


class CopyEngine:
    """Batched copies on a dedicated CUDA stream of ``device`` (or synchronously on the CPU).

    ``device``: a CUDA device, or ``None``/``"cpu"`` for the reference path.  ``priority``: the stream
    priority (lower is higher priority in CUDA).  Each call first makes the engine's stream wait on the
    caller's current stream (``wait_current=True``, the default), so tensors produced there are complete
    before they are read; pass ``wait_current=False`` when nothing the copy touches is produced on that
    stream, so the copy overlaps the work already queued there (a prefetch beside compute).  The returned
    handle's event marks the end of the copy.  Destination CUDA tensors are recorded on the engine's
    stream so the caching allocator does not reuse them too early.  Thread-safe: calls from several
    threads are serialised on the one stream in call order.
    """

    def __init__(self, device: torch.device | str | None = None, *, priority: int = 0, backend: str = "auto") -> None:
        dev = torch.device(device) if device is not None else torch.device("cpu")
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError(f"CopyEngine({dev}) needs CUDA, which is not available")
            if dev.index is None:
                dev = torch.device("cuda", torch.cuda.current_device())
            self.stream: torch.cuda.Stream | None = torch.cuda.Stream(dev, priority=priority)
        elif dev.type == "cpu":
            self.stream = None
        else:
            raise ValueError(f"CopyEngine supports cpu and cuda devices, got {dev}")
        self.device = dev
        self.backend = backend
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"CopyEngine(device={self.device}, backend={self.backend!r})"

    def _enqueue(self, fn: Any, result: Any, tensors: Sequence[torch.Tensor], wait_current: bool) -> TransferHandle:
        if self.stream is None:
            backend = fn(None)
            return TransferHandle(result, None, backend)
        with self._lock:
            if wait_current:
                self.stream.wait_stream(torch.cuda.current_stream(self.device))
            backend = fn(self.stream)
            event = torch.cuda.Event()
            event.record(self.stream)
            for t in tensors:
                if t.device.type == "cuda":
                    t.record_stream(self.stream)
        return TransferHandle(result, event, backend, self.device, tuple(tensors))

    def gather(
        self,
        arenas: Sequence[torch.Tensor],
        arena_ids: Sequence[int],
        offsets: Sequence[int],
        sizes: Sequence[int],
        out: torch.Tensor,
        out_offsets: Sequence[int] | None = None,
    *,
        wait_current: bool = True,
    ) -> TransferHandle:
        """Enqueue :func:`tiercache_kernels.gather_blocks` (N scattered blocks -> ``out``, one launch).
        ``handle.result`` is ``out``."""
        if out_offsets is None:
            out_offsets, _ = packed_layout(list(sizes))

        def run(stream: torch.cuda.Stream | None) -> str:
            return copy_blocks(arenas, arena_ids, offsets, [out], [0] * len(sizes), out_offsets, sizes,
                               stream=stream, backend=self.backend if stream is not None else "reference")

        return self._enqueue(run, out, [out, *arenas], wait_current)

    def scatter(
        self,
        src: torch.Tensor,
        src_offsets: Sequence[int] | None,
        sizes: Sequence[int],
        arenas: Sequence[torch.Tensor],
        arena_ids: Sequence[int],
        offsets: Sequence[int],
    *,
        wait_current: bool = True,
    ) -> TransferHandle:
        """Enqueue :func:`tiercache_kernels.scatter_blocks` (``src`` -> N blocks of ``arenas``, one
        launch): the batched GPU->host demotion.  ``handle.result`` is ``None``."""
        if src_offsets is None:
            src_offsets, _ = packed_layout(list(sizes))

        def run(stream: torch.cuda.Stream | None) -> str:
            return copy_blocks([src], [0] * len(sizes), src_offsets, arenas, arena_ids, offsets, sizes,
                               stream=stream, backend=self.backend if stream is not None else "reference")

        return self._enqueue(run, None, [src, *arenas], wait_current)

    def copy(self, src: torch.Tensor, dst: torch.Tensor, *, wait_current: bool = True) -> TransferHandle:
        """Enqueue one contiguous ``dst.copy_(src)`` on the engine's stream (``non_blocking``: pinned host
        memory makes it asynchronous).  Shapes must match.  ``handle.result`` is ``dst``."""
        if src.shape != dst.shape:
            raise ValueError(f"copy shapes differ: {tuple(src.shape)} vs {tuple(dst.shape)}")

        def run(stream: torch.cuda.Stream | None) -> str:
            if stream is None:
                dst.copy_(src)
                return "reference"
            with torch.cuda.stream(stream):
                dst.copy_(src, non_blocking=True)
            return "torch"

        return self._enqueue(run, dst, [src, dst], wait_current)

    def synchronize(self) -> None:
        """Block until everything enqueued on the engine's stream has run."""
        if self.stream is not None:
            self.stream.synchronize()


# -- disk ---------------------------------------------------------------------------------------------
def chunk_file_bytes(slot: Slot) -> int:
    """Size of an uncompressed DiskTier chunk file for ``slot``: header page, payload pages, crc32c."""
    from .tiers.disk import DiskTier

    return DiskTier.chunk_bytes(slot)


def read_chunk_into(tier: Any, slot: Slot, header: EntryHeader, staging: torch.Tensor) -> torch.Tensor:
    """Read the verified payload of the DiskTier chunk of ``slot`` into ``staging`` and return it (a view of
    ``staging``, ``slot.nbytes`` bytes).

    ``staging``: 1-D contiguous uint8 CPU tensor (pinned, so that a gather kernel can read the payload by
    address) of at least ``slot.nbytes`` bytes; the caller owns it (buffers sized by
    :func:`chunk_file_bytes` also fit).  The payload is read straight into it with one positional vectored
    read; the whole chunk's crc32c and its header (key, sequence number, dtype, shape, size) are checked
    before anything is returned (by ``DiskTier.read``): raises ``CorruptEntryError`` otherwise, never
    returning unverified bytes, and ``ValueError`` for an unsuitable ``staging``.  Runs on the calling
    thread; safe to call concurrently for distinct slots and buffers.  For many chunks at once prefer
    ``DiskTier.read_into``, which spreads the reads over the tier's I/O threads."""
    if staging.device.type != "cpu" or staging.dtype != torch.uint8 or staging.dim() != 1 or not staging.is_contiguous():
        raise ValueError("staging must be a 1-D contiguous uint8 CPU tensor")
    if staging.numel() < slot.nbytes:
        raise ValueError(f"staging holds {staging.numel()} bytes, the payload needs {slot.nbytes}")
    return tier.read(slot, header, into=staging)


def kvikio_available() -> bool:
    """True when kvikio imports and CUDA is available (kvikio needs the CUDA driver)."""
    if not torch.cuda.is_available():
        return False
    try:
        import kvikio  # noqa: F401
    except Exception:
        return False
    return True


def kvikio_read_payload(tier: Any, slot: Slot, out: torch.Tensor) -> Any:
    """Start reading ``slot``'s payload (at its 4 KiB offset in the chunk file) straight into ``out`` (a
    CUDA uint8 tensor of ``slot.nbytes`` bytes) with ``kvikio.CuFile.pread``; returns kvikio's future
    (``.get()`` returns the bytes read).  GPUDirect Storage where the platform has it, compat mode (POSIX
    via a bounce buffer in kvikio's thread pool) otherwise.

    UNVERIFIED: the crc32c covers the whole chunk and is computed on the host, so these bytes are not
    checked.  The cache never serves them; this path exists to be measured (benchmarks/gpu_transfers.py).
    Only uncompressed stores.  The file is closed when the read completes (the future keeps it open)."""
    import kvikio

    from .tiers.disk import HEADER_BYTES

    if getattr(tier, "compression", None) is not None:
        raise ValueError("kvikio reads need an uncompressed disk tier")
    if out.device.type != "cuda" or out.dtype != torch.uint8 or out.numel() != slot.nbytes or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous CUDA uint8 tensor of {slot.nbytes} bytes")
    handle = kvikio.CuFile(tier.chunk_path(slot), "r")
    future = handle.pread(out, size=slot.nbytes, file_offset=HEADER_BYTES)
    return _ClosingFuture(future, handle)


class _ClosingFuture:
    """kvikio's IOFuture that closes its CuFile once the read is done."""

    def __init__(self, future: Any, handle: Any) -> None:
        self._future, self._handle = future, handle

    def done(self) -> bool:
        return bool(self._future.done())

    def get(self) -> int:
        try:
            return int(self._future.get())
        finally:
            self._handle.close()
