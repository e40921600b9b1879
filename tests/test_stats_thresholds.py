"""Exact top-k thresholds from bucket counts (``OrderStatistics``) against brute-force ``kthvalue``.

``NaiveStatistics`` runs ``torch.kthvalue`` on every block for every query and shares no code with
the bucket counts, so equality over random shapes, heavy ties, bucket-sharing near-equal values,
signed scores, bfloat16 stores and every density edge checks the counting, the lookups and the
selection pass. Memory is checked against the issue's budget (≤ 10% of the store for global and
tensor scope, ≤ 25% for row scope) and against an independent count of the structures kept.
"""

from __future__ import annotations

import math
from unittest.mock import patch

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mergetune.merging import stats
from mergetune.merging.modelset import ModelSet
from mergetune.merging.shared_scores import Allocate
from mergetune.merging.stats import (
    NaiveStatistics,
    OrderStatistics,
    Scope,
    build_row_layout,
    keep_counts,
    official_keep_counts,
)

shapes_st = st.lists(
    st.one_of(
        st.tuples(st.integers(1, 40)),
        st.tuples(st.integers(1, 6), st.integers(1, 24)),
    ),
    min_size=1,
    max_size=4,
)
# How entries take their magnitudes: few distinct levels (heavy ties), levels inside one 16-bit bucket
# (equal top bits, different values: the selection pass), a continuum, or all zero.
VALUE_KINDS = ["ties", "one_bucket", "continuous", "zeros"]


def make_values(shape: tuple[int, ...], kind: str, gen: torch.Generator) -> torch.Tensor:
    n = math.prod(shape)
    if kind == "zeros":
        return torch.zeros(shape)
    if kind == "continuous":
        return torch.randn(shape, generator=gen)
    if kind == "ties":
        levels = torch.tensor([0.0, 0.25, 0.5, 1.5, 3.0])
    else:  # 1 + j·2⁻²⁰: the same top 16 bits, distinct float32 values
        levels = 1.0 + torch.arange(6, dtype=torch.float32) * 2.0**-20
    picked = levels[torch.randint(0, levels.numel(), (n,), generator=gen)]
    sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    return (picked * sign).reshape(shape)


def make_modelset(shapes: list[tuple[int, ...]], kinds: list[str], n_tasks: int, seed: int, dtype: torch.dtype):
    """A real ModelSet whose task vectors are the drawn values (the base is zero)."""
    gen = torch.Generator().manual_seed(seed)
    names = [f"layers.{i}.w" for i in range(len(shapes))]
    base = {n: torch.zeros(s) for n, s in zip(names, shapes, strict=True)}
    experts = {
        f"t{t}": {
            n: make_values(s, kinds[(i + t) % len(kinds)], gen)
            for i, (n, s) in enumerate(zip(names, shapes, strict=True))
        }
        for t in range(n_tasks)
    }
    return ModelSet.load(base, experts, storage_dtype=dtype)


def density_table(draw_values: list[float], n_tasks: int, n_groups: int) -> torch.Tensor:
    cells = n_tasks * n_groups
    values = (draw_values * cells)[:cells]
    return torch.tensor(values, dtype=torch.float64).view(n_tasks, n_groups)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shapes=shapes_st,
    kinds=st.lists(st.sampled_from(VALUE_KINDS), min_size=1, max_size=3),
    n_tasks=st.integers(1, 3),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    densities=st.lists(
        st.one_of(
            st.sampled_from([0.0, 1.0, 1e-6, 0.5, 1 / 3, 0.999999]),
            st.floats(0.0, 1.0),
        ),
        min_size=1,
        max_size=6,
    ),
    scope=st.sampled_from(list(Scope)),
    grouping=st.sampled_from(["one", "each"]),
    chunk=st.sampled_from([stats.CHUNK, 7, 64]),
)
def test_thresholds_equal_kthvalue(shapes, kinds, n_tasks, seed, dtype, densities, scope, grouping, chunk):
    ms = make_modelset(shapes, kinds, n_tasks, seed, dtype)
    groups = [0] * len(shapes) if grouping == "one" else list(range(len(shapes)))
    rows = build_row_layout(ms, groups)
    density = density_table(densities, n_tasks, max(groups) + 1)
    _, length = rows.blocks(scope, ms)
    k_keep = keep_counts(density, length, rows.group)
    queries = {
        "keep_ties": k_keep,
        "official": official_keep_counts(density, length, rows.group),
        "pcb (k + 1)": torch.minimum(k_keep + 1, length.expand_as(k_keep)),
        "top": torch.ones_like(k_keep),
        "bottom": length.expand_as(k_keep).clone(),
    }
    naive = NaiveStatistics(ms, rows)
    with patch.object(stats, "CHUNK", chunk):  # several chunks per block: the pass must join them
        fast = OrderStatistics(ms, rows)
        for name, k in queries.items():
            got, want = fast.kth_largest("abs", scope, k), naive.kth_largest("abs", scope, k)
            assert got.dtype == want.dtype == dtype, name
            assert torch.equal(got, want), (name, k, got, want)


