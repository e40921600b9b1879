"""Twin-Merging in a search: its options are searched like any method's, its candidates are labelled
dynamic beside the static ones, and a searched Twin recipe rebuilt and reloaded through the CLI scores
bit for bit what the search worker scored."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from typer.testing import CliRunner

from mergetune.cli import app
from mergetune.merging.methods import method_options
from mergetune.recipe import Expert, Recipe
from mergetune.search.config import SearchConfig
from mergetune.search.loop import open_search
from mergetune.search.space import FloatRange, MethodSpace, ParamRange, SearchSpace

TASKS = ["a", "b", "c"]
GROUPS = ["embed", "blocks.0", "blocks.1", "head"]
TWIN_SPACE = {
    "rank_fraction": FloatRange(low=0.05, high=0.5),
    "temperature": FloatRange(low=0.2, high=5.0, log=True),
    "top_k": [1, 2, None],
}


def twin_space(shared_method: str | list[str]) -> SearchSpace:
    methods = {
        "task_arithmetic": MethodSpace(),
        "twin": MethodSpace(options={**TWIN_SPACE, "shared_method": shared_method}),
    }
    experts = [Expert(name=t, model=f"/m/{t}") for t in TASKS]
    return SearchSpace("/m/base", experts, GROUPS, methods, ParamRange(per="task"), ParamRange(per="shared"))


def test_space_searches_twin_options_and_density_only_for_a_density_shared_method() -> None:
    ta_shared = {a.name for a in twin_space("task_arithmetic").axes_for("twin")}
    assert {"twin/opt/rank_fraction", "twin/opt/temperature", "twin/opt/top_k", "twin/weight/a"} <= ta_shared
    assert "twin/density" not in ta_shared  # Task Arithmetic's θ* has no density
    space = twin_space(["task_arithmetic", "ties"])
    assert {"twin/density", "twin/opt/shared_method"} <= {a.name for a in space.axes_for("twin")}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=2))
    methods = set()
    for _ in range(12):
        params = space.suggest(study.ask())
        recipe = space.to_recipe(params)
        assert Recipe.model_validate(recipe.to_dict()) == recipe
        back = space.from_recipe(recipe)
        assert back == pytest.approx(params)
        methods.add(recipe.method)
        if recipe.method == "twin":
            options = method_options(recipe)
            assert 0.05 <= options.rank_fraction <= 0.5 and options.top_k in (1, 2, None)
    assert methods == {"task_arithmetic", "twin"}


@pytest.fixture
def zoo_cache(tiny_zoo, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tiny_zoo.folder.parent.parent
    monkeypatch.setenv("MERGETUNE_CACHE", str(cache))
    monkeypatch.setenv("MERGETUNE_COMPILE", "0")
    return cache


def test_search_mixes_static_and_dynamic_and_a_twin_rebuilds_bit_for_bit(zoo_cache: Path, tmp_path: Path) -> None:
    options = {"rank_fraction": {"low": 0.05, "high": 0.5}, "temperature": {"low": 0.3, "high": 3.0}, "top_k": [1, 3]}
    config = SearchConfig.model_validate(
        {
            "name": "twin-test",
            "models": {"zoo": "tiny"},
            "space": {"methods": {"task_arithmetic": {}, "twin": {"options": options}}, "weight": {"per": "shared"}},
            "optimizer": {"name": "random"},
            "budget": {"candidates": 6},
            "selection": {"rescore_top": 6},
            "output": str(tmp_path / "run"),
        }
    )
    loop = open_search(config)
    loop.run()
    run = tmp_path / "run"
    candidates = json.loads((run / "candidates.json").read_text())
    assert {c["kind"] for c in candidates} == {"static", "dynamic"}
    dynamic = [c for c in candidates if c["kind"] == "dynamic"]
    assert all(c["method"] == "twin" and c["state"] == "COMPLETE" for c in dynamic)
    front = json.loads((run / "front.json").read_text())
    assert len(front["kinds"]) == len(front["trials"])
    summary = (run / "summary.md").read_text()
    assert "| twin | dynamic |" in summary and "| task_arithmetic | static |" in summary

    best = max(dynamic, key=lambda c: c["mean_normalized"])
    recipe = Recipe.model_validate(best["recipe"])
    worker_test = loop.executor.score([recipe], "test")[0]
    assert worker_test.extra["kind"] == "dynamic"
    routing = {task: m["routing_accuracy"] for task, m in worker_test.metrics.items()}

    recipe.save(tmp_path / "twin.yaml")
    cli = CliRunner()
    built = cli.invoke(app, ["twin", "build", str(tmp_path / "twin.yaml"), str(tmp_path / "twin")])
    assert built.exit_code == 0, built.output
    assert "routing accuracy" in built.output
    scored = cli.invoke(
        app, ["twin", "eval", str(tmp_path / "twin"), "--split", "test", "--json", str(tmp_path / "s.json")]
    )
    assert scored.exit_code == 0, scored.output
    from_folder = json.loads((tmp_path / "s.json").read_text())
    assert {t: v["score"] for t, v in from_folder["tasks"].items()} == worker_test.scores  # bit for bit
    assert {t: v["normalized"] for t, v in from_folder["tasks"].items()} == worker_test.normalized
    assert from_folder["routing_accuracy"] == routing


def test_twin_cli_errors_are_one_line(tmp_path: Path, zoo_cache: Path, tiny_zoo) -> None:
    recipe = Recipe(base=str(tiny_zoo.base), experts=tiny_zoo.recipe_experts(), method="ties")
    recipe.save(tmp_path / "ties.yaml")
    cli = CliRunner()
    result = cli.invoke(app, ["twin", "build", str(tmp_path / "ties.yaml"), str(tmp_path / "out")])
    assert result.exit_code == 2 and "method: twin" in result.output
    result = cli.invoke(app, ["twin", "eval", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "not a Twin folder" in result.output
    merged = cli.invoke(app, ["merge", str(_twin_recipe(tiny_zoo, tmp_path)), str(tmp_path / "merged")])
    assert merged.exit_code == 2 and "mergetune twin build" in merged.output


def _twin_recipe(tiny_zoo, tmp_path: Path) -> Path:
    return Recipe(base=str(tiny_zoo.base), experts=tiny_zoo.recipe_experts(), method="twin").save(tmp_path / "t.yaml")
