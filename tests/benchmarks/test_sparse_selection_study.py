"""benchmarks/sparse_selection_study.py: its simulated rule is the cache's rule (``selection.select``), so its
figures stand for the cache's; and its text options.  Random keys, no model."""

from __future__ import annotations

import pytest
import torch

from tiercache_llm.sparse.digests import KeyDigests
from tiercache_llm.sparse.selection import SelectionConfig, select


@pytest.fixture(scope="module")
def study(load_benchmark):
    return load_benchmark("sparse_selection_study")


@pytest.mark.parametrize("f16", [False, True])
@pytest.mark.parametrize("budget", [0.125, 0.25])
def test_study_mask_is_the_cache_selection(study, f16, budget):
    """``page8-boundmean-lsem-pagesink[-f16]`` attends, at every chunk position, exactly the pages that
    ``select`` (the cache's default rule, float32 / float16 digests) picks from digests of ``[0, p)``."""
    torch.manual_seed(0)
    h, g, d, prefix, q = 3, 3, 64, 301, 5
    t = prefix + q
    key = torch.randn(1, h, t, d)
    query = torch.randn(1, h * g, q, d)
    name = "page8-boundmean-lsem-pagesink" + ("-f16" if f16 else "")
    study.Sim.variant, study.Sim.budget, study.Sim.sink, study.Sim.recent = study.Variant.parse(name), budget, 4, 64
    study.Sim.prefix, study.Sim.attended, study.Sim.fetched, study.Sim.span = prefix, [], [], {}
    mask = study.chunk_mask(query, key, layer=0)[0]  # (H, Q, T)
    config = SelectionConfig(budget=budget, sink=4, recent=64, score="bound+landmark",
                             digests="float16" if f16 else "float32")
    for i in range(q):
        p = prefix + i
        dg = KeyDigests.from_keys(key[:, :, :p], 8, storage=torch.float16 if f16 else torch.float32)
        sel = select(query[:, :, i:i + 1], dg, config, pages_per_block=8)
        pages = sel.pages[0]  # (H, P)
        want = pages.repeat_interleave(8, dim=-1)[:, :p]
        assert torch.equal(mask[:, i, :p], want), (i, (mask[:, i, :p] != want).sum())
        assert bool(mask[:, i, p].all())  # itself


def test_variant_parse_f16(study):
    assert study.Variant.parse("page8-boundmean-lsem-pagesink-f16").f16
    assert not study.Variant.parse("page8-boundmean-lsem-pagesink").f16
    v = study.Variant.parse("page8-boundmean-s16-r128-sub4")
    assert (v.sink, v.recent, v.sub, v.gqa) == (16, 128, 4, "max")
    assert study.Variant.parse("page8-sum").gqa == "sum"
    with pytest.raises(ValueError):
        study.Variant.parse("page8-f17")


def test_licence_prose(study):
    root = study.Path("/usr/share/common-licenses")
    if not (root / "GPL-3").is_file():
        pytest.skip("no licence texts on this system")
    text, source = study.licence_prose(50_000)
    assert len(text) >= 50_000 and "GPL-3" in source
    assert "\n\n" in text and "  " not in text


def _chunk(study, name, budget, key, value, query, prefix):
    """The study's attention output for a chunk of ``query`` rows at ``prefix`` under variant ``name``."""
    study.Sim.variant, study.Sim.budget, study.Sim.sink, study.Sim.recent = study.Variant.parse(name), budget, 4, 16
    study.Sim.prefix, study.Sim.attended, study.Sim.fetched, study.Sim.span = prefix, [], [], {}
    study.Sim.comp_mass = []
    module = type("M", (), {"layer_idx": 0})()
    out, _ = study.study_attention(module, query, key, value, None)
    return out


def _dense(query, key, value, prefix):
    q, t = query.shape[2], key.shape[2]
    causal = torch.ones(q, t, dtype=torch.bool).tril(t - q)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=causal, enable_gqa=True)
    return out.transpose(1, 2)


