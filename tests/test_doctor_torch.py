"""`doctor` flags a CPU-only torch for a profile with GPUs (issue 27), from a machine
without a GPU: a real venv (this one), its real torch, no SLURM needed."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from orchestrator.launch.doctor import run_doctor

cpu_torch = pytest.mark.skipif(torch.version.cuda is not None, reason="needs a CPU-only torch")


def _profile(tmp_path: Path, gpus: str) -> Path:
    path = tmp_path / "site.yaml"
    path.write_text(f"name: site\nexecutor: local\n{gpus}\nsetup:\n  - source .venv/bin/activate\n")
    return path


@cpu_torch
def test_doctor_flags_a_cpu_only_torch_for_a_gpu_profile(tmp_path: Path) -> None:
    for gpus in ("gpus_per_node: 1", "gres: gpu:a100:2"):
        checks = {c.name: c for c in run_doctor(str(_profile(tmp_path, gpus)))}
        assert checks["venv"].ok
        build = checks["torch build"]
        assert not build.ok and "CPU-only build" in build.line() and torch.__version__ in build.line()
        assert "asks for GPUs" in build.line() and "TORCH_SPEC=torch bash setup.sh" in build.fix


@cpu_torch
def test_a_cpu_profile_with_a_cpu_torch_is_fine(tmp_path: Path) -> None:
    checks = {c.name: c for c in run_doctor(str(_profile(tmp_path, "gpus_per_node: 0")))}
    assert checks["torch build"].ok and "CPU-only build" in checks["torch build"].detail
