"""The buffers exact decode assembles each layer's attention states in, and the layer-ahead reads into them.

Every forward pass, a :class:`~tiercache_llm.TieredKVLayer` must hand attention its keys and values as
``(batch, kv_heads, length, head_dim)`` tensors.  Instead of gathering the blocks, concatenating the
tail and concatenating the new tokens (three copies of the context), the layer takes a buffer of
``(batch, kv_heads, capacity, head_dim)`` from a :class:`DecodeBuffer`, has the tiercache write every
block straight into its slice (``[j * block_size, (j + 1) * block_size)`` for the ``j``-th visible
block), copies the tail and the new tokens in place behind them, and returns a view
``buffer[:, :, start:end]`` (contiguous in ``head_dim``; the batch and head strides span the
capacity).  Capacity grows geometrically, and the per-block views of a buffer are made once per
allocation, so a decode step does no per-block tensor bookkeeping.

**Slots, shared by all layers.**  A model runs the attention of layer ``l`` to completion before it
updates layer ``l + 1``, so the states of one layer are all that attention needs at a time.  A
:class:`DecodeBuffer` keeps one buffer per *slot* and geometry: while layer ``l``'s attention reads its
states in one slot, the blocks of layer ``l + 1`` are read in the background into another
(*layer-ahead read*, :class:`ReadAhead`; after the last layer, the next forward pass's first layer),
so that layer's ``update`` finds them there and only waits for what is still missing.  **Deeper reads
ahead**: the cache also reads layers ``l + 2 .. l + max_depth`` ahead, each into a slot of its own,
while the bytes of the reads pending (but layer ``l``'s, taken now) plus the new one stay within
``ahead_bytes``, so the device keeps reading where compute is long (the step's end: the last layer, the
LM head, sampling) instead of idling after one layer's read; layers whose blocks exceed ``ahead_bytes``
are read one ahead only.  **Caches with a disk tier** (:meth:`DecodeBuffer.for_store`) read more
eagerly, since their reads wait on the device rather than on a core: up to ``readers`` (2) reads ahead
run at once, each on a reader thread of its own (started in order), so chunks stay in flight across a
layer boundary (while one read copies its host-held blocks or waits on its last chunks, the next has
its chunks in flight); layers further ahead whose blocks are all held in memory are passed over (each
is read one ahead when its turn comes, on a copy thread of its own so it never queues behind disk
reads) and the walk goes on to the layers that read the disk, up to a full pass ahead, within
``base_depth`` (4) slots and ``ahead_bytes`` (192 MiB), ``group`` (2) layers at a time: the reads beyond the next
layer wait until that many slots are free and then go out as one job with one ``get_many`` for all their
entries (:meth:`DecodeBuffer.together`), so a step makes about half the reader round trips and ``get_many``
calls; the reads of a group share one future (discarding one waits for the job; a failure is redone by each layer).
Small layers are grouped more (:meth:`DecodeBuffer.schedule`): as many as fit in ``group_bytes`` (8 MiB) per
job, in up to ``max_depth`` (8) slots, so a short context's warm step makes a few calls rather than one per
two layers; layers larger than half of ``group_bytes`` are read one per job, as soon as a slot is free (no layer
waits for another's read, and the disk keeps reading through the host-held layers at a step's end).
A cache filled layer by layer holds its last
layers in the host tier (under the default ``kv-stream`` placement): with one read at a time and two
layers ahead, the disk sat idle through them and through every layer boundary (``benchmarks/exact_prefetch.py``'s timeline).  Memory-only
caches keep one reader, two layers and 32 MiB (their reads are copies that take turns on the cores).
Memory beside the tiers: two layers' visible K and V (each up to 1.5x for growth), plus, for deeper
reads, up to ``max_depth - 1`` more slots of layers that fit in ``ahead_bytes`` (those beyond ``base_depth``
only for layers of at most ``group_bytes / 3``), plus, with row-mapped
blocks (beam search), one temporary copy of the stored rows of each layer being read ahead.  The
validity rule: **a tensor returned by ``update`` stays valid until the next ``update`` of any layer of
the same cache** (that update starts reading the following layers into slots other than the one it
returns).  Keeping every layer's context resident instead would turn the host budget into a fiction.

Correctness never depends on a read ahead: the consuming ``update`` checks that the read is of its
current blocks (a crop, reorder, batch change or reset in between discards it), uses what it delivered
and reads every other block itself; a read ahead that failed is redone synchronously, where a real
error raises.
"""

from __future__ import annotations

import _thread
import atexit
import collections
import concurrent.futures
import contextlib
import threading
import time
import weakref
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import torch

from tiercache import buffers
from tiercache.buffers import aligned_empty

