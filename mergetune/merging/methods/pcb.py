"""PCB-Merging (Du et al., "Parameter Competition Balancing for Model Merging", NeurIPS 2024).

On the T × D task vectors, within a ranking scope (``global``: the whole model flattened per task,
as in the official code; or ``tensor``):

1. Clip: per task, clip |τ_t| to its [q, 1 − q] magnitude quantiles, keeping signs -> τ̄_t.
2. Intra-balancing: β_intra,t = exp(T · m_t²) with m_t = minmax(|τ̄_t|) over the scope.
3. Inter-balancing: ``product`` (official NLP code) β_inter,t = tanh(τ_t ⊙ Σ_j τ_j), or ``es``
   (official vision-ES code) β_inter,t = Σ_j tanh(τ̂_t ⊙ τ̂_j) with τ̂ = sign(τ) · m.
4. β_t = β_intra,t ⊙ β_inter,t. Drop: entries below the (1 − r) quantile thr of β_t are set to
   it, then β_t is min-max normalised: β'_t = (β_t − thr) / (max β_t − thr) where β_t > thr, else 0.
5. τ_m = Σ_t β'_t ⊙ λ_t τ̄_t / max(Σ_t β'_t, 1e-12); Δ = scale · τ_m.

The candidate only sets r = density[t, g] and λ_t = weight[t, g]: β, the clip bounds (|τ|'s order
statistics) and β's bucket counts are candidate-independent and computed once (``stats.scores`` /
``kth_largest``); a candidate costs its drop thresholds and one streaming merge pass.
τ̄ is rebuilt in the kernel from per-row clip bounds, so no clipped copy of the task vectors is stored.

β's precision follows the store's (``score_dtype``): computed in float32, it is kept in float32 beside a
float32 store and rounded to bfloat16 beside a 16-bit one, whose task vectors were rounded likewise. A
float32 β cost twice the store's bytes beside a bf16 store, read once more per candidate to resolve the cut
(a float32 bucket holds many values): 7.7× Task Arithmetic per candidate at 0.5 B. A bfloat16 β holds one
value per bucket, so each threshold is a lookup in the counts, and a candidate reads β's bytes once, as
many as the task vectors'. What it changes: the drop threshold ranks β to bfloat16's 8 significant bits
(entries whose β rounds to the threshold's value are dropped with it, as ties are) and the weights β' move
by at most bfloat16's relative rounding (2⁻⁹); the README reports the effect on a merge.

Order-statistic conventions (n = entries in the block; the official code indexes an ascending
sort at ``int(n·q)`` and ``int(n·(1−q) − 1)`` for the clip, ``int(n·(1−r))`` for the drop):

- clip: lo = the (⌊q·n⌋ + 1)-th smallest |τ_t|, hi = the (⌈q·n⌉ + 1)-th largest (the ⌈q·n⌉
  largest magnitudes are clipped down to it). This is the official pair of indices up to float
  rounding; on a small block (q·n < 1) it still clips the single largest magnitude, like the code.
- drop: thr = the (⌊r·n⌋ + 1)-th largest β_t (capped at the n-th, the minimum), and only entries
  strictly above thr are kept: ⌊r·n⌋ entries without ties (the density convention of ``stats.py``);
  r = 1 keeps all but the minimum (the official quantile at 0); r = 0 keeps nothing. The official
  code keeps ⌈r·n⌉ − 1 entries (one fewer when r·n is an integer).
- min-max guards: hi == lo gives m = 0; max == thr gives β' = 0 (the official code divides by 0).

Numerics: β_intra is computed as exp(T · (m² − 1)), i.e. divided by the constant e^T. Step 4 is
invariant to a positive per-task constant, so the merge is unchanged, and β cannot overflow
float32 for large T (exp(T) does for T ≥ 89).

Memory: each (scope, inter, q) combination caches β ``[T, D]`` in ``score_dtype`` (thresholds: bucket counts,
``stats``).

The paper's PCB+ES searches per-task λ_t with Nevergrad; the released NLP code computes that
objective on the test split, which mergetune never does (its searches use validation splits only).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from mergetune.merging.context import MergeContext
from mergetune.merging.mergekit_spec import APPROXIMATE, ExportTables, MergekitSpec, Translation, consensus, values_text
from mergetune.merging.methods.base import ChunkMethod, MethodOptions, Prepared, WarmStart
from mergetune.merging.modelset import ModelSet
from mergetune.merging.ops import per_task, task_sum
from mergetune.merging.shared_scores import Allocate
from mergetune.merging.stats import OrderStatistics, RowLayout, Scope, keep_counts
from mergetune.parallel import map_on_threads, torch_threads

Inter = Literal["product", "es"]
# Entries per slice when computing β: on CPU each [T, slice] float32 temporary stays in cache and is recycled
# (PCB's whole setup on a 44 M-entry bf16 store: 0.67–0.82 s at 2¹⁶, 1.02 s at 2²²); an accelerator takes
# larger slices, since every op per slice is a kernel launch.
_CPU_SLICE, _SLICE = 1 << 16, 1 << 22


class PcbOptions(MethodOptions):
    scope: Literal["global", "tensor"] = Field("global", description="Ranking scope: whole model (official) or tensor.")
    clip_quantile: float = Field(1e-4, ge=0.0, lt=0.5, description="q: clip |τ| to its [q, 1-q] quantiles.")
    inter: Inter = Field("product", description="Inter-balancing: tanh(τ_t ⊙ Σ_j τ_j) or the vision-ES sum.")
    scale: float = Field(1.0, description="Multiplies the merged task vector (the paper's λ).")


# ---- candidate-independent precomputation --------------------------------------------------------
def clip_ranks(n: int, q: float) -> tuple[int, int]:
    """1-based ascending ranks (k_lo, k_hi) of the clip bounds in a block of n magnitudes."""
    k_lo = math.floor(q * n + 1e-9) + 1
    n_clipped_top = math.ceil(q * n - 1e-9) if q > 0 else 0
    k_hi = max(n - n_clipped_top, k_lo)
    return min(k_lo, n), min(k_hi, n)


def clip_bounds(stats: OrderStatistics, rows: RowLayout, scope: Scope, q: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-segment clip bounds (lo, hi) of |τ_t|, each ``[T, n_segments]`` (repeated for global scope).

    Read from the |τ| order statistics (``stats.kth_largest``, shared with TIES' thresholds): exact, with
    no copy or selection of a whole block (``kthvalue`` copied each block once per task and bound)."""
    ms = stats.modelset
    n_seg = len(ms.segments)
    lengths = [ms.numel if scope is Scope.GLOBAL else s.numel for s in ms.segments]
    ranks = [clip_ranks(n, q) for n in lengths]
    first_row = torch.searchsorted(rows.segment, torch.arange(n_seg, device=rows.segment.device))

    def kth_smallest(rank_of_segment: list[int]) -> torch.Tensor:
        largest = torch.tensor([n - k + 1 for n, k in zip(lengths, rank_of_segment, strict=True)])
        k = largest.to(rows.segment.device)[rows.segment].expand(ms.n_tasks, -1)
        return stats.kth_largest("abs", scope, k)[:, first_row]

    # float32: a 16-bit store's order statistics come in its dtype, and hi − lo and its inverse computed in
    # bfloat16 moved m (and β) by up to 2⁻⁹ relative to the float32 store's on the same values
    lo, hi = (kth_smallest([r[i] for r in ranks]).to(torch.float32) for i in (0, 1))
    return lo, hi


