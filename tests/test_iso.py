"""Iso-C and Iso-CTS against small hand-written references (plain torch, float64).

The references re-derive each merge from the official code's steps (danielm1405/iso-merging,
``src/utils/iso.py``) on the task vectors of in-memory state dicts, without mergetune's helpers:
Iso-C flattens the spectrum of the sum; Iso-CTS stacks task-specific directions (each task
projected off the common subspace) before the common ones, orthogonalises the stacks and flattens
the spectrum. 1-D tensors are averaged.
"""

from __future__ import annotations

import pytest
import torch
from conftest import State, make_models, make_recipe, merge

from mergetune.errors import RecipeError
from mergetune.export.mergekit import ExportError, export_mergekit
from mergetune.merging.methods.iso import subspace_sizes
from mergetune.merging.modelset import ModelSet

TASKS = ["t0", "t1", "t2"]
SHAPES = {"layers.0.w": (6, 4), "layers.0.b": (4,), "layers.1.w": (3, 7), "layers.1.s": (1,)}
GROUP = {"layers.0.w": "blocks.0", "layers.0.b": "blocks.0", "layers.1.w": "blocks.1", "layers.1.s": "blocks.1"}


# ---- references ---------------------------------------------------------------------------------------
def ref_iso_c(mats: list[torch.Tensor]) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(sum(mats), full_matrices=False)
    return u @ torch.diag(torch.full_like(s, float(s.mean()))) @ vh


def orthogonal_factor(a: torch.Tensor) -> torch.Tensor:
    p, _, qh = torch.linalg.svd(a, full_matrices=False)
    return p @ qh


def ref_iso_cts(mats: list[torch.Tensor], fraction: float) -> torch.Tensor:
    """The official loop: task blocks first, the common block last, then polar factors and a flat spectrum."""
    T = len(mats)
    r = min(mats[0].shape)
    common = int(r * fraction)
    specific_total = round((r - common) / T) * T
    if specific_total > r:  # the official code's split leaves no room: one direction fewer per task
        specific_total -= T
    common = r - specific_total
    per_task = specific_total // T
    u, s, vh = torch.linalg.svd(sum(mats), full_matrices=False)
    cu, cs, cv = u[:, :common], s[:common], vh[:common, :]
    big_u = torch.zeros(mats[0].shape[0], r, dtype=torch.float64)
    big_s = torch.zeros(r, dtype=torch.float64)
    big_v = torch.zeros(r, mats[0].shape[1], dtype=torch.float64)
    for i, w in enumerate(mats):
        ut, st, vt = torch.linalg.svd(w - cu @ cu.T @ w, full_matrices=False)
        lo, hi = i * per_task, (i + 1) * per_task
        big_u[:, lo:hi], big_s[lo:hi], big_v[lo:hi, :] = ut[:, :per_task], st[:per_task], vt[:per_task, :]
    big_u[:, specific_total:], big_s[specific_total:], big_v[specific_total:, :] = cu, cs, cv
    return float(big_s.mean()) * orthogonal_factor(big_u) @ orthogonal_factor(big_v)


def reference(
    base: State, experts: dict[str, State], weight: dict[str, dict[str, float]], fraction: float | None
) -> dict[str, torch.Tensor]:
    """Δ per tensor: the isotropic merge of λ_t τ_t for matrices, Σ λ_t τ_t / T otherwise."""
    out = {}
    for k in base:
        mats = [weight[t][GROUP[k]] * (experts[t][k].double() - base[k].double()) for t in TASKS]
        if len(base[k].shape) != 2:
            out[k] = sum(mats) / len(TASKS)
        else:
            out[k] = ref_iso_c(mats) if fraction is None else ref_iso_cts(mats, fraction)
    return out


def assert_delta(out: State, base: State, expected: dict[str, torch.Tensor]) -> None:
    for k, d in expected.items():
        torch.testing.assert_close(out[k].double() - base[k].double(), d, atol=2e-5, rtol=1e-4, msg=k)


WEIGHTS = {
    "equal per group (one α per group: the cached merge)": {"*": {"blocks.0": 1.3, "blocks.1": -0.4}},
    "per task (weights the sum before the SVD)": {
        "t0": {"blocks.0": 1.0, "blocks.1": 0.2},
        "t1": {"blocks.0": 0.5, "blocks.1": 1.5},
        "t2": {"blocks.0": 2.0, "blocks.1": 0.7},
    },
}


