"""The validation suite: scores one merge candidate on every task, normalised by the experts' own scores.

A search worker builds one suite ONCE (tokenisation happens then), computes the experts'
reference scores once (:meth:`ValidationSuite.reference_scores`, cached in memory and optionally
on disk), and then calls :meth:`ValidationSuite.score` per candidate with its resident task models.
The result holds, per task, the primary score (higher is better), every other metric, the seconds
scoring took, and the normalised score (the task's rule, see :mod:`mergetune.objectives.normalization`:
merged / expert for accuracies, the share of the expert's gain kept for losses, merged / base for a
guard task without an expert...), plus the mean and the worst normalised score: the two objectives a
search optimises. The base's score on a task is measured (and cached like the experts') only when
the task's rule needs it.

Test split, by design: a suite built with ``ValidationSuite(...)`` holds only the validation (or
train) examples of its tasks and cannot reach their test examples, so a search cannot score the
test split by accident. Scoring the test split is a separate, explicit call,
``ValidationSuite.for_test(tasks, tokenizer, ...)``, made once for the chosen recipe;
``ValidationSuite(..., split="test")`` is refused with a message saying so.

Multi-fidelity (``slices``): a suite built with cumulative fractions scores a candidate stage by
stage (:meth:`ValidationSuite.score_stage`), each task on a growing, stratified, seeded slice of its
examples (:mod:`mergetune.objectives.slices`), with every example's value behind the score
(``TaskScore.per_example``), so that a search can stop a hopeless candidate early. The last stage
gives bit for bit the scores of :meth:`ValidationSuite.score` on the same suite (the batches never
cross a slice, in both). A task whose evaluator has no per-example values (a custom scorer, an
lm-eval task) is scored whole at the first stage.

Reference scores must be computed on the experts themselves: before ``Merger.bind`` points a
task model's weights at the merge buffer, or on separately loaded expert models (pass their folders
and they are loaded only on a cache miss).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mergetune.errors import TaskError
from mergetune.objectives.evaluators import (
    DEFAULT_MAX_TOKENS,
    KINDS,
    ClassificationEvaluator,
    EntropyEvaluator,
    EvalResult,
    Evaluator,
    ExactMatchEvaluator,
    LMLossEvaluator,
    MultipleChoiceEvaluator,
    Shot,
    SlicedEvaluator,
    SliceState,
    build_contexts,
    draw_shots,
    load_scorer,
)
from mergetune.objectives.evaluators.lm_eval import LMEvalEvaluator
from mergetune.objectives.models import load_task_model, overwrite_shared
from mergetune.objectives.normalization import Normalization, normalization_of
from mergetune.objectives.slices import check_fractions, task_slices
from mergetune.objectives.tasks import SplitData, TaskData

#: Splits a search may score; the test split is only reachable through ValidationSuite.for_test.
SEARCH_SPLITS = ("validation", "train")
#: Default batch size per task kind (a causal LM's logits over a large vocabulary are big); from the kind registry.
KIND_BATCH_SIZE = {name: spec.batch_size for name, spec in KINDS.items()}
CACHE_VERSION = 1
_TEST_ACCESS = object()

ModelSource = nn.Module | str | os.PathLike[str]


@dataclass(frozen=True)
class TaskScore:
    """One task's result for one candidate."""

    task: str
    metric: str
    score: float
    metrics: dict[str, float] = field(default_factory=dict)
    n_examples: int = 0
    seconds: float = 0.0
    reference: float | None = None  # the expert's score (None for a task without an expert)
    normalized: float | None = None
    base_reference: float | None = None  # the base's score, when the task's rule needs it
    normalization: str | None = None  # the rule's key in normalization.FORMULAS (None until references are set)
    # each scored example's value behind the score, in row order, and ``score ≈ example_scale × mean`` of them
    # (see EvalResult); only from a suite's staged scoring, never serialised
    per_example: np.ndarray | None = field(default=None, compare=False, repr=False)
    example_scale: float = field(default=1.0, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "metric": self.metric,
            "score": self.score,
            "metrics": dict(self.metrics),
            "n_examples": self.n_examples,
            "seconds": self.seconds,
            "reference": self.reference,
            "normalized": self.normalized,
            "base_reference": self.base_reference,
            "normalization": self.normalization,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TaskScore:
        return cls(**{**data, "metrics": dict(data["metrics"])})


@dataclass(frozen=True)
class SuiteScores:
    """A candidate's scores on every task of a suite, with the normalised mean and worst task."""

    split: str
    tasks: dict[str, TaskScore]

    @property
    def scores(self) -> dict[str, float]:
        """Primary score per task (higher is better)."""
        return {name: t.score for name, t in self.tasks.items()}

    @property
    def normalized(self) -> dict[str, float]:
        """Normalised score per task that has one (not the tasks normalised as ``none``)."""
        return {name: t.normalized for name, t in self.tasks.items() if t.normalized is not None}

    @property
    def mean_normalized(self) -> float | None:
        """Mean normalised score over the normalised tasks; None unless each has its references."""
        values = self._normalized_values()
        return None if values is None else sum(values) / len(values)

    @property
    def worst_normalized(self) -> float | None:
        """The lowest normalised score over the normalised tasks; None unless each has its references."""
        values = self._normalized_values()
        return None if values is None else min(values)

    @property
    def mean_score(self) -> float | None:
        """Mean of the primary scores when every task has the same metric; None otherwise (no mean mixes units)."""
        if len({t.metric for t in self.tasks.values()}) != 1:
            return None
        return sum(self.scores.values()) / len(self.tasks)

    @property
    def seconds(self) -> float:
        return sum(t.seconds for t in self.tasks.values())

    def _normalized_values(self) -> list[float] | None:
        counted = [t for t in self.tasks.values() if t.normalization != "none"]
        values = [t.normalized for t in counted]
        return None if not values or any(v is None for v in values) else [float(v) for v in values]  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        return {"split": self.split, "tasks": {name: t.to_dict() for name, t in self.tasks.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SuiteScores:
        return cls(str(data["split"]), {name: TaskScore.from_dict(t) for name, t in data["tasks"].items()})


# ---- building evaluators ---------------------------------------------------------------------


def examples(task: TaskData, split: str, max_examples: int | None = None) -> SplitData:
    """The first ``max_examples`` of a split (splits are stratified and in seeded random order)."""
    data = task.split(split)  # type: ignore[arg-type]
    if max_examples is None or max_examples >= len(data):
        return data
    return data.take(slice(max_examples))


def build_evaluator(task: TaskData, data: SplitData, tokenizer: Any, **options: Any) -> Evaluator:
    """The evaluator of the task's kind over ``data``; ``options`` go to its constructor.

    ``max_length`` defaults to the task config's, ``name`` to the task's name, ``batch_size``
    to the kind's default and ``metric`` to the config's; ``options`` win. A causal-LM kind also
    gets its option group (delimiter, few-shot, chat template, ...), its ``scorer`` and, when the
    group sets ``dtype``, that autocast (a task's own dtype wins over the suite-wide one).
    """
    config = task.config
    options = {
        "max_length": config.max_length,
        "batch_size": KIND_BATCH_SIZE[config.kind],
        "name": task.name,
        **options,
    }
    return _BUILDERS[config.kind](task, data, tokenizer, options)


def _build_classification(task: TaskData, data: SplitData, tokenizer: Any, options: dict[str, Any]) -> Evaluator:
    sequence = {"text_pairs": data.text_pairs, "num_labels": task.num_labels or None}
    labels = _require_labels(task, data)
    return ClassificationEvaluator(
        data.texts, labels, tokenizer, **{**sequence, "metric": task.config.metric, **options}
    )


def _build_unsupervised(task: TaskData, data: SplitData, tokenizer: Any, options: dict[str, Any]) -> Evaluator:
    sequence = {"text_pairs": data.text_pairs, "num_labels": task.num_labels or None}
    return EntropyEvaluator(data.texts, tokenizer, **{**sequence, **options})


def _causal_options(task: TaskData, options: dict[str, Any]) -> dict[str, Any]:
    """The metric, scorer and dtype a causal-LM task's config asks for, under the caller's ``options``."""
    config = task.config
    group = config.kind_options
    extra: dict[str, Any] = {"metric": config.metric}
    if config.scorer is not None:
        extra["scorer"] = load_scorer(config.scorer, task.name)
    merged = {**extra, **options}
    if group.dtype is not None:
        merged["autocast"] = group.autocast
    return merged


def _shots(task: TaskData, data: SplitData, answers: list[str]) -> list[Shot]:
    """The task's fixed few-shot examples from its train split (never from the split being scored)."""
    group = task.config.kind_options
    shots = draw_shots(task.train.texts, answers, group.fewshot, group.fewshot_seed, task.name)
    scored = set(data.texts)
    if any(s.question in scored for s in shots):
        raise TaskError(
            f"task '{task.name}': few-shot examples come from the train split, which is the split being scored; "
            "score the validation split, or set fewshot: 0"
        )
    return shots


def _contexts(task: TaskData, data: SplitData, tokenizer: Any, train_answers: list[str]) -> tuple[list[str], str]:
    group = task.config.kind_options
    return build_contexts(
        data.texts,
        tokenizer,
        prefix=group.prefix,
        shots=_shots(task, data, train_answers),
        delimiter=group.delimiter,
        fewshot_delimiter=group.fewshot_delimiter,
        chat_template=group.chat_template,
        task=task.name,
    )


def _build_multiple_choice(task: TaskData, data: SplitData, tokenizer: Any, options: dict[str, Any]) -> Evaluator:
    if data.choices is None:
        raise TaskError(f"task '{task.name}': a multiple-choice task's split has no choices")
    train = task.train
    gold = [] if train.choices is None or train.labels is None else list(train.labels)
    train_answers = [train.choices[i][g] for i, g in enumerate(gold)] if train.choices else []
    contexts, delimiter = _contexts(task, data, tokenizer, train_answers)
    group = task.config.kind_options
    return MultipleChoiceEvaluator(
        contexts,
        data.choices,
        _require_labels(task, data),
        tokenizer,
        delimiter=delimiter,
        scoring=group.scoring,
        **_causal_options(task, options),
    )


def _build_exact_match(task: TaskData, data: SplitData, tokenizer: Any, options: dict[str, Any]) -> Evaluator:
    answers = _require_answers(task, data)
    train_answers = [a[0] for a in task.train.answers or ()]
    prompts, _ = _contexts(task, data, tokenizer, train_answers)
    group = task.config.kind_options
    return ExactMatchEvaluator(
        prompts,
        answers,
        tokenizer,
        max_new_tokens=group.max_new_tokens,
        stop=tuple(group.stop),
        first_line=group.first_line,
        answer_regex=group.answer_regex,
        normalize=tuple(group.normalize),
        **_causal_options(task, options),
    )


def _build_lm(task: TaskData, data: SplitData, tokenizer: Any, options: dict[str, Any]) -> Evaluator:
    answers = None if task.config.answer_column is None else [a[0] for a in _require_answers(task, data)]
    group = task.config.kind_options
    return LMLossEvaluator(
        data.texts, tokenizer, answers=answers, delimiter=group.delimiter, **_causal_options(task, options)
    )


def _build_lm_eval(task: TaskData, data: SplitData, tokenizer: Any, options: dict[str, Any]) -> Evaluator:
    """An lm-eval-harness task: the harness's own prompts and context window (no max_length)."""
    assert task.config.lm_eval is not None  # the kind's validation requires it
    harness_options = {k: v for k, v in options.items() if k != "max_length"}
    return LMEvalEvaluator(task.config.lm_eval, data.texts, tokenizer, **harness_options)


def _require_answers(task: TaskData, data: SplitData) -> tuple[tuple[str, ...], ...]:
    if data.answers is None:
        raise TaskError(
            f"task '{task.name}': a {task.config.kind} task needs answers (answer_column); its split has none"
        )
    return data.answers


#: How each registered kind builds its evaluator from a task's split (every kind of the registry has one).
_BUILDERS: dict[str, Callable[[TaskData, SplitData, Any, dict[str, Any]], Evaluator]] = {
    "classification": _build_classification,
    "unsupervised": _build_unsupervised,
    "multiple_choice": _build_multiple_choice,
    "exact_match": _build_exact_match,
    "lm": _build_lm,
    "lm_eval": _build_lm_eval,
}
if set(_BUILDERS) != set(KINDS):  # a kind registered without a builder is a programming error, caught at import
    raise RuntimeError(f"kinds without an evaluator builder: {sorted(set(KINDS) ^ set(_BUILDERS))}")


def _require_labels(task: TaskData, data: SplitData) -> Any:
    if data.labels is None:
        raise TaskError(f"task '{task.name}': a {task.config.kind} task needs labels, and its split has none")
    return data.labels


# ---- the suite -------------------------------------------------------------------------------


class ValidationSuite:
    """Scores one candidate on all its tasks; built once per worker, called once per candidate.

    ``tokenizer`` is one tokeniser for every task or a mapping task -> tokeniser. ``split`` is
    ``"validation"`` (default) or ``"train"``; the test split needs :meth:`for_test`.
    ``max_examples`` caps each task's examples; each task's ``max_length`` is its config's.
    ``batch_size`` (examples) overrides every kind's default and ``max_tokens`` caps the padded tokens
    per batch (None: no cap). ``autocast`` (e.g. ``torch.bfloat16``) runs forwards under
    ``torch.autocast``: about 2x faster on a CPU with AMX (bfloat16 weights: about 3x); references
    and candidates must then be scored the same way (the reference cache key includes it).
    ``task_options[task]`` goes to that task's evaluator (e.g. ``{"label_columns": [...]}`` for a
    shared head, ``logits_fn``, ``batch_size``).
    ``cache_dir`` stores reference scores as JSON, keyed by the expert folders (paths, file sizes
    and mtimes), the task configs, the examples, the tokeniser and the evaluator options.
    """

    def __init__(
        self,
        tasks: Sequence[TaskData],
        tokenizer: Any,
        *,
        split: str = "validation",
        batch_size: int | None = None,
        max_tokens: int | None = DEFAULT_MAX_TOKENS,
        max_examples: int | None = None,
        autocast: torch.dtype | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        task_options: Mapping[str, Mapping[str, Any]] | None = None,
        slices: Sequence[float] | None = None,
        slice_seed: int = 0,
        _access: object = None,
    ) -> None:
        if split == "test" and _access is not _TEST_ACCESS:
            raise TaskError(
                "a ValidationSuite scores validation data; the test split is scored once, for the chosen "
                "recipe, through ValidationSuite.for_test(tasks, tokenizer, ...) so a search cannot use it by accident"
            )
        if split not in (*SEARCH_SPLITS, "test"):
            raise TaskError(f"unknown split '{split}'; a suite scores 'validation' (or 'train')")
        names = [t.name for t in tasks]
        if not names or len(set(names)) != len(names):
            raise TaskError(f"a suite needs at least one task and unique task names; got {names}")
        unknown = sorted(set(task_options or {}) - set(names))
        if unknown:
            raise TaskError(f"task_options name unknown task(s) {unknown}; the tasks are {names}")
        self.split = split
        self.tasks = {t.name: t for t in tasks}
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.max_examples = max_examples
        self.autocast = autocast
        self.fractions = None if slices is None else check_fractions(slices)
        self.slice_seed = slice_seed
        self._task_options = {name: dict((task_options or {}).get(name, {})) for name in names}
        self._tokenizers = {name: _tokenizer_for(tokenizer, name) for name in names}
        self.evaluators: dict[str, Evaluator] = {}
        self._digests: dict[str, str] = {}
        self._chance: dict[str, float | None] = {}
        for task in tasks:
            data = examples(task, split, max_examples)
            options = {
                "max_tokens": max_tokens,
                "autocast": autocast,
                **({"batch_size": batch_size} if batch_size else {}),
            }
            options.update(self._task_options[task.name])
            if self.fractions and _sliceable(task):
                options["parts"] = task_slices(len(data), data.labels, self.fractions, slice_seed, task.name)
            self.evaluators[task.name] = build_evaluator(task, data, self._tokenizers[task.name], **options)
            self._digests[task.name] = _data_digest(data)
            self._chance[task.name] = chance_level(task, data)
        self._reference: dict[str, float] = {}
        self._base: dict[str, float] = {}
        self._norms: dict[str, Normalization] = {}
        self._reference_memory: dict[str, SuiteScores] = {}

    @classmethod
    def for_test(cls, tasks: Sequence[TaskData], tokenizer: Any, **options: Any) -> ValidationSuite:
        """A suite over the held-out TEST split: score it once, for the recipe a search chose."""
        return cls(tasks, tokenizer, split="test", _access=_TEST_ACCESS, **options)

    @property
    def task_names(self) -> list[str]:
        return list(self.tasks)

    # ---- scoring -----------------------------------------------------------------------------
    def score(self, models: Mapping[str, nn.Module] | nn.Module, *, tasks: Sequence[str] | None = None) -> SuiteScores:
        """Score one candidate: ``models[task]`` per task (or one module for every task).

        Normalised scores are filled in for tasks with a reference (see :meth:`reference_scores`).
        """
        results = {}
        for name in self._names(tasks):
            model = models if isinstance(models, nn.Module) else _model_for(models, name)
            start = time.perf_counter()
            result = self.evaluators[name].evaluate(model)
            results[name] = self._task_score(name, result, time.perf_counter() - start)
        return SuiteScores(self.split, results)

    def _names(self, tasks: Sequence[str] | None) -> list[str]:
        if tasks is None:
            return self.task_names
        unknown = [t for t in tasks if t not in self.tasks]
        if unknown:
            raise TaskError(f"unknown task(s) {unknown}; the suite's tasks are {self.task_names}")
        return list(tasks)

    def _task_score(self, name: str, result: EvalResult, seconds: float) -> TaskScore:
        norm = self._norms.get(name)
        expert, base = self._reference.get(name), self._base.get(name)
        normalized = None
        if norm is not None:
            normalized = norm.apply(result.score, expert=expert, base=base, chance=self._chance[name])
        return TaskScore(
            name,
            result.metric,
            result.score,
            dict(result.metrics),
            result.n_examples,
            seconds,
            expert,
            normalized,
            base,
            None if norm is None else norm.rule,
            per_example=result.per_example,
            example_scale=result.example_scale,
        )

    def normalize(self, name: str, score: float) -> float | None:
        """``score`` on task ``name`` normalised by the task's rule (None: normalised as ``none``, or no references)."""
        norm = self._norms.get(name)
        if norm is None:
            return None
        expert, base = self._reference.get(name), self._base.get(name)
        return norm.apply(score, expert=expert, base=base, chance=self._chance[name])

    # ---- multi-fidelity: growing slices ------------------------------------------------------
    @property
    def stages(self) -> int:
        """How many stages a candidate is scored in (1 without slices)."""
        return len(self.fractions) if self.fractions else 1

    def sliced(self, name: str) -> bool:
        """Whether task ``name`` is scored slice by slice (else whole, at the first stage)."""
        evaluator = self.evaluators[name]
        return bool(self.fractions) and isinstance(evaluator, SlicedEvaluator) and evaluator.supports_slices

    def examples_at(self, stage: int) -> dict[str, int]:
        """Examples each task has been scored on after ``stage`` stages (1-based); every example at the last."""
        out = {}
        for name, evaluator in self.evaluators.items():
            sliced = self.sliced(name) and isinstance(evaluator, SlicedEvaluator)
            out[name] = len(evaluator.rows_upto(stage)) if sliced else evaluator.n_examples  # type: ignore[union-attr]
        return out

    def score_stage(
        self, models: Mapping[str, nn.Module] | nn.Module, run: StagedRun | None = None
    ) -> tuple[StagedRun, SuiteScores]:
        """Score one more stage of a candidate: each sliced task on its next slice (on top of ``run``, its
        earlier stages), each other task whole at the first stage. The scores are those on every example
        scored so far, with their per-example values; after the last stage they equal :meth:`score`'s."""
        run = run or StagedRun()
        if run.stage >= self.stages:
            raise TaskError(f"the candidate was scored on all {self.stages} stages already")
        upto = run.stage + 1
        results = {}
        for name in self.task_names:
            model = models if isinstance(models, nn.Module) else _model_for(models, name)
            start = time.perf_counter()
            if self.sliced(name):
                evaluator = self.evaluators[name]
                assert isinstance(evaluator, SlicedEvaluator)
                run.states[name], result = evaluator.evaluate_slices(model, upto, run.states.get(name))
            elif name in run.whole:
                results[name] = run.whole[name]
                continue
            else:
                result = self.evaluators[name].evaluate(model)
            run.seconds[name] = run.seconds.get(name, 0.0) + time.perf_counter() - start
            results[name] = self._task_score(name, result, run.seconds[name])
            if not self.sliced(name):
                run.whole[name] = results[name]
        run.stage = upto
        return run, SuiteScores(self.split, results)

    # ---- reference scores --------------------------------------------------------------------
    @property
    def reference(self) -> dict[str, float]:
        """The experts' primary score per task that has an expert (empty until set or computed)."""
        return dict(self._reference)

    @property
    def base_reference(self) -> dict[str, float]:
        """The base's primary score per task whose normalisation needs it (empty until set or computed)."""
        return dict(self._base)

    @property
    def normalizations(self) -> dict[str, Normalization]:
        """Each task's normalisation (empty until the references are set or computed)."""
        return dict(self._norms)

    def references(self) -> dict[str, dict[str, float]]:
        """Per task, every reference its normalisation uses: ``{"expert": ..., "base": ..., "chance": ...}``."""
        out: dict[str, dict[str, float]] = {}
        for name, norm in self._norms.items():
            values = {"expert": self._reference.get(name), "base": self._base.get(name)}
            values["chance"] = self._chance[name] if norm.needs_chance else None
            out[name] = {k: v for k, v in values.items() if v is not None}
        return out

    def set_reference(
        self,
        scores: SuiteScores | Mapping[str, float | TaskScore | EvalResult],
        *,
        base: SuiteScores | Mapping[str, float | TaskScore | EvalResult] | None = None,
    ) -> None:
        """Use these scores as the experts' (one per task that has an expert) and ``base`` as the base's.

        A task without an expert score is a guard task: its normalisation defaults to the base's
        score. Each task's normalisation is resolved and checked here (errors name the task).
        """
        expert, base_values = _values(scores), _values(base or {})
        unknown = sorted((set(expert) | set(base_values)) - set(self.tasks))
        if unknown:
            raise TaskError(f"reference scores name unknown task(s) {unknown}; the suite's tasks are {self.task_names}")
        norms = {name: self._normalization(name, has_expert=name in expert) for name in self.tasks}
        for name, norm in norms.items():
            norm.check(expert=expert.get(name), base=base_values.get(name), chance=self._chance[name])
        self._norms, self._reference, self._base = norms, expert, base_values

    def _normalization(self, name: str, *, has_expert: bool) -> Normalization:
        config = self.tasks[name].config
        return normalization_of(name, self._metric(name), config.normalize, has_expert=has_expert)

    def _metric(self, name: str) -> str:
        return self.evaluators[name].metric

    def reference_scores(
        self,
        experts: Mapping[str, ModelSource],
        *,
        base: ModelSource | None = None,
        model_dirs: Mapping[str, str | os.PathLike[str]] | None = None,
        refresh: bool = False,
        loader: Callable[[TaskData, str | os.PathLike[str]], nn.Module] | None = None,
    ) -> SuiteScores:
        """The experts' own scores (and the base's where needed), computed once, cached, and set as references.

        ``experts[task]`` is the task's expert model, or its folder (loaded with :func:`load_task_model`,
        or ``loader``, only on a cache miss); a task without an entry is a guard task. ``base`` (a
        folder or module) is scored on each task whose normalisation needs it: a guard task is
        scored with the base model itself, a task with an expert with the base's weights in the
        expert's model (the expert's head on the base encoder). Folders key the on-disk cache; a
        module alone is cached in memory only, under its identity: a module's ``name_or_path`` does
        not prove that its weights are that folder's. Tasks with callable options (``logits_fn``, a
        head) are cached in memory only, too. Returns the experts' scores.
        """
        unknown = sorted(set(experts) - set(self.tasks))
        if unknown:
            raise TaskError(f"experts given for unknown task(s) {unknown}; the suite's tasks are {self.task_names}")
        norms = {name: self._normalization(name, has_expert=name in experts) for name in self.tasks}
        with_expert = [name for name in self.tasks if name in experts]
        sources = {name: [(model_dirs or {}).get(name, experts[name])] for name in with_expert}
        expert_scores = self._measure(
            "expert", sources, lambda name: self._expert_model(name, experts, loader), loader, refresh
        )
        needs_base = [name for name, norm in norms.items() if norm.needs_base]
        base_scores = None
        if needs_base:
            if base is None:
                raise TaskError(f"task(s) {needs_base} are normalised against the base: give the base model")
            base_sources = {name: [base, *sources.get(name, [])] for name in needs_base}
            build = functools.partial(self._base_model, base=base, experts=experts, loader=loader)
            base_scores = self._measure("base", base_sources, build, loader, refresh)
        self.set_reference(expert_scores, base=base_scores)
        return SuiteScores(
            expert_scores.split,
            {n: self._task_score(n, self._as_result(t), t.seconds) for n, t in expert_scores.tasks.items()},
        )

    def _measure(
        self,
        role: str,
        sources: Mapping[str, list[ModelSource]],
        build: Callable[[str], nn.Module],
        loader: Callable[..., Any] | None,
        refresh: bool,
    ) -> SuiteScores:
        """Scores of the models ``build(task)`` on ``sources``' tasks, from the cache when it holds them."""
        names = list(sources)
        if not names:
            return SuiteScores(self.split, {})
        disk = self._cacheable(sources)
        key = self._reference_key(role, sources, disk, loader)
        cached = None if refresh else self._cached_reference(key, names, disk=disk)
        if cached is None:
            saved = self._reference, self._base, self._norms
            self._reference, self._base, self._norms = {}, {}, {}  # raw scores: nothing normalised while measuring
            try:
                # one model at a time (built, scored, freed): several experts at once would multiply the peak memory
                scored = {name: self.score({name: build(name)}, tasks=[name]).tasks[name] for name in names}
                cached = SuiteScores(self.split, scored)
            finally:
                self._reference, self._base, self._norms = saved
            self._store_reference(key, cached, disk=disk)
        return cached

    @staticmethod
    def _as_result(t: TaskScore) -> EvalResult:
        return EvalResult(t.metric, t.score, dict(t.metrics), t.n_examples)

    def _cacheable(self, sources: Mapping[str, list[ModelSource]]) -> bool:
        """Folders only (a module's weights cannot be fingerprinted), and no callable task options."""
        modules = any(isinstance(s, nn.Module) for models in sources.values() for s in models)
        return not modules and not self._has_callable_options()

    def _has_callable_options(self) -> bool:
        """A head or logits function passed as an option cannot be fingerprinted: no disk cache then."""
        return any(callable(v) for options in self._task_options.values() for v in options.values())

    def _expert_model(
        self,
        name: str,
        experts: Mapping[str, ModelSource],
        loader: Callable[[TaskData, str | os.PathLike[str]], nn.Module] | None,
    ) -> nn.Module:
        source = experts[name]
        if isinstance(source, nn.Module):
            return source
        return (loader or load_task_model)(self.tasks[name], source)

    def _base_model(
        self,
        name: str,
        *,
        base: ModelSource,
        experts: Mapping[str, ModelSource],
        loader: Callable[[TaskData, str | os.PathLike[str]], nn.Module] | None,
    ) -> nn.Module:
        """The base on a task: the base model itself for a guard task, else the expert's model with the base's
        weights (its head on the base encoder)."""
        if name not in experts:
            return base if isinstance(base, nn.Module) else (loader or load_task_model)(self.tasks[name], base)
        model = self._expert_model(name, experts, loader)
        if isinstance(experts[name], nn.Module):
            model = copy.deepcopy(model)  # the caller's expert module must keep its own weights
        overwrite_shared(model, base, task_name=name)
        return model

    def _reference_key(
        self, role: str, sources: Mapping[str, list[ModelSource]], disk: bool, loader: Callable[..., Any] | None
    ) -> str:
        models: dict[str, Any] = {
            name: [_folder_fingerprint(Path(s).expanduser().resolve()) if disk else f"object:{id(s)}" for s in models]  # type: ignore[arg-type]
            for name, models in sources.items()
        }
        if role == "expert":  # one model per task, keyed as before this rule existed: existing caches stay valid
            models = {name: fingerprints[0] for name, fingerprints in models.items()}
        key = {
            "version": CACHE_VERSION,
            "split": self.split,
            "max_examples": self.max_examples,
            "autocast": str(self.autocast),
            "loader": _describe(loader),
            "models": models,
            "tasks": {name: self._task_fingerprint(name) for name in sources},
        }
        if role != "expert":  # expert keys stay as they were: existing caches remain valid
            key["role"] = role
        if self.fractions:  # sliced batches round differently: their references are their own (unsliced keys unchanged)
            key["slices"] = [list(self.fractions), self.slice_seed]
        return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()

    def _task_fingerprint(self, name: str) -> dict[str, Any]:
        tokenizer = self._tokenizers[name]
        config = self.tasks[name].config.model_dump(mode="json")
        for field_name in ("expert", "normalize"):  # which reference a score serves does not change the score
            config.pop(field_name, None)
        return {
            "config": config,
            "data": self._digests[name],
            "evaluator": type(self.evaluators[name]).__name__,
            "options": {
                k: _describe(v)
                for k, v in sorted(self._task_options[name].items())
                if k not in ("batch_size", "max_tokens")
            },
            "tokenizer": [type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""), _vocab_size(tokenizer)],
        }

    def _cache_file(self, key: str) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir / f"reference-{key[:24]}.json"

    def _cached_reference(self, key: str, names: Sequence[str], *, disk: bool) -> SuiteScores | None:
        if key in self._reference_memory:
            return self._reference_memory[key]
        path = self._cache_file(key) if disk else None
        if path is None or not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            scores = SuiteScores.from_dict(data["scores"]) if data.get("key") == key else None
        except (OSError, ValueError, KeyError, TypeError):
            return None  # an unreadable cache entry is recomputed and rewritten
        if scores is not None and set(scores.tasks) == set(names):
            self._reference_memory[key] = scores
            return scores
        return None

    def _store_reference(self, key: str, scores: SuiteScores, *, disk: bool) -> None:
        self._reference_memory[key] = scores
        path = self._cache_file(key) if disk else None
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, "scores": scores.to_dict()}, indent=1))
        tmp.replace(path)  # atomic: concurrent workers never read half a file


