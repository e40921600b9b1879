"""Input Gram matrices of a model's linear layers on a task's examples (the statistics RegMean merges with).

For each linear layer (``nn.Linear``, or transformers' ``Conv1D`` of GPT-2-style models) whose
weight is named in ``weights``, G = Σ x xᵀ over the input vectors x the layer sees on every
non-padding token of the examples, divided by the number of sequences (the normalisation of
RegMean's official code). Computed once per expert on its own task's training split and stored
as a safetensors file: a recipe that names the file reproduces its merge.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from mergetune.errors import TaskError
from mergetune.forward import forward_params
from mergetune.objectives.evaluators.base import Batch


@dataclass
class InputGrams:
    matrices: dict[str, torch.Tensor]  # output name -> [in, in] float32
    layouts: dict[str, str]  # output name -> "out_in" (nn.Linear) | "in_out" (Conv1D)
    sequences: int
    tokens: int


def _layout(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "out_in"
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers.pytorch_utils.Conv1D
        return "in_out"
    return None


def input_grams(model: nn.Module, batches: Iterable[Batch], weights: Mapping[str, str]) -> InputGrams:
    """Gram matrices of the inputs of the linear layers whose ``<module>.weight`` is a key of ``weights``
    (the value is the name to store it under), over ``batches`` (their ``attention_mask`` marks real tokens)."""
    sums: dict[str, torch.Tensor] = {}
    layouts: dict[str, str] = {}
    state = {"mask": None}
    hooks = []

    def hook_for(key: str):
        def capture(_module: nn.Module, args: tuple, _output: object) -> None:
            x = args[0]
            mask = state["mask"]
            rows = x[mask] if mask is not None and x.shape[:-1] == mask.shape else x.reshape(-1, x.shape[-1])
            rows = rows.detach().to(torch.float32)
            # one float32 product per batch (a float64 GEMM is several times slower on CPUs), summed in float64
            sums[key] = sums.get(key, 0) + (rows.T @ rows).to(torch.float64)

        return capture

    for name, module in model.named_modules():
        key = weights.get(f"{name}.weight")
        layout = _layout(module)
        if key is not None and layout is not None:
            layouts[key] = layout
            hooks.append(module.register_forward_hook(hook_for(key)))
    if not hooks:
        raise TaskError("no linear layer of the model matches the merged tensors: nothing to compute Grams for")
    sequences = tokens = 0
    accepted = forward_params(model)
    try:
        with torch.inference_mode():
            for batch in batches:
                mask = batch.inputs.get("attention_mask")
                state["mask"] = None if mask is None else mask.bool()
                model(**{k: v for k, v in batch.inputs.items() if k in accepted})
                sequences += int(batch.inputs["input_ids"].shape[0])
                tokens += int(mask.sum()) if mask is not None else int(batch.inputs["input_ids"].numel())
    finally:
        for h in hooks:
            h.remove()
    matrices = {key: (g / max(sequences, 1)).to(torch.float32) for key, g in sums.items()}
    return InputGrams(matrices, layouts, sequences, tokens)
