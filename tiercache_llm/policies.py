"""Tiercache placement policies suited to KV blocks."""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Hashable, Iterable, Iterator


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


class AttentionPlacementPolicy:
    """Placement for sparse decode (``strategy="attention-aware"``): blocks attention keeps returning to
    stay in (and move up to) the fastest tier; blocks it abandoned leave first.

    The KV cache feeds each block's *decayed attention mass* into the tiercache score
    (``Cache.update_scores``, one batched call per forward pass; see
    :class:`tiercache_llm.sparse_layer.SparseController`).  This policy only reads that number:

    - ``rank`` = ``(score, inserted)``: in a full tier the block with the least decayed mass is demoted
      first (never-attended blocks, score 0, oldest first);
    - ``promote``: a hit in a slower tier moves up when attention has used it (score > 0) and its score
      is at least ``promote_threshold`` (default 0; a sparse KV cache raises it every step to the mass of
      the least attended block that still belongs in the fastest tier, so promotions do not churn).  A block selected for the first time has score 0 when it is
      fetched, so it is promoted at its *second* use, once attention confirmed it matters.

    Decay is applied by the KV cache by inflating new contributions (``mass * decay ** -step``), so a
    block's score never needs rewriting when attention stops using it: newer contributions simply
    outgrow it.  The tiercache itself learns nothing about attention.

    - ``defer_promotions``: when True, a read promotes only on a thread inside :meth:`promoting` (the
      sparse cache's background staging reads), so the forward pass's own reads never wait for the
      demotion writes a promotion causes (:mod:`tiercache_llm.sparse.pipeline`).
    - **Chosen promotions** (:meth:`choose`): a set of keys the caller picked (the sparse cache's budgeted
      promotion under a pool bound: the highest-mass blocks it reads from disk that beat the fastest tier's
      demotion victims by a margin).  A read of a chosen key made by a thread inside :meth:`chosen_reads`
      promotes it, whatever the threshold and the deferral say, at most once per :meth:`choose`; the
      promotion reuses the bytes that read just brought (tiercache's promotion of a hit), so it costs no
      second read.  :attr:`chosen_entries` / :attr:`chosen_bytes` count the promotions granted (monotonic;
      tiercache's ``bytes_moved`` counts the moves that happened: one can still fail for want of room).
    """

    name = "attention-aware"
    rank_reads_access = False  # rank depends on the score and insertion order only, never on reads

    def __init__(self, promote_threshold: float = 0.0, defer_promotions: bool = False) -> None:
        self.promote_threshold = float(promote_threshold)
        self.defer_promotions = bool(defer_promotions)
        self._local = threading.local()
        self._chosen: set = set()
        self._chosen_lock = threading.Lock()
        self.chosen_entries = 0
        self.chosen_bytes = 0

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_local", None)
        state.pop("_chosen_lock", None)
        state["_chosen"] = set()
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = threading.local()
        self._chosen_lock = threading.Lock()

    @contextlib.contextmanager
    def promoting(self) -> Iterator[None]:
        """Reads made by this thread inside the block may promote (with ``defer_promotions``)."""
        before = getattr(self._local, "on", False)
        self._local.on = True
        try:
            yield
        finally:
            self._local.on = before

    def choose(self, keys: Iterable[Hashable]) -> None:
        """Replace the chosen set with ``keys`` (empty: none): each may be promoted once by a read inside
        :meth:`chosen_reads`.  Thread-safe."""
        chosen = set(keys)
        with self._chosen_lock:
            self._chosen = chosen

    @property
    def chosen(self) -> int:
        """How many chosen keys are still waiting for a read."""
        return len(self._chosen)

    @contextlib.contextmanager
    def chosen_reads(self) -> Iterator[None]:
        """Reads made by this thread inside the block promote the chosen keys they hit (:meth:`choose`)."""
        before = getattr(self._local, "chosen", False)
        self._local.chosen = True
        try:
            yield
        finally:
            self._local.chosen = before

    def rank(self, info: Any) -> Any:
        return (info.score, info.inserted)

    def promote(self, info: Any, src: str, dst: str) -> bool:
        if self._chosen and getattr(self._local, "chosen", False):
            with self._chosen_lock:
                if info.key in self._chosen:
                    self._chosen.discard(info.key)
                    self.chosen_entries += 1
                    self.chosen_bytes += info.nbytes
                    return True
        if self.defer_promotions and not getattr(self._local, "on", False):
            return False
        return info.score > 0.0 and info.score >= self.promote_threshold
