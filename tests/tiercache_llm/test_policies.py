"""Placement policies for KV blocks, on a real tiercache."""

import torch
import tiercache

from tiercache.policies import EntryInfo
from tiercache_llm.policies import AttentionPlacementPolicy, StreamingKVPolicy


def info(score=0.0, inserted=0):
    return EntryInfo(key="k", nbytes=1, tier="disk", inserted=inserted, last_access=inserted, score=score)


def test_attention_policy_rank_and_promote():
    p = AttentionPlacementPolicy()
    assert p.rank(info(0.0, 5)) < p.rank(info(0.0, 9)) < p.rank(info(0.1, 1))  # least mass, then oldest, leaves first
    assert not p.promote(info(0.0), "disk", "host")  # never attended
    assert p.promote(info(0.5), "disk", "host")
    p.promote_threshold = 1.0
    assert not p.promote(info(0.5), "disk", "host") and p.promote(info(1.0), "disk", "host")
    assert p.rank_reads_access is False and StreamingKVPolicy.rank_reads_access is False


def test_attended_blocks_move_up_and_abandoned_ones_down(tmp_path):
    value = torch.zeros(256)  # 1 KiB
    with tiercache.Cache(host="4KiB", disk="1MiB", path=tmp_path / "c", policy=AttentionPlacementPolicy()) as cache:
        for i in range(12):
            cache.put(i, value)
        assert cache.tier_of(0) == "disk" and cache.tier_of(11) == "host"
        cache.update_scores({0: 5.0, 1: 4.0})  # attention uses the two oldest blocks
        cache.get_many([0, 1])
        assert cache.tier_of(0) == "host" and cache.tier_of(1) == "host"
        cache.update_scores({2: 9.0, 3: 8.0, 4: 7.0, 5: 6.0})  # newer contributions outgrow 0 and 1
        cache.get_many([2, 3, 4, 5])
        assert {cache.tier_of(k) for k in (2, 3, 4, 5)} == {"host"}
        assert cache.tier_of(0) == "disk" and cache.tier_of(1) == "disk"
        # fetch-every-step's policy never promotes
    with tiercache.Cache(host="4KiB", disk="1MiB", path=tmp_path / "d", policy=StreamingKVPolicy()) as cache:
        for i in range(12):
            cache.put(i, value)
        cache.get_many([0, 1])
        assert cache.tier_of(0) == "disk"


def test_deferred_promotions_happen_only_inside_promoting(tmp_path):
    """With defer_promotions, the forward pass's reads leave placement alone; a background read inside
    promoting() promotes (and its thread's flag does not leak to other threads)."""
    import copy
    import threading

    value = torch.zeros(256)
    policy = AttentionPlacementPolicy(defer_promotions=True)
    with tiercache.Cache(host="4KiB", disk="1MiB", path=tmp_path / "c", policy=policy) as cache:
        for i in range(12):
            cache.put(i, value)
        cache.update_scores({0: 5.0, 1: 4.0})
        cache.get_many([0])
        assert cache.tier_of(0) == "disk"  # a foreground read: no promotion
        seen = []
        with policy.promoting():
            other = threading.Thread(target=lambda: seen.append(policy.promote(info(5.0), "disk", "host")))
            other.start()
            other.join()
            cache.get_many([0, 1])
        assert seen == [False]
        assert cache.tier_of(0) == "host" and cache.tier_of(1) == "host"
    twin = copy.deepcopy(policy)  # thread-local state is not copied
    assert twin.defer_promotions and not twin.promote(info(5.0), "disk", "host")


