"""The run's model: the best validation checkpoint over all stages of a run.

Every validated epoch of a 3D stage that beats the run's best Dice so far writes
`runs/<run>/best.pt` (atomically, the same plain-data payload as a stage's best.pt, plus
"epoch", "val_dice" and "run_model": {"stage", "epoch", "dice"}) and records it as
"model" in state.json, under the state file's lock. A requeued or resumed stage finds both
where it left them; a kill between the file and the record is repaired from the file's own
header when the next stage starts. LCNN runs (2D, beside the chain) do not take part.
A cross-validation fold is a run of its own (`runs/<run>/folds/fold<i>/best.pt`).

`evaluate --run RUN` and `predict --run RUN` take this file (`run_model_file`).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orchestrator.errors import CheckpointError, ConfigError
from orchestrator.runs import state as run_state
from orchestrator.training import checkpoints as ck

logger = logging.getLogger(__name__)
RUN_MODEL_FILE = "best.pt"


class RunModel:
    """The run's best checkpoint as one stage process sees it."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / RUN_MODEL_FILE
        self.record: dict[str, Any] | None = run_state.read_state(self.run_dir).get("model")
        self._repair()

    @property
    def dice(self) -> float:
        """The run's best validation Dice so far (-1 before any)."""
        return float(self.record["dice"]) if self.record else -1.0

    def _repair(self) -> None:
        """state.json's record from best.pt's header where they disagree (a kill between
        writing the file and recording it)."""
        if not self.path.exists():
            return
        try:
            header = ck.load_checkpoint(self.path).get("run_model")
        except CheckpointError as err:
            logger.warning("%s", err)
            return
        if header and (not self.record or header["dice"] != self.record.get("dice")):
            run_state.update_run(self.run_dir, model={**header, "path": str(self.path)})
            self.record = {**header, "path": str(self.path)}

    def offer(self, stage: str, epoch: int, dice: float,
              payload: Callable[[], dict[str, Any]]) -> bool:
        """Write best.pt and record it if `dice` beats the run's best (else nothing).

        Returns:
            Whether this epoch became the run's model.
        """
        record = {"stage": stage, "epoch": int(epoch), "dice": float(dice), "path": str(self.path)}
        header = {k: record[k] for k in ("stage", "epoch", "dice")}

        def write() -> None:
            ck.save_checkpoint(self.path, {**payload(), "epoch": int(epoch), "val_dice": float(dice),
                                           "run_model": header})
        taken = run_state.offer_run_model(self.run_dir, record, write)
        if taken:
            self.record = record
            logger.info("%s: epoch %d, Dice %.4f, is the run's model now (%s)", stage, epoch, dice,
                        self.path)
        return taken


def run_model_file(run_dir: Path) -> Path:
    """run_dir/best.pt, the model of a run that is not a cross-validation run (those have
    one per fold: training/crossval.py).

    Raises:
        ConfigError: no stage of the run has validated yet.
    """
    path = Path(run_dir) / RUN_MODEL_FILE
    if path.exists():
        return path
    raise ConfigError(f"--run {Path(run_dir).name}: {path} does not exist yet; expected a run with "
                      "at least one validated epoch of a 3D stage (see `orchestrator status "
                      f"{Path(run_dir).name}`)")
