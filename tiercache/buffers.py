"""Destination buffers that disk reads can land in without a bounce copy.

A direct (``O_DIRECT``) read may write straight into a tensor's memory only when every contiguous run
of it starts on the disk's memory alignment (512 bytes on most disks, 4 on NVMe; see
:func:`tiercache.tiers.disk.dio_aligned`); ``torch.empty`` guarantees 64 bytes, so a disk tier with
``direct_io`` reads into ordinary tensors through an aligned bounce buffer and then copies.  Tensors
from :func:`aligned_empty` start on a page boundary, so any view of them whose runs are multiples of
the alignment (whole cache entries, blocks of a ``(B, H, T, D)`` buffer whose rows are 512-byte
multiples) takes the direct path.  :func:`huge_empty` also starts on a 2 MiB boundary and asks Linux for
transparent huge pages, which a direct read pins with far less kernel work than 4 KiB pages.
"""

from __future__ import annotations

import ctypes
import sys
from typing import Any

import torch

__all__ = ["HUGE_PAGE", "PAGE", "aligned_empty", "huge_empty", "libc_madvise"]

PAGE = 4096
HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14
_madvise_fn: Any = None  # None: not looked up yet; False: unavailable


def libc_madvise() -> Any:
    """libc's ``madvise(addr, length, advice)`` (through ctypes, which releases the GIL; returns 0 or -1 with
    ``ctypes.get_errno()`` set), or ``None`` off Linux.  Looked up once per process."""
    global _madvise_fn
    if _madvise_fn is None:
        try:
            if not sys.platform.startswith("linux"):
                raise OSError("not Linux")
            fn = ctypes.CDLL(None, use_errno=True).madvise
            fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            fn.restype = ctypes.c_int
            _madvise_fn = fn
        except (OSError, AttributeError):
            _madvise_fn = False
    return _madvise_fn or None


def huge_empty(shape: tuple[int, ...], *, dtype: torch.dtype, device: torch.device | str | None = None,
               min_bytes: int = 8 << 20) -> torch.Tensor:
    """An uninitialised contiguous tensor like :func:`aligned_empty` (page-aligned, so disk reads land in it
    without a bounce copy) that starts on a :data:`HUGE_PAGE` boundary and whose whole huge pages are advised
    ``MADV_HUGEPAGE`` before anything touches them, so the kernel backs them with transparent huge pages where
    its ``transparent_hugepage`` setting allows (``madvise`` or ``always``).  CPU tensors of at least
    ``min_bytes`` on Linux only; anything else (and a refused ``madvise``) is plain ``aligned_empty``.  Costs
    at most ``HUGE_PAGE`` more bytes of address space, which it never touches."""
    device = torch.device("cpu") if device is None else torch.device(device)
    nbytes = torch.empty((), dtype=dtype).element_size()
    for dim in shape:
        nbytes *= int(dim)
    fn = libc_madvise() if device.type == "cpu" and nbytes >= min_bytes else None
    if fn is None:
        return aligned_empty(shape, dtype=dtype, device=device)
    with torch.inference_mode(False):
        raw = torch.empty(nbytes + HUGE_PAGE, dtype=torch.uint8)
        start = (-raw.data_ptr()) % HUGE_PAGE
        fn(raw.data_ptr() + start, nbytes // HUGE_PAGE * HUGE_PAGE, _MADV_HUGEPAGE)  # advisory: a refusal is ignored
        return raw[start : start + nbytes].view(dtype).view(tuple(shape))


def aligned_empty(shape: tuple[int, ...], *, dtype: torch.dtype, device: torch.device | str | None = None,
                  alignment: int = PAGE) -> torch.Tensor:
    """An uninitialised contiguous tensor whose first byte is ``alignment``-aligned (CPU tensors; other
    devices get a plain ``torch.empty``).  Costs at most ``alignment`` extra bytes; the tensor owns its
    storage like any other (freed with the last reference).  Always a normal tensor, also when called
    under ``torch.inference_mode`` (such buffers outlive the call and are written in place later)."""
    if alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"alignment must be a positive power of two, got {alignment!r}")
    device = torch.device("cpu") if device is None else torch.device(device)
    with torch.inference_mode(False):
        return _aligned_empty(tuple(shape), dtype, device, alignment)


def _aligned_empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, alignment: int) -> torch.Tensor:
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    size = torch.empty((), dtype=dtype).element_size()
    numel = 1
    for dim in shape:
        numel *= int(dim)
    nbytes = numel * size
    raw = torch.empty(nbytes + alignment, dtype=torch.uint8)
    start = (-raw.data_ptr()) % alignment
    return raw[start : start + nbytes].view(dtype).view(shape)
