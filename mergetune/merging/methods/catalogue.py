"""What ``mergetune methods`` shows: every registered method, described from its class's declarations.

Nothing here lists methods or restates a fact about one: the paper, the parameters, the mergekit
translation and the need for data are read from each class (``base.MergeMethod``), so a method
registered anywhere appears with the same fields, and what the listing says about mergekit is what
the exporter does.
"""

from __future__ import annotations

from typing import Any

from mergetune.merging.mergekit_spec import APPROXIMATE, MergekitRefusal
from mergetune.merging.methods.base import MergeMethod, Range
from mergetune.merging.methods.registry import METHODS

REFUSED = "refused"


def mergekit_entry(method: MergeMethod) -> dict[str, Any]:
    """How mergekit runs the method: its exactness (or ``refused``), mergekit's method, and why where refused."""
    spec = method.mergekit
    if isinstance(spec, MergekitRefusal):
        return {"exactness": REFUSED, "method": None, "reason": spec.reason}
    entry: dict[str, Any] = {"exactness": spec.faithful, "method": spec.method, "reason": None}
    if spec.faithful == APPROXIMATE:
        entry["reason"] = "mergekit has no equivalent; `mergetune export --approximate` writes the closest merge"
    return entry


def _range(values: Range | None) -> list[float] | None:
    return None if values is None else [float(values[0]), float(values[1])]


def parameters(method: MergeMethod) -> dict[str, Any]:
    """λ and density (searched per task and layer group) with their ranges and warm start, then the options."""
    start = method.warm_start
    options = method.Options().model_dump(mode="json")
    fields = method.Options.model_fields
    return {
        "weight": {"search": _range(method.search_weight), "warm_start": start.weight},
        "density": (
            {"search": _range(method.search_density), "warm_start": start.density} if method.uses_density else None
        ),
        "options": {name: {"default": options[name], "description": fields[name].description or ""} for name in fields},
    }


def describe(method: MergeMethod) -> dict[str, Any]:
    """One method's row: name, paper, parameters, mergekit, whether it needs data, dynamic, random."""
    return {
        "name": method.name,
        "paper": method.citation,
        "parameters": parameters(method),
        "mergekit": mergekit_entry(method),
        "needs_data": method.needs_data,
        "dynamic": method.dynamic,
        "random": method.random,
    }


def catalogue() -> list[dict[str, Any]]:
    """Every registered method, by name."""
    return [describe(METHODS[name]) for name in sorted(METHODS)]
