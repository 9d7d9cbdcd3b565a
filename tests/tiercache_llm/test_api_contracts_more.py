"""More contracts of TieredKVCache in sparse mode (docs/tiercache_llm.md "Sparse mode"), beyond
tests/tiercache_llm/test_api_contracts.py and test_sparse_mode.py: what generate() options the sparse path
cannot honour, budgets at the edges, each row's budget in a left-padded batch, and the statistics."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import DynamicCache

from tiercache_llm import TieredKVCache, TieredKVSettings
from tiercache_llm.attention_hook import is_prepared
from tiercache_llm.hf_kwargs import cache_kwargs
from tiercache_llm.sparse_layer import SparseModeError


def _ids(batch=1, length=120, seed=0):
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def _gen(model, cache, ids, mask=None, n=8, **kw):
    kw.setdefault("do_sample", False)
    return model.generate(ids, attention_mask=mask, max_new_tokens=n, pad_token_id=0, **cache_kwargs(cache, model), **kw)


def _sparse(model, **options):
    options = {"mode": "sparse", "block_size": 16, "host": "8MiB", **options}
    return TieredKVCache.for_model(model, **options)


# -- generate options the sparse path cannot honour ----------------------------------------------------------
def test_output_attentions_of_an_eager_model_is_refused_in_sparse_decode(make_model):
    """Eager attention returns its weights; a sparse decode step has none over the context.  With
    output_attentions=True the decode steps' weights used to be dropped without a word (generate returned an
    empty tuple per step); now the first sparse decode step raises SparseModeError.  Prefill, exact caches and
    DynamicCache runs of the same prepared model keep returning weights."""
    model = make_model("llama", seed=2, attn_implementation="eager")
    ids = _ids(length=40)
    with _sparse(model, budget=16, sink=4, recent=8) as cache:
        with pytest.raises(SparseModeError, match="output_attentions"):
            _gen(model, cache, ids, output_attentions=True, return_dict_in_generate=True)
        assert is_prepared(model)
        ref = _gen(model, DynamicCache(config=model.config), ids, n=3, output_attentions=True,
                   return_dict_in_generate=True)
        with TieredKVCache.for_model(model, block_size=16, host="8MiB") as exact:
            got = _gen(model, exact, ids, n=3, output_attentions=True, return_dict_in_generate=True)
        cache.restore_model()
    assert [len(step) for step in ref.attentions] == [len(step) for step in got.attentions] == [2, 2, 2]
    for a, b in zip(ref.attentions[-1], got.attentions[-1]):
        torch.testing.assert_close(a, b)


def test_sdpa_sparse_decode_with_output_attentions_runs_as_dense_sdpa_does(make_model):
    """sdpa returns no weights with or without a sparse cache: output_attentions is no error there."""
    model = make_model("llama", seed=2)
    ids = _ids(length=40)
    ref = _gen(model, DynamicCache(config=model.config), ids, output_attentions=True, return_dict_in_generate=True)
    with _sparse(model, budget=1.0) as cache:
        got = _gen(model, cache, ids, output_attentions=True, return_dict_in_generate=True)
        cache.restore_model()
    assert torch.equal(ref.sequences, got.sequences)


# -- budgets at the edges ----------------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [126, 127, 2**63 - 1, 1.0])
def test_a_budget_at_or_above_the_context_gives_dense_greedy_tokens(make_model, budget):
    """With sink and recent far below the context, a token budget equal to the last decode step's context (a
    120-token prompt and 7 decode steps: 126), one above it, the largest int64 and the fraction 1.0 all give
    DynamicCache's greedy tokens."""
    model = make_model("llama", seed=3)
    ids = _ids(batch=2, length=120, seed=3)
    ref = _gen(model, DynamicCache(config=model.config), ids)
    with _sparse(model, budget=budget, sink=2, recent=4) as cache:
        got = _gen(model, cache, ids)
        total = cache.stats()["sparse"]["total"]
        cache.restore_model()
    assert torch.equal(ref, got)
    assert total["steps"] == 7 and total["tokens_attended"] == total["tokens_context"]


@pytest.mark.parametrize("option", ["budget", "sink", "recent"])
def test_a_token_count_beyond_int64_means_everything(make_model, option):
    """budget=10**30 is a budget above every context: dense attention, not an OverflowError mid-generate."""
    model = make_model("llama", seed=3)
    ids = _ids(length=60, seed=3)
    ref = _gen(model, DynamicCache(config=model.config), ids, n=4)
    with _sparse(model, **{option: 10**30}) as cache:
        got = _gen(model, cache, ids, n=4)
        cache.restore_model()
    assert torch.equal(ref, got)