def weight_table(spec: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    return {t: spec.get(t, spec.get("*")) for t in TASKS}


# ---- the tests ----------------------------------------------------------------------------------------
def test_iso_c_of_one_rank_two_matrix_flattens_its_spectrum_and_keeps_its_singular_vectors() -> None:
    base = {"layers.0.w": torch.zeros(2, 5)}
    tau = torch.tensor([[4.0, 0.0, 2.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0, 1.0]])  # σ = √20, √2
    out = merge(ModelSet.load(base, {"t0": {"layers.0.w": tau}}), make_recipe("iso_c", ["t0"], weight=0.5))
    u, s, vh = torch.linalg.svd(tau.double(), full_matrices=False)
    assert float(s[0]) > 1.5 * float(s[1])  # a clearly anisotropic spectrum to start from
    delta = out["layers.0.w"].double()
    flat = torch.full((2,), 0.5 * float(s.mean()), dtype=torch.float64)
    torch.testing.assert_close(torch.linalg.svdvals(delta), flat)
    torch.testing.assert_close(delta, 0.5 * float(s.mean()) * u @ vh)


@pytest.mark.parametrize("case", sorted(WEIGHTS))
def test_iso_c_matches_reference(case: str) -> None:
    base, experts = make_models(SHAPES, TASKS, seed=11)
    recipe = make_recipe("iso_c", TASKS, weight=WEIGHTS[case])
    out = merge(ModelSet.load(base, experts), recipe)
    assert_delta(out, base, reference(base, experts, weight_table(WEIGHTS[case]), None))


@pytest.mark.parametrize("fraction", [0.8, 0.5, 0.0])
@pytest.mark.parametrize("case", sorted(WEIGHTS))
def test_iso_cts_matches_reference(case: str, fraction: float) -> None:
    base, experts = make_models(SHAPES, TASKS, seed=12)
    options = {"common_space_fraction": fraction}
    out = merge(ModelSet.load(base, experts), make_recipe("iso_cts", TASKS, weight=WEIGHTS[case], options=options))
    assert_delta(out, base, reference(base, experts, weight_table(WEIGHTS[case]), fraction))


def test_iso_cts_with_a_full_common_subspace_is_iso_c() -> None:
    base, experts = make_models(SHAPES, TASKS, seed=13)
    ms = ModelSet.load(base, experts)
    weight = WEIGHTS["per task (weights the sum before the SVD)"]
    cts = merge(ms, make_recipe("iso_cts", TASKS, weight=weight, options={"common_space_fraction": 1.0}))
    iso_c = merge(ms, make_recipe("iso_c", TASKS, weight=weight))
    for k, value in iso_c.items():
        torch.testing.assert_close(cts[k], value, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["iso_c", "iso_cts"])
def test_the_merged_spectrum_is_flat_and_scales_with_alpha(method: str) -> None:
    """Every singular value of ΔW equals the mean one; a uniform λ is the paper's α (Iso(λM) = λ Iso(M))."""
    base, experts = make_models({"layers.0.w": (8, 6)}, TASKS, seed=14)
    ms = ModelSet.load(base, experts)
    one = merge(ms, make_recipe(method, TASKS, weight=1.0))["layers.0.w"] - base["layers.0.w"]
    two = merge(ms, make_recipe(method, TASKS, weight=2.5))["layers.0.w"] - base["layers.0.w"]
    s = torch.linalg.svdvals(one.double())
    torch.testing.assert_close(s, torch.full_like(s, float(s.mean())), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(two, 2.5 * one, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("rank", "tasks", "fraction", "expected"),
    [
        (64, 8, 0.8, (48, 2)),  # k₀ = 51, round(13/8) = 2 per task, k = 64 - 16
        (768, 8, 0.8, (616, 19)),  # ViT-B's 768: k₀ = 614, round(154/8) = 19, k = 768 - 152
        (4, 2, 0.8, (4, 0)),  # round(0.5) = 0 (half to even): no task-specific direction
        (5, 2, 0.0, (1, 2)),  # round(2.5) = 2
        (3, 2, 0.0, (1, 1)),  # round(1.5) = 2 would need 4 > 3 directions: capped at ⌊3/2⌋
        (6, 3, 1.0, (6, 0)),  # the whole rank is common: Iso-C
    ],
)
def test_subspace_sizes_follow_the_official_split(
    rank: int, tasks: int, fraction: float, expected: tuple[int, int]
) -> None:
    assert subspace_sizes(rank, tasks, fraction) == expected


def test_common_space_fraction_outside_the_unit_interval_is_refused() -> None:
    with pytest.raises(RecipeError, match="common_space_fraction"):
        make_recipe("iso_cts", TASKS, options={"common_space_fraction": 1.2})


@pytest.mark.parametrize("method", ["iso_c", "iso_cts"])
def test_mergekit_export_is_refused_with_the_reason(method: str) -> None:
    with pytest.raises(ExportError, match="singular values by their mean"):
        export_mergekit(make_recipe(method, TASKS))
