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
