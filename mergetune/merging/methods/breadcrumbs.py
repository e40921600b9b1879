"""Model Breadcrumbs (Davari & Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging with
Sparse Masks", ECCV 2024, arXiv 2312.06795).

Per row (the paper's layer-wise masks; option ``scope``: ``row`` default, ``tensor``, ``global``),
per task: drop the largest γ fraction of |τ_t| (outliers), keep the next β fraction
(β = density[t, g]), zero the rest; then merge:

- ``breadcrumbs``: Task Arithmetic, Δ = Σ_t λ_t τ̂_t;
- ``breadcrumbs_ties`` (mergekit's variant, not in the paper): TIES sign election on τ̂_t and a
  disjoint merge, Δ = scale · τ_m (see ``ties.py``).

Counting convention, for a block of n entries ranked by |τ_t| (``stats.kth_largest``, +inf at k=0):

    k_hi = ⌊γ·n⌋,   k_lo = min(n, k_hi + ⌊β·n⌋),
    keep  thr(k_lo) ≤ |τ| < thr(k_hi),   thr(k) = the k-th largest |τ| of the block.

So γ = 0 (k_hi = 0) drops no outlier; entries tied with the k_hi-th largest are all dropped (they
are outliers as large as one), entries tied with the k_lo-th largest are all kept (as TIES keeps
ties); β·n < 1 keeps nothing. When γ + β > 1, everything below the outliers is kept (mergekit
instead shrinks the outlier cut to reach the density). Floors carry the same 1e-9 guard as
``stats.keep_counts``.

``breadcrumbs_ties`` defaults follow mergekit, its only reference: weights applied before the
election, plain disjoint sum (mergekit ``normalize: false``).
"""

from __future__ import annotations

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
    band_differences,
    band_mismatch,
    consensus,
    count_report,
    gta_parameters,
    inverse_consensus,
    linear_weights,
    scope_differences,
    uniform_scalar,
)
from mergetune.merging.methods.base import ChunkMethod, MethodOptions, Prepared, WarmStart
from mergetune.merging.methods.ties import ConsensusOptions, Disjoint, WeightsAt, consensus_args, sign_consensus
from mergetune.merging.ops import per_task, weighted_task_sum
from mergetune.merging.stats import Scope, keep_counts

CITATION = "Davari & Belilovsky 2023, Model Breadcrumbs"


class BreadcrumbsOptions(MethodOptions):
    scope: Scope = Field(Scope.ROW, description="Block over which magnitudes are ranked.")
    gamma: float = Field(0.01, ge=0.0, lt=1.0, description="Fraction of largest magnitudes dropped as outliers.")


class BreadcrumbsTiesOptions(BreadcrumbsOptions, ConsensusOptions):
    disjoint: Disjoint = "sum"  # mergekit's breadcrumbs_ties, its only reference
    weights: WeightsAt = "before_election"


