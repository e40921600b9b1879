"""Search quality at equal budget: the default optimizer against the papers' tuning protocols.

Every protocol is its own search (a ``SearchConfig``) on the same zoo, with the same objectives,
floors, selection rule and candidate budget (default 100); objectives, floors, selection and the
default space come from ``configs/text8.yaml`` whatever the zoo (only ``models.zoo`` is replaced):

- ``default``: the text8 config as is: TPE over tsv / ties / pcb / task_arithmetic with one λ per
  task and one shared density (the default since stop 21, chosen from the measurements in
  ``benchmarks/results/search_quality.md`` and ``methods_text8.md``).
- ``racing``: the default with multi-fidelity racing on (``evaluation.fidelity.enabled``): the same
  search, hopeless candidates stopped on a slice of the examples; it measures what racing saves.
  ``racing_mean``: the same with the mean alone as the objective, so the pooled test decides.
- ``per_group``: the default until stop 21: TPE over task_arithmetic / ties / dare_ties / pcb /
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
- ``mergekit_evolve`` (causal-LM zoos; not in the default list): mergekit-evolve itself, run as a
  subprocess at the same number of evaluations, its merge scored by mergetune on the same splits
  (``benchmarks/evolve_peer.py`` says how tasks, weights and the genome map and how it runs on CPU).

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

Several seeds (``--seeds 0,1,2``; each seed in ``<out>/seed<N>/``, resumable like one): the results
add a protocol × seed table of test scores, the mean ± sd over seeds of the held-out and test scores
and of the cost to the chosen recipe (candidates, merge + evaluation time, and validation examples
where racing counted them, spent up to the trial that was chosen), and a paired bootstrap between
the default and the best peer (highest mean test): per seed, the difference of the two chosen
recipes' mean normalised test score, resampling each task's test examples with the same indices
for both (``test_examples.json``, written by finalisation), with its 95% interval.

The table is printed and written to ``benchmarks/results/search_quality.md`` (for another zoo:
``search_quality-<zoo>.md``) with the zoo, the budget, the seed and the date.

Run from the repository root (the zoo cache is ``.cache/`` unless ``$MERGETUNE_CACHE``):
    python benchmarks/search_quality.py [--zoo text8] [--budget 100] [--protocols default,grid] [--seed 0]
    python benchmarks/search_quality.py --budget 50 --seeds 0,1,2 --protocols default,ngopt_pcb,random
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

import numpy as np
import optuna
import yaml
from evolve_peer import PROTOCOL as EVOLVE
from evolve_peer import TITLE as EVOLVE_TITLE
from evolve_peer import evolve_row

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


def _racing(base: dict[str, Any], budget: int) -> dict[str, Any]:
    """The default with multi-fidelity racing on (``evaluation.fidelity``): what turning it on saves."""
    base.setdefault("evaluation", {})["fidelity"] = {"enabled": True}
    return base


def _racing_mean(base: dict[str, Any], budget: int) -> dict[str, Any]:
    """Racing with its pooled rule: the mean alone as the objective (no worst task, no floors)."""
    base["objectives"] = {"optimize": ["mean"], "worst_weight": 0}
    return _racing(base, budget)


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


def _per_group(base: dict[str, Any], budget: int) -> dict[str, Any]:
    """The previous default space: five methods, λ per task × layer group through 3 depth anchors,
    density per task (153 parameters on text8); it fitted the search split's noise (issue 15)."""
    base["space"] = {
        "methods": ["task_arithmetic", "ties", "dare_ties", "pcb", "breadcrumbs"],
        "weight": {"per": "task_group", "anchors": 3},
        "density": {"per": "task"},
        "granularity": 2,
    }
    return base


def _random(base: dict[str, Any], budget: int) -> dict[str, Any]:
    base["optimizer"] = {"name": "random"}
    return base


