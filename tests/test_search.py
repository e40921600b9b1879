"""The search loop end to end on the real tiny zoo: config errors, space round trips, a full search
that writes its results, and a driver killed with SIGKILL that resumes without losing or
re-evaluating a finished candidate. (``zoo_env``, ``run_cli`` and ``trials_by_state``: conftest.)"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import optuna
import pytest
from conftest import run_cli, trials_by_state, write_search_config
from optuna.trial import TrialState

from mergetune.recipe import Expert, Recipe
from mergetune.search.config import SearchConfig, SearchConfigError
from mergetune.search.space import MethodSpace, ParamRange, SearchSpace

TASKS = ["a", "b", "c"]
GROUPS = ["embed", "blocks.0", "blocks.1", "head"]


write_config = write_search_config


# ---- config and space -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("patch", "where"),
    [
        ({"optimzer": {"name": "tpe"}}, "optimzer"),
        ({"optimizer": {"name": "bayes"}}, "optimizer.name"),
        ({"space": {"methods": {"ties": {"options": {"dencity": 0.2}}}}}, "dencity"),
        ({"space": {"methods": ["ties"], "weight": {"per": "task", "low": 2.0, "high": 1.0}}}, "space.weight"),
        ({"budget": {"candidates": None}}, "budget"),
    ],
)
def test_config_errors_name_the_field(tmp_path: Path, patch: dict, where: str) -> None:
    path = write_config(tmp_path / "c.yaml", **patch)
    with pytest.raises(SearchConfigError) as err:
        SearchConfig.load(path)
    assert where in str(err.value) and str(path) in str(err.value)


def make_space(weight: ParamRange, density: ParamRange, methods: dict | None = None) -> SearchSpace:
    methods = methods or {"ties": MethodSpace(options={"disjoint": ["mean", "sum"]}), "task_arithmetic": MethodSpace()}
    experts = [Expert(name=t, model=f"/m/{t}") for t in TASKS]
    return SearchSpace("/m/base", experts, GROUPS, methods, weight, density)


@pytest.mark.parametrize("per", ["shared", "task", "group", "task_group"])
@pytest.mark.parametrize("anchors", [None, 2])
def test_space_points_and_recipes_round_trip(per: str, anchors: int | None) -> None:
    space = make_space(ParamRange(per=per, low=0.1, high=2.0, anchors=anchors), ParamRange(per=per, low=0.05, high=0.9))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(6):
        params = space.suggest(study.ask())
        recipe = space.to_recipe(params)
        assert Recipe.model_validate(recipe.to_dict()) == recipe
        back = space.from_recipe(recipe)
        assert back.keys() == params.keys()
        for key, value in params.items():
            assert back[key] == pytest.approx(value, abs=1e-12) if isinstance(value, float) else back[key] == value


def test_space_is_conditional_on_the_method() -> None:
    space = make_space(ParamRange(per="task"), ParamRange(per="shared"))
    names = {a.name for a in space.axes_for("task_arithmetic")}
    assert names == {"method", "task_arithmetic/weight/a", "task_arithmetic/weight/b", "task_arithmetic/weight/c"}
    ties = {a.name for a in space.axes_for("ties")}
    assert {"ties/density", "ties/opt/disjoint"} <= ties and not any(n.startswith("task_arithmetic") for n in ties)
    two_anchor = make_space(ParamRange(per="group", anchors=2, low=0.0, high=1.0), ParamRange(per="shared"))
    recipe = two_anchor.to_recipe(
        {"method": "task_arithmetic", "task_arithmetic/weight/a0": 0.0, "task_arithmetic/weight/a1": 0.9}
    )
    assert recipe.weight == {"*": [0.0, 0.9]}  # a ramp over depth: 0, 0.3, 0.6, 0.9 on the 4 groups


# ---- end to end -------------------------------------------------------------------------------------


def test_search_writes_results_and_improves_on_its_warm_starts(tmp_path: Path, zoo_env: dict[str, str]) -> None:
    cfg = write_config(tmp_path / "c.yaml", budget={"candidates": 14})
    proc = run_cli(["search", str(cfg)], zoo_env, tmp_path)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    run = tmp_path / "run"
    for name in ("candidates.csv", "candidates.json", "summary.md", "chosen/recipe.yaml", "chosen/scores.json"):
        assert (run / name).is_file(), name
    assert list((run / "front").glob("*.yaml"))
    chosen = Recipe.load(run / "chosen" / "recipe.yaml")
    scores = json.loads((run / "chosen" / "scores.json").read_text())
    assert chosen.method in {"task_arithmetic", "ties"} and "test" in json.dumps(scores)
    # the chosen recipe's per-example test outcomes (for paired comparisons of runs) average to its test scores
    examples = json.loads((run / "test_examples.json").read_text())
    test_scores = json.loads((run / "summary.json").read_text())["chosen"]["test"]["scores"]
    assert set(examples) == set(test_scores)
    for task, score in test_scores.items():
        assert sum(examples[task]) / len(examples[task]) == pytest.approx(score), task
    states = trials_by_state(run / "search.journal")
    complete = states[TrialState.COMPLETE]
    assert len(complete) == 14 and TrialState.RUNNING not in states
    warm = [t.values[0] for t in complete if t.user_attrs.get("warm_start")]
    searched = [t.values[0] for t in complete if not t.user_attrs.get("warm_start")]
    assert len(warm) == 2 and len(searched) == 12  # TA λ=0.3 and TIES (0.2, 1.0), evaluated first
    # The optimizer's own candidates, warm starts excluded, must beat the best warm start. (The old
    # check, best of ALL trials > mean of the warm starts, could not fail: the warm starts are among
    # all trials and their best is at least their mean.) A search that proposes only worse recipes
    # than the papers' defaults fails here; measured: best warm 0.758, best searched 0.864.
    assert max(searched) > max(warm)
    # A second run of the same command finds the budget spent and evaluates nothing new.
    again = run_cli(["search", str(cfg)], zoo_env, tmp_path)
    again.communicate(timeout=300)
    assert len(trials_by_state(run / "search.journal")[TrialState.COMPLETE]) == 14


def test_killed_search_resumes_without_losing_or_repeating_candidates(tmp_path: Path, zoo_env: dict[str, str]):
    budget = 40
    cfg = write_config(tmp_path / "c.yaml", budget={"candidates": budget})
    journal = tmp_path / "run" / "search.journal"
    proc = run_cli(["search", str(cfg)], zoo_env, tmp_path)
    deadline = time.time() + 240
    while time.time() < deadline:
        time.sleep(0.2)
        if journal.exists() and len(trials_by_state(journal).get(TrialState.COMPLETE, [])) >= 5:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = trials_by_state(journal)
    done_before = {t.number: t.values for t in before[TrialState.COMPLETE]}
    running = [t.number for t in before.get(TrialState.RUNNING, [])]
    # A trial killed after its result was saved (evaluations/<trial>.json) but before it was recorded
    # is completed from that file on resume; only the others were interrupted mid-evaluation.
    saved = {n for n in running if (tmp_path / "run" / "evaluations" / f"{n}.json").is_file()}
    interrupted = sorted(set(running) - saved)
    assert 5 <= len(done_before) < budget, "the driver should be killed mid-search"

    resumed = run_cli(["search", str(cfg)], zoo_env, tmp_path)
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    after = trials_by_state(journal)
    complete = after[TrialState.COMPLETE]
    assert len(complete) == budget  # exactly the budget: nothing lost, nothing evaluated twice
    assert {t.number: t.values for t in complete if t.number in done_before} == done_before
    failed = [t.number for t in after.get(TrialState.FAIL, [])]
    assert sorted(failed) == interrupted  # only the interrupted ones, each re-queued and completed
    retried = {t.user_attrs.get("retry_of") for t in complete} - {None}
    assert retried == set(interrupted)
    assert saved <= {t.number for t in complete}  # a saved result is recorded, not evaluated again
    assert TrialState.RUNNING not in after and TrialState.WAITING not in after


def test_floors_on_some_tasks_name_their_own_constraints() -> None:
    from mergetune.search.outcomes import outcome_of

    config = SearchConfig.model_validate(
        {"name": "x", "models": {"zoo": "tiny"}, "space": {"methods": ["ties"]}, "objectives": {"floors": {"c": 0.9}}}
    )
    outcome = outcome_of({"a": 0.5, "b": 1.0, "c": 0.8}, 0.2, ["mean", "worst"], config)
    assert outcome.constraint_names == ("c",)
    assert outcome.constraints == pytest.approx((0.1,))
    assert not outcome.feasible


def test_a_low_precision_recipe_is_scored_with_its_own_weights(
    zoo_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Task models are bound to the float32 merge buffer; a bfloat16 recipe's values are written there rounded
    to bfloat16 (no bf16 buffer beside it), and the scored models must hold them (not the previous candidate's)."""
    import torch

    from mergetune.search.loop import resolve_models, worker_setup
    from mergetune.search.worker import Worker

    for key, value in zoo_env.items():
        monkeypatch.setenv(key, value)
    config = SearchConfig.load(write_config(tmp_path / "c.yaml"))
    setup = worker_setup(config, resolve_models(config))
    worker = Worker(setup)
    experts = [Expert(name=t, model=p) for t, p in setup.experts.items()]
    recipe = Recipe(base=setup.base, experts=experts, method="task_arithmetic", weight=0.37, dtype="bfloat16")
    worker.evaluate(recipe.model_copy(update={"dtype": "float32", "weight": 0.9}))  # something else first
    worker.evaluate(recipe)
    fp32 = worker.merger.output_buffer(torch.float32).clone()
    bf16 = worker.merger.merge(recipe)  # the bf16 merge itself, into a bf16 buffer of its own
    assert all(v.dtype == torch.bfloat16 for v in bf16.values())
    assert torch.equal(fp32, torch.cat([v.reshape(-1) for v in bf16.values()]).float())
    worker.merger.merge(recipe.model_copy(update={"dtype": "float32"}))
    unrounded = worker.merger.output_buffer(torch.float32)
    assert not torch.equal(fp32, unrounded)  # bf16 rounding is visible: the check above is not vacuous


def test_test_examples_are_written_in_the_score_units(tmp_path: Path) -> None:
    """A token-weighted loss keeps per-example −NLL sums; the file holds them × examples / tokens, so that
    each task's values average to its score (what a paired bootstrap of two runs reads)."""
    from mergetune.search.evaluation import Evaluation
    from mergetune.search.finalize import TEST_EXAMPLES, _write_test_examples

    # 2 texts of 10 and 20 tokens, NLL sums 20 and 40: score = −60 / 30 = −2, example_scale = 2 / 30
    ev = Evaluation(
        scores={"lm": -2.0, "acc": 0.5},
        normalized={},
        metrics={},
        merge_seconds=0.0,
        eval_seconds=0.0,
        worker="w",
        per_example={"lm": [-20.0, -40.0], "acc": [1.0, 0.0]},
        example_scale={"lm": 2 / 30, "acc": 1.0},
    )
    _write_test_examples(tmp_path, ev)
    written = json.loads((tmp_path / TEST_EXAMPLES).read_text())
    assert written["lm"] == pytest.approx([-4 / 3, -8 / 3]) and sum(written["lm"]) / 2 == pytest.approx(-2.0)
    assert written["acc"] == [1.0, 0.0]
