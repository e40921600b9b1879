"""Multi-fidelity evaluation: score a candidate on growing slices, stop it once it is very unlikely to win.

With ``evaluation.fidelity.enabled``, the search split of each task is cut into growing, stratified
slices fixed by the seed (default 1/8, 1/4, 1/2, all; :mod:`mergetune.objectives.slices`), the same
for every candidate, so two candidates' per-example results pair up. A candidate is scored slice by
slice; after each slice but the last, it is compared with the incumbent on the examples scored so
far, and stopped when the comparison says it is very unlikely to beat it. A candidate that is not
stopped is scored on every example, and its scores equal bit for bit those of a full evaluation.

Which rule, and why: **racing with a paired, one-sided Wilcoxon signed-rank test**, the rule of
Optuna's ``WilcoxonPruner`` (``scipy.stats.wilcoxon(..., alternative="less", zero_method="zsplit")``,
at least 2 paired values, and never stop a candidate whose average is not below the incumbent's),
applied to per-example results. Successive halving compares candidates within a rung and needs many
candidates at once (an asynchronous loop with a few workers has one or two in flight), and it ranks
on the partial score alone, ignoring that the incumbent was measured on the very same examples; a
paired test uses that pairing, which removes the example-difficulty noise that dominates a small
slice, and it stops a candidate for its own evidence, whatever else is running. Optuna's pruner object
itself needs the study (it reads the best trial's intermediate values from the storage), which a Ray
worker does not have: the driver sends the incumbent's per-example values with each candidate
(:class:`Incumbent`) and the worker decides (:func:`race`). The sequential test is not corrected for
its repeated looks (as Optuna's is not): ``p_threshold`` is the per-look level.

What is compared:

- one objective, ``mean`` (the default search; no worst-task weight, no floors): each example's
  difference to the incumbent, weighted into its share of the mean normalised score (the task's
  normalisation slope at the incumbent's score, the evaluator's ``example_scale``, 1 / examples
  scored, 1 / tasks), pooled over tasks in one test. Tasks scored whole (custom scorers, lm-eval)
  add their exact difference to the average, not to the test. The incumbent is the best feasible
  mean so far.
- any other run (Pareto fronts, worst-task weight, floors, sparsity): a candidate is stopped only
  when the incumbent is better with confidence **on every task** (each task's own one-sided test,
  each task's average below the incumbent's, tasks scored whole below it exactly). Being worse on
  every task means worse mean, worse worst task and every floor no nearer; with ``sparsity`` among
  the objectives the incumbent is the best mean among candidates at least as sparse. So a stopped
  candidate could not have entered the front through its scores.

Stopped candidates are PRUNED trials (see ``loop``) with the examples they used and their partial
scores; they never enter a front or the finalists.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.stats
from torch import nn

from mergetune.objectives.suite import SuiteScores, ValidationSuite

log = logging.getLogger(__name__)

MIN_PAIRS = 2  # fewer paired values than this tell nothing (Optuna's WilcoxonPruner waits for 2 as well)


@dataclass(frozen=True)
class FidelitySettings:
    """How candidates are raced: the cumulative slice fractions, the test's level and the rule."""

    fractions: tuple[float, ...]
    p_threshold: float
    every_task: bool = False  # the rule of multi-objective runs (see the module docstring)


@dataclass(frozen=True)
class Incumbent:
    """The trial to beat, as the driver sends it with a candidate: its scores and per-example values on the
    search split (per task, every example in row order)."""

    trial: int
    scores: dict[str, float]
    per_example: dict[str, list[float]]


@dataclass(frozen=True)
class Verdict:
    """The outcome of a race: whether the candidate was stopped, after how many stages, and the evidence."""

    stop: bool
    stage: int
    p_value: float | None = None
    gap: float | None = None  # incumbent minus candidate, mean normalised score on the examples scored

    def describe(self, suite: ValidationSuite, incumbent: Incumbent | None) -> dict[str, Any]:
        """What the trial records of its fidelity: the examples used per task, against all, and the evidence."""
        return {
            "stopped": self.stop,
            "stage": self.stage,
            "stages": suite.stages,
            "examples": suite.examples_at(self.stage),
            "full_examples": suite.examples_at(suite.stages),
            "p_value": self.p_value,
            "gap": self.gap,
            "incumbent": None if incumbent is None else incumbent.trial,
        }


