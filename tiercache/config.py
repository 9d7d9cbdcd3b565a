"""Typed configuration for :class:`tiercache.Cache`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Hashable

import torch

from .policies import Policy


@dataclass
class CacheConfig:
    """Everything a :class:`tiercache.Cache` is built from.

    Capacities are bytes (``int``) or strings like ``"512MiB"``; ``0``/``None`` disables a tier.
    ``path`` is the disk tier's directory (required when ``disk`` is set).  ``policy`` is ``"lru"``,
    ``"lfu"``, ``"score"`` or a :class:`tiercache.Policy`.  ``compression`` is ``None`` or ``"zstd"`` for
    the disk tier.  ``fingerprint`` is recorded in a new store and must match when reopening one.
    ``on_evict(key, reason)`` is called (outside the cache lock) whenever an entry is dropped rather than
    demoted: ``reason`` is ``"capacity"``, ``"corrupt"``, ``"flush"`` (``Cache.flush``) or ``"close"``.  ``io_threads`` sizes the pool
    that runs ``prefetch`` (and the disk tier's batched reads).  ``direct_io`` makes the disk tier read and
    write with ``O_DIRECT``, past the OS page cache (falls back to buffered I/O with a ``RuntimeWarning``
    where the filesystem refuses it, e.g. tmpfs; ``stats()["tiers"]["disk"]["direct_io"]`` says which);
    it must be a ``bool``.  ``gpu_device`` is the GPU tier's device (a string such as ``"cuda:1"`` or a
    ``torch.device``); it is used only when ``gpu`` has a capacity.
    """

    gpu: int | str | None = None
    host: int | str | None = "256MiB"
    disk: int | str | None = None
    path: str | os.PathLike[str] | None = None
    policy: str | Policy = "lru"
    compression: str | None = None
    fingerprint: str | None = None
    on_evict: Callable[[Hashable, str], None] | None = None
    io_threads: int = 4
    gpu_device: str | torch.device = "cuda"
    direct_io: bool = False
