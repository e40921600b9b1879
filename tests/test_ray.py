"""The Ray executor on a real local Ray runtime (no mocks), with the real tiny zoo.

- ``mergetune search --executor ray`` end to end in a subprocess, and no Ray process left behind;
- that driver killed with SIGKILL mid-search: within 10 s no process of its Ray runtime is left
  (mergetune.search.ray_watchdog); restarted: exactly its budget of candidates;
- two Ray workers give the same scores as the in-process LocalExecutor for the same candidates;
- a worker over two devices (``resources.devices``, CPU entries here) in one actor scores like a one-device one;
- a worker killed (SIGKILL to its PID) while it holds a candidate: the candidate is retried on
  another worker, the worker replaced, and the search stores exactly its budget of candidates;
  with ``max_attempts=1`` the candidate is failed with the reason instead;
- a two-node cluster simulated with ``ray.cluster_utils.Cluster``, joined through a ``ray://``
  client address, runs workers on both nodes.

The first test starts its own runtime in a subprocess before this module starts one in-process
(``ray_runtime``, module scope, 2 CPUs), so that its process count sees no other runtime.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from conftest import run_cli, trials_by_state
from optuna.trial import TrialState
from test_fidelity import FIRST, expert_incumbent

from mergetune.merging.shared_scores import PREFIX as SHARED_PREFIX
from mergetune.recipe import Recipe
from mergetune.search.config import SearchConfig
from mergetune.search.executor import JobResult, LocalExecutor
from mergetune.search.fidelity import FidelitySettings
from mergetune.search.loop import open_search, resolve_models, worker_setup
from mergetune.search.ray_executor import TRANSIENT_CONNECT_ERRORS, RayExecutor, RayOptions, retry_transient
from mergetune.search.worker import WorkerSetup


def search_config(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "name": "tiny-test",
        "models": {"zoo": "tiny"},
        "space": {"methods": ["task_arithmetic", "ties", "dare_ties"], "weight": {"per": "task"}},
        "budget": {"candidates": 8},
        "selection": {"rescore_top": 2},
        "output": str(tmp_path / "run"),
    }
    config.update(overrides)
    return config


def descendants(root: int) -> set[int]:
    """Every process started, directly or not, by ``root`` (from the parent pids ``ps`` shows now)."""
    out = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True, check=True).stdout
    children: dict[int, list[int]] = {}
    for line in out.splitlines():
        pid, ppid = map(int, line.split())
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pids: set[int]) -> set[int]:
    """Those of ``pids`` still running (a zombie has ended: only its exit status is left to reap)."""
    out = subprocess.run(["ps", "-eo", "pid=,stat="], capture_output=True, text=True, check=True).stdout
    running = {int(pid) for pid, stat in (line.split() for line in out.splitlines()) if not stat.startswith("Z")}
    return pids & running


def workers_of(journal: Path) -> set[str]:
    return {t.user_attrs["worker"] for t in trials_by_state(journal)[TrialState.COMPLETE]}


def test_cli_search_on_a_local_ray_runtime_leaves_no_process_behind(tmp_path: Path, zoo_env: dict[str, str]) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(search_config(tmp_path)))
    proc = run_cli(["search", str(path), "--executor", "ray", "--workers", "2"], zoo_env, tmp_path)
    # The driver's own runtime, gathered while it runs: another test (or user) may run Ray on this machine
    # at the same time, so "every Ray process on the machine" would blame this search for theirs.
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.append(proc.communicate(timeout=300)[0]))
    reader.start()
    runtime: set[int] = set()
    while reader.is_alive():
        runtime |= descendants(proc.pid)
        time.sleep(0.3)
    out = output[0]
    assert proc.returncode == 0, out
    assert "local Ray runtime: 2 worker(s) on 1 node(s)" in out
    assert len(runtime) >= 4, runtime  # GCS, raylet and two workers at least
    journal = tmp_path / "run" / "search.journal"
    assert len(trials_by_state(journal)[TrialState.COMPLETE]) == 8
    assert len(workers_of(journal)) == 2  # both workers evaluated candidates
    assert (tmp_path / "run" / "chosen" / "recipe.yaml").is_file()
    deadline = time.time() + 30
    while alive(runtime) and time.time() < deadline:
        time.sleep(0.5)  # ray.shutdown() has returned; the OS reaps the last processes
    assert not alive(runtime), f"processes of the search's Ray runtime left behind: {alive(runtime)}"


def test_a_killed_ray_driver_resumes_from_storage(tmp_path: Path, zoo_env: dict[str, str]) -> None:
    budget = 12  # killed after 4 results, two workers: 8 candidates are left for the resumed driver
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(search_config(tmp_path, budget={"candidates": budget})))
    args = ["search", str(path), "--executor", "ray", "--workers", "2"]
    journal = tmp_path / "run" / "search.journal"
    proc = run_cli(args, zoo_env, tmp_path)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
        if journal.exists() and len(trials_by_state(journal).get(TrialState.COMPLETE, [])) >= 4:
            break
    runtime = descendants(proc.pid)  # its local Ray runtime (GCS, raylet, agents, workers) and its watchdog
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = time.time()
    assert len(runtime) >= 4, runtime
    while alive(runtime) and time.time() < killed_at + 10:
        time.sleep(0.2)
    # before the watchdog, Ray's dashboard and runtime-env agents lingered 60-120 s after the driver's death
    assert not alive(runtime), f"processes of the killed driver's Ray runtime still run 10 s later: {alive(runtime)}"
    done_before = {t.number: t.values for t in trials_by_state(journal)[TrialState.COMPLETE]}
    assert 4 <= len(done_before) < budget, "the driver should be killed mid-search"
    resumed = run_cli(args, zoo_env, tmp_path)
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    complete = trials_by_state(journal)[TrialState.COMPLETE]
    assert len(complete) == budget  # nothing lost, nothing evaluated twice
    assert {t.number: t.values for t in complete if t.number in done_before} == done_before


@pytest.fixture(scope="module")
def ray_runtime(zoo_env: dict[str, str]) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        for key, value in zoo_env.items():
            patch.setenv(key, value)  # the executor forwards MERGETUNE_* to its workers
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        try:
            yield
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def tiny_setup(ray_runtime: None, tmp_path_factory: pytest.TempPathFactory) -> WorkerSetup:
    out = tmp_path_factory.mktemp("setup")
    config = SearchConfig.model_validate(search_config(out))
    return worker_setup(config, resolve_models(config))


def candidates(setup: WorkerSetup) -> list[Recipe]:
    base = {"base": setup.base, "experts": [{"name": t, "model": p} for t, p in setup.experts.items()]}
    tasks = list(setup.experts)
    return [
        Recipe(**base, method="task_arithmetic", weight=0.3),
        Recipe(**base, method="task_arithmetic", weight={tasks[0]: 0.8, "*": 0.2}),
        Recipe(**base, method="ties", weight=1.0, density=0.2),
        Recipe(**base, method="ties", weight=0.7, density={tasks[1]: 0.6, "*": 0.3}),
        Recipe(**base, method="dare_ties", weight=1.0, density=0.5, seed=3),
    ]


def run_all(executor: RayExecutor, recipes: list[Any]) -> list[JobResult]:
    """Submit every recipe (job = its index) and wait for all their results."""
    for job, recipe in enumerate(recipes):
        executor.submit(job, recipe)
    results: list[JobResult] = []
    while len(results) < len(recipes):
        results += executor.results()
    return results


def test_two_ray_workers_score_like_the_local_executor(tiny_setup: WorkerSetup) -> None:
    recipes = candidates(tiny_setup)
    local = LocalExecutor(tiny_setup)
    expected = [local.worker.evaluate(r) for r in recipes]
    executor = RayExecutor(tiny_setup, RayOptions(workers=2))
    try:
        results = run_all(executor, recipes)
        assert executor.results() == []  # nothing in flight: returns at once
        by_job = {r.job: r for r in results}
        for job, want in enumerate(expected):
            got = by_job[job].evaluation
            assert got is not None, by_job[job].error
            assert got.scores == want.scores and got.normalized == want.normalized
        assert len({r.worker for r in results}) == 2
        assert executor.reference("search") == local.reference("search")
        finalists = executor.score(recipes[:2], "holdout")
        assert [e.scores for e in finalists] == [local.worker.evaluate(r, "holdout").scores for r in recipes[:2]]
    finally:
        executor.close()


def _shared_cache_maps(pid: int) -> set[tuple[str, str]]:
    """(inode, path) of the shared task-sized cache files process ``pid`` maps (``/proc/<pid>/maps``)."""
    found = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and Path(fields[5]).name.startswith(SHARED_PREFIX):
            found.add((fields[4], fields[5]))
    return found


@pytest.mark.skipif(
    not (Path("/proc/self/maps").is_file() and os.access("/dev/shm", os.W_OK)),
    reason="reads the workers' maps from /proc and needs /dev/shm (Linux)",
)
def test_two_ray_workers_of_a_node_compute_pcb_beta_once_and_map_one_copy(tiny_setup: WorkerSetup) -> None:
    """PCB's β is as large as the task vectors: the two actors of this node map one file of it and of its bucket
    counts (shared memory), score as the local executor does, and the files are gone once the executor is
    closed."""
    base = {"base": tiny_setup.base, "experts": [{"name": t, "model": p} for t, p in tiny_setup.experts.items()]}
    recipes = [Recipe(**base, method="pcb", weight=w, density=d) for w, d in ((1.0, 0.2), (0.6, 0.5), (0.8, 0.3))]
    local = LocalExecutor(tiny_setup)
    expected = [local.worker.evaluate(r).scores for r in recipes]
    executor = RayExecutor(tiny_setup, RayOptions(workers=2))
    try:
        results = sorted(run_all(executor, recipes), key=lambda r: r.job)
        assert [r.evaluation.scores if r.evaluation else r.error for r in results] == expected
        assert len({r.worker for r in results}) == 2  # both actors merged PCB
        maps = [_shared_cache_maps(w["pid"]) for w in executor.workers()]
        # β, and the bucket counts of |τ| (PCB's clip bounds) and of β: the same files (inodes) in both
        assert len(maps[0]) == 3 and maps[0] == maps[1]
    finally:
        executor.close()
    assert not any(Path(path).exists() for _, path in maps[0])


def test_a_ray_worker_over_two_devices_scores_like_a_local_one_device_worker(tiny_setup: WorkerSetup) -> None:
    """The placed worker in a Ray actor: the driver's shared store is split there; the scores are the plain ones."""
    recipes = candidates(tiny_setup)[:3]
    plain = LocalExecutor(tiny_setup)
    expected = [plain.worker.evaluate(r) for r in recipes]
    executor = RayExecutor(dataclasses.replace(tiny_setup, devices=("cpu", "cpu")), RayOptions(workers=1))
    try:
        results = run_all(executor, recipes)
        for result in results:
            assert result.evaluation is not None, result.error
            assert result.evaluation.scores == expected[result.job].scores
        assert "device map: 0:cpu ← embed" in executor.describe()
    finally:
        executor.close()


