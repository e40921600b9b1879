"""RAM+ (Yuan et al., "Behavior Knowledge Merge in Reinforced Agentic Models", arXiv 2601.13572, 2026),
tensor-local, as mergekit 0.1.5's ``ramplus_tl`` runs it.

RAM (``ram.py``) averages the entries several tasks changed and keeps the unique ones whole. Averaging
still dilutes a task's update where it overlaps with others; RAM+ compensates by scaling up the task's
unique entries, the more so the larger its overlap. Per tensor and task ("tensor-local": counted within
each tensor, not over the whole model):

    s_t = #{entries with m_t and n > 1},   u_t = #{entries with m_t and n = 1}
    ρ_t = s_t / max(u_t, ε),   b_t = 1 + r · clamp(ρ_t, 0, α)

and Δ = Σ_t λ_t m_t (b_t τ_t where n = 1, τ_t / n where n > 1), the notation of ``ram.py``
(mergekit's defaults: r = 0.1, α = 0.2, ε = 1e-5). r = 0 is RAM.

The counts depend on the task vectors and ε only: computed once per ModelSet and ε (one pass over the
store, ``stats.cached``), then each candidate gathers b per row.
"""

from __future__ import annotations

import torch
from pydantic import Field

from mergetune.merging.context import MergeContext
from mergetune.merging.methods.base import ChunkMethod, Prepared, WarmStart
from mergetune.merging.methods.ram import CITATION, RamOptions, ram_args, ram_kernel, ram_spec
from mergetune.merging.modelset import ModelSet


class RamPlusOptions(RamOptions):
    # ρ divides by max(u, ε): ε = 0 would make it 0/0 for a task that changed nothing in a tensor
    epsilon: float = Field(1e-5, gt=0.0, description="A task changed an entry where |τ_t| > epsilon.")
    r: float = Field(0.1, ge=0.0, description="Strength of the rescaling of a task's unique entries.")
    alpha: float = Field(0.2, ge=0.0, description="Upper clamp of the overlap ratio ρ.")


def changed_counts(tau: torch.Tensor, epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per task (int64 ``[T]``): entries of one tensor's ``[T, n]`` task vectors it shares with another task, and
    those only it changed (mergekit's ``shared_counts`` and ``unique_counts``)."""
    changed = tau.abs() > epsilon
    count = changed.sum(dim=0, keepdim=True)
    return (changed & (count > 1)).sum(dim=1), (changed & (count == 1)).sum(dim=1)


def overlap_ratios(ms: ModelSet, epsilon: float) -> torch.Tensor:
    """``[T, n_segments]`` ρ = s / max(u, ε) of every tensor, as mergekit computes it (float32)."""
    ratios = []
    for seg in ms.segments:
        shared, unique = changed_counts(ms.tau[:, seg.offset : seg.end].to(torch.float32), epsilon)
        ratios.append((shared / unique.clamp(min=epsilon)).to(torch.float32))
    return torch.stack(ratios, dim=1)


def unique_boost(ctx: MergeContext, opts: RamPlusOptions) -> torch.Tensor:
    """``[T, n_rows]`` b = 1 + r · clamp(ρ, 0, α) of each row's tensor."""
    rho = ctx.stats.cached(f"ramplus_tl.rho:{opts.epsilon!r}", lambda ms: overlap_ratios(ms, opts.epsilon))
    boost = 1 + opts.r * rho.clamp(min=0, max=opts.alpha)
    return boost[:, ctx.rows.segment]


class RamPlusTl(ChunkMethod):
    name = "ramplus_tl"
    Options = RamPlusOptions
    citation = CITATION
    kernel = staticmethod(ram_kernel)
    search_weight = (0.5, 1.5)
    warm_start = WarmStart(weight=1.0, density=1.0)  # mergekit's defaults: λ = 1, r = 0.1, α = 0.2
    mergekit = ram_spec("ramplus_tl", {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5})

    def prepare(self, ctx: MergeContext) -> Prepared:
        return Prepared(row_args=ram_args(ctx, unique_boost(ctx, ctx.options)))


METHODS = [RamPlusTl]
