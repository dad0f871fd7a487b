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


def test_doctor_says_in_one_line_when_the_shape_does_not_fit_the_partition(tmp_path: Path) -> None:
    """More nodes than the partition has, or more CPUs a node than any node has: one `nodes`
    line naming the request and what the partition has (sbatch --test-only would say only
    "Requested node configuration is not available")."""
    for shape in ("nodes: 9\n", "tasks_per_node: 4\ncpus_per_task: 16\n"):
        profile = tmp_path / "shape.yaml"
        profile.write_text(f"name: shape\nexecutor: slurm\nmem_gb: 1\n{shape}")
        p = _doctor("--cluster", str(profile))
        assert p.exit_code == 2, p.stdout
        fixes = [line for line in p.stdout.splitlines() if line.startswith("FIX")]
        assert len(fixes) == 1 and fixes[0].startswith("FIX  nodes: "), p.stdout
        assert f"{profile} asks" in fixes[0] and "CPUs, gres" in fixes[0] and "fix: set nodes:" in fixes[0]
        assert "sbatch --test-only" not in p.stdout  # it would only refuse the same shape
    p = _doctor("--cluster", "local-ddp")
    assert any(line.startswith("ok   nodes: 1 node(s) x 2 task(s)") for line in p.stdout.splitlines())
