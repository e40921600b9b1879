"""Causal-LM helpers the multiple-choice, LM-loss and exact-match evaluators share."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from mergetune.forward import Inputs, forward_params
from mergetune.objectives.evaluators.base import pad


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokeniser puts its BOS token first by default (Llama's does, GPT-2's does not)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == bos


def encode_text(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def causal_forward(model: nn.Module, inputs: Inputs, logits_to_keep: int = 0) -> torch.Tensor:
    """Logits of a causal LM with no KV cache built; the last ``logits_to_keep`` positions when > 0."""
    accepted = forward_params(model)
    kwargs: dict[str, Any] = {k: v for k, v in inputs.items() if k in accepted}
    if "use_cache" in accepted:
        kwargs["use_cache"] = False
    if logits_to_keep and "logits_to_keep" in accepted:
        kwargs["logits_to_keep"] = logits_to_keep
    logits = model(**kwargs).logits
    return logits[:, -logits_to_keep:] if logits_to_keep else logits


def left_padded(seqs: Sequence[Sequence[int]], pad_value: int) -> Inputs:
    """Left-padded ids, mask and position ids counted from each sequence's first real token."""
    mask = pad([[1] * len(s) for s in seqs], 0, "left")
    return {
        "input_ids": pad(seqs, pad_value, "left"),
        "attention_mask": mask,
        "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
    }
