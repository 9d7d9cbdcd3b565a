"""Counters behind ``Cache.stats()``.  Updated under the cache lock; exported as plain JSON types."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class TierCounters:
    hits: int = 0
    misses: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    read_seconds: float = 0.0
    write_seconds: float = 0.0

    def export(self) -> dict[str, float | int | None]:
        gib = float(1 << 30)
        return {
            "hits": self.hits,
            "misses": self.misses,
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
            "read_gib_per_s": round(self.bytes_read / gib / self.read_seconds, 3) if self.read_seconds else None,
            "write_gib_per_s": round(self.bytes_written / gib / self.write_seconds, 3) if self.write_seconds else None,
        }


@dataclass
class CacheCounters:
    tiers: dict[str, TierCounters]
    puts: int = 0
    gets: int = 0
    misses: int = 0
    evictions: int = 0
    corruptions: int = 0
    ranged_gets: int = 0  # get_many items read with ranges
    bytes_moved: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