def race(
    suite: ValidationSuite,
    models: Mapping[str, nn.Module],
    incumbent: Incumbent | None,
    settings: FidelitySettings,
) -> tuple[SuiteScores, Verdict]:
    """Score a candidate stage by stage; after each stage but the last, stop it if it is beaten (see above)."""
    run, scores = suite.score_stage(models)
    verdict = Verdict(False, 1)
    while run.stage < suite.stages:
        if incumbent is not None:
            verdict = judge(suite, scores, incumbent, settings, run.stage)
            if verdict.stop:
                return scores, verdict
        run, scores = suite.score_stage(models, run)
    return scores, Verdict(False, run.stage, verdict.p_value, verdict.gap)


def judge(
    suite: ValidationSuite, scores: SuiteScores, incumbent: Incumbent, settings: FidelitySettings, stage: int
) -> Verdict:
    """Whether a candidate's scores after ``stage`` stages say it is very unlikely to beat the incumbent."""
    tasks = [t for t in suite.task_names if suite.normalize(t, scores.tasks[t].score) is not None]
    if any(t not in incumbent.scores for t in tasks):
        return Verdict(False, stage)
    paired = {t: _paired(suite, scores, incumbent, t, stage) for t in tasks if suite.sliced(t)}
    if any(p is None for p in paired.values()) or not tasks:
        return Verdict(False, stage)
    slopes = {t: _slope(suite, t, incumbent.scores[t]) for t in paired}
    # each example's share of the mean normalised score: slope × scale × difference / (examples × tasks)
    shares = {
        t: slopes[t] * scores.tasks[t].example_scale * d / (len(d) * len(tasks))  # type: ignore[arg-type]
        for t, d in paired.items()
    }
    exact = {t: _normalized_gain(suite, scores, incumbent, t) / len(tasks) for t in tasks if t not in paired}
    gain = sum(float(s.sum()) for s in shares.values()) + sum(exact.values())
    if settings.every_task:
        return _every_task(shares, exact, settings, stage, gain)
    values = np.concatenate(list(shares.values())) if shares else np.empty(0)
    if len(values) < MIN_PAIRS:
        return Verdict(False, stage, None, -gain)
    p = float(scipy.stats.wilcoxon(values, alternative="less", zero_method="zsplit").pvalue)
    return Verdict(bool(p < settings.p_threshold and gain < 0), stage, p, -gain)


def _every_task(
    shares: dict[str, np.ndarray], exact: dict[str, float], settings: FidelitySettings, stage: int, gain: float
) -> Verdict:
    """Stopped only when the incumbent is better with confidence on every task (the largest p is reported)."""
    p_values = []
    for values in shares.values():
        if len(values) < MIN_PAIRS or values.sum() >= 0:
            return Verdict(False, stage, None, -gain)
        p_values.append(float(scipy.stats.wilcoxon(values, alternative="less", zero_method="zsplit").pvalue))
    worst_p = max(p_values, default=0.0)
    beaten = all(g < 0 for g in exact.values()) and worst_p < settings.p_threshold
    return Verdict(beaten, stage, worst_p, -gain)


def _paired(
    suite: ValidationSuite, scores: SuiteScores, incumbent: Incumbent, task: str, stage: int
) -> np.ndarray | None:
    """Candidate minus incumbent per example scored so far; None when the incumbent's values do not pair up."""
    mine = scores.tasks[task].per_example
    theirs = incumbent.per_example.get(task)
    evaluator = suite.evaluators[task]
    if mine is None or theirs is None or len(theirs) != evaluator.n_examples:
        log.warning("task %s: the incumbent's per-example values do not pair with this suite's; not raced", task)
        return None
    rows = evaluator.rows_upto(stage)  # type: ignore[attr-defined]
    return np.asarray(mine, dtype=np.float64) - np.asarray(theirs, dtype=np.float64)[rows]


def _slope(suite: ValidationSuite, task: str, score: float) -> float:
    """d(normalised score)/d(score) at ``score`` (exact for the linear rules; local for perplexity ratios)."""
    step = 1e-6 * max(1.0, abs(score))
    high, low = suite.normalize(task, score + step), suite.normalize(task, score - step)
    assert high is not None and low is not None
    return (high - low) / (2 * step)


def _normalized_gain(suite: ValidationSuite, scores: SuiteScores, incumbent: Incumbent, task: str) -> float:
    """Candidate minus incumbent in normalised score on a task scored whole (exact: both on every example)."""
    mine = suite.normalize(task, scores.tasks[task].score)
    theirs = suite.normalize(task, incumbent.scores[task])
    assert mine is not None and theirs is not None
    return mine - theirs
