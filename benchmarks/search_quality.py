"""Search quality at equal budget: the default optimizer against the papers' tuning protocols.

Every protocol is its own search (a ``SearchConfig``) on the same zoo, with the same objectives,
floors, selection rule and candidate budget (default 100); objectives, floors, selection and the
default space come from ``configs/text8.yaml`` whatever the zoo (only ``models.zoo`` is replaced):

- ``default``: the text8 config as is: TPE over task_arithmetic / ties / dare_ties / pcb /
  breadcrumbs, per-task × per-layer-group weights through 3 depth anchors, per-task densities.
- ``grid``: the merging papers' protocol: Task Arithmetic and TIES with one shared λ (and, for
  TIES, one shared density) on a grid. ``points`` per axis is the largest p with p + p² ≤ budget
  (TA's λ axis plus TIES' λ × density), so the whole grid fits the budget: 9 points (90
  candidates) at budget 100, 3 points (12 candidates) at budget 12. No warm starts: the grid is
  the protocol. A finished grid stops before the budget (the candidates column says how many).
- ``ngopt_pcb``: the PCB+ES protocol: Nevergrad NGOpt over one λ per task for PCB. The density
  (PCB's ratio) is one shared value searched with the λs (a fixed value is not expressible in a
  search space: a range needs low < high).
- ``cmaes_ties``: the mergekit-evolve protocol: pycma CMA-ES over one weight and one density per
  layer group (``per: group`` for both, no anchors) for TIES.
- ``random``: random search over the default space.

Warm starts (the papers' default recipe of each method) are on for every protocol except
``grid``, as in the default config; they count against the budget.

For each protocol the table shows, for the chosen recipe, the mean normalised accuracy (merged /
expert, averaged over tasks) on the search validation split, the held-out validation split and
the test split; the best search mean of any candidate; the number of candidates needed to reach
99% of that best (trials in number order, best-so-far of the mean normalised score, trials
interrupted by a kill left out); the candidates evaluated; and the loop's own overhead per
candidate as a fraction of the evaluation time (summary meta ``overhead_fraction``, target ≤ 5%;
measured over the candidates of the last process that ran the search, so a resumed search reports
its resumed part).

Resumable: each protocol writes to ``<out>/<protocol>/`` (default ``runs/search_quality`` for the
text8 zoo, ``runs/search_quality-<zoo>`` for another zoo, so that a smoke run does not collide
with the real one). A protocol whose folder holds a finished run with the same settings is
skipped (its results are read back); an unfinished one is resumed (the search loop resumes from
its storage). ``benchmark.json`` in each folder records the settings and the wall time; a folder
holding another zoo or seed is refused rather than mixed.

The table is printed and written to ``benchmarks/results/search_quality.md`` (for another zoo:
``search_quality-<zoo>.md``) with the zoo, the budget, the seed and the date.

Run from the repository root (the zoo cache is ``.cache/`` unless ``$MERGETUNE_CACHE``):
    python benchmarks/search_quality.py [--zoo text8] [--budget 100] [--protocols default,grid] [--seed 0]
Evaluation under bf16 autocast (the session-sized run; the setting is part of the stamp):
    python benchmarks/search_quality.py --autocast bfloat16
Smoke run (seconds per candidate): MERGETUNE_COMPILE=0 python benchmarks/search_quality.py --zoo tiny --budget 12
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import logging
import math
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import optuna
import yaml

from mergetune.merging.methods import METHODS
from mergetune.search.config import SearchConfig
from mergetune.search.executor import Executor
from mergetune.search.loop import open_search

ROOT = Path(__file__).resolve().parents[1]
BASE_CONFIG = ROOT / "configs" / "text8.yaml"
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_ZOO = "text8"
STAMP = "benchmark.json"
REACH = 0.99
INTERRUPTED = "interrupted:"  # the error of a trial a killed driver left running (mergetune.search.storage)


# ---- protocols ----------------------------------------------------------------------------------
def grid_points(methods: Sequence[str], budget: int) -> int:
    """The largest points-per-axis p whose grid (one shared λ, plus a shared density where used) fits the budget."""

    def size(p: int) -> int:
        return sum(p ** (1 + int(METHODS[m].uses_density)) for m in methods)

    p = 1
    while size(p + 1) <= budget:
        p += 1
    return p


def _default(base: dict[str, Any], budget: int) -> dict[str, Any]:
    return base


def _grid(base: dict[str, Any], budget: int) -> dict[str, Any]:
    methods = ["task_arithmetic", "ties"]
    points = grid_points(methods, budget)
    options: dict[str, Any] = {"points": points}
    if sum(points ** (1 + int(METHODS[m].uses_density)) for m in methods) > budget:
        options["oversize"] = "sample"  # a budget below the smallest grid (2 points): a seeded subset
    base["space"] = {"methods": methods, "weight": {"per": "shared"}, "density": {"per": "shared"}}
    base["optimizer"] = {"name": "grid", "options": options}
    base["warm_start"] = False
    return base


def _ngopt_pcb(base: dict[str, Any], budget: int) -> dict[str, Any]:
    base["space"] = {"methods": ["pcb"], "weight": {"per": "task"}, "density": {"per": "shared"}}
    base["optimizer"] = {"name": "ngopt"}
    return base


def _cmaes_ties(base: dict[str, Any], budget: int) -> dict[str, Any]:
    granularity = base["space"].get("granularity", 1)
    base["space"] = {
        "methods": ["ties"],
        "weight": {"per": "group"},
        "density": {"per": "group"},
        "granularity": granularity,
    }
    base["optimizer"] = {"name": "cmaes"}
    return base


def _pymoo_ga_ties(base: dict[str, Any], budget: int) -> dict[str, Any]:
    """Mergenetic's protocol: a pymoo GA over each expert's TIES weight and density."""
    base["space"] = {"methods": ["ties"], "weight": {"per": "task"}, "density": {"per": "task"}}
    base["optimizer"] = {"name": "pymoo_ga", "options": {"pop_size": max(4, min(20, budget // 5))}}
    return base


def _random(base: dict[str, Any], budget: int) -> dict[str, Any]:
    base["optimizer"] = {"name": "random"}
    return base


PROTOCOLS: dict[str, tuple[str, Callable[[dict[str, Any], int], dict[str, Any]]]] = {
    "default": ("TPE, default space (text8 config)", _default),
    "grid": ("grid: TA + TIES, shared λ / density", _grid),
    "ngopt_pcb": ("NGOpt: PCB, per-task λ", _ngopt_pcb),
    "cmaes_ties": ("CMA-ES: TIES, per-group λ + density", _cmaes_ties),
    "pymoo_ga_ties": ("pymoo GA: TIES, per-task λ + density (Mergenetic)", _pymoo_ga_ties),
    "random": ("random, default space", _random),
}


def protocol_config(
    protocol: str, zoo: str, budget: int, seed: int, out: Path, autocast: str | None = None
) -> SearchConfig:
    base = yaml.safe_load(BASE_CONFIG.read_text())
    data = PROTOCOLS[protocol][1](copy.deepcopy(base), budget)
    if autocast is not None:
        data.setdefault("evaluation", {})["autocast"] = autocast
    data.update(
        name=f"search_quality-{protocol}",
        models={"zoo": zoo},
        budget={"candidates": budget},
        output=str(out / protocol),
        seed=seed,
    )
    data.pop("storage", None)  # default: <output>/search.journal
    return SearchConfig.model_validate(data)


# ---- running ------------------------------------------------------------------------------------
def comparable(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings that change the results: where candidates run (``execution``) does not, and an unset
    optimizer batch is the local executor's 1."""
    config = copy.deepcopy(settings.get("config") or {})
    config.pop("execution", None)
    optimizer = config.get("optimizer") or {}
    optimizer["batch_size"] = optimizer.get("batch_size") or 1
    return {**settings, "config": config}


