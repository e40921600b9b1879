"""``mergetune export RECIPE --format mergekit``: a mergekit configuration that reproduces a recipe.

What mergekit 0.1.5 computes, per tensor, for its task-arithmetic family (``task_arithmetic``,
``ties``, ``dare_linear``, ``dare_ties``, ``breadcrumbs``, ``breadcrumbs_ties``, ``della``):

    δ_t = sparsify(θ_t − θ_0, density_t)          magnitude top-k per tensor, Bernoulli, band, MagPrune
    δ'_t = weight_t · δ_t
    mask_t = sign(δ'_t) == sign(Σ_t δ'_t)         only with a sign consensus (ties, dare_ties, ...)
    Δ = Σ_t δ'_t mask_t  [/ Σ_t weight_t mask_t if normalize]  · lambda

and ``linear`` is Σ w_t θ_t / Σ w_t. The translation gives each tensor the weight, density and
shared parameters that make this equal to mergetune's merge of the recipe:

- weights: ``weight_t = λ_t · c_t``, where ``c_t`` rescales mergekit's sparsified δ_t to
  mergetune's (DARE keeps entries with probability d and mergetune divides them by d: ``c = 1/d``
  with ``rescale: false``, since mergekit's ``rescale: true`` restores the tensor's L1 norm
  instead). mergekit's election then sees λ_t·v_t, which is mergetune's ``weights:
  before_election``; ``after_election`` is the same only where the λ_t of a group are equal.
- disjoint merge: ``sum`` is ``normalize: false``; ``weighted_mean`` divides by Σ λ_t c_t m_t, so
  it is ``normalize: true`` with ``lambda = scale · c`` where the c_t of a group are equal; ``mean``
  (official TIES) divides by the count, ``normalize: true`` with ``lambda = scale · λ c`` where the
  λ_t c_t are equal.
- densities are fractions kept on both sides; top-k counts are checked tensor by tensor (mergekit
  keeps max(1, ⌊d·n⌋), mergetune ⌊d·n⌋, and Breadcrumbs' outlier band is counted per tensor).
- per-layer-group values: one slice per group of blocks when values change with depth (the base in
  every slice), and ``filter`` conditions for the embeddings and final tensors (mergekit reads those
  with the first and last slice) and for tensors a group treats apart (DARE's ``skip_1d``).

Exactness, method by method: see the README table ("Export to mergekit"). Anything mergekit cannot do
exactly (a global or per-row top-k, official TIES with per-task λ, DELLA's per-entry rescale,
PCB, TSV-M) is refused with the reason, or, with ``approximate``, written as the closest
configuration with every difference listed in its header and on stderr.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from mergetune.errors import MergetuneError
from mergetune.export.layout import ModelLayout, architectures_of, read_layout, tensor_shapes
from mergetune.export.settings import Setting, Value, encode
from mergetune.merging.methods import check_recipe, method_options
from mergetune.recipe import Recipe, resolve_parameter

KEEP_GUARD = 1e-9  # mergetune's floor guard in keep counts (stats.keep_counts)
EXACT, IN_DISTRIBUTION, APPROXIMATE = "exact", "in distribution", "approximate"
# mergekit 0.1.5 problems with an architecture, said in the export's notes (the export itself is right).
KNOWN_ISSUES = {
    "BertModel": "mergekit 0.1.5 fails to plan BertModel checkpoints (TypeError on the optional "
    "'embeddings.position_ids', whose aliases are a tuple in its bert.json); BertForSequenceClassification "
    "checkpoints merge",
    "RobertaModel": "mergekit 0.1.5's roberta.json expects 'roberta.'-prefixed names, which RobertaModel "
    "checkpoints saved by transformers do not have",
}


class ExportError(MergetuneError):
    """mergekit cannot run this recipe as it is; the message says why and what to do."""


@dataclass
class Translation:
    """mergekit's method and per-tensor parameter values for one recipe, and what they do not reproduce."""

    method: str
    per_input: dict[str, dict[str, np.ndarray]]  # param -> [T, N] values (task x tensor)
    shared: dict[str, np.ndarray | Value]  # param -> [N] values, or one value for every tensor
    faithful: str = EXACT
    differences: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    with_base: bool = True


