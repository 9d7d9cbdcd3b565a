"""Lazy Triton plumbing shared by the Triton kernels of this package.

Triton is optional: nothing here imports it until a kernel is launched, so ``import tiercache_kernels``
works without it and CPU runs keep the torch references.  A kernel runs

- compiled, on CUDA tensors (needs triton and a GPU), or
- interpreted (Triton's interpreter executes the kernel with numpy; for checking kernels on machines
  without a GPU, not for speed) when ``TRITON_INTERPRET=1`` was set **before triton was first
  imported** in the process: triton decorates its own standard library (``tl.sum``, ...) at import
  time for one mode or the other, so one process cannot mix the two.  Interpreted kernels accept CPU
  tensors (and CUDA tensors, which the interpreter copies through the host).

Thread safety: the lazily built kernel objects are created under a lock.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Callable

import torch

__all__ = [
    "DualKernel",
    "compiled_triton_usable",
    "interpret_enabled",
    "interpreter_active",
    "require_triton",
    "triton_available",
    "triton_error",
]

_lock = threading.Lock()
_triton: Any = None
_error: BaseException | None = None


def _import_triton() -> Any:
    global _triton, _error
    if _triton is None and _error is None:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401

            _triton = triton
        except Exception as exc:  # ImportError, or a broken install
            _error = exc
    return _triton


def triton_available() -> bool:
    """True when triton imports (says nothing about a GPU)."""
    return _import_triton() is not None


def require_triton() -> None:
    """Raise ``RuntimeError`` naming the import failure when triton is unusable."""
    if _import_triton() is None:
        raise RuntimeError(f"the Triton kernels need triton, which failed to import: {_error}")


def triton_error() -> BaseException | None:
    """Why triton failed to import (``None`` if it imported or was never tried)."""
    _import_triton()
    return _error


def interpret_enabled() -> bool:
    """True when the environment asks for Triton's interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreter_active() -> bool:
    """True when triton imports and was imported in interpreter mode (see the module docstring)."""
    triton = _import_triton()
    if triton is None:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(triton.language.standard.sum, InterpretedFunction)


def compiled_triton_usable(device: torch.device) -> bool:
    """True when a compiled Triton kernel can run on ``device``: a CUDA device, triton imports, and the
    interpreter is not active.  The ``"auto"`` backends pick Triton exactly then."""
    return device.type == "cuda" and triton_available() and not interpreter_active()


class DualKernel:
    """A Triton kernel body (an undecorated function in a module that imports ``triton.language as
    tl``), built on first launch as a compiled ``JITFunction`` or, when the interpreter is active, an
    ``InterpretedFunction``."""

    def __init__(self, fn: Callable[..., None]) -> None:
        self.fn = fn
        self._compiled: Any = None
        self._interpreted: Any = None

    def for_device(self, device: torch.device) -> Any:
        """The launchable kernel for tensors on ``device`` (index it with the grid)."""
        require_triton()
        if interpreter_active():
            if self._interpreted is None:
                with _lock:
                    if self._interpreted is None:
                        from triton.runtime.interpreter import InterpretedFunction

                        self._interpreted = InterpretedFunction(self.fn)
            return self._interpreted
        if device.type == "cuda":
            if self._compiled is None:
                with _lock:
                    if self._compiled is None:
                        from triton.runtime.jit import JITFunction

                        self._compiled = JITFunction(self.fn)
            return self._compiled
        if device.type == "cpu":
            hint = (" (TRITON_INTERPRET=1 was set after triton had been imported)" if interpret_enabled() else "")
            raise RuntimeError(
                "Triton kernels run on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 is set before "
                f"triton is imported; use the torch backend on CPU{hint}"
            )
        raise RuntimeError(f"no Triton backend for tensors on {device}")


def next_power_of_2(n: int, at_least: int = 1) -> int:
    """The smallest power of two >= ``max(n, at_least)``."""
    n = max(int(n), at_least, 1)
    return 1 << (n - 1).bit_length()
