"""The worker: resident models and data, one ``evaluate(recipe)`` per candidate.

A worker loads, once, the base and the experts' task vectors (ModelSet), one task model per task
(its expert's model, or the base's for a guard task without an expert) whose shared weights are
bound to the merge buffer (so a merge is visible to every task model without a copy), the tokenised
validation examples (ValidationSuite) and the reference scores each task's normalisation needs (its
expert's; the base's for losses and guard tasks). Per candidate it merges in place and scores: no
model weights move and nothing touches the disk. It is a plain class: the local executor calls it
in-process, the Ray executor wraps it in an actor.

Validation examples are split once, deterministically, into the part the search scores and a
held-out part used only to re-score the finalists (small validation sets invite overfitting to
their noise); the test split is scored only through ``score(recipe, "test")``, once, for the
chosen recipe.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from mergetune.errors import MergetuneError
from mergetune.merging.engine import Merger
from mergetune.merging.methods import get_method
from mergetune.merging.modelset import STORAGE_DTYPES, ModelSet
from mergetune.merging.placement import Placement, dispatch, group_store_bytes, plan_placement, resolve_devices
from mergetune.merging.residency import MemoryBudget
from mergetune.objectives.experts import load_for_expert
from mergetune.objectives.models import load_task_model
from mergetune.objectives.suite import ValidationSuite
from mergetune.objectives.tasks import TaskConfig, TaskData
from mergetune.recipe import Recipe
from mergetune.search.dynamic import DynamicRunner
from mergetune.search.evaluation import Evaluation, evaluation_from_scores
from mergetune.search.fidelity import FidelitySettings, Incumbent, race
from mergetune.search.gradient import GradientSettings, TunedWeights, WeightTuner

Split = Literal["search", "holdout", "test"]


@dataclass(frozen=True)
class WorkerSetup:
    """Everything a worker needs to build its resident state (small and picklable)."""

    base: str
    experts: dict[str, str]  # expert name -> folder or hub id
    tasks: list[dict[str, Any]]  # TaskConfig dicts, every task scored; "expert": its expert's name, None for a guard
    holdout_fraction: float = 0.33
    seed: int = 0
    batch_size: int = 64
    threads: int = 1
    device: str = "cpu"
    cache_dir: str | None = None
    trust_remote_code: bool = False
    allow_tokenizer_mismatch: bool = False
    compile: bool | None = None  # None: compile kernels when a compiler is available
    autocast: str = "none"  # "bfloat16": score under bf16 autocast
    storage_dtype: str = "float32"  # the store's dtype (resources.storage_dtype); the merge computes in float32
    memory: int | None = None  # bytes of host memory the store may take (resources.memory); None: no limit
    device_memory: int | None = None  # bytes of the merge device's memory the store may take
    store_dir: str | None = None  # where a disk-tier store file is written
    tier: str | None = None  # a tier forced by the config (resources.tier); None: chosen from the budgets
    devices: tuple[str, ...] | str | None = None  # several devices in one worker (resources.devices); None: one
    device_map: str | dict[str, str | int] = "auto"  # how layer groups are placed on them (resources.device_map)
    fidelity: FidelitySettings | None = None  # multi-fidelity: search candidates raced on growing slices

    @property
    def budget(self) -> MemoryBudget:
        """The memory budget the store's residency tier is chosen from."""
        return MemoryBudget(self.memory, self.device_memory, self.store_dir, self.tier)  # type: ignore[arg-type]

    def load_modelset(self, *, stage_on_host: bool = False) -> ModelSet:
        """The setup's base and experts, streamed into a store of its dtype in the tier its budget allows.

        With several devices the store is filled on the host (in memory, or on disk past ``memory``): the
        worker copies each layer group to its device and computes the candidate-independent statistics here.
        """
        return ModelSet.load(
            self.base,
            list(self.experts.items()),
            device=self.device if self.devices is None else "cpu",
            storage_dtype=STORAGE_DTYPES[self.storage_dtype],
            budget=self.budget,
            stage_on_host=stage_on_host,
            tokenizer_mismatch=self.tokenizer_mismatch,
        )

    @property
    def tokenizer_mismatch(self) -> Literal["error", "warn"]:
        """What ModelSet does when an expert's tokenizer differs from the base's."""
        return "warn" if self.allow_tokenizer_mismatch else "error"

    def placement(self, modelset: ModelSet) -> Placement | None:
        """Which device holds each layer group of ``modelset`` (None: one device, no placement)."""
        if self.devices is None:
            return None
        groups = modelset.layer_groups(1)
        return plan_placement(
            group_store_bytes(modelset, groups),
            resolve_devices(self.devices),
            self.device_map,
            self.device_memory,
            {g: groups.members(g) for g in groups.names},
        )

    def expert_of(self, task: TaskConfig) -> str | None:
        """The task's expert: its ``expert``, else the expert of its name (setups from older versions), else None."""
        return task.expert or (task.name if task.name in self.experts else None)

    def task_experts(self) -> dict[str, str]:
        """task -> its expert's folder, for the tasks that have an expert (the others are guard tasks)."""
        configs = [TaskConfig.model_validate(t) for t in self.tasks]
        return {c.name: self.experts[e] for c in configs if (e := self.expert_of(c)) is not None}


