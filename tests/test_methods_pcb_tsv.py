"""PCB-Merging and TSV-Merge against small hand-written references (plain torch, float64).

The references below re-derive each method from its formulas on the task vectors of in-memory
state dicts; they do not use mergetune's helpers. Conventions checked (see the method modules):
PCB clips |τ| at the ascending indices int(n·q) and int(n·(1−q) − 1) of the official code, and
keeps the entries strictly above the (⌊r·n⌋ + 1)-th largest β (capped at the minimum).
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import State, make_models, make_recipe, merge

from mergetune.errors import RecipeError
from mergetune.merging.engine import Merger, compile_available
from mergetune.merging.methods import parse_recipe
from mergetune.merging.methods import pcb as pcb_module
from mergetune.merging.methods import tsv as tsv_module
from mergetune.merging.modelset import ModelSet

SHAPES = {"layers.0.w": (6, 4), "layers.0.b": (4,), "layers.1.s": (1,)}
GROUP = {"layers.0.w": "blocks.0", "layers.0.b": "blocks.0", "layers.1.s": "blocks.1"}
TASKS = ["t0", "t1", "t2"]


# ---- fixtures and helpers -------------------------------------------------------------------------
def deltas(base: State, experts: dict[str, State], tasks: list[str]) -> dict[str, torch.Tensor]:
    """Task vectors per tensor, ``[T, *shape]`` float64."""
    return {k: torch.stack([experts[t][k].double() - base[k].double() for t in tasks]) for k in base}


def assert_delta(out: State, base: State, expected: dict[str, torch.Tensor], atol: float = 1e-5) -> None:
    for k, d in expected.items():
        torch.testing.assert_close(out[k].double() - base[k].double(), d, atol=atol, rtol=1e-4, msg=k)


# ---- PCB reference --------------------------------------------------------------------------------
def ref_pcb_block(tau: torch.Tensor, q: float, inter: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(τ̄, β) of one ranking block ``[T, n]``, straight from the official formulas."""
    T, n = tau.shape
    mag = tau.abs()
    srt = mag.sort(dim=1).values
    lo = srt[:, int(n * q)].unsqueeze(1)
    hi = srt[:, int(n * (1 - q) - 1)].unsqueeze(1)
    clipped_mag = torch.minimum(torch.maximum(mag, lo), hi)
    clipped = torch.sign(tau) * clipped_mag
    m = (clipped_mag - lo) / (hi - lo)
    intra = torch.exp(T * m**2)
    if inter == "product":
        cross = torch.tanh(tau * tau.sum(0))
    else:
        hat = torch.sign(tau) * m
        cross = torch.stack([sum(torch.tanh(hat[t] * hat[j]) for j in range(T)) for t in range(T)])
    return clipped, intra * cross


def ref_drop(beta: torch.Tensor, density: torch.Tensor) -> torch.Tensor:
    """β' of one block: keep β strictly above the (⌊r·n⌋+1)-th largest, min-max to (0, 1]."""
    n = beta.shape[1]
    desc = beta.sort(dim=1, descending=True).values
    keep = torch.floor(density * n + 1e-9).long()  # [T, n]
    thr = desc.gather(1, keep.clamp(max=n - 1))
    top = desc[:, :1]
    return torch.where(beta > thr, (beta - thr) / (top - thr), torch.zeros_like(beta))


