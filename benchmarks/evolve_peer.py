"""mergekit-evolve itself as a peer of ``benchmarks/search_quality.py`` (protocol ``mergekit_evolve``).

The other protocols are mergetune searches; this one runs mergekit 0.1.5's own ``mergekit-evolve``
(pycma CMA-ES, lm-evaluation-harness tasks, Hugging Face backend) as a subprocess on the same zoo at
the same number of evaluations, then scores the merge it returns with mergetune's evaluators on the
search, held-out and test splits the other protocols are scored on, so the rows compare.

What mergekit-evolve is given, per zoo task (its search part of validation, nothing else):

- ``multiple_choice`` → an lm-eval ``multiple_choice`` task on the same contexts, options and
  delimiter (``" "``), metric ``acc``;
- ``lm`` (whole-text LM loss) → an lm-eval ``loglikelihood_rolling`` task on the same texts cut to
  the task's ``max_length`` tokens, metric ``bits_per_byte`` (lower is better). Token-weighted loss
  and bits per byte are both the total NLL over a constant (the bytes and tokens of the same texts),
  so the share of the expert's gain kept is the same in either; lm-eval predicts each text's first
  token from its end-of-text prefix, mergetune does not: a small difference, the same for every model.

Other kinds (exact match, answer-only loss, classification heads) are refused with the task named.
The task weights make mergekit-evolve maximise mergetune's mean normalised score (up to a
constant): ``acc / expert acc`` and ``(base bpb − bpb) / (base bpb − expert bpb)``, each divided by
the number of tasks, with the expert's and base's lm-eval scores measured here first (lm-eval, bf16
like mergekit-evolve's own evaluations). mergetune's protocols optimise [mean, worst] with floors;
mergekit-evolve optimises one weighted sum: that is the tool.

The genome: ``ties`` (the method of the ``cmaes_ties`` protocol, among mergekit-evolve's linear /
task_arithmetic / ties / dare_ties / slerp), one weight and one density per expert per layer slice,
``layer_granularity`` = the config's blocks per layer group. Embeddings, final norm and output layer
take the first / last slice's parameters (mergekit's slices), where mergetune gives them groups of
their own. ``--force-population-size`` and ``--max-fevals`` are chosen so that mergekit-evolve makes
exactly the budget's evaluations (``cma_schedule``: pycma stops only after a whole generation and then
evaluates the final mean once more, so its default population of 4 + 3 ln(dimensions) and
``--max-fevals budget`` would overshoot a small budget: budget 4 gave 9 evaluations on llm-tiny).

How it runs on CPU: mergekit-evolve schedules every merge and evaluation as a Ray task or actor that
requests one GPU (``num_gpus=1``), so on a machine without one nothing would ever be scheduled. The
launcher starts Ray with one *logical* GPU (Ray's GPU count is a scheduling resource; torch here is a
CPU build, so nothing uses CUDA) and ``--num-gpus 1``, merges on the CPU (``--no-merge-cuda``) and
evaluates with lm-eval's HF backend (``--no-vllm``). Three faults of mergekit 0.1.5 without a GPU are
worked around, in the launcher and in every Ray worker (a setup hook), and nothing else is changed:

- it cannot be imported without vLLM: ``mergekit/evo/actors.py`` names
  ``lm_eval.models.vllm_causallms.VLLM`` in a class annotation and ``monkeypatch_lmeval_vllm`` imports
  that module before every evaluation, and lm-eval 0.4.13's module imports ``vllm``. vLLM cannot be
  added here (``pip install --dry-run vllm`` wants ``torch==2.14.0`` in place of the installed CPU
  build), so an empty stand-in module is registered (never used: ``--no-vllm``);
- lm-eval's HF model defaults to ``device="cuda"`` and mergekit passes no device: the hook makes the
  default ``cpu``;
- the default ``pool`` strategy's actor calls ``torch.cpu.empty_cache()``, which does not exist: the
  ``buffered`` strategy (merges and evaluations as Ray tasks, one at a time with one GPU) is used.

Resumable: ``<out>/mergekit_evolve/`` keeps the task files, the references, mergekit-evolve's
storage (its ``best_config.yaml`` and ``final_model``) and ``result.json``; a finished run with the
same settings is read back.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mergetune.objectives.experts import load_for_expert
from mergetune.objectives.tasks import TaskConfig, TaskData
from mergetune.search.config import SearchConfig
from mergetune.search.loop import resolve_models, worker_setup
from mergetune.search.worker import Split, Worker, WorkerSetup, setup_tokenizer, split_holdout

PROTOCOL = "mergekit_evolve"
TITLE = "mergekit-evolve 0.1.5: CMA-ES, TIES, per-slice weight + density (lm-eval, HF backend, CPU)"
METHOD = "ties"
RESULT = "result.json"
TEST_EXAMPLES = "test_examples.json"  # the merge's per-example test outcomes, as a search writes them
SPLITS: tuple[Split, ...] = ("search", "holdout", "test")
LM_EVAL_DTYPE = "bfloat16"  # what mergekit-evolve evaluates its merges in (mergekit.evo.helpers.evaluate_model)

#: Run in every Ray worker before mergekit's code (the two CPU-only faults of mergekit 0.1.5, module docstring).
LAUNCHER = """
import sys

