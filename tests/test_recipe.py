"""Recipe: strict validation, YAML/JSON round trips, and expansion of parameter specs to [T, G]."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from mergetune.errors import RecipeError
from mergetune.merging.methods import check_recipe, load_recipe, parse_recipe
from mergetune.recipe import Recipe, interpolate_anchors, resolve_parameter

TASKS = ["a", "b", "c"]
GROUPS = ["embed", "blocks.0", "blocks.1", "blocks.2", "head"]


def recipe_data(**overrides: Any) -> dict[str, Any]:
    """A valid recipe exercising every kind of parameter spec; ``overrides`` replace fields."""
    data: dict[str, Any] = {
        "base": "models/base",
        "experts": [{"name": t, "model": f"models/{t}"} for t in TASKS],
        "method": "ties",
        "weight": {"a": 0.5, "b": [0.2, 1.0], "*": {"embed": 0.1, "*": 0.7}},
        "density": {"*": 0.3, "c": [0.1, 0.2, 0.3, 0.4, 0.5]},
        "options": {"scope": "tensor", "disjoint": "sum"},
        "grouping": {"granularity": 2},
        "dtype": "bfloat16",
        "seed": 7,
    }
    data.update(overrides)
    return data


def parse_error(data: Any) -> str:
    """The message of the RecipeError that reading ``data`` as user input must raise.

    ``parse_recipe`` is what every entry point calls: the recipe's own checks, then the method
    registry's (method name, options), which the recipe layer below merging cannot do itself.
    """
    with pytest.raises(RecipeError) as info:
        parse_recipe(data)
    return str(info.value)


# ---- serialisation -------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_round_trip_through_file_is_identical(tmp_path: Path, suffix: str) -> None:
    recipe = Recipe.parse(recipe_data())
    path = recipe.save(tmp_path / f"recipe{suffix}")
    loaded = Recipe.load(path)
    assert loaded == recipe
    assert loaded.to_dict() == recipe.to_dict()
    assert loaded.save(tmp_path / f"again{suffix}").read_text() == path.read_text()


def test_saved_files_are_plain_yaml_and_json(tmp_path: Path) -> None:
    recipe = Recipe.parse(recipe_data())
    as_json = json.loads(recipe.save(tmp_path / "r.json").read_text())
    as_yaml = yaml.safe_load(recipe.save(tmp_path / "r.yaml").read_text())
    assert as_json == as_yaml == recipe.to_dict()
    assert as_yaml["density"]["c"] == [0.1, 0.2, 0.3, 0.4, 0.5]


def test_defaults_are_filled_and_ints_become_floats() -> None:
    recipe = Recipe.parse({"base": "b", "experts": [{"name": "a", "model": "m"}], "method": "task_arithmetic"})
    assert (recipe.weight, recipe.density, recipe.dtype, recipe.seed) == (1.0, 1.0, "float32", 0)
    assert recipe.grouping.granularity == 1
    assert Recipe.parse(recipe_data(weight=1)).weight == 1.0


# ---- strictness ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"wieght": 0.5}, "wieght"),
        ({"experts": [{"name": "a", "model": "m", "revison": "main"}]}, "experts.0.revison"),
        ({"grouping": {"granularty": 2}}, "grouping.granularty"),
        ({"options": {"scope": "global", "dencity": 0.2}}, "options.dencity"),
    ],
)
def test_unknown_key_anywhere_is_an_error_naming_it(change: dict[str, Any], field: str) -> None:
    data = recipe_data(**change)
    if "experts" in change:
        data["weight"], data["density"] = 1.0, 1.0
    message = parse_error(data)
    assert f"{field}: unknown key" in message


def test_unknown_key_in_a_file_names_the_file_and_field(tmp_path: Path) -> None:
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(recipe_data(options={"dencity": 0.2})))
    with pytest.raises(RecipeError, match=r"typo\.yaml.*\n.*options\.dencity: unknown key"):
        load_recipe(path)


def test_bad_option_value_names_the_option() -> None:
    assert "options.scope" in parse_error(recipe_data(options={"scope": "everywhere"}))


def test_unknown_method_names_the_field_and_the_choices() -> None:
    message = parse_error(recipe_data(method="tiez"))
    assert "method" in message and "tiez" in message and "ties" in message


def test_the_recipe_layer_leaves_method_and_options_to_check_recipe() -> None:
    """The recipe sits below merging and does not know the methods: the registry's check says what is wrong."""
    recipe = Recipe.parse(recipe_data(method="tiez", options={"dencity": 0.2}))
    with pytest.raises(RecipeError, match=r"^recipe: invalid recipe:\n  - method: .*unknown merge method 'tiez'"):
        check_recipe(recipe)
    assert check_recipe(Recipe.parse(recipe_data())) == Recipe.parse(recipe_data())


