"""Evaluators: score one model on one task's examples, fast, because a search scores thousands of candidates.

Every evaluator tokenises its examples ONCE, at construction, sorts them by length and cuts them
into batches padded only to their own longest example (dynamic padding: padding everything to a
fixed length was about 1.75x slower), of at most ``batch_size`` examples and ``max_tokens`` padded
tokens (so long examples come in small batches and short ones in large batches; see
:func:`length_batches`). A candidate then only runs forwards, under
``torch.inference_mode()`` and in eval mode (the model's train/eval flags are restored after).
Evaluators never change a model's weights, and know nothing about merging: they score whatever
module they are given, e.g. a task model whose shared weights are views of a merge buffer.

Each evaluator returns an :class:`EvalResult`: its primary ``score`` (higher is better) and the
other metrics it computed on the way. Results do not depend on the batch size or on the order of
the examples (up to float rounding: padding changes the summation order of a few kernels).

For the fewest threads' contention, a worker should call ``torch.set_num_threads(1)`` once (see
``docs/offline-data.md``); evaluators do not change process-wide settings.
"""

from __future__ import annotations

import math
import re
import string
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from mergetune.errors import TaskError
from mergetune.forward import Inputs, forward_params, model_device, scoring

LogitsFn = Callable[[nn.Module, Inputs], torch.Tensor]

#: Padded tokens per batch by default (see :func:`length_batches`); ``None`` lifts the budget.
DEFAULT_MAX_TOKENS = 512
#: Tokeniser outputs a sequence model may take, and their padding value (input_ids: the pad token).
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass(frozen=True)
class EvalResult:
    """One evaluator's verdict: the primary score (higher is better) and every metric computed."""

    metric: str
    score: float
    metrics: dict[str, float] = field(default_factory=dict)
    n_examples: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "score": self.score,
            "metrics": dict(self.metrics),
            "n_examples": self.n_examples,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvalResult:
        return cls(str(data["metric"]), float(data["score"]), dict(data["metrics"]), int(data["n_examples"]))


# ---- batching --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Batch:
    """A padded batch: ``rows`` are the items' positions in the evaluator's own order."""

    rows: torch.Tensor
    inputs: Inputs
    extra: Inputs = field(default_factory=dict)

    def to(self, device: torch.device) -> Batch:
        def move(d: Inputs) -> Inputs:
            return {k: v.to(device, non_blocking=True) for k, v in d.items()}

        return Batch(self.rows, move(self.inputs), move(self.extra))


def length_order(lengths: Sequence[int]) -> list[int]:
    """Item indices by decreasing length (ties by index), so each batch holds similar lengths."""
    return sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))


def length_batches(lengths: Sequence[int], batch_size: int, max_tokens: int | None = None) -> list[list[int]]:
    """Length-sorted batches (longest first) of at most ``batch_size`` items and ``max_tokens`` padded tokens.

    A batch's padded size is its item count times its longest item. The token budget keeps batches of
    long examples small and lets short ones share a batch: on one CPU thread MiniLM's throughput per
    token peaks at a few hundred to about a thousand tokens per forward and falls beyond. An item longer
    than the budget gets a batch of its own.
    """
    if batch_size < 1 or (max_tokens is not None and max_tokens < 1):
        raise ValueError(f"batch_size and max_tokens must be at least 1, got {batch_size} and {max_tokens}")
    batches: list[list[int]] = []
    current: list[int] = []
    for i in length_order(lengths):
        longest = lengths[current[0]] if current else lengths[i]
        if current and (len(current) >= batch_size or (max_tokens and (len(current) + 1) * longest > max_tokens)):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def pad(seqs: Sequence[Sequence[int]], value: int, side: str = "right") -> torch.Tensor:
    """A ``[len(seqs), longest]`` int64 tensor, ``seqs`` padded with ``value`` on ``side``."""
    width = max((len(s) for s in seqs), default=0)
    out = torch.full((len(seqs), width), value, dtype=torch.int64)
    for i, s in enumerate(seqs):
        if s:
            if side == "right":
                out[i, : len(s)] = torch.as_tensor(s, dtype=torch.int64)
            else:
                out[i, width - len(s) :] = torch.as_tensor(s, dtype=torch.int64)
    return out