# Growth factor of the capacity: O(log context) reallocations while holding at most 1.5x the largest
# layer's visible states.
GROWTH = 1.5
SLOTS = 2  # without deeper reads ahead: the states attention uses, and the next layer's read ahead
#: Layers read ahead at most (``DecodeBuffer.max_depth``' default): each needs a slot of its own.
MAX_DEPTH = 2
#: Bytes of reads ahead in flight beyond the first (``DecodeBuffer.ahead_bytes``' default): a layer further
#: ahead than the next one is only read when the reads pending plus its own stay within this.
AHEAD_BYTES = 32 << 20
#: With a disk tier (:meth:`DecodeBuffer.for_store`): reads ahead running at once, one reader thread each ...
READERS = 2
#: ... layers read ahead at most, past memory-held layers (a slot each): :data:`DISK_BASE_DEPTH`, and up to
#: :data:`DISK_MAX_DEPTH` where the layers are small (see :data:`DISK_GROUP_BYTES`) ...
DISK_BASE_DEPTH = 4
DISK_MAX_DEPTH = 8
#: ... and the bytes of the reads pending: 192 MiB reads four layers of up to 48 MiB of visible K/V ahead
#: (SmolLM2 fp32 at 8K x 4), about the disk time of the host-held layers a cache filled layer by layer ends on.
DISK_AHEAD_BYTES = 192 << 20
#: ... and layers read ahead together (``DecodeBuffer.group``): layers beyond the next one are only read once
#: this many slots are free, all of them in one job (one reader round trip, one ``get_many``): the per-call
#: Python of a read ahead and of ``get_many`` is most of a warm step at short contexts.
DISK_GROUP = 2
#: ... or, for small layers, as many as fit in this many bytes (``DecodeBuffer.group_bytes``; at most
#: ``max_depth - 1``), with up to twice that many layers ahead (:meth:`DecodeBuffer.schedule`): a warm step at
#: 1K context (SmolLM2: 1.1 MiB per layer) then makes one reader job and one ``get_many`` per 7 disk layers
#: instead of per 2-3, while a group's first layer, which waits for the whole group, waits for at most
#: 8 MiB of reads (more measured 13.6 ms of exposed waits per step at 2K cold with 7 layers of 2.6 MiB).
DISK_GROUP_BYTES = 8 << 20
#: ... and layers are grouped only where at least this many fit in ``group_bytes``; larger ones are read one per job
#: (:meth:`DecodeBuffer.schedule`).  A group of layers reads into as many slots at once, whose buffers the page-cache
#: copies then fill in turn: at 4K context (SmolLM2, 5.6 MiB a layer, two per group under the earlier rule of 1) the
#: warm copies ran ~12 % slower per entry into two slots than into one (the destinations no longer stay in the
#: CPU's cache between layers), more than the hand-offs a pair saves (docs/benchmarks.md, "Row 2 warm fetch at 4K
#: (2026-12-08, helper warm9)").
GROUP_MIN_FIT = 2
#: Whether a disk-backed cache reads inline, rather than ahead, the layers whose reads are copies (memory-held
#: blocks, a buffered disk tier) while torch's threads fill every core of an otherwise idle machine
#: (``TieredKVCache._ahead_overlaps``).
INLINE_WHEN_BUSY = True
#: With a core to spare beside torch's threads, a cache on the CPU reads memory-held layers ahead only when
#: the layers' visible blocks hold at least this many bytes; smaller ones are copied by their own update
#: (``TieredKVCache._ahead_mode``: a memory-only cache then reads nothing ahead, counted in
#: ``ReadAheadCounters.inline``; a disk-backed one only the layers that read the disk).  A read ahead of
#: memory-held blocks is a copy on a reader thread, and only the copy itself runs beside the model: the reader's
#: Python (the hand-off, ``get_many``'s lookups and pins) holds the GIL that the forward thread needs between its
#: own ops, so the forward thread waits for it (SmolLM2, 1K context, all KV in the host tier, one torch thread:
#: its tail copies took 11 ms per step instead of 1.4, the update 12-28 ms instead of 9.5).  0 reads every layer
#: ahead (the earlier behaviour).
MEMORY_AHEAD_MIN_BYTES = 8 << 20
#: Whether a :class:`DecodeBuffer` asks the kernel for transparent huge pages (``madvise(MADV_HUGEPAGE)``, Linux)
#: for CPU buffers of at least :data:`HUGE_MIN_BYTES` (``DecodeBuffer.huge_pages``' default; :func:`huge_empty`).
#: Direct disk reads pin every destination page: into 2 MiB pages they took 60 % less system CPU
#: (``benchmarks/exact_hugepages.py``), and SmolLM2 8K x 4 cold decoded 4-22 % faster per step over four
#: 10-round runs (``benchmarks/exact_cold_ab.py --same-cache --variants small,base``; docs/tiercache_llm.md
#: "Huge pages").
HUGE_PAGES = True
HUGE_MIN_BYTES = 8 << 20
#: Whether a :class:`DecodeBuffer` runs its reads ahead on :class:`Readers` (a queue and a lock per job) rather
#: than a ``concurrent.futures.ThreadPoolExecutor`` (a ``Future`` with a condition variable, a work item and a
#: thread-count check per job); read when a buffer starts its reader threads.
LIGHT_READERS = True
#: Whether :meth:`DecodeBuffer.take` runs a read ahead no reader thread has started yet on the updating thread
#: (``ReadAheadCounters.stolen``) instead of waiting for a reader to wake and run it (``Readers`` only).  Off:
#: in ``hotpath_fetch.py``'s reads at 1K it made memory-held layers ~0.1 ms per step cheaper and disk layers
#: 0.1-0.3 ms dearer (docs/benchmarks.md, "Reader hand-off").
STEAL_READS = False


