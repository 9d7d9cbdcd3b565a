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
from typing import Any

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
        lse: ``(B, Hq, Q)`` float32 log-sum-exp of the scaled scores over everything attended (``-inf`` where
            nothing was), or ``None`` when not asked for (``page_table_attention(lse=True)``): what merges
            the results of disjoint parts of one attention exactly (:func:`~.page_table.merge_attention`).
    """

    output: torch.Tensor
    block_mass: torch.Tensor
    new_mass: torch.Tensor
    lse: torch.Tensor | None = None

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


def _check_sparse(query, block_keys, block_values, block_mask, token_valid, new_keys, new_values):
    """Validate :func:`sparse_attention_reference`'s arguments; returns ``(b, hq, q, d, h, u, s, tv)`` with
    ``tv`` the token validity as bool ``(B, 1 or H, U, S)`` (or ``None``).  Shape checks only (no host
    synchronisation)."""
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
    tv = None
    if token_valid is not None:
        tv = token_valid.bool()
        if tv.dim() == 3:
            tv = tv.unsqueeze(1)
        if tv.dim() != 4 or tv.shape[0] != b or tuple(tv.shape[2:]) != (u, s) or tv.shape[1] not in (1, h):
            raise ValueError(f"token_valid must be (B, U, S) or (B, H, U, S), got {tuple(token_valid.shape)}")
    if new_keys is not None or new_values is not None:
        if (new_keys is None or new_values is None or tuple(new_keys.shape) != (b, h, q, d)
                or new_values.shape != new_keys.shape):
            raise ValueError(f"new_keys and new_values must both be {(b, h, q, d)}")
    return b, hq, q, d, h, u, s, tv


def _new_token_scores(qf: torch.Tensor, new_keys: torch.Tensor, g: int) -> torch.Tensor:
    """``(B, H, G * Q, Q)`` scaled scores of the queries against the new tokens, causal (``-inf`` above
    the diagonal); ``qf`` is the scaled float32 query ``(B, H, G * Q, D)``."""
    b, h, gq, _ = qf.shape
    q = gq // g
    causal = torch.ones(q, q, dtype=torch.bool, device=qf.device).tril()
    new = (qf @ new_keys.float().transpose(-1, -2)).view(b, h, g, q, q)
    return new.masked_fill(~causal, float("-inf")).view(b, h, gq, q)


def add_new_tokens(out: torch.Tensor, new: torch.Tensor | None, inv: torch.Tensor, new_values: torch.Tensor | None,
                   g: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch paths' last step: ``out`` ``(B, H, G * Q, D)`` (the context's weighted values, already
    normalised by ``inv`` ``(B, H, G * Q)``) plus the new tokens' share, from their unnormalised weights
    ``new`` ``(B, H, G * Q, Q)`` (``None``: no new tokens).  Returns ``(out (B, H, G, Q, D) float32, new-token
    mass (B, Hq) averaged over query positions)``."""
    b, h, gq, d = out.shape
    q = gq // g
    if new is None:
        return out.view(b, h, g, q, d), torch.zeros(b, h * g, device=out.device)
    p_new = new * inv.unsqueeze(-1)
    out = out.view(b, h, g, q, d) + p_new.view(b, h, g, q, q) @ new_values.float().unsqueeze(2)
    return out, p_new.sum(-1).view(b, h, g, q).mean(-1).reshape(b, h * g)


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
    """Attention of ``query`` over the selected blocks and the new tokens (torch, float32).

    Args:
        query: ``(B, Hq, Q, D)``.
        block_keys, block_values: ``(B, H, U, S, D)``, the gathered blocks (e.g. the union to fetch),
            any strides; the fetched ``(U, B, H, S, D)`` buffers permuted are read without a copy
            (float32) or converted once (fp16 / bf16).
        block_mask: ``(B, H, U)`` bool, the blocks each (row, KV head) attends.
        token_valid: ``(B, U, S)`` or ``(B, H, U, S)`` bool; default all valid.
        new_keys, new_values: ``(B, H, Q, D)`` or ``None``: the new tokens (causal among themselves).
        scale: softmax scale, default ``D ** -0.5``.

    Computed per block, in the ``(U, B, H)`` batch order of the fetched buffers: scores
    ``(U, B, H, G*Q, S)``, one softmax over all blocks' tokens and the new tokens, then each block's
    ``p @ v`` summed over blocks.  Hidden tokens never reach the output: their scores are ``-inf``,
    blocks a head does not attend contribute nothing, and in blocks with some hidden tokens those
    tokens' values are replaced by zeros before ``p @ v`` (they may hold NaN).
    """
    b, hq, q, d, h, u, s, tv = _check_sparse(query, block_keys, block_values, block_mask, token_valid,
                                             new_keys, new_values)
    g = hq // h
    gq = g * q
    scale = d ** -0.5 if scale is None else scale
    dev = query.device
    mask = block_mask.bool()
    qf = query.float().reshape(b, h, gq, d) * scale
    # (U, B, H, S, D) views; contiguous when the blocks came from a (U, B, H, S, D) fetch buffer.
    k = block_keys.float().permute(2, 0, 1, 3, 4)
    v = block_values.float().permute(2, 0, 1, 3, 4)
    allowed = None  # (U, B, H, S) tokens attended, where not every token of every attended block is
    if tv is not None:
        allowed = (mask.unsqueeze(-1) & tv).permute(2, 0, 1, 3)
    ctx = torch.matmul(qf.unsqueeze(0), k.transpose(-1, -2))  # (U, B, H, G*Q, S)
    if allowed is not None:
        ctx.masked_fill_(~allowed.unsqueeze(3), float("-inf"))
    else:
        ctx.masked_fill_(~mask.permute(2, 0, 1)[..., None, None], float("-inf"))
    top = torch.full((b, h, gq), float("-inf"), device=dev)
    if ctx.numel():
        top = ctx.amax(dim=(0, 4))
    new = None
    if new_keys is not None:
        new = _new_token_scores(qf, new_keys, g)
        top = torch.maximum(top, new.amax(dim=-1))
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    ctx.sub_(top.unsqueeze(0).unsqueeze(-1)).exp_()  # unnormalised weights
    block_sum = ctx.sum(dim=-1)  # (U, B, H, G*Q)
    total = block_sum.sum(dim=0)
    if new is not None:
        new = torch.exp(new - top.unsqueeze(-1))
        total = total + new.sum(dim=-1)
    inv = 1.0 / total.clamp_min(torch.finfo(torch.float32).tiny)
    ctx.mul_(inv.unsqueeze(0).unsqueeze(-1))  # softmax weights
    per_block = torch.matmul(ctx, v)  # (U, B, H, G*Q, D)
    if allowed is not None:
        # Hidden tokens' values may be NaN and 0 * NaN = NaN: redo the blocks that hide some tokens
        # with those values zeroed (few: padding and the partial tail), and zero unattended blocks.
        partial = mask.permute(2, 0, 1) & ~allowed.all(dim=-1)
        if bool(partial.any()):
            idx = partial.nonzero(as_tuple=True)
            vs = v[idx].masked_fill(~allowed[idx].unsqueeze(-1), 0.0)
            per_block[idx] = torch.matmul(ctx[idx], vs)
    per_block = per_block.masked_fill(~mask.permute(2, 0, 1)[..., None, None], 0.0)
    out, new_mass = add_new_tokens(per_block.sum(dim=0), new, inv, new_values, g)
    block_mass = (block_sum * inv.unsqueeze(0)).view(u, b, h, g, q).mean(4).permute(1, 2, 3, 0).reshape(b, hq, u)
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
    num_splits: int | None = None,
) -> SparseAttentionOutput:
    """What sparse decode calls: :func:`sparse_attention_reference`'s contract (same arguments, same
    result up to float32 summation order), computed by the fastest implementation for the device.

    ``backend``: ``"torch"`` (the reference), ``"triton"`` (the block-table kernel; compiled on CUDA,
    interpreted on CPU under ``TRITON_INTERPRET=1``), or ``"auto"`` (the default: compiled Triton on
    CUDA when it is usable, the reference otherwise).  ``num_splits``: Triton only, programs per
    (row, KV head) (default: enough to fill the GPU).

    The Triton path reads the blocks in place: ``block_keys`` / ``block_values`` ``(B, H, U, S, D)``
    (any strides, e.g. the fetched ``(U, B, H, S, D)`` buffers permuted) become a per-row pool indexed
    by ``u``, ``block_mask`` becomes a block table (each (row, KV head)'s selected ``u`` in ascending
    order; built on the device, no host synchronisation), ``token_valid`` is the pool's validity, and
    the query positions of a group are the kernel's query rows.  The new tokens (causal) are one more
    partial softmax state computed with torch and merged with the kernel's splits.
    """
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    if backend == "auto":
        from tiercache_kernels.triton_support import compiled_triton_usable

        backend = "triton" if query.is_cuda and compiled_triton_usable(query.device) else "torch"
    if backend == "torch":
        return sparse_attention_reference(query, block_keys, block_values, block_mask, token_valid, new_keys,
                                          new_values, scale=scale)
    return _sparse_attention_triton(query, block_keys, block_values, block_mask, token_valid, new_keys,
                                    new_values, scale=scale, num_splits=num_splits)


