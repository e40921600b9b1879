"""The ``mergetune`` command line."""

from __future__ import annotations

import json
import sys
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from mergetune.errors import MergetuneError, describe_os_error

if TYPE_CHECKING:
    from mergetune.merging.save import MergedFolder


def _quiet_libraries() -> None:
    """Optuna's per-trial INFO lines and experimental-API warnings would drown the progress bar."""
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


app = typer.Typer(add_completion=False, no_args_is_help=True, help="Find the best way to merge fine-tuned models.")
console = Console()
errors = Console(stderr=True, soft_wrap=True)


class Engine(StrEnum):
    auto = "auto"
    compiled = "compiled"
    eager = "eager"


def _compile_flag(engine: Engine) -> bool | None:
    return {Engine.auto: None, Engine.compiled: True, Engine.eager: False}[engine]


@app.command()
def merge(
    recipe_path: Annotated[
        Path, typer.Argument(help="Recipe file (YAML or JSON), or a search's output folder.", metavar="RECIPE")
    ],
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the merged Hugging Face model to.")],
    point: Annotated[
        str, typer.Option(help="With a search folder: 'chosen', a front position (1, 2, ...) or 'trial:N'.")
    ] = "chosen",
    device: Annotated[str, typer.Option(help="Device to merge on: cpu, cuda, cuda:1, ...")] = "cpu",
    engine: Annotated[
        Engine,
        typer.Option(
            help="Kernel backend; the same backend reproduces the same bits. auto: a search point merges on the "
            "search's backend (compiled where a compiler is found), a recipe file compiles only a merge of 8 G "
            "task-vector entries or more (eager is faster below)."
        ),
    ] = Engine.auto,
    threads: Annotated[
        int | None, typer.Option(min=1, help="CPU threads for the merge (default: torch's, one per core).")
    ] = None,
) -> None:
    """Merge the models a recipe names and write a Hugging Face folder that AutoModel loads.

    Streams: one tensor of each model in memory at a time, written into its shard as it is merged.
    Given a search's output folder, merge one of its points; its scores go into the model card.
    """
    import torch

    from mergetune.export.card import merge_point
    from mergetune.merging.methods import load_recipe
    from mergetune.merging.save import merge_to_folder

    if threads is not None:
        torch.set_num_threads(threads)
    with _errors():
        if recipe_path.is_dir():
            found, result = merge_point(recipe_path, point, out_dir, device=device, compile=_compile_flag(engine))
            recipe = found.recipe
        else:
            recipe = load_recipe(recipe_path)
            result = merge_to_folder(recipe, out_dir, device=device, compile=_compile_flag(engine))
        console.print(
            f"merged {len(recipe.experts)} experts with [bold]{recipe.method}[/] ({_merge_timing(result)}) "
            f"-> [green]{escape(str(result.folder))}[/]"
        )


def _merge_timing(result: MergedFolder) -> str:
    """How the merge ran: streamed (passes over the weights) or resident, and why."""
    kernels = "compiled" if result.compiled else "eager"
    if result.streamed:
        return (
            f"streamed in {result.passes} {'pass' if result.passes == 1 else 'passes'}, {kernels} kernels: "
            f"setup {result.load_seconds:.1f}s, merge {result.merge_seconds:.1f}s"
        )
    return (
        f"resident, since {escape(result.resident_reason or '')}, {kernels} kernels: "
        f"load {result.load_seconds:.1f}s, merge {result.merge_seconds:.1f}s"
    )


