"""Model Stock (Jang et al., "Model Stock: All we need is just a few fine-tuned models", ECCV 2024).

With N ≥ 2 experts fine-tuned from one base, the merge moves from the base towards the experts'
average by a ratio read from the angle between their task vectors, per tensor (or per row, i.e.
output filter, with ``filter_wise``):

    cos θ = mean over pairs i < j of τ_i·τ_j / max(‖τ_i‖ ‖τ_j‖, 1e-6)   (each clamped to [−1, 1]),
    t = N cos θ / (1 + (N − 1) cos θ)   (t = 0 where |1 + (N − 1) cos θ| < 1e-6),
    θ = t · (1/N) Σ_t θ_t + (1 − t) θ_0 = θ_0 + t · (1/N) Σ_t τ_t,

as mergekit's ``model_stock`` computes it. mergetune adds a weight per task and layer group on the
average, Δ = t · (1/N) Σ_t λ_t τ_t (the ratio t still comes from the unweighted angles), so λ = 1 is
the paper's merge and λ = 0 the base.
"""

from __future__ import annotations

import itertools

import torch
from pydantic import Field

from mergetune.merging.context import MergeContext
from mergetune.merging.mergekit_spec import (
    EXACT,
    ExportTables,
    ImportedValues,
    ImportTables,
    MergekitInverse,
    MergekitSpec,
    Translation,
    flag,
    ones_weight,
    unit_weight_differences,
)
from mergetune.merging.methods.base import MethodOptions, TensorMethod, WarmStart
from mergetune.merging.methods.model_space import cached, from_vectors, tensor_inputs, to_vectors

SINGULAR = 1e-6  # mergekit keeps the base where 1 + (N − 1) cos θ is within this of 0


class ModelStockOptions(MethodOptions):
    filter_wise: bool = Field(False, description="One ratio per row (output filter) instead of per tensor.")


def stock_ratio(vectors: torch.Tensor) -> torch.Tensor:
    """t per vector (``[k, 1]``) from the task vectors ``[N, k, m]`` (see the module docstring)."""
    n = vectors.shape[0]
    norms = vectors.norm(dim=-1)
    cosines = [
        ((vectors[i] * vectors[j]).sum(-1) / (norms[i] * norms[j]).clamp(min=SINGULAR)).clamp(-1, 1)
        for i, j in itertools.combinations(range(n), 2)
    ]
    cos = torch.stack(cosines).mean(0).unsqueeze(-1)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < SINGULAR
    return torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, 1.0, denominator))


def model_stock_to_mergekit(t: ExportTables) -> Translation:
    tr = Translation("model_stock", {}, {"filter_wise": t.options.filter_wise})
    tr.differences = unit_weight_differences(t, "model_stock")
    return tr


def model_stock_from_mergekit(r: ImportTables) -> ImportedValues:
    diffs: list[str] = []
    options = {"filter_wise": flag(r, "filter_wise", diffs)}
    return ImportedValues("model_stock", ones_weight(r), None, options, diffs)


class ModelStock(TensorMethod):
    name = "model_stock"
    Options = ModelStockOptions
    citation = "Jang et al. 2024, Model Stock: All we need is just a few fine-tuned models"
    experts = (2, None)  # the ratio comes from angles between task vectors
    search_weight = (0.5, 1.5)
    warm_start = WarmStart(weight=1.0, density=1.0)  # the paper's merge
    mergekit = MergekitSpec(
        "model_stock",
        EXACT,
        model_stock_to_mergekit,
        MergekitInverse(model_stock_from_mergekit, {"filter_wise": False}, {}),
        heads_refusal="exports to mergekit's model_stock, which would merge the task heads {heads} that mergetune "
        "keeps per task; export models without their heads",
    )

    def merge_tensor(self, ctx: MergeContext, segment_index: int) -> torch.Tensor:
        x = tensor_inputs(ctx, segment_index)
        layout = "rows" if ctx.options.filter_wise else "whole"
        vectors = to_vectors(x.tau, x.shape, layout)  # [N, k, m]
        ratio = cached(ctx, f"model_stock.t:{layout}", segment_index, lambda _: stock_ratio(vectors))
        average = (x.weight.view(-1, 1, 1) * vectors).sum(0) / x.tau.shape[0]
        return from_vectors(ratio * average, x.shape, layout).reshape(x.shape)


METHODS = [ModelStock]