def _sparse_attention_triton(query, block_keys, block_values, block_mask, token_valid, new_keys, new_values, *,
                             scale, num_splits) -> SparseAttentionOutput:
    from tiercache_kernels.block_attention import block_attention_partials

    b, hq, q, d, h, u, s, tv = _check_sparse(query, block_keys, block_values, block_mask, token_valid,
                                             new_keys, new_values)
    g = hq // h
    scale = d ** -0.5 if scale is None else float(scale)
    dev = query.device
    mask = block_mask.to(device=dev, dtype=torch.bool)
    # Block table: the selected u of each (row, KV head) first, ascending (a stable sort of ~mask).
    order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    lengths = mask.sum(dim=-1, dtype=torch.int32)
    if tv is None:
        tv = torch.ones(b, 1, u, s, dtype=torch.bool, device=dev)
    valid = tv[:, 0] if tv.shape[1] == 1 else tv.permute(0, 2, 1, 3)  # (B, U, S) or (B, U, H, S)
    # Query positions of a group are extra query rows: (B, Hq, Q, D) -> (B, Hq * Q, D), G' = G * Q.
    parts = block_attention_partials(
        query.reshape(b, hq * q, d), block_keys.permute(0, 2, 1, 3, 4), block_values.permute(0, 2, 1, 3, 4),
        valid, order, lengths, scale=scale, num_splits=num_splits,
    )
    out, mass, new_mass = merge_with_new_tokens(query, parts, new_keys, new_values, h, scale)  # table order
    # Table entry e of (row, KV head) is block order[e]: scatter back (a permutation per row and head).
    block_mass = torch.zeros_like(mass).scatter_(2, order.long().repeat_interleave(g, dim=1), mass)
    return SparseAttentionOutput(out, block_mass, new_mass)


