"""decode_buffer.Readers / Job: the reader threads of reads ahead (what the decode buffer used a
ThreadPoolExecutor for), and the decode buffer on either kind."""

from __future__ import annotations

import concurrent.futures
import gc
import threading
import time

import pytest
import torch
from transformers import DynamicCache

from tiercache_llm import TieredKVCache
from tiercache_llm import decode_buffer as decode_buffer_module
from tiercache_llm.decode_buffer import Readers


def test_jobs_run_in_order_and_hand_back_results_and_errors():
    readers = Readers(1, "test-readers")
    seen = []
    jobs = [readers.submit(lambda i=i: seen.append(i) or i * 2) for i in range(50)]
    assert [job.result(timeout=30) for job in jobs] == [2 * i for i in range(50)]
    assert seen == list(range(50)) and all(job.done() for job in jobs)

    def fail():
        raise OSError("boom")

    job = readers.submit(fail)
    assert isinstance(job.exception(timeout=30), OSError)
    with pytest.raises(OSError, match="boom"):
        job.result()
    with pytest.raises(OSError):  # every later waiter sees it too
        job.result(timeout=1)
    readers.shutdown()
    with pytest.raises(RuntimeError):
        readers.submit(lambda: None)
    readers.shutdown()  # idempotent


def test_cancel_only_before_the_job_starts_and_timeout():
    readers = Readers(1, "test-readers")
    started, go = threading.Event(), threading.Event()
    running = readers.submit(lambda: (started.set(), go.wait(30)))
    queued = readers.submit(lambda: pytest.fail("a cancelled job ran"))
    assert started.wait(30)
    with pytest.raises(TimeoutError):
        running.result(timeout=0.01)
    assert not running.done()
    assert not running.cancel()  # running: not cancelled, and it goes on
    assert queued.cancel() and queued.cancel() and queued.done()
    with pytest.raises(concurrent.futures.CancelledError):
        queued.result()
    go.set()
    assert running.result(timeout=30) == (None, True)
    assert not running.cancel()  # done: not cancelled
    readers.shutdown(wait=True)
    assert not any(t.is_alive() for t in readers._threads)


def test_threads_stop_when_the_readers_are_collected():
    readers = Readers(2, "test-readers")
    threads = list(readers._threads)
    assert readers.submit(lambda: 1).result(timeout=30) == 1
    del readers
    gc.collect()
    for thread in threads:
        thread.join(30)
        assert not thread.is_alive()


def test_readers_must_be_positive():
    with pytest.raises(ValueError):
        Readers(0, "x")


@pytest.mark.parametrize("light", [True, False])
def test_disk_decode_is_exact_on_either_kind_of_reader(make_config, tmp_path, monkeypatch, light):
    """Exact decode through a disk tier with reads ahead (grouped, shared jobs) matches DynamicCache bit for bit
    on Readers and on a ThreadPoolExecutor."""
    monkeypatch.setattr(decode_buffer_module, "LIGHT_READERS", light)
    config = make_config(num_hidden_layers=4)
    got = TieredKVCache(config, block_size=4, host="8KiB", disk="16MiB", path=tmp_path / "kv")
    _decode_like_dynamic(config, got, batch=2, steps=12, seed=1)
    kind = Readers if light else concurrent.futures.ThreadPoolExecutor
    assert isinstance(got.buffer._reader, kind)
    assert got.stats()["prefetch"]["blocks_ahead"] > 0
    got.close()
    assert got.buffer._reader is None


@pytest.mark.parametrize("wake_idle", [True, False])
def test_two_threads_run_every_job_once(monkeypatch, wake_idle):
    monkeypatch.setattr(Readers, "wake_idle", wake_idle)
    readers = Readers(2, "test-readers")
    lock, started, threads = threading.Lock(), [], set()
    gen = torch.Generator().manual_seed(0)
    delays = (torch.rand(400, generator=gen) * 2e-4).tolist()

    def job(i):
        with lock:
            started.append(i)
            threads.add(threading.current_thread().name)
        end = time.perf_counter() + delays[i]
        while time.perf_counter() < end:
            pass
        return i

    jobs = []
    for i in range(400):
        jobs.append(readers.submit(lambda i=i: job(i)))
        if i % 7 == 0:  # wait now and then, so jobs also go to finishing and idle threads
            jobs[-1].result(timeout=30)
    assert [j.result(timeout=30) for j in jobs] == list(range(400))
    assert sorted(started) == list(range(400)) and len(threads) <= 2
    readers.shutdown()
    assert not any(t.is_alive() for t in readers._threads)


@pytest.mark.parametrize("steal", [True, False])
def test_stolen_reads_are_exact_and_counted(make_config, tmp_path, monkeypatch, steal):
    """With STEAL_READS, a read ahead no reader thread has started is run by the update itself: same states."""
    monkeypatch.setattr(decode_buffer_module, "STEAL_READS", steal)
    config = make_config(num_hidden_layers=3)
    got = TieredKVCache(config, block_size=4, host="8KiB", disk="16MiB", path=tmp_path / "kv")
    if steal:  # reader threads that never start a job: every read ahead is run by the update that takes it
        monkeypatch.setattr(Readers, "submit", lambda self, fn: decode_buffer_module.Job(fn))
    _decode_like_dynamic(config, got, batch=1, steps=8, seed=2)
    ahead = got.stats()["prefetch"]
    assert ahead["started"] > 0 and ahead["failed"] == 0
    if steal:
        assert 0 < ahead["stolen"] <= ahead["used"]
    else:
        assert ahead["stolen"] == 0
    got.close()


def test_a_job_in_flight_at_exit_runs_to_the_end(tmp_path):
    """Readers never shut down: the interpreter's exit waits for the job running (threads stopped at exit)."""
    import subprocess
    import sys

    script = tmp_path / "exit.py"
    script.write_text(
        "import time\n"
        "from tiercache_llm.decode_buffer import Readers\n"
        "r = Readers(2, 'x')\n"
        "r.submit(lambda: (time.sleep(0.3), print('ran', flush=True)))\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ran"


def _decode_like_dynamic(config, got, batch: int, steps: int, seed: int) -> None:
    """Feed ``got`` and a DynamicCache the same random K/V (a 9-token prefill, then one token per step) and
    assert every layer's returned states are equal bit for bit."""
    ref = DynamicCache(config=config)
    gen = torch.Generator().manual_seed(seed)
    heads = config.num_key_value_heads
    dim = config.hidden_size // config.num_attention_heads
    for step in range(steps):
        seq = 9 if step == 0 else 1
        for layer in range(config.num_hidden_layers):
            k = torch.randn(batch, heads, seq, dim, generator=gen)
            v = torch.randn(batch, heads, seq, dim, generator=gen)
            rk, rv = ref.update(k, v, layer)
            gk, gv = got.update(k, v, layer)
            assert torch.equal(rk, gk) and torch.equal(rv, gv), (step, layer)