def test_a_ray_worker_stops_a_clearly_worse_candidate_as_the_local_worker_does(tiny_setup: WorkerSetup) -> None:
    """Multi-fidelity races run in the worker: the Ray actor gets the incumbent with the candidate (it has no
    study) and stops the base (λ = 0) against an expert-level incumbent after the first slice, as locally."""
    setup = dataclasses.replace(tiny_setup, fidelity=FidelitySettings((0.25, 0.5, 1.0), 0.05))
    local = LocalExecutor(setup)
    incumbent = expert_incumbent(local.worker)
    experts = [{"name": t, "model": p} for t, p in setup.experts.items()]
    base = Recipe(base=setup.base, experts=experts, method="task_arithmetic", weight=0.0)
    expected = local.worker.evaluate(base, "search", incumbent)
    executor = RayExecutor(setup, RayOptions(workers=1))
    try:
        executor.submit(0, base, incumbent)
        results: list[JobResult] = []
        while not results:
            results = executor.results()
    finally:
        executor.close()
    got = results[0].evaluation
    assert got is not None, results[0].error
    assert got.stopped and got.fidelity is not None and got.fidelity["stage"] == 1
    assert got.fidelity["examples"] == dict.fromkeys(setup.experts, FIRST)
    assert got.scores == expected.scores and got.fidelity == expected.fidelity