def ref_pcb(
    base: State,
    experts: dict[str, State],
    tasks: list[str],
    *,
    scope: str = "global",
    q: float = 1e-4,
    inter: str = "product",
    weight: dict[str, float] | float = 1.0,
    density: dict[str, dict[str, float]] | dict[str, float] | float = 1.0,
    scale: float = 1.0,
    beta_dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Expected Δ per tensor. ``density`` may be per task, or per task then per group. ``beta_dtype``: β (divided
    by e^T, which leaves the merge unchanged) rounded to that dtype before the drop."""
    taus = deltas(base, experts, tasks)
    names = list(taus)
    blocks = [names] if scope == "global" else [[k] for k in names]
    lam = torch.tensor([weight[t] if isinstance(weight, dict) else weight for t in tasks], dtype=torch.float64)
    out: dict[str, torch.Tensor] = {}
    for block in blocks:
        flat = torch.cat([taus[k].reshape(len(tasks), -1) for k in block], dim=1)
        dens = torch.cat([_density_row(density, tasks, GROUP[k], taus[k][0].numel()) for k in block], dim=1)
        clipped, beta = ref_pcb_block(flat, q, inter)
        if beta_dtype is not None:
            beta = (beta * math.exp(-len(tasks))).to(beta_dtype).double()
        kept = ref_drop(beta, dens)
        merged = (kept * lam[:, None] * clipped).sum(0) / kept.sum(0).clamp(min=1e-12)
        for k, piece in zip(block, merged.split([taus[k][0].numel() for k in block]), strict=True):
            out[k] = scale * piece.reshape(taus[k].shape[1:])
    return out


def _density_row(density, tasks: list[str], group: str, n: int) -> torch.Tensor:
    def value(t: str) -> float:
        d = density[t] if isinstance(density, dict) else density
        return d[group] if isinstance(d, dict) else d

    return torch.tensor([[value(t)] * n for t in tasks], dtype=torch.float64)


# ---- PCB tests ------------------------------------------------------------------------------------
@pytest.mark.parametrize("inter", ["product", "es"])
@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_pcb_matches_reference(scope: str, inter: str) -> None:
    """Both scopes × both inter variants, per-task λ and per-task density, against the reference."""
    base, experts = make_models(SHAPES, TASKS)
    weight = {"t0": 0.5, "t1": 1.0, "t2": 1.5}
    density = {"t0": 0.2, "t1": 0.5, "t2": 0.8}
    opts = {"scope": scope, "inter": inter, "scale": 1.3}
    out = merge(ModelSet.load(base, experts), make_recipe("pcb", TASKS, weight=weight, density=density, options=opts))
    expected = ref_pcb(base, experts, TASKS, scope=scope, inter=inter, weight=weight, density=density, scale=1.3)
    assert_delta(out, base, expected)


def test_pcb_per_group_density_and_larger_clip_quantile() -> None:
    """Tensor scope with a density per task and layer group, and q = 0.1 (clips 3 of 24 on each side)."""
    base, experts = make_models(SHAPES, TASKS, seed=1)
    density = {"t0": {"blocks.0": 0.3, "blocks.1": 1.0}, "*": {"blocks.0": 0.7, "blocks.1": 0.0}}
    opts = {"scope": "tensor", "clip_quantile": 0.1}
    out = merge(ModelSet.load(base, experts), make_recipe("pcb", TASKS, weight=0.8, density=density, options=opts))
    full = {t: density.get(t, density["*"]) for t in TASKS}
    expected = ref_pcb(base, experts, TASKS, scope="tensor", q=0.1, weight=0.8, density=full)
    assert_delta(out, base, expected)


def test_pcb_density_zero_merges_nothing() -> None:
    base, experts = make_models(SHAPES, TASKS)
    out = merge(ModelSet.load(base, experts), make_recipe("pcb", TASKS, weight=1.0, density=0.0))
    for k in base:
        torch.testing.assert_close(out[k], base[k])


def test_pcb_density_one_keeps_all_but_the_minimum() -> None:
    """T = 1, r = 1: Δ = λ τ̄ everywhere but at the smallest β (= smallest |τ|), where Δ = 0."""
    base, experts = make_models(SHAPES, ["t0"])
    out = merge(ModelSet.load(base, experts), make_recipe("pcb", ["t0"], weight=0.7, density=1.0))
    expected = ref_pcb(base, experts, ["t0"], weight=0.7, density=1.0)
    assert_delta(out, base, expected)
    flat = torch.cat([(out[k].double() - base[k].double()).reshape(-1) for k in base])
    tau = torch.cat([(experts["t0"][k].double() - base[k].double()).reshape(-1) for k in base])
    assert int((flat == 0).sum()) == 1
    assert flat[tau.abs().argmin()] == 0


def test_pcb_keeps_floor_density_entries() -> None:
    """T = 1: exactly ⌊r·n⌋ entries of the global block survive the drop (n = 29)."""
    base, experts = make_models(SHAPES, ["t0"], seed=3)
    for r in (0.1, 0.3, 0.5, 0.9):
        out = merge(ModelSet.load(base, experts), make_recipe("pcb", ["t0"], weight=1.0, density=r))
        nonzero = sum(int((out[k] - base[k] != 0).sum()) for k in base)
        assert nonzero == math.floor(r * 29), r


def test_pcb_clips_an_outlier() -> None:
    """Three identical experts with one huge entry: the merge gives λ·(2nd largest |τ|), signed, there."""
    base, experts = make_models(SHAPES, ["t0"], seed=2)
    experts["t0"]["layers.0.w"][2, 1] = base["layers.0.w"][2, 1] - 1000.0
    same = {t: {k: v.clone() for k, v in experts["t0"].items()} for t in TASKS}
    out = merge(ModelSet.load(base, same), make_recipe("pcb", TASKS, weight=0.5, density=1.0))
    mags = torch.cat([(experts["t0"][k].double() - base[k].double()).abs().reshape(-1) for k in base])
    second = mags.sort(descending=True).values[1]
    got = out["layers.0.w"][2, 1].double() - base["layers.0.w"][2, 1].double()
    torch.testing.assert_close(got, -0.5 * second, atol=1e-5, rtol=1e-5)
    assert_delta(out, base, ref_pcb(base, same, TASKS, weight=0.5, density=1.0))


def test_pcb_candidates_only_rescale_and_scores_are_computed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A new λ reuses the cached β; with uniform λ the delta is linear in λ."""
    calls = []
    original = pcb_module.compute_scores
    monkeypatch.setattr(pcb_module, "compute_scores", lambda *a: calls.append(1) or original(*a))
    base, experts = make_models(SHAPES, TASKS)
    merger = Merger(ModelSet.load(base, experts), compile=False)
    one = {k: v.clone() for k, v in merger.merge(make_recipe("pcb", TASKS, weight=0.4, density=0.5)).items()}
    two = {k: v.clone() for k, v in merger.merge(make_recipe("pcb", TASKS, weight=1.2, density=0.3)).items()}
    three = merger.merge(make_recipe("pcb", TASKS, weight=3.6, density=0.3))
    assert len(calls) == 1
    for k in base:
        torch.testing.assert_close(three[k] - base[k], 3.0 * (two[k] - base[k]), atol=1e-5, rtol=1e-5)
    assert any(not torch.equal(one[k], two[k]) for k in base)


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float16])
def test_pcb_beside_a_16_bit_store_ranks_beta_rounded_to_bfloat16(storage: torch.dtype) -> None:
    """A 16-bit store keeps β in bfloat16: the drop and β' follow β rounded to bfloat16, and nothing else changes.

    Base zero and bfloat16-valued experts, so the store's own rounding is exact and only β's shows."""
    shapes = {"layers.0.w": (24, 16), "layers.0.b": (16,), "layers.1.s": (8,)}
    _, experts = make_models(shapes, TASKS, seed=4)
    base = {k: torch.zeros(s) for k, s in shapes.items()}
    experts = {t: {k: v.to(torch.bfloat16).float() for k, v in state.items()} for t, state in experts.items()}
    weight, density = {"t0": 0.5, "t1": 1.0, "t2": 1.5}, {"t0": 0.2, "t1": 0.5, "t2": 0.8}
    recipe = make_recipe("pcb", TASKS, weight=weight, density=density)
    store = ModelSet.load(base, experts, storage_dtype=storage)
    out = merge(store, recipe)
    rounded = ref_pcb(base, experts, TASKS, weight=weight, density=density, beta_dtype=torch.bfloat16)
    assert_delta(out, base, rounded, atol=1e-6)
    exact = ref_pcb(base, experts, TASKS, weight=weight, density=density)
    assert any(not torch.allclose(rounded[k], exact[k], atol=1e-5) for k in shapes)  # the rounding shows
    ctx, method = Merger(store).context(recipe)  # β is cached in bfloat16: as many bytes as the task vectors
    method.prepare(ctx)
    assert ctx.stats.held_bytes()["scores"] == len(TASKS) * sum(math.prod(s) for s in shapes.values()) * 2


