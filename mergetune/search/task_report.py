"""``mergetune tasks CONFIG``: what each task of a search config (or a tasks file) will be scored on.

For every task: its source and kind, the split sizes and where the splits came from (given, or made
by mergetune), the label map and where its order came from (declared, the expert's ``id2label``, the
built-in corpus, sorted), the overlap check of validation/test against the training sources known,
and two examples per split. Tasks are loaded exactly as the search loads them (with their expert's
hints), so what this prints is what the search scores. An error in one task is reported and the
others are still shown.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergetune.errors import MergetuneError, read_config_file
from mergetune.objectives.experts import load_for_expert
from mergetune.objectives.tasks import SplitData, TaskConfig, TaskData
from mergetune.objectives.zoo import get_zoo, is_built
from mergetune.search.config import SearchConfig

EXAMPLES_PER_SPLIT = 2
_SHOWN_CHARS = 90


@dataclass(frozen=True)
class TaskReport:
    """One task's description, or the error that stopped it from loading."""

    config: TaskConfig
    expert: str | None
    data: TaskData | None = None
    error: str | None = None

    def lines(self) -> list[str]:
        c = self.config
        head = f"task '{c.name}': {c.kind}, metric {c.metric}, source {c.origin}"
        lines = [head, f"  expert: {_expert_line(self.expert)}"]
        if self.data is None:
            return [*lines, f"  ERROR: {self.error}"]
        d = self.data
        sizes = f"train {len(d.train)}, validation {len(d.validation)}, test {len(d.test)}"
        lines += [f"  splits: {sizes}; {d.split_origin}", f"  de-duplication: {d.dedup.summary()}"]
        if d.label_names:
            mapping = ", ".join(f"{i}: {n}" for i, n in enumerate(d.label_names))
            lines.append(f"  labels: {mapping} (order: {d.label_origin})")
        lines += _overlap_lines(d)
        for split in ("train", "validation", "test"):
            lines += [f"  {split} example: {x}" for x in _examples(d, d.split(split))]
        return lines


def _expert_line(expert: str | None) -> str:
    if expert is None:
        return "none"
    if Path(expert).is_absolute() and not Path(expert).is_dir():
        return f"{expert} (not found: its label order and training data are not checked)"
    return expert


def _overlap_lines(data: TaskData) -> list[str]:
    if not data.overlap_checked:
        return ["  overlap: no training source known to compare validation/test with"]
    if not data.overlaps:
        return [f"  overlap: none (validation/test compared with {'; '.join(data.overlap_checked)})"]
    return [f"  overlap ALLOWED (allow_overlap: true): {o.describe()}" for o in data.overlaps]


def _examples(task: TaskData, split: SplitData) -> list[str]:
    shown = []
    for i in range(min(EXAMPLES_PER_SPLIT, len(split))):
        text = _short(split.texts[i])
        if split.text_pairs is not None:
            text += f" || {_short(split.text_pairs[i])}"
        if split.choices is not None and split.labels is not None:
            text += f" -> choice {int(split.labels[i])} of {list(split.choices[i])}"
        elif split.labels is not None and task.label_names:
            text += f" -> {task.label_names[int(split.labels[i])]}"
        if split.answers is not None:
            text += f" -> answer {' | '.join(repr(a) for a in split.answers[i])}"
        shown.append(text)
    return shown


def _short(text: str) -> str:
    flat = " ".join(text.split())
    return repr(flat if len(flat) <= _SHOWN_CHARS else flat[: _SHOWN_CHARS - 3] + "...")


def task_reports(path: Path) -> list[TaskReport]:
    """A report per task of a search config or of a tasks file (a list, or a mapping with 'tasks')."""
    tasks, experts = _tasks_and_experts(path)
    reports = []
    for task in tasks:
        expert = experts.get(task.expert or task.name)
        try:
            reports.append(TaskReport(task, expert, data=load_for_expert(task, expert)))
        except MergetuneError as exc:
            reports.append(TaskReport(task, expert, error=str(exc)))
    return reports


def _tasks_and_experts(path: Path) -> tuple[list[TaskConfig], dict[str, str]]:
    data = read_config_file(path, "tasks file")
    if isinstance(data, dict) and "models" in data:
        return _from_search_config(SearchConfig.load(path))
    items: Any = data.get("tasks") if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise MergetuneError(f"{path}: expected a search config, a list of tasks, or a mapping with a 'tasks' list")
    return [TaskConfig.parse(item, source=str(path)).with_paths_from(path.parent) for item in items], {}


def _from_search_config(config: SearchConfig) -> tuple[list[TaskConfig], dict[str, str]]:
    """The config's tasks and experts; a zoo's tasks (views read in the zoo) and the config's, with the zoo's
    experts where already built (nothing is trained)."""
    if config.models.zoo is None:
        assert config.tasks is not None
        return list(config.tasks), {e.name: e.model for e in config.models.experts}
    spec = get_zoo(config.models.zoo)
    folder = spec.folder()
    built = {t.name: str((folder / t.name).resolve()) for t in spec.tasks if is_built(folder / t.name)}
    return [*spec.resolved_tasks(folder), *(config.tasks or [])], built


def render(reports: list[TaskReport]) -> str:
    """The reports as plain text, one block per task."""
    return "\n\n".join("\n".join(r.lines()) for r in reports) + "\n"
