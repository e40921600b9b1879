"""RegMean (Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models", ICLR 2023).

For each linear layer, the merged weight minimises the distance between its outputs and every
expert's outputs on that expert's own inputs: with X_t the inputs the layer sees on task t's
training examples and G_t = X_tᵀ X_t their Gram matrix ([in, in]),

    W* = argmin_W Σ_t λ_t ‖X_t W − X_t W_t‖²  =  (Σ_t λ_t G̃_t)⁻¹ Σ_t λ_t G̃_t W_t       (W as [in, out]),

G̃ = α·G + (1 − α)·diag(G): the paper scales the off-diagonal entries by α (official code's
``reduce_non_diag``) because the plain solution is unstable; α = 1 is the exact least-squares
merge. λ_t (``weight``, default 1 = the paper) weighs task t's objective. Written relative to the
base, the merge needs only the task vectors: Δ = (Σ λ_t G̃_t)⁻¹ Σ λ_t G̃_t τ_t, since the base's part
cancels. Tensors without a Gram matrix (embeddings, norms, biases, heads) are averaged as in the
official code, weighted by λ: Δ = Σ λ_t τ_t / Σ λ_t.

The Gram matrices are data: ``mergetune grams CONFIG`` computes them once per expert on its task's
training split (its own inputs, padding excluded, summed over tokens and divided by the number of
sequences, as the official code does) and writes one safetensors file per task; the recipe names
them in ``options.grams`` so that it reproduces the weights. The solve runs in float64 (the
matrices are at most [in, in]): a Cholesky solve, or least squares where an input feature no
example uses leaves Σ λ G singular. A candidate costs one solve per matrix, O(in³ + in²·out).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import Field
from safetensors import safe_open

from mergetune.errors import RecipeError
from mergetune.merging.context import MergeContext
from mergetune.merging.mergekit_spec import MergekitRefusal
from mergetune.merging.methods.base import MethodOptions, TensorMethod, WarmStart
from mergetune.merging.modelset import ModelSet

#: What a Gram file says of each matrix: which dimension of the weight is the layer's input.
LAYOUT_KEY = "mergetune.regmean.layouts"  # JSON {tensor name: "out_in" (nn.Linear) | "in_out" (Conv1D)}


class RegMeanOptions(MethodOptions):
    grams: dict[str, str] = Field(
        default_factory=dict,
        description="Per task: the safetensors file of its expert's input Gram matrices (`mergetune grams`).",
    )
    alpha: float = Field(0.9, ge=0.0, le=1.0, description="Scale of the Grams' off-diagonal entries (1: exact).")


@dataclass(frozen=True)
class Grams:
    """Each task's Gram matrix per tensor (``[T, in, in]``, float64), and which weight dimension is the input."""

    matrices: dict[str, torch.Tensor]
    layouts: dict[str, str]


def read_grams(paths: dict[str, str], modelset: ModelSet) -> Grams:
    """The Gram files of every task of the model set; tensors some task lacks are not solved for."""
    missing = [t for t in modelset.task_names if t not in paths]
    if missing:
        raise RecipeError(
            f"regmean: options.grams names no Gram file for task(s) {missing}; compute them with `mergetune grams`"
        )
    per_task, layouts = [], {}
    for task in modelset.task_names:
        path = Path(paths[task])
        if not path.is_file():
            raise RecipeError(f"regmean: Gram file {path} of task '{task}' not found; run `mergetune grams` again")
        with safe_open(str(path), framework="pt") as f:
            layouts.update(json.loads((f.metadata() or {}).get(LAYOUT_KEY, "{}")))
            per_task.append({name: f.get_tensor(name) for name in f.keys()})  # noqa: SIM118 (safe_open has no iteration)
    shared = set.intersection(*(set(g) for g in per_task))
    matrices = {name: torch.stack([g[name].to(torch.float64) for g in per_task]) for name in sorted(shared)}
    return Grams(matrices, {name: layouts.get(name, "out_in") for name in matrices})


def reduce_off_diagonal(grams: torch.Tensor, alpha: float) -> torch.Tensor:
    """G̃ = α·G + (1 − α)·diag(G) for a stack ``[T, n, n]``."""
    diagonal = torch.diag_embed(torch.diagonal(grams, dim1=-2, dim2=-1))
    return alpha * grams + (1.0 - alpha) * diagonal


def regmean_delta(tau_in_out: torch.Tensor, grams: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Δ ``[in, out]`` = (Σ λ_t G_t)⁻¹ Σ λ_t G_t τ_t for ``tau_in_out`` ``[T, in, out]``, ``grams`` ``[T, in, in]``.

    Σ λ G is symmetric positive semi-definite: a Cholesky solve when it is definite, else least squares
    (an input feature no example uses leaves a zero row and column).
    """
    lam = weight.to(torch.float64).view(-1, 1, 1)
    lhs = (lam * grams).sum(0)
    rhs = (lam * (grams @ tau_in_out.to(torch.float64))).sum(0)
    factor, info = torch.linalg.cholesky_ex(lhs)
    if int(info) == 0:
        return torch.cholesky_solve(rhs, factor)
    return torch.linalg.lstsq(lhs, rhs, driver="gelsd" if lhs.device.type == "cpu" else None).solution


class RegMean(TensorMethod):
    name = "regmean"
    Options = RegMeanOptions
    citation = "Jin et al. 2023, Dataless Knowledge Fusion by Merging Weights of Language Models"
    needs_data = True
    search_weight = (0.5, 2.0)
    warm_start = WarmStart(weight=1.0, density=1.0)  # the paper: every task weighs the same
    mergekit = MergekitRefusal("RegMean solves each linear layer from the experts' input Grams; mergekit has none")

    def validate(self, ctx: MergeContext) -> None:
        if not ctx.options.grams:
            raise RecipeError("regmean needs options.grams, a Gram file per task: run `mergetune grams CONFIG`")
        if bool((ctx.weight <= 0).any()):
            raise RecipeError("regmean: weights must be positive (each weighs a task's least-squares objective)")

    def merge_tensor(self, ctx: MergeContext, segment_index: int) -> torch.Tensor:
        opts: RegMeanOptions = ctx.options
        ms: ModelSet = ctx.modelset
        seg = ms.segments[segment_index]
        weight = ctx.weight[:, ctx.groups.index(seg.name)].to(device=ms.device, dtype=torch.float32)  # [T]
        grams: Grams = ctx.stats.cached(
            f"regmean.grams:{json.dumps(opts.grams, sort_keys=True)}", lambda m: read_grams(opts.grams, m)
        )
        tau = ms.tau[:, seg.offset : seg.end].to(torch.float32)
        if seg.name not in grams.matrices or len(seg.shape) != 2:
            return ((weight.unsqueeze(1) * tau).sum(0) / weight.sum()).reshape(seg.shape)
        reduced = reduce_off_diagonal(grams.matrices[seg.name].to(ms.device), opts.alpha)
        mats = tau.reshape(ms.n_tasks, *seg.shape)
        if grams.layouts[seg.name] == "out_in":  # nn.Linear: weight [out, in], y = x Wᵀ
            return regmean_delta(mats.transpose(1, 2), reduced, weight).T.to(torch.float32).contiguous()
        return regmean_delta(mats, reduced, weight).to(torch.float32)


METHODS = [RegMean]