class BatchCache:
    """Batches built once on the CPU, copied once to the device of the model that asks for them."""

    def __init__(self, batches: list[Batch]) -> None:
        self.cpu = batches
        self._device: torch.device = torch.device("cpu")
        self._moved = batches

    def on(self, device: torch.device) -> list[Batch]:
        if device != self._device:
            self._moved = self.cpu if device.type == "cpu" else [b.to(device) for b in self.cpu]
            self._device = device
        return self._moved

    def __len__(self) -> int:
        return len(self.cpu)


def pad_id(tokenizer: Any) -> int:
    """The tokeniser's pad id, else its EOS id, else 0 (padded positions are masked out anyway)."""
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0


# ---- model helpers ---------------------------------------------------------------------------


def sequence_logits(model: nn.Module, inputs: Inputs) -> torch.Tensor:
    """``model(**inputs).logits``, passing only the tokeniser outputs the model's forward declares."""
    accepted = forward_params(model)
    return model(**{k: v for k, v in inputs.items() if k in accepted}).logits


def pooled_head_logits(head: nn.Module) -> LogitsFn:
    """A ``logits_fn`` for an encoder scored with a separate head on its mean-pooled last hidden state.

    For a shared encoder (e.g. a bare ``BertModel``) with one small head per task; mean pooling does
    not depend on pooler weights a converted model may lack.
    """

    def logits(model: nn.Module, inputs: Inputs) -> torch.Tensor:
        accepted = forward_params(model)
        hidden = model(**{k: v for k, v in inputs.items() if k in accepted}).last_hidden_state
        mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return head(pooled.to(next(head.parameters()).dtype))

    return logits


# ---- metrics ---------------------------------------------------------------------------------


def classification_metrics(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> dict[str, float]:
    """Accuracy, macro-F1 and Matthews correlation from integer labels and predictions.

    Macro-F1 averages per-class F1 over the classes present in the labels or the predictions
    (scikit-learn's default); MCC is the multi-class (Gorodkin) form, 0 when undefined.
    """
    labels = np.asarray(labels, dtype=np.int64)
    predictions = np.asarray(predictions, dtype=np.int64)
    confusion = np.zeros((num_classes, num_classes), dtype=np.float64)
    np.add.at(confusion, (labels, predictions), 1.0)
    n = confusion.sum()
    tp = np.diag(confusion)
    true, pred = confusion.sum(1), confusion.sum(0)
    present = (true + pred) > 0
    f1 = np.divide(2 * tp, true + pred, out=np.zeros_like(tp), where=present)
    denominator = math.sqrt((n * n - (pred * pred).sum()) * (n * n - (true * true).sum()))
    mcc = (tp.sum() * n - (true * pred).sum()) / denominator if denominator > 0 else 0.0
    return {
        "accuracy": float(tp.sum() / n) if n else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "mcc": float(mcc),
    }


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split())


# ---- the evaluators --------------------------------------------------------------------------


class Evaluator(ABC):
    """Scores a model on fixed examples; subclasses tokenise in ``__init__`` and only run forwards later."""

    metric: str
    name: str
    batches: BatchCache
    autocast: torch.dtype | None = None  # dtype of torch.autocast around forwards; None: the model's own

    def evaluate(self, model: nn.Module) -> EvalResult:
        """The model's score on this evaluator's examples (inference mode, eval mode, weights untouched)."""
        with scoring(model, self.autocast):
            return self._evaluate(model)

    __call__ = evaluate

    @property
    @abstractmethod
    def n_examples(self) -> int: ...

    @abstractmethod
    def _evaluate(self, model: nn.Module) -> EvalResult: ...

    def _batches_for(self, model: nn.Module) -> list[Batch]:
        return self.batches.on(model_device(model))


