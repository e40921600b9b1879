"""One candidate's evaluation: its scores and where the time went.

Its own module so that the worker (which scores static candidates and hands dynamic ones to
:mod:`mergetune.search.dynamic`) and the dynamic runner (which annotates an evaluation with its routing
statistics) both build on it without importing each other both ways: worker -> dynamic -> evaluation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mergetune.errors import MergetuneError
from mergetune.objectives.suite import SuiteScores


@dataclass(frozen=True)
class Evaluation:
    """One candidate's scores (higher is better) and where the time went."""

    scores: dict[str, float]
    normalized: dict[str, float]
    metrics: dict[str, dict[str, float]]
    merge_seconds: float
    eval_seconds: float
    worker: str
    extra: dict[str, Any] = field(default_factory=dict)
    # multi-fidelity (see ``fidelity``): each task's per-example values (every example, row order) of a
    # candidate scored in full, and what its race found (stopped or not, examples used, evidence)
    per_example: dict[str, list[float]] | None = None
    fidelity: dict[str, Any] | None = None
    # with ``per_example``: each task's score = example_scale × the mean of its per-example values (1 for a
    # mean metric; a token-weighted loss's values are per-example sums, scaled by examples / tokens)
    example_scale: dict[str, float] | None = None

    @property
    def stopped(self) -> bool:
        """Stopped early by the race: its scores are partial (on the examples its ``fidelity`` names)."""
        return bool(self.fidelity and self.fidelity.get("stopped"))

    @property
    def mean_normalized(self) -> float:
        return float(np.mean(list(self.normalized.values())))

    @property
    def worst_normalized(self) -> float:
        return float(min(self.normalized.values()))


def evaluation_from_scores(
    scores: SuiteScores,
    merge_s: float,
    eval_s: float,
    worker: str,
    *,
    fidelity: dict[str, Any] | None = None,
    keep_examples: bool = False,
) -> Evaluation:
    """A suite's scores as an Evaluation; a non-finite score is an error (the merged model produced NaN/inf).

    With ``fidelity`` (a raced candidate), the evaluation keeps the per-example values of a candidate
    that was scored in full, so that it can serve as the incumbent of later races. ``keep_examples``
    keeps them whatever the fidelity (the chosen recipe's test outcomes, for paired comparisons of runs).
    """
    bad = [name for name, value in scores.scores.items() if not math.isfinite(value)]
    if bad:
        raise MergetuneError(f"non-finite score on task(s) {bad}: the merged model produced NaN/inf")
    keep = keep_examples or (fidelity is not None and not fidelity.get("stopped"))
    return Evaluation(
        scores=scores.scores,
        normalized={k: float(v) for k, v in scores.normalized.items()},
        metrics={name: dict(t.metrics) for name, t in scores.tasks.items()},
        merge_seconds=merge_s,
        eval_seconds=eval_s,
        worker=worker,
        per_example=_per_example(scores) if keep else None,
        fidelity=fidelity,
        example_scale={name: float(t.example_scale) for name, t in scores.tasks.items()} if keep else None,
    )


def _per_example(scores: SuiteScores) -> dict[str, list[float]]:
    """Each task's per-example values, for the tasks that have them."""
    return {name: [float(v) for v in t.per_example] for name, t in scores.tasks.items() if t.per_example is not None}
