"""A 2-task DDP stage (gloo, CPU) on the real local SLURM (issue 7)."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from tiny_plans import quick_tiny_plan
from waiting import wait_for

from orchestrator.launch.sacct import sacct_states
from orchestrator.launch.submit import submit_plan
from orchestrator.runs.state import read_state
from orchestrator.training.checkpoints import load_checkpoint
from orchestrator.training.distributed import DDP_REPORT, weights_digest

pytestmark = pytest.mark.slurm
S1 = "stage1_basic_cnn"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL"}


def _wait_done(job_id: str, timeout_s: float = 240) -> str:
    def ended() -> str | None:
        state = (sacct_states([job_id]) or {}).get(job_id)
        return state if state in TERMINAL else None

    return wait_for(ended, timeout_s, f"job {job_id} to finish", every_s=1)


def test_two_task_ddp_stage_keeps_ranks_equal(tmp_path: Path, tiny_data: Path) -> None:
    plan, path = quick_tiny_plan(tmp_path / "runs", tiny_data, run="ddp", cluster="local-ddp")
    (job,) = submit_plan(plan, path, "slurm", only=[S1])
    assert job.parameters["tasks_per_node"] == 2
    state = _wait_done(job.job_id)
    entry = read_state(plan.run_dir)["stages"][S1]
    log = Path(entry["stderr"]).read_text()[-3000:] if Path(entry["stderr"]).exists() else ""
    assert state == "COMPLETED", f"{entry.get('error')}\n{log}"
    # SLURM itself ran the stage as two tasks
    steps = subprocess.run(["sacct", "-j", job.job_id, "-n", "-P", "-o", "JobID,NTasks"],
                           capture_output=True, text=True, timeout=10, check=True).stdout
    assert f"{job.job_id}.0|2" in steps.split(), steps

    sdir = plan.run_dir / S1
    report = json.loads((sdir / DDP_REPORT).read_text())
    assert report["world_size"] == 2 and report["backend"] == "gloo" and report["in_sync"]
    ranks = report["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    # what every rank held at the end is what rank 0 wrote to final.pt
    on_disk = weights_digest(load_checkpoint(sdir / "checkpoints" / "final.pt")["model"])
    assert [r["weights_sha256"] for r in ranks] == [on_disk, on_disk]
    # each rank trained on its own share of the epoch's patches (per-rank batch: 2 x 2 each)
    s0, s1 = (set(r["samples_last_epoch"]) for r in ranks)
    per_rank = plan.stage(S1).spec.iterations_per_epoch * plan.stage(S1).batch_size
    assert len(s0) == len(s1) == per_rank and not s0 & s1
    assert s0 | s1 == set(range(2 * per_rank))
    # rank 0 alone wrote the state and the metrics
    assert entry["state"] == "COMPLETED" and entry["attempts"] == 1
    # the job imported the run's code snapshot, not the checkout (launch/snapshot.py)
    code = plan.run_dir.resolve() / "code"
    assert entry["code"] == str(code) and (code / "orchestrator" / "launch" / "job.py").exists()
    assert read_state(plan.run_dir)["code"] == str(code)
    assert len((sdir / "metrics.csv").read_text().splitlines()) == 1 + plan.stage(S1).spec.max_epochs
