"""Options that would change nothing are refused, naming the option and the strategy (docs/tiercache_llm.md).
Each test failed on the tree before its fix."""

from __future__ import annotations

import pytest

from tiercache_llm import TieredKVCache, TieredKVSettings
from tiercache_llm import kv_cache
from tiercache_llm.sparse.pipeline import PipelineConfig

OTHERS = ["fetch-every-step", "reuse-layer-ahead"]


@pytest.mark.parametrize("strategy", OTHERS)
def test_decay_given_with_a_strategy_that_does_not_use_it_is_refused(make_config, strategy):
    """decay=0.5 with fetch-every-step / reuse-layer-ahead was accepted and ignored (only attention-aware
    placement decays masses)."""
    with pytest.raises(ValueError, match=f"decay applies to strategy='attention-aware' only.*{strategy}"):
        TieredKVSettings(mode="sparse", strategy=strategy, decay=0.5)
    with pytest.raises(ValueError, match="decay"):
        TieredKVCache(make_config(), mode="sparse", strategy=strategy, decay=0.9)  # even the default's value


@pytest.mark.parametrize("strategy", ["attention-aware", *OTHERS])
def test_the_default_decay_works_with_every_strategy_and_says_whether_it_is_in_force(make_config, strategy):
    settings = TieredKVSettings(mode="sparse", strategy=strategy)
    assert settings.decay == (0.9 if strategy == "attention-aware" else None)
    with TieredKVCache(make_config(), mode="sparse", strategy=strategy, host="1MiB") as cache:
        assert cache.stats()["sparse"]["settings"]["decay"] == settings.decay
    assert TieredKVSettings(mode="sparse", strategy="attention-aware", decay=0.5).decay == 0.5


OPTIONS = {  # a value of each attention-aware-only pipeline field that would turn its feature on
    "disk_staging": True, "defer_promotions": True, "stage_ahead": 8, "stage_near": 4,
    "promote_bytes_per_step": 1 << 20, "complement_reuse": True, "exclusive_pool": True,
}


def test_the_table_covers_every_attention_aware_only_field():
    assert set(OPTIONS) == set(getattr(kv_cache, "ATTENTION_AWARE_ONLY", ()))


@pytest.mark.parametrize("strategy", OTHERS)
@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_attention_aware_pipeline_options_are_refused_with_other_strategies(strategy, name):
    """pipeline={"disk_staging": True} (or deferred promotions, budgeted promotion, complement/exclusive
    placement, stage_ahead/stage_near) with a kv-stream strategy was accepted and did nothing: those steer
    tiercache scores and promotions, which kv-stream has not."""
    value = OPTIONS[name]
    with pytest.raises(ValueError, match=f"pipeline {name}=.*attention-aware.*{strategy}"):
        TieredKVSettings(mode="sparse", strategy=strategy, pipeline={name: value})
    whole = PipelineConfig.for_strategy(strategy, **{name: value})
    with pytest.raises(ValueError, match=f"pipeline {name}="):
        TieredKVSettings(mode="sparse", strategy=strategy, pipeline=whole)
    # the same option with attention-aware is taken, and the strategy's own value is harmless anywhere
    assert getattr(TieredKVSettings(mode="sparse", pipeline={name: value}).pipeline, name) == value
    own = getattr(PipelineConfig.for_strategy(strategy), name)
    assert getattr(TieredKVSettings(mode="sparse", strategy=strategy, pipeline={name: own}).pipeline, name) == own


@pytest.mark.parametrize("strategy", OTHERS)
def test_an_attention_aware_pipeline_is_refused_with_another_strategy(strategy):
    with pytest.raises(ValueError, match="applies to strategy='attention-aware' only"):
        TieredKVSettings(mode="sparse", strategy=strategy, pipeline=PipelineConfig.for_strategy("attention-aware"))
    plain = TieredKVSettings(mode="sparse", strategy=strategy, pipeline={"staging_bytes": 1 << 20})
    assert plain.pipeline.staging_bytes == 1 << 20


def test_direct_io_given_without_a_disk_tier_is_refused(make_config, tmp_path):
    """direct_io=True without a disk tier was accepted and changed nothing."""
    with pytest.raises(ValueError, match="direct_io applies to the disk tier"):
        TieredKVCache(make_config(), host="1MiB", direct_io=True)
    TieredKVCache(make_config(), host="1MiB").close()  # the default is simply not applied
    TieredKVCache(make_config(), host="1MiB", direct_io=False).close()
    TieredKVCache(make_config(), host="1MiB", disk="4MiB", path=tmp_path / "s", direct_io=True).close()
