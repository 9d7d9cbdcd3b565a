"""Exceptions raised by tiercache.  All derive from :class:`TierCacheError` or a builtin that names the
problem (``KeyError`` for absent keys, ``ValueError``/``TypeError`` for bad input)."""

from __future__ import annotations


class TierCacheError(Exception):
    """Base class of tiercache's own errors."""


class CacheClosedError(TierCacheError, RuntimeError):
    """An operation was attempted on a closed :class:`tiercache.Cache`."""


class CacheLockedError(TierCacheError, RuntimeError):
    """Another process (or another open Cache in this process) holds the persisted cache at ``path``."""


class FingerprintMismatchError(TierCacheError, ValueError):
    """A persisted cache was produced under a different fingerprint (weights/layout); it is never served."""


class CorruptEntryError(TierCacheError):
    """A stored entry failed verification (checksum, size or header).  Internal: the facade reports
    corrupted entries as missing (``KeyError``) and counts them in ``stats()['corruptions']``."""


class TierIOError(TierCacheError, OSError):
    """Writing to a tier failed (for example the disk filled up: ``errno`` is then ``ENOSPC``).  The
    operation that raised it changed nothing: entries accepted before are still readable."""

    def __init__(self, message: str, errno_: int | None = None) -> None:
        super().__init__(errno_, message) if errno_ is not None else super().__init__(message)
        self.message = message

    def __str__(self) -> str:  # OSError's (errno, msg) formatting hides our message otherwise
        return self.message


class OverBudgetError(TierCacheError, ValueError):
    """A persistent tier was reopened with a budget smaller than the bytes it already holds.  Nothing was
    changed or deleted: reopen with a budget of at least ``stored`` bytes (then delete entries to shrink
    it).  A budget never costs stored data."""

    def __init__(self, message: str, stored: int, budget: int) -> None:
        super().__init__(message)
        self.stored, self.budget = stored, budget

