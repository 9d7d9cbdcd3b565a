"""Per-step block selection for sparse decode: score every block against the query, keep the sink and
recent blocks, fill a token budget with the best-scoring blocks, per row and KV head.

Everything is vectorised over blocks, KV heads and batch rows (a sort and a cumulative sum; no Python
loop per block).  Shapes: ``B`` rows, ``H`` KV heads, ``Hq = G * H`` query heads (GQA groups of ``G``;
query head ``h`` reads KV head ``h // G`` as in transformers' ``repeat_kv``), ``N`` blocks, ``D`` head
dim, ``Q`` query positions (1 in decode).

Rules (see docs/sparse.md):

- **Score** of block ``j`` for one query head: ``sum_i max(q_i lo_ij, q_i hi_ij)`` - an upper bound of
  ``q . k`` for every key of the block (see :mod:`.digests`).  The softmax scale is positive and common
  to all blocks, so it is left out.
- **GQA**: a KV head's score is the *max* over its group's query heads (and query positions), so it is
  still an upper bound of every head's q·k on that block: a block that any head of the group needs
  ranks high.  ``"sum"`` (the group's total) is available for comparison; it is not a bound (negative
  terms pull it down) and can drown one head's sharp peak in its siblings' indifference.
- **Forced blocks**: blocks holding any of a row's first ``sink`` valid tokens or its last ``recent``
  valid tokens are always selected.
- **Budget** (tokens besides the new ones): an ``int``, or a ``float`` in (0, 1] = that fraction of the
  row's own valid tokens (rounded up).  A block costs its valid tokens.  Forced blocks are paid first;
  the rest go in descending score until the next block would exceed the budget.  If the forced blocks
  alone exceed it, exactly the forced blocks are selected.  A budget >= the row's context selects every
  block holding a valid token.
- **Padding**: blocks without valid tokens are never selected; padded tokens inside a selected block
  are masked at attention time (``token_valid``).
- **Pages** (``pages_per_block > 1``): the digests may be kept per *page*, a fixed fraction of the
  cache's storage block.  Then every rule above applies to pages (scores, forced pages, budget, cost);
  a storage block is fetched when any of its pages is selected, and attention is masked to the
  selected pages (:meth:`BlockSelection.token_mask`).  Tokens attended stay within the budget; bytes
  fetched grow with the number of blocks touched.
- **Score** variants (``SelectionConfig.score``): ``"bound"`` (Quest), or ``"bound+landmark"``:
  ``(1 - w) * bound + w * q . mean_key`` per query head before the GQA max (``w = landmark_weight``,
  the mean key being the page's landmark); not a bound any more, but it ranks pages far better at
  small budgets (docs/sparse.md has the measurements behind the choice).
- **Rank** (``SelectionConfig.rank``): with ``"mass"`` (the default for ``"bound+landmark"``, the
  cache's rule) each query head's page scores become estimated log shares of that head's softmax
  (normalised by the landmarks' logsumexp) before the GQA max, so the group compares shares of
  attention, not raw logits (:func:`score_blocks_mass`).  The budget stays per KV head: every head of
  a layer attends at most ``budget`` tokens (besides forced pages in excess), so a layer attends at
  most ``H * budget`` per row.
- **Ties**: pages of exactly equal score rank in an unspecified order (each ``topk`` breaks a tie at the
  budget boundary its own way); forced pages rank above every scored page, ``+inf`` scores included,
  and NaN or ``-inf`` scores of non-empty pages rank below every other non-empty page.

Cost (one layer of a decode step, ``select``): the scores are three float32 matmuls over float32
digests (``relu(q) hi``, ``min(q, 0) lo``, ``q mean``), or over float16 digests (the cache's default)
an upcast and one float32 matmul per (row, KV head) (:func:`_products16`), and a dozen
elementwise passes in the order of the rule as written (bit for bit with float32 digests:
test_selection_equivalence.py); what depends only on
the page counts is derived once per step (:func:`_page_terms`), and the per-call buffers that do not
escape (query rows, ranking keys, the upcast scratch) are per-thread and reused.  With the cache's ``sink`` and
``recent`` > 0 and only left padding, every partial page is forced, so every other page costs the same
and the rule is "the forced pages plus the best ``m[row]`` others": one unordered ``topk`` over keys
padded per row (:func:`_uniform_top`), no sort and no cost walk; otherwise :func:`_take_top` walks the
costs of the few ranks that can matter.  At SmolLM2's 8K x batch 4 the matmuls alone read 9 MB of
digests per layer (4.5 MB in float16) and take about two thirds of the time
(``benchmarks/selection_micro.py``).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Literal

import torch

from .digests import KeyDigests

__all__ = [
    "BlockSelection",
    "SelectionConfig",
    "block_table",
    "forced_blocks",
    "score_blocks",
    "score_blocks_landmark",
    "score_blocks_mass",
    "score_blocks_reference",
    "select",
    "select_blocks",
    "token_budget",
]

_LOW = torch.finfo(torch.float32).min  # the ranking key of NaN and -inf scores of non-empty pages
_HIGH = torch.finfo(torch.float32).max  # ... of +inf scores (forced pages rank above them, at +inf)

GqaReduce = Literal["max", "sum"]
ScoreRule = Literal["bound", "bound+landmark"]
Rank = Literal["auto", "score", "mass"]
DigestStorage = Literal["float16", "float32"]


@dataclass(frozen=True)
class SelectionConfig:
    """How blocks are chosen per decode step.

    Attributes:
        budget: tokens attended per row and KV head besides the new ones: ``int >= 0``, or ``float`` in
            (0, 1] as a fraction of the row's valid context.
        sink: leading valid tokens always attended (attention sinks).
        recent: trailing valid tokens always attended (the local window).
        gqa: ``"max"`` (default; an upper bound for every head of the group) or ``"sum"``.
        score: ``"bound"`` (default here: the Quest upper bound) or ``"bound+landmark"`` (the bound
            blended with ``q . mean key``; needs digests with key sums).
        landmark_weight: weight of ``q . mean key`` in ``"bound+landmark"``, in [0, 1].
        rank: how a KV head's pages are ranked.  ``"score"``: by the GQA reduction of the raw scores.
            ``"mass"``: by their *estimated share of attention* (:func:`score_blocks_mass`): each query
            head's scores are turned into log softmax shares, normalised by the landmarks' estimate of
            that head's softmax denominator, before the group's max; needs ``gqa="max"`` and digests
            with key sums.  ``"auto"`` (default): ``"mass"`` for ``score="bound+landmark"`` with
            ``gqa="max"`` (the cache's rule), ``"score"`` otherwise.
        scale: softmax scale of ``q . k`` used by ``rank="mass"``; ``None``: ``head_dim ** -0.5``.
        digests: storage of the key digests a cache builds for this rule (:class:`.KeyDigests`):
            ``"float16"`` (default: bounds rounded outward, so still upper bounds; half the bytes and
            a faster scoring, see :func:`_products16`) or ``"float32"`` (exact min / max).  ``select``
            itself scores whatever digests it is given.
    """

    budget: int | float
    sink: int = 4
    recent: int = 64
    gqa: GqaReduce = "max"
    score: ScoreRule = "bound"
    landmark_weight: float = 0.5
    rank: Rank = "auto"
    scale: float | None = None
    digests: DigestStorage = "float16"

    def __post_init__(self) -> None:
        b = self.budget
        if isinstance(b, bool) or not isinstance(b, (int, float)):
            raise TypeError(f"budget must be an int (tokens) or a float (fraction), got {type(b).__name__}")
        if isinstance(b, int) and b < 0:
            raise ValueError(f"a token budget must be >= 0, got {b}")
        if isinstance(b, float) and not (0.0 < b <= 1.0):
            raise ValueError(f"a fractional budget must be in (0, 1], got {b}")
        for name in ("sink", "recent"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        if self.gqa not in ("max", "sum"):
            raise ValueError(f"gqa must be 'max' or 'sum', got {self.gqa!r}")
        if self.score not in ("bound", "bound+landmark"):
            raise ValueError(f"score must be 'bound' or 'bound+landmark', got {self.score!r}")
        w = self.landmark_weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0.0 <= float(w) <= 1.0:
            raise ValueError(f"landmark_weight must be a number in [0, 1], got {w!r}")
        if self.rank not in ("auto", "score", "mass"):
            raise ValueError(f"rank must be 'auto', 'score' or 'mass', got {self.rank!r}")
        if self.rank == "auto":
            auto = "mass" if self.score == "bound+landmark" and self.gqa == "max" else "score"
            object.__setattr__(self, "rank", auto)
        if self.rank == "mass" and self.gqa != "max":
            raise ValueError("rank='mass' needs gqa='max' (a sum of log shares is no share)")
        if self.digests not in ("float16", "float32"):
            raise ValueError(f"digests must be 'float16' or 'float32', got {self.digests!r}")
        c = self.scale
        if c is not None and (isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) or c <= 0):
            raise ValueError(f"scale must be a positive number or None, got {c!r}")


def _check_digests(query: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, count: torch.Tensor) -> tuple[int, ...]:
    return _check_shapes(query, tuple(lo.shape), tuple(hi.shape), count)


def _check_kept(query: torch.Tensor, digests: KeyDigests) -> tuple[int, ...]:
    """:func:`_check_digests` for a :class:`KeyDigests` (from its stored shapes, no views made)."""
    shape = digests.shape
    return _check_shapes(query, shape, shape, digests.count)


def _check_shapes(query: torch.Tensor, lo: tuple[int, ...], hi: tuple[int, ...], count: torch.Tensor) -> tuple[int, ...]:
    if query.dim() != 4:
        raise ValueError(f"query must be (batch, q_heads, q_len, head_dim), got shape {tuple(query.shape)}")
    if len(lo) != 4 or lo != hi:
        raise ValueError(f"lo and hi must both be (batch, kv_heads, n_blocks, head_dim), got {lo} and {hi}")
    b, hq, q, d = query.shape
    _, h, n, dk = lo
    if lo[0] != b or dk != d:
        raise ValueError(f"query {tuple(query.shape)} does not match digests {lo}")
    if hq % h:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({h})")
    if tuple(count.shape) != (b, n):
        raise ValueError(f"count must be (batch, n_blocks) = {(b, n)}, got {tuple(count.shape)}")
    return b, h, hq // h, q, n, d


def score_blocks_reference(query: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, count: torch.Tensor,
                           gqa: GqaReduce = "max") -> torch.Tensor:
    """Torch reference of block scoring: ``(B, H, N)`` float32 upper bounds, ``-inf`` where ``count == 0``.

    ``max(q lo, q hi)`` per dimension equals ``relu(q) hi + min(q, 0) lo``, so the score is two matmuls."""
    b, h, g, q, n, d = _check_digests(query, lo, hi, count)
    qf = query.float().reshape(b, h, g * q, d)
    s = qf.clamp(min=0) @ hi.float().transpose(-1, -2) + qf.clamp(max=0) @ lo.float().transpose(-1, -2)
    agg = s.amax(dim=2) if gqa == "max" else s.sum(dim=2)
    return agg.masked_fill((count == 0).unsqueeze(1), float("-inf"))


def score_blocks(query: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, count: torch.Tensor,
                 gqa: GqaReduce = "max", *, backend: str = "auto") -> torch.Tensor:
    """Block scores ``(B, H, N)`` float32 (see :func:`score_blocks_reference`).

    ``backend``: ``"torch"``, ``"triton"`` (``tiercache_kernels.block_scores``; needs triton, and CUDA
    tensors unless triton runs interpreted, see ``tiercache_kernels.triton_support``), or ``"auto"``:
    compiled Triton for CUDA tensors when triton imports, else torch."""
    if gqa not in ("max", "sum"):
        raise ValueError(f"gqa must be 'max' or 'sum', got {gqa!r}")
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    if backend == "auto":
        backend = "triton" if query.is_cuda and _compiled_triton_usable(query.device) else "torch"
    if backend == "torch":
        return score_blocks_reference(query, lo, hi, count, gqa)
    from tiercache_kernels.block_scores import block_scores_triton

    _check_digests(query, lo, hi, count)
    return block_scores_triton(query, lo, hi, count, gqa)


def _query_head_scores(query: torch.Tensor, digests: KeyDigests, score: ScoreRule, weight: float,
                       landmark: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(B, H, G * Q, N)`` float32 scores of every page per query head (and query position), before
    the GQA reduction (empty pages are not masked here), and ``q . mean key`` of the same shape when
    ``landmark`` or the score needs it (else ``None``).  Both are fresh tensors (callers may modify
    them in place).

    The query heads of a group share their KV head's digests through one batched matmul per digest
    (``(G * Q, D) @ (D, N)`` per row and KV head, no ``repeat_kv``); the digests are read in the
    transposed layout they are stored in (:meth:`KeyDigests.transposed`), so no transpose or copy is
    made per step."""
    lo_t, hi_t, mean_t = digests.transposed()
    b, h, g, q, n, d = _check_kept(query, digests)
    qf = query.float().reshape(b, h, g * q, d)
    s = torch.matmul(qf.clamp(min=0), hi_t.float())
    s += torch.matmul(qf.clamp(max=0), lo_t.float())
    lm = None
    if landmark or score == "bound+landmark":
        if mean_t is None:
            raise ValueError("these digests were built without key sums: no landmarks")
        lm = torch.matmul(qf, mean_t.float())
    if score == "bound+landmark":
        s.mul_(1.0 - weight)
        s += weight * lm
    return s, lm


def score_blocks_landmark(query: torch.Tensor, digests: KeyDigests, weight: float,
                          gqa: GqaReduce = "max") -> torch.Tensor:
    """``(B, H, N)`` float32: per query head ``(1 - weight) * bound + weight * q . mean_key``, reduced over
    the group like :func:`score_blocks_reference`; ``-inf`` for empty blocks."""
    s, _ = _query_head_scores(query, digests, "bound+landmark", weight)
    agg = s.amax(dim=2) if gqa == "max" else s.sum(dim=2)
    return agg.masked_fill((digests.count == 0).unsqueeze(1), float("-inf"))


def score_blocks_mass(query: torch.Tensor, digests: KeyDigests, score: ScoreRule = "bound+landmark",
                      weight: float = 0.5, scale: float | None = None) -> torch.Tensor:
    """``(B, H, N)`` float32 *estimated log attention mass* of every page, per KV head.

    Per query head (and query position): ``z = scale * s + log(count)`` with ``s`` the page score of
    ``score``, minus an estimate of the head's softmax normaliser, the logsumexp over the row's
    non-empty pages of ``scale * q . mean_key + log(count)`` (the landmarks'; a lower bound of the true
    normaliser by Jensen's inequality); then the max over the group's query heads.  Within one query
    head this ranks pages exactly as ``s``; across the query heads of a group it compares shares of
    each head's softmax instead of raw ``q . k``, so a head whose attention is spread over many pages is
    not outranked by a sibling with larger but irrelevant logits.  ``-inf`` for empty pages.  Needs
    digests with key sums (landmarks)."""
    b, h, g, q, n, d = _check_kept(query, digests)
    empty = (digests.count == 0).view(b, 1, 1, n)
    logc = digests.count.float().clamp_(min=1).log_().view(b, 1, 1, n)
    qf = query.float().reshape(b, h, g * q, d)
    z = _mass_scores(qf, digests, score, weight, scale, logc.masked_fill(empty, float("-inf")))
    return z.masked_fill_(empty.view(b, 1, n), float("-inf"))  # also for a query that is not finite


def _mass_scores(qf: torch.Tensor, digests: KeyDigests, score: ScoreRule, weight: float, scale: float | None,
                 logc_or_empty: torch.Tensor) -> torch.Tensor:
    """:func:`score_blocks_mass` of the grouped query ``qf`` ``(B, H, G * Q, D)`` float32 against
    ``digests``, with the count term given: ``logc_or_empty`` ``(B, 1, 1, N)`` float32, ``log(max(count,
    1))`` and ``-inf`` where ``count == 0`` (only read).  Empty pages score ``-inf`` for a finite query
    (their digests are zeros); a query with an infinite or NaN entry may leave NaN there instead
    (selection never takes an empty page whatever its score).

    Float32 digests: the same float32 operations in the same order as the rule written out (``s =
    relu(q) hi + min(q, 0) lo``, blended ``(1 - w) s + w lm``, ``z = scale s + logc - logsumexp(scale lm
    + logc)``), so the scores are those of :func:`_query_head_scores` and the plain expressions bit for
    bit; what is saved is temporaries and passes: in-place updates of the matmuls' outputs, the empty
    pages' ``-inf`` carried by ``logc_or_empty`` instead of masked fills.  Float16 digests: the same
    rule with the blend folded into the query (:func:`_products16`), float32 all the same, within
    float32 rounding of it."""
    if not digests.has_landmarks:
        raise ValueError("these digests were built without key sums: no landmarks")
    if scale is None:
        scale = qf.shape[-1] ** -0.5
    scale = float(scale)
    b, h, gq, d = qf.shape
    n = digests.n_blocks
    blend = score == "bound+landmark"
    if digests.dtype != torch.float32:
        both = _products16(qf, digests.buffer(), n, weight if blend else 0.0)  # (B, H, 2 * G * Q, n)
        both.mul_(scale).add_(logc_or_empty)  # s and lm scaled and shifted in one pass each
        s, zn = both[:, :, :gq], both[:, :, gq:]
        lse = zn.logsumexp(dim=-1, keepdim=True).clamp_(min=-1e30)  # a row without pages: no NaN
        return s.sub_(lse).amax(dim=2)
    lo_t, hi_t, mean_t = digests.transposed()
    # bmm on (B * H)-batched views: what matmul runs, without its reshapes (the digests' views fold).
    q3 = qf.reshape(b * h, gq, d)
    # The landmark matmul first and its terms at once, while its output is still in cache (each matmul
    # streams megabytes of digests through it).
    lm = torch.bmm(q3, mean_t.reshape(b * h, d, n)).view(b, h, gq, n)
    wlm = weight * lm if blend else None
    zn = lm.mul_(scale).add_(logc_or_empty)  # -inf on empty pages: left out of the normaliser
    lse = zn.logsumexp(dim=-1, keepdim=True).clamp_(min=-1e30)  # a row without pages: no NaN
    # s = relu(q) hi + min(q, 0) lo.  Not baddbmm: MKL's beta = 1 epilogue gives the same bits here,
    # but whether it adds once or accumulates into s is the kernel's choice, per CPU and shape.
    s = torch.bmm(q3.clamp(min=0), hi_t.reshape(b * h, d, n)).view(b, h, gq, n)
    s += torch.bmm(q3.clamp(max=0), lo_t.reshape(b * h, d, n)).view(b, h, gq, n)
    if wlm is not None:
        s.mul_(1.0 - weight)
        s += wlm
    # logc_or_empty: an empty page's digests are zeros, so for a finite query its z is -inf already
    z = s.mul_(scale).add_(logc_or_empty).sub_(lse)
    return z.amax(dim=2)


SCRATCH_BYTES = 1 << 20  # float32 digests upcast at a time by _products16 (see there; docs/sparse.md)
_scratch = threading.local()


def _scratch_buffer(numel: int) -> torch.Tensor:
    """A float32 buffer of at least ``numel`` elements, one per thread, reused across calls (so that
    the upcast writes into memory that is already cached and mapped)."""
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < numel:
        buf = _scratch.buf = torch.empty(numel, dtype=torch.float32)
    return buf


def _query_rows(qf: torch.Tensor, r: int, weight: float) -> torch.Tensor:
    """``(B * H, 2 * G * Q, r)`` float32 query rows of :func:`_products16` for the grouped query ``qf``
    ``(B, H, G * Q, D)``: ``[(1 - w) min(q, 0), (1 - w) relu(q), w q]`` then ``[0, 0, q]``.

    Written into a per-thread buffer reused across calls (only read by the matmuls of the caller, before
    the next call on this thread): its zero blocks are zeroed once, when it is made, and each call writes
    the four query blocks in place (the same float32 operations as building it afresh: ``clamp`` then
    ``mul``)."""
    b, h, gq, d = qf.shape
    bh = b * h
    shape = (bh, 2 * gq, r)
    qe = getattr(_scratch, "qe", None)
    if qe is None or tuple(qe.shape) != shape or qe.device != qf.device:
        qe = _scratch.qe = qf.new_zeros(shape)
    q3 = qf.reshape(bh, gq, d)
    lo_rows, hi_rows = qe[:, :gq, :d], qe[:, :gq, d : 2 * d]
    torch.clamp(q3, max=0, out=lo_rows).mul_(1.0 - weight)
    torch.clamp(q3, min=0, out=hi_rows).mul_(1.0 - weight)
    torch.mul(q3, weight, out=qe[:, :gq, 2 * d :])
    qe[:, gq:, 2 * d :] = q3
    return qe


def _products16(qf: torch.Tensor, buffer: torch.Tensor, n: int, weight: float) -> torch.Tensor:
    """``(B, H, 2 * G * Q, n)`` float32 (fresh): ``s`` then ``lm`` along the third dimension, ``s = (1 - w) *
    (relu(q) hi + min(q, 0) lo) + w * q . mean`` and ``lm = q . mean`` of the grouped query ``qf``
    ``(B, H, G * Q, D)`` float32 against the first ``n`` pages of 16-bit digests ``buffer`` ``(B, H, 3D,
    capacity)`` (:meth:`KeyDigests.buffer`: rows lo, hi, mean; columns past ``n`` are never used).

    CPU BLAS has no float16 matmul with a float32 result (torch's returns float16, whose 11-bit
    mantissa would tie pages), so the digests are upcast to float32 a slab at a time into a reused
    scratch buffer (already mapped and mostly cached), and one float32
    matmul per slab reads all three digests with the query rows ``[(1 - w) min(q, 0), (1 - w) relu(q),
    w q]`` (``s``) and ``[0, 0, q]`` (``lm``) (:func:`_query_rows`): the 16-bit digests are read from
    memory once, the float32 copy from cache.  A slab is one whole (row, KV head) buffer, spare capacity
    included, so every upcast is one contiguous copy (a strided one of just the ``n`` columns runs at a
    fraction of the speed); a (row, KV head) larger than :data:`SCRATCH_BYTES` (very long contexts) goes by
    slabs of rows of the digests, the matmul accumulating over them.  Each whole-(row, KV head) slab's
    matmul is the one of the whole layer restricted to it (the same float32 products bit for bit).  On
    CUDA the upcast of the whole layer is one kernel (no slabs)."""
    b, h, gq, d = qf.shape
    r, cap = buffer.shape[2], buffer.shape[3]
    bh = b * h
    qe = _query_rows(qf, r, weight)
    st = buffer.reshape(bh, r, cap)  # a view: B and H are the storage's outer dimensions
    out = torch.empty(bh, 2 * gq, n, dtype=torch.float32, device=qf.device)
    if qf.is_cuda or n == 0:
        torch.bmm(qe, st[..., :n].float(), out=out)
    elif r * cap * 4 <= SCRATCH_BYTES:
        # One (row, KV head) per slab, 2-D matmuls on one scratch view (the same gemm as a batched one over
        # several, bit for bit): the smallest scratch, so its upcast copy is still in L1 / L2 when the matmul
        # reads it (measured against slabs of up to SCRATCH_BYTES: 5-9 % less per call at 2K-4K x batch 1 on
        # cold caches, docs/sparse.md "Fixed per-layer cost at small contexts").
        sc = _scratch_buffer(r * cap)[: r * cap].view(r, cap)
        scn = sc[:, :n]
        for src, q_part, o_part in zip(st.unbind(0), qe.unbind(0), out.unbind(0)):
            sc.copy_(src)
            torch.mm(q_part, scn, out=o_part)
    else:  # slabs of digest rows of one (row, KV head), accumulated
        per = max(1, SCRATCH_BYTES // (4 * cap))
        scratch = _scratch_buffer(per * cap)
        for i in range(bh):
            for k0 in range(0, r, per):
                k1 = min(r, k0 + per)
                sc = scratch[: (k1 - k0) * cap].view(k1 - k0, cap)
                sc.copy_(st[i, k0:k1])
                if k0 == 0:
                    torch.mm(qe[i, :, k0:k1], sc[:, :n], out=out[i])
                else:
                    out[i].addmm_(qe[i, :, k0:k1], sc[:, :n])
    return out.view(b, h, 2 * gq, n)


def _compiled_triton_usable(device: torch.device) -> bool:
    from tiercache_kernels.triton_support import compiled_triton_usable

    return compiled_triton_usable(device)


def token_budget(count: torch.Tensor, budget: int | float) -> torch.Tensor:
    """``(B,)`` int64 tokens each row may attend: ``budget`` itself, or ``ceil(budget * row's valid
    tokens)`` for a fraction."""
    n_valid = count.sum(dim=1)
    if isinstance(budget, float):
        # Round in float64 then up; a tiny epsilon keeps e.g. 0.25 * 400 from becoming 101.
        return torch.ceil(n_valid.double() * budget - 1e-9).clamp(min=0).long()
    return torch.full_like(n_valid, int(budget))


def forced_blocks(count: torch.Tensor, sink: int, recent: int) -> torch.Tensor:
    """``(B, N)`` bool: blocks holding one of the row's first ``sink`` or last ``recent`` valid tokens.

    Block ``j`` of a row holds the valid tokens ranked ``[start_j, end_j)`` (ranks count valid tokens
    only, so left padding shifts nothing)."""
    end = count.cumsum(dim=1)
    start = end - count
    total = end[:, -1:] if end.shape[1] else end
    has = count > 0
    return has & ((start < sink) | (end > total - recent))


def select_blocks(scores: torch.Tensor, count: torch.Tensor, budget: torch.Tensor,
                  forced: torch.Tensor) -> torch.Tensor:
    """``(B, H, N)`` bool selection per row and KV head.

    Args:
        scores: ``(B, H, N)`` block scores (``-inf`` or anything where ``count == 0``).
        count: ``(B, N)`` valid tokens per block (a block's cost).
        budget: ``(B,)`` tokens per row and KV head.
        forced: ``(B, N)`` blocks always selected (for every head).

    The blocks are ranked by score (forced ones first), and the longest prefix of the ranking whose
    cost fits ``max(budget, forced cost)`` is taken (see :func:`_take_top` for how without a full
    sort).  Equal scores rank in an unspecified order."""
    has = count > 0
    forced = forced & has
    limit = torch.maximum(budget.to(count.dtype), (count * forced).sum(dim=-1))
    head, k = _ranking_bounds(count, has, limit)
    fixed, fixed_key = _fixed_ranks(has, forced)
    return _take_top(scores, count, fixed, fixed_key, limit, head, k)


def _fixed_ranks(has: torch.Tensor, forced: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fixed, fixed_key)``, both ``(B, 1, N)``: the pages ranked by rule rather than by score (forced
    ones, ``forced`` within ``has``, and empty ones) and their ranking key (``+inf`` / ``-inf``)."""
    b, n = has.shape
    fixed = (forced | ~has).view(b, 1, n)
    key = torch.full((b, 1, n), float("-inf"), device=has.device).masked_fill_(forced.view(b, 1, n), float("inf"))
    return fixed, key


def _ranking_bounds(count: torch.Tensor, has: torch.Tensor, limit: torch.Tensor) -> tuple[int, int]:
    """``(head, k)``: in every row the first ``head`` blocks of the ranking fit the limit whatever they
    are, and no prefix longer than ``k`` does.  A block costs at most ``c``, the row's largest count, so
    any ``limit // c`` blocks fit; a prefix within the limit holds at most ``limit // c`` blocks of ``c``
    tokens plus the row's smaller blocks (the partial last page, left-padded first pages)."""
    n = count.shape[-1]
    if n == 0 or count.shape[0] == 0:
        return 0, 0
    big = count.amax(dim=-1).clamp(min=1)
    fits = limit // big
    small = (has & (count < big.unsqueeze(-1))).sum(dim=-1)
    bounds = torch.stack((fits.min(), torch.minimum(fits + small, has.sum(dim=-1)).max())).tolist()
    k = max(1, min(n, bounds[1]))
    return max(0, min(k, bounds[0])), k


def _take_top(scores: torch.Tensor, count: torch.Tensor, fixed: torch.Tensor, fixed_key: torch.Tensor,
              limit: torch.Tensor, head: int, k: int) -> torch.Tensor:
    """The selection rule of :func:`select_blocks` given its terms (``fixed``/``fixed_key`` from
    :func:`_fixed_ranks`, ``limit`` ``(B,)``, ``head``/``k`` from :func:`_ranking_bounds`).

    Only what can matter is ordered: an unordered ``topk`` of ``k`` finds the blocks that may fit; its
    first ``head`` ranks fit whatever their order, so only the ``k - head`` lowest of the ``k`` (a
    handful: the row's partial pages) are sorted and walked with the running cost."""
    b, h, n = scores.shape
    if n == 0:
        return torch.zeros(b, h, n, dtype=torch.bool, device=scores.device)
    # NaN ranks last; non-empty blocks stay above empty ones even at -inf (empty blocks cost 0 and are
    # never taken, so this changes no choice, only keeps them out of the head of the ranking), and below
    # forced ones even at +inf (so that the forced blocks are the head of the ranking).
    key = torch.nan_to_num(scores.float(), nan=_LOW, posinf=_HIGH, neginf=_LOW)
    key = torch.where(fixed, fixed_key, key)
    vals, top = torch.topk(key, k, dim=-1, largest=True, sorted=False)  # (B, H, k)
    cost = count.unsqueeze(1).expand(b, h, n).gather(-1, top)
    take = cost > 0
    tail = k - head
    if tail:
        low = torch.topk(vals, tail, dim=-1, largest=False, sorted=True).indices.flip(-1)  # ranks head..k-1
        low_cost = cost.gather(-1, low)
        spent = cost.sum(dim=-1, keepdim=True) - low_cost.sum(dim=-1, keepdim=True)  # the first `head` ranks
        fit = (low_cost.cumsum(dim=-1) + spent <= limit.view(b, 1, 1)) & (low_cost > 0)
        take.scatter_(-1, low, fit)
    return torch.zeros(b, h, n, dtype=torch.bool, device=scores.device).scatter_(-1, top, take)


@dataclass(frozen=True)
class _PageTerms:
    """What a selection derives from the page counts and the config alone.  Every layer of a decode
    step has the same counts, so :func:`_page_terms` computes these once per step, not per layer.
    Shared between calls: never modified."""

    logc_or_empty: torch.Tensor  # (B, 1, 1, N) float32, logc, -inf where count == 0
    has: torch.Tensor  # (B, N) bool
    forced: torch.Tensor  # (B, N) bool, forced pages holding tokens
    fixed: torch.Tensor  # (B, 1, N) bool, forced or empty: ranked by rule, not by score
    fixed_key: torch.Tensor  # (B, 1, N) float32, their ranking key: +inf forced, -inf empty
    budget: torch.Tensor  # (B,) int64
    limit: torch.Tensor  # (B,) int64, max(budget, forced cost)
    head: int
    k: int
    # Uniform costs (see _uniform_take): every row's pages that are neither forced nor empty cost the
    # same, so a row takes its forced pages and the best ``m[b] - forced`` others.  Then ``take`` is the
    # largest ``m`` and ``fill`` ``(B, 1, E)`` float32 the ranking keys appended to every row: ``take -
    # m[b]`` of ``+inf`` (they fill the row's surplus of the top ``take``), then ``-inf``; else ``None``.
    take: int
    fill: torch.Tensor | None
    width: int  # pages rounded up to whole storage blocks (the mask's page columns before ``fill``)
    each: int | None = None  # uniform costs and every row takes ``take`` pages: each (row, head) selects ``take``


_last_terms: tuple | None = None  # (key, count copy, _PageTerms): the last step's, reused while counts match


def _page_terms(count: torch.Tensor, config: SelectionConfig, pages_per_block: int = 1) -> _PageTerms:
    global _last_terms
    key = (type(config.budget), config.budget, config.sink, config.recent, pages_per_block, count.device, count.dtype)
    last = _last_terms  # one read: another thread may replace it, never modify it
    if last is not None and last[0] == key and last[1].shape == count.shape and torch.equal(last[1], count):
        return last[2]
    b, n = count.shape
    has = count > 0
    budget = token_budget(count, config.budget)
    forced = forced_blocks(count, config.sink, config.recent)  # within has
    limit = torch.maximum(budget.to(count.dtype), (count * forced).sum(dim=-1))
    head, k = _ranking_bounds(count, has, limit)
    logc_or_empty = count.float().clamp_(min=1).log_().masked_fill_(~has, float("-inf")).view(b, 1, 1, n)
    fixed, fixed_key = _fixed_ranks(has, forced)
    width = -(-n // pages_per_block) * pages_per_block
    take, fill, each = _uniform_take(count, has, forced, limit, width - n)
    terms = _PageTerms(logc_or_empty, has, forced, fixed, fixed_key, budget, limit, head, k, take, fill, width, each)
    _last_terms = (key, count.clone(), terms)
    return terms


def _uniform_take(count: torch.Tensor, has: torch.Tensor, forced: torch.Tensor, limit: torch.Tensor,
                  pad: int) -> tuple[int, torch.Tensor | None, int | None]:
    """``(take, fill, each)`` of :class:`_PageTerms` when every row's free pages (holding tokens, not forced)
    cost the same (the rule with the cache's ``sink`` and ``recent`` > 0 and left padding only: a
    partial page is the first or the last valid one, and both are forced); ``(0, None, None)`` otherwise.
    ``each``: ``take`` when every row takes ``take`` pages (then every (row, KV head) selects exactly that
    many), else ``None``.

    Then the rule's longest fitting prefix of a row's ranking is its ``f`` forced pages and the best
    ``m - f`` free ones, ``m = f + min(free, (limit - forced cost) // c)``; ``fill`` starts with ``pad``
    ``-inf`` columns (the mask's columns up to whole storage blocks, never taken)."""
    b, n = count.shape
    free = has & ~forced
    big = torch.iinfo(count.dtype).max
    cost_hi = torch.where(free, count, 0).amax(dim=-1) if n else torch.zeros(b, dtype=count.dtype)
    cost_lo = torch.where(free, count, big).amin(dim=-1) if n else torch.zeros(b, dtype=count.dtype)
    n_free = free.sum(dim=-1)
    if bool(((cost_hi != cost_lo) & (n_free > 0)).any()):
        return 0, None, None
    spare = limit - (count * forced).sum(dim=-1)  # >= 0: the limit covers the forced pages
    m = forced.sum(dim=-1) + torch.minimum(n_free, spare // cost_hi.clamp(min=1))
    take, least = torch.stack((m.max(), m.min())).tolist() if b else (0, 0)
    surplus = (take - m).view(b, 1, 1)
    cols = torch.arange(pad + take - least, device=count.device) - pad
    fill = torch.where((cols >= 0) & (cols < surplus), float("inf"), float("-inf")).to(torch.float32)
    # Every row takes ``take`` pages: no +inf fill column, so each (row, head)'s top ``take`` are ``take`` of its
    # pages (a row has at least ``m`` pages holding tokens, all ranked above the -inf columns).
    return take, fill, (take if b and least == take else None)


def _uniform_top(scores: torch.Tensor, terms: _PageTerms) -> torch.Tensor:
    """``(B, H, width)`` bool page mask of the rule when costs are uniform (:func:`_uniform_take`): one
    unordered ``topk`` of ``take`` over the keys with ``fill`` appended (a row taking fewer pages takes
    the surplus from its ``+inf`` fill columns, cut off here), no cost walk.  The columns past the pages
    are ``False``."""
    b, h, n = scores.shape
    out = torch.zeros(b, h, n + terms.fill.shape[-1], dtype=torch.bool, device=scores.device)
    if terms.take == 0:
        return out[..., : terms.width]
    key = _key_buffer(scores, terms)
    page_keys = key[..., :n]
    torch.nan_to_num(scores.float(), nan=_LOW, posinf=_HIGH, neginf=_LOW, out=page_keys)
    torch.where(terms.fixed, terms.fixed_key, page_keys, out=page_keys)
    top = torch.topk(key, terms.take, dim=-1, largest=True, sorted=False).indices
    return out.scatter_(-1, top, True)[..., : terms.width]


def _key_buffer(scores: torch.Tensor, terms: _PageTerms) -> torch.Tensor:
    """``(B, H, N + E)`` float32 ranking keys of :func:`_uniform_top`: a per-thread buffer reused across
    calls whose last ``E`` columns hold ``terms.fill`` (written when the buffer or the terms change, so
    once per step: every layer of a step shares its terms); the caller writes the first ``N``."""
    b, h, n = scores.shape
    shape = (b, h, n + terms.fill.shape[-1])
    key = getattr(_scratch, "key", None)
    if key is None or tuple(key.shape) != shape or key.device != scores.device:
        key = _scratch.key = torch.empty(shape, dtype=torch.float32, device=scores.device)
        _scratch.key_terms = None
    if _scratch.key_terms is not terms:
        key[..., n:] = terms.fill
        _scratch.key_terms = terms
    return key


@dataclass(frozen=True)
class BlockSelection:
    """One layer's selection at one decode step.

    Attributes:
        head_mask: ``(B, H, N)`` bool, the (storage) blocks each row's KV head attends (any of its pages).
        row_mask: ``(B, N)`` bool, union over heads (the blocks each row needs).
        fetch: ``(U,)`` int64 ascending block indices, union over heads and rows: the entries to fetch
            (one entry holds every row and head of a block).
        scores: ``(B, H, P)`` float32 page scores (``P = N`` when pages are blocks).
        budget: ``(B,)`` int64 token budget per row (shared by the selections of one step's layers:
            read only).
        page_mask: ``(B, H, P)`` bool, the pages each row's KV head attends (``head_mask`` itself when
            pages are blocks).
        pages_per_block: pages per storage block (page ``p`` lies in block ``p // pages_per_block``).
        pages_each: when known, the number of pages every (row, KV head) selects (all the same; ``select``
            sets it when the rule's page costs are uniform and every row takes as many, so the attention
            needs no count of :attr:`pages`); ``None``: unknown (counts may differ).
    """

    head_mask: torch.Tensor
    row_mask: torch.Tensor
    fetch: torch.Tensor
    scores: torch.Tensor
    budget: torch.Tensor
    page_mask: torch.Tensor | None = None
    pages_per_block: int = 1
    pages_each: int | None = None

    @property
    def pages(self) -> torch.Tensor:
        return self.head_mask if self.page_mask is None else self.page_mask

    @property
    def fetch_head_mask(self) -> torch.Tensor:
        """``(B, H, U)`` bool: :attr:`head_mask` restricted to the fetched blocks, in :attr:`fetch` order
        (the ``block_mask`` that :func:`..attention.sparse_attention_reference` takes)."""
        return self.head_mask.index_select(2, self.fetch)

    def selected_tokens(self, count: torch.Tensor) -> torch.Tensor:
        """``(B, H)`` valid tokens selected per row and KV head (``count``: ``(B, P)`` valid tokens per
        page, i.e. the digests' ``count``)."""
        return (self.pages * count.unsqueeze(1)).sum(dim=-1)

    def token_mask(self, block_size: int) -> torch.Tensor | None:
        """``(B, H, U, block_size)`` bool: the tokens of the fetched blocks each (row, KV head) attends
        by page, or ``None`` when pages are blocks (``fetch_head_mask`` says it all)."""
        if self.pages_per_block == 1:
            return None
        k = self.pages_per_block
        b, h, p = self.page_mask.shape
        n = self.head_mask.shape[-1]
        pm = torch.nn.functional.pad(self.page_mask, (0, n * k - p)).view(b, h, n, k)
        pm = pm.index_select(2, self.fetch.to(pm.device))
        return pm.repeat_interleave(block_size // k, dim=-1)


def select(query: torch.Tensor, digests: KeyDigests, config: SelectionConfig, *,
           backend: str = "auto", pages_per_block: int = 1) -> BlockSelection:
    """Score ``digests`` against ``query`` (``(B, Hq, Q, D)``) and select under ``config``.

    ``pages_per_block``: how many digest blocks ("pages") make one storage block; the selection is made
    per page and the storage blocks holding a selected page are fetched."""
    if isinstance(pages_per_block, bool) or not isinstance(pages_per_block, int) or pages_per_block < 1:
        raise ValueError(f"pages_per_block must be a positive int, got {pages_per_block!r}")
    b, h, g, q, _, d = _check_kept(query, digests)
    terms = _page_terms(digests.count, config, pages_per_block)
    if config.rank == "mass":
        scores = _mass_scores(query.float().reshape(b, h, g * q, d), digests, config.score,
                              float(config.landmark_weight), config.scale, terms.logc_or_empty)
    elif config.score == "bound+landmark":
        scores = score_blocks_landmark(query, digests, float(config.landmark_weight), config.gqa)
    else:
        scores = score_blocks(query, digests.lo, digests.hi, digests.count, config.gqa, backend=backend)
    budget = terms.budget
    p = scores.shape[-1]
    if terms.fill is not None:
        padded = _uniform_top(scores, terms)  # (B, H, width): the pages, then False up to whole blocks
        page_mask = padded[..., :p].contiguous()
    else:
        page_mask = _take_top(scores, digests.count, terms.fixed, terms.fixed_key, terms.limit, terms.head, terms.k)
        padded = page_mask if terms.width == p else torch.nn.functional.pad(page_mask, (0, terms.width - p))
    if pages_per_block == 1:
        head_mask, page_mask = page_mask, None
    else:
        head_mask = padded.view(b, h, terms.width // pages_per_block, pages_per_block).any(-1)
    row_mask = head_mask.any(dim=1)
    fetch = row_mask.any(dim=0).nonzero().flatten()
    each = terms.each if terms.fill is not None else None
    return BlockSelection(head_mask, row_mask, fetch, scores, budget, page_mask, pages_per_block, each)


def block_table(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A selection mask ``(..., N)`` as a block table: ``(table, lengths)`` with ``table`` ``(..., M)``
    int32 holding each selection's block indices in ascending order (padded with 0 past ``lengths``),
    ``lengths`` ``(...)`` int32, ``M = max(lengths)`` (at least 1)."""
    lengths = mask.sum(dim=-1)
    m = max(1, int(lengths.max())) if lengths.numel() else 1
    order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)[..., :m]
    if order.shape[-1] < m:  # n == 0
        order = torch.zeros(*mask.shape[:-1], m, dtype=torch.long, device=mask.device)
    table = torch.where(torch.arange(m, device=mask.device) < lengths.unsqueeze(-1), order, 0)
    return table.to(torch.int32), lengths.to(torch.int32)