class KillOnSubmit:
    """The real Ray executor; at the chosen submissions, SIGKILL the worker just handed the candidate.

    A candidate takes tens of milliseconds at least, so the worker dies holding it."""

    def __init__(self, executor: RayExecutor, kill_jobs: set[int]) -> None:
        self.executor = executor
        self.kill_jobs = kill_jobs
        self.killed: dict[int, int] = {}  # job -> pid

    def submit(self, job: int, recipe: Recipe) -> None:
        self.executor.submit(job, recipe)
        if job in self.kill_jobs:
            (holder,) = [w for w in self.executor.workers() if w["job"] == job]
            os.kill(holder["pid"], signal.SIGKILL)
            self.killed[job] = holder["pid"]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.executor, name)


def test_a_worker_killed_mid_candidate_is_survived(tiny_setup: WorkerSetup, tmp_path: Path) -> None:
    config = SearchConfig.model_validate(search_config(tmp_path, execution={"executor": "ray", "workers": 2}))
    executor = KillOnSubmit(RayExecutor(tiny_setup, RayOptions(workers=2)), kill_jobs={3})
    loop = open_search(config, executor=executor)  # type: ignore[arg-type]
    try:
        loop.run()
        assert executor.replaced == 1 and executor.slots == 2  # the dead worker was replaced
    finally:
        loop.close()
    states = trials_by_state(tmp_path / "run" / "search.journal")
    complete = states[TrialState.COMPLETE]
    assert len(complete) == 8 and set(states) == {TrialState.COMPLETE}  # nothing lost, nothing failed
    (retried,) = [t for t in complete if t.user_attrs.get("attempts")]
    assert retried.number == 3 and retried.user_attrs["attempts"] == 2
    assert f":{executor.killed[3]}@" not in retried.user_attrs["worker"]  # finished by another process


