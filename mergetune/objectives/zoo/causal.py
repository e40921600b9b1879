"""Fine-tuning one causal-LM expert from the base and measuring it with the project's evaluators.

A causal-LM expert is trained the way it is then scored:

- an ``lm`` task: next-token loss on the training texts (each truncated to the task's
  ``max_length`` tokens, tokenised as :class:`~mergetune.objectives.evaluators.LMLossEvaluator`
  does), padding excluded;
- a ``multiple_choice`` task: the question followed by the right answer (joined by the evaluator's
  delimiter, a space), with the loss on the answer's tokens only: the log-likelihood the
  multiple-choice evaluator compares between options. The answer's tokens are split from the
  question's as the evaluator (and lm-evaluation-harness) does: the whole text is tokenised and the
  answer is what follows the question's own tokens.

Partial fine-tuning (``frozen_layers``: the embeddings, tied to the output layer, and the lowest
blocks stay at the base's) keeps a CPU build within minutes. Scores: the expert and the base model
itself on the validation split, the expert on the test split.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mergetune.objectives.evaluators.causal import adds_bos, encode_text
from mergetune.objectives.models import load_task_model
from mergetune.objectives.suite import build_evaluator
from mergetune.objectives.tasks import SplitData, TaskConfig, TaskData, load_task
from mergetune.objectives.zoo.results import ExpertResult
from mergetune.objectives.zoo.specs import TrainSettings, ZooError
from mergetune.objectives.zoo.training import encode, freeze, measured_result, optimise, task_seed

IGNORED = -100  # label of a position that carries no loss (transformers' convention)
ANSWER_DELIMITER = " "  # between question and answer: the multiple-choice evaluator's default


def train_causal_expert(
    settings: TrainSettings,
    task: TaskConfig,
    base_dir: Path,
    out_dir: Path,
    *,
    threads: int = 1,
    on_step: Callable[[int], None] | None = None,
) -> ExpertResult:
    """Fine-tune one causal LM from ``base_dir`` on ``task``, save it to ``out_dir`` and measure it."""
    # transformers: imported only when a model is built or trained (importing it takes seconds)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    data = load_task(task)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    examples = training_examples(data, tokenizer)
    seed = task_seed(settings.seed, task.name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        freeze(model, settings)
        t0 = time.perf_counter()
        steps = fine_tune_causal(model, examples, _pad_id(tokenizer), settings, seed, on_step)
        train_seconds = time.perf_counter() - t0
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    validation = score(model, data, "validation", tokenizer)
    on_base = score(load_task_model(data, base_dir), data, "validation", tokenizer)
    scores = (validation, on_base, score(model, data, "test", tokenizer))
    return measured_result(data, steps, scores, train_seconds, started, threads, metric=task.metric or "")


Example = tuple[list[int], list[int]]  # (token ids, labels: the id where a position is learnt, else IGNORED)


def training_examples(data: TaskData, tokenizer: Any) -> list[Example]:
    """The train split as token ids and labels: whole texts for ``lm``, answers only for multiple choice."""
    split, max_length = data.train, data.config.max_length
    if data.config.kind == "lm":
        ids = [x for x in encode(tokenizer, split.texts, max_length) if len(x) >= 2]
        return [(x, list(x)) for x in ids]
    if data.config.kind == "multiple_choice":
        return [answer_example(tokenizer, question, answer, max_length) for question, answer in _answers(split)]
    kind = data.config.kind
    raise ZooError(f"task '{data.name}': a causal-LM zoo trains 'lm' and 'multiple_choice' tasks, not '{kind}'")


def _answers(split: SplitData) -> list[tuple[str, str]]:
    """(question, right answer) per example of a multiple-choice split."""
    assert split.choices is not None and split.labels is not None  # a multiple-choice task has both
    return [(q, c[int(y)]) for q, c, y in zip(split.texts, split.choices, split.labels, strict=True)]


def answer_example(tokenizer: Any, question: str, answer: str, max_length: int) -> Example:
    """Ids of ``question + " " + answer`` and labels on the answer's tokens only.

    The answer's tokens are those of the whole text past the question's own tokenisation (the
    multiple-choice evaluator's split); the question loses its oldest tokens when the whole does
    not fit in ``max_length``; a BOS token is prepended when the tokenizer adds one by default.
    """
    context = encode_text(tokenizer, question)
    whole = encode_text(tokenizer, question + ANSWER_DELIMITER + answer)
    target = whole[len(context) :] if whole[: len(context)] == context else encode_text(tokenizer, " " + answer)
    if len(target) >= max_length:
        raise ZooError(f"an answer of {len(target)} tokens does not fit in max_length {max_length}: raise max_length")
    prefix = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
    context = (prefix + context)[-(max_length - len(target)) :]
    return context + target, [IGNORED] * len(context) + target


def fine_tune_causal(
    model: Any,
    examples: Sequence[Example],
    pad_id: int,
    settings: TrainSettings,
    seed: int,
    on_step: Callable[[int], None] | None = None,
) -> int:
    """Fine-tune a causal LM on (ids, labels) examples (see ``optimise``); returns the steps."""
    if not examples:
        raise ZooError("no training example has the 2 tokens a language-modelling loss needs")

    def batch_loss(rows: np.ndarray) -> torch.Tensor:
        return next_token_loss(model, pad_causal([examples[i] for i in rows], pad_id))

    return optimise(model, [len(ids) for ids, _ in examples], settings, seed, batch_loss, on_step)


def pad_causal(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (padding positions carry no loss): the
    arguments of a transformers causal LM's forward with its loss."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORED, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, targets) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.as_tensor(ids)
        labels[row, : len(ids)] = torch.as_tensor(targets)
        mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def next_token_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of the labelled next tokens, with the output layer applied to those positions only.

    Equal to ``model(**batch).loss`` (which shifts the labels the same way), but a multiple-choice
    example learns one or two answer tokens out of twenty: projecting only those hidden states onto
    the vocabulary (49,152 words for SmolLM2) saves most of the output layer's cost. The loss is
    computed in float32 on ``[N, V]`` logits.
    """
    hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
    targets = batch["labels"][:, 1:]
    learnt = targets != IGNORED
    logits = model.get_output_embeddings()(hidden[:, :-1][learnt])
    return torch.nn.functional.cross_entropy(logits.float(), targets[learnt])


def _pad_id(tokenizer: Any) -> int:
    """The tokenizer's padding id, else its end-of-text id (padded positions are masked either way)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ZooError(f"the tokenizer of {tokenizer.name_or_path} has neither a padding nor an end-of-text token")
    return int(pad)


def score(model: Any, data: TaskData, split: str, tokenizer: Any) -> float:
    """The task's primary score of a causal LM on one split, from the project's evaluator."""
    return build_evaluator(data, data.split(split), tokenizer).evaluate(model).score  # type: ignore[arg-type]
