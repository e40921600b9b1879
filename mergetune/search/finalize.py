"""The end of a search: choose the recipe, confirm it on unseen data, write everything down.

1. Fronts: the Pareto front on the optimised objectives, and the per-task front (every task's
   normalised score), both from the storage.
2. Finalists: the ``rescore_top`` best completed candidates by the selection rule (feasible
   first; see ``pareto.rank_finalists``).
3. Re-score: each finalist on the validation examples the search never scored (the held-out part,
   ``selection.holdout_fraction``), so the choice does not reward overfitting to the search's noise.
4. Choose: the rule applied to the re-scored results (``pareto.choose``).
5. Test: the chosen recipe, once, on the held-out test split. Nothing in the search saw it.
6. Write: ``results.write_results`` (chosen recipe, front recipes, all candidates, summary), and
   the chosen recipe's per-example test outcomes (``test_examples.json``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from mergetune.errors import MergetuneError
from mergetune.objectives.normalization import Normalization
from mergetune.recipe import Recipe
from mergetune.search import pareto, results
from mergetune.search.atomic import write_atomic
from mergetune.search.config import SearchConfig
from mergetune.search.executor import Executor
from mergetune.search.normalizations import describe, normalized_tasks, task_normalizations
from mergetune.search.optimizers import Optimizer
from mergetune.search.outcomes import floors_of
from mergetune.search.records import TrialRecord
from mergetune.search.space import SearchSpace
from mergetune.search.worker import Evaluation, WorkerSetup

log = logging.getLogger(__name__)


class FinishedSearch(Protocol):
    """What finalising reads of a search whose budget is spent (the loop is one).

    A protocol, so that the loop calls ``finalize(self)`` without this module importing the loop.
    """

    config: SearchConfig
    out: Path
    objectives: list[str]
    space: SearchSpace
    optimizer: Optimizer
    executor: Executor
    storage_url: str
    setup: WorkerSetup
    overheads: list[float]  # the loop's own seconds per candidate (ask + tell)
    setup_costs: dict[str, Any]  # what preparing the candidates cost before the first one (RegMean's Grams)

    def records(self) -> list[TrialRecord]: ...


def finalize(loop: FinishedSearch) -> dict[str, Any]:
    """Choose, confirm and write down the result of a finished search; returns the summary (see above)."""
    config = loop.config
    records = loop.records()
    completed = [r for r in records if r.ok]
    if not completed:
        errors = sorted({r.error for r in records if r.error})[:3]
        raise MergetuneError(f"no candidate of search '{config.name}' was evaluated successfully; errors: {errors}")
    front = pareto.optimized_front(completed, loop.objectives)
    task_front = pareto.per_task_front(completed)
    normalizations = task_normalizations(loop.setup)
    floors = floors_of(config, normalized_tasks(normalizations))
    finalists = pareto.rank_finalists(completed, config.selection.rule, config.selection.rescore_top, floors=floors)
    recipes = [Recipe.model_validate(r.recipe) for r in finalists]

    rescored = None
    if config.selection.holdout_fraction > 0:
        rescored = [_scores(e) for e in loop.executor.score(recipes, "holdout")]
    chosen = pareto.choose(finalists, [r["normalized"] for r in rescored] if rescored else None, config.selection.rule)
    test_evaluation = loop.executor.score([recipes[chosen]], "test")[0]
    test = _scores(test_evaluation)
    _write_test_examples(loop.out, test_evaluation)
    meta = {
        "name": config.name,
        "optimizer": loop.optimizer.describe(),
        "executor": loop.executor.describe(),
        "budget": config.budget.model_dump(),
        "candidates": len(records),
        "completed": len(completed),
        "failed": sum(1 for r in records if not r.ok and not r.pruned),
        **_fidelity(loop, records),
        "objectives": loop.objectives,
        "storage": loop.storage_url,
        "rule": config.selection.rule,
        "floors": floors,
        **_references(loop, normalizations),
        **overhead_summary(loop),
        **({"setup": loop.setup_costs} if loop.setup_costs else {}),
    }
    return results.write_results(
        loop.out,
        records=records,
        objectives=loop.objectives,
        front=front,
        task_front=task_front,
        finalists=finalists,
        rescored=rescored,
        chosen_index=chosen,
        test_scores=test,
        meta=meta,
    )


TEST_EXAMPLES = "test_examples.json"


def _write_test_examples(out: Path, ev: Evaluation) -> None:
    """The chosen recipe's per-example test outcomes, {task: [value per example, row order]}, in the score's
    units: each task's values average to its test score (a token-weighted loss's per-example sums are
    scaled by examples / tokens).

    What a paired comparison of two runs on the same test examples needs (a bootstrap over examples:
    ``benchmarks/search_quality.py``); tasks whose evaluator has no per-example values are left out.
    """
    if ev.per_example:
        scale = ev.example_scale or {}
        values = {task: [v * scale.get(task, 1.0) for v in vs] for task, vs in ev.per_example.items()}
        write_atomic(out / TEST_EXAMPLES, json.dumps(values))


def _fidelity(loop: FinishedSearch, records: list[TrialRecord]) -> dict[str, Any]:
    """Multi-fidelity's settings and what it saved: examples scored in all against full evaluation."""
    settings = loop.setup.fidelity
    if settings is None:
        return {}
    rule = "worse on every task" if settings.every_task else "worse on the mean"
    described = {"slices": list(settings.fractions), "p_threshold": settings.p_threshold, "rule": rule}
    return {"fidelity": {**described, **results.examples_summary(records)}}


def _references(loop: FinishedSearch, normalizations: dict[str, Normalization]) -> dict[str, Any]:
    """What each task is normalised against, with its references per split.

    ``references``: the experts' own scores, {task: {split: score}} (tasks with an expert);
    ``base_references``: the base's, for the tasks whose rule needs them; ``normalization``: each
    task's rule and formula (and its chance level, for chance-corrected tasks).
    """
    splits = ("search", "holdout", "test") if loop.config.selection.holdout_fraction > 0 else ("search", "test")
    by_split = {split: loop.executor.references(split) for split in splits}

    def per_split(role: str) -> dict[str, dict[str, float]]:
        tasks = [t for t in normalizations if all(role in by_split[s].get(t, {}) for s in splits)]
        return {task: {split: by_split[split][task][role] for split in splits} for task in tasks}

    described = describe(normalizations)
    for task, chance in per_split("chance").items():
        described[task]["chance"] = chance
    return {"references": per_split("expert"), "base_references": per_split("base"), "normalization": described}


def _scores(ev: Evaluation) -> dict[str, Any]:
    return {
        "scores": ev.scores,
        "normalized": ev.normalized,
        "mean_normalized": ev.mean_normalized,
        "worst_normalized": ev.worst_normalized,
    }


def overhead_summary(loop: FinishedSearch) -> dict[str, float]:
    """The loop's own cost per candidate, beside the executor's and the evaluation's (for the summary)."""
    evaluated = [r for r in loop.records() if r.ok or r.pruned]  # a candidate stopped early was evaluated too
    evals = [r.timing.get("merge", 0) + r.timing.get("eval", 0) for r in evaluated]
    if not loop.overheads or not evals:
        return {}
    executor = [r.timing["executor"] for r in evaluated if "executor" in r.timing]
    return {
        "overhead_ms_per_candidate": 1e3 * float(np.mean(loop.overheads)),
        "executor_ms_per_candidate": 1e3 * float(np.mean(executor)) if executor else 0.0,
        "eval_s_per_candidate": float(np.mean(evals)),
        "overhead_fraction": float(np.mean(loop.overheads) / np.mean(evals)),
    }
