"""Typed configuration for :class:`tiercache.Cache`."""

from __future__ import annotations

import numbers
import operator
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
    ``torch.device``); it is used only when ``gpu`` has a capacity.  ``disk_sector_bytes`` (a power of
    two, at least 4096; default 64 KiB) is the disk tier's sector: each new entry records the crc32c of
    every sector of its payload, so a ranged ``get_many`` reads and verifies only the sectors it needs
    (an entry whose table would not fit its header page uses the smallest power-of-two multiple that
    fits).

    The option types are checked on construction (and again by ``Cache``, in case a field was changed
    since; :func:`check_config`): ``io_threads`` a positive integer (``bool`` refused; numpy integers are
    taken as ``int``), else ``ValueError``; ``direct_io`` a ``bool``, ``gpu_device`` a ``str`` or
    ``torch.device``, ``path`` a ``str`` or ``os.PathLike``, ``compression`` and ``fingerprint`` a ``str``
    (or ``None``), ``on_evict`` a callable (or ``None``), else ``TypeError``.  Capacities and the policy are
    checked when the ``Cache`` is built.
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
    disk_sector_bytes: int = 64 << 10

    def __post_init__(self) -> None:
        check_config(self)


def check_config(cfg: CacheConfig) -> None:
    """Check the types of ``cfg``'s options (see :class:`CacheConfig`); a numpy integer ``io_threads`` is
    replaced by the ``int``.  Capacities (``parse_size``) and the policy (``make_policy``) are checked where
    the cache uses them."""
    threads = cfg.io_threads
    if type(threads) is not int:
        if isinstance(threads, numbers.Integral) and not isinstance(threads, bool):
            cfg.io_threads = threads = operator.index(threads)
        else:
            raise ValueError(f"io_threads must be a positive int, got {type(threads).__name__} {threads!r}")
    if threads < 1:
        raise ValueError(f"io_threads must be a positive int, got {threads!r}")
    if not isinstance(cfg.direct_io, bool):  # a truthy string such as "no" must not turn O_DIRECT on
        raise TypeError(f"direct_io must be a bool, got {type(cfg.direct_io).__name__} {cfg.direct_io!r}")
    if not isinstance(cfg.gpu_device, (str, torch.device)):
        raise TypeError(f"gpu_device must be a device string such as 'cuda:1' or a torch.device, got {cfg.gpu_device!r}")
    if cfg.path is not None and not isinstance(cfg.path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or an os.PathLike (the disk tier's folder), got {type(cfg.path).__name__}")
    if cfg.compression is not None and not isinstance(cfg.compression, str):
        raise TypeError(f"compression must be None or a codec name ('zstd'), got {type(cfg.compression).__name__}")
    if cfg.fingerprint is not None and not isinstance(cfg.fingerprint, str):
        raise TypeError(f"fingerprint must be a str (e.g. a hash of the weights or layout) or None, got "
                        f"{type(cfg.fingerprint).__name__} {cfg.fingerprint!r}")
    sector = cfg.disk_sector_bytes
    if isinstance(sector, bool) or not isinstance(sector, numbers.Integral):
        raise TypeError(f"disk_sector_bytes must be an int, got {type(sector).__name__} {sector!r}")
    sector = cfg.disk_sector_bytes = operator.index(sector)
    if sector < 4096 or sector & (sector - 1):
        raise ValueError(f"disk_sector_bytes must be a power of two of at least 4096, got {sector}")
    if cfg.on_evict is not None and not callable(cfg.on_evict):
        raise TypeError(f"on_evict must be a callable(key, reason) or None, got {type(cfg.on_evict).__name__}")
