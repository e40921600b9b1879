"""The contract every registered merge method keeps, tested for each one of them (and for a toy method).

Each ``check_*`` function states one rule for one method, by name, against independent expectations
(the base weights, another method's merge where the papers say they coincide, a second run); the
tests below parametrise them over the registry (``METHODS``), so a newly registered method is held
to the same rules without editing this file. ``test_a_toy_method_is_covered_without_editing_any_module``
registers a method defined here and runs every rule on it.

Twin-Merging (``twin``) is a dynamic method: a routed model is not one set of weights, so the engine
refuses it (``check_dynamic_is_refused_by_the_engine``) and the rules on merged weights do not apply
to it; its declarations and its mergekit refusal are checked like every method's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from conftest import LAYERED_SHAPES, ModelDirs, make_models
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_mergekit_export import EXACT as MERGEKIT_EXACT
from test_mergekit_export import RANDOM as MERGEKIT_RANDOM
from test_mergekit_export import make_recipe
from test_mergekit_methods_geo import EXACT as GEO_EXACT

from mergetune.errors import RecipeError
from mergetune.export.mergekit import ExportError, export_mergekit
from mergetune.export.mergekit_import import importable
from mergetune.merging.context import MergeContext
from mergetune.merging.engine import Merger, compile_available
from mergetune.merging.mergekit_spec import APPROXIMATE, MergekitRefusal, MergekitSpec
from mergetune.merging.methods import (
    METHODS,
    ChunkMethod,
    MethodOptions,
    Prepared,
    get_method,
    parse_recipe,
    register,
    unregister,
)
from mergetune.merging.methods.base import WarmStart
from mergetune.merging.modelset import ModelSet
from mergetune.merging.ops import weighted_task_sum
from mergetune.recipe import Recipe

TASKS = ("a", "b", "c")
SHAPES = LAYERED_SHAPES
GROUP_OF = {"embed_tokens.weight": "embed", "norm.weight": "head"}  # else blocks.<layer>
# Methods that need data (RegMean's Gram files, computed per model set) run the rules that apply to them in
# their own test module (tests/test_regmean.py), with statistics for each model set; the rest run here.
STATIC = sorted(name for name, method in METHODS.items() if not method.dynamic and not method.needs_data)
DYNAMIC = sorted(name for name, method in METHODS.items() if method.dynamic)
# run through real mergekit: the task-arithmetic family, and the model-space methods (their own file)
EXACTNESS_TABLES = {"exact": {**MERGEKIT_EXACT, **GEO_EXACT}, "in distribution": MERGEKIT_RANDOM}
ATOL = 1e-5  # eager vs compiled: float rounding of fused kernels


# ---- models and recipes ----------------------------------------------------------------------------------
State = dict[str, torch.Tensor]


def unit_noise_models(shapes: dict[str, tuple[int, ...]], seed: int) -> tuple[State, dict[str, State]]:
    """A base and one expert per task: the base plus unit Gaussian noise (task vectors of every sign)."""
    return make_models(shapes, TASKS, seed=seed, noise=1.0)


def expert_count(name: str) -> int:
    """How many experts a method's contract recipes merge: its maximum, else three (SLERP takes one)."""
    low, high = get_method(name).experts
    return high or max(low, len(TASKS))


def load_models(shapes: dict[str, tuple[int, ...]], seed: int, n_tasks: int = len(TASKS)) -> ModelSet:
    base, experts = unit_noise_models(shapes, seed)
    return ModelSet.load(base, dict(list(experts.items())[:n_tasks]))


MATRIX_SHAPES = {"layers.0.w": (4, 5), "layers.1.w": (3, 4)}  # only tensors of several rows: one compiled graph
_MODELSETS: dict[tuple[str, int], ModelSet] = {}


def models_for(name: str, kind: str = "layered") -> ModelSet:
    """The contract's models (``layered``: SHAPES, seed 0; ``matrices``) with as many experts as ``name`` takes."""
    key = (kind, expert_count(name))
    if key not in _MODELSETS:
        _MODELSETS[key] = load_models(*((SHAPES, 0) if kind == "layered" else (MATRIX_SHAPES, 1)), key[1])
    return _MODELSETS[key]


@pytest.fixture(scope="module")
def modelset() -> ModelSet:
    return load_models(SHAPES, seed=0)


