"""Objectives: tasks and their data (this module's data layer), evaluators and validation suites.

Nothing here knows about merging: an objective scores a model on a task's splits.
"""

from mergetune.objectives.corpora import CORPORA, Corpus, available_corpora, get_corpus, load_corpus
from mergetune.objectives.evaluators import (
    ClassificationEvaluator,
    EntropyEvaluator,
    EvalResult,
    Evaluator,
    ExactMatchEvaluator,
    LMLossEvaluator,
    MultipleChoiceEvaluator,
)
from mergetune.objectives.models import load_task_model
from mergetune.objectives.splits import DedupReport, Splits, deduplicate, normalize_text, stratified_split
from mergetune.objectives.suite import SuiteScores, TaskScore, ValidationSuite
from mergetune.objectives.tasks import KIND_METRICS, SplitData, TaskConfig, TaskData, load_task, resolve_source
from mergetune.objectives.zoo import ZOOS, Zoo, ZooError, ZooSpec, available_zoos, build_zoo, get_zoo

__all__ = [
    "CORPORA",
    "KIND_METRICS",
    "ZOOS",
    "ClassificationEvaluator",
    "Corpus",
    "DedupReport",
    "EntropyEvaluator",
    "EvalResult",
    "Evaluator",
    "ExactMatchEvaluator",
    "LMLossEvaluator",
    "MultipleChoiceEvaluator",
    "SplitData",
    "Splits",
    "SuiteScores",
    "TaskConfig",
    "TaskData",
    "TaskScore",
    "ValidationSuite",
    "Zoo",
    "ZooError",
    "ZooSpec",
    "available_corpora",
    "available_zoos",
    "build_zoo",
    "deduplicate",
    "get_corpus",
    "get_zoo",
    "load_corpus",
    "load_task",
    "load_task_model",
    "normalize_text",
    "resolve_source",
    "stratified_split",
]