import ray


def cpu_defaults():
    import types

    import lm_eval.models
    import lm_eval.models.huggingface as hf

    try:
        import lm_eval.models.vllm_causallms  # noqa: F401
    except ModuleNotFoundError:  # no vLLM: mergekit imports lm-eval's vLLM module and sets a class attribute
        stub = types.ModuleType("lm_eval.models.vllm_causallms")
        stub.VLLM = type("VLLM", (), {})  # never instantiated: --no-vllm
        sys.modules[stub.__name__] = stub
        lm_eval.models.vllm_causallms = stub

    init = hf.HFLM.__init__
    if getattr(init, "cpu_default", False):
        return

    def on_cpu(self, *args, device="cpu", **kwargs):
        init(self, *args, device=device, **kwargs)

    on_cpu.cpu_default = True
    hf.HFLM.__init__ = on_cpu


cpu_defaults()
ray.init(num_cpus=int(sys.argv.pop(1)), num_gpus=1, include_dashboard=False,
         runtime_env={"worker_process_setup_hook": cpu_defaults})
from mergekit.scripts.evolve import main

main()
"""


@dataclass(frozen=True)
class EvolveTask:
    """A zoo task as mergekit-evolve sees it: an lm-eval task file over the task's search examples."""

    name: str  # mergetune's task name
    lm_eval_name: str
    metric: str  # lm-eval metric, e.g. "acc" or "bits_per_byte"
    higher_is_better: bool


# ---- the tasks --------------------------------------------------------------------------------------
def search_tasks(setup: WorkerSetup) -> list[TaskData]:
    """Each task's search part of validation, exactly as the worker splits it (``Worker.__init__``)."""
    configs = [TaskConfig.model_validate(t) for t in setup.tasks]
    tasks = [load_for_expert(c, setup.experts.get(c.name)) for c in configs]
    return [split_holdout(t, setup.holdout_fraction, setup.seed)[0] for t in tasks]


def write_lm_eval_tasks(tasks: Sequence[TaskData], tokenizer: Any, folder: Path) -> list[EvolveTask]:
    """One lm-eval task YAML and JSONL per task (module docstring says how each kind maps)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for task in tasks:
        config, data = task.config, task.validation
        name = f"mergetune_{config.name}"
        if config.kind == "multiple_choice" and data.choices is not None and data.labels is not None:
            rows = [
                {"context": t, "choices": list(c), "label": int(y)}
                for t, c, y in zip(data.texts, data.choices, data.labels, strict=True)
            ]
            spec = {"output_type": "multiple_choice", "doc_to_text": "context", "doc_to_choice": "choices"}
            spec |= {"doc_to_target": "label", "target_delimiter": " "}
            evolve = EvolveTask(config.name, name, "acc", True)
        elif config.kind == "lm" and data.answers is None:
            rows = [{"text": _first_tokens(tokenizer, t, config.max_length)} for t in data.texts]
            spec = {"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "text"}
            evolve = EvolveTask(config.name, name, "bits_per_byte", False)
        else:
            raise SystemExit(
                f"task '{config.name}' (kind {config.kind}): the mergekit_evolve protocol maps only multiple-choice "
                "and whole-text LM-loss tasks to lm-eval tasks"
            )
        data_file = folder / f"{name}.jsonl"
        data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
        metric = {"metric": evolve.metric, "higher_is_better": evolve.higher_is_better}
        if evolve.metric == "acc":
            metric["aggregation"] = "mean"
        document = {
            "task": name,
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"validation": str(data_file.resolve())}},
            "validation_split": "validation",
            **spec,
            "metric_list": [metric],
            "metadata": {"version": 1.0},
        }
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(document, sort_keys=False))
        out.append(evolve)
    return out


def _first_tokens(tokenizer: Any, text: str, max_length: int) -> str:
    """The text mergetune's LM loss scores: its first ``max_length`` tokens, decoded."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_length]
    return tokenizer.decode(ids, skip_special_tokens=True)


