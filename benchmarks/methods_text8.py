"""Merge methods on text8: each method at its paper's default, a short search per method family, and
gradient tuning of λ (AdaMerging) against the default black-box search at equal wall time.

Three parts, all on one worker holding the zoo's models (``search_quality.run_protocol`` with a shared
executor), evaluation under bf16 autocast as ``search_quality.py`` does (``--autocast``, default on):

- ``defaults``: every registered method that merges the zoo's experts, at its paper's default
  (the method's ``warm_start``: TA λ = 0.3, TIES density 0.2 λ = 1, ...), scored once on the test
  split. LiNeS is Task Arithmetic with λ_ℓ = α + β·ℓ/(L−1) over the blocks, α = 1/T (the
  average's λ at the input side) and β = 0.5: the paper sets α from task-vector norms and tunes β,
  so this row is our untuned choice, not the paper's. RegMean's Gram statistics are computed (or
  reused) under ``<out>/grams`` from ``--gram-examples`` (default 256) training examples per task, and
  the RegMean search reuses them; their compute time is stated.
  Methods defined on one or two experts only (SLERP, NuSLERP, NearSwap, Arcee Fusion, passthrough)
  and the dynamic Twin-Merging (a router per input: ``benchmarks/twin.py``) are listed as skipped.
- ``search``: one search per method family with the same budget (``--budget``, default 16 candidates,
  the paper default first as warm start), one λ per task (density shared where the method has one),
  layer groups of one block, seed 0, TPE, the objectives, floors and selection of
  ``configs/text8.yaml``; the chosen recipe's search / held-out / test means.
- ``gradient``: ``mergetune tune``'s optimizer (entropy objective on the search split's inputs,
  Adam, λ per task × block, ``--steps``, ``--learning-rate``) started (a) from AdaMerging's start
  (TA, λ = 0.3 everywhere); then the default search (``configs/text8.yaml``'s space) given (a)'s
  tuning time as its budget (``budget.seconds``); then (b) from the best black-box candidate it can
  tune: the chosen recipe of the Task Arithmetic family search (run first if it has not been; TIES
  with weights before the election, the default search's usual choice, is not linear in λ). Held-out
  and test scores of each start and tuned recipe (the search split is what the tuner fits: its
  entropy before and after is shown), wall time, steps or candidates, and the tuner's memory: the
  flat gradient buffer and the measured peak RSS increase during tuning.

Resumable: each row is stored in ``benchmarks/results/methods_text8.json`` (``-<zoo>`` for another zoo)
as soon as it is measured, and a row already there is not measured again; searches resume from their
run folders under ``--out``. The markdown table is rewritten from the stored rows at the end.

Run from the repository root (zoo cache: ``$MERGETUNE_CACHE``):
    nice -n 5 python benchmarks/methods_text8.py [--parts defaults,gradient,search] [--budget 16]
Smoke run: MERGETUNE_COMPILE=0 python benchmarks/methods_text8.py --zoo tiny --budget 4 --steps 3
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import math
import os
import shutil
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
import torch
import yaml
from search_quality import BASE_CONFIG, RESULTS, row_of, run_protocol

from mergetune.errors import RecipeError
from mergetune.merging.layer_groups import build_layer_groups
from mergetune.merging.lines import lines_weights
from mergetune.merging.loading import tensor_names
from mergetune.merging.methods import METHODS, method_options
from mergetune.recipe import Grouping, Recipe
from mergetune.search.atomic import write_atomic
from mergetune.search.config import SearchConfig
from mergetune.search.executor import LocalExecutor
from mergetune.search.gradient import GradientSettings
from mergetune.search.grams import GRAMS_DIR, ensure_grams
from mergetune.search.loop import resolve_models, worker_setup
from mergetune.search.worker import Worker, WorkerSetup

DEFAULT_ZOO = "text8"
PARTS = ("defaults", "search", "gradient")
SPLITS = ("holdout", "test")  # the gradient part's start and tuned recipes (the search split is what it tunes on)
# Defaults scored first (the methods the newer ones are compared with, then the newer ones), the rest after.
FIRST = ["task_arithmetic", "ties", "pcb", "tsv", "iso_c", "iso_cts", "regmean", "lines", "dare_ties", "della"]
LINES_BETA = 0.5
# One search per family: (space methods, weight range spec); the first word names the family in the table.
FAMILIES: dict[str, dict[str, Any]] = {  # the ones the newer methods are compared with first (CPU is scarce)
    "task_arithmetic": {"methods": ["task_arithmetic"]},
    "ties": {"methods": ["ties"]},
    "pcb": {"methods": ["pcb"]},
    "tsv": {"methods": ["tsv"]},
    "iso_c": {"methods": ["iso_c"]},
    "iso_cts": {"methods": ["iso_cts"]},
    "regmean": {"methods": ["regmean"]},
    "lines": {"methods": ["task_arithmetic"], "weight": {"per": "shared", "schedule": "lines"}},
    "dare_ties": {"methods": ["dare_ties"]},
    "della": {"methods": ["della"]},
    "breadcrumbs": {"methods": ["breadcrumbs"]},
}


# ---- stored rows ---------------------------------------------------------------------------------
class Rows:
    """The benchmark's rows, keyed by part and label, saved after each new one (the resume point)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: dict[str, dict[str, Any]] = json.loads(path.read_text()) if path.exists() else {}

    def get(self, part: str, label: str) -> dict[str, Any] | None:
        return self.rows.get(f"{part}/{label}")

    def put(self, part: str, label: str, row: dict[str, Any]) -> None:
        """Store one row, with the rows another process may have written to the file meanwhile."""
        on_disk = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.rows = {**on_disk, **self.rows, f"{part}/{label}": {"part": part, "label": label, **row}}
        write_atomic(self.path, json.dumps(self.rows, indent=2) + "\n")

    def part(self, part: str) -> list[dict[str, Any]]:
        return [r for r in self.rows.values() if r["part"] == part]


