"""Owner records (tiercache.owners): liveness locks, reclaim of dead ephemeral owners only."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import tiercache
from tiercache import owners

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _register_in_child(path, owner_id, prefix=None, ephemeral=True):
    """Register an owner from a child process that then exits: a dead owner with a real record."""
    code = textwrap.dedent(f"""
        from tiercache import owners
        o = owners.register({str(path)!r}, {owner_id!r}, prefix={prefix!r}, ephemeral={ephemeral!r})
        import os; os._exit(0)   # no release(): the process dies holding the record
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


@pytest.fixture
def store(tmp_path):
    path = tmp_path / "store"
    with tiercache.Cache(host=0, disk="16MiB", path=path) as cache:
        yield cache, path


def test_register_writes_record_and_holds_lock(tmp_path):
    o = owners.register(tmp_path, "abc", prefix=("kv", "abc"))
    record = json.loads((tmp_path / "owners" / "abc.json").read_text())
    assert record["owner"] == "abc" and record["prefix"] == ["kv", "abc"] and record["pid"] == os.getpid()
    assert record["ephemeral"] is True
    assert owners.is_alive(tmp_path, "abc")
    [status] = owners.list_owners(tmp_path)
    assert status.alive and status.record.prefix == ("kv", "abc")
    with pytest.raises(FileExistsError):
        owners.register(tmp_path, "abc")
    o.release()
    assert not owners.is_alive(tmp_path, "abc")
    assert list((tmp_path / "owners").iterdir()) == []
    o.release()  # idempotent


def test_bad_ids_and_prefixes_are_refused(tmp_path):
    for bad in ("", "a/b", "x" * 65, "..\n"):
        with pytest.raises(ValueError, match="owner id"):
            owners.register(tmp_path, bad)
    for prefix in ((), ["a"], (1.5,), (True,)):
        with pytest.raises(ValueError, match="prefix"):
            owners.register(tmp_path, "ok", prefix=prefix)


def test_owns_matches_exact_tuple_prefix():
    r = owners.OwnerRecord("u1", ("kv", "u1"), 1, "h", 0.0)
    assert r.owns(("kv", "u1", 0, "k", 3)) and r.owns(("kv", "u1"))
    assert not r.owns(("kv", "u2", 0)) and not r.owns("kv") and not r.owns(("kv",)) and not r.owns(["kv", "u1", 0])


def test_reclaim_deletes_dead_ephemeral_owners_only(store):
    cache, path = store
    live = owners.register(path, "live")
    _register_in_child(path, "dead")
    _register_in_child(path, "keep", ephemeral=False)
    for owner_id in ("live", "dead", "keep"):
        for i in range(3):
            cache.put((owner_id, i), torch.full((256,), float(i)))
    cache.put(("dead-but-not-a-prefix", 0), torch.zeros(4))
    cache.put("unowned", torch.zeros(4))
    used_before = cache.stats()["tiers"]["disk"]["used_bytes"]

    report = owners.reclaim(cache, path)

    assert report.owners == ["dead"] and report.entries == 3
    assert report.bytes_freed == used_before - cache.stats()["tiers"]["disk"]["used_bytes"] > 0
    assert report.kept_alive == 1 and report.kept_persistent == 1
    assert not any(("dead", i) in cache for i in range(3))
    assert all((o, i) in cache for o in ("live", "keep") for i in range(3))
    assert ("dead-but-not-a-prefix", 0) in cache and "unowned" in cache
    assert sorted(p.name for p in (path / "owners").iterdir()) == ["keep.json", "keep.lock", "live.json", "live.lock"]
    assert owners.reclaim(cache, path).owners == []  # nothing left to do
    live.release()


def test_live_owner_in_same_process_is_never_reclaimed(store):
    """flock belongs to an open file: another handle in the same process cannot take a live owner's lock."""
    cache, path = store
    with owners.register(path, "mine"):
        cache.put(("mine", 0), torch.ones(8))
        assert owners.reclaim(cache, path).entries == 0
        assert ("mine", 0) in cache


def test_unreadable_record_is_reported_not_guessed(store):
    cache, path = store
    (path / "owners").mkdir()
    (path / "owners" / "junk.json").write_text("{not json")
    cache.put(("junk", 0), torch.ones(4))
    report = owners.reclaim(cache, path)
    assert report.entries == 0 and report.problems and "junk.json" in report.problems[0]
    assert ("junk", 0) in cache


def test_stale_lock_without_record_is_removed(store):
    cache, path = store
    (path / "owners").mkdir()
    (path / "owners" / "gone.lock").write_text("")
    owners.reclaim(cache, path)
    assert not (path / "owners" / "gone.lock").exists()


def test_store_with_owner_records_reopens(tmp_path):
    """owners/ beside the store's data is not foreign content (CONTRACTS C7)."""
    path = tmp_path / "s"
    with tiercache.Cache(host=0, disk="4MiB", path=path) as cache:
        o = owners.register(path, "x")
        cache.put(("x", 1), torch.ones(4))
    o.release()
    with tiercache.Cache(host=0, disk="4MiB", path=path) as cache:
        assert ("x", 1) in cache


def _die(owner):
    """Simulate the owner's process dying: its lock is dropped, its record stays."""
    os.close(owner._lock_fd)
    owner._lock_fd = None


from hypothesis import given, settings, strategies as st  # noqa: E402

OWNER_KINDS = st.sampled_from(["live", "dead", "dead-persistent"])


@settings(max_examples=25, deadline=None)
@given(
    kinds=st.lists(OWNER_KINDS, min_size=1, max_size=4),
    keys=st.lists(st.tuples(st.integers(0, 4), st.integers(0, 50)), max_size=30, unique=True),
)
def test_reclaim_deletes_exactly_the_dead_ephemeral_owners_keys(tmp_path_factory, kinds, keys):
    path = tmp_path_factory.mktemp("prop") / "store"
    with tiercache.Cache(host=0, disk="4MiB", path=path) as cache:
        handles = [
            owners.register(path, f"o{i}", prefix=("ns", f"o{i}"), ephemeral=kind != "dead-persistent")
            for i, kind in enumerate(kinds)
        ]
        stored = []
        for owner_index, serial in keys:  # owner_index beyond the owners: keys that belong to nobody
            key = ("ns", f"o{owner_index}", serial)
            cache.put(key, torch.ones(2))
            stored.append(key)
        for handle, kind in zip(handles, kinds):
            if kind.startswith("dead"):
                _die(handle)
        report = owners.reclaim(cache, path)
        doomed = {f"o{i}" for i, kind in enumerate(kinds) if kind == "dead"}
        assert sorted(report.owners) == sorted(doomed)
        assert report.entries == sum(key[1] in doomed for key in stored)
        assert sorted(cache.keys()) == sorted(key for key in stored if key[1] not in doomed)
        assert {s.owner_id for s in owners.list_owners(path)} == {f"o{i}" for i in range(len(kinds))} - doomed
    for handle in handles:
        handle.release()
