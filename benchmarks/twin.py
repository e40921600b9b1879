"""Twin-Merging (Lu et al., 2024) on a real zoo: accuracy, storage, and batched against naive inference.

Everything runs through the search worker (:class:`mergetune.search.worker.Worker`), as a search
would: the same resident ModelSet, merge buffer and task models score the static recipes and the Twin
recipes, on the TEST split (each recipe once), normalised by the experts' own test accuracy.

1. Test accuracy (%) per task and the mean normalised accuracy (merged / expert) of: the experts;
   static recipes (default: Task Arithmetic λ = 0.3, TIES d = 0.2 λ = 1, and any ``--static
   NAME=RECIPE``, e.g. the recipe a text8 search chose); Twin over Task Arithmetic λ = 0.3 (the paper's
   setting: rank 10% of min(m, n), temperature 1, soft routing), and a Twin over each ``--static``
   recipe's θ*. The router's accuracy on the validation splits is reported for each Twin.
2. Storage: the Twin folder (θ* + heads + factors + router, float32) against the experts' weight files.
3. Inference throughput on ``--examples`` validation examples per task, float32, one thread: the
   batched path (forward hooks, length-sorted padded batches) against the naive path (per example:
   route on θ*, materialise θ(x) = θ* + Σ_t w_t v̂_t, one forward), predictions compared; and a static
   model (θ* alone, batched) for the cost of routing.

The results are printed and written to ``benchmarks/results/twin.md``.

    python benchmarks/twin.py [--zoo text8] [--static NAME=RECIPE ...] [--examples 25]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from mergetune.forward import scoring
from mergetune.merging.methods.twin import TWIN
from mergetune.objectives.evaluators import ClassificationEvaluator
from mergetune.objectives.suite import ValidationSuite
from mergetune.objectives.zoo import build_zoo
from mergetune.recipe import Recipe
from mergetune.search.evaluation import Evaluation
from mergetune.search.worker import Worker, WorkerSetup
from mergetune.twin import Twin, build_twin
from mergetune.twin.io import save_twin
from mergetune.twin.reference import NaiveTwin
from mergetune.twin.router import body_of
from mergetune.twin.workflow import folder_bytes

RESULTS = Path("benchmarks/results/twin.md")
MIB = 1024**2


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", default="text8")
    parser.add_argument("--static", action="append", default=[], metavar="NAME=RECIPE", help="Another static recipe.")
    parser.add_argument("--twin", action="append", default=[], metavar="NAME=RECIPE", help="Another Twin recipe.")
    parser.add_argument("--examples", type=int, default=25, help="Validation examples per task for throughput.")
    parser.add_argument("--out", type=Path, default=Path("runs/twin-bench"), help="Where the Twin folder is written.")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    lines = [f"# twin benchmark: {dt.datetime.now().isoformat(timespec='seconds')}", *machine_lines(args)]
    zoo = build_zoo(args.zoo, progress=False)
    worker = Worker(
        WorkerSetup(
            base=str(zoo.base),
            experts={t: str(p) for t, p in zoo.experts.items()},
            tasks=[t.model_dump(mode="json") for t in zoo.tasks.values()],
            cache_dir=str(args.out / "cache"),
        )
    )
    extra = dict(read_recipe(spec) for spec in args.static)
    statics = {
        "Task Arithmetic λ=0.3": recipe_of(zoo, "task_arithmetic", 0.3, 1.0),
        "TIES d=0.2 λ=1": recipe_of(zoo, "ties", 1.0, 0.2),
        **extra,
    }
    twins = {"Twin (TA λ=0.3 θ*)": twin_of(statics["Task Arithmetic λ=0.3"])}
    twins.update({f"Twin ({name} θ*)": twin_of(recipe) for name, recipe in extra.items()})
    twins.update(dict(read_recipe(spec) for spec in args.twin))

    reference = worker.reference("test")
    rows: dict[str, Evaluation | None] = {"expert": None}
    notes: dict[str, str] = {}
    for name, recipe in {**statics, **twins}.items():
        start = time.perf_counter()
        rows[name] = worker.evaluate(recipe, "test")
        notes[name] = f"{time.perf_counter() - start:.0f} s"
        print(f"{name}: test mean normalised {rows[name].mean_normalized:.4f} ({notes[name]})", flush=True)
    lines += accuracy_table(worker, reference, rows)

    built = {name: build_on(worker, recipe) for name, recipe in reversed(twins.items())}  # the default one last
    lines += routing_lines(dict(reversed(built.items())))
    twin = built[next(iter(twins))]  # its θ* is in the merge buffer the task models are bound to
    folder = save_twin(twin, worker.modelset, [t.config for t in worker.dynamic.tasks], args.out / "twin")
    lines += storage_lines(folder, zoo)
    lines += throughput_lines(worker, twin, args.examples)
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)


def machine_lines(args: argparse.Namespace) -> list[str]:
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    return [
        "command: python benchmarks/twin.py "
        + " ".join([*(f"--static '{s}'" for s in args.static), *(f"--twin '{s}'" for s in args.twin)]),
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs; torch {torch.__version__}, 1 thread; "
        f"load average at start {load}",
        "",
    ]


def recipe_of(zoo, method: str, weight: float, density: float) -> Recipe:
    return Recipe(base=str(zoo.base), experts=zoo.recipe_experts(), method=method, weight=weight, density=density)


def read_recipe(spec: str) -> tuple[str, Recipe]:
    name, _, path = spec.partition("=")
    if not path:
        raise SystemExit(f"--static and --twin take NAME=RECIPE, got {spec!r}")
    return name, Recipe.load(path)


def twin_of(shared: Recipe, **options: object) -> Recipe:
    """The Twin recipe whose θ* is ``shared`` (its method, options, weight and density)."""
    twin_options = {"shared_method": shared.method, "shared_options": shared.options, **options}
    return shared.model_copy(update={"method": TWIN, "options": twin_options})


# ---- tables ---------------------------------------------------------------------------------------


def accuracy_table(worker: Worker, reference: dict[str, float], rows: dict[str, Evaluation | None]) -> list[str]:
    tasks = list(reference)
    header = ["model", "kind", *tasks, "mean acc.", "mean norm."]
    body = []
    for name, ev in rows.items():
        scores = reference if ev is None else ev.scores
        norm = 1.0 if ev is None else ev.mean_normalized
        kind = "expert" if ev is None else str(ev.extra.get("kind", "static"))
        cells = [f"{100 * scores[t]:.1f}" for t in tasks]
        body.append([name, kind, *cells, f"{100 * np.mean(list(scores.values())):.1f}", f"{norm:.3f}"])
    n = sum(e.n_examples for e in worker.suite("test").evaluators.values())
    return [
        f"## Test accuracy (%), {len(tasks)} tasks, {n} examples, each recipe scored once; norm. = merged / expert",
        "",
        *markdown(header, body),
        "",
    ]


def build_on(worker: Worker, recipe: Recipe) -> Twin:
    """Build a Twin on the worker's resident models, with its router's accuracy on the validation splits."""
    body = body_of(next(iter(worker.models.values())))
    tasks = worker.dynamic.tasks
    return build_twin(recipe, worker.modelset, worker.merger, body, tasks, worker.tokenizer, validation_routing=True)


def routing_lines(twins: dict[str, Twin]) -> list[str]:
    tasks = list(next(iter(twins.values())).tasks)
    routing = [[name, *(f"{t.validation_routing[task]:.3f}" for task in tasks)] for name, t in twins.items()]
    compression = []
    for name, twin in twins.items():
        errors = [r for r in twin.knowledge.report() if r["kind"] == "low_rank"]
        ranks = sorted({int(r["rank"]) for r in errors})
        timings = ", ".join(f"{k} {v:.1f} s" for k, v in twin.timings.items())
        compression.append(
            [name, f"{ranks[0]}–{ranks[-1]}", f"{np.mean([r['mean_rel_error'] for r in errors]):.3f}", timings]
        )
    return [
        "## Router accuracy on the validation splits (argmax route = the input's own task)",
        "",
        *markdown(["Twin", *tasks], routing),
        "",
        "## Compression: rank per matrix, SVD relative error ‖v − v̂‖_F/‖v‖_F (mean over matrices and tasks), build",
        "",
        *markdown(["Twin", "ranks", "mean error", "build time"], compression),
        "",
    ]


def storage_lines(folder: Path, zoo) -> list[str]:
    experts = sum((p / "model.safetensors").stat().st_size for p in zoo.experts.values())
    parts = {
        "θ* (shared/model.safetensors)": (folder / "shared" / "model.safetensors").stat().st_size,
        "heads": folder_bytes(folder / "shared" / "heads"),
        "exclusive factors": (folder / "exclusive.safetensors").stat().st_size,
        "router": (folder / "router.safetensors").stat().st_size,
    }
    total = folder_bytes(folder)
    rows = [[k, f"{v / MIB:.1f}"] for k, v in parts.items()]
    rows += [
        ["**Twin folder, all files**", f"**{total / MIB:.1f}**"],
        [f"{len(zoo.experts)} experts' model.safetensors", f"{experts / MIB:.1f}"],
    ]
    return [
        "## Storage (MiB, float32)",
        "",
        *markdown(["what", "MiB"], rows),
        "",
        f"Twin / all experts: {total / experts:.3f}",
        "",
    ]


def throughput_lines(worker: Worker, twin, per_task: int) -> list[str]:
    suite = ValidationSuite(worker.dynamic.tasks, worker.tokenizer, max_examples=per_task)
    naive = NaiveTwin(twin)
    timings = {"static": 0.0, "batched": 0.0, "naive": 0.0}
    agree, total, max_diff = 0, 0, 0.0
    with twin.routed(worker.models) as routed:
        for name, evaluator in suite.evaluators.items():
            assert isinstance(evaluator, ClassificationEvaluator)
            timings["static"] += timed(lambda e=evaluator, n=name: logits_of(e, worker.models[n]))[0]
            seconds, batched = timed(lambda e=evaluator, n=name: logits_of(e, routed[n]))
            timings["batched"] += seconds
            texts = worker.dynamic.tasks[list(suite.evaluators).index(name)].validation.texts[:per_task]
            seconds, one_by_one = timed(lambda n=name, t=texts: naive_logits(naive, worker, n, t))
            timings["naive"] += seconds
            agree += int((batched.argmax(-1) == one_by_one.argmax(-1)).sum())
            total += len(texts)
            max_diff = max(max_diff, float((batched - one_by_one).abs().max()))
    rows = [
        [path, f"{s:.2f}", f"{total / s:.1f}", f"{timings['naive'] / s:.1f}x"]
        for path, s in (
            ("naive: per example, θ(x) materialised", timings["naive"]),
            ("batched: low-rank hooks", timings["batched"]),
            ("static θ* alone, batched (no routing)", timings["static"]),
        )
    ]
    return [
        f"## Inference: {total} validation examples ({per_task} per task), float32, 1 thread",
        "",
        *markdown(["path", "seconds", "examples/s", "speed-up vs naive"], rows),
        "",
        f"predictions equal: {agree}/{total}; max |logit difference| batched vs naive: {max_diff:.2e}",
        "",
    ]


def logits_of(evaluator: ClassificationEvaluator, model: torch.nn.Module) -> torch.Tensor:
    """Logits in the evaluator's example order (its batches are length-sorted)."""
    out = torch.empty(evaluator.n_examples, evaluator.num_labels or 0)
    with scoring(model):
        for rows, logits in evaluator.logits(model):
            out[rows] = logits
    return out


def naive_logits(naive: NaiveTwin, worker: Worker, task: str, texts: Sequence[str]) -> torch.Tensor:
    model = worker.models[task]
    max_length = worker.dynamic.tasks[list(worker.models).index(task)].config.max_length
    with scoring(model):
        return torch.cat(
            [
                naive.logits(model, worker.tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt"))
                for text in texts
            ]
        )


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def markdown(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


if __name__ == "__main__":
    main()
