"""Run one stage of a plan: patch training, validation Dice, checkpoints, metrics.

`run_stage(plan_path, stage)` is the one entry point: `launch/` (each job) and the
`run-stage` command call it; it runs the same in-process, on the local executor and
under SLURM. With WORLD_SIZE > 1 it opens the DDP session itself
(training/distributed.py) and builds this rank's runner with its role: rank 0 the
writer, the others followers (training/rank.py).
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from orchestrator.config import load_plan
from orchestrator.planning.cpu_heap import bound_cpu_heap
from orchestrator.runs import state as run_state
from orchestrator.training import checkpoints as ck
from orchestrator.training import distributed
from orchestrator.training.devices import resolve_device, stage_device
from orchestrator.training.display import StepDisplay
from orchestrator.training.parts import build_runner
from orchestrator.training.rank import role_of
from orchestrator.training.recovery import loader_failure
from orchestrator.training.runner import StageRunner, stage_dir
from orchestrator.training.tensorboard_log import close_board

logger = logging.getLogger(__name__)


def run_stage(plan_path: Path | str, stage: str, max_steps: int | None = None,
              stop: Callable[[], bool] | None = None, device: str = "auto") -> dict[str, Any]:
    """Train one stage of the plan at `plan_path` to its end.

    A stage whose final.pt exists is complete and is not trained again. `stop()` is
    checked between steps (see `interrupt.StopFlag`); when it turns true, or after
    `max_steps` (tests), last.pt is written and the stage returns with "final": None.
    `device`: auto (CUDA where there is a GPU), cuda or cpu; a plan for CUDA starts where no
    GPU is visible only with cpu here or `train_device: cpu` in its profile.

    Returns:
        {"stage", "best_dice", "epochs", "final": path or None, "start": how it started,
        "interrupted": bool}.

    Raises:
        ConfigError: the plan is for CUDA and no CUDA device is visible (devices.stage_device).
    """
    plan = load_plan(Path(plan_path))
    final = stage_dir(plan, stage) / "checkpoints" / "final.pt"
    again = run_state.read_state(plan.run_dir)["stages"].get(stage, {}).get("fresh_requested")
    if final.exists() and plan.stage(stage) and not again:
        done = ck.load_checkpoint(final)
        logger.info("%s: already complete (%s)", stage, final)
        entry = run_state.read_state(plan.run_dir)["stages"].get(stage, {})
        if entry.get("state") != run_state.COMPLETED:  # killed between final.pt and this
            role_of(int(os.environ.get("RANK", "0"))).record(
                plan.run_dir, stage, state=run_state.COMPLETED, final=str(final), error=None)
        return {"stage": stage, "best_dice": done.get("best_dice", -1.0), "epochs": None,
                "final": str(final), "start": "already complete", "interrupted": False}
    # a plan for CUDA never trains on the CPU unless asked (--device cpu, the profile)
    device = stage_device(stage, plan.device, device, plan.cluster.train_device)
    if resolve_device(device).type == "cpu":  # the heap the CPU estimate assumes
        bound_cpu_heap()
    def lost_peer(line: str) -> None:  # a DDP rank lost: the stage ends with this line
        run_state.update_stage(plan.run_dir, stage, state=run_state.FAILED,
                               ended=run_state.now_iso(), error=line)

    with distributed.session(device, stage_dir(plan, stage), plan.cluster.peer_timeout_s,
                             lost_peer) as peers:  # DDP when WORLD_SIZE > 1
        runner = build_runner(plan, stage, device, role=role_of(peers.rank), peers=peers)
        return train_stage(runner, final, max_steps, stop)


def train_stage(runner: StageRunner, final: Path, max_steps: int | None = None,
                stop: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Start the runner (resume, hand-off or fresh) and train it to its end, recording
    its state; see `run_stage`."""
    stage = runner.sp.name
    how = runner.start()
    logger.info("%s: %s (%s, %d torch threads)", stage, how, runner.device, torch.get_num_threads())
    entry = runner.record("attempts", state=run_state.RUNNING,
                          started=run_state.now_iso(), start=how, pid=os.getpid(),
                          host=socket.gethostname(), nodes=distributed.rank_nodes(),
                          max_epochs=runner.sp.spec.max_epochs, error=None)
    if entry.get("slurm_job_id") is None and os.environ.get("SLURM_JOB_ID"):
        runner.record(slurm_job_id=os.environ["SLURM_JOB_ID"])
    spec = runner.sp.spec
    display = StepDisplay(stage, spec.iterations_per_epoch, spec.max_epochs)
    try:
        with display if runner.is_writer else contextlib.nullcontext():
            runner.display = display if runner.is_writer else None
            return _train_to_end(runner, final, max_steps, stop, how)
    except Exception as err:  # state.json must not say RUNNING for a stage that stopped
        if runner.peers.world > 1 and distributed.collective_failure(err):
            raise  # the DDP session records which peer went (distributed.session)
        failed = loader_failure(err, stage)
        shown = failed or err
        runner.record(state=run_state.FAILED, ended=run_state.now_iso(),
                      error=f"{type(shown).__name__}: {shown}"[:500])
        if failed is not None:
            raise failed from err
        raise


def _train_to_end(runner: StageRunner, final: Path, max_steps: int | None,
                  stop: Callable[[], bool] | None, how: str) -> dict[str, Any]:
    stage, spec, pr = runner.sp.name, runner.sp.spec, runner.progress
    while pr.epoch < spec.max_epochs:
        t0 = time.perf_counter()
        if not runner.train_steps(max_steps, stop):
            runner.save_last()
            runner.record(state=run_state.INTERRUPTED, epoch=pr.epoch, best_dice=pr.best_dice)
            logger.info("%s: stopped at epoch %d step %d; last.pt written", stage, pr.epoch,
                        pr.step_in_epoch)
            return {"stage": stage, "best_dice": pr.best_dice, "epochs": pr.epoch,
                    "final": None, "start": how, "interrupted": True}
        row = runner.end_epoch(time.perf_counter() - t0)
        logger.info("%s epoch %d/%d loss %.4f val_dice %s", stage, pr.epoch, spec.max_epochs,
                    row["train_loss"], row.get("val_dice"))
        runner.record(epoch=pr.epoch, best_dice=pr.best_dice, peak_mem_gb=row.get("peak_mem_gb"),
                      epoch_s=row["seconds"])  # status's ETA
        epoch_ended = getattr(stop, "epoch_ended", None)  # StopFlag: is the time limit near?
        if epoch_ended is not None and pr.epoch < spec.max_epochs:
            epoch_ended(row["seconds"])  # if so, the next train_steps stops before its first step
        if _early_stop(spec.early_stop_patience_epochs, runner.log.val_dices()):
            logger.info("%s: early stop (no val Dice gain in %d epochs)", stage,
                        spec.early_stop_patience_epochs)
            break
    runner.save_final(final)
    close_board(runner)
    runner.record(state=run_state.COMPLETED, ended=run_state.now_iso(),
                  final=str(final), epoch=pr.epoch, best_dice=pr.best_dice)
    return {"stage": stage, "best_dice": pr.best_dice, "epochs": pr.epoch, "final": str(final),
            "start": how, "interrupted": False}


def _early_stop(patience: int | None, dices: list[float]) -> bool:
    if not patience or len(dices) <= patience:
        return False
    return max(dices[-patience:]) <= max(dices[:-patience])
