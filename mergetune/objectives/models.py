"""Task models: the Hugging Face model a task is scored with, loaded once and checked against the task.

A classification or unsupervised task is scored with a sequence-classification model (the
expert's own head), a multiple-choice or language-modelling task with a causal LM. The loader
refuses a folder that lacks the head (transformers would silently add a random one, and the task
would score at chance), a head whose size differs from the task's label set, and a head whose
``id2label`` names the labels in another order than the task (every score would be against the
wrong labels).

``shared_from`` builds the literature's *base* score: the pretrained base encoder with the
expert's head. Every tensor the base checkpoint shares with the task model (names matched modulo
a wrapper prefix such as ``bert.``) is overwritten with the base's value; task-only tensors (the
classifier) keep the expert's. Nothing here knows about merging.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mergetune.errors import TaskError
from mergetune.objectives.evaluators.kinds import kind_spec
from mergetune.objectives.tasks import TaskConfig, TaskData
from mergetune.safetensors_io import LazyState

log = logging.getLogger(__name__)

StateDict = Mapping[str, torch.Tensor]
SharedSource = str | os.PathLike[str] | StateDict | nn.Module


def task_model_class(kind: str) -> Any:
    """The transformers auto class for a task kind (sequence classification or causal LM; see the kind registry)."""
    # transformers: imported only when a model is loaded (importing it takes seconds)
    import transformers

    return getattr(transformers, kind_spec(kind).model_class)


def load_task_model(
    task: TaskData | TaskConfig,
    model_dir: str | os.PathLike[str],
    *,
    shared_from: SharedSource | None = None,
    trust_remote_code: bool = False,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Load the model that scores ``task`` from ``model_dir``, in eval mode, checked against the task.

    ``shared_from`` (a folder, a state dict or a module of the base model) overwrites every tensor
    it shares with the task model: the base with the expert's head. ``trust_remote_code`` is passed
    to transformers unchanged (default False: no code from a model folder runs). ``dtype`` converts
    the weights after loading (e.g. ``torch.bfloat16``: about 3x faster scoring for MiniLM on a CPU
    with AMX; score the reference experts in the same dtype).
    """
    config = task.config if isinstance(task, TaskData) else task
    auto = task_model_class(config.kind)
    model = _from_pretrained(config.name, auto, model_dir, trust_remote_code)
    if config.kind in ("classification", "unsupervised"):
        check_head(task, model)
    if shared_from is not None:
        copied = overwrite_shared(model, shared_from, task_name=config.name)
        log.info("task '%s': %d tensors taken from the shared base", config.name, len(copied))
    return model.to(device=device, dtype=dtype).eval()


def _from_pretrained(task: str, auto: Any, model_dir: str | os.PathLike[str], trust_remote_code: bool) -> nn.Module:
    """``auto.from_pretrained`` that refuses missing tensors (a randomly initialised head scores at chance)."""
    try:
        model, info = auto.from_pretrained(
            str(model_dir), trust_remote_code=trust_remote_code, output_loading_info=True
        )
    except (OSError, ValueError) as exc:
        raise TaskError(f"task '{task}': cannot load {auto.__name__} from {model_dir}: {exc}") from exc
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise TaskError(
            f"task '{task}': {model_dir} lacks {len(missing)} tensor(s) of {type(model).__name__}, e.g. "
            f"{missing[:3]}; transformers would initialise them at random (is it the base folder, not the expert's?)"
        )
    return model


def check_head(task: TaskData | TaskConfig, model: nn.Module) -> None:
    """Raise a TaskError naming the task unless the model's head has one output per task label."""
    num_labels = head_size(model)
    if num_labels is None:
        name = task.name
        raise TaskError(f"task '{name}': {type(model).__name__} has no classification head (no config.num_labels)")
    task.check_head(num_labels)
    if isinstance(task, TaskData):
        check_label_order(task, model)


def check_label_order(task: TaskData, model: nn.Module) -> None:
    """Raise unless the head's ``id2label`` names (when it has real names) are the task's labels, in order."""
    head = label_names_of(getattr(getattr(model, "config", None), "id2label", None))
    if head is None or not task.label_names or tuple(task.label_names) == head:
        return
    raise TaskError(
        f"task '{task.name}': the model's head lists its labels in the order {list(head)} (config id2label) "
        f"but the task's order is {list(task.label_names)} ({task.label_origin or 'no origin'}); every score "
        "would be against the wrong labels: declare labels in the head's order, or remove 'labels'"
    )


def label_names_of(id2label: Mapping[Any, str] | None) -> tuple[str, ...] | None:
    """A config's ``id2label`` as names in output order; None when absent or only transformers' ``LABEL_i``.

    ``LABEL_0, LABEL_1, ...`` is what transformers writes when nobody named the labels: it carries no
    order information, so it must not override declared labels or a corpus's order.
    """
    if not id2label:
        return None
    by_index = {int(k): str(v) for k, v in id2label.items()}
    if sorted(by_index) != list(range(len(by_index))):
        return None
    names = tuple(by_index[i] for i in range(len(by_index)))
    if all(name == f"LABEL_{i}" for i, name in enumerate(names)):
        return None
    return names


