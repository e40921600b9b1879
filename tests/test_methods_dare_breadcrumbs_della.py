"""DARE, Model Breadcrumbs and DELLA against small hand-written references.

The references below are written from the definitions in docs/methods.md with plain loops, sorts
and explicit masks; they share nothing with the package but the source of randomness (the
counter-based uniforms of ``ops.uniform``, keyed by ``ops.tensor_keys``), which they reproduce to
draw the same masks.
"""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from conftest import State, make_models, make_recipe, merge

from mergetune.errors import RecipeError
from mergetune.merging import ops
from mergetune.merging.engine import Merger, compile_available
from mergetune.merging.methods.dare import drop_and_rescale
from mergetune.merging.methods.della import RANK_KIND, della_ranks
from mergetune.merging.modelset import ModelSet
from mergetune.merging.ops import tensor_keys, uniform

TASKS = ["t0", "t1", "t2"]
SHAPES = {"layers.0.w": (4, 5), "layers.0.b": (5,), "layers.1.w": (3, 5), "layers.1.s": (1,)}
GROUP = {"layers.0.w": 0, "layers.0.b": 0, "layers.1.w": 1, "layers.1.s": 1}  # blocks.0, blocks.1

# Per-task, per-group parameters, as a recipe spells them and as the references read them.
WEIGHT_SPEC = {"t0": 0.5, "t1": [0.3, 0.9], "t2": {"blocks.0": 1.2, "blocks.1": 0.7}}
WEIGHT = [[0.5, 0.5], [0.3, 0.9], [1.2, 0.7]]
DENSITY_SPEC = {"t0": 0.3, "t1": [0.5, 0.8], "t2": 0.6}
DENSITY = [[0.3, 0.3], [0.5, 0.8], [0.6, 0.6]]


# ---- fixtures and helpers ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models() -> tuple[State, dict[str, State], ModelSet]:
    base, experts = make_models(SHAPES, TASKS)
    return base, experts, ModelSet.load(base, experts)


recipe = partial(make_recipe, tasks=TASKS)  # the shared helper over this module's tasks (``tasks=`` overrides)


def task_vectors(base: State, experts: dict[str, State]) -> dict[str, list[torch.Tensor]]:
    return {name: [experts[t][name] - base[name] for t in sorted(experts)] for name in base}


def ref_uniforms(seed: int, name: str, shape: tuple[int, ...], n_tasks: int) -> list[torch.Tensor]:
    """The uniform of each entry, from (seed, tensor name, task) and the entry's index in its tensor."""
    index = torch.arange(math.prod(shape), dtype=torch.int64)
    keys = tensor_keys(seed, name, n_tasks)
    return [uniform(torch.tensor(lo), torch.tensor(hi), index).view(shape) for lo, hi in keys]


def assert_close(got: State, expected: State, atol: float = 2e-6) -> None:
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=atol, rtol=1e-5, msg=name)


# ---- hand-written references --------------------------------------------------------------------------
def ref_drop(tau: torch.Tensor, p: torch.Tensor | float, u: torch.Tensor) -> torch.Tensor:
    """DARE / MagPrune: keep where u < p, divide the kept entries by their p (float32, like the store)."""
    p = torch.as_tensor(p, dtype=torch.float32).expand_as(tau)
    out = torch.zeros_like(tau)
    for i in range(tau.numel()):
        if u.reshape(-1)[i] < p.reshape(-1)[i]:
            out.reshape(-1)[i] = tau.reshape(-1)[i] / p.reshape(-1)[i]
    return out


def sign(x: float) -> float:
    return (x > 0) - (x < 0)


def ref_consensus(values: list[torch.Tensor], weights: list[float], election: str, how: str) -> torch.Tensor:
    """TIES sign election and disjoint merge, entry by entry, in plain Python."""
    flat = [v.reshape(-1).tolist() for v in values]
    out = []
    for i in range(len(flat[0])):
        x = [f[i] for f in flat]
        votes = [w * xi for w, xi in zip(weights, x, strict=True)] if election == "before_election" else x
        total = sum(votes)
        gamma = sign(total) if total != 0 else sign(sum(sign(v) for v in votes))
        agree = [t for t, v in enumerate(votes) if v * gamma > 0]
        num = sum(weights[t] * x[t] for t in agree)
        if how == "sum":
            out.append(num)
        elif how == "mean":
            out.append(num / max(1, len(agree)))
        else:
            den = sum(weights[t] for t in agree)
            out.append(num / den if den != 0 else 0.0)
    return torch.tensor(out, dtype=torch.float32).view(values[0].shape)


