"""Helpers for running a Hugging Face model's forward pass, shared by scoring and by Twin-Merging.

They sit below merging and objectives (which must not import each other) so that both, and the
Twin layer above them, use one implementation.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

Inputs = dict[str, torch.Tensor]

_FORWARD_PARAMS: dict[type, frozenset[str]] = {}


def forward_params(model: nn.Module) -> frozenset[str]:
    """Names the model's ``forward`` declares explicitly (``**kwargs`` does not count)."""
    cls = type(model)
    if cls not in _FORWARD_PARAMS:
        params = inspect.signature(model.forward).parameters.values()
        _FORWARD_PARAMS[cls] = frozenset(
            p.name for p in params if p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
        )
    return _FORWARD_PARAMS[cls]


def model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


@contextmanager
def scoring(model: nn.Module, autocast: torch.dtype | None = None) -> Iterator[None]:
    """Inference mode (no autograd graph, no version counters) and eval mode (no dropout) for a block.

    With ``autocast`` (e.g. ``torch.bfloat16``), matrix products run in that dtype through
    ``torch.autocast`` on the model's device: about 2x faster for MiniLM on a CPU with AMX (a model
    whose weights are bfloat16 itself is about 3x faster; see ``load_task_model(dtype=...)``).
    """
    device = model_device(model).type
    with torch.inference_mode(), eval_mode(model), torch.autocast(device, dtype=autocast, enabled=autocast is not None):
        yield


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode (no dropout) and restore each one's flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def best_prefix(params: dict[str, torch.nn.Parameter], names: dict[str, torch.Tensor]) -> str:
    """The module-name prefix ('' or e.g. 'bert.') under which most merged tensor names are found."""
    candidates = {""} | {k.split(".", 1)[0] + "." for k in params if "." in k}
    return max(sorted(candidates), key=lambda p: (sum(p + n in params for n in names), p == ""))
