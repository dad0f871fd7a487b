"""Continuity across hand-offs: each stage that starts from a hand-off validates before its
first step (metrics.csv's epoch-0 row), and since the hand-off preserves the function,
that Dice is the previous stage's final one."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import torch
from conftest import TINY_CURRICULUM
from tiny_plans import quick_tiny_plan

import models
from orchestrator.config import load_curriculum
from orchestrator.runs.state import read_state
from orchestrator.runs.status import collect_status
from orchestrator.training.continuity import aux_ramp_steps
from orchestrator.training.handoff import transfer_weights
from orchestrator.training.step import Objective
from orchestrator.training.trainer import run_stage

CHAIN = ("stage1_basic_cnn", "stage2_cnn_attention", "stage3_hybrid_small", "stage4_hybrid_full")


def _rows(stage_dir: Path) -> list[dict[str, str]]:
    with open(stage_dir / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_epoch0_row_equals_previous_final_dice(tmp_path: Path, tiny_data: Path) -> None:
    plan, path = quick_tiny_plan(tmp_path / "runs", tiny_data, stage_updates={"iterations_per_epoch": 6})
    for stage in CHAIN:
        run_stage(path, stage)
    stages = {s["name"]: s for s in collect_status(plan.runs_dir, plan.run)["runs"][0]["stages"]}
    assert _rows(plan.run_dir / CHAIN[0])[0]["epoch"] == "1"  # no hand-off: no epoch-0 row
    for prev, stage in zip(CHAIN, CHAIN[1:]):
        rows = _rows(plan.run_dir / stage)
        assert [r["epoch"] for r in rows] == ["0", "1"]
        final = float(_rows(plan.run_dir / prev)[-1]["val_dice"])
        start = float(rows[0]["val_dice"])
        assert abs(start - final) <= 0.01 * max(final, 0.05), (stage, start, final)
        report = json.loads((plan.run_dir / stage / "handoff.json").read_text())
        assert report["previous_final_dice"] == final and report["epoch0_val_dice"] == start
        entry = read_state(plan.run_dir)["stages"][stage]
        assert entry["handoff"] == {"from": prev, "previous_final_dice": final, "epoch0_dice": start}
        assert stages[stage]["handoff"]["epoch0_dice"] == start  # what `status` shows
        assert entry["best_dice"] >= start  # the stage's best.pt starts as the handed-off model


def test_new_deep_supervision_heads_ramp_in(tmp_path: Path) -> None:
    """Into stage 4 the hand-off adds zeroed deep-supervision heads; at aux scale 0 the loss
    is the handed-off stage 3 model's, at full weight it is larger (the blank heads' loss)."""
    (s3, _), (s4, _) = load_curriculum(TINY_CURRICULUM)[1][2:4]

    def build(spec):
        kw = spec.model.constructor_kwargs()
        return models.build_model(spec.model.arch, base_filters=spec.base_filters,
                                  input_size_vox=list(spec.input_size_vox), **kw)

    torch.manual_seed(0)
    old, new = build(s3), build(s4)
    report = transfer_weights(old, new, (1, 1, 32, 32, 32))
    x = torch.randn(2, 1, 32, 32, 32)
    y = (torch.rand(2, 32, 32, 32) > 0.9).long()
    sdm = torch.randn(2, 1, 32, 32, 32)
    old.train(), new.train()
    with torch.no_grad():
        before = float(Objective(s3)(old, x, y, None, "cpu", 0, sdm=sdm))
        objective = Objective(s4)
        full = float(objective(new, x, y, None, "cpu", 0, sdm=sdm))
        objective.set_aux_scale(0.0)
        ramped = float(objective(new, x, y, None, "cpu", 0, sdm=sdm))
    assert abs(ramped - before) <= 1e-3 * before and full > ramped * 1.2, (before, ramped, full)
    handoff = tmp_path / "handoff.json"
    handoff.write_text(json.dumps(report))
    assert aux_ramp_steps(handoff, s4) == s4.iterations_per_epoch
    handoff.write_text(json.dumps({"zeroed": []}))
    assert aux_ramp_steps(handoff, s4) == 0
