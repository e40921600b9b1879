"""TIES-Merging (Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023).

1. Trim: per task keep the top ``density`` of |τ_t| within the ranking scope -> τ̂_t. Magnitudes tied
   at the cut (frequent: weights rounded to bf16 take few distinct values) follow ``tie_rule``:
   ``keep_ties`` keeps them all (⌊d·n⌋ entries plus the ties of the smallest), ``official`` is the
   official code (int(d·n) + 1 entries plus ties), ``mergekit`` keeps exactly ⌊d·n⌋, the tied ones
   in mergekit 0.1.5's order (torch's CPU sort, see ``stats.sort_order_scores``).
2. Elect: γ = sign(Σ_t v_t) with v_t = τ̂_t (official) or λ_t τ̂_t (``weights: before_election``,
   mergekit); where the sum is exactly 0, ``sign_cancel`` (``ops.sign_agreement``): the entry's
   majority sign (``entry_majority``, default), the model-wide majority of the elected signs
   (``model_majority``, the official code; one more pass over the store per candidate) or +1
   (``plus_one``, mergekit).
3. Disjoint merge over the entries that agree with γ (see ``ops.disjoint_merge``):
   ``mean`` Σ λ_t τ̂_t m_t / max(1, Σ m_t) (official dis-mean), ``sum`` (FusionBench/AdaMerging),
   ``weighted_mean`` Σ λ_t τ̂_t m_t / Σ λ_t m_t (mergekit ``normalize: true``).
4. Δ = scale · τ_m.

Defaults follow the official code: scope ``global`` (the whole model ranked at once), weights
after the election, dis-mean; with one λ for all tasks this is Δ = λ · dis-mean(τ̂). The default
tie and cancel rules are mergetune's (kept from earlier versions, so that recipes keep their
results): keep every tied entry, and the entry's own majority where the sum cancels.
Exactly mergekit's ``ties``: ``scope: tensor, tie_rule: mergekit, sign_cancel: plus_one,
weights: before_election`` (and ``disjoint: weighted_mean`` or ``sum``).
"""

from __future__ import annotations

from collections.abc import Callable
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
    cancel_counts,
    consensus,
    count_report,
    gta_parameters,
    inverse_consensus,
    keep_count,
    kth_largest_value,
    refuse_l1_rescale,
    scope_differences,
    tied_beyond,
    topk_differences,
    topk_mismatch,
)
from mergetune.merging.methods.base import ChunkMethod, MethodOptions, Prepared, WarmStart
from mergetune.merging.ops import consensus_trim, disjoint_merge, elected_signs, sign_agreement, trim
from mergetune.merging.stats import Scope, keep_counts, official_keep_counts, order_thresholds, sort_order_scores

Disjoint = Literal["mean", "sum", "weighted_mean"]
WeightsAt = Literal["after_election", "before_election"]
TieRule = Literal["keep_ties", "mergekit", "official"]
SignCancel = Literal["entry_majority", "model_majority", "plus_one"]
MERGEKIT_RULES = {"tie_rule": "mergekit", "sign_cancel": "plus_one"}  # what an imported mergekit merge does
ValuesFn = Callable[..., list[torch.Tensor]]  # (tau [T, R, L], **args) -> per-task sparsified values


class ConsensusOptions(MethodOptions):
    """Options of TIES' sign election and disjoint merge, shared by every method that uses them.

    Defaults are the official TIES code's; methods whose reference is mergekit override them.
    """

    disjoint: Disjoint = "mean"
    weights: WeightsAt = "after_election"
    scale: float = Field(1.0, description="Multiplies the merged task vector (the papers' λ).")
    sign_cancel: SignCancel = Field(
        "entry_majority",
        description="Elected sign where Σ_t v_t is exactly 0: the entry's majority, the model-wide majority "
        "(official TIES code) or +1 (mergekit).",
    )