def test_chosen_keys_promote_once_inside_chosen_reads_reusing_the_read(tmp_path):
    """choose(): a chosen key read inside chosen_reads() is promoted (whatever the threshold and the deferral say),
    once; outside it, or unchosen, nothing moves; values read back are unchanged and the counters count it."""
    import copy

    policy = AttentionPlacementPolicy(defer_promotions=True)
    policy.promote_threshold = 100.0
    values = {i: torch.full((256,), float(i)) for i in range(12)}
    with tiercache.Cache(host="4KiB", disk="1MiB", path=tmp_path / "c", policy=policy) as cache:
        for i, v in values.items():
            cache.put(i, v)
        cache.update_scores({i: 1.0 for i in range(12)})
        assert cache.tier_of(0) == "disk" and cache.tier_of(1) == "disk"
        policy.choose([0, 1])
        assert policy.chosen == 2
        cache.get_many([0, 1])  # not inside chosen_reads: no promotion
        assert cache.tier_of(0) == "disk" and policy.chosen == 2
        with policy.chosen_reads():
            got = cache.get_many([0, 2])  # 2 is not chosen
        assert cache.tier_of(0) == "host" and cache.tier_of(2) == "disk" and cache.tier_of(1) == "disk"
        assert torch.equal(got[0], values[0]) and policy.chosen == 1
        assert policy.chosen_entries == 1 and policy.chosen_bytes == values[0].nbytes
        assert cache.stats()["bytes_moved"]["disk->host"] == values[0].nbytes
        policy.choose([])  # a new choice replaces the old one
        with policy.chosen_reads():
            cache.get_many([1])
        assert cache.tier_of(1) == "disk" and policy.chosen_entries == 1
        for i, v in values.items():  # nothing lost, nothing changed
            assert torch.equal(cache.get(i), v)
    policy.choose([5])
    twin = copy.deepcopy(policy)  # the choice is not copied
    assert twin.chosen == 0 and policy.chosen == 1


def test_spread_policy_ranks_by_block_position_then_insertion():
    from tiercache_llm.blocks import block_key
    from tiercache_llm.policies import SpreadStreamingKVPolicy

    p = SpreadStreamingKVPolicy()

    def at(key, inserted):
        return EntryInfo(key=key, nbytes=1, tier="host", inserted=inserted, last_access=inserted)

    late_layer_old_block = at(block_key("u", 9, "kv", 0), inserted=50)
    early_layer_new_block = at(block_key("u", 0, "kv", 3), inserted=4)
    assert p.rank(late_layer_old_block) < p.rank(early_layer_new_block)  # position first, not insertion
    assert p.rank(at(block_key("u", 0, "k", 2), 10)) < p.rank(at(block_key("u", 0, "v", 2), 11))  # then insertion
    assert p.rank(at("foreign", 7)) == (0, 7)  # not a block key: serial 0
    assert not p.promote(late_layer_old_block, "disk", "host")
    assert p.rank_reads_access is False and p.name == "kv-stream-spread"


def test_spread_policy_keeps_the_newest_blocks_of_every_layer_in_the_fast_tier(tmp_path):
    """Blocks written layer by layer (a prefill): kv-stream keeps the last layers in the host tier, the spread
    policy the newest positions of every layer; neither moves a block twice."""
    from tiercache_llm.blocks import block_key
    from tiercache_llm.policies import SpreadStreamingKVPolicy

    value = torch.zeros(256)  # 1 KiB
    keys = [block_key("u", layer, "kv", serial) for layer in range(3) for serial in range(4)]
    held = {}
    for policy in (StreamingKVPolicy(), SpreadStreamingKVPolicy()):
        with tiercache.Cache(host="3KiB", disk="1MiB", path=tmp_path / policy.name, policy=policy) as cache:
            for key in keys:
                cache.put(key, value)
            cache.get_many(keys)
            held[policy.name] = {k for k in keys if cache.tier_of(k) == "host"}
            moved = cache.stats()["bytes_moved"]
            assert dict(moved) == {"host->disk": 9 * value.nbytes}, moved  # 9 blocks demoted once, none promoted
    assert held["kv-stream"] == {block_key("u", 2, "kv", s) for s in (1, 2, 3)}
    assert held["kv-stream-spread"] == {block_key("u", layer, "kv", 3) for layer in range(3)}
