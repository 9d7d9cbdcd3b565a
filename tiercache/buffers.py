"""Destination buffers that disk reads can land in without a bounce copy.

A direct (``O_DIRECT``) read may write straight into a tensor's memory only when every contiguous run
of it starts on the disk's memory alignment (512 bytes on most disks, 4 on NVMe; see
:func:`tiercache.tiers.disk.dio_aligned`); ``torch.empty`` guarantees 64 bytes, so a disk tier with
``direct_io`` reads into ordinary tensors through an aligned bounce buffer and then copies.  Tensors
from :func:`aligned_empty` start on a page boundary, so any view of them whose runs are multiples of
the alignment (whole cache entries, blocks of a ``(B, H, T, D)`` buffer whose rows are 512-byte
multiples) takes the direct path.
"""

from __future__ import annotations

import torch

__all__ = ["PAGE", "aligned_empty"]

PAGE = 4096


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
