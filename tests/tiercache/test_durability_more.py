"""Durability and concurrency contracts beyond test_durability.py and test_api_contracts_more.py: close()
must wait for every piece of work an operation started (no slot discarded, no file touched after close
returns), and a disk tier that is closed never deletes a chunk file any more."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from tiercache import Cache, TierIOError
from tiercache.tiers.disk import DiskTier


class _Later(list):
    """Stands in for ``cache._later_releases`` (the releases that ``_put_direct`` leaves for after the
    lock) to force one interleaving of two direct puts: thread "B" (which replaced nothing) looks at the
    shared list after its lock section only once thread "A" has added its release to it, and "A" looks
    only once "B" has started finishing."""

    def __init__(self, cache, events):
        super().__init__()
        self.cache, self.events = cache, events

    def __iadd__(self, other):
        out = super().__iadd__(other)
        if threading.current_thread().name == "A" and other:
            self.events["a_added"].set()
        return out

    def __bool__(self):
        name = threading.current_thread().name
        if not self.cache._lock._is_owned():  # the check after the lock section
            if name == "B":
                self.events["b_waiting"].set()
                self.events["a_added"].wait(2)
            elif name == "A":
                self.events["b_took"].wait(2)
        return len(self) > 0


def test_close_waits_for_the_releases_of_a_direct_put(tmp_path):
    """A put_many whose small CPU values replace disk entries leaves the old disk slots to be discarded
    after its lock section, through state shared by every thread.  Another put_many could take them and
    discard them after its own operation had ended: close() then persisted and closed the disk tier while
    that discard was still running (it ran on a closed tier, after close returned)."""
    store = tmp_path / "store"
    old, new, other = torch.full((64,), 1.0), torch.full((64,), 2.0), torch.full((64,), 3.0)
    with Cache(host="1MiB", disk="16MiB", path=store) as cache:
        cache.put("k0", old)
    cache = Cache(host="1MiB", disk="16MiB", path=store)
    assert cache.tier_of("k0") == "disk"
    events = {name: threading.Event() for name in ("a_added", "b_waiting", "b_took")}
    cache._later_releases = _Later(cache, events)
    finish = cache._finish
    late: list[bool] = []

    def slow(releases, **kw):
        name = threading.current_thread().name
        if name in ("A", "B") and len(releases):  # (close's own moves finish in the main thread)
            if name == "B":
                events["b_took"].set()
            deadline = time.monotonic() + 1.0  # a close that waits for this finish never gets there
            while not cache._closed and time.monotonic() < deadline:
                time.sleep(0.005)
            late.append(cache._closed)
        return finish(releases, **kw)

    cache._finish = slow
    b = threading.Thread(target=lambda: cache.put_many([("kb", other)]), name="B")
    b.start()
    events["b_waiting"].wait(2)  # (never set once B no longer looks at the shared list: fine)
    a = threading.Thread(target=lambda: cache.put_many([("k0", new)]), name="A")
    a.start()
    a.join(10)
    cache.close()
    b.join(10)
    assert late and not any(late), "a put's disk slot was discarded after close() returned"
    with Cache(host="1MiB", disk="16MiB", path=store) as cache:
        assert torch.equal(cache.get("k0"), new)
        assert torch.equal(cache.get("kb"), other)


def test_a_closed_disk_tier_deletes_no_chunk_file(tmp_path):
    """A discard that reaches a disk tier after its close() (a release finished late) must not delete a
    chunk file: index.tc already names the files to keep, and another process may own the store by then.
    It raises TierIOError and leaves the file; the entry comes back after a reopen."""
    store = tmp_path / "store"
    value = torch.arange(256, dtype=torch.float32)
    cache = Cache(host=None, disk="16MiB", path=store)
    cache.put("k", value)
    disk = cache.tiers[-1]
    slot = cache._index["k"].slot
    path = disk.chunk_path(slot)
    cache.close()
    assert os.path.exists(path)
    with pytest.raises(TierIOError):
        disk.discard(slot)
    assert os.path.exists(path)
    with Cache(host=None, disk="16MiB", path=store) as cache:
        assert torch.equal(cache.get("k"), value)


def test_a_discard_racing_the_disk_tiers_close_keeps_the_indexed_copy(tmp_path):
    """Two copies of one key with the same sequence number (a promotion's released source and the copy
    persisted back) at DiskTier.close: close keeps one in index.tc and deletes the other.  A discard of
    either arriving after close has picked must not delete the kept one."""
    store = tmp_path / "store"
    value = torch.arange(1024, dtype=torch.float32)
    with Cache(host=None, disk="16MiB", path=store) as cache:
        cache.put("k", value)
    cache = Cache(host="1MiB", disk="16MiB", path=store)
    source = cache._index["k"].slot
    with cache._lock:  # hold the disk copy back as if a get's release of it were still pending
        cache._pin(1, source)
    assert torch.equal(cache.get("k"), value)  # promoted: the disk slot's release is deferred by our pin
    assert cache.tier_of("k") == "host"
    with cache._lock:
        releases = cache._unpin(1, source)
    assert releases == [(1, source)]
    cache.close()  # persists "k" to a second slot, same key and seq; one of the two files is deleted
    for tier_index, slot in releases:  # the late discard of the source slot
        try:
            cache._tiers[tier_index].discard(slot)
        except TierIOError:
            pass
    with Cache(host="1MiB", disk="16MiB", path=store) as cache:
        assert sorted(cache.keys()) == ["k"]
        assert torch.equal(cache.get("k"), value)


# -- kill -9 at random points: every acknowledged operation survives ------------------------------------------
ACK_CHILD = textwrap.dedent(
    """
    import random, sys, torch, tiercache

    def value(key, version):
        t = (torch.arange(256, dtype=torch.int64) * 2654435761 + key * 40503 + version * 9973) % (1 << 31)
        t[0], t[1] = key, version
        return t

    path, seed = sys.argv[1], int(sys.argv[2])
    rng = random.Random(seed)
    out = sys.stdout
    cache = tiercache.Cache(host=None, disk="16MiB", path=path)
    version = 0
    step = 0
    ready = False
    while True:
        step += 1
        op = rng.random()
        if op < 0.4:
            version += 1
            key = rng.randrange(48)
            out.write(f"begin put {key}:{version}\\n"); out.flush()
            cache.put(key, value(key, version))
        elif op < 0.6:
            keys = rng.sample(range(48), 4)
            items = []
            for key in keys:
                version += 1
                items.append((key, version))
            out.write("begin put " + " ".join(f"{k}:{v}" for k, v in items) + "\\n"); out.flush()
            cache.put_many([(k, value(k, v)) for k, v in items])
        elif op < 0.75:
            key = rng.randrange(48)
            out.write(f"begin del {key}\\n"); out.flush()
            cache.delete(key)
        elif op < 0.85:
            keys = rng.sample(range(48), 3)
            out.write("begin del " + " ".join(map(str, keys)) + "\\n"); out.flush()
            cache.delete_many(keys)
        elif op < 0.97:
            try:
                cache.get(rng.randrange(48))
            except KeyError:
                pass
            continue
        else:
            out.write("begin reopen\\n"); out.flush()
            cache.close()
            cache = tiercache.Cache(host=None, disk="16MiB", path=path)
        out.write("ack\\n"); out.flush()
        if step >= 60 and not ready:
            ready = True
            out.write("ready\\n"); out.flush()
    """
)


def _replay(lines: list[str]) -> tuple[dict[int, int | None], dict[int, int | None]]:
    """The state every acknowledged operation left (key -> version, None once deleted), and what the one
    operation in flight at the kill (begun, not acknowledged) would have made of its keys."""
    state: dict[int, int | None] = {}
    pending: dict[int, int | None] = {}
    for line in lines:
        words = line.split()
        if not words or words[0] == "ready":
            continue
        if words[0] == "ack":
            state.update(pending)
            pending = {}
        elif words[1] == "put":
            pending = {int(k): int(v) for k, v in (w.split(":") for w in words[2:])}
        elif words[1] == "del":
            pending = {int(k): None for k in words[2:]}
        else:  # reopen
            pending = {}
    return state, pending


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sigkill_keeps_every_acknowledged_operation(tmp_path, seed):
    """A disk-only cache killed (SIGKILL) at a random point: every put that returned comes back bit for
    bit (or the value of the operation in flight at the kill), no deleted key comes back, nothing older
    reappears.  test_durability's crash test only checks that what comes back is some intact version."""
    store = tmp_path / "store"
    state: dict[int, int | None] = {}
    for round_, delay in enumerate((0.05, 0.3, 0.6)):
        child = subprocess.Popen([sys.executable, "-c", ACK_CHILD, str(store), str(seed * 10 + round_)],
                                 stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        try:
            lines = []
            while True:
                line = child.stdout.readline()
                assert line, "the child died before it was ready"
                if line.strip() == "ready":
                    break
                lines.append(line)
            time.sleep(delay)
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=30)
        lines += child.stdout.read().splitlines()
        acked, pending = _replay(lines)
        state.update(acked)
        with Cache(host=None, disk="16MiB", path=store) as cache:
            assert not list(store.rglob("*.tmp"))
            present = set(cache.keys())
            for key in range(48):
                allowed = {state.get(key)}
                if key in pending:
                    allowed.add(pending[key])
                if key not in present:
                    assert None in allowed, f"key {key} (version {state.get(key)}, acknowledged) was lost"
                    got = None
                else:
                    value = cache.get(key)
                    got = int(value[1])
                    assert got in allowed, f"key {key} came back as version {got}, expected one of {allowed}"
                    assert torch.equal(value, _crash_value(key, got)), f"key {key} came back with wrong bytes"
                state[key] = got  # what the next round starts from
            assert cache.stats()["corruptions"] == 0


