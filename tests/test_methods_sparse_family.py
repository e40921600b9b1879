"""SCE, RAM, RAM+ and DELLA without sign election (mergekit's della_linear) against hand-written references.

The references are written from the papers' formulas as mergekit 0.1.5 states them (docstrings of
``sce.py``, ``ram.py``, ``ramplus_tl.py``, ``della.py``) in plain Python loops over entries; they share
nothing with the package but DELLA's source of randomness (``ops.uniform`` via the DARE/DELLA test's
``ref_uniforms``). Also here: import fixes found while checking mergekit's parameters (``normalize``,
``lambda``, ``rescale``), each with the merge or the recipe it must give.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import pytest
import torch
import yaml
from conftest import ModelDirs, State, make_models, make_recipe, merge
from test_mergekit_export import bert_sc_dir  # noqa: F401 (a fixture: a base and experts with task heads)
from test_mergekit_export import make_recipe as dir_recipe
from test_methods_dare_breadcrumbs_della import ref_consensus, ref_drop, ref_uniforms

from mergetune.export.mergekit import ExportError, export_mergekit
from mergetune.export.mergekit_import import MergekitImportError, import_config
from mergetune.merging.engine import Merger
from mergetune.merging.modelset import ModelSet
from mergetune.recipe import resolve_parameter

TASKS = ["t0", "t1", "t2"]
SHAPES = {"layers.0.w": (4, 5), "layers.0.b": (5,), "layers.1.w": (3, 5), "layers.1.s": (1,)}
GROUP = {"layers.0.w": 0, "layers.0.b": 0, "layers.1.w": 1, "layers.1.s": 1}  # blocks.0, blocks.1
WEIGHT_SPEC = {"t0": 0.5, "t1": [0.3, 0.9], "t2": {"blocks.0": 1.2, "blocks.1": 0.7}}
WEIGHT = [[0.5, 0.5], [0.3, 0.9], [1.2, 0.7]]

recipe = partial(make_recipe, tasks=TASKS)


def models_with(noise: float, seed: int = 0) -> tuple[State, dict[str, State], ModelSet]:
    base, experts = make_models(SHAPES, TASKS, seed=seed, noise=noise)
    return base, experts, ModelSet.load(base, experts)


@pytest.fixture(scope="module")
def models() -> tuple[State, dict[str, State], ModelSet]:
    return models_with(0.5)


def task_lists(base: State, experts: dict[str, State], name: str) -> list[list[float]]:
    """Per task, the flat task vector of one tensor as Python floats (float32 differences, like the store)."""
    return [(experts[t][name] - base[name]).reshape(-1).tolist() for t in TASKS]


def assert_close(got: State, expected: dict[str, list[float]], base: State, atol: float = 2e-6) -> None:
    for name, values in expected.items():
        want = base[name] + torch.tensor(values, dtype=torch.float32).view(base[name].shape)
        torch.testing.assert_close(got[name], want, atol=atol, rtol=1e-5, msg=name)


# ---- SCE -------------------------------------------------------------------------------------------------
def ref_sce(taus: list[list[float]], lam: list[float], select_topk: float) -> list[float]:
    """Select the top variances, calculate η_t from mean squares, erase minority signs, weighted mean."""
    T, n = len(taus), len(taus[0])
    variance = []
    for i in range(n):
        mean = sum(tau[i] for tau in taus) / T
        variance.append(sum((tau[i] - mean) ** 2 for tau in taus) / T)
    k = int(sum(v != 0 for v in variance) * select_topk) if select_topk < 1 else n
    keep = set(sorted(range(n), key=lambda i: -variance[i])[:k])
    sel = [[tau[i] if i in keep else 0.0 for i in range(n)] for tau in taus]
    mean_square = [sum(x * x for x in s) / n for s in sel]
    total = sum(mean_square)
    eta = [1 / T] * T if total < 1e-6 else [m / total for m in mean_square]
    out = []
    for i in range(n):
        gamma = 1 if sum(s[i] for s in sel) >= 0 else -1
        agree = [t for t in range(T) if sel[t][i] != 0 and (sel[t][i] > 0) == (gamma > 0)]
        num = sum(lam[t] * eta[t] * sel[t][i] for t in agree)
        out.append(num / max(sum(eta[t] for t in agree), 1e-6))
    return out


@pytest.mark.parametrize("select_topk", [1.0, 0.5, 0.2, 0.0])
def test_sce_matches_the_reference(models: Any, select_topk: float) -> None:
    base, experts, ms = models
    got = merge(ms, recipe("sce", weight=WEIGHT_SPEC, options={"select_topk": select_topk}))
    expected = {
        name: ref_sce(task_lists(base, experts, name), [w[GROUP[name]] for w in WEIGHT], select_topk) for name in SHAPES
    }
    assert_close(got, expected, base)
    if select_topk == 0.0:  # nothing selected: the base
        assert all(torch.equal(got[n], base[n]) for n in SHAPES)


def test_sce_coefficients_are_uniform_below_mergekits_floor() -> None:
    """Task vectors of 1e-4: Σ_t mean(τ̂_t²) ≈ 3e-8 < 1e-6, so η_t = 1/T (mergekit's fallback)."""
    base, experts, ms = models_with(1e-4, seed=4)
    got = merge(ms, recipe("sce", weight=1.0, options={"select_topk": 0.6}))
    expected = {name: ref_sce(task_lists(base, experts, name), [1.0] * 3, 0.6) for name in SHAPES}
    assert_close(got, expected, base, atol=1e-9)


# ---- RAM and RAM+ ----------------------------------------------------------------------------------------
def ref_ram(taus: list[list[float]], lam: list[float], eps: float, r: float = 0.0, alpha: float = 0.0) -> list[float]:
    """Shared entries averaged over the tasks that changed them; unique ones kept, times RAM+'s 1 + r·clamp(ρ)."""
    T, n = len(taus), len(taus[0])
    changed = [[abs(tau[i]) > eps for i in range(n)] for tau in taus]
    count = [sum(changed[t][i] for t in range(T)) for i in range(n)]
    boost = []
    for t in range(T):
        shared = sum(changed[t][i] and count[i] > 1 for i in range(n))
        unique = sum(changed[t][i] and count[i] == 1 for i in range(n))
        ratio = shared / max(unique, eps) if unique or eps else math.inf  # RAM (r = 0) allows ε = 0
        boost.append(1 + r * min(max(ratio, 0.0), alpha))
    return [
        sum(lam[t] * taus[t][i] * (boost[t] if count[i] == 1 else 1 / count[i]) for t in range(T) if changed[t][i])
        for i in range(n)
    ]


# ε = 0.5 on noise 0.5: about a third of the entries are changed by one task, a fifth by none
@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("ram", {"epsilon": 0.5}),
        ("ram", {"epsilon": 0.0}),
        ("ramplus_tl", {"epsilon": 0.5}),
        ("ramplus_tl", {"epsilon": 0.5, "r": 0.7, "alpha": 3.0}),
    ],
)
def test_ram_family_matches_the_reference(models: Any, method: str, options: dict[str, float]) -> None:
    base, experts, ms = models
    got = merge(ms, recipe(method, weight=WEIGHT_SPEC, options=options))
    r, alpha = (options.get("r", 0.1), options.get("alpha", 0.2)) if method == "ramplus_tl" else (0.0, 0.0)
    expected = {
        name: ref_ram(task_lists(base, experts, name), [w[GROUP[name]] for w in WEIGHT], options["epsilon"], r, alpha)
        for name in SHAPES
    }
    assert_close(got, expected, base)


