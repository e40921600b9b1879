"""The report's figures (matplotlib, Agg backend: no display needed). Each returns a Figure, or None.

Colours are fixed per role on every figure: grey = every completed candidate, blue = the per-task
Pareto set, orange = the optimised front, red star = the chosen recipe, green triangle = a
baseline (the papers' default the search started from); each task's reference sits at normalised
score 1 (the expert, or the base for a guard task: see the report's normalisation table), and axes
fit the data (a loss task's share of the gain can be negative).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mergetune.export.report_data import Candidate, RunData, best_so_far

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

Value = Callable[[Candidate], float]

GREY, BLUE, ORANGE, RED, GREEN = "#b9b9b9", "#3b75af", "#ef8636", "#c03d3e", "#519e3e"


def _pyplot():
    # late: matplotlib is heavy and only the report needs it; Agg must be chosen before pyplot loads
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Figure, path: Path) -> bytes:
    """Write the figure as PNG and return its bytes (for embedding)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


def _roles(data: RunData) -> tuple[list[Candidate], list[Candidate], list[Candidate], Candidate | None]:
    """(per-task Pareto set, optimised front, baselines, chosen)."""
    chosen_trial = (data.summary.get("chosen") or {}).get("trial")
    chosen = next((c for c in data.candidates if c.number == chosen_trial), None)
    return (
        data.by_number(data.summary.get("front_per_task") or []),
        data.by_number(data.summary.get("front") or []),
        [c for c in data.candidates if c.warm_start],
        chosen,
    )


def _scatter_roles(ax: Axes, data: RunData, x: Value, y: Value) -> None:
    """Every candidate, coloured by role, at (x(c), y(c))."""
    per_task, front, baselines, chosen = _roles(data)
    ax.scatter([x(c) for c in data.candidates], [y(c) for c in data.candidates], s=12, c=GREY, label="candidate")
    ax.scatter([x(c) for c in per_task], [y(c) for c in per_task], s=18, c=BLUE, label="per-task Pareto set")
    ax.scatter([x(c) for c in front], [y(c) for c in front], s=34, c=ORANGE, label="optimised front", zorder=3)
    if baselines:
        ax.scatter(
            [x(c) for c in baselines], [y(c) for c in baselines], s=60, marker="^", c=GREEN, label="baseline", zorder=4
        )
    if chosen is not None:
        ax.scatter([x(chosen)], [y(chosen)], s=200, marker="*", c=RED, label="chosen", zorder=5)


