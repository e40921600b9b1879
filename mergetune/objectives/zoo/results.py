"""What a zoo build hands back: each expert's measurements and the built zoo's folders."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergetune.objectives.tasks import TaskConfig
from mergetune.objectives.zoo.specs import ZooSpec


@dataclass(frozen=True)
class ExpertResult:
    """What one expert's build measured (stored in its ``zoo_expert.json``)."""

    task: str
    labels: tuple[str, ...]
    train_size: int
    validation_size: int
    test_size: int
    steps: int
    validation_accuracy: float  # the expert on its own validation split
    base_head_validation_accuracy: float  # the base encoder wearing this expert's head
    test_accuracy: float  # the expert on its own test split (a reference for benchmarks)
    train_seconds: float
    build_seconds: float  # training, saving and the three evaluations
    threads: int

    @property
    def gain(self) -> float:
        """How much fine-tuning the encoder adds over the base encoder with the same head."""
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

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def tasks(self) -> dict[str, TaskConfig]:
        """Task name -> its config (load its data with ``load_task``)."""
        return {t.name: t for t in self.spec.tasks}

    @property
    def cache_hit(self) -> bool:
        """Whether every expert was already built (nothing was trained by this call)."""
        return not self.trained

    def recipe_experts(self) -> list[dict[str, str]]:
        """The experts as a recipe's ``experts`` list."""
        return [{"name": t, "model": str(p)} for t, p in self.experts.items()]
