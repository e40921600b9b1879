"""The search loop: ask -> executor -> tell, recorded in an Optuna storage, resumable at any moment.

``open_search(config)`` does everything with side effects before the loop exists: it resolves the
models (a zoo is built or taken from its cache), builds the search space, starts the executor
(local worker or Ray actors), opens (or creates) the study in its storage, and hands the ready
parts to ``SearchLoop``. Constructing a ``SearchLoop`` itself trains nothing and starts nothing.

Flow of ``SearchLoop.run()``:
1. resume the study: trials a killed driver left RUNNING are completed from their saved result
   (``evaluations/<trial>.json``) or, cut mid-evaluation, failed and re-queued; external
   optimizers restore their checkpoint and replay what came after it;
2. on a new study, queue the warm starts (the papers' defaults for each method in the space);
3. keep every executor slot busy: a new candidate is asked for as soon as one finishes (queued
   trials first, then the optimizer); each result is saved to its own file, then told to the
   study and the optimizer;
4. when the budget is spent: choose (see ``finalize``), re-score the finalists on held-out
   validation examples, score the chosen recipe once on the test split, write the results.

Multi-fidelity (``evaluation.fidelity``, see ``fidelity``): each candidate is sent with the incumbent
it races against (``_incumbent_for``); a candidate its worker stopped early is recorded as a PRUNED
trial with its partial scores and the examples it used, told to the optimizer pessimistically
(``outcomes.pruned_outcome``), and never re-queued on resume (it has an outcome).

Nothing is evaluated twice: a resumed driver's sampler continues with a seed of its own
(``_continue_sampling``), and a candidate equal to one evaluated or being evaluated gets that
trial's result, marked ``reused_from`` (``_place``, ``_reuse``).

Objectives, constraints and the scalarisation of a candidate: see ``outcomes``.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import JournalStorage
from optuna.trial import TrialState

from mergetune.merging.layer_groups import build_layer_groups
from mergetune.merging.loading import tensor_names
from mergetune.merging.methods import get_method
from mergetune.objectives.zoo import build_zoo
from mergetune.recipe import Expert, Recipe, common_dtype
from mergetune.search import records as R
from mergetune.search.binding import check_binding, check_study, stamp
from mergetune.search.config import SearchConfig
from mergetune.search.drivers import DRIVER_ATTR, DriverConflictError, Heartbeat, live_drivers
from mergetune.search.executor import Executor, JobResult, LocalExecutor
from mergetune.search.fidelity import FidelitySettings, Incumbent
from mergetune.search.finalize import finalize
from mergetune.search.grams import GRAMS_DIR, search_grams
from mergetune.search.normalizations import check_resume, task_normalizations
from mergetune.search.normalizations import stamp as stamp_normalizations
from mergetune.search.optimizers import Optimizer, Outcome, Proposal, make_optimizer
from mergetune.search.outcomes import mean_density, outcome_of, pruned_outcome
from mergetune.search.saved_evaluation import SavedEvaluation, record_evaluation
from mergetune.search.space import SearchSpace
from mergetune.search.storage import (
    RETRY_ATTR,
    finished_trials,
    has_outcome,
    open_storage,
    recover_interrupted,
    storage_location,
    waiting_trials,
)
from mergetune.search.worker import Evaluation, WorkerSetup

log = logging.getLogger(__name__)
OPTIMIZER_DIR = "optimizer"


MAX_REUSED_IN_A_ROW = 50  # proposals of evaluated points in a row after which the search stops: nothing new is left
# A trial's own provenance (warm start, retry of an interrupted one, reuse) and timing: never copied by a reuse.
_OWN_ATTRS = frozenset({"warm_start", RETRY_ATTR, R.REUSED, R.TIMING})

#: A candidate's identity: its active parameters as stored, sorted by name (see ``SearchLoop._point``).
Point = tuple[tuple[str, Any], ...]


def continued_seed(seed: int, prior_trials: int) -> int:
    """The sampler seed of a driver that finds ``prior_trials`` trials in its study.

    ``seed`` itself for a fresh study (a fresh seeded search is unchanged); otherwise a 32-bit seed
    mixed from both by NumPy's ``SeedSequence``, so that each resume draws from a stream of its own.
    """
    if prior_trials == 0:
        return seed
    return int(np.random.SeedSequence(seed, spawn_key=(prior_trials,)).generate_state(1)[0])


class Progress(Protocol):
    def start(self, total: int | None, done: int, description: str) -> None: ...

    def update(self, record: R.TrialRecord, best_mean: float | None) -> None: ...

    def stop(self) -> None: ...


@dataclass
class ResolvedModels:
    base: str
    experts: dict[str, str]
    tasks: list[dict[str, Any]]


@dataclass
class _Pending:
    trial: optuna.Trial
    params: dict[str, Any]
    recipe: Recipe
    proposal: Proposal | None
    ask_seconds: float
    submitted: float = field(default_factory=time.perf_counter)


@dataclass
class _Flight:
    """The loop's running count: candidates out for evaluation, those waiting for an equal one, what was evaluated."""

    done: int  # finished candidates of the budget (evaluated or reused)
    evaluated: dict[Point, int]  # each point evaluated or being evaluated -> its trial
    pending: dict[int, _Pending] = field(default_factory=dict)  # trial number -> candidate at the executor
    waiting: dict[int, list[_Pending]] = field(default_factory=dict)  # pending trial -> candidates equal to it
    reused_in_a_row: int = 0

    @property
    def outstanding(self) -> int:
        """Candidates asked and not yet recorded."""
        return len(self.pending) + sum(len(w) for w in self.waiting.values())


