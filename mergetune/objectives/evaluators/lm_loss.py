"""Language-modelling loss on held-out texts, as a score (minus the mean loss per token)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from mergetune.errors import TaskError
from mergetune.objectives.evaluators.base import (
    DEFAULT_MAX_TOKENS,
    Batch,
    BatchCache,
    EvalResult,
    Evaluator,
    length_batches,
    pad,
    pad_id,
)
from mergetune.objectives.evaluators.causal import causal_forward


class LMLossEvaluator(Evaluator):
    """Language-modelling loss on held-out texts: ``score = -loss`` (higher is better).

    Convention: ``loss`` is the mean negative log-likelihood per predicted token over the whole set
    (every token after the first of each text, each text truncated to ``max_length`` tokens, the
    tokeniser's special tokens included), i.e. the token-weighted average of the per-text losses
    ``model(input_ids, labels=input_ids).loss``; ``perplexity = exp(loss)``. ``text_loss`` (the
    unweighted mean of per-text losses) is reported too. Texts of fewer than 2 tokens are skipped.
    """

    metric = "neg_loss"

    def __init__(
        self,
        texts: Sequence[str],
        tokenizer: Any,
        *,
        max_length: int = 256,
        batch_size: int = 16,
        max_tokens: int | None = DEFAULT_MAX_TOKENS,
        autocast: torch.dtype | None = None,
        name: str = "task",
    ) -> None:
        self.name = name
        self.autocast = autocast
        ids = [x for x in tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"] if len(x) >= 2]
        if not ids:
            raise TaskError(f"task '{name}': no text has the 2 tokens a language-modelling loss needs")
        self._n = len(ids)
        self.n_skipped = len(texts) - len(ids)
        batches = []
        for rows in length_batches([len(x) for x in ids], batch_size, max_tokens):
            seqs = [ids[i] for i in rows]
            inputs = {"input_ids": pad(seqs, pad_id(tokenizer)), "attention_mask": pad([[1] * len(s) for s in seqs], 0)}
            batches.append(Batch(torch.as_tensor(rows), inputs))
        self.batches = BatchCache(batches)

    @property
    def n_examples(self) -> int:
        return self._n

    def _evaluate(self, model: nn.Module) -> EvalResult:
        nll = torch.zeros(self.n_examples, dtype=torch.float64)
        count = torch.zeros(self.n_examples, dtype=torch.float64)
        for batch in self._batches_for(model):
            logits = causal_forward(model, batch.inputs)[:, :-1].float()
            targets = batch.inputs["input_ids"][:, 1:]
            mask = batch.inputs["attention_mask"][:, 1:].to(logits.dtype)
            token_nll = token_cross_entropy(logits, targets, mask)
            nll[batch.rows] = (token_nll * mask).sum(-1).double().cpu()
            count[batch.rows] = mask.sum(-1).double().cpu()
        loss = float(nll.sum() / count.sum())
        metrics = {
            "neg_loss": -loss,
            "loss": loss,
            "perplexity": math.exp(min(loss, 700.0)),
            "text_loss": float((nll / count).mean()),
            "n_tokens": float(count.sum()),
        }
        return EvalResult(self.metric, -loss, metrics, self.n_examples)


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood ``[B, T]`` in float32 from ``[B, T, V]`` logits; 0 where ``mask`` is 0.

    Computed on the flattened, contiguous ``[N, V]`` logits of the unmasked tokens only: over a
    large vocabulary, cross-entropy along a strided class dimension (``logits.transpose(1, 2)``)
    drifts from a float64 reference by about 1e-4 per token (SmolLM2's 49,152 tokens), the
    contiguous form by a few 1e-6.
    """
    keep = mask.bool()
    out = torch.zeros(targets.shape, dtype=torch.float32, device=logits.device)
    out[keep] = torch.nn.functional.cross_entropy(logits[keep].float(), targets[keep], reduction="none")
    return out
