"""A progress bar for a running sweep: trials done / total, the best so far and the verdict counts."""

from __future__ import annotations

from collections import Counter
from types import TracebackType

from optuna.trial import FrozenTrial, TrialState
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class SweepProgress:
    """Rich progress on stderr; with `enabled=False` (or no terminal) it prints one line per trial instead."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.best: float | None = None
        self.console = Console(stderr=True)
        self.live = enabled and self.console.is_terminal
        self.enabled = enabled
        self._progress = Progress(
            TextColumn("[bold]trials"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.description}"),
            console=self.console,
            transient=False,
        )
        self._task = self._progress.add_task("", total=total)

    def __enter__(self) -> SweepProgress:
        if self.live:
            self._progress.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        if self.live:
            self._progress.stop()

    def update(self, trial: FrozenTrial, verdicts: Counter[str], done: int, total: int) -> None:
        if trial.state == TrialState.COMPLETE and trial.value is not None:
            self.best = trial.value if self.best is None else max(self.best, trial.value)
        best = "-" if self.best is None else f"{self.best:.3f}"
        counts = " ".join(f"{k}:{verdicts[k]}" for k in ("escaped", "partial", "plateau", "diverged") if verdicts[k])
        text = f"best skill {best}  {counts}"
        if self.live:
            self._progress.update(self._task, completed=min(done, total), description=text)
        elif self.enabled:
            state = trial.state.name.lower()
            line = f"trial {trial.number} {state}: {done}/{total} done, {text}"
            self.console.print(line, highlight=False, soft_wrap=True)
