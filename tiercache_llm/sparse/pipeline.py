"""The overlapped decode pipeline of a sparse :class:`~tiercache_llm.TieredKVCache`.

What each strategy runs (:meth:`PipelineConfig.for_strategy`):

================== ============== =========== ============ ============ ========== ============
strategy           pool retention layer-ahead predictor    disk staging deferred   write-behind
                                                                        promotions
================== ============== =========== ============ ============ ========== ============
fetch-every-step   none           -           -            -            -          -
reuse-layer-ahead  previous step  yes         query        -            -          -
attention-aware    mass, x1.5,    yes (*)     previous     yes (+near,  yes        64 MiB
                   seeded                                  idle near)
================== ============== =========== ============ ============ ========== ============

(``reuse-layer-ahead`` runs under the ``kv-stream`` policy, ``attention-aware`` under the
``attention-aware`` policy with its scores.)

(*) ``attention-aware``'s layer-ahead prefetch uses the ``"previous"`` predictor and its reads never promote.
With unbounded pools it stages nothing (the pool holds the previous selection: no second digest scoring, no
reads; the ``"query"`` predictor cost more than it hid on 2 cores, docs/sparse.md "Decode pipeline").  Under a
pool bound the pools fill (``pool_bytes``), a layer's misses are mostly the blocks the pools evicted since its
last fetch: the previous selection predicts them, and they are read one layer ahead off the forward thread;
disk staging ahead then stages nothing (:meth:`DecodePipeline.pools_at_bound`): its near misses and high-mass
blocks were promoting reads beside the forward pass.  Measured at SmolLM2 8K x batch 4, 25 % selection
(``sparse_speed.py``, one cache at a time): pools at 25 % of the KV 744 -> 526 ms/step (reuse-layer-ahead 591),
at 50 % 654 -> 426 (407); unbounded 192 (docs/sparse.md "Pool budget").

- **Layer-ahead prefetch.**  When layer ``l`` fetches, the entries layer ``l+1`` is predicted to need and
  that are not in the fastest tier are read into the :class:`~.staging.StagingArea` on the I/O pool
  (disk reads release the GIL) while layer ``l`` fetches and attends; the last sparse layer predicts the
  next step's first.  The prediction is layer ``l+1``'s selection of the previous step
  (``predictor="previous"``), layer ``l+1``'s digests scored with layer ``l``'s query
  (``"query"``), or the previous selection plus its nearest misses (``"near"``, opt-in: recall 0.90 -> 0.95,
  synchronous disk entries per step 257-259 -> 110-123, slower in 3 of 4 runs on 2 cores; docs/sparse.md).
  Layer ``l+1`` takes what was staged and reads every other selected entry itself
  (mispredictions are fetched, never skipped).  With ``stage_into_slots`` (``reuse-layer-ahead`` and
  ``attention-aware``) the predicted blocks get slots of layer ``l+1``'s pool instead and are read straight
  into them (:meth:`DecodePipeline._read_into_slots`, :meth:`~.pool.PoolArena.reserve`): its fetch waits for
  the read and copies nothing (SmolLM2 8K x batch 4, pools 25 % of the KV: copy 107-164 -> 16-18 ms/step,
  forward-thread CPU 319-400 -> 270-306 ms/step for attention-aware; docs/sparse.md "Reads into reserved slots").
  With ``slot_reads_after_sync`` (``attention-aware``) those reads start only once the fetching layer's own
  synchronous reads from the slower tiers are done, so its few mispredicted disk reads do not queue behind them
  (:meth:`DecodePipeline._open_gate`).
- **Near misses staged while the disk idles** (``idle_stage_near``, ``attention-aware``): the previous selection
  cannot predict the blocks entering a layer's selection, which its fetch then read synchronously; when a fetch
  reserves no slow read for the next layer (the layers the fastest tier holds), the near misses of the following
  layers (the next step's first ones included) are read into the staging area on a thread of their own, never
  promoting (:meth:`DecodePipeline._stage_idle`).  SmolLM2 8K x 4, 25 %, default bound: synchronous disk reads
  37 -> 0 entries per step for 34 entries read ahead (docs/sparse.md "Near misses staged while the disk idles").
- **Resident pool** (:class:`~.pool.ResidentPool`, one per sparse layer, all views of one shared
  :class:`~.pool.PoolArena` bounded by ``pool_bytes``): the selected blocks are read straight into slots
  of a persistent ``(N, B, H, S, D)`` pool and attention reads them there through a page table, so a
  block still resident when it is selected again costs no read and no copy.  What stays
  resident between steps (``retention``): nothing (``fetch-every-step``, the honest baseline: every
  selected block is read from its tier every step), exactly the previous step's selection
  (``reuse-layer-ahead``), or a pool of ``pool_blocks_factor`` x the largest union so far (at most the
  layer's blocks) whose blocks outside the current selection are evicted lowest decayed attention mass
  first (``attention-aware``: attention-aware placement at the level closest to compute).  Released on crop / reorder / batch changes.
- **Bounded pools, exclusive placement** (opt-in, only under ``pool_bytes``): ``exclusive_pool`` scores the
  blocks the pools hold at the end of a step 0 in the tiercache, so the fastest tier demotes them first and
  keeps blocks the pools do not hold (:meth:`DecodePipeline.pool_held_scores`); ``pool_prefer_cheap`` makes
  the arena evict, within each layer, the blocks that were read from the fastest tier before the others
  (:attr:`~.pool.PoolArena.prefer_cheap`).  Both cut the disk reads (SmolLM2 8K x batch 4, 25 % selection,
  pools at 25 % / 50 % of the KV: disk entries per step 2641 -> 2073 / 1276 -> 724) but were slower on the
  2-core CPU machine (host-tier copies on the forward thread, promotions and demotions beside it; docs/sparse.md
  "Pool budget"), hence off.
- **Disk staging ahead** (``attention-aware``): after each step, every layer's highest-mass stored blocks
  that are neither in the fastest tier nor in its pool (``stage_ahead`` of them), then its ``stage_near``
  *near misses* (the unselected blocks its last selection ranked closest to its cut, outside its pool;
  :meth:`DecodePipeline.near_misses`) are read into the staging area for its next step; entries still
  wanted are renewed, not read again.  The high-mass rule finds almost nothing next to a mass-retained
  pool (the pool holds those blocks); the blocks a step reads from disk are the ones newly entering the
  selection, and the near misses predict them (SmolLM2 8K x batch 4, 25 %: 16 per layer cover ~80 %).
- **Prefaulted pools** (``prefault_pool``, every strategy with an I/O pool): when a resident pool grows,
  its new slots are faulted in on a background thread (``MADV_POPULATE_WRITE``), so the first read into a
  fresh slot does not pay a page fault per 4 KiB on the forward pass (~0.15 ms per 192 KiB entry measured
  on the benchmark VM).
- **Pools seeded by the prefill** (``seed_pool``, ``attention-aware``): a prefill copies the blocks it stores
  into the resident pools from the states it has in memory (:meth:`DecodePipeline.seed`), so decoding starts
  with them resident instead of reading them back from the tiers and filling the pools through several steps
  of misses and background staging reads beside the forward pass (docs/sparse.md "Pools seeded by the prefill").
- **The first decode step** (every strategy with a resident pool, unless seeded): the arena is made at the step's first
  fetch with every sparse layer's view, so its first allocation reserves rows for all of them (views made
  one per layer as the step went reallocated it, copying every held slot, at most layers: 9 times, 2.2-3.1 s
  at SmolLM2 4K x batch 4), and while the first layer reads, the slots the next layers will take are
  faulted in on the prefault thread (``warm_first_step``).  None of it changes what is attended.
- **Deferred promotions** (``attention-aware``): the forward pass's own reads do not promote (so they
  never wait on the demotion writes a promotion causes); the background reads above do, under
  :meth:`~tiercache_llm.policies.AttentionPlacementPolicy.promoting`.
- **Budgeted promotion under a bound** (``promote_bytes_per_step``, opt-in): with the pools at their bound
  nothing above promotes, so the fastest tier's contents are fixed by the prefill and by demotions.  After each
  step :meth:`DecodePipeline.choose_promotions` picks, within the byte budget, the highest-mass blocks the
  layer-ahead prefetch will read from a slower tier next step whose mass beats the fastest tier's lowest-mass
  entries by ``promote_margin``, and hands their keys to the policy
  (:meth:`~tiercache_llm.policies.AttentionPlacementPolicy.choose`); the background read that brings them
  promotes them from the bytes it just read (no second read; the demotion write of the victim runs on that
  I/O thread; ``promote_reuse_read=False``: a tiercache prefetch promotes them at once, reading them again).
  Skipped while the write-behind queue is over half full.  Off by default: it converges without
  ping-pong but did not move reads from disk to the host tier at SmolLM2 8K x 4 (docs/sparse.md "Budgeted
  promotion under a bound").
- **Overlapped synchronous reads** (``overlap_sync_reads``, opt-in): a layer's own reads of its missing blocks
  run on a reader thread while attention covers the resident part of its selection; the layer waits for them,
  attends their pages and merges the two parts exactly by their log-sum-exp (:class:`PendingReads`,
  :func:`~tiercache_llm.sparse_layer.attend_overlapped`).  CPU pools only.  Off: at SmolLM2 8K x 4 on the shared
  2-core machine it cut the forward thread's sync-read wait by 20-70 ms/step but not the step time (batch 1:
  4-7 % faster; docs/sparse.md "Decode pipeline").
- **End-of-step worker** (``background_end_step``, with disk staging): the work after a decode step (the
  step's tiercache scores, the promotion threshold, disk staging ahead's choice of blocks and its jobs) runs
  on a worker thread once the forward pass returns (:meth:`DecodePipeline.defer_end_of_step`), overlapping
  the model's head and the next step; the forward thread waits for it only at :meth:`DecodePipeline.fence`
  (the next step's end, row / block changes, the controller's own flushes, close).

Correctness never depends on the background: a staged copy is a copy of an immutable entry (keys are
never reused), a failed or late job is ignored, and a key deleted meanwhile simply fails its job.

Thread safety: the forward pass calls :meth:`fetch` / :meth:`end_step` / :meth:`defer_end_of_step` from one
thread; jobs run on the pool and the end-of-step worker (which reads the layers' masses, block lists and a
snapshot of each pool's held blocks, and writes only the tiercache, the policy's threshold, the staging
area and counters under locks); :meth:`close` may be called from any thread.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

from tiercache.buffers import aligned_empty

from .fetch import layer_keys, read_entries
from .placement import promotion_threshold
from .pool import AUTO, GROWTH, PoolArena, ResidentPool, Retention, auto_pool_bytes, can_populate, check_pool_bytes, \
    no_memory_tier_message, populate
from .stage_choice import LastSelection, near_misses_many, near_parts, top_mass_many
from .staging import StagingArea

if TYPE_CHECKING:  # pragma: no cover
    from ..kv_cache import TieredKVLayer
    from ..sparse_layer import SparseLayerState, SparseStats
    from .selection import BlockSelection

Predictor = Literal["previous", "query", "near"]
MiB = 1 << 20
# The end-of-step worker is mostly Python (it holds the GIL): it sends scores in chunks of this many entries
# and sleeps YIELD_SECONDS between chunks and layers, so a forward thread coming back from a torch op for
# the GIL waits for one chunk instead of the interpreter's switch interval (5 ms) each time.
SCORE_CHUNK = 512
YIELD_SECONDS = 50e-6


@dataclass(frozen=True)
class PipelineConfig:
    """Which pipeline stages run, and their bounds.

    Attributes:
        reuse: blocks stay in the layer's resident pool between steps (``False``: retention ``"none"``).
        pool_blocks_factor: with ``reuse``, ``1.0`` keeps exactly the previous step's selection
            (retention ``"previous"``); ``> 1.0`` sizes the pool to this many times the largest union of
            selected blocks so far and evicts the lowest decayed attention mass first (retention ``"mass"``).
        layer_ahead: stage the next layer's predicted entries in the background.
        disk_staging: stage each layer's highest-mass entries outside the fastest tier for its next step.
        defer_promotions: foreground reads never promote; background reads do (needs an
            :class:`~tiercache_llm.policies.AttentionPlacementPolicy`).
        predictor: ``"previous"`` (the next layer's selection of the previous step), ``"query"``
            (the next layer's digests scored with this layer's query) or ``"near"`` (``"previous"`` plus the
            next layer's ``predict_near`` near misses of its previous selection outside its pool,
            :meth:`DecodePipeline.near_misses`: the blocks about to cross its cut; no second scoring).
        predict_near: with ``predictor="near"``, near misses added to each layer's prediction.
        ahead: with ``layer_ahead``, how many layers ahead are staged: each layer's predicted entries are
            submitted once, when the layer ``ahead`` fetches before it starts fetching (its previous
            selection; the ``"query"`` predictor, which needs the preceding layer's query, serves the next
            layer only), so slow reads have ``ahead`` layers of compute to land in.
        staging_bytes: bound of staged plus in-flight entries, bytes.
        io_workers: threads of the background pool (disk reads queue there; tiercache's own disk pool
            parallelises one batch further).
        stage_ahead: blocks per layer and step staged by disk staging: the highest decayed mass outside the
            fastest tier and the layer's pool.
        stage_near: blocks per layer and step staged by disk staging besides those: the layer's near misses
            (:meth:`DecodePipeline.near_misses`: the blocks its last selection ranked closest to its cut)
            outside its pool; those on the fastest tier are not read.  Staged again at every step, they stay
            staged while they remain near misses (:class:`~.staging.StagingArea` renewal).
        prefault_pool: a resident pool's new slots are faulted in (``MADV_POPULATE_WRITE``) on a background
            thread as soon as the pool grows, so the forward pass does not pay a page fault per 4 KiB of
            every first read into a slot (CPU, Linux >= 5.14; only in pipelines with an I/O pool).
        warm_first_step: the first-step warm-up (with ``prefault_pool``): when the first fetch of a decode step
            makes the pools' arena (the first step after a prefill, or after crop / reorder / a batch change),
            the prefault thread faults in, lowest first, the slots the following layers are expected to take
            (as many per layer as the first one took) while the first layer reads; ``warm_bytes`` counts them.
        wait_timeout: seconds a layer waits for an in-flight entry before reading it itself.
        complement_reuse: attention-aware placement with resident pools: the fastest tier complements the
            pool (:meth:`DecodePipeline.placement_scores`) instead of holding the most attended blocks.
        exclusive_pool: with bounded pools (``pool_bytes``) and attention-aware placement, the blocks the pools
            hold at the end of a step score 0 in the tiercache (:meth:`DecodePipeline.pool_held_scores`), so
            the fastest tier holds blocks the pools do not; no effect on unbounded pools.
        pool_prefer_cheap: with bounded pools, a layer's blocks read from the fastest tier are evicted before
            its others (:attr:`~.pool.PoolArena.prefer_cheap`): the pools keep what only the slow tier holds.
        write_behind_bytes: ``> 0``: new blocks are written by a writer thread through a queue of at most
            this many bytes (:meth:`~tiercache_llm.store.BlockStore.enable_write_behind`); ``0``: writes
            are synchronous.
        pool_bytes: bound of the resident pools of all layers together (one shared
            :class:`~.pool.PoolArena`), bytes or a size string (``"512MiB"``); ``"auto"`` (default): the
            budget of the memory tier on the model's device (the host tier for a CPU model, the gpu tier
            otherwise; the other memory tier's when that one is absent; resolved at the first update,
            :func:`~.pool.auto_pool_bytes`; a cache with no memory tier refuses it); ``None``: unbounded
            (each layer keeps its own allowance).  When the bound is reached, a fetching layer evicts blocks
            other layers hold (``pool_eviction``); a single layer's union larger than the bound grows the pools past it with a
            warning (``pool_over_budget``).  Only what is resident changes, never what is attended.
        pool_eviction: which held blocks a layer short of slots evicts (from any layer): ``"mass"`` (lowest
            decayed attention mass), ``"distance"`` (the layer whose next fetch is farthest away first, its
            lowest-mass blocks first); ``None``: ``"distance"`` (more pool hits in our measurement,
            docs/sparse.md "Pool budget").
        promote_bytes_per_step: budgeted promotion under a pool bound (``attention-aware`` under an
            :class:`~tiercache_llm.policies.AttentionPlacementPolicy`; ``0``: off): after each step, while the
            pools fill their bound (:meth:`DecodePipeline.pools_at_bound`), the highest-mass blocks of the layers'
            last selections that the pools no longer hold and that live on a slower tier (the blocks the
            layer-ahead prefetch reads next step) are chosen for promotion to the fastest tier, at most this many
            bytes, each only if its decayed mass beats the fastest tier's demotion victim it would displace
            (its lowest-mass block, paired in order) by ``promote_margin``; the background read that brings
            them promotes them, reusing its bytes (:meth:`DecodePipeline.choose_promotions`).
        promote_margin: the hysteresis of budgeted promotion: a block is promoted only if its mass exceeds
            ``promote_margin`` x the mass of the victim it displaces, so a block and its victim cannot swap
            back and forth (the victim would have to beat it by the same factor); ``>= 1.0``.
        promote_reuse_read: how chosen blocks are promoted: ``True``, by the layer-ahead read that brings them
            next step, from its bytes (no second read, but that staging job waits for the victims' demotion
            writes); ``False``, at once by the tiercache's own background thread (``Cache.prefetch``: a second read
            of each, off the pipeline's jobs), so the next step finds them in the fastest tier; skipped while the
            previous choice's prefetch is still running (``promote_skipped``).
        background_end_step: with disk staging, the work after each decode step (the step's tiercache scores,
            the promotion threshold, disk staging ahead's choice of blocks and its jobs) runs on a worker
            thread once the forward pass returns (:meth:`DecodePipeline.defer_end_of_step`), overlapping the
            model's head and the next step's start, instead of on the forward thread.  ``False``: inline.
        seed_pool: with ``"mass"`` retention, a prefill (any non-decode update) copies the blocks it stores into
            the layer's resident pool from the states it has in memory (:meth:`DecodePipeline.seed`), so the
            first decode steps find them resident instead of reading them back from the tiers and filling
            the pool through several steps of misses and background staging reads (``attention-aware``'s
            default; the pools then hold the prompt's K/V from the prefill on, within ``pool_bytes``).
        stage_into_slots: with ``layer_ahead`` and resident pools, the predicted blocks outside the next layer's
            pool (and outside the fastest tier) get slots of its pool one layer ahead
            (:meth:`~.pool.PoolArena.reserve`) and are read straight into them in the background, so its fetch
            finds them resident and copies nothing; blocks whose entries cannot land in a slot as stored (a row
            map, another batch size) or that find no slot are staged as before.  The fetch waits for a read
            into its slots still in flight (without ``wait_timeout``: the slot cannot be read into twice); a
            failed read drops the block, which is then read synchronously.  CPU pools only (a GPU pool stages as
            before: a background write would have to be ordered after the kernels still reading the evicted block).
        slots_from_fastest: with ``stage_into_slots``, predicted blocks whose entries are both on the fastest
            tier are read into reserved slots too (their copy moves off the forward thread); otherwise the
            fetch copies them.
        settle_late: with ``stage_into_slots``, a fetch waits for the reads into its reserved slots still in
            flight only after its own reads and copies of the other missing blocks (a failed one is then read
            synchronously into its slot), and the pools' evictions pass over slots with a read in flight
            (:attr:`~.pool.PoolArena.pass_in_flight`); ``False``: the fetch waits before them, and an eviction
            waits for the read into its victim.  Attention reads the slots only after either.
            On for ``attention-aware``; off for ``reuse-layer-ahead``, whose ``"query"`` predictor leaves many
            unselected blocks in flight that then hold their slots until the layer's next fetch (measured slower).
        overlap_sync_reads: a layer's synchronous reads (the selected blocks neither resident, staged nor read
            ahead) run on a reader thread while attention covers the part of the selection already resident
            (the new tokens included); the layer then waits for them (and, with ``settle_late``, for the reads
            into its reserved slots still in flight) and attends the blocks they brought, the two parts merged
            exactly by their log-sum-exp (:func:`~.page_table.merge_attention`; logits equal the unsplit
            attention's within float32 rounding).  A failed read is re-read or raises as without it, at the
            wait.  CPU pools and the torch attention path only (a pool on another device reads as before, with
            a warning).  Off by default (docs/sparse.md "Decode pipeline" has the measurements).
        slot_reads_after_sync: with ``stage_into_slots``, the background reads into the slots reserved for the
            next layers at a layer's fetch start only once that fetch's own synchronous reads from the slower
            tiers are done (its slots are reserved at once, as before; its copies from the fastest tier run after
            the release): the fetch's few mispredicted disk reads then no longer queue behind the next layer's
            read-ahead (on the device and in the disk tier's read pool), which the forward thread waited out.  Only
            when reads start changes, never what is reserved, read or attended.  On for ``attention-aware``
            (SmolLM2 8K x 4, pools at the default bound: sync disk wait 107 -> 39 ms/step, 481 -> 427 ms/step;
            docs/sparse.md "Reads into reserved slots after the fetch's own").
        reads_beside_copies: a fetch's synchronous reads from the slower tiers (its missing blocks on disk) run on a
            reader thread while the forward thread copies the same fetch's staged entries and its missing blocks
            on the fastest tier into their slots; the fetch then waits for them (and, with
            ``slot_reads_after_sync``, starts the next layers' held-back reads).  Only when the reads run changes,
            never what is read or attended.  Without a copy to overlap the reads stay on the forward thread.
        idle_stage_near: with ``layer_ahead`` (``"previous"`` predictor) and a staging area, near misses read
            while the disk idles: when a layer's fetch reserves no read from a slower tier for the next layer
            (e.g. the layers the fastest tier holds), up to this many near misses
            (:meth:`DecodePipeline.near_misses`, outside the layer's pool and its last selection, on a slower
            tier) of each of the next ``idle_stage_layers`` layers after the next one (in fetch order, the next
            step's first layers included; each layer once between two of its fetches) are read into the staging
            area, never promoting: the blocks entering a layer's selection, which the previous selection cannot
            predict and its fetch would read synchronously.  ``0``: off; ``attention-aware``: 16 (SmolLM2 8K x 4, 25 %,
            default pool bound: synchronous disk reads 37 -> 0 entries/step, 34-39 entries/step read ahead for 36
            taken; paired -20 to -88 ms/step, 7 of 10 rounds faster, on a shared 2-core machine; docs/sparse.md "Near
            misses staged while the disk idles").  Stats: ``idle_staged`` /
            ``idle_staged_bytes`` (entries and bytes staged for a layer's next fetch), ``idle_read`` /
            ``idle_read_bytes`` (of those, the entries read: the others were staged already, and an untaken one
            stays staged, so a block that stays a near miss is read once), ``idle_hits`` (taken by their layer's
            next fetch), ``idle_wasted`` / ``idle_wasted_bytes`` (not taken there), ``idle_seconds`` (choosing
            them, on the forward thread).  Correctness never depends on it (a staged copy is optional).
        idle_stage_layers: with ``idle_stage_near``, layers whose near misses one idle fetch stages.
        idle_barren_steps: with ``idle_stage_near``, a layer whose near misses all sat on the fastest tier is not
            looked at again for this many decode steps (under a pool bound nothing promotes, so such a layer stays
            so; each look costs forward-thread time); ``0``: looked at every time.
        huge_pages: the resident pools' CPU slot tensors (8 MiB or more) are allocated on transparent huge pages
            (:func:`tiercache.buffers.huge_empty`): a direct disk read into a slot pins 2 MiB pages instead of
            4 KiB ones.  On for ``attention-aware`` and ``reuse-layer-ahead`` (SmolLM2 8K x 4, 25 %, default
            bound, ms/step at 1 / 2 threads: 647 -> 571 / 634 -> 599 and 697 -> 608 / 709 -> 710), off for
            ``fetch-every-step``, which measured slower with it (838 -> 869 / 841 -> 857), so the baseline keeps
            its faster setting.  Only how the slots are allocated changes (docs/sparse.md "Huge-page pools").
        part_reads: the fetch reads of each block only the (row, KV head) parts its layer selected (one byte range
            per run of consecutive parts of the part-major joint entry, ``BlockStore.get_blocks(ranges=)``), and a
            resident block whose selected parts are not all in its slot (a *part miss*) has just the missing parts
            read into it; the pool tracks per slot which parts it holds (:attr:`~.pool.PoolArena.parts`), so
            attention never reads a part that was not read.  Every strategy (one shared fetch path); CPU pools of
            part-major layers only.  Staged entries, reads into reserved slots and the prefill's seeding still
            move whole entries (all parts held).  ``False``: whole entries, as before (docs/sparse.md "Part
            reads").  Needs a tiercache whose ``get_many`` reads ranges (``BlockStore.ranged_reads``): without one,
            whole entries.
        slot_part_reads: with ``part_reads``, the reads ahead into reserved slots (``stage_into_slots``) read only the
            predicted selection's parts (the previous selection's, or the ``"query"`` predictor's), and the parts the
            layer then selects beyond them are read at its fetch (part misses).  Off by default: at SmolLM2 8K x 4,
            25 %, it cut the disk bytes per step by half for ``attention-aware`` and ``reuse-layer-ahead`` but moved
            reads from the background onto the forward thread (synchronous part misses) and measured slower
            (docs/sparse.md "Part reads"; again one cache per process, 0 of 3 paired rounds faster at 25 % and 1 of 3
            at 6.25 %: "Part reads ahead").
        slot_part_extra: with ``slot_part_reads``, each read ahead into a reserved slot also reads, per (row, KV head),
            the parts holding the ``ceil(slot_part_extra x pages it selected)`` unselected pages its layer's last
            selection scored highest (:func:`~.stage_choice.near_parts`: the parts about to cross its cut, which
            the previous selection cannot predict); ``0``: the predicted selection's parts only.  More bytes read
            ahead, fewer part misses on the forward thread.  Off: at SmolLM2 8K x 4, 25 %, 0.5 / 1.0 cut the misses of
            ``slot_part_reads`` from 280 to 94 / 33 per step for 423 / 489 instead of 361 MiB/step read from disk (the
            default: 596), and both were still slower than the default in every paired round (docs/sparse.md "Part
            reads ahead").
        slot_part_union: with ``slot_part_reads`` and the ``"query"`` predictor, the parts read ahead are the union of
            the query predictor's and the layer's previous selection's (the blocks are the query predictor's).  Off:
            at SmolLM2 8K x 4, 25 %, it left 160 part misses per step and read 585 MiB/step (docs/sparse.md "Part reads
            ahead").
    """

    reuse: bool = False
    layer_ahead: bool = False
    disk_staging: bool = False
    defer_promotions: bool = False
    predictor: Predictor = "previous"
    predict_near: int = 8
    staging_bytes: int = 256 * MiB
    io_workers: int = 2
    stage_ahead: int = 4
    stage_near: int = 0
    ahead: int = 1
    exclusive_pool: bool = False
    pool_prefer_cheap: bool = False
    prefault_pool: bool = True
    warm_first_step: bool = True
    wait_timeout: float = 30.0
    write_behind_bytes: int = 0
    complement_reuse: bool = False
    pool_blocks_factor: float = 1.0
    pool_bytes: int | str | None = "auto"
    pool_eviction: str | None = None
    background_end_step: bool = True
    seed_pool: bool = False
    promote_bytes_per_step: int = 0
    promote_margin: float = 2.0
    promote_reuse_read: bool = True
    stage_into_slots: bool = False
    slots_from_fastest: bool = False
    settle_late: bool = True
    overlap_sync_reads: bool = False
    slot_reads_after_sync: bool = False
    reads_beside_copies: bool = False
    idle_stage_near: int = 0
    idle_stage_layers: int = 4
    idle_barren_steps: int = 8
    huge_pages: bool = False
    part_reads: bool = True
    slot_part_reads: bool = False
    slot_part_extra: float = 0.0
    slot_part_union: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "pool_bytes", check_pool_bytes(self.pool_bytes, auto=True))
        if self.pool_eviction not in (None, "mass", "distance"):
            raise ValueError(f"pool_eviction must be None, 'mass' or 'distance', got {self.pool_eviction!r}")
        f = self.pool_blocks_factor
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not f >= 1.0:
            raise ValueError(f"pool_blocks_factor must be a number >= 1.0, got {f!r}")
        for item in dataclasses.fields(self):  # every switch: a truthy "no" or 1 must not turn a feature on
            if item.type in ("bool", bool) and not isinstance(value := getattr(self, item.name), bool):
                raise ValueError(f"{item.name} must be a bool, got {type(value).__name__} {value!r}")
        if self.predictor not in ("previous", "query", "near"):
            raise ValueError(f"predictor must be 'previous', 'query' or 'near', got {self.predictor!r}")
        if isinstance(self.staging_bytes, bool) or not isinstance(self.staging_bytes, int) or self.staging_bytes < 0:
            raise ValueError(f"staging_bytes must be an int >= 0, got {self.staging_bytes!r}")
        if not isinstance(self.io_workers, int) or self.io_workers < 1:
            raise ValueError(f"io_workers must be an int >= 1, got {self.io_workers!r}")
        if isinstance(self.write_behind_bytes, bool) or not isinstance(self.write_behind_bytes, int) \
                or self.write_behind_bytes < 0:
            raise ValueError(f"write_behind_bytes must be an int >= 0, got {self.write_behind_bytes!r}")
        if isinstance(self.ahead, bool) or not isinstance(self.ahead, int) or self.ahead < 1:
            raise ValueError(f"ahead must be an int >= 1, got {self.ahead!r}")
        t = self.wait_timeout
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t < float("inf"):
            raise ValueError(f"wait_timeout must be a finite number of seconds >= 0, got {t!r}")
        x = self.slot_part_extra
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not 0 <= x < float("inf"):
            raise ValueError(f"slot_part_extra must be a finite number >= 0, got {x!r}")
        m = self.promote_margin
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not m >= 1.0:
            raise ValueError(f"promote_margin must be a number >= 1.0, got {m!r}")
        for name in ("stage_ahead", "stage_near", "promote_bytes_per_step", "predict_near", "idle_stage_near",
                     "idle_stage_layers", "idle_barren_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")

    @property
    def active(self) -> bool:
        return self.reuse or self.layer_ahead or self.disk_staging

    @property
    def retention(self) -> Retention:
        """The resident pool's retention rule (see the module doc)."""
        if not self.reuse:
            return "none"
        return "mass" if self.pool_blocks_factor > 1.0 else "previous"

    @classmethod
    def for_strategy(cls, strategy: str, **overrides: Any) -> "PipelineConfig":
        if strategy == "fetch-every-step":
            base = cls()
        elif strategy == "reuse-layer-ahead":
            base = cls(reuse=True, layer_ahead=True, predictor="query", stage_into_slots=True,
                       settle_late=False, huge_pages=True)
        elif strategy == "attention-aware":
            base = cls(reuse=True, layer_ahead=True, disk_staging=True, defer_promotions=True, predictor="previous",
                       write_behind_bytes=64 * MiB, pool_blocks_factor=1.5, stage_near=16, seed_pool=True,
                       stage_into_slots=True, slot_reads_after_sync=True, idle_stage_near=16,
                       huge_pages=True)
        else:
            raise ValueError(f"unknown strategy {strategy!r}")
        return cls(**{**asdict(base), **overrides})


@dataclass
class PipelineStats:
    """Per-stage counters of the pipeline (monotonic until :meth:`DecodePipeline.reset_stats`).

    Entries are tiercache entries: one per block where a block's K and V are one joint entry (equal shapes,
    the default), else one K or one V block (two per block).  ``needed`` counts the stored entries layers
    fetched; each was served in place from the layer's resident pool (``reused``: no read, no copy), the
    staging area (``staged``, copied into its pool slot) or read
    synchronously from its tier (``sync`` / ``sync_seconds`` per tier, the reads' own time).
    ``sync_wait_seconds``: the forward thread's time on those reads (without ``overlap_sync_reads``: the reads;
    with it: its wait for them after attending the resident part; waits for reads into reserved slots count in
    ``slot_wait_seconds`` either way); ``overlapped``: layer fetches whose attention was split that way.  Of the needed entries not
    reused, ``needed_nonresident`` were outside the fastest tier when the layer fetched, and
    ``staged_nonresident`` of those came from staging: ``prefetch_hit_rate`` is their ratio (the share of
    slow-tier reads taken off the critical path).  The layer-ahead predictor named ``predicted``
    entries (``predicted_nonresident`` of them outside the fastest tier, the ones it stages); of the
    ``predictable`` needed entries (those not reused, at layers it predicted for) ``predicted_hits``
    were among them: ``prediction_recall = predicted_hits / predictable``,
    ``prediction_precision = predicted_hits / predicted``; ``mispredicted_nonresident``: those needed entries
    outside the fastest tier it missed (read by the fetch itself unless disk staging had them).  ``copy_seconds``: real copies only (staged
    entries into their slots, waits included (``staging.wait_seconds``); the tail block; the held slots
    when a pool grows) plus the pool's slot bookkeeping; ``predict_seconds``: the predictor and job
    submission; ``stage_ahead_entries`` / ``stage_ahead_seconds``: entries disk staging ahead submitted and
    the time choosing them (after each step; on the end-of-step worker with ``background_end_step``);
    ``after_step_jobs`` / ``after_step_seconds``: end-of-step jobs the worker ran and their wall time (score
    flush, threshold, staging choice); ``after_step_wait_seconds``: the forward thread's waits for them
    (:meth:`DecodePipeline.fence`); ``promote_candidates`` / ``promote_chosen`` / ``promote_skipped`` /
    ``promote_seconds``: budgeted promotion (``promote_bytes_per_step``): entries considered (last selections
    outside the pools, on a slower tier), entries chosen, steps skipped for back-pressure, time choosing;
    ``promoted`` / ``promoted_bytes``: chosen entries the policy let a background read promote, or a promotion
    prefetch moved (filled in by :meth:`DecodePipeline.as_dict`, which first waits for a promotion prefetch in
    flight, so one ``stats()`` never shows tiercache's ``bytes_moved`` ahead of them); ``seeded`` /
    ``seed_seconds``: blocks copied into the pools by prefills (``seed_pool``) and the time it took; ``prefault_bytes`` / ``prefault_seconds``:
    pool memory faulted in by the background prefaulter and its time there (``warm_bytes``: of those, by the
    first-step warm-up); ``reuse_bytes`` /
    ``reuse_peak_bytes``: memory of the resident pools' shared arena (every
    slot, free or not; fetch-every-step's fetch buffer included); ``pool_slots`` / ``pool_held`` /
    ``pool_grows`` / ``pool_reallocs`` / ``pool_evicted``: its slots, the stored blocks held in them,
    capacity growths, reallocations (held slots copied; a growth within the CPU reservation copies
    nothing) and evictions for room, since the cache was made; ``pool_bound_bytes``: the bound in force
    (``None``: unbounded, or ``"auto"`` not resolved yet), ``pool_bound_source``: where it came from
    (``"pool_bytes"``, ``"unbounded (pool_bytes=None)"``, ``"auto: the host tier's budget (model on cpu)"``
    and the like, :func:`~.pool.auto_pool_bytes`), ``pool_slot_bytes``: one slot's K plus V, ``pool_over_budget``: fetches whose
    union alone did not fit the bound (the arena grew past it) (filled in by
    :meth:`DecodePipeline.as_dict`).

    ``stage_into_slots``: ``slot_reserved`` blocks were given a slot of their layer's pool one layer ahead and
    read into it in the background (``slot_read_seconds`` of job time); at the layer's fetch ``slot_used`` of
    them were selected (their entries count as ``staged``, like entries copied from the staging area, not as
    ``reused``), ``slot_unselected`` were not (they stay resident under ``"mass"`` retention, are released
    under ``"previous"``), ``slot_failed`` had a failed read (released, read synchronously if selected),
    ``slot_evicted`` were evicted before that fetch (mostly by the next reservation: blocks the layer being
    fetched did not select; since the cache was made, not reset by :meth:`DecodePipeline.reset_stats`);
    ``slot_waits`` / ``slot_wait_seconds``: fetches that waited for such a read still in flight;
    ``slot_release_waits`` / ``slot_release_wait_seconds``: evictions, clears and reallocations that did;
    ``slot_fallback``: predicted blocks outside the fastest tier staged instead (a row map, another slot
    layout, no slot free within the bound).  ``reserved - used - unselected - failed - evicted`` are still
    waiting for their layer's fetch.

    ``part_reads``: ``parts_selected`` (row, KV head) parts of stored blocks were selected; ``parts_read`` parts
    were read by ranged reads (whole-entry reads, staged copies and reads into reserved slots not counted);
    ``part_misses``: resident blocks (not counted as ``reused``) whose selected parts were not all in their slot,
    so the missing ones were read; ``ranged_entries`` / ``whole_entries``: synchronous reads of some parts / of
    whole entries; ``slot_ranged_reads``: reads into reserved slots (``stage_into_slots``) of only the predicted
    selection's parts (the rest of the reserved reads are whole); ``slot_part_misses``: of the part misses, blocks
    read ahead into a reserved slot (``slot_part_reads``: the parts the prediction missed)."""

    steps: int = 0
    parts_selected: int = 0
    parts_read: int = 0
    part_misses: int = 0
    ranged_entries: int = 0
    whole_entries: int = 0
    slot_ranged_reads: int = 0
    slot_part_misses: int = 0
    needed: int = 0
    reused: int = 0
    staged: int = 0
    sync: dict = field(default_factory=dict)
    sync_seconds: dict = field(default_factory=dict)
    sync_wait_seconds: float = 0.0
    overlapped: int = 0
    needed_nonresident: int = 0
    staged_nonresident: int = 0
    predicted: int = 0
    predicted_hits: int = 0
    predictable: int = 0
    predicted_nonresident: int = 0
    mispredicted_nonresident: int = 0
    stage_ahead_entries: int = 0
    stage_ahead_seconds: float = 0.0
    after_step_jobs: int = 0
    after_step_seconds: float = 0.0
    after_step_wait_seconds: float = 0.0
    promote_candidates: int = 0
    promote_chosen: int = 0
    promote_skipped: int = 0
    promote_seconds: float = 0.0
    promoted: int = 0
    promoted_bytes: int = 0
    seeded: int = 0
    seed_seconds: float = 0.0
    prefault_bytes: int = 0
    prefault_seconds: float = 0.0
    warm_bytes: int = 0
    copy_seconds: float = 0.0
    predict_seconds: float = 0.0
    reuse_bytes: int = 0
    reuse_peak_bytes: int = 0
    pool_slots: int = 0
    pool_grows: int = 0
    pool_reallocs: int = 0
    pool_evicted: int = 0
    pool_held: int = 0
    pool_over_budget: int = 0
    pool_bound_bytes: int | None = None
    pool_bound_source: str = ""
    pool_slot_bytes: int = 0
    slot_reserved: int = 0
    slot_used: int = 0
    slot_unselected: int = 0
    slot_failed: int = 0
    slot_fallback: int = 0
    slot_waits: int = 0
    slot_wait_seconds: float = 0.0
    slot_read_seconds: float = 0.0
    slot_evicted: int = 0
    slot_release_waits: int = 0
    slot_release_wait_seconds: float = 0.0
    idle_staged: int = 0
    idle_staged_bytes: int = 0
    idle_read: int = 0
    idle_read_bytes: int = 0
    idle_hits: int = 0
    idle_wasted: int = 0
    idle_wasted_bytes: int = 0
    idle_seconds: float = 0.0

    def as_dict(self) -> dict:
        out = asdict(self)
        out["prediction_recall"] = self.predicted_hits / self.predictable if self.predictable else None
        out["prediction_precision"] = self.predicted_hits / self.predicted if self.predicted else None
        out["prefetch_hit_rate"] = (self.staged_nonresident / self.needed_nonresident
                                    if self.needed_nonresident else None)
        return out


class DecodePipeline:
    """Drives the fetch stage of every sparse layer of one cache (see module doc)."""

    def __init__(self, config: PipelineConfig, layers: list["TieredKVLayer"], store: Any) -> None:
        self.config = config
        self.store = store
        self.layers = layers
        self.sparse_ids = [layer.layer_idx for layer in layers if layer.sparse is not None]
        self._next = {a: b for a, b in zip(self.sparse_ids, self.sparse_ids[1:] + self.sparse_ids[:1])}
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self.staging: StagingArea | None = None
        if config.layer_ahead or config.disk_staging:
            self._executor = concurrent.futures.ThreadPoolExecutor(config.io_workers, thread_name_prefix="tiercache-kv-stage")
            self.staging = StagingArea(config.staging_bytes, self._executor,
                                       max_age=2 if config.disk_staging else 1, wait_timeout=config.wait_timeout)
        self._last: dict[int, list[int]] = {}  # layer -> stored blocks it fetched at its last step
        self._last_mask: dict[int, torch.Tensor] = {}  # part_reads: layer -> its last selection's head_mask (B, H, N)
        self._left: dict[int, list[int]] = {}  # layer -> blocks of the step before that it no longer selected
        self._predicted: dict[int, set] = {}  # layer -> entries predicted for its coming fetch
        # the slots shared by every layer; "auto" is resolved once the layers' device is known (_resolve_bound)
        self._auto_bound = config.pool_bytes == AUTO
        self._bound_device: str | None = None  # the device type "auto" was resolved for
        if self._auto_bound:
            caps = store.tier_capacities()
            if not any(caps.get(t, 0) > 0 for t in ("gpu", "host")):
                raise ValueError(no_memory_tier_message(caps))
            self.pool_bound_source = "auto: not resolved yet (at the first update, from the model's device)"
        else:
            self.pool_bound_source = "unbounded (pool_bytes=None)" if config.pool_bytes is None else "pool_bytes"
        self._arena = PoolArena(config.retention, config.pool_blocks_factor,
                                None if self._auto_bound else config.pool_bytes, config.pool_eviction)
        self._arena.prefer_cheap = config.pool_prefer_cheap
        self._arena.pass_in_flight = config.settle_late
        self._arena.huge_pages = config.huge_pages
        self._arena.start_pending = self._open_gate  # an eviction or clear waiting for a held-back read starts it
        self._pools: dict[int, ResidentPool] = {}  # layer -> its view of the arena
        self._last_sel: dict[int, LastSelection] = {}  # layer -> its last selection (near misses)
        self._prefaulter: concurrent.futures.ThreadPoolExecutor | None = None
        # (address of the arena's k, end slot) of the last first-step warm-up (an address, not the tensor: the
        # arena's old memory is freed when it reallocates; a reused address only skips a prefault)
        self._warmed: tuple[int, int] | None = None
        self._stats_lock = threading.Lock()
        self._spare: dict[tuple, list[torch.Tensor]] = {}  # (shape, dtype, device) -> staging tensors to reuse
        self._spare_bytes = 0
        self._spare_lock = threading.Lock()  # the end-of-step worker takes spares, the forward thread returns them
        self._worker: concurrent.futures.ThreadPoolExecutor | None = None  # the end-of-step worker
        self._after: concurrent.futures.Future | None = None  # its last job
        self._after_error: BaseException | None = None  # what its last job raised, for the next fence
        self._handed = False  # this step's end-of-step work went to the worker
        self.stats = PipelineStats()
        self._promote_future: concurrent.futures.Future | None = None  # the last promotion prefetch, uncounted
        self._promote_asked = 0  # entries it asked for
        self._prefetch_promoted = [0, 0]  # entries, bytes promoted by promotion prefetches
        self._promote_entry_bytes = 0
        self._promoted_base = self._policy_promoted()  # the policy's counters when the stats started
        self._promote_late = 0  # the staging area's late entries at the last choice (back-pressure)
        self._sync_executor: concurrent.futures.ThreadPoolExecutor | None = None  # overlap_sync_reads' reader
        self._pending: PendingReads | None = None  # the reads the last deferred fetch left in flight
        self._warned_overlap = False
        # slot_reads_after_sync: reads into reserved slots held back until the fetching layer's own slow reads
        # are done: (placeholder future the arena waits on, keys, destination views)
        self._gated: list[tuple[concurrent.futures.Future, list, list[torch.Tensor], list | None]] = []
        # idle_stage_near: layers whose near misses were staged since their last fetch, and per layer the keys
        self._idle_done: set[int] = set()
        self._idle_keys: dict[int, dict] = {}  # layer -> {key: bytes} staged for its next fetch
        self._idle_now: dict | None = None  # those of the layer fetching now
        self._idle_executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._idle_barren: dict[int, int] = {}  # layer -> decode step its near misses were all on the fastest tier
        self._decode_steps = 0
        self._closed = False

    # ----------------------------------------------------------------------------- helpers
    def _entry_tensor(self, layer: "TieredKVLayer", block: Any, kind: str) -> torch.Tensor:
        """A tensor the stored entry of ``block`` (``kind`` "k", "v" or "kv", a joint entry) is read into: its
        stored rows.  A spare one (:meth:`_recycle`) when there is one, else a fresh page-aligned one (a direct
        disk read lands in it without a bounce copy)."""
        h, d = layer._shape_v if kind == "v" else layer._shape_k
        shape = (block.stored_batch, h, layer.block_size, d)
        if kind == "kv":  # a sparse layer's joint entry: part-major (batch, heads, 2, block, head_dim)
            shape = (block.stored_batch, h, 2, layer.block_size, d)
        with self._spare_lock:
            spare = self._spare.get((shape, layer.dtype, torch.device(layer.device)))
            if spare:
                tensor = spare.pop()
                self._spare_bytes -= tensor.nbytes
                return tensor
        return aligned_empty(shape, dtype=layer.dtype, device=layer.device)

    def _recycle(self, tensor: torch.Tensor) -> None:
        """Keep a staged tensor whose contents were copied out for the next staging read (its pages are
        mapped already: a fresh one costs page faults and zeroing), as long as staged plus spare bytes stay
        within ``staging_bytes``."""
        staging = self.staging
        with self._spare_lock:
            if staging is None or staging.nbytes + self._spare_bytes + tensor.nbytes > staging.capacity:
                return
            self._spare.setdefault((tuple(tensor.shape), tensor.dtype, tensor.device), []).append(tensor)
            self._spare_bytes += tensor.nbytes

    def _prefault(self, pool: ResidentPool, first: int, end: int | None = None, warm: bool = False) -> None:
        """Fault in the slots ``first..end-1`` (``end``: the capacity) of ``pool`` in the background
        (``prefault_pool``): the forward pass's first write into a slot then finds its pages mapped.  Only page
        tables change (``MADV_POPULATE_WRITE`` never alters contents), so it may overlap the forward pass's writes
        into the same slots; the job holds the tensors, which stay valid whatever the pool does meanwhile.
        ``warm``: the first-step warm-up (:meth:`fetch`): the slots beyond the capacity the next layers are
        expected to take, lowest first (the order the layers take them); otherwise the highest first (the
        fetching layer takes the lowest itself)."""
        end = pool.capacity if end is None else min(end, pool.k.shape[0] if pool.k is not None else 0)
        if (not self.config.prefault_pool or self._executor is None or self._closed or pool.k is None
                or pool.k.device.type != "cpu" or first >= end or not can_populate()):
            return
        if self._prefaulter is None:
            self._prefaulter = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tiercache-kv-prefault")
        try:
            self._prefaulter.submit(self._prefault_job, pool.arena.storages, first, end, warm)
        except RuntimeError:  # shut down by close(): nothing to do
            pass

    def _prefault_job(self, storages: tuple, first: int, end: int, warm: bool = False) -> None:
        start = time.perf_counter()
        done = 0
        step = max(1, (4 * MiB) // max(1, sum(t[0].nbytes for t in storages)))
        # Growth: the highest slots first (the forward pass takes the lowest); warm-up: the lowest first.
        ranges = [(lo, min(end, lo + step)) for lo in range(first, end, step)] if warm else \
            [(max(first, hi - step), hi) for hi in range(end, first, -step)]
        try:
            for lo, hi in ranges:
                for t in storages:
                    got = populate(t[lo:hi])
                    if got < 0 or self._closed:
                        return
                    done += got
        finally:
            with self._stats_lock:
                self.stats.prefault_bytes += done
                self.stats.prefault_seconds += time.perf_counter() - start
                if warm:
                    self.stats.warm_bytes += done

    def _policy_context(self) -> Any:
        policy = getattr(self.store, "policy", None)
        if self.config.defer_promotions and hasattr(policy, "promoting"):
            return policy.promoting()
        return None

    def _read(self, keys: list, outs: list[torch.Tensor], ranges: list | None = None) -> None:
        """Every background read: ``keys`` into ``outs`` (``ranges``: per entry the byte ranges to read, ``None``
        whole); it promotes only inside :meth:`_read_promoting`, and the keys chosen by :meth:`choose_promotions`
        (reusing the bytes just read)."""
        policy = getattr(self.store, "policy", None)
        if not getattr(policy, "chosen", 0):
            self.store.get_blocks(keys, out=outs, ranges=ranges)
            return
        with policy.chosen_reads():
            self.store.get_blocks(keys, out=outs, ranges=ranges)

    def _read_promoting(self, keys: list, outs: list[torch.Tensor]) -> None:
        """:meth:`_read` inside the policy's ``promoting`` context (``defer_promotions``): the read may promote."""
        ctx = self._policy_context()
        if ctx is None:
            self._read(keys, outs)
        else:
            with ctx:
                self._read(keys, outs)

    def _read_scored(self, scores: dict, keys: list, outs: list[torch.Tensor]) -> None:
        """A background read that may promote: first bring the entries' tiercache scores up to their current
        decayed mass (scores sent when a block left the selection fall behind the growing decay scale)."""
        self.store.update_scores({k: scores[k] for k in keys if k in scores})
        self._read_promoting(keys, outs)

    def _read_massed(self, mass: torch.Tensor, block_of: dict, keys: list, outs: list[torch.Tensor]) -> None:
        """:meth:`_read_scored` with each entry's score its block's decayed ``mass`` (``block_of``: key ->
        block index; blocks beyond ``mass`` keep their score)."""
        values = mass.tolist()
        n = len(values)
        self._read_scored({k: values[block_of[k]] for k in keys if block_of.get(k, n) < n}, keys, outs)

    def _stage_blocks(self, layer: "TieredKVLayer", blocks: list[int], tiers: list | None = None,
                      promote: bool = True, todo_out: list | None = None,
                      executor: concurrent.futures.Executor | None = None) -> tuple[int, int]:
        """Stage the entries (joint, or K and V) of ``blocks`` of ``layer`` that are outside the fastest tier (and
        not staged yet); returns (entries outside the fastest tier, entries submitted).  ``tiers``: the tiers of
        ``staged_keys(layer, blocks)`` when the caller looked them up already (``None``: looked up here).
        ``promote=False``: the reads never promote, even with deferred promotions (layer-ahead prefetch: the
        entries it reads are a layer's misses of every step under a bounded pool, and promoting them all
        would demote as much back to disk each step)."""
        if self.staging is None or not blocks or self._closed:
            return 0, 0
        refs = {}
        joint = layer._joint
        for j in blocks:
            block = layer._blocks[j]
            if joint:
                refs[layer._kkeys[j]] = (block, "kv")
                continue
            refs[layer._kkeys[j]] = (block, "k")
            refs[layer._vkeys[j]] = (block, "v")
        keys = staged_keys(layer, blocks)  # the order of the caller's ``tiers``
        fastest = self.store.fastest_tier
        if tiers is None:
            tiers = self.store.tiers_of(keys)
        todo = [k for k, t in zip(keys, tiers) if t is not None and t != fastest]
        if not todo:
            return 0, 0
        if todo_out is not None:
            todo_out.extend(todo)
        read = self._read_promoting if promote else self._read
        if promote and self._policy_context() is not None and layer.sparse is not None:
            # The scores are looked up by the job (off the forward thread), from the mass at that time.
            block_of = {}
            for j in blocks:
                block_of[layer._kkeys[j]] = block_of[layer._vkeys[j]] = j
            read = functools.partial(self._read_massed, layer.sparse.mass, block_of)
        return len(todo), self.staging.stage(todo, lambda k: self._entry_tensor(layer, *refs[k]), read, executor)

    # ------------------------------------------------------------------------------ stages
    def predict_next(self, layer: "TieredKVLayer", query: torch.Tensor, selected: list[int] | None = None) -> None:
        """Layer-ahead prefetch, called by ``layer`` as it starts fetching (the first sparse layer also
        starts a new step: untaken staged entries age); ``selected``: ``layer``'s stored blocks of this fetch
        (``stage_into_slots`` never evicts them for a reservation: its attention is about to read them)."""
        if layer.layer_idx == self.sparse_ids[0]:
            self.stats.steps += 1
            self._decode_steps += 1
            if self.staging is not None:
                self.staging.advance()
        if not self.config.layer_ahead or self._closed:
            return
        start = time.perf_counter()
        nxt_idx = self._next.get(layer.layer_idx)
        if nxt_idx is None:
            return
        # ``ahead`` > 1: layers up to ``ahead`` fetches away are staged too, each once before its fetch (the
        # first time it is within reach), from its previous selection; the next layer may use the query.
        far = nxt_idx
        for depth in range(2, min(self.config.ahead, len(self.sparse_ids)) + 1):
            far = self._next[far]
            if far != layer.layer_idx and far not in self._predicted:
                self._predict_layer(far, None, layer, selected)
        slow = None
        if nxt_idx not in self._predicted or self.config.predictor == "query":
            slow = self._predict_layer(nxt_idx, query, layer, selected)
        self.stats.predict_seconds += time.perf_counter() - start
        if self.config.idle_stage_near:
            self._idle_done.discard(layer.layer_idx)
            if slow == 0 and self.staging is not None:
                self._stage_idle(layer.layer_idx, nxt_idx)

    def _stage_idle(self, fetching: int, nxt_idx: int) -> None:
        """``idle_stage_near``: the fetch of ``fetching`` reserved no slow read for ``nxt_idx``, so the disk is
        about to idle: stage the near misses of the next layers after ``nxt_idx`` not staged since their last
        fetch (up to ``idle_stage_layers`` of them that have any outside the fastest tier; at most twice as many
        looked at)."""
        start = time.perf_counter()
        ids = self.sparse_ids
        n = len(ids)
        at = ids.index(nxt_idx)
        want, looked, submitted = self.config.idle_stage_layers, 0, 0
        order = [ids[(at + d) % n] for d in range(1, n)]
        if fetching in order:
            order = order[: order.index(fetching)]
        barren, now, wait = self._idle_barren, self._decode_steps, self.config.idle_barren_steps
        order = [i for i in order if i not in self._idle_done and not (i in barren and now - barren[i] < wait)]
        while order and submitted < want and looked < 2 * want:
            group, order = order[: want - submitted], order[want - submitted :]
            looked += len(group)
            layers = [self.layers[i] for i in group]
            helds = []
            for i in group:
                held = set(self._last.get(i, ()))
                pool = self._pools.get(i)
                if pool is not None:
                    held.update(list(pool.slot_of))
                helds.append(held)
            chosen = near_misses_many([self._last_sel.get(i) for i in group], [len(x._blocks) for x in layers], helds,
                                      self.config.idle_stage_near)
            for i, layer, blocks in zip(group, layers, chosen):
                self._idle_done.add(i)
                if not blocks:
                    continue
                if self._idle_executor is None:
                    # Its own thread: at most one such job reads at a time, and the reads into reserved slots (on
                    # the I/O pool) never queue behind the others.
                    self._idle_executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tiercache-kv-idle")
                todo: list = []
                read = self._stage_blocks(layer, blocks, promote=False, todo_out=todo, executor=self._idle_executor)[1]
                if not todo:
                    barren[i] = now
                else:
                    barren.pop(i, None)
                    submitted += 1
                    entry = layer._blocks[0].nbytes // layer._entries_per_block
                    keys = self._idle_keys.setdefault(i, {})
                    for key in todo:
                        keys[key] = entry
                    self.stats.idle_staged += len(todo)
                    self.stats.idle_staged_bytes += entry * len(todo)
                    self.stats.idle_read += read
                    self.stats.idle_read_bytes += entry * read
        self.stats.idle_seconds += time.perf_counter() - start

    def _predict_layer(self, nxt_idx: int, query: torch.Tensor | None, fetching: "TieredKVLayer | None" = None,
                       selected: list[int] | None = None) -> int:
        """Stage the entries layer ``nxt_idx`` is predicted to need that its pool does not hold (``query``:
        this layer's query, for the ``"query"`` predictor; ``None``: the previous selection): into slots of its
        pool (``stage_into_slots``, :meth:`_read_into_slots`; ``fetching`` / ``selected``: the layer fetching
        now and its selection, which reservations leave alone), the rest into the staging area.  Returns the
        predicted entries outside the fastest tier (read into slots or staged)."""
        nxt = self.layers[nxt_idx]
        n_stored = len(nxt._blocks)
        if query is not None and self.config.predictor == "query" and nxt_idx != self.sparse_ids[0] \
                and nxt.sparse.digests is not None and nxt.sparse.digests.length > 0:
            from .selection import select

            # the same call as the layer's own selection (sparse_layer.decode): ``fetch`` holds block ids
            sel = select(query, nxt.sparse.digests, nxt.sparse.ctrl.selection,
                         pages_per_block=nxt.block_size // nxt.sparse.page_size)
            blocks = [j for j in sel.fetch.tolist() if j < n_stored]
            mask = sel.head_mask
            if self.config.slot_part_union:
                mask = _mask_union(mask, self._last_mask.get(nxt_idx))
        else:
            blocks = [j for j in self._last.get(nxt_idx, []) if j < n_stored]
            mask = self._last_mask.get(nxt_idx)
        pool = self._pools.get(nxt_idx)
        held = pool is not None and pool.retention != "none"
        if held:
            blocks = pool.not_held(blocks, nxt._kkeys)
        if self.config.predictor == "near" and self.config.predict_near and nxt_idx in self._last_sel:
            # The blocks entering a layer's selection are mostly those its last selection ranked just below
            # its cut; the ones its pool holds or the previous selection already names need no read.
            skip = set(self._last.get(nxt_idx, ()))
            if held:
                skip.update(pool.slot_of)
            blocks += near_misses_many([self._last_sel[nxt_idx]], [n_stored], [skip], self.config.predict_near)[0]
        self._predicted[nxt_idx] = set(layer_keys(nxt, blocks))
        self.stats.predicted += nxt._entries_per_block * len(blocks)
        if (self.config.stage_into_slots and pool is not None and pool.retention != "none" and blocks
                and fetching is not None and nxt_idx != fetching.layer_idx):
            protect = None
            mine = self._pools.get(fetching.layer_idx)
            if mine is not None and selected:
                protect = (mine, set(selected))
            blocks, slow = self._read_into_slots(nxt, pool, blocks, protect, mask)
            self.stats.predicted_nonresident += slow
        else:
            slow = 0
        nonresident, _ = self._stage_blocks(nxt, blocks, promote=False)
        self.stats.predicted_nonresident += nonresident
        return slow + nonresident

    def _read_into_slots(self, layer: "TieredKVLayer", pool: ResidentPool, blocks: list[int],
                         protect: tuple[ResidentPool, set] | None,
                         mask: torch.Tensor | None = None) -> tuple[list[int], int]:
        """``stage_into_slots``: reserve slots of ``pool`` (``layer``'s) for the ``blocks`` with an entry outside
        the fastest tier and start one background read of their entries (one joint entry, or K and V) straight
        into the slots (never promoting, as layer-ahead staging).  Returns ``(blocks left to stage, entries
        outside the fastest tier among those reserved)``: blocks with every entry on the fastest tier are left
        out (their copy at the fetch costs what a staging copy would), so are blocks stored with a row map or
        another batch size, the blocks no slot was found for (counted in ``slot_fallback``) and every block when
        the pool's layout (joint or not) is not the layer's.  ``mask`` (``part_reads``): ``(B, H, N)`` the
        predicted selection's (row, KV head) parts per block: only those are read (a block predicted for no
        part, a near miss, is read whole); the fetch reads any other part it selects (a part miss)."""
        if pool.k is None or self._executor is None or self._closed or pool.k.device.type != "cpu":
            # Off the CPU a background write into a slot would also have to wait for the kernels still reading
            # the block it evicts (an event per layer's attention): not done, such pools stage as before.
            return blocks, 0
        b, bs = layer._batch, layer.block_size
        (hk, dk), (hv, dv) = layer._shape_k, layer._shape_v
        if (tuple(pool.k.shape[1:]) != (b, hk, bs, dk) or tuple(pool.v.shape[1:]) != (b, hv, bs, dv)
                or pool.k.dtype != layer.dtype or pool.k.device != torch.device(layer.device)):
            return blocks, 0
        kk = layer._kkeys
        if layer._joint != pool.arena.joint:  # a joint entry lands in a joint slot only, two entries in two tensors
            return blocks, 0
        tiers = self.store.tiers_of(staged_keys(layer, blocks))  # block by block: its joint entry, or K then V
        fastest = self.store.fastest_tier
        fit, rest, slow = [], [], {}
        epb = layer._entries_per_block
        for i, j in enumerate(blocks):
            mine = tiers[epb * i : epb * (i + 1)]  # the block's entries' tiers (its joint entry, or K and V)
            if None in mine or (all(t == fastest for t in mine) and not self.config.slots_from_fastest):
                rest.append(j)  # gone (a failed read would only cost time) or cheap: as before
                continue
            block = layer._blocks[j]
            if block.rows is not None or block.stored_batch != b:
                rest.append(j)
                self.stats.slot_fallback += 1
                continue
            fit.append(j)
            slow[j] = sum(t != fastest for t in mine)
        if not fit:
            return rest, 0
        got = pool.arena.reserve(pool, fit, [kk[j] for j in fit], protect)
        if len(got) < len(fit):
            left = fit[len(got):]
            rest += left
            self.stats.slot_fallback += len(left)
        if not got:
            return rest, 0
        keys = layer_keys(layer, [j for j, _ in got])
        outs = pool.entry_views([s for _, s in got])
        ranges = self._slot_ranges(layer, pool, got, mask) if self.config.slot_part_reads else None
        if self.config.slot_reads_after_sync:
            # Started by _open_gate once the fetching layer's slow reads are done; until then the arena waits
            # on (or cancels) this placeholder like on a queued read.
            read = concurrent.futures.Future()
            self._gated.append((read, keys, outs, ranges))
        else:
            try:
                read = self._executor.submit(self._slot_job, keys, outs, ranges)
            except RuntimeError:  # the pool was shut down (close): nothing reserved
                pool.drop([j for j, _ in got])
                return rest, 0
        pool.arena.mark_pending([s for _, s in got], read)
        self.stats.slot_reserved += len(got)
        return rest, sum(slow[j] for j, _ in got)

    def _open_gate(self) -> None:
        """``slot_reads_after_sync``: start the reads into reserved slots held back so far (each completes its
        placeholder future; one cancelled meanwhile, by a clear, is skipped; one that cannot start, the I/O
        pool being shut down, fails its placeholder, so its block is released and read by its fetch)."""
        gated, self._gated = self._gated, []
        for placeholder, keys, outs, ranges in gated:
            if not placeholder.set_running_or_notify_cancel():
                continue
            try:
                read = self._executor.submit(self._slot_job, keys, outs, ranges)
            except RuntimeError as exc:
                placeholder.set_exception(exc)
                continue
            read.add_done_callback(functools.partial(_forward_result, placeholder))

    def _slot_job(self, keys: list, outs: list[torch.Tensor], ranges: list | None = None) -> None:
        """A background read into reserved slots (:meth:`_read_into_slots`; ``ranges``: per entry the byte ranges
        to read, ``None`` whole); what it raises is kept in its future (the layer's fetch then drops the blocks
        and reads them itself)."""
        start = time.perf_counter()
        try:
            if ranges is None:
                self._read(keys, outs)
            else:
                self._read(keys, outs, ranges)
        finally:
            with self._stats_lock:
                self.stats.slot_read_seconds += time.perf_counter() - start

    def _pool_of(self, layer_idx: int) -> ResidentPool:
        pool = self._pools.get(layer_idx)
        if pool is None:
            # Every sparse layer's view at once, in fetch order: the arena's first allocation reserves rows for
            # as many layers as it has views, so views made one by one during the first step made it
            # reallocate (copying every held slot) at most layers (9 times at SmolLM2 4K x 4: 2.2-3.1 s).
            for idx in [*self.sparse_ids, layer_idx]:
                if idx not in self._pools:
                    self._pools[idx] = self._arena.pool()
            pool = self._pools[layer_idx]
        return pool

    def _resolve_bound(self, device: torch.device | str) -> None:
        """``pool_bytes="auto"``: the arena's bound for layers on ``device`` (:func:`~.pool.auto_pool_bytes`;
        again if the device type changes, which clears the arena at its next assign anyway)."""
        kind = torch.device(device).type
        if kind == self._bound_device:
            return
        bound, self.pool_bound_source = auto_pool_bytes(self.store.tier_capacities(), kind,
                                                        borrowed=not getattr(self.store, "owns", True))
        self._arena.max_bytes = bound
        self._bound_device = kind

    def seed(self, layer: "TieredKVLayer", keys: torch.Tensor, values: torch.Tensor, start: int) -> int:
        """``seed_pool``: a prefill-like (non-decode) update of ``layer`` just stored the states ``keys`` /
        ``values`` ``(B, H, T, D)`` of positions ``start..start+T-1``: copy the stored blocks they cover whole
        into the layer's resident pool (``"mass"`` retention only), so decoding never reads back from the
        tiers what the prefill had in memory.  Without it the pool fills through the first steps' misses and
        disk staging's reads, several steps of background reads that compete with the forward pass
        (docs/sparse.md "Pools seeded by the prefill").  Only what is resident changes, never what is attended
        (the slots receive the stored blocks' exact contents).  With ``pool_bytes`` each layer seeds at most
        its share of the bound (its latest blocks).  Called for every prefill-like update of every strategy: it
        resolves ``pool_bytes="auto"`` first.  Returns the blocks seeded."""
        if self._auto_bound and layer.device is not None and layer.device.type != self._bound_device:
            self._resolve_bound(layer.device)  # the bound in force from the first update on, for every strategy
        if (not self.config.seed_pool or self.config.retention != "mass" or self._closed or layer.sparse is None
                or layer.layer_idx not in self._next):
            return 0
        bs, n_stored, t = layer.block_size, len(layer._blocks), keys.shape[-2]
        first = -(-start // bs)  # the first block that starts inside this update
        new = [j for j in range(first, n_stored) if (j + 1) * bs <= start + t
               and layer._blocks[j].rows is None and layer._blocks[j].stored_batch == keys.shape[0]]
        pool = self._pool_of(layer.layer_idx)
        # Blocks an earlier update seeded stay in the union, so a prefill in chunks does not evict them.
        held = [j for j in sorted(pool.slot_of) if j < first and pool.holds(j, layer._kkeys[j])]
        bound = self._arena.max_bytes
        if bound is not None:
            slot_bytes = 2 * keys[:, :, :bs].numel() * keys.element_size()
            share = bound // max(1, slot_bytes) // max(1, len(self.sparse_ids))
            new = new[max(0, len(new) - share):]
            held = held[max(0, len(held) - max(0, share - len(new))):]
        if not new:
            return 0
        blocks = held + new
        b, hk, dk = keys.shape[0], keys.shape[1], keys.shape[3]
        hv, dv = values.shape[1], values.shape[3]
        kkeys = [layer._kkeys[j] for j in blocks]
        t0 = time.perf_counter()
        pool_bytes = pool.nbytes
        slots, missing, _ = pool.assign(blocks, kkeys, False, (b, hk, bs, dk), (b, hv, bs, dv), layer.dtype,
                                        layer.device, layer.sparse.mass, reserve=math.ceil(GROWTH * (n_stored + 1)),
                                        limit=n_stored + 1, joint=layer._joint)
        if pool.nbytes != pool_bytes:
            self._count_pool_bytes(pool, pool_bytes)
        stale = [blocks[i] for i in missing if i < len(held)]  # none: held blocks were checked current
        if stale:
            pool.drop(stale)  # never leave a slot that claims a block it lacks
        missing = [i for i in missing if i >= len(held)]
        if missing:
            at = [slots[i] for i in missing]
            if pool.k.device.type == "cpu" and can_populate():  # fault the slots in at once, not per 4 KiB
                lo, hi = min(at), max(at) + 1
                for t in pool.arena.storages:
                    populate(t[lo:hi])
            dst = [pool.k[s] for s in at] + [pool.v[s] for s in at]
            src = [keys[:, :, blocks[i] * bs - start:(blocks[i] + 1) * bs - start] for i in missing] + \
                  [values[:, :, blocks[i] * bs - start:(blocks[i] + 1) * bs - start] for i in missing]
            try:
                torch._foreach_copy_(dst, src)
            except BaseException:
                pool.drop([blocks[i] for i in missing])
                raise
            pool.arena.mark_parts(at)  # whole blocks
        self.stats.seeded += len(missing)
        self.stats.seed_seconds += time.perf_counter() - t0
        return len(missing)

    def _count_pool_bytes(self, pool: ResidentPool, before: int) -> None:
        """The arena's bytes (``pool.nbytes``) changed from ``before``: update the total."""
        ps = self.stats
        ps.reuse_bytes += pool.nbytes - before
        ps.reuse_peak_bytes = max(ps.reuse_peak_bytes, ps.reuse_bytes)

    def fetch(self, state: "SparseLayerState", layer: "TieredKVLayer", sel: "BlockSelection", query: torch.Tensor,
              stats: "SparseStats", defer: bool = False) -> tuple:
        """The fetch stage into the layer's :class:`~.pool.ResidentPool` (see :func:`~.fetch.fetch_selected`):
        resident selected blocks are used in place, the others get slots and are filled from the staging
        area or read from their tiers straight into their slots; returns ``(k_pool, v_pool, slot_of_fetch)``.

        ``defer=True`` (the caller attends in two parts): returns ``(k_pool, v_pool, slot_of_fetch, pending)``;
        with ``overlap_sync_reads`` on a CPU pool, the synchronous reads are left running on the reader thread
        and the settle of reads into reserved slots is left to ``pending`` (:class:`PendingReads`: which blocks
        of ``sel.fetch`` are not in their slots yet, and :meth:`PendingReads.wait`, which the caller must call
        before it reads them and before the next fetch); ``pending`` is ``None`` when every slot is filled."""
        if self._pending is not None:  # a caller that never waited (an error between fetch and wait)
            self._pending.wait(raise_errors=False)
        fetch = sel.fetch.tolist()
        n_stored = len(layer._blocks)
        stored = [j for j in fetch if j < n_stored]
        try:
            self.predict_next(layer, query, stored)
            return self._fetch_into_pool(state, layer, sel, stats, defer, fetch, stored)
        finally:  # reads held back (slot_reads_after_sync) never outlive the fetch that reserved them
            if self._gated:
                self._open_gate()

    def _fetch_into_pool(self, state: "SparseLayerState", layer: "TieredKVLayer", sel: "BlockSelection",
                         stats: "SparseStats", defer: bool, fetch: list[int], stored: list[int]) -> tuple:
        """:meth:`fetch` once the next layers' reads are reserved (``fetch``: ``sel.fetch`` as a list, ``stored``:
        its stored blocks)."""
        n_stored = len(layer._blocks)
        tail = len(stored) < len(fetch)
        ns = len(stored)
        b, bs = layer._batch, layer.block_size
        hk, dk = layer._shape_k
        hv, dv = layer._shape_v
        ps = self.stats
        if self._auto_bound and layer.device.type != self._bound_device:
            self._resolve_bound(layer.device)
        pool = self._pool_of(layer.layer_idx)
        kkeys = [layer._kkeys[j] for j in stored]
        # settle_late: reads still in flight are waited for after this fetch's own reads and copies (below)
        late = self.config.settle_late
        fresh = self._settle(pool, stored, wait=not late)[0] if pool.fresh else ()
        t0 = time.perf_counter()
        pool_bytes, pool_k, pool_capacity = pool.nbytes, pool.k, pool.capacity
        # The layer's blocks bound the slots it can use; the reservation leaves room for the blocks decoding adds.
        slots, missing, tail_slot = pool.assign(stored, kkeys, tail, (b, hk, bs, dk), (b, hv, bs, dv), layer.dtype,
                                                layer.device, state.mass, reserve=math.ceil(GROWTH * (n_stored + 1)),
                                                limit=n_stored + 1, joint=layer._joint)
        ps.copy_seconds += time.perf_counter() - t0  # a growth copies the held slots once
        if pool.nbytes != pool_bytes:
            self._count_pool_bytes(pool, pool_bytes)
        if pool_k is None and pool.k is not None and self.config.warm_first_step and len(self.sparse_ids) > 1:
            # The arena was just made (the first decode step after a prefill, or after crop / reorder / a batch
            # change): while this layer reads into its slots, fault in those the next layers will take (as many
            # again per layer as this one took), so the step's reads do not pay a page fault per 4 KiB.
            end = pool.capacity * len(self.sparse_ids)
            self._warmed = (pool.k.data_ptr(), end)
            self._prefault(pool, pool.capacity, end, warm=True)
        elif pool.capacity > pool_capacity or pool.k is not pool_k:
            first = pool_capacity if pool.k is pool_k else 0
            if self._warmed is not None and self._warmed[0] == pool.k.data_ptr():  # warmed already: skip those slots
                first = max(first, self._warmed[1])
            self._prefault(pool, first)
        if (self.config.disk_staging and self.config.stage_near) or self.config.predictor == "near" \
                or (self.config.slot_part_reads and self.config.slot_part_extra > 0):
            self._last_sel[layer.layer_idx] = LastSelection(sel.scores, sel.pages, sel.pages_per_block,
                                                            state.digests.count)
        stats.blocks_selected += ns
        epb = layer._entries_per_block
        ps.needed += epb * ns
        want = need = None  # part_reads: (ns, B, H) parts of each stored block selected / to read if it is read
        if self._part_reads(layer, pool):
            self._last_mask[layer.layer_idx] = sel.head_mask  # the "previous" predictor's parts (_read_into_slots)
        if ns and self._part_reads(layer, pool):
            need = sel.fetch_head_mask[:, :, :ns].permute(2, 0, 1).to("cpu")
            want = need & ~pool.arena.parts_of(slots)
            ps.parts_selected += int(need.sum())
            short = want.flatten(1).any(1).tolist()
            gone = set(missing)
            flying = pool.fresh  # reads into reserved slots not settled yet: their part misses are read in settle()
            part = [i for i in range(ns) if short[i] and i not in gone and stored[i] not in flying]
            if part:
                ps.part_misses += len(part)
                if fresh:
                    ps.slot_part_misses += sum(1 for i in part if stored[i] in fresh)
                missing = sorted(gone.union(part))
        # Selected blocks read into their reserved slots in the background count as staged, not reused.
        lost = set(missing)  # a cleared arena or a rewritten block: read again like any miss
        pre = [i for i, j in enumerate(stored) if j in fresh and i not in lost] if fresh else []
        # Selected blocks whose read into their reserved slot is still in flight (settle_late): not reused either.
        busy = pool.fresh
        landing = [i for i, j in enumerate(stored) if j in busy and i not in lost] if busy else []
        ps.reused += epb * (ns - len(missing) - len(pre) - len(landing))
        predicted = self._predicted.pop(layer.layer_idx, None)
        overlap = defer and self.config.overlap_sync_reads and pool.k is not None
        if overlap and pool.k.device.type != "cpu":
            overlap = False
            if not self._warned_overlap:
                self._warned_overlap = True
                warnings.warn("overlap_sync_reads applies to CPU pools only (the torch page-table attention "
                              f"returns the log-sum-exp its split needs); pools on {pool.k.device} read as before",
                              stacklevel=2)
        job = None
        # idle_stage_near: the near misses staged for this fetch ({key: bytes}); _fill takes its hits out
        idle = self._idle_now = self._idle_keys.pop(layer.layer_idx, None) if self._idle_keys else None
        if missing or pre or landing:
            try:
                job = self._fill(layer, stored, missing, slots, pool, predicted, stats, pre,
                                 hits=ns - len(landing), defer=overlap, want=want)
            except BaseException:
                pool.drop([stored[i] for i in missing])  # never leave a slot that claims a block it lacks
                raise
            finally:
                self._idle_now = None
        else:
            stats.blocks_resident += ns
            self._idle_now = None
        if idle:
            ps.idle_wasted += len(idle)
            ps.idle_wasted_bytes += sum(idle.values())
        if self._gated:  # before waiting for this layer's own reads still in flight (settle)
            self._open_gate()

        def settle() -> None:
            """settle_late: wait for the reads into reserved slots still in flight; a failed one is read here."""
            done, failed = self._settle(pool, stored, wait=True, release=False)
            landed = [i for i in landing if stored[i] in done and stored[i] not in failed]
            again = [i for i in landing if stored[i] in failed]
            if again or landed:
                if again and need is not None and pool.arena.parts is not None:
                    pool.arena.parts[[slots[i] for i in again]] = False  # the failed whole read vouches for nothing
                try:
                    self._fill(layer, stored, again, slots, pool, predicted, stats, landed,
                               hits=len(again) + len(landed), want=need)
                except BaseException:
                    pool.drop([stored[i] for i in again])
                    raise
                if landed and need is not None:
                    self._read_lacking(layer, pool, stored, landed, slots, need, stats)

        pending = None
        if overlap and (job is not None or (pool.fresh and landing)):  # else nothing to attend later: no split
            late = torch.zeros(len(fetch), dtype=torch.bool)
            late[[*(job[1] if job is not None else ()), *(landing if pool.fresh else ())]] = True
            pending = self._pending = PendingReads(late, functools.partial(
                self._finish, pool, stored, missing, job[0] if job is not None else None, stats,
                settle if pool.fresh else None))
            ps.overlapped += 1
        elif pool.fresh:
            settle()
        if tail:
            t0 = time.perf_counter()
            tk, tv, ks, vs = layer._tail_k, layer._tail_v, pool.k[tail_slot], pool.v[tail_slot]
            if ks.device.type == "cpu":
                # Only the tail's tokens: attention hides the positions past the context, and the CPU page-table
                # attention never lets a hidden position's contents (whatever the slot held) reach its output.
                n = layer._tail_len
                tk, tv, ks, vs = tk[:, :, :n], tv[:, :, :n], ks[:, :, :n], vs[:, :, :n]
            torch._foreach_copy_([ks, vs], [tk, tv])
            ps.copy_seconds += time.perf_counter() - t0
            stats.tail_selected += 1
        if self.config.reuse and self.config.complement_reuse:  # only placement_scores reads _left
            now = set(stored)
            self._left[layer.layer_idx] = [j for j in self._last.get(layer.layer_idx, []) if j not in now]
        self._last[layer.layer_idx] = stored
        slot_of_fetch = torch.tensor(slots + ([tail_slot] if tail else []), dtype=torch.long)
        if defer:
            return pool.k, pool.v, slot_of_fetch, pending
        return pool.k, pool.v, slot_of_fetch

    def _finish(self, pool: ResidentPool, stored: list[int], missing: list[int],
                job: concurrent.futures.Future | None, stats: "SparseStats", settle: Any) -> None:
        """:meth:`PendingReads.wait` of a deferred fetch: wait for its synchronous reads (one failed: the
        fetch's missing blocks are dropped from the pool and the error raised, as :meth:`fetch` does), then
        settle the reads into its reserved slots (``settle``)."""
        self._pending = None
        if job is not None:
            t0 = time.perf_counter()
            try:
                done = job.result()
            except BaseException:
                pool.drop([stored[i] for i in missing])  # never leave a slot that claims a block it lacks
                raise
            finally:
                self.stats.sync_wait_seconds += time.perf_counter() - t0
            self._record_sync(done, stats)
        if settle is not None:
            settle()  # its waits count in slot_wait_seconds, as without the overlap

    def _settle(self, pool: ResidentPool, stored: list[int], wait: bool = True,
                release: bool = True) -> tuple[set, set]:
        """At a layer's fetch (``stage_into_slots``): settle the background reads into its reserved slots
        (:meth:`~.pool.PoolArena.settle`; ``wait=False``: only those finished, the others stay in
        :attr:`~.pool.ResidentPool.fresh`); failed ones are released, so the fetch reads them itself, or with
        ``release=False`` those ``stored`` selects keep their slot for the caller to read into.  Returns
        ``(settled blocks selected, failed blocks kept)``: the settled blocks leave ``fresh``, counted as used
        or unselected by ``stored``."""
        ps = self.stats
        t0 = time.perf_counter()
        arena = pool.arena
        failed, waits, waited = arena.settle(pool, wait=wait, release=release)
        kept: set = set()
        if failed and not release:
            want = set(stored)
            kept = {j for j in failed if j in want}
            pool.drop([j for j in failed if j not in want])  # never left resident claiming a block it lacks
        left = arena.unsettled(pool) if not wait else set()
        fresh = set(pool.fresh) - left
        pool.fresh.intersection_update(left)
        chosen = fresh.intersection(stored)
        ps.slot_failed += len(failed)
        ps.slot_waits += waits
        ps.slot_wait_seconds += waited
        ps.slot_used += len(chosen) - len(kept)
        ps.slot_unselected += len(fresh) - len(chosen)
        ps.copy_seconds += time.perf_counter() - t0  # the waits, as staging's waits are
        return chosen, kept

    def _fill(self, layer: "TieredKVLayer", stored: list[int], missing: list[int], slots: list[int],
              pool: ResidentPool, predicted: set | None, stats: "SparseStats", pre: list[int] = (),
              hits: int | None = None, defer: bool = False,
              want: torch.Tensor | None = None) -> tuple[concurrent.futures.Future, list[int]] | None:
        """Fill the slots of ``stored[i]`` for ``i`` in ``missing``: from staging, else read from the tiers
        straight into the slots (a block with a row map is read into a temporary and viewed).  ``pre``: the
        positions of blocks read into their reserved slots ahead (``stage_into_slots``): nothing to do but
        count them as the staging area's entries are counted.  A joint layer's block is one entry (its joint
        entry into the slot ``kv[slot]``), else two (K into ``k[slot]``, then V into ``v[slot]``).

        ``defer`` (``overlap_sync_reads``): the reads from the tiers run as one job on the reader thread;
        returns ``(its future, the positions in stored of the blocks it reads)`` (``None`` when nothing is
        read); the caller records it (:meth:`_record_sync`) once it is done.

        ``want`` (``part_reads``, a part-major layer): ``(len(stored), B, H)`` bool, the parts of each block to read
        when it is read from its tier (only those, as byte ranges, unless that is every part); the pool's
        :attr:`~.pool.PoolArena.parts` records them (whole entries copied from staging: every part)."""
        ps = self.stats
        nm = len(missing)
        joint = layer._joint
        epb = 1 if joint else 2
        np_ = len(pre)
        keys = layer_keys(layer, [stored[i] for i in missing])  # the pool's layout is the layer's (assign)
        dsts = pool.entry_views([slots[i] for i in missing])
        pkeys = layer_keys(layer, [stored[i] for i in pre])
        blocks = [layer._blocks[stored[i]] for i in missing] * epb
        every = self.store.tiers_of(keys + pkeys)
        tiers, ptiers = every[: epb * nm], every[epb * nm :]
        fastest = self.store.fastest_tier
        # ``hits``: the positions of ``stored`` this call accounts for (default: all)
        hits = (len(stored) if hits is None else hits) - nm - np_
        cheap = [stored[missing[i]] for i in range(nm) if all(tiers[r * nm + i] == fastest for r in range(epb))]
        pcheap = sum(1 for i in range(np_) if all(ptiers[r * np_ + i] == fastest for r in range(epb)))
        stats.blocks_resident += hits + len(cheap) + pcheap
        if pool.arena.prefer_cheap and pool.arena.max_bytes is not None:
            pool.cheap.update(cheap)
        if predicted is not None:
            ps.predicted_hits += sum(1 for key in keys if key in predicted) + sum(1 for key in pkeys if key in predicted)
            ps.predictable += len(keys) + len(pkeys)
            ps.mispredicted_nonresident += sum(1 for key, t in zip(keys + pkeys, every)
                                               if t != fastest and key not in predicted)
        ps.needed_nonresident += sum(1 for t in every if t != fastest)
        for e, tier in enumerate(ptiers):
            ps.staged += 1
            if tier != fastest:
                ps.staged_nonresident += 1
            slot = slots[pre[e % np_]]
            nbytes = (pool.kv if joint else pool.k if e < np_ else pool.v)[slot].nbytes
            if joint and pool.arena.parts is not None:  # a reserved read of only the predicted parts
                held = pool.arena.parts[slot]
                nbytes = nbytes * int(held.sum()) // held.numel()
            name = str("disk" if tier is None else tier)
            stats.bytes_fetched[name] = stats.bytes_fetched.get(name, 0) + nbytes
        sync: dict[str, list[int]] = {}
        t0 = time.perf_counter()
        arena = pool.arena
        whole_slots: list[int] = []  # slots filled whole (staged copies)
        to_slots: list[torch.Tensor] = []
        from_staged: list[torch.Tensor] = []
        taken: list[torch.Tensor] = []
        taken_all = self.staging.take_many(keys) if self.staging is not None else [None] * len(keys)
        idle = self._idle_now
        for e, staged in enumerate(taken_all):
            if staged is not None:
                if idle is not None and idle.pop(keys[e], None) is not None:
                    ps.idle_hits += 1
                to_slots.append(dsts[e])
                from_staged.append(blocks[e].view(staged))  # rows first (part-major joint entries too)
                whole_slots.append(slots[missing[e % nm]])
                taken.append(staged)
                ps.staged += 1
                if tiers[e] != fastest:
                    ps.staged_nonresident += 1
                tier = "disk" if tiers[e] is None else tiers[e]
                stats.bytes_fetched[str(tier)] = stats.bytes_fetched.get(str(tier), 0) + staged.nbytes
                continue
            sync.setdefault(str(tiers[e]), []).append(e)
        ranges = None
        if joint and arena.parts is not None:
            arena.mark_parts(whole_slots)
            if sync:
                ranges = self._part_ranges(layer, pool, [e for idx in sync.values() for e in idx], missing, slots,
                                           blocks, want, nm)
        fast = str(fastest)
        slow = {t: i for t, i in sync.items() if t != fast}
        # reads_beside_copies: the slower tiers' reads run on the reader thread while this thread copies the
        # staged entries and the fastest tier's (only worth a thread hand-off when there is something to copy)
        beside = (self.config.reads_beside_copies and not defer and bool(slow)
                  and (bool(to_slots) or fast in sync))
        job = None
        if beside:
            job = self._submit_sync_read(keys, blocks, dsts, joint, slow, ranges)
        try:
            if to_slots:
                # One batched copy: each separate op releases and re-takes the GIL, and with background reads
                # running every re-take can wait out their switch interval.
                torch._foreach_copy_(to_slots, from_staged)
                for staged in taken:
                    self._recycle(staged)
            ps.copy_seconds += time.perf_counter() - t0
            if job is not None:
                t0 = time.perf_counter()
                done = self._sync_read(keys, blocks, dsts, joint, {fast: sync[fast]}, ranges) if fast in sync else []
                done += job.result()
                job = None
                self._open_gate()
                ps.sync_wait_seconds += time.perf_counter() - t0
                self._record_sync(done, stats)
                return None
        finally:
            if job is not None:  # an error on this thread: never leave a read running into slots being dropped
                concurrent.futures.wait([job])
        if not sync:
            return None
        if defer:
            job = self._submit_sync_read(keys, blocks, dsts, joint, sync, ranges)
            return job, sorted({missing[e % nm] for idx in sync.values() for e in idx})
        t0 = time.perf_counter()
        if self._gated:
            # The slower tiers' reads first, alone on the device; then the next layers' reads start, while
            # this thread copies from the fast tiers.
            done = self._sync_read(keys, blocks, dsts, joint, slow, ranges) if slow else []
            self._open_gate()
            if fast in sync:
                done += self._sync_read(keys, blocks, dsts, joint, {fast: sync[fast]}, ranges)
        else:
            done = self._sync_read(keys, blocks, dsts, joint, sync, ranges)
        ps.sync_wait_seconds += time.perf_counter() - t0
        self._record_sync(done, stats)
        return None

    def _submit_sync_read(self, keys: list, blocks: list, dsts: list[torch.Tensor], joint: bool,
                          sync: dict[str, list[int]], ranges: list | None = None) -> concurrent.futures.Future:
        """:meth:`_sync_read` on the pipeline's one reader thread (started on first use, shut down by
        :meth:`close`)."""
        if self._sync_executor is None:
            self._sync_executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tiercache-kv-sync")
        return self._sync_executor.submit(self._sync_read, keys, blocks, dsts, joint, sync, ranges)

    def _sync_read(self, keys: list, blocks: list, dsts: list[torch.Tensor], joint: bool,
                   sync: dict[str, list[int]], ranges: list | None = None) -> list[tuple[str, int, float, int]]:
        """Read ``keys[e]`` into ``dsts[e]`` for the entries ``sync`` groups by tier, tier by tier (a block with a
        row map through a temporary, viewed into place; ``ranges[e]``: only those byte ranges of the entry, or
        ``None``: whole); returns ``(tier, entries, seconds, bytes)`` per tier.  Touches no counters (it may run on
        the reader thread)."""
        done = []
        for tier, idx in sync.items():
            t1 = time.perf_counter()
            part = None if ranges is None else [ranges[e] for e in idx]
            outs = read_entries(self.store, [keys[e] for e in idx], [blocks[e] for e in idx], [dsts[e] for e in idx],
                                joint, part)
            nbytes = sum(o.nbytes if part is None or part[i] is None else sum(b - a for a, b in part[i])
                         for i, o in enumerate(outs))
            done.append((tier, len(idx), time.perf_counter() - t1, nbytes))
        return done

    def _part_reads(self, layer: "TieredKVLayer", pool: ResidentPool) -> bool:
        """Whether this fetch reads only the selected parts of the blocks it reads (``part_reads``)."""
        return (self.config.part_reads and layer._part_major and pool.kv is not None
                and pool.kv.device.type == "cpu" and pool.arena.parts is not None
                and getattr(self.store, "ranged_reads", False))

    def _read_lacking(self, layer: "TieredKVLayer", pool: ResidentPool, stored: list[int], positions: list[int],
                      slots: list[int], need: torch.Tensor, stats: "SparseStats") -> None:
        """``part_reads``: blocks ``stored[i]`` (``i`` in ``positions``) whose read into a reserved slot just settled
        with only the predicted parts: read the parts ``need`` names that the slot lacks (part misses; counted
        in ``part_misses`` / ``parts_read`` and their bytes, the entries stay counted as staged).  A failed read
        releases the blocks and raises."""
        arena = pool.arena
        at = torch.as_tensor(positions, dtype=torch.long)
        lack = need.index_select(0, at) & ~arena.parts_of([slots[i] for i in positions])
        rows = lack.flatten(1).tolist()
        todo = [(i, r) for i, r in zip(positions, rows) if any(r)]
        if not todo:
            return
        ps = self.stats
        ps.part_misses += len(todo)
        ps.slot_part_misses += len(todo)
        keys = layer_keys(layer, [stored[i] for i, _ in todo])
        dsts = pool.entry_views([slots[i] for i, _ in todo])
        ranges = [self._runs(layer, r) for _, r in todo]
        tiers = self.store.tiers_of(keys)
        t0 = time.perf_counter()
        try:
            self.store.get_blocks(keys, out=dsts, ranges=ranges)
        except BaseException:
            pool.drop([stored[i] for i, _ in todo])
            raise
        finally:
            ps.sync_wait_seconds += time.perf_counter() - t0
        arena.mark_parts([slots[i] for i, _ in todo],
                         lack.index_select(0, torch.as_tensor([positions.index(i) for i, _ in todo], dtype=torch.long)))
        for (_, r), rg, tier in zip(todo, ranges, tiers):
            ps.parts_read += sum(r)
            name = str("disk" if tier is None else tier)
            stats.bytes_fetched[name] = stats.bytes_fetched.get(name, 0) + sum(b - a for a, b in rg)

    def _runs(self, layer: "TieredKVLayer", row: list) -> list[tuple[int, int]]:
        """Byte ranges of a part-major joint entry covering the parts ``row`` (``B * H`` bools) names, one per run."""
        part_bytes = 2 * layer.block_size * layer._shape_k[1] * torch.empty((), dtype=layer.dtype).element_size()
        runs, start = [], None
        for p, on in enumerate(row):
            if on and start is None:
                start = p
            elif not on and start is not None:
                runs.append((start * part_bytes, p * part_bytes))
                start = None
        if start is not None:
            runs.append((start * part_bytes, len(row) * part_bytes))
        return runs

    def _slot_ranges(self, layer: "TieredKVLayer", pool: ResidentPool, got: list[tuple[int, int]],
                     mask: torch.Tensor | None) -> list | None:
        """``part_reads``: the byte ranges to read into reserved slots ``got`` (``(block, slot)``) from the predicted
        selection ``mask`` ``(B, H, N)`` (``None`` per block read whole: a block it names no part of, or every
        part), recorded as the slots' parts (:meth:`~.pool.PoolArena.reserve` recorded every part)."""
        if mask is None or not self._part_reads(layer, pool):
            return None
        last = self._last_sel.get(layer.layer_idx) if self.config.slot_part_extra > 0 else None
        if last is not None:
            mask = _mask_union(mask, near_parts(last, self.config.slot_part_extra))
        if mask.dim() != 3 or tuple(mask.shape[:2]) != tuple(pool.arena.parts.shape[1:]):
            return None
        n = mask.shape[2]
        blocks = [j for j, _ in got]
        if any(j >= n for j in blocks):
            return None
        rows = mask.index_select(2, torch.as_tensor(blocks, dtype=torch.long, device=mask.device)).permute(2, 0, 1)
        rows = rows.to("cpu")
        flat = rows.flatten(1).tolist()
        out: list = [None] * len(got)
        part_slots, part_pos = [], []
        for i, ((j, slot), row) in enumerate(zip(got, flat)):
            if any(row) and not all(row):
                out[i] = self._runs(layer, row)
                part_slots.append(slot)
                part_pos.append(i)
        if not part_slots:
            return None
        pool.arena.parts[part_slots] = rows.index_select(0, torch.as_tensor(part_pos, dtype=torch.long))
        self.stats.slot_ranged_reads += len(part_slots)
        return out

    def _part_ranges(self, layer: "TieredKVLayer", pool: ResidentPool, entries: list[int], missing: list[int],
                     slots: list[int], blocks: list, want: torch.Tensor | None, nm: int) -> list | None:
        """``part_reads``: per entry ``e`` of a :meth:`_fill` (``entries``: those read from their tiers), the byte
        ranges of its part-major joint entry to read (``None``: the whole entry: every part wanted, a row map, or
        no ``want``), recorded in the pool's :attr:`~.pool.PoolArena.parts` (every part for a whole read)."""
        arena = pool.arena
        ps = self.stats
        if want is None:
            arena.mark_parts([slots[missing[e]] for e in entries])
            ps.whole_entries += len(entries)
            return None
        out: list = [None] * nm
        whole: list[int] = []
        b, h = want.shape[1], want.shape[2]
        pos = [missing[e] for e in entries]
        rows = want.index_select(0, torch.as_tensor(pos, dtype=torch.long)).view(len(pos), b * h).tolist()
        part_slots, part_pos = [], []
        for e, i, row in zip(entries, pos, rows):
            if all(row) or blocks[e].rows is not None:
                whole.append(slots[i])
                continue
            out[e] = self._runs(layer, row)
            part_slots.append(slots[i])
            part_pos.append(i)
            ps.parts_read += sum(row)
        ps.whole_entries += len(whole)
        ps.ranged_entries += len(part_slots)
        arena.mark_parts(whole)
        if part_slots:
            arena.mark_parts(part_slots, want.index_select(0, torch.as_tensor(part_pos, dtype=torch.long)))
        return out

    def _record_sync(self, done: list[tuple[str, int, float, int]], stats: "SparseStats") -> None:
        ps = self.stats
        for tier, n, seconds, nbytes in done:
            ps.sync[tier] = ps.sync.get(tier, 0) + n
            ps.sync_seconds[tier] = ps.sync_seconds.get(tier, 0.0) + seconds
            stats.bytes_fetched[tier] = stats.bytes_fetched.get(tier, 0) + nbytes

    def placement_scores(self, state: "SparseLayerState", layer: "TieredKVLayer", stored: list[int]) -> dict | None:
        """Tiercache scores of this step (attention-aware placement), or ``None`` to keep the plain rule
        (every fetched block's decayed mass).  With a resident pool the fastest tier complements it: the
        blocks just fetched (which the pool holds for the next step) score 0, so they leave the tier
        first and are never promoted, and the blocks the layer stopped selecting score their decayed mass,
        so the tier keeps the blocks attention is likely to return to that the pool does not hold."""
        if not (self.config.reuse and self.config.complement_reuse):
            return None
        scores = {}
        for j in stored:
            scores[layer._kkeys[j]] = 0.0
            scores[layer._vkeys[j]] = 0.0
        for j in self._left.pop(layer.layer_idx, []):
            if j < len(layer._blocks) and j < state.mass.numel():
                score = float(state.mass[j])
                scores[layer._kkeys[j]] = score
                scores[layer._vkeys[j]] = score
        return scores

    def pool_held_scores(self) -> dict:
        """``exclusive_pool`` under a bound (``pool_bytes``): score 0 for the K and V entries of every block the
        bounded pools hold now, so the fastest tier demotes them first and holds blocks the pools do not (a
        block read while the pool holds it costs nothing; the same block in the fastest tier wastes its room).
        Unbounded pools hold every selected block, so there is nothing to complement: empty.  The held sets
        are snapshots (safe on the end-of-step worker); a block evicted later gets its mass back as its score
        when it is next fetched.  Scores steer placement only, never what is attended."""
        if not (self.config.exclusive_pool and self.config.reuse and self._arena.max_bytes is not None):
            return {}
        out = {}
        for idx, pool in list(self._pools.items()):
            layer = self.layers[idx]
            kk, vk = layer._kkeys, layer._vkeys
            n = min(len(kk), len(vk))
            for j in list(pool.slot_of):  # a snapshot (one C-level copy), as in _stage_choice
                if j < n:
                    out[kk[j]] = 0.0
                    out[vk[j]] = 0.0
        return out

    def promotion_threshold(self, layers: list["TieredKVLayer"]) -> float | None:
        """With resident pools: the promotion threshold of the attention-aware policy, the decayed mass of the
        ``M``-th most attended stored block *outside the pools* (``M`` = blocks the fastest tier
        holds); ``None`` to keep the controller's rule.  The blocks a pool holds are never read from a
        tier while they stay selected, so the controller's rule (the ``M``-th most attended block overall)
        would reserve the fastest tier for them and never promote the blocks attention returns to after
        leaving them.  :meth:`~tiercache_llm.sparse_layer.SparseController.threshold` asks this first.
        Reads the layers' masses and a snapshot of each pool's blocks only (safe on the end-of-step worker)."""
        if not self.config.reuse:
            return None
        masses, entry, held, offset = [], 0, [], 0
        for layer in layers:
            if layer.sparse is None or not layer._blocks:
                continue
            n = min(len(layer._blocks), layer.sparse.mass.numel())
            masses.append(layer.sparse.mass[:n])
            pool = self._pools.get(layer.layer_idx)
            if pool is not None and pool.slot_of:
                held += [offset + j for j in list(pool.slot_of) if j < n]  # a snapshot: see _stage_choice
            offset += n
            epb = layer._entries_per_block
            entry = max(entry, layer._blocks[0].nbytes // epb)
        if not masses or not entry:
            return None
        every = torch.cat(masses)  # a copy: the layers' masses are left alone
        if held:
            every[torch.tensor(held, dtype=torch.long)] = -1.0
        return promotion_threshold(every[every >= 0], self.store.fastest_tier_entries(entry) // epb)

    def end_step(self) -> None:
        """After a decode step's forward pass (scores flushed, promotion threshold set by the controller's
        :meth:`~tiercache_llm.sparse_layer.SparseController.admit`): the bounded pools' held blocks scored 0
        (``exclusive_pool``: :meth:`pool_held_scores`), then disk staging ahead for every sparse layer
        (nothing when this step's end-of-step work went to the worker: :meth:`defer_end_of_step`)."""
        if self._handed:
            self._handed = False
            return
        held = self.pool_held_scores()
        if held:
            self.store.update_scores(held)
        self.choose_promotions()
        self._stage_ahead_all()

    def defer_end_of_step(self, ctrl: Any, enabled: bool = True) -> bool:
        """Hand the end-of-step work of the decode step that just ran to the worker thread
        (``background_end_step`` with disk staging): ``ctrl``'s pending tiercache scores (taken from it now,
        so the next step queues into a fresh dict), then, for ``strategy="attention-aware"`` under a policy
        with a ``promote_threshold``, the threshold (the controller's
        :meth:`~tiercache_llm.sparse_layer.SparseController.threshold`: :meth:`promotion_threshold` first)
        and disk staging ahead.  Returns whether it did; ``False`` (``enabled`` false, the config off, closed):
        the caller does the work inline, as before.

        The job runs after the forward pass returned, while the model's head and the next step's first layers
        run; nothing the forward pass computes depends on it (scores and the threshold only steer placement,
        staged copies are optional), so the forward thread waits for it only at :meth:`fence`: before the next
        job (at most one in flight, and one step's scores reach the tiercache before the next step's), before
        the rows or blocks change (:meth:`invalidate`), before the controller flushes or rescales scores
        itself, and at :meth:`close`.  An exception in the job is raised by the next fence."""
        self._handed = False
        if not enabled or not (self.config.background_end_step and self.config.disk_staging) or self._closed:
            return False
        self.fence()
        scores, ctrl.pending_scores = ctrl.pending_scores, {}
        if self._worker is None:
            self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tiercache-kv-after-step")
        self._after = self._worker.submit(self._after_step_job, ctrl, scores)
        self._handed = True
        return True

    def fence(self, raise_errors: bool = True) -> None:
        """Wait until the end-of-step worker's job (:meth:`defer_end_of_step`) has finished; then raise what it
        raised (``raise_errors``; otherwise the error waits for the next fence)."""
        job = self._after
        if job is not None:
            if not job.done():
                start = time.perf_counter()
                concurrent.futures.wait([job])
                with self._stats_lock:
                    self.stats.after_step_wait_seconds += time.perf_counter() - start
            self._after = None
        if raise_errors and self._after_error is not None:
            error, self._after_error = self._after_error, None
            raise error

    def _after_step_job(self, ctrl: Any, scores: dict) -> None:
        start = time.perf_counter()
        try:
            if ctrl.strategy == "attention-aware":
                scores.update(self.pool_held_scores())
            items = list(scores.items())
            for lo in range(0, len(items), SCORE_CHUNK):
                self.store.update_scores(dict(items[lo : lo + SCORE_CHUNK]))
                time.sleep(YIELD_SECONDS)
            policy = getattr(self.store, "policy", None)
            if ctrl.strategy == "attention-aware" and hasattr(policy, "promote_threshold"):
                threshold = ctrl.threshold(self.layers, self.store)
                if threshold is not None:
                    policy.promote_threshold = threshold
                self.choose_promotions()
                self._stage_ahead_all(pause=True)
        except BaseException as exc:  # noqa: BLE001 - raised on the forward thread by the next fence
            self._after_error = exc
        finally:
            with self._stats_lock:
                self.stats.after_step_jobs += 1
                self.stats.after_step_seconds += time.perf_counter() - start

    def _stage_ahead_all(self, pause: bool = False) -> None:
        """Disk staging ahead for every sparse layer (see :meth:`end_step`); ``pause`` (on the end-of-step
        worker): sleep :data:`YIELD_SECONDS` after each layer's job, so the forward thread can take the GIL."""
        if not self.config.disk_staging or (self.config.stage_ahead <= 0 and self.config.stage_near <= 0) \
                or self._closed or self.pools_at_bound():
            return
        start = time.perf_counter()
        # Every layer's choice first (a few whole-array operations over all layers: stage_choice), then the
        # jobs: a job started early would run Python (and hold the GIL) while the choice runs.
        layers = [self.layers[idx] for idx in self.sparse_ids if self.layers[idx]._blocks]
        chosen = self._stage_choice(layers)
        keys = [staged_keys(layer, blocks) for layer, blocks in zip(layers, chosen)]
        every = self.store.tiers_of([k for ks in keys for k in ks])  # one lock round trip for all layers
        submitted, at = 0, 0
        for layer, blocks, ks in zip(layers, chosen, keys):
            tiers, at = every[at : at + len(ks)], at + len(ks)
            if blocks:
                submitted += self._stage_blocks(layer, blocks, tiers)[1]
                if pause:
                    time.sleep(YIELD_SECONDS)
        with self._stats_lock:
            self.stats.stage_ahead_entries += submitted
            self.stats.stage_ahead_seconds += time.perf_counter() - start

    def _stage_choice(self, layers: list["TieredKVLayer"]) -> list[list[int]]:
        """The blocks disk staging ahead stages for each of ``layers``: its ``stage_ahead`` highest-mass stored
        blocks outside the fastest tier and its resident pool, then its ``stage_near`` near misses
        (:meth:`near_misses`) outside the pool, most likely first (what does not fit the staging area is
        dropped from the end).  Computed for all layers together (:mod:`.stage_choice`)."""
        ns = [min(len(layer._blocks), layer.sparse.mass.numel()) for layer in layers]
        helds = []
        for layer in layers:
            pool = self._pools.get(layer.layer_idx)
            # A snapshot (one C-level copy): on the end-of-step worker the forward thread may be assigning slots.
            helds.append(set(pool.slot_of) if pool is not None and pool.retention != "none" else set())
        picked: list[list[int]] = [[] for _ in layers]
        if self.config.stage_ahead:
            tops = top_mass_many([layer.sparse.mass for layer in layers], ns, helds, 4 * self.config.stage_ahead)
            fastest = self.store.fastest_tier
            tiers = self.store.tiers_of([layer._kkeys[j] for layer, top in zip(layers, tops) for j in top])
            at = 0
            for i, top in enumerate(tops):
                mine, at = tiers[at : at + len(top)], at + len(top)
                picked[i] = [j for j, t in zip(top, mine) if t is not None and t != fastest][: self.config.stage_ahead]
        if self.config.stage_near:
            nears = near_misses_many([self._last_sel.get(layer.layer_idx) if n else None for layer, n in zip(layers, ns)],
                                     [len(layer._blocks) for layer in layers], helds, self.config.stage_near)
            for i, near in enumerate(nears):
                chosen = set(picked[i])
                picked[i] += [j for j in near if j not in chosen]
        return picked

    def choose_promotions(self) -> list:
        """Budgeted promotion (``promote_bytes_per_step``), after a step's scores reached the tiercache: choose
        entries to promote to the fastest tier and hand them to the policy
        (:meth:`~tiercache_llm.policies.AttentionPlacementPolicy.choose`, replacing the previous choice: the next
        step's layer-ahead reads promote them) or, with ``promote_reuse_read=False``, to a tiercache prefetch
        (:meth:`~tiercache_llm.store.BlockStore.prefetch`, which promotes them now); returns them.  Only while
        the pools fill their bound (:meth:`pools_at_bound`; otherwise disk staging ahead promotes by the
        threshold).

        Candidates: the blocks of each layer's last selection that its pool no longer holds and that live on a
        slower tier: the layer-ahead prefetch reads exactly those next step (if selected again), so their
        promotion reuses that read.  Victims: the fastest tier's blocks by decayed mass, lowest first (the
        attention-aware policy demotes by score, which is that mass), free room first.  The ``i``-th
        highest-mass candidate is chosen while it beats the ``i``-th victim by ``promote_margin`` (hysteresis),
        up to ``promote_bytes_per_step`` bytes.  Back-pressure: nothing is chosen (``promote_skipped``) while
        the write-behind queue holds more than half its bound or when a staged entry came late since the last
        choice (a read job slower than the forward pass's wait limit) or while the last promotion prefetch
        runs.  Reads the layers' masses, block lists and pool snapshots only (safe on the end-of-step worker);
        steers placement, never what is attended."""
        policy = getattr(self.store, "policy", None)
        budget = self.config.promote_bytes_per_step
        if budget <= 0 or not callable(getattr(policy, "choose", None)) or self._closed:
            return []
        start = time.perf_counter()
        chosen: list = []
        try:
            if not self.pools_at_bound():
                return chosen
            late = self.staging.counters.late if self.staging is not None else 0
            queued, limit = getattr(self.store, "queued_bytes", 0), self.config.write_behind_bytes
            self._settle_promotion(wait=False)
            running = self._promote_future is not None
            if late > self._promote_late or (limit and queued > limit // 2) or running:
                self._promote_late = late
                with self._stats_lock:
                    self.stats.promote_skipped += 1
                return chosen
            chosen = self._promotion_choice(budget)
            if chosen and not self.config.promote_reuse_read:
                self._promote_asked = len(chosen)
                self._promote_future = self.store.prefetch(chosen)
            return chosen
        finally:
            policy.choose(chosen if self.config.promote_reuse_read else [])
            with self._stats_lock:
                self.stats.promote_chosen += len(chosen)
                self.stats.promote_seconds += time.perf_counter() - start

    def _promotion_choice(self, budget: int) -> list:
        """The keys :meth:`choose_promotions` chooses (see there), at most ``budget`` bytes."""
        layers = [self.layers[idx] for idx in self.sparse_ids if self.layers[idx]._blocks]
        ns = [min(len(layer._blocks), layer.sparse.mass.numel()) for layer in layers]
        if not layers or not sum(ns):
            return []
        block_bytes = max(layer._blocks[0].nbytes for layer in layers)
        epb = layers[0]._entries_per_block  # the sparse layers share one slot shape, hence one layout
        self._promote_entry_bytes = block_bytes // epb
        every = torch.cat([layer.sparse.mass[:n] for layer, n in zip(layers, ns)])  # a copy
        # K keys then V keys of every block (joint: one key per block): the fastest tier's room and victims are
        # counted in entries
        keys = [k for layer, n in zip(layers, ns) for k in layer._kkeys[:n]]
        if epb == 2:
            keys += [k for layer, n in zip(layers, ns) for k in layer._vkeys[:n]]
        tiers = self.store.tiers_of(keys)
        total = len(every)
        fastest = self.store.fastest_tier
        slower = {tier.name for tier in self.store.cache.tiers[1:]}
        where, offset = [], 0
        for layer, n in zip(layers, ns):
            pool = self._pools.get(layer.layer_idx)
            held = set(pool.slot_of) if pool is not None else set()  # a snapshot, as in _stage_choice
            where += [(layer, j, offset + j) for j in self._last.get(layer.layer_idx, [])
                      if j < n and j not in held and tiers[offset + j] in slower
                      and tiers[(epb - 1) * total + offset + j] in slower]
            offset += n
        with self._stats_lock:
            self.stats.promote_candidates += epb * len(where)
        if not where:
            return []
        resident = [i % total for i, tier in enumerate(tiers) if tier == fastest]
        room = max(0, self.store.fastest_tier_entries(block_bytes // epb) - len(resident))
        # Entry victims, free room first, lowest mass first; a block of two entries displaces two of them: it is
        # compared with the second, the larger (a joint entry displaces one).
        victims = torch.cat([torch.zeros(room, dtype=every.dtype),
                             every[torch.tensor(resident, dtype=torch.long)].sort().values])[epb - 1::epb]
        cand, order = every[torch.tensor([i for _, _, i in where], dtype=torch.long)].sort(descending=True)
        m = min(len(cand), len(victims), budget // block_bytes)
        beats = (cand[:m] > self.config.promote_margin * victims[:m]) & (cand[:m] > 0)
        k = m if bool(beats.all()) else int((~beats).nonzero()[0])
        keys = []
        for i in order[:k].tolist():
            layer, j, _ = where[i]
            keys += [layer._kkeys[j]] if epb == 1 else [layer._kkeys[j], layer._vkeys[j]]
        return keys

    def _settle_promotion(self, wait: bool) -> None:
        """``promote_reuse_read=False``: count what the last promotion prefetch moved once it has finished (its
        keys were all on a slower tier when chosen; its result counts those in the fastest tier at its end).
        ``wait``: wait for it first, so a ``stats()`` snapshot never shows the tiercache's ``bytes_moved`` of a
        finished prefetch without its promotions (a done-callback would run after the future's waiters wake).
        ``bytes_moved`` may still exceed ``promoted_bytes``: a block the prefetch promoted and something demoted
        again before its end moved but is not counted."""
        with self._stats_lock:
            future = self._promote_future
            if future is None or not (wait or future.done()):
                return
            self._promote_future = None
        concurrent.futures.wait([future])
        if future.cancelled() or future.exception() is not None:
            return
        entries = min(self._promote_asked, future.result())
        with self._stats_lock:
            self._prefetch_promoted[0] += entries
            self._prefetch_promoted[1] += entries * self._promote_entry_bytes

    def _policy_promoted(self) -> tuple[int, int]:
        policy = getattr(self.store, "policy", None)
        return (getattr(policy, "chosen_entries", 0) + self._prefetch_promoted[0],
                getattr(policy, "chosen_bytes", 0) + self._prefetch_promoted[1])

    def pools_at_bound(self) -> bool:
        """Whether the pools fill their bound (``pool_bytes``) and layer-ahead prefetch runs: then disk staging
        ahead stages nothing (scores and the promotion threshold still reach the tiercache).  Under a binding
        bound a layer's misses are mostly the blocks the pools evicted since its last fetch, which the
        layer-ahead ``"previous"`` predictor stages one layer ahead without promoting; disk staging's near
        misses (outside the pool, so most of a layer's blocks) and high-mass blocks were promoting reads beside
        the forward pass (SmolLM2 8K x 4, 25 % selection, one cache per process: pools at 25 % of the KV, ~950
        ms/step of background reads, 745 -> 524-552 ms/step without the near misses; pools at 50 %, 475 -> 406
        without the high-mass reads; docs/sparse.md "Pool budget")."""
        bound = self._arena.bound_slots
        return self.config.layer_ahead and bound is not None and self._arena.capacity >= bound

    def near_misses(self, layer: "TieredKVLayer", held: Any, count: int) -> list[int]:
        """Up to ``count`` stored blocks of ``layer`` outside ``held`` that its last selection ranked
        closest to its cut, closest first: per row and KV head, an unselected page's gap is the score of
        the head's lowest selected page minus its own; a block's gap is the least over its pages, rows
        and heads (:func:`~.stage_choice.block_gaps`).  Queries drift slowly between steps, so the blocks
        entering a layer's next selection are mostly these (measured: SmolLM2 8K x batch 4, 25 %: 16 per
        layer cover ~80 % of the blocks later read from disk).  Empty if the layer has not selected yet.
        :meth:`_stage_choice` computes it for every layer at once (:func:`~.stage_choice.near_misses_many`)."""
        return near_misses_many([self._last_sel.get(layer.layer_idx)], [len(layer._blocks)], [held], count)[0]

    # --------------------------------------------------------------------------- lifecycle
    def invalidate(self) -> None:
        """Rows or blocks changed (crop, reorder, batch selection, reset): drop the resident pools,
        predictions and staged entries (in-flight jobs finish into released tensors), after the end-of-step
        worker's job (its error, if any, is kept for the next fence)."""
        self.fence(raise_errors=False)
        if self._pending is not None:  # reads still landing in the slots about to be released
            self._pending.wait(raise_errors=False)
        self._arena.clear()
        self._arena.pools.clear()
        self._warmed = None
        self._pools.clear()
        self.stats.reuse_bytes = 0
        self._last.clear()
        self._last_mask.clear()
        self._last_sel.clear()
        self._predicted.clear()
        self._idle_done.clear()
        self._idle_keys.clear()
        self._idle_barren.clear()
        if self.staging is not None:
            self.staging.discard()
        policy = getattr(self.store, "policy", None)
        if self.config.promote_bytes_per_step and callable(getattr(policy, "choose", None)):
            policy.choose([])  # chosen keys of the old blocks
        with self._spare_lock:
            self._spare.clear()
            self._spare_bytes = 0

    def discard_keys(self, keys: list) -> None:
        if self.staging is not None:
            self.staging.discard(keys)

    def reset_stats(self) -> None:
        reuse = self.stats.reuse_bytes
        self.stats = PipelineStats(reuse_bytes=reuse, reuse_peak_bytes=reuse)
        self._promoted_base = self._policy_promoted()

    def close(self) -> None:
        """Cancel queued jobs, wait for running ones, release staging and pool memory.  Idempotent."""
        if self._closed:
            return
        self.fence(raise_errors=False)
        self._closed = True
        if self._worker is not None:
            self._worker.shutdown(wait=True)
        if self.staging is not None:
            self.staging.close()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        if self._idle_executor is not None:
            self._idle_executor.shutdown(wait=True)
        if self._prefaulter is not None:
            self._prefaulter.shutdown(wait=True, cancel_futures=True)
        self.invalidate()
        if self._sync_executor is not None:
            self._sync_executor.shutdown(wait=True)

    def as_dict(self) -> dict:
        self._settle_promotion(wait=True)
        arena = self._arena
        ps = self.stats
        ps.pool_slots = arena.capacity
        ps.pool_held = arena.held
        ps.pool_grows = arena.grows
        ps.pool_reallocs = arena.reallocs
        ps.pool_evicted = arena.evicted
        ps.pool_over_budget = arena.over_budget
        ps.pool_bound_bytes = arena.max_bytes
        ps.pool_bound_source = self.pool_bound_source
        ps.pool_slot_bytes = arena.slot_bytes
        entries, nbytes = self._policy_promoted()
        ps.promoted, ps.promoted_bytes = entries - self._promoted_base[0], nbytes - self._promoted_base[1]
        ps.slot_evicted = arena.fresh_evicted
        ps.slot_release_waits = arena.pending_waits
        ps.slot_release_wait_seconds = arena.pending_wait_seconds
        out: dict[str, Any] = {"config": asdict(self.config), **ps.as_dict()}
        if self.staging is not None:
            out["staging"] = asdict(self.staging.counters)
            out["staging"]["bytes"] = self.staging.nbytes
            out["staging"]["capacity_bytes"] = self.staging.capacity
            out["staging"]["spare_bytes"] = self._spare_bytes
        return out


class PendingReads:
    """What a deferred fetch (:meth:`DecodePipeline.fetch` with ``defer=True`` under ``overlap_sync_reads``)
    left in flight: ``late`` ``(U,)`` bool over the selection's ``fetch`` order, the blocks whose slots are not
    filled yet; :meth:`wait` fills them (waits for the reads, re-reads a failed read into a reserved slot, raises
    what a failed synchronous read raised).  Forward thread only."""

    def __init__(self, late: torch.Tensor, finish: Any) -> None:
        self.late = late
        self._finish = finish
        self.done = False

    def wait(self, raise_errors: bool = True) -> None:
        """Idempotent; ``raise_errors=False``: a failure is swallowed (its blocks are dropped from the pool)."""
        if self.done:
            return
        self.done = True
        try:
            self._finish()
        except BaseException:
            if raise_errors:
                raise


def staged_keys(layer: "TieredKVLayer", blocks: list[int]) -> list:
    """The K and V keys of ``blocks`` block by block, each once (a joint layer's key once per block): the entries
    :meth:`DecodePipeline._stage_blocks` stages, in its order (its ``tiers`` follow it)."""
    kk, vk = layer._kkeys, layer._vkeys
    return list(dict.fromkeys(k for j in blocks for k in (kk[j], vk[j])))


def _mask_union(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    """The union of two ``(B, H, N)`` part masks whose ``N`` may differ (blocks stored between two selections; the
    shorter one names none of the extra blocks); ``a`` alone when either is missing or their rows or heads differ."""
    if a is None or b is None:
        return b if a is None else a
    if a.shape[:2] != b.shape[:2] or a.dim() != 3 or b.dim() != 3:
        return a
    b = b.to(a.device)
    n = max(a.shape[2], b.shape[2])
    if a.shape[2] < n:
        a = torch.nn.functional.pad(a, (0, n - a.shape[2]), value=False)
    if b.shape[2] < n:
        b = torch.nn.functional.pad(b, (0, n - b.shape[2]), value=False)
    return a | b


def _forward_result(placeholder: concurrent.futures.Future, read: concurrent.futures.Future) -> None:
    """Complete ``placeholder`` (a running future) as ``read`` completed."""
    exc = read.exception() if not read.cancelled() else concurrent.futures.CancelledError()
    if exc is not None:
        placeholder.set_exception(exc)
    else:
        placeholder.set_result(read.result())
