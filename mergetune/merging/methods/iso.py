"""Iso-C and Iso-CTS (Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and
Task-Specific Subspaces", ICML 2025; official code: github.com/danielm1405/iso-merging,
``src/utils/iso.py``, functions ``iso_c`` and ``iso_cts``).

Both merge each 2-D weight matrix (the official code's rule: ``len(shape) == 2``) from the weighted
task vectors M_t = λ_t τ_t, with r = min(m, n):

- **Iso-C** (``iso_c``): the sum M = Σ_t M_t = U diag(S) Vᵀ (reduced SVD, all r triplets);
  its spectrum is made isotropic: ΔW = σ̄ U Vᵀ with σ̄ = mean(S).
- **Iso-CTS** (``iso_cts``): the common subspace is the top k left/right singular vectors of the
  sum M, k = r − T·n; each task keeps its top n directions outside it: the SVD of
  M_t − U_k U_kᵀ M_t (projection off the common left subspace) gives (u_t, s_t, v_t), of which the
  first n are kept. The k common and T·n task-specific triplets are stacked (tasks first, then
  the common ones, as the official code orders them), the stacked U (m × r) and V (r × n) are
  orthogonalised by their polar factors (for A = P Σ Qᵀ, A⊥ = P Qᵀ), and the stacked singular
  values are replaced by their mean: ΔW = σ̄ U⊥ V⊥ᵀ.
  Sizes, as the official code computes them: k₀ = ⌊r · common_space_fraction⌋, n = round((r − k₀)/T)
  (Python's round, half to even), k = r − T·n; n is capped at ⌊r/T⌋ so that k ≥ 0 (the official
  code would index out of range there). Where n = 0 (common_space_fraction = 1, or a split that
  rounds to nothing per task) the whole rank is common: that is Iso-C, and it is computed as Iso-C.

Every other tensor (1-D biases and norms, tensors of more than 2 dims) is averaged as the official
code does: Δ = Σ_t λ_t τ_t / T.

The paper's α, which multiplies the merged task vector (tuned on validation in 0.1–3.0), is λ: Iso
is homogeneous, Iso(λ M) = λ Iso(M) for any real λ (σ̄ scales with |λ|, the singular vectors with
its sign), so one λ for every task and group is exactly the paper's merge with α = λ. A λ per
layer group is an α per group. λ that differ between the tasks of a group weight the task vectors
before the SVD (a generalisation; the paper has one α): each such candidate costs one SVD (Iso-C)
or T + 3 SVDs (Iso-CTS) per matrix, whereas equal λ reuse the merge of the unweighted task
vectors, computed once per matrix and subspace split (``stats.cached``) and scaled by λ. Each
cached merge is the size of its matrix: a search over ``common_space_fraction`` holds one per
distinct split (k, n) it visits (shared with Iso-C where n = 0).

All SVDs run in float32 on the store's device, as TSV's do.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from mergetune.merging.context import MergeContext
from mergetune.merging.mergekit_spec import MergekitRefusal
from mergetune.merging.methods.base import MethodOptions, TensorMethod, WarmStart
from mergetune.merging.methods.tsv import polar
from mergetune.merging.modelset import ModelSet

CITATION = "Marczak et al. 2025, No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces"
ALPHA_GRID = (0.1, 3.0)  # the official code's α grid: linspace(0, 3, 31)[1:]
MERGEKIT_REFUSAL = MergekitRefusal(
    "mergekit 0.1.5 has no merge that replaces a matrix's singular values by their mean (an isotropic spectrum); "
    "its task_arithmetic keeps the spectrum of the sum that Iso-C and Iso-CTS flatten"
)


class IsoCtsOptions(MethodOptions):
    common_space_fraction: float = Field(
        0.8, ge=0.0, le=1.0, description="Share of each matrix's rank given to the common subspace (the paper's 0.8)."
    )


def isotropic_common(mats: torch.Tensor) -> torch.Tensor:
    """Iso-C of ``[T, m, n]`` weighted task matrices: mean(S) · U Vᵀ of their sum."""
    u, s, vh = torch.linalg.svd(mats.sum(0), full_matrices=False)
    return s.mean() * (u @ vh)


def subspace_sizes(rank: int, n_tasks: int, common_space_fraction: float) -> tuple[int, int]:
    """(k common directions, n directions per task) with k + T·n = rank, as the official code splits them."""
    common = int(rank * common_space_fraction)
    per_task = min(round((rank - common) / n_tasks), rank // n_tasks)
    return rank - n_tasks * per_task, per_task


def isotropic_merge(mats: torch.Tensor, common: int, per_task: int) -> torch.Tensor:
    """Iso-CTS of ``[T, m, n]`` weighted task matrices with ``common`` + T·``per_task`` = rank directions.

    Without task-specific directions the whole rank is common, which is Iso-C (computed as such).
    """
    if per_task == 0:
        return isotropic_common(mats)
    u, s, vh = torch.linalg.svd(mats.sum(0), full_matrices=False)
    common_u = u[:, :common]
    specific = mats - common_u @ (common_u.T @ mats)  # each task projected off the common left subspace
    u_t, s_t, vh_t = torch.linalg.svd(specific, full_matrices=False)
    stacked_u = torch.cat([*u_t[:, :, :per_task].unbind(0), common_u], dim=1)  # tasks first, as the official code
    stacked_s = torch.cat([*s_t[:, :per_task].unbind(0), s[:common]])
    stacked_vh = torch.cat([*vh_t[:, :per_task, :].unbind(0), vh[:common, :]], dim=0)
    return stacked_s.mean() * (polar(stacked_u) @ polar(stacked_vh))


class IsotropicMerge(TensorMethod):
    """Iso-C / Iso-CTS: one implementation; ``common_and_specific`` adds the task-specific subspaces."""

    common_and_specific: ClassVar[bool]
    search_weight = ALPHA_GRID
    mergekit = MERGEKIT_REFUSAL

    def split(self, shape: tuple[int, ...], n_tasks: int, options: MethodOptions) -> tuple[int, int]:
        """(common directions, directions per task) of a matrix: all common for Iso-C."""
        rank = min(shape)
        if not self.common_and_specific:
            return rank, 0
        return subspace_sizes(rank, n_tasks, options.common_space_fraction)  # type: ignore[attr-defined]

    def merge_tensor(self, ctx: MergeContext, segment_index: int) -> torch.Tensor:
        ms: ModelSet = ctx.modelset
        seg = ms.segments[segment_index]
        weight = ctx.weight[:, ctx.groups.index(seg.name)].to(device=ms.device, dtype=torch.float32)  # [T]
        tau = ms.tau[:, seg.offset : seg.end].to(torch.float32)
        if len(seg.shape) != 2:
            return ((weight.unsqueeze(1) * tau).sum(0) / ms.n_tasks).reshape(seg.shape)
        common, per_task = self.split(seg.shape, ms.n_tasks, ctx.options)
        if bool((weight == weight[0]).all()):  # one α: the unweighted merge, computed once, times α
            # keyed by the split, not the option: a searched fraction holds one entry per distinct split
            key = f"iso.delta:{common}:{per_task}:{segment_index}"
            unweighted = ctx.stats.cached(key, lambda m: unweighted_merge(m, segment_index, common, per_task))
            return (weight[0] * unweighted).reshape(seg.shape)
        return isotropic_merge((weight.unsqueeze(1) * tau).reshape(ms.n_tasks, *seg.shape), common, per_task)


def unweighted_merge(ms: ModelSet, segment_index: int, common: int, per_task: int) -> torch.Tensor:
    """The isotropic merge of one matrix's task vectors with λ = 1 (what a single α scales)."""
    seg = ms.segments[segment_index]
    with torch.no_grad():
        mats = ms.tau[:, seg.offset : seg.end].to(torch.float32).reshape(ms.n_tasks, *seg.shape)
        return isotropic_merge(mats, common, per_task)


class IsoC(IsotropicMerge):
    name = "iso_c"
    common_and_specific = False
    citation = CITATION
    warm_start = WarmStart(weight=1.0, density=1.0)  # α = 1: the sum's own mean singular value


class IsoCts(IsotropicMerge):
    name = "iso_cts"
    Options = IsoCtsOptions
    common_and_specific = True
    citation = CITATION
    warm_start = WarmStart(weight=1.0, density=1.0, options={"common_space_fraction": 0.8})


METHODS = [IsoC, IsoCts]
