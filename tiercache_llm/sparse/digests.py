"""Quest-style key digests: per token block and KV head, the element-wise min and max of the block's keys.

For any query ``q`` and any key ``k`` of a block whose element-wise bounds are ``lo <= k <= hi``,

    q . k = sum_i q_i k_i <= sum_i max(q_i lo_i, q_i hi_i) = relu(q) . hi - relu(-q) . lo

so the digest bounds q·k from above for *every* query without looking at the keys again (see
:func:`tiercache_llm.sparse.selection.score_blocks`).  Digests are built from the keys as attention
sees them, i.e. after RoPE (``Cache.update`` receives post-RoPE keys).

Padding: every token carries an explicit validity flag (``False`` for left padding, or for any
position that must never be attended).  Invalid tokens never contribute to a digest; a block with no
valid token has ``count == 0`` and digests of zeros (finite, so that scoring never forms ``0 * inf``);
scoring gives such blocks ``-inf`` and selection never picks them.

Beside the bounds, every block keeps the float32 **sum** of its valid keys (``total``): ``total / count``
is the block's mean key, a ShadowKV-style *landmark*.  ``q . mean`` is not a bound but an estimate of
the block's typical score; selection can blend it with the bound (``SelectionConfig.score``).

Shapes (``B`` batch rows, ``H`` KV heads, ``N`` blocks, ``D`` head dim, ``S`` block size):
``lo``/``hi`` are ``(B, H, N, D)`` in the keys' dtype (min and max are exact in any dtype);
``total`` is ``(B, H, N, D)`` float32; ``count`` is ``(B, N)`` int64, the valid tokens of each row in
each block.  The "blocks" of a digest are the selection's *pages*, which may be finer than the
cache's storage blocks (see :mod:`.selection`).

Ownership and thread safety: a :class:`KeyDigests` owns its tensors and updates them in place (do not
share them with another object); it is a plain mutable object, one writer at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["KeyDigests", "block_digests"]


def _check_keys(keys: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    if not isinstance(keys, torch.Tensor) or keys.dim() != 4:
        raise ValueError(f"keys must be a (batch, kv_heads, seq, head_dim) tensor, got {getattr(keys, 'shape', keys)!r}")
    if not keys.is_floating_point():
        raise TypeError(f"keys must be floating point, got {keys.dtype}")
    b, _, t, _ = keys.shape
    if valid is None:
        return torch.ones(b, t, dtype=torch.bool, device=keys.device)
    if not isinstance(valid, torch.Tensor) or tuple(valid.shape) != (b, t):
        raise ValueError(f"valid must be a (batch, seq) = {(b, t)} tensor, got {getattr(valid, 'shape', valid)!r}")
    if valid.dtype != torch.bool:
        raise TypeError(f"valid must be a bool tensor, got {valid.dtype}")
    return valid.to(keys.device)


def _reduce(keys: torch.Tensor, valid: torch.Tensor, offset: int, block_size: int):
    """Digests of ``keys`` whose first token sits at position ``offset`` inside its block.

    Returns ``(lo, hi, count)`` over the ``ceil((offset + seq) / block_size)`` blocks touched; positions
    before ``offset`` and after the end are treated as invalid."""
    b, h, t, d = keys.shape
    n = -(-(offset + t) // block_size)
    pad_after = n * block_size - offset - t
    # Padding values are irrelevant (masked below); padding a view costs one copy of the keys.
    k = torch.nn.functional.pad(keys, (0, 0, offset, pad_after)).view(b, h, n, block_size, d)
    v = torch.nn.functional.pad(valid, (offset, pad_after), value=False).view(b, 1, n, block_size, 1)
    big = torch.finfo(k.dtype).max
    lo = k.masked_fill(~v, big).amin(dim=3)
    hi = k.masked_fill(~v, -big).amax(dim=3)
    total = k.float().masked_fill(~v, 0.0).sum(dim=3)
    count = v.view(b, n, block_size).sum(dim=2)
    empty = (count == 0).view(b, 1, n, 1)
    return lo.masked_fill(empty, 0), hi.masked_fill(empty, 0), count, total


def _reduce_one(keys: torch.Tensor, valid: torch.Tensor):
    """``_reduce`` for keys that all fall into one block: no padding to the block size."""
    b, h, t, d = keys.shape
    big = torch.finfo(keys.dtype).max
    v = valid.view(b, 1, t, 1)
    count = valid.sum(dim=1, keepdim=True)
    empty = (count == 0).view(b, 1, 1, 1)
    lo = keys.masked_fill(~v, big).amin(dim=2, keepdim=True).masked_fill(empty, 0)
    hi = keys.masked_fill(~v, -big).amax(dim=2, keepdim=True).masked_fill(empty, 0)
    total = keys.float().masked_fill(~v, 0.0).sum(dim=2, keepdim=True)
    return lo, hi, count, total


def block_digests(keys: torch.Tensor, block_size: int, valid: torch.Tensor | None = None):
    """Digests of a whole sequence of keys cut into blocks of ``block_size`` tokens from position 0.

    Args:
        keys: ``(B, H, T, D)`` post-RoPE keys.
        block_size: tokens per block (> 0); the last block may be partial.
        valid: ``(B, T)`` bool, ``False`` for padded positions (default: all valid).

    Returns:
        ``(lo, hi, count)``: ``(B, H, N, D)``, ``(B, H, N, D)``, ``(B, N)`` with ``N = ceil(T / block_size)``.
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    valid = _check_keys(keys, valid)
    return _reduce(keys, valid, 0, block_size)[:3]