def huge_empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """:func:`tiercache.buffers.huge_empty` for buffers of at least :data:`HUGE_MIN_BYTES` (read at call time)."""
    return buffers.huge_empty(shape, dtype=dtype, device=device, min_bytes=HUGE_MIN_BYTES)


class Job:
    """A job run by :class:`Readers`: the subset of ``concurrent.futures.Future`` the decode buffer and its
    callers use (``result``, ``exception``, ``done``, ``cancel``), with one lock, held until the job has run
    or was cancelled, instead of a condition variable and its waiter locks."""

    __slots__ = ("_fn", "_done", "_claim", "_finished", "_result", "_error")

    def __init__(self, fn: Callable[[], Any]) -> None:
        self._fn = fn
        self._done = _thread.allocate_lock()
        self._done.acquire()
        self._claim = _thread.allocate_lock()  # taken by whichever of run and cancel comes first
        self._finished = False
        self._result: Any = None
        self._error: BaseException | None = None

    def run(self) -> bool:
        """Run the job here unless it was cancelled or has run or is running elsewhere; whether it ran here."""
        if not self._claim.acquire(False):
            return False
        try:
            self._result = self._fn()
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits for the job
            self._error = exc
        finally:
            self._fn = None
            self._finished = True
            self._done.release()
        return True

    def cancel(self) -> bool:
        """Cancel the job if it has not started; whether it is (now) cancelled."""
        if self._claim.acquire(False):
            self._fn = None
            self._error = concurrent.futures.CancelledError()
            self._finished = True
            self._done.release()
            return True
        return isinstance(self._error, concurrent.futures.CancelledError)

    def done(self) -> bool:
        return self._finished

    def _wait(self, timeout: float | None) -> None:
        if self._finished:
            return
        if not self._done.acquire(True, -1 if timeout is None else timeout):
            raise TimeoutError()
        self._done.release()  # stays released: the job is done for every later waiter

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._wait(timeout)
        return self._error

    def result(self, timeout: float | None = None) -> Any:
        self._wait(timeout)
        if self._error is not None:
            raise self._error
        return self._result


class _Worker:
    __slots__ = ("wake", "job")

    def __init__(self) -> None:
        self.wake = _thread.allocate_lock()  # held while the worker sleeps; released to wake it with ``job``
        self.wake.acquire()
        self.job: Job | None = None


class _ReadersState:
    """What :class:`Readers`' threads share (apart from the object, so that collecting it stops them)."""

    __slots__ = ("lock", "pending", "idle", "busy", "stopping", "threads", "workers", "name", "__weakref__")

    def __init__(self, workers: int, name: str) -> None:
        self.lock = _thread.allocate_lock()
        self.pending: collections.deque[Job] = collections.deque()  # jobs no thread has taken yet, in order
        self.idle: list[_Worker] = []  # the threads asleep, the last to finish a job last
        self.busy: list[_Worker] = []  # the threads running a job or about to look for the next
        self.stopping = False
        self.threads: list[threading.Thread] = []
        self.workers, self.name = workers, name


def _serve(state: _ReadersState, me: _Worker) -> None:
    job: Job | None = None
    while True:
        if job is not None:
            job.run()
            job = None
        with state.lock:
            if state.pending:
                job = me.job = state.pending.popleft()
                continue
            me.job = None
            if me in state.busy:
                state.busy.remove(me)
            if state.stopping:
                return
            state.idle.append(me)
        me.wake.acquire()
        job = me.job  # None: woken to take the queue's first job, or to stop once the queue is empty


def _stop(state: _ReadersState, wait: bool) -> None:
    with state.lock:
        state.stopping = True
        idle, state.idle = state.idle, []
        threads = list(state.threads)
    for worker in idle:
        worker.job = None
        worker.wake.release()
    if wait:
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join()


#: Every :class:`Readers`' shared state whose threads may still run: stopped (their jobs run to the end) when the
#: interpreter exits, before it tears modules down, as ``concurrent.futures`` does for its executors' threads.
_LIVE: "weakref.WeakSet[_ReadersState]" = weakref.WeakSet()


def _stop_all() -> None:
    for state in list(_LIVE):
        _stop(state, True)


getattr(threading, "_register_atexit", atexit.register)(_stop_all)


