"""Chunks of the store on the merge device, in float32: read in place, or copied ahead of the merge.

A device-tier store is on the merge device already: each chunk is a view (widened to float32 when
the store is 16-bit). A host- or disk-tier store is copied to the merge device chunk by chunk. On
CUDA the copy of chunk i + 1 is issued on a side stream while chunk i merges on the main stream
(the host memory is pinned for the host tier, so the copy is asynchronous); elsewhere the copy is a
plain synchronous one. The CUDA part (``_CudaPrefetch``) is small and has been run on CPU only.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

import torch


class FlatRange(Protocol):
    """A flat range of the store (``context.WorkItem``)."""

    start: int
    stop: int


def to_device(values: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """``values`` with every tensor on ``device`` (no copy when already there); other values unchanged."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in values.items()}


class ChunkStream:
    """Iterates ``(tau[:, start:stop], base[start:stop])`` for each item, on ``device`` and in float32."""

    def __init__(self, tau: torch.Tensor, base: torch.Tensor, items: Sequence[FlatRange], device: torch.device) -> None:
        self.tau, self.base, self.items, self.device = tau, base, items, device

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.tau.device == self.device:
            for it in self.items:
                yield _widened(self.tau[:, it.start : it.stop]), _widened(self.base[it.start : it.stop])
        elif self.device.type == "cuda":
            yield from _CudaPrefetch(self.tau, self.base, self.items, self.device)
        else:
            for it in self.items:
                tau = self.tau[:, it.start : it.stop].to(self.device)
                yield _widened(tau), _widened(self.base[it.start : it.stop].to(self.device))


def _widened(chunk: torch.Tensor) -> torch.Tensor:
    """float32 for the merge (a no-op, hence no copy, for a float32 store)."""
    return chunk.to(torch.float32)


class _CudaPrefetch:
    """Copies chunk i + 1 to the GPU on a side stream while the caller merges chunk i (unchecked on a GPU)."""

    def __init__(self, tau: torch.Tensor, base: torch.Tensor, items: Sequence[FlatRange], device: torch.device) -> None:
        self.tau, self.base, self.items, self.device = tau, base, items, device
        self.copy_stream = torch.cuda.Stream(device)

    def _issue(self, item: FlatRange) -> tuple[torch.Tensor, torch.Tensor, torch.cuda.Event]:
        with torch.cuda.stream(self.copy_stream):
            tau = self.tau[:, item.start : item.stop].to(self.device, non_blocking=True)
            base = self.base[item.start : item.stop].to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.copy_stream)
        return tau, base, done

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if not self.items:
            return
        pending = self._issue(self.items[0])
        for nxt in [*self.items[1:], None]:
            tau, base, done = pending
            torch.cuda.current_stream(self.device).wait_event(done)
            # the merge stream uses memory the copy stream allocated: tell the allocator not to reuse it early
            tau.record_stream(torch.cuda.current_stream(self.device))
            base.record_stream(torch.cuda.current_stream(self.device))
            if nxt is not None:
                pending = self._issue(nxt)
            yield _widened(tau), _widened(base)