@dataclass
class KeyDigests:
    """The digests of one layer's keys, kept up to date as tokens are appended.

    Attributes:
        block_size: tokens per block.
        lo, hi: ``(B, H, N, D)`` element-wise min / max over each block's valid keys (zeros where a
            block has no valid key).
        count: ``(B, N)`` valid tokens per row and block.
        length: tokens (valid or not) covered so far; block ``N - 1`` is partial when
            ``length % block_size != 0`` and is completed by later appends.
        total: ``(B, H, N, D)`` float32 sum of each block's valid keys (landmark numerator), or
            ``None`` for digests built without it (then landmark scoring raises).
    """

    block_size: int
    lo: torch.Tensor
    hi: torch.Tensor
    count: torch.Tensor
    length: int
    total: torch.Tensor | None = None

    def landmarks(self) -> torch.Tensor:
        """``(B, H, N, D)`` float32 mean valid key of every block (zeros for empty blocks)."""
        if self.total is None:
            raise ValueError("these digests were built without key sums: no landmarks")
        return self.total / self.count.clamp(min=1).view(*self.count.shape[:1], 1, -1, 1).to(self.total.dtype)

    @classmethod
    def empty(cls, batch: int, kv_heads: int, head_dim: int, block_size: int, *,
              dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> "KeyDigests":
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        lo = torch.zeros(batch, kv_heads, 0, head_dim, dtype=dtype, device=device)
        total = torch.zeros(batch, kv_heads, 0, head_dim, dtype=torch.float32, device=device)
        return cls(block_size, lo, lo.clone(), torch.zeros(batch, 0, dtype=torch.long, device=device), 0, total)

    @classmethod
    def from_keys(cls, keys: torch.Tensor, block_size: int, valid: torch.Tensor | None = None) -> "KeyDigests":
        """Digests of ``keys`` (``(B, H, T, D)``, post-RoPE) from position 0; see :func:`block_digests`."""
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        lo, hi, count, total = _reduce(keys, _check_keys(keys, valid), 0, block_size)
        return cls(block_size, lo, hi, count, keys.shape[2], total)

    @property
    def n_blocks(self) -> int:
        return self.lo.shape[2]

    @property
    def token_count(self) -> torch.Tensor:
        """``(B,)`` valid tokens per row."""
        return self.count.sum(dim=1)

    def append(self, keys: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Extend by ``keys`` ``(B, H, T, D)`` (positions ``length .. length + T - 1``).

        The partial last block is merged with the new keys in place (min of mins, max of maxes, sum of
        counts); new blocks are reduced at once and appended.  A decode step (``T = 1``) inside a block
        touches one block's digest; the arrays grow once per ``block_size`` tokens."""
        valid = _check_keys(keys, valid)
        b, h, _, d = keys.shape
        if (b, h, d) != (self.lo.shape[0], self.lo.shape[1], self.lo.shape[3]):
            raise ValueError(f"keys of shape {tuple(keys.shape)} do not match digests of shape {tuple(self.lo.shape)}")
        if keys.shape[2] == 0:
            return
        offset = self.length % self.block_size
        keys = keys.to(self.lo.dtype)
        if offset and offset + keys.shape[2] <= self.block_size:
            lo, hi, count, total = _reduce_one(keys, valid)  # decode: the keys stay inside the partial block
        else:
            lo, hi, count, total = _reduce(keys, valid, offset, self.block_size)
        if offset:  # the first reduced block continues the current partial block: merge it in place
            prev_has = (self.count[:, -1] > 0).view(b, 1, 1)
            new_has = (count[:, 0] > 0).view(b, 1, 1)
            both = prev_has & new_has
            last_lo, last_hi = self.lo[:, :, -1], self.hi[:, :, -1]
            last_lo.copy_(torch.where(both, torch.minimum(last_lo, lo[:, :, 0]), torch.where(prev_has, last_lo, lo[:, :, 0])))
            last_hi.copy_(torch.where(both, torch.maximum(last_hi, hi[:, :, 0]), torch.where(prev_has, last_hi, hi[:, :, 0])))
            self.count[:, -1] += count[:, 0]
            if self.total is not None:
                self.total[:, :, -1] += total[:, :, 0]
            lo, hi, count, total = lo[:, :, 1:], hi[:, :, 1:], count[:, 1:], total[:, :, 1:]
        if count.shape[1]:  # new blocks: one concatenation per block_size tokens in decode
            self.lo = torch.cat((self.lo, lo), dim=2)
            self.hi = torch.cat((self.hi, hi), dim=2)
            self.count = torch.cat((self.count, count), dim=1)
            if self.total is not None:
                self.total = torch.cat((self.total, total), dim=2)
        self.length += keys.shape[2]

    def select_rows(self, index: torch.Tensor) -> None:
        """Apply a batch gather ``new_row[i] = old_row[index[i]]`` (beam reorder, batch repeat/select)."""
        index = index.to(device=self.lo.device, dtype=torch.long)
        self.lo = self.lo.index_select(0, index)
        self.hi = self.hi.index_select(0, index)
        self.count = self.count.index_select(0, index)
        if self.total is not None:
            self.total = self.total.index_select(0, index)

    def crop(self, length: int, tail_keys: torch.Tensor | None = None, tail_valid: torch.Tensor | None = None) -> None:
        """Keep the first ``length`` tokens.  Whole blocks are dropped without touching keys; when
        ``length`` cuts a block, its digest is rebuilt from ``tail_keys`` (``(B, H, length % block_size,
        D)``: the keys of the cut block that remain) and ``tail_valid``; omitting them then raises."""
        if not 0 <= length <= self.length:
            raise ValueError(f"crop length must be in [0, {self.length}], got {length}")
        keep, rest = divmod(length, self.block_size)
        self.lo, self.hi, self.count = self.lo[:, :, :keep], self.hi[:, :, :keep], self.count[:, :keep]
        if self.total is not None:
            self.total = self.total[:, :, :keep]
        self.length = keep * self.block_size
        if rest:
            if tail_keys is None or tail_keys.shape[2] != rest:
                raise ValueError(f"cropping to {length} cuts a block: pass the {rest} remaining keys of it as tail_keys")
            self.append(tail_keys, tail_valid)
