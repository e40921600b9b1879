"""Optimizer checkpoints are data: nothing in a run folder is unpickled, and a resume replays the calls.

Issue 12: ``optimizer/cmaes.pkl`` and ``nevergrad.pkl`` were unpickled on resume, so a file planted in
the run folder ran code. Now ``cmaes`` and the Nevergrad optimizers checkpoint the log of their calls
as versioned JSON and replay it on a fresh, same-seeded optimizer (``optimizers/_replay.py``). These
tests plant real files (a pickle whose loading would create a marker file, torn and foreign JSON),
restore real optimizers from them, and run one real search resume through the CLI.
"""

from __future__ import annotations

import json
import logging
import pickle
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import run_cli
from test_optimizers import Driver, build, make_space, space_for

from mergetune.errors import MergetuneError
from mergetune.search.optimizers import Optimizer
from mergetune.search.optimizers._external import CheckpointError
from mergetune.search.optimizers.nevergrad_opt import import_nevergrad

SEARCHERS = ("ngopt", "ng_cma", "ng_de", "cmaes", "pymoo_ga")
LEGACY_PICKLES = ("cmaes.pkl", "nevergrad.pkl")  # what mergetune wrote, and unpickled, before


class _TouchOnLoad:
    """Unpickling this creates ``marker``: what a planted pickle could do instead (any code at all)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def planted_pickle(marker: Path) -> bytes:
    """A pickle shaped like the old checkpoints whose loading creates ``marker``."""
    return pickle.dumps({"version": "any", "nevergrad": "any", "es": _TouchOnLoad(marker)})


def plant_pickles(folder: Path, marker: Path) -> None:
    """Both old checkpoint pickles, and the JSON summary the old Nevergrad reader checked before loading."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in LEGACY_PICKLES:
        (folder / name).write_bytes(planted_pickle(marker))
    (folder / "nevergrad.json").write_text(json.dumps({"nevergrad": import_nevergrad().__version__}))


def next_proposals(opt: Optimizer, name: str, finished: int, count: int = 8) -> list[dict[str, Any]]:
    return Driver(opt, space_for(name), 2, finished=finished).run(finished + count).proposals


def checkpoint_of(folder: Path) -> Path:
    (path,) = folder.glob("*.checkpoint.json")
    return path


# ---- nothing is unpickled ------------------------------------------------------------------------
def test_the_planted_payload_does_run_code_when_unpickled(tmp_path: Path) -> None:
    """The tests below would prove nothing if loading the planted file did not create the marker."""
    marker = tmp_path / "marker"
    pickle.loads(planted_pickle(marker))
    assert marker.exists()


@pytest.mark.parametrize("name", SEARCHERS)
def test_a_planted_pickle_is_never_loaded(name: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    space, marker, folder = space_for(name), tmp_path / "marker", tmp_path / "optimizer"
    plant_pickles(folder, marker)
    history = Driver(build(name, space, batch=2), space, 2).run(6).trial_history()
    opt = build(name, space, batch=2)
    with caplog.at_level(logging.WARNING):
        opt.restore(folder, history)
    assert not marker.exists()
    warned = [r.getMessage() for r in caplog.records if ".pkl" in r.getMessage()]
    assert len(warned) == len(LEGACY_PICKLES)  # one line per old pickle
    assert all("never loaded" in w and "comes from the history" in w and "delete" in w for w in warned)
    fresh = build(name, space, batch=2)  # ignored: exactly a rebuild from the history
    fresh.restore(tmp_path / "nothing", history)
    assert next_proposals(opt, name, 6) == next_proposals(fresh, name, 6)


def test_a_search_never_loads_a_pickle_planted_in_its_run_folder(tmp_path: Path, zoo_env: dict[str, str]) -> None:
    """Through the CLI: every start of a search resumes from its run folder (here one holding only the
    planted pickles): the search runs, writes its JSON checkpoint, and the marker never appears."""
    config = {
        "name": "tiny-test",
        "models": {"zoo": "tiny"},
        "space": {"methods": ["task_arithmetic"], "weight": {"per": "task"}},
        "optimizer": {"name": "cmaes"},
        "budget": {"candidates": 3},
        "selection": {"rescore_top": 1},
        "output": str(tmp_path / "run"),
    }
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(config))
    marker, folder = tmp_path / "marker", tmp_path / "run" / "optimizer"
    plant_pickles(folder, marker)
    search = run_cli(["search", str(cfg)], zoo_env, tmp_path)
    out, _ = search.communicate(timeout=300)
    assert search.returncode == 0, out
    assert not marker.exists()
    assert json.loads((folder / "cmaes.checkpoint.json").read_text())["seen"] == 3


