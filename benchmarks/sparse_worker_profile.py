"""Where attention-aware's end-of-step worker spends its time, per decode step (CPU, SmolLM2, cold disk).

    python benchmarks/sparse_worker_profile.py --context 8192 --batch 4 --steps 8 --prefill-cache DIR

Builds one attention-aware cache (25 % budget, host tier 25 % of the KV, disk O_DIRECT; the harness of
``sparse_speed.py``), decodes ``--warmup`` then ``--steps`` steps at 1 torch thread, fencing the pipeline
after each (so every step's worker job is counted), and prints per step the wall and *thread CPU* time
(``time.thread_time``: steadier than wall time on a loaded machine, and about the time the worker holds a
core and mostly the GIL) of the worker's parts, measured only on the worker thread
(``tiercache-kv-after-step``): the whole job, the score flush (``update_scores``), the promotion
threshold, the staging choice and the staging jobs' submission.  Nested parts are counted inside their
callers too.  Also the forward thread's staged copies into pool slots (``torch._foreach_copy_`` of more
than the tail's two tensors): calls, ms, entries and MiB per step.  Parts a revision lacks are skipped,
so the same script compares revisions (run it with each revision first on ``PYTHONPATH``).
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import torch_threads  # noqa: E402
from sparse_variants import prefilled_point, variant_parser  # noqa: E402
import sparse_speed as sp  # noqa: E402
from tiercache_llm.hf_kwargs import cache_kwargs  # noqa: E402
from tiercache_llm import store as store_module  # noqa: E402
from tiercache_llm.sparse import pipeline as pipeline_module  # noqa: E402

PARTS = ("_after_step_job", "_stage_ahead_all", "_stage_choice", "_stage_ahead", "near_misses", "_stage_blocks",
         "promotion_threshold", "_threshold")
TIMES: dict[str, list[float]] = {}  # part -> [wall, cpu] seconds on the worker thread
COPIES = [0, 0.0, 0, 0]  # staged-copy calls, seconds, entries, bytes on the forward thread


def timed(cls: type, name: str) -> None:
    original = getattr(cls, name)

    def wrapper(*args, **kwargs):
        if not threading.current_thread().name.startswith("tiercache-kv-after-step"):
            return original(*args, **kwargs)
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            return original(*args, **kwargs)
        finally:
            got = TIMES.setdefault(name, [0.0, 0.0])
            got[0] += time.perf_counter() - wall
            got[1] += time.thread_time() - cpu

    setattr(cls, name, wrapper)


def count_copies() -> None:
    original = torch._foreach_copy_

    def wrapper(dst, src, *args, **kwargs):
        if threading.current_thread() is not threading.main_thread() or len(dst) <= 2:  # 2: the tail block
            return original(dst, src, *args, **kwargs)
        start = time.perf_counter()
        try:
            return original(dst, src, *args, **kwargs)
        finally:
            COPIES[0] += 1
            COPIES[1] += time.perf_counter() - start
            COPIES[2] += len(dst)
            COPIES[3] += sum(d.nbytes for d in dst)

    torch._foreach_copy_ = wrapper


def main() -> None:
    p = variant_parser(__doc__.split("\n\n")[0], context=8192)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args()
    for name in PARTS:
        if hasattr(pipeline_module.DecodePipeline, name):
            timed(pipeline_module.DecodePipeline, name)
    timed(store_module.BlockStore, "update_scores")
    timed(store_module.BlockStore, "tiers_of")
    count_copies()
    model, ids, context, kv = prefilled_point(args, args.steps + args.warmup)
    work = Path(tempfile.mkdtemp(prefix="worker-profile-", dir=args.workdir))
    cache = sp.build_cache(model, sp.Config("attention-aware", args.budget, "cold"), kv,
                           sp.Settings(host_fraction=0.25, block_size=args.block_size), work / "cache")
    pipe = cache._pipeline
    feed = ids[:, context - 1:context]
    try:
        with torch.no_grad(), torch_threads(1):
            for step in range(args.warmup + args.steps):
                if step == args.warmup:
                    TIMES.clear()
                    COPIES[:] = [0, 0.0, 0, 0]
                feed = model(input_ids=feed, **cache_kwargs(cache, model)).logits[:, -1].argmax(-1, keepdim=True)
                pipe.fence()
    finally:
        cache.close()
        shutil.rmtree(work, ignore_errors=True)
    n = args.steps
    print(f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}; per step, worker thread:")
    for name, (wall, cpu) in sorted(TIMES.items(), key=lambda item: -item[1][1]):
        print(f"  {name:22s} wall {1000 * wall / n:7.2f} ms  cpu {1000 * cpu / n:7.2f} ms")
    print(f"staged copies (forward thread): {COPIES[0] / n:.1f} calls, {1000 * COPIES[1] / n:.2f} ms, "
          f"{COPIES[2] / n:.0f} entries, {COPIES[3] / n / 2**20:.1f} MiB per step")


if __name__ == "__main__":
    main()
