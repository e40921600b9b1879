"""Where a ModelSet's flat store lives: on the merge device, in host memory, or memory-mapped from disk.

The store (``[T, D]`` task vectors and the ``[D]`` base) is what every candidate streams over. Three
residency tiers, chosen from the store's size and the memory budget (``MemoryBudget.choose``):

- ``device``: on the merge device (an accelerator with room for it, or the CPU within ``memory``);
- ``host``: in CPU memory (pinned when the merge device is CUDA), copied to the device chunk by
  chunk while the previous chunk merges (see the engine); on a CPU merge device this is ``device``;
- ``disk``: a file written once in the resident layout (``[T + 1, D]``: the task vectors, then the
  base) and memory-mapped read-only; the merge reads it chunk by chunk through the page cache,
  whose pages the kernel may drop at any time: the budget is never exceeded by the store.

Budgets are bytes, or strings such as ``"24GB"`` (powers of 1000) or ``"24GiB"`` (powers of 1024).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from mergetune.errors import MergetuneError

Tier = Literal["device", "host", "disk"]
_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*")
# numpy has no bfloat16: a bf16 store is kept as its 16-bit patterns and viewed as bf16 by torch
_NUMPY_STORAGE = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.int16}


def parse_bytes(value: int | str, field: str) -> int:
    """A byte count from an int or a string such as ``"24GB"``, ``"1.5 GiB"``, ``"800MB"``; errors name ``field``."""
    if isinstance(value, bool):
        raise MergetuneError(f"{field}: expected a size such as 24GB or a byte count, got {value!r}")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.fullmatch(str(value))
        unit = match.group(2).upper() if match else None
        if match is None or unit not in _UNITS:
            raise MergetuneError(
                f"{field}: cannot read {value!r} as a size; write a byte count or a number with a unit, "
                f"one of {[u for u in _UNITS if u]} (e.g. 24GB)"
            )
        size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise MergetuneError(f"{field}: {value!r} must be a positive size")
    return size


def format_bytes(size: int) -> str:
    """``1.23 GiB``-style, for reports."""
    value, unit = float(size), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"


@dataclass(frozen=True)
class Residency:
    """The tier a store lives in, the device that merges it, and (disk tier) its file."""

    tier: Tier
    merge_device: str = "cpu"
    path: str | None = None
    store_bytes: int = 0
    reason: str = ""

    @property
    def store_device(self) -> torch.device:
        """Where the store's tensors are: the merge device for the device tier, else the CPU."""
        return torch.device(self.merge_device) if self.tier == "device" else torch.device("cpu")

    def describe(self) -> str:
        """One line for the search's start line and the results: tier, size and why."""
        where = {
            "device": f"on {self.merge_device}",
            "host": "in host memory",
            "disk": f"memory-mapped from {self.path}",
        }
        return f"store {format_bytes(self.store_bytes)} {where[self.tier]} (tier {self.tier}: {self.reason})"

    def on(self, merge_device: str | torch.device) -> Residency:
        return dataclasses.replace(self, merge_device=str(torch.device(merge_device)))


@dataclass(frozen=True)
class MemoryBudget:
    """How much memory the store may take: ``memory`` of host RAM, ``device_memory`` of the merge device.

    None means no limit. ``disk_dir`` is where a disk-tier store file is written (default: a
    ``mergetune-store`` folder in the system's temporary directory); ``tier`` forces a tier.
    """

    memory: int | None = None
    device_memory: int | None = None
    disk_dir: str | None = None
    tier: Tier | None = None

    def choose(self, store_bytes: int, merge_device: str | torch.device, key: str) -> Residency:
        """The tier for a store of ``store_bytes`` merged on ``merge_device``; ``key`` names its disk file."""
        device = torch.device(merge_device)
        tier, reason = self._tier(store_bytes, device)
        path = str(self.store_path(key)) if tier == "disk" else None
        return Residency(tier, str(device), path, store_bytes, reason)

    def _tier(self, size: int, device: torch.device) -> tuple[Tier, str]:
        if self.tier is not None:
            return self.tier, "chosen in the config"
        fits_host = self.memory is None or size <= self.memory
        if device.type == "cpu":
            if fits_host:
                return "device", "fits the memory budget" if self.memory is not None else "no memory budget"
            return "disk", f"larger than the memory budget of {format_bytes(self.memory or 0)}"
        if self.device_memory is None or size <= self.device_memory:
            return "device", "fits the device memory budget" if self.device_memory is not None else "no device budget"
        if fits_host:
            return "host", f"larger than the device memory budget of {format_bytes(self.device_memory)}"
        return "disk", f"larger than both the device and the memory budgets ({format_bytes(self.memory or 0)})"

    def store_path(self, key: str) -> Path:
        folder = Path(self.disk_dir) if self.disk_dir else Path(tempfile.gettempdir()) / "mergetune-store"
        return folder / f"store-{key}.bin"


