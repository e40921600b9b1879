"""Multiple choice for causal LMs by the options' log-likelihood (the lm-evaluation-harness convention).

Each option ``o`` of a question with context ``c`` gets ``ll(o) = sum_t log p(o_t | c, o_<t)`` over its
tokens (:func:`~.causal.encode_pair` splits the tokens as the harness does). Then, as in the harness:

- ``accuracy`` ("acc"): the share of questions whose ``argmax_o ll(o)`` is the right option;
- ``acc_norm``: the same with ``argmax_o ll(o) / len(o)``, ``len(o)`` the option's length in characters
  (without the delimiter; 1 for an empty option).

Two ways to compute the same numbers (``scoring``):

- ``shared_context`` (default): one packed sequence per question, ``c + o_1[:-1] + ... + o_n[:-1]``,
  with a 4-D attention mask under which each option's tokens see the context and their own option's
  earlier tokens only, and position ids that restart after the context for every option. The
  question is encoded once instead of once per option, and the last token of an option (never an
  input) is not fed at all. The longest token prefix that every question's context shares (the BOS
  token, a task prefix, few-shot examples, a chat template's system turn) is encoded once per
  evaluation, and every packed row continues its KV cache: its position ids start after the prefix
  and its mask lets every token see the whole prefix. Rows are right-padded and bucketed by length.
- ``per_option``: one left-padded sequence ``(c + o)[:-1]`` per option, the harness's own layout.

Only the logits of the positions that predict an option token are projected onto the vocabulary,
and ``log p(token)`` is the token's logit minus the row's logsumexp (float32). Both layouts give the
same log-likelihoods up to float rounding (tests check 1e-5 against an unpadded float64 reference), and
both cut a context too long for ``max_length`` the same way: it keeps its last
``max_length + 1 - (longest option)`` tokens, so every option of a question is scored on the same
context (the harness cuts per option; the two agree whenever nothing is cut).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from mergetune.errors import TaskError
from mergetune.forward import model_device, scoring
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
from mergetune.objectives.evaluators.causal import (
    attention_bias,
    encode_pair,
    expanded_cache,
    left_padded,
    logits_at,
    prefix_cache,
    token_logprobs,
)

SCORINGS = ("shared_context", "per_option")
METRICS = ("accuracy", "acc_norm")


@dataclass(frozen=True)
class _Question:
    """One question's tokens: the (possibly cut) context and each option's tokens, and its first pair id."""

    context: list[int]
    options: list[list[int]]
    first_pair: int


class MultipleChoiceEvaluator(SlicedEvaluator):
    """Multiple choice for causal LMs by log-likelihood, the lm-evaluation-harness convention (module docstring).

    ``metric`` is ``accuracy`` (default), ``acc_norm`` (``normalize=True`` is the same) or ``custom``
    with a ``scorer`` (it receives each question's option log-likelihoods and the right index).
    Pairs or packed questions are batched by length (:func:`~.base.length_batches`), within each slice
    of ``parts`` (question rows; see :class:`~.base.SlicedEvaluator`): an example's value is whether
    the metric's choice is right.
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
        metric: str | None = None,
        scoring: str = "shared_context",
        scorer: Scorer | None = None,
        autocast: torch.dtype | None = None,
        parts: Parts = None,
        name: str = "task",
    ) -> None:
        if not contexts or len(choices) != len(contexts) or len(labels) != len(contexts):
            raise TaskError(f"task '{name}': need as many choices and labels as contexts (and at least one)")
        if scoring not in SCORINGS:
            raise TaskError(f"task '{name}': multiple-choice scoring '{scoring}' unknown; use one of {SCORINGS}")
        self.name = name
        self.autocast = autocast
        self.scorer = scorer
        self.metric = primary_metric(name, metric or ("acc_norm" if normalize else None), scorer, METRICS)
        self.scoring = scoring
        self.contexts = list(contexts)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.choices = [tuple(c) for c in choices]
        self.option_chars = [np.array([max(len(o), 1) for o in c], dtype=np.float64) for c in self.choices]
        self.n_pairs = sum(len(c) for c in self.choices)
        questions = self._encode(tokenizer, contexts, delimiter, max_length)
        self._set_parts(parts)
        pad_value = pad_id(tokenizer)
        #: the context tokens every question starts with, encoded once per evaluation (shared_context only)
        self.prefix: list[int] = []
        if scoring == "shared_context":
            self.prefix = shared_prefix([q.context for q in questions])
            self.batches = _packed_batches(questions, len(self.prefix), pad_value, (batch_size, max_tokens, parts))
        else:
            pair_parts = None if parts is None else [_pairs_of(questions, part) for part in parts]
            self.batches = _per_option_batches(questions, pad_value, (batch_size, max_tokens, pair_parts))

    @property
    def n_examples(self) -> int:
        return len(self.labels)

    def _encode(self, tokenizer: Any, contexts: Sequence[str], delimiter: str, max_length: int) -> list[_Question]:
        """Each question's context and options as tokens, the context cut to fit its longest option."""
        questions, first_pair = [], 0
        for context, options in zip(contexts, self.choices, strict=True):
            pairs = [encode_pair(tokenizer, context, delimiter + option, self.name) for option in options]
            ctx, conts = pairs[0][0], [cont for _, cont in pairs]
            keep = max_length + 1 - max(len(c) for c in conts)
            if keep < 1:
                raise TaskError(
                    f"task '{self.name}': an option of {max(len(c) for c in conts)} tokens leaves no context within "
                    f"max_length {max_length}; raise max_length"
                )
            questions.append(_Question(ctx[-keep:], conts, first_pair))
            first_pair += len(options)
        return questions

    def loglikelihoods(self, model: nn.Module) -> np.ndarray:
        """``ll(o)``: the sum of each option's token log-probabilities, one per (question, option) pair in order."""
        outputs = self._new_outputs()
        with scoring(model, self.autocast):
            self._forward(model, self._batches_for(model), outputs)
        return outputs["loglik"].numpy()

    def _new_outputs(self) -> Outputs:
        return {"loglik": torch.zeros(self.n_pairs, dtype=torch.float64)}

    def _forward(self, model: nn.Module, batches: Sequence[Batch], outputs: Outputs) -> None:
        out = outputs["loglik"]
        shared = None
        if self.prefix and batches:
            shared = prefix_cache(model, torch.tensor([self.prefix], device=model_device(model)))
        for batch in batches:
            inputs = dict(batch.inputs)
            if "allowed" in batch.extra:
                inputs["attention_mask"] = attention_bias(model, batch.extra["allowed"])
            cache = None if shared is None else expanded_cache(shared, len(batch.rows))
            logits = logits_at(model, inputs, batch.extra["positions"], cache)
            token_logp = token_logprobs(logits, batch.extra["targets"], batch.extra["which"]) * batch.extra["mask"]
            out.index_add_(0, batch.extra["pairs"].flatten().cpu(), token_logp.flatten().double().cpu())

    def per_question(self, loglik: np.ndarray) -> list[np.ndarray]:
        """The pair log-likelihoods cut into one array per question."""
        bounds = np.cumsum([0] + [len(c) for c in self.choices])
        return [loglik[bounds[i] : bounds[i + 1]] for i in range(self.n_examples)]

    def _summarise(self, outputs: Outputs, rows: np.ndarray) -> EvalResult:
        """Metrics over the questions ``rows``; each question's value is whether the primary metric's pick is right."""
        all_questions = self.per_question(outputs["loglik"].numpy())
        per_question = [all_questions[i] for i in rows]
        chars = [self.option_chars[i] for i in rows]
        labels = self.labels[rows].tolist()
        right = np.array([int(np.argmax(ll)) == y for ll, y in zip(per_question, labels, strict=True)])
        right_norm = np.array(
            [int(np.argmax(ll / n)) == y for ll, n, y in zip(per_question, chars, labels, strict=True)]
        )
        metrics = {"accuracy": float(np.mean(right)), "acc_norm": float(np.mean(right_norm))}
        if self.scorer is not None:
            predictions = [ll.tolist() for ll in per_question]
            metrics[CUSTOM_METRIC] = custom_score(self.scorer, predictions, labels, self.name)
        per_example = (right_norm if self.metric == "acc_norm" else right).astype(np.float64)
        return EvalResult(self.metric, metrics[self.metric], metrics, len(rows), per_example=per_example)


