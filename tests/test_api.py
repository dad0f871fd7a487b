"""The Python API (`from orchestrator import plan, submit, status`) and the guide's
`create_auto_config(...).generate_complete_config(...)`: the same choices as the CLI."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO
from tiny_plans import one_stage_curriculum
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.config import Plan, load_plan
from orchestrator.errors import ConfigError

CHOICES = ("input_size", "base_filters", "batch_size", "gradient_checkpointing", "mixed_precision",
           "epochs", "iterations_per_epoch")


def test_import_orchestrator_does_not_import_torch() -> None:
    code = ("import sys, orchestrator; from orchestrator import auto_config; "
            "print(sorted(m for m in ('torch', 'monai', 'submitit') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_auto_config_returns_what_plan_chooses(tmp_path: Path, tiny_data: Path) -> None:
    """The guide's two lines and `orchestrator plan --device cuda --target-mem` on the same
    budget and the same dataset size (4 subjects of 32^3) choose the same for every stage."""
    from orchestrator.auto_config import create_auto_config

    cur = one_stage_curriculum(tmp_path)
    res = CliRunner().invoke(app, ["plan", "--device", "cuda", "--target-mem", "3", "--curriculum", str(cur),
                                   "--data", str(tiny_data), "--runs-dir", str(tmp_path / "runs"),
                                   "--run", "cli", "--json"])
    assert res.exit_code == 0, res.output
    cli = json.loads(res.stdout)
    config = create_auto_config(target_memory_gb=3, curriculum=cur).generate_complete_config(
        dataset_size=4, subject_shape_vox=(32, 32, 32))
    assert config["device"] == cli["device"] == "cuda" and config["target_memory_gb"] == 3
    assert config["order"] == [s["name"] for s in cli["stages"]]
    plan_yaml = load_plan(tmp_path / "runs" / "cli" / "plan.yaml")
    for st in plan_yaml.stages:
        ours = config["stages"][st.name]
        theirs = {"input_size": list(st.input_size_vox), "base_filters": st.base_filters,
                  "batch_size": st.batch_size, "gradient_checkpointing": st.checkpointing,
                  "mixed_precision": st.amp, "epochs": st.spec.max_epochs,
                  "iterations_per_epoch": st.spec.iterations_per_epoch}
        assert {k: ours[k] for k in CHOICES} == theirs
        assert "iterations_per_epoch" in " ".join(ours["reasons"])  # from the dataset, not the YAML
    assert not (tmp_path / "runs" / "auto-config").exists()  # the API call wrote nothing


def test_plan_submit_status_round_trip(tmp_path: Path, tiny_data: Path) -> None:
    """plan -> Plan written; submit --dry-run -> the jobs; status -> the rows `status --json` has."""
    from orchestrator import plan, status, submit

    cur = one_stage_curriculum(tmp_path)
    runs = tmp_path / "runs"
    p = plan(2.0, device="cpu", curriculum=cur, data=tiny_data, run="api", runs_dir=runs)
    assert isinstance(p, Plan) and (runs / "api" / "plan.yaml").exists()
    jobs = submit(p, executor="local", lcnn=False, dry_run=True)
    assert [j.stage for j in jobs] == ["stage1_basic_cnn"]
    rows = status("api", runs_dir=runs, slurm=False)
    assert [r["run"] for r in rows] == ["api"]
    assert [(s["name"], s["state"]) for s in rows[0]["stages"]] == [("stage1_basic_cnn", "NOT_SUBMITTED")]
    res = CliRunner().invoke(app, ["status", "api", "--runs-dir", str(runs), "--json"])
    assert json.loads(res.stdout)["runs"][0]["stages"][0]["name"] == "stage1_basic_cnn"


def test_api_errors_are_config_errors(tmp_path: Path) -> None:
    from orchestrator import plan, submit
    from orchestrator.auto_config import create_auto_config

    with pytest.raises(ConfigError, match="--device: expected auto, cuda or cpu"):
        plan(2.0, device="gpu", runs_dir=tmp_path)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="--executor: expected slurm, local or debug"):
        submit(tmp_path / "plan.yaml", executor="pbs")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="dataset_size: 0; expected at least 1"):
        create_auto_config(20).generate_complete_config(dataset_size=0)
