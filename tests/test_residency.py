"""The store's residency tiers and memory budget, streamed loading, and one-at-a-time expert references."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import pickle
import resource
import signal
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import trials_by_state, write_search_config, zoo_setup
from optuna.trial import TrialState
from safetensors.torch import load_file, save_file

from mergetune.errors import BadWeightsError, MergetuneError
from mergetune.merging.engine import Merger
from mergetune.merging.loading import LazyState, open_model
from mergetune.merging.modelset import ModelSet
from mergetune.merging.residency import MemoryBudget, format_bytes, parse_bytes
from mergetune.objectives.models import load_task_model
from mergetune.objectives.suite import ValidationSuite
from mergetune.recipe import Expert, Recipe
from mergetune.search.config import SearchConfig, SearchConfigError
from mergetune.search.loop import open_search, resolve_models, worker_setup
from mergetune.search.worker import Worker, split_holdout

Dirs = tuple[Path, dict[str, Path]]


# ---- sizes and tiers ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [(1234, 1234), ("800MB", 800 * 10**6), ("24GB", 24 * 10**9), ("1.5 GiB", 3 * 2**29), ("64kib", 65536)],
)
def test_sizes_read_as_bytes(text: int | str, expected: int) -> None:
    assert parse_bytes(text, "resources.memory") == expected


@pytest.mark.parametrize("bad", ["24 parsecs", "GB", "-3GB", 0, True])
def test_a_bad_size_names_its_field_and_the_units(bad: object) -> None:
    with pytest.raises(MergetuneError, match=r"^resources\.memory: "):
        parse_bytes(bad, "resources.memory")  # type: ignore[arg-type]


def test_a_bad_size_in_a_config_is_one_line_naming_the_field(tmp_path: Path) -> None:
    path = write_search_config(tmp_path / "c.yaml", resources={"memory": "lots"})
    with pytest.raises(SearchConfigError, match=r"resources\.memory: cannot read 'lots' as a size"):
        SearchConfig.load(path)


@pytest.mark.parametrize(
    ("device", "memory", "device_memory", "tier"),
    [
        ("cpu", None, None, "device"),  # no budget: today's behaviour, the store where it merges
        ("cpu", 1000, None, "device"),  # fits the host budget
        ("cpu", 999, None, "disk"),  # one byte short
        ("cuda", None, 1000, "device"),
        ("cuda", None, 999, "host"),  # too big for the accelerator, fits host memory
        ("cuda", 999, 999, "disk"),  # fits neither
    ],
)
def test_the_tier_follows_the_budgets(device: str, memory: int | None, device_memory: int | None, tier: str) -> None:
    residency = MemoryBudget(memory, device_memory, "/tmp/x").choose(1000, device, "k")
    assert residency.tier == tier
    assert (residency.path is not None) == (tier == "disk")
    assert f"tier {tier}" in residency.describe()


# ---- streamed loading ----------------------------------------------------------------------------------


def test_lazy_state_reads_the_same_tensors_as_safetensors(tiny_llama_dir: Dirs) -> None:
    base_dir, _ = tiny_llama_dir
    model = open_model(base_dir)
    assert isinstance(model.state, LazyState)
    reference = load_file(base_dir / "model.safetensors")
    assert sorted(model.state) == sorted(reference)
    for name, tensor in reference.items():
        got = model.state[name]
        assert got.dtype == tensor.dtype and torch.equal(got, tensor), name
        assert model.state.meta(name).shape == tuple(tensor.shape)


def test_a_truncated_safetensors_file_is_named(tiny_llama_dir: Dirs, tmp_path: Path) -> None:
    data = (tiny_llama_dir[0] / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(BadWeightsError, match=r"model\.safetensors: cannot read safetensors file: tensor '"):
        open_model(tmp_path)


def test_bf16_and_other_dtypes_read_bit_for_bit(tmp_path: Path) -> None:
    tensors = {
        "w": torch.randn(3, 5).to(torch.bfloat16),
        "h": torch.randn(4).half(),
        "ids": torch.arange(7),
        "mask": torch.tensor([True, False]),
        "empty": torch.zeros(0, 3),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    state = open_model(tmp_path / "model.safetensors").state
    for name, tensor in tensors.items():
        assert state[name].dtype == tensor.dtype and torch.equal(state[name], tensor), name


# ---- the disk tier ---------------------------------------------------------------------------------------


def test_disk_tier_store_equals_the_resident_one(tiny_llama_dir: Dirs, tmp_path: Path) -> None:
    base, experts = tiny_llama_dir
    resident = ModelSet.load(base, experts)
    budget = MemoryBudget(memory=1, disk_dir=str(tmp_path))  # one byte: nothing fits in memory
    on_disk = ModelSet.load(base, experts, budget=budget)
    assert on_disk.residency.tier == "disk" and resident.residency.tier == "device"
    file = Path(on_disk.residency.path or "")
    assert file.parent == tmp_path and file.stat().st_size == (len(experts) + 1) * resident.numel * 4
    assert [p.name for p in tmp_path.iterdir()] == [file.name]  # no half-written file left
    assert torch.equal(on_disk.tau, resident.tau) and torch.equal(on_disk.base_flat, resident.base_flat)
    recipe = Recipe(
        base=str(base), experts=[Expert(name=t, model=str(p)) for t, p in experts.items()], method="ties", density=0.4
    )
    got, want = Merger(on_disk, compile=False).merge(recipe), Merger(resident, compile=False).merge(recipe)
    assert all(torch.equal(got[k], want[k]) for k in want)


def _scratch_maps(folder: Path) -> list[str]:
    """This process's memory maps of unlinked scratch files in ``folder`` (``/proc/self/maps``)."""
    lines = Path("/proc/self/maps").read_text().splitlines()
    return [line for line in lines if f"{folder}/scratch-" in line and line.endswith("(deleted)")]


