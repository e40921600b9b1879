"""Save and load a Twin-Merging model (Lu et al., 2024) as a folder; weights only through safetensors.

Layout::

    recipe.yaml                the Twin recipe (method: twin) that built it
    twin.json                  format, task configs, per-tensor compression report, router shape,
                               routing accuracy on validation, timings
    shared/                    θ* as a Hugging Face folder (loads with AutoModel.from_pretrained), with
                               the experts' task heads in shared/heads/<task>.safetensors
    exclusive.safetensors      per adapted tensor: "<tensor>::us" [T, m, r] and "<tensor>::vt" [T, r, n]
                               (v̂_t = us_t @ vt_t), or "<tensor>::dense" [T, *shape]
    router.safetensors         the router MLP and its feature standardisation

:func:`load_twin` reads it back into the same tensors (bit for bit); :func:`twin_task_models` builds
one task model per task from ``shared/`` and its head, so a loaded Twin scores without the experts.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from mergetune.errors import MergetuneError
from mergetune.merging.engine import DTYPES
from mergetune.merging.loading import read_folder, read_weights_file
from mergetune.merging.methods import load_recipe
from mergetune.merging.methods.twin import shared_recipe
from mergetune.merging.modelset import ModelSet
from mergetune.merging.save import save_merged
from mergetune.objectives.models import check_head, overwrite_shared, task_model_class
from mergetune.objectives.tasks import TaskConfig, TaskData
from mergetune.twin.exclusive import DROPPED, LOW_RANK, ExclusiveKnowledge, ExclusiveTensor
from mergetune.twin.model import Twin
from mergetune.twin.router import Router

FORMAT = "mergetune-twin"
VERSION = 1
RECIPE_FILE = "recipe.yaml"
META_FILE = "twin.json"
SHARED_DIR = "shared"
EXCLUSIVE_FILE = "exclusive.safetensors"
ROUTER_FILE = "router.safetensors"
SEP = "::"


class TwinFolderError(MergetuneError):
    """A Twin folder is missing a file, or its files disagree with each other."""


@dataclass(frozen=True)
class LoadedTwin:
    """A Twin read from a folder: the model parts, the tasks it was built for, and its metadata."""

    folder: Path
    twin: Twin
    tasks: list[TaskConfig]
    meta: dict[str, Any]

    @property
    def shared_dir(self) -> Path:
        return self.folder / SHARED_DIR


def save_twin(twin: Twin, modelset: ModelSet, tasks: Sequence[TaskConfig], out_dir: str | Path) -> Path:
    """Write the Twin folder (see the module docstring); returns its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_merged(modelset, twin.shared, shared_recipe(twin.recipe), out / SHARED_DIR)
    save_file(_exclusive_state(twin.knowledge), str(out / EXCLUSIVE_FILE), metadata={"format": FORMAT})
    router_state = {k: v.detach().cpu().contiguous() for k, v in twin.router.state_dict().items()}
    save_file(router_state, str(out / ROUTER_FILE), metadata={"format": FORMAT})
    twin.recipe.save(out / RECIPE_FILE)
    (out / META_FILE).write_text(json.dumps(_meta(twin, tasks), indent=2) + "\n")
    return out


def _exclusive_state(knowledge: ExclusiveKnowledge) -> dict[str, torch.Tensor]:
    return {
        f"{name}{SEP}{role}": tensor.detach().cpu().contiguous()
        for name, t in knowledge.tensors.items()
        for role, tensor in t.tensors().items()
    }


def _meta(twin: Twin, tasks: Sequence[TaskConfig]) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": VERSION,
        "tasks": [t.model_dump(mode="json") for t in tasks],
        "exclusive": [
            {"tensor": t.name, "shape": list(t.shape), "kind": t.kind, "rank": t.rank, "rel_error": list(t.rel_error)}
            for t in twin.knowledge.tensors.values()
        ],
        "router": twin.router.config,
        "validation_routing": twin.validation_routing,
        "timings": twin.timings,
    }


def load_twin(folder: str | Path) -> LoadedTwin:
    """Read a Twin folder written by :func:`save_twin`; errors name the file and the tensor at fault."""
    folder = Path(folder)
    for name in (RECIPE_FILE, META_FILE, EXCLUSIVE_FILE, ROUTER_FILE, f"{SHARED_DIR}/config.json"):
        if not (folder / name).is_file():
            raise TwinFolderError(f"{folder} is not a Twin folder: {name} is missing (write one with save_twin)")
    recipe = load_recipe(folder / RECIPE_FILE)  # the method and its options checked before anything loads
    meta = _read_meta(folder / META_FILE)
    tasks = [TaskConfig.parse(t, source=str(folder / META_FILE)) for t in meta["tasks"]]
    if [t.name for t in tasks] != recipe.task_names:
        raise TwinFolderError(f"{folder / META_FILE}: tasks {[t.name for t in tasks]} differ from the recipe's experts")
    knowledge = _read_exclusive(folder / EXCLUSIVE_FILE, meta["exclusive"], tuple(recipe.task_names))
    router = _read_router(folder / ROUTER_FILE, meta["router"])
    shared = _read_shared(folder / SHARED_DIR)
    twin = Twin(recipe, shared, knowledge, router, dict(meta.get("timings") or {}), meta.get("validation_routing"))
    return LoadedTwin(folder, twin, tasks, meta)


