"""Read model weights safely from local Hugging Face folders, single files or hub ids.

Only safe formats are read: safetensors (single or sharded), or PyTorch ``.bin`` through
``torch.load(weights_only=True)``. Remote code is never executed here: configs are read as JSON.

``load_model`` reads every tensor; ``open_model`` reads only the safetensors headers and returns a
``LazyState`` whose tensors are read one at a time when asked (``pread`` into a fresh buffer, no
memory map kept), so a ModelSet can stream several experts into its store without ever holding
their whole state dicts together.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from mergetune.errors import BadWeightsError, MergetuneError
from mergetune.safetensors_io import LazyState, TensorMeta

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "tokenizer*", "*.bin"]
# What a hub id can look like: "name" or "namespace/name" (letters, digits, '-', '_', '.').
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")

StateDict = dict[str, torch.Tensor]


def tensor_meta(state: Mapping[str, torch.Tensor], name: str) -> TensorMeta:
    """Shape and dtype of ``state[name]``, without reading it when the state is lazy."""
    return state.meta(name) if isinstance(state, LazyState) else TensorMeta.of(state[name])


@dataclass
class LoadedModel:
    """Weights plus where they came from (for errors) and the base config (for export).

    ``state`` is a plain dict (``load_model``) or a ``LazyState`` read tensor by tensor (``open_model``).
    """

    name: str
    state: Mapping[str, torch.Tensor]
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
        return LoadedModel(name or type(source).__name__, module_state(source), None, config)
    if isinstance(source, Mapping):
        return LoadedModel(name or "state_dict", check_state_dict(source, name or "state_dict"), None, {})
    path = Path(source).expanduser()
    if path.is_dir():
        return LoadedModel(name or str(path), read_folder(path), path, read_config(path))
    if path.is_file():
        return LoadedModel(name or str(path), read_weights_file(path), path.parent, read_config(path.parent))
    if not looks_like_hub_id(str(source)):
        raise MergetuneError(
            f"{name or source}: no such file or folder (and not a hub id such as 'org/model'); check the path"
        )
    folder = download_from_hub(str(source), revision)
    return LoadedModel(name or str(source), read_folder(folder), folder, read_config(folder))


def open_model(
    source: str | os.PathLike[str] | Mapping[str, torch.Tensor] | torch.nn.Module,
    name: str | None = None,
    revision: str | None = None,
) -> LoadedModel:
    """Like ``load_model``, but safetensors weights stay on disk (a ``LazyState``) until each is asked for.

    Modules and state dicts are already in memory; ``.bin`` checkpoints are read whole (a pickle
    cannot be read tensor by tensor safely).
    """
    if isinstance(source, torch.nn.Module | Mapping):
        return load_model(source, name, revision)
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".safetensors":
        return LoadedModel(name or str(path), LazyState.of_files([path]), path.parent, read_config(path.parent))
    if path.is_dir() and (files := safetensors_files(path)):
        return LoadedModel(name or str(path), LazyState.of_files(files), path, read_config(path))
    if path.exists() or not looks_like_hub_id(str(source)):
        return load_model(source, name, revision)
    folder = download_from_hub(str(source), revision)
    files = safetensors_files(folder)
    state = LazyState.of_files(files) if files else read_folder(folder)
    return LoadedModel(name or str(source), state, folder, read_config(folder))


def module_state(module: torch.nn.Module) -> StateDict:
    """A module's weights under the names its checkpoint folder would have.

    Two differences between ``state_dict()`` and a folder written by ``save_pretrained`` are undone
    so a module and a folder of the same model load alike: tied weights (GPT-2's ``lm_head``, T5's
    ``encoder.embed_tokens``) appear once, under their first name; and transformers' renamings of
    legacy checkpoint names (ViT's ``encoder.layer.N.attention.attention.query`` is
    ``layers.N.attention.q_proj`` in memory) are reverted, as ``save_pretrained`` does.
    """
    state: StateDict = {}
    seen: set[tuple[int, int, tuple[int, ...], tuple[int, ...]]] = set()
    for key, tensor in module.state_dict().items():
        if tensor.device.type != "meta":
            alias = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride())
            if alias in seen:
                continue
            seen.add(alias)
        state[key] = tensor.detach()
    transformers = sys.modules.get("transformers")  # not imported: the module cannot be a transformers model
    if transformers is None or not isinstance(module, transformers.PreTrainedModel):
        return state
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers < 5 keeps checkpoint names in memory
        return state
    return dict(revert_weight_conversion(module, state))


def looks_like_hub_id(text: str) -> bool:
    """Whether ``text`` could name a hub repository, rather than only a (missing) local path.

    Paths that start with '/', '.', '~', hold more than one '/', or end like a weights file are
    never sent to the hub: a typo in a local path gets a "no such file" error, not a network one.
    """
    return bool(_HUB_ID.fullmatch(text)) and not text.endswith(_WEIGHT_SUFFIXES) and ".." not in text


def check_state_dict(state: Mapping[Any, Any], where: str) -> StateDict:
    """A copy of ``state`` after checking it maps tensor names to tensors (a checkpoint may hold
    optimizer state, step counters or nested dicts that are not weights)."""
    bad = [f"{k!r} ({type(v).__name__})" for k, v in state.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        raise BadWeightsError(
            f"{where}: expected a state dict of name -> tensor; these entries are not tensors: {bad[:5]}"
        )
    return dict(state)


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
            shards = _index_shards(index)
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
    if candidates:
        raise MergetuneError(
            f"{folder}: {len(candidates)} .safetensors files but no {SAFETENSORS_INDEX} to say which "
            f"tensors each holds: {[c.name for c in candidates[:5]]}"
        )
    raise MergetuneError(
        f"{folder}: no weights found (expected {SAFETENSORS_FILE}, {SAFETENSORS_INDEX}, {BIN_FILE} "
        f"or {BIN_INDEX}); point to a Hugging Face model folder"
    )


def _index_shards(index: Path) -> list[str]:
    """The shard files a sharded checkpoint's index lists (each read once)."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        return sorted(set(weight_map.values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise MergetuneError(
            f"{index}: not a valid shard index (expected a 'weight_map' of name -> file): {exc}"
        ) from exc


