"""Live feedback for ``mergetune search`` and the demo: progress bar, then the finalists table."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from mergetune.search.config import SearchConfig
from mergetune.search.display import candidate_line, split_lines
from mergetune.search.loop import SearchLoop, open_search
from mergetune.search.records import TrialRecord
from mergetune.search.results import summary_table


class PlainProgress:
    """The loop's Progress protocol as one printed line per finished candidate (output is not a terminal)."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.done = 0
        self.total: int | None = None
        self.failures = 0

    def start(self, total: int | None, done: int, description: str) -> None:
        self.total, self.done = total, done
        self.console.print(f"{description}: {done} of {total if total is not None else '?'} candidates done")

    def update(self, record: TrialRecord, best_mean: float | None) -> None:
        self.done += 1
        self.failures += 0 if record.ok or record.pruned else 1
        self.console.print(candidate_line(record, self.done, self.total, best_mean), highlight=False, markup=False)

    def stop(self) -> None:
        return None


class RichProgress:
    """Implements the loop's Progress protocol with a rich progress bar."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console()
        self._progress: Progress | None = None
        self._task = None
        self.failures = 0

    def start(self, total: int | None, done: int, description: str) -> None:
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("best mean {task.fields[best]}"),
            TextColumn("last {task.fields[last]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task(description, total=total, completed=done, best="-", last="-")

    def update(self, record: TrialRecord, best_mean: float | None) -> None:
        if self._progress is None or self._task is None:
            return
        if record.ok:
            mean = record.normalized and sum(record.normalized.values()) / len(record.normalized)
            last = f"#{record.number} {record.method} {mean:.3f}"
        elif record.pruned:  # multi-fidelity: stopped early, not failed
            last = f"#{record.number} {record.method} stopped early"
        else:
            self.failures += 1
            last = f"#{record.number} failed"
        best = f"{best_mean:.4f}" if best_mean is not None else "-"
        self._progress.update(self._task, advance=1, best=best, last=last)

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def run_with_progress(config: SearchConfig, console: Console) -> SearchLoop:
    """Run a search with a progress bar and print its finalists; returns the finished loop."""
    # a live bar needs a terminal; under nohup or a pipe it would print nothing until the end
    progress = RichProgress(console) if console.is_terminal else PlainProgress(console)
    loop = open_search(config, progress=progress, console=console)
    console.print(
        f"search [bold]{config.name}[/]: {loop.space.dimension} parameters, "
        f"optimizer {loop.optimizer.describe()}, storage {loop.storage_url}"
    )
    for line in split_lines(loop.models.tasks):
        console.print(line, highlight=False, markup=False)
    try:
        console.print(f"executor: {loop.executor.describe()}")
        console.print(summary_table(loop.run()))
    finally:
        loop.close()
    return loop
