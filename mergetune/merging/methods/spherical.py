"""Spherical merges, as mergekit 0.1.5 runs them: SLERP, NuSLERP, Multi-SLERP and the Karcher mean.

All four treat a tensor (or each of its rows or columns) as a vector and interpolate on the sphere
rather than along the chord, so the merged vector keeps the inputs' norm instead of shrinking where
they disagree.

SLERP (Shoemake 1985, "Animating rotation with quaternion curves"; mergekit's ``slerp``): the base
θ_0 and exactly one expert θ_1, each whole tensor one vector, at t = λ[1, g] per layer group:

    cos Ω = (θ_0/‖θ_0‖)·(θ_1/‖θ_1‖),   θ = sin((1−t)Ω)/sin Ω · θ_0 + sin(tΩ)/sin Ω · θ_1,

and the straight line (1−t) θ_0 + t θ_1 where |cos Ω| > 0.9995 (nearly collinear: fine-tunes of one
base usually are, so SLERP is then Task Arithmetic with λ = t). A norm ≤ 1e-8 counts as 1.

NuSLERP (mergekit's ``nuslerp``): the same interpolation between exactly two experts, at
t = λ_2 / (λ_1 + λ_2) (0.5 where |λ_1 + λ_2| < 1e-6), on their task vectors τ_1, τ_2 (θ = θ_0 +
slerp(τ_1, τ_2), mergekit with a base_model; ``space: weights`` interpolates θ_1, θ_2, mergekit
without one); the vectors are whole tensors (``flatten``, the default), rows (``flatten: false``) or
columns (``row_wise: true``). Vectors are normalised by max(‖v‖, 1e-7) and interpolated linearly
where 1 − cos² Ω ≤ 1e-16.

Multi-SLERP (Goddard 2024, "Multi-SLERP"; mergekit's ``multislerp``): barycentric interpolation of
any number of vectors x_t (τ_t, or θ_t with ``space: weights``) with weights w (normalised to sum 1
unless ``normalize_weights: false``): project u_t = x_t / (‖x_t‖ + ε) to the tangent space at the
normalised weighted mean m, average there, map back with the exponential map, and rescale by the
weighted mean norm:

    m = Σ w_t u_t / ‖Σ w_t u_t‖,  v = Σ w_t (u_t − (u_t·m) m),  r = ‖v‖ + ε,
    x = (m cos r + v sin r / r) · Σ_t w_t ‖x_t‖.

Where ‖Σ w_t u_t‖ < ε (directions that cancel) the result is the straight line Σ w_t x_t (mergekit's
fallback for two vectors; for more, mergekit stops with an error). With one expert the result is that
expert, whatever its weight.

Karcher mean (Karcher 1977, "Riemannian center of mass and mollifier smoothing"; mergekit's
``karcher``): the weighted Riemannian centre of mass of the experts' directions θ_t/‖θ_t‖ on the
unit sphere, found by at most ``max_iter`` gradient steps m ← exp_m(Σ α_t Ω_t/sin Ω_t (u_t − cos Ω_t m))
(stopping when the step's norm is below ``tol``), times Σ α_t ‖θ_t‖, with α = λ / Σ λ per group
(mergekit weighs every model 1/N; equal λ is mergekit's merge). Directions of norm ≤ tol are left out
of the mean.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from mergetune.merging.context import MergeContext
from mergetune.merging.mergekit_spec import (
    BASE_INPUT,
    BASE_OPTIONAL,
    EXACT,
    ExportTables,
    ImportedValues,
    ImportTables,
    MergekitInverse,
    MergekitSpec,
    Translation,
    equal_weight_differences,
    flag,
    ones_weight,
    shared_t_spec,
    uniform_scalar,
)
from mergetune.merging.methods.base import MethodOptions, TensorMethod, WarmStart
from mergetune.merging.methods.model_space import (
    TensorInputs,
    cached,
    from_vectors,
    normalized_weights,
    require_nonnegative,
    tensor_inputs,
    to_vectors,
)

SLERP_LINEAR_ABOVE = 0.9995  # |cos Ω| above which mergekit's slerp interpolates linearly
SLERP_NORM_EPS = 1e-8
NUSLERP_NORM_FLOOR = 1e-7
NUSLERP_EPS = 1e-8  # collinear where 1 − cos² ≤ eps²
Space = Literal["task_vectors", "weights"]


# ---- the interpolation coefficients shared by SLERP and NuSLERP ----------------------------------------
def spherical_coefficients(
    cos: torch.Tensor, linear: torch.Tensor, t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sin((1−t)Ω) / sin Ω, sin(tΩ) / sin Ω) per vector, and (1 − t, t) where ``linear`` (``[k, 1]`` masks).

    At t = 0 the first is sin Ω / sin Ω, exactly 1 in floating point, and the second exactly 0.
    """
    omega = torch.acos(torch.where(linear, torch.zeros_like(cos), cos))  # finite on the unused branch too
    sin_omega = torch.where(linear, torch.ones_like(omega), torch.sin(omega))
    c0 = torch.where(linear, 1 - t, torch.sin((1 - t) * omega) / sin_omega)
    c1 = torch.where(linear, t, torch.sin(t * omega) / sin_omega)
    return c0, c1


