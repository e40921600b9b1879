"""A run is bound to its config: the study remembers what defines it, and refuses another config.

What defines a search (its ``BOUND_FIELDS``: models, tasks, space with its grouping, objectives,
seed) is stored in the study's user attributes when the study is created. Re-running the same
name with a different definition would mix two searches in one study (or crash Optuna on a new
method choice), so it is refused before anything is written, with one line listing what changed
and the two ways forward: a new ``name:``, or ``--restart``, which moves the old run folder aside
(``<folder>.replaced-<UTC time>``, nothing deleted) and starts afresh. Budget, execution, output,
evaluation, optimizer and selection may change between resumes and are not bound.

Studies created before this check existed have no stored definition: they are accepted (if their
objectives match, as before) and stamped with the current one.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage

from mergetune.errors import MergetuneError
from mergetune.search import records as R
from mergetune.search.config import SearchConfig
from mergetune.search.storage import open_storage

#: The config fields that define a study; the rest (budget, execution, output, ...) may change on resume.
BOUND_FIELDS = ("models", "tasks", "space", "objectives", "seed")
#: Study user attribute holding the defining fields, as JSON.
DEFINITION = "definition"
_SHOWN_CHANGES = 6  # more would not fit one readable line
_SHOWN_CHARS = 60


class ConfigChangedError(MergetuneError):
    """The run's study was created by a config that defines another search."""


def definition(config: SearchConfig) -> dict[str, Any]:
    """What defines the config's search, as JSON values (defaults included, so spelling them out changes nothing)."""
    return config.model_dump(mode="json", include=set(BOUND_FIELDS))


def stored_definition(storage: BaseStorage, name: str) -> tuple[bool, dict[str, Any] | None, list[str] | None]:
    """Whether the storage holds the study, with its stored definition and objectives (None when absent)."""
    try:
        study_id = storage.get_study_id_from_name(name)
    except KeyError:
        return False, None, None
    attrs = storage.get_study_user_attrs(study_id)
    return True, attrs.get(DEFINITION), attrs.get(R.OBJECTIVES)


def check_binding(storage_url: str, config: SearchConfig) -> None:
    """Refuse (one line) a config that defines another search than the one the storage holds; reads only.

    A journal file that does not exist yet holds no search: it is not created here (a run that fails
    before its study exists leaves no empty journal behind).
    """
    if "://" not in storage_url and not Path(storage_url).expanduser().exists():
        return
    check_study(open_storage(storage_url), config, storage_url)


def check_study(storage: BaseStorage, config: SearchConfig, where: str) -> None:
    """``check_binding`` on an open storage."""
    exists, stored, objectives = stored_definition(storage, config.name)
    if not exists:
        return
    if stored is None:  # a study from before definitions were stored: only its objectives can be checked
        wanted = list(config.objectives.optimize)
        if objectives is not None and list(objectives) != wanted:
            raise ConfigChangedError(
                f"the storage {where} holds search '{config.name}' with objectives {objectives}; "
                f"this config optimises {wanted}: {_ways_forward()}"
            )
        return
    changes = differences(stored, definition(config))
    if changes:
        shown = "; ".join(changes[:_SHOWN_CHANGES])
        more = f"; and {len(changes) - _SHOWN_CHANGES} more" if len(changes) > _SHOWN_CHANGES else ""
        raise ConfigChangedError(
            f"the storage {where} holds search '{config.name}' made with another config ({shown}{more}): "
            f"{_ways_forward()}"
        )


def stamp(study: optuna.Study, config: SearchConfig) -> None:
    """Store the config's definition in a study that has none (a new one, or one from an older version)."""
    if DEFINITION not in study.user_attrs:
        study.set_user_attr(DEFINITION, definition(config))


def _ways_forward() -> str:
    return (
        "give this search a new 'name:', or run `mergetune search CONFIG --restart` to move the old run "
        "folder aside and start afresh"
    )


def differences(old: Any, new: Any) -> list[str]:
    """``path: old -> new`` for each difference between two JSON values (dotted paths, list indices).

    A key or list item present on one side only is one difference at its own path, not one per leaf.
    """
    return [f"{path}: {_show(before)} -> {_show(after)}" for path, before, after in _diff(old, new, "")]


_ABSENT = object()


def _diff(old: Any, new: Any, path: str) -> Iterator[tuple[str, Any, Any]]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys: list[Any] = sorted(old.keys() | new.keys())
        pairs = [(key, old.get(key, _ABSENT), new.get(key, _ABSENT)) for key in keys]
    elif isinstance(old, list) and isinstance(new, list):
        padded = max(len(old), len(new))
        pairs = [(i, old[i] if i < len(old) else _ABSENT, new[i] if i < len(new) else _ABSENT) for i in range(padded)]
    else:
        if old != new:
            yield path, old, new
        return
    for key, before, after in pairs:
        where = f"{path}.{key}" if path else str(key)
        if before is _ABSENT or after is _ABSENT:
            yield where, before, after
        else:
            yield from _diff(before, after, where)


def _show(value: Any) -> str:
    text = "(absent)" if value is _ABSENT else repr(value)
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


def restart(config: SearchConfig) -> Path | None:
    """Move the run folder aside to ``<folder>.replaced-<UTC time>`` (nothing deleted); the moved path, or None.

    The study must live in the folder (the default journal): a storage elsewhere would keep the old
    study under the same name, so ``--restart`` refuses it rather than silently resume.
    """
    folder = config.output_dir
    if config.storage is not None and not _inside(config.storage, folder):
        raise MergetuneError(
            f"--restart moves the run folder {folder}, but this search is stored in {config.storage}: "
            "give the search a new 'name:' instead"
        )
    if not folder.exists():
        return None
    stamp_text = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    target = folder.with_name(f"{folder.name}.replaced-{stamp_text}")
    shutil.move(str(folder), str(target))
    return target


def _inside(storage: str, folder: Path) -> bool:
    """Whether a storage is a journal file inside the folder (a URL never is)."""
    if "://" in storage:
        return False
    return Path(storage).expanduser().resolve().is_relative_to(folder.resolve())
