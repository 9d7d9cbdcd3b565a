"""Batched block copies: gather scattered blocks into one buffer, scatter one buffer back into blocks.

Blocks are addressed as ``(arena, offset, nbytes)``: ``arenas`` is a list of 1-D contiguous ``uint8``
tensors (a tier's preallocated arenas, or any byte tensors), ``arena_ids[i]`` picks block ``i``'s arena
and ``offsets[i]`` its byte offset there.  Addressing blocks by arena and offset keeps the per-block cost
of a batch at a few integers: no tensor view is made per block.

Three implementations, one contract (the destination bytes end up equal to the source bytes):

- ``*_reference``: pure torch, one ``copy_`` per block.  Used whenever no CUDA tensor is involved, and
  the yardstick every other path is tested against bit for bit.
- CUDA kernel (cupy ``RawKernel``, compiled on first use): one launch for the whole batch, a thread block
  per (block, 64 KiB tile), 16-byte vector loads/stores when both addresses are 16-byte aligned, bytes
  otherwise.  It reads and writes *pinned* host memory by address (unified virtual addressing: memory
  from ``cudaHostAlloc``, which backs ``torch.empty(..., pin_memory=True)``, is mapped into the device
  address space; its device alias is taken from ``cudaPointerGetAttributes``), and device memory on the
  same GPU.  So host->GPU promotion and GPU->host demotion of N scattered blocks is one kernel, not N
  ``cudaMemcpyAsync`` calls (8 us each on the H100 in DESIGN.md).
- torch copies: contiguous runs are merged (:func:`coalesce_ranges`), then one ``copy_`` per run.  Used on
  CUDA when cupy is missing and for pageable host memory, which a kernel cannot address.

Thread safety: the functions keep no state besides the lazily compiled kernel (created under a lock);
concurrent calls on distinct destinations are safe.  Streams: the CUDA work is enqueued on ``stream``
(default: the current stream of the destination's device) and is asynchronous to the host; the caller
keeps every source and destination alive and unmodified until that stream has passed the copy.
"""

from __future__ import annotations

import threading
from typing import Any, Sequence

import numpy as np
import torch

__all__ = [
    "ALIGN",
    "TILE_BYTES",
    "coalesce_ranges",
    "copy_blocks",
    "cuda_backend_available",
    "gather_blocks",
    "gather_blocks_reference",
    "packed_layout",
    "scatter_blocks",
    "scatter_blocks_reference",
]

ALIGN = 256
"""Default alignment (bytes) of each block in a packed buffer: a multiple of every dtype's size, and of
the kernel's 16-byte vector width."""

TILE_BYTES = 64 * 1024
"""Bytes one CUDA thread block copies (a large block is split over several thread blocks)."""

_THREADS = 256
_MAX_GRID_Y = 65535

_KERNEL_SOURCE = r"""
extern "C" __global__ void __launch_bounds__(256)
tiercache_copy_blocks(const long long* __restrict__ table, const int n, const long long tile)
{
    // table: [3, n] int64 = source addresses, destination addresses, byte counts.
    const int blk = blockIdx.x;
    if (blk >= n) return;
    const long long size = table[2 * (long long)n + blk];
    const long long begin = (long long)blockIdx.y * tile;
    if (begin >= size) return;
    const long long count = min(size - begin, tile);
    const unsigned char* __restrict__ src = (const unsigned char*)table[blk] + begin;
    unsigned char* __restrict__ dst = (unsigned char*)table[(long long)n + blk] + begin;
    const long long tid = threadIdx.x;
    const long long stride = blockDim.x;
    long long done = 0;
    if ((((unsigned long long)src | (unsigned long long)dst) & 15ull) == 0ull) {
        const uint4* __restrict__ s4 = (const uint4*)src;
        uint4* __restrict__ d4 = (uint4*)dst;
        const long long n4 = count >> 4;
        long long i = tid;
        // Four independent 16-byte loads in flight per thread: PCIe reads have long latency.
        for (; i + 3 * stride < n4; i += 4 * stride) {
            const uint4 a = s4[i];
            const uint4 b = s4[i + stride];
            const uint4 c = s4[i + 2 * stride];
            const uint4 d = s4[i + 3 * stride];
            d4[i] = a;
            d4[i + stride] = b;
            d4[i + 2 * stride] = c;
            d4[i + 3 * stride] = d;
        }
        for (; i < n4; i += stride) d4[i] = s4[i];
        done = n4 << 4;
    }
    for (long long i = done + tid; i < count; i += stride) dst[i] = src[i];
}
"""