def resolve_models(config: SearchConfig, console: Any = None) -> ResolvedModels:
    """Base, experts and task configs: from the zoo (built on first use) or from the config."""
    if config.models.zoo is not None:
        zoo = build_zoo(config.models.zoo, console=console)
        tasks = config.resolved_tasks(list(zoo.experts), list(zoo.tasks.values()))
        # absolute: the recipes the search writes must work from any folder
        experts = {t: str(p.resolve()) for t, p in zoo.experts.items()}
        return ResolvedModels(str(zoo.base.resolve()), experts, tasks)
    assert config.models.base is not None and config.tasks is not None
    experts = {e.name: e.model for e in config.models.experts}
    return ResolvedModels(config.models.base, experts, config.resolved_tasks(list(experts)))


@dataclass(frozen=True)
class _Contender:
    """A candidate scored in full that later candidates may race against: its mean, its density, its values."""

    mean: float
    density: float
    incumbent: Incumbent


def fidelity_settings(config: SearchConfig) -> FidelitySettings | None:
    """How candidates are raced (None: multi-fidelity off). One objective, the mean, with no worst-task weight
    and no floors: the pooled test on the mean; any other run: worse with confidence on every task."""
    fidelity, objectives = config.evaluation.fidelity, config.objectives
    if not fidelity.enabled:
        return None
    mean_only = list(objectives.optimize) == ["mean"] and objectives.worst_weight == 0 and objectives.floors is None
    return FidelitySettings(tuple(fidelity.slices), fidelity.p_threshold, every_task=not mean_only)


def worker_setup(config: SearchConfig, models: ResolvedModels) -> WorkerSetup:
    return WorkerSetup(
        base=models.base,
        experts=models.experts,
        tasks=models.tasks,
        holdout_fraction=config.selection.holdout_fraction,
        seed=config.seed,
        batch_size=config.evaluation.batch_size,
        threads=config.evaluation.threads,
        device=config.evaluation.device,
        cache_dir=str((config.output_dir / "cache").resolve()),
        trust_remote_code=config.models.trust_remote_code,
        allow_tokenizer_mismatch=config.models.allow_tokenizer_mismatch,
        autocast=config.evaluation.autocast,
        storage_dtype=config.resources.storage_dtype,
        memory=config.resources.memory_bytes,
        device_memory=config.resources.device_memory_bytes,
        store_dir=str(Path(config.resources.disk_dir or config.output_dir / "cache" / "store").resolve()),
        tier=config.resources.tier,
        devices=_devices(config.resources.devices),
        device_map=config.resources.device_map,
        fidelity=fidelity_settings(config),
    )


def _devices(devices: list[str] | str | None) -> tuple[str, ...] | str | None:
    """resources.devices as the worker setup keeps them (a tuple: the setup is frozen and hashable)."""
    return tuple(devices) if isinstance(devices, list) else devices


def ray_executor(config: SearchConfig, setup: WorkerSetup) -> Executor:
    """Ray actors for the setup, as the config's ``execution`` section says (this starts or joins Ray)."""
    # Imported here, only for a Ray search: Ray is heavy and a local search never needs it.
    from mergetune.search.ray_executor import RayExecutor, RayOptions

    ex = config.execution
    options = RayOptions(
        address=ex.address, workers=ex.workers, gpus_per_worker=ex.gpus_per_worker, max_attempts=ex.max_attempts
    )
    return RayExecutor(setup, options)


