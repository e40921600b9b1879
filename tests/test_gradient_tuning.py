"""Gradient tuning of λ (AdaMerging): exact gradients, a falling objective, an ordinary recipe, clear refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn
from torch.func import functional_call

from mergetune.errors import RecipeError, TaskError
from mergetune.forward import best_prefix, forward_params
from mergetune.objectives.evaluators import EvalResult, Evaluator
from mergetune.objectives.training_losses import batch_loss, trainable_batches
from mergetune.recipe import Expert, Recipe, resolve_parameter
from mergetune.search.gradient import GradientSettings, WeightTuner
from mergetune.search.worker import Worker
from tests.conftest import run_cli, write_search_config, zoo_setup


@pytest.fixture(scope="module")
def worker(zoo_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Worker:
    with pytest.MonkeyPatch.context() as mp:
        return Worker(zoo_setup(zoo_env, tmp_path_factory.mktemp("gradient") / "c.yaml", mp))


def _recipe(worker: Worker, method: str = "task_arithmetic", **fields: object) -> Recipe:
    experts = [Expert(name=t, model=p) for t, p in worker.setup.experts.items()]
    return Recipe(base=worker.setup.base, experts=experts, method=method, **fields)


def _reference_gradient(worker: Worker, lam: torch.Tensor, batches: dict) -> tuple[float, torch.Tensor]:
    """Autograd end to end through θ = θ_0 + Σ_t λ[t, g] τ_t (functional_call): independent of the tuner's algebra."""
    modelset = worker.modelset
    groups = worker.merger.layout(1).groups
    lam = lam.clone().requires_grad_(True)
    total = torch.zeros((), dtype=torch.float32)
    for name, model in worker.models.items():
        prefix = best_prefix(dict(model.named_parameters()), {s.name: None for s in modelset.segments})
        params = {}
        for s in modelset.segments:
            g = groups.index(s.name)
            tau = modelset.tau[:, s.offset : s.end]
            theta = modelset.base_flat[s.offset : s.end] + (lam[:, g : g + 1] * tau).sum(0)
            params[prefix + s.name] = theta.view(s.shape)
        with torch.enable_grad():
            total = total + _entropy(model, params, batches[name].inputs)
    total.backward()
    return float(total.detach()), lam.grad.detach()


