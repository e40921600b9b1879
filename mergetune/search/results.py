"""What a search leaves behind: the result files written when it finishes.

``mergetune status``, which reads a search's storage while it runs, is ``search.status``.

``write_results`` writes, under the output folder:

- ``candidates.csv`` / ``candidates.json``: one row per trial (objective values, mean/worst
  normalised score, each task's normalised and raw score, density, timings, worker, error);
- ``front/NN-trialNNNN.yaml``: the recipe of each point of the optimised front, best first, and
  ``front.json`` (its trial numbers); ``front_per_task.json``: the per-task Pareto set;
- ``chosen/recipe.yaml`` and ``chosen/scores.json``: the chosen recipe and its search, held-out
  and test scores;
- ``summary.json`` and ``summary.md``: finalists (search vs held-out), the chosen recipe's test
  scores beside the experts' references, and the run's ``meta`` (budget, optimizer, timings...).

Score blocks (search, held-out, test) all read ``{"scores": {task: raw}, "normalized": {task:
normalised by the task's rule}, "mean_normalized", "worst_normalized", "mean_score"}`` (``mean_score``,
the mean of raw scores, only when every task has the same metric); ``summary.md`` ends with each
task's normalisation (``meta.normalization``, see ``search.normalizations``); non-finite numbers are
written as null. Every file is written atomically (``atomic.write_atomic``): a kill or a full disk
leaves the previous version or the new one, never a truncated file.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from mergetune.errors import MergetuneError
from mergetune.recipe import Recipe
from mergetune.search.atomic import write_atomic
from mergetune.search.display import fmt
from mergetune.search.pareto import heldout_normalized, mean_of, task_names, worst_of
from mergetune.search.records import TrialRecord

TIMING_ORDER = ("merge", "eval", "ask", "wall")


# ---- candidates -----------------------------------------------------------------------------------
def candidate_json(record: TrialRecord) -> dict[str, Any]:
    """One trial as a JSON object: everything the record holds, with mean/worst normalised added."""
    return {
        "number": record.number,
        "state": record.state,
        "method": record.method,
        "kind": record.kind,
        "feasible": record.feasible,
        "values": record.values,
        "mean_normalized": mean_of(record.normalized) if record.normalized else None,
        "worst_normalized": worst_of(record.normalized) if record.normalized else None,
        "normalized": record.normalized,
        "scores": record.scores,
        "density": record.density,
        "timing": record.timing,
        "worker": record.worker,
        "error": record.error,
        "params": record.params,
        "recipe": record.recipe,
        "fidelity": record.fidelity or None,
    }


def examples_summary(records: Sequence[TrialRecord]) -> dict[str, Any]:
    """Multi-fidelity: validation examples scored in all, against scoring every evaluated candidate in full.

    Counted over the candidates evaluated here (completed or stopped early; a reuse of an equal
    candidate scored nothing, a failure is left out); a candidate that was not raced (a dynamic one)
    counts in full. Empty when no candidate was raced (multi-fidelity off).
    """
    raced = [r for r in records if r.fidelity.get("full_examples") and r.reused_from is None]
    if not raced:
        return {}
    per_candidate = max(sum(r.fidelity["full_examples"].values()) for r in raced)
    evaluated = [r for r in records if r.reused_from is None and (r.ok or r.pruned)]
    scored = sum((r.examples_scored or 0) if r.fidelity else per_candidate for r in evaluated)
    full = per_candidate * len(evaluated)
    return {
        "stopped_early": sum(r.pruned for r in evaluated),
        "examples_scored": scored,
        "examples_full": full,
        "examples_saved": 1.0 - scored / full if full else 0.0,
    }


def csv_columns(records: Sequence[TrialRecord], objectives: Sequence[str]) -> list[str]:
    """Flat column names: fixed fields, ``objective.<name>``, ``normalized.<task>``, ``score.<task>``, timings."""
    tasks = task_names(records)
    timings = {k for r in records for k in r.timing}
    timing_keys = [k for k in TIMING_ORDER if k in timings] + sorted(timings - set(TIMING_ORDER))
    return [
        "number",
        "state",
        "method",
        "kind",
        "feasible",
        *(f"objective.{o}" for o in objectives),
        "mean_normalized",
        "worst_normalized",
        *(f"normalized.{t}" for t in tasks),
        *(f"score.{t}" for t in tasks),
        "density",
        *(f"timing.{k}" for k in timing_keys),
        "worker",
        "error",
    ]


def csv_row(record: TrialRecord) -> dict[str, Any]:
    """One trial as a flat dict keyed like ``csv_columns`` (absent fields are left out)."""
    row = candidate_json(record)
    fixed = ("number", "state", "method", "kind", "feasible", "density", "worker", "error")
    flat: dict[str, Any] = {k: row[k] for k in fixed}
    flat["mean_normalized"] = row["mean_normalized"]
    flat["worst_normalized"] = row["worst_normalized"]
    for prefix, mapping in (
        ("objective", record.values),
        ("normalized", record.normalized),
        ("score", record.scores),
        ("timing", record.timing),
    ):
        flat.update({f"{prefix}.{k}": v for k, v in mapping.items()})
    return {k: _clean(v) for k, v in flat.items()}


def write_candidates(out: Path, records: Sequence[TrialRecord], objectives: Sequence[str]) -> None:
    """``candidates.csv`` (flat, one row per trial) and ``candidates.json`` (nested, with recipes)."""
    columns = csv_columns(records, objectives)
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore", restval="")
    writer.writeheader()
    for record in records:
        writer.writerow({k: "" if v is None else v for k, v in csv_row(record).items()})
    write_atomic(out / "candidates.csv", text.getvalue())
    _write_json(out / "candidates.json", [candidate_json(r) for r in records])


# ---- fronts and the chosen recipe -----------------------------------------------------------------
def write_front(out: Path, front: Sequence[TrialRecord], objectives: Sequence[str]) -> list[str]:
    """One recipe YAML per optimised-front point, best first (stale ones removed); returns the file names."""
    folder = out / "front"
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*-trial*.yaml"):
        stale.unlink()
    width = max(2, len(str(len(front))))
    files = []
    for i, record in enumerate(front, start=1):
        if record.recipe is None:
            continue
        name = f"{i:0{width}d}-trial{record.number:04d}.yaml"
        _write_recipe(folder / name, record.recipe)
        files.append(f"front/{name}")
    _write_json(
        out / "front.json",
        {
            "objectives": list(objectives),
            "trials": [r.number for r in front],
            "kinds": [r.kind for r in front],
            "files": files,
        },
    )
    return files


def score_block(entry: Mapping[str, Any] | None, *, same_unit: bool = True) -> dict[str, Any] | None:
    """A score block from ``{"normalized": {...}, "scores": {...}}`` (None stays None).

    ``mean_score``, the mean of the raw scores, only when ``same_unit`` (every task has the same
    metric): a mean of losses and accuracies means nothing.
    """
    if entry is None:
        return None
    normalized = heldout_normalized(entry)
    scores = dict(entry.get("scores") or {}) if "normalized" in entry else {}
    return {
        "scores": scores,
        "normalized": normalized,
        "mean_normalized": mean_of(normalized) if normalized else None,
        "worst_normalized": worst_of(normalized) if normalized else None,
        "mean_score": float(np.mean(list(scores.values()))) if scores and same_unit else None,
    }


def task_metrics(meta: Mapping[str, Any]) -> dict[str, str]:
    """task -> its primary metric, from ``meta["normalization"]`` (empty for runs that did not record it)."""
    return {
        str(t): str(v.get("metric")) for t, v in (meta.get("normalization") or {}).items() if isinstance(v, Mapping)
    }


def one_unit(meta: Mapping[str, Any]) -> bool:
    """Whether all tasks share one metric (so a mean of raw scores means something); unknown counts as no."""
    metrics = set(task_metrics(meta).values())
    return len(metrics) == 1


def write_chosen(
    out: Path, record: TrialRecord, heldout: dict | None, test: dict | None, *, same_unit: bool = True
) -> dict[str, Any]:
    """``chosen/recipe.yaml`` and ``chosen/scores.json``; returns the chosen entry of the summary."""
    folder = out / "chosen"
    folder.mkdir(parents=True, exist_ok=True)
    recipe_file = None
    if record.recipe is not None:
        _write_recipe(folder / "recipe.yaml", record.recipe)
        recipe_file = "chosen/recipe.yaml"
    entry = {
        "trial": record.number,
        "method": record.method,
        "kind": record.kind,
        "feasible": record.feasible,
        "recipe": recipe_file,
        "search": score_block({"normalized": record.normalized, "scores": record.scores}, same_unit=same_unit),
        "heldout": heldout,
        "test": test,
    }
    _write_json(folder / "scores.json", entry)
    return entry


# ---- summary --------------------------------------------------------------------------------------
def write_results(
    out: Path,
    *,
    records: Sequence[TrialRecord],
    objectives: Sequence[str],
    front: Sequence[TrialRecord],
    task_front: Sequence[TrialRecord],
    finalists: Sequence[TrialRecord],
    rescored: Sequence[Mapping[str, Any] | None] | None,
    chosen_index: int | None,
    test_scores: Mapping[str, Any] | None,
    meta: Mapping[str, Any],
) -> dict[str, Any]:
    """Write every result file (see the module docstring) and return the summary dict.

    ``rescored`` is aligned with ``finalists`` (``{"normalized": {task: v}, "scores": {task: v}}`` or
    None per finalist, or None overall); ``test_scores`` the same for the chosen recipe.
    ``meta`` is copied into the summary as is; ``meta["references"]`` (task -> the expert's test
    score, or task -> ``{"test": score, ...}``) is shown beside the chosen recipe's test scores.
    With ``chosen_index`` None (nothing completed) no ``chosen/`` is written.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_candidates(out, records, objectives)
    front_files = write_front(out, front, objectives)
    _write_json(
        out / "front_per_task.json", {"tasks": task_names(task_front), "trials": [r.number for r in task_front]}
    )
    same = one_unit(meta)
    heldout = [score_block(e, same_unit=same) for e in rescored] if rescored is not None else [None] * len(finalists)
    chosen = None
    if chosen_index is not None and finalists:
        test = score_block(test_scores, same_unit=same)
        chosen = write_chosen(out, finalists[chosen_index], heldout[chosen_index], test, same_unit=same)
    counts = Counter(r.state for r in records)
    summary = {
        "objectives": list(objectives),
        "tasks": task_names(records),
        "counts": {"candidates": len(records), **{s.lower(): n for s, n in sorted(counts.items())}},
        "any_feasible": any(r.ok and r.feasible for r in records),
        "front": [r.number for r in front],
        "front_kinds": dict(Counter(r.kind for r in front)),
        "front_files": front_files,
        "front_per_task": [r.number for r in task_front],
        "finalists": [_finalist_entry(i, r, heldout[i], chosen_index) for i, r in enumerate(finalists)],
        "chosen": chosen,
        "generalization": generalization(chosen),
        "references": references(meta),
        "meta": dict(meta),
    }
    summary = _clean(summary)
    _write_json(out / "summary.json", summary)
    write_atomic(out / "summary.md", summary_markdown(summary))
    return summary