def _crash_value(key: int, version: int) -> torch.Tensor:
    t = (torch.arange(256, dtype=torch.int64) * 2654435761 + key * 40503 + version * 9973) % (1 << 31)
    t[0], t[1] = key, version
    return t


def test_an_index_temp_left_by_a_killed_close_is_removed_at_open(tmp_path):
    """journal.write_atomic writes index.tc through index.tc.<pid>.tmp: a close killed there left that file
    in the store for good (found by the kill -9 test above).  The next open removes it when its process is
    gone, and leaves one whose process is alive (it may be writing it)."""
    store = tmp_path / "store"
    with Cache(host=None, disk="16MiB", path=store) as cache:
        cache.put(1, torch.ones(8))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale, live = store / f"index.tc.{gone.pid}.tmp", store / f"index.tc.{os.getpid()}.tmp"
    stale.write_bytes(b"partial index")
    live.write_bytes(b"being written")
    with Cache(host=None, disk="16MiB", path=store) as cache:
        assert not stale.exists()
        assert live.exists()
        assert torch.equal(cache.get(1), torch.ones(8))


def test_a_prefetch_racing_close_is_refused_and_starts_no_thread(tmp_path):
    """prefetch() checked only ``_closed`` under the lock: called while close() was persisting (closing,
    its executor already shut down) it made a new thread pool that nothing ever shut down and returned a
    future of a cache being closed.  It raises CacheClosedError, as it does once close() has returned."""
    from tiercache import CacheClosedError

    store = tmp_path / "store"
    with Cache(host=None, disk="16MiB", path=store) as cache:
        cache.put("k", torch.ones(8))
    cache = Cache(host="1MiB", disk="16MiB", path=store)
    in_persist, prefetched = threading.Event(), threading.Event()
    persist = cache._persist

    def paused_persist(reason):
        in_persist.set()
        prefetched.wait(5)
        return persist(reason)

    cache._persist = paused_persist
    outcome: list[object] = []

    def keys():
        in_persist.wait(5)
        yield "k"

    def call():
        try:
            outcome.append(cache.prefetch(keys()))
        except BaseException as exc:
            outcome.append(exc)
        finally:
            prefetched.set()

    before = {t for t in threading.enumerate() if t.name.startswith("tiercache-io")}
    caller = threading.Thread(target=call)
    caller.start()
    cache.close()
    caller.join(10)
    assert len(outcome) == 1 and isinstance(outcome[0], CacheClosedError), outcome
    after = {t for t in threading.enumerate() if t.name.startswith("tiercache-io") and t.is_alive()}
    assert after <= before, "prefetch started an I/O thread after close() had shut the pool down"