# ---- the two batch layouts -------------------------------------------------------------------


def _targets_extra(rows: list[tuple[list[int], list[int], list[int]]]) -> dict[str, torch.Tensor]:
    """Per row (prediction position of each target, target tokens, pair ids) padded to one width.

    ``positions`` holds each row's distinct prediction positions (the first token of every option is
    predicted from the same position: its logits are computed once) and ``which`` indexes into them
    for each target; ``targets``, ``pairs`` and ``mask`` are per target.
    """
    distinct = [sorted(set(p)) for p, _, _ in rows]
    which = [[d.index(x) for x in p] for d, (p, _, _) in zip(distinct, rows, strict=True)]
    return {
        "positions": pad(distinct, 0),
        "which": pad(which, 0),
        "targets": pad([t for _, t, _ in rows], 0),
        "pairs": pad([q for _, _, q in rows], 0),
        "mask": pad([[1] * len(t) for _, t, _ in rows], 0).float(),
    }


def _pairs_of(questions: list[_Question], part: Sequence[int]) -> list[int]:
    """The (question, option) pair ids of the questions ``part``: a slice of questions as a slice of pairs."""
    return [questions[q].first_pair + j for q in part for j in range(len(questions[q].options))]


def _per_option_batches(questions: list[_Question], pad_value: int, sizes: tuple[int, int | None, Parts]) -> BatchCache:
    """One left-padded row ``(context + option)[:-1]`` per pair; the option's tokens are the row's last ones."""
    inputs, targets = [], []
    for q in questions:
        for cont in q.options:
            inputs.append((q.context + cont)[:-1])
            targets.append(cont)
    batches = []
    for part, rows in sliced_batches([len(x) for x in inputs], *sizes):
        width = max(len(inputs[i]) for i in rows)
        per_row = []
        for i in rows:
            n = len(targets[i])
            per_row.append((list(range(width - n, width)), targets[i], [i] * n))
        padded = left_padded([inputs[i] for i in rows], pad_value)
        batches.append(Batch(torch.as_tensor(rows), padded, _targets_extra(per_row), part))
    return BatchCache(batches)


