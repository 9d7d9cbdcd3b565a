"""Decode attention over selected blocks: the torch reference, and the block-table form the Triton kernel
(``tiercache_kernels.block_attention``) computes.

Both compute exactly dense softmax attention restricted to the selected, valid tokens (plus the new
tokens), in float32, and also return the **attention mass per block**: the sum of the softmax weights
that the block's tokens receive.  That mass is the signal attention-aware placement feeds into the
tiercache scores.

Shapes: ``B`` rows, ``H`` KV heads, ``Hq = G * H`` query heads (query head ``h`` reads KV head
``h // G``), ``Q`` query positions, ``D`` head dim, ``S`` tokens per block, ``U`` gathered blocks.

Masking: a token is attended iff its block is selected for that (row, KV head) and the token is valid
(padding and unfilled tail positions are not).  Hidden tokens may hold any bytes, NaN included: they
never reach the output.  New tokens are attended causally (query position ``i``
sees new tokens ``0..i``); context blocks all precede the new tokens.  A (row, head) with nothing to
attend gets a zero output and zero masses (dense SDPA would give NaN).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "SparseAttentionOutput",
    "paged_decode_attention",
    "paged_decode_attention_reference",
    "sparse_attention",
    "sparse_attention_reference",
]


@dataclass(frozen=True)
class SparseAttentionOutput:
    """Attention result.

    Attributes:
        output: ``(B, Hq, Q, D)`` in the query's dtype.
        block_mass: ``(B, Hq, U)`` float32, softmax weight each block received, averaged over query
            positions.  With ``new_mass`` it sums to 1 per (row, query head) that attended anything.
        new_mass: ``(B, Hq)`` float32, the weight on the new tokens (zeros when there are none).
    """

    output: torch.Tensor
    block_mass: torch.Tensor
    new_mass: torch.Tensor

    def kv_head_mass(self, kv_heads: int) -> torch.Tensor:
        """``(B, H, U)``: :attr:`block_mass` averaged over each KV head's query-head group (still sums to 1
        with the group's mean new-token mass)."""
        b, hq, u = self.block_mass.shape
        return self.block_mass.view(b, kv_heads, hq // kv_heads, u).mean(dim=2)


def _softmax_safe(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim where all ``-inf`` rows give zeros instead of NaN."""
    m = scores.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(scores - m)
    return e / e.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(e.dtype).tiny)


def sparse_attention_reference(
    query: torch.Tensor,
    block_keys: torch.Tensor,
    block_values: torch.Tensor,
    block_mask: torch.Tensor,
    token_valid: torch.Tensor | None = None,
    new_keys: torch.Tensor | None = None,
    new_values: torch.Tensor | None = None,
    *,
    scale: float | None = None,
) -> SparseAttentionOutput:
    """Attention of ``query`` over the selected blocks and the new tokens.

    Args:
        query: ``(B, Hq, Q, D)``.
        block_keys, block_values: ``(B, H, U, S, D)``, the gathered blocks (e.g. the union to fetch).
        block_mask: ``(B, H, U)`` bool, the blocks each (row, KV head) attends.
        token_valid: ``(B, U, S)`` or ``(B, H, U, S)`` bool; default all valid.
        new_keys, new_values: ``(B, H, Q, D)`` or ``None``: the new tokens (causal among themselves).
        scale: softmax scale, default ``D ** -0.5``.
    """
    if query.dim() != 4 or block_keys.dim() != 5 or block_keys.shape != block_values.shape:
        raise ValueError(
            f"expected query (B, Hq, Q, D) and block K/V (B, H, U, S, D) of equal shape, got "
            f"{tuple(query.shape)}, {tuple(block_keys.shape)}, {tuple(block_values.shape)}"
        )
    b, hq, q, d = query.shape
    bk, h, u, s, dk = block_keys.shape
    if bk != b or dk != d or hq % h:
        raise ValueError(f"query {tuple(query.shape)} does not match blocks {tuple(block_keys.shape)}")
    if tuple(block_mask.shape) != (b, h, u):
        raise ValueError(f"block_mask must be {(b, h, u)}, got {tuple(block_mask.shape)}")
    g = hq // h
    scale = d ** -0.5 if scale is None else scale
    allowed = block_mask.bool().unsqueeze(-1).expand(b, h, u, s)
    if token_valid is not None:
        tv = token_valid.bool()
        if tv.dim() == 3:
            tv = tv.unsqueeze(1)
        if tv.shape[0] != b or tuple(tv.shape[2:]) != (u, s) or tv.shape[1] not in (1, h):
            raise ValueError(f"token_valid must be (B, U, S) or (B, H, U, S), got {tuple(token_valid.shape)}")
        allowed = allowed & tv
    qf = query.float().reshape(b, h, g * q, d) * scale
    k = block_keys.float().reshape(b, h, u * s, d)
    # Hidden tokens' values are zeroed, not just weighted 0: an unfilled slot may hold NaN garbage.
    v = block_values.float().reshape(b, h, u * s, d).masked_fill(~allowed.reshape(b, h, u * s, 1), 0.0)
    ctx = (qf @ k.transpose(-1, -2)).masked_fill(~allowed.reshape(b, h, 1, u * s), float("-inf"))
    parts = [ctx]
    if new_keys is not None:
        if new_values is None or tuple(new_keys.shape) != (b, h, q, d) or new_values.shape != new_keys.shape:
            raise ValueError(f"new_keys and new_values must both be {(b, h, q, d)}")
        causal = torch.ones(q, q, dtype=torch.bool, device=query.device).tril()
        new = (qf @ new_keys.float().transpose(-1, -2)).view(b, h, g, q, q)
        parts.append(new.masked_fill(~causal, float("-inf")).view(b, h, g * q, q))
    p = _softmax_safe(torch.cat(parts, dim=-1))
    p_ctx = p[..., : u * s]
    out = p_ctx @ v
    if new_keys is not None:
        p_new = p[..., u * s :]
        out = out + p_new @ new_values.float()
        new_mass = p_new.sum(-1).view(b, h, g, q).mean(-1).reshape(b, hq)
    else:
        new_mass = torch.zeros(b, hq, device=query.device)
    block_mass = p_ctx.view(b, h, g, q, u, s).sum(-1).mean(3).reshape(b, hq, u)
    output = out.view(b, h, g, q, d).reshape(b, hq, q, d).to(query.dtype)
    return SparseAttentionOutput(output, block_mass, new_mass)


def _check_paged(query, k_pool, v_pool, pool_valid, table, lengths):
    if query.dim() != 3:
        raise ValueError(f"query must be (B, Hq, D) (one decode position), got {tuple(query.shape)}")
    if k_pool.dim() != 4 or k_pool.shape != v_pool.shape:
        raise ValueError(f"k_pool and v_pool must both be (P, H, S, D), got {tuple(k_pool.shape)}, {tuple(v_pool.shape)}")
    b, hq, d = query.shape
    p, h, s, dk = k_pool.shape
    if dk != d or hq % h:
        raise ValueError(f"query {tuple(query.shape)} does not match the pool {tuple(k_pool.shape)}")
    if tuple(pool_valid.shape) != (p, s) or pool_valid.dtype != torch.bool:
        raise ValueError(f"pool_valid must be a bool (P, S) = {(p, s)} tensor, got {pool_valid.dtype} {tuple(pool_valid.shape)}")
    if table.dim() != 3 or tuple(table.shape[:2]) != (b, h):
        raise ValueError(f"block_table must be (B, H, M) = ({b}, {h}, M), got {tuple(table.shape)}")
    if tuple(lengths.shape) != (b, h):
        raise ValueError(f"lengths must be (B, H) = {(b, h)}, got {tuple(lengths.shape)}")
    m = table.shape[2]
    if lengths.numel() and (int(lengths.min()) < 0 or int(lengths.max()) > m):
        raise ValueError(f"lengths must lie in [0, {m}]")
    used = torch.arange(m, device=table.device) < lengths.unsqueeze(-1)
    if bool(used.any()):
        ids = table[used]
        if int(ids.min()) < 0 or int(ids.max()) >= p:
            raise ValueError(f"block_table entries must lie in [0, {p}) (the pool's slots)")
    return b, hq, d, p, h, s, m


def paged_decode_attention_reference(
    query: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, pool_valid: torch.Tensor,
    block_table: torch.Tensor, lengths: torch.Tensor, *, scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of decode attention over a block table (see :func:`paged_decode_attention`).

    Gathers the table's blocks (the kernel reads them in place instead) and calls
    :func:`sparse_attention_reference`.  Returns ``(output (B, Hq, D), block_mass (B, Hq, M))``."""
    b, hq, d, p, h, s, m = _check_paged(query, k_pool, v_pool, pool_valid, block_table, lengths)
    used = torch.arange(m, device=block_table.device) < lengths.unsqueeze(-1)
    idx = torch.where(used, block_table.long(), 0)
    heads = torch.arange(h, device=idx.device).view(1, h, 1)
    keys = k_pool[idx, heads]  # (B, H, M, S, D)
    values = v_pool[idx, heads]
    valid = pool_valid[idx]  # (B, H, M, S)
    res = sparse_attention_reference(query.unsqueeze(2), keys, values, used, valid, scale=scale)
    return res.output.squeeze(2), res.block_mass


def paged_decode_attention(
    query: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, pool_valid: torch.Tensor,
    block_table: torch.Tensor, lengths: torch.Tensor, *, scale: float | None = None, backend: str = "auto",
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention (one query position) over blocks named by a block table, read in place.

    Args:
        query: ``(B, Hq, D)``.
        k_pool, v_pool: ``(P, H, S, D)`` block slots (any strides; e.g. a ``(U, B, H, S, D)`` buffer of
            fetched entries viewed as ``(U * B, H, S, D)``, slot ``u * B + b``).
        pool_valid: ``(P, S)`` bool, valid tokens of each slot (padding / unfilled tail are ``False``).
        block_table: ``(B, H, M)`` int, the slots each (row, KV head) attends; entries past
            ``lengths`` are ignored.
        lengths: ``(B, H)`` int, used entries per (row, KV head).
        scale: softmax scale, default ``D ** -0.5``.
        num_splits: Triton only: programs per (row, KV head), each over a contiguous range of entries
            (default: enough to fill the GPU).
        backend: ``"torch"``, ``"triton"`` or ``"auto"`` (compiled Triton for CUDA tensors when
            it imports, else torch).

    Returns:
        ``(output, block_mass)``: ``(B, Hq, D)`` in the query's dtype, and ``(B, Hq, M)`` float32 softmax
        mass per table entry (zeros past ``lengths``).  The new token must already be in the pool.
    """
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    if backend == "auto":
        from tiercache_kernels.triton_support import compiled_triton_usable

        backend = "triton" if query.is_cuda and compiled_triton_usable(query.device) else "torch"
    if backend == "torch":
        return paged_decode_attention_reference(query, k_pool, v_pool, pool_valid, block_table, lengths, scale=scale)
    from tiercache_kernels.block_attention import block_attention_triton

    _check_paged(query, k_pool, v_pool, pool_valid, block_table, lengths)
    return block_attention_triton(query, k_pool, v_pool, pool_valid, block_table, lengths, scale=scale,
                                  num_splits=num_splits)


def sparse_attention(
    query: torch.Tensor,
    block_keys: torch.Tensor,
    block_values: torch.Tensor,
    block_mask: torch.Tensor,
    token_valid: torch.Tensor | None = None,
    new_keys: torch.Tensor | None = None,
    new_values: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    backend: str = "auto",
) -> SparseAttentionOutput:
    """What sparse decode calls: :func:`sparse_attention_reference`'s contract (same arguments, same
    result), computed by the fastest implementation for the tensors' device.  ``backend``: ``"torch"``
    (the reference), or ``"auto"`` (the default: currently the reference on every device)."""
    if backend not in ("auto", "torch"):
        raise ValueError(f"backend must be 'auto' or 'torch', got {backend!r}")
    return sparse_attention_reference(query, block_keys, block_values, block_mask, token_valid, new_keys,
                                      new_values, scale=scale)
