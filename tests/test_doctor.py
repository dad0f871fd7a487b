"""`orchestrator doctor` on the local cluster: passes, and names the fix for what is wrong."""
from __future__ import annotations

from pathlib import Path

import pytest
from cli_runner import invoke
from typer.testing import Result

from orchestrator.config import resolve_cluster
from orchestrator.launch.doctor import sbatch_test_args

pytestmark = pytest.mark.slurm


def _doctor(*args: str) -> Result:
    return invoke("doctor", *args)


def test_doctor_passes_on_the_local_cluster(tiny_data: Path) -> None:
    p = _doctor("--cluster", "local-ddp", "--data", str(tiny_data))
    assert p.exit_code == 0, p.stdout + p.stderr
    lines = p.stdout.strip().splitlines()
    for name in ("profile", "setup lines", "venv", "sinfo", "partition", "sbatch --test-only"):
        assert any(line.startswith("ok") and f" {name}: " in line for line in lines), p.stdout
    (data,) = [line for line in lines if " data: " in line]
    assert data.startswith("note") and "orchestrator data cache" in data  # raw: say the cache


def test_doctor_names_the_fix_for_a_wrong_partition_and_a_missing_venv(tmp_path: Path) -> None:
    profile = tmp_path / "site.yaml"
    profile.write_text("name: site\nexecutor: slurm\npartition: gpu-nosuch\ngpus_per_node: 1\n"
                       "cpus_per_task: 1\nmem_gb: 1\nsetup:\n  - module load cuda || true\n"
                       "  - source .venv-missing/bin/activate\n")
    p = _doctor("--cluster", str(profile))
    assert p.exit_code == 2
    fixes = {line.split(":")[0].split(maxsplit=1)[1]: line for line in p.stdout.splitlines()
             if line.startswith("FIX")}
    assert set(fixes) == {"venv", "partition"}, p.stdout
    assert "gpu-nosuch" in fixes["partition"] and "fix: set `partition:`" in fixes["partition"]
    assert "debug" in fixes["partition"]  # the partitions there are
    assert ".venv-missing" in fixes["venv"] and "bash setup.sh" in fixes["venv"]
    assert "2 to fix" in p.stderr


def test_sbatch_request_from_the_profile() -> None:
    profile = resolve_cluster("generic-slurm")[0]
    args = sbatch_test_args(profile)
    assert "--partition=gpu" in args and "--gpus-per-node=1" in args and "--mem=65536M" in args