class TiesOptions(ConsensusOptions):
    scope: Scope = Scope.GLOBAL
    tie_rule: TieRule = Field(
        "keep_ties",
        description="Magnitudes tied at the top-k cut: keep them all, exactly k in mergekit's order, or the "
        "official code's int(d·n) + 1 and ties.",
    )


def ties_values(
    tau: torch.Tensor, threshold: torch.Tensor, score: torch.Tensor | None = None, **_: Any
) -> list[torch.Tensor]:
    """Per task, τ_t where its ranking score (|τ_t|, or ``score``, a sort-order rank) reaches the threshold.

    Read only through the sign consensus (and the model-wide majority's signs): ``consensus_trim``.
    """
    scores = [None] * tau.shape[0] if score is None else score.unbind(0)
    return [consensus_trim(t, thr, s) for t, thr, s in zip(tau.unbind(0), threshold.unbind(0), scores, strict=True)]


def ties_kernel(
    tau: torch.Tensor,
    weight: torch.Tensor,
    election_weight: torch.Tensor,
    threshold: torch.Tensor,
    scale: torch.Tensor,
    disjoint: str,
    cancel: str = "entry_majority",
    majority: int = 0,
    score: torch.Tensor | None = None,
) -> torch.Tensor:
    trimmed = ties_values(tau, threshold, score)
    return sign_consensus(trimmed, weight, election_weight, disjoint, cancel, majority) * scale


def sign_consensus(
    values: list[torch.Tensor],
    weight: torch.Tensor,
    election_weight: torch.Tensor,
    disjoint: str,
    cancel: str = "entry_majority",
    majority: int = 0,
) -> torch.Tensor:
    """TIES steps 2-3 on sparsified per-task values: elect the sign, merge the agreeing entries."""
    weights = weight.unbind(0)
    voted = [v * e for v, e in zip(values, election_weight.unbind(0), strict=True)]
    masks = sign_agreement(voted, cancel, majority)
    return disjoint_merge(values, weights, masks, disjoint)


def consensus_args(ctx: MergeContext, options: TiesOptions | object) -> dict[str, torch.Tensor]:
    """Per-row weight, election weight and scale shared by the sign-consensus methods."""
    weight = ctx.per_row(ctx.weight)
    before = getattr(options, "weights", "after_election") == "before_election"
    scale = torch.full((1, weight.shape[1]), float(getattr(options, "scale", 1.0)), device=weight.device)
    return {"weight": weight, "election_weight": weight if before else torch.ones_like(weight), "scale": scale}


def consensus_static(
    ctx: MergeContext,
    cancel: str,
    values: ValuesFn,
    row_args: dict[str, torch.Tensor],
    element_args: dict[str, torch.Tensor],
) -> dict[str, Any]:
    """The kernel's structural cancel rule, and for ``model_majority`` the model-wide majority sign.

    The majority depends on the candidate (its trims and weights) and on every entry of the model,
    so it costs one more pass over the store (eager), only with that rule.
    """
    static: dict[str, Any] = {"cancel": cancel}
    if cancel == "model_majority":
        static["majority"] = model_majority(ctx, values, row_args, element_args)
    return static


def model_majority(
    ctx: MergeContext, values: ValuesFn, row_args: dict[str, torch.Tensor], element_args: dict[str, torch.Tensor]
) -> int:
    """sign(Σ over every merged entry of sign(Σ_t v_t)): the official code's ``resolve_zero_signs``."""
    balance = 0
    with torch.inference_mode():
        for tau, args in ctx.chunks(row_args, element_args):
            voted = [v * e for v, e in zip(values(tau, **args), args["election_weight"].unbind(0), strict=True)]
            signs = elected_signs(voted)
            balance += int((signs > 0).sum()) - int((signs < 0).sum())
    return (balance > 0) - (balance < 0)


