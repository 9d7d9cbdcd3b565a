"""A test kit for tiercache and for your own tiers and policies.

- :class:`TierConformance` — a pytest base class every :class:`tiercache.Tier` implementation passes::

      from tiercache.testing import TierConformance

      class TestMyTier(TierConformance):
          capacity = 64 * 1024
          def make_tier(self, path, capacity):   # path: a fresh directory, the same one when reopening
              return MyTier(path, capacity)

- :func:`make_cache_machine` — a hypothesis ``RuleBasedStateMachine`` that drives a :class:`tiercache.Cache`
  (with the built-in tiers or yours, with any policy) against a plain ``dict`` model::

      from tiercache.testing import make_cache_machine
      TestMyPolicy = make_cache_machine(host="4KiB", disk="40KiB", policy=MyPolicy()).TestCase

Both need ``pytest`` and ``hypothesis`` (the ``test`` extra); importing this package does not import them
until used.
"""

from __future__ import annotations

from typing import Any

__all__ = ["TierConformance", "make_cache_machine", "make_value", "same_tensor"]


def __getattr__(name: str) -> Any:
    if name == "TierConformance":
        from .conformance import TierConformance

        return TierConformance
    if name in ("make_cache_machine", "make_value", "same_tensor"):
        from . import state_machine

        return getattr(state_machine, name)
    raise AttributeError(name)
