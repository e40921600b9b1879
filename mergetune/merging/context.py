"""One candidate's view of the resident state (``MergeContext``) and what it is built on (``Layout``).

Apart from the engine so that the method interface (``methods/base.py``) can name the type its hooks
receive without importing the engine, which imports the methods.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from mergetune.merging.layer_groups import LayerGroups
from mergetune.merging.modelset import ModelSet, Segment
from mergetune.merging.ops import tensor_keys
from mergetune.merging.stats import (
    NaiveStatistics,
    OrderStatistics,
    RowLayout,
    Scope,
    ScoreFn,
    abs_scores,
    build_row_layout,
    keep_counts,
)
from mergetune.strict import StrictModel


@dataclass(frozen=True)
class WorkItem:
    """A chunk of whole rows of one tensor: flat range [start, stop), rows [row_lo, row_hi)."""

    segment: int
    start: int
    stop: int
    row_lo: int
    row_hi: int
    row_length: int

    @property
    def rows(self) -> int:
        return self.row_hi - self.row_lo


def plan_items(segments: list[Segment], chunk_size: int) -> list[WorkItem]:
    items: list[WorkItem] = []
    row = 0
    for i, seg in enumerate(segments):
        L = seg.row_length
        n_rows = seg.numel // L
        per_chunk = max(1, chunk_size // L)
        for r0 in range(0, n_rows, per_chunk):
            r1 = min(n_rows, r0 + per_chunk)
            items.append(WorkItem(i, seg.offset + r0 * L, seg.offset + r1 * L, row + r0, row + r1, L))
        row += n_rows
    return items


def item_args(
    items: list[WorkItem],
    row_args: Mapping[str, torch.Tensor],
    element_args: Mapping[str, torch.Tensor],
    static: Mapping[str, Any],
) -> Iterator[tuple[WorkItem, dict[str, Any]]]:
    """Each work item with its slice of the per-row (``[T or 1, R, 1]``) and per-entry (``[T or 1, R, L]``) args."""
    for it in items:
        R, L = it.rows, it.row_length
        args: dict[str, Any] = dict(static)
        for name, v in row_args.items():
            args[name] = v[:, it.row_lo : it.row_hi].unsqueeze(-1)
        for name, v in element_args.items():
            args[name] = v[:, it.start : it.stop].view(v.shape[0], R, L)
        yield it, args


class MergeContext:
    """One candidate's view of the resident state: what a method's ``prepare`` may use."""

    def __init__(
        self,
        layout: Layout,
        weight: torch.Tensor,
        density: torch.Tensor,
        options: StrictModel,  # the method's validated Options
        seed: int,
    ) -> None:
        self.layout = layout
        self.modelset = layout.modelset
        self.groups = layout.groups
        self.rows = layout.rows
        self.stats = layout.stats
        self.weight = weight  # [T, G] float64
        self.density = density  # [T, G] float64
        self.options = options
        self.seed = seed

    @property
    def n_tasks(self) -> int:
        return self.modelset.n_tasks

    def per_row(self, values: torch.Tensor) -> torch.Tensor:
        """Broadcast ``[T, G]`` (or ``[G]``) values to rows: ``[T, n_rows]`` float32."""
        return values.to(torch.float32)[..., self.rows.group]

    def keep_threshold(
        self, density: torch.Tensor, scope: Scope, kind: str = "abs", compute: ScoreFn = abs_scores
    ) -> torch.Tensor:
        """Per-row score threshold keeping the top ``density`` of each block (``[T, n_rows]``)."""
        _, length = self.rows.blocks(scope, self.modelset)
        return self.stats.kth_largest(kind, scope, keep_counts(density, length, self.rows.group), compute)

    def random_keys(self) -> dict[str, torch.Tensor]:
        """Per-row hash keys and each row's first index in its tensor, for ``ops.row_uniform``."""
        return self.layout.random_keys(self.seed)

    def chunks(
        self, row_args: Mapping[str, torch.Tensor], element_args: Mapping[str, torch.Tensor]
    ) -> Iterator[tuple[torch.Tensor, dict[str, Any]]]:
        """The task vectors chunk by chunk (``[T, R, L]``) with their args: for a pre-pass over the whole model."""
        tau, T = self.modelset.tau, self.n_tasks
        for it, args in item_args(self.layout.items, row_args, element_args, {}):
            yield tau[:, it.start : it.stop].view(T, it.rows, it.row_length), args


class Layout:
    """Everything that depends on the grouping but not on the candidate (cached per granularity)."""

    def __init__(self, modelset: ModelSet, granularity: int, chunk_size: int, naive: bool) -> None:
        self.modelset = modelset
        self.groups: LayerGroups = modelset.layer_groups(granularity)
        group_of_segment = [self.groups.index(s.name) for s in modelset.segments]
        self.rows: RowLayout = build_row_layout(modelset, group_of_segment)
        self.stats = (NaiveStatistics if naive else OrderStatistics)(modelset, self.rows)
        self.items = plan_items(modelset.segments, chunk_size)
        self._keys: dict[int, dict[str, torch.Tensor]] = {}

    def random_keys(self, seed: int) -> dict[str, torch.Tensor]:
        if seed not in self._keys:
            ms = self.modelset
            per_seg = torch.tensor(
                [tensor_keys(seed, s.name, ms.n_tasks) for s in ms.segments], dtype=torch.int64
            )  # [n_seg, T, 2]
            per_row = per_seg.to(ms.device)[self.rows.segment]  # [n_rows, T, 2]
            seg_offset = torch.tensor([s.offset for s in ms.segments], device=ms.device)[self.rows.segment]
            self._keys = {  # only the latest seed is kept: keys are [T, n_rows] int64
                seed: {
                    "key_lo": per_row[..., 0].T.contiguous(),
                    "key_hi": per_row[..., 1].T.contiguous(),
                    "row_offset": (self.rows.start - seg_offset).unsqueeze(0),
                }
            }
        return self._keys[seed]
