"""TensorBoard event files of a run, read back with TensorBoard's own EventAccumulator."""
from __future__ import annotations

from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tiny_plans import quick_tiny_plan

from orchestrator.training.tensorboard_log import overlay_rgb
from orchestrator.training.trainer import run_stage

TAGS = {"train/loss", "train/lr", "val/dice", "val/iou", "memory/peak_gb", "time/step_s",
        "loader/samples_per_s", "loader/wait_fraction", "stage/index"}


def _events(folder: Path) -> EventAccumulator:
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_two_stages_follow_each_other_on_one_step_axis(tmp_path: Path, tiny_data: Path) -> None:
    plan, path = quick_tiny_plan(tmp_path / "runs", tiny_data,
                                 stage_updates={"max_epochs": 2, "tensorboard_images_every_epochs": 2})
    for stage in ("stage1_basic_cnn", "stage2_cnn_attention"):
        run_stage(path, stage)
    acc = _events(plan.run_dir / "tensorboard")  # one TensorBoard run for the chain
    assert set(acc.Tags()["scalars"]) >= TAGS
    index = [(e.step, e.value) for e in acc.Scalars("stage/index")]
    steps_per_epoch = plan.stages[0].spec.iterations_per_epoch  # 2
    assert index == [(2, 1.0), (4, 1.0), (6, 2.0), (8, 2.0)]  # stage 2 after stage 1's 4 steps
    assert steps_per_epoch == 2
    dice = acc.Scalars("val/dice")
    assert [e.step for e in dice] == [2, 4, 6, 8] and all(0 <= e.value <= 1 for e in dice)
    assert all(e.value > 0 for e in acc.Scalars("loader/samples_per_s"))
    images = acc.Images("val/overlay")  # every 2 epochs: each stage's epoch 2
    assert [e.step for e in images] == [4, 8] and images[0].width > 0 and images[0].height > 0


def test_the_profile_switch_turns_it_off(tmp_path: Path, tiny_data: Path) -> None:
    plan, path = quick_tiny_plan(tmp_path / "runs", tiny_data, tensorboard=False)
    run_stage(path, "stage1_basic_cnn")
    assert (plan.run_dir / "stage1_basic_cnn" / "checkpoints" / "final.pt").exists()
    assert not (plan.run_dir / "tensorboard").exists()


def test_overlay_colours() -> None:
    import numpy as np

    image = np.arange(12, dtype=np.float32).reshape(3, 4)
    truth, pred = np.zeros((3, 4), np.uint8), np.zeros((3, 4), np.uint8)
    truth[0, 0] = pred[0, 0] = 1  # both: yellow
    pred[2, 3] = 1  # prediction only: red
    rgb = overlay_rgb(image, truth, pred)
    assert rgb.shape == (4, 3, 3) and rgb.dtype == np.uint8  # rotated: x to the right, y up
    flat = np.rot90(np.arange(12).reshape(3, 4))
    ys, xs = np.argwhere(flat == 0)[0]
    assert tuple(rgb[ys, xs, :2]) == (255, 255)
    ys, xs = np.argwhere(flat == 11)[0]
    assert rgb[ys, xs, 0] == 255 and rgb[ys, xs, 1] < 255
