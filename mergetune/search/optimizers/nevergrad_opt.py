"""Nevergrad optimizers (Rapin & Teytaud 2018): ``ngopt``, ``ng_cma`` and ``ng_de``.

- ``ngopt``: ``NGOpt``, Nevergrad's competence-map wizard (Liu et al. 2020, "Versatile black-box
  optimization"; Meunier et al. 2021), which picks an algorithm from the budget, the dimension,
  the number of workers and the variable types. What it picked is logged and shown by
  ``describe()``. With nevergrad 1.0.12 (batch 1 to 8): one method's 2 to 300 float axes, budget
  50 to 300 → MetaModel over CMA; 8 or 300 axes, budget 1000 → diagonal CMA; a method choice (a
  categorical) at any size → a chain of a DiagonalCMA / PSO / GeneticDE portfolio for half the
  budget, then an optimistic noisy (1+1). It declares at least 2 workers (``NgOpt.num_workers``).
- ``ng_cma``: CMA-ES (Hansen & Ostermeier 2001) through Nevergrad's ``ParametrizedCMA``, with
  cumulative step-size adaptation (CSA), the population rounded up to a multiple of the workers and
  the diagonal variant (sep-CMA, Ros & Hansen 2008) from 100 dimensions (options ``diagonal``,
  ``popsize``).
- ``ng_de``: ``TwoPointsDE``, differential evolution (Storn & Price 1997) with two-point crossover,
  Nevergrad's recommended DE for parallel settings.

Several pending asks at high dimension: pycma's default step-size rule from 300 dimensions (TPA)
fails with "Mean shift samples are expected but missing" when generations overlap; reproduced here
with nevergrad's CMA, its DiagonalCMA and NGOpt at 300 dims and 4 workers told in batches. CSA
survives any order: ``ng_cma`` asks for it, and ``ngopt`` sets pycma's ``TPA_dimension`` so that
the CMA NGOpt may pick uses it too (a process-wide pycma default, read when an ES is created).

Parametrization: an ``ng.p.Dict`` with an ``ng.p.Choice`` per categorical axis (the method choice,
categorical options) and one ``ng.p.Array`` of every float axis in the unit box [0, 1]^n, mapped
to each axis' bounds linearly or, for log axes, geometrically (what ``ng.p.Log`` does). One
``ng.p.Scalar`` per axis was measured 400× slower at 300 dims (0.5 s of Nevergrad bookkeeping per
ask/tell against about 1 ms), hence the array. A candidate becomes a flat point restricted to its
method's axes (``SearchSpace.active``). Seeded through ``parametrization.random_state``;
``num_workers = batch_size`` (a promise: the loop never has more asked-but-untold candidates);
``budget`` = the candidate budget. Single-objective on ``Outcome.loss``.

Points Nevergrad did not propose: a point equal to a pending candidate (a retried candidate) is
told as that candidate, so no asked candidate stays pending forever; any other (a warm start) is
told via ``parametrization.spawn_child(new_value=...)`` where the algorithm accepts it (refusals
are logged). Thread-based scipy optimizers (Cobyla, ...) would take a foreign loss as the loss of
the point they asked: foreign points are skipped for them (NGOpt no longer picks them, see above).
A point Nevergrad asks for that was already evaluated is answered from the ledger, not evaluated again.

Checkpoint: ``nevergrad.checkpoint.json``, the log of the calls made to the adapter (``_replay``),
with the nevergrad and pycma versions. A resume builds a fresh optimizer with the same seed and
settings and makes the same calls again, which retraces the same asks and tells (a pickle of the
optimizer, what ``Optimizer.dump`` writes, would run code from the run folder when loaded); then
it replays the history items the log had not seen. Without a usable checkpoint (none, another
library version, other settings, a replay that diverged) it rebuilds the optimizer (seeded from
the seed and the history's length, so that it does not retrace the first run's draws) and tells
it the whole history as points it did not propose.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
from optuna.distributions import CategoricalDistribution

from mergetune.errors import MergetuneError
from mergetune.search.optimizers._external import (
    UnitBox,
    default_popsize,
    import_cma,
    point_key,
    round_up,
)
from mergetune.search.optimizers._replay import ReplayedOptimizer
from mergetune.search.optimizers.base import Outcome, Proposal
from mergetune.search.optimizers.registry import register_optimizer
from mergetune.search.space import SearchSpace

log = logging.getLogger(__name__)
FLOATS = "__floats__"  # the Dict key of the unit-box array (no axis name can start with "_")
MAX_REPEATS = 20  # asks answered from the ledger before a repeated point is proposed anyway
CSA_ONLY = 10**9  # pycma's TPA_dimension: TPA never, CSA always


def import_nevergrad() -> Any:
    """nevergrad, imported on first use (about two seconds: the CLI should not pay it for other optimizers)."""
    import_cma()  # pycma warns at import when matplotlib is missing: import it quietly first
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import nevergrad  # heavy optional dependency: imported on use

    _guard_metamodel(nevergrad)
    return nevergrad


def _guard_metamodel(ng: Any) -> None:
    """nevergrad 1.0.12's meta-model (used by NGOpt at low dimension) calls ``float()`` on a
    one-element array, which NumPy 2.4 refuses (TypeError): the whole ask crashed mid-search. The
    TypeError becomes nevergrad's own ``MetaModelFailure``, on which it falls back to its base
    optimizer's proposal, as it does whenever the meta-model cannot help."""
    lib, metamodel = ng.optimization.optimizerlib, ng.optimization.metamodel
    learn = metamodel.learn_on_k_best
    if getattr(learn, "_mergetune_guarded", False):
        return
    failure = metamodel.MetaModelFailure

    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return learn(*args, **kwargs)
        except TypeError as exc:
            raise failure(f"meta-model unusable with this NumPy: {exc}") from exc

    guarded._mergetune_guarded = True  # type: ignore[attr-defined]
    lib.learn_on_k_best = metamodel.learn_on_k_best = guarded  # optimizerlib imported the name itself


