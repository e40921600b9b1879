"""``sort_select.first_k`` and ``stats.cut_order_scores``: the entries that torch's CPU sort puts first, without
sorting. The expectation is torch's own sort (what mergekit calls), on inputs that tie the way rounded weights do."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mergetune.merging import sort_select
from mergetune.merging.stats import cut_order_scores, sort_order_scores


def sorted_first(values: np.ndarray, k: int, descending: bool) -> np.ndarray:
    expected = np.zeros(values.shape[0], np.bool_)
    expected[torch.sort(torch.from_numpy(values), descending=descending).indices[:k].numpy()] = True
    return expected


def inputs(rng: np.random.Generator, n: int, kind: str) -> np.ndarray:
    if kind == "bf16-rounded":  # a task vector of rounded weights: few distinct magnitudes, many ties
        return torch.from_numpy(rng.normal(0, 1e-2, n).astype(np.float32)).to(torch.bfloat16).float().numpy()
    if kind == "few-values":
        return rng.integers(0, 4, n).astype(np.float32)
    if kind == "ascending-runs":
        return np.sort(rng.integers(0, 50, n)).astype(np.float32)
    if kind == "descending-runs":
        return np.sort(rng.integers(0, 50, n))[::-1].astype(np.float32)
    if kind == "constant":
        return np.full(n, 0.5, np.float32)
    return rng.random(n, dtype=np.float32)  # distinct values: no tie to cut


KINDS = ["bf16-rounded", "few-values", "ascending-runs", "descending-runs", "constant", "distinct"]


def test_this_torch_sorts_float32_by_the_introsort_that_first_k_follows() -> None:
    assert sort_select.sort_is_introsort()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("bisect_from", "kept"), [(1 << 30, 1 << 22), (64, 1000)], ids=["flatnonzero-int64", "block-bisection-int32"]
)
def test_first_k_keeps_the_entries_torch_sort_puts_first(kind: str, bisect_from: int, kept: int, monkeypatch) -> None:
    """Sizes around the insertion range and beyond, a sample of k from 0 to n, both directions; the partition
    point found from all stops or by bisection on block counts (small blocks: several per range); positions
    held as int64, or as int32 above ``KEPT_ENTRIES``."""
    monkeypatch.setattr(sort_select, "_BISECT_FROM", bisect_from)
    monkeypatch.setattr(sort_select, "_BLOCK", 64)
    monkeypatch.setattr(sort_select, "KEPT_ENTRIES", kept)
    rng = np.random.default_rng(sum(map(ord, kind)))
    for n in (1, 2, 16, 17, 18, 33, 257, 4099, 30_000):
        values = inputs(rng, n, kind)
        keep = np.empty(n, np.bool_)
        for k in {0, 1, n // 5, n // 2, n - 1, n, int(rng.integers(0, n + 1))}:
            for descending in (True, False):
                assert sort_select.first_k(values, k, descending, keep)
                np.testing.assert_array_equal(keep, sorted_first(values, k, descending), err_msg=f"n={n} k={k}")


def test_first_k_ranks_magnitudes_when_asked() -> None:
    rng = np.random.default_rng(3)
    tau = inputs(rng, 5000, "bf16-rounded")
    keep = np.empty(5000, np.bool_)
    assert sort_select.first_k(tau, 1000, True, keep, magnitude=True)
    np.testing.assert_array_equal(keep, sorted_first(np.abs(tau), 1000, True))
    assert (tau < 0).any()  # the magnitudes differ from the values


def test_where_introsort_would_heap_sort_first_k_declines_and_the_scores_fall_back_to_the_sort(monkeypatch) -> None:
    monkeypatch.setattr(sort_select, "depth_limit", lambda n: 1)  # a heap sort after one partition
    rng = np.random.default_rng(5)
    tau = torch.from_numpy(inputs(rng, 3 * 4000, "bf16-rounded")).view(3, 4000)
    assert not sort_select.first_k(tau[0].numpy(), 800, True, np.empty(4000, np.bool_))
    cut = torch.tensor([3200, 2000, 0])
    scores = cut_order_scores(tau, [cut], descending=True)
    ranks = sort_order_scores(tau.abs(), descending=True)
    assert torch.equal(scores >= cut[:, None], ranks >= cut[:, None])


@pytest.mark.parametrize("descending", [True, False])
@pytest.mark.parametrize("introsort", [True, False], ids=["selected", "sorted"])
def test_cut_order_scores_compare_with_their_cuts_like_the_ranks(
    descending: bool, introsort: bool, monkeypatch
) -> None:
    """Two cuts per task (Breadcrumbs' band), including the empty and the full selection."""
    monkeypatch.setattr(sort_select, "sort_is_introsort", lambda: introsort)
    rng = np.random.default_rng(11)
    n = 6000
    tau = torch.from_numpy(inputs(rng, 4 * n, "bf16-rounded")).view(4, n)
    lower, upper = torch.tensor([0, 1200, 3000, 5999]), torch.tensor([n, 4000, 3000, 6000])
    scores = cut_order_scores(tau, [lower, upper], descending)
    ranks = sort_order_scores(tau.abs(), descending)
    for cut in (lower, upper):
        assert torch.equal(scores >= cut[:, None], ranks >= cut[:, None])
    assert scores.dtype == torch.int32