@dataclass(frozen=True)
class ExportContext:
    """The recipe's parameters expanded to every merged tensor: ``[T, N]`` arrays in layout order."""

    recipe: Recipe
    layout: ModelLayout
    options: Any
    weight: np.ndarray  # [T, N]
    density: np.ndarray  # [T, N]

    @property
    def tasks(self) -> list[str]:
        return self.recipe.task_names

    @property
    def names(self) -> tuple[str, ...]:
        """The merged tensors, then the task-specific ones (weight 0)."""
        return (*self.layout.names, *self.layout.task_specific)

    @property
    def merged(self) -> np.ndarray:
        """``[N]``: the tensor is one mergetune merges (not a task head)."""
        return np.arange(len(self.names)) < len(self.layout.names)

    @property
    def numel(self) -> np.ndarray:
        return np.array([self.layout.numel[n] for n in self.names], dtype=np.float64)

    @property
    def is_1d(self) -> np.ndarray:
        return np.array([self.layout.ndim[n] < 2 for n in self.names])

    def groups_of(self, columns: np.ndarray) -> list[str]:
        """Names of the layer groups holding the tensors selected by a ``[N]`` mask, in depth order."""
        hit = {self.layout.group_of(n) for n, c in zip(self.layout.names, columns, strict=False) if c}
        return [g for g in self.layout.groups.names if g in hit]


@dataclass(frozen=True)
class MergekitExport:
    """The configuration (as a dict and as commented YAML), how faithful it is, and what differs."""

    config: dict[str, Any]
    yaml: str
    method: str
    faithful: str
    differences: list[str]
    notes: list[str]


# ---- entry point -----------------------------------------------------------------------------------
def export_mergekit(recipe: Recipe, *, approximate: bool = False, source: str = "recipe") -> MergekitExport:
    """Translate a recipe to a mergekit configuration (see the module docstring).

    Raises ``ExportError`` when mergekit cannot reproduce the recipe and ``approximate`` is False,
    or when it cannot run it at all (different architectures, task-specific tensors).
    """
    check_recipe(recipe, source)
    translate = TRANSLATORS.get(recipe.method)
    if translate is None:
        raise ExportError(
            f"{source}: method '{recipe.method}' has no mergekit equivalent; methods that export: {sorted(TRANSLATORS)}"
        )
    layout = read_layout(recipe.base, recipe.grouping.granularity)
    notes = _check_models(recipe, layout, source)
    ctx = _context(recipe, layout)
    tr = translate(ctx)
    tr.notes = notes + tr.notes
    if tr.differences:
        tr.faithful = APPROXIMATE
    if tr.differences and not approximate:
        listed = "\n".join(f"  - {d}" for d in tr.differences)
        raise ExportError(
            f"{source}: mergekit cannot reproduce this {recipe.method} recipe exactly:\n{listed}\n"
            "Change the recipe as suggested, or pass --approximate to write the closest mergekit configuration."
        )
    config = build_config(ctx, tr)
    return MergekitExport(
        config, render_yaml(config, recipe, tr, source), tr.method, tr.faithful, tr.differences, tr.notes
    )