class Worker:
    """Holds the resident state of one evaluation slot."""

    def __init__(self, setup: WorkerSetup, modelset: ModelSet | None = None) -> None:
        """``modelset``: an already loaded ModelSet of the setup's base and experts (a Ray actor gets the
        driver's from the object store, shared by the actors of a node); loaded here when None."""
        torch.set_num_threads(setup.threads)
        _quiet_transformers()
        self.setup = setup
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        configs = [TaskConfig.model_validate(t) for t in setup.tasks]
        tasks = [load_for_expert(c, setup.experts.get(c.name)) for c in configs]  # labels in the head's order
        self._search_tasks, self._holdout_tasks = zip(
            *(split_holdout(t, setup.holdout_fraction, setup.seed) for t in tasks), strict=True
        )
        self._all_tasks = tasks
        if modelset is None:
            modelset = setup.load_modelset()
        elif modelset.task_names != list(setup.experts):
            raise MergetuneError(f"the given ModelSet holds tasks {modelset.task_names}, not {list(setup.experts)}")
        self.placement = setup.placement(modelset)
        # several devices: the store stays on the host, the merger copies each group to its device
        self.modelset = modelset.placed(setup.device) if self.placement is None else modelset
        self.merger = Merger(self.modelset, compile=setup.compile, placement=self.placement)
        self.tokenizer = setup_tokenizer(setup)
        self.models = self._task_models(tasks)
        self._suites: dict[str, ValidationSuite] = {}
        self.suite("search")  # tokenise and compute the references now, not on the first candidate

    def _task_models(self, tasks: list[TaskData]) -> dict[str, torch.nn.Module]:
        """One model per task bound to the merge buffer: its expert's (with its head), or the base's for a guard."""
        experts = self.setup.task_experts()
        models = {}
        for task in tasks:
            model = self._load_model(task, experts.get(task.name, self.setup.base))
            self.merger.bind(model)  # after the dispatch: it moves weights, binding must not be undone
            models[task.name] = model
        return models

    def suite(self, split: Split) -> ValidationSuite:
        """The suite of a split, built on first use, with the experts' reference scores set."""
        if split not in self._suites:
            options: dict[str, Any] = {"batch_size": self.setup.batch_size, "cache_dir": self.setup.cache_dir}
            if self.setup.autocast == "bfloat16":
                options["autocast"] = torch.bfloat16
            if split == "test":
                suite = ValidationSuite.for_test(self._all_tasks, self.tokenizer, **options)
            else:
                tasks = self._search_tasks if split == "search" else self._holdout_tasks
                if split == "search" and self.setup.fidelity is not None:  # only the search's part is raced
                    options.update(slices=self.setup.fidelity.fractions, slice_seed=self.setup.seed)
                suite = ValidationSuite(list(tasks), self.tokenizer, **options)
            suite.reference_scores(self.setup.task_experts(), base=self.setup.base, loader=self._load_model)
            self._suites[split] = suite
        return self._suites[split]

    def _load_model(self, task: TaskData, folder: str | os.PathLike[str]) -> torch.nn.Module:
        """A task's model on the worker's device, or dispatched along its placement (activations move, not weights)."""
        trust = self.setup.trust_remote_code
        if self.placement is None:
            return load_task_model(task, folder, trust_remote_code=trust, device=self.setup.device)
        model = load_task_model(task, folder, trust_remote_code=trust, device="cpu")
        return dispatch(model, self.placement, self.modelset.layer_groups(1))

    def evaluate(
        self, recipe: Recipe | Mapping[str, Any], split: Split = "search", incumbent: Incumbent | None = None
    ) -> Evaluation:
        """Merge a candidate in place and score it on a split (the search's part by default).

        With multi-fidelity on, a static candidate on the search split is raced against ``incumbent``
        (see ``fidelity``): stopped early when it is very unlikely to beat it, else scored in full.
        A dynamic recipe (Twin-Merging: the weights depend on the input) is built and scored by
        ``dynamic``, always on every example.
        """
        recipe = recipe if isinstance(recipe, Recipe) else Recipe.model_validate(recipe)
        self._check_storage(recipe)
        if get_method(recipe.method).dynamic:
            self._one_device("dynamic (Twin-Merging) recipes")
            run = self.dynamic.run(recipe, self.suite(split))
            return run.annotate(evaluation_from_scores(run.scores, run.build_seconds, run.eval_seconds, self.name))
        start = time.perf_counter()
        # the task models are bound to the float32 buffer: a bf16 recipe's values are written there, rounded
        self.merger.merge(recipe, into=torch.float32)
        merged = time.perf_counter()
        suite = self.suite(split)
        if split == "search" and self.setup.fidelity is not None:
            scores, verdict = race(suite, self.models, incumbent, self.setup.fidelity)
            fidelity = verdict.describe(suite, incumbent)
        else:
            scores, fidelity = suite.score(self.models), None
        done = time.perf_counter()
        # test: each example's outcome is kept, so that two runs' chosen recipes can be compared paired
        return evaluation_from_scores(
            scores, merged - start, done - merged, self.name, fidelity=fidelity, keep_examples=split == "test"
        )

    def _check_storage(self, recipe: Recipe) -> None:
        """A recipe records the store's dtype: scoring it on another store would score other weights."""
        if STORAGE_DTYPES[recipe.storage_dtype] != self.modelset.storage_dtype:
            raise MergetuneError(
                f"recipe storage_dtype {recipe.storage_dtype} differs from this worker's store "
                f"({self.modelset.storage_dtype}); set resources.storage_dtype: {recipe.storage_dtype}"
            )

    def _one_device(self, what: str) -> None:
        if self.placement is not None:
            raise MergetuneError(f"{what} run on one device; remove resources.devices to use them")

    @property
    def residency(self) -> str:
        """Where this worker's store is (tier, size, why) and, with several devices, its device map."""
        where = self.modelset.residency.describe()
        return where if self.placement is None else f"{where}; {self.placement.describe()}"

    @functools.cached_property
    def dynamic(self) -> DynamicRunner:
        """Builds and scores dynamic (Twin-Merging) candidates on this worker's resident models."""
        return DynamicRunner(self.modelset, self.merger, self.models, self._all_tasks, self.tokenizer)

    def reference(self, split: Split = "search") -> dict[str, float]:
        """The experts' scores on a split, per task that has an expert."""
        return self.suite(split).reference

    def references(self, split: Split = "search") -> dict[str, dict[str, float]]:
        """Every reference of each task's normalisation on a split: ``{task: {"expert"/"base"/"chance": score}}``."""
        return self.suite(split).references()

    def tune(self, recipe: Recipe, settings: GradientSettings, tasks: list[str] | None = None) -> TunedWeights:
        """Tune the recipe's λ by gradient descent on the search split (``search.gradient``)."""
        self._one_device("gradient tuning")
        return WeightTuner(self.merger, self.models, self.suite("search")).tune(recipe, settings, tasks)

    def ping(self) -> str:
        return self.name


