"""One-shot merges: ``mergetune merge`` (streaming) against ``mergekit-yaml`` on the same inputs.

Inputs, built once and cached under ``<cache>/bench/oneshot`` (``$MERGETUNE_CACHE`` or ``.cache``,
git-ignored): the packaged SmolLM2-135M-Instruct (its GGUF converted by ``zoo/gguf.py``), rounded to
bfloat16, and 3 experts that are the base plus seeded Gaussian noise (σ = 1e-3), rounded to
bfloat16 (rounded weights tie like real checkpoints'; what the experts learnt does not change the
cost of a merge).

For Task Arithmetic, TIES and DARE, the mergetune recipe is exported to mergekit with mergetune's
own exporter (``export_mergekit``: the same merge, in mergekit's terms), then both tools run as
subprocesses back to back, each under ``/usr/bin/time -v`` for wall time and peak RSS. mergekit
0.1.5 runs on the CPU with ``--lazy-unpickle``. TIES uses mergekit's rules (scope tensor, exact k in
mergekit's order, +1 where the signs cancel), so both tools compute the same thing; the largest
difference between their outputs is printed as a check. The issue's target: mergetune ≤ 0.5× mergekit's
wall time and ≤ its peak RSS.

``ties_global`` (optional) is mergetune's default TIES (global scope: two counting passes first)
against mergekit's ties at the same λ and density (an approximate export).

Usage: python benchmarks/oneshot.py [--engine eager|auto|compiled] [--methods ta,ties,dare,ties_global] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mergetune.export.mergekit import export_mergekit
from mergetune.merging.methods import parse_recipe
from mergetune.objectives.zoo.gguf import materialise_gguf
from mergetune.objectives.zoo.specs import resolve_cache_dir
from mergetune.recipe import Recipe

MODEL = "smollm2-135m-instruct"
TASKS = ("math", "code", "chat")
NOISE = 1e-3
REPO = Path(__file__).resolve().parent.parent
MERGEKIT_TIES = {
    "scope": "tensor",
    "tie_rule": "mergekit",
    "sign_cancel": "plus_one",
    "weights": "before_election",
    "disjoint": "weighted_mean",
}
RECIPES = {
    "ta": {"method": "task_arithmetic", "weight": 0.3},
    "ties": {"method": "ties", "weight": 1.0, "density": 0.2, "options": MERGEKIT_TIES},
    "dare": {"method": "dare_linear", "weight": 0.3, "density": 0.5, "seed": 1},
    # mergetune's default TIES (scope global, ties at the cut kept): two counting passes, then the merge;
    # against mergekit's ties on the same λ and density (an approximate export: different scope and tie rules)
    "ties_global": {"method": "ties", "weight": 1.0, "density": 0.2},
}


def build_inputs(root: Path) -> tuple[Path, dict[str, Path]]:
    """The bf16 base and experts (built once; a folder is published by renaming when complete)."""
    base, experts = root / "base", {t: root / t for t in TASKS}
    if all((f / "model.safetensors").is_file() for f in (base, *experts.values())):
        return base, experts
    source = materialise_gguf(MODEL, root.parent / "zoo")
    state = load_file(source / "model.safetensors")
    _write_model(source, {k: v.to(torch.bfloat16) for k, v in state.items()}, base)
    for i, task in enumerate(TASKS):
        gen = torch.Generator().manual_seed(1000 + i)
        noisy = {k: (v + NOISE * torch.randn(v.shape, generator=gen)).to(torch.bfloat16) for k, v in state.items()}
        _write_model(source, noisy, experts[task])
    return base, experts


def _write_model(source: Path, state: dict[str, torch.Tensor], dest: Path) -> None:
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in source.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            shutil.copy2(f, tmp / f.name)
    config = json.loads((tmp / "config.json").read_text())
    config["torch_dtype"] = config["dtype"] = "bfloat16"
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def recipe_for(name: str, base: Path, experts: dict[str, Path]) -> Recipe:
    listed = [{"name": t, "model": str(p)} for t, p in experts.items()]
    return parse_recipe({"base": str(base), "experts": listed, "dtype": "bfloat16", **RECIPES[name]})


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in GB, output) of a command run under /usr/bin/time -v."""
    start = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-v", *cmd], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    return wall, rss_kb / 1024**2, done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""


def max_difference(a: Path, b: Path) -> float:
    """Largest |difference| between two merged folders' tensors (same names)."""
    x, y = load_file(a / "model.safetensors"), _folder_state(b)
    return max(float((x[k].float() - y[k].float()).abs().max()) for k in x if k in y)


def _folder_state(folder: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(f))
    return state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", default="auto", choices=["auto", "eager", "compiled"])
    parser.add_argument("--methods", default="ta,ties,dare")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for both tools (default: theirs)")
    args = parser.parse_args()

    root = resolve_cache_dir() / "bench" / "oneshot"
    base, experts = build_inputs(root / "models")
    work = root / "runs"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["COLUMNS"] = "400"  # mergetune's one-line summary unwrapped
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    mergekit_yaml = str(Path(sys.executable).with_name("mergekit-yaml"))
    rows = []
    for name in args.methods.split(","):
        recipe = recipe_for(name, base, experts)
        exported = export_mergekit(recipe, approximate=True)
        shutil.rmtree(work / name, ignore_errors=True)
        (work / name).mkdir(parents=True)
        recipe.save(work / name / "recipe.yaml")
        (work / name / "mergekit.yaml").write_text(exported.yaml)
        ours_cmd = [sys.executable, "-c", "from mergetune.cli import app; app()", "merge"]
        ours_cmd += [str(work / name / "recipe.yaml"), str(work / name / "mergetune"), "--engine", args.engine]
        if args.threads:
            ours_cmd += ["--threads", str(args.threads)]
        theirs_cmd = [mergekit_yaml, str(work / name / "mergekit.yaml"), str(work / name / "mergekit")]
        theirs_cmd += ["--lazy-unpickle"]
        ours = timed(ours_cmd, env)
        theirs = timed(theirs_cmd, env)
        diff = max_difference(work / name / "mergetune", work / name / "mergekit")
        rows.append((name, recipe.method, exported.faithful, ours, theirs, diff))
        print(f"{name}: mergetune {ours[0]:.1f}s {ours[1]:.2f}GB | mergekit {theirs[0]:.1f}s {theirs[1]:.2f}GB")
        print(f"    mergetune said: {ours[2]}", flush=True)
    print_table(rows, args.engine)


def print_table(rows: list, engine: str) -> None:
    print(
        f"\nSmolLM2-135M-Instruct (bf16), 3 experts; mergetune --engine {engine}; mergekit-yaml 0.1.5 --lazy-unpickle, "
        f"CPU; torch threads {torch.get_num_threads()} by default, {os.cpu_count()} CPUs\n"
    )
    print(
        "| merge | export | mergetune wall | mergekit wall | wall ratio | mergetune peak RSS | mergekit peak RSS "
        "| RSS ratio | max |Δ| between outputs |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, method, faithful, ours, theirs, diff in rows:
        print(
            f"| {name} ({method}) | {faithful} | {ours[0]:.1f} s | {theirs[0]:.1f} s | {ours[0] / theirs[0]:.2f}× "
            f"| {ours[1]:.2f} GB | {theirs[1]:.2f} GB | {ours[1] / theirs[1]:.2f}× | {diff:.3g} |"
        )


if __name__ == "__main__":
    main()
