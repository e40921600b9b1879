"""``mergetune import-mergekit merge.yml``: a mergekit configuration as a mergetune recipe.

So a search can start from a merge someone already runs. The configuration is read strictly:
an unknown key or a parameter the method does not read is an error naming it (mergekit 0.1.5
silently ignores both). Every parameter is resolved per tensor exactly as mergekit resolves it
(slices, gradients over a slice's layers, ``filter`` conditions, precedence source > slice >
global > mergekit's default: ``settings.evaluate``), turned into mergetune's values by the inverse
hook declared on the method class whose ``mergekit`` spec names that mergekit method (see
``mergetune.merging.mergekit_spec``), then gathered per layer group. What a recipe
cannot hold exactly (values that differ inside a layer group, DARE's L1 ``rescale``, computing
in half precision, ...) is refused with the reason, or, with ``approximate``, replaced by the
closest value (the group's mean) with every difference listed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from mergetune.errors import RecipeError, read_config_file
from mergetune.export.layout import ModelLayout, read_layout
from mergetune.export.settings import Setting, evaluate
from mergetune.merging.mergekit_spec import (
    BASE_INPUT,
    BASE_OPTIONAL,
    ImportedValues,
    ImportTables,
    MergekitSpec,
    MergekitUnsupported,
    tidy,
)
from mergetune.merging.methods import METHODS, check_recipe
from mergetune.recipe import DEFAULT_KEY, Recipe

TOP_KEYS = {
    "merge_method",
    "base_model",
    "models",
    "slices",
    "dtype",
    "out_dtype",
    "parameters",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
    "name",  # mergekit-multi's merge name
}
DTYPES = {"float32", "bfloat16", "float16"}


class MergekitImportError(MergekitUnsupported):
    """A mergekit configuration that mergetune cannot read or cannot express as a recipe."""


@dataclass
class Resolved:
    """Every parameter resolved for every merged tensor: per model ``[M, N]`` and shared ``[N]``."""

    method: str
    base: str
    models: list[str]  # the experts, in order
    layout: ModelLayout
    per_model: dict[str, np.ndarray]
    shared: dict[str, np.ndarray]
    dtype: str = "float32"  # the recipe's output dtype
    has_base: bool = True  # the configuration names a base_model


@dataclass
class Imported:
    """The recipe, and what it does not reproduce (empty when exact) or does not carry (notes)."""

    recipe: Recipe
    differences: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# ---- reading -------------------------------------------------------------------------------------------
def import_mergekit(path: str | Path, *, approximate: bool = False) -> Imported:
    """Read a mergekit YAML file and return the equivalent recipe (see the module docstring)."""
    data = read_config_file(path, "mergekit configuration", MergekitImportError)
    return import_config(data, source=str(path), approximate=approximate)


def import_config(data: Any, *, source: str = "mergekit config", approximate: bool = False) -> Imported:
    """The recipe of a parsed mergekit configuration; errors name ``source`` and the key at fault."""
    config = _check_config(data, source)
    resolved = resolve(config, source)
    out = _invert(resolved)
    out.differences = _config_differences(config) + out.differences
    out.notes += _notes(config, resolved)
    if out.differences and not approximate:
        listed = "\n".join(f"  - {d}" for d in out.differences)
        raise MergekitImportError(
            f"{source}: a mergetune recipe cannot reproduce this mergekit merge exactly:\n{listed}\n"
            "Pass --approximate to write the closest recipe anyway."
        )
    return out


def _check_config(data: Any, source: str) -> dict[str, Any]:
    if not isinstance(data, Mapping):
        raise MergekitImportError(f"{source}: expected a mapping of mergekit settings, got {type(data).__name__}")
    unknown = sorted(set(data) - TOP_KEYS)
    if "modules" in unknown:
        raise MergekitImportError(f"{source}: 'modules' (multi-module merges) cannot be imported; use models or slices")
    if unknown:
        raise MergekitImportError(
            f"{source}: unknown key(s) {unknown} (mergekit would silently ignore them; check the spelling); "
            f"known keys: {sorted(TOP_KEYS)}"
        )
    method = data.get("merge_method")
    if method not in importable():
        raise MergekitImportError(
            f"{source}: merge_method '{method}' has no mergetune equivalent; importable methods: {sorted(importable())}"
        )
    if bool(data.get("models")) == bool(data.get("slices")):
        raise MergekitImportError(f"{source}: give exactly one of 'models' and 'slices'")
    return dict(data)


# ---- resolution, as mergekit does it -------------------------------------------------------------------
@dataclass(frozen=True)
class _Slice:
    layers: tuple[int, int] | None  # None: the whole model (``models:`` form)
    sources: dict[str, Mapping[str, Setting]]  # model -> its parameters
    params: Mapping[str, Setting]


def resolve(config: Mapping[str, Any], source: str) -> Resolved:
    """Resolve every parameter for every merged tensor of the base (see ``settings.evaluate``)."""
    method = config["merge_method"]
    inverse = importable()[method].inverse
    assert inverse is not None  # importable() lists only specs with an inverse
    shared_defaults, model_defaults = inverse.shared, inverse.per_model
    slices = _slices(config, source)
    models = list(slices[0].sources)
    named = _model_name(config.get("base_model"), source, "base_model") if config.get("base_model") else None
    base, experts = _roles(method, inverse.base, named, models, source)
    _check_params(config, slices, (set(shared_defaults), set(model_defaults)), method, source)
    layout = read_layout(base)
    global_params = config.get("parameters") or {}
    per_model = {p: np.empty((len(experts), len(layout.names))) for p in model_defaults}
    shared = {p: np.empty(len(layout.names), dtype=object) for p in shared_defaults}
    for i, name in enumerate(layout.names):
        where, t = _place(layout, name, slices)
        chain = [where.params, global_params]
        for p, default in shared_defaults.items():
            shared[p][i] = _first(p, chain, name, t, default, source)
        for m, model in enumerate(experts):
            for p, default in model_defaults.items():
                own = where.sources.get(model, {})  # a base_model that mergekit adds as an input has no parameters
                per_model[p][m, i] = float(_first(p, [own, *chain], name, t, default, source, model))
    return Resolved(method, base, experts, layout, per_model, shared, recipe_dtype(config), named is not None)


def _roles(method: str, policy: str, named: str | None, models: list[str], source: str) -> tuple[str, list[str]]:
    """The recipe's base and experts, from what base_model is to mergekit's method (``MergekitInverse.base``).

    A method without a base role (linear, karcher, passthrough) merges every model, and mergekit adds a
    base_model missing from the models as one more input; its layout is the base's, else the first model's.
    """
    if policy == BASE_INPUT:
        return named or models[0], models + ([named] if named and named not in models else [])
    if named is None:
        if policy == BASE_OPTIONAL:
            return models[0], models  # interpolates the models' weights: the base only gives the layout
        raise MergekitImportError(f"{source}: {method} needs a base_model")
    return named, [m for m in models if m != named]


def _slices(config: Mapping[str, Any], source: str) -> list[_Slice]:
    if config.get("models"):
        return [_Slice(None, _sources(config["models"], source, "models"), {})]
    out, previous, models = [], 0, None
    for k, item in enumerate(config["slices"]):
        where = f"slices[{k}]"
        _only(item, {"sources", "parameters", "base_model", "residual_weight"}, source, where)
        if item.get("residual_weight") is not None or item.get("base_model") is not None:
            raise MergekitImportError(f"{source}: {where}: per-slice base_model/residual_weight cannot be imported")
        ranges = {tuple(s.get("layer_range") or ()) for s in item.get("sources") or []}
        if len(ranges) != 1 or len(next(iter(ranges))) != 2 or next(iter(ranges))[0] != previous:
            raise MergekitImportError(
                f"{source}: {where}: every source must have the same layer_range, continuing the previous slice "
                "(slices that stack or reorder layers build a new architecture, not a merge of one)"
            )
        first, last = next(iter(ranges))
        sources = _sources(item["sources"], source, f"{where}.sources")
        if models is not None and list(sources) != models:
            raise MergekitImportError(f"{source}: {where}: every slice must merge the same models, in the same order")
        models = list(sources)
        out.append(_Slice((int(first), int(last)), sources, item.get("parameters") or {}))
        previous = int(last)
    return out


def _sources(items: Any, source: str, where: str) -> dict[str, Mapping[str, Setting]]:
    if not isinstance(items, list) or not items:
        raise MergekitImportError(f"{source}: {where}: expected a list of {{model, parameters}}")
    out: dict[str, Mapping[str, Setting]] = {}
    for k, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise MergekitImportError(f"{source}: {where}[{k}]: expected a mapping with 'model'")
        _only(item, {"model", "parameters", "layer_range"}, source, f"{where}[{k}]")
        out[_model_name(item.get("model"), source, f"{where}[{k}].model")] = item.get("parameters") or {}
    return out


def _model_name(ref: Any, source: str, where: str) -> str:
    if isinstance(ref, Mapping):
        raise MergekitImportError(f"{source}: {where}: structured model references are not supported; give a path")
    if not isinstance(ref, str) or not ref:
        raise MergekitImportError(f"{source}: {where}: expected a model path or hub id")
    if "+" in ref:
        raise MergekitImportError(f"{source}: {where}: '{ref}' applies a LoRA; merge it first and name that folder")
    return ref


def _only(item: Mapping[str, Any], allowed: set[str], source: str, where: str) -> None:
    unknown = sorted(set(item) - allowed)
    if unknown:
        raise MergekitImportError(
            f"{source}: {where}: unknown key(s) {unknown} (mergekit ignores them); known: {sorted(allowed)}"
        )


def _check_params(
    config: Mapping[str, Any], slices: list[_Slice], params: tuple[set[str], set[str]], method: str, source: str
) -> None:
    """Every parameter name must be one the method reads where it stands (mergekit silently ignores the rest).

    ``params`` = (shared, per-model) names: shared ones are read from the top-level and slice ``parameters``
    only, so one written among a model's parameters would be ignored too.
    """
    shared, per_model = params
    blocks = [("parameters", config.get("parameters") or {}, shared | per_model)]
    for k, s in enumerate(slices):
        blocks.append((f"slices[{k}].parameters", s.params, shared | per_model))
        blocks += [(f"the parameters of '{m}'", p, per_model) for m, p in s.sources.items()]
    for where, given, known in blocks:
        if not isinstance(given, Mapping):
            raise MergekitImportError(f"{source}: {where}: expected a mapping of parameter -> setting")
        unknown = sorted(set(given) - known)
        if unknown:
            raise MergekitImportError(
                f"{source}: {where}: {method} does not read {unknown} there (mergekit silently ignores it); "
                f"it reads {sorted(known)} there"
            )


def _place(layout: ModelLayout, name: str, slices: list[_Slice]) -> tuple[_Slice, float]:
    """The slice that mergekit reads a tensor's parameters from, and the gradient position t there."""
    if name not in layout.layer:
        first = layout.groups.names.index(layout.group_of(name)) == 0
        return (slices[0] if first else slices[-1]), 0.0
    layer = layout.layer[name]
    total = max(layout.layer.values()) + 1
    for s in slices:
        lo, hi = s.layers or (0, total)
        if lo <= layer < hi:
            return s, (layer - lo) / (hi - lo - 1) if hi - lo > 1 else 1.0
    raise MergekitImportError(f"layer {layer} of the base ('{name}') is in no slice: the slices must cover every layer")


