"""``mergetune grams``: RegMean's statistics, one Gram file per expert on its own task's training split.

For each task with an expert, the expert's task model runs on up to ``examples`` training examples
of that task (the same tokenisation its scores use) and the input Gram matrix of every merged linear
layer is written to ``<run>/grams/<task>.safetensors`` (:mod:`mergetune.objectives.grams`), with
what it was computed from in the file's metadata. The returned mapping is ``options.grams`` of a
``regmean`` recipe or search space. Training examples only: the validation and test splits that
score the merge are never seen by it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from mergetune.errors import MergetuneError
from mergetune.forward import best_prefix
from mergetune.merging.loading import tensor_names
from mergetune.merging.methods.regmean import LAYOUT_KEY
from mergetune.objectives.experts import load_for_expert
from mergetune.objectives.grams import input_grams
from mergetune.objectives.models import load_task_model
from mergetune.objectives.suite import ValidationSuite
from mergetune.objectives.tasks import TaskConfig
from mergetune.search.config import SearchConfig
from mergetune.search.loop import resolve_models, worker_setup
from mergetune.search.worker import setup_tokenizer

DEFAULT_EXAMPLES = 512


@dataclass
class GramFiles:
    paths: dict[str, str]  # task -> file (absolute): the recipe's options.grams
    seconds: float  # the setup cost RegMean adds to a search
    sequences: dict[str, int]


def compute_grams(config: SearchConfig, examples: int = DEFAULT_EXAMPLES, console: Any = None) -> GramFiles:
    models = resolve_models(config, console)
    setup = worker_setup(config, models)
    tokenizer = setup_tokenizer(setup)
    merged, _ = tensor_names(models.base)
    folder = (config.output_dir / "grams").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    paths, sequences = {}, {}
    for raw in models.tasks:
        config_task = TaskConfig.model_validate(raw)
        expert = models.experts.get(config_task.name)
        if expert is None:
            continue  # a guard task: no expert to merge
        paths[config_task.name], sequences[config_task.name] = _one_expert(
            config_task, expert, tokenizer, merged, folder, examples, setup.trust_remote_code
        )
    missing = sorted(set(models.experts) - set(paths))
    if missing:
        raise MergetuneError(f"experts {missing} score no task of the config: RegMean needs each expert's task data")
    return GramFiles(paths, time.perf_counter() - start, sequences)


def _one_expert(
    task_config: TaskConfig,
    expert: str,
    tokenizer: Any,
    merged: list[str],
    folder: Path,
    examples: int,
    trust_remote_code: bool,
) -> tuple[str, int]:
    task = load_for_expert(task_config, expert)
    suite = ValidationSuite([task], tokenizer, split="train", max_examples=examples)
    batches = getattr(suite.evaluators[task.name], "batches", None)
    if batches is None:
        raise MergetuneError(f"task '{task.name}': its kind keeps no token batches to compute RegMean's Grams from")
    model = load_task_model(task, expert, trust_remote_code=trust_remote_code)
    params = dict(model.named_parameters())
    prefix = best_prefix(params, dict.fromkeys(merged))
    weights = {prefix + name: name for name in merged if prefix + name in params}
    grams = input_grams(model, batches.cpu, weights)
    path = folder / f"{task.name}.safetensors"
    metadata = {
        LAYOUT_KEY: json.dumps(grams.layouts),
        "task": task.name,
        "expert": str(expert),
        "split": "train",
        "sequences": str(grams.sequences),
        "tokens": str(grams.tokens),
    }
    save_file({k: v.contiguous() for k, v in grams.matrices.items()}, str(path), metadata=metadata)
    return str(path), grams.sequences
