"""Black-box acceptance tests of issue 9's interface (``TieredKVCache.for_model``, sparse mode, strategies,
the unprepared-model error) on shapes, architectures and call patterns the other tests do not use.

Everything goes through public names only: ``TieredKVCache.for_model``, ``model.generate``, plain
``model(ids, past_key_values=cache)`` calls, ``crop`` / ``reorder_cache`` / ``batch_select_indices``,
``stats()``, ``restore_model``.  References are either ``DynamicCache`` (budget >= the context: sparse
must equal dense attention) or a second sparse cache that reached the same state another way (sparse
selection depends only on the stored tokens and the query, so the logits must agree).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, DynamicCache

from tiercache_llm import TieredKVCache, UnsupportedModelError
from tiercache_llm.attention_hook import PREFIX, is_prepared
from tiercache_llm.hf_kwargs import cache_kwargs
from tiercache_llm.sparse_layer import SparseModeError

from .test_generate_tiny import left_padded_batch
from .test_sparse_pipeline import check_mask

DENSE = 10**6
STRATEGIES = ("attention-aware", "fetch-every-step", "reuse-layer-ahead")
COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models on a shared machine: torch's intra-op threads only add waits (10x slower under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(kind: str = "llama", seed: int = 0, dtype: torch.dtype | None = None, **overrides):
    cls = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config", "mistral": "MistralConfig",
           "phi3": "Phi3Config", "gemma2": "Gemma2Config", "gemma3": "Gemma3TextConfig", "gpt_oss": "GptOssConfig",
           "olmo2": "Olmo2Config", "starcoder2": "Starcoder2Config"}[kind]
    config_cls = getattr(transformers, cls, None)
    if config_cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {cls}")
    torch.manual_seed(seed)
    config = config_cls(**{**COMMON, **overrides})
    kw = {} if dtype is None else {"dtype": dtype}
    return AutoModelForCausalLM.from_config(config, **kw).eval()


def padded(lengths=(37, 22, 5), vocab=128, seed=0):
    return left_padded_batch(vocab=vocab, lengths=lengths, seed=seed)


def forced(model, cache, ids, mask, tokens):
    """Prefill then one forward per column of ``tokens`` (teacher forcing); last-position logits per pass."""
    out, m = [], mask
    with torch.no_grad():
        check_mask(cache, ids, m)
        out.append(model(ids, attention_mask=m, **cache_kwargs(cache, model)).logits[:, -1].float())
        for col in tokens.T:
            m = torch.cat((m, torch.ones_like(m[:, :1])), 1)
            check_mask(cache, col[:, None], m)
            out.append(model(col[:, None], attention_mask=m, **cache_kwargs(cache, model)).logits[:, -1].float())
    return torch.stack(out), m


def decode_more(model, cache, mask, tokens):
    out, m = [], mask
    with torch.no_grad():
        for col in tokens.T:
            m = torch.cat((m, torch.ones_like(m[:, :1])), 1)
            check_mask(cache, col[:, None], m)
            out.append(model(col[:, None], attention_mask=m, **cache_kwargs(cache, model)).logits[:, -1].float())
    return torch.stack(out)


def gen(model, cache, ids, mask, n=10, **kw):
    kw.setdefault("do_sample", False)
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, pad_token_id=0, past_key_values=cache,
                          return_dict_in_generate=True, output_scores=True, **kw)


def sparse(model, **kw):
    kw.setdefault("block_size", 8)
    kw.setdefault("host", "1MiB")
    return TieredKVCache.for_model(model, mode="sparse", **kw)


def tokens_for(batch, n=10, seed=1):
    return torch.randint(3, 128, (batch, n), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------- architectures, shapes
ARCHS = [
    ("llama", dict(num_key_value_heads=4)),                                          # MHA (GQA ratio 1)
    ("llama", dict(num_attention_heads=8, num_key_value_heads=2, hidden_size=128)),  # GQA 4, head_dim 16
    ("llama", dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=1, head_dim=32)),   # MQA, 32
    ("llama", dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=128)),  # head_dim 128
    ("llama", dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=64)),   # head_dim 64
    ("qwen2", {}),
    ("qwen3", dict(head_dim=16)),
    ("mistral", dict(sliding_window=None)),
    ("phi3", {}),
    ("olmo2", {}),
    ("starcoder2", dict(sliding_window=None)),
    ("gemma3", dict(head_dim=16, sliding_window=8, layer_types=["full_attention", "sliding_attention"])),
]


@pytest.mark.parametrize("kind,overrides", ARCHS, ids=[f"{k}-{i}" for i, (k, _) in enumerate(ARCHS)])
def test_dense_budget_equals_dynamic_cache_across_architectures(kind, overrides):
    """Odd prompt lengths (not multiples of the 8-token block), left padding, a row shorter than one block:
    a budget above the context gives DynamicCache's logits and greedy tokens, and really ran sparse."""
    model = build(kind, **overrides)
    ids, mask = padded()
    ref = gen(model, DynamicCache(config=model.config), ids, mask)
    with sparse(model, budget=DENSE, block_size=8, host="2KiB", disk="1MiB") as cache:
        got = gen(model, cache, ids, mask)
        total = cache.stats()["sparse"]["total"]
        cache.restore_model()
    assert torch.equal(ref.sequences, got.sequences)
    for a, b in zip(ref.scores, got.scores):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert total["steps"] == 9 and total["layer_steps"] > 0  # decode steps went through the sparse path
    assert total["tokens_attended"] == total["tokens_context"]


