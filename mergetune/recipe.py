"""The Recipe: everything needed to reproduce one merge, bit for bit.

A recipe names the base, the experts (one per task), the method, the method's per-task and
per-layer-group parameters (weight λ and density), method options, dtype and seed. It is strict:
an unknown or misspelt key is an error (mergekit silently ignores them, which hides typos).

Parameter values (``weight``, ``density``) accept, from coarse to fine:

- a number: the same value for every task and every layer group;
- a mapping task -> value, where ``"*"`` is the default for tasks not named, and the value is
  - a number (all groups of that task),
  - a list of anchors interpolated linearly over the layer groups (as many anchors as groups
    gives one value per group; two anchors give a linear ramp from the first group to the last),
  - a mapping group name -> number, with ``"*"`` as the default for groups not named.

Densities are the fraction of entries **kept**, in [0, 1]. ``drop`` is accepted as an alias on
input (density = 1 - drop) and is stored as density.

Paths: a relative ``base`` or expert ``model`` in a recipe file resolves against the file's own
folder (not the working directory), so ``mergetune merge`` works from anywhere; a value that is
neither an existing path there nor written as a path (``./x``, ``../x``, ``~/x``) is a hub id and
stays as it is. Recipes the search writes hold absolute paths.

This layer sits below the merge methods and does not know them: ``method`` and ``options`` are
checked against the method registry by ``mergetune.merging.methods.check_recipe``, which every
entry point calls right after reading a recipe.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from mergetune.errors import RecipeError, read_config_file
from mergetune.strict import StrictModel, format_validation_error

GroupValue = float | list[float] | dict[str, float]
ParamSpec = float | dict[str, GroupValue]
DType = Literal["float32", "bfloat16", "float16"]
DEFAULT_KEY = "*"
SEED_LIMIT = 2**32  # numpy's and torch's generators take seeds below 2**32: a larger one crashes mid-run


class Expert(StrictModel):
    """One fine-tuned expert: the task it was trained for and where its weights are."""

    name: str = Field(min_length=1, description="Task name, used to address per-task parameters.")
    model: str = Field(min_length=1, description="Local folder or hub id of the fine-tuned model.")
    revision: str | None = None


class Grouping(StrictModel):
    """How tensors map to layer groups (see mergetune.merging.layer_groups)."""

    granularity: int = Field(1, ge=1, description="Consecutive transformer blocks bundled per group.")


class Recipe(StrictModel):
    """A complete, reproducible merge recipe."""

    version: Literal[1] = 1
    base: str = Field(min_length=1, description="Local folder or hub id of the pretrained base.")
    experts: list[Expert] = Field(min_length=1)
    method: str = Field(min_length=1, description="A registered merge method (checked by merging's check_recipe).")
    weight: ParamSpec = 1.0
    density: ParamSpec = 1.0
    options: dict[str, Any] = Field(default_factory=dict, description="The method's options (check_recipe).")
    grouping: Grouping = Grouping()
    dtype: DType = "float32"
    storage_dtype: DType = Field(
        "float32",
        description="Dtype the task vectors and base were stored in while merging (the merge computes in float32): "
        "a recipe found on a bfloat16 store is reproduced bit for bit only from a bfloat16 store.",
    )
    seed: int = Field(0, ge=0, lt=SEED_LIMIT, description="Random seed (DARE's drops, ...), in [0, 2**32).")
    trust_remote_code: bool = False
    allow_tokenizer_mismatch: bool = Field(
        False, description="Merge experts whose tokenizer differs from the base's (warn instead of refusing)."
    )

    @model_validator(mode="before")
    @classmethod
    def _drop_alias(cls, data: Any) -> Any:
        """Accept ``drop`` (fraction dropped, DARE's convention) and store it as density = 1 - drop."""
        if isinstance(data, Mapping) and "drop" in data:
            data = dict(data)
            if "density" in data:
                raise ValueError("give either 'density' (fraction kept) or 'drop' (fraction dropped), not both")
            drop = data.pop("drop")
            bad = [v for v in _iter_raw(drop) if not _is_number(v) or not 0.0 <= float(v) <= 1.0]
            if bad:
                raise ValueError(f"drop must be a fraction dropped in [0, 1] (or a spec of them); got {bad[:5]}")
            data["density"] = _map_values(drop, lambda v: 1.0 - float(v))
        return data

    @field_validator("experts")
    @classmethod
    def _unique_expert_names(cls, experts: list[Expert]) -> list[Expert]:
        names = [e.name for e in experts]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"expert names must be unique; repeated: {dupes}")
        return experts

    @field_validator("weight")
    @classmethod
    def _finite_weight(cls, spec: ParamSpec) -> ParamSpec:
        _check_values(spec, "weight", lambda v: math.isfinite(v), "must be a finite number")
        _check_anchor_lists(spec, "weight")
        return spec

    @field_validator("density")
    @classmethod
    def _density_range(cls, spec: ParamSpec) -> ParamSpec:
        _check_values(spec, "density", lambda v: 0.0 <= v <= 1.0, "must be a fraction kept in [0, 1]")
        _check_anchor_lists(spec, "density")
        return spec

    @model_validator(mode="after")
    def _check_tasks(self) -> Recipe:
        """Per-task specs must name only known tasks, and give every task a value (or a '*' default)."""
        tasks = self.task_names
        for field in ("weight", "density"):
            spec = getattr(self, field)
            if not isinstance(spec, dict):
                continue
            unknown = sorted(set(spec) - set(tasks) - {DEFAULT_KEY})
            if unknown:
                raise ValueError(f"{field}: unknown task(s) {unknown}; the experts are {sorted(tasks)}")
            missing = [t for t in tasks if t not in spec] if DEFAULT_KEY not in spec else []
            if missing:
                raise ValueError(f"{field}: no value for task(s) {missing}; name them or give a '*' default")
        return self

    @property
    def task_names(self) -> list[str]:
        return [e.name for e in self.experts]

    # ---- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        text = self.to_json() if path.suffix == ".json" else self.to_yaml()
        path.write_text(text)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        """Read a recipe from a YAML or JSON file; errors name the file and the field.

        Relative model paths resolve against the file's folder (see the module docstring).
        """
        recipe = cls.parse(read_config_file(path, "recipe file", RecipeError), source=str(path))
        return recipe.with_paths_from(Path(path).parent)

    def with_paths_from(self, folder: str | Path) -> Recipe:
        """A copy whose relative local model paths are made absolute against ``folder``; hub ids unchanged."""
        experts = [e.model_copy(update={"model": resolve_model_path(e.model, folder)}) for e in self.experts]
        return self.model_copy(update={"base": resolve_model_path(self.base, folder), "experts": experts})

    @classmethod
    def parse(cls, data: Any, source: str = "recipe") -> Recipe:
        if not isinstance(data, Mapping):
            raise RecipeError(f"{source}: expected a mapping of recipe fields, got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise RecipeError(f"{source}: invalid recipe:\n{format_validation_error(exc)}") from exc


_SAFETENSORS_DTYPES: dict[str, DType] = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def stored_dtype(model: str | Path) -> DType | None:
    """The one floating dtype a local safetensors model is stored in; None when unknown or mixed.

    Reads only the safetensors headers (single file or the shards of an index); hub ids, ``.bin``
    folders and float64 weights give None.
    """
    folder = Path(model).expanduser()
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = [folder / "model.safetensors"]
    found: set[str] = set()
    for file in files:
        if not file.is_file():
            return None
        found |= {v["dtype"] for k, v in _safetensors_header(file).items() if k != "__metadata__"}
    floating = {d for d in found if d.startswith(("F", "BF"))}
    return _SAFETENSORS_DTYPES.get(floating.pop()) if len(floating) == 1 else None


def common_dtype(models: Sequence[str | Path]) -> DType:
    """The dtype a merge of ``models`` should be written in: the one they are all stored in, else float32.

    bf16 experts give a bf16 recipe (a float32 merge would be twice their size for no gain); mixed or
    unknown dtypes keep float32, which loses nothing.
    """
    dtypes = {stored_dtype(m) for m in models}
    only = dtypes.pop() if len(dtypes) == 1 else None
    return only or "float32"


def _safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (8-byte little-endian length, then the JSON)."""
    with path.open("rb") as f:
        length = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(length))


_PATH_PREFIXES = ("./", "../", "~", ".\\", "..\\")


def resolve_model_path(value: str, folder: str | Path) -> str:
    """``value`` as an absolute path when it is a local path relative to ``folder``; otherwise unchanged.

    A local path is one written as a path (``./x``, ``../x``, ``~/x``) or one that exists under
    ``folder``; anything else (``org/model``) is a hub id. Absolute paths are returned as they are.
    """
    path = Path(value).expanduser()
    if path.is_absolute():
        return str(path)
    candidate = Path(folder).expanduser() / path
    if value.startswith(_PATH_PREFIXES) or candidate.exists():
        return str(candidate.resolve())
    return value


def _map_values(spec: Any, fn: Any) -> Any:
    if isinstance(spec, Mapping):
        return {k: _map_values(v, fn) for k, v in spec.items()}
    if isinstance(spec, list | tuple):
        return [fn(v) for v in spec]
    return fn(spec)


def _is_number(value: Any) -> bool:
    """A real number, not a bool (YAML's ``yes`` would otherwise read as a drop of 1)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _iter_raw(spec: Any) -> list[Any]:
    """Every leaf value of an unvalidated spec (numbers, or whatever the user wrote)."""
    if isinstance(spec, Mapping):
        return [v for sub in spec.values() for v in _iter_raw(sub)]
    if isinstance(spec, list | tuple):
        return [v for sub in spec for v in _iter_raw(sub)]
    return [spec]


def _iter_values(spec: Any) -> list[float]:
    if isinstance(spec, Mapping):
        return [v for sub in spec.values() for v in _iter_values(sub)]
    if isinstance(spec, list | tuple):
        return [float(v) for v in spec]
    return [float(spec)]


def _check_values(spec: ParamSpec, field: str, ok: Any, what: str) -> None:
    bad = [v for v in _iter_values(spec) if not ok(v)]
    if bad:
        raise ValueError(f"{field} {what}; got {bad[:5]}")


def _check_anchor_lists(spec: ParamSpec, field: str) -> None:
    """An empty anchor list has no value to interpolate: reject it when the recipe is read."""
    values = spec.values() if isinstance(spec, dict) else [spec]
    if any(isinstance(v, list) and not v for v in values):
        raise ValueError(f"{field}: empty list of anchors")


def interpolate_anchors(anchors: Sequence[float], n_groups: int) -> np.ndarray:
    """Values at ``n_groups`` evenly spaced positions, linearly interpolated between anchors.

    The first anchor sits on the first group and the last on the last group (mergekit's gradients);
    as many anchors as groups gives exactly the anchors. A single group takes the anchors' mean.
    """
    anchors = np.asarray(anchors, dtype=np.float64)
    if anchors.size == 1 or n_groups == 1:
        return np.full(n_groups, anchors[0] if n_groups > 1 or anchors.size == 1 else anchors.mean())
    positions = np.linspace(0.0, anchors.size - 1, n_groups)
    return np.interp(positions, np.arange(anchors.size), anchors)


def resolve_parameter(spec: ParamSpec, tasks: Sequence[str], groups: Sequence[str], field: str) -> np.ndarray:
    """Expand a parameter spec into a ``[n_tasks, n_groups]`` float64 array.

    ``field`` (``weight``, ``density``) names the spec in errors: unknown task or group names,
    and tasks or groups left without a value, are errors rather than silently defaulted.
    """
    out = np.empty((len(tasks), len(groups)), dtype=np.float64)
    per_task = spec if isinstance(spec, dict) else {DEFAULT_KEY: spec}
    unknown = sorted(set(per_task) - set(tasks) - {DEFAULT_KEY})
    if unknown:
        raise RecipeError(f"{field}: unknown task(s) {unknown}; the tasks are {list(tasks)}")
    for t, task in enumerate(tasks):
        value = per_task.get(task, per_task.get(DEFAULT_KEY))
        if value is None:
            raise RecipeError(f"{field}: no value for task '{task}' (name it or give a '*' default)")
        out[t] = _resolve_groups(value, groups, f"{field}.{task}")
    return out


def _resolve_groups(value: GroupValue, groups: Sequence[str], where: str) -> np.ndarray:
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(groups) - {DEFAULT_KEY})
        if unknown:
            raise RecipeError(f"{where}: unknown layer group(s) {unknown}; this model's groups are {list(groups)}")
        missing = [g for g in groups if g not in value and DEFAULT_KEY not in value]
        if missing:
            raise RecipeError(f"{where}: no value for layer group(s) {missing} (name them or give a '*' default)")
        return np.array([float(value.get(g, value.get(DEFAULT_KEY))) for g in groups])
    if isinstance(value, list):
        if not value:
            raise RecipeError(f"{where}: empty list of anchors")
        return interpolate_anchors(value, len(groups))
    return np.full(len(groups), float(value))
