"""SearchSpace: which recipe parameters are searched, and the map between parameters and Recipes.

A point of the space is a flat dict of named parameters (what Optuna stores and Nevergrad
optimises), e.g. for a space over TIES and PCB with one weight per task and one shared density::

    {"method": "ties", "ties/weight/sst2": 0.8, "ties/weight/mnli": 1.1,
     "ties/density": 0.2, "ties/opt/disjoint": "mean"}

Each method has its own parameters (prefixed by its name): a λ of TIES' dis-mean and one of Task
Arithmetic's sum do not mean the same thing, so sharing them would mislead the optimizer. A
parameter that the chosen method does not use is absent (conditional space).

How finely weights and densities vary (``per``):

- ``shared``: one value for every task and layer group;
- ``task``: one value per task;
- ``group``: one value per layer group, shared by the tasks (with ``anchors``: that many values
  interpolated over depth);
- ``task_group``: one value per task and layer group (with ``anchors``: per task, that many
  values interpolated over depth, the low-dimensional parametrisation that keeps large searches
  tractable).

A weight range may instead follow a named depth schedule (``schedule: lines``, LiNeS, see
``mergetune.merging.lines``): λ of a group = α + β · depth, with α searched in the weight range and
β in ``beta`` (default 0 to the weight range's high), once (``per: shared``) or per task (``per:
task``). The recipe holds the schedule's per-group λ, so it merges exactly what was scored.

Ranges are checked against each parameter's domain when the config is read (finite, low < high,
densities in [0, 1]). A weight range given for the whole space (``space.weight`` low/high) applies
to every method that has no range of its own in ``methods``; without it each method searches its
built-in range (its paper's grid). Points stored by an older run may lie outside the current space:
``admit`` clips or refuses them before they are queued again, so that one bad point cannot crash
every resume.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution
from pydantic import ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer, model_validator

from mergetune.merging.lines import fit_lines, lines_weights
from mergetune.merging.methods import METHODS, get_method
from mergetune.recipe import DType, Expert, Grouping, Recipe, resolve_parameter
from mergetune.strict import StrictModel

log = logging.getLogger(__name__)
Per = Literal["shared", "task", "group", "task_group"]
Schedule = Literal["lines"]
SCHEDULE_KEYS = ("alpha", "beta")  # the parameters of the lines schedule, in parameter names
METHOD_KEY = "method"
SEP = "/"
DENSITY_DOMAIN = (0.0, 1.0)  # a density is the fraction of entries kept
# searched densities of a method without its own range, unless the space gives low/high: keeping
# almost nothing (density near 0) is never a useful merge, so the default range starts at 5%
DEFAULT_DENSITY = (0.05, 1.0)


class FloatRange(StrictModel):
    """A searched float option: its bounds and scale."""

    model_config = ConfigDict(allow_inf_nan=False)

    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _bounds(self) -> FloatRange:
        _check_bounds(self.low, self.high, self.log)
        return self


class ParamRange(StrictModel):
    """How one per-task/per-group parameter (weight or density) is searched."""

    model_config = ConfigDict(allow_inf_nan=False)

    per: Per = "task"
    low: float = 0.0
    high: float = 1.0
    anchors: int | None = Field(
        None, ge=1, description="With per group/task_group: values interpolated over depth (None: one per group)."
    )
    log: bool = False
    schedule: Schedule | None = Field(
        None, description="lines: λ = α + β · depth (LiNeS); α searched in low/high, β in 'beta'; per shared or task."
    )
    beta: FloatRange | None = Field(None, description="With schedule lines: β's range (default 0 to high).")

    @model_validator(mode="after")
    def _bounds(self) -> ParamRange:
        _check_bounds(self.low, self.high, self.log)
        if self.schedule is not None and (self.per not in ("shared", "task") or self.anchors is not None):
            raise ValueError(
                f"schedule: {self.schedule} sets the values over depth itself: use per: shared or per: task, "
                "without anchors"
            )
        if self.beta is not None and self.schedule is None:
            raise ValueError("beta is the slope of a depth schedule: give schedule: lines with it")
        if self.schedule is not None and self.beta is None and self.high <= 0:
            raise ValueError(f"schedule: {self.schedule} with high {self.high} <= 0: give beta: {{low, high}}")
        return self

    @model_serializer(mode="wrap")
    def _without_unset_schedule(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """No schedule keys when there is none: run folders bound before schedules existed still match."""
        data = handler(self)
        return {k: v for k, v in data.items() if k not in ("schedule", "beta") or v is not None}

    def beta_distribution(self) -> FloatDistribution:
        """β's search range: ``beta``, else 0 to ``high`` (the last block's λ reaches at most α + high)."""
        if self.beta is not None:
            return FloatDistribution(self.beta.low, self.beta.high, log=self.beta.log)
        return FloatDistribution(0.0, self.high)

    @property
    def bounds_given(self) -> bool:
        """Whether low or high was set explicitly (in a config or a constructor), not left to its default."""
        return bool({"low", "high"} & self.model_fields_set)


def _check_bounds(low: float, high: float, log_scale: bool) -> None:
    if not low < high:
        raise ValueError(f"low ({low}) must be below high ({high})")
    if log_scale and low <= 0:
        raise ValueError("log scale needs low > 0")


def check_domain(rng: ParamRange, domain: tuple[float, float], what: str) -> None:
    """Refuse a range that leaves its parameter's domain (a density above 1 would crash each such candidate).

    Only weights have a depth schedule (LiNeS scales task vectors): a bounded parameter refuses one.
    """
    if rng.schedule is not None:
        raise ValueError(f"{what}: schedule {rng.schedule} applies to weights only")
    if rng.low < domain[0] or rng.high > domain[1]:
        raise ValueError(f"{what}: range [{rng.low}, {rng.high}] leaves the domain [{domain[0]}, {domain[1]}]")


OptionSpec = float | int | str | bool | list[Any] | FloatRange


class MethodSpace(StrictModel):
    """Per-method overrides: ranges of weight and density, and searched or fixed options."""

    model_config = ConfigDict(allow_inf_nan=False)

    weight: ParamRange | None = None
    density: ParamRange | None = None
    options: dict[str, OptionSpec] = Field(
        default_factory=dict, description="A value fixes an option, a list searches among values, {low, high} a range."
    )


@dataclass(frozen=True)
class Axis:
    """One searched parameter: its name, Optuna distribution and the method that uses it."""

    name: str
    distribution: BaseDistribution
    method: str | None  # None: the method choice itself


class SearchSpace:
    """Maps parameter dicts (and Optuna trials) to Recipes and back."""

    def __init__(
        self,
        base: str,
        experts: Sequence[Expert],
        group_names: Sequence[str],
        methods: Mapping[str, MethodSpace],
        weight: ParamRange,
        density: ParamRange,
        granularity: int = 1,
        seed: int = 0,
        trust_remote_code: bool = False,
        allow_tokenizer_mismatch: bool = False,
        dtype: DType = "float32",
        storage_dtype: DType = "float32",
        fixed_options: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        """``fixed_options``: per method, options every recipe of it carries and no one searches (the data
        files a method reads, e.g. RegMean's ``grams``, computed by the search before the first candidate)."""
        if not methods:
            raise ValueError("the search space needs at least one method")
        for name, spec in methods.items():
            get_method(name).check_experts(len(experts))  # unknown methods, or SLERP given 3 experts: before any trial
            if spec.density is not None:
                check_domain(spec.density, DENSITY_DOMAIN, f"{name}.density")
        check_domain(density, DENSITY_DOMAIN, "density")
        self.base = base
        self.experts = list(experts)
        self.tasks = [e.name for e in experts]
        self.groups = list(group_names)
        self.methods = dict(methods)
        self.granularity = granularity
        self.seed = seed
        self.fixed_options = {m: dict(o) for m, o in (fixed_options or {}).items()}
        # carried into every recipe, so that the chosen one merges and exports as the search loaded it
        self.model_flags = {
            "trust_remote_code": trust_remote_code,
            "allow_tokenizer_mismatch": allow_tokenizer_mismatch,
            "dtype": dtype,  # the experts' (recipe.common_dtype): bf16 experts give a bf16 merge
            "storage_dtype": storage_dtype,  # the store the search merged from (resources.storage_dtype)
        }
        self._weight = weight
        self._density = density
        self.axes = self._build_axes()

    # ---- structure -------------------------------------------------------------------------------
    def weight_range(self, method: str) -> ParamRange:
        spec = self.methods[method].weight
        if spec is not None:
            return spec
        if self._weight.bounds_given:
            return self._weight  # the space's own range, given explicitly, applies to every method
        # the method's own range (its paper's tuned grid), else the default one
        low, high = METHODS[method].search_weight or (self._weight.low, self._weight.high)
        return self._weight.model_copy(update={"low": low, "high": high})

    def density_range(self, method: str) -> ParamRange | None:
        if not METHODS[method].density_used(self.methods[method].options):
            return None
        spec = self.methods[method].density
        if spec is not None:
            return spec
        if self._density.bounds_given:
            return self._density  # the space's own range, given explicitly, applies to every method
        low, high = METHODS[method].search_density or DEFAULT_DENSITY
        return self._density.model_copy(update={"low": low, "high": high})

    def _build_axes(self) -> list[Axis]:
        axes: list[Axis] = []
        if len(self.methods) > 1:
            axes.append(Axis(METHOD_KEY, CategoricalDistribution(list(self.methods)), None))
        for method in self.methods:
            for field in ("weight", "density"):
                rng = self.weight_range(method) if field == "weight" else self.density_range(method)
                if rng is None:
                    continue
                axes += [Axis(name, dist, method) for name, dist in self._param_axes(method, field, rng)]
            for option, spec in self.methods[method].options.items():
                dist = _option_distribution(spec)
                if dist is not None:
                    axes.append(Axis(f"{method}{SEP}opt{SEP}{option}", dist, method))
        return axes

    def _param_axes(self, method: str, field: str, rng: ParamRange) -> list[tuple[str, FloatDistribution]]:
        """(name, distribution) of each searched value of a field; a schedule's β has its own range."""
        dist = FloatDistribution(rng.low, rng.high, log=rng.log)
        names = self._param_names(method, field, rng)
        if rng.schedule is None:
            return [(name, dist) for name in names]
        beta = rng.beta_distribution()
        return [(name, beta if name.split(SEP)[2] == "beta" else dist) for name in names]

    def _param_names(self, method: str, field: str, rng: ParamRange) -> list[str]:
        stem = f"{method}{SEP}{field}"
        if rng.schedule is not None:  # <method>/weight/alpha[/<task>], <method>/weight/beta[/<task>]
            tails = [""] if rng.per == "shared" else [f"{SEP}{t}" for t in self.tasks]
            return [f"{stem}{SEP}{key}{tail}" for tail in tails for key in SCHEDULE_KEYS]
        slots = self._slots(rng)
        if rng.per == "shared":
            return [stem]
        if rng.per == "task":
            return [f"{stem}{SEP}{t}" for t in self.tasks]
        if rng.per == "group":
            return [f"{stem}{SEP}{s}" for s in slots]
        return [f"{stem}{SEP}{t}{SEP}{s}" for t in self.tasks for s in slots]

    def _slots(self, rng: ParamRange) -> list[str]:
        """Names of the per-depth values: the groups, or anchor indices."""
        if rng.anchors is None:
            return list(self.groups)
        return [f"a{i}" for i in range(rng.anchors)]

    @property
    def distributions(self) -> dict[str, BaseDistribution]:
        return {a.name: a.distribution for a in self.axes}

    def axes_for(self, method: str) -> list[Axis]:
        return [a for a in self.axes if a.method in (None, method)]

    @property
    def dimension(self) -> int:
        return len(self.axes)

    # ---- points <-> recipes ----------------------------------------------------------------------
    def method_of(self, params: Mapping[str, Any]) -> str:
        return params.get(METHOD_KEY, next(iter(self.methods)))

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """Define-by-run sampling of one point (only the chosen method's parameters)."""
        params: dict[str, Any] = {}
        if len(self.methods) > 1:
            params[METHOD_KEY] = suggest(trial, METHOD_KEY, self.distributions[METHOD_KEY])
        method = self.method_of(params)
        for axis in self.axes_for(method):
            if axis.method is not None:
                params[axis.name] = suggest(trial, axis.name, axis.distribution)
        return params

    def active(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The parameters the point's method uses (drops the other methods' values)."""
        method = self.method_of(params)
        names = {a.name for a in self.axes_for(method)}
        missing = sorted(names - set(params))
        if missing:
            raise KeyError(f"point for method '{method}' lacks parameters {missing[:5]}")
        return {k: params[k] for k in params if k in names}

    def to_recipe(self, params: Mapping[str, Any]) -> Recipe:
        method = self.method_of(params)
        weight = self._spec(params, method, "weight", self.weight_range(method))
        rng = self.density_range(method)
        density = self._spec(params, method, "density", rng) if rng is not None else 1.0
        return Recipe(
            base=self.base,
            experts=self.experts,
            method=method,
            weight=weight,
            density=density,
            options=self._options(params, method),
            grouping=Grouping(granularity=self.granularity),
            seed=self.seed,
            **self.model_flags,
        )

    def _spec(self, params: Mapping[str, Any], method: str, field: str, rng: ParamRange) -> Any:
        stem = f"{method}{SEP}{field}"
        slots = self._slots(rng)

        def per_depth(prefix: str) -> Any:
            values = [float(params[f"{prefix}{SEP}{s}"]) for s in slots]
            return values if rng.anchors is not None else dict(zip(self.groups, values, strict=True))

        if rng.schedule is not None:
            return self._scheduled(params, stem, rng)
        if rng.per == "shared":
            return float(params[stem])
        if rng.per == "task":
            return {t: float(params[f"{stem}{SEP}{t}"]) for t in self.tasks}
        if rng.per == "group":
            return {"*": per_depth(stem)}
        return {t: per_depth(f"{stem}{SEP}{t}") for t in self.tasks}

    def _scheduled(self, params: Mapping[str, Any], stem: str, rng: ParamRange) -> dict[str, dict[str, float]]:
        """The schedule's λ of every group, per task (or for all tasks: ``*``), from its α and β."""

        def per_group(tail: str) -> dict[str, float]:
            alpha, beta = (float(params[f"{stem}{SEP}{key}{tail}"]) for key in SCHEDULE_KEYS)
            return dict(zip(self.groups, lines_weights(alpha, beta, self.groups).tolist(), strict=True))

        if rng.per == "shared":
            return {"*": per_group("")}
        return {t: per_group(f"{SEP}{t}") for t in self.tasks}

    def _options(self, params: Mapping[str, Any], method: str) -> dict[str, Any]:
        options: dict[str, Any] = dict(self.fixed_options.get(method, {}))
        for option, spec in self.methods[method].options.items():
            name = f"{method}{SEP}opt{SEP}{option}"
            options[option] = params.get(name, spec)
        return options

    def from_recipe(self, recipe: Recipe) -> dict[str, Any]:
        """The point of this space that reproduces a recipe (for warm starts), clipped to bounds.

        Raises ValueError when the recipe cannot be expressed (another method, finer values than
        the space allows).
        """
        method = recipe.method
        if method not in self.methods:
            raise ValueError(f"method '{method}' is not in the search space {list(self.methods)}")
        params: dict[str, Any] = {METHOD_KEY: method} if len(self.methods) > 1 else {}
        for field in ("weight", "density"):
            rng = self.weight_range(method) if field == "weight" else self.density_range(method)
            if rng is None:
                continue
            table = resolve_parameter(getattr(recipe, field), self.tasks, self.groups, field)
            params.update(self._encode(method, field, rng, table))
        for option, spec in self.methods[method].options.items():
            dist = _option_distribution(spec)
            value = recipe.options.get(option, get_method(method).Options().model_dump()[option])
            if dist is not None:
                name = f"{method}{SEP}opt{SEP}{option}"
                params[name] = _clip(dist, value, name)
        return params

    def _encode(self, method: str, field: str, rng: ParamRange, table: Any) -> dict[str, float]:
        axes = self._param_axes(method, field, rng)
        if rng.schedule is not None:  # the closest schedule (exact for a recipe the schedule wrote)
            rows = [table.mean(axis=0)] if rng.per == "shared" else list(table)
            values = [v for row in rows for v in fit_lines(row, self.groups)]
            return {n: _clip(d, float(v), n) for (n, d), v in zip(axes, values, strict=True)}
        names = [name for name, _ in axes]
        dist = axes[0][1]
        if rng.per == "shared":
            values = [table.mean()]
        elif rng.per == "task":
            values = list(table.mean(axis=1))
        elif rng.per == "group":
            values = list(_depth_values(table.mean(axis=0), rng.anchors))
        else:
            values = [v for row in table for v in _depth_values(row, rng.anchors)]
        return {n: _clip(dist, float(v), n) for n, v in zip(names, values, strict=True)}

    def admit(self, params: Mapping[str, Any]) -> dict[str, Any] | None:
        """The stored point as this space can evaluate it, or None when it cannot (logged as a warning).

        A point queued again on resume (an interrupted trial) was drawn from the space of an earlier
        config: a float outside today's bounds is clipped into them, a method or option value that is
        no longer a choice refuses the point, and parameters the space no longer has are dropped.
        Without this, Optuna would force the stale value on the trial and the same crash would repeat
        on every resume.
        """
        method = self.method_of(params)
        if method not in self.methods:
            log.warning("stored point dropped: method '%s' is not in the search space %s", method, list(self.methods))
            return None
        admitted: dict[str, Any] = {METHOD_KEY: method} if METHOD_KEY in self.distributions else {}
        for axis in self.axes_for(method):
            if axis.method is None or axis.name not in params:
                continue  # the method choice is set above; a missing parameter is sampled afresh
            value = params[axis.name]
            if not _admissible(axis.distribution, value):
                log.warning("stored point dropped: %s = %r is not a choice of %s", axis.name, value, axis.distribution)
                return None
            admitted[axis.name] = _clip(axis.distribution, value, axis.name)
        return admitted


def suggest(trial: optuna.Trial, name: str, dist: BaseDistribution) -> Any:
    """Sample one parameter through Optuna's public suggest API."""
    if isinstance(dist, FloatDistribution):
        return trial.suggest_float(name, dist.low, dist.high, log=dist.log)
    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(name, dist.choices)
    raise TypeError(f"unsupported distribution for '{name}': {dist}")


def _depth_values(row: Any, anchors: int | None) -> list[float]:
    if anchors is None:
        return [float(v) for v in row]
    import numpy as np

    positions = np.linspace(0, len(row) - 1, anchors)
    return [float(v) for v in np.interp(positions, np.arange(len(row)), row)]


def _option_distribution(spec: OptionSpec) -> BaseDistribution | None:
    if isinstance(spec, FloatRange):
        return FloatDistribution(spec.low, spec.high, log=spec.log)
    if isinstance(spec, list):
        return CategoricalDistribution(spec)
    return None  # a fixed value


def _admissible(dist: BaseDistribution, value: Any) -> bool:
    """Whether a stored value can stand for this axis, possibly after clipping (a finite number, a current choice)."""
    if isinstance(dist, FloatDistribution):
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if isinstance(dist, CategoricalDistribution):
        return value in dist.choices
    return True


def _clip(dist: BaseDistribution, value: Any, name: str) -> Any:
    """The value inside the distribution: clipped into float bounds, the first choice for an unknown category.

    A change larger than rounding noise is logged: the evaluated point is not the one asked for.
    """
    clipped = value
    if isinstance(dist, FloatDistribution):
        clipped = min(max(float(value), dist.low), dist.high)
        if abs(clipped - float(value)) <= 1e-9 * max(1.0, abs(float(value))):
            return clipped
    elif isinstance(dist, CategoricalDistribution) and value not in dist.choices:
        clipped = dist.choices[0]
    if clipped != value:
        log.warning("%s = %r lies outside the search space: %r is used instead", name, value, clipped)
    return clipped
