"""Growing slices of a task's examples for multi-fidelity scoring: stratified, seeded, the same for every candidate.

A candidate scored with fidelity sees its task's examples in slices, e.g. the first 1/8, then up to
1/4, 1/2 and all (``fractions`` are cumulative). The slices are fixed by the seed and the task's
name alone, so every candidate of a search is scored on the same examples at each stage and two
candidates' per-example results can be paired. Where the task has labels (classification, the gold
option of a multiple-choice question) the order is stratified: every prefix holds each label in its
share of the whole, within one example, so a first slice of 1/8 is not all of one class by chance.
"""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Sequence

import numpy as np

from mergetune.errors import TaskError

#: Cumulative fractions of a task's examples scored at each stage, by default.
DEFAULT_FRACTIONS = (0.125, 0.25, 0.5, 1.0)


def check_fractions(fractions: Sequence[float]) -> tuple[float, ...]:
    """The fractions, checked: strictly increasing, in (0, 1], the last one 1 (a candidate that is not
    stopped is scored on every example)."""
    values = tuple(float(f) for f in fractions)
    if not values or values[-1] != 1.0 or any(not 0 < f <= 1 for f in values):
        raise TaskError(f"fidelity slices {list(values)}: give increasing fractions in (0, 1] that end with 1")
    if any(b <= a for a, b in itertools.pairwise(values)):
        raise TaskError(f"fidelity slices {list(values)} must increase strictly, e.g. [0.125, 0.25, 0.5, 1]")
    return values


def stratified_order(n: int, labels: Sequence[int] | np.ndarray | None, seed: int, task: str) -> np.ndarray:
    """A seeded order of ``n`` example rows whose every prefix is stratified by ``labels`` (if given).

    Each label's rows are shuffled and spread evenly over [0, 1) with a random phase; sorting all rows
    by that key interleaves the labels so any prefix holds each label in proportion, within one row.
    The stream depends on the seed and the task's name (tasks are shuffled independently).
    """
    rng = np.random.default_rng([seed, zlib.crc32(task.encode())])
    if labels is None:
        return rng.permutation(n)
    labels = np.asarray(labels)
    keys = np.empty(n, dtype=np.float64)
    for label in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == label))
        keys[rows] = (np.arange(len(rows)) + rng.random()) / len(rows)
    return np.lexsort((np.arange(n), keys))


def slice_parts(order: np.ndarray, fractions: Sequence[float]) -> list[np.ndarray]:
    """The rows each stage adds (sorted), from a row order and cumulative fractions; every stage adds at
    least one row while rows are left, and the last ends with every row."""
    n = len(order)
    bounds, last = [], 0
    for fraction in check_fractions(fractions):
        end = n if fraction == 1.0 else min(n, max(last + 1, int(np.ceil(fraction * n))))
        bounds.append((last, end))
        last = end
    return [np.sort(order[start:end]) for start, end in bounds]


def task_slices(
    n: int, labels: Sequence[int] | np.ndarray | None, fractions: Sequence[float], seed: int, task: str
) -> list[np.ndarray]:
    """The rows each stage adds for a task of ``n`` examples (see the module docstring)."""
    return slice_parts(stratified_order(n, labels, seed, task), fractions)