def read_weights_file(path: Path) -> StateDict:
    """All tensors of one weights file: safetensors, or a PyTorch pickle read with weights_only."""
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
                f"{path}: refused or failed to load with torch.load(weights_only=True): {_short_reason(exc)}; "
                "mergetune never unpickles code or arbitrary objects: convert the checkpoint to safetensors"
            ) from exc
        if not isinstance(loaded, Mapping):
            raise BadWeightsError(f"{path}: expected a state dict, got {type(loaded).__name__}")
        return check_state_dict(loaded, str(path))
    raise MergetuneError(f"{path}: unsupported weights format '{path.suffix}' (use .safetensors or .bin)")


def _short_reason(exc: Exception) -> str:
    """The one line of a torch.load failure that says what was refused (its message is a page long,
    with terminal colour codes and advice to retry with weights_only=False, which we never do)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    match = re.search(r"WeightsUnpickler error: ([^\n]*)", text)
    line = match.group(1) if match else next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return f"{type(exc).__name__}: {line.split('. ')[0][:300]}"


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


def tensor_names(source: str | os.PathLike[str]) -> tuple[list[str], str | None]:
    """Names of a model's floating-point tensors and its model type, reading only file headers.

    For safetensors folders nothing but the headers is read, so a search driver can learn an
    LLM's layer groups without loading its weights; other sources are loaded.
    """
    path = Path(source).expanduser()
    files = safetensors_files(path) if path.is_dir() else []
    if not files:
        model = load_model(source)
        return [k for k, v in model.state.items() if v.is_floating_point()], model.model_type
    names = []
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            names += [k for k in f.keys() if f.get_slice(k).get_dtype().startswith(("F", "BF"))]  # noqa: SIM118
    return names, read_config(path).get("model_type")


def safetensors_files(folder: Path) -> list[Path]:
    """The files ``read_folder`` would read, in its order of preference, when they are safetensors (else [])."""
    if (folder / SAFETENSORS_INDEX).is_file():
        return [folder / shard for shard in _index_shards(folder / SAFETENSORS_INDEX)]
    if (folder / BIN_INDEX).is_file():
        return []
    if (folder / SAFETENSORS_FILE).is_file():
        return [folder / SAFETENSORS_FILE]
    if (folder / BIN_FILE).is_file():
        return []
    candidates = sorted(folder.glob("*.safetensors"))
    return candidates if len(candidates) == 1 else []
