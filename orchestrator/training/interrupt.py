"""Stop a stage cleanly on a signal: at the next step boundary, after writing last.pt.

A preemption or time-limit signal (SLURM sends USR2 `signal_grace_s` before the end)
can arrive in the middle of an optimizer step; saving from the signal handler could
record a half-updated state. The handler only raises a flag; the trainer checks it
between steps, writes last.pt there and returns, so the requeued job resumes at exactly
that step.
"""
from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

logger = logging.getLogger(__name__)
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: `run-stage` stopped early; run it again to resume


EPOCH_SAFETY = 1.2  # the next epoch is assumed to take this much longer than the last one


class StopFlag:
    """Callable flag: True once a watched signal arrived, or once the time limit is near.

    Args:
        end_time: returns the job's end (epoch seconds) or None when unknown; asked at
            every epoch boundary (the time limit of a job can change while it runs).
        margin_s: stop this long before `end_time` (the grace time SLURM's signal leaves).
    """

    def __init__(self, end_time: Callable[[], float | None] | None = None,
                 margin_s: float = 0.0) -> None:
        self.signum: int | None = None
        self.time_up = False
        self.end_time = end_time
        self.margin_s = margin_s
        self._replaced: dict[int, Any] = {}

    def __call__(self) -> bool:
        return self.signum is not None or self.time_up

    def epoch_ended(self, epoch_s: float) -> None:
        """At an epoch boundary: stop now, if an epoch as long as the last one would not end
        `margin_s` before the job does (better than being stopped in the middle of it)."""
        end = self.end_time() if self.end_time else None
        if end is None:
            return
        left_s = end - self.margin_s - time.time()
        if EPOCH_SAFETY * epoch_s > left_s:
            logger.warning("time limit: %.0f s left before the job's end (minus %.0f s grace), an "
                           "epoch takes %.0f s: stopping at the epoch boundary", left_s,
                           self.margin_s, epoch_s)
            self.time_up = True

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        logger.warning("caught %s: stopping at the next step boundary", signal.Signals(signum).name)
        self.signum = signum

    def install(self, signum: int) -> Callable[..., Any] | int | None:
        """Watch `signum`; returns the handler it replaces (to call once stopped)."""
        previous = signal.getsignal(signum)
        signal.signal(signum, self._handle)
        self._replaced.setdefault(signum, previous)
        return previous

    def restore(self) -> None:
        """Put back the handlers `install` replaced. A stage run in a process that lives on
        (the debug executor, a test) must not leave a handler that only records a signal:
        the process, and whatever it forks, would no longer stop on SIGTERM."""
        for signum, previous in self._replaced.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._replaced.clear()


def leave_signals_to_the_trainer(_worker_id: int) -> None:
    """A DataLoader worker's init: ignore the stop signals.

    SLURM signals every process of a job step (scancel, `scontrol requeue`, preemption,
    `--signal`), DataLoader workers included. PyTorch's own SIGTERM handler in a worker
    dies on a signal not sent by its parent, and the main process then raises "DataLoader
    worker exited unexpectedly" wherever it is, instead of stopping at the next step
    boundary with last.pt written. Ignored here, the workers are shut down by the main
    process as usual, or end on their own once it has exited (PyTorch's watchdog).
    """
    for signum in (signal.SIGTERM, signal.SIGUSR2):
        signal.signal(signum, signal.SIG_IGN)