def allocate_store(
    residency: Residency, n_tasks: int, numel: int, dtype: torch.dtype, *, on_host: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty ``tau [T, D]`` and ``base [D]`` where the residency says (``on_host``: on the CPU whatever the tier
    but disk, for a store that is filled once and shared through Ray's object store before being placed)."""
    if residency.tier == "disk":
        return _map_file(_writing_path(residency), n_tasks, numel, dtype, mode="w+")
    device = torch.device("cpu") if on_host else residency.store_device
    pin = residency.tier == "host" and torch.device(residency.merge_device).type == "cuda" and not on_host
    tau = torch.empty(n_tasks, numel, dtype=dtype, device=device, pin_memory=pin)
    return tau, torch.empty(numel, dtype=dtype, device=device, pin_memory=pin)


def finish_disk_store(residency: Residency) -> None:
    """Move a filled disk store into place: atomically, so a process mapping an older file keeps reading it.

    The written pages are in the shared page cache, so a reader mapping the file sees them at once;
    the kernel writes them back to the file when it likes (no flush is needed to read them).
    """
    assert residency.path is not None
    os.replace(_writing_path(residency), residency.path)


def discard_disk_store(residency: Residency) -> None:
    """Remove a disk store being written (its fill failed): no half-written file is left behind."""
    if residency.tier == "disk":
        _writing_path(residency).unlink(missing_ok=True)


def open_disk_store(residency: Residency, n_tasks: int, numel: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """The store of a disk residency, mapped read-only (each process that opens it shares the page cache)."""
    assert residency.path is not None
    if not Path(residency.path).is_file():
        raise MergetuneError(
            f"the disk-tier store {residency.path} is missing on this machine: it is written by the process that "
            "loads the models; set resources.disk_dir to a folder every worker can read"
        )
    return _map_file(Path(residency.path), n_tasks, numel, dtype, mode="r")


def scratch_buffer(residency: Residency, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An empty tensor backed by a scratch file beside a disk-tier store, mapped read-write and unlinked at once.

    For a cache as large as the task vectors (PCB's β, DELLA's ranks, the mergekit tie rule's order scores):
    held in memory, it would break the memory budget that sent the store to disk. Its pages are the page
    cache's, as the store's are (the kernel writes them back to the file and drops them under pressure), and
    the file has no name: its blocks are freed when the process ends, however it ends.
    """
    assert residency.path is not None
    folder = Path(residency.path).parent
    folder.mkdir(parents=True, exist_ok=True)
    nbytes = max(1, math.prod(shape)) * dtype.itemsize
    handle, name = tempfile.mkstemp(prefix="scratch-", suffix=".bin", dir=folder)
    try:
        reserve_blocks(handle, Path(name), nbytes, "a scratch file (a cache as large as the task vectors)")
        array = np.memmap(name, dtype=np.uint8, mode="r+", shape=(nbytes,))
    finally:
        os.close(handle)
        os.unlink(name)  # the map keeps the file's blocks until it is closed
    return torch.from_numpy(array).view(dtype)[: math.prod(shape)].view(shape)


def reserve_blocks(fd: int, path: Path, nbytes: int, what: str) -> None:
    """Give a file that will be written through a map its ``nbytes`` of disk blocks now.

    A page written through a map of a sparse file gets its block when the kernel writes it back; on a full
    disk that is a SIGBUS that kills the process mid-merge, with no message. Reserved first, a full disk is
    this error instead, naming the file, the size and the room left.
    """
    if not hasattr(os, "posix_fallocate"):  # not on macOS: the file stays sparse
        os.ftruncate(fd, max(nbytes, 1))
        return
    try:
        os.posix_fallocate(fd, 0, max(nbytes, 1))
    except OSError as exc:
        free = shutil.disk_usage(path.parent).free
        raise MergetuneError(
            f"cannot reserve {format_bytes(nbytes)} for {what} at {path}: {exc.strerror} ({format_bytes(free)} "
            "free there); free some space, or set resources.disk_dir to a folder with room"
        ) from exc


def round_up(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple of ``multiple`` (file offsets and sizes aligned to blocks or pages)."""
    return -(-n // multiple) * multiple


def _writing_path(residency: Residency) -> Path:
    assert residency.path is not None
    path = Path(residency.path)
    return path.with_name(f"{path.name}.writing-{os.getpid()}")


def _map_file(path: Path, n_tasks: int, numel: int, dtype: torch.dtype, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    if dtype not in _NUMPY_STORAGE:
        raise MergetuneError(f"storage dtype {dtype} is not one of float32, bfloat16, float16")
    shape = (n_tasks + 1, max(numel, 1))
    if mode == "w+":
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(path, "wb") as f:
                reserve_blocks(f.fileno(), path, math.prod(shape) * dtype.itemsize, "the disk-tier store")
        except BaseException:
            path.unlink(missing_ok=True)  # a full disk must not keep a half-reserved file
            raise
        mode = "r+"
    array = np.memmap(path, dtype=_NUMPY_STORAGE[dtype], mode=mode, shape=shape)
    with warnings.catch_warnings():  # read-only map: the merge only reads the store
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        flat = torch.from_numpy(array)
    if dtype == torch.bfloat16:
        flat = flat.view(torch.bfloat16)
    return flat[:n_tasks, :numel], flat[n_tasks, :numel]