@pytest.mark.parametrize("lengths", [(1, 1, 1), (1, 2, 9), (8, 8, 8), (16, 3, 1), (7,)])
def test_contexts_shorter_than_sink_plus_recent_are_dense(lengths):
    """Default sink/recent (4 + 64) cover these whole contexts, so even a 1-token or 1 % budget is dense."""
    model = build("llama")
    ids, mask = padded(lengths)
    toks = tokens_for(len(lengths))
    ref, _ = forced(model, DynamicCache(config=model.config), ids, mask, toks)
    for budget in (1, 0.01, DENSE):
        with sparse(model, budget=budget) as cache:
            got, _ = forced(model, cache, ids, mask, toks)
            cache.restore_model()
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------- unsupported attention
@pytest.mark.parametrize("kind,overrides,what", [
    ("gemma2", dict(head_dim=16, sliding_window=8, query_pre_attn_scalar=16, attn_logit_softcapping=1.0,
                    layer_types=["full_attention"] * 2), "soft-capping"),
    ("gpt_oss", dict(head_dim=16, num_local_experts=2, num_experts_per_tok=1, sliding_window=8,
                     layer_types=["full_attention"] * 2), "sinks"),
])
def test_attention_sparse_decode_cannot_reproduce_is_refused(kind, overrides, what):
    """Bug found: Gemma 2's logit soft-capping and gpt-oss's attention sinks reach the attention function as
    ``softcap=`` / ``s_aux=``, which sparse decode ignored: a *dense* budget gave logits 0.4-0.8 away from
    DynamicCache's and other tokens, silently.  for_model must refuse the model, leaving it untouched;
    exact mode still serves it token for token."""
    model = build(kind, **overrides)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        for layer in model.model.layers:  # large attention logits, so a missing soft-cap would show
            layer.self_attn.q_proj.weight.mul_(20)
    with pytest.raises(UnsupportedModelError, match=what):
        TieredKVCache.for_model(model, mode="sparse", budget=DENSE, block_size=4, host="1MiB")
    assert not is_prepared(model) and model.config._attn_implementation == "eager"
    ids, mask = padded((13, 6))
    ref = gen(model, DynamicCache(config=model.config), ids, mask, n=6)
    with TieredKVCache.for_model(model, block_size=4, host="1MiB") as cache:  # exact mode
        got = gen(model, cache, ids, mask, n=6)
    assert torch.equal(ref.sequences, got.sequences)


