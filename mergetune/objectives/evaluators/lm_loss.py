"""Language-modelling loss on held-out texts, as a score (minus the mean loss per token).

On the whole text, or on the answer only: with ``answers``, text ``i`` is a prompt, the sequence is
``prompt + delimiter + answer`` split as lm-evaluation-harness splits a (context, continuation) pair
(:func:`~.causal.encode_pair`), and only the answer's tokens are predicted targets:
``loss = sum_i sum_{t in answer_i} -log p(x_t | x_<t) / sum_i |answer_i|``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from mergetune.errors import TaskError
from mergetune.objectives.evaluators.base import (
    CUSTOM_METRIC,
    DEFAULT_MAX_TOKENS,
    Batch,
    BatchCache,
    EvalResult,
    Outputs,
    Parts,
    Scorer,
    SlicedEvaluator,
    custom_score,
    pad,
    pad_id,
    primary_metric,
    sliced_batches,
)
from mergetune.objectives.evaluators.causal import causal_forward, encode_pair

#: A sequence's token ids and how many leading tokens are context only (its targets start at that token).
Scored = tuple[list[int], int]


class LMLossEvaluator(SlicedEvaluator):
    """Language-modelling loss on held-out texts: ``score = -loss`` (higher is better).

    Convention: ``loss`` is the mean negative log-likelihood per predicted token over the whole set
    (every token after the first of each text, each text truncated to ``max_length`` tokens, the
    tokeniser's special tokens included), i.e. the token-weighted average of the per-text losses
    ``model(input_ids, labels=input_ids).loss``; ``perplexity = exp(loss)``. ``text_loss`` (the
    unweighted mean of per-text losses) is reported too. Texts of fewer than 2 tokens are skipped.

    With ``answers`` (one per text), the texts are prompts and only the answers' tokens count (module
    docstring); a prompt too long for ``max_length`` loses its oldest tokens, an answer that does not
    fit is an error. ``metric`` is ``neg_loss``, or ``custom`` with a ``scorer`` (it receives each
    example's scored-token log-probabilities and its scored text).

    Sliced (``parts``: rows of the kept texts, see :class:`~.base.SlicedEvaluator`), an example's value is
    minus its summed token loss; the score on some rows is their sum over their token count.
    """

    def __init__(
        self,
        texts: Sequence[str],
        tokenizer: Any,
        *,
        answers: Sequence[str] | None = None,
        delimiter: str = " ",
        metric: str | None = None,
        scorer: Scorer | None = None,
        max_length: int = 256,
        batch_size: int = 16,
        max_tokens: int | None = DEFAULT_MAX_TOKENS,
        autocast: torch.dtype | None = None,
        parts: Parts = None,
        name: str = "task",
    ) -> None:
        self.name = name
        self.autocast = autocast
        self.scorer = scorer
        self.metric = primary_metric(name, metric, scorer, ("neg_loss",))
        if answers is None:
            sequences, scored_texts, kept = self._whole_texts(texts, tokenizer, max_length)
        else:
            sequences, scored_texts = self._answers(texts, answers, tokenizer, delimiter, max_length)
            kept = list(range(len(sequences)))
        if not sequences:
            raise TaskError(f"task '{name}': no text has the 2 tokens a language-modelling loss needs")
        self._n = len(sequences)
        self.n_skipped = len(texts) - len(sequences)
        self.scored_texts = scored_texts
        if parts is not None:  # slices name rows of the texts given; the skipped texts are in none of them
            position = {text_row: i for i, text_row in enumerate(kept)}
            parts = [[position[r] for r in part if r in position] for part in parts]
        self._set_parts(parts)
        self.batches = self._batch(sequences, pad_id(tokenizer), (batch_size, max_tokens, parts))

    @staticmethod
    def _whole_texts(
        texts: Sequence[str], tokenizer: Any, max_length: int
    ) -> tuple[list[Scored], list[str], list[int]]:
        """(ids, number of unscored leading tokens = 1) per text of at least 2 tokens, those texts and their rows."""
        encoded = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
        kept = [i for i, ids in enumerate(encoded) if len(ids) >= 2]
        return [(list(encoded[i]), 1) for i in kept], [texts[i] for i in kept], kept

    def _answers(
        self, prompts: Sequence[str], answers: Sequence[str], tokenizer: Any, delimiter: str, max_length: int
    ) -> tuple[list[Scored], list[str]]:
        """(prompt + answer ids, number of prompt tokens) per example: only the answer's tokens are targets."""
        if len(answers) != len(prompts):
            raise TaskError(f"task '{self.name}': {len(answers)} answers for {len(prompts)} prompts")
        sequences = []
        for prompt, answer in zip(prompts, answers, strict=True):
            context, cont = encode_pair(tokenizer, prompt, delimiter + answer, self.name)
            if len(cont) >= max_length:
                raise TaskError(
                    f"task '{self.name}': an answer of {len(cont)} tokens does not fit max_length {max_length} "
                    "with its prompt; raise max_length"
                )
            context = context[-(max_length - len(cont)) :]
            sequences.append((context + cont, len(context)))
        return sequences, list(answers)

    @staticmethod
    def _batch(sequences: list[Scored], pad_value: int, sizes: tuple[int, int | None, Parts]) -> BatchCache:
        """Right-padded batches; ``loss_mask[b, t]`` is 1 where token ``t + 1`` of row ``b`` is a scored target."""
        batches = []
        for part, rows in sliced_batches([len(ids) for ids, _ in sequences], *sizes):
            seqs = [sequences[i][0] for i in rows]
            scored = [[0] * (sequences[i][1] - 1) + [1] * (len(sequences[i][0]) - sequences[i][1]) for i in rows]
            inputs = {"input_ids": pad(seqs, pad_value), "attention_mask": pad([[1] * len(s) for s in seqs], 0)}
            batches.append(Batch(torch.as_tensor(rows), inputs, {"loss_mask": pad(scored, 0)}, part))
        return BatchCache(batches)

    @property
    def n_examples(self) -> int:
        return self._n

    def _new_outputs(self) -> Outputs:
        return {
            "nll": torch.zeros(self.n_examples, dtype=torch.float64),
            "count": torch.zeros(self.n_examples, dtype=torch.float64),
            "token_logp": [[] for _ in range(self.n_examples)],
        }

    def _forward(self, model: nn.Module, batches: Sequence[Batch], outputs: Outputs) -> None:
        nll, count, token_logp = outputs["nll"], outputs["count"], outputs["token_logp"]
        for batch in batches:
            token_nll, mask = batch_token_nll(model, batch)
            nll[batch.rows] = (token_nll * mask).sum(-1).double().cpu()
            count[batch.rows] = mask.sum(-1).double().cpu()
            if self.scorer is not None:
                for row, values, keep in zip(batch.rows.tolist(), token_nll.cpu(), mask.bool().cpu(), strict=True):
                    token_logp[row] = (-values[keep]).double().tolist()

    def _summarise(self, outputs: Outputs, rows: np.ndarray) -> EvalResult:
        """The loss over ``rows`` (token-weighted); each example's value is minus its summed token loss."""
        every = len(rows) == self.n_examples  # the whole set: reduce the arrays as they are (bit for bit as ever)
        index = torch.as_tensor(rows)
        nll = outputs["nll"] if every else outputs["nll"][index]
        count = outputs["count"] if every else outputs["count"][index]
        loss = float(nll.sum() / count.sum())
        metrics = {
            "neg_loss": -loss,
            "loss": loss,
            "perplexity": math.exp(min(loss, 700.0)),
            "text_loss": float((nll / count).mean()),
            "n_tokens": float(count.sum()),
        }
        if self.scorer is not None:
            metrics[CUSTOM_METRIC] = custom_score(self.scorer, outputs["token_logp"], self.scored_texts, self.name)
        scale = len(rows) / float(count.sum())  # score = −Σ nll / Σ tokens = scale × mean(−nll_i)
        per_example = (-nll).numpy()
        return EvalResult(
            self.metric, metrics[self.metric], metrics, len(rows), per_example=per_example, example_scale=scale
        )


_CE_CHUNK_ELEMENTS = 1 << 22  # float64 rows per chunk: 32 MiB, whatever the vocabulary


def batch_token_nll(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token negative log-likelihood ``[B, T-1]`` of one batch (0 where not scored) and its float32
    ``loss_mask``; differentiable when autograd is on (gradient tuning minimises it)."""
    logits = causal_forward(model, batch.inputs)[:, :-1].float()
    mask = batch.extra["loss_mask"].to(logits.dtype)
    return token_cross_entropy(logits, batch.inputs["input_ids"][:, 1:], mask), mask


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood ``[B, T]`` (float32) from ``[B, T, V]`` logits; 0 where ``mask`` is 0.

    Computed on the flattened ``[N, V]`` logits of the unmasked tokens only, in float64 by chunks of
    rows: over a large vocabulary the float32 log-sum-exp itself drifts from a float64 reference
    (up to 1.7e-5 per token on SmolLM2's 49,152 tokens; along a strided class dimension,
    ``logits.transpose(1, 2)``, about 1e-4). The float64 chunks cost a few MB and far less time
    than the forward pass that made the logits.
    """
    keep = mask.bool()
    out = torch.zeros(targets.shape, dtype=torch.float32, device=logits.device)
    rows, wanted = logits[keep], targets[keep]
    chunk = max(1, _CE_CHUNK_ELEMENTS // max(1, rows.shape[-1]))
    parts = [
        torch.nn.functional.cross_entropy(rows[i : i + chunk].double(), wanted[i : i + chunk], reduction="none")
        for i in range(0, rows.shape[0], chunk)
    ]
    if parts:
        out[keep] = torch.cat(parts).float()
    return out
