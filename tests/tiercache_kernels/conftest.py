"""Triton kernel tests run twice: interpreted on CPU and compiled on a GPU (``gpu`` marker).

Triton picks interpreter or compiler once, when it is first imported (see
``tiercache_kernels.triton_support``).  Without CUDA only the interpreter can run the kernels, so this
conftest sets ``TRITON_INTERPRET=1`` before anything imports triton (an explicit ``TRITON_INTERPRET=0``
is respected).  On a GPU machine the compiled tests run by default; run the interpreted ones with
``TRITON_INTERPRET=1 python -m pytest tests/tiercache_kernels``.
"""

import os
import sys

import pytest
import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request):
    """Where a Triton kernel test runs: ``cpu`` (needs the interpreter) or ``cuda`` (compiled)."""
    pytest.importorskip("triton")
    from tiercache_kernels.triton_support import interpreter_active

    if request.param == "cpu" and not interpreter_active():
        pytest.skip("interpreted Triton needs TRITON_INTERPRET=1 set before triton is imported")
    if request.param == "cuda" and interpreter_active():
        pytest.skip("triton was imported in interpreter mode: compiled kernels cannot run in this process")
    return torch.device(request.param)
