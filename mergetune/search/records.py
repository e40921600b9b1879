"""What the storage holds per candidate, read back as plain records.

The loop writes, on every finished trial: the recipe, each task's raw score, normalised score and
metrics, timings (merge, evaluation, the loop's own overhead), the worker, constraints (per-task
floors) and, for failures, the error. With multi-fidelity on, also what the race found (``fidelity``:
examples used per task against all) and, for a candidate scored in full, its per-example values; a
candidate stopped early is a PRUNED trial with its partial scores (read back here, never ``ok``).
``TrialRecord`` reads all that back from an Optuna FrozenTrial, so status, reports and the final
selection work on any storage, running or finished.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from mergetune.merging.methods import method_kind

# user-attribute keys written by the loop
RECIPE = "recipe"
SCORES = "scores"
NORMALIZED = "normalized"
METRICS = "metrics"
TIMING = "timing"
WORKER = "worker"
ERROR = "error"
EVALUATED = "evaluated"
FEASIBLE = "feasible"
OBJECTIVES = "objectives"  # names of the study's objectives, in order (study user attr)
BUDGET = "budget"  # the search config's budget (study user attr, shown by ``mergetune status``)
OPTIMIZER = "optimizer"  # the optimizer's name (study user attr)
DENSITY = "mean_density"
ATTEMPTS = "attempts"  # set when a candidate was retried after its worker died
REUSED = "reused_from"  # a trial recorded with an equal earlier trial's result: that trial's number
FIDELITY = "fidelity"  # multi-fidelity: stopped or not, examples used per task against all, the race's evidence
PER_EXAMPLE = "per_example"  # multi-fidelity: per-example values of a candidate scored in full (an incumbent)

#: Each objective's direction in the study: normalised scores are maximised, the mean density minimised.
#: Here, below the loop and the Pareto code, because both need it and the records name the objectives.
DIRECTION = {"mean": "maximize", "worst": "maximize", "sparsity": "minimize"}


@dataclass(frozen=True)
class TrialRecord:
    number: int
    state: str
    method: str | None
    values: dict[str, float]  # objective name -> value
    scores: dict[str, float]
    normalized: dict[str, float]
    feasible: bool
    recipe: dict[str, Any] | None
    timing: dict[str, float] = field(default_factory=dict)
    worker: str | None = None
    error: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    density: float = 1.0  # the recipe's mean density (fraction kept)
    evaluated: bool = True  # False for trials failed because the driver stopped mid-evaluation
    reused_from: int | None = None  # the earlier, equal trial whose result this one carries
    fidelity: dict[str, Any] = field(default_factory=dict)  # multi-fidelity: see FIDELITY

    @property
    def pruned(self) -> bool:
        """Stopped early by multi-fidelity racing: its scores are partial, on ``fidelity["examples"]``."""
        return self.state == TrialState.PRUNED.name and self.evaluated

    @property
    def examples_scored(self) -> int | None:
        """Examples this trial's own evaluation scored, over all tasks (0 for a reuse; None when not recorded)."""
        if self.reused_from is not None:
            return 0
        examples = self.fidelity.get("examples")
        return int(sum(examples.values())) if examples else None

    @property
    def distinct(self) -> bool:
        """Completed and not a copy of an earlier trial: what fronts and finalists are chosen among."""
        return self.ok and self.reused_from is None

    @property
    def ok(self) -> bool:
        return self.state == TrialState.COMPLETE.name

    @property
    def kind(self) -> str:
        """'static' (one merged model) or 'dynamic' (routed per input: Twin-Merging), from the method."""
        return method_kind(self.method)

    @property
    def mean_normalized(self) -> float | None:
        return self.values.get("mean")

    @property
    def worst_normalized(self) -> float | None:
        return self.values.get("worst")

    @classmethod
    def from_trial(cls, trial: FrozenTrial, objective_names: list[str]) -> TrialRecord:
        attrs = trial.user_attrs
        values = dict(zip(objective_names, trial.values, strict=True)) if trial.values else {}
        recipe = attrs.get(RECIPE)
        return cls(
            number=trial.number,
            state=trial.state.name,
            method=(recipe or {}).get("method") or trial.params.get("method"),
            values=values,
            scores=dict(attrs.get(SCORES, {})),
            normalized=dict(attrs.get(NORMALIZED, {})),
            feasible=bool(attrs.get(FEASIBLE, trial.state is TrialState.COMPLETE)),
            recipe=recipe,
            timing=dict(attrs.get(TIMING, {})),
            worker=attrs.get(WORKER),
            error=attrs.get(ERROR),
            params=dict(trial.params),
            density=float(attrs.get(DENSITY, 1.0)),
            evaluated=trial.state is TrialState.COMPLETE or bool(attrs.get(EVALUATED, False)),
            reused_from=attrs.get(REUSED),
            fidelity=dict(attrs.get(FIDELITY) or {}),
        )


def objective_names(study: optuna.Study) -> list[str]:
    names = study.user_attrs.get(OBJECTIVES)
    if names:
        return list(names)
    return [f"objective_{i}" for i in range(len(study.directions))]


def read_records(study: optuna.Study, include_failed: bool = True) -> list[TrialRecord]:
    """Completed trials, and (``include_failed``) failed ones and those stopped early by multi-fidelity racing.

    PRUNED trials that were never evaluated (``over_budget``: another driver took the last candidate)
    are left out, as before.
    """
    names = objective_names(study)
    states = (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED) if include_failed else (TrialState.COMPLETE,)
    trials = study.get_trials(deepcopy=False, states=states)
    trials = [t for t in trials if t.state is not TrialState.PRUNED or t.user_attrs.get(EVALUATED)]
    return [TrialRecord.from_trial(t, names) for t in sorted(trials, key=lambda t: t.number)]
