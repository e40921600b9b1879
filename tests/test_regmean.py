"""RegMean: the closed form against hand computations and its least-squares property, Gram statistics of real
layers, the method through the engine (with Gram files), and `mergetune grams` on the tiny zoo."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from mergetune.errors import RecipeError
from mergetune.merging.engine import Merger
from mergetune.merging.methods.regmean import LAYOUT_KEY, reduce_off_diagonal, regmean_delta
from mergetune.merging.modelset import ModelSet
from mergetune.objectives.evaluators.base import Batch
from mergetune.objectives.grams import input_grams
from tests.conftest import make_models, make_recipe, run_cli, write_search_config

TASKS = ("a", "b")
SHAPES = {"layers.0.w": (3, 4), "layers.0.bias": (3,), "layers.1.w": (2, 3)}  # nn.Linear weights: [out, in]


def _spd(n: int, seed: int) -> torch.Tensor:
    x = torch.randn(10, n, generator=torch.Generator().manual_seed(seed))
    return x.T @ x


def test_reduce_off_diagonal_by_hand() -> None:
    g = torch.tensor([[[4.0, 2.0], [2.0, 9.0]]])
    assert torch.equal(reduce_off_diagonal(g, 0.25), torch.tensor([[[4.0, 0.5], [0.5, 9.0]]]))
    assert torch.equal(reduce_off_diagonal(g, 1.0), g) and torch.equal(
        reduce_off_diagonal(g, 0.0), torch.diag_embed(torch.tensor([[4.0, 9.0]]))
    )


def test_closed_form_equals_the_formula_and_minimises_the_output_distance() -> None:
    """W* = (Σ λ G)⁻¹ Σ λ G W_t (numpy, by hand), and the gradient of Σ λ ‖X_t W − X_t W_t‖² vanishes at W*."""
    rng = np.random.default_rng(0)
    xs = [rng.normal(size=(20, 4)) for _ in TASKS]
    ws = [rng.normal(size=(4, 3)) for _ in TASKS]  # [in, out]
    lam = np.array([1.0, 0.4])
    grams = [x.T @ x for x in xs]
    lhs = sum(c * g for c, g in zip(lam, grams, strict=True))
    rhs = sum(c * g @ w for c, g, w in zip(lam, grams, ws, strict=True))
    expected = np.linalg.solve(lhs, rhs)
    ours = regmean_delta(torch.tensor(np.stack(ws)), torch.tensor(np.stack(grams)), torch.tensor(lam)).numpy()
    np.testing.assert_allclose(ours, expected, rtol=1e-10)
    gradient = sum(c * x.T @ (x @ ours - x @ w) for c, x, w in zip(lam, xs, ws, strict=True))
    np.testing.assert_allclose(gradient, 0.0, atol=1e-9)


def _gram_files(folder: Path, modelset: ModelSet, grams: dict[str, list[torch.Tensor]]) -> dict[str, str]:
    paths = {}
    for t, task in enumerate(modelset.task_names):
        path = folder / f"{task}.safetensors"
        layouts = dict.fromkeys(grams, "out_in")
        save_file(
            {k: v[t].contiguous() for k, v in grams.items()}, str(path), metadata={LAYOUT_KEY: json.dumps(layouts)}
        )
        paths[task] = str(path)
    return paths


@pytest.fixture
def modelset() -> ModelSet:
    return ModelSet.load(*make_models(SHAPES, TASKS, seed=2))


def _merge(modelset: ModelSet, paths: dict[str, str], **fields) -> dict[str, torch.Tensor]:
    recipe = make_recipe("regmean", TASKS, options={"grams": paths, **fields.pop("options", {})}, **fields)
    return {k: v.clone() for k, v in Merger(modelset, compile=False).merge(recipe).items()}


def test_merge_solves_each_linear_layer_and_averages_the_rest(modelset: ModelSet, tmp_path: Path) -> None:
    grams = {"layers.0.w": [_spd(4, 1), _spd(4, 2)]}  # layers.1.w has no Gram: averaged like the bias
    merged = _merge(
        modelset, _gram_files(tmp_path, modelset, grams), weight={"a": 1.0, "b": 3.0}, options={"alpha": 1.0}
    )
    w = [modelset.base_tensor("layers.0.w") + modelset.task_vector(t, "layers.0.w") for t in TASKS]
    g = [x.double() for x in grams["layers.0.w"]]
    lam = (1.0, 3.0)
    expected = torch.linalg.solve(
        lam[0] * g[0] + lam[1] * g[1], lam[0] * g[0] @ w[0].double().T + lam[1] * g[1] @ w[1].double().T
    ).T
    torch.testing.assert_close(merged["layers.0.w"].double(), expected, rtol=1e-5, atol=1e-5)
    for name in ("layers.0.bias", "layers.1.w"):
        experts = [modelset.base_tensor(name) + modelset.task_vector(t, name) for t in TASKS]
        average = (lam[0] * experts[0] + lam[1] * experts[1]) / 4
        torch.testing.assert_close(merged[name], average, rtol=1e-5, atol=1e-6)


def test_one_gram_per_task_equal_gives_the_weighted_average_and_alpha_zero_is_diagonal(
    modelset: ModelSet, tmp_path: Path
) -> None:
    same = _spd(4, 5)
    paths = _gram_files(tmp_path, modelset, {"layers.0.w": [same, same]})
    merged = _merge(modelset, paths, weight={"a": 2.0, "b": 1.0})
    w = [modelset.base_tensor("layers.0.w") + modelset.task_vector(t, "layers.0.w") for t in TASKS]
    torch.testing.assert_close(merged["layers.0.w"], (2 * w[0] + w[1]) / 3, rtol=1e-5, atol=1e-5)
    # α = 0: diagonal Grams, so each input column is a per-column weighted average of the experts' columns.
    d = [_spd(4, 6), _spd(4, 7)]
    merged = _merge(modelset, _gram_files(tmp_path, modelset, {"layers.0.w": d}), options={"alpha": 0.0})
    da, db = torch.diagonal(d[0]), torch.diagonal(d[1])
    torch.testing.assert_close(merged["layers.0.w"], (w[0] * da + w[1] * db) / (da + db), rtol=1e-5, atol=1e-5)


def test_missing_grams_and_non_positive_weights_are_refused(modelset: ModelSet, tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"regmean needs options\.grams"):
        Merger(modelset, compile=False).merge(make_recipe("regmean", TASKS))
    paths = _gram_files(tmp_path, modelset, {"layers.0.w": [_spd(4, 1), _spd(4, 2)]})
    with pytest.raises(RecipeError, match="no Gram file for task"):
        _merge(modelset, {"a": paths["a"]})
    with pytest.raises(RecipeError, match="weights must be positive"):
        _merge(modelset, paths, weight={"a": 1.0, "b": 0.0})
    with pytest.raises(RecipeError, match="not found"):
        _merge(modelset, {**paths, "b": str(tmp_path / "gone.safetensors")})


def test_input_grams_sum_the_real_tokens_inputs_per_sequence() -> None:
    torch.manual_seed(0)
    first, second = nn.Linear(3, 4), nn.Linear(4, 2)

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.first, self.second = nn.Embedding(10, 3), first, second

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.second(torch.relu(self.first(self.emb(input_ids))))

    model = Tiny()
    ids = torch.tensor([[1, 2, 3], [4, 5, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    batch = Batch(torch.arange(2), {"input_ids": ids, "attention_mask": mask})
    grams = input_grams(model, [batch], {"first.weight": "l1", "second.weight": "l2"})
    x1 = model.emb(ids)[mask.bool()].detach().double()
    x2 = torch.relu(first(model.emb(ids)))[mask.bool()].detach().double()
    torch.testing.assert_close(grams.matrices["l1"].double(), x1.T @ x1 / 2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grams.matrices["l2"].double(), x2.T @ x2 / 2, rtol=1e-6, atol=1e-6)
    assert grams.layouts == {"l1": "out_in", "l2": "out_in"} and (grams.sequences, grams.tokens) == (2, 5)


def test_cli_grams_then_a_regmean_recipe_on_the_tiny_zoo(zoo_env: dict[str, str], tmp_path: Path) -> None:
    config = write_search_config(tmp_path / "c.yaml")
    proc = run_cli(["grams", str(config), "--examples", "64"], zoo_env, tmp_path)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    folder = tmp_path / "run" / "grams"
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    assert files == ["sms_spam.safetensors", "trec6.safetensors", "vader_tweets.safetensors"], out
    assert "regmean recipe's options" in out and "grams:" in out
    from safetensors import safe_open

    with safe_open(str(folder / "trec6.safetensors"), framework="pt") as f:
        meta = f.metadata()
        assert meta["split"] == "train" and meta["sequences"] == "64"
        query = f.get_tensor("encoder.layer.0.attention.self.query.weight")
    assert query.shape[0] == query.shape[1] and torch.allclose(query, query.T)
    assert bool((torch.linalg.eigvalsh(query.double()) > -1e-6).all())  # a Gram matrix is positive semi-definite


def test_an_input_feature_no_example_uses_keeps_the_base_weights(modelset: ModelSet, tmp_path: Path) -> None:
    """Σ λ G is singular there: least squares (minimum norm) leaves that input column's Δ at 0, finite elsewhere."""
    grams = [_spd(4, 8), _spd(4, 9)]
    for g in grams:
        g[3, :] = 0.0
        g[:, 3] = 0.0
    merged = _merge(modelset, _gram_files(tmp_path, modelset, {"layers.0.w": grams}), options={"alpha": 1.0})
    assert torch.isfinite(merged["layers.0.w"]).all()
    torch.testing.assert_close(merged["layers.0.w"][:, 3], modelset.base_tensor("layers.0.w")[:, 3], rtol=0, atol=1e-5)
    assert not torch.allclose(merged["layers.0.w"][:, 0], modelset.base_tensor("layers.0.w")[:, 0])