_kernel_lock = threading.Lock()
_kernels: dict[int, Any] = {}  # device index -> compiled cupy RawKernel
_cupy: Any = None
_cupy_error: BaseException | None = None


def _import_cupy() -> Any:
    """cupy, imported on first use (``None`` when it is not installed or cannot initialise)."""
    global _cupy, _cupy_error
    if _cupy is None and _cupy_error is None:
        try:
            import cupy

            _cupy = cupy
        except Exception as exc:  # ImportError, or a CUDA-version mismatch raised at import
            _cupy_error = exc
    return _cupy


def cuda_backend_available() -> bool:
    """True when the gather kernel can run here: CUDA is available and cupy imports."""
    return torch.cuda.is_available() and _import_cupy() is not None


def _kernel(device: torch.device) -> Any:
    index = device.index if device.index is not None else torch.cuda.current_device()
    kernel = _kernels.get(index)
    if kernel is None:
        with _kernel_lock:
            kernel = _kernels.get(index)
            if kernel is None:
                cupy = _import_cupy()
                with cupy.cuda.Device(index):
                    kernel = cupy.RawKernel(_KERNEL_SOURCE, "tiercache_copy_blocks")
                    kernel.compile()
                _kernels[index] = kernel
    return kernel


# -- layout -------------------------------------------------------------------------------------------
def packed_layout(sizes: Sequence[int], align: int = ALIGN) -> tuple[list[int], int]:
    """Offsets that pack blocks of ``sizes`` bytes one after another, each starting at a multiple of
    ``align`` bytes, and the total bytes the packed buffer needs."""
    if align <= 0 or align & (align - 1):
        raise ValueError(f"align must be a positive power of two, got {align}")
    offsets: list[int] = []
    position = 0
    mask = align - 1
    for size in sizes:
        if size < 0:
            raise ValueError(f"block sizes must not be negative, got {size}")
        offsets.append(position)
        position = (position + size + mask) & ~mask
    total = offsets[-1] + sizes[-1] if offsets else 0
    return offsets, total


def coalesce_ranges(
    src_ids: Sequence[int], src_offsets: Sequence[int], dst_ids: Sequence[int], dst_offsets: Sequence[int],
    sizes: Sequence[int],
) -> list[tuple[int, int, int, int, int]]:
    """Merge consecutive blocks whose source and destination both continue where the previous block
    ended (same arenas).  Returns ``(src_id, src_offset, dst_id, dst_offset, nbytes)`` runs in order;
    empty blocks are dropped.  Copying the runs is equivalent to copying the blocks."""
    runs: list[tuple[int, int, int, int, int]] = []
    for sa, so, da, do, n in zip(src_ids, src_offsets, dst_ids, dst_offsets, sizes):
        if n == 0:
            continue
        if runs:
            psa, pso, pda, pdo, pn = runs[-1]
            if psa == sa and pda == da and pso + pn == so and pdo + pn == do:
                runs[-1] = (psa, pso, pda, pdo, pn + n)
                continue
        runs.append((sa, so, da, do, n))
    return runs


# -- validation ---------------------------------------------------------------------------------------
def _check_arena(tensor: object, what: str) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype != torch.uint8 or tensor.dim() != 1 or not tensor.is_contiguous():
        raise ValueError(
            f"{what} must be a 1-D contiguous uint8 tensor, got dtype={tensor.dtype}, shape={tuple(tensor.shape)}"
        )
    return tensor


def _as_index(values: Sequence[int] | torch.Tensor, n: int, what: str) -> torch.Tensor:
    t = values.to("cpu", torch.int64) if isinstance(values, torch.Tensor) else torch.tensor(list(values), dtype=torch.int64)
    if t.dim() != 1 or t.numel() != n:
        raise ValueError(f"{what} has {t.numel()} entries, expected {n}")
    if n and int(t.min()) < 0:
        raise ValueError(f"{what} must not be negative")
    return t


