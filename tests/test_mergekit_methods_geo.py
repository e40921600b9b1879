"""mergekit's model-space methods (linear, passthrough, slerp, nuslerp, multislerp, karcher, nearswap,
model_stock, arcee_fusion), checked against mergekit 0.1.5 itself on a tiny real Llama.

Every case is exported to a mergekit configuration and run by ``mergekit-multi`` (one process for
all of them, with a few handwritten configurations: no base_model, the base among the models); then

- mergetune's merge of the recipe equals mergekit's output, tensor by tensor, within the tolerance
  the method's class declares (``MergekitSpec.tolerance``: float32 rounding of another order of
  operations);
- the exported YAML (and each handwritten one) imported back with ``import_config`` gives a recipe
  whose merge equals mergekit's output too.

The tiny Llama's experts are the base plus noise of half the weights' scale (0.01 against 0.02), so
the matrices are far from collinear (SLERP's spherical branch) while the norm vectors (ones plus
noise) are nearly collinear (its linear branch): both branches run.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import ModelDirs, needs_mergekit, perturb_, seeded, tiny_bert_config
from safetensors.torch import load_file

from mergetune.errors import RecipeError
from mergetune.export.mergekit import ExportError, export_mergekit
from mergetune.export.mergekit_import import MergekitImportError, import_config
from mergetune.merging.engine import Merger
from mergetune.merging.methods import get_method, method_options, parse_recipe
from mergetune.merging.modelset import ModelSet
from mergetune.recipe import Recipe

BIN = Path(sys.executable).parent
T0, T1 = "{t0}", "{t1}"  # the first two task names, filled in from the models

# case -> recipe fields ("method" when the case is not named after it). Every exact model-space method
# has a case here: the contract test (test_method_contract.py) reads this table.
EXACT: dict[str, dict[str, Any]] = {
    "linear": {"weight": {T0: [0.2, 0.8], T1: 0.5, "*": 0.3}, "options": {"normalize": False}},
    "linear_mean": {"method": "linear", "weight": {T0: [0.2, 0.8], T1: 0.5, "*": 0.3}},
    "passthrough": {"weight": {"*": [0.8, 1.2]}},
    "slerp": {"weight": {"*": [0.2, 0.8]}},  # t by depth: one slice per block group
    "nuslerp": {"weight": {T0: 0.7, T1: 0.3}},
    "nuslerp_rows": {"method": "nuslerp", "weight": {T0: 0.7, T1: 0.3}, "options": {"flatten": False}},
    "nuslerp_columns": {
        "method": "nuslerp",
        "weight": {T0: 0.4, T1: 0.9},
        "options": {"flatten": False, "row_wise": True},
    },
    "nuslerp_weights": {"method": "nuslerp", "weight": {T0: 0.7, T1: 0.3}, "options": {"space": "weights"}},
    "multislerp": {"weight": {T0: 0.5, T1: 0.3, "*": 0.2}},
    "multislerp_weights": {
        "method": "multislerp",
        "weight": {T0: 0.5, T1: 0.3, "*": 0.2},
        "options": {"space": "weights"},
    },
    "karcher": {"weight": 1.0, "options": {"max_iter": 20}},
    "nearswap": {"weight": 0.004},  # the noise is ~0.01: some entries are taken, most moved by t
    "model_stock": {"weight": 1.0},
    "model_stock_filter_wise": {"method": "model_stock", "weight": 1.0, "options": {"filter_wise": True}},
    "arcee_fusion": {"weight": 1.0},
}


def method_of(case: str) -> str:
    return EXACT[case].get("method", case)


def fitted(models: ModelDirs, method: str) -> ModelDirs:
    """The base and as many experts as ``method`` takes (its maximum, else all)."""
    base, experts = models
    high = get_method(method).experts[1]
    return base, dict(list(experts.items())[: high or len(experts)])


def make_recipe(models: ModelDirs, case: str) -> Recipe:
    base, experts = fitted(models, method_of(case))
    tasks = [*experts, ""]  # T1 of a one-expert case is never used
    spec = {k: v for k, v in EXACT[case].items() if k != "method"}
    fields = yaml.safe_load(yaml.safe_dump(spec).replace(T0, tasks[0]).replace(T1, tasks[1]))
    return Recipe.model_validate(
        {
            "base": str(base),
            "experts": [{"name": t, "model": str(p)} for t, p in experts.items()],
            "method": method_of(case),
            **fields,
        }
    )


HANDWRITTEN = (
    "hand-nuslerp-no-base",
    "hand-karcher-with-base",
    "hand-slerp-gradient",
    "hand-passthrough",
    "hand-linear-base-input",
)


def handwritten(models: ModelDirs) -> dict[str, dict[str, Any]]:
    """mergekit configurations as users write them, for the roles of base_model the export never writes."""
    base, experts = str(models[0]), [str(p) for p in models[1].values()]
    return {
        "hand-nuslerp-no-base": {
            "merge_method": "nuslerp",
            "models": [
                {"model": experts[0], "parameters": {"weight": 0.25}},
                {"model": experts[1], "parameters": {"weight": 0.75}},
            ],
            "parameters": {"nuslerp_flatten": False},
            "dtype": "float32",
        },
        "hand-karcher-with-base": {  # karcher has no base role: mergekit adds base_model as one more input
            "merge_method": "karcher",
            "base_model": base,
            "models": [{"model": e} for e in experts[:2]],
            "parameters": {"tol": 1e-6},
            "dtype": "float32",
        },
        "hand-slerp-gradient": {
            "merge_method": "slerp",
            "base_model": base,
            "models": [{"model": base}, {"model": experts[2]}],
            "parameters": {"t": [0.1, 0.9]},  # over the layers; the embeddings and final tensors get t = 0.1
            "dtype": "float32",
        },
        "hand-passthrough": {"merge_method": "passthrough", "models": [{"model": experts[1]}], "dtype": "float32"},
        "hand-linear-base-input": {  # the base is one more input of the mean, at the global weight
            "merge_method": "linear",
            "base_model": base,
            "models": [{"model": experts[0], "parameters": {"weight": 2.0}}, {"model": experts[1]}],
            "parameters": {"weight": 1.0},
            "dtype": "float32",
        },
    }


@pytest.fixture(scope="module")
def mergekit_runs(tiny_llama_dir: ModelDirs, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Export every case, add the handwritten configs, and run them all in one ``mergekit-multi`` process."""
    if importlib.util.find_spec("mergekit") is None:
        pytest.skip("mergekit is an optional test dependency: pip install -e '.[mergekit]' (make setup installs it)")
    root = tmp_path_factory.mktemp("mergekit_geo")
    docs, runs = [], {}
    for case in EXACT:
        recipe = make_recipe(tiny_llama_dir, case)
        exported = export_mergekit(recipe)
        assert (exported.faithful, exported.differences) == ("exact", []), case
        config = yaml.safe_load(exported.yaml)
        docs.append({"name": f"run-{case}", **config})
        runs[case] = (recipe, config, root / "out" / f"run-{case}")
    for key, config in handwritten(tiny_llama_dir).items():
        docs.append({"name": f"run-{key}", **config})
        runs[key] = (None, config, root / "out" / f"run-{key}")
    (root / "all.yml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
    command = [str(BIN / "mergekit-multi"), str(root / "all.yml"), "-I", str(root / "out"), "--no-lazy", "--quiet"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return runs


def merged(recipe: Recipe) -> dict[str, torch.Tensor]:
    """mergetune's merge of a recipe over its own experts (a subset of the three for two-model methods)."""
    experts = [(e.name, e.model) for e in recipe.experts]
    modelset = ModelSet.load(recipe.base, experts)
    return {k: v.clone() for k, v in Merger(modelset, compile=False).merge(recipe).items()}


def assert_matches_mergekit(ours: dict[str, torch.Tensor], folder: Path, method: str) -> None:
    theirs = load_file(str(folder / "model.safetensors"))
    atol, rtol = get_method(method).mergekit.tolerance
    assert set(ours) <= set(theirs)
    for tensor, value in ours.items():
        torch.testing.assert_close(theirs[tensor], value, atol=atol, rtol=rtol, msg=lambda m, t=tensor: f"{t}: {m}")


# ---- export -> mergekit -> compare ---------------------------------------------------------------------
@needs_mergekit
@pytest.mark.parametrize("case", list(EXACT))
def test_exports_reproduce_mergetune_weights(case: str, mergekit_runs: dict[str, Any]) -> None:
    recipe, _, folder = mergekit_runs[case]
    ours = merged(recipe)
    assert_matches_mergekit(ours, folder, recipe.method)
    base = load_file(str(Path(recipe.base) / "model.safetensors"))
    moved = max(float((value - base[t]).abs().max()) for t, value in ours.items())
    assert moved > 1e-3  # the merge really moved the weights: the comparison is not base vs base


# ---- mergekit YAML -> import -> merge -> compare ---------------------------------------------------------
@needs_mergekit
@pytest.mark.parametrize("case", [*EXACT, *HANDWRITTEN])
def test_imported_configs_merge_like_mergekit(case: str, mergekit_runs: dict[str, Any]) -> None:
    _, config, folder = mergekit_runs[case]
    imported = import_config(config, source=case)
    assert imported.differences == []
    assert_matches_mergekit(merged(imported.recipe), folder, imported.recipe.method)


def test_round_trip_keeps_method_and_options(tiny_llama_dir: ModelDirs) -> None:
    """export -> import reads each case back as its method with its options (a weighted mean as ``average``)."""
    for case in EXACT:
        recipe = make_recipe(tiny_llama_dir, case)
        back = import_config(yaml.safe_load(export_mergekit(recipe).yaml), source=case).recipe
        if case == "linear_mean":
            assert back.method == "average"  # mergekit's normalised linear is mergetune's average
            continue
        assert (back.method, method_options(back)) == (recipe.method, method_options(recipe)), case


# ---- refusals ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "fields", "words"),
    [
        ("model_stock", {"weight": {T0: 0.5, "*": 1.0}}, ["model_stock has no per-model weight", "weight 1"]),
        ("arcee_fusion", {"weight": 0.7}, ["arcee_fusion has no per-model weight"]),
        ("karcher", {"weight": {T0: 2.0, "*": 1.0}}, ["karcher weighs every model equally"]),
    ],
)
def test_weights_mergekit_cannot_take_are_refused_unless_approximate(
    method: str, fields: dict[str, Any], words: list[str], tiny_llama_dir: ModelDirs
) -> None:
    EXACT["_refused"] = {"method": method, **fields}
    try:
        recipe = make_recipe(tiny_llama_dir, "_refused")
    finally:
        del EXACT["_refused"]
    with pytest.raises(ExportError) as err:
        export_mergekit(recipe, source="r.yaml")
    for word in [*words, "--approximate", "r.yaml"]:
        assert word in str(err.value)
    assert export_mergekit(recipe, approximate=True).faithful == "approximate"


def test_heads_are_refused_where_mergekit_would_merge_them(tmp_path: Path) -> None:
    """Methods whose mergekit version cannot leave a task head at the base's say so; SLERP and NearSwap (t = 0
    there) export, with the note that mergekit writes the base's head."""
    from transformers import BertForSequenceClassification

    with seeded(7):
        base = BertForSequenceClassification(tiny_bert_config(num_labels=2))
    base.save_pretrained(tmp_path / "base")
    experts = {}
    for i, task in enumerate(("sst2", "imdb")):
        perturb_(base, seed=40 + i).save_pretrained(tmp_path / task)
        experts[task] = tmp_path / task
    models = (tmp_path / "base", experts)
    for case in ("nuslerp", "multislerp", "karcher", "model_stock", "linear", "passthrough"):
        with pytest.raises(ExportError, match=f"{method_of(case)} exports to mergekit's {method_of(case)}, which"):
            export_mergekit(make_recipe(models, case))
    for case in ("slerp", "nearswap"):
        assert any("heads" in note for note in export_mergekit(make_recipe(models, case)).notes)


@pytest.mark.parametrize("count", [2, 3])
def test_two_model_methods_name_themselves_and_the_count(count: int, tiny_llama_dir: ModelDirs) -> None:
    base, experts = tiny_llama_dir
    for method in ("slerp", "nearswap", "arcee_fusion", "passthrough"):
        data = {
            "base": str(base),
            "experts": [{"name": t, "model": str(p)} for t, p in list(experts.items())[:count]],
            "method": method,
        }
        with pytest.raises(RecipeError) as err:
            parse_recipe(data, source="r.yaml")
        message = str(err.value)
        assert message.startswith("r.yaml:") and f"{method} merges exactly 1 expert" in message
        assert f"got {count}" in message and "\n" not in message


def test_import_without_base_for_a_method_that_needs_one_is_refused(tiny_llama_dir: ModelDirs) -> None:
    experts = [str(p) for p in tiny_llama_dir[1].values()]
    config = {"merge_method": "slerp", "models": [{"model": e} for e in experts[:2]], "parameters": {"t": 0.5}}
    with pytest.raises(MergekitImportError, match="slerp needs a base_model"):
        import_config(config, source="merge.yml")
