"""Key digests: true upper bounds of q·k, padding never contributes, incremental == from scratch."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tiercache_llm.sparse import KeyDigests, block_digests, score_blocks_reference


@st.composite
def cases(draw):
    b = draw(st.integers(1, 3))
    h = draw(st.integers(1, 3))
    g = draw(st.sampled_from([1, 2, 3, 4]))
    s = draw(st.sampled_from([1, 2, 4, 5, 8]))
    t = draw(st.integers(1, 40))
    d = draw(st.sampled_from([1, 3, 8, 16]))
    q = draw(st.integers(1, 2))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(b, h, t, d, generator=gen) * draw(st.sampled_from([0.1, 1.0, 10.0]))
    query = torch.randn(b, h * g, q, d, generator=gen)
    valid = torch.rand(b, t, generator=gen) < draw(st.sampled_from([0.3, 0.8, 1.0]))
    pad = draw(st.integers(0, t))  # left padding of row 0
    valid[0, :pad] = False
    return keys, query, valid, s


@settings(max_examples=150, deadline=None)
@given(cases())
def test_digest_scores_bound_every_valid_key_of_every_head(case):
    keys, query, valid, s = case
    b, h, t, d = keys.shape
    g = query.shape[1] // h
    lo, hi, count = block_digests(keys, s, valid)
    scores = score_blocks_reference(query, lo, hi, count, gqa="max")  # (B, H, N)
    qk = torch.einsum("bhgqd,bhtd->bhgqt", query.view(b, h, g, -1, d).double(), keys.double())
    block_of = torch.arange(t) // s
    bound = scores[:, :, block_of].double()  # (B, H, T)
    slack = 1e-4 * (1 + qk.abs().amax())
    ok = qk <= bound[:, :, None, None, :] + slack
    mask = valid[:, None, None, None, :].expand_as(ok)
    assert bool(ok[mask].all())
    assert torch.equal(count, torch.nn.functional.pad(valid, (0, -t % s)).view(b, -1, s).sum(-1))
    assert bool(torch.isneginf(scores[(count == 0).unsqueeze(1).expand_as(scores)]).all())
    assert bool(torch.isfinite(scores[(count > 0).unsqueeze(1).expand_as(scores)]).all())


def test_digest_of_one_key_is_tight():
    keys = torch.randn(2, 2, 5, 8)
    query = torch.randn(2, 2, 1, 8)
    lo, hi, count = block_digests(keys, 1)
    assert torch.equal(lo, keys) and torch.equal(hi, keys)
    scores = score_blocks_reference(query, lo, hi, count)
    exact = torch.einsum("bhqd,bhtd->bht", query, keys)
    torch.testing.assert_close(scores, exact)


def test_padded_keys_never_contribute():
    keys = torch.randn(2, 3, 12, 4)
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[0, :5] = False
    valid[1, 7] = False
    poisoned = keys.clone()
    poisoned[~valid.view(2, 1, 12).expand(2, 3, 12)] = 1e6
    a, b = block_digests(keys, 4, valid), block_digests(poisoned, 4, valid)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    lo, hi, count = a
    assert count.tolist() == [[0, 3, 4], [4, 3, 4]]
    assert bool((lo[0, :, 0] == 0).all() and (hi[0, :, 0] == 0).all())  # empty block: finite zeros
    assert torch.equal(hi[0, :, 1], keys[0, :, 5:8].amax(dim=1))


@settings(max_examples=80, deadline=None)
@given(cases(), st.lists(st.integers(0, 12), min_size=1, max_size=5))
def test_incremental_append_equals_from_scratch(case, cuts):
    keys, _, valid, s = case
    t = keys.shape[2]
    whole = KeyDigests.from_keys(keys, s, valid)
    inc = KeyDigests.empty(keys.shape[0], keys.shape[1], keys.shape[3], s)
    pos = 0
    for c in cuts + [t]:
        end = min(t, pos + c)
        inc.append(keys[:, :, pos:end], valid[:, pos:end])
        pos = end
    assert inc.length == whole.length == t
    assert torch.equal(inc.lo, whole.lo) and torch.equal(inc.hi, whole.hi) and torch.equal(inc.count, whole.count)
    torch.testing.assert_close(inc.total, whole.total, rtol=1e-5, atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(cases())
def test_landmarks_are_the_mean_of_each_blocks_valid_keys(case):
    keys, _, valid, s = case
    d = KeyDigests.from_keys(keys, s, valid)
    b, h, t, dim = keys.shape
    marks = d.landmarks()
    for row in range(b):
        for j in range(d.n_blocks):
            sl = slice(j * s, min(t, (j + 1) * s))
            v = valid[row, sl]
            want = keys[row, :, sl][:, v].mean(dim=1) if v.any() else torch.zeros(h, dim)
            torch.testing.assert_close(marks[row, :, j], want, rtol=1e-5, atol=1e-5)


def test_select_rows_and_crop_match_rebuilt_digests():
    keys = torch.randn(3, 2, 19, 4)
    valid = torch.ones(3, 19, dtype=torch.bool)
    valid[1, :6] = False
    d = KeyDigests.from_keys(keys, 4, valid)
    index = torch.tensor([2, 0, 0, 1])
    d.select_rows(index)
    want = KeyDigests.from_keys(keys[index], 4, valid[index])
    assert torch.equal(d.lo, want.lo) and torch.equal(d.hi, want.hi) and torch.equal(d.count, want.count)
    assert torch.equal(d.total, want.total)
    d.crop(10, keys[index][:, :, 8:10], valid[index][:, 8:10])
    want = KeyDigests.from_keys(keys[index][:, :, :10], 4, valid[index][:, :10])
    assert d.length == 10 and torch.equal(d.lo, want.lo) and torch.equal(d.count, want.count)
    torch.testing.assert_close(d.total, want.total)
    d.crop(8)
    assert d.n_blocks == 2 and d.length == 8
    with pytest.raises(ValueError, match="tail_keys"):
        d.crop(5)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="block_size"):
        block_digests(torch.randn(1, 1, 4, 2), 0)
    with pytest.raises(ValueError, match="keys"):
        block_digests(torch.randn(4, 2), 2)
    with pytest.raises(TypeError, match="bool"):
        block_digests(torch.randn(1, 1, 4, 2), 2, torch.ones(1, 4))
    with pytest.raises(ValueError, match="valid"):
        block_digests(torch.randn(1, 1, 4, 2), 2, torch.ones(1, 3, dtype=torch.bool))
    d = KeyDigests.empty(1, 2, 4, 4)
    with pytest.raises(ValueError, match="do not match"):
        d.append(torch.randn(1, 3, 2, 4))


def test_storage_is_transposed_for_scoring_and_grows_in_place():
    """lo/hi/landmarks are views of (B, H, D, capacity) buffers with the pages along the unit-stride
    dimension; decode appends fill the spare capacity (the buffers are replaced only when it runs out)."""
    keys = torch.randn(2, 3, 70, 4)
    d = KeyDigests.empty(2, 3, 4, 4)
    d.append(keys[:, :, :64])
    lo_t, hi_t, mean_t = d.transposed()
    assert lo_t.shape == (2, 3, 4, 16) and lo_t.stride(-1) == 1 and mean_t.stride(-1) == 1
    assert torch.equal(lo_t.transpose(-1, -2), d.lo) and torch.equal(mean_t.transpose(-1, -2), d.landmarks())
    storage = lo_t.untyped_storage().data_ptr()
    held = d.nbytes  # bounds, landmarks and counts, spare capacity included
    assert held >= d.lo.nbytes + d.hi.nbytes + d.landmarks().nbytes + d.count.nbytes
    # one buffer holds the bounds and the landmarks (rows lo, hi, mean), beside the counts and the last sum
    assert all(t.untyped_storage().data_ptr() == d.stacked().untyped_storage().data_ptr() for t in (lo_t, hi_t, mean_t))
    assert held == d.stacked().untyped_storage().nbytes() + d.count.nbytes + 2 * 3 * 4 * 4
    for t in range(64, 70):  # two more pages, within the spare capacity
        d.append(keys[:, :, t:t + 1])
    assert d.transposed()[0].untyped_storage().data_ptr() == storage
    want = KeyDigests.from_keys(keys, 4)
    assert torch.equal(d.lo, want.lo) and torch.equal(d.hi, want.hi) and torch.equal(d.count, want.count)
    torch.testing.assert_close(d.landmarks(), want.landmarks())
    more = torch.randn(2, 3, 200, 4)
    for t in range(0, 200, 3):  # past the capacity: the buffers grow, the contents stay
        d.append(more[:, :, t:t + 3])
    want = KeyDigests.from_keys(torch.cat((keys, more), dim=2), 4)
    assert torch.equal(d.lo, want.lo) and torch.equal(d.hi, want.hi) and torch.equal(d.count, want.count)
    torch.testing.assert_close(d.landmarks(), want.landmarks())
    torch.testing.assert_close(d.total, want.total, rtol=1e-5, atol=1e-5)


def test_capacity_is_a_little_slack_in_strides_of_16_columns():
    """The storage's capacity (the row stride of the scoring matmuls): at least ``n + n // 32 + 16``
    columns, a multiple of 16 but not of 256; ``shape`` and ``has_landmarks`` read without views."""
    from tiercache_llm.sparse.digests import _capacity

    for n in list(range(0, 600)) + [991, 4000, 8000, 2**15 - 40]:
        cap = _capacity(n)
        assert cap >= n + n // 32 + 16 and cap % 16 == 0 and cap % 256 != 0 and cap <= n + n // 32 + 48
    d = KeyDigests.from_keys(torch.randn(2, 3, 4000, 8), 4, storage=torch.float16)
    assert d.buffer().shape[-1] == _capacity(1000) and d.shape == tuple(d.lo.shape) == (2, 3, 1000, 8)
    assert d.has_landmarks
    assert not KeyDigests(4, d.lo, d.hi, d.count, 4000).has_landmarks


def test_landmarks_are_divided_once_from_exact_sums():
    """The kept landmark of a page equals ``sum / count`` of its exact running sum (what landmarks()
    always computed), also for the partial last page across decode appends and left padding."""
    keys = torch.randn(2, 2, 23, 8) * 3
    valid = torch.ones(2, 23, dtype=torch.bool)
    valid[1, :9] = False
    d = KeyDigests.empty(2, 2, 8, 5)
    d.append(keys[:, :, :13], valid[:, :13])
    running = keys[:, :, 10:13].sum(dim=2)  # page 2 holds tokens 10..14; 10..12 came in the first append
    for t in range(13, 23):
        d.append(keys[:, :, t:t + 1], valid[:, t:t + 1])
        if t < 15:
            running = running + keys[:, :, t]
    # page 2 was completed by decode appends: its landmark is the running sum over the count
    torch.testing.assert_close(d.landmarks()[:, :, 2], running / 5, rtol=1e-6, atol=1e-6)
    # the partial last page (tokens 20..22) keeps its exact sum
    last = keys[:, :, 20] + keys[:, :, 21] + keys[:, :, 22]
    assert torch.equal(d.total[:, :, -1], last)
    assert torch.equal(d.landmarks()[:, :, -1], last / 3)


def test_clone_is_independent_and_crop_that_fails_changes_nothing():
    keys = torch.randn(1, 2, 11, 4)
    d = KeyDigests.from_keys(keys, 4)
    c = d.clone()
    d.append(torch.randn(1, 2, 3, 4))
    want = KeyDigests.from_keys(keys, 4)
    assert c.length == 11 and torch.equal(c.lo, want.lo) and torch.equal(c.landmarks(), want.landmarks())
    assert torch.equal(c.count, want.count)
    with pytest.raises(ValueError, match="tail_keys"):
        c.crop(6)
    assert c.length == 11 and c.n_blocks == 3 and torch.equal(c.hi, want.hi)
    with pytest.raises(ValueError, match="count"):
        KeyDigests(4, want.lo, want.hi, want.count[:, :2], 11)


@settings(max_examples=120, deadline=None)
@given(cases(), st.sampled_from([1.0, 1e-6, 3e3, 3e4, 1e5]), st.sampled_from([torch.float32, torch.bfloat16]),
       st.integers(0, 40))
def test_float16_digests_are_rounded_outward_and_still_bound_every_key(case, mag, dtype, cut):
    """16-bit storage: lo rounded down, hi rounded up, built at once or by appends (decode tokens
    included), so the scores stay upper bounds of q·k; bounds float16 cannot hold switch the storage to
    float32 instead of becoming infinite."""
    keys, query, valid, s = case
    keys = (keys * mag).to(dtype)
    b, h, t, d = keys.shape
    g = query.shape[1] // h
    cut = min(cut, t)
    d16 = KeyDigests.from_keys(keys[:, :, :cut], s, valid[:, :cut], storage=torch.float16)
    for i in range(cut, t):
        d16.append(keys[:, :, i : i + 1], valid[:, i : i + 1])
    exact = KeyDigests.from_keys(keys, s, valid)
    fits = bool((keys.float().abs() <= torch.finfo(torch.float16).max)[valid[:, None, :, None].expand_as(keys)].all())
    assert d16.dtype == (torch.float16 if fits else torch.float32)
    assert torch.equal(d16.count, exact.count) and d16.length == t
    assert bool((d16.lo.double() <= exact.lo.double()).all()) and bool((d16.hi.double() >= exact.hi.double()).all())
    assert bool(torch.isfinite(d16.lo).all()) and bool(torch.isfinite(d16.hi).all())
    if d16.dtype == torch.float16:  # outward by at most one float16 step
        assert torch.equal(torch.nextafter(d16.lo, torch.full_like(d16.lo, float("inf"))).double() > exact.lo.double(),
                           torch.ones_like(d16.lo, dtype=torch.bool))
    scores = score_blocks_reference(query, d16.lo, d16.hi, d16.count, gqa="max")
    qk = torch.einsum("bhgqd,bhtd->bhgqt", query.view(b, h, g, -1, d).double(), keys.double())
    bound = scores[:, :, torch.arange(t) // s].double()
    ok = qk <= bound[:, :, None, None, :] + 1e-5 * (1 + qk.abs().amax())
    assert bool(ok[valid[:, None, None, None, :].expand_as(ok)].all())
    torch.testing.assert_close(d16.landmarks(), exact.landmarks(), rtol=2e-3, atol=1e-6 * mag + 6e-8)  # 6e-8: float16 subnormal step
    torch.testing.assert_close(d16._tail, exact._tail, rtol=1e-5, atol=1e-5 * mag)  # the last page's exact sum


def test_round_outward_is_the_nearest_value_on_the_right_side():
    from tiercache_llm.sparse.digests import round_down, round_up

    x = torch.cat((torch.randn(10000) * torch.logspace(-9, 5, 10000), torch.tensor([0.0, -0.0, 65504.0, 1e-8, -1e-8])))
    lo, hi = round_down(x, torch.float16), round_up(x, torch.float16)
    assert lo.dtype == hi.dtype == torch.float16
    assert bool((lo.float() <= x).all()) and bool((hi.float() >= x).all())
    assert bool((torch.nextafter(lo, torch.full_like(lo, float("inf"))).float() > x).all())
    assert bool((torch.nextafter(hi, torch.full_like(hi, float("-inf"))).float() < x).all())
    assert bool(((hi == lo) == (hi.float() == x)).all())  # equal exactly where x is a float16
    with pytest.raises(ValueError, match="storage"):
        KeyDigests.empty(1, 1, 4, 4, storage=torch.bfloat16)
