"""SCE: Select, Calculate, Erase (Wan et al., "FuseChat: Knowledge Fusion of Chat Models", arXiv 2408.07990,
2024), as mergekit 0.1.5's ``sce`` runs it.

Per tensor, on the task vectors τ_t = θ_t − θ_0 (T tasks, n entries):

1. Select: keep the entries whose variance across tasks, v = Var_t(τ_t) (population variance), is among
   the k = ⌊select_topk · #{v ≠ 0}⌋ largest; τ̂_t = τ_t on them, 0 elsewhere (select_topk = 1: all).
2. Calculate: a coefficient per task and tensor from the selected vectors' mean square,
   η_t = mean(τ̂_t²) / Σ_s mean(τ̂_s²)   (1/T where that sum is below 1e-6, as mergekit does).
3. Erase: elect γ = +1 where Σ_t τ̂_t ≥ 0, else −1, and keep the entries that agree, m_t = [sign(τ̂_t) = γ].
4. Δ = Σ_t λ_t η_t m_t τ̂_t / max(Σ_t η_t m_t, 1e-6).

λ_t (per task and layer group) multiplies task t's contribution after the election; mergekit's ``sce`` has
no per-model weight, its merge is λ = 1 (the warm start) and other λ export only as an approximation.
``select_topk`` is one option for the whole model (mergekit's shared parameter; it is not per task: the
selection ranks entries across tasks). The k largest variances are taken with ``torch.topk``, as mergekit
does, so tied variances at the cut fall the same way on the same device.

Every step needs the whole tensor (the top-k, the mean squares), so SCE is a ``TensorMethod``; a
candidate costs one top-k per tensor.
"""

from __future__ import annotations

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
from mergetune.merging.methods.base import MethodOptions, TensorMethod, WarmStart

CALCULATE_FLOOR = 1e-6  # mergekit: below this sum of mean squares the coefficients are uniform
DIVISOR_FLOOR = 1e-6  # mergekit: the smallest divisor of the erased weighted sum


class SceOptions(MethodOptions):
    select_topk: float = Field(
        1.0, ge=0.0, le=1.0, description="Fraction of the entries of non-zero variance across tasks that is kept."
    )


def select(tau: torch.Tensor, select_topk: float) -> torch.Tensor:
    """Step 1 on ``[T, n]``: τ_t on the k entries of largest variance across tasks, 0 elsewhere."""
    if select_topk >= 1:
        return tau
    if select_topk <= 0:
        return torch.zeros_like(tau)
    variance = torch.var(tau, dim=0, unbiased=False)
    k = int(torch.count_nonzero(variance) * select_topk)
    mask = torch.zeros_like(variance)
    if k > 0:
        mask[torch.topk(variance.abs(), k=k, largest=True).indices] = 1
    return tau * mask


def coefficients(selected: torch.Tensor) -> torch.Tensor:
    """Step 2: η_t = mean(τ̂_t²) / Σ_s mean(τ̂_s²), uniform where that sum is below ``CALCULATE_FLOOR``."""
    mean_square = selected.square().mean(dim=1)
    total = mean_square.sum().item()
    if abs(total) < CALCULATE_FLOOR:
        return torch.ones_like(mean_square) / mean_square.shape[0]
    return mean_square / total


def sce_delta(tau: torch.Tensor, weight: torch.Tensor, select_topk: float) -> torch.Tensor:
    """Δ of one tensor's ``[T, n]`` float32 task vectors with λ ``[T]`` (steps 1-4)."""
    selected = select(tau, select_topk)
    elected = torch.where(selected.sum(dim=0) >= 0, 1.0, -1.0)
    erased = coefficients(selected).unsqueeze(1) * (selected.sign() == elected).to(selected.dtype)
    merged = (selected * erased * weight.unsqueeze(1)).sum(dim=0)
    return merged / erased.sum(dim=0).clamp(min=DIVISOR_FLOOR)


def sce_to_mergekit(t: ExportTables) -> Translation:
    tr = Translation("sce", {}, {"select_topk": t.options.select_topk})
    tr.differences = unit_weight_differences(t, "sce")
    return tr


def sce_from_mergekit(r: ImportTables) -> ImportedValues:
    diffs: list[str] = []
    options = {"select_topk": shared_scalar(r, "select_topk", diffs)}
    return ImportedValues("sce", ones_weight(r), None, options, diffs)


class Sce(TensorMethod):
    name = "sce"
    Options = SceOptions
    citation = "Wan et al. 2024, FuseChat: Knowledge Fusion of Chat Models (SCE)"
    search_weight = (0.5, 1.5)
    warm_start = WarmStart(weight=1.0, density=1.0)  # mergekit's defaults: λ = 1, select_topk = 1
    mergekit = MergekitSpec(
        "sce",
        EXACT,
        sce_to_mergekit,
        MergekitInverse(sce_from_mergekit, {"int8_mask": False, "select_topk": 1.0}, {}),
        heads_refusal=unweighted_heads_refusal("sce"),
    )

    def merge_tensor(self, ctx: MergeContext, segment_index: int) -> torch.Tensor:
        ms = ctx.modelset
        seg = ms.segments[segment_index]
        weight = ctx.weight[:, ctx.groups.index(seg.name)].to(device=ms.device, dtype=torch.float32)
        tau = ms.tau[:, seg.offset : seg.end].to(torch.float32)
        return sce_delta(tau, weight, ctx.options.select_topk).reshape(seg.shape)


METHODS = [Sce]
