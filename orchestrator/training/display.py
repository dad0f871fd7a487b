"""Where a stage is within its epoch, for whoever watches it.

On a terminal (`run-stage` by hand) a rich progress bar: epoch, steps, running loss,
time left in the epoch; the trainer's log lines print above it. Elsewhere (SLURM logs,
the local executor's files) a plain log line, timestamped by the logging format,
`LINES_PER_EPOCH` times an epoch. Rank 0 alone displays under DDP.
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Any

logger = logging.getLogger(__name__)
LINES_PER_EPOCH = 10


class StepDisplay:
    """A progress bar on a terminal, periodic log lines elsewhere (see the module doc).

    Args:
        stage: the stage's name; steps_per_epoch, max_epochs: the stage's schedule.
        tty: force the bar (True) or the lines (False); default: whether stderr is a
            terminal.
        console: where the bar draws (default: a rich Console on stderr).
    """

    def __init__(self, stage: str, steps_per_epoch: int, max_epochs: int,
                 tty: bool | None = None, console: Any = None) -> None:
        self.stage, self.steps, self.max_epochs = stage, steps_per_epoch, max_epochs
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.every = max(1, steps_per_epoch // LINES_PER_EPOCH)
        self.console = console
        self._bar: Any = None
        self._task: Any = None
        self._swapped: list[tuple[logging.StreamHandler, Any]] = []
        self._mark = (0, time.perf_counter())  # (step, time) of the last line

    def __enter__(self) -> StepDisplay:
        if self.tty:
            # deferred: rich's progress bar, only on a terminal
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            console = self.console or Console(stderr=True)
            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(),
                                 console=console, transient=False)
            # log lines go through the bar (rich's proxy of sys.stderr prints them above
            # it); the handlers' streams are compared before the bar replaces sys.stderr
            handlers = [h for h in logging.getLogger().handlers if type(h) is logging.StreamHandler
                        and h.stream in (sys.stderr, sys.__stderr__)]
            self._bar.start()
            for h in handlers:
                self._swapped.append((h, h.stream))
                h.setStream(sys.stderr)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()
        for handler, stream in self._swapped:
            handler.setStream(stream)

    def epoch(self, epoch: int, done_steps: int) -> None:
        """An epoch (0-based) starts, or resumes after `done_steps` steps."""
        self._mark = (done_steps, time.perf_counter())
        if self._bar is not None:
            desc = f"{self.stage} epoch {epoch + 1}/{self.max_epochs}"
            if self._task is None:
                self._task = self._bar.add_task(desc, total=self.steps, completed=done_steps, loss="-")
            else:
                self._bar.reset(self._task, total=self.steps, completed=done_steps, description=desc,
                                loss="-")

    def step(self, epoch: int, step_in_epoch: int, mean_loss: float | None) -> None:
        """A step ended: `step_in_epoch` steps of epoch `epoch` (0-based) are done."""
        loss = "-" if mean_loss is None else f"{mean_loss:.4f}"
        if self._bar is not None:
            self._bar.update(self._task, completed=step_in_epoch, loss=loss)
            return
        if step_in_epoch % self.every and step_in_epoch != self.steps:
            return
        last_step, last_t = self._mark
        now = time.perf_counter()
        per_step = (now - last_t) / max(1, step_in_epoch - last_step)
        self._mark = (step_in_epoch, now)
        logger.info("%s: epoch %d/%d step %d/%d loss %s (%.2f s/step)", self.stage, epoch + 1,
                    self.max_epochs, step_in_epoch, self.steps, loss, per_step)
