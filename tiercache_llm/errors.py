"""Exceptions raised by :mod:`tiercache_llm`."""

from __future__ import annotations


class TieredKVError(Exception):
    """Base class of tiercache_llm's own errors."""


class KVCapacityError(TieredKVError, RuntimeError):
    """The tiers cannot hold the KV cache exactly.

    Raised (a) before a block is stored when this cache's blocks would exceed the combined capacity of
    the tiers, or (b) when a block this cache stored has been evicted by the tiercache (for example by
    another user of a shared :class:`tiercache.Cache`).  Exact attention over every block is then
    impossible, so generation stops instead of attending over a silently truncated context.  The
    cache is left consistent for everything stored before the failing call; call
    :meth:`TieredKVCache.reset` (or build a larger cache) before reusing it.
    """


class UnsupportedModelError(TieredKVError, NotImplementedError):
    """The model's attention layout is not supported: layer kinds other than full and sliding-window
    attention (linear or chunked attention, KV shared between layers) at construction; in sparse mode
    (:meth:`TieredKVCache.for_model`), attention with logit soft-capping or learned attention sinks."""


class InconsistentCacheError(TieredKVError, RuntimeError):
    """A forward pass raised half-way through updating a :class:`~tiercache_llm.TieredKVCache` (an exception
    in a later layer, an I/O error of a tier, a ``KeyboardInterrupt``...): some layers hold the pass's new
    tokens and others do not (or, in sparse mode, a layer holds them without their digests).  Raised by the
    cache's next ``update`` (and ``crop``) instead of attending over layers of different lengths; the
    message names the layer the failed pass stopped at.  ``crop`` cannot repair it (it removes the same
    number of tokens from every layer); call :meth:`TieredKVCache.reset` and run the prompt again.
    """
