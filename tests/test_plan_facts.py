"""A plan's probe and assumptions are typed, and plan.yaml files written before load."""
from __future__ import annotations

import json
from pathlib import Path

import yaml
from tiny_plans import quick_tiny_plan

from orchestrator.config import PlanAssumptions, ProbeRecord, load_plan, plan_to_yaml
from orchestrator.runs import state as run_state
from orchestrator.runs.state import StageState

# plan.yaml's `probe:` and `assumptions:` as `plan` wrote them when they were dicts
OLD_PROBE = {"gpus": [{"index": 0, "name": "NVIDIA A100-SXM4-40GB", "total_gb": 39.4,
                       "free_gb": 39.0, "bf16": True}],
             "host_total_gb": 503.1, "host_available_gb": 480.2, "cpus": 64,
             "slurm": {"SLURM_JOB_ID": "12"}, "gpu_error": None}
OLD_ASSUMPTIONS = {
    "budget_source": "--target-mem", "device_source": "NVIDIA A100-SXM4-40GB here",
    "val_volume_vox": [197, 233, 189],
    "overheads": {"alloc_fraction": 0.1, "workspace_gb": 0.5, "context_gb": 0.6},
    "cluster": {"file": "envs/clusters/local.yaml", "chosen_by": "the default",
                "set": ["executor", "name"]},
    "estimate": "peak live tensors of a real training step (optimizer state present) on fake tensors",
    "calibration": {"file": None, "hardware": "cuda:NVIDIA A100-SXM4-40GB", "applied": {},
                    "fingerprints": {"s1": "0123456789abcdef"},
                    "recorded": {"file": "/x/calibration.yaml", "stages": ["s1"]}},
    "dataset": {"root": "/data", "subjects": 4, "voxels": 1000}}


def test_an_old_plan_yaml_loads_typed_and_writes_back_the_same(tmp_path: Path) -> None:
    plan, _ = quick_tiny_plan(tmp_path / "runs", tmp_path)
    data = yaml.safe_load(plan_to_yaml(plan))
    data.update(probe=OLD_PROBE, assumptions=OLD_ASSUMPTIONS)
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    loaded = load_plan(path)
    assert isinstance(loaded.probe, ProbeRecord) and isinstance(loaded.assumptions, PlanAssumptions)
    assert loaded.probe.gpus[0].name == "NVIDIA A100-SXM4-40GB" and loaded.probe.cpus == 64
    assert loaded.assumptions.overheads.context_gb == 0.6
    assert loaded.assumptions.calibration.recorded.stages == ["s1"]
    again = yaml.safe_load(plan_to_yaml(loaded))
    assert again["probe"] == OLD_PROBE and again["assumptions"] == OLD_ASSUMPTIONS


def test_a_plan_whose_probe_did_not_record_bf16_still_loads(tmp_path: Path) -> None:
    plan, _ = quick_tiny_plan(tmp_path / "runs", tmp_path)
    data = yaml.safe_load(plan_to_yaml(plan))
    data.update(probe={**OLD_PROBE, "gpus": [{"name": "Tesla V100", "total_gb": 32.0,
                                              "free_gb": 31.0}]})
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    assert load_plan(path).probe.gpus[0].bf16 is None


def test_a_hand_made_plan_needs_no_probe_or_assumptions(tmp_path: Path) -> None:
    plan, _ = quick_tiny_plan(tmp_path / "runs", tmp_path)
    assert plan.probe.gpus_text() == "none (None)" and plan.assumptions.overheads is None
    assert yaml.safe_load(plan_to_yaml(plan))["assumptions"] == {}


def test_state_json_strings_are_stage_states(tmp_path: Path) -> None:
    """An existing state.json (bare strings) reads back as StageState, written the same."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "state.json").write_text(json.dumps(
        {"run": "run", "stages": {"s1": {"state": "COMPLETED"}, "s2": {"state": "TIMEOUT"}}}))
    entries = run_state.read_state(run_dir)["stages"]
    assert run_state.recorded_state(entries["s1"]) is StageState.COMPLETED
    assert run_state.recorded_state(entries["s2"]) is None  # SLURM's, not one recorded here
    assert entries["s1"]["state"] == StageState.COMPLETED == "COMPLETED"
    run_state.update_stage(run_dir, "s2", state=StageState.RUNNING)
    written = json.loads((run_dir / "state.json").read_text())["stages"]
    assert written["s2"]["state"] == "RUNNING" and written["s1"]["state"] == "COMPLETED"
    assert f"{StageState.FAILED:8}|" == "FAILED  |" and str(StageState.FAILED) == "FAILED"
