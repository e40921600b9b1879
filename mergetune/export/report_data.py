"""The data of a search report: a run folder read into RunData, and the numbers the page and figures show.

Reads only the files a search writes (``summary.json``, ``candidates.json``, the journal, and
``report/references.json`` when ``--score-references`` wrote it). The page (:mod:`.report`) and the
figures (:mod:`.report_figures`) both build on this module; neither is imported here, so the graph
is one-directional: report -> report_figures -> report_data.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna

from mergetune.errors import MergetuneError
from mergetune.export.card import RunFolderError, read_json
from mergetune.export.layout import read_layout
from mergetune.merging.methods import get_method
from mergetune.recipe import Recipe, resolve_parameter
from mergetune.search.results import task_metrics
from mergetune.search.storage import load_study, open_storage

REFERENCES_FILE = "references.json"  # base and baselines scored by --score-references
MAX_PAIRS = 6


@dataclass(frozen=True)
class Candidate:
    """A completed candidate as the report uses it."""

    number: int
    method: str
    feasible: bool
    values: dict[str, float]
    normalized: dict[str, float]
    scores: dict[str, float]
    elapsed: float  # seconds from the search's start to this candidate's end
    warm_start: bool

    @property
    def mean(self) -> float:
        return float(np.mean(list(self.normalized.values())))

    @property
    def worst(self) -> float:
        return float(min(self.normalized.values()))


@dataclass
class RunData:
    """Everything the report shows, read from a run folder."""

    run: Path
    summary: dict[str, Any]
    candidates: list[Candidate]
    time_source: str
    chosen: Recipe | None
    groups: list[str] = field(default_factory=list)
    groups_note: str = ""
    references: dict[str, Any] = field(default_factory=dict)  # scored base and baselines, if any

    @property
    def tasks(self) -> list[str]:
        return list(self.summary.get("tasks") or [])

    @property
    def name(self) -> str:
        return str((self.summary.get("meta") or {}).get("name") or self.run.name)

    @property
    def metrics(self) -> dict[str, str]:
        """task -> its metric (empty for runs that did not record their normalisation)."""
        return task_metrics(self.summary.get("meta") or {})

    @property
    def normalization(self) -> dict[str, dict[str, Any]]:
        """task -> its normalisation (rule, formula, against; see ``search.normalizations``); empty for older runs."""
        return dict((self.summary.get("meta") or {}).get("normalization") or {})

    def metric_groups(self) -> dict[str, list[str]]:
        """Tasks grouped by metric, in task order (one group 'score' when the run did not record metrics)."""
        groups: dict[str, list[str]] = {}
        for task in self.tasks:
            groups.setdefault(self.metrics.get(task, "score"), []).append(task)
        return groups

    def by_number(self, numbers: Sequence[int]) -> list[Candidate]:
        index = {c.number: c for c in self.candidates}
        return [index[n] for n in numbers if n in index]


# ---- reading a run -------------------------------------------------------------------------------------
def load_run(run: Path) -> RunData:
    """Read a finished search's folder (see the module docstring); errors name the missing file."""
    run = Path(run)
    summary = read_json(run / "summary.json")
    rows = [c for c in read_json(run / "candidates.json") if c.get("state") == "COMPLETE" and c.get("normalized")]
    if not rows:
        raise RunFolderError(f"{run}/candidates.json holds no completed candidate: nothing to report")
    times, warm, source = _journal_times(run, summary)
    if not times:
        source, total = "summed candidate timings (no journal)", 0.0
        for row in sorted(rows, key=lambda r: r["number"]):
            total += float((row.get("timing") or {}).get("wall") or 0.0)
            times[row["number"]] = total
    candidates = [_candidate(r, times, warm) for r in sorted(rows, key=lambda r: r["number"])]
    chosen = _chosen_recipe(summary, rows)
    data = RunData(run, summary, candidates, source, chosen)
    if chosen is not None:
        data.groups, data.groups_note = _groups(chosen)
    refs = run / "report" / REFERENCES_FILE
    data.references = read_json(refs) if refs.is_file() else {}
    return data


def _candidate(row: Mapping[str, Any], times: Mapping[int, float], warm: set[int]) -> Candidate:
    return Candidate(
        number=int(row["number"]),
        method=str(row.get("method")),
        feasible=bool(row.get("feasible", True)),
        values={k: float(v) for k, v in (row.get("values") or {}).items() if v is not None},
        normalized={k: float(v) for k, v in row["normalized"].items() if v is not None},
        scores={k: float(v) for k, v in (row.get("scores") or {}).items() if v is not None},
        elapsed=float(times.get(int(row["number"]), math.nan)),
        warm_start=int(row["number"]) in warm,
    )