def test_ramplus_boost_really_changes_the_merge(models: Any) -> None:
    """So the RAM+ reference test above cannot pass by RAM+ being RAM: its unique entries are scaled up."""
    _, _, ms = models
    plain = merge(ms, recipe("ram", weight=1.0, options={"epsilon": 0.5}))
    plus = merge(ms, recipe("ramplus_tl", weight=1.0, options={"epsilon": 0.5, "r": 0.7, "alpha": 3.0}))
    assert any(not torch.equal(plain[n], plus[n]) for n in SHAPES)


# ---- DELLA without sign election (della_linear), and its disjoint options --------------------------------
DENSITY_SPEC = {"t0": 0.3, "t1": [0.5, 0.8], "t2": 0.6}
DENSITY = [[0.3, 0.3], [0.5, 0.8], [0.6, 0.6]]


def dropped(base: State, experts: dict[str, State], name: str, seed: int) -> list[torch.Tensor]:
    """ε = 0 MagPrune: keep with probability d, divide by d (the DARE/DELLA test's reference)."""
    u = ref_uniforms(seed, name, SHAPES[name], len(TASKS))
    return [ref_drop(experts[t][name] - base[name], DENSITY[k][GROUP[name]], u[k]) for k, t in enumerate(TASKS)]


@pytest.mark.parametrize("disjoint", ["sum", "weighted_mean", "mean"])
def test_della_without_sign_election_is_a_weighted_sum_of_the_pruned_vectors(models: Any, disjoint: str) -> None:
    base, experts, ms = models
    options = {"epsilon": 0.0, "sign_election": False, "disjoint": disjoint, "scale": 1.3}
    got = merge(ms, recipe("della", weight=WEIGHT_SPEC, density=DENSITY_SPEC, options=options, seed=7))
    for name in SHAPES:
        lam = [w[GROUP[name]] for w in WEIGHT]
        total = sum(x * v for x, v in zip(lam, dropped(base, experts, name, 7), strict=True))
        divisor = {"sum": 1.0, "weighted_mean": sum(lam), "mean": len(TASKS)}[disjoint]
        torch.testing.assert_close(got[name], base[name] + 1.3 * total / divisor, atol=2e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("disjoint", ["sum", "mean"])
def test_della_disjoint_options_after_the_election(models: Any, disjoint: str) -> None:
    base, experts, ms = models
    options = {"epsilon": 0.0, "disjoint": disjoint}
    got = merge(ms, recipe("della", weight=WEIGHT_SPEC, density=DENSITY_SPEC, options=options, seed=7))
    for name in SHAPES:
        lam = [w[GROUP[name]] for w in WEIGHT]
        expected = ref_consensus(dropped(base, experts, name, 7), lam, "before_election", disjoint)
        torch.testing.assert_close(got[name], base[name] + expected, atol=2e-6, rtol=1e-5, msg=name)


# ---- import: mergekit's normalize, lambda and rescale read right ------------------------------------------
def llama_config(models: ModelDirs, method: str, params: list[dict[str, Any]], **top: Any) -> dict[str, Any]:
    """A mergekit config over the tiny Llama: the base, then one entry per expert with its parameters."""
    base, experts = str(models[0]), [str(p) for p in models[1].values()]
    sources = [{"model": base}] + [{"model": e, "parameters": p} for e, p in zip(experts, params, strict=True)]
    return {"merge_method": method, "base_model": base, "models": sources, "dtype": "float32", **top}


def test_dare_linear_normalize_divides_by_the_sum_of_mergekits_weights(tiny_llama_dir: ModelDirs) -> None:
    """mergekit: Δ = Σ w_t δ_t / Σ w with δ_t = mask·τ_t (rescale: false); mergetune's τ̃_t = δ_t / d_t,
    so λ_t = w_t d_t / Σ w. (Before the fix the importer normalised w_t / d_t by the sum of the w / d.)
    """
    params = [{"weight": 0.6, "density": 0.5}, {"weight": 0.3, "density": 0.25}, {"weight": 0.1, "density": 0.8}]
    config = llama_config(tiny_llama_dir, "dare_linear", params, parameters={"normalize": True, "rescale": False})
    imported = import_config(config, source="merge.yml")
    assert imported.differences == []
    weight = resolve_parameter(imported.recipe.weight, imported.recipe.task_names, ["blocks.0"], "weight")[:, 0]
    pairs = ((0.6, 0.5), (0.3, 0.25), (0.1, 0.8))
    expected = [w * d / sum(v for v, _ in pairs) for w, d in pairs]
    assert weight.tolist() == pytest.approx(expected, abs=1e-12)


def test_della_lambda_that_varies_between_slices_scales_the_merge(tiny_llama_dir: ModelDirs) -> None:
    """mergekit's lambda multiplies Δ: with lambda 0.5 on the first slice, its tensors move half as far as with 1.

    (Before the fix the importer turned lambda into weights of a weighted mean, which divides them out.)
    """
    base, experts = str(tiny_llama_dir[0]), [str(p) for p in tiny_llama_dir[1].values()]

    def config(first_lambda: float) -> dict[str, Any]:
        return {
            "merge_method": "della",
            "base_model": base,
            "slices": [
                {
                    "sources": [{"model": base, "layer_range": r}]
                    + [
                        {"model": e, "layer_range": r, "parameters": {"weight": 1.0, "density": 0.5, "epsilon": 0.0}}
                        for e in experts
                    ],
                    "parameters": {"lambda": lam, "rescale": False},
                }
                for r, lam in (([0, 1], first_lambda), ([1, 2], 1.0))
            ],
            "dtype": "float32",
        }

    half, full = (import_config(config(lam), source="merge.yml") for lam in (0.5, 1.0))
    assert half.differences == [] and full.differences == []
    merger = Merger(ModelSet.load(base, [(t, str(p)) for t, p in tiny_llama_dir[1].items()]), compile=False)
    ms = merger.modelset
    half_merge = {k: v.clone() for k, v in merger.merge(half.recipe).items()}
    full_merge = {k: v.clone() for k, v in merger.merge(full.recipe).items()}
    layer0 = [n for n in half_merge if ".layers.0." in n]
    assert layer0
    for name in layer0:  # same seed, same masks: half the displacement
        b = ms.base_tensor(name)
        torch.testing.assert_close(half_merge[name] - b, 0.5 * (full_merge[name] - b), atol=1e-7, rtol=1e-5)
    moved = max(float((full_merge[n] - ms.base_tensor(n)).abs().max()) for n in layer0)
    assert moved > 1e-4


@pytest.mark.parametrize("method", ["ties", "breadcrumbs", "breadcrumbs_ties"])
def test_l1_rescale_of_a_magnitude_trim_is_a_listed_difference(tiny_llama_dir: ModelDirs, method: str) -> None:
    """mergekit's rescale: true rescales the kept entries of each tensor; no mergetune option does: not silent."""
    params = [{"weight": 0.5, "density": 0.4}] * 3
    config = llama_config(tiny_llama_dir, method, params, parameters={"rescale": True})
    with pytest.raises(MergekitImportError, match="rescale: true"):
        import_config(config, source="merge.yml")
    approx = import_config(config, source="merge.yml", approximate=True)
    assert any("L1 norm" in d for d in approx.differences)


def test_della_linear_imports_as_della_without_sign_election(tiny_llama_dir: ModelDirs) -> None:
    params = [{"weight": 0.6, "density": 0.5, "epsilon": 0.0}] * 3
    config = llama_config(tiny_llama_dir, "della_linear", params, parameters={"rescale": False, "lambda": 0.8})
    imported = import_config(yaml.safe_load(yaml.safe_dump(config)), source="merge.yml")
    assert imported.recipe.method == "della"
    assert imported.recipe.options == {"epsilon": 0.0, "sign_election": False, "disjoint": "sum"}
    weight = resolve_parameter(imported.recipe.weight, imported.recipe.task_names, ["blocks.0"], "weight")
    assert weight[:, 0].tolist() == pytest.approx([0.6 * 0.8 * 0.5] * 3, abs=1e-12)  # λ = w · lambda · d
    assert math.isclose(float(imported.recipe.density), 0.5)


@pytest.mark.parametrize("method", ["sce", "ram", "ramplus_tl"])
def test_unweighted_mergekit_methods_refuse_models_with_task_heads(bert_sc_dir: ModelDirs, method: str) -> None:  # noqa: F811
    """mergekit's sce and ram take no per-model weight, so they would merge the heads mergetune keeps per task."""
    with pytest.raises(ExportError, match=f"{method} exports to mergekit's {method}.*would merge the task heads"):
        export_mergekit(dir_recipe(bert_sc_dir, method, {"weight": 1.0}), approximate=True)


@pytest.mark.parametrize("method", ["sce", "ram"])
def test_unweighted_mergekit_methods_list_other_weights_as_a_difference(tiny_llama_dir: ModelDirs, method: str) -> None:
    recipe = dir_recipe(tiny_llama_dir, method, {"weight": {"*": {"blocks.1": 0.5, "*": 1.0}}})
    with pytest.raises(ExportError, match=r"no per-model weight.*λ 0\.5 in group\(s\) blocks\.1"):
        export_mergekit(recipe)
    assert export_mergekit(recipe, approximate=True).faithful == "approximate"
