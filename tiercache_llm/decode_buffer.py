"""The buffer exact decode assembles each layer's attention states in.

Every forward pass, a :class:`~tiercache_llm.TieredKVLayer` must hand attention its keys and values as
``(batch, kv_heads, length, head_dim)`` tensors.  Instead of gathering the blocks, concatenating the
tail and concatenating the new tokens (three copies of the context), the layer takes a buffer of
``(batch, kv_heads, capacity, head_dim)`` from a :class:`DecodeBuffer`, has the tiercache write every
block straight into its slice (``[j * block_size, (j + 1) * block_size)`` for the ``j``-th visible
block), copies the tail and the new tokens in place behind them, and returns a view
``buffer[:, :, start:end]`` (contiguous in ``head_dim``; the batch and head strides span the
capacity).  Capacity grows geometrically, and the per-block views of a buffer are made once per
allocation, so a decode step does no per-block tensor bookkeeping.

One buffer pair is shared by all layers of a :class:`~tiercache_llm.TieredKVCache`: a model runs the
attention of layer ``l`` to completion before it updates layer ``l + 1``, so the states of one layer
at a time are all that must exist beside the tiers.  The price is a validity rule: **a tensor returned
by ``update`` stays valid until the next ``update`` of any layer of the same cache** (the next layer's
states overwrite it).  Keeping every layer's context resident instead would turn the host budget
into a fiction.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Growth factor of the capacity: O(log context) reallocations while holding at most 1.5x the largest
# layer's visible states.
GROWTH = 1.5


@dataclass(eq=False)
class StatesBuffer:
    """One K and one V buffer of ``(batch, heads, capacity, head_dim)`` and their block views.

    Attributes:
        keys, values: the buffers.
        block_size: tokens per block view.
        key_blocks, value_blocks: ``keys[:, :, j * block_size:(j + 1) * block_size]`` for every ``j``
            with ``(j + 1) * block_size <= capacity`` (and the same of ``values``).
    """

    keys: torch.Tensor
    values: torch.Tensor
    block_size: int
    key_blocks: list[torch.Tensor] = field(init=False)
    value_blocks: list[torch.Tensor] = field(init=False)

    def __post_init__(self) -> None:
        n = self.capacity // self.block_size
        span = n * self.block_size
        self.key_blocks = list(self.keys[:, :, :span].unflatten(2, (n, self.block_size)).unbind(2))
        self.value_blocks = list(self.values[:, :, :span].unflatten(2, (n, self.block_size)).unbind(2))

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


class DecodeBuffer:
    """Grows-only :class:`StatesBuffer` s, one per layer geometry (device, dtype, batch, heads,
    head_dim, block size), shared by the layers of a cache.

    Not thread-safe (a cache is updated by one thread at a time, as transformers' caches are).
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple, StatesBuffer] = {}
        self.peak_bytes = 0

    def get(
        self,
        tokens: int,
        shape_k: tuple[int, int, int],
        shape_v: tuple[int, int, int],
        dtype: torch.dtype,
        device: torch.device,
        block_size: int,
    ) -> StatesBuffer:
        """A buffer pair holding at least ``tokens`` tokens; ``shape_k``/``shape_v`` are
        ``(batch, heads, head_dim)``.  Contents are undefined (earlier views are overwritten)."""
        geometry = (device, dtype, shape_k, shape_v, block_size)
        buf = self._buffers.get(geometry)
        if buf is not None and buf.capacity >= tokens:
            return buf
        capacity = max(tokens, int(buf.capacity * GROWTH) if buf is not None else 0)
        capacity = -(-capacity // block_size) * block_size
        if buf is None:  # a new geometry: a batch change retires the buffers of the old batch size
            for other in [g for g in self._buffers if g[2][0] != shape_k[0]]:
                del self._buffers[other]
        del buf  # release the old storage before allocating the larger one
        self._buffers.pop(geometry, None)
        b, h, d = shape_k
        keys = torch.empty((b, h, capacity, d), dtype=dtype, device=device)
        b, h, d = shape_v
        values = torch.empty((b, h, capacity, d), dtype=dtype, device=device)
        new = self._buffers[geometry] = StatesBuffer(keys, values, block_size)
        self.peak_bytes = max(self.peak_bytes, self.nbytes)
        return new

    @property
    def nbytes(self) -> int:
        """Bytes currently allocated."""
        return sum(buf.nbytes for buf in self._buffers.values())

    def release(self) -> None:
        """Free the storage (the next :meth:`get` allocates again)."""
        self._buffers.clear()