def _check_side(arenas: Sequence[torch.Tensor], ids: torch.Tensor, offsets: torch.Tensor, sizes: torch.Tensor,
                what: str, *, disjoint: bool) -> None:
    if not sizes.numel():
        return
    if int(ids.max()) >= len(arenas):
        raise ValueError(f"{what} arena id {int(ids.max())} out of range ({len(arenas)} arenas)")
    lengths = torch.tensor([a.numel() for a in arenas], dtype=torch.int64)
    ends = offsets + sizes
    bad = ends > lengths[ids]
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(
            f"{what} block {i} ([{int(offsets[i])}, {int(ends[i])}) of arena {int(ids[i])}) exceeds the arena's "
            f"{int(lengths[ids[i]])} bytes"
        )
    if disjoint:  # destinations must not overlap, or the result would depend on the copy order
        keep = sizes > 0
        keys = ids[keep] * (1 << 48) + offsets[keep]
        order = torch.argsort(keys)
        s_ids, s_off, s_end = ids[keep][order], offsets[keep][order], ends[keep][order]
        overlap = (s_ids[1:] == s_ids[:-1]) & (s_off[1:] < s_end[:-1])
        if bool(overlap.any()):
            j = int(overlap.nonzero()[0])
            raise ValueError(
                f"{what} blocks overlap in arena {int(s_ids[j])} at bytes [{int(s_off[j + 1])}, {int(s_end[j])})"
            )


# -- reference ----------------------------------------------------------------------------------------
def _copy_reference(src_arenas: Sequence[torch.Tensor], src_ids: Sequence[int], src_offsets: Sequence[int],
                    dst_arenas: Sequence[torch.Tensor], dst_ids: Sequence[int], dst_offsets: Sequence[int],
                    sizes: Sequence[int]) -> None:
    for sa, so, da, do, n in zip(src_ids, src_offsets, dst_ids, dst_offsets, sizes):
        if n:
            dst_arenas[da][do : do + n].copy_(src_arenas[sa][so : so + n])


def gather_blocks_reference(
    arenas: Sequence[torch.Tensor], arena_ids: Sequence[int], offsets: Sequence[int], sizes: Sequence[int],
    out: torch.Tensor, out_offsets: Sequence[int],
) -> torch.Tensor:
    """Pure torch: ``out[out_offsets[i] : +sizes[i]] = arenas[arena_ids[i]][offsets[i] : +sizes[i]]`` for
    each block, in order.  No validation (see :func:`gather_blocks`); returns ``out``."""
    _copy_reference(arenas, arena_ids, offsets, [out], [0] * len(sizes), out_offsets, sizes)
    return out


def scatter_blocks_reference(
    src: torch.Tensor, src_offsets: Sequence[int], sizes: Sequence[int],
    arenas: Sequence[torch.Tensor], arena_ids: Sequence[int], offsets: Sequence[int],
) -> None:
    """Pure torch: ``arenas[arena_ids[i]][offsets[i] : +sizes[i]] = src[src_offsets[i] : +sizes[i]]``."""
    _copy_reference([src], [0] * len(sizes), src_offsets, arenas, arena_ids, offsets, sizes)


# -- CUDA ---------------------------------------------------------------------------------------------
def _device_base(tensor: torch.Tensor, device: torch.device) -> int | None:
    """The address a kernel on ``device`` uses for ``tensor``'s first byte, or ``None`` when a kernel
    cannot address it (pageable host memory).  Raises ``ValueError`` for a tensor on another GPU."""
    if tensor.device.type == "cuda":
        if tensor.device != device:
            raise ValueError(f"a block on {tensor.device} cannot be copied by a kernel on {device}")
        return tensor.data_ptr()
    if tensor.device.type != "cpu":
        raise ValueError(f"blocks must be on the CPU or {device}, got {tensor.device}")
    if not tensor.numel() or not tensor.is_pinned():
        return None
    ptr = tensor.data_ptr()
    cupy = _import_cupy()
    if cupy is not None:
        try:
            with cupy.cuda.Device(device.index):
                alias = int(cupy.cuda.runtime.pointerGetAttributes(ptr).devicePointer or 0)
            if alias:
                return alias
        except Exception:  # older cupy without the binding: UVA maps pinned memory at the same address
            pass
    return ptr


