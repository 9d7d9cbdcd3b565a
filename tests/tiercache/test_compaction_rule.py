"""The eviction queues' compaction rule (``index.over_compaction_limit``) holds on every path that pushes a
queue item: ``RankedQueue.push`` and the pushes that ``Cache.put`` and ``Cache.put_many``'s direct path
inline.  After every push the heap is within the rule, and it grows right up to the rule's limit before it
is compacted (so no path compacts earlier or later than the rule says)."""

from __future__ import annotations

import pytest
import torch

from tiercache import Cache
from tiercache.index import COMPACT_MIN_ITEMS, COMPACT_RATIO, Entry, RankedQueue, over_compaction_limit


def _limit(live: int) -> int:
    """The largest heap the rule leaves uncompacted for ``live`` entries."""
    return max(COMPACT_MIN_ITEMS, COMPACT_RATIO * (live + 1))


def test_rule():
    assert not over_compaction_limit(COMPACT_MIN_ITEMS, 0)
    assert over_compaction_limit(COMPACT_MIN_ITEMS + 1, 0)
    live = COMPACT_MIN_ITEMS  # the ratio decides
    assert not over_compaction_limit(COMPACT_RATIO * (live + 1), live)
    assert over_compaction_limit(COMPACT_RATIO * (live + 1) + 1, live)


@pytest.mark.parametrize("live", [3, 40])
@pytest.mark.parametrize("path", ["put", "put_many", "push"])
def test_every_push_path_follows_the_rule(path, live):
    value = torch.zeros(16)
    sizes = []
    if path == "push":
        queue = RankedQueue(0)
        entries = [Entry(i, 64, "host", i, i, 0, 0.0) for i in range(live)]
        for entry in entries:
            queue.add(entry)
        for step in range(3 * _limit(live)):
            queue.push(entries[step % live], step)
            assert not over_compaction_limit(len(queue._heap), queue.live)
            sizes.append(len(queue._heap))
    else:
        with Cache(host=1 << 20) as cache:
            queue = cache._queues[0]
            for step in range(3 * _limit(live) + live):
                key = step % live  # overwriting a key leaves its old item stale
                if path == "put":
                    cache.put(key, value)
                else:
                    cache.put_many([(key, value)])
                assert queue.live == min(step + 1, live)
                assert not over_compaction_limit(len(queue._heap), queue.live)
                sizes.append(len(queue._heap))
    assert max(sizes) == _limit(live)  # compacted exactly when the rule says, not before
    assert min(sizes[live:]) <= live + 1
