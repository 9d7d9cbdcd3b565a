"""The one-token append of a decode step (``KeyDigests._append_token``) gives exactly the digests of the
general append (``_append_keys``), padding and fresh blocks included."""

import torch
from hypothesis import given, settings, strategies as st

from tiercache_llm.sparse import KeyDigests


def _general(d: KeyDigests, keys: torch.Tensor, valid: torch.Tensor) -> None:
    d._append_keys(keys.to(d._lo_t.dtype), valid)
    d.length += keys.shape[2]


@settings(max_examples=60, deadline=None)
@given(b=st.integers(1, 3), h=st.integers(1, 3), d=st.sampled_from([1, 4, 8]), s=st.sampled_from([1, 2, 3, 8]),
       t0=st.integers(0, 20), steps=st.integers(1, 20), p_valid=st.sampled_from([0.0, 0.5, 0.9, 1.0]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**31 - 1))
def test_one_token_append_equals_the_general_append(b, h, d, s, t0, steps, p_valid, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    keys = (torch.randn(b, h, t0 + steps, d, generator=gen) * 3).to(dtype)
    valid = torch.rand(b, t0 + steps, generator=gen) < p_valid
    fast = KeyDigests.empty(b, h, d, s, dtype=dtype)
    ref = KeyDigests.empty(b, h, d, s, dtype=dtype)
    if t0:
        fast.append(keys[:, :, :t0], valid[:, :t0])
        ref.append(keys[:, :, :t0], valid[:, :t0])
    for t in range(t0, t0 + steps):
        fast.append(keys[:, :, t:t + 1], valid[:, t:t + 1])
        _general(ref, keys[:, :, t:t + 1], valid[:, t:t + 1])
        assert fast.length == ref.length == t + 1 and fast.n_blocks == ref.n_blocks
        assert torch.equal(fast.lo, ref.lo) and torch.equal(fast.hi, ref.hi) and torch.equal(fast.count, ref.count)
        assert torch.equal(fast.landmarks(), ref.landmarks()) and torch.equal(fast._tail, ref._tail)
    whole = KeyDigests.from_keys(keys, s, valid)
    assert torch.equal(fast.lo, whole.lo) and torch.equal(fast.hi, whole.hi) and torch.equal(fast.count, whole.count)
