"""Multiple choice for causal LMs by the options' log-likelihood (the lm-evaluation-harness convention)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from mergetune.errors import TaskError
from mergetune.forward import scoring
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
from mergetune.objectives.evaluators.causal import adds_bos, causal_forward, encode_text, left_padded


class MultipleChoiceEvaluator(Evaluator):
    """Multiple choice for causal LMs by log-likelihood, the lm-evaluation-harness convention.

    Each option is scored by the sum of the log-probabilities of its tokens given the context:
    ``context + delimiter + option`` is tokenised whole and the option's tokens are those past the
    context's own tokenisation (trailing spaces of a context move to the option, as in the
    harness). ``accuracy`` picks the option of highest sum; ``acc_norm`` divides each sum by the
    option's length in characters first (the harness's ``acc_norm``). A BOS token is prepended when
    the tokeniser adds one by default; an empty context falls back to EOS as its only token.
    All (context, option) pairs are batched together, left-padded (position ids follow each
    sequence's first real token) so every option ends the row and only the last logits are computed;
    contexts too long for ``max_length`` lose their oldest tokens.
    """

    def __init__(
        self,
        contexts: Sequence[str],
        choices: Sequence[Sequence[str]],
        labels: Sequence[int] | np.ndarray,
        tokenizer: Any,
        *,
        max_length: int = 256,
        batch_size: int = 32,
        max_tokens: int | None = DEFAULT_MAX_TOKENS,
        delimiter: str = " ",
        normalize: bool = False,
        autocast: torch.dtype | None = None,
        name: str = "task",
    ) -> None:
        if not contexts or len(choices) != len(contexts) or len(labels) != len(contexts):
            raise TaskError(f"task '{name}': need as many choices and labels as contexts (and at least one)")
        self.name = name
        self.autocast = autocast
        self.metric = "acc_norm" if normalize else "accuracy"
        self.labels = np.asarray(labels, dtype=np.int64)
        self.choices = [tuple(c) for c in choices]
        self.option_chars = [np.array([max(len(o), 1) for o in c], dtype=np.float64) for c in self.choices]
        pairs = [(i, j) for i, c in enumerate(self.choices) for j in range(len(c))]
        self.pair_example = np.array([i for i, _ in pairs])
        sequences = [self._pair_tokens(tokenizer, contexts[i], delimiter + self.choices[i][j]) for i, j in pairs]
        self.batches = self._batch(sequences, pad_id(tokenizer), max_length, (batch_size, max_tokens))

    @property
    def n_examples(self) -> int:
        return len(self.labels)

    def _pair_tokens(self, tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) split as the harness does."""
        stripped = context.rstrip()
        if len(stripped) < len(context):
            continuation = context[len(stripped) :] + continuation
            context = stripped
        whole = encode_text(tokenizer, context + continuation)
        ctx = encode_text(tokenizer, context)
        cont = whole[len(ctx) :] if whole[: len(ctx)] == ctx else encode_text(tokenizer, continuation)
        if not cont:
            cont = encode_text(tokenizer, continuation)
        prefix = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
        if not prefix and not ctx:
            eos = getattr(tokenizer, "eos_token_id", None)
            if eos is None:
                raise TaskError(f"task '{self.name}': an empty context needs a BOS or EOS token to condition on")
            prefix = [eos]
        return prefix + ctx, cont

    def _batch(
        self,
        sequences: list[tuple[list[int], list[int]]],
        pad_value: int,
        max_length: int,
        sizes: tuple[int, int | None],
    ) -> BatchCache:
        inputs: list[list[int]] = []
        targets: list[list[int]] = []
        for ctx, cont in sequences:
            full = (ctx + cont)[-(max_length + 1) :]
            if len(cont) >= len(full):
                raise TaskError(
                    f"task '{self.name}': an option of {len(cont)} tokens leaves no context within max_length "
                    f"{max_length}; raise max_length"
                )
            inputs.append(full[:-1])
            targets.append(cont)
        batches = []
        for rows in length_batches([len(x) for x in inputs], *sizes):
            batch_targets = [targets[i] for i in rows]
            extra = {
                "targets": pad(batch_targets, 0, "left"),
                "mask": pad([[1] * len(t) for t in batch_targets], 0, "left"),
            }
            batches.append(Batch(torch.as_tensor(rows), left_padded([inputs[i] for i in rows], pad_value), extra))
        return BatchCache(batches)

    def loglikelihoods(self, model: nn.Module) -> np.ndarray:
        """Sum of the option tokens' log-probabilities, one per (example, option) pair in order."""
        out = torch.empty(len(self.pair_example), dtype=torch.float64)
        with scoring(model, self.autocast):
            for batch in self._batches_for(model):
                targets, mask = batch.extra["targets"], batch.extra["mask"]
                logits = causal_forward(model, batch.inputs, logits_to_keep=targets.shape[1])
                logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
                out[batch.rows] = (logp * mask).sum(-1).double().cpu()
        return out.numpy()

    def _evaluate(self, model: nn.Module) -> EvalResult:
        loglik = self.loglikelihoods(model)
        bounds = np.cumsum([0] + [len(c) for c in self.choices])
        per_example = [loglik[bounds[i] : bounds[i + 1]] for i in range(self.n_examples)]
        acc = np.mean([int(np.argmax(ll)) == y for ll, y in zip(per_example, self.labels, strict=True)])
        acc_norm = np.mean(
            [int(np.argmax(ll / n)) == y for ll, n, y in zip(per_example, self.option_chars, self.labels, strict=True)]
        )
        metrics = {"accuracy": float(acc), "acc_norm": float(acc_norm)}
        return EvalResult(self.metric, metrics[self.metric], metrics, self.n_examples)
