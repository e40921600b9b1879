"""mergekit's parameter settings: resolve them exactly as mergekit 0.1.5 does, and encode values.

A setting (``mergekit.config.ParameterSetting``) is one of

- a scalar: the value for every tensor;
- a gradient: a list of numbers, interpolated linearly over the layers of a slice at
  ``t = layer / (layers - 1)`` (``t = 1`` for a one-layer slice; embeddings and final tensors get
  ``t = 0``); a list of booleans or strings picks ``values[int(t * (n - 1))]``;
- a condition ``{filter, value}`` or a list of them: the first whose ``filter`` is a **substring**
  of the tensor name (or is missing or ``"*"``) gives the value (itself a scalar or gradient).

``evaluate`` reproduces ``mergekit.config.evaluate_setting`` (without mergekit installed), for the
importer and for checking what the exporter writes. ``encode`` goes the other way: given one value
per tensor, it writes the shortest setting that gives each tensor its value, a scalar where they
all agree, else conditions whose filters are dotted prefixes or suffixes of the tensor names
("model.layers.3.", ".bias", "embeddings.") chosen so that each matches only tensors that need its
value; the most common value comes last, unconditioned.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from mergetune.errors import MergetuneError

Value = float | bool | int | str
Setting = Any  # Value | list[Value] | dict | list[dict]: YAML-shaped, see the module docstring


def evaluate(setting: Setting, tensor: str, t: float = 0.0) -> Value | None:
    """The value mergekit resolves for ``tensor`` at gradient position ``t`` (None: no condition matched)."""
    if isinstance(setting, Mapping):
        setting = [setting]
    if isinstance(setting, bool | int | float | str):
        return setting
    if not isinstance(setting, list):
        raise MergetuneError(f"unexpected parameter setting {setting!r}: give a number, a list or {{filter, value}}")
    if not setting:
        return None
    if all(isinstance(v, bool | int | float | str) for v in setting):
        return _gradient(setting, t)
    for condition in setting:
        if not isinstance(condition, Mapping) or "value" not in condition:
            raise MergetuneError(f"a list of conditions holds {condition!r}: each must be {{filter: ..., value: ...}}")
        flt = condition.get("filter")
        if flt is None or flt == "*" or (tensor and str(flt) in tensor):
            return evaluate(condition["value"], tensor, t)
    return None


def _gradient(values: list[Value], t: float) -> Value:
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return values[int(t * (len(values) - 1))]
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * float(values[i0]) + frac * float(values[i1])


def encode(values: Mapping[str, Value]) -> Setting:
    """The shortest setting that gives every tensor of ``values`` its value (see the module docstring).

    Only the tensors in ``values`` are considered: a filter may match names outside it (the
    caller passes every tensor that the setting will be resolved for).
    """
    names = list(values)
    classes: dict[Value, list[str]] = {}
    for name in names:
        classes.setdefault(_key(values[name]), []).append(name)
    if len(classes) == 1:
        return values[names[0]]
    counts = Counter({k: len(v) for k, v in classes.items()})
    default = max(classes, key=lambda k: (counts[k], -names.index(classes[k][0])))
    conditions: list[dict[str, Value]] = []
    for key, members in classes.items():
        if key == default:
            continue
        others = [n for n in names if _key(values[n]) != key]
        value = values[members[0]]
        conditions += [{"filter": f, "value": value} for f in cover(members, others)]
    conditions.append({"value": values[classes[default][0]]})
    check(conditions, values)
    return conditions


def cover(members: Sequence[str], others: Sequence[str]) -> list[str]:
    """Few substrings that together match every member and none of ``others`` (greedy set cover).

    Candidates are each member's dotted prefixes and suffixes and its full name; the greedy step
    takes the valid candidate matching the most uncovered members, the shortest on ties.
    """
    candidates = sorted({c for m in members for c in _substrings(m)}, key=lambda c: (len(c), c))
    valid = [c for c in candidates if not any(c in o for o in others)]
    matched = {c: {m for m in members if c in m} for c in valid}
    uncovered, chosen = set(members), []
    while uncovered:
        best = max(valid, key=lambda c: len(matched[c] & uncovered), default=None)
        if best is None or not matched[best] & uncovered:
            missing = sorted(uncovered)[:3]
            raise MergetuneError(
                f"no mergekit filter can address {missing} alone: their names are substrings of other tensors' names"
            )
        chosen.append(best)
        uncovered -= matched[best]
    return chosen


def _substrings(name: str) -> list[str]:
    """``a.b.c`` -> ``a.``, ``a.b.``, ``.c``, ``.b.c``, ``a.b.c``: filters that end or start at a dot."""
    parts = name.split(".")
    prefixes = [".".join(parts[:i]) + "." for i in range(1, len(parts))]
    suffixes = ["." + ".".join(parts[i:]) for i in range(1, len(parts))]
    return [*prefixes, *suffixes, name]


def check(setting: Setting, values: Mapping[str, Value], t: float = 0.0) -> None:
    """Raise if ``setting`` does not resolve to ``values`` for every tensor (an exporter bug, never input)."""
    wrong = [n for n, v in values.items() if _key(evaluate(setting, n, t)) != _key(v)]
    if wrong:
        raise AssertionError(f"encoded setting resolves wrongly for {wrong[:3]}: {setting!r}")


def _key(value: Value | None) -> Value | None:
    """Values compare by type and value: True and 1.0 must stay different classes."""
    return (type(value).__name__, value) if value is not None else None  # type: ignore[return-value]