# ---- SLERP ----------------------------------------------------------------------------------------------
def slerp_cosine(x: TensorInputs) -> torch.Tensor:
    """cos Ω between the base and the expert, whole tensors, as mergekit's slerp measures it (``[1, 1]``)."""
    a, b = x.base, x.experts()[0]
    norm_a, norm_b = a.norm(), b.norm()
    norm_a = torch.where(norm_a > SLERP_NORM_EPS, norm_a, torch.ones_like(norm_a))
    norm_b = torch.where(norm_b > SLERP_NORM_EPS, norm_b, torch.ones_like(norm_b))
    return ((a / norm_a) * (b / norm_b)).sum().clamp(-1, 1).reshape(1, 1)


class Slerp(TensorMethod):
    name = "slerp"
    citation = "Shoemake 1985, Animating rotation with quaternion curves (mergekit's slerp)"
    experts = (1, 1)  # the base and one other model
    search_weight = (0.0, 1.0)  # t: 0 is the base, 1 the expert
    warm_start = WarmStart(weight=0.5, density=1.0)  # the midpoint, mergekit's usual example
    mergekit = shared_t_spec("slerp")

    def merge_tensor(self, ctx: MergeContext, segment_index: int) -> torch.Tensor:
        x = tensor_inputs(ctx, segment_index)
        cos = cached(ctx, "slerp.cos", segment_index, lambda _: slerp_cosine(x))
        c0, c1 = spherical_coefficients(cos, cos.abs() > SLERP_LINEAR_ABOVE, x.weight[0])
        # θ − θ_0 = (c0 − 1) θ_0 + c1 θ_1: exactly 0 at t = 0
        return ((c0 - 1) * x.base + c1 * x.experts()[0]).reshape(x.shape)


# ---- NuSLERP --------------------------------------------------------------------------------------------
class NuslerpOptions(MethodOptions):
    flatten: bool = Field(True, description="Each tensor is one vector (mergekit's nuslerp_flatten).")
    row_wise: bool = Field(
        False, description="Without flatten: interpolate columns (dim 0) instead of rows (mergekit's nuslerp_row_wise)."
    )
    space: Space = Field(
        "task_vectors",
        description="Interpolate the task vectors (mergekit with a base_model) or the experts' weights (without).",
    )


def nuslerp_layout(opts: NuslerpOptions) -> str:
    return "whole" if opts.flatten else "columns" if opts.row_wise else "rows"


def interpolated(x: TensorInputs, space: str) -> torch.Tensor:
    """What the method interpolates: the task vectors, or the experts' weights (``[T, n]``)."""
    return x.tau if space == "task_vectors" else x.experts()


