"""Owner records: which running program owns which entries of a persistent store, so that the entries
of an owner that died (SIGKILL, power loss, an unhandled Ctrl-C) can be found and reclaimed.

Convention
----------
An *owner* is a string id (letters, digits, ``_``, ``-``, ``.``, not starting with ``.``; at most 64
characters).  Its entries are the keys that are **tuples starting with its key prefix**: ``(owner_id,)``
by default, or a longer prefix given at registration (e.g. ``("kv", owner_id)``).  Prefix elements are
``str`` or ``int``.  Nothing else about the keys is interpreted.

Files (in ``<store>/owners/``, beside the store's data; see docs/tiercache_llm.md, "Orphaned blocks")::

    <owner_id>.json   the record: {"owner", "prefix", "pid", "host", "created" (Unix seconds),
                      "ephemeral"}; written to a temporary file and renamed, so never half-written
    <owner_id>.lock   the liveness lock: the owner holds an exclusive ``fcntl.flock`` on it for as long
                      as it is registered.  The kernel drops the lock when the owner's process dies for
                      any reason, so "lock can be taken" means "owner is dead".  ``flock`` locks belong
                      to an open file, so this also tells owners apart inside one live process.

An owner is **ephemeral** when its entries are worthless once it is gone (a KV cache of one run);
:func:`reclaim` deletes the entries and the record of every *dead ephemeral* owner.  Records of
non-ephemeral owners (a namespace meant to outlive its writer) are listed but never reclaimed.

Since a ``tiercache.Cache`` holds an exclusive lock on its path, every owner registered by an
earlier process is dead by the time a new ``Cache`` opens the path; the liveness lock makes the
answer explicit and also right for several owners sharing one open ``Cache``.

Thread safety: an :class:`Owner` handle is not shared between threads; :func:`reclaim` must run with
the store's ``Cache`` open (it holds the store's path lock, so no other process changes entries).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import socket
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Hashable

OWNERS_DIR = "owners"
_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True)
class OwnerRecord:
    """What an owner wrote about itself.  ``created`` is Unix time in seconds."""

    owner_id: str
    prefix: tuple[str | int, ...]
    pid: int
    host: str
    created: float
    ephemeral: bool = True

    def owns(self, key: Hashable) -> bool:
        """Whether ``key`` is one of this owner's entries (a tuple starting with :attr:`prefix`)."""
        n = len(self.prefix)
        return type(key) is tuple and len(key) >= n and key[:n] == self.prefix

    def to_json(self) -> dict[str, Any]:
        return {
            "owner": self.owner_id, "prefix": list(self.prefix), "pid": self.pid, "host": self.host,
            "created": self.created, "ephemeral": self.ephemeral,
        }

    @classmethod
    def from_json(cls, data: Any) -> "OwnerRecord":
        if not isinstance(data, dict):
            raise ValueError("an owner record must be a JSON object")
        prefix = data.get("prefix")
        if not isinstance(prefix, list) or not prefix or not all(type(p) in (str, int) for p in prefix):
            raise ValueError(f"bad key prefix {prefix!r} in owner record")
        owner_id = data.get("owner")
        if not isinstance(owner_id, str) or not _ID.fullmatch(owner_id):
            raise ValueError(f"bad owner id {owner_id!r} in owner record")
        return cls(
            owner_id, tuple(prefix), int(data.get("pid", -1)), str(data.get("host", "")),
            float(data.get("created", 0.0)), bool(data.get("ephemeral", True)),
        )


def owners_dir(store_path: str | os.PathLike[str]) -> Path:
    """``<store_path>/owners``: where owner records live."""
    return Path(store_path) / OWNERS_DIR


def _check_prefix(prefix: tuple) -> tuple:
    if type(prefix) is not tuple or not prefix or not all(type(p) in (str, int) for p in prefix):
        raise ValueError(f"prefix must be a non-empty tuple of str/int, got {prefix!r}")
    return prefix


