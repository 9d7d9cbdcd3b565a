"""Values going in and out of the cache: what ``put`` accepts (dense tensors of at most ``MAX_DIMS``
dimensions; conjugate and negative views are resolved), the dtype names stored in entry headers, copying
stored bytes into a destination tensor, and score validation.
"""

from __future__ import annotations

import math
import numbers

import numpy
import torch

from .errors import CorruptEntryError
from .keys import MAX_DIMS
from .tiers.base import EntryHeader

_DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)
}


def check_score(score: object) -> float:
    """``score`` as a float: any real number but a bool (Python and numpy ints and floats, a 0-d integer or
    floating tensor); ``TypeError`` for anything else, ``ValueError`` for NaN."""
    if score.__class__ is not float and score.__class__ is not int:
        if isinstance(score, torch.Tensor):
            if score.dim() != 0 or score.dtype is torch.bool or score.is_complex() or score.is_meta:
                raise TypeError(f"score must be a number or a 0-d real tensor, got a tensor of shape "
                                f"{tuple(score.shape)} and dtype {score.dtype}")
        elif isinstance(score, (bool, numpy.bool_)) or not isinstance(score, numbers.Real):
            raise TypeError(f"score must be a number, got {type(score).__name__}")
        score = float(score)
    if math.isnan(score):
        raise ValueError("score must not be NaN (it would break the eviction order)")
    return float(score)


_FLOAT = {float}


def check_scores(scores: list) -> list[float]:
    """:func:`check_score` of every item, in order (the first bad one raises): the scores as floats.

    A list of plain floats none of which is NaN is returned as it is, checked in C (the types as a
    set; NaN through their sum, which is NaN when one is, or when ``inf`` meets ``-inf``: then each is
    checked)."""
    if set(map(type, scores)) <= _FLOAT:
        total = sum(scores)
        if total == total:
            return scores
    return [check_score(score) for score in scores]


def dtype_named(name: str) -> torch.dtype:
    """The torch dtype an entry header names (``"float32"``); ``CorruptEntryError`` for an unknown name."""
    dtype = _DTYPES.get(name)
    if dtype is None:
        raise CorruptEntryError(f"unknown dtype {name!r} in entry header")
    return dtype


def check_header(header: EntryHeader) -> torch.dtype:
    """The header's dtype after checking that dtype, shape and payload size agree (``CorruptEntryError``
    otherwise), so that later reads can view the payload as ``dtype`` and ``shape`` without checking."""
    dtype = dtype_named(header.dtype)
    shape = header.shape
    if len(shape) > MAX_DIMS:
        raise CorruptEntryError(f"impossible shape {shape!r} in entry header")
    numel = 1
    for n in shape:
        if type(n) is not int or n < 0:
            raise CorruptEntryError(f"impossible shape {shape!r} in entry header")
        numel *= n
    if numel * dtype.itemsize != header.nbytes:
        raise CorruptEntryError(
            f"entry header says {header.dtype}{list(header.shape)} ({numel * dtype.itemsize} bytes) "
            f"but the payload holds {header.nbytes}"
        )
    return dtype


_Tensor = torch.Tensor
_STRIDED = torch.strided
_SHAPES: dict[tuple[int, ...], tuple[int, ...]] = {}  # shape -> one tuple for every entry of that shape
_MAX_SHAPES = 4096


def _shape_of(value: torch.Tensor) -> tuple[int, ...]:
    """``tuple(value.shape)``, kept in ``_SHAPES`` (a ``torch.Size`` hashes and compares as its tuple), so
    entries of one shape share one tuple: one GC-tracked object less per stored value (``tensor_data``
    and the single ``put`` look a shape up there first).  At most ``_MAX_SHAPES`` are kept (all dropped when full)."""
    shape = tuple(value.shape)
    if len(_SHAPES) >= _MAX_SHAPES:
        _SHAPES.clear()
    return _SHAPES.setdefault(shape, shape)


_COMPLEX = frozenset(d for d in _DTYPES.values() if d.is_complex)  # the only dtypes a conjugate view can have


