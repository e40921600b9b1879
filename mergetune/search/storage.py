"""Where a search lives: an Optuna storage (journal file by default, any RDB URL for many machines).

Pitfalls handled here (see shared/docs/search-stack.md):
- the journal file is opened by **absolute** path: with a relative path the lock symlink can
  dangle and, after a ``kill -9`` that held the lock, the next process would block forever;
- ask/tell has no heartbeats: trials left RUNNING by a killed driver are marked FAIL on resume
  and their parameters re-queued, so the interrupted candidates are evaluated again while no
  finished one is.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage, JournalStorage
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
from optuna.trial import FrozenTrial, TrialState

log = logging.getLogger(__name__)
JOURNAL_NAME = "search.journal"
RETRY_ATTR = "retry_of"


def open_storage(url_or_path: str | Path) -> BaseStorage:
    """An Optuna storage from a URL (``sqlite:///``, ``postgresql://``, ...) or a journal file path."""
    text = str(url_or_path)
    if "://" in text:
        return optuna.storages.RDBStorage(text)
    path = Path(text).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    backend = JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path)))
    return JournalStorage(backend)


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
    """What a resume found: trials interrupted mid-evaluation, now failed and re-queued."""

    requeued: list[int]
    finished: int


def recover_interrupted(
    study: optuna.Study, admit: Callable[[dict[str, Any]], dict[str, Any] | None] = dict
) -> Recovery:
    """Fail the trials a dead driver left RUNNING and queue their parameters again.

    ``admit`` maps stored parameters to what the current space accepts (clipped), or None to not queue
    them again (see SearchSpace.admit): a point the space cannot evaluate must not crash every resume.
    """
    requeued = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        # Attributes must be set before the trial finishes; ask/tell has no public handle here.
        study._storage.set_trial_user_attr(trial._trial_id, "error", "interrupted: the driver stopped mid-evaluation")
        study.tell(trial.number, state=TrialState.FAIL)
        params = admit(trial.params)
        if params is not None:
            study.enqueue_trial(params, user_attrs={RETRY_ATTR: trial.number}, skip_if_exists=False)
            requeued.append(trial.number)
    finished = len(finished_trials(study))
    if requeued:
        log.info("resume: %d interrupted trial(s) re-queued: %s", len(requeued), requeued)
    return Recovery(requeued, finished)


def finished_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Trials that were evaluated to an outcome (COMPLETE, or FAIL with a recorded error)."""
    out = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL)):
        if t.state is TrialState.COMPLETE or t.user_attrs.get("evaluated", False):
            out.append(t)
    return sorted(out, key=lambda t: t.number)


def waiting_trials(study: optuna.Study) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
