"""Optuna samplers as optimizers: the study samples every point, the storage holds all state.

- ``tpe``: multivariate TPE (Optuna 5's multi-objective TPE is independent unless told otherwise,
  which is slower and worse on correlated parameters); constant liar for pending trials.
- ``nsga2``: NSGA-II; ``population_size`` defaults to a few batches.
- ``gp``: Gaussian-process Bayesian optimisation (best at low dimension and small budgets).
- ``random``: uniform random search, the baseline.

Per-task floors reach the samplers as constraints: the loop calls ``trial.set_constraint`` (feasible
iff every value ≤ 0) before telling the result, which Optuna 5's samplers read directly.

Each sampler is seeded with ``self.seed``. A fresh search uses the config's seed; a resumed driver's
loop sets a seed derived from it and the number of trials already in the study before it rebuilds the
sampler (``SearchLoop._continue_sampling``), so that a resume continues the search with new points
instead of replaying the seeded sequence of the first driver.
"""

from __future__ import annotations

from typing import Any

import optuna

from mergetune.search.optimizers.base import SamplerOptimizer
from mergetune.search.optimizers.registry import register_optimizer


@register_optimizer
class Tpe(SamplerOptimizer):
    name = "tpe"
    multi_objective = True

    def sampler(self) -> optuna.samplers.BaseSampler:
        opts: dict[str, Any] = {
            "multivariate": True,
            "group": True,
            "n_startup_trials": 10,
            "constant_liar": True,  # several workers: pending trials count as bad, so points spread out
            **self.options,
        }
        return optuna.samplers.TPESampler(seed=self.seed, **opts)


@register_optimizer
class Nsga2(SamplerOptimizer):
    name = "nsga2"
    multi_objective = True

    def sampler(self) -> optuna.samplers.BaseSampler:
        opts: dict[str, Any] = {"population_size": max(8, 4 * self.batch_size), **self.options}
        return optuna.samplers.NSGAIISampler(seed=self.seed, **opts)


@register_optimizer
class Gp(SamplerOptimizer):
    name = "gp"
    multi_objective = True

    def sampler(self) -> optuna.samplers.BaseSampler:
        opts: dict[str, Any] = {"n_startup_trials": 10, **self.options}
        return optuna.samplers.GPSampler(seed=self.seed, **opts)


@register_optimizer
class RandomSearch(SamplerOptimizer):
    name = "random"
    multi_objective = True

    def sampler(self) -> optuna.samplers.BaseSampler:
        return optuna.samplers.RandomSampler(seed=self.seed, **self.options)
