"""The optimizer registry: a config name -> its optimizer class, checked when it is registered.

Registering is the only step that makes an optimizer usable: the config's ``optimizer.name`` is
validated against this registry (there is no second list of names), and ``make_optimizer`` builds
from it. A class is refused here, at import time, when it is not one of the two kinds or leaves a
hook of its kind abstract: an external optimizer without ``propose`` would otherwise have run as
the study's random search without a word.
"""

from __future__ import annotations

import inspect
from typing import Any, TypeVar

from mergetune.errors import MergetuneError
from mergetune.search.optimizers.base import ExternalOptimizer, Optimizer, SamplerOptimizer
from mergetune.search.space import SearchSpace

OPTIMIZERS: dict[str, type[Optimizer]] = {}
KINDS = (SamplerOptimizer, ExternalOptimizer)

OptimizerClass = TypeVar("OptimizerClass", bound=type[Optimizer])


class OptimizerRegistrationError(TypeError):
    """A class cannot be registered as an optimizer (a programming error in a plug-in)."""


class UnknownOptimizerError(MergetuneError, ValueError):
    """A config names an optimizer that is not registered (a ValueError, so pydantic reports it by field)."""


def register_optimizer(cls: OptimizerClass) -> OptimizerClass:
    """Register ``cls`` under ``cls.name`` (usable as a class decorator); refuse an incomplete class."""
    if not (isinstance(cls, type) and issubclass(cls, KINDS)):
        raise OptimizerRegistrationError(
            f"{_qualname(cls)} is not an optimizer kind: subclass SamplerOptimizer (gives an Optuna sampler) "
            f"or ExternalOptimizer (proposes points itself)"
        )
    if inspect.isabstract(cls):
        kind = "SamplerOptimizer" if issubclass(cls, SamplerOptimizer) else "ExternalOptimizer"
        raise OptimizerRegistrationError(
            f"{_qualname(cls)} does not implement {sorted(cls.__abstractmethods__)}, required of every {kind}"
        )
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise OptimizerRegistrationError(f"{_qualname(cls)} has no 'name' (the config's optimizer.name)")
    registered = OPTIMIZERS.get(name)
    if registered is not None and _qualname(registered) != _qualname(cls):
        raise OptimizerRegistrationError(f"optimizer name '{name}' is taken by {_qualname(registered)}")
    OPTIMIZERS[name] = cls
    return cls


def optimizer_class(name: str) -> type[Optimizer]:
    """The class registered as ``name``; a clear error naming the available ones otherwise."""
    if name not in OPTIMIZERS:
        raise UnknownOptimizerError(f"unknown optimizer '{name}'; available: {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[name]


def make_optimizer(
    name: str, space: SearchSpace, *, seed: int, batch_size: int, budget: int | None, options: dict[str, Any]
) -> Optimizer:
    return optimizer_class(name)(space, seed=seed, batch_size=batch_size, budget=budget, **options)


def _qualname(cls: Any) -> str:
    return f"{getattr(cls, '__module__', '?')}.{getattr(cls, '__qualname__', repr(cls))}"