def build_space(
    config: SearchConfig, models: ResolvedModels, fixed_options: dict[str, dict[str, Any]] | None = None
) -> SearchSpace:
    """The config's space over the resolved models; ``fixed_options``: see ``SearchSpace``."""
    names, model_type = tensor_names(models.base)
    groups = build_layer_groups(names, model_type, config.space.granularity).names
    return SearchSpace(
        base=models.base,
        experts=[Expert(name=t, model=p) for t, p in models.experts.items()],
        group_names=groups,
        methods=config.space.methods,
        weight=config.space.weight,
        density=config.space.density,
        granularity=config.space.granularity,
        seed=config.seed,
        trust_remote_code=config.models.trust_remote_code,
        allow_tokenizer_mismatch=config.models.allow_tokenizer_mismatch,
        dtype=common_dtype([models.base, *models.experts.values()]),
        storage_dtype=config.resources.storage_dtype,
        fixed_options=fixed_options,
    )


def open_search(
    config: SearchConfig,
    *,
    executor: Executor | None = None,
    progress: Progress | None = None,
    console: Any = None,
) -> SearchLoop:
    """Prepare everything a search needs, with its side effects, and return the loop ready to ``run()``.

    First checks that the storage holds no search of this name made with another config (see
    ``binding``): before anything is built, started or written. Then creates the output folder,
    builds the zoo if the config names one (``console`` shows its progress), starts the executor
    unless one is given (Ray actors for ``execution.executor: ray``, else one in-process worker),
    and opens the study in its storage (a new one, or the one to resume). An executor started here
    is closed again if a later step fails; a given one is the caller's to close.
    """
    storage_url = storage_location(config.storage, config.output_dir)
    check_binding(storage_url, config)
    config.output_dir.mkdir(parents=True, exist_ok=True)
    models = resolve_models(config, console)
    setup = worker_setup(config, models)
    normalizations = task_normalizations(setup)
    check_resume(storage_url, config.name, normalizations)  # before any worker starts: one line, nothing loaded
    # RegMean's statistics, once per expert before the first candidate (reused from the run folder on resume)
    grams = search_grams(config.space.methods, setup, config.output_dir / GRAMS_DIR, console)
    space = build_space(config, models, grams.as_options() if grams else None)
    setup_costs = {"regmean_grams": grams.describe()} if grams else {}
    started = executor is None
    if executor is None:
        executor = ray_executor(config, setup) if config.execution.executor == "ray" else LocalExecutor(setup)
    try:
        optimizer = _make_optimizer(config, space, executor)
        study = _open_study(config, storage_url, optimizer)
        stamp_normalizations(study, normalizations)
    except BaseException:
        if started:
            executor.close()
        raise
    parts = SearchParts(models, space, setup, optimizer, executor, study, storage_url, setup_costs)
    return SearchLoop(config, parts, progress=progress)


def _make_optimizer(config: SearchConfig, space: SearchSpace, executor: Executor) -> Optimizer:
    """The configured optimizer; its batch is the executor's worker count unless the config sets one."""
    opt = config.optimizer
    batch_size = opt.batch_size or executor.slots
    optimizer = make_optimizer(
        opt.name, space, seed=config.seed, batch_size=batch_size, budget=config.budget.candidates, options=opt.options
    )
    cap = optimizer.max_pending
    if cap is not None and cap < executor.slots:
        log.warning(
            "optimizer.batch_size %d < %d workers: %s keeps at most %d candidate(s) in flight, the rest idle",
            batch_size,
            executor.slots,
            opt.name,
            cap,
        )
    return optimizer


def _open_study(config: SearchConfig, storage_url: str, optimizer: Optimizer) -> optuna.Study:
    """Load the search's study, or create one that records its definition, objectives, budget and optimizer.

    The binding is checked again on the open storage, before any write: another driver may have
    created the study since ``open_search`` checked. An existing study is loaded, not re-created:
    creating one that exists would append to the journal.
    """
    objectives = list(config.objectives.optimize)
    storage = open_storage(storage_url)
    check_study(storage, config, storage_url)
    sampler = optimizer.sampler()
    try:
        study = optuna.load_study(study_name=config.name, storage=storage, sampler=sampler)
    except KeyError:  # no study of this name yet
        directions = [R.DIRECTION[o] for o in objectives]
        study = optuna.create_study(study_name=config.name, storage=storage, directions=directions, sampler=sampler)
    if R.OBJECTIVES not in study.user_attrs:
        study.set_user_attr(R.OBJECTIVES, objectives)
        study.set_metric_names(objectives)
        study.set_user_attr(R.BUDGET, config.budget.model_dump())
        study.set_user_attr(R.OPTIMIZER, config.optimizer.name)
    stamp(study, config)
    return study


