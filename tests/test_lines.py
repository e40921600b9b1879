"""LiNeS as a depth schedule of λ: hand-computed per-layer λ on a tiny Llama, recipes that reproduce the
scored weights exactly, config errors, and a tiny-zoo search that uses the schedule.

The paper's schedule (Wang et al., ICLR 2025, ``LiNeS_scaling`` of the official code): block ℓ of L
gets λ = α + β · ℓ / (L − 1); tensors outside the blocks get α.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_cli, trials_by_state, write_search_config
from optuna.trial import TrialState
from transformers import LlamaConfig, LlamaForCausalLM

from mergetune.merging.engine import Merger
from mergetune.merging.lines import fit_lines, group_depths
from mergetune.merging.modelset import ModelSet
from mergetune.recipe import Expert, Recipe
from mergetune.search.config import SearchConfig, SearchConfigError
from mergetune.search.space import MethodSpace, ParamRange, SearchSpace

TASKS = ["a", "b"]
# α, β per task; 4 blocks: ℓ/(L−1) = 0, 1/3, 2/3, 1
ALPHA_BETA = {"a": (0.2, 0.6), "b": (0.5, -0.3)}
PER_BLOCK = {"a": [0.2, 0.4, 0.6, 0.8], "b": [0.5, 0.4, 0.3, 0.2]}  # written out by hand


@pytest.fixture(scope="module")
def tiny_llama() -> ModelSet:
    """A 4-block Llama (hidden 32) and two experts: the base plus small noise."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4
    )
    base = LlamaForCausalLM(config)
    experts = {}
    for i, task in enumerate(TASKS):
        expert = copy.deepcopy(base)
        gen = torch.Generator().manual_seed(i + 1)
        with torch.no_grad():
            for p in expert.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
        experts[task] = expert
    return ModelSet.load(base, experts)


def lines_space(groups: list[str], per: str = "task", granularity: int = 1, **weight: object) -> SearchSpace:
    return SearchSpace(
        base="base",
        experts=[Expert(name=t, model=t) for t in TASKS],
        group_names=groups,
        methods={"task_arithmetic": MethodSpace()},
        weight=ParamRange(per=per, schedule="lines", low=-1.0, high=1.0, **weight),
        density=ParamRange(per="shared"),
        granularity=granularity,
    )


def lines_point(per_task: dict[str, tuple[float, float]]) -> dict[str, float]:
    point = {}
    for task, (alpha, beta) in per_task.items():
        point[f"task_arithmetic/weight/alpha/{task}"] = alpha
        point[f"task_arithmetic/weight/beta/{task}"] = beta
    return point


def expected_lambda(tensor: str, task: str) -> float:
    """The paper's λ of a tiny-Llama tensor: its block's, or α outside the blocks."""
    if tensor.startswith("model.layers."):
        return PER_BLOCK[task][int(tensor.split(".")[2])]
    return ALPHA_BETA[task][0]


def test_the_schedule_gives_the_hand_computed_lambda_of_every_tensor(tiny_llama: ModelSet) -> None:
    groups = list(tiny_llama.layer_groups(1).names)
    assert groups == ["embed", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "head"]
    recipe = lines_space(groups).to_recipe(lines_point(ALPHA_BETA))
    for task in TASKS:
        expected = [ALPHA_BETA[task][0], *PER_BLOCK[task], ALPHA_BETA[task][0]]
        assert list(recipe.weight[task].values()) == pytest.approx(expected, abs=1e-12)
    merged = Merger(tiny_llama, compile=False).merge(recipe)
    for seg in tiny_llama.segments:
        tau = tiny_llama.tau[:, seg.offset : seg.end]
        delta = sum(expected_lambda(seg.name, t) * tau[i] for i, t in enumerate(TASKS))
        base = tiny_llama.base_flat[seg.offset : seg.end]
        torch.testing.assert_close(merged[seg.name].reshape(-1) - base, delta, atol=1e-6, rtol=1e-5, msg=seg.name)


def test_bundled_blocks_take_the_mean_of_their_blocks_lambda(tiny_llama: ModelSet) -> None:
    groups = list(tiny_llama.layer_groups(2).names)
    assert groups == ["embed", "blocks.0-1", "blocks.2-3", "head"]
    recipe = lines_space(groups, granularity=2).to_recipe(lines_point(ALPHA_BETA))
    assert list(recipe.weight["a"].values()) == pytest.approx([0.2, 0.3, 0.7, 0.2], abs=1e-12)
    assert list(recipe.weight["b"].values()) == pytest.approx([0.5, 0.45, 0.25, 0.5], abs=1e-12)