def kth_largest(values: list[float], k: int) -> float:
    return sorted(values, reverse=True)[k - 1] if k > 0 else math.inf


def count(fraction: float, n: int) -> int:
    """⌊fraction·n⌋ with the package's documented 1e-9 guard against 0.29·100 = 28.999…"""
    return math.floor(fraction * n + 1e-9)


def ref_band(values: torch.Tensor, block: list[float], gamma: float, beta: float) -> torch.Tensor:
    """Breadcrumbs mask of ``values``: thr(k_lo) ≤ |v| < thr(k_hi), thresholds ranked over ``block``."""
    n = len(block)
    k_hi = count(gamma, n)
    k_lo = min(n, k_hi + count(beta, n))
    hi, lo = kth_largest(block, k_hi), kth_largest(block, k_lo)
    return torch.tensor([lo <= abs(v) < hi for v in values.reshape(-1).tolist()]).view(values.shape)


def ref_breadcrumbs_masked(taus: dict[str, list[torch.Tensor]], gamma: float, density, scope: str) -> dict:
    """τ̂[name][t]: τ zeroed outside the Breadcrumbs band of its row / tensor / whole task vector."""
    out: dict[str, list[torch.Tensor]] = {name: [] for name in taus}
    for t in range(len(TASKS)):
        everything = [abs(x) for name in taus for x in taus[name][t].reshape(-1).tolist()]
        for name, per_task in taus.items():
            tau, beta = per_task[t], density[t][GROUP[name]]
            if scope == "global":
                mask = ref_band(tau, everything, gamma, beta)
            elif scope == "tensor":
                mask = ref_band(tau, tau.abs().reshape(-1).tolist(), gamma, beta)
            else:
                rows = tau.reshape(-1, tau.shape[-1] if tau.dim() else 1)
                mask = torch.stack([ref_band(r, r.abs().tolist(), gamma, beta) for r in rows]).view(tau.shape)
            out[name].append(torch.where(mask, tau, torch.zeros_like(tau)))
    return out


def ref_row_rank(row: list[float]) -> list[float]:
    """Ascending rank of |x| in the row normalised by L − 1; ties share the mean rank; L = 1 gives 0.5."""
    if len(row) == 1:
        return [0.5]
    mags = [abs(x) for x in row]
    ranks = []
    for m in mags:
        below = sum(1 for o in mags if o < m)
        equal = sum(1 for o in mags if o == m)
        ranks.append((below + (equal - 1) / 2) / (len(row) - 1))
    return ranks


def ref_rank(tau: torch.Tensor) -> torch.Tensor:
    rows = tau.reshape(-1, tau.shape[-1] if tau.dim() else 1)
    return torch.tensor([ref_row_rank(r.tolist()) for r in rows], dtype=torch.float32).view(tau.shape)


# ---- DARE ---------------------------------------------------------------------------------------------
def test_dare_linear_matches_reference(models) -> None:
    base, experts, ms = models
    got = merge(ms, recipe("dare_linear", weight=WEIGHT_SPEC, density=DENSITY_SPEC, seed=7))
    expected = {}
    for name, taus in task_vectors(base, experts).items():
        u = ref_uniforms(7, name, SHAPES[name], len(TASKS))
        g = GROUP[name]
        dropped = [ref_drop(taus[t], DENSITY[t][g], u[t]) for t in range(len(TASKS))]
        expected[name] = base[name] + sum(WEIGHT[t][g] * dropped[t] for t in range(len(TASKS)))
    assert_close(got, expected)


