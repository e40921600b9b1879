r"""The one table of task kinds: what a task config's ``kind`` accepts and what each kind implies.

Everything that depends on a task's kind reads :data:`KINDS`: the config's accepted kinds, metrics
and option group (:mod:`mergetune.objectives.tasks`), the default batch size and the evaluator
(:mod:`mergetune.objectives.suite`), and the transformers class that scores it
(:mod:`mergetune.objectives.models`). A new kind is one :class:`KindSpec` here plus its evaluator.

The kind-specific options live in one group per kind in a task config, named after the kind
(every field is optional; the defaults are shown in the classes below)::

    - name: trec_mc                   # multiple choice: acc or acc_norm of the options' log-likelihoods
      kind: multiple_choice
      source: data/trec_mc.jsonl      # rows {"question": ..., "options": [...], "answer": 2 or its text}
      text_column: question
      choices_column: options
      label_column: answer
      metric: acc_norm
      multiple_choice: {delimiter: " ", fewshot: 3, fewshot_seed: 0, prefix: "Question types.\n\n",
                        chat_template: false, scoring: shared_context, dtype: bfloat16}
    - name: sentiment_em              # exact match by greedy generation
      kind: exact_match
      source: data/sentiment.jsonl    # rows {"prompt": ..., "answer": "positive" or ["positive", "pos"]}
      text_column: prompt
      answer_column: answer
      exact_match: {max_new_tokens: 8, stop: ["\n", "."], first_line: true, answer_regex: null,
                    normalize: [lower, punctuation, articles, whitespace], fewshot: 2, chat_template: true}
    - name: trec_answer_loss          # LM loss on the answer only (drop answer_column: the whole text)
      kind: lm
      source: data/trec_qa.csv
      text_column: prompt
      answer_column: answer
      lm: {delimiter: " "}
      scorer: my_scoring:answer_logprob   # optional: a custom score (see mergetune.objectives.evaluators.base)

Every metric is "higher is better"; a negated loss is named ``neg_...``. ``custom`` is the score of a
task's own ``scorer`` (see :mod:`.base`, :func:`load_scorer`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field, field_validator

from mergetune.errors import TaskError
from mergetune.objectives.evaluators.base import CUSTOM_METRIC
from mergetune.strict import StrictModel

#: Text normalisation steps of exact match, applied in this order (SQuAD's answer normalisation is all of them).
NORMALIZE_STEPS = ("lower", "punctuation", "articles", "whitespace")
_DTYPES = {"float32": None, "bfloat16": torch.bfloat16}


# ---- option groups ---------------------------------------------------------------------------


class CausalOptions(StrictModel):
    """Options every causal-LM kind takes."""

    dtype: Literal["float32", "bfloat16"] | None = Field(
        None,
        description="bfloat16: forwards run under torch.autocast(bfloat16): 2-2.6x faster for SmolLM2 on a CPU "
        "with AMX or AVX512-BF16, but about 5x SLOWER on an AVX2-only CPU (emulated; see benchmarks/eval_speed.py "
        "--section llm); float32: never; unset: the suite's setting. References and candidates are scored alike.",
    )

    @property
    def autocast(self) -> torch.dtype | None:
        """The ``torch.autocast`` dtype this group asks for (None for float32 or unset)."""
        return None if self.dtype is None else _DTYPES[self.dtype]


class PromptOptions(CausalOptions):
    """How a question becomes the model's context: a literal prefix, fixed few-shot examples, a chat template.

    Without a chat template the context is ``prefix + shot_1 + ... + shot_n + question`` where each shot
    is ``question + delimiter + answer + fewshot_delimiter`` (lm-evaluation-harness's layout with
    ``description`` = ``prefix``). With ``chat_template: true`` the tokeniser's chat template renders
    ``prefix`` as the system message, each shot as a user and an assistant turn, the question as the
    last user turn, with the generation prompt; the answer then follows it directly (delimiter ``""``,
    as the harness does).
    """

    prefix: str = Field("", description="Literal text before the few-shot examples and the question.")
    fewshot: int = Field(0, ge=0, description="Examples from the train split shown before each question.")
    fewshot_seed: int = Field(0, ge=0, description="Seed of the draw of the few-shot examples (fixed per task).")
    fewshot_delimiter: str = Field("\n\n", description="Text after each few-shot example.")
    chat_template: bool = Field(False, description="Render with the tokeniser's chat template (it must have one).")


class MultipleChoiceOptions(PromptOptions):
    """Multiple choice: the delimiter between context and option, and how the options are scored."""

    delimiter: str = Field(" ", description="Between the context and each option (lm-eval's target_delimiter).")
    scoring: Literal["shared_context", "per_option"] = Field(
        "shared_context",
        description="shared_context: the question is encoded once and its options scored together in one packed "
        "sequence; per_option: one sequence per option (the lm-eval layout; slower, same results).",
    )


class ExactMatchOptions(PromptOptions):
    """Exact match by greedy generation: decoding limits, answer extraction and normalisation."""

    delimiter: str = Field(" ", description="Between a few-shot question and its answer.")
    max_new_tokens: int = Field(16, ge=1, le=1024)
    stop: list[str] = Field(default_factory=lambda: ["\n"], description="Generation ends at the first of these.")
    first_line: bool = Field(True, description="Keep only the generated text's first non-empty line.")
    answer_regex: str | None = Field(
        None, description="Extract the answer with this regex (its first group if it has one); no match: ''."
    )
    normalize: list[Literal["lower", "punctuation", "articles", "whitespace"]] = Field(
        default_factory=lambda: list(NORMALIZE_STEPS),
        description="Normalisation of answers and references before comparing; [] compares stripped text.",
    )

    @field_validator("answer_regex")
    @classmethod
    def _compiles(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from exc
        return pattern

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, stop: list[str]) -> list[str]:
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        return stop


class LMOptions(CausalOptions):
    """LM loss: with an ``answer_column``, only the answer's tokens count, given the prompt in ``text_column``."""

    delimiter: str = Field(" ", description="Between the prompt and the answer (answer-only loss).")


