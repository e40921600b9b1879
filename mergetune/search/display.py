"""How a search is shown: numbers in tables and reports (result files, ``mergetune status``), its first
lines and its plain progress lines (one per finished candidate when the output is not a terminal)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from mergetune.objectives.tasks import TaskConfig, planned_split_origin
from mergetune.search.records import TrialRecord


def fmt(value: Any) -> str:
    """Numbers to 4 decimals, None/non-finite to '–', mappings to 'k: v' lists."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float | np.floating):
        return f"{value:.4f}" if math.isfinite(value) else "–"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}: {fmt(v)}" for k, v in value.items())
    return str(value)


def split_lines(tasks: list[dict[str, Any]]) -> list[str]:
    """One line per task saying whether its splits are given or made by mergetune (the search's first lines)."""
    lines = []
    for data in tasks:
        task = TaskConfig.model_validate(data)
        lines.append(f"task '{task.name}': {task.origin}; splits {planned_split_origin(task)}")
    return lines


def candidate_line(record: TrialRecord, done: int, total: int | None, best_mean: float | None) -> str:
    """A plain progress line for one finished candidate (no terminal: a log file, a pipe, nohup)."""
    of = f"/{total}" if total is not None else ""
    if record.ok:
        mean = sum(record.normalized.values()) / len(record.normalized) if record.normalized else None
        outcome = f"{record.method} mean {fmt(mean)}"
    elif record.pruned:  # multi-fidelity: its partial scores are not a result
        outcome = f"{record.method} stopped early ({record.examples_scored} examples)"
    else:
        outcome = "failed"
    return f"candidate {done}{of}: #{record.number} {outcome}; best mean {fmt(best_mean)}"