@pytest.fixture(scope="module")
def matrices() -> ModelSet:
    """Only tensors of several rows: one compiled graph per kernel."""
    return load_models(MATRIX_SHAPES, seed=1)


def contract_recipe(name: str, **fields: Any) -> Recipe:
    """The method's paper default (its warm start) with distinct λ per task, so tasks are told apart."""
    start: WarmStart = get_method(name).warm_start
    tasks = TASKS[: expert_count(name)]
    weights = {"a": start.weight, "b": 0.5 * start.weight, "c": 1.5 * start.weight}
    data: dict[str, Any] = {
        "base": "base",
        "experts": [{"name": t, "model": t} for t in tasks],
        "method": name,
        "weight": {t: weights[t] for t in tasks},
        "density": start.density,
        "options": dict(start.options),
        "seed": 3,
    }
    return parse_recipe(data | fields)


def merged(modelset: ModelSet, recipe: Recipe, **merger: Any) -> State:
    return {k: v.clone() for k, v in Merger(modelset, **{"compile": False, **merger}).merge(recipe).items()}


def base_of(modelset: ModelSet) -> State:
    return {s.name: modelset.base_tensor(s.name).clone() for s in modelset.segments}


def assert_equal(ours: State, expected: State) -> None:
    assert set(ours) == set(expected)
    for name, value in ours.items():
        assert torch.equal(value, expected[name]), f"{name}: max |diff| {float((value - expected[name]).abs().max())}"


# ---- the rules -------------------------------------------------------------------------------------------
def check_chunk_invariance(name: str, shapes: dict[str, tuple[int, ...]], seed: int, chunk_size: int) -> None:
    """Chunks of whole rows only change how the work is cut: the same bits for any chunk size."""
    ms = load_models(shapes, seed, expert_count(name))
    recipe = contract_recipe(name)
    assert_equal(merged(ms, recipe, chunk_size=chunk_size), merged(ms, recipe))


def check_rerun_is_identical(name: str, modelset: ModelSet) -> None:
    """A recipe gives the same bits every time, from the same Merger or a new one; only random methods see the seed."""
    recipe = contract_recipe(name)
    merger = Merger(modelset, compile=False)
    first = {k: v.clone() for k, v in merger.merge(recipe).items()}
    assert_equal({k: v.clone() for k, v in merger.merge(recipe).items()}, first)
    assert_equal(merged(modelset, recipe), first)
    other_seed = merged(modelset, recipe.model_copy(update={"seed": recipe.seed + 1}))
    if get_method(name).random:
        assert any(not torch.equal(other_seed[k], first[k]) for k in first), "a random method ignores the seed"
    else:
        assert_equal(other_seed, first)


def check_compiled_matches_eager(name: str, modelset: ModelSet) -> None:
    """The compiled kernels agree with the eager ones to float rounding.

    Run on ``matrices`` (tensors of several rows): chunks of one row would compile a second graph per
    method, doubling the slowest test here for no other rule.
    """
    recipe = contract_recipe(name)
    eager, compiled = merged(modelset, recipe), merged(modelset, recipe, compile=True)
    for k, value in eager.items():
        torch.testing.assert_close(compiled[k], value, atol=ATOL, rtol=ATOL)


def check_zero_weights_give_the_base(name: str, modelset: ModelSet) -> None:
    """λ = 0 for every task and group adds nothing: the merged model is the base, bit for bit."""
    assert_equal(merged(modelset, contract_recipe(name, weight=0.0)), base_of(modelset))


def group_of(tensor: str) -> str:
    return GROUP_OF.get(tensor, f"blocks.{tensor.split('.')[1]}")


def check_group_values_are_honoured(name: str, modelset: ModelSet) -> None:
    """λ = 0 in one layer group keeps its tensors at the base while every other group changes.

    Density 0.9 keeps most entries, so that even a tensor of one row of 4 keeps some (a sparse
    method may rightly keep nothing of a tiny tensor at its paper's density).
    """
    method = get_method(name)
    recipe = contract_recipe(name, weight={"*": {"blocks.0": 0.0, "*": method.warm_start.weight}}, density=0.9)
    out, base = merged(modelset, recipe), base_of(modelset)
    moved = {group_of(t) for t in out if not torch.equal(out[t], base[t])}
    groups = {group_of(t) for t in out}
    if method.may_keep_nothing:  # the groups that move at all (its rule may keep nothing of a small tensor)
        everywhere = merged(modelset, contract_recipe(name, density=0.9))
        groups = {group_of(t) for t in out if not torch.equal(everywhere[t], base[t])}
        assert "blocks.0" in groups and len(groups) > 2, "the rule is not exercised: almost nothing moves"
    assert moved == groups - {"blocks.0"}