def _check_models(recipe: Recipe, layout: ModelLayout, source: str) -> list[str]:
    """mergekit merges models of one architecture, tensor by tensor: refuse what it cannot run.

    Returns notes: what holds but is worth saying (task heads left at the base's values, known
    mergekit problems with the architecture).
    """
    notes = [KNOWN_ISSUES[a] for a in layout.architectures if a in KNOWN_ISSUES]
    for expert in recipe.experts:
        folder = Path(expert.model).expanduser()
        if not folder.is_dir():
            continue  # a hub id: not fetched just to compare configs
        arch = architectures_of(folder)
        if layout.architectures and arch and arch != layout.architectures:
            raise ExportError(
                f"{source}: expert '{expert.name}' is {'/'.join(arch)} and the base is "
                f"{'/'.join(layout.architectures)}: mergekit merges models of one architecture (their task heads "
                "differ; mergetune keeps them per task). Save each expert's shared model without its head "
                "(AutoModel.from_pretrained(expert).save_pretrained(dir)) and point the recipe at those folders"
            )
        _check_heads(expert.name, layout, tensor_shapes(folder), source)
    if layout.task_specific:
        if recipe.method == "average":
            raise ExportError(
                f"{source}: average exports to mergekit's linear, which would average the task heads "
                f"{list(layout.task_specific)[:3]} that mergetune keeps per task; use task_arithmetic with weights "
                "w_t / sum(w) (the same merge of the shared tensors) to export"
            )
        notes.append(
            f"task-specific tensors {_short(layout.task_specific)} (heads) get weight 0: mergekit writes the base's; "
            "mergetune keeps each expert's in heads/<task>.safetensors"
        )
    return notes


def _check_heads(
    expert: str, layout: ModelLayout, shapes: dict[str, tuple[tuple[int, ...], bool]], source: str
) -> None:
    for name in layout.task_specific:
        theirs = shapes.get(name, ((), False))[0]
        if math.prod(theirs) != layout.numel[name] or len(theirs) != layout.ndim[name]:
            raise ExportError(
                f"{source}: expert '{expert}' has task head '{name}' of shape {tuple(theirs)}, unlike the base's: "
                "mergekit merges every tensor and needs the same shapes; export models without their heads"
            )


def _short(names: tuple[str, ...]) -> str:
    return ", ".join(names[:3]) + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")


def _context(recipe: Recipe, layout: ModelLayout) -> ExportContext:
    """Per-tensor λ and density; task-specific tensors (heads) get weight 0 and density 1: left at the base's."""
    groups = list(layout.groups.names)
    index = np.array([layout.groups.index(n) for n in layout.names])
    heads = np.zeros((len(recipe.experts), len(layout.task_specific)))
    weight = resolve_parameter(recipe.weight, recipe.task_names, groups, "weight")[:, index]
    density = resolve_parameter(recipe.density, recipe.task_names, groups, "density")[:, index]
    return ExportContext(
        recipe,
        layout,
        method_options(recipe),
        np.concatenate([weight, heads], axis=1),
        np.concatenate([density, heads + 1.0], axis=1),
    )


# ---- method translations ---------------------------------------------------------------------------
def _average(ctx: ExportContext) -> Translation:
    return Translation("linear", {"weight": ctx.weight}, {"normalize": True}, with_base=False)


def _task_arithmetic(ctx: ExportContext) -> Translation:
    return Translation("task_arithmetic", {"weight": ctx.weight}, {"normalize": False, "lambda": 1.0})


def _ties(ctx: ExportContext) -> Translation:
    opts = ctx.options
    tr = consensus("ties", ctx, ctx.density, np.ones_like(ctx.weight), opts.weights, opts.disjoint, opts.scale)
    tr.differences = _scope_differences(ctx, opts.scope, "TIES") + topk_differences(ctx, ctx.density) + tr.differences
    return tr


def _breadcrumbs(ctx: ExportContext) -> Translation:
    opts = ctx.options
    if ctx.recipe.method == "breadcrumbs":
        tr = Translation("breadcrumbs", {"weight": ctx.weight, "density": ctx.density}, {"normalize": False})
    else:
        ones = np.ones_like(ctx.weight)
        tr = consensus("breadcrumbs_ties", ctx, ctx.density, ones, opts.weights, opts.disjoint, opts.scale)
    tr.per_input["gamma"] = np.full_like(ctx.weight, opts.gamma)
    tr.shared.setdefault("lambda", 1.0)
    tr.differences = (
        _scope_differences(ctx, opts.scope, "Breadcrumbs") + band_differences(ctx, opts.gamma) + tr.differences
    )
    return tr