def run_protocol(
    protocol: str, config: SearchConfig, settings: dict[str, Any], executor: Executor | None = None
) -> dict[str, Any]:
    """Run (or resume, or read back) one protocol; returns its summary dict and wall time.

    ``executor``: a worker already holding the zoo's models (benchmarks that run many searches on one zoo
    share it: loading 8 experts and scoring their references is paid once), else the search starts its own.
    """
    folder = config.output_dir
    stamp_path = folder / STAMP
    stamp = json.loads(stamp_path.read_text()) if stamp_path.exists() else None
    if stamp is not None:
        other = {k: stamp["settings"].get(k) for k in ("zoo", "seed", "config")}
        if comparable(other) != comparable({k: settings[k] for k in other}):
            raise SystemExit(
                f"{folder} holds a {protocol} run with other settings ({stamp['settings']}); "
                f"delete it or pass another --out"
            )
        summary_path = folder / "summary.json"
        if stamp.get("finished") and stamp["settings"].get("budget") == settings["budget"] and summary_path.exists():
            print(f"[{protocol}] finished earlier: reading {summary_path}")
            return {"summary": json.loads(summary_path.read_text()), "wall_s": stamp.get("wall_s"), "skipped": True}
        print(f"[{protocol}] resuming in {folder}")
    else:
        print(f"[{protocol}] starting in {folder}")
    folder.mkdir(parents=True, exist_ok=True)
    previous_wall = float(stamp.get("wall_s") or 0.0) if stamp else 0.0
    stamp_path.write_text(json.dumps({"settings": settings, "finished": False, "wall_s": previous_wall}, indent=2))
    started = time.perf_counter()
    loop = open_search(config, executor=executor)
    try:
        summary = loop.run()
    finally:
        loop.close()
    wall = previous_wall + time.perf_counter() - started
    stamp_path.write_text(json.dumps({"settings": settings, "finished": True, "wall_s": wall}, indent=2))
    print(f"[{protocol}] done in {wall:.1f} s")
    return {"summary": summary, "wall_s": wall, "skipped": False}