class Owner:
    """A registered owner (see :func:`register`).  Holds the liveness lock until :meth:`release`
    (also on garbage collection: the lock file's descriptor is closed with the object)."""

    def __init__(self, store_path: Path, record: OwnerRecord, lock_fd: int) -> None:
        self.store_path = store_path
        self.record = record
        self._lock_fd: int | None = lock_fd

    @property
    def owner_id(self) -> str:
        return self.record.owner_id

    @property
    def released(self) -> bool:
        return self._lock_fd is None

    def release(self) -> None:
        """Remove the record and drop the liveness lock (idempotent).  Call after deleting the
        owner's entries; entries left behind become reclaimable as soon as the lock is dropped
        (for an ephemeral owner, the record is what makes them findable, so a leftover entry without
        record is no longer attributed to anyone — delete entries first)."""
        if self._lock_fd is None:
            return
        folder = owners_dir(self.store_path)
        for name in (f"{self.owner_id}.json", f"{self.owner_id}.lock"):
            try:
                os.unlink(folder / name)
            except FileNotFoundError:
                pass
        os.close(self._lock_fd)
        self._lock_fd = None

    def __enter__(self) -> "Owner":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:  # a forgotten handle must not keep the owner "alive" forever
        if getattr(self, "_lock_fd", None) is not None:
            try:
                os.close(self._lock_fd)  # type: ignore[arg-type]
            except OSError:
                pass

    def __repr__(self) -> str:
        return f"Owner({self.owner_id!r}, prefix={self.record.prefix!r}, released={self.released})"


def register(
    store_path: str | os.PathLike[str],
    owner_id: str | None = None,
    *,
    prefix: tuple[str | int, ...] | None = None,
    ephemeral: bool = True,
) -> Owner:
    """Record a new owner of entries in the store at ``store_path`` and take its liveness lock.

    ``owner_id`` defaults to a fresh random id; ``prefix`` (default ``(owner_id,)``) is the key
    prefix of its entries.  The lock is taken *before* the record is visible, so a concurrent
    :func:`reclaim` never sees a live owner as dead.  Register once the store exists (open its
    ``Cache`` first): a folder holding nothing but ``owners/`` is not a store.  Raises ``ValueError`` for a bad id or prefix,
    ``FileExistsError`` if the id is registered already.
    """
    owner_id = owner_id if owner_id is not None else uuid.uuid4().hex
    if not isinstance(owner_id, str) or not _ID.fullmatch(owner_id):
        raise ValueError(f"owner id must be 1-64 letters, digits (not starting with '.'), '_', '-' or '.', got {owner_id!r}")
    prefix = _check_prefix(prefix if prefix is not None else (owner_id,))
    folder = owners_dir(store_path)
    folder.mkdir(parents=True, exist_ok=True)
    lock_path = folder / f"{owner_id}.lock"
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise FileExistsError(f"owner {owner_id!r} is already registered and alive in {store_path}") from None
            raise
        try:  # a reclaim may have removed the (record-less, hence stale-looking) file before we locked it
            same = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        record = OwnerRecord(owner_id, prefix, os.getpid(), socket.gethostname(), time.time(), ephemeral)
        _write_atomic(folder / f"{owner_id}.json", json.dumps(record.to_json()).encode())
    except BaseException:
        os.close(fd)
        raise
    return Owner(Path(store_path), record, fd)


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


@dataclass(frozen=True)
class OwnerStatus:
    """An owner record as found on disk; ``record`` is ``None`` when the file was unreadable (then
    ``problem`` says why)."""

    owner_id: str
    alive: bool
    record: OwnerRecord | None
    problem: str | None = None


_NO_LOCK_FILE = -1  # _try_lock's answer for a missing lock file: the owner is dead (it locks before recording)


def _try_lock(lock_path: Path) -> int | None:
    """``None`` if the owner is alive (its lock is held); else the descriptor of ``lock_path``, now
    locked by us, or ``_NO_LOCK_FILE`` when there is no lock file."""
    try:
        fd = os.open(lock_path, os.O_RDWR)
    except FileNotFoundError:
        return _NO_LOCK_FILE
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
            return None
        raise
    return fd


