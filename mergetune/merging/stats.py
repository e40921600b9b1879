"""Candidate-independent order statistics: exact top-k thresholds at any density, no sorted copy.

Every sparsifying method keeps, per task, the entries whose score (|τ|, or PCB's β) is among the
top fraction ``density`` of a *block*: the whole model (scope ``global``), one tensor (``tensor``)
or one row (``row``). The scores do not depend on the candidate, only the density does, so each
block's bucket counts (a histogram on the top 16 bits of the scores' float32 order keys) are
built once; the k-th largest score is then a lookup of the bucket that holds it plus, unless it is
that bucket's largest or smallest value, one streaming pass that counts the low 16 bits of that
bucket's entries (global and tensor scope) or sorts them (row scope) (``OrderStatistics``). The
result is bit for bit the k-th largest of the block (tested against ``NaiveStatistics``, a
``kthvalue`` per block and query); extra memory is a few percent of the store.

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

import functools
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, NamedTuple

import numpy as np
import torch

from mergetune.merging import sort_select
from mergetune.merging.modelset import ModelSet
from mergetune.merging.shared_scores import Allocate, Home, shared_tensors, task_sized_cache
from mergetune.parallel import map_on_threads, release_freed_memory


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


def sort_order_scores(magnitude: torch.Tensor, descending: bool, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Each entry's rank in ``torch.sort`` order along the last dim, as a score (larger = ranked higher).

    The sort runs on the CPU in float32, as mergekit 0.1.5's ``sparsify`` does (``w.float()`` then
    ``torch.argsort(w, descending=True)`` for ``magnitude``, ``torch.sort(w).indices`` for
    ``magnitude_outliers``): torch's CPU sort is not stable, but it is deterministic for the same
    values in the same order (any thread count, any calling thread), so tied magnitudes land in
    mergekit's order, bit for bit. This is mergekit run on the CPU (``mergekit-yaml``'s default); with
    ``--cuda`` its sort is CUDA's, whose order of ties differs. The scores are computed on the CPU
    whatever the store's device. ``descending``: score = n − 1 − position in the descending order; else
    the ascending position. ``dtype``: the scores' integer type (int32 halves the scatter's traffic).
    """
    w = magnitude.detach().to("cpu", torch.float32)
    order = torch.sort(w, dim=-1, descending=descending).indices
    del w  # a copy (input on another device or in another dtype) is not held through the scatter
    n = order.shape[-1]
    positions = torch.arange(n - 1, -1, -1, dtype=dtype) if descending else torch.arange(n, dtype=dtype)
    return torch.empty(order.shape, dtype=dtype).scatter_(-1, order, positions.expand_as(order))


def cut_order_scores(tau: torch.Tensor, cuts: Sequence[torch.Tensor], descending: bool) -> torch.Tensor:
    """``[T, n]`` integer scores of one tensor-scope block of ``tau`` (ranked by |τ|) that compare with
    ``cuts`` as ``sort_order_scores`` do (int32; int64 from 2³¹ entries).

    ``cuts``: thresholds on the order scores, ``[T]`` each (one per task). An entry's score is the largest
    cut that its rank in torch's sort reaches (−1 if none), so ``score ≥ cut`` holds exactly where
    ``rank ≥ cut`` does, for these cuts only. The entries ranked at or above a cut are the first n − cut
    (descending) or all but the first ``cut`` (ascending) of the sort: ``sort_select.first_k`` finds them
    without sorting (expected O(n) instead of a sort's O(n log n); one SmolLM2 task vector's 271 tensors
    below 1 M entries, one thread: 5.1 s sorted, 1.45 s selected). A task whose sort it cannot follow (a
    heap-sort fallback, a non-finite value) is ranked by ``sort_order_scores``; so is every task when this
    torch does not sort by introsort. Tasks run on torch's threads at once, but one at a time in a block
    above ``sort_select.KEPT_ENTRIES`` entries, so that one 14-byte-per-entry workspace is held (a 28 M-entry
    embedding: 0.4 GB).
    """
    w = tau.detach().to("cpu", torch.float32)
    n = w.shape[-1]
    dtype = torch.int32 if n < 2**31 else torch.int64  # scores are cuts or ranks, at most n
    if not sort_select.sort_is_introsort():
        return sort_order_scores(w.abs(), descending, dtype).to(tau.device)
    out = torch.full(w.shape, -1, dtype=dtype)

    def score_task(t: int) -> None:
        values, scores = w[t].numpy(), out[t].numpy()
        keep = np.empty(n, np.bool_)
        finite = n == 0 or bool(np.isfinite(np.max(values)) and np.isfinite(np.min(values)))
        for cut in sorted({int(c[t]) for c in cuts}):
            k = n - cut if descending else cut
            if not (finite and sort_select.first_k(values, k, descending, keep, magnitude=True)):
                out[t] = sort_order_scores(w[t : t + 1].abs(), descending, dtype)[0]
                return
            scores[keep if descending else ~keep] = cut  # ranked at or above it; a later (higher) cut overwrites

    parallel = n <= sort_select.KEPT_ENTRIES
    map_on_threads(
        score_task,
        list(range(w.shape[0])),
        min(w.shape[0], torch.get_num_threads()) if parallel else 1,
        "mergetune-select",
    )
    return out.to(tau.device)


