"""Linear merging and passthrough: mergekit's ``linear`` (Wortsman et al. 2022, "Model soups") and ``passthrough``.

θ = Σ_t w_t θ_t / Σ_t w_t with ``normalize: true`` (mergekit's default: a weighted mean of the
models, which is mergetune's ``average``), or θ = Σ_t w_t θ_t with ``normalize: false`` (the plain
weighted sum of the models' weights, e.g. a task-vector-free extrapolation), with w per task and
layer group. On task vectors, θ_t = θ_0 + τ_t:

    Δ = θ − θ_0 = Σ_t w̃_t τ_t + (Σ_t w̃_t − 1) θ_0,   w̃ = w / Σ w (normalize) or w,

so the base term vanishes when normalising and the kernel reads the base only for the plain sum.
mergekit's linear has no base model: every model is an input, the base too when a configuration
names it. A mergekit ``linear`` configuration imports as ``average`` when it normalises (the same
merge) and as ``linear`` with ``normalize: false`` when it does not.

``passthrough`` is the plain sum with exactly one expert: θ = s θ_1, its weight s per layer group
being mergekit's ``scale`` (1: the expert itself). mergekit uses it to copy layers unmerged (stacked
slices build new architectures, which a recipe cannot hold); on one model it is a rescaled copy.
"""

from __future__ import annotations

import torch
from pydantic import Field

from mergetune.merging.context import MergeContext
from mergetune.merging.mergekit_spec import (
    BASE_INPUT,
    EXACT,
    ExportTables,
    ImportedValues,
    ImportTables,
    MergekitInverse,
    MergekitSpec,
    Translation,
    flag,
)
from mergetune.merging.methods.base import ChunkMethod, MethodOptions, Prepared, WarmStart
from mergetune.merging.methods.model_space import normalized_weights
from mergetune.merging.ops import weighted_task_sum


class LinearOptions(MethodOptions):
    normalize: bool = Field(
        True, description="Divide by the sum of the weights (mergekit's default): a weighted mean of the models."
    )


def linear_sum(tau: torch.Tensor, weight: torch.Tensor, base_coef: torch.Tensor, theta0: torch.Tensor) -> torch.Tensor:
    """Δ = Σ_t w_t τ_t + c θ_0 on a chunk (``c = Σ_t w_t − 1``; 0 when the weights are normalised)."""
    return weighted_task_sum(tau.unbind(0), weight) + base_coef * theta0


def sum_of_models(ctx: MergeContext, weight: torch.Tensor, base_coef: torch.Tensor) -> Prepared:
    """``linear_sum``'s arguments: per-row weights ``[T, G]`` and base coefficients ``[1, G]``, and θ_0."""
    base = ctx.modelset.base_flat.unsqueeze(0)  # a view: the kernel reads θ_0 chunk by chunk
    return Prepared(
        row_args={"weight": ctx.per_row(weight), "base_coef": ctx.per_row(base_coef)},
        element_args={"theta0": base},
    )


def linear_to_mergekit(t: ExportTables) -> Translation:
    return Translation("linear", {"weight": t.weight}, {"normalize": t.options.normalize}, with_base=False)


def linear_from_mergekit(r: ImportTables) -> ImportedValues:
    """A weighted mean reads back as ``average`` (the same merge); the plain sum as ``linear``."""
    diffs: list[str] = []
    if flag(r, "normalize", diffs):
        return ImportedValues("average", r.per_model["weight"], None, {}, diffs)
    return ImportedValues("linear", r.per_model["weight"], None, {"normalize": False}, diffs)


class Linear(ChunkMethod):
    name = "linear"
    Options = LinearOptions
    citation = "Wortsman et al. 2022, Model soups (mergekit's linear)"
    kernel = staticmethod(linear_sum)
    search_weight = (0.1, 1.0)
    warm_start = WarmStart(weight=1.0, density=1.0)  # mergekit's default: the uniform mean
    zero_weight_is_base = False  # normalising divides by Σ w = 0; the plain sum of zero weights is 0
    mergekit = MergekitSpec(
        "linear",
        EXACT,
        linear_to_mergekit,
        MergekitInverse(linear_from_mergekit, {"normalize": True}, {"weight": None}, base=BASE_INPUT),
        heads_refusal="exports to mergekit's linear, which would merge the task heads {heads} that mergetune keeps "
        "per task; export models without their heads",
    )

    def prepare(self, ctx: MergeContext) -> Prepared:
        if ctx.options.normalize:
            weight = normalized_weights(ctx)
            base_coef = torch.zeros_like(weight[:1])  # exactly 0: the base term vanishes, no rounding residue
        else:
            weight = ctx.weight
            base_coef = weight.sum(0, keepdim=True) - 1.0
        return sum_of_models(ctx, weight, base_coef)


def passthrough_to_mergekit(t: ExportTables) -> Translation:
    return Translation("passthrough", {"scale": t.weight}, {}, with_base=False)


def passthrough_from_mergekit(r: ImportTables) -> ImportedValues:
    return ImportedValues("passthrough", r.per_model["scale"], None, {}, [])


class Passthrough(ChunkMethod):
    name = "passthrough"
    citation = "mergekit's passthrough (one model, optionally scaled)"
    kernel = staticmethod(linear_sum)
    experts = (1, 1)
    search_weight = (0.5, 1.5)
    warm_start = WarmStart(weight=1.0, density=1.0)  # the expert unchanged
    zero_weight_is_base = False  # scale 0 gives zeros
    mergekit = MergekitSpec(
        "passthrough",
        EXACT,
        passthrough_to_mergekit,
        MergekitInverse(passthrough_from_mergekit, {}, {"scale": 1.0}, base=BASE_INPUT),  # no scale: 1
        heads_refusal="exports to mergekit's passthrough, which would copy (and scale) the task head {heads} that "
        "mergetune keeps per task; export models without their heads",
    )

    def prepare(self, ctx: MergeContext) -> Prepared:
        return sum_of_models(ctx, ctx.weight, ctx.weight - 1.0)


METHODS = [Linear, Passthrough]