# ---- configs -------------------------------------------------------------------------------------
def base_config(args: argparse.Namespace, name: str, output: Path) -> dict[str, Any]:
    """configs/text8.yaml with the zoo, seed, evaluation and output of this run."""
    data = yaml.safe_load(BASE_CONFIG.read_text())
    data.update(name=f"methods_text8-{name}", models={"zoo": args.zoo}, seed=args.seed, output=str(output))
    data.pop("storage", None)
    data.setdefault("evaluation", {})["threads"] = args.threads
    if args.autocast != "none":
        data["evaluation"]["autocast"] = args.autocast
    return data


def family_config(args: argparse.Namespace, family: str) -> SearchConfig:
    data = base_config(args, family, args.out / "search" / family)
    spec = FAMILIES[family]
    data["space"] = {
        "methods": spec["methods"],
        "weight": spec.get("weight", {"per": "task"}),
        "density": {"per": "shared"},
        "granularity": 1,
    }
    data["budget"] = {"candidates": args.budget}
    return SearchConfig.model_validate(data)


def settings_of(args: argparse.Namespace, config: SearchConfig) -> dict[str, Any]:
    """What ``run_protocol`` compares with a run folder's stamp: the budget may grow on resume, as there."""
    budget = config.budget.candidates or config.budget.seconds
    config_data = config.model_dump(mode="json", exclude={"budget"})
    return {"zoo": args.zoo, "budget": budget, "seed": args.seed, "config": config_data}


# ---- scoring -------------------------------------------------------------------------------------
def scored(worker: Worker, recipe: Recipe, splits: Sequence[str] = ("test",)) -> dict[str, Any]:
    """Mean normalised score per split, the test split's per task, and the merge and evaluation seconds."""
    out: dict[str, Any] = {}
    for split in splits:
        ev = worker.evaluate(recipe, split)  # type: ignore[arg-type]
        out[split] = ev.mean_normalized
        if split == "test":
            out["per_task"] = dict(ev.normalized)
            out["merge_s"], out["eval_s"] = ev.merge_seconds, ev.eval_seconds
    return out


def group_names(base: str, granularity: int = 1) -> list[str]:
    names, model_type = tensor_names(base)
    return build_layer_groups(names, model_type, granularity).names


