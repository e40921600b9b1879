"""The merge engine against hand-written references: Task Arithmetic, TIES and its variants.

References here are deliberately naive (full sorts, Python loops over entries) and share no code
with the engine.
"""

from __future__ import annotations

import pytest
import torch
from conftest import LAYERED_SHAPES, make_models, make_recipe, merge

from mergetune.errors import RecipeError
from mergetune.merging.engine import Merger
from mergetune.merging.modelset import ModelSet
from mergetune.merging.stats import NaiveStatistics, Scope, keep_counts
from mergetune.recipe import Recipe

TASKS = ["a", "b", "c"]
SHAPES = LAYERED_SHAPES


def flat(d: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([d[n].reshape(-1) for n in SHAPES])


def task_vectors(base: dict, experts: dict) -> dict[str, torch.Tensor]:
    """{tensor: [T, *shape]} of expert - base."""
    return {n: torch.stack([experts[t][n] - base[n] for t in TASKS]) for n in SHAPES}


def group_of(name: str) -> str:
    return {"embed_tokens.weight": "embed", "norm.weight": "head"}.get(name, f"blocks.{name.split('.')[1]}")


GROUPS = ["embed", "blocks.0", "blocks.1", "head"]


@pytest.fixture(scope="module")
def models():
    base, experts = make_models(SHAPES, TASKS, noise=1.0)
    return base, experts, ModelSet.load(base, experts)


def merged_flat(ms: ModelSet, r: Recipe, **kw: object) -> torch.Tensor:
    return flat(merge(ms, r, **kw))


def topk_mask(values: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the floor(d*n) largest |values| plus ties with the smallest kept (reference convention)."""
    n = values.numel()
    k = int(density * n + 1e-9)
    if k == 0:
        return torch.zeros_like(values, dtype=torch.bool)
    ordered = sorted(values.abs().reshape(-1).tolist(), reverse=True)
    return values.abs() >= ordered[k - 1]


def ties_reference(tv: torch.Tensor, weights: torch.Tensor, disjoint: str, before: bool) -> torch.Tensor:
    """Entry-by-entry TIES on trimmed [T, N] task vectors with per-task weights [T, N]."""
    out = torch.zeros(tv.shape[1])
    for i in range(tv.shape[1]):
        col, w = tv[:, i].tolist(), weights[:, i].tolist()
        voted = [c * (wt if before else 1.0) for c, wt in zip(col, w, strict=True)]
        total = sum(voted)
        if total != 0:
            gamma = 1.0 if total > 0 else -1.0
        else:
            votes = sum((v > 0) - (v < 0) for v in voted)
            gamma = float((votes > 0) - (votes < 0))
        agree = [v * gamma > 0 for v in voted]
        num = sum(c * wt for c, wt, a in zip(col, w, agree, strict=True) if a)
        if disjoint == "sum":
            out[i] = num
        elif disjoint == "mean":
            out[i] = num / max(1, sum(agree))
        else:
            den = sum(wt for wt, a in zip(w, agree, strict=True) if a)
            out[i] = num / den if den != 0 else 0.0
    return out


def test_task_arithmetic_per_task_and_per_group(models):
    base, experts, ms = models
    weight = {"a": 0.5, "b": [0.1, 0.2, 0.3, 0.4], "c": {"blocks.1": 2.0, "*": -1.0}}
    got = merged_flat(ms, make_recipe("task_arithmetic", TASKS, weight=weight))
    per_group = {"a": [0.5] * 4, "b": [0.1, 0.2, 0.3, 0.4], "c": [-1.0, -1.0, 2.0, -1.0]}
    tv = task_vectors(base, experts)
    expected = {
        n: base[n] + sum(per_group[t][GROUPS.index(group_of(n))] * tv[n][i] for i, t in enumerate(TASKS))
        for n in SHAPES
    }
    torch.testing.assert_close(got, flat(expected), rtol=0, atol=1e-6)


def test_average_is_mean_of_experts(models):
    _, experts, ms = models
    got = merged_flat(ms, make_recipe("average", TASKS))
    expected = {n: sum(experts[t][n] for t in TASKS) / 3 for n in SHAPES}
    torch.testing.assert_close(got, flat(expected), rtol=0, atol=1e-6)


def trimmed_flat(base, experts, density: float, scope: str) -> torch.Tensor:
    tv = task_vectors(base, experts)
    if scope == "global":
        full = torch.stack([torch.cat([tv[n][i].reshape(-1) for n in SHAPES]) for i in range(3)])
        return torch.stack([torch.where(topk_mask(full[i], density), full[i], 0.0) for i in range(3)])
    rows = []
    for i in range(3):
        parts = []
        for n in SHAPES:
            x = tv[n][i]
            if scope == "tensor":
                parts.append(torch.where(topk_mask(x, density), x, 0.0).reshape(-1))
            else:
                x2 = x.reshape(-1, x.shape[-1])
                parts.append(torch.stack([torch.where(topk_mask(r, density), r, 0.0) for r in x2]).reshape(-1))
        rows.append(torch.cat(parts))
    return torch.stack(rows)


@pytest.mark.parametrize("scope", ["global", "tensor", "row"])
@pytest.mark.parametrize(
    ("disjoint", "weights"),
    [("mean", "after_election"), ("sum", "after_election"), ("weighted_mean", "before_election")],
)
def test_ties_matches_reference(models, scope, disjoint, weights):
    base, experts, ms = models
    lam = {"a": 0.7, "b": 1.3, "c": 0.4}
    r = make_recipe(
        "ties",
        TASKS,
        weight=lam,
        density=0.3,
        options={"scope": scope, "disjoint": disjoint, "weights": weights, "scale": 1.5},
    )
    got = merged_flat(ms, r)
    trimmed = trimmed_flat(base, experts, 0.3, scope)
    w = torch.tensor([[lam[t]] for t in TASKS]).expand_as(trimmed)
    expected = flat(base) + 1.5 * ties_reference(trimmed, w, disjoint, weights == "before_election")
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def single_tensor_models(values: list[list[float]]) -> ModelSet:
    base = {"w": torch.zeros(len(values[0]))}
    experts = {t: {"w": torch.tensor(v)} for t, v in zip(TASKS, values, strict=True)}
    return ModelSet.load(base, experts)


def test_ties_keeps_ties_at_threshold():
    # density 0.25 of 4 entries keeps 1 entry; two entries tie at the largest magnitude: both kept.
    ms = single_tensor_models([[3.0, -3.0, 1.0, 0.5], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    out = Merger(ms, compile=False).merge(make_recipe("ties", TASKS, density=0.25, options={"disjoint": "sum"}))["w"]
    # sign sum of the kept entries: +3 at entry 0, -3 at entry 1; nothing else survives.
    assert out.tolist() == [3.0, -3.0, 0.0, 0.0]


def test_ties_zero_sign_sum_falls_back_to_majority():
    # entry 0: +2, -1, -1 -> sum 0; majority of signs is negative -> keep the two -1 (mean -1).
    ms = single_tensor_models([[2.0, 1.0], [-1.0, 1.0], [-1.0, 1.0]])
    out = Merger(ms, compile=False).merge(make_recipe("ties", TASKS, density=1.0))["w"]
    assert out.tolist() == [-1.0, 1.0]


def test_ties_density_zero_and_one(models):
    base, experts, ms = models
    zero = merged_flat(ms, make_recipe("ties", TASKS, density=0.0))
    torch.testing.assert_close(zero, flat(base), rtol=0, atol=0)
    full = merged_flat(ms, make_recipe("ties", TASKS, density=1.0, options={"disjoint": "sum"}))
    trimmed = trimmed_flat(base, experts, 1.0, "global")
    expected = flat(base) + ties_reference(trimmed, torch.ones_like(trimmed), "sum", False)
    torch.testing.assert_close(full, expected, rtol=0, atol=1e-5)


def test_one_element_tensor_per_row_scope():
    base = {"s": torch.zeros(1)}
    experts = {"a": {"s": torch.tensor([2.0])}, "b": {"s": torch.tensor([-0.5])}, "c": {"s": torch.tensor([1.0])}}
    ms = ModelSet.load(base, experts)
    # density 0.5 of a single entry keeps floor(0.5) = 0 entries; density 1.0 keeps it.
    r_half = make_recipe("ties", TASKS, density=0.5, options={"scope": "row"})
    assert Merger(ms, compile=False).merge(r_half)["s"].tolist() == [0.0]
    r_full = make_recipe("ties", TASKS, density=1.0, options={"scope": "row"})
    assert Merger(ms, compile=False).merge(r_full)["s"].tolist() == [1.5]  # mean of +2 and +1


def test_same_recipe_same_bits_and_chunking_does_not_matter(models):
    _, _, ms = models
    r = make_recipe(
        "ties", TASKS, weight={"a": [0.2, 0.9], "*": 0.5}, density={"*": 0.4, "b": {"blocks.0": 0.1, "*": 0.6}}
    )
    first = merged_flat(ms, r)
    again = flat(Merger(ms, compile=False).merge(r))
    tiny_chunks = merged_flat(ms, r, chunk_size=4)
    assert torch.equal(first, again)
    assert torch.equal(first, tiny_chunks)


@pytest.mark.parametrize("scope", list(Scope))
def test_precomputed_thresholds_equal_naive_kthvalue(models, scope):
    _, _, ms = models
    merger = Merger(ms, compile=False)
    layout = merger.layout(1)
    density = torch.tensor([[0.1, 0.5, 0.9, 0.3], [0.0, 1.0, 0.25, 0.7], [0.33, 0.66, 0.5, 0.05]], dtype=torch.float64)
    _, length = layout.rows.blocks(scope, ms)
    k = keep_counts(density, length, layout.rows.group)
    fast = layout.stats.kth_largest("abs", scope, k)
    naive = NaiveStatistics(ms, layout.rows).kth_largest("abs", scope, k)
    assert torch.equal(fast, naive)


def test_output_dtype_follows_recipe(models):
    _, _, ms = models
    out = Merger(ms, compile=False).merge(make_recipe("task_arithmetic", TASKS, weight=0.3, dtype="bfloat16"))
    assert all(t.dtype == torch.bfloat16 for t in out.values())


def test_recipe_tasks_must_match_models(models):
    _, _, ms = models
    wrong = Recipe(base="b", experts=[{"name": "x", "model": "m"}], method="task_arithmetic")
    with pytest.raises(RecipeError, match="do not match the loaded models"):
        Merger(ms, compile=False).merge(wrong)


def test_unknown_group_in_recipe_is_named(models):
    _, _, ms = models
    with pytest.raises(RecipeError, match=r"unknown layer group.*blocks\.7"):
        Merger(ms, compile=False).merge(
            make_recipe("task_arithmetic", TASKS, weight={"a": {"blocks.7": 1.0, "*": 0.0}, "*": 1.0})
        )


def test_compiled_kernels_agree_with_eager(models):
    """torch.compile fuses each kernel; it must compute the same merge (to float rounding)."""
    _, _, ms = models
    eager, compiled = Merger(ms, compile=False), Merger(ms, compile=True)
    for r in (make_recipe("task_arithmetic", TASKS, weight=0.3), make_recipe("ties", TASKS, weight=0.8, density=0.2)):
        torch.testing.assert_close(flat(compiled.merge(r)), flat(eager.merge(r)), rtol=1e-6, atol=1e-6)
    again = make_recipe("ties", TASKS, weight=0.8, density=0.2)
    assert torch.equal(flat(compiled.merge(again)), flat(Merger(ms, compile=True).merge(again)))


def test_bind_shares_memory_with_a_task_model_and_refuses_partial_binds(tiny_bert_dir):
    from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaModel

    base_dir, experts = tiny_bert_dir
    ms = ModelSet.load(base_dir, experts)
    merger = Merger(ms, compile=False)
    model = AutoModelForSequenceClassification.from_pretrained(next(iter(experts.values())))
    merger.bind(model)
    r = Recipe(
        base=str(base_dir),
        experts=[{"name": t, "model": str(p)} for t, p in experts.items()],
        method="task_arithmetic",
        weight=0.5,
    )
    merged = merger.merge(r)
    name = "encoder.layer.0.attention.self.query.weight"
    assert torch.equal(model.bert.encoder.layer[0].attention.self.query.weight, merged[name])
    with pytest.raises(RecipeError, match="cannot bind"):
        merger.bind(
            LlamaModel(
                LlamaConfig(
                    vocab_size=32, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16
                )
            )
        )


def test_bfloat16_storage_merges_close_to_float32(models):
    """Task vectors stored in bf16 (half the memory, e.g. on GPU) give the float32 merge to bf16 precision."""
    base, experts, ms32 = models
    ms16 = ModelSet.load(base, experts, storage_dtype=torch.bfloat16)
    assert ms16.tau.dtype == torch.bfloat16
    for r in (
        make_recipe("task_arithmetic", TASKS, weight=0.4),
        make_recipe("ties", TASKS, weight=0.8, density=0.5, options={"scope": "tensor"}),
    ):
        got16 = merged_flat(ms16, r)
        got32 = merged_flat(ms32, r)
        # bf16 keeps 8 bits of mantissa; a trim decision can flip only at near-ties.
        close = torch.isclose(got16, got32, rtol=2e-2, atol=2e-2)
        assert close.float().mean() > 0.97


@pytest.mark.parametrize(
    ("method", "options", "field"), [("tiez", {}, "method"), ("ties", {"dencity": 0.2}, "options.dencity")]
)
def test_merge_checks_method_and_options_before_any_work(models, method: str, options: dict, field: str) -> None:
    """A recipe built in code skips the entry points' check_recipe: the Merger runs it first."""
    merger = Merger(models[2], compile=False)
    with pytest.raises(RecipeError, match=rf"invalid recipe:\n  - {field}: "):
        experts = [{"name": t, "model": "x"} for t in TASKS]
        merger.merge(Recipe.parse({"base": "b", "experts": experts, "method": method, "options": options}))
    assert merger.extra_bytes() == 0  # nothing was precomputed or allocated
