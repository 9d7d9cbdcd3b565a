"""Tiercache placement policies suited to KV blocks."""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Hashable, Iterable, Iterator

from .blocks import KEY_PREFIX


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


class SpreadStreamingKVPolicy(StreamingKVPolicy):
    """:class:`StreamingKVPolicy` (no promotion, each block demoted at most once) that demotes the *oldest
    block position* of any layer first, so a full fast tier keeps the newest blocks of every layer rather
    than every block of the last layers written (opt-in: ``TieredKVCache(policy="kv-stream-spread")``).

    A cache filled layer by layer (a prefill) otherwise ends with its last layers wholly in the host tier
    and the others wholly on disk.  Exact decode then reads the disk for the first layers and only copies
    memory for the last ones, and its reads ahead, bounded by the decode buffer's slots, cannot keep the
    disk busy through those memory-only layers at the end of every step.  Spread over the layers, every
    layer reads its share from the disk and the disk keeps reading at the pace the forward pass consumes.
    Measured on a shared 2-core box (``benchmarks/exact_cold_ab.py``, docs/benchmarks.md "Exact cold A/B"):
    it removed the forward pass's waits at 8K x 4 but the steps came out within noise of ``kv-stream``
    (the forward pass's CPU rose as the host copies moved beside every layer), and 2K x 1 at 2 threads
    measured slower, so it is not the default.

    ``rank`` = ``(serial, inserted)``: the block's serial (the last field of a
    :func:`~tiercache_llm.blocks.block_key`; serials grow with position within a layer), ties (the same
    position in several layers; K and V of a block) oldest-inserted first.  Keys that are not block keys
    rank as serial 0.  Ranks are fixed at insertion, so a hit never re-ranks (``rank_reads_access`` False).
    """

    name = "kv-stream-spread"

    def rank(self, info: Any) -> Any:
        key = info.key
        serial = key[4] if type(key) is tuple and len(key) == 5 and key[0] == KEY_PREFIX else 0
        return (serial, info.inserted)


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
    def _thread_flag(self, name: str) -> Iterator[None]:
        """Set this thread's flag ``name`` inside the block (nesting restores the outer value)."""
        before = getattr(self._local, name, False)
        setattr(self._local, name, True)
        try:
            yield
        finally:
            setattr(self._local, name, before)

    def promoting(self) -> contextlib.AbstractContextManager[None]:
        """Reads made by this thread inside the block may promote (with ``defer_promotions``)."""
        return self._thread_flag("on")

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

    def chosen_reads(self) -> contextlib.AbstractContextManager[None]:
        """Reads made by this thread inside the block promote the chosen keys they hit (:meth:`choose`)."""
        return self._thread_flag("chosen")

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
