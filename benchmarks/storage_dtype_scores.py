"""How much a bfloat16 (or float16) store changes a search's scores, on a zoo.

Two workers over the same zoo: one with a float32 store (today's default), one with the store in
``--dtype``. Both score the same recipes on the search split: Task Arithmetic at several λ, and
TIES, DARE-TIES and PCB at several (λ, density) (beside a 16-bit store PCB also keeps its β in
bfloat16). Printed per recipe: the normalised mean of each store
and their difference; then the largest per-task difference of raw scores, and whether the ranking
of the recipes by normalised mean changed.

Usage: python benchmarks/storage_dtype_scores.py [--zoo tiny] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile

from mergetune.recipe import Expert, Recipe
from mergetune.search.config import SearchConfig
from mergetune.search.loop import resolve_models, worker_setup
from mergetune.search.worker import Worker

GRID = [
    ("task_arithmetic", 0.3, 1.0),
    ("task_arithmetic", 0.6, 1.0),
    ("task_arithmetic", 1.0, 1.0),
    ("ties", 0.6, 0.2),
    ("ties", 1.0, 0.5),
    ("ties", 1.4, 0.8),
    ("dare_ties", 0.8, 0.3),
    ("dare_ties", 1.2, 0.6),
    ("pcb", 1.0, 0.1),
    ("pcb", 1.0, 0.3),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", default="tiny")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    args = parser.parse_args()
    os.environ.setdefault("MERGETUNE_COMPILE", "0")
    out = tempfile.mkdtemp(prefix="storage-dtype-")
    config = SearchConfig.model_validate(
        {"name": "storage-dtype", "models": {"zoo": args.zoo}, "space": {"methods": ["ties"]}, "output": out}
    )
    models = resolve_models(config)
    setup = worker_setup(config, models)
    workers = {
        "float32": Worker(setup),
        args.dtype: Worker(dataclasses.replace(setup, storage_dtype=args.dtype)),
    }
    experts = [Expert(name=t, model=p) for t, p in models.experts.items()]
    means: dict[str, list[float]] = {name: [] for name in workers}
    worst_task = 0.0
    print(f"zoo {args.zoo}: normalised mean on the search split, float32 store vs {args.dtype} store")
    for method, weight, density in GRID:
        scores = {}
        for name, worker in workers.items():
            recipe = Recipe(
                base=models.base, experts=experts, method=method, weight=weight, density=density, storage_dtype=name
            )
            scores[name] = worker.evaluate(recipe)
            means[name].append(scores[name].mean_normalized)
        a, b = scores["float32"], scores[args.dtype]
        worst_task = max(worst_task, *(abs(a.scores[t] - b.scores[t]) for t in a.scores))
        print(
            f"  {method:16s} λ={weight:<4} density={density:<4} {a.mean_normalized:.4f} {b.mean_normalized:.4f} "
            f"diff {b.mean_normalized - a.mean_normalized:+.4f}"
        )
    diffs = [abs(x - y) for x, y in zip(means["float32"], means[args.dtype], strict=True)]
    rank = lambda values: sorted(range(len(values)), key=lambda i: -values[i])  # noqa: E731
    same_ranking = rank(means["float32"]) == rank(means[args.dtype])
    print(
        f"largest |diff| of the normalised mean {max(diffs):.4f} (mean {sum(diffs) / len(diffs):.4f}); "
        f"largest |diff| of a task's raw score {worst_task:.4f}; "
        f"ranking of the {len(GRID)} recipes {'unchanged' if same_ranking else 'CHANGED'}"
    )


if __name__ == "__main__":
    main()
