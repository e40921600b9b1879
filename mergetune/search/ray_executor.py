"""Ray executor: one resident actor per worker slot, scheduled asynchronously, faults survived.

Each actor wraps a plain ``Worker`` (mergetune.search.worker): it loads the models, the tokenised
validation data and the reference scores once, then only receives recipes and returns scores (no
weights travel per candidate, nothing is written per candidate). The base and the task vectors are
loaded once by the driver and put in Ray's object store: the actors of a node map the same
read-only copy (a node fetches it once), and a GPU actor copies it to its device.

Scheduling is asynchronous: ``results()`` waits (``ray.wait``) for *any* worker to finish and the
search loop then asks a new candidate for that slot at once; no one waits for a generation.

Faults: a worker that dies mid-candidate (killed process, lost node, an out-of-memory error) is
replaced, and its candidate is retried on a free worker up to ``max_attempts`` times in all, then
returned as failed. A candidate that raises an ordinary error (NaN scores, a bad recipe) is a
failed candidate, not a failed worker: no retry. When the cluster has lost the resources for a
replacement (a node gone), the executor goes on with fewer slots; with none left it raises.

Where it runs (``address``): None starts a local runtime owned by this executor (dashboard off,
stopped by ``close()``, and by a watchdog process if the driver is killed: see
mergetune.search.ray_watchdog); ``"auto"``, ``"HOST:PORT"`` or ``"ray://HOST:PORT"`` join an existing
cluster (left running). Ray 2.60 turns token authentication on for local clusters and resolves a
loopback node address to the machine's IP, so its gRPC servers listen on that IP with tokens
required: see the README's Ray section for clusters (``RAY_AUTH_MODE=token`` and a shared token).
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from mergetune.errors import MergetuneError
from mergetune.merging.modelset import ModelSet
from mergetune.merging.shared_scores import cache_folder, remove_stale_files
from mergetune.recipe import Recipe
from mergetune.search.executor import JobResult, describe_error
from mergetune.search.fidelity import Incumbent
from mergetune.search.ray_watchdog import RayWatchdog
from mergetune.search.worker import Evaluation, Split, Worker, WorkerSetup

log = logging.getLogger(__name__)
# Environment a worker process must see as the driver does (offline hub, caches, compile switch).
FORWARDED_ENV = ("MERGETUNE_", "HF_", "TRANSFORMERS_", "TORCHINDUCTOR_", "TOKENIZERS_PARALLELISM")


# Ray Client's proxy sometimes loses the per-client server it forks (ray-project/ray#63202: the child
# dies during fork; seen in about one of four two-node runs on a loaded 2-CPU machine). The proxy then
# reports it either way below: the child exited before it wrote a line, or its psutil lookup found a
# zombie. A new connection gets a new server, so this one failure is retried; every other error is
# raised as is.
TRANSIENT_CONNECT_ERRORS = ("Starting Ray client server failed", "ZombieProcess")
CONNECT_ATTEMPTS = 3
RELEASE_SECONDS = 10.0  # how long close() lets busy workers finish before they are killed


def retry_transient(connect: Callable[[], object], reset: Callable[[], object], pause: float = 2.0) -> None:
    """Call ``connect``; after a transient Ray Client failure, ``reset`` and try again (3 tries in all)."""
    for attempt in range(1, CONNECT_ATTEMPTS + 1):
        try:
            connect()
            return
        except Exception as error:  # Ray raises several types for this one failure
            seen = next((m for m in TRANSIENT_CONNECT_ERRORS if m in str(error)), None)
            if seen is None or attempt == CONNECT_ATTEMPTS:
                raise
            log.warning(
                "Ray Client: lost its server (%s; try %d of %d); connecting again", seen, attempt, CONNECT_ATTEMPTS
            )
            reset()
            time.sleep(pause)


@dataclass(frozen=True)
class RayOptions:
    """How the Ray executor runs (``SearchConfig.execution`` and ``mergetune search --executor ray``)."""

    address: str | None = None  # None: a local runtime; "auto" / "HOST:PORT" / "ray://HOST:PORT": join
    workers: int | None = None  # None: one per GPU, else one per `threads` CPUs of the cluster
    gpus_per_worker: float | None = None  # None: one per device (resources.devices) on cuda, else 0
    max_attempts: int = 3  # tries of a candidate whose worker died, in all
    share_modelset: bool = True  # load base + task vectors once, share them through the object store
    num_cpus: int | None = None  # CPUs of a local runtime (default: all)


@dataclass(frozen=True)
class Reply:
    """What an actor returns for one call (exceptions stay inside: a candidate error is data)."""

    evaluation: Evaluation | None
    error: str | None
    busy_seconds: float
    worker: str
    worker_fault: bool = False  # the worker itself is unwell (out of memory): replace it and retry


class WorkerActor:
    """The actor body: a plain class (testable without Ray), wrapped with ``ray.remote`` at run time."""

    def __init__(self, setup: WorkerSetup, modelset: ModelSet | None = None) -> None:
        self.worker = Worker(setup, modelset)
        node = _node_id()
        self.name = f"{self.worker.name}@{node[:8]}" if node else self.worker.name

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "pid": os.getpid(), "node": _node_id(), "residency": self.worker.residency}

    def evaluate(self, recipe: Recipe, split: Split, incumbent: Incumbent | None = None) -> Reply:
        start = time.perf_counter()
        try:
            evaluation = replace(self.worker.evaluate(recipe, split, incumbent), worker=self.name)
            return Reply(evaluation, None, time.perf_counter() - start, self.name)
        except (torch.OutOfMemoryError, MemoryError) as exc:
            return Reply(None, describe_error(exc), time.perf_counter() - start, self.name, worker_fault=True)
        except Exception as exc:  # a candidate that raises is a failed candidate
            return Reply(None, describe_error(exc), time.perf_counter() - start, self.name)

    def reference(self, split: Split) -> dict[str, float]:
        return self.worker.reference(split)

    def references(self, split: Split) -> dict[str, dict[str, float]]:
        return self.worker.references(split)

    def release(self) -> None:
        """Drop the worker (its merger, its maps of shared caches) before the actor is killed: the last actor of
        a node to let go of a shared cache file removes it (``shared_scores``)."""
        del self.worker
        gc.collect()


def _node_id() -> str:
    try:
        # ray: imported only when Ray is used (it is heavy; a local search never loads it)
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    except Exception:  # outside Ray
        return ""


@dataclass
class _Slot:
    index: int
    actor: Any
    busy: int | None = None  # call id
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Call:
    id: int
    recipe: Recipe
    split: Split
    job: int | None  # a search candidate's job number; None for score() calls
    incumbent: Incumbent | None = None  # what a search candidate races against (multi-fidelity)
    attempts: int = 0
    sent: float = 0.0
    received: float = 0.0
    failures: list[str] = field(default_factory=list)


class RayExecutor:
    """Candidates on Ray actors, behind the same interface as ``LocalExecutor``."""

    def __init__(self, setup: WorkerSetup, options: RayOptions | None = None) -> None:
        # ray: imported only when Ray is used (it is heavy; a local search never loads it)
        import ray

        self.setup = setup
        self.options = options or RayOptions()
        self._ray = ray
        self._owns_runtime = False
        self._watchdog: RayWatchdog | None = None
        self._connect()
        self._gpus = self._gpus_per_worker()
        self._actor_class = ray.remote(WorkerActor).options(
            num_cpus=setup.threads,
            num_gpus=self._gpus,
            max_restarts=0,  # replaced by this executor, which knows which candidate to retry
            runtime_env={"env_vars": _forwarded_env()},
        )
        self._cache_folder: Path | None = None  # where the actors of this machine share task-sized caches
        self._modelset_ref = self._share_modelset()
        count = self.options.workers or self._capacity()
        if count < 1:
            raise MergetuneError(f"the Ray cluster has no room for a worker ({self._per_worker()}): {self.resources()}")
        self._slots = [_Slot(i, self._new_actor()) for i in range(count)]
        self._wait_ready()
        self._ids = itertools.count()
        self._calls: dict[Any, _Call] = {}  # object ref -> call in flight
        self._backlog: deque[_Call] = deque()
        self._finished: dict[int, tuple[_Call, Reply | None]] = {}  # call id -> (call, reply or None: gave up)
        self.replaced = 0

    # ---- runtime ---------------------------------------------------------------------------------
    def _connect(self) -> None:
        ray = self._ray
        if ray.is_initialized():
            return  # a runtime this process already joined (tests, notebooks): use it, leave it running
        if self.options.address is None:
            ray.init(
                num_cpus=self.options.num_cpus,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
            )
            self._owns_runtime = True
            self._watchdog = RayWatchdog.start(_session_dir(ray))
        else:
            address = self.options.address
            retry_transient(
                lambda: ray.init(address=address, log_to_driver=False, configure_logging=False), ray.shutdown
            )

    def _gpus_per_worker(self) -> float:
        """GPUs reserved per actor: all of a worker's devices go to one actor, so Ray gives them together on one node
        (an actor is one process) and makes them its visible cuda:0..k-1 (what resources.devices then name)."""
        if self.options.gpus_per_worker is not None:
            return self.options.gpus_per_worker
        if not self.setup.device.startswith("cuda"):
            return 0.0
        return float(len(self.setup.devices)) if isinstance(self.setup.devices, tuple) else 1.0

    def _per_worker(self) -> str:
        return f"{self.setup.threads} CPU" + (f" + {self._gpus:g} GPU" if self._gpus else "") + " per worker"

    def resources(self) -> dict[str, float]:
        keep = ("CPU", "GPU", "memory", "object_store_memory")
        return {k: v for k, v in self._ray.cluster_resources().items() if k in keep}

    def _capacity(self) -> int:
        """Workers the cluster holds: one per GPU share on GPUs, else one per `threads` CPUs."""
        total = self._ray.cluster_resources()
        by_cpu = int(total.get("CPU", 0) // self.setup.threads)
        if self._gpus:
            return min(by_cpu, int(total.get("GPU", 0) // self._gpus))
        return by_cpu

    def _share_modelset(self) -> Any:
        if not self.options.share_modelset:
            return None
        # Filled once here in its tier: a host or device store in CPU memory, put in the object store (the actors
        # of a node map that one copy; a device-tier store is then copied to each actor's device), a disk store
        # as a file every actor maps (only its path goes through the object store).
        modelset = self.setup.load_modelset(stage_on_host=True)
        self._cache_folder = cache_folder(modelset)
        return self._ray.put(modelset)

    def _new_actor(self) -> Any:
        return self._actor_class.remote(self.setup, self._modelset_ref)

    def _wait_ready(self) -> None:
        """Block until every worker has loaded its state, so that a bad setup fails here, clearly."""
        try:
            infos = self._ray.get([s.actor.info.remote() for s in self._slots])
        except self._ray.exceptions.RayActorError as exc:
            self.close()
            raise MergetuneError(f"a Ray worker failed to start: {_cause(exc)}") from exc
        for slot, info in zip(self._slots, infos, strict=True):
            slot.info = info

    # ---- the executor interface -------------------------------------------------------------------
    @property
    def slots(self) -> int:
        return len(self._slots)

    def submit(self, job: int, recipe: Recipe, incumbent: Incumbent | None = None) -> None:
        self._enqueue(_Call(next(self._ids), recipe, "search", job, incumbent))

    def results(self) -> list[JobResult]:
        """Every finished search candidate; blocks until there is at least one (or none is in flight)."""
        while True:
            done = [cid for cid, (call, _) in self._finished.items() if call.job is not None]
            if done:
                return [self._job_result(*self._finished.pop(cid)) for cid in sorted(done)]
            if not any(c.job is not None for c in (*self._calls.values(), *self._backlog)):
                return []
            self._collect()

    def score(self, recipes: list[Recipe], split: Split) -> list[Evaluation]:
        calls = [_Call(next(self._ids), r, split, None) for r in recipes]
        for call in calls:
            self._enqueue(call)
        while not all(c.id in self._finished for c in calls):
            self._collect()
        evaluations = []
        for call in calls:
            _, reply = self._finished.pop(call.id)
            if reply is None or reply.evaluation is None:
                reason = reply.error if reply is not None else "; ".join(call.failures)
                raise MergetuneError(f"scoring a recipe on the {split} split failed: {reason}")
            evaluations.append(reply.evaluation)
        return evaluations

    def reference(self, split: Split) -> dict[str, float]:
        return self._ask_any("reference", split)

    def references(self, split: Split) -> dict[str, dict[str, float]]:
        return self._ask_any("references", split)

    def _ask_any(self, method: str, split: Split) -> Any:
        """One actor's answer to a reference question (all hold the same references); dead actors are replaced."""
        for slot in list(self._slots):
            try:
                return self._ray.get(getattr(slot.actor, method).remote(split))
            except self._ray.exceptions.RayActorError as exc:
                self._replace(slot, _cause(exc))
        raise MergetuneError("no Ray worker left to compute the reference scores")

    def describe(self) -> str:
        where = "local Ray runtime" if self._owns_runtime else f"Ray cluster {self.options.address or '(joined)'}"
        nodes = len({s.info.get("node") for s in self._slots if s.info})
        stores = sorted({s.info["residency"] for s in self._slots if s.info and "residency" in s.info})
        return (
            f"{where}: {self.slots} worker(s) on {nodes} node(s), {self._per_worker()}; "
            f"cluster resources {_format_resources(self.resources())}; {'; '.join(stores) or 'store not reported'}"
        )

    def workers(self) -> list[dict[str, Any]]:
        """Each slot's worker (name, pid, node) and the search job it is running, if any."""
        jobs = {c.id: c.job for c in self._calls.values()}
        return [{**s.info, "job": jobs.get(s.busy) if s.busy is not None else None} for s in self._slots]

    def close(self) -> None:
        slots = getattr(self, "_slots", [])
        with contextlib.suppress(Exception):  # an actor busy past the timeout, or dead, is killed all the same
            self._ray.get([slot.actor.release.remote() for slot in slots], timeout=RELEASE_SECONDS)
        for slot in slots:
            self._kill(slot.actor)
        self._slots = []
        if self._owns_runtime and self._ray.is_initialized():
            self._ray.shutdown()
        self._owns_runtime = False
        folder = getattr(self, "_cache_folder", None)  # absent when __init__ failed before it
        if folder is not None and folder.is_dir():  # what killed actors of this machine still held
            remove_stale_files(folder)
        if self._watchdog is not None:
            self._watchdog.stop()
            self._watchdog = None

    # ---- scheduling ------------------------------------------------------------------------------
    def _enqueue(self, call: _Call) -> None:
        self._backlog.append(call)
        self._dispatch()

    def _dispatch(self) -> None:
        for slot in self._slots:
            if not self._backlog:
                return
            if slot.busy is None:
                call = self._backlog.popleft()
                call.attempts += 1
                call.sent = time.perf_counter()
                slot.busy = call.id
                self._calls[slot.actor.evaluate.remote(call.recipe, call.split, call.incumbent)] = call

    def _collect(self) -> None:
        """Wait for at least one call to finish; handle every finished one (retries included)."""
        if not self._calls:
            if self._backlog and not self._slots:
                raise MergetuneError("every Ray worker is gone and none could be replaced")
            self._dispatch()
            return
        ready, rest = self._ray.wait(list(self._calls), num_returns=1)
        if rest:  # take every other finished call too
            more, _ = self._ray.wait(rest, num_returns=len(rest), timeout=0)
            ready += more
        for ref in ready:
            self._handle(ref)
        self._dispatch()

    def _handle(self, ref: Any) -> None:
        call = self._calls.pop(ref)
        call.received = time.perf_counter()
        slot = next(s for s in self._slots if s.busy == call.id)
        slot.busy = None
        try:
            reply: Reply = self._ray.get(ref)
        except (self._ray.exceptions.RayActorError, self._ray.exceptions.WorkerCrashedError) as exc:
            self._worker_lost(slot, call, _cause(exc))
            return
        except self._ray.exceptions.RayError as exc:  # e.g. the recipe could not be deserialised
            reply = Reply(None, describe_error(exc), 0.0, slot.info.get("name", ""))
        if reply.worker_fault:
            self._worker_lost(slot, call, reply.error or "worker fault")
            return
        self._finished[call.id] = (call, reply)

    def _worker_lost(self, slot: _Slot, call: _Call, reason: str) -> None:
        worker = slot.info.get("name", f"slot {slot.index}")
        call.failures.append(f"attempt {call.attempts} on {worker}: {reason}")
        log.warning("Ray worker %s lost during a candidate (%s); replacing it", worker, reason)
        self._replace(slot, reason)
        if call.attempts < self.options.max_attempts:
            self._backlog.appendleft(call)  # first in line for the next free worker
        else:
            self._finished[call.id] = (call, None)

    def _replace(self, slot: _Slot, reason: str) -> None:
        self._kill(slot.actor)
        self.replaced += 1
        if self.replaced > 3 * max(1, self.options.max_attempts) * max(1, len(self._slots)):
            raise MergetuneError(f"Ray workers keep dying ({self.replaced} replaced); last cause: {reason}")
        if len(self._slots) > self._capacity():  # the cluster lost the resources (a node): fewer slots
            self._slots.remove(slot)
            log.warning("the cluster has room for %d worker(s) now; going on with fewer", len(self._slots))
            return
        slot.actor = self._new_actor()  # loads in the background; calls queue on it meanwhile
        slot.info = {"name": f"slot {slot.index} (restarted)"}

    def _kill(self, actor: Any) -> None:
        with contextlib.suppress(Exception):  # already dead
            self._ray.kill(actor, no_restart=True)

    def _job_result(self, call: _Call, reply: Reply | None) -> JobResult:
        assert call.job is not None
        if reply is None:
            error = f"worker lost {call.attempts} time(s): " + "; ".join(call.failures)
            return JobResult(call.job, None, error=error, attempts=call.attempts)
        round_trip = call.received - call.sent
        return JobResult(
            call.job,
            reply.evaluation,
            error=reply.error,
            worker=reply.worker,
            queued_seconds=max(0.0, round_trip - reply.busy_seconds),
            attempts=call.attempts,
        )


def _session_dir(ray: Any) -> str:
    """The session folder of the runtime this process started: every process of the runtime logs into it."""
    return ray._private.worker._global_node.get_session_dir_path()  # no public API names it (Ray 2.60)


def _forwarded_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV)}


def _cause(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _format_resources(resources: dict[str, float]) -> str:
    parts = []
    for key, value in resources.items():
        shown = f"{value / 2**30:.1f} GiB" if key in ("memory", "object_store_memory") else f"{value:g}"
        parts.append(f"{key} {shown}")
    return ", ".join(parts)