def _finalist_entry(i: int, record: TrialRecord, heldout: dict | None, chosen_index: int | None) -> dict[str, Any]:
    return {
        "rank": i + 1,
        "trial": record.number,
        "method": record.method,
        "kind": record.kind,
        "feasible": record.feasible,
        "chosen": i == chosen_index,
        "search": {"mean": mean_of(record.normalized), "worst": worst_of(record.normalized)},
        "heldout": None
        if heldout is None
        else {"mean": heldout["mean_normalized"], "worst": heldout["worst_normalized"]},
    }


def references(meta: Mapping[str, Any]) -> dict[str, float]:
    """The experts' reference test scores from ``meta["references"]`` (task -> number or {"test": n})."""
    refs = meta.get("references") or {}
    out = {}
    for task, value in refs.items():
        value = value.get("test") if isinstance(value, Mapping) else value
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[str(task)] = float(value)
    return out


def summary_markdown(summary: Mapping[str, Any]) -> str:
    """The human-readable report: run facts, finalists (search vs held-out), the chosen recipe's scores."""
    lines = ["# Search results", "", "## Run", ""]
    own_sections = ("references", "base_references", "normalization")  # shown as tables below, not as lines
    lines += [f"- {k}: {fmt(v)}" for k, v in _flatten(summary.get("meta") or {}) if not k.startswith(own_sections)]
    counts = summary["counts"]
    by_state = ", ".join(f"{k} {v}" for k, v in counts.items() if k != "candidates")
    lines.append(f"- candidates: {counts['candidates']} ({by_state})")
    kinds = ", ".join(f"{n} {k}" for k, n in sorted((summary.get("front_kinds") or {}).items()))
    lines.append(
        f"- objectives: {', '.join(summary['objectives'])}; optimised front: {len(summary['front'])} point(s)"
        + (f" ({kinds})" if kinds else "")
    )
    lines.append(f"- per-task Pareto set: {len(summary['front_per_task'])} candidate(s)")
    lines += ["", "## Finalists", ""]
    if not summary["any_feasible"]:
        lines += ["**No candidate met the floors**: finalists are the least-violating candidates.", ""]
    lines += _md_table(
        [
            "rank",
            "trial",
            "method",
            "kind",
            "feasible",
            "search mean",
            "search worst",
            "held-out mean",
            "held-out worst",
            "chosen",
        ],
        [_finalist_cells(f) for f in summary["finalists"]],
    )
    lines += ["", *_chosen_markdown(summary), *_normalization_markdown(summary)]
    return "\n".join(lines) + "\n"


