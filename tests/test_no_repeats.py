"""Nothing repeated: a resumed or extended search never evaluates a candidate it has a result for.

- Kills and a larger budget: a real ``mergetune search`` subprocess is killed with SIGKILL three times,
  resumed to the end of its budget, then given a larger ``--budget``. Each evaluated trial (one not
  marked ``reused_from``) has parameters of its own. Before the fix every new driver replayed the
  sampler's seeded sequence and evaluated the first driver's candidates again.
- A queued candidate (warm start, retry) equal to an evaluated one, or a failed one, is recorded with
  that trial's result and ``reused_from``, never sent to a worker; one equal to a candidate still
  being evaluated waits for that result. These drive the loop in-process with a real worker on the
  tiny zoo, behind an executor that counts what it is sent.
- A larger budget on a finished search evaluates new points only (nsga2 and gp, in-process); a fresh
  study keeps the config seed (a fresh seeded search is unchanged) and each resume gets a seed of its own.

(``zoo_env``, ``run_cli`` and ``trials_by_state``: conftest.)
"""

from __future__ import annotations

import json
import signal
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import run_cli, trials_by_state, write_search_config
from optuna.trial import FrozenTrial, TrialState

from mergetune.recipe import Recipe
from mergetune.search.config import SearchConfig
from mergetune.search.executor import LocalExecutor
from mergetune.search.loop import SearchLoop, continued_seed, open_search, resolve_models, worker_setup
from mergetune.search.worker import Worker

REUSED = "reused_from"  # the attribute the brief names, spelled out: the test does not trust the loop's constant
NAME = "tiny-test"


write_config = partial(write_search_config, name=NAME, selection={"rescore_top": 1})


def finished(journal: Path) -> list[FrozenTrial]:
    """Trials with a result: COMPLETE, or FAIL with a recorded evaluation error (as the budget counts them)."""
    states = trials_by_state(journal)
    failed = [t for t in states.get(TrialState.FAIL, []) if t.user_attrs.get("evaluated")]
    return sorted(states.get(TrialState.COMPLETE, []) + failed, key=lambda t: t.number)


def point(trial: FrozenTrial) -> str:
    return json.dumps(trial.params, sort_keys=True)


def assert_each_candidate_evaluated_once(trials: list[FrozenTrial]) -> None:
    """Evaluated trials have distinct parameters; a reused trial has its source's parameters and values."""
    evaluated = [t for t in trials if REUSED not in t.user_attrs]
    repeats = {}
    for t in evaluated:
        repeats.setdefault(point(t), []).append(t.number)
    assert [n for n in repeats.values() if len(n) > 1] == [], "parameters evaluated more than once"
    by_number = {t.number: t for t in evaluated}
    for t in trials:
        if REUSED in t.user_attrs:
            source = by_number[t.user_attrs[REUSED]]
            assert (point(t), t.values, t.state) == (point(source), source.values, source.state)


# ---- kills, resumes and a larger budget (real subprocesses) -----------------------------------------


def run_and_kill(cfg: Path, env: dict[str, str], cwd: Path, journal: Path, more: int) -> int:
    """Start a search, SIGKILL it once ``more`` further candidates have a result; return how many have one."""
    before = len(finished(journal)) if journal.exists() else 0
    proc = run_cli(["search", str(cfg)], env, cwd)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
        if journal.exists() and len(finished(journal)) >= before + more:
            break
    proc.send_signal(signal.SIGKILL)
    out = proc.communicate()[0]
    assert proc.returncode == -signal.SIGKILL, f"the search ended before it was killed:\n{out}"
    return len(finished(journal))


def run_to_end(args: list[str], env: dict[str, str], cwd: Path) -> None:
    proc = run_cli(["search", *args], env, cwd)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out


@pytest.mark.parametrize("optimizer", ["tpe", "random"])  # nsga2 and gp: in-process below (five drivers each is slow)
def test_kills_resumes_and_a_larger_budget_evaluate_each_candidate_once(
    tmp_path: Path, zoo_env: dict[str, str], optimizer: str
) -> None:
    budget, extended = 20, 26
    cfg = write_config(tmp_path / "c.yaml", optimizer={"name": optimizer}, budget={"candidates": budget})
    journal = tmp_path / "run" / "search.journal"
    for _ in range(3):
        done = run_and_kill(cfg, zoo_env, tmp_path, journal, more=3)
    assert done < budget, "the third driver should be killed mid-search"
    run_to_end([str(cfg)], zoo_env, tmp_path)
    assert len(finished(journal)) == budget
    run_to_end([str(cfg), "--budget", str(extended)], zoo_env, tmp_path)

    trials = finished(journal)
    assert len(trials) == extended  # nothing lost: every candidate of the budget has a result
    assert_each_candidate_evaluated_once(trials)
    # Not by reuse: each driver's sampler drew new points (a replayed sequence would be reused here instead).
    assert [t.number for t in trials if REUSED in t.user_attrs] == []
    assert TrialState.RUNNING not in trials_by_state(journal)


# ---- reuse, driven in-process ------------------------------------------------------------------------


class CountingExecutor(LocalExecutor):
    """The in-process worker behind ``slots`` slots, counting the candidates it is sent to evaluate.

    ``results()`` still evaluates one candidate at a time: with two slots the second one is pending meanwhile.
    """

    def __init__(self, worker: Worker, slots: int) -> None:
        super().__init__(worker=worker)
        self._slots = slots
        self.evaluated: list[int] = []

    @property
    def slots(self) -> int:
        return self._slots

    def submit(self, job: int, recipe: Recipe) -> None:
        self.evaluated.append(job)
        super().submit(job, recipe)


