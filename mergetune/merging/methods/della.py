"""DELLA-Merging (Deep et al., "DELLA-Merging: Reducing Interference in Model Merging through
Magnitude-Based Sampling", arXiv 2406.11617): MagPrune, then sign election and a disjoint mean.

1. MagPrune, per row (a 1-D tensor is one row), per task: rank |τ_t| ascending and normalise the
   rank to [0, 1]; keep each entry with probability p = (d − ε) + 2ε·rank (d = density[t, g], so
   larger entries are kept more often and the mean keep rate is d) and divide each kept entry by
   its own p (E[τ̃_t] = τ_t).
2. Elect the sign as TIES does, γ = sign(Σ_t v_t), with v_t = λ_t τ̃_t (``weights:
   before_election``, default) or τ̃_t (``after_election``).
3. Δ = scale · Σ_t λ_t τ̃_t m_t / Σ_t λ_t m_t over the entries m_t that agree with γ (0 where none);
   ``disjoint`` (see ``ops.disjoint_merge``): ``weighted_mean`` (this, default), ``sum`` (no division,
   mergekit ``normalize: false``) or ``mean`` (divided by the number of agreeing tasks).

``sign_election: false`` skips step 2: every task's pruned vector counts (m_t = 1), so ``sum`` is a
Task Arithmetic of the τ̃_t, Δ = scale · Σ_t λ_t τ̃_t, ``weighted_mean`` divides it by Σ_t λ_t and
``mean`` by T. That is mergekit's ``della_linear`` (``normalize: false`` is ``sum``, ``normalize:
true`` the weighted mean), exported and imported under that name.

Rank normalisation: rank = r / (L − 1), with r the 0-based ascending rank in a row of L entries
(mergekit's (rank − min) / (max − min)); tied magnitudes share their average rank, so equal entries
get equal keep probabilities whatever their position; a 1-element row gets rank 0.5, i.e. p = d
(mergekit's formula is 0/0 there). The ranks do not depend on the candidate: they are computed once
per ModelSet as a ``[T, D]`` tensor in the store's dtype (``stats.scores("della_rank")``); the
keep test and the rescale use the same p, so E[τ̃_t] = τ_t holds whatever the rank's rounding.

Defaults follow mergekit's ``della`` (which the DELLA authors' code is built on): the weights
multiply the task vectors before the election and the merge is the weighted mean
(``normalize: true``); ``scale`` is mergekit's ``lambda``. Requires 0 < d − ε and d + ε ≤ 1 for
every task and layer group (so p is a probability and no entry is always dropped).
Randomness: ``u < p`` with u from ``ops.row_uniform`` (recipe seed, tensor name, task, position).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from pydantic import Field

from mergetune.errors import RecipeError
from mergetune.merging.context import MergeContext
from mergetune.merging.mergekit_spec import (
    IN_DISTRIBUTION,
    ExportTables,
    ImportedValues,
    ImportTables,
    MergekitInverse,
    MergekitSpec,
    MergekitUnsupported,
    Translation,
    cancel_note,
    consensus,
    flag,
    groups_text,
    gta_parameters,
    inverse_consensus,
    inverse_density,
    linear_weights,
    random_note,
    random_rescale,
    uniform_scalar,
    values_text,
)
from mergetune.merging.methods.base import ChunkMethod, MethodOptions, Prepared, WarmStart
from mergetune.merging.methods.ties import (
    Disjoint,
    SignCancel,
    WeightsAt,
    consensus_args,
    consensus_static,
    sign_consensus,
)
from mergetune.merging.modelset import ModelSet
from mergetune.merging.ops import per_task, row_uniform, unmasked_merge
from mergetune.merging.shared_scores import Allocate

RANK_KIND = "della_rank"
_RANK_CHUNK = 1 << 20  # entries ranked at a time (bounds the int64 temporaries)
_TOLERANCE = 1e-12  # so that d + ε = 1 written in decimals is accepted


class DellaOptions(MethodOptions):
    epsilon: float = Field(0.1, ge=0.0, le=0.5, description="Half-width of the keep probabilities around d.")
    scale: float = Field(1.0, description="Multiplies the merged task vector (mergekit's lambda).")
    weights: WeightsAt = "before_election"
    sign_cancel: SignCancel = Field("entry_majority", description="Elected sign where Σ_t v_t is exactly 0 (ties.py).")
    sign_election: bool = Field(
        True, description="Elect the sign and merge the agreeing entries; false: every task counts (della_linear)."
    )
    disjoint: Disjoint = Field(
        "weighted_mean", description="How the counted entries combine: weighted_mean, sum or mean (ops.py)."
    )


def normalised_rank(magnitude: torch.Tensor) -> torch.Tensor:
    """Ascending rank of each entry within its row (last dim), in [0, 1]; ties share their mean rank.

    rank = r / (L − 1) with r the 0-based rank; rows of one entry get 0.5.
    """
    L = magnitude.shape[-1]
    if L == 1:
        return torch.full_like(magnitude, 0.5)
    srt = magnitude.sort(dim=-1).values.contiguous()
    first = torch.searchsorted(srt, magnitude.contiguous(), right=False)
    past = torch.searchsorted(srt, magnitude.contiguous(), right=True)
    return ((first + past - 1).to(torch.float64) / (2 * (L - 1))).to(magnitude.dtype)


def della_ranks(ms: ModelSet, allocate: Allocate | None = None) -> torch.Tensor:
    """``[T, D]`` normalised ranks of |τ| within each row of each tensor (the store's layout), written into
    ``allocate(dtype)`` (default: ``ms.task_sized_buffer``)."""
    out = (allocate or ms.task_sized_buffer)(ms.tau.dtype)
    for seg in ms.segments:
        L = seg.row_length
        rows_per_chunk = max(1, _RANK_CHUNK // L)
        for r0 in range(0, seg.numel // L, rows_per_chunk):
            lo = seg.offset + r0 * L
            hi = min(seg.end, lo + rows_per_chunk * L)
            block = ms.tau[:, lo:hi].abs().view(ms.n_tasks, -1, L)
            out[:, lo:hi] = normalised_rank(block).view(ms.n_tasks, -1)
    return out


def della_kernel(
    tau: torch.Tensor,
    weight: torch.Tensor,
    election_weight: torch.Tensor,
    scale: torch.Tensor,
    p_low: torch.Tensor,
    p_width: torch.Tensor,
    rank: torch.Tensor,
    key_lo: torch.Tensor,
    key_hi: torch.Tensor,
    row_offset: torch.Tensor,
    disjoint: str = "weighted_mean",
    elect: bool = True,
    cancel: str = "entry_majority",
    majority: int = 0,
) -> torch.Tensor:
    pruned = della_values(tau, p_low, p_width, rank, key_lo, key_hi, row_offset)
    if elect:
        return sign_consensus(pruned, weight, election_weight, disjoint, cancel, majority) * scale
    return unmasked_merge(pruned, weight.unbind(0), disjoint) * scale


def della_values(
    tau: torch.Tensor,
    p_low: torch.Tensor,
    p_width: torch.Tensor,
    rank: torch.Tensor,
    key_lo: torch.Tensor,
    key_hi: torch.Tensor,
    row_offset: torch.Tensor,
    **_: Any,
) -> list[torch.Tensor]:
    """Per task, MagPrune's survivors, each divided by its keep probability."""
    return per_task(magprune, tau.shape[0], tau, p_low, p_width, rank, key_lo, key_hi, row_offset)


def magprune(
    tau: torch.Tensor,
    p_low: torch.Tensor,
    p_width: torch.Tensor,
    rank: torch.Tensor,
    key_lo: torch.Tensor,
    key_hi: torch.Tensor,
    row_offset: torch.Tensor,
) -> torch.Tensor:
    """One task's MagPrune: keep with p = p_low + p_width · rank, divide kept entries by their p."""
    p = p_low + p_width * rank
    keep = row_uniform(key_lo, key_hi, row_offset, tau.shape[-1]) < p
    return torch.where(keep, tau / torch.where(keep, p, 1.0), 0.0)


def della_to_mergekit(t: ExportTables) -> Translation:
    """Exact in distribution at epsilon 0 (keep probability d, divide by d); else mergekit's L1 rescale."""
    opts: DellaOptions = t.options
    _check_mergekit_range(t, opts.epsilon)
    exact = opts.epsilon == 0.0
    c = inverse_density(t.density) if exact else np.ones_like(t.density)
    if opts.sign_election:
        tr = consensus("della", t, t.density, c, opts.weights, opts.disjoint, opts.scale)
    else:  # Σ_t λ_t τ̃_t / divisor, the divisor folded into the weights (mergekit's normalize divides by Σ w)
        weight = t.weight * c / linear_divisor(t.weight, opts.disjoint)
        tr = Translation("della_linear", {"weight": weight, "density": t.density}, {"normalize": False})
        tr.shared["lambda"] = opts.scale
    tr.per_input["epsilon"] = np.full_like(t.weight, opts.epsilon)
    tr.shared["rescale"] = not exact
    if not exact:
        tr.differences.insert(
            0,
            "DELLA divides each kept entry by its own keep probability; mergekit's della rescales all kept "
            "entries of a tensor by one factor that restores its L1 norm (rescale: true): equal total magnitude, "
            "not entry by entry (exact in distribution only with epsilon: 0)",
        )
    tr.notes.append(random_note(t))
    if opts.sign_election:
        tr.notes += cancel_note(opts.sign_cancel)
    return tr


def linear_divisor(weight: np.ndarray, disjoint: str) -> np.ndarray:
    """``[N]`` what della without sign election divides Σ_t λ_t τ̃_t by (every task counts); 0/0 is 0."""
    if disjoint == "sum":
        return np.ones(weight.shape[1])
    if disjoint == "mean":
        return np.full(weight.shape[1], float(weight.shape[0]))
    total = weight.sum(axis=0)
    return np.where(total != 0, total, np.inf)  # Σ λ = 0: mergetune's weighted mean is 0, so every weight is 0


def _check_mergekit_range(t: ExportTables, epsilon: float) -> None:
    d = t.density
    bad = (d < 1) & (d > 0) & ((d + epsilon >= 1) | (d - epsilon <= 0))
    if bad.any():
        raise MergekitUnsupported(
            f"della: mergekit requires density ± epsilon strictly inside (0, 1); density "
            f"{values_text(d[bad])} with epsilon {epsilon:g} in group(s) {groups_text(t, bad.any(axis=0))} is not; "
            "lower epsilon or move the density"
        )


def della_from_mergekit(r: ImportTables) -> ImportedValues:
    """Exact in distribution only at epsilon 0 without rescale (keep with probability d, mergetune divides by d).

    ``della_linear`` is della without sign election: its weights, normalised by Σ w where ``normalize`` says
    so, are λ_t · c_t (before dividing by c, as mergekit divides by the sum of its own weights).
    """
    diffs: list[str] = []
    density = r.per_model["density"]
    epsilon = uniform_scalar(r.per_model["epsilon"], "epsilon", diffs)
    if epsilon == 0.0:
        c = random_rescale(r, density, diffs)
    else:
        c = np.ones_like(density)
        diffs.append(
            "della's rescale: true restores each tensor's L1 norm with one factor (rescale: false keeps the survivors "
            "unscaled); mergetune divides each kept entry by its own keep probability"
            if flag(r, "rescale", diffs)
            else "della with rescale: false keeps MagPrune's survivors unscaled; mergetune divides each by its p"
        )
    if r.method == "della_linear":
        weight = linear_weights(r, r.per_model["weight"]) / c
        options: dict[str, Any] = {"sign_election": False, "disjoint": "sum"}
    else:
        weight, options = inverse_consensus(r, c, diffs)
        options["sign_cancel"] = "plus_one"  # mergekit's election where the weighted sum cancels
    return ImportedValues("della", weight, density, {"epsilon": epsilon, **options}, diffs)


class Della(ChunkMethod):
    name = "della"
    Options = DellaOptions
    uses_density = True
    random = True
    citation = "Deep et al. 2024, DELLA-Merging"
    kernel = staticmethod(della_kernel)
    search_weight = (0.2, 1.5)
    search_density = (0.15, 0.85)  # inside (epsilon, 1 - epsilon) for the default epsilon
    warm_start = WarmStart(weight=1.0, density=0.5)
    mergekit = MergekitSpec(
        "della",
        IN_DISTRIBUTION,
        della_to_mergekit,
        MergekitInverse(della_from_mergekit, *gta_parameters(normalize=True, rescale=True, epsilon=0.15)),
        also_imports={
            "della_linear": MergekitInverse(
                della_from_mergekit, *gta_parameters(normalize=False, rescale=True, epsilon=0.15)
            )
        },
    )

    def validate(self, ctx: MergeContext) -> None:
        eps = ctx.options.epsilon
        bad = (ctx.density - eps <= 0) | (ctx.density + eps > 1 + _TOLERANCE)
        if bool(bad.any()):
            t, g = (int(i) for i in bad.nonzero()[0])
            d = float(ctx.density[t, g])
            raise RecipeError(
                f"della: task '{ctx.modelset.task_names[t]}', layer group '{ctx.groups.names[g]}': density {d:g} "
                f"with epsilon {eps:g} needs 0 < density - epsilon and density + epsilon <= 1; "
                "lower epsilon or move the density"
            )

    def prepare(self, ctx: MergeContext) -> Prepared:
        opts: DellaOptions = ctx.options
        args = consensus_args(ctx, opts)
        density = ctx.per_row(ctx.density)
        args["p_low"] = density - opts.epsilon
        args["p_width"] = torch.full_like(args["scale"], 2 * opts.epsilon)
        args.update(ctx.random_keys())
        elements = {"rank": ctx.stats.scores(RANK_KIND, della_ranks)}
        static: dict[str, Any] = {"disjoint": opts.disjoint, "elect": opts.sign_election}
        if opts.sign_election:
            static.update(consensus_static(ctx, opts.sign_cancel, della_values, args, elements))
        return Prepared(row_args=args, element_args=elements, static=static)


METHODS = [Della]