def _dare(ctx: ExportContext) -> Translation:
    """DARE keeps with probability d and mergetune divides by d: mergekit without rescale, weight λ/d."""
    opts = ctx.options
    density = ctx.density.copy()
    if opts.skip_1d:
        density[:, ctx.is_1d] = 1.0  # kept whole and not rescaled
    c = np.divide(1.0, density, out=np.zeros_like(density), where=density > 0)
    if ctx.recipe.method == "dare_linear":
        tr = Translation("dare_linear", {"weight": ctx.weight * c, "density": density}, {"normalize": False})
    else:
        tr = consensus("dare_ties", ctx, density, c, opts.weights, opts.disjoint, opts.scale)
        if opts.trim_density < 1.0:
            tr.differences.insert(
                0,
                f"trim_density {opts.trim_density:g}: mergekit's dare_ties does not trim after the drop; "
                "set trim_density: 1 (mergekit's behaviour)",
            )
    tr.shared["rescale"] = False
    tr.faithful = IN_DISTRIBUTION
    tr.notes.append(_random_note(ctx))
    return tr


def _della(ctx: ExportContext) -> Translation:
    """Exact in distribution at epsilon 0 (keep probability d, divide by d); else mergekit's L1 rescale."""
    opts = ctx.options
    _check_della_range(ctx, opts.epsilon)
    exact = opts.epsilon == 0.0
    c = np.divide(1.0, ctx.density, out=np.zeros_like(ctx.density), where=ctx.density > 0)
    c = c if exact else np.ones_like(c)
    tr = consensus("della", ctx, ctx.density, c, opts.weights, "weighted_mean", opts.scale)
    tr.per_input["epsilon"] = np.full_like(ctx.weight, opts.epsilon)
    tr.shared["rescale"] = not exact
    if not exact:
        tr.differences.insert(
            0,
            "DELLA divides each kept entry by its own keep probability; mergekit's della rescales all kept "
            "entries of a tensor by one factor that restores its L1 norm (rescale: true): equal total magnitude, "
            "not entry by entry (exact in distribution only with epsilon: 0)",
        )
    tr.faithful = IN_DISTRIBUTION
    tr.notes.append(_random_note(ctx))
    return tr


def _pcb(ctx: ExportContext) -> Translation:
    opts = ctx.options
    ones = np.ones_like(ctx.weight)
    tr = consensus("ties", ctx, ctx.density, ones, "before_election", "weighted_mean", opts.scale)
    kept = "/".join(_fmt_set(ctx.density[:, ctx.merged]))
    tr.differences = [
        "PCB has no mergekit equivalent: its intra/inter balancing scores β, the clip of outliers and the "
        f"β-weighted merge are replaced by TIES (magnitude trim per tensor at density {kept}, "
        "sign election, weighted mean); expect different weights",
    ]
    return tr


def _tsv(ctx: ExportContext) -> Translation:
    opts = ctx.options
    weight = ctx.weight * opts.scale
    weight[:, ctx.is_1d] /= len(ctx.tasks)  # TSV-M averages 1-D tensors
    tr = Translation("task_arithmetic", {"weight": weight}, {"normalize": False, "lambda": 1.0})
    tr.differences = [
        "TSV-M has no mergekit equivalent: its per-matrix SVD truncation (top rank/T singular triplets per task) "
        "and orthogonalisation are replaced by Task Arithmetic with weight λ·scale (λ·scale/T on 1-D tensors, "
        "which TSV-M averages)"
    ]
    return tr


