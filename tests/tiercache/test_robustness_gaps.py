"""``get_many(keys, out=[...])`` refuses destinations that share memory (the shared bytes would hold whichever
value was copied last), before copying anything, and still accepts every layout that does not: slices of one
buffer, interleaved strided views (a buffer's token blocks), ranged reads of disjoint parts of one destination."""

import random

import pytest
import torch

import tiercache
from tiercache.overlap import check_disjoint


@pytest.fixture
def cache():
    c = tiercache.Cache(host="1MiB")
    yield c
    c.close()


def put(cache, n, numel=16):
    keys = [("v", i) for i in range(n)]
    cache.put_many([(k, torch.full((numel,), float(i + 1))) for i, k in enumerate(keys)])
    return keys


def test_the_same_tensor_twice_is_refused_before_anything_is_copied(cache):
    keys = put(cache, 3)
    a, b = torch.zeros(16), torch.zeros(16)
    with pytest.raises(ValueError, match=r"out\[0\] and out\[2\] \(keys \('v', 0\) and \('v', 2\)\) overlap"):
        cache.get_many(keys, out=[a, b, a])
    assert not a.any() and not b.any()


def test_overlapping_slices_of_one_buffer_are_refused(cache):
    keys = put(cache, 2)
    buf = torch.zeros(40)
    with pytest.raises(ValueError, match="overlap in memory"):
        cache.get_many(keys, out=[buf[0:16], buf[15:31]])
    cache.get_many(keys, out=[buf[0:16], buf[16:32]])  # adjacent: fine
    assert buf[:32].tolist() == [1.0] * 16 + [2.0] * 16


