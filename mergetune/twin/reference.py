"""The naive Twin-Merging path (Lu et al., 2024): materialise θ(x) = θ* + Σ_t w_t(x) v̂_t, one forward per example.

The reference the batched hooks of :mod:`.adapters` are tested and benchmarked against: for each
example alone (no padding), route it on θ*, build every adapted tensor's weights for that example
from the dense exclusive knowledge v̂_t = U_t S_t V_tᵀ (decompressed once), and run the task model with
those weights (``torch.func.functional_call``: the module's own parameters are left untouched).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.func import functional_call

from mergetune.forward import best_prefix, forward_params
from mergetune.twin.model import Twin
from mergetune.twin.router import body_of, pooled_hidden, routing_weights


class NaiveTwin:
    """Runs task models (θ* + their heads, no hooks) example by example with materialised weights."""

    def __init__(self, twin: Twin) -> None:
        self.twin = twin
        self.deltas = {name: t.reconstruct() for name, t in twin.knowledge.adapted.items()}  # [T, *shape] each

    def weights(self, model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The example's routing weights ``[T]`` from θ* (the model's own, unmodified parameters)."""
        logits = self.twin.router(pooled_hidden(body_of(model), dict(inputs)))
        return routing_weights(logits.float(), self.twin.options.temperature, self.twin.options.top_k)[0]

    def materialise(self, model: nn.Module, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """θ(x) = θ* + Σ_t w_t v̂_t for every adapted parameter of ``model`` (by its own parameter names)."""
        params = dict(model.named_parameters())
        prefix = best_prefix(params, self.deltas)
        out = {}
        for name, delta in self.deltas.items():
            shared = params[prefix + name].detach()
            out[prefix + name] = shared + torch.tensordot(weights, delta.to(shared), dims=1).to(shared.dtype)
        return out

    def logits(self, model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Logits of ONE example (tensors of batch size 1) from ``model`` run with that example's θ(x)."""
        if inputs["input_ids"].shape[0] != 1:
            raise ValueError("the naive Twin path runs one example at a time (batch size 1)")
        accepted = forward_params(model)
        kwargs = {k: v for k, v in inputs.items() if k in accepted}
        with torch.inference_mode():
            params = self.materialise(model, self.weights(model, kwargs))
            return functional_call(model, params, args=(), kwargs=kwargs).logits