def test_a_recipe_file_reproduces_the_scored_weights_bit_for_bit(tiny_llama: ModelSet, tmp_path: Path) -> None:
    groups = list(tiny_llama.layer_groups(1).names)
    recipe = lines_space(groups).to_recipe(lines_point({"a": (0.13, 0.71), "b": (0.37, 0.29)}))
    reloaded = Recipe.load(recipe.save(tmp_path / "recipe.yaml")).model_copy(update={"base": "base"})
    assert reloaded.weight == recipe.weight
    merger = Merger(tiny_llama, compile=False)
    first = {k: v.clone() for k, v in merger.merge(recipe).items()}
    for name, value in merger.merge(reloaded.model_copy(update={"experts": recipe.experts})).items():
        assert torch.equal(value, first[name]), name


def test_a_shared_schedule_has_two_parameters_and_reads_back_from_its_recipe() -> None:
    groups = ["embed", "blocks.0", "blocks.1", "blocks.2", "head"]
    space = lines_space(groups, per="shared", beta={"low": 0.0, "high": 0.5})
    assert {a.name: (a.distribution.low, a.distribution.high) for a in space.axes} == {
        "task_arithmetic/weight/alpha": (-1.0, 1.0),
        "task_arithmetic/weight/beta": (0.0, 0.5),
    }
    point = {"task_arithmetic/weight/alpha": 0.3, "task_arithmetic/weight/beta": 0.4}
    recipe = space.to_recipe(point)
    assert recipe.weight == {
        "*": pytest.approx({"embed": 0.3, "blocks.0": 0.3, "blocks.1": 0.5, "blocks.2": 0.7, "head": 0.3})
    }
    assert space.from_recipe(recipe) == pytest.approx(point)
    # a uniform λ (every method's warm start) is the schedule with β = 0
    uniform = recipe.model_copy(update={"weight": 0.6})
    assert space.from_recipe(uniform) == pytest.approx(
        {"task_arithmetic/weight/alpha": 0.6, "task_arithmetic/weight/beta": 0.0}
    )


def test_depths_and_fit() -> None:
    groups = ["embed", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "blocks.4", "head"]
    assert group_depths(groups).tolist() == [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 0.0]
    assert group_depths(["embed", "blocks.0", "head"]).tolist() == [0.0, 0.0, 0.0]  # one block: α everywhere
    assert fit_lines([0.1, 0.1, 0.35, 0.6, 0.85, 1.1, 0.1], groups) == pytest.approx((0.1, 1.0))


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"weight": {"per": "task_group", "schedule": "lines"}}, "per: shared or per: task"),
        ({"weight": {"per": "task", "anchors": 3, "schedule": "lines"}}, "without anchors"),
        ({"weight": {"per": "task", "beta": {"low": 0.0, "high": 1.0}}}, "give schedule: lines"),
        ({"weight": {"schedule": "linear"}}, "schedule"),
        ({"weight": {"schedule": "lines", "low": -1.0, "high": 0.0}}, "give beta"),
        ({"density": {"per": "shared", "schedule": "lines"}}, "applies to weights only"),
        ({"methods": {"ties": {"density": {"schedule": "lines"}}}}, "applies to weights only"),
    ],
)
def test_bad_schedules_are_refused_with_the_field(tmp_path: Path, space: dict, message: str) -> None:
    config = {"methods": ["ties"], **space}
    path = write_search_config(tmp_path / "c.yaml", space=config)
    with pytest.raises(SearchConfigError, match=message):
        SearchConfig.load(path)


def test_a_space_without_schedule_serialises_as_before() -> None:
    """Run folders are bound to their config's JSON: a range without schedule must not gain keys."""
    assert set(ParamRange().model_dump()) == {"per", "low", "high", "anchors", "log"}
    assert ParamRange(schedule="lines").model_dump()["schedule"] == "lines"


def test_a_tiny_zoo_search_with_the_lines_schedule_runs(tmp_path: Path, zoo_env: dict[str, str]) -> None:
    space = {"methods": ["task_arithmetic"], "weight": {"per": "task", "schedule": "lines"}}
    cfg = write_search_config(tmp_path / "c.yaml", space=space, budget={"candidates": 3})
    proc = run_cli(["search", str(cfg)], zoo_env, tmp_path)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    complete = trials_by_state(tmp_path / "run" / "search.journal")[TrialState.COMPLETE]
    assert len(complete) == 3
    assert all(name.split("/")[2] in ("alpha", "beta") for t in complete for name in t.params)
    chosen = yaml.safe_load((tmp_path / "run" / "chosen" / "recipe.yaml").read_text())
    best = next(
        t
        for t in complete
        if all(
            chosen["weight"][task]["embed"] == pytest.approx(t.params[f"task_arithmetic/weight/alpha/{task}"])
            for task in chosen["weight"]
        )
    )
    for task, per_group in chosen["weight"].items():
        alpha, beta = (best.params[f"task_arithmetic/weight/{key}/{task}"] for key in ("alpha", "beta"))
        depths = group_depths(list(per_group))
        assert list(per_group.values()) == pytest.approx((alpha + beta * depths).tolist())