def check_group_weights_change_only_their_group(name: str, modelset: ModelSet) -> None:
    """For a method whose λ = 0 is not the base: another λ of the first task in one layer group changes
    that group's tensors and no other (the rule above, where the base is no reference)."""
    start = get_method(name).warm_start.weight
    weights: dict[str, Any] = {"a": start, "b": 0.5 * start, "c": 1.5 * start}
    changed = {t: weights[t] for t in TASKS[: expert_count(name)]} | {"a": {"blocks.0": 2.0 * start, "*": start}}
    before, after = merged(modelset, contract_recipe(name)), merged(modelset, contract_recipe(name, weight=changed))
    moved = {group_of(t) for t in before if not torch.equal(before[t], after[t])}
    assert moved == {"blocks.0"}


def check_density_out_of_range_is_refused(name: str) -> None:
    """A density outside [0, 1] is an error naming the field, whatever the method."""
    for density in (-0.1, 1.5):
        with pytest.raises(RecipeError, match="density"):
            contract_recipe(name, density=density)


def check_density_zero(name: str, modelset: ModelSet) -> None:
    """Density 0 keeps no entry of any task vector: the base; or, where the method cannot keep nothing
    (DELLA's keep probabilities d ± ε), an error naming the density. A method without density ignores it."""
    method = get_method(name)
    recipe = contract_recipe(name, density=0.0)
    if not method.uses_density:
        assert_equal(merged(modelset, recipe), merged(modelset, contract_recipe(name, density=1.0)))
        return
    try:
        out = merged(modelset, recipe)
    except RecipeError as exc:
        assert "density" in str(exc)
        return
    assert_equal(out, base_of(modelset))


# Density 1 keeps every entry: where the papers say the method then IS another one (documented in the
# method modules), the two merges agree. PCB is left out: at r = 1 it still drops the minimum β of each
# block, which no other method does.
DENSITY_ONE: dict[str, tuple[dict[str, Any], str, dict[str, Any]]] = {
    "ties": ({}, "ties", {"density": 1.0, "options": {"scope": "tensor"}}),  # the ranking scope is moot
    "dare_linear": ({}, "task_arithmetic", {"density": 1.0}),
    "dare_ties": ({}, "ties", {"density": 1.0}),
    "breadcrumbs": ({"options": {"gamma": 0.0}}, "task_arithmetic", {"density": 1.0}),
    "breadcrumbs_ties": (
        {"options": {"gamma": 0.0}},
        "ties",
        {"density": 1.0, "options": {"weights": "before_election", "disjoint": "sum"}},
    ),
    "della": (
        {"options": {"epsilon": 0.0}},
        "ties",
        {"density": 1.0, "options": {"weights": "before_election", "disjoint": "weighted_mean"}},
    ),
}


def check_density_one(name: str, modelset: ModelSet) -> None:
    """At density 1 the method equals its documented density-free counterpart (same λ per task)."""
    ours_fields, other, other_fields = DENSITY_ONE[name]
    weight = contract_recipe(name).weight
    ours = merged(modelset, contract_recipe(name, density=1.0, **ours_fields))
    theirs = merged(modelset, contract_recipe(other, weight=weight, **other_fields))
    for k, value in ours.items():
        torch.testing.assert_close(value, theirs[k], atol=1e-6, rtol=1e-6)


def check_declarations(name: str) -> None:
    """Search ranges are ordered and sensible, and the warm start is a valid recipe inside them."""
    method = get_method(name)
    for rng in (method.search_weight, method.search_density):
        assert rng is None or rng[0] < rng[1]
    if method.search_density is not None:
        assert 0.0 <= method.search_density[0] < method.search_density[1] <= 1.0
        assert method.uses_density
    recipe = contract_recipe(name)  # parse_recipe: the warm start's options are valid for the method
    assert recipe.method == name
    assert isinstance(method.mergekit, MergekitSpec | MergekitRefusal)


