"""Preparing a transformers model for sparse :class:`~tiercache_llm.TieredKVCache` decoding.

:func:`prepare_model` (called by ``TieredKVCache.for_model(model, mode="sparse", ...)``):

1. registers, once per process, an attention function named ``tiercache_sparse_<base>`` through
   ``transformers.AttentionInterface`` and the *same* mask function as ``<base>`` under that name
   through ``AttentionMaskInterface`` (registering only the attention would silently drop the causal
   and padding mask), where ``<base>`` is the model's current implementation (``"sdpa"`` or
   ``"eager"``);
2. switches the model to it with ``model.set_attn_implementation``;
3. adds a forward pre-hook and post-hook (``always_call``) on the model's decoder module that publish
   the ``past_key_values`` of the running forward pass to the attention function (transformers does
   not pass the cache to attention functions) and announce the pass to a sparse cache; for any
   ``TieredKVCache`` (exact ones too) they mark the pass's start and end, so a pass that raised after
   updating some layers leaves the cache marked inconsistent (``InconsistentCacheError`` at its next use).

A sparse decode step of an eager model raises ``SparseModeError`` when the pass records attention weights
(``output_attentions=True``): it has no weights over the context to return (sdpa returns none anyway).
A sparse decode step given a 4-D attention mask that hides other context tokens than the recorded padding
raises ``SparseModeError`` too (:func:`~tiercache_llm.sparse_layer.check_context_mask`): it attends by the
recorded validity, where dense attention would follow the mask.

The attention function behaves exactly like the base implementation (it calls it) whenever the
running pass's cache is not a sparse ``TieredKVCache`` -- a ``DynamicCache``, an exact
``TieredKVCache``, no cache -- and for every layer/step the sparse cache handles exactly (prefill,
multi-token steps, sliding-window layers), so one prepared model serves all of them in turn.

:func:`restore_model` undoes 2 and 3 (the registrations stay: they are inert names).  The
preparation is idempotent and reference-free: preparing twice is a no-op, restoring an unprepared
model is a no-op.  Thread safety: the running cache is held in a ``contextvars.ContextVar``, so
concurrent forward passes in different threads each see their own.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from transformers.cache_utils import Cache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

try:  # the collector of output_attentions / output_hidden_states (transformers >= 5)
    from transformers.utils.output_capturing import _active_collector as _collector
except ImportError:  # pragma: no cover - older layouts: weights cannot be requested that way
    _collector = None


__all__ = ["PREFIX", "is_prepared", "prepare_model", "restore_model", "sparse_attention"]

PREFIX = "tiercache_sparse_"
BASES = ("sdpa", "eager")
_ATTR = "_tiercache_sparse_preparation"
_HOOKED = "_tiercache_sparse_hooked"  # set on the decoder module a preparation hooked
_RUNNING: contextvars.ContextVar[Any] = contextvars.ContextVar("tiercache_running_cache", default=None)
# The caches of the enclosing (nested) forward passes, per context like _RUNNING: a stack kept on the module
# was shared by threads, so one thread's post-hook popped another's ContextVar token and raised.
_OUTER: contextvars.ContextVar[tuple] = contextvars.ContextVar("tiercache_outer_caches", default=())


@dataclass
class _Preparation:
    original: str
    name: str
    handles: list


def _base_function(base: str, module: torch.nn.Module):
    if base == "eager":
        fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if fn is None:
            raise RuntimeError(f"{type(module).__name__}'s module defines no eager_attention_forward")
        return fn
    return ALL_ATTENTION_FUNCTIONS[base]


def _make_attention(base: str):
    def tiercache_sparse_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
        cache = _RUNNING.get()
        layer_idx = getattr(module, "layer_idx", None)
        state = None
        if cache is not None and getattr(cache, "_sparse", None) is not None and layer_idx is not None:
            layer = cache.layers[layer_idx]
            state = layer.sparse
        if state is None or state.pending is None:
            return _base_function(base, module)(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        kind, arg = state.pending
        state.pending = None
        if kind == "exact":
            q = arg
            valid = _valid(attention_mask, key.shape[0], q, key.device)
            state.append(key[:, :, -q:], valid)
            return _base_function(base, module)(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        ctx = arg
        _check_plain_attention(module, kwargs)
        if base == "eager" and _attentions_requested():
            from .sparse_layer import SparseModeError

            raise SparseModeError(
                "output_attentions=True: sparse TieredKVCache decode steps compute no attention weights over the "
                "context (eager attention would return them); use mode='exact' (or a DynamicCache) to read them"
            )
        if query.shape[2] != 1:
            raise RuntimeError(f"sparse decode expects one query position, got {query.shape[2]}")
        if cache._sparse.custom_mask:  # a 4-D mask the recorded validity would ignore raises
            _check_context(attention_mask, state.valid, ctx, layer_idx)
        out = state.decode(layer, query, key, value, ctx, scaling)  # both keep the cache's state normal
        state.append(key, _valid(attention_mask, key.shape[0], 1, key.device))  # tensors (tensor_modes)
        return out.transpose(1, 2).contiguous(), None

    tiercache_sparse_attention.__qualname__ = f"tiercache_sparse_attention[{base}]"
    return tiercache_sparse_attention


# Attention-function arguments that change the softmax itself (logit soft-capping as in Gemma 2, learned
# attention sinks as in gpt-oss), which sparse decode does not implement: with them set, a sparse decode
# step raises instead of returning attention that differs from the model's even at a dense budget.
_UNSUPPORTED_KWARGS = {"softcap": "attention logit soft-capping", "s_aux": "attention sinks (s_aux)",
                       "sinks": "attention sinks"}
_UNSUPPORTED_CONFIG = {"attn_logit_softcapping": "attention logit soft-capping"}


def _check_plain_attention(module, kwargs) -> None:
    """Raise ``SparseModeError`` when this layer call passes what sparse decode does not implement (runs
    every sparse decode step and layer: the error's import is paid only when raising)."""
    problem = None
    for name, what in _UNSUPPORTED_KWARGS.items():
        if kwargs.get(name) is not None:
            problem = (f"{type(module).__name__} uses {what} ({name}=...), which sparse TieredKVCache decoding "
                       "does not implement; use mode='exact' for this model")
            break
    else:
        if kwargs.get("dropout", 0.0) and module.training:
            problem = "sparse TieredKVCache decoding does not implement attention dropout; call model.eval()"
    if problem is not None:
        from .sparse_layer import SparseModeError

        raise SparseModeError(problem)


def _attentions_requested() -> bool:
    """Whether the running forward pass records attention weights (``output_attentions=True``, read from
    transformers' output collector; ``False`` where that machinery is absent)."""
    if _collector is None:
        return False
    collected = _collector.get()
    return collected is not None and "attentions" in collected


def unsupported_attention(model: torch.nn.Module) -> str | None:
    """What in ``model`` sparse decoding cannot reproduce (see ``_UNSUPPORTED_KWARGS``), or ``None``:
    read from its config (soft-capping) and its attention modules (a ``sinks`` parameter)."""
    config = getattr(model, "config", None)
    for cfg in (config, getattr(config, "get_text_config", lambda: None)()):
        for name, what in _UNSUPPORTED_CONFIG.items():
            if cfg is not None and getattr(cfg, name, None) is not None:
                return f"{what} ({name}={getattr(cfg, name)!r})"
    for module in model.modules():
        if isinstance(getattr(module, "sinks", None), torch.nn.Parameter):
            return f"attention sinks ({type(module).__name__}.sinks)"
    return None


def _check_context(mask, valid, ctx, layer_idx):
    from .sparse_layer import check_context_mask

    check_context_mask(mask, valid, ctx, layer_idx)


def _valid(mask, batch, q, device):
    from .sparse_layer import valid_from_mask

    return valid_from_mask(mask, batch, q, device)


def _register(base: str) -> str:
    name = PREFIX + base
    if name not in ALL_ATTENTION_FUNCTIONS.valid_keys():
        AttentionInterface.register(name, _make_attention(base))
    if name not in ALL_MASK_ATTENTION_FUNCTIONS.valid_keys():
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


def _find_cache(args: tuple, kwargs: dict) -> Any:
    cache = kwargs.get("past_key_values")
    if cache is None:  # transformers >= 5.25 passes it as ``cache`` (``past_key_values`` is deprecated)
        cache = kwargs.get("cache")
    if cache is None:
        cache = next((a for a in args if isinstance(a, Cache)), None)
    return cache


def _custom_mask(args: tuple, kwargs: dict) -> bool:
    """Whether the pass was given a 4-D attention mask (transformers builds its own from a 2-D one)."""
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor):
        return mask.dim() == 4
    return any(isinstance(a, torch.Tensor) and a.dim() == 4 for a in args)


