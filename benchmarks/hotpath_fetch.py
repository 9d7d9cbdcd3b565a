"""Where hot-path row 2's warm fetch time goes: one decode step's reads, part by part, beside their floors.

    python benchmarks/hotpath_fetch.py                              # SmolLM2 geometry, 1K context, 1 thread
    python benchmarks/hotpath_fetch.py --contexts 1015,2023 --threads 1,2 --repeats 15

A ``TieredKVCache`` of the model's geometry (SmolLM2-135M's config; no weights are loaded, the KV is
random) holds ``--contexts`` tokens of prefilled KV with row 2's layout: a 16 MiB host tier (``--host``)
and the rest on a disk tier, page cache warm.  Each repeat times, interleaved (the order reverses every
repeat), per decode step, for the layers whose blocks are all held in memory (``mem``) and for those that
read the disk (``disk``):

- ``ahead``: each layer's read as row 2's "fetch alone" does it at one thread: ``prefetch`` on the
  decode buffer's reader thread, then ``take`` (the layer-ahead read's round trip, one per layer);
- ``grouped``: the layers read ahead ``group`` at a time (the decode buffer's ``schedule()`` for the part's
  layer size; ``--group N``: exactly N), as
  exact decode reads the layers beyond the next one: one reader job and one ``get_many`` for each group
  (``DecodeBuffer.together``), then a ``take`` per layer;
- ``inline``: each layer's ``_read_blocks`` on this thread (one ``get_many`` per layer, no round trip);
- ``roundtrip``: an empty job through the same reader thread, once per layer (the thread handoff alone);
- ``plain``: row 2's baseline for those bytes: as many files as the part has entries on disk, each of one
  entry's size, read with open / ``readinto`` / close into buffers allocated once, plus a ``copy_`` per
  entry held in memory;
- ``plain+crc``: the plain reads plus a crc32c pass over what they read (the checksum the tier verifies);
- ``floor``: the tier's own chunk files read on held descriptors with one ``preadv`` each straight into
  the decode buffer's block slices, plus their crc32c (and the same copies): a verified read of this
  format with no bookkeeping.

With ``--calls K,...`` the disk part is also read inline with one ``get_many`` per ``K`` layers
(``calls/K``: all their entries into their own slots, ``K`` at most the decode buffer's slots): how much of
``inline`` is per call rather than per entry.

With ``--compare-setting MODULE.NAME=VALUE`` (e.g. ``tiercache.tiers.disk.PARTS_CACHE=False``) every method
of both parts is also timed, in the same interleaved loop, right after its counterpart, with that module
attribute set to ``VALUE`` (a Python literal) for the call (``METHOD@NAME=VALUE``): an A/B of one setting in
one process.

With ``--compare-readers`` each part's ``ahead``, ``grouped`` and ``roundtrip`` are also timed, in the same
interleaved loop, on ``concurrent.futures.ThreadPoolExecutor`` s in place of the decode buffer's
``Readers`` (``ahead@pool``, ``grouped@pool``, ``roundtrip@pool``: the reader threads before
``decode_buffer.LIGHT_READERS``), an A/B of the hand-off in one process.

With ``--compare-split BYTES`` each disk part's ``grouped`` and ``inline`` are also timed, in the same
interleaved loop, with the disk tier's ``MIN_BUFFERED_BYTES_PER_THREAD`` (the batch size per read thread
from which a buffered ``read_into`` spreads over its pool) set to ``BYTES`` (``grouped@BYTES``,
``inline@BYTES``): an A/B of that threshold in one process.  ``--spare N`` fixes the disk tier's idle-CPU
estimate (``spare_cpus``, from the load average) at ``N``, e.g. 1 to time the pool as on an idle machine
while other work loads it.

With ``--beside`` every method is also timed while the model (``--model``: SmolLM2's weights, or the tiny
random Llama) decodes on another thread of this process (``METHOD@beside``): one-token forward passes over a
``DynamicCache`` of the same context, back to back, as exact decode runs its forward pass beside the reads
ahead.  Both the reads and the plain baselines then share the cores, the memory bus and the GIL with a
forward pass, as row 2's "fetch per step" (during decode) does.  The loop is ``_common.DecodeBeside``, the
one hotpath.py's "fetch per step during decode vs plain reads during the same decode" times its baseline
beside (row 2's older "fetch per step" line keeps a baseline run alone).

Prints median CPU time (``time.process_time``: every thread of the process, so the reader threads count)
and wall time per step of each, with the load average.  On a loaded machine read CPU: wall time then
mostly measures waiting for a core.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DecodeBeside, MiB, parse_ints, write_files  # noqa: E402  (the benchmarks directory is not a package)


def model_config(name: str) -> Any:
    """The model's config (``smollm2``: the converted SmolLM2's, read from the model cache without its
    weights; ``tiny``: a 2-layer Llama)."""
    if name == "tiny":
        from transformers import LlamaConfig

        return LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2)
    from transformers import AutoConfig

    from tiercache_llm.models import converted_model_dir

    return AutoConfig.from_pretrained(converted_model_dir())


def build(config: Any, context: int, host: int, workdir: Path) -> Any:
    """A ``TieredKVCache`` holding ``context`` tokens of random KV per layer, then one decoded token."""
    from tiercache_llm import TieredKVCache

    heads = config.num_key_value_heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    gen = torch.Generator().manual_seed(context)
    layers = [(torch.randn(1, heads, context, dim, generator=gen), torch.randn(1, heads, context, dim, generator=gen))
              for _ in range(config.num_hidden_layers)]
    kv_bytes = sum(k.nbytes + v.nbytes for k, v in layers)
    cache = TieredKVCache(config, host=host, disk=4 * kv_bytes + 64 * MiB, path=workdir / "kv", direct_io=False)
    for i, (k, v) in enumerate(layers):
        cache.update(k, v, i)
    for i, (k, v) in enumerate(layers):  # one decode step: the cache is in its decode state
        cache.update(k[:, :, :1], v[:, :, :1], i)
    return cache


def steps(cache: Any, workdir: Path, calls: tuple[int, ...] = ()) -> tuple[dict[str, dict[str, Callable[[], None]]],
                                                                        dict[str, int]]:
    """``{part: {method: one step's reads of that part}}`` and the number of entries of each part (``calls``:
    the ``calls/K`` methods of the disk part)."""
    import crc32c

    buffer = cache.buffer
    layers = {"mem": [l for l in cache.layers if l.held_in_memory()],
              "disk": [l for l in cache.layers if not l.held_in_memory()]}

    def target(layer: Any) -> tuple[int, int, Any]:
        first, n, _ = layer._visible_blocks()
        buf = buffer.get(n * layer.block_size + layer._tail_len + 1, (layer._batch, *layer._shape_k),
                         (layer._batch, *layer._shape_v), layer.dtype, layer.device, layer.block_size,
                         buffer.slot_for(layer), joint=layer._joint)
        return first, n, buf

    def layer_bytes(layer: Any) -> int:
        first, _, _ = layer._visible_blocks()
        return sum(b.nbytes for b in layer._blocks[first:])

    def inline(group: list[Any]) -> Callable[[], None]:
        def run() -> None:
            for layer in group:
                first, n, buf = target(layer)
                layer._read_blocks(first, 0, n, buf, count=False)
        return run

    def ahead(group: list[Any]) -> Callable[[], None]:
        def run() -> None:
            for layer in group:
                if layer.prefetch():
                    _, error = buffer.take(layer)
                    if error is not None:
                        raise error
        return run

    def grouped(group: list[Any]) -> Callable[[], None]:
        size = max(1, min(buffer.schedule(layer_bytes(group[0]))[0] if group else 1, buffer.max_depth + 1))

        def run() -> None:
            for i in range(0, len(group), size):
                with buffer.together():
                    started = [layer for slot, layer in enumerate(group[i:i + size]) if layer.prefetch(slot)]
                for layer in started:
                    _, error = buffer.take(layer)
                    if error is not None:
                        raise error
        return run

    def per_call(group: list[Any], k: int) -> Callable[[], None]:
        store = group[0].store if group else None
        batches = []
        for i in range(0, len(group), k):
            keys: list = []
            outs: list = []
            for slot, layer in enumerate(group[i:i + k]):
                first, n, _ = layer._visible_blocks()
                buf = buffer.get(n * layer.block_size + layer._tail_len + 1, (layer._batch, *layer._shape_k),
                                 (layer._batch, *layer._shape_v), layer.dtype, layer.device, layer.block_size,
                                 slot, joint=layer._joint)
                keys += layer._entries_from(first)
                outs += buf.joint_blocks[:n] if layer._joint else buf.key_blocks[:n] + buf.value_blocks[:n]
            batches.append((keys, outs))

        def run() -> None:
            for keys, outs in batches:
                store.get_blocks(keys, out=outs)
        return run

    def roundtrip(group: list[Any]) -> Callable[[], None]:
        def run() -> None:
            executor = buffer._reader
            for _ in group:
                executor.submit(lambda: None).result()
        return run

    ahead(cache.layers)()  # starts the reader threads
    tcache = cache.layers[0].store.cache
    disk = next(t for t in tcache.tiers if t.name == "disk")
    entry_bytes = 4096
    counts: dict[str, int] = {}
    floor_reads: list[tuple[str, list[memoryview], int]] = []
    head, tail = memoryview(bytearray(4096)), memoryview(bytearray(8192))
    from tiercache.tiers.disk import byte_parts

    for part, group in layers.items():
        on_disk = in_memory = 0
        for layer in group:
            first, n, buf = target(layer)
            outs = buf.joint_blocks[:n] if layer._joint else buf.key_blocks[:n] + buf.value_blocks[:n]
            for key, out in zip(layer._entries_from(first), outs):
                entry = tcache._index[key]
                entry_bytes = entry.nbytes
                if tcache.tiers[entry.level] is not disk:
                    in_memory += 1
                    continue
                on_disk += 1
                floor_reads.append((os.fspath(disk.chunk_path(entry.slot)), byte_parts(out, entry.nbytes),
                                    entry.slot.ref[0] * 4096 + 4 - 4096 - entry.nbytes))
        counts[f"{part}_disk"], counts[f"{part}_mem"] = on_disk, in_memory
    fds = [os.open(path, os.O_RDONLY) for path, _, _ in floor_reads]

    def floor_disk() -> None:
        for fd, (_, parts, rest) in zip(fds, floor_reads):
            t = tail[:rest]
            os.preadv(fd, [head, *parts, t], 0)
            crc = crc32c.crc32c(head, 0, 0)
            for p in parts:
                crc = crc32c.crc32c(p, crc, 0)
            crc32c.crc32c(t[:-4], crc, 0)

    paths = write_files(workdir / "plain", len(floor_reads), entry_bytes)
    disk_out = [torch.zeros(entry_bytes, dtype=torch.uint8) for _ in paths]
    most = max(counts["mem_mem"], counts["disk_mem"])
    host_src = [torch.ones(entry_bytes // 4) for _ in range(most)]
    host_dst = [torch.zeros_like(t) for t in host_src]

    def copies(n: int) -> None:
        for dst, src in zip(host_dst[:n], host_src[:n]):
            dst.copy_(src)

    def plain(part: str, crc: bool = False, floor: bool = False) -> Callable[[], None]:
        def run() -> None:
            if part == "disk":
                if floor:
                    floor_disk()
                else:
                    for path, out in zip(paths, disk_out):
                        with open(path, "rb", buffering=0) as f:
                            f.readinto(memoryview(out.numpy()))
                    if crc:
                        for out in disk_out:
                            crc32c.crc32c(memoryview(out.numpy()), 0, 0)
            copies(counts[f"{part}_mem"])
        return run

    methods = {
        "mem": {"ahead": ahead(layers["mem"]), "grouped": grouped(layers["mem"]), "inline": inline(layers["mem"]),
                "roundtrip": roundtrip(layers["mem"]), "plain": plain("mem")},
        "disk": {"ahead": ahead(layers["disk"]), "grouped": grouped(layers["disk"]), "inline": inline(layers["disk"]),
                 "roundtrip": roundtrip(layers["disk"]), "plain": plain("disk"),
                 "plain+crc": plain("disk", crc=True), "floor": plain("disk", floor=True)},
    }
    for k in calls:
        if not 1 <= k <= buffer.max_depth + 1:
            raise ValueError(f"--calls: {k} layers per call, the decode buffer has {buffer.max_depth + 1} slots")
        methods["disk"][f"calls/{k}"] = per_call(layers["disk"], k)
    plain("disk")()  # warm the plain files
    steps.close = lambda: [os.close(fd) for fd in fds]  # type: ignore[attr-defined]
    return methods, {**counts, "layers_mem": len(layers["mem"]), "layers_disk": len(layers["disk"])}


def with_split(fn: Callable[[], None], per_thread: int) -> Callable[[], None]:
    """``fn`` run with the disk tier's ``MIN_BUFFERED_BYTES_PER_THREAD`` set to ``per_thread``."""
    from tiercache.tiers import disk

    def run() -> None:
        before = disk.MIN_BUFFERED_BYTES_PER_THREAD
        disk.MIN_BUFFERED_BYTES_PER_THREAD = per_thread
        try:
            fn()
        finally:
            disk.MIN_BUFFERED_BYTES_PER_THREAD = before
    return run


def with_setting(fn: Callable[[], None], setting: tuple[Any, str, Any]) -> Callable[[], None]:
    """``fn`` run with ``setting`` = ``(module, attribute, value)`` applied (the old value put back after it)."""
    module, name, value = setting

    def run() -> None:
        before = getattr(module, name)
        setattr(module, name, value)
        try:
            fn()
        finally:
            setattr(module, name, before)
    return run


def parse_setting(spec: str) -> tuple[Any, str, Any, str]:
    """``MODULE.NAME=VALUE`` -> ``(module, NAME, value, label)``; ``ValueError`` for anything else."""
    import ast
    import importlib

    target, sep, text = spec.partition("=")
    module_name, dot, name = target.rpartition(".")
    if not sep or not dot or not name:
        raise ValueError(f"--compare-setting wants MODULE.NAME=VALUE, got {spec!r}")
    module = importlib.import_module(module_name)
    if not hasattr(module, name):
        raise ValueError(f"--compare-setting: {module_name} has no attribute {name!r}")
    return module, name, ast.literal_eval(text), f"{name}={text}"


def with_pools(fn: Callable[[], None], buffer: Any, pools: tuple[Any, Any]) -> Callable[[], None]:
    """``fn`` run with the decode buffer's reader and copier executors replaced by ``pools``."""
    def run() -> None:
        before = buffer._reader, buffer._copier
        buffer._reader, buffer._copier = pools
        try:
            fn()
        finally:
            buffer._reader, buffer._copier = before
    return run


class Beside(DecodeBeside):
    """``--beside``'s decode loop (``_common.DecodeBeside``): ``model_name``'s model (SmolLM2's weights, or the
    tiny random Llama) decoding one token at a time over a ``DynamicCache`` of ``context`` random tokens."""

    def __init__(self, model_name: str, config: Any, context: int) -> None:
        from transformers import DynamicCache

        from tiercache_llm.hf_kwargs import cache_kwargs

        if model_name == "tiny":
            from transformers import LlamaForCausalLM

            torch.manual_seed(0)
            model = LlamaForCausalLM(config).eval()
        else:
            from tiercache_llm.models import load_smollm2

            model, _ = load_smollm2()
        gen = torch.Generator().manual_seed(context)
        ids = torch.randint(3, model.config.vocab_size, (1, context), generator=gen)
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(input_ids=ids, **cache_kwargs(cache, model), use_cache=True)
        super().__init__(model, ids, cache, name="hotpath-fetch-beside")


def with_beside(fn: Callable[[], None], beside: Beside) -> Callable[[], None]:
    """``fn`` to be timed beside ``beside``'s decode loop (started and stopped outside the timing)."""
    def run() -> None:
        fn()
    run.before, run.after = beside.start, beside.stop  # type: ignore[attr-defined]
    return run


def measure(config: Any, context: int, threads: int, host: int, repeats: int, group: int | None = None,
            compare_split: int | None = None, calls: tuple[int, ...] = (), compare_readers: bool = False,
            compare_setting: tuple[Any, str, Any, str] | None = None,
            beside: str | None = None) -> tuple[dict[tuple[str, str], tuple[float, float]], dict[str, int]]:
    """``({(part, method): (median CPU ms, median wall ms) per step}, entry and layer counts)`` for one
    context at ``threads`` torch threads (a fresh cache in a temp directory, removed after); ``beside``: a
    model name (``--model``) to also time every method beside its decode loop (``METHOD@beside``)."""
    torch.set_num_threads(threads)
    workdir = Path(tempfile.mkdtemp(prefix="tiercache-hotpath-fetch-"))
    cache = build(config, context, host, workdir)
    if group is not None:
        cache.buffer.group, cache.buffer.group_bytes = group, 0  # exactly group layers per job
    try:
        methods, counts = steps(cache, workdir, calls)
        if compare_split is not None:  # each variant timed right after its counterpart
            disk_methods = {}
            for name, fn in methods["disk"].items():
                disk_methods[name] = fn
                if name in ("grouped", "inline"):
                    disk_methods[f"{name}@{compare_split}"] = with_split(fn, compare_split)
            methods["disk"] = disk_methods
        if compare_setting is not None:  # each variant timed right after its counterpart
            for part, group in methods.items():
                both = {}
                for name, fn in group.items():
                    both[name] = fn
                    both[f"{name}@{compare_setting[3]}"] = with_setting(fn, compare_setting[:3])
                methods[part] = both
        model: Beside | None = Beside(beside, config, context) if beside is not None else None
        if model is not None:  # each variant timed right after its counterpart
            for part, group in methods.items():
                both = {}
                for name, fn in group.items():
                    both[name] = fn
                    both[f"{name}@beside"] = with_beside(fn, model)
                methods[part] = both
        pools: tuple[Any, ...] = ()
        if compare_readers:
            import concurrent.futures

            buffer = cache.buffer
            pools = (concurrent.futures.ThreadPoolExecutor(buffer.readers, thread_name_prefix="ab-kv-ahead"),
                     concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ab-kv-copy"))
            for part, group in methods.items():
                both = {}
                for name, fn in group.items():
                    both[name] = fn
                    if name in ("ahead", "grouped", "roundtrip"):
                        both[f"{name}@pool"] = with_pools(fn, buffer, pools)
                methods[part] = both
            for part in methods:  # start the pools' threads
                methods[part]["ahead@pool"]()
        try:
            flat = [(part, name, fn) for part, group in methods.items() for name, fn in group.items()]
            samples: dict[tuple[str, str], list[tuple[float, float]]] = {}
            for r in range(repeats):
                for part, name, fn in (flat if r % 2 == 0 else flat[::-1]):
                    before, after = getattr(fn, "before", None), getattr(fn, "after", None)
                    if before is not None:
                        before()
                    c0, t0 = time.process_time(), time.perf_counter()
                    fn()
                    samples.setdefault((part, name), []).append(
                        (1e3 * (time.process_time() - c0), 1e3 * (time.perf_counter() - t0)))
                    if after is not None:
                        after()
        finally:
            steps.close()  # type: ignore[attr-defined]
            if model is not None:
                model.close()
            for pool in pools:
                pool.shutdown(wait=True)
    finally:
        cache.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return {key: (statistics.median(v[0] for v in values), statistics.median(v[1] for v in values))
            for key, values in samples.items()}, counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", choices=("smollm2", "tiny"))
    parser.add_argument("--contexts", default="1015", help="tokens of prefilled KV (default 1015: row 2's 1K)")
    parser.add_argument("--threads", default="1")
    parser.add_argument("--host", type=int, default=16 * MiB, help="host tier bytes (default 16 MiB, row 2's)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--group", type=int, default=None,
                        help="layers per grouped read (default: the cache's decode buffer's, DISK_GROUP)")
    parser.add_argument("--compare-split", type=int, default=None, metavar="BYTES",
                        help="also time the disk part's grouped and inline reads with the disk tier's "
                             "MIN_BUFFERED_BYTES_PER_THREAD at BYTES (an interleaved A/B of that threshold)")
    parser.add_argument("--calls", default="", metavar="K,...",
                        help="also read the disk layers inline with one get_many per K layers (calls/K)")
    parser.add_argument("--compare-readers", action="store_true",
                        help="also time the reads ahead on ThreadPoolExecutors (@pool) in place of the decode "
                             "buffer's Readers")
    parser.add_argument("--compare-setting", default=None, metavar="MODULE.NAME=VALUE",
                        help="also time every method with that module attribute set to VALUE (a Python literal), "
                             "e.g. tiercache.tiers.disk.PARTS_CACHE=False")
    parser.add_argument("--beside", action="store_true",
                        help="also time every method while the model decodes on another thread (METHOD@beside; "
                             "CPU ms then include the model's)")
    parser.add_argument("--spare", type=int, default=None, metavar="N",
                        help="fix the disk tier's idle-CPU estimate (spare_cpus) at N")
    args = parser.parse_args(argv)
    if args.spare is not None:
        from tiercache.tiers import disk

        disk.spare_cpus = lambda: args.spare
    try:
        setting = parse_setting(args.compare_setting) if args.compare_setting else None
    except (ValueError, SyntaxError, ImportError) as exc:
        parser.error(str(exc))
    config = model_config(args.model)
    print(f"load average at the start: {os.getloadavg()}")
    for context in parse_ints(args.contexts, "--contexts"):
        for threads in parse_ints(args.threads, "--threads"):
            medians, counts = measure(config, context, threads, args.host, args.repeats, args.group, args.compare_split,
                                      tuple(parse_ints(args.calls, "--calls")) if args.calls else (),
                                      args.compare_readers, setting, args.model if args.beside else None)
            print(f"context {context}, {threads} torch thread(s): {counts['layers_mem']} layers held in memory "
                  f"({counts['mem_mem']} entries), {counts['layers_disk']} reading the disk ({counts['disk_disk']} "
                  f"entries on disk, {counts['disk_mem']} in memory); ms per step, median of {args.repeats}; "
                  f"load {os.getloadavg()[0]:.2f}")
            print("  part | method | CPU ms | wall ms")
            for (part, name), (cpu, wall) in medians.items():
                print(f"  {part} | {name} | {cpu:.3f} | {wall:.3f}")
    print(f"load average at the end: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