def consensus(
    method: str, ctx: ExportContext, density: np.ndarray, c: np.ndarray, weights_at: str, disjoint: str, scale: float
) -> Translation:
    """Weights and shared parameters of a sign-consensus method (see the module docstring).

    ``c`` ``[T, N]`` maps mergekit's sparsified values to mergetune's (1 for magnitude trims, 1/d for DARE);
    tasks with density 0 contribute nothing on either side and are left out of the equality checks.
    """
    weight = ctx.weight
    live = density > 0
    tr = Translation(method, {"weight": weight * c, "density": density}, {})
    if weights_at == "after_election":
        bad = ~_equal_over_tasks(weight, live)
        if bad.any():
            tr.differences.append(
                f"weights: after_election (official TIES) with different λ per task in group(s) "
                f"{_groups(ctx, bad)}: mergekit elects the sign on the weighted task vectors; set "
                "options.weights: before_election, or one λ for all tasks of each group"
            )
    if disjoint == "sum":
        tr.shared.update(normalize=False, **{"lambda": scale})
        return tr
    divisor = c if disjoint == "weighted_mean" else weight * c
    active = live & (weight != 0) if disjoint == "weighted_mean" else live
    bad = ~_equal_over_tasks(divisor, active)
    if bad.any():
        what = "1/density" if disjoint == "weighted_mean" else "λ (times 1/density for DARE)"
        tr.differences.append(
            f"disjoint: {disjoint} with different {what} per task in group(s) {_groups(ctx, bad)}: mergekit's "
            "normalize divides by the sum of the agreeing weights; use disjoint: sum or weighted_mean, "
            "or equal values per group"
        )
    tr.shared.update(normalize=True, **{"lambda": scale * _masked_mean(divisor, active)})
    return tr


def _equal_over_tasks(values: np.ndarray, active: np.ndarray) -> np.ndarray:
    """``[N]``: the active tasks' values of a tensor are equal (to 1e-12 relative)."""
    big = np.where(active, values, -np.inf).max(axis=0)
    small = np.where(active, values, np.inf).min(axis=0)
    spread = np.where(active.any(axis=0), big - small, 0.0)
    return spread <= 1e-12 * np.maximum(1.0, np.abs(np.where(active.any(axis=0), big, 0.0)))


def _masked_mean(values: np.ndarray, active: np.ndarray) -> np.ndarray:
    total = np.where(active, values, 0.0).sum(axis=0)
    count = active.sum(axis=0)
    return np.where(count > 0, total / np.maximum(count, 1), 1.0)


# ---- count conventions -----------------------------------------------------------------------------
def topk_mismatch(numel: np.ndarray, density: np.ndarray) -> np.ndarray:
    """``[T, N]``: mergekit's magnitude top-k keeps another count than mergetune (max(1, ⌊d·n⌋) vs ⌊d·n⌋)."""
    n = numel[None, :]
    ours = np.floor(density * n + KEEP_GUARD)
    theirs = np.where(density >= 1, n, np.where(density <= 0, 0, np.maximum(1, np.floor(density * n))))
    return ours != theirs


def band_mismatch(numel: np.ndarray, density: np.ndarray, gamma: float) -> np.ndarray:
    """``[T, N]``: Breadcrumbs' band differs (mergekit shrinks the outlier cut when γ + d > 1, keeps all at d = 1)."""
    n = numel[None, :]
    k_hi = np.floor(gamma * n + KEEP_GUARD)
    kept_ours = np.minimum(n, k_hi + np.floor(density * n + KEEP_GUARD)) - k_hi
    target = np.floor(density * n)
    dropped_theirs = n - np.maximum(0, n - target - np.floor(gamma * n)) - target
    kept_theirs = np.where(density >= 1, n, target)
    same_drop = np.where(density >= 1, k_hi == 0, dropped_theirs == k_hi)
    return ~((kept_ours == kept_theirs) & ((kept_ours == 0) | same_drop))


def topk_differences(ctx: ExportContext, density: np.ndarray) -> list[str]:
    why = "mergekit keeps max(1, ⌊d·n⌋) entries of a tensor, mergetune ⌊d·n⌋"
    return count_report(ctx.names, ctx.tasks, topk_mismatch(ctx.numel, density) & ctx.merged[None, :], why)


def band_differences(ctx: ExportContext, gamma: float) -> list[str]:
    why = "mergekit shrinks the outlier cut when γ + density > 1 and keeps everything at density 1"
    return count_report(ctx.names, ctx.tasks, band_mismatch(ctx.numel, ctx.density, gamma) & ctx.merged[None, :], why)


