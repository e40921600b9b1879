"""Batched Twin-Merging inference (Lu et al., 2024) through forward hooks: no per-example weights are built.

For a batch with routing weights w ∈ ℝ^{B×T} (one row per example) every adapted layer computes

    y_b = θ*·x_b + Σ_t w_{b,t} U_t S_t V_tᵀ·x_b        (+ Σ_t w_{b,t} δb_t for a dense bias delta)

as two matrix products over the tasks' factors concatenated along the rank, R = T·r:
z = x·V_catᵀ (``[…, R]``), z ⊙ (w repeated r times per task), y += z·U_catᵀ. The layer's own forward
gives θ*·x; nothing of size m×n is formed per example. Supported layers:

- ``nn.Linear``: weight low-rank (y += U S Vᵀ x), bias dense (y += Σ_t w_t δb_t);
- ``nn.Embedding``: weight low-rank; the looked-up rows are (U S)[ids]·Vᵀ;
- ``nn.LayerNorm``: weight and bias dense: y += n ⊙ Σ_t w_t δγ_t + Σ_t w_t δβ_t, n the normalised input.

A layer's input may have batch size B or 1 (BERT's position ids are shared by the batch): the
delta is broadcast to B rows. Hooks read the weights from a :class:`Routing` and add nothing while it
holds none, so the router's own forward through θ* runs with the same modules.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mergetune.errors import RecipeError
from mergetune.forward import best_prefix
from mergetune.twin.exclusive import ExclusiveKnowledge, ExclusiveTensor

Hook = Callable[[nn.Module, tuple[Any, ...], torch.Tensor], torch.Tensor]


class Routing:
    """The current batch's routing weights ``[B, T]``, shared by one model's hooks (None: hooks add nothing)."""

    def __init__(self) -> None:
        self.weights: torch.Tensor | None = None
        self._repeated: dict[int, torch.Tensor] = {}

    @contextmanager
    def routed(self, weights: torch.Tensor) -> Iterator[None]:
        self.weights, self._repeated = weights, {}
        try:
            yield
        finally:
            self.weights, self._repeated = None, {}

    def repeated(self, rank: int) -> torch.Tensor:
        """w with each task's weight repeated ``rank`` times: ``[B, T·rank]``, matching the concatenated factors."""
        assert self.weights is not None
        if rank not in self._repeated:
            self._repeated[rank] = self.weights.repeat_interleave(rank, dim=-1)
        return self._repeated[rank]


def per_example(values: torch.Tensor, like: torch.Tensor, module: str) -> torch.Tensor:
    """``[B, K]`` viewed as ``[B, 1, …, 1, K]`` to broadcast against ``like`` (batch size B, or 1)."""
    if like.dim() < 2 or like.shape[0] not in (values.shape[0], 1):
        raise RuntimeError(
            f"Twin adapter on '{module}': input of shape {tuple(like.shape)} does not lead with the batch "
            f"({values.shape[0]} examples)"
        )
    return values.view(values.shape[0], *([1] * (like.dim() - 2)), values.shape[-1])


class LowRankDelta:
    """Σ_t w_t U_t S_t V_tᵀ applied to inputs (``linear``) or looked up by index (``embedding``)."""

    def __init__(self, t: ExclusiveTensor, like: torch.Tensor) -> None:
        assert t.us is not None and t.vt is not None
        n_tasks, rows, rank = t.us.shape
        self.rank = rank
        self.down = t.vt.reshape(n_tasks * rank, -1).to(like)  # [R, n]: V_catᵀ
        self.up = t.us.permute(1, 0, 2).reshape(rows, n_tasks * rank).to(like)  # [m, R]: U_cat S_cat

    def linear(self, x: torch.Tensor, routing: Routing, module: str) -> torch.Tensor:
        z = F.linear(x, self.down)
        return F.linear(z * per_example(routing.repeated(self.rank), z, module).to(z.dtype), self.up)

    def embedding(self, ids: torch.Tensor, routing: Routing, module: str) -> torch.Tensor:
        z = F.embedding(ids, self.up)
        return F.linear(z * per_example(routing.repeated(self.rank), z, module), self.down.T)


def dense_delta(t: ExclusiveTensor, like: torch.Tensor) -> torch.Tensor:
    """A 1-D tensor's deltas ``[T, n]`` (Σ_t w_t δ_t is then one matrix product)."""
    assert t.dense is not None
    return t.dense.reshape(t.dense.shape[0], -1).to(like)


