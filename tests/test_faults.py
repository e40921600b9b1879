"""Storage faults with real causes: a full disk (a size-limited tmpfs holding the run folder or the
journal) and a driver SIGKILLed between the journal appends that record one result.

Nothing finished is lost and nothing is evaluated twice: a failed append is rolled back, a torn
last journal line is cut when the storage is opened, a result is saved whole before the study
records it, result files are replaced atomically, the CLI reports a full disk in one line naming
the path, and ``mergetune status`` counts only evaluated candidates against the budget.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from conftest import mounted_tmpfs, run_cli, trials_by_state, write_search_config
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
from optuna.trial import TrialState
from rich.console import Console

from mergetune.search import records as R
from mergetune.search.loop import KILL_AFTER_APPENDS_ENV
from mergetune.search.records import TrialRecord
from mergetune.search.results import write_candidates
from mergetune.search.status import status_report
from mergetune.search.storage import RETRY_ATTR, open_storage, recover_interrupted

PAGE = 4096
BIG_VALUE = "x" * (3 * PAGE)  # an attribute longer than any slack left in the journal's last page


# ---- a real full disk --------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs mounted under tmp_path (skipped where mounting is refused); unmounted afterwards."""
    with mounted_tmpfs(tmp_path / "disk", "size=256k") as mount_point:
        yield mount_point


def fill(disk: Path) -> Path:
    """Fill the file system with a filler file, to the last page; returns the filler's path."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        while True:
            os.write(fd, b"\0" * PAGE)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def resize(disk: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(disk)], check=True)


def new_study(storage: optuna.storages.BaseStorage) -> optuna.Study:
    study = optuna.create_study(study_name="s", storage=storage, directions=["maximize"])
    for i in range(3):
        trial = study.ask()
        trial.set_user_attr("i", i)
        study.tell(trial, [i / 10])
    return study


def leave_slack(journal: Path, storage: optuna.storages.BaseStorage) -> None:
    """Make sure the journal's last page is not full, so that a too-long append fits in part."""
    if journal.stat().st_size % PAGE == 0:
        optuna.load_study(study_name="s", storage=storage).set_user_attr("pad", 1)


def test_a_failed_append_on_a_full_disk_is_rolled_back_and_names_the_journal(small_disk: Path) -> None:
    journal = small_disk / "search.journal"
    storage = open_storage(journal)
    study = new_study(storage)
    leave_slack(journal, storage)
    filler = fill(small_disk)
    with pytest.raises(OSError) as err:
        study.set_user_attr("big", BIG_VALUE)
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(journal)
    assert "bytes to write" in err.value.strerror
    assert journal.read_bytes().endswith(b"\n")  # nothing of the failed append is left
    filler.unlink()
    again = optuna.load_study(study_name="s", storage=open_storage(journal))
    again.set_user_attr("after", True)
    reread = optuna.load_study(study_name="s", storage=open_storage(journal))
    assert [t.values for t in reread.trials] == [[0.0], [0.1], [0.2]]
    assert reread.user_attrs.get("after") is True and "big" not in reread.user_attrs


