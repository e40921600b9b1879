"""Dynamic candidates in a search: Twin-Merging recipes scored with a worker's resident state.

A search worker keeps the ModelSet, the merger, one task model per task bound to the merge buffer,
the tasks (with their training splits) and the tokeniser. A ``method: twin`` candidate is built on
them (:func:`mergetune.twin.build_twin`: the shared merge goes into the same buffer, so the
bound task models hold θ*), then scored with the task models wrapped as routed models, adapters
installed only for the duration of the scoring. The SVDs and the routers of the latest shared
merges are cached, so re-scoring a finalist (held-out, test) does not recompute them.

Besides the usual scores, each task's metrics gain ``routing_accuracy``: the fraction of the scored
examples whose most likely route was that task's own expert; the evaluation's ``extra`` says
``kind: dynamic`` and where the build time went.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from mergetune.merging.engine import Merger
from mergetune.merging.modelset import ModelSet
from mergetune.objectives.suite import SuiteScores, ValidationSuite
from mergetune.objectives.tasks import TaskData
from mergetune.recipe import Recipe
from mergetune.search.evaluation import Evaluation
from mergetune.twin.model import TwinCache, build_twin
from mergetune.twin.router import body_of

DYNAMIC = "dynamic"


@dataclass(frozen=True)
class DynamicRun:
    """One dynamic candidate's scores, timings and routing statistics."""

    scores: SuiteScores
    build_seconds: float
    eval_seconds: float
    routing_accuracy: dict[str, float | None]
    extra: dict[str, Any]

    def annotate(self, evaluation: Evaluation) -> Evaluation:
        """The evaluation with each task's routing accuracy in its metrics and the build facts in ``extra``."""
        metrics = {task: {**values, **self._routing_metric(task)} for task, values in evaluation.metrics.items()}
        return dataclasses.replace(evaluation, metrics=metrics, extra={**evaluation.extra, **self.extra})

    def _routing_metric(self, task: str) -> dict[str, float]:
        value = self.routing_accuracy.get(task)
        return {} if value is None else {"routing_accuracy": value}


class DynamicRunner:
    """Builds and scores Twin-Merging candidates on a worker's resident models."""

    def __init__(
        self,
        modelset: ModelSet,
        merger: Merger,
        models: Mapping[str, nn.Module],
        tasks: Sequence[TaskData],
        tokenizer: Any,
    ) -> None:
        self.modelset = modelset
        self.merger = merger
        self.models = dict(models)
        self.tasks = list(tasks)
        self.tokenizer = tokenizer
        self.cache = TwinCache()

    def run(self, recipe: Recipe, suite: ValidationSuite) -> DynamicRun:
        start = time.perf_counter()
        body = body_of(next(iter(self.models.values())))
        twin = build_twin(recipe, self.modelset, self.merger, body, self.tasks, self.tokenizer, cache=self.cache)
        built = time.perf_counter()
        models = {name: self.models[name] for name in suite.task_names}
        with twin.routed(models) as routed:
            scores = suite.score(routed)
            routing = {name: model.routing_accuracy for name, model in routed.items()}
        extra = {
            "kind": DYNAMIC,
            "build_seconds": dict(twin.timings),
            "exclusive_bytes": twin.knowledge.nbytes(),
        }
        return DynamicRun(scores, built - start, time.perf_counter() - built, routing, extra)
