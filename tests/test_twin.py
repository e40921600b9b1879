"""Twin-Merging: SVD compression, router, batched low-rank hooks, save/load, on real tiny models.

Expectations are independent of the code under test: reconstructions from ``torch.linalg.svd`` in
float64, exclusive knowledge θ_t − θ* recomputed from the experts' safetensors, routing weights by
hand, and the batched hooks against the naive per-example materialisation of θ(x).
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoTokenizer

from mergetune.errors import RecipeError
from mergetune.merging.engine import Merger
from mergetune.merging.methods import parse_recipe
from mergetune.merging.methods.twin import TwinOptions, shared_recipe
from mergetune.merging.modelset import ModelSet
from mergetune.objectives.models import load_task_model
from mergetune.objectives.suite import ValidationSuite
from mergetune.objectives.tasks import TaskConfig
from mergetune.recipe import Recipe
from mergetune.twin import TwinCache, build_twin
from mergetune.twin.adapters import Routing, adapters
from mergetune.twin.exclusive import compress_tensor, exclusive_knowledge, kept_rank, truncated_svd
from mergetune.twin.io import TwinFolderError, load_twin, save_twin, twin_task_models
from mergetune.twin.reference import NaiveTwin
from mergetune.twin.router import routing_accuracy, routing_weights, task_features, train_router


class Resident:
    """The tiny zoo loaded once: ModelSet, merger, task models bound to its buffer, tasks, tokenizer."""

    def __init__(self, zoo) -> None:
        self.zoo = zoo
        self.tasks = [c.load() for c in zoo.tasks.values()]
        self.tokenizer = AutoTokenizer.from_pretrained(zoo.base)
        self.modelset = ModelSet.load(zoo.base, [(t, str(p)) for t, p in zoo.experts.items()])
        self.merger = Merger(self.modelset, compile=False)
        self.models = {t.name: load_task_model(t, zoo.experts[t.name]) for t in self.tasks}
        for model in self.models.values():
            self.merger.bind(model)

    def recipe(self, weight: float = 0.3, **options: object) -> Recipe:
        return Recipe(
            base=str(self.zoo.base), experts=self.zoo.recipe_experts(), method="twin", weight=weight, options=options
        )

    def build(self, recipe: Recipe, **kwargs: object):
        body = next(iter(self.models.values())).base_model
        return build_twin(recipe, self.modelset, self.merger, body, self.tasks, self.tokenizer, **kwargs)

    def texts(self, per_task: int) -> list[tuple[str, str]]:
        return [(t.name, text) for t in self.tasks for text in t.validation.texts[:per_task]]


@pytest.fixture(scope="module")
def resident(tiny_zoo) -> Resident:
    torch.manual_seed(0)
    return Resident(tiny_zoo)


# ---- compression ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("shape", "rank"), [((5, 4), 1), ((5, 4), 3), ((6, 9), 4), ((7, 7), 7)])
def test_truncated_svd_equals_torch_svd_reconstruction(shape: tuple[int, int], rank: int) -> None:
    gen = torch.Generator().manual_seed(sum(shape) + rank)
    v = torch.randn(3, *shape, generator=gen)
    us, vt, errors = truncated_svd(v, rank)
    assert us.shape == (3, shape[0], rank) and vt.shape == (3, rank, shape[1])
    for t in range(3):
        u, s, vh = torch.linalg.svd(v[t].double(), full_matrices=False)
        expected = u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]
        torch.testing.assert_close((us[t] @ vt[t]).double(), expected, atol=1e-5, rtol=1e-5)
        direct = float(torch.linalg.norm(v[t].double() - expected) / torch.linalg.norm(v[t].double()))
        assert errors[t] == pytest.approx(direct, abs=1e-6)
    assert (max(errors) < 1e-6) == (rank == min(shape))


def test_kept_rank_from_a_fraction_or_a_fixed_rank() -> None:
    assert kept_rank((384, 1536), TwinOptions()) == 38  # ⌊0.1 · 384⌋
    assert kept_rank((2, 384), TwinOptions()) == 1  # at least one singular triplet
    assert kept_rank((10, 10), TwinOptions(rank_fraction=0.3)) == 3
    assert kept_rank((8, 4, 3), TwinOptions(rank_fraction=0.5)) == 4  # seen as 8 × 12
    assert kept_rank((6, 5), TwinOptions(rank=64)) == 5  # capped at min(m, n)


def test_compress_tensor_keeps_or_drops_1d_and_skips_zero_knowledge() -> None:
    gen = torch.Generator().manual_seed(1)
    bias = torch.randn(2, 7, generator=gen)
    dense = compress_tensor("b", bias, TwinOptions())
    assert dense is not None and dense.kind == "dense" and torch.equal(dense.reconstruct(), bias)
    dropped = compress_tensor("b", bias, TwinOptions(one_d="drop"))
    assert dropped is not None and dropped.kind == "dropped" and dropped.rel_error == (1.0, 1.0)
    assert dropped.reconstruct() is None
    assert compress_tensor("w", torch.zeros(2, 4, 4), TwinOptions()) is None
    kernel = torch.randn(2, 4, 3, 2, generator=gen)
    conv = compress_tensor("c", kernel, TwinOptions(rank=6))
    assert conv is not None and conv.rank == 4  # seen as a 4 × 6 matrix: rank capped at 4, so exact
    torch.testing.assert_close(conv.reconstruct(), kernel, atol=1e-5, rtol=1e-5)
    assert max(conv.rel_error) < 1e-6


def test_exclusive_knowledge_is_expert_minus_shared(tiny_bert_dir) -> None:
    """At full rank v̂_t equals θ_t − θ*, with θ* = θ_0 + 0.3 Σ τ and θ_t read from the experts' files."""
    base_dir, experts = tiny_bert_dir
    modelset = ModelSet.load(base_dir, list(experts.items()))
    base = load_file(str(base_dir / "model.safetensors"))
    states = {t: load_file(str(p / "model.safetensors")) for t, p in experts.items()}
    shared = {n: base[n] + 0.3 * sum(states[t]["bert." + n] - base[n] for t in experts) for n in base}
    knowledge = exclusive_knowledge(modelset, shared, TwinOptions(rank_fraction=1.0))
    assert knowledge.tasks == tuple(experts)
    for name, tensor in knowledge.tensors.items():
        for t, task in enumerate(experts):
            torch.testing.assert_close(
                tensor.reconstruct()[t], states[task]["bert." + name] - shared[name], atol=1e-5, rtol=1e-4
            )
    low = exclusive_knowledge(modelset, shared, TwinOptions(rank=1))
    query = low.tensors["encoder.layer.0.attention.self.query.weight"]
    assert query.rank == 1 and min(query.rel_error) > 0.1


