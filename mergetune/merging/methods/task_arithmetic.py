"""Task Arithmetic (Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023).

Δ = Σ_t λ[t, g] τ_t, with λ per task t and layer group g (the paper uses one λ; 0.3 is the common
untuned default). ``average`` (weight averaging, Wortsman et al. 2022 "model soups") is the same
sum with the weights of each group normalised to sum to 1: θ = Σ_t w_t θ_t / Σ_t w_t, which with
equal weights is θ = (1/T) Σ_t θ_t.
"""

from __future__ import annotations

import torch

from mergetune.errors import RecipeError
from mergetune.merging.context import MergeContext
from mergetune.merging.mergekit_spec import (
    EXACT,
    ExportTables,
    ImportedValues,
    ImportTables,
    MergekitInverse,
    MergekitSpec,
    Translation,
    gta_parameters,
    linear_weights,
)
from mergetune.merging.methods.base import ChunkMethod, MethodOptions, Prepared, WarmStart
from mergetune.merging.ops import weighted_task_sum


def weighted_sum(tau: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return weighted_task_sum(tau.unbind(0), weight)


def task_arithmetic_to_mergekit(t: ExportTables) -> Translation:
    return Translation("task_arithmetic", {"weight": t.weight}, {"normalize": False, "lambda": 1.0})


def task_arithmetic_from_mergekit(r: ImportTables) -> ImportedValues:
    return ImportedValues("task_arithmetic", linear_weights(r, r.per_model["weight"]), None, {}, [])


def average_to_mergekit(t: ExportTables) -> Translation:
    """mergekit's linear is Σ w_t θ_t / Σ w_t: no base model (its configurations import through ``linear.Linear``)."""
    return Translation("linear", {"weight": t.weight}, {"normalize": True}, with_base=False)


class TaskArithmetic(ChunkMethod):
    name = "task_arithmetic"
    citation = "Ilharco et al. 2023, Editing Models with Task Arithmetic"
    kernel = staticmethod(weighted_sum)
    search_weight = (0.0, 1.0)
    warm_start = WarmStart(weight=0.3, density=1.0)  # the paper's common untuned λ
    mergekit = MergekitSpec(
        "task_arithmetic",
        EXACT,
        task_arithmetic_to_mergekit,
        MergekitInverse(task_arithmetic_from_mergekit, *gta_parameters(normalize=False, rescale=False)),
    )

    def prepare(self, ctx: MergeContext) -> Prepared:
        return Prepared(row_args={"weight": ctx.per_row(ctx.weight)})

    def linear_in_weight(self, options: MethodOptions) -> bool:
        return True  # Δ = Σ λ τ


class Average(ChunkMethod):
    name = "average"
    citation = "Wortsman et al. 2022, Model soups"
    kernel = staticmethod(weighted_sum)
    search_weight = (0.1, 1.0)
    warm_start = WarmStart(weight=1.0, density=1.0)  # the uniform soup
    mergekit = MergekitSpec(
        "linear",
        EXACT,
        average_to_mergekit,
        heads_refusal="exports to mergekit's linear, which would average the task heads {heads} that mergetune keeps "
        "per task; use task_arithmetic with weights w_t / sum(w) (the same merge of the shared tensors) to export",
    )

    def prepare(self, ctx: MergeContext) -> Prepared:
        total = ctx.weight.sum(0, keepdim=True)
        if bool((total == 0).any()):
            raise RecipeError("average: the weights of a layer group sum to 0; give positive weights")
        return Prepared(row_args={"weight": ctx.per_row(ctx.weight / total)})


METHODS = [TaskArithmetic, Average]
