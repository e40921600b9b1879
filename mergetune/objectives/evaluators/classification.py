"""Sequence classifiers: accuracy / macro-F1 / MCC of the argmax, and AdaMerging's entropy (needs no labels).

Both score a sequence classifier's logits over one task's labels, one row per example, through
the same tokenised batches (:class:`_SequenceEvaluator`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from mergetune.errors import TaskError
from mergetune.forward import Inputs, forward_params, scoring
from mergetune.objectives.evaluators.base import (
    DEFAULT_MAX_TOKENS,
    TEXT_INPUTS,
    Batch,
    BatchCache,
    EvalResult,
    Outputs,
    Parts,
    SlicedEvaluator,
    pad,
    pad_id,
    sliced_batches,
)

#: How a batch becomes logits over the labels (default: :func:`sequence_logits`; see :func:`pooled_head_logits`).
LogitsFn = Callable[[nn.Module, Inputs], torch.Tensor]


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


class _SequenceEvaluator(SlicedEvaluator):
    """Texts (and optional pairs) scored through a sequence classifier's logits, one row per example.

    ``parts``: the rows of each slice of the examples (see :class:`~.base.SlicedEvaluator`).
    """

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
        parts: Parts = None,
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
        self._set_parts(parts)
        self.batches = self._tokenise(texts, text_pairs, tokenizer, max_length, (batch_size, max_tokens, parts))

    @property
    def n_examples(self) -> int:
        return self._n

    @staticmethod
    def _tokenise(
        texts: Sequence[str],
        pairs: Sequence[str] | None,
        tokenizer: Any,
        max_length: int,
        sizes: tuple[int, int | None, Parts],
    ) -> BatchCache:
        encoded = tokenizer(
            list(texts), list(pairs) if pairs is not None else None, truncation=True, max_length=max_length
        )
        keys = [k for k in TEXT_INPUTS if k in encoded]
        ids = encoded["input_ids"]
        padding = {"input_ids": pad_id(tokenizer)}
        batches = []
        for part, rows in sliced_batches([len(x) for x in ids], *sizes):
            inputs = {k: pad([encoded[k][i] for i in rows], padding.get(k, 0)) for k in keys}
            if "attention_mask" not in inputs:
                inputs["attention_mask"] = pad([[1] * len(ids[i]) for i in rows], 0)
            batches.append(Batch(torch.as_tensor(rows), inputs, part=part))
        return BatchCache(batches)

    def logits(
        self, model: nn.Module, batches: Sequence[Batch] | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(rows, float32 logits over this task's labels) per batch (of ``batches``, default all)."""
        for batch in self._batches_for(model) if batches is None else batches:
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

    def _new_outputs(self) -> Outputs:
        return {"predictions": np.full(self.n_examples, -1, dtype=np.int64)}

    def _forward(self, model: nn.Module, batches: Sequence[Batch], outputs: Outputs) -> None:
        for rows, logits in self.logits(model, batches):
            outputs["predictions"][rows.numpy()] = logits.argmax(-1).cpu().numpy()

    def _summarise(self, outputs: Outputs, rows: np.ndarray) -> EvalResult:
        """Metrics over ``rows``; each example's value is whether its prediction is right (1) or not (0)."""
        predictions, labels = outputs["predictions"][rows], self.labels[rows]
        classes = max(self.num_labels or 0, int(self.labels.max()) + 1, int(predictions.max()) + 1)
        metrics = classification_metrics(labels, predictions, classes)
        correct = (predictions == labels).astype(np.float64)
        return EvalResult(self.metric, metrics[self.metric], metrics, len(rows), per_example=correct)


class EntropyEvaluator(_SequenceEvaluator):
    """The unsupervised objective of AdaMerging: minus the mean entropy of the predicted class distribution.

    Needs no labels: a merge whose classifier is confident on the task's inputs scores higher.
    Entropy is in nats, ``-sum p log p`` of ``softmax(logits)`` per example, averaged over the
    examples; ``score = -entropy``. Also reported: the entropy divided by ``log(num classes)``.
    """

    metric = "neg_entropy"

    def _new_outputs(self) -> Outputs:
        return {"entropy": np.full(self.n_examples, np.nan), "width": 0}

    def _forward(self, model: nn.Module, batches: Sequence[Batch], outputs: Outputs) -> None:
        for rows, logits in self.logits(model, batches):
            logp = torch.log_softmax(logits, dim=-1)
            outputs["entropy"][rows.numpy()] = (-(logp.exp() * logp).sum(-1)).double().cpu().numpy()
            outputs["width"] = logits.shape[-1]

    def _summarise(self, outputs: Outputs, rows: np.ndarray) -> EvalResult:
        """Mean entropy over ``rows``; each example's value is minus its own entropy."""
        per_example = -outputs["entropy"][rows]
        entropy = float(-per_example.sum()) / len(rows)
        width = outputs["width"]
        normalized = entropy / math.log(width) if width > 1 else 0.0
        metrics = {"neg_entropy": -entropy, "entropy": entropy, "normalized_entropy": normalized}
        return EvalResult(self.metric, -entropy, metrics, len(rows), per_example=per_example)
