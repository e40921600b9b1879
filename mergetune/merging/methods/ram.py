"""RAM, Reinforced Agent Merging (Yuan et al., "Behavior Knowledge Merge in Reinforced Agentic Models",
arXiv 2601.13572, 2026), as mergekit 0.1.5's ``ram`` runs it.

RL fine-tuning changes few parameters, and different tasks change different ones: a plain average
divides the changes that only one task made by T. RAM splits each entry by how many tasks changed it,
averages the shared changes and keeps the unique ones whole:

    m_t = 1[|τ_t| > ε],   n = Σ_t m_t                       (ε: ``epsilon``, mergekit's 1e-5)
    Δ = Σ_t λ_t · m_t · (b_t τ_t  where n = 1,   τ_t / n  where n > 1)

with b_t = 1 (RAM). RAM+ (``ramplus_tl.py``) rescales the unique changes of each task by b_t ≥ 1.
Entries no task changed (n = 0) stay at the base.

λ_t (per task and layer group) multiplies task t's contribution; mergekit's ``ram`` has no per-model
weight, its merge is λ = 1 (the warm start) and other λ export only as an approximation. The test
|τ| > ε is made in float32 on the stored task vectors, as mergekit compares its float32 deltas.
"""

from __future__ import annotations

from functools import partial

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
    ones_weight,
    shared_scalar,
    unit_weight_differences,
    unweighted_heads_refusal,
)
from mergetune.merging.methods.base import ChunkMethod, MethodOptions, Prepared, WarmStart
from mergetune.merging.ops import task_sum

CITATION = "Yuan et al. 2026, Behavior Knowledge Merge in Reinforced Agentic Models (RAM)"


class RamOptions(MethodOptions):
    epsilon: float = Field(1e-5, ge=0.0, description="A task changed an entry where |τ_t| > epsilon.")


def ram_kernel(tau: torch.Tensor, weight: torch.Tensor, epsilon: torch.Tensor, boost: torch.Tensor) -> torch.Tensor:
    """Δ = Σ_t λ_t m_t (b_t τ_t where one task changed the entry, τ_t / n where n > 1 did); see the module doc."""
    changed = [t.abs() > epsilon for t in tau.unbind(0)]
    count = task_sum([m.to(tau.dtype) for m in changed])
    unique = count == 1
    zero = torch.zeros_like(tau[0])
    terms = [
        torch.where(m, torch.where(unique, t * b, t / count.clamp(min=1.0)) * w, zero)
        for t, m, w, b in zip(tau.unbind(0), changed, weight.unbind(0), boost.unbind(0), strict=True)
    ]
    return task_sum(terms)


def ram_args(ctx: MergeContext, boost: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-row λ and b (``[T, n_rows]``) and ε (``[1, n_rows]``)."""
    weight = ctx.per_row(ctx.weight)
    epsilon = torch.full((1, weight.shape[1]), float(ctx.options.epsilon), device=weight.device)
    return {"weight": weight, "epsilon": epsilon, "boost": boost}


def ram_to_mergekit(method: str, t: ExportTables) -> Translation:
    """mergekit's ``ram`` (or ``ramplus_tl``) reads only shared options, the recipe's: exact at λ = 1."""
    tr = Translation(method, {}, dict(t.options.model_dump()))
    tr.differences = unit_weight_differences(t, method)
    return tr


def ram_from_mergekit(r: ImportTables) -> ImportedValues:
    """λ = 1 and the shared options (``epsilon``; RAM+'s ``r`` and ``alpha``), one value for the whole model."""
    diffs: list[str] = []
    options = {param: shared_scalar(r, param, diffs) for param in r.shared}
    return ImportedValues(r.method, ones_weight(r), None, options, diffs)


def ram_spec(method: str, defaults: dict[str, float]) -> MergekitSpec:
    return MergekitSpec(
        method,
        EXACT,
        partial(ram_to_mergekit, method),
        MergekitInverse(ram_from_mergekit, defaults, {}),
        heads_refusal=unweighted_heads_refusal(method),
    )


class Ram(ChunkMethod):
    name = "ram"
    Options = RamOptions
    citation = CITATION
    kernel = staticmethod(ram_kernel)
    search_weight = (0.5, 1.5)
    warm_start = WarmStart(weight=1.0, density=1.0)  # the paper's (and mergekit's) merge: λ = 1
    mergekit = ram_spec("ram", {"epsilon": 1e-5})

    def prepare(self, ctx: MergeContext) -> Prepared:
        return Prepared(row_args=ram_args(ctx, torch.ones(ctx.n_tasks, ctx.rows.n_rows, device=ctx.weight.device)))


METHODS = [Ram]
