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

One module per evaluator kind: :mod:`.classification` (classification and AdaMerging's entropy),
:mod:`.multiple_choice`, :mod:`.lm_loss` and :mod:`.exact_match`; :mod:`.base` holds the result,
the ABC and the batching they share, :mod:`.causal` the causal-LM helpers. This package re-exports
what other modules import.
"""

from mergetune.objectives.evaluators.base import (
    DEFAULT_MAX_TOKENS,
    TEXT_INPUTS,
    Batch,
    BatchCache,
    EvalResult,
    Evaluator,
    length_batches,
    length_order,
    pad,
    pad_id,
)
from mergetune.objectives.evaluators.causal import adds_bos
from mergetune.objectives.evaluators.classification import (
    ClassificationEvaluator,
    EntropyEvaluator,
    LogitsFn,
    classification_metrics,
    pooled_head_logits,
    sequence_logits,
)
from mergetune.objectives.evaluators.exact_match import ExactMatchEvaluator, normalize_answer
from mergetune.objectives.evaluators.lm_loss import LMLossEvaluator
from mergetune.objectives.evaluators.multiple_choice import MultipleChoiceEvaluator

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "TEXT_INPUTS",
    "Batch",
    "BatchCache",
    "ClassificationEvaluator",
    "EntropyEvaluator",
    "EvalResult",
    "Evaluator",
    "ExactMatchEvaluator",
    "LMLossEvaluator",
    "LogitsFn",
    "MultipleChoiceEvaluator",
    "adds_bos",
    "classification_metrics",
    "length_batches",
    "length_order",
    "normalize_answer",
    "pad",
    "pad_id",
    "pooled_head_logits",
    "sequence_logits",
]