# ---- unreadable checkpoints are errors naming the file -------------------------------------------
def _torn(text: str) -> str:
    return text[: len(text) // 2]  # what a crash mid-write without atomic_write would leave


def _version(text: str) -> str:
    return json.dumps({**json.loads(text), "version": 99})


def _event(text: str) -> str:
    data = json.loads(text)
    data["events"][3] = {"ask": 42}
    return json.dumps(data)


def _foreign(text: str) -> str:
    return json.dumps({"seen": 6})  # a JSON object, but no checkpoint


SPOILERS: dict[str, tuple[Callable[[str], str], str]] = {
    "torn": (_torn, "not readable as JSON"),
    "unknown version": (_version, "format version 99 unknown"),
    "bad event": (_event, "malformed"),
    "foreign": (_foreign, "not a mergetune optimizer checkpoint"),
}


@pytest.mark.parametrize("spoiler", list(SPOILERS))
@pytest.mark.parametrize("name", ["cmaes", "ngopt"])
def test_an_unreadable_checkpoint_is_an_error_naming_the_file(name: str, spoiler: str, tmp_path: Path) -> None:
    space = space_for(name)
    a = Driver(build(name, space, batch=2), space, 2).run(6)
    a.opt.checkpoint(tmp_path)
    path = checkpoint_of(tmp_path)
    spoil, problem = SPOILERS[spoiler]
    path.write_text(spoil(path.read_text()))
    with pytest.raises(CheckpointError, match=problem) as caught:
        build(name, space, batch=2).restore(tmp_path, a.trial_history())
    assert isinstance(caught.value, MergetuneError) and caught.value.path == path
    assert str(path) in str(caught.value) and "delete this file to rebuild the optimizer from the" in str(caught.value)


def test_grid_state_is_versioned_and_an_unreadable_one_names_the_file(tmp_path: Path) -> None:
    space = make_space(("ties",), per="shared")
    a = Driver(build("grid", space, batch=2), space, 2).run(5)
    a.opt.checkpoint(tmp_path)
    path = tmp_path / "grid.json"
    state = json.loads(path.read_text())
    assert state["version"] == 1
    path.write_text(json.dumps({k: v for k, v in state.items() if k != "version"}))  # as earlier versions wrote it
    earlier = build("grid", space, batch=2)
    earlier.restore(tmp_path, a.trial_history())
    assert earlier.position == state["position"]  # type: ignore[attr-defined]
    for text, problem in [(json.dumps({**state, "version": 2}), "version 2 unknown"), ("{", "not readable as JSON")]:
        path.write_text(text)
        with pytest.raises(CheckpointError, match=problem) as caught:
            build("grid", space, batch=2).restore(tmp_path, a.trial_history())
        assert str(path) in str(caught.value) and "delete this file" in str(caught.value)


# ---- the replay --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["cmaes", "ngopt", "pymoo_ga"])
def test_a_replay_that_diverges_warns_and_rebuilds_from_the_history(
    name: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A re-asked point that differs from the recorded one (another library build, another platform's
    arithmetic; here a recorded fingerprint altered) is not trusted: the history rebuilds the optimizer."""
    space = space_for(name)
    a = Driver(build(name, space, batch=2), space, 2).run(10)
    a.opt.checkpoint(tmp_path / "ckpt")
    path = checkpoint_of(tmp_path / "ckpt")
    data = json.loads(path.read_text())
    asks = [i for i, e in enumerate(data["events"]) if "ask" in e]
    data["events"][asks[5]]["ask"] = "0" * 20
    path.write_text(json.dumps(data))
    opt = build(name, space, batch=2)
    with caplog.at_level(logging.WARNING):
        opt.restore(tmp_path / "ckpt", a.trial_history())
    assert any(f"replaying {path} diverged (event {asks[5]}" in r.getMessage() for r in caplog.records)
    fresh = build(name, space, batch=2)
    fresh.restore(tmp_path / "nothing", a.trial_history())
    assert next_proposals(opt, name, 10) == next_proposals(fresh, name, 10)


def test_other_settings_rebuild_from_the_history(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A log replays only on an optimizer with the same seed, options and space: another seed would
    retrace other draws, so the checkpoint is set aside with a warning."""
    space = space_for("cmaes")
    a = Driver(build("cmaes", space, batch=2), space, 2).run(10)
    a.opt.checkpoint(tmp_path)
    opt = build("cmaes", space, seed=1, batch=2)
    with caplog.at_level(logging.WARNING):
        opt.restore(tmp_path, a.trial_history())
    assert any("other settings (['seed'])" in r.getMessage() for r in caplog.records)
    assert len(opt._known) == 10  # type: ignore[attr-defined]  # the history, queued for injection


def test_a_resume_with_another_budget_continues_the_recorded_optimizer(tmp_path: Path) -> None:
    """``--budget`` may grow on resume. NGOpt chose its algorithm from the first budget; the restored
    optimizer keeps it (as a restored object would) and continues exactly, across a second resume too."""
    space = make_space(("ties",))  # 8 floats: MetaModel(CMA) for a budget of 100, diagonal CMA for 1000
    a = Driver(build("ngopt", space, batch=2, budget=100), space, 2).run(10)
    a.opt.checkpoint(tmp_path / "first")
    a.run(30)
    b_opt = build("ngopt", space, batch=2, budget=1000)
    assert b_opt.describe() != a.opt.describe()  # the budget matters to the choice
    b_opt.restore(tmp_path / "first", a.trial_history()[:10])
    assert b_opt.describe() == a.opt.describe() and b_opt.budget == 1000
    b = Driver(b_opt, space, 2, finished=10, asked=10).run(20)
    assert b.proposals == a.proposals[10:20]
    b_opt.checkpoint(tmp_path / "second")
    events = json.loads(checkpoint_of(tmp_path / "second").read_text())["events"]
    assert {"configure": {"batch_size": 2, "budget": 1000}} in events
    history = [*a.trial_history()[:10], *b.trial_history()]
    b.run(30)  # uninterrupted from here
    c_opt = build("ngopt", space, batch=2, budget=1000)
    c_opt.restore(tmp_path / "second", history)
    assert Driver(c_opt, space, 2, finished=20).run(30).proposals == b.proposals[10:]


def test_a_long_log_with_ipop_restarts_replays_exactly_and_fast(tmp_path: Path) -> None:
    """600 events (300 candidates, four in flight, random completion order) with IPOP restarts: the
    replay reaches the same ES (restarts, population) and proposes what the uninterrupted run does.
    It repeats the optimizer's own work, no more (measured: 0.45 s, the run's adapter calls 0.4 s):
    a bound of a few times the run catches a replay that grows faster than the log."""
    space = space_for("cmaes")
    options = {"cma_options": {"tolx": 0.2}}
    started = time.perf_counter()
    a = Driver(build("cmaes", space, batch=4, budget=None, **options), space, 4, order="shuffle").run(300)
    run_seconds = time.perf_counter() - started
    a.opt.checkpoint(tmp_path)
    a.order = "fifo"  # from here both complete their points in the same order
    assert len(json.loads(checkpoint_of(tmp_path).read_text())["events"]) >= 600
    opt = build("cmaes", space, batch=4, budget=None, **options)
    started = time.perf_counter()
    opt.restore(tmp_path, a.trial_history())
    restore_seconds = time.perf_counter() - started
    assert opt._restarts == a.opt._restarts >= 1  # type: ignore[attr-defined]
    assert opt.popsize_now == a.opt.popsize_now  # type: ignore[attr-defined]
    pending = [(None, params) for _, params in a.pending]
    b = Driver(opt, space, 4, pending=pending, finished=300, asked=300 + len(pending)).run(340)
    asked = len(a.proposals)
    assert b.proposals == a.run(340).proposals[asked:]
    assert restore_seconds < 3 * run_seconds + 1.0, (restore_seconds, run_seconds)
