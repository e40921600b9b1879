"""Multi-fidelity evaluation on the tiny zoo: time and examples saved against the change in the final result.

The same search (``configs/tiny.yaml``'s space: TA and TIES, λ per task, TPE, seed 0; ``--candidates``
candidates, default 30) is run with ``evaluation.fidelity`` off, and on with the default slices
(1/8, 1/4, 1/2, all) and ``p_threshold`` 0.05, for each objective setting:

- ``mean+worst``: the default objectives (a Pareto search: a candidate is stopped only when it is worse
  with confidence on every task);
- ``mean``: the mean normalised score alone (the pooled test against the best mean).

Printed per run: wall seconds of the search loop (zoo cached, models loaded once per run, the same for
all), candidates stopped early, validation examples scored against full evaluation, the best mean
normalised score on the search split, and the chosen recipe's held-out and test mean. Results go to
``benchmarks/results/fidelity.md``. Run: ``python benchmarks/fidelity.py [--candidates N]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from mergetune.search.config import SearchConfig
from mergetune.search.loop import open_search

OBJECTIVES = {"mean+worst": {}, "mean": {"optimize": ["mean"], "worst_weight": 0.0}}


def run(folder: Path, candidates: int, objectives: dict[str, Any], fidelity: bool) -> dict[str, Any]:
    config = {
        "name": "fidelity-bench",
        "models": {"zoo": "tiny"},
        "space": {"methods": ["task_arithmetic", "ties"], "weight": {"per": "task"}},
        "optimizer": {"name": "tpe"},
        "budget": {"candidates": candidates},
        "selection": {"rescore_top": 3},
        "objectives": objectives,
        "evaluation": {"fidelity": {"enabled": fidelity}},
        "seed": 0,
        "output": str(folder / "run"),
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    loop = open_search(SearchConfig.load(path))
    try:
        start = time.perf_counter()
        summary = loop.run()
        seconds = time.perf_counter() - start
    finally:
        loop.close()
    meta = summary["meta"]
    chosen = summary["chosen"] or {}
    best = max(f["search"]["mean"] for f in summary["finalists"])
    examples = meta.get("fidelity", {})
    return {
        "seconds": seconds,
        "stopped": examples.get("stopped_early", 0),
        "scored": examples.get("examples_scored"),
        "full": examples.get("examples_full"),
        "best_search_mean": best,
        "heldout_mean": (chosen.get("heldout") or {}).get("mean_normalized"),
        "test_mean": (chosen.get("test") or {}).get("mean_normalized"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=30)
    args = parser.parse_args()
    os.environ.setdefault("MERGETUNE_COMPILE", "0")
    rows = []
    for label, objectives in OBJECTIVES.items():
        for fidelity in (False, True):
            folder = Path(tempfile.mkdtemp(prefix="fidelity-bench-"))
            try:
                result = run(folder, args.candidates, objectives, fidelity)
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            rows.append((label, "on" if fidelity else "off", result))
            print(label, "fidelity", "on" if fidelity else "off", result, flush=True)
    lines = [
        f"# Multi-fidelity on the tiny zoo ({args.candidates} candidates, TPE, seed 0)",
        "",
        "| objectives | fidelity | loop s | stopped | examples scored / full | best search mean | held-out | test |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, fidelity, r in rows:
        scored = f"{r['scored']} / {r['full']}" if r["scored"] is not None else "all"
        lines.append(
            f"| {label} | {fidelity} | {r['seconds']:.1f} | {r['stopped']} | {scored} | "
            f"{r['best_search_mean']:.4f} | {r['heldout_mean']:.4f} | {r['test_mean']:.4f} |"
        )
    out = Path(__file__).parent / "results" / "fidelity.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