def test_interleaved_token_blocks_are_accepted_and_overlapping_ones_refused(cache):
    """Token blocks of a (heads, seq, dim) buffer are interleaved strided views: disjoint, read in place; two
    blocks shifted by half a block share rows of every head."""
    n, block = 4, 8
    keys = [("b", i) for i in range(n)]
    cache.put_many([(k, torch.full((2, block, 4), float(i + 1))) for i, k in enumerate(keys)])
    buf = torch.zeros(2, n * block, 4)
    blocks = list(buf.unflatten(1, (n, block)).unbind(1))
    assert not blocks[0].is_contiguous()
    cache.get_many(keys, out=blocks)
    assert [buf[:, j * block:(j + 1) * block].unique().tolist() for j in range(n)] == [[1.0], [2.0], [3.0], [4.0]]
    with pytest.raises(ValueError, match=r"out\[0\] and out\[1\]"):
        cache.get_many(keys[:2], out=[buf[:, 0:block], buf[:, block // 2:block // 2 + block]])
    # out of address order, one of them shifted: still found
    with pytest.raises(ValueError, match=r"out\[1\] and out\[2\]"):
        cache.get_many(keys[:3], out=[blocks[3], blocks[1], buf[:, block + 1:2 * block + 1]])


def test_disjoint_layouts_of_different_shapes_interleaved_are_accepted(cache):
    """Two views of one buffer, different shapes, interleaved: told apart element by element."""
    keys = put(cache, 2)
    buf = torch.zeros(32)
    a = buf.view(4, 8)[:, :4]  # elements 0-3, 8-11, 16-19, 24-27
    b = torch.as_strided(buf, (2, 2, 4), (16, 8, 1), 4)  # 4-7, 12-15, 20-23, 28-31
    cache.get_many(keys, out=[a, b])
    assert a.unique().tolist() == [1.0] and b.unique().tolist() == [2.0]
    c = torch.as_strided(buf, (2, 8), (16, 1), 4)  # 4-11, 20-27: meets a
    with pytest.raises(ValueError, match="overlap"):
        cache.get_many(keys, out=[a, c])


def test_ranged_reads_into_disjoint_parts_of_one_destination_are_accepted(cache):
    keys = put(cache, 2)
    buf = torch.zeros(16)
    cache.get_many(keys, out=[buf, buf], ranges=[[(0, 32)], [(32, 64)]])
    assert buf.tolist() == [1.0] * 8 + [2.0] * 8
    with pytest.raises(ValueError, match=r"out\[0\] and out\[1\]"):
        cache.get_many(keys, out=[buf, buf], ranges=[[(0, 36)], [(32, 64)]])
    with pytest.raises(ValueError, match=r"out\[0\] and out\[1\]"):  # a whole read meets the other's range
        cache.get_many(keys, out=[buf, buf], ranges=[None, [(60, 64)]])


def test_empty_destinations_share_nothing(cache):
    keys = [("e", 0), ("e", 1)]
    cache.put_many([(k, torch.zeros(0)) for k in keys])
    buf = torch.zeros(4)
    cache.get_many(keys, out=[buf[:0], buf[:0]])


def _views(rng, buf):
    """A random strided view of ``buf`` (no stride 0, a few dimensions) that fits in it."""
    dims = rng.randint(0, 3)
    shape = [rng.randint(1, 4) for _ in range(dims)]
    strides = [rng.randint(1, 9) for _ in range(dims)]
    reach = sum((n - 1) * s for n, s in zip(shape, strides))
    offset = rng.randint(0, buf.numel() - 1 - reach)
    return torch.as_strided(buf, shape, strides, offset)


def _bytes(t):
    out = set()
    idx = torch.zeros((), dtype=torch.int64)
    for n, s in zip(t.shape, t.stride()):
        idx = idx.unsqueeze(-1) + torch.arange(n) * s
    for e in idx.reshape(-1).tolist():
        base = t.data_ptr() + e * t.element_size()
        out.update(range(base, base + t.element_size()))
    return out


def test_block_slices_of_two_buffers_are_accepted_and_a_shifted_one_refused(cache):
    """The token blocks of two buffers in one batch (two lattices of one layout, e.g. two layers read ahead
    together into two decode-buffer slots) are accepted; one block shifted by a row into its neighbour is
    refused."""
    n, block = 3, 8
    keys = [("b", i) for i in range(2 * n)]
    cache.put_many([(k, torch.full((2, block, 4), float(i + 1))) for i, k in enumerate(keys)])
    bufs = [torch.zeros(2, n * block, 4), torch.zeros(2, n * block, 4)]
    blocks = [b for buf in bufs for b in buf.unflatten(1, (n, block)).unbind(1)]
    cache.get_many(keys, out=blocks[::-1])
    assert [bufs[j // n][:, (j % n) * block:(j % n + 1) * block].unique().tolist() for j in range(2 * n)] == \
        [[float(2 * n - j)] for j in range(2 * n)]
    shifted = bufs[1][:, 1:1 + block]  # meets blocks[n] (rows 0-7) and blocks[n + 1] (8-15)
    with pytest.raises(ValueError, match="overlap"):
        cache.get_many(keys[:3], out=[blocks[0], shifted, blocks[n]])
    assert not check_disjoint(blocks[:n] + [bufs[1][:, 2 * block:3 * block]])  # (returns None: accepted)


def test_check_disjoint_agrees_with_byte_sets():
    """Random strided views (and the same layout repeated, the lattice case) against the byte sets they cover:
    refused exactly when two of them share a byte."""
    rng = random.Random(7)
    buf = torch.zeros(96)
    refused = accepted = 0
    for trial in range(1500):
        if trial % 3 == 0:  # one layout at several offsets
            first = _views(rng, buf)
            span = sum((n - 1) * s for n, s in zip(first.shape, first.stride())) + 1
            views = [torch.as_strided(buf, first.shape, first.stride(), rng.randint(0, buf.numel() - span))
                     for _ in range(rng.randint(2, 4))]
        elif trial % 3 == 1 and trial % 2:  # one layout on two lattices (bases apart, a step each), shuffled
            first = _views(rng, buf)
            span = sum((n - 1) * s for n, s in zip(first.shape, first.stride())) + 1
            views = []
            for _ in range(2):
                base, step = rng.randint(0, buf.numel() - span), rng.randint(1, 12)
                views += [torch.as_strided(buf, first.shape, first.stride(), base + j * step)
                          for j in range(rng.randint(1, 3)) if base + j * step + span <= buf.numel()]
            rng.shuffle(views)
            if len(views) < 2:
                continue
        else:
            views = [_views(rng, buf) for _ in range(rng.randint(2, 4))]
        sets = [_bytes(v) for v in views]
        shared = any(sets[i] & sets[j] for i in range(len(sets)) for j in range(i + 1, len(sets)))
        try:
            check_disjoint(views)
        except ValueError:
            assert shared, [(tuple(v.shape), v.stride(), v.storage_offset()) for v in views]
            refused += 1
        else:
            assert not shared, [(tuple(v.shape), v.stride(), v.storage_offset()) for v in views]
            accepted += 1
    assert refused > 100 and accepted > 100