# The methods whose setup caches a [T, D] tensor of scores, with that cache's bytes per entry (float32 store).
TASK_SIZED_CACHES = [
    ("pcb", {}, 4),  # β, float32 beside a float32 store
    ("della", {}, 4),  # the normalised ranks, in the store's dtype
    ("ties", {"scope": "tensor", "tie_rule": "mergekit", "sign_cancel": "plus_one"}, 4),  # int32 order scores
]


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads the process's maps from /proc (Linux)")
@pytest.mark.parametrize(("method", "options", "entry_bytes"), TASK_SIZED_CACHES)
def test_a_task_sized_cache_beside_a_disk_store_is_a_mapped_scratch_file_and_merges_the_same(
    tiny_llama_dir: Dirs, tmp_path: Path, method: str, options: dict[str, Any], entry_bytes: int
) -> None:
    """PCB's β, DELLA's ranks and the mergekit rule's order scores are as large as the task vectors: beside a
    disk-tier store they live in an unlinked file of its folder, mapped like the store, not in memory (the
    budget that sent the store to disk holds); the merge equals the resident one bit for bit."""
    base, experts = tiny_llama_dir
    on_disk = ModelSet.load(base, experts, budget=MemoryBudget(memory=1, disk_dir=str(tmp_path)))
    resident = ModelSet.load(base, experts)
    recipe = Recipe(
        base=str(base),
        experts=[Expert(name=t, model=str(p)) for t, p in experts.items()],
        method=method,
        density=0.3,
        options=options,
    )
    disk_merger, resident_merger = Merger(on_disk, compile=False), Merger(resident, compile=False)
    got, want = disk_merger.merge(recipe), resident_merger.merge(recipe)
    assert all(torch.equal(got[k], want[k]) for k in want)
    cache_bytes = len(experts) * resident.numel * entry_bytes
    (disk_stats,) = [layout.stats for layout in disk_merger._layouts.values()]
    (resident_stats,) = [layout.stats for layout in resident_merger._layouts.values()]
    assert disk_stats.held_bytes()["scores_on_disk"] == cache_bytes == resident_stats.held_bytes()["scores"]
    assert "scores" not in disk_stats.held_bytes()
    assert resident_stats.extra_bytes() - disk_stats.extra_bytes() == cache_bytes  # not counted as memory
    assert len(_scratch_maps(tmp_path)) == 1
    assert [p.name for p in tmp_path.iterdir()] == [Path(on_disk.residency.path or "").name]  # no name left
    del disk_merger, disk_stats
    gc.collect()
    assert _scratch_maps(tmp_path) == []  # the map, hence the file's blocks, went with the cache