# -- a full disk in the middle of a put_many -------------------------------------------------------------------
@pytest.mark.parametrize("host", [None, "8KiB"])
def test_a_full_disk_mid_put_many_leaves_the_documented_state(tmp_path, monkeypatch, host):
    """put_many's contract: an I/O error stops the batch at that item; the items before it stay stored, it
    and the rest are not (a key they would have replaced keeps its previous value) -- also after a reopen."""
    real = os.writev
    calls = {"n": 0, "fail_at": None}

    def writev(fd, buffers):
        calls["n"] += 1
        if calls["fail_at"] is not None and calls["n"] >= calls["fail_at"]:
            raise OSError(28, os.strerror(28))
        return real(fd, buffers)

    monkeypatch.setattr("tiercache.tiers.disk.os.writev", writev)
    store = tmp_path / "store"
    before = {k: torch.full((3000,), float(k)) for k in range(8)}
    batch = [(k, torch.full((3000,), 100.0 + k)) for k in range(4, 12)]  # 4..7 replace, 8..11 are new
    cache = Cache(host=host, disk="16MiB", path=store)
    cache.put_many(list(before.items()))
    cache.flush()  # every value on disk: the batch's items go to disk (host=None) or demote (8KiB)
    calls["n"], calls["fail_at"] = 0, 3
    with pytest.raises(TierIOError):
        cache.put_many(batch)
    calls["fail_at"] = None
    stored = {k for k in range(12) if k in cache}
    failed = next(k for k, _ in batch if not torch.equal(cache.get(k) if k in cache else torch.empty(0),
                                                          dict(batch)[k]))
    assert failed == batch[2][0]  # the third write failed
    expected = dict(before)
    for k, v in batch:
        if k == failed:
            break
        expected[k] = v
    assert stored == set(expected), (stored, failed)
    for k, v in expected.items():
        assert torch.equal(cache.get(k), v), k
    cache.close()
    with Cache(host=host, disk="16MiB", path=store) as cache:
        assert set(cache.keys()) == set(expected)
        for k, v in expected.items():
            assert torch.equal(cache.get(k), v), k


def test_close_says_when_it_drops_entries_that_were_on_disk(tmp_path, caplog):
    """close() persists the highest-ranked entries that fit the disk tier; lower-ranked entries already on
    disk can be dropped for them (reported to on_evict with reason "close").  Its warning counted only
    the memory entries it could not persist: with no on_evict callback, deleting durable entries from the
    disk tier made no log line at all."""
    import logging

    store = tmp_path / "store"
    one = torch.zeros(1024, dtype=torch.uint8)
    charge = DiskTier.charge(one.nbytes)
    with Cache(host=None, disk=4 * charge, path=store) as cache:
        for k in range(4):
            cache.put(k, one + k)
    cache = Cache(host="1MiB", disk=4 * charge, path=store)
    cache.put("new", one + 9)  # in host memory, the most recently used: it outranks every disk entry
    with caplog.at_level(logging.WARNING, logger="tiercache"):
        cache.close()
    with Cache(host="1MiB", disk=4 * charge, path=store) as cache:
        kept = set(cache.keys())
    assert "new" in kept and len(kept) == 4
    dropped = {0, 1, 2, 3} - kept
    assert len(dropped) == 1
    assert any("1 entries did not fit the disk tier and were dropped (1 of them were on it" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
