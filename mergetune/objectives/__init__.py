"""Objectives: tasks and their data (this module's data layer), evaluators and validation suites.

Nothing here knows about merging: an objective scores a model on a task's splits.
"""

from mergetune.objectives.corpora import CORPORA, Corpus, available_corpora, get_corpus, load_corpus
from mergetune.objectives.splits import DedupReport, Splits, deduplicate, normalize_text, stratified_split
from mergetune.objectives.tasks import KIND_METRICS, SplitData, TaskConfig, TaskData, load_task, resolve_source

__all__ = [
    "CORPORA",
    "KIND_METRICS",
    "Corpus",
    "DedupReport",
    "SplitData",
    "Splits",
    "TaskConfig",
    "TaskData",
    "available_corpora",
    "deduplicate",
    "get_corpus",
    "load_corpus",
    "load_task",
    "normalize_text",
    "resolve_source",
    "stratified_split",
]
