"""BlockStore's owner records: blocks of a killed KV cache are reclaimed on the next open and by gc."""

import os
import signal
import subprocess
import sys
import textwrap

import torch

import tiercache
from tiercache import owners
from tiercache_llm import TieredKVCache

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "kernels"), os.environ.get("PYTHONPATH", "")]))

CHILD = textwrap.dedent("""
    import sys, time, torch
    from transformers import LlamaConfig
    from tiercache_llm import TieredKVCache
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    cache = TieredKVCache(config, host=0, disk="16MiB", path=sys.argv[1], block_size=4)
    for layer in range(2):
        cache.update(torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16), layer)
    print(cache.stats()["kv"]["live_entries"], flush=True)   # 2 layers x 10 blocks (one K+V entry each) = 20
    time.sleep(600)
""")


def _tiny_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2)


def _killed_run(path):
    """A process that stores KV blocks in ``path`` and is SIGKILLed (no close, no cleanup)."""
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        stored = int(proc.stdout.readline())
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    return stored


def test_blocks_of_a_killed_process_are_reclaimed_on_next_open(tmp_path, caplog):
    path = tmp_path / "kv"
    stored = _killed_run(path)
    assert stored == 20  # 2 layers x 10 blocks, K and V of a block in one entry (exact mode)
    with tiercache.Cache(host=0, disk="16MiB", path=path) as raw:  # the orphans are really there
        assert len(raw) == stored
    [dead] = owners.list_owners(path)
    assert not dead.alive and dead.record.prefix[0] == "kv"
    caplog.set_level("INFO", logger="tiercache_llm")
    with TieredKVCache(_tiny_config(), host="64KiB", disk="16MiB", path=path, block_size=4) as cache:
        report = cache.store.reclaimed
        assert report.entries == stored and report.owners == [dead.owner_id] and report.bytes_freed > 0
        assert cache.stats()["tiercache"]["entries"] == 0
        assert "reclaimed 20 KV block entries" in caplog.text
        # this run's own blocks are recorded under its own live owner
        cache.update(torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16), 0)
        [mine] = owners.list_owners(path)
        assert mine.alive and mine.owner_id != dead.owner_id
    assert owners.list_owners(path) == []  # close removed the record with the blocks
    with tiercache.Cache(host=0, disk="16MiB", path=path) as raw:
        assert len(raw) == 0


def test_gc_command_reclaims_a_killed_run(tmp_path):
    path = tmp_path / "kv"
    stored = _killed_run(path)
    with tiercache.Cache(host=0, disk="16MiB", path=path) as raw:
        raw.put("user-data", torch.ones(4))
    done = subprocess.run([sys.executable, "-m", "tiercache", "gc", str(path)], capture_output=True, text=True, env=ENV)
    assert done.returncode == 0, done.stderr
    assert f"reclaimed {stored} entries" in done.stdout and "KiB" in done.stdout and "1 entries remain" in done.stdout
    with tiercache.Cache(host=0, disk="16MiB", path=path) as raw:
        assert raw.keys() == ["user-data"]


def test_borrowed_cache_and_temporary_stores_keep_no_records(tmp_path):
    with TieredKVCache(_tiny_config(), host="64KiB", disk="1MiB", block_size=4) as cache:  # temp dir
        cache.update(torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16), 0)
        assert cache.store.reclaimed is None
    with tiercache.Cache(host=0, disk="1MiB", path=tmp_path / "b") as shared:
        with TieredKVCache(_tiny_config(), cache=shared, block_size=4) as cache:
            cache.update(torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16), 0)
            assert owners.list_owners(tmp_path / "b") == []


def test_duplicate_keys_and_shared_outs_in_one_ranged_read(tmp_path):
    """One key in several items (its parts going to different destinations) and one destination in several items
    (parts of different blocks), with disjoint ranges, from the host and the disk tier: each range lands, nothing
    else is written.  (What a per-(row, KV head) lane pool would send; the study is docs/sparse.md "Lane pools".)"""
    from tiercache_llm.store import BlockStore

    for disk in (False, True):
        store = BlockStore.open(gpu=None, host=None if disk else "1MiB", disk="4MiB" if disk else None,
                                path=tmp_path / f"d{disk}" if disk else None)
        try:
            a = torch.arange(4096, dtype=torch.float32)
            b = -torch.arange(4096, dtype=torch.float32)
            store.put_blocks([("a", a), ("b", b)])
            o1, o2 = torch.full((4096,), 7.0), torch.full((4096,), 7.0)
            q = 4096  # bytes: a quarter of the value
            store.get_blocks(["a", "a", "b", "b"], out=[o1, o2, o1, o2],
                             ranges=[[(0, q)], [(q, 2 * q)], [(2 * q, 3 * q)], [(3 * q, 4 * q)]])
            assert torch.equal(o1[:1024], a[:1024]) and torch.equal(o1[2048:3072], b[2048:3072])
            assert torch.equal(o2[1024:2048], a[1024:2048]) and torch.equal(o2[3072:], b[3072:])
            assert (o1[1024:2048] == 7).all() and (o1[3072:] == 7).all() and (o2[:1024] == 7).all()
        finally:
            store.close()
