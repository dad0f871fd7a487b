"""`run-stage` and `run-chain`: what a job executes, in this process."""
from __future__ import annotations

import signal
from pathlib import Path
from typing import Annotated

import typer

from orchestrator.cli.app import app, err, out
from orchestrator.config import DeviceName
from orchestrator.training.interrupt import EXIT_INTERRUPTED

StageDevice = Annotated[DeviceName, typer.Option(
    "--device", help="auto: the plan's device (a plan for CUDA refuses to start without a "
    "visible GPU); cpu: train on the CPU whatever the plan says.")]


@app.command("run-stage")
def run_stage(plan_path: Annotated[Path, typer.Option("--plan", help="The run's plan.yaml.")],
              stage: Annotated[str, typer.Option("--stage", help="Stage name in the plan.")],
              device: StageDevice = "auto") -> None:
    """Run one stage in this process (what a job executes; also for debugging).

    On USR2 or SIGTERM it stops at the next step boundary with last.pt written and exits
    with code 75 (under SLURM also at an epoch boundary when the next epoch would not end
    before the time limit); running it again resumes there. A complete stage is not run again.
    A plan made for CUDA exits 2 where no GPU is visible, naming what the job sees. A
    stage of a mixed-GPU plan that starts fresh on another GPU type than planned is
    planned again for it first (plan.yaml and state.json say so).
    """
    # deferred: submitit and torch (CLI start-up)
    from orchestrator.launch.node import export_distributed_env, stop_flag
    from orchestrator.launch.replan import replan_on_start
    from orchestrator.training.trainer import run_stage as _run

    export_distributed_env()  # a step of several tasks (run-chain): this task's DDP rank
    stop = stop_flag(str(plan_path))  # under SLURM: also at an epoch boundary near the time limit
    for signum in (signal.SIGUSR2, signal.SIGTERM):
        stop.install(signum)
    try:
        replan_on_start(plan_path, stage)  # a mixed-GPU plan's stage on another GPU: fit it
        result = _run(plan_path, stage, stop=stop, device=device)
    finally:
        stop.restore()
    if result["interrupted"]:
        err.print(f"{stage}: interrupted at epoch {result['epochs']}; last.pt written, "
                  f"run again to resume")
        raise typer.Exit(EXIT_INTERRUPTED)
    out.print(f"{stage}: {result['start']}; best val Dice {result['best_dice']:.4f}, "
              f"final weights {result['final']}")


@app.command("run-chain")
def run_chain(plan_path: Annotated[Path, typer.Option("--plan", help="The run's plan.yaml.")],
              lcnn: Annotated[bool, typer.Option("--lcnn/--no-lcnn", help="Also run the LCNN runs, "
                                                 "after the 3D stages.")] = False) -> None:
    """Run the plan's stages one after another in this allocation (slurm/progressive.sh).

    Each stage is a job step from the run's code snapshot; a stage stopped by USR2 or the
    time limit requeues the job (counted, up to the profile's max_requeues). Complete stages
    are skipped. Exit 0 when done or requeued; otherwise the last line names the stage and log.
    """
    from orchestrator.launch.chain import run_chain as _chain  # deferred: submitit (CLI start-up)

    raise typer.Exit(_chain(plan_path, include_lcnn=lcnn))
