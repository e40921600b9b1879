"""``mergetune merge RUN_DIR OUT --point P``: the merged model of any point of a finished search.

A point is ``chosen`` (the recipe the search chose), a 1-based position on the optimised front
(``front/NN-trialNNNN.yaml``), or ``trial:N`` (any completed candidate). The folder gets the
model card of ``save.py`` with the point's scores beside the experts' (search and held-out
validation, and test for the chosen recipe, the only one scored on it) and ``scores.json``, so it
is ready to upload as it is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergetune.errors import MergetuneError
from mergetune.merging.engine import compile_available
from mergetune.merging.save import MergedFolder, ScoreTable, merge_to_folder
from mergetune.recipe import Recipe


class RunFolderError(MergetuneError):
    """A search output folder is missing a file, or has no such point."""


@dataclass(frozen=True)
class RunPoint:
    """One recipe of a search, its scores per task and where it came from."""

    recipe: Recipe
    trial: int
    label: str  # "chosen recipe", "front point 2", "candidate"
    scores: ScoreTable
    run: Path


def read_json(path: Path) -> Any:
    """A JSON file of a run folder; a missing or broken one is an error naming it."""
    if not path.is_file():
        raise RunFolderError(f"{path} not found: is {path.parent} the output folder of a finished search?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RunFolderError(f"{path}: not valid JSON ({exc})") from exc


def run_point(run: Path, point: str = "chosen") -> RunPoint:
    """The recipe and scores of ``point`` in the run folder ``run`` (see the module docstring)."""
    summary = read_json(run / "summary.json")
    candidates = {c["number"]: c for c in read_json(run / "candidates.json")}
    refs, bases = _references(summary), _references(summary, "base_references")
    if point == "chosen":
        chosen = summary.get("chosen") or {}
        if not chosen.get("recipe"):
            raise RunFolderError(f"{run}: the search chose no recipe (no candidate completed)")
        trial, label = int(chosen["trial"]), "chosen recipe"
        blocks = (chosen.get("search"), chosen.get("heldout"), chosen.get("test"))
        scores = _table(summary["tasks"], refs, bases, *blocks)
    else:
        trial, label = _trial_of(run, point, summary)
        entry = candidates.get(trial)
        if entry is None or entry.get("recipe") is None:
            raise RunFolderError(f"{run}: trial {trial} has no recipe (failed or unknown); see candidates.csv")
        scores = _table(summary["tasks"], refs, bases, entry, None, None)
    entry = candidates.get(trial) or {}
    recipe = Recipe.parse(entry.get("recipe"), source=f"{run}/candidates.json trial {trial}")
    return RunPoint(recipe, trial, label, scores, run)


def _trial_of(run: Path, point: str, summary: dict[str, Any]) -> tuple[int, str]:
    front = list(summary.get("front") or [])
    if point.isdigit():
        k = int(point)
        if not 1 <= k <= len(front):
            raise RunFolderError(f"{run}: the optimised front has {len(front)} point(s); give --point 1..{len(front)}")
        return int(front[k - 1]), f"front point {k}"
    if point.startswith("trial:") and point[6:].isdigit():
        return int(point[6:]), "candidate"
    raise RunFolderError(f"--point {point!r}: give 'chosen', a front position (1, 2, ...) or 'trial:N'")


def _references(summary: dict[str, Any], key: str = "references") -> dict[str, dict[str, float]]:
    """The experts' own scores per split: {task: {"search": s, "holdout": s, "test": s}};
    ``key="base_references"``: the base's, for the tasks whose normalisation uses it."""
    refs = (summary.get("meta") or {}).get(key) or {}
    return {t: (v if isinstance(v, dict) else {"test": v}) for t, v in refs.items()}


def _table(
    tasks: list[str],
    refs: dict[str, dict[str, float]],
    bases: dict[str, dict[str, float]],
    *blocks: dict[str, Any] | None,
) -> ScoreTable:
    """task -> column -> value, for the blocks given (search, held-out, test): raw, normalised, the expert's and,
    where a task's normalisation uses it, the base's."""
    names = ("validation", "held-out validation", "test")
    out: dict[str, dict[str, float | None]] = {}
    for task in tasks:
        row: dict[str, float | None] = {}
        for name, block, split in zip(names, blocks, ("search", "holdout", "test"), strict=True):
            if not block:
                continue
            row[name] = (block.get("scores") or {}).get(task)
            row[f"{name} (norm.)"] = (block.get("normalized") or {}).get(task)
            row[f"expert {name}"] = refs.get(task, {}).get(split)
            if bases:
                row[f"base {name}"] = bases.get(task, {}).get(split)
        out[task] = row
    return out


def normalization_note(summary: dict[str, Any]) -> str:
    """What 'normalised' means for each task of a run (from ``meta.normalization``; older runs: the old rule)."""
    stored = (summary.get("meta") or {}).get("normalization") or {}
    if not stored:
        return "normalised = merged / expert (for a loss: expert loss / merged loss)."
    rules: dict[str, list[str]] = {}
    for task, entry in stored.items():
        rules.setdefault(str(entry.get("formula") or entry.get("rule")), []).append(task)
    if len(rules) == 1:
        return f"normalised = {next(iter(rules))}."
    return "normalised: " + "; ".join(f"{', '.join(tasks)}: {formula}" for formula, tasks in rules.items()) + "."


def merge_point(
    run: Path, point: str, out_dir: Path, *, device: str = "cpu", compile: bool | None = None
) -> tuple[RunPoint, MergedFolder]:
    """Merge a point of a search into ``out_dir``, with its scores in the model card and ``scores.json``."""
    found = run_point(run, point)
    summary = read_json(run / "summary.json")
    name = (summary.get("meta") or {}).get("name", run.name)
    about = (
        f"This is the {found.label} (trial {found.trial}) of the mergetune search `{name}`. Scores are each task's "
        "metric on the validation examples the search scored, on the held-out ones it never saw, and on test (the "
        f"chosen recipe only); {normalization_note(summary)}"
    )
    if compile is None:  # the search's backend (compiled where available), so the bits are those it scored
        compile = compile_available(torch.device(device))
    folder = merge_to_folder(found.recipe, out_dir, device=device, compile=compile, scores=found.scores, about=about)
    payload = {"search": name, "trial": found.trial, "point": found.label, "scores": found.scores}
    (folder.folder / "scores.json").write_text(json.dumps(payload, indent=2) + "\n")
    return found, folder
