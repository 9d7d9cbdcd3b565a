"""GPU kernels for tiercache, each with a pure-torch reference that CPU runs use and tests compare against.

The package is named ``tiercache_kernels`` (not ``kernels``): transformers probes for an installed
top-level package called ``kernels``.  CUDA code is compiled lazily through cupy on first use; importing
this package needs neither CUDA nor cupy.
"""

from . import gather
from .gather import *  # noqa: F403 - the public names are gather.__all__

__all__ = list(gather.__all__)
