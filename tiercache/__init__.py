"""tiercache: a GPU / host-DRAM / disk tiered tensor cache for PyTorch.

    import torch, tiercache
    with tiercache.Cache(host="256MiB", disk="4GiB", path="/data/tc") as cache:
        cache.put(("doc", 7), torch.randn(4, 1024))
        t = cache.get(("doc", 7))

See ``tiercache.Cache`` for the contract and ``docs/`` for the architecture.
"""

from .cache import Cache
from .config import CacheConfig
from .errors import (
    CacheClosedError,
    CacheLockedError,
    CorruptEntryError,
    FingerprintMismatchError,
    OverBudgetError,
    TierCacheError,
    TierIOError,
)
from .policies import EntryInfo, LFUPolicy, LRUPolicy, Policy, ScorePolicy, make_policy
from .sizes import format_size, parse_size
from .tiers import ArenaTier, DiskTier, Slot, Tier

__version__ = "0.1.0"

__all__ = [
    "ArenaTier", "Cache", "CacheClosedError", "CacheConfig", "CacheLockedError", "CorruptEntryError", "DiskTier",
    "EntryInfo", "FingerprintMismatchError", "LFUPolicy", "LRUPolicy", "OverBudgetError", "Policy", "ScorePolicy", "Slot", "Tier",
    "TierCacheError", "TierIOError", "format_size", "make_policy", "parse_size",
]
