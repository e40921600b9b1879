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
also works on a copied run folder. Reading them and the numbers shown are :mod:`.report_data`, the
figures :mod:`.report_figures`, the page this module. For live viewing while a search runs, point
optuna-dashboard at the journal: ``optuna-dashboard RUN_DIR/search.journal``.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from mergetune.export import report_figures as figs
from mergetune.export.report_data import (
    RunData,
    conflicting_pairs,
    load_run,
    parse_pairs,
    recipe_tables,
    score_rows,
)
from mergetune.search.results import generalization, generalization_line


def write_report(run: Path, out: Path | None = None, pairs: Sequence[str] = ()) -> Path:
    """Write ``index.html`` and the PNG figures to ``out`` (default ``RUN_DIR/report``); returns the page."""
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
            *_generalization(data),
            *sections,
            "<h2>Scores (raw)</h2>",
            _scores_table(data),
            *_normalization_table(data),
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


def _generalization(data: RunData) -> list[str]:
    """The chosen recipe's search → held-out → test line (older summaries lack it: computed from ``chosen``)."""
    summary = {**data.summary, "generalization": generalization(data.summary.get("chosen"))}
    line = generalization_line(summary)
    return [] if line is None else [f"<p class='lead'>{html.escape(line[0].upper() + line[1:])}</p>"]


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
        one_unit = len(data.metric_groups()) == 1 and bool(data.metrics)  # no mean of losses and accuracies
        mean = float(np.mean(known)) if one_unit and len(known) == len(cells) and known else None
        tds = "".join(f"<td class='num'>{_num(v)}</td>" for v in [*cells, mean])
        lines.append(f"<tr><td>{html.escape(model)}</td><td>{html.escape(split)}</td>{tds}</tr>")
    if not data.references:
        lines.append(
            "<tr><td colspan='99' class='small'>base and baselines on test: not scored; run "
            "<code>mergetune report RUN_DIR --score-references CONFIG</code></td></tr>"
        )
    return "\n".join([*lines, "</table>"])


def _normalization_table(data: RunData) -> list[str]:
    """What each task's normalised score means (older runs recorded nothing: then nothing is shown)."""
    if not data.normalization:
        return []
    esc = html.escape
    rows = "".join(
        f"<tr><td>{esc(task)}</td><td>{esc(str(n.get('metric')))}</td><td>{esc(str(n.get('against')))}</td>"
        f"<td>{esc(str(n.get('formula')))}</td></tr>"
        for task, n in data.normalization.items()
    )
    head = "<tr><th>task</th><th>metric</th><th>normalised against</th><th>normalised score</th></tr>"
    return ["<h2>Normalisation</h2>", f"<table>{head}{rows}</table>"]


def _settings_table(meta: Mapping[str, Any]) -> str:
    shown_apart = ("references", "base_references", "normalization")
    rows = [(k, v) for k, v in _flatten(meta) if not k.startswith(shown_apart)]
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
