"""Causal-LM helpers the multiple-choice, LM-loss and exact-match evaluators share.

Splitting a (context, continuation) pair into tokens follows lm-evaluation-harness (see
:func:`encode_pair`), so log-likelihoods match the harness's for the same text. :func:`logits_at`
computes the vocabulary logits only at the positions a score needs (a causal LM's logits over a
50k vocabulary are most of a forward's memory); :func:`attention_bias` turns a per-row
``[L, L]`` "may attend" matrix into the 4-D mask the model's attention implementation takes, for
sequences that pack several continuations behind one shared context. A prefix that every sequence
shares is run once (:func:`prefix_cache`) and continued by a batch of rows through broadcast views
of its KV cache (:func:`expanded_cache`); :func:`token_logprobs` takes log-probabilities as logit
minus logsumexp, once per position however many targets it predicts.
"""

from __future__ import annotations

from collections.abc import Sequence
from copy import copy, deepcopy
from typing import Any

import torch
from torch import nn

from mergetune.errors import TaskError
from mergetune.forward import Inputs, forward_params
from mergetune.objectives.evaluators.base import pad


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokeniser puts its BOS token first by default (Llama's does, GPT-2's does not)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == bos


def default_bos(tokenizer: Any) -> int | None:
    """The BOS id when the tokeniser puts it first by default, else None."""
    return tokenizer.bos_token_id if adds_bos(tokenizer) else None


def prepend_bos(ids: Sequence[int], bos: int | None) -> list[int]:
    """``ids`` with ``bos`` first, unless it is None or already there (a chat template may write it)."""
    return list(ids) if bos is None or (ids and ids[0] == bos) else [bos, *ids]


