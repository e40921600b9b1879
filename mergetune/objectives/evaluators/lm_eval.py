"""lm-evaluation-harness tasks, scored in process on the model a search hands over.

A task config names an lm-eval task: a registered name (``arc_easy``) or a task YAML in lm-eval's
own format (``dataset_path: json`` with local ``data_files`` runs offline). The harness does what
it does best, prompts, few-shot contexts, filters, per-document metrics and their aggregation;
mergetune only replaces its model backend by :class:`InProcessLM`, which scores the requests on
whatever module it is given: the merged model in memory, never written to disk or reloaded.

Splits are explicit. The search scores the task's ``validation_split`` (or ``search_split``) and
the held-out test split is the task's ``test_split``; a task without both, or with the same split
twice, is refused with a message saying what to set. The documents of each split are read once
when the task is loaded (:func:`read_lm_eval_splits`) and travel as JSON in the task's splits, so
the suite's ``max_examples`` and the test-split guard apply as for every other kind; the evaluator
puts exactly those documents back into the harness task as its evaluation split.

The harness builds its requests (prompts, few-shot contexts, seeded) once per evaluator, and
:class:`InProcessLM` tokenises them once, exactly as lm-eval's ``TemplateLM``/``HFLM`` do (BOS
handling, trailing spaces moved to the continuation, an empty context conditioned on the prefix
token, left truncation to the context window, rolling windows for perplexities, greedy generation
cut at the stop sequences). Per candidate only the forwards (and greedy generation) run, then the
harness's filters, ``process_results`` and aggregation. Scores, per-request log-likelihoods and
generated answers equal ``lm_eval.simple_evaluate`` with its HF backend on the same model (tests).
Requests whose options share their input (one-token options of one question) share one forward,
as HFLM's logits cache does. Sampled generation and repeats are refused (candidates must be
scored alike).

The metric is chosen by name (``acc``, ``acc_norm``, ``exact_match``, ``word_perplexity``, ...;
default: the task's first). A metric the harness marks lower-is-better is reported negated, as
``neg_<name>``, so that every :class:`EvalResult` score is higher-is-better.

lm-eval is an optional dependency (the ``llm`` extra): it is imported inside the functions that
need it, so mergetune imports without it.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import nn

from mergetune.errors import TaskError
from mergetune.forward import model_device, scoring
from mergetune.objectives.evaluators.base import (
    DEFAULT_MAX_TOKENS,
    Batch,
    BatchCache,
    EvalResult,
    Evaluator,
    length_batches,
    pad,
    pad_id,
)
from mergetune.objectives.evaluators.causal import causal_forward, left_padded
from mergetune.strict import StrictModel

#: The name under which the evaluator's documents replace the harness task's evaluation split.
EVAL_SPLIT = "__mergetune_eval__"
#: lm-eval's default few-shot seed (simple_evaluate's ``fewshot_random_seed``).
DEFAULT_FEWSHOT_SEED = 1234
#: Context window when neither the options nor the model's config give one (lm-eval's default).
DEFAULT_CONTEXT = 2048
#: Request types the in-process backend answers.
SUPPORTED_REQUESTS = ("loglikelihood", "loglikelihood_rolling", "generate_until")
#: Tokens generated when a generate_until task does not say (lm-eval's HFLM default).
DEFAULT_MAX_GEN_TOKS = 256
YAML_SUFFIXES = (".yaml", ".yml")


class LMEvalOptions(StrictModel):
    """``lm_eval:`` in a task config: which harness task, which metric, which splits, how many shots."""

    task: str = Field(min_length=1, description="Registered lm-eval task name, or a path to a task YAML.")
    metric: str | None = Field(None, description="Metric of the task (acc, acc_norm, ...); default: its first.")
    filter: str | None = Field(None, description="Filter pipeline whose output is scored; default: the first.")
    search_split: str | None = Field(None, description="Split the search scores; default: the task's validation_split.")
    test_split: str | None = Field(None, description="Held-out split; default: the task's test_split.")
    num_fewshot: int | None = Field(None, ge=0, description="Few-shot examples; default: the task's, else 0.")
    fewshot_seed: int = Field(DEFAULT_FEWSHOT_SEED, description="Seed of the few-shot sampler (lm-eval's default).")
    include: str | None = Field(None, description="Extra folder of task YAMLs (e.g. for a group's members).")
    context_length: int | None = Field(None, ge=8, description="Context window; default: the model config's.")
    limit: int | None = Field(
        None, ge=1, description="Documents per split: the first ones, before the task's process_docs; default: all."
    )

    @model_validator(mode="before")
    @classmethod
    def _short_form(cls, data: Any) -> Any:
        """``lm_eval: arc_easy`` is ``lm_eval: {task: arc_easy}``."""
        return {"task": data} if isinstance(data, str) else data

    @property
    def is_path(self) -> bool:
        """Whether ``task`` names a YAML file rather than a registered task."""
        return Path(self.task).suffix.lower() in YAML_SUFFIXES

    def resolved(self, base_dir: str | Path | None) -> LMEvalOptions:
        """A copy whose YAML and include paths are absolute, relative ones taken from ``base_dir``."""

        def absolute(path: str | None) -> str | None:
            if path is None:
                return None
            p = Path(path).expanduser()
            return str((Path(base_dir or ".") / p).resolve() if not p.is_absolute() else p)

        return self.model_copy(
            update={"task": absolute(self.task) if self.is_path else self.task, "include": absolute(self.include)}
        )


#: TaskConfig fields that have no meaning for an lm-eval task (its data and prompts come from the harness).
FOREIGN_FIELDS = (
    "source",
    "subset",
    "split",
    "text_column",
    "text_pair_column",
    "label_column",
    "choices_column",
    "labels",
    "metric",
    "max_length",
    "validation_size",
    "test_size",
    "train_size",
)


def lm_eval_task_defaults(data: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """A task mapping with ``lm_eval:`` completed for validation: kind ``lm_eval`` and a descriptive source.

    Fields that belong to file-based tasks are refused by name when set to anything but their
    default (``defaults``: TaskConfig's), as they would be silently ignored; a dumped config
    (every field at its default, the source as filled in here) validates again unchanged.
    """
    data = dict(data)
    spec = data["lm_eval"]
    source = f"lm_eval:{spec.get('task') if isinstance(spec, Mapping) else spec}"
    foreign = [
        key
        for key in FOREIGN_FIELDS
        if key in data and data[key] != defaults.get(key) and not (key == "source" and data[key] == source)
    ]
    if foreign:
        raise ValueError(
            f"an lm_eval task takes its data, prompts and splits from the harness task; remove {foreign} "
            "(use lm_eval.metric, lm_eval.search_split/test_split, lm_eval.limit, lm_eval.context_length)"
        )
    if data.setdefault("kind", "lm_eval") != "lm_eval":
        raise ValueError(f"a task with lm_eval: is of kind 'lm_eval', not '{data['kind']}'")
    data["source"] = source
    return data


# ---- reading the harness task --------------------------------------------------------------------


@dataclass(frozen=True)
class LMEvalSplits:
    """The documents of a harness task's splits, each as a JSON string, and the split names used."""

    options: LMEvalOptions
    search_split: str
    test_split: str
    train_split: str | None
    search: tuple[str, ...]
    test: tuple[str, ...]
    train: tuple[str, ...]


def read_lm_eval_splits(name: str, options: LMEvalOptions, base_dir: str | Path | None = None) -> LMEvalSplits:
    """Load the harness task once and return its search, test and training documents as JSON strings.

    ``name`` is mergetune's task name (for messages). Relative paths resolve from ``base_dir``.
    """
    options = options.resolved(base_dir)
    harness_task = load_harness_task(name, options)
    config = harness_task.config
    search = options.search_split or config.validation_split
    test = options.test_split or config.test_split
    available = sorted(harness_task.dataset)
    if not search or not test or search == test:
        raise TaskError(
            f"task '{name}': lm-eval task '{options.task}' needs a search split and a different test split "
            f"(it has validation_split {config.validation_split!r}, test_split {config.test_split!r}; data splits "
            f"{available}); set lm_eval.search_split and lm_eval.test_split, or give the task YAML both"
        )
    for role, split in (("search_split", search), ("test_split", test)):
        if split not in harness_task.dataset:
            raise TaskError(f"task '{name}': lm_eval.{role} '{split}' is not a split of the task's data {available}")
    _refuse_test_fewshot(name, harness_task, test, options.num_fewshot)
    train = config.training_split if config.training_split in harness_task.dataset else None

    def docs(split: str | None) -> tuple[str, ...]:
        if split is None:
            return ()
        rows = harness_task.dataset[split]
        n = len(rows) if options.limit is None else min(options.limit, len(rows))
        return tuple(_doc_json(name, split, rows[i]) for i in range(n))

    return LMEvalSplits(options, search, test, train, docs(search), docs(test), docs(train))


def _refuse_test_fewshot(name: str, harness_task: Any, test: str, num_fewshot: int | None) -> None:
    """Few-shot examples drawn from the test split would show test documents to the search.

    The split is lm-eval's choice: ``fewshot_split``, else the training split, else the validation
    split, else the test split.
    """
    config = harness_task.config
    shots = num_fewshot if num_fewshot is not None else config.num_fewshot or 0
    source = config.fewshot_split or config.training_split or config.validation_split or config.test_split
    fixed_samples = getattr(config.fewshot_config, "samples", None)  # literal examples in the YAML: no split
    if shots > 0 and source == test and not fixed_samples:
        raise TaskError(
            f"task '{name}': the few-shot examples would come from the test split '{test}', so the search's "
            "prompts would hold test documents; set fewshot_split (or training_split) to another split in the task "
            "YAML, or num_fewshot: 0"
        )


def _doc_json(name: str, split: str, doc: Mapping[str, Any]) -> str:
    try:
        return json.dumps(dict(doc), ensure_ascii=False, sort_keys=True)
    except TypeError as exc:
        raise TaskError(
            f"task '{name}': a document of split '{split}' holds a value that is not plain JSON ({exc}); "
            "mergetune scores text tasks"
        ) from exc


def load_harness_task(name: str, options: LMEvalOptions) -> Any:
    """The one lm-eval Task that ``options.task`` names (a group or tag of several tasks is refused).

    A YAML path is loaded with its own folder (and ``include``) as the only task folders, which is
    fast; a registered name also scans lm-eval's built-in tasks (tens of seconds).
    """
    # lm_eval: optional heavy dependency (the `llm` extra), imported only when an lm-eval task is used
    from lm_eval.tasks import TaskManager

    folders = [p for p in (options.include, str(Path(options.task).parent) if options.is_path else None) if p]
    if options.is_path and not Path(options.task).is_file():
        raise TaskError(f"task '{name}': lm-eval task file not found: {options.task}")
    manager = TaskManager(include_path=folders or None, include_defaults=not options.is_path)
    try:
        loaded = manager.load([options.task])
    except (KeyError, ValueError, TypeError, FileNotFoundError) as exc:
        raise TaskError(f"task '{name}': lm-eval cannot load task '{options.task}': {exc}") from exc
    tasks = loaded["tasks"]
    if len(tasks) != 1 or loaded["groups"]:
        raise TaskError(
            f"task '{name}': '{options.task}' is a group or tag of {len(tasks)} lm-eval tasks {sorted(tasks)[:5]}; "
            "list each as its own mergetune task"
        )
    return next(iter(tasks.values()))


# ---- the in-process backend ------------------------------------------------------------------


class InProcessLM:
    """lm-eval's model interface over an in-memory causal LM: tokenises once, then only runs forwards.

    Tokenisation follows lm-eval's ``TemplateLM`` and ``HFLM`` (default options): the tokeniser's
    own special tokens (no BOS is added twice to a string that starts with it), trailing spaces of
    a context moved to its continuation, an empty context conditioned on the prefix token (BOS,
    else EOS), inputs cut from the left to ``context_length + 1`` tokens, rolling windows of
    ``context_length`` tokens for ``loglikelihood_rolling``. Forwards are batched by length,
    left-padded, with only the continuation's logits computed; log-softmax in float32.
    ``generate_until`` is greedy ``model.generate`` on left-padded batches with lm-eval's stop
    criteria, the text cut at the first stop sequence, as HFLM; sampling is refused.
    """

    def __init__(self, tokenizer: Any, context_length: int, batch_size: int, max_tokens: int | None, name: str) -> None:
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.sizes = (batch_size, max_tokens)
        self.name = name
        self.prefix_token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        self._pad = pad_id(tokenizer)

    # -- tokenisation, as lm-eval's TemplateLM / HFLM --
    def tok_encode(self, string: str, add_special_tokens: bool | None = None) -> list[int]:
        kwargs = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        if add_special_tokens is None and string.startswith(self.tokenizer.decode(self.prefix_token_id)):
            kwargs["add_special_tokens"] = False
        return list(self.tokenizer.encode(string, **kwargs))

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) of one loglikelihood request, as ``TemplateLM.loglikelihood``."""
        if context == "":
            cont = self.tok_encode(continuation, add_special_tokens=False)
            return ([self.prefix_token_id], cont) if self.prefix_token_id != cont[0] else (cont[:1], cont[1:])
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces > 0:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.tok_encode(context + continuation)
        ctx = self.tok_encode(context)
        return ctx, whole[len(ctx) :]

    def rolling_windows(self, text: str) -> list[tuple[list[int], list[int]]]:
        """Disjoint (context, continuation) windows covering every token of ``text`` (lm-eval's rolling)."""
        # lm_eval: optional heavy dependency (the `llm` extra)
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows = get_rolling_token_windows(
            token_list=self.tok_encode(text),
            prefix_token=self.prefix_token_id,
            max_seq_len=self.context_length,
            context_len=1,
        )
        return [make_disjoint_window(w) for w in windows]

    # -- batches --
    def batches(self, pairs: Sequence[tuple[list[int], list[int]]]) -> BatchCache:
        """Length-sorted, left-padded batches of the distinct inputs ``(context + continuation)[:-1]``.

        Pairs whose inputs are identical share one row (each option of a question whose options are
        one token long, as lm-eval's logits cache does): ``extra["row"]`` maps each pair of the
        batch (``Batch.rows``: pair indices) to its row, ``targets``/``mask`` its continuation.
        """
        row_of: dict[tuple[int, ...], int] = {}
        pair_row, targets = [], []
        for ctx, cont in pairs:
            if not 0 < len(cont) <= self.context_length:
                raise TaskError(
                    f"task '{self.name}': a continuation of {len(cont)} tokens does not fit the context window of "
                    f"{self.context_length} tokens"
                )
            pair_row.append(row_of.setdefault(tuple((ctx + cont)[-(self.context_length + 1) : -1]), len(row_of)))
            targets.append(cont)
        inputs = list(row_of)
        pairs_of_row: list[list[int]] = [[] for _ in inputs]
        for k, row in enumerate(pair_row):
            pairs_of_row[row].append(k)
        batches = []
        for rows in length_batches([len(x) for x in inputs], *self.sizes):
            members = [(i, k) for i, row in enumerate(rows) for k in pairs_of_row[row]]
            batch_targets = [targets[k] for _, k in members]
            extra = {
                "row": torch.as_tensor([i for i, _ in members]),
                "targets": pad(batch_targets, 0, "left"),
                "mask": pad([[1] * len(t) for t in batch_targets], 0, "left"),
            }
            pair_ids = torch.as_tensor([k for _, k in members])
            batches.append(Batch(pair_ids, left_padded([list(inputs[r]) for r in rows], self._pad), extra))
        return BatchCache(batches)

    def generation_batches(self, requests: Sequence[tuple[str, Mapping[str, Any]]]) -> list[_Generation]:
        """Contexts tokenised (left-truncated to leave room for the answer) and batched per generation setting."""
        # lm_eval: optional heavy dependency (the `llm` extra)
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

        eos = self.tokenizer.decode(self.tokenizer.eos_token_id, skip_special_tokens=False)
        groups: dict[str, list[int]] = defaultdict(list)
        for k, (_, gen_kwargs) in enumerate(requests):
            groups[json.dumps(gen_kwargs, sort_keys=True, default=str)].append(k)
        out = []
        for members in groups.values():
            kwargs = normalize_gen_kwargs(dict(requests[members[0]][1]), DEFAULT_MAX_GEN_TOKS)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_new = int(kwargs.pop("max_gen_toks"))
            if max_new >= self.context_length:
                raise TaskError(f"task '{self.name}': max_gen_toks {max_new} leaves no room for the context")
            contexts = [self._context_ids(requests[k][0])[-(self.context_length - max_new) :] for k in members]
            for rows in length_batches([len(c) for c in contexts], *self.sizes):
                ids = [members[i] for i in rows]
                batch = Batch(torch.as_tensor(ids), left_padded([contexts[i] for i in rows], self._pad))
                out.append(_Generation(batch, tuple(until), max_new))
        return out

    def _context_ids(self, context: str) -> list[int]:
        """A generation context's ids as HFLM's batch encoding gives them (no second BOS)."""
        bos = getattr(self.tokenizer, "bos_token", None)
        starts_with_bos = bool(bos) and context.startswith(bos)
        return self.tok_encode(context, add_special_tokens=False if starts_with_bos else None)

    def generate(self, model: nn.Module, generations: list[_Generation], n: int, device: torch.device) -> list[str]:
        """Greedy continuations, each cut at its first stop sequence, in request order."""
        # lm_eval: optional heavy dependency (the `llm` extra)
        from lm_eval.models.utils import postprocess_generated_text
        from lm_eval.models.utils_hf import stop_sequences_criteria

        texts = [""] * n
        for gen in generations:
            ids = gen.batch.inputs["input_ids"].to(device)
            width = ids.shape[1]
            out = model.generate(
                input_ids=ids,
                attention_mask=gen.batch.inputs["attention_mask"].to(device),
                max_length=width + gen.max_new_tokens,
                stopping_criteria=stop_sequences_criteria(self.tokenizer, list(gen.until), width, ids.shape[0]),
                pad_token_id=self._pad,
                do_sample=False,
                use_cache=True,
            )
            for k, row in zip(gen.batch.rows.tolist(), out[:, width:].tolist(), strict=True):
                text = self.tokenizer.decode(row, skip_special_tokens=True)
                texts[k] = postprocess_generated_text(text, list(gen.until), None)
        return texts

    @staticmethod
    def loglikelihoods(model: nn.Module, batches: list[Batch], n: int) -> tuple[np.ndarray, np.ndarray]:
        """(sum of the continuation's log-probabilities, whether greedy decoding gives it) per pair."""
        logliks = torch.empty(n, dtype=torch.float64)
        greedy = torch.empty(n, dtype=torch.bool)
        for batch in batches:
            targets, mask = batch.extra["targets"], batch.extra["mask"].bool()
            logits = causal_forward(model, batch.inputs, logits_to_keep=targets.shape[1])
            logp = torch.log_softmax(logits.float(), dim=-1)[batch.extra["row"]]
            picked = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            logliks[batch.rows] = picked.masked_fill(~mask, 0.0).sum(-1).double().cpu()
            greedy[batch.rows] = ((logp.argmax(-1) == targets) | ~mask).all(-1).cpu()
        return logliks.numpy(), greedy.numpy()


# ---- the evaluator ---------------------------------------------------------------------------


class LMEvalEvaluator(Evaluator):
    """Scores an lm-eval task's documents with the harness's pipeline and :class:`InProcessLM`.

    ``docs`` are the documents to score (JSON strings from :func:`read_lm_eval_splits`, in order);
    they become the harness task's evaluation split, so the score is the harness's on exactly these.
    """

    def __init__(
        self,
        options: LMEvalOptions,
        docs: Sequence[str],
        tokenizer: Any,
        *,
        context_length: int | None = None,
        batch_size: int = 16,
        max_tokens: int | None = DEFAULT_MAX_TOKENS,
        autocast: torch.dtype | None = None,
        name: str = "task",
    ) -> None:
        if not docs:
            raise TaskError(f"task '{name}': no documents to score")
        self.name = name
        self.autocast = autocast
        self.options = options
        self.task = _harness_task_on(name, options, docs)
        self.metric_name, self.filter_key, self.higher_is_better = _pick_metric(name, options, self.task)
        self.metric = self.metric_name if self.higher_is_better else f"neg_{self.metric_name}"
        self.instances = list(self.task.instances)
        _check_requests(name, self.instances)
        self._lm_args = (tokenizer, context_length or options.context_length, batch_size, max_tokens)
        self._prepared: dict[int, _Prepared] = {}
        self._generated = [k for k, inst in enumerate(self.instances) if inst.request_type == "generate_until"]
        self._n_docs = len(docs)

    @property
    def n_examples(self) -> int:
        return self._n_docs

    def _prepare(self, model: nn.Module) -> _Prepared:
        """Every request tokenised once per context window (the options', else the model config's, as HFLM)."""
        tokenizer, window, batch_size, max_tokens = self._lm_args
        window = window or context_window(model)
        if window not in self._prepared:
            lm = InProcessLM(tokenizer, window, batch_size, max_tokens, self.name)
            pairs: list[tuple[list[int], list[int]]] = []
            owner: list[int] = []  # the request (instance index) each pair belongs to
            for k, inst in enumerate(self.instances):
                if inst.request_type == "generate_until":
                    continue
                new = (
                    [lm.encode_pair(*inst.args)]
                    if inst.request_type == "loglikelihood"
                    else lm.rolling_windows(inst.args[0])
                )
                pairs += new
                owner += [k] * len(new)
            generations = lm.generation_batches([self.instances[k].args for k in self._generated])
            self._prepared[window] = _Prepared(lm, lm.batches(pairs), np.asarray(owner, dtype=np.int64), generations)
        return self._prepared[window]

    def loglikelihoods(self, model: nn.Module) -> list[tuple[float, bool]]:
        """Per request, in the harness's order: (log-likelihood, greedy) as lm-eval's backends return it."""
        prepared = self._prepare(model)
        with scoring(model, self.autocast):
            batches = prepared.batches.on(model_device(model))
            logliks, greedy = InProcessLM.loglikelihoods(model, batches, len(prepared.owner))
        total = np.zeros(len(self.instances))
        all_greedy = np.ones(len(self.instances), dtype=bool)
        np.add.at(total, prepared.owner, logliks)
        np.logical_and.at(all_greedy, prepared.owner, greedy)
        return [(float(t), bool(g)) for t, g in zip(total, all_greedy, strict=True)]

    def generations(self, model: nn.Module) -> list[str]:
        """The greedy answer of each generate_until request, in the harness's order (empty list if none)."""
        prepared = self._prepare(model)
        with scoring(model, self.autocast):
            return prepared.lm.generate(model, prepared.generations, len(self._generated), model_device(model))

    def _evaluate(self, model: nn.Module) -> EvalResult:
        answers: list[Any] = self.loglikelihoods(model)
        for k, text in zip(self._generated, self.generations(model) if self._generated else [], strict=True):
            answers[k] = text
        for inst, answer in zip(self.instances, answers, strict=True):
            inst.resps = [answer[0] if inst.request_type == "loglikelihood_rolling" else answer]
            inst.filtered_resps = {}
        metrics = _harness_metrics(self.task, self.instances, self.filter_key)
        value = metrics[self.metric_name]
        if not math.isfinite(value):
            raise TaskError(f"task '{self.name}': lm-eval metric {self.metric_name} is {value}")
        return EvalResult(self.metric, value if self.higher_is_better else -value, metrics, self.n_examples)


@dataclass(frozen=True)
class _Generation:
    """A batch of generation contexts sharing one setting: stop sequences and the most tokens to add."""

    batch: Batch  # rows: request indices among the generation requests
    until: tuple[str, ...]
    max_new_tokens: int


@dataclass(frozen=True)
class _Prepared:
    """Tokenised requests for one context window: loglikelihood pairs and the request each belongs to; generations."""

    lm: InProcessLM
    batches: BatchCache
    owner: np.ndarray
    generations: list[_Generation]


def context_window(model: nn.Module) -> int:
    """The model's context length from its config, as lm-eval's HFLM resolves it, else 2048."""
    config = getattr(model, "config", None)
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return DEFAULT_CONTEXT


def _check_requests(name: str, instances: Sequence[Any]) -> None:
    """Refuse request types the in-process backend does not answer, and sampled repeats."""
    for inst in instances:
        if inst.request_type not in SUPPORTED_REQUESTS:
            raise TaskError(
                f"task '{name}': lm-eval request type '{inst.request_type}' is not supported in process "
                f"(supported: {', '.join(SUPPORTED_REQUESTS)})"
            )
        if inst.request_type == "generate_until" and _samples(inst.args[1]):
            raise TaskError(
                f"task '{name}': sampled generation is not deterministic, so candidates would not be comparable; "
                "set do_sample: false in the task's generation_kwargs"
            )
        if inst.repeats not in (None, 1):
            raise TaskError(f"task '{name}': repeats {inst.repeats} need sampling; set repeats: 1 in the task YAML")


def _samples(gen_kwargs: Mapping[str, Any]) -> bool:
    """Whether lm-eval would sample for these generation settings (do_sample, or a temperature above 0)."""
    # lm_eval: optional heavy dependency (the `llm` extra)
    from lm_eval.models.utils import normalize_gen_kwargs

    return bool(normalize_gen_kwargs(dict(gen_kwargs), DEFAULT_MAX_GEN_TOKS).get("do_sample"))


def _harness_task_on(name: str, options: LMEvalOptions, docs: Sequence[str]) -> Any:
    """The harness task with ``docs`` as its evaluation split, its few-shot setting applied, requests built."""
    # datasets: imported with lm-eval (an optional heavy dependency)
    import datasets

    task = load_harness_task(name, options)
    task.dataset[EVAL_SPLIT] = datasets.Dataset.from_list([json.loads(d) for d in docs])
    task.set_config(key="test_split", value=EVAL_SPLIT)
    shots = options.num_fewshot if options.num_fewshot is not None else task.get_config("num_fewshot") or 0
    task.set_config(key="num_fewshot", value=shots)
    task.set_fewshot_seed(seed=options.fewshot_seed)
    task.build_all_requests(limit=None, rank=0, world_size=1)
    return task


#: lm-eval metrics whose lower values are better (the harness's higher_is_better=False metrics). A task's
#: normalisation is fixed from its config, before the harness task is loaded: the evaluator checks that
#: the harness agrees, so a score's direction is never guessed.
LOWER_IS_BETTER = frozenset({"perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte", "ter", "brier_score"})


def score_metric_name(options: LMEvalOptions) -> str:
    """The name an lm-eval task's scores carry, from its config alone: ``neg_<metric>`` when lower is better."""
    metric = options.metric or "acc"  # unnamed: the task's first metric, checked to be higher-is-better
    return f"neg_{metric}" if metric in LOWER_IS_BETTER else metric


def _pick_metric(name: str, options: LMEvalOptions, task: Any) -> tuple[str, str, bool]:
    """(metric, filter key, higher is better): the named ones, else the task's first."""
    metrics = list(task.aggregation())
    metric = options.metric or metrics[0]
    if metric not in metrics:
        raise TaskError(f"task '{name}': lm-eval task '{options.task}' has no metric '{metric}'; it has {metrics}")
    filters = [f.name for f in getattr(task, "_filters", [])] or ["none"]
    key = options.filter or filters[0]
    if key not in filters:
        raise TaskError(f"task '{name}': lm-eval task '{options.task}' has no filter '{key}'; it has {filters}")
    higher = bool(task.higher_is_better().get(metric, True))
    if higher == (metric in LOWER_IS_BETTER) or (options.metric is None and not higher):
        raise TaskError(
            f"task '{name}': lm-eval task '{options.task}' scores '{metric}' as "
            f"{'higher' if higher else 'lower'}-is-better, which mergetune does not know in advance; name it as "
            "lm_eval.metric and report this metric's direction as a mergetune issue"
        )
    return metric, key, higher


def _harness_metrics(task: Any, instances: list[Any], filter_key: str) -> dict[str, float]:
    """lm-eval's post-processing of one task on one rank: filters, ``process_results``, aggregation."""
    task.apply_filters()
    by_doc: dict[int, list[Any]] = defaultdict(list)
    for inst in instances:
        by_doc[inst.doc_id].append(inst)
    values: dict[str, list[Any]] = defaultdict(list)
    for doc_id, doc in task.doc_iterator(rank=0, limit=None, world_size=1):
        requests = sorted(by_doc[doc_id], key=lambda inst: inst.idx)
        for metric, value in task.process_results(doc, [r.filtered_resps[filter_key] for r in requests]).items():
            values[metric].append(value)
    aggregations: dict[str, Callable[[list[Any]], float]] = task.aggregation()
    return {metric: float(aggregations[metric](items)) for metric, items in values.items() if metric in aggregations}
