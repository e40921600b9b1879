"""``mergetune import-mergekit merge.yml``: a mergekit configuration as a mergetune recipe.

So a search can start from a merge someone already runs. The configuration is read strictly:
an unknown key or a parameter the method does not read is an error naming it (mergekit 0.1.5
silently ignores both). Every parameter is resolved per tensor exactly as mergekit resolves it
(slices, gradients over a slice's layers, ``filter`` conditions, precedence source > slice >
global > mergekit's default: ``settings.evaluate``), turned into mergetune's values by the inverse
of the exporter's rules (see ``mergekit.py``), then gathered per layer group. What a recipe
cannot hold exactly (values that differ inside a layer group, DARE's L1 ``rescale``, computing
in half precision, ...) is refused with the reason, or, with ``approximate``, replaced by the
closest value (the group's mean) with every difference listed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mergetune.errors import MergetuneError, RecipeError, read_config_file
from mergetune.export.layout import ModelLayout, read_layout
from mergetune.export.mergekit import band_mismatch, count_report, topk_mismatch
from mergetune.export.settings import Setting, evaluate
from mergetune.merging.methods import check_recipe
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
GTA = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "della")
# mergekit 0.1.5: method -> (shared parameters with defaults, per-model parameters with defaults; None = required)
SHARED_GTA = {"int8_mask": False, "lambda": 1.0}
DEFAULTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "linear": ({"normalize": True}, {"weight": None}),
    **{
        m: (
            {**SHARED_GTA, "normalize": m in ("ties", "della"), "rescale": m in ("dare_linear", "dare_ties", "della")},
            {"weight": None, "density": 1.0}
            | ({"gamma": 0.01} if m.startswith("breadcrumbs") else {})
            | ({"epsilon": 0.15} if m == "della" else {}),
        )
        for m in GTA
    },
}
DTYPES = {"float32", "bfloat16", "float16"}


class MergekitImportError(MergetuneError):
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
    out = INVERSES[resolved.method](resolved)
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
    if method not in DEFAULTS:
        raise MergekitImportError(
            f"{source}: merge_method '{method}' has no mergetune equivalent; importable methods: {sorted(DEFAULTS)}"
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
    shared_defaults, model_defaults = DEFAULTS[method]
    slices = _slices(config, source)
    models = list(slices[0].sources)
    base = _model_name(config.get("base_model"), source, "base_model") if config.get("base_model") else None
    if method == "linear":
        base = base or models[0]
    elif base is None:
        raise MergekitImportError(f"{source}: {method} needs a base_model")
    experts = [m for m in models if m != base] if method != "linear" else models
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
                per_model[p][m, i] = float(_first(p, [where.sources[model], *chain], name, t, default, source, model))
    return Resolved(method, base, experts, layout, per_model, shared, recipe_dtype(config))


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
def _flag(r: Resolved, param: str, diffs: list[str]) -> bool:
    """A boolean shared parameter; if it differs between tensors, the most common value (and a difference)."""
    values = [bool(v) for v in r.shared[param]]
    common = max(set(values), key=values.count)
    if len(set(values)) > 1:
        diffs.append(f"{param} differs between tensors; the recipe uses {common} everywhere")
    return common


def _scale_of(r: Resolved) -> np.ndarray:
    return np.array([float(v) for v in r.shared["lambda"]])


def _linear(r: Resolved) -> Imported:
    diffs: list[str] = []
    if not _flag(r, "normalize", diffs):
        raise MergekitImportError("linear with normalize: false sums the models' weights; mergetune has no such merge")
    return _recipe(r, "average", r.per_model["weight"], None, {}, diffs)


def _task_arithmetic(r: Resolved) -> Imported:
    diffs: list[str] = []
    return _recipe(r, r.method, _linear_weights(r, r.per_model["weight"]), None, {}, diffs)


def _linear_weights(r: Resolved, w: np.ndarray) -> np.ndarray:
    """Weights of a method without consensus: normalize divides by Σ w (|Σ| < 1e-8: 1), lambda multiplies."""
    normalize = np.array([bool(v) for v in r.shared["normalize"]])
    total = w.sum(axis=0)
    w = np.where(normalize[None, :], w / np.where(np.abs(total) < 1e-8, 1.0, total), w)
    return w * _scale_of(r)[None, :]


def _ties(r: Resolved) -> Imported:
    diffs: list[str] = []
    density = r.per_model["density"]
    diffs += count_report(r.layout.names, _names(r), topk_mismatch(_numel(r), density), "mergekit max(1, ⌊d·n⌋)")
    weight, options = _consensus(r, np.ones_like(density), diffs)
    return _recipe(r, "ties", weight, density, {"scope": "tensor", **options}, diffs)


def _breadcrumbs(r: Resolved) -> Imported:
    diffs: list[str] = []
    density = r.per_model["density"]
    gamma = _uniform_scalar(r.per_model["gamma"], "gamma", diffs)
    diffs += count_report(r.layout.names, _names(r), band_mismatch(_numel(r), density, gamma), "outlier band")
    if r.method == "breadcrumbs":
        weight, options = _linear_weights(r, r.per_model["weight"]), {}
    else:
        weight, options = _consensus(r, np.ones_like(density), diffs)
    return _recipe(r, r.method, weight, density, {"scope": "tensor", "gamma": gamma, **options}, diffs)


def _dare(r: Resolved) -> Imported:
    """DARE; 1-D tensors kept whole (density 1) while the others are dropped is mergetune's ``skip_1d``."""
    diffs: list[str] = []
    density = r.per_model["density"]
    is_1d = np.array([r.layout.ndim[n] < 2 for n in r.layout.names])
    skip_1d = bool(is_1d.any() and (density[:, is_1d] == 1).all() and (density[:, ~is_1d] < 1).any())
    options: dict[str, Any] = {"skip_1d": True} if skip_1d else {}
    use = ~is_1d if skip_1d else None
    c = _random_rescale(r, density, diffs)
    if r.method == "dare_linear":
        weight = _linear_weights(r, r.per_model["weight"] / c)
        return _recipe(r, "dare_linear", weight, density, options, diffs, use)
    weight, consensus = _consensus(r, c, diffs)
    return _recipe(r, "dare_ties", weight, density, {"scope": "tensor", **options, **consensus}, diffs, use)


