"""``overlap_sync_reads``: a layer's synchronous reads run on a reader thread while attention covers the resident
part of its selection; the two parts merge exactly by their log-sum-exp (``split_page_table`` +
``merge_attention``).  Unit: random shapes, GQA, left padding, NaN in hidden tokens, either part empty, both
CPU torch paths.  In a cache: the logits, greedy tokens, selections and placement masses of the unsplit path,
failed reads re-read or raised, row changes."""

from __future__ import annotations

import threading

import pytest
import torch

from tiercache_llm import TieredKVCache
from tiercache_llm.sparse.attention import SparseAttentionOutput
from tiercache_llm.sparse.page_table import (
    build_page_table,
    merge_attention,
    page_table_attention,
    split_page_table,
)
from tiercache_llm.sparse.pipeline import DecodePipeline, PipelineConfig
from tiercache_llm.sparse_layer import attend_overlapped, attend_selected

from ..test_generate_tiny import left_padded_batch
from ..test_sparse_pipeline import continued_mask, decode_logits, opts
from .test_page_table import BASE, make_case, torch_threads
from .test_pool import change_rows, decode_recording, decode_rows


class Pending:
    """A stand-in for :class:`~tiercache_llm.sparse.pipeline.PendingReads`: counts its waits."""

    def __init__(self, late):
        self.late = late
        self.waits = 0

    def wait(self, raise_errors=True):
        self.waits += 1


def late_mask(u: int, kind: str, seed: int) -> torch.Tensor:
    if kind == "none":
        return torch.zeros(u, dtype=torch.bool)
    if kind == "all":
        return torch.ones(u, dtype=torch.bool)
    return torch.rand(u, generator=torch.Generator().manual_seed(seed)) < 0.5


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("kind", ["random", "none", "all"])
@pytest.mark.parametrize("seed", range(6))
def test_split_attention_is_the_unsplit_attention(threads, kind, seed):
    """``attend_overlapped`` = ``attend_selected`` (output, block masses in fetch order, new-token mass) over
    random cases: GQA 1..4, left padding (some rows padded past their selection), heads selecting nothing,
    NaN in every hidden pool token, permuted slots."""
    gen = torch.Generator().manual_seed(100 + seed)
    params = {**BASE, "g": 1 + seed % 4, "h": 1 + seed % 3, "b": 1 + seed % 3, "n_blocks": 3 + seed,
              "page": (1, 2, 4, 8)[seed % 4], "density": float(torch.rand(1, generator=gen)) + 0.2}
    c = make_case(params, seed)
    assert c.nk is not None
    args = (c.query, c.k_pool, c.v_pool, c.slot_of_fetch, c.sel, c.valid, c.t, c.s, c.nk, c.nv, None)
    late = late_mask(c.u, kind, seed)
    with torch_threads(threads):
        want = attend_selected(*args)
        pending = Pending(late)
        got, waited = attend_overlapped(*args, pending, mass=True)
        bare, _ = attend_overlapped(*args, Pending(late), mass=False)
    assert pending.waits == 1 and waited >= 0.0
    assert not bool(got.output.isnan().any()) and not bool(got.block_mass.isnan().any())
    torch.testing.assert_close(got.output, want.output, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.block_mass, want.block_mass, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got.new_mass, want.new_mass, rtol=1e-4, atol=1e-6)
    assert torch.equal(bare.output, got.output) and not bool(bare.block_mass.any())
    assert bare.block_mass.shape == want.block_mass.shape


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("new", [True, False])
def test_an_empty_part_contributes_nothing_and_nothing_at_all_gives_zeros(threads, new):
    c = make_case({**BASE, "new": new, "empty_head": True}, 3)
    table = build_page_table(c.sel, c.slot_of_fetch, c.token_ok, c.s)
    with torch_threads(threads):
        whole = page_table_attention(c.query, c.k_pool, c.v_pool, table, c.nk, c.nv, lse=True)
        for late in (late_mask(c.u, "none", 0), late_mask(c.u, "all", 0), late_mask(c.u, "random", 1)):
            ready, later = split_page_table(table, late)
            assert int(ready.counts.sum() + later.counts.sum()) == int(table.counts.sum())
            a = page_table_attention(c.query, c.k_pool, c.v_pool, ready, c.nk, c.nv, lse=True)
            b = page_table_attention(c.query, c.k_pool, c.v_pool, later, lse=True)
            got = merge_attention(a, b)
            assert not bool(got.output.isnan().any())
            torch.testing.assert_close(got.output, whole.output, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got.lse, whole.lse, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got.new_mass, whole.new_mass, rtol=1e-4, atol=1e-6)
    # the (row, head) that selected nothing: with no new tokens its lse is -inf and its output zeros
    if not new:
        assert bool(torch.isneginf(whole.lse[-1, -c.g:]).all()) and not bool(got.output[-1, -c.g:].any())
        nothing = SparseAttentionOutput(torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1), torch.zeros(1, 1),
                                        torch.full((1, 1, 1), float("-inf")))
        merged = merge_attention(nothing, nothing)
        assert not bool(merged.output.any()) and bool(torch.isneginf(merged.lse).all())


