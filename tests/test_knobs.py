"""The knobs of a stage YAML (issue 14, part 4): each one changes what training does, and a
bad value is one line naming the file and the field."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_runner import invoke
from conftest import REPO, TINY_CURRICULUM
from tiny_plans import quick_tiny_plan

import models
from orchestrator.config import load_curriculum, load_stage
from orchestrator.data import augment
from orchestrator.data.dataset import PatchDataset
from orchestrator.data.sources import discover_subjects
from orchestrator.errors import ConfigError
from orchestrator.training.losses import GeneralizedDiceFocalLoss
from orchestrator.training.lr_schedule import lr_factor
from orchestrator.training.parts import build_runner
from orchestrator.training.step import Objective
from orchestrator.training.trainer import run_stage

S1, S2 = "stage1_basic_cnn", "stage2_cnn_attention"
STAGE = "name: s\nmodel: {arch: resunet3d}\ninput_size_vox: [32, 32, 32]\n"
DS_STAGE = "name: s\nmodel: {arch: resunet3d, deep_supervision: true}\ninput_size_vox: [32, 32, 32]\n"


def _stage(tmp_path: Path, extra: str, head: str = STAGE) -> Path:
    p = tmp_path / "s.yaml"
    p.write_text(head + extra)
    return p


@pytest.mark.parametrize(("extra", "want"), [
    ("focal_gamma: -1\n", r"s\.yaml: focal_gamma: Input should be greater than or equal to 0 \(got -1\)"),
    ("focal_alpha: 1.5\n", r"s\.yaml: focal_alpha: Input should be less than or equal to 1 \(got 1\.5\)"),
    ("augment_strength: 3\n", r"s\.yaml: augment_strength: Input should be less than or equal to 2"),
    ("min_lr: 0.01\nlr: 0.001\n", r"s\.yaml: .*min_lr 0\.01 must be below lr 0\.001"),
    ("handoff_warmup_steps: -5\n", r"s\.yaml: handoff_warmup_steps: Input should be greater than or equal"),
    ("handoff_warmup_start: 0\n", r"s\.yaml: handoff_warmup_start: Input should be greater than 0"),
    ("handoff_warmup_steps: 5\nhandoff_warmup_epochs: 1\n",
     r"s\.yaml: .*handoff_warmup_epochs and handoff_warmup_steps both set; expected one of them"),
    ("early_stop_patience_epochs: 0\n",
     r"s\.yaml: early_stop_patience_epochs: Input should be greater than 0"),
    ("deep_supervision_weights: [1, 0.5, 0.25]\n",
     r"s\.yaml: .*deep_supervision_weights needs model\.deep_supervision: true"),
    ("focal_gama: 2\n", r"s\.yaml: unknown key 'focal_gama' \(did you mean 'focal_gamma'\?\)"),
])
def test_bad_knob_is_one_line_naming_file_and_field(tmp_path: Path, extra: str, want: str) -> None:
    with pytest.raises(ConfigError, match=want) as err:
        load_stage(_stage(tmp_path, extra))
    assert "\n" not in str(err.value)


def test_deep_supervision_weights_need_one_per_output(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"s\.yaml: deep_supervision_weights: 2 values; expected 3 "
                                          r"\(the full-resolution output and 2 auxiliary heads\)"):
        load_stage(_stage(tmp_path, "deep_supervision_weights: [1, 0.5]\n", DS_STAGE))
    with pytest.raises(ConfigError, match=r"deep_supervision_weights\.1: Input should be greater"):
        load_stage(_stage(tmp_path, "deep_supervision_weights: [1, -0.5, 0]\n", DS_STAGE))
    with pytest.raises(ConfigError, match=r"the first \(full-resolution\) weight must be above 0"):
        load_stage(_stage(tmp_path, "deep_supervision_weights: [0, 1, 1]\n", DS_STAGE))
    spec = load_stage(_stage(tmp_path, "deep_supervision_weights: [1, 0.3, 0.1]\n", DS_STAGE))
    assert spec.deep_supervision_weights == (1.0, 0.3, 0.1)


def test_cli_bad_knob_exits_2_with_one_line(tmp_path: Path) -> None:
    stage = _stage(tmp_path, "focal_alpha: 2\n")
    cur = tmp_path / "cur.yaml"
    cur.write_text(f"name: c\nstages:\n  - file: {stage}\n")
    res = invoke("plan", "--curriculum", str(cur), "--device", "cpu", "--runs-dir", str(tmp_path / "runs"))
    assert res.exit_code == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "s.yaml: focal_alpha: Input should be less than or equal to 1" in lines[0]
    assert not (tmp_path / "runs").exists()


def test_early_stopping_on_for_real_stages_off_in_demo() -> None:
    _, real = load_curriculum(REPO / "stages" / "progressive.yaml")
    assert {s.name: s.early_stop_patience_epochs for s, _ in real} == {
        "stage1_basic_cnn": 20, "stage2_cnn_attention": 20, "stage3_hybrid_small": 20,
        "stage4_hybrid_full": 20, "lcnn": 20}
    _, demo = load_curriculum(REPO / "stages" / "demo.yaml")
    assert [s.early_stop_patience_epochs for s, _ in demo] == [None] * 4


def _epochs_trained(tmp_path: Path, data: Path, run: str, patience: int | None) -> list[dict]:
    # lr 1e-9: the weights barely move, so validation Dice stays where it started
    _, path = quick_tiny_plan(tmp_path / "runs", data, run=run, stage_updates={
        "max_epochs": 4, "iterations_per_epoch": 1, "lr": 1e-9,
        "early_stop_patience_epochs": patience})
    res = run_stage(path, S1)
    with open(tmp_path / "runs" / run / S1 / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert res["epochs"] == len(rows)
    return rows


def test_patience_stops_a_stage_whose_validation_stopped_improving(tmp_path: Path,
                                                                   tiny_data: Path) -> None:
    rows = _epochs_trained(tmp_path, tiny_data, "patient", 1)
    dices = [float(r["val_dice"]) for r in rows]
    assert len(rows) == 2 and dices[1] <= dices[0]  # no gain in 1 epoch: stopped after epoch 2
    assert len(_epochs_trained(tmp_path, tiny_data, "all", None)) == 4  # off: every epoch


def _spec(**update):  # noqa: ANN003, ANN202
    _, stages = load_curriculum(TINY_CURRICULUM)
    return stages[0][0].model_copy(update=update)


def test_min_lr_is_the_floor_of_the_cosine() -> None:
    spec = _spec(max_epochs=10, iterations_per_epoch=10, lr=1e-2, min_lr=1e-3, warmup_epochs=1)
    f = lr_factor(spec, handed_off=False)
    lrs = [spec.lr * f(step) for step in range(101)]
    assert lrs[100] == pytest.approx(1e-3) and min(lrs[10:]) == pytest.approx(1e-3)
    assert lrs[10] == pytest.approx(1e-2)  # the peak right after warm-up
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # then decays monotonically
    assert spec.lr * lr_factor(_spec(max_epochs=10, iterations_per_epoch=10, lr=1e-2), False)(100) == 0.0


def test_handoff_warmup_ramps_from_a_fraction_only_after_a_handoff() -> None:
    spec = _spec(max_epochs=10, iterations_per_epoch=10, warmup_epochs=2, handoff_warmup_steps=5,
                 handoff_warmup_start=0.2)
    after = lr_factor(spec, handed_off=True)
    assert [after(s) for s in range(6)] == pytest.approx([0.2, 0.36, 0.52, 0.68, 0.84, 1.0])
    scratch = lr_factor(spec, handed_off=False)  # warmup_epochs: from ~0 over 20 steps
    assert scratch(0) == pytest.approx(1 / 20) and scratch(19) == pytest.approx(1.0)
    by_epochs = lr_factor(spec.model_copy(update={"handoff_warmup_steps": 0,
                                                  "handoff_warmup_epochs": 1}), handed_off=True)
    assert by_epochs(5) == pytest.approx(0.6) and by_epochs(10) == pytest.approx(1.0)


def test_trainer_applies_handoff_warmup_and_min_lr(tmp_path: Path, tiny_data: Path) -> None:
    _, path = quick_tiny_plan(tmp_path / "runs", tiny_data, stage_updates={
        "handoff_warmup_steps": 4, "handoff_warmup_start": 0.25, "lr": 1e-3, "min_lr": 2e-4})
    plan_runner = {name: build_runner(_plan(path), name) for name in (S1, S2)}
    assert plan_runner[S1].opt.param_groups[0]["lr"] == pytest.approx(1e-3)  # no hand-off
    assert plan_runner[S2].opt.param_groups[0]["lr"] == pytest.approx(2.5e-4)  # starts low
    run_stage(path, S1)  # 1 epoch of 2 steps: the cosine ends at its floor
    with open(tmp_path / "runs" / "tiny" / S1 / "metrics.csv", newline="") as fh:
        assert float(next(csv.DictReader(fh))["lr"]) == pytest.approx(2e-4)


def _plan(path: Path):  # noqa: ANN202
    from orchestrator.config import load_plan

    return load_plan(path)


def test_focal_gamma_and_alpha_match_monai_and_change_the_loss() -> None:
    from monai.losses import FocalLoss

    torch.manual_seed(0)
    logits = torch.randn(2, 2, 6, 6, 6)
    target = (torch.rand(2, 1, 6, 6, 6) < 0.2).float()
    for gamma, alpha in [(2.0, None), (0.5, 0.75), (3.0, 0.1)]:
        ours = GeneralizedDiceFocalLoss(gamma, lambda_gdl=0.0, alpha=alpha)(logits, target)
        theirs = FocalLoss(to_onehot_y=True, gamma=gamma, alpha=alpha)(logits, target)
        assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
    base = _spec(boundary_weight_start=0.0, boundary_weight_end=0.0)
    model = models.build_model("resunet3d", base_filters=4, levels=2)
    x, y = torch.randn(2, 1, 16, 16, 16), (torch.rand(2, 16, 16, 16) < 0.2).long()
    losses = {}
    for name, update in [("default", {}), ("gamma0", {"focal_gamma": 0.0}), ("alpha", {"focal_alpha": 0.9})]:
        torch.manual_seed(1)
        losses[name] = Objective(base.model_copy(update=update))(model, x, y, None, "cpu").item()
    assert losses["gamma0"] != pytest.approx(losses["default"])
    assert losses["alpha"] != pytest.approx(losses["default"])


def test_deep_supervision_weights_weight_the_heads() -> None:
    _, stages = load_curriculum(TINY_CURRICULUM)
    s4 = stages[3][0].model_copy(update={"boundary_weight_start": 0.0, "boundary_weight_end": 0.0})
    kw = s4.model.constructor_kwargs()
    model = models.build_model("resunet3d", **kw, base_filters=4, input_size_vox=[32, 32, 32]).train()
    torch.manual_seed(0)
    x, y = torch.randn(1, 1, 32, 32, 32), (torch.rand(1, 1, 32, 32, 32) < 0.1).float()
    with torch.no_grad():
        outs = model(x)
    assert isinstance(outs, (list, tuple)) and len(outs) == 3
    main_only = Objective(s4.model_copy(update={"deep_supervision_weights": (1.0, 0.0, 0.0)}))
    assert main_only.seg_loss(outs, y).item() == pytest.approx(GeneralizedDiceFocalLoss()(outs[0], y).item())
    default = Objective(s4).seg_loss(outs, y).item()  # 1, 0.5, 0.25
    heavy = Objective(s4.model_copy(update={"deep_supervision_weights": (1.0, 2.0, 2.0)}))
    assert heavy.seg_loss(outs, y).item() > default > main_only.seg_loss(outs, y).item()


def test_augment_strength_scales_the_augmentation(tiny_data: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    image = np.random.default_rng(0).normal(size=(16, 16, 16)).astype(np.float32)
    np.testing.assert_array_equal(augment.intensity(np.random.default_rng(3), image, strength=0.0), image)
    monkeypatch.setattr(augment, "NOISE_PROB", 0.5)  # 0.5 x strength 2: always
    for seed in range(5):
        weak, strong = (np.abs(augment.intensity(np.random.default_rng(seed), image, strength=s) - image)
                        .mean() for s in (1.0, 2.0))
        assert strong > weak
    recs = discover_subjects(tiny_data)
    kw = {"samples_per_epoch": 4, "lesion_fraction": 0.5, "seed": 2}
    plain, off, on = (PatchDataset(recs, (16, 16, 16), augment=a, **kw) for a in (False, 0.0, 1.5))
    for i in range(4):
        torch.testing.assert_close(off[i]["image"], plain[i]["image"])
    assert any(not torch.equal(on[i]["image"], plain[i]["image"]) for i in range(4))