def split_holdout(task: TaskData, fraction: float, seed: int) -> tuple[TaskData, TaskData]:
    """Split a task's validation examples into the search part and the held-out part (seeded)."""
    n = len(task.validation)
    n_hold = round(n * fraction)
    if fraction > 0 and (n_hold == 0 or n_hold == n):
        raise MergetuneError(
            f"task '{task.name}': {n} validation examples cannot be split with holdout_fraction {fraction}"
        )
    order = np.random.default_rng(seed).permutation(n)
    hold = np.sort(order[:n_hold])
    keep = np.sort(order[n_hold:])
    return (
        dataclasses.replace(task, validation=task.validation.take(keep)),
        dataclasses.replace(task, validation=task.validation.take(hold)),
    )


def _quiet_transformers() -> None:
    """No per-model loading bars: a worker loads one model per task, the search shows its own progress."""
    from transformers.utils import logging as hf_logging  # late: transformers is heavy

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def setup_tokenizer(setup: WorkerSetup) -> Any:
    from transformers import AutoTokenizer  # late: transformers is heavy

    for source in (setup.base, *setup.experts.values()):
        try:
            return AutoTokenizer.from_pretrained(source, trust_remote_code=setup.trust_remote_code)
        except (OSError, ValueError):
            continue
    raise MergetuneError(f"no tokenizer found in the base ({setup.base}) or any expert folder")
