"""The keyword a model takes its cache by: ``cache=`` in newer transformers, ``past_key_values=`` before.

transformers 5.24 renamed ``past_key_values=`` to ``cache=`` in ``generate`` and the models' ``forward``
(the old name still works there, with a ``FutureWarning``, until 6.0 for ``generate`` and 5.40 for
``forward``); 5.17 (the low end of our supported range) to 5.23 know only ``past_key_values=``.  A
program that must run on both passes ``**cache_kwargs(cache, model)`` and never sees the warning::

    out = model.generate(input_ids, **cache_kwargs(cache, model), max_new_tokens=256)
    logits = model(ids, **cache_kwargs(cache, model)).logits
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

NEW = "cache"
OLD = "past_key_values"


def _parameters(fn: Any) -> tuple[str, ...] | None:
    try:
        return tuple(inspect.signature(fn).parameters)  # follows functools.wraps (deprecate_kwarg's wrapper)
    except (TypeError, ValueError):
        return None


@functools.lru_cache(maxsize=1)
def _generation_takes_cache() -> bool:
    from transformers import GenerationMixin

    params = _parameters(GenerationMixin.prepare_inputs_for_generation)
    return params is not None and NEW in params


def cache_argument(model: Any = None) -> str:
    """``"cache"`` or ``"past_key_values"``: the keyword ``model`` (its ``forward``; its ``generate``
    follows the same transformers release) takes a ``transformers.Cache`` by.  A model whose ``forward``
    names neither (``**kwargs`` only), or no model, is answered for the installed transformers'
    generation code."""
    if model is not None:
        params = _parameters(getattr(model, "forward", None))
        if params is not None:
            if NEW in params:
                return NEW
            if OLD in params:
                return OLD
    return NEW if _generation_takes_cache() else OLD


def cache_kwargs(cache: Any, model: Any = None) -> dict[str, Any]:
    """``{cache_argument(model): cache}``, to pass as ``**cache_kwargs(cache, model)`` to ``generate`` or
    ``forward``; ``{}`` when ``cache`` is ``None`` (the model's own default cache)."""
    return {} if cache is None else {cache_argument(model): cache}


__all__ = ["cache_argument", "cache_kwargs"]