def nuslerp_cosine(v: torch.Tensor) -> torch.Tensor:
    """cos Ω between the two experts' vectors ``[2, k, m]`` (``[k, 1]``), as mergekit's nuslerp measures it."""
    unit = v / v.norm(dim=-1, keepdim=True).clamp(min=NUSLERP_NORM_FLOOR)
    return (unit[0] * unit[1]).sum(-1, keepdim=True).clamp(-1, 1)


def nuslerp_ratio(weight: torch.Tensor) -> torch.Tensor:
    """t = λ_2 / (λ_1 + λ_2), and 0.5 where the weights sum to (almost) 0."""
    total = weight.sum()
    return torch.where(total.abs() < 1e-6, torch.full_like(total, 0.5), weight[1] / total)


def weighted_translation(method: str, t: ExportTables, shared: dict[str, Any]) -> Translation:
    """mergekit's per-model weights, with the base_model only when the task vectors are interpolated."""
    return Translation(method, {"weight": t.weight}, shared, with_base=t.options.space == "task_vectors")


def weighted_import(method: str, r: ImportTables, options: dict[str, Any], diffs: list[str]) -> ImportedValues:
    """The weights as λ; a configuration without base_model interpolates the models' weights."""
    space = "task_vectors" if r.has_base else "weights"
    return ImportedValues(method, r.per_model["weight"], None, {**options, "space": space}, diffs)


def nuslerp_to_mergekit(t: ExportTables) -> Translation:
    opts: NuslerpOptions = t.options
    return weighted_translation("nuslerp", t, {"nuslerp_flatten": opts.flatten, "nuslerp_row_wise": opts.row_wise})


def nuslerp_from_mergekit(r: ImportTables) -> ImportedValues:
    diffs: list[str] = []
    options = {"flatten": flag(r, "nuslerp_flatten", diffs), "row_wise": flag(r, "nuslerp_row_wise", diffs)}
    return weighted_import("nuslerp", r, options, diffs)


class Nuslerp(TensorMethod):
    name = "nuslerp"
    Options = NuslerpOptions
    citation = "mergekit's nuslerp (SLERP of two task vectors at t = w2 / (w1 + w2))"
    experts = (2, 2)
    zero_weight_is_base = False  # λ = 0 for both is t = 0.5: the interpolation itself, not the base
    search_weight = (0.1, 1.0)
    warm_start = WarmStart(weight=1.0, density=1.0)  # equal weights: t = 0.5
    mergekit = MergekitSpec(
        "nuslerp",
        EXACT,
        nuslerp_to_mergekit,
        MergekitInverse(
            nuslerp_from_mergekit,
            {"nuslerp_flatten": True, "nuslerp_row_wise": False},
            {"weight": None},
            base=BASE_OPTIONAL,
        ),
        heads_refusal="exports to mergekit's nuslerp, which would interpolate the task heads {heads} that mergetune "
        "keeps per task; export models without their heads",
    )

    def merge_tensor(self, ctx: MergeContext, segment_index: int) -> torch.Tensor:
        opts: NuslerpOptions = ctx.options
        x = tensor_inputs(ctx, segment_index)
        layout = nuslerp_layout(opts)
        v = to_vectors(interpolated(x, opts.space), x.shape, layout)  # [2, k, m]
        key = f"nuslerp.cos:{opts.space}:{layout}"
        cos = cached(ctx, key, segment_index, lambda _: nuslerp_cosine(v))
        c0, c1 = spherical_coefficients(cos, (1 - cos.square()) <= NUSLERP_EPS**2, nuslerp_ratio(x.weight))
        merged = from_vectors(c0 * v[0] + c1 * v[1], x.shape, layout)
        delta = merged if opts.space == "task_vectors" else merged - x.base
        return delta.reshape(x.shape)


