"""The base of every config model (recipes, search configs, tasks, zoos) and its error format.

It sits below both the recipe and the layers that define their own configs (merging's method
options, objectives' tasks), so that none of them has to import another to be strict.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, ValidationError


class StrictModel(BaseModel):
    """Base for every config model: unknown keys are errors, never silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


def format_validation_error(exc: ValidationError) -> str:
    """One line per problem: the dotted field path and what is wrong with it."""
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check its spelling; unknown keys are errors, not ignored)"
        lines.append(f"  - {where}: {msg}")
    return "\n".join(lines)
