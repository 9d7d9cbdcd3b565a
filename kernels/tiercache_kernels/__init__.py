"""GPU kernels for tiercache, each with a pure-torch reference that CPU runs use and tests compare against.

The package is named ``tiercache_kernels`` (not ``kernels``): transformers probes for an installed
top-level package called ``kernels``.  CUDA code is compiled lazily through cupy on first use; importing
this package needs neither CUDA nor cupy.  The Triton kernels (:mod:`.block_scores`,
:mod:`.block_attention`, :mod:`.page_attention`) import triton only when launched (:mod:`.triton_support`); their torch
references live with their callers in ``tiercache_llm.sparse``.
"""

from . import block_attention, block_scores, gather, page_attention, triton_support
from .block_attention import block_attention_triton
from .block_scores import block_scores_triton
from .page_attention import page_attention_partials
from .gather import *  # noqa: F403 - the public names are gather.__all__
from .triton_support import interpret_enabled, triton_available

__all__ = list(gather.__all__) + [
    "block_attention_triton",
    "block_scores_triton",
    "interpret_enabled",
    "page_attention_partials",
    "triton_available",
]
