"""``mergetune report RUN_DIR --score-references CONFIG``: score the base and the baselines for the report.

A search scores only its candidates on validation, and only the chosen recipe on test. To show the
chosen recipe beside the base (the pretrained model wearing each expert's head: Task Arithmetic
with λ = 0) and the baselines (the papers' default recipes the search started from: its warm
starts) on validation *and* test, this builds the search's worker from its config and scores them,
once, after the search. The test scores are for the report only: nothing is chosen with them.
Results go to ``RUN_DIR/report/references.json``, which the report reads.
"""

from __future__ import annotations

import json
from pathlib import Path

from mergetune.export.card import read_json
from mergetune.export.report_data import REFERENCES_FILE, load_run
from mergetune.recipe import Recipe
from mergetune.search.config import SearchConfig
from mergetune.search.loop import resolve_models, worker_setup
from mergetune.search.worker import Worker, WorkerSetup

SPLITS = ("search", "test")


def reference_recipes(run: Path, config_path: Path) -> tuple[dict[str, Recipe], WorkerSetup]:
    """The base and the warm-start recipes of a run, and the config's worker setup to score them with."""
    config = SearchConfig.load(config_path)
    models = resolve_models(config)
    setup = worker_setup(config, models)
    experts = [{"name": t, "model": m} for t, m in models.experts.items()]
    recipes = {
        "base (experts' heads)": Recipe.model_validate(
            {"base": models.base, "experts": experts, "method": "task_arithmetic", "weight": 0.0}
        )
    }
    data = load_run(run)
    rows = {c["number"]: c for c in read_json(run / "candidates.json")}
    for c in data.candidates:
        if c.warm_start and rows[c.number].get("recipe"):
            recipes[f"baseline: {c.method} (trial {c.number})"] = Recipe.model_validate(rows[c.number]["recipe"])
    return recipes, setup


def score_references(run: Path, config_path: Path) -> Path:
    """Score the base and baselines on validation (the search's part) and test; write references.json."""
    recipes, setup = reference_recipes(Path(run), Path(config_path))
    worker = Worker(setup)
    scored = {
        label: {split: worker.evaluate(recipe, split).scores for split in SPLITS} for label, recipe in recipes.items()
    }
    out = Path(run) / "report"
    out.mkdir(parents=True, exist_ok=True)
    path = out / REFERENCES_FILE
    path.write_text(json.dumps({"config": str(config_path), "models": scored}, indent=2) + "\n")
    return path
