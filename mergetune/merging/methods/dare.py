"""DARE (Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a
Free Lunch", ICML 2024, arXiv 2311.03099): Drop And REscale.

Per tensor, element-wise and i.i.d.: keep each entry of τ_t with probability d = density[t, g] and
divide the kept entries by d, so that E[τ̃_t] = τ_t:

    τ̃_t = m_t ⊙ τ_t / d,   m_t ~ Bernoulli(d)   (d = 0 gives τ̃_t = 0, no division).

Then merge the τ̃_t:

- ``dare_linear``: Task Arithmetic, Δ = Σ_t λ_t τ̃_t;
- ``dare_ties``: TIES on τ̃_t (see ``ties.py``): optional magnitude trim at ``trim_density``, sign
  election, disjoint merge, Δ = scale · τ_m.

Randomness: the mask is ``u < d`` with u from the counter-based hash ``ops.row_uniform`` keyed by
(recipe seed, tensor name, task) and indexed by the entry's position inside its tensor, so a
recipe gives the same mask on any device, backend or chunking. (The rescale is the paper's 1/d;
mergekit's ``rescale: true`` instead matches the L1 norm of the pruned tensor, a different rule.)

``skip_1d``: some implementations leave 1-D tensors (biases, norms) un-dropped; with
``skip_1d: true`` they are kept whole and not rescaled (their keep probability is set to 1).

The trim of ``dare_ties``: the official DARE code runs the official TIES (with its own magnitude
trim) after the drop; mergekit's ``dare_ties`` does no trim (``trim_density: 1.0``, the default).
Thresholds are precomputed order statistics and cannot depend on the random mask, so the trim ranks
the ORIGINAL magnitudes |τ_t| (scope ``scope``, ties kept) and keeps the surviving entries above the
threshold. Within a tensor every survivor is rescaled by the same 1/d, so the survivors keep the
original order of magnitudes, and the survivors of the original top ``trim_density`` are, in
expectation, the top ``trim_density`` of the survivors (same entries ranked first, expected count
trim_density·d·n): this equals trimming the survivors in expectation, up to the sampling noise of
how many entries survive (and exactly at ``trim_density`` 1, where nothing is trimmed).

Defaults of ``dare_ties`` follow the official TIES code, as the DARE code does (weights after the
election, dis-mean, global scope), so ``dare_ties`` at density 1 equals ``ties`` at density
``trim_density``. mergekit's ``dare_ties`` is ``weights: before_election``, ``disjoint: sum``,
``scope: tensor``, ``trim_density: 1.0`` (and its L1 rescale).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from mergetune.merging.context import MergeContext
from mergetune.merging.mergekit_spec import (
    IN_DISTRIBUTION,
    ExportTables,
    ImportedValues,
    ImportTables,
    MergekitInverse,
    MergekitSpec,
    Translation,
    cancel_note,
    consensus,
    gta_parameters,
    inverse_consensus,
    inverse_density,
    linear_weights,
    random_note,
    random_rescale,
)
from mergetune.merging.methods.base import ChunkMethod, MethodOptions, Prepared, WarmStart
from mergetune.merging.methods.ties import ConsensusOptions, consensus_args, consensus_static, sign_consensus
from mergetune.merging.ops import per_task, row_keep_bits, row_uniform, trim, weighted_task_sum
from mergetune.merging.stats import Scope

CITATION = "Yu et al. 2023, Language Models are Super Mario (DARE)"


class DareOptions(MethodOptions):
    skip_1d: bool = Field(False, description="Keep 1-D tensors (biases, norms) whole: no drop, no rescale.")


class DareTiesOptions(DareOptions, ConsensusOptions):
    trim_density: float = Field(1.0, ge=0.0, le=1.0, description="TIES trim after the drop (1 = no trim).")
    scope: Scope = Field(Scope.GLOBAL, description="Ranking scope of the trim (on the original |τ|).")


def drop_and_rescale(
    tau: torch.Tensor,
    keep_prob: torch.Tensor,
    key_lo: torch.Tensor,
    key_hi: torch.Tensor,
    row_offset: torch.Tensor,
) -> torch.Tensor:
    """τ̃ = 1[u < p] · τ / p, with p per row (``[T, R, 1]``); p = 0 keeps nothing (no division by 0)."""
    scaled = tau / torch.where(keep_prob > 0, keep_prob, 1.0)
    if scaled.dtype == torch.float32 and scaled.device.type == "cpu" and not torch.compiler.is_compiling():
        # eager CPU: the same bits as the select below, without a branch per entry (see ``row_keep_bits``)
        bits = row_keep_bits(key_lo, key_hi, row_offset, tau.shape[-1], keep_prob)
        return scaled.view(torch.int32).bitwise_and_(bits).view(torch.float32)
    keep = row_uniform(key_lo, key_hi, row_offset, tau.shape[-1]) < keep_prob
    return torch.where(keep, scaled, 0.0)  # a scalar 0: no zero-filled temporary


def dare_linear_kernel(
    tau: torch.Tensor,
    weight: torch.Tensor,
    keep_prob: torch.Tensor,
    key_lo: torch.Tensor,
    key_hi: torch.Tensor,
    row_offset: torch.Tensor,
) -> torch.Tensor:
    dropped = per_task(drop_and_rescale, tau.shape[0], tau, keep_prob, key_lo, key_hi, row_offset)
    return weighted_task_sum(dropped, weight)


def drop_then_trim(
    tau: torch.Tensor,
    keep_prob: torch.Tensor,
    key_lo: torch.Tensor,
    key_hi: torch.Tensor,
    row_offset: torch.Tensor,
    threshold: torch.Tensor,
    **_: Any,
) -> list[torch.Tensor]:
    """Per task, the dropped and rescaled τ̃_t, trimmed on the original magnitudes |τ_t|."""

    def one_task(t, p, lo, hi, off, thr):
        return trim(drop_and_rescale(t, p, lo, hi, off), thr, t.abs())

    return per_task(one_task, tau.shape[0], tau, keep_prob, key_lo, key_hi, row_offset, threshold)


def dare_ties_kernel(
    tau: torch.Tensor,
    weight: torch.Tensor,
    election_weight: torch.Tensor,
    threshold: torch.Tensor,
    scale: torch.Tensor,
    keep_prob: torch.Tensor,
    key_lo: torch.Tensor,
    key_hi: torch.Tensor,
    row_offset: torch.Tensor,
    disjoint: str,
    cancel: str = "entry_majority",
    majority: int = 0,
) -> torch.Tensor:
    trimmed = drop_then_trim(tau, keep_prob, key_lo, key_hi, row_offset, threshold)
    return sign_consensus(trimmed, weight, election_weight, disjoint, cancel, majority) * scale


def one_d_rows(ctx: MergeContext) -> torch.Tensor:
    """``[n_rows]`` bool: the row belongs to a tensor with fewer than 2 dimensions (bias, norm)."""

    def compute(ms) -> torch.Tensor:
        per_seg = torch.tensor([len(s.shape) < 2 for s in ms.segments], dtype=torch.bool, device=ms.device)
        return per_seg[ctx.rows.segment]

    return ctx.stats.cached("rows_1d", compute)


def dare_args(ctx: MergeContext, skip_1d: bool) -> dict[str, torch.Tensor]:
    """Per-row keep probability (1 on skipped 1-D tensors) and the random keys of each row."""
    keep_prob = ctx.per_row(ctx.density)
    if skip_1d:
        keep_prob = torch.where(one_d_rows(ctx).unsqueeze(0), torch.ones_like(keep_prob), keep_prob)
    return {"keep_prob": keep_prob, **ctx.random_keys()}


def dare_to_mergekit(t: ExportTables) -> Translation:
    """DARE keeps with probability d and mergetune divides by d: mergekit without rescale, weight λ/d."""
    opts: DareOptions = t.options
    density = t.density.copy()
    if opts.skip_1d:
        density[:, t.is_1d] = 1.0  # kept whole and not rescaled
    c = inverse_density(density)
    if isinstance(opts, DareTiesOptions):
        tr = consensus("dare_ties", t, density, c, opts.weights, opts.disjoint, opts.scale)
        if opts.trim_density < 1.0:
            tr.differences.insert(
                0,
                f"trim_density {opts.trim_density:g}: mergekit's dare_ties does not trim after the drop; "
                "set trim_density: 1 (mergekit's behaviour)",
            )
    else:
        tr = Translation("dare_linear", {"weight": t.weight * c, "density": density}, {"normalize": False})
    tr.shared["rescale"] = False
    tr.notes.append(random_note(t))
    tr.notes += cancel_note(getattr(opts, "sign_cancel", "plus_one"))
    return tr


def dare_from_mergekit(r: ImportTables) -> ImportedValues:
    """DARE; 1-D tensors kept whole (density 1) while the others are dropped is mergetune's ``skip_1d``."""
    diffs: list[str] = []
    density = r.per_model["density"]
    is_1d = r.is_1d
    skip_1d = bool(is_1d.any() and (density[:, is_1d] == 1).all() and (density[:, ~is_1d] < 1).any())
    options: dict[str, Any] = {"skip_1d": True} if skip_1d else {}
    use = ~is_1d if skip_1d else None
    c = random_rescale(r, density, diffs)
    if r.method == "dare_linear":
        weight = linear_weights(r, r.per_model["weight"]) / c  # normalize divides by the sum of mergekit's weights
        return ImportedValues("dare_linear", weight, density, options, diffs, use)
    weight, consensus_options = inverse_consensus(r, c, diffs)
    options = {"scope": "tensor", **options, **consensus_options, "sign_cancel": "plus_one"}
    return ImportedValues("dare_ties", weight, density, options, diffs, use)