def _first(
    param: str,
    chain: Sequence[Mapping[str, Setting]],
    name: str,
    t: float,
    default: Any,
    source: str,
    model: str | None = None,
) -> Any:
    """The first setting of ``param`` along ``chain`` that resolves for ``name``, else mergekit's default."""
    for params in chain:
        if param in params:
            value = evaluate(params[param], name, t)
            if value is not None:
                return value
    if default is None:
        raise MergekitImportError(f"{source}: no '{param}' for model '{model}' on tensor '{name}' (mergekit needs one)")
    return default


# ---- from mergekit's values to mergetune's ---------------------------------------------------------------
def importable() -> dict[str, MergekitSpec]:
    """mergekit method -> the spec of the registered method it imports as (the one that declares the inverse).

    A method's ``also_imports`` (mergekit methods that are it with other options) are listed under their own
    name, as the spec with that method and inverse.
    """
    out: dict[str, MergekitSpec] = {}
    for name, method in METHODS.items():
        spec = method.mergekit
        if not isinstance(spec, MergekitSpec):
            continue
        inverses = {spec.method: spec.inverse} if spec.inverse is not None else {}
        for mergekit_method, inverse in {**inverses, **spec.also_imports}.items():
            if mergekit_method in out:
                raise ValueError(f"mergekit's {mergekit_method} imports as two methods, one of them '{name}'")
            out[mergekit_method] = replace(spec, method=mergekit_method, inverse=inverse)
    return out