# (modelset, allocate) -> [T, D] scores in the store's layout, written into the buffer ``allocate(dtype)`` gives
# (where the cache lives: memory, a file shared with the machine's other workers, or beside a disk store).
ScoreFn = Callable[[ModelSet, Allocate], torch.Tensor]


def abs_scores(modelset: ModelSet, allocate: Allocate | None = None) -> torch.Tensor:
    """The default score: |τ| (magnitude ranking; never cached, so no buffer is asked for)."""
    return modelset.tau.abs()


# ---- order keys and buckets ----------------------------------------------------------------------
# A score's order key is an int32 whose signed order is the float order: non-negative floats order like
# their bit patterns, negative ones in reverse (their 31 low bits are flipped). A bucket is the top 16
# bits of the key: 65,536 buckets over the whole float range, each an interval of one bfloat16 value.

BUCKET_BITS = 16
N_BUCKETS = 1 << BUCKET_BITS
CHUNK = 1 << 22  # entries per streaming step: bounds every temporary of a pass
ROW_BUCKET_ENTRIES = 8  # row scope: a row's buckets hold about this many of its entries each
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


def order_keys(values: torch.Tensor) -> torch.Tensor:
    """int32 keys ordered as the float32 values are (−0 folded into +0: they compare equal)."""
    bits = (values.to(torch.float32) + 0.0).view(torch.int32)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def key_values(keys: torch.Tensor) -> torch.Tensor:
    """The float32 values of order keys (inverse of ``order_keys``)."""
    keys = keys.to(torch.int32)
    return torch.where(keys < 0, keys ^ 0x7FFFFFFF, keys).view(torch.float32)


_NEG_INF_KEY, _POS_INF_KEY = order_keys(torch.tensor([-math.inf, math.inf])).tolist()


def bucket_of(keys: torch.Tensor) -> torch.Tensor:
    """Bucket index (top 16 bits of the order key, 0 ≤ b < N_BUCKETS) of each key."""
    return (keys >> BUCKET_BITS) + N_BUCKETS // 2


def bucket_first_key(buckets: torch.Tensor) -> torch.Tensor:
    """The smallest order key of each bucket (int64: the bucket above the last one starts at 2³¹)."""
    return (buckets.to(torch.int64) - N_BUCKETS // 2) << BUCKET_BITS


# ---- histograms --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """Blocks sharing one histogram layout: a task's whole store (global scope) or one tensor (tensor
    scope: one block; row scope: a block per row), with the rows of ``RowLayout`` it covers."""

    start: int
    stop: int
    block_length: int
    first_row: int
    n_rows: int
    whole_blocks: bool  # row scope: passes take whole rows; a global or tensor block streams in any chunks

    @property
    def rows(self) -> slice:
        return slice(self.first_row, self.first_row + self.n_rows)

    def chunks(self) -> Iterator[tuple[int, int]]:
        """Flat ranges of at most ``CHUNK`` entries (whole blocks when blocks are rows)."""
        unit = self.block_length if self.whole_blocks else 1
        step = max(unit, CHUNK // unit * unit)
        for a in range(self.start, self.stop, step):
            yield a, min(self.stop, a + step)


def families(scope: Scope, modelset: ModelSet) -> list[Family]:
    if scope is Scope.GLOBAL:
        n_rows = sum(s.numel // s.row_length for s in modelset.segments)
        return [Family(0, modelset.numel, modelset.numel, 0, n_rows, False)]
    out, row = [], 0
    for seg in modelset.segments:
        n_rows = seg.numel // seg.row_length
        length = seg.row_length if scope is Scope.ROW else seg.numel
        out.append(Family(seg.offset, seg.end, length, row, n_rows, scope is Scope.ROW))
        row += n_rows
    return out


class BlockCounts(NamedTuple):
    """One block's non-empty buckets, highest first: cumulative counts from the top, and bounds of each bucket's
    keys: exact (its smallest and largest key) for the block's minimum and maximum and for a bucket that holds one
    value (every bucket of a bfloat16 block); the bucket's key range otherwise."""

    cum: torch.Tensor  # [S] int64
    low: torch.Tensor  # [S] int32
    high: torch.Tensor  # [S] int32


class RowCounts(NamedTuple):
    """A tensor's rows over shared coarse buckets (``start``: first 16-bit bucket of each, highest first).

    Row bucket q spans the 16-bit buckets [start[q], start[q − 1]); the bounds split the tensor's
    entries into about equal shares, so a row's bucket holds about ``ROW_BUCKET_ENTRIES`` entries.
    """

    start: torch.Tensor  # [S] int32, descending, last = 0
    cum: torch.Tensor  # [R, S] cumulative counts from the top (int16 for rows shorter than 2¹⁵)
    low: torch.Tensor  # [R] int32 smallest key of each row
    high: torch.Tensor  # [R] int32 largest key of each row


