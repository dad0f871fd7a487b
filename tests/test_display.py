"""Stage progress: a bar on a terminal, timestamped log lines in SLURM logs (issue 5)."""
from __future__ import annotations

import io
import logging
import sys

from rich.console import Console

from orchestrator.training.display import StepDisplay


def test_log_lines_ten_times_an_epoch_when_not_on_a_terminal(caplog) -> None:
    caplog.set_level(logging.INFO, logger="orchestrator.training.display")
    with StepDisplay("s1", 20, 3, tty=False) as display:
        display.epoch(1, 0)
        for step in range(1, 21):
            display.step(1, step, 0.5 if step > 1 else None)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 10
    assert lines[0].startswith("s1: epoch 2/3 step 2/20 loss 0.5000 (")
    assert lines[-1].startswith("s1: epoch 2/3 step 20/20 loss 0.5000 (") and "s/step)" in lines[-1]


def test_bar_on_a_terminal_resumes_mid_epoch_and_keeps_log_lines_above_it() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120)
    handler = logging.StreamHandler(sys.stderr)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with StepDisplay("s1", 20, 3, tty=True, console=console) as display:
            logging.getLogger("orchestrator.test").warning("a line above the bar")
            display.epoch(0, 5)  # resumed after 5 steps
            for step in range(6, 21):
                display.step(0, step, 0.25)
        assert handler.stream is sys.stderr
    finally:
        root.removeHandler(handler)
    text = out.getvalue()
    assert "s1 epoch 1/3" in text and "20/20" in text and "loss 0.2500" in text
    assert "a line above the bar" in text  # through the bar's console, not over it
