"""Tasks: where a task's examples come from, how they are split, and what their labels mean.

A :class:`TaskConfig` names a data source, the input and label columns, the label order of the
task's head, the metric, the kind of objective and the split sizes. :func:`load_task` reads the
source, checks every column and label against the config, de-duplicates and splits it (see
:mod:`mergetune.objectives.splits`) and returns a :class:`TaskData` of plain texts and integer
labels. Nothing here knows about models or merging; evaluators consume ``TaskData``.

Where the splits come from (``TaskData.split_origin``):

- *given*: ``splits: {train: PATH, validation: PATH, test: PATH}`` (train optional), a folder holding
  ``train``/``validation``/``test`` data files (``valid``, ``val`` and ``dev`` also name the
  validation file), or a folder written by ``DatasetDict.save_to_disk`` with validation and test
  splits. They are read as is: no re-splitting, so ``validation_size``/``test_size``/``train_size``
  do not apply (setting them to anything but their defaults, or ``train_size`` to anything but 0, is
  an error rather than a silent no-op). Exact repeats inside a split still collapse to one row.
- *made by mergetune*: any other source is de-duplicated and split, stratified and seeded (see
  :mod:`mergetune.objectives.splits`).

Validation and test rows are then checked against every training source known: a given train file,
and the data the scoring expert was trained on (``ExpertHints.training``, e.g. a zoo expert's
record). An exact duplicate (after whitespace normalisation) is an error naming the count, unless the
task sets ``allow_overlap: true``; allowed overlaps are kept in ``TaskData.overlaps``.

Label order (``TaskData.label_origin``): declared ``labels``, else the expert head's ``id2label``
(``ExpertHints.head_labels``; transformers' generic ``LABEL_0, LABEL_1, ...`` mean "no names"),
else a built-in corpus's order, else the sorted distinct values. Declared labels that disagree with
the expert's ``id2label`` are an error showing both orders.

Sources, resolved in this order (``builtin:``/``hub:`` prefixes force a kind):

- a built-in offline corpus name (``trec6``, ``sms_spam``, ...; see :mod:`.corpora`), whose table
  has the columns ``text`` and ``label``;
- a local file ``.csv``/``.tsv``/``.jsonl``/``.json``/``.parquet`` (optionally compressed: ``.gz``,
  ``.bz2``, ``.xz``, ``.zst``); CSV cells are read as strings, so labels ``1`` and ``"1"`` agree;
- a local folder: written by ``save_to_disk`` (read with ``datasets.load_from_disk``), or any
  folder ``datasets.load_dataset`` understands;
- otherwise a ``datasets`` hub id, read with ``datasets.load_dataset(source, subset, split=...)``.

Labels are matched by their string form (``1``, ``1.0`` and ``"1"`` are the label ``"1"``); integer
columns typed ``ClassLabel`` in a ``datasets`` dataset are first converted to their names.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import (
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from mergetune.errors import TaskError
from mergetune.objectives.corpora import CORPORA, available_corpora, get_corpus, load_corpus
from mergetune.objectives.evaluators.kinds import (
    ALL_METRICS,
    CUSTOM_METRIC,
    KINDS,
    ExactMatchOptions,
    LMOptions,
    MultipleChoiceOptions,
)
from mergetune.objectives.evaluators.lm_eval import (
    LMEvalOptions,
    lm_eval_task_defaults,
    read_lm_eval_splits,
    score_metric_name,
)
from mergetune.objectives.normalization import Against
from mergetune.objectives.splits import DedupReport, Splits, deduplicate, example_key, stratified_split
from mergetune.strict import StrictModel, format_validation_error

# The accepted kinds and metrics come from the one kind registry (objectives/evaluators/kinds.py).
Kind = Literal[tuple(KINDS)]  # type: ignore[valid-type]
Metric = Literal[ALL_METRICS]  # type: ignore[valid-type]
SplitName = Literal["train", "validation", "test"]

#: Metrics each kind of task can be scored with (all are "higher is better"); the first is the default.
KIND_METRICS: dict[str, tuple[str, ...]] = {name: spec.metrics for name, spec in KINDS.items()}
#: The option group of each kind that has one: a task config field named after the kind.
KIND_OPTION_GROUPS = tuple(name for name, spec in KINDS.items() if spec.options is not None)
_SCORER = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
FILE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".zip")
BUILTIN_PREFIX = "builtin:"
#: File stems (lower case) that name a given split inside a task folder.
SPLIT_FILE_STEMS: dict[str, tuple[str, ...]] = {
    "train": ("train",),
    "validation": ("validation", "valid", "val", "dev"),
    "test": ("test",),
}
DEFAULT_VALIDATION_SIZE = 300
DEFAULT_TEST_SIZE = 500
HUB_PREFIX = "hub:"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_SHOWN = 5  # offending values or rows quoted in an error message


class TaskConfig(StrictModel):
    """One task: data source, columns, label order (the head's), metric, kind and split sizes."""

    name: str = Field(min_length=1, description="Task name; matches the expert's name in a recipe.")
    source: str | None = Field(
        None, min_length=1, description="Built-in corpus, local file or folder, or datasets hub id (or give splits)."
    )
    splits: dict[SplitName, str] | None = Field(
        None, description="Given splits read as is: {train: PATH, validation: PATH, test: PATH}; train optional."
    )
    subset: str | None = Field(None, description="Hub configuration name (datasets' `name`), e.g. 'sst2'.")
    split: str | None = Field(None, description="Hub/folder split(s) to pool, e.g. 'train+validation'.")
    kind: Kind = "classification"
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str | None = Field(None, description="Defaults to 'label' for classification and multiple choice.")
    choices_column: str | list[str] | None = Field(None, description="Multiple choice: a list column or columns.")
    answer_column: str | None = Field(
        None, description="exact_match: the answer, or a list of acceptable answers; lm: score only this answer."
    )
    labels: list[str] | None = Field(None, description="Label names in the order of the head's outputs.")
    metric: Metric | None = Field(None, description="Defaults to the kind's first metric ('custom' with a scorer).")
    scorer: str | None = Field(
        None, description="'module:function' scoring (predictions, references) -> float; see evaluators.base."
    )
    multiple_choice: MultipleChoiceOptions | None = Field(None, description="Options of a multiple_choice task.")
    exact_match: ExactMatchOptions | None = Field(None, description="Options of an exact_match task.")
    lm: LMOptions | None = Field(None, description="Options of an lm task.")
    max_length: int = Field(128, ge=8, description="Tokens kept per example by the evaluator.")
    validation_size: int = Field(DEFAULT_VALIDATION_SIZE, ge=1, description="Made splits only.")
    test_size: int = Field(DEFAULT_TEST_SIZE, ge=1, description="Made splits only.")
    train_size: int | None = Field(None, ge=0, description="Cap on training examples; 0: no training split.")
    seed: int = Field(0, ge=0, description="Seeds made splits.")
    allow_overlap: bool = Field(
        False, description="Score even when validation/test rows are exact duplicates of training rows."
    )
    lm_eval: LMEvalOptions | None = Field(None, description="An lm-eval-harness task (name or YAML path) and options.")
    expert: str | None = Field(
        None, description="The expert this task measures; default: the expert of the task's name, else none (a guard)."
    )
    normalize: Against | None = Field(
        None, description="What the score is normalised against: expert, base, chance or none (see normalization)."
    )

    @model_validator(mode="before")
    @classmethod
    def _kind_defaults(cls, data: Any) -> Any:
        """Fill the label column and metric that the kind implies, so a dump shows what is used."""
        if not isinstance(data, Mapping):
            return data
        if data.get("lm_eval") is not None:
            return lm_eval_task_defaults(data, {k: f.default for k, f in cls.model_fields.items()})
        data = dict(data)
        kind = data.get("kind", "classification")
        spec = KINDS.get(kind) if isinstance(kind, str) else None
        if spec is None:
            return data  # the kind's own validation reports it
        if spec.label_column and data.get("label_column") is None:
            data["label_column"] = spec.label_column
        if data.get("metric") is None and spec.metrics:  # lm_eval tasks name their metric under lm_eval:
            data["metric"] = CUSTOM_METRIC if data.get("scorer") else spec.metrics[0]
        return data

    @model_serializer(mode="wrap")
    def _without_unset_pairing(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """``expert`` and ``normalize`` are dumped only when set: a dump of any other task stays as it was
        before they existed, so zoo cache keys, stored search definitions and reference caches still match."""
        data = handler(self)
        for name in ("expert", "normalize"):
            if data.get(name, "") is None:
                del data[name]
        return data

    @field_validator("name")
    @classmethod
    def _name_chars(cls, name: str) -> str:
        if not _NAME.match(name):
            raise ValueError("use letters, digits, '_', '.' and '-' (it keys results and recipes)")
        return name

    @field_validator("labels", mode="before")
    @classmethod
    def _labels_as_strings(cls, labels: Any) -> Any:
        """YAML ``labels: [1, 2, 3]`` means the labels '1', '2', '3' (labels are matched as strings)."""
        if isinstance(labels, list):
            return [_label_string(x) if isinstance(x, int | float) and not isinstance(x, bool) else x for x in labels]
        return labels

    @field_validator("labels")
    @classmethod
    def _labels_unique(cls, labels: list[str] | None) -> list[str] | None:
        if labels is None:
            return None
        if len(labels) < 2:
            raise ValueError("a label set needs at least 2 labels")
        repeated = sorted({x for x in labels if labels.count(x) > 1})
        if repeated or any(not x.strip() for x in labels):
            raise ValueError(f"labels must be unique, non-empty names; repeated: {repeated}")
        return labels

    @model_validator(mode="after")
    def _consistent(self) -> TaskConfig:
        if (self.kind == "lm_eval") != (self.lm_eval is not None):
            raise ValueError("kind 'lm_eval' needs lm_eval: (an lm-eval task name or task YAML path), and only it")
        if self.lm_eval is not None:
            return self  # the harness task brings its own data, prompts and metric (see evaluators.lm_eval)
        self._check_kind_fields()
        if self.metric not in KIND_METRICS[self.kind]:
            raise ValueError(f"metric '{self.metric}' does not fit kind '{self.kind}'; use {KIND_METRICS[self.kind]}")
        if self.kind in ("lm", "exact_match") and (self.label_column or self.labels):
            raise ValueError(f"an '{self.kind}' task has no labels: remove label_column / labels")
        if self.kind == "multiple_choice" and not self.choices_column:
            raise ValueError("a 'multiple_choice' task needs choices_column (a list column, or a list of columns)")
        if self.kind != "multiple_choice" and self.choices_column:
            raise ValueError("choices_column is only for kind 'multiple_choice'")
        if self.kind == "multiple_choice" and self.labels:
            raise ValueError("a 'multiple_choice' task's label is the index of the right choice: remove labels")
        self._check_source()
        return self

    def _check_kind_fields(self) -> None:
        """Answer column, scorer and option groups only where the kind takes them (see the kind registry)."""
        spec = KINDS[self.kind]
        if spec.needs_answers and not self.answer_column:
            raise ValueError(f"a '{self.kind}' task needs answer_column (the answer, or a list of acceptable answers)")
        if self.answer_column and not spec.takes_answers:
            takers = [k for k, s in KINDS.items() if s.takes_answers]
            raise ValueError(f"answer_column is only for kinds {takers}")
        if self.scorer is not None:
            if not spec.custom_scorer:
                takers = [k for k, s in KINDS.items() if s.custom_scorer]
                raise ValueError(f"a scorer is only for kinds {takers}")
            if not _SCORER.match(self.scorer):
                raise ValueError(f"scorer '{self.scorer}' must be 'module:function', e.g. 'my_scoring:f1'")
        if (self.metric == CUSTOM_METRIC) != (self.scorer is not None):
            raise ValueError("metric 'custom' goes with a scorer (scorer: 'module:function'), and a scorer with it")
        for group in KIND_OPTION_GROUPS:
            if group != self.kind and getattr(self, group) is not None:
                raise ValueError(f"option group '{group}' is for kind '{group}'; this task's kind is '{self.kind}'")

    @property
    def score_metric(self) -> str:
        """The metric name this task's scores carry (an lm-eval task's from its options), known before loading."""
        return score_metric_name(self.lm_eval) if self.lm_eval is not None else str(self.metric)

    @property
    def kind_options(self) -> Any:
        """The kind's option group as given, else its defaults; None for kinds without options."""
        options = KINDS[self.kind].options
        if options is None:
            return None
        given = getattr(self, self.kind, None)
        return given if given is not None else options()

    def _check_source(self) -> None:
        """Static checks of the source: one of source / splits, a known built-in name, no hub options on files."""
        if (self.source is None) == (self.splits is None):
            raise ValueError("give either 'source' (made or folder splits) or 'splits' (given split files)")
        if self.splits is not None:
            self._check_given_splits()
            return
        assert self.source is not None
        kind = _static_source_kind(self.source)
        if kind == "builtin" and _builtin_name(self.source) not in CORPORA:
            raise ValueError(
                f"unknown built-in corpus '{_builtin_name(self.source)}'; available: {', '.join(available_corpora())}"
            )
        if kind in ("builtin", "file") and (self.subset or self.split):
            raise ValueError(f"subset/split apply to hub ids and dataset folders, not to the {kind} source")

    def _check_given_splits(self) -> None:
        assert self.splits is not None
        missing = [s for s in ("validation", "test") if s not in self.splits]
        if missing:
            raise ValueError(f"splits needs validation and test files (train is optional); missing: {missing}")
        if self.subset or self.split:
            raise ValueError("subset/split apply to hub ids and dataset folders, not to given split files")
        unsupported = {k: v for k, v in self.splits.items() if not _data_suffix(v)}
        if unsupported:
            raise ValueError(f"splits: {unsupported} are not data files; use {', '.join(FILE_SUFFIXES)}")
        reason = given_split_conflict(self)
        if reason:
            raise ValueError(reason)

    def with_paths_from(self, folder: str | Path) -> TaskConfig:
        """A copy whose relative local paths (source file or folder, split files) are absolute against ``folder``.

        Built-in corpus names and hub ids are left as they are; a source is a local path when it has a
        data-file suffix, is written as a path (``./x``) or exists under ``folder``.
        """
        update: dict[str, Any] = {}
        if self.splits is not None:
            update["splits"] = {k: str(local_path(v, folder).resolve()) for k, v in self.splits.items()}
        elif self.source is not None and _static_source_kind(self.source) not in ("builtin", "hub"):
            path = local_path(self.source, folder)
            if _data_suffix(self.source) or self.source.startswith(("./", "../", "~")) or path.exists():
                update["source"] = str(path.resolve())
        return self.model_copy(update=update) if update else self

    @property
    def origin(self) -> str:
        """The source as the user named it, for messages: the source, or the given split files."""
        if self.source is not None:
            return self.source
        return ", ".join(f"{k}: {v}" for k, v in (self.splits or {}).items())

    def check_head(self, num_labels: int) -> None:
        """Raise unless the declared label set has as many labels as the head has outputs."""
        if self.labels is not None:
            _check_head_size(self.name, self.label_column, list(self.labels), num_labels)

    @classmethod
    def parse(cls, data: Any, source: str = "task config") -> TaskConfig:
        """Validate a mapping (from YAML/JSON); errors name the task and each faulty field."""
        if not isinstance(data, Mapping):
            raise TaskError(f"{source}: expected a mapping of task fields, got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            name = data.get("name", "?")
            raise TaskError(
                f"{source}: task '{name}': invalid task config:\n{format_validation_error(exc)}\n{accepted_keys_line()}"
            ) from exc

    def load(self, base_dir: str | Path | None = None, expert: ExpertHints | None = None) -> TaskData:
        """Shortcut for :func:`load_task`."""
        return load_task(self, base_dir, expert)


def accepted_keys_line() -> str:
    """One line listing the keys a task accepts (for errors about a task)."""
    return f"a task accepts the keys: {', '.join(TaskConfig.model_fields)}"


def given_split_conflict(config: TaskConfig) -> str | None:
    """Why the split-size fields cannot apply to given splits (they are read as is), or None."""
    changed = [
        f"{name}: {value}"
        for name, value, default in (
            ("validation_size", config.validation_size, DEFAULT_VALIDATION_SIZE),
            ("test_size", config.test_size, DEFAULT_TEST_SIZE),
        )
        if value != default
    ]
    if config.train_size not in (None, 0):
        changed.append(f"train_size: {config.train_size}")
    if not changed:
        return None
    return (
        f"{', '.join(changed)} cannot apply: the splits are given and read as is (only train_size: 0, "
        "to train on nothing, is accepted); remove them, or give one file to have mergetune make the splits"
    )


@dataclass(frozen=True)
class ExpertHints:
    """What the expert scoring a task tells about it (built by ``objectives.experts`` from its folder).

    ``head_labels``: the head's label names in output order (its config's ``id2label``), None when the
    expert has no head or only transformers' generic ``LABEL_i`` names. ``training``: (description,
    example keys) of data the expert is known to have been trained on, checked against validation/test.
    """

    head_labels: tuple[str, ...] | None = None
    head_source: str = ""
    training: tuple[tuple[str, frozenset[str]], ...] = ()


@dataclass(frozen=True)
class Overlap:
    """Validation/test rows that are exact duplicates of rows in one training source."""

    split: str
    source: str
    count: int
    size: int
    example: str

    def describe(self) -> str:
        return f"{self.count} of {self.size} {self.split} rows are in {self.source} (e.g. {self.example[:60]!r})"


@dataclass(frozen=True, eq=False)
class SplitData:
    """One split of a task: texts (and pairs / choices) with integer labels."""

    texts: tuple[str, ...]
    labels: np.ndarray | None  # int64: index into label_names, or of the right choice; None without labels
    text_pairs: tuple[str, ...] | None = None
    choices: tuple[tuple[str, ...], ...] | None = None
    answers: tuple[tuple[str, ...], ...] | None = None  # acceptable answers per row (answer_column)

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, rows: Sequence[int] | np.ndarray | slice) -> SplitData:
        """The given rows of every per-row field (a new field is carried along: none is dropped by a subset)."""
        picked = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                picked[f.name] = None
            elif isinstance(value, np.ndarray):
                picked[f.name] = value[rows]
            elif isinstance(rows, slice):
                picked[f.name] = tuple(value[rows])
            else:
                picked[f.name] = tuple(value[int(i)] for i in rows)
        return SplitData(**picked)


@dataclass(frozen=True, eq=False)
class TaskData:
    """A loaded task: disjoint, stratified train / validation / test splits and the label names."""

    config: TaskConfig
    label_names: tuple[str, ...]  # the head's label order; empty for lm and multiple choice
    train: SplitData
    validation: SplitData
    test: SplitData
    dedup: DedupReport
    source_kind: str = field(default="")
    label_origin: str = ""  # declared / expert id2label / corpus / sorted / "" without labels
    split_origin: str = ""  # "given (...)" or "made by mergetune (...)"
    overlaps: tuple[Overlap, ...] = ()  # allowed overlaps (allow_overlap: true); others are errors
    overlap_checked: tuple[str, ...] = ()  # the training sources validation and test were compared with

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def split(self, name: SplitName) -> SplitData:
        if name not in ("train", "validation", "test"):
            raise TaskError(f"task '{self.name}': unknown split '{name}'; use train, validation or test")
        return getattr(self, name)

    def check_head(self, num_labels: int) -> None:
        """Raise unless the task's label set has as many labels as the head has outputs."""
        if self.label_names:
            _check_head_size(self.name, self.config.label_column, list(self.label_names), num_labels)

    def summary(self) -> str:
        sizes = f"train {len(self.train)}, validation {len(self.validation)}, test {len(self.test)}"
        return (
            f"task '{self.name}' ({self.source_kind} {self.config.origin}): {sizes}, splits {self.split_origin}; "
            f"{self.dedup.summary()}"
        )


# ---- loading ---------------------------------------------------------------------------------

Columns = dict[str, list[Any]]
_ALL = "all"  # the key of the one table of a source whose splits mergetune makes


@dataclass(frozen=True)
class _Read:
    """What a source gave: one table to split (``{"all": ...}``), or one table per given split."""

    kind: str  # builtin / file / folder / hub / splits
    location: str
    tables: dict[str, Columns]
    given: bool
    origin: str  # where the splits come from, for TaskData.split_origin


def load_task(config: TaskConfig, base_dir: str | Path | None = None, expert: ExpertHints | None = None) -> TaskData:
    """Read, check and split (or take the given splits of) a task's data.

    Relative paths resolve against ``base_dir``. ``expert`` (see :class:`ExpertHints`) gives the
    head's label order and the data the expert is known to have trained on.
    """
    if config.lm_eval is not None:
        return _load_lm_eval(config, base_dir)
    read = _read(config, base_dir)
    return _build(config, read, expert or ExpertHints())


def _load_lm_eval(config: TaskConfig, base_dir: str | Path | None) -> TaskData:
    """An lm-eval task's documents as given by its splits: search split as validation, test split as test."""
    assert config.lm_eval is not None  # the caller checked
    found = read_lm_eval_splits(config.name, config.lm_eval, base_dir)
    n = len(found.search) + len(found.test) + len(found.train)
    return TaskData(
        config=config.model_copy(update={"lm_eval": found.options, "source": f"lm_eval:{found.options.task}"}),
        label_names=(),
        train=SplitData(found.train, None),
        validation=SplitData(found.search, None),
        test=SplitData(found.test, None),
        dedup=DedupReport(n, n, 0, 0, 0),
        source_kind="lm_eval",
        split_origin=f"given (lm-eval task {found.options.task}: its search and test splits)",
    )


def resolve_source(config: TaskConfig, base_dir: str | Path | None = None) -> tuple[str, str]:
    """(kind, location): kind is 'builtin', 'file', 'folder', 'hub' or 'splits' (given split files)."""
    if config.splits is not None:
        return "splits", ", ".join(str(p) for p in _given_paths(config, base_dir).values())
    assert config.source is not None  # TaskConfig requires source or splits
    source = config.source
    static = _static_source_kind(source)
    if static == "builtin":
        return "builtin", _builtin_name(source)
    if static == "hub":
        return "hub", source.removeprefix(HUB_PREFIX)
    path = local_path(source, base_dir)
    if static == "file":
        if not path.is_file():
            raise TaskError(f"task '{config.name}': source file not found: {path}")
        return "file", str(path)
    if path.is_dir():
        return "folder", str(path)
    if path.is_file():
        raise TaskError(
            f"task '{config.name}': source file {path} has an unsupported type; use one of {', '.join(FILE_SUFFIXES)}"
        )
    return "hub", source


def planned_split_origin(config: TaskConfig, base_dir: str | Path | None = None) -> str:
    """Whether the splits will be given or made, told before any data is read (for the search's first lines)."""
    kind, location = resolve_source(config, base_dir)
    if kind == "splits":
        return "given (split files, read as is)"
    if kind == "folder":
        folder = Path(location)
        if _split_files(config, folder):
            return f"given (split files in {folder.name}, read as is)"
        saved = folder / "dataset_dict.json"
        if saved.is_file() and _given_dataset_splits(config, json.loads(saved.read_text()).get("splits", [])):
            return f"given (DatasetDict splits of {folder.name}, read as is)"
    return f"made by mergetune (stratified, seed {config.seed})"


def local_path(value: str, base_dir: str | Path | None) -> Path:
    """A path as written in a config: relative ones resolve against ``base_dir`` (the config's folder)."""
    path = Path(value).expanduser()
    if base_dir is not None and not path.is_absolute():
        path = Path(base_dir) / path
    return path


def _given_paths(config: TaskConfig, base_dir: str | Path | None) -> dict[str, Path]:
    assert config.splits is not None
    paths = {}
    for split, value in config.splits.items():
        path = local_path(value, base_dir)
        if not path.is_file():
            raise TaskError(f"task '{config.name}': {split} file not found: {path}")
        paths[split] = path
    return paths


def _read(config: TaskConfig, base_dir: str | Path | None) -> _Read:
    kind, location = resolve_source(config, base_dir)
    if kind == "splits":
        files = _given_paths(config, base_dir)
        return _given(kind, location, {s: _read_file(config, p) for s, p in files.items()}, "split files")
    if kind == "builtin":
        pairs = load_corpus(location)
        columns = {"text": [t for t, _ in pairs], "label": [label for _, label in pairs]}
        return _made(config, kind, location, columns, f"built-in corpus {location}")
    if kind == "file":
        return _made(config, kind, location, _read_file(config, Path(location)), f"file {Path(location).name}")
    if kind == "folder":
        return _read_folder(config, Path(location))
    split = config.split or "train"
    return _made(config, kind, location, _read_hub(config, location), f"hub split '{split}'")


def _made(config: TaskConfig, kind: str, location: str, columns: Columns, what: str) -> _Read:
    origin = f"made by mergetune from {what} (stratified, seed {config.seed})"
    return _Read(kind, location, {_ALL: columns}, given=False, origin=origin)


def _given(kind: str, location: str, tables: dict[str, Columns], what: str) -> _Read:
    return _Read(kind, location, tables, given=True, origin=f"given ({what}, read as is)")


def _static_source_kind(source: str) -> str | None:
    """'builtin', 'hub' or 'file' when the string alone tells; None when the filesystem must decide."""
    if source.startswith(BUILTIN_PREFIX) or source in CORPORA:
        return "builtin"
    if source.startswith(HUB_PREFIX):
        return "hub"
    if _data_suffix(source):
        return "file"
    return None


def _builtin_name(source: str) -> str:
    return source.removeprefix(BUILTIN_PREFIX)


def _data_suffix(source: str) -> str | None:
    """The data format suffix of a path ('.csv', ...), looking past a compression suffix."""
    suffixes = [s.lower() for s in Path(source).suffixes]
    if suffixes and suffixes[-1] in COMPRESSION_SUFFIXES:
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes and suffixes[-1] in FILE_SUFFIXES else None


def _read_file(config: TaskConfig, path: Path) -> Columns:
    """A local CSV/TSV/JSONL/JSON/Parquet file as column lists (pandas; CSV cells kept as strings)."""
    suffix = _data_suffix(str(path))
    try:
        if suffix in (".csv", ".tsv"):
            table = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", dtype=str, keep_default_na=False)
        elif suffix == ".jsonl":
            table = pd.read_json(path, lines=True, dtype=False)
        elif suffix == ".json":
            table = _read_json(path)
        else:
            table = pd.read_parquet(path)
    except (ValueError, OSError, UnicodeDecodeError) as exc:
        raise TaskError(f"task '{config.name}': cannot read {path} as {suffix}: {exc}") from exc
    return {str(c): table[c].tolist() for c in table.columns}


def _read_json(path: Path) -> Any:
    """A JSON file holding a list of records, or JSON lines despite the .json suffix."""
    try:
        return pd.read_json(path, dtype=False)
    except ValueError:
        return pd.read_json(path, lines=True, dtype=False)


def _read_folder(config: TaskConfig, folder: Path) -> _Read:
    """A folder of split files (given), a folder written by save_to_disk, or a folder datasets.load_dataset reads."""
    # datasets: imported only for folder and hub sources (importing it takes seconds)
    import datasets

    files = _split_files(config, folder)
    if files:
        _refuse_sizes_for_given(config, f"{folder} holds split files ({', '.join(p.name for p in files.values())})")
        tables = {s: _read_file(config, p) for s, p in files.items()}
        return _given("folder", str(folder), tables, f"files {', '.join(p.name for p in files.values())}")
    saved = any((folder / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json"))
    if not saved:
        what = f"split '{config.split or 'train'}' of folder {folder.name}"
        return _made(config, "folder", str(folder), _read_hub(config, str(folder)), what)
    try:
        loaded = datasets.load_from_disk(str(folder))
    except Exception as exc:  # any failure of the library is reported with the task and folder
        raise TaskError(f"task '{config.name}': cannot read dataset folder {folder}: {exc}") from exc
    if not isinstance(loaded, datasets.DatasetDict):
        return _made(config, "folder", str(folder), _dataset_columns(loaded), f"dataset {folder.name}")
    given = _given_dataset_splits(config, loaded)
    if given is not None:
        _refuse_sizes_for_given(config, f"{folder} holds the splits {sorted(loaded)}")
        tables = {s: _dataset_columns(loaded[n]) for s, n in given.items()}
        return _given("folder", str(folder), tables, f"DatasetDict splits {', '.join(given.values())}")
    what = f"DatasetDict split '{config.split or 'train'}' of {folder.name}"
    return _made(config, "folder", str(folder), _dataset_columns(_pick_splits(config, loaded, str(folder))), what)


def _split_name(stem: str) -> str | None:
    """'train', 'validation' or 'test' when a file stem (or DatasetDict split) names one, else None."""
    return next((split for split, stems in SPLIT_FILE_STEMS.items() if stem.lower() in stems), None)


def _split_files(config: TaskConfig, folder: Path) -> dict[str, Path]:
    """Given split files in a folder (train optional); {} when the folder holds none.

    A validation file without a test file (or the reverse) is an error: reading only part of the
    given splits and making the rest from the training rows is exactly how test rows leak.
    """
    found: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        split = _split_name(path.name.split(".", 1)[0]) if path.is_file() and _data_suffix(path.name) else None
        if split is not None:
            found.setdefault(split, []).append(path)
    repeated = {s: [p.name for p in ps] for s, ps in found.items() if len(ps) > 1}
    if repeated:
        raise TaskError(f"task '{config.name}': {folder} holds several files for one split: {repeated}; keep one")
    if not ({"validation", "test"} & set(found)):
        return {}
    missing = [s for s in ("validation", "test") if s not in found]
    if missing:
        raise TaskError(
            f"task '{config.name}': {folder} holds {sorted(p[0].name for p in found.values())} but no {missing[0]} "
            f"file; give validation and test files (read as is), or point 'source' at one file to have "
            "mergetune make all the splits"
        )
    return {s: found[s][0] for s in ("train", "validation", "test") if s in found}


def _given_dataset_splits(config: TaskConfig, dataset_dict: Any) -> dict[str, str] | None:
    """Split -> DatasetDict split name when the dict holds validation and test (and 'split' is not set)."""
    if config.split is not None:
        return None
    names = {_split_name(n): n for n in sorted(dataset_dict)}  # 'validation' wins over 'val'
    if "validation" not in names or "test" not in names:
        return None
    return {s: names[s] for s in ("train", "validation", "test") if s in names}


def _refuse_sizes_for_given(config: TaskConfig, where: str) -> None:
    reason = given_split_conflict(config)
    if reason:
        raise TaskError(f"task '{config.name}': {where}: {reason}")
    if config.split is not None:
        raise TaskError(f"task '{config.name}': {where}, read as is: remove 'split'")


def _pick_splits(config: TaskConfig, dataset_dict: Any, where: str) -> Any:
    """The named split(s) ('a+b' pools several) of a DatasetDict; default 'train'."""
    # datasets: imported only for folder and hub sources (importing it takes seconds)
    import datasets

    names = (config.split or "train").split("+")
    missing = [n for n in names if n not in dataset_dict]
    if missing:
        raise TaskError(
            f"task '{config.name}': split(s) {missing} not in {where}; it has {sorted(dataset_dict)} (set 'split')"
        )
    return datasets.concatenate_datasets([dataset_dict[n] for n in names])


def _read_hub(config: TaskConfig, source: str) -> Columns:
    """datasets.load_dataset(source, subset, split); any failure becomes an error naming the task and source."""
    # datasets: imported only for folder and hub sources (importing it takes seconds)
    import datasets

    split = config.split or "train"
    try:
        loaded = datasets.load_dataset(source, config.subset, split=split)
    except Exception as exc:  # offline, unknown id, bad subset: all reported the same way
        raise TaskError(_hub_failure(config, source, split, exc)) from exc
    if isinstance(loaded, datasets.DatasetDict):
        loaded = _pick_splits(config, loaded, source)
    return _dataset_columns(loaded)


def _hub_failure(config: TaskConfig, source: str, split: str, exc: Exception) -> str:
    return (
        f"task '{config.name}': could not load '{source}' with datasets.load_dataset "
        f"(subset {config.subset!r}, split {split!r}): {type(exc).__name__}: {exc}\n"
        f"'{source}' is neither a built-in corpus ({', '.join(available_corpora())}) nor an existing local "
        f"file or folder, so it was read as a datasets hub id. Without network access, use a built-in corpus, "
        f"a local {'/'.join(FILE_SUFFIXES)} file, or a folder written by Dataset.save_to_disk; set "
        f"HF_HUB_OFFLINE=1 and HF_DATASETS_OFFLINE=1 to fail at once instead of retrying."
    )


def _dataset_columns(dataset: Any) -> Columns:
    """A datasets.Dataset as column lists, with ClassLabel integers turned into their names."""
    # datasets: imported only for folder and hub sources (importing it takes seconds)
    import datasets

    columns = dataset.to_dict()
    for name, feature in dataset.features.items():
        if isinstance(feature, datasets.ClassLabel):
            columns[name] = [None if v is None or v < 0 else feature.int2str(v) for v in columns[name]]
    return columns


# ---- checking and splitting ------------------------------------------------------------------


@dataclass(frozen=True)
class _Table:
    """One table's checked columns: texts, pairs, choices and the raw label strings."""

    texts: list[str]
    pairs: list[str] | None
    choices: list[tuple[str, ...]] | None
    labels: list[str] | None
    answers: list[tuple[str, ...]] | None = None  # exact_match / answer-only lm: acceptable answers per row

    def keys(self) -> frozenset[str]:
        """The example keys of every row (normalised text and pair), for the overlap check."""
        pairs = self.pairs or [None] * len(self.texts)
        return frozenset(example_key(t, p) for t, p in zip(self.texts, pairs, strict=True))


def _build(config: TaskConfig, read: _Read, expert: ExpertHints) -> TaskData:
    """Check columns and labels, split (or take the given splits), then check overlaps with training data."""
    tables = {name: _parse_table(config, columns) for name, columns in read.tables.items()}
    all_labels = [v for t in tables.values() for v in t.labels or ()]
    label_names, label_origin = _label_names(config, read.kind, all_labels, expert)
    ids = {name: _label_ids(config, label_names, t) for name, t in tables.items()}
    if read.given:
        parts, dedup = _given_splits(config, tables, ids)
    else:
        parts, dedup = _made_splits(config, tables[_ALL], ids[_ALL])
    train_sources = [("the given train split", tables["train"].keys())] if "train" in tables else []
    sources = [*train_sources, *expert.training]
    overlaps = _check_overlaps(config, parts, sources)
    return TaskData(
        config=config,
        label_names=label_names,
        train=parts["train"],
        validation=parts["validation"],
        test=parts["test"],
        dedup=dedup,
        source_kind=read.kind,
        label_origin=label_origin,
        split_origin=read.origin,
        overlaps=overlaps,
        overlap_checked=tuple(description for description, _ in sources),
    )


def _parse_table(config: TaskConfig, columns: Columns) -> _Table:
    _require_columns(config, columns)
    texts = _text_values(config, columns, config.text_column)
    pairs = _text_values(config, columns, config.text_pair_column) if config.text_pair_column else None
    choices = _choice_values(config, columns) if config.kind == "multiple_choice" else None
    answers = _answer_values(config, columns) if config.answer_column else None
    return _Table(texts, pairs, choices, _raw_labels(config, columns), answers)


def _take(table: _Table, label_ids: list[int] | None, rows: Sequence[int]) -> SplitData:
    return SplitData(
        texts=tuple(table.texts[i] for i in rows),
        labels=None if label_ids is None else np.array([label_ids[i] for i in rows], dtype=np.int64),
        text_pairs=None if table.pairs is None else tuple(table.pairs[i] for i in rows),
        choices=None if table.choices is None else tuple(table.choices[i] for i in rows),
        answers=None if table.answers is None else tuple(table.answers[i] for i in rows),
    )


def _made_splits(
    config: TaskConfig, table: _Table, label_ids: list[int] | None
) -> tuple[dict[str, SplitData], DedupReport]:
    """De-duplicate and split one table (stratified by label, seeded)."""
    strata: Sequence[int] = label_ids if label_ids is not None else [0] * len(table.texts)
    try:
        splits = stratified_split(
            table.texts,
            strata,
            validation_size=config.validation_size,
            test_size=config.test_size,
            train_size=config.train_size,
            seed=config.seed,
            text_pairs=table.pairs,
        )
    except ValueError as exc:
        raise TaskError(
            f"task '{config.name}': column '{config.text_column}': {exc}; lower validation_size/test_size"
        ) from exc
    _require_nonempty(config, splits)
    parts = {name: _take(table, label_ids, getattr(splits, name)) for name in ("train", "validation", "test")}
    return parts, splits.dedup


def _given_splits(
    config: TaskConfig, tables: dict[str, _Table], ids: dict[str, list[int] | None]
) -> tuple[dict[str, SplitData], DedupReport]:
    """Each given split as is, in its own row order; exact repeats inside one split collapse to one row."""
    parts: dict[str, SplitData] = {}
    reports = []
    for name in ("train", "validation", "test"):
        if name not in tables or (name == "train" and config.train_size == 0):
            parts[name] = SplitData(texts=(), labels=None if config.label_column is None else np.zeros(0, np.int64))
            continue
        table, label_ids = tables[name], ids[name]
        strata: Sequence[int] = label_ids if label_ids is not None else [0] * len(table.texts)
        rows, report = deduplicate(table.texts, strata, table.pairs)
        if not rows:
            raise TaskError(f"task '{config.name}': the given {name} split is empty ({report.summary()})")
        parts[name] = _take(table, label_ids, sorted(rows))
        reports.append(report)
    dedup = DedupReport(*(sum(getattr(r, f) for r in reports) for f in DedupReport.__dataclass_fields__))
    return parts, dedup


def _check_overlaps(
    config: TaskConfig, parts: dict[str, SplitData], sources: Sequence[tuple[str, frozenset[str]]]
) -> tuple[Overlap, ...]:
    """Validation/test rows that are exact duplicates of a training source's rows: an error unless allowed."""
    found = []
    for description, keys in sources:
        for split in ("validation", "test"):
            data = parts[split]
            pairs = data.text_pairs or [None] * len(data)
            hits = [t for t, p in zip(data.texts, pairs, strict=True) if example_key(t, p) in keys]
            if hits:
                found.append(Overlap(split, description, len(hits), len(data), hits[0]))
    if found and not config.allow_overlap:
        raise TaskError(
            f"task '{config.name}': validation/test rows are exact duplicates of training rows (after whitespace "
            f"normalisation): {'; '.join(o.describe() for o in found)}. Their scores would be inflated: remove "
            "those rows, or set allow_overlap: true to score them anyway"
        )
    return tuple(found)


def _require_nonempty(config: TaskConfig, splits: Splits) -> None:
    """No split may be empty, except train when ``train_size`` is 0 (an evaluation-only task)."""
    for split_name, rows in (("train", splits.train), ("validation", splits.validation), ("test", splits.test)):
        if not rows and not (split_name == "train" and config.train_size == 0):
            hint = "; or set train_size: 0 for an evaluation-only task" if split_name == "train" else ""
            raise TaskError(
                f"task '{config.name}': column '{config.text_column}': the {split_name} split is empty "
                f"({splits.dedup.summary()}; validation_size {config.validation_size}, test_size {config.test_size}); "
                f"lower them or add data{hint}"
            )


def _require_columns(config: TaskConfig, columns: Columns) -> None:
    """Every configured column exists; the error lists the columns that do."""
    wanted = [
        ("text_column", config.text_column),
        ("text_pair_column", config.text_pair_column),
        ("label_column", config.label_column),
        ("answer_column", config.answer_column),
    ]
    choices = config.choices_column
    wanted += [("choices_column", c) for c in ([choices] if isinstance(choices, str) else choices or [])]
    for role, column in wanted:
        if column is not None and column not in columns:
            raise TaskError(
                f"task '{config.name}': column '{column}' ({role}) not found in {config.origin}; "
                f"the columns are {list(columns)}"
            )
    if not columns[config.text_column]:
        raise TaskError(f"task '{config.name}': column '{config.text_column}': the source has no rows")


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, float | np.floating):
        return math.isnan(value)
    return str(value) in ("<NA>", "NaT")


def _text_values(config: TaskConfig, columns: Columns, column: str) -> list[str]:
    """A text column as strings; missing or blank values are an error naming the rows."""
    values = columns[column]
    bad = [i for i, v in enumerate(values) if _is_missing(v)]
    if bad:
        raise TaskError(
            f"task '{config.name}': column '{column}' has {len(bad)} missing or empty values "
            f"(rows {bad[:_SHOWN]}{', ...' if len(bad) > _SHOWN else ''}); remove those rows"
        )
    return [v if isinstance(v, str) else str(v) for v in values]


def _label_string(value: Any) -> str | None:
    """The string form labels are matched by (None when missing): 1, 1.0 and '1' all give '1'."""
    if _is_missing(value):
        return None
    if isinstance(value, bool | np.bool_):
        return str(bool(value)).lower()
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating) and float(value).is_integer():
        return str(int(value))
    return str(value).strip()


def _raw_labels(config: TaskConfig, columns: Columns) -> list[str] | None:
    """The label column as strings (None without one); missing labels are an error naming the rows."""
    if config.label_column is None:
        return None
    raw = [_label_string(v) for v in columns[config.label_column]]
    missing = [i for i, v in enumerate(raw) if v is None]
    if missing:
        raise TaskError(
            f"task '{config.name}': column '{config.label_column}' has {len(missing)} missing labels "
            f"(rows {missing[:_SHOWN]}{', ...' if len(missing) > _SHOWN else ''})"
        )
    return [v for v in raw if v is not None]


def _label_ids(config: TaskConfig, names: tuple[str, ...], table: _Table) -> list[int] | None:
    """Integer label per row: index into ``names``, or of the right choice; None without labels."""
    if table.labels is None:
        return None
    if table.choices is not None:
        return _choice_ids(config, table.labels, table.choices)
    if names and _are_head_indices(table.labels, names):
        return [int(v) for v in table.labels]
    known = set(names)
    unknown = Counter(v for v in table.labels if v not in known)
    if unknown:
        shown = ", ".join(f"'{v}' ({n} rows)" for v, n in unknown.most_common(_SHOWN))
        raise TaskError(
            f"task '{config.name}': column '{config.label_column}' holds labels not in the label set "
            f"{list(names)}: {shown}{', ...' if len(unknown) > _SHOWN else ''}"
        )
    index = {name: i for i, name in enumerate(names)}
    return [index[v] for v in table.labels]


def _are_head_indices(labels: Sequence[str], names: tuple[str, ...]) -> bool:
    """Integer labels 0..n-1 where no label is a name of the head: the head's output indices (HF's convention)."""
    values = set(labels)
    return not (values & set(names)) and all(v.isdigit() and int(v) < len(names) for v in values)


def _label_names(
    config: TaskConfig, source_kind: str, labels: list[str], expert: ExpertHints
) -> tuple[tuple[str, ...], str]:
    """(label names in the head's order, where that order came from); see the module docstring."""
    head = expert.head_labels
    if config.labels is not None:
        if head is not None and tuple(config.labels) != head:
            raise TaskError(
                f"task '{config.name}': the declared labels {list(config.labels)} disagree with the expert head's "
                f"order {list(head)} ({expert.head_source}); declare them in the head's order, or remove 'labels'"
            )
        return tuple(config.labels), "declared" + (" (matches the expert's id2label)" if head else "")
    if config.label_column is None or config.kind == "multiple_choice":
        return (), ""
    if head is not None:
        how = " (the data's labels are its output indices)" if _are_head_indices(labels, head) else ""
        return head, f"expert id2label ({expert.head_source}){how}"
    if source_kind == "builtin":
        assert config.source is not None
        return get_corpus(_builtin_name(config.source)).labels, "corpus"
    found = sorted(set(labels), key=_natural_key)
    if len(found) < 2:
        raise TaskError(
            f"task '{config.name}': column '{config.label_column}' holds a single label {found}; "
            "a classifier needs at least 2 (declare 'labels' to fix the head's label set)"
        )
    return tuple(found), "sorted (no label names from the expert: declare labels to fix the order)"


def _natural_key(label: str) -> tuple[int, float, str]:
    """Numbers in numeric order ('2' before '10'), then other labels alphabetically."""
    try:
        return (0, float(label), label)
    except ValueError:
        return (1, 0.0, label)


def _choice_values(config: TaskConfig, columns: Columns) -> list[tuple[str, ...]]:
    """Choices per row, from one list column (or a JSON list in a CSV cell) or from several columns."""
    spec = config.choices_column
    if isinstance(spec, list):
        rows = [tuple(str(columns[c][i]) for c in spec) for i in range(len(columns[config.text_column]))]
    else:
        assert spec is not None  # guaranteed by TaskConfig._consistent
        rows = [_as_choice_list(config, spec, i, v) for i, v in enumerate(columns[spec])]
    short = [i for i, r in enumerate(rows) if len(r) < 2]
    if short:
        raise TaskError(f"task '{config.name}': column '{spec}': rows {short[:_SHOWN]} have fewer than 2 choices")
    return rows


def _as_choice_list(config: TaskConfig, column: str, row: int, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            value = None
    if value is None or isinstance(value, str | bytes) or not hasattr(value, "__iter__"):
        raise TaskError(f"task '{config.name}': column '{column}': row {row} is not a list of choices")
    return tuple(str(c) for c in value)


def _choice_ids(config: TaskConfig, labels: list[str], choices: list[tuple[str, ...]]) -> list[int]:
    """The right choice per row: an index into the row's choices, or the text of one of them."""
    ids, bad = [], []
    for i, (label, options) in enumerate(zip(labels, choices, strict=True)):
        if label.isdigit() and int(label) < len(options):
            ids.append(int(label))
        elif label in options:
            ids.append(options.index(label))
        else:
            bad.append(i)
    if bad:
        raise TaskError(
            f"task '{config.name}': column '{config.label_column}': rows {bad[:_SHOWN]} name no valid choice "
            "(give the index of the right choice, or its text)"
        )
    return ids


def _answer_values(config: TaskConfig, columns: Columns) -> list[tuple[str, ...]]:
    """Acceptable answers per row: a string cell is one answer, a list cell (JSONL, Parquet) several.

    An lm task's answer-only loss scores one answer per row; missing or blank answers are an error.
    """
    column = config.answer_column
    assert column is not None  # only called with an answer column
    rows: list[tuple[str, ...]] = []
    bad = []
    for i, value in enumerate(columns[column]):
        listed = not isinstance(value, str | bytes) and hasattr(value, "__iter__")
        answers = tuple(str(v) for v in value) if listed else (() if _is_missing(value) else (str(value),))
        if not answers or any(not a.strip() for a in answers) or (config.kind == "lm" and len(answers) != 1):
            bad.append(i)
        rows.append(answers)
    if bad:
        one = " (an lm task's answer-only loss takes one answer per row)" if config.kind == "lm" else ""
        raise TaskError(
            f"task '{config.name}': column '{column}' (answer_column): rows {bad[:_SHOWN]}"
            f"{', ...' if len(bad) > _SHOWN else ''} have a missing or empty answer{one}"
        )
    return rows


def _check_head_size(task: str, column: str | None, labels: list[str], num_labels: int) -> None:
    if len(labels) != num_labels:
        raise TaskError(
            f"task '{task}': column '{column}': {len(labels)} labels {labels} but the head has "
            f"{num_labels} outputs; declare labels in the head's order"
        )
