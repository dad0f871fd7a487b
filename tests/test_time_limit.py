"""The epoch-boundary time limit and the requeue cap (issue 7)."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO
from tiny_plans import quick_tiny_plan

from orchestrator.config import Plan
from orchestrator.launch.node import count_requeue
from orchestrator.runs import state as run_state
from orchestrator.training.checkpoints import load_checkpoint
from orchestrator.training.interrupt import StopFlag
from orchestrator.training.trainer import run_stage


def _plan(runs_dir: Path, data: Path, run: str, max_epochs: int = 2, **cluster: object) -> tuple[Plan, Path]:
    plan, path = quick_tiny_plan(runs_dir, data, run, stage_updates={"max_epochs": max_epochs}, **cluster)
    return plan.model_copy(update={"stages": plan.stages[:1]}), path


def test_stage_stops_at_the_epoch_boundary_when_time_runs_out(tmp_path: Path, tiny_data: Path) -> None:
    ref, ref_path = _plan(tmp_path, tiny_data, "ref")
    run_stage(ref_path, ref.stages[0].name)
    plan, path = _plan(tmp_path, tiny_data, "tl")
    name = plan.stages[0].name
    no_time = StopFlag(end_time=time.time, margin_s=30)  # the job's end is now
    first = run_stage(path, name, stop=no_time)
    assert first["interrupted"] and first["epochs"] == 1 and no_time.time_up and no_time.signum is None
    last = load_checkpoint(plan.run_dir / name / "checkpoints" / "last.pt")
    assert (last["progress"]["epoch"], last["progress"]["step_in_epoch"]) == (1, 0)  # the boundary
    assert run_state.read_state(plan.run_dir)["stages"][name]["state"] == run_state.INTERRUPTED
    plenty = StopFlag(end_time=lambda: time.time() + 3600, margin_s=30)
    second = run_stage(path, name, stop=plenty)
    assert not second["interrupted"] and not plenty.time_up and second["start"].startswith("resumed")
    rows = (plan.run_dir / name / "metrics.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == [1, 2]
    got = load_checkpoint(plan.run_dir / name / "checkpoints" / "final.pt")["model"]
    want = load_checkpoint(ref.run_dir / name / "checkpoints" / "final.pt")["model"]
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_requeues_are_counted_up_to_the_profile_maximum(tmp_path: Path, tiny_data: Path) -> None:
    plan, path = _plan(tmp_path, tiny_data, "cap", max_requeues=2)
    name = plan.stages[0].name
    assert count_requeue(str(path), name, time_up=True)
    assert count_requeue(str(path), name, time_up=False)
    entry = run_state.read_state(plan.run_dir)["stages"][name]
    assert (entry["requeues"], entry["timeouts"], entry["state"]) == (2, 1, run_state.SUBMITTED)
    assert not count_requeue(str(path), name, time_up=True)  # a third one is refused
    entry = run_state.read_state(plan.run_dir)["stages"][name]
    assert entry["state"] == run_state.FAILED and entry["requeues"] == 2
    assert "max_requeues 2 of cluster profile local reached" in entry["error"]


@pytest.mark.slurm
def test_job_end_time_is_slurms(tmp_path: Path) -> None:
    code = ("import time; from orchestrator.launch.node import job_end_time; "
            "print(job_end_time() - time.time())")
    out = subprocess.run(["sbatch", "--parsable", "--wait", "--time=3", "--cpus-per-task=1",
                          f"--output={tmp_path}/end-%j.out", f"--wrap={sys.executable} -c '{code}'"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    left_s = float(next(tmp_path.glob("end-*.out")).read_text().split()[-1])
    assert 150 < left_s <= 180, left_s  # a 3-minute limit, a few seconds in