def _read_shared(shared_dir: Path) -> dict[str, torch.Tensor]:
    """θ* from safetensors only (single or sharded), never from a pickle a folder might also hold."""
    if not any((shared_dir / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json")):
        raise TwinFolderError(
            f"{shared_dir}: no model.safetensors (or its shard index); θ* is read from safetensors only"
        )
    return read_folder(shared_dir)


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise TwinFolderError(f"{path}: not valid JSON: {exc}") from exc
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise TwinFolderError(f"{path}: not a {FORMAT} v{VERSION} file (format {meta.get('format')!r})")
    missing = [k for k in ("tasks", "exclusive", "router") if k not in meta]
    if missing:
        raise TwinFolderError(f"{path}: missing field(s) {missing}")
    return meta


def _read_exclusive(path: Path, entries: Sequence[Mapping[str, Any]], tasks: tuple[str, ...]) -> ExclusiveKnowledge:
    state = read_weights_file(path)
    tensors: dict[str, ExclusiveTensor] = {}
    for entry in entries:
        name, shape, kind = entry["tensor"], tuple(entry["shape"]), entry["kind"]
        roles = {"us", "vt"} if kind == LOW_RANK else set() if kind == DROPPED else {"dense"}
        found = {role: state.pop(f"{name}{SEP}{role}", None) for role in roles}
        absent = sorted(role for role, t in found.items() if t is None)
        if absent:
            raise TwinFolderError(f"{path}: tensor '{name}' lacks its {absent} factor(s)")
        tensors[name] = ExclusiveTensor(name, shape, kind, rel_error=tuple(entry["rel_error"]), **found)
        _check_shapes(path, tensors[name], len(tasks), entry["rank"])
    if state:
        raise TwinFolderError(f"{path}: tensors not listed in {META_FILE}: {sorted(state)[:5]}")
    return ExclusiveKnowledge(tasks, tensors)


def _check_shapes(path: Path, t: ExclusiveTensor, n_tasks: int, rank: int) -> None:
    rows, cols = (t.shape[0], int(torch.Size(t.shape[1:]).numel())) if len(t.shape) >= 2 else (0, 0)
    expected = {"us": (n_tasks, rows, rank), "vt": (n_tasks, rank, cols), "dense": (n_tasks, *t.shape)}
    for role, tensor in t.tensors().items():
        if tuple(tensor.shape) != expected[role]:
            raise TwinFolderError(
                f"{path}: '{t.name}{SEP}{role}' has shape {tuple(tensor.shape)}, expected {expected[role]}"
            )


def _read_router(path: Path, config: Mapping[str, int]) -> Router:
    router = Router(int(config["in_features"]), int(config["hidden"]), int(config["n_tasks"]))
    state = read_weights_file(path)
    try:
        router.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise TwinFolderError(f"{path}: does not match the router in {META_FILE} ({config}): {exc}") from exc
    return router.eval().requires_grad_(False)


def twin_task_models(loaded: LoadedTwin, tasks: Sequence[TaskData], device: str = "cpu") -> dict[str, nn.Module]:
    """One task model per task: θ* from ``shared/`` plus the task's head from ``shared/heads/<task>``."""
    return {task.name: _task_model(loaded, task, device) for task in tasks}


def _task_model(loaded: LoadedTwin, task: TaskData, device: str) -> nn.Module:
    from transformers import AutoConfig  # late: transformers is heavy, only this path needs it here

    shared_dir = loaded.shared_dir
    options = {"num_labels": task.num_labels} if task.num_labels else {}
    config = AutoConfig.from_pretrained(shared_dir, trust_remote_code=loaded.twin.recipe.trust_remote_code, **options)
    model = task_model_class(task.config.kind).from_config(config)
    covered = set(overwrite_shared(model, loaded.twin.shared, task_name=task.name))
    head_file = shared_dir / "heads" / f"{task.name}.safetensors"
    if head_file.is_file():
        covered |= set(overwrite_shared(model, read_weights_file(head_file), task_name=task.name))
    missing = sorted(set(model.state_dict()) - covered)
    if missing:
        raise TwinFolderError(
            f"{shared_dir}: task '{task.name}': {len(missing)} tensor(s) of {type(model).__name__} are in neither "
            f"the shared model nor {head_file.name}, e.g. {missing[:3]}"
        )
    if task.config.kind in ("classification", "unsupervised"):
        check_head(task, model)
    return model.to(device=device, dtype=DTYPES[loaded.twin.recipe.dtype]).eval()
