"""tiercache_llm: a tiered KV cache (GPU / host / disk via :mod:`tiercache`) for Hugging Face ``generate``.

    from tiercache_llm import TieredKVCache
    cache = TieredKVCache(model.config, host="2GiB", disk="200GiB", path="/nvme/kv")
    out = model.generate(input_ids, **cache_kwargs(cache, model), max_new_tokens=256)
    # cache_kwargs: cache=cache on transformers >= 5.24, past_key_values=cache before (tiercache_llm.hf_kwargs)

    # sparse decode with attention-aware placement (prepares the model's attention, reversibly)
    cache = TieredKVCache.for_model(model, mode="sparse", budget=0.25, host="2GiB", disk="200GiB", path="/nvme/kv")

Supported transformers: ``>=5.17,<6``.
"""

from .blocks import BlockRef, block_key
from .decode_buffer import DecodeBuffer
from .hf_kwargs import cache_argument, cache_kwargs
from .errors import InconsistentCacheError, KVCapacityError, TieredKVError, UnsupportedModelError
from .kv_cache import SUPPORTED_TRANSFORMERS, TieredKVCache, TieredKVLayer, TieredKVSettings
from .policies import AttentionPlacementPolicy, SpreadStreamingKVPolicy, StreamingKVPolicy
from .sparse_layer import SparseModeError
from .store import BlockStore, KVCounters, KVWriteError

__version__ = "0.1.0"  # the distribution's version (pyproject.toml), shared with tiercache

__all__ = [
    "SUPPORTED_TRANSFORMERS",
    "AttentionPlacementPolicy",
    "SparseModeError",
    "SpreadStreamingKVPolicy",
    "StreamingKVPolicy",
    "BlockRef",
    "BlockStore",
    "DecodeBuffer",
    "InconsistentCacheError",
    "KVCapacityError",
    "KVCounters",
    "KVWriteError",
    "TieredKVCache",
    "TieredKVError",
    "TieredKVLayer",
    "TieredKVSettings",
    "UnsupportedModelError",
    "block_key",
    "cache_argument",
    "cache_kwargs",
]
