"""Grid search, the papers' protocol baseline, and the helpers the external optimizers share.

``grid`` enumerates, for each method of the space in order, the Cartesian product of its axes in
the space's axis order (the first axis varies slowest): ``points`` values per float axis
(``numpy.linspace`` between the bounds, geometric spacing for log axes) times every value of each
categorical axis. This is how the merging papers tune λ and density (TIES, DARE, Task Arithmetic
sweep a small grid on validation data), so it is the baseline every other optimizer must beat.

When the grid holds more points than the candidate budget, the default is to refuse with an error
(a silently truncated grid would cover only the first method's first values). ``oversize:
"sample"`` evaluates instead a seeded uniform random subset of ``budget`` grid points, still in
grid order. The grid is enumerated lazily (mixed-radix index → point), so huge grids cost nothing.

State is the position in the enumeration plus the set of finished points: on restore, every grid
point already in the history is skipped, so no finished point is proposed twice. When the grid is
exhausted ``propose`` returns None and ``exhausted`` becomes True.

Shared helpers (this module imports nothing heavy, so ``cma_opt`` and ``nevergrad_opt`` use them):
the unit-box codec of float axes (``to_unit`` / ``from_unit``), ``point_key`` (a canonical
fingerprint of a point, to recognise points across a restart), ``Ledger`` (the multiset of
observed points, which tells what part of the history a checkpoint has not seen) and
``atomic_write``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution

from mergetune.errors import MergetuneError
from mergetune.search.optimizers.base import Optimizer, Outcome, Proposal
from mergetune.search.space import METHOD_KEY, Axis, SearchSpace

log = logging.getLogger(__name__)
GRID_STATE = "grid.json"


# ---- shared helpers ------------------------------------------------------------------------------
def to_unit(dist: FloatDistribution, value: float) -> float:
    """Map a value of a float axis to [0, 1] (logarithmically for log axes), clipped."""
    if dist.log:
        u = (math.log(value) - math.log(dist.low)) / (math.log(dist.high) - math.log(dist.low))
    else:
        u = (value - dist.low) / (dist.high - dist.low)
    return min(max(float(u), 0.0), 1.0)


def from_unit(dist: FloatDistribution, u: float) -> float:
    """Inverse of ``to_unit``; clipped to the bounds (exact at the ends) so Optuna accepts it as a fixed parameter."""
    u = float(u)
    if u <= 0.0 or u >= 1.0:
        return float(dist.low if u <= 0.0 else dist.high)
    if dist.log:
        value = math.exp(math.log(dist.low) + u * (math.log(dist.high) - math.log(dist.low)))
    else:
        value = dist.low + u * (dist.high - dist.low)
    return min(max(value, dist.low), dist.high)


def point_key(params: Mapping[str, Any]) -> str:
    """A canonical fingerprint of a point (exact values: floats round-trip through the storage)."""
    text = json.dumps({k: params[k] for k in sorted(params)}, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:20]


class Ledger:
    """The points an optimizer has observed (a multiset of fingerprints, with their last loss).

    It tells which part of a history a checkpoint has not seen: the loop's history is in trial-number
    order, not in the order results arrived, so a count of observed outcomes cannot; fingerprints
    can (duplicates included). The losses let an optimizer recognise a point it is about to propose
    again as already evaluated.
    """

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.losses: dict[str, float] = {}

    def add(self, params: Mapping[str, Any], loss: float) -> None:
        key = point_key(params)
        self.counts[key] += 1
        self.losses[key] = loss

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def unseen(self, history: Sequence[tuple[dict[str, Any], Outcome]]) -> list[tuple[dict[str, Any], Outcome]]:
        """The history items this ledger has not observed, in history order."""
        left = Counter(self.counts)
        out = []
        for params, outcome in history:
            key = point_key(params)
            if left[key] > 0:
                left[key] -= 1
            else:
                out.append((params, outcome))
        return out


def atomic_write(path: Path, data: bytes) -> None:
    """Write a file so that a crash mid-write leaves the previous version intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def float_axes(space: SearchSpace) -> list[Axis]:
    return [a for a in space.axes if isinstance(a.distribution, FloatDistribution)]


# ---- the grid ------------------------------------------------------------------------------------
def axis_values(dist: BaseDistribution, points: int) -> list[Any]:
    """The grid values of one axis: ``points`` evenly spaced floats (geometric on log axes) or every choice."""
    if isinstance(dist, CategoricalDistribution):
        return list(dist.choices)
    if isinstance(dist, FloatDistribution):
        if points == 1:
            return [from_unit(dist, 0.5)]
        return [from_unit(dist, float(u)) for u in np.linspace(0.0, 1.0, points)]
    raise TypeError(f"unsupported distribution for the grid: {dist}")


