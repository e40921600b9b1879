"""The merge methods: one module per paper, each listing its method classes in ``METHODS``.

Importing this package registers every method of the modules below, in this order, in the one
registry (``registry.METHODS``). Everything a part of mergetune needs to know about a method (its
options, search ranges, the paper's default recipe, its mergekit translation) is declared on its
class (see ``base.MergeMethod``), so adding a method means adding its module here and nothing else.
"""

from __future__ import annotations

import importlib

from mergetune.merging.methods.base import ChunkMethod, MergeMethod, MethodOptions, Prepared, TensorMethod
from mergetune.merging.methods.registry import (
    METHODS,
    check_recipe,
    get_method,
    load_recipe,
    method_kind,
    method_options,
    parse_recipe,
    register,
    unregister,
)

_MODULES = (
    "task_arithmetic",
    "ties",
    "dare",
    "breadcrumbs",
    "della",
    "sce",
    "ram",
    "ramplus_tl",
    "pcb",
    "tsv",
    "regmean",
    "iso",
    "linear",
    "spherical",
    "nearswap",
    "model_stock",
    "arcee_fusion",
    "twin",
)

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
    "check_recipe",
    "get_method",
    "load_recipe",
    "method_kind",
    "method_options",
    "parse_recipe",
    "register",
    "unregister",
]
