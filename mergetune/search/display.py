"""How search numbers are shown in tables and reports (shared by the result files and ``mergetune status``)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np


def fmt(value: Any) -> str:
    """Numbers to 4 decimals, None/non-finite to '–', mappings to 'k: v' lists."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float | np.floating):
        return f"{value:.4f}" if math.isfinite(value) else "–"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}: {fmt(v)}" for k, v in value.items())
    return str(value)