def test_open_storage_cuts_a_torn_last_line_left_by_a_full_disk(
    small_disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Optuna's own writer (the one used before) leaves the part of an append that fitted on a full disk."""
    journal = small_disk / "search.journal"
    lock = JournalFileOpenLock(str(journal))
    plain = JournalStorage(JournalFileBackend(str(journal), lock_obj=lock))
    study = new_study(plain)
    leave_slack(journal, plain)
    whole = journal.stat().st_size
    filler = fill(small_disk)
    with pytest.raises(OSError):
        study.set_user_attr("big", BIG_VALUE)
    torn = journal.stat().st_size - whole
    assert torn > 0 and not journal.read_bytes().endswith(b"\n"), "the full disk should have torn the append"
    filler.unlink()

    with caplog.at_level(logging.WARNING, logger="mergetune.search.storage"):
        storage = open_storage(journal)
    assert journal.stat().st_size == whole
    assert f"cut a torn last record of {torn} bytes" in caplog.text
    optuna.load_study(study_name="s", storage=storage).set_user_attr("after", True)
    reread = optuna.load_study(study_name="s", storage=open_storage(journal))
    assert [t.values for t in reread.trials] == [[0.0], [0.1], [0.2]]
    assert reread.user_attrs.get("after") is True


def test_open_storage_cuts_a_last_line_that_is_not_json(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    journal = tmp_path / "search.journal"
    new_study(open_storage(journal))
    whole = journal.stat().st_size
    with journal.open("ab") as f:
        f.write(b'{"op_code": 5, "trial_id"\n')  # a torn append another append was glued to, cut at its newline
    with caplog.at_level(logging.WARNING, logger="mergetune.search.storage"):
        storage = open_storage(journal)
    assert journal.stat().st_size == whole and "cut a torn last record of 26 bytes" in caplog.text
    assert len(optuna.load_study(study_name="s", storage=storage).trials) == 3


def test_a_healthy_journal_is_left_alone(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    journal = tmp_path / "search.journal"
    new_study(open_storage(journal))
    before = journal.read_bytes()
    with caplog.at_level(logging.WARNING, logger="mergetune.search.storage"):
        open_storage(journal)
    assert journal.read_bytes() == before and "torn" not in caplog.text


def test_result_files_are_replaced_whole_on_a_full_disk(small_disk: Path) -> None:
    records = [
        TrialRecord(
            number=i,
            state="COMPLETE",
            method="ties",
            values={"mean": i / 100},
            scores={f"task{t}": 0.5 for t in range(6)},
            normalized={f"task{t}": 0.9 for t in range(6)},
            feasible=True,
            recipe=None,
        )
        for i in range(60)
    ]
    write_candidates(small_disk, records[:2], ["mean"])
    before = {name: (small_disk / name).read_bytes() for name in ("candidates.csv", "candidates.json")}
    fill(small_disk)
    with pytest.raises(OSError) as err:
        write_candidates(small_disk, records, ["mean"])
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(small_disk / "candidates.csv")
    assert {name: (small_disk / name).read_bytes() for name in before} == before  # the old files, whole
    assert not list(small_disk.glob(".*.tmp"))  # no partial copy left taking space


# ---- the search on a full disk, and killed between appends ----------------------------------------------
def write_config(path: Path, run: Path, candidates: int) -> Path:
    return write_search_config(path, budget={"candidates": candidates}, output=str(run))


def wait_for_complete(journal: Path, count: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
        if journal.exists() and len(trials_by_state(journal).get(TrialState.COMPLETE, [])) >= count:
            return
    raise AssertionError(f"the search did not complete {count} trials in time: {proc.poll()}")


def test_a_full_disk_stops_the_search_in_one_line_and_the_same_command_resumes(
    small_disk: Path, tmp_path: Path, zoo_env: dict[str, str]
) -> None:
    resize(small_disk, "4m")
    budget = 20
    run = small_disk / "run"
    cfg = write_config(tmp_path / "c.yaml", run, budget)
    journal = run / "search.journal"
    proc = run_cli(["search", str(cfg)], zoo_env, tmp_path)
    wait_for_complete(journal, 3, proc)
    fill(small_disk)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in out, out
    assert f"no space left on the device holding {run}/" in errors[0] and "bytes to write" in errors[0], out
    before = trials_by_state(journal)
    done_before = {t.number: t.values for t in before[TrialState.COMPLETE]}
    assert 3 <= len(done_before) < budget

    resize(small_disk, "64m")  # the filler stays: the space is freed by enlarging the disk
    resumed = run_cli(["search", str(cfg)], zoo_env, tmp_path)
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    after = trials_by_state(journal)
    complete = after[TrialState.COMPLETE]
    assert len(complete) == budget and TrialState.RUNNING not in after
    assert all(t.user_attrs.get("evaluated") is not True for t in after.get(TrialState.FAIL, []))
    assert {t.number: t.values for t in complete if t.number in done_before} == done_before
    assert json.loads((run / "summary.json").read_text())["counts"]["complete"] == budget


@pytest.mark.parametrize("appends", [5])  # recipe, worker, scores, normalized, metrics: 3 attributes and the tell to go
def test_a_driver_killed_between_appends_loses_no_evaluation(
    appends: int, tmp_path: Path, zoo_env: dict[str, str]
) -> None:
    budget = 4
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", run, budget)
    journal = run / "search.journal"
    killed = run_cli(["search", str(cfg)], {**zoo_env, KILL_AFTER_APPENDS_ENV: str(appends)}, tmp_path)
    out, _ = killed.communicate(timeout=300)
    assert killed.returncode == -9, out
    before = trials_by_state(journal)
    assert [t.number for t in before[TrialState.RUNNING]] == [0] and TrialState.COMPLETE not in before
    saved = json.loads((run / "evaluations" / "0.json").read_text())

    resumed = run_cli(["search", str(cfg)], zoo_env, tmp_path)
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    after = trials_by_state(journal)
    assert TrialState.FAIL not in after and TrialState.RUNNING not in after
    complete = sorted(after[TrialState.COMPLETE], key=lambda t: t.number)
    assert len(complete) == budget and not any(RETRY_ATTR in t.user_attrs for t in complete)
    first = complete[0]
    assert first.number == 0 and first.values == saved["values"]
    # The wall time is measured per evaluation: equal attributes mean trial 0 was not evaluated again.
    assert {k: first.user_attrs[k] for k in saved["user_attrs"]} == saved["user_attrs"]


# ---- status ----------------------------------------------------------------------------------------------
def test_status_counts_only_evaluated_candidates_against_the_budget(tmp_path: Path) -> None:
    journal = tmp_path / "search.journal"
    study = optuna.create_study(study_name="s", storage=open_storage(journal), directions=["maximize"])
    study.set_user_attr(R.OBJECTIVES, ["mean"])
    study.set_user_attr(R.BUDGET, {"candidates": 3, "seconds": None})
    for value in (0.4, 0.6):
        trial = study.ask()
        trial.set_user_attr(R.NORMALIZED, {"a": value})
        study.tell(trial, [value])
    failed = study.ask()
    failed.set_user_attr(R.ERROR, "ValueError: NaN scores")
    failed.set_user_attr(R.EVALUATED, True)
    study.tell(failed, state=TrialState.FAIL)
    study.ask()  # left RUNNING by a killed driver
    recover_interrupted(study, tmp_path)  # failed as interrupted and re-queued

    console = Console(record=True, width=200)
    console.print(status_report(str(journal), None, top=5))
    text = console.export_text()
    assert "3 / 3 candidates" in text, text
    assert "2 complete · 1 failed · 1 interrupted · 0 running · 1 waiting" in text, text
