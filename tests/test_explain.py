"""`plan --explain STAGE`: a stage's predicted peak in parts that add up to it (issue 12)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from tiny_plans import one_stage_curriculum
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.errors import ConfigError
from orchestrator.planning.estimator import build_stage_model_meta
from orchestrator.planning.explain import TENSOR_PARTS, explain_stage
from orchestrator.planning.plan_file import PlanRequest, make_plan
from orchestrator.training.step import estimation_step

S1 = "stage1_basic_cnn"


def _round(nbytes: int) -> int:
    return -(-nbytes // 512) * 512


def test_training_step_parts_add_up_and_are_what_they_say(tmp_path: Path, tiny_data: Path) -> None:
    """Validation over the data's 32^3 volumes: the training step is the peak."""
    plan = make_plan(PlanRequest(curriculum=one_stage_curriculum(tmp_path), target_mem_gb=2.0, device="cpu",
                                 run="e", runs_dir=tmp_path / "runs", data_dir=tiny_data,
                                 calibrate=False), estimation_step)
    sp = plan.stage(S1)
    b = explain_stage(plan, S1, estimation_step)
    assert b.peak_of == "training step" and sp.train_gb > sp.val_gb
    assert b.total_gb == pytest.approx(sp.predicted_gb, abs=1e-3)
    gib = 1024**3
    model = build_stage_model_meta(sp.spec, sp.base_filters, sp.input_size_vox)
    tensors = list(model.parameters()) + list(model.buffers())
    params = sum(_round(t.numel() * t.element_size()) for t in tensors)
    assert b.parts_gb["parameters"] * gib == pytest.approx(params, abs=1)
    # AdamW: two moments per trainable parameter, and a step counter each
    n_trainable = sum(1 for _ in model.parameters())
    moments = 2 * sum(_round(p.numel() * 4) for p in model.parameters())
    assert b.parts_gb["optimizer state"] * gib == pytest.approx(moments + 512 * n_trainable, abs=1)
    x = math.prod((sp.batch_size, 1, *sp.input_size_vox))
    assert b.parts_gb["input batch"] * gib == pytest.approx(_round(4 * x) + _round(8 * x), abs=1)
    assert b.parts_gb["activations saved for backward"] > 0
    assert all(b.parts_gb[p] >= 0 for p in TENSOR_PARTS)
    assert b.parts_gb["process baseline"] == plan.assumptions.overheads.context_gb


def test_a_stage_whose_peak_is_validation_shows_validation_parts(tmp_path: Path) -> None:
    plan = make_plan(PlanRequest(curriculum=one_stage_curriculum(tmp_path), target_mem_gb=3.0, device="cpu",
                                 run="v", runs_dir=tmp_path / "runs", calibrate=False), estimation_step)
    sp = plan.stage(S1)
    assert sp.val_gb > sp.train_gb  # ATLAS's volume, a tiny model
    b = explain_stage(plan, S1, estimation_step)
    assert b.peak_of == "validation" and "training step needs" in b.other
    assert b.total_gb == pytest.approx(sp.predicted_gb, abs=1e-3)
    assert b.parts_gb["volume buffers and window activations"] > b.parts_gb["parameters"]


def test_cli_explain_prints_the_parts_and_a_bad_stage_is_one_line(tmp_path: Path,
                                                                  tiny_data: Path) -> None:
    cur = str(one_stage_curriculum(tmp_path))
    args = ["plan", "--target-mem", "2", "--device", "cpu", "--curriculum", cur,
            "--runs-dir", str(tmp_path / "runs"), "--data", str(tiny_data)]
    res = CliRunner().invoke(app, [*args, "--run", "a", "--explain", S1, "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    explained = doc["explain"]
    assert explained["stage"] == S1 and set(TENSOR_PARTS) <= set(explained["parts_gb"])
    assert explained["total_gb"] == pytest.approx(doc["stages"][0]["predicted_gb"], abs=1e-3)
    res = CliRunner().invoke(app, [*args, "--run", "b", "--explain", S1])
    assert res.exit_code == 0 and "where the" in res.stdout and "temporaries at the peak" in res.stdout
    assert "to trade: gradient checkpointing cuts the saved activations" in res.stdout
    plan = make_plan(PlanRequest(curriculum=one_stage_curriculum(tmp_path), target_mem_gb=2.0, device="cpu",
                                 run="c", runs_dir=tmp_path / "runs"), estimation_step)
    with pytest.raises(ConfigError, match="--explain: no stage 'stage9' in plan c; expected one of "
                                          "stage1_basic_cnn"):
        explain_stage(plan, "stage9", estimation_step)