def check_mergekit_export(name: str, models: ModelDirs) -> None:
    """The export does what the class declares: refused with its reason, approximate only when asked,
    or exact / exact in distribution, in which case the real-mergekit tests run a recipe of the method."""
    spec = get_method(name).mergekit
    base, experts = models
    models = (base, dict(list(experts.items())[: expert_count(name)]))
    recipe = make_recipe(models, name, {"weight": 0.5, "density": 0.5})
    if isinstance(spec, MergekitRefusal):
        with pytest.raises(ExportError, match="no mergekit equivalent"):
            export_mergekit(recipe)
        return
    if spec.faithful == APPROXIMATE:
        with pytest.raises(ExportError, match="--approximate"):
            export_mergekit(recipe)
        exported = export_mergekit(recipe, approximate=True)
        assert (exported.method, exported.faithful) == (spec.method, APPROXIMATE)
        return
    table = EXACTNESS_TABLES[spec.faithful]
    cases = {case: fields for case, fields in table.items() if fields.get("method", case) == name}
    assert cases, f"{name} is declared {spec.faithful} for mergekit but no real-mergekit test runs it"
    for case, fields in cases.items():
        exported = export_mergekit(make_recipe(models, case, fields))
        assert exported.method in (spec.method, *spec.also_imports)  # della_linear: della without sign election
        assert (exported.faithful, exported.differences) == (spec.faithful, [])


def check_dynamic_is_refused_by_the_engine(name: str, modelset: ModelSet) -> None:
    """A dynamic method has no single set of merged weights: the engine refuses it with a RecipeError."""
    with pytest.raises(RecipeError, match="dynamic"):
        merged(modelset, contract_recipe(name))


# ---- the tests: every registered method ------------------------------------------------------------------
SMALL_SHAPES = st.dictionaries(
    st.sampled_from(["embed_tokens.weight", "layers.0.w", "layers.0.bias", "layers.1.w", "norm.weight"]),
    st.tuples(st.integers(1, 5), st.integers(1, 7)),
    min_size=1,
).map(lambda d: {n: (s[1],) if n.endswith(("bias", "norm.weight")) else s for n, s in d.items()})
FAST = settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.mark.parametrize("name", STATIC)
@FAST
@given(shapes=SMALL_SHAPES, seed=st.integers(0, 2**16), chunk_size=st.integers(1, 40))
def test_chunking_does_not_change_the_merge(name: str, shapes: dict[str, tuple[int, ...]], seed: int, chunk_size: int):
    check_chunk_invariance(name, shapes, seed, chunk_size)


@pytest.mark.parametrize("name", STATIC)
def test_rerun_with_the_same_seed_is_bit_identical(name: str) -> None:
    check_rerun_is_identical(name, models_for(name))


@pytest.mark.skipif(not compile_available(torch.device("cpu")), reason="no C++ compiler for torch.compile")
@pytest.mark.parametrize("name", STATIC)
def test_compiled_kernels_match_eager(name: str) -> None:
    check_compiled_matches_eager(name, models_for(name, "matrices"))


# average normalises the weights of each group: all λ = 0 is a documented error, checked instead.
# Methods whose λ is not a task-vector coefficient declare zero_weight_is_base = False (the class says
# why: linear's plain sum, NuSLERP's ratio, passthrough's scale, ...) and keep the rule after these.
ZERO_IS_BASE = [n for n in STATIC if n != "average" and get_method(n).zero_weight_is_base]


@pytest.mark.parametrize("name", ZERO_IS_BASE)
def test_zero_weights_give_the_base(name: str) -> None:
    check_zero_weights_give_the_base(name, models_for(name))


@pytest.mark.parametrize("name", ZERO_IS_BASE)
def test_per_group_weights_are_honoured(name: str) -> None:
    check_group_values_are_honoured(name, models_for(name))


@pytest.mark.parametrize("name", [n for n in STATIC if not get_method(n).zero_weight_is_base])
def test_per_group_weights_change_only_their_group(name: str) -> None:
    check_group_weights_change_only_their_group(name, models_for(name))


def test_average_refuses_weights_summing_to_zero(modelset: ModelSet) -> None:
    with pytest.raises(RecipeError, match="sum to 0"):
        merged(modelset, contract_recipe("average", weight={"*": {"blocks.0": 0.0, "*": 1.0}}))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_density_outside_unit_interval_is_refused(name: str) -> None:
    check_density_out_of_range_is_refused(name)


