"""GPU kernels for tiercache, each with a pure-torch reference that CPU runs use and tests compare against.

The package is named ``tiercache_kernels`` (not ``kernels``): transformers probes for an installed
top-level package called ``kernels``.  CUDA code is compiled lazily through cupy on first use; importing
this package needs neither CUDA nor cupy.
"""

from .gather import (
    ALIGN,
    coalesce_ranges,
    copy_blocks,
    cuda_backend_available,
    gather_blocks,
    gather_blocks_reference,
    packed_layout,
    scatter_blocks,
    scatter_blocks_reference,
)

__all__ = [
    "ALIGN",
    "coalesce_ranges",
    "copy_blocks",
    "cuda_backend_available",
    "gather_blocks",
    "gather_blocks_reference",
    "packed_layout",
    "scatter_blocks",
    "scatter_blocks_reference",
]
