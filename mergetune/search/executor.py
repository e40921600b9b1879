"""Executors run candidates on workers; the search loop sees only this interface.

``submit(job, recipe, incumbent)`` hands a candidate to a free slot (with the incumbent it races
against when multi-fidelity is on, see ``fidelity``); ``results()`` blocks until at least one
finished candidate is available and returns every finished one (asynchronous: the loop asks a new
candidate for each free slot at once, no one waits for a generation). A candidate whose evaluation
raises comes back with its error: the loop records it as failed and goes on.

``LocalExecutor`` runs one in-process worker (tests, small runs, the demo). The Ray executor
(mergetune.search.ray_executor) implements the same interface with one actor per slot.
"""

from __future__ import annotations

import traceback
from collections import deque
from dataclasses import dataclass
from typing import Protocol

from mergetune.recipe import Recipe
from mergetune.search.fidelity import Incumbent
from mergetune.search.worker import Evaluation, Split, Worker, WorkerSetup


@dataclass(frozen=True)
class JobResult:
    job: int
    evaluation: Evaluation | None
    error: str | None = None
    worker: str = ""
    queued_seconds: float = 0.0  # submit to result back, less the worker's own time (executor overhead)
    attempts: int = 1  # > 1: the candidate was retried after its worker died


class Executor(Protocol):
    @property
    def slots(self) -> int: ...

    def submit(self, job: int, recipe: Recipe, incumbent: Incumbent | None = None) -> None: ...

    def results(self) -> list[JobResult]: ...

    def score(self, recipes: list[Recipe], split: Split) -> list[Evaluation]:
        """Score recipes on a split (finalists on the held-out part, the chosen one on test)."""
        ...

    def reference(self, split: Split) -> dict[str, float]: ...

    def references(self, split: Split) -> dict[str, dict[str, float]]: ...

    def describe(self) -> str: ...

    def close(self) -> None: ...


class LocalExecutor:
    """One resident worker in this process; ``results()`` runs the oldest submitted candidate."""

    def __init__(self, setup: WorkerSetup | None = None, worker: Worker | None = None) -> None:
        if worker is None:
            if setup is None:
                raise ValueError("give a WorkerSetup or a Worker")
            worker = Worker(setup)
        self.worker = worker
        self._queue: deque[tuple[int, Recipe, Incumbent | None]] = deque()

    @property
    def slots(self) -> int:
        return 1

    def submit(self, job: int, recipe: Recipe, incumbent: Incumbent | None = None) -> None:
        self._queue.append((job, recipe, incumbent))

    def results(self) -> list[JobResult]:
        if not self._queue:
            return []
        job, recipe, incumbent = self._queue.popleft()
        try:
            return [JobResult(job, self.worker.evaluate(recipe, "search", incumbent), worker=self.worker.name)]
        except Exception as exc:  # a candidate that raises is a failed trial, not a failed search
            return [JobResult(job, None, error=describe_error(exc), worker=self.worker.name)]

    def score(self, recipes: list[Recipe], split: Split) -> list[Evaluation]:
        return [self.worker.evaluate(r, split) for r in recipes]

    def reference(self, split: Split) -> dict[str, float]:
        return self.worker.reference(split)

    def references(self, split: Split) -> dict[str, dict[str, float]]:
        return self.worker.references(split)

    def describe(self) -> str:
        return f"local executor, 1 in-process worker ({self.worker.name}); {self.worker.residency}"

    def close(self) -> None:
        self._queue.clear()


def describe_error(exc: BaseException) -> str:
    last = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    where = f" (at {last[0].filename}:{last[0].lineno})" if last else ""
    return f"{type(exc).__name__}: {exc}{where}"
