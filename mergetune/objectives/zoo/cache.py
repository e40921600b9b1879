"""The zoo's cache folder: atomic publishing of built folders, stale temporary folders, records, manifest.

Each expert is written to a temporary folder and renamed into place only once complete (weights,
tokenizer and its ``zoo_expert.json`` record, written last), so a killed build never leaves a
folder that looks built; temporary folders of builds whose process is gone are removed on the next
build. The temporary folder's name holds its builder's process id for that check.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch

from mergetune.objectives.zoo.results import ExpertResult, Zoo
from mergetune.objectives.zoo.specs import ZOO_FORMAT, ZooError

EXPERT_RECORD = "zoo_expert.json"  # written last inside an expert's temporary folder
BASE_RECORD = "zoo_base.json"
MANIFEST = "manifest.json"
TMP_PREFIX = ".tmp-"


def prepare_folder(folder: Path) -> None:
    """Create the zoo's folder and delete temporary folders left by builds that are no longer running."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ZooError(f"cannot create the zoo cache folder {folder}: {exc}") from exc
    for stale in folder.glob(f"{TMP_PREFIX}*"):
        if not _pid_alive(_temp_owner(stale)):
            shutil.rmtree(stale, ignore_errors=True)


def temp_folder(folder: Path, label: str) -> Path:
    """A fresh temporary folder inside ``folder`` (same file system, so the final rename is atomic)."""
    path = folder / f"{TMP_PREFIX}{label}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    return path


def _temp_owner(path: Path) -> int:
    """The process id written into a temporary folder's name (0 when it cannot be read)."""
    parts = path.name.rsplit("-", 2)
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else 0


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True  # may belong to a build running in another thread of this process: leave it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def publish(tmp: Path, dest: Path) -> None:
    """Move a complete temporary folder to ``dest``, replacing an older build there (atomic rename)."""
    if dest.exists():
        old = dest.with_name(f"{TMP_PREFIX}old-{dest.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        dest.rename(old)
        shutil.rmtree(old, ignore_errors=True)
    try:
        tmp.rename(dest)
    except OSError:
        if not dest.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # a concurrent build published the same folder first


def is_built(dest: Path, key: str | None = None) -> bool:
    """Whether ``dest`` holds a complete expert (its record is written last), built under ``key`` if given."""
    record = dest / EXPERT_RECORD
    if not record.is_file():
        return False
    try:
        data = json.loads(record.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return key is None or data.get("cache_key") == key


def read_expert_result(dest: Path) -> ExpertResult:
    """The measurements stored with a built expert."""
    return ExpertResult.from_json(json.loads((dest / EXPERT_RECORD).read_text())["result"])


def write_manifest(zoo: Zoo) -> None:
    """``manifest.json``: settings, sizes, accuracies and build times of every expert of the zoo."""
    spec = zoo.spec
    data = {
        "zoo": spec.name,
        "description": spec.description,
        "cache_key": spec.cache_key(),
        "format": ZOO_FORMAT,
        "base": str(zoo.base),
        "base_spec": spec.base if isinstance(spec.base, str) else spec.base.model_dump(mode="json"),
        "training": spec.training.model_dump(mode="json"),
        "versions": {"torch": torch.__version__, "transformers": version("transformers")},
        "last_build": {"seconds": round(zoo.seconds, 2), "trained": list(zoo.trained)},
        "experts": {
            t.name: {
                "folder": str(zoo.experts[t.name]),
                "config": t.model_dump(mode="json"),
                **zoo.results[t.name].to_json(),
            }
            for t in spec.tasks
        },
    }
    write_json(zoo.folder / MANIFEST, data)


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (a temporary file renamed over the target)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
