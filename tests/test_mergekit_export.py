"""Export to mergekit and import from it, checked against mergekit 0.1.5 itself on tiny real models.

Every exported recipe is run by mergekit (one ``mergekit-multi`` process for all of them, plus one
``mergekit-yaml`` run of the CLI's output) and compared with mergetune's own merge of the recipe:
tensor by tensor to float tolerance for the deterministic methods; for the random ones (DARE, DELLA)
against mergetune's distribution of merges over many seeds (z-scores of mergekit's values: mean 0,
mean square 1). Handwritten mergekit configurations are imported as recipes and merged by mergetune
to the same weights mergekit writes. Models: a tiny Llama (LlamaForCausalLM) and a tiny BERT
(BertForSequenceClassification, one label set; mergekit 0.1.5 cannot plan plain BertModel
checkpoints, see ``KNOWN_ISSUES``).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from conftest import ModelDirs, needs_mergekit, perturb_, seeded, tiny_bert_config
from safetensors.torch import load_file
from typer.testing import CliRunner

from mergetune.cli import app
from mergetune.export.mergekit import ExportError, export_mergekit
from mergetune.export.mergekit_import import MergekitImportError, import_config
from mergetune.merging.engine import Merger
from mergetune.merging.modelset import ModelSet
from mergetune.recipe import Recipe, resolve_parameter

BIN = Path(sys.executable).parent
ATOL, RTOL = 1e-6, 1e-5  # float32 rounding of a different summation order
SEEDS = 60  # mergetune merges per random recipe: its per-entry mean and spread
T0, T1 = "{t0}", "{t1}"  # the first two task names, filled in per model family

EXACT: dict[str, dict[str, Any]] = {
    "task_arithmetic": {"weight": {T0: [0.2, 0.8], T1: 0.5, "*": 0.3}},
    "average": {"weight": {T0: [0.2, 0.8], T1: 0.5, "*": 0.3}},
    "ties": {
        "weight": {T0: 0.9, T1: 0.5, "*": 0.3},
        "density": {"*": [0.3, 0.7]},
        "options": {"scope": "tensor", "weights": "before_election", "disjoint": "weighted_mean"},
    },
    "ties_official_mean": {
        "method": "ties",
        "weight": {"*": [0.6, 1.2]},
        "density": 0.45,
        "options": {"scope": "tensor"},
    },
    "ties_sum": {
        "method": "ties",
        "weight": {T0: 0.9, T1: 0.5, "*": 0.3},
        "density": 0.35,
        "options": {"scope": "tensor", "weights": "before_election", "disjoint": "sum", "scale": 1.3},
    },
    "breadcrumbs": {"weight": {T0: 0.9, "*": 0.4}, "density": 0.4, "options": {"scope": "tensor", "gamma": 0.05}},
    "breadcrumbs_ties": {"weight": {T0: 0.9, "*": 0.4}, "density": 0.4, "options": {"scope": "tensor", "gamma": 0.05}},
    # λ = 1: mergekit's sce and ram have no per-model weight. ε = 0.01 (the experts' noise scale): about
    # half the entries are changed by one task only, so RAM's unique/shared split and RAM+'s boost matter.
    "sce": {"weight": 1.0, "options": {"select_topk": 0.3}},
    "ram": {"weight": 1.0, "options": {"epsilon": 0.01}},
    "ramplus_tl": {"weight": 1.0, "options": {"epsilon": 0.01, "r": 0.5, "alpha": 2.0}},
}
RANDOM: dict[str, dict[str, Any]] = {
    "dare_linear": {"weight": {T0: 0.9, "*": 0.4}, "density": {"*": [0.3, 0.7]}, "options": {"skip_1d": True}},
    "dare_ties": {
        "weight": {T0: 0.9, "*": 0.4},
        "density": 0.5,
        "options": {"weights": "before_election", "disjoint": "sum"},
    },
    "dare_ties_mean": {
        "method": "dare_ties",
        "weight": {T0: 0.9, "*": 0.4},
        "density": {"*": [0.4, 0.6]},
        "options": {"weights": "before_election", "disjoint": "weighted_mean"},
    },
    "della_epsilon0": {"method": "della", "weight": {T0: 0.9, "*": 0.4}, "density": 0.5, "options": {"epsilon": 0.0}},
    "della_linear": {
        "method": "della",
        "weight": {T0: 0.9, "*": 0.4},
        "density": {"*": [0.4, 0.6]},
        "options": {"epsilon": 0.0, "sign_election": False},
    },
}
APPROXIMATE = {"della": {"weight": {T0: 0.9, "*": 0.4}, "density": 0.5, "options": {"epsilon": 0.2}}}
FAMILIES = ("llama", "bert")
# mergekit's linear, sce and ram would merge the BERT classifier heads: refused (tested below)
SKIP = {("bert", "average"), ("bert", "sce"), ("bert", "ram"), ("bert", "ramplus_tl")}


@pytest.fixture(scope="module")
def bert_sc_dir(tmp_path_factory: pytest.TempPathFactory) -> ModelDirs:
    """A BertForSequenceClassification base and three perturbed copies with the same 2 labels."""
    from transformers import BertForSequenceClassification

    root = tmp_path_factory.mktemp("bert_sc")
    with seeded(7):
        base = BertForSequenceClassification(tiny_bert_config(num_labels=2))
    base.save_pretrained(root / "base")
    experts = {}
    for i, task in enumerate(("sst2", "imdb", "yelp")):
        expert = BertForSequenceClassification(base.config)
        expert.load_state_dict(base.state_dict())
        perturb_(expert, seed=600 + i)
        expert.save_pretrained(root / task)
        experts[task] = root / task
    return root / "base", experts


@pytest.fixture(scope="module")
def families(tiny_llama_dir: ModelDirs, bert_sc_dir: ModelDirs) -> dict[str, ModelDirs]:
    return {"llama": tiny_llama_dir, "bert": bert_sc_dir}


def make_recipe(models: ModelDirs, name: str, spec: dict[str, Any]) -> Recipe:
    base, experts = models
    tasks = [*experts, ""]  # a recipe of one expert (SLERP) never names {t1}
    text = yaml.safe_dump({k: v for k, v in spec.items() if k != "method"}).replace(T0, tasks[0]).replace(T1, tasks[1])
    fields = yaml.safe_load(text)
    return Recipe.model_validate(
        {
            "base": str(base),
            "experts": [{"name": t, "model": str(p)} for t, p in experts.items()],
            "method": spec.get("method", name),
            **fields,
        }
    )


def cases(families: dict[str, ModelDirs]) -> dict[str, tuple[Recipe, bool]]:
    """Every (family, case) to run: its recipe and whether it is exported with ``approximate``."""
    out = {}
    for family, models in families.items():
        for table, approximate in ((EXACT, False), (RANDOM, False), (APPROXIMATE, True)):
            for name, spec in table.items():
                if (family, name) not in SKIP:
                    out[f"{family}-{name}"] = (make_recipe(models, name, spec), approximate)
    return out


def handwritten(models: ModelDirs) -> dict[str, dict[str, Any]]:
    """mergekit configurations as a user writes them: gradients, top-level and per-slice parameters."""
    base, experts = (str(models[0]), [str(p) for p in models[1].values()])
    layers = [0, 1], [1, 2]
    return {
        "ties-gradients": {
            "merge_method": "ties",
            "base_model": base,
            "parameters": {"normalize": True, "int8_mask": True},
            "models": [
                {"model": base},
                {"model": experts[0], "parameters": {"weight": [0.2, 0.9], "density": 0.5}},
                {"model": experts[1], "parameters": {"weight": 0.6, "density": [0.4, 0.7]}},
                {"model": experts[2], "parameters": {"weight": 0.3, "density": 0.6}},
            ],
            "dtype": "float32",
        },
        "task-arithmetic-slices": {
            "merge_method": "task_arithmetic",
            "base_model": base,
            "slices": [
                {
                    "sources": [{"model": base, "layer_range": r}]
                    + [
                        {"model": e, "layer_range": r, "parameters": {"weight": 0.3 + 0.2 * k + 0.1 * i}}
                        for i, e in enumerate(experts)
                    ],
                    "parameters": {"normalize": k == 1, "lambda": 0.8},
                }
                for k, r in enumerate(layers)
            ],
            "dtype": "float32",
        },
    }


@pytest.fixture(scope="module")
def mergekit_runs(families: dict[str, ModelDirs], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Export every case, add the handwritten configs, and run them all in one ``mergekit-multi`` process."""
    if importlib.util.find_spec("mergekit") is None:
        pytest.skip("mergekit is an optional test dependency: pip install -e '.[mergekit]' (make setup installs it)")
    root = tmp_path_factory.mktemp("mergekit")
    docs, runs = [], {}
    for key, (recipe, approximate) in cases(families).items():
        docs.append({"name": f"run-{key}", **yaml.safe_load(export_mergekit(recipe, approximate=approximate).yaml)})
        runs[key] = (recipe, root / "out" / f"run-{key}")
    for key, config in handwritten(families["llama"]).items():
        docs.append({"name": f"run-{key}", **config})
        runs[key] = (config, root / "out" / f"run-{key}")
    (root / "all.yml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
    command = [str(BIN / "mergekit-multi"), str(root / "all.yml"), "-I", str(root / "out"), "--no-lazy", "--quiet"]
    done = subprocess.run([*command, "--random-seed", "0"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return runs


@pytest.fixture(scope="module")
def mergers(families: dict[str, ModelDirs]) -> dict[str, Merger]:
    """One resident ModelSet and Merger per family (eager kernels: no compile time in tests)."""
    out = {}
    for family, (base, experts) in families.items():
        modelset = ModelSet.load(str(base), [(t, str(p)) for t, p in experts.items()])
        out[family] = Merger(modelset, compile=False)
    return out


def merged(merger: Merger, recipe: Recipe) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in merger.merge(recipe).items()}


def mergekit_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


# ---- export -> mergekit -> compare ---------------------------------------------------------------------
@needs_mergekit
@pytest.mark.parametrize(("family", "name"), [(f, n) for f in FAMILIES for n in EXACT if (f, n) not in SKIP])
def test_deterministic_exports_reproduce_mergetune_weights(
    family: str, name: str, mergekit_runs: dict[str, Any], mergers: dict[str, Merger]
) -> None:
    recipe, folder = mergekit_runs[f"{family}-{name}"]
    ours, theirs = merged(mergers[family], recipe), mergekit_weights(folder)
    assert set(ours) <= set(theirs)
    for tensor, value in ours.items():
        torch.testing.assert_close(theirs[tensor], value, atol=ATOL, rtol=RTOL, msg=lambda m, t=tensor: f"{t}: {m}")
    base = mergers[family].modelset
    moved = max(float((value - base.base_tensor(t)).abs().max()) for t, value in ours.items())
    assert moved > 100 * ATOL  # the merge really moved the weights: the comparison is not base vs base
    for head, tensor in _heads(family, base).items():  # task heads: weight 0, so mergekit keeps the base's
        torch.testing.assert_close(theirs[head], tensor, atol=0, rtol=0)


def _heads(family: str, modelset: ModelSet) -> dict[str, torch.Tensor]:
    if family != "bert":
        return {}
    base = load_file(str(modelset.base_folder / "model.safetensors"))
    return {k: v for k, v in base.items() if k.startswith("classifier.")}


def z_scores(merger: Merger, recipe: Recipe, theirs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, float]:
    """mergekit's values standardised by mergetune's per-entry mean and spread over ``SEEDS`` seeds.

    Returns the z-scores of the random entries and the largest gap on the deterministic ones.
    """
    names = sorted(merger.merge(recipe))
    samples = torch.stack(
        [
            torch.cat([v.reshape(-1) for _, v in sorted(merger.merge(recipe.model_copy(update={"seed": s})).items())])
            for s in range(SEEDS)
        ]
    ).double()
    value = torch.cat([theirs[n].reshape(-1) for n in names]).double()
    mean, spread = samples.mean(0), samples.std(0)
    fixed = spread == 0
    gap = float((value[fixed] - mean[fixed]).abs().max()) if fixed.any() else 0.0
    return (value[~fixed] - mean[~fixed]) / spread[~fixed], gap


@needs_mergekit
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", list(RANDOM))
def test_random_exports_match_mergetune_in_distribution(
    family: str, name: str, mergekit_runs: dict[str, Any], mergers: dict[str, Merger]
) -> None:
    recipe, folder = mergekit_runs[f"{family}-{name}"]
    z, gap = z_scores(mergers[family], recipe, mergekit_weights(folder))
    assert z.numel() > 5000
    assert gap <= ATOL  # entries that are not random (skip_1d tensors) agree exactly
    assert abs(float(z.mean())) < 0.06, "mergekit's merge is biased against mergetune's distribution"
    assert 0.9 < float((z * z).mean()) < 1.15, "mergekit's spread differs from mergetune's"


@needs_mergekit
@pytest.mark.parametrize("family", FAMILIES)
def test_approximate_della_is_close_but_labelled(
    family: str, mergekit_runs: dict[str, Any], mergers: dict[str, Merger]
) -> None:
    recipe, folder = mergekit_runs[f"{family}-della"]
    exported = export_mergekit(recipe, approximate=True)
    assert exported.faithful == "approximate" and "L1 norm" in exported.yaml
    z, _ = z_scores(mergers[family], recipe, mergekit_weights(folder))
    assert abs(float(z.mean())) < 0.06 and float((z * z).mean()) < 1.5  # close; measured 1.1-1.2


@needs_mergekit
def test_cli_export_runs_in_mergekit_yaml(
    tmp_path: Path, tiny_llama_dir: ModelDirs, mergers: dict[str, Merger]
) -> None:
    """The user's path: ``mergetune export RECIPE --format mergekit > merge.yml``, then ``mergekit-yaml``."""
    recipe = make_recipe(tiny_llama_dir, "ties", EXACT["ties"])
    recipe.save(tmp_path / "recipe.yaml")
    result = CliRunner().invoke(app, ["export", str(tmp_path / "recipe.yaml"), "--format", "mergekit"])
    assert result.exit_code == 0, result.output
    (tmp_path / "merge.yml").write_text(result.stdout)
    done = subprocess.run(
        [str(BIN / "mergekit-yaml"), str(tmp_path / "merge.yml"), str(tmp_path / "out"), "--quiet"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = mergekit_weights(tmp_path / "out")
    for tensor, value in merged(mergers["llama"], recipe).items():
        torch.testing.assert_close(theirs[tensor], value, atol=ATOL, rtol=RTOL)


# ---- mergekit -> import -> compare ---------------------------------------------------------------------
@needs_mergekit
@pytest.mark.parametrize("name", ["ties-gradients", "task-arithmetic-slices"])
def test_imported_configs_merge_like_mergekit(
    name: str, mergekit_runs: dict[str, Any], mergers: dict[str, Merger]
) -> None:
    config, folder = mergekit_runs[name]
    imported = import_config(config, source=name)
    assert imported.differences == []
    ours, theirs = merged(mergers["llama"], imported.recipe), mergekit_weights(folder)
    for tensor, value in ours.items():
        torch.testing.assert_close(theirs[tensor], value, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("name", [*EXACT, *RANDOM])
def test_export_import_round_trip_gives_the_same_merge(
    name: str, families: dict[str, ModelDirs], mergers: dict[str, Merger]
) -> None:
    """export -> import gives a recipe (maybe written differently) that merges to the same weights, same seed."""
    recipe = make_recipe(families["llama"], name, {**EXACT, **RANDOM}[name])
    back = import_config(yaml.safe_load(export_mergekit(recipe).yaml), source=name)
    assert back.differences == [] and back.recipe.method == recipe.method
    assert [e.model for e in back.recipe.experts] == [e.model for e in recipe.experts]
    ours, again = merged(mergers["llama"], recipe), merged(mergers["llama"], back.recipe)
    for tensor, value in ours.items():
        torch.testing.assert_close(again[tensor], value, atol=ATOL, rtol=RTOL)


# ---- refusals ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "spec", "words"),
    [
        ("ties", {"density": 0.2}, ["scope: global", "options.scope: tensor", "--approximate"]),
        (
            "ties",
            {"weight": {T0: 0.9, "*": 0.3}, "options": {"scope": "tensor"}},
            ["after_election", "before_election"],
        ),
        ("ties", {"density": 0.03, "options": {"scope": "tensor"}}, ["different number of entries", "max(1"]),
        ("breadcrumbs", {"density": 0.4}, ["scope: row"]),
        (
            "dare_ties",
            {"options": {"trim_density": 0.5, "weights": "before_election", "disjoint": "sum"}},
            ["trim_density"],
        ),
        ("della", {"density": 0.5}, ["L1 norm", "epsilon: 0"]),
        ("pcb", {}, ["PCB has no mergekit equivalent"]),
        ("tsv", {}, ["TSV-M has no mergekit equivalent"]),
    ],
)
def test_inexact_recipes_are_refused_unless_approximate(
    method: str, spec: dict[str, Any], words: list[str], tiny_llama_dir: ModelDirs
) -> None:
    recipe = make_recipe(tiny_llama_dir, method, spec)
    with pytest.raises(ExportError) as err:
        export_mergekit(recipe, source="r.yaml")
    for word in words:
        assert word in str(err.value)
    assert str(err.value).startswith("r.yaml:")
    approx = export_mergekit(recipe, approximate=True)
    assert approx.faithful == "approximate" and approx.differences
    assert all(f"# differs: {d}" in approx.yaml for d in approx.differences)
    assert yaml.safe_load(approx.yaml)["merge_method"]


def test_models_mergekit_cannot_merge_are_refused(tiny_bert_dir: ModelDirs, bert_sc_dir: ModelDirs) -> None:
    """Experts with task heads on a headless base, and heads averaged by linear, are refused with what to do."""
    mixed = make_recipe(tiny_bert_dir, "task_arithmetic", {})
    with pytest.raises(ExportError, match=r"BertForSequenceClassification and the base is BertModel.*save_pretrained"):
        export_mergekit(mixed)
    with pytest.raises(ExportError, match="would average the task heads"):
        export_mergekit(make_recipe(bert_sc_dir, "average", {}))
    della = make_recipe(bert_sc_dir, "della", {"density": 0.9, "options": {"epsilon": 0.1}})
    with pytest.raises(ExportError, match="density ± epsilon strictly inside"):
        export_mergekit(della, approximate=True)


def test_cli_export_refusal_is_one_line_error(tmp_path: Path, tiny_llama_dir: ModelDirs) -> None:
    make_recipe(tiny_llama_dir, "pcb", {}).save(tmp_path / "r.yaml")
    result = CliRunner().invoke(app, ["export", str(tmp_path / "r.yaml")])
    assert result.exit_code == 2 and "PCB has no mergekit equivalent" in result.stderr
    assert "Traceback" not in result.output
    ok = CliRunner().invoke(app, ["export", str(tmp_path / "r.yaml"), "--approximate"])
    assert ok.exit_code == 0 and yaml.safe_load(ok.stdout)["merge_method"] == "ties"
    assert "differs" in ok.stderr  # what differs is said on stderr too, not only in the YAML


# ---- import errors -------------------------------------------------------------------------------------
def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda config: config.__setitem__(key, value)


def _rename_method(config: dict[str, Any]) -> None:
    config["merge_mehtod"] = config.pop("merge_method")


def _shared_param_on_a_model(config: dict[str, Any]) -> None:
    config["models"][1]["parameters"]["normalize"] = False  # mergekit reads normalize only globally or per slice


@pytest.mark.parametrize(
    ("patch", "words"),
    [
        (_rename_method, ["unknown key(s) ['merge_mehtod']", "silently ignore"]),
        (_set("merge_method", "frankenslerp"), ["'frankenslerp' has no mergetune equivalent"]),  # not a mergekit method
        (_set("parameters", {"densty": 0.5}), ["does not read ['densty']"]),
        (_shared_param_on_a_model, ["does not read ['normalize'] there"]),
        (_set("dtype", "bfloat16"), ["mergekit computes in bfloat16", "--approximate"]),
        (_set("tokenizer_source", "union"), ["tokenizer_source 'union'"]),
    ],
)
def test_import_errors_name_the_key(
    patch: Callable[[dict[str, Any]], None], words: list[str], tiny_llama_dir: ModelDirs
) -> None:
    config = handwritten(tiny_llama_dir)["ties-gradients"]
    patch(config)
    with pytest.raises(MergekitImportError) as err:
        import_config(config, source="merge.yml")
    for word in [*words, "merge.yml"]:
        assert word in str(err.value)


def test_cli_import_writes_a_recipe_that_merges(tmp_path: Path, tiny_llama_dir: ModelDirs) -> None:
    (tmp_path / "merge.yml").write_text(yaml.safe_dump(handwritten(tiny_llama_dir)["ties-gradients"]))
    result = CliRunner().invoke(app, ["import-mergekit", str(tmp_path / "merge.yml"), "-o", str(tmp_path / "r.yaml")])
    assert result.exit_code == 0, result.output
    recipe = Recipe.load(tmp_path / "r.yaml")
    assert recipe.method == "ties" and recipe.options["scope"] == "tensor"
    assert "int8_mask" in result.stderr  # what was dropped is said
    groups = ["embed", "blocks.0", "blocks.1", "head"]
    weight = resolve_parameter(recipe.weight, recipe.task_names, groups, "weight")
    np.testing.assert_allclose(weight[0], [0.2, 0.2, 0.9, 0.2])  # the gradient over layers; t = 0 outside them
