"""The tier protocol: a storage mechanism with a byte budget.  Tiers store and return bytes in slots;
they make no placement decisions (that is the policy's job) and hold no lock of their own.

Threading contract, relied on by :class:`tiercache.Cache`:
- ``allocate`` and ``free`` change bookkeeping only; the caller serialises them (the cache's index lock).
- ``write``, ``read`` and ``discard`` do the I/O; they run *without* the index lock, concurrently for
  distinct slots.  A slot is used by one writer at a time and is never freed while being read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, NamedTuple, Protocol, runtime_checkable

import torch


class Slot(NamedTuple):
    """A reservation in one tier: ``charged`` bytes of the budget for a payload of ``nbytes``.
    ``ref`` is the tier's own handle (an arena block, a chunk index, ...); callers treat it as opaque.

    Immutable.  A named tuple, not a frozen dataclass: one is made per stored value, and a tier's hot
    path builds it with ``tuple.__new__(Slot, (ref, nbytes, charged))`` in a third of a frozen
    dataclass's time."""

    ref: object
    nbytes: int
    charged: int


@dataclass(frozen=True, slots=True)
class EntryHeader:
    """What a tier may persist beside the payload so an entry is self-describing after a restart."""

    key: bytes  # canonical key encoding (tiercache.keys.encode_key)
    dtype: str  # e.g. "float32" (torch dtype name without the "torch." prefix)
    shape: tuple[int, ...]
    nbytes: int
    seq: int  # monotonically increasing write sequence; the newest copy of a key wins on recovery


@dataclass(frozen=True, slots=True)
class RecoveredEntry:
    """An entry a persistent tier found on open (its payload is verified again when read)."""

    header: EntryHeader
    slot: Slot


@runtime_checkable
class Tier(Protocol):
    name: str
    """Short name used in stats and messages ("gpu", "host", "disk")."""
    capacity: int
    """Byte budget; ``used`` never exceeds it."""
    device: torch.device
    """Where ``read`` returns tensors."""
    persistent: bool
    """True when entries survive ``close`` and are found again by ``recover`` after reopening."""

    @property
    def used(self) -> int: ...

    @property
    def max_nbytes(self) -> int:
        """The largest payload a single slot can hold; -1 when not even an empty value fits (e.g. the tier
        is disabled)."""
        ...

    # Optional methods, detected with ``hasattr`` by the cache:
    # - ``charge(nbytes) -> int``: the budget bytes a payload of ``nbytes`` occupies (used by
    #   ``Cache.charge``; the payload size is assumed when a tier does not define it).
    # - ``read_into(items: Sequence[tuple[Slot, EntryHeader, torch.Tensor]]) -> None``: fill each 1-D
    #   contiguous uint8 CPU tensor (exactly ``slot.nbytes``) with the verified payload; may read in
    #   parallel; raises ``CorruptEntryError`` with ``exc.tiercache_index`` (position in ``items``) on
    #   damage.  ``get``/``get_many`` use it instead of one ``read`` per entry.
    # - ``describe() -> dict``: JSON-able tier-specific facts, merged into ``Cache.stats()["tiers"][name]``.

    def allocate(self, nbytes: int) -> Slot | None:
        """Reserve room for ``nbytes``; ``None`` when the budget (or fragmentation) does not allow it."""
        ...

    def free(self, slot: Slot) -> None:
        """Return a slot's bytes to the budget.  For persistent tiers ``discard`` must have run first."""
        ...

    def write(self, slot: Slot, data: torch.Tensor, header: EntryHeader) -> None:
        """Store ``data`` (1-D contiguous, exactly ``slot.nbytes`` bytes, in *any* dtype — the value's own,
        flattened — on any device) in ``slot``.  Copy it in its own dtype: a uint8 view of a float tensor
        crosses torch's multi-threaded copy threshold sooner and stalls under load.
        Raises ``OSError`` on I/O failure, leaving no readable partial entry behind."""
        ...

    def read(self, slot: Slot, header: EntryHeader) -> torch.Tensor:
        """The slot's payload as 1-D uint8 on ``device``.  It may alias tier storage (valid until the slot
        is freed).  Raises ``tiercache.errors.CorruptEntryError`` when verification fails."""
        ...

    def discard(self, slot: Slot) -> None:
        """Make the slot's content unrecoverable (a persistent tier deletes it); no-op for volatile tiers."""
        ...

    def recover(self) -> Iterator[RecoveredEntry]:
        """Entries persisted by an earlier process (empty for volatile tiers).  Called once after opening,
        before any other use; slots it yields count as allocated."""
        ...

    def close(self) -> None: ...


def _fast_frozen_init(cls: type) -> None:
    """Give a frozen ``slots=True`` dataclass an ``__init__`` that stores its fields through their slot
    descriptors.  The generated dataclass ``__init__`` routes every field through ``object.__setattr__``
    (the price of ``frozen``), which made building a :class:`Slot` and an :class:`EntryHeader` a
    noticeable part of every ``put``.  Same signature (positional or keyword, no defaults), same
    immutability afterwards (``__setattr__`` still refuses)."""
    names = list(cls.__dataclass_fields__)  # type: ignore[attr-defined]
    namespace: dict[str, object] = {f"set_{name}": cls.__dict__[name].__set__ for name in names}
    body = "".join(f"    set_{name}(self, {name})\n" for name in names)
    exec(f"def __init__(self, {', '.join(names)}):\n{body}", namespace)
    init = namespace["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"  # type: ignore[attr-defined]
    cls.__init__ = init  # type: ignore[misc]


for _cls in (EntryHeader, RecoveredEntry):
    _fast_frozen_init(_cls)
del _cls
