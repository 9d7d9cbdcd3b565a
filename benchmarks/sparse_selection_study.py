"""Which selection rule makes sparse decode accurate at small budgets? (a study, not the system)

    python benchmarks/sparse_selection_study.py --prefix 4096 --steps 256 --out benchmarks/results

Teacher-forced sparse decode *simulated* in one forward pass: the prefix is prefilled exactly once into
a ``DynamicCache``; then, per selection variant, the ``steps`` teacher-forced tokens are fed as one
chunk whose attention function gives every chunk position ``p`` exactly what a sparse decode step at
position ``p`` attends: the tokens of ``[0, p)`` its selection picks (scored from digests of complete
pages, as the cache scores complete blocks), plus itself.  Lower layers' sparse outputs feed upper
layers' keys and values as in real decode, so the figures are those of the step-by-step decode of the
same rule; a variant costs one 256-token forward pass instead of 256 decode steps, which is what makes
comparing many rules affordable.  The real cache's figures come from ``sparse_accuracy.py``.

Text (``--source``): ``pydoc`` (default, ``_texts.english_prose``, the accuracy benchmark's) or ``licences``
(the legal prose of ``/usr/share/common-licenses``); ``--offsets 0,4608,...`` runs one window of ``prefix +
steps`` tokens from each offset (each prefilled on its own) and prints the figures pooled over them.  Each
row records its missed steps and how close each was in the dense reference (``miss_gaps``: log p of the
dense top-1 minus log p of the sparse run's top-1, nats).

Variants (``--variants``, comma separated names ``page<P>[-sub<Q>][-mean|-boundmean|-pagemax][-w<W>]
[-blocksink|-pagesink][-dense<L>][-sum][-norm][-lse|-lsem|-lseb|-klse][-pool][-layershare][-oracle]
[-f16][-s<N>][-r<N>][-comp[<B>]|-compv<B>][-compvar|-comprange|-compexact]``):

- ``page<P>``: digests and selection per ``P``-token page (``P`` divides the 64-token storage block);
  the fetch is the union of 64-token blocks holding a selected page, attention masked to the pages.
- sink / recent accounting: token-granular by default (the first ``sink`` and last ``recent`` tokens
  cost exactly their tokens); ``-blocksink`` forces (and pays for) whole 64-token blocks holding them,
  the cache's rule before this study.
- ``-dense<L>``: the first ``L`` layers attend densely (counted in the realised budget).
- ``-sum``: GQA aggregation by the group's sum of bounds instead of the max.
- ``-oracle``: token-granular top-k by the true max-over-group ``q . k`` (a ceiling, not buildable
  without reading every key).
- ``-sub<Q>``: score a page by the max of the Quest bounds of its ``Q``-token sub-pages (tighter bound,
  digests ``P / Q`` times larger).
- ``-mean``: score by ``q . mean key`` (landmark) only; ``-boundmean``: ``0.5 * bound + 0.5 * q . mean``
  per query head (the cache's ``"bound+landmark"``); ``-pagemax``: the true max ``q . k`` of the page
  (a ceiling).
- ``-norm``: subtract each query head's max score before the GQA max.
- ``-w<W>``: landmark weight of ``-boundmean`` (default 0.5).
- ``-pagesink``: whole pages holding a sink / recent token are forced and paid for: exactly the
  cache's rule (``selection.select`` with ``pages_per_block``); without it the sink / recent tokens
  are forced token by token (at most 7 + 7 tokens of difference at 8-token pages).
- Ranking by *estimated attention share* (each query head's page scores turned into log softmax
  shares before the GQA max, softmax scale ``head_dim ** -0.5``): ``-lse`` normalises by the
  logsumexp of the page scores themselves, ``-lsem`` by that of the landmarks ``q . mean key`` (the
  partial page of ``[0, p)`` included, as the cache's digests hold it: ``SelectionConfig(rank="mass")``,
  the cache's rule), ``-lseb`` by that of the Quest bounds; ``-klse`` normalises after the GQA max (per
  KV head).  With ``-oracle``, ``-lse`` ranks tokens by their true log softmax weight per query head.
- ``-layershare<A>``: layer ``l`` attends the fraction ``c * span_l ** A`` of the context (at most all
  of it; ``c`` makes the layers' mean the budget), ``span_l`` the dense reference's mean effective
  attention span ``exp(entropy)`` in that layer: shifting budget across layers by how spread their
  attention is (it reads the dense run, so it is an optimistic test of the idea).
- ``-f16``: the digests as the cache stores them by default (``SelectionConfig.digests="float16"``: bounds
  rounded outward, landmarks rounded to nearest); ``page8-boundmean-lsem-pagesink-f16`` is the cache's
  default rule exactly (tests/benchmarks/test_sparse_selection_study.py).
- ``-s<N>`` / ``-r<N>``: this variant's sink / recent window (default ``--sink`` / ``--recent``).
- ``-comp`` / ``-comp<B>`` / ``-compv<B>``: attention over the selection *plus summary tokens of the
  unselected tokens* built from digests only (nothing more fetched; :func:`comp_attention`): one per
  unselected page (``-comp``, ``-compv<B>``) or per ``B``-token group of them (``-comp<B>``), key the mean
  key (landmark), logit ``+ log(tokens)``, value the page's (``-comp``) or the ``B``-group's mean value;
  ``-compvar`` / ``-comprange`` add a diagonal-variance estimate of the page's logsumexp (a variance
  digest / the Quest range), ``-compexact`` uses the true one (a ceiling); ``-compl<L>`` / ``-compf<L>``:
  summaries in the first ``L`` layers only / from layer ``L`` on.  Summaries are not counted in
  the budget; the rows record the mean softmax mass they receive (``summary_mass``).
- ``-pool``: one budget per row and *layer*: the ``H x budget`` tokens are filled jointly over the KV
  heads' pages in descending (normalised) score, so a head may get more or fewer than ``budget``.

Reports per variant and budget: top-1 agreement and mean KL(full || sparse) against the same chunk run
densely, the realised budget (tokens attended / context, averaged over layers, heads and steps), and
fetched tokens per attended token (64-token blocks touched, union over KV heads, over tokens attended
per head).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tiercache_llm.hf_kwargs import cache_kwargs  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

STORAGE_BLOCK = 64
NAME = "tiercache_selection_study"


@dataclass(frozen=True)
class Variant:
    page: int = 64
    block_sink: bool = False
    page_sink: bool = False  # whole pages holding a sink / recent token are forced (and paid): the cache's rule
    dense_layers: int = 0
    gqa: str = "max"
    oracle: bool = False
    sub: int = 0  # >0: score a page by the max of its sub-pages' bounds (digests per sub-page of this size)
    norm: bool = False  # subtract each query head's max score before the GQA max
    score: str = "bound"  # "bound" (Quest min/max), "mean" (q . mean key), "pagemax" (true max q . k per page: a ceiling)
    weight: float = 0.5  # landmark weight of "boundmean"
    layer_share: float = 0.0  # > 0: per-layer budget shares proportional to span ** layer_share (water-filled);  per-layer budgets proportional to the dense run's effective attention span (a ceiling)
    pool: bool = False  # one budget of H x budget tokens per row shared by the layer's KV heads
    sink: int | None = None  # -s<N>: this variant's sink tokens (None: --sink)
    recent: int | None = None  # -r<N>: this variant's recent window (None: --recent)
    f16: bool = False  # digests as the cache stores them by default: bounds rounded outward to float16, landmarks rounded to float16
    comp: int = 0  # > 0: add summary tokens of the unselected pages (-comp<B> / -compv<B>): values per B tokens
    comp_group: bool = False  # -comp<B> with B > page: one summary per B-token group; -compv<B>: one per page
    comp_layers: int = 0  # -compl<L>: summaries only in the first L layers (0: every sparse layer)
    comp_from: int = 0  # -compf<L>: summaries only from layer L on
    comp_mass: str = "mean"  # summary logit: "mean" (q . mean key + log n), "var" (+ 0.5 q^T diag(var) q), "range" (var ~ (hi - lo)^2 / 8), "exact" (true logsumexp: a ceiling)
    lse: str = ""  # "", "lse": per query head, "lsem": per query head with the normaliser from q . mean key, "klse": per KV head after the GQA max; rank by estimated log attention mass: scale * s + log(tokens) - logsumexp over the head's pages

    @classmethod
    def parse(cls, name: str) -> "Variant":
        parts = name.split("-")
        if not parts[0].startswith("page"):
            raise ValueError(f"variant {name!r} must start with page<P>")
        kw: dict = {"page": int(parts[0][4:])}
        for p in parts[1:]:
            if p == "blocksink":
                kw["block_sink"] = True
            elif p == "pagesink":
                kw["page_sink"] = True
            elif p.startswith("dense"):
                kw["dense_layers"] = int(p[5:])
            elif p == "sum":
                kw["gqa"] = "sum"
            elif p == "oracle":
                kw["oracle"] = True
            elif p.startswith("sub"):
                kw["sub"] = int(p[3:])
            elif p == "norm":
                kw["norm"] = True
            elif p.startswith("layershare"):
                kw["layer_share"] = float(p[10:] or 1.0)
            elif p == "pool":
                kw["pool"] = True
            elif p == "f16":
                kw["f16"] = True
            elif p[:1] in ("s", "r") and p[1:].isdigit():
                kw["sink" if p[0] == "s" else "recent"] = int(p[1:])
            elif p in ("lse", "lsem", "klse", "lseb", "lseu"):
                kw["lse"] = p
            elif p.startswith("w") and p[1:].replace(".", "", 1).isdigit():
                kw["weight"] = float(p[1:])
            elif p in ("mean", "pagemax", "boundmean"):
                kw["score"] = p
            elif p.startswith("compl") and p[5:].isdigit():
                kw["comp_layers"] = int(p[5:])
            elif p.startswith("compf") and p[5:].isdigit():
                kw["comp_from"] = int(p[5:])
            elif p in ("compvar", "comprange", "compexact"):
                kw["comp_mass"] = p[4:]
            elif p == "comp" or (p.startswith("comp") and p[4:].isdigit()):
                kw["comp"], kw["comp_group"] = int(p[4:] or 0), True
            elif p.startswith("compv") and p[5:].isdigit():
                kw["comp"], kw["comp_group"] = int(p[5:]), False
            else:
                raise ValueError(f"unknown variant part {p!r} in {name!r}")
        if STORAGE_BLOCK % kw["page"]:
            raise ValueError(f"page size must divide {STORAGE_BLOCK}")
        if (kw.get("comp_mass", "mean") != "mean" or kw.get("comp_layers") or kw.get("comp_from")) and "comp" not in kw:
            kw["comp"], kw["comp_group"] = kw["page"], True
        if "comp" in kw:
            kw["comp"] = kw["comp"] or kw["page"]
            if kw["comp"] % kw["page"]:
                raise ValueError(f"summary group ({kw['comp']}) must be a multiple of the page ({kw['page']}) in {name!r}")
            if kw.get("oracle"):
                raise ValueError(f"-comp needs pages, not -oracle, in {name!r}")
            if kw.get("comp_mass", "mean") != "mean" and kw["comp_group"] and kw["comp"] != kw["page"]:
                raise ValueError(f"-compvar / -comprange / -compexact summarise per page: use -compv<B>, not -comp<B>, in {name!r}")
        return cls(**kw)


class Sim:
    """State shared with the registered attention function during one chunk pass."""

    variant: Variant | None = None  # None: dense (causal) attention for the chunk
    budget: float = 1.0
    sink: int = 4
    recent: int = 64
    prefix: int = 0
    attended: list = []  # per layer: mean tokens attended per (head, step) / context
    fetched: list = []  # per layer: mean fetched tokens / attended tokens
    comp_mass: list = []  # -comp: per layer, the mean softmax mass the summary tokens receive
    span: dict = {}  # layer -> mean exp(entropy) of the dense chunk's attention (tokens), from the reference run

    @classmethod
    def layer_fraction(cls, layer: int, alpha: float) -> float:
        """Layer's budget fraction: ``c * span ** alpha`` capped at 1, ``c`` chosen (water-filling) so
        that the layers' fractions average ``budget``."""
        w = {k: v ** alpha for k, v in cls.span.items()}
        lo, hi = 0.0, 1e9
        for _ in range(200):
            c = (lo + hi) / 2
            mean = sum(min(1.0, c * x) for x in w.values()) / len(w)
            lo, hi = (c, hi) if mean < cls.budget else (lo, c)
        return min(1.0, lo * w[layer])


