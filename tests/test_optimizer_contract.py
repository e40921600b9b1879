"""The optimizer contract: one set of checks, run on every registered optimizer as the search loop drives it.

``MiniLoop`` makes the loop's calls in the loop's order (``search/loop.py``: propose, enqueue, ask,
``SearchSpace.suggest``, tell the study, observe) on a real in-memory Optuna study, a real
``SearchSpace`` and a cheap synthetic objective, without models. The checks are parametrised over
the registry as it stands at collection time, plus two toy optimizers defined here: they are
registered through ``register_optimizer`` for their own tests only, and the same checks cover them
without any other module knowing of them. A plug-in passes when:

- every point it has evaluated lies in the space: exactly its method's axes, each value inside its
  distribution; an external optimizer's proposal is what gets evaluated, and it never answers None
  while not exhausted (the loop would fall back to the study's random sampler);
- parameters the config fixes stay fixed: a fixed option is no axis and reaches the recipe as given,
  a single-valued choice is always that value (or the optimizer refuses the space when it is built);
- a resume continues deterministically: a sampler rebuilt on the stored study with the same seed
  (twice) proposes the same next point; an external optimizer checkpointed and restored into a fresh
  instance proposes what the uninterrupted one proposes next;
- failed candidates (``Outcome.values`` None, a FAIL trial) are observed without error, and the
  next proposal is still valid.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState
from pydantic import ValidationError

from mergetune.errors import MergetuneError
from mergetune.recipe import Expert
from mergetune.search.config import OptimizerConfig
from mergetune.search.optimizers import (
    OPTIMIZERS,
    ExternalOptimizer,
    History,
    Optimizer,
    OptimizerRegistrationError,
    Outcome,
    Proposal,
    SamplerOptimizer,
    make_optimizer,
    register_optimizer,
)
from mergetune.search.space import METHOD_KEY, FloatRange, MethodSpace, ParamRange, SearchSpace

DIRECTIONS = ["maximize", "maximize"]  # the loop's default objectives: mean and worst
BUDGET = 200  # the candidate budget the optimizers are told (grid: every point of both spaces fits)
RUN = 11  # candidates per run: one past the samplers' 10 random startup trials, so their models run too (gp is slow)
FIXED_DISJOINT = "sum"


# ---- two toy optimizers, known to no module of mergetune -----------------------------------------
class ToySampler(SamplerOptimizer):
    """Independent TPE after 4 random points: a sampler plug-in is a name and ``sampler()``."""

    name = "toy_sampler"
    multi_objective = True

    def sampler(self) -> optuna.samplers.BaseSampler:
        return optuna.samplers.TPESampler(seed=self.seed, n_startup_trials=4)


class ToyExternal(ExternalOptimizer):
    """Uniform random points from its own generator; its state is how many points it has drawn."""

    name = "toy_external"
    multi_objective = True

    def __init__(self, space: SearchSpace, *, seed: int, batch_size: int, budget: int | None, **options: Any):
        super().__init__(space, seed=seed, batch_size=batch_size, budget=budget, **options)
        self.drawn = 0

    def propose(self) -> Proposal:
        rng = random.Random(f"{self.seed}/{self.drawn}")  # one stream per draw: the count is the whole state
        self.drawn += 1
        method = rng.choice(list(self.space.methods))
        params = {axis.name: _draw(rng, axis.distribution) for axis in self.space.axes_for(method)}
        if METHOD_KEY in params:
            params[METHOD_KEY] = method
        return Proposal(params=params)

    def observe(self, proposal: Proposal | None, params: dict[str, Any], outcome: Outcome) -> None:
        """Nothing to learn: it is a random search."""

    def checkpoint(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "toy.json").write_text(json.dumps({"drawn": self.drawn}))

    def restore(self, folder: Path, history: History) -> None:
        path = folder / "toy.json"
        self.drawn = json.loads(path.read_text())["drawn"] if path.exists() else len(history)

    @property
    def exhausted(self) -> bool:
        return False


def _draw(rng: random.Random, dist: Any) -> Any:
    return rng.uniform(dist.low, dist.high) if isinstance(dist, FloatDistribution) else rng.choice(dist.choices)


TOYS: dict[str, type[Optimizer]] = {cls.name: cls for cls in (ToySampler, ToyExternal)}
CONTRACT = [*sorted(OPTIMIZERS), *TOYS]  # every registered optimizer, and the toys


@contextmanager
def registered(name: str) -> Iterator[None]:
    """Register a toy for one test only (the registry is process-wide); a real plug-in is registered already."""
    toy = TOYS.get(name)
    if toy is None:
        yield
        return
    register_optimizer(toy)
    try:
        yield
    finally:
        del OPTIMIZERS[toy.name]


# ---- spaces and the synthetic objective ----------------------------------------------------------
def continuous_space() -> SearchSpace:
    """One method (so the method is fixed), two floats, a log-scale float option and a fixed option."""
    options = {"disjoint": FIXED_DISJOINT, "scale": FloatRange(low=0.25, high=4.0, log=True)}
    return _space({"ties": MethodSpace(options=options)})


def mixed_space() -> SearchSpace:
    """A method choice, a categorical option with a single value, and per-method floats."""
    options = {"disjoint": [FIXED_DISJOINT], "weights": ["after_election", "before_election"]}
    return _space({"ties": MethodSpace(options=options), "task_arithmetic": MethodSpace()})


def _space(methods: dict[str, MethodSpace]) -> SearchSpace:
    experts = [Expert(name=t, model=f"/models/{t}") for t in ("a", "b")]
    shared = ParamRange(per="shared")
    return SearchSpace("/models/base", experts, ["g0", "g1"], methods, weight=shared, density=shared)


SPACES = {"continuous": continuous_space, "mixed": mixed_space}


def evaluate(space: SearchSpace, params: dict[str, Any]) -> Outcome:
    """mean = 1 − Σ (u − 0.3)² over the float axes in unit coordinates; worst = mean − the largest miss."""
    misses = [
        (params[a.name] - a.distribution.low) / (a.distribution.high - a.distribution.low) - 0.3
        for a in space.axes_for(space.method_of(params))
        if isinstance(a.distribution, FloatDistribution)
    ]
    mean = 1.0 - sum(m * m for m in misses)
    worst = mean - max((abs(m) for m in misses), default=0.0)
    return Outcome(values=(mean, worst), scalar=mean + 0.5 * worst)


FAILED = Outcome(values=None, scalar=-math.inf, feasible=False)


def stopped_early(outcome: Outcome) -> Outcome:
    """The outcome of a candidate stopped by multi-fidelity racing: no values, a pessimistic scalar."""
    return Outcome(values=None, scalar=outcome.scalar - 0.25, feasible=False, pruned=True)


def assert_in_space(space: SearchSpace, params: dict[str, Any]) -> None:
    """Exactly the axes of the point's method, each value inside its distribution."""
    method = space.method_of(params)
    assert method in space.methods
    assert set(params) == {a.name for a in space.axes_for(method)}, params
    for key, value in params.items():
        dist = space.distributions[key]
        if isinstance(dist, FloatDistribution):
            assert dist.low <= value <= dist.high, (key, value, dist)
        else:
            assert isinstance(dist, CategoricalDistribution) and value in dist.choices, (key, value, dist)


