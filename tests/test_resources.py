"""Per-stage job resources from the cluster profile, and where each value came from (issue 7)."""
from __future__ import annotations

from pathlib import Path

import pytest
from conftest import make_tiny_plan, replaced
from typer.testing import CliRunner

from orchestrator.atomic import atomic_write_text
from orchestrator.cli import app
from orchestrator.config import DEFAULT_TIME_MIN, load_plan, plan_to_yaml
from orchestrator.errors import ConfigError
from orchestrator.launch.submit import job_parameters
from orchestrator.planning.resources import stage_resources
from orchestrator.planning.schedule import job_time_min

S1, S4 = "stage1_basic_cnn", "stage4_hybrid_full"
PROFILE = f"""name: site
executor: slurm
partition: gpu
mem_gb: 32
stages:
  {S4}: {{time_min: 240, partition: bigmem, mem_gb: 96}}
"""


def _profile(tmp_path: Path, text: str = PROFILE) -> Path:
    path = tmp_path / "site.yaml"
    path.write_text(text)
    return path


def test_stage_entry_over_profile_over_estimate_over_default(tmp_path: Path, tiny_data: Path) -> None:
    prof = _profile(tmp_path)
    plan, path = make_tiny_plan(tmp_path / "runs", tiny_data, cluster=str(prof))
    where = str(prof.resolve())
    s4 = stage_resources(plan, plan.stage(S4))
    assert (s4["time_min"].value, s4["time_min"].source) == (240, f"{where}: stages.{S4}.time_min")
    assert (s4["partition"].value, s4["mem_gb"].value) == ("bigmem", 96)
    s1 = stage_resources(plan, plan.stage(S1))
    assert (s1["partition"].value, s1["partition"].source) == ("gpu", f"{where}: partition")
    assert (s1["mem_gb"].value, s1["mem_gb"].source) == (32, f"{where}: mem_gb")
    assert (s1["cpus_per_task"].value, s1["cpus_per_task"].source) == (2, "default")
    assert s1["time_min"].value == DEFAULT_TIME_MIN and s1["time_min"].source.startswith("default")
    # a verified plan's step time sets the stages the profile gives no time
    minutes, _ = job_time_min(plan.stage(S1).spec, 0.8)
    timed = plan.model_copy(update={"stages": [
        s.model_copy(update={"time_estimate_min": minutes}) for s in plan.stages]})
    s1 = stage_resources(timed, timed.stage(S1))
    assert s1["time_min"].value == minutes and s1["time_min"].source.startswith("plan estimate")
    assert stage_resources(timed, timed.stage(S4))["time_min"].value == 240
    params = job_parameters(timed, timed.stage(S4), "slurm", "12")
    assert (params["timeout_min"], params["slurm_partition"], params["mem_gb"]) == (240, "bigmem", 96)
    assert params["slurm_additional_parameters"]["dependency"] == "afterok:12"
    # the plan file keeps what the profile set, so a reloaded plan reports the same sources
    atomic_write_text(path, plan_to_yaml(timed))
    again = load_plan(path)
    assert stage_resources(again, again.stage(S1))["cpus_per_task"].source == "default"


def test_job_time_by_hand() -> None:
    from orchestrator.config import StageSpec

    spec = StageSpec(name="s", model={"arch": "resunet3d"}, input_size_vox=(32, 32, 32),
                     max_epochs=10, iterations_per_epoch=100)
    # 1000 steps x 1.2 s x 1.15 x 1.3 = 1794 s = 29.9 min -> 30 (whole 5 minutes)
    assert job_time_min(spec, 1.2)[0] == 30
    assert job_time_min(spec, 0.01)[0] == 10  # never below 10 minutes


def test_dry_run_prints_where_each_value_came_from(tmp_path: Path, tiny_data: Path) -> None:
    prof = _profile(tmp_path)
    plan, path = make_tiny_plan(tmp_path / "runs", tiny_data, cluster=str(prof))
    res = CliRunner().invoke(app, ["submit", "--plan", str(path), "--executor", "slurm", "--dry-run",
                                   "--no-lcnn"])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert f"{S4}: time_min 240 ({prof.resolve()}: stages.{S4}.time_min)" in text
    assert f"{S1}: time_min {DEFAULT_TIME_MIN} (default" in text
    assert "cpus_per_task 2 (default)" in text
    assert not (plan.run_dir / "state.json").exists()  # a dry run submits and records nothing


def test_profile_stage_entry_must_name_a_stage(tmp_path: Path, tiny_data: Path) -> None:
    prof = _profile(tmp_path, replaced(PROFILE, S4, "stage9"))
    with pytest.raises(ConfigError, match=r"site\.yaml: stages\.stage9: no stage 'stage9' in the "
                                          r"curriculum; expected one of stage1_basic_cnn"):
        make_tiny_plan(tmp_path / "runs", tiny_data, cluster=str(prof))
