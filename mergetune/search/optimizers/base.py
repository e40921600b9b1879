"""The optimizer interface: propose points, observe outcomes; Optuna's storage records everything.

Every candidate becomes an Optuna trial whatever the optimizer, so that one storage holds the
whole search (resume, ``mergetune status``, optuna-dashboard). Two kinds of optimizer plug in:

- **Optuna samplers** (TPE, NSGA-II, GP, random): the study samples each point through
  ``SearchSpace.suggest``; ``propose`` returns None and ``observe`` does nothing, since the study
  is the optimizer's whole state.
- **External optimizers** (Nevergrad, pycma CMA-ES, grid): ``propose`` returns a point, which the
  loop enqueues in the study and asks back as a trial (so it is recorded as RUNNING before it is
  evaluated); ``observe`` tells the optimizer the outcome. Their state is checkpointed beside
  the storage and restored on resume.

The loop asks for at most ``batch_size`` proposals before telling any result back; an external
optimizer must accept that many pending points (Nevergrad's ``num_workers``).
"""

from __future__ import annotations

import math
from abc import ABC
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import optuna

from mergetune.search.space import SearchSpace


@dataclass(frozen=True)
class Outcome:
    """What one evaluated candidate scored, as the optimizers see it (higher is better)."""

    values: tuple[float, ...] | None  # the study's objectives in its directions; None if it failed
    scalar: float  # the documented scalarisation (single-objective optimizers); -inf if it failed
    feasible: bool = True
    constraints: tuple[float, ...] = field(default_factory=tuple)  # ≤ 0 is satisfied
    constraint_names: tuple[str, ...] = field(default_factory=tuple)  # aligned with constraints

    @property
    def failed(self) -> bool:
        return self.values is None

    @property
    def loss(self) -> float:
        """Minimised by external optimizers: −scalar, with failures as a large finite loss."""
        return -self.scalar if math.isfinite(self.scalar) else FAILED_LOSS


FAILED_LOSS = 1e6


@dataclass
class Proposal:
    """A point the optimizer wants evaluated, and its private token (e.g. a Nevergrad candidate)."""

    params: dict[str, Any]
    token: Any = None


class Optimizer(ABC):
    """Base of every optimizer adapter."""

    name: ClassVar[str]
    multi_objective: ClassVar[bool] = False  # False: uses Outcome.scalar / Outcome.loss
    external: ClassVar[bool] = False  # True: proposes points itself (at most batch_size pending)

    def __init__(self, space: SearchSpace, *, seed: int, batch_size: int, budget: int | None, **options: Any):
        self.space = space
        self.seed = seed
        self.batch_size = batch_size
        self.budget = budget
        self.options = options

    @property
    def exhausted(self) -> bool:
        """True when the optimizer has nothing left to propose (a finished grid): the loop stops."""
        return False

    @property
    def max_pending(self) -> int | None:
        """Most proposals it can have out at once (None: no limit; Optuna's samplers use constant liar)."""
        return self.batch_size if self.external else None

    def sampler(self) -> optuna.samplers.BaseSampler:
        """The sampler of the study (externals: a seeded random sampler that is never consulted)."""
        return optuna.samplers.RandomSampler(seed=self.seed)

    def propose(self) -> Proposal | None:
        """A new point, or None to let the study's sampler choose."""
        return None

    def observe(self, proposal: Proposal | None, params: dict[str, Any], outcome: Outcome) -> None:  # noqa: B027
        """Learn from an outcome. ``proposal`` is None for points the optimizer did not propose
        (warm starts, retried candidates): external optimizers should take them in if they can."""

    def checkpoint(self, folder: Path) -> None:  # noqa: B027
        """Persist internal state (nothing for Optuna samplers: the study is the state)."""

    def restore(self, folder: Path, history: Sequence[tuple[dict[str, Any], Outcome]]) -> None:  # noqa: B027
        """Restore state after a restart; ``history`` lists finished points in order, so that
        outcomes after the last checkpoint can be replayed."""

    def describe(self) -> str:
        """One line for logs: what actually runs (e.g. the algorithm NGOpt picked)."""
        return self.name