@contextlib.contextmanager
def _file_size_limit(nbytes: int) -> Iterator[None]:
    """Files of this process cannot grow past ``nbytes`` (``RLIMIT_FSIZE``): the kernel's own refusal, as a full
    disk refuses (EFBIG instead of ENOSPC), without filling a disk. SIGXFSZ is ignored so the call fails."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


@pytest.mark.skipif(not hasattr(os, "posix_fallocate"), reason="reserves blocks with posix_fallocate (Linux)")
def test_no_room_for_a_disk_store_or_its_scratch_file_is_one_error_naming_it(
    tiny_llama_dir: Dirs, tmp_path: Path
) -> None:
    """Files written through a map get their blocks reserved first: no room is an error naming the file, its
    size and the room left (not a SIGBUS mid-merge), and no file is left behind."""
    base, experts = tiny_llama_dir
    store = tmp_path / "store"
    with _file_size_limit(4096), pytest.raises(MergetuneError, match=r"cannot reserve .* for the disk-tier store at"):
        ModelSet.load(base, experts, budget=MemoryBudget(memory=1, disk_dir=str(store)))
    assert not store.exists() or not list(store.iterdir())
    on_disk = ModelSet.load(base, experts, budget=MemoryBudget(memory=1, disk_dir=str(store)))
    recipe = Recipe(
        base=str(base), experts=[Expert(name=t, model=str(p)) for t, p in experts.items()], method="pcb", density=0.3
    )
    beta = format_bytes(len(experts) * on_disk.numel * 4)
    with _file_size_limit(4096), pytest.raises(MergetuneError, match=rf"cannot reserve {beta} for a scratch file"):
        Merger(on_disk, compile=False).merge(recipe)
    assert [p.name for p in store.iterdir()] == [Path(on_disk.residency.path or "").name]
    assert Merger(on_disk, compile=False).merge(recipe)  # with room, the same store merges


def test_a_forced_host_tier_merges_like_the_device_tier(tiny_llama_dir: Dirs) -> None:
    """On a CPU the host tier's chunks are views of the store (host == device): the same merge, bit for bit."""
    base, experts = tiny_llama_dir
    host = ModelSet.load(base, experts, budget=MemoryBudget(tier="host"))
    assert host.residency.tier == "host" and host.placed("cpu") is host
    resident = ModelSet.load(base, experts)
    recipe = Recipe(
        base=str(base),
        experts=[Expert(name=t, model=str(p)) for t, p in experts.items()],
        method="dare_ties",
        density=0.5,
    )
    got, want = Merger(host, compile=False).merge(recipe), Merger(resident, compile=False).merge(recipe)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_a_disk_store_pickles_as_its_path(tiny_llama_dir: Dirs, tmp_path: Path) -> None:
    """What Ray's object store holds for a disk-tier store: the path, not the task vectors."""
    base, experts = tiny_llama_dir
    on_disk = ModelSet.load(base, experts, budget=MemoryBudget(memory=1, disk_dir=str(tmp_path)))
    data = pickle.dumps(on_disk)
    assert len(data) < on_disk.resident_bytes() // 4
    back = pickle.loads(data)
    assert back.residency == on_disk.residency
    assert torch.equal(back.tau, on_disk.tau) and torch.equal(back.base_flat, on_disk.base_flat)
    Path(on_disk.residency.path or "").unlink()
    with pytest.raises(MergetuneError, match=r"disk-tier store .* is missing on this machine"):
        pickle.loads(data)


def test_a_failed_disk_load_leaves_no_file(tiny_llama_dir: Dirs, tmp_path: Path) -> None:
    base, experts = tiny_llama_dir
    state = load_file(experts["code"] / "model.safetensors")
    name = sorted(state)[-1]
    state[name][0] = float("nan")
    (tmp_path / "bad").mkdir()
    save_file(state, tmp_path / "bad" / "model.safetensors")
    store = tmp_path / "store"
    with pytest.raises(BadWeightsError, match=rf"tensor '{name}' has 1 NaN"):
        ModelSet.load(base, {"code": tmp_path / "bad"}, budget=MemoryBudget(memory=1, disk_dir=str(store)))
    assert not store.exists() or not list(store.iterdir())