def build_parametrization(space: SearchSpace, seed: int | list[int]) -> Any:
    """Choices for categorical axes, one unit-box array for the float axes; seeded."""
    ng = import_nevergrad()
    children: dict[str, Any] = {}
    for axis in space.axes:
        if isinstance(axis.distribution, CategoricalDistribution):
            children[axis.name] = ng.p.Choice(list(axis.distribution.choices))
    dimension = len(UnitBox(space))
    if dimension:
        children[FLOATS] = ng.p.Array(shape=(dimension,), lower=0.0, upper=1.0)
    if not children:
        raise MergetuneError("nevergrad: the search space has no parameter to search")
    parametrization = ng.p.Dict(**children)
    parametrization.random_state = np.random.RandomState(seed)
    return parametrization


def optimizer_tree(opt: Any) -> Iterator[Any]:
    """The optimizer and every sub-optimizer (NGOpt's choice, meta-models, chains, portfolios)."""
    ng = import_nevergrad()
    yield opt
    inner: list[Any] = []
    if isinstance(opt, ng.optimizers.base.Optimizer) and hasattr(type(opt), "optim"):
        inner.append(opt.optim)  # NGOpt: the selected algorithm (built on first access)
    for attr in ("_optim", "_optimizer"):
        if isinstance(getattr(opt, attr, None), ng.optimizers.base.Optimizer):
            inner.append(getattr(opt, attr))
    for attr in ("optims", "optimizers"):
        inner += [o for o in getattr(opt, attr, None) or [] if isinstance(o, ng.optimizers.base.Optimizer)]
    for sub in dict.fromkeys(inner):
        if sub is not opt:
            yield from optimizer_tree(sub)


def algorithm_name(opt: Any) -> str:
    """What actually runs, following NGOpt's choice and meta-models: e.g. ``NGOpt -> MetaModel -> CMA(...)``."""
    names = []
    while opt is not None:
        names.append(_label(opt))
        opt = opt.optim if hasattr(type(opt), "optim") else getattr(opt, "_optim", None)
    return " -> ".join(names)


def _label(opt: Any) -> str:
    if hasattr(opt, "_popsize") and hasattr(opt, "_config"):  # nevergrad's CMA: say how it is configured
        return f"CMA(popsize={opt._popsize}, diagonal={opt._config.diagonal})"
    return str(opt.name)


