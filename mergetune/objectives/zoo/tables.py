"""Rich tables of the zoos: one zoo's measurements after a build, and the registry with its cache state."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from rich.table import Table

from mergetune.objectives.zoo.cache import is_built
from mergetune.objectives.zoo.results import ExpertResult, Zoo
from mergetune.objectives.zoo.specs import ZOOS, available_zoos, resolve_cache_dir


def results_table(zoo: Zoo) -> Table:
    """Per expert: validation score, the base's (with the same head), the gain, test score, time.

    An encoder zoo's scores are accuracies; a causal-LM zoo's are each task's primary metric, named
    in a ``metric`` column: accuracy, or ``neg_loss`` (minus the loss per token). The "mean" row
    averages the scores only when every task has the same metric: a mean of losses and accuracies
    means nothing.
    """
    causal = zoo.spec.causal
    title = (
        "validation score (its task's metric) of each expert and of the base"
        if causal
        else "validation accuracy of each expert and of the base with its head"
    )
    table = Table(title=f"zoo {zoo.name}: {title}")
    metric = ["metric"] if causal else []
    for column in ("task", *metric, "train", "val", "expert", "base" if causal else "base+head", "gain", "test"):
        table.add_column(column, justify="left" if column in ("task", "metric") else "right")
    table.add_column("secs", justify="right")
    table.add_column("")
    for task, r in zoo.results.items():
        state = "built" if task in zoo.trained else "cached"
        table.add_row(task, *([r.metric] if causal else []), *_result_cells(r), state)
    results = list(zoo.results.values())
    table.add_section()
    seconds = f"{sum(r.build_seconds for r in results):.0f}"
    shown = [results[0].metric] if causal else []
    if len({r.metric for r in results}) == 1:
        table.add_row(
            "mean",
            *shown,
            "",
            "",
            _mean_cell([r.validation_accuracy for r in results]),
            _mean_cell([r.base_head_validation_accuracy for r in results]),
            f"{np.mean([r.gain for r in results]):+.3f}",
            _mean_cell([r.test_accuracy for r in results]),
            seconds,
            "",
        )
    else:
        table.add_row("total", *[""] * (len(table.columns) - 3), seconds, "")
    return table


def _result_cells(r: ExpertResult) -> list[str]:
    return [
        str(r.train_size),
        str(r.validation_size),
        f"{r.validation_accuracy:.3f}",
        f"{r.base_head_validation_accuracy:.3f}",
        f"{r.gain:+.3f}",
        f"{r.test_accuracy:.3f}",
        f"{r.build_seconds:.0f}",
    ]


def _mean_cell(values: list[float]) -> str:
    return f"{np.mean(values):.3f}"


def zoos_table(cache_dir: str | Path | None = None) -> Table:
    """The registered zoos, their tasks and how many of their experts are built in the cache."""
    table = Table("zoo", "base", "tasks", "train", "built", caption=f"cache: {resolve_cache_dir(cache_dir) / 'zoo'}")
    for name in available_zoos():
        spec = ZOOS[name]
        folder = spec.folder(cache_dir)
        done = sum(is_built(folder / t.name, spec.cache_key()) for t in spec.tasks)
        base = spec.base if isinstance(spec.base, str) else f"random {'Llama' if spec.causal else 'BERT'}"
        sizes = "/".join(sorted({str(t.train_size) for t in spec.tasks}))
        table.add_row(name, base, ", ".join(t.name for t in spec.tasks), sizes, f"{done}/{len(spec.tasks)}")
    return table
