"""Several drivers on one study: a live driver's RUNNING trials are never taken for interrupted ones.

Unit tests plant drivers' heartbeat records in a real storage and check what ``recover_interrupted``
recovers. In-process tests run a real search loop on the tiny zoo in SQLite while another driver
(a second storage handle on the same database, running the real recovery) takes this one for gone
at a chosen moment: right after an ask, or after an evaluation was saved and before it is recorded.
The end-to-end tests run two real ``mergetune search`` subprocesses on one study in SQLite and in a
real PostgreSQL server started here (skipped, with the reason, if it cannot start), and two on one
journal file, where the second is refused in one line.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import run_cli
from optuna.trial import TrialState

from mergetune.search import loop as loop_module
from mergetune.search.config import SearchConfig
from mergetune.search.drivers import DRIVER_ATTR, DRIVERS_PREFIX, HEARTBEAT_ENV
from mergetune.search.loop import SearchLoop, open_search
from mergetune.search.saved_evaluation import SavedEvaluation, evaluation_path, record_evaluation
from mergetune.search.storage import RETRY_ATTR, Recovery, open_storage, recover_interrupted

GRACE = 30.0
STUDY = "tiny-test"


# ---- recovery with planted drivers -------------------------------------------------------------------------
def plant_driver(
    study: optuna.Study, driver: str, *, host: str, pid: int, beat_age: float, stopped: bool = False
) -> None:
    now = time.time()
    record = {"host": host, "pid": pid, "started": now - 100, "beat": now - beat_age, "stopped": stopped}
    study.set_user_attr(DRIVERS_PREFIX + driver, record)


def running_trial(study: optuna.Study, driver: str | None, x: float) -> optuna.Trial:
    study.enqueue_trial({"x": x})
    trial = study.ask()
    trial.suggest_float("x", 0, 1)
    if driver is not None:
        trial.set_user_attr(DRIVER_ATTR, driver)
    return trial


def dead_pid() -> int:
    """The pid of a real process that has exited (and been reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.fixture
def study(tmp_path: Path) -> optuna.Study:
    return optuna.create_study(study_name="s", storage=open_storage(tmp_path / "j.journal"))


def test_recovery_leaves_a_live_drivers_running_trial_alone(study: optuna.Study, tmp_path: Path) -> None:
    plant_driver(study, "alive", host="other-host", pid=1, beat_age=1)
    trial = running_trial(study, "alive", 0.5)
    recovery = recover_interrupted(study, tmp_path, grace=GRACE)
    assert recovery.requeued == [] and recovery.running_elsewhere == [trial.number]
    assert [t.state for t in study.trials] == [TrialState.RUNNING]
    study.tell(trial, 1.0)  # the live driver's tell still works: nothing finished its trial under it


def test_recovery_does_not_record_a_live_drivers_saved_evaluation(study: optuna.Study, tmp_path: Path) -> None:
    plant_driver(study, "alive", host="other-host", pid=1, beat_age=1)
    trial = running_trial(study, "alive", 0.5)
    frozen = study.trials[trial.number]
    SavedEvaluation("s", trial.number, frozen.params, "COMPLETE", [0.7], {"k": 1}).save(tmp_path)
    recovery = recover_interrupted(study, tmp_path, grace=GRACE)
    assert recovery.completed == [] and study.trials[0].state is TrialState.RUNNING


@pytest.mark.parametrize(
    "host_pid_age_stopped",
    [("other-host", 1, 10 * GRACE, False), ("this-host", "dead", 1, False), ("other-host", 1, 1, True)],
    ids=["stale-heartbeat", "dead-pid-on-this-host", "said-it-stopped"],
)
def test_recovery_requeues_the_running_trials_of_a_gone_driver(
    study: optuna.Study, tmp_path: Path, host_pid_age_stopped: tuple[str, int | str, float, bool]
) -> None:
    host, pid, age, stopped = host_pid_age_stopped
    host = socket.gethostname() if host == "this-host" else host
    pid = dead_pid() if pid == "dead" else int(pid)
    plant_driver(study, "gone", host=host, pid=pid, beat_age=age, stopped=stopped)
    trial = running_trial(study, "gone", 0.25)
    recovery = recover_interrupted(study, tmp_path, grace=GRACE)
    assert recovery.requeued == [trial.number] and recovery.running_elsewhere == []
    states = [t.state for t in study.trials]
    assert states == [TrialState.FAIL, TrialState.WAITING]
    requeued = study.trials[1]
    assert requeued.user_attrs[RETRY_ATTR] == trial.number and requeued.system_attrs["fixed_params"] == {"x": 0.25}


def test_recovery_treats_a_trial_without_driver_mark_as_before(study: optuna.Study, tmp_path: Path) -> None:
    """From a driver without heartbeats (an older run), with no driver alive: interrupted, re-queued."""
    trial = running_trial(study, None, 0.75)
    recovery = recover_interrupted(study, tmp_path, grace=GRACE)
    assert recovery.requeued == [trial.number]


def test_an_unmarked_trial_just_asked_is_left_to_another_live_driver_not_to_the_resuming_one(
    study: optuna.Study, tmp_path: Path
) -> None:
    """The resuming driver ("me") beats already but has asked nothing: it never owns an unmarked trial.

    Another live driver may have asked one a moment ago and not marked it yet: that one is left alone.
    """
    plant_driver(study, "me", host=socket.gethostname(), pid=os.getpid(), beat_age=1)
    trial = running_trial(study, None, 0.75)
    assert recover_interrupted(study, tmp_path, grace=GRACE, me="me").requeued == [trial.number]

    plant_driver(study, "other", host="other-host", pid=1, beat_age=1)
    other = running_trial(study, None, 0.5)
    recovery = recover_interrupted(study, tmp_path, grace=GRACE, me="me")
    assert recovery.requeued == [] and recovery.running_elsewhere == [other.number]


def test_a_trial_cut_before_its_first_suggest_is_requeued_with_the_point_it_was_queued_with(
    study: optuna.Study, tmp_path: Path
) -> None:
    """Cut between the ask and the suggest: a queued point (warm start, retry, proposal) is queued again as it
    was; a trial the sampler had not drawn yet is queued with no point (drawn afresh), not with a made-up one."""
    study.enqueue_trial({"x": 0.25}, user_attrs={"warm_start": True})
    queued = study.ask()
    sampled = study.ask()
    recovery = recover_interrupted(study, tmp_path, grace=GRACE)
    assert recovery.requeued == [queued.number, sampled.number]
    retries = {t.user_attrs[RETRY_ATTR]: t.system_attrs["fixed_params"] for t in study.trials[2:]}
    assert retries == {queued.number: {"x": 0.25}, sampled.number: {}}


# ---- real drivers ---------------------------------------------------------------------------------------
def write_config(path: Path, run: Path, candidates: int, storage: str | None) -> Path:
    config = {
        "name": STUDY,
        "models": {"zoo": "tiny"},
        "space": {"methods": ["task_arithmetic", "ties"], "weight": {"per": "task"}},
        "optimizer": {"name": "tpe"},
        "budget": {"candidates": candidates},
        "selection": {"rescore_top": 2},
        "output": str(run),
    }
    if storage is not None:
        config["storage"] = storage
    path.write_text(yaml.safe_dump(config))
    return path


def load(storage: str | Path) -> optuna.Study | None:
    try:
        return optuna.load_study(study_name=STUDY, storage=open_storage(storage))
    except KeyError:
        return None


def wait_for(condition, proc: subprocess.Popen, timeout: float = 240, what: str = "") -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the driver ended before {what}: {proc.communicate()[0]}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def has_trials(storage: str | Path) -> bool:
    study = load(storage) if Path(str(storage)).exists() or "://" in str(storage) else None
    return study is not None and len(study.trials) > 0


def driver_env(zoo_env: dict[str, str]) -> dict[str, str]:
    return {**zoo_env, HEARTBEAT_ENV: "1"}


def postgres_url(root: Path) -> Iterator[str]:
    """A private PostgreSQL cluster under ``root`` on a unix socket (run as ``postgres`` when root); its URL."""
    initdb = shutil.which("initdb") or next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))), None)
    if initdb is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql; .ci/run does it)")
    pytest.importorskip("psycopg2", reason="psycopg2-binary (dev extras) is not installed")
    bindir = Path(initdb).resolve().parent
    data, sockets = root / "pgdata", root / "pgsock"
    sockets.mkdir()
    as_user: list[str] = []
    if os.getuid() == 0:  # PostgreSQL refuses to run as root
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres")
        shutil.chown(sockets, "postgres")
    port = free_port()
    try:
        subprocess.run(
            [*as_user, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"],
            check=True,
            capture_output=True,
            timeout=120,
        )
        options = f"-k {sockets} -c listen_addresses='' -p {port} -c fsync=off"
        subprocess.run(
            [
                *as_user,
                str(bindir / "pg_ctl"),
                "-D",
                str(data),
                "-o",
                options,
                "-w",
                "-l",
                str(root / "pg.log"),
                "start",
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError, KeyError, LookupError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        pytest.skip(f"the PostgreSQL server could not be started: {exc} {detail.decode(errors='replace')[-300:]}")
    try:
        yield f"postgresql+psycopg2://postgres@/postgres?host={sockets}&port={port}"
    finally:
        subprocess.run(
            [*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            capture_output=True,
            timeout=120,
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(params=["sqlite", "postgresql"])
def rdb_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('db') / 'search.db'}"
        return
    # Not under pytest's folder: that one is private to root, and the server runs as ``postgres``.
    root = Path(tempfile.mkdtemp(prefix="mergetune-pg-"))
    try:
        yield from postgres_url(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_two_drivers_share_one_rdb_study_losing_and_repeating_nothing(
    rdb_url: str, tmp_path: Path, zoo_env: dict[str, str]
) -> None:
    # The second driver joins seconds later (imports, zoo): enough must be left for it to take a share. With 40,
    # the first driver once finished them all before the second evaluated one (a run with a third CPU-bound
    # process on the 2 cores, which slows the second's start-up); 100 leaves a wider margin.
    budget = 100
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "run", budget, rdb_url)
    first = run_cli(["search", str(cfg)], driver_env(zoo_env), tmp_path)
    # The second starts once the first has created the study (and queued its warm starts).
    wait_for(lambda: has_trials(rdb_url), first, what="the first driver's first trial")
    second = run_cli(["search", str(cfg)], driver_env(zoo_env), tmp_path)
    outputs = [proc.communicate(timeout=300)[0] for proc in (first, second)]
    assert [first.returncode, second.returncode] == [0, 0], outputs

    study = load(rdb_url)
    assert study is not None
    by_state: dict[TrialState, list] = {}
    for t in study.trials:
        by_state.setdefault(t.state, []).append(t)
    complete = by_state.pop(TrialState.COMPLETE)
    assert len(complete) == budget
    # A candidate asked by both drivers at the budget's last slot is pruned unevaluated; nothing else ends otherwise.
    assert all(t.user_attrs.get("over_budget") for t in by_state.pop(TrialState.PRUNED, [])), by_state
    assert by_state == {}
    evaluated = [t for t in complete if "reused_from" not in t.user_attrs]
    assert len({tuple(sorted(t.params.items())) for t in evaluated}) == len(evaluated)
    assert len({t.user_attrs[DRIVER_ATTR] for t in complete}) == 2, outputs  # both drivers evaluated candidates
    assert not any(RETRY_ATTR in t.user_attrs for t in study.trials)  # neither failed the other's trials


def test_a_second_driver_on_one_journal_is_refused_in_one_line(tmp_path: Path, zoo_env: dict[str, str]) -> None:
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", run, 200, None)  # the first driver is still searching when refused
    journal = run / "search.journal"
    first = run_cli(["search", str(cfg)], driver_env(zoo_env), tmp_path)
    try:
        wait_for(lambda: has_trials(journal), first, what="the first driver's first trial")
        second = run_cli(["search", str(cfg)], driver_env(zoo_env), tmp_path)
        out, _ = second.communicate(timeout=300)
        assert first.poll() is None, "the first driver ended before the second started: nothing was tested"
    finally:
        first.kill()
        first.communicate()
    assert second.returncode == 2, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in out, out
    assert f"host {socket.gethostname()}, pid {first.pid}" in errors[0] and "RDB storage" in errors[0], out


# ---- a driver taken for gone, in-process -----------------------------------------------------------------
BUDGET = 4


@pytest.fixture
def config(tmp_path: Path, zoo_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> SearchConfig:
    """A tiny search of ``BUDGET`` candidates in SQLite, its zoo in the session's private cache."""
    for key, value in zoo_env.items():
        monkeypatch.setenv(key, value)
    url = f"sqlite:///{tmp_path / 'search.db'}"
    return SearchConfig.load(write_config(tmp_path / "c.yaml", tmp_path / "run", BUDGET, url))


def another_drivers_recovery(loop: SearchLoop, run: Path) -> Recovery:
    """Another driver starting on the study with its own storage handle, to which this driver seems gone
    (a grace of 0 s: any heartbeat is too old), recovering with the run folder ``run``."""
    other = optuna.load_study(study_name=STUDY, storage=open_storage(loop.storage_url))
    return recover_interrupted(other, run, loop.space.admit, grace=0.0)


def run_search(loop: SearchLoop, caplog: pytest.LogCaptureFixture) -> list[str]:
    """Run the loop to its end (its log captured from INFO up); the warnings it logged."""
    with caplog.at_level(logging.INFO, logger=loop_module.__name__):
        try:
            loop.run()
        finally:
            loop.close()
    return [r.getMessage() for r in caplog.records if r.name == loop_module.__name__ and r.levelno == logging.WARNING]


def stored(loop: SearchLoop) -> dict[TrialState, list[optuna.trial.FrozenTrial]]:
    study = optuna.load_study(study_name=STUDY, storage=open_storage(loop.storage_url))
    out: dict[TrialState, list] = {}
    for t in study.trials:
        out.setdefault(t.state, []).append(t)
    return out


def test_a_resuming_driver_recovers_an_unmarked_trial_of_the_run_it_resumes(
    config: SearchConfig, caplog: pytest.LogCaptureFixture
) -> None:
    """An earlier driver killed between an ask and its mark left an unmarked RUNNING trial a moment ago:
    the resuming driver, whose own heartbeat is the only live one, re-queues it and spends the whole budget."""
    loop = open_search(config)
    loop.study.enqueue_trial({"method": "task_arithmetic"})
    planted = loop.study.ask()  # no driver mark: the earlier driver died before writing it
    run_search(loop, caplog)

    states = stored(loop)
    assert TrialState.RUNNING not in states and TrialState.WAITING not in states
    assert [t.number for t in states[TrialState.FAIL]] == [planted.number]
    assert len(states[TrialState.COMPLETE]) == BUDGET
    retry = [t for t in states[TrialState.COMPLETE] if t.user_attrs.get(RETRY_ATTR) == planted.number]
    assert len(retry) == 1 and retry[0].params["method"] == "task_arithmetic"


@pytest.mark.parametrize("shares_run_folder", [True, False], ids=["records-the-saved-file", "fails-and-requeues"])
def test_a_trial_finished_by_another_driver_after_its_evaluation_was_saved(
    config: SearchConfig,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    shares_run_folder: bool,
) -> None:
    """Another driver takes this one for gone after it saved an evaluation and before it recorded it.

    Sharing the run folder, it records the saved file (the study holds this driver's result); on
    another machine it fails the trial as interrupted and queues its point again (evaluated again).
    Either way this driver keeps its file, logs a warning, does not crash and spends the whole budget.
    """
    loop = open_search(config)
    other_run = loop.out if shares_run_folder else tmp_path / "elsewhere"
    taken: list[tuple[SavedEvaluation, Recovery]] = []

    def record_after_a_takeover(study, trial_id, saved, after_append=None) -> None:
        if not taken:  # the first result: saved already, not yet recorded
            assert evaluation_path(loop.out, saved.number).is_file()
            taken.append((saved, another_drivers_recovery(loop, other_run)))
        record_evaluation(study, trial_id, saved, after_append)

    monkeypatch.setattr(loop_module, "record_evaluation", record_after_a_takeover)
    warnings = run_search(loop, caplog)

    saved, recovery = taken[0]
    number = saved.number
    assert json.loads(evaluation_path(loop.out, number).read_text())["values"] == saved.values  # kept
    told = [w for w in warnings if w.startswith(f"trial {number} was finished by another driver")]
    assert len(told) == 1, warnings
    states = stored(loop)
    assert TrialState.RUNNING not in states and TrialState.WAITING not in states
    assert len(states[TrialState.COMPLETE]) == BUDGET  # the whole budget, nothing lost
    trial = next(t for t in states[TrialState.COMPLETE if shares_run_folder else TrialState.FAIL] if t.number == number)
    if shares_run_folder:
        assert recovery.completed == [number] and recovery.requeued == []
        assert trial.values == saved.values and "recorded from this evaluation" in told[0]
    else:
        assert recovery.requeued == [number] and recovery.completed == []
        assert "failed as interrupted and queued again" in told[0]
        retry = [t for t in states[TrialState.COMPLETE] if t.user_attrs.get(RETRY_ATTR) == number]
        assert len(retry) == 1 and retry[0].params == trial.params and "reused_from" not in retry[0].user_attrs


def test_a_trial_failed_by_another_driver_as_it_was_asked_is_asked_again(
    config: SearchConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Another driver takes this one for gone between an ask and its mark: the trial is failed and its
    point queued again; this driver warns, asks again (the queued point) and spends the whole budget."""
    loop = open_search(config)
    ask = loop.study.ask
    taken: list[tuple[int, Recovery]] = []

    def ask_then_a_takeover() -> optuna.Trial:
        trial = ask()
        if not taken:
            taken.append((trial.number, another_drivers_recovery(loop, tmp_path / "elsewhere")))
        return trial

    monkeypatch.setattr(loop.study, "ask", ask_then_a_takeover)
    warnings = run_search(loop, caplog)

    number, recovery = taken[0]
    assert recovery.requeued == [number]
    assert [w for w in warnings if w.startswith(f"trial {number} was failed by another driver as it was asked")]
    states = stored(loop)
    (failed,) = states[TrialState.FAIL]
    assert failed.number == number and failed.params == {}  # cut before its first suggest
    assert TrialState.RUNNING not in states and TrialState.WAITING not in states
    assert len(states[TrialState.COMPLETE]) == BUDGET
    retry = [t for t in states[TrialState.COMPLETE] if t.user_attrs.get(RETRY_ATTR) == number]
    # The first ask is a warm start: its queued point is the one evaluated by the retry.
    assert len(retry) == 1 and retry[0].params == failed.system_attrs["fixed_params"]


def test_the_later_of_two_asks_for_the_budgets_last_candidate_is_pruned_unevaluated(
    config: SearchConfig, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Both drivers saw one candidate of the budget left; the other one asked first: this one's is over."""
    loop = open_search(config)
    ask = loop.study.ask
    others: list[int] = []

    def another_driver_asks_first() -> optuna.Trial:
        if len(loop.study.get_trials(states=(TrialState.COMPLETE,))) == BUDGET - 1 and not others:
            other = optuna.load_study(study_name=STUDY, storage=open_storage(loop.storage_url))
            plant_driver(other, "other", host="other-host", pid=1, beat_age=1)
            trial = other.ask()
            trial.set_user_attr(DRIVER_ATTR, "other")
            others.append(trial.number)
        return ask()

    monkeypatch.setattr(loop.study, "ask", another_driver_asks_first)
    run_search(loop, caplog)

    states = stored(loop)
    (pruned,) = states[TrialState.PRUNED]
    assert pruned.number == others[0] + 1 and pruned.user_attrs["over_budget"] is True
    assert pruned.params and not evaluation_path(loop.out, pruned.number).exists()  # never evaluated
    assert [t.number for t in states[TrialState.RUNNING]] == others  # the other driver's, left to it
    assert len(states[TrialState.COMPLETE]) == BUDGET - 1
    assert f"trial {pruned.number} pruned: another driver took the last candidate of the budget" in caplog.text
