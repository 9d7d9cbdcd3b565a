"""Sparse decode attention alone (one layer, CPU): the page-table path against the block-union reference.

    python benchmarks/attention_micro.py --out benchmarks/results            # ~1-2 min
    python benchmarks/attention_micro.py --quick                              # a smoke run
    python benchmarks/attention_micro.py --baseline-rev c3ebf24 --out DIR     # also an older page_table.py
    python benchmarks/attention_micro.py --model-ab 2d5ec75 --out DIR         # in a real decode (~2 min)
    python benchmarks/attention_micro.py --model-ab HEAD --prefill-cache DIR  # the same with the model's own K/V
                                                                              # (real selections; first run
                                                                              # prefills 8K x 4, ~13 min loaded)

SmolLM2 decode shapes (Hq = 9 query heads, H = 3 KV heads, D = 64, float32, 64-token storage blocks,
8-token pages), batch 1 / 4 / 8, contexts 2K / 8K, budgets 6.25 % / 25 % of the context, 1 and 2 torch
threads; plus 32K x batch 8 x 25 % at 1 thread (gathered K/V of 50 MB, past glibc's 32 MiB dynamic
mmap threshold).  Per (row, KV head) the selection is the top pages of a score that is 70 % shared by the heads
of a row and 30 % their own (heads overlap, as real heads do, yet select different pages), plus the
sink page and the recent pages; each head's page count differs (budget x U(0.85, 1.15)).  Row 0 is
left-padded by 100 tokens and the last block is partial.  The pool is the fetch buffer
``(U, B, H, S, D)`` with the identity slot map (what ``SparseLayerState.decode`` passes today).

Timed, interleaved in one process (each rep runs every path once, in turn), medians of wall time, of
process CPU time (robust on a shared machine: waits for a core are not counted) and of minor page
faults per call (fresh multi-MB temporaries are faulted in again on every call):

- ``reference``: what decode ran before the page table: the token mask of the selection and
  ``sparse_attention_reference`` over the union of fetched blocks (every head computes over every
  fetched block, masked);
- ``pages``: ``sparse_layer.attend_selected(backend="pages")``: ``build_page_table_from_valid``,
  ``page_table_attention``, ``entry_mass_to_blocks`` (at 1 thread its chunked CPU path, at 2 the batched
  one; the heads' page counts differ here, so ``attend_selected``'s direct path for equal counts,
  ``page_table.attend_pages_cpu``, declines and the table path is what is timed: the in-model A/B,
  ``decode_compute_ab.py``, times the direct path);
- ``table``: ``build_page_table_from_valid`` alone (part of ``pages``);
- ``dense``: the yardstick, what a ``DynamicCache`` decode step's attention does per layer: SDPA (GQA) of
  the query over the whole context, K/V ``(B, H, context, D)`` contiguous (timed only);
- ``pages@REV`` with ``--baseline-rev``: the same path with ``tiercache_llm/sparse/page_table.py`` of a
  git revision.

The ``pages`` paths are also timed *alone* (consecutive calls of one path, as a decode loop calls it):
interleaved, a path can reuse the memory the reference just freed, alone it cannot.

Each config also checks that ``pages`` gives the reference's output and block masses.  Writes
``attention_micro.json`` and ``attention_micro.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
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

from _common import machine_meta, median, torch_threads  # noqa: E402
from tiercache_llm.hf_kwargs import cache_kwargs  # noqa: E402
from tiercache_llm.sparse.attention import sparse_attention_reference  # noqa: E402
from tiercache_llm.sparse.page_table import build_page_table_from_valid  # noqa: E402
from tiercache_llm.sparse.selection import BlockSelection  # noqa: E402
from tiercache_llm import sparse_layer  # noqa: E402

HQ, H, D, S, PAGE = 9, 3, 64, 64, 8


def page_selection(scores: torch.Tensor, per_head: int, n: int, k: int, gen: torch.Generator) -> BlockSelection:
    """A selection of each (row, KV head)'s top pages of ``scores`` (``(batch, H, pages)``), about ``per_head``
    of them (±15 %, drawn from ``gen``), over ``n`` blocks of ``k`` pages."""
    batch, heads, p = scores.shape
    counts = (per_head * (0.85 + 0.3 * torch.rand(batch, heads, generator=gen))).round().long().clamp(1, p)
    rank = scores.argsort(dim=-1, descending=True).argsort(dim=-1)
    pm = rank < counts.unsqueeze(-1)
    hm = torch.nn.functional.pad(pm, (0, n * k - p)).view(batch, heads, n, k).any(-1)
    fetch = hm.any(1).any(0).nonzero().flatten()
    return BlockSelection(hm, hm.any(1), fetch, scores, torch.zeros(batch, dtype=torch.long), pm, k)


def make_inputs(batch: int, context: int, budget: float, seed: int = 0) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    k = S // PAGE
    n = -(-context // S)
    p = -(-context // PAGE)
    per_head = max(1, round(budget * context / PAGE))
    shared = torch.rand(batch, 1, p, generator=gen)
    scores = 0.7 * shared + 0.3 * torch.rand(batch, H, p, generator=gen)
    scores[..., 0] = 2.0  # sink page
    scores[..., -4:] = 2.0  # recent pages
    sel = page_selection(scores, per_head, n, k, gen)
    u = int(sel.fetch.numel())
    k_pool = torch.randn(u, batch, H, S, D, generator=gen)
    v_pool = torch.randn(u, batch, H, S, D, generator=gen)
    valid = torch.ones(batch, context, dtype=torch.bool)
    valid[0, :100] = False
    query = torch.randn(batch, HQ, 1, D, generator=gen)
    k_new = torch.randn(batch, H, 1, D, generator=gen)
    v_new = torch.randn(batch, H, 1, D, generator=gen)
    ctx = context - S // 2  # the last block is half full
    return dict(sel=sel, k_pool=k_pool, v_pool=v_pool, valid=valid, ctx=ctx, query=query, k_new=k_new,
                v_new=v_new, slot=torch.arange(u), u=u, tokens=int(sel.page_mask.sum()) * PAGE)


def reference_path(x: dict[str, Any]):
    sel, dev = x["sel"], x["valid"].device
    pos = sel.fetch.view(-1, 1) * S + torch.arange(S, device=dev)
    token_ok = x["valid"][:, pos.clamp(max=x["valid"].shape[1] - 1)] & (pos < x["ctx"])
    tv = token_ok.unsqueeze(1) & sel.token_mask(S)
    return sparse_attention_reference(x["query"], x["k_pool"].permute(1, 2, 0, 3, 4), x["v_pool"].permute(1, 2, 0, 3, 4),
                                      sel.fetch_head_mask, tv, x["k_new"], x["v_new"])


def pages_path(x: dict[str, Any]):
    return sparse_layer.attend_selected(x["query"], x["k_pool"], x["v_pool"], x["slot"], x["sel"], x["valid"],
                                        x["ctx"], S, x["k_new"], x["v_new"], None, backend="pages")


def table_path(x: dict[str, Any]):
    return build_page_table_from_valid(x["sel"], x["slot"], x["valid"], x["ctx"], S)


def dense_path(x: dict[str, Any]):
    if "dense_k" not in x:  # made on first use (the yardstick's K/V: (B, H, context, D) each)
        gen = torch.Generator().manual_seed(1)
        b, _, _, d = x["query"].shape
        x["dense_k"] = torch.randn(b, H, x["ctx"] + 1, d, generator=gen)
        x["dense_v"] = torch.randn(b, H, x["ctx"] + 1, d, generator=gen)
    return torch.nn.functional.scaled_dot_product_attention(x["query"], x["dense_k"], x["dense_v"], enable_gqa=True)


def load_revision(rev: str) -> Callable[[dict[str, Any]], Any]:
    """``pages_path`` with ``page_table.py`` of git revision ``rev`` (the rest of the tree as it is)."""
    src = subprocess.run(["git", "show", f"{rev}:tiercache_llm/sparse/page_table.py"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "page_table_rev.py"
    path.write_text(src)
    name = "tiercache_llm.sparse._page_table_rev"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)

    def attend(query, k_pool, v_pool, slot_of_fetch, sel, valid, ctx, block_size, k_new, v_new, scaling, **_):
        """``sparse_layer.attend_selected(backend="pages")`` as it was before ``build_page_table_from_valid``
        (token validity of the fetched blocks, ``build_page_table``), with ``rev``'s functions."""
        from tiercache_llm.sparse.attention import SparseAttentionOutput

        dev = valid.device
        pos = sel.fetch.to(dev).view(-1, 1) * block_size + torch.arange(block_size, device=dev)
        token_ok = valid[:, pos.clamp(max=valid.shape[1] - 1)] & (pos < ctx)
        table = mod.build_page_table(sel, slot_of_fetch, token_ok, block_size)
        res = mod.page_table_attention(query, k_pool, v_pool, table, k_new, v_new, scale=scaling)
        return SparseAttentionOutput(res.output, mod.entry_mass_to_blocks(res.block_mass, table, int(sel.fetch.numel())),
                                     res.new_mass)

    def run(x):
        return attend(x["query"], x["k_pool"], x["v_pool"], x["slot"], x["sel"], x["valid"], x["ctx"], S, x["k_new"],
                      x["v_new"], None)

    run.module = mod  # type: ignore[attr-defined]
    run.attend = attend  # type: ignore[attr-defined]
    return run


