"""Progress bars (rich): training (step, loss, lr, speed and ETA on one line) and plain counted work."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from detpact.console import CONSOLE


class TrainProgress:
    """`update(step, **fields)` moves the bar; a disabled bar costs nothing."""

    def __init__(self, progress: Progress | None, task_id: int | None):
        self._progress = progress
        self._task = task_id

    def update(self, completed: int, loss: float, lr: float, samples_per_s: float, epoch: int) -> None:
        if self._progress is not None:
            self._progress.update(
                self._task, completed=completed, loss=loss, lr=lr, speed=samples_per_s, epoch=epoch
            )


@contextlib.contextmanager
def train_progress(total: int, completed: int, enabled: bool) -> Iterator[TrainProgress]:
    if not enabled:
        yield TrainProgress(None, None)
        return
    columns = (
        TextColumn("[bold]train[/] ep {task.fields[epoch]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[speed]:.1f} img/s"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
    # Two refreshes a second: the bar must not steal CPU from training.
    with Progress(*columns, console=CONSOLE, refresh_per_second=2) as progress:
        task = progress.add_task("train", total=total, completed=completed, loss=float("nan"), lr=0.0, speed=0.0, epoch=0)
        yield TrainProgress(progress, task)


class _Bar:
    def __init__(self, progress: Progress | None, task_id: int | None):
        self._progress, self._task = progress, task_id

    def advance(self, amount: int = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, amount)


@contextlib.contextmanager
def progress_bar(description: str, total: int, enabled: bool = True) -> Iterator[_Bar]:
    """A plain counted bar for long non-training work (preflight, conversion)."""
    if not enabled or not CONSOLE.is_terminal:
        yield _Bar(None, None)
        return
    columns = (TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=CONSOLE, refresh_per_second=4, transient=True) as progress:
        yield _Bar(progress, progress.add_task(description, total=total))