class _SequenceEvaluator(Evaluator):
    """Texts (and optional pairs) scored through a sequence classifier's logits, one row per example."""

    def __init__(
        self,
        texts: Sequence[str],
        tokenizer: Any,
        *,
        text_pairs: Sequence[str] | None = None,
        num_labels: int | None = None,
        max_length: int = 128,
        batch_size: int = 64,
        max_tokens: int | None = DEFAULT_MAX_TOKENS,
        label_columns: Sequence[int] | None = None,
        logits_fn: LogitsFn | None = None,
        autocast: torch.dtype | None = None,
        name: str = "task",
    ) -> None:
        if not texts:
            raise TaskError(f"task '{name}': no examples to evaluate")
        if text_pairs is not None and len(text_pairs) != len(texts):
            raise TaskError(f"task '{name}': {len(text_pairs)} text pairs for {len(texts)} texts")
        self.name = name
        self.autocast = autocast
        self.num_labels = num_labels
        self.label_columns = None if label_columns is None else torch.as_tensor(list(label_columns))
        if self.label_columns is not None and num_labels is not None and len(self.label_columns) != num_labels:
            raise TaskError(f"task '{name}': {len(self.label_columns)} label columns for {num_labels} labels")
        self.logits_fn = logits_fn or sequence_logits
        self._n = len(texts)
        self.batches = self._tokenise(texts, text_pairs, tokenizer, max_length, (batch_size, max_tokens))

    @property
    def n_examples(self) -> int:
        return self._n

    @staticmethod
    def _tokenise(
        texts: Sequence[str],
        pairs: Sequence[str] | None,
        tokenizer: Any,
        max_length: int,
        sizes: tuple[int, int | None],
    ) -> BatchCache:
        encoded = tokenizer(
            list(texts), list(pairs) if pairs is not None else None, truncation=True, max_length=max_length
        )
        keys = [k for k in TEXT_INPUTS if k in encoded]
        ids = encoded["input_ids"]
        padding = {"input_ids": pad_id(tokenizer)}
        batches = []
        for rows in length_batches([len(x) for x in ids], *sizes):
            inputs = {k: pad([encoded[k][i] for i in rows], padding.get(k, 0)) for k in keys}
            if "attention_mask" not in inputs:
                inputs["attention_mask"] = pad([[1] * len(ids[i]) for i in rows], 0)
            batches.append(Batch(torch.as_tensor(rows), inputs))
        return BatchCache(batches)

    def logits(self, model: nn.Module) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(rows, float32 logits over this task's labels) per batch."""
        for batch in self._batches_for(model):
            logits = self.logits_fn(model, batch.inputs)
            if self.label_columns is not None:
                logits = logits[:, self.label_columns.to(logits.device)]
            if self.num_labels is not None and logits.shape[-1] != self.num_labels:
                raise TaskError(
                    f"task '{self.name}': the model's head has {logits.shape[-1]} outputs but the task has "
                    f"{self.num_labels} labels (load the task's own expert, or give label_columns)"
                )
            yield batch.rows, logits.float()


class ClassificationEvaluator(_SequenceEvaluator):
    """Accuracy, macro-F1 and MCC of a sequence classifier's argmax prediction.

    Works with any model whose output has ``.logits`` over the task's labels (the expert's own
    head), or through ``logits_fn`` with any other head (e.g. :func:`pooled_head_logits`).
    ``label_columns`` picks this task's columns out of a shared head that serves several tasks.
    ``metric`` (accuracy, macro_f1 or mcc) is the primary score.
    """

    def __init__(
        self,
        texts: Sequence[str],
        labels: Sequence[int] | np.ndarray,
        tokenizer: Any,
        *,
        metric: str = "accuracy",
        **options: Any,
    ) -> None:
        super().__init__(texts, tokenizer, **options)
        if metric not in ("accuracy", "macro_f1", "mcc"):
            raise TaskError(f"task '{self.name}': classification metric '{metric}' unknown; use accuracy/macro_f1/mcc")
        self.metric = metric
        self.labels = np.asarray(labels, dtype=np.int64)
        if len(self.labels) != self.n_examples:
            raise TaskError(f"task '{self.name}': {len(self.labels)} labels for {self.n_examples} texts")

    def predictions(self, model: nn.Module) -> np.ndarray:
        """The argmax label per example, in the evaluator's example order."""
        out = torch.empty(self.n_examples, dtype=torch.int64)
        with scoring(model, self.autocast):
            for rows, logits in self.logits(model):
                out[rows] = logits.argmax(-1).cpu()
        return out.numpy()

    def _evaluate(self, model: nn.Module) -> EvalResult:
        predictions = self.predictions(model)
        classes = max(self.num_labels or 0, int(self.labels.max()) + 1, int(predictions.max()) + 1)
        metrics = classification_metrics(self.labels, predictions, classes)
        return EvalResult(self.metric, metrics[self.metric], metrics, self.n_examples)


class EntropyEvaluator(_SequenceEvaluator):
    """The unsupervised objective of AdaMerging: minus the mean entropy of the predicted class distribution.

    Needs no labels: a merge whose classifier is confident on the task's inputs scores higher.
    Entropy is in nats, ``-sum p log p`` of ``softmax(logits)`` per example, averaged over the
    examples; ``score = -entropy``. Also reported: the entropy divided by ``log(num classes)``.
    """

    metric = "neg_entropy"

    def _evaluate(self, model: nn.Module) -> EvalResult:
        total, width = 0.0, 0
        for _, logits in self.logits(model):
            logp = torch.log_softmax(logits, dim=-1)
            total += float(-(logp.exp() * logp).sum(-1).sum())
            width = logits.shape[-1]
        entropy = total / self.n_examples
        normalized = entropy / math.log(width) if width > 1 else 0.0
        metrics = {"neg_entropy": -entropy, "entropy": entropy, "normalized_entropy": normalized}
        return EvalResult(self.metric, -entropy, metrics, self.n_examples)


# ---- causal language models ------------------------------------------------------------------


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokeniser puts its BOS token first by default (Llama's does, GPT-2's does not)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == bos


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _causal_forward(model: nn.Module, inputs: Inputs, logits_to_keep: int = 0) -> torch.Tensor:
    """Logits of a causal LM with no KV cache built; the last ``logits_to_keep`` positions when > 0."""
    accepted = forward_params(model)
    kwargs: dict[str, Any] = {k: v for k, v in inputs.items() if k in accepted}
    if "use_cache" in accepted:
        kwargs["use_cache"] = False
    if logits_to_keep and "logits_to_keep" in accepted:
        kwargs["logits_to_keep"] = logits_to_keep
    logits = model(**kwargs).logits
    return logits[:, -logits_to_keep:] if logits_to_keep else logits


def _left_padded(seqs: Sequence[Sequence[int]], pad_value: int) -> Inputs:
    """Left-padded ids, mask and position ids counted from each sequence's first real token."""
    mask = pad([[1] * len(s) for s in seqs], 0, "left")
    return {
        "input_ids": pad(seqs, pad_value, "left"),
        "attention_mask": mask,
        "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
    }


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
        whole = _encode(tokenizer, context + continuation)
        ctx = _encode(tokenizer, context)
        cont = whole[len(ctx) :] if whole[: len(ctx)] == ctx else _encode(tokenizer, continuation)
        if not cont:
            cont = _encode(tokenizer, continuation)
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
            batches.append(Batch(torch.as_tensor(rows), _left_padded([inputs[i] for i in rows], pad_value), extra))
        return BatchCache(batches)

    def loglikelihoods(self, model: nn.Module) -> np.ndarray:
        """Sum of the option tokens' log-probabilities, one per (example, option) pair in order."""
        out = torch.empty(len(self.pair_example), dtype=torch.float64)
        with scoring(model, self.autocast):
            for batch in self._batches_for(model):
                targets, mask = batch.extra["targets"], batch.extra["mask"]
                logits = _causal_forward(model, batch.inputs, logits_to_keep=targets.shape[1])
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
            logits = _causal_forward(model, batch.inputs)[:, :-1].float()
            targets = batch.inputs["input_ids"][:, 1:]
            mask = batch.inputs["attention_mask"][:, 1:].to(logits.dtype)
            token_nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
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


class ExactMatchEvaluator(Evaluator):
    """Short-answer accuracy of a causal LM: greedy decoding, then a normalised exact string match.

    Each prompt is decoded greedily (argmax, no sampling, no penalties; the model's generation config
    is ignored) for at most ``max_new_tokens`` tokens, stopping at EOS; the answer is the decoded
    text up to the first ``stop`` string, compared to each acceptable answer after
    :func:`normalize_answer`. Prompts are batched, left-padded, with a KV cache.
    """

    metric = "exact_match"

    def __init__(
        self,
        prompts: Sequence[str],
        answers: Sequence[str | Sequence[str]],
        tokenizer: Any,
        *,
        max_new_tokens: int = 16,
        stop: Sequence[str] = ("\n",),
        max_length: int = 256,
        batch_size: int = 32,
        max_tokens: int | None = DEFAULT_MAX_TOKENS,
        autocast: torch.dtype | None = None,
        name: str = "task",
    ) -> None:
        if not prompts or len(answers) != len(prompts):
            raise TaskError(f"task '{name}': need one answer (or list of answers) per prompt")
        self.name = name
        self.autocast = autocast
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.stop = tuple(stop)
        self.answers = [
            {normalize_answer(a)} if isinstance(a, str) else {normalize_answer(x) for x in a} for a in answers
        ]
        bos = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
        ids = [(bos + _encode(tokenizer, p))[-max_length:] for p in prompts]
        self.eos = getattr(tokenizer, "eos_token_id", None)
        self.batches = BatchCache(
            [
                Batch(torch.as_tensor(rows), _left_padded([ids[i] for i in rows], pad_id(tokenizer)))
                for rows in length_batches([len(x) for x in ids], batch_size, max_tokens)
            ]
        )

    @property
    def n_examples(self) -> int:
        return len(self.answers)

    def generations(self, model: nn.Module) -> list[str]:
        """The decoded answer per prompt (cut at the first stop string), in prompt order."""
        texts = [""] * self.n_examples
        with scoring(model, self.autocast):
            for batch in self._batches_for(model):
                new = self._greedy(model, batch.inputs)
                for row, tokens in zip(batch.rows.tolist(), new, strict=True):
                    texts[row] = self._cut(self.tokenizer.decode(tokens, skip_special_tokens=True))
        return texts

    def _cut(self, text: str) -> str:
        for s in self.stop:
            if s and s in text:
                text = text[: text.index(s)]
        return text

    def _greedy(self, model: nn.Module, inputs: Inputs) -> list[list[int]]:
        """Greedy continuations (without EOS) of a left-padded batch, reusing the KV cache."""
        accepted = forward_params(model)
        use_cache = "past_key_values" in accepted and "use_cache" in accepted
        ids, mask, positions = inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"]
        new = [[] for _ in range(ids.shape[0])]
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        step_ids, past = ids, None
        for _ in range(self.max_new_tokens):
            kwargs: dict[str, Any] = {"input_ids": step_ids, "attention_mask": mask}
            if "position_ids" in accepted:
                kwargs["position_ids"] = positions if past is None or not use_cache else positions[:, -1:]
            if use_cache:
                kwargs.update(use_cache=True, past_key_values=past)
            if "logits_to_keep" in accepted:
                kwargs["logits_to_keep"] = 1
            out = model(**kwargs)
            token = out.logits[:, -1].argmax(-1)
            if self.eos is not None:
                done |= token == self.eos
            for i in (~done).nonzero().flatten().tolist():
                new[i].append(int(token[i]))
            if bool(done.all()) or self._all_stopped(new):
                break
            past = out.past_key_values if use_cache else None
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
            step_ids = token.unsqueeze(-1) if use_cache else torch.cat([step_ids, token.unsqueeze(-1)], dim=1)
        return new

    def _all_stopped(self, new: list[list[int]]) -> bool:
        if not self.stop:
            return False
        decoded = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return all(any(s and s in text for s in self.stop) for text in decoded)

    def _evaluate(self, model: nn.Module) -> EvalResult:
        generated = self.generations(model)
        hits = [normalize_answer(g) in ok for g, ok in zip(generated, self.answers, strict=True)]
        score = float(np.mean(hits))
        return EvalResult(self.metric, score, {"exact_match": score}, self.n_examples)