@pytest.mark.skipif(not compile_available(torch.device("cpu")), reason="no C++ compiler for torch.compile")
def test_pcb_compiled_kernel_matches_eager() -> None:
    base, experts = make_models(SHAPES, TASKS)
    rec = make_recipe("pcb", TASKS, weight={"t0": 0.5, "*": 1.0}, density=0.4, options={"inter": "es"})
    eager, compiled = merge(ModelSet.load(base, experts), rec), merge(ModelSet.load(base, experts), rec, compile=True)
    for k in base:
        torch.testing.assert_close(compiled[k], eager[k], atol=1e-5, rtol=1e-5)


def test_pcb_options_are_strict() -> None:
    with pytest.raises(RecipeError):
        parse_recipe({"base": "b", "experts": [{"name": "a", "model": "x"}], "method": "pcb", "options": {"k": 1}})
    with pytest.raises(RecipeError):
        parse_recipe(
            {"base": "b", "experts": [{"name": "a", "model": "x"}], "method": "pcb", "options": {"scope": "row"}}
        )


# ---- TSV reference --------------------------------------------------------------------------------
TSV_SHAPES = {"layers.0.w": (8, 12), "layers.0.b": (4,), "layers.1.c": (4, 2, 3), "layers.1.s": (1,)}


def ref_polar(m: torch.Tensor) -> torch.Tensor:
    p, _, qh = torch.linalg.svd(m, full_matrices=False)
    return p @ qh


