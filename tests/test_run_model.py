"""The run's model (issue 14, part 2): runs/<run>/best.pt is the best validated epoch over
all stages, survives a requeue, is what `evaluate --run`/`predict --run` use, and `status`
says when a stage ended below the run it started from."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from cli_runner import invoke
from tiny_plans import quick_tiny_plan

from orchestrator.atomic import atomic_write_text
from orchestrator.config import plan_to_yaml
from orchestrator.errors import ConfigError
from orchestrator.runs import state as run_state
from orchestrator.runs.status import collect_status
from orchestrator.training.checkpoints import load_checkpoint
from orchestrator.training.run_model import RunModel, run_model_file
from orchestrator.training.run_report import build_report
from orchestrator.training.trainer import run_stage

S1, S2 = "stage1_basic_cnn", "stage2_cnn_attention"
PREDICTED_GB = [0.5, 0.6, 0.7, 0.8, 0.9]  # the tiny curriculum's 4 stages and its LCNN run


def _dices(run_dir: Path, stage: str) -> list[tuple[int, float]]:
    with open(run_dir / stage / "metrics.csv", newline="") as fh:
        return [(int(r["epoch"]), float(r["val_dice"])) for r in csv.DictReader(fh)]


@pytest.fixture(scope="module")
def two_stages(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Path:
    """Stage 1, then stage 2 interrupted after one step and resumed (a requeue): the run dir."""
    runs = tmp_path_factory.mktemp("runmodel") / "runs"
    plan, path = quick_tiny_plan(runs, tiny_data, stage_updates={"max_epochs": 2})
    stages = [s.model_copy(update={"predicted_gb": PREDICTED_GB[i]}) for i, s in enumerate(plan.stages)]
    plan = plan.model_copy(update={"stages": stages})  # the report draws the plan's predictions
    atomic_write_text(path, plan_to_yaml(plan))
    run_stage(path, S1)
    after_s1 = run_state.read_state(plan.run_dir)["model"]
    stopped = run_stage(path, S2, max_steps=1)  # global step 1 of 4: before any validation
    assert stopped["interrupted"]
    assert run_state.read_state(plan.run_dir)["model"] == after_s1  # kept across the stop
    assert load_checkpoint(plan.run_dir / "best.pt")["run_model"]["stage"] == S1
    run_stage(path, S2)  # the requeue resumes from last.pt
    return plan.run_dir


def test_run_model_is_the_best_epoch_over_all_stages(two_stages: Path) -> None:
    run_dir = two_stages
    epochs = [(stage, epoch, dice) for stage in (S1, S2) for epoch, dice in _dices(run_dir, stage)]
    assert [(s, e) for s, e, _ in epochs] == [(S1, 1), (S1, 2), (S2, 0), (S2, 1), (S2, 2)]  # 0: the hand-off
    best = max(d for _, _, d in epochs)
    first = next((s, e) for s, e, d in epochs if d == best)  # a later tie does not replace it
    model = run_state.read_state(run_dir)["model"]
    assert (model["stage"], model["epoch"], model["dice"]) == (*first, best)
    assert model["path"] == str(run_dir / "best.pt")
    ckpt = torch.load(run_dir / "best.pt", map_location="cpu", weights_only=True)  # plain data
    assert ckpt["stage"] == first[0] and ckpt["run_model"] == {"stage": first[0], "epoch": first[1],
                                                               "dice": best}
    stage_best = load_checkpoint(run_dir / first[0] / "checkpoints" / "best.pt")
    assert all(torch.equal(ckpt["model"][k], v) for k, v in stage_best["model"].items())
    s2 = run_state.read_state(run_dir)["stages"][S2]  # what status compares stage 2 with
    s1_best = max(d for _, d in _dices(run_dir, S1))
    assert s2["run_model_before"]["stage"] == S1 and s2["run_model_before"]["dice"] == s1_best


def test_a_lost_record_is_repaired_from_the_file(two_stages: Path, tmp_path: Path) -> None:
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(two_stages, run_dir)
    model = run_state.read_state(run_dir)["model"]
    state = json.loads((run_dir / "state.json").read_text())
    del state["model"]  # a kill between best.pt and its record
    (run_dir / "state.json").write_text(json.dumps(state))
    repaired = RunModel(run_dir)
    assert repaired.dice == model["dice"] and repaired.record["stage"] == model["stage"]
    assert run_state.read_state(run_dir)["model"]["dice"] == model["dice"]
    assert not repaired.offer("x", 1, model["dice"], dict)  # a tie is no better


def test_evaluate_and_predict_take_the_run(two_stages: Path, tiny_data: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from orchestrator.cli import app

    runs = two_stages.parent
    res = CliRunner().invoke(app, ["evaluate", "--run", "tiny", "--runs-dir", str(runs), "--data",
                                   str(tiny_data), "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert Path(report["out_dir"]) == (two_stages / "eval").resolve()
    assert report["stage"] == run_state.read_state(two_stages)["model"]["stage"]
    image = next(tiny_data.glob("Training/*/sub-*/ses-*/anat/*_T1w.nii.gz"))
    res = CliRunner().invoke(app, ["predict", "--run", "tiny", "--runs-dir", str(runs), "--input",
                                   str(image), "--out", str(tmp_path / "mask.nii.gz"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "mask.nii.gz").exists()
    res = invoke("predict", "--run", "nosuch", "--runs-dir", str(runs), "--input", str(image))
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1
    assert "no such run" in res.stderr and "Traceback" not in res.stderr


def test_run_option_errors(tmp_path: Path) -> None:
    from orchestrator.cli.results import _one_source

    with pytest.raises(ConfigError, match="--checkpoint/--run: expected one of them"):
        _one_source(None, None)
    with pytest.raises(ConfigError, match="--checkpoint/--run: expected one of them"):
        _one_source(tmp_path / "x.pt", "r")
    (tmp_path / "r").mkdir()
    with pytest.raises(ConfigError, match=r"--run r: .*best\.pt does not exist yet"):
        run_model_file(tmp_path / "r")


def test_status_marks_a_stage_that_ended_below_the_run(two_stages: Path, tmp_path: Path) -> None:
    import shutil

    runs = tmp_path / "runs"
    shutil.copytree(two_stages, runs / "tiny")
    model = run_state.read_state(runs / "tiny")["model"]
    higher = {**model, "dice": model["dice"] + 0.5}  # as if the run was better before stage 2
    run_state.update_stage(runs / "tiny", S2, run_model_before=higher)
    row = {s["name"]: s for s in collect_status(runs, "tiny")["runs"][0]["stages"]}
    assert row[S2]["below_run_model"] and not row[S1]["below_run_model"]
    from typer.testing import CliRunner

    from orchestrator.cli import app

    res = CliRunner().invoke(app, ["status", "tiny", "--runs-dir", str(runs)])
    assert res.exit_code == 0, res.output
    assert f"run model: {model['stage']} epoch {model['epoch']}" in res.stdout
    assert f"{S2} ended below the run's model it started from" in res.stdout
    doc = json.loads(CliRunner().invoke(app, ["status", "tiny", "--runs-dir", str(runs), "--json"]).stdout)
    assert doc["runs"][0]["model"]["dice"] == model["dice"]


def test_report_draws_curves_handoffs_memory_and_the_models_overlay(two_stages: Path) -> None:
    from typer.testing import CliRunner

    from orchestrator.cli import app

    res = CliRunner().invoke(app, ["report", "tiny", "--runs-dir", str(two_stages.parent),
                                   "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["path"] == str(two_stages / "report.png")
    assert (two_stages / "report.png").read_bytes()[:4] == b"\x89PNG"
    rep = build_report(two_stages, "cpu")
    assert sorted(rep.axes) == ["curves", "memory", "overlay"]
    curves = rep.axes["curves"]
    dice = {ln.get_label(): ln for ln in curves.get_lines() if ln.get_label().endswith("val Dice")}
    assert sorted(dice) == [f"{S1} val Dice", f"{S2} val Dice"]
    for stage, offset in ((S1, 0), (S2, 2)):  # stage 2 goes on where stage 1 ended, its
        epochs = _dices(two_stages, stage)  # epoch-0 row (the handed-off model) on the hand-off
        assert list(dice[f"{stage} val Dice"].get_xdata()) == [offset + e for e, _ in epochs]
        assert list(dice[f"{stage} val Dice"].get_ydata()) == [d for _, d in epochs]
    handoffs = [ln for ln in curves.get_lines() if ln.get_linestyle() == ":"]
    assert [list(ln.get_xdata()) for ln in handoffs] == [[2, 2]]  # one hand-off, after epoch 2
    twin = [ax for ax in rep.figure.axes if ax is not curves and ax.get_shared_x_axes().joined(ax, curves)]
    losses = [ln.get_label() for ax in twin for ln in ax.get_lines()]
    assert losses == [f"{S1} train loss", f"{S2} train loss"]
    model = run_state.read_state(two_stages)["model"]
    star = next(ln for ln in curves.get_lines() if ln.get_label() == "run's model")
    offset = 0 if model["stage"] == S1 else 2
    assert (star.get_xdata()[0], star.get_ydata()[0]) == (offset + model["epoch"], model["dice"])
    bars = rep.axes["memory"].patches
    assert [b.get_height() for b in bars[:5]] == PREDICTED_GB  # predicted, then measured
    measured = [b.get_height() for b in bars[5:]]
    assert measured[0] > 0 and measured[1] > 0 and measured[2:] == [0.0, 0.0, 0.0]  # not run
    (image,) = rep.axes["overlay"].get_images()
    assert image.get_array().shape == (32, 32)
    split = json.loads((two_stages / model["stage"] / "split.json").read_text())
    assert rep.data["overlay"]["subject"] == split["val"][0]
