"""A bounded cache of open read-only file descriptors, so repeated reads of a chunk skip open/close.

Each cached descriptor carries a user count: one evicted (or forgotten) while a read is using it is closed
when that read releases it, never under it (a closed descriptor number can be reused by an unrelated open
at once, and a read through it would see another file).  The owner must :meth:`forget` a key before the
file behind it is replaced or removed (the disk tier does so in ``write`` after the rename and in
``discard`` before the unlink); until then a cached descriptor keeps reading the file it opened.

Every cache of the process draws on one shared budget of cached descriptors (:func:`shared_limit`, half
the open-file limit), besides its own bound (:func:`default_limit`, a third), so many disk tiers open at
once (several caches in one program) never cache more than that together; a cache whose own bound or the
shared one is reached reads through one-off descriptors.  If ``open`` still fails for want of descriptors
(``EMFILE`` / ``ENFILE``, e.g. the program holds many files of its own), every cache of the process closes
its idle descriptors and the open is tried once more.  Thread-safe.
"""

from __future__ import annotations

import errno
import os
import resource
import threading
import weakref
from collections import OrderedDict
from typing import Hashable


class _Handle:
    __slots__ = ("fd", "users", "dead")

    def __init__(self, fd: int) -> None:
        self.fd, self.users, self.dead = fd, 1, False