@pytest.mark.parametrize("name", STATIC)
def test_density_zero_keeps_nothing(name: str) -> None:
    check_density_zero(name, models_for(name))


@pytest.mark.parametrize("name", sorted(DENSITY_ONE))
def test_density_one_equals_the_documented_counterpart(name: str, modelset: ModelSet) -> None:
    check_density_one(name, modelset)


def test_every_density_method_but_pcb_has_a_density_one_counterpart() -> None:
    """So the table above cannot silently miss a method (PCB: see the comment on DENSITY_ONE)."""
    using = {n for n in STATIC if get_method(n).uses_density}
    assert using - set(DENSITY_ONE) == {"pcb"}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_declarations_are_valid(name: str) -> None:
    check_declarations(name)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_mergekit_export_is_as_declared(name: str, tiny_llama_dir: ModelDirs) -> None:
    check_mergekit_export(name, tiny_llama_dir)


def test_each_importable_mergekit_method_reads_back_as_one_registered_method() -> None:
    """mergekit's methods that mergetune imports (mergekit 0.1.5's task-arithmetic family and linear)."""
    specs = importable()  # raises if two registered methods claim the same mergekit method
    assert all(spec.method == mergekit_method for mergekit_method, spec in specs.items())
    family = {"task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "della"}
    sparse = {"della_linear", "sce", "ram", "ramplus_tl"}
    model_space = {
        "slerp",
        "nuslerp",
        "multislerp",
        "karcher",
        "passthrough",
        "model_stock",
        "nearswap",
        "arcee_fusion",
    }
    assert set(specs) == family | sparse | {"linear"} | model_space


@pytest.mark.parametrize("name", DYNAMIC)
def test_dynamic_methods_are_refused_by_the_engine(name: str, modelset: ModelSet) -> None:
    check_dynamic_is_refused_by_the_engine(name, modelset)


# ---- a toy method: covered by the same rules without editing any module --------------------------------
class ToyOptions(MethodOptions):
    scale: float = 2.0


def scaled_sum(tau: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return scale * weighted_task_sum(tau.unbind(0), weight)


class ToyScaledSum(ChunkMethod):
    """Δ = scale · Σ_t λ_t τ_t: Task Arithmetic times a constant."""

    name = "toy_scaled_sum"
    Options = ToyOptions
    kernel = staticmethod(scaled_sum)
    search_weight = (0.0, 0.5)
    warm_start = WarmStart(weight=0.2, density=1.0)

    def prepare(self, ctx: MergeContext) -> Prepared:
        weight = ctx.per_row(ctx.weight)
        scale = torch.full((1, weight.shape[1]), float(ctx.options.scale), device=weight.device)
        return Prepared(row_args={"weight": weight, "scale": scale})


@pytest.fixture
def toy() -> Iterator[str]:
    """The toy method, registered for the duration of one test."""
    register(ToyScaledSum())
    try:
        yield ToyScaledSum.name
    finally:
        unregister(ToyScaledSum.name)


RULES: list[Callable[..., None]] = [
    check_rerun_is_identical,
    check_zero_weights_give_the_base,
    check_group_values_are_honoured,
    check_density_zero,
]


def test_a_toy_method_is_covered_without_editing_any_module(
    toy: str, modelset: ModelSet, matrices: ModelSet, tiny_llama_dir: ModelDirs
) -> None:
    check_declarations(toy)
    check_density_out_of_range_is_refused(toy)
    check_chunk_invariance(toy, SHAPES, seed=5, chunk_size=3)
    for rule in RULES:
        rule(toy, modelset)
    if compile_available(torch.device("cpu")):
        check_compiled_matches_eager(toy, matrices)
    check_mergekit_export(toy, tiny_llama_dir)  # no mergekit spec declared: refused by default
    # and it merges what it says: twice Task Arithmetic with the same λ
    weight = contract_recipe(toy).weight
    ours, ta = (
        merged(modelset, contract_recipe(toy)),
        merged(modelset, contract_recipe("task_arithmetic", weight=weight)),
    )
    base = base_of(modelset)
    for k in ours:
        torch.testing.assert_close(ours[k] - base[k], 2.0 * (ta[k] - base[k]), atol=1e-6, rtol=1e-6)


def test_the_toy_is_gone_after_its_test() -> None:
    assert ToyScaledSum.name not in METHODS
