"""``sparse_attention`` (what sparse decode calls) through the Triton block-table kernel against the torch
reference: interpreted on CPU, compiled on a GPU (``gpu`` marker).  Blocks are laid out as the fetch stage
hands them over - a ``(U, B, H, S, D)`` buffer permuted to ``(B, H, U, S, D)`` - with padding, a partial
tail, NaN in every hidden token, GQA ratios 1/3/4, per-row and per-head token validity, empty
selections, and one or more new tokens."""

from __future__ import annotations

import pytest
import torch

from tiercache_llm.sparse.attention import sparse_attention, sparse_attention_reference

TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def _case(seed: int, dtype: torch.dtype, device: torch.device, *, g: int | None = None, q: int = 1,
          per_head: bool = False, new: bool = True, empty: str = "some"):
    gen = torch.Generator().manual_seed(seed)
    pick = lambda *xs: xs[int(torch.randint(len(xs), (1,), generator=gen))]  # noqa: E731
    b, h, s, d = pick(1, 2, 3), pick(1, 2, 3), pick(1, 4, 16, 20), pick(8, 32, 64)
    g = pick(1, 3, 4) if g is None else g
    u = 0 if empty == "all" else int(torch.randint(1, 9, (1,), generator=gen))
    kbuf = torch.randn(u, b, h, s, d, generator=gen) * pick(0.5, 3.0)
    vbuf = torch.randn(u, b, h, s, d, generator=gen)
    mask = torch.rand(b, h, u, generator=gen) < pick(0.4, 0.8, 1.0)
    if empty == "some" and b * h > 1 and u:
        mask[-1, -1] = False  # one (row, head) attends no block
    if per_head:
        valid = torch.rand(b, h, u, s, generator=gen) < 0.85
        hidden = ~valid.permute(2, 0, 1, 3)
    else:
        valid = torch.ones(b, u, s, dtype=torch.bool)
        for row in range(b):  # left padding, and an unfilled tail in the last block
            valid[row, : min(u, int(torch.randint(0, 3, (1,), generator=gen)))] = False
            if u:
                valid[row, 0, : int(torch.randint(0, s, (1,), generator=gen))] = False
        if u:
            valid[:, -1, int(torch.randint(1, s + 1, (1,), generator=gen)):] = False
        hidden = ~valid.permute(1, 0, 2).unsqueeze(2).expand(u, b, h, s)
    kbuf[hidden], vbuf[hidden] = float("nan"), float("nan")  # hidden tokens must never be read
    query = torch.randn(b, h * g, q, d, generator=gen)
    nk = torch.randn(b, h, q, d, generator=gen) if new else None
    nv = torch.randn(b, h, q, d, generator=gen) if new else None
    to = lambda x: None if x is None else x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype)  # noqa: E731
    kbuf, vbuf = to(kbuf), to(vbuf)
    return (to(query), kbuf.permute(1, 2, 0, 3, 4), vbuf.permute(1, 2, 0, 3, 4), to(mask), to(valid), to(nk),
            to(nv)), pick(None, 1, 2, 3, 100)


