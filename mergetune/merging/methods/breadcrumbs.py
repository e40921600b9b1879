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

So γ = 0 (k_hi = 0) drops no outlier; with ``tie_rule: keep_ties`` (default) entries tied with the
k_hi-th largest are all dropped (they are outliers as large as one), entries tied with the k_lo-th
largest are all kept (as TIES keeps ties); β·n < 1 keeps nothing. ``tie_rule: mergekit`` cuts both
ends at exact counts, tied magnitudes in mergekit 0.1.5's order (``magnitude_outliers``: positions
[n − k_lo, n − k_hi) of torch's CPU ascending sort, see ``stats.sort_order_scores``). When
γ + β > 1, everything below the outliers is kept (mergekit instead shrinks the outlier cut to reach
the density). Floors carry the same 1e-9 guard as
``stats.keep_counts``.

``breadcrumbs_ties`` defaults follow mergekit, its only reference: weights applied before the
election, plain disjoint sum (mergekit ``normalize: false``); its ``sign_cancel`` (see ``ties.py``)
stays ``entry_majority`` by default, mergekit's is ``plus_one``.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from mergetune.merging.context import MergeContext
from mergetune.merging.mergekit_spec import (
    EXACT,
    AuditCounts,
    ExportTables,
    ImportedValues,
    ImportTables,
    MergekitInverse,
    MergekitSpec,
    TensorAudit,
    Translation,
    band_differences,
    band_mismatch,
    cancel_counts,
    consensus,
    count_report,
    gta_parameters,
    inverse_consensus,
    keep_count,
    kth_largest_value,
    linear_weights,
    refuse_l1_rescale,
    scope_differences,
    tied_beyond,
    uniform_scalar,
)
from mergetune.merging.methods.base import ChunkMethod, MethodOptions, Prepared, WarmStart
from mergetune.merging.methods.ties import (
    MERGEKIT_RULES,
    ConsensusOptions,
    Disjoint,
    WeightsAt,
    consensus_args,
    consensus_static,
    sign_consensus,
)
from mergetune.merging.ops import weighted_task_sum
from mergetune.merging.stats import Scope, keep_counts, order_thresholds, sort_order_scores

CITATION = "Davari & Belilovsky 2023, Model Breadcrumbs"


class BreadcrumbsOptions(MethodOptions):
    scope: Scope = Field(Scope.ROW, description="Block over which magnitudes are ranked.")
    gamma: float = Field(0.01, ge=0.0, lt=1.0, description="Fraction of largest magnitudes dropped as outliers.")
    tie_rule: Literal["keep_ties", "mergekit"] = Field(
        "keep_ties", description="Magnitudes tied at a cut: by value (see above), or exact counts in mergekit's order."
    )


class BreadcrumbsTiesOptions(BreadcrumbsOptions, ConsensusOptions):
    disjoint: Disjoint = "sum"  # mergekit's breadcrumbs_ties, its only reference
    weights: WeightsAt = "before_election"


def breadcrumbs_mask(
    tau: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, score: torch.Tensor | None = None
) -> torch.Tensor:
    """τ where lower ≤ score < upper (per-row thresholds; score |τ| by default), 0 elsewhere."""
    a = tau.abs() if score is None else score
    return torch.where((a >= lower) & (a < upper), tau, 0.0)


def band_values(
    tau: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, score: torch.Tensor | None = None, **_: Any
) -> list[torch.Tensor]:
    """Per task, the entries of τ_t inside its band."""
    scores = [None] * tau.shape[0] if score is None else score.unbind(0)
    columns = zip(tau.unbind(0), lower.unbind(0), upper.unbind(0), scores, strict=True)
    return [breadcrumbs_mask(t, lo, hi, s) for t, lo, hi, s in columns]


def breadcrumbs_kernel(
    tau: torch.Tensor,
    weight: torch.Tensor,
    lower: torch.Tensor,
    upper: torch.Tensor,
    score: torch.Tensor | None = None,
) -> torch.Tensor:
    return weighted_task_sum(band_values(tau, lower, upper, score), weight)


def breadcrumbs_ties_kernel(
    tau: torch.Tensor,
    weight: torch.Tensor,
    election_weight: torch.Tensor,
    scale: torch.Tensor,
    lower: torch.Tensor,
    upper: torch.Tensor,
    disjoint: str,
    cancel: str = "entry_majority",
    majority: int = 0,
    score: torch.Tensor | None = None,
) -> torch.Tensor:
    masked = band_values(tau, lower, upper, score)
    return sign_consensus(masked, weight, election_weight, disjoint, cancel, majority) * scale


