"""The shipped state machine (tiercache.testing) run against the built-in tiers and policies."""

from hypothesis import HealthCheck, settings

from tiercache.testing import make_cache_machine
from tiercache.tiers import ArenaTier, DiskTier

FAST = settings(max_examples=30, stateful_step_count=40, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])

# (a) Everything fits: every get equals the model and nothing is ever dropped, across close/reopen.
TestRoomy = make_cache_machine(host="1MiB", disk="8MiB", expect_no_evictions=True).TestCase
TestRoomy.settings = FAST

# (b) Tiny tiers: constant demotion and dropping; a get returns the last value put or KeyError for a key
# reported dropped, never anything else.
TestTinyLRU = make_cache_machine(host="4KiB", disk="40KiB", policy="lru").TestCase
TestTinyLRU.settings = FAST

TestTinyLFU = make_cache_machine(host="4KiB", disk="40KiB", policy="lfu").TestCase
TestTinyLFU.settings = FAST

TestTinyScoreZstd = make_cache_machine(host="3KiB", disk="36KiB", policy="score", compression="zstd").TestCase
TestTinyScoreZstd.settings = FAST

# Host only (volatile): nothing to reopen, values are dropped to make room.
TestTinyHostOnly = make_cache_machine(host="4KiB", disk=None).TestCase
TestTinyHostOnly.settings = FAST

# Disk only: every put goes through the chunk files.
TestTinyDiskOnly = make_cache_machine(host=None, disk="40KiB").TestCase
TestTinyDiskOnly.settings = FAST

# Custom tiers through the tier factory (how a user checks their own Tier).
TestCustomTiers = make_cache_machine(
    tier_factory=lambda path: [ArenaTier("fast", 2048), ArenaTier("mid", 5000), DiskTier(path, 30_000)],
).TestCase
TestCustomTiers.settings = FAST
