"""A stop signal sent the way SLURM sends it, to every process of the step (issue 7)."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from tiny_plans import quick_tiny_plan, start_stage_with_workers

from orchestrator.runs import state as run_state
from orchestrator.training.checkpoints import load_checkpoint
from orchestrator.training.interrupt import EXIT_INTERRUPTED


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR2])
def test_signal_to_trainer_and_its_data_workers_stops_cleanly(tmp_path: Path, tiny_data: Path,
                                                               signum: int) -> None:
    """scancel / `scontrol requeue` / preemption signal the DataLoader workers too: the
    stage must still stop at a step boundary with last.pt written (exit 75), not die with
    "DataLoader worker exited unexpectedly"."""
    plan, path = quick_tiny_plan(tmp_path, tiny_data, "sig", stage_updates={
        "num_workers": 1, "iterations_per_epoch": 500, "max_epochs": 1})
    name = plan.stages[0].name
    proc, workers = start_stage_with_workers(plan, path, name)
    last = plan.run_dir / name / "checkpoints" / "last.pt"
    for pid in [proc.pid, *workers]:  # as slurmstepd does: every process of the step
        os.kill(pid, signum)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_INTERRUPTED, err[-2000:]
    assert "DataLoader worker" not in err
    entry = run_state.read_state(plan.run_dir)["stages"][name]
    assert entry["state"] == run_state.INTERRUPTED, entry
    progress = load_checkpoint(last)["progress"]
    assert 0 < progress["step_in_epoch"] < 500 and progress["epoch"] == 0