def _take(key_: torch.Tensor, cost: torch.Tensor, ok: torch.Tensor, remaining: torch.Tensor, pool: bool) -> torch.Tensor:
    """``(H, Q, N)`` bool: per (head, query) or, pooled, per query over all heads jointly, the best
    ``key_`` entries whose cumulated ``cost`` stays within ``remaining`` (``(Q,)`` per head; pooled: the
    heads' sum)."""
    h, q, n = key_.shape
    if pool:
        key_ = key_.permute(1, 0, 2).reshape(q, h * n)
        cost = cost.permute(1, 0, 2).reshape(q, h * n)
        ok = ok.permute(1, 0, 2).reshape(q, h * n)
        lim = (remaining * h).view(q, 1)
    else:
        lim = remaining.view(1, q, 1)
    order = key_.argsort(dim=-1, descending=True, stable=True)
    take_sorted = ok.gather(-1, order) & (cost.gather(-1, order).cumsum(-1) <= lim)
    take = torch.zeros_like(take_sorted).scatter(-1, order, take_sorted)
    if pool:
        take = take.view(q, h, n).permute(1, 0, 2)
    return take


def chunk_mask(query: torch.Tensor, key: torch.Tensor, layer: int, scaling: float | None = None) -> torch.Tensor:
    """``(1, H, Q, T)`` bool: what each chunk position attends under ``Sim.variant``."""
    v = Sim.variant
    _, hq, q, d = query.shape
    _, h, t, _ = key.shape
    g = hq // h
    dev = query.device
    pos = Sim.prefix + torch.arange(q, device=dev)  # absolute position of each query row
    tok = torch.arange(t, device=dev)
    causal = tok.view(1, t) < pos.view(q, 1)  # context [0, p)
    itself = tok.view(1, t) == pos.view(q, 1)
    if v is None or layer < v.dense_layers:
        mask = (causal | itself).view(1, 1, q, t).expand(1, h, q, t)
        Sim.attended.append(1.0)
        Sim.fetched.append(1.0)
        return mask
    ctx = pos.double()
    frac = Sim.budget
    if v.layer_share and Sim.span:
        frac = Sim.layer_fraction(layer, v.layer_share)
    budget = torch.ceil(ctx * frac - 1e-9).long()  # (Q,)
    qf = query[0].float().view(h, g, q, d)
    scale = scaling if scaling is not None else d ** -0.5
    kf = key[0].float()
    forced_tok = causal & ((tok.view(1, t) < Sim.sink) | (tok.view(1, t) >= (pos - Sim.recent).view(q, 1)))
    if v.oracle:
        s = qf @ kf.transpose(-1, -2).unsqueeze(1)  # (H, G, Q, T)
        if v.norm:
            s = s - s.masked_fill(~causal, float("-inf")).amax(-1, keepdim=True)
        if v.lse:  # true log attention weight of each token over [0, p)
            z = s * scale
            s = z - z.masked_fill(~causal, float("-inf")).logsumexp(-1, keepdim=True)
        s = s.amax(dim=1)
        s = s.masked_fill(~causal, float("-inf"))
        free = (causal & ~forced_tok).unsqueeze(0).expand(h, q, t)
        remaining = (budget - forced_tok.sum(-1)).clamp(min=0)
        take = _take(s.masked_fill(~free, float("-inf")), free.long(), free, remaining, v.pool)
        sel = take | forced_tok
    else:
        p = v.page
        n = -(-t // p)
        kp = torch.nn.functional.pad(kf, (0, 0, 0, n * p - t)).view(h, n, p, d)
        # pad rows get the block's own values (min/max unaffected): repeat the last real key
        if n * p > t:
            kp[:, -1, t - (n - 1) * p:] = kf[:, -1:].expand(h, n * p - t, d)
        lo, hi = kp.amin(dim=2), kp.amax(dim=2)  # (H, N, D)
        means = kp.mean(dim=2)
        if v.f16:  # the cache's float16 digests (SelectionConfig.digests): bounds outward, landmarks to nearest
            from tiercache_llm.sparse.digests import round_down, round_up

            lo, hi = round_down(lo, torch.float16).float(), round_up(hi, torch.float16).float()
            means = means.half().float()
        if v.score == "pagemax":
            s = (qf @ kp.view(h, n * p, d).transpose(-1, -2).unsqueeze(1)).view(h, g, q, n, p).amax(-1)
        elif v.score == "mean":
            s = qf @ means.transpose(-1, -2).unsqueeze(1)
        else:
            s = qf.clamp(min=0) @ hi.transpose(-1, -2).unsqueeze(1) + qf.clamp(max=0) @ lo.transpose(-1, -2).unsqueeze(1)
            if v.sub:
                sp = kf.new_zeros(h, n * p, d)
                sp[:, :t] = kf
                sp[:, t:] = kf[:, -1:]
                sp = sp.view(h, n * p // v.sub, v.sub, d)
                slo, shi = sp.amin(2), sp.amax(2)
                ss = qf.clamp(min=0) @ shi.transpose(-1, -2).unsqueeze(1) + qf.clamp(max=0) @ slo.transpose(-1, -2).unsqueeze(1)
                s = ss.view(h, g, q, n, p // v.sub).amax(-1)
            if v.score == "boundmean":
                s = (1 - v.weight) * s + v.weight * (qf @ means.transpose(-1, -2).unsqueeze(1))
        page_end = (torch.arange(n, device=dev) + 1) * p
        okp = (page_end.view(1, n) <= pos.view(q, 1)).view(1, 1, q, n)
        if v.lse in ("lse", "lsem", "lseb", "lseu"):  # estimated log mass of each page in the query head's softmax over complete pages
            z = s * scale + math.log(p)
            if v.lse == "lse":
                zn = z
            elif v.lse == "lsem":  # normaliser from the landmarks (a Jensen lower bound of the true one)
                zn = (qf @ means.transpose(-1, -2).unsqueeze(1)) * scale + math.log(p)
                # the cache's digests also hold the partial page of [0, p): its landmark joins the normaliser
                cs = torch.nn.functional.pad(kf.double().cumsum(1), (0, 0, 1, 0))  # (H, T + 1, D)
                start = (pos // p) * p
                cnt = (pos - start).clamp(min=1)
                part = ((cs[:, pos] - cs[:, start]) / cnt.view(1, q, 1)).float()  # (H, Q, D)
                if v.f16:
                    part = part.half().float()
                zp = (qf * part.unsqueeze(1)).sum(-1) * scale + cnt.float().log()  # (H, G, Q)
                zp = zp.masked_fill((pos == start).view(1, 1, q), float("-inf"))
                zn = torch.cat((zn.masked_fill(~okp, float("-inf")), zp.unsqueeze(-1)), dim=-1)
            else:  # from the Quest bound: one token per page at its bound ("lseb") or every token ("lseu", an upper bound)
                bnd = qf.clamp(min=0) @ hi.transpose(-1, -2).unsqueeze(1) + qf.clamp(max=0) @ lo.transpose(-1, -2).unsqueeze(1)
                zn = bnd * scale + (math.log(p) if v.lse == "lseu" else 0.0)
            if v.lse != "lsem":
                zn = zn.masked_fill(~okp, float("-inf"))
            s = z - zn.logsumexp(-1, keepdim=True).clamp(min=-1e30)
        if v.norm:
            okp = (page_end.view(1, n) <= pos.view(q, 1)).view(1, 1, q, n)
            s = s - s.masked_fill(~okp, float("-inf")).amax(-1, keepdim=True).clamp(min=-1e30)
        s = s.amax(dim=1) if v.gqa == "max" else s.sum(dim=1)  # (H, Q, N)
        if v.lse == "klse":
            z = s * scale + math.log(p)
            s = z - z.masked_fill(~okp[0], float("-inf")).logsumexp(-1, keepdim=True).clamp(min=-1e30)
        page_end = (torch.arange(n, device=dev) + 1) * p
        complete = page_end.view(1, n) <= pos.view(q, 1)  # (Q, N)
        if v.block_sink or v.page_sink:  # whole storage blocks (pages) holding a forced token are forced
            unit = STORAGE_BLOCK if v.block_sink else p
            blk = tok // unit
            nb = -(-t // unit)
            fb = torch.zeros(q, nb, dtype=torch.bool, device=dev).scatter_reduce(
                1, blk.expand(q, t), forced_tok, reduce="amax")
            forced_tok = fb[:, blk] & causal
        # page cost: its non-forced context tokens
        pt = torch.nn.functional.pad(causal & ~forced_tok, (0, n * p - t)).view(q, n, p)
        cost = pt.sum(-1)  # (Q, N)
        remaining = (budget - forced_tok.sum(-1)).clamp(min=0)  # (Q,)
        key_ = s.masked_fill(~complete.unsqueeze(0), float("-inf"))
        take = _take(key_, cost.unsqueeze(0).expand(h, q, n), complete.unsqueeze(0).expand(h, q, n), remaining, v.pool)
        sel = take.repeat_interleave(p, dim=-1)[..., :t] & causal | forced_tok
    mask = sel | itself
    ctxn = pos.float().clamp(min=1)
    Sim.attended.append(float(((sel & causal).sum(-1).float() / ctxn).mean()))
    blocks = torch.nn.functional.pad(sel.any(0), (0, -(-t // STORAGE_BLOCK) * STORAGE_BLOCK - t))
    blocks = blocks.view(q, -1, STORAGE_BLOCK).any(-1).sum(-1).float() * STORAGE_BLOCK  # union over heads
    Sim.fetched.append(float((blocks / (sel & causal).sum(-1).float().mean(0).clamp(min=1)).mean()))
    return mask.unsqueeze(0)


def comp_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, v: Variant,
                   scaling: float | None = None) -> torch.Tensor:
    """``(1, Hq, Q, D)``: attention of the chunk over what ``mask`` (``(1, H, Q, T)``) selects, plus one
    *summary token* per unselected complete page (``-compv<B>``) or per ``B``-token group of them
    (``-comp<B>``), built only from digests (nothing else is read from the keys and values):

    - key: the mean key of the unselected tokens it stands for (the page's landmark; for a group, the mean
      of its unselected pages' landmarks), logit ``scale * q . key + log(tokens)``; ``-compvar`` adds
      ``0.5 * scale**2 * sum_d q_d**2 var_d`` (a per-page diagonal key variance digest), ``-comprange``
      the same with ``var_d ~ (hi_d - lo_d)**2 / 8`` from the Quest bounds (no new key digest; the
      expected range of 8 Gaussian samples is 2.85 sigma); both capped at ``log(tokens) + scale *
      bound`` (the Quest bound caps every token's logit, so the page's logsumexp too); ``-compexact``
      the page's true logsumexp (reads every key: a ceiling for mean-value summaries, not buildable);
    - value: the mean value of the ``B``-token group holding it (over the group's tokens of ``[0, p)``):
      exact for a page (``B`` = page) or a wholly unselected group, an estimate otherwise.

    So the unselected tokens' softmax mass and mean value enter the output approximately (NSA-style
    compressed tokens, training free).  A page with any selected token gets no summary (with
    ``-pagesink`` selection is whole pages); with nothing unselected the result is dense attention.
    ``-f16`` rounds the new digests (mean values, variances) to float16 like the landmarks."""
    _, hq, q, d = query.shape
    _, h, t, _ = key.shape
    g = hq // h
    dev = query.device
    scale = scaling if scaling is not None else d ** -0.5
    p, grp = v.page, v.comp
    n = -(-t // p)
    pos = Sim.prefix + torch.arange(q, device=dev)
    qf = query[0].float().view(h, g, q, d)
    kf, vf = key[0].float(), value[0].float()
    sel = mask[0]  # (H, Q, T)
    # token logits over what is selected
    z = (qf @ kf.transpose(-1, -2).unsqueeze(1)) * scale  # (H, G, Q, T)
    z = z.masked_fill(~sel.unsqueeze(1), float("-inf"))
    # unselected complete pages per (KV head, query)
    page_end = (torch.arange(n, device=dev) + 1) * p
    complete = page_end.view(1, n) <= pos.view(q, 1)  # (Q, N)
    selp = torch.nn.functional.pad(sel, (0, n * p - t)).view(h, q, n, p).any(-1)
    unsel = complete.unsqueeze(0) & ~selp  # (H, Q, N)
    kp = torch.nn.functional.pad(kf, (0, 0, 0, n * p - t)).view(h, n, p, d)
    land = kp.double().mean(2)  # complete pages only are used: no pad rows among them
    if v.f16:
        land = land.half()
    land = land.float()
    # value means: per page (complete pages only: static), or of each B-group over its tokens of [0, p) per
    # query (cumulative sums; the group holding p is partial)
    m = -(-t // grp)
    if grp == p:
        gmean = torch.nn.functional.pad(vf, (0, 0, 0, n * p - t)).view(h, n, p, d).double().mean(2).unsqueeze(1)  # (H, 1, N, D)
    else:
        cs = torch.nn.functional.pad(vf.double().cumsum(1), (0, 0, 1, 0))  # (H, T + 1, D)
        gstart = torch.arange(m, device=dev) * grp
        gend = torch.minimum((gstart + grp).view(1, m), pos.view(q, 1))  # (Q, M)
        gcnt = (gend - gstart.view(1, m)).clamp(min=1)
        gmean = (cs[:, gend.clamp(min=0)] - cs[:, gstart].unsqueeze(1)) / gcnt.view(1, q, m, 1)  # (H, Q, M, D)
    if v.f16:
        gmean = gmean.half()
    gmean = gmean.float()
    if v.comp_mass == "mean" and v.comp_group and grp > p:  # one summary per group over its unselected pages
        r = grp // p
        un = torch.nn.functional.pad(unsel, (0, m * r - n)).view(h, q, m, r).float()
        lm = torch.nn.functional.pad(land, (0, 0, 0, m * r - n)).view(h, m, r, d)
        npg = un.sum(-1)  # (H, Q, M)
        kmean = torch.einsum("hqmr,hmrd->hqmd", un, lm) / npg.clamp(min=1).unsqueeze(-1)
        zs = torch.einsum("hgqd,hqmd->hgqm", qf, kmean) * scale + (npg * p).clamp(min=1).log().unsqueeze(1)
        zs = zs.masked_fill((npg == 0).unsqueeze(1), float("-inf"))
    else:  # one summary per unselected page, its value the group's mean value
        zs = (qf @ land.transpose(-1, -2).unsqueeze(1)) * scale + math.log(p)  # (H, G, Q, N)
        if v.comp_mass == "exact":  # the page's true logsumexp (reads every key: a ceiling of the mass estimate)
            zs = ((qf @ kf.transpose(-1, -2).unsqueeze(1)) * scale)
            zs = torch.nn.functional.pad(zs, (0, n * p - t), value=float("-inf")).view(h, g, q, n, p).logsumexp(-1)
        elif v.comp_mass != "mean":
            lo, hi = kp.amin(dim=2), kp.amax(dim=2)
            if v.f16:
                from tiercache_llm.sparse.digests import round_down, round_up

                lo, hi = round_down(lo, torch.float16).float(), round_up(hi, torch.float16).float()
            if v.comp_mass == "var":
                var = kp.double().var(2, unbiased=False)
                var = (var.half() if v.f16 else var).float()
            else:
                var = (hi - lo) ** 2 / 8
            zs = zs + 0.5 * scale * scale * ((qf * qf) @ var.transpose(-1, -2).unsqueeze(1))
            bnd = qf.clamp(min=0) @ hi.transpose(-1, -2).unsqueeze(1) + qf.clamp(max=0) @ lo.transpose(-1, -2).unsqueeze(1)
            zs = torch.minimum(zs, bnd * scale + math.log(p))
        zs = zs.masked_fill(~unsel.unsqueeze(1), float("-inf"))
    w = torch.softmax(torch.cat((z, zs), -1), -1)
    ws = w[..., t:]
    if ws.shape[-1] != gmean.shape[2]:  # per-page summaries: their weights summed per group, times its mean value
        r = grp // p
        ws = torch.nn.functional.pad(ws, (0, m * r - n)).view(h, g, q, m, r).sum(-1)
    out = w[..., :t] @ vf.unsqueeze(1) + (ws.transpose(1, 2) @ gmean).transpose(1, 2)  # (H, Q, G, M) @ (H, Q|1, M, D)
    Sim.comp_mass.append(float(ws.sum(-1).mean()))
    return out.reshape(1, hq, q, d).to(query.dtype)


def study_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    q = query.shape[2]
    if q == key.shape[2] or Sim.prefix == 0:  # prefill: plain causal
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling,
                                                               enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None
    if Sim.variant is None:  # the dense reference: record each layer's effective attention span
        w = torch.softmax((query.float() @ key.float().repeat_interleave(query.shape[1] // key.shape[1], 1)
                           .transpose(-1, -2)) * (scaling or query.shape[-1] ** -0.5)
                          + torch.where(torch.ones(q, key.shape[2], dtype=torch.bool).tril(key.shape[2] - q), 0.0,
                                        float("-inf")), -1)
        ent = -(w * w.clamp_min(1e-30).log()).sum(-1)
        Sim.span[module.layer_idx] = float(ent.exp().mean())
    mask = chunk_mask(query, key, module.layer_idx, scaling)
    h = key.shape[1]
    g = query.shape[1] // h
    v = Sim.variant
    if (v is not None and v.comp and module.layer_idx >= v.dense_layers
            and (not v.comp_layers or module.layer_idx < v.comp_layers) and module.layer_idx >= v.comp_from):
        return comp_attention(query, key, value, mask, Sim.variant, scaling).transpose(1, 2).contiguous(), None
    mask = mask.repeat_interleave(g, dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling,
                                                           enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


LICENSES = ("GPL-3", "GFDL-1.3", "Apache-2.0", "LGPL-3", "MPL-2.0", "Artistic")


def licence_prose(min_chars: int) -> tuple[str, str]:
    """Natural English of another kind than ``_texts.english_prose``: the licence texts that the OS's
    ``base-files`` package ships under ``/usr/share/common-licenses`` (legal prose), whitespace collapsed
    within paragraphs, joined by blank lines, until ``min_chars`` (all of them otherwise)."""
    root = Path("/usr/share/common-licenses")
    paragraphs, used, size = [], [], 0
    for name in LICENSES:
        path = root / name
        if not path.is_file():
            continue
        used.append(name)
        for para in path.read_text(errors="replace").split("\n\n"):
            para = " ".join(para.split())
            if para:
                paragraphs.append(para)
                size += len(para) + 2
        if size >= min_chars:
            break
    if not used:
        raise RuntimeError(f"no licence text under {root}")
    return "\n\n".join(paragraphs), f"{root}: {', '.join(used)}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prefix", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--budgets", default="0.0625,0.125,0.25,0.5")
    ap.add_argument("--sink", type=int, default=4)
    ap.add_argument("--recent", type=int, default=64)
    ap.add_argument("--variants", default="page64-blocksink,page64,page32,page16,page16-dense1,page16-dense2,page16-sum,page16-oracle")
    ap.add_argument("--source", choices=("pydoc", "licences"), default="pydoc",
                    help="the text: pydoc (_texts.english_prose, the accuracy benchmark's) or licences "
                         "(/usr/share/common-licenses legal prose)")
    ap.add_argument("--offsets", default="0",
                    help="comma-separated token offsets into the text: one window of prefix + steps tokens "
                         "from each (prefilled separately); the summary pools their steps")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AttentionInterface, DynamicCache
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    from _common import load_bench_model
    from _texts import SOURCE, english_prose

    offsets = [int(x) for x in args.offsets.split(",")]
    if any(o < 0 for o in offsets):
        ap.error("--offsets must be >= 0")
    AttentionInterface.register(NAME, study_attention)
    AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    model, tok = load_bench_model("smollm2")
    model.set_attn_implementation(NAME)
    need = max(offsets) + args.prefix + args.steps + 1
    if args.source == "pydoc":
        text, topics = english_prose(8 * need)
        source = f"{SOURCE}; topics {', '.join(topics)}"
    else:
        text, source = licence_prose(8 * need)
    all_ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    if all_ids.shape[1] < need:
        ap.error(f"the {args.source} text holds {all_ids.shape[1]} tokens, the offsets need {need}")
    rows = []
    for offset in offsets:
        ids = all_ids[:, offset:offset + args.prefix + args.steps + 1]
        t0 = time.perf_counter()
        with torch.no_grad():
            Sim.prefix = 0
            pre = DynamicCache(config=model.config)
            model(ids[:, :args.prefix], **cache_kwargs(pre, model), use_cache=True)
            print(f"offset {offset}: prefill {args.prefix} tokens: {time.perf_counter() - t0:.1f} s", flush=True)
            chunk = ids[:, args.prefix:args.prefix + args.steps]

            def run(variant, budget):
                sink = args.sink if variant is None or variant.sink is None else variant.sink
                recent = args.recent if variant is None or variant.recent is None else variant.recent
                Sim.variant, Sim.budget, Sim.sink, Sim.recent, Sim.prefix = variant, budget, sink, recent, args.prefix
                Sim.attended, Sim.fetched, Sim.comp_mass = [], [], []
                cache = copy.deepcopy(pre)
                logits = model(chunk, **cache_kwargs(cache, model), use_cache=True).logits[0].float()
                run.comp_mass = sum(Sim.comp_mass) / len(Sim.comp_mass) if Sim.comp_mass else 0.0
                return torch.log_softmax(logits, -1), sum(Sim.attended) / len(Sim.attended), sum(Sim.fetched) / len(Sim.fetched)

            ref, _, _ = run(None, 1.0)
            print("effective attention span per layer (dense, tokens): "
                  + " ".join(f"{Sim.span[k]:.0f}" for k in sorted(Sim.span)), flush=True)
            for name in args.variants.split(","):
                v = Variant.parse(name)
                for b in [float(x) for x in args.budgets.split(",")]:
                    t1 = time.perf_counter()
                    lp, att, fet = run(v, b)
                    kl = (ref.exp() * (ref - lp)).sum(-1).clamp_min(0)
                    agree = ref.argmax(-1) == lp.argmax(-1)
                    top1 = float(agree.float().mean())
                    row = dict(variant=name, budget=b, offset=offset, top1=top1, agree=int(agree.sum()),
                               steps=int(agree.numel()), mean_kl=float(kl.mean()), max_kl=float(kl.max()),
                               realised_budget=att, fetched_per_attended=fet, summary_mass=run.comp_mass, seconds=time.perf_counter() - t1,
                               misses=[int(i) for i in (~agree).nonzero().flatten()],
                               # how close each miss was in the dense reference: log p(dense top-1) - log p(the
                               # sparse run's top-1), both under the reference (nats; small = a near tie)
                               miss_gaps=[round(float(ref[i, ref[i].argmax()] - ref[i, lp[i].argmax()]), 4)
                                          for i in (~agree).nonzero().flatten().tolist()])
                    rows.append(row)
                    print(f"{name:24s} {100 * b:6.2f}% @{offset:<6d} top1 {top1:.4f}  KL {row['mean_kl']:.4f}  "
                          f"realised {att:.3f}  fetched/attended {fet:.2f}  "
                          + (f"summary mass {run.comp_mass:.3f}  " if v.comp else "") + f"({row['seconds']:.1f} s)  miss gaps {row['miss_gaps']}",
                          flush=True)
    if len(offsets) > 1:
        print(f"pooled over {len(offsets)} windows of {args.steps} steps ({args.source}):")
        for name in args.variants.split(","):
            for b in [float(x) for x in args.budgets.split(",")]:
                rs = [r for r in rows if r["variant"] == name and r["budget"] == b]
                agree, steps = sum(r["agree"] for r in rs), sum(r["steps"] for r in rs)
                kl = sum(r["mean_kl"] * r["steps"] for r in rs) / steps
                print(f"{name:24s} {100 * b:6.2f}%  top1 {agree / steps:.4f} ({agree}/{steps})  KL {kl:.4f}  "
                      f"worst window {min(r['top1'] for r in rs):.4f}", flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "sparse_selection_study.json").write_text(json.dumps(
            {"command": " ".join(["python", "benchmarks/sparse_selection_study.py", *(argv or sys.argv[1:])]),
             "source": source, "offsets": offsets, "prefix": args.prefix, "steps": args.steps, "sink": args.sink,
             "recent": args.recent, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
