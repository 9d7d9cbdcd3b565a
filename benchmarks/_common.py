"""Helpers shared by the CPU benchmarks (``storage.py``, ``hotpath.py``, ``sparse_accuracy.py``, ``sparse_speed.py``).

Nothing here times anything itself: it builds inputs, controls the page cache and the torch thread
count, and describes the machine, so every benchmark states the same facts the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

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


def read_files(paths: Sequence[Path], size: int, *, keep: bool = True) -> list[torch.Tensor]:
    """The plainest read of whole files: open, ``readinto`` a fresh tensor, close — one file at a time.
    Returns the tensors; with ``keep=False`` none (each is dropped at once, as a loop of ``get`` drops
    each result, so fresh memory is reused rather than faulted in)."""
    out = []
    for path in paths:
        buf = torch.empty(size, dtype=torch.uint8)
        with open(path, "rb", buffering=0) as f:
            f.readinto(memoryview(buf.numpy()))
        if keep:
            out.append(buf)
    return out


def disk_floor_reads(directory: Path, raw_paths: Sequence[Path], size: int) -> tuple[dict[str, Any], Any]:
    """The floor of a verified read of the disk tier's format, for hot-path row 5: each step reads, once
    each, ``len(raw_paths)`` files of its chunk size for a ``size``-byte payload (a 4 KiB header page, the
    payload, padding, a crc32c; written under ``directory``) with one ``preadv`` (the header page and the
    tail into reused buffers, the payload into a fresh tensor, dropped at once): ``chunk_open`` opens and
    closes each and checksums all of it (the raw baseline's steps plus what the format adds);
    ``chunk_held`` does the same on descriptors held open, as the tier's descriptor cache does (the least
    a verified get of the format costs from Python); ``chunk_held_nocrc`` without the checksum;
    ``raw_held`` reads ``raw_paths`` (files of ``size`` bytes) on held descriptors.  Returns the steps
    and a function that closes the descriptors and removes ``directory``."""
    from crc32c import crc32c  # the disk tier's checksum package
    from tiercache.tiers.disk_format import CRC_BYTES, HEADER_BYTES, PAGE, class_pages

    chunk_bytes = class_pages(size) * PAGE + CRC_BYTES
    paths = write_files(directory, len(raw_paths), chunk_bytes)
    held = [os.open(path, os.O_RDONLY) for path in paths]
    raw_held = [os.open(path, os.O_RDONLY) for path in raw_paths]
    head, tail = bytearray(HEADER_BYTES), bytearray(chunk_bytes - HEADER_BYTES - size)
    tail_crc = memoryview(tail)[:-CRC_BYTES]

    def chunk(fd: int, check: bool) -> None:
        buf = torch.empty(size, dtype=torch.uint8)
        payload = memoryview(buf.numpy())
        os.preadv(fd, [head, payload, tail], 0)
        if check:
            crc32c(tail_crc, crc32c(payload, crc32c(head, 0, 0), 0), 0)

    def chunk_open() -> None:
        for path in paths:
            fd = os.open(path, os.O_RDONLY)
            try:
                chunk(fd, True)
            finally:
                os.close(fd)

    def raw() -> None:
        for fd in raw_held:
            buf = torch.empty(size, dtype=torch.uint8)
            os.preadv(fd, [memoryview(buf.numpy())], 0)

    def close() -> None:
        for fd in held + raw_held:
            os.close(fd)
        shutil.rmtree(directory, ignore_errors=True)

    steps = {"chunk_open": chunk_open, "chunk_held": lambda: [chunk(fd, True) for fd in held],
             "chunk_held_nocrc": lambda: [chunk(fd, False) for fd in held], "raw_held": raw}
    return steps, close


def load_tree(name: str, root: Path) -> Any:
    """``root``'s ``tiercache`` package imported as ``name`` (its relative imports resolve inside it), for
    A/Bs of several trees in one process; a tree loaded under that name before is dropped first."""
    for stale in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[stale]
    spec = importlib.util.spec_from_file_location(name, root / "tiercache" / "__init__.py",
                                                  submodule_search_locations=[str(root / "tiercache")])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def host_ops(tc: Any, values: list[torch.Tensor], outs: list[torch.Tensor],
             timed: Callable[[Callable[[], object], int], Any]) -> dict[str, Any]:
    """Rows 3 and 4 of ``hotpath.py`` as it times them, each op timed by ``timed(fn, len(values))``: for a
    tiercache module ``tc``, in a fresh host-only cache a ``put`` loop then a ``get`` loop (each result
    dropped at once), then in a second fresh cache one ``put_many`` and one ``get_many`` into ``outs``; for
    ``tc=None`` the dict baseline: ``clone`` put (also put_many's), ``clone`` get (dropped), ``copy_`` into
    ``outs`` (get_many's; ``hotpath.host_vs_dict``)."""
    count = len(values)
    keys = list(range(count))
    if tc is None:
        store: dict[int, torch.Tensor] = {}

        def dict_put() -> None:
            for i, v in enumerate(values):
                store[i] = v.clone()

        def dict_get() -> None:
            for i in keys:
                store[i].clone()

        def dict_copy() -> None:
            for i, out in enumerate(outs):
                out.copy_(store[i])
        put = timed(dict_put, count)
        return {"put": put, "get": timed(dict_get, count), "put_many": put, "get_many": timed(dict_copy, count)}
    capacity = 2 * sum(v.nbytes for v in values) + 16 * MiB
    result = {}
    with tc.Cache(host=capacity, disk=None) as cache:
        def put_each() -> None:
            for i, v in enumerate(values):
                cache.put(i, v)

        def get_each() -> None:
            for i in keys:
                cache.get(i)
        result["put"] = timed(put_each, count)
        result["get"] = timed(get_each, count)
    with tc.Cache(host=capacity, disk=None) as cache:
        result["put_many"] = timed(lambda: cache.put_many(zip(keys, values)), count)
        result["get_many"] = timed(lambda: cache.get_many(keys, out=outs), count)
    return result


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


def memory_status() -> dict[str, int]:
    """This process's memory from ``/proc/self/status``, in bytes: ``rss`` (VmRSS), ``peak_rss`` (VmHWM,
    since the start or the last :func:`reset_peak_rss`), ``anon`` (RssAnon), ``file`` (RssFile: mapped
    file pages, which the kernel can drop) and ``shmem`` (RssShmem); ``{}`` where the file is missing."""
    names = {"VmRSS": "rss", "VmHWM": "peak_rss", "RssAnon": "anon", "RssFile": "file", "RssShmem": "shmem"}
    out: dict[str, int] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in names and rest.split():
                    out[names[key]] = int(rest.split()[0]) * KiB
    except OSError:
        pass
    return out


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (``/proc/self/clear_refs`` ← 5, Linux >= 4.0), so
    :func:`memory_status`'s ``peak_rss`` covers what follows (``ru_maxrss`` is reset with it: read both
    first to keep the peak so far); ``False`` where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def release_memory() -> None:
    """Collect garbage and hand the C heap's free pages back to the kernel (glibc ``malloc_trim(0)``;
    nothing where the C library has no such call), so memory freed by one run does not stay resident
    into the next."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def max_rss_bytes() -> int:
    """The largest RSS of this process (``getrusage(RUSAGE_SELF).ru_maxrss``); on Linux it reads the same
    high-water mark as VmHWM, so :func:`reset_peak_rss` lowers it too."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * KiB


def has_field(cls: type, name: str) -> bool:
    """Whether dataclass ``cls`` has a field ``name`` (feature detection across versions)."""
    return dataclasses.is_dataclass(cls) and any(f.name == name for f in dataclasses.fields(cls))


# -- models, tiered caches and their stats (sparse_accuracy.py, sparse_speed.py) ---------------------------
class SparseUnavailable(RuntimeError):
    """The installed ``tiercache_llm`` has no sparse mode (no ``TieredKVCache.for_model``, or it
    refuses ``mode="sparse"``).  Benchmarks mark such rows "sparse mode not available"; they never
    substitute another mode's figures."""


SPARSE_UNAVAILABLE = "sparse mode not available"


def tiny_llama(vocab: int = 128, layers: int = 2, seed: int = 0) -> Any:
    """A random 2-layer Llama (GQA: 4 query heads, 2 KV heads, head dim 16) for smoke tests."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16384,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return AutoModelForCausalLM.from_config(config).eval()


def load_bench_model(name: str) -> tuple[Any, Any]:
    """``(model, tokenizer_or_None)``: ``"smollm2"`` (SmolLM2-135M-Instruct, float32, CPU) or ``"tiny"``
    (:func:`tiny_llama`, no tokenizer)."""
    if name == "smollm2":
        from tiercache_llm.models import load_smollm2

        return load_smollm2()
    if name == "tiny":
        return tiny_llama(), None
    raise ValueError(f"unknown model {name!r}: use 'smollm2' or 'tiny'")


def kv_cache_bytes(config: Any, tokens: int, batch: int = 1, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of a full K/V cache: layers × 2 (K and V) × KV heads × head dim × dtype size × tokens × batch."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    itemsize = torch.empty((), dtype=dtype).element_size()
    return text.num_hidden_layers * 2 * heads * head_dim * itemsize * tokens * batch


def sparse_available() -> tuple[bool, str]:
    """``(True, "")`` when ``TieredKVCache.for_model`` exists (sparse mode may still refuse at
    construction: :func:`make_tiered` raises :class:`SparseUnavailable` then), else ``(False, why)``."""
    from tiercache_llm import TieredKVCache

    if not hasattr(TieredKVCache, "for_model"):
        return False, f"{SPARSE_UNAVAILABLE}: the installed tiercache_llm has no TieredKVCache.for_model"
    return True, ""


def make_tiered(model: Any, mode: str, **options: Any) -> Any:
    """A ``TieredKVCache`` for ``model`` in ``mode`` (``"exact"`` or ``"sparse"``).

    Uses ``TieredKVCache.for_model(model, mode=..., **options)`` where it exists (it prepares the
    model for the mode); without it exact mode is built with ``TieredKVCache(model.config, **options)``
    and sparse mode raises :class:`SparseUnavailable`, as it does when the cache refuses
    ``mode="sparse"`` (``NotImplementedError``, or a ``TypeError``/``ValueError`` about the mode).
    Other errors (bad options) propagate."""
    from tiercache_llm import TieredKVCache

    if hasattr(TieredKVCache, "for_model"):
        try:
            return TieredKVCache.for_model(model, mode=mode, **options)
        except NotImplementedError as exc:
            if mode == "sparse":
                raise SparseUnavailable(f"{SPARSE_UNAVAILABLE}: {exc}") from exc
            raise
    if mode == "exact":
        return TieredKVCache(model.config, **options)
    available, why = sparse_available()
    raise SparseUnavailable(why)


class MappedKV:
    """Per-layer ``(keys, values)`` tensors kept in one file and mapped back on demand, so a benchmark can
    hold a prompt's K/V without holding it in anonymous memory.

    :meth:`write` streams the layers to ``path`` (one layer in memory at a time when given a generator);
    :meth:`load` maps every tensor copy-on-write (``numpy.memmap`` mode ``"c"``): pages come from the page
    cache as they are read and the kernel may drop them again, writes to a loaded tensor stay private
    (the file never changes), and each tensor's mapping is released when the tensor is freed.  Only the
    tensors' bytes are stored; shapes and dtypes live in the object."""

    def __init__(self, path: Path, specs: list[tuple[tuple[int, ...], torch.dtype, int]]) -> None:
        self.path, self.specs = Path(path), specs  # per tensor (K0, V0, K1, ...): shape, dtype, offset

    @classmethod
    def write(cls, path: str | os.PathLike[str], layers: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> "MappedKV":
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        specs: list[tuple[tuple[int, ...], torch.dtype, int]] = []
        offset = 0
        with open(path, "wb") as f:
            for pair in layers:
                for t in pair:
                    flat = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
                    f.write(memoryview(flat.numpy()))
                    specs.append((tuple(t.shape), t.dtype, offset))
                    offset += flat.numel()
        return cls(path, specs)

    @staticmethod
    def _bytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
        return math.prod(shape) * dtype.itemsize

    @property
    def nbytes(self) -> int:
        return sum(self._bytes(shape, dtype) for shape, dtype, _ in self.specs)

    def load(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every layer's ``(keys, values)``, mapped copy-on-write from the file (see the class)."""
        import numpy as np

        tensors = []
        for shape, dtype, offset in self.specs:
            n = self._bytes(shape, dtype)
            if n == 0:
                tensors.append(torch.empty(shape, dtype=dtype))
                continue
            raw = torch.from_numpy(np.memmap(self.path, dtype=np.uint8, mode="c", offset=offset, shape=(n,)))
            tensors.append(raw.view(dtype).view(shape))
        return [(tensors[i], tensors[i + 1]) for i in range(0, len(tensors), 2)]

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def find_numbers(stats: Any, *fragments: str, prefix: str = "") -> dict[str, float]:
    """Every number in the nested dict ``stats`` whose dotted path contains one of ``fragments``
    (case-insensitive), e.g. ``find_numbers(cache.stats(), "reuse")`` → ``{"sparse.reuse_rate": 0.8}``.
    Used to read figures whose exact key names a benchmark cannot rely on."""
    out: dict[str, float] = {}
    if isinstance(stats, dict):
        for key, value in stats.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            if isinstance(value, dict):
                out.update(find_numbers(value, *fragments, prefix=path))
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                if any(f.lower() in path.lower() for f in fragments):
                    out[path] = float(value)
    return out


def tier_row(stats: dict[str, Any], kind: str) -> dict[str, Any]:
    """The per-tier row of ``kind`` ("gpu" / "host" / "disk") in a ``TieredKVCache.stats()`` (its
    ``tiercache`` part) or a ``tiercache.Cache.stats()``, or ``{}``."""
    tiers = stats.get("tiercache", stats).get("tiers", {})
    if kind in tiers:
        return tiers[kind]
    return next((row for name, row in tiers.items() if kind in name), {})


def stats_delta(before: Any, after: Any) -> Any:
    """``after - before`` for every number of two nested stats dicts (missing in ``before``: taken
    as 0); non-numbers are taken from ``after``."""
    if isinstance(after, dict):
        base = before if isinstance(before, dict) else {}
        return {k: stats_delta(base.get(k), v) for k, v in after.items()}
    if isinstance(after, (int, float)) and not isinstance(after, bool):
        return after - before if isinstance(before, (int, float)) and not isinstance(before, bool) else after
    return after


def reuse_rate(stats: dict[str, Any]) -> float | None:
    """The cache's own overall reuse rate (selected blocks already in the fastest tier / selected blocks)
    read defensively from ``stats()``: a number under a key containing ``reuse``, preferring one named
    ``reuse_rate``, then one under a ``total`` section, and not a ``last_step`` one; else ``None``."""
    found = find_numbers(stats, "reuse")
    ranked = sorted(found, key=lambda p: (not p.endswith("reuse_rate"), "total" not in p, "last" in p))
    return found[ranked[0]] if ranked else None


def parse_ints(text: str, name: str) -> tuple[int, ...]:
    """A command-line list of positive integers (``"1,2,6"``); ``argparse.ArgumentTypeError`` naming
    ``name`` otherwise."""
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name} must be comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{name} must be positive integers, got {text!r}")
    return values


class DecodeBeside:
    """A model decoding on a thread of its own while started: one-token forward passes of ``ids``' last token
    over ``cache`` (a transformers ``Cache``, e.g. of the tokens before it), back to back, the new token cropped
    off again after each, so every pass decodes at the same context.  :meth:`start` returns once a forward pass
    has begun; :meth:`stop` once the current one has ended, so whatever runs between them runs beside the model
    throughout.  The passes run at the process's torch thread count (``torch.set_num_threads`` is process-wide:
    the caller's).  :meth:`close` ends the thread; a forward pass that raises stops the loop and :meth:`start`
    or :meth:`stop` re-raises its error (``RuntimeError``) instead of waiting forever.  ``passes`` counts the
    forward passes run so far."""

    def __init__(self, model: Any, ids: torch.Tensor, cache: Any, *, name: str = "decode-beside") -> None:
        import threading

        from tiercache_llm.hf_kwargs import cache_kwargs

        self.model, self.ids, self.cache = model, ids, cache
        self._kwargs = cache_kwargs(cache, model)
        self.passes = 0
        self.error: BaseException | None = None
        self._on, self._started, self._idle = threading.Event(), threading.Event(), threading.Event()
        self._idle.set()
        self._lock = threading.Lock()  # orders the loop's "start a pass" against stop(): no pass slips past it
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        with torch.no_grad():  # grad mode is per thread
            while True:
                self._on.wait()
                with self._lock:
                    if self._stop:
                        return
                    if not self._on.is_set():  # stopped between the wait and the lock
                        continue
                    self._idle.clear()
                self._started.set()
                try:
                    self.model(input_ids=self.ids[:, -1:], **self._kwargs, use_cache=True)
                    self.cache.crop(-1)
                except BaseException as exc:  # reported by start/stop; the loop ends
                    self.error = exc
                    self._started.set()
                    self._idle.set()
                    return
                self.passes += 1
                self._idle.set()

    def _raise(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"the decode loop beside failed: {self.error!r}") from self.error

    def start(self) -> None:
        self._raise()
        self._started.clear()
        self._on.set()
        self._started.wait()
        self._raise()

    def stop(self) -> None:
        with self._lock:
            self._on.clear()
        self._idle.wait()
        self._raise()

    def close(self) -> None:
        with self._lock:
            self._stop = True
            self._on.set()
        self._thread.join()

    def __enter__(self) -> "DecodeBeside":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