@app.command()
def search(
    config_path: Annotated[Path, typer.Argument(help="Search config (YAML), see configs/.", metavar="CONFIG")],
    budget: Annotated[int | None, typer.Option(help="Override budget.candidates (total, resumes included).")] = None,
    executor: Annotated[
        str | None, typer.Option(help="local (in-process) or ray (one actor per worker); overrides execution.executor.")
    ] = None,
    address: Annotated[
        str | None, typer.Option(help="Ray cluster to join: auto, HOST:PORT or ray://HOST:PORT (default: local).")
    ] = None,
    workers: Annotated[int | None, typer.Option(help="Ray workers (default: one per GPU, else per CPU).")] = None,
    restart: Annotated[
        bool,
        typer.Option(
            "--restart",
            help="Start afresh: move the run folder aside to FOLDER.replaced-<UTC time> (nothing deleted). "
            "Needed when the config no longer defines the search the folder holds.",
        ),
    ] = False,
) -> None:
    """Search the best merge recipe; re-running the same command resumes an interrupted search.

    A run folder is bound to the config that created it (models, tasks, space, objectives, seed):
    budget and execution may change on resume, anything else needs a new name or --restart.
    """
    from mergetune.search import binding
    from mergetune.search.config import SearchConfig
    from mergetune.search.progress import run_with_progress

    _quiet_libraries()
    with _errors():
        config = SearchConfig.load(config_path)
        if budget is not None:
            config = config.updated("budget", candidates=budget)
        overrides = {"executor": executor, "address": address, "workers": workers}
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if overrides:
            config = config.updated("execution", **overrides)
        if restart and (moved := binding.restart(config)) is not None:
            console.print(f"previous run moved to [green]{escape(str(moved))}[/]")
        loop = run_with_progress(config, console)
        chosen, front = escape(str(loop.out / "chosen" / "recipe.yaml")), escape(str(loop.out / "front"))
        console.print(f"chosen recipe: [green]{chosen}[/]; front: {front}")


class Objective(StrEnum):
    entropy = "entropy"
    labels = "labels"


@app.command()
def tune(
    config_path: Annotated[Path, typer.Argument(help="The search config (models, tasks, data).", metavar="CONFIG")],
    start: Annotated[
        Path | None, typer.Option(help="Recipe to start from (default: the run's chosen/recipe.yaml).")
    ] = None,
    steps: Annotated[int, typer.Option(min=1, help="Adam steps, one batch per task each.")] = 100,
    learning_rate: Annotated[float, typer.Option(help="Adam's learning rate.")] = 1e-3,
    objective: Annotated[
        Objective, typer.Option(help="entropy (no labels, AdaMerging) or labels (cross-entropy on the search split).")
    ] = Objective.entropy,
) -> None:
    """Tune λ per task and layer group by gradient descent through the merge (AdaMerging).

    Task Arithmetic, or TIES with weights after the election and a disjoint sum. Writes
    <run>/tuned/recipe.yaml and summary.json; prints the start's and the tuned recipe's scores.
    """
    from mergetune.search.config import SearchConfig
    from mergetune.search.gradient import GradientSettings
    from mergetune.search.tuning import tune as run_tuning

    with _errors():
        config = SearchConfig.load(config_path)
        settings = GradientSettings(steps=steps, learning_rate=learning_rate, objective=objective.value)
        report = run_tuning(config, start, settings, console)
        table = Table("recipe", "search (tuned on)", "held-out")
        for label, scores in report.scores.items():
            table.add_row(label, f"{scores['search']:.4f}", f"{scores['holdout']:.4f}")
        console.print(table)
        t = report.tuned
        console.print(
            f"{len(t.losses)} steps in {t.seconds:.1f}s, objective {t.losses[0]:.4f} -> {t.losses[-1]:.4f}; "
            f"memory: gradient buffer {t.gradient_bytes / 2**20:.1f} MiB, "
            f"peak RSS +{t.peak_rss_increase_bytes / 2**20:.1f} MiB"
        )
        console.print(f"tuned recipe: [green]{escape(str(report.folder / 'recipe.yaml'))}[/]")


