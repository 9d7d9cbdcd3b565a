"""Storage mechanisms.  Each tier stores bytes in slots within a byte budget and makes no decisions."""

from .base import EntryHeader, RecoveredEntry, Slot, Tier
from .disk import DiskTier
from .memory import ArenaTier, gpu_tier, host_tier

__all__ = ["ArenaTier", "DiskTier", "EntryHeader", "RecoveredEntry", "Slot", "Tier", "gpu_tier", "host_tier"]
