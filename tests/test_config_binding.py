"""A run is bound to its config (issue 12, item 7): re-running a run name with a config that defines
another search (experts, methods, ...) is one line saying what changed and how to go on, with nothing
written to the storage; ``--restart`` moves the old run aside and starts afresh; budget and execution
may change on resume; older studies are accepted and stamped. (``zoo_env``, ``run_cli``: conftest.)"""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import yaml
from conftest import run_cli, trials_by_state

from mergetune.errors import MergetuneError
from mergetune.objectives.zoo import build_zoo
from mergetune.search.binding import (
    DEFINITION,
    ConfigChangedError,
    check_binding,
    check_study,
    definition,
    differences,
    restart,
)
from mergetune.search.config import SearchConfig
from mergetune.search.storage import open_storage

BASE_CONFIG = {
    "name": "tiny-test",
    "models": {"zoo": "tiny"},
    "space": {"methods": ["task_arithmetic", "ties"], "weight": {"per": "task"}},
    "optimizer": {"name": "tpe"},
    "budget": {"candidates": 2},
    "selection": {"rescore_top": 1},
    "warm_start": False,
}


def write_config(path: Path, **overrides: object) -> Path:
    config = {**BASE_CONFIG, "output": str(path.parent / "run"), **overrides}
    path.write_text(yaml.safe_dump(config))
    return path


def search(args: list[str], env: dict[str, str], cwd: Path) -> tuple[int, str]:
    proc = run_cli(["search", *args], env, cwd)
    out, _ = proc.communicate(timeout=300)
    return proc.returncode, out


def one_error_line(out: str) -> str:
    lines = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in out, out
    return lines[0]


def test_adding_a_method_is_refused_in_one_line_and_restart_moves_the_old_run_aside(
    tmp_path: Path, zoo_env: dict[str, str]
) -> None:
    """Before: a 130-line traceback (CategoricalDistribution does not support dynamic value space) that left a
    failed and a running trial in the study."""
    first = write_config(tmp_path / "c.yaml")
    rc, out = search([str(first)], zoo_env, tmp_path)
    assert rc == 0, out
    journal = tmp_path / "run" / "search.journal"
    before = journal.read_bytes()

    wider = write_config(
        tmp_path / "wider.yaml", space={**BASE_CONFIG["space"], "methods": ["task_arithmetic", "ties", "pcb"]}
    )  # type: ignore[dict-item]
    rc, out = search([str(wider), "--budget", "4"], zoo_env, tmp_path)  # new candidates would draw a new method
    assert rc == 2, out
    line = one_error_line(out)
    assert "space.methods.pcb: (absent) -> {" in line and "name:" in line and "--restart" in line
    assert journal.read_bytes() == before  # nothing written to the storage

    rc, out = search([str(wider), "--restart"], zoo_env, tmp_path)
    assert rc == 0, out
    (moved,) = tmp_path.glob("run.replaced-*")
    assert (moved / "search.journal").read_bytes() == before  # the old run kept whole, nothing deleted
    study = optuna.load_study(study_name="tiny-test", storage=open_storage(journal))
    assert study.user_attrs[DEFINITION]["space"]["methods"].keys() == {"task_arithmetic", "ties", "pcb"}
    assert len(study.trials) == 2 and all(t.state.is_finished() for t in study.trials)


def test_another_expert_set_is_refused_instead_of_mixed_into_the_study(tmp_path: Path, zoo_env: dict[str, str]) -> None:
    """Before: the second run silently added its candidates to the first one's study."""
    zoo = build_zoo("tiny", cache_dir=zoo_env["MERGETUNE_CACHE"], progress=False)
    experts = [{"name": t, "model": str(p)} for t, p in zoo.experts.items()]
    tasks = [t.model_dump(mode="json") for t in zoo.tasks.values()]
    models = {"base": str(zoo.base), "experts": experts}
    rc, out = search([str(write_config(tmp_path / "c.yaml", models=models, tasks=tasks))], zoo_env, tmp_path)
    assert rc == 0, out
    fewer = write_config(tmp_path / "fewer.yaml", models={**models, "experts": experts[:2]}, tasks=tasks)
    journal = tmp_path / "run" / "search.journal"
    before = journal.read_bytes()
    rc, out = search([str(fewer), "--budget", "4"], zoo_env, tmp_path)  # two more candidates, of two experts
    assert rc == 2, out
    assert f"models.experts.2: {{'name': '{experts[2]['name']}'" in one_error_line(out)
    assert journal.read_bytes() == before
    trials = trials_by_state(journal)
    assert sum(len(ts) for ts in trials.values()) == 2


def test_a_study_from_before_the_binding_is_accepted_and_stamped(tmp_path: Path, zoo_env: dict[str, str]) -> None:
    journal = tmp_path / "run" / "search.journal"
    old = optuna.create_study(study_name="tiny-test", storage=open_storage(journal), directions=["maximize"] * 2)
    old.set_user_attr("objectives", ["mean", "worst"])
    path = write_config(tmp_path / "c.yaml")
    rc, out = search([str(path)], zoo_env, tmp_path)
    assert rc == 0, out
    study = optuna.load_study(study_name="tiny-test", storage=open_storage(journal))
    assert study.user_attrs[DEFINITION] == definition(SearchConfig.load(path))


# ---- the check itself --------------------------------------------------------------------------------


def stamped_storage(tmp_path: Path, config: SearchConfig) -> optuna.storages.BaseStorage:
    storage = open_storage(tmp_path / "search.journal")
    study = optuna.create_study(study_name=config.name, storage=storage, directions=["maximize"] * 2)
    study.set_user_attr(DEFINITION, definition(config))
    return storage


def test_budget_execution_and_output_may_change_on_resume(tmp_path: Path) -> None:
    config = SearchConfig.model_validate({**BASE_CONFIG, "output": str(tmp_path / "run")})
    storage = stamped_storage(tmp_path, config)
    resumed = config.updated("budget", candidates=50, seconds=60).updated("execution", executor="ray", workers=4)
    resumed = resumed.updated("evaluation", batch_size=8).updated("selection", rescore_top=3)
    check_study(storage, resumed, "here")  # accepted
    reseeded = config.model_copy(update={"seed": 7})
    with pytest.raises(ConfigChangedError, match=r"\(seed: 0 -> 7\)"):
        check_study(storage, reseeded, "here")


def test_differences_name_each_changed_path() -> None:
    old = {"space": {"weight": {"low": 0.0, "high": 1.0}, "methods": {"ties": {}}}, "seed": 0}
    new = {"space": {"weight": {"low": 0.5, "high": 1.0}, "methods": {"ties": {}, "pcb": {}}}, "seed": 0}
    assert differences(old, new) == ["space.methods.pcb: (absent) -> {}", "space.weight.low: 0.0 -> 0.5"]
    assert differences(new, new) == []


def test_restart_moves_only_a_run_folder_that_holds_its_study(tmp_path: Path) -> None:
    fresh = SearchConfig.model_validate({**BASE_CONFIG, "output": str(tmp_path / "none")})
    assert restart(fresh) is None and not list(tmp_path.iterdir())  # nothing to move
    elsewhere = fresh.model_copy(update={"storage": "sqlite:///" + str(tmp_path / "db.sqlite")})
    with pytest.raises(MergetuneError, match="new 'name:'"):
        restart(elsewhere)


def test_the_check_creates_no_journal_for_a_new_run(tmp_path: Path) -> None:
    config = SearchConfig.model_validate({**BASE_CONFIG, "output": str(tmp_path / "run")})
    check_binding(str(tmp_path / "run" / "search.journal"), config)
    assert not (tmp_path / "run").exists()
