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

import torch
from pydantic import Field

from mergetune.merging.context import MergeContext
from mergetune.merging.methods.base import ChunkMethod, MethodOptions, Prepared
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


class Breadcrumbs(ChunkMethod):
    name = "breadcrumbs"
    Options = BreadcrumbsOptions
    uses_density = True
    citation = CITATION
    kernel = staticmethod(breadcrumbs_kernel)

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

    def prepare(self, ctx: MergeContext) -> Prepared:
        opts: BreadcrumbsTiesOptions = ctx.options
        args = {**consensus_args(ctx, opts), **band_thresholds(ctx, ctx.density, opts.gamma, opts.scope)}
        return Prepared(row_args=args, static={"disjoint": opts.disjoint})


METHODS = [Breadcrumbs, BreadcrumbsTies]