def test_a_search_over_budget_runs_from_disk_with_the_resident_scores(
    tmp_path: Path, zoo_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The issue's 'done means': a memory budget smaller than the store, the same scores as the resident run.

    The search runs from the disk tier; a resident worker (no budget) then scores each of its candidates' recipes:
    every raw score, normalised score and metric must be equal (the references come from the run's cache).
    """
    for key, value in zoo_env.items():
        monkeypatch.setenv(key, value)
    cfg = write_search_config(tmp_path / "c.yaml", resources={"memory": "64KB"}, budget={"candidates": 4})
    config = SearchConfig.load(cfg)
    loop = open_search(config)
    try:
        summary = loop.run()
        on_disk = loop.executor.worker.modelset  # type: ignore[attr-defined]
    finally:
        loop.close()
    run = tmp_path / "run"
    assert on_disk.residency.tier == "disk" and on_disk.resident_bytes() > 64_000  # the budget is below the store
    assert Path(on_disk.residency.path).parent == (run / "cache" / "store").resolve()
    assert "tier disk" in summary["meta"]["executor"]
    assert "tier disk" in json.loads((run / "summary.json").read_text())["meta"]["executor"]

    resident_setup = dataclasses.replace(worker_setup(config, resolve_models(config)), memory=None)
    resident = Worker(resident_setup)
    assert resident.modelset.residency.tier == "device"
    trials = trials_by_state(run / "search.journal")
    assert set(trials) == {TrialState.COMPLETE} and len(trials[TrialState.COMPLETE]) == 4
    for trial in trials[TrialState.COMPLETE]:
        again = resident.evaluate(trial.user_attrs["recipe"])
        assert again.scores == trial.user_attrs["scores"], trial.number
        assert again.normalized == trial.user_attrs["normalized"], trial.number
        assert again.metrics == trial.user_attrs["metrics"], trial.number


# ---- expert references, one model at a time ---------------------------------------------------------------


def test_expert_references_hold_one_expert_model_at_a_time(
    zoo_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    setup = zoo_setup(zoo_env, tmp_path / "c.yaml", monkeypatch)
    worker = Worker(setup)
    alive: list[weakref.ref] = []
    most_alive = 0

    def loader(task: Any, folder: Any) -> Any:
        nonlocal most_alive
        gc.collect()
        most_alive = max(most_alive, sum(ref() is not None for ref in alive) + 1)
        model = load_task_model(task, folder)
        alive.append(weakref.ref(model))
        return model

    tasks = [split_holdout(t, 0.33, 0)[0] for t in worker._all_tasks]
    suite = ValidationSuite(tasks, worker.tokenizer, batch_size=64)  # no cache dir: every reference is measured
    suite.reference_scores(setup.task_experts(), base=setup.base, loader=loader)
    assert len(alive) >= 3 and most_alive == 1


def test_resources_section_reaches_the_worker_setup(tmp_path: Path) -> None:
    cfg = write_search_config(
        tmp_path / "c.yaml", resources={"memory": "2GiB", "device_memory": 1000, "storage_dtype": "bfloat16"}
    )
    config = SearchConfig.load(cfg)
    setup = worker_setup(config, resolve_models_stub(config))
    assert (setup.memory, setup.device_memory, setup.storage_dtype) == (2 * 2**30, 1000, "bfloat16")
    assert setup.store_dir == str((tmp_path / "run" / "cache" / "store").resolve())
    assert yaml.safe_load(cfg.read_text())["resources"]["memory"] == "2GiB"


def resolve_models_stub(config: SearchConfig) -> Any:
    """Models as resolve_models would give them, without building the zoo (the setup only copies them)."""
    from mergetune.search.loop import ResolvedModels

    return ResolvedModels("base", {"a": "a"}, [])
