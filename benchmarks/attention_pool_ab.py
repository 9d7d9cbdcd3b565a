"""Sparse decode attention over a resident pool at the model's shapes (CPU): this tree against a git revision,
and where the pool's memory state moves its time.

    python benchmarks/attention_pool_ab.py --baseline-rev 116a193            # ~1 min
    python benchmarks/attention_pool_ab.py --baseline-rev 116a193 --threads 2 --reps 5

SmolLM2's decode shapes (9 query heads on 3 KV heads, D = 64), 8K context x batch 4, a 25 % budget of 8-token
pages in 128-token blocks, float32 K/V.  Each of the ``--layers`` (30) layers has its own pool: a joint
``(N, 2, B, H, S, D)`` storage (``N`` = 72 slots; the blocks of the selection in random slots), attended through
its halves ``kv[:, 0]`` / ``kv[:, 1]`` as ``SparseLayerState.decode`` does for ``"attention-aware"`` and
``"reuse-layer-ahead"``.  Per (row, KV head) the selection is the top pages of a smoothed score that is 70 %
shared by the heads of a row (runs of pages, heads overlapping) plus the sink and recent pages, each head's page
count budget x U(0.85, 1.15); row 0 left-padded by 100 tokens, the last block half full.

1. ``ab``: per step (every layer once; a 400 MB write between steps, so every layer's pool is out of the CPU
   caches as it is in the model, where the weights and other layers pass through them) the thread CPU time of
   ``build_page_table_from_valid`` + ``page_table_attention`` + ``entry_mass_to_blocks`` with this tree's
   ``page_table.py`` and with the revision's, steps interleaved (order alternating); medians.  Also checks the
   two give bit-identical outputs, block masses and new-token masses on every layer.
2. ``residency``: this tree's call on the same selections with the K/V in four memory states, interleaved:
   ``pool`` (the resident slots as above: cold), ``arena`` (the selected blocks copied into a fresh
   ``(U, 2, B, H, S, D)`` buffer just before, as the fetch stage of ``"fetch-every-step"`` does; the copy not
   timed), ``pool_read`` (the pool read once just before, ``sum``; not timed), and ``hot`` (one layer called
   over and over: everything the call reads is in cache).  Same code, layout and strides in all four.

``--after-layout part-major``: the "after" side attends a part-major copy of each pool, ``(N, B, H, 2, S, D)``
(each (row, KV head) part K then V, the sparse layers' layout since helper parts), through its halves
``kv[:, :, :, 0]`` / ``kv[:, :, :, 1]``; the "before" side keeps ``(N, 2, B, H, S, D)``.  ``--path direct``: both
sides call ``attend_pages_cpu`` (the one-thread decode path ``SparseLayerState.decode`` takes first) instead of
the table path.

Prints a summary and writes ``attention_pool_ab.json`` under ``--out`` when given.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "kernels", ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import torch  # noqa: E402

from _common import machine_meta, torch_threads  # noqa: E402
from tiercache_llm.sparse import page_table as new_pt  # noqa: E402
from attention_micro import page_selection  # noqa: E402

HQ, H, D, S, PAGE = 9, 3, 64, 128, 8


def load_revision(rev: str):
    """``tiercache_llm/sparse/page_table.py`` of git revision ``rev`` as a module (the rest of the tree as it is)."""
    src = subprocess.run(["git", "show", f"{rev}:tiercache_llm/sparse/page_table.py"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "page_table_rev.py"
    path.write_text(src.replace("from .attention import", "from tiercache_llm.sparse.attention import")
                    .replace("    from .selection import", "    from tiercache_llm.sparse.selection import"))
    name = "tiercache_llm.sparse._page_table_rev"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def make_layers(n_layers: int, batch: int, context: int, budget: float, slots: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    k = S // PAGE
    n = -(-context // S)
    p = -(-context // PAGE)
    per_head = round(budget * context / PAGE)
    layers = []
    for _ in range(n_layers):
        shared = torch.nn.functional.avg_pool1d(torch.rand(batch, 1, p, generator=gen), 5, 1, 2)
        scores = 0.7 * shared + 0.3 * torch.rand(batch, H, p, generator=gen)
        scores[..., 0] = 2.0
        scores[..., -8:] = 2.0
        sel = page_selection(scores, per_head, n, k, gen)
        u = int(sel.fetch.numel())
        layers.append(dict(
            sel=sel, kv=torch.randn(max(slots, u), 2, batch, H, S, D, generator=gen),
            slot=torch.randperm(max(slots, u), generator=gen)[:u], q=torch.randn(batch, HQ, 1, D, generator=gen),
            kn=torch.randn(batch, H, 1, D, generator=gen), vn=torch.randn(batch, H, 1, D, generator=gen)))
    valid = torch.ones(batch, context, dtype=torch.bool)
    valid[0, :100] = False
    return layers, valid, context - S // 2


def halves(kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V views of a joint pool: ``(N, 2, B, H, S, D)`` or part-major ``(N, B, H, 2, S, D)``."""
    if kv.shape[1] == 2 and kv.shape[3] != 2:
        return kv[:, 0], kv[:, 1]
    return kv[:, :, :, 0], kv[:, :, :, 1]