def signed_scores(ms: ModelSet, allocate: Allocate) -> torch.Tensor:
    """τ itself: negative scores, zeros of both signs (in the buffer the statistics give)."""
    return allocate(ms.tau.dtype).copy_(ms.tau)


@settings(max_examples=30, deadline=None)
@given(
    shapes=shapes_st,
    seed=st.integers(0, 2**16),
    density=st.floats(0.0, 1.0),
    scope=st.sampled_from(list(Scope)),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
)
def test_signed_scores_equal_kthvalue(shapes, seed, density, scope, dtype):
    """Scores of any sign order exactly (−0 and +0 compare equal, so either is the same threshold).

    −0 and the tiniest negatives (subnormals) share the top half of their bits but not their bucket:
    the selection pass must keep both apart."""
    ms = make_modelset(shapes, ["ties", "one_bucket", "continuous"], 2, seed, dtype)
    ms.tau[0, ::3] = -0.0
    ms.tau[1, ::4] = -torch.finfo(dtype).smallest_normal / 4  # a subnormal: top bits of −0, bucket below it
    ms.tau[1, 1::5] = -0.0
    rows = build_row_layout(ms, [0] * len(shapes))
    _, length = rows.blocks(scope, ms)
    k = keep_counts(torch.full((2, 1), density, dtype=torch.float64), length, rows.group)
    got = OrderStatistics(ms, rows).kth_largest("signed", scope, k, signed_scores)
    want = NaiveStatistics(ms, rows).kth_largest("signed", scope, k, signed_scores)
    assert torch.equal(got, want)


def test_ties_exactly_at_the_cut():
    """A block of 10 with magnitudes 5, 4, 4, 4, 4, 1, ...: k = 1..5 cut at 5 then inside the tie of 4s."""
    block = torch.tensor([[1.0, -4.0, 5.0, 4.0, 1.0, 1.0, -4.0, 4.0, 1.0, 1.0]])
    ms = ModelSet.load({"layers.0.w": torch.zeros(1, 10)}, {"a": {"layers.0.w": block}})
    rows = build_row_layout(ms, [0])
    expected = {0: math.inf, 1: 5.0, 2: 4.0, 5: 4.0, 6: 1.0, 10: 1.0}
    for scope in Scope:
        st_ = OrderStatistics(ms, rows)
        for k, want in expected.items():
            assert st_.kth_largest("abs", scope, torch.tensor([[k]])).item() == want, (scope, k)


def wide_modelset(dtype: torch.dtype = torch.float32) -> ModelSet:
    """Two tasks over three tensors of realistic row length, magnitudes rounded to bfloat16 (ties)."""
    gen = torch.Generator().manual_seed(0)
    shapes = {"layers.0.w": (512, 512), "layers.1.w": (256, 1024), "layers.1.b": (1024,)}
    base = {n: torch.zeros(s) for n, s in shapes.items()}
    experts = {
        t: {n: (0.01 * torch.randn(s, generator=gen)).to(torch.bfloat16).float() for n, s in shapes.items()}
        for t in ("a", "b")
    }
    return ModelSet.load(base, experts, storage_dtype=dtype)


def distinct_top_bits(values: torch.Tensor) -> int:
    """How many distinct 16-bit prefixes of float32 bits a block's |τ| has (non-negative: bits order as values)."""
    return torch.unique(values.abs().to(torch.float32).view(torch.int32) >> 16).numel()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scope,budget", [(Scope.GLOBAL, 0.10), (Scope.TENSOR, 0.10), (Scope.ROW, 0.25)])
def test_extra_memory_within_budget(scope, budget, dtype):
    ms = wide_modelset(dtype)
    rows = build_row_layout(ms, [0, 1, 1])
    store = ms.tau.numel() * ms.tau.element_size()
    statistics = OrderStatistics(ms, rows)
    _, length = rows.blocks(scope, ms)
    for d in (0.1, 0.37, 0.9):  # distinct candidates, more than the kept results
        k = keep_counts(torch.tensor([[d, d / 2], [d / 3, d]], dtype=torch.float64), length, rows.group)
        assert torch.equal(
            statistics.kth_largest("abs", scope, k), NaiveStatistics(ms, rows).kth_largest("abs", scope, k)
        )
    assert 0 < statistics.extra_bytes() <= budget * store