def merge_with_new_tokens(query: torch.Tensor, parts: Any, new_keys: torch.Tensor | None,
                          new_values: torch.Tensor | None, kv_heads: int,
                          scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Triton kernels' last step: merge their per-split softmax states ``parts`` (``acc``, ``m``, ``l``
    ``(B, Hq * Q, K, ...)`` and per-entry ``lse``) with one more state for the new tokens (causal, computed
    here with torch).  Returns ``(output (B, Hq, Q, D) in the query's dtype, per-entry mass (B, Hq, M)
    averaged over query positions, new-token mass (B, Hq))``."""
    from tiercache_kernels.block_attention import entry_mass, merge_partials

    b, hq, q, d = query.shape
    g = hq // kv_heads
    acc, m_part, l_part = parts.acc, parts.m, parts.l
    if new_keys is not None:
        qf = query.float().reshape(b, kv_heads, g * q, d) * scale
        new = _new_token_scores(qf, new_keys, g)  # (B, H, G * Q, Q)
        top = new.amax(dim=-1)  # finite: position i always sees new token i
        e = torch.exp(new - top.unsqueeze(-1))
        acc_new = (e.view(b, kv_heads, g, q, q) @ new_values.float().unsqueeze(2)).reshape(b, hq * q, 1, d)
        acc = torch.cat((acc, acc_new), dim=2)
        m_part = torch.cat((m_part, top.reshape(b, hq * q, 1)), dim=2)
        l_part = torch.cat((l_part, e.sum(-1).reshape(b, hq * q, 1)), dim=2)
    out, lse_total, attended = merge_partials(acc, m_part, l_part)
    mass = entry_mass(parts.lse, lse_total, attended).view(b, hq, q, -1).mean(dim=2)
    if new_keys is not None:
        new_mass = torch.where(attended, torch.exp(m_part[..., -1] - torch.where(attended, lse_total, 0.0))
                               * l_part[..., -1], 0.0)
        new_mass = new_mass.view(b, hq, q).mean(dim=2)
    else:
        new_mass = torch.zeros(b, hq, device=query.device)
    return out.view(b, hq, q, d).to(query.dtype), mass, new_mass