@pytest.mark.parametrize(
    "density", [-0.1, 1.5, {"a": 1.2, "*": 0.5}, {"*": [0.5, 2.0]}, {"*": {"blocks.0": -1.0, "*": 0.5}}]
)
def test_density_outside_unit_interval_is_an_error_naming_density(density: Any) -> None:
    assert "density" in parse_error(recipe_data(density=density))


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), {"*": [0.0, float("-inf")]}])
def test_weight_must_be_finite(weight: Any) -> None:
    assert "weight" in parse_error(recipe_data(weight=weight))


def test_drop_alias_is_stored_as_density() -> None:
    data = recipe_data(drop={"a": 0.9, "*": [0.25, 0.75], "b": {"head": 0.5, "*": 0.0}})
    del data["density"]
    recipe = Recipe.parse(data)
    assert recipe.density["a"] == pytest.approx(0.1)
    assert recipe.density["*"] == pytest.approx([0.75, 0.25])
    assert recipe.density["b"] == {"head": 0.5, "*": 1.0}
    assert "drop" not in recipe.to_dict()
    assert Recipe.parse({**data, "drop": 0.3}).density == pytest.approx(0.7)


def test_drop_and_density_together_is_an_error() -> None:
    message = parse_error(recipe_data(drop=0.3))
    assert "drop" in message and "density" in message


@pytest.mark.parametrize("drop", [1.5, -0.2, None, "half", True, {"*": [0.1, 7.0]}])
def test_invalid_drop_is_an_error_naming_drop(drop: Any) -> None:
    data = recipe_data(drop=drop)
    del data["density"]
    assert "drop" in parse_error(data)


def test_duplicate_expert_names_are_an_error() -> None:
    experts = [{"name": "a", "model": "m1"}, {"name": "b", "model": "m2"}, {"name": "a", "model": "m3"}]
    message = parse_error(recipe_data(experts=experts, weight=1.0, density=1.0))
    assert "unique" in message and "'a'" in message


@pytest.mark.parametrize("field", ["weight", "density"])
def test_unknown_task_in_a_per_task_spec_is_named(field: str) -> None:
    message = parse_error(recipe_data(**{field: {"a": 0.5, "zebra": 0.5, "*": 0.1}}))
    assert field in message and "zebra" in message


def test_task_without_value_or_default_is_an_error() -> None:
    message = parse_error(recipe_data(weight={"a": 0.5, "b": 0.5}))
    assert "weight" in message and "'c'" in message


def test_empty_anchor_list_is_an_error() -> None:
    assert "anchors" in parse_error(recipe_data(weight={"*": []}))


@pytest.mark.parametrize("data", [None, [1, 2], "ties"])
def test_recipe_must_be_a_mapping(data: Any) -> None:
    assert "mapping" in parse_error(data)


def test_missing_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="not found"):
        Recipe.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(RecipeError, match=r"bad\.json.*not valid"):
        Recipe.load(bad)


def test_recipe_is_frozen() -> None:
    recipe = Recipe.parse(recipe_data())
    with pytest.raises(Exception, match="frozen"):
        recipe.seed = 3  # type: ignore[misc]


# ---- resolve_parameter ---------------------------------------------------------------------------