def _pre_hook(module, args, kwargs):
    cache = _find_cache(args, kwargs)
    _OUTER.set(_OUTER.get() + (_RUNNING.get(),))
    _RUNNING.set(cache)
    begin = getattr(cache, "_begin_pass", None)  # any TieredKVCache: failed-pass detection (kv_cache.py)
    if begin is not None:
        begin()
    ctrl = getattr(cache, "_sparse", None)
    if ctrl is not None:
        impl = module.config._attn_implementation
        if not (isinstance(impl, str) and impl.startswith(PREFIX)):
            raise RuntimeError(
                f"a sparse TieredKVCache needs the model's attention prepared by TieredKVCache.for_model; the model "
                f"uses {impl!r} now (was set_attn_implementation called afterwards?)"
            )
        ctrl.begin_forward(impl, custom_mask=_custom_mask(args, kwargs))
    return None


def _post_hook(module, args, kwargs, output):
    cache = _RUNNING.get()
    outer = _OUTER.get()
    if outer:
        _RUNNING.set(outer[-1])
        _OUTER.set(outer[:-1])
    end = getattr(cache, "_end_pass", None)
    if end is not None:  # before _end_forward, which clears the sparse layers' pending records it reads
        end(output is None)
    if getattr(cache, "_sparse", None) is not None:
        cache._end_forward(failed=output is None)  # None: the pass raised (always_call hook)
    return None