def _check_keys(low: int, high: int, where: str) -> None:
    if low < _NEG_INF_KEY or high > _POS_INF_KEY:
        raise ValueError(f"{where} holds NaN scores: top-k thresholds need every score to be a number")


def bucket_histogram(source: ScoreSource, t: int, fam: Family) -> torch.Tensor:
    """``[N_BUCKETS]`` int64 counts of one task's scores in a family.

    torch's CPU ``bincount`` runs on one thread, so on CPU the chunks are counted on torch's threads at once,
    each into its own counts (summed: the same integers in any order)."""
    chunks = list(fam.chunks())
    workers = min(torch.get_num_threads(), len(chunks)) if source.values.device.type == "cpu" else 1

    def count(chunk: tuple[int, int]) -> torch.Tensor:
        return source.histogram(source.values[t, chunk[0] : chunk[1]])

    return functools.reduce(torch.add, map_on_threads(count, chunks, workers, "mergetune-count"))


def block_counts(source: ScoreSource, t: int, fam: Family, where: str) -> BlockCounts:
    """Non-empty buckets of one block with their counts and key bounds (one pass).

    bfloat16 scores (|τ| of a bfloat16 store) hold one value per bucket: its key follows from the bucket. Other
    dtypes keep only the block's minimum and maximum key: a cut is rarely its bucket's extreme value, and the
    per-bucket minimum and maximum were two scattered passes with an int64 index per entry (most of the pass)."""
    one_value = source.values.dtype == torch.bfloat16
    if one_value:
        counts = bucket_histogram(source, t, fam)
    else:
        counts, lowest, highest = _key_counts(source, t, fam)
    used = counts.nonzero().flatten().flip(0)
    if one_value:
        low = high = bfloat16_bucket_key(used)
    else:
        low = bucket_first_key(used).to(torch.int32)
        high = (bucket_first_key(used + 1) - 1).to(torch.int32)
        low[-1], high[0] = lowest, highest
    out = BlockCounts(counts[used].cumsum(0), low, high)
    _check_keys(int(out.low[-1]), int(out.high[0]), where)
    return out


def _key_counts(source: ScoreSource, t: int, fam: Family) -> tuple[torch.Tensor, int, int]:
    """Bucket counts of a block's order keys, with its smallest and largest key."""
    counts = torch.zeros(N_BUCKETS, dtype=torch.int64, device=source.values.device)
    lowest, highest = _INT32_MAX, _INT32_MIN
    for a, b in fam.chunks():
        keys = source.keys(source.values[t, a:b])
        counts += torch.bincount(bucket_of(keys), minlength=N_BUCKETS)
        low, high = torch.aminmax(keys)
        lowest, highest = min(lowest, int(low)), max(highest, int(high))
    return counts, lowest, highest


def bfloat16_bucket_key(buckets: torch.Tensor) -> torch.Tensor:
    """The one order key of a bfloat16 value in each bucket: its bits, then 16 zero bits (positive) or, since a
    negative key flips the low 31 bits, 16 one bits."""
    first = bucket_first_key(buckets)
    return torch.where(first < 0, first | 0xFFFF, first).to(torch.int32)


def row_bucket_starts(histogram: torch.Tensor, n_buckets: int) -> torch.Tensor:
    """Descending first 16-bit buckets of ≤ ``n_buckets`` row buckets that share a tensor's entries about equally."""
    used = histogram.nonzero().flatten().flip(0)
    cum = histogram[used].cumsum(0)
    shares = torch.arange(1, n_buckets, dtype=torch.int64, device=cum.device) * cum[-1] // n_buckets
    cuts = used[torch.searchsorted(cum, shares)]
    return torch.unique(torch.cat([cuts, torch.zeros(1, dtype=cuts.dtype, device=cuts.device)])).flip(0).to(torch.int32)


