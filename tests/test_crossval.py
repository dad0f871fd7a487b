"""Cross-validation as people use it: status and `evaluate --run` summarise the folds (mean ±
std), `predict --run` ensembles the folds' models (mean of softmax)."""
from __future__ import annotations

import json
import signal
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from cli_runner import invoke
from rich.console import Console
from tiny_plans import quick_tiny_plan
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.cli.render import cv_table
from orchestrator.errors import CheckpointError, ConfigError
from orchestrator.launch.folds import submit_folds
from orchestrator.runs.cv_summary import mean_std
from orchestrator.runs.status import collect_status
from orchestrator.training.crossval import FoldEnsemble, evaluate_folds, fold_models, load_fold_ensemble

S1 = "stage1_basic_cnn"


@pytest.fixture(scope="module")
def cv_run(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Path:
    """A 2-fold run of stage 1 (debug executor: in this process), as `submit --folds 2` makes it."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR2, signal.SIGTERM)}
    runs = tmp_path_factory.mktemp("cv") / "runs"
    plan, path = quick_tiny_plan(runs, tiny_data, run="cv")
    submit_folds(plan, path, "debug", 2, only=[S1])
    for sig, handler in saved.items():
        signal.signal(sig, handler)
    return plan.run_dir


def test_mean_std() -> None:
    assert mean_std([0.5, 0.7, float("nan"), None]) == {"mean": 0.6, "std": 0.1, "n": 2}
    assert mean_std([]) == {"mean": None, "std": None, "n": 0}


def test_status_summarises_the_folds(cv_run: Path) -> None:
    run = collect_status(cv_run.parent, "cv")["runs"][0]
    dices = [s["best_dice"] for s in run["stages"] if s.get("fold") is not None and s["name"].endswith(S1)]
    assert len(dices) == 2
    assert run["cv"][S1] == {"best_dice": mean_std(dices), "completed": 2, "folds": 2}
    res = CliRunner().invoke(app, ["status", "cv", "--runs-dir", str(cv_run.parent)])
    assert res.exit_code == 0 and f"{S1}: best Dice {mean_std(dices)['mean']:.3f} ± " in res.output


def test_evaluate_run_scores_each_fold_on_its_own_subjects(cv_run: Path) -> None:
    res = CliRunner().invoke(app, ["evaluate", "--run", "cv", "--runs-dir", str(cv_run.parent),
                                   "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    folds = json.loads((cv_run / "folds.json").read_text())["folds"]
    assert [f["subjects"] for f in report["folds"]] == [f["val_subjects"] for f in folds]
    dice_means = [f["metrics"]["dice"]["mean"] for f in report["folds"]]
    assert report["summary"]["dice"] == mean_std(dice_means)
    assert {"iou", "lesion_f1", "abs_volume_diff_vox"} <= set(report["summary"])
    on_disk = json.loads((cv_run / "eval" / "cv_report.json").read_text())
    assert on_disk["summary"] == report["summary"]
    assert (cv_run / "eval" / "fold1" / "report.json").exists()
    shown = Console(width=200, record=True)
    cv_table(shown, on_disk)
    text = shown.export_text()
    assert "mean ± std" in text and f"{report['summary']['dice']['mean']:.4g} ± " in text


def test_predict_run_is_the_mean_of_the_folds_softmax(cv_run: Path, tiny_data: Path,
                                                      tmp_path: Path) -> None:
    ensemble = load_fold_ensemble(cv_run, "cpu")
    members = list(ensemble.model.members)
    assert len(members) == 2 and ensemble.checkpoint["folds"] == [  # each fold's run model
        str(cv_run / "folds" / f"fold{k}" / "best.pt") for k in (0, 1)]
    assert [str(p) for p in fold_models(cv_run)] == ensemble.checkpoint["folds"]
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        want = (torch.softmax(members[0](x), 1) + torch.softmax(members[1](x), 1)) / 2
        torch.testing.assert_close(ensemble.model(x), want)
    image = sorted(tiny_data.rglob("*_T1w.nii.gz"))[0]
    out = tmp_path / "mask.nii.gz"
    res = CliRunner().invoke(app, ["predict", "--run", "cv", "--runs-dir", str(cv_run.parent),
                                   "--input", str(image), "--out", str(out), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    mask = np.asarray(nib.load(out).dataobj)
    assert mask.shape == nib.load(image).shape and set(np.unique(mask)) <= {0, 1}


def test_fold_ensemble_of_hand_made_members() -> None:
    a, b = torch.nn.Identity(), torch.nn.Identity()
    logits_a = torch.tensor([[[2.0], [0.0]]])  # (B=1, C=2, 1)
    ens = FoldEnsemble([a, b])
    p = torch.softmax(logits_a, 1)
    torch.testing.assert_close(ens(logits_a), p)


def test_errors_name_what_is_missing(tmp_path: Path, cv_run: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(ConfigError, match="not a cross-validation run"):
        evaluate_folds(plain)
    with pytest.raises(CheckpointError, match="fold0, fold1 has no best.pt or final.pt of stage2"):
        fold_models(cv_run, stage="stage2_cnn_attention")
    with pytest.raises(ConfigError, match="no stage 'stage9'"):
        fold_models(cv_run, stage="stage9")
    res = invoke("predict", "--input", "x.nii.gz")
    assert res.exit_code == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip() == ("error: --checkpoint/--run: expected one of them (a checkpoint "
                                  "file, or a run whose model, runs/RUN/best.pt, to use)")