@pytest.fixture
def config(tmp_path: Path, zoo_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> SearchConfig:
    """A tiny search without warm starts, its zoo in the session's private cache."""
    for key, value in zoo_env.items():
        monkeypatch.setenv(key, value)
    cfg = write_config(tmp_path / "c.yaml", warm_start=False, budget={"candidates": 2})
    return SearchConfig.load(cfg)


def open_counting(config: SearchConfig, budget: int, slots: int = 1) -> tuple[SearchLoop, CountingExecutor]:
    config = config.updated("budget", candidates=budget)
    executor = CountingExecutor(Worker(worker_setup(config, resolve_models(config))), slots)
    return open_search(config, executor=executor), executor


def numpy_floats(params: dict[str, Any]) -> dict[str, Any]:
    """The point with NumPy floats, as an external optimizer gives them: the same candidate as Python floats."""
    return {k: np.float64(v) if isinstance(v, float) else v for k, v in params.items()}


def ta_point(loop: SearchLoop, weight: float) -> dict[str, Any]:
    """A Task Arithmetic point of the loop's space (NumPy floats)."""
    recipe = Recipe(base=loop.space.base, experts=loop.space.experts, method="task_arithmetic", weight=weight)
    return numpy_floats(loop.space.from_recipe(recipe))


def test_queued_candidates_equal_to_an_evaluated_one_reuse_its_result(config: SearchConfig) -> None:
    first, executor = open_counting(config, budget=2)
    first.run()
    assert executor.evaluated == [0, 1]
    source = first.study.trials[0]

    loop, executor = open_counting(config, budget=4)
    loop.study.enqueue_trial(dict(source.params), user_attrs={"warm_start": True})
    loop.study.enqueue_trial(numpy_floats(source.params))
    loop.run()

    assert executor.evaluated == []  # both queued candidates had a result already
    trials = loop.study.trials
    assert len(trials) == 4 and [t.user_attrs.get(REUSED) for t in trials[2:]] == [0, 0]
    copied = ("recipe", "scores", "normalized", "metrics", "mean_density", "feasible", "worker")
    for t in trials[2:]:
        assert t.state is TrialState.COMPLETE and t.values == source.values and t.params == source.params
        assert {k: t.user_attrs.get(k) for k in copied} == {k: source.user_attrs.get(k) for k in copied}
        assert t.constraints == source.constraints
        assert "merge" not in t.user_attrs["timing"] and "eval" not in t.user_attrs["timing"]  # nothing evaluated
    assert trials[2].user_attrs.get("warm_start") is True  # the trial's own provenance stays


def test_a_candidate_equal_to_a_failed_one_is_recorded_failed(config: SearchConfig) -> None:
    loop, executor = open_counting(config, budget=3)
    params = ta_point(loop, 0.4)
    loop.study.enqueue_trial(params)
    planted = loop.study.ask()  # a candidate whose evaluation failed (with its error recorded)
    loop.space.suggest(planted)
    planted.set_user_attr("error", "RuntimeError: planted failure")
    planted.set_user_attr("evaluated", True)
    loop.study.tell(planted, state=TrialState.FAIL)
    loop.study.enqueue_trial(params, user_attrs={"retry_of": 7})
    loop.run()

    retry = loop.study.trials[1]
    assert retry.state is TrialState.FAIL and retry.user_attrs[REUSED] == 0
    assert retry.user_attrs["error"] == "RuntimeError: planted failure" and retry.user_attrs["retry_of"] == 7
    assert executor.evaluated == [2]  # the retry took the failure; only the budget's last candidate was evaluated


def test_a_candidate_equal_to_one_being_evaluated_waits_for_its_result(config: SearchConfig) -> None:
    loop, executor = open_counting(config, budget=3, slots=2)
    params = ta_point(loop, 0.7)
    loop.study.enqueue_trial(params)
    loop.study.enqueue_trial(params)
    loop.run()

    trials = loop.study.trials
    assert executor.evaluated == [0, 2]  # trial 1 was never sent: it waited for trial 0's result
    assert trials[1].user_attrs.get(REUSED) == 0 and trials[1].values == trials[0].values
    assert_each_candidate_evaluated_once(trials)


@pytest.mark.parametrize("optimizer", ["nsga2", "gp"])
def test_a_larger_budget_evaluates_new_points(config: SearchConfig, optimizer: str) -> None:
    """A second driver on a finished search draws new points (NSGA-II's first generation and GP's random
    start used to replay the first driver's): every one of them is evaluated, none is a reuse."""
    config = config.updated("optimizer", name=optimizer)
    open_counting(config, budget=3)[0].run()
    loop, executor = open_counting(config, budget=6)
    loop.run()

    assert executor.evaluated == [3, 4, 5]
    assert_each_candidate_evaluated_once(loop.study.trials)


# ---- the seed of a resumed sampler --------------------------------------------------------------------


def test_a_fresh_study_keeps_the_config_seed_and_each_resume_gets_its_own() -> None:
    assert continued_seed(7, 0) == 7 and continued_seed(0, 0) == 0
    resumed = [continued_seed(7, prior) for prior in (1, 5, 12, 40)]
    assert len(set(resumed)) == 4 and 7 not in resumed
    assert resumed == [continued_seed(7, prior) for prior in (1, 5, 12, 40)]  # reproducible
    assert all(0 <= s < 2**32 for s in resumed)  # a valid NumPy seed