PROTOCOLS: dict[str, tuple[str, Callable[[dict[str, Any], int], dict[str, Any]]]] = {
    "default": ("TPE, default space (text8 config): 4 methods, λ per task, shared density", _default),
    "racing": ("the default with multi-fidelity racing (Wilcoxon, slices 1/8 .. 1)", _racing),
    "racing_mean": ("racing on the mean alone (pooled Wilcoxon test; no worst, no floors)", _racing_mean),
    "per_group": ("TPE, 5 methods, λ per task × group (3 anchors), density per task (previous default)", _per_group),
    "grid": ("grid: TA + TIES, shared λ / density", _grid),
    "ngopt_pcb": ("NGOpt: PCB, per-task λ", _ngopt_pcb),
    "cmaes_ties": ("CMA-ES: TIES, per-group λ + density", _cmaes_ties),
    "pymoo_ga_ties": ("pymoo GA: TIES, per-task λ + density (Mergenetic)", _pymoo_ga_ties),
    "random": ("random, default space", _random),
    # Not a mergetune search: main() hands it to evolve_peer, which reads zoo, tasks, splits and seed from this config.
    EVOLVE: (EVOLVE_TITLE, _default),
}
DEFAULT_PROTOCOLS = [p for p in PROTOCOLS if p != EVOLVE]  # mergekit-evolve needs a causal-LM zoo


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
        **cost_to_chosen(candidates, chosen_number(summary)),
        "summary": summary,
    }


# ---- statistics over seeds ----------------------------------------------------------------------
TEST_EXAMPLES = "test_examples.json"  # the chosen recipe's per-example test outcomes (search.finalize)
RESAMPLES = 2000


def mean_sd(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof 1) of the finite values; sd None under two values."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return None, None
    return float(np.mean(finite)), float(np.std(finite, ddof=1)) if len(finite) > 1 else None


