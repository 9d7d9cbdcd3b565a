"""Values going in and out of the cache: what ``put`` accepts (dense tensors; their bytes, dtype and
shape), turning a tier's bytes back into a caller-owned tensor, and score validation.
"""

from __future__ import annotations

import math

import torch

from .errors import CorruptEntryError
from .tiers.base import EntryHeader


def check_score(score: object) -> float:
    if isinstance(score, bool) or not isinstance(score, (int, float)):
        raise TypeError(f"score must be a number, got {type(score).__name__}")
    if math.isnan(score):
        raise ValueError("score must not be NaN (it would break the eviction order)")
    return float(score)


def tensor_bytes(value: object) -> tuple[torch.Tensor, str, tuple[int, ...]]:
    """The tensor's bytes as 1-D contiguous uint8 (no copy when already contiguous), its dtype, shape."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"values must be torch.Tensor, got {type(value).__name__}")
    if value.layout != torch.strided:
        raise TypeError(f"only dense (strided) tensors can be cached, got layout {value.layout}")
    if value.device.type == "meta":
        raise TypeError("meta tensors have no data to cache")
    if value.is_quantized:
        raise TypeError("quantized tensors are not supported; dequantize first")
    tensor = value.detach()
    if not tensor.is_contiguous():
        tensor = tensor.contiguous()
    flat = tensor.reshape(-1)
    data = flat.view(torch.uint8) if flat.dtype != torch.uint8 else flat
    return data, str(value.dtype).removeprefix("torch."), tuple(value.shape)


def restore(raw: torch.Tensor, header: EntryHeader, device: torch.device, *, aliasing: bool) -> torch.Tensor:
    """A caller-owned tensor from a tier's bytes: copied when ``raw`` may alias tier storage."""
    dtype = getattr(torch, header.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise CorruptEntryError(f"unknown dtype {header.dtype!r} in entry header")
    if raw.device == device:
        out = raw.clone() if aliasing else raw
    else:
        out = raw.to(device)
    if dtype != torch.uint8:
        out = out.view(dtype)
    return out.reshape(header.shape)