def test_unsupported_attention_arguments_raise_at_decode_even_if_preparation_was_forced(monkeypatch):
    """The runtime guard behind the for_model check: a prepared model whose attention passes ``softcap``
    raises SparseModeError at the first sparse decode step instead of attending without it."""
    from tiercache_llm import attention_hook

    model = build("gemma2", head_dim=16, sliding_window=8, query_pre_attn_scalar=16, attn_logit_softcapping=1.0,
                  layer_types=["full_attention"] * 2)
    model.set_attn_implementation("eager")
    monkeypatch.setattr(attention_hook, "unsupported_attention", lambda model: None)
    ids, mask = padded((13, 6))
    with sparse(model, budget=DENSE, block_size=4) as cache:
        with pytest.raises(SparseModeError, match="soft-capping"):
            gen(model, cache, ids, mask, n=3)
        cache.restore_model()


# ----------------------------------------------------------------------------------- option validation
@pytest.mark.parametrize("budget,exc", [
    (0.0, ValueError), (-1, ValueError), (-0.5, ValueError), (1.5, ValueError), (1.0000001, ValueError),
    (float("nan"), ValueError), (float("inf"), ValueError), (True, TypeError), (False, TypeError),
    ("0.25", TypeError), ([8], TypeError),
])
def test_bad_budgets_raise_and_leave_the_model_unprepared(budget, exc):
    model = build("llama")
    with pytest.raises(exc, match="budget"):
        TieredKVCache.for_model(model, mode="sparse", budget=budget, block_size=4, host="1MiB")
    assert not is_prepared(model) and model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("options,match", [
    (dict(mode="sparse", sink=-1), "sink"), (dict(mode="sparse", recent=1.5), "recent"),
    (dict(mode="sparse", sink=True), "sink"), (dict(mode="sparse", strategy="lru"), "strategy"),
    (dict(mode="sparse", decay=float("nan")), "decay"), (dict(mode="sparse", page_size=3), "page_size"),
    (dict(mode="exact", budget=0.5), "sparse"), (dict(mode="exact", strategy="fetch-every-step"), "sparse"),
    (dict(mode="exact", sink=4), "sparse"), (dict(mode="dense"), "mode"),
])
def test_bad_options_raise_clearly(options, match):
    model = build("llama")
    with pytest.raises((ValueError, TypeError), match=match):
        TieredKVCache.for_model(model, block_size=4, host="1MiB", **options)
    assert not is_prepared(model)


def test_for_model_refuses_flex_attention_and_leaves_the_model_as_it_was():
    model = build("llama")
    try:
        model.set_attn_implementation("flex_attention")
    except Exception as exc:  # noqa: BLE001 - not available in this torch/transformers
        pytest.skip(f"flex attention unavailable: {exc}")
    with pytest.raises(ValueError, match="'sdpa' or 'eager'"):
        TieredKVCache.for_model(model, mode="sparse", budget=8, host="1MiB")
    assert not is_prepared(model) and model.config._attn_implementation == "flex_attention"


def test_for_model_refuses_what_is_not_a_model():
    with pytest.raises(TypeError, match="transformers model"):
        TieredKVCache.for_model(object(), mode="sparse")


