"""Optimizers for the search: two kinds (``base``), one registry (``registry``), one plug-in per module.

A plug-in module defines its classes and registers each with ``@register_optimizer``; importing this
package imports the plug-ins (the first import below) so that the registry is complete. Plug-ins do
not import one another: what external optimizers share lives in ``_external``. Importing them is
cheap: pycma, Nevergrad and Optuna's GP (torch) load when an optimizer first uses them.
"""

from __future__ import annotations

# The plug-ins register themselves on import (a new one is one more name here).
from mergetune.search.optimizers import cma_opt, grid, nevergrad_opt, optuna_samplers, pymoo_opt  # noqa: F401
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
