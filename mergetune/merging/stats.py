"""Candidate-independent order statistics: thresholds at any density become lookups.

Every sparsifying method keeps, per task, the entries whose score (|τ|, or PCB's β) is among the
top fraction ``density`` of a *block*: the whole model (scope ``global``), one tensor (``tensor``)
or one row (``row``). The scores do not depend on the candidate, only the density does, so each
block's scores are sorted once; the k-th largest score is then one gather per row, and a new
candidate costs a few streaming passes, not a sort.

Thresholds are always returned **per row** (``[T, n_rows]``) whatever the scope, so that every
merge kernel sees the same shapes: a global or per-tensor threshold is simply repeated over rows.

Counting convention (documented in README "Methods"): density d keeps the ⌊d·n⌋ largest scores of
a block of n, plus every entry tied with the smallest of them; d = 0 keeps nothing (threshold
+inf). The official TIES code keeps int(d·n) + 1 entries and their ties (``official_keep_counts``);
mergekit keeps exactly max(1, int(d·n)), tied magnitudes cut in its sort order (``order_scores``:
thresholds on an entry's rank in that order select exactly k entries). Methods expose the three as
the ``tie_rule`` option (``keep_ties``, ``official``, ``mergekit``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import torch

from mergetune.merging.modelset import ModelSet


class Scope(StrEnum):
    """Over which entries a top-k ranking is taken."""

    GLOBAL = "global"  # all merged parameters of one task vector (official TIES/PCB code)
    TENSOR = "tensor"  # each tensor separately (mergekit, DARE)
    ROW = "row"  # each row (last dimension) of each tensor (Breadcrumbs, DELLA)


@dataclass(frozen=True)
class RowLayout:
    """Rows of the flat store (a row = last dimension of a tensor; a 1-D tensor is one row)."""

    start: torch.Tensor  # [n_rows] flat offset of each row
    length: torch.Tensor  # [n_rows]
    segment: torch.Tensor  # [n_rows] index of the tensor holding the row
    group: torch.Tensor  # [n_rows] layer group of the row

    @property
    def n_rows(self) -> int:
        return self.start.numel()

    def blocks(self, scope: Scope, modelset: ModelSet) -> tuple[torch.Tensor, torch.Tensor]:
        """(start, length) of the ranking block that holds each row."""
        if scope is Scope.ROW:
            return self.start, self.length
        if scope is Scope.TENSOR:
            seg_start = torch.tensor([s.offset for s in modelset.segments], device=self.start.device)
            seg_len = torch.tensor([s.numel for s in modelset.segments], device=self.start.device)
            return seg_start[self.segment], seg_len[self.segment]
        zero = torch.zeros_like(self.start)
        return zero, torch.full_like(self.start, modelset.numel)


def build_row_layout(modelset: ModelSet, group_of_segment: list[int]) -> RowLayout:
    starts, lengths, segs, groups = [], [], [], []
    for i, seg in enumerate(modelset.segments):
        n_rows = seg.numel // seg.row_length
        starts.append(seg.offset + torch.arange(n_rows, dtype=torch.int64) * seg.row_length)
        lengths.append(torch.full((n_rows,), seg.row_length, dtype=torch.int64))
        segs.append(torch.full((n_rows,), i, dtype=torch.int64))
        groups.append(torch.full((n_rows,), group_of_segment[i], dtype=torch.int64))
    dev = modelset.device
    return RowLayout(*(torch.cat(x).to(dev) for x in (starts, lengths, segs, groups)))


KEEP_GUARD = 1e-9  # d·n = 28.999999999999996 for d = 0.29, n = 100 counts as 29


def keep_counts(
    density: torch.Tensor, block_length: torch.Tensor, row_group: torch.Tensor, guard: float = KEEP_GUARD
) -> torch.Tensor:
    """k[t, r] = ⌊density[t, group(r)] · n(r) + guard⌋, computed in float64 so that d·n is exact enough.

    ``guard = 0`` is Python's ``int(d * n)``, the count of the official TIES code and of mergekit.
    """
    d = density.to(torch.float64)[:, row_group]  # [T, n_rows]
    return torch.floor(d * block_length.to(torch.float64) + guard).to(torch.int64).clamp(min=0)


def official_keep_counts(density: torch.Tensor, block_length: torch.Tensor, row_group: torch.Tensor) -> torch.Tensor:
    """The official TIES code's count: int(d·n) + 1 (its threshold is the (n − int(d·n))-th smallest), at most n.

    At density 0 the official code still keeps the largest entry; here a task at density 0 keeps
    nothing, so that density 0 switches a task off under every tie rule.
    """
    k = keep_counts(density, block_length, row_group, guard=0.0) + 1
    k = torch.minimum(k, block_length.unsqueeze(0).expand_as(k))
    return torch.where(density.to(torch.float64)[:, row_group] > 0, k, torch.zeros_like(k))


def order_thresholds(k: torch.Tensor, block_length: torch.Tensor) -> torch.Tensor:
    """Threshold on ``order_scores`` that keeps exactly the k highest-ranked entries of each block: n − k.

    Order scores are a permutation of 0..n−1 within a block, so ``score ≥ n − k`` selects exactly k
    entries (none at k = 0), with no ties possible.
    """
    return block_length.unsqueeze(0) - k


def sort_order_scores(magnitude: torch.Tensor, descending: bool) -> torch.Tensor:
    """Each entry's rank in ``torch.sort`` order along the last dim, as a score (larger = ranked higher).

    The sort runs on the CPU in float32, as mergekit 0.1.5's ``sparsify`` does (``w.float()`` then
    ``torch.argsort(w, descending=True)`` for ``magnitude``, ``torch.sort(w).indices`` for
    ``magnitude_outliers``): torch's CPU sort is not stable, but it is deterministic for the same
    values in the same order (any thread count), so tied magnitudes land in mergekit's order, bit for
    bit. This is mergekit run on the CPU (``mergekit-yaml``'s default); with ``--cuda`` its sort is
    CUDA's, whose order of ties differs. The scores are computed on the CPU whatever the store's device.
    ``descending``: score = n − 1 − position in the descending order; else the ascending position.
    """
    w = magnitude.detach().to("cpu", torch.float32)
    order = torch.sort(w, dim=-1, descending=descending).indices
    n = w.shape[-1]
    positions = torch.arange(n, dtype=torch.int64).expand_as(order)
    if descending:
        positions = (n - 1) - positions
    return torch.empty_like(order).scatter_(-1, order, positions)


ScoreFn = Callable[[ModelSet], torch.Tensor]  # -> [T, D] scores, same layout as the store


def abs_scores(modelset: ModelSet) -> torch.Tensor:
    """The default score: |τ| (magnitude ranking)."""
    return modelset.tau.abs()


class OrderStatistics:
    """Sorted scores per block, computed once per (score kind, scope) and reused by every candidate."""

    def __init__(self, modelset: ModelSet, rows: RowLayout) -> None:
        self.modelset = modelset
        self.rows = rows
        self._sorted: dict[tuple[str, Scope], torch.Tensor] = {}
        self._scores: dict[str, torch.Tensor] = {}
        self._other: dict[str, Any] = {}

    def scores(self, kind: str, compute: ScoreFn) -> torch.Tensor:
        """Per-entry scores of a kind (``[T, D]``), cached; ``abs`` is |τ| and is not stored."""
        if kind == "abs":
            return self.modelset.tau.abs()
        if kind not in self._scores:
            self._scores[kind] = compute(self.modelset)
        return self._scores[kind]

    def sorted_scores(self, kind: str, scope: Scope, compute: ScoreFn) -> torch.Tensor:
        key = (kind, scope)
        if key not in self._sorted:
            if kind == "abs":  # one task's |τ| at a time: no [T, D] temporary
                task_scores: Callable[[int], torch.Tensor] = lambda t: self.modelset.tau[t].abs()  # noqa: E731
            else:
                full = self.scores(kind, compute)
                task_scores = full.__getitem__
            self._sorted[key] = sort_blocks(task_scores, scope, self.modelset)
        return self._sorted[key]

    def order_scores(self, scope: Scope, descending: bool) -> torch.Tensor:
        """``[T, D]`` integer scores: each entry's rank in torch's CPU sort of |τ| within its block.

        Used by the ``mergekit`` tie rule: thresholds on these scores (``order_thresholds``) keep
        exactly k entries per block, tied magnitudes in mergekit's order. Computed once; 4 bytes
        per entry (8 for blocks of 2³¹ entries or more).
        """
        kind = f"order:{scope.value}:{'desc' if descending else 'asc'}"
        return self.scores(kind, lambda ms: order_scores(ms, scope, descending))

    def kth_largest(self, kind: str, scope: Scope, k: torch.Tensor, compute: ScoreFn = abs_scores) -> torch.Tensor:
        """The k-th largest score of each row's block (``[T, n_rows]``); +inf where k = 0."""
        srt = self.sorted_scores(kind, scope, compute)
        start, length = self.rows.blocks(scope, self.modelset)
        idx = start + length - k.clamp(min=1)
        vals = srt.gather(1, idx)
        return torch.where(k > 0, vals, torch.full_like(vals, math.inf))

    def cached(self, key: str, compute: Callable[[ModelSet], Any]) -> Any:
        """Any other candidate-independent precomputation (e.g. SVD factors), computed once."""
        if key not in self._other:
            self._other[key] = compute(self.modelset)
        return self._other[key]

    def extra_bytes(self) -> int:
        tensors = [*self._sorted.values(), *self._scores.values(), *_tensors_in(self._other.values())]
        return sum(t.numel() * t.element_size() for t in tensors)


def _tensors_in(values: Any) -> list[torch.Tensor]:
    """All tensors inside nested lists, tuples and dicts (for memory accounting)."""
    if isinstance(values, torch.Tensor):
        return [values]
    if isinstance(values, dict):
        values = values.values()
    if isinstance(values, str | bytes):
        return []
    if isinstance(values, list | tuple) or hasattr(values, "__iter__"):
        return [t for v in values for t in _tensors_in(v)]
    return []


def order_scores(modelset: ModelSet, scope: Scope, descending: bool) -> torch.Tensor:
    """``sort_order_scores`` of |τ| for every block of a scope, task by task (see ``OrderStatistics.order_scores``)."""
    dtype = torch.int32 if modelset.numel < 2**31 else torch.int64  # scores < block length ≤ numel
    out = torch.empty(modelset.n_tasks, modelset.numel, dtype=dtype, device=modelset.device)
    if scope is Scope.GLOBAL:
        blocks = [(0, modelset.numel, modelset.numel)]
    else:
        blocks = [(s.offset, s.end, s.row_length if scope is Scope.ROW else s.numel) for s in modelset.segments]
    for t in range(modelset.n_tasks):
        for a, b, length in blocks:
            scores = sort_order_scores(modelset.tau[t, a:b].abs().view(-1, length), descending)
            out[t, a:b] = scores.reshape(-1).to(out.device, dtype)
    return out


def sort_blocks(task_scores: Callable[[int], torch.Tensor], scope: Scope, modelset: ModelSet) -> torch.Tensor:
    """Sort each task's ``[D]`` scores ascending within each block, in place of the block's range.

    Task by task, so that the sort's temporaries (values and int64 indices) stay one task large.
    """
    out: torch.Tensor | None = None
    for t in range(modelset.n_tasks):
        scores = task_scores(t)
        if out is None:  # the scores' own dtype: thresholds must compare exactly with the scores
            out = torch.empty(modelset.n_tasks, modelset.numel, dtype=scores.dtype, device=scores.device)
        if scope is Scope.GLOBAL:
            out[t] = torch.sort(scores).values
            continue
        for seg in modelset.segments:
            block = scores[seg.offset : seg.end]
            if scope is Scope.ROW:
                block = block.reshape(-1, seg.row_length)
            out[t, seg.offset : seg.end] = torch.sort(block, dim=-1).values.reshape(-1)
    assert out is not None
    return out


class NaiveStatistics(OrderStatistics):
    """The naive reference: a ``kthvalue`` per block and candidate, nothing precomputed.

    Used by the benchmark to measure what precomputation buys, and by tests as a cross-check.
    Scores (e.g. PCB's β) and other precomputations (e.g. SVDs) are recomputed on every call too.
    """

    def scores(self, kind: str, compute: ScoreFn) -> torch.Tensor:
        return self.modelset.tau.abs() if kind == "abs" else compute(self.modelset)

    def cached(self, key: str, compute: Callable[[ModelSet], Any]) -> Any:
        return compute(self.modelset)

    def kth_largest(self, kind: str, scope: Scope, k: torch.Tensor, compute: ScoreFn = abs_scores) -> torch.Tensor:
        scores = self.scores(kind, compute)
        if scope is Scope.ROW:
            return self._row_kth_largest(scores, k)
        start, length = self.rows.blocks(scope, self.modelset)
        out = torch.full(k.shape, math.inf, dtype=scores.dtype, device=scores.device)
        # Rows sharing a block and a k share a threshold: compute each distinct one once.
        keys = torch.stack([start.expand_as(k), length.expand_as(k), k], dim=-1)
        for t in range(k.shape[0]):
            uniq, inverse = torch.unique(keys[t], dim=0, return_inverse=True)
            vals = torch.full((uniq.shape[0],), math.inf, dtype=scores.dtype, device=scores.device)
            for j, (a, n, kk) in enumerate(uniq.tolist()):
                if kk > 0:
                    vals[j] = torch.kthvalue(scores[t, a : a + n], n - min(kk, n) + 1).values
            out[t] = vals[inverse]
        return out

    def _row_kth_largest(self, scores: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Batched ``kthvalue`` over the rows of each tensor (one k per task and tensor)."""
        out = torch.full(k.shape, math.inf, dtype=scores.dtype, device=scores.device)
        row = 0
        for seg in self.modelset.segments:
            L = seg.row_length
            n_rows = seg.numel // L
            shaped = scores[:, seg.offset : seg.end].reshape(scores.shape[0], n_rows, L)
            for t in range(k.shape[0]):
                kk = int(k[t, row])  # rows of one tensor share a group, hence a k
                if kk > 0:
                    kth = torch.kthvalue(shaped[t], L - min(kk, L) + 1, dim=1).values
                    out[t, row : row + n_rows] = kth
            row += n_rows
        return out
