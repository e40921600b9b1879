"""Grid search, the papers' protocol baseline.

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
point already in the history is skipped, so no finished point is proposed twice. The position
always rests on a point not yet evaluated (or the end), so that ``exhausted`` is True as soon as
nothing is left to propose: the loop then stops rather than asking ``propose`` for a point it
has not got (a None would have fallen back to the study's random sampler).
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution

from mergetune.errors import MergetuneError
from mergetune.search.atomic import write_atomic
from mergetune.search.optimizers._external import (
    CheckpointError,
    float_axes,
    from_unit,
    point_key,
    read_json,
)
from mergetune.search.optimizers.base import ExternalOptimizer, History, Outcome, Proposal
from mergetune.search.optimizers.registry import register_optimizer
from mergetune.search.space import METHOD_KEY, SearchSpace

log = logging.getLogger(__name__)
GRID_STATE = "grid.json"
GRID_VERSION = 1  # earlier files had no version and the same fields: read as version 1


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


@register_optimizer
class GridSearch(ExternalOptimizer):
    """Grid over every float axis × every categorical value, methods first, in a fixed order.

    Options: ``points`` (values per float axis, default 5); ``oversize`` ("error", default, or
    "sample": a seeded random subset of ``budget`` points when the grid exceeds the budget).
    """

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

    def _skip_finished(self) -> None:
        """Move the position past grid points already evaluated (warm starts, a restored history)."""
        while not self.exhausted and point_key(self.point(self._order[self.position])) in self._finished:
            self.position += 1

    # ---- optimizer interface ---------------------------------------------------------------------
    def propose(self) -> Proposal | None:
        if self.exhausted:
            return None
        index = self.position
        self.position += 1
        self._skip_finished()
        return Proposal(params=self.point(self._order[index]), token=index)

    def observe(self, proposal: Proposal | None, params: dict[str, Any], outcome: Outcome) -> None:
        self._finished.add(point_key(params))
        self._skip_finished()

    def checkpoint(self, folder: Path) -> None:
        state = {
            "version": GRID_VERSION,
            "position": self.position,
            "size": self.size,
            "points": self.points,
            "finished": len(self._finished),
        }
        write_atomic(folder / GRID_STATE, json.dumps(state).encode())

    def restore(self, folder: Path, history: History) -> None:
        """Continue after the checkpointed position; skip every grid point already in ``history``."""
        path = folder / GRID_STATE
        state = read_json(path) or {}
        if state.get("version", GRID_VERSION) != GRID_VERSION:
            raise CheckpointError(path, f"grid state version {state['version']!r} unknown (reads {GRID_VERSION})")
        state.pop("version", None)
        if state and (state.get("size"), state.get("points")) != (self.size, self.points):
            log.warning("grid: the checkpoint describes another grid (%s); starting from the first point", state)
            state = {}
        position = state.get("position", 0)
        if not isinstance(position, int) or isinstance(position, bool):
            raise CheckpointError(path, f"'position' {position!r} is not an integer")
        self.position = position
        self._finished = {point_key(params) for params, _ in history}
        self._skip_finished()
        log.info(
            "grid: resuming at position %d of %d, %d finished point(s)",
            self.position,
            len(self._order),
            len(self._finished),
        )

    def describe(self) -> str:
        return f"grid: {len(self._order)} of {self.size} points ({self.points} per float axis)"
