"""Which driver runs a study, and whether it is still alive: an identity and a heartbeat in the storage.

Several drivers may share one RDB study. A starting driver must not take another's RUNNING trials
for interrupted ones: it would fail them under the live driver, which then loses its finished
evaluation. So each driver writes ``drivers.<id> = {host, pid, started, beat}`` as a study user
attribute, refreshed every ``interval`` seconds by a daemon thread, and marks each trial it asks
with ``driver: <id>``. A driver is gone when it said it stopped, when its heartbeat is older than
the grace period, or, on this host, when its process no longer exists (a ``kill -9`` is then seen
at once, not after the grace period).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import optuna

from mergetune.errors import MergetuneError

log = logging.getLogger(__name__)
DRIVER_ATTR = "driver"  # trial user attr: the id of the driver that asked it
DRIVERS_PREFIX = "drivers."  # study user attr prefix: one heartbeat record per driver
#: Seconds between heartbeats; a driver is gone after GRACE_FACTOR intervals without one.
HEARTBEAT_ENV = "MERGETUNE_HEARTBEAT_SECONDS"
DEFAULT_INTERVAL = 10.0
GRACE_FACTOR = 3


class DriverConflictError(MergetuneError):
    """Another live driver runs the search on a storage that is not shared safely (a journal file)."""


def heartbeat_interval() -> float:
    """The heartbeat interval: ``MERGETUNE_HEARTBEAT_SECONDS`` if set, else 10 seconds."""
    return float(os.environ.get(HEARTBEAT_ENV, DEFAULT_INTERVAL))


@dataclass(frozen=True)
class DriverInfo:
    """A driver's record in the study: where it runs, when it started, its last heartbeat (epoch seconds)."""

    host: str
    pid: int
    started: float
    beat: float
    stopped: bool = False

    def describe(self) -> str:
        return f"host {self.host}, pid {self.pid}"


def new_driver_id() -> str:
    return uuid.uuid4().hex


def drivers_of(study: optuna.Study) -> dict[str, DriverInfo]:
    """Every driver that ever ran on ``study``, by id, as last recorded."""
    out = {}
    for key, value in study._storage.get_study_user_attrs(study._study_id).items():
        if key.startswith(DRIVERS_PREFIX) and isinstance(value, dict):
            out[key[len(DRIVERS_PREFIX) :]] = DriverInfo(**value)
    return out


def is_alive(info: DriverInfo, grace: float, now: float | None = None) -> bool:
    """Whether a driver may still run: not stopped, a heartbeat within ``grace``, on this host a live pid."""
    if info.stopped:
        return False
    if (now if now is not None else time.time()) - info.beat > grace:
        return False
    if info.host == socket.gethostname():
        return _pid_exists(info.pid)
    return True


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def live_drivers(study: optuna.Study, grace: float, exclude: str | None = None) -> dict[str, DriverInfo]:
    """The drivers of ``study`` that may still be running (``exclude``: the caller's own id)."""
    return {i: d for i, d in drivers_of(study).items() if i != exclude and is_alive(d, grace)}


class Heartbeat:
    """This driver's identity and its heartbeat thread: started by the loop's ``run``, stopped by ``close``."""

    def __init__(self, study: optuna.Study, interval: float | None = None) -> None:
        self.study = study
        self.id = new_driver_id()
        self.interval = interval if interval is not None else heartbeat_interval()
        self.grace = GRACE_FACTOR * self.interval
        self._info = DriverInfo(socket.gethostname(), os.getpid(), time.time(), time.time())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Record this driver now, then refresh its heartbeat every ``interval`` seconds in a daemon thread."""
        self._stop.clear()
        self._write(beat=time.time())
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{self.id[:8]}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop beating and record that this driver stopped (its RUNNING trials, if any, are free to recover)."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        try:
            self._write(beat=time.time(), stopped=True)
        except Exception as exc:  # a storage gone at shutdown: the heartbeat simply ages out
            log.warning("could not record that driver %s stopped: %s", self.id, exc)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._write(beat=time.time())
            except Exception as exc:  # a transient storage error must not kill the thread: the next beat retries
                log.warning("heartbeat of driver %s failed: %s", self.id, exc)

    def _write(self, **changes: Any) -> None:
        info = DriverInfo(**{**asdict(self._info), **changes})
        self.study._storage.set_study_user_attr(self.study._study_id, DRIVERS_PREFIX + self.id, asdict(info))
