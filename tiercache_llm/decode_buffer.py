"""The buffer exact decode assembles each layer's attention states in.

Every forward pass, a :class:`~tiercache_llm.TieredKVLayer` must hand attention one contiguous
``(batch, kv_heads, length, head_dim)`` tensor for keys and one for values.  Instead of gathering the
blocks, concatenating the tail and concatenating the new tokens (three copies of the context), the
layer asks a :class:`DecodeBuffer` for two tensors of exactly that shape and has the tiercache write
every block straight into its slice; the tail and the new tokens are copied in place behind them.

One buffer pair is shared by all layers of a :class:`~tiercache_llm.TieredKVCache`: a model runs the
attention of layer ``l`` to completion before it updates layer ``l + 1``, so the states of one layer
at a time are all that must exist beside the tiers.  The price is a validity rule: **a tensor returned
by ``update`` stays valid until the next ``update`` of any layer of the same cache** (the next layer's
states overwrite it).  Keeping every layer's context resident instead would turn the host budget
into a fiction.
"""

from __future__ import annotations

import math

import torch

# Growth factor of the storage: amortised O(1) reallocations per token while using at most 1.5x the
# largest layer's states.
GROWTH = 1.5


class DecodeBuffer:
    """Grows-only storage for one K and one V tensor per ``(device, dtype)``.

    Not thread-safe (a cache is updated by one thread at a time, as transformers' caches are).
    """

    def __init__(self) -> None:
        self._storage: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        self.peak_bytes = 0

    def views(
        self,
        shape_k: tuple[int, ...],
        shape_v: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Two contiguous tensors of the given shapes (uninitialised; previous views' contents are
        overwritten).  Storage grows geometrically, so decode reallocates O(log context) times."""
        nk, nv = math.prod(shape_k), math.prod(shape_v)
        pair = self._storage.get((device, dtype))
        if pair is None or pair[0].numel() < nk or pair[1].numel() < nv:
            old_k = pair[0].numel() if pair is not None else 0
            old_v = pair[1].numel() if pair is not None else 0
            size_k = nk if nk <= old_k else max(nk, int(old_k * GROWTH))
            size_v = nv if nv <= old_v else max(nv, int(old_v * GROWTH))
            size_k, size_v = max(size_k, old_k), max(size_v, old_v)
            pair = [torch.empty(size_k, dtype=dtype, device=device), torch.empty(size_v, dtype=dtype, device=device)]
            self._storage[(device, dtype)] = pair
            self.peak_bytes = max(self.peak_bytes, self.nbytes)
        return pair[0][:nk].view(shape_k), pair[1][:nv].view(shape_v)

    @property
    def nbytes(self) -> int:
        """Bytes currently allocated."""
        return sum(t.numel() * t.element_size() for pair in self._storage.values() for t in pair)

    def release(self) -> None:
        """Free the storage (the next :meth:`views` allocates again)."""
        self._storage.clear()
