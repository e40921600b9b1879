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
other metrics it computed on the way. A :class:`SlicedEvaluator` (every kind but lm-eval, without a
custom scorer) also gives each example's value behind the score and can score its examples slice
by slice (multi-fidelity search: see ``ValidationSuite.score_stage``). Results do not depend on the
batch size or on the order of the examples (up to float rounding: padding changes the summation order of a few kernels).

For the fewest threads' contention, a worker should call ``torch.set_num_threads(1)`` once (see
``docs/offline-data.md``); evaluators do not change process-wide settings.

One module per evaluator kind: :mod:`.classification` (classification and AdaMerging's entropy),
:mod:`.multiple_choice`, :mod:`.lm_loss` and :mod:`.exact_match`; :mod:`.base` holds the result,
the ABC, the batching and the custom-scorer contract they share, :mod:`.causal` the causal-LM
helpers, :mod:`.prompts` the few-shot and chat-template contexts. :mod:`.kinds` is the one table of
task kinds (metrics, batch size, model class, option group) every other module reads. This package
re-exports what other modules import.
"""

from mergetune.objectives.evaluators.base import (
    CUSTOM_METRIC,
    DEFAULT_MAX_TOKENS,
    TEXT_INPUTS,
    Batch,
    BatchCache,
    EvalResult,
    Evaluator,
    Outputs,
    Parts,
    Scorer,
    SlicedEvaluator,
    SliceState,
    custom_score,
    length_batches,
    length_order,
    load_scorer,
    pad,
    pad_id,
    sliced_batches,
)
from mergetune.objectives.evaluators.causal import adds_bos, encode_pair
from mergetune.objectives.evaluators.classification import (
    ClassificationEvaluator,
    EntropyEvaluator,
    LogitsFn,
    classification_metrics,
    pooled_head_logits,
    sequence_logits,
)
from mergetune.objectives.evaluators.exact_match import ExactMatchEvaluator, extract_answer, normalize_answer
from mergetune.objectives.evaluators.kinds import (
    KINDS,
    ExactMatchOptions,
    KindSpec,
    LMOptions,
    MultipleChoiceOptions,
    kind_spec,
)
from mergetune.objectives.evaluators.lm_loss import LMLossEvaluator
from mergetune.objectives.evaluators.multiple_choice import MultipleChoiceEvaluator
from mergetune.objectives.evaluators.prompts import Shot, build_contexts, draw_shots

__all__ = [
    "CUSTOM_METRIC",
    "DEFAULT_MAX_TOKENS",
    "KINDS",
    "TEXT_INPUTS",
    "Batch",
    "BatchCache",
    "ClassificationEvaluator",
    "EntropyEvaluator",
    "EvalResult",
    "Evaluator",
    "ExactMatchEvaluator",
    "ExactMatchOptions",
    "KindSpec",
    "LMLossEvaluator",
    "LMOptions",
    "LogitsFn",
    "MultipleChoiceEvaluator",
    "MultipleChoiceOptions",
    "Outputs",
    "Parts",
    "Scorer",
    "Shot",
    "SliceState",
    "SlicedEvaluator",
    "adds_bos",
    "build_contexts",
    "classification_metrics",
    "custom_score",
    "draw_shots",
    "encode_pair",
    "extract_answer",
    "kind_spec",
    "length_batches",
    "length_order",
    "load_scorer",
    "normalize_answer",
    "pad",
    "pad_id",
    "pooled_head_logits",
    "sequence_logits",
    "sliced_batches",
]