def paired_bootstrap(
    a: dict[str, Sequence[float]],
    b: dict[str, Sequence[float]],
    scale: dict[str, float],
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(observed, 2.5%, 97.5%) of mean normalised score a − b over a bootstrap of the test examples.

    Each resample draws every task's examples with replacement, the same indices for both runs (a
    paired comparison: both chosen recipes scored the same examples); the task difference is
    ``scale[task]`` × (mean of a − mean of b) on those examples, then averaged over tasks, as the mean
    normalised score is. ``scale`` is the task's normalisation slope (1 / expert score for
    ``merged / expert``).
    """
    tasks = sorted(scale)
    rng = np.random.default_rng(seed)
    observed, draws = 0.0, np.zeros(resamples)
    for task in tasks:
        x, y = np.asarray(a[task], dtype=float), np.asarray(b[task], dtype=float)
        if x.shape != y.shape:
            raise ValueError(f"task {task}: {x.size} vs {y.size} test examples; the runs scored different test sets")
        diff = scale[task] * (x - y)
        observed += diff.mean() / len(tasks)
        idx = rng.integers(0, diff.size, size=(resamples, diff.size))
        draws += diff[idx].mean(axis=1) / len(tasks)
    low, high = np.quantile(draws, [0.025, 0.975])
    return float(observed), float(low), float(high)


# d(normalised score) / d(score) of the normalisations that are affine in the score, from the task's
# test references (expert, base); a bootstrap of score differences times this slope is exact for them
AFFINE_SLOPES: dict[str, Callable[[float, float | None], float | None]] = {
    "merged/expert": lambda expert, base: 1.0 / expert,
    "gain_kept": lambda expert, base: 1.0 / (expert - base) if expert != base else None,  # negated losses
    "merged/base": lambda expert, base: 1.0 / base if base else None,
}
LOSS_RULES = ("gain_kept", "perplexity/base", "base/merged")


def test_values(folder: Path, summary: dict[str, Any]) -> dict[str, list[float]]:
    """The chosen recipe's per-example test outcomes in its score's units: each task's values average to its score.

    Runs before the file was written in score units kept a token-weighted loss's per-example sums: for a
    loss task (the summary's normalisation says so) they are rescaled by score / mean, the evaluator's
    ``example_scale``. Any other mismatch (a metric that is not a mean of per-example values, such as
    macro-F1, or a file from another run) is an error.
    """
    path = folder / TEST_EXAMPLES
    if not path.exists():
        raise SystemExit(f"{path} missing: the run predates per-example test outcomes; delete {folder} and rerun")
    examples = json.loads(path.read_text())
    scores = ((summary.get("chosen") or {}).get("test") or {}).get("scores") or {}
    rules = {t: n.get("rule") for t, n in ((summary.get("meta") or {}).get("normalization") or {}).items()}
    out = {}
    for task, values in examples.items():
        score, mean = scores.get(task), float(np.mean(values))
        if score is None:
            continue
        if abs(mean - score) <= 1e-6 * max(1.0, abs(score)):
            out[task] = values
        elif rules.get(task) in LOSS_RULES and mean * score > 0:
            out[task] = [v * score / mean for v in values]
        else:
            raise SystemExit(f"{path}: task {task}'s per-example mean {mean} is not its score {score} (not a mean)")
    return out


def score_slopes(summary: dict[str, Any]) -> dict[str, float]:
    """Per task, the slope of its normalised test score in its score (``AFFINE_SLOPES``), from the summary's
    normalisation rules and test references. A task normalised otherwise (a perplexity ratio) is an error."""
    meta = summary.get("meta") or {}
    slopes = {}
    for task in ((summary.get("chosen") or {}).get("test") or {}).get("normalized") or {}:
        rule = (meta.get("normalization") or {}).get(task, {}).get("rule")
        if rule not in AFFINE_SLOPES:
            raise SystemExit(f"task {task}: normalisation '{rule}' is not affine in the score; no paired bootstrap")
        expert = (meta.get("references") or {}).get(task, {}).get("test")
        base = (meta.get("base_references") or {}).get(task, {}).get("test")
        slope = AFFINE_SLOPES[rule](expert, base) if expert else None
        if slope:  # a zero reference leaves the slope undefined: the task is left out of the test
            slopes[task] = slope
    return slopes


def cost_to_chosen(candidates: Sequence[dict[str, Any]], chosen: int | None) -> dict[str, Any]:
    """Candidates, evaluation wall time and validation examples spent until the chosen recipe was evaluated.

    The search can report the chosen recipe's test score only once it has evaluated it: what it spent
    up to that trial (in trial order, interrupted trials left out) is its cost to reach that score.
    Examples are counted from the fidelity records (racing on); None when a candidate has none.
    """
    if chosen is None:
        return {"cands_to": None, "wall_to": None, "examples_to": None}
    spent = [
        c
        for c in candidates
        if c["number"] <= chosen and not str(c.get("error") or "").startswith(INTERRUPTED) and c.get("timing")
    ]
    examples = [sum(((c.get("fidelity") or {}).get("examples") or {}).values()) or None for c in spent]
    return {
        "cands_to": len(spent),
        "wall_to": sum(c["timing"].get("merge", 0) + c["timing"].get("eval", 0) for c in spent),
        "examples_to": None if any(e is None for e in examples) else sum(examples),
    }


def chosen_number(summary: dict[str, Any]) -> int | None:
    return next((f["trial"] for f in summary.get("finalists", []) if f.get("chosen")), None)


def seed_summary(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per protocol, mean ± sd over seeds of held-out and test scores and of the cost to the chosen recipe."""
    out = []
    for protocol in dict.fromkeys(r["protocol"] for r in rows):
        mine = [r for r in rows if r["protocol"] == protocol]
        entry: dict[str, Any] = {"protocol": protocol, "seeds": len(mine)}
        for key in ("heldout", "test", "cands_to", "wall_to", "examples_to"):
            entry[key] = mean_sd([r.get(key) for r in mine])
        out.append(entry)
    return out


def best_peer(summary: Sequence[dict[str, Any]], default: str = "default") -> str | None:
    """The protocol other than ``default`` with the highest mean test score over seeds."""
    peers = [s for s in summary if s["protocol"] != default and s["test"][0] is not None]
    return max(peers, key=lambda s: s["test"][0])["protocol"] if peers else None


def pm(value: tuple[float | None, float | None], digits: int = 4) -> str:
    mean, sd = value
    if mean is None:
        return "–"
    return f"{mean:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None else "")


def statistics_lines(rows: Sequence[dict[str, Any]], folders: dict[tuple[str, int], Path]) -> list[str]:
    """Markdown: protocol × seed, mean ± sd, and the paired bootstrap of default against the best peer."""
    seeds = sorted({r["seed"] for r in rows})
    by = {(r["protocol"], r["seed"]): r for r in rows}
    protocols = list(dict.fromkeys(r["protocol"] for r in rows))
    lines = ["## Test score, protocol × seed", "", "| protocol | " + " | ".join(f"seed {s}" for s in seeds) + " |"]
    lines.append("|---" * (len(seeds) + 1) + "|")
    for protocol in protocols:
        cells = [fmt("test", by[(protocol, s)]["test"]) if (protocol, s) in by else "–" for s in seeds]
        lines.append(f"| {protocol} | " + " | ".join(cells) + " |")
    summary = seed_summary(rows)
    lines += ["", "## Mean ± sd over seeds", ""]
    lines += ["| protocol | seeds | held-out | test | cands to chosen | eval time to chosen | examples to chosen |"]
    lines += ["|---|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(
            f"| {s['protocol']} | {s['seeds']} | {pm(s['heldout'])} | {pm(s['test'])} | {pm(s['cands_to'], 1)} | "
            f"{pm(s['wall_to'], 0)} s | {pm(s['examples_to'], 0)} |"
        )
    peer = best_peer(summary)
    if "default" in protocols and peer is not None:
        # the best peer first (the comparison), then every other peer: a tie with the best peer
        # (the same chosen recipe) says nothing about the others
        ranked = sorted((s for s in summary if s["protocol"] != "default"), key=lambda s: -(s["test"][0] or -1e9))
        for other in [peer, *[s["protocol"] for s in ranked if s["protocol"] != peer]]:
            lines += bootstrap_lines(other, other == peer, seeds, by, folders)
    return lines


def bootstrap_lines(
    peer: str, best: bool, seeds: Sequence[int], by: dict[tuple[str, int], dict[str, Any]], folders: dict
) -> list[str]:
    """Markdown: per seed, the paired bootstrap of default − ``peer`` on the test examples."""
    title = f"default − {peer}" + (" (the best peer by mean test score)" if best else "")
    lines = ["", f"## Paired bootstrap: {title}, test, {RESAMPLES} resamples of the test examples", ""]
    lines += ["| seed | difference | 95% interval | significant |", "|---|---|---|---|"]
    for seed in seeds:
        if ("default", seed) not in folders or (peer, seed) not in folders:
            continue
        a = test_values(folders[("default", seed)], by[("default", seed)]["summary"])
        b = test_values(folders[(peer, seed)], by[(peer, seed)]["summary"])
        # both scored the same test examples against the same references: the default's slopes serve both
        slopes = score_slopes(by[("default", seed)]["summary"])
        scale = {t: v for t, v in slopes.items() if t in a and t in b}
        diff, low, high = paired_bootstrap(a, b, scale, seed=seed)
        verdict = "default better" if low > 0 else f"{peer} better" if high < 0 else "no"
        lines.append(f"| {seed} | {diff:+.4f} | [{low:+.4f}, {high:+.4f}] | {verdict} |")
    return lines


# ---- the table ----------------------------------------------------------------------------------
COLUMNS = [
    ("protocol", "protocol"),
    ("seed", "seed"),
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
        f"Zoo `{args.zoo}`, budget {args.budget} candidates per protocol, seed(s) {args.seeds or args.seed}, {now}.",
        f"Command: `python benchmarks/search_quality.py --zoo {args.zoo} --budget {args.budget} "
        + (f"--seeds {args.seeds} " if args.seeds else f"--seed {args.seed} ")
        + f"--protocols {','.join(dict.fromkeys(r['protocol'] for r in rows))}"
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
    parser.add_argument(
        "--protocols", default=",".join(DEFAULT_PROTOCOLS), help=f"comma list of {', '.join(PROTOCOLS)}"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--seeds", default=None, help="comma list of seeds (each in <out>/seed<N>/): adds the statistics over seeds"
    )
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
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [args.seed]
    rows, notes, folders = [], [], {}
    for seed in seeds:
        for protocol in protocols:
            where = out / f"seed{seed}" if args.seeds else out
            config = protocol_config(protocol, args.zoo, args.budget, seed, where, args.autocast)
            settings = {
                "zoo": args.zoo,
                "budget": args.budget,
                "seed": seed,
                "config": config.model_dump(mode="json", exclude={"budget"}),
            }
            if protocol == EVOLVE:  # not a mergetune search: its own runner, the same per-example test outcomes
                rows.append({"seed": seed, **evolve_row(config, args.budget, settings)})
                folders[(protocol, seed)] = config.output_dir
                continue
            result = run_protocol(protocol, config, settings)
            rows.append({"seed": seed, **row_of(protocol, result, config.output_dir)})
            folders[(protocol, seed)] = config.output_dir
            if protocol == "grid" and seed == seeds[0]:
                points = config.optimizer.options["points"]
                notes.append(f"grid: {points} points per axis (the largest grid within the budget).")
    print()
    for line in table_lines(rows, markdown=False):
        print(line)
    if args.seeds:
        notes = [*statistics_lines(rows, folders), "", *notes]
        print("\n".join(notes))
    name = "search_quality.md" if args.zoo == DEFAULT_ZOO else f"search_quality-{args.zoo}.md"
    write_markdown(RESULTS / name, rows, args, notes)
    print(f"\nwritten {RESULTS / name}; total {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