class _Nevergrad(ReplayedOptimizer):
    """Common adapter: parametrization, ask/tell bookkeeping, checkpoint and replay."""

    checkpoint_file = "nevergrad.checkpoint.json"
    algorithm: ClassVar[str]
    accepted_options: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, space: SearchSpace, *, seed: int, batch_size: int, budget: int | None, **options: Any):
        super().__init__(space, seed=seed, batch_size=batch_size, budget=budget, **options)
        unknown = sorted(set(options) - self.accepted_options)
        if unknown:
            raise MergetuneError(f"{self.name}: unknown option(s) {unknown}; accepted: {sorted(self.accepted_options)}")
        self.box = UnitBox(space)
        self.categorical = [a for a in space.axes if isinstance(a.distribution, CategoricalDistribution)]
        self._start_fresh()
        log.info(
            "%s: %s (dimension %d, budget %s, num_workers %d)",
            self.name,
            self.describe(),
            self._optimizer.dimension,
            budget,
            self.num_workers,
        )

    def _reset(self) -> None:
        self._optimizer = self._build()
        self._pending: dict[str, list[Any]] = {}  # point key -> asked, untold candidates

    def _rebuild(self, count: int) -> None:
        """Rebuilt from a history of ``count`` outcomes: a seed of its own, so that it does not retrace the
        first run's draws."""
        if self._optimizer.num_ask == 0:
            self._optimizer = self._build(seed=[self.seed, count])

    def _build(self, seed: int | list[int] | None = None) -> Any:
        ng = import_nevergrad()
        parametrization = build_parametrization(self.space, self.seed if seed is None else seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ng.errors.NevergradRuntimeWarning)
            cls = self._optimizer_class(parametrization.dimension)
            return cls(parametrization, budget=self.budget, num_workers=self.num_workers)

    @property
    def num_workers(self) -> int:
        """Nevergrad's promise: at most this many asked-but-untold candidates (the loop's batch)."""
        return self.batch_size

    @property
    def max_pending(self) -> int | None:
        """The batch, but never more than the optimizer in use was promised (a checkpoint restored
        from a run with fewer workers keeps its own ``num_workers``)."""
        return min(self.batch_size, self._optimizer.num_workers)

    def _optimizer_class(self, dimension: int) -> Any:
        return import_nevergrad().optimizers.registry[self.algorithm]

    # ---- encoding --------------------------------------------------------------------------------
    def _decode(self, value: dict[str, Any]) -> dict[str, Any]:
        point = {a.name: value[a.name] for a in self.categorical}
        if len(self.box):
            point.update(self.box.decode(value[FLOATS]))
        return self.space.active(point)

    def _encode(self, params: dict[str, Any]) -> dict[str, Any]:
        """A full parametrization value for a point: absent axes keep the parametrization's defaults."""
        value = dict(self._optimizer.parametrization.value)
        for axis in self.categorical:
            if axis.name in params and params[axis.name] in axis.distribution.choices:  # type: ignore[attr-defined]
                value[axis.name] = params[axis.name]
        if len(self.box):
            value[FLOATS] = self.box.encode(params, fill=np.asarray(value[FLOATS], dtype=float))
        return value

    # ---- optimizer interface ---------------------------------------------------------------------
    @property
    def exhausted(self) -> bool:
        return False  # Nevergrad asks on past its budget: the loop's budget stops it

    def _propose(self) -> Proposal:
        """Ask Nevergrad; a point already evaluated (a retraced draw after a rebuild, a discrete space)
        is answered from the ledger instead of being evaluated again."""
        for _ in range(MAX_REPEATS):
            candidate = self._optimizer.ask()
            params = self._decode(candidate.value)
            known = self._ledger.losses.get(point_key(params))
            if known is None:
                break
            self._optimizer.tell(candidate, known)
        self._pending.setdefault(point_key(params), []).append(candidate)
        return Proposal(params=params, token=candidate)

    def _observe(self, proposal: Proposal | None, params: dict[str, Any], outcome: Outcome) -> None:
        candidate = self._take_pending(proposal, params)
        if candidate is not None:
            self._optimizer.tell(candidate, outcome.loss)
        else:
            self._tell_foreign(params, outcome.loss)

    def _take_pending(self, proposal: Proposal | None, params: dict[str, Any]) -> Any:
        """The asked candidate this outcome answers: the proposal's own, else a pending one with equal
        params (a retried candidate), so that no asked candidate stays pending forever."""
        key = point_key(proposal.params if proposal is not None else params)
        queue = self._pending.get(key, [])
        match = proposal.token if proposal is not None else (queue[0] if queue else None)
        if any(c is match for c in queue):
            queue.remove(match)
            if not queue:
                del self._pending[key]
        return match

    def _tell_foreign(self, params: dict[str, Any], loss: float) -> None:
        """Tell a point Nevergrad did not ask for, where the algorithm accepts it."""
        from nevergrad.optimization import recaster  # heavy optional dependency: loaded with nevergrad

        ng = import_nevergrad()
        if any(isinstance(o, recaster.RecastOptimizer) for o in optimizer_tree(self._optimizer)):
            log.info("%s: %s cannot take points it did not propose; skipped one", self.name, self.describe())
            return
        try:
            candidate = self._optimizer.parametrization.spawn_child(new_value=self._encode(params))
            self._optimizer.tell(candidate, loss)
        except (ng.errors.TellNotAskedNotSupportedError, AssertionError, ValueError, RuntimeError) as exc:
            log.info("%s: %s refused a point it did not propose (%s)", self.name, self.describe(), exc)

    def _libraries(self) -> dict[str, str]:
        return {"nevergrad": import_nevergrad().__version__, "cma": import_cma().__version__}

    def _summary(self) -> dict[str, Any]:
        return {
            "algorithm": self.describe(),
            "pending": sum(len(q) for q in self._pending.values()),
            "num_ask": self._optimizer.num_ask,
            "num_tell": self._optimizer.num_tell,
        }

    def describe(self) -> str:
        return f"{self.name}: nevergrad {import_nevergrad().__version__} {algorithm_name(self._optimizer)}"