def count_report(names: tuple[str, ...], tasks: list[str], bad: np.ndarray, why: str) -> list[str]:
    """One line on the (task, tensor) pairs whose kept counts differ, with the first as an example."""
    if not bad.any():
        return []
    t, i = (int(x) for x in np.argwhere(bad)[0])
    return [
        f"{int(bad.sum())} (task, tensor) pair(s) keep a different number of entries ({why}), e.g. "
        f"'{names[i]}' of task '{tasks[t]}'; move the densities off these counts (a tensor of n entries "
        "needs density ≥ 1/n)"
    ]


def _scope_differences(ctx: ExportContext, scope: Any, what: str) -> list[str]:
    scope = str(getattr(scope, "value", scope))
    if scope == "tensor":
        return []
    ranked = {"global": "the whole model at once", "row": "each row"}[scope]
    return [
        f"scope: {scope}: {what} ranks magnitudes over {ranked}, mergekit within each tensor; "
        "set options.scope: tensor for an exact export"
    ]


def _check_della_range(ctx: ExportContext, epsilon: float) -> None:
    d = ctx.density
    bad = (d < 1) & (d > 0) & ((d + epsilon >= 1) | (d - epsilon <= 0))
    if bad.any():
        raise ExportError(
            f"della: mergekit requires density ± epsilon strictly inside (0, 1); density "
            f"{_fmt_set(d[bad])} with epsilon {epsilon:g} in group(s) {_groups(ctx, bad.any(axis=0))} is not; "
            "lower epsilon or move the density"
        )


def _random_note(ctx: ExportContext) -> str:
    return (
        "random masks: mergekit draws them from torch's RNG (mergekit-yaml --random-seed N), mergetune from a "
        f"hash of (seed {ctx.recipe.seed}, tensor, task): the same distribution, other draws"
    )


def _groups(ctx: ExportContext, columns: np.ndarray) -> str:
    groups = ctx.groups_of(columns)
    return ", ".join(groups[:6]) + (f" (+{len(groups) - 6} more)" if len(groups) > 6 else "")


def _fmt_set(values: np.ndarray) -> list[str]:
    return [f"{v:g}" for v in sorted(set(np.asarray(values).ravel().tolist()))[:5]]


TRANSLATORS: dict[str, Callable[[ExportContext], Translation]] = {
    "average": _average,
    "task_arithmetic": _task_arithmetic,
    "ties": _ties,
    "breadcrumbs": _breadcrumbs,
    "breadcrumbs_ties": _breadcrumbs,
    "dare_linear": _dare,
    "dare_ties": _dare,
    "della": _della,
    "pcb": _pcb,
    "tsv": _tsv,
}


# ---- configuration ---------------------------------------------------------------------------------
def build_config(ctx: ExportContext, tr: Translation) -> dict[str, Any]:
    """The mergekit configuration: ``models`` with filters, or one slice per block group when values vary with depth."""
    recipe, layout = ctx.recipe, ctx.layout
    config: dict[str, Any] = {"merge_method": tr.method}
    if tr.with_base:
        config["base_model"] = recipe.base
    by_group = _varies_with_depth(ctx, tr)
    if by_group and layout.sliceable:
        config["slices"] = _slices(ctx, tr)
    else:
        scope = list(ctx.names)
        config["models"] = _sources(ctx, tr, scope, None)
        config["parameters"] = _shared(ctx, tr, scope)
    config["dtype"] = "float32"
    if recipe.dtype != "float32":
        config["out_dtype"] = recipe.dtype
    return config


def _sources(ctx: ExportContext, tr: Translation, scope: list[str], layers: list[int] | None) -> list[dict[str, Any]]:
    """The base (when the method uses one) and one entry per expert with its parameters over ``scope``."""
    columns = [ctx.names.index(n) for n in scope]
    extra = {"layer_range": layers} if layers is not None else {}
    out = [{"model": ctx.recipe.base, **extra}] if tr.with_base else []
    for t, expert in enumerate(ctx.recipe.experts):
        params = {p: _encode(values[t, columns], scope) for p, values in tr.per_input.items()}
        out.append({"model": _reference(expert.model, expert.revision), **extra, "parameters": params})
    return out