def model_ab(rev: str, context: int = 8192, batch: int = 4, steps: int = 16, budget: float = 0.25,
             prefill_cache: Path | None = None) -> dict[str, Any]:
    """The per-step attention of a real decode, old against new: SmolLM2 (30 layers) with a sparse
    ``attention-aware`` cache (host tier 25 % of the KV, the rest on disk, as ``sparse_speed.py``), its K/V
    random (timing only: no prefill), decoding ``steps`` steps that alternate between
    ``page_table.py`` of git revision ``rev`` and the tree's.  Per step: the main thread's CPU time inside
    ``sparse_layer.attend_selected`` summed over layers (the old side: ``attend_selected``'s page path
    as it was before ``build_page_table_from_valid``, with ``rev``'s ``page_table.py``) (``time.thread_time``: robust to a shared machine,
    and the pipeline's background threads are not counted), and the step's wall time.

    ``prefill_cache``: a folder (``sparse_variants.py --prefill-cache``): the K/V are instead the model's own
    over ``sparse_speed.py``'s prompts (prefilled once, minutes, then loaded from the folder), so the
    selection has the structure of real attention (runs of pages, whole blocks) instead of random keys'."""
    import shutil
    import sparse_speed as ss
    from _common import load_bench_model

    old_attend = load_revision(rev).attend
    model, _ = load_bench_model("smollm2")  # _: the tokenizer
    cfg = model.config
    gen = torch.Generator().manual_seed(0)
    if prefill_cache is not None:
        from sparse_variants import cached_prefill

        model_ids = ss.prompt_rows(_, batch, context, cfg.vocab_size)
        context = min(context, model_ids.shape[-1])
        rows = cached_prefill(model, model_ids, [context - 1] * batch, prefill_cache)
        kv = ss.point_kv(rows, batch, context - 1)
        del rows
    else:
        shape = (batch, cfg.num_key_value_heads, context - 1, cfg.head_dim)
        kv = [(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)) for _ in range(cfg.num_hidden_layers)]
    work = Path(tempfile.mkdtemp(prefix="attention_ab_"))
    cache = ss.build_cache(model, ss.Config(ss.AWARE, budget, "cold"), kv, ss.Settings(), work / "store")
    del kv
    spent = [0.0]
    attend = sparse_layer.attend_selected
    side = {"old": old_attend, "new": attend}
    current = [attend]

    def timed(*args, **kwargs):
        t0 = time.thread_time()
        try:
            return current[0](*args, **kwargs)
        finally:
            spent[0] += time.thread_time() - t0

    attn: dict[str, list[float]] = {"old": [], "new": []}
    wall: dict[str, list[float]] = {"old": [], "new": []}
    ids = model_ids[:, context - 1:context] if prefill_cache is not None else \
        torch.randint(3, cfg.vocab_size, (batch, 1), generator=gen)
    sparse_layer.attend_selected = timed
    try:
        with torch.no_grad(), torch_threads(1):
            for i in range(steps + 2):  # the first two (one per side) warm up
                which = "old" if i % 2 == 0 else "new"
                current[0] = side[which]
                spent[0] = 0.0
                t0 = time.perf_counter()
                ids = model(input_ids=ids, **cache_kwargs(cache, model), use_cache=True).logits[:, -1:].argmax(-1)
                if i >= 2:
                    wall[which].append(time.perf_counter() - t0)
                    attn[which].append(spent[0])
    finally:
        sparse_layer.attend_selected = attend
        cache.close()
        shutil.rmtree(work, ignore_errors=True)
    layers = cfg.num_hidden_layers
    out = {"context": context, "batch": batch, "budget": budget, "steps_each": steps // 2, "layers": layers,
           "baseline_rev": rev, "kv": "prefilled prompts" if prefill_cache is not None else "random"}
    for k in ("old", "new"):
        out[k] = {"attention_ms_per_step": 1e3 * median(attn[k]), "attention_ms_per_layer": 1e3 * median(attn[k]) / layers,
                  "step_wall_ms": 1e3 * median(wall[k])}
    return out