def default_recipes(setup: WorkerSetup, args: argparse.Namespace) -> tuple[dict[str, Recipe], dict[str, str], dict]:
    """Each method's paper-default recipe on the zoo's experts, the methods skipped (and why), RegMean's setup."""
    experts = [{"name": t, "model": p} for t, p in setup.experts.items()]
    recipes: dict[str, Recipe] = {}
    skipped: dict[str, str] = {}
    grams_info: dict[str, Any] = {}
    for name, method in METHODS.items():
        if method.dynamic:
            skipped[name] = "dynamic (a router per input): benchmarks/twin.py"
            continue
        try:
            method.check_experts(len(experts))
        except RecipeError as exc:
            skipped[name] = str(exc).split(";")[0]
            continue
        start = method.warm_start
        options = dict(start.options)
        if method.needs_data:
            files = ensure_grams(setup, args.out / GRAMS_DIR, args.gram_examples)
            options["grams"] = files.paths
            grams_info = files.describe()
        density = start.density if method.density_used(options) else 1.0
        recipes[name] = Recipe(
            base=setup.base, experts=experts, method=name, weight=start.weight, density=density, options=options
        )
    groups = group_names(setup.base)
    alpha = 1.0 / len(experts)
    schedule = dict(zip(groups, lines_weights(alpha, LINES_BETA, groups).tolist(), strict=True))
    recipes["lines"] = Recipe(
        base=setup.base, experts=experts, method="task_arithmetic", weight={"*": schedule}, grouping=Grouping()
    )
    return recipes, skipped, grams_info


# ---- parts ---------------------------------------------------------------------------------------
def run_defaults(worker: Worker, rows: Rows, args: argparse.Namespace) -> None:
    recipes, _, _ = default_recipes(worker.setup, args)
    order = [m for m in FIRST if m in recipes] + [m for m in recipes if m not in FIRST]
    for label in order[: args.defaults]:
        recipe = recipes[label]
        if rows.get("defaults", label) is not None:
            continue
        print(f"[defaults] {label}", flush=True)
        rows.put("defaults", label, {"method": recipe.method, **scored(worker, recipe)})


def run_searches(
    executor: LocalExecutor, rows: Rows, args: argparse.Namespace, families: Sequence[str] | None = None
) -> None:
    for family in families or args.families:
        if rows.get("search", family) is not None:
            continue
        config = family_config(args, family)
        share_grams(args.out / GRAMS_DIR, config.output_dir / GRAMS_DIR)
        result = run_protocol(family, config, settings_of(args, config), executor)
        row = row_of(family, result, config.output_dir)
        chosen = result["summary"].get("chosen") or {}
        row["per_task"] = (chosen.get("test") or {}).get("normalized")
        row["setup"] = result["summary"].get("meta", {}).get("setup")
        rows.put("search", family, row)


def share_grams(source: Path, target: Path) -> None:
    """Give a search the Gram files the defaults computed (it reuses them: same experts and tasks), not its own."""
    if not source.is_dir():
        return
    target.mkdir(parents=True, exist_ok=True)
    for path in source.glob("*.safetensors"):
        if not (target / path.name).exists():
            shutil.copy2(path, target / path.name)


def run_gradient(executor: LocalExecutor, rows: Rows, args: argparse.Namespace) -> None:
    """(a) tuning from AdaMerging's start, the default search given (a)'s tuning time, then (b) tuning from the
    best Task Arithmetic candidate of a black-box search (that family's search is run first if it has not been)."""
    setup = executor.worker.setup
    experts = [{"name": t, "model": p} for t, p in setup.experts.items()]
    adamerging = Recipe(base=setup.base, experts=experts, method="task_arithmetic", weight=0.3)
    tune_row(executor.worker, rows, args, "tune_from_default", adamerging)
    if rows.get("gradient", "default_search_equal_time") is None:
        seconds = rows.get("gradient", "tune_from_default")["wall_s"]
        data = base_config(args, "default_equal_time", args.out / "gradient" / "default_equal_time")
        data["budget"] = {"candidates": None, "seconds": seconds}
        config = SearchConfig.model_validate(data)
        result = run_protocol("default_equal_time", config, settings_of(args, config), executor)
        row = row_of("default_equal_time", result, config.output_dir)
        chosen = result["summary"].get("chosen") or {}
        row["per_task"] = (chosen.get("test") or {}).get("normalized")
        row["budget_s"] = seconds
        rows.put("gradient", "default_search_equal_time", row)
    run_searches(executor, rows, args, ["task_arithmetic"])
    best = Recipe.load(args.out / "search" / "task_arithmetic" / "chosen" / "recipe.yaml")
    tune_row(executor.worker, rows, args, "tune_from_best_blackbox", best)