def head_size(model: nn.Module) -> int | None:
    """Number of outputs of a sequence-classification model's head (its config's ``num_labels``)."""
    config = getattr(model, "config", None)
    return getattr(config, "num_labels", None) if config is not None else None


# ---- the base with the expert's head ---------------------------------------------------------


def overwrite_shared(model: nn.Module, shared_from: SharedSource, *, task_name: str = "?") -> list[str]:
    """Copy into ``model`` every tensor that ``shared_from`` also has; returns the model names overwritten.

    Names match modulo one wrapper prefix on either side (``bert.``, ``model.``): the pair of
    prefixes matching the most names wins. A matched tensor of another shape is an error; tensors
    only the model has (its head) are left alone; matching nothing at all is an error.
    """
    shared = _shared_state(shared_from)
    target = model.state_dict(keep_vars=True)
    model_prefix, shared_prefix = _best_prefixes(list(target), list(shared))
    pairs = [
        (model_prefix + name[len(shared_prefix) :], name)
        for name in shared
        if name.startswith(shared_prefix) and model_prefix + name[len(shared_prefix) :] in target
    ]
    if not pairs:
        raise TaskError(
            f"task '{task_name}': the shared base has no tensor in common with {type(model).__name__} "
            f"(e.g. base {list(shared)[:2]}, model {list(target)[:2]})"
        )
    with torch.no_grad():
        for model_name, shared_name in pairs:
            _copy_tensor(target[model_name], shared[shared_name], model_name, task_name)
    return [m for m, _ in pairs]


def _copy_tensor(dest: torch.Tensor, src: torch.Tensor, name: str, task_name: str) -> None:
    if dest.shape != src.shape:
        raise TaskError(
            f"task '{task_name}': shared tensor '{name}' has shape {tuple(src.shape)} in the base but "
            f"{tuple(dest.shape)} in the task model"
        )
    dest.copy_(src.to(device=dest.device, dtype=dest.dtype))


def _best_prefixes(model_names: list[str], shared_names: list[str]) -> tuple[str, str]:
    """(model prefix, shared prefix) under which most names agree; ties prefer no prefix."""
    model_set = set(model_names)

    def first_parts(names: list[str]) -> list[str]:
        return ["", *sorted({n.split(".", 1)[0] + "." for n in names if "." in n})]

    best, best_key = ("", ""), (-1, True)
    for mp in first_parts(model_names):
        for sp in first_parts(shared_names):
            hits = sum(1 for n in shared_names if n.startswith(sp) and mp + n[len(sp) :] in model_set)
            key = (hits, mp == "" and sp == "")
            if key > best_key:
                best, best_key = (mp, sp), key
    return best


def _shared_state(source: SharedSource) -> StateDict:
    """The shared tensors by name; a folder's safetensors are read one tensor at a time as they are copied."""
    if isinstance(source, nn.Module):
        return dict(source.state_dict())
    if isinstance(source, Mapping):
        return dict(source)
    return lazy_state_dict(Path(source))


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """Tensors of a Hugging Face folder (or one weights file): safetensors, sharded or not, else ``.bin``.

    ``.bin`` files are read with ``weights_only=True`` (no pickled code runs).
    """
    return dict(_read_files(_weights_files(Path(folder).expanduser()), lazy=False))


def lazy_state_dict(folder: Path) -> StateDict:
    """``read_state_dict``'s tensors, each read from disk when asked for with no memory map kept (a
    ``LazyState``) when every file is safetensors: copying a base into a task model then holds one of
    its tensors at a time beside the model, not the whole base (a ``.bin`` checkpoint is read whole)."""
    return _read_files(_weights_files(Path(folder).expanduser()), lazy=True)


def _weights_files(folder: Path) -> list[Path]:
    """The files holding a folder's weights (a shard index's shards first), or the one file given."""
    if folder.is_file():
        return [folder]
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            return [folder / shard for shard in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    for file_name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / file_name).is_file():
            return [folder / file_name]
    raise TaskError(f"no model weights (model.safetensors or pytorch_model.bin) in {folder}")


def _read_files(files: list[Path], *, lazy: bool) -> StateDict:
    if lazy and all(f.suffix == ".safetensors" for f in files):
        return LazyState.of_files(files)
    state: dict[str, torch.Tensor] = {}
    for path in files:
        if path.suffix == ".safetensors":
            state.update(LazyState.of_files([path]).items())
        else:
            state.update(torch.load(path, map_location="cpu", weights_only=True))
    return state
