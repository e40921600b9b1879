"""What ``mergetune status`` shows of a search, running or finished: read from its storage, never written.

Counts of trials by state (trials a killed driver interrupted apart from evaluated failures; pruned:
stopped early by multi-fidelity racing, or over the budget), the examples scored against full
evaluation (multi-fidelity), each
task's normalisation (what its normalised score means), the best feasible mean, the optimised
front (normalised scores per task), recent errors and the budget used (evaluated candidates
only). A journal line being written by the running search is skipped until complete.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import optuna
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from mergetune.errors import MergetuneError
from mergetune.search.display import fmt
from mergetune.search.normalizations import NORMALIZATION
from mergetune.search.pareto import front_by_values, mean_of, task_names
from mergetune.search.records import BUDGET, OPTIMIZER, TrialRecord, objective_names, read_records
from mergetune.search.results import examples_summary, generalization_line, read_summary
from mergetune.search.storage import JOURNAL_NAME, load_study, open_storage

RECENT_ERRORS = 5


class SearchStorageError(MergetuneError):
    """A search storage is missing, empty, unreadable, or does not hold the named search."""


def status_report(storage_url: str, study_name: str | None, top: int) -> RenderableType:
    """What ``mergetune status`` prints: counts by state, best feasible mean, front, recent errors, budget.

    Reads the storage without writing to it, so it works while the search runs (a journal line
    being written is skipped until complete). ``storage_url`` is a journal file, a search's output
    folder (its ``search.journal``), or a database URL. Missing, empty or unreadable storages and
    unknown search names raise ``SearchStorageError``.
    """
    study = _open_study(storage_url, study_name)
    names = objective_names(study)
    maximize = [d == optuna.study.StudyDirection.MAXIMIZE for d in study.directions]
    records = read_records(study)
    counts = Counter(t.state.name.lower() for t in study.get_trials(deepcopy=False))
    front = front_by_values(records, names, maximize)
    parts: list[RenderableType] = [_status_header(study, names, maximize, counts, records)]
    parts.append(_front_table(front, names, top))
    errors = [r for r in records if r.error][-RECENT_ERRORS:]
    if errors:
        parts.append(_errors_table(errors))
    gap = _finished_generalization(storage_url)
    if gap is not None:
        parts.append(Text(gap))
    return Group(*parts)


def _finished_generalization(storage_url: str) -> str | None:
    """The generalisation line of a finished search whose output folder (``summary.json``) is the storage's."""
    path = Path(storage_url)
    folder = path if path.is_dir() else path.parent
    summary = read_summary(folder / "summary.json") if "://" not in str(storage_url) else None
    return None if summary is None else generalization_line(summary)


def _open_study(storage_url: str, study_name: str | None) -> Any:
    """Load a study, refusing to create a storage that is not there."""
    url = str(storage_url)
    if "://" not in url or url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///")).expanduser()
        if path.is_dir():
            path = path / JOURNAL_NAME
            url = str(path)
        if not path.is_file():
            raise SearchStorageError(f"no search storage at {path}: give a journal file, an output folder or a URL")
        if path.stat().st_size == 0:
            raise SearchStorageError(f"{path} is empty: no search has been recorded there yet")
    try:
        storage = open_storage(url, repair=False)  # status never writes, not even to cut a torn line
        _check_study_name(storage, study_name, url)
        return load_study(storage, study_name)
    except SearchStorageError:
        raise
    except FileNotFoundError as exc:
        raise SearchStorageError(f"{url}: {exc}") from exc
    except Exception as exc:  # optuna raises ValueError, KeyError, JSON and DB errors on bad storages
        raise SearchStorageError(f"cannot read the search storage {url}: {exc}") from exc


def _check_study_name(storage: Any, study_name: str | None, url: str) -> None:
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    if study_name is not None and study_name not in names:
        raise SearchStorageError(f"{url} holds no search named {study_name!r}; it holds {names}")


