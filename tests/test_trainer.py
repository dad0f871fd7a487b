"""The trainer: checkpoints and metrics on disk, and a resumed run equals an uninterrupted one."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_plan

from orchestrator.errors import CheckpointError
from orchestrator.runs.state import read_state
from orchestrator.training.checkpoints import load_checkpoint
from orchestrator.training.trainer import run_stage


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def test_stage_writes_checkpoints_metrics_and_state(tmp_path: Path, tiny_data: Path) -> None:
    plan, plan_path = make_tiny_plan(tmp_path / "runs", tiny_data)
    res = run_stage(plan_path, "stage1_basic_cnn")
    sd = plan.run_dir / "stage1_basic_cnn"
    for name in ("last.pt", "best.pt", "final.pt"):
        assert (sd / "checkpoints" / name).exists()
    rows = (sd / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,train_loss,lr,val_dice,val_iou") and len(rows) == 2
    row = dict(zip(rows[0].split(","), rows[1].split(",")))
    val_dice, iou = float(row["val_dice"]), float(row["val_iou"])  # one epoch: the best is its Dice
    assert 0.0 <= val_dice <= 1.0 and res["best_dice"] == pytest.approx(val_dice, abs=1e-4)
    assert 0.0 <= iou <= val_dice  # IoU <= Dice on every subject, so on their means too
    st = read_state(plan.run_dir)["stages"]["stage1_basic_cnn"]
    assert st["state"] == "COMPLETED" and st["attempts"] == 1 and st["epoch"] == 1
    assert json.loads((sd / "memory_usage.json").read_text())["epochs"][0]["peak_mem_gb"] > 0
    assert not list((sd / "checkpoints").glob(".tmp-*"))  # atomic writes leave no temp files


def test_resume_is_bit_identical(tmp_path: Path, tiny_data: Path) -> None:
    """N steps in one go == k steps, stop (last.pt), resume to N (2 epochs of 2 steps)."""
    over = {"max_epochs": 2}  # two epochs, so the stop falls inside the second
    plan_a, path_a = make_tiny_plan(tmp_path / "a", tiny_data, stage_updates=over)
    plan_b, path_b = make_tiny_plan(tmp_path / "b", tiny_data, stage_updates=over)
    run_stage(path_a, "stage1_basic_cnn")
    stopped = run_stage(path_b, "stage1_basic_cnn", max_steps=3)  # epoch 1, step 1
    assert stopped["final"] is None
    resumed = run_stage(path_b, "stage1_basic_cnn")
    assert resumed["start"].startswith("resumed from")
    a = _weights(plan_a.run_dir / "stage1_basic_cnn" / "checkpoints" / "final.pt")
    b = _weights(plan_b.run_dir / "stage1_basic_cnn" / "checkpoints" / "final.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ma = (plan_a.run_dir / "stage1_basic_cnn" / "metrics.csv").read_text().splitlines()
    mb = (plan_b.run_dir / "stage1_basic_cnn" / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[:4] for r in ma] == [r.split(",")[:4] for r in mb]  # epoch, loss, lr, dice


def test_handoff_writes_report_and_stage_starts_from_previous(tmp_path: Path, tiny_data: Path) -> None:
    plan, plan_path = make_tiny_plan(tmp_path / "runs", tiny_data)
    run_stage(plan_path, "stage1_basic_cnn")
    res = run_stage(plan_path, "stage2_cnn_attention")
    assert res["start"].startswith("hand-off from stage1_basic_cnn")
    report = json.loads((plan.run_dir / "stage2_cnn_attention" / "handoff.json").read_text())
    assert report["from"] == "stage1_basic_cnn"
    new_keys = set(_weights(plan.run_dir / "stage2_cnn_attention" / "checkpoints" / "final.pt"))
    assert set(report["tensors"]) == new_keys
    assert report["counts"]["copied"] > 0 and report["counts"]["new"] > 0


def test_truncated_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    p = tmp_path / "last.pt"
    torch.save({"model": {}, "arch": "resunet3d"}, p)
    p.write_bytes(p.read_bytes()[:40])
    with pytest.raises(CheckpointError, match=r"last\.pt: unreadable checkpoint"):
        load_checkpoint(p)


def test_lcnn_stage_trains_on_slice_stacks(tmp_path: Path, tiny_data: Path) -> None:
    plan, plan_path = make_tiny_plan(tmp_path / "runs", tiny_data)
    sp = plan.stage("lcnn")
    assert sp.kind == "lcnn" and sp.init_from is None and tuple(sp.input_size_vox) == (64, 64)
    res = run_stage(plan_path, "lcnn")
    ckpt = load_checkpoint(Path(res["final"]))
    assert ckpt["arch"] == "lcnn" and ckpt["model_kwargs"]["in_slices"] == 3
    row = (plan.run_dir / "lcnn" / "metrics.csv").read_text().splitlines()[1].split(",")
    val_dice = float(row[3])  # val Dice over whole volumes, slice by slice
    assert 0.0 <= val_dice <= 1.0 and res["best_dice"] == pytest.approx(val_dice, abs=1e-4)
