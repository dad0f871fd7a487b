"""TensorBoard event files for a run: `tensorboard --logdir runs/`.

The 3D chain of a run is one TensorBoard run, `runs/<run>/tensorboard/`: every stage
writes there, its steps placed after those of the stage it starts from, so the four
stages' curves follow each other on one step axis (stage 2's first point comes after
stage 1's last). An LCNN run, beside the chain, is its own TensorBoard run,
`runs/<run>/<stage>/tensorboard/`. A cross-validation fold is a sub-run, so each fold
gets its own. Each epoch writes, at the stage's global step:

    train/loss, train/lr                the epoch's mean loss, the learning rate
    val/dice, val/iou                   on validation epochs
    memory/peak_gb                      peak allocated (GPU) or peak RSS (CPU)
    time/step_s                         training seconds per optimizer step
    loader/samples_per_s                samples per second of training (loader and step)
    loader/wait_fraction                share of the training time spent waiting for batches
    stage/index                         1, 2, ... (where the hand-offs are)

and every `tensorboard_images_every_epochs` validation epochs (and the last) an image
`val/overlay`: an axial slice through the largest lesion of the first validation
subject, truth in green, prediction in red, both in yellow. A stage's `tensorboard: false`
or the cluster profile's turns it off.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.config import Plan, StagePlan
from orchestrator.runs import state as run_state
from orchestrator.training.metrics import largest_lesion_centroid

logger = logging.getLogger(__name__)
_OFF = object()  # a runner whose TensorBoard could not start

SCALARS = {"train_loss": "train/loss", "lr": "train/lr", "val_dice": "val/dice",
           "val_iou": "val/iou", "peak_mem_gb": "memory/peak_gb"}


def enabled(plan: Plan, sp: StagePlan) -> bool:
    """Both the stage and the cluster profile leave TensorBoard on."""
    return bool(getattr(sp.spec, "tensorboard", True)) and bool(getattr(plan.cluster, "tensorboard", True))


def log_dir(plan: Plan, sp: StagePlan) -> Path:
    """The chain's shared folder, or an LCNN run's own."""
    if sp.kind == "lcnn":
        return plan.run_dir / sp.name / "tensorboard"
    return plan.run_dir / "tensorboard"


def step_offset(plan: Plan, sp: StagePlan) -> int:
    """Steps of the stages before this one in its chain (those it starts from, in turn):
    each one's epochs trained (state.json; its planned epochs when unknown) x its steps
    per epoch."""
    offset, seen = 0, {sp.name}
    entries = run_state.read_state(plan.run_dir)["stages"]
    src = sp.init_from
    while src and src not in seen:
        seen.add(src)
        try:
            prev = plan.stage(src)
        except Exception:  # noqa: BLE001 - a plan without it: start the axis here
            break
        epochs = entries.get(src, {}).get("epoch") or prev.spec.max_epochs
        offset += int(epochs) * prev.spec.iterations_per_epoch
        src = prev.init_from
    return offset


class LoaderClock:
    """Times how long the training loop waits for each batch."""

    def __init__(self) -> None:
        self.wait_s = 0.0
        self.batches = 0

    def wrap(self, batches: Iterable[Any]) -> Iterator[Any]:
        it = iter(batches)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.wait_s += time.perf_counter() - t0
            self.batches += 1
            yield batch

    def take(self) -> tuple[float, int]:
        """(seconds waited, batches) since the last call."""
        out = (self.wait_s, self.batches)
        self.wait_s, self.batches = 0.0, 0
        return out


class StageBoard:
    """One stage's writer into its TensorBoard run."""

    def __init__(self, plan: Plan, sp: StagePlan) -> None:
        from torch.utils.tensorboard import SummaryWriter  # deferred: tensorboard, only when logging

        self.sp = sp
        self.offset = step_offset(plan, sp)
        self.index = next((i + 1 for i, s in enumerate(plan.stages) if s.name == sp.name), 0)
        self.every = int(getattr(sp.spec, "tensorboard_images_every_epochs", 5))
        self.writer = SummaryWriter(str(log_dir(plan, sp)), filename_suffix=f".{sp.name}")
        self.clock = LoaderClock()

    def epoch(self, row: dict[str, Any], global_step: int, step_batch: int,
              overlay: np.ndarray | None = None) -> None:
        step = self.offset + global_step
        w = self.writer
        for key, tag in SCALARS.items():
            value = row.get(key)
            if isinstance(value, (int, float)) and np.isfinite(value):
                w.add_scalar(tag, float(value), step)
        wait_s, batches = self.clock.take()
        seconds = float(row.get("seconds") or 0.0)
        if batches and seconds > 0:
            w.add_scalar("time/step_s", seconds / batches, step)
            w.add_scalar("loader/samples_per_s", batches * step_batch / seconds, step)
            w.add_scalar("loader/wait_fraction", min(1.0, wait_s / seconds), step)
        w.add_scalar("stage/index", self.index, step)
        if overlay is not None:
            w.add_image("val/overlay", overlay, step, dataformats="HWC")
        w.flush()

    def wants_image(self, row: dict[str, Any], epoch: int) -> bool:
        return "val_dice" in row and self.every > 0 and (
            epoch % self.every == 0 or epoch == self.sp.spec.max_epochs)

    def close(self) -> None:
        self.writer.close()