def attend(mod, x: dict[str, Any], kv: torch.Tensor, slot: torch.Tensor, valid: torch.Tensor, ctx: int,
           direct: bool = False):
    kh, vh = halves(kv)
    if direct:
        res = mod.attend_pages_cpu(x["q"], kh, vh, x["sel"], slot, valid, ctx, S, x["kn"], x["vn"])
        if res is None:
            raise SystemExit("attend_pages_cpu does not apply to these inputs")
        return res.output, res.block_mass, res.new_mass
    table = mod.build_page_table_from_valid(x["sel"], slot, valid, ctx, S)
    res = mod.page_table_attention(x["q"], kh, vh, table, x["kn"], x["vn"], backend="torch")
    return res.output, mod.entry_mass_to_blocks(res.block_mass, table, int(x["sel"].fetch.numel())), res.new_mass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline-rev", required=True)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--budget", type=float, default=0.25)
    ap.add_argument("--slots", type=int, default=72)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--after-layout", choices=("joint", "part-major"), default="joint")
    ap.add_argument("--path", choices=("table", "direct"), default="table")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    direct = args.path == "direct"
    old = load_revision(args.baseline_rev)
    layers, valid, ctx = make_layers(args.layers, args.batch, args.context, args.budget, args.slots)
    for x in layers:  # the after side's pool: the same K/V in the layout asked for
        x["kv_after"] = x["kv"].permute(0, 2, 3, 1, 4, 5).contiguous() if args.after_layout == "part-major" else x["kv"]
    flush = torch.empty(100_000_000)
    result: dict[str, Any] = {"meta": machine_meta(), "args": {k: str(v) for k, v in vars(args).items()}}
    with torch_threads(args.threads):
        differ = 0
        for x in layers:
            a = attend(old, x, x["kv"], x["slot"], valid, ctx, direct)
            b = attend(new_pt, x, x["kv_after"], x["slot"], valid, ctx, direct)
            differ += sum(not torch.equal(u, v) for u, v in zip(a, b))
        result["tensors_not_bit_identical"] = differ
        ab: dict[str, list[float]] = {"before": [], "after": []}
        for rep in range(args.reps):
            for side in (("before", "after") if rep % 2 == 0 else ("after", "before")):
                mod = old if side == "before" else new_pt
                name = "kv" if side == "before" else "kv_after"
                flush.add_(1.0)
                spent = 0.0
                for x in layers:
                    t = time.thread_time()
                    attend(mod, x, x[name], x["slot"], valid, ctx, direct)
                    spent += time.thread_time() - t
                ab[side].append(spent * 1e3)
        modes = ("pool", "arena", "pool_read", "hot")
        res: dict[str, list[float]] = {m: [] for m in modes}
        for rep in range(args.reps):
            for mode in (modes if rep % 2 == 0 else modes[::-1]):
                flush.add_(1.0)
                spent = 0.0
                for i, x in enumerate(layers):
                    kv, slot = x["kv"], x["slot"]
                    if mode == "arena":
                        kv = kv.index_select(0, slot)
                        slot = torch.arange(slot.numel())
                    elif mode == "pool_read":
                        kv.sum()
                    elif mode == "hot":
                        x = layers[0]
                        kv, slot = x["kv"], x["slot"]
                        if i == 0:
                            attend(new_pt, x, kv, slot, valid, ctx)
                    t = time.thread_time()
                    attend(new_pt, x, kv, slot, valid, ctx)
                    spent += time.thread_time() - t
                res[mode].append(spent * 1e3)
    med = {k: statistics.median(v) for k, v in {**ab, **res}.items()}
    result.update(ab_ms_per_step=ab, residency_ms_per_step=res, medians_ms_per_step=med,
                  load_average=os.getloadavg())
    print(f"load {os.getloadavg()[0]:.1f}, {args.threads} torch thread(s), {args.layers} layers, "
          f"{args.context} x {args.batch}, budget {args.budget}, after layout {args.after_layout}, path {args.path}; "
          f"tensors not bit-identical: {differ}")
    print(f"ab (thread CPU ms/step, medians): before ({args.baseline_rev}) {med['before']:.1f}, "
          f"after {med['after']:.1f} ({med['before'] / med['after']:.3f}x)")
    print("residency (thread CPU ms/step, medians): " + ", ".join(f"{m} {med[m]:.1f}" for m in modes))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "attention_pool_ab.json").write_text(json.dumps(result, indent=1))
    if differ:
        raise SystemExit(f"{differ} tensors differ between the revisions")


if __name__ == "__main__":
    main()
