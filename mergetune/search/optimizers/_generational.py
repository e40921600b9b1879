"""What the generational optimizers on the unit box share (``cmaes``, ``pymoo_ga``).

Both ask their library for a whole population, hand it out to the loop point by point, and tell it
back whole, in ask order, when every point is observed (``Generation``/``Member`` in ``_external``).
This base holds that bookkeeping once: option checking, the continuous-space check, the box
encoding, members that recognise points already evaluated, and ``_propose``, which asks a new
generation when every point of those in flight is out. A subclass implements ``_ask_generation``
(a new ``Generation`` from its library) and ``_tell_ready`` (tell the complete generations at the
head of ``self._gens``), plus the ``ReplayedOptimizer`` hooks.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, ClassVar

import numpy as np

from mergetune.errors import MergetuneError
from mergetune.search.optimizers._external import (
    Generation,
    Member,
    UnitBox,
    check_continuous,
    next_member,
    point_key,
)
from mergetune.search.optimizers._replay import ReplayedOptimizer
from mergetune.search.optimizers.base import Proposal
from mergetune.search.space import SearchSpace

MAX_NEW_GENERATIONS = 10_000  # per propose: generations made only of points already evaluated (replays)


class GenerationalOptimizer(ReplayedOptimizer):
    """A population-based optimizer over the unit box of the float axes (module docstring)."""

    option_names: ClassVar[frozenset[str]]
    algorithm: ClassVar[str]  # for the continuous-space error, e.g. "CMA-ES"

    def __init__(self, space: SearchSpace, *, seed: int, batch_size: int, budget: int | None, **options: Any):
        super().__init__(space, seed=seed, batch_size=batch_size, budget=budget, **options)
        unknown = sorted(set(options) - self.option_names)
        if unknown:
            raise MergetuneError(
                f"{self.name}: unknown option(s) {unknown}; {self.name} takes {sorted(self.option_names)}"
            )
        check_continuous(space, self.name, self.algorithm)
        self.box = UnitBox(space)
        self._gens: list[Generation] = []  # in flight, oldest first

    @abstractmethod
    def _ask_generation(self) -> Generation:
        """A new population from the library, its points made members (``_member``)."""

    @abstractmethod
    def _tell_ready(self) -> None:
        """Tell every complete generation at the head of ``self._gens``, in order."""

    def _member(self, x: np.ndarray) -> Member:
        """A new generation member; a point already evaluated (e.g. replayed after a restart) is not
        proposed again: it takes its known loss."""
        x = np.clip(np.asarray(x, dtype=float), 0.0, 1.0)
        key = point_key(self.box.decode(x))
        loss = self._ledger.losses.get(key)
        return Member(x, key, loss, handed=loss is not None)

    def _encode(self, params: dict[str, Any]) -> np.ndarray | None:
        try:
            return self.box.encode(params)
        except (KeyError, TypeError, ValueError):
            return None  # a point of another space (e.g. another method): nothing to learn

    @property
    def exhausted(self) -> bool:
        return False  # generations without end: the budget stops it

    def _propose(self) -> Proposal:
        """The next point of the oldest generation with points to hand out; a new generation if none."""
        for _ in range(MAX_NEW_GENERATIONS):
            found = next_member(self._gens)
            if found is not None:
                gen, index = found
                gen.members[index].handed = True
                return Proposal(params=self.box.decode(gen.members[index].x), token=(gen.number, index))
            self._gens.append(self._ask_generation())
            self._tell_ready()  # a generation made only of points already evaluated is told at once
        raise RuntimeError(f"{self.name}: {MAX_NEW_GENERATIONS} new generations held only points already evaluated")
