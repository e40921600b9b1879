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
from mergetune.merging.methods.base import ChunkMethod, Prepared
from mergetune.merging.ops import weighted_task_sum


def weighted_sum(tau: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return weighted_task_sum(tau.unbind(0), weight)


class TaskArithmetic(ChunkMethod):
    name = "task_arithmetic"
    citation = "Ilharco et al. 2023, Editing Models with Task Arithmetic"
    kernel = staticmethod(weighted_sum)

    def prepare(self, ctx: MergeContext) -> Prepared:
        return Prepared(row_args={"weight": ctx.per_row(ctx.weight)})


class Average(ChunkMethod):
    name = "average"
    citation = "Wortsman et al. 2022, Model soups"
    kernel = staticmethod(weighted_sum)

    def prepare(self, ctx: MergeContext) -> Prepared:
        total = ctx.weight.sum(0, keepdim=True)
        if bool((total == 0).any()):
            raise RecipeError("average: the weights of a layer group sum to 0; give positive weights")
        return Prepared(row_args={"weight": ctx.per_row(ctx.weight / total)})


METHODS = [TaskArithmetic, Average]
