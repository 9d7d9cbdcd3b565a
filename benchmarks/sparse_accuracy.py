"""Sparse-decode accuracy benchmark (CPU, SmolLM2; issue 9): sparse attention against full attention.

    python benchmarks/sparse_accuracy.py --threads 1 --jobs 2 --workdir /dev/shm --out benchmarks/results  # full run
    python benchmarks/sparse_accuracy.py --quick                      # tiny random model, seconds
    python benchmarks/sparse_accuracy.py --tf-only --budgets 0.25 --offset 4608 --threads 1 --workdir /dev/shm \
        --out /tmp/acc                                                # teacher forcing only, another window, ~10 min

``--tf-only`` skips the passkey part; ``--text licences`` teacher-forces on other natural English (the
licence texts under ``/usr/share/common-licenses``), ``--offset N`` on the window starting ``N`` tokens
into the text (the default window, offset 0 of ``pydoc``, is the one the rules were chosen on).

Two parts, each with full attention (``DynamicCache``) as the same-run reference and exact
``TieredKVCache`` as a control (it must agree with full attention exactly):

1. **Passkey retrieval**: chat prompts of 1K–2K tokens with a 5-digit key at depths 10–90 %
   (``tiercache_llm.prompts.passkey_prompt``; 3 lengths x 7 depths = 21 cases); greedy ``generate``, the
   cases of one length decoded as one left-padded batch; a case succeeds when the key is in the answer.
   Sparse budgets 12.5 % and 25 %.  Target: sparse succeeds on every case full attention succeeds on.
2. **Teacher-forced next-token agreement** over natural English (``_texts.english_prose``: stdlib
   ``pydoc_data.topics`` prose): the prefix (4096 tokens) is prefilled exactly, then the true next tokens
   are fed one at a time (256 decode steps, where sparse applies) and each step's next-token
   distribution is compared with full attention's at the same position: top-1 agreement and mean
   KL(full || sparse).  Budgets 6.25 / 12.5 / 25 / 50 %.  Target: ≥ 99 % top-1 agreement at 25 %.

The exact-tiered control runs in teacher forcing (and in the passkey part with ``Settings.passkey_exact``,
as ``--quick`` does).  ``--jobs 2`` runs the passkey part in a second (spawned) process beside teacher
forcing; on a loaded CPU ``--threads 1`` per process is much faster than torch's default (its threads
spin while they wait for a core).  ``--workdir /dev/shm`` puts the disk tier on tmpfs: accuracy and
reuse rate (a residency figure) do not depend on the tier's speed, the runtime does.

Each sparse run also records the cache's reuse rate (selected blocks already resident in the fastest
tier) and its whole ``stats()``.  Tiered caches (exact and sparse) hold 25 % of the prompt's KV in the
host tier and the rest on disk, as in the speed benchmark.  When the installed ``tiercache_llm`` has no
sparse mode, sparse rows are written as "sparse mode not available", never filled with other figures.
Writes ``sparse_accuracy.json`` (every case and step figure, machine, versions, settings, runtime),
``sparse_accuracy.md`` and ``sparse_accuracy.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from tiercache_llm.hf_kwargs import cache_kwargs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402  (the benchmarks directory is not a package)
    MiB, SPARSE_UNAVAILABLE, SparseUnavailable, filesystem_of, find_numbers, kv_cache_bytes, load_bench_model,
    machine_meta, make_tiered, reuse_rate, sparse_available, torch_threads,
)

DEFAULT_THREADS = torch.get_num_threads()
FULL, EXACT = "full", "exact"


@dataclass
class Settings:
    """What the run measures; ``quick()`` is the smoke-test size (tiny random model)."""

    model: str = "smollm2"
    passkey_contexts: tuple[int, ...] = (1024, 1536, 2048)
    passkey_depths: tuple[float, ...] = (0.1, 0.23, 0.37, 0.5, 0.63, 0.77, 0.9)  # 3 x 7 = 21 cases
    passkey_budgets: tuple[float, ...] = (0.125, 0.25)
    new_tokens: int = 12  # greedy tokens generated per passkey case
    passkey_exact: bool = False  # exact tiered control in the passkey part too (teacher forcing always has it)
    tf_prefix: int = 4096  # tokens prefilled exactly before teacher forcing
    tf_steps: int = 256  # teacher-forced decode steps compared
    tf_budgets: tuple[float, ...] = (0.0625, 0.125, 0.25, 0.5)
    tf_text: str = "pydoc"  # "pydoc" (_texts.english_prose) or "licences" (sparse_selection_study.licence_prose)
    tf_offset: int = 0  # tokens of the text skipped before the teacher-forcing window
    strategy: str = "attention-aware"
    host_fraction: float = 0.25  # host tier = this fraction of the prompt's KV; the rest on disk
    block_size: int | None = None  # None: the cache's default
    sink: int | None = None  # None: the cache's default
    recent: int | None = None
    page_size: int | None = None  # None: the cache's default
    threads: int = DEFAULT_THREADS

    @classmethod
    def quick(cls) -> "Settings":
        return cls(model="tiny", passkey_contexts=(96, 160), passkey_depths=(0.25, 0.75), new_tokens=4, passkey_exact=True,
                   tf_prefix=192, tf_steps=12, block_size=16, sink=4, recent=16)

    @property
    def passkey_cases(self) -> int:
        return len(self.passkey_contexts) * len(self.passkey_depths)


def estimate_seconds(s: Settings) -> float:
    """A rough runtime estimate for SmolLM2 on an idle 2-core CPU (prefill + tiered writes ≈ 5 ms/token, a
    tiered decode step ≈ 0.1 s + 0.15 s per 1K tokens in the batch's context); the tiny model is ~100×
    faster.  Passkey cases of one context run as one batch.  Every run's own seconds are in the JSON."""
    def run(tokens: int, steps: int) -> float:
        return 5e-3 * tokens + steps * (0.1 + 0.15 * tokens / 1024)

    per_group = sum(run(c * len(s.passkey_depths), s.new_tokens) for c in s.passkey_contexts)
    total = per_group * (2 + len(s.passkey_budgets)) + run(s.tf_prefix, s.tf_steps) * (2 + len(s.tf_budgets))
    return total / (100 if s.model == "tiny" else 1)


# -- inputs ---------------------------------------------------------------------------------------------
@dataclass
class PasskeyCase:
    context: int
    depth: float
    seed: int
    passkey: str
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    needle_ids: list[int] = field(default_factory=list)  # tiny model: the key as token ids


def passkey_cases(s: Settings, tokenizer: Any, vocab: int) -> list[PasskeyCase]:
    """Every (context, depth) case.  With a tokenizer: ``passkey_prompt`` (seed = case index, so the
    keys differ); without one (tiny model): random filler ids with 5 key ids at the depth and the key
    ids repeated at the end as the "question" (the success test is the same: key in the answer)."""
    cases = []
    for c in s.passkey_contexts:
        for d in s.passkey_depths:
            seed = len(cases)
            if tokenizer is not None:
                from tiercache_llm.prompts import passkey_prompt

                p = passkey_prompt(tokenizer, n_tokens=c, depth=d, seed=seed)
                cases.append(PasskeyCase(c, d, seed, p.passkey, p.input_ids, p.attention_mask))
            else:
                gen = torch.Generator().manual_seed(seed)
                ids = torch.randint(3, vocab, (1, c), generator=gen)
                key = torch.randint(3, vocab, (5,), generator=gen)
                at = int((c - 10) * d)
                ids[0, at:at + 5] = key
                ids[0, -5:] = key
                cases.append(PasskeyCase(c, d, seed, " ".join(map(str, key.tolist())), ids, torch.ones_like(ids),
                                         needle_ids=key.tolist()))
    return cases


def prose_ids(s: Settings, tokenizer: Any, vocab: int) -> tuple[torch.Tensor, str]:
    """``(1, tf_prefix + tf_steps + 1)`` ids of natural English (or seeded random ids without a
    tokenizer) and a description of the source."""
    need = s.tf_offset + s.tf_prefix + s.tf_steps + 1
    if tokenizer is None:
        gen = torch.Generator().manual_seed(1234)
        return torch.randint(3, vocab, (1, need), generator=gen)[:, s.tf_offset:], "random token ids (tiny model)"
    from _texts import SOURCE, english_prose

    chars = 6 * need
    while True:
        if s.tf_text == "licences":
            from sparse_selection_study import licence_prose

            text, source = licence_prose(chars)
        else:
            text, topics = english_prose(chars)
            source = f"{SOURCE}; topics {', '.join(topics)}"
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        if ids.shape[-1] >= need:
            where = f"; tokens {s.tf_offset}.." if s.tf_offset else ""
            return ids[:, s.tf_offset:need], source + where
        if len(text) < chars:  # the whole module is not enough
            raise RuntimeError(f"the prose source holds {ids.shape[-1]} tokens, {need} are needed")
        chars *= 2


# -- caches ---------------------------------------------------------------------------------------------
class CacheFactory:
    """Builds the cache of one configuration (``full``, ``exact`` or a sparse budget) for a prompt of
    ``tokens`` tokens: tiered caches get a host tier of ``host_fraction`` of the prompt's KV and a disk
    tier under ``workdir`` for the rest."""

    def __init__(self, model: Any, s: Settings, workdir: Path) -> None:
        self.model, self.s, self.workdir = model, s, workdir
        self._n = 0

    def options(self, tokens: int, extra_tokens: int, batch: int = 1) -> dict[str, Any]:
        kv = kv_cache_bytes(self.model.config, tokens, batch, self.model.dtype)
        total = kv_cache_bytes(self.model.config, tokens + extra_tokens + 256, batch, self.model.dtype)
        self._n += 1
        opts: dict[str, Any] = dict(host=max(1 * MiB, int(kv * self.s.host_fraction)), disk=4 * total + 64 * MiB,
                                    path=self.workdir / f"kv{self._n}")
        if self.s.block_size is not None:
            opts["block_size"] = self.s.block_size
        return opts

    def make(self, config: str | float, tokens: int, extra_tokens: int, batch: int = 1) -> Any:
        from transformers import DynamicCache

        if config == FULL:
            return DynamicCache(config=self.model.config)
        opts = self.options(tokens, extra_tokens, batch)
        if config == EXACT:
            return make_tiered(self.model, "exact", **opts)
        sparse = dict(budget=float(config), strategy=self.s.strategy)
        sparse.update({k: v for k, v in (("sink", self.s.sink), ("recent", self.s.recent), ("page_size", self.s.page_size))
                       if v is not None})
        return make_tiered(self.model, "sparse", **sparse, **opts)


def close(cache: Any) -> None:
    if hasattr(cache, "close"):
        cache.close()


def failed(exc: BaseException) -> dict[str, Any]:
    """The record of a sparse run that raised: no figures, the error and its traceback."""
    return {"available": False, "note": f"error: {type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}


def label(config: str | float) -> str:
    return config if isinstance(config, str) else f"sparse {100 * config:g}%"


# -- part 1: passkey ------------------------------------------------------------------------------------
def pad_id(model: Any) -> int:
    eos = model.config.eos_token_id
    eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    return eos if eos is not None else 0


def batch_cases(cases: list[PasskeyCase], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The cases' prompts as one left-padded batch ``(ids, attention_mask)``."""
    width = max(c.input_ids.shape[-1] for c in cases)
    ids = torch.full((len(cases), width), pad, dtype=torch.long)
    mask = torch.zeros((len(cases), width), dtype=torch.long)
    for i, c in enumerate(cases):
        n = c.input_ids.shape[-1]
        ids[i, width - n:] = c.input_ids[0]
        mask[i, width - n:] = c.attention_mask[0]
    return ids, mask


def run_passkey(model: Any, tokenizer: Any, cases: list[PasskeyCase], cache: Any, new_tokens: int) -> list[dict[str, Any]]:
    """Greedy answers of ``cases`` decoded as one left-padded batch with ``cache``; a case succeeds when
    its key is in its answer."""
    ids, mask = batch_cases(cases, pad_id(model))
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, **cache_kwargs(cache, model), do_sample=False,
                             max_new_tokens=new_tokens, pad_token_id=pad_id(model))
    results = []
    for row, case in enumerate(cases):
        new = out[row, ids.shape[-1]:].tolist()
        if tokenizer is not None:
            answer = tokenizer.decode(new, skip_special_tokens=True)
            success = case.passkey in answer
        else:
            answer = " ".join(map(str, new))
            k = case.needle_ids
            success = any(new[i:i + len(k)] == k for i in range(len(new) - len(k) + 1))
        results.append({"answer": answer, "success": success})
    return results


# -- part 2: teacher forcing ----------------------------------------------------------------------------
def teacher_forced(model: Any, ids: torch.Tensor, prefix: int, cache: Any,
                   on_step: Callable[[int], None] | None = None) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Prefill ``ids[:, :prefix]`` into ``cache`` in one forward pass, then feed ``ids[:, prefix + t]``
    one token at a time; returns the ``(steps, vocab)`` float32 log-probabilities of each decode step
    (the distribution of token ``prefix + t + 1``) and, for tiered caches, per-step figures read from
    ``stats()`` (reuse and selection counters, whatever names the cache uses)."""
    steps = ids.shape[-1] - prefix - 1
    out = []
    per_step: list[dict[str, Any]] = []
    with torch.no_grad():
        model(ids[:, :prefix], **cache_kwargs(cache, model), use_cache=True)
        for t in range(steps):
            logits = model(ids[:, prefix + t:prefix + t + 1], **cache_kwargs(cache, model), use_cache=True).logits
            out.append(torch.log_softmax(logits[0, -1].float(), dim=-1))
            if hasattr(cache, "stats"):
                per_step.append(find_numbers(cache.stats(), "reuse", "select", "resident", "kv.bytes_fetched"))
            if on_step is not None:
                on_step(t)
    return torch.stack(out), per_step


def compare(reference: torch.Tensor, other: torch.Tensor, targets: torch.Tensor) -> dict[str, Any]:
    """Top-1 agreement, KL(reference || other) per step (nats) and each side's next-token accuracy."""
    kl = (reference.exp() * (reference - other)).sum(-1).clamp_min(0)
    top_ref, top_other = reference.argmax(-1), other.argmax(-1)
    return {"top1_agreement": float((top_ref == top_other).float().mean()), "mean_kl": float(kl.mean()),
            "max_kl": float(kl.max()), "kl_per_step": kl.tolist(),
            "next_token_accuracy": float((top_other == targets).float().mean()),
            "reference_next_token_accuracy": float((top_ref == targets).float().mean())}


# -- driver ---------------------------------------------------------------------------------------------
PARTS = ("passkey", "tf")


def run(s: Settings, workdir: Path, *, show_progress: bool = True, parts: tuple[str, ...] = PARTS) -> dict[str, Any]:
    """Run ``parts`` (``"passkey"``, ``"tf"``: teacher forcing) and return their records."""
    model, tokenizer = load_bench_model(s.model)
    vocab = model.config.vocab_size
    available, why = sparse_available()
    cases = passkey_cases(s, tokenizer, vocab)
    ids, source = prose_ids(s, tokenizer, vocab)
    factory = CacheFactory(model, s, workdir)
    sparse_note: str | None = None if available else why

    groups: dict[int, list[int]] = {}  # passkey cases of one context are decoded as one batch
    for i, c in enumerate(cases):
        groups.setdefault(c.context, []).append(i)
    configs_pk: list[str | float] = [FULL, *([EXACT] if s.passkey_exact else []), *s.passkey_budgets]
    n_jobs = (len(groups) * len(configs_pk) if "passkey" in parts else 0) + \
        ((2 + len(s.tf_budgets)) * (s.tf_steps + 1) if "tf" in parts else 0)
    bar = tqdm(total=n_jobs, desc="sparse accuracy", unit="job", disable=not show_progress)

    def tiered(config: str | float, tokens: int, extra: int, batch: int = 1) -> tuple[Any | None, dict[str, Any] | None]:
        """``(cache, None)``, or ``(None, record)`` for a sparse configuration that is not available or
        whose construction raised (full and exact errors propagate)."""
        nonlocal sparse_note
        if config not in (FULL, EXACT) and sparse_note is not None:
            return None, {"available": False, "note": sparse_note}
        try:
            return factory.make(config, tokens, extra, batch), None
        except SparseUnavailable as exc:
            sparse_note = str(exc)
            return None, {"available": False, "note": sparse_note}
        except Exception as exc:  # noqa: BLE001 - e.g. an option the sparse mode refuses: reported, run goes on
            if config in (FULL, EXACT):
                raise
            return None, failed(exc)

    # Part 1.  References (full, exact) for every case first, then sparse: a sparse run prepares the model
    # (for_model), and the reference must not depend on whether that preparation is undone correctly.
    passkey: list[dict[str, Any]] = [{"context": c.context, "tokens": c.input_ids.shape[-1], "depth": c.depth,
                                      "seed": c.seed, "passkey": c.passkey, "runs": {}} for c in cases]
    for config in (configs_pk if "passkey" in parts else []):
        for context, members in groups.items():
            bar.set_postfix_str(f"passkey {label(config)} ctx {context} x {len(members)}")
            batch = [cases[i] for i in members]
            width = max(c.input_ids.shape[-1] for c in batch)
            cache, record = tiered(config, width, s.new_tokens, len(batch))
            if cache is None:
                for i in members:
                    passkey[i]["runs"][label(config)] = record
            else:
                try:
                    t0 = time.perf_counter()
                    answers = run_passkey(model, tokenizer, batch, cache, s.new_tokens)
                    extra: dict[str, Any] = {"seconds_batch": time.perf_counter() - t0, "batch": len(batch)}
                    if config != FULL:
                        stats = cache.stats()
                        extra.update(reuse_rate=reuse_rate(stats), stats=stats)
                    for i, result in zip(members, answers):
                        passkey[i]["runs"][label(config)] = {"available": True, **result, **extra}
                except Exception as exc:  # noqa: BLE001 - a sparse failure is reported, the run goes on
                    if config in (FULL, EXACT):
                        raise
                    for i in members:
                        passkey[i]["runs"][label(config)] = failed(exc)
                finally:
                    close(cache)
            bar.update(1)

    # Part 2.
    targets = ids[0, s.tf_prefix + 1:]
    tf: dict[str, Any] = {"source": source, "prefix_tokens": s.tf_prefix, "steps": s.tf_steps, "runs": {}}
    reference = None
    for config in ([FULL, EXACT, *s.tf_budgets] if "tf" in parts else []):
        bar.set_postfix_str(f"teacher forcing {label(config)}")
        cache, record = tiered(config, s.tf_prefix, s.tf_steps)
        if cache is None:
            tf["runs"][label(config)] = record
            bar.update(s.tf_steps + 1)
            continue
        try:
            bar.update(1)
            t0 = time.perf_counter()
            logp, per_step = teacher_forced(model, ids, s.tf_prefix, cache, on_step=lambda t: bar.update(1))
            seconds = time.perf_counter() - t0
            stats = cache.stats() if config != FULL else None
        except Exception as exc:  # noqa: BLE001 - a sparse failure is reported, the run goes on
            if config in (FULL, EXACT):
                raise
            tf["runs"][label(config)] = failed(exc)
            continue
        finally:
            close(cache)
        if config == FULL:
            reference = logp
            tf["runs"][FULL] = {"available": True, "seconds": seconds,
                                "next_token_accuracy": float((logp.argmax(-1) == targets).float().mean())}
            continue
        tf["runs"][label(config)] = {"available": True, "budget": None if config == EXACT else config, "seconds": seconds,
                                     **compare(reference, logp, targets), "reuse_rate": reuse_rate(stats),
                                     "per_step": per_step, "stats": stats}
    bar.close()
    return {"passkey": passkey, "teacher_forcing": tf, "sparse_available": sparse_note is None,
            "sparse_note": sparse_note, "configs": [label(c) for c in configs_pk]}


def summarise(results: dict[str, Any], s: Settings) -> list[dict[str, Any]]:
    """The target lines: per passkey budget (sparse succeeds wherever full does) and the 25 % top-1 target."""
    lines = []
    for b in s.passkey_budgets:
        name = label(b)
        runs = [(r["runs"][FULL], r["runs"].get(name, {})) for r in results["passkey"]]
        if not all(sp.get("available") for _, sp in runs):
            note = next(sp.get("note") for _, sp in runs if not sp.get("available"))
            lines.append({"what": f"passkey, {name}", "figure": None, "target": "sparse ⊇ full successes", "met": None,
                          "note": note})
            continue
        full_ok = sum(f["success"] for f, _ in runs)
        both = sum(f["success"] and sp["success"] for f, sp in runs)
        reuse = [sp["reuse_rate"] for _, sp in runs if sp.get("reuse_rate") is not None]
        lines.append({"what": f"passkey, {name}", "figure": f"{both}/{full_ok} of full's successes "
                      f"({sum(sp['success'] for _, sp in runs)}/{len(runs)} cases in all)",
                      "reuse_rate": statistics.median(reuse) if reuse else None,
                      "target": "sparse succeeds on every case full succeeds on",
                      "met": both == full_ok if full_ok else None})  # no full success: nothing to judge
    exact_pk = [(r["runs"][FULL]["success"], r["runs"][EXACT]["success"]) for r in results["passkey"] if EXACT in r["runs"]]
    if exact_pk:
        lines.append({"what": "passkey, exact tiered (control)", "figure": f"{sum(e for _, e in exact_pk)}/{len(exact_pk)} "
                      f"(full {sum(f for f, _ in exact_pk)}/{len(exact_pk)})", "target": "same cases as full",
                      "met": all(f == e for f, e in exact_pk)})
    runs = results["teacher_forcing"]["runs"]
    for b in [EXACT, *s.tf_budgets]:
        r = runs.get(label(b), {})
        target = 0.99 if b == 0.25 else (1.0 if b == EXACT else None)
        if not r.get("available"):
            lines.append({"what": f"teacher-forced top-1, {label(b)}", "figure": None,
                          "target": f">= {target:g}" if target else "–", "met": None, "note": r.get("note")})
            continue
        lines.append({"what": f"teacher-forced top-1, {label(b)}", "figure": r["top1_agreement"],
                      "mean_kl": r["mean_kl"], "reuse_rate": r.get("reuse_rate"),
                      "target": f">= {target:g}" if target else "–",
                      "met": None if target is None else r["top1_agreement"] >= target})
    return lines


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _short(note: str | None) -> str:
    """A table cell for a row that was not measured (the full reason is in the header and the JSON)."""
    return SPARSE_UNAVAILABLE if note and note.startswith(SPARSE_UNAVAILABLE) else (note or "–")[:100]


def write_results(results: dict[str, Any], summary: list[dict[str, Any]], meta: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "sparse_accuracy.json").write_text(json.dumps({"meta": meta, "summary": summary, **results},
                                                         indent=1, default=str))
    s = meta["settings"]
    tf = results["teacher_forcing"]
    lines = ["# Sparse decode accuracy (CPU)", "",
             f"`{meta['command']}` on {meta['machine']} ({meta['cpus']} CPUs), {meta['date_utc']} UTC, "
             f"{meta['runtime_s']:.0f} s; model {s['model']}, strategy {s['strategy']}, torch threads {s['threads']}. "
             "Reference: full attention (`DynamicCache`); control: exact `TieredKVCache`. Tiered caches hold "
             f"{100 * s['host_fraction']:g}% of the prompt's KV in the host tier, the rest on disk.", ""]
    if meta.get("quick"):
        lines += ["**Quick run**: tiny random model; the figures say the code runs, not how accurate sparse is.", ""]
    if not results["sparse_available"]:
        lines += [f"**{results['sparse_note']}** — sparse rows are marked, not measured.", ""]
    lines += ["## Targets", "", "Reuse rate: the cache's own figure at the end of the run (passkey: median over cases).", "",
              "| what | figure | mean KL | reuse rate | target | met |", "|---|---|---|---|---|---|"]
    for line in summary:
        met = {True: "met", False: "**not met**", None: "–"}[line["met"]]
        figure = _fmt(line["figure"]) if line["figure"] is not None else _short(line.get("note"))
        lines.append(f"| {line['what']} | {figure} | {_fmt(line.get('mean_kl'))} | {_fmt(line.get('reuse_rate'))} "
                     f"| {line['target']} | {met} |")
    lines += ["", f"## Passkey retrieval ({len(results['passkey'])} cases, {s['new_tokens']} greedy tokens)", "",
              "| context | tokens | depth | key | " + " | ".join(results["configs"]) + " |",
              "|---|---|---|---|" + "---|" * len(results["configs"])]
    for r in results["passkey"]:
        cells = []
        for name in results["configs"]:
            run = r["runs"][name]
            cells.append("n/a" if not run.get("available") else ("ok" if run["success"] else f"fail (`{run['answer'][:24]}`)"))
        lines.append(f"| {r['context']} | {r['tokens']} | {r['depth']:g} | {r['passkey']} | " + " | ".join(cells) + " |")
    lines += ["", "## Teacher-forced agreement with full attention", "",
              f"Text: {tf['source']}. Prefix {tf['prefix_tokens']} tokens prefilled exactly, then {tf['steps']} "
              "teacher-forced decode steps. KL(full || other) in nats per step.", "",
              "| config | top-1 agreement | mean KL | max KL | next-token accuracy (full's) | reuse rate |",
              "|---|---|---|---|---|---|"]
    for name, r in tf["runs"].items():
        if name == FULL:
            continue
        if not r.get("available"):
            lines.append(f"| {name} | {_short(r.get('note'))} | | | | |")
            continue
        lines.append(f"| {name} | {r['top1_agreement']:.4f} | {r['mean_kl']:.3g} | {r['max_kl']:.3g} | "
                     f"{r['next_token_accuracy']:.3f} ({r['reference_next_token_accuracy']:.3f}) | {_fmt(r.get('reuse_rate'))} |")
    (out / "sparse_accuracy.md").write_text("\n".join(lines) + "\n")
    plot(results, out / "sparse_accuracy.png")


def plot(results: dict[str, Any], path: Path) -> None:
    """Left: passkey success per case and configuration; right: top-1 agreement and mean KL per budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    configs = results["configs"]
    grid = [[(1.0 if r["runs"][c]["success"] else 0.0) if r["runs"][c].get("available") else 0.5 for c in configs]
            for r in results["passkey"]]
    if not grid:  # --tf-only
        ax1.text(0.5, 0.5, "no passkey part (--tf-only)", ha="center", va="center")
        grid = [[0.5] * len(configs)]
    ax1.imshow(list(map(list, zip(*grid))), aspect="auto", cmap="RdYlGn", vmin=0, vmax=1, interpolation="nearest")
    ax1.set_yticks(range(len(configs)))
    ax1.set_yticklabels(configs)
    ax1.set_xticks(range(len(grid)))
    ax1.set_xticklabels([f"{r['context']}/{r['depth']:g}" for r in results["passkey"]], rotation=90, fontsize=6)
    ax1.set_xlabel("context / needle depth")
    ax1.set_title("passkey: green success, red failure, yellow n/a")
    runs = [(r["budget"], r) for r in results["teacher_forcing"]["runs"].values()
            if r.get("available") and r.get("budget") is not None]
    if runs:
        xs = [100 * b for b, _ in runs]
        ax2.plot(xs, [r["top1_agreement"] for _, r in runs], "o-", label="top-1 agreement")
        ax2.axhline(0.99, color="gray", ls="--", lw=0.8, label="target at 25% (0.99)")
        ax2.set_xscale("log", base=2)
        ax2.set_xticks(xs)
        ax2.set_xticklabels([f"{x:g}%" for x in xs])
        ax2.minorticks_off()
        ax2.set_xlabel("budget (% of context)")
        ax2.set_ylabel("top-1 agreement with full attention")
        axk = ax2.twinx()
        axk.plot(xs, [r["mean_kl"] for _, r in runs], "s--", color="tab:red", label="mean KL (nats)")
        axk.set_ylabel("mean KL(full || sparse)")
        handles = ax2.get_legend_handles_labels()[0] + axk.get_legend_handles_labels()[0]
        ax2.legend(handles=handles, loc="lower right", fontsize=7)
    else:
        ax2.text(0.5, 0.5, results.get("sparse_note") or "no sparse runs", ha="center", va="center", wrap=True)
    ax2.set_title("teacher-forced agreement")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _passkey_child(s: Settings, workdir: str, out: str) -> None:
    """``--jobs 2``: the passkey part in a process of its own (spawned), its records written to ``out``."""
    with torch_threads(s.threads):
        res = run(s, Path(workdir), show_progress=False, parts=("passkey",))
    Path(out).write_text(json.dumps(res, default=str))


def run_parts(s: Settings, workdir: Path, jobs: int) -> dict[str, Any]:
    """Both parts: in this process (``jobs == 1``), or the passkey part in a spawned child process while
    this one runs teacher forcing (``jobs == 2``; each process uses ``s.threads`` torch threads)."""
    if jobs == 1:
        with torch_threads(s.threads):
            return run(s, workdir)
    import multiprocessing

    child_dir = workdir / "passkey"
    child_dir.mkdir()
    out = workdir / "passkey.json"
    child = multiprocessing.get_context("spawn").Process(target=_passkey_child, args=(s, str(child_dir), str(out)))
    child.start()
    try:
        with torch_threads(s.threads):
            results = run(s, workdir, parts=("tf",))
    finally:
        child.join()
    if child.exitcode != 0:
        raise RuntimeError(f"the passkey process failed (exit code {child.exitcode}); its traceback is above")
    pk = json.loads(out.read_text())
    results.update(passkey=pk["passkey"], configs=pk["configs"],
                   sparse_available=results["sparse_available"] and pk["sparse_available"],
                   sparse_note=results["sparse_note"] or pk["sparse_note"])
    return results


def _floats(text: str, name: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name} must be comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"{name} is empty")
    return values


def _ints(text: str, name: str) -> tuple[int, ...]:
    values = _floats(text, name)
    if any(v != int(v) or v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{name} must be positive integers, got {text!r}")
    return tuple(int(v) for v in values)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="results directory (default benchmarks/results; --quick: a temp directory)")
    parser.add_argument("--quick", action="store_true", help="tiny random model and sizes (smoke test)")
    parser.add_argument("--model", choices=("smollm2", "tiny"), default=None)
    parser.add_argument("--contexts", type=lambda t: _ints(t, "--contexts"), default=None,
                        help="passkey prompt lengths (default 1024,1536,2048)")
    parser.add_argument("--depths", type=lambda t: _floats(t, "--depths"), default=None,
                        help="needle depths in [0, 1] (default 0.1,...,0.9)")
    parser.add_argument("--budgets", type=lambda t: _floats(t, "--budgets"), default=None,
                        help="teacher-forcing budgets, fractions (default 0.0625,0.125,0.25,0.5)")
    parser.add_argument("--passkey-budgets", type=lambda t: _floats(t, "--passkey-budgets"), default=None,
                        help="passkey budgets, fractions (default 0.125,0.25)")
    parser.add_argument("--prefix", type=int, default=None, help="teacher-forcing prefix tokens (default 4096)")
    parser.add_argument("--steps", type=int, default=None, help="teacher-forced decode steps (default 256)")
    parser.add_argument("--strategy", choices=("attention-aware", "fetch-every-step"), default=None)
    parser.add_argument("--jobs", type=int, choices=(1, 2), default=1,
                        help="2: passkey cases in a second process while this one runs teacher forcing")
    parser.add_argument("--page-size", type=int, default=None, help="sparse selection page (default: the cache's)")
    parser.add_argument("--threads", type=int, default=None, help=f"torch threads (default {DEFAULT_THREADS})")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch directory for the disk tier")
    parser.add_argument("--tf-only", action="store_true",
                        help="teacher forcing only (no passkey part): minutes per budget instead of the full run")
    parser.add_argument("--text", choices=("pydoc", "licences"), default=None,
                        help="teacher-forcing text: pydoc (default: _texts.english_prose) or licences "
                             "(/usr/share/common-licenses legal prose)")
    parser.add_argument("--offset", type=int, default=None,
                        help="tokens of the text skipped before the teacher-forcing window (default 0)")
    args = parser.parse_args(argv)
    s = Settings.quick() if args.quick else Settings()
    for name, attr in (("model", "model"), ("contexts", "passkey_contexts"), ("depths", "passkey_depths"),
                       ("budgets", "tf_budgets"), ("passkey_budgets", "passkey_budgets"), ("prefix", "tf_prefix"),
                       ("steps", "tf_steps"), ("strategy", "strategy"), ("threads", "threads"),
                       ("page_size", "page_size"), ("text", "tf_text"), ("offset", "tf_offset")):
        if getattr(args, name) is not None:
            setattr(s, attr, getattr(args, name))
    if any(not 0 < b <= 1 for b in (*s.tf_budgets, *s.passkey_budgets)):
        parser.error("budgets must be fractions in (0, 1]")
    if any(not 0 <= d <= 1 for d in s.passkey_depths):
        parser.error("--depths must lie in [0, 1]")
    if s.tf_offset < 0:
        parser.error("--offset must be >= 0")
    if args.tf_only:
        s.passkey_contexts, s.passkey_budgets = (), ()
        args.jobs = 1
    for name in ("tf_prefix", "tf_steps", "threads"):
        if getattr(s, name) < 1:
            parser.error(f"--{name.removeprefix('tf_')} must be positive")
    if args.out is None:
        args.out = Path(tempfile.gettempdir()) / "tiercache-sparse-accuracy-quick" if args.quick else Path("benchmarks/results")
    print(f"sparse_accuracy: {s.passkey_cases} passkey cases x {2 + len(s.passkey_budgets)} configs, teacher forcing "
          f"{s.tf_prefix}+{s.tf_steps} tokens x {2 + len(s.tf_budgets)} configs; estimated runtime "
          f"~{estimate_seconds(s) / 60:.0f} min", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="tiercache-sparse-accuracy-", dir=args.workdir))
    start = time.perf_counter()
    try:
        results = run_parts(s, workdir, args.jobs)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    meta = machine_meta()
    meta.update(command=" ".join(["python", "benchmarks/sparse_accuracy.py", *(argv if argv is not None else sys.argv[1:])]),
                runtime_s=time.perf_counter() - start, settings=asdict(s), quick=args.quick,
                workdir_filesystem=filesystem_of(workdir.parent))
    summary = summarise(results, s)
    write_results(results, summary, meta, args.out)
    for line in summary:
        print(f"{line['what']}: {_fmt(line['figure']) if line['figure'] is not None else line.get('note')} "
              f"(target {line['target']}: {({True: 'met', False: 'NOT met', None: '-'})[line['met']]})")
    print(f"wrote {args.out / 'sparse_accuracy.json'}, .md, .png ({meta['runtime_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
