"""A bounded staging area: tiercache entries read ahead of need, on a background I/O pool.

:class:`StagingArea` holds copies of stored KV entries (keyed by their tiercache key) in memory on the
compute device, read by background jobs before the decode step needs them.  A KV entry's key never
changes meaning (every stored block gets a fresh serial; a rewritten block gets a new key), so a staged
copy of a key is valid for as long as the key exists: nothing staged can become stale, it can only
become useless (the key was deleted) and then ages out.

Contract:

- **Bounded.** The bytes of every staged and in-flight entry never exceed ``capacity`` (bytes are
  reserved when a job is submitted; a request that does not fit is cut short and counted in
  ``dropped``).  Entries not taken within ``max_age`` steps (see :meth:`advance`) are released.
- **Never needed for correctness.** :meth:`take` returns a finished copy or ``None``; a failed, cancelled
  or too-slow job gives ``None`` and the caller reads the entry itself.  A job's failure is counted,
  never raised into the forward pass.
- **Thread safety.** All methods may be called from any thread; jobs run on the pool given at
  construction.  :meth:`close` cancels queued jobs and waits for running ones.
- **Renewal.** Asking again for a key already staged (or in flight) reads nothing and restarts its age:
  a window of entries requested at every step stays staged for as long as it is requested.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Sequence

import torch

Reader = Callable[[list[Hashable], list[torch.Tensor]], Any]
"""Reads the entries ``keys`` into the tensors ``out`` (one per key), e.g. ``BlockStore.get_blocks``."""


@dataclass
class StagingCounters:
    """Monotonic counters of a :class:`StagingArea` (bytes and entries are tiercache entries: one joint K/V
    block, or one K or one V block, each)."""

    jobs: int = 0
    entries_requested: int = 0  # entries submitted for staging (after dedup and the capacity cut)
    bytes_requested: int = 0
    dropped: int = 0  # entries not staged because the area was full
    renewed: int = 0  # requests for entries already staged or in flight (their age restarts; nothing is read)
    failed_jobs: int = 0
    failed_entries: int = 0
    hits: int = 0  # entries taken ready (or after a wait)
    waits: int = 0  # of those, entries still in flight when taken
    wait_seconds: float = 0.0
    late: int = 0  # entries whose job did not finish within the wait limit (read synchronously instead)
    expired: int = 0  # staged entries released untaken (mispredictions, aged out)
    background_seconds: float = 0.0  # time the jobs spent reading
    peak_bytes: int = 0


@dataclass
class _Slot:
    tensor: torch.Tensor
    job: "_Job"
    step: int


@dataclass
class _Job:
    future: concurrent.futures.Future | None = None
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


class StagingArea:
    """Entries read ahead on a background pool, at most ``capacity`` bytes at a time (see module doc).

    Args:
        capacity: byte bound of staged plus in-flight entries (0 disables staging: every request is
            dropped).
        executor: the pool jobs run on (owned by the caller).
        max_age: decode steps an untaken entry is kept (counted by :meth:`advance`).
        wait_timeout: seconds :meth:`take` waits for an in-flight entry before giving up on it.
    """

    def __init__(self, capacity: int, executor: concurrent.futures.Executor, *, max_age: int = 1,
                 wait_timeout: float = 30.0) -> None:
        if capacity < 0:
            raise ValueError(f"staging capacity must be >= 0 bytes, got {capacity}")
        self.capacity = int(capacity)
        self.max_age = int(max_age)
        self.wait_timeout = float(wait_timeout)
        self._executor = executor
        self._lock = threading.Lock()
        self._slots: dict[Hashable, _Slot] = {}
        self._bytes = 0
        self._step = 0
        self._closed = False
        self.counters = StagingCounters()

    @property
    def nbytes(self) -> int:
        """Bytes currently staged or in flight."""
        return self._bytes

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._slots

    def stage(self, keys: Sequence[Hashable], make: Callable[[Hashable], torch.Tensor], read: Reader,
              executor: concurrent.futures.Executor | None = None) -> int:
        """Start one background job reading the entries ``keys`` not already staged, as many as fit.

        ``make(key)`` allocates the tensor a key is read into (its stored dtype and element count);
        ``read(keys, outs)`` performs the read on the pool (``executor``: on that one instead, owned by the
        caller; :meth:`close` cancels its queued jobs too).  A key already staged or in flight is not read
        again; its age restarts (see :meth:`advance`).  Returns how many entries were submitted."""
        if not keys:
            return 0
        todo: list[Hashable] = []
        outs: list[torch.Tensor] = []
        job = _Job()
        with self._lock:
            if self._closed:
                return 0
            for key in keys:
                slot = self._slots.get(key)
                if slot is not None:
                    slot.step = self._step
                    self.counters.renewed += 1
                    continue
                tensor = make(key)
                if self._bytes + tensor.nbytes > self.capacity:
                    self.counters.dropped += 1
                    continue
                self._slots[key] = _Slot(tensor, job, self._step)
                self._bytes += tensor.nbytes
                todo.append(key)
                outs.append(tensor)
            if not todo:
                return 0
            self.counters.peak_bytes = max(self.counters.peak_bytes, self._bytes)
            self.counters.jobs += 1
            self.counters.entries_requested += len(todo)
            self.counters.bytes_requested += sum(t.nbytes for t in outs)
            try:
                job.future = (executor or self._executor).submit(self._run, job, todo, outs, read)
            except RuntimeError as exc:  # the pool was shut down: nothing staged
                job.error = exc
                job.done.set()
                self._release(todo)
                return 0
        return len(todo)

    def _run(self, job: _Job, keys: list[Hashable], outs: list[torch.Tensor], read: Reader) -> None:
        start = time.perf_counter()
        try:
            read(keys, outs)
        except BaseException as exc:  # noqa: BLE001 - a failed prefetch only costs time; the consumer reads itself
            job.error = exc
            with self._lock:
                self.counters.failed_jobs += 1
                self.counters.failed_entries += len(keys)
                self._release([k for k in keys if k in self._slots and self._slots[k].job is job])
        finally:
            with self._lock:
                self.counters.background_seconds += time.perf_counter() - start
            job.done.set()

    def take(self, key: Hashable) -> torch.Tensor | None:
        """The staged copy of ``key`` (removed from the area), waiting for its job if it is in flight;
        ``None`` when it is not staged, its job failed, or it did not finish within ``wait_timeout``."""
        return self.take_many((key,))[0]

    def take_many(self, keys: Sequence[Hashable]) -> list[torch.Tensor | None]:
        """:meth:`take` of each of ``keys``, in order: the entries leave the area under one lock round trip,
        then each in-flight one is waited for (up to ``wait_timeout`` each); the counters are updated once."""
        if not keys:
            return []
        with self._lock:
            slots = [self._slots.pop(key, None) for key in keys]
            for slot in slots:
                if slot is not None:
                    self._bytes -= slot.tensor.nbytes
        out: list[torch.Tensor | None] = []
        hits = waits = late = 0
        waited = 0.0
        for slot in slots:
            if slot is None:
                out.append(None)
                continue
            job = slot.job
            if not job.done.is_set():
                start = time.perf_counter()
                finished = job.done.wait(self.wait_timeout)
                waits += 1
                waited += time.perf_counter() - start
                if not finished:
                    late += 1
                    out.append(None)
                    continue
            if job.error is not None:
                out.append(None)
                continue
            hits += 1
            out.append(slot.tensor)
        if hits or waits:
            with self._lock:
                self.counters.hits += hits
                self.counters.waits += waits
                self.counters.wait_seconds += waited
                self.counters.late += late
        return out

    def discard(self, keys: Sequence[Hashable] | None = None) -> None:
        """Release the staged entries ``keys`` (all when ``None``), e.g. after their blocks were deleted.
        A job still writing into a released tensor finishes harmlessly (the tensor is no longer shared)."""
        with self._lock:
            self._release(list(self._slots) if keys is None else [k for k in keys if k in self._slots])

    def advance(self) -> None:
        """A decode step begins: release entries staged more than ``max_age`` steps ago (counted as
        ``expired``)."""
        with self._lock:
            self._step += 1
            old = [k for k, s in self._slots.items() if self._step - s.step > self.max_age and s.job.done.is_set()]
            self.counters.expired += len(old)
            self._release(old)

    def _release(self, keys: list[Hashable]) -> None:
        for key in keys:
            slot = self._slots.pop(key)
            self._bytes -= slot.tensor.nbytes

    def wait_idle(self) -> None:
        """Block until every submitted job has finished (their outcome is recorded, never raised)."""
        with self._lock:
            jobs = {id(s.job): s.job for s in self._slots.values()}
        for job in jobs.values():
            job.done.wait()

    def close(self) -> None:
        """Stop accepting jobs, cancel queued ones, wait for running ones, release everything."""
        with self._lock:
            self._closed = True
            jobs = {id(s.job): s.job for s in self._slots.values()}
        for job in jobs.values():
            if job.future is not None and job.future.cancel():
                job.error = concurrent.futures.CancelledError()
                job.done.set()
            job.done.wait()
        with self._lock:
            self._release(list(self._slots))
