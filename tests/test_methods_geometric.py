"""The model-space methods' formulas, on tiny hand-made tensors against values computed by hand.

Each expectation is the paper's (or mergekit's) formula worked out for the case, not mergetune's code:
SLERP between orthogonal unit vectors is the point at angle t·90°; a Karcher mean of two directions is
the point that splits their angle in the ratio of the weights; Model Stock's ratio is 2c/(1 + c) for
two task vectors at cosine c; and so on.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from conftest import make_models, make_recipe, merge

from mergetune.errors import RecipeError
from mergetune.merging.modelset import ModelSet
from mergetune.recipe import Expert
from mergetune.search.space import MethodSpace, ParamRange, SearchSpace

W = "layers.0.w"  # the one tensor of the hand-made models
R2 = math.sqrt(0.5)


def models(base: list[Any], *experts: list[Any]) -> ModelSet:
    """A ModelSet of one tensor ``layers.0.w``: the base and experts a, b, c, ... given as nested lists."""
    tasks = "abcdef"[: len(experts)]
    states = {t: {W: torch.tensor(e)} for t, e in zip(tasks, experts, strict=False)}
    return ModelSet.load({W: torch.tensor(base)}, states)


def merged(ms: ModelSet, method: str, weight: Any, **options: Any) -> torch.Tensor:
    return merge(ms, make_recipe(method, ms.task_names, weight=weight, options=options))[W]


def close(value: torch.Tensor, expected: Any, atol: float = 1e-6) -> None:
    torch.testing.assert_close(value, torch.tensor(expected, dtype=torch.float32), atol=atol, rtol=1e-5)


# ---- linear and passthrough ------------------------------------------------------------------------------
def test_linear_is_the_weighted_mean_or_the_weighted_sum() -> None:
    ms = models([0.0, 0.0], [1.0, 2.0], [3.0, -1.0])
    close(merged(ms, "linear", {"a": 1.0, "b": 3.0}), [(1 + 9) / 4, (2 - 3) / 4])
    close(merged(ms, "linear", {"a": 1.0, "b": 3.0}, normalize=False), [10.0, -1.0])
    shifted = models([5.0, 5.0], [1.0, 2.0], [3.0, -1.0])  # the base is no input: the same merge
    close(merged(shifted, "linear", {"a": 0.5, "b": 0.5}, normalize=False), [2.0, 0.5])


def test_linear_mean_is_average() -> None:
    base, experts = make_models({"layers.0.w": (3, 4), "layers.1.w": (5,)}, "abc", seed=4)
    ms = ModelSet.load(base, experts)
    weight = {"a": 0.2, "b": 0.7, "c": 0.4}
    ours, average = merged_all(ms, "linear", weight), merged_all(ms, "average", weight)
    for name, value in ours.items():
        torch.testing.assert_close(value, average[name], atol=1e-6, rtol=1e-6)


def merged_all(ms: ModelSet, method: str, weight: Any, **options: Any) -> dict[str, torch.Tensor]:
    return merge(ms, make_recipe(method, ms.task_names, weight=weight, options=options))


def test_passthrough_is_the_scaled_expert() -> None:
    ms = models([1.0, 1.0], [2.0, -3.0])
    close(merged(ms, "passthrough", 1.0), [2.0, -3.0])
    close(merged(ms, "passthrough", 0.5), [1.0, -1.5])


# ---- SLERP and NuSLERP ---------------------------------------------------------------------------------
def test_slerp_of_orthogonal_unit_vectors_is_the_point_at_angle_t_times_90_degrees() -> None:
    ms = models([1.0, 0.0], [0.0, 1.0])
    close(merged(ms, "slerp", 0.5), [R2, R2])  # the normalised bisector
    close(merged(ms, "slerp", 0.25), [math.cos(math.pi / 8), math.sin(math.pi / 8)])
    close(merged(ms, "slerp", 0.0), [1.0, 0.0])
    close(merged(ms, "slerp", 1.0), [0.0, 1.0])


def test_slerp_keeps_the_norm_and_interpolates_it_linearly_between_different_norms() -> None:
    ms = models([2.0, 0.0], [0.0, 4.0])  # θ = sin((1−t)Ω)/sinΩ θ0 + sin(tΩ)/sinΩ θ1, Ω = 90°
    close(merged(ms, "slerp", 0.5), [2 * R2, 4 * R2])


def test_slerp_of_nearly_collinear_weights_is_the_straight_line() -> None:
    ms = models([1.0, 1.0, 1.0], [1.0, 1.0, 1.01])  # cos Ω ≈ 0.99998 > 0.9995
    close(merged(ms, "slerp", 0.3), [1.0, 1.0, 1.003])


def test_nuslerp_interpolates_task_vectors_at_the_weight_ratio() -> None:
    ms = models([5.0, 5.0], [6.0, 5.0], [5.0, 6.0])  # τ_a = e1, τ_b = e2
    close(merged(ms, "nuslerp", {"a": 1.0, "b": 1.0}), [5 + R2, 5 + R2])
    # t = λ_b / (λ_a + λ_b) = 0.25
    close(merged(ms, "nuslerp", {"a": 3.0, "b": 1.0}), [5 + math.cos(math.pi / 8), 5 + math.sin(math.pi / 8)])
    close(merged(ms, "nuslerp", {"a": 0.0, "b": 0.0}), [5 + R2, 5 + R2])  # no weight: t = 0.5


def test_nuslerp_rows_columns_and_whole_tensor() -> None:
    # τ_a and τ_b: per row, [1, 0] against [0, 1] and [1, 0] against [1, 0] (collinear)
    ms = models([[0.0, 0.0], [0.0, 0.0]], [[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [1.0, 0.0]])
    weight = {"a": 1.0, "b": 1.0}
    close(merged(ms, "nuslerp", weight, flatten=False), [[R2, R2], [1.0, 0.0]])
    # columns: column 0 is [1, 1] vs [0, 1], column 1 is [0, 0] vs [1, 0] (a zero vector: sin-weights only)
    c0 = slerp_np(np.array([1.0, 1.0]), np.array([0.0, 1.0]), 0.5)
    c1 = math.sin(math.pi / 4) * np.array([1.0, 0.0])  # Ω = 90° to a zero vector: sin(Ω/2)/sin Ω · v1
    close(merged(ms, "nuslerp", weight, flatten=False, row_wise=True), np.stack([c0, c1], axis=1).tolist())
    whole = slerp_np(np.array([1.0, 0.0, 1.0, 0.0]), np.array([0.0, 1.0, 1.0, 0.0]), 0.5)
    close(merged(ms, "nuslerp", weight), whole.reshape(2, 2).tolist())


def slerp_np(v0: np.ndarray, v1: np.ndarray, t: float) -> np.ndarray:
    """The textbook SLERP (Shoemake 1985) in float64."""
    omega = math.acos(float(v0 @ v1) / (np.linalg.norm(v0) * np.linalg.norm(v1)))
    return (math.sin((1 - t) * omega) * v0 + math.sin(t * omega) * v1) / math.sin(omega)


def test_nuslerp_on_the_weights_ignores_the_base() -> None:
    ms = models([9.0, 9.0], [1.0, 0.0], [0.0, 1.0])
    close(merged(ms, "nuslerp", {"a": 1.0, "b": 1.0}, space="weights"), [R2, R2])


# ---- Multi-SLERP and the Karcher mean -------------------------------------------------------------------
def multislerp_np(x: np.ndarray, w: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """Multi-SLERP written from its description: tangent-space mean at the normalised weighted mean."""
    w = w / w.sum()
    norms = np.linalg.norm(x, axis=1)
    u = x / (norms[:, None] + eps)
    m = (w[:, None] * u).sum(0)
    m /= np.linalg.norm(m)
    v = sum(wi * (ui - (ui @ m) * m) for wi, ui in zip(w, u, strict=True))
    r = np.linalg.norm(v) + eps
    return (m * math.cos(r) + v * math.sin(r) / r) * float(w @ norms)


def test_multislerp_of_two_orthogonal_unit_vectors_is_their_bisector() -> None:
    ms = models([0.0, 0.0], [1.0, 0.0], [0.0, 1.0])
    close(merged(ms, "multislerp", 1.0), [R2, R2])


def test_multislerp_of_three_vectors_matches_its_description() -> None:
    x = np.array([[1.0, 0.2, -0.3], [0.1, 2.0, 0.4], [-0.5, 0.3, 1.5]])
    base = [0.5, -0.5, 1.0]
    ms = models(base, *(np.array(base) + x).tolist())
    expected = np.array(base) + multislerp_np(x, np.array([0.5, 0.3, 0.2]))
    close(merged(ms, "multislerp", {"a": 0.5, "b": 0.3, "c": 0.2}), expected.tolist(), atol=1e-5)


def test_multislerp_of_directions_that_cancel_is_the_straight_line() -> None:
    ms = models([0.0], [1.0], [2.0], [-3.0])  # unit directions +1, +1, −1 with weights 1/4, 1/4, 1/2: mean 0
    close(merged(ms, "multislerp", {"a": 1.0, "b": 1.0, "c": 2.0}), [(1 + 2 - 6) / 4])


def test_multislerp_of_one_expert_is_the_expert() -> None:
    close(merged(models([1.0, 1.0], [3.0, -2.0]), "multislerp", 0.3), [3.0, -2.0])


def test_karcher_mean_splits_the_angle_in_the_ratio_of_the_weights() -> None:
    ms = models([0.0, 0.0], [1.0, 0.0], [0.0, 3.0])
    # equal weights: the bisector, scaled by the mean norm (1 + 3) / 2
    close(merged(ms, "karcher", 1.0), [2 * R2, 2 * R2], atol=1e-5)
    # weights 1 : 2: the point at 2/3 of the way (60°) minimises Σ w_t Ω_t², scaled by (1 + 2·3) / 3
    out = merged(ms, "karcher", {"a": 1.0, "b": 2.0}, max_iter=100, tol=1e-7)
    close(out, [7 / 3 * math.cos(math.pi / 3), 7 / 3 * math.sin(math.pi / 3)], atol=1e-5)


def test_sum_of_weights_zero_is_an_error_naming_the_group() -> None:
    ms = models([0.0, 0.0], [1.0, 0.0], [0.0, 1.0])
    for method in ("karcher", "multislerp", "linear"):
        with pytest.raises(RecipeError, match=r"layer group 'blocks.0'.*sum to 0"):
            merged(ms, method, {"a": 1.0, "b": -1.0} if method != "karcher" else 0.0)


# ---- NearSwap, Model Stock, Arcee Fusion ----------------------------------------------------------------
def test_nearswap_steps_at_most_t_towards_the_expert() -> None:
    ms = models([0.0, 1.0, 2.0, 3.0], [0.5, 1.001, 1.998, 3.0])
    # w = clamp(t / max(|τ|, 1e-6), 0, 1): [0.002, 1, 0.5, 1] for τ = [0.5, 0.001, −0.002, 0]
    close(merged(ms, "nearswap", 0.001), [0.001, 1.001, 1.999, 3.0])
    close(merged(ms, "nearswap", 0.0), [0.0, 1.0, 2.0, 3.0])
    with pytest.raises(RecipeError, match=r"nearswap: task 'a'.*negative"):
        merged(ms, "nearswap", -0.1)


def test_model_stock_ratio_from_the_angle_between_task_vectors() -> None:
    # τ_a = [1, 0], τ_b = [0.6, 0.8]: cos = 0.6, t = 2·0.6 / (1 + 0.6) = 0.75, Δ = t · mean(τ) = [0.6, 0.3]
    ms = models([1.0, 1.0], [2.0, 1.0], [1.6, 1.8])
    close(merged(ms, "model_stock", 1.0), [1.6, 1.3])
    close(merged(ms, "model_stock", {"a": 1.0, "b": 0.0}), [1.375, 1.0])  # λ weighs the average: t · τ_a / 2


def test_model_stock_of_three_and_filter_wise() -> None:
    # three orthogonal unit task vectors: cos = 0, t = 0 (keeps the base)
    ms = models([0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0])
    close(merged(ms, "model_stock", 1.0), [0.0, 0.0, 0.0])
    # per row: row 0 at cos 1 (t = 1: the average), row 1 at cos 0 (t = 0: the base)
    rows = models([[0.0, 0.0], [0.0, 0.0]], [[1.0, 1.0], [1.0, 0.0]], [[2.0, 2.0], [0.0, 1.0]])
    close(merged(rows, "model_stock", 1.0, filter_wise=True), [[1.5, 1.5], [0.0, 0.0]])
    whole_cos = (1 * 2 + 1 * 2) / (math.sqrt(3) * math.sqrt(9))  # the tensor as one vector
    t = 2 * whole_cos / (1 + whole_cos)
    close(merged(rows, "model_stock", 1.0), (t * np.array([[1.5, 1.5], [0.5, 0.5]])).tolist())


def test_arcee_fusion_keeps_only_the_outlying_changes() -> None:
    tau = [0.01, -0.02, 0.03, 0.04, -0.05, 0.06, 0.07, 5.0]
    base = [0.1 * i for i in range(8)]
    ms = models(base, (np.array(base) + tau).tolist())
    # one row: its KL is a common factor; sorted |τ| at ⌊q·7⌋ = 1, 3, 5: 0.02, 0.04, 0.06; cut 0.04 + 1.5·0.04
    expected = list(base)
    expected[7] += 5.0
    close(merged(ms, "arcee_fusion", 1.0), expected)
    expected[7] = base[7] + 2.5
    close(merged(ms, "arcee_fusion", 0.5), expected)


# ---- expert counts ----------------------------------------------------------------------------------------
def test_a_search_space_refuses_a_two_model_method_for_three_experts() -> None:
    """Said before any trial runs, with the method and the count (not at the first merge, in a worker)."""
    experts = [Expert(name=t, model=f"/m/{t}") for t in "abc"]
    with pytest.raises(RecipeError, match=r"slerp merges exactly 1 expert\(s\) with the base, got 3"):
        SearchSpace("/m/base", experts, ["blocks.0"], {"slerp": MethodSpace()}, ParamRange(), ParamRange())
    with pytest.raises(RecipeError, match=r"nuslerp merges exactly 2 expert\(s\) with the base, got 3"):
        SearchSpace("/m/base", experts, ["blocks.0"], {"nuslerp": MethodSpace()}, ParamRange(), ParamRange())
    SearchSpace("/m/base", experts[:1], ["blocks.0"], {"slerp": MethodSpace()}, ParamRange(), ParamRange())