def linear_hook(module_name: str, tensors: Mapping[str, ExclusiveTensor], like: nn.Linear, routing: Routing) -> Hook:
    weight = LowRankDelta(tensors["weight"], like.weight) if "weight" in tensors else None
    bias = dense_delta(tensors["bias"], like.weight) if "bias" in tensors else None

    def hook(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        if routing.weights is None:
            return out
        if weight is not None:
            out = out + weight.linear(args[0], routing, module_name)
        if bias is not None:
            out = out + per_example(routing.weights.to(bias.dtype) @ bias, out, module_name).to(out.dtype)
        return out

    return hook


def embedding_hook(
    module_name: str, tensors: Mapping[str, ExclusiveTensor], like: nn.Embedding, routing: Routing
) -> Hook:
    weight = LowRankDelta(tensors["weight"], like.weight)

    def hook(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        if routing.weights is None:
            return out
        return out + weight.embedding(args[0], routing, module_name).to(out.dtype)

    return hook


def layer_norm_hook(
    module_name: str, tensors: Mapping[str, ExclusiveTensor], like: nn.LayerNorm, routing: Routing
) -> Hook:
    gamma = dense_delta(tensors["weight"], like.weight) if "weight" in tensors else None
    beta = dense_delta(tensors["bias"], like.weight) if "bias" in tensors else None

    def hook(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        if routing.weights is None:
            return out
        w = routing.weights
        if gamma is not None:
            normalised = F.layer_norm(args[0], like.normalized_shape, None, None, like.eps)
            out = out + normalised * per_example(w.to(gamma.dtype) @ gamma, out, module_name).to(out.dtype)
        if beta is not None:
            out = out + per_example(w.to(beta.dtype) @ beta, out, module_name).to(out.dtype)
        return out

    return hook


#: Module types the hooks adapt: the parameters each can route per input, and the hook that does it.
ADAPTERS: dict[type[nn.Module], tuple[tuple[str, ...], Callable[..., Hook]]] = {
    nn.Linear: (("weight", "bias"), linear_hook),
    nn.Embedding: (("weight",), embedding_hook),
    nn.LayerNorm: (("weight", "bias"), layer_norm_hook),
}


def adapted_modules(model: nn.Module, knowledge: ExclusiveKnowledge) -> dict[str, dict[str, ExclusiveTensor]]:
    """Module name in ``model`` -> {parameter name: its exclusive knowledge}, checked against what hooks support."""
    params = dict(model.named_parameters())
    prefix = best_prefix(params, knowledge.tensors)
    modules: dict[str, dict[str, ExclusiveTensor]] = {}
    for name, tensor in knowledge.adapted.items():
        if prefix + name not in params:
            raise RecipeError(f"Twin: tensor '{name}' has no parameter in {type(model).__name__} (prefix '{prefix}')")
        module_name, attr = (prefix + name).rsplit(".", 1)
        _check_supported(model.get_submodule(module_name), module_name, attr, tensor)
        modules.setdefault(module_name, {})[attr] = tensor
    return modules


def _check_supported(module: nn.Module, module_name: str, attr: str, tensor: ExclusiveTensor) -> None:
    kind = _supported_kind(module)
    if kind is None or attr not in ADAPTERS[kind][0]:
        hint = " (or drop 1-D exclusive knowledge with one_d: drop)" if len(tensor.shape) < 2 else ""
        raise RecipeError(
            f"Twin: cannot route '{module_name}.{attr}' of a {type(module).__name__} per input; adapters exist "
            f"for nn.Linear, nn.Embedding and nn.LayerNorm{hint}"
        )


def _supported_kind(module: nn.Module) -> type[nn.Module] | None:
    return next((kind for kind in ADAPTERS if isinstance(module, kind)), None)


@contextmanager
def adapters(model: nn.Module, knowledge: ExclusiveKnowledge, routing: Routing) -> Iterator[nn.Module]:
    """Install the low-rank/dense forward hooks on ``model`` for the duration of the block, then remove them."""
    handles = []
    try:
        for module_name, tensors in adapted_modules(model, knowledge).items():
            module = model.get_submodule(module_name)
            make_hook = ADAPTERS[_supported_kind(module)][1]  # type: ignore[index]
            handles.append(module.register_forward_hook(make_hook(module_name, tensors, module, routing)))
        yield model
    finally:
        for handle in handles:
            handle.remove()
