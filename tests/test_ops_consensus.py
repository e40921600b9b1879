"""The float-arithmetic sign consensus (ops.py) against the comparison form it replaced, bit for bit.

The reference below is the previous implementation (``torch.where`` on bool masks), written out here as
the independent expectation. Bits are compared as int32, so a −0 where +0 is due fails.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergetune.merging.methods.ties import ties_kernel
from mergetune.merging.ops import disjoint_merge, unmasked_merge

CANCEL = ["entry_majority", "model_majority", "plus_one"]
DISJOINT = ["mean", "sum", "weighted_mean"]


def reference_kernel(
    tau: torch.Tensor,
    weight: torch.Tensor,
    election_weight: torch.Tensor,
    threshold: torch.Tensor,
    scale: torch.Tensor,
    disjoint: str,
    cancel: str,
    majority: int,
) -> torch.Tensor:
    values = [torch.where(t.abs() >= thr, t, torch.zeros_like(t)) for t, thr in zip(tau, threshold, strict=True)]
    voted = [v * e for v, e in zip(values, election_weight, strict=True)]
    total = sum(voted[1:], voted[0])
    if cancel == "plus_one":
        gamma = torch.where(total < 0, -torch.ones_like(total), torch.ones_like(total))
    else:
        fallback = (
            torch.full_like(total, float(majority))
            if cancel == "model_majority"
            else torch.sign(sum([torch.sign(v) for v in voted[1:]], torch.sign(voted[0])))
        )
        gamma = torch.where(total != 0, torch.sign(total), fallback)
    masks = [(v * gamma) > 0 for v in voted]
    zero = torch.zeros_like(values[0])
    terms = [torch.where(m, v * w, zero) for v, w, m in zip(values, weight, masks, strict=True)]
    num = sum(terms[1:], terms[0])
    if disjoint == "sum":
        out = num
    elif disjoint == "mean":
        out = num / sum([m.float() for m in masks[1:]], masks[0].float()).clamp(min=1.0)
    else:
        dens = [torch.where(m, w.expand_as(v), zero) for v, w, m in zip(values, weight, masks, strict=True)]
        den = sum(dens[1:], dens[0])
        out = torch.where(den != 0, num / torch.where(den != 0, den, torch.ones_like(den)), zero)
    return out * scale


# few distinct magnitudes (bf16-like), exact zeros and signed zeros: ties at the cut and exact cancellations
entries = st.sampled_from([0.0, -0.0, 0.5, -0.5, 1.0, -1.0, 1.5, -1.5, 2.0, -2.0, 3e-39, -3e-39])
weights = st.sampled_from([0.0, -0.0, 0.5, 1.0, -1.0, 2.0, 1e-38])


@settings(max_examples=300, deadline=None)
@given(
    n_tasks=st.integers(1, 4),
    data=st.data(),
    disjoint=st.sampled_from(DISJOINT),
    cancel=st.sampled_from(CANCEL),
    majority=st.sampled_from([-1, 0, 1]),
    before=st.booleans(),
)
def test_consensus_matches_the_comparison_form_bit_for_bit(
    n_tasks: int, data: st.DataObject, disjoint: str, cancel: str, majority: int, before: bool
) -> None:
    rows, length = 3, 5
    tau = torch.tensor(data.draw(st.lists(entries, min_size=n_tasks * rows * length, max_size=n_tasks * rows * length)))
    tau = tau.view(n_tasks, rows, length)
    weight = torch.tensor(data.draw(st.lists(weights, min_size=n_tasks * rows, max_size=n_tasks * rows)))
    weight = weight.view(n_tasks, rows, 1)
    thr = data.draw(
        st.lists(st.sampled_from([0.0, 0.5, 1.0, 1.5, float("inf")]), min_size=n_tasks * rows, max_size=n_tasks * rows)
    )
    threshold = torch.tensor(thr).view(n_tasks, rows, 1)
    election = weight if before else torch.ones_like(weight)
    scale = torch.full((1, rows, 1), data.draw(st.sampled_from([1.0, 0.5, -1.0])))
    got = ties_kernel(tau, weight, election, threshold, scale, disjoint, cancel, majority)
    want = reference_kernel(tau, weight, election, threshold, scale, disjoint, cancel, majority)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32)), (got, want)


def test_a_masked_out_negative_term_leaves_plus_zero() -> None:
    """The case the zero-sign fix exists for: every agreeing term is −0, a masked-out one is negative."""
    tau = torch.tensor([[[-1.0]], [[1.0]], [[1.0]]])  # task 0 disagrees with γ = +1
    weight = torch.tensor([[[1.0]], [[0.0]], [[0.0]]])  # agreeing terms 1·0 = +0 ... and a −0 from task 0's mask
    ones = torch.ones_like(weight)
    thr, scale = torch.zeros_like(weight), torch.ones(1, 1, 1)
    for disjoint in DISJOINT:
        got = ties_kernel(tau, weight, ones, thr, scale, disjoint)
        want = reference_kernel(tau, weight, ones, thr, scale, disjoint, "entry_majority", 0)
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), disjoint


@settings(max_examples=200, deadline=None)
@given(n_tasks=st.integers(1, 4), data=st.data(), disjoint=st.sampled_from(DISJOINT))
def test_unmasked_merge_is_the_all_agreeing_disjoint_merge_bit_for_bit(
    n_tasks: int, data: st.DataObject, disjoint: str
) -> None:
    """DELLA without election: the mask-free merge against the comparison form with every mask True."""
    rows, length = 3, 5
    tau = torch.tensor(data.draw(st.lists(entries, min_size=n_tasks * rows * length, max_size=n_tasks * rows * length)))
    values = list(tau.view(n_tasks, rows, length))
    weight = list(
        torch.tensor(data.draw(st.lists(weights, min_size=n_tasks * rows, max_size=n_tasks * rows))).view(
            n_tasks, rows, 1
        )
    )
    zero = torch.zeros_like(values[0])
    num = sum([v * w for v, w in zip(values[1:], weight[1:], strict=True)], values[0] * weight[0])
    if disjoint == "sum":
        want = num
    elif disjoint == "mean":
        want = num / torch.full_like(num, float(n_tasks))
    else:
        den = sum([w.expand_as(v) for v, w in zip(values[1:], weight[1:], strict=True)], weight[0].expand_as(values[0]))
        want = torch.where(den != 0, num / torch.where(den != 0, den, torch.ones_like(den)), zero)
    got = unmasked_merge(values, weight, disjoint)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32)), (got, want)
    every = [torch.ones_like(v) for v in values]
    assert torch.equal(got.view(torch.int32), disjoint_merge(values, weight, every, disjoint).view(torch.int32))
