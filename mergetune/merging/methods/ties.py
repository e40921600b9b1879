"""TIES-Merging (Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023).

1. Trim: per task keep the top ``density`` of |τ_t| within the ranking scope (ties kept) -> τ̂_t.
2. Elect: γ = sign(Σ_t v_t) with v_t = τ̂_t (official) or λ_t τ̂_t (``weights: before_election``,
   mergekit); where the sum is exactly 0, the majority sign of the v_t.
3. Disjoint merge over the entries that agree with γ (see ``ops.disjoint_merge``):
   ``mean`` Σ λ_t τ̂_t m_t / max(1, Σ m_t) (official dis-mean), ``sum`` (FusionBench/AdaMerging),
   ``weighted_mean`` Σ λ_t τ̂_t m_t / Σ λ_t m_t (mergekit ``normalize: true``).
4. Δ = scale · τ_m.

Defaults follow the official code: scope ``global`` (the whole model ranked at once), weights
after the election, dis-mean; with one λ for all tasks this is Δ = λ · dis-mean(τ̂). The official
code keeps ⌊k·D⌋ + 1 entries at density k, mergetune ⌊k·D⌋ (see ``stats.py``).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
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
    consensus,
    count_report,
    gta_parameters,
    inverse_consensus,
    scope_differences,
    topk_differences,
    topk_mismatch,
)
from mergetune.merging.methods.base import ChunkMethod, MethodOptions, Prepared, WarmStart
from mergetune.merging.ops import agreeing, disjoint_merge, elect_sign, trim
from mergetune.merging.stats import Scope

Disjoint = Literal["mean", "sum", "weighted_mean"]
WeightsAt = Literal["after_election", "before_election"]


class ConsensusOptions(MethodOptions):
    """Options of TIES' sign election and disjoint merge, shared by every method that uses them.

    Defaults are the official TIES code's; methods whose reference is mergekit override them.
    """

    disjoint: Disjoint = "mean"
    weights: WeightsAt = "after_election"
    scale: float = Field(1.0, description="Multiplies the merged task vector (the papers' λ).")


class TiesOptions(ConsensusOptions):
    scope: Scope = Scope.GLOBAL


def ties_kernel(
    tau: torch.Tensor,
    weight: torch.Tensor,
    election_weight: torch.Tensor,
    threshold: torch.Tensor,
    scale: torch.Tensor,
    disjoint: str,
) -> torch.Tensor:
    taus, thresholds = tau.unbind(0), threshold.unbind(0)
    trimmed = [trim(t, thr) for t, thr in zip(taus, thresholds, strict=True)]
    return sign_consensus(trimmed, weight, election_weight, disjoint) * scale


def sign_consensus(
    values: list[torch.Tensor], weight: torch.Tensor, election_weight: torch.Tensor, disjoint: str
) -> torch.Tensor:
    """TIES steps 2-3 on sparsified per-task values: elect the sign, merge the agreeing entries."""
    weights = weight.unbind(0)
    voted = [v * e for v, e in zip(values, election_weight.unbind(0), strict=True)]
    masks = agreeing(voted, elect_sign(voted))
    return disjoint_merge(values, weights, masks, disjoint)


def consensus_args(ctx: MergeContext, options: TiesOptions | object) -> dict[str, torch.Tensor]:
    """Per-row weight, election weight and scale shared by the sign-consensus methods."""
    weight = ctx.per_row(ctx.weight)
    before = getattr(options, "weights", "after_election") == "before_election"
    scale = torch.full((1, weight.shape[1]), float(getattr(options, "scale", 1.0)), device=weight.device)
    return {"weight": weight, "election_weight": weight if before else torch.ones_like(weight), "scale": scale}


def ties_to_mergekit(t: ExportTables) -> Translation:
    """mergekit's ties: exact with scope tensor and where its election and normalize match (``consensus``)."""
    opts: TiesOptions = t.options
    tr = consensus("ties", t, t.density, np.ones_like(t.weight), opts.weights, opts.disjoint, opts.scale)
    tr.differences = scope_differences(opts.scope, "TIES") + topk_differences(t, t.density) + tr.differences
    return tr


def ties_from_mergekit(r: ImportTables) -> ImportedValues:
    diffs: list[str] = []
    density = r.per_model["density"]
    diffs += count_report(r.names, r.tasks, topk_mismatch(r.numel, density), "mergekit max(1, ⌊d·n⌋)")
    weight, options = inverse_consensus(r, np.ones_like(density), diffs)
    return ImportedValues("ties", weight, density, {"scope": "tensor", **options}, diffs)


class Ties(ChunkMethod):
    name = "ties"
    Options = TiesOptions
    uses_density = True
    citation = "Yadav et al. 2023, TIES-Merging"
    kernel = staticmethod(ties_kernel)
    search_weight = (0.2, 2.0)
    warm_start = WarmStart(weight=1.0, density=0.2)  # the paper's top-20% trim, λ = 1
    mergekit = MergekitSpec(
        "ties",
        EXACT,
        ties_to_mergekit,
        MergekitInverse(ties_from_mergekit, *gta_parameters(normalize=True, rescale=False)),
    )

    def prepare(self, ctx: MergeContext) -> Prepared:
        opts: TiesOptions = ctx.options
        args = consensus_args(ctx, opts)
        args["threshold"] = ctx.keep_threshold(ctx.density, opts.scope)
        return Prepared(row_args=args, static={"disjoint": opts.disjoint})


METHODS = [Ties]
