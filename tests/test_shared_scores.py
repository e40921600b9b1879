"""Task-sized caches shared by the processes that unpickled one store: computed once, mapped by all, cleaned up."""

from __future__ import annotations

import gc
import json
import multiprocessing
import os
import pickle
import resource
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergetune.merging.engine import Merger
from mergetune.merging.modelset import ModelSet
from mergetune.merging.residency import MemoryBudget
from mergetune.merging.shared_scores import LOCK_NAME, PREFIX, SHARED_MEMORY, shared_tensors
from mergetune.recipe import Expert, Recipe

Dirs = tuple[Path, dict[str, Path]]
pytestmark = pytest.mark.skipif(
    not Path("/proc/self/maps").is_file(), reason="reads processes' maps from /proc (Linux)"
)


def _recipe(base: Path, experts: dict[str, Path], method: str = "pcb", **options: Any) -> Recipe:
    models = [Expert(name=t, model=str(p)) for t, p in experts.items()]
    return Recipe(base=str(base), experts=models, method=method, density=0.3, options=options)


def _load(dirs: Dirs, tier: str, folder: Path) -> ModelSet:
    base, experts = dirs
    budget = MemoryBudget(memory=1, disk_dir=str(folder)) if tier == "disk" else None
    return ModelSet.load(base, experts, budget=budget)


def _cache_folder(tier: str, folder: Path) -> Path:
    return folder if tier == "disk" else SHARED_MEMORY


def _cache_maps(token: str) -> list[tuple[str, str]]:
    """(inode, path) of this process's maps of the store's shared cache files."""
    found = set()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and f"{PREFIX}{token}" in fields[5]:
            found.add((fields[4], fields[5]))
    return sorted(found)


def _worker(pickled: Path, recipe: Recipe, out: Path, log: Path, barrier: Any, die_while_computing: bool) -> None:
    """A spawned process: unpickle the store, merge ``recipe``, report what it computed and mapped."""
    import mergetune.merging.methods.pcb as pcb
    import mergetune.merging.stats as stats_module

    original = pcb.compute_scores

    def counted(ms: ModelSet, lo: Any, hi: Any, inter: str, allocate: Any = None) -> torch.Tensor:
        with log.open("a") as f:
            f.write(f"beta {os.getpid()}\n")
        if die_while_computing:  # the buffer exists, the compute lock is held: die as a killed worker would
            buffer = allocate(torch.float32)  # held: its map (and lock) live until the process dies
            os._exit(3 if buffer.numel() else 4)
        return original(ms, lo, hi, inter, allocate)

    pcb.compute_scores = counted
    counts = stats_module.block_counts

    def counted_blocks(*args: Any) -> Any:
        with log.open("a") as f:  # the block's name: "score '<kind>', task t, <scope> block i"
            f.write(f"counts {os.getpid()} {args[3]}\n")
        return counts(*args)

    stats_module.block_counts = counted_blocks
    ms = pickle.loads(pickled.read_bytes())
    barrier.wait()  # both workers start the merge together: one computes, the other must wait for it
    merger = Merger(ms, compile=False)
    save_file(merger.merge(recipe), out.with_suffix(".safetensors"))
    (stats,) = [layout.stats for layout in merger._layouts.values()]
    report = {"maps": _cache_maps(ms.share_token), "held": stats.held_bytes(), "extra": stats.extra_bytes()}
    out.with_suffix(".json").write_text(json.dumps(report))
    barrier.wait()  # both maps exist at once before either process lets go


def _spawn(n: int, pickled: Path, recipe: Recipe, folder: Path, **kwargs: Any) -> list[int]:
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(n)
    args = [(pickled, recipe, folder / f"out{i}", folder / "computed.log", barrier) for i in range(n)]
    processes = [context.Process(target=_worker, args=(*a, kwargs.get("die", False))) for a in args]
    for p in processes:
        p.start()
    for p in processes:
        p.join(timeout=300)
    return [p.exitcode for p in processes]


NO_SHARED_MEMORY = pytest.mark.skipif(
    not (SHARED_MEMORY.is_dir() and os.access(SHARED_MEMORY, os.W_OK)),
    reason="no writable /dev/shm: memory-tier caches stay each process's own there (the disk tier is tested)",
)