# ---- the loop in miniature -----------------------------------------------------------------------
def build(name: str, space: SearchSpace, seed: int = 0) -> Optimizer:
    return make_optimizer(name, space, seed=seed, batch_size=1, budget=BUDGET, options={})


@dataclass
class MiniLoop:
    """One candidate at a time, with the loop's calls in the loop's order."""

    opt: Optimizer
    space: SearchSpace
    study: optuna.Study
    history: list[tuple[dict[str, Any], Outcome]] = field(default_factory=list)  # finished, in trial order

    @classmethod
    def start(cls, name: str, space: SearchSpace) -> MiniLoop:
        opt = build(name, space)
        return cls(opt, space, optuna.create_study(directions=DIRECTIONS, sampler=opt.sampler()))

    def resumed(self, folder: Path) -> MiniLoop:
        """A restart: a fresh optimizer restored from ``folder`` and a copy of the stored study, as the loop
        reopens its storage (with the new optimizer's sampler)."""
        opt = build(self.opt.name, self.space)
        study = optuna.create_study(directions=DIRECTIONS, sampler=opt.sampler())
        study.add_trials(self.study.get_trials(deepcopy=True))
        opt.restore(folder, list(self.history))
        return MiniLoop(opt, self.space, study, list(self.history))

    def step(self, fail: bool = False, prune: bool = False) -> dict[str, Any]:
        """Ask, evaluate (or fail, or stop early) and tell one candidate; returns the point evaluated, checked."""
        assert not self.opt.exhausted
        proposal = self.opt.propose()
        assert (proposal is not None) == self.opt.external  # an external one never leaves it to random sampling
        if proposal is not None:
            assert_in_space(self.space, proposal.params)
            self.study.enqueue_trial(proposal.params, skip_if_exists=False)
        trial = self.study.ask()
        params = self.space.suggest(trial)
        assert_in_space(self.space, params)
        if proposal is not None:
            assert params == proposal.params  # the study evaluates the proposal, not a sample of its own
        outcome = FAILED if fail else evaluate(self.space, params)
        if prune:
            outcome = stopped_early(outcome)
            self.study.tell(trial, state=TrialState.PRUNED)  # as the loop records it (multi-objective: no value)
        elif outcome.values is None:
            self.study.tell(trial, state=TrialState.FAIL)
        else:
            self.study.tell(trial, list(outcome.values))
        self.opt.observe(proposal, params, outcome)
        self.history.append((params, outcome))
        return params

    def run(self, failures: Sequence[bool]) -> list[dict[str, Any]]:
        return [self.step(fail) for fail in failures]