def _normalization_markdown(summary: Mapping[str, Any]) -> list[str]:
    """What each task's normalised score means (its rule), with the base's test score where the rule uses it."""
    meta = summary.get("meta") or {}
    normalization = meta.get("normalization") or {}
    if not normalization:
        return []
    base = meta.get("base_references") or {}
    rows = [
        [
            task,
            str(n.get("metric")),
            str(n.get("against")),
            str(n.get("formula")),
            fmt((base.get(task) or {}).get("test")),
        ]
        for task, n in normalization.items()
    ]
    lines = ["", "## Normalisation", ""]
    lines += [
        "A normalised score of 1 is the reference's level. Floors and the mean and worst objectives read normalised "
        "scores; raw scores are in each task's own metric (their mean is shown only when all tasks share one).",
        "",
    ]
    return lines + _md_table(["task", "metric", "against", "normalised as", "base test score"], rows)


def _finalist_cells(f: Mapping[str, Any]) -> list[str]:
    held = f["heldout"] or {}
    return [
        str(f["rank"]),
        str(f["trial"]),
        str(f["method"]),
        str(f.get("kind", "static")),
        "yes" if f["feasible"] else "no",
        fmt(f["search"]["mean"]),
        fmt(f["search"]["worst"]),
        fmt(held.get("mean")),
        fmt(held.get("worst")),
        "**chosen**" if f["chosen"] else "",
    ]