# ---- the references and weights ---------------------------------------------------------------------
def lm_eval_score(
    model: str, tasks: Sequence[EvolveTask], task_dir: Path, batch_size: int, dtype: str = LM_EVAL_DTYPE
) -> dict[str, float]:
    """lm-eval's score of ``model`` on ``tasks`` (the HF backend, on the CPU, in mergekit-evolve's dtype)."""
    import lm_eval  # late: heavy, and only this protocol needs it
    import lm_eval.tasks

    results = lm_eval.simple_evaluate(
        model="huggingface",
        model_args={"pretrained": model, "dtype": dtype, "device": "cpu"},
        tasks=[t.lm_eval_name for t in tasks],
        batch_size=batch_size,
        task_manager=lm_eval.tasks.TaskManager(include_path=str(task_dir)),
        log_samples=False,
        verbosity="ERROR",
    )["results"]
    return {t.name: float(results[t.lm_eval_name][f"{t.metric},none"]) for t in tasks}


def references(setup: WorkerSetup, tasks: Sequence[EvolveTask], task_dir: Path, batch_size: int) -> dict[str, Any]:
    """Each task's expert score, and the base's for the loss tasks (their normalisation needs it)."""
    experts = setup.task_experts()
    out: dict[str, Any] = {"expert": {}, "base": {}}
    for task in tasks:
        out["expert"] |= lm_eval_score(experts[task.name], [task], task_dir, batch_size)
    losses = [t for t in tasks if not t.higher_is_better]
    if losses:
        out["base"] = lm_eval_score(setup.base, losses, task_dir, batch_size)
    return out


def cached_references(
    path: Path, setup: WorkerSetup, tasks: Sequence[EvolveTask], task_dir: Path, batch_size: int
) -> tuple[dict[str, Any], float]:
    """The references and the seconds they took, measured once per run folder (a rerun after a failure reuses them)."""
    files = {t.name: (task_dir / f"{t.lm_eval_name}.jsonl").read_text() for t in tasks}
    if path.exists():
        saved = json.loads(path.read_text())
        if saved["files"] == files:
            return saved["references"], saved["seconds"]
    started = time.perf_counter()
    refs = references(setup, tasks, task_dir, batch_size)
    seconds = time.perf_counter() - started
    path.write_text(json.dumps({"files": files, "references": refs, "seconds": seconds}) + "\n")
    return refs, seconds


def task_weights(tasks: Sequence[EvolveTask], refs: dict[str, Any]) -> dict[str, float]:
    """Weights that make mergekit-evolve's weighted sum mergetune's mean normalised score plus a constant."""
    weights = {}
    for task in tasks:
        expert = refs["expert"][task.name]
        if task.higher_is_better:
            if expert <= 0:
                raise SystemExit(
                    f"task '{task.name}': the expert's lm-eval {task.metric} is {expert}; cannot normalise"
                )
            weights[task.name] = 1.0 / (len(tasks) * expert)
        else:
            gain = refs["base"][task.name] - expert
            if gain <= 0:
                raise SystemExit(
                    f"task '{task.name}': the expert's lm-eval {task.metric} ({expert:.4f}) is no better than the "
                    f"base's ({refs['base'][task.name]:.4f}); the share of its gain is undefined"
                )
            weights[task.name] = -1.0 / (len(tasks) * gain)
    return weights


# ---- the genome and the run -------------------------------------------------------------------------
def genome_config(
    setup: WorkerSetup, tasks: Sequence[EvolveTask], weights: dict[str, float], granularity: int
) -> dict[str, Any]:
    """mergekit-evolve's configuration: the zoo's experts over its base, TIES, the tasks and their weights."""
    return {
        "genome": {
            "models": list(setup.experts.values()),
            "merge_method": METHOD,
            "base_model": setup.base,
            "layer_granularity": granularity,
            "allow_negative_weights": False,
        },
        "tasks": [{"name": t.lm_eval_name, "weight": weights[t.name], "metric": f"{t.metric},none"} for t in tasks],
        "apply_chat_template": False,  # the zoo's experts were trained and are scored on plain prompts
        "fewshot_as_multiturn": False,
        "num_fewshot": 0,
    }


