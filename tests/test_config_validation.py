"""Validation before work (issue 12, items 6 and 8): a bad number or range in a search config is one
line naming its field when the file is read, not a traceback after the models are loaded; the
space's own weight range applies to every method; a stored point outside today's space is clipped or
dropped instead of crashing every resume. (``zoo_env``, ``run_cli``, ``trials_by_state``: conftest.)"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import run_cli, trials_by_state, write_search_config
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState

from mergetune.errors import RecipeError, TaskError
from mergetune.merging.methods import METHODS
from mergetune.objectives.tasks import TaskConfig
from mergetune.objectives.zoo import CACHE_ENV, get_zoo
from mergetune.recipe import Expert, Recipe
from mergetune.search.config import SearchConfig, SearchConfigError
from mergetune.search.space import MethodSpace, ParamRange, SearchSpace
from mergetune.search.storage import RETRY_ATTR, open_storage

TASKS = ["a", "b"]
GROUPS = ["embed", "blocks.0", "head"]


write_config = partial(write_search_config, budget={"candidates": 3}, selection={"rescore_top": 1})


def space_of(
    weight: ParamRange, methods: dict[str, MethodSpace] | None = None, density: ParamRange | None = None
) -> SearchSpace:
    methods = methods or {"ties": MethodSpace(), "task_arithmetic": MethodSpace(), "pcb": MethodSpace()}
    experts = [Expert(name=t, model=f"/m/{t}") for t in TASKS]
    density = density or ParamRange(per="shared", low=0.05, high=1.0)
    return SearchSpace("/m/base", experts, GROUPS, methods, weight, density)


# ---- every number checked when the config is read ----------------------------------------------------

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    ("patch", "where"),
    [
        ({"space": {"methods": ["ties"], "density": {"per": "shared", "low": 0.1, "high": 1.5}}}, "space.density"),
        ({"space": {"methods": {"ties": {"density": {"low": -0.1, "high": 0.5}}}}}, "ties.density"),
        ({"space": {"methods": ["ties"], "weight": {"low": NAN, "high": 1.0}}}, "space.weight.low"),
        ({"space": {"methods": ["ties"], "weight": {"low": 0.0, "high": INF}}}, "space.weight.high"),
        ({"space": {"methods": {"ties": {"options": {"scale": {"low": 2.0, "high": 1.0}}}}}}, "space.methods"),
        ({"space": {"methods": {"tsv": {"options": {"rank_fraction": {"low": 0.5, "high": 1.5}}}}}}, "rank_fraction"),
        ({"space": {"methods": {"ties": {"options": {"disjoint": ["mean", "median"]}}}}}, "ties.options.disjoint"),
        ({"seed": 2**32}, "seed"),
        ({"evaluation": {"threads": 10**12}}, "evaluation.threads"),
        ({"objectives": {"floors": NAN}}, "objectives.floors"),
        ({"objectives": {"floors": {"*": INF}}}, "objectives.floors"),
        ({"objectives": {"penalty": NAN}}, "objectives.penalty"),
        ({"objectives": {"worst_weight": -1.0}}, "objectives.worst_weight"),
        ({"budget": {"seconds": INF}}, "budget.seconds"),
        ({"selection": {"holdout_fraction": NAN}}, "selection.holdout_fraction"),
        ({"execution": {"executor": "ray", "gpus_per_worker": INF}}, "execution.gpus_per_worker"),
    ],
)
def test_bad_numbers_and_ranges_are_refused_naming_the_field(tmp_path: Path, patch: dict, where: str) -> None:
    path = write_config(tmp_path / "c.yaml", **patch)
    with pytest.raises(SearchConfigError) as err:
        SearchConfig.load(path)
    assert where in str(err.value)


def test_a_task_seed_beyond_numpy_is_refused_naming_the_task(tmp_path: Path) -> None:
    task = {"name": "a", "source": "builtin:sms_spam", "seed": 2**32}
    models = {"base": "/m/base", "experts": [{"name": "a", "model": "/m/a"}]}
    path = write_config(tmp_path / "c.yaml", models=models, tasks=[task])
    with pytest.raises(SearchConfigError, match=r"tasks: .*task 'a': seed 4294967296 must be below 2\*\*32"):
        SearchConfig.load(path)


def test_the_recipe_seed_stays_below_2_to_the_32() -> None:
    fields = {"base": "/m/base", "experts": [{"name": "a", "model": "/m/a"}], "method": "task_arithmetic"}
    assert Recipe.parse({**fields, "seed": 2**32 - 1}).seed == 2**32 - 1
    with pytest.raises(RecipeError, match="seed"):
        Recipe.parse({**fields, "seed": 2**32})


def test_a_nan_floor_is_one_line_from_the_command_line(tmp_path: Path, zoo_env: dict[str, str]) -> None:
    """Before: `floors: .nan` validated, and the run crashed with a traceback after its first evaluation."""
    path = write_config(tmp_path / "c.yaml")
    path.write_text(path.read_text() + "objectives: {floors: .nan}\n")
    proc = run_cli(["search", str(path)], zoo_env, tmp_path)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2, out
    assert "objectives.floors" in out and "Traceback" not in out
    assert not (tmp_path / "run").exists()  # refused before anything was created


# ---- floors name tasks that enter the objectives ---------------------------------------------------------

TWO_EXPERTS = {"base": "/m/base", "experts": [{"name": "a", "model": "/m/a"}, {"name": "b", "model": "/m/b"}]}
TWO_TASKS = [
    {"name": "a", "source": "builtin:sms_spam"},
    {"name": "b", "source": "builtin:trec6", "normalize": "none"},  # scored in its own units only
]


@pytest.mark.parametrize(
    ("floors", "why"),
    [({"c": 0.8}, "'c' is not a task"), ({"*": 0.5, "b": 0.8}, "'b' is normalised as 'none'")],
)
def test_a_floor_on_an_unknown_or_unnormalised_task_is_one_line_naming_the_tasks(
    tmp_path: Path, floors: dict, why: str
) -> None:
    """Before: both floors were dropped without a word (only normalised tasks get constraints), so a typo in a
    floor's name left its task unguarded."""
    path = write_config(tmp_path / "c.yaml", models=TWO_EXPERTS, tasks=TWO_TASKS, objectives={"floors": floors})
    with pytest.raises(SearchConfigError) as err:
        SearchConfig.load(path)
    assert f"objectives.floors: {why}" in str(err.value)
    assert "floors apply to the normalised tasks ['a'] or '*'" in str(err.value)
    ok = write_config(tmp_path / "ok.yaml", models=TWO_EXPERTS, tasks=TWO_TASKS, objectives={"floors": {"a": 0.8}})
    assert SearchConfig.load(ok).objectives.floors == {"a": 0.8}