def row_counts(source: ScoreSource, t: int, fam: Family, where: str) -> RowCounts:
    """Per-row cumulative counts over the tensor's shared row buckets (two passes over the tensor)."""
    L = fam.block_length
    start = row_bucket_starts(bucket_histogram(source, t, fam), max(1, L // ROW_BUCKET_ENTRIES))
    ascending, S = start.flip(0), start.numel()
    cum_dtype = torch.int16 if L < 2**15 else torch.int32
    cums, lows, highs = [], [], []
    for a, b in fam.chunks():
        keys = source.keys(source.values[t, a:b]).view(-1, L)
        q = (S - torch.searchsorted(ascending, bucket_of(keys), right=True)).long()
        counts = torch.zeros(keys.shape[0], S, dtype=torch.int32, device=keys.device).scatter_add_(
            1, q, torch.ones_like(q, dtype=torch.int32)
        )
        cums.append(counts.cumsum(1).to(cum_dtype))
        lows.append(keys.amin(1))
        highs.append(keys.amax(1))
    out = RowCounts(start, torch.cat(cums), torch.cat(lows), torch.cat(highs))
    _check_keys(int(out.low.min()), int(out.high.max()), where)
    return out


# ---- selection ---------------------------------------------------------------------------------------


class Cut(NamedTuple):
    """Where each query's k-th largest lies: its key when the counts alone tell, else the bucket to search."""

    key: torch.Tensor  # [Q] int32, valid where ``known``
    known: torch.Tensor  # [Q] bool
    lo: torch.Tensor  # [Q] int64 key range of the bucket holding it
    hi: torch.Tensor
    rank: torch.Tensor  # [Q] r: the k-th largest is the r-th largest in its bucket
    size: torch.Tensor  # [Q] entries in that bucket


def _locate(cum: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bucket q holding the k-th largest, entries above it and in it (``cum`` [B, S] from the top, ``k`` [B, Q])."""
    q = torch.searchsorted(cum, k.to(cum.dtype)).clamp(max=cum.shape[1] - 1)
    upto = cum.gather(1, q).to(torch.int64)
    above = torch.where(q > 0, cum.gather(1, (q - 1).clamp(min=0)), 0).to(torch.int64)
    return q.flatten(), above.flatten(), (upto - above).flatten()


def block_cut(c: BlockCounts, k: torch.Tensor) -> Cut:
    """Cuts of queries ``k`` (1 ≤ k ≤ n) in one block: known when the k-th is the block's maximum or minimum, or
    its bucket holds one value (always so on a bfloat16 store)."""
    q, above, size = _locate(c.cum.unsqueeze(0), k.unsqueeze(0))
    rank = k - above
    high, low = c.high[q], c.low[q]
    at_max, at_min = (rank == 1) & (q == 0), (rank == size) & (q == c.cum.numel() - 1)
    key = torch.where(at_max, high, low)
    known = at_max | at_min | (low == high)
    return Cut(key, known, low.to(torch.int64), high.to(torch.int64), rank, size)


def row_cut(c: RowCounts, k: torch.Tensor) -> Cut:
    """Cuts of one k per row (1 ≤ k ≤ row length): known for a row's maximum, minimum or a constant row."""
    q, above, size = _locate(c.cum, k.unsqueeze(1))
    rank, last = k - above, c.start.numel() - 1
    top = (q == 0) & (rank == 1)
    key = torch.where(top | (c.high == c.low), c.high, c.low)
    known = top | ((q == last) & (rank == size)) | (c.high == c.low)
    upper = torch.where(q > 0, c.start[(q - 1).clamp(min=0)].to(torch.int64), N_BUCKETS)
    return Cut(key, known, bucket_first_key(c.start[q]), bucket_first_key(upper) - 1, rank, size)


def _stale(where: str) -> RuntimeError:
    return RuntimeError(f"{where}: the scores changed after their histograms were built; rebuild the statistics")


class ScoreSource(NamedTuple):
    """Where a score kind is read: the store itself for |τ| (``magnitude``), else the kind's cached scores."""

    values: torch.Tensor  # [T, D]
    magnitude: bool  # rank |values| (the store's τ) rather than the values

    def keys(self, raw: torch.Tensor) -> torch.Tensor:
        """Order keys of raw values read from ``values``."""
        return order_keys(raw.abs() if self.magnitude else raw)

    def histogram(self, raw: torch.Tensor) -> torch.Tensor:
        """``[N_BUCKETS]`` int64 counts of the buckets of raw values read from ``values``.

        |τ| of a float32 or bfloat16 store is counted on its raw top 16 bits with the sign cleared (a
        non-negative key's bucket is those bits + N/2), as int16 or int32: building an int64 key or
        index per entry costs several times the count itself."""
        if self.magnitude and raw.dtype in (torch.float32, torch.bfloat16):
            upper = torch.bincount((top_halves(raw) & 0x7FFF).reshape(-1), minlength=N_BUCKETS // 2)
            return torch.cat([torch.zeros_like(upper), upper])
        if raw.dtype == torch.bfloat16:  # signed scores (PCB's β): count the raw bit patterns, then map them
            patterns = torch.bincount((raw.view(torch.int16).to(torch.int32) & 0xFFFF).reshape(-1), minlength=N_BUCKETS)
            return torch.zeros_like(patterns).index_add_(0, bfloat16_pattern_buckets(patterns.device), patterns)
        return torch.bincount(bucket_of(self.keys(raw)).reshape(-1), minlength=N_BUCKETS)

    def prefixes(
        self, t: int, a: int, b: int, shape: tuple[int, ...], non_negative: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw values of [a, b) (viewed as ``shape``) and their keys' top 16 bits (key >> 16).

        Non-negative float32 or bfloat16 scores (|τ| always) read the prefix straight from the top half of
        each value's bits, sign cleared: two cheap int16 operations instead of a key per entry. The
        passes that search a cut bucket run on these prefixes; keys are computed for the entries kept.
        """
        x = self.values[t, a:b].view(shape)
        if (self.magnitude or non_negative) and x.dtype in (torch.float32, torch.bfloat16):
            return x, top_halves(x) & 0x7FFF
        return x, self.keys(x) >> BUCKET_BITS

    def top_patterns(self, prefix: int) -> list[int]:
        """The raw top 16 bits (int16, as ``top_halves`` reads them) of the float32 values whose order-key prefix
        is ``prefix``: matching them finds a bucket's entries without an order key per entry. A pattern may also
        match values of another bucket (−0's raw top half is the tiniest negatives'): filter by key after."""
        if self.magnitude:
            return [prefix, prefix - N_BUCKETS // 2]  # |τ| ≥ 0: key = raw bits with the sign cleared, either sign
        # negative values: key = bits ^ 0x7FFFFFFF, so the top halves differ by ^ 0x7FFF; −0 (raw top half
        # −32768) has the key of +0
        raw = prefix if prefix >= 0 else prefix ^ 0x7FFF
        return [raw, -(N_BUCKETS // 2)] if prefix == 0 else [raw]


@functools.cache  # per device: read by every chunk's histogram
def bfloat16_pattern_buckets(device: torch.device) -> torch.Tensor:
    """``[N_BUCKETS]`` int64: the bucket of the bfloat16 value whose bits, read as uint16, are the index (−0 shares
    +0's bucket, NaNs lie beyond ±inf's, as ``order_keys`` puts them)."""
    bits = torch.arange(N_BUCKETS, dtype=torch.int32, device=device) << BUCKET_BITS
    return bucket_of(order_keys(bits.view(torch.float32))).to(torch.int64)


def top_halves(x: torch.Tensor) -> torch.Tensor:
    """int16 view of the top 16 bits of each float32 (a strided view, no copy) or bfloat16 value."""
    half = x.view(torch.int16)
    if x.dtype == torch.float32:  # the high half of each 32-bit word
        half = half[..., 1::2] if sys.byteorder == "little" else half[..., 0::2]
    return half


class BucketFinder:
    """The entries of a chunk that lie in a few buckets (``prefixes``), for the pass that searches cut buckets.

    A float32 block (the only dtype whose buckets hold several values, bar float16) matches the raw top
    16 bits of its values (``ScoreSource.top_patterns``): against each pattern when there are few (one compare
    per pattern on a view of the bits), else by a table lookup on them; both write into buffers reused across
    chunks, since a fresh multi-MB temporary per chunk costs more in page faults than the compare itself. Other
    dtypes look up their order keys' buckets. Callers filter the entries by key (a pattern may match another
    bucket's values).
    """

    COMPARE_LIMIT = 4  # patterns matched by compares; more go through the table

    def __init__(self, source: ScoreSource, prefixes: list[int]) -> None:
        self.source = source
        self.table = torch.zeros(N_BUCKETS, dtype=torch.bool, device=source.values.device)
        self.raw_bits = source.values.dtype == torch.float32
        if self.raw_bits:
            self.patterns = sorted({x for p in prefixes for x in source.top_patterns(p)})
            wanted = self.patterns
        else:
            wanted = prefixes
        self.table[torch.tensor(wanted, dtype=torch.int64, device=self.table.device) + N_BUCKETS // 2] = True
        self._mask = self._spare = self._index = torch.empty(0, device=self.table.device)

    def entries(self, raw: torch.Tensor) -> torch.Tensor:
        """The values of ``raw`` (flat) in the wanted buckets (and, for float32, any sharing their top bits)."""
        if not self.raw_bits:
            return raw[self.table.index_select(0, bucket_of(self.source.keys(raw)))]
        n = raw.numel()
        if self._mask.numel() < n:
            self._mask = torch.empty(n, dtype=torch.bool, device=raw.device)
        mask = self._mask[:n]
        if len(self.patterns) <= self.COMPARE_LIMIT:
            top = top_halves(raw)
            torch.eq(top, self.patterns[0], out=mask)
            for pattern in self.patterns[1:]:
                if self._spare.numel() < n:
                    self._spare = torch.empty(n, dtype=torch.bool, device=raw.device)
                mask.logical_or_(torch.eq(top, pattern, out=self._spare[:n]))
        else:
            if self._index.numel() < n:
                self._index = torch.empty(n, dtype=torch.int32, device=raw.device)
            index = torch.bitwise_right_shift(raw.view(torch.int32), BUCKET_BITS, out=self._index[:n])
            torch.index_select(self.table, 0, index.add_(N_BUCKETS // 2), out=mask)
        return raw[mask]


class LowHalfCounts:
    """Per wanted bucket (``buckets``: ascending key prefixes), the counts of its keys' low 16 bits, added chunk
    by chunk: the r-th largest key of a bucket is then a cumulative sum away, with no entry kept."""

    def __init__(self, source: ScoreSource, buckets: torch.Tensor) -> None:
        device = source.values.device
        self.source = source
        self.finder = BucketFinder(source, buckets.tolist())
        self.n = len(buckets)
        self.slot_of = torch.full((N_BUCKETS,), self.n, dtype=torch.int64, device=device)
        self.slot_of[buckets.to(device) + N_BUCKETS // 2] = torch.arange(self.n, device=device)  # prefix -> row
        self.flat = torch.zeros(self.n * N_BUCKETS, dtype=torch.int64, device=device)

    def add(self, raw: torch.Tensor) -> None:
        """Count the entries of ``raw`` (values as ``source`` reads them) that lie in the wanted buckets."""
        keys = self.source.keys(self.finder.entries(raw.reshape(-1)))
        # a pattern may match a key of another bucket (−0's raw top half is the tiniest negatives'): skip it
        slot = self.slot_of[bucket_of(keys).long()]
        inside = slot < self.n
        self.flat += torch.bincount((slot * N_BUCKETS + (keys & 0xFFFF))[inside], minlength=self.flat.numel())

    @property
    def counts(self) -> torch.Tensor:
        """``[len(buckets), N_BUCKETS]`` counts, row i for bucket i, low halves ascending."""
        return self.flat.view(self.n, N_BUCKETS)


def search_block(source: ScoreSource, t: int, fam: Family, cut: Cut, where: str) -> torch.Tensor:
    """Keys of the unknown cuts of one block: one pass counts the low 16 bits of the cut buckets' entries.

    A key is its bucket (top 16 bits) and 16 low bits, so per cut bucket a ``[N_BUCKETS]`` histogram of the low
    halves locates the r-th largest key exactly: no entry is kept, and every query is a cumulative sum.
    """
    todo = (~cut.known).nonzero().flatten()
    key = cut.key.clone()
    if todo.numel() == 0:
        return key
    buckets = torch.unique(cut.lo[todo] >> BUCKET_BITS)  # key prefixes of the cut buckets, ascending
    counter = LowHalfCounts(source, buckets)
    for a, b in fam.chunks():
        counter.add(source.values[t, a:b])
    from_top = counter.counts.flip(1).cumsum(1)  # [W, N_BUCKETS]: entries at or above each low half, highest first
    for i in todo.tolist():
        prefix = int(cut.lo[i]) >> BUCKET_BITS
        w = int(torch.searchsorted(buckets, torch.tensor(prefix, device=buckets.device)))
        if int(from_top[w, -1]) != int(cut.size[i]):
            raise _stale(where)
        low = N_BUCKETS - 1 - int(torch.searchsorted(from_top[w], int(cut.rank[i])))
        key[i] = (prefix << BUCKET_BITS) | low
    return key


def search_rows(source: ScoreSource, t: int, fam: Family, c: RowCounts, cut: Cut, where: str) -> torch.Tensor:
    """Keys of the unknown cuts of a tensor's rows: one pass over whole rows, a sort of each row's bucket only."""
    key = cut.key.clone()
    L = fam.block_length
    non_negative = int(c.low.min()) >= 0
    for a, b in fam.chunks():
        r0 = (a - fam.start) // L
        rows = slice(r0, r0 + (b - a) // L)
        todo = ~cut.known[rows]
        if not bool(todo.any()):
            continue
        raw, prefix = source.prefixes(t, a, b, (-1, L), non_negative)
        lo, hi = (cut.lo[rows] >> BUCKET_BITS).to(prefix.dtype), (cut.hi[rows] >> BUCKET_BITS).to(prefix.dtype)
        inside = (prefix >= lo[:, None]) & (prefix <= hi[:, None])
        if not bool(todo.all()):  # rows whose cut is known take no part
            inside &= todo[:, None]
        flat = inside.view(-1).nonzero().squeeze(1)  # one index pass serves both the rows and the values
        row_of = flat // L
        count = torch.bincount(row_of, minlength=raw.shape[0])
        if not torch.equal(count[todo], cut.size[rows][todo]):
            raise _stale(where)
        values = source.keys(raw.reshape(-1)[flat]).to(torch.int64)
        ranked = torch.sort((row_of << 32) | (values - _INT32_MIN)).values
        pick = (count.cumsum(0) - cut.rank[rows])[todo]  # ascending within a row: r-th largest at count − r
        key[rows][todo] = ((ranked[pick] & 0xFFFFFFFF) + _INT32_MIN).to(torch.int32)
    return key


class OrderStatistics:
    """Exact k-th largest scores per block at any k, from bucket counts built once per (score kind, scope).

    Setup is one pass (two for row scope) over the scores: per block the counts of its 16-bit
    buckets (the top half of a float's bits), with each bucket's extreme values; row scope shares
    coarser buckets over a tensor (``RowCounts``). A threshold is then a lookup of the bucket holding
    the k-th largest, and when it is not that bucket's largest or smallest value, one streaming pass
    over the block: a block's cut buckets are found by a table lookup on each entry's top bits, and a
    histogram of their entries' low 16 bits gives the exact key (``search_block``; rows sort their
    bucket's few entries, ``search_rows``). No sorted copy of the store is
    made: extra memory is a few bytes per non-empty bucket, and ``ROW_BUCKET_ENTRIES``-th of a count
    per row entry for row scope. The last few results per (kind, scope) are kept, so a threshold that
    does not depend on the candidate (Breadcrumbs' upper cut at a fixed γ) costs nothing after the first.
    """

    RECENT = 4  # results kept per (kind, scope)

    def __init__(self, modelset: ModelSet, rows: RowLayout) -> None:
        self.modelset = modelset
        self.rows = rows
        self._counts: dict[tuple[str, Scope], list[list[BlockCounts | RowCounts]]] = {}
        self._recent: dict[tuple[str, Scope], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._scores: dict[str, torch.Tensor] = {}
        self._homes: dict[str, Home] = {}  # where each cached score kind lives
        self._count_homes: dict[tuple[str, Scope], Home] = {}  # where each kind's bucket counts live
        self._other: dict[str, Any] = {}

    def scores(self, kind: str, compute: ScoreFn) -> torch.Tensor:
        """Per-entry scores of a kind (``[T, D]``), cached; ``abs`` is |τ| and is not stored."""
        if kind == "abs":
            return self.modelset.tau.abs()
        if kind not in self._scores:
            self._scores[kind], self._homes[kind] = task_sized_cache(self.modelset, kind, compute)
            release_freed_memory()
        return self._scores[kind]

    def order_scores(self, scope: Scope, descending: bool, cuts: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """``[T, D]`` integer scores: each entry's rank in torch's CPU sort of |τ| within its block.

        Used by the ``mergekit`` tie rule: thresholds on these scores (``order_thresholds``) keep
        exactly k entries per block, tied magnitudes in mergekit's order. The order of ties comes from
        torch's unstable sort of the whole block, so it cannot be derived from counts: computed once,
        4 bytes per entry (8 for blocks of 2³¹ entries or more), only when that rule is used.

        ``cuts`` (``[T, n_rows]`` thresholds) are the comparisons the caller will make. These resident
        statistics ignore them (the ranks serve every candidate); a one-shot merge's statistics may return
        scores that compare like the ranks with these cuts only (``cut_order_scores``).
        """
        kind = f"order:{scope.value}:{'desc' if descending else 'asc'}"
        return self.scores(kind, lambda ms, allocate: order_scores(ms, scope, descending, allocate))

    def kth_largest(self, kind: str, scope: Scope, k: torch.Tensor, compute: ScoreFn = abs_scores) -> torch.Tensor:
        """The k-th largest score of each row's block (``[T, n_rows]``, the scores' dtype); +inf where k = 0."""
        recent = self._recent.setdefault((kind, scope), [])
        for i, (seen, result) in enumerate(recent):
            if seen.shape == k.shape and torch.equal(seen, k):
                recent.append(recent.pop(i))
                return result
        result = self._kth_largest(kind, scope, k, compute)
        recent.append((k.clone(), result))
        del recent[: -self.RECENT]
        return result

    def _kth_largest(self, kind: str, scope: Scope, k: torch.Tensor, compute: ScoreFn) -> torch.Tensor:
        source = self._source(kind, compute)
        counts = self._histograms(kind, scope, source)
        keys = torch.zeros(k.shape, dtype=torch.int32, device=k.device)
        for t in range(k.shape[0]):
            for i, (fam, c) in enumerate(zip(families(scope, self.modelset), counts[t], strict=True)):
                where = f"score '{kind}', task {t}, {scope.value} block {i}"
                kk = k[t, fam.rows].clamp(1, fam.block_length)
                if isinstance(c, RowCounts):
                    keys[t, fam.rows] = search_rows(source, t, fam, c, row_cut(c, kk), where)
                    continue
                distinct, inverse = torch.unique(kk, return_inverse=True)
                keys[t, fam.rows] = search_block(source, t, fam, block_cut(c, distinct), where)[inverse]
        values = key_values(keys).to(source.values.dtype)
        return torch.where(k > 0, values, torch.full_like(values, math.inf))

    def _source(self, kind: str, compute: ScoreFn) -> ScoreSource:
        """|τ| is read from the store chunk by chunk (never a [T, D] copy); other kinds from their cached scores."""
        if kind == "abs":
            return ScoreSource(self.modelset.tau, magnitude=True)
        return ScoreSource(self.scores(kind, compute), magnitude=False)

    def _histograms(self, kind: str, scope: Scope, source: ScoreSource) -> list[list[BlockCounts | RowCounts]]:
        key = (kind, scope)
        if key not in self._counts:
            build, fields = (row_counts, RowCounts) if scope is Scope.ROW else (block_counts, BlockCounts)
            fams = families(scope, self.modelset)

            def count() -> list[torch.Tensor]:  # every block's counts, their fields in one flat list
                return [
                    field
                    for t in range(self.modelset.n_tasks)
                    for i, f in enumerate(fams)
                    for field in build(source, t, f, f"score '{kind}', task {t}, {scope.value} block {i}")
                ]

            # built once per machine for the workers that share this store (shared_scores.shared_tensors)
            flat, self._count_homes[key] = shared_tensors(self.modelset, f"counts:{kind}:{scope.value}", count)
            arity, per_task = len(fields._fields), len(fams)
            blocks = [fields(*flat[j : j + arity]) for j in range(0, len(flat), arity)]
            self._counts[key] = [blocks[t * per_task : (t + 1) * per_task] for t in range(self.modelset.n_tasks)]
            release_freed_memory()  # the passes' chunk temporaries, freed on several threads
        return self._counts[key]

    def cached(self, key: str, compute: Callable[[ModelSet], Any]) -> Any:
        """Any other candidate-independent precomputation (e.g. SVD factors), computed once."""
        if key not in self._other:
            self._other[key] = compute(self.modelset)
            release_freed_memory()
        return self._other[key]

    def held_bytes(self) -> dict[str, int]:
        """Bytes held beyond the store, by purpose: threshold structures (bucket counts and kept results),
        cached score kinds (e.g. PCB's β, DELLA's ranks, the mergekit rule's order scores) and other caches.
        What lives in files (``shared_scores``) is counted apart: ``…_shared`` in shared memory (one copy for
        the machine's workers), ``…_on_disk`` beside a disk-tier store, mapped like it; the score kinds'
        default key follows the tier (``scores`` in memory, ``scores_on_disk`` beside a disk store)."""
        default: Home = "disk" if self.modelset.residency.tier == "disk" else "memory"
        parts: dict[str, list[Any]] = {"thresholds": [list(self._recent.values())], _keyed("scores", default): []}
        for key, counts in self._counts.items():
            parts.setdefault(_keyed("thresholds", self._count_homes[key]), []).append(counts)
        for kind, tensor in self._scores.items():
            parts.setdefault(_keyed("scores", self._homes[kind]), []).append(tensor)
        parts["other"] = list(self._other.values())
        return {name: sum(t.numel() * t.element_size() for t in _tensors_in(held)) for name, held in parts.items()}

    def extra_bytes(self) -> int:
        """This process's own memory beyond the store: ``held_bytes`` summed, without what lives in files (on
        disk, or in shared memory counted once per machine, as the store is)."""
        return sum(size for name, size in self.held_bytes().items() if not name.endswith(_IN_FILES))


_IN_FILES = ("_shared", "_on_disk")


def _keyed(purpose: str, home: Home) -> str:
    return purpose + {"memory": "", "shared_memory": "_shared", "disk": "_on_disk"}[home]


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


def order_scores(modelset: ModelSet, scope: Scope, descending: bool, allocate: Allocate | None = None) -> torch.Tensor:
    """``sort_order_scores`` of |τ| for every block of a scope (see ``OrderStatistics.order_scores``).

    A tensor-scope block is one sort, which torch runs on one thread: the tasks are sorted on torch's
    number of threads at once (extra memory: one tensor's sort per thread). A global block (the whole
    model) is sorted a task at a time, so that only one such sort is in memory; row-scope blocks too,
    their rows spread over threads by torch.
    """
    dtype = torch.int32 if modelset.numel < 2**31 else torch.int64  # scores < block length ≤ numel
    out = (allocate or modelset.task_sized_buffer)(dtype)
    if scope is Scope.GLOBAL:
        blocks = [(0, modelset.numel, modelset.numel)]
    else:
        blocks = [(s.offset, s.end, s.row_length if scope is Scope.ROW else s.numel) for s in modelset.segments]

    def score_task(t: int) -> None:
        for a, b, length in blocks:
            scores = sort_order_scores(modelset.tau[t, a:b].abs().view(-1, length), descending, dtype)
            out[t, a:b] = scores.reshape(-1).to(out.device)

    workers = min(modelset.n_tasks, torch.get_num_threads()) if scope is Scope.TENSOR else 1
    map_on_threads(score_task, list(range(modelset.n_tasks)), workers, "mergetune-sort")
    return out


class NaiveStatistics(OrderStatistics):
    """The naive reference: a ``kthvalue`` per block and candidate, nothing precomputed.

    Used by the benchmark to measure what precomputation buys, and by tests as a cross-check.
    Scores (e.g. PCB's β) and other precomputations (e.g. SVDs) are recomputed on every call too.
    """

    def scores(self, kind: str, compute: ScoreFn) -> torch.Tensor:
        return self.modelset.tau.abs() if kind == "abs" else compute(self.modelset, self.modelset.task_sized_buffer)

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
