"""TSV-Merge (Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging", CVPR 2025).

Per 2-D weight (tensors with more than 2 dims are reshaped to ``(shape[0], -1)``):

1. SVD each task vector, τ_t = U_t diag(S_t) V_tᵀ, and keep its top k singular triplets, with
   k = max(1, ⌊min(m, n) · rank_fraction / T⌋) (``rank_fraction = 1`` is the paper's ⌊rank/T⌋);
2. concatenate U = [U_1 … U_T] (m × Tk), S = [S_1 … S_T], V = [V_1 … V_T] (n × Tk);
3. orthogonalise each concatenation by its polar factor: for M = P Σ Qᵀ, M⊥ = P Qᵀ;
4. ΔW = U⊥ diag(λ ⊙ S) V⊥ᵀ, where λ repeats each task's weight λ_t = weight[t, group] over its k
   singular values (with one λ = 1 for all tasks this is the paper's merge).

1-D and 0-D tensors are averaged: Δ = Σ_t λ_t τ_t / T (the official code takes the plain mean).
Δ = scale · ΔW, ``scale`` being the paper's α (tuned in 0.1–3.0).

Everything but λ depends on the task vectors only: U⊥ diag(S) and V⊥ᵀ are computed once per
``rank_fraction`` and tensor (``stats.cached``, one entry per tensor, so the naive baseline
recomputes one tensor's SVDs per call, not the whole model's), and a candidate costs one matmul
per matrix. All SVDs run in float32 on the store's device, whatever the tensor size (one rule, so
precision does not change with shape); the factors are cached in float32.

Where T·k > min(m, n) (tiny matrices, or T larger than the rank), the concatenations cannot have
orthonormal columns; the polar factor is still the closest matrix with orthonormal rows/columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pydantic import Field

from mergetune.merging.context import MergeContext
from mergetune.merging.mergekit_spec import APPROXIMATE, ExportTables, MergekitSpec, Translation
from mergetune.merging.methods.base import MethodOptions, TensorMethod, WarmStart
from mergetune.merging.modelset import ModelSet


class TsvOptions(MethodOptions):
    rank_fraction: float = Field(1.0, gt=0.0, le=1.0, description="Total kept rank as a fraction of min(m, n).")
    scale: float = Field(1.0, description="Multiplies the merged task vector (the paper's α).")


@dataclass(frozen=True)
class TsvFactors:
    """Candidate-independent factors of one matrix: ΔW = (us * λ_rep) @ vt."""

    us: torch.Tensor  # [m, T·k] U⊥ diag(S)
    vt: torch.Tensor  # [T·k, n] V⊥ᵀ
    k: int  # singular triplets kept per task


def kept_rank(rows: int, cols: int, n_tasks: int, rank_fraction: float) -> int:
    """k = max(1, ⌊min(m, n) · rank_fraction / T⌋) singular triplets per task."""
    return max(1, int(min(rows, cols) * rank_fraction / n_tasks + 1e-9))


def polar(m: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor P Qᵀ of M = P Σ Qᵀ (reduced SVD)."""
    p, _, qh = torch.linalg.svd(m, full_matrices=False)
    return p @ qh


def matrix_factors(mats: torch.Tensor, rank_fraction: float) -> TsvFactors:
    """TSV factors of ``[T, m, n]`` task matrices (float32)."""
    T, rows, cols = mats.shape
    k = kept_rank(rows, cols, T, rank_fraction)
    u, s, vh = torch.linalg.svd(mats.to(torch.float32), full_matrices=False)
    u_cat = u[:, :, :k].permute(1, 0, 2).reshape(rows, T * k)  # task blocks side by side
    s_cat = s[:, :k].reshape(T * k)
    vh_cat = vh[:, :k, :].reshape(T * k, cols)  # task blocks stacked
    u_orth = polar(u_cat)
    vt_orth = polar(vh_cat.T).T
    return TsvFactors(us=u_orth * s_cat, vt=vt_orth.contiguous(), k=k)


def segment_factors(ms: ModelSet, segment_index: int, rank_fraction: float) -> TsvFactors | None:
    """Factors of one tensor of at least 2 dims; None for 0-D/1-D tensors (they are averaged)."""
    seg = ms.segments[segment_index]
    if len(seg.shape) < 2:
        return None
    with torch.no_grad():
        mats = ms.tau[:, seg.offset : seg.end].reshape(ms.n_tasks, seg.shape[0], -1)
        return matrix_factors(mats, rank_fraction)


def tsv_to_mergekit(t: ExportTables) -> Translation:
    """No mergekit equivalent: the closest is Task Arithmetic with TSV-M's weights (1-D tensors averaged)."""
    opts: TsvOptions = t.options
    weight = t.weight * opts.scale
    weight[:, t.is_1d] /= len(t.tasks)  # TSV-M averages 1-D tensors
    tr = Translation("task_arithmetic", {"weight": weight}, {"normalize": False, "lambda": 1.0})
    tr.differences = [
        "TSV-M has no mergekit equivalent: its per-matrix SVD truncation (top rank/T singular triplets per task) "
        "and orthogonalisation are replaced by Task Arithmetic with weight λ·scale (λ·scale/T on 1-D tensors, "
        "which TSV-M averages)"
    ]
    return tr


class Tsv(TensorMethod):
    name = "tsv"
    Options = TsvOptions
    citation = "Gargiulo et al. 2025, Task Singular Vectors: Reducing Task Interference in Model Merging"
    search_weight = (0.1, 2.0)
    warm_start = WarmStart(weight=1.0, density=1.0)  # the paper's merge: λ = 1 (α = scale)
    mergekit = MergekitSpec("task_arithmetic", APPROXIMATE, tsv_to_mergekit)

    def merge_tensor(self, ctx: MergeContext, segment_index: int) -> torch.Tensor:
        opts: TsvOptions = ctx.options
        ms: ModelSet = ctx.modelset
        seg = ms.segments[segment_index]
        weight = ctx.weight[:, ctx.groups.index(seg.name)].to(device=ms.device, dtype=torch.float32)  # [T]
        factors = ctx.stats.cached(
            f"tsv.factors:{opts.rank_fraction!r}:{segment_index}",
            lambda m: segment_factors(m, segment_index, opts.rank_fraction),
        )
        if factors is None:
            tau = ms.tau[:, seg.offset : seg.end].to(torch.float32)
            delta = (weight.unsqueeze(1) * tau).sum(0) / ms.n_tasks
        else:
            lam = weight.repeat_interleave(factors.k)  # [T·k]
            delta = (factors.us * lam) @ factors.vt
        return (opts.scale * delta).reshape(seg.shape)


METHODS = [Tsv]
