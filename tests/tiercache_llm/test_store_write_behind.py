"""BlockStore write-behind: queued blocks are readable, the queue is bounded with back-pressure, failures surface
at the next call and lose nothing."""

import threading
import time

import pytest
import torch

from tiercache_llm.store import WRITE_QUEUE, BlockStore, KVWriteError


def block(i):
    return torch.full((4, 64), float(i))


@pytest.fixture
def store():
    s = BlockStore.open(gpu=None, host="1MiB", disk=None, path=None)
    yield s
    s.close()


def wait_for(condition, timeout=30.0):
    """Poll ``condition`` until true; fail after ``timeout`` s (generous: CI machines are slow and shared)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the background writer"
        time.sleep(0.005)


def gate(store):
    """Make the tiercache's put_many wait until the returned event is set."""
    release = threading.Event()
    original = store.cache.put_many

    def slow(items, **kw):
        release.wait(10)
        return original(items, **kw)

    store.cache.put_many = slow
    return release


def test_queued_blocks_are_served_from_the_queue_then_from_the_tier(store):
    store.enable_write_behind(1 << 20)
    release = gate(store)
    src = block(1)
    store.put_blocks([(("kv", "u", 0, "k", 0), src)])
    src.fill_(-1)  # the caller reuses its buffer: the queue holds a copy
    key = ("kv", "u", 0, "k", 0)
    assert store.tiers_of([key]) == [WRITE_QUEUE]
    assert torch.equal(store.get_blocks([key])[0], block(1))
    out = torch.empty(4, 64)
    store.get_blocks([key], out=[out])
    assert torch.equal(out, block(1))
    assert store.counters.queue_hits == 2
    release.set()
    store.flush_writes()
    assert store.tiers_of([key]) == [store.fastest_tier]
    assert store.queued_bytes == 0
    assert torch.equal(store.get_blocks([key])[0], block(1))


def test_back_pressure_blocks_a_put_until_the_writer_catches_up(store):
    entry = block(0).nbytes
    store.enable_write_behind(entry)
    release = gate(store)
    store.put_blocks([(("kv", "u", 0, "k", 0), block(0))])
    done = threading.Event()
    t = threading.Thread(target=lambda: (store.put_blocks([(("kv", "u", 0, "k", 1), block(1))]), done.set()))
    t.start()
    # the put counts its wait before it waits: poll for that, not a fixed sleep (on a loaded machine the
    # thread may not reach the put within any fixed time, and the release would then let it through unwaited)
    wait_for(lambda: store.counters.backpressure_waits == 1)
    assert not done.is_set()  # waiting: the queue is full
    assert store.queued_bytes <= entry
    release.set()
    t.join(10)
    assert done.is_set()
    store.flush_writes()
    assert store.counters.backpressure_waits == 1
    assert [torch.equal(t, block(i)) for i, t in enumerate(store.get_blocks([("kv", "u", 0, "k", 0), ("kv", "u", 0, "k", 1)]))] == [True, True]


def test_a_failed_write_raises_at_the_next_call_and_loses_nothing(store):
    store.enable_write_behind(1 << 20)
    original = store.cache.put_many
    calls = []
    release = threading.Event()

    def failing_once(items, **kw):
        calls.append(len(items))
        if len(calls) == 1:
            release.wait(10)
            raise OSError("injected write failure")
        return original(items, **kw)

    store.cache.put_many = failing_once
    key = ("kv", "u", 0, "v", 3)
    store.put_blocks([(key, block(3))])  # returns before the write fails
    release.set()
    wait_for(lambda: store.counters.write_errors)  # the writer runs in the background
    with pytest.raises(KVWriteError, match="injected write failure"):
        store.get_blocks([key])
    assert torch.equal(store.get_blocks([key])[0], block(3))  # still served from the queue
    store.flush_writes()  # retried, now written
    assert store.tiers_of([key]) == [store.fastest_tier]
    assert store.queued_bytes == 0


def test_scores_set_while_queued_reach_the_tiercache(store):
    store.enable_write_behind(1 << 20)
    release = gate(store)
    key = ("kv", "u", 0, "k", 5)
    store.put_blocks([(key, block(5))])
    store.update_scores({key: 7.5})
    release.set()
    store.flush_writes()
    entry = store.cache._index[key]
    assert entry.info.score == 7.5


def test_close_with_writes_queued_drops_them_cleanly():
    store = BlockStore.open(gpu=None, host="1MiB", disk=None, path=None)
    store.enable_write_behind(1 << 20)
    release = gate(store)
    store.put_blocks([(("kv", "u", 0, "k", i), block(i)) for i in range(3)])
    threading.Timer(0.1, release.set).start()
    store.close()
    assert store.closed and store.live_entries == 0 and store.queued_bytes == 0


def test_write_behind_limit_is_validated(store):
    with pytest.raises(ValueError, match="max_bytes"):
        store.enable_write_behind(-1)
    store.enable_write_behind(1 << 20)
    store.put_blocks([(("kv", "u", 0, "k", 9), block(9))])
    store.enable_write_behind(0)  # drains, then writes are synchronous again
    assert store.queued_bytes == 0 and store.tiers_of([("kv", "u", 0, "k", 9)]) == [store.fastest_tier]
