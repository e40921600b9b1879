"""``mergetune tune``: gradient tuning of λ as a stage after a search (or from any recipe).

Loads one worker for the search config (the same models, tasks, splits and references a search
uses), tunes the start recipe's λ per task × layer group on the search split
(:mod:`mergetune.search.gradient`), scores the start and the tuned recipe on the search split and
on the held-out part, and writes ``<run>/tuned/recipe.yaml`` and ``summary.json``. The held-out
scores are the ones to compare: the search split is what was tuned on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mergetune.errors import MergetuneError
from mergetune.merging.methods import load_recipe
from mergetune.recipe import Recipe
from mergetune.search.atomic import write_atomic
from mergetune.search.config import SearchConfig
from mergetune.search.gradient import GradientSettings, TunedWeights
from mergetune.search.loop import resolve_models, worker_setup
from mergetune.search.worker import Worker

SPLITS = ("search", "holdout")


@dataclass
class TuningReport:
    tuned: TunedWeights
    scores: dict[str, dict[str, float]]  # {"start"|"tuned": {split: mean normalised score}}
    folder: Path


def start_recipe(config: SearchConfig, start: Path | None) -> Recipe:
    """The given recipe, else the run's chosen one."""
    path = start or config.output_dir / "chosen" / "recipe.yaml"
    if not path.exists():
        raise MergetuneError(
            f"no start recipe: {path} does not exist; run `mergetune search` first or give --start RECIPE"
        )
    return load_recipe(path)


def tune(config: SearchConfig, start: Path | None, settings: GradientSettings, console: Any = None) -> TuningReport:
    recipe = start_recipe(config, start)
    worker = Worker(worker_setup(config, resolve_models(config, console)))
    recipe = _on_worker_models(recipe, worker)
    tuned = worker.tune(recipe, settings)
    scores = {
        label: {split: worker.evaluate(r, split).mean_normalized for split in SPLITS}
        for label, r in (("start", recipe), ("tuned", tuned.recipe))
    }
    folder = config.output_dir / "tuned"
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / "recipe.yaml", yaml.safe_dump(tuned.recipe.model_dump(mode="json"), sort_keys=False))
    write_atomic(folder / "summary.json", json.dumps({**tuned.summary(), "scores": scores}, indent=2) + "\n")
    return TuningReport(tuned, scores, folder)


def _on_worker_models(recipe: Recipe, worker: Worker) -> Recipe:
    """The recipe must name the config's experts (same tasks, same order): λ is tuned on those models."""
    if recipe.task_names != worker.modelset.task_names:
        raise MergetuneError(
            f"the start recipe's experts {recipe.task_names} are not the config's {worker.modelset.task_names}"
        )
    return recipe