# ---- metrics ------------------------------------------------------------------------------------
def convergence(candidates: Sequence[dict[str, Any]], reach: float = REACH) -> tuple[float | None, int | None]:
    """(best mean normalised score, candidates needed to reach ``reach`` × that best) in trial-number order.

    Trials a killed run left mid-evaluation (failed as interrupted, then re-queued) are not candidates.
    """
    ordered = sorted(
        (c for c in candidates if not str(c.get("error") or "").startswith(INTERRUPTED)), key=lambda c: c["number"]
    )
    means = [c.get("mean_normalized") for c in ordered]
    finite = [m for m in means if m is not None and math.isfinite(m)]
    if not finite:
        return None, None
    best = max(finite)
    target = reach * best if best >= 0 else best / reach
    running = -math.inf
    for count, mean in enumerate(means, start=1):
        if mean is not None and math.isfinite(mean):
            running = max(running, mean)
        if running >= target:
            return best, count
    return best, None  # unreachable: the best itself reaches the target


def block_mean(chosen: dict[str, Any] | None, split: str) -> float | None:
    block = (chosen or {}).get(split) or {}
    return block.get("mean_normalized")


def row_of(protocol: str, result: dict[str, Any], folder: Path) -> dict[str, Any]:
    summary = result["summary"]
    meta = summary.get("meta", {})
    chosen = summary.get("chosen")
    candidates = json.loads((folder / "candidates.json").read_text())
    best, needed = convergence(candidates)
    return {
        "protocol": protocol,
        "optimizer": meta.get("optimizer", "?"),
        "candidates": meta.get("completed", len(candidates)),
        "method": (chosen or {}).get("method"),
        "search": block_mean(chosen, "search"),
        "heldout": block_mean(chosen, "heldout"),
        "test": block_mean(chosen, "test"),
        "best": best,
        "to99": needed,
        "overhead": meta.get("overhead_fraction"),
        "wall_s": result.get("wall_s"),
    }


# ---- the table ----------------------------------------------------------------------------------
COLUMNS = [
    ("protocol", "protocol"),
    ("method", "chosen"),
    ("search", "search"),
    ("heldout", "held-out"),
    ("test", "test"),
    ("best", "best search"),
    ("to99", "to 99%"),
    ("candidates", "cands"),
    ("overhead", "overhead"),
    ("wall_s", "wall"),
    ("optimizer", "optimizer"),
]


