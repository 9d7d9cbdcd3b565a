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
