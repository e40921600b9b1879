"""``mergetune report RUN_DIR``: a search as one self-contained HTML page, with its figures as PNGs.

The page (``RUN_DIR/report/index.html``, images embedded as base64, no script, no network) shows:

1. the Pareto front: the optimised objectives, 2-D projections on task pairs (the most conflicting
   pairs by default: lowest correlation of their normalised scores over the candidates), and a
   parallel-coordinates view of every task;
2. convergence: the best feasible mean normalised score against candidates and against time (the
   trials' own start/finish times from the journal when it is there, else the summed timings);
3. the chosen recipe's λ and density per task and layer group, as heatmaps;
4. the chosen recipe's per-task scores (validation, held-out validation, test) beside each expert's,
   the baselines' (the papers' defaults the search started from) and the base's (with the experts'
   heads), when ``--score-references CONFIG`` has scored those;
5. the search settings and the chosen recipe.

It reads only the files a search writes (``summary.json``, ``candidates.json``, the journal), so it
also works on a copied run folder. For live viewing while a search runs, point optuna-dashboard at
the journal: ``optuna-dashboard RUN_DIR/search.journal``.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from mergetune.errors import MergetuneError
from mergetune.export.card import RunFolderError, read_json
from mergetune.recipe import Recipe, resolve_parameter

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
        import optuna

        from mergetune.search.storage import load_study, open_storage

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
    from mergetune.export.layout import read_layout

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
    from mergetune.merging.methods import get_method

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


# ---- the page ------------------------------------------------------------------------------------------
def write_report(run: Path, out: Path | None = None, pairs: Sequence[str] = ()) -> Path:
    """Write ``index.html`` and the PNG figures to ``out`` (default ``RUN_DIR/report``); returns the page."""
    from mergetune.export import report_figures as figs

    data = load_run(run)
    out = Path(out) if out is not None else Path(run) / "report"
    out.mkdir(parents=True, exist_ok=True)
    chosen_pairs = parse_pairs(pairs, data.tasks) if pairs else conflicting_pairs(data)
    figures = {
        "front_objectives": ("Pareto front on the optimised objectives", figs.objectives_front(data)),
        "front_pairs": ("Pareto front projected on task pairs", figs.task_pairs(data, chosen_pairs)),
        "parallel": ("Every task at once (parallel coordinates)", figs.parallel(data)),
        "convergence": ("Convergence of the best feasible mean", figs.convergence(data)),
        "heatmap": ("The chosen recipe per task and layer group", figs.heatmaps(data, recipe_tables(data))),
        "scores": ("Per-task scores of the chosen recipe", figs.scores(data, score_rows(data))),
    }
    images = {}
    for key, (title, fig) in figures.items():
        if fig is None:
            continue
        png = figs.save(fig, out / f"{key}.png")
        images[key] = (title, base64.b64encode(png).decode("ascii"))
    page = out / "index.html"
    page.write_text(render_html(data, images))
    return page


def render_html(data: RunData, images: Mapping[str, tuple[str, str]]) -> str:
    """The page: figures (embedded), the scores table, the search settings, the chosen recipe."""
    esc = html.escape
    meta = data.summary.get("meta") or {}
    counts = data.summary.get("counts") or {}
    sections = [_figure(key, title, b64) for key, (title, b64) in images.items()]
    objectives = ", ".join(data.summary.get("objectives") or [])
    body = "\n".join(
        [
            f"<h1>Search <code>{esc(data.name)}</code></h1>",
            f"<p class='lead'>{counts.get('candidates', len(data.candidates))} candidates, "
            f"{len(data.candidates)} completed; optimised objectives: {esc(objectives)}; "
            f"optimised front: {len(data.summary.get('front') or [])} point(s); "
            f"time axis: {esc(data.time_source)}.</p>",
            *sections,
            "<h2>Scores (raw)</h2>",
            _scores_table(data),
            "<h2>Search settings</h2>",
            _settings_table(meta),
            "<h2>Chosen recipe</h2>",
            f"<p>{esc(data.groups_note)}</p>" if data.groups_note else "",
            f"<pre>{esc(data.chosen.to_yaml()) if data.chosen else 'nothing was chosen'}</pre>",
            "<p class='small'>Live view while a search runs: <code>optuna-dashboard "
            f"{esc(str(data.run / 'search.journal'))}</code>. Written by <code>mergetune report</code>.</p>",
        ]
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>mergetune report: {esc(data.name)}</title>
<style>
body {{ font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; padding: 0 1em; }}
h1 {{ font-size: 1.6em; }} h2 {{ font-size: 1.25em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }}
figure {{ margin: 1.2em 0; }} figure img {{ max-width: 100%; border: 1px solid #eee; }}
figcaption {{ color: #555; font-size: 0.9em; }}
table {{ border-collapse: collapse; font-size: 0.88em; }} td, th {{ border: 1px solid #ddd; padding: 3px 8px; }}
th {{ background: #f4f4f4; }} td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
pre {{ background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }}
.lead {{ color: #444; }} .small {{ color: #777; font-size: 0.85em; }}
</style></head>
<body>
{body}
</body></html>
"""


def _figure(key: str, title: str, b64: str) -> str:
    esc = html.escape
    return (
        f"<h2>{esc(title)}</h2><figure id='{key}'><img alt='{esc(title)}' src='data:image/png;base64,{b64}'>"
        f"<figcaption>{esc(title)} ({key}.png)</figcaption></figure>"
    )


def _scores_table(data: RunData) -> str:
    rows = score_rows(data)
    if not rows:
        return "<p>No scores.</p>"
    head = "".join(f"<th>{html.escape(t)}</th>" for t in [*data.tasks, "mean"])
    lines = [f"<table><tr><th>model</th><th>split</th>{head}</tr>"]
    for model, split, values in rows:
        cells = [values.get(t) for t in data.tasks]
        known = [v for v in cells if v is not None]
        mean = float(np.mean(known)) if len(known) == len(cells) and known else None
        tds = "".join(f"<td class='num'>{_num(v)}</td>" for v in [*cells, mean])
        lines.append(f"<tr><td>{html.escape(model)}</td><td>{html.escape(split)}</td>{tds}</tr>")
    if not data.references:
        lines.append(
            "<tr><td colspan='99' class='small'>base and baselines on test: not scored; run "
            "<code>mergetune report RUN_DIR --score-references CONFIG</code></td></tr>"
        )
    return "\n".join([*lines, "</table>"])


def _settings_table(meta: Mapping[str, Any]) -> str:
    rows = [(k, v) for k, v in _flatten(meta) if not k.startswith("references")]
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(_text(v))}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _flatten(mapping: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        items += _flatten(value, f"{name}.") if isinstance(value, Mapping) and value else [(name, value)]
    return items


def _num(value: float | None) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.4f}"


def _text(value: Any) -> str:
    if isinstance(value, float):
        return _num(value)
    if isinstance(value, list | dict):
        return yaml.safe_dump(value, default_flow_style=True).strip()
    return "–" if value is None else str(value)
