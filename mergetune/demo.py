"""The demo behind ``mergetune demo`` (the README's first command): a complete search on text4.

It builds the text4 zoo on first use (4 real experts of the packaged all-MiniLM-L6-v2 fine-tuned
offline on packaged corpora; cached after), searches Task Arithmetic, TIES and PCB recipes with
multi-objective TPE (configs/text4.yaml), re-scores the finalists on held-out validation examples,
scores the chosen recipe once on the test split, and writes the merged model folder.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from mergetune.errors import MergetuneError
from mergetune.merging.save import merge_to_folder
from mergetune.recipe import Recipe
from mergetune.search.config import SearchConfig
from mergetune.search.progress import run_with_progress

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "text4.yaml"


def run_demo(out_dir: Path | None, console: Console) -> Path:
    """Run the demo search into ``out_dir`` (default: the config's output) and merge its chosen recipe."""
    if not DEMO_CONFIG.is_file():
        raise MergetuneError(f"demo config not found at {DEMO_CONFIG}: run the demo from a clone of the repository")
    config = SearchConfig.load(DEMO_CONFIG)
    if out_dir is not None:
        config = config.model_copy(update={"output": str(out_dir)})
    loop = run_with_progress(config, console)
    recipe = Recipe.load(loop.out / "chosen" / "recipe.yaml")
    folder = merge_to_folder(recipe, loop.out / "chosen" / "model").folder
    console.print(
        f"chosen recipe: [green]{loop.out / 'chosen' / 'recipe.yaml'}[/]\n"
        f"merged model (AutoModel.from_pretrained): [green]{folder}[/]\n"
        f"Pareto front recipes: {loop.out / 'front'}; all candidates: {loop.out / 'candidates.csv'}; "
        f"summary: {loop.out / 'summary.md'}"
    )
    return folder