def test_lse_is_the_log_sum_exp_and_bad_merges_are_refused():
    c = make_case({**BASE, "tail_cut": 0, "pad": False, "empty_head": False}, 4)
    table = build_page_table(c.sel, c.slot_of_fetch, c.token_ok, c.s)
    res = page_table_attention(c.query, c.k_pool, c.v_pool, table, c.nk, c.nv, lse=True)
    kbuf = c.k_pool[c.slot_of_fetch]  # (U, B, H, S, D), every token attended by its head's pages
    scale = c.d ** -0.5
    for row in range(c.b):
        for qh in range(c.h * c.g):
            kv = qh // c.g
            toks = [kbuf[u, row, kv][c.attended[row, kv, u]] for u in range(c.u)]
            keys = torch.cat(toks + [c.nk[row, kv]])
            want = torch.logsumexp(keys @ c.query[row, qh, 0] * scale, 0)
            torch.testing.assert_close(res.lse[row, qh, 0], want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="lse"):
        merge_attention(page_table_attention(c.query, c.k_pool, c.v_pool, table, c.nk, c.nv), res)
    with pytest.raises(ValueError, match="torch backend only"):
        page_table_attention(c.query, c.k_pool, c.v_pool, table, c.nk, c.nv, lse=True, backend="triton")


def test_the_flag_is_a_bool():
    assert PipelineConfig.for_strategy("attention-aware").overlap_sync_reads is False
    with pytest.raises(ValueError, match="overlap_sync_reads"):
        PipelineConfig(overlap_sync_reads=1)


# ------------------------------------------------------------------------------------------ in a cache
@pytest.fixture
def model(make_model):
    return make_model("llama", seed=5, num_hidden_layers=3)


BOUND = 12 * 3 * 1024  # a pool bound that binds: every step has misses


def _run(model, tmp_path, name, overlap, strategy="attention-aware", steps=8, **pipeline):
    ids, mask = left_padded_batch(seed=5, lengths=(40, 33, 27))
    kw = opts(tmp_path / name, strategy, pool_bytes=BOUND, pipeline={"overlap_sync_reads": overlap, **pipeline})
    masses = []
    with TieredKVCache.for_model(model, **kw) as cache:
        logits, selections = decode_recording(model, cache, ids, mask, steps)
        stats = cache.stats()
        masses = [layer.sparse.mass.clone() for layer in cache.layers if layer.sparse is not None]
    return logits, selections, stats, masses


@pytest.mark.parametrize("strategy", ["attention-aware", "reuse-layer-ahead"])
def test_overlapped_reads_give_the_logits_tokens_selections_and_masses_of_the_unsplit_path(model, tmp_path, strategy):
    ref, ref_sel, off, ref_mass = _run(model, tmp_path, "off", False, strategy)
    got, got_sel, on, got_mass = _run(model, tmp_path, "on", True, strategy)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))  # the same greedy tokens
    assert len(ref_sel) == len(got_sel) > 0
    assert all(a[0] == b[0] and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2]) for a, b in zip(ref_sel, got_sel))
    for a, b in zip(ref_mass, got_mass):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)
    p_off, p_on = off["pipeline"], on["pipeline"]
    assert p_off["overlapped"] == 0 and p_on["overlapped"] > 0
    assert sum(p_on["sync"].values()) > 0 and p_on["needed"] == p_off["needed"]
    assert p_on["reused"] + p_on["staged"] + sum(p_on["sync"].values()) == p_on["needed"]
    assert p_on["sync_wait_seconds"] > 0 and p_off["sync_wait_seconds"] > 0