def fmt(key: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if key == "overhead":
        return f"{100 * value:.2f}%"
    if key == "wall_s":
        return f"{value / 60:.1f} min" if value >= 60 else f"{value:.0f} s"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def table_lines(rows: Sequence[dict[str, Any]], markdown: bool) -> list[str]:
    header = [title for _, title in COLUMNS]
    cells = [[fmt(key, row[key]) for key, _ in COLUMNS] for row in rows]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        return lines + ["| " + " | ".join(c.replace("|", "\\|") for c in line) + " |" for line in cells]
    widths = [max(len(h), *(len(line[i]) for line in cells)) for i, h in enumerate(header)]
    text = lambda parts: "  ".join(p.ljust(w) for p, w in zip(parts, widths, strict=True)).rstrip()  # noqa: E731
    return [text(header), text(["-" * w for w in widths])] + [text(line) for line in cells]


def write_markdown(path: Path, rows: Sequence[dict[str, Any]], args: argparse.Namespace, notes: list[str]) -> None:
    now = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    lines = [
        "# Search quality at equal budget",
        "",
        f"Zoo `{args.zoo}`, budget {args.budget} candidates per protocol, seed {args.seed}, {now}.",
        f"Command: `python benchmarks/search_quality.py --zoo {args.zoo} --budget {args.budget} --seed {args.seed} "
        f"--protocols {','.join(r['protocol'] for r in rows)}"
        + (f" --autocast {args.autocast}`" if args.autocast else "`"),
        "",
        "Scores are the chosen recipe's mean normalised accuracy (merged / expert, averaged over tasks) on the",
        "search validation split, the held-out validation split and the test split. *best search*: the best",
        "search mean of any candidate; *to 99%*: candidates (in trial order) until the best-so-far reached 99% of",
        "it; *cands*: candidates evaluated; *overhead*: the loop's own time per candidate over the evaluation time",
        "(target ≤ 5%). Protocols: see the docstring of `benchmarks/search_quality.py`.",
        "",
        *table_lines(rows, markdown=True),
        "",
        *notes,
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines).rstrip() + "\n")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zoo", default=DEFAULT_ZOO)
    parser.add_argument("--budget", type=int, default=100, help="candidates per protocol")
    parser.add_argument("--protocols", default=",".join(PROTOCOLS), help=f"comma list of {', '.join(PROTOCOLS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="default runs/search_quality[-<zoo>]")
    parser.add_argument(
        "--autocast",
        default=None,
        choices=["bfloat16"],
        help="evaluate under autocast (4.8x faster than float32 on text8 with AMX CPUs; see eval_speed.md)",
    )
    args = parser.parse_args(argv)
    protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
    unknown = sorted(set(protocols) - set(PROTOCOLS))
    if unknown or not protocols:
        parser.error(f"unknown protocol(s) {unknown}; choose from {', '.join(PROTOCOLS)}")
    if args.budget < 1:
        parser.error("--budget must be at least 1")
    out = args.out or Path("runs/search_quality" if args.zoo == DEFAULT_ZOO else f"runs/search_quality-{args.zoo}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

    started = time.perf_counter()
    rows, notes = [], []
    for protocol in protocols:
        config = protocol_config(protocol, args.zoo, args.budget, args.seed, out, args.autocast)
        settings = {
            "zoo": args.zoo,
            "budget": args.budget,
            "seed": args.seed,
            "config": config.model_dump(mode="json", exclude={"budget"}),
        }
        result = run_protocol(protocol, config, settings)
        rows.append(row_of(protocol, result, config.output_dir))
        if protocol == "grid":
            points = config.optimizer.options["points"]
            notes.append(f"grid: {points} points per axis (the largest grid within the budget).")
    print()
    for line in table_lines(rows, markdown=False):
        print(line)
    name = "search_quality.md" if args.zoo == DEFAULT_ZOO else f"search_quality-{args.zoo}.md"
    write_markdown(RESULTS / name, rows, args, notes)
    print(f"\nwritten {RESULTS / name}; total {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
