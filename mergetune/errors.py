"""Errors a user can act on: each names the file, model, tensor or field at fault and what to do."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml


class MergetuneError(Exception):
    """Base class of every error mergetune raises on bad input."""


class IncompatibleModelsError(MergetuneError):
    """Base and experts cannot be merged tensor by tensor (shape, dtype, missing tensor, vocabulary)."""


class BadWeightsError(MergetuneError):
    """A checkpoint holds NaN/inf values or cannot be read safely."""


class RecipeError(MergetuneError):
    """A recipe or its parameters do not validate against the models they name."""


class TaskError(MergetuneError):
    """A task's configuration or data is unusable (missing column, empty split, unknown labels, head mismatch)."""


def read_config_file(path: str | os.PathLike[str], what: str, error: type[MergetuneError] = MergetuneError) -> Any:
    """The parsed content of a YAML (or ``.json``) config file; a missing file or a syntax error is an
    ``error`` naming the file. YAML is read with ``safe_load`` (no arbitrary objects)."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} not found: {path}")
    text = path.read_text()
    is_json = path.suffix == ".json"
    try:
        return json.loads(text) if is_json else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise error(f"{path}: not valid {'JSON' if is_json else 'YAML'}: {exc}") from exc