def trim_args(
    ctx: MergeContext, density: torch.Tensor, scope: Scope, tie_rule: str
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-row trim threshold (``[T, n_rows]``) and the per-entry score it applies to under ``tie_rule``.

    ``keep_ties`` and ``official`` threshold |τ| (the k-th or (int(d·n) + 1)-th largest, ties kept);
    ``mergekit`` thresholds each entry's rank in mergekit's sort order, which keeps exactly k.
    """
    _, length = ctx.rows.blocks(scope, ctx.modelset)
    if tie_rule == "official":
        return ctx.stats.kth_largest("abs", scope, official_keep_counts(density, length, ctx.rows.group)), {}
    k = keep_counts(density, length, ctx.rows.group)
    if tie_rule == "mergekit":
        cut = order_thresholds(k, length)
        return cut, {"score": ctx.stats.order_scores(scope, descending=True, cuts=[cut])}
    return ctx.stats.kth_largest("abs", scope, k), {}


def ties_to_mergekit(t: ExportTables) -> Translation:
    """mergekit's ties: exact with scope tensor and where its election and normalize match (``consensus``)."""
    opts: TiesOptions = t.options
    tr = consensus("ties", t, t.density, np.ones_like(t.weight), opts.weights, opts.disjoint, opts.scale)
    tr.differences = scope_differences(opts.scope, "TIES") + topk_differences(t, t.density) + tr.differences
    if opts.tie_rule == "official":
        tr.differences.append(
            "tie_rule: official keeps int(d·n) + 1 entries of each block and every entry tied with the last; "
            "mergekit exactly max(1, int(d·n)); set options.tie_rule: mergekit for an exact export"
        )
    return tr


def ties_audit(opts: TiesOptions) -> TensorAudit | None:
    """Check on the tensors unless the options are mergekit's rules (``official`` is a listed difference)."""
    if opts.tie_rule == "official" or (opts.tie_rule == "mergekit" and opts.sign_cancel == "plus_one"):
        return None

    def check(tau: torch.Tensor, weight: np.ndarray, density: np.ndarray) -> AuditCounts:
        tied, values = 0, []
        for t, task_tau in enumerate(tau.unbind(0)):
            magnitude, k = task_tau.abs(), keep_count(float(density[t]), task_tau.numel())
            if opts.tie_rule == "mergekit":
                score = sort_order_scores(magnitude.unsqueeze(0), descending=True)[0]
                values.append(trim(task_tau, torch.tensor(task_tau.numel() - k), score))
            else:
                tied += tied_beyond(magnitude, k)
                values.append(trim(task_tau, kth_largest_value(magnitude, k)))
        election = weight if opts.weights == "before_election" else np.ones_like(weight)
        counts = AuditCounts() if opts.sign_cancel == "plus_one" else cancel_counts(values, election)
        counts.tied = tied
        return counts

    return TensorAudit(check, opts.sign_cancel)


def ties_from_mergekit(r: ImportTables) -> ImportedValues:
    diffs: list[str] = []
    density = r.per_model["density"]
    diffs += count_report(r.names, r.tasks, topk_mismatch(r.numel, density), "mergekit max(1, ⌊d·n⌋)")
    refuse_l1_rescale(r, diffs)
    weight, options = inverse_consensus(r, np.ones_like(density), diffs)
    return ImportedValues("ties", weight, density, {"scope": "tensor", **MERGEKIT_RULES, **options}, diffs)


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
        audit=ties_audit,
    )

    def prepare(self, ctx: MergeContext) -> Prepared:
        opts: TiesOptions = ctx.options
        args = consensus_args(ctx, opts)
        args["threshold"], elements = trim_args(ctx, ctx.density, opts.scope, opts.tie_rule)
        static = {"disjoint": opts.disjoint, **consensus_static(ctx, opts.sign_cancel, ties_values, args, elements)}
        return Prepared(row_args=args, element_args=elements, static=static)

    def linear_in_weight(self, options: MethodOptions) -> bool:
        """Linear in λ when λ enters neither the election nor a denominator (AdaMerging's TIES variant)."""
        assert isinstance(options, ConsensusOptions)
        return options.weights == "after_election" and options.disjoint == "sum"


METHODS = [Ties]
