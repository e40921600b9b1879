"""The one registry of merge methods: name -> method object.

Each method lives in its own module (named after the paper) that lists its method classes in
``METHODS``; the registry imports the modules below, in this order.
"""

from __future__ import annotations

import importlib

from mergetune.errors import RecipeError
from mergetune.merging.methods.base import ChunkMethod, MergeMethod, MethodOptions, Prepared, TensorMethod

_MODULES = ("task_arithmetic", "ties", "dare", "breadcrumbs", "della", "pcb", "tsv", "twin")
METHODS: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    if method.name in METHODS:
        raise ValueError(f"merge method '{method.name}' is registered twice")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise RecipeError(f"unknown merge method '{name}'; available: {sorted(METHODS)}") from None


def method_kind(name: str | None) -> str:
    """'dynamic' for a method whose merged weights depend on the input (Twin-Merging), else 'static'."""
    method = METHODS.get(name or "")
    return "dynamic" if method is not None and method.dynamic else "static"


for _module in _MODULES:
    for _cls in importlib.import_module(f"{__name__}.{_module}").METHODS:
        register(_cls())

__all__ = [
    "METHODS",
    "ChunkMethod",
    "MergeMethod",
    "MethodOptions",
    "Prepared",
    "TensorMethod",
    "get_method",
    "method_kind",
    "register",
]
