"""Gradient tuning of merge weights λ per task × layer group, through the merge (AdaMerging).

Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task Learning", ICLR 2024: the merged
weights of Task Arithmetic, θ = θ_0 + Σ_t λ[t, g(p)] τ_t,p, are differentiable in the coefficients
λ, so λ can be learnt by gradient descent on unlabelled inputs, minimising the entropy of each
task's predictions (Eq. 5; Adam, lr 1e-3, λ clipped to [0, 1] in the official code), or on labels.
The paper's TIES variant applies λ to TIES-processed task vectors whose masks and elected signs do
not depend on λ; in mergetune that is ``ties`` with ``weights: after_election, disjoint: sum``.

How the gradient is computed without an autograd graph through the merge: for any method whose
merge is linear in λ with λ-independent parts u_t (``MergeMethod.linear_in_weight``),

    ∂L/∂λ[t, g] = Σ_{p ∈ g} ⟨∂L/∂θ_p, u_t,p⟩,   u_t = merge(λ = e_t) − θ_0,

so a step is: merge λ into the evaluation buffer, one ordinary backward per task into the bound
parameters (``∂L/∂θ``, summed over tasks into one flat float32 vector), then one merge per task
with λ = e_t to read u_t. Memory beyond the resident search state: that flat gradient (4 bytes
per merged parameter) plus one task's activations and parameter gradients at a time; a graph
through the merge would also hold every λ_t τ_t product. ``TunedWeights`` reports the measured
peak.

The result is an ordinary recipe (the start recipe with λ per task and group), scored like any
candidate; it is tuned on the search split, so its held-out and test scores are the honest ones.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psutil
import torch
from torch import nn

from mergetune.errors import RecipeError
from mergetune.forward import best_prefix
from mergetune.merging.engine import Merger
from mergetune.merging.methods import get_method, method_options
from mergetune.objectives.evaluators.base import Batch
from mergetune.objectives.suite import ValidationSuite
from mergetune.objectives.training_losses import Objective, batch_loss, trainable_batches
from mergetune.recipe import Recipe, resolve_parameter
from mergetune.strict import StrictModel

DEFAULT_BOUNDS = (0.0, 1.0)  # the official AdaMerging code clips λ to [0, 1]


class GradientSettings(StrictModel):
    """How λ is tuned: Adam on ``objective``, one batch per task per step."""

    steps: int = 100
    learning_rate: float = 1e-3
    objective: Objective = "entropy"
    bounds: tuple[float, float] | None = None  # None: the method's search range for λ, else [0, 1]
    seed: int = 0  # the order in which each task's batches are visited


@dataclass
class TunedWeights:
    """The tuned recipe and what tuning cost."""

    recipe: Recipe
    start: Recipe
    tasks: list[str]
    losses: list[float]  # the summed objective at each step (before that step's update)
    seconds: float
    gradient_bytes: int  # the flat ∂L/∂θ accumulator
    peak_rss_increase_bytes: int  # measured: process RSS peak during tuning minus RSS before
    cuda_peak_bytes: int | None = None  # torch.cuda.max_memory_allocated during tuning, on CUDA
    settings: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "tasks": self.tasks,
            "steps": len(self.losses),
            "first_loss": self.losses[0] if self.losses else None,
            "last_loss": self.losses[-1] if self.losses else None,
            "losses": self.losses,
            "seconds": self.seconds,
            "gradient_bytes": self.gradient_bytes,
            "peak_rss_increase_bytes": self.peak_rss_increase_bytes,
            "cuda_peak_bytes": self.cuda_peak_bytes,
            "settings": self.settings,
        }


class WeightTuner:
    """Tunes λ of a recipe on a worker's resident models (bound to ``merger``'s float32 buffer)."""

    def __init__(self, merger: Merger, models: Mapping[str, nn.Module], suite: ValidationSuite) -> None:
        self.merger = merger
        self.modelset = merger.modelset
        self.models = models
        self.suite = suite

    def tune(self, start: Recipe, settings: GradientSettings, tasks: list[str] | None = None) -> TunedWeights:
        method = get_method(start.method)
        if not method.linear_in_weight(method_options(start)):
            raise RecipeError(
                f"gradient tuning needs a merge linear in λ; method '{start.method}' with options {start.options} "
                "is not: use task_arithmetic, or ties with options weights: after_election and disjoint: sum"
            )
        names = tasks or self.suite.task_names
        losses = {name: batch_loss(self.suite.evaluators[name], settings.objective) for name in names}
        low, high = settings.bounds or method.search_weight or DEFAULT_BOUNDS
        groups = self.merger.layout(start.grouping.granularity).groups
        task_names = self.modelset.task_names
        lam = torch.tensor(
            resolve_parameter(start.weight, task_names, groups.names, "weight"), dtype=torch.float32
        ).clamp_(low, high)
        lam.requires_grad_(True)
        optimizer = torch.optim.Adam([lam], lr=settings.learning_rate)
        batches = {name: _cycle(trainable_batches(self.suite.evaluators[name]), settings.seed) for name in names}
        history: list[float] = []
        with _MemoryWatch() as memory:
            started = time.perf_counter()
            for _ in range(settings.steps):
                total, lam.grad = self._step(start, lam.detach(), {n: next(batches[n]) for n in names}, losses)
                history.append(total)
                optimizer.step()
                with torch.no_grad():
                    lam.clamp_(low, high)
            seconds = time.perf_counter() - started
        tuned = _with_weights(start, lam.detach(), task_names, groups.names)
        return TunedWeights(
            recipe=tuned,
            start=start,
            tasks=names,
            losses=history,
            seconds=seconds,
            gradient_bytes=self.modelset.numel * 4,  # the float32 ∂L/∂θ of _step
            peak_rss_increase_bytes=memory.peak_increase,
            cuda_peak_bytes=memory.cuda_peak,
            settings={**settings.model_dump(), "bounds": [low, high]},
        )

    def loss_and_gradient(
        self, start: Recipe, lam: torch.Tensor, batches: Mapping[str, Batch], objective: Objective = "entropy"
    ) -> tuple[float, torch.Tensor]:
        """The summed objective on one batch per task at λ (``[T, G]``), and its gradient in λ."""
        losses = {name: batch_loss(self.suite.evaluators[name], objective) for name in batches}
        return self._step(start, lam, batches, losses)

    # ---- one step ------------------------------------------------------------------------------
    def _step(
        self,
        start: Recipe,
        lam: torch.Tensor,
        batches: Mapping[str, Batch],
        losses: Mapping[str, Callable[[nn.Module, Batch], torch.Tensor]],
    ) -> tuple[float, torch.Tensor]:
        groups = self.merger.layout(start.grouping.granularity).groups
        segment_group = [groups.index(s.name) for s in self.modelset.segments]
        grad_theta = torch.zeros(self.modelset.numel, dtype=torch.float32, device=self.modelset.device)
        self._merge(start, lam)
        total = 0.0
        with _trainable(self.models, self.merger) as params:
            for name, batch in batches.items():
                total += self._backward(name, losses[name], batch, params[name], grad_theta)
        return total, self._weight_gradient(start, grad_theta, segment_group, lam.shape)

    def _merge(self, start: Recipe, lam: torch.Tensor) -> None:
        """Merge λ into the float32 buffer the task models are bound to."""
        names, groups = self.modelset.task_names, self.merger.layout(start.grouping.granularity).groups.names
        self.merger.merge(_with_weights(start, lam, names, groups).model_copy(update={"dtype": "float32"}))

    def _backward(
        self,
        name: str,
        loss_fn: Callable[[nn.Module, Batch], torch.Tensor],
        batch: Batch,
        params: dict[str, nn.Parameter],
        grad_theta: torch.Tensor,
    ) -> float:
        """One task's loss on one batch; its ∂L/∂θ added into ``grad_theta`` (the parameters' grads freed)."""
        model = self.models[name]
        device = next(model.parameters()).device
        loss = loss_fn(model, batch.to(device) if device.type != "cpu" else batch)
        loss.backward()
        for segment in self.modelset.segments:
            param = params[segment.name]
            if param.grad is not None:
                grad_theta[segment.offset : segment.end] += param.grad.reshape(-1)
                param.grad = None
        return float(loss.detach())

    def _weight_gradient(
        self, start: Recipe, grad_theta: torch.Tensor, segment_group: list[int], shape: torch.Size
    ) -> torch.Tensor:
        """∂L/∂λ[t, g] = Σ_{p ∈ g} ⟨∂L/∂θ_p, u_t,p⟩ with u_t = merge(λ = e_t) − θ_0 (module docstring)."""
        n_tasks = shape[0]
        grad = torch.zeros(shape, dtype=torch.float64)
        base = self.modelset.base_flat
        for t in range(n_tasks):
            unit = torch.zeros(shape, dtype=torch.float32)
            unit[t] = 1.0
            self._merge(start, unit)
            merged = self.merger.output_buffer(torch.float32)
            with torch.no_grad():
                for segment, g in zip(self.modelset.segments, segment_group, strict=True):
                    sl = slice(segment.offset, segment.end)
                    grad[t, g] += float(torch.dot(grad_theta[sl], merged[sl] - base[sl]))
        return grad.to(torch.float32)


def _with_weights(start: Recipe, lam: torch.Tensor, tasks: list[str], groups: tuple[str, ...]) -> Recipe:
    weight = {task: {group: float(lam[t, g]) for g, group in enumerate(groups)} for t, task in enumerate(tasks)}
    return start.model_copy(update={"weight": weight})


def _cycle(batches: list[Batch], seed: int) -> Iterator[Batch]:
    """The batches in a seeded random order, again and again (a new order each pass)."""
    rng = np.random.default_rng(seed)
    for _ in itertools.count():
        yield from (batches[i] for i in rng.permutation(len(batches)))


class _trainable:
    """Gradients on for the merged (bound) parameters only, restored on exit; yields them per task."""

    def __init__(self, models: Mapping[str, nn.Module], merger: Merger) -> None:
        self.models = models
        self.names = [s.name for s in merger.modelset.segments]
        self.saved: list[tuple[nn.Parameter, bool]] = []

    def __enter__(self) -> dict[str, dict[str, nn.Parameter]]:
        out = {}
        for task, model in self.models.items():
            params = dict(model.named_parameters())
            prefix = best_prefix(params, dict.fromkeys(self.names))
            merged = {n: params[prefix + n] for n in self.names}
            chosen = {id(p) for p in merged.values()}
            for p in params.values():
                self.saved.append((p, p.requires_grad))
                p.requires_grad_(id(p) in chosen)
            out[task] = merged
        self._grad_mode = torch.is_grad_enabled()
        torch.set_grad_enabled(True)
        return out

    def __exit__(self, *exc: object) -> None:
        torch.set_grad_enabled(self._grad_mode)
        for p, flag in self.saved:
            p.grad = None
            p.requires_grad_(flag)


class _MemoryWatch:
    """Samples this process's RSS every 20 ms; ``peak_increase`` over the RSS at entry."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.process = psutil.Process()
        self.peak_increase = 0
        self.cuda_peak: int | None = None
        self._stop = threading.Event()

    def __enter__(self) -> _MemoryWatch:
        self._start = self.process.memory_info().rss
        self._peak = self._start
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            self._cuda_start = torch.cuda.memory_allocated()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, self.process.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self.process.memory_info().rss)
        self.peak_increase = self._peak - self._start
        if torch.cuda.is_available():
            self.cuda_peak = torch.cuda.max_memory_allocated() - self._cuda_start