def list_owners(store_path: str | os.PathLike[str]) -> list[OwnerStatus]:
    """Every owner record in the store, with whether its owner is alive (sorted by id)."""
    folder = owners_dir(store_path)
    if not folder.is_dir():
        return []
    out = []
    for path in sorted(folder.glob("*.json")):
        owner_id = path.stem
        record, problem = None, None
        try:
            record = OwnerRecord.from_json(json.loads(path.read_bytes()))
        except (OSError, ValueError) as exc:
            problem = str(exc)
        fd = _try_lock(folder / f"{owner_id}.lock")
        _close(fd)
        out.append(OwnerStatus(owner_id, fd is None, record, problem))
    return out


def is_alive(store_path: str | os.PathLike[str], owner_id: str) -> bool:
    """Whether ``owner_id`` is registered in the store and still holds its liveness lock."""
    fd = _try_lock(owners_dir(store_path) / f"{owner_id}.lock")
    _close(fd)
    return fd is None


def _close(fd: int | None) -> None:
    if fd is not None and fd != _NO_LOCK_FILE:
        os.close(fd)


@dataclass
class ReclaimReport:
    """What :func:`reclaim` removed.  ``bytes_freed`` is the tier budget released (slot sizes, as in
    ``stats()["tiers"][...]["used_bytes"]``)."""

    owners: list[str] = field(default_factory=list)
    entries: int = 0
    bytes_freed: int = 0
    kept_alive: int = 0  # records of live owners left alone
    kept_persistent: int = 0  # records of dead non-ephemeral owners left alone
    problems: list[str] = field(default_factory=list)


def _used_bytes(cache: Any) -> int:
    return sum(int(t.get("used_bytes", 0)) for t in cache.stats()["tiers"].values())


def reclaim(cache: Any, store_path: str | os.PathLike[str]) -> ReclaimReport:
    """Delete the entries and records of every dead ephemeral owner of the store at ``store_path``,
    whose ``tiercache.Cache`` is ``cache`` (open).  Live owners and non-ephemeral owners are never
    touched.  A record that cannot be parsed is left in place and reported in ``problems``.  Stale
    lock files without a record (an owner that died while releasing) are removed."""
    report = ReclaimReport()
    folder = owners_dir(store_path)
    if not folder.is_dir():
        return report
    dead: list[tuple[OwnerRecord, int]] = []
    try:
        for path in sorted(folder.glob("*.json")):
            try:
                record = OwnerRecord.from_json(json.loads(path.read_bytes()))
            except (OSError, ValueError) as exc:
                report.problems.append(f"{path.name}: {exc}")
                continue
            if record.owner_id != path.stem:
                report.problems.append(f"{path.name}: names owner {record.owner_id!r}")
                continue
            fd = _try_lock(folder / f"{record.owner_id}.lock")
            if fd is None:
                report.kept_alive += 1
            elif not record.ephemeral:
                _close(fd)
                report.kept_persistent += 1
            else:
                dead.append((record, fd))
        if dead:
            before = _used_bytes(cache)
            for key in cache.keys():
                for record, _ in dead:
                    if record.owns(key):
                        report.entries += bool(cache.delete(key))
                        break
            report.bytes_freed = max(0, before - _used_bytes(cache))
        for record, fd in dead:  # entries first, then the record: a crash in between only repeats work
            for name in (f"{record.owner_id}.json", f"{record.owner_id}.lock"):
                try:
                    os.unlink(folder / name)
                except FileNotFoundError:
                    pass
            report.owners.append(record.owner_id)
    finally:
        for _, fd in dead:
            _close(fd)
    for lock in folder.glob("*.lock"):  # leftovers of owners that died between unlinking json and lock
        if (folder / f"{lock.stem}.json").exists():
            continue
        fd = _try_lock(lock)
        if fd is not None and fd != _NO_LOCK_FILE:
            try:
                if not (folder / f"{lock.stem}.json").exists():
                    lock.unlink(missing_ok=True)
            finally:
                os.close(fd)
    return report
