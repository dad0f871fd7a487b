"""`submit --folds K`: subject-level K-fold cross-validation as SLURM job arrays (issue 7)."""
from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest
from tiny_plans import quick_tiny_plan
from typer.testing import CliRunner
from waiting import wait_for

from orchestrator.atomic import atomic_write_text
from orchestrator.cli import app
from orchestrator.config import Plan, plan_to_yaml
from orchestrator.data.folds import make_folds
from orchestrator.errors import ConfigError
from orchestrator.launch.folds import submit_folds
from orchestrator.launch.sacct import sacct_states
from orchestrator.runs.state import read_state
from orchestrator.runs.status import collect_status

S1, S2 = "stage1_basic_cnn", "stage2_cnn_attention"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL"}


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Plan:
    # one CPU per job: the two folds of a stage run side by side on the 2-core node
    plan, _ = quick_tiny_plan(tmp_path_factory.mktemp("tpl"), tiny_data, cpus_per_task=1)
    return plan


def _fresh_run(template: Plan, runs_dir: Path, run: str = "cv") -> tuple[Plan, Path]:
    plan = template.model_copy(update={"run": run, "runs_dir": str(runs_dir.resolve())})
    path = plan.run_dir / "plan.yaml"
    atomic_write_text(path, plan_to_yaml(plan))
    return plan, path


def test_make_folds_is_deterministic_and_disjoint() -> None:
    subjects = [f"sub-{i:02d}" for i in range(10)]
    folds = make_folds(list(reversed(subjects)), 3, seed=1)
    assert folds == make_folds(subjects, 3, seed=1)
    assert sorted(len(f) for f in folds) == [3, 3, 4]
    assert sorted(s for f in folds for s in f) == subjects
    with pytest.raises(ConfigError, match="--folds 1: expected at least 2 folds"):
        make_folds(subjects, 1)
    with pytest.raises(ConfigError, match="--folds 11: only 10 subjects"):
        make_folds(subjects, 11)


def test_folds_dry_run_prints_the_arrays_and_writes_nothing(tmp_path: Path, template: Plan) -> None:
    plan, path = _fresh_run(template, tmp_path / "runs")
    res = CliRunner().invoke(app, ["submit", "--plan", str(path), "--folds", "2", "--no-lcnn",
                                   "--dry-run"])
    assert res.exit_code == 0, res.output
    assert res.output.count("array 0-1") == 4 and "aftercorr:<stage1_basic_cnn>" in res.output
    assert "fold 0 validates on sub-" in res.output and "fold 1 validates on sub-" in res.output
    assert sorted(p.name for p in plan.run_dir.iterdir()) == ["plan.yaml"]
    bad = CliRunner().invoke(app, ["submit", "--plan", str(path), "--folds", "5", "--dry-run"])
    assert bad.exit_code == 2 and "--folds 5: only 4 subjects" in bad.stderr, bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


@pytest.fixture
def restore_signals():
    """The debug executor runs jobs in this process: they install USR2/TERM handlers."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR2, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_resume_resubmits_only_the_unfinished_fold(tmp_path: Path, template: Plan,
                                                   restore_signals: None) -> None:
    plan, path = _fresh_run(template, tmp_path / "runs")
    submit_folds(plan, path, "debug", 2, only=[S1])
    fold0, fold1 = (plan.run_dir / "folds" / f"fold{k}" for k in (0, 1))
    (fold1 / S1 / "checkpoints" / "final.pt").unlink()  # fold 1 lost its final weights

    def shown() -> dict[str, str]:
        run = collect_status(tmp_path / "runs", "cv")["runs"][0]
        return {s["name"]: s["state"] for s in run["stages"] if s["state"] != "NOT_SUBMITTED"}

    assert shown() == {f"fold0/{S1}": "COMPLETED", f"fold1/{S1}": "FAILED"}
    res = CliRunner().invoke(app, ["resume", "cv", "--runs-dir", str(tmp_path / "runs")])
    assert res.exit_code == 0, res.output
    assert f"fold1/{S1}" in res.output and f"fold0/{S1}" not in res.output
    assert shown() == {f"fold0/{S1}": "COMPLETED", f"fold1/{S1}": "COMPLETED"}
    assert read_state(fold0)["stages"][S1]["attempts"] == 1
    assert read_state(fold1)["stages"][S1]["attempts"] == 2


def _wait_done(ids: list[str], timeout_s: float = 240) -> dict[str, str]:
    def ended() -> dict[str, str] | None:
        states = sacct_states(ids) or {}
        return states if all(states.get(i) in TERMINAL for i in ids) else None

    return wait_for(ended, timeout_s, f"array tasks {ids} to finish", every_s=1)


@pytest.mark.slurm
def test_two_folds_run_as_chained_job_arrays(tmp_path: Path, template: Plan) -> None:
    plan, path = _fresh_run(template, tmp_path / "runs")
    doc, rows = submit_folds(plan, path, "slurm", 2, only=[S1, S2])
    first, second = (r.job_id.split("_")[0] for r in rows)
    assert rows[1].depends_on == f"aftercorr:{first}"
    show = subprocess.run(["scontrol", "show", "job", second], capture_output=True, text=True,
                          timeout=10).stdout
    if "JobState=PENDING" in show:  # SLURM forgets a dependency once it is satisfied
        assert f"aftercorr:{first}" in show, show
    task = f"{second}_1"  # a waiting array shows in sacct as 12_[0-1]
    state = wait_for(lambda: (sacct_states([task]) or {}).get(task), 10, f"sacct to list {task}")
    assert state == "PENDING"
    ids = [f"{a}_{k}" for a in (first, second) for k in (0, 1)]
    states = _wait_done(ids)
    assert states == dict.fromkeys(ids, "COMPLETED"), states

    folds = json.loads((plan.run_dir / "folds.json").read_text())["folds"]
    assert folds == doc["folds"] and not set(folds[0]["val_subjects"]) & set(folds[1]["val_subjects"])
    for f in folds:  # each fold validated on its own subjects, and trained on the others
        split = json.loads((plan.run_dir / "folds" / f"fold{f['fold']}" / S1 / "split.json").read_text())
        assert sorted({s.split("/")[0] for s in split["val"]}) == f["val_subjects"]
        assert not {s.split("/")[0] for s in split["train"]} & set(f["val_subjects"])
        fold_state = json.loads((plan.run_dir / "folds" / f"fold{f['fold']}" / "state.json").read_text())
        assert fold_state["stages"][S2]["code"] == str(plan.run_dir.resolve() / "code")  # the run's snapshot
    run = collect_status(tmp_path / "runs", "cv", sacct_states)["runs"][0]
    assert run["folds"] == 2 and run["state"] == "COMPLETED", run
    shown = {(s["name"], s["job_id"]): s["state"] for s in run["stages"] if s["state"] != "NOT_SUBMITTED"}
    assert shown == {(f"fold{k}/{name}", f"{a}_{k}"): "COMPLETED"
                     for k in (0, 1) for name, a in ((S1, first), (S2, second))}
