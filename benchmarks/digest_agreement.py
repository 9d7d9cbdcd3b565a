"""Selection agreement of float16 key digests with float32 ones on SmolLM2 (CPU, natural text).

    python benchmarks/digest_agreement.py                      # 8K context, batch 1, 4 decode steps
    python benchmarks/digest_agreement.py --context 4096 --steps 8 --budgets 0.0625,0.125,0.25

A sparse ``TieredKVCache`` (default rule, float16 digests: ``SelectionConfig.digests``) prefills
``--context`` tokens of natural English (``_texts.english_prose``), then decodes ``--steps`` tokens
teacher-forced (the text's next tokens).  Beside every layer's float16 digests the script keeps float32
digests of the same keys (every ``KeyDigests.append`` of the cache is repeated into a float32 twin), and
at every decode step and layer it selects with both under each of ``--budgets`` (the decode itself
follows the cache's own budget, ``--run-budget``).  Reported per budget: the fraction of the float32
digests' selected pages, over every (layer, row, KV head, step), that the float16 digests select too;
the fraction of (layer, row, KV head, step) whose selections are identical; the largest score
difference.  Digest bytes of both storages are printed beside them.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "kernels", ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import torch  # noqa: E402
from tiercache_llm.hf_kwargs import cache_kwargs  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--budgets", default="0.0625,0.25")
    ap.add_argument("--run-budget", type=float, default=0.25)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import tiercache_llm.sparse_layer as sl
    from tiercache_llm import TieredKVCache
    from tiercache_llm.sparse.digests import KeyDigests
    from tiercache_llm.sparse.selection import select as orig_select

    from _common import load_bench_model
    from _texts import english_prose

    budgets = [float(x) for x in args.budgets.split(",")]
    twins: dict[int, KeyDigests] = {}
    orig_append = KeyDigests.append

    def append(self, keys, valid=None):
        orig_append(self, keys, valid)
        if self.dtype == torch.float16:
            twin = twins.get(id(self))
            if twin is None:
                b, h, _, d = keys.shape
                twin = twins[id(self)] = KeyDigests.empty(b, h, d, self.block_size, dtype=keys.dtype)
            orig_append(twin, keys, valid)

    tally = {b: dict(same=0, total=0, rows_same=0, rows=0, diff=0.0) for b in budgets}
    active = {"on": False}

    def select(query, digests, config, **kw):
        if active["on"] and id(digests) in twins:
            twin = twins[id(digests)]
            assert twin.length == digests.length
            for b in budgets:
                cfg = dataclasses.replace(config, budget=b)
                x, y = orig_select(query, twin, cfg, **kw), orig_select(query, digests, cfg, **kw)
                t = tally[b]
                t["same"] += int((x.pages & y.pages).sum())
                t["total"] += int(x.pages.sum())
                t["rows_same"] += int((x.pages == y.pages).all(-1).sum())
                t["rows"] += x.pages.shape[0] * x.pages.shape[1]
                fin = torch.isfinite(x.scores)
                if bool(fin.any()):
                    t["diff"] = max(t["diff"], float((x.scores[fin] - y.scores[fin]).abs().max()))
        return orig_select(query, digests, config, **kw)

    KeyDigests.append = append
    sl.select = select
    model, tok = load_bench_model("smollm2")
    need = args.context + args.steps
    text, _ = english_prose(6 * need)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"][:, :need]
    assert ids.shape[1] == need, f"the text holds {ids.shape[1]} tokens, {need} needed"
    t0 = time.perf_counter()
    with torch.no_grad(), TieredKVCache.for_model(model, mode="sparse", budget=args.run_budget, host="2GiB") as cache:
        model(ids[:, : args.context], **cache_kwargs(cache, model), use_cache=True)
        print(f"prefill {args.context} tokens: {time.perf_counter() - t0:.1f} s", flush=True)
        active["on"] = True
        for s in range(args.steps):
            model(ids[:, args.context + s : args.context + s + 1], **cache_kwargs(cache, model), use_cache=True)
        st = cache.stats()
        d16 = sum(l.sparse.digests.nbytes for l in cache.layers if l.sparse is not None and l.sparse.digests is not None)
        d32 = sum(t.nbytes for t in twins.values())
    print(f"SmolLM2, context {args.context}, {args.steps} decode steps (teacher-forced), page size "
          f"{next(iter(twins.values())).block_size}; digests float16 {d16 / 2**20:.1f} MiB vs float32 {d32 / 2**20:.1f} MiB "
          f"(stats digest_bytes {st['kv'].get('digest_bytes', 0) / 2**20:.1f} MiB)")
    ok = True
    for b, t in tally.items():
        frac = t["same"] / max(1, t["total"])
        print(f"budget {b:g}: selected pages also selected with float16 digests {frac:.5f} ({t['same']}/{t['total']}); "
              f"(layer, row, head, step) with identical selections {t['rows_same'] / max(1, t['rows']):.4f} of {t['rows']}; "
              f"largest score difference {t['diff']:.3g}")
        ok &= frac >= 0.995
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