def _journal_times(run: Path, summary: Mapping[str, Any]) -> tuple[dict[int, float], set[int], str]:
    """Seconds from the first trial's start to each trial's end, and the warm starts, from the journal."""
    journal = run / "search.journal"
    if not journal.is_file():
        return {}, set(), ""
    try:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = load_study(open_storage(journal), (summary.get("meta") or {}).get("name"))
        trials = [t for t in study.get_trials(deepcopy=False) if t.datetime_complete and t.datetime_start]
    except Exception:  # an unreadable journal only costs the time axis its precision
        return {}, set(), ""
    if not trials:
        return {}, set(), ""
    start = min(t.datetime_start for t in trials)
    times = {t.number: (t.datetime_complete - start).total_seconds() for t in trials}
    warm = {t.number for t in trials if t.user_attrs.get("warm_start")}
    return times, warm, "trial start and end times from the journal"


def _chosen_recipe(summary: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> Recipe | None:
    chosen = summary.get("chosen") or {}
    for row in rows:
        if row["number"] == chosen.get("trial") and row.get("recipe"):
            return Recipe.parse(row["recipe"], source=f"candidates.json trial {row['number']}")
    return None


def _groups(recipe: Recipe) -> tuple[list[str], str]:
    """The base's layer groups (file headers only); if the base is gone, the groups the recipe names."""
    try:
        return list(read_layout(recipe.base, recipe.grouping.granularity).groups.names), ""
    except MergetuneError as exc:
        named = sorted(
            {
                g
                for spec in (recipe.weight, recipe.density)
                if isinstance(spec, dict)
                for v in spec.values()
                if isinstance(v, dict)
                for g in v
                if g != "*"
            }
        )
        note = f"the base could not be read ({exc}); groups shown are those the recipe names"
        return (named or ["all groups"]), note


# ---- derived numbers -----------------------------------------------------------------------------------
def best_so_far(candidates: Sequence[Candidate]) -> np.ndarray:
    """Best mean normalised score of the feasible candidates up to each one (NaN until one is feasible)."""
    best, out = -math.inf, []
    for c in candidates:
        if c.feasible:
            best = max(best, c.mean)
        out.append(best if best > -math.inf else math.nan)
    return np.array(out)


def conflicting_pairs(data: RunData, limit: int = MAX_PAIRS) -> list[tuple[str, str]]:
    """Task pairs whose normalised scores correlate least over the candidates (their trade-off is sharpest)."""
    tasks = data.tasks
    table = np.array([[c.normalized.get(t, np.nan) for t in tasks] for c in data.candidates])
    pairs = []
    for i in range(len(tasks)):
        for j in range(i + 1, len(tasks)):
            x, y = table[:, i], table[:, j]
            ok = ~(np.isnan(x) | np.isnan(y))
            spread = x[ok].std() * y[ok].std()
            corr = float(np.corrcoef(x[ok], y[ok])[0, 1]) if ok.sum() > 2 and spread > 0 else 0.0
            pairs.append((corr, tasks[i], tasks[j]))
    return [(a, b) for _, a, b in sorted(pairs)[:limit]]


def parse_pairs(text: Sequence[str], tasks: Sequence[str]) -> list[tuple[str, str]]:
    """``a:b`` pairs from the command line, checked against the run's tasks."""
    out = []
    for item in text:
        a, sep, b = item.partition(":")
        if not sep or a not in tasks or b not in tasks or a == b:
            raise RunFolderError(f"--pair {item!r}: give two different tasks as TASK:TASK; the tasks are {list(tasks)}")
        out.append((a, b))
    return out


def recipe_tables(data: RunData) -> dict[str, np.ndarray]:
    """The chosen recipe's ``[T, G]`` weight and (if the method uses it) density."""
    recipe = data.chosen
    if recipe is None:
        return {}
    out = {"weight λ": resolve_parameter(recipe.weight, recipe.task_names, data.groups, "weight")}
    if get_method(recipe.method).uses_density:
        out["density (kept)"] = resolve_parameter(recipe.density, recipe.task_names, data.groups, "density")
    return out


def score_rows(data: RunData) -> list[tuple[str, str, dict[str, float | None]]]:
    """(model, split, task -> raw score) rows of the scores table: chosen, experts, baselines, base."""
    chosen = data.summary.get("chosen") or {}
    refs = (data.summary.get("meta") or {}).get("references") or {}
    rows: list[tuple[str, str, dict[str, float | None]]] = []
    for split, label in (("search", "validation"), ("heldout", "held-out validation"), ("test", "test")):
        block = chosen.get(split)
        if block:
            rows.append((f"chosen (trial {chosen.get('trial')})", label, dict(block.get("scores") or {})))
    for split, label in (("search", "validation"), ("holdout", "held-out validation"), ("test", "test")):
        values = {t: (v.get(split) if isinstance(v, Mapping) else None) for t, v in refs.items()}
        if any(v is not None for v in values.values()):
            rows.append(("expert", label, values))
    scored = data.references.get("models") or {}
    warm = [c for c in data.candidates if c.warm_start]
    for c in warm:
        if not any(label.endswith(f"(trial {c.number})") for label in scored):
            rows.append((f"baseline: {c.method} (trial {c.number})", "validation", dict(c.scores)))
    for model, splits in scored.items():
        for split, label in (("search", "validation"), ("test", "test")):
            if split in splits:
                rows.append((model, label, dict(splits[split])))
    return rows
