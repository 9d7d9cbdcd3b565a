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
``lo``/``hi`` are ``(B, H, N, D)`` in the storage dtype (float32: the exact min and max of keys of any
float dtype up to float32; float16: rounded outward, see :class:`KeyDigests`); ``total`` is ``(B, H,
N, D)`` float32; ``count`` is ``(B, N)`` int64, the valid tokens of each row in
each block.  The "blocks" of a digest are the selection's *pages*, which may be finer than the
cache's storage blocks (see :mod:`.selection`).

Ownership and thread safety: a :class:`KeyDigests` owns its tensors and updates them in place (do not
share them with another object); it is a plain mutable object, one writer at a time.
"""

from __future__ import annotations

import torch

__all__ = ["KeyDigests", "block_digests", "round_down", "round_up"]


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


class KeyDigests:
    """The digests of one layer's keys, kept up to date as tokens are appended.

    Attributes (read-only views; change them only through the methods):
        block_size: tokens per block.
        lo, hi: ``(B, H, N, D)`` element-wise lower / upper bounds of each block's valid keys (zeros
            where a block has no valid key), in the storage dtype.  With float32 storage they are the
            exact min / max; with float16 storage the min rounded *down* and the max rounded *up* to
            the nearest float16 (outward), so ``lo <= k <= hi`` still holds for every valid key and the
            scores stay upper bounds of q·k.
        count: ``(B, N)`` valid tokens per row and block.
        length: tokens (valid or not) covered so far; block ``N - 1`` is partial when
            ``length % block_size != 0`` and is completed by later appends.
        total: ``(B, H, N, D)`` float32 sum of each block's valid keys, or ``None`` for digests built
            without it (then landmark scoring raises).  Derived (``mean * count``) from the kept means,
            so within their rounding (float32: exact where ``count`` is a power of two; float16: about
            ``2**-11`` relative), except the last block's, which is exact.
        dtype: the storage dtype, ``torch.float32`` or ``torch.float16``.

    Storage: ``storage=torch.float32`` (the default here) or ``torch.float16`` (the sparse cache's
    default, ``SelectionConfig.digests``: half the bytes, and scoring reads half as much).  Keys of any
    floating dtype are accepted; float32 holds bfloat16/float16 keys exactly.  Float16 holds ``|x| <=
    65504``: when a new bound would not fit (an overflow to infinity would turn ``0 * inf`` into NaN in
    scoring), the digests switch to float32 storage for good, keeping every bound held so far (a
    float16 value is exact in float32), so a bound is never lost.  The landmarks (mean keys) are
    rounded to nearest (they estimate, they do not bound); the last block's key sum is kept exactly in
    float32 beside them, so later appends merge into it exactly.

    Layout (what scoring wants, see :mod:`.selection`): one ``(B, H, R, capacity)`` buffer per layer,
    rows ``[0, D)`` the lower bounds, ``[D, 2D)`` the upper bounds, ``[2D, 3D)`` the landmarks (``R =
    3D``; ``2D`` without landmarks), the blocks along the last (unit-stride) dimension, so the scoring
    matmuls ``q @ digest^T`` read them with no per-step transpose or copy and one call can stream all
    three (:meth:`stacked`); the attributes above are views of it.  ``capacity`` grows by about a
    32nd ahead of need (:func:`_capacity`; spare columns cost every step: the CPU scoring upcasts whole
    buffers), so a decode step appends in place instead of concatenating the whole layer's
    digests once per block.
    """

    __slots__ = ("block_size", "count", "length", "_st", "_d", "_tail", "_n")

    def __init__(self, block_size: int, lo: torch.Tensor, hi: torch.Tensor, count: torch.Tensor, length: int,
                 total: torch.Tensor | None = None, *, storage: torch.dtype = torch.float32) -> None:
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        if lo.dim() != 4 or lo.shape != hi.shape:
            raise ValueError(f"lo and hi must both be (batch, kv_heads, n_blocks, head_dim), got {tuple(lo.shape)} and {tuple(hi.shape)}")
        b, h, n, d = lo.shape
        if tuple(count.shape) != (b, n):
            raise ValueError(f"count must be (batch, n_blocks) = {(b, n)}, got {tuple(count.shape)}")
        if total is not None and tuple(total.shape) != tuple(lo.shape):
            raise ValueError(f"total must have the shape of lo {tuple(lo.shape)}, got {tuple(total.shape)}")
        storage = check_storage(storage)
        self.block_size = block_size
        self.count = count
        self.length = int(length)
        self._n = 0
        self._d = d
        rows = 2 * d if total is None else 3 * d
        self._st = torch.zeros(b, h, rows, 0, dtype=storage, device=lo.device)
        self._tail = None if total is None else torch.zeros(b, h, d, dtype=torch.float32, device=lo.device)
        self._put(lo, hi, count, None if total is None else total.float())

    # ------------------------------------------------------------------------------ storage
    @property
    def dtype(self) -> torch.dtype:
        return self._st.dtype

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(B, H, N, D)``: the shape of :attr:`lo` and :attr:`hi` (no view made)."""
        b, h = self._st.shape[:2]
        return b, h, self._n, self._d

    @property
    def has_landmarks(self) -> bool:
        """Whether these digests keep key sums (landmarks)."""
        return self._tail is not None

    @property
    def _lo_t(self) -> torch.Tensor:
        return self._st[:, :, : self._d]

    @property
    def _hi_t(self) -> torch.Tensor:
        return self._st[:, :, self._d : 2 * self._d]

    @property
    def _mean_t(self) -> torch.Tensor | None:
        return None if self._tail is None else self._st[:, :, 2 * self._d :]

    def _reserve(self, n: int) -> None:
        """Capacity for ``n`` blocks (contents of the first ``self._n`` kept)."""
        cap = self._st.shape[-1]
        if n <= cap:
            return
        cap = _capacity(n)
        out = self._st.new_zeros(*self._st.shape[:-1], cap)
        out[..., : self._n] = self._st[..., : self._n]
        self._st = out

    def _fit(self, *bounds: torch.Tensor) -> None:
        """Switch float16 storage to float32 if any of ``bounds`` (float32 or wider, finite or not) does
        not round to a finite float16 (see the class docstring)."""
        if self._st.dtype != torch.float16:
            return
        big = torch.finfo(torch.float16).max
        if any(float(x.abs().amax()) > big for x in bounds if x.numel()):
            self._st = self._st.float()

    def _put(self, lo: torch.Tensor, hi: torch.Tensor, count: torch.Tensor, total: torch.Tensor | None) -> None:
        """Append complete digests of new blocks (``count`` is appended by the caller unless empty)."""
        k = lo.shape[2]
        if k == 0:
            return
        if self._tail is not None and total is None:
            raise ValueError("these digests keep key sums: new blocks need them too")
        self._fit(lo, hi)
        start = self._n
        self._reserve(start + k)
        dt = self._st.dtype
        self._lo_t[..., start : start + k] = round_down(lo, dt).transpose(-1, -2)
        self._hi_t[..., start : start + k] = round_up(hi, dt).transpose(-1, -2)
        if self._tail is not None:
            self._mean_t[..., start : start + k] = _mean(total, count).transpose(-1, -2)
            self._tail.copy_(total[:, :, -1])
        self._n = start + k

    @property
    def lo(self) -> torch.Tensor:
        return self._lo_t[..., : self._n].transpose(-1, -2)

    @property
    def hi(self) -> torch.Tensor:
        return self._hi_t[..., : self._n].transpose(-1, -2)

    @property
    def total(self) -> torch.Tensor | None:
        if self._tail is None:
            return None
        out = self.landmarks() * self.count.view(self.count.shape[0], 1, -1, 1).to(torch.float32)
        if self._n and self.length % self.block_size:
            out[:, :, -1] = self._tail
        return out

    @property
    def nbytes(self) -> int:
        """Bytes held: the bounds and landmarks with their spare capacity, the counts, the last sum."""
        held = [self._st, self.count, self._tail]
        return sum(t.nbytes for t in held if t is not None)

    def stacked(self) -> torch.Tensor:
        """``(B, H, R, N)`` view of the storage (see the class docstring: rows ``[lo^T; hi^T; mean^T]``,
        ``R = 3D``, or ``2D`` without landmarks), in the storage dtype, blocks along the unit-stride
        dimension.  Do not modify."""
        return self._st[..., : self._n]

    def buffer(self) -> torch.Tensor:
        """``(B, H, R, capacity)``: the whole storage buffer of which :meth:`stacked` is the first
        ``n_blocks`` columns; the columns past them are spare capacity (zeros, or stale digests of
        cropped blocks: never a digest of this object).  Do not modify."""
        return self._st

    def transposed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(lo^T, hi^T, landmarks^T)``: ``(B, H, D, N)`` views with the blocks along the last (unit
        stride) dimension, the layout of the scoring matmuls, in the storage dtype; landmarks ``None``
        without key sums.  Views of the storage: do not modify."""
        n = self._n
        mean_t = self._mean_t
        return self._lo_t[..., :n], self._hi_t[..., :n], None if mean_t is None else mean_t[..., :n]

    def landmarks(self) -> torch.Tensor:
        """``(B, H, N, D)`` float32 mean valid key of every block (zeros for empty blocks), equal to
        ``total / count`` with the sums exact, rounded to the storage dtype: a view of the kept
        landmarks with float32 storage (do not modify), a float32 copy of them with float16."""
        if self._tail is None:
            raise ValueError("these digests were built without key sums: no landmarks")
        return self._mean_t[..., : self._n].transpose(-1, -2).float()

    def clone(self) -> "KeyDigests":
        """An independent copy (the landmarks and the last block's exact sum copied as they are)."""
        new = KeyDigests.__new__(KeyDigests)
        new.block_size, new.count, new.length, new._n = self.block_size, self.count.clone(), self.length, self._n
        new._st, new._d = self._st.clone(), self._d
        new._tail = None if self._tail is None else self._tail.clone()
        return new

    def __repr__(self) -> str:
        b, h = self._st.shape[:2]
        return (f"KeyDigests(block_size={self.block_size}, batch={b}, kv_heads={h}, n_blocks={self._n}, "
                f"head_dim={self._d}, length={self.length}, dtype={self._st.dtype}, landmarks={self._tail is not None})")

    # ------------------------------------------------------------------------------ building
    @classmethod
    def empty(cls, batch: int, kv_heads: int, head_dim: int, block_size: int, *,
              dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
              storage: torch.dtype = torch.float32) -> "KeyDigests":
        """Empty digests (with landmarks) for keys of ``dtype``, stored in ``storage`` (float32 or
        float16; see the class docstring)."""
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        lo = torch.zeros(batch, kv_heads, 0, head_dim, dtype=dtype, device=device)
        total = torch.zeros(batch, kv_heads, 0, head_dim, dtype=torch.float32, device=device)
        return cls(block_size, lo, lo, torch.zeros(batch, 0, dtype=torch.long, device=device), 0, total,
                   storage=storage)

    @classmethod
    def from_keys(cls, keys: torch.Tensor, block_size: int, valid: torch.Tensor | None = None, *,
                  storage: torch.dtype = torch.float32) -> "KeyDigests":
        """Digests of ``keys`` (``(B, H, T, D)``, post-RoPE) from position 0, stored in ``storage``; see
        :func:`block_digests`."""
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        lo, hi, count, total = _reduce(keys, _check_keys(keys, valid), 0, block_size)
        return cls(block_size, lo, hi, count, keys.shape[2], total, storage=storage)

    @property
    def n_blocks(self) -> int:
        return self._n

    @property
    def token_count(self) -> torch.Tensor:
        """``(B,)`` valid tokens per row."""
        return self.count.sum(dim=1)

    def append(self, keys: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Extend by ``keys`` ``(B, H, T, D)`` (positions ``length .. length + T - 1``).

        The partial last block is merged with the new keys in place (min of mins, max of maxes, sum of
        counts and of keys, its landmark recomputed); new blocks are reduced at once and written into
        the spare capacity.  A decode step (``T = 1``) inside a block touches one block's digest."""
        all_valid = valid is None
        valid = _check_keys(keys, valid)
        b, h, _, d = keys.shape
        if (b, h, d) != (self._st.shape[0], self._st.shape[1], self._d):
            raise ValueError(f"keys of shape {tuple(keys.shape)} do not match digests of shape {tuple(self.lo.shape)}")
        if keys.shape[2] == 0:
            return
        keys = keys.to(device=self._st.device)
        if keys.shape[2] == 1:
            self._append_token(keys[:, :, 0], valid[:, 0], all_valid)
        else:
            self._append_keys(keys, valid)
        self.length += keys.shape[2]

    def _append_token(self, key: torch.Tensor, valid: torch.Tensor, all_valid: bool = False) -> None:
        """``append`` of one token (a decode step): ``key`` ``(B, H, D)``, ``valid`` ``(B,)``.  The same
        digests as :meth:`_append_keys` with a fraction of its tensor operations: a single key is its
        own min, max and sum (a row whose token is invalid keeps its digest).  ``all_valid``: ``valid`` is
        known to be all ``True`` (``append(valid=None)``), so the masking by it is skipped (the same
        digests: every ``where`` on it would take its first branch)."""
        b = key.shape[0]
        v = valid.view(b, 1, 1)
        if not all_valid:
            key = key.masked_fill(~v, 0)  # an invalid token's key takes no part (and cannot overflow)
        self._fit(key)
        down, up = _outward(key, self._st.dtype)
        if self.length % self.block_size:  # inside the partial last block: merge
            last = self._n - 1
            lo, hi, count = self._lo_t[..., last], self._hi_t[..., last], self.count[:, last]  # views
            has = (count > 0).view(b, 1, 1)  # else its digest is zeros, not a bound
            if all_valid:
                if bool(has.all()):  # the common case: every row's block holds tokens already
                    torch.minimum(lo, down, out=lo)
                    torch.maximum(hi, up, out=hi)
                else:
                    lo.copy_(torch.where(has, torch.minimum(lo, down), down))
                    hi.copy_(torch.where(has, torch.maximum(hi, up), up))
                count += 1
            else:
                lo.copy_(torch.where(v, torch.where(has, torch.minimum(lo, down), down), lo))
                hi.copy_(torch.where(v, torch.where(has, torch.maximum(hi, up), up), hi))
                count += valid
            if self._mean_t is not None:
                self._tail += key.float()
                # _mean of the exact sum (the same float32 division), rounded to the storage
                # (count >= 1 after an all-valid token: the clamp would change nothing)
                den = count if all_valid else count.clamp(min=1)
                self._mean_t[..., last] = self._tail / den.view(b, 1, 1).to(torch.float32)
            return
        n = self._n  # a new block
        self._reserve(n + 1)
        self._lo_t[..., n] = down
        self._hi_t[..., n] = up
        if self._tail is not None:
            self._tail.copy_(key)  # the sum of the block's one key; the mean of it (count 1, or 0: zeros)
            self._mean_t[..., n] = self._tail
        self._n = n + 1
        self.count = torch.cat((self.count, valid.view(b, 1).to(self.count.dtype)), dim=1)

    def _append_keys(self, keys: torch.Tensor, valid: torch.Tensor) -> None:
        """``append`` of ``keys`` ``(B, H, T, D)`` (any ``T >= 1``; checked) and ``valid`` ``(B, T)``,
        except ``length``, which the caller advances."""
        b = keys.shape[0]
        offset = self.length % self.block_size
        if (offset and offset + keys.shape[2] <= self.block_size) or keys.shape[2] == 1:
            lo, hi, count, total = _reduce_one(keys, valid)  # decode: the keys stay inside one block
        else:
            lo, hi, count, total = _reduce(keys, valid, offset, self.block_size)
        if offset:  # the first reduced block continues the current partial block: merge it in place
            prev_has = (self.count[:, -1] > 0).view(b, 1, 1)
            new_has = (count[:, 0] > 0).view(b, 1, 1)
            both = prev_has & new_has
            self._fit(lo[:, :, 0], hi[:, :, 0])
            dt = self._st.dtype
            lo0, hi0 = round_down(lo[:, :, 0], dt), round_up(hi[:, :, 0], dt)
            last = self._n - 1
            last_lo, last_hi = self._lo_t[..., last], self._hi_t[..., last]
            last_lo.copy_(torch.where(both, torch.minimum(last_lo, lo0), torch.where(prev_has, last_lo, lo0)))
            last_hi.copy_(torch.where(both, torch.maximum(last_hi, hi0), torch.where(prev_has, last_hi, hi0)))
            self.count[:, -1] += count[:, 0]
            if self._mean_t is not None:
                self._tail += total[:, :, 0]
                self._mean_t[..., last] = _mean(self._tail.unsqueeze(2), self.count[:, -1:]).squeeze(2)
            lo, hi, count, total = lo[:, :, 1:], hi[:, :, 1:], count[:, 1:], total[:, :, 1:]
        if count.shape[1]:  # new blocks
            self._put(lo, hi, count, total)
            self.count = torch.cat((self.count, count), dim=1)

    def select_rows(self, index: torch.Tensor) -> None:
        """Apply a batch gather ``new_row[i] = old_row[index[i]]`` (beam reorder, batch repeat/select)."""
        index = index.to(device=self._st.device, dtype=torch.long)
        self._st = self._st.index_select(0, index)
        self.count = self.count.index_select(0, index)
        if self._tail is not None:
            self._tail = self._tail.index_select(0, index)

    def crop(self, length: int, tail_keys: torch.Tensor | None = None, tail_valid: torch.Tensor | None = None) -> None:
        """Keep the first ``length`` tokens.  Whole blocks are dropped without touching keys; when
        ``length`` cuts a block, its digest is rebuilt from ``tail_keys`` (``(B, H, length % block_size,
        D)``: the keys of the cut block that remain) and ``tail_valid``; omitting them then raises."""
        if not 0 <= length <= self.length:
            raise ValueError(f"crop length must be in [0, {self.length}], got {length}")
        keep, rest = divmod(length, self.block_size)
        if rest and (tail_keys is None or tail_keys.shape[2] != rest):
            raise ValueError(f"cropping to {length} cuts a block: pass the {rest} remaining keys of it as tail_keys")
        self._n = min(self._n, keep)
        self.count = self.count[:, :keep]
        # the last kept block is complete (length is a multiple of block_size now): no append merges
        # into it, so the exact sum kept for the last block is not needed until a new block starts.
        self.length = keep * self.block_size
        if rest:
            self.append(tail_keys, tail_valid)


def _capacity(n: int) -> int:
    """Columns to allocate for ``n`` blocks: about a 32nd more (the CPU scoring upcasts whole buffers,
    spare columns included, every step, so the slack is kept small; a decode step adds a block every
    ``block_size`` tokens, so the buffer is replaced every ``n / 32 + 16`` blocks, at a cost of one copy
    of it), rounded up to a multiple of 16 columns that is not one of 256 (the row stride of the
    scoring matmuls: 64-byte float32 rows run MKL's matmul faster on the development machine, rows of a
    multiple of 1 KiB slower - cache-set aliasing; the products are bit for bit the same whatever the
    stride)."""
    cap = -(-(n + n // 32 + 16) // 16) * 16
    return cap + 16 if cap % 256 == 0 else cap


STORAGE_DTYPES = (torch.float32, torch.float16)


def check_storage(storage) -> torch.dtype:
    """``storage`` as a digest storage dtype (``torch.float32`` / ``torch.float16`` or their names)."""
    if isinstance(storage, str):
        storage = getattr(torch, storage, None) if storage in ("float32", "float16") else storage
    if storage not in STORAGE_DTYPES:
        raise ValueError(f"digest storage must be torch.float32 or torch.float16, got {storage!r}")
    return storage


def round_down(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` in ``dtype``, each value the largest representable one ``<= x`` (NaN stays NaN)."""
    return _round_outward(x, dtype, float("-inf"))


def round_up(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` in ``dtype``, each value the smallest representable one ``>= x`` (NaN stays NaN)."""
    return _round_outward(x, dtype, float("inf"))


_TOWARD: dict = {}


def _outward(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(round_down(x, dtype), round_up(x, dtype))`` with one conversion (a decode token's key: few
    tensor operations)."""
    y = x.to(dtype)
    if x.dtype == dtype or (dtype == torch.float32 and x.dtype in (torch.float16, torch.bfloat16)):
        return y, y
    wide = torch.float64 if torch.float64 in (x.dtype, dtype) else torch.float32
    yw, xw = y.to(wide), x.to(wide)
    key = (dtype, y.device)
    if key not in _TOWARD:
        _TOWARD[key] = (torch.tensor(float("-inf"), dtype=dtype, device=y.device),
                        torch.tensor(float("inf"), dtype=dtype, device=y.device))
    neg, pos = _TOWARD[key]
    return torch.where(yw > xw, torch.nextafter(y, neg), y), torch.where(yw < xw, torch.nextafter(y, pos), y)


def _round_outward(x: torch.Tensor, dtype: torch.dtype, toward: float) -> torch.Tensor:
    y = x.to(dtype)
    if x.dtype == dtype or (dtype == torch.float32 and x.dtype in (torch.float16, torch.bfloat16)):
        return y  # exact
    wide = torch.float64 if torch.float64 in (x.dtype, dtype) else torch.float32
    yw, xw = y.to(wide), x.to(wide)
    wrong = yw < xw if toward > 0 else yw > xw  # rounded to nearest on the wrong side
    return torch.where(wrong, torch.nextafter(y, torch.full_like(y, toward)), y)


def _mean(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """``(B, H, K, D)`` float32 mean keys from sums ``total`` and ``count`` ``(B, K)`` (zeros where empty)."""
    return total / count.clamp(min=1).view(*count.shape[:1], 1, -1, 1).to(total.dtype)