@dataclass
class StagedRun:
    """One candidate's scoring in progress across stages (see :meth:`ValidationSuite.score_stage`)."""

    stage: int = 0  # stages done
    states: dict[str, SliceState] = field(default_factory=dict)  # per sliced task: its outputs so far
    whole: dict[str, TaskScore] = field(default_factory=dict)  # tasks scored whole, at the first stage
    seconds: dict[str, float] = field(default_factory=dict)  # scoring time per task, all stages


def _sliceable(task: TaskData) -> bool:
    """Whether a task's evaluator has per-example values: not with a custom scorer, nor for lm-eval tasks."""
    return task.config.kind != "lm_eval" and task.config.scorer is None


def chance_level(task: TaskData, data: SplitData) -> float | None:
    """The uniform-guess accuracy: 1 / labels (classification), mean 1 / choices (multiple choice); else None."""
    if task.config.kind == "multiple_choice" and data.choices:
        return sum(1.0 / len(c) for c in data.choices) / len(data.choices)
    if task.config.kind == "classification" and task.num_labels:
        return 1.0 / task.num_labels
    return None


def _values(scores: SuiteScores | Mapping[str, float | TaskScore | EvalResult]) -> dict[str, float]:
    items = scores.tasks if isinstance(scores, SuiteScores) else scores
    return {name: float(getattr(value, "score", value)) for name, value in items.items()}


