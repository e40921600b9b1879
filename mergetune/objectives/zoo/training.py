"""Fine-tuning one expert from the base and measuring it with the project's evaluators.

Training is AdamW with linear warm-up and decay over length-bucketed, dynamically padded batches.
Accuracies come from :func:`mergetune.objectives.suite.build_evaluator` and task models from
:func:`mergetune.objectives.models.load_task_model`, so they are the numbers a search compares
merged models against.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mergetune.objectives.models import load_task_model
from mergetune.objectives.splits import stable_hash
from mergetune.objectives.suite import build_evaluator
from mergetune.objectives.tasks import SplitData, TaskConfig, TaskData, load_task
from mergetune.objectives.zoo.results import ExpertResult
from mergetune.objectives.zoo.specs import TrainSettings, ZooError


def train_expert(
    settings: TrainSettings,
    task: TaskConfig,
    base_dir: Path,
    out_dir: Path,
    *,
    threads: int = 1,
    on_step: Callable[[int], None] | None = None,
) -> ExpertResult:
    """Fine-tune one classifier from ``base_dir`` on ``task``, save it to ``out_dir`` and measure it.

    ``on_step(total_steps)`` is called after every optimiser step (for a progress bar).
    """
    # transformers: imported only when a model is built or trained (importing it takes seconds)
    from transformers import AutoTokenizer

    started = time.perf_counter()
    data = load_task(task)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    seed = task_seed(settings.seed, task.name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _new_classifier(base_dir, data)
        freeze(model, settings)
        t0 = time.perf_counter()
        steps = fine_tune(model, tokenizer, data.train, task.max_length, settings, seed, on_step)
        train_seconds = time.perf_counter() - t0
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    scores = _evaluate(model, data, tokenizer, out_dir, base_dir)
    return measured_result(data, steps, scores, train_seconds, started, threads)


def measured_result(
    data: TaskData,
    steps: int,
    scores: tuple[float, float, float],
    train_seconds: float,
    started: float,
    threads: int,
    metric: str = "accuracy",
) -> ExpertResult:
    """An expert's record: split sizes, steps, its (validation, base on validation, test) scores and timings."""
    validation, on_base, test = scores
    return ExpertResult(
        task=data.name,
        labels=data.label_names,
        train_size=len(data.train),
        validation_size=len(data.validation),
        test_size=len(data.test),
        steps=steps,
        validation_accuracy=validation,
        base_head_validation_accuracy=on_base,
        test_accuracy=test,
        train_seconds=round(train_seconds, 2),
        build_seconds=round(time.perf_counter() - started, 2),
        threads=threads,
        metric=metric,
    )


def task_seed(seed: int, task: str) -> int:
    """A per-task seed that does not depend on the other tasks of the zoo (adding one changes no other)."""
    return int(stable_hash(f"{seed}:{task}")[:8], 16)


def _new_classifier(base_dir: Path, data: TaskData) -> Any:
    """``AutoModelForSequenceClassification`` from the base, its head sized and named by the task's labels."""
    # transformers: imported only when a model is built or trained (importing it takes seconds)
    from transformers import AutoModelForSequenceClassification

    names = list(data.label_names)
    return AutoModelForSequenceClassification.from_pretrained(
        base_dir,
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)},
    )


def freeze(model: Any, settings: TrainSettings) -> None:
    """Freeze the word embeddings and/or the embeddings and lowest blocks, as the settings say.

    Works on a BERT encoder (``encoder.layer``, ``embeddings``) and on a decoder such as Llama
    (``layers``, ``embed_tokens``). A causal LM whose output layer is tied to the word embeddings
    keeps it frozen with them.
    """
    if settings.freeze_word_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    if settings.frozen_layers:
        embeddings, layers = _embeddings_and_blocks(model.base_model)
        if settings.frozen_layers > len(layers):
            raise ZooError(f"frozen_layers {settings.frozen_layers} exceeds the base's {len(layers)} layers")
        for module in (embeddings, *layers[: settings.frozen_layers]):
            module.requires_grad_(False)


def _embeddings_and_blocks(backbone: Any) -> tuple[Any, Any]:
    """(embedding module, list of blocks) of a BERT-like encoder or a Llama-like decoder."""
    if hasattr(backbone, "layers") and hasattr(backbone, "embed_tokens"):
        return backbone.embed_tokens, backbone.layers
    return backbone.embeddings, backbone.encoder.layer


# ---- training --------------------------------------------------------------------------------