def _share_of_open_files(divisor: int, cap: int) -> int:
    """``1 / divisor`` of the process's soft open-file limit, at most ``cap`` (at least 16)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(16, min(cap, (soft if soft != resource.RLIM_INFINITY else cap * divisor) // divisor))


def shared_limit() -> int:
    """Descriptors all the caches of the process may keep open together: half the open-file limit, at most
    16384 (several caches are often open at once, e.g. a benchmark comparing configurations; each one's
    own bound is :func:`default_limit`)."""
    return _share_of_open_files(2, 16384)


def default_limit() -> int:
    """A third of the process's open-file limit, at most 8192.  One file holds one entry, so the cache
    only helps while a read pattern's files fit: a 4K-token exact decode reads ~3,400 disk entries per
    step in the same order every step, which an LRU of 1024 turns into an open and a close per read (about
    40 % of a warm batched read of 48 KiB entries here), and an 8K-token batch-4 one ~5,500 (a quarter of
    them opened and closed per step under the former cap of 4096); with the usual soft limit of 1024 this
    is 341."""
    return _share_of_open_files(3, 8192)


class _SharedBudget:
    """The cached descriptors of every :class:`FdCache` of the process, bounded by ``limit``
    (:func:`shared_limit` when first needed)."""

    def __init__(self) -> None:
        self.lock = threading.RLock()  # give() may run from a collected cache's __del__ inside take()
        self.count = 0
        self.limit: int | None = None
        self.caches: weakref.WeakSet = weakref.WeakSet()

    def take(self) -> bool:
        with self.lock:
            if self.limit is None:
                self.limit = shared_limit()
            if self.count >= self.limit:
                return False
            self.count += 1
            return True

    def give(self, n: int = 1) -> None:
        with self.lock:
            self.count -= n


_SHARED = _SharedBudget()


#: When the cache is full, one miss in this many replaces the least recently used descriptor; the others
#: read through a descriptor of their own, closed after the read.  Plain LRU evicts every descriptor before
#: its reuse when a read pattern cycles over more files than the cache holds (an exact decode reads the same
#: blocks in the same order every step), so it would never hit; keeping most of the resident set makes such
#: a scan hit about ``limit / files`` of the time while a changed working set still moves in.
REPLACE_EVERY = 8


class FdCache:
    """Descriptors opened with ``flags``, at most ``limit`` of them (default :func:`default_limit`)."""

    def __init__(self, flags: int, limit: int | None = None) -> None:
        self.flags = flags
        self.limit = default_limit() if limit is None else limit
        self._open: OrderedDict[Hashable, _Handle] = OrderedDict()
        self._lock = threading.Lock()
        self._full_misses = 0
        _SHARED.caches.add(self)

    def lookup(self, key: Hashable) -> _Handle | None:
        """The cached descriptor of ``key`` (pair with :meth:`release`), or ``None`` when it is not open:
        the hot path asks this first so it builds the file's path only on a miss."""
        lock = self._lock
        lock.acquire()  # (not ``with``: it costs a lookup and a bound method per special method)
        try:
            handle = self._open.get(key)
            if handle is not None:
                handle.users += 1
                self._open.move_to_end(key)
            return handle
        finally:
            lock.release()

    def lookup_many(self, keys: list) -> list[_Handle | None]:
        """:meth:`lookup` of every key in one lock round trip (pair with :meth:`release_many`): a batch's
        reads take their cached descriptors at once instead of two lock round trips per read."""
        lock = self._lock
        opened = self._open
        handles: list[_Handle | None] = []
        lock.acquire()  # (see lookup)
        try:
            get, to_end = opened.get, opened.move_to_end
            for key in keys:
                handle = get(key)
                if handle is not None:
                    handle.users += 1
                    to_end(key)
                handles.append(handle)
        finally:
            lock.release()
        return handles

    def release_many(self, handles: list[_Handle | None]) -> None:
        """:meth:`release` of every handle of :meth:`lookup_many` that is not ``None``."""
        closing = []
        lock = self._lock
        lock.acquire()
        try:
            for handle in handles:
                if handle is not None:
                    handle.users -= 1
                    if handle.dead and not handle.users:
                        closing.append(handle.fd)
        finally:
            lock.release()
        for fd in closing:  # out of the cache and unused: closed outside the lock, as release does
            os.close(fd)

    def pread(self, key: Hashable, views: list, offset: int) -> int | None:
        """``os.preadv(fd, views, offset)`` through ``key``'s cached descriptor (held for the read, as
        :meth:`lookup` and :meth:`release` hold it), or ``None`` with nothing read when none is open: the
        hit path of a single read in one call (a call frame and two method look-ups are a measurable part
        of a warm 64 KiB read).  Raises ``OSError`` from ``preadv``."""
        lock = self._lock
        lock.acquire()  # (see lookup)
        try:
            handle = self._open.get(key)
            if handle is None:
                return None
            handle.users += 1
            self._open.move_to_end(key)
        finally:
            lock.release()
        try:
            return os.preadv(handle.fd, views, offset)
        finally:
            lock.acquire()
            try:
                handle.users -= 1
                closing = handle.dead and not handle.users
            finally:
                lock.release()
            if closing:
                os.close(handle.fd)

    def acquire(self, key: Hashable, path: str) -> _Handle:
        """An open descriptor for ``path``; pair with :meth:`release`.  Raises ``OSError`` from ``open``."""
        handle = self.lookup(key)
        return handle if handle is not None else self.open_missing(key, path)

    def open_missing(self, key: Hashable, path: str) -> _Handle:
        """:meth:`acquire` for a caller whose :meth:`lookup` of ``key`` just found nothing: opens ``path``
        (a reader that opened it meanwhile wins).  Every ``close`` it needs happens outside the lock: a
        reader thread blocked on it would hand the GIL around (measured with 8 direct-read threads)."""
        fd = self._open_fd(path)
        spare = -1  # a descriptor to close once the lock is released
        with self._lock:
            handle = self._open.get(key)
            if handle is not None:  # another reader opened it meanwhile: use theirs
                handle.users += 1
                self._open.move_to_end(key)
                spare = fd
            else:
                full = len(self._open) >= self.limit or not _SHARED.take()
                if full:
                    self._full_misses += 1
                    if self._full_misses % REPLACE_EVERY or not self._open:
                        handle = _Handle(fd)  # not cached: closed by its release
                        handle.dead = True
                        return handle
                    _, old = self._open.popitem(last=False)  # takes the place (and budget share) of the oldest
                    old.dead = True  # out of the cache: nobody can take it again
                    if not old.users:
                        spare = old.fd
                handle = self._open[key] = _Handle(fd)
        if spare >= 0:
            os.close(spare)
        return handle

    def _open_fd(self, path: str) -> int:
        try:
            return os.open(path, self.flags)
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE):
                raise
        # Cached descriptors are only a speed-up: every cache gives its idle ones back, then one more try.
        for cache in list(_SHARED.caches):
            cache.clear()
        return os.open(path, self.flags)

    def release(self, handle: _Handle) -> None:
        lock = self._lock
        lock.acquire()  # (see lookup)
        try:
            handle.users -= 1
            closing = handle.dead and not handle.users
        finally:
            lock.release()
        if closing:  # out of the cache and unused: nobody can take it again, so close it outside the lock
            os.close(handle.fd)

    def forget(self, key: Hashable) -> None:
        """Stop caching ``key``'s descriptor (closed now, or when its last reader releases it)."""
        with self._lock:
            handle = self._open.pop(key, None)
            if handle is None:
                return
            _SHARED.give()
            handle.dead = True  # out of the cache: nobody can take it again
            if handle.users:  # its last reader closes it
                return
        os.close(handle.fd)  # (outside the lock, as in open_missing)

    def clear(self) -> None:
        with self._lock:
            _SHARED.give(len(self._open))
            while self._open:
                self._retire(self._open.popitem()[1])

    def __del__(self) -> None:  # a tier dropped without close(): its share of the budget comes back
        try:
            self.clear()
        except Exception:  # interpreter shutdown
            pass

    def _retire(self, handle: _Handle) -> None:
        handle.dead = True
        if not handle.users:
            os.close(handle.fd)
