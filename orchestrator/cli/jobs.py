"""`status`, `cancel`, `resume` and `doctor`: a run's jobs and the cluster they run on."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from orchestrator.api import status_document
from orchestrator.cli import render
from orchestrator.cli.app import app, emit_json, err, out
from orchestrator.cli.options import Cluster, DataDir, Json, RunsDir
from orchestrator.config import ExecutorName, load_plan
from orchestrator.errors import ConfigError
from orchestrator.launch.doctor import run_doctor
from orchestrator.launch.sacct import sacct_states
from orchestrator.runs.state import read_state, request_fresh_start
from orchestrator.runs.status import collect_status, run_plan_path

RunArg = Annotated[str, typer.Argument(help="Run name.")]


@app.command()
def status(run: Annotated[str | None, typer.Argument(help="Run name; all runs if omitted.")] = None,
           runs_dir: RunsDir = Path("runs"), json_out: Json = False,
           watch: Annotated[bool, typer.Option("--watch", help="Refresh in place.")] = False) -> None:
    """Every run, or one run's stages: job id, state, attempts, epoch, best Dice, memory."""
    # one batched sacct call per refresh, at most every 5 s per runs folder
    if json_out:
        emit_json(status_document(run, runs_dir=runs_dir))
        return
    if not watch:
        render.status(out, status_document(run, runs_dir=runs_dir), run)
        return
    render.watch(out, lambda: status_document(run, runs_dir=runs_dir), run)


@app.command()
def cancel(run: RunArg, runs_dir: RunsDir = Path("runs")) -> None:
    """Cancel every unfinished job of a run."""
    from orchestrator.launch.submit import cancel_run  # deferred: submitit (CLI start-up)

    ids = cancel_run(load_plan(run_plan_path(runs_dir, run)))
    out.print(f"{run}: cancelled {len(ids)} job(s) {' '.join(ids)}")


def _submitted_with(run_dir: Path) -> ExecutorName:
    """The executor state.json says the run was submitted with (slurm where it says none).

    Raises:
        ConfigError: state.json names another executor.
    """
    match recorded := read_state(run_dir).get("executor"):
        case "slurm" | None:
            return "slurm"
        case "local":
            return "local"
        case "debug":
            return "debug"
    raise ConfigError(f"{run_dir / 'state.json'}: executor {recorded!r}; expected slurm, local or "
                      f"debug (or choose one with --executor)")


@app.command()
def resume(run: RunArg, runs_dir: RunsDir = Path("runs"),
           executor: Annotated[ExecutorName | None, typer.Option(
               "--executor", help="Default: as submitted.")] = None,
           fresh: Annotated[list[str] | None, typer.Option(
               "--fresh", help="Start this stage over from its beginning, on purpose (repeatable); "
               "without it a stage whose last.pt is gone refuses to restart.")] = None) -> None:
    """Resubmit a run from its first unfinished stage (each resumes from its last.pt)."""
    # deferred: submitit (CLI start-up)
    from orchestrator.launch.folds import resume_folds
    from orchestrator.launch.submit import submit_plan

    plan_path = run_plan_path(runs_dir, run)
    p = load_plan(plan_path)
    for stage in fresh or []:
        request_fresh_start(p.run_dir, stage, [s.name for s in p.stages])
        err.print(f"{run}: stage {stage} will start over from its beginning")
    doc = collect_status(runs_dir, run, sacct_states)["runs"][0]
    todo = [s["name"] for s in doc["stages"] if s["state"] not in ("COMPLETED", "NOT_SUBMITTED")
            or s["name"] in (fresh or [])]
    if not todo:
        out.print(f"{run}: every stage is complete; nothing to resume")
        return
    kind = executor or _submitted_with(p.run_dir)
    if doc.get("folds"):  # cross-validation: each fold's unfinished stages, in that fold
        jobs = resume_folds(p, kind, todo)
    else:
        jobs = submit_plan(p, plan_path, kind, only=todo, resubmit=True)
    render.submitted(out, p, jobs, kind, False)


@app.command()
def doctor(cluster: Cluster = None, data: DataDir = None) -> None:
    """Check what a login node can before the first job: profile, venv, SLURM, data.

    One line each: ok, or what is wrong and the fix. Exit 2 when something needs fixing.
    """
    checks = run_doctor(cluster, data)
    for c in checks:
        out.print(("[green]" if c.ok else "[red]") + c.line() + "[/]", highlight=False, soft_wrap=True)
    bad = [c.name for c in checks if not c.ok]
    if bad:
        err.print(f"[red]{len(bad)} to fix:[/] {', '.join(bad)}", highlight=False)
        raise typer.Exit(2)