@app.command()
def grams(
    config_path: Annotated[Path, typer.Argument(help="The search config (models, tasks).", metavar="CONFIG")],
    examples: Annotated[int, typer.Option(min=1, help="Training examples per task.")] = 512,
) -> None:
    """Compute RegMean's statistics: each expert's input Gram matrices on its task's training split.

    Writes <run>/grams/<task>.safetensors (files computed from the same expert, task and examples are
    reused) and prints the `options.grams` a regmean recipe names. A search whose space names regmean
    computes or reuses them itself.
    """
    import yaml

    from mergetune.search.config import SearchConfig
    from mergetune.search.grams import GRAMS_DIR, ensure_grams
    from mergetune.search.loop import resolve_models, worker_setup

    with _errors():
        config = SearchConfig.load(config_path)
        setup = worker_setup(config, resolve_models(config, console))
        files = ensure_grams(setup, config.output_dir / GRAMS_DIR, examples)
        for task, path in files.paths.items():
            how = "reused" if task in files.reused else "computed"
            console.print(f"{task}: {files.sequences[task]} training sequences, {how} -> [green]{escape(path)}[/]")
        console.print(f"computed in {files.total_seconds:.1f}s; a regmean recipe's options:")
        console.print(escape(yaml.safe_dump({"options": {"grams": files.paths}}, sort_keys=False)), end="")


@app.command("tasks")
def tasks_command(
    config_path: Annotated[Path, typer.Argument(help="Search config, or a YAML/JSON list of tasks.", metavar="CONFIG")],
) -> None:
    """Show each task: source, kind, split sizes and origin, label map and its origin, overlaps, examples.

    Tasks load exactly as the search loads them; exits with code 2 when any task has an error.
    """
    from mergetune.search.task_report import render, task_reports

    with _errors():
        reports = task_reports(config_path)
        sys.stdout.write(render(reports))
        if any(r.error for r in reports):
            raise typer.Exit(code=2)


@app.command()
def methods(
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list (one object per method).")] = False,
) -> None:
    """List every merge method: paper, parameters, what mergekit does with it, whether it needs data."""
    from mergetune.merging.methods.catalogue import catalogue

    rows = catalogue()
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    # nothing is cut short on a narrow terminal: long values wrap ("fold") instead of ending in an ellipsis
    table = Table(show_lines=True)
    table.add_column("method", no_wrap=True)
    for header in ("paper", "parameters (warm start; search range)", "mergekit", "needs data"):
        table.add_column(header, overflow="fold")
    for row in rows:
        table.add_row(
            row["name"],
            row["paper"],
            _parameters_text(row["parameters"]),
            _mergekit_text(row["mergekit"]),
            "yes" if row["needs_data"] else "no",
        )
    console.print(table)


def _parameters_text(parameters: dict[str, Any]) -> Text:
    """λ and density with warm start and search range, then each option with its default."""
    lines = []
    for field in ("weight", "density"):
        spec = parameters[field]
        if spec is not None:
            searched = "config's range" if spec["search"] is None else "{:g}-{:g}".format(*spec["search"])
            lines.append(f"{field} {spec['warm_start']:g}; {searched}")
    lines += [f"{name}={option['default']}" for name, option in parameters["options"].items()]
    return Text("\n".join(lines))


def _mergekit_text(entry: dict[str, Any]) -> Text:
    """'exact as ties', 'approximate as task_arithmetic: why', 'refused: why'."""
    head = entry["exactness"] if entry["method"] is None else f"{entry['exactness']} as {entry['method']}"
    return Text(head if entry["reason"] is None else f"{head}: {entry['reason']}")


@app.command()
def demo(
    out_dir: Annotated[Path | None, typer.Option(help="Where to write the demo run (default runs/text4-demo).")] = None,
) -> None:
    """Run the demo: build the text4 zoo (first run), search recipes, write the chosen merged model."""
    from mergetune.demo import run_demo

    _quiet_libraries()
    with _errors():
        run_demo(out_dir, console)


zoo_app = typer.Typer(no_args_is_help=True, help="Real fine-tuned experts built offline from packaged models and data.")
app.add_typer(zoo_app, name="zoo")


