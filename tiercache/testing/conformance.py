"""``TierConformance``: the behaviour every :class:`tiercache.Tier` must have, as a pytest base class.

Subclass it in a test module (the subclass name must start with ``Test``) and implement ``make_tier``.
A persistent tier is created again on the same ``path`` to test recovery, so ``make_tier`` must reopen
what is there.  Override ``capacity`` (bytes) and ``sizes`` (payload sizes to try) if your tier needs to.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ..keys import encode_key
from ..tiers.base import EntryHeader, RecoveredEntry, Slot, Tier


def payload(nbytes: int, seed: int) -> torch.Tensor:
    """Deterministic pseudo-random bytes (1-D contiguous uint8)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen)


def header_for(key: object, nbytes: int, seq: int) -> EntryHeader:
    return EntryHeader(encode_key(key), "uint8", (nbytes,), nbytes, seq)


class TierConformance:
    """Base class: ``class TestMyTier(TierConformance): def make_tier(self, path, capacity): ...``."""

    capacity: int = 256 * 1024
    sizes: tuple[int, ...] = (0, 1, 255, 256, 1000, 4096, 5000, 20_000)

    # -- to implement ---------------------------------------------------------------------------------
    def make_tier(self, path: Path, capacity: int) -> Tier:
        raise NotImplementedError("TierConformance subclasses implement make_tier(path, capacity)")

    # -- fixtures -------------------------------------------------------------------------------------
    @pytest.fixture
    def tier_path(self, tmp_path: Path) -> Path:
        path = tmp_path / "tier"
        return path

    @pytest.fixture
    def tier(self, tier_path: Path):
        tier = self.make_tier(tier_path, self.capacity)
        yield tier
        tier.close()

    def _reopen(self, tier: Tier, path: Path) -> Tier:
        tier.close()
        return self.make_tier(path, self.capacity)

    def _fits(self, tier: Tier, nbytes: int) -> bool:
        return nbytes <= tier.max_nbytes

    # -- tests ----------------------------------------------------------------------------------------
    def test_implements_the_protocol(self, tier: Tier) -> None:
        assert isinstance(tier, Tier)
        assert isinstance(tier.name, str) and tier.name
        assert isinstance(tier.device, torch.device)
        assert isinstance(tier.persistent, bool)
        assert tier.used == 0
        assert 0 < tier.max_nbytes <= tier.capacity
        assert tier.capacity <= self.capacity

    def test_allocate_stays_within_budget(self, tier: Tier) -> None:
        slots: list[Slot] = []
        for i in range(10_000):
            nbytes = self.sizes[i % len(self.sizes)]
            slot = tier.allocate(nbytes)
            if slot is None:
                if nbytes == self.sizes[0]:
                    break
                continue
            assert slot.nbytes == nbytes
            assert slot.charged >= nbytes
            slots.append(slot)
            assert tier.used == sum(s.charged for s in slots)
            assert tier.used <= tier.capacity
        else:
            pytest.fail("the tier never refused an allocation")
        assert slots, "the tier accepted nothing"
        for slot in slots:
            tier.free(slot)
        assert tier.used == 0

    def test_max_nbytes_is_respected(self, tier: Tier) -> None:
        biggest = tier.allocate(tier.max_nbytes)
        assert biggest is not None, "an empty tier must hold a payload of max_nbytes"
        data = payload(tier.max_nbytes, 7)
        head = header_for("big", tier.max_nbytes, 1)
        tier.write(biggest, data, head)
        assert torch.equal(tier.read(biggest, head).cpu(), data)
        tier.discard(biggest)
        tier.free(biggest)
        assert tier.used == 0
        assert tier.allocate(tier.max_nbytes + 1) is None, "allocate must refuse more than max_nbytes"
        assert tier.used == 0

    def test_write_read_round_trip_without_cross_talk(self, tier: Tier) -> None:
        written: list[tuple[Slot, EntryHeader, torch.Tensor]] = []
        for seq, nbytes in enumerate(self.sizes, start=1):
            if not self._fits(tier, nbytes):
                continue
            slot = tier.allocate(nbytes)
            if slot is None:
                continue
            head = header_for(("k", seq), nbytes, seq)
            data = payload(nbytes, seq)
            tier.write(slot, data, head)
            written.append((slot, head, data))
        assert len(written) >= 2
        for slot, head, data in written:
            got = tier.read(slot, head)
            assert got.dtype == torch.uint8 and got.dim() == 1 and got.numel() == slot.nbytes
            assert got.device.type == tier.device.type
            assert torch.equal(got.cpu(), data)
        # Rewriting one slot does not disturb the others.
        slot0, head0, data0 = written[0]
        newer = header_for(("k", 1), slot0.nbytes, 1000)
        tier.write(slot0, payload(slot0.nbytes, 999), newer)
        assert torch.equal(tier.read(slot0, newer).cpu(), payload(slot0.nbytes, 999))
        for slot, head, data in written[1:]:
            assert torch.equal(tier.read(slot, head).cpu(), data)

    def test_write_accepts_views_of_a_larger_tensor(self, tier: Tier) -> None:
        base = payload(3000, 3)
        view = base[1000:2000]
        slot = tier.allocate(view.numel())
        assert slot is not None
        head = header_for("view", view.numel(), 1)
        tier.write(slot, view, head)
        assert torch.equal(tier.read(slot, head).cpu(), base[1000:2000])

    def test_free_returns_the_budget(self, tier: Tier) -> None:
        nbytes = max(s for s in self.sizes if self._fits(tier, s))
        first = []
        while (slot := tier.allocate(nbytes)) is not None:
            first.append(slot)
        assert first
        full = tier.used
        for slot in first:
            tier.discard(slot)
            tier.free(slot)
        assert tier.used == 0
        again = []
        while (slot := tier.allocate(nbytes)) is not None:
            again.append(slot)
        assert len(again) == len(first) and tier.used == full

    def test_discard_makes_persistent_content_unrecoverable(self, tier: Tier, tier_path: Path) -> None:
        keep = tier.allocate(100)
        gone = tier.allocate(100)
        assert keep is not None and gone is not None
        keep_head, gone_head = header_for("keep", 100, 1), header_for("gone", 100, 2)
        tier.write(keep, payload(100, 1), keep_head)
        tier.write(gone, payload(100, 2), gone_head)
        tier.discard(gone)
        tier.free(gone)
        reopened = self._reopen(tier, tier_path)
        try:
            found = {r.header.key for r in reopened.recover()}
            assert encode_key("gone") not in found
            if reopened.persistent:
                assert found == {encode_key("keep")}
        finally:
            reopened.close()

    def test_recover_finds_persisted_entries(self, tier: Tier, tier_path: Path) -> None:
        expected: dict[bytes, tuple[EntryHeader, torch.Tensor]] = {}
        for seq, nbytes in enumerate(self.sizes, start=1):
            slot = tier.allocate(nbytes) if self._fits(tier, nbytes) else None
            if slot is None:
                continue
            head = EntryHeader(encode_key(("r", seq)), "uint8", (nbytes,), nbytes, seq)
            data = payload(nbytes, 100 + seq)
            tier.write(slot, data, head)
            expected[head.key] = (head, data)
        persistent = tier.persistent
        reopened = self._reopen(tier, tier_path)
        try:
            found: list[RecoveredEntry] = list(reopened.recover())
            if not persistent:
                assert found == []
                return
            assert {r.header.key for r in found} == set(expected)
            assert reopened.used == sum(r.slot.charged for r in found)
            assert reopened.used <= reopened.capacity
            for r in found:
                head, data = expected[r.header.key]
                assert r.header == head
                assert r.slot.nbytes == head.nbytes
                assert torch.equal(reopened.read(r.slot, r.header).cpu(), data)
            # Recovered slots count as allocated: new allocations never hand them out again.
            fresh = reopened.allocate(100)
            assert fresh is not None and fresh.ref not in {r.slot.ref for r in found}
        finally:
            reopened.close()

    def test_recover_keeps_the_newest_copy_of_a_key(self, tier: Tier, tier_path: Path) -> None:
        if not tier.persistent:
            pytest.skip("volatile tier")
        old, new = tier.allocate(64), tier.allocate(64)
        assert old is not None and new is not None
        tier.write(old, payload(64, 1), header_for("dup", 64, 1))
        tier.write(new, payload(64, 2), header_for("dup", 64, 2))
        reopened = self._reopen(tier, tier_path)
        try:
            found = list(reopened.recover())
            assert len(found) == 1 and found[0].header.seq == 2
            assert torch.equal(reopened.read(found[0].slot, found[0].header).cpu(), payload(64, 2))
        finally:
            reopened.close()