# ---- router -----------------------------------------------------------------------------------------


def test_routing_weights_softmax_temperature_and_top_k() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    soft = routing_weights(logits, 0.5, None)
    torch.testing.assert_close(soft, torch.exp(logits / 0.5) / torch.exp(logits / 0.5).sum(-1, keepdim=True))
    top2 = routing_weights(logits, 1.0, 2)
    e = torch.exp(torch.tensor([2.0, 1.0]))
    torch.testing.assert_close(top2[0], torch.tensor([e[0] / e.sum(), e[1] / e.sum(), 0.0]))
    assert torch.equal(routing_weights(logits, 1.0, 1), torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    torch.testing.assert_close(routing_weights(logits, 1.0, 3), routing_weights(logits, 1.0, None))


VOCABULARIES = {
    "numbers": ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "twenty", "hundred"),
    "colours": ("red", "green", "blue", "yellow", "purple", "orange", "crimson", "teal", "azure", "violet"),
    "animals": ("otter", "badger", "heron", "falcon", "walrus", "lynx", "beaver", "weasel", "ferret", "bison"),
}


def separable_tasks(folder: Path) -> list:
    """Three tasks whose inputs use disjoint vocabularies (labels random): trivially separable by domain."""
    rng = random.Random(0)
    tasks = []
    for name, words in VOCABULARIES.items():
        path = folder / f"{name}.csv"
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            for _ in range(240):
                writer.writerow([" ".join(rng.choices(words, k=rng.randint(3, 9))), rng.choice("ab")])
        config = TaskConfig(name=name, source=str(path), validation_size=60, test_size=30, max_length=16)
        tasks.append(config.load())
    return tasks


