"""The store's dtype (resources.storage_dtype): hand-computed rounding, float32 merges, recipes that reproduce."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import write_search_config, zoo_setup
from safetensors.torch import load_file

from mergetune.errors import BadWeightsError, MergetuneError
from mergetune.merging.engine import Merger
from mergetune.merging.modelset import ModelSet
from mergetune.merging.save import merge_to_folder
from mergetune.recipe import Expert, Recipe
from mergetune.search.config import SearchConfig
from mergetune.search.loop import build_space, resolve_models, worker_setup
from mergetune.search.worker import Worker

E7, E8, E9 = 2.0**-7, 2.0**-8, 2.0**-9  # bf16 keeps 7 fraction bits: numbers in [1, 2) are 2**-7 apart
# (base, expert) per entry; every value and every difference is exact in float32
BASE = [1.0, 0.0, 0.0, 0.0, 1.0 + E8]
EXPERT = [1.0 + E9, 1.0 + E8, 1.0 + 3 * E8, 1.0 + E8 + E9 / 2, 1.0 + E8]
# τ = expert − base rounded to bf16 by hand (round to nearest, ties to even):
#   2**-9 is a power of two: exact;  1 + 2**-8 is halfway between 1 and 1 + 2**-7: even → 1;
#   1 + 3·2**-8 is halfway between 1 + 2**-7 and 1 + 2**-6: even → 1 + 2**-6;  just above half → 1 + 2**-7;  0 → 0
TAU_BF16 = [E9, 1.0, 1.0 + 2 * E7, 1.0 + E7, 0.0]
BASE_BF16 = [1.0, 0.0, 0.0, 0.0, 1.0]  # 1 + 2**-8: a tie, to even → 1


def tiny_modelset(dtype: torch.dtype) -> ModelSet:
    base = {"layers.0.w": torch.tensor([BASE])}
    return ModelSet.load(base, {"a": {"layers.0.w": torch.tensor([EXPERT])}}, storage_dtype=dtype)


def test_bf16_storage_rounds_to_nearest_even_by_hand() -> None:
    ms = tiny_modelset(torch.bfloat16)
    assert ms.tau.dtype == ms.base_flat.dtype == torch.bfloat16
    assert ms.tau[0].float().tolist() == TAU_BF16
    assert ms.base_flat.float().tolist() == BASE_BF16
    assert ms.resident_bytes() == 2 * 5 * 2  # half of float32's


def test_float16_storage_rounds_too() -> None:
    ms = tiny_modelset(torch.float16)
    # float16 keeps 10 fraction bits: 1 + 2**-8 + 2**-10 is exact, 2**-9 too; nothing here is a tie
    assert ms.tau[0].float().tolist() == [E9, 1.0 + E8, 1.0 + 3 * E8, 1.0 + E8 + E9 / 2, 0.0]
    assert ms.base_flat.float().tolist() == [1.0, 0.0, 0.0, 0.0, 1.0 + E8]


def test_a_value_beyond_float16_range_is_an_error_not_inf() -> None:
    base = {"layers.0.w": torch.zeros(1, 3)}
    expert = {"layers.0.w": torch.tensor([[1.0, 70000.0, 2.0]])}
    with pytest.raises(BadWeightsError, match=r"expert 'a': tensor 'layers\.0\.w' has values beyond float16's range"):
        ModelSet.load(base, {"a": expert}, storage_dtype=torch.float16)
    assert ModelSet.load(base, {"a": expert}, storage_dtype=torch.bfloat16).tau[0, 1].item() == 70144.0  # rounded


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_the_merge_of_a_bf16_store_computes_in_float32(method: str) -> None:
    """base + λ·τ from the bf16 values, in float32: 1 + 2**-9 survives (a bf16 sum would give 1)."""
    ms = tiny_modelset(torch.bfloat16)
    recipe = Recipe(
        base="b", experts=[Expert(name="a", model="x")], method=method, weight=1.0, storage_dtype="bfloat16"
    )
    merged = Merger(ms, compile=False).merge(recipe)["layers.0.w"]
    assert merged.dtype == torch.float32
    assert merged[0].tolist() == [b + t for b, t in zip(BASE_BF16, TAU_BF16, strict=True)]
    assert merged[0, 0].item() == 1.0 + E9


def test_a_bf16_search_recipe_merges_bit_for_bit(
    zoo_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The search's recipe records its storage dtype; `mergetune merge` of it gives the weights the search scored."""
    for key, value in zoo_env.items():
        monkeypatch.setenv(key, value)
    config = SearchConfig.load(write_search_config(tmp_path / "c.yaml", resources={"storage_dtype": "bfloat16"}))
    models = resolve_models(config)
    space = build_space(config, models)
    worker = Worker(worker_setup(config, models))
    assert worker.modelset.storage_dtype == torch.bfloat16
    weights = {t: 0.6 + 0.1 * i for i, t in enumerate(space.tasks)}
    point = space.from_recipe(
        Recipe(base=space.base, experts=space.experts, method="ties", weight=weights, density=0.4)
    )
    recipe = space.to_recipe(point)  # a recipe as the search writes it
    assert recipe.storage_dtype == "bfloat16"
    recipe = Recipe.load(recipe.save(tmp_path / "recipe.yaml"))  # as `mergetune merge` reads it
    assert recipe.storage_dtype == "bfloat16"
    worker.evaluate(recipe)
    searched = worker.merger.views(worker.merger.output_buffer(torch.float32))

    written = load_file(merge_to_folder(recipe, tmp_path / "merged", compile=False).folder / "model.safetensors")
    float32_store = Merger(ModelSet.from_recipe(recipe, storage_dtype=torch.float32), compile=False).merge(recipe)
    differs = 0
    for name, tensor in searched.items():
        assert torch.equal(written[name], tensor), name
        differs += int(not torch.equal(float32_store[name], tensor))
    assert differs > 0  # a float32 store gives other weights: the equality above is not vacuous


def test_a_worker_refuses_a_recipe_of_another_storage_dtype(
    zoo_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    setup = zoo_setup(zoo_env, tmp_path / "c.yaml", monkeypatch)
    worker = Worker(setup)
    experts = [Expert(name=t, model=p) for t, p in setup.experts.items()]
    recipe = Recipe(base=setup.base, experts=experts, method="task_arithmetic", storage_dtype="bfloat16")
    with pytest.raises(MergetuneError, match=r"recipe storage_dtype bfloat16 differs .* resources\.storage_dtype"):
        worker.evaluate(recipe)