@dataclass(frozen=True)
class SearchParts:
    """What ``open_search`` prepared for a loop: resolved models, space, worker setup, optimizer, executor, study."""

    models: ResolvedModels
    space: SearchSpace
    setup: WorkerSetup
    optimizer: Optimizer
    executor: Executor
    study: optuna.Study
    storage_url: str
    setup_costs: dict[str, Any] = field(default_factory=dict)  # what preparing the candidates cost (RegMean's Grams)


class SearchLoop:
    """One search: resumable, executor-agnostic. Build it with ``open_search``, which prepares its parts."""

    def __init__(self, config: SearchConfig, parts: SearchParts, *, progress: Progress | None = None) -> None:
        self.config = config
        self.out = config.output_dir
        self.objectives = list(config.objectives.optimize)
        self.models = parts.models
        self.space = parts.space
        self.setup = parts.setup
        self.optimizer = parts.optimizer
        self.executor = parts.executor
        self.study = parts.study
        self.storage_url = parts.storage_url
        self.setup_costs = parts.setup_costs
        self.progress = progress
        self.overheads: list[float] = []
        self._best_mean: float | None = None
        self._contenders: dict[int, _Contender] = {}  # multi-fidelity: candidates scored in full, by trial
        self.heartbeat = Heartbeat(self.study)

    # ---- lifecycle and resume --------------------------------------------------------------------
    def close(self) -> None:
        """Stop the heartbeat and the executor's workers (and a Ray runtime it started); the storage stays."""
        self.heartbeat.stop()
        self.executor.close()

    def _join(self) -> None:
        """Announce this driver in the study (its heartbeat starts); a journal shared with a live driver is refused.

        Several drivers share an RDB study safely (tested on SQLite and PostgreSQL). A journal file is
        not proven safe for that, so a second driver on it stops before it writes anything.
        """
        others = live_drivers(self.study, self.heartbeat.grace)
        if others and isinstance(self.study._storage, JournalStorage):
            info = next(iter(others.values()))
            raise DriverConflictError(
                f"another driver ({info.describe()}) is running this search on its journal {self.storage_url}; "
                "several drivers need an RDB storage (storage: sqlite:///... or postgresql://...)"
            )
        self.heartbeat.start()

    def _resume(self) -> None:
        recovery = recover_interrupted(
            self.study, self.out, self.space.admit, grace=self.heartbeat.grace, me=self.heartbeat.id
        )
        # Only real outcomes: trials just failed as "interrupted" are re-queued, not failures.
        history = [(r.params, self._outcome_of(r)) for r in self.records() if r.params and r.evaluated]
        self.optimizer.restore(self.out / OPTIMIZER_DIR, history)
        if recovery.finished == 0 and not recovery.requeued and not self.study.trials and self.config.warm_start:
            self._enqueue_warm_starts()

    def _enqueue_warm_starts(self) -> None:
        """Each method's paper default (declared on its class as ``warm_start``) is evaluated first."""
        for method in self.space.methods:
            start = get_method(method).warm_start
            recipe = Recipe(
                base=self.space.base,
                experts=self.space.experts,
                method=method,
                weight=start.weight,
                density=start.density if self.space.density_range(method) else 1.0,
                options=dict(start.options),
            )
            self.study.enqueue_trial(self.space.from_recipe(recipe), user_attrs={"warm_start": True})

    # ---- the loop --------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Run until the budget is spent, then choose and write the results (this driver's heartbeat meanwhile)."""
        prior_trials = len(self.study.get_trials(deepcopy=False))  # before the resume queues any: 0 when fresh
        self._join()
        try:
            return self._run(prior_trials)
        finally:
            self.heartbeat.stop()

    def _run(self, prior_trials: int) -> dict[str, Any]:
        self._resume()
        self._continue_sampling(prior_trials)
        self._best_mean = self.best_mean()  # read once; then kept up to date as results arrive
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            self._remember(trial.number, trial.user_attrs)
        started = time.perf_counter()
        flight = _Flight(done=len(finished_trials(self.study)), evaluated=self._evaluated_points())
        if self.progress:
            self.progress.start(self.config.budget.candidates, flight.done, self.optimizer.describe())
        try:
            while self._fill(flight, started):
                for result in self.executor.results():
                    self._finish(flight, result)
        finally:
            if self.progress:
                self.progress.stop()
        return finalize(self)

    def _fill(self, flight: _Flight, started: float) -> bool:
        """Ask candidates while a slot is free and budget is left; True while some are out for evaluation.

        Candidates waiting on an equal one count as out: the optimizer has not been told their outcome
        yet, and an external optimizer accepts at most ``max_pending`` such points.
        """
        while (
            flight.outstanding < self._concurrency()
            and self._budget_left(max(flight.done + flight.outstanding, self._claimed()), started)
            and flight.reused_in_a_row < MAX_REUSED_IN_A_ROW
        ):
            item = self._ask()
            if self._over_budget(item):
                break
            self._place(flight, item)
        return bool(flight.pending)

    def _claimed(self) -> int:
        """Candidates of the budget taken by every driver of the study: finished, or asked and running."""
        running = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        return len(finished_trials(self.study)) + len(running)

    def _over_budget(self, item: _Pending) -> bool:
        """Whether the candidate just asked is beyond the budget because another driver asked at the same time.

        Two drivers may both see one candidate of the budget left and both ask. Ranked by the time
        they were asked, the later one is over: it is pruned (marked ``over_budget``, never evaluated).
        """
        budget = self.config.budget.candidates
        if budget is None:
            return False
        claims = finished_trials(self.study) + self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        order = sorted(claims, key=lambda t: (t.datetime_start or t.datetime_complete, t._trial_id))
        rank = next(i for i, t in enumerate(order) if t.number == item.trial.number)
        if rank < budget:
            return False
        item.trial.set_user_attr("over_budget", True)
        self.study.tell(item.trial, state=TrialState.PRUNED)
        log.info("trial %d pruned: another driver took the last candidate of the budget", item.trial.number)
        return True

    def _place(self, flight: _Flight, item: _Pending) -> None:
        """Send a new candidate to the executor; one equal to an evaluated (or evaluating) one is not sent."""
        point = self._point(item.params)
        source = flight.evaluated.get(point) if point is not None else None
        if source is None:
            if point is not None:
                flight.evaluated[point] = item.trial.number
            flight.pending[item.trial.number] = item
            flight.reused_in_a_row = 0
            incumbent = self._incumbent_for(item.recipe)
            if incumbent is None:  # the two-argument call: executors that predate multi-fidelity keep working
                self.executor.submit(item.trial.number, item.recipe)
            else:
                self.executor.submit(item.trial.number, item.recipe, incumbent)
        elif source in flight.pending:
            flight.waiting.setdefault(source, []).append(item)  # reused once its equal's result is in
        else:
            self._reuse(item, source)
            flight.done += 1
            flight.reused_in_a_row += 1
            if flight.reused_in_a_row == MAX_REUSED_IN_A_ROW:
                log.warning(
                    "the optimizer proposed %d evaluated points in a row: nothing new is left to try, stopping",
                    MAX_REUSED_IN_A_ROW,
                )

    def _finish(self, flight: _Flight, result: JobResult) -> None:
        """Record an evaluated candidate, then the candidates that were waiting for its result."""
        item = flight.pending.pop(result.job)
        waiting = flight.waiting.pop(item.trial.number, [])
        if not self._tell(item, result):
            # Another driver failed it as interrupted and queued its point again: the study has no
            # result to reuse for that point, so the candidates waiting on it are placed anew.
            point = self._point(item.params)
            if point is not None and flight.evaluated.get(point) == item.trial.number:
                del flight.evaluated[point]
            for duplicate in waiting:
                self._place(flight, duplicate)
            return
        flight.done += 1
        for duplicate in waiting:
            self._reuse(duplicate, item.trial.number)
            flight.done += 1

    def _concurrency(self) -> int:
        """Free slots, capped by what the optimizer accepts pending (Nevergrad's num_workers promise)."""
        cap = self.optimizer.max_pending
        return self.executor.slots if cap is None else min(self.executor.slots, cap)

    def _budget_left(self, used: int, started: float) -> bool:
        if self.optimizer.exhausted and not waiting_trials(self.study):
            return False  # a finished grid: asking on would fall back to random sampling
        budget = self.config.budget
        if budget.candidates is not None and used >= budget.candidates:
            return False
        return budget.seconds is None or time.perf_counter() - started < budget.seconds

    def _ask(self) -> _Pending:
        start = time.perf_counter()
        proposal = None if waiting_trials(self.study) else self.optimizer.propose()
        if proposal is not None:
            self.study.enqueue_trial(proposal.params, skip_if_exists=False)
            # so that a crash right after does not make the optimizer propose this point again
            self.optimizer.checkpoint(self.out / OPTIMIZER_DIR)
        while (asked := self._ask_marked()) is None:
            proposal = None  # its trial was failed and its point queued again: the next one asked may differ
        trial, params = asked
        recipe = self.space.to_recipe(params)
        return _Pending(trial, params, recipe, proposal, time.perf_counter() - start)

    def _ask_marked(self) -> tuple[optuna.Trial, dict[str, Any]] | None:
        """A new trial marked as this driver's, and its parameters; None if another driver failed it meanwhile.

        Another driver that takes this one for gone (its heartbeat late) fails its RUNNING trials, and
        may do so between the ask and the mark; it queues the point again, so the caller asks anew.
        """
        trial = self.study.ask()
        try:
            trial.set_user_attr(DRIVER_ATTR, self.heartbeat.id)  # its RUNNING state is this driver's, while it lives
            return trial, self.space.suggest(trial)
        except UpdateFinishedTrialError as exc:
            log.warning("trial %d was failed by another driver as it was asked (%s): asking again", trial.number, exc)
            return None

    # ---- no candidate evaluated twice ----------------------------------------------------------------
    def _continue_sampling(self, prior_trials: int) -> None:
        """Give a resumed driver's sampler a seed of its own, so that it draws new points instead of replaying.

        An Optuna sampler restarts its random stream from its seed in every new driver, so a resumed
        search proposed again, in order, what the earlier drivers had (TPE's and GP's random start,
        NSGA-II's first generation, all of random search). Seeded from (config seed, trials already in
        the study), each resume continues with a stream of its own, reproducible for the same history;
        a fresh study keeps the config seed, so a fresh seeded search is what it always was. External
        optimizers restore their own state instead (their sampler is never consulted).
        """
        if self.optimizer.external or prior_trials == 0:
            return
        # SamplerOptimizer.sampler() builds its sampler from ``seed``: rebuild it on the stored study.
        self.optimizer.seed = continued_seed(self.config.seed, prior_trials)
        self.study.sampler = self.optimizer.sampler()

    def _evaluated_points(self) -> dict[Point, int]:
        """Every point the study has a result for, with the trial that was evaluated for it."""
        evaluated: dict[Point, int] = {}
        for trial in finished_trials(self.study):
            point = self._point(trial.params)
            if point is not None:
                evaluated.setdefault(point, int(trial.user_attrs.get(R.REUSED, trial.number)))
        return evaluated

    def _point(self, params: dict[str, Any]) -> Point | None:
        """A candidate's identity: its active parameters as the storage holds them, compared exactly.

        Each value makes its distribution's storage round trip (a float as the float stored, a choice
        as the choice), so a value enqueued as an int or a NumPy float equals the same value sampled;
        floats are compared exactly, as stored (no tolerance: two different floats are two candidates).
        None for a point this space cannot hold (a trial of an earlier space): it equals no candidate.
        """
        dists = self.space.distributions
        try:
            active = self.space.active(params)
            stored = {k: dists[k].to_external_repr(dists[k].to_internal_repr(v)) for k, v in active.items()}
        except (KeyError, ValueError):
            return None
        return tuple(sorted(stored.items()))

    def _reuse(self, item: _Pending, source_number: int) -> None:
        """Record a candidate equal to an evaluated one with that one's result instead of evaluating it again.

        The new trial gets the source's values, constraints and result attributes (its own provenance,
        a warm start or a retry, stays as it was), ``reused_from`` naming the source and only its own ask
        time as timing: nothing was merged or evaluated. The optimizer observes the outcome as usual.
        """
        source = self.study.get_trials(deepcopy=False)[source_number]  # trials are listed by number
        trial = item.trial
        for key, value in source.user_attrs.items():
            if key not in _OWN_ATTRS:
                trial.set_user_attr(key, value)
        trial.set_user_attr(R.TIMING, {"ask": item.ask_seconds, "wall": time.perf_counter() - item.submitted})
        trial.set_user_attr(R.REUSED, source_number)
        for name, value in source.constraints.items():
            trial.set_constraint(name, value)
        if source.state is TrialState.COMPLETE:
            self.study.tell(trial, list(source.values))
        else:
            for step, value in source.intermediate_values.items():  # a PRUNED source's partial value
                self.study._storage.set_trial_intermediate_value(trial._trial_id, step, value)
            self.study.tell(trial, state=TrialState.PRUNED if source.state is TrialState.PRUNED else TrialState.FAIL)
        log.info("trial %d equals trial %d: its result is reused, not evaluated again", trial.number, source_number)
        self._observed(item, self._outcome_of(R.TrialRecord.from_trial(source, self.objectives)), recorded=True)

    def _tell(self, item: _Pending, result: JobResult) -> bool:
        """Record a finished candidate: saved whole to its own file first, then in the study, then told
        to the optimizer. A kill between the study's appends loses nothing: the resume records the file.

        True when the study holds the outcome: recorded here, or by another driver from the saved file.
        """
        start = time.perf_counter()
        trial = item.trial
        outcome, saved = self._saved_evaluation(item, result)
        path = saved.save(self.out)
        recorded = self._record_in_study(trial, saved, path)
        if recorded and saved.state == TrialState.COMPLETE.name:
            self._remember(trial.number, saved.user_attrs)
        if result.evaluation is None:
            log.warning("trial %d failed: %s", trial.number, result.error)
        self._observed(item, outcome, recorded=recorded)
        self.overheads.append(item.ask_seconds + time.perf_counter() - start)
        return recorded

    def _observed(self, item: _Pending, outcome: Outcome, *, recorded: bool) -> None:
        """After a candidate's outcome is in the study (evaluated or reused): tell the optimizer, checkpoint
        it, track the best feasible mean (only of outcomes the study holds) and update the progress line."""
        self.optimizer.observe(item.proposal, item.params, outcome)
        self.optimizer.checkpoint(self.out / OPTIMIZER_DIR)
        if recorded and outcome.feasible and outcome.values is not None:
            mean = dict(zip(self.objectives, outcome.values, strict=True)).get("mean")
            if mean is not None and (self._best_mean is None or mean > self._best_mean):
                self._best_mean = mean
        if self.progress:
            frozen = self.study.get_trials(deepcopy=False)[item.trial.number]  # trials are listed by number
            self.progress.update(R.TrialRecord.from_trial(frozen, self.objectives), self._best_mean)

    def _record_in_study(self, trial: optuna.Trial, saved: SavedEvaluation, path: Path) -> bool:
        """Record ``saved`` on its trial; False when another driver failed the trial as interrupted meanwhile.

        A driver taken for gone (its heartbeat late) may see another driver finish its RUNNING trial:
        from the saved file when that driver shares the run folder (the study then holds this very
        outcome), else failed as interrupted and its point queued again. Either way the file is kept.
        """
        try:
            record_evaluation(self.study, trial._trial_id, saved, after_append=_test_kill_hook())
            return True
        except UpdateFinishedTrialError as exc:
            stored = self.study.get_trials(deepcopy=False)[trial.number]
            kept = has_outcome(stored)
            log.warning(
                "trial %d was finished by another driver meanwhile (%s): %s; its evaluation is kept in %s",
                trial.number,
                exc,
                "recorded from this evaluation" if kept else "failed as interrupted and queued again",
                path,
            )
            return kept

    def _saved_evaluation(self, item: _Pending, result: JobResult) -> tuple[Outcome, SavedEvaluation]:
        """The candidate's outcome and everything the study records of it (see ``saved_evaluation``)."""
        attrs: dict[str, Any] = {R.RECIPE: item.recipe.to_dict(), R.WORKER: result.worker}
        if result.attempts > 1:
            attrs[R.ATTEMPTS] = result.attempts
        constraints: dict[str, float] = {}
        intermediate: dict[str, float] = {}
        if result.evaluation is None:
            outcome = Outcome(values=None, scalar=-math.inf, feasible=False)
            attrs.update({R.ERROR: result.error or "unknown error", R.EVALUATED: True})
            state = TrialState.FAIL
        else:
            outcome, measured, constraints = self._record(item, result)
            attrs.update(measured)
            state = TrialState.COMPLETE
            if result.evaluation.stopped:
                outcome, intermediate = self._stopped(item, result.evaluation, outcome)
                attrs.update({R.EVALUATED: True, R.FEASIBLE: False})
                state, constraints = TrialState.PRUNED, {}
        trial = item.trial
        values = None if outcome.values is None else list(outcome.values)
        saved = SavedEvaluation(
            self.study.study_name, trial.number, trial.params, state.name, values, attrs, constraints, intermediate
        )
        return outcome, saved

    def _stopped(self, item: _Pending, ev: Evaluation, partial: Outcome) -> tuple[Outcome, dict[str, float]]:
        """A candidate its race stopped: its pessimistic outcome, and the intermediate value Optuna's samplers read.

        The intermediate value (single-objective studies only: Optuna reads none in multi-objective
        ones) is the partial objective at step = examples scored in all, so TPE ranks a candidate
        stopped later above one stopped sooner, and both below every completed one.
        """
        fidelity = ev.fidelity or {}
        density = mean_density(item.recipe, self.space)
        outcome = pruned_outcome(ev.normalized, density, self.objectives, self.config, fidelity.get("gap"))
        log.info(
            "trial %d stopped after %d of %d stages (p = %s against trial %s)",
            item.trial.number,
            fidelity.get("stage", 0),
            fidelity.get("stages", 0),
            fidelity.get("p_value"),
            fidelity.get("incumbent"),
        )
        if len(self.objectives) != 1 or partial.values is None:
            return outcome, {}
        step = sum(fidelity.get("examples", {}).values())
        return outcome, {str(step): float(partial.values[0])}

    def _record(self, item: _Pending, result: JobResult) -> tuple[Outcome, dict[str, Any], dict[str, float]]:
        """An evaluated candidate's outcome, the attributes it is recorded with and its floor constraints."""
        ev = result.evaluation
        assert ev is not None
        density = mean_density(item.recipe, self.space)
        outcome = outcome_of(ev.normalized, density, self.objectives, self.config)
        attrs = {
            R.SCORES: ev.scores,
            R.NORMALIZED: ev.normalized,
            R.METRICS: ev.metrics,
            R.DENSITY: density,
            R.FEASIBLE: outcome.feasible,
            **({R.FIDELITY: ev.fidelity} if ev.fidelity is not None else {}),
            **({R.PER_EXAMPLE: ev.per_example} if ev.per_example else {}),
            R.TIMING: {
                "merge": ev.merge_seconds,
                "eval": ev.eval_seconds,
                "ask": item.ask_seconds,
                "executor": result.queued_seconds,
                "wall": time.perf_counter() - item.submitted,
            },
        }
        constraints = {
            f"floor:{task}": value for task, value in zip(outcome.constraint_names, outcome.constraints, strict=True)
        }
        return outcome, attrs, constraints

    # ---- reading back ----------------------------------------------------------------------------
    def records(self) -> list[R.TrialRecord]:
        return R.read_records(self.study)

    def best_mean(self) -> float | None:
        means = [r.values.get("mean") for r in self.records() if r.ok and r.feasible]
        means = [m for m in means if m is not None]
        return max(means) if means else None

    def _outcome_of(self, record: R.TrialRecord) -> Outcome:
        if record.pruned:
            gap = record.fidelity.get("gap")
            return pruned_outcome(record.normalized, record.density, self.objectives, self.config, gap)
        if not record.ok:
            return Outcome(values=None, scalar=-math.inf, feasible=False)
        return outcome_of(record.normalized, record.density, self.objectives, self.config)

    # ---- multi-fidelity: what a candidate races against ----------------------------------------------
    def _remember(self, number: int, attrs: dict[str, Any]) -> None:
        """Keep a feasible candidate scored in full (with its per-example values) as a possible incumbent."""
        per_example, normalized = attrs.get(R.PER_EXAMPLE), attrs.get(R.NORMALIZED)
        if not per_example or not normalized or not attrs.get(R.FEASIBLE, True) or attrs.get(R.REUSED) is not None:
            return
        incumbent = Incumbent(number, dict(attrs.get(R.SCORES, {})), dict(per_example))
        mean = float(np.mean(list(normalized.values())))
        self._contenders[number] = _Contender(mean, float(attrs.get(R.DENSITY, 1.0)), incumbent)

    def _incumbent_for(self, recipe: Recipe) -> Incumbent | None:
        """The candidate to race against: the best mean scored in full (with ``sparsity`` among the objectives:
        among those at least as sparse, so a stopped candidate could not have entered the front by density)."""
        if self.setup.fidelity is None or not self._contenders:
            return None
        pool = list(self._contenders.values())
        if "sparsity" in self.objectives:
            density = mean_density(recipe, self.space)
            pool = [c for c in pool if c.density <= density]
        best = max(pool, key=lambda c: (c.mean, -c.incumbent.trial), default=None)
        return None if best is None else best.incumbent


#: Test-only: with this set to N, the driver SIGKILLs itself after N journal appends of one result, to
#: prove that a kill between them loses nothing (tests/test_faults.py). Never set it in a real run.
KILL_AFTER_APPENDS_ENV = "MERGETUNE_TEST_KILL_AFTER_APPENDS"


def _test_kill_hook() -> Callable[[], None] | None:
    """The test-only kill after ``KILL_AFTER_APPENDS_ENV`` appends (None, the normal case, when unset)."""
    limit = os.environ.get(KILL_AFTER_APPENDS_ENV)
    if not limit:
        return None
    appends = itertools.count(1)

    def kill_when_due() -> None:
        if next(appends) >= int(limit):
            os.kill(os.getpid(), signal.SIGKILL)

    return kill_when_due
