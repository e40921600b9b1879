"""Task-sized caches computed once per machine and mapped by every process that merges the same store.

PCB's β, DELLA's ranks and the mergekit tie rule's order scores are ``[T, D]``: as large as the task
vectors. The Ray actors of a node map one copy of the store (Ray's object store, or the disk-tier
file); computed per actor, these caches would cost one store-sized copy per actor, and each actor
would pay the setup again. A ModelSet that reached its process by unpickling (an actor's copy of the
driver's store: ``ModelSet.shares_caches``) instead keeps each such cache in a file named after the
store's ``share_token`` and the cache's kind, which the first process to need it computes and the
others map read-only:

- where: beside a disk-tier store, in its folder (on disk, as the store); otherwise in ``/dev/shm``
  (shared memory: one copy per machine). Without room there, the cache is the process's own, as it
  would be unshared, and a warning says so.
- a finished file only appears by renaming a completely written one; a 4 KiB header names its dtype
  and shape, checked when it is mapped.
- computing is serialised by an exclusive ``flock`` on the folder's ``mergetune-scores.lock``: a
  process that finds no finished file takes it, looks again, and else computes. Another waits for it
  instead of computing the same cache beside it (two copies at once is what sharing avoids).
- every process that maps a file holds a shared ``flock`` on it for as long as the map lives (the
  writer from the moment it creates the file). The kernel drops a dead process's locks, so a file no
  one holds is stale: the last process to let go of its map removes the file, and a process about to
  compute removes the stale files of the folder (those of processes killed without cleaning up).
- a process killed while computing leaves its ``.writing`` file unheld: the next process to take the
  compute lock removes it and computes the cache itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from mergetune.errors import MergetuneError
from mergetune.merging.modelset import ModelSet
from mergetune.merging.residency import reserve_blocks

Allocate = Callable[[torch.dtype], torch.Tensor]  # an empty [T, D] buffer of a dtype, where the cache should live
Home = Literal["memory", "shared_memory", "disk"]
SHARED_MEMORY = Path("/dev/shm")
PREFIX = "mergetune-scores-"
LOCK_NAME = "mergetune-scores.lock"
_HEADER = 4096  # bytes before the values: a page, so that the values' map is page-aligned
_DTYPES = {str(d): d for d in (torch.float32, torch.bfloat16, torch.float16, torch.int32, torch.int64)}
_PROCESS = threading.RLock()  # one thread of a process at a time (flock locks are per open file, not per thread)
_depth = 0  # how deep this process is in compute-lock holders (a cache computed while computing another)


def task_sized_cache(
    ms: ModelSet, kind: str, compute: Callable[[ModelSet, Allocate], torch.Tensor]
) -> tuple[torch.Tensor, Home]:
    """The ``[T, D]`` cache ``kind`` of ``ms`` and where it lives: computed by ``compute(ms, allocate)``, which
    fills a buffer from ``allocate(dtype)``; shared with the other processes that unpickled the same store
    when ``ms.shares_caches`` and its buffers live on the CPU (see the module's docstring)."""
    place = _shared_folder(ms)
    if place is None:
        return compute(ms, ms.task_sized_buffer), "disk" if ms.residency.tier == "disk" else "memory"
    folder, home = place
    path = folder / f"{PREFIX}{ms.share_token}-{_file_safe(kind)}.bin"
    with _PROCESS:
        found = _map_finished(path, ms)
        if found is not None:
            return found, home
        with _compute_lock(folder):
            found = _map_finished(path, ms)
            if found is not None:
                return found, home
            remove_stale_files(folder)
            return _compute_into(path, ms, compute, home)


def _shared_folder(ms: ModelSet) -> tuple[Path, Home] | None:
    if not ms.shares_caches or ms.device.type != "cpu":  # a cache on an accelerator is that device's own
        return None
    return _folder(ms)


def _folder(ms: ModelSet) -> tuple[Path, Home] | None:
    if ms.residency.tier == "disk":
        assert ms.residency.path is not None
        return Path(ms.residency.path).parent, "disk"
    if SHARED_MEMORY.is_dir() and os.access(SHARED_MEMORY, os.W_OK):
        return SHARED_MEMORY, "shared_memory"
    return None


def cache_folder(ms: ModelSet) -> Path | None:
    """Where the processes that unpickle ``ms`` on this machine keep their shared caches (for a final sweep)."""
    place = _folder(ms)
    return place[0] if place else None


def _file_safe(kind: str) -> str:
    """The kind in a file name: readable, and a hash of it so that two kinds never share a name."""
    return f"{re.sub(r'[^A-Za-z0-9._-]', '_', kind)}-{hashlib.sha256(kind.encode()).hexdigest()[:8]}"


@contextlib.contextmanager
def _compute_lock(folder: Path) -> Iterator[None]:
    """The folder's exclusive compute lock, taken once per process (a nested take would wait for itself)."""
    global _depth
    if _depth:
        _depth += 1
        try:
            yield
        finally:
            _depth -= 1
        return
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # waits while another process computes a cache here
        _depth = 1
        try:
            yield
        finally:
            _depth = 0
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _map_finished(path: Path, ms: ModelSet) -> torch.Tensor | None:
    """The finished file's values mapped read-only, its shared lock held for as long as they live; None if absent."""
    try:
        hold = _Hold(os.open(path, os.O_RDONLY), path)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(hold.fd, fcntl.LOCK_SH)
        header = json.loads(os.pread(hold.fd, _HEADER, 0).rstrip(b"\0"))
        dtype, shape = _DTYPES[header["dtype"]], tuple(header["shape"])
        if shape != (ms.n_tasks, ms.numel):
            raise MergetuneError(
                f"{path}: a shared cache of shape {list(shape)} where this store needs {[ms.n_tasks, ms.numel]}; "
                "remove the file and run again"
            )
        return _values(hold, dtype, shape, writable=False)
    except BaseException:
        hold.let_go(remove=False)
        raise


class _Hold:
    """An open cache file whose shared lock says a process uses it; let go of once (by the map's finalizer)."""

    def __init__(self, fd: int, path: Path) -> None:
        self.fd, self.path = fd, path

    def let_go(self, remove: bool = True) -> None:
        """Close the file; first, with ``remove``, unlink it if no other process holds it (the last one out)."""
        if self.fd < 0:
            return
        fd, self.fd = self.fd, -1
        try:
            if remove and _try_exclusive(fd):
                _unlink_if_same(fd, self.path)
        finally:
            os.close(fd)  # closing releases the lock


@dataclass
class _Writer:
    """The buffer a compute asks for: a new ``<path>.writing-<pid>`` file, or (no room) the process's memory."""

    path: Path
    ms: ModelSet
    home: Home
    hold: _Hold | None = None
    private: bool = False

    @property
    def writing(self) -> Path:
        return self.path.with_name(f"{self.path.name}.writing-{os.getpid()}")

    def allocate(self, dtype: torch.dtype) -> torch.Tensor:
        if self.hold is not None or self.private:
            raise AssertionError(f"{self.path.name}: a cache's compute asked for a second buffer")
        shape = (self.ms.n_tasks, self.ms.numel)
        nbytes = _HEADER + max(1, math.prod(shape)) * dtype.itemsize
        self.hold = _Hold(os.open(self.writing, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600), self.writing)
        fcntl.flock(self.hold.fd, fcntl.LOCK_SH)  # held from creation on: never taken for a stale file
        try:
            reserve_blocks(self.hold.fd, self.writing, nbytes, "a task-sized cache shared between processes")
        except MergetuneError as exc:
            self.discard()
            if self.home == "disk":  # beside a disk store there is no other place within the budget
                raise
            warnings.warn(f"{exc}; computed in this process's memory instead, one copy per worker", stacklevel=3)
            self.private = True
            return self.ms.task_sized_buffer(dtype)
        header = json.dumps({"dtype": str(dtype), "shape": list(shape)}).encode()
        os.pwrite(self.hold.fd, header.ljust(_HEADER, b"\0"), 0)
        return _values(self.hold, dtype, shape, writable=True)

    def publish(self) -> Home:
        """Rename the written file into place (its map and lock follow it: same inode); where the result lives."""
        if self.hold is None:  # the compute asked for no buffer, or got the process's memory
            return "memory"
        os.replace(self.writing, self.path)
        self.hold.path = self.path
        return self.home

    def discard(self) -> None:
        if self.hold is not None:
            self.writing.unlink(missing_ok=True)
            self.hold.let_go(remove=False)
            self.hold = None


def _compute_into(
    path: Path, ms: ModelSet, compute: Callable[[ModelSet, Allocate], torch.Tensor], home: Home
) -> tuple[torch.Tensor, Home]:
    """Compute the cache into a writing file, then rename it into place (under the compute lock)."""
    writer = _Writer(path, ms, home)
    try:
        result = compute(ms, writer.allocate)
    except BaseException:
        writer.discard()
        raise
    return result, writer.publish()


def _values(hold: _Hold, dtype: torch.dtype, shape: tuple[int, ...], *, writable: bool) -> torch.Tensor:
    """The values after the header, mapped; the file is let go of when the map goes."""
    size = max(1, math.prod(shape)) * dtype.itemsize
    array = np.memmap(hold.path, dtype=np.uint8, mode="r+" if writable else "r", offset=_HEADER, shape=(size,))
    weakref.finalize(array, hold.let_go)
    with warnings.catch_warnings():  # read-only map: a finished cache is only read
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        flat = torch.from_numpy(array)
    return flat.view(dtype)[: math.prod(shape)].view(shape)


def remove_stale_files(folder: Path) -> list[str]:
    """Remove the folder's cache files that no process holds (their processes died); their names."""
    removed = []
    for path in sorted(folder.glob(f"{PREFIX}*")):
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:  # removed meanwhile by the last process holding it
            continue
        try:
            if _try_exclusive(fd) and _unlink_if_same(fd, path):
                removed.append(path.name)
        finally:
            os.close(fd)
    return removed


def _try_exclusive(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _unlink_if_same(fd: int, path: Path) -> bool:
    """Unlink ``path`` if it still names ``fd``'s file (not a newer file of the same name)."""
    try:
        same = os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False
    if same:
        path.unlink(missing_ok=True)
    return same