def _decoder(model: torch.nn.Module) -> torch.nn.Module:
    get = getattr(model, "get_decoder", None)
    decoder = get() if callable(get) else None
    return decoder if isinstance(decoder, torch.nn.Module) else model


def is_prepared(model: torch.nn.Module) -> bool:
    return getattr(model, _ATTR, None) is not None


def prepare_model(model: torch.nn.Module) -> str:
    """Switch ``model`` to the sparse-capable attention (see the module docstring); returns its name.
    Idempotent; a module already served by the preparation of another sharing its config and decoder (a
    causal LM and its base model) is left as it is (restoring stays with the prepared one).  Raises ``ValueError`` for an implementation other than sdpa/eager (flash, flex) and
    ``UnsupportedModelError`` for attention sparse decoding does not implement (logit soft-capping,
    attention sinks: :func:`unsupported_attention`)."""
    prep = getattr(model, _ATTR, None)
    if prep is not None:
        return prep.name
    unsupported = unsupported_attention(model)
    if unsupported is not None:
        from .errors import UnsupportedModelError

        raise UnsupportedModelError(
            f"{type(model).__name__} uses {unsupported}, which sparse TieredKVCache decoding does not implement; "
            "use mode='exact' for this model"
        )
    original = model.config._attn_implementation
    if isinstance(original, str) and original.startswith(PREFIX):
        if getattr(_decoder(model), _HOOKED, False):
            # Prepared through another module sharing this config and decoder (the causal LM around this base
            # model, or the base model inside it): already served.  Restoring is that module's to do.
            return original
        raise ValueError(
            f"{type(model).__name__}'s attention is already {original!r}, but no tiercache preparation hooks its "
            "decoder; restore the module that was prepared (restore_model on it) and prepare this one"
        )
    if original not in BASES:
        raise ValueError(
            f"sparse TieredKVCache decoding wraps the 'sdpa' or 'eager' attention; this model uses {original!r}. "
            "Load it with attn_implementation='sdpa' (or call model.set_attn_implementation('sdpa')) first"
        )
    name = _register(original)
    model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        raise RuntimeError(f"{type(model).__name__} refused attention implementation {name!r}")
    target = _decoder(model)
    handles = [
        target.register_forward_pre_hook(_pre_hook, with_kwargs=True),
        target.register_forward_hook(_post_hook, with_kwargs=True, always_call=True),
    ]
    setattr(target, _HOOKED, True)
    setattr(model, _ATTR, _Preparation(original, name, handles))
    return name


def restore_model(model: torch.nn.Module) -> None:
    """Undo :func:`prepare_model`: the original attention implementation and no hooks.  No-op when the
    model is not prepared."""
    prep = getattr(model, _ATTR, None)
    if prep is None:
        return
    for handle in prep.handles:
        handle.remove()
    target = _decoder(model)
    if hasattr(target, _HOOKED):
        delattr(target, _HOOKED)
    model.set_attn_implementation(prep.original)
    delattr(model, _ATTR)


@contextlib.contextmanager
def sparse_attention(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``with sparse_attention(model): ...`` prepares ``model`` and restores it on exit (when it was not
    prepared before)."""
    was = is_prepared(model)
    prepare_model(model)
    try:
        yield model
    finally:
        if not was:
            restore_model(model)
