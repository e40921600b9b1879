"""Exclusive knowledge of Twin-Merging (Lu et al., 2024): v_t = θ_t − θ*, compressed by truncated SVD.

For every merged tensor and task t, v_t = θ_t − θ* = τ_t − (θ* − θ_0), read from the ModelSet's
resident task vectors τ and the shared merge θ* (the engine's output).

- 2-D tensors (and tensors of more dims, seen as ``(shape[0], -1)``): v_t = U Σ Vᵀ (reduced SVD, one
  batched ``torch.linalg.svd`` over the T tasks, float32), truncated to r singular triplets and stored
  as ``us = U_r Σ_r`` (``[T, m, r]``) and ``vt = V_rᵀ`` (``[T, r, n]``), so v̂_t = us_t @ vt_t.
  r = max(1, ⌊rank_fraction · min(m, n)⌋), or ``rank`` capped at min(m, n).
  Reconstruction error per task, exact by Eckart–Young: ‖v_t − v̂_t‖_F / ‖v_t‖_F = √(Σ_{i>r} σ_i²) / √(Σ_i σ_i²).
- 1-D and 0-D tensors: kept dense (``[T, *shape]``, error 0) or dropped (``one_d: drop``, error 1).
- Tensors whose v_t is exactly zero for every task (e.g. word embeddings that no expert trained) carry no
  exclusive knowledge: they are not adapted at all.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from mergetune.merging.methods.twin import TwinOptions
from mergetune.merging.modelset import ModelSet

DENSE = "dense"
LOW_RANK = "low_rank"
DROPPED = "dropped"


@dataclass(frozen=True)
class ExclusiveTensor:
    """One tensor's exclusive knowledge for all T tasks: low-rank factors, or dense deltas."""

    name: str
    shape: tuple[int, ...]
    kind: str  # LOW_RANK, DENSE or DROPPED
    us: torch.Tensor | None = None  # [T, m, r]: U_r diag(σ_r)
    vt: torch.Tensor | None = None  # [T, r, n]: V_rᵀ
    dense: torch.Tensor | None = None  # [T, *shape]
    rel_error: tuple[float, ...] = ()  # per task: ‖v_t − v̂_t‖_F / ‖v_t‖_F (0 where v_t = 0)

    @property
    def rank(self) -> int:
        return 0 if self.vt is None else self.vt.shape[1]

    def reconstruct(self) -> torch.Tensor | None:
        """v̂ as ``[T, *shape]`` (None for a dropped tensor): what the routed model adds, weighted by w_t."""
        if self.kind == LOW_RANK:
            assert self.us is not None and self.vt is not None
            return (self.us @ self.vt).reshape(self.us.shape[0], *self.shape)
        return self.dense

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored factors by role (``us``, ``vt`` or ``dense``)."""
        roles = {"us": self.us, "vt": self.vt, "dense": self.dense}
        return {role: t for role, t in roles.items() if t is not None}


@dataclass(frozen=True)
class ExclusiveKnowledge:
    """Every adapted tensor's exclusive knowledge, in ModelSet segment order."""

    tasks: tuple[str, ...]
    tensors: dict[str, ExclusiveTensor]

    @property
    def adapted(self) -> dict[str, ExclusiveTensor]:
        """Tensors the routed model changes per input (low-rank or dense; not the dropped ones)."""
        return {n: t for n, t in self.tensors.items() if t.kind != DROPPED}

    def nbytes(self) -> int:
        return sum(x.numel() * x.element_size() for t in self.tensors.values() for x in t.tensors().values())

    def report(self) -> list[dict[str, object]]:
        """One row per tensor: shape, how it is kept, rank, and its reconstruction error (mean and max over tasks)."""
        return [
            {
                "tensor": t.name,
                "shape": list(t.shape),
                "kind": t.kind,
                "rank": t.rank,
                "mean_rel_error": sum(t.rel_error) / len(t.rel_error),
                "max_rel_error": max(t.rel_error),
            }
            for t in self.tensors.values()
        ]


def kept_rank(shape: Sequence[int], options: TwinOptions) -> int:
    """r = max(1, ⌊rank_fraction · min(m, n)⌋), or the fixed ``rank`` capped at min(m, n)."""
    full = min(shape[0], math.prod(shape[1:]))
    if options.rank is not None:
        return min(options.rank, full)
    return max(1, min(full, int(options.rank_fraction * full + 1e-9)))


def truncated_svd(v: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, tuple[float, ...]]:
    """Best rank-r factors of each ``v[t]`` (``[T, m, n]``): (us ``[T, m, r]``, vt ``[T, r, n]``, relative errors)."""
    u, s, vh = torch.linalg.svd(v.float(), full_matrices=False)
    energy = (s.double() ** 2).sum(-1)
    tail = (s[:, rank:].double() ** 2).sum(-1)
    errors = tuple(
        float(math.sqrt(t / e)) if e > 0 else 0.0 for t, e in zip(tail.tolist(), energy.tolist(), strict=True)
    )
    us = (u[:, :, :rank] * s[:, None, :rank]).contiguous()
    return us, vh[:, :rank, :].contiguous(), errors


def compress_tensor(name: str, v: torch.Tensor, options: TwinOptions) -> ExclusiveTensor | None:
    """One tensor's exclusive knowledge ``v`` (``[T, *shape]``) kept as the options say; None if it is all zero."""
    if not bool(v.any()):
        return None
    shape = tuple(v.shape[1:])
    n_tasks = v.shape[0]
    if len(shape) >= 2:
        rank = kept_rank(shape, options)
        us, vt, errors = truncated_svd(v.reshape(n_tasks, shape[0], -1), rank)
        return ExclusiveTensor(name, shape, LOW_RANK, us=us, vt=vt, rel_error=errors)
    if options.one_d == "drop":
        errors = tuple(1.0 if bool(v[t].any()) else 0.0 for t in range(n_tasks))
        return ExclusiveTensor(name, shape, DROPPED, rel_error=errors)
    return ExclusiveTensor(name, shape, DENSE, dense=v.float().clone(), rel_error=(0.0,) * n_tasks)


def exclusive_knowledge(
    modelset: ModelSet, shared: Mapping[str, torch.Tensor], options: TwinOptions
) -> ExclusiveKnowledge:
    """v_t = τ_t − (θ* − θ_0) for every merged tensor, compressed; ``shared`` maps tensor name -> θ*."""
    tensors: dict[str, ExclusiveTensor] = {}
    with torch.no_grad():
        for seg in modelset.segments:
            shift = shared[seg.name].reshape(-1).float() - modelset.base_flat[seg.offset : seg.end].float()
            v = modelset.tau[:, seg.offset : seg.end].float() - shift
            kept = compress_tensor(seg.name, v.reshape(modelset.n_tasks, *seg.shape), options)
            if kept is not None:
                tensors[seg.name] = kept
    return ExclusiveKnowledge(tuple(modelset.task_names), tensors)