def test_dare_is_unbiased_and_keeps_fraction_d() -> None:
    """One big tensor: keep rate ≈ d and Σ(τ̃ − τ) ≈ 0, within 5 standard deviations of the sampling noise."""
    d = 0.3
    base, experts = make_models({"layers.0.w": (200, 250)}, ["t0"], seed=3)
    ms = ModelSet.load(base, experts)
    tau = (experts["t0"]["layers.0.w"] - base["layers.0.w"]).double()
    got = merge(ms, recipe("dare_linear", density=d, seed=11, tasks=["t0"]))["layers.0.w"]
    tilde = (got - base["layers.0.w"]).double()
    kept = tilde != 0
    n = tau.numel()
    assert abs(kept.double().mean().item() - d) < 5 * math.sqrt(d * (1 - d) / n)
    # Kept entries are τ / d (up to the float32 rounding of base + τ/d − base).
    torch.testing.assert_close(tilde[kept], tau[kept] / d, atol=1e-5, rtol=1e-5)
    z = (tilde - tau).sum() / torch.sqrt((tau**2).sum() * (1 - d) / d)
    assert abs(z.item()) < 5


def test_dare_entrywise_mean_over_seeds_is_tau(models) -> None:
    """Every entry averaged over many seeds: |mean − τ| < 5 σ with σ = |τ|·sqrt((1 − d) / (d·S))."""
    base, experts, ms = models
    d, seeds = 0.4, 300
    merger = Merger(ms, compile=False)
    total = {name: torch.zeros(SHAPES[name], dtype=torch.float64) for name in SHAPES}
    for seed in range(seeds):
        out = merger.merge(recipe("dare_linear", weight={"t0": 1.0, "*": 0.0}, density=d, seed=seed))
        for name in SHAPES:
            total[name] += (out[name] - base[name]).double()
    for name in SHAPES:
        tau = (experts["t0"][name] - base[name]).double()
        sigma = tau.abs() * math.sqrt((1 - d) / (d * seeds))
        assert bool(((total[name] / seeds - tau).abs() <= 5 * sigma + 1e-5).all()), name