class Readers:
    """Up to ``workers`` threads running the jobs :meth:`submit` ted, started in order: what the decode buffer
    needs of a ``ThreadPoolExecutor`` (``submit`` returning a :class:`Job`, ``shutdown``) with less work per
    job.  A job is queued for a thread that has just finished one and is about to look for the next (and an
    idle thread is woken too, in case that one is descheduled: :attr:`wake_idle`), else handed to the thread that
    went idle last (its caches are the warmest), else waits in the queue the busy threads drain; a thread is started only when a job finds none idle or finishing, as a
    ``ThreadPoolExecutor`` does.  The threads stop at :meth:`shutdown` (once the jobs submitted before have run) or once the object
    is collected."""

    #: Whether a job queued for a finishing thread also wakes an idle one (whichever looks first runs it): a
    #: finishing thread descheduled on a busy machine then delays nothing (measured as good or better, one run).
    wake_idle = True

    def __init__(self, workers: int, name: str) -> None:
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
            raise ValueError(f"workers must be a positive int, got {workers!r}")
        self._state = _ReadersState(workers, name)
        _LIVE.add(self._state)
        self._finalizer = weakref.finalize(self, _stop, self._state, False)

    @property
    def _threads(self) -> list[threading.Thread]:
        return self._state.threads

    def submit(self, fn: Callable[[], Any]) -> Job:
        job = Job(fn)
        state = self._state
        with state.lock:
            if state.stopping:
                raise RuntimeError("cannot submit a job after shutdown")
            if not state.pending:
                for worker in state.busy:
                    current = worker.job
                    if current is None or current._finished:  # done, about to look for the next: it takes this
                        state.pending.append(job)
                        if self.wake_idle and state.idle:  # unless descheduled: then an idle thread does
                            idle = state.idle.pop()
                            idle.job = None
                            state.busy.append(idle)
                            idle.wake.release()
                        return job
                if state.idle:
                    worker = state.idle.pop()
                    worker.job = job
                    state.busy.append(worker)
                    worker.wake.release()
                    return job
            state.pending.append(job)
            if state.idle:  # queued behind a finishing thread's next job: wake another to run it meanwhile
                worker = state.idle.pop()
                worker.job = None
                state.busy.append(worker)
                worker.wake.release()
                return job
            if len(state.threads) >= state.workers:
                return job
            worker = _Worker()
            state.busy.append(worker)
            thread = threading.Thread(target=_serve, args=(state, worker),
                                      name=f"{state.name}_{len(state.threads)}", daemon=True)
            state.threads.append(thread)
        thread.start()
        return job

    def shutdown(self, wait: bool = True) -> None:
        """Stop the threads once the jobs submitted before have run (``wait``: return after that)."""
        self._finalizer.detach()
        _stop(self._state, wait)


def _wait(future: Any) -> None:
    """Wait for a read's job (a :class:`Job` or a ``Future``), whatever its outcome."""
    try:
        future.result()
    except BaseException:  # noqa: BLE001 - the read's failure is its consumer's to handle
        pass


@dataclass(eq=False)
class StatesBuffer:
    """One K and one V buffer of ``(batch, heads, capacity, head_dim)`` and their block views.

    Attributes:
        keys, values: the buffers.
        block_size: tokens per block view.
        joint: ``None``, or one ``(2, batch, heads, capacity, head_dim)`` storage whose ``[0]`` is ``keys``
            and ``[1]`` is ``values`` (a *joint* buffer, for layers that store K and V of a block as one
            entry).
        key_blocks, value_blocks: ``keys[:, :, j * block_size:(j + 1) * block_size]`` for every ``j``
            with ``(j + 1) * block_size <= capacity`` (and the same of ``values``).
        joint_blocks: of a joint buffer, ``joint[:, :, :, j * block_size:(j + 1) * block_size]`` (K and V of
            block ``j``, ``(2, batch, heads, block_size, head_dim)``, where one joint entry is read); else empty.
    """

    keys: torch.Tensor
    values: torch.Tensor
    block_size: int
    joint: torch.Tensor | None = None
    key_blocks: list[torch.Tensor] = field(init=False)
    value_blocks: list[torch.Tensor] = field(init=False)
    joint_blocks: list[torch.Tensor] = field(init=False)

    def __post_init__(self) -> None:
        n = self.capacity // self.block_size
        span = n * self.block_size
        self.key_blocks = list(self.keys[:, :, :span].unflatten(2, (n, self.block_size)).unbind(2))
        self.value_blocks = list(self.values[:, :, :span].unflatten(2, (n, self.block_size)).unbind(2))
        self.joint_blocks = ([] if self.joint is None else
                             list(self.joint[:, :, :, :span].unflatten(3, (n, self.block_size)).unbind(3)))

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


@dataclass(eq=False)
class ReadAhead:
    """One layer-ahead read: the visible blocks of ``layer`` as of its ``epoch``, ``first`` to ``first + n``,
    being written into ``buf`` (slot ``slot``) by the reader thread.

    Attributes:
        kkeys, vkeys: the entries read (K then V, ``n`` each).
        posts: row-mapped blocks, read into temporaries of their stored rows:
            ``(block index in the buffer, BlockRef, tmp_k, tmp_v)``; the consuming update gathers them
            into place.
        nbytes: bytes the read asks for.
        future: the read's :class:`Job` (a ``concurrent.futures.Future`` where ``LIGHT_READERS`` is off; its
            exception, if any, is the read's failure); reads started together (:meth:`DecodeBuffer.together`)
            share one.  ``None`` while reserved, before it is submitted.
        keys, targets: the tiercache entries read and the tensors they are written into.
        fetch: ``fetch(keys, out=targets, background=True)`` reads them (a store's ``get_blocks``); reads
            started together with equal ``fetch`` and ``memory`` are merged into one call.
        memory: every block is held in memory (the read is a copy).
    """

    layer: Any
    epoch: int
    first: int
    n: int
    slot: int
    buf: StatesBuffer
    kkeys: list
    vkeys: list
    posts: list
    nbytes: int
    future: Any = None  # a Job or a concurrent.futures.Future
    keys: list = field(default_factory=list)
    targets: list = field(default_factory=list)
    fetch: Callable[..., Any] | None = None
    memory: bool = False

    @property
    def temp_bytes(self) -> int:
        return sum(tk.nbytes + tv.nbytes for _, _, tk, tv in self.posts)