def built_or_refused(name: str, space: SearchSpace) -> MiniLoop | None:
    """The loop on ``space``, or None when the optimizer refuses the space up front (a MergetuneError
    when it is built, the only accepted way to refuse: never at run time)."""
    try:
        return MiniLoop.start(name, space)
    except MergetuneError as exc:
        assert "space" in str(exc), exc  # the refusal says what it cannot search
        return None


# ---- the contract --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", CONTRACT)
def test_kind_and_interface(name: str) -> None:
    with registered(name):
        opt = build(name, continuous_space())
        assert isinstance(opt, SamplerOptimizer | ExternalOptimizer)
        assert opt.external == isinstance(opt, ExternalOptimizer)
        assert opt.max_pending == (1 if opt.external else None)  # the batch for externals, no cap for samplers
        assert isinstance(opt.sampler(), optuna.samplers.BaseSampler)
        assert opt.describe().startswith(name)
        assert OptimizerConfig(name=name).name == name  # the config accepts every registered name


@pytest.mark.parametrize("space_kind", list(SPACES))
@pytest.mark.parametrize("name", CONTRACT)
def test_proposals_stay_in_the_space_and_fixed_values_stay_fixed(name: str, space_kind: str) -> None:
    space = SPACES[space_kind]()
    with registered(name):
        loop = built_or_refused(name, space)
        if loop is None:
            assert space_kind == "mixed"  # a continuous space (one method, floats) is searchable by all
            return
        points = loop.run([False] * RUN)  # MiniLoop.step checks each point against the space
    for params in points:
        recipe = space.to_recipe(params)
        if recipe.method == "ties":
            assert recipe.options["disjoint"] == FIXED_DISJOINT  # fixed by value, or the only choice
            assert ("ties/opt/disjoint" in params) == (space_kind == "mixed")  # a fixed value is no axis
    if space_kind == "mixed" and name != "grid":  # a grid walks the first method first
        assert {space.method_of(p) for p in points} == set(space.methods), points


@pytest.mark.parametrize("name", CONTRACT)
def test_resume_proposes_the_same_next_point(name: str, tmp_path: Path) -> None:
    space = continuous_space()
    with registered(name):
        loop = MiniLoop.start(name, space)
        loop.run([False] * 3 + [True] + [False] * (RUN - 4))  # a failure among them
        loop.opt.checkpoint(tmp_path)
        first, second = loop.resumed(tmp_path), loop.resumed(tmp_path)
        after_resume = first.step()
        assert second.step() == after_resume  # the study (+ checkpoint) and the seed are the whole state
        uninterrupted = loop.step()
    if loop.opt.external:
        assert after_resume == uninterrupted  # the checkpoint restored exactly where it stopped
    # samplers: a rebuilt sampler restarts its random stream, so only the two resumes are comparable