def normalized_magnitude(tau: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """m = minmax(|τ̄|) = (clamp(|τ|, lo, hi) − lo) / (hi − lo); 0 where hi == lo."""
    span = hi - lo
    inv = torch.where(span > 0, 1.0 / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(span))
    m = tau.abs()  # a new tensor: the rest works in place on it (each temporary is a pass over memory)
    torch.maximum(m, lo, out=m)
    torch.minimum(m, hi, out=m)
    return m.sub_(lo).mul_(inv)


def balancing_scores(tau: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, inter: str) -> torch.Tensor:
    """β = β_intra ⊙ β_inter for a slice ``[T, n]`` of the task vectors (bounds ``[T, 1]``); ``tau`` is not changed."""
    T = tau.shape[0]
    m = normalized_magnitude(tau, lo, hi)
    if inter == "product":
        cross = torch.mul(tau, tau.sum(0, keepdim=True)).tanh_()
    else:
        signed = torch.sign(tau) * m
        cross = torch.stack([torch.tanh(signed[t] * signed).sum(0) for t in range(T)])
    intra = m.mul_(m).sub_(1.0).mul_(T).exp_()  # exp(T·(m² − 1)) = exp(T·m²) / e^T: same merge, no overflow
    return intra.mul_(cross)


def _slices(ms: ModelSet) -> Iterator[tuple[int, int, int]]:
    """(segment index, start, stop) slices of at most ``_CPU_SLICE`` (CPU) or ``_SLICE`` entries, never across
    tensors."""
    step = _CPU_SLICE if ms.device.type == "cpu" else _SLICE
    for i, seg in enumerate(ms.segments):
        for a in range(seg.offset, seg.end, step):
            yield i, a, min(seg.end, a + step)


def score_dtype(storage: torch.dtype) -> torch.dtype:
    """The dtype β is kept in: float32 beside a float32 store, bfloat16 beside a 16-bit one (float16 would
    flush the small β of large T, e^−T, to zero; bfloat16 has float32's range)."""
    return torch.float32 if storage == torch.float32 else torch.bfloat16


def compute_scores(
    ms: ModelSet, lo: torch.Tensor, hi: torch.Tensor, inter: str, allocate: Allocate | None = None
) -> torch.Tensor:
    """β for the whole store, ``[T, D]`` in ``score_dtype``, computed in float32 slice by slice into
    ``allocate(dtype)`` (default: ``ms.task_sized_buffer``)."""
    out = (allocate or ms.task_sized_buffer)(score_dtype(ms.storage_dtype))
    # Touch every page first, in one pass on torch's threads: faulting them in through the slices' writes (T rows
    # far apart, one thread) took 8.9 s of a 0.5 B store's 18.8 s; zero_() then the writes took 1.8 s.
    out.zero_()

    def fill(piece: tuple[int, int, int]) -> None:
        i, a, b = piece
        with torch.no_grad():
            out[:, a:b] = balancing_scores(ms.tau[:, a:b].to(torch.float32), lo[:, i : i + 1], hi[:, i : i + 1], inter)

    if ms.device.type != "cpu":
        for piece in _slices(ms):
            fill(piece)
        return out
    # CPU: the slices side by side on torch's threads, one each (element-wise work: the same bits on any number)
    with torch_threads(1) as workers:
        map_on_threads(fill, list(_slices(ms)), workers, "mergetune-beta")
    return out


# ---- kernel --------------------------------------------------------------------------------------
def pcb_kernel(
    tau: torch.Tensor,
    beta: torch.Tensor,
    weight: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    threshold: torch.Tensor,
    inv_range: torch.Tensor,
    scale: torch.Tensor,
) -> torch.Tensor:
    """Δ for a chunk: drop/min-max β, rebuild the clipped τ̄, β-weighted mean of λ_t τ̄_t."""
    T = tau.shape[0]
    kept = per_task(dropped_beta, T, beta, threshold, inv_range)
    clipped = per_task(clip_magnitude, T, tau, lo, hi)
    num = task_sum([k * w * c for k, w, c in zip(kept, weight.unbind(0), clipped, strict=True)])
    den = task_sum(kept).clamp(min=1e-12)
    return scale[0] * num / den


def dropped_beta(beta: torch.Tensor, threshold: torch.Tensor, inv_range: torch.Tensor) -> torch.Tensor:
    """β' = (β − thr)/(max − thr) above the threshold, 0 below (drop + min-max)."""
    return torch.where(beta > threshold, (beta - threshold) * inv_range, 0.0)


def clip_magnitude(tau: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """τ̄: |τ| clipped to [lo, hi], sign kept."""
    return torch.sign(tau) * torch.minimum(torch.maximum(tau.abs(), lo), hi)


def pcb_to_mergekit(t: ExportTables) -> Translation:
    """No mergekit equivalent: the closest is TIES (magnitude trim per tensor, election, weighted mean)."""
    opts: PcbOptions = t.options
    ones = np.ones_like(t.weight)
    tr = consensus("ties", t, t.density, ones, "before_election", "weighted_mean", opts.scale)
    kept = "/".join(values_text(t.density[:, t.merged]))
    tr.differences = [
        "PCB has no mergekit equivalent: its intra/inter balancing scores β, the clip of outliers and the "
        f"β-weighted merge are replaced by TIES (magnitude trim per tensor at density {kept}, "
        "sign election, weighted mean); expect different weights",
    ]
    return tr


class Pcb(ChunkMethod):
    name = "pcb"
    Options = PcbOptions
    uses_density = True
    citation = "Du et al. 2024, PCB-Merging: Parameter Competition Balancing for Model Merging"
    kernel = staticmethod(pcb_kernel)
    search_weight = (0.2, 2.0)
    warm_start = WarmStart(weight=1.0, density=0.2)
    mergekit = MergekitSpec("ties", APPROXIMATE, pcb_to_mergekit)

    def prepare(self, ctx: MergeContext) -> Prepared:
        opts: PcbOptions = ctx.options
        scope = Scope(opts.scope)
        lo_seg, hi_seg = ctx.stats.cached(
            f"pcb.clip:{scope.value}:{opts.clip_quantile!r}",
            lambda ms: clip_bounds(ctx.stats, ctx.rows, scope, opts.clip_quantile),
        )
        kind = f"pcb:{scope.value}:{opts.inter}:{opts.clip_quantile!r}"

        def compute(ms: ModelSet, allocate: Allocate) -> torch.Tensor:
            return compute_scores(ms, lo_seg, hi_seg, opts.inter, allocate)

        beta = ctx.stats.scores(kind, compute)
        threshold, top = self._thresholds(ctx, kind, scope, compute)
        span = top - threshold
        inv_range = torch.where(span > 0, 1.0 / torch.where(span > 0, span, torch.ones_like(span)), 0.0)
        weight = ctx.per_row(ctx.weight)
        row_args = {
            "weight": weight,
            "lo": lo_seg[:, ctx.rows.segment].to(torch.float32),
            "hi": hi_seg[:, ctx.rows.segment].to(torch.float32),
            "threshold": threshold.to(torch.float32),
            "inv_range": inv_range.to(torch.float32),
            "scale": torch.full((1, weight.shape[1]), float(opts.scale), device=weight.device),
        }
        return Prepared(row_args=row_args, element_args={"beta": beta})

    @staticmethod
    def _thresholds(ctx: MergeContext, kind: str, scope: Scope, compute) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row drop threshold (the (⌊r·n⌋+1)-th largest β, capped at n) and block maximum of β."""
        _, length = ctx.rows.blocks(scope, ctx.modelset)
        keep = keep_counts(ctx.density, length, ctx.rows.group)
        k = torch.minimum(keep + 1, length.unsqueeze(0).expand_as(keep))
        threshold = ctx.stats.kth_largest(kind, scope, k, compute)
        top = ctx.stats.kth_largest(kind, scope, torch.ones_like(k), compute)
        return threshold.to(torch.float32), top.to(torch.float32)  # exact; max − thr is then float32 arithmetic


METHODS = [Pcb]
