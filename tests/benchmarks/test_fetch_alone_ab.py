"""Smoke test of benchmarks/fetch_alone_ab.py with the tiny model: every variant is timed and the earlier
settings are put back after each call.  No speed is asserted."""

from __future__ import annotations


def test_tiny_run_times_every_variant_and_restores_the_settings(load_benchmark):
    from tiercache import overlap
    from tiercache.tiers import disk
    from tiercache_llm import decode_buffer

    before = disk.SPLIT_BUFFERED, decode_buffer.GROUP_MIN_FIT, overlap._lattices_disjoint
    bench = load_benchmark("fetch_alone_ab")
    medians = bench.measure(load_benchmark("hotpath_fetch").model_config("tiny"), 600, 1, 2, parts=True,
                            host=200_000)
    assert set(medians) == {"new", "old", "plain", "old:split", "old:group", "old:overlap"}
    assert all(ms > 0 for ms in medians.values())
    assert (disk.SPLIT_BUFFERED, decode_buffer.GROUP_MIN_FIT, overlap._lattices_disjoint) == before


def test_old_settings_are_the_earlier_values_for_the_call_only(load_benchmark):
    from tiercache import overlap
    from tiercache.tiers import disk
    from tiercache_llm import decode_buffer

    bench = load_benchmark("fetch_alone_ab")
    seen = []
    bench.old_settings(lambda: seen.append((disk.SPLIT_BUFFERED, decode_buffer.GROUP_MIN_FIT,
                                            overlap._lattices_disjoint(None, [0, 1]))))()
    assert seen == [(True, 1, False)]
    assert disk.SPLIT_BUFFERED is False and decode_buffer.GROUP_MIN_FIT == 2
