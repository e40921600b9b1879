"""What an expert's folder tells about the task it scores: its head's label order and its training data.

Tasks are loaded before any model (the validation examples are tokenised once), so the expert's
facts are read from its files here and handed to :func:`~mergetune.objectives.tasks.load_task` as
:class:`~mergetune.objectives.tasks.ExpertHints`; ``tasks`` itself reads no model files.

- ``head_labels``: the ``id2label`` of the expert's ``config.json`` (a local folder, or a hub id already
  in the local Hugging Face cache), unless it holds only transformers' generic ``LABEL_i`` names.
- ``training``: the training rows of a zoo expert (its ``zoo_expert.json`` records the task it was
  trained on), so that a task scoring it on other splits of the same corpus cannot test on them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mergetune.errors import TaskError
from mergetune.objectives.models import label_names_of
from mergetune.objectives.splits import example_key
from mergetune.objectives.tasks import ExpertHints, TaskConfig, TaskData, load_task
from mergetune.objectives.zoo.cache import EXPERT_RECORD


def load_for_expert(task: TaskConfig, model: str | None) -> TaskData:
    """Load ``task`` with the hints of the expert that scores it (``model``; None: a task without an expert)."""
    return load_task(task, expert=None if model is None else expert_hints(model, task))


def expert_hints(model: str, task: TaskConfig | None = None) -> ExpertHints:
    """The hints for scoring ``task`` with the expert at ``model`` (a folder or a hub id)."""
    config_file = _config_file(model)
    head = None
    if config_file is not None:
        head = label_names_of(_read_json(config_file).get("id2label"))
    training = _zoo_training(Path(model), task)
    return ExpertHints(head_labels=head, head_source=str(config_file) if head else "", training=training)


def _config_file(model: str) -> Path | None:
    """The expert's config.json: in its folder, or in the local hub cache (never downloaded here)."""
    folder = Path(model).expanduser()
    if folder.is_dir():
        path = folder / "config.json"
        return path if path.is_file() else None
    if folder.is_absolute() or model.startswith((".", "~")):
        return None  # a local folder that does not exist (yet): nothing to read
    # huggingface_hub: imported only for a hub id (a cache lookup, no network)
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(model, "config.json")
    except ValueError:  # not a valid hub id (HFValidationError is a ValueError)
        return None
    return Path(cached) if isinstance(cached, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise TaskError(f"cannot read the expert's config {path}: {exc}") from exc
    return data if isinstance(data, dict) else {}


def _zoo_training(folder: Path, task: TaskConfig | None) -> tuple[tuple[str, frozenset[str]], ...]:
    """(description, example keys) of a zoo expert's training rows; () for other experts.

    When the task is the very task the expert was trained on, its splits are made exactly as the
    zoo's were (same source, sizes and seed), disjoint by construction: nothing to compare.
    """
    record = folder / EXPERT_RECORD
    if not record.is_file():
        return ()
    trained_on = TaskConfig.parse(_read_json(record).get("task"), source=str(record))
    if task is not None and trained_on.model_dump() == task.model_dump():
        return ()
    train = load_task(trained_on).train
    pairs = train.text_pairs or [None] * len(train)
    keys = frozenset(example_key(t, p) for t, p in zip(train.texts, pairs, strict=True))
    return ((f"the training rows of zoo expert {folder.name} (task '{trained_on.name}')", keys),)
