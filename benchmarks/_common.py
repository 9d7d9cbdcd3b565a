"""Helpers shared by the CPU benchmarks (``storage.py``, ``hotpath.py``).

Nothing here times anything itself: it builds inputs, controls the page cache and the torch thread
count, and describes the machine, so every benchmark states the same facts the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


def drop_page_cache(root: str | os.PathLike[str], *, sync_all: bool = False) -> int:
    """Evict every file under ``root`` from the page cache, so the next read of it hits the device.

    Each file is written back first (``fdatasync``: dirty pages cannot be evicted; ``sync_all`` runs a
    whole-system ``sync`` instead) and then dropped with ``posix_fadvise(POSIX_FADV_DONTNEED)`` — no
    root rights needed, and other programs' cached files are left alone.  Directory entries and inodes
    stay cached (only ``/proc/sys/vm/drop_caches`` drops those, and that would disturb the whole
    machine).  Returns the number of files dropped.
    """
    if sync_all:
        os.sync()
    count = 0
    for dirpath, _, files in os.walk(root):
        for name in files:
            try:
                fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            except FileNotFoundError:  # removed while we walked (a store's temp file)
                continue
            try:
                if not sync_all:
                    os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
            count += 1
    return count


def write_files(directory: Path, count: int, size: int, *, seed: int = 0) -> list[Path]:
    """``count`` files of ``size`` random bytes each in ``directory`` (created); their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    paths = []
    for i in range(count):
        path = directory / f"f{i}"
        with open(path, "wb") as f:
            f.write(torch.randint(0, 256, (size,), dtype=torch.uint8, generator=gen).numpy().tobytes())
        paths.append(path)
    return paths


def read_files(paths: Sequence[Path], size: int) -> list[torch.Tensor]:
    """The plainest read of whole files: open, ``readinto`` a fresh tensor, close — one file at a time."""
    out = []
    for path in paths:
        buf = torch.empty(size, dtype=torch.uint8)
        with open(path, "rb", buffering=0) as f:
            f.readinto(memoryview(buf.numpy()))
        out.append(buf)
    return out


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)`` (torch's intra-op pool; the inter-op pool and
    tiercache's own I/O threads are untouched), restoring the previous count afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def median(values: Iterable[float]) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


def filesystem_of(path: str | os.PathLike[str]) -> str:
    """The filesystem type holding ``path`` (``ext4``, ``tmpfs``, ...) from /proc/mounts, or ``"?"``."""
    path = os.path.realpath(path)
    best, fstype = "", "?"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and (path == parts[1] or path.startswith(parts[1].rstrip("/") + "/")):
                    if len(parts[1]) >= len(best):
                        best, fstype = parts[1], parts[2]
    except OSError:
        pass
    return fstype


def git_revision() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=10, check=True).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_meta() -> dict[str, object]:
    """Machine, library versions and the defaults that shape the figures."""
    meta: dict[str, object] = {
        "machine": platform.platform(), "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
        "torch_default_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "git": git_revision(),
        "argv": sys.argv,
    }
    try:
        meta["load_average"] = os.getloadavg()
    except OSError:
        pass
    for name in ("tiercache", "tiercache_llm", "transformers", "zarr", "numpy"):
        try:
            module = __import__(name)
            meta[name] = getattr(module, "__version__", "?")
        except ImportError:
            meta[name] = None
    return meta


def has_field(cls: type, name: str) -> bool:
    """Whether dataclass ``cls`` has a field ``name`` (feature detection across versions)."""
    return dataclasses.is_dataclass(cls) and any(f.name == name for f in dataclasses.fields(cls))