def _invert(r: Resolved) -> Imported:
    """The recipe of resolved values, by the inverse hook of the method that mergekit's method imports as."""
    inverse = importable()[r.method].inverse
    assert inverse is not None
    tables = ImportTables(
        method=r.method,
        tasks=_names(r),
        names=r.layout.names,
        numel=_numel(r),
        is_1d=np.array([r.layout.ndim[n] < 2 for n in r.layout.names]),
        per_model=r.per_model,
        shared=r.shared,
        has_base=r.has_base,
    )
    try:
        values = inverse.invert(tables)
    except MergekitUnsupported as exc:
        raise MergekitImportError(str(exc)) from exc
    return _recipe(r, values)


# ---- the recipe ------------------------------------------------------------------------------------------
def _recipe(r: Resolved, values: ImportedValues) -> Imported:
    """The recipe from per-tensor ``[T, N]`` values; ``values.use`` masks the tensors that set the group values."""
    names, diffs, use = _names(r), values.differences, values.use
    fields: dict[str, Any] = {
        "base": r.base,
        "experts": [_expert(n, m) for n, m in zip(names, r.models, strict=True)],
        "method": values.method,
        "weight": per_group_spec(r.layout, values.weight, names, "weight", diffs, use),
        "options": values.options,
        "dtype": r.dtype,
    }
    if values.density is not None:
        fields["density"] = per_group_spec(r.layout, values.density, names, "density", diffs, use)
    try:
        recipe = check_recipe(Recipe.model_validate(fields))
    except Exception as exc:
        raise RecipeError(f"the imported recipe does not validate: {exc}") from exc
    return Imported(recipe, diffs)


