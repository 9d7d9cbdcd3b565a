"""Contracts of tiercache_llm's BlockStore found by the audit of 2026-12-07.  Each test failed on the tree
before its fix."""

from __future__ import annotations

import threading

import torch

from tiercache_llm.store import WRITE_QUEUE, BlockStore, KVWriteError

HANG = 20.0


def test_stats_while_a_write_behind_batch_is_checked_count_each_block_once():
    """stats() while the writer checks a batch it has just stored (scores, evictions: a tiercache stats()
    call and a scan of the store's keys) counted that batch both in ``queued_bytes`` and in the tiers'
    payload, so queued + stored exceeded ``held_bytes``; a reader meanwhile got it from the queue."""
    store = BlockStore.open(gpu=None, host="1MiB", disk=None, path=None)
    try:
        store.enable_write_behind(1 << 20)
        inside, release = threading.Event(), threading.Event()
        original = store._check_evictions

        def gated():
            inside.set()
            release.wait(HANG)
            return original()

        store._check_evictions = gated
        value = torch.full((4, 64), 3.0)
        store.put_blocks([("k", value)])
        assert inside.wait(HANG)  # the writer has stored the batch and is checking it
        try:
            kv, tiercache = store.stats()["kv"], store.stats()["tiercache"]
            stored = sum(tier["payload_bytes"] for tier in tiercache["tiers"].values())
            assert kv["held_bytes"] == value.nbytes and kv["live_entries"] == 1
            assert kv["queued_bytes"] + stored == kv["held_bytes"], (kv["queued_bytes"], stored)
            assert store.tiers_of(["k"]) != [WRITE_QUEUE]  # the reader's view agrees: it is in the tiers
            assert torch.equal(store.get_blocks(["k"])[0], value)
        finally:
            release.set()
        store.flush_writes()
        assert store.stats()["kv"]["queued_bytes"] == 0
    finally:
        store.close()


def test_a_write_behind_batch_whose_eviction_check_fails_is_reported_and_still_readable():
    """The writer's check after a stored batch raising (here: a tiercache stats() failure): the blocks, stored,
    stay readable, the queue drains and nothing is lost (before and after the patch above)."""
    store = BlockStore.open(gpu=None, host="1MiB", disk=None, path=None)
    try:
        store.enable_write_behind(1 << 20)
        fail = [True]
        original = store._check_evictions

        def failing():
            if fail[0]:
                fail[0] = False
                raise OSError(5, "injected")
            return original()

        store._check_evictions = failing
        value = torch.full((4, 64), 7.0)
        for call in (lambda: store.put_blocks([("k", value)]), store.flush_writes):
            try:  # (reported at one of these calls, or retried and then not: the batch was stored either way)
                call()
            except KVWriteError as exc:
                assert "injected" in str(exc)
        store.flush_writes()
        assert torch.equal(store.get_blocks(["k"])[0], value)
        assert store.stats()["kv"]["queued_bytes"] == 0 and "k" in store.cache
    finally:
        store.close()
