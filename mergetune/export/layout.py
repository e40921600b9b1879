"""A base checkpoint as an exporter sees it: merged tensors, their sizes, layer groups, block indices.

Everything is read from file headers (safetensors) and ``config.json``, so exporting the recipe of
a 70B model loads no weight; other formats fall back to reading the weights. The merged tensors
are the ones mergetune's ModelSet merges: the base's floating-point tensors that are not
task-specific (classification heads). Layer groups come from ``layer_groups.build_layer_groups``
on those names, so a recipe's per-group values mean here exactly what they mean in a merge.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from mergetune.errors import MergetuneError
from mergetune.merging.layer_groups import LayerGroups, block_position, build_layer_groups, family_of
from mergetune.merging.loading import (
    SAFETENSORS_FILE,
    SAFETENSORS_INDEX,
    download_from_hub,
    load_model,
    looks_like_hub_id,
    read_config,
)
from mergetune.merging.modelset import DEFAULT_TASK_SPECIFIC

_FLOAT_DTYPES = ("F", "BF")  # safetensors dtype names: F16, F32, F64, BF16


@dataclass(frozen=True)
class ModelLayout:
    """The merged tensors of a base, in checkpoint order, with what an exporter needs of each."""

    folder: Path
    names: tuple[str, ...]
    numel: Mapping[str, int]  # of the merged and the task-specific tensors
    ndim: Mapping[str, int]
    groups: LayerGroups
    layer: Mapping[str, int]  # block tensors -> block index (the layer number mergekit slices address)
    stacks: int  # number of separate block stacks (T5: encoder and decoder)
    architectures: tuple[str, ...]
    task_specific: tuple[str, ...]  # floating tensors of the base that mergetune never merges

    def group_of(self, name: str) -> str:
        return self.groups.names[self.groups.index(name)]

    def members(self, group: str) -> list[str]:
        return [n for n in self.names if self.group_of(n) == group]

    @property
    def block_groups(self) -> list[str]:
        """Groups made of transformer blocks, in depth order."""
        return [g for g in self.groups.names if g.startswith("blocks.")]

    def layer_range(self, group: str) -> tuple[int, int]:
        """``[first, last + 1)`` block indices of a block group (mergekit's ``layer_range``)."""
        layers = [self.layer[n] for n in self.members(group) if n in self.layer]
        return min(layers), max(layers) + 1

    @property
    def sliceable(self) -> bool:
        """One stack of blocks numbered 0..L-1, each group a run of consecutive blocks: mergekit slices apply."""
        if self.stacks != 1 or not self.block_groups:
            return False
        ranges = [self.layer_range(g) for g in self.block_groups]
        return ranges[0][0] == 0 and all(a[1] == b[0] for a, b in itertools.pairwise(ranges))


def model_folder(model: str, revision: str | None = None) -> Path:
    """A local folder holding the model's files (a hub id is resolved through the local hub cache)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        return path.parent
    if not looks_like_hub_id(model):
        raise MergetuneError(f"{model}: no such model folder; check the path in the recipe")
    return download_from_hub(model, revision)


def architectures_of(folder: Path) -> tuple[str, ...]:
    """``config.json``'s ``architectures`` of a model folder (empty when the config does not say)."""
    return tuple(read_config(folder).get("architectures") or ())


def read_layout(model: str, granularity: int = 1, revision: str | None = None) -> ModelLayout:
    """The layout of a base model (see the module docstring); errors name the model."""
    folder = model_folder(model, revision)
    shapes = tensor_shapes(folder)
    config = read_config(folder)
    patterns = [re.compile(p) for p in DEFAULT_TASK_SPECIFIC]
    floating = [n for n, (_, is_float) in shapes.items() if is_float]
    specific = tuple(n for n in floating if any(p.search(n) for p in patterns))
    names = tuple(n for n in floating if n not in specific)
    if not names:
        raise MergetuneError(f"{model}: no floating-point tensors to merge were found in {folder}")
    model_type = config.get("model_type")
    family = family_of(model_type)
    positions = {n: block_position(n, family) for n in names}
    blocks = {n: p for n, p in positions.items() if p is not None}
    return ModelLayout(
        folder=folder,
        names=names,
        numel={n: math.prod(shapes[n][0]) for n in (*names, *specific)},
        ndim={n: len(shapes[n][0]) for n in (*names, *specific)},
        groups=build_layer_groups(names, model_type, granularity),
        layer={n: idx for n, (_, idx) in blocks.items()},
        stacks=len({prefix for prefix, _ in blocks.values()}),
        architectures=architectures_of(folder),
        task_specific=specific,
    )


def tensor_shapes(folder: Path) -> dict[str, tuple[tuple[int, ...], bool]]:
    """name -> (shape, is floating point), in checkpoint order, from safetensors headers when possible."""
    files = _safetensors_files(folder)
    if not files:
        state = load_model(folder).state
        return {n: (tuple(t.shape), t.is_floating_point()) for n, t in state.items()}
    out: dict[str, tuple[tuple[int, ...], bool]] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                sl = f.get_slice(name)
                out[name] = (tuple(sl.get_shape()), sl.get_dtype().startswith(_FLOAT_DTYPES))
    return out


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise MergetuneError(f"{index}: not a valid safetensors index ({exc})") from exc
        return [folder / f for f in dict.fromkeys(weight_map.values())]
    single = folder / SAFETENSORS_FILE
    return [single] if single.is_file() else []
