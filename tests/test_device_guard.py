"""A plan made for CUDA never trains on the CPU by itself (issue 27): `run-stage` where no
GPU is visible exits 2 with one line naming what the job sees and the fix; `--device cpu`
or the profile's `train_device: cpu` is the explicit way to run it on the CPU."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_plans import quick_tiny_plan
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.config import load_plan, plan_to_yaml
from orchestrator.runs import state as run_state

S1 = "stage1_basic_cnn"
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a visible GPU")


def _cuda_plan(tmp_path: Path, data: Path, **cluster: object) -> Path:
    plan, path = quick_tiny_plan(tmp_path / "runs", data, stage_updates={"max_epochs": 1},
                                 **cluster)
    path.write_text(plan_to_yaml(plan.model_copy(update={"device": "cuda"})))
    assert load_plan(path).device == "cuda"
    return path


@no_gpu
def test_a_cuda_plan_without_a_gpu_exits_2_naming_what_the_job_sees(
        tmp_path: Path, tiny_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _cuda_plan(tmp_path, tiny_data)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")  # a job whose GPU request was forgotten
    for var in ("SLURM_JOB_GPUS", "SLURM_GPUS_ON_NODE", "SLURM_STEP_GPUS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    res = CliRunner().invoke(app, ["run-stage", "--plan", str(path), "--stage", S1])
    assert res.exit_code == 2, res.output
    line = " ".join(res.stderr.split())
    assert len(res.stderr.strip().splitlines()) == 1 or "Traceback" not in res.stderr
    assert f"{S1}: the plan is for CUDA but no CUDA device is visible here" in line
    assert f"torch {torch.__version__}" in line
    assert ("CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}") in line
    assert "CUDA_VISIBLE_DEVICES=''" in line and "SLURM job 4242: no GPU in its GRES" in line
    assert "fix:" in line and "run-stage --device cpu" in line
    # it did not start: no checkpoint, and state.json does not say it ran
    assert not (path.parent / S1 / "checkpoints").exists()
    assert run_state.read_state(path.parent)["stages"].get(S1, {}).get("state") != run_state.RUNNING


@no_gpu
def test_the_job_s_gres_is_named(tmp_path: Path, tiny_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _cuda_plan(tmp_path, tiny_data)
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_JOB_GPUS", "0")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    res = CliRunner().invoke(app, ["run-stage", "--plan", str(path), "--stage", S1])
    assert res.exit_code == 2
    line = " ".join(res.stderr.split())
    assert "CUDA_VISIBLE_DEVICES=unset" in line and "SLURM job 7: SLURM_JOB_GPUS=0" in line


@no_gpu
def test_device_cpu_runs_a_cuda_plan_on_the_cpu(tmp_path: Path, tiny_data: Path) -> None:
    path = _cuda_plan(tmp_path, tiny_data)
    res = CliRunner().invoke(app, ["run-stage", "--plan", str(path), "--stage", S1, "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert (path.parent / S1 / "checkpoints" / "final.pt").is_file()
    assert json.loads((path.parent / "state.json").read_text())["stages"][S1]["state"] == "COMPLETED"


@no_gpu
def test_the_profile_s_train_device_cpu_runs_it_on_the_cpu(tmp_path: Path, tiny_data: Path) -> None:
    """What `submit` and `run-chain` start passes no --device: the profile says it."""
    from orchestrator.training.trainer import run_stage

    path = _cuda_plan(tmp_path, tiny_data, train_device="cpu")
    result = run_stage(path, S1, max_steps=1)
    assert result["interrupted"] and (path.parent / S1 / "checkpoints" / "last.pt").is_file()