def measure(paths: dict[str, Callable], x: dict[str, Any], reps: int, budget_s: float) -> dict[str, dict[str, float]]:
    for f in paths.values():  # warm-up (allocations, thread pool)
        f(x)
    wall: dict[str, list[float]] = {k: [] for k in paths}
    cpu: dict[str, list[float]] = {k: [] for k in paths}
    faults: dict[str, list[float]] = {k: [] for k in paths}
    deadline = time.monotonic() + budget_s
    for i in range(reps):
        for name, f in paths.items():
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            c0, t0 = time.process_time(), time.perf_counter()
            f(x)
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
            faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        if i >= 4 and time.monotonic() > deadline:
            break
    return {k: {"wall_ms": 1e3 * median(wall[k]), "cpu_ms": 1e3 * median(cpu[k]), "page_faults": median(faults[k]),
                "reps": len(wall[k])} for k in paths}


def run(quick: bool, baseline_rev: str | None) -> dict[str, Any]:
    batches, contexts, budgets, threads = ([1, 4], [2048], [0.25], [1]) if quick else ([1, 4, 8], [2048, 8192],
                                                                                     [0.0625, 0.25], [1, 2])
    paths: dict[str, Callable] = {"reference": reference_path, "pages": pages_path, "table": table_path,
                                  "dense": dense_path}
    if baseline_rev:
        paths[f"pages@{baseline_rev}"] = load_revision(baseline_rev)
    rows = []
    start = time.monotonic()
    points = [(c, b, f, threads) for c in contexts for b in batches for f in budgets]
    if not quick:  # past glibc's largest dynamic mmap threshold (32 MiB): fresh K/V page-fault every call
        points.append((32768, 8, 0.25, [1]))
    for context, batch, budget, point_threads in points:
        x = make_inputs(batch, context, budget, seed=batch * 7 + context)
        want, got = reference_path(x), pages_path(x)
        err = float((want.output - got.output).abs().max())
        mass_err = float((want.block_mass - got.block_mass).abs().max())
        if err > 1e-4 or mass_err > 1e-5:
            raise AssertionError(f"pages differ from the reference: {err}, {mass_err}")
        for n in point_threads:
            with torch_threads(n):
                t = measure(paths, x, reps=5 if quick else 15, budget_s=1.0 if quick else 2.5)
                alone = {k: measure({k: f}, x, reps=5 if quick else 9, budget_s=0.5 if quick else 1.0)[k]
                         for k, f in paths.items() if k.startswith("pages")}
            row = {"context": context, "batch": batch, "budget": budget, "threads": n, "fetched_blocks": x["u"],
                   "tokens_attended_per_head": x["tokens"] / (batch * H), "max_abs_diff": err,
                   "max_mass_diff": mass_err, "timings": t, "alone": alone,
                   "speedup_wall": t["reference"]["wall_ms"] / t["pages"]["wall_ms"],
                   "speedup_cpu": t["reference"]["cpu_ms"] / t["pages"]["cpu_ms"]}
            rows.append(row)
            print(f"ctx {context} b {batch} budget {budget:.4f} threads {n}: " + ", ".join(
                f"{k} {v['wall_ms']:.2f} ms ({v['cpu_ms']:.2f} cpu, {v['page_faults']:.0f} faults)" for k, v in t.items())
                + f"  x{row['speedup_wall']:.1f}; alone: " + ", ".join(
                f"{k} {v['wall_ms']:.2f} ms ({v['cpu_ms']:.2f} cpu, {v['page_faults']:.0f} faults)"
                for k, v in alone.items()), flush=True)
    return {"benchmark": "attention_micro", "shape": {"query_heads": HQ, "kv_heads": H, "head_dim": D,
                                                      "block_size": S, "page_size": PAGE, "dtype": "float32"},
            "rows": rows, "runtime_seconds": time.monotonic() - start, "machine": machine_meta()}


