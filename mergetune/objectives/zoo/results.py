"""What a zoo build hands back: each expert's measurements and the built zoo's folders."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergetune.objectives.tasks import TaskConfig
from mergetune.objectives.zoo.specs import ZooSpec


@dataclass(frozen=True)
class ExpertResult:
    """What one expert's build measured (stored in its ``zoo_expert.json``).

    The three scores are the task's primary ``metric``: accuracy for a classification zoo (the field
    names come from those zoos), ``neg_loss`` (minus the loss per token) for a causal-LM zoo's ``lm``
    tasks, accuracy for its multiple-choice tasks. For a causal LM the "base" score is the base model
    itself (it needs no head).
    """

    task: str
    labels: tuple[str, ...]
    train_size: int
    validation_size: int
    test_size: int
    steps: int
    validation_accuracy: float  # the expert on its own validation split (its task's metric)
    base_head_validation_accuracy: float  # the base encoder wearing this expert's head; a base causal LM as is
    test_accuracy: float  # the expert on its own test split (a reference for benchmarks)
    train_seconds: float
    build_seconds: float  # training, saving and the three evaluations
    threads: int
    metric: str = "accuracy"  # what the three scores measure (records written before it existed: accuracy)

    @property
    def gain(self) -> float:
        """How much fine-tuning adds over the base (with the same head), in the task's metric."""
        return self.validation_accuracy - self.base_head_validation_accuracy

    def to_json(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data["labels"] = list(self.labels)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ExpertResult:
        return cls(**{**data, "labels": tuple(data["labels"])})


@dataclass(frozen=True)
class Zoo:
    """A built zoo: the base folder, one expert folder per task, the task configs and the measurements."""

    spec: ZooSpec
    folder: Path
    base: Path
    experts: dict[str, Path]  # task name -> expert folder (BertForSequenceClassification + tokenizer)
    results: dict[str, ExpertResult]
    trained: tuple[str, ...]  # tasks fine-tuned by this call; empty when everything came from the cache
    seconds: float  # wall time of this call
    manifest: Path = field(default=Path())
    task_configs: dict[str, TaskConfig] | None = None  # as read by a search (views resolved); None: the spec's

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def tasks(self) -> dict[str, TaskConfig]:
        """Task name -> its config (load its data with ``load_task``); a view's source is its file in the zoo."""
        if self.task_configs is not None:
            return dict(self.task_configs)
        return {t.name: t for t in self.spec.tasks}

    @property
    def cache_hit(self) -> bool:
        """Whether every expert was already built (nothing was trained by this call)."""
        return not self.trained

    def recipe_experts(self) -> list[dict[str, str]]:
        """The experts as a recipe's ``experts`` list."""
        return [{"name": t, "model": str(p)} for t, p in self.experts.items()]