def test_extra_bytes_counts_every_bucket_and_kept_result():
    """Tensor scope: 16 bytes per non-empty bucket of each block (count, lowest, highest) plus kept results."""
    ms = wide_modelset()
    rows = build_row_layout(ms, [0, 1, 1])
    statistics = OrderStatistics(ms, rows)
    _, length = rows.blocks(Scope.TENSOR, ms)
    k = keep_counts(torch.full((2, 2), 0.3, dtype=torch.float64), length, rows.group)
    result = statistics.kth_largest("abs", Scope.TENSOR, k)
    buckets = sum(distinct_top_bits(ms.tau[t, s.offset : s.end]) for t in range(2) for s in ms.segments)
    kept = k.numel() * k.element_size() + result.numel() * result.element_size()
    assert statistics.extra_bytes() == 16 * buckets + kept


def test_candidate_independent_threshold_is_kept():
    """A repeated query (Breadcrumbs' upper cut at a fixed γ) is answered without another pass over the scores."""
    ms = wide_modelset()
    rows = build_row_layout(ms, [0, 1, 1])
    statistics = OrderStatistics(ms, rows)
    _, length = rows.blocks(Scope.ROW, ms)
    k = keep_counts(torch.full((2, 2), 0.3, dtype=torch.float64), length, rows.group)
    first = statistics.kth_largest("abs", Scope.ROW, k)
    with patch.object(stats, "order_keys", side_effect=AssertionError("scores were read again")):
        assert statistics.kth_largest("abs", Scope.ROW, k.clone()) is first


def nan_scores(ms: ModelSet, allocate: Allocate) -> torch.Tensor:
    scores = torch.abs(ms.tau, out=allocate(ms.tau.dtype))
    scores[0, 3] = math.nan
    return scores


@pytest.mark.parametrize("scope", list(Scope))
def test_nan_scores_are_refused_with_the_kind_named(scope):
    ms = wide_modelset()
    rows = build_row_layout(ms, [0, 1, 1])
    k = torch.ones(2, rows.n_rows, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"score 'broken', task 0.*NaN"):
        OrderStatistics(ms, rows).kth_largest("broken", scope, k, nan_scores)


