"""A hypothesis state machine that drives a :class:`tiercache.Cache` against a plain ``dict`` model.

The model is what the cache promised: the last value put for each key, minus the keys the cache reported
as dropped through ``on_evict`` (reasons ``"capacity"``, ``"corrupt"``, ``"close"``).  After every step:

- ``get(k)`` returns exactly (dtype, shape and every bit) the model's value, or raises ``KeyError`` when the
  model has no ``k``; a dropped key is never silently served and a present one never silently lost;
- ``len``, ``in`` and ``keys()`` agree with the model, ``stats()`` is JSON-serialisable and its per-tier
  entry counts add up;
- no tier's ``used`` exceeds its ``capacity``.

``close`` followed by a reopen of the same store is one of the rules (when the last tier is persistent):
everything not reported dropped must come back bit-exact.

Use it for your own tiers or policies::

    from hypothesis import settings
    from tiercache.testing import make_cache_machine

    Machine = make_cache_machine(host="4KiB", disk="40KiB", policy=MyPolicy())
    TestMyPolicy = Machine.TestCase
    TestMyPolicy.settings = settings(max_examples=25, stateful_step_count=30, deadline=None)
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Hashable, Sequence

import torch
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from ..cache import Cache
from ..policies import Policy
from ..tiers.base import Tier

DEFAULT_KEYS: tuple[Hashable, ...] = ("a", "b", b"raw", 0, 7, -3, ("t", 1), ("t", 2), ("x", ("y", 3)), "ünï")
DEFAULT_DTYPES: tuple[torch.dtype, ...] = (
    torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int8, torch.uint8, torch.bool,
    torch.complex64, torch.float8_e4m3fn, torch.float64,
)


def make_value(dtype: torch.dtype, shape: Sequence[int], seed: int) -> torch.Tensor:
    """A deterministic tensor of ``dtype``/``shape`` whose bytes are pseudo-random (NaNs and all)."""
    numel = 1
    for dim in shape:
        numel *= dim
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, tuple(shape), generator=gen).bool()
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (numel * itemsize,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).reshape(tuple(shape))


class _RaisesKeyError:
    """``with _RaisesKeyError():`` asserts that the block raises ``KeyError`` (without importing pytest)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> bool:
        assert kind is not None and issubclass(kind, KeyError), f"expected KeyError, got {kind}"
        return True


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (NaN payloads included; unlike ``torch.equal``)."""
    if a.dtype != b.dtype or tuple(a.shape) != tuple(b.shape):
        return False
    a8 = a.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    b8 = b.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return torch.equal(a8, b8)


def _values(dtypes: Sequence[torch.dtype], max_value_bytes: int) -> st.SearchStrategy[torch.Tensor]:
    @st.composite
    def build(draw: Any) -> torch.Tensor:
        dtype = draw(st.sampled_from(list(dtypes)))
        itemsize = torch.empty((), dtype=dtype).element_size()
        most = max(1, max_value_bytes // itemsize)
        kind = draw(st.sampled_from(["scalar", "1d", "2d", "empty"]))
        # Sizes from both ends: tiny values and ones close to the limit (which make tiers overflow).
        numel = draw(st.integers(1, 16) | st.integers(max(1, most // 3), most))
        if kind == "scalar":
            shape: tuple[int, ...] = ()
        elif kind == "1d":
            shape = (numel,)
        elif kind == "2d":
            rows = draw(st.integers(1, min(8, numel)))
            shape = (rows, max(1, numel // rows))
        else:
            shape = (draw(st.integers(0, 3)), 0)
        return make_value(dtype, shape, draw(st.integers(0, 2**31 - 1)))

    return build()


def make_cache_machine(
    *,
    gpu: int | str | None = None,
    host: int | str | None = "4KiB",
    disk: int | str | None = "40KiB",
    policy: str | Policy | Callable[[], Policy] = "lru",
    compression: str | None = None,
    tier_factory: Callable[[Path], Sequence[Tier]] | None = None,
    keys: Sequence[Hashable] = DEFAULT_KEYS,
    dtypes: Sequence[torch.dtype] = DEFAULT_DTYPES,
    max_value_bytes: int = 3000,
    expect_no_evictions: bool = False,
    reopen: bool = True,
) -> type[RuleBasedStateMachine]:
    """A ``RuleBasedStateMachine`` class (run it through its ``.TestCase``).

    ``gpu``/``host``/``disk``/``compression`` configure the built-in tiers, or ``tier_factory(path)``
    returns your own tiers (fastest first) for a store directory (the same directory on reopen).
    ``policy`` is a name, a :class:`tiercache.Policy` or a zero-argument factory of one.
    ``expect_no_evictions`` additionally asserts that nothing is ever dropped (capacities large enough).
    ``reopen`` enables the close-and-reopen rule (used only when the last tier is persistent).
    """
    key_strategy = st.sampled_from(list(keys))
    value_strategy = _values(dtypes, max_value_bytes)
    score_strategy = st.none() | st.floats(-10, 10, allow_nan=False)

    def new_policy() -> str | Policy:
        if isinstance(policy, str) or hasattr(policy, "rank"):
            return policy  # type: ignore[return-value]
        return policy()  # type: ignore[operator]

    class CacheMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.dir = Path(tempfile.mkdtemp(prefix="tiercache-machine-"))
            self.model: dict[Hashable, torch.Tensor] = {}
            self.dropped: list[tuple[Hashable, str]] = []
            self.cache: Cache | None = None
            self.cache = self._open()

        # -- plumbing ---------------------------------------------------------------------------------
        def _on_evict(self, key: Hashable, reason: str) -> None:
            assert reason in ("capacity", "corrupt", "close"), reason
            assert reason != "corrupt", f"{key!r} reported corrupt, but nothing damaged the store"
            assert key in self.model, f"on_evict({key!r}, {reason!r}) for a key the cache should not hold"
            self.dropped.append((key, reason))
            del self.model[key]

        def _open(self) -> Cache:
            store = self.dir / "store"
            if tier_factory is not None:
                return Cache(tiers=list(tier_factory(store)), policy=new_policy(), on_evict=self._on_evict)
            return Cache(
                gpu=gpu, host=host, disk=disk, path=store if disk else None, policy=new_policy(),
                compression=compression, on_evict=self._on_evict,
            )

        @property
        def persistent(self) -> bool:
            assert self.cache is not None
            return bool(self.cache.tiers[-1].persistent)

        def _check_get(self, key: Hashable) -> None:
            assert self.cache is not None
            try:
                got = self.cache.get(key)
            except KeyError:
                assert key not in self.model, f"{key!r} is missing but was never reported dropped"
                return
            assert key in self.model, f"{key!r} was served after being deleted or reported dropped"
            assert same_tensor(got, self.model[key]), f"{key!r} read back different bytes"

        def teardown(self) -> None:
            try:
                if self.cache is not None:
                    self.cache.close()
            finally:
                shutil.rmtree(self.dir, ignore_errors=True)

        # -- rules ------------------------------------------------------------------------------------
        def _put(self, key: Hashable, value: torch.Tensor, transpose: bool, score: float | None) -> None:
            assert self.cache is not None
            if transpose and value.dim() == 2:
                value = value.t()  # non-contiguous input
            expected = value.clone()
            self.cache.put(key, value, score=score)
            assert same_tensor(value, expected), "put modified the caller's tensor"
            self.model[key] = expected
            assert key in self.cache

        # Puts create the pressure (demotions, drops), so two rules put: they are drawn twice as often.
        @rule(key=key_strategy, value=value_strategy, transpose=st.booleans(), score=score_strategy)
        def put(self, key: Hashable, value: torch.Tensor, transpose: bool, score: float | None) -> None:
            self._put(key, value, transpose, score)

        @rule(key=key_strategy, value=value_strategy, transpose=st.booleans(), score=score_strategy)
        def put_another(self, key: Hashable, value: torch.Tensor, transpose: bool, score: float | None) -> None:
            self._put(key, value, transpose, score)

        @rule(key=key_strategy)
        def get(self, key: Hashable) -> None:
            self._check_get(key)

        @rule(key=key_strategy, seed=st.integers(0, 2**31 - 1))
        def get_ranges(self, key: Hashable, seed: int) -> None:
            """A ranged ``get_many``: the asked bytes are the model's, every other byte of ``out`` is kept."""
            assert self.cache is not None
            if key not in self.model:
                with _RaisesKeyError():
                    self.cache.get_many([key], out=[torch.empty(0)], ranges=[[]])
                return
            expected = self.model[key]
            nbytes = expected.numel() * expected.element_size()
            out = make_value(expected.dtype, tuple(expected.shape), seed)
            before = out.clone()
            pick = random.Random(seed)
            cuts = sorted(set(pick.randrange(nbytes + 1) for _ in range(pick.randrange(5)))) if nbytes else []
            ranges = [(lo, hi) for lo, hi in zip(cuts[::2], cuts[1::2]) if lo < hi]
            try:
                self.cache.get_many([key], out=[out], ranges=[ranges])
            except KeyError:
                assert key not in self.model, f"{key!r} is missing but was never reported dropped"
                return
            if not nbytes:
                return
            got = out.reshape(-1).view(torch.uint8)
            want = expected.contiguous().reshape(-1).view(torch.uint8)
            old = before.reshape(-1).view(torch.uint8)
            asked = torch.zeros(nbytes, dtype=torch.bool)
            for lo, hi in ranges:
                asked[lo:hi] = True
            assert torch.equal(got[asked], want[asked]), f"{key!r}: a ranged read returned different bytes"
            assert torch.equal(got[~asked], old[~asked]), f"{key!r}: a ranged read wrote bytes it was not asked for"

        @rule(key=key_strategy)
        def delete(self, key: Hashable) -> None:
            assert self.cache is not None
            assert self.cache.delete(key) == (key in self.model)
            self.model.pop(key, None)
            assert key not in self.cache

        @rule(key=key_strategy)
        def contains(self, key: Hashable) -> None:
            assert self.cache is not None
            assert (key in self.cache) == (key in self.model)

        @rule(keys=st.lists(key_strategy, max_size=4))
        def prefetch(self, keys: list[Hashable]) -> None:
            assert self.cache is not None
            resident = self.cache.prefetch(keys).result(timeout=60)
            assert 0 <= resident <= len(keys)

        @rule(scores=st.dictionaries(key_strategy, st.floats(-10, 10, allow_nan=False), max_size=4))
        def update_scores(self, scores: dict[Hashable, float]) -> None:
            assert self.cache is not None
            assert self.cache.update_scores(scores) == sum(k in self.model for k in scores)

        @precondition(lambda self: reopen and self.cache is not None and self.persistent)
        @rule(now=st.integers(0, 3))
        def close_and_reopen(self, now: int) -> None:
            if now != 3:  # hypothesis favours argument-less rules; keep reopens to a fraction of the steps
                return
            assert self.cache is not None
            self.cache.close()
            self.cache.close()  # idempotent
            self.cache = None
            self.cache = self._open()
            assert set(self.cache.keys()) == set(self.model)
            for key in list(self.model):
                self._check_get(key)

        # -- invariants -------------------------------------------------------------------------------
        @invariant()
        def budgets_hold(self) -> None:
            if self.cache is None:
                return
            for tier in self.cache.tiers:
                assert 0 <= tier.used <= tier.capacity, f"{tier.name}: used {tier.used} > capacity {tier.capacity}"

        @invariant()
        def contents_match_the_model(self) -> None:
            if self.cache is None:
                return
            assert len(self.cache) == len(self.model)
            assert set(self.cache.keys()) == set(self.model)
            stats = json.loads(json.dumps(self.cache.stats()))
            assert stats["entries"] == len(self.model)
            assert sum(t["entries"] for t in stats["tiers"].values()) == len(self.model)
            for tier in self.cache.tiers:
                row = stats["tiers"][tier.name]
                assert row["used_bytes"] == tier.used and row["capacity_bytes"] == tier.capacity
                held = [key for key in self.model if self.cache.tier_of(key) == tier.name]
                assert row["entries"] == len(held)
                assert row["payload_bytes"] == sum(self.model[key].numel() * self.model[key].element_size()
                                                   for key in held)
            assert stats["corruptions"] == 0

        @invariant()
        def nothing_dropped_when_it_all_fits(self) -> None:
            if expect_no_evictions:
                assert self.dropped == [], f"entries were dropped: {self.dropped[:5]}"

    CacheMachine.__name__ = CacheMachine.__qualname__ = "CacheMachine"
    return CacheMachine