def cma_schedule(budget: int, dimensions: int) -> tuple[int, int]:
    """(population, ``--max-fevals``) for exactly ``budget`` evaluations in whole CMA-ES generations.

    pycma's ``fmin2`` evaluates whole generations until more than ``maxfevals`` were evaluated, then
    evaluates the final mean once more (``eval_final_mean``): ``budget − 1`` samples plus that one. The
    population is the largest divisor of the samples at most pycma's default (4 + 3 ln n) and at most a
    third of them (so CMA-ES adapts over at least 3 generations where the budget allows), at least 2.
    """
    samples = budget - 1
    if samples < 2:
        raise SystemExit(f"the {PROTOCOL} protocol needs a budget of at least 3 evaluations, not {budget}")
    cap = max(2, min(4 + int(3 * math.log(dimensions)), samples // 3))
    popsize = max(d for d in range(1, cap + 1) if samples % d == 0)
    return popsize, samples - 1


def genome_dimensions(config: dict[str, Any], layers: int) -> int:
    """The genotype's length: layer slices × models × parameters (weight, density for TIES)."""
    granularity = config["genome"]["layer_granularity"]
    slices = layers // granularity if granularity > 0 else 1
    return slices * len(config["genome"]["models"]) * 2


def run_evolve(
    folder: Path,
    config_path: Path,
    task_dir: Path,
    popsize: int,
    seed: int,
    batch_size: int,
    timeout_s: float,
    max_fevals: int,
) -> tuple[float, int]:
    """Run mergekit-evolve; returns its wall time and the number of merges it evaluated (from its log)."""
    folder, config_path, task_dir = folder.resolve(), config_path.resolve(), task_dir.resolve()  # it runs in folder
    storage = folder / "storage"
    storage.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-c",
        LAUNCHER,
        str(max(2, os.cpu_count() or 2)),  # Ray's CPU count: its tasks request one each
        str(config_path),
        "--max-fevals",
        str(max_fevals),
        "--force-population-size",
        str(popsize),
        "--no-vllm",
        "--strategy",
        "buffered",
        "--num-gpus",
        "1",
        "--no-merge-cuda",
        "--storage-path",
        str(storage),
        "--task-search-path",
        str(task_dir),
        "--random-seed",
        str(seed),
        "--batch-size",
        str(batch_size),
    ]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env |= {"RAY_DISABLE_DOCKER_CPUS_WARNING": "1", "TOKENIZERS_PARALLELISM": "false"}
    log = folder / "mergekit-evolve.log"
    started = time.perf_counter()
    with log.open("w") as out:
        # its own session: a timeout ends the launcher and Ray's processes together (a failed Ray task can leave
        # mergekit-evolve waiting forever on a result that never comes)
        process = subprocess.Popen(  # cwd: pycma writes its outcmaes/ logs there
            command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=folder, start_new_session=True
        )
        try:
            returncode: int | str = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            returncode = f"killed after {timeout_s:.0f} s"
        finally:  # what is left of its session (Ray's workers outlive a killed driver)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    wall = time.perf_counter() - started
    text = log.read_text()
    if returncode != 0 or not (storage / "final_model").is_dir():
        tail = "\n".join(text.splitlines()[-25:])
        raise SystemExit(f"mergekit-evolve failed (exit {returncode}; log {log}):\n{tail}")
    evaluations = sum(int(n) for n in re.findall(r"Received (\d+) genotypes", text))
    return wall, evaluations


# ---- scoring its merge with mergetune's evaluators ----------------------------------------------------
def score_folder(
    worker: Worker, folder: Path, splits: Sequence[Split] = SPLITS
) -> tuple[dict[str, dict[str, Any]], dict[str, list[float]]]:
    """Scores of the model in ``folder`` (mergekit's merged output) on each split, through the worker's suites,
    and its per-example test outcomes (``{task: [value per example]}`` averaging to the task's score, as a
    search's ``test_examples.json``).

    The merged tensors are written into the worker's merge buffer (which every task model's shared
    weights view); a merged tensor the folder lacks, or a shape that differs, is an error.
    """
    import torch
    from safetensors.torch import load_file

    from mergetune.merging.loading import safetensors_files

    tensors: dict[str, torch.Tensor] = {}
    for path in safetensors_files(folder):
        tensors |= load_file(str(path))
    views = worker.merger.views(worker.merger.output_buffer(torch.float32))
    missing = [n for n in views if n not in tensors]
    if missing:
        raise SystemExit(f"{folder}: mergekit's merge lacks {len(missing)} merged tensor(s), e.g. {missing[:3]}")
    with torch.no_grad():
        for name, view in views.items():
            if tuple(tensors[name].shape) != tuple(view.shape):
                raise SystemExit(
                    f"{folder}: '{name}' has shape {tuple(tensors[name].shape)}, expected {tuple(view.shape)}"
                )
            view.copy_(tensors[name].to(torch.float32))
    out, examples = {}, {}
    for split in splits:
        scores = worker.suite(split).score(worker.models)
        out[split] = {"mean_normalized": scores.mean_normalized, "normalized": scores.normalized}
        out[split]["scores"] = scores.scores
        if split == "test":
            # in the score's units, as a search writes them: each task's values average to its score
            kept = {n: t for n, t in scores.tasks.items() if t.per_example is not None}
            examples = {n: (t.per_example * t.example_scale).tolist() for n, t in kept.items()}
    return out, examples


def chosen_summary(scored: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The part of a search's summary that the paired bootstrap reads: the chosen merge's test scores."""
    return {"chosen": {"test": scored["test"]}}


def backfill_test_examples(config: SearchConfig, result: dict[str, Any]) -> dict[str, Any]:
    """A run finished before per-example test outcomes were kept: score its final merge on test again."""
    folder = config.output_dir
    print(f"[{PROTOCOL}] scoring {folder / 'storage' / 'final_model'} on test again for its per-example outcomes")
    worker = Worker(worker_setup(config, resolve_models(config)))
    test, examples = score_folder(worker, folder / "storage" / "final_model", ("test",))
    if abs(test["test"]["mean_normalized"] - result["row"]["test"]) > 1e-9:
        raise SystemExit(f"{folder}: its final merge now scores {test['test']} on test, not {result['row']['test']}")
    result["scores"]["test"] = test["test"]
    write_test_examples(folder, examples)
    (folder / RESULT).write_text(json.dumps(result, indent=2) + "\n")
    return result


def write_test_examples(folder: Path, examples: dict[str, list[float]]) -> None:
    (folder / TEST_EXAMPLES).write_text(json.dumps(examples))


# ---- the protocol -----------------------------------------------------------------------------------
def evolve_row(config: SearchConfig, budget: int, settings: dict[str, Any], batch_size: int = 16) -> dict[str, Any]:
    """Run (or read back) the mergekit_evolve protocol for ``config``'s zoo; a row of the search-quality table."""
    folder = config.output_dir
    result_path = folder / RESULT
    if result_path.exists():
        result = json.loads(result_path.read_text())
        if result["settings"] == settings:
            print(f"[{PROTOCOL}] finished earlier: reading {result_path}")
            if not (folder / TEST_EXAMPLES).exists():
                result = backfill_test_examples(config, result)
            return {**result["row"], "summary": chosen_summary(result["scores"])}
        raise SystemExit(f"{folder} holds a {PROTOCOL} run with other settings ({result['settings']}); delete it")
    print(f"[{PROTOCOL}] starting in {folder}")
    models = resolve_models(config)
    setup = worker_setup(config, models)
    tokenizer = setup_tokenizer(setup)
    task_dir = folder / "tasks"
    tasks = write_lm_eval_tasks(search_tasks(setup), tokenizer, task_dir)

    refs, refs_s = cached_references(folder / "references.json", setup, tasks, task_dir, batch_size)
    genome = genome_config(setup, tasks, task_weights(tasks, refs), config.space.granularity)
    config_path = folder / "evolve.yaml"
    config_path.write_text(yaml.safe_dump(genome, sort_keys=False))
    layers = _num_layers(setup.base)
    popsize, max_fevals = cma_schedule(budget, genome_dimensions(genome, layers))
    timeout_s = 600 + 300 * budget  # a generous bound; a failed Ray task otherwise leaves it waiting forever
    wall, evaluations = run_evolve(
        folder, config_path, task_dir, popsize, config.seed, batch_size, timeout_s, max_fevals
    )
    print(f"[{PROTOCOL}] mergekit-evolve: {evaluations} evaluations in {wall:.1f} s (references {refs_s:.1f} s)")

    worker = Worker(setup)
    scored, examples = score_folder(worker, folder / "storage" / "final_model")
    write_test_examples(folder, examples)
    row = {
        "protocol": PROTOCOL,
        "optimizer": "mergekit-evolve (pycma CMA-ES)",
        "candidates": evaluations,
        "method": METHOD,
        "search": scored["search"]["mean_normalized"],
        "heldout": scored["holdout"]["mean_normalized"],
        "test": scored["test"]["mean_normalized"],
        "best": None,  # mergekit-evolve scores its candidates in lm-eval's units only
        "to99": None,
        "overhead": None,
        "wall_s": wall + refs_s,
    }
    details = {"references": refs, "popsize": popsize, "evolve_wall_s": wall, "references_wall_s": refs_s}
    result_path.write_text(json.dumps({"settings": settings, "row": row, "scores": scored, **details}, indent=2) + "\n")
    return {**row, "summary": chosen_summary(scored)}


def _num_layers(base: str) -> int:
    return int(json.loads((Path(base) / "config.json").read_text())["num_hidden_layers"])
