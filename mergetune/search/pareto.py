"""Pareto fronts and the final choice: which recipe a search hands back, by a stated rule.

With many per-task objectives almost half of all candidates are non-dominated, so the front alone
chooses nothing (see shared/docs/search-stack.md, "Many objectives"). The search therefore
optimises 1–3 objectives, records every per-task score, and chooses in three steps:

1. ``rank_finalists``: the ``k`` best completed candidates by the selection rule, feasible first;
2. the caller re-scores those finalists on held-out validation examples the search never saw;
3. ``choose``: the rule applied again to the held-out scores picks one finalist.

**The selection rules** (``selection.rule`` in the search config). Every score is a task's
normalised score (each task's rule, see ``search.normalizations``); ``mean`` and ``worst`` are their
mean and minimum over tasks, computed from ``TrialRecord.normalized`` (never from the objective
values, which may omit them).

- ``best_mean_feasible``: highest mean; ties by highest worst, then lowest trial number;
- ``best_worst_feasible``: highest worst; ties by highest mean, then lowest trial number.

Scores are compared rounded to 12 decimals, so means equal up to float rounding tie.

*Feasible* means every task meets its floor (``objectives.floors``; without floors every completed
candidate is feasible). Feasible candidates always rank before infeasible ones. If no candidate
is feasible, all completed candidates are ranked by their total floor violation
``Σ_t max(0, floor_t − s_t)`` (smallest first), then by the rule; the caller must then report that
no candidate met the floors. Failed and unfinished trials never rank.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from mergetune.search.records import DIRECTION, TrialRecord

RULES = ("best_mean_feasible", "best_worst_feasible")
_TIE_DECIMALS = 12  # scores equal to this many decimals tie (float noise in means does not decide)
_CHUNK_ELEMENTS = 4_000_000  # bound on the [rows, N, K] comparison block pareto_mask builds at once


# ---- dominance ------------------------------------------------------------------------------------
def pareto_mask(values: np.ndarray, maximize: Sequence[bool]) -> np.ndarray:
    """Boolean mask of the non-dominated rows of an ``[N, K]`` array.

    Each column is oriented so that larger is better (``maximize[k]`` False negates it). Row ``i`` is
    dominated when another row is ≥ in every objective and > in at least one, so identical rows
    never dominate each other and are all kept. NaN counts as the worst possible value. Vectorised
    in row chunks: O(N²K) time, memory bounded by ``_CHUNK_ELEMENTS``.
    """
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"values must be a 2-D [N, K] array, got shape {arr.shape}")
    if len(maximize) != arr.shape[1]:
        raise ValueError(f"{len(maximize)} directions for {arr.shape[1]} objective column(s)")
    n, k = arr.shape
    if n == 0 or k == 0:
        return np.ones(n, dtype=bool)
    signs = np.where(np.asarray(maximize, dtype=bool), 1.0, -1.0)
    oriented = np.nan_to_num(arr * signs, nan=-np.inf)
    dominated = np.zeros(n, dtype=bool)
    step = max(1, _CHUNK_ELEMENTS // (n * k))
    for start in range(0, n, step):
        rows = oriented[start : start + step, None, :]  # [r, 1, K]
        others_ge = (oriented[None, :, :] >= rows).all(axis=2)  # [r, N]: other j ≥ row i everywhere
        others_gt = (oriented[None, :, :] > rows).any(axis=2)  # [r, N]: other j > row i somewhere
        dominated[start : start + step] = (others_ge & others_gt).any(axis=1)
    return ~dominated


def optimized_front(records: Sequence[TrialRecord], objectives: Sequence[str]) -> list[TrialRecord]:
    """The non-dominated completed records on the optimised objectives, best first.

    Directions come from ``records.DIRECTION`` (``mean``/``worst`` maximised, ``sparsity`` minimised).
    Records without a value for every objective are left out. Sorted by the first objective (best
    first), ties by the next objectives, then by trial number.
    """
    unknown = [o for o in objectives if o not in DIRECTION]
    if unknown:
        raise ValueError(f"unknown objective(s) {unknown}; known: {sorted(DIRECTION)}")
    return front_by_values(records, objectives, [DIRECTION[o] == "maximize" for o in objectives])


def front_by_values(
    records: Sequence[TrialRecord], objectives: Sequence[str], maximize: Sequence[bool]
) -> list[TrialRecord]:
    """``optimized_front`` with explicit directions (for studies whose objective names are generic)."""
    done = [r for r in records if r.distinct and all(_finite(r.values.get(o)) for o in objectives)]
    if not done:
        return []
    matrix = np.array([[r.values[o] for o in objectives] for r in done], dtype=np.float64)
    front = [r for r, keep in zip(done, pareto_mask(matrix, maximize), strict=True) if keep]
    signs = [1.0 if m else -1.0 for m in maximize]
    return sorted(front, key=lambda r: (*(-s * r.values[o] for s, o in zip(signs, objectives, strict=True)), r.number))


def per_task_front(records: Sequence[TrialRecord]) -> list[TrialRecord]:
    """The non-dominated completed records on the per-task normalised scores (all maximised).

    Tasks are those of the completed records (first seen first); a missing task score counts as the
    worst value. Sorted by mean normalised score (highest first), then trial number. Expect this
    set to be large with many tasks: it is a record of trade-offs, not a choice.
    """
    done = [r for r in records if r.distinct and r.normalized]
    tasks = task_names(done)
    if not done:
        return []
    matrix = np.array([[r.normalized.get(t, np.nan) for t in tasks] for r in done], dtype=np.float64)
    front = [r for r, keep in zip(done, pareto_mask(matrix, [True] * len(tasks)), strict=True) if keep]
    return sorted(front, key=lambda r: (-mean_of(r.normalized), r.number))


# ---- the selection rule ---------------------------------------------------------------------------
def rank_finalists(
    records: Sequence[TrialRecord], rule: str, k: int, *, floors: Mapping[str, float] | None = None
) -> list[TrialRecord]:
    """The ``k`` best completed records by ``rule`` (see the module docstring), feasible first.

    Feasible records (``record.feasible``) come first, ranked by the rule; if fewer than ``k`` are
    feasible the remaining places go to infeasible ones, ranked by total floor violation (smallest
    first) then the rule. With no feasible record at all, this is the ranking of every completed
    record. The violation uses ``floors`` (task -> floor on the normalised score) when given, else
    the record's stored constraints if it carries them (``floor_t − s_t``), else 0 (rule only).
    """
    _check_rule(rule)
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    done = [r for r in records if r.distinct]  # a reused trial is the same recipe as its source
    key = _rule_key(rule)

    def rank(r: TrialRecord) -> tuple[Any, ...]:
        return (not r.feasible, 0.0 if r.feasible else violation(r, floors), key(r.normalized), r.number)

    return sorted(done, key=rank)[:k]


def choose(
    finalists: Sequence[TrialRecord],
    rescored: Sequence[Mapping[str, Any] | None] | None,
    rule: str,
) -> int:
    """Index in ``finalists`` of the chosen recipe.

    The rule is applied to the held-out re-scores when given (``rescored[i]`` is finalist ``i``'s
    ``{task: normalised}``, or a ``{"normalized": {...}, ...}`` dict as ``write_results`` takes;
    ``None`` for a finalist whose re-score failed ranks it after every re-scored one), else to the
    search scores. Ties are broken by the search scores under the same rule, then by the lowest
    trial number. Feasible finalists are preferred: an infeasible one is chosen only when no
    finalist met the floors during the search.
    """
    _check_rule(rule)
    if not finalists:
        raise ValueError("no finalists to choose from")
    if rescored is not None and len(rescored) != len(finalists):
        raise ValueError(f"{len(rescored)} re-score(s) for {len(finalists)} finalist(s)")
    key = _rule_key(rule)
    any_feasible = any(r.feasible for r in finalists)

    def rank(i: int) -> tuple[Any, ...]:
        record = finalists[i]
        held_out = key(heldout_normalized(rescored[i])) if rescored is not None else ()
        return (any_feasible and not record.feasible, held_out, key(record.normalized), record.number)

    return min(range(len(finalists)), key=rank)


def violation(record: TrialRecord, floors: Mapping[str, float] | None = None) -> float:
    """Total floor violation ``Σ_t max(0, floor_t − s_t)`` of a record (0 when nothing says floors)."""
    if floors:
        return float(sum(max(0.0, f - record.normalized.get(t, -math.inf)) for t, f in floors.items()))
    constraints = getattr(record, "constraints", None) or {}
    return float(sum(max(0.0, float(c)) for c in constraints.values()))


# ---- helpers --------------------------------------------------------------------------------------
def mean_of(normalized: Mapping[str, float] | None) -> float:
    """Mean normalised score over tasks; -inf when there is none (ranks last)."""
    values = [float(v) for v in (normalized or {}).values() if _finite(v)]
    return float(np.mean(values)) if values and len(values) == len(normalized or {}) else -math.inf


def worst_of(normalized: Mapping[str, float] | None) -> float:
    """Lowest normalised score over tasks; -inf when there is none or one is not finite."""
    values = [float(v) for v in (normalized or {}).values()]
    return min(values) if values and all(_finite(v) for v in values) else -math.inf


def heldout_normalized(entry: Mapping[str, Any] | None) -> dict[str, float]:
    """``{task: normalised}`` from a re-score entry, bare or wrapped as ``{"normalized": {...}}``."""
    if entry is None:
        return {}
    inner = entry.get("normalized")
    return dict(inner) if isinstance(inner, Mapping) else {str(t): float(v) for t, v in entry.items()}


def task_names(records: Sequence[TrialRecord]) -> list[str]:
    """Every task seen in the records' normalised scores, first seen first."""
    seen: dict[str, None] = {}
    for r in records:
        seen.update(dict.fromkeys(r.normalized))
    return list(seen)


def _rule_key(rule: str) -> Callable[[Mapping[str, float] | None], tuple[float, float]]:
    """Sort key (ascending = better) on a ``{task: normalised}`` mapping for a rule."""
    if rule == "best_mean_feasible":
        return lambda n: (-_rounded(mean_of(n)), -_rounded(worst_of(n)))
    return lambda n: (-_rounded(worst_of(n)), -_rounded(mean_of(n)))


def _rounded(value: float) -> float:
    """Scores compared to 12 decimals, so that means equal up to float rounding tie."""
    return round(value, _TIE_DECIMALS) if math.isfinite(value) else value


def _check_rule(rule: str) -> None:
    if rule not in RULES:
        raise ValueError(f"unknown selection rule {rule!r}; use one of {list(RULES)}")


def _finite(value: Any) -> bool:
    """A finite real number (numpy scalars included; None, NaN, inf and non-numbers are not)."""
    if value is None or isinstance(value, bool | str):
        return False
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False