def board_for(runner: Any) -> StageBoard | None:
    """The runner's StageBoard, made on first use; None when off or not the writing rank."""
    if not runner.is_writer or not enabled(runner.plan, runner.sp):
        return None
    board = getattr(runner, "_board", None)
    if board is None:
        try:
            board = StageBoard(runner.plan, runner.sp)
        except ImportError as err:  # tensorboard missing from a site's environment
            logger.warning("%s: no TensorBoard logging (%s); pip install tensorboard", runner.sp.name, err)
            board = _OFF
        runner._board = board
    return board if isinstance(board, StageBoard) else None


def close_board(runner: Any) -> None:
    """Flush and close the stage's event file (at the end of the stage)."""
    board = getattr(runner, "_board", None)
    if isinstance(board, StageBoard):
        board.close()
        runner._board = None


def wrap_batches(runner: Any, batches: Iterable[Any]) -> Iterable[Any]:
    """The loader's batches, timed for `loader/*` when TensorBoard is on."""
    board = board_for(runner)
    return board.clock.wrap(batches) if board is not None else batches


def log_epoch(runner: Any, row: dict[str, Any]) -> None:
    """Write the epoch's scalars (and every few validations an overlay) for the runner's stage."""
    board = board_for(runner)
    if board is None:
        return
    overlay = None
    if board.wants_image(row, runner.progress.epoch) and runner.val_recs:
        overlay = validation_overlay(runner)
    board.epoch(row, runner.progress.global_step, runner.step_batch, overlay)


def validation_overlay(runner: Any) -> np.ndarray:
    """(H, W, 3) uint8: an axial slice of the first validation subject through its largest
    lesion (the middle slice without one), truth green, prediction red, overlap yellow."""
    vol = runner.load(runner.val_recs[0])
    was_training = runner.model.training
    runner.model.eval()
    pred = runner.predict(runner.model, vol)
    runner.model.train(was_training)
    centre = largest_lesion_centroid(vol.label) or tuple(s // 2 for s in vol.image.shape)
    return overlay_rgb(vol.image[:, :, centre[2]], vol.label[:, :, centre[2]], pred[:, :, centre[2]])


def overlay_rgb(image: np.ndarray, truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Grey image (1st-99th percentile) with truth in green and prediction in red, (H, W, 3)."""
    lo, hi = np.percentile(image, (1, 99)) if image.size else (0.0, 1.0)
    grey = np.clip((image - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
    rgb = np.repeat(grey[..., None], 3, axis=-1) * 0.7
    t, p = truth != 0, pred != 0
    rgb[t, 1] = 1.0
    rgb[p, 0] = 1.0
    return (np.rot90(rgb) * 255).astype(np.uint8)  # x to the right, y up
