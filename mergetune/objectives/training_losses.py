"""Differentiable per-batch losses of a task's evaluator, for gradient tuning of merge weights (AdaMerging).

An evaluator scores a model under ``torch.inference_mode``; a gradient optimizer needs the same
forward pass with autograd on, one batch at a time, reduced to a scalar to minimise. This module
builds that scalar from an evaluator's own tokenised batches, so the tuned objective sees exactly
the inputs the score sees:

- ``entropy`` (AdaMerging's unsupervised objective, Yang et al. ICLR 2024, Eq. 5): the mean
  Shannon entropy ``-Σ_c p_c log p_c`` of the predicted label distribution over the batch; needs
  no labels. Classification tasks only.
- ``labels``: the mean cross-entropy of the logits against the task's labels (classification).

An LM-loss task's objective is its own loss (mean negative log-likelihood per scored token) under
either name: its text is its supervision and there is no label to leave out.

Other kinds (multiple choice, exact match, lm-eval-harness, custom scorers) have no
differentiable objective here: they are refused with the task's name rather than tuned on a
stand-in that is not what they score.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

from mergetune.errors import TaskError
from mergetune.objectives.evaluators import ClassificationEvaluator, EntropyEvaluator, Evaluator
from mergetune.objectives.evaluators.base import Batch
from mergetune.objectives.evaluators.lm_loss import LMLossEvaluator, batch_token_nll

Objective = Literal["entropy", "labels"]
BatchLoss = Callable[[nn.Module, Batch], torch.Tensor]
SequenceEvaluator = ClassificationEvaluator | EntropyEvaluator
OBJECTIVES: tuple[str, ...] = ("entropy", "labels")


def trainable_batches(evaluator: Evaluator) -> list[Batch]:
    """The evaluator's tokenised batches (on the CPU, in its own order)."""
    batches = getattr(evaluator, "batches", None)
    if batches is None:
        raise TaskError(f"task '{getattr(evaluator, 'name', '?')}': its evaluator keeps no tokenised batches")
    return list(batches.cpu)


def batch_loss(evaluator: Evaluator, objective: Objective) -> BatchLoss:
    """The scalar to minimise on one of ``evaluator``'s batches, for ``objective`` (module docstring)."""
    name = getattr(evaluator, "name", "task")
    if objective not in OBJECTIVES:
        raise TaskError(f"unknown gradient objective '{objective}'; use one of {list(OBJECTIVES)}")
    if isinstance(evaluator, LMLossEvaluator):
        if evaluator.scorer is not None:
            raise TaskError(f"task '{name}': a custom scorer is not differentiable; tune on another task")
        return _lm_loss
    if isinstance(evaluator, ClassificationEvaluator | EntropyEvaluator):
        if objective == "entropy":
            return lambda model, batch: _entropy(evaluator, model, batch)
        if isinstance(evaluator, EntropyEvaluator):
            raise TaskError(f"task '{name}' has no labels: use the 'entropy' objective")
        labels = torch.as_tensor(evaluator.labels)
        return lambda model, batch: _cross_entropy(evaluator, model, batch, labels)
    raise TaskError(
        f"task '{name}': a {type(evaluator).__name__} has no differentiable objective; gradient tuning takes "
        "classification and LM-loss tasks (leave this task to the black-box search)"
    )


def _logits(evaluator: SequenceEvaluator, model: nn.Module, batch: Batch) -> torch.Tensor:
    """The evaluator's own float32 logits over the task's labels for one batch (label columns, head check)."""
    _, logits = next(evaluator.logits(model, [batch]))
    return logits


def _entropy(evaluator: SequenceEvaluator, model: nn.Module, batch: Batch) -> torch.Tensor:
    logp = torch.log_softmax(_logits(evaluator, model, batch), dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


def _cross_entropy(evaluator: SequenceEvaluator, model: nn.Module, batch: Batch, labels: torch.Tensor) -> torch.Tensor:
    logits = _logits(evaluator, model, batch)
    return nn.functional.cross_entropy(logits, labels[batch.rows].to(logits.device))


def _lm_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    token_nll, mask = batch_token_nll(model, batch)
    return (token_nll * mask).sum() / mask.sum().clamp(min=1.0)
