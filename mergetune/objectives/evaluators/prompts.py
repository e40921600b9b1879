"""Contexts of causal-LM tasks: a literal prefix, fixed few-shot examples and, on request, a chat template.

The few-shot examples are drawn ONCE per task from its train split (:func:`draw_shots`, seeded), so
every question, every candidate and the experts' reference see the same ones; the train split never
overlaps the scored split. Layouts (:func:`build_contexts`):

- plain: ``prefix + (q_1 + delimiter + a_1 + fewshot_delimiter) + ... + question``, then the answer
  follows after ``delimiter`` (lm-evaluation-harness's layout, ``prefix`` being its ``description``);
- chat template: ``[system: prefix] + (user: q_k, assistant: a_k)... + user: question`` rendered by
  ``tokenizer.apply_chat_template(..., add_generation_prompt=True)``; the answer follows the
  generation prompt directly (delimiter ``""``, as the harness does under a chat template).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mergetune.errors import TaskError


@dataclass(frozen=True)
class Shot:
    """One solved example shown before a question."""

    question: str
    answer: str


def draw_shots(questions: Sequence[str], answers: Sequence[str], n: int, seed: int, task: str = "task") -> list[Shot]:
    """``n`` distinct examples drawn from the train split with ``random.Random(seed)``, in drawn order."""
    if n == 0:
        return []
    if n > len(questions):
        raise TaskError(
            f"task '{task}': fewshot {n} needs {n} train examples but the train split has {len(questions)} "
            "(lower fewshot, or give a train split: train_size 0 leaves none)"
        )
    rows = random.Random(seed).sample(range(len(questions)), n)
    return [Shot(questions[i], answers[i]) for i in rows]


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def build_contexts(
    questions: Sequence[str],
    tokenizer: Any,
    *,
    prefix: str = "",
    shots: Sequence[Shot] = (),
    delimiter: str = " ",
    fewshot_delimiter: str = "\n\n",
    chat_template: bool = False,
    task: str = "task",
) -> tuple[list[str], str]:
    """(one context per question, the delimiter that goes between a context and its answer); see the module."""
    if not chat_template:
        head = prefix + "".join(s.question + delimiter + s.answer + fewshot_delimiter for s in shots)
        return [head + q for q in questions], delimiter
    if not has_chat_template(tokenizer):
        raise TaskError(
            f"task '{task}': chat_template is true but the tokenizer has no chat template; set chat_template: false"
        )
    turns: list[dict[str, str]] = [{"role": "system", "content": prefix}] if prefix else []
    for s in shots:
        turns += [{"role": "user", "content": s.question}, {"role": "assistant", "content": s.answer}]
    contexts = [
        tokenizer.apply_chat_template(
            [*turns, {"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        for q in questions
    ]
    return contexts, ""
