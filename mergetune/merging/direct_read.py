"""A disk-tier store read ahead of the merge by a thread, with direct I/O (``O_DIRECT``).

Read through its memory map, a store costs about as much CPU as it takes to read: every page goes through
the page cache (allocated, filled, mapped, later reclaimed). Measured on a 4.94 GB store on this 2-core
machine: a cold pass through the map took 6.0 s and 7.1 s of CPU, so a merge's arithmetic on the two cores
added to the read instead of overlapping it. Direct I/O moves the file's blocks into the reader's own
buffers, without the page cache: 4.4–5.5 s for the same file at 0.3 s of CPU. The reader is a thread that
mostly waits on the disk (``os.preadv`` releases the GIL); it reads the next windows while the merge
computes, and the store's pages never fill the page cache.

The store file is ``[T + 1, D]`` (the task vectors, then the base) in the storage dtype (``residency``). A
window is a range of entries ``[a, b)``; each of the T + 1 rows is read into its own page-aligned buffer,
from the 4 KiB-aligned byte range around it (direct I/O needs aligned offsets, lengths and memory). The
merge's chunks are copied out of those buffers, widened to float32, into the ``[T, n]`` tensor the kernels
take (the widening of a 16-bit store copied each chunk before too).

Where direct I/O is not available (no ``O_DIRECT``, or the file system refuses it) ``open_direct`` returns
None and the store is read through its map as before. ``MERGETUNE_DIRECT_IO=0`` turns it off.
"""

from __future__ import annotations

import errno
import mmap
import os
import queue
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from mergetune.errors import MergetuneError
from mergetune.merging.residency import round_up
from mergetune.merging.streaming import FlatRange

ALIGN = 4096  # direct I/O alignment of offsets, lengths and memory (a multiple of any logical block size)
WINDOW_BYTES = 8 << 20  # per row and window: large requests, few of them
SLOTS = 3  # windows in flight: one merging, up to two read ahead


def direct_io_enabled() -> bool:
    return os.environ.get("MERGETUNE_DIRECT_IO", "1") != "0" and hasattr(os, "O_DIRECT")


def open_direct(path: str | Path, n_tasks: int, numel: int, dtype: torch.dtype) -> DirectReader | None:
    """A reader of the store file at ``path``, or None where direct I/O is off or refused."""
    if not direct_io_enabled():
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):  # e.g. a file system without direct I/O
            return None
        raise
    reader = DirectReader(fd, Path(path), n_tasks, numel, dtype)
    try:
        reader.probe()
    except OSError as exc:
        reader.close()
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):  # it opens but refuses aligned reads
            return None
        raise
    return reader


class DirectReader:
    """Reads windows of a ``[T + 1, D]`` store file with direct I/O on a thread; see the module docstring."""

    def __init__(self, fd: int, path: Path, n_tasks: int, numel: int, dtype: torch.dtype) -> None:
        self.fd, self.path, self.n_tasks, self.numel, self.dtype = fd, path, n_tasks, numel, dtype
        self.itemsize = dtype.itemsize
        self.row_bytes = max(numel, 1) * self.itemsize
        self.window = max(1, WINDOW_BYTES // self.itemsize)  # entries per row and window

    def close(self) -> None:
        os.close(self.fd)

    def probe(self) -> None:
        """One aligned read: a file system that opens with O_DIRECT but refuses its reads fails here."""
        buffer = mmap.mmap(-1, ALIGN)
        try:
            os.preadv(self.fd, [buffer], 0)
        finally:
            buffer.close()

    def chunks(self, items: Sequence[FlatRange]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(tau [T, n], base [n])`` in float32 for each item, in order; windows are read ahead on a thread."""
        windows = _windows(items, self.window)
        capacity = max([self.window, *(w[-1].stop - w[0].start for w in windows)])
        free: queue.Queue[_Slot | None] = queue.Queue()
        for _ in range(min(SLOTS, len(windows))):
            free.put(_Slot(self, capacity))
        filled: queue.Queue[_Slot | BaseException] = queue.Queue()
        stop = threading.Event()
        reader = threading.Thread(
            target=self._read_all, args=(windows, free, filled, stop), name="mergetune-direct-read", daemon=True
        )
        reader.start()
        try:
            for window in windows:
                got = filled.get()
                if isinstance(got, BaseException):
                    raise got
                yield from got.chunks(window)
                free.put(got)
        finally:
            stop.set()  # a merge that stops early (an error) does not wait for the rest of the store
            free.put(None)
            reader.join()

    def _read_all(
        self, windows: list[list[FlatRange]], free: queue.Queue, filled: queue.Queue, stop: threading.Event
    ) -> None:
        try:
            for window in windows:
                slot = free.get()
                if slot is None or stop.is_set():
                    return
                slot.read(window[0].start, window[-1].stop)
                filled.put(slot)
        except BaseException as exc:  # handed to the merging thread, which raises it
            filled.put(exc)

    def read_row(self, buffer: memoryview, row: int, a: int, b: int) -> int:
        """Entries ``[a, b)`` of ``row`` into ``buffer`` (page-aligned); returns where entry ``a`` starts in it."""
        first = row * self.row_bytes + a * self.itemsize
        last = row * self.row_bytes + b * self.itemsize
        start = first - first % ALIGN
        length = round_up(last - start, ALIGN)
        done = 0
        while start + done < last:
            n = os.preadv(self.fd, [buffer[done:length]], start + done)
            if n <= 0:
                raise MergetuneError(
                    f"the disk-tier store {self.path} ended at byte {start + done}, before byte {last}: the file was "
                    "truncated or replaced while merging; run the search again (it rewrites the store)"
                )
            done += n
        return first - start


class _Slot:
    """One window's buffers: a page-aligned anonymous map holding T + 1 row buffers of ``capacity`` entries.
    Its memory is unmapped when the last reference goes (chunks handed out are copies, never views)."""

    def __init__(self, reader: DirectReader, capacity: int) -> None:
        self.reader = reader
        self.row_capacity = round_up(capacity * reader.itemsize + 2 * ALIGN, ALIGN)
        self.map = mmap.mmap(-1, (reader.n_tasks + 1) * self.row_capacity)
        self.bytes = torch.frombuffer(self.map, dtype=torch.uint8)
        self.rows: list[torch.Tensor] = []
        self.start = 0

    def read(self, a: int, b: int) -> None:
        r, view = self.reader, memoryview(self.map)
        self.start, self.rows = a, []
        for row in range(r.n_tasks + 1):
            base = row * self.row_capacity
            offset = r.read_row(view[base : base + self.row_capacity], row, a, b)
            part = self.bytes[base + offset : base + offset + (b - a) * r.itemsize]
            self.rows.append(part.view(r.dtype))

    def chunks(self, window: list[FlatRange]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        T = self.reader.n_tasks
        for it in window:
            a, b = it.start - self.start, it.stop - self.start
            tau = torch.empty(T * (b - a), dtype=torch.float32).view(T, b - a)
            for t in range(T):
                tau[t].copy_(self.rows[t][a:b])
            yield tau, self.rows[T][a:b].to(torch.float32, copy=True)


def _windows(items: Sequence[FlatRange], window: int) -> list[list[FlatRange]]:
    """Consecutive items grouped into windows spanning at most ``window`` entries (an item longer alone)."""
    out: list[list[FlatRange]] = []
    for it in items:
        if out and it.start >= out[-1][0].start and it.stop - out[-1][0].start <= window:
            out[-1].append(it)
        else:
            out.append([it])
    return out