def encode_text(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def encode_pair(tokenizer: Any, context: str, continuation: str, task: str = "task") -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) split as lm-evaluation-harness splits them.

    Trailing whitespace of the context moves to the continuation; ``context + continuation`` is
    tokenised whole and the continuation's tokens are those past the context's own tokenisation
    (when the whole does not start with the context's tokens, the continuation is tokenised alone).
    The context gets the BOS token first when the tokeniser adds one by default and the context does
    not already start with it (a chat template may write it); an empty context conditions on EOS
    when there is no BOS.
    """
    stripped = context.rstrip()
    if len(stripped) < len(context):
        continuation = context[len(stripped) :] + continuation
        context = stripped
    whole = encode_text(tokenizer, context + continuation)
    ctx = encode_text(tokenizer, context)
    cont = whole[len(ctx) :] if whole[: len(ctx)] == ctx else encode_text(tokenizer, continuation)
    if not cont:
        cont = encode_text(tokenizer, continuation)
    ctx = prepend_bos(ctx, default_bos(tokenizer))
    if not ctx:
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is None:
            raise TaskError(f"task '{task}': an empty context needs a BOS or EOS token to condition on")
        ctx = [eos]
    return ctx, cont


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


def logits_at(model: nn.Module, inputs: Inputs, positions: torch.Tensor, cache: Any = None) -> torch.Tensor:
    """``[B, P, V]`` logits at ``positions`` (``[B, P]`` indices into each row).

    Transformers 5 models take the positions as ``logits_to_keep`` and project only those hidden
    states onto the vocabulary; a model that does not (its logits come back in another shape) is
    run for all positions and gathered. No KV cache is built; ``cache`` (see :func:`prefix_cache`)
    is a cache of earlier tokens that the rows continue (it grows by the rows: pass a fresh copy).
    """
    accepted = forward_params(model)
    kwargs: dict[str, Any] = {k: v for k, v in inputs.items() if k in accepted}
    if cache is not None:
        kwargs[cache_param(model)] = cache
    if "use_cache" in accepted:
        kwargs["use_cache"] = cache is not None
    if "logits_to_keep" in accepted:
        logits = model(**kwargs, logits_to_keep=positions).logits
        if logits.ndim == 3 and logits.shape[:2] == positions.shape:
            return logits
        if cache is not None:  # that forward grew the cache: the rows cannot be run again on it
            raise TaskError(
                f"{type(model).__name__} does not take logits_to_keep as per-row positions, which scoring from a "
                "shared prefix needs; set multiple_choice: {scoring: per_option}"
            )
    logits = model(**kwargs).logits
    return torch.take_along_dim(logits, positions.unsqueeze(-1), dim=1)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, which: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, T]`` float32 ``log p(target)``: the target's logit minus its position's logsumexp over the vocabulary.

    ``logits`` is ``[B, U, V]``; target ``t`` of row ``b`` is predicted at position ``which[b, t]``
    (default: ``t``, so ``U == T``). Equal to gathering from ``log_softmax`` without writing a second
    ``[B, U, V]`` tensor, and each position's logsumexp is computed once however many targets it predicts.
    """
    logits = logits.float()
    if which is None:
        which = torch.arange(targets.shape[1], device=targets.device).expand_as(targets)
    rows = torch.arange(logits.shape[0], device=logits.device).unsqueeze(1)
    normaliser = torch.logsumexp(logits, dim=-1)
    return logits[rows, which, targets] - normaliser.gather(1, which)


#: The names under which Hugging Face causal LMs take a KV cache (transformers 5 renamed it ``cache``).
CACHE_PARAMS = ("cache", "past_key_values")


def cache_param(model: nn.Module) -> str:
    """The forward argument that takes a KV cache; an error naming the fix when the model has none."""
    accepted = forward_params(model)
    for name in CACHE_PARAMS:
        if name in accepted:
            return name
    raise TaskError(
        f"{type(model).__name__} takes no KV cache ({' or '.join(CACHE_PARAMS)}), which the prefix that every "
        "question shares is scored from; set multiple_choice: {scoring: per_option}"
    )


def prefix_cache(model: nn.Module, prefix: torch.Tensor) -> Any:
    """The KV cache of one ``[1, P]`` prefix (positions ``0..P-1``), run once and then continued by every row."""
    name = cache_param(model)
    kwargs: dict[str, Any] = {"input_ids": prefix, "use_cache": True}
    if "position_ids" in forward_params(model):
        kwargs["position_ids"] = torch.arange(prefix.shape[1], device=prefix.device).unsqueeze(0)
    if "logits_to_keep" in forward_params(model):
        kwargs["logits_to_keep"] = 1  # no vocabulary projection of the prefix beyond one position
    out = model(**kwargs)
    cache = getattr(out, name, None)
    if cache is None:
        raise TaskError(f"{type(model).__name__} returned no KV cache; set multiple_choice: {{scoring: per_option}}")
    return cache


def expanded_cache(cache: Any, batch_size: int) -> Any:
    """A cache of ``batch_size`` rows that all continue the one-row ``cache``, which stays as it is.

    Transformers' caches keep per-layer ``keys``/``values`` and grow them by concatenation (a new
    tensor), so the copy's layers hold broadcast views of the prefix's tensors: no prefix data is
    copied per batch. A cache of another structure is deep-copied and repeated instead.
    """
    layers = getattr(cache, "layers", None)
    if not layers or not all(isinstance(getattr(layer, "keys", None), torch.Tensor) for layer in layers):
        repeated = deepcopy(cache)
        repeated.batch_repeat_interleave(batch_size)
        return repeated
    out = copy(cache)
    out.layers = [copy(layer) for layer in layers]
    for layer in out.layers:
        layer.keys = layer.keys.expand(batch_size, *layer.keys.shape[1:])
        layer.values = layer.values.expand(batch_size, *layer.values.shape[1:])
    return out


def attention_bias(model: nn.Module, allowed: torch.Tensor) -> torch.Tensor:
    """The 4-D mask ``[B, 1, L, L]`` for a boolean "query may attend key" ``[B, L, L]``, in the model's format.

    SDPA takes it as booleans; eager attention adds it to the scores (0 or the float32 minimum).
    Other implementations (flash attention) cannot take an arbitrary mask: an error says what to use.
    """
    config = getattr(model, "config", None)
    implementation = getattr(config, "_attn_implementation", None) or "eager"
    mask = allowed.unsqueeze(1)
    if implementation == "sdpa":
        return mask
    if implementation == "eager":
        zero = torch.zeros((), dtype=torch.float32, device=mask.device)
        return torch.where(mask, zero, torch.finfo(torch.float32).min)
    raise TaskError(
        f"attention implementation '{implementation}' cannot take the packed multiple-choice mask; load the model "
        "with attn_implementation='sdpa' or 'eager', or set multiple_choice: {scoring: per_option}"
    )


def left_padded(seqs: Sequence[Sequence[int]], pad_value: int) -> Inputs:
    """Left-padded ids, mask and position ids counted from each sequence's first real token."""
    mask = pad([[1] * len(s) for s in seqs], 0, "left")
    return {
        "input_ids": pad(seqs, pad_value, "left"),
        "attention_mask": mask,
        "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
    }