def fine_tune(
    model: Any,
    tokenizer: Any,
    split: SplitData,
    max_length: int,
    settings: TrainSettings,
    seed: int,
    on_step: Callable[[int], None] | None = None,
) -> int:
    """Fine-tune a classifier on a split's labels (see :func:`optimise`); returns the steps."""
    assert split.labels is not None  # classification tasks always have labels
    ids = encode(tokenizer, split.texts, max_length)
    labels = torch.as_tensor(split.labels, dtype=torch.long)

    def batch_loss(rows: np.ndarray) -> torch.Tensor:
        return model(**pad_batch([ids[i] for i in rows], tokenizer.pad_token_id), labels=labels[rows]).loss

    return optimise(model, [len(x) for x in ids], settings, seed, batch_loss, on_step)


def optimise(
    model: Any,
    lengths: Sequence[int],
    settings: TrainSettings,
    seed: int,
    batch_loss: Callable[[np.ndarray], torch.Tensor],
    on_step: Callable[[int], None] | None = None,
) -> int:
    """AdamW with linear warm-up and decay over length-bucketed batches of examples; returns the steps.

    ``batch_loss(rows)`` is the loss of the examples ``rows`` (indices into ``lengths``), dynamically
    padded by the caller; ``on_step(total_steps)`` is called after every optimiser step.
    """
    rng = np.random.default_rng(seed)
    epochs = [
        length_bucketed_batches(np.asarray(lengths), settings.batch_size, settings.bucket_batches, rng)
        for _ in range(settings.epochs)
    ]
    total = sum(len(e) for e in epochs)
    optimizer = torch.optim.AdamW(param_groups(model, settings.weight_decay), lr=settings.learning_rate)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_decay(total, settings.warmup_ratio))
    model.train()
    for batches in epochs:
        for batch in batches:
            batch_loss(batch).backward()
            if settings.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(_trainable(model), settings.max_grad_norm)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            if on_step is not None:
                on_step(total)
    model.eval()
    return total


def _trainable(model: Any) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def param_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    """Decay the weight matrices, not biases or norm parameters (BERT's LayerNorm, Llama's RMSNorm)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if name.endswith("bias") or "norm" in name.lower() else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_decay(total_steps: int, warmup_ratio: float) -> Callable[[int], float]:
    """Learning-rate factor: linear from 0 to 1 over the warm-up, then linear down to 0 at the last step."""
    warmup = round(total_steps * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return factor


def length_bucketed_batches(
    lengths: np.ndarray, batch_size: int, window_batches: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Shuffled batches of similar lengths: shuffle, sort by length inside windows, cut, shuffle the batches.

    Sorting only inside windows of ``window_batches`` batches keeps batches random enough for SGD
    while cutting most of the padding (a batch is padded to its longest example).
    """
    order = rng.permutation(len(lengths))
    window = batch_size * window_batches
    batches = []
    for start in range(0, len(order), window):
        chunk = order[start : start + window]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def encode(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids of each text, truncated to ``max_length`` and not padded (batches are padded later)."""
    return tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]


def pad_batch(ids: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` padded to the batch's longest sequence."""
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, seq in enumerate(ids):
        input_ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


# ---- evaluation ------------------------------------------------------------------------------


def _evaluate(
    model: Any, data: TaskData, tokenizer: Any, expert_dir: Path, base_dir: Path
) -> tuple[float, float, float]:
    """Accuracy of the expert on validation, of the base wearing its head on validation, of the expert on test."""
    validation = accuracy(model, data, "validation", tokenizer)
    on_base = accuracy(head_on_base(expert_dir, base_dir, data), data, "validation", tokenizer)
    return validation, on_base, accuracy(model, data, "test", tokenizer)


def accuracy(model: Any, data: TaskData, split: str, tokenizer: Any) -> float:
    """The task metric (accuracy for the zoo's tasks) of a classifier on one split of its task.

    Uses the project's evaluator (:func:`mergetune.objectives.suite.build_evaluator`): length-sorted,
    dynamically padded batches under inference mode, the model's train/eval flags restored.
    """
    return build_evaluator(data, data.split(split), tokenizer).evaluate(model).score  # type: ignore[arg-type]


def head_on_base(expert_dir: Path, base_dir: Path, task: TaskData | TaskConfig) -> Any:
    """The expert's model with its encoder weights replaced by the base's: the base wearing the expert's head.

    Base tensors are matched to the expert's modulo the ``bert.`` (base model) prefix by
    :func:`mergetune.objectives.models.load_task_model`; the classifier keeps the expert's values.
    """
    return load_task_model(task, expert_dir, shared_from=base_dir)
