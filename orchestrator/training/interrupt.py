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
from collections.abc import Callable
from types import FrameType
from typing import Any

logger = logging.getLogger(__name__)
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: `run-stage` stopped early; run it again to resume


class StopFlag:
    """Callable flag (`flag()` is True once a watched signal arrived)."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        logger.warning("caught %s: stopping at the next step boundary", signal.Signals(signum).name)
        self.signum = signum

    def install(self, signum: int) -> Callable[..., Any] | int | None:
        """Watch `signum`; returns the handler it replaces (to call once stopped)."""
        previous = signal.getsignal(signum)
        signal.signal(signum, self._handle)
        return previous
