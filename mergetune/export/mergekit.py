"""``mergetune export RECIPE --format mergekit``: a mergekit configuration that reproduces a recipe.

What a method becomes in mergekit is declared on its class (``mergekit``: a ``MergekitSpec`` whose hook
turns per-tensor λ and density into mergekit's per-tensor parameters, or a ``MergekitRefusal``; the
rules and mergekit 0.1.5's formulas are in ``mergetune.merging.mergekit_spec``). This module does the
rest: it expands the recipe to every tensor of the base, checks the models mergekit would run, and
writes the configuration:

- per-layer-group values: one slice per group of blocks when values change with depth (the base in
  every slice), and ``filter`` conditions for the embeddings and final tensors (mergekit reads those
  with the first and last slice) and for tensors a group treats apart (DARE's ``skip_1d``).

Exactness, method by method: see the README table ("Export to mergekit"). A recipe declared exact whose
tie or sign-cancel rule is not mergekit's is checked on the actual tensors (``tensor_audit``): where a
magnitude ties at a cut or a sign sum cancels exactly, the export says "in distribution" with the counts
in its notes. Anything mergekit cannot do
exactly (a global or per-row top-k, official TIES with per-task λ, DELLA's per-entry rescale,
PCB, TSV-M) is refused with the reason, or, with ``approximate``, written as the closest
configuration with every difference listed in its header and on stderr.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from mergetune.export.layout import ModelLayout, architectures_of, read_layout, tensor_shapes
from mergetune.export.settings import Setting, Value, encode
from mergetune.export.tensor_audit import audit_notes
from mergetune.merging.mergekit_spec import (
    APPROXIMATE,
    EXACT,
    IN_DISTRIBUTION,
    ExportTables,
    MergekitRefusal,
    MergekitSpec,
    MergekitUnsupported,
    Translation,
)
from mergetune.merging.methods import METHODS, check_recipe, get_method, method_options
from mergetune.recipe import Recipe, resolve_parameter

# mergekit 0.1.5 problems with an architecture, said in the export's notes (the export itself is right).
KNOWN_ISSUES = {
    "BertModel": "mergekit 0.1.5 fails to plan BertModel checkpoints (TypeError on the optional "
    "'embeddings.position_ids', whose aliases are a tuple in its bert.json); BertForSequenceClassification "
    "checkpoints merge",
    "RobertaModel": "mergekit 0.1.5's roberta.json expects 'roberta.'-prefixed names, which RobertaModel "
    "checkpoints saved by transformers do not have",
}


class ExportError(MergekitUnsupported):
    """mergekit cannot run this recipe as it is; the message says why and what to do."""


@dataclass(frozen=True)
class ExportContext:
    """The recipe, the base's layout and the recipe's values expanded to every tensor (``tables``)."""

    recipe: Recipe
    layout: ModelLayout
    tables: ExportTables

    @property
    def names(self) -> tuple[str, ...]:
        """The merged tensors, then the task-specific ones (weight 0)."""
        return self.tables.names


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
    spec = get_method(recipe.method).mergekit
    if isinstance(spec, MergekitRefusal):
        raise ExportError(
            f"{source}: method '{recipe.method}' has no mergekit equivalent ({spec.reason}); "
            f"methods that export: {exportable_methods()}"
        )
    layout = read_layout(recipe.base, recipe.grouping.granularity)
    notes = _check_models(recipe, layout, spec, source)
    ctx = _context(recipe, layout)
    try:
        tr = spec.translate(ctx.tables)
    except MergekitUnsupported as exc:
        raise ExportError(str(exc)) from exc
    tr.notes = notes + tr.notes
    tr.faithful = APPROXIMATE if tr.differences else spec.faithful
    audit = spec.audit(ctx.tables.options) if spec.audit and tr.faithful == EXACT else None
    if audit is not None:  # options other than mergekit's tie and cancel rules: exact only if nothing ties or cancels
        try:
            counted = audit_notes(recipe, ctx.tables, audit)
        except MergekitUnsupported as exc:
            raise ExportError(f"{source}: {exc}") from exc
        if counted:
            tr.faithful, tr.notes = IN_DISTRIBUTION, tr.notes + counted
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


def exportable_methods() -> list[str]:
    """The registered methods that declare a mergekit translation."""
    return sorted(name for name, method in METHODS.items() if isinstance(method.mergekit, MergekitSpec))


def _check_models(recipe: Recipe, layout: ModelLayout, spec: MergekitSpec, source: str) -> list[str]:
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
        if spec.heads_refusal:
            heads = spec.heads_refusal.format(heads=list(layout.task_specific)[:3])
            raise ExportError(f"{source}: {recipe.method} {heads}")
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
    names = (*layout.names, *layout.task_specific)
    tables = ExportTables(
        tasks=recipe.task_names,
        names=names,
        options=method_options(recipe),
        weight=np.concatenate([weight, heads], axis=1),
        density=np.concatenate([density, heads + 1.0], axis=1),
        numel=np.array([layout.numel[n] for n in names], dtype=np.float64),
        is_1d=np.array([layout.ndim[n] < 2 for n in names]),
        merged=np.arange(len(names)) < len(layout.names),
        tensor_groups=tuple(layout.group_of(n) for n in layout.names),
        group_names=tuple(layout.groups.names),
        seed=recipe.seed,
    )
    return ExportContext(recipe, layout, tables)


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
    """Python scalars for YAML (numpy bools and floats otherwise dump as tagged objects); ints stay ints (max_iter)."""
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
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
        IN_DISTRIBUTION: "exact in distribution: the same merge rule, other choices among equals "
        "(random draws, or entries tied at a cut; see the notes)",
        APPROXIMATE: "APPROXIMATE: see the differences below",
    }[faithful]