def breadcrumbs_mask(tau: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """τ where lower ≤ |τ| < upper (per-row thresholds), 0 elsewhere."""
    a = tau.abs()
    return torch.where((a >= lower) & (a < upper), tau, torch.zeros_like(tau))


def breadcrumbs_kernel(
    tau: torch.Tensor, weight: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor
) -> torch.Tensor:
    return weighted_task_sum(per_task(breadcrumbs_mask, tau.shape[0], tau, lower, upper), weight)


def breadcrumbs_ties_kernel(
    tau: torch.Tensor,
    weight: torch.Tensor,
    election_weight: torch.Tensor,
    scale: torch.Tensor,
    lower: torch.Tensor,
    upper: torch.Tensor,
    disjoint: str,
) -> torch.Tensor:
    masked = per_task(breadcrumbs_mask, tau.shape[0], tau, lower, upper)
    return sign_consensus(masked, weight, election_weight, disjoint) * scale


def band_thresholds(ctx: MergeContext, density: torch.Tensor, gamma: float, scope: Scope) -> dict[str, torch.Tensor]:
    """Per-row ``lower`` = thr(k_lo) and ``upper`` = thr(k_hi) (``[T, n_rows]``, see the module doc)."""
    _, length = ctx.rows.blocks(scope, ctx.modelset)
    k_hi = keep_counts(torch.full_like(density, gamma), length, ctx.rows.group)
    k_lo = torch.minimum(k_hi + keep_counts(density, length, ctx.rows.group), length.unsqueeze(0))
    return {
        "lower": ctx.stats.kth_largest("abs", scope, k_lo),
        "upper": ctx.stats.kth_largest("abs", scope, k_hi),
    }


def breadcrumbs_to_mergekit(t: ExportTables) -> Translation:
    """mergekit's breadcrumbs (a Task Arithmetic of the band-masked task vectors), or its TIES variant."""
    opts: BreadcrumbsOptions = t.options
    if isinstance(opts, BreadcrumbsTiesOptions):
        ones = np.ones_like(t.weight)
        tr = consensus("breadcrumbs_ties", t, t.density, ones, opts.weights, opts.disjoint, opts.scale)
    else:
        tr = Translation("breadcrumbs", {"weight": t.weight, "density": t.density}, {"normalize": False})
    tr.per_input["gamma"] = np.full_like(t.weight, opts.gamma)
    tr.shared.setdefault("lambda", 1.0)
    tr.differences = scope_differences(opts.scope, "Breadcrumbs") + band_differences(t, opts.gamma) + tr.differences
    return tr


def breadcrumbs_from_mergekit(r: ImportTables) -> ImportedValues:
    diffs: list[str] = []
    density = r.per_model["density"]
    gamma = uniform_scalar(r.per_model["gamma"], "gamma", diffs)
    diffs += count_report(r.names, r.tasks, band_mismatch(r.numel, density, gamma), "outlier band")
    if r.method == "breadcrumbs":
        weight, options = linear_weights(r, r.per_model["weight"]), {}
    else:
        weight, options = inverse_consensus(r, np.ones_like(density), diffs)
    return ImportedValues(r.method, weight, density, {"scope": "tensor", "gamma": gamma, **options}, diffs)


def _breadcrumbs_spec(method: str) -> MergekitSpec:
    shared, per_model = gta_parameters(normalize=False, rescale=False, gamma=0.01)
    inverse = MergekitInverse(breadcrumbs_from_mergekit, shared, per_model)
    return MergekitSpec(method, EXACT, breadcrumbs_to_mergekit, inverse)


class Breadcrumbs(ChunkMethod):
    name = "breadcrumbs"
    Options = BreadcrumbsOptions
    uses_density = True
    citation = CITATION
    kernel = staticmethod(breadcrumbs_kernel)
    search_weight = (0.0, 1.0)
    search_density = (0.05, 0.9)
    warm_start = WarmStart(weight=0.3, density=0.1)
    mergekit = _breadcrumbs_spec("breadcrumbs")

    def prepare(self, ctx: MergeContext) -> Prepared:
        opts: BreadcrumbsOptions = ctx.options
        args = {"weight": ctx.per_row(ctx.weight), **band_thresholds(ctx, ctx.density, opts.gamma, opts.scope)}
        return Prepared(row_args=args)


class BreadcrumbsTies(ChunkMethod):
    name = "breadcrumbs_ties"
    Options = BreadcrumbsTiesOptions
    uses_density = True
    citation = CITATION
    kernel = staticmethod(breadcrumbs_ties_kernel)
    search_weight = (0.0, 1.0)
    search_density = (0.05, 0.9)
    mergekit = _breadcrumbs_spec("breadcrumbs_ties")

    def prepare(self, ctx: MergeContext) -> Prepared:
        opts: BreadcrumbsTiesOptions = ctx.options
        args = {**consensus_args(ctx, opts), **band_thresholds(ctx, ctx.density, opts.gamma, opts.scope)}
        return Prepared(row_args=args, static={"disjoint": opts.disjoint})


METHODS = [Breadcrumbs, BreadcrumbsTies]
