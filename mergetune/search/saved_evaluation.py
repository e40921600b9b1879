"""A finished evaluation saved to its own file before the study records it: a kill loses nothing.

Recording one result in the study takes several journal appends (one per user attribute, one per
constraint, then the tell). A driver killed between two of them leaves the trial RUNNING with half
its attributes; without a copy of the result elsewhere, the resume could only fail the trial and
evaluate the candidate again. So the loop first writes the whole result, atomically, to
``<run>/evaluations/<trial>.json`` and only then records it; a resume completes a RUNNING trial
that has such a file from the file (same attributes, same values) instead of re-queueing it.
The file names its study and the trial's parameters, so a stale file of another search in the same
folder is never taken for this trial's result.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import optuna

# Optuna's own key for a constraint value (what ``Trial.set_constraint`` writes): written here through
# the storage, because a resumed trial has no live ``Trial`` and building one would run the sampler.
from optuna.study._constrained_optimization import _CONSTRAINTS_KEY
from optuna.trial import FrozenTrial, TrialState

from mergetune.search.atomic import write_atomic

log = logging.getLogger(__name__)
EVALUATIONS_DIR = "evaluations"


@dataclass(frozen=True)
class SavedEvaluation:
    """Everything the study records for one finished trial: state, objective values, attributes, constraints."""

    study: str
    number: int
    params: dict[str, Any]
    state: str  # TrialState name: COMPLETE, FAIL for an evaluation that raised, PRUNED for one stopped early
    values: list[float] | None
    user_attrs: dict[str, Any]
    constraints: dict[str, float] = field(default_factory=dict)
    intermediate: dict[str, float] = field(default_factory=dict)  # PRUNED: step (examples) -> partial value

    def save(self, run: Path) -> Path:
        """Write this result to ``<run>/evaluations/<trial>.json``, whole or not at all."""
        path = evaluation_path(run, self.number)
        write_atomic(path, json.dumps(asdict(self), indent=1) + "\n")
        return path

    @classmethod
    def load_for(cls, run: Path, study: optuna.Study, trial: FrozenTrial) -> SavedEvaluation | None:
        """The saved result of ``trial`` of ``study``, or None (no file, unreadable, or another search's)."""
        path = evaluation_path(run, trial.number)
        if not path.is_file():
            return None
        try:
            saved = cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as exc:  # written atomically, so only a foreign file fails here
            log.warning("ignoring the unreadable saved evaluation %s: %s", path, exc)
            return None
        if (saved.study, saved.number, saved.params) != (study.study_name, trial.number, trial.params):
            return None  # another search's (or an earlier study's) trial of the same number
        return saved


def evaluation_path(run: Path, number: int) -> Path:
    return run / EVALUATIONS_DIR / f"{number}.json"


def record_evaluation(
    study: optuna.Study, trial_id: int, saved: SavedEvaluation, after_append: Callable[[], None] | None = None
) -> None:
    """Record ``saved`` in the study: its attributes and constraints, then the tell that finishes the trial.

    Safe to repeat on a trial a kill left half-recorded: attributes are overwritten with the same
    values and constraints already there are left alone. ``after_append`` runs after each append
    (the loop's test-only kill hook).
    """
    storage = study._storage  # ask/tell gives no public handle on a trial that is not the live one
    after = after_append or (lambda: None)
    for key, value in saved.user_attrs.items():
        storage.set_trial_user_attr(trial_id, key, value)
        after()
    present = storage.get_trial_system_attrs(trial_id)
    for name, value in saved.constraints.items():
        key = f"{_CONSTRAINTS_KEY}:{name}"
        if key not in present:
            storage.set_trial_system_attr(trial_id, key, value)
            after()
    for step, value in saved.intermediate.items():
        storage.set_trial_intermediate_value(trial_id, int(step), value)
        after()
    if saved.state in (TrialState.FAIL.name, TrialState.PRUNED.name):
        study.tell(saved.number, state=TrialState[saved.state])
    else:
        study.tell(saved.number, saved.values)
    after()