# -- each row of a left-padded batch ---------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [24, 0.25])
def test_each_padded_row_decodes_as_it_would_alone(make_model, budget):
    """Through generate with the default 8-token pages (test_acceptance checks token pages under teacher forcing):
    a row left-padded by a whole number of blocks decodes as it does alone, and the batch's realised budget
    (tokens attended / present, in stats()) is exactly the sum of the rows' alone: each row's budget counts its
    own tokens (a fraction of its own context) and padding is never counted, selected nor attended."""
    model = make_model("llama", seed=6)
    a, b = _ids(length=88, seed=6), _ids(length=120, seed=7)
    ids = torch.cat([torch.cat([torch.zeros(1, 32, dtype=torch.long), a], 1), b])
    mask = torch.ones_like(ids)
    mask[0, :32] = 0
    runs = []
    for x, m in ((ids, mask), (a, None), (b, None)):
        with _sparse(model, budget=budget, sink=4, recent=8) as cache:
            out = _gen(model, cache, x, m, n=6, output_scores=True, return_dict_in_generate=True)
            runs.append((out, cache.stats()["sparse"]["total"]))
            cache.restore_model()
    (batch, tb), (alone_a, ta), (alone_b, tb_) = runs
    assert torch.equal(batch.sequences[0, -6:], alone_a.sequences[0, -6:])
    assert torch.equal(batch.sequences[1, -6:], alone_b.sequences[0, -6:])
    for step, sa, sb in zip(batch.scores, alone_a.scores, alone_b.scores):
        torch.testing.assert_close(step[0], sa[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(step[1], sb[0], rtol=1e-5, atol=1e-5)
    assert tb["tokens_context"] == ta["tokens_context"] + tb_["tokens_context"]
    assert tb["tokens_attended"] == ta["tokens_attended"] + tb_["tokens_attended"]
    assert tb["tokens_attended"] < tb["tokens_context"]  # really sparse


# -- statistics ---------------------------------------------------------------------------------------------------
def test_sparse_statistics_are_consistent(make_model, tmp_path):
    """The figures docs/tiercache_llm.md "Statistics" promises, with a host tier too small for the KV: counts are
    ints, 0 <= blocks_resident <= blocks_selected, reuse_rate their ratio in [0, 1], bytes per tier and seconds
    non-negative, the total the sum of the steps; ``last_step`` is None until a decode step ran."""
    model = make_model("llama", seed=8)
    ids = _ids(batch=2, length=200, seed=8)
    with _sparse(model, budget=32, sink=4, recent=8, host="48KiB", disk="16MiB", path=tmp_path / "kv",
                 pool_bytes="1MiB") as cache:
        model(ids, **cache_kwargs(cache, model))
        stats = cache.stats()["sparse"]
        assert stats["last_step"] is None and stats["total"]["steps"] == 0 and stats["total"]["reuse_rate"] is None
        steps = []
        nxt = torch.full((2, 1), 5)
        for _ in range(6):
            logits = model(nxt, **cache_kwargs(cache, model)).logits
            nxt = logits[:, -1:].argmax(-1)
            steps.append(cache.stats()["sparse"]["last_step"])
        stats = cache.stats()
        cache.restore_model()
    json.dumps(stats)
    total = stats["sparse"]["total"]
    for figures in steps + [total]:
        for name in ("steps", "layer_steps", "blocks_selected", "blocks_resident", "tail_selected",
                     "tokens_attended", "tokens_context"):
            assert type(figures[name]) is int and figures[name] >= 0, name
        assert 0 <= figures["blocks_resident"] <= figures["blocks_selected"]
        assert figures["reuse_rate"] == pytest.approx(figures["blocks_resident"] / figures["blocks_selected"])
        assert 0.0 <= figures["reuse_rate"] <= 1.0
        assert figures["tokens_attended"] <= figures["tokens_context"]
        assert all(type(n) is int and n >= 0 for n in figures["bytes_fetched"].values())
        assert set(figures["bytes_fetched"]) <= {"gpu", "host", "disk", "write-queue"}
        for name in ("scoring_seconds", "fetch_seconds", "attention_seconds", "placement_seconds"):
            assert figures[name] >= 0.0
    assert [s["steps"] for s in steps] == [1] * 6 and total["steps"] == 6
    for name in ("layer_steps", "blocks_selected", "blocks_resident", "tokens_attended", "tokens_context"):
        assert total[name] == sum(s[name] for s in steps), name
    for tier in total["bytes_fetched"]:
        assert total["bytes_fetched"][tier] == sum(s["bytes_fetched"].get(tier, 0) for s in steps)
    assert total["tokens_attended"] < total["tokens_context"]


# -- docs/tiercache_llm.md's option tables are TieredKVCache's options ---------------------------------------------
def _option_rows(section: str) -> dict[str, str]:
    import re

    rows = {}
    for names, default in re.findall(r"^\| ((?:`[a-z_]+`(?:, )?)+) \| ([^|]+) \|", section, re.M):
        names = re.findall(r"`([a-z_]+)`", names)
        defaults = [d.strip() for d in default.split(",")] if len(names) > 1 else [default.strip()]
        rows.update(zip(names, defaults))
    return rows


def test_the_documented_options_and_defaults_are_the_codes():
    """Every option of docs/tiercache_llm.md's two option tables is a keyword of TieredKVCache (and for_model),
    every keyword has a row, and each default shown as a literal is what TieredKVSettings holds (exact mode
    table) or resolves to in sparse mode (sparse table); PipelineConfig fields named there exist."""
    import dataclasses
    import inspect
    import pathlib
    import re

    from tiercache_llm import TieredKVSettings
    from tiercache_llm.sparse.pipeline import PipelineConfig

    text = (pathlib.Path(__file__).parents[2] / "docs" / "tiercache_llm.md").read_text()
    general = _option_rows(text.split("options (keyword-only", 1)[1].split("\n\n", 2)[1])
    sparse_section = text.split("## Sparse mode", 1)[1].split("\n## ", 1)[0]
    sparse = _option_rows(sparse_section.split("| option | default | meaning |", 1)[1].split("\n\n", 1)[0])
    keywords = set(inspect.signature(TieredKVCache.__init__).parameters) - {"self", "config"}
    assert set(general) | set(sparse) == keywords
    fields = {f.name: f.default for f in dataclasses.fields(TieredKVSettings)}
    for name, shown in general.items():
        if name in fields:
            assert eval(shown.strip("`")) == fields[name], name
    resolved = TieredKVSettings(mode="sparse")
    literal = re.compile(r"^`([^`]+)`$")
    for name, shown in sparse.items():
        match = literal.match(shown)
        if match:  # the others are prose ("mode's default", "strategy's")
            assert eval(match.group(1)) == getattr(resolved, name), name
    pipeline_fields = {f.name for f in dataclasses.fields(PipelineConfig)}
    row = next(line for line in sparse_section.splitlines() if line.startswith("| `pipeline` |"))
    named = set(re.findall(r'"([a-z_]+)":', row)) | set(re.findall(r"also ((?:`[a-z_]+`, )+)", row)[0].split("`")[1::2])
    assert named and named <= pipeline_fields, named - pipeline_fields


@pytest.mark.parametrize("timeout", [float("nan"), -1.0, float("inf"), "30", True, None])
def test_pipeline_wait_timeout_must_be_a_finite_number_of_seconds(timeout):
    """wait_timeout (seconds a layer waits for a staged entry) took NaN, a negative number or a string "30"
    (each read as "do not wait"), and infinity (which threading refuses when the wait comes: OverflowError)."""
    with pytest.raises(ValueError, match="wait_timeout"):
        TieredKVSettings(mode="sparse", pipeline={"wait_timeout": timeout})


def test_pipeline_wait_timeout_takes_zero_and_seconds():
    assert TieredKVSettings(mode="sparse", pipeline={"wait_timeout": 0}).pipeline.wait_timeout == 0
    assert TieredKVSettings(mode="sparse", pipeline={"wait_timeout": 2.5}).pipeline.wait_timeout == 2.5


# -- preparing a model and its base model ---------------------------------------------------------------------------
def test_for_model_on_the_base_model_of_a_prepared_causal_lm(make_model):
    """A causal LM and its base model share one config and one decoder.  for_model(base) after for_model(lm) used to
    raise "this model uses 'tiercache_sparse_sdpa'. Load it with attn_implementation='sdpa'": it is served by the
    LM's preparation instead, decodes sparsely through either module, and restoring the LM restores both."""
    from tiercache_llm.attention_hook import PREFIX

    model = make_model("llama", seed=9)
    base = model.get_decoder()
    ids = _ids(length=60, seed=9)
    ref = _gen(model, DynamicCache(config=model.config), ids, n=4)
    with _sparse(model, budget=1.0) as lm_cache, _sparse(base, budget=1.0) as base_cache:
        assert torch.equal(_gen(model, base_cache, ids, n=4), ref)
        assert base_cache.stats()["sparse"]["total"]["steps"] == 3
        base_cache.restore_model()  # not the prepared module: leaves the LM's preparation alone
        assert model.config._attn_implementation == PREFIX + "sdpa"
        assert torch.equal(_gen(model, lm_cache, ids, n=4), ref)
        lm_cache.restore_model()
    assert model.config._attn_implementation == "sdpa" and not is_prepared(model)
    assert not base._forward_pre_hooks and not base._forward_hooks
    assert torch.equal(_gen(model, DynamicCache(config=model.config), ids, n=4), ref)


def test_a_sparse_attention_name_without_its_hooks_is_refused_clearly(make_model):
    """A config switched to the sparse attention by hand (no preparation hooks the decoder) cannot serve a sparse
    cache: for_model says so instead of asking to load the model with sdpa."""
    from tiercache_llm.attention_hook import PREFIX, prepare_model, restore_model

    model = make_model("llama", seed=9)
    prepare_model(model)  # registers the name
    restore_model(model)
    model.set_attn_implementation(PREFIX + "sdpa")
    with pytest.raises(ValueError, match="no tiercache preparation hooks its decoder"):
        TieredKVCache.for_model(model, mode="sparse")
