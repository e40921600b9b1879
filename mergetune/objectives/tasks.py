"""Tasks: where a task's examples come from, how they are split, and what their labels mean.

A :class:`TaskConfig` names a data source, the input and label columns, the label order of the
task's head, the metric, the kind of objective and the split sizes. :func:`load_task` reads the
source, checks every column and label against the config, de-duplicates and splits it (see
:mod:`mergetune.objectives.splits`) and returns a :class:`TaskData` of plain texts and integer
labels. Nothing here knows about models or merging; evaluators consume ``TaskData``.

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
from dataclasses import dataclass, field
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
from mergetune.objectives.normalization import Against
from mergetune.objectives.splits import DedupReport, Splits, stratified_split
from mergetune.strict import StrictModel, format_validation_error

Kind = Literal["classification", "multiple_choice", "lm", "unsupervised"]
Metric = Literal["accuracy", "macro_f1", "mcc", "neg_loss", "neg_entropy"]
SplitName = Literal["train", "validation", "test"]

#: Metrics each kind of task can be scored with (all are "higher is better"); the first is the default.
KIND_METRICS: dict[str, tuple[str, ...]] = {
    "classification": ("accuracy", "macro_f1", "mcc"),
    "multiple_choice": ("accuracy",),
    "lm": ("neg_loss",),
    "unsupervised": ("neg_entropy",),
}
FILE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".zip")
BUILTIN_PREFIX = "builtin:"
HUB_PREFIX = "hub:"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_SHOWN = 5  # offending values or rows quoted in an error message


class TaskConfig(StrictModel):
    """One task: data source, columns, label order (the head's), metric, kind and split sizes."""

    name: str = Field(min_length=1, description="Task name; matches the expert's name in a recipe.")
    source: str = Field(min_length=1, description="Built-in corpus, local file or folder, or datasets hub id.")
    subset: str | None = Field(None, description="Hub configuration name (datasets' `name`), e.g. 'sst2'.")
    split: str | None = Field(None, description="Hub/folder split(s) to pool, e.g. 'train+validation'.")
    kind: Kind = "classification"
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str | None = Field(None, description="Defaults to 'label' for classification and multiple choice.")
    choices_column: str | list[str] | None = Field(None, description="Multiple choice: a list column or columns.")
    labels: list[str] | None = Field(None, description="Label names in the order of the head's outputs.")
    metric: Metric | None = Field(None, description="Defaults to the kind's first metric.")
    max_length: int = Field(128, ge=8, description="Tokens kept per example by the evaluator.")
    validation_size: int = Field(300, ge=1)
    test_size: int = Field(500, ge=1)
    train_size: int | None = Field(None, ge=0, description="Cap on training examples; 0: no training split.")
    seed: int = Field(0, ge=0)
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
        data = dict(data)
        kind = data.get("kind", "classification")
        if kind in ("classification", "multiple_choice") and data.get("label_column") is None:
            data["label_column"] = "label"
        if data.get("metric") is None and kind in KIND_METRICS:
            data["metric"] = KIND_METRICS[kind][0]
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
        if self.metric not in KIND_METRICS[self.kind]:
            raise ValueError(f"metric '{self.metric}' does not fit kind '{self.kind}'; use {KIND_METRICS[self.kind]}")
        if self.kind == "lm" and (self.label_column or self.labels):
            raise ValueError("an 'lm' task has no labels: remove label_column / labels")
        if self.kind == "multiple_choice" and not self.choices_column:
            raise ValueError("a 'multiple_choice' task needs choices_column (a list column, or a list of columns)")
        if self.kind != "multiple_choice" and self.choices_column:
            raise ValueError("choices_column is only for kind 'multiple_choice'")
        if self.kind == "multiple_choice" and self.labels:
            raise ValueError("a 'multiple_choice' task's label is the index of the right choice: remove labels")
        self._check_source()
        return self

    def _check_source(self) -> None:
        """Static checks of the source: a known built-in name, and no hub options on a file or corpus."""
        kind = _static_source_kind(self.source)
        if kind == "builtin" and _builtin_name(self.source) not in CORPORA:
            raise ValueError(
                f"unknown built-in corpus '{_builtin_name(self.source)}'; available: {', '.join(available_corpora())}"
            )
        if kind in ("builtin", "file") and (self.subset or self.split):
            raise ValueError(f"subset/split apply to hub ids and dataset folders, not to the {kind} source")

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
            raise TaskError(f"{source}: task '{name}': invalid task config:\n{format_validation_error(exc)}") from exc

    def load(self, base_dir: str | Path | None = None) -> TaskData:
        """Shortcut for :func:`load_task`."""
        return load_task(self, base_dir)


@dataclass(frozen=True, eq=False)
class SplitData:
    """One split of a task: texts (and pairs / choices) with integer labels."""

    texts: tuple[str, ...]
    labels: np.ndarray | None  # int64: index into label_names, or of the right choice; None without labels
    text_pairs: tuple[str, ...] | None = None
    choices: tuple[tuple[str, ...], ...] | None = None

    def __len__(self) -> int:
        return len(self.texts)


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
        return f"task '{self.name}' ({self.source_kind} {self.config.source}): {sizes}; {self.dedup.summary()}"


# ---- loading ---------------------------------------------------------------------------------


def load_task(config: TaskConfig, base_dir: str | Path | None = None) -> TaskData:
    """Read, check, de-duplicate and split a task's data. Relative paths resolve against ``base_dir``."""
    kind, location = resolve_source(config, base_dir)
    columns = _read_source(config, kind, location)
    return _build(config, kind, columns)


def resolve_source(config: TaskConfig, base_dir: str | Path | None = None) -> tuple[str, str]:
    """(kind, location): kind is 'builtin', 'file', 'folder' or 'hub'."""
    source = config.source
    static = _static_source_kind(source)
    if static == "builtin":
        return "builtin", _builtin_name(source)
    if static == "hub":
        return "hub", source.removeprefix(HUB_PREFIX)
    path = Path(source).expanduser()
    if base_dir is not None and not path.is_absolute():
        path = Path(base_dir) / path
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


Columns = dict[str, list[Any]]


def _read_source(config: TaskConfig, kind: str, location: str) -> Columns:
    if kind == "builtin":
        pairs = load_corpus(location)
        return {"text": [t for t, _ in pairs], "label": [label for _, label in pairs]}
    if kind == "file":
        return _read_file(config, Path(location))
    if kind == "folder":
        return _read_folder(config, Path(location))
    return _read_hub(config, location)


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


def _read_folder(config: TaskConfig, folder: Path) -> Columns:
    """A folder written by save_to_disk, or a folder of data files datasets.load_dataset reads."""
    # datasets: imported only for folder and hub sources (importing it takes seconds)
    import datasets

    saved = any((folder / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json"))
    if not saved:
        return _read_hub(config, str(folder))
    try:
        loaded = datasets.load_from_disk(str(folder))
    except Exception as exc:  # any failure of the library is reported with the task and folder
        raise TaskError(f"task '{config.name}': cannot read dataset folder {folder}: {exc}") from exc
    if isinstance(loaded, datasets.DatasetDict):
        loaded = _pick_splits(config, loaded, str(folder))
    return _dataset_columns(loaded)


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


def _build(config: TaskConfig, source_kind: str, columns: Columns) -> TaskData:
    """Check columns and labels, then de-duplicate and split."""
    _require_columns(config, columns)
    texts = _text_values(config, columns, config.text_column)
    pairs = _text_values(config, columns, config.text_pair_column) if config.text_pair_column else None
    choices = _choice_values(config, columns) if config.kind == "multiple_choice" else None
    label_names, label_ids = _label_ids(config, source_kind, columns, choices)
    strata: Sequence[int] = label_ids if label_ids is not None else [0] * len(texts)
    try:
        splits = stratified_split(
            texts,
            strata,
            validation_size=config.validation_size,
            test_size=config.test_size,
            train_size=config.train_size,
            seed=config.seed,
            text_pairs=pairs,
        )
    except ValueError as exc:
        raise TaskError(
            f"task '{config.name}': column '{config.text_column}': {exc}; lower validation_size/test_size"
        ) from exc
    _require_nonempty(config, splits)

    def take(rows: tuple[int, ...]) -> SplitData:
        return SplitData(
            texts=tuple(texts[i] for i in rows),
            labels=None if label_ids is None else np.array([label_ids[i] for i in rows], dtype=np.int64),
            text_pairs=None if pairs is None else tuple(pairs[i] for i in rows),
            choices=None if choices is None else tuple(choices[i] for i in rows),
        )

    return TaskData(
        config=config,
        label_names=label_names,
        train=take(splits.train),
        validation=take(splits.validation),
        test=take(splits.test),
        dedup=splits.dedup,
        source_kind=source_kind,
    )


def _require_nonempty(config: TaskConfig, splits: Splits) -> None:
    """No split may be empty, except train when ``train_size`` is 0 (an evaluation-only task)."""
    for split_name, rows in (("train", splits.train), ("validation", splits.validation), ("test", splits.test)):
        if not rows and not (split_name == "train" and config.train_size == 0):
            raise TaskError(
                f"task '{config.name}': column '{config.text_column}': the {split_name} split is empty "
                f"({splits.dedup.summary()}; validation_size {config.validation_size}, test_size {config.test_size}); "
                "lower them or add data"
            )


def _require_columns(config: TaskConfig, columns: Columns) -> None:
    """Every configured column exists; the error lists the columns that do."""
    wanted = [
        ("text_column", config.text_column),
        ("text_pair_column", config.text_pair_column),
        ("label_column", config.label_column),
    ]
    choices = config.choices_column
    wanted += [("choices_column", c) for c in ([choices] if isinstance(choices, str) else choices or [])]
    for role, column in wanted:
        if column is not None and column not in columns:
            raise TaskError(
                f"task '{config.name}': column '{column}' ({role}) not found in {config.source}; "
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


def _label_ids(
    config: TaskConfig, source_kind: str, columns: Columns, choices: list[tuple[str, ...]] | None
) -> tuple[tuple[str, ...], list[int] | None]:
    """(label names, integer label per row); no per-row labels for lm and label-free unsupervised tasks.

    A label-free unsupervised task still reports its declared ``labels``: they size the head it is scored with.
    """
    if config.label_column is None:
        return tuple(config.labels or ()), None
    raw = [_label_string(v) for v in columns[config.label_column]]
    missing = [i for i, v in enumerate(raw) if v is None]
    if missing:
        raise TaskError(
            f"task '{config.name}': column '{config.label_column}' has {len(missing)} missing labels "
            f"(rows {missing[:_SHOWN]}{', ...' if len(missing) > _SHOWN else ''})"
        )
    labels: list[str] = [v for v in raw if v is not None]
    if choices is not None:
        return (), _choice_ids(config, labels, choices)
    names = _label_names(config, source_kind, labels)
    known = set(names)
    unknown = Counter(v for v in labels if v not in known)
    if unknown:
        shown = ", ".join(f"'{v}' ({n} rows)" for v, n in unknown.most_common(_SHOWN))
        raise TaskError(
            f"task '{config.name}': column '{config.label_column}' holds labels not in the label set "
            f"{list(names)}: {shown}{', ...' if len(unknown) > _SHOWN else ''}"
        )
    index = {name: i for i, name in enumerate(names)}
    return names, [index[v] for v in labels]


def _label_names(config: TaskConfig, source_kind: str, labels: list[str]) -> tuple[str, ...]:
    """Declared labels, else a built-in corpus's label order, else the sorted distinct values."""
    if config.labels is not None:
        return tuple(config.labels)
    if source_kind == "builtin":
        return get_corpus(_builtin_name(config.source)).labels
    found = sorted(set(labels), key=_natural_key)
    if len(found) < 2:
        raise TaskError(
            f"task '{config.name}': column '{config.label_column}' holds a single label {found}; "
            "a classifier needs at least 2 (declare 'labels' to fix the head's label set)"
        )
    return tuple(found)


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


def _check_head_size(task: str, column: str | None, labels: list[str], num_labels: int) -> None:
    if len(labels) != num_labels:
        raise TaskError(
            f"task '{task}': column '{column}': {len(labels)} labels {labels} but the head has "
            f"{num_labels} outputs; declare labels in the head's order"
        )
