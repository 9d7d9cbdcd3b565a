"""Whether caller destination tensors share memory (``Cache.get_many(keys, out=[...])`` refuses ones that do:
the bytes two values would both be written to would hold whichever was copied last).

The check compares byte extents (``data_ptr`` to the last byte any element reaches): sorted, then one pass,
O(n log n) in the number of destinations and no tensor work when no two extents intersect (the common case:
separate tensors, or contiguous slices of one buffer).  Destinations whose extents intersect without
sharing a byte (strided views interleaved in one buffer, e.g. the same token block of every head of a
``(batch, heads, seq, dim)`` buffer) are told apart exactly: views of one layout at offsets that are
multiples of one step are proven disjoint from their strides (no tensor work); any other such group is
compared element by element, when it holds at most :data:`EXACT_LIMIT` elements (larger ones are let
through: the check never refuses destinations that are disjoint).
"""

from __future__ import annotations

from itertools import repeat
from operator import add, attrgetter, eq, ge, is_, le, lt, mod, sub
from typing import Any, Sequence

import torch

CHECK_OUT_OVERLAP = True
"""Whether ``Cache.get_many`` checks its ``out`` list (a switch for benchmarks and for callers whose destinations
are disjoint by construction: the check reads three attributes of each destination, ~0.3 µs per destination on
the 2-core development machine, see docs/api.md)."""

EXACT_LIMIT = 1 << 22
"""Most elements (or ranges) of one group of interleaved destinations compared element by element."""


def _end(t: torch.Tensor, ptr: int) -> int:
    """One past the last byte of non-empty ``t`` (at ``ptr``)."""
    if t.is_contiguous():
        return ptr + t.nbytes
    return ptr + (sum([(n - 1) * s for n, s in zip(t.shape, t.stride())]) + 1) * t.element_size()


_ptr = torch.Tensor.data_ptr
_contiguous = torch.Tensor.is_contiguous
_nbytes = attrgetter("nbytes")
_shape = attrgetter("shape")
_dtype = attrgetter("dtype")
_stride = torch.Tensor.stride


def check_disjoint(dsts: Sequence[torch.Tensor], keys: Sequence[Any] | None = None,
                   ranges: Sequence[Sequence[tuple[int, int]] | None] | None = None) -> None:
    """Raise ``ValueError`` naming two of ``dsts`` (with their keys, when given) that share a byte.

    ``ranges`` (one item per destination, as ``get_many``'s): an item that is not ``None`` writes only those
    byte ranges of its (contiguous) destination, so destinations sharing memory are fine as long as the bytes
    written do not meet (one key's parts read into several destinations, parts of several keys into one).
    Empty destinations share nothing.  Each destination must be a strided tensor (checked by the caller)."""
    n = len(dsts)
    if n < 2 or not CHECK_OUT_OVERLAP:
        return
    if ranges is not None and any([item is not None for item in ranges]):
        _check_ranged(dsts, keys, ranges)
        return
    # (C-level maps over the list: a few attribute reads per destination are the whole cost of the common case)
    ptrs = list(map(_ptr, dsts))
    if all(map(_contiguous, dsts)):
        if all(map(ge, map(sub, ptrs[1:], ptrs), map(_nbytes, dsts))):  # ascending, each ends before the next
            return
        ends = list(map(add, ptrs, map(_nbytes, dsts)))
    else:
        head = dsts[0]
        if (head.numel() and all(map(eq, map(_stride, dsts), repeat(head.stride())))
                and all(map(eq, map(_shape, dsts), repeat(head.shape)))
                and all(map(is_, map(_dtype, dsts), repeat(head.dtype)))):
            # one layout (e.g. a buffer's token blocks, interleaved): proven from the strides
            starts = ptrs if all(map(le, ptrs, ptrs[1:])) else sorted(ptrs)
            if _lattice_disjoint(head, starts) or _lattices_disjoint(head, starts):
                return
        ends = [_end(t, p) if t.nbytes else p for t, p in zip(dsts, ptrs)]
    if all(map(le, ptrs, ptrs[1:])):
        order, first, last = None, ptrs, ends
    else:
        order = sorted(range(n), key=ptrs.__getitem__)
        first, last = list(map(ptrs.__getitem__, order)), list(map(ends.__getitem__, order))
    # Sorted by start, no two extents meet iff none starts before the previous one ends.
    if not any(map(lt, first[1:], last)):
        return
    owners = order if order is not None else range(n)
    _resolve(dsts, keys, None, [(first[k], last[k], owners[k]) for k in range(n) if last[k] > first[k]])