@settings(max_examples=2, deadline=None)  # gp refits its model on every ask: a few examples
@given(failures=st.lists(st.booleans(), min_size=RUN, max_size=RUN))
@pytest.mark.parametrize("name", CONTRACT)
def test_failed_candidates_are_observed_and_the_search_goes_on(name: str, failures: list[bool]) -> None:
    space = continuous_space()
    with registered(name):
        loop = MiniLoop.start(name, space)
        loop.run([*failures, True])  # ends on a failure
        assert_in_space(space, loop.step())  # and the next proposal is still valid
    assert sum(o.failed for _, o in loop.history) == sum(failures) + 1


@pytest.mark.parametrize("name", CONTRACT)
def test_candidates_stopped_early_are_observed_pessimistically_and_resume_replays_them(
    name: str, tmp_path: Path
) -> None:
    space = continuous_space()
    with registered(name):
        loop = MiniLoop.start(name, space)
        for i in range(RUN):
            loop.step(prune=i % 3 == 1)  # a third of them stopped early
        stopped = [o for _, o in loop.history if o.pruned]
        assert stopped and not any(o.failed for o in stopped)  # not a failure: a finite, pessimistic loss
        assert all(o.loss == -o.scalar and o.values is None for o in stopped)  # and never a front value
        loop.opt.checkpoint(tmp_path)
        first, second = loop.resumed(tmp_path), loop.resumed(tmp_path)
        after_resume = first.step()
        assert second.step() == after_resume
        uninterrupted = loop.step()
    assert {t.state for t in loop.study.trials} == {TrialState.COMPLETE, TrialState.PRUNED}
    if loop.opt.external:
        assert after_resume == uninterrupted  # the pruned outcomes replay exactly as they were observed


# ---- registration --------------------------------------------------------------------------------
def test_a_toy_is_usable_by_name_while_registered_and_only_then() -> None:
    """Registering is the whole job: the config validates names against the registry, the factory
    builds from it, and the contract tests above ran on the toys through that same path."""
    with registered(ToyExternal.name):
        assert OPTIMIZERS[ToyExternal.name] is ToyExternal
        assert OptimizerConfig(name=ToyExternal.name).name == ToyExternal.name
    with pytest.raises(ValidationError, match=r"unknown optimizer 'toy_external'; available: \['cmaes'"):
        OptimizerConfig(name=ToyExternal.name)


def test_an_external_optimizer_without_propose_is_refused_at_registration() -> None:
    class NoPropose(ExternalOptimizer):  # would have run as the study's random search
        name = "no_propose"

        def observe(self, proposal: Proposal | None, params: dict[str, Any], outcome: Outcome) -> None: ...

        def checkpoint(self, folder: Path) -> None: ...

        def restore(self, folder: Path, history: History) -> None: ...

        @property
        def exhausted(self) -> bool:
            return False

    with pytest.raises(OptimizerRegistrationError, match=r"NoPropose does not implement \['propose'\].*External"):
        register_optimizer(NoPropose)
    assert "no_propose" not in OPTIMIZERS


def test_other_incomplete_or_clashing_classes_are_refused_at_registration() -> None:
    class NoSampler(SamplerOptimizer):
        name = "no_sampler"

    class Neither(Optimizer):  # the common base of the kinds, but neither kind
        name = "neither"

    class Clash(ToySampler):
        name = "tpe"

    class Nameless(ToySampler):
        name = ""

    cases = [
        (NoSampler, r"does not implement \['sampler'\], required of every SamplerOptimizer"),
        (Neither, r"not an optimizer kind: subclass SamplerOptimizer .* or ExternalOptimizer"),
        (Clash, r"name 'tpe' is taken by mergetune\.search\.optimizers\.optuna_samplers\.Tpe"),
        (Nameless, r"has no 'name'"),
    ]
    for cls, message in cases:
        with pytest.raises(OptimizerRegistrationError, match=message):
            register_optimizer(cls)
    assert OPTIMIZERS["tpe"].__name__ == "Tpe" and not {"no_sampler", "neither", ""} & set(OPTIMIZERS)
