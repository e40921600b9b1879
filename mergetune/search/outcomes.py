"""What one evaluated candidate means to the search: its objective values, floor constraints and scalar.

Pure functions of the config, the recipe and the normalised scores, shared by the loop (which
tells the outcome to the study and the optimizer) and the finalisation (which reports the floors).

Objectives (higher is better unless noted): ``mean`` and ``worst`` normalised score over the
normalised tasks (each by its own rule, see :mod:`mergetune.objectives.normalization`; tasks
normalised as ``none`` are left out), ``sparsity`` = the recipe's mean density (minimised). Per-task
floors on the normalised score are constraints (``floor_t − s_t ≤ 0``): 0.8 on a loss task means 80%
of its expert's gain over the base kept. Single-objective optimizers see ``ObjectivesConfig``'s
scalarisation.
"""

from __future__ import annotations

import numpy as np

from mergetune.recipe import Recipe, resolve_parameter
from mergetune.search.config import SearchConfig
from mergetune.search.optimizers import Outcome
from mergetune.search.space import SearchSpace


def mean_density(recipe: Recipe, space: SearchSpace) -> float:
    """The recipe's nominal density (fraction kept) averaged over tasks and groups; 1 if unused."""
    if space.density_range(recipe.method) is None:
        return 1.0
    return float(np.mean(resolve_parameter(recipe.density, space.tasks, space.groups, "density")))


def floors_of(config: SearchConfig, tasks: list[str]) -> dict[str, float]:
    floors = config.objectives.floors
    if floors is None:
        return {}
    if isinstance(floors, float | int):
        return dict.fromkeys(tasks, float(floors))
    default = floors.get("*")
    return {t: float(floors.get(t, default)) for t in tasks if floors.get(t, default) is not None}


def pruned_outcome(
    normalized: dict[str, float], density: float, objectives: list[str], config: SearchConfig, gap: float | None
) -> Outcome:
    """A candidate stopped early by multi-fidelity racing, as the optimizers see it.

    No objective values: it is never on a front, never a finalist, never the best. For the
    single-objective optimizers (Nevergrad, CMA-ES: they need a number) a pessimistic scalar: the
    scalarisation of its partial normalised scores, lowered by the incumbent's lead measured on the
    same examples (``gap`` ≥ 0). It is then below its own partial score by as much as it trailed,
    never a value that reads like a full evaluation at its partial level. Optuna's samplers learn
    from the PRUNED trial itself (TPE ranks it by its intermediate value, below every complete one).
    """
    partial = outcome_of(normalized, density, objectives, config)
    return Outcome(values=None, scalar=partial.scalar - max(gap or 0.0, 0.0), feasible=False, pruned=True)


def outcome_of(normalized: dict[str, float], density: float, objectives: list[str], config: SearchConfig) -> Outcome:
    """Objective values, constraints and the scalarisation of one evaluated candidate."""
    values = list(normalized.values())
    mean, worst = float(np.mean(values)), float(min(values))
    by_name = {"mean": mean, "worst": worst, "sparsity": density}
    floors = floors_of(config, list(normalized))
    floored = tuple(t for t in normalized if t in floors)
    constraints = tuple(floors[t] - normalized[t] for t in floored)
    violation = sum(max(0.0, c) for c in constraints)
    obj = config.objectives
    scalar = mean + obj.worst_weight * worst - obj.penalty * violation
    if "sparsity" in objectives:
        scalar -= obj.sparsity_weight * density
    return Outcome(
        values=tuple(by_name[o] for o in objectives),
        scalar=scalar,
        feasible=all(c <= 0 for c in constraints),
        constraints=constraints,
        constraint_names=floored,
    )