def test_a_candidate_whose_worker_dies_too_often_is_failed(tiny_setup: WorkerSetup) -> None:
    recipe = candidates(tiny_setup)[0]
    executor = RayExecutor(tiny_setup, RayOptions(workers=2, max_attempts=1))
    try:
        killer = KillOnSubmit(executor, kill_jobs={0})
        killer.submit(0, recipe)
        (lost,) = executor.results()
        assert lost.evaluation is None and lost.attempts == 1
        assert lost.error is not None and "worker lost 1 time(s)" in lost.error
        executor.submit(1, recipe)  # the search goes on, on the replacement or the other worker
        (ok,) = executor.results()
        assert ok.evaluation is not None and ok.job == 1
    finally:
        executor.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_node_cluster_joined_through_ray_client_runs_a_worker_on_each_node(
    tmp_path: Path, zoo_env: dict[str, str]
) -> None:
    from ray.cluster_utils import Cluster

    port = free_port()
    head = {"num_cpus": 1, "include_dashboard": False, "ray_client_server_port": port}
    cluster = Cluster(initialize_head=True, connect=False, head_node_args=head)
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump(search_config(tmp_path, budget={"candidates": 6})))
        args = ["search", str(path), "--executor", "ray", "--address", f"ray://127.0.0.1:{port}"]
        proc = run_cli(args, zoo_env, tmp_path)
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out
        assert "2 worker(s) on 2 node(s)" in out
        journal = tmp_path / "run" / "search.journal"
        assert len(trials_by_state(journal)[TrialState.COMPLETE]) == 6
        nodes = {worker.rpartition("@")[2] for worker in workers_of(journal)}
        assert len(nodes) == 2  # candidates ran on both nodes
    finally:
        cluster.shutdown()


class FlakyConnect:
    """A connection that fails with the given messages first, then succeeds."""

    def __init__(self, *failures: str) -> None:
        self.failures = list(failures)
        self.calls = self.resets = 0

    def connect(self) -> None:
        self.calls += 1
        if self.failures:
            raise ConnectionError(self.failures.pop(0))

    def reset(self) -> None:
        self.resets += 1


# Both ways Ray Client's proxy reports a lost per-client server, as seen here (the second in a CI run, abridged)
LOST_SERVER = (
    "Initialization failure from server: RuntimeError: Starting Ray client server failed. See logs",
    'Initialization failure from server:\nTraceback (most recent call last):\n  File ".../proxier.py", line 396, in '
    "start_specific_server\n    cmd = psutil_proc.cmdline()\npsutil.ZombieProcess: PID still exists but it's a zombie "
    "(pid=23449)",
)


@pytest.mark.parametrize("transient", LOST_SERVER, ids=["exited", "zombie"])
def test_a_lost_ray_client_server_is_retried_and_other_connection_errors_are_not(transient: str) -> None:
    assert sum(m in transient for m in TRANSIENT_CONNECT_ERRORS) == 1
    flaky = FlakyConnect(transient, transient)
    retry_transient(flaky.connect, flaky.reset, pause=0)
    assert (flaky.calls, flaky.resets) == (3, 2)
    always = FlakyConnect(transient, transient, transient)
    with pytest.raises(ConnectionError, match="Initialization failure"):
        retry_transient(always.connect, always.reset, pause=0)
    assert always.calls == 3
    refused = FlakyConnect("Connection refused", transient)
    with pytest.raises(ConnectionError, match="refused"):
        retry_transient(refused.connect, refused.reset, pause=0)
    assert (refused.calls, refused.resets) == (1, 0)