def ref_tsv_matrix(mats: torch.Tensor, lam: torch.Tensor, rank_fraction: float) -> dict[str, torch.Tensor]:
    """U⊥, S·λ, V⊥ and ΔW of ``[T, m, n]`` task matrices."""
    T, rows, cols = mats.shape
    k = max(1, math.floor(min(rows, cols) * rank_fraction / T))
    us, ss, vs = [], [], []
    for t in range(T):
        u, s, vh = torch.linalg.svd(mats[t], full_matrices=False)
        us.append(u[:, :k])
        ss.append(s[:k] * lam[t])
        vs.append(vh[:k].T)
    u_orth, v_orth = ref_polar(torch.cat(us, 1)), ref_polar(torch.cat(vs, 1))
    s_cat = torch.cat(ss)
    return {"u": u_orth, "v": v_orth, "s": s_cat, "delta": u_orth @ torch.diag(s_cat) @ v_orth.T}


def ref_tsv(
    base: State,
    experts: dict[str, State],
    tasks: list[str],
    weight: dict[str, float],
    rank_fraction: float,
    scale: float,
) -> dict[str, torch.Tensor]:
    taus = deltas(base, experts, tasks)
    lam = torch.tensor([weight[t] for t in tasks], dtype=torch.float64)
    out = {}
    for k, tau in taus.items():
        if tau.dim() - 1 < 2:  # 0-D/1-D tensors: the λ-weighted mean
            out[k] = scale * (lam.view(-1, *[1] * (tau.dim() - 1)) * tau).sum(0) / len(tasks)
        else:
            mats = tau.reshape(len(tasks), tau.shape[1], -1)
            out[k] = scale * ref_tsv_matrix(mats, lam, rank_fraction)["delta"].reshape(tau.shape[1:])
    return out


# ---- TSV tests ------------------------------------------------------------------------------------
@pytest.mark.parametrize("rank_fraction", [1.0, 0.5])
def test_tsv_matches_reference(rank_fraction: float) -> None:
    """2-D and 3-D tensors against the SVD reference, 1-D ones as the λ-weighted mean / T."""
    base, experts = make_models(TSV_SHAPES, TASKS)
    weight = {"t0": 0.5, "t1": 1.0, "t2": 2.0}
    opts = {"rank_fraction": rank_fraction, "scale": 0.7}
    out = merge(ModelSet.load(base, experts), make_recipe("tsv", TASKS, weight=weight, options=opts))
    assert_delta(out, base, ref_tsv(base, experts, TASKS, weight, rank_fraction, 0.7), atol=1e-4)


