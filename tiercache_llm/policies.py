"""Tiercache placement policies suited to KV blocks."""

from __future__ import annotations

from typing import Any


class StreamingKVPolicy:
    """Placement for exact-mode KV streaming: oldest-inserted blocks leave a full tier first, and a hit
    in a slower tier is *not* promoted.

    Exact attention reads every block of a layer once per forward pass, in the same order, which is
    LRU's worst case: with a fast tier smaller than the context, promoting each hit evicts exactly the
    block the next pass needs first, so every read becomes a disk read *and* a disk write.  Keeping
    placement fixed instead (new blocks enter the fastest tier, the oldest ones are demoted once)
    gives hits on the fast-tier share of the context and moves each block down at most once.

    A tiercache policy sees only entry metadata (``rank``/``promote``); it is the default policy of
    caches that :class:`~tiercache_llm.TieredKVCache` creates.
    """

    name = "kv-stream"
    # The rank is the insertion order: a hit cannot change it, so tiercache may skip re-ranking on every
    # read (exact decode reads every block of every layer each step).  Ignored by a tiercache that
    # predates the attribute.
    rank_reads_access = False

    def rank(self, info: Any) -> Any:
        return info.inserted

    def promote(self, info: Any, src: str, dst: str) -> bool:
        return False