# ----------------------------------------------------------------------------------- autograd enabled
@pytest.mark.parametrize("mode", ["exact", "sparse"])
def test_plain_forward_outside_no_grad(mode):
    """Bug found: ``model(ids, past_key_values=cache)`` without ``torch.no_grad()`` (what a user's script
    does by default; DynamicCache allows it) crashed at the first decode step -- exact mode in the
    decode buffer's in-place copies ("a view was created in no_grad mode ..."), sparse mode in the
    selection's ``out=`` matmuls, because the digests had recorded the prefill's autograd graph.  The
    logits must equal those of the same steps under no_grad, and no cache state may keep a graph."""
    model = build("llama")
    ids, mask = padded()
    toks = tokens_for(3, 5)
    options = dict(budget=8, sink=1, recent=4) if mode == "sparse" else {}
    runs = []
    for grad in (False, True):
        with torch.set_grad_enabled(grad), TieredKVCache.for_model(model, mode=mode, block_size=8, host="1MiB",
                                                                   **options) as cache:
            m, out = mask, [model(ids, attention_mask=mask, **cache_kwargs(cache, model)).logits[:, -1]]
            for col in toks.T:
                m = torch.cat((m, torch.ones_like(m[:, :1])), 1)
                out.append(model(col[:, None], attention_mask=m, **cache_kwargs(cache, model)).logits[:, -1])
            assert out[-1].requires_grad == grad
            for layer in cache.layers:
                held = [v for v in vars(layer).values() if isinstance(v, torch.Tensor)]
                if layer.sparse is not None:
                    d = layer.sparse.digests
                    held += [layer.sparse.valid, layer.sparse.mass, d.lo, d.hi, d.total]
                assert not any(t.requires_grad for t in held)
            cache.restore_model()
        runs.append(torch.stack([o.detach() for o in out]))
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["exact", "sparse"])
def test_gradient_of_one_decode_step_matches_dynamic_cache(mode):
    """Earlier steps under no_grad, the last one with grad: the gradient of its logits reaches this
    step's queries, keys and values as with DynamicCache (dense budget in sparse mode)."""
    model = build("llama", seed=3)
    ids, mask = padded((21, 9))
    toks = tokens_for(2, 4)
    grads = []
    for which in ("dynamic", mode):
        if which == "dynamic":
            cache = DynamicCache(config=model.config)
        else:
            options = dict(budget=DENSE) if mode == "sparse" else {}
            cache = TieredKVCache.for_model(model, mode=mode, block_size=4, host="1MiB", **options)
        _, m = forced(model, cache, ids, mask, toks[:, :-1])
        m = torch.cat((m, torch.ones_like(m[:, :1])), 1)
        model.zero_grad()
        logits = model(toks[:, -1:], attention_mask=m, **cache_kwargs(cache, model)).logits[:, -1]
        (logits * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if "self_attn" in n})
        if which != "dynamic":
            cache.restore_model()
            cache.close()
    model.zero_grad()
    for name, ref in grads[0].items():
        torch.testing.assert_close(grads[1][name], ref, rtol=1e-4, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------------- strategies, generate modes
@pytest.mark.parametrize("block_size,page_size,kw", [
    (8, 8, dict(num_beams=3, num_return_sequences=2)),
    (3, 1, dict(do_sample=True, num_return_sequences=3, top_k=0)),
    (16, 4, dict(do_sample=False)),
], ids=["beam", "sample", "greedy"])
def test_strategies_give_identical_logits_at_a_small_budget(block_size, page_size, kw):
    """The issue defines the strategies as the same selection with different placement: bit-identical
    scores in every generate mode, with a host tier far smaller than the KV (disk reads)."""
    model = build("llama")
    ids, mask = padded()
    runs = []
    for strategy in STRATEGIES:
        with sparse(model, budget=6, sink=1, recent=2, block_size=block_size, page_size=page_size, host="4KiB",
                    disk="1MiB", strategy=strategy) as cache:
            torch.manual_seed(7)
            runs.append(gen(model, cache, ids, mask, n=10, **kw))
            total = cache.stats()["sparse"]["total"]
            cache.restore_model()
        assert total["tokens_attended"] < total["tokens_context"]  # really sparse
    for other in runs[1:]:
        assert torch.equal(runs[0].sequences, other.sequences)
        for a, b in zip(runs[0].scores, other.scores):
            assert torch.equal(a, b)


@pytest.mark.parametrize("kw", [dict(num_beams=3, num_return_sequences=2),
                                dict(do_sample=True, num_return_sequences=2, top_k=0)], ids=["beam", "sample"])
def test_beam_search_and_seeded_sampling_at_dense_budget_equal_dynamic_cache(kw):
    model = build("qwen2", seed=2)
    ids, mask = padded(seed=2)
    torch.manual_seed(11)
    ref = gen(model, DynamicCache(config=model.config), ids, mask, n=12, **kw)
    with sparse(model, budget=1.0, block_size=4, host="2KiB", disk="1MiB") as cache:
        torch.manual_seed(11)
        got = gen(model, cache, ids, mask, n=12, **kw)
        cache.restore_model()
    assert torch.equal(ref.sequences, got.sequences)


@pytest.mark.parametrize("budget,block_size,page_size,sink,recent", [
    (8, 8, 8, 0, 0), (16, 8, 8, 0, 0), (5, 8, 1, 0, 0), (12, 8, 4, 1, 1), (0, 16, 8, 0, 0), (0.3, 4, 4, 0, 0),
])
def test_budget_bounds_the_tokens_attended(budget, block_size, page_size, sink, recent):
    """Per decode step: each row and KV head attends at most its budget (int: tokens; float: that fraction
    of the row's own valid context, rounded up) when sinks and recent pages fit in it."""
    model = build("llama")
    ids, mask = padded()
    with sparse(model, budget=budget, sink=sink, recent=recent, block_size=block_size, page_size=page_size) as cache:
        with torch.no_grad():
            model(ids, attention_mask=mask, **cache_kwargs(cache, model))
            m, tok = mask, ids[:, -1:]
            for _ in range(10):
                m = torch.cat((m, torch.ones_like(m[:, :1])), 1)
                tok = model(tok, attention_mask=m, **cache_kwargs(cache, model)).logits[:, -1:].argmax(-1)
                contexts = m[:, :-1].sum(1).tolist()
                per_row = [min(n, math.ceil(budget * n) if isinstance(budget, float) else budget) for n in contexts]
                last = cache.stats()["sparse"]["last_step"]
                assert last["tokens_attended"] <= sum(per_row) * 2 * 2  # layers x KV heads
                assert last["tokens_context"] == sum(contexts) * 2 * 2
        cache.restore_model()


# ----------------------------------------------------------------------------------- padding, rows
@pytest.mark.parametrize("budget", [6, 0.3])
def test_a_row_in_a_padded_batch_decodes_as_it_does_alone(budget):
    """Each row's budget counts its own tokens and padding is never selected: with token-sized pages (no
    page alignment to the padding) a row decodes to the same logits alone, unpadded, as inside a
    left-padded batch."""
    model = build("llama")
    ids, mask = padded((30, 19, 11))
    toks = tokens_for(3, 10)
    opts = dict(budget=budget, sink=1, recent=3, block_size=5, page_size=1, host="2KiB", disk="1MiB")
    with sparse(model, **opts) as cache:
        batch, _ = forced(model, cache, ids, mask, toks)
    for row in range(3):
        n = int(mask[row].sum())
        with sparse(model, **opts) as cache:
            alone, _ = forced(model, cache, ids[row:row + 1, -n:], mask[row:row + 1, -n:], toks[row:row + 1])
        torch.testing.assert_close(alone[:, 0], batch[:, row], rtol=1e-5, atol=1e-5)
    from tiercache_llm.attention_hook import restore_model

    restore_model(model)


def test_padding_values_never_influence_sparse_decoding():
    """The pad token's embedding scaled to 1e3 makes the padded keys/values huge: with padding excluded
    from digests, selection and attention, nothing changes (pages of 8 mixing padding and tokens)."""
    model = build("llama")
    ids, mask = padded((30, 19, 11))
    toks = tokens_for(3, 8)
    emb = model.get_input_embeddings().weight
    for strategy in ("attention-aware", "fetch-every-step"):
        runs = []
        for poison in (None, 1e3):
            saved = emb.data[0].clone()
            if poison is not None:
                emb.data[0] = poison
            try:
                with sparse(model, budget=6, sink=1, recent=3, block_size=8, page_size=8, host="2KiB", disk="1MiB",
                            strategy=strategy) as cache:
                    runs.append(forced(model, cache, ids, mask, toks)[0])
                    cache.restore_model()
            finally:
                emb.data[0] = saved
        assert torch.equal(runs[0], runs[1])


# ----------------------------------------------------------------------------------- crop, reorder, select
@pytest.mark.parametrize("block_size,page_size,cut", [(4, 2, 5), (8, 8, 8), (3, 1, 1)])
def test_crop_then_decode_equals_a_cache_that_never_saw_the_cut_tokens(block_size, page_size, cut):
    model = build("llama")
    ids, mask = padded((30, 19, 11))
    toks = tokens_for(3, 12)
    for strategy in STRATEGIES:
        opts = dict(budget=6, sink=1, recent=3, block_size=block_size, page_size=page_size, host="2KiB",
                    disk="1MiB", strategy=strategy)
        with sparse(model, **opts) as a, sparse(model, **opts) as b:
            _, ma = forced(model, a, ids, mask, toks[:, :9])
            a.crop(-cut)
            _, mb = forced(model, b, ids, mask, toks[:, :9 - cut])
            assert a.get_seq_length() == b.get_seq_length()
            assert torch.equal(decode_more(model, a, mb, toks[:, 9:]), decode_more(model, b, mb, toks[:, 9:]))
            a.restore_model()


@pytest.mark.parametrize("op,index", [("reorder", [2, 0, 0]), ("select", [2, 0])])
def test_reorder_and_batch_selection_equal_a_cache_built_from_those_rows(op, index):
    model = build("llama")
    ids, mask = padded((30, 19, 11))
    toks = tokens_for(3, 10)
    rows = torch.tensor(index)
    for strategy in STRATEGIES:
        opts = dict(budget=6, sink=1, recent=3, block_size=4, page_size=2, host="2KiB", disk="1MiB",
                    strategy=strategy)
        with sparse(model, **opts) as a, sparse(model, **opts) as b:
            _, m = forced(model, a, ids, mask, toks[:, :6])
            a.reorder_cache(rows) if op == "reorder" else a.batch_select_indices(rows)
            forced(model, b, ids[rows], mask[rows], toks[rows, :6])
            got = decode_more(model, a, m[rows], toks[rows, 6:])
            want = decode_more(model, b, m[rows], toks[rows, 6:])
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
            a.restore_model()


# ----------------------------------------------------------------------------------- one model, many caches
def test_one_model_serves_interleaved_sparse_caches_and_dynamic_cache():
    """Two sparse caches of different strategies and budgets decode alternately, step by step, on one
    prepared model, with DynamicCache passes in between; each equals its own uninterrupted run."""
    model = build("llama", seed=4)
    ids, mask = padded(seed=4)
    toks = tokens_for(3, 8, seed=4)
    opts_a = dict(budget=6, sink=1, recent=2, block_size=4, strategy="attention-aware")
    opts_b = dict(budget=0.5, block_size=8, strategy="fetch-every-step")
    alone = []
    for opts in (opts_a, opts_b):
        with sparse(model, **opts) as cache:
            alone.append(forced(model, cache, ids, mask, toks)[0])
    ref_dense = forced(model, DynamicCache(config=model.config), ids, mask, toks)[0]
    a, b, d = sparse(model, **opts_a), sparse(model, **opts_b), DynamicCache(config=model.config)
    outs = {"a": [], "b": [], "d": []}
    m = mask
    with torch.no_grad():
        for name, cache in (("a", a), ("b", b), ("d", d)):
            outs[name].append(model(ids, attention_mask=m, **cache_kwargs(cache, model)).logits[:, -1])
        for col in toks.T:
            m = torch.cat((m, torch.ones_like(m[:, :1])), 1)
            for name, cache in (("a", a), ("d", d), ("b", b)):
                outs[name].append(model(col[:, None], attention_mask=m, **cache_kwargs(cache, model)).logits[:, -1])
    torch.testing.assert_close(torch.stack(outs["a"]), alone[0], rtol=0, atol=0)
    torch.testing.assert_close(torch.stack(outs["b"]), alone[1], rtol=0, atol=0)
    torch.testing.assert_close(torch.stack(outs["d"]), ref_dense, rtol=1e-6, atol=1e-6)
    a.restore_model()
    assert not is_prepared(model) and model.config._attn_implementation == "sdpa"
    with pytest.raises(SparseModeError, match="not prepared"):  # b's model was restored by a
        decode_more(model, b, m, toks[:, :1])
    a.close()
    b.close()


def test_prepared_then_exact_and_restored_model_is_the_original():
    """A model prepared for sparse decoding serves an exact cache (for_model, exact) token for token; after
    restore the attention implementation and hooks are the original's, and a fresh sparse cache built by
    for_model prepares it again."""
    model = build("mistral", seed=5, sliding_window=None)
    ids, mask = padded(seed=5)
    ref = gen(model, DynamicCache(config=model.config), ids, mask)
    hooks = len(model.model._forward_pre_hooks), len(model.model._forward_hooks)
    s = sparse(model, budget=8)
    assert model.config._attn_implementation == PREFIX + "sdpa"
    with TieredKVCache.for_model(model, mode="exact", block_size=4, host="1MiB") as exact:
        got = gen(model, exact, ids, mask)
    assert torch.equal(ref.sequences, got.sequences)
    s.restore_model()
    s.close()
    assert (len(model.model._forward_pre_hooks), len(model.model._forward_hooks)) == hooks
    assert model.config._attn_implementation == "sdpa"
    assert torch.equal(gen(model, DynamicCache(config=model.config), ids, mask).sequences, ref.sequences)
    with sparse(model, budget=DENSE) as again:
        assert torch.equal(gen(model, again, ids, mask).sequences, ref.sequences)
        again.restore_model()


def test_unprepared_model_raises_with_plain_forward_and_generate_for_every_strategy():
    model = build("llama")
    ids, mask = padded()
    for strategy in STRATEGIES:
        cache = TieredKVCache(model.config, mode="sparse", strategy=strategy, budget=DENSE, block_size=4,
                              host="1MiB")
        with pytest.raises(SparseModeError, match="not prepared"):
            gen(model, cache, ids, mask, n=3)
        cache.close()


# ----------------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_dense_budget_stays_within_rounding_of_dynamic_cache(dtype):
    """Sparse attention computes in float32: teacher-forced logits stay within the dtype's rounding of
    DynamicCache's and no farther from a float32 model than DynamicCache's own half-precision run."""
    model32 = build("llama")
    model = build("llama", dtype=dtype)
    model.load_state_dict({k: v.to(dtype) for k, v in model32.state_dict().items()})
    ids, mask = padded()
    toks = tokens_for(3)
    ref32, _ = forced(model32, DynamicCache(config=model32.config), ids, mask, toks)
    ref, _ = forced(model, DynamicCache(config=model.config), ids, mask, toks)
    for strategy in STRATEGIES:
        with sparse(model, budget=DENSE, host="4KiB", disk="1MiB", strategy=strategy) as cache:
            got, _ = forced(model, cache, ids, mask, toks)
            cache.restore_model()
        tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
        torch.testing.assert_close(got, ref, rtol=0, atol=tol)
        assert float((got - ref32).abs().max()) <= 1.5 * float((ref - ref32).abs().max()) + 1e-4


# ----------------------------------------------------------------------------------- stats
def test_stats_fields_are_present_sane_and_consistent():
    model = build("llama")
    ids, mask = padded()
    n_new = 8
    with sparse(model, budget=6, sink=1, recent=2, block_size=4, host="4KiB", disk="1MiB") as cache:
        gen(model, cache, ids, mask, n=n_new)
        stats = cache.stats()
        cache.restore_model()
    json.dumps(stats)
    sp = stats["sparse"]
    total, last = sp["total"], sp["last_step"]
    assert total["steps"] == n_new - 1 and total["layer_steps"] == (n_new - 1) * 2
    assert last["steps"] == 1 and last["layer_steps"] == 2
    for s in (total, last):
        for key in ("blocks_selected", "blocks_resident", "tail_selected", "tokens_attended", "tokens_context"):
            assert isinstance(s[key], int) and s[key] >= 0, key
        for key in ("scoring_seconds", "fetch_seconds", "attention_seconds", "placement_seconds"):
            assert s[key] >= 0 and math.isfinite(s[key]), key
        assert 0 <= s["blocks_resident"] <= s["blocks_selected"]
        assert s["reuse_rate"] == pytest.approx(s["blocks_resident"] / s["blocks_selected"])
        assert 0 < s["tokens_attended"] < s["tokens_context"]
        assert all(v >= 0 for v in s["bytes_fetched"].values())
        assert set(s["bytes_fetched"]) <= {"gpu", "host", "disk", "write-queue"}  # write-behind: docs/sparse.md
    for key in ("blocks_selected", "blocks_resident", "tokens_attended", "tokens_context"):
        assert last[key] <= total[key]
    assert total["scoring_seconds"] > 0 and total["attention_seconds"] > 0
    assert sum(total["bytes_fetched"].values()) > 0
    kv = stats["kv"]
    assert kv["digest_bytes"] > 0 and kv["beside_tiers_bytes"] >= kv["digest_bytes"] + kv["tail_bytes"]
    tiers = stats["tiercache"]["tiers"]
    assert tiers["host"]["used_bytes"] <= tiers["host"]["capacity_bytes"]
    assert tiers["disk"]["entries"] > 0  # the 4 KiB host tier could not hold the KV


def _bad_numbers(tree, path=""):
    if isinstance(tree, dict):
        return [bad for k, v in tree.items() for bad in _bad_numbers(v, f"{path}.{k}")]
    if isinstance(tree, (int, float)) and not isinstance(tree, bool) and not (0 <= tree < math.inf):
        return [(path, tree)]
    return []


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_figure_in_stats_is_finite_and_non_negative(strategy):
    """stats() of each strategy after a decode with disk reads (kv, sparse, pipeline, tiercache)."""
    model = build("llama")
    ids, mask = padded()
    with sparse(model, budget=6, sink=1, recent=2, block_size=4, host="2KiB", disk="1MiB", strategy=strategy) as cache:
        forced(model, cache, ids, mask, tokens_for(3, 8))
        stats = cache.stats()
        cache.restore_model()
    json.dumps(stats)
    assert {"kv", "sparse", "pipeline", "tiercache"} <= set(stats)
    assert _bad_numbers(stats) == []


# ----------------------------------------------------------------------------------- the real model
@pytest.mark.slow
def test_smollm2_plain_forward_outside_no_grad_and_dense_budget(smollm2):
    """SmolLM2 (Llama, 9 query / 3 KV heads, head_dim 64): a ~300-token prompt decoded by plain forward
    calls with autograd on (the default outside no_grad) gives DynamicCache's greedy tokens at a dense
    budget and runs at a 25 % budget."""
    model, tok = smollm2
    text = "The quick brown fox jumps over the lazy dog. " * 30 + "Repeat the first animal named:"
    ids = tok(text, return_tensors="pt").input_ids
    steps = 6

    def greedy(cache):
        out, cur = [], ids
        for _ in range(steps):
            logits = model(cur, **cache_kwargs(cache, model)).logits[:, -1]
            cur = logits.argmax(-1, keepdim=True)
            out.append(int(cur))
        return out

    with torch.no_grad():
        ref = greedy(DynamicCache(config=model.config))
    try:
        with sparse(model, budget=DENSE, block_size=64, host="256MiB") as cache:
            assert greedy(cache) == ref
        with sparse(model, budget=0.25, block_size=64, host="2MiB", disk="64MiB") as cache:
            assert len(greedy(cache)) == steps
            assert 0 < cache.stats()["sparse"]["total"]["tokens_attended"] < cache.stats()["sparse"]["total"]["tokens_context"]
    finally:
        from tiercache_llm.attention_hook import restore_model

        restore_model(model)


def test_two_threads_decode_their_own_sparse_caches_on_one_model():
    """Bug found: the docs promise concurrent forward passes in different threads each see their own
    cache, but the decoder hooks kept the ContextVar tokens in one list on the module: one thread's
    post-hook popped the other's token and raised "was created in a different Context".  Each thread's
    logits must equal those of its cache decoded alone."""
    import threading

    model = build("llama", seed=6)
    ids, mask = padded((30, 19, 11), seed=6)
    toks = tokens_for(3, 30, seed=6)
    opts = [dict(budget=6, sink=1, recent=2, block_size=4), dict(budget=0.5, strategy="fetch-every-step")]
    alone = []
    for o in opts:
        with sparse(model, **o) as cache:
            alone.append(forced(model, cache, ids, mask, toks)[0])
    caches = [sparse(model, **o) for o in opts]
    got, errors = [None, None], []

    def work(i):
        try:
            got[i] = forced(model, caches[i], ids, mask, toks)[0]
        except Exception as exc:  # reported below with the thread's index
            errors.append((i, repr(exc)))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    caches[0].restore_model()
    for cache in caches:
        cache.close()
    assert not errors
    for i in range(2):
        assert torch.equal(got[i], alone[i])
