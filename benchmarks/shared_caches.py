"""Shared task-sized caches: N Ray actors merging PCB from one store, β shared or each its own.

As ``RayExecutor`` does, the driver puts its ModelSet in Ray's object store once and each actor gets it by
unpickling (the actors of a machine map one copy of the store; a disk-tier store travels as its file's
path). All actors then start their first PCB candidate at once. With ``shared`` (what a worker does since
2026-12-04) the first to need β computes it into one file and the others wait for it and map it; with
``private`` (the earlier behaviour, forced by clearing ``shares_caches``) each computes its own β. Printed
per mode: the wall time until every actor has merged its first candidate, the next candidates' time, how
many actors computed β, and each actor's resident memory after its first candidate (``/proc/self/status``:
anonymous, file-backed and shared-memory pages: the object store's copy of the store and a shared β are
shared memory; on the disk tier β lives in a file beside the store either way).

Models: ``benchmarks/scale.py``'s random Llama (built under ``--work`` if absent, bf16, 4 experts).

Usage: python benchmarks/shared_caches.py [--size 0.5b] [--workers 2] [--tier disk] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import torch
from merge_speed import status_bytes
from scale import build_models

from mergetune.merging.engine import Merger
from mergetune.merging.modelset import ModelSet
from mergetune.merging.residency import MemoryBudget
from mergetune.recipe import Expert, Recipe

STATUS_FIELDS = ("VmHWM", "RssAnon", "RssFile", "RssShmem")


class Worker:
    """A Ray actor's body: the driver's ModelSet arrives by unpickling, as in ``RayExecutor``'s actors."""

    def __init__(self, ms: ModelSet, shared: bool, threads: int) -> None:
        import mergetune.merging.methods.pcb as pcb

        torch.set_num_threads(threads)
        self.computed = 0
        original = pcb.compute_scores

        def counted(*args: Any, **kwargs: Any) -> torch.Tensor:
            self.computed += 1
            return original(*args, **kwargs)

        pcb.compute_scores = counted
        ms.shares_caches = shared  # False: each actor its own β, as before 2026-12-04
        self.merger = Merger(ms, compile=False)  # eager kernels: what is measured is β, not compilation

    def ready(self) -> int:
        return os.getpid()

    def first(self, recipe: Recipe) -> dict[str, Any]:
        start = time.perf_counter()
        self.merger.merge(recipe, into=torch.float32)
        return {"first": time.perf_counter() - start, "memory": status_bytes(*STATUS_FIELDS), "computed": self.computed}

    def next(self, recipes: list[Recipe]) -> list[float]:
        times = []
        for recipe in recipes:
            start = time.perf_counter()
            self.merger.merge(recipe, into=torch.float32)
            times.append(time.perf_counter() - start)
        return times


def run_mode(ref: Any, recipes: list[Recipe], shared: bool, args: argparse.Namespace) -> None:
    import ray

    actor = ray.remote(Worker).options(num_cpus=args.threads)
    workers = [actor.remote(ref, shared, args.threads) for _ in range(args.workers)]
    ray.get([w.ready.remote() for w in workers])
    start = time.perf_counter()
    reports = ray.get([w.first.remote(recipes[0]) for w in workers])  # all start together
    wall = time.perf_counter() - start
    times = [t for ts in ray.get([w.next.remote(recipes[1:]) for w in workers]) for t in ts]
    gib = 2**30
    print(
        f"{'shared' if shared else 'private'}: {args.workers} workers, first candidate (all started together) "
        f"{wall:.1f} s wall, per worker {[round(r['first'], 1) for r in reports]} s; "
        f"next {statistics.median(times):.2f} s (median); "
        f"β computed by {sum(r['computed'] for r in reports)} worker(s)",
        flush=True,
    )
    for i, r in enumerate(reports):
        memory = ", ".join(f"{k} {v / gib:.2f} GiB" for k, v in r["memory"].items())
        print(f"  worker {i} after its first candidate: {memory}", flush=True)
    exits = [w.__ray_terminate__.remote() for w in workers]  # clean exits: the last actor out removes the file
    ray.wait(exits, num_returns=len(exits), timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="0.5b")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tier", choices=["device", "disk"], default="disk")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument(
        "--modes",
        default="private,shared,private,shared",
        help="run in this order (the first run after the load pays for freeing the page cache)",
    )
    parser.add_argument("--work", default="/work/scratch/scale")
    args = parser.parse_args()

    base, experts, n_params = build_models(args.size, Path(args.work) / args.size / "models")
    folder = Path(tempfile.mkdtemp(prefix="shared-caches-", dir=Path(args.work)))
    try:
        budget = MemoryBudget(memory=1, disk_dir=str(folder)) if args.tier == "disk" else None
        start = time.perf_counter()
        ms = ModelSet.load(base, experts, budget=budget, storage_dtype=torch.bfloat16)
        print(
            f"{args.size}: {n_params / 1e9:.3f} B parameters, {ms.residency.describe()}, loaded in "
            f"{time.perf_counter() - start:.0f} s",
            flush=True,
        )
        ray.init(num_cpus=args.workers * args.threads, include_dashboard=False, log_to_driver=False)
        ref = ray.put(ms)  # the actors of this machine map one copy, as RayExecutor shares it
        del ms
        models = [Expert(name=t, model=str(p)) for t, p in experts.items()]
        recipes = [
            Recipe(base=str(base), experts=models, method="pcb", weight=w, density=d)
            for w, d in ((1.0, 0.2), (0.8, 0.3), (0.6, 0.1))
        ]
        for mode in args.modes.split(","):
            run_mode(ref, recipes, mode == "shared", args)
    finally:
        ray.shutdown()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
