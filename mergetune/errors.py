"""Errors a user can act on: each names the file, model, tensor or field at fault and what to do."""

from __future__ import annotations

import errno
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


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping with the same key twice (plain YAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (first on line {seen[key] + 1}): YAML would silently keep the last one",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` (no arbitrary objects) that also rejects duplicate keys in any mapping."""
    return yaml.load(text, Loader=_UniqueKeyLoader)


class DuplicateKeyError(ValueError):
    """A JSON object names the same key twice."""


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise DuplicateKeyError(f"duplicate key(s) {repeated}: JSON would silently keep the last one")
    return dict(pairs)


def read_config_file(path: str | os.PathLike[str], what: str, error: type[MergetuneError] = MergetuneError) -> Any:
    """The parsed content of a YAML (or ``.json``) config file; a missing file or a syntax error is an
    ``error`` naming the file. YAML is read safely (no arbitrary objects) and a duplicate key is an error."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} not found: {path}")
    text = path.read_text()
    is_json = path.suffix == ".json"
    try:
        return json.loads(text, object_pairs_hook=_unique_pairs) if is_json else load_yaml(text)
    except (yaml.YAMLError, json.JSONDecodeError, DuplicateKeyError) as exc:
        raise error(f"{path}: not valid {'JSON' if is_json else 'YAML'}: {exc}") from exc


def describe_os_error(exc: OSError) -> str:
    """One line for a file-system failure: what failed, on which path, and what to do about it."""
    where = exc.filename if exc.filename is not None else "(path unknown)"
    if exc.errno == errno.ENOSPC:
        # a strerror other than the system's carries how much the failed write needed (search.atomic.located)
        needed = f" ({exc.strerror})" if exc.strerror and exc.strerror != os.strerror(errno.ENOSPC) else ""
        return (
            f"no space left on the device holding {where}{needed}: free some space (or point the output elsewhere), "
            "then run the same command again; finished work is kept"
        )
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"cannot write {where}: {exc.strerror}; choose a writable output folder or fix its permissions"
    return f"{exc.strerror or exc}: {where}"
