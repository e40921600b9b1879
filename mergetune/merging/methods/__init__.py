"""The one registry of merge methods: name -> method object.

Each method lives in its own module (named after the paper) that lists its method classes in
``METHODS``; this package imports the modules below, in this order, and registers their classes in the
table of :mod:`.registry` (a method module that looks others up imports that module, not this package).
"""

from __future__ import annotations

import importlib

from mergetune.merging.methods.base import ChunkMethod, MergeMethod, MethodOptions, Prepared, TensorMethod
from mergetune.merging.methods.registry import METHODS, get_method, method_kind, register

_MODULES = ("task_arithmetic", "ties", "dare", "breadcrumbs", "della", "pcb", "tsv", "twin")


for _module in _MODULES:
    for _cls in importlib.import_module(f"{__name__}.{_module}").METHODS:
        register(_cls())

__all__ = [
    "METHODS",
    "ChunkMethod",
    "MergeMethod",
    "MethodOptions",
    "Prepared",
    "TensorMethod",
    "get_method",
    "method_kind",
    "register",
]
