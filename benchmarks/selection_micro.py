"""Sparse decode scoring + selection alone (CPU): ``select`` of this tree against a git revision's.

    python benchmarks/selection_micro.py                                # 8K x batch 4, 25 %, ~1 min
    python benchmarks/selection_micro.py --batch 8 --context 4096 --budget 0.0625
    python benchmarks/selection_micro.py --baseline-rev dc6a177 --steps 30
    python benchmarks/selection_micro.py --baseline-rev HEAD --page 4     # float32 vs float16 digests
    python benchmarks/selection_micro.py --page-ab 4 --steps 10         # this tree, 8- against 4-token pages

What one decode step of ``TieredKVCache`` (sparse mode) does in ``SparseLayerState.decode`` between its
``t0`` and ``t1`` (the ``scoring_seconds`` of ``stats()``), for every layer of SmolLM2: ``select(query,
digests, config, pages_per_block=8)`` with 9 query heads on 3 KV heads of dim 64, float32 keys, 8-token
pages in 64-token storage blocks, the cache's rule (``score="bound+landmark"``, mass ranking, ``sink=4``,
``recent=64``).  Each of the ``--layers`` layers has its own digests (as in the model: one layer's
digests are long out of the CPU caches when the next step reaches it) and its own query each step;
after a step every layer's digests get one new key, so page counts change from step to step as in a
decode (what a step derives from them once is derived again).  Rows 1 and 3 are left-padded.

Timed, interleaved in one process (every step runs both implementations, in alternating order, on
digests built from the same keys), medians over steps of wall and process CPU time per step; per layer
= per step / layers.  Two yardsticks are timed beside them on the same digests: ``matmuls``, the
scoring's three float32 matmuls alone (``relu(q) hi``, ``min(q, 0) lo``, ``q mean``: what the exact
rule cannot do without), and ``stream``, one pass reading each layer's digests (a ``sum`` of the bounds
and landmarks: the memory traffic any exact scoring must do).  Process CPU time is the figure to read
on a shared machine (a wait for a core is not counted); wall time is printed beside it.
``--storage`` (default ``float16``, the cache's default) is the storage of this tree's digests; the
baseline revision's digests are built in the same storage where that revision has the option, else
in float32 (before float16 digests existed).  With the same storage on both sides, every step checks,
for every layer, that both implementations give bit-identical scores and select the same pages, heads'
blocks and fetch list; the script fails otherwise.  With float16 digests on this tree's side only, the
scores differ by the outward rounding of the bounds and the rounding of the landmarks, so the script
reports instead the fraction of the baseline's selected pages (per row, KV head and page) that this
tree selects too, and the largest score difference; it fails only if a (row, KV head) selects a
different number of pages.  The one allowed difference is
counted and printed apart: two pages of exactly equal score straddling a row's budget boundary (the
rule leaves the order of equal scores unspecified, and each implementation's ``topk`` breaks such a
tie its own way; random scores at SmolLM2's shapes tie at the boundary about once in 500 layer calls).
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "kernels", ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import torch  # noqa: E402

from tiercache_llm.sparse import digests as cur_digests  # noqa: E402
from tiercache_llm.sparse import selection as cur_selection  # noqa: E402

H, G, D, PAGE, BLOCK = 3, 3, 64, 8, 64  # SmolLM2-135M: 3 KV heads, 9 query heads, head dim 64


def load_revision(rev: str):
    """``(digests module, selection module)`` of git revision ``rev`` (its ``selection.py`` bound to its
    own ``digests.py``)."""
    tmp = Path(tempfile.mkdtemp())
    mods = []
    for name in ("digests", "selection"):
        src = subprocess.run(["git", "show", f"{rev}:tiercache_llm/sparse/{name}.py"], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout
        src = src.replace("from .digests import", "from tiercache_llm.sparse._rev_digests import")
        path = tmp / f"{name}.py"
        path.write_text(src)
        modname = f"tiercache_llm.sparse._rev_{name}"
        spec = importlib.util.spec_from_file_location(modname, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[modname] = mod
        spec.loader.exec_module(mod)
        mods.append(mod)
    return mods[0], mods[1]


def _padded_valid(b: int, t: int) -> torch.Tensor:
    """``(b, t)`` token validity with rows 1 and 3 (where present) left-padded by 100 and 333 tokens."""
    valid = torch.ones(b, t, dtype=torch.bool)
    for row, pad in ((1, 100), (3, 333)):
        if row < b:
            valid[row, :pad] = False
    return valid


def run_page_ab(args) -> int:
    """``--page-ab P``: this tree's ``select`` at ``--page`` and at ``P``-token pages, interleaved on digests
    of the same keys (the cost of a finer page: the digests and the ranking grow with the page count)."""
    torch.set_num_threads(args.threads)
    b, t = args.batch, args.context
    gen = torch.Generator().manual_seed(0)
    valid = _padded_valid(b, t)
    pages = [args.page, args.page_ab]
    storage = getattr(torch, args.storage)
    digests = {p: [] for p in pages}
    for _ in range(args.layers):
        keys = torch.randn(b, H, t, D, generator=gen)
        for p in pages:
            digests[p].append(cur_digests.KeyDigests.from_keys(keys, p, valid, storage=storage))
        del keys
    config = cur_selection.SelectionConfig(budget=args.budget, sink=4, recent=64, score="bound+landmark")
    wall = {p: [] for p in pages}
    cpu = {p: [] for p in pages}
    for step in range(args.warmup + args.steps):
        queries = [torch.randn(b, H * G, 1, D, generator=gen) for _ in range(args.layers)]
        for p in (pages if step % 2 == 0 else pages[::-1]):
            w0, c0 = time.perf_counter(), time.process_time()
            for i in range(args.layers):
                cur_selection.select(queries[i], digests[p][i], config, pages_per_block=BLOCK // p)
            w1, c1 = time.perf_counter(), time.process_time()
            if step >= args.warmup:
                wall[p].append(w1 - w0)
                cpu[p].append(c1 - c0)
        new_keys = torch.randn(b, H, 1, D, generator=gen)
        ok = torch.ones(b, 1, dtype=torch.bool)
        for p in pages:
            for dg in digests[p]:
                dg.append(new_keys, ok)
    load = os.getloadavg()
    print(f"select of this tree at SmolLM2 shapes: batch {b}, context {t}, digests in {args.storage}, budget "
          f"{args.budget}, {args.layers} layers, {args.threads} torch thread(s), {args.steps} steps (+{args.warmup} "
          f"warm-up) interleaved, medians; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"{'page':>5s} {'pages':>6s} {'MiB/layer':>10s} {'ms/step wall':>13s} {'ms/step cpu':>12s}")
    for p in pages:
        print(f"{p:5d} {digests[p][0].n_blocks:6d} {digests[p][0].nbytes / 2**20:10.1f} "
              f"{statistics.median(wall[p]) * 1e3:13.2f} {statistics.median(cpu[p]) * 1e3:12.2f}")
    return 0


def run(args) -> int:
    if args.page_ab:
        return run_page_ab(args)
    torch.set_num_threads(args.threads)
    impls = {"before": load_revision(args.baseline_rev), "after": (cur_digests, cur_selection)}
    b, t = args.batch, args.context
    gen = torch.Generator().manual_seed(0)
    valid = _padded_valid(b, t)
    digests = {name: [] for name in impls}
    # the baseline's digests in this tree's storage where that revision has the option (float32 before it)
    base_storage = args.storage if "storage" in inspect.signature(impls["before"][0].KeyDigests.from_keys).parameters \
        else "float32"
    storage = {"before": base_storage, "after": args.storage}
    for _ in range(args.layers):
        keys = torch.randn(b, H, t, D, generator=gen)
        for name, (dmod, _) in impls.items():
            kw = {"storage": getattr(torch, storage[name])} if storage[name] != "float32" else {}
            digests[name].append(dmod.KeyDigests.from_keys(keys, args.page, valid, **kw))
        del keys
    config = {name: smod.SelectionConfig(budget=args.budget, sink=4, recent=64, score="bound+landmark")
              for name, (_, smod) in impls.items()}
    names = list(impls)
    yardsticks = ["matmuls", "stream"]
    wall = {name: [] for name in names + yardsticks}
    cpu = {name: [] for name in names + yardsticks}
    mismatches = ties = scores_differ = 0
    exact = base_storage == args.storage
    same_pages = base_pages = count_differ = 0
    max_diff = 0.0
    for step in range(args.warmup + args.steps):
        queries = [torch.randn(b, H * G, 1, D, generator=gen) for _ in range(args.layers)]
        order = names if step % 2 == 0 else names[::-1]
        sels = {}
        for name in order:
            select = impls[name][1].select
            w0, c0 = time.perf_counter(), time.process_time()
            sels[name] = [select(queries[i], digests[name][i], config[name], pages_per_block=BLOCK // args.page)
                          for i in range(args.layers)]
            w1, c1 = time.perf_counter(), time.process_time()
            if step >= args.warmup:
                wall[name].append(w1 - w0)
                cpu[name].append(c1 - c0)
        for name, fn in (("matmuls", matmuls), ("stream", stream)):
            w0, c0 = time.perf_counter(), time.process_time()
            for i, dg in enumerate(digests["after"]):
                fn(queries[i], dg)
            w1, c1 = time.perf_counter(), time.process_time()
            if step >= args.warmup:
                wall[name].append(w1 - w0)
                cpu[name].append(c1 - c0)
        for i in range(args.layers):
            x, y = sels["before"][i], sels["after"][i]
            same_pages += int((x.pages & y.pages).sum())
            base_pages += int(x.pages.sum())
            count_differ += not torch.equal(x.pages.sum(-1), y.pages.sum(-1))
            fin = torch.isfinite(x.scores)
            if bool(fin.any()):
                max_diff = max(max_diff, float((x.scores[fin] - y.scores[fin]).abs().max()))
            if not exact:
                continue
            scores_differ += not torch.equal(x.scores, y.scores)
            if not (torch.equal(x.pages, y.pages) and torch.equal(x.head_mask, y.head_mask)
                    and torch.equal(x.fetch, y.fetch) and torch.equal(x.budget, y.budget)):
                if tie_only(x, y):
                    ties += 1
                else:
                    mismatches += 1
        new_keys = torch.randn(b, H, 1, D, generator=gen)
        ok = torch.ones(b, 1, dtype=torch.bool)
        for name in names:
            for dg in digests[name]:
                dg.append(new_keys, ok)
    n_pages = digests["after"][0].n_blocks
    print(f"select at SmolLM2 shapes: batch {b}, context {t} (+{args.warmup + args.steps} decoded), {n_pages} pages "
          f"of {args.page} tokens, this tree's digests in {args.storage} ({digests['after'][0].nbytes / 2**20:.1f} MiB/layer, "
          f"baseline's in {base_storage}, {digests['before'][0].nbytes / 2**20:.1f} MiB/layer), "
          f"budget {args.budget}, {args.layers} layers, {args.threads} torch thread(s); before = {args.baseline_rev}, "
          f"after = this tree; {args.steps} steps (+{args.warmup} warm-up), medians")
    print(f"{'':8s} {'ms/step wall':>13s} {'ms/layer wall':>14s} {'ms/step cpu':>12s} {'ms/layer cpu':>13s}")
    for name in names + yardsticks:
        mw, mc = statistics.median(wall[name]) * 1e3, statistics.median(cpu[name]) * 1e3
        print(f"{name:8s} {mw:13.2f} {mw / args.layers:14.3f} {mc:12.2f} {mc / args.layers:13.3f}")
    ratio = statistics.median(wall["before"]) / statistics.median(wall["after"])
    ratio_c = statistics.median(cpu["before"]) / statistics.median(cpu["after"])
    layers = (args.steps + args.warmup) * args.layers
    print(f"speed-up before/after: {ratio:.2f}x wall, {ratio_c:.2f}x cpu")
    print(f"selected pages also selected by this tree: {same_pages / max(1, base_pages):.6f} of {base_pages}; "
          f"largest score difference {max_diff:.3g}; (row, head)s selecting another number of pages in "
          f"{count_differ} layer calls")
    if not exact:
        return 1 if count_differ else 0
    print(f"layer selections: {layers}; scores not bit-identical: {scores_differ}; pages differing: "
          f"{mismatches + ties}, of which an exact score tie at the budget boundary broken the other way: {ties}")
    return 1 if mismatches or scores_differ else 0


def matmuls(query: torch.Tensor, dg) -> None:
    """The scoring's matmuls alone: float32 digests, the three of the rule (bound: ``relu(q) hi``,
    ``min(q, 0) lo``; landmark ``q mean``); float16 digests, the upcast and matmuls of ``_products16``."""
    b, hq, q, d = query.shape
    qf = query.reshape(b, H, hq // H * q, d)
    if dg.dtype != torch.float32:
        cur_selection._products16(qf, dg.buffer(), dg.n_blocks, 0.5)
        return
    lo, hi, mean = dg.transposed()
    torch.matmul(qf.clamp(min=0), hi), torch.matmul(qf.clamp(max=0), lo), torch.matmul(qf, mean)


def stream(query: torch.Tensor, dg) -> None:
    """One read of the layer's digests (bounds and landmarks, in their storage dtype, spare capacity
    included: one contiguous buffer), nothing computed."""
    dg.buffer().sum()


def tie_only(x, y) -> bool:
    """Whether selections ``x`` and ``y`` of bit-identical scores differ only by how an exact tie at the
    budget boundary was broken (the rule leaves the order of equal scores unspecified): every (row, KV
    head) takes as many pages, and the pages only one of them takes all have one and the same score."""
    if not torch.equal(x.scores, y.scores) or not torch.equal(x.pages.sum(-1), y.pages.sum(-1)):
        return False
    diff = x.pages != y.pages
    for b, h in diff.any(-1).nonzero().tolist():
        vals = x.scores[b, h][diff[b, h]]
        if not bool((vals == vals[0]).all()):
            return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--context", type=int, default=7927, help="prefilled tokens (the speed benchmark's 8K point)")
    ap.add_argument("--budget", type=lambda v: int(v) if v.isdigit() else float(v), default=0.25,
                    help="a fraction of the context (0.25) or tokens (2048)")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--baseline-rev", default="dc6a177", help="git revision of the 'before' select")
    ap.add_argument("--storage", choices=("float16", "float32"), default="float16",
                    help="this tree's digest storage (the baseline's is its own)")
    ap.add_argument("--page", type=int, default=PAGE, help="tokens per page (the cache's default: 8)")
    ap.add_argument("--page-ab", type=int, default=0, metavar="P",
                    help="instead of a revision A/B: this tree at --page against P-token pages, interleaved")
    sys.exit(run(ap.parse_args()))


if __name__ == "__main__":
    main()
