"""Whether an "exact" mergekit export is exact on these weights: ties at a cut and exact cancels, counted.

A recipe whose ``tie_rule`` / ``sign_cancel`` options are not mergekit's own merges the same weights
as mergekit only where no magnitude is tied at a top-k cut and no weighted sign sum cancels exactly,
which depends on the weights (bf16-rounded checkpoints tie often). The method's ``audit`` counts both
tensor by tensor (``mergekit_spec.TensorAudit``); this module streams the tensors to it: one tensor of
the base and of each expert at a time, read from their safetensors files, the task vectors computed in
float32 as mergekit computes them with ``dtype: float32``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from mergetune.export.layout import model_folder
from mergetune.merging.loading import SAFETENSORS_FILE, SAFETENSORS_INDEX, load_model
from mergetune.merging.mergekit_spec import AuditCounts, ExportTables, MergekitUnsupported, TensorAudit
from mergetune.recipe import Recipe


def audit_notes(recipe: Recipe, tables: ExportTables, audit: TensorAudit) -> list[str]:
    """The audit's counts over every merged tensor, as notes (empty: the export is exact on these weights)."""
    total = AuditCounts()
    merged = [i for i, m in enumerate(tables.merged) if m]
    for i, tau in zip(merged, task_vectors(recipe, [tables.names[i] for i in merged]), strict=True):
        total.add(audit.check(tau, tables.weight[:, i], tables.density[:, i]), tables.names[i])
    return total.notes(audit.sign_cancel)


def task_vectors(recipe: Recipe, names: list[str]) -> Iterator[torch.Tensor]:
    """``[T, n]`` float32 task vectors θ_t − θ_0 of each named tensor, flattened, one tensor at a time."""
    with ExitStack() as stack:
        base = _Reader(stack, recipe.base, None)
        experts = [_Reader(stack, e.model, e.revision) for e in recipe.experts]
        for name in names:
            theta0 = base.get(name).to(torch.float32).reshape(-1)
            yield torch.stack([e.get(name).to(torch.float32).reshape(-1) - theta0 for e in experts])


class _Reader:
    """One model's tensors by name: lazily from safetensors files, else from the whole loaded checkpoint."""

    def __init__(self, stack: ExitStack, model: str, revision: str | None) -> None:
        self.model = model
        folder = model_folder(model, revision)
        self.files: dict[str, Any] = {}
        for file in safetensors_files(folder):
            handle = stack.enter_context(safe_open(str(file), framework="pt"))
            self.files.update(dict.fromkeys(handle.keys(), handle))
        self.state = None if self.files else load_model(folder).state

    def get(self, name: str) -> torch.Tensor:
        if self.state is not None and name in self.state:
            return self.state[name]
        if name in self.files:
            return self.files[name].get_tensor(name)
        raise MergekitUnsupported(
            f"{self.model}: has no tensor '{name}', which the base has; mergekit merges tensors of the same names"
        )


def safetensors_files(folder: Path) -> list[Path]:
    """The folder's safetensors files (sharded through the index, or the single file); [] if none."""
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        return [folder / f for f in dict.fromkeys(json.loads(index.read_text())["weight_map"].values())]
    single = folder / SAFETENSORS_FILE
    return [single] if single.is_file() else []
