"""Each task's normalisation in a search: resolved in one place, stored with the study, checked on resume.

The worker scores with it (through the suite), the loop stores it in the study (user attribute
``normalization``: task -> rule, formula, what it is measured against), and status, the results,
the report and the model card read it from there or from ``summary.json`` (``meta.normalization``).

A study holds normalised scores: resuming it under another rule would mix two scales in one
search. Studies made before per-task normalisation stored no rule; they used merged / expert, and
expert loss / merged loss for losses. Such a study resumes when every task keeps its rule (all
accuracy-like tasks normalised against their expert, as encoder zoos are) and is refused, with
one line naming the tasks and both rules, when a rule would change (a loss task now normalised as
the share of the expert's gain kept).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage

from mergetune.objectives.normalization import FORMULAS, Normalization, legacy_rule, normalization_of
from mergetune.objectives.tasks import TaskConfig
from mergetune.search import records as R
from mergetune.search.binding import ConfigChangedError
from mergetune.search.storage import open_storage
from mergetune.search.worker import WorkerSetup

#: Study user attribute holding each task's normalisation (see ``describe``).
NORMALIZATION = "normalization"


def task_normalizations(setup: WorkerSetup) -> dict[str, Normalization]:
    """Each task's normalisation, from its config's ``normalize`` and whether it has an expert."""
    out = {}
    for data in setup.tasks:
        task = TaskConfig.model_validate(data)
        has_expert = setup.expert_of(task) is not None
        out[task.name] = normalization_of(task.name, task.score_metric, task.normalize, has_expert=has_expert)
    return out


def normalized_tasks(normalizations: Mapping[str, Normalization]) -> list[str]:
    """The tasks that enter the objectives and floors (all but those normalised as ``none``)."""
    return [name for name, n in normalizations.items() if n.rule != "none"]


def describe(normalizations: Mapping[str, Normalization]) -> dict[str, dict[str, Any]]:
    return {name: n.describe() for name, n in normalizations.items()}


def check_resume(storage_url: str, study_name: str, normalizations: Mapping[str, Normalization]) -> None:
    """Refuse (one line) to resume a study whose scores were normalised by another rule; reads only."""
    if "://" not in storage_url and not Path(storage_url).expanduser().exists():
        return
    stored = stored_rules(open_storage(storage_url), study_name)
    if stored is None:
        return
    changed = {
        task: (before, normalizations[task].rule)
        for task, before in stored.items()
        if task in normalizations and before != normalizations[task].rule
    }
    if changed:
        shown = "; ".join(f"'{t}': {FORMULAS.get(a, a)} -> {FORMULAS[b]}" for t, (a, b) in changed.items())
        raise ConfigChangedError(
            f"the storage {storage_url} holds search '{study_name}' whose scores were normalised by another rule "
            f"({shown}); they cannot be mixed with new ones: give this search a new 'name:', or run "
            "`mergetune search CONFIG --restart` to move the old run folder aside and start afresh"
        )


def stored_rules(storage: BaseStorage, study_name: str) -> dict[str, str] | None:
    """task -> rule the study was scored with; the older versions' rules for a study that stored none.

    None when there is no such study, or it has no trial yet (nothing scored: nothing to mix).
    """
    try:
        study_id = storage.get_study_id_from_name(study_name)
    except KeyError:
        return None
    stored = storage.get_study_user_attrs(study_id).get(NORMALIZATION)
    if stored is not None:
        return {task: str(entry.get("rule")) for task, entry in stored.items()}
    trials = storage.get_all_trials(study_id, deepcopy=False)
    metrics = _stored_metrics(trials)
    if not trials or not metrics:
        return None
    return {task: legacy_rule(metric) for task, metric in metrics.items()}


def _stored_metrics(trials: list[optuna.trial.FrozenTrial]) -> dict[str, str]:
    """task -> primary metric name, from the per-task metrics the trials recorded (older studies)."""
    for trial in trials:
        metrics = trial.user_attrs.get(R.METRICS) or {}
        scores = trial.user_attrs.get(R.SCORES) or {}
        if scores:
            return {task: _primary(metrics.get(task) or {}, value) for task, value in scores.items()}
    return {}


def _primary(metrics: Mapping[str, float], score: float) -> str:
    """The metric whose value is the task's score (losses are stored as ``neg_loss``/``neg_entropy``)."""
    for name in ("neg_loss", "neg_entropy"):
        if name in metrics and metrics[name] == score:
            return name
    return "accuracy"


def stamp(study: optuna.Study, normalizations: Mapping[str, Normalization]) -> None:
    """Record the tasks' normalisation in the study (status and the results read it)."""
    if study.user_attrs.get(NORMALIZATION) != describe(normalizations):
        study.set_user_attr(NORMALIZATION, describe(normalizations))
