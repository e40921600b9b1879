"""What the model-space methods share: one tensor's base, task vectors and weights, and their checks.

Task-vector methods (TIES, DARE, ...) only need τ_t = θ_t − θ_0. mergekit's geometric methods
(SLERP, NuSLERP, Multi-SLERP, the Karcher mean, Model Stock, Arcee Fusion, NearSwap, linear,
passthrough) are defined on the models' weights themselves, so they read the base θ_0 next to the
task vectors and compute on θ_t = θ_0 + τ_t where their formula says so. They run one whole tensor
at a time (``TensorMethod``): norms, angles and quantiles are taken over a whole tensor (or its
rows or columns), as mergekit takes them.

Computation is in float32 whatever the storage dtype, as mergekit's ``dtype: float32`` computes.
Candidate-independent quantities (angles, Model Stock's ratio, Arcee Fusion's mask) are cached per
tensor in the layout's statistics (``ctx.stats.cached``): a candidate then costs one pass over the
tensor. ``to_vectors`` views a tensor as the vectors a method measures: the whole tensor, its
rows (the last dimension) or its columns (the first).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from mergetune.errors import RecipeError
from mergetune.merging.context import MergeContext
from mergetune.merging.modelset import ModelSet


@dataclass(frozen=True)
class TensorInputs:
    """One merged tensor: the base θ_0 ``[n]``, the task vectors τ ``[T, n]`` and the weights λ ``[T]`` (float32)."""

    shape: tuple[int, ...]
    base: torch.Tensor
    tau: torch.Tensor
    weight: torch.Tensor

    def experts(self) -> torch.Tensor:
        """The experts' own weights θ_t = θ_0 + τ_t, ``[T, n]``."""
        return self.base.unsqueeze(0) + self.tau


def tensor_inputs(ctx: MergeContext, segment_index: int) -> TensorInputs:
    ms: ModelSet = ctx.modelset
    seg = ms.segments[segment_index]
    weight = ctx.weight[:, ctx.groups.index(seg.name)].to(device=ms.device, dtype=torch.float32)
    base = ms.base_flat[seg.offset : seg.end].to(torch.float32)
    tau = ms.tau[:, seg.offset : seg.end].to(torch.float32)
    return TensorInputs(tuple(seg.shape), base, tau, weight)


def cached(ctx: MergeContext, key: str, segment_index: int, compute: Callable[[ModelSet], Any]) -> Any:
    """A candidate-independent quantity of one tensor, computed once per layout (see ``stats.cached``)."""
    return ctx.stats.cached(f"{key}:{segment_index}", compute)


def normalized_weights(ctx: MergeContext) -> torch.Tensor:
    """λ[t, g] / Σ_t λ[t, g]: the convex weights of a weighted mean, or a RecipeError naming the group."""
    total = ctx.weight.sum(0, keepdim=True)
    zero = (total == 0).squeeze(0)
    if bool(zero.any()):
        group = ctx.groups.names[int(zero.nonzero()[0])]
        raise RecipeError(
            f"the weights of layer group '{group}' sum to 0 and this method divides by their sum; give positive weights"
        )
    return ctx.weight / total


def require_nonnegative(ctx: MergeContext, method: str, what: str) -> None:
    """A RecipeError naming the task and group of the first negative λ (for λ read as a ratio or a scale)."""
    negative = ctx.weight < 0
    if bool(negative.any()):
        t, g = (int(i) for i in negative.nonzero()[0])
        raise RecipeError(
            f"{method}: task '{ctx.modelset.task_names[t]}', layer group '{ctx.groups.names[g]}': weight "
            f"{float(ctx.weight[t, g]):g} is negative; the weight is {what} and must be >= 0"
        )


def to_vectors(flat: torch.Tensor, shape: tuple[int, ...], layout: str) -> torch.Tensor:
    """``[..., n]`` values of a tensor of ``shape`` as ``[..., k, m]`` vectors: whole, rows or columns."""
    lead = flat.shape[:-1]
    if layout == "whole" or len(shape) < 2:
        return flat.reshape(*lead, 1, -1)
    if layout == "rows":
        return flat.reshape(*lead, -1, shape[-1])
    full = flat.reshape(*lead, *shape).transpose(len(lead), -1)  # dim 0 of the tensor becomes the last
    return full.reshape(*lead, -1, shape[0])


def from_vectors(vectors: torch.Tensor, shape: tuple[int, ...], layout: str) -> torch.Tensor:
    """The inverse of ``to_vectors`` for one tensor: ``[k, m]`` back to its flat ``[n]`` values."""
    if layout == "whole" or len(shape) < 2 or layout == "rows":
        return vectors.reshape(-1)
    swapped = (shape[-1], *shape[1:-1], shape[0])
    return vectors.reshape(swapped).transpose(0, -1).reshape(-1)
