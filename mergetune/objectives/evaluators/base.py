"""What every evaluator shares: its result, the Evaluator ABC, and length-sorted, dynamically padded batches.

Examples are tokenised once, sorted by length and cut into batches padded only to their own
longest example, within an item count and a padded-token budget (:func:`length_batches`);
a :class:`BatchCache` copies them once to the device of the model scored.

A custom scorer (a task's ``scorer: module:function``, :func:`load_scorer`) follows one contract:
``scorer(predictions, references) -> float``, higher is better, where per example ``predictions[i]``
and ``references[i]`` are, by kind:

- ``multiple_choice``: the options' summed log-likelihoods (a list of floats) and the index of the
  right option (int);
- ``exact_match``: the extracted generated answer (str, not normalised) and the acceptable answers
  (a list of str, as given);
- ``lm``: the log-probabilities of the scored tokens (a list of floats) and the scored text (the
  answer with an ``answer_column``, else the whole text).

It is imported only when a task names it (no code is ever taken from data), and its value becomes the
task's primary score under the metric name ``custom``; the kind's own metrics are still reported.
The experts' reference scores cached on disk are keyed by the scorer's name, not by its code: after
editing a scorer, clear the reference cache (or rename the function).
"""

from __future__ import annotations

import importlib
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from mergetune.errors import TaskError
from mergetune.forward import Inputs, model_device, scoring

#: Padded tokens per batch by default (see :func:`length_batches`); ``None`` lifts the budget.
DEFAULT_MAX_TOKENS = 512
#: Tokeniser outputs a sequence model may take, and their padding value (input_ids: the pad token).
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass(frozen=True)
class EvalResult:
    """One evaluator's verdict: the primary score (higher is better) and every metric computed.

    ``per_example`` (when the evaluator has per-example values, see :class:`SlicedEvaluator`) holds, for
    each scored example in row order, the value behind the score, and ``example_scale`` relates them:
    ``score ≈ example_scale * mean(per_example)`` (exact for accuracy, exact-match and LM loss; a proxy
    for macro-F1 and MCC, whose per-example value is the prediction's correctness). Neither is part
    of the cached or serialised result.
    """

    metric: str
    score: float
    metrics: dict[str, float] = field(default_factory=dict)
    n_examples: int = 0
    per_example: np.ndarray | None = field(default=None, compare=False, repr=False)
    example_scale: float = field(default=1.0, compare=False, repr=False)

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
    part: int = 0  # the slice of the examples its rows belong to (see ``sliced_batches``)

    def to(self, device: torch.device) -> Batch:
        def move(d: Inputs) -> Inputs:
            return {k: v.to(device, non_blocking=True) for k, v in d.items()}

        return Batch(self.rows, move(self.inputs), move(self.extra), self.part)


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


#: Rows of each slice of an evaluator's examples, in scoring order (see ``sliced_batches``); None: one slice.
Parts = Sequence[Sequence[int]] | None


def sliced_batches(
    lengths: Sequence[int], batch_size: int, max_tokens: int | None, parts: Parts = None
) -> list[tuple[int, list[int]]]:
    """(slice, rows) per batch: :func:`length_batches` run within each slice, so no batch crosses two.

    Without ``parts`` there is one slice and the batches are exactly ``length_batches``' (an evaluator
    built without slices batches as it always did). With them, a slice is scored by its own batches,
    and scoring every slice scores every example once, on the same batches whatever the stage.
    """
    if parts is None:
        return [(0, rows) for rows in length_batches(lengths, batch_size, max_tokens)]
    covered = sorted(int(i) for part in parts for i in part)
    if covered != list(range(len(lengths))):
        raise ValueError(f"the slices must cover the {len(lengths)} examples once each")
    out = []
    for k, part in enumerate(parts):
        rows = [int(i) for i in part]
        for chunk in length_batches([lengths[i] for i in rows], batch_size, max_tokens):
            out.append((k, [rows[j] for j in chunk]))
    return out


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


# ---- custom scorers --------------------------------------------------------------------------

#: The metric name of a task scored by its own scorer.
CUSTOM_METRIC = "custom"
#: ``scorer(predictions, references) -> float`` (higher is better); see the module docstring for what each kind passes.
Scorer = Callable[[Sequence[Any], Sequence[Any]], float]


