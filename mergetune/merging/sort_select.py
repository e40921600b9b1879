"""The first k entries of torch's CPU sort of a 1-D float32 tensor, without sorting it.

Why: mergekit 0.1.5 keeps exactly k entries of a tensor, tied magnitudes cut in the order of
``torch.argsort`` on the CPU (``tie_rule: mergekit``). torch's CPU sort of float32 is libstdc++'s
``std::sort`` (introsort) on (value, index) pairs, comparing values only (``a > b`` descending,
``a < b`` ascending), so which of several tied entries land before position k depends on every
step of the sort. A full sort costs 70-80 ns per entry on this machine and was most of a one-shot
TIES merge with mergekit's rules.

How: introsort's partitions are independent once made. Each step picks the median of the entries
at positions 1, m/2 and m - 1 of its range, moves it to the front and runs a Hoare partition
around it; the sort then recurses into both halves, and an insertion sort (stable, never moving an
entry across a partition boundary) finishes ranges of at most 16 entries. The *set* of entries at
positions [0, k) therefore only depends on the partitions of the ranges that contain position k:
follow that one path, with exactly the same pivots and swaps, then sort the last <= 16 entries
stably. That is a quickselect, expected O(n), and gives the same set as the sort, bit for bit.

Each Hoare partition is computed vectorised: the left scan stops at the i-th entry (from the left)
that does not compare before the pivot, the right scan at the i-th (from the right) that the pivot
does not compare before; pair i is swapped while its left stop lies before its right stop, and the
partition point is the first crossing (``_crossing``). Ranges where introsort would fall back to a
heap sort (depth limit 2·⌊log₂ n⌋ exhausted) are not emulated: ``first_k`` returns False and the
caller sorts. ``sort_is_introsort`` checks once per process, on a tie-heavy probe, that this torch
build sorts that way (a build using x86-simd-sort would not; the caller then sorts as before).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

INSERTION_RANGE = 16  # libstdc++'s _S_threshold: ranges this short are left to the insertion sort
_BLOCK = 1024  # entries per block when locating the i-th stop through block counts
_BISECT_FROM = 1 << 18  # ranges at least this long find the partition point by bisection on block counts


def depth_limit(n: int) -> int:
    """Partitions introsort makes on a path before a heap sort takes over: 2·⌊log₂ n⌋."""
    return 2 * (n.bit_length() - 1)


@dataclass
class _Stops:
    """Positions of the set entries of a mask, the i-th from the left (or right) found via block counts."""

    mask: np.ndarray
    from_right: bool

    def __post_init__(self) -> None:
        m = self.mask.shape[0]
        full = m // _BLOCK
        # Sum bytes 8 at a time: each of the 8 byte lanes of a uint64 sums <= _BLOCK / 8 = 128 ones, no carry.
        lanes = self.mask[: full * _BLOCK].view(np.uint64).reshape(full, _BLOCK // 8).sum(1)
        counts = lanes.view(np.uint8).reshape(full, 8).sum(1, dtype=np.int64)
        if full * _BLOCK < m:
            counts = np.append(counts, np.count_nonzero(self.mask[full * _BLOCK :]))
        self.blocks = counts.shape[0]
        self.cum = np.cumsum(counts[::-1] if self.from_right else counts)
        self.total = int(self.cum[-1]) if self.blocks else 0

    def at(self, i: int) -> int:
        j = int(np.searchsorted(self.cum, i, side="right"))
        rank = i - (int(self.cum[j - 1]) if j else 0)
        block = self.blocks - 1 - j if self.from_right else j
        start = block * _BLOCK
        local = np.flatnonzero(self.mask[start : start + _BLOCK])
        return start + int(local[-1 - rank] if self.from_right else local[rank])


def _crossing(lstop: np.ndarray, rstop: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """(partition point, swapped left stops, swapped right stops) of a Hoare partition with these stops.

    Left stops are visited ascending, right stops descending; swap i pairs L[i] with R[i] while L[i] < R[i]
    (a prefix of i, since L rises and R falls). The partition point is min(L[swaps], R[swaps - 1]): the
    left scan stops at its next stop or at the last swapped right stop, whichever comes first. Positions
    are int64 (numpy converts narrower indices on every use).
    """
    m = lstop.shape[0]
    if m < _BISECT_FROM:
        left, right = np.flatnonzero(lstop), np.flatnonzero(rstop)[::-1]
        r = min(left.shape[0], right.shape[0])
        swaps = int(np.count_nonzero(left[:r] < right[:r]))
        low = int(right[swaps - 1]) if swaps else m
        return min(int(left[swaps]) if swaps < left.shape[0] else m, low), left[:swaps], right[:swaps]
    ls, rs = _Stops(lstop, from_right=False), _Stops(rstop, from_right=True)
    swaps, hi = 0, min(ls.total, rs.total)
    while swaps < hi:
        mid = (swaps + hi) // 2
        if ls.at(mid) < rs.at(mid):
            swaps = mid + 1
        else:
            hi = mid
    low = rs.at(swaps - 1) if swaps else m
    cut = min(ls.at(swaps) if swaps < ls.total else m, low)
    return cut, np.flatnonzero(lstop[:cut]), (np.flatnonzero(rstop[low:]) + low)[::-1]


def _median_slot(v: np.ndarray, descending: bool) -> int:
    """libstdc++'s ``__move_median_to_first(first, first + 1, mid, last - 1)``: which slot moves to 0."""
    m = v.shape[0]
    a, b, c = 1, m // 2, m - 1
    va, vb, vc = float(v[a]), float(v[b]), float(v[c])

    def before(x: float, y: float) -> bool:
        return x > y if descending else x < y

    if before(va, vb):
        if before(vb, vc):
            return b
        return c if before(va, vc) else a
    if before(va, vc):
        return a
    return c if before(vb, vc) else b


