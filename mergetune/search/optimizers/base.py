"""The optimizer interface: propose points, observe outcomes; Optuna's storage records everything.

Every candidate becomes an Optuna trial whatever the optimizer, so that one storage holds the
whole search (resume, ``mergetune status``, optuna-dashboard). An optimizer is one of two kinds,
each an abstract base whose hooks have no defaults, so that a plug-in that forgets one is refused
when it is registered (see ``registry.register_optimizer``), never run as something else:

- ``SamplerOptimizer`` (TPE, NSGA-II, GP, random): it gives an Optuna sampler, and the study
  samples each point through ``SearchSpace.suggest``; the study is its whole state, so the loop's
  propose / observe / checkpoint / restore calls are settled once here (nothing to do).
- ``ExternalOptimizer`` (Nevergrad, pycma CMA-ES, grid): ``propose`` returns a point, which the
  loop enqueues in the study and asks back as a trial (so it is recorded as RUNNING before it is
  evaluated); ``observe`` tells the optimizer the outcome. Its state is checkpointed beside the
  storage and restored on resume. The study's sampler is never consulted for its points.

The loop asks for at most ``max_pending`` proposals before telling any result back; an external
optimizer must accept that many pending points (Nevergrad's ``num_workers``).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import optuna

from mergetune.search.space import SearchSpace

FAILED_LOSS = 1e6


@dataclass(frozen=True)
class Outcome:
    """What one evaluated candidate scored, as the optimizers see it (higher is better)."""

    values: tuple[float, ...] | None  # the study's objectives in its directions; None if it failed
    scalar: float  # the documented scalarisation (single-objective optimizers); -inf if it failed
    feasible: bool = True
    constraints: tuple[float, ...] = field(default_factory=tuple)  # ≤ 0 is satisfied
    constraint_names: tuple[str, ...] = field(default_factory=tuple)  # aligned with constraints
    # stopped early by multi-fidelity racing: no objective values (never on a front), and a pessimistic
    # ``scalar`` (see ``outcomes.pruned_outcome``) for the single-objective optimizers
    pruned: bool = False

    @property
    def failed(self) -> bool:
        return self.values is None and not self.pruned

    @property
    def loss(self) -> float:
        """Minimised by external optimizers: −scalar, with failures as a large finite loss."""
        return -self.scalar if math.isfinite(self.scalar) else FAILED_LOSS


@dataclass
class Proposal:
    """A point the optimizer wants evaluated, and its private token (e.g. a Nevergrad candidate)."""

    params: dict[str, Any]
    token: Any = None


History = Sequence[tuple[dict[str, Any], Outcome]]


class Optimizer(ABC):
    """What the search loop calls, whatever the kind. Plug-ins subclass one of the two kinds below."""

    name: ClassVar[str]
    multi_objective: ClassVar[bool] = False  # False: uses Outcome.scalar / Outcome.loss
    external: ClassVar[bool]  # True: proposes points itself (at most max_pending out at once)

    def __init__(self, space: SearchSpace, *, seed: int, batch_size: int, budget: int | None, **options: Any):
        self.space = space
        self.seed = seed
        self.batch_size = batch_size
        self.budget = budget
        self.options = options

    @abstractmethod
    def sampler(self) -> optuna.samplers.BaseSampler:
        """The sampler of the study."""

    @abstractmethod
    def propose(self) -> Proposal | None:
        """A new point, or None to let the study's sampler choose."""

    @abstractmethod
    def observe(self, proposal: Proposal | None, params: dict[str, Any], outcome: Outcome) -> None:
        """Learn from an outcome. ``proposal`` is None for points the optimizer did not propose
        (warm starts, retried candidates)."""

    @abstractmethod
    def checkpoint(self, folder: Path) -> None:
        """Persist the internal state in ``folder``."""

    @abstractmethod
    def restore(self, folder: Path, history: History) -> None:
        """Restore state after a restart; ``history`` lists finished points in trial order, so that
        outcomes after the last checkpoint can be replayed."""

    @property
    @abstractmethod
    def exhausted(self) -> bool:
        """True when the optimizer has nothing left to propose (a finished grid): the loop stops."""

    @property
    @abstractmethod
    def max_pending(self) -> int | None:
        """Most proposals it can have out at once (None: no limit)."""

    def describe(self) -> str:
        """One line for logs: what actually runs (e.g. the algorithm NGOpt picked)."""
        return self.name


class SamplerOptimizer(Optimizer):
    """An Optuna sampler: the study samples every point and holds the whole state.

    A subclass gives ``sampler()`` only; the loop's other calls have nothing to do for this kind,
    which is why they are settled here rather than left as defaults on ``Optimizer``.
    """

    external: ClassVar[bool] = False

    @abstractmethod
    def sampler(self) -> optuna.samplers.BaseSampler:
        """A new sampler seeded with ``self.seed``: on resume it is built again on the stored study."""

    def propose(self) -> None:
        """Always None: the study's sampler chooses every point."""
        return None

    def observe(self, proposal: Proposal | None, params: dict[str, Any], outcome: Outcome) -> None:
        """Nothing: the study was told the outcome already."""

    def checkpoint(self, folder: Path) -> None:
        """Nothing: the study's storage is the state."""

    def restore(self, folder: Path, history: History) -> None:
        """Nothing: the sampler reads the stored study."""

    @property
    def exhausted(self) -> bool:
        return False

    @property
    def max_pending(self) -> None:
        """No limit: pending trials are the samplers' business (TPE's constant liar)."""
        return None


class ExternalOptimizer(Optimizer):
    """An optimizer that proposes points itself and keeps its own state (checkpointed by the loop).

    A subclass implements ``propose``, ``observe``, ``checkpoint``, ``restore`` and ``exhausted``.
    ``propose`` returns None only once ``exhausted`` is True: the loop would otherwise fall back to
    the study's sampler, which is a random search.
    """

    external: ClassVar[bool] = True

    def sampler(self) -> optuna.samplers.BaseSampler:
        """A seeded random sampler, never consulted: every point is enqueued with fixed parameters."""
        return optuna.samplers.RandomSampler(seed=self.seed)

    @property
    def max_pending(self) -> int | None:
        """The batch: at most ``batch_size`` proposals out before a result is told back."""
        return self.batch_size

    @abstractmethod
    def propose(self) -> Proposal | None:
        """The next point to evaluate; None only when ``exhausted``."""

    @abstractmethod
    def observe(self, proposal: Proposal | None, params: dict[str, Any], outcome: Outcome) -> None:
        """Learn from an outcome; take in points it did not propose (``proposal`` None) if it can.
        A failed candidate (``outcome.failed``) must be accepted too: it scores ``FAILED_LOSS``; a
        candidate stopped early (``outcome.pruned``) scores its pessimistic ``loss``."""

    @abstractmethod
    def checkpoint(self, folder: Path) -> None:
        """Write the state to ``folder`` so that ``restore`` continues exactly from here."""

    @abstractmethod
    def restore(self, folder: Path, history: History) -> None:
        """Load the state from ``folder`` (possibly absent: start afresh) and replay the outcomes of
        ``history`` the checkpoint had not seen."""

    @property
    @abstractmethod
    def exhausted(self) -> bool:
        """True when there is nothing left to propose (a finished grid); False for open-ended searches."""