@dataclass
class ReadAheadCounters:
    """What the layer-ahead reads did (monotonic; ``stats()["prefetch"]`` of a cache).

    Attributes:
        started: reads started (one per layer per forward pass, when the next layer has stored blocks).
        used: updates that found (some of) their blocks read ahead.
        blocks_ahead: entries updates took from a read ahead (one K or one V block each).
        blocks_sync: entries updates read themselves: none read ahead (first step, after a discard),
            blocks the read did not cover, blocks of a failed read.
        discarded: reads thrown away unused (crop, reorder, batch change or reset in between, a read
            of another layer in the way, release or close).
        failed: reads that raised (their blocks were read again synchronously).
        bytes_ahead: bytes of the reads started.
        bytes_taken / bytes_sync: bytes of the entries updates took from reads ahead / read themselves
            (counted by the update that uses them, so a step's share is exact whenever its reads ran).
        wait_seconds: time updates waited for their read ahead to finish (the part of the read not
            hidden behind compute).
        sync_seconds: time updates spent reading blocks themselves.
        sync_cpu_seconds: CPU time of those reads (``time.thread_time`` of the updating thread).
        background_seconds: time the reader thread spent reading (wall time: beside a forward pass on
            busy cores it includes the time the reader waits for a core or the GIL).
        background_cpu_seconds: CPU time the reader thread spent reading (``time.thread_time``; the I/O
            pool threads of a disk tier that a read spreads to are not included).
        stolen: reads ahead that the updating thread ran itself in :meth:`DecodeBuffer.take` because no reader
            thread had started them yet (:data:`STEAL_READS`; their time counts in ``wait_seconds`` and, as
            the reader's, in ``background_seconds`` / ``background_cpu_seconds``).
        inline: updates that started no read ahead because torch's intra-op threads occupy every core and
            the reads are copies (every tier is memory, or a buffered disk tier): the update's own copies use
            those threads instead (see ``TieredKVCache._ahead_overlaps``); or because every tier is memory, the
            states are on the CPU and the layer to read holds less than :data:`MEMORY_AHEAD_MIN_BYTES`
            (``TieredKVCache._ahead_mode``).
    """

    started: int = 0
    used: int = 0
    blocks_ahead: int = 0
    blocks_sync: int = 0
    discarded: int = 0
    failed: int = 0
    bytes_ahead: int = 0
    bytes_taken: int = 0
    bytes_sync: int = 0
    wait_seconds: float = 0.0
    sync_seconds: float = 0.0
    sync_cpu_seconds: float = 0.0
    background_seconds: float = 0.0
    background_cpu_seconds: float = 0.0
    inline: int = 0
    stolen: int = 0

    def as_dict(self) -> dict:
        out = asdict(self)
        total = self.blocks_ahead + self.blocks_sync
        out["hit_rate"] = self.blocks_ahead / total if total else None
        return out


