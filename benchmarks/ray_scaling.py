"""Ray scaling: candidates per minute with the LocalExecutor, 1 Ray worker and 2 Ray workers.

The same seeded candidates (random points of the text4 demo space: Task Arithmetic, TIES and PCB,
one λ per task, one density) run through each executor in one process. Each worker first merges
and scores one candidate of every method (kernels compiled, statistics precomputed: the steady
state of a long search), then the timed candidates run with every slot kept busy, as the search
loop does. Reported per executor:

- start-up: creating the executor (loading models and data on every worker; Ray: the runtime);
- candidates per minute in steady state and the speed-up over one Ray worker;
- Ray's overhead per candidate: from ``submit`` to the result back in the driver, less the
  worker's own merge + evaluation time (targets: ≤ 50 ms or ≤ 2% of the evaluation time);
- merge and evaluation seconds per candidate (as measured inside the worker).

Targets on the 2-core machine: 2 workers ≥ 1.7× one worker. Each worker uses one torch thread.
Run from the repository root (builds the text4 zoo on first use):
    python benchmarks/ray_scaling.py [--zoo text4] [--candidates 24] [--device cpu]
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import optuna
import yaml

from mergetune.recipe import Recipe
from mergetune.search.config import SearchConfig
from mergetune.search.executor import Executor, JobResult, LocalExecutor
from mergetune.search.loop import build_space, resolve_models, worker_setup
from mergetune.search.ray_executor import RayExecutor, RayOptions
from mergetune.search.space import SearchSpace
from mergetune.search.worker import WorkerSetup

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def seeded_candidates(space: SearchSpace, n: int, seed: int) -> list[Recipe]:
    """``n`` random recipes of the space, the same for every executor."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    recipes = []
    for _ in range(n):
        trial = study.ask()
        recipes.append(space.to_recipe(space.suggest(trial)))
        study.tell(trial, 0.0)
    return recipes


def one_per_method(space: SearchSpace, seed: int) -> list[Recipe]:
    pool = seeded_candidates(space, 20 * len(space.methods), seed)
    return [next(r for r in pool if r.method == method) for method in space.methods]


def warm_up(executor: Executor, samples: Sequence[Recipe]) -> None:
    """Every worker merges one candidate of each method: submitted as a batch of one per slot, all
    slots idle, so each worker gets one of them."""
    for sample in samples:
        for job in range(executor.slots):
            executor.submit(-1 - job, sample)
        done = 0
        while done < executor.slots:
            done += len(executor.results())


def run_steady(executor: Executor, recipes: Sequence[Recipe]) -> tuple[float, list[JobResult]]:
    """Keep every slot busy until all recipes are done; returns wall seconds and the results."""
    queue = list(enumerate(recipes))
    results: list[JobResult] = []
    in_flight = 0
    start = time.perf_counter()
    while queue or in_flight:
        while queue and in_flight < executor.slots:
            executor.submit(*queue.pop(0))
            in_flight += 1
        finished = executor.results()
        in_flight -= len(finished)
        results += finished
    return time.perf_counter() - start, results


def measure(
    name: str, make: Callable[[], Executor], samples: Sequence[Recipe], recipes: Sequence[Recipe]
) -> dict[str, Any]:
    print(f"[{name}] starting ...", flush=True)
    started = time.perf_counter()
    executor = make()
    startup = time.perf_counter() - started
    workers = executor.slots
    try:
        warm_up(executor, samples)
        wall, results = run_steady(executor, recipes)
    finally:
        executor.close()
    failed = [r for r in results if r.evaluation is None]
    if failed:
        raise SystemExit(f"[{name}] {len(failed)} candidate(s) failed: {failed[0].error}")
    evaluations = [r.evaluation for r in results if r.evaluation is not None]
    merge = statistics.mean(e.merge_seconds for e in evaluations)
    evaluate = statistics.mean(e.eval_seconds for e in evaluations)
    overhead = statistics.mean(r.queued_seconds for r in results)
    row = {
        "executor": name,
        "workers": workers,
        "startup_s": startup,
        "per_minute": 60 * len(results) / wall,
        "merge_s": merge,
        "eval_s": evaluate,
        "overhead_ms": 1e3 * overhead,
        "overhead_pct": 100 * overhead / (merge + evaluate),
    }
    print(f"[{name}] {row['per_minute']:.1f} candidates/min, overhead {row['overhead_ms']:.1f} ms", flush=True)
    return row


def table(rows: Sequence[dict[str, Any]]) -> list[str]:
    one = next((r for r in rows if r["executor"] == "ray-1"), rows[0])
    lines = [
        "| executor | workers | start-up s | candidates/min | speed-up vs 1 Ray worker | merge s | eval s | "
        "Ray overhead ms (% of merge+eval) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        over = "-" if r["executor"] == "local" else f"{r['overhead_ms']:.1f} ({r['overhead_pct']:.2f}%)"
        lines.append(
            f"| {r['executor']} | {r['workers']} | {r['startup_s']:.1f} | {r['per_minute']:.1f} | "
            f"{r['per_minute'] / one['per_minute']:.2f}x | {r['merge_s']:.3f} | {r['eval_s']:.2f} | {over} |"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zoo", default="text4")
    parser.add_argument("--candidates", type=int, default=24, help="timed candidates per executor")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--autocast", default="none", choices=["none", "bfloat16"], help="evaluation.autocast")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modes", default="local,ray-1,ray-2")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

    data = yaml.safe_load((ROOT / "configs" / "text4.yaml").read_text())
    data.update(models={"zoo": args.zoo}, output="runs/ray_scaling")
    data.setdefault("evaluation", {}).update(device=args.device, autocast=args.autocast)
    config = SearchConfig.model_validate(data)
    models = resolve_models(config)
    setup: WorkerSetup = worker_setup(config, models)
    space = build_space(config, models)
    recipes = seeded_candidates(space, args.candidates, args.seed)
    samples = one_per_method(space, args.seed + 1)
    makers: dict[str, Callable[[], Executor]] = {
        "local": lambda: LocalExecutor(setup),
        "ray-1": lambda: RayExecutor(setup, RayOptions(workers=1)),
        "ray-2": lambda: RayExecutor(setup, RayOptions(workers=2)),
    }
    rows = [measure(m, makers[m], samples, recipes) for m in args.modes.split(",")]
    lines = table(rows)
    print("\n" + "\n".join(lines))
    now = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    header = [
        "# Ray scaling",
        "",
        f"Zoo `{args.zoo}`, {args.candidates} timed candidates per executor (seeded random points of the text4 "
        f"demo space), device {args.device}, autocast {args.autocast}, one torch thread per worker, {now}.",
        f"Command: `python benchmarks/ray_scaling.py --zoo {args.zoo} --candidates {args.candidates} "
        f"--device {args.device} --autocast {args.autocast}`",
        "",
    ]
    path = RESULTS / ("ray_scaling.md" if args.autocast == "none" else f"ray_scaling-{args.autocast}.md")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([*header, *lines]) + "\n")
    print(f"written {path}")


if __name__ == "__main__":
    main()