def load_scorer(spec: str, task: str = "task") -> Scorer:
    """The callable named ``module:function`` (dotted attribute paths allowed after the colon)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise TaskError(f"task '{task}': scorer '{spec}' must be 'module:function', e.g. 'my_scoring:f1'")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise TaskError(f"task '{task}': scorer '{spec}': cannot import module '{module_name}': {exc}") from exc
    for part in attr.split("."):
        if not hasattr(target, part):
            raise TaskError(f"task '{task}': scorer '{spec}': module '{module_name}' has no '{attr}'")
        target = getattr(target, part)
    if not callable(target):
        raise TaskError(f"task '{task}': scorer '{spec}' is not callable")
    return target


def primary_metric(task: str, metric: str | None, scorer: Scorer | None, own: Sequence[str]) -> str:
    """The evaluator's primary metric: ``metric``, else ``custom`` with a scorer, else the kind's first one.

    ``custom`` needs a scorer and a scorer needs ``custom``: a scorer that is set but not the primary
    score (or the reverse) would be a config whose meaning is unclear.
    """
    chosen = metric or (CUSTOM_METRIC if scorer is not None else own[0])
    if chosen not in own and chosen != CUSTOM_METRIC:
        raise TaskError(f"task '{task}': metric '{chosen}' unknown here; use one of {[*own, CUSTOM_METRIC]}")
    if (chosen == CUSTOM_METRIC) != (scorer is not None):
        raise TaskError(
            f"task '{task}': the metric is '{chosen}' but a scorer is {'set' if scorer else 'not set'}; "
            "metric 'custom' goes with a scorer and only with one"
        )
    return chosen


def custom_score(scorer: Scorer, predictions: Sequence[Any], references: Sequence[Any], task: str) -> float:
    """The scorer's value, checked to be a finite number (a silent NaN would rank candidates at random)."""
    value = scorer(predictions, references)
    try:
        number = float(value)
    except (TypeError, ValueError) as exc:
        raise TaskError(f"task '{task}': the custom scorer returned {value!r}, not a number") from exc
    if not math.isfinite(number):
        raise TaskError(f"task '{task}': the custom scorer returned {number}; it must be a finite number")
    return number


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


#: One model's raw per-example outputs of a :class:`SlicedEvaluator` (arrays indexed by example row).
Outputs = dict[str, Any]


@dataclass
class SliceState:
    """One model's scoring in progress on a sliced evaluator: its outputs and how many slices they cover."""

    outputs: Outputs
    done: int = 0


class SlicedEvaluator(Evaluator):
    """An evaluator whose examples can be scored slice by slice, with a value per example.

    Built with ``parts`` (the rows of each slice), its batches never cross a slice, so scoring the
    slices one after another runs exactly the batches of a full evaluation: the score after the last
    slice is bit for bit the full score. A subclass splits its ``_evaluate`` into ``_new_outputs``
    (empty per-row arrays), ``_forward`` (fill the rows of some batches) and ``_summarise`` (the
    result over some rows, with ``per_example`` values). A custom scorer takes every example at once:
    an evaluator with one has no per-example values and is scored whole (``supports_slices`` False).
    """

    parts: tuple[np.ndarray, ...] = ()
    scorer: Scorer | None = None

    def _set_parts(self, parts: Parts) -> None:
        self.parts = () if parts is None else tuple(np.sort(np.asarray(p, dtype=np.int64)) for p in parts)

    @property
    def supports_slices(self) -> bool:
        return self.scorer is None

    @property
    def slice_count(self) -> int:
        return max(1, len(self.parts))

    def rows_upto(self, upto: int) -> np.ndarray:
        """The rows of the first ``upto`` slices, in row order (every row when unsliced)."""
        if not self.parts or upto >= len(self.parts):
            return np.arange(self.n_examples)
        return np.sort(np.concatenate(self.parts[:upto]))

    def evaluate_slices(
        self, model: nn.Module, upto: int, state: SliceState | None = None
    ) -> tuple[SliceState, EvalResult]:
        """Score the slices not yet in ``state`` up to ``upto`` (1-based count), and the result on all of them."""
        if not self.supports_slices:
            raise TaskError(f"task '{self.name}': a custom scorer takes every example at once; it cannot be sliced")
        state = state or SliceState(self._new_outputs())
        with scoring(model, self.autocast):
            batches = [b for b in self._batches_for(model) if state.done <= b.part < upto]
            self._forward(model, batches, state.outputs)
        state.done = max(state.done, upto)
        return state, self._summarise(state.outputs, self.rows_upto(upto))

    def _evaluate(self, model: nn.Module) -> EvalResult:
        outputs = self._new_outputs()
        self._forward(model, self._batches_for(model), outputs)
        return self._summarise(outputs, np.arange(self.n_examples))

    @abstractmethod
    def _new_outputs(self) -> Outputs: ...

    @abstractmethod
    def _forward(self, model: nn.Module, batches: Sequence[Batch], outputs: Outputs) -> None: ...

    @abstractmethod
    def _summarise(self, outputs: Outputs, rows: np.ndarray) -> EvalResult: ...