@zoo_app.command("build")
def zoo_build(
    name: Annotated[str, typer.Argument(help="Zoo to build (see 'mergetune zoo list').")],
    cache_dir: Annotated[Path | None, typer.Option(help="Cache folder; default $MERGETUNE_CACHE, else .cache.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Rebuild every expert, even those already cached.")] = False,
    threads: Annotated[int, typer.Option(min=1, help="Torch threads while training.")] = 1,
) -> None:
    """Fine-tune a zoo's experts (cached experts are reused) and print their accuracies."""
    from mergetune.objectives.zoo import build_zoo

    with _errors():
        zoo = build_zoo(name, cache_dir=cache_dir, force=force, threads=threads, console=console)
        console.print(
            f"zoo [bold]{zoo.name}[/]: {len(zoo.trained)} expert(s) built, {len(zoo.experts) - len(zoo.trained)} "
            f"cached, {zoo.seconds:.1f}s -> [green]{escape(str(zoo.folder))}[/] (manifest: {escape(zoo.manifest.name)})"
        )


@zoo_app.command("list")
def zoo_list(
    cache_dir: Annotated[Path | None, typer.Option(help="Cache folder; default $MERGETUNE_CACHE, else .cache.")] = None,
) -> None:
    """List the zoos, their tasks, and how many of their experts are built in the cache."""
    from mergetune.objectives.zoo import zoos_table

    with _errors():
        console.print(zoos_table(cache_dir))


@app.command()
def status(
    storage: Annotated[
        str, typer.Argument(help="Journal file, the search's output folder, or a database URL.", metavar="STORAGE")
    ],
    study: Annotated[str | None, typer.Option("--study", help="Search name, if the storage holds several.")] = None,
    top: Annotated[int, typer.Option(min=1, help="Rows of the optimised front to show.")] = 10,
) -> None:
    """Show a search, running or finished: trials by state, best feasible mean, front, recent errors."""
    from mergetune.search.status import status_report

    with _errors():
        console.print(status_report(storage, study, top))


twin_app = typer.Typer(
    no_args_is_help=True, help="Twin-Merging: a shared merge plus each expert's compressed knowledge, routed per input."
)
app.add_typer(twin_app, name="twin")


class TwinSplit(StrEnum):
    validation = "validation"
    test = "test"


@twin_app.command("build")
def twin_build(
    recipe_path: Annotated[Path, typer.Argument(help="Recipe with method: twin (YAML or JSON).", metavar="RECIPE")],
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the Twin to.")],
    tasks: Annotated[
        Path | None, typer.Option(help="YAML list of task configs (default: the zoo experts' own records).")
    ] = None,
    device: Annotated[str, typer.Option(help="Device to build on: cpu, cuda, ...")] = "cpu",
    threads: Annotated[int, typer.Option(min=1, help="Torch threads (a search worker's default is 1).")] = 1,
    engine: Annotated[Engine, typer.Option(help="Kernel backend of the shared merge.")] = Engine.auto,
) -> None:
    """Build a Twin: θ*, the experts' exclusive knowledge compressed by SVD, the router; write its folder."""
    import torch

    from mergetune.merging.methods import load_recipe
    from mergetune.twin.workflow import build_folder, build_report

    torch.set_num_threads(threads)
    with _errors():
        result = build_folder(
            load_recipe(recipe_path), out_dir, tasks_file=tasks, device=device, compile=_compile_flag(engine)
        )
        console.print(build_report(result))


@twin_app.command("eval")
def twin_eval(
    folder: Annotated[Path, typer.Argument(help="A Twin folder written by 'mergetune twin build'.")],
    split: Annotated[TwinSplit, typer.Option(help="Split to score (test: once, for a chosen recipe).")] = (
        TwinSplit.validation
    ),
    device: Annotated[str, typer.Option(help="Device to score on.")] = "cpu",
    threads: Annotated[int, typer.Option(min=1, help="Torch threads.")] = 1,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the scores to this JSON file.")] = None,
) -> None:
    """Score a Twin folder on its tasks, normalised by the experts' scores when their folders are there."""
    import json

    import torch

    from mergetune.objectives.zoo import resolve_cache_dir
    from mergetune.twin.workflow import evaluate_folder, scores_table

    torch.set_num_threads(threads)
    with _errors():
        result = evaluate_folder(folder, split=split.value, device=device, cache_dir=resolve_cache_dir() / "twin")
        console.print(scores_table(result))
        if json_out is not None:
            payload = {**result.scores.to_dict(), "routing_accuracy": result.routing_accuracy}
            json_out.write_text(json.dumps(payload, indent=2) + "\n")