def tune_row(worker: Worker, rows: Rows, args: argparse.Namespace, label: str, start: Recipe) -> None:
    """Tune ``start``'s λ per task × block on the search split's inputs (entropy) and store its scores and cost."""
    if rows.get("gradient", label) is not None:
        return
    print(f"[gradient] {label}", flush=True)
    assert METHODS[start.method].linear_in_weight(method_options(start))
    settings = GradientSettings(steps=args.steps, learning_rate=args.learning_rate, objective="entropy")
    tuned = worker.tune(start, settings)
    row = {
        "start": {split: v for split, v in scored(worker, start, SPLITS).items() if split in SPLITS},
        **scored(worker, tuned.recipe, SPLITS),
        "wall_s": tuned.seconds,
        "steps": len(tuned.losses),
        "loss": [tuned.losses[0], tuned.losses[-1]],
        "gradient_bytes": tuned.gradient_bytes,
        "peak_rss_increase_bytes": tuned.peak_rss_increase_bytes,
        "settings": tuned.settings,
    }
    rows.put("gradient", label, row)


# ---- the table -----------------------------------------------------------------------------------
def f4(value: Any) -> str:
    return "–" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.4f}"


def table(header: list[str], lines: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return out + ["| " + " | ".join(line) + " |" for line in lines]


def short(task: str) -> str:
    return task.replace("_", " ")[:10]


def markdown(rows: Rows, args: argparse.Namespace, notes: dict[str, Any], load: str) -> list[str]:
    defaults = sorted(rows.part("defaults"), key=lambda r: -(r.get("test") or -1))
    searches = {r["label"]: r for r in rows.part("search")}
    tasks = list((defaults or list(searches.values()) or [{"per_task": {}}])[0].get("per_task") or {})
    lines = [
        "# Merge methods on text8",
        "",
        f"Zoo `{args.zoo}`, seed {args.seed}, evaluation autocast {args.autocast}, "
        f"{dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}, load average while writing: {load}.",
        f"Command: `nice -n 5 python benchmarks/methods_text8.py --zoo {args.zoo} --budget {args.budget} "
        f"--steps {args.steps} --learning-rate {args.learning_rate}` (CPU only, 1 torch thread).",
        "",
        "Scores: mean normalised accuracy (merged / expert, averaged over the zoo's tasks). *default*: the method's",
        "paper default scored once on the test split; *search*: the chosen recipe of a search over that family",
        f"alone ({args.budget} candidates, the default first, one λ per task, TPE, seed {args.seed}) on the search",
        "split, its held-out part and the test split. See the docstring of `benchmarks/methods_text8.py`.",
        "",
        "## Paper defaults and a short search per family",
        "",
    ]
    labels = [r["label"] for r in defaults] + [f for f in FAMILIES if f in searches and not rows.get("defaults", f)]
    body = []
    for label in labels:
        d, s = rows.get("defaults", label) or {}, searches.get(label) or {}
        body.append(
            [
                label,
                f4(d.get("test")),
                f4(s.get("search")),
                f4(s.get("heldout")),
                f4(s.get("test")),
                str(s.get("candidates", "–")),
            ]
        )
    lines += table(["method", "default: test", "search: search", "search: held-out", "search: test", "cands"], body)
    if tasks:
        lines += ["", "Per task (test, normalised), paper defaults:", ""]
        per = [[r["label"], *(f4((r.get("per_task") or {}).get(t)) for t in tasks)] for r in defaults]
        lines += table(["method", *(short(t) for t in tasks)], per)
    gradient = {r["label"]: r for r in rows.part("gradient")}
    if gradient:
        lines += ["", "## Gradient tuning (AdaMerging) against the default search at equal wall time", ""]
        body = []
        for label in ("tune_from_default", "tune_from_best_blackbox"):
            g = gradient.get(label)
            if g:
                body.append([label, "start", "–", *(f4(g["start"].get(k)) for k in SPLITS), "–", "–"])
                entropy = f"entropy {g['loss'][0]:.3f} → {g['loss'][1]:.3f}"
                wall = f"{g['wall_s']:.0f} s"
                body.append([label, "tuned", entropy, *(f4(g.get(k)) for k in SPLITS), wall, f"{g['steps']} steps"])
        g = gradient.get("default_search_equal_time")
        if g:
            method, cands = str(g.get("method")), f"{g['candidates']} candidates"
            wall = f"{g['budget_s']:.0f} s ({g['wall_s']:.0f} s with setup and finalisation)"
            body.append(["default search", method, f4(g["search"]), f4(g["heldout"]), f4(g["test"]), wall, cands])
        lines += table(["run", "recipe", "search split", "held-out", "test", "wall", "evaluations"], body)
        tuned = gradient.get("tune_from_default")
        if tuned:
            lines += [
                "",
                f"Tuner memory: gradient buffer {tuned['gradient_bytes'] / 2**20:.1f} MiB (float32 ∂L/∂θ), "
                f"measured peak RSS increase during tuning {tuned['peak_rss_increase_bytes'] / 2**20:.1f} MiB.",
            ]
    pending = [m for m in notes.get("defaults", []) if not rows.get("defaults", m)]
    pending_searches = [f for f in FAMILIES if not rows.get("search", f)]
    if pending or pending_searches:
        lines += [
            "",
            f"Not measured yet (CPU time; the command resumes them): defaults {', '.join(pending) or 'none'}; "
            f"searches {', '.join(pending_searches) or 'none'}.",
        ]
    if notes.get("skipped"):
        lines += ["", "Skipped: " + "; ".join(f"`{k}`: {v}" for k, v in sorted(notes["skipped"].items())) + "."]
    grams = notes.get("regmean_grams")
    if grams:
        lines += [f"RegMean's Gram statistics: {grams['seconds']:.1f} s to compute for all experts (setup cost)."]
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zoo", default=DEFAULT_ZOO)
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--families", default=",".join(FAMILIES), help="family searches to run, in this order")
    parser.add_argument("--defaults", type=int, default=None, help="score only the first N defaults (priority order)")
    parser.add_argument("--budget", type=int, default=16, help="candidates per family search")
    parser.add_argument("--steps", type=int, default=100, help="gradient tuning steps")
    parser.add_argument("--learning-rate", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gram-examples", type=int, default=256, help="RegMean: training examples per task")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--autocast", default="bfloat16", choices=["bfloat16", "none"])
    parser.add_argument("--out", type=Path, default=None, help="default runs/methods_text8[-<zoo>]")
    parser.add_argument("--rows", type=Path, default=None, help="rows file (default benchmarks/results/...json)")
    args = parser.parse_args(argv)
    suffix = "" if args.zoo == DEFAULT_ZOO else f"-{args.zoo}"
    args.out = (args.out or Path(f"runs/methods_text8{suffix}")).resolve()
    parts = [p for p in args.parts.split(",") if p]
    if sorted(set(parts) - set(PARTS)):
        parser.error(f"unknown part(s) in {parts}; choose from {', '.join(PARTS)}")
    args.families = [f for f in args.families.split(",") if f]
    unknown = sorted(set(args.families) - set(FAMILIES))
    if unknown:
        parser.error(f"unknown famil(ies) {unknown}; choose from {', '.join(FAMILIES)}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    torch.set_num_threads(args.threads)

    rows = Rows(args.rows or RESULTS / f"methods_text8{suffix}.json")
    first = SearchConfig.model_validate({**base_config(args, "defaults", args.out), "budget": {"candidates": 1}})
    setup = worker_setup(first, resolve_models(first))
    executor = LocalExecutor(worker=Worker(setup)) if parts else None  # none: only the table is written
    for part in parts:  # in the order given
        assert executor is not None
        if part == "defaults":
            run_defaults(executor.worker, rows, args)
        elif part == "search":
            run_searches(executor, rows, args)
        else:
            run_gradient(executor, rows, args)
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    recipes, skipped, grams_info = default_recipes(setup, args)  # the Gram files are reused: nothing is computed
    notes = {"skipped": skipped, "regmean_grams": grams_info, "defaults": list(recipes)}
    path = RESULTS / f"methods_text8{suffix}.md"
    path.write_text("\n".join(markdown(rows, args, notes, load)).rstrip() + "\n")
    print(path.read_text())


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - started:.1f} s")