@pytest.mark.parametrize("tier", [pytest.param("device", marks=NO_SHARED_MEMORY), "disk"])
def test_workers_that_unpickled_one_store_compute_its_beta_once_and_map_one_file(
    tiny_llama_dir: Dirs, tmp_path: Path, tier: str
) -> None:
    """Two processes merging PCB from one pickled store (as two Ray actors of a node do): β is computed by one of
    them and mapped by both from one file (shared memory, or beside a disk store), the merges equal a private
    one bit for bit, the cache is not counted as either process's own memory, and it is gone once both are."""
    ms = _load(tiny_llama_dir, tier, tmp_path)
    recipe = _recipe(*tiny_llama_dir)
    want = Merger(ms, compile=False).merge(recipe)  # this process's copy is not shared: a private β
    pickled = tmp_path / "store.pickle"
    pickled.write_bytes(pickle.dumps(ms))
    assert _spawn(2, pickled, recipe, tmp_path) == [0, 0]

    logged = [line.split(maxsplit=2) for line in (tmp_path / "computed.log").read_text().splitlines()]
    assert len([line for line in logged if line[0] == "beta"]) == 1  # one process computed β
    # and each block's bucket counts (|τ|'s, for PCB's clip bounds, and β's) were built once, by either process
    blocks = [line[2] for line in logged if line[0] == "counts"]
    assert len(blocks) == 2 * ms.n_tasks and len(set(blocks)) == len(blocks), blocks
    reports = [json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(2)]
    beta_bytes = ms.n_tasks * ms.numel * 4  # float32 β beside a float32 store
    suffix = "_on_disk" if tier == "disk" else "_shared"
    for i, report in enumerate(reports):
        got = load_file(tmp_path / f"out{i}.safetensors")
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        held = report["held"]
        assert held["scores" + suffix] == beta_bytes and held.get("scores", 0) == 0
        assert held["thresholds" + suffix] > 0  # the bucket counts; "thresholds": the kept results, in memory
        # neither β nor the counts count as the process's own memory
        assert report["extra"] == held["thresholds"] + held["other"]
        assert len(report["maps"]) == 3  # β, and the bucket counts of |τ| (PCB's clip bounds) and of β
    assert reports[0]["maps"] == reports[1]["maps"]  # the same files (inodes and paths) in both processes
    for _, path in reports[0]["maps"]:
        assert Path(path).parent == _cache_folder(tier, tmp_path)
    assert not list(_cache_folder(tier, tmp_path).glob(f"{PREFIX}{ms.share_token}*"))  # the last one out removed it


def test_a_worker_killed_while_computing_leaves_nothing_that_stops_the_next(
    tiny_llama_dir: Dirs, tmp_path: Path
) -> None:
    """A process killed mid-compute holds the compute lock and a half-written file: the kernel drops its locks, so
    the next process computes β itself, removes the dead one's file (and a finished file nobody holds), and
    merges as a private β does."""
    ms = _load(tiny_llama_dir, "disk", tmp_path)
    recipe = _recipe(*tiny_llama_dir)
    want = Merger(ms, compile=False).merge(recipe)
    pickled = tmp_path / "store.pickle"
    pickled.write_bytes(pickle.dumps(ms))
    assert _spawn(1, pickled, recipe, tmp_path, die=True) == [3]
    (half_written,) = tmp_path.glob(f"{PREFIX}*.writing-*")
    orphan = tmp_path / f"{PREFIX}0123456789abcdef-pcb_global.bin"  # a finished file of a process killed later
    orphan.write_bytes(b"\0" * 8192)

    shared = pickle.loads(pickle.dumps(ms))  # this process now merges as a worker: shares_caches
    merger = Merger(shared, compile=False)
    got = merger.merge(recipe)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert not half_written.exists() and not orphan.exists()
    cached = [p for p in tmp_path.iterdir() if p.name.startswith(PREFIX)]
    assert all(p.name.startswith(f"{PREFIX}{ms.share_token}-") for p in cached)
    assert any(p.name.startswith(f"{PREFIX}{ms.share_token}-pcb_global_product_0.0001-") for p in cached)  # β
    del merger
    gc.collect()
    assert not any(p.exists() for p in cached)  # this process was the last to hold them
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [Path(ms.residency.path or "").name, LOCK_NAME, "computed.log", "store.pickle"]
    )


@NO_SHARED_MEMORY
def test_no_room_for_a_shared_cache_falls_back_to_the_workers_memory_with_a_warning(tiny_llama_dir: Dirs) -> None:
    """Shared memory without room for β (a file-size limit refuses its blocks, as a full /dev/shm would): the
    worker computes its own β in memory, says so, and merges the same."""
    ms = _load(tiny_llama_dir, "device", Path())
    recipe = _recipe(*tiny_llama_dir)
    want = Merger(ms, compile=False).merge(recipe)
    merger = Merger(pickle.loads(pickle.dumps(ms)), compile=False)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (8192, hard))
    try:
        with pytest.warns(UserWarning, match=r"cannot reserve .* for a cache shared by workers"):
            got = merger.merge(recipe)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    assert all(torch.equal(got[k], want[k]) for k in want)
    (stats,) = [layout.stats for layout in merger._layouts.values()]
    assert stats.held_bytes()["scores"] == ms.n_tasks * ms.numel * 4
    assert not list(SHARED_MEMORY.glob(f"{PREFIX}{ms.share_token}*"))


@NO_SHARED_MEMORY
@pytest.mark.parametrize(
    "tensors",
    [
        [torch.arange(7, dtype=torch.int16), torch.tensor([True, False]), torch.empty(0), torch.ones(3, 5).bfloat16()],
        [torch.empty(0, 4, dtype=torch.int64)],
    ],
    ids=["mixed", "empty-tensor"],
)
def test_shared_tensors_round_trip_through_their_file(tiny_llama_dir: Dirs, tensors: list[torch.Tensor]) -> None:
    """What one worker builds, another maps back as it was built: dtypes, shapes (empty ones too) and values;
    the second asks for no build."""
    worker = pickle.loads(pickle.dumps(_load(tiny_llama_dir, "device", Path())))
    first, home = shared_tensors(worker, "round-trip", lambda: [t.clone() for t in tensors])
    again, _ = shared_tensors(worker, "round-trip", lambda: pytest.fail("built twice"))
    assert home == "shared_memory"
    for got in (first, again):
        assert [(t.dtype, t.shape) for t in got] == [(t.dtype, t.shape) for t in tensors]
        assert all(torch.equal(a, b) for a, b in zip(got, tensors, strict=True))
    del first, again, got
    gc.collect()
    assert not list(SHARED_MEMORY.glob(f"{PREFIX}{worker.share_token}*"))