def per_group_spec(
    layout: ModelLayout,
    values: np.ndarray,
    tasks: Sequence[str],
    field_name: str,
    diffs: list[str],
    use: np.ndarray | None = None,
) -> Any:
    """``[T, N]`` per-tensor values as the shortest recipe spec (number, per task, per task and group).

    A group whose tensors disagree gets their mean, and a difference says where.
    """
    groups = list(layout.groups.names)
    index = np.array([layout.groups.index(n) for n in layout.names])
    table = np.empty((len(tasks), len(groups)))
    for g in range(len(groups)):
        member = index == g
        cols = values[:, member & use] if use is not None and (member & use).any() else values[:, member]
        table[:, g] = cols[:, 0]
        if np.ptp(cols, axis=1).max() > 1e-12 * max(1.0, float(np.abs(cols).max())):
            table[:, g] = cols.mean(axis=1)
            diffs.append(f"{field_name} differs between tensors of layer group '{groups[g]}'; the recipe uses the mean")
    if field_name == "weight":  # densities are read back verbatim: their top-k counts must not move
        table = np.vectorize(tidy)(table)
    per_task = {t: _group_value(table[i], groups) for i, t in enumerate(tasks)}
    if len({repr(v) for v in per_task.values()}) > 1:
        return per_task
    shared = next(iter(per_task.values()))
    return shared if isinstance(shared, float) else {DEFAULT_KEY: shared}


def _group_value(row: np.ndarray, groups: list[str]) -> float | dict[str, float]:
    if np.ptp(row) == 0:
        return float(row[0])
    counts = {v: int((row == v).sum()) for v in row.tolist()}
    common = max(counts, key=lambda v: counts[v])
    spec = {g: float(v) for g, v in zip(groups, row.tolist(), strict=True) if v != common}
    return {**spec, DEFAULT_KEY: float(common)}


def _names(r: Resolved) -> list[str]:
    """Task names from the model paths' last component, made unique."""
    out: list[str] = []
    for model in r.models:
        stem = Path(model.rstrip("/").split("@")[0]).name or "expert"
        name, k = stem, 2
        while name in out:
            name, k = f"{stem}-{k}", k + 1
        out.append(name)
    return out


def _expert(name: str, model: str) -> dict[str, Any]:
    path, _, revision = model.partition("@")
    return {"name": name, "model": path, "revision": revision or None}


def _numel(r: Resolved) -> np.ndarray:
    return np.array([r.layout.numel[n] for n in r.layout.names], dtype=np.float64)


def _config_differences(config: Mapping[str, Any]) -> list[str]:
    """Settings that change the weights but are not part of a recipe: compute dtype, tokenizer surgery."""
    compute = config.get("dtype") or "float32"
    out = config.get("out_dtype") or compute
    diffs = []
    if compute != "float32":
        diffs.append(f"dtype: {compute}: mergekit computes in {compute}, mergetune in float32 (rounding differs)")
    if out not in DTYPES:
        diffs.append(f"out_dtype {out} is not one of {sorted(DTYPES)}; the recipe writes float32")
    tokenizer = config.get("tokenizer_source") or (config.get("tokenizer") or {}).get("source")
    if tokenizer not in (None, "base"):
        diffs.append(f"tokenizer_source '{tokenizer}' rebuilds the embedding rows; mergetune keeps the base's")
    return diffs


def recipe_dtype(config: Mapping[str, Any]) -> str:
    out = config.get("out_dtype") or config.get("dtype") or "float32"
    return out if out in DTYPES else "float32"


def _notes(config: Mapping[str, Any], r: Resolved) -> list[str]:
    notes = []
    if any(bool(v) for v in r.shared.get("int8_mask", [])):
        notes.append("int8_mask only changes the dtype of mergekit's sign mask, not the result: dropped")
    if config.get("chat_template"):
        notes.append("chat_template is not part of a recipe: set it on the merged model's tokenizer")
    if r.layout.task_specific:
        notes.append(f"task heads {list(r.layout.task_specific)[:3]} are kept per task by mergetune, not merged")
    return notes
