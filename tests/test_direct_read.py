"""Reading a disk-tier store with direct I/O ahead of the merge (``merging.direct_read``).

The expectations are the store's own values, read back with numpy from the same file; the merges are
compared with the resident store's, bit for bit.
"""

from __future__ import annotations

import errno
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from mergetune.errors import MergetuneError
from mergetune.merging import direct_read
from mergetune.merging.engine import Merger
from mergetune.merging.modelset import ModelSet
from mergetune.merging.residency import MemoryBudget
from mergetune.recipe import Expert, Recipe

T, D = 3, 50_001  # a row length whose bytes are no multiple of the 4 KiB alignment
NUMPY = {torch.float32: np.float32, torch.bfloat16: np.int16}


@dataclass(frozen=True)
class Item:
    start: int
    stop: int


def write_store(path: Path, dtype: torch.dtype) -> torch.Tensor:
    """A ``[T + 1, D]`` store file of random values; returns them as float32."""
    values = torch.randn(T + 1, D, generator=torch.Generator().manual_seed(3)).to(dtype)
    raw = values.view(torch.int16) if dtype == torch.bfloat16 else values
    raw.numpy().astype(NUMPY[dtype]).tofile(path)
    return values.to(torch.float32)


def items_of(sizes: list[int]) -> list[Item]:
    out, a = [], 0
    for n in sizes:
        out.append(Item(a, min(D, a + n)))
        a = min(D, a + n)
    return out + ([Item(a, D)] if a < D else [])


def reader_for(path: Path, dtype: torch.dtype) -> direct_read.DirectReader:
    reader = direct_read.open_direct(path, T, D, dtype)
    if reader is None:
        pytest.skip(f"the file system of {path.parent} refuses direct I/O (the map is read instead)")
    return reader


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_chunks_are_the_stores_entries_in_float32(tmp_path: Path, dtype: torch.dtype, monkeypatch) -> None:
    """Windows of 2 KiB-aligned entries (small, so that a pass spans many windows, some items longer than a
    window) give every item's ``tau [T, n]`` and ``base [n]`` exactly; a second pass reads them again."""
    monkeypatch.setattr(direct_read, "WINDOW_BYTES", 3 * 4096)
    expected = write_store(tmp_path / "store.bin", dtype)
    items = items_of([1, 4096, 7, 9000, 30_000, 333, 5000])  # 9000 and 30 000 entries exceed a window
    reader = reader_for(tmp_path / "store.bin", dtype)
    try:
        for _ in range(2):
            got = list(reader.chunks(items))
            assert len(got) == len(items)
            for it, (tau, base) in zip(items, got, strict=True):
                assert tau.dtype == base.dtype == torch.float32 and tau.shape == (T, it.stop - it.start)
                assert torch.equal(tau, expected[:T, it.start : it.stop])
                assert torch.equal(base, expected[T, it.start : it.stop])
    finally:
        reader.close()


def test_a_truncated_store_is_an_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "store.bin"
    write_store(path, torch.bfloat16)
    reader = reader_for(path, torch.bfloat16)
    os.truncate(path, (T * D + D // 2) * 2)  # the base's second half is gone
    try:
        with pytest.raises(MergetuneError, match=rf"store {path} ended at byte .* truncated or replaced"):
            list(reader.chunks(items_of([4096] * 20)))
    finally:
        reader.close()


def test_a_merge_that_stops_early_stops_the_reader(tmp_path: Path, monkeypatch) -> None:
    """Leaving the loop after the first chunk (a kernel error) ends the reading thread: the rest is not read."""
    monkeypatch.setattr(direct_read, "WINDOW_BYTES", 4096)
    path = tmp_path / "store.bin"
    write_store(path, torch.bfloat16)
    reader = reader_for(path, torch.bfloat16)
    reads = []
    real = reader.read_row
    monkeypatch.setattr(reader, "read_row", lambda *a: reads.append(a[1:]) or real(*a))
    chunks = reader.chunks(items_of([2048] * 30))
    next(chunks)
    chunks.close()
    reader.close()
    assert not any(t.name == "mergetune-direct-read" for t in threading.enumerate())
    assert len(reads) <= direct_read.SLOTS * (T + 1)  # at most the windows in flight, of 25


def _merges(base: Path, experts: dict[str, Path], tmp_path: Path, method: str) -> tuple[dict, dict]:
    recipe = Recipe(
        base=str(base), experts=[Expert(name=t, model=str(p)) for t, p in experts.items()], method=method, density=0.4
    )
    on_disk = ModelSet.load(base, experts, budget=MemoryBudget(memory=1, disk_dir=str(tmp_path / "store")))
    resident = ModelSet.load(base, experts)
    return Merger(on_disk, compile=False).merge(recipe), Merger(resident, compile=False).merge(recipe)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_linear"])
def test_a_disk_store_read_directly_merges_like_the_resident_one(tiny_llama_dir, tmp_path: Path, method: str) -> None:
    base, experts = tiny_llama_dir
    probe = tmp_path / "probe.bin"
    write_store(probe, torch.bfloat16)
    reader_for(probe, torch.bfloat16).close()  # this file system reads directly: the merge below does too
    got, want = _merges(base, experts, tmp_path, method)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_without_direct_io_the_map_is_read_and_the_merge_is_the_same(
    tiny_llama_dir, tmp_path: Path, monkeypatch
) -> None:
    """A file system that refuses O_DIRECT (EINVAL at open, as some do) or ``MERGETUNE_DIRECT_IO=0``: no reader,
    and the merge reads the store's map, with the same result."""
    real_open = os.open

    def refusing_open(path, flags, *args, **kwargs):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument", str(path))
        return real_open(path, flags, *args, **kwargs)

    probe = tmp_path / "probe.bin"
    write_store(probe, torch.bfloat16)
    monkeypatch.setattr(direct_read.os, "open", refusing_open)
    assert direct_read.open_direct(probe, T, D, torch.bfloat16) is None
    base, experts = tiny_llama_dir
    got, want = _merges(base, experts, tmp_path, "ties")
    assert all(torch.equal(got[k], want[k]) for k in want)
    monkeypatch.setattr(direct_read.os, "open", real_open)
    monkeypatch.setenv("MERGETUNE_DIRECT_IO", "0")
    assert direct_read.open_direct(probe, T, D, torch.bfloat16) is None


def test_a_kernel_error_mid_merge_stops_the_reader_before_the_file_closes(
    tiny_llama_dir, tmp_path: Path, monkeypatch
) -> None:
    """A candidate that fails after a few chunks raises its own error, and the reading thread is gone by then
    (it is joined before the store's descriptor is closed, so it never reads a closed or reused one)."""
    base, experts = tiny_llama_dir
    on_disk = ModelSet.load(base, experts, budget=MemoryBudget(memory=1, disk_dir=str(tmp_path / "store")))
    merger = Merger(on_disk, compile=False, chunk_size=1024)
    real_kernel = Merger._kernel
    calls = []

    def failing_kernel(self, method):
        kernel = real_kernel(self, method)

        def run(*args, **kwargs):
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("kernel failed on the third chunk")
            return kernel(*args, **kwargs)

        return run

    monkeypatch.setattr(Merger, "_kernel", failing_kernel)
    recipe = Recipe(
        base=str(base), experts=[Expert(name=t, model=str(p)) for t, p in experts.items()], method="task_arithmetic"
    )
    with pytest.raises(RuntimeError, match="third chunk"):
        merger.merge(recipe)
    assert not any(t.name == "mergetune-direct-read" for t in threading.enumerate())
