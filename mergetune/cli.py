"""The ``mergetune`` command line."""

from __future__ import annotations

import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from mergetune.errors import MergetuneError

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
    from mergetune.merging.engine import Merger
    from mergetune.merging.modelset import ModelSet
    from mergetune.merging.save import save_merged
    from mergetune.recipe import Recipe

    with _errors():
        recipe = Recipe.load(recipe_path)
        t0 = time.perf_counter()
        modelset = ModelSet.from_recipe(recipe, device=device)
        t1 = time.perf_counter()
        merged = Merger(modelset, compile=_compile_flag(engine)).merge(recipe)
        t2 = time.perf_counter()
        save_merged(modelset, merged, recipe, out_dir)
        console.print(
            f"merged {len(recipe.experts)} experts with [bold]{recipe.method}[/] "
            f"(load {t1 - t0:.1f}s, merge {t2 - t1:.1f}s) -> [green]{out_dir}[/]"
        )


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
    out_dir: Annotated[Path, typer.Option(help="Where to write the demo run.")] = Path("runs/demo"),
) -> None:
    """Run the demo end to end on the packaged MiniLM model (no network needed)."""
    from mergetune.demo import run_demo

    with _errors():
        run_demo(out_dir, console)


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