def _check_ranged(dsts: Sequence[torch.Tensor], keys: Sequence[Any] | None,
                  ranges: Sequence[Sequence[tuple[int, int]] | None]) -> None:
    """:func:`check_disjoint` with ranged items: each range of a contiguous destination is a piece of its own."""
    pieces = []
    for i, (t, item) in enumerate(zip(dsts, ranges)):
        p = t.data_ptr()
        if item is None or not t.is_contiguous():  # (a ranged read refuses the latter later)
            if t.nbytes:
                pieces.append((p, _end(t, p), i))
        else:
            pieces.extend([(p + a, p + b, i) for a, b in item])
    pieces.sort()
    if any(map(lt, [a for a, _, _ in pieces[1:]], [b for _, b, _ in pieces])):
        _resolve(dsts, keys, ranges, pieces)


def _resolve(dsts: Sequence[torch.Tensor], keys: Sequence[Any] | None, ranges: Any,
             pieces: list[tuple[int, int, int]]) -> None:
    """Some extents of ``pieces`` (``(start, end, destination index)``, sorted by start, none empty) intersect:
    find the groups of chained intersections and decide each."""
    group: list[tuple[int, int, int]] = []
    reach = -1
    for piece in pieces + [(1 << 64, 1 << 64, -1)]:  # (a sentinel closes the last group)
        if piece[0] < reach:
            group.append(piece)
            reach = max(reach, piece[1])
            continue
        if len(group) > 1:
            _decide(dsts, keys, ranges, group)
        group, reach = [piece], piece[1]


def _whole(ranges: Any, i: int, t: torch.Tensor) -> bool:
    """Whether destination ``i`` is written whole (its piece is the tensor, not a byte range of it)."""
    return ranges is None or ranges[i] is None or not t.is_contiguous()


def _decide(dsts: Sequence[torch.Tensor], keys: Sequence[Any] | None, ranges: Any,
            group: list[tuple[int, int, int]]) -> None:
    """Raise for two pieces of ``group`` (intersecting extents) that share a byte; return if none do."""
    owners = [i for _, _, i in group]
    if all(not _whole(ranges, i, dsts[i]) or dsts[i].is_contiguous() for i in owners):
        # contiguous intervals: intersecting extents are shared bytes
        reach, holder = -1, -1
        for start, end, i in group:
            if start < reach and holder != i:
                _refuse(keys, holder, i)
            if end > reach:
                reach, holder = end, i
        return
    if _one_lattice(dsts, ranges, group):
        return
    _compare_elements(dsts, keys, ranges, group)


def _nested(shape: Sequence[int], strides: Sequence[int]) -> bool:
    """Whether a layout's elements are at distinct offsets, by a sufficient test: sorted by stride, each
    dimension's stride exceeds the largest offset the smaller ones reach."""
    reach = 0
    for stride, size in sorted((s, n) for n, s in zip(shape, strides) if n > 1):
        if stride <= reach:
            return False
        reach += stride * (size - 1)
    return True