class DecodeBuffer:
    """Grows-only :class:`StatesBuffer` s, up to ``max_depth + 1`` slots per layer geometry (device,
    dtype, batch, heads, head_dim, block size), shared by the layers of a cache, and the layer-ahead
    reads into them.

    ``read_ahead``: whether the layers of the cache start :class:`ReadAhead` s (the cache decides; the
    buffer only keeps them apart from the states attention is using).  ``max_depth`` (default
    :data:`MAX_DEPTH`): layers read ahead at most, one slot each (``max_depth + 1`` slots);
    ``ahead_bytes`` (default :data:`AHEAD_BYTES`): the bound :meth:`ahead_room` keeps reads beyond the
    next layer's within; ``readers`` (default 1): reads ahead running at once; ``group`` (default 1): the
    free slots the cache waits for before it reads layers beyond the next one ahead, together in one job
    (:meth:`together`).  :meth:`for_store` picks them for a cache's tiers.  ``huge_pages`` (attribute, default
    :data:`HUGE_PAGES`): buffers allocated from then on with :func:`huge_empty` (transparent huge pages for CPU
    buffers of at least :data:`HUGE_MIN_BYTES`) rather than ``aligned_empty``.

    Not thread-safe (a cache is updated by one thread at a time, as transformers' caches are); the
    reads ahead run on the buffer's reader threads, started in the order they were submitted, up to
    ``readers`` at once (each writes only its own slot).
    """

    def __init__(self, read_ahead: bool = False, max_depth: int | None = None, ahead_bytes: int | None = None,
                 readers: int = 1, group: int = 1, group_bytes: int = 0, base_depth: int | None = None) -> None:
        max_depth = MAX_DEPTH if max_depth is None else max_depth
        ahead_bytes = AHEAD_BYTES if ahead_bytes is None else ahead_bytes
        if not isinstance(max_depth, int) or isinstance(max_depth, bool) or max_depth < 1:
            raise ValueError(f"max_depth must be a positive int, got {max_depth!r}")
        if not isinstance(ahead_bytes, int) or isinstance(ahead_bytes, bool) or ahead_bytes < 0:
            raise ValueError(f"ahead_bytes must be a non-negative int, got {ahead_bytes!r}")
        if not isinstance(readers, int) or isinstance(readers, bool) or readers < 1:
            raise ValueError(f"readers must be a positive int, got {readers!r}")
        if not isinstance(group, int) or isinstance(group, bool) or group < 1:
            raise ValueError(f"group must be a positive int, got {group!r}")
        if not isinstance(group_bytes, int) or isinstance(group_bytes, bool) or group_bytes < 0:
            raise ValueError(f"group_bytes must be a non-negative int, got {group_bytes!r}")
        if base_depth is not None and (not isinstance(base_depth, int) or isinstance(base_depth, bool)
                                       or not 1 <= base_depth <= max_depth):
            raise ValueError(f"base_depth must be None or an int in [1, max_depth], got {base_depth!r}")
        self.group = group
        self.group_bytes = group_bytes
        self.base_depth = base_depth
        self.huge_pages = HUGE_PAGES  # buffers allocated from now on (see huge_empty)
        self.last_read_bytes = 0  # bytes of the read ahead started last (the size schedule() plans for)
        self._held: list[ReadAhead] | None = None  # reads reserved inside together(), submitted on exit
        self.max_depth = max_depth
        self.ahead_bytes = ahead_bytes
        self.readers = readers
        self._buffers: dict[tuple, StatesBuffer] = {}
        self.peak_bytes = 0
        self.read_ahead = read_ahead
        self.slot = 0  # the slot of the states returned last
        self.counters = ReadAheadCounters()
        self._pending: dict[int, ReadAhead] = {}  # id(layer) -> its read ahead (at most one per layer)
        self._reader: concurrent.futures.ThreadPoolExecutor | None = None
        self._copier: concurrent.futures.ThreadPoolExecutor | None = None  # reads of memory-held layers
        self._counters_lock = threading.Lock()

    @classmethod
    def for_store(cls, read_ahead: bool, memory_only: bool) -> "DecodeBuffer":
        """The buffer of a cache: with a disk tier :data:`READERS` readers, :data:`DISK_MAX_DEPTH` layers
        and :data:`DISK_AHEAD_BYTES` ahead (reads wait on the device: keep it busy); with memory tiers only
        the defaults (one reader: the reads are copies, which only take turns on the cores); with a disk tier
        layers beyond the next are read :data:`DISK_GROUP` at a time."""
        if memory_only:
            return cls(read_ahead)
        return cls(read_ahead, max_depth=DISK_MAX_DEPTH, ahead_bytes=DISK_AHEAD_BYTES, readers=READERS,
                   group=DISK_GROUP, group_bytes=DISK_GROUP_BYTES, base_depth=DISK_BASE_DEPTH)

    def schedule(self, layer_bytes: int | None = None) -> tuple[int, int]:
        """``(group, depth)`` for reads ahead of layers of about ``layer_bytes`` each (default: the read
        started last): layers beyond the next one are read once ``group`` slots are free, together (one job,
        one ``get_many``; into the free slots, or at most ``group`` layers where ``group`` exceeds ``self.group``);
        at most ``depth`` layers ahead.  Without ``group_bytes``, or before any read:
        ``(min(group, max_depth - 1), base_depth)`` (``None``, the default: ``max_depth``).  With it, small
        layers are read more at a time: ``group`` = ``group_bytes // layer_bytes`` within
        ``[self.group, max_depth - 1]``, ``depth`` = ``2 * group`` within ``[base_depth, max_depth]`` (slots for
        a group in flight and the next one); the slots beyond ``base_depth`` are only used for layers of at
        most ``group_bytes / 3`` bytes.  Layers of which fewer than :data:`GROUP_MIN_FIT` fit in ``group_bytes``
        are read one per job (``group`` 1, ``base_depth``), each as soon as a slot is free: SmolLM2 fp32 at 8K x 4
        (45 MiB a layer) decoded 7-10 % faster than in pairs, one cache switched between the two
        (``benchmarks/exact_cold_ab.py --same-cache``), and at 4K (5.6 MiB) a warm step's reads were faster one
        layer per job (see :data:`GROUP_MIN_FIT`)."""
        group = min(self.group, self.max_depth - 1)
        size = self.last_read_bytes if layer_bytes is None else layer_bytes
        base = self.max_depth if self.base_depth is None else min(self.base_depth, self.max_depth)
        if not self.group_bytes or size <= 0:
            return max(group, 1), base
        if size > self.group_bytes or self.group_bytes // size < GROUP_MIN_FIT:
            # A group's first layer waits for the whole group's reads, and a read of a large layer is long
            # enough that a job per layer costs nothing: each is read as soon as one slot is free.
            return 1, base
        group = max(1, min(self.max_depth - 1, max(group, self.group_bytes // size)))
        return group, min(self.max_depth, max(base, 2 * group))

    def get(
        self,
        tokens: int,
        shape_k: tuple[int, int, int],
        shape_v: tuple[int, int, int],
        dtype: torch.dtype,
        device: torch.device,
        block_size: int,
        slot: int = 0,
        joint: bool = False,
    ) -> StatesBuffer:
        """The buffer pair of ``slot`` holding at least ``tokens`` tokens; ``shape_k``/``shape_v`` are
        ``(batch, heads, head_dim)``.  ``joint`` (needs ``shape_k == shape_v``): K and V in one storage (see
        :class:`StatesBuffer`).  Contents are undefined (earlier views are overwritten; a reallocated
        buffer starts empty, the old one stays alive while referenced)."""
        if joint and shape_k != shape_v:
            raise ValueError(f"a joint buffer needs equal K and V shapes, got {shape_k} and {shape_v}")
        geometry = (device, dtype, shape_k, shape_v, block_size, slot, joint)
        buf = self._buffers.get(geometry)
        if buf is not None and buf.capacity >= tokens:
            return buf
        capacity = max(tokens, int(buf.capacity * GROWTH) if buf is not None else 0)
        capacity = -(-capacity // block_size) * block_size
        if buf is None:  # a new geometry: a batch change retires the buffers of the old batch size
            for other in [g for g in self._buffers if g[2][0] != shape_k[0]]:
                del self._buffers[other]
        del buf  # release the old storage before allocating the larger one
        self._buffers.pop(geometry, None)
        b, h, d = shape_k
        empty = huge_empty if self.huge_pages else (lambda s, t, dev: aligned_empty(s, dtype=t, device=dev))
        if joint:
            both = empty((2, b, h, capacity, d), dtype, device)
            new = StatesBuffer(both[0], both[1], block_size, both)
        else:
            keys = empty((b, h, capacity, d), dtype, device)  # page-aligned: disk reads land without a copy
            b, h, d = shape_v
            values = empty((b, h, capacity, d), dtype, device)
            new = StatesBuffer(keys, values, block_size)
        self._buffers[geometry] = new
        self.peak_bytes = max(self.peak_bytes, self.nbytes)
        return new

    @property
    def nbytes(self) -> int:
        """Bytes currently allocated (both slots, and the temporaries of reads ahead of row-mapped blocks)."""
        return sum(buf.nbytes for buf in self._buffers.values()) + sum(p.temp_bytes for p in self._pending.values())

    # ----------------------------------------------------------------------------- reads ahead
    def slot_for(self, layer: Any) -> int:
        """The slot ``layer``'s next update assembles in: its read ahead's, else one no other read ahead
        is writing (the slot of the last states when free, so a cache without reads ahead uses one)."""
        mine = self._pending.get(id(layer))
        if mine is not None:
            return mine.slot
        busy = {p.slot for p in self._pending.values()}
        for slot in (self.slot, *range(self.max_depth + 1)):
            if slot not in busy:
                return slot
        self.discard()
        return self.slot

    def pending(self, layer: Any) -> bool:
        """Whether ``layer`` has a read ahead not yet taken."""
        return id(layer) in self._pending

    def _free(self, exclude: int, depth: int | None) -> list[int]:
        """The first ``depth + 1`` slots (default ``max_depth + 1``) that neither ``exclude`` (the states being
        assembled) nor any pending read ahead uses, in order."""
        busy = {p.slot for p in self._pending.values()}
        busy.add(exclude)
        return [slot for slot in range((self.max_depth if depth is None else depth) + 1) if slot not in busy]

    def free_slots(self, exclude: int, depth: int | None = None) -> int:
        """How many of the first ``depth + 1`` slots (default ``max_depth + 1``) neither ``exclude`` nor any
        pending read ahead uses."""
        return len(self._free(exclude, depth))

    def free_slot(self, exclude: int, depth: int | None = None) -> int | None:
        """A slot among the first ``depth + 1`` (default ``max_depth + 1``) neither ``exclude`` (the states
        being assembled) nor any pending read ahead uses, or ``None`` when all are taken."""
        free = self._free(exclude, depth)
        return free[0] if free else None

    def other_slot(self, slot: int) -> int:
        """The slot after ``slot`` (cyclically): where a read ahead goes when every slot is taken (the read
        pending there is discarded)."""
        return (slot + 1) % (self.max_depth + 1)

    def ahead_room(self, updating: Any = None) -> int:
        """Bytes a read ahead beyond the next layer's may ask for: ``ahead_bytes`` less the reads pending
        but ``updating``'s (the layer being updated takes its read now), negative when they exceed it."""
        skip = id(updating)
        return self.ahead_bytes - sum([p.nbytes for key, p in self._pending.items() if key != skip])

    def clear_for(self, layer: Any, slot: int) -> None:
        """Before reading ``layer`` ahead into ``slot``: discard its earlier read ahead and any read into
        that slot."""
        for key, p in list(self._pending.items()):
            if key == id(layer) or p.slot == slot:
                self._drop(key)

    def start(self, read: ReadAhead) -> None:
        """Read ``read`` (``read.fetch(read.keys, out=read.targets, background=True)``) on a reader thread;
        :meth:`take` hands it to the layer.  ``read.memory`` (every block is held in memory, the read is a
        copy): it runs on a thread of its own, so it never queues behind disk reads started earlier for
        layers further ahead.  Inside :meth:`together` the read is reserved (pending, its slot taken) and
        submitted, merged with the others, when the block ends."""
        self._pending[id(read.layer)] = read
        self.last_read_bytes = read.nbytes
        self.counters.started += 1
        self.counters.bytes_ahead += read.nbytes
        if read.posts:  # its temporaries add to the bytes held (the buffers themselves are counted by get)
            self.peak_bytes = max(self.peak_bytes, self.nbytes)
        if self._held is not None:
            self._held.append(read)
        else:
            self._submit([read])

    @contextlib.contextmanager
    def together(self) -> Iterator[None]:
        """Reads :meth:`start` ed inside the block are submitted as it ends, those with the same ``fetch``
        and ``memory`` as one job that reads all their entries with one ``fetch`` call (they share its
        future: a failure fails each of them, and each layer then reads its blocks itself).  Reentrant."""
        if self._held is not None:
            yield
            return
        self._held = held = []
        try:
            yield
        finally:
            self._held = None
            jobs: dict[tuple, list[ReadAhead]] = {}
            for read in held:
                if self._pending.get(id(read.layer)) is read:  # not dropped inside the block
                    jobs.setdefault((read.memory, read.fetch), []).append(read)
            for reads in jobs.values():
                self._submit(reads)

    def _submit(self, reads: list[ReadAhead]) -> None:
        """One job reading every entry of ``reads`` (same ``fetch`` and ``memory``) with one ``fetch`` call."""
        first = reads[0]
        if first.memory and self.readers > 1:
            if self._copier is None:
                self._copier = self._executor(1, "tiercache-kv-copy")
            executor = self._copier
        else:
            if self._reader is None:
                self._reader = self._executor(self.readers, "tiercache-kv-ahead")
            executor = self._reader
        counters, lock, fetch = self.counters, self._counters_lock, first.fetch
        if len(reads) == 1:
            keys, targets = first.keys, first.targets
        else:
            keys = [key for read in reads for key in read.keys]
            targets = [target for read in reads for target in read.targets]

        def timed() -> Any:
            start, cpu = time.perf_counter(), time.thread_time()
            try:
                return fetch(keys, out=targets, background=True)
            finally:
                wall, used = time.perf_counter() - start, time.thread_time() - cpu
                with lock:  # reader threads finish concurrently
                    counters.background_seconds += wall
                    counters.background_cpu_seconds += used

        future = executor.submit(timed)
        for read in reads:
            read.future = future

    @staticmethod
    def _executor(workers: int, name: str) -> Any:
        if LIGHT_READERS:
            return Readers(workers, name)
        return concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix=name)

    def take(self, layer: Any) -> tuple[ReadAhead | None, BaseException | None]:
        """``layer``'s read ahead, once finished (the wait is counted), and the exception it raised
        (``None`` if it succeeded); ``(None, None)`` when there is none."""
        read = self._pending.pop(id(layer), None)
        if read is None:
            return None, None
        if read.future is None:  # reserved inside together() and taken before it was submitted: nothing ran
            self.counters.discarded += 1
            return None, None
        start = time.perf_counter()
        future = read.future
        if STEAL_READS and type(future) is Job and not future._finished and future.run():
            self.counters.stolen += 1
        try:
            future.result()
            error = None
        except BaseException as exc:  # noqa: BLE001 - the layer reads these blocks itself
            error = exc
        self.counters.wait_seconds += time.perf_counter() - start
        if error is not None:
            self.counters.failed += 1
        return read, error

    def forget(self, layer: Any) -> None:
        """Discard ``layer``'s read ahead (its blocks or row maps are about to change)."""
        if self._pending:
            self._drop(id(layer))

    def discard(self) -> None:
        """Discard every read ahead (waiting for those running: nothing writes into a slot afterwards)."""
        for key in list(self._pending):
            self._drop(key)

    def _drop(self, key: int) -> None:
        read = self._pending.pop(key, None)
        if read is None:
            return
        self.counters.discarded += 1
        future = read.future
        if future is None:  # reserved, not submitted: nothing will write its slot
            return
        shared = any(p.future is future for p in self._pending.values())
        if shared or not future.cancel():  # a job shared with reads still pending runs for them
            _wait(future)

    def release(self) -> None:
        """Free the storage (the next :meth:`get` allocates again); reads ahead are discarded first."""
        self.discard()
        self._buffers.clear()

    def close(self) -> None:
        """Discard the reads ahead and stop the reader thread (idempotent)."""
        self.discard()
        for executor in (self._reader, self._copier):
            if executor is not None:
                executor.shutdown(wait=True)
        self._reader = self._copier = None