class GridSearch(Optimizer):
    """Grid over every float axis × every categorical value, methods first, in a fixed order.

    Options: ``points`` (values per float axis, default 5); ``oversize`` ("error", default, or
    "sample": a seeded random subset of ``budget`` points when the grid exceeds the budget).
    """

    external = True

    name = "grid"
    multi_objective = True  # it ignores the outcomes: any objectives are fine

    def __init__(self, space: SearchSpace, *, seed: int, batch_size: int, budget: int | None, **options: Any):
        super().__init__(space, seed=seed, batch_size=batch_size, budget=budget, **options)
        unknown = sorted(set(options) - {"points", "oversize"})
        if unknown:
            raise MergetuneError(f"grid: unknown option(s) {unknown}; grid takes 'points' and 'oversize'")
        self.points = int(options.get("points", 5))
        if self.points < 1:
            raise MergetuneError(f"grid: 'points' must be at least 1, got {self.points}")
        self.oversize = options.get("oversize", "error")
        if self.oversize not in ("error", "sample"):
            raise MergetuneError(f"grid: 'oversize' must be 'error' or 'sample', got {self.oversize!r}")
        self._blocks = [(m, self._method_axes(m)) for m in space.methods]
        self.size = sum(math.prod(len(v) for _, v in axes) for _, axes in self._blocks)
        self._order = self._choose_order()
        self.position = 0  # index into self._order of the next point to consider
        self._finished: set[str] = set()

    # ---- enumeration -----------------------------------------------------------------------------
    def _method_axes(self, method: str) -> list[tuple[str, list[Any]]]:
        return [
            (a.name, axis_values(a.distribution, self.points))
            for a in self.space.axes_for(method)
            if a.method is not None
        ]

    def _choose_order(self) -> Sequence[int]:
        """Grid indices to evaluate, in order: all of them, or a sorted seeded subset (oversize)."""
        if self.budget is None or self.size <= self.budget:
            return range(self.size)
        if self.oversize == "error":
            raise MergetuneError(
                f"grid: {self.size} grid points ({self.points} per float axis over {len(float_axes(self.space))} "
                f"float axes) exceed the budget of {self.budget} candidates; use per: shared, fewer 'points', "
                f"a larger budget, option oversize: sample (a random subset of the grid), or tpe / ngopt"
            )
        subset = sorted(random.Random(self.seed).sample(range(self.size), self.budget))
        log.info("grid: %d points exceed the budget %d: evaluating a seeded random subset", self.size, self.budget)
        return subset

    def point(self, index: int) -> dict[str, Any]:
        """The grid point at ``index`` of the full enumeration (mixed radix, first axis slowest)."""
        for method, axes in self._blocks:
            count = math.prod(len(values) for _, values in axes)
            if index < count:
                params: dict[str, Any] = {METHOD_KEY: method} if len(self.space.methods) > 1 else {}
                for name, values in reversed(axes):
                    index, digit = divmod(index, len(values))
                    params[name] = values[digit]
                return self._ordered(params)
            index -= count
        raise IndexError(f"grid index out of range (grid size {self.size})")

    def _ordered(self, params: dict[str, Any]) -> dict[str, Any]:
        order = {a.name: i for i, a in enumerate(self.space.axes)}
        return {k: params[k] for k in sorted(params, key=lambda k: order[k])}

    def points_in_order(self) -> list[dict[str, Any]]:
        """Every point this grid will propose, in order (for tests and dry runs; small grids only)."""
        return [self.point(i) for i in self._order]

    @property
    def exhausted(self) -> bool:
        return self.position >= len(self._order)

    # ---- optimizer interface ---------------------------------------------------------------------
    def propose(self) -> Proposal | None:
        while not self.exhausted:
            params = self.point(self._order[self.position])
            self.position += 1
            if point_key(params) not in self._finished:
                return Proposal(params=params, token=self.position - 1)
        return None

    def observe(self, proposal: Proposal | None, params: dict[str, Any], outcome: Outcome) -> None:
        self._finished.add(point_key(params))

    def checkpoint(self, folder: Path) -> None:
        state = {"position": self.position, "size": self.size, "points": self.points, "finished": len(self._finished)}
        atomic_write(folder / GRID_STATE, json.dumps(state).encode())

    def restore(self, folder: Path, history: Sequence[tuple[dict[str, Any], Outcome]]) -> None:
        """Continue after the checkpointed position; skip every grid point already in ``history``."""
        path = folder / GRID_STATE
        state = json.loads(path.read_text()) if path.exists() else {}
        if state and (state.get("size"), state.get("points")) != (self.size, self.points):
            log.warning("grid: the checkpoint describes another grid (%s); starting from the first point", state)
            state = {}
        self.position = int(state.get("position", 0))
        self._finished = {point_key(params) for params, _ in history}
        log.info(
            "grid: resuming at position %d of %d, %d finished point(s)",
            self.position,
            len(self._order),
            len(self._finished),
        )

    def describe(self) -> str:
        return f"grid: {len(self._order)} of {self.size} points ({self.points} per float axis)"


OPTIMIZERS = [GridSearch]
