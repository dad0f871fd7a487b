"""LCNN on its own data: slice size from a PNG tree of 512x512 slices at plan time (padded,
never cropped), dataset mean/std normalisation, a foreground-only Dice term, class weights
for the cross-entropy, and the seed's constructor."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from orchestrator.config import StageSpec, parse_model
from orchestrator.data.intensity import Normalization, load_normalised
from orchestrator.data.pngslices import find_records
from orchestrator.errors import ConfigError
from orchestrator.planning.slice_size import fit_slice_to_data
from orchestrator.training.checkpoints import load_checkpoint
from orchestrator.training.step import lcnn_dice_ce

REPO = Path(__file__).resolve().parent.parent
SEED_MEAN, SEED_STD = 0.2162, 0.1841


def _png_tree(root: Path, patients: int, slices: int, size_hw: tuple[int, int]) -> Path:
    """CT-like slices: a bright disc of 'brain' with a brighter lesion on every slice."""
    h, w = size_hw
    yy, xx = np.mgrid[:h, :w]
    rng = np.random.default_rng(0)
    for p in range(patients):
        for z in range(slices):
            brain = (yy - h / 2) ** 2 / (0.4 * h) ** 2 + (xx - w / 2) ** 2 / (0.35 * w) ** 2 < 1
            lesion = (yy - h / 2 - 40 - 10 * p) ** 2 + (xx - w / 2 + 60) ** 2 < (20 + 4 * z) ** 2
            img = np.where(brain, 90 + rng.normal(0, 8, (h, w)), 0)
            img = np.clip(np.where(lesion & brain, 200, img), 0, 255).astype(np.uint8)
            for sub, arr in (("images", img), ("masks", (255 * (lesion & brain)).astype(np.uint8))):
                (root / sub / f"patient{p}").mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr).save(root / sub / f"patient{p}" / f"{z:03d}.png")
    return root


def _curriculum(folder: Path) -> Path:
    path = folder / "lcnn_png.yaml"
    path.write_text(
        f"name: lcnn-png\nstages:\n  - file: {REPO / 'stages' / 'lcnn.yaml'}\n"
        "overrides:\n  base_filters: 8\n  batch_size: 1\n  model: {in_slices: 3}\n  max_epochs: 1\n"
        "  iterations_per_epoch: 1\n  warmup_epochs: 0\n  num_workers: 0\n  augment: false\n"
        "  amp: false\n  val_fraction: 0.34\n  tensorboard: false\n"
        f"  normalization: dataset\n  intensity_mean: {SEED_MEAN}\n  intensity_std: {SEED_STD}\n"
        "  dice_include_background: false\n  class_weights: [1.0, 4.0]\n"
        "  planner: {min_base_filters: 8, min_input_vox: 64, max_batch_size: 1, min_batch_size: 1}\n")
    return path


@pytest.mark.slow
def test_lcnn_plans_and_trains_on_512_png_slices(tmp_path: Path) -> None:
    """One step of one 512x512 stack and validation of a 2-slice patient (~1 min on 2 cores:
    the ResNeXt50 global path at 512x512 is ~22 GFLOPs a forward pass)."""
    from orchestrator import plan
    from orchestrator.training.trainer import run_stage

    data = _png_tree(tmp_path / "png", patients=3, slices=2, size_hw=(512, 512))
    p = plan(8.0, device="cpu", curriculum=_curriculum(tmp_path), data=data, run="png",
             runs_dir=tmp_path / "runs")
    sp = p.stage("lcnn")
    assert tuple(sp.input_size_vox) == (512, 512)  # the stage YAML says 224x192: grown, not cropped
    assert sp.spec.planner.min_input_vox == 512 and sp.batch_size == 1
    assert sp.reasons[0].startswith("slice grown to 512x512: the data's largest slice is 512x512")
    res = run_stage(p.run_dir / "plan.yaml", "lcnn")
    ckpt = load_checkpoint(Path(res["final"]))
    assert ckpt["input_size_vox"] == [512, 512] and ckpt["model_kwargs"]["in_slices"] == 3
    assert ckpt["normalization"] == {"kind": "dataset", "mean": SEED_MEAN, "std": SEED_STD}
    header, row = (p.run_dir / "lcnn" / "metrics.csv").read_text().splitlines()[:2]
    values = dict(zip(header.split(","), row.split(",")))
    assert 0.0 <= float(values["val_dice"]) <= 1.0 and np.isfinite(float(values["train_loss"]))


def test_slice_size_pads_to_the_multiple_and_never_shrinks() -> None:
    spec = parse_model(StageSpec, {"name": "l", "kind": "lcnn", "model": {"arch": "lcnn"},
                                   "input_size_vox": [224, 192]}, "t.yaml")
    grown, why = fit_slice_to_data(spec, (470, 500, 3), multiple=32)  # (X=W, Y=H, Z)
    assert grown.input_size_vox == (512, 480) and grown.planner.min_input_vox == 512
    assert "500x470 (H x W)" in why
    kept, why = fit_slice_to_data(spec, (150, 200, 3), multiple=32)  # 200x150 fits in 224x192: kept
    assert kept.input_size_vox == (224, 192) and kept.planner.min_input_vox == 224
    assert why.startswith("slice kept at 224x192")
    fixed = spec.model_copy(update={"fit_input_to_data": False})
    assert fit_slice_to_data(fixed, (470, 500, 3), multiple=32) == (fixed, None)
    assert fit_slice_to_data(spec, (470, 500, 3), multiple=None)[0].input_size_vox == (512, 480)  # LCNN: 32


def test_dataset_normalisation_is_the_seeds(tmp_path: Path) -> None:
    data = _png_tree(tmp_path / "png", patients=1, slices=2, size_hw=(64, 64))
    rec = find_records(data)[0]
    raw = np.asarray(Image.open(data / "images" / "patient0" / "001.png"), dtype=np.float32)
    vol = load_normalised(rec, Normalization("dataset", SEED_MEAN, SEED_STD))
    np.testing.assert_allclose(vol.image[:, :, 1], ((raw / 255 - SEED_MEAN) / SEED_STD).T, rtol=1e-6)
    assert vol.background == pytest.approx(-SEED_MEAN / SEED_STD)
    zscored = load_normalised(rec, Normalization())
    assert abs(float(zscored.image[zscored.image != 0].mean())) < 1e-3  # the default: per volume


def test_dice_without_background_and_weighted_cross_entropy() -> None:
    spec = parse_model(StageSpec, {"name": "l", "kind": "lcnn", "model": {"arch": "lcnn"},
                                   "input_size_vox": [64, 64], "class_weights": [1.0, 3.0],
                                   "dice_include_background": False}, "t.yaml")
    loss = lcnn_dice_ce(spec)
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 1.0]]]])  # (B=1, C=2, H=1, W=2)
    target = torch.tensor([[[[0.0, 1.0]]]])
    p = torch.softmax(logits, dim=1)[0, :, 0]  # (C, W)
    ce = (1.0 * -torch.log(p[0, 0]) + 3.0 * -torch.log(p[1, 1])) / (1.0 + 3.0)
    fg = p[1]  # foreground probabilities; truth [0, 1]
    dice = 1 - (2 * fg[1] + 1e-5) / (fg.sum() + 1 + 1e-5)
    assert float(loss(logits, target)) == pytest.approx(float(ce + dice), rel=1e-5)


def test_lcnn_settings_are_checked() -> None:
    base = {"name": "l", "kind": "lcnn", "model": {"arch": "lcnn"}, "input_size_vox": [64, 64]}
    with pytest.raises(ConfigError, match="normalization dataset needs intensity_mean and intensity_std"):
        parse_model(StageSpec, {**base, "normalization": "dataset"}, "s.yaml")
    with pytest.raises(ConfigError, match=r"class_weights needs 2 weights >= 0"):
        parse_model(StageSpec, {**base, "class_weights": [1.0]}, "s.yaml")
    with pytest.raises(ConfigError, match="class_weights and dice_include_background are LCNN settings"):
        parse_model(StageSpec, {**base, "kind": "seg3d", "input_size_vox": [32, 32, 32],
                                "model": {"arch": "resunet3d"}, "class_weights": [1.0, 2.0]}, "s.yaml")


def test_the_seeds_constructor_works_as_written() -> None:
    from models.lcnn import LCNN

    model = LCNN(num_channels=1, num_classes=2, T=1)
    assert model.in_slices == 3 and LCNN().in_slices == 5
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 2, 64, 64)
    with pytest.raises(ValueError, match="num_channels must be 1"):
        LCNN(num_channels=3, T=1)
    with pytest.raises(ValueError, match="in_slices 5 and T 1 disagree"):
        LCNN(in_slices=5, T=1)