@register_optimizer
class NgOpt(_Nevergrad):
    """NGOpt: Nevergrad's algorithm selector (Liu et al. 2020)."""

    name = "ngopt"
    algorithm = "NGOpt"

    @property
    def num_workers(self) -> int:
        """At least 2: with one worker NGOpt picks scipy optimizers (Cobyla, CmaFmin2) that nevergrad runs in
        a non-daemon thread: their pickles replay the run and failed to load here ("Mismatch in replay"),
        they cannot take warm starts, and the thread keeps the process alive at exit while the optimizer
        is referenced. With 2 declared workers it picks among the parallel algorithms; the promise holds
        (the loop keeps one point in flight, fewer than two)."""
        return max(2, self.batch_size)

    def _optimizer_class(self, dimension: int) -> Any:
        # NGOpt may pick pycma's CMA, whose default step-size rule from 300 dims (TPA) crashes with several
        # pending asks: make pycma pick CSA at every dimension (a module default, read when an ES is created;
        # set whatever batch_size is, so that every NGOpt in a process behaves the same).
        import_cma().evolution_strategy.TPA_dimension = CSA_ONLY
        return super()._optimizer_class(dimension)


@register_optimizer
class NgCma(_Nevergrad):
    """CMA-ES through Nevergrad: CSA step size, popsize a multiple of the workers, diagonal at high dims."""

    name = "ng_cma"
    algorithm = "CMA"

    accepted_options = frozenset({"popsize", "diagonal"})

    def _optimizer_class(self, dimension: int) -> Any:
        diagonal = bool(self.options.get("diagonal", dimension >= 100))
        popsize = round_up(int(self.options.get("popsize") or default_popsize(dimension)), self.batch_size)
        csa = import_cma().sigma_adaptation.CMAAdaptSigmaCSA
        return import_nevergrad().optimizers.ParametrizedCMA(
            popsize=popsize, diagonal=diagonal, inopts={"AdaptSigma": csa}
        )


@register_optimizer
class NgDe(_Nevergrad):
    """Differential evolution (Storn & Price 1997), Nevergrad's TwoPointsDE."""

    name = "ng_de"
    algorithm = "TwoPointsDE"