def band_thresholds(
    ctx: MergeContext, density: torch.Tensor, opts: BreadcrumbsOptions
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per-row ``lower`` and ``upper`` (``[T, n_rows]``, see the module doc) and the score they apply to.

    ``keep_ties``: thr(k_lo) and thr(k_hi) on |τ|; ``mergekit``: n − k_lo and n − k_hi on each entry's
    ascending sort position (exact counts).
    """
    _, length = ctx.rows.blocks(opts.scope, ctx.modelset)
    k_hi = keep_counts(torch.full_like(density, opts.gamma), length, ctx.rows.group)
    k_lo = torch.minimum(k_hi + keep_counts(density, length, ctx.rows.group), length.unsqueeze(0))
    if opts.tie_rule == "mergekit":
        bounds = {"lower": order_thresholds(k_lo, length), "upper": order_thresholds(k_hi, length)}
        return bounds, {"score": ctx.stats.order_scores(opts.scope, descending=False, cuts=list(bounds.values()))}
    bounds = {
        "lower": ctx.stats.kth_largest("abs", opts.scope, k_lo),
        "upper": ctx.stats.kth_largest("abs", opts.scope, k_hi),
    }
    return bounds, {}


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


def breadcrumbs_audit(opts: BreadcrumbsOptions) -> TensorAudit | None:
    """Check on the tensors unless both cuts and the sign election (``breadcrumbs_ties``) follow mergekit."""
    cancel = opts.sign_cancel if isinstance(opts, BreadcrumbsTiesOptions) else None
    if opts.tie_rule == "mergekit" and cancel in (None, "plus_one"):
        return None

    def check(tau: torch.Tensor, weight: np.ndarray, density: np.ndarray) -> AuditCounts:
        tied, values = 0, []
        for t, task_tau in enumerate(tau.unbind(0)):
            magnitude, n = task_tau.abs(), task_tau.numel()
            k_hi = keep_count(opts.gamma, n)
            k_lo = min(n, k_hi + keep_count(float(density[t]), n))
            if opts.tie_rule == "mergekit":
                score = sort_order_scores(magnitude.unsqueeze(0), descending=False)[0]
                values.append(breadcrumbs_mask(task_tau, torch.tensor(n - k_lo), torch.tensor(n - k_hi), score))
            else:
                if k_lo > k_hi:  # an empty band differs nowhere
                    tied += tied_beyond(magnitude, k_hi) + tied_beyond(magnitude, k_lo)
                lower, upper = kth_largest_value(magnitude, k_lo), kth_largest_value(magnitude, k_hi)
                values.append(breadcrumbs_mask(task_tau, lower, upper))
        counts = AuditCounts()
        if cancel not in (None, "plus_one"):
            before = getattr(opts, "weights", "before_election") == "before_election"
            counts = cancel_counts(values, weight if before else np.ones_like(weight))
        counts.tied = tied
        return counts

    return TensorAudit(check, cancel)


def breadcrumbs_from_mergekit(r: ImportTables) -> ImportedValues:
    diffs: list[str] = []
    density = r.per_model["density"]
    gamma = uniform_scalar(r.per_model["gamma"], "gamma", diffs)
    diffs += count_report(r.names, r.tasks, band_mismatch(r.numel, density, gamma), "outlier band")
    refuse_l1_rescale(r, diffs)
    if r.method == "breadcrumbs":
        weight, options = linear_weights(r, r.per_model["weight"]), {"tie_rule": "mergekit"}
    else:
        weight, options = inverse_consensus(r, np.ones_like(density), diffs)
        options.update(MERGEKIT_RULES)
    return ImportedValues(r.method, weight, density, {"scope": "tensor", "gamma": gamma, **options}, diffs)


def _breadcrumbs_spec(method: str) -> MergekitSpec:
    shared, per_model = gta_parameters(normalize=False, rescale=False, gamma=0.01)
    inverse = MergekitInverse(breadcrumbs_from_mergekit, shared, per_model)
    return MergekitSpec(method, EXACT, breadcrumbs_to_mergekit, inverse, audit=breadcrumbs_audit)


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
        bounds, elements = band_thresholds(ctx, ctx.density, opts)
        return Prepared(row_args={"weight": ctx.per_row(ctx.weight), **bounds}, element_args=elements)


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
        bounds, elements = band_thresholds(ctx, ctx.density, opts)
        args = {**consensus_args(ctx, opts), **bounds}
        static = {"disjoint": opts.disjoint, **consensus_static(ctx, opts.sign_cancel, band_values, args, elements)}
        return Prepared(row_args=args, element_args=elements, static=static)


METHODS = [Breadcrumbs, BreadcrumbsTies]
