"""StagingArea: bounded, never needed for correctness, failures counted not raised, close while in flight."""

import concurrent.futures
import threading

import pytest
import torch

from tiercache_llm.sparse.staging import StagingArea

ENTRY = 4 * 1024  # bytes of one float32 entry of 1024 elements


def make(key):
    return torch.empty(1024, dtype=torch.float32)


def fill(keys, outs):
    for key, out in zip(keys, outs):
        out.fill_(float(key))


@pytest.fixture
def pool():
    executor = concurrent.futures.ThreadPoolExecutor(2)
    yield executor
    executor.shutdown(wait=True)


def test_staged_entries_are_the_reader_s_values_and_taken_once(pool):
    area = StagingArea(10 * ENTRY, pool)
    assert area.stage([1, 2, 3], make, fill) == 3
    assert area.stage([2, 3, 4], make, fill) == 1  # 2 and 3 already staged
    for key in (1, 2, 3, 4):
        got = area.take(key)
        assert got is not None and torch.equal(got, torch.full((1024,), float(key)))
        assert area.take(key) is None
    assert area.take(99) is None
    assert area.nbytes == 0
    assert area.counters.hits == 4 and area.counters.entries_requested == 4


def test_capacity_bounds_staged_and_in_flight_bytes(pool):
    release = threading.Event()

    def slow(keys, outs):
        release.wait(5)
        fill(keys, outs)

    area = StagingArea(3 * ENTRY, pool)
    assert area.stage(list(range(5)), make, slow) == 3
    assert area.nbytes == 3 * ENTRY
    assert area.stage([10, 11], make, slow) == 0  # full while the first job is still in flight
    assert area.counters.dropped == 4
    release.set()
    assert area.take(0) is not None
    assert area.stage([10], make, fill) == 1  # room again
    assert area.counters.peak_bytes <= 3 * ENTRY


def test_failed_job_is_counted_and_the_consumer_reads_itself(pool):
    def broken(keys, outs):
        raise OSError("disk on fire")

    area = StagingArea(10 * ENTRY, pool)
    area.stage([1, 2], make, broken)
    area.wait_idle()
    assert area.take(1) is None and area.take(2) is None
    assert area.counters.failed_jobs == 1 and area.counters.failed_entries == 2
    assert area.nbytes == 0


def test_late_job_is_given_up_after_the_wait_limit(pool):
    release, finished = threading.Event(), threading.Event()

    def slow(keys, outs):
        release.wait(60)
        fill(keys, outs)
        finished.set()

    area = StagingArea(10 * ENTRY, pool, wait_timeout=0.05)
    area.stage([7], make, slow)
    assert area.take(7) is None
    assert not finished.is_set()  # given up while the job still ran (no wall-clock bound: CI is slow)
    assert area.counters.late == 1 and area.counters.waits == 1
    release.set()


def test_untaken_entries_expire_after_max_age_steps(pool):
    area = StagingArea(10 * ENTRY, pool, max_age=1)
    area.stage([1], make, fill)
    area.wait_idle()
    area.advance()
    assert 1 in area  # one step old: kept
    area.advance()
    assert 1 not in area and area.nbytes == 0
    assert area.counters.expired == 1


def test_asking_again_renews_an_entry_without_reading_it(pool):
    reads = []

    def counted(keys, outs):
        reads.extend(keys)
        fill(keys, outs)

    area = StagingArea(10 * ENTRY, pool, max_age=1)
    area.stage([1, 2], make, counted)
    area.wait_idle()
    for _ in range(3):  # 1 is asked for at every step: it stays; 2 is not: it expires
        area.advance()
        assert area.stage([1], make, counted) == 0
    assert 1 in area and 2 not in area
    assert sorted(reads) == [1, 2]  # nothing read twice
    assert area.counters.renewed == 3 and area.counters.expired == 1
    got = area.take(1)
    assert got is not None and torch.equal(got, torch.full((1024,), 1.0))


def test_discard_releases_named_or_all_entries(pool):
    area = StagingArea(10 * ENTRY, pool)
    area.stage([1, 2, 3], make, fill)
    area.wait_idle()
    area.discard([2])
    assert 2 not in area and area.nbytes == 2 * ENTRY
    area.discard()
    assert area.nbytes == 0


def test_close_while_in_flight_waits_and_refuses_new_jobs():
    executor = concurrent.futures.ThreadPoolExecutor(1)
    started, release = threading.Event(), threading.Event()

    def slow(keys, outs):
        started.set()
        release.wait(5)
        fill(keys, outs)

    area = StagingArea(10 * ENTRY, executor)
    area.stage([1], make, slow)  # running
    area.stage([2], make, slow)  # queued behind it: cancelled by close
    assert started.wait(5)
    threading.Timer(0.1, release.set).start()
    area.close()
    assert area.nbytes == 0
    assert area.stage([3], make, fill) == 0
    executor.shutdown(wait=True)


def test_negative_capacity_is_refused(pool):
    with pytest.raises(ValueError, match="capacity"):
        StagingArea(-1, pool)


def test_take_many_is_take_of_each_key_in_order(pool):
    release = threading.Event()

    def slow(keys, outs):
        release.wait(5)
        fill(keys, outs)

    def broken(keys, outs):
        raise OSError("read failed")

    area = StagingArea(10 * ENTRY, pool)
    area.stage([1, 2], make, fill)
    area.stage([3], make, slow)
    area.stage([4], make, broken)
    threading.Timer(0.05, release.set).start()  # 3 is still in flight when taken: waited for
    got = area.take_many([3, 99, 1, 4, 2, 1])
    assert [None if g is None else float(g[0]) for g in got] == [3.0, None, 1.0, None, 2.0, None]
    assert area.nbytes == 0 and area.take_many([]) == []
    assert area.counters.hits == 3 and area.counters.waits >= 1 and area.counters.late == 0
