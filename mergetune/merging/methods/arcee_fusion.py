"""Arcee Fusion (Arcee AI 2025, "Arcee Fusion" in mergekit; mergekit's ``arcee_fusion``).

Keeps only the expert's changes that matter, entry by entry: an entry's importance is how far it
moved times how much its row's output distribution moved,

    I = |θ_1 − θ_0| · KL(softmax(θ_1) + ε ‖ softmax(θ_0) + ε)   (softmax and KL over each row, ε = 1e-8),

and the entries at or above an outlier cut of the tensor's importances are taken from the expert:

    cut = Q_{0.5} + 1.5 (Q_{0.75} − Q_{0.25}),   θ = θ_0 + λ · [I ≥ cut] · τ_1,

Q_q being the sorted importances at index ⌊q (n − 1)⌋. λ (per layer group) scales the kept changes:
λ = 1 is mergekit's merge, λ = 0 the base. The mask does not depend on λ: it is computed once per
tensor. Defined on the base and exactly one expert. mergekit estimates the quantiles of a tensor of
more than 1,000,000 entries from a random sample of that many; mergetune sorts them all, so such
tensors export as approximate.
"""

from __future__ import annotations

import numpy as np
import torch

from mergetune.merging.context import MergeContext
from mergetune.merging.mergekit_spec import (
    EXACT,
    ExportTables,
    ImportedValues,
    ImportTables,
    MergekitInverse,
    MergekitSpec,
    Translation,
    groups_text,
    ones_weight,
    unit_weight_differences,
)
from mergetune.merging.methods.base import TensorMethod, WarmStart
from mergetune.merging.methods.model_space import TensorInputs, cached, tensor_inputs, to_vectors

KL_EPS = 1e-8
QUANTILES = (0.25, 0.5, 0.75)
MERGEKIT_SAMPLE = 1_000_000  # mergekit samples this many entries of a larger tensor for its quantiles


def importance(x: TensorInputs) -> torch.Tensor:
    """I per entry, ``[n]`` (see the module docstring)."""
    rows_new = to_vectors(x.experts()[0], x.shape, "rows")
    rows_old = to_vectors(x.base, x.shape, "rows")
    p = torch.softmax(rows_new, dim=-1) + KL_EPS
    q = torch.softmax(rows_old, dim=-1) + KL_EPS
    kl = (p * torch.log(p / q)).sum(-1, keepdim=True)
    return (to_vectors(x.tau[0].abs(), x.shape, "rows") * kl).reshape(-1)


def fusion_mask(x: TensorInputs) -> torch.Tensor:
    """The entries whose importance reaches the outlier cut (``[n]`` float32 0/1)."""
    scores = importance(x)
    ranked = torch.sort(scores).values
    # the indices as mergekit takes them: float32 fractions times (n − 1), truncated
    index = (torch.tensor(QUANTILES, dtype=torch.float32) * (ranked.numel() - 1)).long().to(ranked.device)
    q1, median, q3 = ranked[index]
    return (scores >= median + 1.5 * (q3 - q1)).to(torch.float32)


def arcee_fusion_to_mergekit(t: ExportTables) -> Translation:
    tr = Translation("arcee_fusion", {}, {})
    tr.differences = unit_weight_differences(t, "arcee_fusion")
    sampled = (t.numel > MERGEKIT_SAMPLE) & t.merged
    if sampled.any():
        tr.differences.append(
            f"tensors of more than {MERGEKIT_SAMPLE:,} entries in group(s) {groups_text(t, sampled)}: mergekit "
            "estimates their importance quantiles from a random sample, mergetune from every entry (the cut moves "
            "slightly)"
        )
    return tr


def arcee_fusion_from_mergekit(r: ImportTables) -> ImportedValues:
    diffs = []
    if (np.asarray(r.numel) > MERGEKIT_SAMPLE).any():
        diffs.append(
            f"tensors of more than {MERGEKIT_SAMPLE:,} entries: mergekit estimates their importance quantiles "
            "from a random sample, mergetune from every entry (the cut moves slightly)"
        )
    return ImportedValues("arcee_fusion", ones_weight(r), None, {}, diffs)


class ArceeFusion(TensorMethod):
    name = "arcee_fusion"
    citation = "Arcee AI 2025, Arcee Fusion (mergekit's arcee_fusion)"
    experts = (1, 1)  # the base and one other model
    may_keep_nothing = True  # no entry of a small tensor may reach the outlier cut
    search_weight = (0.5, 1.5)
    warm_start = WarmStart(weight=1.0, density=1.0)  # mergekit's merge
    mergekit = MergekitSpec(
        "arcee_fusion",
        EXACT,
        arcee_fusion_to_mergekit,
        MergekitInverse(arcee_fusion_from_mergekit, {}, {}),
        heads_refusal="exports to mergekit's arcee_fusion, which would fuse the task head {heads} that mergetune "
        "keeps per task; export models without their heads",
    )

    def merge_tensor(self, ctx: MergeContext, segment_index: int) -> torch.Tensor:
        x = tensor_inputs(ctx, segment_index)
        mask = cached(ctx, "arcee_fusion.mask", segment_index, lambda _: fusion_mask(x))
        return (x.weight[0] * mask * x.tau[0]).reshape(x.shape)


METHODS = [ArceeFusion]
