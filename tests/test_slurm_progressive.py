"""`sbatch slurm/progressive.sh`: the tiny curriculum inside one allocation (run-chain)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import REPO
from tiny_plans import quick_tiny_plan
from waiting import wait_for

from orchestrator.atomic import atomic_write_text
from orchestrator.config import plan_to_yaml
from orchestrator.launch.sacct import sacct_states
from orchestrator.runs.state import read_state
from orchestrator.runs.status import collect_status

pytestmark = pytest.mark.slurm
S2 = "stage2_cnn_attention"
STAGES = ["stage1_basic_cnn", S2, "stage3_hybrid_small", "stage4_hybrid_full"]


def _sbatch(tmp_path: Path, run: str) -> str:
    env = {**os.environ, "RUN": run, "RUNS_DIR": str(tmp_path / "runs"),
           "ORCH": f"{REPO}/.venv/bin/python -m orchestrator"}  # any command, not only a path
    out = subprocess.run(["sbatch", "--parsable", "--gpus=0", "--cpus-per-task=2", "--mem=4G",
                          "--time=15", f"--output={tmp_path}/progressive-%j.out",
                          "slurm/progressive.sh"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=30, check=True).stdout
    return out.strip().split(";")[0]


def _wait(cond, what: str, timeout_s: float = 300):
    return wait_for(cond, timeout_s, what)


def _ended(job: str) -> str | None:
    state = (sacct_states([job]) or {}).get(job)
    return state if state in {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"} else None


def test_requeued_chain_resumes_and_completes_every_stage(tmp_path: Path, tiny_data: Path) -> None:
    plan, path = quick_tiny_plan(tmp_path / "runs", tiny_data, run="prog")
    longer = plan.stage(S2).model_copy(update={"spec": plan.stage(S2).spec.model_copy(
        update={"iterations_per_epoch": 12})})  # long enough to requeue it while it runs
    plan = plan.model_copy(update={"stages": [longer if s.name == S2 else s for s in plan.stages]})
    atomic_write_text(path, plan_to_yaml(plan))
    job = _sbatch(tmp_path, "prog")
    last = plan.run_dir / S2 / "checkpoints" / "last.pt"
    _wait(lambda: last.exists() and _ended(job) is None, f"{S2} to write last.pt while running")
    subprocess.run(["scontrol", "requeue", job], check=True, timeout=10)
    state = _wait(lambda: _ended(job), "the requeued job to finish", 420)
    log = "\n".join(p.read_text() for p in sorted(tmp_path.glob("progressive-*.out")))
    assert state == "COMPLETED", log[-3000:]
    assert "all stages complete" in log.strip().splitlines()[-1]
    run = collect_status(tmp_path / "runs", "prog", sacct_states)["runs"][0]
    rows = {s["name"]: s for s in run["stages"]}
    assert [n for n in STAGES if rows[n]["state"] == "COMPLETED"] == STAGES, run
    assert rows["lcnn"]["state"] == "NOT_SUBMITTED"  # LCNN=0 leaves the LCNN run out
    assert rows[S2]["requeues"] == 1 and rows[S2]["attempts"] == 2, rows[S2]
    assert read_state(plan.run_dir)["stages"][S2]["start"].startswith("resumed from"), log[-3000:]
    assert sum(r["requeues"] for r in rows.values()) == 1
    assert (plan.run_dir / "code" / "orchestrator").is_dir()  # the stages ran from the snapshot
    assert (plan.run_dir / "stage4_hybrid_full" / "handoff.json").exists()


def test_failed_stage_ends_the_job_naming_stage_and_log(tmp_path: Path, tiny_data: Path) -> None:
    empty = tmp_path / "no-subjects"
    empty.mkdir()
    quick_tiny_plan(tmp_path / "runs", empty, run="bad")
    job = _sbatch(tmp_path, "bad")
    assert _wait(lambda: _ended(job), "the job to end") == "FAILED"
    text = next(tmp_path.glob("progressive-*.out")).read_text()
    last = text.strip().splitlines()[-1]
    assert "stage stage1_basic_cnn failed" in last, text[-2000:]
    stage_log = Path(last.split("log: ")[1].split(";")[0])
    assert stage_log.is_file() and "no-subjects" in stage_log.read_text(), last
    st = read_state(tmp_path / "runs" / "bad")["stages"]
    assert st["stage1_basic_cnn"]["state"] == "FAILED"
    assert st[S2]["state"] == "CANCELLED"
