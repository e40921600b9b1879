"""A watchdog that stops a local Ray runtime's processes when the driver that started it is killed.

Why: ``ray.init()`` without an address starts a runtime (GCS, raylet, workers, two agents) owned by
the driver. The GCS and the raylet die with the driver, but after ``kill -9`` of the driver the
raylet's dashboard agent and runtime-env agent linger 60–120 s, holding ports, memory and log files
(issue 12, finding 9). A normal exit is fine: ``ray.shutdown()`` stops everything.

How: the driver starts this module as a separate process in its own session (so that a signal to
the driver's process group does not reach it) with a pipe on its standard input. The pipe is the
news channel: ``stop`` then end-of-file means the driver shut Ray down itself, and the watchdog
exits; end-of-file alone means the driver is gone (the kernel closes the pipe when it dies, at
once, with no polling). The watchdog then waits until the driver's process has really ended (its
pid, checked with its start time so that a reused pid is not mistaken for it) and stops every
process of *that* runtime only: a process belongs to it when its command line or one of its open
files lies in the runtime's session folder (``/tmp/ray/session_<time>_<driver pid>``), which every
process of a Ray node writes its logs into. Other Ray runtimes and clusters on the machine are never
touched (no ``ray stop``). Each is sent SIGTERM, and SIGKILL after a grace period.

Linux only (it reads ``/proc``); elsewhere no watchdog starts and Ray's own timeouts apply. This
module imports nothing but the standard library: it runs as a script, without loading mergetune or
torch, so it starts in a fraction of a second and holds a few megabytes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

PROC = Path("/proc")
STOP = b"stop\n"  # what the driver writes before closing the pipe when it shut Ray down itself
GRACE_SECONDS = 2.0  # between SIGTERM and SIGKILL: the agents of a dead raylet have nothing to save
POLL_SECONDS = 0.1


class RayWatchdog:
    """The driver's handle on its watchdog process: started with the runtime, stopped with it."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.process = process

    @classmethod
    def start(cls, session_dir: str) -> RayWatchdog | None:
        """Start a watchdog for the runtime of ``session_dir`` owned by this process; None without ``/proc``."""
        me = os.getpid()
        if not (PROC / str(me) / "stat").is_file():
            return None
        command = [sys.executable, "-I", __file__, "--driver-pid", str(me), "--session-dir", session_dir]
        command += ["--driver-start", str(start_time(me))]
        process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # not in the driver's process group: survives a signal sent to the group
        )
        return cls(process)

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        """Tell the watchdog the runtime was shut down normally, and reap it."""
        stdin = self.process.stdin
        assert stdin is not None
        try:
            stdin.write(STOP)
            stdin.close()
        except OSError:  # the watchdog is gone already (killed by someone): nothing to tell
            pass
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of ``/proc/PID/stat``); None if gone."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()  # the command name (field 2) may hold spaces: cut after it
    state, start = fields[0], int(fields[19])
    return None if state in ("Z", "X") else start  # a zombie has ended: only its exit status is left


def session_processes(session_dir: str) -> set[int]:
    """Pids of every process whose command line or an open file lies in ``session_dir`` (this one excepted)."""
    marker = session_dir.rstrip("/") + "/"
    found = set()
    for pid in _pids():
        if pid != os.getpid() and _mentions(pid, marker):
            found.add(pid)
    return found


def _pids() -> Iterator[int]:
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            yield int(entry.name)


def _mentions(pid: int, marker: str) -> bool:
    try:
        if marker.encode() in (PROC / str(pid) / "cmdline").read_bytes():
            return True
        for fd in (PROC / str(pid) / "fd").iterdir():
            if os.readlink(fd).startswith(marker):
                return True
    except OSError:  # gone meanwhile, or not ours to read
        return False
    return False


def stop_processes(pids: set[int], grace: float = GRACE_SECONDS) -> None:
    """SIGTERM each, then SIGKILL those still running after ``grace`` seconds."""
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(start_time(pid) is not None for pid in pids):
        time.sleep(POLL_SECONDS)
    for pid in pids:
        if start_time(pid) is not None:
            _signal(pid, signal.SIGKILL)


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(OSError):  # ended meanwhile
        os.kill(pid, sig)


def watch(driver_pid: int, driver_start: int, session_dir: str) -> None:
    """Wait for the driver's news on standard input; after its death, stop the session's processes."""
    news = sys.stdin.buffer.read()  # returns at end-of-file: the driver closed the pipe or died
    if news == STOP:
        return
    while start_time(driver_pid) == driver_start:  # the pipe closed but the driver still runs: wait for its end
        time.sleep(POLL_SECONDS)
    stop_processes(session_processes(session_dir))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--driver-pid", type=int, required=True)
    parser.add_argument("--driver-start", type=int, required=True, help="the driver's start time (/proc stat)")
    parser.add_argument("--session-dir", required=True, help="the Ray runtime's session folder")
    args = parser.parse_args(argv)
    watch(args.driver_pid, args.driver_start, args.session_dir)


if __name__ == "__main__":
    main()
