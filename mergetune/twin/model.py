"""A Twin-Merging model (Lu et al., 2024): shared θ*, compressed exclusive knowledge, a router; built and run.

:func:`build_twin` turns a ``method: twin`` recipe into a :class:`Twin`:

1. θ* = the shared merge (the recipe's static ``shared_method`` with its weight/density), merged by the
   engine into its output buffer, so task models bound to that buffer compute with θ*;
2. v_t = θ_t − θ*, compressed per tensor (:mod:`.exclusive`);
3. the router trained on pooled θ* features of the tasks' training splits (:mod:`.router`).

:meth:`Twin.routed` wraps task models (θ* weights, each with its own task head) as
:class:`RoutedModel`: per batch, a forward of θ* gives the router's features and the routing weights
w(x), then the task model runs with the low-rank hooks of :mod:`.adapters` adding Σ_t w_t(x) v̂_t per
example. Each task is scored with its own head, as static merges are; the router only sees the input.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn

from mergetune.errors import RecipeError
from mergetune.forward import forward_params
from mergetune.merging.engine import Merger
from mergetune.merging.methods.twin import TwinOptions, shared_recipe, twin_options
from mergetune.merging.modelset import ModelSet
from mergetune.objectives.tasks import TaskData
from mergetune.recipe import Recipe
from mergetune.twin.adapters import Routing, adapters
from mergetune.twin.exclusive import ExclusiveKnowledge, exclusive_knowledge
from mergetune.twin.router import (
    Router,
    body_of,
    pooled_hidden,
    routing_accuracy,
    routing_weights,
    task_features,
    train_router,
)

T = TypeVar("T")


class RoutedModel(nn.Module):
    """A task model (θ* + its head, adapters installed) that routes each example of a batch.

    ``forward`` runs the router on θ*'s pooled features (hooks idle), then the model with the hooks
    adding each example's Σ_t w_t v̂_t. With ``task_index``, the argmax routes of every example seen are
    counted against it (routing accuracy on exactly the examples scored).
    """

    def __init__(
        self, model: nn.Module, router: Router, routing: Routing, options: TwinOptions, task_index: int | None = None
    ) -> None:
        super().__init__()
        self.model = model
        self.router = router
        self.routing = routing
        self.temperature = options.temperature
        self.top_k = options.top_k
        self.task_index = task_index
        self.routed = 0
        self.hits = 0

    def route(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Routing weights ``[B, T]`` from θ*'s mean-pooled last hidden state (the adapters add nothing here)."""
        assert self.routing.weights is None, "the router must see θ*, not an adapted model"
        logits = self.router(pooled_hidden(body_of(self.model), dict(inputs)))
        if self.task_index is not None:
            self.routed += logits.shape[0]
            self.hits += int((logits.argmax(-1) == self.task_index).sum())
        return routing_weights(logits.float(), self.temperature, self.top_k)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> Any:
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        given = {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": token_type_ids}
        given = {k: v for k, v in {**given, "position_ids": position_ids}.items() if v is not None}
        accepted = forward_params(self.model)
        with self.routing.routed(self.route(given)):
            return self.model(**{k: v for k, v in given.items() if k in accepted})

    @property
    def routing_accuracy(self) -> float | None:
        return self.hits / self.routed if self.routed else None


@dataclass
class Twin:
    """A built Twin-Merging model: the recipe, θ* (tensor name -> tensor), exclusive knowledge and router.

    ``shared`` may be views of a Merger's output buffer: valid until that merger merges again.
    """

    recipe: Recipe
    shared: Mapping[str, torch.Tensor]
    knowledge: ExclusiveKnowledge
    router: Router
    timings: dict[str, float] = field(default_factory=dict)
    validation_routing: dict[str, float] | None = None  # per task, on the validation splits (build report)

    @property
    def options(self) -> TwinOptions:
        return twin_options(self.recipe)

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.knowledge.tasks

    @contextmanager
    def routed(self, models: Mapping[str, nn.Module]) -> Iterator[dict[str, RoutedModel]]:
        """Each task model (θ* weights, its own head) as a RoutedModel, adapters installed for the block."""
        unknown = sorted(set(models) - set(self.tasks))
        if unknown:
            raise RecipeError(f"Twin: no expert for task(s) {unknown}; its tasks are {list(self.tasks)}")
        with ExitStack() as stack:
            routed = {}
            for name, model in models.items():
                routing = Routing()
                stack.enter_context(adapters(model, self.knowledge, routing))
                router = self.router.to(next(model.parameters()).device)
                routed[name] = RoutedModel(model, router, routing, self.options, self.tasks.index(name))
            yield routed


class TwinCache:
    """The ``size`` latest values of each kind (exclusive knowledge, router), keyed by what they depend on.

    A search re-scores its finalists (held-out) and then the chosen one (test): those re-use their
    SVDs and trained routers instead of recomputing them.
    """

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self._entries: dict[str, OrderedDict[str, Any]] = {}

    def get(self, kind: str, key: Mapping[str, Any], compute: Callable[[], T]) -> T:
        entries = self._entries.setdefault(kind, OrderedDict())
        text = json.dumps(key, sort_keys=True, default=str)
        if text in entries:
            entries.move_to_end(text)
            return entries[text]
        value = compute()
        entries[text] = value
        while len(entries) > self.size:
            entries.popitem(last=False)
        return value


def build_twin(
    recipe: Recipe,
    modelset: ModelSet,
    merger: Merger,
    body: nn.Module,
    tasks: Sequence[TaskData],
    tokenizer: Any,
    *,
    cache: TwinCache | None = None,
    validation_routing: bool = False,
) -> Twin:
    """Build the Twin of ``recipe`` from resident models.

    ``body`` is an encoder whose weights are bound to ``merger``'s output buffer (e.g. a task model's
    ``base_model`` after ``merger.bind``): after the shared merge it computes with θ*. ``tasks`` give
    the router's training data (training splits) in the experts' order. With ``validation_routing``,
    the router's accuracy on each task's validation split is measured too.
    """
    options = twin_options(recipe)
    _check_tasks(recipe, modelset, tasks, options)
    cache = cache or TwinCache()
    shared = shared_recipe(recipe)
    timings: dict[str, float] = {}
    with _timed(timings, "merge"):
        merged = merger.merge(shared)
    knowledge_key = {"shared": shared.to_dict(), **options.model_dump(include={"rank_fraction", "rank", "one_d"})}
    with _timed(timings, "svd"):
        knowledge = cache.get("knowledge", knowledge_key, lambda: exclusive_knowledge(modelset, merged, options))
    router_key = {"shared": shared.to_dict(), "seed": recipe.seed, **_router_options(options)}
    with _timed(timings, "router"):
        router = cache.get("router", router_key, lambda: _fit_router(body, tasks, tokenizer, options, recipe.seed))
    twin = Twin(recipe, merged, knowledge, router, timings)
    if validation_routing:
        features, labels = task_features(body, tasks, "validation", tokenizer, None)
        twin.validation_routing = routing_accuracy(router, features, labels, [t.name for t in tasks])
    return twin


def _fit_router(body: nn.Module, tasks: Sequence[TaskData], tokenizer: Any, options: TwinOptions, seed: int) -> Router:
    features, labels = task_features(body, tasks, "train", tokenizer, options.router_examples)
    return train_router(features, labels, len(tasks), options, seed)


def _router_options(options: TwinOptions) -> dict[str, Any]:
    return options.model_dump(include={"router_hidden", "router_epochs", "router_lr", "router_examples"})


def _check_tasks(recipe: Recipe, modelset: ModelSet, tasks: Sequence[TaskData], options: TwinOptions) -> None:
    names = [t.name for t in tasks]
    if names != modelset.task_names or recipe.task_names != modelset.task_names:
        raise RecipeError(
            f"Twin: the recipe's experts {recipe.task_names}, the loaded models {modelset.task_names} and the "
            f"tasks {names} must be the same, in the same order"
        )
    if options.top_k is not None and options.top_k > len(names):
        raise RecipeError(f"Twin: options.top_k = {options.top_k} exceeds the {len(names)} experts")
    empty = [t.name for t in tasks if len(t.train) == 0]
    if empty:
        raise RecipeError(f"Twin: task(s) {empty} have no training examples to train the router on")


@contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - start