# ---- Multi-SLERP ----------------------------------------------------------------------------------------
class MultislerpOptions(MethodOptions):
    normalize_weights: bool = Field(True, description="Divide the weights by their sum (mergekit's default).")
    eps: float = Field(1e-8, gt=0.0, description="Added to norms against division by 0 (mergekit's eps).")
    space: Space = Field(
        "task_vectors",
        description="Interpolate the task vectors (mergekit with a base_model) or the experts' weights (without).",
    )


def multislerp(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """Barycentric interpolation of the rows of ``x`` ``[T, n]`` on the sphere, weights ``w`` ``[T]``."""
    if x.shape[0] == 1:
        return x[0]
    w = w.unsqueeze(1)
    norms = x.norm(dim=-1, keepdim=True)
    unit = x / (norms + eps)
    mean = (unit * w).sum(0)
    mean_norm = mean.norm()
    if mean_norm < eps:
        # Directions that cancel (opposite vectors, or the signs of a one-entry tensor): there is no mean
        # on the sphere. mergekit takes the straight line for two vectors and fails for more; mergetune
        # takes the straight line for any number, so a search does not stop on a one-entry tensor.
        return (x * w).sum(0)
    mean = mean / mean_norm
    tangent = ((unit - (unit * mean).sum(-1, keepdim=True) * mean) * w).sum(0)
    radius = tangent.norm() + eps
    on_sphere = mean * torch.cos(radius) + tangent * (torch.sin(radius) / radius)
    return on_sphere * (norms.squeeze(-1) * w.squeeze(1)).sum()


def multislerp_to_mergekit(t: ExportTables) -> Translation:
    opts: MultislerpOptions = t.options
    return weighted_translation("multislerp", t, {"normalize_weights": opts.normalize_weights, "eps": opts.eps})


def multislerp_from_mergekit(r: ImportTables) -> ImportedValues:
    diffs: list[str] = []
    eps = uniform_scalar(np.array([float(v) for v in r.shared["eps"]]), "eps", diffs)
    options = {"normalize_weights": flag(r, "normalize_weights", diffs), "eps": eps}
    return weighted_import("multislerp", r, options, diffs)


class Multislerp(TensorMethod):
    name = "multislerp"
    Options = MultislerpOptions
    citation = "Goddard 2024, Multi-SLERP (mergekit's multislerp)"
    zero_weight_is_base = False  # normalising divides by Σ λ = 0
    search_weight = (0.1, 1.0)
    warm_start = WarmStart(weight=1.0, density=1.0)  # equal weights
    mergekit = MergekitSpec(
        "multislerp",
        EXACT,
        multislerp_to_mergekit,
        MergekitInverse(
            multislerp_from_mergekit, {"normalize_weights": True, "eps": 1e-8}, {"weight": None}, base=BASE_OPTIONAL
        ),
        heads_refusal="exports to mergekit's multislerp, which would interpolate the task heads {heads} that "
        "mergetune keeps per task; export models without their heads",
    )

    def merge_tensor(self, ctx: MergeContext, segment_index: int) -> torch.Tensor:
        opts: MultislerpOptions = ctx.options
        x = tensor_inputs(ctx, segment_index)
        w = x.weight / x.weight.sum() if opts.normalize_weights else x.weight
        merged = multislerp(interpolated(x, opts.space), w, opts.eps)
        delta = merged if opts.space == "task_vectors" else merged - x.base
        return delta.reshape(x.shape)

    def validate(self, ctx: MergeContext) -> None:
        if ctx.options.normalize_weights:
            normalized_weights(ctx)  # a group whose weights sum to 0 is an error naming it


# ---- Karcher mean ---------------------------------------------------------------------------------------
class KarcherOptions(MethodOptions):
    max_iter: int = Field(10, ge=0, description="Most gradient steps on the sphere (mergekit's default 10).")
    tol: float = Field(1e-5, gt=0.0, description="Stop when a step is shorter; shorter vectors are left out.")


def karcher_mean(x: torch.Tensor, alpha: torch.Tensor, max_iter: int, tol: float) -> torch.Tensor:
    """The weighted Karcher mean of the rows of ``x`` ``[T, n]`` (see the module docstring); ``alpha`` sums to 1."""
    if x.shape[0] == 1:
        return x[0]
    norms = x.norm(dim=-1)
    units = torch.where(norms.unsqueeze(1) == 0, torch.zeros_like(x), x / norms.unsqueeze(1))
    valid = norms > tol
    if not bool(valid.any()):
        return torch.zeros_like(x[0])
    a, u = alpha[valid] / alpha[valid].sum(), units[valid]
    mean = (a.unsqueeze(1) * u).sum(0)
    mean_norm = mean.norm()
    mean = u[0].clone() if mean_norm < tol else mean / mean_norm
    for _ in range(max_iter):
        cos = (u @ mean).clamp(-1.0, 1.0)
        omega = torch.arccos(cos)
        moving = omega >= tol  # directions already at the mean pull no more
        pull = torch.where(moving, a * omega / torch.sin(torch.where(moving, omega, torch.ones_like(omega))), 0.0)
        step = (pull.unsqueeze(1) * (u - cos.unsqueeze(1) * mean)).sum(0)
        length = step.norm()
        if length < tol:
            break
        mean = torch.cos(length) * mean + torch.sin(length) * (step / length)
        unit_norm = mean.norm()
        if unit_norm > tol:
            mean = mean / unit_norm
    return (alpha * norms).sum() * mean


def karcher_to_mergekit(t: ExportTables) -> Translation:
    opts: KarcherOptions = t.options
    tr = Translation("karcher", {}, {"max_iter": opts.max_iter, "tol": opts.tol}, with_base=False)
    tr.differences = equal_weight_differences(t, "karcher")
    return tr


def karcher_from_mergekit(r: ImportTables) -> ImportedValues:
    diffs: list[str] = []
    options = {
        "max_iter": int(uniform_scalar(np.array([int(v) for v in r.shared["max_iter"]]), "max_iter", diffs)),
        "tol": uniform_scalar(np.array([float(v) for v in r.shared["tol"]]), "tol", diffs),
    }
    return ImportedValues("karcher", ones_weight(r), None, options, diffs)


class Karcher(TensorMethod):
    name = "karcher"
    Options = KarcherOptions
    citation = "Karcher 1977, Riemannian center of mass and mollifier smoothing (mergekit's karcher)"
    zero_weight_is_base = False  # the weights are normalised: Σ λ = 0 is an error
    search_weight = (0.1, 1.0)
    warm_start = WarmStart(weight=1.0, density=1.0)  # mergekit's equal weights
    mergekit = MergekitSpec(
        "karcher",
        EXACT,
        karcher_to_mergekit,
        MergekitInverse(karcher_from_mergekit, {"max_iter": 10, "tol": 1e-5}, {}, base=BASE_INPUT),
        heads_refusal="exports to mergekit's karcher, which would average the task heads {heads} that mergetune "
        "keeps per task; export models without their heads",
        tolerance=(1e-6, 1e-4),  # a few float32 iterations from reconstructed θ_t = θ_0 + τ_t
    )

    def validate(self, ctx: MergeContext) -> None:
        require_nonnegative(ctx, self.name, "a task's share of the mean")
        normalized_weights(ctx)

    def merge_tensor(self, ctx: MergeContext, segment_index: int) -> torch.Tensor:
        opts: KarcherOptions = ctx.options
        x = tensor_inputs(ctx, segment_index)
        merged = karcher_mean(x.experts(), x.weight / x.weight.sum(), opts.max_iter, opts.tol)
        return (merged - x.base).reshape(x.shape)


METHODS = [Slerp, Nuslerp, Multislerp, Karcher]