def shared_prefix(contexts: Sequence[Sequence[int]]) -> list[int]:
    """The longest token prefix of every context, leaving each at least one token of its own.

    The kept token is the one whose logits predict the first token of every option, so it must be
    part of the question's packed row.
    """
    shortest = min(len(c) for c in contexts) - 1
    first = contexts[0]
    n = 0
    while n < shortest and all(c[n] == first[n] for c in contexts):
        n += 1
    return list(first[:n])


def _packed_row(
    q: _Question, n_prefix: int
) -> tuple[list[int], list[int], list[tuple[int, int]], tuple[list[int], ...]]:
    """One question packed after the shared prefix: (tokens, position ids, attention spans, (prediction
    positions, targets, pair ids)), all in the row's own coordinates (the prefix is not part of the row).

    An option's token ``t`` sits at ``start + t`` with position id ``len(context) + t`` and attends the
    prefix, the rest of the context and its option's tokens ``0..t`` (span ``(start, start + t)``); its
    log-probability comes from the previous position: the context's last token for ``t = 0``.
    """
    n_ctx = len(q.context)
    own = n_ctx - n_prefix
    tokens, position_ids = list(q.context[n_prefix:]), list(range(n_prefix, n_ctx))
    spans = [(-1, -1)] * own  # context tokens: plain causal attention
    predict, targets, pairs = [], [], []
    for j, cont in enumerate(q.options):
        start = len(tokens)
        fed = cont[:-1]
        tokens += fed
        position_ids += [n_ctx + t for t in range(len(fed))]
        spans += [(start, start + t) for t in range(len(fed))]
        predict += [own - 1] + [start + t for t in range(len(fed))]
        targets += cont
        pairs += [q.first_pair + j] * len(cont)
    return tokens, position_ids, spans, (predict, targets, pairs)


def _allowed(n_ctx: int, spans: list[tuple[int, int]], width: int, n_prefix: int) -> torch.Tensor:
    """``[width, n_prefix + width]`` booleans: may query ``i`` of the row attend key ``k`` (the prefix's keys first).

    Every query sees the whole prefix; padding rows also attend only themselves within the row.
    """
    allowed = torch.zeros(width, n_prefix + width, dtype=torch.bool)
    allowed[:, :n_prefix] = True
    row = allowed[:, n_prefix:]  # a view: the row's own keys
    row[:n_ctx, :n_ctx] = torch.ones(n_ctx, n_ctx, dtype=torch.bool).tril()
    for i, (start, end) in enumerate(spans[n_ctx:], start=n_ctx):
        row[i, :n_ctx] = True
        row[i, start : end + 1] = True
    padded = torch.arange(len(spans), width)
    row[padded, padded] = True
    return allowed


def _packed_batches(
    questions: list[_Question], n_prefix: int, pad_value: int, sizes: tuple[int, int | None, Parts]
) -> BatchCache:
    """One right-padded packed row per question after the shared prefix (see :func:`_packed_row`), bucketed
    by packed length."""
    packed = [_packed_row(q, n_prefix) for q in questions]
    batches = []
    for part, rows in sliced_batches([len(p[0]) for p in packed], *sizes):
        width = max(len(packed[i][0]) for i in rows)
        allowed = torch.stack(
            [_allowed(len(questions[i].context) - n_prefix, packed[i][2], width, n_prefix) for i in rows]
        )
        inputs = {
            "input_ids": pad([packed[i][0] for i in rows], pad_value),
            "position_ids": pad([packed[i][1] for i in rows], 0),
        }
        extra = {"allowed": allowed, **_targets_extra([packed[i][3] for i in rows])}
        batches.append(Batch(torch.as_tensor(rows), inputs, extra, part))
    return BatchCache(batches)
