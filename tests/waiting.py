"""`wait_for`: the one polling loop of the tests (SLURM states, files, child processes)."""
from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(condition: Callable[[], T], timeout_s: float, what: str = "the condition",
             every_s: float = 0.5, proc: subprocess.Popen | None = None,
             explain: Callable[[], str] | None = None) -> T:
    """Call `condition()` every `every_s` seconds until it returns a true value; return that.

    Raises:
        AssertionError: `timeout_s` passed (the message names `what` and the last value,
            then what `explain()` says: the scene a failure is read from, e.g. SLURM's view),
            or `proc` ended before the condition held (with its output).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended (exit {proc.returncode}) before {what}: "
                                 f"{proc.communicate()}")
        if time.monotonic() >= deadline:
            scene = f"\n{explain()}" if explain is not None else ""
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}; "
                                 f"last: {value!r}{scene}")
        time.sleep(every_s)