def frontier(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The non-dominated points (both coordinates maximised), by increasing x."""
    best_y, out = -math.inf, []
    for x, y in sorted(points, key=lambda p: (-p[0], -p[1])):
        if y > best_y:
            out.append((x, y))
            best_y = y
    return sorted(out)


def objectives_front(data: RunData) -> Figure | None:
    """Mean against worst normalised score (the default objectives) of every candidate."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    _scatter_roles(ax, data, lambda c: c.mean, lambda c: c.worst)
    line = frontier([(c.mean, c.worst) for c in data.candidates if c.feasible])
    ax.plot(*zip(*line, strict=True), drawstyle="steps-post", c=ORANGE, lw=1, alpha=0.7)
    ax.set_xlabel("mean normalised score (1 = each task's reference)")
    ax.set_ylabel("worst task's normalised score")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    return fig


def task_pairs(data: RunData, pairs: Sequence[tuple[str, str]]) -> Figure | None:
    """One panel per task pair: normalised scores, the pair's 2-D frontier, the experts' level (1, 1)."""
    if not pairs:
        return None
    plt = _pyplot()
    cols = min(3, len(pairs))
    rows = math.ceil(len(pairs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.8 * rows), squeeze=False)
    for ax, (a, b) in zip(axes.ravel(), pairs, strict=False):
        _scatter_roles(ax, data, lambda c, a=a: c.normalized.get(a, np.nan), lambda c, b=b: c.normalized.get(b, np.nan))
        line = frontier(
            [(c.normalized[a], c.normalized[b]) for c in data.candidates if a in c.normalized and b in c.normalized]
        )
        ax.plot(*zip(*line, strict=True), drawstyle="steps-post", c=BLUE, lw=1, alpha=0.7)
        ax.axvline(1.0, c="k", lw=0.6, ls=":")
        ax.axhline(1.0, c="k", lw=0.6, ls=":")
        ax.set_xlabel(f"{a} (normalised)")
        ax.set_ylabel(f"{b} (normalised)")
        ax.grid(alpha=0.3)
    for ax in axes.ravel()[len(pairs) :]:
        ax.axis("off")
    axes.ravel()[0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return fig


def parallel(data: RunData) -> Figure | None:
    """Every candidate as a line over the tasks' normalised scores (and the mean)."""
    plt = _pyplot()
    axes_names = [*data.tasks, "mean"]
    xs = np.arange(len(axes_names))
    per_task, front, baselines, chosen = _roles(data)

    def ys(c: Candidate) -> list[float]:
        return [c.normalized.get(t, np.nan) for t in data.tasks] + [c.mean]

    fig, ax = plt.subplots(figsize=(max(6.4, 1.3 * len(axes_names)), 4.4))
    for c in data.candidates:
        ax.plot(xs, ys(c), c=GREY, lw=0.6, alpha=0.5)
    for c in per_task:
        ax.plot(xs, ys(c), c=BLUE, lw=0.9, alpha=0.8)
    for c in front:
        ax.plot(xs, ys(c), c=ORANGE, lw=1.6)
    for c in baselines:
        ax.plot(xs, ys(c), c=GREEN, lw=1.6, ls="--")
    if chosen is not None:
        ax.plot(xs, ys(chosen), c=RED, lw=2.6, marker="*", ms=10)
    ax.axhline(1.0, c="k", lw=0.6, ls=":")
    ax.set_xticks(xs, axes_names, rotation=20)
    ax.set_ylabel("normalised score (1 = each task's reference)")
    ax.grid(axis="x", alpha=0.5)
    handles = [
        plt.Line2D([], [], c=col, lw=w, ls=ls)
        for col, w, ls in ((GREY, 1, "-"), (BLUE, 1, "-"), (ORANGE, 1.6, "-"), (GREEN, 1.6, "--"), (RED, 2.6, "-"))
    ]
    ax.legend(
        handles,
        ["candidate", "per-task Pareto set", "optimised front", "baseline", "chosen"],
        fontsize=7,
        loc="lower left",
    )
    return fig


def convergence(data: RunData) -> Figure | None:
    """Best feasible mean so far, against the candidate count and against elapsed time."""
    plt = _pyplot()
    best = best_so_far(data.candidates)
    means = [c.mean for c in data.candidates]
    counts = np.arange(1, len(data.candidates) + 1)
    times = np.array([c.elapsed for c in data.candidates])
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, x, label in ((left, counts, "candidates evaluated"), (right, times, f"seconds ({data.time_source})")):
        order = np.argsort(x, kind="stable")
        ax.scatter(x, means, s=10, c=GREY, label="candidate's mean")
        ax.step(
            x[order],
            np.fmax.accumulate(np.nan_to_num(best[order], nan=-np.inf)),
            where="post",
            c=RED,
            label="best feasible mean",
        )
        ax.set_xlabel(label)
        ax.set_ylabel("mean normalised score")
        ax.grid(alpha=0.3)
    left.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def heatmaps(data: RunData, tables: Mapping[str, np.ndarray]) -> Figure | None:
    """One heatmap per parameter: tasks x layer groups, values written in the cells."""
    if not tables or data.chosen is None:
        return None
    plt = _pyplot()
    tasks, groups = data.chosen.task_names, data.groups
    fig, axes = plt.subplots(
        1, len(tables), figsize=(max(5, 0.55 * len(groups) + 2.5) * len(tables), 0.45 * len(tasks) + 1.8), squeeze=False
    )
    for ax, (title, table) in zip(axes[0], tables.items(), strict=True):
        span = {"vmin": 0.0, "vmax": 1.0} if title.startswith("density") else {}  # fractions kept: one scale
        image = ax.imshow(table, aspect="auto", cmap="viridis", **span)
        ax.set_xticks(range(len(groups)), groups, rotation=60, fontsize=8)
        ax.set_yticks(range(len(tasks)), tasks, fontsize=8)
        ax.set_title(f"{title} ({data.chosen.method})", fontsize=10)
        if table.size <= 400:
            middle = (np.nanmax(table) + np.nanmin(table)) / 2
            for (i, j), v in np.ndenumerate(table):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < middle else "k")
        fig.colorbar(image, ax=ax, fraction=0.04)
    fig.tight_layout()
    return fig


def scores(data: RunData, rows: Sequence[tuple[str, str, Mapping[str, float | None]]]) -> Figure | None:
    """Grouped bars per task: the chosen recipe, the experts, the baselines and the base, per split.

    One panel per metric, each with its own y axis fitted to its values: a loss (``neg_loss``,
    negative) and an accuracy on one 0..1 axis would hide the loss bars entirely.
    """
    if not rows:
        return None
    plt = _pyplot()
    groups = data.metric_groups()
    widths = [max(1.6 * len(tasks) + 1.5, 4.0) for tasks in groups.values()]
    fig, axes = plt.subplots(
        1, len(groups), figsize=(sum(widths) + 3, 4.4), squeeze=False, gridspec_kw={"width_ratios": widths}
    )
    cmap = plt.get_cmap("tab20")
    width = 0.8 / len(rows)
    for ax, (metric, tasks) in zip(axes[0], groups.items(), strict=True):
        heights = []
        for k, (model, split, values) in enumerate(rows):
            bars = [np.nan if values.get(t) is None else values[t] for t in tasks]
            heights += bars
            ax.bar(
                np.arange(len(tasks)) + (k - (len(rows) - 1) / 2) * width,
                bars,
                width,
                label=f"{model}, {split}",
                color=cmap(k % 20),
            )
        ax.set_xticks(range(len(tasks)), tasks)
        ax.set_ylabel(metric if metric != "score" else "score (task metric)")
        ax.set_ylim(*fitted_limits(heights))
        ax.axhline(0.0, c="k", lw=0.6)
        ax.grid(axis="y", alpha=0.3)
    axes[0][-1].legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.tight_layout()
    return fig


def fitted_limits(values: Sequence[float]) -> tuple[float, float]:
    """y limits holding every finite value and 0 (bars start there): 0..1.05 for scores within [0, 1]."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    low, high = min([0.0, *finite]), max([0.0, *finite])
    if low >= 0.0 and high <= 1.0:
        return 0.0, 1.05
    pad = 0.05 * (high - low or 1.0)
    return low - (pad if low < 0 else 0.0), high + (pad if high > 0 else 0.0)
