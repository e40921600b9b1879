"""External optimizer adapters (Nevergrad, pycma CMA-ES, grid) driven like the search loop drives them.

Real optimizers on a real ``SearchSpace`` and a cheap synthetic objective with a known optimum:
score = −Σ (u − 0.3)² over the active float parameters in unit-box coordinates (u = 0.3 is 30% of
each axis' range), minus 0.5 when the method is not TIES. ``Driver`` mimics the loop: it keeps
``batch`` proposals in flight, completes one (FIFO, random order) or all of them (batch-synchronous),
observes it and asks again; it never has more than ``batch`` proposals pending.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from optuna.distributions import FloatDistribution

from mergetune.errors import MergetuneError
from mergetune.recipe import Expert, Recipe
from mergetune.search.optimizers import OPTIMIZERS, ExternalOptimizer, Optimizer, Outcome, Proposal, make_optimizer
from mergetune.search.optimizers._external import UnitBox, from_unit, to_unit
from mergetune.search.space import FloatRange, MethodSpace, ParamRange, SearchSpace

TASKS = ("sst2", "mnli", "topic", "qnli")
EXTERNAL = ("ngopt", "ng_cma", "ng_de", "cmaes", "pymoo_ga", "grid")
SEARCHERS = ("ngopt", "ng_cma", "ng_de", "cmaes", "pymoo_ga")  # those that learn from outcomes
CONTINUOUS_ONLY = ("cmaes", "pymoo_ga")  # one method, float axes


def make_space(
    methods: tuple[str, ...] = ("ties", "task_arithmetic"),
    per: str = "task",
    groups: int = 2,
    tasks: int = 4,
    **method_space: Any,
) -> SearchSpace:
    experts = [Expert(name=t, model=f"/models/{t}") for t in TASKS[:tasks]]
    return SearchSpace(
        base="/models/base",
        experts=experts,
        group_names=[f"g{i}" for i in range(groups)],
        methods={m: MethodSpace(**method_space) for m in methods},
        weight=ParamRange(per=per),
        density=ParamRange(per=per),
    )


def space_for(name: str) -> SearchSpace:
    """CMA-ES and the GA need one method; the others search the method choice too (9 floats + a choice)."""
    return make_space(("ties",)) if name in CONTINUOUS_ONLY else make_space()


def target(name: str) -> float:
    """The optimum of one axis in unit-box coordinates: spread over [0.1, 0.9], fixed per name."""
    return 0.1 + 0.8 * (zlib.crc32(name.encode()) % 1000) / 999


def score(space: SearchSpace, params: dict[str, Any]) -> float:
    """−Σ (u − target)² over the active float axes; TIES is the better method (0 at the optimum)."""
    total = 0.0 if space.method_of(params) == "ties" else -0.5
    for axis in space.axes_for(space.method_of(params)):
        if isinstance(axis.distribution, FloatDistribution) and axis.name in params:
            total -= (to_unit(axis.distribution, params[axis.name]) - target(axis.name)) ** 2
    return total


def outcome(value: float) -> Outcome:
    return Outcome(values=(value,), scalar=value)


@dataclass
class Driver:
    """The search loop in miniature: propose → evaluate → observe with ``batch`` candidates in flight."""

    opt: Optimizer
    space: SearchSpace
    batch: int
    order: str = "fifo"  # fifo | shuffle | batch (complete every pending point before asking again)
    pending: list[tuple[Proposal | None, dict[str, Any]]] = field(default_factory=list)
    finished: int = 0
    proposals: list[dict[str, Any]] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    history: list[tuple[int, dict[str, Any], Outcome]] = field(default_factory=list)  # (trial, params, outcome)
    rng: random.Random = field(default_factory=lambda: random.Random(7))
    asked: int = 0

    def run(self, until: int) -> Driver:
        while self.finished < until:
            self._fill(until)
            if not self.pending:
                break
            count = len(self.pending) if self.order == "batch" else 1
            for _ in range(count):
                index = self.rng.randrange(len(self.pending)) if self.order == "shuffle" else 0
                self._finish(*self.pending.pop(index))
            self._check()
        return self

    def _fill(self, until: int) -> None:
        while len(self.pending) < self.batch and self.finished + len(self.pending) < until:
            proposal = self.opt.propose()
            if proposal is None:
                return
            self.proposals.append(proposal.params)
            self.pending.append((proposal, proposal.params))
            self._check()

    def _finish(self, proposal: Proposal | None, params: dict[str, Any]) -> None:
        value = score(self.space, params)
        self.scores.append(value)
        self.history.append((self.asked, params, outcome(value)))
        self.asked += 1
        self.finished += 1
        self.opt.observe(proposal, params, outcome(value))

    def _check(self) -> None:
        assert len(self.pending) <= self.batch
        ng_opt = getattr(self.opt, "_optimizer", None)
        if ng_opt is not None:  # Nevergrad's num_workers promise: never more asked-but-untold than workers
            assert len(ng_opt._asked) <= ng_opt.num_workers

    def trial_history(self) -> list[tuple[dict[str, Any], Outcome]]:
        """Finished points in trial order (how the loop reads them back from the storage)."""
        return [(p, o) for _, p, o in sorted(self.history, key=lambda item: item[0])]


def build(
    name: str, space: SearchSpace, *, seed: int = 0, batch: int = 1, budget: int | None = 60, **options: Any
) -> Optimizer:
    return make_optimizer(name, space, seed=seed, batch_size=batch, budget=budget, options=options)


def warm_start(space: SearchSpace, method: str = "ties") -> dict[str, Any]:
    """The point of a papers'-default recipe, as the loop enqueues it."""
    recipe = Recipe(base=space.base, experts=space.experts, method=method, weight=1.0, density=0.2)
    return space.from_recipe(recipe)


