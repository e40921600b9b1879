"""The registry of merge methods (name -> method object) and the checks of a recipe against it.

Apart from the package ``__init__`` (which imports every method module and registers its classes)
so that a method module may look other methods up (Twin-Merging's shared method) without an import
cycle: this module imports no method.

The recipe layer sits below merging and cannot know the methods, so ``Recipe.parse`` checks only
the method-independent fields; every entry point that reads a recipe from user input calls
``check_recipe`` (or ``load_recipe`` / ``parse_recipe``) right after, before any work. Its errors
read like the recipe's own: ``<source>: invalid recipe:`` and one line per field (``method``,
``options.<key>``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, ValidationInfo, field_validator

from mergetune.errors import RecipeError
from mergetune.merging.methods.base import MergeMethod, MethodOptions
from mergetune.recipe import Recipe
from mergetune.strict import StrictModel, format_validation_error

METHODS: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    if method.name in METHODS:
        raise ValueError(f"merge method '{method.name}' is registered twice")
    METHODS[method.name] = method
    return method


def unregister(name: str) -> None:
    """Remove a method (tests register toy methods for the duration of a test)."""
    METHODS.pop(name, None)


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise RecipeError(f"unknown merge method '{name}'; available: {sorted(METHODS)}") from None


def method_kind(name: str | None) -> str:
    """'dynamic' for a method whose merged weights depend on the input (Twin-Merging), else 'static'."""
    method = METHODS.get(name or "")
    return "dynamic" if method is not None and method.dynamic else "static"


class MethodChoice(StrictModel):
    """The method-dependent fields of a recipe: a registered method and options valid for it."""

    method: str
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("method")
    @classmethod
    def _known_method(cls, method: str) -> str:
        """An unknown method is a validation error of the field, listed with the available ones."""
        try:
            get_method(method)
        except RecipeError as exc:
            raise ValueError(str(exc)) from None
        return method

    @field_validator("options")
    @classmethod
    def _method_options(cls, options: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        """Validate the options against the method's own strict model (errors read ``options.<key>``)."""
        if "method" in info.data:  # absent when the method itself failed validation
            get_method(info.data["method"]).Options.model_validate(options)
        return options


def check_recipe(recipe: Recipe, source: str = "recipe") -> Recipe:
    """The recipe itself if its method is registered, its options are valid for it and it merges as many
    experts as the method takes (SLERP: one), else a RecipeError."""
    try:
        MethodChoice.model_validate({"method": recipe.method, "options": recipe.options})
    except ValidationError as exc:
        raise RecipeError(f"{source}: invalid recipe:\n{format_validation_error(exc)}") from exc
    try:
        get_method(recipe.method).check_experts(len(recipe.experts))
    except RecipeError as exc:
        raise RecipeError(f"{source}: invalid recipe: {exc}") from None
    return recipe


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    """``Recipe.parse`` then ``check_recipe``: a recipe from user data, checked against the registry."""
    return check_recipe(Recipe.parse(data, source=source), source)


def load_recipe(path: str | Path) -> Recipe:
    """``Recipe.load`` then ``check_recipe``: a recipe file, checked against the registry."""
    return check_recipe(Recipe.load(path), str(path))


def method_options(recipe: Recipe) -> MethodOptions:
    """The recipe's options validated by its method's ``Options`` model (defaults filled in)."""
    return get_method(recipe.method).Options.model_validate(recipe.options)