def test_dare_seeds_reproduce_and_differ(models) -> None:
    _, _, ms = models
    a = merge(ms, recipe("dare_linear", density=0.5, seed=1))
    b = merge(ms, recipe("dare_linear", density=0.5, seed=1))
    c = merge(ms, recipe("dare_linear", density=0.5, seed=2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["layers.0.w"], c["layers.0.w"])


def test_dare_masks_differ_between_tasks_and_tensors() -> None:
    """Identical task vectors in two tasks and two same-shaped tensors still get independent masks."""
    base = {"layers.0.w": torch.zeros(8, 8), "layers.1.w": torch.zeros(8, 8)}
    expert = {k: torch.ones(8, 8) for k in base}
    ms = ModelSet.load(base, {"a": expert, "b": expert})
    w_a = merge(ms, recipe("dare_linear", weight={"a": 1.0, "b": 0.0}, density=0.5, tasks=["a", "b"]))
    w_b = merge(ms, recipe("dare_linear", weight={"a": 0.0, "b": 1.0}, density=0.5, tasks=["a", "b"]))
    assert not torch.equal(w_a["layers.0.w"] != 0, w_b["layers.0.w"] != 0)
    assert not torch.equal(w_a["layers.0.w"] != 0, w_a["layers.1.w"] != 0)


def _mix32_python(x: int) -> int:
    """The hash's mixer in Python integers (reference for both implementations)."""
    for shift, mult in ((16, 0x7FEB352D), (15, 0x6A09E667 | 1), (13, 0x5BD1E995)):
        x = ((x ^ (x >> shift)) * mult) & 0xFFFFFFFF
    return x ^ (x >> 16)


def _uniform_python(lo: int, hi: int, index: int) -> float:
    return (_mix32_python(_mix32_python((index ^ lo) & 0xFFFFFFFF) ^ hi) >> 8) / 2**24


# Values at the edges of the int32 bits the hash computes in: a sign bit set, all ones, indices past 2**32.
EDGE_INDICES = [0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**34 + 7, 2**40 + 2**31 + 3]
EDGE_KEYS = [0, 1, 2**31 - 1, 2**31, 2**32 - 1, 0x9E3779B9]


@pytest.mark.parametrize(
    "compiled",
    [
        False,
        pytest.param(
            True,
            marks=pytest.mark.skipif(
                not compile_available(torch.device("cpu")), reason="no C++ compiler for torch.compile"
            ),
        ),
    ],
)
def test_uniform_is_the_hash_in_python_integers(compiled: bool) -> None:
    """``ops.uniform`` (int32 arithmetic whose products wrap) equals the hash written in Python's unbounded
    integers modulo 2**32, eager and compiled, on every pair of edge keys and edge indices (plus random
    ones), 8-lane blocks and their scalar tail alike."""
    g = torch.Generator().manual_seed(7)
    keys = torch.tensor(EDGE_KEYS + torch.randint(0, 2**32, (10,), generator=g).tolist())
    index = torch.tensor(EDGE_INDICES + torch.randint(0, 2**45, (13,), generator=g).tolist())  # 21: a tail
    lo, hi = keys.view(-1, 1, 1), keys.view(1, -1, 1)
    draw = torch.compile(uniform, dynamic=False) if compiled else uniform
    got = draw(lo, hi, index.view(1, 1, -1))
    expected = [[[_uniform_python(a, b, i) for i in index.tolist()] for b in keys.tolist()] for a in keys.tolist()]
    assert got.dtype == torch.float32
    assert torch.equal(got, torch.tensor(expected, dtype=torch.float32))


@pytest.mark.parametrize(
    ("rows", "length"),
    [(3, 5), (2, 40_000), (70, 577), (1, 1), (4, 16_384), (2, 16_385), (3, 0)],
)
def test_eager_cpu_uniforms_equal_the_torch_hash(rows: int, length: int) -> None:
    """The eager CPU path (uint32 blocks in numpy) draws the same bits as the torch ``uniform`` on any
    row length (shorter or longer than its blocks), with indices past 2**32 (the hash keeps 32 bits)."""
    g = torch.Generator().manual_seed(rows * 100_003 + length)
    lo, hi = (torch.randint(0, 2**32, (rows, 1), generator=g) for _ in range(2))
    offset = torch.randint(0, 2**34, (rows, 1), generator=g)
    got = ops.row_uniform(lo, hi, offset, length)
    assert torch.equal(got, uniform(lo, hi, offset + torch.arange(length)))
    for r, c in [(0, 0), (rows - 1, length - 1), (rows // 2, length // 2)] if length else []:
        index = int(offset[r, 0]) + c
        x = _mix32_python(_mix32_python((index ^ int(lo[r, 0])) & 0xFFFFFFFF) ^ int(hi[r, 0]))
        assert got[r, c].item() == (x >> 8) / 2**24


@pytest.mark.parametrize(("rows", "length"), [(7, 3), (3, 70_001)])
def test_eager_cpu_drop_masks_select_as_the_uniforms_do(rows: int, length: int) -> None:
    """The eager CPU drop ANDs the rescaled τ with int32 masks of (hash >> 8) < ⌈p·2²⁴⌉: the bits of
    ``where(u < p, τ / p, 0.0)`` for p = 0, 1, 0.5 (p·2²⁴ an integer), the smallest p that keeps one draw, and
    random p; −0.0 and +0.0 entries keep their sign when kept and become +0.0 when dropped."""
    g = torch.Generator().manual_seed(rows + length)
    lo, hi = (torch.randint(0, 2**32, (rows, 1), generator=g) for _ in range(2))
    offset = torch.randint(0, 2**34, (rows, 1), generator=g)
    u = uniform(lo, hi, offset + torch.arange(length))
    keep = torch.rand(rows, 1, generator=g)
    keep[:5, 0] = torch.tensor([0.0, 1.0, 0.5, 2.0**-24, 0.999])[: min(rows, 5)]
    keep[-1, 0] = torch.nextafter(u[-1, 1], torch.tensor(1.0))  # just above a draw: that draw is kept
    tau = torch.randn(rows, length, generator=g).to(torch.bfloat16)
    tau[:, 0], tau[:, -1] = -0.0, 0.0
    expected = torch.where(u < keep, tau / torch.where(keep > 0, keep, 1.0), 0.0)
    got = drop_and_rescale(tau, keep, lo, hi, offset)
    assert torch.equal(got.view(torch.int32), expected.view(torch.int32))  # sign bits of zeros too
    assert 0 < int((got != 0).sum()) < got.numel() - 2 * rows  # both kept and dropped entries: not vacuous
    masks = ops.row_keep_bits(lo, hi, offset, length, keep)
    assert torch.equal(masks, torch.where(u < keep, -1, 0).to(torch.int32))


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("dare_linear", {}),
        ("dare_ties", {"trim_density": 0.5, "scope": "tensor"}),
        ("della", {}),
        ("breadcrumbs", {"gamma": 0.1}),
        ("breadcrumbs_ties", {"gamma": 0.1, "scope": "tensor"}),
    ],
)
def test_chunking_does_not_change_the_merge(models, method: str, options: dict) -> None:
    _, _, ms = models
    rec = recipe(method, weight=WEIGHT_SPEC, density=DENSITY_SPEC, options=options, seed=5)
    whole = merge(ms, rec)
    for chunk in (5, 12):
        chunked = merge(ms, rec, chunk_size=chunk)
        assert all(torch.equal(whole[k], chunked[k]) for k in whole), chunk


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_density_zero_gives_the_base(models, method: str) -> None:
    base, _, ms = models
    got = merge(ms, recipe(method, weight=0.7, density=0.0))
    assert all(torch.equal(got[k], base[k]) for k in base)


def test_dare_density_one_is_task_arithmetic(models) -> None:
    _, _, ms = models
    got = merge(ms, recipe("dare_linear", weight=WEIGHT_SPEC, density=1.0))
    ta = merge(ms, recipe("task_arithmetic", weight=WEIGHT_SPEC))
    assert all(torch.equal(got[k], ta[k]) for k in ta)


def test_dare_skip_1d_keeps_biases_whole(models) -> None:
    _, _, ms = models
    skipped = merge(ms, recipe("dare_linear", weight=WEIGHT_SPEC, density=0.4, options={"skip_1d": True}))
    dropped = merge(ms, recipe("dare_linear", weight=WEIGHT_SPEC, density=0.4))
    ta = merge(ms, recipe("task_arithmetic", weight=WEIGHT_SPEC))
    for name in ("layers.0.b", "layers.1.s"):
        assert torch.equal(skipped[name], ta[name]), name
    assert not torch.equal(dropped["layers.0.b"], ta["layers.0.b"])
    for name in ("layers.0.w", "layers.1.w"):
        assert torch.equal(skipped[name], dropped[name]), name


@pytest.mark.parametrize(
    ("weights", "disjoint", "trim_density", "scope"),
    [
        ("after_election", "mean", 1.0, "global"),
        ("before_election", "sum", 0.6, "global"),
        ("before_election", "weighted_mean", 0.5, "tensor"),
    ],
)
def test_dare_ties_matches_reference(models, weights: str, disjoint: str, trim_density: float, scope: str) -> None:
    base, experts, ms = models
    options = {"weights": weights, "disjoint": disjoint, "trim_density": trim_density, "scope": scope, "scale": 0.8}
    got = merge(ms, recipe("dare_ties", weight=WEIGHT_SPEC, density=DENSITY_SPEC, options=options, seed=3))
    taus = task_vectors(base, experts)
    thresholds = ref_trim_thresholds(taus, trim_density, scope)
    expected = {}
    for name, per_task in taus.items():
        u, g = ref_uniforms(3, name, SHAPES[name], len(TASKS)), GROUP[name]
        kept = []
        for t, tau in enumerate(per_task):
            dropped = ref_drop(tau, DENSITY[t][g], u[t])
            kept.append(torch.where(tau.abs() >= thresholds[t][name], dropped, torch.zeros_like(tau)))
        merged = ref_consensus(kept, [WEIGHT[t][g] for t in range(len(TASKS))], weights, disjoint)
        expected[name] = base[name] + 0.8 * merged
    assert_close(got, expected)


def ref_trim_thresholds(taus: dict[str, list[torch.Tensor]], density: float, scope: str) -> list[dict[str, float]]:
    """TIES trim threshold on the ORIGINAL |τ_t|: the ⌊density·n⌋-th largest of the block (0 = keep all)."""
    out = []
    for t in range(len(TASKS)):
        everything = [abs(x) for name in taus for x in taus[name][t].reshape(-1).tolist()]
        per_name = {}
        for name, per_task in taus.items():
            block = everything if scope == "global" else per_task[t].abs().reshape(-1).tolist()
            per_name[name] = 0.0 if density >= 1 else kth_largest(block, count(density, len(block)))
        out.append(per_name)
    return out


def test_dare_ties_at_density_one_is_ties(models) -> None:
    _, _, ms = models
    opts = {"weights": "before_election", "disjoint": "weighted_mean", "scale": 1.5}
    got = merge(ms, recipe("dare_ties", weight=WEIGHT_SPEC, density=1.0, options={**opts, "trim_density": 0.4}))
    ties = merge(ms, recipe("ties", weight=WEIGHT_SPEC, density=0.4, options={**opts, "scope": "global"}))
    assert all(torch.equal(got[k], ties[k]) for k in ties)


# ---- Model Breadcrumbs ----------------------------------------------------------------------------------
KNOWN_ROWS = torch.tensor(
    [
        [1.0, -2, 3, -4, 5, -6, 7, -8, 9, -10],  # distinct magnitudes
        [5.0, -5, 3, 3, -3, 2, 1, -1, 0, 0],  # ties at the outlier threshold (5) and the lower one (3)
        [6.0, 2, 2, -2, 2, 2, 1, 1, 1, 1],  # five entries tied at the lower threshold
    ]
)


@pytest.mark.parametrize(
    ("gamma", "expected"),
    [
        (  # k_hi = 1, k_lo = 4: drop everything ≥ the largest, keep ≥ the 4th largest
            0.1,
            [[0, 0, 0, 0, 0, 0, 7, -8, 9, 0], [0, 0, 3, 3, -3, 0, 0, 0, 0, 0], [0, 2, 2, -2, 2, 2, 0, 0, 0, 0]],
        ),
        (  # γ = 0: nothing dropped on top, keep ≥ the 3rd largest (ties kept)
            0.0,
            [[0, 0, 0, 0, 0, 0, 0, -8, 9, -10], [5, -5, 3, 3, -3, 0, 0, 0, 0, 0], [6, 2, 2, -2, 2, 2, 0, 0, 0, 0]],
        ),
    ],
)
def test_breadcrumbs_on_known_rows(gamma: float, expected: list[list[float]]) -> None:
    base = {"layers.0.w": torch.zeros(3, 10)}
    ms = ModelSet.load(base, {"a": {"layers.0.w": KNOWN_ROWS}})
    got = merge(ms, recipe("breadcrumbs", weight=2.0, density=0.3, options={"gamma": gamma}, tasks=["a"]))
    assert torch.equal(got["layers.0.w"], 2.0 * torch.tensor(expected))


@pytest.mark.parametrize(("scope", "gamma"), [("row", 0.2), ("row", 0.0), ("tensor", 0.1), ("global", 0.05)])
def test_breadcrumbs_matches_reference(models, scope: str, gamma: float) -> None:
    base, experts, ms = models
    got = merge(
        ms, recipe("breadcrumbs", weight=WEIGHT_SPEC, density=DENSITY_SPEC, options={"scope": scope, "gamma": gamma})
    )
    masked = ref_breadcrumbs_masked(task_vectors(base, experts), gamma, DENSITY, scope)
    expected = {
        name: base[name] + sum(WEIGHT[t][GROUP[name]] * masked[name][t] for t in range(len(TASKS))) for name in base
    }
    assert_close(got, expected)
    naive = merge(
        ms,
        recipe("breadcrumbs", weight=WEIGHT_SPEC, density=DENSITY_SPEC, options={"scope": scope, "gamma": gamma}),
        naive=True,
    )
    assert all(torch.equal(got[k], naive[k]) for k in got)


def test_breadcrumbs_ties_matches_reference(models) -> None:
    base, experts, ms = models
    options = {"gamma": 0.2, "scope": "row", "scale": 0.9}  # mergekit defaults: before election, sum
    got = merge(ms, recipe("breadcrumbs_ties", weight=WEIGHT_SPEC, density=DENSITY_SPEC, options=options))
    masked = ref_breadcrumbs_masked(task_vectors(base, experts), 0.2, DENSITY, "row")
    expected = {}
    for name in base:
        weights = [WEIGHT[t][GROUP[name]] for t in range(len(TASKS))]
        expected[name] = base[name] + 0.9 * ref_consensus(masked[name], weights, "before_election", "sum")
    assert_close(got, expected)


def test_breadcrumbs_large_gamma_plus_density_keeps_everything_below_outliers() -> None:
    base = {"layers.0.w": torch.zeros(3, 10)}
    ms = ModelSet.load(base, {"a": {"layers.0.w": KNOWN_ROWS}})
    got = merge(ms, recipe("breadcrumbs", density=0.95, options={"gamma": 0.5}, tasks=["a"]))["layers.0.w"]
    # k_hi = 5: drop ≥ the 5th largest; everything below it is kept (k_lo capped at n).
    expected = torch.tensor(
        [[1.0, -2, 3, -4, 5, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 2, 1, -1, 0, 0], [0, 0, 0, 0, 0, 0, 1, 1, 1, 1]]
    )
    assert torch.equal(got, expected)


# ---- DELLA --------------------------------------------------------------------------------------------
def test_della_rank_normalisation_on_known_rows() -> None:
    base = {"layers.0.w": torch.zeros(2, 5), "layers.0.s": torch.zeros(1)}
    expert = {
        "layers.0.w": torch.tensor([[0.3, -0.1, 0.5, 0.2, -0.4], [1.0, -1.0, 2.0, 0.0, 0.0]]),
        "layers.0.s": torch.ones(1),
    }
    ms = ModelSet.load(base, {"a": expert})
    merger = Merger(ms, compile=False)
    merger.merge(recipe("della", density=0.5, tasks=["a"]))
    cached = merger.layout(1).stats.scores(RANK_KIND, lambda _: pytest.fail("DELLA ranks must be computed once"))
    expected = [0.5, 0.0, 1.0, 0.25, 0.75, 0.625, 0.625, 1.0, 0.125, 0.125, 0.5]  # row 1, row 2, 1-element row
    torch.testing.assert_close(cached[0], torch.tensor(expected), atol=1e-7, rtol=0)
    torch.testing.assert_close(della_ranks(ms), cached, atol=0, rtol=0)


@pytest.mark.parametrize(("weights", "epsilon"), [("before_election", 0.1), ("after_election", 0.2)])
def test_della_matches_reference(models, weights: str, epsilon: float) -> None:
    base, experts, ms = models
    options = {"epsilon": epsilon, "weights": weights, "scale": 0.7}
    got = merge(ms, recipe("della", weight=WEIGHT_SPEC, density=DENSITY_SPEC, options=options, seed=9))
    expected = {}
    for name, per_task in task_vectors(base, experts).items():
        u, g = ref_uniforms(9, name, SHAPES[name], len(TASKS)), GROUP[name]
        pruned = []
        for t, tau in enumerate(per_task):
            p_low = torch.tensor(DENSITY[t][g], dtype=torch.float32) - epsilon
            p = p_low + torch.tensor(2 * epsilon, dtype=torch.float32) * ref_rank(tau)
            pruned.append(ref_drop(tau, p, u[t]))
        merged = ref_consensus(pruned, [WEIGHT[t][g] for t in range(len(TASKS))], weights, "weighted_mean")
        expected[name] = base[name] + 0.7 * merged
    assert_close(got, expected)


@pytest.mark.parametrize(
    ("density", "task", "group"),
    [
        ({"*": 0.5, "t1": {"blocks.0": 0.5, "blocks.1": 0.05}}, "t1", "blocks.1"),  # d − ε ≤ 0
        ({"*": 0.5, "t2": [0.95, 0.5]}, "t2", "blocks.0"),  # d + ε > 1
        ({"*": 0.1}, "t0", "blocks.0"),  # d − ε = 0 exactly
    ],
)
def test_della_rejects_densities_too_close_to_the_bounds(models, density, task: str, group: str) -> None:
    _, _, ms = models
    with pytest.raises(RecipeError, match=rf"della: task '{task}', layer group '{group}'"):
        Merger(ms, compile=False).merge(recipe("della", density=density, options={"epsilon": 0.1}))


def test_della_accepts_the_upper_bound(models) -> None:
    _, _, ms = models
    for d, eps in ((0.9, 0.1), (0.7, 0.3)):
        out = merge(ms, recipe("della", density=d, options={"epsilon": eps}))
        assert all(bool(torch.isfinite(v).all()) for v in out.values())


# ---- options --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("breadcrumbs", {"gama": 0.1}),
        ("breadcrumbs", {"gamma": 1.0}),
        ("dare_linear", {"trim_density": 0.5}),
        ("dare_ties", {"trim_density": 1.5}),
        ("della", {"epsilon": -0.1}),
        ("della", {"disjoint": "median"}),  # della takes disjoint (mergekit's normalize), not unknown values
        ("della", {"scope": "tensor"}),  # a TIES option della does not have
    ],
)
def test_options_are_strict(method: str, options: dict) -> None:
    with pytest.raises(RecipeError):
        recipe(method, density=0.5, options=options)