def test_a_zoo_search_checks_its_floors_against_the_zoos_tasks() -> None:
    """A zoo's tasks are known only when the zoo is read: the check runs where they join the config's."""
    zoo_tasks = [TaskConfig(name=n, source="builtin:sms_spam") for n in ("trec6", "sms_spam")]
    config = SearchConfig.model_validate(
        {"name": "x", "models": {"zoo": "tiny"}, "space": {"methods": ["ties"]}, "objectives": {"floors": {"trec": 1}}}
    )
    with pytest.raises(TaskError, match=r"'trec' is not a task; .* \['trec6', 'sms_spam'\]"):
        config.resolved_tasks(["trec6", "sms_spam"], zoo_tasks)


def test_a_zoo_search_scores_the_configs_tasks_too_and_a_view_name_reads_the_zoos_view(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: the tasks of a config with a zoo were ignored without a word (a guard task was never scored).
    Nothing is built: the zoo's tasks and its view's path come from its spec and the cache folder."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    guard = {"name": "guard", "source": "builtin:vader_nyt", "kind": "lm", "train_size": 0}
    answers = {"name": "answers", "source": "trec6.jsonl", "kind": "lm", "expert": "trec6", "answer_column": "label"}
    data = {"name": "x", "models": {"zoo": "llm-tiny"}, "space": {"methods": ["ties"]}, "tasks": [guard, answers]}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    config = SearchConfig.load(path)
    spec = get_zoo("llm-tiny")
    zoo_tasks = list(spec.resolved_tasks(spec.folder()))
    tasks = config.resolved_tasks([t.name for t in zoo_tasks], zoo_tasks)
    assert [(t["name"], t["expert"]) for t in tasks] == [
        ("sms_spam", "sms_spam"),
        ("bbc_news", "bbc_news"),
        ("trec6", "trec6"),
        ("answers", "trec6"),
        ("guard", None),
    ]
    view = spec.folder() / "data" / "trec6.jsonl"
    assert {t["name"]: t["source"] for t in tasks}["answers"] == str(view.resolve())


# ---- the space's weight range applies -------------------------------------------------------------------


def test_the_space_weight_range_applies_to_every_method_without_its_own() -> None:
    given = space_of(
        ParamRange(per="task", low=0.5, high=0.6),
        {"ties": MethodSpace(), "pcb": MethodSpace(weight=ParamRange(per="shared", low=1.0, high=1.5))},
    )
    assert (given.weight_range("ties").low, given.weight_range("ties").high) == (0.5, 0.6)
    assert (given.weight_range("pcb").low, given.weight_range("pcb").high) == (1.0, 1.5)  # its own range wins
    bounds = {a.name: (a.distribution.low, a.distribution.high) for a in given.axes if "weight" in a.name}
    assert bounds == {"ties/weight/a": (0.5, 0.6), "ties/weight/b": (0.5, 0.6), "pcb/weight": (1.0, 1.5)}


def test_without_low_and_high_each_method_searches_its_own_range() -> None:
    default = space_of(ParamRange(per="shared"))
    for method in ("ties", "task_arithmetic", "pcb"):
        rng = default.weight_range(method)
        assert (rng.low, rng.high) == METHODS[method].search_weight and rng.per == "shared"


def test_the_space_density_range_applies_to_every_method_without_its_own() -> None:
    methods = {"ties": MethodSpace(), "della": MethodSpace(), "breadcrumbs": MethodSpace()}
    given = space_of(ParamRange(per="shared"), methods, ParamRange(per="shared", low=0.3, high=0.4))
    for method in methods:  # della and breadcrumbs have built-in ranges; the given one wins
        assert (given.density_range(method).low, given.density_range(method).high) == (0.3, 0.4)
    own = space_of(ParamRange(per="shared"), {"della": MethodSpace(density=ParamRange(per="shared", low=0.6))})
    assert own.density_range("della").low == 0.6  # a method's own range still wins
    default = space_of(ParamRange(per="shared"), methods, ParamRange(per="group"))
    assert (default.density_range("ties").low, default.density_range("ties").high) == (0.05, 1.0)
    assert default.density_range("ties").per == "group"
    assert (default.density_range("breadcrumbs").low, default.density_range("breadcrumbs").high) == METHODS[
        "breadcrumbs"
    ].search_density


def test_warm_starts_outside_the_given_range_are_clipped_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    space = space_of(ParamRange(per="shared", low=0.5, high=0.6), {"task_arithmetic": MethodSpace()})
    recipe = Recipe(base="/m/base", experts=space.experts, method="task_arithmetic", weight=0.3)
    with caplog.at_level(logging.WARNING):
        assert space.from_recipe(recipe) == {"task_arithmetic/weight": 0.5}
    assert "task_arithmetic/weight = 0.3 lies outside the search space" in caplog.text


# ---- a stored point outside today's space ---------------------------------------------------------------


def test_admit_clips_floats_and_refuses_what_the_space_cannot_evaluate(caplog: pytest.LogCaptureFixture) -> None:
    space = space_of(
        ParamRange(per="shared", low=0.0, high=1.0),
        {"ties": MethodSpace(options={"disjoint": ["mean", "sum"]}), "task_arithmetic": MethodSpace()},
    )
    stale = {"method": "ties", "ties/weight": 1.7, "ties/density": 1.3, "ties/opt/disjoint": "sum", "gone/x": 1}
    with caplog.at_level(logging.WARNING):
        assert space.admit(stale) == {
            "method": "ties",
            "ties/weight": 1.0,
            "ties/density": 1.0,
            "ties/opt/disjoint": "sum",
        }
        assert space.admit({"method": "pcb", "pcb/weight": 0.5}) is None  # a method no longer searched
        assert space.admit({"method": "ties", "ties/opt/disjoint": "max"}) is None  # an option no longer a choice
        assert space.admit({"method": "ties", "ties/density": float("nan")}) is None
    assert "ties/density = 1.3 lies outside the search space: 1.0 is used instead" in caplog.text
    assert "method 'pcb' is not in the search space" in caplog.text
    assert space.admit({"method": "task_arithmetic", "task_arithmetic/weight": 0.25}) == {
        "method": "task_arithmetic",
        "task_arithmetic/weight": 0.25,
    }


def plant_interrupted(journal: Path, params: dict, distributions: dict) -> int:
    """A study as a driver killed mid-candidate leaves it: one RUNNING trial holding ``params``."""
    study = optuna.create_study(
        study_name="tiny-test", storage=open_storage(journal), directions=["maximize", "maximize"]
    )
    study.set_user_attr("objectives", ["mean", "worst"])
    study.enqueue_trial(params)
    trial = study.ask(distributions)
    assert trial.params == params
    return trial.number


def test_an_interrupted_point_outside_the_space_is_clipped_not_crashing_every_resume(
    tmp_path: Path, zoo_env: dict[str, str]
) -> None:
    """Before: the density of 1.3 (drawn while the config allowed up to 1.5) was re-queued as it was, each
    resume crashed building its recipe and queued it again, even with the config fixed."""
    journal = tmp_path / "run" / "search.journal"
    stale = {"method": "ties", "ties/density": 1.3}
    distributions = {
        "method": CategoricalDistribution(["task_arithmetic", "ties"]),
        "ties/density": FloatDistribution(0.05, 1.5),
    }
    planted = plant_interrupted(journal, stale, distributions)
    path = write_config(tmp_path / "c.yaml")
    proc = run_cli(["search", str(path)], zoo_env, tmp_path)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    trials = trials_by_state(journal)
    retried = [t for t in trials[TrialState.COMPLETE] if t.user_attrs.get(RETRY_ATTR) == planted]
    assert len(retried) == 1 and retried[0].params["ties/density"] == 1.0, out
    assert [t.number for t in trials[TrialState.FAIL]] == [planted] and TrialState.RUNNING not in trials


def test_an_interrupted_point_of_a_method_no_longer_searched_is_dropped(
    tmp_path: Path, zoo_env: dict[str, str]
) -> None:
    journal = tmp_path / "run" / "search.journal"
    distributions = {"method": CategoricalDistribution(["task_arithmetic", "ties"])}
    planted = plant_interrupted(journal, {"method": "ties"}, distributions)
    path = write_config(tmp_path / "c.yaml", space={"methods": ["task_arithmetic"], "weight": {"per": "task"}})
    proc = run_cli(["search", str(path)], zoo_env, tmp_path)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    trials = trials_by_state(journal)
    assert not any(t.user_attrs.get(RETRY_ATTR) == planted for ts in trials.values() for t in ts)
    assert all("ties/density" not in t.params for t in trials[TrialState.COMPLETE])