COMP = ["page8-boundmean-lsem-pagesink-comp", "page8-boundmean-lsem-pagesink-comp64",
        "page8-boundmean-lsem-pagesink-compv64", "page8-boundmean-lsem-pagesink-compvar",
        "page8-boundmean-lsem-pagesink-comprange-f16", "page8-boundmean-lsem-pagesink-compexact"]


@pytest.mark.parametrize("name", COMP)
def test_comp_budget_over_context_is_dense(study, name):
    """With a budget >= the context nothing is unselected: the summaries add nothing, the output is dense
    attention's."""
    torch.manual_seed(1)
    h, g, d, prefix, q = 3, 3, 64, 301, 5
    key, value = torch.randn(1, h, prefix + q, d), torch.randn(1, h, prefix + q, d)
    query = torch.randn(1, h * g, q, d)
    out = _chunk(study, name, 1.0, key, value, query, prefix)
    assert study.Sim.comp_mass == [0.0]
    torch.testing.assert_close(out, _dense(query, key, value, prefix), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", [n for n in COMP if "f16" not in n])
def test_comp_exact_on_constant_blocks(study, name):
    """Keys and values constant within each 64-token block: a summary (mean key, log count, mean value)
    stands for its tokens exactly, so sparse attention plus summaries equals dense attention at a small
    budget, where plain sparse attention does not."""
    torch.manual_seed(2)
    h, g, d, prefix, q = 3, 3, 64, 320, 4
    nb = -(-(prefix + q) // 64)
    key = torch.randn(1, h, nb, d).repeat_interleave(64, 2)[:, :, :prefix + q]
    value = torch.randn(1, h, nb, d).repeat_interleave(64, 2)[:, :, :prefix + q]
    query = torch.randn(1, h * g, q, d)
    dense = _dense(query, key, value, prefix)
    plain = _chunk(study, name.rsplit("-comp", 1)[0], 0.125, key, value, query, prefix)
    assert (plain - dense).abs().max() > 1e-2
    out = _chunk(study, name, 0.125, key, value, query, prefix)
    assert study.Sim.comp_mass[0] > 0.1
    torch.testing.assert_close(out, dense, rtol=1e-4, atol=1e-4)


def test_variant_parse_comp(study):
    v = study.Variant.parse("page8-boundmean-comp64")
    assert (v.comp, v.comp_group, v.comp_mass) == (64, True, "mean")
    v = study.Variant.parse("page8-compv128-compvar")
    assert (v.comp, v.comp_group, v.comp_mass) == (128, False, "var")
    assert study.Variant.parse("page8-comp").comp == 8
    assert study.Variant.parse("page8-comprange").comp == 8
    assert (study.Variant.parse("page8-compl2").comp_layers, study.Variant.parse("page8-compl2").comp) == (2, 8)
    assert study.Variant.parse("page8-compf1").comp_from == 1
    for bad in ("page8-comp12", "page8-comp64-compvar", "page8-oracle-comp"):
        with pytest.raises(ValueError):
            study.Variant.parse(bad)


def test_comp_mass_corrections_add_mass(study):
    """The variance corrections (-compvar, -comprange) raise the summaries' logits above the landmark's
    (capped at the Quest bound, which is >= q . mean): more summary mass on random keys; the true
    logsumexp (-compexact) is >= the landmark's too (Jensen)."""
    torch.manual_seed(3)
    h, g, d, prefix, q = 3, 3, 64, 301, 3
    key, value = torch.randn(1, h, prefix + q, d), torch.randn(1, h, prefix + q, d)
    query = torch.randn(1, h * g, q, d)
    base = "page8-boundmean-lsem-pagesink"
    _chunk(study, base + "-comp", 0.125, key, value, query, prefix)
    mean_mass = study.Sim.comp_mass[0]
    for part in ("compvar", "comprange", "compexact"):
        _chunk(study, f"{base}-{part}", 0.125, key, value, query, prefix)
        assert study.Sim.comp_mass[0] > mean_mass * 1.01, part
