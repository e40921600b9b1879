"""Write a merged model as a Hugging Face folder that ``AutoModel.from_pretrained`` loads.

The folder holds the merged weights (safetensors, sharded above ``max_shard_bytes``), the base's
config (dtype updated), tokenizer and generation config, the recipe that reproduces it, a model
card, and, when experts carry task-specific tensors (classification heads), one
``heads/<task>.safetensors`` per task.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from mergetune.merging.loading import looks_like_hub_id
from mergetune.merging.modelset import ModelSet
from mergetune.merging.oneshot import stream_merge
from mergetune.merging.shards import ShardWriter, TensorSpec
from mergetune.recipe import Recipe

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "preprocessor_config.json",
)
DEFAULT_SHARD_BYTES = 4 * 1024**3


def save_merged(
    modelset: ModelSet,
    merged: Mapping[str, torch.Tensor],
    recipe: Recipe,
    out_dir: str | Path,
    *,
    scores: ScoreTable | None = None,
    about: str = "",
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Write the merged model folder of a resident merge; returns its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_weights({**merged, **modelset.passthrough}, out, max_shard_bytes)
    _write_metadata(modelset, recipe, out, scores, about)
    return out


@dataclass(frozen=True)
class MergedFolder:
    """Where the merge went and what it cost; ``resident_reason`` is set when it could not stream."""

    folder: Path
    load_seconds: float  # streamed: headers and the counting passes; resident: loading the models
    merge_seconds: float  # streamed: the merge pass (reading, merging and writing overlap)
    streamed: bool = False
    passes: int = 1  # passes over the models' weights
    resident_reason: str | None = None
    compiled: bool = False  # kernels compiled or eager (``--engine``): the same backend gives the same bits


def merge_to_folder(
    recipe: Recipe,
    out_dir: str | Path,
    *,
    device: str = "cpu",
    compile: bool | None = None,
    scores: ScoreTable | None = None,
    about: str = "",
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> MergedFolder:
    """Merge the models a recipe names tensor by tensor and write the folder (``mergetune merge``).

    Streams (``oneshot.stream_merge``): the weights are never all in memory, and the result is the
    resident merge's bit for bit. ``compile=None`` compiles only a large merge (``oneshot.auto_compile``).
    ``scores`` and ``about`` go into the model card (a search's scores of the recipe, where it came from).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    done = stream_merge(recipe, out, device=device, compile=compile, max_shard_bytes=max_shard_bytes)
    _write_metadata(done.modelset, recipe, out, scores, about)
    streamed = done.resident_reason is None
    return MergedFolder(
        out, done.setup_seconds, done.merge_seconds, streamed, done.passes, done.resident_reason, done.compiled
    )


def write_weights(state: Mapping[str, torch.Tensor], out: Path, max_shard_bytes: int) -> None:
    """Safetensors shards of at most ``max_shard_bytes`` (one tensor may exceed it), with an index when sharded."""
    with ShardWriter(out, [TensorSpec.of(name, t) for name, t in state.items()], max_shard_bytes) as writer:
        for name, tensor in state.items():
            writer.write(name, tensor)


def _write_metadata(modelset: ModelSet, recipe: Recipe, out: Path, scores: ScoreTable | None, about: str) -> None:
    """Everything but the merged weights: config, tokenizer, recipe, per-task heads, model card."""
    _write_config(modelset, recipe, out)
    _copy_tokenizer(modelset.base_folder, out)
    recipe.save(out / "recipe.yaml")
    _write_heads(modelset, out)
    (out / "README.md").write_text(model_card(recipe, modelset, scores, about))


def _write_config(modelset: ModelSet, recipe: Recipe, out: Path) -> None:
    config: dict[str, Any] = dict(modelset.base_info.config)
    if not config:
        return
    config["dtype"] = recipe.dtype
    config.pop("torch_dtype", None)
    (out / "config.json").write_text(json.dumps(config, indent=2))


def _copy_tokenizer(base_folder: Path | None, out: Path) -> None:
    if base_folder is None:
        return
    for fname in TOKENIZER_FILES:
        src = base_folder / fname
        if src.is_file():
            shutil.copy2(src, out / fname)


def _write_heads(modelset: ModelSet, out: Path) -> None:
    """One safetensors file per task's head; its metadata holds the task and the expert's label map.

    ``id2label`` (JSON) is the expert config's, so a head is never attached with its labels in another order.
    """
    maps = modelset.head_label_maps
    for task, tensors, id2label in zip(modelset.task_names, modelset.task_tensors, maps, strict=True):
        if tensors:
            (out / "heads").mkdir(exist_ok=True)
            state = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
            metadata = {"format": "pt", "task": task}
            if id2label:
                metadata["id2label"] = json.dumps({str(k): str(v) for k, v in id2label.items()})
            save_file(state, str(out / "heads" / f"{task}.safetensors"), metadata=metadata)


ScoreTable = Mapping[str, Mapping[str, float | None]]  # task -> column (e.g. "test") -> score


def model_card(recipe: Recipe, modelset: ModelSet, scores: ScoreTable | None, about: str = "") -> str:
    """README.md of a merged folder, ready for the hub: metadata, models, scores (if given), the recipe.

    The metadata names only hub ids as ``base_model`` (the hub rejects local paths there); every
    model, local or not, is listed in the text. ``about`` says where the recipe came from.
    """
    experts = "\n".join(
        f"- `{e.name}`: `{e.model}`" + (f" (revision `{e.revision}`)" if e.revision else "") for e in recipe.experts
    )
    heads = ""
    if any(modelset.task_tensors):
        heads = (
            "\nTask-specific tensors (classification heads) are in `heads/<task>.safetensors`; the metadata of "
            "each file holds its task and label map (`id2label`, JSON).\n"
        )
    about = f"{about}\n\n" if about else ""
    return f"""---
{_card_metadata(recipe)}---
# Merged model ({recipe.method})

Merged with [mergetune](https://pypi.org/project/mergetune/) from the base `{recipe.base}` and
{len(recipe.experts)} experts:

{experts}

{about}`recipe.yaml` reproduces these weights bit for bit: `mergetune merge recipe.yaml OUT_DIR`.
{heads}{_scores_markdown(scores)}
## Recipe

```yaml
{recipe.to_yaml()}```
"""


def _card_metadata(recipe: Recipe) -> str:
    """YAML front matter: library, hub-id base models (a merge of them), tags."""
    models = [recipe.base, *(e.model for e in recipe.experts)]
    hub = [m for m in dict.fromkeys(models) if looks_like_hub_id(m) and not Path(m).exists()]
    lines = ["library_name: transformers"]
    if hub:
        lines += ["base_model:", *(f"- {m}" for m in hub), "base_model_relation: merge"]
    lines += ["tags:", "- merge", "- mergetune", f"- {recipe.method}"]
    return "".join(line + "\n" for line in lines)


def _scores_markdown(scores: ScoreTable | None) -> str:
    """A task x column table; missing values are shown as '–'."""
    if not scores:
        return ""
    columns = list(dict.fromkeys(c for row in scores.values() for c in row))
    header = "| task | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns)
    rows = "\n".join(
        f"| {task} | " + " | ".join("–" if row.get(c) is None else f"{row[c]:.4f}" for c in columns) + " |"
        for task, row in scores.items()
    )
    return f"\n## Scores\n\n{header}\n{rows}\n"