SPLIT_LABELS = {"search": "search", "heldout": "held-out", "test": "test"}


def read_summary(path: Path) -> dict[str, Any] | None:
    """A finished search's ``summary.json`` (None while there is none); an error naming it if unreadable."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MergetuneError(f"{path}: not readable as JSON ({exc}); re-run the search to rewrite it") from exc


def generalization(chosen: Mapping[str, Any] | None) -> dict[str, float | None] | None:
    """The chosen recipe's mean normalised score per split, and its change from the search split.

    The search split is what the optimizer maximised, so its score is optimistic; the held-out part
    (never used by the optimizer) and the test split (scored once) show how much of it was overfit.
    """
    if not chosen:
        return None
    means = {split: (chosen.get(split) or {}).get("mean_normalized") for split in SPLIT_LABELS}
    search = means["search"]
    changes = {
        f"search_to_{split}": None if search is None or means[split] is None else means[split] - search
        for split in ("heldout", "test")
    }
    return {**means, **changes}


def generalization_line(summary: Mapping[str, Any]) -> str | None:
    """``search 0.9692 → held-out 0.9561 (−0.0131) → test 0.9504 (−0.0188)``, or None before a choice."""
    gap = summary.get("generalization")
    if not gap or gap.get("search") is None:
        return None
    parts = [f"search {fmt(gap['search'])}"]
    for split in ("heldout", "test"):
        if gap.get(split) is not None:
            parts.append(f"{SPLIT_LABELS[split]} {fmt(gap[split])} ({gap[f'search_to_{split}']:+.4f})")
    return "generalisation (chosen recipe, mean normalised): " + " → ".join(parts)


def _chosen_markdown(summary: Mapping[str, Any]) -> list[str]:
    chosen = summary.get("chosen")
    if not chosen:
        return ["## Chosen recipe", "", "No candidate completed: nothing was chosen."]
    method = f"{chosen['method']}, {chosen.get('kind', 'static')}"
    lines = [f"## Chosen recipe: trial {chosen['trial']} ({method})", "", f"Recipe: `{chosen['recipe']}`", ""]
    blocks = {k: chosen.get(k) or {} for k in ("search", "heldout", "test")}
    refs = summary.get("references") or {}
    rows = []
    for task in summary["tasks"]:
        rows.append(
            [
                task,
                fmt(blocks["search"].get("normalized", {}).get(task)),
                fmt(blocks["heldout"].get("normalized", {}).get(task)),
                fmt(blocks["test"].get("scores", {}).get(task)),
                fmt(refs.get(task)),
                fmt(blocks["test"].get("normalized", {}).get(task)),
            ]
        )
    means = [blocks[k].get("mean_normalized") for k in ("search", "heldout")]
    same = one_unit(summary.get("meta") or {})
    ref_mean = (
        float(np.mean([refs[t] for t in summary["tasks"]]))
        if same and refs and set(summary["tasks"]) <= set(refs)
        else None
    )
    test_means = [blocks["test"].get("mean_score") if same else None, ref_mean, blocks["test"].get("mean_normalized")]
    rows.append(["**mean**", *(fmt(v) for v in (*means, *test_means))])
    header = ["task", "search (norm.)", "held-out (norm.)", "test score", "expert test score", "test (norm.)"]
    gap = generalization_line(summary)
    return lines + _md_table(header, rows) + ([] if gap is None else ["", gap[0].upper() + gap[1:]])


def summary_table(summary: Mapping[str, Any]) -> Table:
    """The end-of-search table: finalists with search / held-out means, the chosen one marked, its test mean."""
    chosen = summary.get("chosen") or {}
    test = (chosen.get("test") or {}).get("mean_normalized")
    title = "Finalists" if summary.get("any_feasible", True) else "Finalists (no candidate met the floors)"
    table = Table(
        "",
        "rank",
        "trial",
        "method",
        "feasible",
        "search mean",
        "search worst",
        "held-out mean",
        title=title,
        caption=generalization_line(summary),
    )
    table.add_column("test mean")
    for f in summary.get("finalists", []):
        held = f.get("heldout") or {}
        table.add_row(
            "→" if f["chosen"] else "",
            str(f["rank"]),
            str(f["trial"]),
            str(f["method"]),
            "yes" if f["feasible"] else "[red]no[/]",
            fmt(f["search"]["mean"]),
            fmt(f["search"]["worst"]),
            fmt(held.get("mean")),
            fmt(test) if f["chosen"] else "",
            style="bold" if f["chosen"] else None,
        )
    return table


def _flatten(mapping: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items = []
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        items += _flatten(value, f"{name}.") if isinstance(value, Mapping) and value else [(name, value)]
    return items


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]


def _clean(value: Any) -> Any:
    """JSON-safe copy: numpy scalars to Python, paths to str, tuples to lists, NaN/inf to None."""
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def _write_json(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(_clean(data), indent=2, default=str) + "\n")


def _write_recipe(path: Path, recipe: Mapping[str, Any]) -> None:
    """A stored recipe as YAML (validated first: the file must load back with ``Recipe.load``)."""
    write_atomic(path, Recipe.model_validate(recipe).to_yaml())