def _copy_cuda(src_arenas: Sequence[torch.Tensor], src_ids: torch.Tensor, src_offsets: torch.Tensor,
               dst_arenas: Sequence[torch.Tensor], dst_ids: torch.Tensor, dst_offsets: torch.Tensor,
               sizes: torch.Tensor, device: torch.device, stream: torch.cuda.Stream | None,
               backend: str) -> str:
    """Enqueue the copies on ``stream``; returns the backend used ("kernel", "torch" or "mixed")."""
    stream = stream if stream is not None else torch.cuda.current_stream(device)
    use_kernel = backend == "kernel" or (backend == "auto" and _import_cupy() is not None)
    if backend == "kernel" and _import_cupy() is None:
        raise RuntimeError(f"backend='kernel' needs cupy, which failed to import: {_cupy_error}")
    src_base = [_device_base(a, device) if use_kernel else None for a in src_arenas]
    dst_base = [_device_base(a, device) if use_kernel else None for a in dst_arenas]
    if use_kernel:
        src_ok = torch.tensor([b is not None for b in src_base], dtype=torch.bool)[src_ids]
        dst_ok = torch.tensor([b is not None for b in dst_base], dtype=torch.bool)[dst_ids]
        on_kernel = src_ok & dst_ok & (sizes > 0)
    else:
        on_kernel = torch.zeros_like(sizes, dtype=torch.bool)
    used = []
    rest = ~on_kernel & (sizes > 0)
    if bool(rest.any()):
        if backend == "kernel":
            raise ValueError("backend='kernel' cannot address pageable host memory: pin the arenas")
        idx = rest.nonzero().flatten()
        runs = coalesce_ranges(src_ids[idx].tolist(), src_offsets[idx].tolist(), dst_ids[idx].tolist(),
                               dst_offsets[idx].tolist(), sizes[idx].tolist())
        with torch.cuda.stream(stream):
            for sa, so, da, do, n in runs:
                dst_arenas[da][do : do + n].copy_(src_arenas[sa][so : so + n], non_blocking=True)
        used.append("torch")
    if bool(on_kernel.any()):
        idx = on_kernel.nonzero().flatten()
        src_table = torch.tensor([b or 0 for b in src_base], dtype=torch.int64)
        dst_table = torch.tensor([b or 0 for b in dst_base], dtype=torch.int64)
        k_sizes = sizes[idx]
        table = torch.stack(
            (src_table[src_ids[idx]] + src_offsets[idx], dst_table[dst_ids[idx]] + dst_offsets[idx], k_sizes)
        ).contiguous()
        n = int(table.shape[1])
        largest = int(k_sizes.max())
        per_tile = -(-largest // _MAX_GRID_Y)  # grid.y is limited: huge blocks get larger tiles
        tile = max(TILE_BYTES, (per_tile + 15) // 16 * 16)
        grid = (n, -(-largest // tile))
        kernel = _kernel(device)
        cupy = _import_cupy()
        with torch.cuda.stream(stream):
            # The pinned staging copy is ordered before the kernel on the same stream; torch's host
            # allocator keeps the pinned block alive until the copy has run.
            table_dev = table.pin_memory().to(device, non_blocking=True)
            with cupy.cuda.Device(device.index), cupy.cuda.ExternalStream(stream.cuda_stream):
                kernel(grid, (_THREADS,), (np.uint64(table_dev.data_ptr()), np.int32(n), np.int64(tile)))
        table_dev.record_stream(stream)
        used.append("kernel")
    return used[0] if len(used) == 1 else ("mixed" if used else "none")


def copy_blocks(
    src_arenas: Sequence[torch.Tensor],
    src_ids: Sequence[int] | torch.Tensor,
    src_offsets: Sequence[int] | torch.Tensor,
    dst_arenas: Sequence[torch.Tensor],
    dst_ids: Sequence[int] | torch.Tensor,
    dst_offsets: Sequence[int] | torch.Tensor,
    sizes: Sequence[int] | torch.Tensor,
    *,
    stream: torch.cuda.Stream | None = None,
    backend: str = "auto",
) -> str:
    """The general form of :func:`gather_blocks` and :func:`scatter_blocks`: block ``i`` is ``sizes[i]``
    bytes from ``src_arenas[src_ids[i]][src_offsets[i]:]`` to ``dst_arenas[dst_ids[i]][dst_offsets[i]:]``.
    Validates everything first (``ValueError``/``TypeError``, nothing copied), then copies; returns the
    implementation used: ``"reference"``, ``"kernel"``, ``"torch"`` or ``"mixed"``."""
    if backend not in ("auto", "kernel", "torch", "reference"):
        raise ValueError(f"backend must be 'auto', 'kernel', 'torch' or 'reference', got {backend!r}")
    src_arenas = [_check_arena(a, f"source arena {i}") for i, a in enumerate(src_arenas)]
    dst_arenas = [_check_arena(a, f"destination arena {i}") for i, a in enumerate(dst_arenas)]
    size_t = _as_index(sizes, len(sizes), "sizes")
    n = size_t.numel()
    s_ids, s_off = _as_index(src_ids, n, "source arena ids"), _as_index(src_offsets, n, "source offsets")
    d_ids, d_off = _as_index(dst_ids, n, "destination arena ids"), _as_index(dst_offsets, n, "destination offsets")
    _check_side(src_arenas, s_ids, s_off, size_t, "source", disjoint=False)
    _check_side(dst_arenas, d_ids, d_off, size_t, "destination", disjoint=True)
    devices = {a.device for a in (*dst_arenas, *src_arenas) if a.device.type == "cuda"}
    if len(devices) > 1:
        raise ValueError(f"blocks span several GPUs {sorted(map(str, devices))}; copy per device")
    if not devices or backend == "reference":
        _copy_reference(src_arenas, s_ids.tolist(), s_off.tolist(), dst_arenas, d_ids.tolist(), d_off.tolist(),
                        size_t.tolist())
        return "reference"
    (device,) = devices
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _copy_cuda(src_arenas, s_ids, s_off, dst_arenas, d_ids, d_off, size_t, device, stream, backend)


def gather_blocks(
    arenas: Sequence[torch.Tensor],
    arena_ids: Sequence[int] | torch.Tensor,
    offsets: Sequence[int] | torch.Tensor,
    sizes: Sequence[int] | torch.Tensor,
    out: torch.Tensor,
    out_offsets: Sequence[int] | torch.Tensor | None = None,
    *,
    stream: torch.cuda.Stream | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Copy block ``i`` (``sizes[i]`` bytes at ``offsets[i]`` of ``arenas[arena_ids[i]]``) to
    ``out[out_offsets[i]:]``, all blocks as one operation; returns ``out``.

    ``out`` is a 1-D contiguous uint8 tensor; ``out_offsets`` defaults to :func:`packed_layout` of
    ``sizes``.  Destination ranges must not overlap; every range must lie inside its tensor (else
    ``ValueError``).  When ``out`` or a source is on a GPU, the copy is enqueued on ``stream`` (default: the
    device's current stream) and returns before it has run: sources must stay alive and unchanged until
    then.  Host sources must be pinned for the kernel; pageable ones are copied by torch (correct, slow).
    ``backend``: ``"auto"`` (kernel if cupy imports, else coalesced torch copies), ``"kernel"``,
    ``"torch"``, or ``"reference"`` (synchronous per-block ``copy_``)."""
    out = _check_arena(out, "out")
    if out_offsets is None:
        out_offsets, _ = packed_layout([int(s) for s in (sizes.tolist() if isinstance(sizes, torch.Tensor) else sizes)])
    n = len(sizes)
    copy_blocks(arenas, arena_ids, offsets, [out], [0] * n, out_offsets, sizes, stream=stream, backend=backend)
    return out


def scatter_blocks(
    src: torch.Tensor,
    src_offsets: Sequence[int] | torch.Tensor | None,
    sizes: Sequence[int] | torch.Tensor,
    arenas: Sequence[torch.Tensor],
    arena_ids: Sequence[int] | torch.Tensor,
    offsets: Sequence[int] | torch.Tensor,
    *,
    stream: torch.cuda.Stream | None = None,
    backend: str = "auto",
) -> None:
    """The inverse of :func:`gather_blocks`: copy ``src[src_offsets[i]:][:sizes[i]]`` to
    ``arenas[arena_ids[i]][offsets[i]:]`` for every block as one operation (GPU->host demotion of a batch).
    Destination blocks must not overlap.  Same streams, backends and lifetime rules as ``gather_blocks``;
    ``src_offsets`` defaults to the packed layout."""
    src = _check_arena(src, "src")
    if src_offsets is None:
        src_offsets, _ = packed_layout([int(s) for s in (sizes.tolist() if isinstance(sizes, torch.Tensor) else sizes)])
    n = len(sizes)
    copy_blocks([src], [0] * n, src_offsets, arenas, arena_ids, offsets, sizes, stream=stream, backend=backend)