def _della(r: Resolved) -> Imported:
    """Exact in distribution only at epsilon 0 without rescale (keep with probability d, mergetune divides by d)."""
    diffs: list[str] = []
    density = r.per_model["density"]
    epsilon = _uniform_scalar(r.per_model["epsilon"], "epsilon", diffs)
    if epsilon == 0.0:
        c = _random_rescale(r, density, diffs)
    else:
        c = np.ones_like(density)
        diffs.append(
            "della's rescale: true restores each tensor's L1 norm with one factor (rescale: false keeps the survivors "
            "unscaled); mergetune divides each kept entry by its own keep probability"
            if _flag(r, "rescale", diffs)
            else "della with rescale: false keeps MagPrune's survivors unscaled; mergetune divides each by its p"
        )
    if not _flag(r, "normalize", diffs):
        diffs.append("della with normalize: false sums the agreeing entries; mergetune's della takes the weighted mean")
    weight, options = _consensus(r, c, diffs, normalize=True)
    options.pop("disjoint")
    return _recipe(r, "della", weight, density, {"epsilon": epsilon, **options}, diffs)


def _random_rescale(r: Resolved, density: np.ndarray, diffs: list[str]) -> np.ndarray:
    """mergetune's factor c on mergekit's sparsified values: 1/d without rescale; rescale: true is L1 (≈ 1/d)."""
    if _flag(r, "rescale", diffs):
        diffs.append(
            "rescale: true scales a tensor's kept entries to restore its L1 norm; mergetune divides them by the "
            "density (equal in expectation); write rescale: false for an exact import"
        )
        return np.ones_like(density)
    return np.divide(1.0, density, out=np.ones_like(density), where=density > 0)


def _consensus(
    r: Resolved, c: np.ndarray, diffs: list[str], normalize: bool | None = None
) -> tuple[np.ndarray, dict[str, Any]]:
    """Inverse of the exporter's ``consensus``: λ = w / c, election before the weights, disjoint from normalize."""
    weight = r.per_model["weight"] / c
    scale = _scale_of(r)
    if normalize is None:
        normalize = _flag(r, "normalize", diffs)
    if normalize:
        return _normalized(weight, c, scale, r.per_model["weight"], diffs)
    if np.ptp(scale) > 1e-12 and (scale > 0).all():
        return weight * scale[None, :], {"disjoint": "sum", "weights": "before_election", "scale": 1.0}
    return weight, {"disjoint": "sum", "weights": "before_election", "scale": _one(scale, diffs)}