def test_a_failed_synchronous_read_raises_as_before(model, tmp_path, monkeypatch):
    ids, mask = left_padded_batch(seed=5, lengths=(40, 33, 27))
    kw = opts(tmp_path, "attention-aware", pool_bytes=BOUND, pipeline={"overlap_sync_reads": True})
    with TieredKVCache.for_model(model, **kw) as cache:
        decode_logits(model, cache, ids, mask, steps=3)
        pipe = cache._pipeline
        assert pipe.stats.overlapped > 0
        original = DecodePipeline._sync_read
        threads = set()

        def broken(self, keys, blocks, dsts, joint, sync, ranges=None):
            threads.add(threading.current_thread().name)
            for dst in dsts:
                dst.fill_(float("nan"))  # wrote garbage, then failed
            raise OSError("injected sync read failure")

        monkeypatch.setattr(DecodePipeline, "_sync_read", broken)
        with pytest.raises(OSError, match="injected sync read failure"):
            decode_logits(model, cache, ids, continued_mask(cache, mask, mask), steps=3)
        assert threads and all(name.startswith("tiercache-kv-sync") for name in threads)
        assert pipe._pending is None
        # the failed blocks left no slot claiming them: decoding on reads them again and matches a fresh cache
        monkeypatch.setattr(DecodePipeline, "_sync_read", original)
        for pool in pipe._pools.values():
            assert all(not bool(pool.kv[s].isnan().any()) for s in pool.slot_of.values())


def failing_read(delay: float):
    """A ``DecodePipeline._read`` that waits ``delay`` seconds, writes NaN into its destinations and raises."""
    def broken(self, keys, outs, ranges=None):
        threading.Event().wait(delay)
        for out in outs:
            out.fill_(float("nan"))
        raise OSError("injected slot read failure")
    return broken


@pytest.mark.parametrize("delay", [0.0, 0.02])
def test_failed_reads_into_reserved_slots_are_read_again_at_the_wait(model, tmp_path, monkeypatch, delay):
    ref, _, _, _ = _run(model, tmp_path, "ref", False)

    monkeypatch.setattr(DecodePipeline, "_read", failing_read(delay))
    got, _, stats, _ = _run(model, tmp_path, "broken", True)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    pipe = stats["pipeline"]
    assert pipe["slot_failed"] > 0 and pipe["slot_used"] == 0 and pipe["overlapped"] > 0


def test_slow_synchronous_reads_are_waited_for(model, tmp_path, monkeypatch):
    ref, _, _, _ = _run(model, tmp_path, "ref", False)
    original = DecodePipeline._sync_read

    def slow(self, *args):
        threading.Event().wait(0.01)  # lands well after the resident part's attention
        return original(self, *args)

    monkeypatch.setattr(DecodePipeline, "_sync_read", slow)
    got, _, stats, _ = _run(model, tmp_path, "slow", True)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert stats["pipeline"]["sync_wait_seconds"] >= 0.01


@pytest.mark.parametrize("change", ["reorder", "crop", "select", "reset"])
def test_row_changes_with_overlapped_reads(model, tmp_path, change):
    ids, mask = left_padded_batch(seed=5, lengths=(40, 33, 27))
    runs = []
    for overlap in (False, True):
        kw = opts(tmp_path / str(overlap), "attention-aware", pool_bytes=BOUND,
                  pipeline={"overlap_sync_reads": overlap})
        with TieredKVCache.for_model(model, **kw) as cache:
            decode_logits(model, cache, ids, mask, steps=3)
            rows = change_rows(cache, change)
            assert cache._pipeline._pending is None and cache._pipeline._arena.held == 0
            if rows is None:  # after a reset: decode the batch again from its prefill
                runs.append(decode_logits(model, cache, ids, mask, steps=3))
            else:
                runs.append(decode_rows(model, cache, ids, mask, rows))
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-4, atol=1e-4)
    assert torch.equal(runs[1].argmax(-1), runs[0].argmax(-1))


def test_row_changes_and_the_next_fetch_wait_for_reads_left_in_flight(model, tmp_path):
    """A deferred fetch's reads write into the pool: ``invalidate`` (crop / reorder / reset) and the next fetch
    wait for them first (the forward pass always waits before that; this covers a caller that did not)."""
    from tiercache_llm.sparse.pipeline import PendingReads

    ids, mask = left_padded_batch(seed=5, lengths=(40, 33, 27))
    kw = opts(tmp_path, "attention-aware", pool_bytes=BOUND, pipeline={"overlap_sync_reads": True})
    with TieredKVCache.for_model(model, **kw) as cache:
        decode_logits(model, cache, ids, mask, steps=2)
        pipe = cache._pipeline
        calls = []

        def finish():
            calls.append(1)
            pipe._pending = None
            raise OSError("a failure nobody waits for")

        pipe._pending = PendingReads(torch.zeros(1, dtype=torch.bool), finish)
        cache.reset()
        assert calls == [1] and pipe._pending is None and not pipe._pools
