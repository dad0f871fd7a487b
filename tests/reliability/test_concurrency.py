"""Readers and writers at the same time: `status --json` while a stage writes, and two
submissions of one run."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import reliability_kit as kit
from tiny_plans import quick_tiny_plan

S1 = "stage1_basic_cnn"

one_thread = kit.one_thread
pytestmark = pytest.mark.usefixtures("one_thread")


def test_status_json_in_a_loop_while_a_stage_writes(tmp_path: Path, tiny_data: Path, capsys) -> None:
    """`orchestrator status --json` read as fast as it answers while a stage (a child
    process) writes state.json, metrics.csv and checkpoints: every read is one complete
    JSON document, exit 0, and the epoch it shows never goes back."""
    runs = tmp_path / "runs"
    plan, path = quick_tiny_plan(runs, tiny_data, "busy", stage_updates={
        "max_epochs": 4, "iterations_per_epoch": 3, "checkpoint_every_steps": 1})
    proc = kit.context().Process(target=kit.stage_child, args=(str(path), S1, None))
    proc.start()
    reads, epochs, states = 0, [], set()
    try:
        while proc.is_alive() or reads < 5:
            code, out, err = kit.run_cli(["status", "busy", "--runs-dir", str(runs), "--json"], capsys)
            assert code == 0 and not err.strip(), err
            row = json.loads(out)["runs"][0]["stages"][0]
            epochs.append(row["epoch"])
            states.add(row["state"])
            reads += 1
    finally:
        proc.join(120)
    assert proc.exitcode == 0
    assert reads >= 20, f"only {reads} reads"
    assert epochs == sorted(epochs) and epochs[-1] == 4, epochs
    assert "RUNNING" in states and "COMPLETED" in states, states


def test_two_submissions_of_one_run_at_the_same_moment(tmp_path: Path, tiny_data: Path) -> None:
    """Two processes submit one run at the same instant: one wins, the other is refused
    with the line that points at `resume`."""
    from concurrent.futures import ProcessPoolExecutor

    plan, _ = quick_tiny_plan(tmp_path / "runs", tiny_data, "twice")
    start_at = time.time() + 1.0
    with ProcessPoolExecutor(2, mp_context=kit.context()) as pool:
        got = list(pool.map(kit.claim_at, [str(plan.run_dir)] * 2, [start_at] * 2))
    assert got.count("claimed") == 1, got
    refused = next(g for g in got if g != "claimed")
    assert "run twice was submitted already" in refused and "orchestrator resume twice" in refused


@pytest.mark.slurm
def test_second_submit_of_a_run_is_refused(tmp_path: Path, tiny_data: Path, capsys) -> None:
    """`orchestrator submit --plan P` twice on the real cluster: the second exits 2 with
    one line, submits nothing and leaves state.json as it was."""
    runs = tmp_path / "runs"
    plan, path = quick_tiny_plan(runs, tiny_data, "dup")
    argv = ["submit", "--plan", str(path), "--no-lcnn", "--executor", "slurm"]
    try:
        code, _, err = kit.run_cli(argv, capsys)
        assert code == 0, err
        before = (plan.run_dir / "state.json").read_bytes()
        code, _, err = kit.run_cli(argv, capsys)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1, err
        assert "run dup was submitted already (slurm" in lines[0] and "orchestrator resume dup" in lines[0]
        assert (plan.run_dir / "state.json").read_bytes() == before
    finally:
        kit.run_cli(["cancel", "dup", "--runs-dir", str(runs)], capsys)
