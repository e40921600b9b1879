"""The router of Twin-Merging (Lu et al., 2024): which experts' exclusive knowledge an input needs.

Features: the mean-pooled last hidden state of the shared model θ*, h(x) = Σ_i m_i H_i(x) / Σ_i m_i
(m the attention mask). The router is a small MLP, logits = W_2 ReLU(W_1 (h − μ)/σ + b_1) + b_2, with
μ and σ the training features' mean and standard deviation (kept as buffers, so a saved router
needs nothing else). It is trained with cross-entropy to predict the task an input comes from, on
the tasks' **training** splits only (never validation or test): the label is the task, so routing
at inference never sees it.

Routing weights per input: w = softmax(logits / T); with ``top_k``, only the k largest logits keep
weight, w = softmax over them (the others 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mergetune.forward import Inputs, forward_params, scoring
from mergetune.merging.methods.twin import TwinOptions
from mergetune.objectives.suite import build_evaluator, examples
from mergetune.objectives.tasks import TaskData

BATCH_SIZE = 64


class Router(nn.Module):
    """A two-layer MLP over standardised pooled features -> one logit per task."""

    def __init__(self, in_features: int, hidden: int, n_tasks: int) -> None:
        super().__init__()
        self.mean = nn.Buffer(torch.zeros(in_features))
        self.scale = nn.Buffer(torch.ones(in_features))
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, n_tasks))

    @property
    def config(self) -> dict[str, int]:
        first, last = self.net[0], self.net[2]
        return {"in_features": first.in_features, "hidden": first.out_features, "n_tasks": last.out_features}

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.net((pooled.to(self.mean.dtype) - self.mean) / self.scale)


def body_of(model: nn.Module) -> nn.Module:
    """The encoder a task model wraps (``model.base_model`` of a transformers head model), else the model."""
    body = getattr(model, "base_model", None)
    return body if isinstance(body, nn.Module) else model


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ_i m_i H_i / Σ_i m_i over the sequence: ``[B, L, H]`` -> ``[B, H]``."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def pooled_hidden(body: nn.Module, inputs: Inputs) -> torch.Tensor:
    """The encoder's mean-pooled last hidden state for a batch of tokenised inputs."""
    accepted = forward_params(body)
    hidden = body(**{k: v for k, v in inputs.items() if k in accepted}).last_hidden_state
    return mean_pool(hidden, inputs["attention_mask"])


def routing_weights(logits: torch.Tensor, temperature: float, top_k: int | None) -> torch.Tensor:
    """w = softmax(logits / T) per row; with ``top_k`` < T, a softmax over each row's k largest logits only."""
    if top_k is None or top_k >= logits.shape[-1]:
        return torch.softmax(logits / temperature, dim=-1)
    values, index = logits.topk(top_k, dim=-1)
    return torch.zeros_like(logits).scatter(-1, index, torch.softmax(values / temperature, dim=-1))


def task_features(
    body: nn.Module, tasks: Sequence[TaskData], split: str, tokenizer: Any, max_examples: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled θ* features of the first ``max_examples`` of each task's split, and the task index of each."""
    features, labels = [], []
    for index, task in enumerate(tasks):
        data = examples(task, split, max_examples)
        evaluator = build_evaluator(task, data, tokenizer, logits_fn=pooled_hidden, num_labels=None)
        out: torch.Tensor | None = None
        with scoring(body):
            for rows, pooled in evaluator.logits(body):
                out = pooled.new_empty(len(data), pooled.shape[-1]) if out is None else out
                out[rows.to(out.device)] = pooled
        assert out is not None
        features.append(out.float().cpu().clone())  # a normal tensor again (it was made in inference mode)
        labels.append(torch.full((len(data),), index, dtype=torch.long))
    return torch.cat(features), torch.cat(labels)


def train_router(features: torch.Tensor, labels: torch.Tensor, n_tasks: int, options: TwinOptions, seed: int) -> Router:
    """Adam on the cross-entropy of the task labels, mini-batches shuffled by a generator seeded with ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        router = Router(features.shape[1], options.router_hidden, n_tasks)
    router.mean.copy_(features.mean(0))
    router.scale.copy_(features.std(0).clamp(min=1e-6))
    optimizer = torch.optim.Adam(router.parameters(), lr=options.router_lr)
    generator = torch.Generator().manual_seed(seed)
    with torch.enable_grad():
        for _ in range(options.router_epochs):
            for batch in torch.randperm(len(labels), generator=generator).split(BATCH_SIZE):
                loss = F.cross_entropy(router(features[batch]), labels[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    return router.eval().requires_grad_(False)


def routing_accuracy(
    router: Router, features: torch.Tensor, labels: torch.Tensor, tasks: Sequence[str]
) -> dict[str, float]:
    """Per task, the fraction of its inputs whose largest router logit is its own expert's."""
    with torch.no_grad():
        hits = router(features).argmax(-1) == labels
    return {name: float(hits[labels == t].double().mean()) for t, name in enumerate(tasks)}
