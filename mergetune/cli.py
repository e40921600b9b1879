"""The ``mergetune`` command line."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from mergetune.errors import MergetuneError


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
    recipe_path: Annotated[Path, typer.Argument(help="Recipe file (YAML or JSON).", metavar="RECIPE")],
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the merged Hugging Face model to.")],
    device: Annotated[str, typer.Option(help="Device to merge on: cpu, cuda, cuda:1, ...")] = "cpu",
    engine: Annotated[Engine, typer.Option(help="Kernel backend; the same backend reproduces the same bits.")] = (
        Engine.auto
    ),
) -> None:
    """Merge the models a recipe names and write a Hugging Face folder that AutoModel loads."""
    from mergetune.merging.save import merge_to_folder
    from mergetune.recipe import Recipe

    with _errors():
        recipe = Recipe.load(recipe_path)
        result = merge_to_folder(recipe, out_dir, device=device, compile=_compile_flag(engine))
        console.print(
            f"merged {len(recipe.experts)} experts with [bold]{recipe.method}[/] "
            f"(load {result.load_seconds:.1f}s, merge {result.merge_seconds:.1f}s) -> [green]{result.folder}[/]"
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
) -> None:
    """Search the best merge recipe; re-running the same command resumes an interrupted search."""
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
        loop = run_with_progress(config, console)
        console.print(f"chosen recipe: [green]{loop.out / 'chosen' / 'recipe.yaml'}[/]; front: {loop.out / 'front'}")


@app.command()
def methods() -> None:
    """List the merge methods and their options."""
    from mergetune.merging.methods import METHODS

    table = Table("method", "density", "options", "paper")
    for name, method in sorted(METHODS.items()):
        fields = ", ".join(
            f"{k}={getattr(v.default, 'value', v.default)}" for k, v in method.Options.model_fields.items()
        )
        table.add_row(name, "yes" if method.uses_density else "-", fields or "-", method.citation)
    console.print(table)


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
            f"cached, {zoo.seconds:.1f}s -> [green]{zoo.folder}[/] (manifest: {zoo.manifest.name})"
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
    from mergetune.search.results import status_report

    with _errors():
        console.print(status_report(storage, study, top))


class _errors:
    """Turn mergetune's input errors into a one-line message and exit code 2 (no traceback)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> bool:
        if isinstance(exc, MergetuneError):
            errors.print(f"[red]error:[/] {exc}", markup=True, highlight=False)
            raise typer.Exit(code=2)
        return False


if __name__ == "__main__":
    app()
