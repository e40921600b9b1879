"""RegMean's statistics, one Gram file per expert on its own task's training split (``mergetune grams``, and
every search whose space names ``regmean``).

For each task with an expert, the expert's task model runs on up to ``examples`` training examples
of that task (the same tokenisation its scores use) and the input Gram matrix of every merged linear
layer is written to ``<run>/grams/<task>.safetensors`` (:mod:`mergetune.objectives.grams`), with
what it was computed from (expert, task config, examples) and how long it took in the file's
metadata. The returned mapping is ``options.grams`` of a ``regmean`` recipe: a search puts it in
every regmean candidate (``SearchSpace(fixed_options=...)``), so each recipe it writes reproduces
with ``mergetune merge``. Training examples only: the validation and test splits that score the
merge are never seen by it.

A file computed from the same expert and task config is reused, not computed again (a resumed
search, a second search in the same folder, files made beforehand by ``mergetune grams --examples
N``); a file computed from another expert or task config is refused rather than overwritten, since
recipes of the run name it. The setup cost a search reports counts each file's own compute time,
reused or not: it is what RegMean adds to the search.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save

from mergetune.errors import MergetuneError
from mergetune.forward import best_prefix
from mergetune.merging.loading import tensor_names
from mergetune.merging.methods.regmean import LAYOUT_KEY, RegMean
from mergetune.objectives.experts import load_for_expert
from mergetune.objectives.grams import input_grams
from mergetune.objectives.models import load_task_model
from mergetune.objectives.suite import ValidationSuite
from mergetune.objectives.tasks import TaskConfig
from mergetune.search.atomic import write_atomic
from mergetune.search.worker import WorkerSetup, setup_tokenizer

DEFAULT_EXAMPLES = 512
GRAMS_DIR = "grams"
_SECONDS_KEY = "seconds"


@dataclass
class GramFiles:
    paths: dict[str, str]  # task -> file (absolute): the recipe's options.grams
    seconds: dict[str, float]  # task -> the time its file took to compute (when it was computed)
    sequences: dict[str, int]
    computed: list[str] = field(default_factory=list)  # tasks whose file was computed by this call
    reused: list[str] = field(default_factory=list)  # tasks whose existing file was reused

    @property
    def total_seconds(self) -> float:
        """The setup cost RegMean adds to a search: every file's compute time, reused files included."""
        return float(sum(self.seconds.values()))

    def as_options(self) -> dict[str, dict[str, Any]]:
        """The options every regmean recipe of a search carries (``SearchSpace(fixed_options=...)``)."""
        return {RegMean.name: {"grams": self.paths}}

    def describe(self) -> dict[str, Any]:
        """The summary's account of the statistics (``meta.setup.regmean_grams`` of a search)."""
        return {
            "seconds": self.total_seconds,
            "computed": self.computed,
            "reused": self.reused,
            "sequences": self.sequences,
            "files": self.paths,
        }


def search_grams(
    space_methods: Iterable[str], setup: WorkerSetup, folder: Path, console: Any = None
) -> GramFiles | None:
    """The Gram files of a search whose space names regmean (computed or reused under ``folder``), else None."""
    if RegMean.name not in space_methods:
        return None
    files = ensure_grams(setup, folder)
    line = (
        f"RegMean statistics: {len(files.computed)} computed, {len(files.reused)} reused "
        f"({files.total_seconds:.1f}s of setup) in {folder}"
    )
    if console is not None:
        console.print(line)
    return files


def ensure_grams(setup: WorkerSetup, folder: Path, examples: int | None = None) -> GramFiles:
    """Each expert's Gram file in ``folder``: reused when it was computed from this expert and task config
    (and, with ``examples`` given, from as many examples), else computed from ``examples`` (default 512)."""
    tokenizer = None
    merged, _ = tensor_names(setup.base)
    folder = folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    files = GramFiles({}, {}, {})
    covered: set[str] = set()  # experts with a task: each needs its own task's inputs
    for raw in setup.tasks:
        task_config = TaskConfig.model_validate(raw)
        expert = setup.expert_of(task_config)
        if expert is None:
            continue  # a guard task: no expert to merge
        covered.add(expert)
        path = folder / f"{task_config.name}.safetensors"
        wanted = _provenance(task_config, setup.experts[expert])
        stored = _stored_metadata(path, wanted, examples)
        if stored is not None:
            files.reused.append(task_config.name)
        else:
            tokenizer = tokenizer or setup_tokenizer(setup)
            stored = _compute(task_config, setup, tokenizer, merged, path, wanted, examples or DEFAULT_EXAMPLES)
            files.computed.append(task_config.name)
        files.paths[task_config.name] = str(path)
        files.seconds[task_config.name] = float(stored[_SECONDS_KEY])
        files.sequences[task_config.name] = int(stored["sequences"])
    missing = sorted(set(setup.experts) - covered)
    if missing:
        raise MergetuneError(f"experts {missing} score no task of the config: RegMean needs each expert's task data")
    return files


def _provenance(task_config: TaskConfig, expert: str) -> dict[str, str]:
    """What a Gram file is computed from: the expert and the task's config (its data, tokenisation)."""
    return {
        "task": task_config.name,
        "expert": str(expert),
        "task_config": json.dumps(task_config.model_dump(mode="json"), sort_keys=True),
        "split": "train",
    }


def _stored_metadata(path: Path, wanted: dict[str, str], examples: int | None) -> dict[str, str] | None:
    """The metadata of a reusable file at ``path``; None when there is none; an error when it is another's."""
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    differs = sorted(key for key, value in wanted.items() if meta.get(key) != value)
    if differs:
        raise MergetuneError(
            f"{path}: Gram file computed from another {' and '.join(differs)}; recipes of this run may name it: "
            "move it away (or use another run folder) to compute it again"
        )
    if examples is not None and meta.get("examples") != str(examples):
        raise MergetuneError(
            f"{path}: Gram file computed from {meta.get('examples', 'an unknown number of')} examples, not {examples}; "
            "recipes of this run may name it: move it away to compute it again, or drop --examples to reuse it"
        )
    if _SECONDS_KEY not in meta or "sequences" not in meta:
        raise MergetuneError(f"{path}: Gram file without its compute time or sequence count; move it away")
    return meta


def _compute(
    task_config: TaskConfig,
    setup: WorkerSetup,
    tokenizer: Any,
    merged: list[str],
    path: Path,
    provenance: dict[str, str],
    examples: int,
) -> dict[str, str]:
    """Compute one expert's Gram file (written whole or not at all); returns its metadata."""
    start = time.perf_counter()
    task = load_for_expert(task_config, provenance["expert"])
    suite = ValidationSuite([task], tokenizer, split="train", max_examples=examples)
    batches = getattr(suite.evaluators[task.name], "batches", None)
    if batches is None:
        raise MergetuneError(f"task '{task.name}': its kind keeps no token batches to compute RegMean's Grams from")
    model = load_task_model(task, provenance["expert"], trust_remote_code=setup.trust_remote_code)
    params = dict(model.named_parameters())
    prefix = best_prefix(params, dict.fromkeys(merged))
    weights = {prefix + name: name for name in merged if prefix + name in params}
    grams = input_grams(model, batches.cpu, weights)
    metadata = {
        **provenance,
        LAYOUT_KEY: json.dumps(grams.layouts),
        "examples": str(examples),
        "sequences": str(grams.sequences),
        "tokens": str(grams.tokens),
        _SECONDS_KEY: f"{time.perf_counter() - start:.3f}",
    }
    write_atomic(path, save({k: v.contiguous() for k, v in grams.matrices.items()}, metadata=metadata))
    return metadata
