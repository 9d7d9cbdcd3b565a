"""The sparse cache's score stage in the model: this tree's ``select`` against a git revision's (CPU, SmolLM2).

    python benchmarks/selection_model_ab.py --baseline-rev 843b0d4 --prefill-cache /tmp/prefill   # 4K x 4, minutes
    python benchmarks/selection_model_ab.py --context 8192 --steps 12 --verify-steps 1

Two sparse ``TieredKVCache`` (``strategy="attention-aware"``, budget 25 %, host tier 25 % of the KV, disk
the rest, as in ``sparse_speed.py``) filled with the same prefilled K/V decode side by side, steps
interleaved (the order alternating), 1 torch thread; one scores with the baseline revision's
``selection.select`` ("before"), one with this tree's ("after").  The digests are this tree's in both
(the revision's ``selection.py`` is loaded against this tree's ``digests.py``), so what the digests'
layout changes is measured by ``selection_micro.py``, which builds each revision's digests.

First ``--verify-steps`` untimed steps: every layer call of both caches runs both ``select``s on the real
query and digests and counts the calls whose scores, page / head / row masks, fetch list or budget are
not bit-identical (the script fails if any); the two caches must also decode the same tokens at every
step.  Then ``--steps`` timed steps: per cache the median wall ms/step, the median of the
``scoring_seconds`` stage (wall, from ``stats()``), and thread CPU time (``time.thread_time`` of the
forward thread: a wait for a core on a loaded machine is not counted) of the whole step and of the
``select`` calls alone - the figures to compare on a shared machine.  ``--prefill-cache DIR`` keeps the
prefill between runs (``sparse_variants.cached_prefill``).  Memory: two caches (~1.2 GB each at 4K x 4,
~2.3 GB at 8K x 4).
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
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

import sparse_speed as sp  # noqa: E402
from tiercache_llm.hf_kwargs import cache_kwargs  # noqa: E402
import tiercache_llm.sparse_layer as sparse_layer  # noqa: E402
from _common import load_bench_model, median, torch_threads  # noqa: E402
from sparse_variants import cached_prefill, step_figures  # noqa: E402
from tiercache_llm.sparse import selection as this_selection  # noqa: E402

FIELDS = ("scores", "pages", "head_mask", "row_mask", "fetch", "budget")


def load_selection(rev: str):
    """Git revision ``rev``'s ``selection.py``, bound to this tree's ``digests.py``."""
    src = subprocess.run(["git", "show", f"{rev}:tiercache_llm/sparse/selection.py"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    src = src.replace("from .digests import", "from tiercache_llm.sparse.digests import")
    path = Path(tempfile.mkdtemp()) / "selection_rev.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("tiercache_llm.sparse._rev_selection_model", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


class Dispatch:
    """Stands in for ``sparse_layer.select``: the active cache's implementation, timed in thread CPU
    time; in verification mode both, compared."""

    def __init__(self, impls: dict[str, Any]) -> None:
        self.impls, self.active, self.verify = impls, "after", False
        self.cpu = 0.0
        self.calls = self.differ = 0

    def __call__(self, query: torch.Tensor, digests: Any, config: Any, **kw: Any) -> Any:
        if self.verify:
            sels = {}
            for name, mod in self.impls.items():
                cfg = mod.SelectionConfig(**{f: getattr(config, f) for f in config.__dataclass_fields__})
                sels[name] = mod.select(query, digests, cfg, **kw)
            a, b = sels["before"], sels["after"]
            self.calls += 1
            self.differ += not all(torch.equal(getattr(a, f), getattr(b, f)) for f in FIELDS)
            return sels[self.active]
        c0 = time.thread_time()
        out = self.impls[self.active].select(query, digests, config, **kw)
        self.cpu += time.thread_time() - c0
        return out


def run(args: argparse.Namespace) -> int:
    impls = {"before": load_selection(args.baseline_rev), "after": this_selection}
    dispatch = Dispatch(impls)
    original = sparse_layer.select
    sparse_layer.select = dispatch
    model, tokenizer = load_bench_model("smollm2")
    ids = sp.prompt_rows(tokenizer, args.batch, args.context, model.config.vocab_size)
    context = min(args.context, ids.shape[-1])
    with torch_threads(sp.DEFAULT_THREADS):
        rows = cached_prefill(model, ids, [context - 1] * args.batch, args.prefill_cache)
    kv = sp.point_kv(rows, args.batch, context - 1)
    del rows
    work = Path(tempfile.mkdtemp(prefix="tiercache-selection-ab-", dir=args.workdir))
    caches = {}
    figures: dict[str, dict[str, list[float]]] = {n: {"ms": [], "score_ms": [], "cpu_ms": [], "select_cpu_ms": []}
                                                  for n in impls}
    try:
        for name in impls:
            caches[name] = sp.build_cache(model, sp.Config("attention-aware", args.budget, "cold"), kv,
                                          sp.Settings(host_fraction=0.25), work / name)
        del kv
        feed = {n: ids[:, context - 1:context] for n in caches}
        with torch.no_grad(), torch_threads(1):
            for step in range(args.verify_steps + args.steps):
                dispatch.verify = step < args.verify_steps
                for name in (list(caches) if step % 2 == 0 else list(caches)[::-1]):
                    dispatch.active, dispatch.cpu = name, 0.0
                    before = caches[name].stats()
                    c0, t0 = time.thread_time(), time.perf_counter()
                    logits = model(input_ids=feed[name], **cache_kwargs(caches[name], model)).logits
                    wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
                    feed[name] = logits[:, -1].argmax(-1, keepdim=True)
                    stages, _ = step_figures(before, caches[name].stats())
                    if not dispatch.verify:
                        f = figures[name]
                        f["ms"].append(1e3 * wall)
                        f["score_ms"].append(1e3 * stages["sparse.total.scoring_seconds"])
                        f["cpu_ms"].append(1e3 * cpu)
                        f["select_cpu_ms"].append(1e3 * dispatch.cpu)
                if not torch.equal(feed["before"], feed["after"]):
                    print(f"step {step}: the two caches decoded different tokens")
                    return 1
    finally:
        sparse_layer.select = original
        for c in caches.values():
            c.close()
        shutil.rmtree(work, ignore_errors=True)
    print(f"SmolLM2, context {context} x batch {args.batch}, attention-aware, budget {args.budget}; before = "
          f"{args.baseline_rev}, after = this tree; {args.steps} timed steps (+{args.verify_steps} verification "
          f"steps), 1 torch thread, medians")
    print(f"verification: {dispatch.calls} layer calls on real states, not bit-identical: {dispatch.differ}")
    print(f"{'':7s} {'ms/step wall':>13s} {'score wall':>11s} {'step cpu':>9s} {'select cpu':>11s}  (ms/step)")
    med = {n: {k: median(v) for k, v in f.items()} for n, f in figures.items()}
    for name, m in med.items():
        print(f"{name:7s} {m['ms']:13.1f} {m['score_ms']:11.2f} {m['cpu_ms']:9.1f} {m['select_cpu_ms']:11.2f}")
    ratio = {k: med["before"][k] / med["after"][k] for k in med["after"]}
    print(f"before/after: wall {ratio['ms']:.3f}, score wall {ratio['score_ms']:.3f}, step cpu {ratio['cpu_ms']:.3f}, "
          f"select cpu {ratio['select_cpu_ms']:.3f}")
    return 1 if dispatch.differ else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline-rev", default="843b0d4", help="git revision of the 'before' select")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--budget", type=sp._budget, default=0.25)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--verify-steps", type=int, default=2)
    ap.add_argument("--prefill-cache", type=Path, default=None, help="folder keeping prefilled K/V between runs")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    if args.steps < 1 or args.verify_steps < 0 or args.context < 2 or args.batch < 1:
        ap.error("need --steps >= 1, --verify-steps >= 0, --context >= 2, --batch >= 1")
    sys.exit(run(args))


if __name__ == "__main__":
    main()
