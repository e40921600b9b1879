"""``cmaes``: pycma's CMA-ES (Hansen & Ostermeier 2001; Hansen 2016) with IPOP restarts (Auger & Hansen 2005).

CMA-ES needs a continuous space: one method and float axes only (a method choice or a categorical
option raises ``MergetuneError``; fix them in the config, or use ``ngopt`` / ``tpe``).

- **Encoding**: every float axis is mapped to [0, 1] (logarithmically for log axes, see
  ``_external.UnitBox``), so one ``sigma0`` (a fraction of the box, option ``sigma0``, default 0.25)
  fits every axis; the box is enforced by pycma's ``bounds`` option (its ``BoundTransform``).
- **Generations**: one CMA generation is asked at a time (``popsize`` points: pycma's default
  4 + ⌊3 ln n⌋, or option ``popsize``, rounded up to a multiple of ``batch_size``) and handed out
  one by one; the generation is told to pycma when all its points are observed, in ask order.
- **Pending points**: the loop keeps ``batch_size`` candidates in flight and asks again as soon as
  one finishes, so at the end of a generation it asks while up to ``batch_size − 1`` points are
  still out. Then the next generation is asked early, from the not-yet-updated distribution; when
  the previous generation is told, the early generation's points not yet handed out are redrawn
  from the updated distribution. At most ``batch_size − 1`` points per generation are thus one
  update stale, and nothing is ever lost or told out of order. The step size uses cumulative
  step-size adaptation (CSA) always: pycma's default at ≥ 300 dimensions is the two-point rule
  (TPA), which needs its two mean-shift samples drawn from the current mean and fails with
  "Mean shift samples are expected but missing" when generations overlap (search-stack.md).
- **Restarts (IPOP)**: when pycma's stopping criteria fire (``es.stop()``), a new ES starts with
  the population multiplied by ``ipop_factor`` (default 2) from a uniform random point (option
  ``restart_from: best`` starts from the best point so far); ``max_restarts`` (default unlimited).
  Points still out from the stopped ES are injected into the new one when they come back.
- **Points CMA did not propose** (warm starts, retried candidates): a point equal to a member of a
  generation in flight fills that member (a retried candidate is not evaluated twice); any other
  finite outcome is injected into the next generation with ``es.inject(force=True)`` (at most
  half of a generation), where it takes its known loss without being evaluated again.
- **Seeding**: pycma draws from the adapter's own ``numpy.random.RandomState(seed)`` (option
  ``randn``; ``seed=nan`` so the global NumPy state is never touched): same seed, same proposals.
- **Checkpoint**: ``cmaes.checkpoint.json``, the log of the calls made to the adapter (``_replay``):
  a resume builds a fresh ES with the same seed and settings and makes the same calls again, which
  retraces the same generations, injections and restarts (a pickle of the ES would run code from
  the run folder when loaded). Then the history items the log had not seen are replayed; without
  a usable checkpoint (none, another pycma, other settings, a replay that diverged) it starts
  afresh and replays the whole history.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from mergetune.errors import MergetuneError
from mergetune.search.optimizers._external import (
    Generation,
    default_popsize,
    import_cma,
    member_of,
    round_up,
)
from mergetune.search.optimizers._generational import GenerationalOptimizer
from mergetune.search.optimizers.base import Outcome, Proposal
from mergetune.search.optimizers.registry import register_optimizer
from mergetune.search.space import SearchSpace

log = logging.getLogger(__name__)
OPTIONS = {"sigma0", "popsize", "ipop_factor", "max_restarts", "restart_from", "diagonal", "cma_options"}


@register_optimizer
class CmaEs(GenerationalOptimizer):
    """pycma CMA-ES on the unit box of the float axes, generation by generation, with IPOP restarts."""

    name = "cmaes"
    checkpoint_file = "cmaes.checkpoint.json"
    option_names = frozenset(OPTIONS)
    algorithm = "CMA-ES"

    def __init__(self, space: SearchSpace, *, seed: int, batch_size: int, budget: int | None, **options: Any):
        super().__init__(space, seed=seed, batch_size=batch_size, budget=budget, **options)
        self.axes = self.box.axes
        self.sigma0 = float(options.get("sigma0", 0.25))
        self.ipop_factor = int(options.get("ipop_factor", 2))
        self.max_restarts = options.get("max_restarts")
        self.restart_from = options.get("restart_from", "random")
        if self.restart_from not in ("random", "best"):
            raise MergetuneError(f"cmaes: restart_from must be 'random' or 'best', got {self.restart_from!r}")
        self._start_fresh()

    def _reset(self) -> None:
        wanted = int(self.options.get("popsize") or default_popsize(len(self.axes)))
        self.popsize = round_up(wanted, self.batch_size)
        if self.popsize != wanted:
            log.info("cmaes: popsize %d rounded up to %d (a multiple of batch_size)", wanted, self.popsize)
        self._rng = np.random.RandomState(self.seed)
        self._restarts = 0
        self._es = self._new_es(np.full(len(self.axes), 0.5), self.popsize)
        self._gens: list[Generation] = []  # in flight, oldest first
        self._numbered = 0
        self._known: list[tuple[np.ndarray, float]] = []  # outcomes to inject into the next generation
        self._best: tuple[float, np.ndarray] | None = None

    # ---- pycma -----------------------------------------------------------------------------------
    def _new_es(self, x0: np.ndarray, popsize: int) -> Any:
        cma = import_cma()
        opts: dict[str, Any] = {
            "bounds": [0.0, 1.0],
            "popsize": popsize,
            "randn": self._rng.randn,
            "seed": np.nan,
            "verbose": -9,
            "verb_disp": 0,
            "verb_log": 0,
            "AdaptSigma": cma.sigma_adaptation.CMAAdaptSigmaCSA,
            "CMA_diagonal": bool(self.options.get("diagonal", False)),
            **self.options.get("cma_options", {}),
        }
        return cma.CMAEvolutionStrategy(np.clip(x0, 0.0, 1.0), self.sigma0, opts)

    def _ask_generation(self) -> Generation:
        """Ask pycma for a population; known outcomes are injected (into the first generation in flight
        only: a generation asked early is redrawn later) and filled in at once."""
        injected = self._inject() if not self._gens else []
        xs = self._es.ask()
        gen = Generation(self._numbered, [self._member(x) for x in xs])
        self._numbered += 1
        for x, loss in injected:
            member = min(gen.members, key=lambda m, x=x: float(np.abs(m.x - x).max()))
            if np.allclose(member.x, x, atol=1e-6) and member.loss is None:
                member.loss, member.handed = loss, True
            else:
                log.debug("cmaes: an injected point was not returned by ask; dropped")
        return gen

    def _inject(self) -> list[tuple[np.ndarray, float]]:
        take, self._known = self._known[: self.popsize_now // 2], self._known[self.popsize_now // 2 :]
        if take:
            self._es.inject([self._es.boundary_handler.inverse(x) for x, _ in take], force=True)
        return take

    @property
    def popsize_now(self) -> int:
        return int(self._es.popsize)

    def _tell_ready(self) -> None:
        """Tell every complete generation at the head of the queue, in order; restart if pycma stops."""
        while self._gens and self._gens[0].complete:
            gen = self._gens.pop(0)
            self._es.tell([m.x for m in gen.members], [float(m.loss) for m in gen.members])  # type: ignore[arg-type]
            stop = self._es.stop()
            if stop and (self.max_restarts is None or self._restarts < int(self.max_restarts)):
                self._restart(dict(stop))
                return
            for later in self._gens:
                self._redraw(later)

    def _redraw(self, gen: Generation) -> None:
        """Redraw an early generation's points not handed out yet from the updated distribution."""
        fresh = self._es.ask()
        for i, x in enumerate(fresh):
            member = gen.members[i]
            if not member.handed and member.loss is None:
                gen.members[i] = self._member(x)

    def _restart(self, reason: dict[str, Any]) -> None:
        """IPOP: a new ES with a larger population; points still out come back as injections."""
        self._restarts += 1
        old = self.popsize_now
        popsize = round_up(old * self.ipop_factor, self.batch_size)
        if self.restart_from == "best" and self._best is not None:
            x0 = self._best[1]
        else:
            x0 = self._rng.uniform(0.0, 1.0, len(self.axes))
        log.info(
            "cmaes: IPOP restart %d after %s: popsize %d -> %d, from the %s point",
            self._restarts,
            sorted(reason),
            old,
            popsize,
            self.restart_from,
        )
        self._gens = []  # members still out are matched by nothing and injected when they return
        self._es = self._new_es(x0, popsize)

    # ---- encoding --------------------------------------------------------------------------------
    # ---- optimizer interface ---------------------------------------------------------------------
    def _observe(self, proposal: Proposal | None, params: dict[str, Any], outcome: Outcome) -> None:
        x = self._encode(params)
        if x is not None and not outcome.failed and (self._best is None or outcome.loss < self._best[0]):
            self._best = (outcome.loss, x)
        member = member_of(self._gens, None if proposal is None else proposal.token, params)
        if member is not None:
            member.loss, member.handed = outcome.loss, True
            self._tell_ready()
        elif x is not None and not outcome.failed:
            self._known.append((x, outcome.loss))

    def _libraries(self) -> dict[str, str]:
        return {"cma": import_cma().__version__}

    def _summary(self) -> dict[str, Any]:
        return {
            "restarts": self._restarts,
            "popsize": self.popsize_now,
            "iterations": int(self._es.countiter),
            "sigma": float(self._es.sigma),
            "best_loss": None if self._best is None else self._best[0],
        }

    def describe(self) -> str:
        cma = import_cma()
        return (
            f"cmaes: pycma {cma.__version__} CMA-ES (CSA) on {len(self.axes)} dims, popsize {self.popsize_now}, "
            f"sigma0 {self.sigma0}, IPOP restarts {self._restarts}"
        )
