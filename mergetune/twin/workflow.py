"""What ``mergetune twin build`` and ``mergetune twin eval`` do (Twin-Merging, Lu et al., 2024).

``build``: load the base and experts a ``method: twin`` recipe names, merge θ*, compress v_t = θ_t − θ*,
train the router on the tasks' training splits, measure its routing accuracy on their validation
splits, and write the Twin folder (:mod:`.io`). The tasks come from a YAML file of task configs or,
for zoo experts, from each expert folder's ``zoo_expert.json``.

``eval``: load a Twin folder (nothing else is needed: task configs, θ*, heads, factors and router are
in it) and score it on its tasks' validation or test split, with the experts' scores as the reference
when their folders are still there. The same recipe built and scored in a search worker gives the
same scores, bit for bit, on the same device (same kernels, same seeded router).
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Group
from rich.table import Table

from mergetune.errors import MergetuneError, RecipeError, read_config_file
from mergetune.merging.engine import Merger
from mergetune.merging.methods.twin import TWIN
from mergetune.merging.modelset import ModelSet
from mergetune.objectives.models import load_task_model
from mergetune.objectives.suite import SuiteScores, ValidationSuite
from mergetune.objectives.tasks import TaskConfig
from mergetune.recipe import Recipe
from mergetune.twin.io import LoadedTwin, load_twin, save_twin, twin_task_models
from mergetune.twin.model import Twin, build_twin
from mergetune.twin.router import body_of

ZOO_RECORD = "zoo_expert.json"
WORST_SHOWN = 5


@dataclass(frozen=True)
class TwinBuild:
    folder: Path
    twin: Twin
    seconds: float
    folder_bytes: int
    experts_bytes: int


@dataclass(frozen=True)
class TwinScores:
    loaded: LoadedTwin
    scores: SuiteScores
    routing_accuracy: dict[str, float | None]
    seconds: float


def read_task_configs(recipe: Recipe, tasks_file: Path | None) -> list[TaskConfig]:
    """One task config per expert, in the experts' order: from ``tasks_file``, else from zoo expert records."""
    if tasks_file is not None:
        configs = _configs_from_file(tasks_file)
    else:
        configs = {e.name: _zoo_task(e.name, Path(e.model)) for e in recipe.experts}
    missing = [name for name in recipe.task_names if name not in configs]
    if missing:
        raise RecipeError(f"{tasks_file}: no task config for expert(s) {missing}")
    return [configs[name] for name in recipe.task_names]


def _configs_from_file(path: Path) -> dict[str, TaskConfig]:
    data = read_config_file(path, "tasks file")
    items = data.get("tasks") if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise MergetuneError(f"{path}: expected a list of task configs (or a mapping with a 'tasks' list)")
    # relative data paths resolve against the tasks file, not the working directory
    configs = [TaskConfig.parse(item, source=str(path)).with_paths_from(path.parent) for item in items]
    return {c.name: c for c in configs}


def _zoo_task(name: str, expert_dir: Path) -> TaskConfig:
    record = expert_dir / ZOO_RECORD
    if not record.is_file():
        raise MergetuneError(
            f"expert '{name}' ({expert_dir}) has no {ZOO_RECORD}: give the tasks' configs with --tasks FILE"
        )
    return TaskConfig.parse(json.loads(record.read_text())["task"], source=str(record))


def build_folder(
    recipe: Recipe, out_dir: Path, *, tasks_file: Path | None = None, device: str = "cpu", compile: bool | None = None
) -> TwinBuild:
    """Build the Twin of ``recipe`` (see the module docstring) and write its folder."""
    if recipe.method != TWIN:
        raise RecipeError(f"'twin build' needs a recipe with method: {TWIN}, not '{recipe.method}'")
    start = time.perf_counter()
    _quiet_loading()
    configs = read_task_configs(recipe, tasks_file)
    tasks = [c.load() for c in configs]
    modelset = ModelSet.from_recipe(recipe, device=device)
    merger = Merger(modelset, compile=compile)
    model = load_task_model(
        tasks[0], recipe.experts[0].model, trust_remote_code=recipe.trust_remote_code, device=device
    )
    merger.bind(model, recipe.dtype)
    tokenizer = _tokenizer([recipe.base, *(e.model for e in recipe.experts)], recipe.trust_remote_code)
    twin = build_twin(recipe, modelset, merger, body_of(model), tasks, tokenizer, validation_routing=True)
    folder = save_twin(twin, modelset, configs, out_dir)
    experts = sum(_weights_bytes(Path(e.model)) for e in recipe.experts)
    return TwinBuild(folder, twin, time.perf_counter() - start, folder_bytes(folder), experts)