def _lattice_disjoint(head: torch.Tensor, starts: list[int]) -> bool:
    """Whether views of ``head``'s layout at the sorted byte addresses ``starts`` are proven disjoint: distinct
    offsets, multiples of one step, whose layout with one more dimension (that step) is :func:`_nested`."""
    size = head.element_size()
    base = starts[0]
    step = min(map(sub, starts[1:], starts))
    if step <= 0 or step % size or any(map(mod, map(sub, starts, repeat(base)), repeat(step))):
        return False
    return _nested((*head.shape, (starts[-1] - base) // step + 1), (*head.stride(), step // size))


def _lattices_disjoint(head: torch.Tensor, starts: list[int]) -> bool:
    """Whether views of ``head``'s layout at the sorted byte addresses ``starts`` are proven disjoint chain by
    chain: their extents (all of one length) split into chains of intersecting extents, no two chains meet, and
    every chain of more than one view is :func:`_lattice_disjoint` (e.g. the token blocks of two decode buffers
    read in one batch: two lattices, which one lattice of all the starts cannot describe)."""
    span = _end(head, 0)  # from a view's first byte to one past its last: the same for every view of the layout
    first, n = 0, len(starts)
    for k in range(1, n + 1):
        if k < n and starts[k] < starts[k - 1] + span:  # (sorted, equal lengths: the previous one reaches furthest)
            continue
        if k - first > 1 and not _lattice_disjoint(head, starts[first:k]):
            return False
        first = k
    return True


def _one_lattice(dsts: Sequence[torch.Tensor], ranges: Any, group: list[tuple[int, int, int]]) -> bool:
    """Whether the group is whole destinations of one dtype, shape and strides that :func:`_lattice_disjoint`
    proves disjoint."""
    head = dsts[group[0][2]]
    shape, strides, dtype = head.shape, head.stride(), head.dtype
    for _, _, i in group:
        t = dsts[i]
        if t.dtype is not dtype or t.shape != shape or t.stride() != strides or not _whole(ranges, i, t):
            return False
    return _lattice_disjoint(head, [start for start, _, _ in group])


def _compare_elements(dsts: Sequence[torch.Tensor], keys: Sequence[Any] | None, ranges: Any,
                      group: list[tuple[int, int, int]]) -> None:
    """Exact test of a group: every element (or byte range) as a byte interval, sorted, each compared with
    the furthest end before it (a group above :data:`EXACT_LIMIT` intervals is let through)."""
    if sum([dsts[i].numel() if _whole(ranges, i, dsts[i]) else 1 for _, _, i in group]) > EXACT_LIMIT:
        return
    starts, ends, owners = [], [], []
    for start, end, i in group:
        t = dsts[i]
        if _whole(ranges, i, t):
            offsets = torch.zeros((), dtype=torch.int64)
            for n, s in zip(t.shape, t.stride()):
                offsets = offsets.unsqueeze(-1) + torch.arange(n, dtype=torch.int64) * s
            first = offsets.reshape(-1) * t.element_size() + start
            starts.append(first)
            ends.append(first + t.element_size())
            owners.append(torch.full_like(first, i))
        else:
            starts.append(torch.tensor([start], dtype=torch.int64))
            ends.append(torch.tensor([end], dtype=torch.int64))
            owners.append(torch.tensor([i], dtype=torch.int64))
    start_t, end_t, owner_t = torch.cat(starts), torch.cat(ends), torch.cat(owners)
    start_t, order = torch.sort(start_t, stable=True)
    end_t, owner_t = end_t[order], owner_t[order]
    reach, at = torch.cummax(end_t, 0)
    holder = owner_t[at]
    clash = (start_t[1:] < reach[:-1]) & (owner_t[1:] != holder[:-1])
    hit = torch.nonzero(clash)
    if hit.numel():
        k = int(hit[0, 0])
        _refuse(keys, int(holder[k]), int(owner_t[k + 1]))


def _refuse(keys: Sequence[Any] | None, i: int, j: int) -> None:
    i, j = min(i, j), max(i, j)
    named = f" (keys {keys[i]!r} and {keys[j]!r})" if keys is not None else ""
    raise ValueError(f"out[{i}] and out[{j}]{named} overlap in memory: each value needs destination bytes of its "
                     "own (the shared bytes would hold whichever value was copied last)")
