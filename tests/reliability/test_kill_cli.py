"""The command line around a kill: `run-stage` killed with SIGKILL, `status` telling what
happened, running it again, and a stage whose last.pt was lost."""
from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import reliability_kit as kit
from conftest import REPO
from tiny_plans import quick_tiny_plan
from waiting import wait_for

from orchestrator.training.checkpoints import load_checkpoint

S1 = "stage1_basic_cnn"
LONGER = {"max_epochs": 2, "iterations_per_epoch": 6, "checkpoint_every_steps": 1}

one_thread = kit.one_thread
pytestmark = pytest.mark.usefixtures("one_thread")


def _status(runs: Path, run: str, capsys) -> dict:  # noqa: ANN001
    code, out, err = kit.run_cli(["status", run, "--runs-dir", str(runs), "--json"], capsys)
    assert code == 0, err
    return json.loads(out)["runs"][0]


def _kill_when(proc: subprocess.Popen, ready, delay_s: float) -> None:
    """SIGKILL `proc` `delay_s` after `ready()` became true."""
    wait_for(ready, 120, "the stage to be ready to kill", every_s=0.05, proc=proc)
    time.sleep(delay_s)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the stage ended before the kill"


@pytest.mark.slow
def test_killed_run_stage_status_and_rerun(tmp_path: Path, tiny_data: Path, capsys) -> None:
    """`orchestrator run-stage` killed at a seeded moment of its first epoch: status shows the
    stage INTERRUPTED (its process is gone), not RUNNING; run-stage again resumes and ends."""
    runs = tmp_path / "runs"
    plan, path = quick_tiny_plan(runs, tiny_data, "cli", stage_updates=LONGER)
    last = plan.run_dir / S1 / "checkpoints" / "last.pt"
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "run-stage", "--plan", str(path),
                             "--stage", S1], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=kit.ONE_THREAD)
    _kill_when(proc, last.exists, random.Random(kit.SEED).uniform(0.0, 0.5))
    kit.TALLY["kills"] += 1
    kit.check_stage_after_kill(plan.run_dir, S1, {})
    row = _status(runs, "cli", capsys)["stages"][0]
    assert row["state"] == "INTERRUPTED" and "ended without a word" in row["error"], row
    code, out, err = kit.run_cli(["run-stage", "--plan", str(path), "--stage", S1], capsys)
    assert code == 0 and "resumed from" in out, err[-3000:]
    row = _status(runs, "cli", capsys)["stages"][0]
    assert row["state"] == "COMPLETED" and row["attempts"] == 2 and row["epoch"] == 2, row


@pytest.mark.slow
def test_lost_last_pt_stops_and_resume_fresh_starts_over(tmp_path: Path, tiny_data: Path,
                                                         capsys) -> None:
    """state.json says epoch 1, last.pt is gone: run-stage refuses with one line naming the
    file and `resume --fresh`, writing nothing; `resume RUN --fresh STAGE` then trains the
    stage from its beginning to its end."""
    runs = tmp_path / "runs"
    plan, path = quick_tiny_plan(runs, tiny_data, "lost", stage_updates=LONGER)
    from orchestrator.training.trainer import run_stage

    run_stage(path, S1, max_steps=LONGER["iterations_per_epoch"] + 2)  # into epoch 2
    last = plan.run_dir / S1 / "checkpoints" / "last.pt"
    last.unlink()
    state = (plan.run_dir / "state.json").read_bytes()
    code, _, err = kit.run_cli(["run-stage", "--plan", str(path), "--stage", S1], capsys)
    errors = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(errors) == 1 and errors[0].startswith("error:"), err
    assert f"{last}: checkpoint not found, but" in errors[0] and "reached epoch 1" in errors[0]
    assert f"orchestrator resume lost --fresh {S1}" in errors[0], errors[0]
    assert (plan.run_dir / "state.json").read_bytes() == state and not last.exists()
    code, _, err = kit.run_cli(["resume", "lost", "--runs-dir", str(runs), "--fresh", S1,
                                "--executor", "debug"], capsys)
    assert code == 0, err[-3000:]
    entry = json.loads((plan.run_dir / "state.json").read_text())["stages"][S1]
    assert entry["state"] == "COMPLETED" and "started over on purpose" in entry["start"], entry
    assert not entry.get("fresh_requested")
    assert load_checkpoint(last)["progress"]["epoch"] == 2
    rows = (plan.run_dir / S1 / "metrics.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == [1, 2]