def tensor_data(value: object) -> tuple[torch.Tensor, torch.dtype, tuple[int, ...]]:
    """``value`` ready to be copied from (detached; conjugate and negative views resolved, so the stored
    values are the ones the view shows; *not* made contiguous: a copy into a memory slot handles any
    strides, see :func:`flat`), with its dtype and shape.

    Raises ``TypeError`` for a non-tensor and for tensors without a plain strided layout (sparse,
    nested, quantized, meta) and ``ValueError`` for more than ``MAX_DIMS`` dimensions."""
    # Every ``put`` runs this: each tensor attribute read costs ~0.1-0.2 us, so the checks a plain tensor
    # passes come first and the conjugate bit is only asked of complex tensors (torch sets it on no other
    # dtype: ``conj()`` of a real tensor is the tensor itself, and a conjugate view cannot be viewed as
    # another dtype).  The negative bit can be set on real tensors (``z.conj().imag``), so it is always read.
    if value.__class__ is not _Tensor and not isinstance(value, _Tensor):
        raise TypeError(f"values must be torch.Tensor, got {type(value).__name__}")
    if value.layout is not _STRIDED or value.is_nested or value.is_quantized or value.is_meta:
        if value.is_nested:
            raise TypeError("nested tensors cannot be cached; store each component tensor under its own key")
        if value.layout != torch.strided:
            raise TypeError(f"only dense (strided) tensors can be cached, got layout {value.layout}; "
                            f"convert with .to_dense()")
        if value.is_meta:
            raise TypeError("meta tensors have no data to cache")
        raise TypeError("quantized tensors are not supported; dequantize first")
    shape = _SHAPES.get(value.shape) or _shape_of(value)
    if len(shape) > MAX_DIMS:
        raise ValueError(f"a value may have at most {MAX_DIMS} dimensions, got {len(shape)}")
    tensor = value.detach() if value.requires_grad else value
    dtype = tensor.dtype
    if dtype in _COMPLEX and tensor.is_conj():
        tensor = tensor.resolve_conj()
    if tensor.is_neg():
        tensor = tensor.resolve_neg()
    return tensor, dtype, shape


_TEMPLATES: dict[tuple[tuple[int, ...], torch.dtype], torch.Tensor] = {}
_MAX_TEMPLATES = 4096
_empty_like = torch.empty_like


def new_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """``torch.empty(shape, dtype=dtype)`` on the CPU (contiguous, standard strides), in about 60% of its
    time for a (shape, dtype) seen before: ``empty_like`` of a cached template skips parsing the shape and
    the dtype, which is a noticeable part of a small ``get``.  The template of a shape of two or more
    elements is a 0-d tensor expanded to ``shape`` (no memory of its own): its zero strides are not dense,
    so ``empty_like`` lays the result out as ``suggest_memory_format`` says, which is contiguous for zero
    strides (torch treats a zero channel stride as NCHW), and needs no ``memory_format`` argument to
    parse.  A shape of at most one element gets a real one-element (or empty) template, dense with
    ``torch.empty``'s strides, which ``empty_like`` keeps.  At most ``_MAX_TEMPLATES`` templates are kept
    (all dropped when full).  Thread-safe."""
    template = _TEMPLATES.get((shape, dtype))
    if template is None:
        if len(_TEMPLATES) >= _MAX_TEMPLATES:
            _TEMPLATES.clear()
        numel = 1
        for n in shape:
            numel *= n
        template = (torch.empty(shape, dtype=dtype, device="cpu") if numel <= 1
                    else torch.empty((), dtype=dtype, device="cpu").expand(shape))
        _TEMPLATES[(shape, dtype)] = template
    return _empty_like(template)


def flat(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``'s elements as a 1-D contiguous tensor of its dtype (a view when already contiguous)."""
    return tensor.reshape(-1) if tensor.is_contiguous() else tensor.contiguous().view(-1)


def slot_view(tier: object, slot: object, entry: object) -> torch.Tensor | None:
    """For a memory tier that is not read by address, ``entry``'s payload in place in ``slot`` as a tensor
    of its dtype and shape (see ``Entry.view``); ``None`` for other tiers and for CPU arenas (read with one
    ``memmove`` from ``tier.address(slot)``, so no view is kept per entry)."""
    typed_view = getattr(tier, "typed_view", None)
    if typed_view is None or getattr(tier, "addressable", False):
        return None
    return typed_view(slot, entry.dtype).view(entry.shape)  # type: ignore[attr-defined]


def as_bytes(flat: torch.Tensor) -> torch.Tensor:
    """A 1-D contiguous tensor's bytes as uint8 (a view)."""
    return flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)


def copy_payload(dst: torch.Tensor, raw: torch.Tensor, dtype: torch.dtype) -> None:
    """Copy a payload given as 1-D uint8 ``raw`` into ``dst`` (``dtype``, same number of elements, any
    shape and strides, any device), in ``dtype`` when ``raw`` is aligned for it."""
    try:
        src = raw if dtype == torch.uint8 else raw.view(dtype)
    except RuntimeError:  # raw starts at an offset not aligned to the item size: copy bytes instead
        if dst.is_contiguous():
            as_bytes(dst.view(-1)).copy_(raw)
            return
        src = raw.clone().view(dtype)
    dst.copy_(src.view(dst.shape))