def _check(args, splits, dtype):
    got = sparse_attention(*args, backend="triton", num_splits=splits)
    want = sparse_attention_reference(*args)
    assert got.output.dtype == dtype and got.output.shape == want.output.shape
    assert got.block_mass.dtype == torch.float32 and got.block_mass.shape == want.block_mass.shape
    assert not bool(torch.isnan(got.output).any())
    torch.testing.assert_close(got.output.float().cpu(), want.output.float().cpu(), rtol=TOL[dtype], atol=TOL[dtype])
    torch.testing.assert_close(got.block_mass.cpu(), want.block_mass.cpu(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.new_mass.cpu(), want.new_mass.cpu(), rtol=1e-4, atol=1e-5)
    total = (got.block_mass.sum(-1) + got.new_mass).cpu()
    attended = total > 0
    torch.testing.assert_close(total[attended], torch.ones_like(total[attended]))
    return got


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("g", [1, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_sparse_attention_matches_reference(device, seed, g, dtype):
    args, splits = _case(seed, dtype, device, g=g)
    _check(args, splits, dtype)


@pytest.mark.parametrize("seed", range(3))
def test_per_head_token_validity_and_several_query_positions(device, seed):
    args, splits = _case(100 + seed, torch.float32, device, q=1 + seed, per_head=True)
    _check(args, splits, torch.float32)


@pytest.mark.parametrize("new", [True, False])
def test_empty_selections(device, new):
    """No block at all (U = 0): only the new tokens, or nothing (zeros)."""
    args, _ = _case(7, torch.float32, device, new=new, empty="all")
    got = _check(args, None, torch.float32)
    assert got.block_mass.shape[-1] == 0
    if new:  # one new token and no context: the output is that token's value
        torch.testing.assert_close(got.new_mass.cpu(), torch.ones_like(got.new_mass.cpu()))
    else:
        assert not bool(got.output.any()) and not bool(got.new_mass.any())


def test_a_head_without_blocks_and_no_new_token_gets_zeros(device):
    args, _ = _case(11, torch.float32, device, new=False, g=3)
    mask = args[3].clone()
    mask[0, 0] = False
    args = (args[0], args[1], args[2], mask, args[4], None, None)
    got = _check(args, 2, torch.float32)
    assert not bool(got.output[0, :3].any()) and not bool(got.block_mass[0, :3].any())


def test_auto_backend_is_the_reference_on_cpu():
    args, _ = _case(3, torch.float32, torch.device("cpu"))
    got, want = sparse_attention(*args), sparse_attention_reference(*args)
    assert torch.equal(got.output, want.output) and torch.equal(got.block_mass, want.block_mass)


def test_bad_backend_and_shapes_are_refused():
    args, _ = _case(3, torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="backend"):
        sparse_attention(*args, backend="cuda")
    with pytest.raises(ValueError, match="block_mask"):
        sparse_attention(args[0], args[1], args[2], args[3][:, :, :0], backend="triton")
    with pytest.raises(ValueError, match="new_keys"):
        sparse_attention(*args[:5], args[5], None, backend="triton")


@pytest.mark.parametrize("backend", ["blocks-triton", "pages-triton"])
def test_sparse_decode_of_a_real_model_through_the_kernel(monkeypatch, backend):
    """transformers generate() with a sparse TieredKVCache (left-padded batch, GQA 2:1, a budget below the
    context so heads select different blocks, the tail block partial): the attention of every decode
    step run by a Triton kernel (interpreted; the block-table kernel, or the page-table kernel) gives
    the torch page-table path's scores and tokens."""
    pytest.importorskip("triton")
    from tiercache_kernels.triton_support import interpreter_active

    if not interpreter_active():
        pytest.skip("needs the Triton interpreter (CPU)")
    from transformers import AutoModelForCausalLM, LlamaConfig

    import tiercache_llm.sparse_layer as sparse_layer
    from tiercache_llm import TieredKVCache

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = AutoModelForCausalLM.from_config(config).eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (3, 30), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :7], mask[2, :19] = 0, 0
    ids[mask == 0] = 0

    def run():
        with TieredKVCache.for_model(model, mode="sparse", budget=12, sink=2, recent=4, block_size=4,
                                     host="64KiB") as cache:
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                                 past_key_values=cache, return_dict_in_generate=True, output_scores=True)
            steps = cache.stats()["sparse"]["total"]["layer_steps"]
            cache.restore_model()
        return out, steps

    ref, steps = run()
    assert steps == 5 * 2
    calls = []

    original = sparse_layer.attend_selected

    def through_kernel(*args, **kwargs):
        calls.append(1)
        return original(*args, **{**kwargs, "backend": backend})

    monkeypatch.setattr(sparse_layer, "attend_selected", through_kernel)
    got, _ = run()
    assert len(calls) == steps
    assert torch.equal(ref.sequences, got.sequences)
    for a, b in zip(ref.scores, got.scores):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