def test_a_search_over_regmean_computes_the_grams_once_and_its_recipe_merges_back(
    zoo_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The search computes each expert's Gram file before its first candidate and counts it in the setup cost;
    a resumed search reuses the files (not rewritten); the chosen recipe names them, and `mergetune merge`
    of it solves each linear layer from them (the closed form computed here from the files themselves)."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from mergetune.cli import app
    from mergetune.merging.methods import load_recipe
    from mergetune.search.config import SearchConfig
    from mergetune.search.loop import open_search

    for key, value in zoo_env.items():
        monkeypatch.setenv(key, value)
    space = {"methods": {"regmean": {"options": {"alpha": [0.5, 0.9]}}}, "weight": {"per": "task"}}
    config = SearchConfig.load(write_search_config(tmp_path / "c.yaml", space=space, budget={"candidates": 3}))

    def run(candidates: int) -> dict:
        loop = open_search(config.updated("budget", candidates=candidates))
        try:
            return loop.run()
        finally:
            loop.close()

    first = run(3)["meta"]["setup"]["regmean_grams"]
    tasks = ["sms_spam", "trec6", "vader_tweets"]
    assert sorted(first["computed"]) == tasks and first["reused"] == [] and first["seconds"] > 0
    written = {task: Path(path).stat().st_mtime_ns for task, path in first["files"].items()}
    second = run(5)["meta"]["setup"]["regmean_grams"]
    assert second["computed"] == [] and sorted(second["reused"]) == tasks
    assert second["seconds"] == first["seconds"]  # the stored compute time: the setup cost RegMean adds
    assert {task: Path(path).stat().st_mtime_ns for task, path in second["files"].items()} == written
    candidates = json.loads((tmp_path / "run" / "candidates.json").read_text())
    assert len(candidates) == 5 and all(c["state"] == "COMPLETE" for c in candidates)

    recipe = load_recipe(tmp_path / "run" / "chosen" / "recipe.yaml")
    assert recipe.method == "regmean" and recipe.options["grams"] == first["files"]
    merged = CliRunner().invoke(app, ["merge", str(tmp_path / "run" / "chosen" / "recipe.yaml"), str(tmp_path / "m")])
    assert merged.exit_code == 0, merged.output
    weights = load_file(tmp_path / "m" / "model.safetensors")
    name = "encoder.layer.1.attention.self.query.weight"
    modelset = ModelSet.load(recipe.base, {e.name: e.model for e in recipe.experts})
    lam = [float(recipe.weight[t]) for t in modelset.task_names]
    grams = []
    for task in modelset.task_names:
        with safe_open(first["files"][task], framework="pt") as f:
            grams.append(reduce_off_diagonal(f.get_tensor(name).double().unsqueeze(0), recipe.options["alpha"])[0])
    experts = [(modelset.base_tensor(name) + modelset.task_vector(t, name)).double() for t in modelset.task_names]
    lhs = sum(c * g for c, g in zip(lam, grams, strict=True))
    rhs = sum(c * g @ w.T for c, g, w in zip(lam, grams, experts, strict=True))
    torch.testing.assert_close(weights[name].double(), torch.linalg.solve(lhs, rhs).T, rtol=1e-4, atol=1e-5)


def test_gram_files_are_reused_only_for_the_same_expert_and_examples(
    zoo_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Recipes name the files: one computed from another expert or example count is refused, never overwritten."""
    import dataclasses

    from mergetune.errors import MergetuneError
    from mergetune.search.grams import ensure_grams
    from tests.conftest import zoo_setup

    setup = zoo_setup(zoo_env, tmp_path / "c.yaml", monkeypatch)
    first = ensure_grams(setup, tmp_path / "grams", examples=8)
    assert sorted(first.computed) == sorted(first.paths) and set(first.sequences.values()) == {8}
    written = {t: Path(p).read_bytes() for t, p in first.paths.items()}
    again = ensure_grams(setup, tmp_path / "grams")  # no count asked: whatever was computed is reused
    assert again.computed == [] and again.seconds == first.seconds
    with pytest.raises(MergetuneError, match="from 8 examples, not 16"):
        ensure_grams(setup, tmp_path / "grams", examples=16)
    names = list(setup.experts)
    swapped = dict(zip(names, [setup.experts[n] for n in names[1:] + names[:1]], strict=True))
    with pytest.raises(MergetuneError, match="another expert"):
        ensure_grams(dataclasses.replace(setup, experts=swapped), tmp_path / "grams")
    assert {t: Path(p).read_bytes() for t, p in first.paths.items()} == written