def test_tsv_one_dim_rule_is_the_weighted_average() -> None:
    base, experts = make_models(TSV_SHAPES, TASKS, seed=5)
    weight = {"t0": 0.3, "t1": 0.6, "t2": 0.9}
    out = merge(ModelSet.load(base, experts), make_recipe("tsv", TASKS, weight=weight))
    for k in ("layers.0.b", "layers.1.s"):
        expected = sum(weight[t] * (experts[t][k] - base[k]) for t in TASKS) / 3
        torch.testing.assert_close(out[k] - base[k], expected, atol=1e-6, rtol=1e-5)


def test_tsv_factors_are_orthonormal() -> None:
    """Reference U⊥ᵀU⊥ = V⊥ᵀV⊥ = I, and the cached factors satisfy the same (usᵀus = diag(S²))."""
    base, experts = make_models(TSV_SHAPES, TASKS, seed=4)
    mats = deltas(base, experts, TASKS)["layers.0.w"]  # 8 × 12, k = 2 per task, T·k = 6
    ref = ref_tsv_matrix(mats, torch.ones(3, dtype=torch.float64), 1.0)
    eye = torch.eye(6, dtype=torch.float64)
    torch.testing.assert_close(ref["u"].T @ ref["u"], eye)
    torch.testing.assert_close(ref["v"].T @ ref["v"], eye)
    got = tsv_module.matrix_factors(mats.float(), 1.0)
    assert got.k == 2 and got.us.shape == (8, 6) and got.vt.shape == (6, 12)
    torch.testing.assert_close(got.vt @ got.vt.T, eye.float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(got.us.T @ got.us, torch.diag(ref["s"] ** 2).float(), atol=1e-4, rtol=1e-5)


def test_tsv_single_task_full_rank_reproduces_tau() -> None:
    """T = 1, rank_fraction = 1: U⊥ = U, V⊥ = V, so ΔW = λ·scale·τ exactly (to float rounding)."""
    base, experts = make_models(TSV_SHAPES, ["t0"], seed=6)
    out = merge(ModelSet.load(base, experts), make_recipe("tsv", ["t0"], weight=0.8, options={"scale": 1.5}))
    expected = {k: 1.2 * (experts["t0"][k].double() - base[k].double()) for k in base}
    assert_delta(out, base, expected, atol=1e-5)


def test_tsv_candidates_only_rescale_and_svds_run_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Scaling every λ scales Δ; the SVDs are cached per rank_fraction and tensor, and reused."""
    calls = []
    original = tsv_module.segment_factors
    monkeypatch.setattr(tsv_module, "segment_factors", lambda *a: calls.append(a[1]) or original(*a))
    base, experts = make_models(TSV_SHAPES, TASKS)
    merger = Merger(ModelSet.load(base, experts), compile=False)
    weight = {"t0": 0.2, "t1": 0.5, "t2": 1.0}
    one = {k: v.clone() for k, v in merger.merge(make_recipe("tsv", TASKS, weight=weight)).items()}
    assert sorted(calls) == list(range(len(TSV_SHAPES)))  # once per tensor
    two = merger.merge(make_recipe("tsv", TASKS, weight={t: 2.5 * w for t, w in weight.items()}))
    assert len(calls) == len(TSV_SHAPES)
    for k in base:
        torch.testing.assert_close(two[k] - base[k], 2.5 * (one[k] - base[k]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("method", "options", "shapes"),
    [("pcb", {}, SHAPES), ("pcb", {"scope": "tensor", "inter": "es"}, SHAPES), ("tsv", {}, TSV_SHAPES)],
)
def test_naive_statistics_give_the_same_merge(method: str, options: dict, shapes: dict) -> None:
    """The naive baseline (no caching, kthvalue per call) merges the same weights."""
    base, experts = make_models(shapes, TASKS, seed=7)
    rec = make_recipe(method, TASKS, weight={"t0": 0.6, "*": 1.1}, density=0.4, options=options)
    ms = ModelSet.load(base, experts)
    fast, naive = Merger(ms, compile=False).merge(rec), Merger(ms, compile=False, naive=True).merge(rec)
    for k in base:
        torch.testing.assert_close(naive[k], fast[k], atol=1e-6, rtol=1e-6)
