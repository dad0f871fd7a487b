"""`sbatch slurm/progressive.sh`: the whole tiny curriculum inside one allocation."""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from conftest import REPO, TINY_CURRICULUM

from orchestrator.launch.sacct import sacct_states
from orchestrator.runs.status import collect_status

pytestmark = pytest.mark.slurm


def test_progressive_sh_runs_every_stage_in_one_job(tmp_path: Path, tiny_data: Path) -> None:
    env = {**os.environ, "RUN": "prog", "RUNS_DIR": str(tmp_path / "runs"), "DATA": str(tiny_data),
           "CURRICULUM": str(TINY_CURRICULUM), "TARGET_MEM": "2"}
    out = subprocess.run(["sbatch", "--parsable", "--gpus=0", "--cpus-per-task=2", "--mem=4G",
                          "--time=15", f"--output={tmp_path}/progressive-%j.out",
                          "slurm/progressive.sh"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=30, check=True).stdout
    job = out.strip().split(";")[0]
    deadline = time.monotonic() + 420
    while time.monotonic() < deadline:
        state = (sacct_states([job]) or {}).get(job)
        if state in {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}:
            break
        time.sleep(2)
    log = next(tmp_path.glob("progressive-*.out")).read_text()
    assert state == "COMPLETED", log[-3000:]
    assert "all stages complete" in log
    run = collect_status(tmp_path / "runs", "prog")["runs"][0]
    done = [s["name"] for s in run["stages"] if s["state"] == "COMPLETED"]
    assert done == ["stage1_basic_cnn", "stage2_cnn_attention", "stage3_hybrid_small",
                    "stage4_hybrid_full"]  # LCNN=0: the LCNN run is left out
    assert (tmp_path / "runs" / "prog" / "stage4_hybrid_full" / "handoff.json").exists()
