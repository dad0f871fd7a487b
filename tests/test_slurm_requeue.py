"""Preemption, requeue and failure on the real local SLURM (issue 7)."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from cli_runner import invoke
from conftest import make_tiny_plan
from tiny_plans import quick_tiny_plan
from waiting import wait_for

from orchestrator.config import plan_to_yaml
from orchestrator.launch.sacct import sacct_states
from orchestrator.launch.submit import submit_plan
from orchestrator.runs.state import read_state
from orchestrator.runs.status import collect_status
from orchestrator.training.checkpoints import load_checkpoint

pytestmark = pytest.mark.slurm
S1 = "stage1_basic_cnn"
LONGER = {"max_epochs": 3, "iterations_per_epoch": 20}


def _longer_plan(root: Path, data: Path, run: str = "r"):
    return make_tiny_plan(root, data, run=run, stage_updates=LONGER)


def _wait(cond, what: str, timeout_s: float = 240, every_s: float = 0.5):
    return wait_for(cond, timeout_s, what, every_s)


def _stage(plan, name=S1) -> dict:
    return read_state(plan.run_dir)["stages"].get(name, {})


def _weights(plan, name=S1) -> dict[str, torch.Tensor]:
    return load_checkpoint(plan.run_dir / name / "checkpoints" / "final.pt")["model"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_data):
    """Stage 1 trained without interruption, as a job of its own on the same cluster (a
    fresh process, like every attempt of the interrupted jobs): what they must equal."""
    plan, path = _longer_plan(tmp_path_factory.mktemp("ref"), tiny_data)
    (job,) = submit_plan(plan, path, "slurm", only=[S1])
    assert _wait(lambda: _done(job.job_id), "the reference job") == "COMPLETED"
    assert _stage(plan)["attempts"] == 1
    return plan


def _done(job_id: str) -> str | None:
    st = (sacct_states([job_id]) or {}).get(job_id)
    return st if st in {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"} else None


def _rows(plan) -> list[str]:
    return (plan.run_dir / S1 / "metrics.csv").read_text().splitlines()[1:]


def _check_resumed_equal(plan, reference) -> None:
    rows = _rows(plan)
    assert [int(r.split(",")[0]) for r in rows] == [1, 2, 3], \
        "metrics.csv has a repeated or missing epoch"
    got, want = _weights(plan), _weights(reference)
    differ = [k for k in want if not torch.equal(got[k], want[k])]
    if differ:  # say where the runs parted: the resume point and each epoch's loss
        worst = max(float((got[k] - want[k]).abs().max()) for k in differ)
        pytest.fail(f"{len(differ)}/{len(want)} tensors differ (max {worst:.3g}, first "
                    f"{differ[0]}); {_stage(plan)['start']}\nresumed:   "
                    + "\n           ".join(rows) + "\nreference: "
                    + "\n           ".join(_rows(reference)))


@pytest.mark.parametrize("how", ["scontrol requeue", "preemption signal"])
def test_interrupted_stage_resumes_from_last_pt(tmp_path, tiny_data, reference, how) -> None:
    plan, path = _longer_plan(tmp_path / "runs", tiny_data)
    (job,) = submit_plan(plan, path, "slurm", only=[S1])
    _wait(lambda: _stage(plan).get("epoch", 0) >= 1, "the first epoch")
    if how == "scontrol requeue":  # from outside: the job restarts from its original pickle
        subprocess.run(["scontrol", "requeue", job.job_id], check=True, timeout=10)
    else:  # what SLURM sends before preemption or the time limit (--signal=USR2@grace)
        subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True, timeout=10)
    assert _wait(lambda: _done(job.job_id), "the requeued job to finish") == "COMPLETED"
    st = _stage(plan)
    assert st["attempts"] == 2 and st["state"] == "COMPLETED"
    assert st["start"].startswith("resumed from"), st["start"]
    if how == "preemption signal":
        assert st["requeues"] == 1  # counted by checkpoint()
    _check_resumed_equal(plan, reference)


def test_failed_stage_cancels_dependents_and_resume_completes(tmp_path, tiny_data) -> None:
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    plan, path = quick_tiny_plan(tmp_path / "runs", data)  # what the planner picks is not under test
    plan = plan.model_copy(update={"stages": plan.stages[:3]})  # a chain: 2 <- 1, 3 <- 2
    path.write_text(plan_to_yaml(plan))
    hidden = tmp_path / "hidden"
    data.rename(hidden)  # the stage fails on the node: its data is gone
    jobs = submit_plan(plan, path, "slurm", include_lcnn=False)
    assert _wait(lambda: _done(jobs[0].job_id), "stage 1 to fail") == "FAILED"
    _wait(lambda: all(_done(j.job_id) == "CANCELLED" for j in jobs[1:]), "dependents cancelled")
    run = collect_status(tmp_path / "runs", plan.run, sacct_states)["runs"][0]
    s1 = run["stages"][0]
    assert run["state"] == "FAILED" and s1["state"] == "FAILED"
    assert "DataError" in s1["error"] and Path(s1["log"]).exists()
    assert [s["state"] for s in run["stages"]] == ["FAILED", "CANCELLED", "CANCELLED"]
    hidden.rename(data)
    res = invoke("resume", plan.run, "--runs-dir", str(tmp_path / "runs"))
    assert res.exit_code == 0, res.output
    ids = [read_state(plan.run_dir)["stages"][s.stage]["slurm_job_id"] for s in jobs]
    assert not set(ids) & {j.job_id for j in jobs}, "resume must submit new jobs"
    _wait(lambda: all(_done(i) for i in ids), "the resumed chain", timeout_s=360)
    run = collect_status(tmp_path / "runs", plan.run, sacct_states)["runs"][0]
    assert run["state"] == "COMPLETED", run
