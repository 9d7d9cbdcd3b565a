"""Block layout of one attention layer's K/V: fixed-size token blocks stored as tiercache entries.

A layer's keys and values have shape ``(batch, kv_heads, seq, head_dim)``.  The sequence axis is cut
into blocks of ``block_size`` tokens.  Every *full* block is stored under :func:`block_key` as one joint
tiercache entry ``(2, batch, kv_heads, block_size, head_dim)`` (K then V; sparse layers part-major ``(batch,
kv_heads, 2, block_size, head_dim)``) when K and V have the same
shape, else as two entries (one for K, one for V); the partially filled *tail* (fewer than ``block_size``
tokens) stays in memory next to the model.

Batch operations used by ``generate`` (beam reordering, batch repetition) do not rewrite stored
blocks: each :class:`BlockRef` carries an optional ``rows`` index mapping the cache's current batch
rows onto the rows physically stored in the entry.  ``stored[rows]`` is the block as attention sees
it.  Block keys are never reused (every stored block gets a fresh serial number), so a delete racing
with an in-flight prefetch can never alias a newer block.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

KEY_PREFIX = "kv"


def block_key(cache_uid: str, layer_idx: int, kind: str, serial: int) -> tuple:
    """The tiercache key of one stored block: ``("kv", cache_uid, layer_idx, "k"|"v"|"kv", serial)``
    (``"kv"``: K and V of the block in one entry, stored whenever their shapes agree).

    Stable across processes (plain strings and ints, never Python's salted ``hash()``).
    """
    if kind not in ("k", "v", "kv"):
        raise ValueError(f"kind must be 'k', 'v' or 'kv', not {kind!r}")
    return (KEY_PREFIX, cache_uid, int(layer_idx), kind, int(serial))


@dataclass(eq=False)
class BlockRef:
    """One stored full block of a layer.

    Attributes:
        serial: unique (per cache) number naming the block's entries, see :func:`block_key`.
        stored_batch: number of batch rows physically stored in the entry.
        nbytes: bytes of the block's K plus its V (one joint entry or two).
        rows: ``None`` when the stored rows are the current batch rows in order; otherwise a 1-D
            long tensor, ``len(rows) == current batch``, selecting stored rows for each current row.
    """

    serial: int
    stored_batch: int
    nbytes: int
    rows: torch.Tensor | None = field(default=None)

    def view(self, stored: torch.Tensor, joint: bool = False) -> torch.Tensor:
        """The block as attention sees it: ``stored`` with :attr:`rows` applied (to its batch dimension: the
        first, or with ``joint`` the second, of an exact layer's joint K/V entry ``(2, batch, ...)``; a sparse
        layer's part-major joint entry ``(batch, heads, 2, ...)`` has its rows first: ``joint=False``)."""
        if self.rows is None:
            return stored
        return stored.index_select(1 if joint else 0, self.rows.to(stored.device))

    def compose(self, index: torch.Tensor) -> None:
        """Apply a batch gather ``new_row[i] = old_row[index[i]]`` lazily (no data is touched)."""
        index = index.to(torch.long)
        base = self.rows if self.rows is not None else torch.arange(self.stored_batch, device=index.device)
        rows = base.to(index.device).index_select(0, index)
        if rows.numel() == self.stored_batch and torch.equal(
            rows, torch.arange(self.stored_batch, device=rows.device)
        ):
            self.rows = None
        else:
            self.rows = rows


def split_full_blocks(tensor: torch.Tensor, block_size: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Cut ``tensor`` (``(..., seq, head_dim)``) into contiguous full blocks and the remaining tail.

    Returns ``(blocks, tail)`` where every block has exactly ``block_size`` tokens and the tail has
    ``seq % block_size`` tokens (possibly zero).  The tail is a fresh contiguous tensor, so it does
    not keep ``tensor`` alive.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    seq = tensor.shape[-2]
    n_full = seq // block_size
    blocks = [tensor[..., i * block_size : (i + 1) * block_size, :].contiguous() for i in range(n_full)]
    tail = tensor[..., n_full * block_size :, :].clone(memory_format=torch.contiguous_format)
    return blocks, tail