def _shared(ctx: ExportContext, tr: Translation, scope: list[str]) -> dict[str, Setting]:
    columns = [ctx.names.index(n) for n in scope]
    out: dict[str, Setting] = {}
    for param, values in tr.shared.items():
        out[param] = _encode(np.asarray(values)[columns], scope) if np.ndim(values) else _plain(values)
    return out


def _slices(ctx: ExportContext, tr: Translation) -> list[dict[str, Any]]:
    """One slice per block group; the first and last also address the embeddings and final tensors."""
    layout = ctx.layout
    outside = [n for n in ctx.names if n not in layout.layer]
    groups = layout.block_groups
    slices = []
    for i, group in enumerate(groups):
        scope = layout.members(group) + (outside if i in (0, len(groups) - 1) else [])
        item: dict[str, Any] = {"sources": _sources(ctx, tr, scope, list(layout.layer_range(group)))}
        item["parameters"] = _shared(ctx, tr, scope)
        slices.append(item)
    return slices


def _varies_with_depth(ctx: ExportContext, tr: Translation) -> bool:
    """Some value differs between blocks for the same tensor role (``q_proj.weight`` of layer 0 and of layer 5).

    If not, one ``models`` list with a few filters (``.bias``, ``embeddings.``) says everything;
    if so, one slice per block group reads better than a filter per layer.
    """
    layout = ctx.layout
    role = {i: n.split(f".{layout.layer[n]}.", 1)[-1] for i, n in enumerate(ctx.names) if n in layout.layer}
    arrays = [*tr.per_input.values(), *(np.asarray(v)[None, :] for v in tr.shared.values() if np.ndim(v))]
    for values in arrays:
        seen: dict[str, np.ndarray] = {}
        for i, r in role.items():
            if r in seen and not np.array_equal(seen[r], values[:, i]):
                return True
            seen.setdefault(r, values[:, i])
    return False


def _encode(values: np.ndarray, scope: list[str]) -> Setting:
    return encode({n: _plain(v) for n, v in zip(scope, values.tolist(), strict=True)})


def _plain(value: Any) -> Value:
    """Python scalars for YAML (numpy bools and floats otherwise dump as tagged objects)."""
    if isinstance(value, bool | np.bool_):
        return bool(value)
    return float(value)


def _reference(model: str, revision: str | None) -> str:
    return f"{model}@{revision}" if revision else model


def render_yaml(config: dict[str, Any], recipe: Recipe, tr: Translation, source: str) -> str:
    """The configuration as YAML, headed by comments: origin, faithfulness, command, differences."""
    seed = " --random-seed 0" if tr.notes else ""
    remote = " --trust-remote-code" if recipe.trust_remote_code else ""
    lines = [
        f"mergekit configuration exported by mergetune from {source}",
        f"method: {recipe.method} -> mergekit {tr.method} ({_faithful_words(tr.faithful)})",
        f"run: mergekit-yaml merge.yml OUT_DIR{seed}{remote}",
        *(f"differs: {d}" for d in tr.differences),
        *(f"note: {n}" for n in tr.notes),
    ]
    header = "".join(f"# {line}\n" for line in lines)
    return header + yaml.dump(config, Dumper=_Dumper, sort_keys=False, width=120, default_flow_style=None)


class _Dumper(yaml.SafeDumper):
    """Safe YAML without anchors and aliases (``&id001``): every value written out where it applies."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _faithful_words(faithful: str) -> str:
    return {
        EXACT: "exact: the same weights up to float rounding",
        IN_DISTRIBUTION: "exact in distribution: the same random merge rule, other random draws",
        APPROXIMATE: "APPROXIMATE: see the differences below",
    }[faithful]