def test_router_learns_separable_tasks_from_training_splits_only(tiny_zoo, tmp_path: Path) -> None:
    body = AutoModel.from_pretrained(tiny_zoo.base)
    tokenizer = AutoTokenizer.from_pretrained(tiny_zoo.base)
    tasks = separable_tasks(tmp_path)
    options = TwinOptions(router_examples=None)
    features, labels = task_features(body, tasks, "train", tokenizer, None)
    assert len(labels) == sum(len(t.train) for t in tasks)
    router = train_router(features, labels, len(tasks), options, seed=3)
    val_features, val_labels = task_features(body, tasks, "validation", tokenizer, None)
    accuracy = routing_accuracy(router, val_features, val_labels, list(VOCABULARIES))
    assert min(accuracy.values()) >= 0.95, accuracy
    again = train_router(features, labels, len(tasks), options, seed=3)  # seeded: the same router
    assert all(
        torch.equal(a, b) for a, b in zip(router.state_dict().values(), again.state_dict().values(), strict=True)
    )


def test_twin_router_is_the_one_trained_on_the_training_splits(resident: Resident) -> None:
    twin = resident.build(resident.recipe(router_examples=64), validation_routing=True)
    body = next(iter(resident.models.values())).base_model
    features, labels = task_features(body, resident.tasks, "train", resident.tokenizer, 64)
    expected = train_router(features, labels, 3, twin.options, seed=0)
    for (name, a), b in zip(twin.router.state_dict().items(), expected.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert set(twin.validation_routing) == {t.name for t in resident.tasks}
    assert sum(twin.validation_routing.values()) / 3 > 0.5  # 3 tasks: chance is 1/3


def test_twin_cache_reuses_the_latest_values_by_key() -> None:
    cache, calls = TwinCache(size=2), []

    def compute(value: int) -> int:
        calls.append(value)
        return value

    assert [cache.get("router", {"k": k}, lambda k=k: compute(k)) for k in (1, 2, 1, 3, 2, 1)] == [1, 2, 1, 3, 2, 1]
    # 1 is re-used (hit); 3 evicts 2 (the least recently used); 2 then evicts 1, so 1 is computed again
    assert calls == [1, 2, 3, 2, 1]


# ---- batched inference ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [{}, {"top_k": 1, "temperature": 0.5}, {"top_k": 2, "rank": 2, "one_d": "drop"}],
    ids=["soft", "top1", "top2-rank2-drop1d"],
)
def test_batched_hooks_equal_naive_per_example_materialisation(resident: Resident, options: dict) -> None:
    twin = resident.build(resident.recipe(**options))
    pairs = resident.texts(per_task=8)
    batch = resident.tokenizer([t for _, t in pairs], padding=True, truncation=True, max_length=32, return_tensors="pt")
    task = resident.tasks[0].name
    model = resident.models[task]
    with torch.inference_mode():
        shared_logits = model(**batch).logits
        with twin.routed({task: model}) as routed:
            batched = routed[task](**batch).logits
        naive = NaiveTwin(twin)
        for i, (_, text) in enumerate(pairs):
            one = resident.tokenizer(text, truncation=True, max_length=32, return_tensors="pt")
            torch.testing.assert_close(batched[i : i + 1], naive.logits(model, one), atol=2e-5, rtol=1e-4)
        assert (batched - shared_logits).abs().max() > 1e-3  # the exclusive knowledge changes the outputs
        torch.testing.assert_close(model(**batch).logits, shared_logits, atol=0, rtol=0)  # hooks removed


def test_routed_scores_count_routes_against_the_task_never_its_label(resident: Resident) -> None:
    twin = resident.build(resident.recipe())
    suite = ValidationSuite(resident.tasks, resident.tokenizer, max_examples=20)
    with twin.routed(resident.models) as routed:
        suite.score(routed)
        assert all(m.routed == 20 for m in routed.values())
        routes = {name: m.routing_accuracy for name, m in routed.items()}
    body = next(iter(resident.models.values())).base_model
    features, labels = task_features(body, resident.tasks, "validation", resident.tokenizer, 20)
    assert routes == pytest.approx(routing_accuracy(twin.router, features, labels, list(routes)), abs=1e-9)


def test_routed_models_score_under_bf16_autocast(resident: Resident) -> None:
    """A search may score under bf16 autocast: the hooks' products then run in bf16, predictions barely move."""
    twin = resident.build(resident.recipe())
    suites = {
        dtype: ValidationSuite(resident.tasks, resident.tokenizer, autocast=dtype) for dtype in (None, torch.bfloat16)
    }
    with twin.routed(resident.models) as routed:
        scores = {dtype: suite.score(routed).scores for dtype, suite in suites.items()}
    assert scores[None] == pytest.approx(scores[torch.bfloat16], abs=0.05)