def markdown(result: dict[str, Any]) -> str:
    names = list(result["rows"][0]["timings"]) if result["rows"] else []
    alone = list(result["rows"][0]["alone"]) if result["rows"] else []
    lines = ["# Sparse decode attention alone, one layer (CPU)", "",
             f"Command: `{' '.join(result['machine']['argv'])}`; load average at the end "
             f"{result['machine'].get('load_average')}; {result['runtime_seconds']:.0f} s.", "",
             "Median wall ms per call (process CPU ms in brackets), interleaved in one process; `reference` = "
             "block-union `sparse_attention_reference`, `pages` = `attend_selected(backend=\"pages\")` "
             "(table build included), `table` = `build_page_table_from_valid` alone, `dense` = SDPA over the whole context "
             "(a `DynamicCache` step's attention per layer, the yardstick).", "",
             "Last columns: the page paths alone (consecutive calls), wall ms (cpu ms) [minor page faults per call].", "",
             "| context | batch | budget | threads | blocks | " + " | ".join(names) + " | speed-up (wall / cpu) | "
             + " | ".join(f"{k} alone" for k in alone) + " |",
             "|---|---|---|---|---|" + "---|" * (len(names) + 1 + len(alone))]
    for r in result["rows"]:
        cells = " | ".join(f"{r['timings'][k]['wall_ms']:.2f} ({r['timings'][k]['cpu_ms']:.2f})" for k in names)
        lines.append(f"| {r['context']} | {r['batch']} | {r['budget'] * 100:g}% | {r['threads']} | {r['fetched_blocks']} | "
                     f"{cells} | {r['speedup_wall']:.1f}x / {r['speedup_cpu']:.1f}x | " + " | ".join(
                         f"{r['alone'][k]['wall_ms']:.2f} ({r['alone'][k]['cpu_ms']:.2f}) [{r['alone'][k]['page_faults']:.0f}]"
                         for k in alone) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="folder for attention_micro.json / .md")
    ap.add_argument("--quick", action="store_true", help="a few small configs (smoke run)")
    ap.add_argument("--baseline-rev", help="also time page_table.py of this git revision")
    ap.add_argument("--model-ab", metavar="REV", help="instead: a SmolLM2 decode at 8K x batch 4, 25 %% budget "
                    "(attention-aware), steps alternating page_table.py of REV and the tree's (model_ab)")
    ap.add_argument("--steps", type=int, default=16, help="--model-ab: timed steps (half each side)")
    ap.add_argument("--prefill-cache", type=Path, help="--model-ab: the model's own K/V over sparse_speed's prompts, "
                    "prefilled once into this folder (minutes) instead of random K/V (model_ab)")
    args = ap.parse_args(argv)
    if args.model_ab:
        result = model_ab(args.model_ab, steps=args.steps, prefill_cache=args.prefill_cache)
        result["machine"] = machine_meta()
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "attention_model_ab.json").write_text(json.dumps(result, indent=1))
        print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1))
        return 0
    result = run(args.quick, args.baseline_rev)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "attention_micro.json").write_text(json.dumps(result, indent=1))
        (args.out / "attention_micro.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