def _entropy(model: nn.Module, params: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean entropy of softmax(logits), written out here (the tuner's objective, computed independently)."""
    accepted = forward_params(model)
    logits = functional_call(model, params, kwargs={k: v for k, v in inputs.items() if k in accepted}).logits
    p = torch.softmax(logits.float(), dim=-1)
    return -(p * torch.log(p)).sum(-1).mean()


def test_weight_gradient_equals_autograd_through_the_merge(worker: Worker) -> None:
    recipe = _recipe(worker, weight=0.3)
    tasks, groups = worker.modelset.task_names, worker.merger.layout(1).groups.names
    rng = np.random.default_rng(0)
    lam = torch.tensor(rng.uniform(0.1, 0.9, size=(len(tasks), len(groups))), dtype=torch.float32)
    suite = worker.suite("search")
    batches = {name: trainable_batches(suite.evaluators[name])[1] for name in worker.models}
    tuner = WeightTuner(worker.merger, worker.models, suite)
    loss, grad = tuner.loss_and_gradient(recipe, lam, batches)
    ref_loss, ref_grad = _reference_gradient(worker, lam, batches)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert ref_grad.abs().max() > 1e-4  # the test is not vacuous: λ matters to the entropy
    torch.testing.assert_close(grad, ref_grad, rtol=2e-3, atol=1e-6)


def test_ties_gradient_matches_finite_differences(worker: Worker) -> None:
    """TIES with λ after the election and a disjoint sum is linear in λ: central differences agree."""
    recipe = _recipe(worker, "ties", density=0.3, options={"disjoint": "sum"})
    tasks, groups = worker.modelset.task_names, worker.merger.layout(1).groups.names
    lam = torch.full((len(tasks), len(groups)), 0.5)
    suite = worker.suite("search")
    batches = {name: trainable_batches(suite.evaluators[name])[0] for name in worker.models}
    tuner = WeightTuner(worker.merger, worker.models, suite)
    _, grad = tuner.loss_and_gradient(recipe, lam, batches)
    eps = 0.05
    for t, g in [(0, 0), (1, len(groups) - 1), (2, 1)]:
        up, down = lam.clone(), lam.clone()
        up[t, g] += eps
        down[t, g] -= eps
        numeric = tuner.loss_and_gradient(recipe, up, batches)[0] - tuner.loss_and_gradient(recipe, down, batches)[0]
        assert grad[t, g] == pytest.approx(numeric / (2 * eps), rel=0.01, abs=1e-5)  # observed: within 0.3%


def test_tuning_lowers_the_objective_and_gives_an_ordinary_recipe(worker: Worker, tmp_path: Path) -> None:
    start = _recipe(worker, weight=0.3)
    tuned = worker.tune(start, GradientSettings(steps=12, learning_rate=0.05, objective="labels"))
    assert len(tuned.losses) == 12
    assert np.mean(tuned.losses[-3:]) < np.mean(tuned.losses[:3])
    groups = worker.merger.layout(1).groups.names
    lam = resolve_parameter(tuned.recipe.weight, worker.modelset.task_names, groups, "weight")
    assert lam.shape == (3, len(groups)) and (lam >= 0).all() and (lam <= 1).all()
    assert not np.allclose(lam, 0.3)  # it moved
    # An ordinary recipe: written, read back, merged like any candidate, bit for bit.
    path = tmp_path / "tuned.yaml"
    path.write_text(yaml.safe_dump(tuned.recipe.model_dump(mode="json")))
    again = Recipe.model_validate(yaml.safe_load(path.read_text()))
    a = worker.merger.merge(tuned.recipe)["encoder.layer.0.attention.self.query.weight"].clone()
    b = worker.merger.merge(again)["encoder.layer.0.attention.self.query.weight"]
    assert torch.equal(a, b)
    assert tuned.gradient_bytes == worker.modelset.numel * 4 and tuned.peak_rss_increase_bytes >= 0
    assert worker.evaluate(tuned.recipe).mean_normalized > 0


def test_a_merge_not_linear_in_lambda_is_refused(worker: Worker) -> None:
    with pytest.raises(RecipeError, match=r"method 'ties'.*not: use task_arithmetic, or ties with"):
        worker.tune(_recipe(worker, "ties", density=0.3), GradientSettings(steps=1))  # dis-mean divides by counts


class _Opaque(Evaluator):
    name = "judge"

    @property
    def n_examples(self) -> int:
        return 1

    def _evaluate(self, model: nn.Module) -> EvalResult:
        return EvalResult("custom", 0.0, {}, 1)


def test_tasks_without_a_differentiable_objective_are_named() -> None:
    with pytest.raises(TaskError, match="task 'judge': a _Opaque has no differentiable objective"):
        batch_loss(_Opaque(), "entropy")
    with pytest.raises(TaskError, match="unknown gradient objective 'kl'"):
        batch_loss(_Opaque(), "kl")  # type: ignore[arg-type]


def test_cli_tune_writes_the_recipe_and_scores_before_and_after(
    worker: Worker, zoo_env: dict[str, str], tmp_path: Path
) -> None:
    config = write_search_config(tmp_path / "c.yaml")
    proc = run_cli(["tune", str(config), "--steps", "2"], zoo_env, tmp_path)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "no start recipe" in out and "give --start RECIPE" in out, out
    start = tmp_path / "start.yaml"
    start.write_text(yaml.safe_dump(_recipe(worker, weight=0.3).model_dump(mode="json")))
    args = ["tune", str(config), "--start", str(start), "--steps", "3", "--learning-rate", "0.05", "--objective"]
    proc = run_cli([*args, "labels"], zoo_env, tmp_path)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    tuned = tmp_path / "run" / "tuned"
    recipe = yaml.safe_load((tuned / "recipe.yaml").read_text())
    assert recipe["method"] == "task_arithmetic" and isinstance(recipe["weight"], dict)
    summary = yaml.safe_load((tuned / "summary.json").read_text())
    assert summary["steps"] == 3 and set(summary["scores"]) == {"start", "tuned"}
    assert set(summary["scores"]["tuned"]) == {"search", "holdout"}
    assert "tuned" in out and "held-out" in out and "3 steps" in out