class ExportFormat(StrEnum):
    mergekit = "mergekit"


@app.command("export")
def export(
    recipe_path: Annotated[Path, typer.Argument(help="Recipe file (YAML or JSON).", metavar="RECIPE")],
    fmt: Annotated[ExportFormat, typer.Option("--format", help="What to write.")] = ExportFormat.mergekit,
    approximate: Annotated[
        bool, typer.Option("--approximate", help="Where mergekit cannot do it exactly, write the closest config.")
    ] = False,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Write here instead of stdout.")] = None,
) -> None:
    """Write a mergekit configuration that reproduces a recipe (refused, or --approximate, where it cannot)."""
    from mergetune.export.mergekit import export_mergekit
    from mergetune.merging.methods import load_recipe

    with _errors():
        exporters = {ExportFormat.mergekit: export_mergekit}
        exported = exporters[fmt](load_recipe(recipe_path), approximate=approximate, source=str(recipe_path))
        _write_text(exported.yaml, output)
        errors.print(f"{exported.method} for mergekit: {exported.faithful}", highlight=False)
        for line in [*(f"differs: {d}" for d in exported.differences), *(f"note: {n}" for n in exported.notes)]:
            errors.print(f"  {line}", highlight=False, markup=False)


@app.command("import-mergekit")
def import_mergekit_command(
    config_path: Annotated[Path, typer.Argument(help="A mergekit YAML configuration.", metavar="CONFIG")],
    approximate: Annotated[
        bool, typer.Option("--approximate", help="Where a recipe cannot hold it exactly, write the closest one.")
    ] = False,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Write here instead of stdout.")] = None,
) -> None:
    """Turn a mergekit configuration into a mergetune recipe (to merge it, or to start a search from it)."""
    from mergetune.export.mergekit_import import import_mergekit

    with _errors():
        imported = import_mergekit(config_path, approximate=approximate)
        _write_text(imported.recipe.to_yaml(), output)
        for line in [*(f"differs: {d}" for d in imported.differences), *(f"note: {n}" for n in imported.notes)]:
            errors.print(line, highlight=False, markup=False)


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A search's output folder.", metavar="RUN_DIR")],
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Folder for the page (default RUN_DIR/report).")
    ] = None,
    pair: Annotated[
        list[str] | None,
        typer.Option("--pair", help="Task pair TASK:TASK to plot (repeat; default: most conflicting)."),
    ] = None,
    score_references: Annotated[
        Path | None,
        typer.Option(help="The search's config: score the base and the baselines on validation and test first."),
    ] = None,
) -> None:
    """Write a self-contained HTML report (and PNG figures) of a search."""
    from mergetune.export.report import write_report

    with _errors():
        if score_references is not None:
            from mergetune.export.references import score_references as score

            _quiet_libraries()
            console.print(f"scored the base and baselines -> {escape(str(score(run_dir, score_references)))}")
        page = write_report(run_dir, output, pair or [])
        console.print(f"report: [green]{escape(str(page))}[/] (figures beside it as PNG)")


def _write_text(text: str, output: Path | None) -> None:
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text)


class _errors:
    """Turn mergetune's input errors into a one-line message and exit code 2 (no traceback)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> bool:
        if isinstance(exc, MergetuneError | OSError):
            # The message is printed as plain text: a path or value such as "[inf]" or "[/x]" would be
            # read as rich markup (and vanish, or crash the printer).
            message = describe_os_error(exc) if isinstance(exc, OSError) else str(exc)
            errors.print(Text("error: ", style="red") + Text(message), highlight=False)
            raise typer.Exit(code=2)
        return False


if __name__ == "__main__":
    app()
