"""What the external optimizers (grid, cmaes, the Nevergrad ones) share; no plug-in imports another.

- The unit-box codec of float axes: ``to_unit`` / ``from_unit`` for one value (logarithmic on log
  axes), ``UnitBox`` for a whole point <-> a vector in [0, 1]^n, so that one step size or one grid
  spacing fits every axis whatever its bounds.
- ``point_key``: a canonical fingerprint of a point, to recognise points across a restart, and
  ``Ledger``: the multiset of observed points, which tells what part of the history a checkpoint
  has not seen.
- ``read_json`` for checkpoints (JSON: data, never code; written by ``search.atomic.write_atomic``) and
  ``CheckpointError``;
  ``import_cma`` (pycma, imported quietly on first use) and the CMA population rules, used by both
  ``cmaes`` and ``ng_cma``.

Nothing heavy is imported at module level: pycma and Nevergrad load when an optimizer first uses them.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from optuna.distributions import FloatDistribution

from mergetune.errors import MergetuneError
from mergetune.search.optimizers.base import History, Outcome
from mergetune.search.space import Axis, SearchSpace


# ---- unit box ------------------------------------------------------------------------------------
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


def float_axes(space: SearchSpace) -> list[Axis]:
    return [a for a in space.axes if isinstance(a.distribution, FloatDistribution)]


class UnitBox:
    """The float axes of a space as the unit cube: a point's float values <-> a vector, in axis order."""

    def __init__(self, space: SearchSpace) -> None:
        self.axes = float_axes(space)
        self._dists: list[FloatDistribution] = [a.distribution for a in self.axes]  # type: ignore[misc]

    def __len__(self) -> int:
        return len(self.axes)

    def decode(self, x: Sequence[float] | np.ndarray) -> dict[str, float]:
        """The float values of a unit vector, clipped into each axis' bounds."""
        return {a.name: from_unit(d, float(u)) for a, d, u in zip(self.axes, self._dists, x, strict=True)}

    def encode(self, params: Mapping[str, Any], fill: np.ndarray | None = None) -> np.ndarray:
        """The unit vector of a point. An axis the point lacks (another method's) takes ``fill``'s
        coordinate; without ``fill`` it is a KeyError."""
        x = np.empty(len(self.axes)) if fill is None else np.array(fill, dtype=float)
        for i, (axis, dist) in enumerate(zip(self.axes, self._dists, strict=True)):
            if axis.name in params:
                x[i] = to_unit(dist, float(params[axis.name]))
            elif fill is None:
                raise KeyError(axis.name)
        return x


# ---- recognising points --------------------------------------------------------------------------
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

    def unseen(self, history: History) -> list[tuple[dict[str, Any], Outcome]]:
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


class CheckpointError(MergetuneError):
    """An optimizer checkpoint cannot be read: it names the file and says how to go on without it."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(
            f"optimizer checkpoint {path}: {problem}; delete this file to rebuild the optimizer from the "
            "search's history (its finished trials are kept), then run the same command again"
        )
        self.path = path


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in a checkpoint file (None when there is none); a ``CheckpointError`` naming the
    file when it is not one. Checkpoints are JSON so that reading one never runs code."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(path, f"not readable as JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(path, f"a JSON {type(data).__name__}, not an object")
    return data


# ---- CMA-ES (pycma directly, or inside Nevergrad) ------------------------------------------------
def import_cma() -> Any:
    """pycma, imported on first use (it takes a second; the CLI should not pay it for other optimizers)."""
    with warnings.catch_warnings():  # pycma warns at import when matplotlib is missing
        warnings.simplefilter("ignore")
        import cma  # heavy optional dependency: imported on use

    return cma


def default_popsize(dimension: int) -> int:
    """pycma's default population size, 4 + ⌊3 ln n⌋ (Hansen)."""
    return 4 + int(3 * math.log(max(dimension, 1)))


def round_up(value: int, multiple: int) -> int:
    """``value`` rounded up to a multiple of ``multiple`` (at least one multiple): whole batches per generation."""
    return max(multiple, -(-value // multiple) * multiple)


# ---- generations ------------------------------------------------------------------------------
@dataclass
class Member:
    """One point of a generation: its unit-box coordinates and what became of it."""

    x: np.ndarray
    key: str
    loss: float | None = None
    handed: bool = False  # proposed to the loop (or filled without evaluation)


@dataclass
class Generation:
    """A population asked of a generational optimizer (CMA-ES, a GA), handed out and told back whole."""

    number: int
    members: list[Member]

    @property
    def complete(self) -> bool:
        return all(m.loss is not None for m in self.members)

    def next_free(self) -> int | None:
        return next((i for i, m in enumerate(self.members) if not m.handed and m.loss is None), None)


def next_member(gens: Sequence[Generation]) -> tuple[Generation, int] | None:
    """The oldest generation's first member not handed out yet (None: every member is out or done)."""
    for gen in gens:
        index = gen.next_free()
        if index is not None:
            return gen, index
    return None


def member_of(gens: Sequence[Generation], token: Any, params: Mapping[str, Any]) -> Member | None:
    """The member an outcome belongs to: by its proposal's ``(generation, index)`` token, else by equal
    parameters (a point the optimizer did not propose may fill a member: a retry is not evaluated twice)."""
    if isinstance(token, tuple):
        number, index = token
        for gen in gens:
            if gen.number == number and gen.members[index].loss is None:
                return gen.members[index]
        return None
    key = point_key(params)
    for gen in gens:
        for member in gen.members:
            if member.key == key and member.loss is None:
                return member
    return None


def check_continuous(space: SearchSpace, name: str, algorithm: str) -> None:
    """Optimizers of a box of reals: refuse method choices and categorical options clearly."""
    if len(space.methods) > 1:
        raise MergetuneError(
            f"{name} ({algorithm}) needs a continuous space, but the space searches {len(space.methods)} methods "
            f"{list(space.methods)}: keep one method, or use ngopt or tpe, which search the method choice"
        )
    categorical = [a.name for a in space.axes if a not in float_axes(space)]
    if categorical:
        raise MergetuneError(
            f"{name} ({algorithm}) needs a continuous space, but {categorical} are categorical: fix these options "
            f"to one value (or give a {{low, high}} range), or use ngopt or tpe"
        )
    if not space.axes:
        raise MergetuneError(f"{name} ({algorithm}): the space has no parameter to search")
