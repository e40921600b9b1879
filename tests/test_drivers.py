"""Several drivers on one study: a live driver's RUNNING trials are never taken for interrupted ones.

Unit tests plant drivers' heartbeat records in a real storage and check what ``recover_interrupted``
recovers; the end-to-end tests run two real ``mergetune search`` subprocesses on one study in
SQLite and in a real PostgreSQL server started here (skipped, with the reason, if it cannot start),
and two on one journal file, where the second is refused in one line.
"""

from __future__ import annotations

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

from mergetune.search.drivers import DRIVER_ATTR, DRIVERS_PREFIX, HEARTBEAT_ENV
from mergetune.search.saved_evaluation import SavedEvaluation
from mergetune.search.storage import RETRY_ATTR, open_storage, recover_interrupted

GRACE = 30.0
STUDY = "tiny-test"


# ---- recovery with planted drivers -------------------------------------------------------------------------
def plant_driver(study: optuna.Study, driver: str, *, host: str, pid: int, beat_age: float) -> None:
    now = time.time()
    record = {"host": host, "pid": pid, "started": now - 100, "beat": now - beat_age, "stopped": False}
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
    "host_pid_age",
    [("other-host", 1, 10 * GRACE), ("this-host", "dead", 1)],
    ids=["stale-heartbeat", "dead-pid-on-this-host"],
)
def test_recovery_requeues_the_running_trials_of_a_gone_driver(
    study: optuna.Study, tmp_path: Path, host_pid_age: tuple[str, int | str, float]
) -> None:
    host, pid, age = host_pid_age
    host = socket.gethostname() if host == "this-host" else host
    plant_driver(study, "gone", host=host, pid=dead_pid() if pid == "dead" else int(pid), beat_age=age)
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
    budget = 40  # the second driver joins seconds later (imports, zoo): enough is left for it to take a share
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


def test_a_trial_finished_by_another_driver_does_not_stop_the_search(tmp_path: Path, zoo_env: dict[str, str]) -> None:
    """Another driver finishing this driver's trial (as recovery did) leaves the search going; the result is kept."""
    url = f"sqlite:///{tmp_path / 'search.db'}"
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", run, 6, url)
    driver = run_cli(["search", str(cfg)], driver_env(zoo_env), tmp_path)
    taken: list[int] = []

    def take_a_running_trial() -> bool:
        study = load(url) if (tmp_path / "search.db").exists() else None
        for trial in study.get_trials(states=(TrialState.RUNNING,)) if study else []:
            try:
                study.tell(trial.number, state=TrialState.FAIL)
            except (RuntimeError, ValueError):  # finished by the driver meanwhile: try the next one
                continue
            taken.append(trial.number)
            return True
        return False

    wait_for(take_a_running_trial, driver, what="a RUNNING trial")
    out, _ = driver.communicate(timeout=300)
    assert driver.returncode == 0, out
    assert (run / "evaluations" / f"{taken[0]}.json").is_file()  # its evaluation was kept


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
