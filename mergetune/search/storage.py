"""Where a search lives: an Optuna storage (journal file by default, any RDB URL for many machines).

Pitfalls handled here (see shared/docs/search-stack.md):
- the journal file is opened by **absolute** path: with a relative path the lock symlink can
  dangle and, after a ``kill -9`` that held the lock, the next process would block forever;
- ask/tell has no heartbeats: trials left RUNNING by a killed driver are marked FAIL on resume
  and their parameters re-queued, so the interrupted candidates are evaluated again while no
  finished one is; a trial whose result was saved before the kill (``saved_evaluation``) is
  completed from that file instead. Only trials whose driver is gone (see ``drivers``): a live
  driver sharing the study keeps its RUNNING trials;
- a journal append cut by a full disk or a kill leaves a torn last line, and the next append would
  be glued to it and make the whole journal unreadable: an append that fails is rolled back, and
  ``open_storage`` cuts a torn last line (under the journal's lock, so a concurrent writer's
  append in progress is never taken for one) before anything is appended.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import optuna
from optuna.storages import BaseStorage, JournalStorage
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
from optuna.trial import FrozenTrial, TrialState

from mergetune.search.atomic import located
from mergetune.search.drivers import DRIVER_ATTR, GRACE_FACTOR, heartbeat_interval, live_drivers
from mergetune.search.saved_evaluation import SavedEvaluation, record_evaluation

log = logging.getLogger(__name__)
JOURNAL_NAME = "search.journal"
RETRY_ATTR = "retry_of"
TAIL_CHUNK = 1 << 16  # bytes read at a time, backwards, to find the journal's last line


def open_storage(url_or_path: str | Path, *, repair: bool = True) -> BaseStorage:
    """An Optuna storage from a URL (``sqlite:///``, ``postgresql://``, ...) or a journal file path.

    A journal's torn last line is cut first unless ``repair`` is False (``mergetune status``, which
    never writes: Optuna's reader skips a last line without its newline).
    """
    text = str(url_or_path)
    if "://" in text:
        return optuna.storages.RDBStorage(text)
    path = Path(text).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = JournalFileOpenLock(str(path))
    if repair and path.is_file():
        cut_torn_tail(path, lock)
    return JournalStorage(RollbackJournalBackend(str(path), lock_obj=lock))


class RollbackJournalBackend(JournalFileBackend):
    """Optuna's journal file whose failed append is rolled back: a full disk never leaves a torn line.

    Optuna's own append writes through a buffered file; on ENOSPC the part that fitted stays in
    the journal, and its ``OSError`` names no file. Here the append is one unbuffered write, under
    the same lock, cut back to the previous end if it fails, and the error names the journal.
    """

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        data = "".join(json.dumps(entry, separators=(",", ":")) + "\n" for entry in logs).encode()
        self._lock.acquire()
        try:
            with open(self._file_path, "ab", buffering=0) as f:
                end = f.seek(0, os.SEEK_END)
                try:
                    _write_all(f.fileno(), data)
                    os.fsync(f.fileno())
                except OSError as exc:
                    os.ftruncate(f.fileno(), end)  # frees what fitted, so it works on a full disk
                    raise located(exc, self._file_path, len(data)) from exc
        finally:
            self._lock.release()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def cut_torn_tail(path: Path, lock: JournalFileOpenLock) -> int:
    """Cut the journal's last line if an append was torn (no newline, or not JSON); returns the bytes cut.

    Checked once without the lock (a healthy journal is never locked nor written), then again under
    it: a line that looked torn may be a concurrent writer's append still in progress.
    """
    if _torn_tail_size(path) == 0:
        return 0
    lock.acquire()
    try:
        cut = _torn_tail_size(path)
        if cut:
            os.truncate(path, path.stat().st_size - cut)
    finally:
        lock.release()
    if cut:
        log.warning(
            "%s: cut a torn last record of %d bytes (an append cut short by a full disk or a kill); "
            "every complete record is kept",
            path,
            cut,
        )
    return cut


def _torn_tail_size(path: Path) -> int:
    """Bytes of the last line if it is torn (no trailing newline, or not valid JSON), else 0."""
    with path.open("rb") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        line = _last_line(f, size)
    if not line.endswith(b"\n"):
        return len(line)
    try:
        json.loads(line)
    except ValueError:
        return len(line)
    return 0


def _last_line(f: BinaryIO, size: int) -> bytes:
    """The file's last line, newline included, read backwards in chunks (journals grow to many MB)."""
    tail = b""
    position = size
    while position > 0:
        step = min(TAIL_CHUNK, position)
        position -= step
        f.seek(position)
        tail = f.read(step) + tail
        start = tail.rfind(b"\n", 0, len(tail) - 1)  # the newline that ends the previous line
        if start >= 0:
            return tail[start + 1 :]
    return tail


def storage_location(storage: str | None, output_dir: Path) -> str:
    return storage if storage else str((output_dir / JOURNAL_NAME).resolve())


def load_study(storage: BaseStorage, name: str | None = None) -> optuna.Study:
    """Open an existing study read-only-style (for status and reports); the only one if no name."""
    summaries = optuna.get_all_study_summaries(storage)
    if not summaries:
        raise FileNotFoundError("the storage holds no search")
    if name is None:
        if len(summaries) > 1:
            raise ValueError(f"the storage holds several searches {[s.study_name for s in summaries]}; name one")
        name = summaries[0].study_name
    return optuna.load_study(study_name=name, storage=storage)


@dataclass(frozen=True)
class Recovery:
    """What a resume found: trials interrupted mid-evaluation (now failed and re-queued), trials
    recorded from their saved evaluation, the number of finished trials, and the RUNNING trials left
    alone because their driver is alive."""

    requeued: list[int]
    finished: int
    completed: list[int]
    running_elsewhere: list[int]


def recover_interrupted(
    study: optuna.Study,
    run: Path,
    admit: Callable[[dict[str, Any]], dict[str, Any] | None] = dict,
    *,
    grace: float | None = None,
    me: str | None = None,
) -> Recovery:
    """Finish the trials a dead driver left RUNNING: from their saved result, or failed and re-queued.

    A RUNNING trial marked with a driver that is alive (see ``drivers.is_alive``; ``grace``: seconds
    without a heartbeat after which a driver is gone, by default 3 heartbeat intervals) is left
    alone: another driver is evaluating it. A trial with no driver mark (from a version without
    heartbeats, or asked by a driver killed before it marked it) counts as interrupted, as before,
    unless a live driver asked it within ``grace`` and has not marked it yet. ``me`` is the resuming
    driver's own id: it has asked nothing yet, so it is never a live owner (its heartbeat, already
    beating, must not keep an earlier run's unmarked trials RUNNING).

    A trial whose evaluation was saved under ``run`` (see ``saved_evaluation``) was evaluated: it is
    recorded from the file, never evaluated again. The others were cut mid-evaluation: they are
    failed (as interrupted, not evaluated) and their point (its parameters, or the point it was
    queued with when it was cut before its first suggest) queued again, as ``admit`` maps it
    into the current space (clipped), or not at all when it returns None (see SearchSpace.admit): a
    point the space cannot evaluate must not crash every resume.
    """
    requeued, completed, elsewhere = [], [], []
    gone = _gone_driver_check(study, GRACE_FACTOR * heartbeat_interval() if grace is None else grace, me)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not gone(trial):
            elsewhere.append(trial.number)
            continue
        saved = SavedEvaluation.load_for(run, study, trial)
        if saved is not None:
            record_evaluation(study, trial._trial_id, saved)
            completed.append(trial.number)
            continue
        # Attributes must be set before the trial finishes; ask/tell has no public handle here.
        study._storage.set_trial_user_attr(trial._trial_id, "error", "interrupted: the driver stopped mid-evaluation")
        study.tell(trial.number, state=TrialState.FAIL)
        params = admit(point) if (point := _chosen_point(trial)) else {}  # {}: the sampler draws the retry afresh
        if params is not None:
            study.enqueue_trial(params, user_attrs={RETRY_ATTR: trial.number}, skip_if_exists=False)
            requeued.append(trial.number)
    finished = len(finished_trials(study))
    if completed:
        log.info("resume: %d trial(s) recorded from their saved evaluation: %s", len(completed), completed)
    if requeued:
        log.info("resume: %d interrupted trial(s) re-queued: %s", len(requeued), requeued)
    if elsewhere:
        log.info("resume: %d trial(s) left to the live driver(s) running them: %s", len(elsewhere), elsewhere)
    return Recovery(requeued, finished, completed, elsewhere)


def _chosen_point(trial: FrozenTrial) -> dict[str, Any]:
    """The point a RUNNING trial was evaluating: its parameters, or, when it was cut before its first
    suggest, the point it was queued with (a warm start, a retry, an external optimizer's proposal).
    Empty for a trial the sampler had not drawn yet."""
    return dict(trial.params) or dict(trial.system_attrs.get("fixed_params", {}))


def _gone_driver_check(study: optuna.Study, grace: float, me: str | None) -> Callable[[FrozenTrial], bool]:
    """A test of whether a RUNNING trial's driver is gone, on the drivers' records read once now.

    ``me`` (the caller's own driver id) never counts as a live owner: see ``recover_interrupted``.
    """
    live = live_drivers(study, grace, exclude=me)
    now = datetime.datetime.now()  # Optuna stamps datetime_start in local time

    def gone(trial: FrozenTrial) -> bool:
        owner = trial.user_attrs.get(DRIVER_ATTR)
        if owner is None:
            # Asked by a driver without heartbeats (today's rule: interrupted), unless another live
            # driver asked it a moment ago and has not marked it yet (the mark is the append after the ask).
            just_asked = trial.datetime_start is not None and (now - trial.datetime_start).total_seconds() < grace
            return not (live and just_asked)
        return owner not in live

    return gone


def finished_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Trials that were evaluated to an outcome (COMPLETE, FAIL with a recorded error, PRUNED by fidelity racing)."""
    states = (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)
    out = [t for t in study.get_trials(deepcopy=False, states=states) if has_outcome(t)]
    return sorted(out, key=lambda t: t.number)


def has_outcome(trial: FrozenTrial) -> bool:
    """Whether ``trial`` was evaluated to an outcome: COMPLETE, or FAIL with a recorded error (not interrupted),
    or PRUNED after a partial evaluation (multi-fidelity racing; not a candidate over the budget)."""
    if trial.state is TrialState.COMPLETE:
        return True
    return trial.state in (TrialState.FAIL, TrialState.PRUNED) and bool(trial.user_attrs.get("evaluated", False))


def waiting_trials(study: optuna.Study) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
