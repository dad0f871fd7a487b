"""The curriculum on the real local SLURM: one job per stage, chained afterok, all COMPLETED,
and `status --json` agreeing with sacct."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from cli_runner import invoke
from conftest import make_tiny_plan
from waiting import wait_for

from orchestrator.launch.sacct import sacct_states
from orchestrator.launch.submit import submit_plan

pytestmark = pytest.mark.slurm
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL"}


def _wait_all(job_ids: list[str], timeout_s: float = 480) -> dict[str, str]:
    def ended() -> dict[str, str] | None:
        states = sacct_states(job_ids) or {}
        done = len(states) == len(job_ids) and all(s in TERMINAL for s in states.values())
        return states if done else None

    return wait_for(ended, timeout_s, f"jobs {job_ids} to finish", every_s=2)


def test_slurm_chain_afterok_completes_and_status_agrees(tmp_path: Path, tiny_data: Path) -> None:
    plan, plan_path = make_tiny_plan(tmp_path / "runs", tiny_data)
    jobs = submit_plan(plan, plan_path, "slurm", include_lcnn=False)
    ids = [j.job_id for j in jobs]
    assert len(set(ids)) == 4
    # each stage depends on the one before, as SLURM itself records it
    for prev, job in zip(jobs, jobs[1:]):
        assert job.depends_on == prev.job_id
        show = subprocess.run(["scontrol", "show", "job", job.job_id], capture_output=True,
                              text=True, timeout=10).stdout
        if "JobState=PENDING" in show:  # scontrol forgets the dependency once it is satisfied
            assert f"afterok:{prev.job_id}" in show, show
    states = _wait_all(ids)
    assert states == dict.fromkeys(ids, "COMPLETED"), states
    rows = subprocess.run(["sacct", "-j", ",".join(ids), "-X", "-n", "-P", "-o", "JobID,Start,End"],
                          capture_output=True, text=True, timeout=10).stdout.split()
    times = {r.split("|")[0]: r.split("|")[1:] for r in rows}
    for prev, nxt in zip(ids, ids[1:]):
        assert times[nxt][0] >= times[prev][1], "a stage started before its parent ended"
    res = invoke("status", plan.run, "--runs-dir", str(plan.run_dir.parent), "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["slurm"] == "ok"
    run = doc["runs"][0]
    assert run["state"] == "COMPLETED"
    assert run["stages"][4]["state"] == "NOT_SUBMITTED"  # the LCNN run was left out
    for stage, job_id in zip(run["stages"], ids):
        assert stage["job_id"] == job_id
        assert stage["slurm_state"] == states[job_id] == "COMPLETED"
        assert stage["state"] == "COMPLETED"
        assert Path(plan.run_dir / stage["name"] / "checkpoints" / "final.pt").exists()
