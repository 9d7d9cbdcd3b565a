"""Keep the cache's own tensors normal tensors when the model runs under ``torch.inference_mode``.

``generate`` (and users) may run forward passes under ``torch.inference_mode``; tensors created there are
*inference tensors*, which can never again be written in place outside inference mode.  A cache outlives
one pass: its tails, digests, decode buffers and pools are written in place by every later step, which
may run under ``no_grad`` instead (another ``generate`` call, a plain forward).  So every entry point that
creates or writes cache state runs under :func:`normal_tensors`.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])


@contextlib.contextmanager
def normal_tensors() -> Iterator[None]:
    """Inside ``torch.inference_mode``: leave it (tensors created are normal) with grad still disabled, as
    inference mode implies; elsewhere: nothing changes.  Inference tensors passed in (the model's new K/V)
    are only read."""
    if not torch.is_inference_mode_enabled():
        yield
        return
    with torch.inference_mode(False), torch.no_grad():
        yield


def with_normal_tensors(fn: F) -> F:
    """Decorator form of :func:`normal_tensors`."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_inference_mode_enabled():  # the common case, without a context manager
            return fn(*args, **kwargs)
        with normal_tensors():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