KEPT_ENTRIES = 1 << 22  # workspaces up to this size are kept for the next call (80 MiB each)


class _Workspace:
    """Buffers for one ``first_k`` call (fresh pages cost more than the work: reused).

    Original positions are int64 (numpy converts narrower indices on every use: 3× slower scatters) up to
    KEPT_ENTRIES, int32 above, where memory counts more (and int64 again from 2³¹): 20 or 14 bytes per entry.
    """

    size = 0

    def ensure(self, n: int) -> None:
        if n <= self.size:
            return
        self.values = np.empty(n, np.float32)
        self.index = np.empty(n, np.int32 if KEPT_ENTRIES < n < 2**31 else np.int64)
        self.lstop, self.rstop = np.empty(n, np.bool_), np.empty(n, np.bool_)
        half = n // 2 + 1  # a partition swaps at most n / 2 pairs
        self.moved_values, self.moved_index = np.empty(half, np.float32), np.empty(half, self.index.dtype)
        self.size = n


_SPARE: list[_Workspace] = []
_SPARE_LOCK = threading.Lock()


@contextmanager
def _workspace(n: int) -> Iterator[_Workspace]:
    """A workspace for n entries: a spare one if any, else new; kept afterwards unless larger than KEPT_ENTRIES."""
    with _SPARE_LOCK:
        ws = _SPARE.pop() if _SPARE else _Workspace()
    try:
        ws.ensure(n)
        yield ws
    finally:
        if ws.size <= KEPT_ENTRIES:
            with _SPARE_LOCK:
                _SPARE.append(ws)


def first_k(values: np.ndarray, k: int, descending: bool, keep: np.ndarray, magnitude: bool = False) -> bool:
    """Set ``keep[i]`` for the entries that torch's CPU ``sort`` of ``values`` puts at positions [0, k).

    ``values``: 1-D float32, finite (``magnitude``: rank ``|values|``). ``keep``: bool, same length.
    Returns False (``keep`` then undefined) where introsort would switch to a heap sort: sort instead.
    """
    n = values.shape[0]
    k = max(0, min(k, n))
    keep[:] = k == n
    if k in (0, n):
        return True
    with _workspace(n) as ws:
        v, idx = ws.values[:n], ws.index[:n]
        if magnitude:
            np.abs(values, out=v)
        else:
            np.copyto(v, values)
        idx[:] = np.arange(n, dtype=idx.dtype)  # in the index's width: no int64 temporary beside an int32 index
        return _follow(v, idx, k, descending, keep, ws)


def _follow(v: np.ndarray, idx: np.ndarray, k: int, descending: bool, keep: np.ndarray, ws: _Workspace) -> bool:
    """``first_k``'s loop: partition the range holding position k until the insertion sort's range is left."""
    before_or_tie, after_or_tie = (np.less_equal, np.greater_equal) if descending else (np.greater_equal, np.less_equal)
    depth, start = depth_limit(v.shape[0]), 0
    while v.shape[0] > INSERTION_RANGE:
        if depth == 0:
            return False
        depth -= 1
        m = v.shape[0]
        med = _median_slot(v, descending)
        v[[0, med]], idx[[0, med]] = v[[med, 0]], idx[[med, 0]]
        lstop, rstop = ws.lstop[:m], ws.rstop[:m]
        before_or_tie(v, v[0], out=lstop)  # the left scan stops at entries not sorted before the pivot
        lstop[0] = False  # it starts after the pivot's slot
        after_or_tie(v, v[0], out=rstop)  # the right scan stops at entries the pivot is not sorted before
        cut, lefts, rights = _crossing(lstop, rstop)
        swaps = lefts.shape[0]
        moved = ws.moved_values[:swaps], ws.moved_index[:swaps]
        target = k - start
        if target < cut:  # keep the left range: the right stops' entries move into it
            _move(v, idx, rights, lefts, moved)
            v, idx = v[:cut], idx[:cut]
            continue
        keep[idx[:cut]] = True  # the left range is all before position k: after the swaps it holds
        keep[idx[lefts]] = False  # its own entries but those at its stops,
        keep[idx[rights]] = True  # and the right stops' entries
        if target == cut:
            return True
        _move(v, idx, lefts, rights, moved)
        v, idx, start = v[cut:], idx[cut:], start + cut
    order = np.argsort(-v if descending else v, kind="stable")  # the insertion sort: stable
    keep[idx[order[: k - start]]] = True
    return True


def _move(
    v: np.ndarray, idx: np.ndarray, source: np.ndarray, target: np.ndarray, buffers: tuple[np.ndarray, np.ndarray]
) -> None:
    """v[target] = v[source] and idx[target] = idx[source] (one side of the partition's swaps)."""
    for array, buffer in zip((v, idx), buffers, strict=True):
        np.take(array, source, out=buffer)
        array[target] = buffer


@functools.cache
def sort_is_introsort() -> bool:
    """Whether torch's CPU sort of float32 is the introsort ``first_k`` follows (checked once, on a probe).

    The probe (3001 entries, 40 distinct values) ties heavily, so a different algorithm or pivot rule
    would order its ties differently; it is checked in both directions at several k.
    """
    n = 3001
    probe = ((np.arange(n, dtype=np.int64) * 7919 + 13) % 101 % 40).astype(np.float32)
    keep = np.empty(n, np.bool_)
    for descending in (True, False):
        order = torch.sort(torch.from_numpy(probe), descending=descending).indices.numpy()
        for k in (1, 17, 600, 1500, 2999):
            if not first_k(probe, k, descending, keep):
                return False
            expected = np.zeros(n, np.bool_)
            expected[order[:k]] = True
            if not np.array_equal(keep, expected):
                return False
    return True
