"""The sparse decode step's own compute, this tree against a git revision, in the model (CPU, SmolLM2).

    python benchmarks/decode_compute_ab.py --baseline-rev cebd7ec --context 8192 --batch 4 --steps 12
    python benchmarks/decode_compute_ab.py --baseline-rev cebd7ec --context 4096 --out DIR

Two sparse ``TieredKVCache`` (``--strategy``, default ``"attention-aware"``; budget 25 %, host tier 25 % of
the KV, disk the rest, as ``sparse_speed.py``) holding the same K/V (random, seeded: a timing run, no prefill)
decode the same first token side by side, steps interleaved (the order alternating), 1 torch thread.
The "before" cache runs the revision's score stage (``selection.select``, loaded against this tree's
``digests.py``) and attention (``sparse_layer.attend_selected``'s page path of the revision:
``build_page_table_from_valid`` + ``page_table_attention`` + ``entry_mass_to_blocks`` of its
``page_table.py`` and ``attention.py``); the "after" cache this tree's.  Everything else (fetch, placement,
pipeline, the model's layers) is this tree's on both sides.

First ``--verify-steps`` untimed steps: every layer call of both caches runs both implementations on the
same inputs and counts calls whose selection (scores, page / head / row masks, fetch list, budget) or
attention (output, block masses where the strategy reads them, new-token mass) is not bit-identical; at every step the two caches must
decode the same tokens, and the largest logit difference is reported.  Calls whose attention is not bit-identical
are counted; the run fails where the selection is not, or the attention is beyond float tolerance (masses and
new-token mass not bit for bit, or an output off by more than ``OUTPUT_RTOL`` = 1e-5 of its largest magnitude:
a revision before ``page_table.VALUES_BY_BAG`` became the default sums the values by matmul, this tree by a weighted
``embedding_bag``; ``--values-by-matmul`` sets ``VALUES_BY_BAG = False`` on the "after" side, ``--values-by-bag``
(the default since) ``True``).  Then ``--steps`` timed steps: per
cache the medians of thread CPU time (``time.thread_time`` of the forward thread: robust to a shared
machine) of the whole step, of the ``select`` calls and of the ``attend_selected`` calls summed over
layers, and the step's wall time.  Writes ``decode_compute_ab_<context>x<batch>.json`` under ``--out``.

``--threads N``: torch intra-op threads of both caches' forward passes (default 1).  ``--baseline-direct``: the
"before" side tries the revision's ``page_table.attend_pages_cpu`` first (where the revision has one), as the
revision's ``attend_selected`` does, instead of only its page-table path (block masses computed either way).
``--teacher-force``: where the two caches' greedy tokens differ (sides equal only within float tolerance: a
small difference can move a page across a selection boundary and the decode apart), both go on with the
"before" side's token and the steps are counted (``steps_with_different_tokens``) instead of failing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "kernels", ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import torch  # noqa: E402

import sparse_speed as sp  # noqa: E402
from tiercache_llm.hf_kwargs import cache_kwargs  # noqa: E402
import tiercache_llm.sparse_layer as sparse_layer  # noqa: E402
from _common import load_bench_model, machine_meta, median, torch_threads  # noqa: E402
from tiercache_llm.sparse import selection as this_selection  # noqa: E402
from tiercache_llm.sparse.attention import SparseAttentionOutput  # noqa: E402

SEL_FIELDS = ("scores", "pages", "head_mask", "row_mask", "fetch", "budget")
ATT_FIELDS = ("output", "block_mass", "new_mass")
OUTPUT_RTOL = 1e-5  # attention output tolerance (of the call's largest |output|) where bit identity is not kept


def load_module(rev: str, path: str, name: str, replace: dict[str, str]) -> Any:
    """``path`` of git revision ``rev`` as module ``name``, its relative imports rewritten by ``replace``."""
    src = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, check=True, capture_output=True,
                         text=True).stdout
    for old, new in replace.items():
        src = src.replace(old, new)
    file = Path(tempfile.mkdtemp()) / Path(path).name
    file.write_text(src)
    spec = importlib.util.spec_from_file_location(name, file)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def load_revision(rev: str, direct: bool = False) -> tuple[Callable, Callable]:
    """``(select, attend_selected)`` of revision ``rev`` (score stage and the CPU page path of attention;
    ``direct``: its ``page_table.attend_pages_cpu`` tried first where it has one, as its ``attend_selected``
    does, with block masses where they are read)."""
    sel = load_module(rev, "tiercache_llm/sparse/selection.py", "tiercache_llm.sparse._ab_selection",
                      {"from .digests import": "from tiercache_llm.sparse.digests import"})
    load_module(rev, "tiercache_llm/sparse/attention.py", "tiercache_llm.sparse._ab_attention", {})
    pt = load_module(rev, "tiercache_llm/sparse/page_table.py", "tiercache_llm.sparse._ab_page_table",
                     {"from .attention import": "from tiercache_llm.sparse._ab_attention import",
                      "from .selection import": "from tiercache_llm.sparse._ab_selection import"})

    def select(query, digests, config, **kw):
        cfg = sel.SelectionConfig(**{f: getattr(config, f) for f in config.__dataclass_fields__})
        return sel.select(query, digests, cfg, **kw)

    def attend(query, k_pool, v_pool, slot_of_fetch, s, valid, ctx, block_size, k_new, v_new, scaling, **kw):
        if direct and hasattr(pt, "attend_pages_cpu"):
            res = pt.attend_pages_cpu(query, k_pool, v_pool, s, slot_of_fetch, valid, ctx, block_size, k_new, v_new,
                                      scaling, bool(kw.get("mass", True)))
            if res is not None:
                return SparseAttentionOutput(res.output, res.block_mass, res.new_mass)
        table = pt.build_page_table_from_valid(s, slot_of_fetch, valid, ctx, block_size)
        res = pt.page_table_attention(query, k_pool, v_pool, table, k_new, v_new, scale=scaling, backend="torch")
        # this tree's result type (what this tree's placement reads), the revision's values
        return SparseAttentionOutput(res.output, pt.entry_mass_to_blocks(res.block_mass, table, int(s.fetch.numel())),
                                     res.new_mass)

    return select, attend


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a.isnan(), b.isnan())) \
        and bool(torch.equal(a.nan_to_num(), b.nan_to_num()))


class Dispatch:
    """Stands in for ``sparse_layer.select`` and ``sparse_layer.attend_selected``: the active side's
    implementation, timed in thread CPU time; in verification mode both, compared."""

    def __init__(self, before: tuple[Callable, Callable], after: tuple[Callable, Callable]) -> None:
        self.impls = {"before": before, "after": after}
        self.active, self.verify = "after", False
        self.select_cpu = self.attend_cpu = 0.0
        self.calls = self.sel_differ = self.att_differ = 0
        self.att_max_diff = 0.0
        self.att_beyond_tol = 0

    def select(self, query, digests, config, **kw):
        if self.verify:
            sels = {n: f[0](query, digests, config, **kw) for n, f in self.impls.items()}
            a, b = sels["before"], sels["after"]
            self.sel_differ += not all(_same(getattr(a, f), getattr(b, f)) for f in SEL_FIELDS)
            return sels[self.active]
        c0 = time.thread_time()
        out = self.impls[self.active][0](query, digests, config, **kw)
        self.select_cpu += time.thread_time() - c0
        return out

    def attend(self, *args, **kw):
        if self.verify:
            res = {n: f[1](*args, **kw) for n, f in self.impls.items()}
            a, b = res["before"], res["after"]
            self.calls += 1
            fields = ATT_FIELDS if kw.get("mass", True) else ("output", "new_mass")  # mass=False: not computed
            self.att_differ += not all(_same(getattr(a, f), getattr(b, f)) for f in fields)
            self.att_max_diff = max(self.att_max_diff, float((a.output - b.output).abs().nan_to_num().max()))
            # beyond float tolerance: the masses and new-token mass not bit for bit, or the output off by more than
            # OUTPUT_RTOL of its largest magnitude (another summation order of the values: page_table.VALUES_BY_BAG)
            scale = float(a.output.abs().nan_to_num().max())
            self.att_beyond_tol += not (all(_same(getattr(a, f), getattr(b, f)) for f in fields if f != "output")
                                        and torch.equal(a.output.isnan(), b.output.isnan())
                                        and float((a.output - b.output).abs().nan_to_num().max()) <= OUTPUT_RTOL * scale)
            return res[self.active]
        c0 = time.thread_time()
        out = self.impls[self.active][1](*args, **kw)
        self.attend_cpu += time.thread_time() - c0
        return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    dispatch = Dispatch(load_revision(args.baseline_rev, args.baseline_direct),
                        (this_selection.select, sparse_layer.attend_selected))
    originals = sparse_layer.select, sparse_layer.attend_selected
    model, _ = load_bench_model("smollm2")
    cfg = model.config
    gen = torch.Generator().manual_seed(0)
    shape = (args.batch, cfg.num_key_value_heads, args.context - 1, cfg.head_dim)
    kv = [(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)) for _ in range(cfg.num_hidden_layers)]
    first = torch.randint(3, cfg.vocab_size, (args.batch, 1), generator=gen)
    work = Path(tempfile.mkdtemp(prefix="tiercache-compute-ab-", dir=args.workdir))
    caches: dict[str, Any] = {}
    keys = ("step_cpu_ms", "select_cpu_ms", "attend_cpu_ms", "step_wall_ms")
    figures = {n: {k: [] for k in keys} for n in dispatch.impls}
    logit_diff, loads, differ_steps = 0.0, [], 0
    sparse_layer.select, sparse_layer.attend_selected = dispatch.select, dispatch.attend
    try:
        for name in dispatch.impls:
            caches[name] = sp.build_cache(model, sp.Config(args.strategy, args.budget, "cold"), kv, sp.Settings(),
                                          work / name)
        del kv
        feed = {n: first for n in caches}
        with torch.no_grad(), torch_threads(args.threads):
            for step in range(args.verify_steps + args.steps):
                dispatch.verify = step < args.verify_steps
                logits = {}
                for name in (list(caches) if step % 2 == 0 else list(caches)[::-1]):
                    dispatch.active, dispatch.select_cpu, dispatch.attend_cpu = name, 0.0, 0.0
                    c0, t0 = time.thread_time(), time.perf_counter()
                    logits[name] = model(input_ids=feed[name], **cache_kwargs(caches[name], model)).logits[:, -1]
                    wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
                    feed[name] = logits[name].argmax(-1, keepdim=True)
                    if not dispatch.verify:
                        f = figures[name]
                        f["step_cpu_ms"].append(1e3 * cpu)
                        f["select_cpu_ms"].append(1e3 * dispatch.select_cpu)
                        f["attend_cpu_ms"].append(1e3 * dispatch.attend_cpu)
                        f["step_wall_ms"].append(1e3 * wall)
                loads.append(os.getloadavg()[0])
                logit_diff = max(logit_diff, float((logits["before"] - logits["after"]).abs().max()))
                if not torch.equal(feed["before"], feed["after"]):
                    if not args.teacher_force:
                        raise SystemExit(f"step {step}: the two caches decoded different tokens")
                    differ_steps += 1
                    feed["after"] = feed["before"]  # both decode the "before" side's tokens
    finally:
        sparse_layer.select, sparse_layer.attend_selected = originals
        for c in caches.values():
            c.close()
        shutil.rmtree(work, ignore_errors=True)
    med = {n: {k: median(v) for k, v in f.items()} for n, f in figures.items()}
    return {
        "context": args.context, "batch": args.batch, "budget": args.budget, "strategy": args.strategy,
        "baseline_rev": args.baseline_rev, "kv": "random (seeded)", "timed_steps_each": args.steps,
        "verify_steps": args.verify_steps, "verify_layer_calls": dispatch.calls,
        "selection_not_bit_identical": dispatch.sel_differ, "attention_not_bit_identical": dispatch.att_differ,
        "attention_max_output_diff": dispatch.att_max_diff, "max_logit_diff": logit_diff,
        "attention_beyond_tolerance": dispatch.att_beyond_tol, "output_rtol": OUTPUT_RTOL,
        "torch_threads": args.threads, "baseline_direct": args.baseline_direct, "values_by_bag": args.values_by_bag,
        "same_tokens_every_step": differ_steps == 0, "steps_with_different_tokens": differ_steps,
        "teacher_force": args.teacher_force, "load_average_1min_median": median(loads),
        "median": med, "before_over_after": {k: med["before"][k] / med["after"][k] for k in keys},
        "machine": machine_meta(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline-rev", default="cebd7ec", help="git revision of the 'before' side")
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--budget", type=sp._budget, default=0.25)
    ap.add_argument("--strategy", choices=sp.SPARSE, default=sp.AWARE)
    ap.add_argument("--steps", type=int, default=12, help="timed steps per cache")
    ap.add_argument("--verify-steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads of the forward pass")
    ap.add_argument("--baseline-direct", action="store_true",
                    help="the 'before' side tries the revision's direct CPU attention (attend_pages_cpu) first, as "
                         "its attend_selected does (default: its page-table path only)")
    ap.add_argument("--teacher-force", action="store_true",
                    help="where the two caches' greedy tokens differ, both go on with the 'before' side's (counted) "
                         "instead of failing: for sides equal only within float tolerance")
    values = ap.add_mutually_exclusive_group()
    values.add_argument("--values-by-bag", action="store_true",
                        help="this tree's side with page_table.VALUES_BY_BAG = True (this tree's default)")
    values.add_argument("--values-by-matmul", action="store_true",
                        help="this tree's side with page_table.VALUES_BY_BAG = False (the values gathered and "
                             "multiplied, as before the bag became the default)")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None, help="folder for the JSON")
    args = ap.parse_args()
    if args.steps < 1 or args.verify_steps < 0 or args.context < 2 or args.batch < 1 or args.threads < 1:
        ap.error("need --steps >= 1, --verify-steps >= 0, --context >= 2, --batch >= 1, --threads >= 1")
    from tiercache_llm.sparse import page_table

    if args.values_by_bag or args.values_by_matmul:  # the revision's page_table is a separate module: only this
        page_table.VALUES_BY_BAG = bool(args.values_by_bag)  # tree's side changes
    args.values_by_bag = page_table.VALUES_BY_BAG
    res = run(args)
    print(json.dumps({k: v for k, v in res.items() if k != "machine"}, indent=1))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        name = f"decode_compute_ab_{args.strategy}_{args.context}x{args.batch}.json"
        (args.out / name).write_text(json.dumps(res, indent=1) + "\n")
    if res["selection_not_bit_identical"] or res["attention_beyond_tolerance"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