def _model_for(models: Mapping[str, nn.Module], name: str) -> nn.Module:
    if name not in models:
        raise TaskError(f"no model given for task '{name}'; got models for {sorted(models)}")
    return models[name]


def _tokenizer_for(tokenizer: Any, name: str) -> Any:
    if isinstance(tokenizer, Mapping):
        if name not in tokenizer:
            raise TaskError(f"no tokenizer for task '{name}'")
        return tokenizer[name]
    return tokenizer


def _data_digest(data: SplitData) -> str:
    """SHA-256 of the examples a task is scored on (texts, pairs, choices, labels)."""
    labels = None if data.labels is None else data.labels.tolist()
    payload = [data.texts, data.text_pairs, data.choices, labels, data.answers]
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()


def _folder_fingerprint(path: Path) -> list[Any]:
    """Path, and each top-level file's name, size and mtime (a rewritten expert gets a new key)."""
    if path.is_file():
        st = path.stat()
        return [str(path), [[path.name, st.st_size, st.st_mtime_ns]]]
    if not path.is_dir():
        raise TaskError(f"expert folder not found: {path}")
    files = sorted(p for p in path.iterdir() if p.is_file())
    return [str(path), [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]]


def _describe(value: Any) -> Any:
    """A JSON-able description of an evaluator option or loader (callables by qualified name)."""
    if isinstance(value, functools.partial):
        return [
            _describe(value.func),
            [_describe(a) for a in value.args],
            {k: _describe(v) for k, v in value.keywords.items()},
        ]
    if callable(value):
        return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', type(value).__name__)}"
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if isinstance(value, Sequence):
        return [_describe(v) for v in value]
    return repr(value)


def _vocab_size(tokenizer: Any) -> int | None:
    try:
        return len(tokenizer)
    except TypeError:
        return None
