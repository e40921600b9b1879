"""Read model weights safely from local Hugging Face folders, single files or hub ids.

Only safe formats are read: safetensors (single or sharded), or PyTorch ``.bin`` through
``torch.load(weights_only=True)``. Remote code is never executed here: configs are read as JSON.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from mergetune.errors import BadWeightsError, MergetuneError

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "tokenizer*", "*.bin"]

StateDict = dict[str, torch.Tensor]


@dataclass
class LoadedModel:
    """Weights plus where they came from (for errors) and the base config (for export)."""

    name: str
    state: StateDict
    folder: Path | None = None
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def model_type(self) -> str | None:
        return self.config.get("model_type")


def load_model(
    source: str | os.PathLike[str] | Mapping[str, torch.Tensor] | torch.nn.Module,
    name: str | None = None,
    revision: str | None = None,
) -> LoadedModel:
    """Load weights from a folder, a weights file, a hub id, a state dict or a module."""
    if isinstance(source, torch.nn.Module):
        config = source.config.to_dict() if hasattr(source, "config") else {}
        state = {k: v.detach() for k, v in source.state_dict().items()}
        return LoadedModel(name or type(source).__name__, state, None, config)
    if isinstance(source, Mapping):
        return LoadedModel(name or "state_dict", dict(source), None, {})
    path = Path(source)
    if path.is_dir():
        return LoadedModel(name or str(path), read_folder(path), path, read_config(path))
    if path.is_file():
        return LoadedModel(name or str(path), read_weights_file(path), path.parent, read_config(path.parent))
    folder = download_from_hub(str(source), revision)
    return LoadedModel(name or str(source), read_folder(folder), folder, read_config(folder))


def read_config(folder: Path) -> dict[str, Any]:
    cfg = folder / "config.json"
    if not cfg.is_file():
        return {}
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as exc:
        raise MergetuneError(f"{cfg}: not valid JSON: {exc}") from exc


def read_folder(folder: Path) -> StateDict:
    """Weights of a Hugging Face model folder: sharded or single safetensors, else .bin."""
    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
        index = folder / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            state: StateDict = {}
            for shard in shards:
                state.update(read_weights_file(folder / shard))
            return state
    for single in (SAFETENSORS_FILE, BIN_FILE):
        if (folder / single).is_file():
            return read_weights_file(folder / single)
    candidates = sorted(folder.glob("*.safetensors"))
    if len(candidates) == 1:
        return read_weights_file(candidates[0])
    raise MergetuneError(
        f"{folder}: no weights found (expected {SAFETENSORS_FILE}, {SAFETENSORS_INDEX}, {BIN_FILE} "
        f"or {BIN_INDEX}); point to a Hugging Face model folder"
    )


def read_weights_file(path: Path) -> StateDict:
    if not path.is_file():
        raise MergetuneError(f"weights file not found: {path} (listed in the folder's index?)")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        except Exception as exc:
            raise BadWeightsError(f"{path}: cannot read safetensors file: {exc}") from exc
    if path.suffix in {".bin", ".pt", ".pth"}:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise BadWeightsError(
                f"{path}: refused or failed to load with torch.load(weights_only=True) ({exc}); "
                "convert the checkpoint to safetensors"
            ) from exc
        if not isinstance(loaded, Mapping):
            raise BadWeightsError(f"{path}: expected a state dict, got {type(loaded).__name__}")
        return dict(loaded)
    raise MergetuneError(f"{path}: unsupported weights format '{path.suffix}' (use .safetensors or .bin)")


def download_from_hub(repo_id: str, revision: str | None) -> Path:
    """Resolve a hub id to a local snapshot (from the local cache when offline)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS))
    except Exception as exc:
        raise MergetuneError(
            f"'{repo_id}' is neither a local path nor a reachable hub model ({type(exc).__name__}: {exc}). "
            "Check the path, or download the model once and point to its folder."
        ) from exc