def evaluate_folder(
    folder: Path,
    *,
    split: str = "validation",
    device: str = "cpu",
    batch_size: int = 64,
    cache_dir: Path | None = None,
) -> TwinScores:
    """Score a Twin folder on its tasks' ``split`` (validation or test), normalised when the experts are there."""
    start = time.perf_counter()
    _quiet_loading()
    loaded = load_twin(folder)
    tasks = [c.load() for c in loaded.tasks]
    models = twin_task_models(loaded, tasks, device)
    tokenizer = _tokenizer([loaded.shared_dir], loaded.twin.recipe.trust_remote_code)
    options: dict[str, Any] = {"batch_size": batch_size, "cache_dir": cache_dir}
    if split == "test":
        suite = ValidationSuite.for_test(tasks, tokenizer, **options)
    else:
        suite = ValidationSuite(tasks, tokenizer, split=split, **options)
    experts = {e.name: e.model for e in loaded.twin.recipe.experts}
    if all(Path(p).is_dir() for p in experts.values()):
        loader = functools.partial(load_task_model, device=device)
        suite.reference_scores(experts, base=loaded.twin.recipe.base, loader=loader)  # base: loss tasks' share of gain
    with loaded.twin.routed(models) as routed:
        scores = suite.score(routed)
        routing = {name: model.routing_accuracy for name, model in routed.items()}
    return TwinScores(loaded, scores, routing, time.perf_counter() - start)


def _quiet_loading() -> None:
    """No per-model 'Loading weights' bars: the commands print their own report."""
    from transformers.utils import logging as hf_logging  # late: transformers is heavy

    hf_logging.disable_progress_bar()


def _tokenizer(sources: list[str | Path], trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer  # late: transformers is heavy

    for source in sources:
        try:
            return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        except (OSError, ValueError):
            continue
    raise MergetuneError(f"no tokenizer found in {[str(s) for s in sources]}")


def _weights_bytes(folder: Path) -> int:
    """Bytes of a model folder's weight files (what keeping that expert costs)."""
    if not folder.is_dir():
        return 0
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))


def folder_bytes(folder: Path) -> int:
    """Bytes of every file under ``folder``."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# ---- reports -----------------------------------------------------------------------------------


def build_report(result: TwinBuild) -> Group:
    """Routing accuracy on validation, the worst reconstruction errors, storage and timings."""
    twin = result.twin
    routing = Table("task", "routing accuracy (validation)", title=f"Twin -> {result.folder}", title_justify="left")
    for task, accuracy in (twin.validation_routing or {}).items():
        routing.add_row(task, f"{accuracy:.3f}")
    rows = twin.knowledge.report()
    low_rank = sorted((r for r in rows if r["kind"] == "low_rank"), key=lambda r: -float(r["max_rel_error"]))  # type: ignore[arg-type]
    worst = Table("matrix (largest SVD errors)", "rank", "max rel. error")
    for r in low_rank[:WORST_SHOWN]:
        worst.add_row(str(r["tensor"]), str(r["rank"]), f"{r['max_rel_error']:.3f}")
    facts = Table.grid(padding=(0, 2))
    mean_error = sum(float(r["mean_rel_error"]) for r in low_rank) / max(1, len(low_rank))  # type: ignore[arg-type]
    facts.add_row("mean SVD relative error", f"{mean_error:.3f} over {len(low_rank)} matrices")
    dropped = sum(1 for r in rows if r["kind"] == "dropped")
    facts.add_row("tensors adapted / dropped", f"{len(rows) - dropped} / {dropped}")
    mib = 1024**2
    facts.add_row(
        "folder / experts' weights", f"{result.folder_bytes / mib:.1f} / {result.experts_bytes / mib:.1f} MiB"
    )
    facts.add_row("time", _timings(twin.timings, result.seconds))
    return Group(routing, worst, facts)


def _timings(timings: dict[str, float], total: float) -> str:
    return ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()) + f"; total {total:.1f} s"


def scores_table(result: TwinScores) -> Table:
    """Per task: score, normalised score (if the experts were there), routing accuracy."""
    scores = result.scores
    table = Table("task", "metric", "score", "normalised", "routing acc.", title=f"Twin on {scores.split}")
    for name, t in scores.tasks.items():
        routing = result.routing_accuracy.get(name)
        table.add_row(name, t.metric, f"{t.score:.4f}", _fmt(t.normalized), _fmt(routing))
    table.add_row("mean", "", _fmt(scores.mean_score), _fmt(scores.mean_normalized), "")  # no raw mean across metrics
    return table


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"
