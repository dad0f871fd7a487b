"""Continuity across a hand-off: the handed-off model is validated before its first step,
and deep-supervision heads the hand-off added join the loss gradually.

The hand-off preserves the function (training/handoff.py), so a stage's epoch-0 validation
Dice is the previous stage's final one; a drop after it comes from the first steps. Two
causes were measured on the demo (docs/benchmarks.md): the learning rate jumping from the
previous stage's annealed end to the new stage's peak on a fresh AdamW (fixed by the
hand-off warm-up, `handoff_warmup_*`), and, into stage 4, new deep-supervision heads: they
start at zero, their loss is that of a blank prediction, and at full weight it more than
doubled the training loss (0.44 -> 1.08 on the same batch, the main output unchanged) and
pulled the decoder away from the handed-off function.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from orchestrator.atomic import atomic_write_text
from orchestrator.training import checkpoints as ck
from orchestrator.training.metrics_log import MetricsLog
from orchestrator.training.validation import validate


def validate_handoff(runner: Any) -> str:
    """Validate the handed-off model before its first step: metrics.csv's epoch-0 row,
    next to the previous stage's final validation Dice in handoff.json and state.json.
    The stage's best.pt starts as this model, so a stage never ends below its start.
    Returns the text to add to the stage's "how it started"."""
    t0 = time.perf_counter()
    row: dict[str, Any] = {"epoch": 0, **validate(runner.model, runner.val_recs, runner.predict, runner.load)}
    row["seconds"] = round(time.perf_counter() - t0, 2)
    runner.log.write_row(row)
    dice = row["val_dice"]
    prev = previous_final_dice(runner.plan.run_dir / str(runner.sp.init_from))
    report_path = runner.dir / "handoff.json"
    report = json.loads(report_path.read_text())
    report.update(previous_final_dice=prev, epoch0_val_dice=dice)
    atomic_write_text(report_path, json.dumps(report, indent=2))
    runner.record(handoff={"from": runner.sp.init_from, "previous_final_dice": prev,
                           "epoch0_dice": dice})
    if isinstance(dice, float) and dice > runner.progress.best_dice:
        runner.progress.best_dice = dice
        ck.save_checkpoint(runner.ckpt_dir / "best.pt", runner.payload(full=False))
    return f"; epoch-0 val Dice {dice:.3f} (previous stage's final {prev})"


def previous_final_dice(prev_dir: Path) -> float | None:
    """The last validation Dice in a stage's metrics.csv (None: no validated epoch)."""
    dices = MetricsLog(prev_dir).val_dices()
    return dices[-1] if dices else None


def aux_ramp_steps(handoff_json: Path, spec: Any) -> int:
    """Steps over which the deep-supervision loss weights ramp in from 0: the hand-off's
    warm-up, else one epoch, when this stage's hand-off added the heads (zeroed); else 0."""
    try:
        zeroed = json.loads(handoff_json.read_text()).get("zeroed", [])
    except (OSError, ValueError):
        return 0
    if not any(name.startswith("ds_heads.") for name in zeroed):
        return 0
    return spec.handoff_warmup_span(spec.iterations_per_epoch) or spec.iterations_per_epoch
