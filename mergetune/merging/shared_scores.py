"""Setup caches computed once per machine and mapped by every process that merges the same store.

PCB's β, DELLA's ranks and the mergekit tie rule's order scores are ``[T, D]``: as large as the task
vectors; a score's bucket counts (``stats``) are smaller (up to a quarter of the store for row scope).
The Ray actors of a node map one copy of the store (Ray's object store, or the disk-tier file);
computed per actor, these caches would cost one copy per actor, and each actor would pay the setup
again. A ModelSet that reached its process by unpickling (an actor's copy of the driver's store:
``ModelSet.shares_caches``) instead keeps each such cache in a file named after the store's
``share_token`` and the cache's kind, which the first process to need it computes and the others map
read-only (``task_sized_cache`` for a ``[T, D]`` buffer filled in place, ``shared_tensors`` for
tensors built in memory then written):

- where: beside a disk-tier store, in its folder (on disk, as the store); otherwise in ``/dev/shm``
  (shared memory: one copy per machine). Without room there, the cache is the process's own, as it
  would be unshared, and a warning says so.
- a finished file only appears by renaming a completely written one; its header lists each tensor's
  dtype, shape and offset (``_Writer``).
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
import struct
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
from mergetune.merging.residency import reserve_blocks, round_up

Allocate = Callable[[torch.dtype], torch.Tensor]  # an empty [T, D] buffer of a dtype, where the cache should live
Home = Literal["memory", "shared_memory", "disk"]
SHARED_MEMORY = Path("/dev/shm")
PREFIX = "mergetune-scores-"
LOCK_NAME = "mergetune-scores.lock"
_PAGE = 4096  # the data starts on a page: its map is page-aligned
_STORED = (torch.float64, torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32, torch.int16)
_DTYPES = {str(d): d for d in (*_STORED, torch.int8, torch.uint8, torch.bool)}
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
    path = _cache_path(folder, ms, kind)
    with _finished_or_lock(folder, path) as found:
        if found is None:
            return _compute_into(path, ms, compute, home)
    (tensor,) = found
    if tuple(tensor.shape) != (ms.n_tasks, ms.numel):
        raise MergetuneError(
            f"{path}: a shared cache of shape {list(tensor.shape)} where this store needs {[ms.n_tasks, ms.numel]}; "
            "remove the file and run again"
        )
    return tensor, home


def shared_tensors(ms: ModelSet, kind: str, build: Callable[[], list[torch.Tensor]]) -> tuple[list[torch.Tensor], Home]:
    """Smaller precomputed tensors (e.g. a score's bucket counts) built once per machine as ``task_sized_cache``'s
    caches are: ``build()`` in the first process that needs them, written to a file the others map read-only;
    and where they live. ``build()``'s own result (in memory) where ``task_sized_cache`` would not share, or
    without room for the file."""
    place = _shared_folder(ms)
    if place is None:
        return build(), "memory"
    folder, home = place
    path = _cache_path(folder, ms, kind)
    with _finished_or_lock(folder, path) as found:
        if found is None:
            built = build()
            written = _Writer(path, ms, home).write(built)
            return (built, "memory") if written is None else (written, home)
    return found, home


def _cache_path(folder: Path, ms: ModelSet, kind: str) -> Path:
    return folder / f"{PREFIX}{ms.share_token}-{_file_safe(kind)}.bin"


@contextlib.contextmanager
def _finished_or_lock(folder: Path, path: Path) -> Iterator[list[torch.Tensor] | None]:
    """The finished file's tensors, or None while this process holds the folder's compute lock (the body then
    computes them); waits while another process computes."""
    with _PROCESS:
        found = _map_finished(path)
        if found is not None:
            yield found
            return
        with _compute_lock(folder):
            found = _map_finished(path)
            if found is None:
                remove_stale_files(folder)
            yield found


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


def _map_finished(path: Path) -> list[torch.Tensor] | None:
    """The finished file's tensors mapped read-only, its shared lock held for as long as they live; None if absent."""
    try:
        hold = _Hold(os.open(path, os.O_RDONLY), path)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(hold.fd, fcntl.LOCK_SH)
        (length,) = struct.unpack("<Q", os.pread(hold.fd, 8, 0))
        layout = [(_DTYPES[d], tuple(shape), offset) for d, shape, offset in json.loads(os.pread(hold.fd, length, 8))]
        return _mapped(hold, layout, _data_start(length), writable=False)
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
    """Writes a cache to a new ``<path>.writing-<pid>`` file, renamed into place when complete.

    The file: an 8-byte little-endian header length, the JSON header (each tensor's dtype, shape and offset in
    the data), then the data from the next page on, each tensor 64-byte aligned.
    """

    path: Path
    ms: ModelSet
    home: Home
    hold: _Hold | None = None
    private: bool = False

    @property
    def writing(self) -> Path:
        return self.path.with_name(f"{self.path.name}.writing-{os.getpid()}")

    def allocate(self, dtype: torch.dtype) -> torch.Tensor:
        """An empty ``[T, D]`` buffer in the file (a task-sized cache's compute fills it), or, without room there,
        in this process's memory."""
        if self.hold is not None or self.private:
            raise AssertionError(f"{self.path.name}: a cache's compute asked for a second buffer")
        mapped = self._create([(dtype, (self.ms.n_tasks, self.ms.numel))])
        if mapped is None:
            self.private = True
            return self.ms.task_sized_buffer(dtype)
        return mapped[0]

    def write(self, tensors: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """``tensors`` written to the file, renamed into place and mapped; None without room there (or with no
        tensors: nothing to share, and no map would hold the file)."""
        if not tensors:
            return None
        mapped = self._create([(t.dtype, tuple(t.shape)) for t in tensors])
        if mapped is None:
            return None
        try:
            for target, tensor in zip(mapped, tensors, strict=True):
                target.copy_(tensor)
        except BaseException:
            self.discard()
            raise
        self.publish()
        return mapped

    def _create(self, specs: list[tuple[torch.dtype, tuple[int, ...]]]) -> list[torch.Tensor] | None:
        """The writing file with its header and room for ``specs``, mapped read-write; None without room."""
        layout, end = [], 0
        for dtype, shape in specs:
            layout.append((dtype, shape, end))
            end = round_up(end + max(1, math.prod(shape)) * dtype.itemsize, 64)
        header = json.dumps([[str(d), list(shape), offset] for d, shape, offset in layout]).encode()
        self.hold = _Hold(os.open(self.writing, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600), self.writing)
        fcntl.flock(self.hold.fd, fcntl.LOCK_SH)  # held from creation on: never taken for a stale file
        try:
            # at least one data byte: an empty map cannot be made (no tensors, or only empty ones)
            size = _data_start(len(header)) + max(end, 1)
            reserve_blocks(self.hold.fd, self.writing, size, "a cache shared by workers")
        except MergetuneError as exc:
            self.discard()
            if self.home == "disk":  # beside a disk store there is no other place within the budget
                raise
            warnings.warn(f"{exc}; kept in this process's memory instead, one copy per worker", stacklevel=4)
            return None
        os.pwrite(self.hold.fd, struct.pack("<Q", len(header)) + header, 0)
        return _mapped(self.hold, layout, _data_start(len(header)), writable=True)

    def publish(self) -> Home:
        """Rename the written file into place (its maps and lock follow it: same inode); where the result lives."""
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
    """Compute a task-sized cache into a writing file, then rename it into place (under the compute lock)."""
    writer = _Writer(path, ms, home)
    try:
        result = compute(ms, writer.allocate)
    except BaseException:
        writer.discard()
        raise
    return result, writer.publish()


def _data_start(header_length: int) -> int:
    return round_up(8 + header_length, _PAGE)


Layout = list[tuple[torch.dtype, tuple[int, ...], int]]  # each tensor's dtype, shape and offset in the data


def _mapped(hold: _Hold, layout: Layout, start: int, *, writable: bool) -> list[torch.Tensor]:
    """The file's tensors, views of one map of its data (from byte ``start``); the file is let go of when the map
    goes."""
    size = os.fstat(hold.fd).st_size
    array = np.memmap(hold.path, dtype=np.uint8, mode="r+" if writable else "r", offset=start, shape=(size - start,))
    weakref.finalize(array, hold.let_go)
    with warnings.catch_warnings():  # read-only map: a finished cache is only read
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        flat = torch.from_numpy(array)
    return [
        flat[offset : offset + max(1, math.prod(shape)) * dtype.itemsize].view(dtype)[: math.prod(shape)].view(shape)
        for dtype, shape, offset in layout
    ]


def remove_stale_files(folder: Path) -> None:
    """Remove the folder's cache files that no process holds (their processes died)."""
    for path in sorted(folder.glob(f"{PREFIX}*")):
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:  # removed meanwhile by the last process holding it
            continue
        try:
            if _try_exclusive(fd):
                _unlink_if_same(fd, path)
        finally:
            os.close(fd)


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
