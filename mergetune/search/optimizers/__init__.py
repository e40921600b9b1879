"""The optimizer registry: a config name -> an Optimizer adapter class (one plug-in per module)."""

from __future__ import annotations

import importlib
from typing import Any

from mergetune.errors import MergetuneError
from mergetune.search.optimizers.base import FAILED_LOSS, Optimizer, Outcome, Proposal
from mergetune.search.space import SearchSpace

_MODULES = ("optuna_samplers", "nevergrad_opt", "cma_opt", "grid")
OPTIMIZERS: dict[str, type[Optimizer]] = {}

for _module in _MODULES:
    for _cls in importlib.import_module(f"{__name__}.{_module}").OPTIMIZERS:
        OPTIMIZERS[_cls.name] = _cls


def make_optimizer(
    name: str, space: SearchSpace, *, seed: int, batch_size: int, budget: int | None, options: dict[str, Any]
) -> Optimizer:
    if name not in OPTIMIZERS:
        raise MergetuneError(f"unknown optimizer '{name}'; available: {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[name](space, seed=seed, batch_size=batch_size, budget=budget, **options)


__all__ = ["FAILED_LOSS", "OPTIMIZERS", "Optimizer", "Outcome", "Proposal", "make_optimizer"]