def test_adapters_refuse_modules_they_cannot_route(tiny_llama_dir) -> None:
    base_dir, experts = tiny_llama_dir
    modelset = ModelSet.load(base_dir, list(experts.items()))
    shared = {s.name: modelset.base_tensor(s.name) for s in modelset.segments}
    model = load_task_model(TaskConfig(name="lm", source="trec6", kind="lm"), experts["math"])
    dense = exclusive_knowledge(modelset, shared, TwinOptions())
    with pytest.raises(RecipeError, match=r"LlamaRMSNorm.*one_d: drop"), adapters(model, dense, Routing()):
        pass
    with adapters(model, exclusive_knowledge(modelset, shared, TwinOptions(one_d="drop")), Routing()):
        assert any(m._forward_hooks for m in model.modules())
    assert not any(m._forward_hooks for m in model.modules())


# ---- recipes ----------------------------------------------------------------------------------------


def test_twin_recipe_validates_its_shared_merge_and_is_not_a_static_merge(resident: Resident) -> None:
    recipe = resident.recipe(weight=0.5, shared_method="ties", shared_options={"disjoint": "sum"})
    shared = shared_recipe(recipe)
    assert (shared.method, shared.weight, shared.options) == ("ties", 0.5, {"disjoint": "sum"})
    for bad, where in [({"shared_method": "twin"}, "shared_method"), ({"shared_options": {"dsjoint": 1}}, "dsjoint")]:
        with pytest.raises(RecipeError, match=where):
            parse_recipe({**recipe.to_dict(), "options": {"shared_method": "ties", **bad}})
    with pytest.raises(RecipeError, match="mergetune twin build"):
        resident.merger.merge(recipe)
    with pytest.raises(RecipeError, match="top_k"):
        resident.build(resident.recipe(top_k=4))


# ---- save and load ----------------------------------------------------------------------------------


def test_save_load_round_trip_scores_bit_for_bit(resident: Resident, tmp_path: Path) -> None:
    twin = resident.build(resident.recipe(rank_fraction=0.2, temperature=0.7), validation_routing=True)
    suite = ValidationSuite(resident.tasks, resident.tokenizer)
    with twin.routed(resident.models) as routed:
        before = suite.score(routed)
    configs = [t.config for t in resident.tasks]
    folder = save_twin(twin, resident.modelset, configs, tmp_path / "twin")

    loaded = load_twin(folder)
    assert loaded.twin.recipe == twin.recipe and loaded.tasks == configs
    for name, t in twin.knowledge.tensors.items():
        back = loaded.twin.knowledge.tensors[name]
        assert back.kind == t.kind and back.rel_error == t.rel_error
        assert all(torch.equal(a, back.tensors()[role]) for role, a in t.tensors().items()), name
    for key, value in twin.router.state_dict().items():
        assert torch.equal(value, loaded.twin.router.state_dict()[key]), key
    for name, value in twin.shared.items():
        assert torch.equal(value, loaded.twin.shared[name]), name

    models = twin_task_models(loaded, resident.tasks)
    with loaded.twin.routed(models) as routed:
        after = suite.score(routed)
    assert after.scores == before.scores
    assert {n: t.metrics for n, t in after.tasks.items()} == {n: t.metrics for n, t in before.tasks.items()}
    assert AutoModel.from_pretrained(folder / "shared").config.model_type == "bert"  # θ* is a plain HF folder


def test_load_names_the_file_and_tensor_at_fault(resident: Resident, tmp_path: Path) -> None:
    twin = resident.build(resident.recipe())
    folder = save_twin(twin, resident.modelset, [t.config for t in resident.tasks], tmp_path / "twin")
    state = load_file(str(folder / "exclusive.safetensors"))
    key = "encoder.layer.0.attention.self.query.weight::us"
    state[key] = state[key][:, :, :1].contiguous()
    save_file(state, str(folder / "exclusive.safetensors"))
    with pytest.raises(TwinFolderError, match=r"exclusive.safetensors.*query.weight::us.*shape"):
        load_twin(folder)
    (folder / "router.safetensors").unlink()
    with pytest.raises(TwinFolderError, match=r"router\.safetensors is missing"):
        load_twin(folder)