def _dare_spec(method: str, normalize: bool) -> MergekitSpec:
    inverse = MergekitInverse(dare_from_mergekit, *gta_parameters(normalize=normalize, rescale=True))
    return MergekitSpec(method, IN_DISTRIBUTION, dare_to_mergekit, inverse)


class DareLinear(ChunkMethod):
    name = "dare_linear"
    Options = DareOptions
    uses_density = True
    random = True
    citation = CITATION
    kernel = staticmethod(dare_linear_kernel)
    search_weight = (0.0, 1.0)
    warm_start = WarmStart(weight=0.3, density=0.5)
    mergekit = _dare_spec("dare_linear", normalize=False)

    def prepare(self, ctx: MergeContext) -> Prepared:
        opts: DareOptions = ctx.options
        args = {"weight": ctx.per_row(ctx.weight), **dare_args(ctx, opts.skip_1d)}
        return Prepared(row_args=args)


class DareTies(ChunkMethod):
    name = "dare_ties"
    Options = DareTiesOptions
    uses_density = True
    random = True
    citation = CITATION
    kernel = staticmethod(dare_ties_kernel)
    search_weight = (0.2, 2.0)
    warm_start = WarmStart(weight=1.0, density=0.5)
    mergekit = _dare_spec("dare_ties", normalize=False)

    def prepare(self, ctx: MergeContext) -> Prepared:
        opts: DareTiesOptions = ctx.options
        args = {**consensus_args(ctx, opts), **dare_args(ctx, opts.skip_1d)}
        args["threshold"] = self._trim_threshold(ctx, opts)
        static = {"disjoint": opts.disjoint, **consensus_static(ctx, opts.sign_cancel, drop_then_trim, args, {})}
        return Prepared(row_args=args, static=static)

    @staticmethod
    def _trim_threshold(ctx: MergeContext, opts: DareTiesOptions) -> torch.Tensor:
        """Per-row |τ| threshold of the trim; 0 (keep all) at trim_density 1, without sorting anything."""
        if opts.trim_density >= 1.0:
            return torch.zeros(ctx.n_tasks, ctx.rows.n_rows, device=ctx.weight.device)
        return ctx.keep_threshold(torch.full_like(ctx.density, opts.trim_density), opts.scope)


METHODS = [DareLinear, DareTies]