def _normalized(
    weight: np.ndarray, c: np.ndarray, scale: np.ndarray, w: np.ndarray, diffs: list[str]
) -> tuple[np.ndarray, dict[str, Any]]:
    """mergekit's normalize: lambda · Σ w s m / Σ w m, with w = λ c (see the exporter's ``consensus``).

    A uniform lambda is mergetune's weighted mean (scale = lambda / c). A lambda that varies with the
    tensor is expressible where the weights of a tensor are equal: that is the official dis-mean,
    Σ λ v m / count, with λ_t = lambda / c_t.
    """
    active = weight != 0
    c_equal = _equal_columns(c, active)
    if not c_equal.all():
        diffs.append("normalize with different densities per model in a tensor: the weighted means differ")
    c_bar = np.where(active, c, 0).sum(0) / np.maximum(active.sum(0), 1)
    ratio = scale / np.where(c_bar > 0, c_bar, 1.0)
    varies = np.ptp(scale) > 1e-12 * max(1.0, float(np.abs(scale).max()))
    if varies and _equal_columns(w, w != 0).all() and (w >= 0).all() and (scale > 0).all():
        mean_weight = np.divide(scale[None, :], c, out=np.zeros_like(c), where=active)
        return mean_weight, {"disjoint": "mean", "weights": "before_election", "scale": 1.0}
    return weight, {"disjoint": "weighted_mean", "weights": "before_election", "scale": _one(ratio, diffs)}


def _equal_columns(values: np.ndarray, active: np.ndarray) -> np.ndarray:
    """``[N]``: the active entries of each column are equal (to 1e-12 relative)."""
    big = np.where(active, values, -np.inf).max(0)
    small = np.where(active, values, np.inf).min(0)
    some = active.any(0)
    return np.where(some, big - small, 0.0) <= 1e-12 * np.maximum(1.0, np.abs(np.where(some, big, 0.0)))


def _one(values: np.ndarray, diffs: list[str]) -> float:
    """The options' single scale: uniform over tensors, else the mean (and a difference)."""
    if np.ptp(values) > 1e-12 * max(1.0, float(np.abs(values).max())):
        diffs.append("lambda differs between tensors and cannot be folded into the weights; the recipe uses its mean")
    return _tidy(float(values.mean()))


def _uniform_scalar(values: np.ndarray, name: str, diffs: list[str]) -> float:
    if np.ptp(values) > 0:
        diffs.append(f"{name} differs between models or tensors; the recipe uses its mean {values.mean():g}")
        return _tidy(float(values.mean()))
    return float(values.flat[0])


INVERSES = {
    "linear": _linear,
    "task_arithmetic": _task_arithmetic,
    "ties": _ties,
    "breadcrumbs": _breadcrumbs,
    "breadcrumbs_ties": _breadcrumbs,
    "dare_linear": _dare,
    "dare_ties": _dare,
    "della": _della,
}


# ---- the recipe ------------------------------------------------------------------------------------------
def _recipe(
    r: Resolved,
    method: str,
    weight: np.ndarray,
    density: np.ndarray | None,
    options: dict[str, Any],
    diffs: list[str],
    use: np.ndarray | None = None,
) -> Imported:
    """The recipe from per-tensor ``[T, N]`` values; ``use`` masks the tensors that set the group values."""
    names = _names(r)
    fields: dict[str, Any] = {
        "base": r.base,
        "experts": [_expert(n, m) for n, m in zip(names, r.models, strict=True)],
        "method": method,
        "weight": per_group_spec(r.layout, weight, names, "weight", diffs, use),
        "options": options,
        "dtype": r.dtype,
    }
    if density is not None:
        fields["density"] = per_group_spec(r.layout, density, names, "density", diffs, use)
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
        table = np.vectorize(_tidy)(table)
    per_task = {t: _group_value(table[i], groups) for i, t in enumerate(tasks)}
    if len({repr(v) for v in per_task.values()}) > 1:
        return per_task
    shared = next(iter(per_task.values()))
    return shared if isinstance(shared, float) else {DEFAULT_KEY: shared}


def _tidy(value: float) -> float:
    """12 significant digits: the noise of λ·d/d (1e-16) goes, decimals come back as written (float32: 1e-7)."""
    return float(f"{value:.12g}")


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
