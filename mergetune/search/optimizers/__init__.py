"""Optimizers for the search: two kinds (``base``), one registry (``registry``), one plug-in per module.

A plug-in module defines its classes and registers each with ``@register_optimizer``; importing this
package imports the plug-ins below so that the registry is complete. Plug-ins do not import one
another: what external optimizers share lives in ``_external``.
"""

from __future__ import annotations

import importlib

from mergetune.search.optimizers.base import (
    FAILED_LOSS,
    ExternalOptimizer,
    History,
    Optimizer,
    Outcome,
    Proposal,
    SamplerOptimizer,
)
from mergetune.search.optimizers.registry import (
    OPTIMIZERS,
    OptimizerRegistrationError,
    UnknownOptimizerError,
    make_optimizer,
    optimizer_class,
    register_optimizer,
)

PLUGINS = ("optuna_samplers", "nevergrad_opt", "cma_opt", "grid")  # cheap to import: heavy libraries load on use

for _plugin in PLUGINS:
    importlib.import_module(f"{__name__}.{_plugin}")

__all__ = [
    "FAILED_LOSS",
    "OPTIMIZERS",
    "ExternalOptimizer",
    "History",
    "Optimizer",
    "OptimizerRegistrationError",
    "Outcome",
    "Proposal",
    "SamplerOptimizer",
    "UnknownOptimizerError",
    "make_optimizer",
    "optimizer_class",
    "register_optimizer",
]
