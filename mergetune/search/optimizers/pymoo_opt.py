"""``pymoo_ga``: pymoo's real-coded genetic algorithm (Blank & Deb 2020, pymoo: Multi-Objective Optimization in Python).

The evolutionary protocol of merge-search tools built on pymoo (Mergenetic, Minut et al. 2025:
a GA over the merge coefficients): tournament selection, simulated binary crossover (SBX, Deb &
Agrawal 1995) and polynomial mutation (Deb & Goyal 1996), with duplicates eliminated; pymoo's
defaults, which are Mergenetic's. Like ``cmaes`` it needs a continuous space (one method, float
axes), searched on the unit box (``_external.UnitBox``).

- **Generations**: pymoo's ask-and-tell interface. A population (``pop_size``, default 20, rounded
  up to a multiple of ``batch_size``) is asked at a time and handed out point by point; it is told
  back whole, in ask order, when all its points are observed. When every point of the generations
  in flight is out, the next population is asked before the previous one is told (pymoo then mates
  from the population it has): the pending points are never lost or told out of order.
- **Points the GA did not propose** (warm starts, retried candidates): a point equal to a member in
  flight fills it; any other finite outcome joins the next population told to pymoo, where survival
  weighs it like an offspring (so a good warm start becomes a parent).
- **Seeding**: pymoo draws from its own ``numpy.random.Generator`` seeded with the search seed
  (``Algorithm.setup(seed=...)``): same seed, same proposals; the global NumPy state is not used.
- **Checkpoint**: ``pymoo_ga.checkpoint.json``, the log of calls (``_replay``), replayed on resume.
- **Failed candidates** are told as ``FAILED_LOSS``: survival drops them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mergetune.search.optimizers._external import (
    Generation,
    member_of,
    round_up,
)
from mergetune.search.optimizers._generational import GenerationalOptimizer
from mergetune.search.optimizers.base import Outcome, Proposal
from mergetune.search.optimizers.registry import register_optimizer
from mergetune.search.space import SearchSpace

DEFAULT_POP_SIZE = 20
OPTIONS = {"pop_size"}


def import_pymoo() -> Any:
    # pymoo is imported when a GA is built (here and in the two methods that use its classes): its
    # imports cost about 0.3 s, which every CLI start would pay since the registry imports all plug-ins.
    import pymoo

    return pymoo


@register_optimizer
class PymooGA(GenerationalOptimizer):
    """pymoo's GA on the unit box of the float axes, one population at a time (module docstring)."""

    name = "pymoo_ga"
    checkpoint_file = "pymoo_ga.checkpoint.json"
    option_names = frozenset(OPTIONS)
    algorithm = "genetic algorithm"

    def __init__(self, space: SearchSpace, *, seed: int, batch_size: int, budget: int | None, **options: Any):
        super().__init__(space, seed=seed, batch_size=batch_size, budget=budget, **options)
        self._start_fresh()

    def _reset(self) -> None:
        # pymoo: imported on use (see import_pymoo)
        from pymoo.algorithms.soo.nonconvex.ga import GA
        from pymoo.core.problem import Problem
        from pymoo.core.termination import NoTermination

        self.pop_size = round_up(int(self.options.get("pop_size", DEFAULT_POP_SIZE)), self.batch_size)
        self._problem = Problem(n_var=len(self.box), n_obj=1, xl=0.0, xu=1.0)
        self._ga = GA(pop_size=self.pop_size, eliminate_duplicates=True)
        self._ga.setup(self._problem, termination=NoTermination(), seed=self.seed, verbose=False)
        self._gens: list[Generation] = []  # in flight, oldest first
        self._populations: dict[int, Any] = {}  # generation number -> the pymoo Population asked
        self._numbered = 0
        self._known: list[tuple[np.ndarray, float]] = []  # outcomes to tell with the next population
        self._best: float | None = None

    # ---- pymoo -----------------------------------------------------------------------------------
    def _ask_generation(self) -> Generation:
        population = self._ga.ask()
        gen = Generation(self._numbered, [self._member(x) for x in population.get("X")])
        self._populations[gen.number] = population
        self._numbered += 1
        return gen

    def _tell_ready(self) -> None:
        """Tell every complete generation at the head of the queue, in order, with the known outcomes."""
        # pymoo: imported on use (see import_pymoo)
        from pymoo.core.evaluator import Evaluator
        from pymoo.core.population import Population
        from pymoo.problems.static import StaticProblem

        while self._gens and self._gens[0].complete:
            gen = self._gens.pop(0)
            xs = [m.x for m in gen.members] + [x for x, _ in self._known]
            losses = [float(m.loss) for m in gen.members] + [loss for _, loss in self._known]  # type: ignore[arg-type]
            self._known = []
            population = self._populations.pop(gen.number)
            if len(xs) > len(gen.members):
                population = Population.merge(population, Population.new("X", np.array(xs[len(gen.members) :])))
            Evaluator().eval(StaticProblem(self._problem, F=np.array(losses)[:, None]), population)
            self._ga.tell(infills=population)

    # ---- outcomes ------------------------------------------------------------------------------------
    def _observe(self, proposal: Proposal | None, params: dict[str, Any], outcome: Outcome) -> None:
        if not outcome.failed and (self._best is None or outcome.loss < self._best):
            self._best = outcome.loss
        member = member_of(self._gens, None if proposal is None else proposal.token, params)
        if member is not None:
            member.loss, member.handed = outcome.loss, True
            self._tell_ready()
        elif not outcome.failed and (x := self._encode(params)) is not None:
            self._known.append((x, outcome.loss))

    def _libraries(self) -> dict[str, str]:
        return {"pymoo": import_pymoo().__version__}

    def _summary(self) -> dict[str, Any]:
        return {"generations_asked": self._numbered, "pop_size": self.pop_size, "best_loss": self._best}

    def describe(self) -> str:
        return (
            f"pymoo_ga: pymoo {import_pymoo().__version__} GA (SBX, polynomial mutation) on {len(self.box)} dims, "
            f"pop_size {self.pop_size}"
        )