@pytest.mark.parametrize("scope", [Scope.GLOBAL, Scope.TENSOR])
def test_bfloat16_store_thresholds_are_lookups(scope):
    """On a bfloat16 store every 16-bit bucket holds one value: after the counts, no pass over the scores."""
    ms = wide_modelset(torch.bfloat16)
    rows = build_row_layout(ms, [0, 1, 1])
    statistics = OrderStatistics(ms, rows)
    _, length = rows.blocks(scope, ms)
    statistics.kth_largest("abs", scope, torch.ones(2, rows.n_rows, dtype=torch.int64))  # builds the counts
    k = keep_counts(torch.tensor([[0.3, 0.05], [0.61, 0.2]], dtype=torch.float64), length, rows.group)
    with patch.object(stats.ScoreSource, "prefixes", side_effect=AssertionError("scores were read again")):
        got = statistics.kth_largest("abs", scope, k)
    assert torch.equal(got, NaiveStatistics(ms, rows).kth_largest("abs", scope, k))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_cut_of_signed_values_sharing_buckets(dtype):
    """Every k of one block whose buckets each hold several values: ±0 with the tiniest positive subnormals
    (one bucket), the tiniest negative ones (the bucket below, whose raw top bits are −0's), and near-equal
    values of both signs."""
    tiny = torch.finfo(dtype).smallest_normal
    deep = [tiny * 2.0**-20, tiny * 2.0**-21]  # float32: raw bits < 2¹⁶, so in +0's bucket (0 in narrower dtypes)
    values = [-0.0, -0.0, 0.0, *deep, *(-d for d in deep), tiny / 4, -tiny / 4]
    values += [s * (1.0 + j * 2.0**-20) for s in (1.0, -1.0) for j in range(3)]  # one float32 bucket per sign
    tau = torch.tensor(values, dtype=torch.float32)
    ms = ModelSet.load({"w": torch.zeros(len(values))}, {"t0": {"w": tau}}, storage_dtype=dtype)
    rows = build_row_layout(ms, [0])
    n = len(values)
    fast, naive = OrderStatistics(ms, rows), NaiveStatistics(ms, rows)
    for scope in (Scope.GLOBAL, Scope.TENSOR, Scope.ROW):
        for k in range(1, n + 1):
            kk = torch.full((1, 1), k)
            got = fast.kth_largest("signed", scope, kk, signed_scores)
            want = naive.kth_largest("signed", scope, kk, signed_scores)
            assert torch.equal(got, want), (scope, k, got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("magnitude", [True, False])
def test_histogram_counts_the_buckets_of_the_order_keys(dtype, magnitude):
    """``ScoreSource.histogram`` (raw top bits for |τ| of float32 / bfloat16) counts each value in the bucket of its
    order key: ±0, subnormals of both signs, ±inf, and values whose top bits differ only below the bucket."""
    info = torch.finfo(dtype)
    special = [-0.0, 0.0, info.smallest_normal / 4, -info.smallest_normal / 4, info.tiny, -info.max, info.max]
    special += [math.inf, -math.inf, 1.0 + 2.0**-20, -(1.0 + 2.0**-20), 1.0, -1.0]
    gen = torch.Generator().manual_seed(3)
    values = torch.cat(
        [
            torch.tensor(special),
            torch.randn(5000, generator=gen) * 10.0 ** torch.randint(-30, 30, (5000,), generator=gen),
        ]
    )
    raw = values.to(dtype)
    source = stats.ScoreSource(raw.unsqueeze(0), magnitude=magnitude)
    scores = raw.abs() if magnitude else raw
    want = torch.bincount(stats.bucket_of(stats.order_keys(scores)).long(), minlength=stats.N_BUCKETS)
    assert torch.equal(source.histogram(raw), want)


@pytest.mark.parametrize("scope", [Scope.TENSOR, Scope.ROW, Scope.GLOBAL])
def test_order_scores_rank_each_block_as_one_sort_on_one_thread(scope):
    """The ``mergekit`` tie rule's ranks: tensor-scope tasks sorted on two threads at once give, entry
    for entry, the ranks of sorting each task's block alone on one thread (ties in the same order)."""
    g = torch.Generator().manual_seed(5)
    base = {"a.w": torch.zeros(40, 300), "b.w": torch.zeros(7000)}
    experts = {  # few distinct magnitudes: most entries tie with many others
        f"t{i}": {k: (torch.randint(-6, 7, v.shape, generator=g) * 0.125).float() for k, v in base.items()}
        for i in range(3)
    }
    ms = ModelSet.load(base, experts)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        got = stats.order_scores(ms, scope, descending=True)
        torch.set_num_threads(1)
        for t in range(3):
            for seg in ms.segments:
                length = {Scope.TENSOR: seg.numel, Scope.ROW: seg.row_length, Scope.GLOBAL: ms.numel}[scope]
                block = ms.tau[t].abs() if scope is Scope.GLOBAL else ms.tau[t, seg.offset : seg.end].abs()
                order = torch.sort(block.view(-1, length), dim=-1, descending=True).indices
                ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(length - 1, -1, -1).expand_as(order))
                expected = ranks.reshape(-1)[seg.offset : seg.end] if scope is Scope.GLOBAL else ranks.reshape(-1)
                assert torch.equal(got[t, seg.offset : seg.end].long(), expected), (t, seg.name)
    finally:
        torch.set_num_threads(threads)


def test_a_bfloat16_score_histogram_counts_every_bit_pattern_in_its_order_bucket() -> None:
    """Signed bfloat16 scores (PCB's β beside a 16-bit store) are counted by raw bit pattern, then mapped to buckets:
    the same counts as bucketing each value's order key, for every pattern (±0, subnormals, ±inf, NaNs)."""
    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    values = torch.cat([every, every[::7], torch.tensor([-0.0, 0.0, -0.0], dtype=torch.bfloat16)]).unsqueeze(0)
    got = stats.ScoreSource(values, magnitude=False).histogram(values[0])
    keys = (values[0].float() + 0.0).view(torch.int32)  # order keys by hand: negative floats flip their low 31 bits
    keys = torch.where(keys < 0, keys ^ 0x7FFFFFFF, keys)
    expected = torch.bincount(((keys >> 16) + 2**15).long(), minlength=2**16)
    assert torch.equal(got, expected)
    assert int(got[2**15]) == 6  # ±0 share +0's bucket: both in ``every``, one in ``every[::7]``, three more