# ---- the registry ----------------------------------------------------------------------------


@dataclass(frozen=True)
class KindSpec:
    """What a task kind means: its metrics (the first is the default), batch size, model class, options."""

    name: str
    metrics: tuple[str, ...]
    batch_size: int
    model_class: str  # the transformers auto class that scores it
    options: type[StrictModel] | None = None  # the config's option group named after the kind
    label_column: str | None = None  # default label column (None: the kind has no labels by default)
    needs_answers: bool = False  # the answer_column is required (exact match)
    takes_answers: bool = False  # an answer_column is accepted
    custom_scorer: bool = False  # a `scorer: module:function` may replace the primary metric

    @property
    def causal(self) -> bool:
        return self.model_class == "AutoModelForCausalLM"


KINDS: dict[str, KindSpec] = {
    spec.name: spec
    for spec in (
        KindSpec(
            "classification",
            ("accuracy", "macro_f1", "mcc"),
            batch_size=64,
            model_class="AutoModelForSequenceClassification",
            label_column="label",
        ),
        KindSpec(
            "multiple_choice",
            ("accuracy", "acc_norm", CUSTOM_METRIC),
            batch_size=32,
            model_class="AutoModelForCausalLM",
            options=MultipleChoiceOptions,
            label_column="label",
            custom_scorer=True,
        ),
        KindSpec(
            "exact_match",
            ("exact_match", CUSTOM_METRIC),
            batch_size=32,
            model_class="AutoModelForCausalLM",
            options=ExactMatchOptions,
            needs_answers=True,
            takes_answers=True,
            custom_scorer=True,
        ),
        KindSpec(
            "lm",
            ("neg_loss", CUSTOM_METRIC),
            batch_size=16,
            model_class="AutoModelForCausalLM",
            options=LMOptions,
            takes_answers=True,
            custom_scorer=True,
        ),
        # an lm-eval-harness task: data, prompts and metric come from the harness task (evaluators.lm_eval)
        KindSpec("lm_eval", (), batch_size=16, model_class="AutoModelForCausalLM"),
        KindSpec(
            "unsupervised",
            ("neg_entropy",),
            batch_size=64,
            model_class="AutoModelForSequenceClassification",
        ),
    )
}
#: Every metric any kind reports as its primary score.
ALL_METRICS: tuple[str, ...] = tuple(dict.fromkeys(m for spec in KINDS.values() for m in spec.metrics))


def kind_spec(kind: str) -> KindSpec:
    """The registry entry of ``kind``; an unknown kind is an error listing the known ones."""
    if kind not in KINDS:
        raise TaskError(f"unknown task kind '{kind}'; use one of {', '.join(KINDS)}")
    return KINDS[kind]
