"""The registry table of merge methods (name -> method object) and its look-ups.

Apart from the package ``__init__`` (which imports every method module and registers its classes) so
that a method module may look other methods up (Twin-Merging validates its shared method) without
importing the package that imports it: the import graph stays one-directional.
"""

from __future__ import annotations

from mergetune.errors import RecipeError
from mergetune.merging.methods.base import MergeMethod

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