def test_scalar_fills_every_task_and_group() -> None:
    out = resolve_parameter(0.4, TASKS, GROUPS, "weight")
    assert out.shape == (3, 5) and out.dtype == np.float64
    assert np.all(out == 0.4)


def test_per_task_values_with_default() -> None:
    out = resolve_parameter({"b": 0.9, "*": 0.1}, TASKS, GROUPS, "weight")
    np.testing.assert_array_equal(out[:, 0], [0.1, 0.9, 0.1])
    assert np.all(out == out[:, :1])


def test_per_group_mapping_with_default() -> None:
    out = resolve_parameter({"*": {"embed": 0.0, "head": 1.0, "*": 0.5}}, TASKS, GROUPS, "weight")
    np.testing.assert_array_equal(out, np.tile([0.0, 0.5, 0.5, 0.5, 1.0], (3, 1)))


def test_two_anchors_over_five_groups_is_a_linear_ramp() -> None:
    # positions 0, 1/4, 2/4, 3/4, 1 between 0.2 and 1.0: steps of 0.8 / 4 = 0.2
    out = resolve_parameter({"*": [0.2, 1.0]}, TASKS, GROUPS, "weight")
    np.testing.assert_allclose(out, np.tile([0.2, 0.4, 0.6, 0.8, 1.0], (3, 1)), rtol=0, atol=1e-12)


def test_three_anchors_over_five_groups_interpolate_piecewise() -> None:
    # positions 0, 0.5, 1, 1.5, 2 on anchors (0, 1, 0)
    np.testing.assert_allclose(interpolate_anchors([0.0, 1.0, 0.0], 5), [0.0, 0.5, 1.0, 0.5, 0.0], atol=1e-12)


def test_as_many_anchors_as_groups_is_exact() -> None:
    anchors = [0.3, 0.1, 0.4, 0.15, 0.9]
    out = resolve_parameter({"a": anchors, "*": 0.0}, TASKS, GROUPS, "weight")
    np.testing.assert_array_equal(out[0], anchors)
    np.testing.assert_array_equal(out[1:], 0.0)


def test_single_anchor_and_single_group() -> None:
    np.testing.assert_array_equal(interpolate_anchors([0.7], 4), [0.7] * 4)
    np.testing.assert_array_equal(interpolate_anchors([0.2, 0.6], 1), [0.4])


def test_mixed_spec_from_a_recipe() -> None:
    recipe = Recipe.parse(recipe_data())
    out = resolve_parameter(recipe.weight, recipe.task_names, GROUPS, "weight")
    expected = [
        [0.5, 0.5, 0.5, 0.5, 0.5],  # a: scalar
        [0.2, 0.4, 0.6, 0.8, 1.0],  # b: two anchors
        [0.1, 0.7, 0.7, 0.7, 0.7],  # c: '*' per-group mapping
    ]
    np.testing.assert_allclose(out, expected, atol=1e-12)


def test_unknown_group_is_an_error_naming_it() -> None:
    with pytest.raises(RecipeError, match=r"weight\.a.*unknown layer group.*blocks\.9"):
        resolve_parameter({"a": {"blocks.9": 1.0, "*": 0.5}, "*": 0.1}, TASKS, GROUPS, "weight")


def test_group_without_value_or_default_is_an_error() -> None:
    with pytest.raises(RecipeError, match=r"density\.a: no value for layer group.*blocks\.0"):
        resolve_parameter({"*": {"embed": 0.5, "head": 0.5}}, TASKS, ["embed", "blocks.0", "head"], "density")


def test_unknown_or_missing_task_in_resolve_is_an_error() -> None:
    with pytest.raises(RecipeError, match=r"weight.*unknown task.*'zz'"):
        resolve_parameter({"zz": 1.0, "*": 0.5}, TASKS, GROUPS, "weight")
    with pytest.raises(RecipeError, match=r"weight.*no value for task 'c'"):
        resolve_parameter({"a": 1.0, "b": 0.5}, TASKS, GROUPS, "weight")