def _status_header(study: Any, names: list[str], maximize: list[bool], counts: Counter, records: list) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("search", Text(study.study_name))
    grid.add_row(
        "objectives", ", ".join(f"{n} ({'max' if m else 'min'})" for n, m in zip(names, maximize, strict=True))
    )
    optimizer = study.user_attrs.get(OPTIMIZER)
    if optimizer is not None:
        grid.add_row("optimizer", fmt(optimizer))
    # Only evaluated candidates spend the budget: a trial interrupted by a kill is failed and
    # re-queued, so its candidate is counted once, when its retry finishes.
    finished = sum(1 for r in records if r.evaluated)
    budget = study.user_attrs.get(BUDGET)
    grid.add_row("budget", _budget_text(budget, finished) if budget is not None else "not recorded")
    states = {"fail": "failed"}
    named = Counter({states.get(k, k): v for k, v in counts.items()})
    interrupted = sum(1 for r in records if not r.evaluated)
    named["failed"] -= interrupted
    named["interrupted"] = interrupted
    # "interrupted" (failed by a kill, re-queued: not a failure of the candidate) only when there are some
    order = ["complete", "failed", *(["interrupted"] if interrupted else []), "running", "waiting"]
    extra = [k for k in named if k not in order and k != "interrupted"]
    grid.add_row("trials", " · ".join(f"{named.get(k, 0)} {k}" for k in order + extra))
    examples = examples_summary(records)
    if examples:
        grid.add_row("multi-fidelity", _fidelity_text(examples))
    grid.add_row("normalisation", _normalization_text(study.user_attrs.get(NORMALIZATION)))
    grid.add_row("best feasible mean", _best_text(records))
    return grid


def _fidelity_text(examples: Mapping[str, Any]) -> str:
    """'3 stopped early · 1,234 of 2,010 examples scored (39% saved)'."""
    return (
        f"{examples['stopped_early']} stopped early · {examples['examples_scored']:,} of "
        f"{examples['examples_full']:,} examples scored ({examples['examples_saved']:.0%} saved)"
    )


def _normalization_text(stored: Any) -> Text:
    """Each task's rule, one per line ('news: share of the expert's gain kept ...'); older runs stored none."""
    if not isinstance(stored, Mapping) or not stored:
        return Text("not recorded (older run: merged / expert; for losses, expert loss / merged loss)")
    return Text("\n".join(f"{task}: {entry.get('formula', entry.get('rule'))}" for task, entry in stored.items()))


def _budget_text(budget: Any, finished: int) -> str:
    if isinstance(budget, Mapping):
        candidates = budget.get("candidates")
        parts = [f"{finished} / {candidates} candidates"] if candidates else [f"{finished} candidates"]
        if budget.get("seconds"):
            parts.append(f"{fmt(budget['seconds'])} s")
        return ", ".join(parts)
    if isinstance(budget, int) and not isinstance(budget, bool):
        return f"{finished} / {budget} candidates"
    return fmt(budget)


def _best_text(records: list[TrialRecord]) -> str:
    done = [r for r in records if r.ok and r.normalized]
    feasible = [r for r in done if r.feasible]
    if feasible:
        best = max(feasible, key=lambda r: (mean_of(r.normalized), -r.number))
        return f"{fmt(mean_of(best.normalized))} (trial {best.number}, {best.method})"
    if done:
        best = max(done, key=lambda r: (mean_of(r.normalized), -r.number))
        return f"none feasible yet (best infeasible: {fmt(mean_of(best.normalized))}, trial {best.number})"
    return "no completed candidate yet"


def _front_table(front: list[TrialRecord], names: list[str], top: int) -> Table:
    tasks = task_names(front)
    title = f"Optimised front: {len(front)} point(s)" + (f", top {top} shown" if len(front) > top else "")
    table = Table("trial", "method", "kind", "feasible", *names, *tasks, title=title, title_justify="left")
    for r in front[:top]:
        table.add_row(
            str(r.number),
            str(r.method),
            r.kind,
            "yes" if r.feasible else "[red]no[/]",
            *(fmt(r.values.get(n)) for n in names),
            *(fmt(r.normalized.get(t)) for t in tasks),
        )
    return table


def _errors_table(errors: list[TrialRecord]) -> Table:
    table = Table("trial", "worker", "error", title="Recent errors", title_justify="left")
    for r in errors:
        first_line = (r.error or "").strip().splitlines()[0] if r.error and r.error.strip() else ""
        table.add_row(str(r.number), str(r.worker or "-"), Text(first_line[:200]))
    return table