# ---- registry ------------------------------------------------------------------------------------
def test_external_optimizers_are_registered() -> None:
    assert set(EXTERNAL) <= set(OPTIMIZERS)
    assert all(issubclass(OPTIMIZERS[n], ExternalOptimizer) and OPTIMIZERS[n].external for n in EXTERNAL)
    assert not any(OPTIMIZERS[n].multi_objective for n in SEARCHERS)
    assert OPTIMIZERS["grid"].multi_objective


def test_unknown_option_is_a_clear_error() -> None:
    for name in EXTERNAL:
        with pytest.raises(MergetuneError, match="unknown option"):
            build(name, space_for(name), bogus=1)


# ---- search quality ------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("name", SEARCHERS)
def test_improves_clearly_over_its_first_batch(name: str, batch: int) -> None:
    """Best of the last quarter beats the first batch's best, and the first points' mean by 0.1.
    NGOpt gets twice the budget: with a method choice it runs a portfolio that splits the budget."""
    space = space_for(name)  # 12 floats + the method choice; cmaes: TIES' 8 floats
    budget = 160 if name == "ngopt" else 80
    run = Driver(build(name, space, batch=batch, budget=budget), space, batch, order="shuffle").run(budget)
    assert len(run.scores) == budget
    first_batch, first_mean = max(run.scores[:batch]), float(np.mean(run.scores[: max(batch, 8)]))
    last = max(run.scores[-budget // 4 :])
    assert last > first_batch and last > first_mean + 0.1, (first_batch, first_mean, last)
    assert all(set(p) == set(space.active(p)) for p in run.proposals)  # only the chosen method's axes


def test_ngopt_meta_model_runs_through_its_budget() -> None:
    """At 8 dims NGOpt picks MetaModel(CMA), whose surrogate step (from about the 50th ask) crashed with
    NumPy 2.4 (float() of a one-element array): the text8 search-quality run stopped there."""
    space = make_space(("ties",))
    run = Driver(build("ngopt", space, batch=1, budget=100), space, batch=1).run(100)
    assert len(run.scores) == 100 and max(run.scores[50:]) > max(run.scores[:8])


def test_ngopt_names_the_algorithm_it_picked() -> None:
    one_method = make_space(("ties",))  # 8 float axes, no categorical
    assert "NGOpt -> MetaModel -> CMA(popsize=10" in build("ngopt", one_method, batch=1, budget=100).describe()
    assert "NGOpt -> CMA -> CMA(popsize=6, diagonal=True)" in build("ngopt", one_method, budget=1000).describe()
    assert "NGOpt -> Chaining" in build("ngopt", make_space(), batch=4, budget=100).describe()  # method choice
    assert "CMA(popsize=12, diagonal=False)" in build("ng_cma", one_method, batch=4).describe()
    assert "TwoPointsDE" in build("ng_de", one_method, batch=4).describe()


# ---- determinism ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", EXTERNAL)
def test_same_seed_same_proposals_whatever_the_global_rng(name: str) -> None:
    space = space_for(name) if name != "grid" else make_space(per="shared")
    runs = []
    for global_seed in (1, 2):
        np.random.seed(global_seed)  # the adapters must not depend on NumPy's global state
        random.seed(global_seed)
        runs.append(Driver(build(name, space, batch=4, budget=40), space, 4, order="shuffle").run(40).proposals)
    assert runs[0] == runs[1]
    if name != "grid":
        other = Driver(build(name, space, seed=1, batch=4, budget=40), space, 4, order="shuffle").run(40)
        assert other.proposals != runs[0]


# ---- the num_workers promise at high dimension ---------------------------------------------------
@pytest.fixture(scope="module")
def space_300() -> SearchSpace:
    space = make_space(("ties",), per="task_group", groups=50, tasks=3)  # 3 tasks × 50 groups × (weight, density)
    assert space.dimension == 300
    return space


@pytest.mark.parametrize("order", ["batch", "shuffle"])
@pytest.mark.parametrize("name", ["ngopt", "ng_cma", "cmaes"])
def test_four_pending_asks_at_300_dims_never_crash(name: str, order: str, space_300: SearchSpace) -> None:
    """The pitfall: pycma's TPA step-size rule (its default from 300 dims) fails with "Mean shift samples
    are expected but missing" when four asks are pending across generations. Without the adapters'
    CSA choice this crashes NGOpt (which picks CMA with popsize 9 at this budget) after 44 batch-told
    points, and ``cmaes`` (overlapping generations) in random completion order."""
    run = Driver(build(name, space_300, batch=4, budget=600), space_300, 4, order=order).run(100)
    assert len(run.scores) == 100
    assert max(run.scores[-25:]) > max(run.scores[:4])
    if name == "ngopt":
        assert "NGOpt -> CMA" in run.opt.describe()


# ---- points the optimizer did not propose --------------------------------------------------------
@pytest.mark.parametrize("name", EXTERNAL)
def test_warm_starts_and_retries_are_accepted(name: str) -> None:
    space = space_for(name) if name != "grid" else make_space(per="shared")
    opt = build(name, space, batch=4, **({"points": 7} if name == "grid" else {}))  # grid: 49 + 7 points
    warm = warm_start(space)
    opt.observe(None, warm, outcome(score(space, warm)))  # before any proposal, as the loop does
    driver = Driver(opt, space, 4).run(10)
    driver._fill(20)
    opt.observe(None, warm, outcome(score(space, warm)))  # again, with four asks pending
    opt.observe(None, warm, Outcome(values=None, scalar=-math.inf, feasible=False))  # a failed one
    _retried, params = driver.pending.pop(0)  # a pending candidate comes back as a retry (proposal None)
    driver.pending.insert(0, (None, params))
    driver.run(40)
    assert len(driver.scores) == 40
    assert warm not in driver.proposals or name == "grid"
    ng_opt = getattr(opt, "_optimizer", None)
    if ng_opt is not None:
        assert len(ng_opt._asked) == len(driver.pending)  # the retry was told as its own candidate
        assert ng_opt.num_tell_not_asked >= 2  # the warm starts reached the algorithm


def test_ngopt_with_one_worker_avoids_thread_based_scipy_optimizers(tmp_path: Path) -> None:
    """With num_workers=1 NGOpt would pick Cobyla, run in a thread that cannot take warm starts nor be
    restored; the adapter declares two workers, and its pick checkpoints and takes warm starts."""
    from nevergrad.optimization.recaster import RecastOptimizer

    from mergetune.search.optimizers.nevergrad_opt import optimizer_tree

    space = make_space(("ties",))
    opt = build("ngopt", space, batch=1, budget=100)
    assert not any(isinstance(o, RecastOptimizer) for o in optimizer_tree(opt._optimizer))  # type: ignore[attr-defined]
    warm = warm_start(space)
    opt.observe(None, warm, outcome(score(space, warm)))
    a = Driver(opt, space, 1).run(20)
    opt.checkpoint(tmp_path)
    a.run(30)
    restored = build("ngopt", space, batch=1, budget=100)
    restored.restore(tmp_path, [(warm, outcome(score(space, warm))), *a.trial_history()[:20]])
    assert Driver(restored, space, 1, finished=20).run(30).proposals == a.proposals[20:]
    assert opt._optimizer.num_tell_not_asked == 1  # type: ignore[attr-defined]


def test_cmaes_injects_warm_starts_without_evaluating_them() -> None:
    space = make_space(("ties",))
    opt = build("cmaes", space, batch=1)
    warm = warm_start(space)
    opt.observe(None, warm, outcome(0.5))  # the best score so far
    run = Driver(opt, space, 1).run(20)
    x = np.array([to_unit(a.distribution, warm[a.name]) for a in opt.axes])  # type: ignore[attr-defined]
    assert not opt._known  # type: ignore[attr-defined]
    assert opt._best[0] == -0.5 and np.allclose(opt._best[1], x)  # type: ignore[attr-defined]
    assert warm not in run.proposals


# ---- checkpoint and restore ----------------------------------------------------------------------
def interrupted(
    name: str, space: SearchSpace, folder: Path, *, batch: int, at: int, total: int, **options: Any
) -> tuple[list[dict[str, Any]], Driver]:
    """Run A uninterrupted; B restarts from A's checkpoint taken after ``at`` outcomes (a kill right
    after a checkpoint), its pending points re-queued as retries, and runs the same way. Returns A's
    proposals after the checkpoint, and B."""
    a = Driver(build(name, space, batch=batch, **options), space, batch).run(at)
    a.opt.checkpoint(folder)
    history, pending, asked = a.trial_history(), [(None, params) for _, params in a.pending], len(a.proposals)
    a.run(total)
    b_opt = build(name, space, batch=batch, **options)
    b_opt.restore(folder, history)
    b = Driver(b_opt, space, batch, pending=pending, finished=at, asked=at + len(pending))
    return a.proposals[asked:], b.run(total)


@pytest.mark.parametrize("name", EXTERNAL)
def test_restore_continues_like_an_uninterrupted_run(name: str, tmp_path: Path) -> None:
    space = space_for(name) if name != "grid" else make_space(per="shared")  # 25 + 5 grid points
    a_after, b = interrupted(name, space, tmp_path, batch=4, at=23, total=50)
    assert b.proposals == a_after and len(a_after) >= 4
    assert len(b.scores) == (50 if name != "grid" else 30) - 23
    summary = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert summary.get("seen", summary.get("finished")) == 23


@pytest.mark.parametrize("name", ["ngopt", "ng_de", "cmaes", "pymoo_ga"])
def test_restore_replays_outcomes_after_the_checkpoint(name: str, tmp_path: Path) -> None:
    """A checkpoint older than the history (or none at all): the missing outcomes are replayed."""
    space = space_for(name)
    a = Driver(build(name, space, batch=4), space, 4, order="shuffle").run(12)
    a.opt.checkpoint(tmp_path / "old")
    a.run(30)
    finished = {json.dumps(p, sort_keys=True) for p, _ in a.trial_history()}
    for folder in (tmp_path / "old", tmp_path / "none"):
        opt = build(name, space, batch=4)
        opt.restore(folder, a.trial_history())
        b = Driver(opt, space, 4, order="shuffle", finished=30).run(60)
        assert len(b.scores) == 30
        assert not finished & {json.dumps(p, sort_keys=True) for p in b.proposals}


def test_nevergrad_checkpoint_of_another_version_is_rebuilt(tmp_path: Path) -> None:
    space = make_space()
    a = Driver(build("ngopt", space, batch=2), space, 2).run(10)
    a.opt.checkpoint(tmp_path)
    summary = json.loads((tmp_path / "nevergrad.checkpoint.json").read_text())
    (tmp_path / "nevergrad.checkpoint.json").write_text(json.dumps({**summary, "nevergrad": "0.0.1"}))
    opt = build("ngopt", space, batch=2)
    opt.restore(tmp_path, a.trial_history())
    assert opt._optimizer.num_tell == 10  # type: ignore[attr-defined]  # rebuilt: all ten told as new points
    assert len(Driver(opt, space, 2, finished=10).run(20).scores) == 10


def test_cmaes_unreadable_checkpoint_starts_afresh(tmp_path: Path) -> None:
    space = make_space(("ties",))
    a = Driver(build("cmaes", space, batch=2), space, 2).run(10)
    (tmp_path / "cmaes.pkl").write_bytes(b"not a pickle")
    opt = build("cmaes", space, batch=2)
    opt.restore(tmp_path, a.trial_history())
    assert len(opt._known) == 10  # type: ignore[attr-defined]  # queued for injection
    assert len(Driver(opt, space, 2, finished=10).run(30).scores) == 20


# ---- CMA-ES specifics ----------------------------------------------------------------------------
def test_cmaes_refuses_a_space_that_is_not_continuous() -> None:
    with pytest.raises(MergetuneError, match=r"continuous.*2 methods.*ngopt or tpe"):
        build("cmaes", make_space())
    with pytest.raises(MergetuneError, match=r"categorical.*ngopt or tpe"):
        build("cmaes", make_space(("ties",), options={"disjoint": ["mean", "sum"]}))
    scaled = build("cmaes", make_space(("ties",), options={"scale": FloatRange(low=0.5, high=2.0)}))
    proposal = scaled.propose()  # a float option is continuous: accepted, and searched within its range
    assert proposal is not None and 0.5 <= proposal.params["ties/opt/scale"] <= 2.0


def test_cmaes_popsize_is_a_multiple_of_the_batch() -> None:
    space = make_space(("ties",))  # 8 dims: pycma's default popsize 4 + ⌊3 ln 8⌋ = 10
    assert build("cmaes", space, batch=1).popsize == 10  # type: ignore[attr-defined]
    assert build("cmaes", space, batch=4).popsize == 12  # type: ignore[attr-defined]
    assert build("cmaes", space, batch=5, popsize=7).popsize == 10  # type: ignore[attr-defined]


def test_cmaes_ipop_restarts_double_the_population() -> None:
    space = make_space(("ties",))
    opt = build("cmaes", space, batch=3, budget=None, cma_options={"tolx": 0.2})
    run = Driver(opt, space, 3, order="shuffle").run(120)
    assert len(run.scores) == 120
    restarts = opt._restarts  # type: ignore[attr-defined]
    assert restarts >= 1
    assert opt.popsize_now == 12 * 2**restarts  # type: ignore[attr-defined]
    assert f"IPOP restarts {restarts}" in opt.describe()


# ---- grid ----------------------------------------------------------------------------------------
def test_grid_enumerates_every_point_in_order() -> None:
    space = SearchSpace(
        base="/models/base",
        experts=[Expert(name=t, model=f"/models/{t}") for t in TASKS],
        group_names=["g0"],
        methods={
            "ties": MethodSpace(options={"disjoint": ["mean", "sum"]}),
            "task_arithmetic": MethodSpace(weight=ParamRange(per="shared", low=0.01, high=1.0, log=True)),
        },
        weight=ParamRange(per="shared"),
        density=ParamRange(per="shared"),
    )
    opt = build("grid", space, budget=None, points=3)
    ties = [
        {"method": "ties", "ties/weight": w, "ties/density": d, "ties/opt/disjoint": o}
        for w in (0.2, 1.1, 2.0)
        for d in (0.05, 0.525, 1.0)  # no low/high given: the default density range, 0.05 to 1
        for o in ("mean", "sum")
    ]
    ta = [{"method": "task_arithmetic", "task_arithmetic/weight": w} for w in (0.01, 0.1, 1.0)]
    got = Driver(opt, space, 2).run(100).proposals
    assert len(got) == opt.size == 21  # type: ignore[attr-defined]
    for point, expected in zip(got, ties + ta, strict=True):
        assert list(point) == list(expected)
        assert point == {k: pytest.approx(v) if isinstance(v, float) else v for k, v in expected.items()}
    assert opt.propose() is None and opt.exhausted  # type: ignore[attr-defined]


def test_grid_restore_skips_finished_points(tmp_path: Path) -> None:
    space = make_space(("ties",), per="shared")  # 5 × 5 = 25 points
    full = Driver(build("grid", space, batch=3), space, 3).run(25).proposals
    a = Driver(build("grid", space, batch=3), space, 3, order="shuffle").run(11)
    a.opt.checkpoint(tmp_path)
    history = a.trial_history()
    opt = build("grid", space, batch=3)
    opt.restore(tmp_path, history)
    b = Driver(opt, space, 3, pending=[(None, p) for _, p in a.pending], finished=11).run(25)
    evaluated = [p for p, _ in history] + [p for _, p, _ in b.history]
    assert sorted(map(str, evaluated)) == sorted(map(str, full))  # every point exactly once
    assert b.proposals == full[len(a.proposals) :]
    shutil.rmtree(tmp_path)  # no checkpoint: the history alone says what is finished
    opt = build("grid", space, batch=3)
    opt.restore(tmp_path, history)
    rest = Driver(opt, space, 3, finished=11).run(25).proposals
    assert not {str(p) for p, _ in history} & {str(p) for p in rest}


def test_grid_is_exhausted_as_soon_as_only_finished_points_remain(tmp_path: Path) -> None:
    """The loop asks only while not exhausted, and a None from propose would fall back to the study's random
    sampler: a grid whose last points were already evaluated (warm starts, a restored history) must say
    it is exhausted before it is asked again."""
    space = make_space(("ties",), per="shared")
    opt = build("grid", space, points=2)  # weight × density: 4 points
    grid = opt.points_in_order()  # type: ignore[attr-defined]
    opt.observe(None, grid[3], outcome(score(space, grid[3])))  # a warm start equal to the last grid point
    proposals = [opt.propose() for _ in range(3)]
    assert [p.params for p in proposals if p is not None] == grid[:3]
    assert opt.exhausted
    restored = build("grid", space, points=2)
    restored.restore(tmp_path, [(p, outcome(0.0)) for p in (grid[0], grid[1], grid[3])])  # no checkpoint
    proposal = restored.propose()
    assert proposal is not None and proposal.params == grid[2] and restored.exhausted


def test_grid_larger_than_the_budget() -> None:
    space = make_space(("ties",))  # 8 float axes: 5**8 points
    with pytest.raises(MergetuneError, match=r"390625 grid points.*budget of 60.*oversize: sample"):
        build("grid", space, budget=60)
    opt = build("grid", space, budget=60, oversize="sample")
    points = Driver(opt, space, 4).run(60).proposals
    again = Driver(build("grid", space, budget=60, oversize="sample"), space, 4).run(60).proposals
    assert len(points) == len({str(p) for p in points}) == 60 and points == again
    assert opt.propose() is None


# ---- encoding ------------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(
    low=st.floats(1e-3, 10.0),
    ratio=st.floats(1.01, 1e3),
    log=st.booleans(),
    u=st.floats(-0.5, 1.5),
)
def test_unit_coordinates_round_trip_and_stay_in_bounds(low: float, ratio: float, log: bool, u: float) -> None:
    """The codec every external optimizer shares: any coordinate maps into the bounds (clipped outside
    [0, 1]), and a coordinate inside [0, 1] comes back from its value."""
    dist = FloatDistribution(low, low * ratio, log=log)
    value = from_unit(dist, u)
    assert dist.low <= value <= dist.high
    assert to_unit(dist, value) == pytest.approx(min(max(u, 0.0), 1.0), abs=1e-9)


@settings(max_examples=50, deadline=None)
@given(x=st.lists(st.floats(0.0, 1.0), min_size=9, max_size=9))
def test_unit_box_maps_points_to_vectors_and_back(x: list[float]) -> None:
    log_weight = ParamRange(per="task", low=0.01, high=1.0, log=True)
    space = make_space(("ties",), weight=log_weight, options={"scale": FloatRange(low=0.5, high=2.0)})
    box = UnitBox(space)  # 4 log weights, 4 densities, the scale
    params = box.decode(x)
    assert list(params) == [a.name for a in space.axes] and len(box) == 9  # axis order
    assert all(a.distribution.low <= params[a.name] <= a.distribution.high for a in space.axes)  # type: ignore[attr-defined]
    assert np.allclose(box.encode(params), x, atol=1e-9)
    partial = {k: v for k, v in params.items() if k != "ties/density/sst2"}  # the 5th axis
    with pytest.raises(KeyError, match="ties/density/sst2"):
        box.encode(partial)
    filled = box.encode(partial, fill=np.full(9, 0.25))
    assert filled[4] == 0.25 and np.allclose(np.delete(filled, 4), np.delete(np.array(x), 4), atol=1e-9)


def test_log_axes_are_searched_geometrically_within_bounds() -> None:
    log_weight = ParamRange(per="task", low=0.01, high=1.0, log=True)
    dist = FloatDistribution(0.01, 1.0, log=True)
    assert from_unit(dist, 0.5) == pytest.approx(0.1) and to_unit(dist, 0.1) == pytest.approx(0.5)
    assert from_unit(dist, 1.0) == 1.0 and from_unit(dist, -0.2) == 0.01  # clipped into the bounds
    for name in ("ngopt", "ng_cma", "ng_de", "cmaes"):
        space = make_space(("ties",), weight=log_weight)
        opt = build(name, space, batch=2)
        edge = {a.name: a.distribution.low for a in space.axes}  # type: ignore[attr-defined]
        opt.observe(None, edge, outcome(score(space, edge)))  # a foreign point on the lower bounds
        run = Driver(opt, space, 2).run(30)
        weights = [v for p in run.proposals for k, v in p.items() if "/weight/" in k]
        assert min(weights) >= 0.01 and max(weights) <= 1.0
        assert np.median(weights) < 0.3  # geometric: the median of log-uniform-ish draws is ~0.1, not 0.5
