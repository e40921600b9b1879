"""Multi-fidelity evaluation: growing stratified slices, racing against the incumbent, PRUNED trials.

On the tiny zoo (3 tasks, 67 search examples each): a candidate that is clearly worse than the
incumbent (λ = 0: the base with the experts' heads) is stopped after its first slice and recorded as
a PRUNED trial with the examples it used; a candidate close to the incumbent is scored in full, and
its scores are bit for bit those of a full evaluation; the slices are stratified and the same for
every candidate; resume keeps a pruned trial pruned; the summary's example count is the hand count.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
from conftest import write_search_config
from optuna.trial import TrialState
from pydantic import ValidationError

from mergetune.errors import TaskError
from mergetune.objectives.slices import check_fractions, task_slices
from mergetune.objectives.suite import SuiteScores
from mergetune.recipe import Recipe
from mergetune.search import records as R
from mergetune.search.config import FidelityConfig, SearchConfig
from mergetune.search.fidelity import Incumbent
from mergetune.search.loop import SearchLoop, open_search, resolve_models, worker_setup
from mergetune.search.saved_evaluation import SavedEvaluation, record_evaluation
from mergetune.search.storage import finished_trials, has_outcome
from mergetune.search.worker import Worker

SLICES = [0.25, 0.5, 1.0]
FIRST = 17  # ceil(0.25 × 67): examples of each tiny-zoo task in the first slice


# ---- slices ----------------------------------------------------------------------------------------
def test_slices_are_stratified_seeded_and_cover_every_example_once() -> None:
    labels = np.array([0] * 60 + [1] * 30 + [2] * 10)
    parts = task_slices(100, labels, (0.125, 0.25, 0.5, 1.0), seed=3, task="t")
    assert sorted(np.concatenate(parts).tolist()) == list(range(100))  # every example once
    assert [len(p) for p in parts] == [13, 12, 25, 50]  # ceil(12.5), ceil(25) − 13, ...
    seen = np.empty(0, dtype=np.int64)
    for part in parts:  # every prefix holds each label in its share of the whole, within one example
        seen = np.concatenate([seen, part])
        for label, share in ((0, 0.6), (1, 0.3), (2, 0.1)):
            assert abs(np.sum(labels[seen] == label) - share * len(seen)) <= 1, (label, len(seen))
    again = task_slices(100, labels, (0.125, 0.25, 0.5, 1.0), seed=3, task="t")
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))  # fixed by seed and task
    other = task_slices(100, labels, (0.125, 0.25, 0.5, 1.0), seed=3, task="u")
    assert not np.array_equal(parts[0], other[0])  # each task is shuffled on its own


@pytest.mark.parametrize("bad", [[0.5], [0.5, 0.25, 1.0], [0.0, 1.0], [0.5, 0.5, 1.0]])
def test_slices_must_grow_to_every_example(bad: list[float]) -> None:
    with pytest.raises(TaskError, match="fidelity slices"):
        check_fractions(bad)
    with pytest.raises(ValidationError, match="fidelity slices"):  # the config says so, naming the field
        FidelityConfig(slices=bad)


# ---- a search with racing --------------------------------------------------------------------------
@pytest.fixture
def config(tmp_path: Path, zoo_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> SearchConfig:
    """A tiny search on the mean alone (the pooled rule), raced on 1/4, 1/2, all; no warm starts."""
    for key, value in zoo_env.items():
        monkeypatch.setenv(key, value)
    path = write_search_config(
        tmp_path / "c.yaml",
        warm_start=False,
        budget={"candidates": 3},
        objectives={"optimize": ["mean"], "worst_weight": 0.0},
        evaluation={"fidelity": {"enabled": True, "slices": SLICES, "p_threshold": 0.05}},
        space={"methods": ["task_arithmetic"], "weight": {"per": "task"}},
    )
    return SearchConfig.load(path)


def ta_point(loop: SearchLoop, weight: float) -> dict[str, Any]:
    recipe = Recipe(base=loop.space.base, experts=loop.space.experts, method="task_arithmetic", weight=weight)
    return loop.space.from_recipe(recipe)


def run_queued(
    config: SearchConfig, weights: list[float], *, expert_level: bool = False
) -> tuple[SearchLoop, dict[str, Any]]:
    """Run a search over Task Arithmetic candidates queued in this order (λ per task); with ``expert_level``,
    the study first holds a candidate that scored as the experts themselves do (trial 0)."""
    loop = open_search(config.updated("budget", candidates=len(weights) + expert_level))
    if expert_level:
        add_expert_level_trial(loop)
    for weight in weights:
        loop.study.enqueue_trial(ta_point(loop, weight))
    try:
        return loop, loop.run()
    finally:
        loop.close()


def add_expert_level_trial(loop: SearchLoop) -> None:
    """A completed candidate whose every score is its task's expert's, example for example (the tiny zoo has no
    merge clearly better than the base: its merges all sit near the base; its experts are well above it).

    Recorded as the loop records a candidate scored in full (scores, normalised scores, per-example values),
    so that the next candidates race against it.
    """
    scores = expert_scores(loop.executor.worker)  # type: ignore[attr-defined]
    full = {name: t.n_examples for name, t in scores.tasks.items()}
    point = ta_point(loop, 0.9)
    attrs = {
        R.RECIPE: loop.space.to_recipe(point).to_dict(),
        R.SCORES: scores.scores,
        R.NORMALIZED: scores.normalized,
        R.METRICS: {name: dict(t.metrics) for name, t in scores.tasks.items()},
        R.FEASIBLE: True,
        R.DENSITY: 1.0,
        R.TIMING: {"merge": 0.0, "eval": scores.seconds},
        R.PER_EXAMPLE: {name: [float(v) for v in t.per_example] for name, t in scores.tasks.items()},
        R.FIDELITY: {"stopped": False, "stage": 3, "stages": 3, "examples": full, "full_examples": full},
    }
    trial = optuna.trial.create_trial(
        params=point,
        distributions={k: loop.space.distributions[k] for k in point},
        values=[1.0],
        user_attrs=attrs,
    )
    loop.study.add_trial(trial)


def expert_scores(worker: Worker) -> SuiteScores:
    """Each task's expert scored on the worker's search suite, with its per-example values."""
    experts = {t.name: worker._load_model(t, worker.setup.task_experts()[t.name]) for t in worker._search_tasks}
    return worker.suite("search").score(experts)


def expert_incumbent(worker: Worker) -> Incumbent:
    """An incumbent that scores as the experts do, example for example (see ``add_expert_level_trial``)."""
    scores = expert_scores(worker)
    return Incumbent(0, scores.scores, {name: [float(v) for v in t.per_example] for name, t in scores.tasks.items()})


def test_a_clearly_worse_candidate_is_stopped_after_its_first_slice(config: SearchConfig) -> None:
    # trial 0 scores as the experts do; 0.0 (the base) and 1.0 are clearly worse: stopped after 1/4 of the examples
    loop, summary = run_queued(config, [0.0, 1.0], expert_level=True)
    trials = loop.study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.PRUNED]
    full = {task: 67 for task in ("trec6", "sms_spam", "vader_tweets")}
    for stopped in trials[1:]:
        fidelity = stopped.user_attrs[R.FIDELITY]
        assert fidelity["stopped"] and fidelity["stage"] == 1 and fidelity["incumbent"] == 0
        assert fidelity["examples"] == {task: FIRST for task in full} and fidelity["full_examples"] == full
        assert fidelity["p_value"] < 0.05 and fidelity["gap"] > 0
        partial_mean = np.mean(list(stopped.user_attrs[R.NORMALIZED].values()))
        assert stopped.intermediate_values == {3 * FIRST: pytest.approx(partial_mean)}  # TPE ranks it by this
        assert R.PER_EXAMPLE not in stopped.user_attrs  # partial: never an incumbent

    # never on the front, never a finalist, never chosen; counted apart from failures
    assert summary["front"] == [0] and [f["trial"] for f in summary["finalists"]] == [0]
    assert summary["counts"]["pruned"] == 2 and summary["meta"]["failed"] == 0
    examples = summary["meta"]["fidelity"]
    assert examples["examples_scored"] == 67 * 3 + 2 * FIRST * 3  # by hand: one in full, two first slices
    assert examples["examples_full"] == 3 * 67 * 3 and examples["stopped_early"] == 2
    assert "examples_scored" in (config.output_dir / "summary.md").read_text()


def test_a_raced_candidate_scored_in_full_equals_a_full_evaluation_bit_for_bit(config: SearchConfig) -> None:
    loop, _ = run_queued(config, [0.5, 0.45])
    close = loop.study.get_trials(deepcopy=False)[1]
    assert close.user_attrs[R.FIDELITY]["incumbent"] == 0  # it was raced
    recipe = Recipe.model_validate(close.user_attrs[R.RECIPE])
    worker = Worker(loop.setup)
    worker.merger.merge(recipe)
    full = worker.suite("search").score(worker.models)  # every example at once, no stages
    assert close.user_attrs[R.SCORES] == full.scores  # exact equality, float for float
    assert close.user_attrs[R.NORMALIZED] == full.normalized
    # and the same as a search without multi-fidelity (accuracies: counts of right answers)
    plain = Worker(dataclasses.replace(loop.setup, fidelity=None)).evaluate(recipe)
    assert plain.scores == full.scores
    for task, values in close.user_attrs[R.PER_EXAMPLE].items():  # accuracy = mean of the 0/1 values
        assert len(values) == 67 and np.mean(values) == pytest.approx(full.scores[task], abs=1e-12)


def test_every_candidate_is_raced_on_the_same_examples(config: SearchConfig) -> None:
    setup = worker_setup(config, resolve_models(config))
    first, second = Worker(setup), Worker(setup)  # two workers (two Ray actors): the same slices
    for name in first.suite("search").task_names:
        a, b = first.suite("search").evaluators[name], second.suite("search").evaluators[name]
        assert all(np.array_equal(x, y) for x, y in zip(a.parts, b.parts, strict=True))
        labels = a.labels
        shares = np.bincount(labels, minlength=labels.max() + 1) / len(labels)
        counts = np.bincount(labels[a.rows_upto(1)], minlength=len(shares))
        assert np.all(np.abs(counts - shares * FIRST) <= 1)  # the first slice is stratified


def test_resume_keeps_a_pruned_trial_pruned(config: SearchConfig) -> None:
    first, _ = run_queued(config, [0.0], expert_level=True)
    before = first.study.get_trials(deepcopy=False)[1].user_attrs
    assert first.study.get_trials(deepcopy=False)[1].state is TrialState.PRUNED
    loop = open_search(config.updated("budget", candidates=3))
    try:
        loop.run()
    finally:
        loop.close()
    trials = loop.study.get_trials(deepcopy=False)
    assert trials[1].state is TrialState.PRUNED and trials[1].user_attrs == before  # untouched by the resume
    assert len(trials) == 3 and all(t.user_attrs.get("retry_of") != 1 for t in trials)  # not re-queued
    assert 1 in [r.number for r in loop.records() if r.pruned]


def test_a_pruned_result_saved_before_a_kill_is_recorded_pruned_on_resume(tmp_path: Path) -> None:
    study = optuna.create_study(direction="maximize")
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    attrs = {R.EVALUATED: True, R.FIDELITY: {"stopped": True, "examples": {"t": 5}}}
    saved = SavedEvaluation(study.study_name, trial.number, trial.params, "PRUNED", None, attrs, {}, {"5": 0.25})
    saved.save(tmp_path)
    loaded = SavedEvaluation.load_for(tmp_path, study, study.trials[0])
    assert loaded == saved
    record_evaluation(study, trial._trial_id, loaded)
    stored = study.trials[0]
    assert stored.state is TrialState.PRUNED and stored.intermediate_values == {5: 0.25}
    assert has_outcome(stored) and finished_trials(study) == [stored]  # not re-queued, counted in the budget


def test_a_pareto_run_stops_only_a_candidate_worse_with_confidence_on_every_task(config: SearchConfig) -> None:
    """λ on sms_spam alone ties the experts on sms_spam (both 1.0) and trails on the other tasks: the mean
    rule stops it after its first slice, the rule of Pareto runs (worse on every task) scores it in full."""
    setup = worker_setup(config, resolve_models(config))
    assert setup.fidelity is not None and not setup.fidelity.every_task  # the config optimises the mean alone
    worker = Worker(setup)
    incumbent = expert_incumbent(worker)
    tasks = list(setup.experts)
    experts = [{"name": t, "model": p} for t, p in setup.experts.items()]
    weight = {t: 1.0 if t == "sms_spam" else 0.0 for t in tasks}
    recipe = Recipe(base=setup.base, experts=experts, method="task_arithmetic", weight=weight)
    on_mean = worker.evaluate(recipe, "search", incumbent)
    assert on_mean.stopped and on_mean.fidelity is not None and on_mean.fidelity["stage"] == 1
    worker.setup = dataclasses.replace(setup, fidelity=dataclasses.replace(setup.fidelity, every_task=True))
    on_every_task = worker.evaluate(recipe, "search", incumbent)
    assert not on_every_task.stopped and on_every_task.scores["sms_spam"] == incumbent.scores["sms_spam"] == 1.0
    pareto = SearchConfig.model_validate({**config.model_dump(mode="json", exclude_unset=True), "objectives": {}})
    assert worker_setup(pareto, resolve_models(pareto)).fidelity.every_task  # the default [mean, worst]: that rule
